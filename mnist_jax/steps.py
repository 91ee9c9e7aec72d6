"""The train and eval steps: pure functions of (state, batch), jitted once at module level.

A batch is a dict: 'image' uint8 [B, H, W, C], 'label' int32 [B], 'mask' float32 [B] (1 for a
real example, 0 for padding). Losses are means over the real examples only, so a padded last
batch counts exactly its real examples, as Keras's smaller last batch does.

Several steps run per jitted call (`lax.scan`), so Python dispatch is paid once per call:
`train_chunk` scans stacked batches that tf.data prepared; `train_chunk_resident` gathers each
batch on the device from a resident copy of the dataset. Both run the same `train_step`.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]  # Metric sums over real examples: loss, correct, count.
SUM_KEYS = ('loss', 'correct', 'count')


class TrainState(train_state.TrainState):
  rng: jax.Array  # Folded with the step for per-step randomness (dropout, augmentation).


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...]) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  params = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32))['params']
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=state_rng)


def preprocess(image_BxHxWxC: jax.Array) -> jax.Array:
  return image_BxHxWxC.astype(jnp.float32) / 255.0


def metric_sums(logits_BxC: jax.Array, batch: Batch) -> Sums:
  mask_B = batch['mask']
  loss_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, batch['label'])
  correct_B = (jnp.argmax(logits_BxC, axis=-1) == batch['label']).astype(jnp.float32)
  real_B = mask_B > 0  # `where`, not a product: padding can never leak a NaN into the sums.
  return dict(loss=jnp.sum(jnp.where(real_B, loss_B, 0.0)),
              correct=jnp.sum(jnp.where(real_B, correct_B, 0.0)), count=jnp.sum(mask_B))


def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Sums]:
  """One optimizer step on the mean loss over the batch's real examples."""
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits_BxC = state.apply_fn({'params': params}, preprocess(batch['image']), train=True,
                                rngs={'dropout': dropout_rng})
    sums = metric_sums(logits_BxC, batch)
    return sums['loss'] / jnp.maximum(sums['count'], 1.0), sums

  (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  sums = dict(sums, loss_mean=loss)
  return state.apply_gradients(grads=grads), sums


def eval_step(state: TrainState, batch: Batch) -> Sums:
  logits_BxC = state.apply_fn({'params': state.params}, preprocess(batch['image']), train=False)
  return metric_sums(logits_BxC, batch)


def zero_sums() -> Sums:
  return {k: jnp.zeros(()) for k in SUM_KEYS}


def add_sums(a: Sums, b: Sums) -> Sums:
  return {k: a[k] + b[k] for k in SUM_KEYS}


def _scan_train(state: TrainState, xs: Any, get_batch: Callable[[Any], Batch], unroll: int,
                guard_empty_steps: bool):
  """Runs train_step over the leading axis of `xs`; a step with no real example is a no-op.

  Chunks are padded with empty steps to keep shapes static; those must not move the optimizer
  (RMSprop's second moment would still decay on a zero gradient), so with `guard_empty_steps`
  each step keeps the old state where it had no example. The guard reads and selects the whole
  state at every step, so callers drop it for chunks without empty steps.

  Returns the state, the summed metrics, and for the NaN/Inf check the per-step 'loss' [K]
  and 'params_finite' (whether every parameter is finite after the chunk). Non-finite
  gradients make the parameters, hence the next step's loss, non-finite; checking the
  parameters once per chunk costs far less than a gradient norm at every step.
  """

  def body(carry, x):
    state, totals = carry
    new_state, sums = train_step(state, get_batch(x))
    if guard_empty_steps:
      new_state = jax.tree.map(functools.partial(jnp.where, sums['count'] > 0), new_state, state)
    return (new_state, add_sums(totals, sums)), sums['loss_mean']

  (state, totals), loss_K = jax.lax.scan(body, (state, zero_sums()), xs, unroll=unroll)
  params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                                     for x in jax.tree.leaves(state.params)]))
  return state, totals, dict(loss=loss_K, params_finite=params_finite)


def _scan_eval(state: TrainState, xs: Any, get_batch: Callable[[Any], Batch],
               unroll: int) -> Sums:
  def body(totals, x):
    return add_sums(totals, eval_step(state, get_batch(x))), None

  return jax.lax.scan(body, zero_sums(), xs, unroll=unroll)[0]


def _gather(data: Batch, chunk: Batch) -> Batch:
  """A batch gathered on the device from resident data by the planned indices."""
  index = chunk['index']
  return dict(image=jnp.take(data['image'], index, axis=0),
              label=jnp.take(data['label'], index, axis=0), mask=chunk['mask'])


def _identity(batch: Batch) -> Batch:
  return batch


def train_batches(state: TrainState, batches: Batch, unroll: int = 1,
                  guard_empty_steps: bool = True):
  """Train steps over stacked batches [K, B, ...]; see `_scan_train` for what it returns."""
  return _scan_train(state, batches, _identity, unroll, guard_empty_steps)


def train_resident(state: TrainState, data: Batch, chunk: Batch, unroll: int = 1,
                   guard_empty_steps: bool = True):
  """Train steps over planned indices chunk['index'] [K, B] into resident `data`."""
  return _scan_train(state, chunk, functools.partial(_gather, data), unroll, guard_empty_steps)


def eval_batches(state: TrainState, batches: Batch, unroll: int = 1) -> Sums:
  return _scan_eval(state, batches, _identity, unroll)


def eval_resident(state: TrainState, data: Batch, chunk: Batch, unroll: int = 1) -> Sums:
  return _scan_eval(state, chunk, functools.partial(_gather, data), unroll)


def over_replicas(fn: Callable, in_axes: tuple) -> Callable:
  """`fn` for N independent replicas at once: state (and per-replica inputs) stacked [N, ...]."""

  def run(state, *args, **static):  # unroll (and guard_empty_steps for training).
    return jax.vmap(functools.partial(fn, **static), in_axes=in_axes)(state, *args)

  return run


# `unroll` is lax.scan's: XLA:CPU runs convolutions inside a loop body about 10x slower than
# unrolled, so convolutional configs unroll their (short) chunks; MLPs keep the loop.
_jit_train = functools.partial(jax.jit, donate_argnums=0,
                               static_argnames=('unroll', 'guard_empty_steps'))
_jit_eval = functools.partial(jax.jit, static_argnames='unroll')

train_chunk = _jit_train(train_batches)
train_chunk_resident = _jit_train(train_resident)
eval_chunk = _jit_eval(eval_batches)
eval_chunk_resident = _jit_eval(eval_resident)
# Replicas share the resident data and the evaluation batches; each has its own data order.
train_chunk_replicas = _jit_train(over_replicas(train_batches, (0, 0)))
train_chunk_resident_replicas = _jit_train(over_replicas(train_resident, (0, None, 0)))
eval_chunk_replicas = _jit_eval(over_replicas(eval_batches, (0, None)))
eval_chunk_resident_replicas = _jit_eval(over_replicas(eval_resident, (0, None, None)))


@jax.jit
def _probabilities(state: TrainState, image_BxHxWxC: jax.Array) -> jax.Array:
  logits = state.apply_fn({'params': state.params}, preprocess(image_BxHxWxC), train=False)
  return jax.nn.softmax(logits)


def predict(state: TrainState, images: np.ndarray, batch_size: int) -> np.ndarray:
  """Class probabilities [N, C] for host images, in fixed-size (padded) batches."""
  pad = -len(images) % batch_size
  padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  probs = [_probabilities(state, padded[i:i + batch_size])
           for i in range(0, len(padded), batch_size)]
  return np.concatenate(jax.device_get(probs))[:len(images)]


# Single steps, for notebooks and tests; the loop uses the chunked versions above.
train_step_jit = jax.jit(train_step, donate_argnums=0)
eval_step_jit = jax.jit(eval_step)
