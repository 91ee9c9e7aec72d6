"""The data plan: which example every step sees, as a pure function of (seed, epoch)."""

import numpy as np
import pytest

from mnist_jax import input_pipeline


@pytest.mark.parametrize('num_examples, batch_size', [(10, 4), (12, 4), (60_000, 128), (5, 8), (1, 1)])
def test_batch_plan_sees_every_example_once(num_examples, batch_size):
  order = input_pipeline.epoch_order(seed=0, epoch=0, num_examples=num_examples)
  plan = input_pipeline.batch_plan(order, batch_size)
  num_steps = -(-num_examples // batch_size)
  assert plan['index'].shape == plan['mask'].shape == (num_steps, batch_size)
  assert plan['index'].dtype == np.int32 and plan['mask'].dtype == np.float32
  real = plan['index'][plan['mask'] == 1]
  np.testing.assert_array_equal(np.sort(real), np.arange(num_examples))  # Each exactly once.
  np.testing.assert_array_equal(real, order)  # In the planned order.
  assert set(np.unique(plan['mask'])) <= {0.0, 1.0}
  # Only the last batch is padded; it holds N mod B real examples (B when B divides N).
  assert np.all(plan['mask'][:-1] == 1)
  assert plan['mask'][-1].sum() == (num_examples % batch_size or batch_size)
  # Real examples come first in the last batch; padded slots point at a valid example (0).
  last = plan['mask'][-1]
  assert np.all(np.diff(last) <= 0)
  np.testing.assert_array_equal(plan['index'][-1][last == 0], 0)


def test_batch_plan_mnist_last_batch_has_96():
  plan = input_pipeline.batch_plan(np.arange(60_000, dtype=np.int32), 128)
  assert len(plan['index']) == 469
  assert plan['mask'][-1].sum() == 96


def test_epoch_order_is_a_deterministic_permutation():
  a = input_pipeline.epoch_order(seed=3, epoch=1, num_examples=1000)
  np.testing.assert_array_equal(np.sort(a), np.arange(1000))
  np.testing.assert_array_equal(a, input_pipeline.epoch_order(3, 1, 1000))  # Same (seed, epoch).
  assert not np.array_equal(a, input_pipeline.epoch_order(3, 2, 1000))  # Another epoch.
  assert not np.array_equal(a, input_pipeline.epoch_order(4, 1, 1000))  # Another seed.
  assert not np.array_equal(a, np.arange(1000))  # Actually shuffled.
  # Epoch e of seed s is not epoch e+1 of seed s-1 or similar: (seed, epoch) is not a sum.
  assert not np.array_equal(a, input_pipeline.epoch_order(2, 2, 1000))
  assert not np.array_equal(a, input_pipeline.epoch_order(1, 3, 1000))


def test_epoch_orders_differ_across_epochs_of_a_run():
  orders = [input_pipeline.epoch_order(0, e, 50) for e in range(5)]
  assert len({o.tobytes() for o in orders}) == 5


@pytest.mark.parametrize('num_steps, steps_per_chunk', [(4, 3), (6, 3), (5, 1), (3, 8)])
def test_chunk_plan_pads_with_empty_steps(num_steps, steps_per_chunk):
  batch_size = 4
  plan = input_pipeline.batch_plan(np.arange(num_steps * batch_size - 1, dtype=np.int32),
                                   batch_size)
  chunks = input_pipeline.chunk_plan(plan, steps_per_chunk)
  assert len(chunks) == -(-num_steps // steps_per_chunk)
  for chunk in chunks:
    assert chunk['index'].shape == chunk['mask'].shape == (steps_per_chunk, batch_size)
    assert chunk['index'].dtype == np.int32 and chunk['mask'].dtype == np.float32
  index = np.concatenate([c['index'] for c in chunks])
  mask = np.concatenate([c['mask'] for c in chunks])
  # The plan first, unchanged; then whole empty steps (mask 0, index 0).
  np.testing.assert_array_equal(index[:num_steps], plan['index'])
  np.testing.assert_array_equal(mask[:num_steps], plan['mask'])
  np.testing.assert_array_equal(mask[num_steps:], 0)
  np.testing.assert_array_equal(index[num_steps:], 0)
  assert mask.sum() == num_steps * batch_size - 1


def test_tf_batches_gather_the_planned_examples():
  rng = np.random.default_rng(0)
  split = input_pipeline.Split(rng.integers(0, 256, (11, 2, 2, 1), dtype=np.uint8),
                               rng.integers(0, 10, 11).astype(np.int32))
  plan = input_pipeline.batch_plan(input_pipeline.epoch_order(0, 0, 11), 3)
  chunks = input_pipeline.chunk_plan(plan, 3)
  got = list(input_pipeline.tf_batches(split, chunks))
  assert len(got) == 2
  for batches, chunk in zip(got, chunks):
    assert batches['image'].shape == (3, 3, 2, 2, 1) and batches['image'].dtype == np.uint8
    np.testing.assert_array_equal(batches['image'], split.image[chunk['index']])
    np.testing.assert_array_equal(batches['label'], split.label[chunk['index']])
    np.testing.assert_array_equal(batches['mask'], chunk['mask'])


@pytest.mark.parametrize('steps_per_call, start, guarded', [
    (0, 0, [False]),  # Whole-epoch calls: no empty step, no guard.
    (0, 150, [True]),  # Resumed mid-epoch: the one chunk is padded with empty steps.
    (67, 0, [False] * 7),  # 469 = 7 x 67: whole calls.
    (67, 134, [False] * 5),  # Resumed at a call boundary: still whole calls.
    (50, 0, [True] * 10),  # 469 = 9 x 50 + 19: one program, guarded, for every call.
])
def test_device_mode_guards_exactly_the_calls_that_may_hold_empty_steps(steps_per_call, start,
                                                                        guarded):
  from mnist_jax import executor  # pylint: disable=g-import-not-at-top
  split = input_pipeline.Split(np.zeros((60_000, 2, 2, 1), np.uint8), np.zeros(60_000, np.int32))
  mode = executor.create('device', dict(train=split, test=split), train_split='train',
                            eval_split='test', seeds=[0], batch_size=128, eval_batch_size=1000,
                            steps_per_call=steps_per_call)
  chunks = mode.epoch_chunks(0, start=start)
  assert [mode.guard_empty_steps(c) for c in chunks] == guarded
  assert sum(mode.real_steps(c) for c in chunks) == 469 - start
