"""A multilayer perceptron: flatten, [Dense -> activation] per hidden size, Dense to logits."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnist_jax import models
from mnist_jax.models import layers


class Model(nn.Module):
  num_classes: int
  hidden_sizes: Sequence[int] = (512,)
  activation: str = 'relu'
  kernel_init: str = 'glorot_uniform'
  bias_init: str = 'zeros'
  dtype: Any = jnp.float32  # config.compute_dtype: what the layers compute in.

  @nn.compact
  def __call__(self, images_BxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    del train  # No dropout or batch norm here.
    dense = lambda size: nn.Dense(size, kernel_init=models.initializer(self.kernel_init),
                                  bias_init=models.initializer(self.bias_init), dtype=self.dtype)
    x_BxD = images_BxHxWxC.reshape((images_BxHxWxC.shape[0], -1))
    for size in self.hidden_sizes:
      x_BxD = models.activation(self.activation)(dense(size)(x_BxD))
    # Named as nn.Dense would be, so it gets the same parameter names and initial values.
    return layers.Logits(self.num_classes, kernel_init=models.initializer(self.kernel_init),
                         bias_init=models.initializer(self.bias_init), dtype=self.dtype,
                         name=f'Dense_{len(self.hidden_sizes)}')(x_BxD)
