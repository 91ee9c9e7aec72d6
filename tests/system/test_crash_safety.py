"""Crash safety: kill -9, SIGTERM, corrupted checkpoints, NaN, bad configs, incompatible workdirs.

Every run here is `run.py` in its own process on TFDS mock data (tests/crash_utils.py), so a
SIGKILL hits a real process and exit statuses are what a shell sees. The tiny job: 36 examples,
batches of 8 (5 steps an epoch), 3 epochs, calls of 2 steps, a checkpoint every 2 steps, the 2
newest kept. The runs are started together from a module fixture, two at a time; the tests then
assert on what each left behind.

The reference is one uninterrupted run; an interrupted run, restarted in the same workdir until it
finishes, must end bit-identical to it (parameters, optimizer state, RNG) and must have trained
every step on the same examples with the same loss (CPU: exactly).
"""

import concurrent.futures
import json
import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import crash_utils as cu
from crash_utils import Fault
from mnist_jax import checkpoint
from mnist_jax.infra import errors
from mnist_jax import validation

pytestmark = pytest.mark.slow  # run.py children killed and restarted: minutes.

PARALLEL = 2  # Runs at once (the machine has 2 cores; most of a run is one busy thread).


# --- The runs -------------------------------------------------------------------------------

class Lab:
  """Runs scenarios: a workdir, and run.py started in it once per entry of `starts`."""

  def __init__(self, base, runner, cache):
    self.base, self.runner = base, runner
    self.cache = cache  # Shared compilation cache: only the first run compiles.

  def args(self, **overrides):
    """The tiny job's run.py flags; '{base}' in a value is this lab's folder."""
    return cu.config_args(self.cache, **{
        k: v.format(base=self.base) if isinstance(v, str) else v for k, v in overrides.items()})

  def scenario(self, name, starts, *, args=None, args_per_start=None, before_start=None):
    """Starts run.py in one workdir once per item of `starts` (a tuple of faults each).

    `args`: the run.py arguments of every start; `args_per_start`: a list of them, one a start.

    `before_start(i, workdir)` runs before start i (to corrupt or copy the workdir). Returns
    every start's Result, the step folders and tmp entries seen after it, and where the
    per-step record and the final-state fingerprints are.
    """
    workdir = self.base / name / 'workdir'
    record, state = self.base / name / 'steps.jsonl', self.base / name / 'state.json'
    out = dict(name=name, workdir=workdir, record=record, state=state, starts=[])
    for i, faults in enumerate(starts):
      if before_start:
        before_start(i, workdir)
      start_args = args_per_start[i] if args_per_start else args or self.args()
      result = self.runner.run(workdir, start_args, faults=faults, record=record,
                               state_file=state)
      out['starts'].append(dict(result=result, faults=faults, steps=cu.step_folders(workdir),
                                tmp=cu.tmp_entries(workdir)))
    return out


def _corrupt_newest(i, workdir):
  """Before the restart: truncate the largest array file of the newest checkpoint."""
  if i == 1:
    newest = cu.checkpoint_dir(workdir) / str(cu.step_folders(workdir)[-1])
    shutil.copytree(workdir, workdir.parent / 'all_corrupt_workdir')  # For the next scenario.
    target = cu.data_files(newest)[0]
    target.write_bytes(target.read_bytes()[:target.stat().st_size // 2])


# The tiny job's examples as your own data (NUM_EXAMPLES random digits a split).
OWN = dict(dataset='npz:{base}/own.npz')
OWN_STREAM = dict(OWN, input_mode='stream')


def _write_own_npz(path):
  rng = np.random.default_rng(0)
  np.savez(path, **{f'{split}_{what}': (
      rng.integers(0, 256, (cu.NUM_EXAMPLES, 28, 28), dtype=np.uint8) if what == 'images'
      else rng.integers(0, 10, cu.NUM_EXAMPLES)) for split in ('train', 'test')
                    for what in ('images', 'labels')})


SCENARIOS = {
    # Promise 1/2: kill -9 at different points, restart until done. Calls: steps 1-2, 3-4, 5
    # (+ a padded step), 6-7, 8-9, 10, ...; saves: 2, 4, 5 (epoch end), 7, 9, 10, 12, 14, 15.
    'kill_in_train_call': dict(starts=[(Fault('train_call', 3),), ()]),  # After step 5.
    'kill_after_save_returned': dict(starts=[(Fault('saved', 2),), ()]),  # Step 4 in flight.
    'kill_tmp_created': dict(starts=[(Fault('tmp_created', 3),), ()]),  # Step 5 just begun.
    'kill_before_commit': dict(starts=[(Fault('before_commit', 2),), ()]),  # 4 not renamed.
    'killed_twice': dict(starts=[(Fault('before_commit', 3),), (Fault('train_call', 4),), ()]),
    # Promise 3: the newest checkpoint of an unfinished run truncated before the restart.
    'corrupt_newest': dict(starts=[(Fault('train_call', 7),), ()], before_start=_corrupt_newest),
    # Promise 4: SIGTERM mid-epoch (and at an epoch's last call); 3 checkpoints kept here.
    'sigterm': dict(starts=[(Fault('train_call', 4, 'TERM'),), ()], args=dict(checkpoint_keep=3)),
    'sigterm_epoch_end': dict(starts=[(Fault('train_call', 3, 'TERM'),), ()]),
    # SIGTERM after the last epoch, while the last checkpoint is being finished; and before
    # training starts (while the data loads).
    'sigterm_after_training': dict(starts=[(Fault('close', 1, 'TERM'),), ()]),
    'sigterm_in_setup': dict(starts=[(Fault('setup', 1, 'TERM'),), ()]),
    # Stopped mid-epoch with calls of 2 steps (as in a terminal), resumed with whole-epoch calls
    # (as under nohup): a resumed chunk with empty steps (guarded), then unguarded epochs.
    'sigterm_then_whole_epochs': dict(
        starts=[(Fault('train_call', 4, 'TERM'),), ()],
        args_per_start=[dict(), dict(steps_per_call=0, checkpoint_every_steps=0)]),
    # Promise 5: NaN parameters before the 4th call (steps 6-7); a learning rate that explodes;
    # NaN in a call that is not followed by a save (calls of 1 step, a save every 2).
    'nan_injected': dict(starts=[(Fault('before_train_call', 4, 'NAN'),)]),
    'lr_explodes': dict(starts=[()], args=dict(learning_rate=1e30)),
    'nan_between_saves': dict(starts=[(Fault('before_train_call', 3, 'NAN'),)],
                              args=dict(steps_per_call=1)),
    # Promise 1 through the tf.data input mode, and with 2 seeds trained at once (vmap).
    'tfdata_reference': dict(starts=[()], args=dict(input_mode='tfdata')),
    'tfdata_kill': dict(starts=[(Fault('train_call', 4),), ()], args=dict(input_mode='tfdata')),
    'seeds2_reference': dict(starts=[()], args=dict(num_seeds=2)),
    'seeds2_kill': dict(starts=[(Fault('before_commit', 3),), ()], args=dict(num_seeds=2)),
    # Promise 1 for a model with state (BatchNorm), dropout and augmentation: killed mid-epoch.
    'bn_reference': dict(starts=[()], args=cu.CNN_BN),
    'bn_kill': dict(starts=[(Fault('train_call', 4),), ()], args=cu.CNN_BN),
    # Promise 1 for a model in Flax NNX (split/merge state), with dropout: killed mid-epoch.
    'nnx_reference': dict(starts=[()], args=cu.NNX),
    'nnx_kill': dict(starts=[(Fault('train_call', 4),), ()], args=cu.NNX),
    # Promise 1 with an EMA of the weights (fingerprinted) and gradient accumulation.
    'knobs_reference': dict(starts=[()], args=cu.KNOBS),
    'knobs_kill': dict(starts=[(Fault('train_call', 4),), ()], args=cu.KNOBS),
    # Promise 1 for a sweep of two learning rates x two seeds (one vmapped program).
    'sweep_reference': dict(starts=[()], args=cu.SWEEP),
    'sweep_kill': dict(starts=[(Fault('before_commit', 3),), ()], args=cu.SWEEP),
    # input_mode=stream (your own data, an .npz the lab writes: memory-mapped, read by index):
    # SIGTERM and Ctrl-C mid-epoch, and the NaN guard; against the same data in device mode.
    'stream_device': dict(starts=[()], args=dict(OWN, input_mode='device')),
    'stream_reference': dict(starts=[()], args=OWN_STREAM),
    'stream_sigterm': dict(starts=[(Fault('train_call', 4, 'TERM'),), ()], args=OWN_STREAM),
    'stream_ctrl_c': dict(starts=[(Fault('train_call', 4, 'INT'),), ()], args=OWN_STREAM),
    'stream_lr_explodes': dict(starts=[()], args=dict(OWN_STREAM, learning_rate=1e30)),
}


@pytest.fixture(scope='module')
def lab(tmp_path_factory, compile_cache):
  base = tmp_path_factory.mktemp('crash')
  _write_own_npz(base / 'own.npz')
  return Lab(base, cu.Runner(base / 'logs'), compile_cache)


@pytest.fixture(scope='module')
def runs(lab):
  """The reference first (it fills the compilation cache), then every scenario, 2 at a time."""
  out = {'reference': lab.scenario('reference', [()])}

  def run(name, spec):
    args = lab.args(**spec['args']) if 'args' in spec else None
    args_per_start = [lab.args(**a) for a in spec.get('args_per_start', [])]
    return lab.scenario(name, spec['starts'], args=args, args_per_start=args_per_start,
                        before_start=spec.get('before_start'))

  with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
    futures = {name: pool.submit(run, name, spec) for name, spec in SCENARIOS.items()}
    # Needs corrupt_newest's copy; and the incompatible-config run needs the reference.
    futures['all_corrupt'] = pool.submit(_all_corrupt, lab, futures['corrupt_newest'])
    futures['incompatible'] = pool.submit(_incompatible, lab, out['reference'])
    for name, future in futures.items():
      try:
        out[name] = future.result()
      except Exception as e:  # pylint: disable=broad-except  (reported by the tests using it)
        out[name] = e
  return out


def _all_corrupt(lab, corrupt_newest_future):
  corrupt_newest_future.result()
  workdir = lab.base / 'corrupt_newest' / 'all_corrupt_workdir'
  for tmp in cu.checkpoint_dir(workdir).glob(f'*{cu.TMP_MARK}*'):
    shutil.rmtree(tmp)  # (The next start would remove it: not a change this test looks for.)
  for step in cu.step_folders(workdir):
    for path in cu.data_files(cu.checkpoint_dir(workdir) / str(step)):
      path.write_bytes(b'')
  before = cu.tree_digest(workdir)
  result = lab.runner.run(workdir, lab.args())
  return dict(result=result, workdir=workdir, before=before, after=cu.tree_digest(workdir))


def _incompatible(lab, reference):
  workdir = lab.base / 'incompatible' / 'workdir'
  shutil.copytree(reference['workdir'], workdir)
  before = cu.tree_digest(workdir)
  result = lab.runner.run(workdir, lab.args(model__hidden_sizes='(16,)'))
  return dict(result=result, workdir=workdir, before=before, after=cu.tree_digest(workdir))


def get(runs, name):
  value = runs[name]
  if isinstance(value, Exception):
    raise value
  return value


def assert_finished_like(run, reference):
  """The last start finished, and the run is bit-identical to the reference, step by step."""
  last = run['starts'][-1]['result']
  assert last.returncode == 0, last.explain()
  assert not last.has_traceback(), last.explain()
  assert cu.read_json(run['state']) == cu.read_json(reference['state'])
  summary = cu.read_json(run['workdir'] / 'summary.json')
  ref_summary = cu.read_json(reference['workdir'] / 'summary.json')
  assert summary['param_fingerprint'] == ref_summary['param_fingerprint']
  assert summary['steps'] == ref_summary['steps'] == cu.TOTAL_STEPS
  # Every step (the recomputed ones too: a later record of a step replaces an earlier one)
  # saw the same examples and gave the same loss.
  assert cu.compare_steps(cu.read_steps(reference['record']), cu.read_steps(run['record'])) == []


# --- 1. kill -9 anywhere, restart: bit-identical ---------------------------------------------

KILLS = ['kill_in_train_call', 'kill_after_save_returned', 'kill_tmp_created',
         'kill_before_commit', 'killed_twice']


def test_reference_run(runs):
  reference = get(runs, 'reference')
  result = reference['starts'][0]['result']
  assert result.returncode == 0, result.explain()
  steps = cu.read_steps(reference['record'])
  assert sorted(steps) == list(range(1, cu.TOTAL_STEPS + 1))
  # Each epoch sees every example once, in an order that changes from epoch to epoch.
  spe = cu.STEPS_PER_EPOCH
  epochs = [sum((steps[s]['index'] for s in range(e * spe + 1, (e + 1) * spe + 1)), [])
            for e in range(cu.NUM_EPOCHS)]
  for order in epochs:
    assert sorted(order) == list(range(cu.NUM_EXAMPLES))
  assert epochs[0] != epochs[1] != epochs[2]
  assert cu.step_folders(reference['workdir']) == [14, 15]


@pytest.mark.parametrize('name', KILLS)
def test_killed_run_resumes_bit_identical(runs, name):
  run, reference = get(runs, name), get(runs, 'reference')
  for before, after in zip(run['starts'], run['starts'][1:]):
    assert before['result'].killed, before['result'].explain()  # The fault did fire.
    # Each restart resumes from the newest checkpoint the killed run had finished (none
    # finished: it starts from scratch, as there is nothing to lose).
    assert after['result'].resumed_from() == max(before['steps'], default=None), (
        before['steps'], after['result'].stdout)
  assert_finished_like(run, reference)


def _starts_in_record(record):
  """The recorded steps, split where a restart went back to an earlier step."""
  runs_ = [[]]
  for line in record.read_text().splitlines():
    step = json.loads(line)['step']
    if runs_[-1] and step != runs_[-1][-1] + 1:
      runs_.append([])
    runs_[-1].append(step)
  return runs_


@pytest.mark.parametrize('name, resumed', [('kill_tmp_created', 4), ('kill_before_commit', 2)])
def test_restart_retrains_exactly_the_steps_after_its_checkpoint(runs, name, resumed):
  """Deterministic kill points: the restart resumes before step 5, so it re-trains across an
  epoch boundary (the next epoch's order is checked step by step by the test above)."""
  run = get(runs, name)
  assert run['starts'][1]['result'].resumed_from() == resumed
  first, restart = _starts_in_record(run['record'])
  assert first == list(range(1, first[-1] + 1)) and first[-1] > resumed
  assert restart == list(range(resumed + 1, cu.TOTAL_STEPS + 1))


@pytest.mark.parametrize('name', ['tfdata', 'seeds2', 'bn', 'nnx', 'knobs', 'sweep'])
def test_other_modes_resume_bit_identical(runs, name):
  run = get(runs, f'{name}_kill')
  assert run['starts'][0]['result'].killed
  assert run['starts'][1]['result'].resumed_from() == max(run['starts'][0]['steps'])
  assert_finished_like(run, get(runs, f'{name}_reference'))
  if name in ('seeds2', 'sweep'):
    summaries = [cu.read_json(get(runs, n)['workdir'] / 'summary.json')
                 for n in (f'{name}_kill', f'{name}_reference')]
    assert summaries[0]['param_fingerprint_per_replica'] == \
        summaries[1]['param_fingerprint_per_replica']


# --- 2. A crash mid-write leaves no half checkpoint that is restored, and no tmp folders ------

@pytest.mark.parametrize('name, half_step', [('kill_tmp_created', 5), ('kill_before_commit', 4)])
def test_half_written_checkpoint_is_never_restored(runs, name, half_step):
  run = get(runs, name)
  killed, restart = run['starts'][0], run['starts'][1]
  # The kill left the checkpoint half-written: a temporary folder, not a step.
  assert any(t.startswith(f'{half_step}.') for t in killed['tmp']), killed['tmp']
  assert half_step not in killed['steps']
  assert restart['result'].resumed_from() in killed['steps']
  assert restart['result'].resumed_from() < half_step


@pytest.mark.parametrize('name', KILLS + ['corrupt_newest', 'sigterm', 'tfdata_kill',
                                  'seeds2_kill', 'bn_kill', 'sweep_kill'])
def test_no_tmp_folders_after_the_next_start(runs, name):
  run = get(runs, name)
  assert run['starts'][-1]['tmp'] == []
  assert [p.name for p in cu.checkpoint_dir(run['workdir']).iterdir()
          if not p.name.isdigit()] == []  # Nothing but step folders.


# --- 3. Corrupted checkpoints ----------------------------------------------------------------

def test_corrupt_newest_checkpoint_warns_and_resumes_from_an_older_one(runs):
  run = get(runs, 'corrupt_newest')
  killed, restart = run['starts']
  corrupted, older = killed['steps'][-1], killed['steps'][-2]
  out = restart['result'].stdout
  assert re.search(rf'checkpoint at step {corrupted}\b.*unreadable', out), out
  assert restart['result'].resumed_from() == older
  assert_finished_like(run, get(runs, 'reference'))
  # The unreadable one was moved out of the way (the resumed run saved that step again).
  aside = list((run['workdir'] / 'checkpoints.unreadable').iterdir())
  assert [p.name.split('-')[0] for p in aside] == [str(corrupted)]


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(runs):
  run = get(runs, 'all_corrupt')
  result = run['result']
  assert result.returncode == 1, result.explain()
  assert not result.has_traceback(), result.explain()
  errors_ = result.error_lines()
  assert len(errors_) == 1 and 'None of the checkpoints' in errors_[0], result.stderr
  for step in cu.step_folders(run['workdir']):
    assert f'checkpoint at step {step}' in result.stdout
  assert run['after'] == run['before']  # Nothing written, nothing removed: no fresh start.
  assert not (run['workdir'] / 'summary.json').exists()


def _tree(offset):
  return dict(w=jnp.arange(600.0).reshape(20, 30) + offset, b=jnp.full((40,), offset),
              step=jnp.asarray(offset, jnp.int32))


def _trunc(path, size=None):
  path.write_bytes(path.read_bytes()[:path.stat().st_size // 2 if size is None else size])


CORRUPTIONS = {
    'truncated_array_file': lambda s: _trunc(cu.data_files(s)[0]),
    'emptied_array_files': lambda s: [_trunc(p, 0) for p in cu.data_files(s)],
    'deleted_array_files': lambda s: [p.unlink() for p in cu.data_files(s)],
    'truncated_manifest': lambda s: [_trunc(p) for p in s.rglob('manifest.ocdbt')],
    'truncated_metadata': lambda s: _trunc(s / 'state' / '_METADATA'),
    'deleted_item_folder': lambda s: shutil.rmtree(s / 'state'),
}


@pytest.mark.parametrize('kind', CORRUPTIONS)
def test_checkpointer_skips_a_corrupt_newest_checkpoint(tmp_path, capsys, kind):
  directory = tmp_path / 'checkpoints'
  ckpt = checkpoint.Checkpointer(directory, keep=3, asynchronous=False)
  for step in (1, 2, 3):
    ckpt.save(step, _tree(step), {})
  ckpt.close()
  CORRUPTIONS[kind](directory / '3')

  ckpt = checkpoint.Checkpointer(directory, keep=3)
  restored, step = ckpt.restore_latest(_tree(0))
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, restored, _tree(2))
  assert 'checkpoint at step 3' in capsys.readouterr().out
  ckpt.save(3, _tree(3), {})  # The resumed run can save that step again...
  ckpt.wait()
  assert ckpt.steps() == [1, 2, 3]
  ckpt.close()
  ckpt = checkpoint.Checkpointer(directory, keep=3)
  restored, step = ckpt.restore_latest(_tree(0))
  ckpt.close()
  assert step == 3  # ...and it is the good one now.
  jax.tree.map(np.testing.assert_array_equal, restored, _tree(3))
  assert len(list((tmp_path / 'checkpoints.unreadable').iterdir())) == 1


def test_checkpointer_removes_unfinished_saves_even_when_it_never_saves(tmp_path):
  directory = tmp_path / 'checkpoints'
  ckpt = checkpoint.Checkpointer(directory, keep=2, asynchronous=False)
  ckpt.save(1, _tree(1), {})
  ckpt.close()
  (directory / '2.orbax-checkpoint-tmp' / 'state').mkdir(parents=True)  # As a kill leaves it.
  ckpt = checkpoint.Checkpointer(directory, keep=2)
  assert ckpt.restore_latest(_tree(0))[1] == 1
  ckpt.close()
  assert sorted(p.name for p in directory.iterdir()) == ['1']


def test_checkpointer_with_nothing_readable_raises_and_keeps_everything(tmp_path):
  directory = tmp_path / 'checkpoints'
  ckpt = checkpoint.Checkpointer(directory, keep=3, asynchronous=False)
  for step in (1, 2):
    ckpt.save(step, _tree(step), {})
  ckpt.close()
  for step in (1, 2):
    CORRUPTIONS['deleted_item_folder'](directory / str(step))
  before = cu.tree_digest(tmp_path)
  with pytest.raises(errors.UserError, match=r'None of the checkpoints .* \(steps \[1, 2\]\)'):
    checkpoint.Checkpointer(directory, keep=3).restore_latest(_tree(0))
  assert cu.tree_digest(tmp_path) == before


# --- 4. SIGTERM: save, exit 143, continue from exactly there ---------------------------------

def test_sigterm_saves_exits_143_and_resumes_from_that_step(runs):
  run = get(runs, 'sigterm')
  term, restart = run['starts']
  result = term['result']
  assert result.returncode == 143, result.explain()
  assert not result.has_traceback(), result.explain()
  # The 4th call ends at step 7 (calls: 1-2, 3-4, 5, 6-7): the state at step 7 was saved, and
  # the save had finished before the process exited.
  assert result.error_lines() == [
      f'error: SIGTERM: saved the checkpoint at step 7 in {run["workdir"] / "checkpoints"}; '
      'run again with the same --workdir to continue from it.']
  assert term['steps'][-1] == 7 and term['tmp'] == []
  assert restart['result'].resumed_from() == 7
  assert_finished_like(run, get(runs, 'reference'))


def test_resuming_mid_epoch_with_whole_epoch_calls_is_bit_identical(runs):
  """Steps 8-10 run as one call of 5 steps, the last 2 empty (guarded); epoch 3 unguarded."""
  run = get(runs, 'sigterm_then_whole_epochs')
  term, restart = run['starts']
  assert term['result'].returncode == 143, term['result'].explain()
  assert restart['result'].resumed_from() == 7
  assert_finished_like(run, get(runs, 'reference'))


def test_sigterm_at_an_epoch_end_keeps_the_epoch_metrics(runs):
  run, reference = get(runs, 'sigterm_epoch_end'), get(runs, 'reference')
  assert run['starts'][0]['result'].returncode == 143
  assert_finished_like(run, reference)  # The parameters are right...

  def metrics_by_epoch(workdir):
    keys = ('step', 'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy')
    return {r['epoch']: {k: r[k] for k in keys} for r in
            map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())}

  assert metrics_by_epoch(run['workdir']) == metrics_by_epoch(reference['workdir'])  # ...these not.


def test_sigterm_after_the_last_epoch_loses_nothing(runs):
  """The last checkpoint is finished, the summary written, one line and exit 143; the rerun
  trains no step again."""
  run = get(runs, 'sigterm_after_training')
  term, restart = run['starts']
  result = term['result']
  assert result.returncode == 143, result.explain()
  assert not result.has_traceback(), result.explain()
  [line] = result.error_lines()
  assert line.startswith('error: SIGTERM') and 'training is complete' in line, line
  assert term['steps'][-1] == cu.TOTAL_STEPS and term['tmp'] == []
  assert cu.read_json(run['workdir'] / 'summary.json')['steps'] == cu.TOTAL_STEPS
  assert restart['result'].returncode == 0, restart['result'].explain()
  assert_finished_like(run, get(runs, 'reference'))
  trained = [json.loads(l)['step'] for l in run['record'].read_text().splitlines()]
  assert sorted(trained) == list(range(1, cu.TOTAL_STEPS + 1))  # Each step trained once.


def test_sigterm_before_training_is_one_line(runs):
  run = get(runs, 'sigterm_in_setup')
  term = run['starts'][0]['result']
  assert term.returncode == 143, term.explain()
  assert not term.has_traceback(), term.explain()
  [line] = term.error_lines()
  assert line.startswith('error: SIGTERM') and 'run the same command again' in line.lower()
  assert run['starts'][0]['steps'] == []
  assert_finished_like(run, get(runs, 'reference'))


@pytest.mark.parametrize('name, signal_name, status', [('stream_sigterm', 'SIGTERM', 143),
                                                      ('stream_ctrl_c', 'SIGINT (Ctrl-C)', 130)])
def test_stream_mode_stops_on_a_signal_and_resumes_bit_identical(runs, name, signal_name,
                                                                 status):
  run = get(runs, name)
  stopped, restart = run['starts']
  result = stopped['result']
  assert result.returncode == status, result.explain()
  assert not result.has_traceback(), result.explain()
  assert result.error_lines() == [
      f'error: {signal_name}: saved the checkpoint at step 7 in '
      f'{run["workdir"] / "checkpoints"}; run again with the same --workdir to continue from it.']
  assert stopped['steps'][-1] == 7 and stopped['tmp'] == []
  assert restart['result'].resumed_from() == 7
  assert_finished_like(run, get(runs, 'stream_reference'))


def test_stream_mode_trains_as_device_mode_on_the_same_data(runs):
  stream, device = (cu.read_json(get(runs, n)['workdir'] / 'summary.json')
                    for n in ('stream_reference', 'stream_device'))
  assert (stream['input_mode'], device['input_mode']) == ('stream', 'device')
  assert stream['param_fingerprint'] == device['param_fingerprint']
  assert stream['test_accuracy'] == device['test_accuracy']
  assert cu.read_json(get(runs, 'stream_reference')['state']) == cu.read_json(
      get(runs, 'stream_device')['state'])


# --- 5. NaN / Inf: stop naming the metric and step; no checkpoint of the bad state -----------

def _restore_raw(workdir, step):
  return ocp.StandardCheckpointer().restore(cu.checkpoint_dir(workdir) / str(step) / 'state')


def _first_bad_step(record):
  steps = cu.read_steps(record)
  return min(s for s, r in steps.items()
             if not math.isfinite(r['loss']))


# nan_injected: the NaN parameters spoil step 6 (and 7). lr_explodes: step 1's update at a
# learning rate of 1e30 makes the parameters huge, so step 2's loss is NaN.
@pytest.mark.parametrize('name, bad', [('nan_injected', 6), ('lr_explodes', 2),
                                       ('stream_lr_explodes', 2)])
def test_non_finite_loss_stops_without_saving_it(runs, name, bad):
  run = get(runs, name)
  start = run['starts'][0]
  result = start['result']
  assert _first_bad_step(run['record']) == bad
  assert result.returncode == 1, result.explain()
  assert not result.has_traceback(), result.explain()
  [line] = result.error_lines()
  assert re.search(rf'error: (loss is|gradients are) .* at step {bad};', line), line
  assert not (run['workdir'] / 'summary.json').exists()
  # Only checkpoints from before the bad step (the last good ones), whole, and the newest
  # restores to finite values.
  assert all(step < bad for step in start['steps']), start['steps']
  assert start['tmp'] == []
  if name == 'nan_injected':
    assert start['steps'] == [4, 5]
  if start['steps']:
    restored = _restore_raw(run['workdir'], max(start['steps']))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored))
    assert int(np.asarray(restored['state']['step'])) == max(start['steps'])


def test_non_finite_loss_names_the_first_bad_step(runs):
  run = get(runs, 'nan_between_saves')
  result = run['starts'][0]['result']
  assert result.returncode == 1, result.explain()
  assert _first_bad_step(run['record']) == 3
  [line] = result.error_lines()
  assert 'at step 3;' in line, line


# --- 6. Config validation ---------------------------------------------------------------------

CLI_CASES = [  # (override, field named in the one error line)
    (dict(learning_rate='nan'), 'learning_rate'),
    (dict(batch_size=0), 'batch_size'),
    (dict(optimizer_kwargs__decay=1.0), 'optimizer_kwargs.decay'),
    (dict(model__activation='nope'), 'model.activation'),
    (dict(dataset='no_such_dataset'), 'dataset'),
    (dict(loss='hinge'), 'loss'),
    (dict(metrics="('accuracy','top7')"), 'metrics'),
    (dict(augment='shift(2)|blur(3)'), 'augment'),
    (dict(augment='shift(-1)'), 'augment'),
    (dict(loss_kwargs__label_smoothing=1.5), 'loss_kwargs.label_smoothing'),
    (dict(weight_decay=-0.1), 'weight_decay'),
]


@pytest.fixture(scope='module')
def cli_results(lab):
  def run(i, override):
    workdir = lab.base / 'cli' / f'case{i}' / 'workdir'
    return lab.runner.run(workdir, lab.args(**override)), workdir

  def run_args(i, args):
    workdir = lab.base / 'cli' / f'extra{i}' / 'workdir'
    return lab.runner.run(workdir, args), workdir

  with concurrent.futures.ThreadPoolExecutor(PARALLEL) as pool:
    results = pool.map(lambda a: run(*a), enumerate(o for o, _ in CLI_CASES))
    extra = pool.map(lambda a: run_args(*a), enumerate([
        lab.args(learnin_rate=0.1),  # A misspelled field.
        ['--config=configs/no_such_config.py'] + lab.args()[1:],  # A config file not there.
    ]))
    return list(results) + list(extra)


@pytest.mark.parametrize('i', range(len(CLI_CASES)),
                         ids=[f'{k}={v}' for o, _ in CLI_CASES for k, v in o.items()])
def test_bad_config_is_one_line_exit_2_before_anything_is_written(cli_results, i):
  result, workdir = cli_results[i]
  field = CLI_CASES[i][1]
  assert result.returncode == 2, result.explain()
  assert not result.has_traceback(), result.explain()
  [line] = result.error_lines()
  assert f'config.{field}' in line and ('expected' in line or 'use a name' in line), line
  assert not workdir.exists()  # Refused before any data was loaded or anything written.


def test_misspelled_config_field_is_one_line_exit_2(cli_results):
  result, workdir = cli_results[len(CLI_CASES)]
  assert result.returncode == 2, result.explain()
  assert not result.has_traceback(), result.explain()
  [line] = result.error_lines()
  assert 'learnin_rate' in line and 'learning_rate' in line, line
  assert not workdir.exists()


def test_missing_config_file_is_one_line_exit_2(cli_results):
  result, workdir = cli_results[len(CLI_CASES) + 1]
  assert result.returncode == 2, result.explain()
  assert not result.has_traceback(), result.explain()
  [line] = result.error_lines()
  assert 'no_such_config.py' in line, line
  assert not workdir.exists()


IN_PROCESS_CASES = [  # Not already in test_validation.py.
    ('learning_rate', -math.inf), ('learning_rate', -1e-3), ('batch_size', -1),
    ('num_epochs', -3), ('optimizer_kwargs.decay', -0.1), ('optimizer_kwargs.eps', 0.0),
    ('optimizer_kwargs.eps', math.nan), ('optimizer', 'adamm'), ('model.name', 'mlpp'),
    ('model.activation', 'rellu'),
]


@pytest.mark.parametrize('path, value', IN_PROCESS_CASES,
                         ids=[f'{p}={v}' for p, v in IN_PROCESS_CASES])
def test_bad_value_is_a_config_error_naming_the_field(mlp_config, path, value):
  *parents, leaf = path.split('.')
  node = mlp_config
  for key in parents:
    node = node[key]
  node[leaf] = value
  with pytest.raises(errors.ConfigError) as info:
    validation.validate(mlp_config)
  message = str(info.value)
  assert message.startswith(f'config.{path}=') and 'expected' in message
  assert '\n' not in message and info.value.exit_code == 2


def test_optimizer_kwargs_the_optimizer_does_not_take_are_a_config_error(mlp_config):
  mlp_config.optimizer = 'sgd'
  with pytest.raises(errors.ConfigError, match=r'config\.optimizer_kwargs'):
    validation.validate(mlp_config)


# --- 7. A workdir of another config: a clear error, nothing overwritten -----------------------

def test_incompatible_checkpoints_are_refused_and_left_alone(runs):
  run = get(runs, 'incompatible')
  result = run['result']
  assert result.returncode == 1, result.explain()
  assert not result.has_traceback(), result.explain()
  [line] = result.error_lines()
  assert 'another run' in line and 'model.hidden_sizes: saved [8], now [16]' in line, line
  assert run['after'] == run['before']  # Checkpoints, config.json, metrics, summary: untouched.


def test_checkpointer_refuses_another_optimizer_state(tmp_path):
  directory = tmp_path / 'checkpoints'
  ckpt = checkpoint.Checkpointer(directory, keep=2, asynchronous=False)
  ckpt.save(1, dict(params=_tree(1), opt=dict(nu=_tree(1))), {})
  ckpt.close()
  before = cu.tree_digest(tmp_path)
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match='another model or optimizer'):
    checkpoint.Checkpointer(directory, keep=2).restore_latest(
        dict(params=_tree(0), opt=dict(mu=_tree(0), nu=_tree(0))))
  assert cu.tree_digest(tmp_path) == before


# --- 8. Versions in summary.json (same-config determinism: tests/unit/test_train.py) ---------------

def test_summary_records_library_and_device_versions(runs):
  summary = cu.read_json(get(runs, 'reference')['workdir'] / 'summary.json')
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  versions = summary['versions']
  assert versions['jax'] == jax.__version__ and versions['jaxlib'] == jaxlib.__version__
  assert versions['flax'] == flax.__version__ and versions['optax'] == optax.__version__
  assert versions['device'] == jax.devices('cpu')[0].device_kind and versions['backend'] == 'cpu'


# --- 9. Disk use: exactly K step folders at the end -------------------------------------------

@pytest.mark.parametrize('name, keep', [('reference', 2), ('kill_in_train_call', 2),
                                        ('killed_twice', 2), ('corrupt_newest', 2),
                                        ('sigterm', 3)])
def test_exactly_keep_checkpoints_remain(runs, name, keep):
  workdir = get(runs, name)['workdir']
  assert len(cu.step_folders(workdir)) == keep
  assert cu.step_folders(workdir)[-1] == cu.TOTAL_STEPS
  assert sorted(p.name for p in cu.checkpoint_dir(workdir).iterdir()) == sorted(
      str(s) for s in cu.step_folders(workdir))
