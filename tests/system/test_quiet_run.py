"""A run prints only its own lines: no TensorFlow C++ log, no TFDS warnings for its developers.

Each case is a fresh `python run.py` with nothing quieting it from outside (no
TF_CPP_MIN_LOG_LEVEL in its environment): what a user on a fresh clone sees.
"""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

TIMEOUT_S = 900  # A fresh python imports TensorFlow and JAX; only a hang takes this long.

# The beginnings of every line a run of run.py prints itself (stdout and stderr).
OWN_LINE = re.compile(r'(configs/\S+\.py on \d+x .*, workdir: '
                      r'|\w+: [\d,]+ train / [\d,]+ test examples, '
                      r'|note: |warning: |error: |resumed from |epoch \d+/\d+  '
                      r'|done: |next: open )')
# What the run used to print that is not its own, seen on a fresh clone.
NOT_OWN = ('oneDNN', 'absl::InitializeLog', 'has no dataset_info.json',
           '`TensorInfo.dtype` is deprecated')

MOCK_WRAPPER = '''
import runpy, sys
import tensorflow_datasets as tfds
sys.argv = ['run.py', *sys.argv[1:]]
with tfds.testing.mock_data(num_examples=20):
  runpy.run_path('run.py', run_name='__main__')
'''


@pytest.fixture
def bare_env(tmp_path):
  """The user's environment: no TF_CPP_MIN_LOG_LEVEL (conftest sets one for the suite)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'TF_ENABLE_ONEDNN_OPTS', 'TFDS_DATA_DIR')}
  env.update(MNIST_JAX_CACHE=str(tmp_path / 'cache'), JAX_PLATFORMS=env.get('JAX_PLATFORMS', 'cpu'))
  return env


def run_py(args, env, *, mock=False):
  command = ([sys.executable, '-c', MOCK_WRAPPER] if mock else [sys.executable, 'run.py'])
  result = subprocess.run([*command, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
  return result, (result.stdout + result.stderr).splitlines()


def assert_only_own_lines(lines):
  for line in lines:
    assert not any(text in line for text in NOT_OWN), line
    assert OWN_LINE.match(line), line


def lines_before_the_first_epoch(lines) -> int:
  return next(i for i, line in enumerate(lines) if line.startswith('epoch '))


@pytest.mark.slow
@pytest.mark.real_data
def test_a_cold_and_a_warm_first_run_print_only_their_own_lines(tmp_path, bare_env,
                                                                 real_data_dir):
  cache = tmp_path / 'empty_cache'
  for name in ('cold', 'warm'):  # The first with empty caches, the second with them filled.
    workdir = tmp_path / name
    result, lines = run_py(['--config=configs/mlp.py', f'--workdir={workdir}',
                            '--config.num_epochs=1', f'--config.data_dir={real_data_dir}',
                            f'--config.cache_dir={cache}'], bare_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_only_own_lines(lines)
    assert lines[0] == f'configs/mlp.py on 1x cpu, workdir: {workdir}'
    assert lines_before_the_first_epoch(lines) <= 10, lines
    assert lines[-1] == (f'next: open {workdir}/report.png and {workdir}/summary.json; '
                         f'tensorboard --logdir {workdir}')
    assert lines[-2].startswith('done: test accuracy 0.9'), lines


@pytest.mark.slow
def test_another_tfds_dataset_prints_only_its_own_lines(tmp_path, bare_env):
  workdir = tmp_path / 'w'
  result, lines = run_py(['--config=configs/mlp.py', f'--workdir={workdir}',
                          '--config.dataset=fashion_mnist', '--config.download=False',
                          '--config.batch_size=8', '--config.eval_batch_size=10',
                          '--config.num_epochs=1', '--config.write_tensorboard=False'],
                         bare_env, mock=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_only_own_lines(lines)
  # The user's own warning about the data stays, once a split.
  assert [l for l in lines if l.startswith('note: ')] == [
      f"note: fashion_mnist split '{split}' has no examples of 1 of its 10 classes: Coat."
      for split in ('train', 'test')]
  assert lines[-1] == f'next: open {workdir}/report.png and {workdir}/summary.json'


def test_an_offline_failure_is_its_two_lines_and_verbosity_brings_the_rest_back(tmp_path,
                                                                                bare_env):
  empty = tmp_path / 'empty'
  empty.mkdir()
  args = ['--config=configs/mlp.py', f'--workdir={tmp_path / "w"}', f'--config.data_dir={empty}',
          '--config.download=False']
  result, lines = run_py(args, bare_env)
  assert result.returncode != 0
  assert_only_own_lines(lines)
  assert len(lines) == 2, lines
  assert lines[1].startswith("error: Dataset 'mnist' is not prepared in "), lines

  result, lines = run_py([*args, '-v', '0'], bare_env)  # absl's own verbosity flag.
  assert result.returncode != 0
  assert any('has no dataset_info.json' in line for line in lines), lines
  assert lines[-1].startswith("error: Dataset 'mnist' is not prepared in "), lines
