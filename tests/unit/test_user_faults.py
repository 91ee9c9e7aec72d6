"""No run lost, round three (issue 28): config values, paths and caches a user can get wrong,
each refused (or survived) in one line before any work is wasted; no traceback."""

import errno
import json
import os
import re
import subprocess
import sys
import time

from etils import epath
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from conftest import tiny_config
from mnist_jax import input_pipeline
from mnist_jax import models
from mnist_jax import steps
from mnist_jax import sweeps
from mnist_jax import validation
from mnist_jax import writers
from mnist_jax.infra import errors
from mnist_jax.infra import storage
from mnist_jax.infra import workdir as workdir_lib

CONFIGS = ('mlp', 'cnn', 'cnn_bn', 'cnn_nnx')

# Every field of the shipped configs that had no rule: (field, a bad value).
BAD_FIELD_VALUES = [
    ('model.hidden_sizes', (0,)), ('model.hidden_sizes', (-3,)), ('model.hidden_sizes', (8.5,)),
    ('model.features', (0, 64)), ('model.kernel_size', 0), ('model.kernel_size', -1),
    ('model.dropout_rate', 1.0), ('model.dropout_rate', -0.1),
    ('model.batch_norm_momentum', 1.5), ('model.batch_norm_momentum', -1.0),
    ('train_split', ''), ('eval_split', '  '),
    ('checkpoint_async', None), ('download', None), ('write_report', None),
    ('write_tensorboard', None), ('profile', None),
    ('data_dir', '/tmp/x\0y'), ('data_dir', '/tmp/' + 'a' * 300),
    ('cache_dir', '/tmp/new\nline'), ('cache_dir', '/tmp/' + 'b/' * 2100),
    ('seed', 2**32),
]


@pytest.mark.parametrize('name', CONFIGS)
def test_every_shipped_config_is_valid(name):
  validation.validate(tiny_config(name))


def _field(config, path):
  """(the ConfigDict holding `path`'s field, its name), or None if this config has no such."""
  *parents, leaf = path.split('.')
  node = config
  for key in parents:
    node = node[key]
  return (node, leaf) if leaf in node else None


# (config, field, bad value) for each field a shipped config has: no case that tests nothing.
FIELD_CASES = [(name, path, value) for name in CONFIGS for path, value in BAD_FIELD_VALUES
               if _field(tiny_config(name), path)]


def test_every_bad_value_is_tried_on_some_shipped_config():
  assert {path for _, path, _ in FIELD_CASES} == {path for path, _ in BAD_FIELD_VALUES}


@pytest.mark.parametrize('name, path, value', FIELD_CASES,
                         ids=[f'{n}-{p}={str(v)[:12]!r}' for n, p, v in FIELD_CASES])
def test_every_field_of_every_shipped_config_is_checked(name, path, value):
  config = tiny_config(name)
  node, leaf = _field(config, path)
  node[leaf] = value
  with pytest.raises(errors.ConfigError, match=rf'^config\.{path}=.* is invalid.*expected ') as e:
    validation.validate(config)
  assert '\n' not in str(e.value) and len(str(e.value)) < 300, str(e.value)


def test_every_replica_seed_fits_in_32_bits():
  validation.validate(tiny_config(seed=2**32 - 2, num_seeds=2))
  with pytest.raises(errors.ConfigError, match=r'config\.seed=4294967295 is invalid with '
                     r'num_seeds=2: .* seed \+ num_seeds - 1 <= 4294967295'):
    validation.validate(tiny_config(seed=2**32 - 1, num_seeds=2))


def test_a_shift_that_leaves_blank_images_is_refused_for_the_images_size():
  validation.validate(tiny_config(augment='shift(100)'))  # Size unknown yet: checked later,
  with pytest.raises(errors.ConfigError, match=r"shift\(pixels\): at most 13 for 28x28 images"):
    validation.check_augment(tiny_config(augment='shift(100)'), (28, 28, 1))  # once known.
  validation.check_augment(tiny_config(augment='shift(13)|rotate(10)'), (28, 28, 1))
  with pytest.raises(errors.ConfigError, match=r'at most 3 for 8x8 images'):
    validation.validate(tiny_config(augment='shift(4)', image_size=(8, 8)))


@pytest.mark.parametrize('workdir, words', [
    ('x\0y', 'NUL character or a line break'),
    ('a' * 300, 'or one of its parts (at most 255 bytes each) is too long'),
    ('/'.join(['b' * 200] * 25), 'is too long'),
])
def test_a_workdir_path_that_cannot_be_is_one_line(tmp_path, workdir, words):
  with pytest.raises(workdir_lib.WorkdirError, match=r'^--workdir=.*' + re.escape(words)) as e:
    workdir_lib.prepare(epath.Path(tmp_path / workdir))
  assert '\n' not in str(e.value)


# --- Caches -----------------------------------------------------------------------------------

def test_a_cache_dir_that_is_a_file_is_refused_before_decoding(tmp_path):
  file = tmp_path / 'cache'
  file.write_text('precious\n')
  config = tiny_config(cache_dir=str(file))
  with pytest.raises(errors.ConfigError, match=r'^the cache folder .* is a file, not a folder; '
                     r"give another --config.cache_dir \(or 'none'"):
    validation.check_cache_dir(config, epath.Path(file))
  with pytest.raises(errors.ConfigError, match=r'cannot be written: a part of it is a file'):
    validation.check_cache_dir(config, epath.Path(file / 'sub'))
  assert file.read_text() == 'precious\n'


def test_a_cache_dir_without_permission_is_refused(tmp_path, monkeypatch):
  """(As root, chmod does not stop a write: the refusal is made to happen.)"""
  def denied(self, *args, **kwargs):
    raise PermissionError(errno.EACCES, 'Permission denied', str(self))

  monkeypatch.setattr('pathlib.Path.write_text', denied)
  with pytest.raises(errors.ConfigError, match=r'cannot be written: no permission to write'):
    validation.check_cache_dir(tiny_config(), epath.Path(tmp_path / 'cache'))


def test_a_train_with_an_unusable_cache_dir_stops_before_loading(tmp_path, monkeypatch):
  from mnist_jax import executor  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(executor, 'load', lambda *a: pytest.fail('decoded before the check'))
  (tmp_path / 'cache').write_text('')
  from mnist_jax import train  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.ConfigError, match='is a file'):
    train.setup(tiny_config(cache_dir=str(tmp_path / 'cache')))


def test_orphaned_temporary_files_of_a_killed_writer_are_removed_at_the_next_start(tmp_path,
                                                                                   capsys):
  data = tmp_path / 'cache' / 'data'
  data.mkdir(parents=True)
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True).stdout.strip()
  orphan = data / f'.mnist-train.npz.tmp{dead}'
  fresh = data / f'.mnist-test.npz.tmp{dead}'  # Still changing: maybe another host's writer.
  live = data / f'.other.npz.tmp{os.getpid()}'  # A writer that runs.
  kept = data / 'mnist-train.npz'
  for path in (orphan, fresh, live, kept):
    path.write_bytes(b'x' * 1000)
  old = time.time() - 2 * storage.ORPHAN_SECONDS
  for path in (orphan, live, kept):
    os.utime(path, (old, old))
  validation.check_cache_dir(tiny_config(), epath.Path(tmp_path / 'cache'))
  assert not orphan.exists() and fresh.exists() and live.exists() and kept.exists()
  assert f'note: removed {orphan}' in capsys.readouterr().out


def test_a_full_disk_while_writing_leaves_no_temporary_file(tmp_path, monkeypatch):
  def full(self, data):
    with open(self, 'wb') as f:
      f.write(data[:100])
    raise OSError(errno.ENOSPC, 'No space left on device', str(self))

  monkeypatch.setattr(epath.Path, 'write_bytes', full)
  with pytest.raises(OSError):
    storage.write_bytes_atomic(epath.Path(tmp_path / 'a.npz'), b'x' * 10_000)
  assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_caching_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
  def full(path, data):
    raise OSError(errno.ENOSPC, 'No space left on device', str(path))

  monkeypatch.setattr(storage, 'write_bytes_atomic', full)
  split = input_pipeline.Split(np.zeros((3, 2, 2, 1), np.uint8), np.zeros(3, np.int32))
  got = input_pipeline._cached(  # pylint: disable=protected-access
      epath.Path(tmp_path / 'data' / 's.npz'), (3, 2, 2, 1), lambda: split, 'mock/train')
  assert got is split
  [line] = capsys.readouterr().err.splitlines()
  assert line.startswith('warning: no space left on device caching the decoded mock/train in ')
  assert 'the run goes on without the cache' in line


# --- BatchNorm without a mask (issue 28, item 13) ---------------------------------------------

class _BatchNormWithoutMask(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=not train)(x.reshape((x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


class _BatchNormWithMask(_BatchNormWithoutMask):

  def __call__(self, x, train: bool = False, mask=None):
    return super().__call__(x, train)


def _model_state(model):
  state = steps.create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.1), (4, 4, 1))
  return state.model_state


def test_a_batchnorm_model_without_a_mask_is_warned_once_naming_it_and_the_fix(capsys):
  model = _BatchNormWithoutMask()
  assert models.warn_if_padding_in_statistics('bn_nomask', steps.takes_mask(model),
                                              _model_state(model), 60_000, 128)
  [line] = capsys.readouterr().out.splitlines()
  assert line.startswith("warning: the model 'bn_nomask' keeps BatchNorm statistics but its "
                         '__call__ takes no `mask`: the 32 padding examples')
  assert 'mask=mask[:, None]' in line and 'batch_size that divides' in line


@pytest.mark.parametrize('model, examples', [
    (_BatchNormWithMask(), 60_000),  # Takes the mask: padding stays out.
    (_BatchNormWithoutMask(), 60_032),  # No padding: 469 whole batches.
    (nn.Dense(10), 60_000),  # No statistics.
])
def test_no_warning_where_padding_stays_out_of_the_statistics(capsys, model, examples):
  assert not models.warn_if_padding_in_statistics(
      'm', steps.takes_mask(model), _model_state(model), examples, 128)
  assert capsys.readouterr().out == ''


# --- Data (issue 28, item 4) -------------------------------------------------------------------

def _mnist_copy(tmp_path, real_data_dir):
  import shutil  # pylint: disable=g-import-not-at-top
  [version] = (real_data_dir / 'mnist').iterdir()
  copy = tmp_path / 'data' / 'mnist' / version.name
  shutil.copytree(version, copy)
  for path in copy.iterdir():
    path.chmod(0o644)
  return tmp_path / 'data', copy


def _load(data_dir, *splits):
  return input_pipeline.load('mnist', str(data_dir), splits, download=False, cache_dir=None)


@pytest.mark.real_data
def test_a_split_that_does_not_exist_or_an_empty_slice_is_refused_before_decoding(
    real_data_dir, monkeypatch):
  monkeypatch.setattr(input_pipeline, '_decode', lambda *a: pytest.fail('decoded first'))
  with pytest.raises(errors.ConfigError, match=r"split 'validation' of mnist is invalid .*its "
                     r'splits: train, test'):
    _load(real_data_dir, 'train', 'validation')
  with pytest.raises(errors.ConfigError, match=r"split 'test\[:0\]' of mnist holds no examples; "
                     r'give config.train_split and config.eval_split slices that hold some'):
    _load(real_data_dir, 'train', 'test[:0]')


@pytest.mark.real_data
def test_a_truncated_record_file_is_one_line_naming_it(tmp_path, real_data_dir):
  data_dir, folder = _mnist_copy(tmp_path, real_data_dir)
  [test_file] = folder.glob('mnist-test.tfrecord*')
  test_file.write_bytes(test_file.read_bytes()[:1_000_000])
  with pytest.raises(errors.UserError, match=rf"^the record file {re.escape(str(test_file))} of "
                     r"mnist split 'test' is damaged \(DataLossError: truncated record") as e:
    _load(data_dir, 'test')
  assert '\n' not in str(e.value) and 'download=True' in str(e.value)


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_a_damaged_dataset_info_json_is_one_line_naming_it(tmp_path, damage):
  """(No real data needed: TFDS reads the metadata first.)"""
  info = tmp_path / 'mnist' / '3.0.1' / 'dataset_info.json'
  info.parent.mkdir(parents=True)
  info.write_text('{"name": "mnist", "description": "unfinish' if damage == 'truncated'
                  else 'garbage{{')
  with pytest.raises(errors.UserError, match=rf"^the metadata of dataset 'mnist', "
                     rf'{re.escape(str(info))}, is damaged \(not JSON: ') as e:
    input_pipeline._builder('mnist', str(tmp_path))  # pylint: disable=protected-access
  assert '\n' not in str(e.value) and not isinstance(e.value, errors.ConfigError)


# --- Damaged files in a workdir (issue 28, item 3) ---------------------------------------------

def _damage(path, damage):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) * 2 // 3] if damage == 'truncated' else b'\x00garbage{{\n')


@pytest.mark.parametrize('damage', ['truncated', 'garbage'])
def test_damaged_metrics_lines_are_skipped_with_one_warning(tmp_path, capsys, damage):
  whole = [dict(step=2, epoch=1, test_loss=1.0), dict(step=4, epoch=2, test_loss=0.5)]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in whole))
  _damage(tmp_path / 'metrics.jsonl', damage)
  history = writers.read_history(epath.Path(tmp_path))
  assert history == (whole[:1] if damage == 'truncated' else [])  # The whole lines.
  [line] = capsys.readouterr().out.splitlines()
  assert line.startswith('warning: ') and 'damaged line(s)' in line and 'skipped' in line


def test_a_line_cut_short_stays_its_own_line_when_the_run_appends(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 2, "epoch": 1, "test_lo')
  logger = writers.MetricLogger(epath.Path(tmp_path), tensorboard=False)
  logger.write(4, dict(epoch=2, test_loss=0.5))
  logger.close()
  assert writers.read_history(epath.Path(tmp_path)) == [dict(step=4, epoch=2, test_loss=0.5)]


def test_a_workdir_with_damaged_files_resumes_and_rewrites_them(tmp_path, capsys):
  """metrics.jsonl and summary.json cut short, config.json and the lock file garbage, all at
  once (a kill or a full disk during a write, an editor): the rerun resumes, says so once,
  rewrites them, and its report reads the whole lines."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mnist_jax import train  # pylint: disable=g-import-not-at-top
  config = lambda epochs, report: tiny_config(num_epochs=epochs, write_report=report,
                                              checkpoint_async=False)
  with tfds.testing.mock_data(num_examples=16):
    train.train_and_evaluate(config(1, False), str(tmp_path))
    for name, damage in (('metrics.jsonl', 'truncated'), ('summary.json', 'truncated'),
                         ('config.json', 'garbage'), ('.lock', 'garbage')):
      _damage(tmp_path / name, damage)
    capsys.readouterr()
    summary = train.train_and_evaluate(config(2, True), str(tmp_path))
  out = capsys.readouterr().out
  assert 'resumed from the checkpoint at step 2' in out
  assert [l for l in out.splitlines() if l.startswith('warning:')] == [
      f'warning: {tmp_path / "metrics.jsonl"} has 1 damaged line(s) (line 1: cut short or not '
      'JSON); they are skipped.']
  assert json.loads((tmp_path / 'summary.json').read_text())['steps'] == summary['steps'] == 4
  assert json.loads((tmp_path / 'config.json').read_text())['num_epochs'] == 2
  assert [r['epoch'] for r in writers.read_history(epath.Path(tmp_path))] == [2]
  assert (tmp_path / 'report.md').exists()


def test_a_shift_that_blanks_a_tfds_datasets_images_is_refused_before_loading(monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from mnist_jax import executor, train  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(executor, 'load', lambda *a: pytest.fail('loaded before the check'))
  with tfds.testing.mock_data(num_examples=16):
    with pytest.raises(errors.ConfigError, match=r'at most 13 for 28x28 images'):
      train.setup(tiny_config(augment='shift(100)'))


# --- num_seeds and a NaN (issue 28, item 12: seeds stop together; a one-value sweep does not) --

def _one_replica_nan():
  per_step = dict(loss=np.array([[0.5, 0.4], [0.5, np.nan]], np.float32),
                  params_finite=np.array([True, False]))
  return [(per_step, 0, 2)]


def test_seeds_alone_stop_together_on_one_seeds_nan():
  replicas = sweeps.Replicas.from_config(tiny_config(num_seeds=2))
  assert replicas.no_divergence() is None
  with pytest.raises(steps.NonFiniteError, match=r'loss is \[0\.4.*nan\] at step 2; stopping '
                     'without saving this state'):
    steps.check_finite(_one_replica_nan(), replicas.no_divergence(), replicas.names)


def test_seeds_of_a_one_value_sweep_mark_the_diverged_seed_and_go_on(capsys):
  config = tiny_config(num_seeds=2)
  config.sweep.learning_rate = (1e-3,)
  replicas = sweeps.Replicas.from_config(config)
  diverged = replicas.no_divergence()
  steps.check_finite(_one_replica_nan(), diverged, replicas.names)
  assert diverged.tolist() == [0, 2]
  assert 'replica learning_rate=0.001,seed=1 diverged at step 2' in capsys.readouterr().out


_COMPILE_TWICE = '''
import os, sys
from etils import epath
from mnist_jax.infra import process
process.enable_compilation_cache(epath.Path(sys.argv[1]))
import jax, jax.numpy as jnp
print(jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).tolist())
'''


def test_a_damaged_compilation_cache_entry_is_replaced_with_one_line(tmp_path):
  run = lambda: subprocess.run([sys.executable, '-c', _COMPILE_TWICE, str(tmp_path)],
                               capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert run().returncode == 0
  entries = sorted((tmp_path / 'jax').glob('*-cache'))
  assert entries
  for entry in entries:
    entry.write_bytes(entry.read_bytes()[:100])  # Cut short.
  damaged = run()
  assert damaged.returncode == 0 and damaged.stdout.strip() == '[3.0, 3.0, 3.0]'
  lines = [l for l in damaged.stderr.splitlines() if 'compilation cache' in l]
  assert len(lines) == len(entries) and all(
      l.startswith("warning: the compilation cache's entry ") and 'removed' in l for l in lines)
  assert all(entry.stat().st_size > 100 for entry in entries)  # Cached again, whole.
  assert 'compilation cache' not in run().stderr  # And the next run is quiet.


@pytest.mark.parametrize('content', ['{"host": "h", "pid": 1, "heartb', '\x00garbage{{',
                                     '[1, 2]', '{"heartbeat": "noon", "pid": "x"}'])
def test_a_damaged_lock_file_of_a_live_run_still_refuses_in_one_line(tmp_path, content):
  with workdir_lib.hold(epath.Path(tmp_path)):
    (tmp_path / workdir_lib.LOCK_NAME).write_text(content)  # An editor, a kill mid-write.
    with pytest.raises(errors.UserError, match=r'^another run is using .* \(owner unknown\); '
                       'wait for it to finish'):
      with workdir_lib.hold(epath.Path(tmp_path)):
        pass
  with workdir_lib.hold(epath.Path(tmp_path)):  # Released, and taken again despite the content.
    pass
