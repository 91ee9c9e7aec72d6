"""models/cnn.py's network written in Flax NNX: [Conv -> activation -> max-pool] per feature
size, then [Dense -> activation -> dropout] per hidden size, then the logits.

Same layers, shapes, initializers and arithmetic as the Linen `cnn.Model`: Flax's own
convolution (`nnx.Conv`, as cnn.py's `nn.Conv`) and models/layers.py's `max_pool`, the faster
CPU path cnn.py has. Only the logits kernel's layout differs:
`nnx.Linear` stores it [features, classes], `layers.Logits` [classes, features]
(tests/unit/test_nnx.py carries the Linen parameters over, transposing that one).
"""

from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from mnist_jax import models
from mnist_jax.models import layers


class Model(nnx.Module):

  def __init__(self, num_classes: int, *, image_shape: Sequence[int],
               features: Sequence[int] = (32, 64), kernel_size: int = 3,
               hidden_sizes: Sequence[int] = (128,), dropout_rate: float = 0.0,
               activation: str = 'relu', kernel_init: str = 'glorot_uniform',
               bias_init: str = 'zeros', dtype: Any = jnp.float32, rngs: nnx.Rngs):
    # dtype (config.compute_dtype): what the layers compute in; the parameters stay float32.
    inits = dict(kernel_init=models.initializer(kernel_init),
                 bias_init=models.initializer(bias_init), dtype=dtype)
    height, width, channels = image_shape
    self.convs = nnx.List()
    for size in features:
      self.convs.append(nnx.Conv(channels, size, (kernel_size, kernel_size), **inits,
                                 rngs=rngs))
      channels, height, width = size, height // 2, width // 2  # 'SAME' conv, 2x2/2 pooling.
    width = height * width * channels
    self.hidden = nnx.List()
    for size in hidden_sizes:
      self.hidden.append(nnx.Linear(width, size, **inits, rngs=rngs))
      width = size
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.logits = nnx.Linear(width, num_classes, **inits, rngs=rngs)
    self.activation = models.activation(activation)

  def __call__(self, images_BxHxWxC: jax.Array) -> jax.Array:
    x = images_BxHxWxC
    for conv in self.convs:
      x = layers.max_pool(self.activation(conv(x)), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for dense in self.hidden:
      x = self.dropout(self.activation(dense(x)))
    return self.logits(x)
