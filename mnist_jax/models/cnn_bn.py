"""A CNN with BatchNorm and dropout: [Conv -> BatchNorm -> activation -> max-pool] per feature
size, then [Dense -> BatchNorm -> activation -> dropout] per hidden size, then the logits.

It keeps BatchNorm's running statistics in the 'batch_stats' collection (see the model
contract in models/__init__.py) and takes the batch's mask, so the padding of an epoch's last
batch never enters them. Nothing else in the package knows about BatchNorm. Its convolution is
Flax's `nn.Conv`, its pooling models/layers.py's `max_pool` (as models/cnn.py).
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
  dropout_rate: float = 0.3
  batch_norm_momentum: float = 0.9
  activation: str = 'relu'
  kernel_init: str = 'glorot_uniform'
  bias_init: str = 'zeros'
  dtype: Any = jnp.float32  # config.compute_dtype: what the layers compute in.

  @nn.compact
  def __call__(self, images_BxHxWxC: jax.Array, train: bool = False,
               mask: jax.Array | None = None) -> jax.Array:
    kernel_init = models.initializer(self.kernel_init)
    act = models.activation(self.activation)
    norm = lambda: nn.BatchNorm(use_running_average=not train,  # Statistics in float32.
                                momentum=self.batch_norm_momentum, dtype=self.dtype)
    real = None if mask is None else mask > 0  # [B]: which examples BatchNorm may count.
    x = images_BxHxWxC
    for features in self.features:  # The convolution's bias would only shift BatchNorm's mean.
      x = nn.Conv(features, (self.kernel_size,) * 2, use_bias=False,
                  kernel_init=kernel_init, dtype=self.dtype)(x)
      x = act(norm()(x, mask=None if real is None else real[:, None, None, None]))
      x = layers.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for size in self.hidden_sizes:
      x = nn.Dense(size, use_bias=False, kernel_init=kernel_init, dtype=self.dtype)(x)
      x = act(norm()(x, mask=None if real is None else real[:, None]))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return layers.Logits(self.num_classes, kernel_init=kernel_init,
                         bias_init=models.initializer(self.bias_init), dtype=self.dtype,
                         name=f'Dense_{len(self.hidden_sizes)}')(x)
