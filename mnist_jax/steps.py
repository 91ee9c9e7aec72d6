"""The train and eval steps: pure functions of (state, batch), generic over the task.

A batch is a dict: 'image' uint8 [B, H, W, C], 'label' int32 [B], 'mask' float32 [B] (1 for a
real example, 0 for padding). Losses are means over the real examples only, so a padded last
batch counts exactly its real examples, as Keras's smaller last batch does.

The steps know no particular model, loss, metric, augmentation or optimizer; each is chosen
by name in the config and lives in its own module:
  * the model (`models/`): a Linen module; mutable collections it keeps (BatchNorm's
    'batch_stats') are in `TrainState.model_state`, updated by training, used by evaluation;
  * the loss (`losses.py`) and the metrics (`metrics.py`): per-example functions, named in
    `Task`, summed under the mask;
  * augmentation (`augment.py`): a pure function of (rng, images), named in `Task`;
  * the optimizer (`optim.py`): `TrainState.tx`.

Several steps run per jitted call (`lax.scan`), so Python dispatch is paid once per call. The
chunk functions come from `make_chunk_fns(get_batch, ...)`: over stacked batches that tf.data
prepared (`stacked`), or over indices into a resident copy of the dataset gathered on the
device (`gather`); for one run, or for N replicas at once (vmapped). All of them run the same
`train_step`, and `check_finite` reads what they return for the NaN/Inf guard.
"""

import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnist_jax import augment
from mnist_jax import losses
from mnist_jax import metrics
from mnist_jax import mixed_precision
from mnist_jax.infra import errors

Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]  # Sums over real examples: the loss, each metric, and 'count'.


class TrainState(train_state.TrainState):
  rng: jax.Array  # Folded with the step for per-step randomness (dropout, augmentation).
  model_state: dict[str, Any]  # The model's mutable collections, e.g. {'batch_stats': ...}.
  loss_hparams: dict[str, Any]  # Swept loss arguments (sweeps.py), e.g. label_smoothing.
  # config.ema_decay > 0: optax.ema's state over {'params', 'model_state'} (the average, not
  # yet debiased, and its count); {} when off. `ema_weights` gives the debiased average.
  ema: Any = dataclasses.field(default_factory=dict)
  # config.compute_dtype='float16': the dynamic loss scale (mixed_precision.LossScale); {} else.
  loss_scale: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Task:
  """What a step does around the model: augmentation, the loss, the metrics.

  Names and literal values only, so a task is hashable: it is a static argument of the
  jitted functions, and equal tasks share their compiled programs.
  """
  loss: str = 'softmax_cross_entropy'
  loss_kwargs: tuple[tuple[str, Any], ...] = ()
  metrics: tuple[str, ...] = ('accuracy',)
  augment: str = ''
  model_takes_mask: bool = False  # The model's __call__ takes `mask` (e.g. for BatchNorm).
  grad_accum_steps: int = 1  # Micro-batches per update (config.grad_accum_steps).
  ema_decay: float = 0.0  # The parameters' moving average (config.ema_decay); 0: none.
  compute_dtype: str = 'float32'  # What the model computes in (config.compute_dtype).

  @classmethod
  def from_config(cls, config, model: nn.Module) -> 'Task':
    return cls(loss=config.loss, loss_kwargs=tuple(sorted(config.loss_kwargs.items())),
               metrics=tuple(config.metrics), augment=config.augment,
               model_takes_mask=takes_mask(model),
               grad_accum_steps=config.get('grad_accum_steps', 1),
               ema_decay=float(config.get('ema_decay', 0.0)),
               compute_dtype=config.get('compute_dtype', 'float32'))

  @property
  def value_names(self) -> tuple[str, ...]:
    """The per-example values the steps sum: the loss, then each metric."""
    return ('loss', *self.metrics)

  def per_example(self, logits_BxC: jax.Array, labels_B: jax.Array,
                  loss_hparams: dict[str, Any]) -> dict[str, jax.Array]:
    kwargs = dict(self.loss_kwargs, **loss_hparams)  # A swept value overrides the config's.
    values = dict(loss=losses.get(self.loss)(logits_BxC, labels_B, **kwargs))
    values.update({name: metrics.METRICS[name](logits_BxC, labels_B) for name in self.metrics})
    return values


DEFAULT_TASK = Task()  # The notebook's: softmax cross-entropy, accuracy, no augmentation.


def takes_mask(model: nn.Module) -> bool:
  return 'mask' in inspect.signature(type(model).__call__).parameters


def create_train_state(rng: jax.Array, model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], ema_decay: float = 0.0,
                       loss_scale: bool = False) -> TrainState:
  init_rng, state_rng = jax.random.split(rng)
  variables = dict(model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32)))
  params = variables.pop('params')
  ema = optax.ema(ema_decay).init(dict(params=params, model_state=variables)) if ema_decay else {}
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=state_rng,
                           model_state=variables, loss_hparams={}, ema=ema,
                           loss_scale=mixed_precision.init() if loss_scale else {})


def ema_weights(state: TrainState, decay: float) -> TrainState:
  """The state with its parameters and model collections replaced by their debiased moving
  average, for evaluation."""
  average = debiased(state.ema, decay)
  return state.replace(params=average['params'], model_state=average['model_state'])


def debiased(ema: optax.EmaState, decay: float):
  """optax.ema's debiasing of its average: average / (1 - decay^count); for a
  replica-stacked state too (count [R])."""
  correction = 1.0 - jnp.asarray(decay, jnp.float32) ** ema.count

  def debias(leaf):
    c = correction.reshape(correction.shape + (1,) * (leaf.ndim - correction.ndim))
    return (leaf / c).astype(leaf.dtype)

  return jax.tree.map(debias, ema.ema)


def fingerprinted(state: TrainState) -> tuple[Any, dict[str, Any]]:
  """What the parameter fingerprint covers: the parameters, then the model's collections and,
  with an EMA, its state (count and average), with float16 the loss scale: everything a
  resume must restore exactly."""
  extra = {name: part for name, part in (('ema', state.ema), ('loss_scale', state.loss_scale))
           if part}
  return state.params, dict(state.model_state, **extra)


def _logits(task: Task, state: TrainState, params, images_BxHxWxC, mask_B, *, train: bool,
            rng: jax.Array | None = None):
  """The model's logits (float32, whatever the compute dtype), and its updated mutable
  collections (training only)."""
  variables = {'params': params, **state.model_state}
  kwargs = dict(mask=mask_B) if task.model_takes_mask else {}
  if not train:
    logits, model_state = (state.apply_fn(variables, images_BxHxWxC, train=False, **kwargs),
                           state.model_state)
  elif not state.model_state:  # Nothing mutable (the notebook's MLP): a plain apply.
    logits, model_state = (state.apply_fn(variables, images_BxHxWxC, train=True,
                                          rngs={'dropout': rng}, **kwargs), state.model_state)
  else:
    logits, model_state = state.apply_fn(variables, images_BxHxWxC, train=True,
                                         rngs={'dropout': rng}, mutable=list(state.model_state),
                                         **kwargs)
  return logits.astype(jnp.float32), model_state


def train_step(state: TrainState, batch: Batch,
               task: Task = DEFAULT_TASK) -> tuple[TrainState, Sums]:
  """One optimizer step on the mean loss over the batch's real examples (accumulated over
  `task.grad_accum_steps` micro-batches), then the EMA's update, if any. With a loss scale
  (float16), a step whose gradients are not all finite is skipped (mixed_precision.py)."""
  dropout_rng, augment_rng = jax.random.split(jax.random.fold_in(state.rng, state.step))
  images = augment.build(task.augment)(augment_rng, augment.preprocess(batch['image']))
  scale = state.loss_scale.scale if state.loss_scale else None

  def loss_fn(params, model_state, images, labels, mask, rng, mean=True):
    logits_BxC, model_state = _logits(task, state.replace(model_state=model_state), params,
                                      images, mask, train=True, rng=rng)
    values = task.per_example(logits_BxC, labels, state.loss_hparams)
    sums = metrics.masked_sums(values, mask)
    total = sums['loss'] / jnp.maximum(sums[metrics.COUNT], 1.0) if mean else sums['loss']
    return (total if scale is None else total * scale), (sums, model_state)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if task.grad_accum_steps == 1:
    (loss, (sums, model_state)), grads = grad_fn(
        state.params, state.model_state, images, batch['label'], batch['mask'], dropout_rng)
  else:
    grads, sums, model_state = _accumulate(grad_fn, state, images, batch, dropout_rng, task)
    count = jnp.maximum(sums[metrics.COUNT], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)  # The mean over all real examples.
    loss = sums['loss'] / count
  if scale is not None:
    grads = jax.tree.map(lambda g: g.astype(jnp.float32) / scale, grads)
    loss = sums['loss'] / jnp.maximum(sums[metrics.COUNT], 1.0)
  new_state = state.apply_gradients(grads=grads).replace(model_state=model_state)
  if task.ema_decay:
    _, ema = optax.ema(task.ema_decay).update(
        dict(params=new_state.params, model_state=new_state.model_state), state.ema)
    new_state = new_state.replace(ema=ema)
  sums = dict(sums, loss_mean=loss)
  if scale is not None:
    new_state, sums = _skip_unless_finite(state, new_state, sums, grads)
  return new_state, sums


def _skip_unless_finite(state: TrainState, new_state: TrainState, sums: Sums, grads):
  """float16: the new state if the gradients are all finite; else the old one, one step on
  and with its sums zeroed (a skipped step trains on nothing). The loss scale updates."""
  finite = mixed_precision.all_finite(grads)
  kept = jax.tree.map(functools.partial(jnp.where, finite), new_state,
                      state.replace(step=state.step + 1))
  sums = jax.tree.map(lambda s: jnp.where(finite, s, jnp.zeros_like(s)), sums)
  return kept.replace(loss_scale=mixed_precision.update(state.loss_scale, finite)), sums


def _accumulate(grad_fn, state: TrainState, images, batch: Batch, rng: jax.Array, task: Task):
  """Gradients of the summed loss over k micro-batches, one after another (lax.scan), their
  metric sums, and the model collections after the last. Micro-batch i holds examples i,
  i + k, i + 2k, ...: with the batch split over devices in blocks, each one still spans every
  device, and the padding of a last batch spreads over them. BatchNorm sees each micro-batch's
  statistics; a micro-batch without a real example leaves the collections as they were."""
  k = task.grad_accum_steps

  def micro(x):  # [B, ...] -> [k, B / k, ...], micro-batch i = examples i, i + k, ...
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  xs = dict(image=micro(images), label=micro(batch['label']), mask=micro(batch['mask']),
            index=jnp.arange(k))

  def body(carry, x):
    grads, sums, model_state = carry
    (_, (micro_sums, new_model_state)), micro_grads = grad_fn(
        state.params, model_state, x['image'], x['label'], x['mask'],
        jax.random.fold_in(rng, x['index']), mean=False)
    real = micro_sums[metrics.COUNT] > 0
    new_model_state = jax.tree.map(functools.partial(jnp.where, real), new_model_state,
                                   model_state)
    return (jax.tree.map(jnp.add, grads, micro_grads), metrics.add_sums(sums, micro_sums),
            new_model_state), None

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  init = (zeros, metrics.zero_sums(task.value_names), state.model_state)
  return jax.lax.scan(body, init, xs)[0]


def eval_step(state: TrainState, batch: Batch, task: Task = DEFAULT_TASK) -> Sums:
  logits_BxC, _ = _logits(task, state, state.params, augment.preprocess(batch['image']),
                          batch['mask'], train=False)
  return metrics.masked_sums(task.per_example(logits_BxC, batch['label'], state.loss_hparams),
                             batch['mask'])


def _scan_train(state: TrainState, xs: Any, get_batch: Callable[[Any], Batch], task: Task,
                unroll: int, guard_empty_steps: bool):
  """Runs train_step over the leading axis of `xs`; a step with no real example is a no-op.

  Chunks are padded with empty steps to keep shapes static; those must not move the optimizer
  (RMSprop's second moment would still decay on a zero gradient), so with `guard_empty_steps`
  each step keeps the old state where it had no example. The guard reads and selects the whole
  state at every step, so callers drop it for chunks without empty steps.

  Returns the state, the summed metrics, and for the NaN/Inf check the per-step 'loss' [K]
  and 'params_finite' (whether every parameter and model variable is finite after the chunk).
  Non-finite gradients make the parameters, hence the next step's loss, non-finite; checking
  the parameters once per chunk costs far less than a gradient norm at every step.
  """

  def body(carry, x):
    state, totals = carry
    batch = get_batch(x)
    new_state, sums = train_step(state, batch, task)
    if guard_empty_steps:  # (The mask, not the sums: a skipped float16 step's sums are 0.)
      real = jnp.any(batch['mask'] > 0)
      new_state = jax.tree.map(functools.partial(jnp.where, real), new_state, state)
    loss_mean = sums.pop('loss_mean')
    return (new_state, metrics.add_sums(totals, sums)), loss_mean

  totals = metrics.zero_sums(task.value_names)
  (state, totals), loss_K = jax.lax.scan(body, (state, totals), xs, unroll=unroll)
  finite = mixed_precision.all_finite((state.params, state.model_state))
  return state, totals, dict(loss=loss_K, params_finite=finite)


def _scan_eval(state: TrainState, xs: Any, get_batch: Callable[[Any], Batch], task: Task,
               unroll: int) -> Sums:
  def body(totals, x):
    return metrics.add_sums(totals, eval_step(state, get_batch(x), task)), None

  return jax.lax.scan(body, metrics.zero_sums(task.value_names), xs, unroll=unroll)[0]


def gather(data: Batch, x: Batch) -> Batch:
  """A batch gathered on the device from resident `data` by a planned step x['index'] [B]."""
  index = x['index']
  return dict(image=jnp.take(data['image'], index, axis=0),
              label=jnp.take(data['label'], index, axis=0), mask=x['mask'])


def stacked(data: None, x: Batch) -> Batch:
  """A batch that the host already stacked (tf.data): the step's slice of the chunk."""
  del data
  return x


@dataclasses.dataclass(frozen=True)
class ChunkFns:
  """The jitted functions an executor calls, over K steps at once:
  train(state, data, xs, *, task, unroll, guard_empty_steps) -> (state, sums, per_step), the
  state donated; evaluate(state, data, xs, *, task, unroll) -> sums. `data` is what
  `get_batch(data, x)` reads each step's batch from (the resident dataset, or None), `xs` the
  chunk with a leading step axis [K, ...]."""
  train: Callable
  evaluate: Callable


@functools.cache
def make_chunk_fns(get_batch: Callable[[Any, Batch], Batch], replicas: bool = False,
                   shared_batches: bool = False) -> ChunkFns:
  """The chunk functions over `get_batch` (`gather` or `stacked`), for N replicas at once
  (state stacked [N, ...], vmapped) or one run; jitted once per process, whatever the task.

  Replicas share `data` and the evaluation chunks; each has its own training chunk [N, K, ...],
  unless `shared_batches` (replicas of one seed): then they share the training chunk too.
  `unroll` is lax.scan's: XLA:CPU runs convolutions inside a loop body about 10x slower than
  unrolled, so convolutional configs unroll their (short) chunks; MLPs keep the loop.
  """
  def train(state, data, xs, *, task=DEFAULT_TASK, unroll=1, guard_empty_steps=True):
    return _scan_train(state, xs, functools.partial(get_batch, data), task, unroll,
                       guard_empty_steps)

  def evaluate(state, data, xs, *, task=DEFAULT_TASK, unroll=1):
    return _scan_eval(state, xs, functools.partial(get_batch, data), task, unroll)

  if replicas:
    train = _over_replicas(train, (0, None, None if shared_batches else 0))
    evaluate = _over_replicas(evaluate, (0, None, None))
  return ChunkFns(
      train=jax.jit(train, donate_argnums=0,
                    static_argnames=('task', 'unroll', 'guard_empty_steps')),
      evaluate=jax.jit(evaluate, static_argnames=('task', 'unroll')))


# Up to this many replicas that share every input run as that many plain calls in one program
# rather than vmapped: each then computes exactly what its separate run computes (the vmapped
# program's wider matmuls sum in another order), and on XLA:CPU no slower (docs/sweeps.md).
LOOPED_REPLICAS = 4


def _over_replicas(fn: Callable, in_axes: tuple) -> Callable:
  """`fn` for N independent replicas at once: state (and per-replica inputs) stacked [N, ...]."""

  def run(state, *args, **static):  # task, unroll (and guard_empty_steps for training).
    n = jax.tree.leaves(state)[0].shape[0]
    if n <= LOOPED_REPLICAS and all(axis is None for axis in in_axes[1:]):
      outs = [fn(jax.tree.map(lambda x: x[i], state), *args, **static)  # pylint: disable=cell-var-from-loop
              for i in range(n)]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return jax.vmap(functools.partial(fn, **static), in_axes=in_axes)(state, *args)

  return run


class NonFiniteError(errors.UserError):
  pass


def check_finite(unchecked: list, diverged: np.ndarray | None = None,
                 names: Sequence[str] = ()) -> None:
  """Stops the run at the first step whose loss, or whose gradient update, is NaN or Inf.

  `unchecked` holds (per_step, first step, last step) of every chunk since the last check,
  oldest first, as the train chunk function returned them; it is emptied. Checking them all
  (not only the last call) names the first bad step. Non-finite gradients poison the
  parameters and so every later loss: if a call's losses are finite but its final parameters
  are not, the bad update was its last step.

  In a sweep (`diverged`: per replica, the step it diverged at, 0 while it has not; `names`:
  the replicas'), a replica that goes non-finite is marked and the others go on; only when
  every replica has diverged does the run stop.
  """
  for per_step, first_step, last_step in unchecked:
    loss = np.asarray(per_step['loss'])
    loss_RxK = loss.reshape(-1, loss.shape[-1])  # R replicas (1 for a single run).
    finite_R = np.asarray(per_step['params_finite']).reshape(-1)
    bad_RxK = ~np.isfinite(loss_RxK)
    for r in range(len(loss_RxK)) if diverged is not None else ():
      if diverged[r] or (finite_R[r] and not bad_RxK[r].any()):
        continue
      bad = np.flatnonzero(bad_RxK[r])
      diverged[r] = first_step + bad[0] + 1 if bad.size else last_step
      print(f'warning: replica {names[r]} diverged at step {diverged[r]} (loss '
            f'{loss_RxK[r, bad[0]] if bad.size else "finite, parameters not"}); the others go '
            'on.', flush=True)
    if diverged is not None and not diverged.all():
      continue
    bad = np.flatnonzero(bad_RxK.any(axis=0))
    if bad.size:
      what, step = f'loss is {loss_RxK[:, bad[0]].tolist()}', first_step + bad[0] + 1
    elif not np.all(finite_R):
      what, step = 'gradients are non-finite (the update made the parameters NaN/Inf)', last_step
    else:
      continue
    raise NonFiniteError(
        f'{what} at step {step}; stopping without saving this state (the last checkpoint is '
        'kept). Lower the learning rate or check the data.')
  unchecked.clear()


def probabilities(apply_fn, variables, image_BxHxWxC: jax.Array, *,
                  model_takes_mask: bool = False) -> jax.Array:
  """Class probabilities [B, C] in evaluation mode: what evaluation, the report, inference and
  the exported models compute. Images are uint8 (the dataset's own) or float32 in [0, 1]."""
  images = (augment.preprocess(image_BxHxWxC) if image_BxHxWxC.dtype == jnp.uint8
            else image_BxHxWxC.astype(jnp.float32))
  kwargs = dict(mask=jnp.ones(images.shape[:1], jnp.float32)) if model_takes_mask else {}
  return jax.nn.softmax(apply_fn(variables, images, train=False, **kwargs))


@functools.partial(jax.jit, static_argnames='task')
def _probabilities(state: TrainState, image_BxHxWxC: jax.Array, task: Task) -> jax.Array:
  return probabilities(state.apply_fn, {'params': state.params, **state.model_state},
                       image_BxHxWxC, model_takes_mask=task.model_takes_mask)


def predict(state: TrainState, images: np.ndarray, batch_size: int,
            task: Task = DEFAULT_TASK) -> np.ndarray:
  """Class probabilities [N, C] for host images, in fixed-size (padded) batches."""
  pad = -len(images) % batch_size
  padded = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  probs = [_probabilities(state, padded[i:i + batch_size], task)
           for i in range(0, len(padded), batch_size)]
  return np.concatenate(jax.device_get(probs))[:len(images)]


# Single steps, for notebooks and tests; the loop uses the chunk functions above.
train_step_jit = jax.jit(train_step, donate_argnums=0, static_argnames='task')
eval_step_jit = jax.jit(eval_step, static_argnames='task')
