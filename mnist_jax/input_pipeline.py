"""Input pipeline: TFDS reads the dataset, tf.data (or the device) serves the batches.

This module imports nothing from the model. The order of examples is a pure function of
(seed, epoch): `batch_plan` turns it into per-step example indices and a mask that marks the
padding of the last batch. Both input modes consume the same plan, so they feed the same
examples in the same order, and a resumed run can rebuild the position in the data from the
step alone.
"""

import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import pathlib
import socket
import sys
import types
import concurrent.futures
import functools
import importlib.metadata
from collections.abc import Iterator

from absl import logging
from etils import epath
from etils import epy
import numpy as np

with epy.lazy_imports():  # Imported at first use (~0.15 s): a warm run of a TFDS dataset whose
  # metadata an earlier run kept (`_Seen`) and whose splits are cached never imports it.
  import tensorflow_datasets as tfds  # It imports TensorFlow lazily, when it first needs it.

from mnist_jax import datasets
from mnist_jax.infra import errors
from mnist_jax.infra import storage


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  image_shape: tuple[int, ...]
  num_classes: int
  class_names: tuple[str, ...] = ()
  # What identifies the data beyond its name, for a resume (own data: a digest of the files'
  # names, sizes and modification times); None for a TFDS dataset, which its name and
  # version identify.
  identity: str | None = None


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
         cache_dir: epath.Path | None, image_size: tuple[int, ...] = ()
         ) -> tuple[DatasetInfo, dict[str, Split]]:
  """Decodes `splits` of a dataset into numpy arrays, once: later runs read the cache.

  `dataset` is a TFDS name, or own data by its kind (datasets.SOURCES):
  'image_folder:/path/root' or 'npz:/path/file.npz'. A split may be sliced as TFDS slices
  them, for every kind: 'train[:90%]', 'train[90%:]', 'train[:1000]+test'. `image_size`
  (H, W), if given, resizes every image.
  """
  image_size = tuple(image_size)
  source = datasets.find(dataset, image_size)
  if source is None:
    builder = _builder_as_before(dataset, resolve_data_dir(data_dir), cache_dir)
    label = builder.info.features['label']
    info = DatasetInfo(dataset, (), label.num_classes, tuple(label.names))
    split_names = tuple(builder.info.splits)
    # Only prepared files are cached: under tfds.testing.mock_data there are none.
    cache_key = _cache_key(builder) if builder.is_prepared() else None
    read = functools.partial(_load_split, builder, download=download, cache_dir=cache_dir,
                             cache_key=cache_key)
  else:
    info = DatasetInfo(dataset, (), len(source.class_names), source.class_names,
                       source.identity)
    split_names = source.split_names
    read = functools.partial(_load_source_split, source, cache_dir=cache_dir,
                             image_size=image_size)
  read = functools.cache(read)  # Each split once, however many specs slice it.
  # Every spec and every split checked before anything is decoded (and cached).
  instructions = {spec: _instruction(spec, split_names, dataset) for spec in splits}
  if source is None:  # A prepared TFDS dataset knows its splits' sizes: an empty slice is
    _refuse_empty_slices(instructions, builder, dataset)  # refused before any decoding.
  for name in dict.fromkeys(n for _, names in instructions.values() for n in names):
    if source is not None:
      source.check(name)
  loaded = _conform({spec: _read_spec(spec, *instructions[spec], split_names, read, dataset)
                     for spec in splits}, image_size, dataset)
  info = dataclasses.replace(info, image_shape=next(iter(loaded.values())).image.shape[1:])
  _note_missing_classes(info, loaded)
  return info, loaded


class _AnySplit(dict):
  """Split infos that accept any split name (a TFDS builder that lists none yet: not prepared,
  or mocked): TFDS itself then says whether the split exists."""

  def __contains__(self, name) -> bool:
    return True

  def __missing__(self, name):
    return _count(1 << 60)


def _count(num_examples: int):  # ReadInstruction.to_absolute reads only num_examples.
  return types.SimpleNamespace(num_examples=num_examples)


def _invalid_split(spec: str, dataset: str, split_names: tuple[str, ...], e: Exception):
  return errors.ConfigError(
      f'split {spec!r} of {dataset} is invalid ({" ".join(str(e).split())}); its splits: '
      f"{', '.join(split_names) or '(not listed)'}. config.train_split and config.eval_split "
      "take a split, optionally sliced as TFDS slices: 'train[:90%]', 'train[90%:]', "
      "'train[:1000]'.")


def find_builder(dataset: str, data_dir: str, download: bool):
  """The TFDS builder of `dataset`, prepared (downloaded first where allowed)."""
  builder = _builder(dataset, resolve_data_dir(data_dir))
  if not builder.is_prepared():
    _prepare(builder, download)
  return builder


def parse_split(spec: str, split_names: tuple[str, ...], dataset: str) -> list[str]:
  """The names of the splits a spec reads; a ConfigError (one line) for a bad spec."""
  return _instruction(spec, split_names, dataset)[1]


def _instruction(spec: str, split_names: tuple[str, ...], dataset: str):
  """A TFDS split spec ('train', 'train[:90%]', 'train[:100]+test') parsed, and the names of
  the splits it reads."""
  if spec in split_names:  # A whole split: what TFDS's instruction would give, without TFDS.
    return _WholeSplit(spec), [spec]
  try:
    instruction = tfds.core.ReadInstruction.from_spec(spec)
    names = [part.splitname for part in instruction.to_absolute(
        {s: _count(1 << 60) for s in split_names} if split_names else _AnySplit())]
  except (ValueError, TypeError) as e:
    raise _invalid_split(spec, dataset, split_names, e) from None
  return instruction, list(dict.fromkeys(names))


@dataclasses.dataclass(frozen=True)
class _WholeSplit:
  """The instruction of a spec that names one whole split, as tfds.core.ReadInstruction's
  `to_absolute` gives it: [(splitname, from_=0, to=its size)]."""
  splitname: str

  def to_absolute(self, counts: dict) -> list[types.SimpleNamespace]:
    return [types.SimpleNamespace(splitname=self.splitname, from_=0,
                                  to=counts[self.splitname].num_examples)]


def _read_spec(spec: str, instruction, names: list[str], split_names: tuple[str, ...], read,
               dataset: str) -> Split:
  """The examples of a split spec, sliced out of the whole splits `read(name)` gives, with
  TFDS's own rounding of percentages."""
  try:
    parts = instruction.to_absolute({name: _count(len(read(name))) for name in names})
  except (ValueError, TypeError) as e:
    raise _invalid_split(spec, dataset, split_names, e) from None
  pieces = [read(part.splitname) for part in parts]
  split = Split(*(np.concatenate([getattr(piece, field)[part.from_:part.to]
                                  for piece, part in zip(pieces, parts)])
                  for field in ('image', 'label')))
  if not len(split):
    raise _empty(spec, dataset)
  return split


def _empty(spec: str, dataset: str) -> errors.ConfigError:
  return errors.ConfigError(
      f'split {spec!r} of {dataset} holds no examples; give config.train_split and '
      "config.eval_split slices that hold some, e.g. 'test[:1000]' or 'train[90%:]'.")


def _conform(loaded: dict[str, Split], image_size: tuple[int, ...],
             dataset: str) -> dict[str, Split]:
  """Every split at `image_size` (if set) and of one shape: a split of gray images gets 3
  channels if another has colour; splits of different sizes are refused."""
  if image_size:
    loaded = {spec: split if split.image.shape[1:3] == image_size else
              Split(datasets.resize_images(split.image, image_size), split.label)
              for spec, split in loaded.items()}
  shapes = {spec: split.image.shape[1:] for spec, split in loaded.items()}
  if len({shape[:2] for shape in shapes.values()}) > 1:
    (a, shape_a), (b, shape_b) = list(shapes.items())[:2]
    raise errors.UserError(
        f'{dataset}: the images of split {a!r} are {shape_a[0]}x{shape_a[1]}, those of {b!r} '
        f'{shape_b[0]}x{shape_b[1]} (HxW); set --config.image_size="(H, W)" to resize them all '
        'to one size.')
  if len({shape[-1] for shape in shapes.values()}) > 1:
    loaded = {spec: Split(np.repeat(split.image, 3, -1) if split.image.shape[-1] == 1
                          else split.image, split.label) for spec, split in loaded.items()}
  return loaded


def _note_missing_classes(info: DatasetInfo, loaded: dict[str, Split]) -> None:
  for spec, split in loaded.items():
    missing = np.flatnonzero(np.bincount(split.label, minlength=info.num_classes) == 0)
    if missing.size:
      names = ', '.join(info.class_names[i] if info.class_names else str(i) for i in missing)
      print(f'note: {info.name} split {spec!r} has no examples of {missing.size} of its '
            f'{info.num_classes} classes: {names}.', flush=True)


def _refuse_empty_slices(instructions: dict, builder, dataset: str) -> None:
  try:
    counts = {name: _count(int(info.num_examples)) for name, info in builder.info.splits.items()}
  except Exception:  # pylint: disable=broad-except  (not prepared, mocked: checked after reading)
    return
  for spec, (instruction, names) in instructions.items():
    if not all(name in counts and counts[name].num_examples for name in names):
      continue  # Sizes not known: `_read_spec` checks once read.
    try:
      parts = instruction.to_absolute(counts)
    except (ValueError, TypeError):
      continue  # `_read_spec` says why, in its words.
    if not sum(len(range(counts[part.splitname].num_examples)[part.from_:part.to])
               for part in parts):
      raise _empty(spec, dataset)


def _builder(dataset: str, data_dir: str | None):
  try:
    return tfds.builder(dataset, data_dir=data_dir)
  except Exception as e:  # pylint: disable=broad-except  (TFDS's JSON parser's error, too)
    if 'Failed to load JSON' not in str(e) and 'dataset_info' not in str(e):
      if isinstance(e, tfds.core.registered.DatasetNotFoundError):
        raise _unknown_dataset(dataset, data_dir) from None
      raise
    damaged = sorted(pathlib.Path(data_dir or tfds.core.constants.DATA_DIR).glob(
        f'{dataset}/*/dataset_info.json'))
    where = damaged[-1] if damaged else f'{dataset}/<version>/dataset_info.json'
    why = ' '.join(str(e).split('Failed to load JSON:')[-1].split()).rstrip('.')
    raise errors.UserError(
        f'the metadata of dataset {dataset!r}, {where}, is damaged (not JSON: {why[:200]}); restore the '
        f'file, or remove the folder {pathlib.Path(where).parent} and run again with '
        '--config.download=True to prepare the dataset again.') from None


def _unknown_dataset(dataset: str, data_dir: str | None) -> errors.ConfigError:
  return errors.ConfigError(
      f'config.dataset: unknown TFDS dataset {dataset!r}; use a name from '
      '`tfds.list_builders()`, e.g. mnist, fashion_mnist, kmnist, emnist/mnist, one prepared '
      f'in the data dir ({data_dir or "TFDS default"}), or your own data: '
      f"{', '.join(f'{kind}:PATH' for kind in datasets.SOURCES)}.")


def _builder_as_before(dataset: str, data_dir: str | None, cache_dir: epath.Path | None):
  """`_builder`, or, where an earlier run with this cache found the dataset prepared and its
  files are unchanged, what that run kept of its metadata (`_Seen`, ~1 ms, without importing
  TFDS). tfds.builder imports every dataset module TFDS registers first (0.2-0.4 s a run). The
  kept metadata is used only if its cache key (files, sizes, times) is the one the registered
  builder gave."""
  memo = cache_dir and cache_dir / 'data' / f'tfds-builder-{_digest(dataset, data_dir)}.json'
  try:
    seen = json.loads(memo.read_text()) if memo and memo.exists() else None
    if seen and sorted(os.listdir(pathlib.Path(seen['folder']).parent)) == seen['siblings']:
      if 'metadata' in seen:
        builder = _Seen(seen['folder'], **seen['metadata'])
      else:  # Kept by an older version: read from its folder (imports TFDS), kept again below.
        builder = tfds.builder_from_directory(seen['folder'])
      if builder.is_prepared() and _cache_key(builder) == seen['cache_key']:
        if 'metadata' not in seen:
          _remember(memo, builder)
        return builder
  except Exception:  # pylint: disable=broad-except  (any doubt: the registered builder)
    pass
  builder = _builder(dataset, data_dir)
  if memo and builder.is_prepared():
    _remember(memo, builder)
  return builder


def _remember(memo: epath.Path, builder) -> None:
  """Keeps in `memo` what `_Seen` needs of a prepared builder's metadata."""
  folder, info = pathlib.Path(builder.data_dir), builder.info
  image, label = info.features['image'], info.features['label']
  metadata = dict(name=builder.name, version=str(info.version),
                  image_shape=list(image.shape), num_classes=label.num_classes,
                  label_names=list(label.names),
                  splits={name: int(split.num_examples) for name, split in info.splits.items()})
  memo.parent.mkdir(parents=True, exist_ok=True)
  storage.write_json_atomic(memo, dict(folder=str(folder), cache_key=_cache_key(builder),
                                       siblings=sorted(os.listdir(folder.parent)),
                                       metadata=metadata))


class _Seen:
  """A prepared TFDS builder's metadata as an earlier run found it: name, version, image
  shape, label classes, split sizes, its folder. Anything else (decoding a split, whose cache
  is missing or damaged; a sliced split's info) is asked of the builder read from its folder
  (`tfds.builder_from_directory`, which imports TFDS), the first time it is needed."""

  def __init__(self, folder: str, *, name: str, version: str, image_shape: list,
               num_classes: int, label_names: list, splits: dict[str, int]):
    self.name, self.data_dir = name, folder
    self.info = _SeenInfo(
        self, version=version,
        features={'image': types.SimpleNamespace(shape=tuple(image_shape)),
                  'label': types.SimpleNamespace(num_classes=num_classes,
                                                 names=list(label_names))},
        splits=_SeenSplits({name: _count(n) for name, n in splits.items()}, self))

  def is_prepared(self) -> bool:
    return True  # Checked by the cache key: the prepared files are those seen.

  @functools.cached_property
  def builder(self):
    return tfds.builder_from_directory(self.data_dir)

  def __getattr__(self, name):  # What is not kept: the real builder's.
    if name == 'builder':
      raise AttributeError(name)
    return getattr(self.builder, name)


class _SeenInfo(types.SimpleNamespace):
  """The kept part of `builder.info`; any other field (file_format, ...) is the real one's."""

  def __init__(self, seen: _Seen, **kept):
    super().__init__(**kept)
    self._seen = seen

  def __getattr__(self, name):
    if name.startswith('_'):
      raise AttributeError(name)
    return getattr(self._seen.builder.info, name)


class _SeenSplits(dict):
  """Split name -> its size; any other key (a slice, 'train[:10%]') is the real builder's."""

  def __init__(self, counts: dict, seen: _Seen):
    super().__init__(counts)
    self.seen = seen

  def __missing__(self, key):
    return self.seen.builder.info.splits[key]


def metadata_builder(dataset: str, data_dir: str, cache_dir: epath.Path | None = None):
  """The TFDS builder of `dataset` for its metadata, fast on a warm start (see above)."""
  return _builder_as_before(dataset, resolve_data_dir(data_dir), cache_dir)


def _digest(*parts) -> str:
  version = importlib.metadata.version('tensorflow_datasets')  # tfds.__version__, unimported.
  return hashlib.sha256(repr((*parts, version)).encode()).hexdigest()[:16]


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


cache_key = _cache_key  # Public: stream.py names a converted copy by it too.


def _load_split(builder, split: str, *, download: bool, cache_dir: epath.Path | None,
                cache_key: str | None) -> Split:
  path = cache_dir / 'data' / f'{cache_key}-{split}.npz' if cache_dir and cache_key else None
  expected = path and (builder.info.splits[split].num_examples,
                       *builder.info.features['image'].shape)
  return _cached(path, expected, lambda: _decode(builder, split, download),
                 f'{builder.name}/{split}')


def _load_source_split(source, split: str, *, cache_dir: epath.Path | None,
                       image_size: tuple[int, ...]) -> Split:
  """A split of own data (datasets.py), decoded once into the cache if the source has a
  cache name (an image folder; an .npz is read directly)."""
  name = source.cache_name(split)
  path = cache_dir / 'data' / f'{name}.npz' if cache_dir and name else None
  expected = (source.split_size(split), *(image_size or (None, None)), None)
  return _cached(path, expected, lambda: Split(*source.decode(split)), f'{source.name} {split}')


def _cached(path: epath.Path | None, expected_NxHxWxC: tuple, decode, what: str) -> Split:
  """The split cached at `path` if it is whole, else `decode()`'s, written to `path`."""
  if path and path.exists():
    cached = read_cached_split(path, expected_NxHxWxC)
    if cached is not None:
      return cached
  decoded = decode()
  if path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = io.BytesIO()
    np.savez(data, image=decoded.image, label=decoded.label)
    # Atomic (locally or in a bucket): a concurrent or killed run never sees half a file.
    try:
      storage.write_bytes_atomic(path, data.getvalue())
      logging.info('Cached decoded %s in %s', what, path)
    except OSError as e:  # A full disk: the run goes on, decoding again next time.
      if e.errno != errno.ENOSPC:
        raise
      print(f'warning: no space left on device caching the decoded {what} in {path} '
            f'({data.getbuffer().nbytes / 1e6:.0f} MB; nothing half-written is left); the run '
            'goes on without the cache. Free some space, or give --config.cache_dir=none.',
            file=sys.stderr, flush=True)
  return decoded


def read_cached_split(path: epath.Path, shape_NxHxWxC: tuple[int, ...]) -> Split | None:
  """The cached split at `path`, or None (with a one-line warning) if the file is damaged:
  unreadable (truncated, not an npz), or not uint8 images [N, H, W, C] of the expected shape
  (None: any size there) with int32 labels [N]. The caller then decodes the split again and
  replaces the file."""
  shape_NxHxWxC = tuple(shape_NxHxWxC)
  fits = lambda shape: len(shape) == len(shape_NxHxWxC) and all(
      want is None or got == want for got, want in zip(shape, shape_NxHxWxC))
  try:
    raw = io.BytesIO(path.read_bytes()) if storage.is_remote(path) else path
    with np.load(raw) as cached:
      split = Split(cached['image'], cached['label'])
    problem = None
    if split.image.dtype != np.uint8 or not fits(split.image.shape):
      problem = (f'images {split.image.dtype}{list(split.image.shape)}, expected '
                 f'uint8{list(shape_NxHxWxC)}')
    elif split.label.dtype != np.int32 or split.label.shape != split.image.shape[:1]:
      problem = (f'labels {split.label.dtype}{list(split.label.shape)}, expected '
                 f'int32[{split.image.shape[0]}]')
  except Exception as e:  # pylint: disable=broad-except  (zipfile, OS, key errors, ...)
    problem = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else "unreadable"}'
  if problem is None:
    return split
  print(f'warning: the cached data {path} is damaged ({problem}); decoding it again.',
        flush=True)
  return None


def _decode(builder, split: str, download: bool) -> Split:
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    return _decode_array_record(builder, split)  # tf.data does not read ArrayRecord.
  tensorflow()  # Before TFDS imports it, so the GPUs are hidden first.
  # Through the builder found, not tfds.load(builder.name, ...): a dataset the registry does
  # not know (written by tfds.dataset_builders.store_as_tfds_dataset) is read from its files.
  load = lambda: builder.as_dataset(split=split, shuffle_files=False)
  try:
    ds = load()
  except AssertionError:  # TFDS's way of saying the prepared files are not there.
    _prepare(builder, download)
    ds = load()
  images, labels = [], []
  try:
    for batch in tfds.as_numpy(ds.batch(10_000)):
      images.append(batch['image'])
      labels.append(batch['label'])
  except tensorflow().errors.OpError as e:  # DataLossError: a truncated or damaged file.
    raise _damaged_records(builder, split, e) from None
  return Split(np.concatenate(images).astype(np.uint8), np.concatenate(labels).astype(np.int32))


def _damaged_records(builder, split: str, e: Exception) -> errors.UserError:
  """One line naming the record file of `split` that cannot be read (each is read alone to
  find it), and what to do."""
  tf = tensorflow()
  files = sorted(str(p) for p in epath.Path(builder.data_dir).glob(f'*-{split}.*'))
  bad = None
  for file in files:
    try:
      for _ in tf.data.TFRecordDataset(file):
        pass
    except tf.errors.OpError:
      bad = file
      break
  why = ' '.join(str(getattr(e, 'message', e)).split())
  why = why.split('}}')[-1].split(' [Op:')[0].strip(' :')[:200]
  return errors.UserError(
      f'the record file {bad or builder.data_dir} of {builder.name} split {split!r} is damaged '
      f'({type(e).__name__}: {why}); restore it, or remove the folder {builder.data_dir} and run '
      'again with --config.download=True to prepare the dataset again.')


def _decode_array_record(builder, split: str, block: int = 10_000) -> Split:
  source = builder.as_data_source(split)
  images, labels = [], []
  for start in range(0, len(source), block):
    examples = source.__getitems__(range(start, min(start + block, len(source))))
    images.append(np.stack([e['image'] for e in examples]).astype(np.uint8))
    labels.append(np.array([e['label'] for e in examples], np.int32))
  return Split(np.concatenate(images), np.concatenate(labels))


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
