"""Flax NNX models in fresh processes: run.py's one-line refusal of a bad model field, and data
parallelism over 8 fake CPU devices (tests/unit/test_nnx.py has the in-process tests)."""

import textwrap

import numpy as np
import pytest

from conftest import REPO_ROOT


@pytest.mark.slow
def test_run_py_says_it_in_one_line_with_exit_2(tmp_path, subprocess_env, python):
  import subprocess  # pylint: disable=g-import-not-at-top
  config_file = tmp_path / 'bad_field.py'
  config_file.write_text(textwrap.dedent('''
      from configs import cnn_nnx
      def get_config():
        config = cnn_nnx.get_config()
        config.model.depth = 3
        return config
  '''))
  out = subprocess.run([python, 'run.py', f'--config={config_file}', f'--workdir={tmp_path}/w',
                        f'--config.data_dir={tmp_path}/no_data', '--config.download=False'],
                       cwd=REPO_ROOT, env=subprocess_env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
  assert "config.model.depth is invalid: models.cnn_nnx.Model takes no argument 'depth'" in lines[0]
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_8_devices_train_the_nnx_cnn_as_1_device(tmp_path):
  """Data parallelism (tests/test_parallel.py's drivers, fresh processes): configs/cnn_nnx.py
  shrunk, with dropout, over 8 fake CPU devices trains as on one, to float tolerance."""
  import parallel_utils  # pylint: disable=g-import-not-at-top
  overrides = {'model.features': [4], 'model.hidden_sizes': [8], 'model.dropout_rate': 0.3,
               'batch_size': 16, 'eval_batch_size': 16, 'num_epochs': 2, 'steps_per_call': 2,
               'scan_unroll': 1, 'write_report': False}
  children = [parallel_utils.start(
      f'devices{n}', dict(out=str(tmp_path / f'out{n}'), num_examples=50,
                          jobs=[dict(name='nnx', config='cnn_nnx', overrides=overrides,
                                     workdir=str(tmp_path / f'w{n}'))]),
      parallel_utils.child_env(n, tmp_path / f'cache{n}'), tmp_path / 'logs') for n in (8, 1)]
  parallel_utils.wait_all(children, 600)
  eight, one = (parallel_utils.result(tmp_path / f'out{n}', 'nnx') for n in (8, 1))
  assert eight['exit_code'] == one['exit_code'] == 0, children[0].describe()
  assert (eight['device_count'], one['device_count']) == (8, 1)
  assert len(np.ravel(one['losses'])) == 2 * 4
  np.testing.assert_allclose(eight['losses'], one['losses'], rtol=1e-5, atol=1e-6)
  got, want = (parallel_utils.params(tmp_path / f'out{n}', 'nnx') for n in (8, 1))
  assert sorted(got) == sorted(want) and "['convs']['0']['kernel']" in want
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
