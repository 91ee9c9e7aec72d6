r"""Own data, measured: a real non-MNIST dataset as a user lays it out, and a 60,000-PNG folder.

  python benchmarks/own_data.py --sklearn_python=/tmp/keras-venv/bin/python \
      --keras_python=/tmp/keras-venv/bin/python --out=/tmp/own_data

1. Accuracy. scikit-learn's `load_digits` (1,797 real 8x8 handwritten digits, 16 grey levels,
   shipped inside the scikit-learn wheel) is exported by `--sklearn_python` with a seeded 80/20
   split per class, as a PNG folder (out/digits/<split>/<digit>/NNNN.png) and as an .npz
   (out/digits.npz), pixels round(v * 255 / 16). configs/mlp.py then trains on each by config
   alone (`python run.py --config.dataset=image_folder:... / npz:...`), seeds 0..N-1, against
   the notebook's Keras model (benchmarks/reference_keras.py's: Dense(512, relu) ->
   Dense(10, softmax), RMSprop(1e-3), 5 epochs, batch 128) on the same .npz, same seeds, run by
   `--keras_python` with KERAS_BACKEND=jax (Keras installs without TensorFlow).
2. Decoding speed. MNIST's 60,000 training images (TFDS_DATA_DIR) written as PNGs with PIL
   (out/mnist_png/train/<digit>/NNNNN.png, plus the 10,000 test images), then loaded by
   `input_pipeline.load('image_folder:...')` in a fresh process twice: the first decodes and
   caches, the second reads the cache. Each process reports the load's seconds.

Prints one JSON line per measurement and writes them all to out/own_data.json. The subcommands
(--step=...) are what the other interpreters run.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # This checkout's mnist_jax, not an installed one.


def export_digits(out: pathlib.Path, seed: int = 0) -> dict:
  """(sklearn's interpreter) The digits as an .npz and a PNG folder, 80/20 per class."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = np.round(digits.images * 255 / 16).astype(np.uint8)  # [1797, 8, 8], 0..16 -> 0..255
  rng = np.random.default_rng(seed)
  test = np.zeros(len(images), bool)
  for label in range(10):
    members = rng.permutation(np.flatnonzero(digits.target == label))
    test[members[:round(0.2 * len(members))]] = True
  arrays = {}
  for split, chosen in (('train', ~test), ('test', test)):
    arrays[f'{split}_images'], arrays[f'{split}_labels'] = images[chosen], digits.target[chosen]
    for i, (image, label) in enumerate(zip(images[chosen], digits.target[chosen])):
      folder = out / 'digits' / split / str(label)
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(folder / f'{i:04d}.png')
  np.savez(out / 'digits.npz', class_names=np.array([str(i) for i in range(10)]), **arrays)
  return dict(step='export_digits', train=int((~test).sum()), test=int(test.sum()))


def keras_digits(npz: pathlib.Path, seed: int) -> dict:
  """(Keras's interpreter) The notebook's model on the .npz's splits."""
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(seed)
  data = np.load(npz)
  x = {s: data[f'{s}_images'].reshape(len(data[f'{s}_images']), -1).astype('float32') / 255
       for s in ('train', 'test')}
  y = {s: keras.utils.to_categorical(data[f'{s}_labels'], 10) for s in ('train', 'test')}
  model = keras.Sequential([keras.Input((x['train'].shape[1],)),
                            keras.layers.Dense(512, activation='relu'),
                            keras.layers.Dense(10, activation='softmax')])
  model.compile(optimizer='rmsprop', loss='categorical_crossentropy', metrics=['accuracy'])
  model.fit(x['train'], y['train'], epochs=5, batch_size=128, verbose=0)
  _, accuracy = model.evaluate(x['test'], y['test'], verbose=0)
  return dict(step='keras', framework='keras ' + keras.__version__, seed=seed,
              test_accuracy=float(accuracy))


def ours(dataset: str, seed: int, workdir: pathlib.Path, env: dict) -> dict:
  """configs/mlp.py on `dataset`, by config alone, through run.py."""
  command = [sys.executable, str(REPO / 'run.py'), f'--config={REPO / "configs" / "mlp.py"}',
             f'--config.dataset={dataset}', f'--config.seed={seed}', f'--workdir={workdir}']
  subprocess.run(command, env=env, check=True, capture_output=True, text=True)
  summary = json.loads((workdir / 'summary.json').read_text())
  return dict(step='ours', dataset=dataset.split(':')[0], seed=seed,
              test_accuracy=summary['test_accuracy'])


def write_mnist_pngs(out: pathlib.Path) -> dict:
  """MNIST's train and test images as PNGs, as a user's folder would hold them."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from mnist_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  _, splits = input_pipeline.load('mnist', '', ('train', 'test'), download=False, cache_dir=None)
  for split, data in splits.items():
    for i, (image, label) in enumerate(zip(data.image, data.label)):
      folder = out / split / str(label)
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image[..., 0]).save(folder / f'{i:05d}.png')
  return dict(step='write_mnist_pngs', seconds=time.perf_counter() - start)


def load_folder(root: pathlib.Path, cache: pathlib.Path) -> dict:
  """(A fresh process) One load of the folder's train split; decoded or from the cache."""
  start = time.perf_counter()
  from mnist_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  imported = time.perf_counter()
  info, splits = input_pipeline.load(f'image_folder:{root}', '', ('train',), download=False,
                                     cache_dir=epath.Path(cache))
  return dict(step='load_folder', load_seconds=time.perf_counter() - imported,
              import_seconds=imported - start, examples=len(splits['train']),
              image_shape=list(info.image_shape),
              cached_files=sorted(p.name for p in (cache / 'data').glob('*.npz')))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='/tmp/own_data')
  parser.add_argument('--sklearn_python', default=sys.executable)
  parser.add_argument('--keras_python', default=sys.executable)
  parser.add_argument('--seeds', type=int, default=5)
  parser.add_argument('--skip', default='', help="comma-separated: 'accuracy', 'decoding'")
  parser.add_argument('--step', default='', help='(internal) one step, for another interpreter')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.step:
    result = dict(export_digits=lambda: export_digits(out),
                  keras=lambda: keras_digits(out / 'digits.npz', args.seed),
                  load_folder=lambda: load_folder(out / 'mnist_png', out / 'cache'))[args.step]()
    print(json.dumps(result), flush=True)
    return

  results = []

  def record(result):
    print(json.dumps(result), flush=True)
    results.append(result)

  def step(python, name, seed=0, env=None):
    done = subprocess.run([python, __file__, f'--out={out}', f'--step={name}', f'--seed={seed}'],
                          check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])

  env = dict(os.environ, MNIST_JAX_CACHE=str(out / 'run_cache'), TF_CPP_MIN_LOG_LEVEL='2')
  if 'accuracy' not in args.skip:
    record(step(args.sklearn_python, 'export_digits'))
    for seed in range(args.seeds):
      record(step(args.keras_python, 'keras', seed, dict(env, KERAS_BACKEND='jax')))
      for dataset in (f'image_folder:{out / "digits"}', f'npz:{out / "digits.npz"}'):
        kind = dataset.split(':')[0]
        record(ours(dataset, seed, out / 'workdirs' / f'{kind}-{seed}', env))
    mean = lambda step, dataset=None: statistics.mean(
        r['test_accuracy'] for r in results
        if r['step'] == step and r.get('dataset', dataset) == dataset)
    record(dict(step='accuracy_means', seeds=args.seeds, keras=mean('keras'),
                image_folder=mean('ours', 'image_folder'), npz=mean('ours', 'npz')))
  if 'decoding' not in args.skip:
    if not (out / 'mnist_png' / 'train').exists():
      record(write_mnist_pngs(out / 'mnist_png'))
    subprocess.run(['rm', '-rf', str(out / 'cache')], check=True)
    for attempt in ('first (decodes and caches)', 'second (reads the cache)'):
      record(dict(step(sys.executable, 'load_folder', env=env), run=attempt))
  (out / 'own_data.json').write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
  main()
