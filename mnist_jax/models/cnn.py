"""A small convolutional network: [Conv -> activation -> max-pool] per feature size, then MLP.

Its convolution is Flax's own `nn.Conv` (with XLA's own CPU convolutions it measured faster
than models/layers.py's `Conv`: docs/performance.md); its pooling is models/layers.py's `max_pool`
(Flax's, with a faster CPU path: same values and gradients).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnist_jax import models
from mnist_jax.models import layers


class Model(nn.Module):
  num_classes: int
  features: Sequence[int] = (32, 64)
  kernel_size: int = 3
  hidden_sizes: Sequence[int] = (128,)
  dropout_rate: float = 0.0
  activation: str = 'relu'
  kernel_init: str = 'glorot_uniform'
  bias_init: str = 'zeros'
  dtype: Any = jnp.float32  # config.compute_dtype: what the layers compute in.

  @nn.compact
  def __call__(self, images_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    inits = dict(kernel_init=models.initializer(self.kernel_init),
                 bias_init=models.initializer(self.bias_init), dtype=self.dtype)
    act = models.activation(self.activation)
    x = images_BxHxWxC
    for features in self.features:
      x = act(nn.Conv(features, (self.kernel_size, self.kernel_size), **inits)(x))
      x = layers.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for size in self.hidden_sizes:
      x = act(nn.Dense(size, **inits)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # Named as nn.Dense would be, so it gets the same parameter names and initial values.
    return layers.Logits(self.num_classes, **inits, name=f'Dense_{len(self.hidden_sizes)}')(x)
