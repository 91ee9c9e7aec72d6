"""How batches reach the train step: from tf.data, or gathered on the device.

An input mode turns the data plan of `input_pipeline` into calls of the jitted chunk functions
of `steps`. Both modes consume the same plan, so the same seed feeds the same examples in the
same order whichever runs. Adding a mode means adding a class and a line in `INPUT_MODES`.

Data parallelism: the global batch is split over all devices (of all processes) along a 'data'
mesh axis; the state is replicated. Each process puts only its own columns of every batch on
its devices (`jax.make_array_from_process_local_data`).
"""

import math

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mnist_jax import input_pipeline
from mnist_jax import steps

# 'auto' keeps the dataset on the device when it takes at most this many bytes.
RESIDENT_MAX_BYTES = 1 << 30


class _Mode:
  """Shared planning: which examples each step of an epoch sees, in chunks of steps."""
  train_fn = None  # The jitted chunk functions of `steps` this mode calls.
  eval_fn = None

  def __init__(self, splits: dict[str, input_pipeline.Split], *, train_split: str,
               eval_split: str, seed: int, batch_size: int, eval_batch_size: int,
               steps_per_call: int, scan_unroll: int = 1):
    self.train, self.eval = splits[train_split], splits[eval_split]
    self.seed, self.batch_size, self.unroll = seed, batch_size, scan_unroll
    self.steps_per_epoch = math.ceil(len(self.train) / batch_size)
    self.steps_per_call = min(steps_per_call or self.steps_per_epoch, self.steps_per_epoch)
    eval_plan = input_pipeline.batch_plan(np.arange(len(self.eval), dtype=np.int32),
                                          eval_batch_size)
    self.eval_chunks = input_pipeline.chunk_plan(eval_plan, len(eval_plan['index']))
    self.mesh = Mesh(np.array(jax.devices()), ('data',))  # Auto sharding: XLA partitions.
    self.replicated = NamedSharding(self.mesh, P())

  def epoch_chunks(self, epoch: int, start: int = 0) -> list[dict[str, np.ndarray]]:
    """The epoch's steps from `start` on, in chunks of `steps_per_call` steps."""
    order = input_pipeline.epoch_order(self.seed, epoch, len(self.train))
    plan = input_pipeline.batch_plan(order, self.batch_size)
    return input_pipeline.chunk_plan({k: v[start:] for k, v in plan.items()},
                                     self.steps_per_call)

  @staticmethod
  def local_columns(chunk: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's share of every batch: its contiguous block of the B columns."""
    per_process = chunk['mask'].shape[1] // jax.process_count()
    start = jax.process_index() * per_process
    return {k: v[:, start:start + per_process] for k, v in chunk.items()}

  def put_batch(self, local: np.ndarray) -> jax.Array:
    """The global [K, B, ...] array, split over devices along B, from this process's columns."""
    return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P(None, 'data')),
                                                  local)

  def zero_sums(self):
    """Zero metric sums as global (replicated) arrays, so multi-host checkpoints take them."""
    return self.put_replicated(steps.zero_sums())

  def put_replicated(self, tree):
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.replicated, np.asarray(x)), tree)

  def train_inputs(self, chunks):
    """Per chunk, the arguments of `train_fn` after the state."""
    raise NotImplementedError

  def eval_inputs(self):
    raise NotImplementedError

  def train_call(self, state: steps.TrainState, *args):
    return self.train_fn(state, *args, unroll=self.unroll)

  def evaluate(self, state: steps.TrainState):
    return self.eval_fn(state, *self.eval_inputs(), unroll=self.unroll)


class DeviceMode(_Mode):
  """The dataset lives on the device; each scanned step gathers its batch there."""
  train_fn = staticmethod(steps.train_chunk_resident)
  eval_fn = staticmethod(steps.eval_chunk_resident)

  def __init__(self, splits, **kwargs):
    super().__init__(splits, **kwargs)
    self._train = self.put_replicated(dict(image=self.train.image, label=self.train.label))
    self._eval = self.put_replicated(dict(image=self.eval.image, label=self.eval.label))

  def _put_plan(self, chunk):
    return {k: self.put_batch(v) for k, v in self.local_columns(chunk).items()}

  def train_inputs(self, chunks):
    return ((self._train, self._put_plan(chunk)) for chunk in chunks)

  def eval_inputs(self):
    return (self._eval, self._put_plan(self.eval_chunks[0]))


class TfDataMode(_Mode):
  """tf.data gathers and stacks the planned batches on the host and prefetches them."""
  train_fn = staticmethod(steps.train_chunk)
  eval_fn = staticmethod(steps.eval_chunk)

  def _batches(self, split, chunks):
    local_chunks = [self.local_columns(chunk) for chunk in chunks]  # Read only our examples.
    for batches in input_pipeline.tf_batches(split, local_chunks):
      yield ({k: self.put_batch(v) for k, v in batches.items()},)

  def train_inputs(self, chunks):
    return self._batches(self.train, chunks)

  def eval_inputs(self):
    return next(self._batches(self.eval, self.eval_chunks))


INPUT_MODES = {'device': DeviceMode, 'tfdata': TfDataMode}


def resolve(name: str, splits: dict[str, input_pipeline.Split]) -> str:
  if name != 'auto':
    return name
  nbytes = sum(s.image.nbytes + s.label.nbytes for s in splits.values())
  return 'device' if nbytes <= RESIDENT_MAX_BYTES else 'tfdata'


def create(name: str, splits: dict[str, input_pipeline.Split], **kwargs) -> _Mode:
  return INPUT_MODES[resolve(name, splits)](splits, **kwargs)
