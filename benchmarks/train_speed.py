r"""How fast does the notebook's job train here? Prints a readable table and one JSON object.

  python benchmarks/train_speed.py                      # configs/mlp.py, both input modes
  python benchmarks/train_speed.py --quick              # fewer repeats, no scaling sweep
  python benchmarks/train_speed.py --json_out=/tmp/speed.json
  python benchmarks/train_speed.py --config=configs/cnn.py --quick   # the CNN next to PyTorch's
  python benchmarks/train_speed.py --quick --sweeps     # and what a sweep in one program costs

Measured, for each input mode: compile time, steady-state seconds per epoch (median of the
epochs after the first), examples/s, achieved GFLOP/s and its fraction of this machine's f32
matmul peak (measured here, in the same run), the 5-epoch training time from the first step to
the end of the last epoch with compilation included (a cold compile: the in-process figures
never use the persistent compilation cache), the floor for that time (5 epochs of FLOPs at
100% of the peak), and test accuracy. Then, per input mode, the whole process
`python run.py --config=...` twice in a fresh cache (cold: decodes the data and compiles; warm:
reuses both): wall time, peak memory (max RSS) and the compile overhead of its first epoch. Then
how the cost grows: seconds per epoch at batch 128/512/2048 and hidden width 512/2048, and for
N = 1, 4, 16 seeds trained at once (`num_seeds`, per replica vs N separate runs). With
`--sweeps` (on by default without `--quick`): a learning-rate sweep of 1, 4, 16 and 64 values in
one program, per-replica s/epoch against a single run's, and the 3-rate sweep in one process
against three separate processes, wall time (benchmarks/sweep_speed.py, which also runs alone).

The references are the same job in other frameworks, each run as its own process: for the MLP
(configs/mlp.py) the Keras notebook on Keras 3's TensorFlow backend and on its JAX backend
(`KERAS_BACKEND=jax`; `--keras_jax_python` names a Python with keras and jax, TensorFlow not
needed) and its PyTorch version, for the CNN (configs/cnn.py) the PyTorch CNN
(benchmarks/reference_torch_cnn.py); a table then sets this repo's `device` mode and PyTorch
side by side: steady s/epoch, examples/s, fraction of the matmul peak (the same FLOP count for
both), 5 epochs with compilation included, and the whole process; and this repo's 5 epochs and
warm whole process as ratios to each reference's.

Works unchanged on a GPU or TPU (the peak is then the device's f32 matmul rate).
"""

import functools
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# On a GPU, JAX takes 75% of its memory up front; the processes this benchmark starts (run.py,
# the PyTorch references) would then find too little. This process, and the run.py processes
# it times (they inherit the variable), allocate as they go instead.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'benchmarks'))  # sweep_speed

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np

from mnist_jax import steps
from mnist_jax import train
from mnist_jax.infra import process

process.use_cpu_xla_flags()  # As run.py: before JAX's backend starts.

flags.DEFINE_string('config', str(REPO / 'configs' / 'mlp.py'), 'Config file to benchmark.')
flags.DEFINE_list('modes', ['device', 'tfdata'], 'Input modes to measure.')
flags.DEFINE_bool('quick', False, 'Fewer repeats; skip the scaling sweep.')
flags.DEFINE_bool('whole_process', True,
                  'Also time `python run.py` end to end (twice per input mode).')
flags.DEFINE_bool('sweeps', None, 'Also measure sweeps in one program (benchmarks/'
                  'sweep_speed.py); default: on without --quick, off with it.')
flags.DEFINE_list('sweep_replicas', ['1', '4', '16', '64'], 'Sweep sizes for --sweeps.')
flags.DEFINE_string('json_out', '', 'Also write the JSON object to this file.')
flags.DEFINE_bool('references', True, 'Also time the Keras notebook and the PyTorch version '
                  '(benchmarks/reference_*.py) on the same machine, where importable.')
flags.DEFINE_string('torch_python', sys.executable, 'A Python that can import torch.')
flags.DEFINE_string('keras_jax_python', sys.executable, "A Python with keras and jax, for the "
                    "Keras notebook on Keras 3's JAX backend ('': not run). On a GPU, one whose "
                    'jax has the GPU plugin trains there.')
flags.DEFINE_string('idx_dir', '', "The MNIST IDX files for the references ('': their default, "
                    '../shared/data/mnist_idx next to the checkout).')
FLAGS = flags.FLAGS
# sweep_speed.py does `import train_speed`: run as a script, this module is `__main__`, and a
# second copy would define the flags above again.
sys.modules.setdefault('train_speed', sys.modules[__name__])


def machine() -> dict:
  cpu = next((line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo')
              if line.startswith('model name')), platform.processor()) \
      if os.path.exists('/proc/cpuinfo') else platform.processor()
  device = jax.devices()[0]
  return dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
              jax=jax.__version__, backend=jax.default_backend(), device=device.device_kind,
              device_count=jax.device_count())


def matmul_peak(n: int = 2048, repeats: int = 20) -> float:
  """Best f32 GFLOP/s of an n^3 matmul through XLA."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, precision='highest'))
  matmul(a, b).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e9


def step_flops(run: train.Setup, batch_size: int) -> tuple[float, float]:
  """FLOPs of one train step: XLA's cost analysis, and the multiply-adds of the layers.

  The analytic count: every layer with a kernel (dense or convolution) does
  (output positions) x (kernel size) multiply-adds forward, as many for its weight gradient, and
  as many again for its input gradient except the first layer (its input is the image).
  """
  image_shape = run.info.image_shape
  batch = dict(image=jnp.zeros((batch_size, *image_shape), jnp.uint8),
               label=jnp.zeros((batch_size,), jnp.int32), mask=jnp.ones((batch_size,)))
  compiled = jax.jit(steps.train_step).lower(run.state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)), analytic_step_flops(run.state, image_shape, batch_size)


def analytic_step_flops(state, image_shape, batch_size: int) -> float:
  """2 x the multiply-adds of a train step, from each kernel's layer output (see step_flops)."""
  images = jnp.zeros((batch_size, *image_shape), jnp.float32)
  _, captured = jax.eval_shape(functools.partial(
      state.apply_fn, capture_intermediates=True, mutable=['intermediates']),
      {'params': state.params}, images)
  outputs = {path[:-1]: out for path, out in
             flax.traverse_util.flatten_dict(captured['intermediates']).items()
             if path[-1] == '__call__'}
  flops = 0.0
  kernels = [(path[:-1], k) for path, k in flax.traverse_util.flatten_dict(state.params).items()
             if path[-1] == 'kernel']
  for i, (layer, kernel) in enumerate(kernels):  # In the order the layers were created.
    out = outputs[layer][0]
    positions = out.size // out.shape[-1]
    flops += 2 * positions * kernel.size * (2 if i == 0 else 3)
  return flops


def load_config(path: str, **overrides):
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  del config_flags
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.cache_dir = os.environ.get('MNIST_JAX_CACHE', '')
  config.write_report = False
  config.write_tensorboard = False
  config.update_from_flattened_dict(overrides)  # Dotted names: 'sweep.learning_rate'.
  return config


def time_epochs(config, num_epochs: int) -> dict:
  """Trains in-process; times the epochs (the first includes compilation)."""
  run = train.setup(config)
  mode, state = run.executor, run.state
  epoch_seconds, sums = [], None
  for epoch in range(num_epochs):
    start = time.perf_counter()
    chunks = mode.epoch_chunks(epoch)
    for chunk, args in zip(chunks, mode.train_inputs(chunks)):
      state, sums, per_step = mode.train_call(
          state, *args, guard_empty_steps=mode.guard_empty_steps(chunk))
    jax.block_until_ready((state, per_step))
    epoch_seconds.append(time.perf_counter() - start)
  test = mode.evaluate(state)
  acc = float(np.mean(test['accuracy'] / test['count']))
  return dict(run=run, epoch_seconds=epoch_seconds, test_accuracy=acc)


def measure_mode(config_path: str, mode: str, peak: float, epochs: int) -> dict:
  config = load_config(config_path, input_mode=mode)
  result = time_epochs(config, epochs)
  run, seconds = result['run'], result['epoch_seconds']
  steady = statistics.median(seconds[1:])
  xla_flops, analytic = step_flops(run, config.batch_size)
  flops_per_epoch = analytic * run.executor.steps_per_epoch
  return dict(
      input_mode=mode, compile_and_first_epoch_s=seconds[0], compile_s=seconds[0] - steady,
      steady_s_per_epoch=steady, examples_per_s=len(run.executor.train) / steady,
      step_mflop_analytic=analytic / 1e6, step_mflop_xla=xla_flops / 1e6,
      epoch_gflop=flops_per_epoch / 1e9,
      gflops=flops_per_epoch / steady / 1e9, fraction_of_peak=flops_per_epoch / steady / 1e9 / peak,
      train_5_epochs_s=sum(seconds[:5]), epoch_seconds=seconds,
      train_5_epochs_at_peak_s=5 * flops_per_epoch / (peak * 1e9),
      test_accuracy=result['test_accuracy'])


# Runs a command from a small launcher process and prints its peak RSS: a child forked straight
# from this (large) benchmark process would report this process's memory as its own.
_LAUNCHER = ("import resource, subprocess, sys; "
             "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def timed_process(command: list[str], env: dict, cwd=REPO) -> tuple[float, int]:
  """Runs a command; returns its wall seconds and its own peak RSS in KB."""
  start = time.perf_counter()
  done = subprocess.run([sys.executable, '-c', _LAUNCHER, *command], env=env, cwd=cwd,
                        capture_output=True, text=True)
  wall = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f'{command} failed: {done.stderr[-2000:]}')
  return wall, int(done.stdout.split()[-1])


def whole_process(config_path: str, mode: str) -> list[dict]:
  """`python run.py` twice in one fresh cache: cold (decode + compile), then warm."""
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, MNIST_JAX_CACHE=os.path.join(tmp, 'cache'), TF_CPP_MIN_LOG_LEVEL='2')
    for name in ('cold', 'warm'):
      workdir = os.path.join(tmp, name)
      wall, rss_kb = timed_process([sys.executable, str(REPO / 'run.py'),
                                    f'--config={config_path}', f'--workdir={workdir}',
                                    f'--config.input_mode={mode}'], env)
      summary = json.loads(pathlib.Path(workdir, 'summary.json').read_text())
      epochs = [json.loads(l)['epoch_seconds']
                for l in pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
      runs.append(dict(run=name, input_mode=mode, wall_s=wall, peak_rss_mb=rss_kb / 1024,
                       train_s=summary['train_seconds'],
                       compile_overhead_s=epochs[0] - statistics.median(epochs[1:]),
                       test_accuracy=summary['test_accuracy']))
  return runs


# The same job in other frameworks, by the config's model: (script, Keras backend or None).
REFERENCE_SCRIPTS = {'mlp': (('reference_keras.py', 'tensorflow'), ('reference_keras.py', 'jax'),
                             ('reference_torch.py', None)),
                     'cnn': (('reference_torch_cnn.py', None),)}


def references(model_name: str) -> list[dict]:
  """The references for this model, each as its own process, timed from outside."""
  rows = []
  for script, keras_backend in REFERENCE_SCRIPTS.get(model_name, ()):
    python = {None: FLAGS.torch_python, 'tensorflow': sys.executable,
              'jax': FLAGS.keras_jax_python}[keras_backend]
    if not python:
      continue
    out = pathlib.Path(tempfile.mkdtemp()) / 'out.json'
    extra = f' --idx_dir="{FLAGS.idx_dir}"' if FLAGS.idx_dir else ''
    if 'torch' in script and jax.default_backend() == 'gpu':
      extra += ' --device=cuda'  # PyTorch trains where JAX does.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
    if keras_backend:
      env['KERAS_BACKEND'] = keras_backend
    command = ['sh', '-c', f'exec "{python}" "{REPO / "benchmarks" / script}"{extra} > "{out}"']
    try:
      wall, rss_kb = timed_process(command, env, cwd=REPO / 'benchmarks')
    except RuntimeError as e:
      rows.append(dict(script=script, keras_backend=keras_backend,
                       error=str(e).strip().splitlines()[-1:]))
      continue
    rows.append(dict(json.loads(out.read_text().strip().splitlines()[-1]), script=script,
                     wall_s=wall, peak_rss_mb=rss_kb / 1024))
  return rows


def against_references(result: dict) -> list[dict]:
  """This repo's 5 epochs (`device` mode, compile included) and warm whole process, as ratios
  to each reference's training (Keras: `fit`) and whole process."""
  ours = next((r for r in result['modes'] if r['input_mode'] == 'device'), None)
  warm = next((r for r in result.get('whole_process', [])
               if r['input_mode'] == 'device' and r['run'] == 'warm'), None)
  rows = []
  for ref in result.get('references', []):
    if 'error' in ref:
      continue
    rows.append(dict(framework=ref['framework'],
                     train_5_epochs=ours and ours['train_5_epochs_s'] / ref['fit_s'],
                     whole_process=warm and warm['wall_s'] / ref['wall_s']))
  return rows


def side_by_side(result: dict) -> dict | None:
  """This repo's `device` mode next to the PyTorch reference that reports steady epochs."""
  ours = next((r for r in result['modes'] if r['input_mode'] == 'device'), None)
  torch = next((r for r in result.get('references', []) if 'steady_s_per_epoch' in r
                and r['script'].startswith('reference_torch')), None)
  if ours is None or torch is None:
    return None
  warm = next((r for r in result.get('whole_process', [])
               if r['input_mode'] == 'device' and r['run'] == 'warm'), None)
  peak, gflop, n = result['matmul_peak_gflops'], ours['epoch_gflop'], ours['examples_per_s']
  n = n * ours['steady_s_per_epoch']  # Examples per epoch.
  row = lambda steady, five, whole: dict(
      steady_s_per_epoch=steady, examples_per_s=n / steady,
      fraction_of_peak=gflop / steady / peak, train_5_epochs_s=five, whole_process_s=whole)
  jax_row = row(ours['steady_s_per_epoch'], ours['train_5_epochs_s'], warm and warm['wall_s'])
  torch_row = row(torch['steady_s_per_epoch'], torch['fit_s'], torch['wall_s'])
  return dict(this_repo=jax_row, torch=dict(torch_row, framework=torch['framework']),
              ratio={k: jax_row[k] / torch_row[k] for k in jax_row if jax_row[k] is not None})


def scaling(config_path: str) -> list[dict]:
  rows = []
  for batch_size, width in ((128, 512), (512, 512), (2048, 512), (128, 2048)):
    config = load_config(config_path, input_mode='device', batch_size=batch_size,
                         **{'model.hidden_sizes': (width,)})
    seconds = time_epochs(config, 3)['epoch_seconds']
    rows.append(dict(batch_size=batch_size, hidden_width=width,
                     s_per_epoch=min(seconds[1:])))
  return rows


def seeds_scaling(config_path: str, counts=(1, 4, 16)) -> list[dict]:
  """N replicas in one vmapped program: steady seconds per epoch, and per replica."""
  rows = []
  for n in counts:
    config = load_config(config_path, input_mode='device', num_seeds=n)
    seconds = time_epochs(config, 3)['epoch_seconds']
    rows.append(dict(num_seeds=n, s_per_epoch=min(seconds[1:]),
                     s_per_epoch_per_replica=min(seconds[1:]) / n))
  return rows


def print_table(result: dict) -> None:
  m = result['machine']
  print(f"\nmachine: {m['cpu']}, {m['cores']} cores; {m['backend']} {m['device']} x"
        f"{m['device_count']}; jax {m['jax']}")
  print(f"f32 matmul peak (2048^3, XLA): {result['matmul_peak_gflops']:.1f} GFLOP/s\n")
  print(f"{'mode':8s} {'compile':>8s} {'s/epoch':>8s} {'ex/s':>9s} {'GFLOP/s':>8s} "
        f"{'of peak':>8s} {'5 epochs':>9s} {'(at peak)':>9s} {'test acc':>9s}")
  for r in result['modes']:
    print(f"{r['input_mode']:8s} {r['compile_s']:7.2f}s {r['steady_s_per_epoch']:7.3f}s "
          f"{r['examples_per_s']:9,.0f} {r['gflops']:8.1f} {r['fraction_of_peak']:8.1%} "
          f"{r['train_5_epochs_s']:8.2f}s {r['train_5_epochs_at_peak_s']:8.2f}s "
          f"{r['test_accuracy']:9.4f}")
  for r in result.get('whole_process', []):
    print(f"whole process, {r['input_mode']} ({r['run']}): {r['wall_s']:.2f}s wall, peak RSS "
          f"{r['peak_rss_mb']:.0f} MB, training {r['train_s']:.2f}s, first-epoch compile "
          f"overhead {r['compile_overhead_s']:.2f}s, test acc {r['test_accuracy']:.4f}")
  for r in result.get('references', []):
    if 'error' in r:
      backend = f" (KERAS_BACKEND={r['keras_backend']})" if r.get('keras_backend') else ''
      print(f"reference {r['script']}{backend}: not run ({r['error']})")
    else:
      steady = (f", steady {r['steady_s_per_epoch']:.3f} s/epoch"
                if 'steady_s_per_epoch' in r else '')
      print(f"reference {r['framework']}: training {r['fit_s']:.2f}s{steady}, whole process "
            f"{r['wall_s']:.2f}s wall, peak RSS {r['peak_rss_mb']:.0f} MB, test acc "
            f"{r['test_accuracy']:.4f}")
  for r in result.get('against_references', []):
    words = [f'{label} {r[key]:.2f}x' for key, label in
             (('train_5_epochs', '5 epochs (device mode)'), ('whole_process', 'whole process'))
             if r[key] is not None]
    if words:
      print(f"this repo against {r['framework']}: {', '.join(words)}")
  for r in result.get('seeds', []):
    print(f"num_seeds {r['num_seeds']:3d}: {r['s_per_epoch']:.3f} s/epoch, "
          f"{r['s_per_epoch_per_replica']:.3f} s/epoch per replica "
          '(N separate runs: N x the num_seeds=1 figure)')
  if result.get('side_by_side'):
    sbs = result['side_by_side']
    ours, torch, ratio = sbs['this_repo'], sbs['torch'], sbs['ratio']
    print(f"\n{'':26s} {'this repo (device)':>19s} {torch['framework'] + ' eager':>19s} "
          f"{'ratio':>7s}")
    for key, label, fmt in (('steady_s_per_epoch', 'steady s/epoch', '{:.2f} s'),
                            ('examples_per_s', 'examples/s', '{:,.0f}'),
                            ('fraction_of_peak', 'fraction of matmul peak', '{:.1%}'),
                            ('train_5_epochs_s', '5 epochs (with compile)', '{:.1f} s'),
                            ('whole_process_s', 'whole process (warm)', '{:.1f} s')):
      mine = '-' if ours[key] is None else fmt.format(ours[key])
      print(f"{label:26s} {mine:>19s} {fmt.format(torch[key]):>19s} "
            f"{ratio[key] if key in ratio else float('nan'):6.2f}x")
  if result.get('scaling'):
    print('\nscaling (device mode, steady s/epoch):')
    for r in result['scaling']:
      print(f"  batch {r['batch_size']:5d}  hidden {r['hidden_width']:5d}  "
            f"{r['s_per_epoch']:.3f}s")
  if result.get('sweeps'):
    import sweep_speed  # pylint: disable=g-import-not-at-top
    print()
    sweep_speed.print_table(result['sweeps'])


def main(argv):
  del argv
  # In-process compile times are cold compiles; the whole-process rows show the cache at work.
  jax.config.update('jax_enable_compilation_cache', False)
  peak = matmul_peak(repeats=5 if FLAGS.quick else 20)
  epochs = 5  # The notebook's job; steady state is the median of epochs 2-5.
  result = dict(machine=machine(), config=FLAGS.config, matmul_peak_gflops=peak,
                modes=[measure_mode(FLAGS.config, mode, peak, epochs) for mode in FLAGS.modes])
  if FLAGS.whole_process:
    result['whole_process'] = [r for mode in FLAGS.modes
                               for r in whole_process(FLAGS.config, mode)]
  if FLAGS.references:
    result['references'] = references(load_config(FLAGS.config).model.name)
    result['side_by_side'] = side_by_side(result)
    result['against_references'] = against_references(result)
  if not FLAGS.quick:
    result['seeds'] = seeds_scaling(FLAGS.config)
    result['scaling'] = scaling(FLAGS.config)
  if FLAGS.sweeps if FLAGS.sweeps is not None else not FLAGS.quick:
    import sweep_speed  # pylint: disable=g-import-not-at-top
    result['sweeps'] = dict(
        replicas=sweep_speed.replica_scaling(FLAGS.config, map(int, FLAGS.sweep_replicas)),
        wall=sweep_speed.wall_against_processes(FLAGS.config))
  print_table(result)
  print(json.dumps(result))
  if FLAGS.json_out:
    pathlib.Path(FLAGS.json_out).write_text(json.dumps(result, indent=2))


if __name__ == '__main__':
  app.run(main)
