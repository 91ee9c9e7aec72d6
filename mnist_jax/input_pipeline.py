"""Input pipeline: TFDS reads the dataset, tf.data (or the device) serves the batches.

This module imports nothing from the model. The order of examples is a pure function of
(seed, epoch): `batch_plan` turns it into per-step example indices and a mask that marks the
padding of the last batch. Both input modes consume the same plan, so they feed the same
examples in the same order, and a resumed run can rebuild the position in the data from the
step alone.
"""

import dataclasses
import hashlib
import io
import math
import os
import pathlib
import socket
import concurrent.futures
import functools
from collections.abc import Iterator

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds  # Imports TensorFlow lazily, when it first needs it.

from mnist_jax.infra import errors
from mnist_jax.infra import storage


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  image_shape: tuple[int, ...]
  num_classes: int


@dataclasses.dataclass(frozen=True)
class Split:
  """A decoded split: uint8 images [N, H, W, C] and int32 labels [N]."""
  image: np.ndarray
  label: np.ndarray

  def __len__(self) -> int:
    return len(self.label)


class DatasetNotFound(errors.UserError):
  pass


@functools.cache
def tensorflow():
  """TensorFlow, imported on first use, with the GPUs hidden from it.

  TensorFlow only decodes and feeds data here; it must not reserve accelerator memory that
  JAX needs. Importing it costs seconds, so a run that needs no TensorFlow (decoded data
  cached, input_mode='device') does not import it at all.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  return tf


def resolve_data_dir(data_dir: str) -> str | None:
  return data_dir or os.environ.get('TFDS_DATA_DIR') or None


def load(dataset: str, data_dir: str, splits: tuple[str, ...], *, download: bool,
         cache_dir: epath.Path | None) -> tuple[DatasetInfo, dict[str, Split]]:
  """Decodes `splits` of a TFDS dataset into numpy arrays, once: later runs read the cache."""
  data_dir = resolve_data_dir(data_dir)
  builder = _builder(dataset, data_dir)
  features = builder.info.features
  info = DatasetInfo(dataset, tuple(features['image'].shape), features['label'].num_classes)
  # Only prepared files are cached: under tfds.testing.mock_data there are none.
  cache_key = _cache_key(builder) if builder.is_prepared() else None
  return info, {split: _load_split(builder, split, download, cache_dir, cache_key)
                for split in splits}


def _builder(dataset: str, data_dir: str | None):
  try:
    return tfds.builder(dataset, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise errors.ConfigError(
        f'config.dataset: unknown TFDS dataset {dataset!r}; use a name from '
        '`tfds.list_builders()`, e.g. mnist, fashion_mnist, kmnist, emnist/mnist.') from None


def _prepare(builder, download: bool) -> None:
  """Downloads the dataset when allowed and reachable; otherwise says how to get it."""
  looked_in = builder.data_dir
  fix = (f'Dataset {builder.name!r} is not prepared in {looked_in} and cannot be downloaded '
         '{why}. Fix: point TFDS_DATA_DIR (or --config.data_dir) at a folder that holds '
         f'{builder.name}/{builder.info.version}/, or run once with network access '
         '(--config.download=True) to download and prepare it.')
  if not download:
    raise DatasetNotFound(fix.format(why='(config.download is False)'))
  if not _network_reachable():
    raise DatasetNotFound(fix.format(why='(no network)'))
  try:
    builder.download_and_prepare()
  except Exception as e:  # Any download failure ends the same way: a message, no traceback.
    raise DatasetNotFound(fix.format(why=f'({type(e).__name__}: {e})')) from None


def _network_reachable(host: str = 'storage.googleapis.com', timeout_s: float = 5.0) -> bool:
  # A name lookup fails at once on an offline machine, where TFDS would retry for minutes.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    try:
      pool.submit(socket.getaddrinfo, host, 443).result(timeout=timeout_s)
      return True
    except Exception:
      return False


def _cache_key(builder) -> str:
  """Identifies the prepared files by their names, sizes and modification times."""
  folder = pathlib.Path(builder.data_dir)
  files = sorted(f for f in folder.iterdir() if f.is_file())
  stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
  digest = hashlib.sha256(repr((str(folder.resolve()), stamp)).encode()).hexdigest()[:16]
  return f'{builder.name.replace("/", "_")}-{builder.info.version}-{digest}'


def _load_split(builder, split: str, download: bool, cache_dir: epath.Path | None,
                cache_key: str | None) -> Split:
  path = cache_dir / 'data' / f'{cache_key}-{split}.npz' if cache_dir and cache_key else None
  if path and path.exists():
    expected = (builder.info.splits[split].num_examples, *builder.info.features['image'].shape)
    cached = read_cached_split(path, expected)
    if cached is not None:
      return cached
  decoded = _decode(builder, split, download)
  if path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = io.BytesIO()
    np.savez(data, image=decoded.image, label=decoded.label)
    # Atomic (locally or in a bucket): a concurrent or killed run never sees half a file.
    storage.write_bytes_atomic(path, data.getvalue())
    logging.info('Cached decoded %s/%s in %s', builder.name, split, path)
  return decoded


def read_cached_split(path: epath.Path, shape_NxHxWxC: tuple[int, ...]) -> Split | None:
  """The cached split at `path`, or None (with a one-line warning) if the file is damaged:
  unreadable (truncated, not an npz), or not uint8 images [N, H, W, C] of the expected shape
  with int32 labels [N]. The caller then decodes the split again and replaces the file."""
  shape_NxHxWxC = tuple(shape_NxHxWxC)
  try:
    raw = io.BytesIO(path.read_bytes()) if storage.is_remote(path) else path
    with np.load(raw) as cached:
      split = Split(cached['image'], cached['label'])
    problem = None
    if split.image.dtype != np.uint8 or split.image.shape != shape_NxHxWxC:
      problem = (f'images {split.image.dtype}{list(split.image.shape)}, expected '
                 f'uint8{list(shape_NxHxWxC)}')
    elif split.label.dtype != np.int32 or split.label.shape != shape_NxHxWxC[:1]:
      problem = (f'labels {split.label.dtype}{list(split.label.shape)}, expected '
                 f'int32[{shape_NxHxWxC[0]}]')
  except Exception as e:  # pylint: disable=broad-except  (zipfile, OS, key errors, ...)
    problem = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else "unreadable"}'
  if problem is None:
    return split
  print(f'warning: the cached data {path} is damaged ({problem}); decoding it again.',
        flush=True)
  return None


def _decode(builder, split: str, download: bool) -> Split:
  tensorflow()  # Before TFDS imports it, so the GPUs are hidden first.
  load = lambda: tfds.load(builder.name, split=split, data_dir=builder.data_dir_root,
                           download=False)
  try:
    ds = load()
  except AssertionError:  # TFDS's way of saying the prepared files are not there.
    _prepare(builder, download)
    ds = load()
  images, labels = [], []
  for batch in tfds.as_numpy(ds.batch(10_000)):
    images.append(batch['image'])
    labels.append(batch['label'])
  return Split(np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32))


# --- The order of examples ------------------------------------------------------------------

def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """A permutation of the examples, a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


def batch_plan(order: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  """Per-step example indices [S, B] and a 0/1 mask [S, B]; the last batch is padded.

  Every example appears exactly once, so an epoch sees all of them (like Keras), while every
  step has the same static shape: padded slots point at example 0 with mask 0.
  """
  num_steps = math.ceil(len(order) / batch_size)
  pad = num_steps * batch_size - len(order)
  index = np.concatenate([order, np.zeros(pad, np.int32)]).reshape(num_steps, batch_size)
  mask = np.concatenate([np.ones(len(order), np.float32), np.zeros(pad, np.float32)])
  return dict(index=index, mask=mask.reshape(num_steps, batch_size))


def chunk_plan(plan: dict[str, np.ndarray], steps_per_chunk: int) -> list[dict[str, np.ndarray]]:
  """Splits a plan into chunks of `steps_per_chunk` steps; pads the last with empty steps."""
  num_steps = len(plan['index'])
  num_chunks = math.ceil(num_steps / steps_per_chunk)
  pad = num_chunks * steps_per_chunk - num_steps
  padded = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)])
            for k, v in plan.items()}
  return [{k: v[i * steps_per_chunk:(i + 1) * steps_per_chunk] for k, v in padded.items()}
          for i in range(num_chunks)]


def tf_batches(split: Split, chunks: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
  """A tf.data pipeline that turns planned chunks into stacked batches, prefetched.

  Yields dicts with 'image' [K, B, H, W, C] uint8, 'label' [K, B] int32, 'mask' [K, B].
  """
  tf = tensorflow()
  images, labels = tf.constant(split.image), tf.constant(split.label)
  stacked = {k: np.stack([c[k] for c in chunks]) for k in ('index', 'mask')}
  ds = tf.data.Dataset.from_tensor_slices(stacked)
  ds = ds.map(lambda c: dict(image=tf.gather(images, c['index']),
                             label=tf.gather(labels, c['index']), mask=c['mask']),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(2).as_numpy_iterator()
