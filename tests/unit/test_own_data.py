"""Your own data by config: an image folder, an .npz, a TFDS dataset the registry does not know,
split slices; trained end to end, and every bad input refused in one line with nothing written.

The folders and files are built here at run time: tiny (8x8 images), so each run is seconds.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

from matplotlib import text as mtext
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mnist_jax import datasets
from mnist_jax.infra import errors
from mnist_jax import input_pipeline
from mnist_jax import report
from mnist_jax import train
from mnist_jax.infra import process
from conftest import MLP_CONFIG_PATH
from conftest import REPO_ROOT
from conftest import load_config_module

CLASSES = ('cat', 'dog', 'owl')
H, W = 8, 8
HIDDEN = 16


def class_image(rng, label: int, shape=(H, W)) -> np.ndarray:
  """A learnable image: class c is bright in its own third of the rows, plus noise."""
  image = rng.integers(0, 60, shape, dtype=np.uint8)
  rows = slice(label * shape[0] // 3, (label + 1) * shape[0] // 3)
  image[rows] = rng.integers(180, 256, image[rows].shape, dtype=np.uint8)
  return image


def make_folder(root: pathlib.Path, counts=None, seed=0) -> dict:
  """root/<split>/<class>/NNN.png; returns {split: (images [N, H, W, 1], labels [N])} in the
  order the folder is read (class by class, files by name). 'owl' is missing from 'test'."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  counts = counts or dict(train=dict(cat=12, dog=12, owl=12), test=dict(cat=5, dog=4))
  rng = np.random.default_rng(seed)
  out = {}
  for split, per_class in counts.items():
    images, labels = [], []
    for name, count in per_class.items():
      (root / split / name).mkdir(parents=True, exist_ok=True)
      for i in range(count):
        image = class_image(rng, CLASSES.index(name))
        Image.fromarray(image).save(root / split / name / f'{i:03d}.png')
        images.append(image[..., None])
        labels.append(CLASSES.index(name))
    out[split] = (np.stack(images), np.array(labels, np.int32))
  return out


def make_npz(path: pathlib.Path, seed=0, **overrides) -> dict:
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (('train', 36), ('test', 9)):
    labels = np.arange(n) % 3
    arrays[f'{split}_images'] = np.stack([class_image(rng, l) for l in labels])
    arrays[f'{split}_labels'] = labels
  arrays['test_images'] = arrays['test_images'].astype(np.float32) / 255  # Floats in [0, 1].
  arrays['class_names'] = np.array(CLASSES)
  arrays.update(overrides)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return arrays


def own_dataset(tmp_path: pathlib.Path, kind: str) -> str:
  """config.dataset for a tiny dataset of `kind` ('image_folder' or 'npz') made in tmp_path."""
  if kind == 'npz':
    make_npz(tmp_path / 'data.npz')
    return f'npz:{tmp_path / "data.npz"}'
  make_folder(tmp_path / 'pets')
  return f'image_folder:{tmp_path / "pets"}'


def small_config(dataset: str, **overrides):
  config = load_config_module().get_config()
  config.dataset = dataset
  config.cache_dir = 'none'
  config.download = False
  config.model.hidden_sizes = (HIDDEN,)
  config.batch_size = 8
  config.eval_batch_size = 4
  config.num_epochs = 8
  config.learning_rate = 3e-3
  config.checkpoint_async = False
  config.write_tensorboard = False
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


NUM_PARAMS = H * W * HIDDEN + HIDDEN + HIDDEN * 3 + 3  # 8x8x1 images, 3 classes.


# --- An image folder, end to end ---------------------------------------------------------------

def test_image_folder_trains_end_to_end(tmp_path):
  root = tmp_path / 'pets'
  make_folder(root)
  (root / '.DS_Store').write_bytes(b'\0\1')  # Ignored wherever they are.
  (root / 'train' / 'Thumbs.db').write_bytes(b'\0')
  (root / 'train' / 'cat' / '.DS_Store').write_bytes(b'\0')
  (root / 'train' / '.ipynb_checkpoints').mkdir()
  workdir = tmp_path / 'workdir'
  summary = train.train_and_evaluate(small_config(f'image_folder:{root}'), str(workdir))
  assert summary['class_names'] == list(CLASSES)
  assert summary['num_params'] == NUM_PARAMS
  assert summary['steps'] == 8 * 5  # 36 examples in batches of 8: 5 steps an epoch.
  assert summary['test_accuracy'] * 9 == pytest.approx(round(summary['test_accuracy'] * 9))
  assert summary['test_accuracy'] >= 0.85  # Each class is bright in its own rows: learnable.
  assert json.loads((workdir / 'summary.json').read_text())['class_names'] == list(CLASSES)
  md = (workdir / 'report.md').read_text()
  assert 'The test split has no examples of 1 of the 3 classes: owl.' in md
  assert '| owl | 0 | (no examples) |' in md and '| cat | 5 |' in md


def test_image_folder_arrays_are_the_pixels_written(tmp_path):
  root = tmp_path / 'pets'
  written = make_folder(root)
  info, splits = input_pipeline.load(f'image_folder:{root}', '', ('train', 'test'),
                                     download=False, cache_dir=None)
  assert info.class_names == CLASSES and info.num_classes == 3 and info.image_shape == (H, W, 1)
  assert info.identity.startswith('image_folder-')
  for split in ('train', 'test'):
    np.testing.assert_array_equal(splits[split].image, written[split][0])
    np.testing.assert_array_equal(splits[split].label, written[split][1])
    assert splits[split].image.dtype == np.uint8 and splits[split].label.dtype == np.int32


def test_image_folder_is_cached_and_decoded_again_when_it_changes(tmp_path, monkeypatch):
  root, cache = tmp_path / 'pets', tmp_path / 'cache'
  written = make_folder(root)
  load = lambda: input_pipeline.load(f'image_folder:{root}', '', ('train', 'test'),
                                     download=False, cache_dir=process.resolve_cache_dir(str(cache)))
  first_info, _ = load()
  assert len(list((cache / 'data').glob('image_folder-*.npz'))) == 2
  decoded = []
  real = datasets._decode_image
  monkeypatch.setattr(datasets, '_decode_image', lambda *a: decoded.append(a[0]) or real(*a))
  info, splits = load()
  assert decoded == [] and info == first_info  # Read from the cache.
  np.testing.assert_array_equal(splits['train'].image, written['train'][0])
  # An edited file (same name, other pixels): train is decoded again, test is not.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  edited = root / 'train' / 'dog' / '003.png'
  Image.fromarray(np.full((H, W), 7, np.uint8)).save(edited)
  os.utime(edited, ns=(10**18, 10**18))
  info, splits = load()
  assert len(decoded) == 36 and info.identity != first_info.identity
  assert (splits['train'].image[12 + 3] == 7).all()
  # A removed file: decoded again, one example fewer.
  decoded.clear()
  edited.unlink()
  _, splits = load()
  assert len(decoded) == 35 and len(splits['train']) == 35


def test_changed_folder_refuses_to_resume(tmp_path):
  root = tmp_path / 'pets'
  make_folder(root)
  workdir = tmp_path / 'workdir'
  config = small_config(f'image_folder:{root}', num_epochs=1, write_report=False)
  train.train_and_evaluate(config, str(workdir))
  config.num_epochs = 2  # Unchanged folder: resumes.
  assert train.train_and_evaluate(config, str(workdir))['steps'] == 10
  from PIL import Image  # pylint: disable=g-import-not-at-top
  edited = root / 'train' / 'cat' / '004.png'
  Image.fromarray(np.zeros((H, W), np.uint8)).save(edited)
  os.utime(edited, ns=(10**18, 10**18))
  config.num_epochs = 3
  # The same number of examples and steps: only the folder's identity tells the runs apart.
  with pytest.raises(errors.UserError, match=r'\(dataset_identity: saved .image_folder-') as e:
    train.train_and_evaluate(config, str(workdir))
  assert '\n' not in str(e.value) and 'train_examples' not in str(e.value)


def test_gray_and_colour_images_give_three_channels(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'mixed'
  written = make_folder(root, dict(train=dict(cat=2, dog=2), test=dict(cat=1, dog=1)))
  Image.fromarray(np.full((H, W, 3), (10, 20, 30), np.uint8)).save(root / 'train' / 'dog' / 'c.jpg',
                                                                   quality=100)
  _, splits = input_pipeline.load(f'image_folder:{root}', '', ('train', 'test'), download=False,
                                  cache_dir=None)
  assert splits['train'].image.shape == (5, H, W, 3) and splits['test'].image.shape == (2, H, W, 3)
  np.testing.assert_array_equal(splits['train'].image[0], np.repeat(written['train'][0][0], 3, -1))
  np.testing.assert_allclose(splits['train'].image[4].mean((0, 1)), (10, 20, 30), atol=2)


def test_image_size_resizes_images_of_other_sizes(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'sizes'
  make_folder(root, dict(train=dict(cat=2, dog=2), test=dict(cat=1, dog=1)))
  Image.fromarray(np.full((12, 10), 200, np.uint8)).save(root / 'train' / 'dog' / 'big.png')
  with pytest.raises(errors.UserError, match=r'big\.png is 12x10 \(HxW\), but .*000\.png is '
                                             r'8x8; set --config\.image_size'):
    input_pipeline.load(f'image_folder:{root}', '', ('train',), download=False, cache_dir=None)
  _, splits = input_pipeline.load(f'image_folder:{root}', '', ('train', 'test'), download=False,
                                  cache_dir=None, image_size=(6, 4))
  assert splits['train'].image.shape == (5, 6, 4, 1) and splits['test'].image.shape == (2, 6, 4, 1)
  np.testing.assert_array_equal(splits['train'].image[4], 200)  # dog/big.png, last.


# --- An .npz, end to end -----------------------------------------------------------------------

def test_npz_trains_end_to_end(tmp_path):
  make_npz(tmp_path / 'data.npz')
  workdir = tmp_path / 'workdir'
  summary = train.train_and_evaluate(small_config(f'npz:{tmp_path / "data.npz"}'), str(workdir))
  assert summary['class_names'] == list(CLASSES)
  assert summary['num_params'] == NUM_PARAMS
  assert summary['steps'] == 8 * 5
  assert summary['test_accuracy'] >= 0.85
  md = (workdir / 'report.md').read_text()
  assert '| owl | 3 |' in md and 'no examples of' not in md


@pytest.mark.parametrize('kind', ['image_folder', 'npz'])
def test_own_data_resumes_mid_epoch_to_the_uninterrupted_fingerprint(tmp_path, capsys, kind):
  """As after a kill -9 just past a mid-epoch checkpoint: the newer checkpoints go, and the
  rerun ends with the uninterrupted run's fingerprint (augmentation and dropout-free MLP; the
  plan is rebuilt from the step alone, whatever the data's source)."""
  dataset = own_dataset(tmp_path, kind)
  config = small_config(dataset, num_epochs=2, checkpoint_every_steps=3, checkpoint_keep=10,
                        augment='shift(1)', write_report=False)
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  workdir = tmp_path / 'interrupted'
  assert train.train_and_evaluate(config, str(workdir))['param_fingerprint'] == (
      straight['param_fingerprint'])
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert 3 in saved and saved[-1] == 10, saved  # 5 steps an epoch: step 3 is mid-epoch 1.
  for step in saved:
    if step > 3:
      shutil.rmtree(workdir / 'checkpoints' / str(step))
  capsys.readouterr()
  resumed = train.train_and_evaluate(config, str(workdir))
  assert 'resumed from the checkpoint at step 3' in capsys.readouterr().out
  assert resumed['param_fingerprint'] == straight['param_fingerprint']
  assert resumed['steps'] == 10


def test_npz_floats_become_uint8_by_rounding(tmp_path):
  arrays = make_npz(tmp_path / 'data.npz', test_images=np.array(
      [[[0.0, 1.0], [0.5, 0.002]]] * 3, np.float64), test_labels=np.array([0, 1, 2]))
  _, resized = input_pipeline.load(f'npz:{tmp_path / "data.npz"}', '', ('train', 'test'),
                                   download=False, cache_dir=None, image_size=(H, W))
  assert resized['test'].image.shape == (3, H, W, 1)  # Resized to the train images' size.
  info, splits = input_pipeline.load(f'npz:{tmp_path / "data.npz"}', '', ('test',),
                                     download=False, cache_dir=None)
  assert info.image_shape == (2, 2, 1)
  np.testing.assert_array_equal(splits['test'].image[0, ..., 0], [[0, 255], [128, 1]])
  np.testing.assert_array_equal(splits['test'].label, arrays['test_labels'])


def test_npz_without_class_names_numbers_the_classes(tmp_path):
  make_npz(tmp_path / 'data.npz', class_names=None)
  info, splits = input_pipeline.load(f'npz:{tmp_path / "data.npz"}', '', ('train',),
                                     download=False, cache_dir=None)
  assert info.class_names == ('0', '1', '2') and info.num_classes == 3
  assert splits['train'].image.shape == (36, H, W, 1)


# --- Slices of splits ---------------------------------------------------------------------------

@pytest.mark.parametrize('kind', ['image_folder', 'npz'])
def test_split_slices_of_own_data(tmp_path, kind):
  dataset = own_dataset(tmp_path, kind)
  _, splits = input_pipeline.load(dataset, '', ('train', 'train[:90%]', 'train[90%:]',
                                                'train[-5:]+test[:2]'),
                                  download=False, cache_dir=None)
  whole = splits['train']
  assert (len(splits['train[:90%]']), len(splits['train[90%:]'])) == (32, 4)  # TFDS's rounding.
  np.testing.assert_array_equal(
      np.concatenate([splits['train[:90%]'].image, splits['train[90%:]'].image]), whole.image)
  np.testing.assert_array_equal(splits['train[90%:]'].label, whole.label[32:])
  assert len(splits['train[-5:]+test[:2]']) == 7
  with pytest.raises(errors.ConfigError, match=r"split 'val' of .* is invalid .*its splits: "
                                               r"test, train\."):
    input_pipeline.load(dataset, '', ('val',), download=False, cache_dir=None)


def test_split_slices_of_a_tfds_dataset():
  with tfds.testing.mock_data(num_examples=50):
    _, splits = input_pipeline.load('mnist', '', ('train', 'train[:90%]', 'train[90%:]'),
                                    download=False, cache_dir=None)
  assert (len(splits['train[:90%]']), len(splits['train[90%:]'])) == (45, 5)
  # Mock data draws new examples per read; the slices come from the one 'train' read.
  np.testing.assert_array_equal(splits['train[90%:]'].image, splits['train'].image[45:])


def test_a_validation_split_trains(tmp_path):
  make_folder(tmp_path / 'pets')
  summary = train.train_and_evaluate(
      small_config(f'image_folder:{tmp_path / "pets"}', train_split='train[:75%]',
                   eval_split='train[75%:]', num_epochs=1, write_report=False),
      str(tmp_path / 'workdir'))
  assert summary['steps'] == 4  # 27 of the 36 examples, in batches of 8.


# --- A TFDS dataset that the registry does not know ---------------------------------------------

def test_a_dataset_stored_with_store_as_tfds_dataset_loads_by_name(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  arrays = {split: (rng.integers(0, 256, (n, H, W, 1), dtype=np.uint8), rng.integers(0, 3, n))
            for split, n in (('train', 20), ('test', 6))}
  features = tfds.features.FeaturesDict(dict(
      image=tfds.features.Image(shape=(H, W, 1)), label=tfds.features.ClassLabel(names=CLASSES)))
  tfds.dataset_builders.store_as_tfds_dataset(
      name='own_pets', version='1.0.0', features=features, data_dir=tmp_path / 'tfds',
      disable_shuffling=True,  # So the files hold the examples in the order given.
      split_datasets={split: tf.data.Dataset.from_tensor_slices(dict(image=x, label=y))
                      for split, (x, y) in arrays.items()})
  cache_dir = process.resolve_cache_dir(str(tmp_path / 'cache'))
  for _ in range(2):  # Decoded, then read from the cache.
    info, splits = input_pipeline.load('own_pets', str(tmp_path / 'tfds'), ('train', 'test[:50%]'),
                                       download=False, cache_dir=cache_dir)
    assert info.class_names == CLASSES and info.image_shape == (H, W, 1)
    np.testing.assert_array_equal(splits['train'].image, arrays['train'][0])
    np.testing.assert_array_equal(splits['train'].label, arrays['train'][1])
    np.testing.assert_array_equal(splits['test[:50%]'].label, arrays['test'][1][:3])
  assert len(list((tmp_path / 'cache' / 'data').glob('own_pets-1.0.0-*.npz'))) == 2
  with pytest.raises(errors.ConfigError, match=r"unknown TFDS dataset 'own_petz'.*image_folder:"
                                               r"PATH, npz:PATH\.$"):
    input_pipeline.load('own_petz', str(tmp_path / 'tfds'), ('train',), download=False,
                        cache_dir=None)


# --- Bad input: one line, nothing written ------------------------------------------------------

def _truncated_png(root):
  path = root / 'train' / 'cat' / '001.png'
  path.write_bytes(path.read_bytes()[:40])


def _class_file(root):
  (root / 'train' / 'notes').write_text('not a class')


def _empty_split(root):
  for name in ('cat', 'dog'):
    for f in (root / 'test' / name).iterdir():
      f.unlink()


def _empty_root(root):
  for split in ('train', 'test'):
    for class_dir in (root / split).iterdir():
      for f in class_dir.iterdir():
        f.unlink()
      class_dir.rmdir()
    (root / split).rmdir()


def _only_junk(root):
  _empty_root(root)
  (root / 'train' / 'cat').mkdir(parents=True)
  (root / 'train' / 'cat' / 'notes.txt').write_text('x')
  (root / 'test' / 'cat').mkdir(parents=True)


FOLDER_CASES = {
    'missing path': (lambda root: None, 'image_folder:{root}/nope', errors.UserError,
                     r'/nope does not exist; expected a folder root/<split>/<class>/\*\.png'),
    'empty folder': (_empty_root, 'image_folder:{root}', errors.UserError,
                     r'holds no split folders'),
    'split with no images': (_empty_split, 'image_folder:{root}', errors.UserError,
                             r"split 'test' holds no images; expected .*/test/<class>/\*\.png"),
    'split with only non-images': (_only_junk, 'image_folder:{root}', errors.UserError,
                                   r"split 'train' holds no images"),
    'truncated image': (_truncated_png, 'image_folder:{root}', errors.UserError,
                        r'cannot decode .*/train/cat/001\.png \(.*\); every image is read '
                        r'\(none is skipped\)'),
    'class folder that is a file': (_class_file, 'image_folder:{root}', errors.UserError,
                                    r'/train/notes is a file where class folders are expected'),
    'no such split': (lambda root: None, 'image_folder:{root}', errors.ConfigError,
                      r"split 'test\[:10\]\+val' of .* is invalid"),
    'empty location': (lambda root: None, 'image_folder:', errors.ConfigError,
                       r"config\.dataset='image_folder:' is invalid"),
}


def _assert_nothing_written(workdir, cache):
  assert not workdir.exists()
  assert not list(cache.rglob('*.npz'))


@pytest.mark.parametrize('case', FOLDER_CASES)
def test_bad_image_folder_is_one_line_and_writes_nothing(tmp_path, case):
  change, dataset, error, message = FOLDER_CASES[case]
  root = tmp_path / 'pets'
  make_folder(root)
  change(root)
  config = small_config(dataset.format(root=root), cache_dir=str(tmp_path / 'cache'))
  if case == 'no such split':
    config.eval_split = 'test[:10]+val'
  with pytest.raises(error, match=message) as e:
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert type(e.value) is error and '\n' not in str(e.value)
  _assert_nothing_written(tmp_path / 'workdir', tmp_path / 'cache')


def _bad_npz(**overrides):
  return lambda path: make_npz(path, **overrides)


NPZ_CASES = {
    'missing file': (None, 'does not exist'),
    'not an npz': (lambda path: path.write_text('hello'), r'cannot read .* as an \.npz'),
    'missing split': (_bad_npz(test_images=None), r"has no array 'test_images' \(it holds: "),
    'missing labels': (_bad_npz(test_labels=None), r"has no array 'test_labels'"),
    'labels beyond class_names': (
        _bad_npz(train_labels=np.r_[np.arange(35) % 3, 3]),
        r'train_labels holds 3, but class_names has 3 names: labels must be 0\.\.2\.'),
    'negative labels': (_bad_npz(train_labels=np.r_[np.arange(35) % 3, -1]),
                        r'train_labels holds -1; expected class indices >= 0'),
    'float labels': (_bad_npz(train_labels=np.zeros(36)),
                     r'train_labels holds float64\[36\]; expected integers \[N\]'),
    'int images': (_bad_npz(train_images=np.zeros((36, H, W), np.int64)),
                   r'train_images holds int64\[36, 8, 8\]; expected uint8 in \[0, 255\] or floats'),
    'floats outside [0, 1]': (_bad_npz(test_images=np.full((9, H, W), 255.0)),
                              r'test_images holds float64\[9, 8, 8\] in \[255, 255\]; expected '
                              r'floats in \[0, 1\]'),
    'two channels': (_bad_npz(train_images=np.zeros((36, H, W, 2), np.uint8)),
                     r'train_images holds uint8\[36, 8, 8, 2\]; expected images \[N, H, W\] or'),
    'fewer labels than images': (_bad_npz(train_labels=np.arange(30) % 3),
                                 r'but train_labels holds 30 labels'),
    'pickled class names': (_bad_npz(class_names=np.array(['a', 1, None], object)),
                            r'class_names in .* cannot be read without pickle'),
}


@pytest.mark.parametrize('case', NPZ_CASES)
def test_bad_npz_is_one_line_and_writes_nothing(tmp_path, case):
  make, message = NPZ_CASES[case]
  path = tmp_path / 'data.npz'
  if make:
    make(path)
  config = small_config(f'npz:{path}', cache_dir=str(tmp_path / 'cache'))
  with pytest.raises(errors.UserError, match=message) as e:
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert '\n' not in str(e.value)
  _assert_nothing_written(tmp_path / 'workdir', tmp_path / 'cache')


@pytest.mark.parametrize('image_size', [(0, 8), (8,), (8, 8, 1), (8, 0.5)])
def test_bad_image_size_is_a_config_error(tmp_path, image_size):
  config = small_config('mnist')
  with config.unlocked():
    config.image_size = image_size
  with pytest.raises(errors.ConfigError, match=r'config\.image_size=.* is invalid: expected '
                                               r'\(H, W\)'):
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert not (tmp_path / 'workdir').exists()


@pytest.mark.slow
def test_run_py_says_it_in_one_line_with_exit_1_or_2(tmp_path, subprocess_env):
  make_folder(tmp_path / 'pets')
  _truncated_png(tmp_path / 'pets')
  for args, code in (([f'--config.dataset=image_folder:{tmp_path / "pets"}'], 1),
                     (['--config.dataset=npz:', '--config.image_size=(8,8)'], 2)):
    done = subprocess.run([sys.executable, str(REPO_ROOT / 'run.py'), f'--config={MLP_CONFIG_PATH}',
                           f'--workdir={tmp_path / "workdir"}', *args], env=subprocess_env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == code, done.stderr
    errors_printed = [line for line in done.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors_printed) == 1 and 'Traceback' not in done.stderr, done.stderr
    assert not (tmp_path / 'workdir').exists()


# --- Class names in the report -------------------------------------------------------------------

def test_report_figure_uses_class_names_and_says_which_are_missing():
  confusion = np.array([[5, 1, 0], [0, 4, 0], [0, 0, 0]])
  worst = dict(image=np.zeros((1, H, W, 1), np.uint8), label=np.array([0]),
               predicted=np.array([1]), confidence=np.array([0.9]))
  history = [dict(epoch=1, train_loss=1.0, train_accuracy=0.5, test_loss=1.0, test_accuracy=0.9)]
  fig = report._figure(history, confusion, worst, dict(dataset='pets'),
                       dict(class_names=list(CLASSES)))
  texts = [t.get_text() for t in fig.findobj(mtext.Text)]
  assert 'true cat / pred dog (90%)' in texts
  assert 'confusion matrix (10 test examples)\nno test examples of: owl' in texts
  assert {'cat', 'dog', 'owl'} <= set(texts)  # The tick labels.
  assert report.missing_classes(confusion, list(CLASSES)) == ['owl']


# --- docs/extending.md's worked example ----------------------------------------------------------------

def test_readme_save_as_folder_example_makes_a_folder_that_trains(tmp_path):
  from conftest import readme_example  # pylint: disable=g-import-not-at-top
  namespace = {}
  exec(readme_example('own data folder'), namespace)  # pylint: disable=exec-used
  rng = np.random.default_rng(0)
  for split, n in (('train', 24), ('test', 6)):
    labels = np.arange(n) % 3
    namespace['save_as_folder'](tmp_path / 'root', split,
                                np.stack([class_image(rng, l) for l in labels]), labels, CLASSES)
  assert sorted(p.name for p in (tmp_path / 'root' / 'train').iterdir()) == list(CLASSES)
  summary = train.train_and_evaluate(
      small_config(f'image_folder:{tmp_path / "root"}', write_report=False),
      str(tmp_path / 'workdir'))
  assert summary['class_names'] == list(CLASSES) and summary['steps'] == 8 * 3
