"""run.py: command-line overrides reach the run; a missing dataset is one short message."""

import json
import subprocess
import textwrap

from absl import flags
from ml_collections import config_flags
import pytest
import tensorflow_datasets as tfds

from conftest import MLP_CONFIG_PATH
from conftest import REPO_ROOT
from mnist_jax import train

OVERRIDES = ['--config.learning_rate=3e-4', '--config.num_epochs=1', '--config.seed=3',
             '--config.model.hidden_sizes=(16,)']
HIDDEN16_PARAMS = 784 * 16 + 16 + 16 * 10 + 10  # 12,730


def assert_overrides_applied(config_json: dict, summary: dict):
  assert config_json['learning_rate'] == 3e-4
  assert config_json['num_epochs'] == 1
  assert config_json['seed'] == 3
  assert config_json['model']['hidden_sizes'] == [16]
  # Untouched fields keep the file's values.
  assert config_json['optimizer'] == 'rmsprop'
  assert config_json['model']['activation'] == 'relu'
  # And the run used them.
  assert summary['seed'] == 3
  assert summary['epochs'] == 1
  assert summary['num_params'] == HIDDEN16_PARAMS


def test_config_flags_parse_in_process(tmp_path):
  """The same flag definition as run.py's, parsed in-process; then a run on mock data."""
  argv = ['run.py', f'--config={MLP_CONFIG_PATH}', *OVERRIDES, '--config.batch_size=8',
          '--config.eval_batch_size=10', '--config.cache_dir=none', '--config.download=False']
  flag_values = flags.FlagValues()
  # sys_argv: the overrides are read from it (by default from sys.argv, as in run.py).
  config_flags.DEFINE_config_file('config', None, 'config file', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  assert config.learning_rate == 3e-4 and isinstance(config.learning_rate, float)
  assert config.num_epochs == 1 and config.seed == 3
  assert tuple(config.model.hidden_sizes) == (16,)
  assert config.batch_size == 8
  assert config.optimizer_kwargs.decay == 0.9  # Not overridden.

  workdir = tmp_path / 'workdir'
  with tfds.testing.mock_data(num_examples=20):
    summary = train.train_and_evaluate(config, str(workdir))
  config_json = json.loads((workdir / 'config.json').read_text())
  assert_overrides_applied(config_json, json.loads((workdir / 'summary.json').read_text()))
  assert summary['steps'] == 3  # ceil(20 / 8)
  assert config_json['batch_size'] == 8


# A fresh python imports TensorFlow and JAX (15 s on an idle 2-core machine, 5-10 times that when
# other test suites share it, as seen: 120 s and 300 s limits were hit); only a hang should take
# this long.
TIMEOUT_S = 900


def run_cli(python, args, env, timeout=TIMEOUT_S, *, wrapper=None):
  command = [python, 'run.py', *args] if wrapper is None else [python, '-c', wrapper, *args]
  try:
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f'run.py did not finish in {timeout}s: {command}\n--- stdout ---\n'
                f'{e.stdout or ""}\n--- stderr ---\n{(e.stderr or "")[-3000:]}')


# run.py in a subprocess, with TFDS's mock data switched on around it (no real data needed).
MOCK_WRAPPER = textwrap.dedent('''
    import runpy, sys
    import tensorflow_datasets as tfds
    sys.argv = ['run.py', *sys.argv[1:]]
    with tfds.testing.mock_data(num_examples=20):
      runpy.run_path('run.py', run_name='__main__')
''')


@pytest.mark.slow
def test_cli_overrides_reach_the_run_mock_data(python, subprocess_env, tmp_path):
  workdir = tmp_path / 'workdir'
  result = run_cli(python, [f'--config={MLP_CONFIG_PATH}', *OVERRIDES, '--config.batch_size=8',
                            '--config.eval_batch_size=10', '--config.download=False',
                            f'--config.cache_dir={tmp_path / "cache"}', f'--workdir={workdir}'],
                   subprocess_env, wrapper=MOCK_WRAPPER)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_overrides_applied(json.loads((workdir / 'config.json').read_text()),
                           json.loads((workdir / 'summary.json').read_text()))
  assert 'done: test accuracy' in result.stdout


@pytest.mark.slow
@pytest.mark.real_data
def test_cli_overrides_reach_the_run_real_data(python, subprocess_env, tmp_path, real_data_dir):
  workdir = tmp_path / 'workdir'
  result = run_cli(python, ['--config=configs/mlp.py', *OVERRIDES,
                            f'--config.data_dir={real_data_dir}', '--config.download=False',
                            f'--config.cache_dir={tmp_path / "cache"}', f'--workdir={workdir}'],
                   subprocess_env)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / 'summary.json').read_text())
  config_json = json.loads((workdir / 'config.json').read_text())
  assert_overrides_applied(config_json, summary)
  assert config_json['resolved']['data_dir'] == str(real_data_dir)
  assert summary['steps'] == 469  # ceil(60000 / 128)
  assert summary['test_accuracy'] > 0.8  # It trained (16 hidden units, lr 3e-4, one epoch).


def test_missing_data_is_one_short_message(python, subprocess_env, tmp_path):
  empty = tmp_path / 'empty_data_dir'
  empty.mkdir()
  workdir = tmp_path / 'workdir'
  result = run_cli(python, ['--config=configs/mlp.py', f'--config.data_dir={empty}',
                            '--config.download=False', f'--config.cache_dir={tmp_path / "cache"}',
                            f'--workdir={workdir}'], subprocess_env)
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr and 'Traceback' not in result.stdout
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1, result.stderr
  message = errors[0]
  assert len(message) < 600, message  # Short: one line, no dump.
  assert str(empty) in message  # The folder it looked in.
  assert 'TFDS_DATA_DIR' in message
  assert '--config.data_dir' in message
  assert not workdir.exists()  # Nothing written for a run that never started.
  assert list(empty.iterdir()) == []  # And nothing created in the data dir.


def test_the_program_leaves_the_distributed_runtime_with_its_peers_only_on_an_agreed_exit(
    monkeypatch):
  """run.py's exit as `python run.py`: the distributed runtime left with the peers (finished, a
  shared stop: process 0 must not take its service away from a slower peer), else at once."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('run_program', REPO_ROOT / 'run.py')
  run = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(run)  # Defines run.py's flags once in this process; parses nothing.
  calls = []
  monkeypatch.setattr(sys, 'orig_argv', [sys.executable, str(REPO_ROOT / 'run.py')])
  monkeypatch.setattr(run.distributed, 'leave', lambda agreed: calls.append(('leave', agreed)))
  monkeypatch.setattr(os, '_exit', lambda code: calls.append(('exit', code)))
  run._exit(0, agreed=True)  # pylint: disable=protected-access
  run._exit(143, agreed=True)  # pylint: disable=protected-access
  run._exit(1)  # pylint: disable=protected-access
  assert calls == [('leave', True), ('exit', 0), ('leave', True), ('exit', 143),
                   ('leave', False), ('exit', 1)]


def test_a_misspelt_field_is_named_with_its_close_match(python, subprocess_env):
  """run.py rewrites ml_collections' 'Did you mean' message into one line; this pins the
  wording it reads, so a reworded ml_collections fails here, not in front of a user."""
  result = subprocess.run(
      [python, str(REPO_ROOT / 'run.py'), f'--config={MLP_CONFIG_PATH}',
       '--config.learnin_rate=0.1'], capture_output=True, text=True, env=subprocess_env,
      cwd=REPO_ROOT, timeout=600)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: the config has no field 'learnin_rate'; did you mean 'learning_rate'? "
      '(python run.py --help lists the flags and config fields)']
