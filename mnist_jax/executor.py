"""The executor: the device mesh, the shardings, the jitted chunk functions, and how batches
reach them (`config.input_mode`: gathered on the device, from tf.data, or streamed from
ArrayRecord files or own data's files, `stream.py`).

An executor turns the data plan of `input_pipeline` into calls of the jitted chunk functions
of `steps` (`steps.make_chunk_fns`), for training and for evaluation. Every input mode consumes
the same plan, so the same seed feeds the same examples in the same order whichever runs.
Adding a mode means adding a class (its `get_batch`, inputs, and how it `load`s the splits)
and a line in `INPUT_MODES`.

Data parallelism: the global batch is split over all devices (of all processes) along a 'data'
mesh axis; the state is replicated. Each process puts only its own columns of every batch on
its devices (`jax.make_array_from_process_local_data`).
"""

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mnist_jax import input_pipeline
from mnist_jax import metrics
from mnist_jax import steps
from mnist_jax import stream
from mnist_jax.infra import process

# 'auto' keeps the dataset on the device when it takes at most this many bytes.
RESIDENT_MAX_BYTES = 1 << 30


class Executor:
  """Runs the train and eval steps: plans which examples each step of an epoch sees, in
  chunks of steps, and calls the jitted chunk functions of `steps` on them.

  With N > 1 `seeds`, N independent replicas (seeds[i] orders replica i's data) train at
  once: the state and the plan get a leading replica axis [N, ...] and the vmapped chunk
  functions run; when every replica has the same seed, they share one plan (no replica axis).
  """
  get_batch = staticmethod(steps.stacked)  # How a step reads its batch (steps.make_chunk_fns).
  why = ''  # Why 'auto' picked this mode, if it did (the run's first line says it).

  @staticmethod
  def load(config, cache_dir) -> tuple[input_pipeline.DatasetInfo, dict]:
    """The splits this mode reads: decoded whole into host arrays (input_pipeline.load)."""
    return input_pipeline.load(
        config.dataset, config.data_dir, (config.train_split, config.eval_split),
        download=config.download, cache_dir=cache_dir,
        image_size=tuple(config.get('image_size', ())))

  def __init__(self, splits: dict[str, input_pipeline.Split], *, train_split: str,
               eval_split: str, seeds: Sequence[int], batch_size: int, eval_batch_size: int,
               steps_per_call: int, scan_unroll: int = 1,
               task: steps.Task = steps.DEFAULT_TASK):
    self.train, self.eval = splits[train_split], splits[eval_split]
    self.seeds, self.batch_size, self.unroll = list(seeds), batch_size, scan_unroll
    self.num_replicas, self.task = len(self.seeds), task
    # Replicas of one seed (a sweep of values) see the same batches: one plan, shared, so XLA
    # computes the replicas' layers on one batch (one wider matmul, one gather) at once.
    self.shared_batches = self.num_replicas > 1 and len(set(self.seeds)) == 1
    self._fns = steps.make_chunk_fns(self.get_batch, self.num_replicas > 1, self.shared_batches)
    stacked = self.num_replicas > 1 and not self.shared_batches
    self._batch_axis = 2 if stacked else 1  # Of plan [(N,) K, B] and batch arrays.
    self.steps_per_epoch = math.ceil(len(self.train) / batch_size)
    self.steps_per_call = min(steps_per_call or self.steps_per_epoch, self.steps_per_epoch)
    eval_plan = input_pipeline.batch_plan(np.arange(len(self.eval), dtype=np.int32),
                                          eval_batch_size)
    self.eval_chunks = input_pipeline.chunk_plan(eval_plan, len(eval_plan['index']))
    self.mesh = Mesh(np.array(jax.devices()), ('data',))  # Auto sharding: XLA partitions.
    self.replicated = NamedSharding(self.mesh, P())

  def _replica_chunks(self, seed: int, epoch: int, start: int) -> list[dict[str, np.ndarray]]:
    order = input_pipeline.epoch_order(seed, epoch, len(self.train))
    plan = input_pipeline.batch_plan(order, self.batch_size)
    return input_pipeline.chunk_plan({k: v[start:] for k, v in plan.items()},
                                     self.steps_per_call)

  def epoch_chunks(self, epoch: int, start: int = 0) -> list[dict[str, np.ndarray]]:
    """The epoch's steps from `start` on, in chunks of `steps_per_call` steps.

    Each chunk holds 'index' and 'mask' [K, B], or [N, K, B] for N replicas.
    """
    if self.num_replicas == 1 or self.shared_batches:
      return self._replica_chunks(self.seeds[0], epoch, start)
    per_replica = [self._replica_chunks(seed, epoch, start) for seed in self.seeds]
    return [{k: np.stack([chunks[c][k] for chunks in per_replica]) for k in ('index', 'mask')}
            for c in range(len(per_replica[0]))]

  @staticmethod
  def real_steps(chunk: dict[str, np.ndarray]) -> int:
    """How many steps of a chunk hold examples (the rest are padding)."""
    mask_KxB = chunk['mask'].reshape(-1, *chunk['mask'].shape[-2:])[0]
    return int(np.count_nonzero(mask_KxB.any(axis=-1)))

  @staticmethod
  def local_columns(chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's share of every batch: its contiguous block of the B (last) columns."""
    per_process = chunk['mask'].shape[-1] // jax.process_count()
    start = jax.process_index() * per_process
    return {k: v[..., start:start + per_process] for k, v in chunk.items()}

  def put_batch(self, local: np.ndarray, batch_axis: int | None = None) -> jax.Array:
    """The global array, split over devices along its batch axis, from this process's part."""
    batch_axis = self._batch_axis if batch_axis is None else batch_axis
    spec = P(*[None] * batch_axis, 'data')
    return jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), local)

  def zero_sums(self):
    """Zero metric sums as global (replicated) arrays, so multi-host checkpoints take them."""
    shape = () if self.num_replicas == 1 else (self.num_replicas,)
    return self.put_replicated({k: np.zeros(shape, np.float32)
                                for k in (*self.task.value_names, metrics.COUNT)})

  def put_replicated(self, tree):
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree)

  def train_inputs(self, chunks):
    """Per chunk, the (data, xs) arguments of the train chunk function after the state."""
    raise NotImplementedError

  def eval_inputs(self):
    """The (data, xs) arguments of the eval chunk function: the whole eval split, one call."""
    raise NotImplementedError

  def guard_empty_steps(self, chunk: dict[str, np.ndarray]) -> bool:
    """Whether the call for `chunk` must guard against empty (all-padding) steps.

    Always when the epoch does not split into whole calls (one program for all calls), else
    only for a chunk that has empty steps (a run resumed mid-epoch, once).
    """
    return (self.steps_per_epoch % self.steps_per_call != 0
            or self.real_steps(chunk) < chunk['mask'].shape[-2])

  def train_call(self, state: steps.TrainState, data, xs, guard_empty_steps: bool = True):
    return self._fns.train(state, data, xs, task=self.task, unroll=self.unroll,
                           guard_empty_steps=guard_empty_steps)

  def evaluate(self, state: steps.TrainState):
    return self._fns.evaluate(state, *self.eval_inputs(), task=self.task, unroll=self.unroll)

  def predict(self, state: steps.TrainState, batch_size: int) -> np.ndarray:
    """Class probabilities [N, C] over the eval split, in its order (for the report)."""
    return steps.predict(state, self.eval.image, batch_size, self.task)


class DeviceExecutor(Executor):
  """The dataset lives on the device; each scanned step gathers its batch there."""
  get_batch = staticmethod(steps.gather)

  def __init__(self, splits, **kwargs):
    super().__init__(splits, **kwargs)
    self._train = self.put_replicated(dict(image=self.train.image, label=self.train.label))
    self._eval = self.put_replicated(dict(image=self.eval.image, label=self.eval.label))

  def _put_plan(self, chunk, batch_axis=None):
    return {k: self.put_batch(v, batch_axis) for k, v in self.local_columns(chunk).items()}

  def train_inputs(self, chunks):
    return ((self._train, self._put_plan(chunk)) for chunk in chunks)

  def eval_inputs(self):
    return (self._eval, self._put_plan(self.eval_chunks[0], batch_axis=1))


class TfDataExecutor(Executor):
  """tf.data gathers and stacks the planned batches on the host and prefetches them."""

  def __init__(self, splits, **kwargs):
    super().__init__(splits, **kwargs)
    input_pipeline.tensorflow()  # Imported now (seconds), not inside the first epoch.

  def _batches(self, split, chunks, batch_axis=None):
    local_chunks = [self.local_columns(chunk) for chunk in chunks]  # Read only our examples.
    for batches in input_pipeline.tf_batches(split, local_chunks):
      yield None, {k: self.put_batch(v, batch_axis) for k, v in batches.items()}

  def train_inputs(self, chunks):
    return self._batches(self.train, chunks)

  def eval_inputs(self):
    return next(self._batches(self.eval, self.eval_chunks, batch_axis=1))


class StreamExecutor(Executor):
  """Batches read and decoded from ArrayRecord files (or own data's files) as they are needed
  (`stream.py`); the host holds a few chunks of steps, never a split. Evaluation and the
  report's predictions stream the eval split too, a chunk per call."""
  IN_FLIGHT = 2  # Train calls dispatched and not yet done, at most (the running one and the next).

  @staticmethod
  def load(config, cache_dir):
    return stream.open_splits(
        config.dataset, config.data_dir, (config.train_split, config.eval_split),
        download=config.download, cache_dir=cache_dir,
        image_size=tuple(config.get('image_size', ())))

  def __init__(self, splits, **kwargs):
    super().__init__(splits, **kwargs)
    # Calls of at most a chunk of decoded examples (the same steps, so the same result).
    self.steps_per_call = min(self.steps_per_call,
                              stream.steps_per_chunk(self.batch_size, self.train.image_shape))
    chunk_bytes = self.steps_per_call * self.batch_size * (math.prod(self.train.image_shape) + 4)
    if chunk_bytes >= process.CHUNK_MMAP_THRESHOLD:  # Freed chunks go back to the system.
      process.return_freed_chunks()
    eval_plan = input_pipeline.batch_plan(np.arange(len(self.eval), dtype=np.int32),
                                          len(self.eval_chunks[0]['mask'][0]))
    per_chunk = stream.steps_per_chunk(eval_plan['mask'].shape[1], self.eval.image_shape)
    # No more steps than the split has: a small split is not padded out to a whole chunk.
    self.eval_chunks = input_pipeline.chunk_plan(eval_plan, min(per_chunk, len(eval_plan['mask'])))

  def _batches(self, split, chunks, batch_axis=None):
    """(None, batch on the device) per chunk; the next chunk is put before one is handed out,
    so its copy overlaps the current call."""
    local_chunks = [self.local_columns(chunk) for chunk in chunks]  # Read only our examples.
    pending = None
    for batch in stream.host_batches(split, local_chunks):
      put = {k: self.put_batch(v, batch_axis) for k, v in batch.items()}
      if pending is not None:
        yield None, pending
      pending = put
    if pending is not None:
      yield None, pending

  def train_inputs(self, chunks):
    return self._batches(self.train, chunks)

  def train_call(self, state, data, xs, guard_empty_steps=True):
    """A call, with at most IN_FLIGHT calls dispatched ahead of the device: JAX dispatches
    asynchronously and each queued call holds its chunk, so without the bound a whole epoch's
    chunks could wait on the host (the loop fetches no result before the epoch ends)."""
    out = super().train_call(state, data, xs, guard_empty_steps)
    self._in_flight = [*getattr(self, '_in_flight', [])[-(self.IN_FLIGHT - 1):], out[1]]
    jax.block_until_ready(self._in_flight[0])
    return out

  def evaluate(self, state: steps.TrainState):
    sums = None
    for inputs in self._batches(self.eval, self.eval_chunks, batch_axis=1):
      chunk_sums = self._fns.evaluate(state, *inputs, task=self.task, unroll=self.unroll)
      sums = chunk_sums if sums is None else metrics.add_sums(sums, chunk_sums)
    return sums

  def predict(self, state: steps.TrainState, batch_size: int) -> np.ndarray:
    probs = []
    for batch in stream.host_batches(self.eval, self.eval_chunks):
      real = batch['mask'].reshape(-1) > 0
      images = batch['image'].reshape(-1, *batch['image'].shape[-3:])[real]
      probs.append(steps.predict(state, images, batch_size, self.task))
    return np.concatenate(probs)


INPUT_MODES = {'device': DeviceExecutor, 'tfdata': TfDataExecutor, 'stream': StreamExecutor}


# The config fields that config.backend_overrides may set per backend.
BACKEND_FIELDS = ('steps_per_call', 'scan_unroll')


def for_backend(config, backend: str | None = None) -> dict:
  """steps_per_call and scan_unroll on `backend` (default: JAX's): the config's, or
  config.backend_overrides.<backend>'s where that sets them (configs/cnn.py unrolls its steps on
  XLA:CPU, where that makes convolutions fast, and not on a GPU, where it only slows compiling)."""
  overrides = config.get('backend_overrides', {}).get(backend or jax.default_backend(), {})
  return {name: overrides.get(name, config[name]) for name in BACKEND_FIELDS}


def resolve(name: str, splits: dict[str, input_pipeline.Split]) -> str:
  if name != 'auto':
    return name
  nbytes = sum(s.image.nbytes + s.label.nbytes for s in splits.values())
  return 'device' if nbytes <= RESIDENT_MAX_BYTES else 'tfdata'


def choose(config, cache_dir=None) -> tuple[str, str]:
  """The input mode before anything is decoded, and why if 'auto' picked it: 'stream' when a
  split would decode to more than config.input_memory_budget bytes; otherwise the mode stays
  'auto' until the decoded splits' size picks device or tfdata (`resolve`)."""
  if config.input_mode != 'auto':
    return config.input_mode, ''
  budget = config.get('input_memory_budget', 0)
  sizes = stream.decoded_sizes(config.dataset, config.data_dir,
                               (config.train_split, config.eval_split),
                               tuple(config.get('image_size', ())), cache_dir)
  over = {spec: n for spec, n in sizes.items() if budget and n > budget}
  if not over:
    return 'auto', ''
  spec, nbytes = max(over.items(), key=lambda item: item[1])
  return 'stream', (f' (auto: split {spec!r} decodes to {nbytes / 1e6:,.0f} MB, more than '
                    f'config.input_memory_budget={budget / 1e6:,.0f} MB)')


def load(config, cache_dir) -> tuple[str, str, input_pipeline.DatasetInfo, dict]:
  """(mode name, why auto picked it, dataset info, splits): the splits as the mode reads them."""
  name, why = choose(config, cache_dir)
  info, splits = INPUT_MODES.get(name, Executor).load(config, cache_dir)
  return resolve(name, splits), why, info, splits


def create(name: str, splits: dict[str, input_pipeline.Split], why: str = '',
           **kwargs) -> Executor:
  executor = INPUT_MODES[resolve(name, splits)](splits, **kwargs)
  executor.why = why
  return executor
