"""A tiny trained workdir on learnable 3-class data, for the inference and export tests."""

import pathlib

import numpy as np

from conftest import tiny_config
from mnist_jax import train

CLASSES = ('cat', 'dog', 'eel')


def class_images(rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
  """28x28x1 uint8: class k is a bright 8x8 square at row block k, over noise."""
  images = rng.integers(0, 60, (len(labels), 28, 28, 1)).astype(np.uint8)
  for i, label in enumerate(labels):
    images[i, 2 + 8 * label:10 + 8 * label, 6:14] = 250
  return images


def make_npz(path: pathlib.Path, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (('train', 48), ('test', 21)):
    labels = rng.permutation(np.arange(n) % 3)
    arrays[f'{split}_images'], arrays[f'{split}_labels'] = class_images(rng, labels), labels
  arrays['class_names'] = np.array(CLASSES)
  np.savez(path, **arrays)
  return arrays


def trained(tmp_path: pathlib.Path, name: str = 'mlp', **overrides):
  """A tiny run of configs/<name>.py on make_npz's data: (workdir, summary, arrays)."""
  arrays = make_npz(tmp_path / 'data.npz')
  model = {'model.features': (4,)} if name != 'mlp' else {}
  config = tiny_config(name, dataset=f'npz:{tmp_path / "data.npz"}', num_epochs=3,
                       **model, **overrides)
  workdir = tmp_path / f'w_{name}'
  return workdir, train.train_and_evaluate(config, str(workdir)), arrays
