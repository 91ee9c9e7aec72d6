r"""Where a train step's time goes: per XLA op and per layer, from a jax.profiler trace.

  python benchmarks/profile_cnn.py                                  # configs/cnn.py, as trained
  python benchmarks/profile_cnn.py --layers=flax                    # with nn.Conv / nn.max_pool
  python benchmarks/profile_cnn.py --steps_per_call=10 --scan_unroll=1 --top=40
  python benchmarks/profile_cnn.py --compare=flax,pool,ours --rounds=7   # A/B: each change's gain

Runs the config's model and optimizer through the loop's own jitted chunk
(`steps.make_chunk_fns(steps.gather).train`) on random resident data (op times do not depend on the values),
traces a few calls and sums each XLA op's time over the threads that ran it. Prints the top ops
with what they compute (fusion root, shape, the JAX operation and model layer they came from),
then the time per layer, forward and backward. Times are per train step. On a busy machine
the absolute figures move from run to run; the shares are what to read.

With --compare, no profile: the listed layer sets are compiled side by side and timed in
interleaved rounds (each round times one call of each, in turn), so that a host whose speed
drifts slows them alike; it prints the median ms/step of each and its ratio to the first.
"""

import collections
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import executor
from mnist_jax import models
from mnist_jax import optim
from mnist_jax import steps
from mnist_jax import train
from mnist_jax.infra import process
from mnist_jax.models import layers

process.use_cpu_xla_flags()  # As run.py: before JAX's backend starts.

flags.DEFINE_string('config', str(REPO / 'configs' / 'cnn.py'), 'Config file to profile.')
# Which Conv and max_pool the models get: Flax's (the code before models/layers.py had its own),
# ours for pooling only (the first change), or ours for both.
LAYER_SETS = {'flax': (nn.Conv, nn.max_pool), 'pool': (nn.Conv, layers.max_pool),
              'ours': (layers.Conv, layers.max_pool)}
flags.DEFINE_enum('layers', 'pool', list(LAYER_SETS),
                  "'flax': nn.Conv and nn.max_pool; 'pool': nn.Conv and layers.max_pool (what "
                  "the models use); 'ours': layers.Conv and layers.max_pool.")
flags.DEFINE_list('compare', [], 'Layer sets to time side by side instead of profiling, e.g. '
                  'flax,pool,ours.')
flags.DEFINE_integer('rounds', 7, 'Interleaved timing rounds for --compare.')
flags.DEFINE_integer('steps_per_call', -1, 'Steps per jitted call (-1: the config\'s; 0: 50).')
flags.DEFINE_integer('scan_unroll', -1, "lax.scan's unroll (-1: the config's).")
flags.DEFINE_integer('calls', 3, 'Calls traced (after one untraced warm-up call).')
flags.DEFINE_integer('top', 25, 'How many ops to list.')
FLAGS = flags.FLAGS

# Containers (the executor, the loop: their time is their ops') and host-side events.
SKIPPED_EVENTS = ('ThunkExecutor', 'PjRt', 'block_until_ready', '$')
SKIPPED_PREFIXES = ('while', 'call', 'conditional')


def load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('profiled_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def setup(config, k: int):
  """State, resident random data and a chunk of k steps' indices, as the loop passes them."""
  model = models.build(config.model, 10)
  tx = optim.create_optimizer(config, total_steps=1000)
  state = steps.create_train_state(jax.random.PRNGKey(0), model, tx, (28, 28, 1))
  rng = np.random.default_rng(0)
  n, b = 4096, config.batch_size
  data = dict(image=jnp.asarray(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)),
              label=jnp.asarray(rng.integers(0, 10, (n,), dtype=np.int32)))
  chunk = dict(index=jnp.asarray(rng.integers(0, n, (k, b), dtype=np.int32)),
               mask=jnp.ones((k, b), jnp.float32))
  return state, data, chunk


def describe_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (what it computes, the JAX op_name it came from)."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$', line)
    if header and not line.startswith(' '):
      current = computations.setdefault(header.group(1), [])
    elif current is not None and line.strip().startswith(('%', 'ROOT')):
      current.append(line.strip())
  heavy = ('convolution', 'dot', 'reduce-window', 'select-and-scatter', 'scatter', 'reduce',
           'concatenate', 'transpose', 'pad', 'gather')
  described = {}
  for lines in computations.values():
    for line in lines:
      m = re.match(r'(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(', line)
      if not m:
        continue
      name, shape, opcode = m.groups()
      what = f'{opcode} {shape.split("{")[0]}'
      called = re.search(r'calls=%?([\w.\-]+)', line)
      if called and called.group(1) in computations:
        inner = [re.match(r'(?:ROOT )?%?[\w.\-]+ = (\S+) ([\w\-]+)\(', l)
                 for l in computations[called.group(1)]]
        kinds = sorted({i.group(2) for i in inner if i and i.group(2) in heavy})
        what += f' [{",".join(kinds)}]' if kinds else ''
      op_name = re.search(r'op_name="([^"]*)"', line)
      described[name] = (what, op_name.group(1) if op_name else '')
  return described


def layer_of(op_name: str) -> str:
  """'Conv_1 backward', 'optimizer', ... from a JAX op_name such as .../transpose(jvp(Model))/Conv_1/dot."""
  module = re.search(r'/((?:Conv|Dense|BatchNorm|Dropout)_\d+)/', op_name)
  if 'transpose(jvp(' in op_name:
    direction = 'backward'
  elif 'jvp(' in op_name:
    direction = 'forward'
  else:
    return 'optimizer, metrics, data' if op_name else '(no metadata)'
  if module:
    return f'{module.group(1)} {direction}'
  if re.search(r'/(max|reduce_max|select_n|eq|and|not|or|stack|concatenate)\b', op_name):
    return f'pooling/activations {direction}'
  return f'other {direction}'


def profile(fn, args, calls: int) -> tuple[float, collections.Counter]:
  """Wall seconds per call, and each op's summed time (seconds) per call."""
  out = fn(*args)
  jax.block_until_ready(out)
  args = (out[0], *args[1:])
  walls = []
  with tempfile.TemporaryDirectory() as logdir:
    jax.profiler.start_trace(logdir)
    for _ in range(calls):
      start = time.perf_counter()
      out = fn(*args)
      jax.block_until_ready(out)
      walls.append(time.perf_counter() - start)
      args = (out[0], *args[1:])
    jax.profiler.stop_trace()
    trace = next(pathlib.Path(logdir).rglob('*.xplane.pb'))
    data = jax.profiler.ProfileData.from_file(str(trace))
  totals = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if line.name == 'python':
        continue
      for event in line.events:
        if not (any(s in event.name for s in SKIPPED_EVENTS)
                or event.name.startswith(SKIPPED_PREFIXES)):
          totals[event.name] += event.duration_ns / 1e9 / calls
  return statistics.median(walls), totals


def compile_with(layer_set: str, config, k: int, unroll: int):
  """The loop's chunk function, compiled with `layer_set`'s layers; its inputs; compile seconds."""
  # The models call nn.Conv and layers.max_pool when traced: swap those names for the trace.
  nn.Conv, layers.max_pool = LAYER_SETS[layer_set]
  try:
    state, data, chunk = setup(config, k)
    task = steps.Task.from_config(config, models.build(config.model, 10))
    start = time.perf_counter()
    compiled = steps.make_chunk_fns(steps.gather).train.lower(
        state, data, chunk, task=task, unroll=unroll, guard_empty_steps=False).compile()
    return compiled, (state, data, chunk), time.perf_counter() - start
  finally:
    nn.Conv, layers.max_pool = LAYER_SETS['pool']


def compare(names: list[str], config, k: int, unroll: int, rounds: int) -> None:
  """Median ms/step of each layer set, timed in interleaved rounds."""
  runs = {}
  for name in names:
    compiled, args, compile_s = compile_with(name, config, k, unroll)
    out = compiled(*args)  # Warm-up; the state is donated, so each call takes the last one's.
    jax.block_until_ready(out)
    runs[name] = dict(fn=compiled, args=(out[0], *args[1:]), compile_s=compile_s, times=[])
  for _ in range(rounds):
    for run in runs.values():
      start = time.perf_counter()
      out = run['fn'](*run['args'])
      jax.block_until_ready(out)
      run['times'].append((time.perf_counter() - start) / k)
      run['args'] = (out[0], *run['args'][1:])
  first = statistics.median(runs[names[0]]['times'])
  print(f'{FLAGS.config}, {k} steps per call, unroll {unroll}, on {jax.default_backend()}; '
        f'{rounds} interleaved rounds')
  print(f'{"layers":8s} {"ms/step":>8s} {"(min-max)":>15s} {"vs " + names[0]:>9s} {"compile":>8s}')
  for name, run in runs.items():
    t = run['times']
    print(f'{name:8s} {statistics.median(t) * 1e3:8.1f} {min(t) * 1e3:7.1f}-{max(t) * 1e3:<7.1f} '
          f'{statistics.median(t) / first:8.2f}x {run["compile_s"]:7.1f}s')


def main(argv):
  del argv
  config = load_config(FLAGS.config)
  execution = executor.for_backend(config)  # What run.py would use on this backend.
  k = FLAGS.steps_per_call if FLAGS.steps_per_call >= 0 else execution['steps_per_call']
  k = k or 50
  unroll = FLAGS.scan_unroll if FLAGS.scan_unroll > 0 else execution['scan_unroll']
  if FLAGS.compare:
    compare(FLAGS.compare, config, k, unroll, FLAGS.rounds)
    return
  compiled, (state, data, chunk), compile_s = compile_with(FLAGS.layers, config, k, unroll)
  described = describe_ops(compiled.as_text())
  wall, totals = profile(compiled, (state, data, chunk), FLAGS.calls)
  total = sum(totals.values())
  print(f'{FLAGS.config} with {FLAGS.layers} layers, {k} steps per call, unroll {unroll}, '
        f'on {jax.default_backend()}; compile {compile_s:.1f} s')
  print(f'wall {wall / k * 1e3:.1f} ms/step; op time summed over threads '
        f'{total / k * 1e3:.1f} ms/step\n')
  print(f'{"ms/step":>8s} {"share":>6s}  {"op":28s} {"computes":44s} from')
  for name, seconds in totals.most_common(FLAGS.top):
    what, op_name = described.get(name, ('', ''))
    source = re.sub(r'^jit\([^)]*\)/(while/body/)?(closed_call/)?', '', op_name)
    print(f'{seconds / k * 1e3:8.2f} {seconds / total:6.1%}  {name[:28]:28s} {what[:44]:44s} '
          f'{source[:70]}')
  per_layer = collections.Counter()
  for name, seconds in totals.items():
    per_layer[layer_of(described.get(name, ('', ''))[1])] += seconds
  print(f'\n{"ms/step":>8s} {"share":>6s}  layer')
  for layer, seconds in per_layer.most_common():
    print(f'{seconds / k * 1e3:8.2f} {seconds / total:6.1%}  {layer}')


if __name__ == '__main__':
  app.run(main)
