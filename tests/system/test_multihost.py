"""Two processes, one run (`run.py --distributed` on 127.0.0.1, gloo): preemption and the lock.

A SIGTERM that reaches one process only becomes a decision both share at the same step: both
save that step together and exit 143 within seconds, and rerunning both continues to the
uninterrupted pair's parameters. Process 0 holds the workdir's lock for both: when another run
holds it, both processes stop with one line, having written nothing.
"""

import json
import signal
import time

import pytest

import parallel_utils
from mnist_jax.infra import workdir as workdir_lib

pytestmark = pytest.mark.slow

NUM_EXAMPLES = 400  # Per split (mock data): 25 steps an epoch at batch 16.
OVERRIDES = {'model.hidden_sizes': '(16,)', 'batch_size': 16, 'eval_batch_size': 40,
             'num_epochs': 6, 'steps_per_call': 1, 'input_mode': 'device',
             'write_report': False, 'write_tensorboard': False, 'download': False}
STEPS_PER_EPOCH = 25
SLOW_STOP_S = 3
TIMEOUT_S = 600  # Only a hang takes this long (a busy 2-core host: minutes).


def start_pair(root, name, workdir, slow_stop_s=(0, 0)):
  address = f'127.0.0.1:{parallel_utils.free_port()}'
  children = []
  for process_id in range(2):
    argv = ['--config=configs/mlp.py', f'--workdir={workdir}', '--distributed',
            f'--coordinator_address={address}', '--num_processes=2',
            f'--process_id={process_id}', f"--config.cache_dir={root / 'cache'}",
            *[f'--config.{k}={v}' for k, v in OVERRIDES.items()]]
    children.append(parallel_utils.start(
        f'{name}{process_id}', dict(out=str(root / 'out' / name), num_examples=NUM_EXAMPLES,
                                    jobs=[dict(name='run', argv=argv)],
                                    slow_stop_s=slow_stop_s[process_id]),
        parallel_utils.child_env(1, root / 'cache'), root / 'logs'))
  return children


def finish(children, timeout_s=TIMEOUT_S):
  deadline = time.monotonic() + timeout_s
  for child in children:
    try:
      child.process.wait(max(1.0, deadline - time.monotonic()))
    except Exception:  # pylint: disable=broad-except  (a timeout: kill all, show their logs)
      for c in children:
        c.process.kill()
      raise AssertionError('timed out\n' + '\n'.join(c.describe() for c in children))
  return [c.process.returncode for c in children]


def error_lines(child):
  return [l for l in child.log.splitlines() if l.startswith('error:')]


def summary(workdir):
  return json.loads((workdir / 'summary.json').read_text())


@pytest.fixture(scope='module')
def pairs(tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  out = dict(root=root)
  # The uninterrupted reference, and a pair facing a workdir this test process holds, at once.
  locked_workdir = root / 'locked'
  locked_workdir.mkdir()
  with workdir_lib.hold(locked_workdir):
    before = sorted(p.name for p in locked_workdir.iterdir())
    reference = start_pair(root, 'reference', root / 'reference')
    locked = start_pair(root, 'locked', locked_workdir)
    out['locked'] = dict(codes=finish(locked), children=locked, before=before,
                         after=sorted(p.name for p in locked_workdir.iterdir()))
  out['reference'] = dict(codes=finish(reference), children=reference,
                          workdir=root / 'reference')
  # SIGTERM to process 1 only, once epoch 1 is logged; then both again, to the end. Process 1
  # is also SLOW_STOP_S slower to stop than process 0 (as a host with a slower disk, or a busy
  # one): process 0 must not leave (taking the distributed runtime's service with it) before
  # process 1 is done.
  workdir = root / 'preempted'
  preempted = start_pair(root, 'preempted', workdir, slow_stop_s=(0, SLOW_STOP_S))
  deadline = time.monotonic() + TIMEOUT_S
  while not ((workdir / 'metrics.jsonl').exists() and (workdir / 'metrics.jsonl').read_text()):
    if time.monotonic() > deadline or any(c.process.poll() is not None for c in preempted):
      finish(preempted, 1)
      raise AssertionError('\n'.join(c.describe() for c in preempted))
    time.sleep(0.05)
  preempted[1].process.send_signal(signal.SIGTERM)
  signalled = time.monotonic()
  codes = finish(preempted)
  out['preempted'] = dict(codes=codes, children=preempted, seconds=time.monotonic() - signalled,
                          workdir=workdir,
                          lock=json.loads((workdir / workdir_lib.LOCK_NAME).read_text()))
  resumed = start_pair(root, 'resumed', workdir)
  out['resumed'] = dict(codes=finish(resumed), children=resumed, workdir=workdir)
  return out


def test_reference_pair_finishes(pairs):
  run = pairs['reference']
  assert run['codes'] == [0, 0], '\n'.join(c.describe() for c in run['children'])
  assert summary(run['workdir'])['steps'] == 6 * STEPS_PER_EPOCH


def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(pairs):
  run = pairs['preempted']
  assert run['codes'] == [143, 143], '\n'.join(c.describe() for c in run['children'])
  assert run['seconds'] < 30
  lines = [error_lines(c) for c in run['children']]
  assert lines[0] == lines[1] and len(lines[0]) == 1, lines
  step = int(lines[0][0].split('at step ')[1].split()[0])
  assert STEPS_PER_EPOCH <= step < 6 * STEPS_PER_EPOCH
  assert lines[0][0].startswith('error: SIGTERM: saved the checkpoint at step')
  for child in run['children']:
    # Gloo's one info line at start-up ('[Gloo] Rank 0 is connected to 1 peer ranks') is fine;
    # any other Gloo line is the collective failing as a process leaves.
    gloo = [l for l in child.log.splitlines() if 'Gloo' in l and 'is connected to' not in l]
    assert 'Traceback' not in child.log and not gloo, child.describe()


def test_rerunning_both_ends_as_the_uninterrupted_pair(pairs):
  run = pairs['resumed']
  assert run['codes'] == [0, 0], '\n'.join(c.describe() for c in run['children'])
  assert 'resumed from the checkpoint at step' in run['children'][0].log
  assert (summary(run['workdir'])['param_fingerprint']
          == summary(pairs['reference']['workdir'])['param_fingerprint'])


def test_process_0_holds_the_lock_for_both(pairs):
  assert pairs['preempted']['lock']['pid'] == pairs['preempted']['children'][0].process.pid
  run = pairs['locked']
  assert run['codes'] == [1, 1], '\n'.join(c.describe() for c in run['children'])
  zero, one = (error_lines(c) for c in run['children'])
  assert len(zero) == 1 and 'another run is using' in zero[0], zero
  assert len(one) == 1 and 'process 0 could not take its lock' in one[0], one
  assert run['after'] == run['before']  # Nothing written in the held workdir.
