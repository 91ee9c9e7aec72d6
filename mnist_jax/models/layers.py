"""Layers shared by the models."""

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class Logits(nn.Module):
  """Dense to the class logits, like `nn.Dense`, with its kernel stored [classes, features].

  Same function and, under the same name, the same initial values as `nn.Dense(num_classes)`:
  the kernel is drawn [features, classes] (so fan-in/fan-out initializers see the usual shape)
  and stored transposed. Why: XLA:CPU computes the weight gradient of a narrow [features, 10]
  kernel on a slow path; the [10, features] layout made the notebook's MLP train ~10% faster
  per epoch on a 2-core CPU (benchmarks/train_speed.py). Not measured on a GPU or TPU, where
  either layout is one matrix multiply.
  """
  features: int
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x_BxD: jax.Array) -> jax.Array:
    kernel_CxD = self.param(
        'kernel', lambda rng: self.kernel_init(rng, (x_BxD.shape[-1], self.features)).T)
    bias_C = self.param('bias', self.bias_init, (self.features,))
    return jnp.einsum('bd,cd->bc', x_BxD, kernel_CxD) + bias_C[None, :]
