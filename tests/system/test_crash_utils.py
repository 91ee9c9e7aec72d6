"""The crash-test harness itself (tests/crash_utils.py): a child's exit status is read right
when several threads wait at once, and a child keeps its own record of how it ended."""

import concurrent.futures
from multiprocessing import connection
import os
import threading

import pytest

import crash_utils as cu

pytestmark = pytest.mark.slow  # run.py children.


@pytest.fixture(scope='module')
def runner(tmp_path_factory):
  return cu.Runner(tmp_path_factory.mktemp('crash_utils') / 'logs')


def _ended_bad_config_child(runner, workdir):
  """A child that exits 2 (a config error), once it ended: its status is in the fork server's
  pipe, not read yet."""
  child = runner.start(workdir, cu.config_args(model__activation='nope'))
  assert connection.wait([child.process.sentinel], 120)
  return child


def test_two_threads_reading_one_childs_status_both_get_it(runner, tmp_path, monkeypatch):
  """As when one thread joins a child while another starts one (Process.start polls every live
  child). CPython's own poll gives the slower thread end-of-file here, hence 255 (gh-130895)."""
  child = _ended_bad_config_child(runner, tmp_path / 'workdir')
  both_ready = threading.Barrier(2)
  real_wait = connection.wait

  def wait(objects, timeout=None):  # Both threads find the pipe readable before either reads.
    ready = real_wait(objects, timeout)
    both_ready.wait(10)
    return ready

  monkeypatch.setattr(connection, 'wait', wait)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # A blocking and a non-blocking poll.
    poll = child.process._popen.poll  # pylint: disable=protected-access
    codes = list(pool.map(poll, [0, os.WNOHANG]))
  monkeypatch.undo()
  assert codes == [2, 2]
  result = child.wait()
  assert result.returncode == 2, result.explain()


def test_a_status_the_fork_server_never_sent_is_an_error_not_exit_255(runner, tmp_path):
  child = _ended_bad_config_child(runner, tmp_path / 'workdir')
  cu.forkserver.read_signed(child.process.sentinel)  # A stray reader takes the status.
  with pytest.raises(cu.StatusLost, match='never sent the exit status') as info:
    child.wait()
  assert 'os._exit(2)' in str(info.value)  # The child's own record: how it really ended.


def test_the_child_records_how_it_ended(runner, tmp_path):
  result = runner.run(tmp_path / 'workdir', cu.config_args(model__activation='nope'))
  assert result.returncode == 2, result.explain()
  log = result.child_log
  # run.py's SystemExit(2) with the frames it came from, then the atexit functions, then the
  # fork server's os._exit with the status the parent saw.
  ended = log.index('run.py ended: SystemExit(2), raised at:')
  assert 'in _exit' in log[ended:]
  assert ended < log.index('atexit functions done') < log.index('os._exit(2), called from:')
  assert 'multiprocessing/forkserver.py' in log[log.index('os._exit(2)'):]


def test_a_child_that_times_out_shows_where_it_was(runner, tmp_path):
  child = runner.start(tmp_path / 'workdir', cu.config_args(num_epochs=10_000))
  for _ in range(600):  # Until run.py has parsed its flags (at most a minute).
    if 'workdir:' in cu._read(child.spec['stdout']):  # pylint: disable=protected-access
      break
    child.process.join(0.1)
  with pytest.raises(TimeoutError, match='did not finish') as info:
    child.wait(timeout=0)
  message = str(info.value)
  assert '(most recent call first)' in message  # faulthandler's dump on SIGUSR1...
  assert f'File "{cu.REPO_ROOT / "run.py"}"' in message  # ...with run.py's frames.
  assert child.process.exitcode == -9


def _deep_then_wait(log_path: str, depth: int) -> None:
  """A child that registers faulthandler like run.py's children do, then waits `depth` frames
  down, so that its stack dump is longer than the record's tail that the logs show."""
  import faulthandler  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  log = open(log_path, 'w', buffering=1)  # pylint: disable=consider-using-with
  faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)

  def down(n):
    return down(n - 1) if n else time.sleep(600)
  down(depth)


def test_a_timed_out_childs_stacks_come_whole(tmp_path):
  """Run 9 of 10 in a row failed here: the dump was cut to the record's last 5000 characters, and
  a deep main thread (JAX compiling) lost its header and run.py's frames."""
  import multiprocessing  # pylint: disable=g-import-not-at-top
  spec = {k: str(tmp_path / k) for k in ('stdout', 'stderr', 'child_log')}
  # The fork server, as the harness's own children: a plain fork of this (JAX, threaded) process
  # draws JAX's fork warning.
  process = multiprocessing.get_context('forkserver').Process(
      target=_deep_then_wait, args=(spec['child_log'], 80), daemon=True)  # faulthandler: <= 100.
  process.start()
  for _ in range(100):  # Until the child has registered its handler.
    if os.path.exists(spec['child_log']):
      break
    process.join(0.05)
  child = cu.Child(process, spec)
  with pytest.raises(TimeoutError, match='did not finish') as info:
    child.wait(timeout=1)
  message = str(info.value)
  assert message.count('in down') == 81  # Every frame once: the dump is whole, and not twice.
  assert '(most recent call first)' in message and 'in _deep_then_wait' in message
  assert len(message.split('(most recent call first)')[1]) > 5000  # Longer than a tail.
  assert process.exitcode == -9


_LEAVES_A_THREAD_BLOCKED = """
import concurrent.futures, sys, threading
# As Orbax's save thread after a failed write on a full disk: it never finishes.
concurrent.futures.ThreadPoolExecutor(1).submit(threading.Event().wait)
print('error: no space left on device (the one line)', file=sys.stderr)
sys.exit(1)
"""


def test_a_child_ends_as_the_program_does_with_a_thread_left_blocked(runner, tmp_path):
  """Run 8 of 10 in a row hung for 600 s after run.py's one-line disk-full error: the fork
  server's child joined a blocked Orbax thread at its shutdown, which `python run.py` (os._exit)
  never does."""
  script = tmp_path / 'blocked.py'
  script.write_text(_LEAVES_A_THREAD_BLOCKED)
  result = runner.run(tmp_path / 'workdir', [], script=script, timeout=60)
  assert result.returncode == 1, result.explain()
  assert result.error_lines() == ['error: no space left on device (the one line)']
