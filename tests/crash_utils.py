"""Crash-safety helpers: run `run.py` in a child process on TFDS mock data, with faults injected.

A run is `python run.py --config=configs/mlp.py ...` in a separate process (the MOCK_WRAPPER idea of
test_run_cli.py: run.py executed with `runpy` inside `tfds.testing.mock_data`), so a SIGKILL or a
SIGTERM hits a real process and its exit status is what a shell would see. Importing TensorFlow,
TFDS, JAX and Orbax costs 5-10 s per process on a small machine, so the processes are forked from
a multiprocessing fork server that imported them once; each child then starts JAX's backend,
compiles and trains on its own, exactly as a fresh `python run.py` would.

What a child can do besides running run.py (all by wrapping functions in the child only):
  * record every real train step to a JSON-lines file, flushed after each call: the global step,
    its loss, and the example indices of its batch (the data order);
  * write fingerprints of the final TrainState (params, optimizer state, step, RNG) to a file;
  * keep its own record of how it ended (`Result.child_log`, runNNN.child in the log folder):
    a fault it fires at itself, run.py's SystemExit or exception with its last frames, the stack
    of every os._exit (the last one carries the exit status the parent should see), and
    faulthandler's dump of every thread on a fatal signal, or on a timeout (`Child.wait`);
  * inject faults (`Fault`): SIGKILL or SIGTERM itself at the Nth train call, before or right
    after the Nth `Checkpointer.save` (the asynchronous write still in flight), inside Orbax's
    write path (its temporary folder just created, or fully written but not yet renamed into
    place), or poison the parameters with NaN before the Nth train call.

Used by tests/system/test_crash_safety.py and tests/stress_resume.py.
"""

import atexit
import contextlib
import dataclasses
import faulthandler
import hashlib
import itertools
import json
import multiprocessing
from multiprocessing import connection
from multiprocessing import context
from multiprocessing import forkserver
from multiprocessing import popen_forkserver
import os
import pathlib
import re
import runpy
import signal
import sys
import threading
import time
import traceback
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# The tiny job every crash test runs: 36 mock examples in batches of 8 are 5 steps an epoch (the
# last batch holds 4 real examples), 15 steps in 3 epochs; calls of 2 steps, so every epoch ends
# with a padded call, and the calls after a mid-epoch restart are not aligned like the original's.
NUM_EXAMPLES = 36
BATCH_SIZE = 8
NUM_EPOCHS = 3
STEPS_PER_EPOCH = -(-NUM_EXAMPLES // BATCH_SIZE)  # 5
TOTAL_STEPS = NUM_EPOCHS * STEPS_PER_EPOCH  # 15
KEEP = 2
CONFIG = {
    'model.hidden_sizes': '(8,)',
    'batch_size': BATCH_SIZE,
    'eval_batch_size': 12,
    'num_epochs': NUM_EPOCHS,
    'steps_per_call': 2,
    'checkpoint_every_steps': 2,
    'checkpoint_keep': KEEP,
    'input_mode': 'device',
    'download': False,
    'write_report': False,
    'write_tensorboard': False,
}
# A run of the tiny job takes 2-15 s on an idle 2-core machine (the first compiles), and was seen
# to take over 100 s while other test suites shared the machine; only a hang should take this long.
TIMEOUT_S = 600
TMP_MARK = 'tmp'  # Orbax names an unfinished checkpoint '<step>.orbax-checkpoint-tmp'.

_PRELOAD = ['tensorflow', 'tensorflow_datasets', 'jax', 'optax', 'flax.linen', 'orbax.checkpoint',
            'ml_collections.config_flags', 'absl.app', 'mnist_jax.train', 'crash_utils']


# The same tiny job with every seam of configs/cnn_bn.py: BatchNorm (batch_stats in the model
# state), dropout, augmentation, label smoothing, AdamW with warmup, cosine decay and clipping.
CNN_BN = dict(config='cnn_bn', model__features='(4,)', warmup_steps=3)
# The CNN in Flax NNX (models/cnn_nnx.py), with dropout: the NNX adapter's state through a kill.
NNX = dict(config='cnn_nnx', model__features='(4,)', model__dropout_rate=0.3)
# The knobs: an EMA (in the fingerprint), gradient accumulation and float16 (its loss scale
# in the fingerprint too), on the BatchNorm CNN.
KNOBS = dict(config='cnn_bn', model__features='(4,)', ema_decay=0.9, grad_accum_steps=2,
             compute_dtype='float16')
# A sweep: two learning rates x two seeds, four replicas in one program.
SWEEP = dict(sweep__learning_rate='(1e-3,3e-3)', num_seeds=2)


def config_args(cache_dir: str | os.PathLike = 'none', config: str = 'mlp',
                **overrides) -> list[str]:
  """run.py flags for the tiny job of configs/<config>.py; `overrides` are more config fields
  (dots as '__')."""
  fields = dict(CONFIG, cache_dir=str(cache_dir), **{k.replace('__', '.'): v
                                                     for k, v in overrides.items()})
  path = REPO_ROOT / 'configs' / f'{config}.py'
  return [f'--config={path}'] + [f'--config.{k}={v}' for k, v in fields.items()]


@dataclasses.dataclass(frozen=True)
class Fault:
  """Where the child hurts itself, and how.

  at: 'train_call' (after the nth train call returned), 'before_train_call', 'save' (before the
      nth Checkpointer.save), 'saved' (right after the nth save returned, its asynchronous write
      in flight), 'tmp_created' (inside Orbax: the nth checkpoint's temporary folder was just
      created, no array written yet), 'before_commit' (inside Orbax: the nth checkpoint is
      written into its temporary folder and about to be renamed into place), 'close' (before
      the Checkpointer is closed, after the epochs: the last save may be in flight), 'setup'
      (before train.setup: nothing loaded yet).
  n: 1-based count of such events in this process.
  do: 'KILL' (SIGKILL), 'TERM' (SIGTERM, as a preemption notice), 'INT' (SIGINT, as Ctrl-C),
      'NAN' (NaN parameters; only with at='before_train_call') or 'WAIT' (pause until the file
      `release` exists: another process can act while this one is mid-run).
  """
  at: str
  n: int
  do: str = 'KILL'
  release: str = ''

  def __post_init__(self):
    if self.at not in AT or self.do not in DO or self.n < 1 or (
        (self.do == 'NAN') != (self.at == 'before_train_call')) or (
            (self.do == 'WAIT') != bool(self.release)):
      raise ValueError(f'not a fault: {self}')

  def describe(self) -> str:
    return f'{self.do}@{self.at}#{self.n}'


AT = ('train_call', 'before_train_call', 'save', 'saved', 'tmp_created', 'before_commit',
      'close', 'setup')
DO = ('KILL', 'TERM', 'INT', 'NAN', 'WAIT')
WAITING_MARK = '.waiting'  # `<release>.waiting` exists while a WAIT fault holds its process.


@dataclasses.dataclass
class Result:
  returncode: int
  stdout: str
  stderr: str
  seconds: float
  child_log: str = ''  # The child's own record of how it ended (see _child_main).

  @property
  def killed(self) -> bool:
    return self.returncode == -signal.SIGKILL

  def resumed_from(self) -> int | None:
    match = re.search(r'resumed from the checkpoint at step (\d+)', self.stdout)
    return int(match.group(1)) if match else None

  def error_lines(self) -> list[str]:
    return [line for line in self.stderr.splitlines() if line.startswith('error:')]

  def has_traceback(self) -> bool:
    return 'Traceback' in self.stdout or 'Traceback' in self.stderr

  def explain(self) -> str:
    return (f'exit {self.returncode} after {self.seconds:.1f}s\n--- stdout ---\n'
            f'{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-5000:]}\n'
            f'--- the child\'s own record ---\n{self.child_log[-5000:]}')


class StatusLost(RuntimeError):
  """The fork server never sent a child's exit status (multiprocessing would report 255)."""


class _Popen(popen_forkserver.Popen):
  """multiprocessing's fork-server Popen, with its exit status read once, under a lock.

  CPython's `Popen.poll` (3.11 to 3.14, https://github.com/python/cpython/issues/130895) reads
  the status from the fork server's pipe without a lock. Two threads polling one child (one in
  `join`, the other in `Process.start`, which first polls every live child) can both find the
  pipe readable; one reads the status, the other then reads end-of-file, and sets
  `returncode = 255` over the real status or before it: a SIGKILLed or exit-2 child reported
  as exit 255. Here the second poller finds the status the first one read; and a status that
  never came (the fork server died) is marked `status_lost`, for `Child.wait` to raise.
  """

  def __init__(self, process_obj):
    self._status_lock = threading.Lock()
    self.status_lost = False
    super().__init__(process_obj)

  def poll(self, flag=os.WNOHANG):
    if self.returncode is None:
      if not connection.wait([self.sentinel], 0 if flag == os.WNOHANG else None):
        return None
      with self._status_lock:  # The pipe is readable: the read cannot block.
        if self.returncode is None:
          try:
            self.returncode = forkserver.read_signed(self.sentinel)
          except (OSError, EOFError):
            self.status_lost = True
            self.returncode = 255  # What multiprocessing says; Child.wait raises StatusLost.
    return self.returncode


class _Process(context.ForkServerProcess):

  @staticmethod
  def _Popen(process_obj):
    return _Popen(process_obj)

  @property
  def status_lost(self) -> bool:
    return self._popen is not None and self._popen.status_lost


class Runner:
  """Starts run.py children from a fork server that already imported the heavy libraries.

  Safe to use from several threads (test_crash_safety.py starts its runs two at a time).
  """

  def __init__(self, log_dir: str | os.PathLike, env: dict[str, str] | None = None):
    """`env`: variables set in every child. The fork server is one per test process and keeps
    the environment it started with, so a test cannot rely on os.environ reaching it."""
    self.log_dir = pathlib.Path(log_dir)
    self.env = dict(env or {})
    self.log_dir.mkdir(parents=True, exist_ok=True)
    self._ctx = multiprocessing.get_context('forkserver')
    tests_dir = str(pathlib.Path(__file__).resolve().parent)
    if tests_dir not in sys.path:  # The fork server imports crash_utils from sys.path.
      sys.path.insert(0, tests_dir)
    self._ctx.set_forkserver_preload(_PRELOAD)
    self._ids = itertools.count(1)  # next() is atomic: two threads never get the same logs.

  def start(self, workdir, args, *, faults=(), record=None, state_file=None,
            num_examples: int = NUM_EXAMPLES, script=REPO_ROOT / 'run.py') -> 'Child':
    logs = self.log_dir / f'run{next(self._ids):03d}'
    for path in (record, state_file):
      if path:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    spec = dict(workdir=str(workdir) if workdir else None, args=list(args), env=self.env,
                faults=[dataclasses.asdict(f) for f in faults],
                record=str(record) if record else None,
                state_file=str(state_file) if state_file else None,
                num_examples=num_examples, script=str(script), stdout=f'{logs}.out',
                stderr=f'{logs}.err', child_log=f'{logs}.child')
    process = _Process(target=_child_main, args=(spec,), daemon=True)
    process.start()
    return Child(process, spec)

  def run(self, workdir, args, *, timeout: float = TIMEOUT_S, kill_after: float | None = None,
          **kwargs) -> Result:
    return self.start(workdir, args, **kwargs).wait(timeout, kill_after=kill_after)


class Child:

  def __init__(self, process, spec):
    self.process, self.spec, self._start = process, spec, time.perf_counter()

  def wait(self, timeout: float = TIMEOUT_S, *, kill_after: float | None = None) -> Result:
    """Waits for the child; `kill_after` seconds after its start, SIGKILLs it from outside."""
    if kill_after is not None:
      self.process.join(max(0.0, kill_after - (time.perf_counter() - self._start)))
      if self.process.exitcode is None:
        os.kill(self.process.pid, signal.SIGKILL)
    self.process.join(timeout)
    if self.process.exitcode is None:
      record_before, stacks = self._dump_stacks()
      self.process.kill()
      self.process.join()
      # The stacks in full: a JAX process has many threads, and a tail of the record could cut
      # off the header and the frames that say where run.py was.
      raise TimeoutError(f'run.py child did not finish in {timeout}s: {self.spec}\n'
                         f'{self._logs(record_before)}\n--- its threads when it timed out '
                         f'(faulthandler) ---\n{stacks}')
    if self.process.status_lost:
      raise StatusLost(f'the fork server never sent the exit status of run.py child '
                       f'{self.process.pid}: {self.spec}\n{self._logs()}')
    return Result(self.process.exitcode, _read(self.spec['stdout']), _read(self.spec['stderr']),
                  time.perf_counter() - self._start, _read(self.spec['child_log']))

  def _dump_stacks(self) -> tuple[str, str]:
    """Has the child's faulthandler write every thread's stack into its record (SIGUSR1);
    returns the record before the dump, and the dump."""
    def size():
      return len(_read(self.spec['child_log']))

    before = size()
    with contextlib.suppress(ProcessLookupError):
      os.kill(self.process.pid, signal.SIGUSR1)
    deadline, last = time.monotonic() + 5, before
    while time.monotonic() < deadline:  # Until the dump has begun and stopped growing.
      time.sleep(0.2)
      now = size()
      if last > before and now == last:
        break
      last = now
    record = _read(self.spec['child_log'])
    return record[:before], record[before:]

  def _logs(self, record: str | None = None) -> str:
    record = _read(self.spec['child_log']) if record is None else record
    return (f'--- stdout ---\n{_read(self.spec["stdout"])[-3000:]}\n--- stderr ---\n'
            f'{_read(self.spec["stderr"])[-3000:]}\n--- the child\'s own record ---\n'
            f'{record[-5000:]}')


def _read(path) -> str:
  try:
    return pathlib.Path(path).read_text(errors='replace')
  except FileNotFoundError:
    return ''


# --- Inside the child ---------------------------------------------------------------------

def _child_main(spec: dict) -> None:
  """Runs run.py; writes to spec['child_log'] how the child ends.

  The record: a fault the child fires at itself; how run.py ended (SystemExit and its code, or an
  exception, with the last frames); the stack of every `os._exit` (the fork server's final one
  gives the exit status the parent should see); and faulthandler's dump of every thread on a
  fatal signal (SIGSEGV, SIGABRT, ...) or on SIGUSR1 (what Child.wait sends on a timeout).
  """
  os.environ.update(spec['env'])
  for fd, path in ((1, spec['stdout']), (2, spec['stderr'])):
    with open(path, 'w') as f:
      os.dup2(f.fileno(), fd)
  sys.stdout.reconfigure(line_buffering=True)
  sys.stderr.reconfigure(line_buffering=True)
  log = _ChildLog(spec['child_log'])
  faulthandler.enable(file=log.file, all_threads=True)
  faulthandler.register(signal.SIGUSR1, file=log.file, all_threads=True)
  _log_os_exit(log)
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')  # Bit-exact comparisons are made on the CPU.
  _install_hooks(spec, log)
  os.chdir(REPO_ROOT)
  argv = ['run.py', *spec['args']] + ([f'--workdir={spec["workdir"]}'] if spec['workdir'] else [])
  sys.argv = argv
  code = 0
  try:
    with tfds.testing.mock_data(num_examples=spec['num_examples']):
      runpy.run_path(spec['script'], run_name='__main__')
    log.write('run.py returned\n')
  except SystemExit as e:
    log.write(f'run.py ended: SystemExit({e.code!r}), raised at:\n'
              + ''.join(traceback.format_tb(e.__traceback__)[-3:]))
    code = 0 if e.code is None else e.code
    if not isinstance(code, int):  # As the interpreter ends sys.exit('text'): the text, and 1.
      print(code, file=sys.stderr)
      code = 1
  except BaseException as e:  # pylint: disable=broad-except
    log.write(f'run.py ended: {type(e).__name__}: {e}\n' + traceback.format_exc())
    traceback.print_exc()  # On stderr, as an uncaught exception is.
    code = 1
  finally:
    log.write('running the atexit functions\n')
    atexit._run_exitfuncs()  # pylint: disable=protected-access  (a forked child skips them)
    log.write('atexit functions done\n')
  # Ends as `python run.py` does (run.py's _exit: os._exit, no interpreter teardown). Returning
  # would join every thread at the fork server child's shutdown, and a failed save can leave an
  # Orbax thread blocked for good: one run of 10 in a row hung there after its one-line error.
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


class _ChildLog:
  """The child's own record; a write that fails (a full disk) is dropped, never raised."""

  def __init__(self, path: str):
    self.file = open(path, 'w', buffering=1)  # pylint: disable=consider-using-with

  def write(self, text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
      self.file.write(text)
      self.file.flush()


def _log_os_exit(log: _ChildLog) -> None:
  """Makes every os._exit in this process write its code and Python stack to `log` first."""
  real_exit = os._exit  # pylint: disable=protected-access

  def _exit(code):
    log.write(f'os._exit({code}), called from:\n')
    with contextlib.suppress(OSError, ValueError):
      faulthandler.dump_traceback(file=log.file, all_threads=False)
    real_exit(code)

  os._exit = _exit  # pylint: disable=protected-access


def _kill(how: str) -> None:
  sys.stdout.flush()
  os.kill(os.getpid(), {'KILL': signal.SIGKILL, 'TERM': signal.SIGTERM, 'INT': signal.SIGINT}[how])
  if how == 'KILL':
    time.sleep(60)  # Never reached.


def _wait_for(release: str, timeout_s: float = 120) -> None:
  """Signals that this process is waiting, then waits until `release` exists."""
  pathlib.Path(release + WAITING_MARK).write_text(str(os.getpid()))
  deadline = time.monotonic() + timeout_s
  while not pathlib.Path(release).exists() and time.monotonic() < deadline:
    time.sleep(0.05)


def wait_until_waiting(release, child: 'Child', timeout_s: float = 120) -> None:
  """In the test: until `child`'s WAIT fault holds it (it made `<release>.waiting`)."""
  deadline = time.monotonic() + timeout_s
  while not pathlib.Path(str(release) + WAITING_MARK).exists():
    if child.process.exitcode is not None or time.monotonic() > deadline:
      raise AssertionError(f'the child never waited on {release}:\n'
                           f'{child.wait(1).explain()}')
    time.sleep(0.05)


class _Faults:

  def __init__(self, faults: list[dict], log):
    self.faults = faults
    self.counts = {}
    self.log = log

  def hit(self, at: str) -> list[str]:
    """Counts an event; returns what the faults planned for it do (WAITs done already)."""
    self.counts[at] = self.counts.get(at, 0) + 1
    planned = [f for f in self.faults if f['at'] == at and f['n'] == self.counts[at]]
    for fault in planned:
      if fault['do'] == 'WAIT':
        _wait_for(fault['release'])
    return [f['do'] for f in planned if f['do'] != 'WAIT']

  def fire(self, at: str) -> None:
    for do in self.hit(at):
      self.log.write(f'fault: {do}@{at}#{self.counts[at]}\n')
      _kill(do)


def _install_hooks(spec: dict, log) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  from mnist_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from mnist_jax import executor  # pylint: disable=g-import-not-at-top
  from mnist_jax import writers  # pylint: disable=g-import-not-at-top
  from mnist_jax import train  # pylint: disable=g-import-not-at-top
  from mnist_jax.infra import storage  # pylint: disable=g-import-not-at-top

  faults = _Faults(spec['faults'], log)
  record = open(spec['record'], 'a') if spec['record'] else None

  original_train_call = executor.Executor.train_call

  def train_call(self, state, *args, **kwargs):
    nan = 'NAN' in faults.hit('before_train_call')
    # Before the call: the state is donated. (With config.num_seeds > 1 everything has a
    # leading replica axis; the replicas step together and replica 0 is recorded.)
    first = int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])
    if nan:
      state = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
    plan = next(a for a in reversed(args) if isinstance(a, dict))  # The chunk (its mask).
    mask = np.asarray(jax.device_get(plan['mask']))
    mask = mask.reshape(-1, *mask.shape[-2:])[0]
    index = None
    if 'index' in plan:
      index = np.asarray(jax.device_get(plan['index']))
      index = index.reshape(-1, *index.shape[-2:])[0]
    state, sums, per_step = original_train_call(self, state, *args, **kwargs)
    if record:
      loss = np.asarray(jax.device_get(per_step['loss'])).reshape(-1, len(mask))[0]
      step = first
      for k in range(len(mask)):
        if mask[k].any():  # Padded (empty) steps are no-ops and not steps.
          step += 1
          record.write(json.dumps(dict(
              step=step, loss=float(loss[k]),
              index=None if index is None else index[k][mask[k] > 0].tolist())) + '\n')
      record.flush()
    faults.fire('train_call')
    return state, sums, per_step

  executor.Executor.train_call = train_call

  original_save = checkpoint.Checkpointer.save

  def save(self, step, *args):
    faults.fire('save')
    original_save(self, step, *args)
    faults.fire('saved')

  checkpoint.Checkpointer.save = save

  original_close = checkpoint.Checkpointer.close

  def close(self):  # After the epochs, past the loop's signal handling: the last save's wait.
    faults.fire('close')
    original_close(self)

  checkpoint.Checkpointer.close = close

  original_setup = train.setup

  def setup(config):  # Before training: the data loads, the state is built.
    faults.fire('setup')
    return original_setup(config)

  train.setup = setup

  original_create = atomicity.AtomicRenameTemporaryPath.create
  original_finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def create(self):
    path = await original_create(self)
    if self.get_final().name.isdigit():  # The step folder (not an item folder inside it).
      faults.fire('tmp_created')
    return path

  async def finalize(self):
    if self.get_final().name.isdigit():
      faults.fire('before_commit')
    return await original_finalize(self)

  atomicity.AtomicRenameTemporaryPath.create = create
  atomicity.AtomicRenameTemporaryPath.finalize = finalize

  if spec['state_file']:
    train.AFTER_TRAINING.append(lambda state: storage.write_json_atomic(
        pathlib.Path(spec['state_file']), state_fingerprints(state)))


def state_fingerprints(state) -> dict[str, Any]:
  """sha256 of each part of a TrainState: equal iff bit-identical."""
  import jax  # pylint: disable=g-import-not-at-top
  from mnist_jax import writers  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  step = int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])
  return dict(step=step, params=writers.fingerprint(state.params, state.model_state),
              opt_state=writers.fingerprint(state.opt_state),
              rng=writers.fingerprint(jax.random.key_data(state.rng)
                                      if jax.dtypes.issubdtype(state.rng.dtype,
                                                               jax.dtypes.prng_key)
                                      else state.rng))


# --- Reading what a run left ---------------------------------------------------------------

def read_steps(path) -> dict[int, dict]:
  """The recorded train steps by global step; a step run again after a restart: the later wins."""
  steps = {}
  if pathlib.Path(path).exists():
    for line in pathlib.Path(path).read_text().splitlines():
      if line.strip():
        record = json.loads(line)
        steps[record['step']] = record
  return steps


def checkpoint_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / 'checkpoints'


def step_folders(workdir) -> list[int]:
  """Finished checkpoints, by folder name (what Orbax lists as steps)."""
  folder = checkpoint_dir(workdir)
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() \
      else []


def tmp_entries(workdir) -> list[str]:
  """Anything with 'tmp' in its name under the checkpoint folder, at any depth."""
  folder = checkpoint_dir(workdir)
  return sorted(str(p.relative_to(folder)) for p in folder.rglob('*')
                if TMP_MARK in p.name.lower()) if folder.exists() else []


def tree_digest(folder) -> dict[str, str]:
  """sha256 of every file under `folder`, by relative path; not the workdir's lock file,
  whose text every run that takes the lock rewrites with its pid and host."""
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob('*')) if p.is_file() and p.name != '.lock'}


def read_json(path) -> dict:
  return json.loads(pathlib.Path(path).read_text())


def compare_steps(reference: dict[int, dict], other: dict[int, dict]) -> list[str]:
  """Differences between two step records (all of the reference's steps must be there)."""
  problems = []
  for step in sorted(reference):
    if step not in other:
      problems.append(f'step {step}: missing')
      continue
    for key in ('index', 'loss'):
      if reference[step][key] != other[step][key]:
        problems.append(f'step {step}: {key} {other[step][key]!r} != reference '
                        f'{reference[step][key]!r}')
  problems += [f'step {s}: extra' for s in sorted(set(other) - set(reference))]
  return problems


def data_files(step_folder) -> list[pathlib.Path]:
  """The array data files of a checkpoint (OCDBT data blocks), largest first."""
  files = [p for p in pathlib.Path(step_folder).rglob('*')
           if p.is_file() and p.parent.name == 'd']
  return sorted(files, key=lambda p: -p.stat().st_size)
