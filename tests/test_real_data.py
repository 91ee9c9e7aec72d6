"""On the real MNIST (skipped with a reason when it is absent): configs/mlp.py learns."""

import json

import pytest

from mnist_jax import train


@pytest.mark.slow
@pytest.mark.real_data
def test_one_epoch_of_mlp_config_reaches_95_percent(mlp_config, real_data_dir, tmp_path):
  mlp_config.data_dir = str(real_data_dir)
  mlp_config.num_epochs = 1
  mlp_config.seed = 0
  workdir = tmp_path / 'workdir'
  summary = train.train_and_evaluate(mlp_config, str(workdir))
  assert summary['test_accuracy'] >= 0.95  # Measured 0.963; the Keras notebook gets ~0.96.
  assert summary['num_params'] == 407_050
  assert summary['steps'] == 469
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert len(records) == 1 and records[0]['test_accuracy'] == summary['test_accuracy']
  # Accuracy over exactly the 10,000 test examples: a whole number of them.
  assert summary['test_accuracy'] * 10_000 == pytest.approx(round(summary['test_accuracy'] * 10_000),
                                                            abs=1e-6)
