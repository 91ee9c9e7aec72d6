r"""Kill training runs at random points, restart them until they finish, compare with a reference.

  python tests/stress_resume.py                 # 20 runs
  python tests/stress_resume.py --runs 100 --parallel 2 --seed 3

A stress run of the crash harness (not a test, nor a benchmark: run it by hand). The job is
the tiny one of tests/system/test_crash_safety.py (run.py on TFDS mock data: 36 examples, 15
steps in 3 epochs, calls of 2 steps, a checkpoint every 2 steps, 2 kept). One uninterrupted run is
the reference. Then every run starts in a fresh workdir and is hurt at a random point: SIGKILL
after a random train call, just before or just after a random checkpoint save (its asynchronous
write then in flight), inside Orbax's write (temporary folder just made, or written and not yet
renamed), SIGKILL from outside after a random number of seconds, or now and then a SIGTERM.
Each restart is hurt again with probability --again, until a start finishes. A run passes when
its final parameters, optimizer state and RNG, and every step's batch and loss,
equal the reference's bit for bit, and it ends with exactly 2 checkpoints and no temporary
folders.

Prints one line per run, then the totals: runs interrupted, runs resumed from a checkpoint,
runs bit-identical to the reference, kills (SIGKILL) and SIGTERMs.
"""

import argparse
import concurrent.futures
import os
import pathlib
import random
import shutil
import sys
import tempfile
import threading
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # crash_utils, beside it.

import crash_utils as cu  # pylint: disable=g-import-not-at-top

CALLS = 9  # Train calls of the job: 3 an epoch (steps 1-2, 3-4, 5).
SAVES = 9  # Checkpoint saves: steps 2, 4, 5, 7, 9, 10, 12, 14, 15.
# How a start is hurt, and how often (weights).
KINDS = {'train_call': 3, 'save': 1, 'saved': 2, 'tmp_created': 1, 'before_commit': 1,
         'timer': 2, 'sigterm': 0.5}


def random_fault(rng: random.Random):
  """(faults for the child, seconds after which the parent kills it, a short description)."""
  kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
  if kind == 'timer':
    seconds = rng.uniform(0.5, 2.5)  # A warm start of the job takes about 2 s here.
    return (), seconds, f'kill@{seconds:.2f}s'
  if kind == 'sigterm':
    fault = cu.Fault('train_call', rng.randint(1, CALLS), 'TERM')
  else:
    fault = cu.Fault(kind, rng.randint(1, CALLS if kind == 'train_call' else SAVES))
  return (fault,), None, fault.describe()


def stress_one(runner, args, reference, base, index, rng, again, max_starts):
  workdir = base / f'run{index:03d}'
  record, state = base / f'run{index:03d}.steps.jsonl', base / f'run{index:03d}.state.json'
  events, kills, terms, resumed, error = [], 0, 0, 0, None
  for start in range(max_starts):
    hurt = start == 0 or (start < max_starts - 1 and rng.random() < again)
    faults, kill_after, what = random_fault(rng) if hurt else ((), None, 'clean')
    result = runner.run(workdir, args, faults=faults, kill_after=kill_after, record=record,
                        state_file=state)
    if result.resumed_from() is not None:
      resumed += 1
    if result.killed:
      kills += 1
      events.append(f'{what}->killed')
    elif result.returncode == 143:
      terms += 1
      events.append(f'{what}->143')
    elif result.returncode == 0:
      events.append(f'{what}->done')
      break
    else:
      error = result.explain()
      events.append(f'{what}->exit {result.returncode}')
      break
  else:
    error = f'not finished after {max_starts} starts'
  identical = False
  problems = []
  if error is None:
    if cu.read_json(state) != reference['state']:
      problems.append('final state differs')
    problems += cu.compare_steps(reference['steps'], cu.read_steps(record))[:3]
    if len(cu.step_folders(workdir)) != cu.KEEP:
      problems.append(f'checkpoint steps {cu.step_folders(workdir)}')
    if cu.tmp_entries(workdir):
      problems.append(f'tmp folders {cu.tmp_entries(workdir)}')
    identical = not problems
  return dict(index=index, events=events, kills=kills, terms=terms, resumed=resumed,
              interrupted=kills + terms > 0, identical=identical, error=error,
              problems=problems)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--runs', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--again', type=float, default=0.4,
                      help='probability that a restart is hurt again')
  parser.add_argument('--max_starts', type=int, default=8)
  parser.add_argument('--parallel', type=int, default=2, help='runs at once')
  parser.add_argument('--keep', action='store_true', help='keep the workdirs (printed)')
  options = parser.parse_args()

  base = pathlib.Path(tempfile.mkdtemp(prefix='stress_resume-'))
  runner = cu.Runner(base / 'logs')
  args = cu.config_args(base / 'jax_cache')
  began = time.perf_counter()
  result = runner.run(base / 'reference', args, record=base / 'reference.steps.jsonl',
                      state_file=base / 'reference.state.json')
  if result.returncode != 0:
    sys.exit(f'the reference run failed:\n{result.explain()}')
  reference = dict(state=cu.read_json(base / 'reference.state.json'),
                   steps=cu.read_steps(base / 'reference.steps.jsonl'))
  print(f'reference: {len(reference["steps"])} steps in {result.seconds:.1f}s; '
        f'{options.runs} runs follow (seed {options.seed})', flush=True)

  lock = threading.Lock()
  outcomes = []

  def one(index):
    rng = random.Random(options.seed * 100_003 + index)
    outcome = stress_one(runner, args, reference, base, index, rng, options.again,
                         options.max_starts)
    with lock:
      outcomes.append(outcome)
      verdict = 'bit-identical' if outcome['identical'] else 'FAILED'
      print(f"run {index:3d}: {' '.join(outcome['events'])}  => {verdict}", flush=True)
      if not outcome['identical']:
        print('   ', outcome['error'] or '; '.join(outcome['problems']), flush=True)

  with concurrent.futures.ThreadPoolExecutor(options.parallel) as pool:
    list(pool.map(one, range(1, options.runs + 1)))

  total = len(outcomes)
  print(f'\n{total} runs in {time.perf_counter() - began:.0f}s: '
        f"{sum(o['interrupted'] for o in outcomes)} interrupted, "
        f"{sum(o['resumed'] > 0 for o in outcomes)} resumed from a checkpoint "
        f"({sum(o['resumed'] for o in outcomes)} resumptions), "
        f"{sum(o['identical'] for o in outcomes)} bit-identical to the reference; "
        f"{sum(o['kills'] for o in outcomes)} kills (SIGKILL), "
        f"{sum(o['terms'] for o in outcomes)} SIGTERMs, "
        f"{sum(bool(o['error']) for o in outcomes)} errors", flush=True)
  if options.keep:
    print(f'workdirs kept in {base}')
  else:
    shutil.rmtree(base, ignore_errors=True)
  sys.exit(0 if all(o['identical'] for o in outcomes) else 1)


if __name__ == '__main__':
  main()
