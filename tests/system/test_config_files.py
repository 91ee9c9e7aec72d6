"""A config file that cannot give a config is one line with exit status 2, naming the file and
what to do, before anything is written (fresh `python run.py` processes)."""

import concurrent.futures
import os
import subprocess
import sys

import pytest

from conftest import MLP_CONFIG_PATH
from conftest import REPO_ROOT

CONFIG_FILES = {
    'syntax_error': 'def get_config(:\n  pass\n',
    'raises': 'def get_config():\n  raise ValueError("no such preset: big")\n',
    'no_get_config': 'import ml_collections\nCONFIG = ml_collections.ConfigDict()\n',
    'plain_dict': 'def get_config():\n  return dict(learning_rate=0.1)\n',
    'missing_fields': ('import ml_collections\n'
                       'from configs import mlp\n'
                       'def get_config():\n'
                       '  config = mlp.get_config()\n'
                       '  del config.batch_size\n'
                       '  del config.seed\n'
                       '  return config\n'),
}
# (case, what the one line must contain)
EXPECTED = {
    'syntax_error': ['syntax_error.py', 'line 1', 'syntax'],
    'raises': ['raises.py', 'get_config()', 'ValueError: no such preset: big'],
    'no_get_config': ['no_get_config.py', 'get_config'],
    'plain_dict': ['plain_dict.py', 'ConfigDict', 'dict'],
    'missing_fields': ['missing_fields.py', 'batch_size', 'seed', 'configs/mlp.py'],
    'no_such_file': ['--config', 'no_such_file.py', 'does not exist'],
    'unknown_field': ["'gradient_noise'", 'has no field', 'learning_rate', 'batch_size'],
    'unknown_model_field': ["'model.depthh'", 'has no field', 'hidden_sizes', 'activation'],
}


def _run(args, workdir, env):
  return subprocess.run([sys.executable, str(REPO_ROOT / 'run.py'), *args,
                         f'--workdir={workdir}'], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  base = tmp_path_factory.mktemp('config_files')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]))
  cases = {}
  for name, text in CONFIG_FILES.items():
    (base / f'{name}.py').write_text(text)
    cases[name] = [f'--config={base / name}.py']
  cases['no_such_file'] = [f'--config={base}/no_such_file.py']
  cases['unknown_field'] = [f'--config={MLP_CONFIG_PATH}', '--config.gradient_noise=2']
  cases['unknown_model_field'] = [f'--config={MLP_CONFIG_PATH}', '--config.model.depthh=2']
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {name: pool.submit(_run, args, base / 'w' / name, env)
               for name, args in cases.items()}
    return {name: (f.result(), base / 'w' / name) for name, f in futures.items()}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(EXPECTED))
def test_a_bad_config_file_is_one_line_exit_2(results, name):
  result, workdir = results[name]
  assert result.returncode == 2, result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: '), lines
  for part in EXPECTED[name]:
    assert part in lines[0], (part, lines[0])
  assert 'config_config' not in lines[0]  # ml_collections' internal module name.
  assert not workdir.exists()
