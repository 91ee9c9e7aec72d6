"""No run lost, round two: one run per workdir, safe resumes after config changes, Ctrl-C, a
full disk, workdirs a user can get wrong, and a damaged data cache.

Runs are `run.py` in their own processes on TFDS mock data (tests/crash_utils.py), the tiny job
of test_crash_safety.py: 36 examples, batches of 8 (5 steps an epoch), 3 epochs, calls of 2
steps, a checkpoint every 2 steps, the 2 newest kept. The scenarios start together, two at a
time, from a module fixture; the tests then assert on what each left behind.
"""

import concurrent.futures
import errno
import json
import os
import pathlib
import shutil
import socket
import subprocess

import numpy as np
import pytest
import tensorflow_datasets as tfds

import crash_utils as cu
from crash_utils import Fault
from mnist_jax import checkpoint
from mnist_jax.infra import errors
from mnist_jax import input_pipeline
from mnist_jax import optim
from mnist_jax import train
from mnist_jax.infra import workdir as workdir_lib
from mnist_jax import writers

pytestmark = pytest.mark.slow  # run.py children: minutes.

PARALLEL = 2


class Lab:

  def __init__(self, base, cache):
    self.base, self.runner = base, cu.Runner(base / 'logs')
    self.cache = cache

  def args(self, **overrides):
    return cu.config_args(self.cache, **overrides)

  def run(self, name, workdir=None, faults=(), **overrides):
    workdir = workdir or self.base / name / 'workdir'
    return dict(result=self.runner.run(workdir, self.args(**overrides), faults=faults,
                                       record=self.base / name / 'steps.jsonl',
                                       state_file=self.base / name / 'state.json'),
                workdir=workdir, state=self.base / name / 'state.json',
                record=self.base / name / 'steps.jsonl')


def _two_runs_one_workdir(lab):
  """The first run pauses mid-epoch 2; a second run starts in its workdir, then the first goes
  on and finishes. (Synchronous saves: nothing of the first run's is written while it waits.)"""
  name = 'two_runs'
  workdir, release = lab.base / name / 'workdir', lab.base / name / 'release'
  first = lab.runner.start(workdir, lab.args(checkpoint_async=False),
                           record=lab.base / name / 'steps.jsonl',
                           state_file=lab.base / name / 'state.json',
                           faults=[Fault('train_call', 4, 'WAIT', release=str(release))])
  cu.wait_until_waiting(release, first)
  lock_text = (workdir / workdir_lib.LOCK_NAME).read_text()
  before = cu.tree_digest(workdir)
  second = lab.runner.run(workdir, lab.args(checkpoint_async=False))
  after = cu.tree_digest(workdir)
  release.write_text('')
  return dict(first=first.wait(), first_pid=first.process.pid, second=second, before=before,
              after=after, lock_text=lock_text, workdir=workdir,
              state=lab.base / name / 'state.json')


def _changed_config(lab, reference):
  """The finished reference's workdir, rerun with a bigger batch (and more epochs)."""
  workdir = lab.base / 'changed' / 'workdir'
  shutil.copytree(reference['workdir'], workdir)
  before = cu.tree_digest(workdir)
  result = lab.runner.run(workdir, lab.args(batch_size=12, num_epochs=4))
  return dict(result=result, before=before, after=cu.tree_digest(workdir))


def _more_epochs(lab, reference):
  """The finished 3-epoch reference, continued to 4 epochs with another evaluation batch."""
  workdir = lab.base / 'more_epochs' / 'workdir'
  shutil.copytree(reference['workdir'], workdir)
  return lab.run('more_epochs', workdir=workdir, num_epochs=4, eval_batch_size=6)


def _second_ctrl_c(lab):
  """Ctrl-C after call 4 (steps 6-7) starts the save of step 7; a second Ctrl-C comes while
  it is being written (saves: 2, 4, 5, then 7 is the 4th). Then a restart."""
  name = 'ctrl_c_twice'
  first = lab.run(name, faults=[Fault('train_call', 4, 'INT'), Fault('tmp_created', 4, 'INT')])
  steps, tmp = cu.step_folders(first['workdir']), cu.tmp_entries(first['workdir'])
  second = lab.run(name, workdir=first['workdir'])
  return dict(second, first=first['result'], steps_after_first=steps, tmp_after_first=tmp)


def _disk_fills(lab):
  """The workdir on a small tmpfs; after the 3rd save, another process fills it."""
  mount = lab.base / 'small_disk'
  mount.mkdir()
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(mount)],
                        capture_output=True, text=True, check=False)
  if done.returncode:
    return dict(skip=f'cannot mount a tmpfs here ({done.stderr.strip()})')
  try:
    workdir, release = mount / 'workdir', lab.base / 'disk_release'
    child = lab.runner.start(workdir, lab.args(), record=lab.base / 'disk' / 'steps.jsonl',
                             state_file=lab.base / 'disk' / 'state.json',
                             faults=[Fault('saved', 3, 'WAIT', release=str(release))])
    cu.wait_until_waiting(release, child)
    try:  # Until the disk is full (it can be full already: then even the open fails).
      with open(mount / 'filler', 'wb') as f:
        while True:
          f.write(b'\0' * 65536)
    except OSError as e:
      assert e.errno == errno.ENOSPC
    release.write_text('')
    full = child.wait()
    steps_left = cu.step_folders(workdir)
    jsonl = (workdir / 'metrics.jsonl').read_text()
    (mount / 'filler').unlink(missing_ok=True)
    rerun = lab.run('disk', workdir=workdir)
    return dict(full=full, steps_left=steps_left, jsonl=jsonl, rerun=rerun, workdir=workdir,
                fingerprint=fingerprint(rerun) if rerun['result'].returncode == 0 else None)
  finally:
    subprocess.run(['umount', '-l', str(mount)], check=False)


def _killed(lab):
  run = lab.run('killed', faults=[Fault('train_call', 4, 'KILL')])
  return dict(run, steps=cu.step_folders(run['workdir']))


def _workdir_problems(lab):
  base = lab.base / 'problems'
  base.mkdir()
  a_file = base / 'a_file'
  a_file.write_text('precious\n')
  return {name: (lab.runner.run(path, lab.args()), path) for name, path in
          (('is_a_file', a_file), ('under_a_file', a_file / 'run'))} | {'file': a_file}


@pytest.fixture(scope='module')
def runs(tmp_path_factory, compile_cache):
  lab = Lab(tmp_path_factory.mktemp('reliability'), compile_cache)
  out = {'reference': lab.run('reference')}
  jobs = dict(
      reference_4_epochs=lambda: lab.run('reference_4_epochs', num_epochs=4),
      two_runs=lambda: _two_runs_one_workdir(lab),
      changed=lambda: _changed_config(lab, out['reference']),
      more_epochs=lambda: _more_epochs(lab, out['reference']),
      ctrl_c=lambda: lab.run('ctrl_c', faults=[Fault('train_call', 4, 'INT')]),
      ctrl_c_twice=lambda: _second_ctrl_c(lab),
      killed=lambda: _killed(lab),
      disk=lambda: _disk_fills(lab),
      problems=lambda: _workdir_problems(lab))
  with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
    futures = {name: pool.submit(job) for name, job in jobs.items()}
    for name, future in futures.items():
      try:
        out[name] = future.result()
      except Exception as e:  # pylint: disable=broad-except  (reported by the tests using it)
        out[name] = e
    # Continue the interrupted runs (restarts of the same command).
    out['ctrl_c_resumed'] = lab.run('ctrl_c', workdir=get(out, 'ctrl_c')['workdir'])
    out['killed_resumed'] = lab.run('killed', workdir=get(out, 'killed')['workdir'])
  return out


def get(runs, name):
  value = runs[name]
  if isinstance(value, Exception):
    raise value
  return value


def fingerprint(run):
  return cu.read_json(run['workdir'] / 'summary.json')['param_fingerprint']


def assert_one_line_error(result, code):
  assert result.returncode == code, result.explain()
  assert not result.has_traceback(), result.explain()
  [line] = result.error_lines()
  return line


# --- 1. One run per workdir ------------------------------------------------------------------

def test_a_second_run_in_a_busy_workdir_is_refused_and_changes_nothing(runs):
  run = get(runs, 'two_runs')
  line = assert_one_line_error(run['second'], 1)
  assert f"another run is using {run['workdir']}" in line, line
  assert f"host {socket.gethostname()}, pid {run['first_pid']}" in line, line
  assert run['after'] == run['before']  # Nothing written, nothing removed.
  assert json.loads(run['lock_text'])['pid'] == run['first_pid']


def test_the_first_run_finishes_untouched(runs):
  run, reference = get(runs, 'two_runs'), get(runs, 'reference')
  assert run['first'].returncode == 0, run['first'].explain()
  assert fingerprint(run) == fingerprint(reference)
  assert cu.read_json(run['state']) == cu.read_json(reference['state'])
  epochs = [json.loads(l)['epoch'] for l in (run['workdir'] / 'metrics.jsonl').read_text()
            .splitlines()]
  assert epochs == [1, 2, 3]  # One record an epoch: none from the refused run.


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(runs):
  killed, resumed = get(runs, 'killed'), get(runs, 'killed_resumed')
  assert killed['result'].killed
  lock = json.loads((killed['workdir'] / workdir_lib.LOCK_NAME).read_text())
  assert lock['pid'] != os.getpid()
  assert resumed['result'].returncode == 0, resumed['result'].explain()
  assert resumed['result'].resumed_from() == max(killed['steps'])
  assert fingerprint(resumed) == fingerprint(get(runs, 'reference'))


def test_lock_is_exclusive_and_released(tmp_path):
  with workdir_lib.hold(tmp_path):
    with pytest.raises(errors.UserError, match=f'another run is using .* pid {os.getpid()},'):
      with workdir_lib.hold(tmp_path):
        pass
  with workdir_lib.hold(tmp_path):  # Released at the end of the block.
    pass


# --- 2. Resuming after a config change ----------------------------------------------------------

def test_a_config_change_that_alters_the_run_is_refused_before_anything_is_written(runs):
  run = get(runs, 'changed')
  line = assert_one_line_error(run['result'], 1)
  assert 'batch_size: saved 8, now 12' in line, line
  assert 'steps_per_epoch: saved 5, now 3' in line, line
  assert 'num_epochs:' not in line and 'another --workdir' in line, line
  assert run['after'] == run['before']


def test_more_epochs_and_another_eval_batch_continue_exactly(runs):
  run = get(runs, 'more_epochs')
  result = run['result']
  assert result.returncode == 0, result.explain()
  assert result.resumed_from() == cu.TOTAL_STEPS
  assert 'schedule' not in result.stdout  # A constant learning rate: nothing moved.
  assert fingerprint(run) == fingerprint(get(runs, 'reference_4_epochs'))


def test_checkpoints_record_what_they_were_made_with(runs):
  workdir = get(runs, 'reference')['workdir']
  saved = json.loads((cu.checkpoint_dir(workdir) / str(cu.TOTAL_STEPS) / 'run' / 'metadata')
                     .read_text())
  assert saved['batch_size'] == cu.BATCH_SIZE and saved['steps_per_epoch'] == 5
  assert saved['model.hidden_sizes'] == [8] and saved['num_epochs'] == cu.NUM_EPOCHS
  # Safe to change: not part of what the run is.
  assert 'checkpoint_keep' not in checkpoint.identity(saved)


def test_the_schedule_warning_when_more_epochs_stretch_a_decay(capsys, mlp_config):
  """Not a refusal: a decaying schedule over the run's steps now spans more of them."""
  mlp_config.lr_schedule = 'cosine_decay_schedule'
  mlp_config.num_epochs = 4
  optim.warn_if_the_schedule_moved(mlp_config, 10, saved_epochs=3, step=30)
  assert 'the learning-rate schedule follows the new length (40 steps)' in capsys.readouterr().out
  mlp_config.lr_schedule = 'constant_schedule'
  optim.warn_if_the_schedule_moved(mlp_config, 10, saved_epochs=3, step=30)
  assert capsys.readouterr().out == ''


# --- 3. Ctrl-C: save, exit 130; a second one stops at once ----------------------------------

def test_ctrl_c_saves_the_current_step_and_exits_130(runs):
  run, resumed = get(runs, 'ctrl_c'), get(runs, 'ctrl_c_resumed')
  line = assert_one_line_error(run['result'], 130)
  assert line == (f"error: SIGINT (Ctrl-C): saved the checkpoint at step 7 in "
                  f"{run['workdir'] / 'checkpoints'}; run again with the same --workdir to "
                  'continue from it.')
  assert resumed['result'].resumed_from() == 7
  assert fingerprint(resumed) == fingerprint(get(runs, 'reference'))
  assert cu.compare_steps(cu.read_steps(get(runs, 'reference')['record']),
                          cu.read_steps(resumed['record'])) == []


def test_a_second_ctrl_c_stops_at_once_and_the_last_whole_checkpoint_stays(runs):
  run = get(runs, 'ctrl_c_twice')
  first = run['first']
  assert first.returncode == 130, first.explain()
  assert 'second Ctrl-C' in first.stderr and not first.has_traceback(), first.explain()
  assert run['steps_after_first'] == [4, 5]  # The save of step 7 never finished...
  assert any(t.startswith('7.') for t in run['tmp_after_first']), run['tmp_after_first']
  assert run['result'].resumed_from() == 5  # ...so the restart goes on from step 5,
  assert fingerprint(run) == fingerprint(get(runs, 'reference'))  # and ends as the reference.


# --- 4. A full disk ------------------------------------------------------------------------------

def test_a_full_disk_stops_with_a_few_clear_lines_and_a_rerun_continues(runs):
  run = get(runs, 'disk')
  if 'skip' in run:
    pytest.skip(run['skip'])
  full = run['full']
  assert full.returncode == 1, full.explain()
  assert not full.has_traceback(), full.explain()
  [line] = full.error_lines()
  intact = run['steps_left'][-1]
  assert 'no space left on device while saving the checkpoint at step' in line, line
  assert f'the checkpoint at step {intact} is intact' in line, line
  assert 'run the same command again' in line, line
  assert len(full.stderr.strip().splitlines()) <= 10, full.stderr  # TFDS warnings, our line.
  assert run['rerun']['result'].returncode == 0, run['rerun']['result'].explain()
  assert run['rerun']['result'].resumed_from() == intact
  assert run['fingerprint'] == fingerprint(get(runs, 'reference'))


def test_a_failed_save_is_one_error_naming_the_step_and_the_intact_one(tmp_path, monkeypatch):
  """Whatever the file system: a save that fails in Orbax's background thread surfaces at
  the next save (or the wait) as CheckpointSaveError about the step that failed."""
  ckpt = checkpoint.Checkpointer(tmp_path / 'checkpoints', keep=3)
  item = dict(w=np.ones(4, np.float32))
  ckpt.save(1, item, {})
  ckpt.wait()
  original = ckpt._manager.wait_until_finished  # pylint: disable=protected-access
  calls = []

  def failing_wait():
    calls.append(1)
    original()
    if len(calls) == 1:  # The save of step 2, finishing in the background, "failed".
      raise ValueError('RESOURCE_EXHAUSTED: Failed writing: [os_error_code=\'28\'] No space '
                       'left on device')

  ckpt.save(2, item, {})
  monkeypatch.setattr(ckpt._manager, 'wait_until_finished', failing_wait)  # pylint: disable=protected-access
  with pytest.raises(checkpoint.CheckpointSaveError) as info:
    ckpt.save(3, item, {})
  message = str(info.value)
  assert message.startswith('no space left on device while saving the checkpoint at step 2 ')
  assert 'the checkpoint at step 1 is intact' in message and '\n' not in message
  ckpt.wait()  # Said once: waiting or closing again does not raise it again.
  ckpt.close()


def test_a_full_disk_while_logging_is_one_line(tmp_path, mlp_config, monkeypatch):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'metrics.jsonl'))

  monkeypatch.setattr(writers.MetricLogger, 'write', full)
  mlp_config.model.hidden_sizes = (4,)
  mlp_config.num_epochs, mlp_config.batch_size, mlp_config.eval_batch_size = 1, 8, 12
  with tfds.testing.mock_data(num_examples=16):
    with pytest.raises(workdir_lib.DiskFull, match='no space left on device writing .*metrics.jsonl'):
      train.train_and_evaluate(mlp_config, str(tmp_path))


# --- 5. Workdirs a user can get wrong ---------------------------------------------------------

def test_a_workdir_that_is_a_file_is_refused_and_the_file_kept(runs):
  problems = get(runs, 'problems')
  result, path = problems['is_a_file']
  line = assert_one_line_error(result, 1)
  assert f'--workdir={path} is a file' in line, line
  assert problems['file'].read_text() == 'precious\n'


def test_a_workdir_under_a_file_is_refused(runs):
  problems = get(runs, 'problems')
  result, path = problems['under_a_file']
  line = assert_one_line_error(result, 1)
  assert f'--workdir={path} cannot be written: {problems["file"]} is a file' in line, line
  assert problems['file'].read_text() == 'precious\n'


def test_a_workdir_without_permission_is_refused(tmp_path, monkeypatch):
  """(As root, chmod does not stop a write: the refusal is made to happen.)"""
  def denied(self, *args, **kwargs):
    raise PermissionError(errno.EACCES, 'Permission denied', str(self))

  monkeypatch.setattr(pathlib.Path, 'mkdir', denied)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r'cannot be written: no permission to write there'):
    workdir_lib.prepare(tmp_path / 'new')


# --- 6. A damaged decoded-data cache ----------------------------------------------------------

def _cached(tmp_path, image, label):
  path = tmp_path / 'split.npz'
  np.savez(path, image=image, label=label)
  return path


@pytest.mark.parametrize('damage', ['truncated', 'not_npz', 'wrong_dtype', 'wrong_shape',
                                    'missing_labels'])
def test_a_damaged_cache_file_is_detected(tmp_path, capsys, damage):
  image, label = np.zeros((6, 4, 4, 1), np.uint8), np.arange(6, dtype=np.int32)
  path = _cached(tmp_path, image, label)
  if damage == 'truncated':
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
  elif damage == 'not_npz':
    path.write_text('hello')
  elif damage == 'wrong_dtype':
    path = _cached(tmp_path, image.astype(np.float32), label)
  elif damage == 'wrong_shape':
    path = _cached(tmp_path, image[:5], label[:5])
  else:
    np.savez(path, image=image)
  assert input_pipeline.read_cached_split(path, (6, 4, 4, 1)) is None
  [line] = capsys.readouterr().out.splitlines()
  assert line.startswith(f'warning: the cached data {path} is damaged (') and 'decoding it again' in line


def test_a_whole_cache_file_is_read(tmp_path):
  image, label = np.ones((6, 4, 4, 1), np.uint8), np.arange(6, dtype=np.int32)
  split = input_pipeline.read_cached_split(_cached(tmp_path, image, label), (6, 4, 4, 1))
  np.testing.assert_array_equal(split.image, image)
  np.testing.assert_array_equal(split.label, label)


@pytest.mark.real_data
def test_a_truncated_cache_is_decoded_again_and_replaced(mlp_config, real_data_dir, tmp_path,
                                                         capsys):
  mlp_config.data_dir = str(real_data_dir)
  mlp_config.cache_dir = str(tmp_path / 'cache')
  mlp_config.num_epochs = 1
  mlp_config.write_report = mlp_config.write_tensorboard = False
  first = train.train_and_evaluate(mlp_config, str(tmp_path / 'a'))
  [cached] = (tmp_path / 'cache' / 'data').glob('*-train.npz')
  whole = cached.read_bytes()
  cached.write_bytes(whole[:len(whole) // 3])
  capsys.readouterr()
  second = train.train_and_evaluate(mlp_config, str(tmp_path / 'b'))
  out = capsys.readouterr().out
  assert f'warning: the cached data {cached} is damaged (BadZipFile' in out, out
  assert second['param_fingerprint'] == first['param_fingerprint']
  assert cached.read_bytes() == whole  # Replaced by the same decoded arrays.
