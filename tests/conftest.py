"""Shared setup for the test suite: quiet TensorFlow, strict JAX, configs, data and subprocesses.

Every test passes `config.cache_dir = 'none'` (or a tmp dir), so nothing is written to the
user's ~/.cache and mock data is never cached; `MNIST_JAX_CACHE` points at a tmp dir as well,
as a safety net for anything that forgets.
"""

import os

os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'  # Before anything imports TensorFlow.

import importlib.util
import pathlib
import sys

import jax
import pytest

from mnist_jax.infra import process

# The XLA:CPU flags run.py sets (before any test starts JAX's backend; the run.py children
# inherit them): the suite tests the compiler settings users run.
process.use_cpu_xla_flags()

# Strict numerics: an implicit rank promotion (a silent broadcast of [B] against [B, 1]) is an
# error, so a shape bug fails loudly instead of computing something plausible.
jax.config.update('jax_numpy_rank_promotion', 'raise')
# Full float32 matmuls on every backend (a no-op on CPU; on GPUs/TPUs the default may use
# TF32/bf16 passes), so golden values and float tolerances hold wherever the suite runs.
jax.config.update('jax_default_matmul_precision', 'highest')

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
MLP_CONFIG_PATH = REPO_ROOT / 'configs' / 'mlp.py'
# The real MNIST (TFDS format) sits next to the checkout: <repo>/../shared/data/tensorflow_datasets.
REAL_DATA_DIR = (REPO_ROOT / '..' / 'shared' / 'data' / 'tensorflow_datasets').resolve()


def load_config_module(path: pathlib.Path = MLP_CONFIG_PATH):
  """Imports a config file by path (configs/ is not a package, as with --config=configs/x.py)."""
  spec = importlib.util.spec_from_file_location(f'_test_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def shrink(config, **overrides):
  """A config shrunk to the tiny job the tests train: hidden (8,), batches of 8, eval batches
  of 12, 2 epochs, no TensorBoard or report, caches off, downloads refused; then `overrides`,
  by dotted name ('model.hidden_sizes', 'sweep.learning_rate')."""
  config.cache_dir = 'none'
  config.download = False
  if 'hidden_sizes' in config.model:
    config.model.hidden_sizes = (8,)
  config.batch_size, config.eval_batch_size, config.num_epochs = 8, 12, 2
  config.write_tensorboard = config.write_report = False
  config.update_from_flattened_dict(overrides)
  return config


def tiny_config(name: str = 'mlp', **overrides):
  """configs/<name>.py, shrunk (`shrink`): the one tiny config of the suite."""
  return shrink(load_config_module(REPO_ROOT / 'configs' / f'{name}.py').get_config(),
                **overrides)


DOC_PAGES = (REPO_ROOT / 'README.md', *sorted((REPO_ROOT / 'docs').glob('*.md')))


def readme_example(tag: str) -> str:
  """The Python block that follows `<!-- example: TAG -->` in the README or a docs/ page (in
  exactly one of them)."""
  import re  # pylint: disable=g-import-not-at-top
  found = [match.group(1) for page in DOC_PAGES for match in re.finditer(
      rf'<!-- example: {re.escape(tag)} -->\n```python\n(.*?)```', page.read_text(), re.S)]
  assert len(found) == 1, f'example {tag!r}: {len(found)} blocks in README.md and docs/, not 1'
  return found[0]


def real_data_available() -> bool:
  return any((REAL_DATA_DIR / 'mnist').glob('*/mnist-train.tfrecord*'))


@pytest.fixture(scope='session', autouse=True)
def _cache_env_in_tmp(tmp_path_factory):
  """No test may touch ~/.cache/mnist_jax, even one that forgets config.cache_dir."""
  old = os.environ.get('MNIST_JAX_CACHE')
  os.environ['MNIST_JAX_CACHE'] = str(tmp_path_factory.mktemp('mnist_jax_cache'))
  yield
  if old is None:
    os.environ.pop('MNIST_JAX_CACHE', None)
  else:
    os.environ['MNIST_JAX_CACHE'] = old


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory) -> pathlib.Path:
  """One JAX compilation cache for every run.py child of the session (the crash, reliability
  and bucket tests run the same tiny jobs): each program is compiled once, not once a module."""
  return tmp_path_factory.mktemp('compile_cache')


@pytest.fixture
def mlp_config():
  """A fresh configs/mlp.py config with caching off and downloads refused (tests are offline)."""
  config = load_config_module().get_config()
  config.cache_dir = 'none'
  config.download = False
  return config


@pytest.fixture
def real_data_dir() -> pathlib.Path:
  if not real_data_available():
    pytest.skip(f'real MNIST (TFDS format) not found in {REAL_DATA_DIR}; this test needs it')
  return REAL_DATA_DIR


@pytest.fixture
def subprocess_env(tmp_path):
  """Environment for `python run.py ...` subprocesses: quiet TF, caches in tmp, no GPU grab."""
  env = dict(os.environ)
  env.update(TF_CPP_MIN_LOG_LEVEL='2', MNIST_JAX_CACHE=str(tmp_path / 'cache'),
             JAX_PLATFORMS=env.get('JAX_PLATFORMS', 'cpu'))
  env.pop('TFDS_DATA_DIR', None)  # The tests name the data dir explicitly.
  return env


@pytest.fixture
def python() -> str:
  return sys.executable
