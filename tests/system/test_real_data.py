"""On the real MNIST (skipped with a reason when it is absent): configs/mlp.py learns."""

import json
import subprocess

import pytest

from mnist_jax import train
from conftest import MLP_CONFIG_PATH
from conftest import REPO_ROOT


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


@pytest.mark.slow
@pytest.mark.real_data
def test_a_run_on_cached_data_never_imports_tensorflow(real_data_dir, tmp_path, subprocess_env,
                                                       python):
  """Decoding imports TensorFlow once; then device-mode runs (the default) do without it.

  Importing TensorFlow is the largest fixed cost of a run (seconds): `python -X importtime`
  lists every module a process imports, so its absence is visible from outside.
  """
  command = [python, '-X', 'importtime', str(REPO_ROOT / 'run.py'),
             f'--config={MLP_CONFIG_PATH}', f'--config.data_dir={real_data_dir}',
             '--config.num_epochs=1', '--config.input_mode=device', '--config.download=False']

  def imported_modules(name):
    done = subprocess.run(command + [f'--workdir={tmp_path / name}'], env=subprocess_env,
                          capture_output=True, text=True, cwd=tmp_path, check=True)
    assert json.loads((tmp_path / name / 'summary.json').read_text())['test_accuracy'] >= 0.95
    return {line.split('|')[-1].strip() for line in done.stderr.splitlines()
            if line.startswith('import time:')}

  first, second = imported_modules('first'), imported_modules('second')
  assert 'tensorflow' in first  # Decoding the TFDS files into the cache.
  assert 'tensorflow' not in second and not any(m.startswith('keras') for m in second)
  tfds_modules = lambda modules: [m for m in modules if m.startswith('tensorflow_datasets')]
  assert 'jax' in second and tfds_modules(first)  # (The check itself works.)
  # Nor TFDS (its metadata kept from the first run) nor flax.nnx (the MLP is a Linen model).
  assert not tfds_modules(second) and 'flax.nnx' not in second
  assert list((tmp_path / 'second').glob('events.out.tfevents.*'))  # TensorBoard still written.
