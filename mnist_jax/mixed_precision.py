"""Mixed precision: config.compute_dtype, and float16's dynamic loss scaling.

The model computes in the compute dtype: it gets it through the model contract (a `dtype`
constructor argument, models/__init__.py) and passes it on to its layers, which cast their
inputs and float32 parameters to it. The parameters, the optimizer state and BatchNorm's
statistics stay float32, and the step casts the logits to float32 before the loss and the
metrics (steps.py).

bfloat16 has float32's range: it needs nothing else. float16 has a range of ~6e-5 to 65504,
so small gradients underflow to 0: the loss is multiplied by a scale before the backward pass
and the gradients divided by it after (in float32). A step whose gradients are not all finite
is skipped: the state stays as it was, but for its step count, and the scale halves; after
`GROWTH_INTERVAL` finite steps in a row it doubles. These are flax.training.dynamic_scale's
rules and defaults, kept as an optax-style (init, update) pair here so that they compose with
gradient accumulation (the scale is applied to every micro-batch, the check to their sum).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

INITIAL_SCALE = 2.0 ** 16  # flax's DynamicScale defaults.
GROWTH_INTERVAL = 2000
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5


class LossScale(NamedTuple):
  scale: jax.Array  # float32: what the loss is multiplied by before the backward pass.
  finite_steps: jax.Array  # int32: finite steps since the scale last changed.
  skipped_steps: jax.Array  # int32: steps skipped so far (non-finite gradients), reported.


def needs_loss_scale(compute_dtype: str) -> bool:
  return compute_dtype == 'float16'


def init(scale: float = INITIAL_SCALE) -> LossScale:
  return LossScale(jnp.asarray(scale, jnp.float32), jnp.zeros((), jnp.int32),
                   jnp.zeros((), jnp.int32))


def update(state: LossScale, finite: jax.Array) -> LossScale:
  """The scale after a step whose gradients were (not) all finite."""
  grow = state.finite_steps + 1 >= GROWTH_INTERVAL
  scale = jnp.where(finite, jnp.where(grow, state.scale * GROWTH_FACTOR, state.scale),
                    state.scale * BACKOFF_FACTOR)
  scale = jnp.minimum(scale, jnp.finfo(jnp.float32).max)
  finite_steps = jnp.where(finite & ~grow, state.finite_steps + 1, 0)
  return LossScale(scale, finite_steps.astype(jnp.int32),
                   state.skipped_steps + jnp.where(finite, 0, 1).astype(jnp.int32))


def all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
