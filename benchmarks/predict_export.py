r"""Predict and export, measured on the real MNIST test set (TFDS_DATA_DIR).

  TFDS_DATA_DIR=../shared/data/tensorflow_datasets python benchmarks/predict_export.py \
      --configs=mlp,cnn_bn --out=/tmp/predict_export

Per config (trained by `python run.py --config=configs/<name>.py` into out/<name>/, unless a
summary.json is there already):
1. `--mode=predict` over the 10,000 test images written as PNG files (out/test_png/, PIL,
   <index>_<label>.png), as a fresh process, twice (the first fills the compilation cache):
   its wall time, with the decoding, as images per second, and the accuracy of its CSV
   against the file names' labels, beside the run's test accuracy in summary.json.
2. `--mode=export`, then both artifacts on all 10,000 test images (export.check) against
   `inference.load(workdir).predict`: the share of equal labels, the largest difference.
3. `inference.load` plus one `predict` of one image in a fresh process (`python -c`), timed
   from outside (the interpreter's start included), once to fill the cache, then 5 times.
Also the host's float32 matmul GFLOP/s, measured in the same run, to place the figures.

Prints one JSON line per measurement and writes them all to out/predict_export.json.
"""

import argparse
import csv
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # This checkout's mnist_jax, not an installed one.

ONE_IMAGE = '''
import numpy as np
from mnist_jax import inference
model = inference.load({workdir!r})
print(model.predict(np.zeros((1, 28, 28, 1), np.uint8)).shape)
'''


def _run(args, env) -> tuple[float, subprocess.CompletedProcess]:
  start = time.perf_counter()
  out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                       text=True, check=False)
  seconds = time.perf_counter() - start
  if out.returncode:
    raise SystemExit(f'{args} failed ({out.returncode}): {out.stderr[-2000:]}')
  return seconds, out


def write_pngs(folder: pathlib.Path):
  """The test split as PNGs; returns (images, labels)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from mnist_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  _, splits = input_pipeline.load('mnist', '', ('test',), download=False, cache_dir=None)
  images, labels = splits['test'].image, splits['test'].label
  if not folder.is_dir() or len(list(folder.glob('*.png'))) != len(labels):
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
      Image.fromarray(image[..., 0]).save(folder / f'{i:05d}_{label}.png')
  return np.asarray(images), np.asarray(labels)


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    f(a).block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def measure(name: str, out: pathlib.Path, images, labels, env) -> list[dict]:
  from mnist_jax import export  # pylint: disable=g-import-not-at-top
  from mnist_jax import inference  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  workdir = out / name
  if not (workdir / 'summary.json').exists():
    seconds, _ = _run(['run.py', f'--config=configs/{name}.py', f'--workdir={workdir}'], env)
    print(f'trained {name} in {seconds:.0f}s', file=sys.stderr)
  summary = json.loads((workdir / 'summary.json').read_text())
  results = []

  for attempt in ('first (compiles)', 'second (cached)'):
    csv_path = out / f'{name}-predictions.csv'
    seconds, _ = _run(['run.py', f'--config=configs/{name}.py', '--mode=predict',
                       f'--workdir={workdir}', f'--images={out}/test_png/*.png',
                       f'--output={csv_path}'], env)
    with open(csv_path, newline='') as f:
      rows = list(csv.DictReader(f))
    right = sum(row['prediction'] == row['path'].rsplit('_', 1)[1][:-4] for row in rows)
    results.append(dict(config=name, measurement='predict_png', attempt=attempt,
                        images=len(rows), seconds=seconds, images_per_sec=len(rows) / seconds,
                        accuracy=right / len(rows), run_test_accuracy=summary['test_accuracy'],
                        equal=right == round(summary['test_accuracy'] * len(rows))))
    print(json.dumps(results[-1]), flush=True)

  seconds, _ = _run(['run.py', f'--config=configs/{name}.py', '--mode=export',
                     f'--workdir={workdir}'], env)
  model = inference.load(str(workdir))
  expected = model.predict(images)
  checked = export.check(workdir / 'export', images, expected)
  results.append(dict(config=name, measurement='export', seconds=seconds, images=len(images),
                      predict_accuracy=float(np.mean(expected.argmax(-1) == labels)),
                      **{f'{k}_{m}': v for k, d in checked.items() for m, v in d.items()},
                      bytes={p.name: p.stat().st_size for p in (workdir / 'export').iterdir()}))
  print(json.dumps(results[-1]), flush=True)

  code = ONE_IMAGE.format(workdir=str(workdir))
  _run(['-c', code], env)  # Fills the cache for the one-image program.
  times = [_run(['-c', code], env)[0] for _ in range(5)]
  results.append(dict(config=name, measurement='load_and_predict_one_image_fresh_process',
                      seconds=times, median_s=statistics.median(times), max_s=max(times)))
  print(json.dumps(results[-1]), flush=True)
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='mlp,cnn_bn')
  parser.add_argument('--out', default='/tmp/predict_export')
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, MNIST_JAX_CACHE=str(out / 'cache'), TF_CPP_MIN_LOG_LEVEL='2')
  os.environ['MNIST_JAX_CACHE'] = env['MNIST_JAX_CACHE']
  images, labels = write_pngs(out / 'test_png')
  results = [dict(measurement='host_f32_matmul_gflops_before', value=matmul_gflops())]
  for name in args.configs.split(','):
    results += measure(name, out, images, labels, env)
  results.append(dict(measurement='host_f32_matmul_gflops_after', value=matmul_gflops()))
  print(json.dumps(results[0]), json.dumps(results[-1]), flush=True)
  (out / 'predict_export.json').write_text(json.dumps(results, indent=2) + '\n')


if __name__ == '__main__':
  main()
