"""Many seeds in one program: replica i of `num_seeds=N` trains like a single run with seed+i."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mnist_jax import checkpoint
from mnist_jax import train
from test_train import NUM_TRAIN, small_config


@pytest.fixture(scope='module')
def seed_runs(tmp_path_factory):
  base = tmp_path_factory.mktemp('seeds')
  with tfds.testing.mock_data(num_examples=NUM_TRAIN):
    together = train.train_and_evaluate(small_config(seed=3, num_seeds=2), base / 'together')
    alone = [train.train_and_evaluate(small_config(seed=3 + i), base / f'alone{i}')
             for i in range(2)]
  return base, together, alone


def _final_params(workdir):
  steps = checkpoint.Checkpointer(workdir / 'checkpoints', keep=3).steps()
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  item = ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / str(steps[-1]) / 'state')
  return item['state']['params']


def test_replicas_report_each_accuracy_mean_and_std(seed_runs):
  _, together, alone = seed_runs
  per_replica = together['test_accuracy_per_replica']
  assert per_replica == pytest.approx([run['test_accuracy'] for run in alone], abs=1e-6)
  assert together['test_accuracy'] == pytest.approx(np.mean(per_replica))
  assert together['test_accuracy_std'] == pytest.approx(np.std(per_replica))
  assert len(together['param_fingerprint_per_replica']) == 2
  assert together['num_params'] == alone[0]['num_params']


def test_replica_i_matches_a_single_run_with_seed_plus_i(seed_runs):
  base, _, _ = seed_runs
  together = _final_params(base / 'together')
  for i in range(2):
    alone = _final_params(base / f'alone{i}')
    for a, b in zip(jax_leaves(together), jax_leaves(alone)):
      np.testing.assert_allclose(np.asarray(a)[i], np.asarray(b), rtol=1e-5, atol=1e-6)


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.leaves(tree)
