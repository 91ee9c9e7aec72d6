r"""input_mode=stream against device, measured: peak host memory as the dataset grows, and speed.

  TFDS_DATA_DIR=../shared/data/tensorflow_datasets python benchmarks/stream_memory.py \
      --out=benchmarks/results/cpu-2026-12-04-stream.json

1. Memory. A 4x-MNIST training set (240,000 examples: MNIST's training records four times
   over, in ArrayRecord, with MNIST's test split) is written into a temporary TFDS data dir.
   configs/mlp.py then trains one epoch on MNIST and on the 4x set, in stream and in device
   mode (and in stream mode with MALLOC_ARENA_MAX=2: glibc's malloc held to 2 arenas, for
   comparison with what stream mode sets itself, process.return_freed_chunks), each run a
   fresh process (`run.py`)
   in a fresh workdir, --memory_repeats times (alternated; the growth is of the medians: which
   thread frees a chunk into which arena varies from run to run); its peak RSS comes from
   `os.wait4` in a small launcher (see LAUNCHER), with RssAnon and RssFile's peaks sampled from
   /proc. What grows from MNIST to the 4x set is the mode's cost of the data: device mode holds
   the decoded split (47 MB for MNIST, 188 MB for 4x) in host arrays and again in the (CPU)
   device's buffers; stream mode holds a few chunks of steps. MNIST's ArrayRecord copy and both
   datasets' decoded caches are prepared first (in this process), so no measured run converts
   or decodes whole.
2. Speed. The steady (second) epoch of configs/cnn.py and of configs/mlp.py, in device and
   stream mode, run alternately (device, stream, stream, device, ...) so that a busy host slows
   both alike; the ratio is stream's steady epoch time over device's, per pair and the median.

Prints one JSON line per measurement and writes them all to --out.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # This checkout's mnist_jax, not an installed one.

TIMES = 4  # The larger training set is MNIST's this many times over.


def build_4x(mnist_arrayrecord: pathlib.Path, data_dir: pathlib.Path) -> pathlib.Path:
  """data_dir/mnist/3.0.1: MNIST's ArrayRecord train records TIMES times over, its test split."""
  import shutil  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
  out = data_dir / 'mnist' / '3.0.1'
  out.mkdir(parents=True)
  source = tfds.builder_from_directory(mnist_arrayrecord).as_data_source('train').data_source
  n = len(source)

  def records():
    for i in range(TIMES * n):
      yield i, source[i % n]

  writer = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.ARRAY_RECORD]
  writer.write_examples(out / 'mnist-train.array_record-00000-of-00001', records())
  shutil.copy(mnist_arrayrecord / 'mnist-test.array_record-00000-of-00001', out)
  shutil.copy(mnist_arrayrecord / 'features.json', out)
  info = json.loads((mnist_arrayrecord / 'dataset_info.json').read_text())
  for split in info['splits']:
    if split['name'] == 'train':
      split['shardLengths'] = [str(TIMES * n)]
      split['numBytes'] = str(TIMES * int(split['numBytes']))
  (out / 'dataset_info.json').write_text(json.dumps(info, indent=2))
  return out


def prepare(data_dirs: dict, cache_dir: pathlib.Path) -> pathlib.Path:
  """MNIST's ArrayRecord copy in the cache; every dataset's decoded splits cached (device mode
  reads them); returns the copy's folder."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from mnist_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from mnist_jax import stream  # pylint: disable=g-import-not-at-top
  cache = epath.Path(cache_dir)
  builder = input_pipeline.find_builder('mnist', data_dirs['mnist'], download=False)
  folder = stream.arrayrecord_folder(builder, cache)
  return pathlib.Path(folder)


def cache_decoded(data_dir: str, cache_dir: pathlib.Path) -> None:
  from etils import epath  # pylint: disable=g-import-not-at-top
  from mnist_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  input_pipeline.load('mnist', data_dir, ('train', 'test'), download=False,
                      cache_dir=epath.Path(cache_dir))


# Starts the command and writes its peak RSS to argv[1] as JSON: ru_maxrss (KB), and the peaks
# of /proc's RssAnon (memory the process allocated) and RssFile (file pages mapped, e.g. the
# ArrayRecord files read; the kernel can drop them) sampled every 50 ms. A small process in
# between: a child forked from this (large) one would report this process's RSS as its own
# peak, since Linux carries the peak of the memory an exec replaces into ru_maxrss.
LAUNCHER = """
import json, os, subprocess, sys, time
pid = subprocess.Popen(sys.argv[2:]).pid
peak = dict(anon_kb=0, file_kb=0)
while True:
  done, status, usage = os.wait4(pid, os.WNOHANG)
  if done:
    break
  try:
    fields = dict(l.split(':', 1) for l in open(f'/proc/{pid}/status').read().splitlines())
    for key, name in (('anon_kb', 'RssAnon'), ('file_kb', 'RssFile')):
      peak[key] = max(peak[key], int(fields.get(name, '0 kB').split()[0]))
  except (OSError, ValueError):
    pass
  time.sleep(0.05)
open(sys.argv[1], 'w').write(json.dumps(dict(maxrss_kb=usage.ru_maxrss,
                                             cpu_s=usage.ru_utime + usage.ru_stime, **peak)))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run(config: str, workdir: pathlib.Path, *flags: str, env: dict | None = None) -> dict:
  """run.py in a fresh process and a fresh workdir (no resume): its peak RSS (MB), CPU and wall
  time and metrics.jsonl records."""
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(workdir, ignore_errors=True)
  command = [sys.executable, str(REPO / 'run.py'), f'--config={REPO / config}',
             f'--workdir={workdir}', *flags]
  peak_file = workdir.parent / f'{workdir.name}.peak_rss.json'
  start = time.perf_counter()
  with open(workdir.parent / f'{workdir.name}.log', 'w') as log:
    code = subprocess.call([sys.executable, '-c', LAUNCHER, str(peak_file), *command], cwd=REPO,
                           stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
  if code != 0:
    raise SystemExit(f'{" ".join(command)} failed: see {workdir.parent / workdir.name}.log')
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  summary = json.loads((workdir / 'summary.json').read_text())
  peak = json.loads(peak_file.read_text())
  return dict(peak_rss_mb=peak['maxrss_kb'] / 1024, peak_anon_mb=peak['anon_kb'] / 1024,
              peak_file_mb=peak['file_kb'] / 1024, wall_s=time.perf_counter() - start,
              cpu_s=peak['cpu_s'],
              epoch_seconds=[r['epoch_seconds'] for r in records],
              fingerprint=summary['param_fingerprint'], input_mode=summary['input_mode'],
              test_accuracy=summary['test_accuracy'])


def emit(results: list, **record) -> dict:
  print(json.dumps(record), flush=True)
  results.append(record)
  return record


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=str(REPO / 'benchmarks/results/cpu-2026-12-04-stream.json'))
  parser.add_argument('--pairs', type=int, default=2, help='device/stream pairs per config')
  parser.add_argument('--memory_repeats', type=int, default=1,
                      help='runs of each memory measurement (the growth is of the medians)')
  parser.add_argument('--speed_configs', default='configs/mlp.py,configs/cnn.py')
  parser.add_argument('--parts', default='memory,speed', help='what to measure')
  parser.add_argument('--tmp', default=None, help='scratch folder (default: a new temp dir)')
  args = parser.parse_args()
  mnist_dir = os.environ.get('TFDS_DATA_DIR')
  if not mnist_dir:
    raise SystemExit('set TFDS_DATA_DIR to a data dir that holds mnist/3.0.1')
  tmp = pathlib.Path(args.tmp or tempfile.mkdtemp(prefix='stream_memory-'))
  tmp.mkdir(parents=True, exist_ok=True)
  cache_dir = tmp / 'cache'
  data_dirs = dict(mnist=mnist_dir, mnist_4x=str(tmp / 'tfds_4x'))
  results = []

  start = time.perf_counter()
  copy = prepare(data_dirs, cache_dir)
  if not (tmp / 'tfds_4x').exists():
    build_4x(copy, tmp / 'tfds_4x')
  for data_dir in data_dirs.values():
    cache_decoded(data_dir, cache_dir)
  emit(results, step='prepare', seconds=time.perf_counter() - start, scratch=str(tmp))

  common = (f'--config.cache_dir={cache_dir}', '--config.download=False')
  memory = {}
  if 'memory' in args.parts:  # Not measured: fills the compilation cache, so that no
    for mode in ('device', 'stream'):  # measured run compiles (a cold one peaked ~90 MB higher).
      run('configs/mlp.py', tmp / f'warmup-{mode}', *common, f'--config.data_dir={mnist_dir}',
          f'--config.input_mode={mode}', '--config.num_epochs=1')
  # 'stream_arenas_2': stream mode with glibc's malloc held to 2 arenas (MALLOC_ARENA_MAX=2):
  # how much of stream mode's growth is memory freed but kept by the allocator's many arenas
  # (tf.data's threads each allocate in their own).
  variants = dict(device=('device', {}), stream=('stream', {}),
                  stream_arenas_2=('stream', dict(MALLOC_ARENA_MAX='2')))
  if 'memory' not in args.parts:
    variants = {}
  for repeat in range(args.memory_repeats):
    for name, data_dir in data_dirs.items():
      for variant, (mode, env) in variants.items():
        measured = run('configs/mlp.py', tmp / f'memory-{name}-{variant}', *common,
                       f'--config.data_dir={data_dir}', f'--config.input_mode={mode}',
                       '--config.num_epochs=1', env=env)
        memory.setdefault((name, variant), []).append(measured)
        emit(results, step='memory', dataset=name, mode=variant, env=env, repeat=repeat,
             **measured)

  def median(name, mode, key):
    return statistics.median(m[key] for m in memory[name, mode])

  for mode in variants:
    emit(results, step='memory_growth', mode=mode,
         train_examples=(60_000, TIMES * 60_000), repeats=args.memory_repeats,
         peak_rss_mb=(median('mnist', mode, 'peak_rss_mb'),
                      median('mnist_4x', mode, 'peak_rss_mb')),
         **{f'{kind}growth_mb': (median('mnist_4x', mode, f'peak_{key}_mb')
                                 - median('mnist', mode, f'peak_{key}_mb'))
            for kind, key in (('', 'rss'), ('anon_', 'anon'), ('file_', 'file'))})

  for config in args.speed_configs.split(',') if 'speed' in args.parts else ():
    steady = {'device': [], 'stream': []}
    for pair in range(args.pairs):
      # Each pair's first run swapped from pair to pair: a run after a run is not favoured.
      for mode in ('device', 'stream') if pair % 2 == 0 else ('stream', 'device'):
        measured = run(config, tmp / f'speed-{pathlib.Path(config).stem}-{mode}-{pair}', *common,
                       f'--config.data_dir={mnist_dir}', f'--config.input_mode={mode}',
                       '--config.num_epochs=2', '--config.write_report=False')
        steady[mode].append(measured['epoch_seconds'][1])
        emit(results, step='speed', config=config, mode=mode, pair=pair, **measured)
    ratios = [s / d for s, d in zip(steady['stream'], steady['device'])]
    emit(results, step='speed_ratio', config=config, steady_device_s=steady['device'],
         steady_stream_s=steady['stream'], stream_over_device=ratios,
         median_ratio=statistics.median(ratios), min_ratio=min(ratios), max_ratio=max(ratios),
         load_average=os.getloadavg())

  from mnist_jax import writers  # pylint: disable=g-import-not-at-top
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(backend='cpu', cores=os.cpu_count(),
                                 load_average=os.getloadavg(), versions=writers.versions(),
                                 results=results), indent=1) + '\n')
  print(f'wrote {out}', flush=True)


if __name__ == '__main__':
  main()
