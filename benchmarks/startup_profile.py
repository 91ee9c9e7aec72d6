r"""Where a warm `python run.py` process spends its time, start to exit. Prints a table and JSON.

  python benchmarks/startup_profile.py                       # configs/mlp.py, 3 rounds
  python benchmarks/startup_profile.py --rounds=5 --cache_dir=/tmp/h27/cache
  python benchmarks/startup_profile.py --keras_python=/tmp/keras-venv/bin/python \
      --json_out=benchmarks/results/cpu-startup.json       # and Keras 3 on JAX beside it
  git worktree add --detach /tmp/base 4ec1d53
  python benchmarks/startup_profile.py --baseline_repo=/tmp/base  # and an older commit's run.py

A warm run reuses the decoded data and the compiled programs (JAX's persistent compilation
cache) that an earlier run left in the cache: a first, untimed run in `--cache_dir` (default: a
fresh temporary folder) fills both, and a second, with `python -X importtime`, says which
packages the imports cost (self time, summed per top-level package, over the whole process:
matplotlib's is in the report). Then each round runs, in turn (the order reversed every other
round, so a host whose speed drifts slows both sides alike):

  * `python run.py --config=... --workdir=...` itself: wall time, and train_seconds and
    total_seconds from its summary.json;
  * the same command under a driver (this file, `--as_run_py`): run.py through runpy, with
    timers wrapped around the functions of mnist_jax it calls (monkeypatched; mnist_jax is not
    changed) and JAX's monitoring listeners on its compile steps, which splits the process's
    wall time into phases (below). Each instant counts once, for the innermost phase open then;
    the table's last line is the driver's own cost: its wall time against the plain run's;
  * with --keras_python (a Python with keras and jax, no TensorFlow needed), the Keras notebook
    on Keras 3's JAX backend (`KERAS_BACKEND=jax benchmarks/reference_keras.py`): wall time,
    fit seconds, test accuracy; and the ratio of run.py's wall time to it;
  * with --baseline_repo (another checkout, e.g. the commit before a change), its `python
    run.py`, in its own warm cache: wall time and train_seconds, and the ratio of the two
    overheads (wall time less train_seconds).

The phases: interpreter start (to the driver's first line), imports (run.py's module level,
less the config table its --help text builds), flags and the config file, JAX's backend start,
data (input_pipeline.load: TFDS's builder for the dataset's metadata and the cache key, then
the cache read), setup (model, optimizer, executor, the dataset put
on the device, less data and compiling), compile (tracing, lowering and XLA compile or
persistent-cache read, for every program, wherever it happens), train (the epoch loop, less
what is named here: its wait for the steps is in it), evaluation (Executor.evaluate, waited
for), checkpoints (opening Orbax's manager, restore, a save's blocking part, waits, close),
metrics writers (metrics.jsonl, TensorBoard, config.json), summary (summary.json, the
fingerprint), report (report.png and report.md: importing mnist_jax.report and matplotlib, the
test set's predictions, drawing and writing), other (run.py's main and absl's app.run, less
the above), exit (run.py's
os._exit to the process's end). Medians over the rounds, in seconds and as shares of the
process's wall time (the median of each round's share), and per program: its compile steps and
persistent-cache hits and misses (JAX's compiler log).

Works unchanged on a GPU or TPU (whatever JAX run.py finds; Keras on JAX too).
"""

import time

_T0 = time.time()  # The driver's first line: the interpreter has started.

import collections  # pylint: disable=g-import-not-at-top,g-bad-import-order
import functools
import importlib.abc
import json
import logging
import os
import pathlib
import re
import sys
import threading

REPO = pathlib.Path(__file__).resolve().parent.parent
_DRIVER = '--as_run_py'  # argv: startup_profile.py --as_run_py OUT.json <run.py's flags>

# The table's rows, in the order a run meets them.
PHASES = ('interpreter start', 'imports', 'config table (--help text)', 'flags and config',
          'JAX backend start', 'data: TFDS metadata', 'data (cache read)', 'setup', 'compile',
          'train', 'evaluation', 'checkpoint open/restore', 'checkpoint save',
          'checkpoint wait/close', 'metrics writers', 'summary', 'report: import (matplotlib)',
          'report: predictions', 'report: drawing, files', 'other', 'exit')
# JAX's compile steps (jax._src.dispatch), as the per-program table names them.
COMPILE_EVENTS = {'/jax/core/compile/jaxpr_trace_duration': 'trace',
                  '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower',
                  '/jax/core/compile/backend_compile_duration': 'compile_or_cache_read'}


# --- The driver: run.py, timed from inside -----------------------------------------------------


class _Timeline:
  """Intervals (phase, start, end, program) in time.time() seconds, as the wrappers saw them."""

  def __init__(self):
    self.intervals: list[list] = []  # [phase, start, end or None (open), program or None]
    self.programs = collections.defaultdict(lambda: collections.defaultdict(float))
    self.events = collections.Counter()
    self.durations = collections.defaultdict(float)
    self.missing: list[str] = []  # What mnist_jax no longer has: its time goes to the caller.
    self.background: list[list] = []  # Intervals timed on other threads.

  def wrap(self, phase: str, fn, block: bool = False):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
      interval = [phase, time.time(), None, None]
      if threading.current_thread() is not threading.main_thread():
        # Off the main thread (run.py's report import, while training): it overlaps the
        # phases, so it is reported apart ('background'), not as a share of the process.
        self.background.append(interval)
      else:
        self.intervals.append(interval)
      try:
        out = fn(*args, **kwargs)
        if block:  # Asynchronous dispatch: its caller would wait for it next (device_get).
          import jax  # pylint: disable=g-import-not-at-top
          jax.block_until_ready(out)
        return out
      finally:
        interval[2] = time.time()
    return timed

  def patch(self, owner, name: str, phase: str, block: bool = False) -> None:
    if not hasattr(owner, name):
      self.missing.append(f'{getattr(owner, "__name__", owner)}.{name}')
      return
    setattr(owner, name, self.wrap(phase, getattr(owner, name), block))

  # JAX's monitoring listeners.
  def on_span(self, event, start, end, **kwargs):
    if event in COMPILE_EVENTS:
      program = _program(str(kwargs.get('fun_name', '?')))
      self.intervals.append(['compile', start, end, program])
      self.programs[program][COMPILE_EVENTS[event] + '_s'] += end - start
      self.programs[program][COMPILE_EVENTS[event] + '_n'] += 1

  def on_event(self, event, **kwargs):
    del kwargs
    self.events[event] += 1

  def on_duration(self, event, seconds, **kwargs):
    del kwargs
    if event.startswith('/jax/compilation_cache/'):
      self.durations[event] += seconds


class _CacheLog(logging.Handler):
  """Per program, JAX's persistent compilation cache hits and misses (jax._src.compiler)."""

  def __init__(self, timeline: _Timeline):
    super().__init__(logging.DEBUG)
    self.timeline = timeline

  def emit(self, record):
    text = record.getMessage()
    for words, key in (('Persistent compilation cache hit for', 'cache_hits'),
                       ('PERSISTENT COMPILATION CACHE MISS for', 'cache_misses')):
      if text.startswith(words):
        self.timeline.programs[_program(text.split("'")[1])][key] += 1


def _program(name: str) -> str:
  """One name per jitted function: JAX's steps say 'train', 'jit(train)' and 'jit_train'."""
  return re.sub(r'^jit\((.*)\)$|^jit_(.*)$', lambda m: m[1] or m[2], name)


class _AfterImport(importlib.abc.MetaPathFinder):
  """Calls hooks[name](module) once the module `name` has been imported (its code run), and
  times the import of the modules in `timed` (phase by name: its code, and what it imports)."""

  def __init__(self, hooks: dict, timed: dict, timeline: '_Timeline'):
    self.hooks, self.timed, self.timeline = hooks, timed, timeline

  def find_spec(self, name, path, target=None):
    if name not in self.hooks and name not in self.timed:
      return None
    for finder in sys.meta_path:
      if finder is self or not hasattr(finder, 'find_spec'):
        continue
      spec = finder.find_spec(name, path, target)
      if spec is not None and spec.loader is not None:
        run_module, hook = spec.loader.exec_module, self.hooks.pop(name, lambda module: None)
        if name in self.timed:
          run_module = self.timeline.wrap(self.timed.pop(name), run_module)

        def exec_module(module):
          run_module(module)
          hook(module)
        spec.loader.exec_module = exec_module
        return spec
    return None


def _listen(timeline: _Timeline, jax_module) -> None:
  del jax_module
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  monitoring.register_event_time_span_listener(timeline.on_span)
  monitoring.register_event_listener(timeline.on_event)
  monitoring.register_event_duration_secs_listener(timeline.on_duration)
  compiler_log = logging.getLogger('jax._src.compiler')
  compiler_log.setLevel(logging.DEBUG)  # Its hit/miss lines are DEBUG; only this handler sees
  compiler_log.propagate = False  # them (and its warnings: none in a healthy run).
  compiler_log.addHandler(_CacheLog(timeline))


def _patch_mnist_jax(timeline: _Timeline, run_globals: dict) -> None:
  """Timers around what run.py's training calls; all imported by now."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  from mnist_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from mnist_jax import executor
  from mnist_jax import input_pipeline
  from mnist_jax import steps
  from mnist_jax import train
  from mnist_jax import writers
  from mnist_jax.infra import workdir
  patch = timeline.patch
  patch(xla_bridge, '_init_backend', 'JAX backend start')
  patch(input_pipeline, 'load', 'data (cache read)')
  patch(input_pipeline, '_builder', 'data: TFDS metadata')  # tfds.builder: the dataset's info,
  # ... or, warm, the builder read from its folder (input_pipeline._builder_as_before).
  patch(input_pipeline, '_builder_as_before', 'data: TFDS metadata')
  patch(input_pipeline, '_cache_key', 'data: TFDS metadata')  # its files' names for the key.
  patch(train, 'setup', 'setup')
  patch(executor.Executor, 'evaluate', 'evaluation', block=True)
  patch(train, '_restore', 'checkpoint open/restore')
  patch(checkpoint.Checkpointer, '__init__', 'checkpoint open/restore')
  patch(checkpoint.Checkpointer, 'save', 'checkpoint save')  # Its wait: 'wait' (innermost).
  patch(checkpoint.Checkpointer, 'wait', 'checkpoint wait/close')
  patch(checkpoint.Checkpointer, 'close', 'checkpoint wait/close')
  for name in ('__init__', 'write', 'close'):
    patch(writers.MetricLogger, name, 'metrics writers')
  patch(workdir, 'prepare', 'metrics writers')
  patch(train, '_write_header', 'metrics writers')
  patch(train, '_finish', 'summary')
  patch(train, '_write_report', 'report: drawing, files')  # Less its import, predictions.
  patch(steps, 'predict', 'report: predictions')
  # run.py took train_and_evaluate into its MODES table when it was imported.
  run_globals['MODES']['train'] = timeline.wrap('train', run_globals['MODES']['train'])


def _drive() -> None:
  out, run_py = pathlib.Path(sys.argv[2]), REPO / 'run.py'
  timeline = _Timeline()
  timeline.intervals.append(['imports', _T0, None, None])
  sys.meta_path.insert(0, _AfterImport(
      {'jax': functools.partial(_listen, timeline),
       'mnist_jax.config_doc': lambda m: timeline.patch(m, 'text_table',
                                                        'config table (--help text)')},
      {'mnist_jax.report': 'report: import (matplotlib)'}, timeline))
  from absl import app  # pylint: disable=g-import-not-at-top  (run.py's first import)
  run_app = app.run

  def timed_app_run(main, *args, flags_parser=None, **kwargs):
    timeline.intervals[0][2] = time.time()  # run.py's module level is done.
    run_globals = sys._getframe(1).f_globals  # pylint: disable=protected-access
    _patch_mnist_jax(timeline, run_globals)
    run_exit = run_globals['_exit']

    def timed_exit(code, agreed=False):
      end = time.time()
      for interval in timeline.intervals + timeline.background:
        interval[2] = end if interval[2] is None else interval[2]
      import jax  # pylint: disable=g-import-not-at-top
      out.write_text(json.dumps(dict(
          start=_T0, exit=end, exit_code=code, intervals=timeline.intervals,
          programs=timeline.programs, events=timeline.events, durations=timeline.durations,
          unpatched=timeline.missing,
          background={name: sum(end - start for n, start, end, _ in timeline.background
                                if n == name)
                      for name in {i[0] for i in timeline.background}},
          backend=jax.default_backend(), device=jax.devices()[0].device_kind)))
      run_exit(code, agreed)

    run_globals['_exit'] = timed_exit
    main = timeline.wrap('other', main)  # run.py's main, less what it calls that is named.
    flags_parser = timeline.wrap('flags and config', flags_parser)
    timeline.intervals.append(['other', time.time(), None, None])  # absl's app.run itself.
    return run_app(main, *args, flags_parser=flags_parser, **kwargs)

  app.run = timed_app_run
  sys.argv = [str(run_py), *sys.argv[3:]]
  # run.py leaves through os._exit (no interpreter teardown) only when it is the program.
  sys.orig_argv[1:2] = [str(run_py)]
  sys.path[0] = str(REPO)  # As `python run.py` has it.
  import runpy  # pylint: disable=g-import-not-at-top
  runpy.run_path(str(run_py), run_name='__main__')
  raise SystemExit('run.py returned without calling its _exit')


def _phases(profile: dict, spawned: float, ended: float) -> dict[str, float]:
  """Seconds per phase: each instant of the process counted once, for the innermost interval
  open then (the latest started); before the driver's first line, and after run.py's exit."""
  intervals = [(name, start, end) for name, start, end, _ in profile['intervals']]
  cuts = sorted({t for _, start, end in intervals for t in (start, end)})
  seconds = collections.defaultdict(float)
  for a, b in zip(cuts, cuts[1:]):
    open_ = [(start, -end, i) for i, (_, start, end) in enumerate(intervals)
             if start <= a and end >= b]
    name = intervals[max(open_)[2]][0] if open_ else 'other'
    seconds[name] += b - a
  seconds['interpreter start'] += profile['start'] - spawned
  seconds['exit'] += ended - profile['exit']
  return {name: seconds.get(name, 0.0) for name in PHASES}


# --- The benchmark: processes, timed from outside ---------------------------------------------

if __name__ == '__main__' and sys.argv[1:2] == [_DRIVER]:
  _drive()  # Never returns: run.py exits the process.

import platform  # pylint: disable=g-import-not-at-top,g-bad-import-order
import shutil
import statistics
import subprocess
import tempfile

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

flags.DEFINE_string('config', str(REPO / 'configs' / 'mlp.py'), 'Config file to run.')
flags.DEFINE_integer('rounds', 3, 'Rounds; each runs every side once.')
flags.DEFINE_string('cache_dir', '', "MNIST_JAX_CACHE for every run ('': a fresh temporary "
                    'folder, filled by a first untimed run).')
flags.DEFINE_string('keras_python', '', "A Python with keras and jax, for the Keras notebook on "
                    "Keras 3's JAX backend ('': not run).")
flags.DEFINE_string('idx_dir', '', "The MNIST IDX files for Keras ('': reference_keras.py's "
                    'default, ../shared/data/mnist_idx next to the checkout).')
flags.DEFINE_bool('importtime', True, 'Also one run under `python -X importtime` (after the '
                  'warm-up): import self time per top-level package.')
flags.DEFINE_string('baseline_repo', '', "Another checkout of mnist_jax (a `git worktree` of an "
                    "older commit): its `python run.py`, timed as the plain run is, alternated with "
                    "the other sides, its own cache beside --cache_dir ('': not run).")
flags.DEFINE_string('json_out', '', 'Also write the JSON object to this file.')
FLAGS = flags.FLAGS


def _process(command: list[str], env: dict, cwd: pathlib.Path) -> dict:
  """Runs a command; its wall seconds (from just before the start to its end), its own peak
  RSS, the time.time() it started and ended at, and its stderr."""
  with tempfile.TemporaryFile('w+') as err:
    spawned = time.time()
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
    _, status, usage = os.wait4(child.pid, 0)
    wall, ended = time.perf_counter() - start, time.time()
    child.returncode = os.waitstatus_to_exitcode(status)
    err.seek(0)
    stderr = err.read()
  if child.returncode:
    raise RuntimeError(f'{command} failed ({child.returncode}): {stderr[-3000:]}')
  return dict(wall_s=wall, peak_rss_mb=usage.ru_maxrss / 1024, spawned=spawned, ended=ended,
              stderr=stderr)


def _run_py_command(workdir: pathlib.Path, driver_out: pathlib.Path | None = None,
                    repo: pathlib.Path = REPO) -> list[str]:
  config = pathlib.Path(FLAGS.config).resolve()
  if repo != REPO and config.is_relative_to(REPO):
    config = repo / config.relative_to(REPO)  # The baseline's own copy of the config.
  flags_ = [f'--config={config}', f'--workdir={workdir}']
  if driver_out:
    return [sys.executable, __file__, _DRIVER, str(driver_out), *flags_]
  return [sys.executable, str(repo / 'run.py'), *flags_]


def _summary(workdir: pathlib.Path) -> dict:
  summary = json.loads((workdir / 'summary.json').read_text())
  return dict(train_s=summary['train_seconds'], total_s=summary['total_seconds'],
              test_accuracy=summary['test_accuracy'])


def plain_run(env: dict, scratch: pathlib.Path, repo: pathlib.Path = REPO) -> dict:
  workdir = pathlib.Path(tempfile.mkdtemp(dir=scratch))
  result = _process(_run_py_command(workdir, repo=repo), env, repo)
  row = dict(wall_s=result['wall_s'], peak_rss_mb=result['peak_rss_mb'], **_summary(workdir))
  row['overhead_s'] = row['wall_s'] - row['train_s']
  shutil.rmtree(workdir)
  return row


def profiled_run(env: dict, scratch: pathlib.Path) -> dict:
  workdir = pathlib.Path(tempfile.mkdtemp(dir=scratch))
  out = workdir.with_suffix('.profile.json')
  result = _process(_run_py_command(workdir, out), env, REPO)
  profile = json.loads(out.read_text())
  phases = _phases(profile, result['spawned'], result['ended'])
  programs = {name: dict(values) for name, values in profile['programs'].items()}
  row = dict(wall_s=result['wall_s'], peak_rss_mb=result['peak_rss_mb'], phases=phases,
             shares={k: v / result['wall_s'] for k, v in phases.items()},
             programs=programs, events=profile['events'], durations=profile['durations'],
             backend=profile['backend'], device=profile['device'],
             unpatched=profile['unpatched'], background=profile.get('background', {}),
             **_summary(workdir))
  shutil.rmtree(workdir)
  out.unlink()
  return row


def keras_run(env: dict) -> dict:
  command = [FLAGS.keras_python, str(REPO / 'benchmarks' / 'reference_keras.py')]
  if FLAGS.idx_dir:
    command.append(f'--idx_dir={FLAGS.idx_dir}')
  with tempfile.NamedTemporaryFile('r', suffix='.json') as out:
    shell = ['sh', '-c', 'exec "$@" > "$0"', out.name, *command]
    result = _process(shell, dict(env, KERAS_BACKEND='jax'), REPO / 'benchmarks')
    reported = json.loads(out.read().strip().splitlines()[-1])
  return dict(reported, wall_s=result['wall_s'], peak_rss_mb=result['peak_rss_mb'])


def import_costs(env: dict, scratch: pathlib.Path, top: int = 12) -> list[dict]:
  """`python -X importtime run.py`: self seconds per top-level package, largest first."""
  workdir = pathlib.Path(tempfile.mkdtemp(dir=scratch))
  command = _run_py_command(workdir)
  result = _process([command[0], '-X', 'importtime', *command[1:]], env, REPO)
  shutil.rmtree(workdir)
  per_package, total = collections.Counter(), 0
  for match in re.finditer(r'^import time:\s+(\d+) \|\s+\d+ \|( *)(\S+)', result['stderr'],
                           re.M):
    self_us, package = int(match[1]), match[3].split('.')[0]
    per_package[package] += self_us / 1e6
    total += self_us / 1e6
  return [dict(package='(all)', self_s=total)] + [
      dict(package=p, self_s=s) for p, s in per_package.most_common(top)]


def median_profile(rows: list[dict]) -> dict:
  phases = {k: statistics.median(r['phases'][k] for r in rows) for k in PHASES}
  shares = {k: statistics.median(r['shares'][k] for r in rows) for k in PHASES}
  programs = collections.defaultdict(dict)
  for name in {n for r in rows for n in r['programs']}:
    keys = {k for r in rows for k in r['programs'].get(name, {})}
    for key in sorted(keys):
      programs[name][key] = statistics.median(r['programs'].get(name, {}).get(key, 0)
                                              for r in rows)
  events = {k: statistics.median(r['events'].get(k, 0) for r in rows)
            for k in {k for r in rows for k in r['events']}}
  durations = {k: statistics.median(r['durations'].get(k, 0.0) for r in rows)
               for k in {k for r in rows for k in r['durations']}}
  background = {k: statistics.median(r['background'].get(k, 0.0) for r in rows)
                for k in {k for r in rows for k in r['background']}}
  return dict(phases_s=phases, shares=shares, wall_s=statistics.median(r['wall_s'] for r in rows),
              programs=dict(programs), events=events, durations=durations,
              background=background)


def machine() -> dict:
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
              if line.startswith('model name')), platform.processor()) \
      if os.path.exists('/proc/cpuinfo') else platform.processor()
  git = lambda *args: subprocess.run(['git', *args], cwd=REPO, capture_output=True,
                                     text=True).stdout.strip()
  return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
              jax=importlib.metadata.version('jax'), jaxlib=importlib.metadata.version('jaxlib'),
              git_commit=git('rev-parse', '--short', 'HEAD'),
              git_uncommitted=git('status', '--short', '--untracked-files=no').splitlines())


def print_table(result: dict) -> None:
  m, med = result['machine'], result['profile']
  print(f"\nmachine: {m['cpu']}, {m['cores']} cores; {result['backend']} {result['device']}; "
        f"jax {m['jax']}; {FLAGS.rounds} rounds, medians")
  print(f"\nwarm `python run.py --config={result['config']}` under the driver, by phase:\n")
  print(f"{'phase':28s} {'seconds':>8s} {'share':>7s}")
  for name in PHASES:
    print(f"{name:28s} {med['phases_s'][name]:8.3f} {med['shares'][name]:7.1%}")
  print(f"{'whole process (wall)':28s} {med['wall_s']:8.3f} {1:7.1%}")
  for name, seconds in sorted(med['background'].items()):
    print(f"(on a background thread, overlapping the above: {name} {seconds:.3f} s)")
  if result['profiled'][0]['unpatched']:
    print(f"(not found in mnist_jax, so not timed apart: "
          f"{', '.join(result['profiled'][0]['unpatched'])})")
  plain = result['plain_wall_s_median']
  print(f"(the same command without the driver: {plain:.3f} s wall; the driver's wall "
        f"{result['driver_over_plain']:.2f}x it)")
  print(f"\n{'program':40s} {'trace':>6s} {'lower':>6s} {'compile':>8s} {'hits':>5s} "
        f"{'misses':>6s}   (seconds; compile = XLA compile or persistent-cache read)")
  for name, p in sorted(med['programs'].items(),
                        key=lambda kv: -sum(v for k, v in kv[1].items() if k.endswith('_s'))):
    print(f"{name[:40]:40s} {p.get('trace_s', 0):6.3f} {p.get('lower_s', 0):6.3f} "
          f"{p.get('compile_or_cache_read_s', 0):8.3f} {p.get('cache_hits', 0):5.0f} "
          f"{p.get('cache_misses', 0):6.0f}")
  hits = med['events'].get('/jax/compilation_cache/cache_hits', 0)
  misses = med['events'].get('/jax/compilation_cache/cache_misses', 0)
  print(f"persistent cache: {hits:.0f} hits, {misses:.0f} misses (written) per run; "
        f"{med['durations'].get('/jax/compilation_cache/cache_retrieval_time_sec', 0):.3f} s "
        'reading it')
  if result.get('imports'):
    print('\nimport self time per top-level package (`python -X importtime`, one run):')
    for r in result['imports']:
      print(f"  {r['package']:28s} {r['self_s']:6.3f} s")
  print('\nwhole process, rounds alternating:')
  for r in result['plain']:
    print(f"  run.py         {r['wall_s']:6.2f} s wall, train_seconds {r['train_s']:.2f}, "
          f"test acc {r['test_accuracy']:.4f}")
  for r in result.get('baseline', []):
    print(f"  baseline       {r['wall_s']:6.2f} s wall, train_seconds {r['train_s']:.2f}, "
          f"test acc {r['test_accuracy']:.4f}")
  for r in result.get('keras', []):
    print(f"  {r['framework']:14s} {r['wall_s']:6.2f} s wall, fit {r['fit_s']:.2f} s, "
          f"test acc {r['test_accuracy']:.4f}")
  if result.get('ratio'):
    ratio = result['ratio']
    rounds = lambda xs: ', '.join(f'{x:.2f}' for x in xs)
    print(f"run.py / Keras on JAX, whole process: {ratio['whole_process']:.2f}x (medians' "
          f"ratio); per round {rounds(ratio['whole_process_per_round'])}, median "
          f"{ratio['whole_process_median_of_rounds']:.2f}x")
    print(f"run.py / Keras on JAX, training (train_seconds / fit): {ratio['train']:.2f}x; per "
          f"round {rounds(ratio['train_per_round'])}, median "
          f"{ratio['train_median_of_rounds']:.2f}x")
  if result.get('overhead'):
    o = result['overhead']
    print(f"overhead (wall - train_seconds): run.py {o['run_py_s']:.2f} s, baseline "
          f"{o['baseline_s']:.2f} s ({FLAGS.baseline_repo}): {o['ratio']:.2f}x; per round "
          f"{', '.join(f'{x:.2f}' for x in o['ratio_per_round'])}")


def main(argv):
  del argv
  scratch = pathlib.Path(tempfile.mkdtemp(prefix='startup_profile-'))
  cache = pathlib.Path(FLAGS.cache_dir) if FLAGS.cache_dir else scratch / 'cache'
  env = dict(os.environ, MNIST_JAX_CACHE=str(cache), TF_CPP_MIN_LOG_LEVEL='2')
  result = dict(machine=machine(), config=FLAGS.config, rounds=FLAGS.rounds,
                cache_dir=str(cache))
  # Warm-up, untimed: fills the caches (data, compiled programs; the OS's file cache).
  result['warmup'] = [plain_run(env, scratch)]
  if FLAGS.keras_python:
    keras_run(env)
  baseline = pathlib.Path(FLAGS.baseline_repo).resolve() if FLAGS.baseline_repo else None
  baseline_env = dict(env, MNIST_JAX_CACHE=str(cache) + '-baseline')
  if baseline:
    plain_run(baseline_env, scratch, baseline)
  if FLAGS.importtime:
    result['imports'] = import_costs(env, scratch)
  sides = [('plain', lambda: plain_run(env, scratch)),
           ('profiled', lambda: profiled_run(env, scratch))]
  if FLAGS.keras_python:
    sides.append(('keras', lambda: keras_run(env)))
  if baseline:
    sides.append(('baseline', lambda: plain_run(baseline_env, scratch, baseline)))
  rows = collections.defaultdict(list)
  for i in range(FLAGS.rounds):
    for name, side in (sides if i % 2 == 0 else sides[::-1]):
      rows[name].append(side())
  result.update(rows)
  result['profile'] = median_profile(rows['profiled'])
  result['backend'], result['device'] = rows['profiled'][0]['backend'], rows['profiled'][0]['device']
  plain_wall = statistics.median(r['wall_s'] for r in rows['plain'])
  result['plain_wall_s_median'] = plain_wall
  result['plain_train_s_median'] = statistics.median(r['train_s'] for r in rows['plain'])
  result['driver_over_plain'] = result['profile']['wall_s'] / plain_wall
  if rows['keras']:
    per_round = [p['wall_s'] / k['wall_s'] for p, k in zip(rows['plain'], rows['keras'])]
    train_per_round = [p['train_s'] / k['fit_s'] for p, k in zip(rows['plain'], rows['keras'])]
    result['keras_wall_s_median'] = statistics.median(r['wall_s'] for r in rows['keras'])
    result['keras_fit_s_median'] = statistics.median(r['fit_s'] for r in rows['keras'])
    result['ratio'] = dict(
        whole_process=plain_wall / result['keras_wall_s_median'],
        whole_process_per_round=per_round,
        whole_process_median_of_rounds=statistics.median(per_round),
        train=result['plain_train_s_median'] / result['keras_fit_s_median'],
        train_per_round=train_per_round, train_median_of_rounds=statistics.median(train_per_round))
  if rows['baseline']:
    ours = [r['overhead_s'] for r in rows['plain']]
    theirs = [r['overhead_s'] for r in rows['baseline']]
    result['overhead'] = dict(run_py_s=statistics.median(ours),
                              baseline_s=statistics.median(theirs),
                              ratio=statistics.median(ours) / statistics.median(theirs),
                              ratio_per_round=[a / b for a, b in zip(ours, theirs)])
  shutil.rmtree(scratch, ignore_errors=True)  # Workdirs, and the cache unless --cache_dir.
  print_table(result)
  print(json.dumps(result))
  if FLAGS.json_out:
    pathlib.Path(FLAGS.json_out).write_text(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main)
