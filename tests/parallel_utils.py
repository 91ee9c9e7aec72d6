"""Runs training in fresh processes for tests/system/test_parallel.py, and reads back what they did.

XLA reads `--xla_force_host_platform_device_count` once, when JAX's CPU backend starts, and
`jax.distributed.initialize` must run before that, so every parallel run happens in a new
process: this file is both the driver those processes run,

    python tests/parallel_utils.py SPEC.json

and the helpers the tests use to start them (`start`, `wait_all`) and read their results
(`result`, `params`).

SPEC.json holds:
  out:          folder for the driver's results
  num_examples: examples per split of tfds.testing.mock_data (deterministic: the same in every
                process)
  jobs:         run one after another in the process, each one of
                  {name, workdir, overrides}: `train.train_and_evaluate` on configs/mlp.py with
                    `overrides` ({dotted field path: value}; lists become tuples);
                  {name, argv}: `python run.py argv...` itself, e.g. with --distributed (at most
                    one such job per process: run.py defines absl flags).
  slow_stop_s:  optional; this process takes that many seconds longer to stop for a signal
                (a sleep once its save at the stop is finished), as a host with a slower disk.

Per job and process the driver writes `<name>.p<process index>.json` (the summary the run
returned, the per-step train losses of every jitted call, the exit status `python run.py`
would give and the error, the process index and count, the device counts) and
`<name>.p<process index>.npz` (the final parameters by tree path). It writes only into `out`;
the run writes what it always writes into its workdir.
"""

import json
import os
import pathlib
import runpy
import subprocess
import sys
import time
import traceback

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIVER = pathlib.Path(__file__).resolve()


# --- The driver (runs in the child process) --------------------------------------------------

def _flat_params(params) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


class _Recorder:
  """Wraps three package functions, without changing what they do, to keep what they see."""

  def __init__(self):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from mnist_jax import executor  # pylint: disable=g-import-not-at-top
    from mnist_jax import train  # pylint: disable=g-import-not-at-top
    from mnist_jax import writers  # pylint: disable=g-import-not-at-top
    self.reset()
    recorder = self

    original_fingerprint = writers.fingerprint
    def fingerprint(params, model_state=None):  # The summary's, of the final state: keep it.
      if recorder.params is None:
        recorder.params = _flat_params(params)
        recorder.params.update({f'model_state{k}': v
                                for k, v in _flat_params(model_state or {}).items()})
      return original_fingerprint(params, model_state)
    writers.fingerprint = fingerprint

    original_call = executor.Executor.train_call
    def train_call(self, state, *args, **kwargs):
      out = original_call(self, state, *args, **kwargs)
      recorder.losses.append(np.asarray(out[2]['loss']).tolist())  # Per step of the call.
      return out
    executor.Executor.train_call = train_call

    # run.py looks this up when it runs, so its runs are recorded too.
    original_train = train.train_and_evaluate
    def train_and_evaluate(config, workdir):
      recorder.summary = original_train(config, workdir)
      return recorder.summary
    train.train_and_evaluate = train_and_evaluate

  def reset(self):
    self.params, self.losses, self.summary = None, [], None

  def dump(self, out: pathlib.Path, name: str, exit_code: int, error: str) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    stem = f'{name}.p{jax.process_index()}'
    if self.params is not None:
      np.savez(out / f'{stem}.npz', **self.params)
    summary = self.summary and {k: v for k, v in self.summary.items() if k != 'versions'}
    (out / f'{stem}.json').write_text(json.dumps(dict(
        summary=summary, losses=self.losses, exit_code=exit_code, error=error,
        process_index=jax.process_index(), process_count=jax.process_count(),
        device_count=jax.device_count(), local_device_count=jax.local_device_count())))
    self.reset()


def _config(overrides: dict, name: str = 'mlp'):
  sys.path.insert(0, str(REPO_ROOT / 'tests'))
  from conftest import load_config_module  # pylint: disable=g-import-not-at-top
  config = load_config_module(REPO_ROOT / 'configs' / f'{name}.py').get_config()
  config.cache_dir = 'none'
  config.download = False
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for key in parents:
      node = node[key]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


def _run_job(job: dict, recorder: _Recorder, out: pathlib.Path) -> tuple[int, bool]:
  """One job; returns its exit status as `python run.py` would give it (0, a UserError's, 1),
  and whether every process ends it so (run.py's `agreed`: finished, or a shared decision)."""
  from mnist_jax.infra import errors  # pylint: disable=g-import-not-at-top
  from mnist_jax import train  # pylint: disable=g-import-not-at-top
  code, error, agreed = 0, '', True
  try:
    if 'argv' in job:
      sys.argv = ['run.py', *job['argv']]
      try:
        runpy.run_path(str(REPO_ROOT / 'run.py'), run_name='__main__')
      except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        # run.py exits while handling the UserError it printed (if any): that is the context.
        agreed = code == 0 or getattr(e.__context__, 'agreed', False)
    else:
      train.train_and_evaluate(_config(job.get('overrides', {}), job.get('config', 'mlp')),
                               job['workdir'])
  except errors.UserError as e:  # What run.py does with it.
    print(f'error: {e}', file=sys.stderr, flush=True)
    code, error, agreed = e.exit_code, f'{type(e).__name__}: {e}', e.agreed
  except Exception as e:  # pylint: disable=broad-except  (recorded; the next job still runs)
    traceback.print_exc()
    code, error, agreed = 1, f'{type(e).__name__}: {e}', False
  recorder.dump(out, job['name'], code, error)
  return code, agreed


def main(spec_path: str) -> tuple[int, bool]:
  """Runs the spec's jobs in order; returns the first non-zero exit status (0 if none), and
  whether the processes agreed on it (see `_run_job`)."""
  spec = json.loads(pathlib.Path(spec_path).read_text())
  out = pathlib.Path(spec['out'])
  out.mkdir(parents=True, exist_ok=True)
  os.chdir(REPO_ROOT)
  sys.path.insert(0, str(REPO_ROOT))
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  recorder = _Recorder()
  if spec.get('slow_stop_s'):
    _slow_stop(spec['slow_stop_s'])
  codes = []
  with tfds.testing.mock_data(num_examples=spec['num_examples']):
    for job in spec['jobs']:
      codes.append(_run_job(job, recorder, out))
      if codes[-1][0] and _is_multi_process():
        break  # The peers cannot finish this job, nor run the next one, without this process.
  return next((c for c in codes if c[0]), (0, True))


def _slow_stop(seconds: float) -> None:
  from mnist_jax.infra import preemption  # pylint: disable=g-import-not-at-top
  original_init = preemption.Preempted.__init__
  def init(self, *args, **kwargs):  # Made once the save at the stop is finished.
    time.sleep(seconds)
    original_init(self, *args, **kwargs)
  preemption.Preempted.__init__ = init


def _is_multi_process() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count() > 1


# --- Helpers for the tests (run in pytest's process) -----------------------------------------

def free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def child_env(num_devices: int, cache_dir: pathlib.Path) -> dict:
  """CPU only, `num_devices` fake devices, quiet TensorFlow, caches in tmp, no TFDS dir."""
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env.update(XLA_FLAGS=' '.join([*flags, f'--xla_force_host_platform_device_count={num_devices}']),
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2', MNIST_JAX_CACHE=str(cache_dir))
  env.pop('TFDS_DATA_DIR', None)
  return env


class Child:
  """One started driver process; its stdout and stderr go to a log file (no pipe to fill)."""

  def __init__(self, name: str, spec: dict, env: dict, folder: pathlib.Path):
    self.name = name
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / f'{name}.spec.json'
    spec_path.write_text(json.dumps(spec))
    self.log_path = folder / f'{name}.log'
    with open(self.log_path, 'w') as log:
      self.process = subprocess.Popen([sys.executable, str(DRIVER), str(spec_path)],
                                      cwd=REPO_ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT)

  @property
  def log(self) -> str:
    return self.log_path.read_text(errors='replace')

  def describe(self) -> str:
    return (f'--- {self.name} (exit status {self.process.returncode}), last lines of its '
            f'output:\n{self.log[-4000:]}')


def start(name: str, spec: dict, env: dict, folder: pathlib.Path) -> Child:
  return Child(name, spec, env, folder)


def wait_all(children: list[Child], timeout_s: float, *, stop_on_failure: bool = False) -> None:
  """Waits for all; on timeout (or, with stop_on_failure, when one fails) kills the rest.

  Raises AssertionError, with every child's output, if any timed out or was killed.
  With stop_on_failure, one failed process of a multi-process run would leave its peers
  waiting for it until the timeout; they are killed at once instead.
  """
  deadline = time.monotonic() + timeout_s
  while any(c.process.poll() is None for c in children):
    failed = stop_on_failure and any(c.process.poll() not in (None, 0) for c in children)
    if failed or time.monotonic() > deadline:
      for c in children:
        if c.process.poll() is None:
          c.process.kill()  # Only the processes started here, by their handle.
          c.process.wait()
      why = 'a process failed' if failed else f'timed out after {timeout_s:.0f}s'
      raise AssertionError(f'{why}; killed the others.\n' +
                           '\n'.join(c.describe() for c in children))
    time.sleep(0.1)


def result(out: pathlib.Path, name: str, process_index: int = 0) -> dict:
  return json.loads((out / f'{name}.p{process_index}.json').read_text())


def params(out: pathlib.Path, name: str, process_index: int = 0) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  with np.load(out / f'{name}.p{process_index}.npz') as data:
    return {k: data[k] for k in data.files}


if __name__ == '__main__':
  try:
    status, agreed = main(sys.argv[1])
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    status, agreed = 3, False
  # Leave as `python run.py` does (its _exit): with the peers on an agreed exit, else at once,
  # skipping exit hooks (the distributed runtime's shutdown) that could wait for a peer.
  from mnist_jax.infra import distributed  # pylint: disable=g-import-not-at-top
  distributed.leave(agreed)
  if status:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(0)
