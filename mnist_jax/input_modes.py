"""How batches reach the train step: from tf.data, or gathered on the device.

An input mode turns the data plan of `input_pipeline` into calls of the jitted chunk functions
of `steps`. Both modes consume the same plan, so the same seed feeds the same examples in the
same order whichever runs. Adding a mode means adding a class and a line in `INPUT_MODES`.
"""

import math

import jax
import numpy as np

from mnist_jax import input_pipeline
from mnist_jax import steps

# 'auto' keeps the dataset on the device when it takes at most this many bytes.
RESIDENT_MAX_BYTES = 1 << 30


class _Mode:
  """Shared planning: which examples each step of an epoch sees, in chunks of steps."""

  def __init__(self, splits: dict[str, input_pipeline.Split], *, train_split: str,
               eval_split: str, seed: int, batch_size: int, eval_batch_size: int,
               steps_per_call: int):
    self.train, self.eval = splits[train_split], splits[eval_split]
    self.seed, self.batch_size = seed, batch_size
    self.steps_per_epoch = math.ceil(len(self.train) / batch_size)
    self.steps_per_call = steps_per_call or self.steps_per_epoch
    eval_plan = input_pipeline.batch_plan(np.arange(len(self.eval), dtype=np.int32),
                                          eval_batch_size)
    self.eval_chunks = input_pipeline.chunk_plan(eval_plan, len(eval_plan['index']))

  def train_chunks(self, epoch: int) -> list[dict[str, np.ndarray]]:
    order = input_pipeline.epoch_order(self.seed, epoch, len(self.train))
    plan = input_pipeline.batch_plan(order, self.batch_size)
    return input_pipeline.chunk_plan(plan, self.steps_per_call)

  def train_epoch(self, state: steps.TrainState, epoch: int):
    """Runs one epoch; returns the state and the epoch's metric sums (still on the device)."""
    totals = None
    for args in self._train_args(epoch):
      state, sums = self._train_fn(state, *args)
      totals = sums if totals is None else jax.tree.map(jax.numpy.add, totals, sums)
    return state, totals

  def evaluate(self, state: steps.TrainState):
    return self._eval_fn(state, *self._eval_args())


class DeviceMode(_Mode):
  """The dataset lives on the device; each scanned step gathers its batch there."""
  _train_fn = staticmethod(steps.train_chunk_resident)
  _eval_fn = staticmethod(steps.eval_chunk_resident)

  def __init__(self, splits, **kwargs):
    super().__init__(splits, **kwargs)
    self._train = jax.device_put(dict(image=self.train.image, label=self.train.label))
    self._eval = jax.device_put(dict(image=self.eval.image, label=self.eval.label))

  def _train_args(self, epoch: int):
    return ((self._train, chunk) for chunk in self.train_chunks(epoch))

  def _eval_args(self):
    return (self._eval, self.eval_chunks[0])


class TfDataMode(_Mode):
  """tf.data gathers and stacks the planned batches on the host and prefetches them."""
  _train_fn = staticmethod(steps.train_chunk)
  _eval_fn = staticmethod(steps.eval_chunk)

  def _train_args(self, epoch: int):
    return ((batches,) for batches in input_pipeline.tf_batches(self.train,
                                                                self.train_chunks(epoch)))

  def _eval_args(self):
    return tuple(input_pipeline.tf_batches(self.eval, self.eval_chunks))


INPUT_MODES = {'device': DeviceMode, 'tfdata': TfDataMode}


def resolve(name: str, splits: dict[str, input_pipeline.Split]) -> str:
  if name != 'auto':
    return name
  nbytes = sum(s.image.nbytes + s.label.nbytes for s in splits.values())
  return 'device' if nbytes <= RESIDENT_MAX_BYTES else 'tfdata'


def create(name: str, splits: dict[str, input_pipeline.Split], **kwargs) -> _Mode:
  return INPUT_MODES[resolve(name, splits)](splits, **kwargs)
