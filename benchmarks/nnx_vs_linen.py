r"""The NNX CNN's steady epoch against the Linen CNN's, timed in interleaved rounds.

  python benchmarks/nnx_vs_linen.py                       # configs/cnn.py vs configs/cnn_nnx.py
  python benchmarks/nnx_vs_linen.py --rounds=5
  python benchmarks/nnx_vs_linen.py --configs=configs/cnn_bn.py,/path/to/cnn_bn_nnx.py

Each config is set up as run.py sets it up (`train.setup`: the real dataset, its input mode,
steps per call and unroll for this backend), then trains one epoch each, in turn: the first
epoch of each compiles, and every later round times one epoch of each, so that a host whose
speed drifts slows them alike. Prints each config's median steady s/epoch, each round's ratio
to the first config and their median, and one JSON line. First it prints each config's 10-step
train call as XLA compiled it (FLOPs, bytes accessed, op counts): after `jit` both should be
the same program, since models/_nnx.py merges the NNX module while the step is traced.
"""

import collections
import json
import os
import pathlib
import re
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import models
from mnist_jax import optim
from mnist_jax import steps
from mnist_jax import train
from mnist_jax import writers
from mnist_jax.infra import process

process.use_cpu_xla_flags()  # As run.py: before JAX's backend starts.

flags.DEFINE_list('configs', [str(REPO / 'configs' / 'cnn.py'), str(REPO / 'configs' / 'cnn_nnx.py')],
                  'Config files to time against the first.')
flags.DEFINE_integer('rounds', 3, 'Interleaved rounds of one steady epoch per config.')
FLAGS = flags.FLAGS


def load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f'timed_{pathlib.Path(path).stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def epoch(run, state, number: int):
  """One training epoch through the loop's own calls; returns the state and its seconds."""
  mode = run.executor
  start = time.perf_counter()
  chunks = mode.epoch_chunks(number)
  for chunk, args in zip(chunks, mode.train_inputs(chunks)):
    state, _, per_step = mode.train_call(state, *args,
                                         guard_empty_steps=mode.guard_empty_steps(chunk))
  jax.block_until_ready((state, per_step))
  return state, time.perf_counter() - start


def program_cost(config, k: int = 10) -> dict:
  """XLA's cost analysis and op counts of the loop's k-step train call, unrolled as the CPU
  runs it (random resident data: the program does not depend on the values)."""
  model = models.build(config.model, 10)
  tx = optim.create_optimizer(config, total_steps=1000)
  state = steps.create_train_state(jax.random.PRNGKey(0), model, tx, (28, 28, 1))
  rng = np.random.default_rng(0)
  data = dict(image=jnp.asarray(rng.integers(0, 256, (1024, 28, 28, 1), dtype=np.uint8)),
              label=jnp.asarray(rng.integers(0, 10, (1024,), dtype=np.int32)))
  chunk = dict(index=jnp.asarray(rng.integers(0, 1024, (k, config.batch_size), dtype=np.int32)),
               mask=jnp.ones((k, config.batch_size), jnp.float32))
  compiled = steps.make_chunk_fns(steps.gather).train.lower(
      state, data, chunk, task=steps.Task.from_config(config, model), unroll=k,
      guard_empty_steps=False).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  ops = collections.Counter(re.findall(r'= \S+ ([a-z\-]+)\(', compiled.as_text()))
  return dict(gflop=cost.get('flops', 0) / 1e9, mb_accessed=cost.get('bytes accessed', 0) / 1e6,
              ops={op: ops[op] for op in ('convolution', 'dot', 'fusion', 'transpose', 'copy')})


def main(argv):
  del argv
  runs = {}
  for path in FLAGS.configs:
    config = load_config(path)
    cost = program_cost(config)
    print(f'{pathlib.Path(path).name:16s} {cost}')
    run = train.setup(config)
    runs[path] = dict(run=run, state=run.state, seconds=[], cost=cost)
  for number in range(FLAGS.rounds + 1):  # Round 0 compiles.
    for timed in runs.values():
      timed['state'], seconds = epoch(timed['run'], timed['state'], number)
      timed['seconds'].append(seconds)
  names = list(runs)
  first = runs[names[0]]['seconds'][1:]
  print(f'{jax.default_backend()}, {FLAGS.rounds} interleaved rounds of one epoch each')
  result = dict(backend=jax.default_backend(), versions=writers.versions(), configs={})
  for name, timed in runs.items():
    steady = timed['seconds'][1:]
    ratios = [s / f for s, f in zip(steady, first)]
    result['configs'][name] = dict(
        first_epoch_s=timed['seconds'][0], steady_s=steady,
        median_steady_s=statistics.median(steady), ratios_to_first=ratios,
        median_ratio=statistics.median(ratios), num_params=timed['run'].num_params,
        program=timed['cost'])
    print(f'{pathlib.Path(name).name:16s} first (compiles) {timed["seconds"][0]:6.1f} s  '
          f'steady {statistics.median(steady):6.2f} s/epoch '
          f'({", ".join(f"{s:.2f}" for s in steady)})  vs first, per round: '
          f'{", ".join(f"{r:.3f}" for r in ratios)} (median {statistics.median(ratios):.3f})')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
