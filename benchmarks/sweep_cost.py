r"""What one replica of a learning-rate sweep costs against a plain run's step: time-bounded.

  python benchmarks/sweep_cost.py                                  # 1, 3, 4, 16, 64 replicas
  python benchmarks/sweep_cost.py --counts=3,4 --rounds=7
  python benchmarks/sweep_cost.py --wall_rounds=1 --json_out=benchmarks/results/x.json

For each N: a sweep of N learning rates (geomspace(1e-4, 3e-3, N); N = 1 is a one-value
sweep, (1e-3,): the sweep's optimizer, no vmap) and the plain run (configs/mlp.py, unswept),
each one jitted call of K full training steps (the executor's own train call, device input,
no empty-step guard, as an epoch of whole calls runs). The two sides alternate, `--rounds`
times, in the same process; the figure is the median seconds per step, and per replica
(sweep / N) against the plain run's step, both medians of the same rounds. K is chosen so
that a call takes a few tenths of a second: a steady-state rate, not an epoch.

With `--wall_rounds` > 0, also the whole process `run.py --config.sweep.learning_rate=
'(3e-4,1e-3,3e-3)'` against the three separate processes, caches warm (an untimed run of
each first), alternated that many rounds (benchmarks/sweep_speed.py's processes).
"""

import json
import pathlib
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from configs import mlp  # pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_jax.infra import process  # pylint: disable=g-import-not-at-top,wrong-import-position

flags.DEFINE_list('counts', ['1', '3', '4', '16', '64'], 'Replica counts.')
flags.DEFINE_integer('rounds', 5, 'Alternated rounds of (plain call, sweep call) per count.')
flags.DEFINE_float('call_seconds', 0.3, 'About how long one timed call runs.')
flags.DEFINE_integer('wall_rounds', 0, 'Rounds of the whole-process comparison (0: skip).')
flags.DEFINE_string('json_out', '', 'Also write the figures to this file.')
FLAGS = flags.FLAGS


def _caller(rates: tuple | None, steps: int):
  """A function that runs one call of `steps` training steps and returns its seconds."""
  config = mlp.get_config()
  config.input_mode = 'device'
  config.steps_per_call = steps
  config.write_tensorboard = False
  if rates is not None:
    config.sweep.learning_rate = rates
  run = train.setup(config)
  executor, holder = run.executor, [run.state]
  (inputs,) = executor.train_inputs(executor.epoch_chunks(0)[:1])

  def call() -> float:
    start = time.perf_counter()
    holder[0], _, per_step = executor.train_call(holder[0], *inputs, guard_empty_steps=False)
    jax.block_until_ready((holder[0], per_step))
    return time.perf_counter() - start

  call()  # Compiles.
  return call


def _steps_for(seconds_per_step: float) -> int:
  return int(np.clip(round(FLAGS.call_seconds / seconds_per_step), 2, 200))


def measure(counts) -> list[dict]:
  probe = _caller(None, 20)
  plain_step = min(probe() for _ in range(3)) / 20
  plain = _caller(None, _steps_for(plain_step))
  plain_k = _steps_for(plain_step)
  rows = []
  for n in counts:
    rates = tuple(float(x) for x in np.geomspace(1e-4, 3e-3, n)) if n > 1 else (1e-3,)
    k = _steps_for(plain_step * n)
    sweep = _caller(rates, k)
    plain_s, sweep_s = [], []
    for _ in range(FLAGS.rounds):
      plain_s.append(plain() / plain_k)
      sweep_s.append(sweep() / k)
    p, s = statistics.median(plain_s), statistics.median(sweep_s)
    ratios = [b / n / a for a, b in zip(plain_s, sweep_s)]
    rows.append(dict(replicas=n, steps_per_call=k, plain_steps_per_call=plain_k,
                     plain_ms_per_step=1e3 * p, sweep_ms_per_step=1e3 * s,
                     per_replica_ms_per_step=1e3 * s / n,
                     per_replica_vs_plain=statistics.median(ratios),
                     per_replica_vs_plain_rounds=[round(r, 3) for r in ratios]))
    print(f"{n:3d} replicas: {1e3 * s:8.2f} ms/step, {1e3 * s / n:6.2f} ms per replica-step; "
          f"plain {1e3 * p:5.2f} ms/step; per replica {statistics.median(ratios):.2f}x plain "
          f"(rounds {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
  return rows


def wall(rounds: int) -> dict:
  import os  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import sweep_speed  # pylint: disable=g-import-not-at-top
  run = sweep_speed._run  # pylint: disable=protected-access
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  config = str(pathlib.Path(mlp.__file__))
  base = [f'--config={config}', '--config.write_report=False']
  sweep = base + [f"--config.sweep.learning_rate=({','.join(map(str, sweep_speed.SWEEP))},)"]
  singles = [base + [f'--config.learning_rate={lr}'] for lr in sweep_speed.SWEEP]
  out = dict(sweep_s=[], three_processes_s=[])
  with tempfile.TemporaryDirectory() as tmp:
    workdir = lambda: f'--workdir={tmp}/{time.monotonic_ns()}'
    for args in [sweep, *singles]:  # Untimed: fills the data and compilation caches.
      run(args + [workdir()], env)
    for _ in range(rounds):
      out['sweep_s'].append(run(sweep + [workdir()], env))
      out['three_processes_s'].append(sum(run(a + [workdir()], env) for a in singles))
      print(f"wall: sweep {out['sweep_s'][-1]:.1f}s, three processes "
            f"{out['three_processes_s'][-1]:.1f}s", flush=True)
  out['ratios'] = [s / t for s, t in zip(out['sweep_s'], out['three_processes_s'])]
  return out


def main(argv):
  del argv
  process.enable_compilation_cache(process.resolve_cache_dir(''))
  result = dict(device=jax.devices()[0].device_kind, rounds=FLAGS.rounds,
                replicas=measure([int(c) for c in FLAGS.counts]))
  if FLAGS.wall_rounds:
    result['wall'] = wall(FLAGS.wall_rounds)
  print(json.dumps(result))
  if FLAGS.json_out:
    pathlib.Path(FLAGS.json_out).write_text(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main)
