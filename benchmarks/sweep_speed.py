r"""What does a sweep in one program cost? Called by benchmarks/train_speed.py; runs alone too.

  python benchmarks/sweep_speed.py                # replicas 1, 4, 16, 64 and the 3-rate sweep
  python benchmarks/sweep_speed.py --counts=1,4   # fewer

Measured:
  * replicas: a learning-rate sweep of N values in one vmapped program, N = 1, 4, 16, 64:
    steady seconds per epoch, per replica, and per replica against a plain single run's epoch
    (same process, same config, unswept);
  * wall: `python run.py --config=... --config.sweep.learning_rate='(3e-4,1e-3,3e-3)'` against
    the three separate processes `--config.learning_rate=...`, one after the other, each with
    the decoded data and compiled programs cached (a first, untimed run of each fills the
    caches, as a user's earlier runs would have); the ratio of the two wall times.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))

import numpy as np  # pylint: disable=g-import-not-at-top

SWEEP = (3e-4, 1e-3, 3e-3)


def replica_scaling(config_path: str, counts=(1, 4, 16, 64), epochs: int = 3) -> list[dict]:
  """Steady s/epoch of an N-value learning-rate sweep, per replica, against a single run's."""
  import train_speed  # pylint: disable=g-import-not-at-top
  single = min(train_speed.time_epochs(
      train_speed.load_config(config_path, input_mode='device'), epochs)['epoch_seconds'][1:])
  rows = []
  for n in counts:
    rates = tuple(float(x) for x in np.geomspace(1e-4, 3e-3, n)) if n > 1 else (1e-3,)
    config = train_speed.load_config(config_path, input_mode='device',
                                     **{'sweep.learning_rate': rates})
    seconds = min(train_speed.time_epochs(config, epochs)['epoch_seconds'][1:])
    rows.append(dict(replicas=n, s_per_epoch=seconds, s_per_epoch_per_replica=seconds / n,
                     per_replica_vs_single_run=seconds / n / single,
                     single_run_s_per_epoch=single))
  return rows


def _run(args: list[str], env: dict) -> float:
  start = time.perf_counter()
  subprocess.run([sys.executable, 'run.py', *args], cwd=REPO, env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return time.perf_counter() - start


def wall_against_processes(config_path: str) -> dict:
  """The 3-rate sweep in one process against 3 processes, caches warm for both."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  env.setdefault('MNIST_JAX_CACHE', tempfile.mkdtemp(prefix='sweep_speed_cache_'))
  base = [f'--config={config_path}', '--config.write_report=False']
  sweep = base + [f"--config.sweep.learning_rate=({','.join(map(str, SWEEP))},)"]
  singles = [base + [f'--config.learning_rate={lr}'] for lr in SWEEP]
  with tempfile.TemporaryDirectory() as tmp:
    workdir = lambda name: f'--workdir={tmp}/{name}-{time.monotonic_ns()}'
    for args in [sweep, *singles]:  # Untimed: fills the data and compilation caches.
      _run(args + [workdir('warm')], env)
    sweep_s = _run(sweep + [workdir('sweep')], env)
    processes_s = [_run(args + [workdir('single')], env) for args in singles]
  return dict(sweep_s=sweep_s, three_processes_s=sum(processes_s), processes_s=processes_s,
              ratio=sweep_s / sum(processes_s))


def main():
  counts = (1, 4, 16, 64)
  for arg in sys.argv[1:]:
    if arg.startswith('--counts='):
      counts = tuple(int(x) for x in arg.split('=', 1)[1].split(','))
  config = str(REPO / 'configs' / 'mlp.py')
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # As train_speed.py.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_enable_compilation_cache', False)
  result = dict(replicas=replica_scaling(config, counts), wall=wall_against_processes(config))
  print_table(result)
  print(json.dumps(result))


def print_table(result: dict) -> None:
  for r in result.get('replicas', []):
    print(f"sweep of {r['replicas']:3d} learning rates: {r['s_per_epoch']:.3f} s/epoch, "
          f"{r['s_per_epoch_per_replica']:.3f} s/epoch per replica = "
          f"{r['per_replica_vs_single_run']:.2f}x a single run's "
          f"({r['single_run_s_per_epoch']:.3f} s)")
  wall = result.get('wall')
  if wall:
    print(f"sweep of {len(SWEEP)} learning rates in one process: {wall['sweep_s']:.1f}s wall; "
          f"{len(SWEEP)} separate processes: {wall['three_processes_s']:.1f}s "
          f"({', '.join(f'{s:.1f}' for s in wall['processes_s'])}); "
          f"ratio {wall['ratio']:.2f}")


if __name__ == '__main__':
  main()
