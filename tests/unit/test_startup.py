"""What a warm run does not pay for: imports it does not need, TFDS's registry on a cache hit."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import tensorflow_datasets as tfds

from mnist_jax import input_pipeline
from mnist_jax.infra import process


def _modules_after(code: str) -> list[str]:
  """Which of the heavy optional modules a fresh interpreter has imported after `code`."""
  script = textwrap.dedent(code) + textwrap.dedent('''
      import sys
      print(sorted(m for m in ('matplotlib', 'tensorboardX', 'google.cloud.storage')
                   if m in sys.modules))
  ''')
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                       check=True)
  return out.stdout.strip().splitlines()[-1]


def test_importing_the_training_loop_imports_no_matplotlib_nor_tensorboardx():
  assert _modules_after('import mnist_jax.train') == '[]'


def test_tensorboard_writer_without_google_cloud_storage(tmp_path):
  # tensorboardX's own GCS writer would import google-cloud-storage (~0.2 s); event files in a
  # bucket go through gcsfs (storage.register_tensorboard_writers) instead.
  listed = _modules_after(f'''
      from etils import epath
      from mnist_jax import writers
      logger = writers.MetricLogger(epath.Path({str(tmp_path)!r}), tensorboard=True)
      logger.write(3, dict(epoch=1, train_loss=0.5))
      logger.close()
      from tensorboardX import record_writer
      assert type(record_writer.REGISTERED_FACTORIES['gs']).__name__ == (
          '_TensorboardWriterFactory')
  ''')
  assert listed == "['tensorboardX']"
  # Kept out of tensorboardX's import only: importable afterwards.
  _modules_after('from mnist_jax.infra import storage; storage.tensorboardx(); '
                 'import google.cloud.storage')
  assert [p.name.startswith('events.out.tfevents.') for p in tmp_path.iterdir()].count(True) == 1


H, W = 6, 5


def _store(data_dir, version='1.0.0'):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  arrays = {split: (rng.integers(0, 256, (n, H, W, 1), dtype=np.uint8), rng.integers(0, 3, n))
            for split, n in (('train', 12), ('test', 4))}
  features = tfds.features.FeaturesDict(dict(
      image=tfds.features.Image(shape=(H, W, 1)),
      label=tfds.features.ClassLabel(names=['a', 'b', 'c'])))
  tfds.dataset_builders.store_as_tfds_dataset(
      name='tiny_digits', version=version, features=features, data_dir=data_dir,
      disable_shuffling=True,
      split_datasets={split: tf.data.Dataset.from_tensor_slices(dict(image=x, label=y))
                      for split, (x, y) in arrays.items()})
  return arrays


def test_a_warm_load_skips_the_tfds_registry_until_the_files_change(tmp_path, monkeypatch):
  arrays = _store(tmp_path / 'tfds')
  cache_dir = process.resolve_cache_dir(str(tmp_path / 'cache'))
  registry = []  # Each call of tfds.builder (through input_pipeline._builder).
  real_builder = input_pipeline._builder
  monkeypatch.setattr(input_pipeline, '_builder',
                      lambda *a: registry.append(a) or real_builder(*a))

  def load():
    info, splits = input_pipeline.load('tiny_digits', str(tmp_path / 'tfds'), ('train', 'test'),
                                       download=False, cache_dir=cache_dir)
    assert info.class_names == ('a', 'b', 'c') and info.num_classes == 3
    np.testing.assert_array_equal(splits['train'].image, arrays['train'][0])
    np.testing.assert_array_equal(splits['test'].label, arrays['test'][1])
    return sorted(p.name for p in (tmp_path / 'cache' / 'data').glob('*.npz'))

  cached = load()  # Cold: the registry, the files decoded and cached.
  assert len(registry) == 1 and len(cached) == 2
  assert load() == cached and len(registry) == 1  # Warm: neither.
  assert input_pipeline.metadata_builder('tiny_digits', str(tmp_path / 'tfds'),
                                         cache_dir).info.splits['train'].num_examples == 12
  assert len(registry) == 1

  shard = next((tmp_path / 'tfds' / 'tiny_digits' / '1.0.0').glob('*train.tfrecord*'))
  os.utime(shard, ns=(1, 1))  # A file changed: its key changed; the registry again.
  assert len(set(load()) - set(cached)) == 2 and len(registry) == 2
  assert len(load()) == 4 and len(registry) == 2  # And that is remembered.

  _store(tmp_path / 'tfds', version='1.0.1')  # A version beside it: the registry decides.
  load()
  assert len(registry) == 3


def test_without_a_cache_dir_the_registry_is_asked(tmp_path, monkeypatch):
  _store(tmp_path / 'tfds')
  registry = []
  real_builder = input_pipeline._builder
  monkeypatch.setattr(input_pipeline, '_builder',
                      lambda *a: registry.append(a) or real_builder(*a))
  for _ in range(2):
    input_pipeline.load('tiny_digits', str(tmp_path / 'tfds'), ('train',), download=False,
                        cache_dir=None)
  assert len(registry) == 2


def _fresh_load(data_dir, cache_dir, specs) -> dict:
  """input_pipeline.load in a fresh interpreter, then an MLP built: what it imported, and the
  arrays it gave (as lists)."""
  script = textwrap.dedent(f'''
      import json, sys
      from mnist_jax import input_pipeline, models
      from mnist_jax.infra import process
      info, splits = input_pipeline.load(
          'tiny_digits', {str(data_dir)!r}, {tuple(specs)!r}, download=False,
          cache_dir=process.resolve_cache_dir({str(cache_dir)!r}))
      models.build(dict(name='mlp', hidden_sizes=(8,)), info.num_classes)
      print(json.dumps(dict(
          imported=[m for m in ('tensorflow_datasets', 'tensorflow', 'flax.nnx')
                    if m in sys.modules],
          info=[info.num_classes, list(info.class_names), list(info.image_shape)],
          splits={{spec: [s.image.tolist(), s.label.tolist()] for spec, s in splits.items()}})))
  ''')
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  import json  # pylint: disable=g-import-not-at-top
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_warm_load_imports_neither_tfds_nor_nnx_and_gives_the_same_data(tmp_path):
  arrays = _store(tmp_path / 'tfds')
  cache = tmp_path / 'cache'
  expect = lambda split, n=None: [arrays[split][0][:n].tolist(), arrays[split][1][:n].tolist()]

  cold = _fresh_load(tmp_path / 'tfds', cache, ('train', 'test'))
  assert 'tensorflow_datasets' in cold['imported']  # (The check itself works.)
  assert cold['info'] == [3, ['a', 'b', 'c'], [H, W, 1]]
  assert cold['splits'] == {'train': expect('train'), 'test': expect('test')}

  warm = _fresh_load(tmp_path / 'tfds', cache, ('train', 'test'))
  assert warm['imported'] == []  # No TFDS, no TensorFlow, no flax.nnx for a Linen model.
  assert warm['info'] == cold['info'] and warm['splits'] == cold['splits']

  # A slice: TFDS's own rounding, so TFDS is imported for it, and the data are the same.
  sliced = _fresh_load(tmp_path / 'tfds', cache, ('train[:50%]', 'test'))
  assert 'tensorflow_datasets' in sliced['imported']
  assert sliced['splits'] == {'train[:50%]': expect('train', 6), 'test': expect('test')}

  # A damaged cached split, on the warm path: decoded again from the files, through TFDS.
  train_npz = next((cache / 'data').glob('tiny_digits-*-train.npz'))
  train_npz.write_bytes(train_npz.read_bytes()[:100])
  again = _fresh_load(tmp_path / 'tfds', cache, ('train', 'test'))
  assert again['splits'] == cold['splits'] and 'tensorflow_datasets' in again['imported']
