"""Stream mode (`config.input_mode='stream'`): examples read by index from ArrayRecord files (or
from own data's image files and .npz arrays) and decoded on the fly; no split is ever held
whole in host memory.

The examples each step reads come from `input_pipeline.batch_plan` (the same per-epoch order
and masked last batch as the other modes), so a stream run trains exactly as a `device` run
does, and a resumed run rebuilds its position from the step alone.

- Files. ArrayRecord is TFDS's random-access format (`tfds.data_source`). A dataset prepared in
  it (also one written with `tfds.dataset_builders.store_as_tfds_dataset(...,
  file_format='array_record')` and found by name in the data dir) is read in place. One
  prepared as TFRecord (TFDS's default, the shared MNIST) is converted once into the cache
  folder, `<cache_dir>/arrayrecord/<name>-<version>-<digest of the files>/`, shard by shard with
  TFDS's own file adapters (what `tfds convert_format` runs; TFDS 4.9's converter module itself
  cannot be imported without Apache Beam). The conversion writes into a temporary folder that
  is renamed only once it is complete, so a killed conversion is never read: the next run
  converts again.
- Decoding in parallel: tf.data. The records of each planned chunk are read by index in one
  call of ArrayRecord's C++ reader (~5 us an example), parsed in one `tf.io.parse_example`
  with TFDS's specs and decoded by TFDS's own graph-mode decoders (`Image.decode_example`, what
  `tfds.load` runs) in tf.data's thread pool, outside the GIL: ~28 us an example in all on
  the 2-core host (55 us a step at a time through `deserialize_example`), against 126 us for
  Grain's threads (`grain.MapDataset.to_iter_dataset`, 2 threads) over `tfds.data_source`'s
  NumPy decoding, which holds the GIL (PIL and protobuf parsing in Python: 76 us an example
  on one thread).
  Threads rather than worker processes: the host has few cores that training needs too, and
  a failure in a thread reaches the loop at once, as one line naming the file and record (a
  worker process killed by the OS could leave the loop waiting for its batch).
- Prefetch: tf.data keeps two chunks of steps decoded ahead; the executor puts the next
  chunk on the device while the current one trains (`executor.StreamExecutor`).
- Own data (`datasets.SOURCES`) is read in place, by index (`datasets.ImageFolder.reader`,
  `NpzFile.reader`), with the pixels its decoded path gives, so it trains as in device mode.
  An image folder's files are listed, and their headers (not their pixels) read once, for the
  split's size and channels; each step's files are decoded when it is planned. An .npz's
  images are memory-mapped where the zip stores them; a compressed one (np.savez_compressed)
  cannot be read by index and is refused. Decoding runs in a plain thread pool (DECODERS
  threads, PREFETCH chunks ahead), not in tf.data: it must be PIL's decoding and resizing, the
  decoded path's, for the same pixels (TF's JPEG decoder and resize differ), and PIL's
  decoders (zlib, libjpeg) release the GIL for their work, so plain threads decode in
  parallel; tf.data's `numpy_function` would run the same Python under the same GIL and add
  only TensorFlow's import (seconds, ~400 MB) and its error wrapping: here a file that does
  not decode stops the run with datasets' own line naming it.
"""

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import math
import os
import shutil
import types
import uuid
from collections.abc import Iterator

from etils import epath
from etils import epy
import numpy as np

with epy.lazy_imports():  # At first use: device-mode runs import this module, not TFDS.
  import tensorflow_datasets as tfds

from mnist_jax import datasets
from mnist_jax import input_pipeline
from mnist_jax.infra import errors

# The bytes of decoded examples a chunk of steps (one jitted call) holds on the host.
CHUNK_BYTES = 8 << 20
READERS = int(os.environ.get('READERS', 2))  # Chunks read at once (each holds the GIL).
FOLDER = 'arrayrecord'  # Under the cache dir: converted datasets.
# Chunks decoded at once (tf.data's map, or own data's thread pool); own data: chunks decoded
# ahead of the one handed out, images a task reads.
DECODERS = int(os.environ.get('DECODERS', os.cpu_count() or 1))
PREFETCH = 2
IMAGES_PER_TASK = 64
_TMP_PREFIX = '.tmp-'  # A conversion still being written (or killed): never read.


class StreamReadError(errors.UserError):
  pass


@dataclasses.dataclass
class StreamSplit:
  """A split read by index from its ArrayRecord files; `len()`, `read(indices)`, and for the
  report its `label`s (decoded without the images) and `image`s by index (`LazyImages`)."""
  spec: str
  source: object  # tfds.data_source's ArrayRecordDataSource.
  labels_source: object  # The same, with the images left undecoded.
  files: tuple  # (filename, first index, end index) of the split's examples.
  image_shape: tuple[int, ...]
  image_size: tuple[int, ...] = ()
  skips: tuple[int, ...] = ()  # Of each file: the records before the split's first one.

  def __len__(self) -> int:
    return len(self.source)

  @property
  def features(self):
    return self.source.dataset_info.features

  @functools.cached_property
  def _readers(self) -> tuple:
    """ArrayRecord's C++ reader of each file (thread-safe), opened with the data source's
    options; called directly, a file's records of a chunk in one call, without the data
    source's thread pool per call and its Python bookkeeping."""
    from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
    return tuple(array_record_module.ArrayRecordReader(
        str(filename), options='readahead_buffer_size:0', file_reader_buffer_size=32768)
                 for filename, _, _ in self.files)

  @functools.cached_property
  def _file_ends(self) -> np.ndarray:
    return np.array([end for _, _, end in self.files])

  def records(self, index_M: np.ndarray) -> np.ndarray:
    """The serialized examples [M] at `index_M`, undecoded (tf.data decodes them)."""
    index_M = np.asarray(index_M, np.int64).reshape(-1)
    try:
      file_M = np.searchsorted(self._file_ends, index_M, side='right')
      records_M = np.empty(len(index_M), object)
      for f in np.unique(file_M):
        at = file_M == f
        positions = index_M[at] - self.files[f][1] + self.skips[f]
        records_M[at] = self._readers[f].read(positions.tolist())
      return records_M
    except Exception as e:  # pylint: disable=broad-except  (a damaged file: find the record)
      raise self._damaged(index_M.tolist(), e) from None

  def read(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 images [*index.shape, H, W, C] and int32 labels [*index.shape]."""
    flat = index.reshape(-1).tolist()
    try:
      examples = self.source.__getitems__(flat)
    except Exception as e:  # pylint: disable=broad-except  (a damaged file: find the record)
      raise self._damaged(flat, e) from None
    image = np.stack([example['image'] for example in examples]).astype(np.uint8, copy=False)
    if self.image_size and image.shape[1:3] != self.image_size:
      image = datasets.resize_images(image, self.image_size)
    label = np.array([example['label'] for example in examples], np.int32)
    return dict(image=image.reshape(*index.shape, *image.shape[1:]),
                label=label.reshape(index.shape))

  def _damaged(self, flat: list[int], error: Exception) -> StreamReadError:
    bad = next((i for i in dict.fromkeys(flat) if not _readable(self.source, i)), flat[0])
    filename, first = next(((f, a) for f, a, b in self.files if a <= bad < b),
                           (self.files[0][0], 0))
    return StreamReadError(
        f'cannot read example {bad} of split {self.spec!r}: record {bad - first} of {filename} '
        f'is damaged ({type(error).__name__}: {errors.first_line(error) or "unreadable"}). '
        'Prepare the dataset again (a converted copy: delete its folder, the next run '
        'converts it anew).')

  @functools.cached_property
  def label(self) -> np.ndarray:
    """Every label [N] int32 (4 bytes an example), read without decoding an image."""
    return np.array([e['label'] for e in self.labels_source.__getitems__(range(len(self)))],
                    np.int32)

  @property
  def image(self) -> 'LazyImages':
    return LazyImages(self)

  def batches(self, chunks: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """`host_batches`: the records read by index and decoded in tf.data's threads, a chunk at
    a time. Reading a chunk's records in one call costs ~5 us an example on MNIST, a step's
    (128) ~14 us: the reader's cost per call and per file buffer is shared by more records;
    and each tf.data stage then runs once a chunk, not once a step."""
    if not chunks:
      return
    tf = input_pipeline.tensorflow()
    decode = batch_decoder(self.features, tf)
    ds = tf.data.Dataset.from_tensor_slices(np.stack([c['index'].reshape(-1) for c in chunks]))
    ds = ds.map(lambda index: tf.numpy_function(self.records, [index], tf.string,
                                                stateful=False),
                num_parallel_calls=READERS, deterministic=True)
    ds = ds.map(decode, num_parallel_calls=DECODERS, deterministic=True)
    # A fixed pipeline: with tf.data's autotuning on, about a third of configs/cnn.py's stream
    # runs settled into steady epochs of ~21 s instead of ~14 s, the process idle for a third
    # of the time (its CPU time the same); with it off, 6 runs of 6 took 13.6-14.9 s.
    options = tf.data.Options()
    options.autotune.enabled = False
    batches = ds.prefetch(2).with_options(options).as_numpy_iterator()
    for chunk in chunks:
      try:
        batch = next(batches)
      except tf.errors.OpError as e:  # Which record? Read the chunk again, one by one.
        self.read(chunk['index'])
        raise StreamReadError(f'cannot read split {self.spec!r} ({type(e).__name__}: '
                              f'{errors.first_line(e)})') from None
      image = batch['image']
      if self.image_size and image.shape[-3:-1] != self.image_size:
        image = datasets.resize_images(image, self.image_size)
      shape = chunk['index'].shape
      yield dict(image=image.reshape(*shape, *image.shape[-3:]),
                 label=batch['label'].reshape(shape), mask=chunk['mask'])


def batch_decoder(features, tf):
  """A graph function: serialized examples [M] -> uint8 'image' [M, H, W, C] and int32 'label'
  [M], TFDS's own decoding (`features.deserialize_example`'s values).

  Where 'image' and 'label' are each stored as one fixed-shape field (an Image's encoded
  bytes, a ClassLabel: MNIST, any TFDS image dataset), the examples are parsed in one
  `tf.io.parse_example` with the specs TFDS parses them with, and each feature decoded by its
  own decoder (an image's bytes one by one in `tf.map_fn`, as deserialize_example does; a
  label with its batch decoder), instead of parsing and decoding example by example. Other
  features: deserialize_example, example by example."""
  specs = batch_specs(features, tf)

  def decode_batch(records_M):
    parsed = tf.io.parse_example(tf.reshape(records_M, [-1]), specs)
    image, label = (tf.cast(parsed[key], features[key].get_serialized_info().tf_dtype)
                    for key in ('image', 'label'))
    image = tf.map_fn(features['image'].decode_example, image,
                      fn_output_signature=features['image'].tf_dtype)
    return dict(image=image, label=tf.cast(features['label'].decode_batch_example(label),
                                           tf.int32))

  def decode_one_by_one(records_M):
    examples = tf.map_fn(features.deserialize_example, records_M,
                         fn_output_signature=dict(image=tf.uint8, label=tf.int64))
    return dict(image=examples['image'], label=tf.cast(examples['label'], tf.int32))

  return decode_batch if specs else decode_one_by_one


def batch_specs(features, tf) -> dict | None:
  """TFDS's `tf.io.parse_example` specs of 'image' and 'label', where each is one fixed-shape
  field (parsed for many examples at once); None otherwise."""
  from tensorflow_datasets.core import example_parser  # pylint: disable=g-import-not-at-top
  keys = ('image', 'label')
  try:
    infos = {key: features[key].get_serialized_info() for key in keys}
    specs = example_parser.ExampleParser(infos).flat_feature_specs
  except Exception:  # pylint: disable=broad-except  (a feature TFDS gives no spec for)
    return None
  fixed = set(specs) == set(keys) and all(
      isinstance(specs[key], tf.io.FixedLenFeature) and infos[key].sequence_rank == 0
      for key in keys)
  return specs if fixed else None


@dataclasses.dataclass
class OwnSplit:
  """A split of own data (datasets.SOURCES) read by index, as StreamSplit is: `pieces` are the
  (reader, first, end) slices of the source's splits that the spec ('train[:90%]+test')
  reads, in order. Its images are `image_shape`: resized to image_size (if set), and gray ones
  repeated into 3 channels where another split has colour, as input_pipeline conforms them."""
  spec: str
  pieces: tuple  # Of (datasets.FolderReader or NpzReader, first row, end row).
  image_shape: tuple[int, ...]
  image_size: tuple[int, ...] = ()

  def __post_init__(self):
    self._ends = np.cumsum([end - first for _, first, end in self.pieces])  # In the spec.

  def __len__(self) -> int:
    return int(self._ends[-1])

  @functools.cached_property
  def label(self) -> np.ndarray:
    """Every label [N] int32 (the readers hold them: 4 bytes an example)."""
    return np.concatenate([reader.label[first:end] for reader, first, end in self.pieces])

  @property
  def image(self) -> 'LazyImages':
    return LazyImages(self)

  def read(self, index: np.ndarray) -> dict[str, np.ndarray]:
    """uint8 images [*index.shape, H, W, C] and int32 labels [*index.shape]."""
    index = np.asarray(index, np.int64)
    image = self._images(index.reshape(-1))
    return dict(image=image.reshape(*index.shape, *self.image_shape), label=self.label[index])

  def _images(self, index_M: np.ndarray) -> np.ndarray:
    piece_M = np.searchsorted(self._ends, index_M, side='right')
    images = np.empty((len(index_M), *self.image_shape), np.uint8)
    for p in np.unique(piece_M):
      reader, first, end = self.pieces[p]
      at = piece_M == p
      start = self._ends[p] - (end - first)  # Where the piece starts in the spec.
      piece = reader.images(index_M[at] - start + first)
      if self.image_size and piece.shape[1:3] != self.image_size:
        piece = np.stack([datasets.resize_image(image, self.image_size) for image in piece])
      images[at] = piece  # Gray into a colour split: broadcast, np.repeat's values.
    return images

  def batches(self, chunks: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """`host_batches`: each chunk's images read in DECODERS threads, PREFETCH chunks ahead;
    an example a chunk holds twice (the padding: example 0) is read once."""
    with concurrent.futures.ThreadPoolExecutor(DECODERS) as pool:

      def submit(chunk):  # In index order: an image folder's files in their order.
        unique_U, inverse = np.unique(chunk['index'], return_inverse=True)
        return chunk, inverse, [pool.submit(self._images, unique_U[i:i + IMAGES_PER_TASK])
                                for i in range(0, len(unique_U), IMAGES_PER_TASK)]

      ahead = collections.deque(submit(chunk) for chunk in chunks[:PREFETCH + 1])
      try:
        for c in range(len(chunks)):
          chunk, inverse, tasks = ahead.popleft()
          if c + PREFETCH + 1 < len(chunks):
            ahead.append(submit(chunks[c + PREFETCH + 1]))
          image_U = np.concatenate([self._result(task) for task in tasks])
          yield dict(image=image_U[inverse.reshape(chunk['index'].shape)],
                     label=self.label[chunk['index']], mask=chunk['mask'])
      finally:  # Stopped early (an error, or the loop is done): decode nothing more.
        for _, _, tasks in ahead:
          for task in tasks:
            task.cancel()

  def _result(self, task: concurrent.futures.Future) -> np.ndarray:
    try:
      return task.result()
    except errors.UserError:
      raise  # A file that does not decode, named by datasets.
    except Exception as e:  # pylint: disable=broad-except  (OS, memory errors, ...)
      raise StreamReadError(f'cannot read split {self.spec!r} ({type(e).__name__}: '
                            f'{errors.first_line(e) or "no message"})') from None


@dataclasses.dataclass
class LazyImages:
  """A split's images, read when indexed (report.worst_errors takes a few by index)."""
  split: StreamSplit | OwnSplit

  def __len__(self) -> int:
    return len(self.split)

  @property
  def shape(self) -> tuple[int, ...]:
    return (len(self.split), *self.split.image_shape)

  def __getitem__(self, index) -> np.ndarray:
    return self.split.read(np.asarray(index, np.int64))['image']


def _readable(source, i: int) -> bool:
  try:
    source[i]
    return True
  except Exception:  # pylint: disable=broad-except
    return False


# --- Opening a dataset ---------------------------------------------------------------------

def decoded_sizes(dataset: str, data_dir: str, specs: tuple[str, ...],
                  image_size: tuple[int, ...] = (), cache_dir: epath.Path | None = None
                  ) -> dict[str, int]:
  """The bytes each split would take decoded, from the dataset's metadata alone (nothing is
  read); {} where that is not known without decoding (variable image sizes, a dataset not
  prepared yet). Own data: from the .npy headers of an .npz (exact), or from the first
  image's header of an image folder's split times its files (its other images may differ)."""
  if dataset.split(':', 1)[0] in datasets.SOURCES:
    return _own_sizes(dataset, specs, tuple(image_size))
  try:
    builder = input_pipeline.metadata_builder(dataset, data_dir, cache_dir)
    shape = builder.info.features['image'].shape
    if image_size:
      shape = (*image_size, shape[-1])
    if None in shape:
      return {}
    return {spec: builder.info.splits[spec].num_examples * (math.prod(shape) + 4)
            for spec in specs}
  except Exception:  # pylint: disable=broad-except  (load() then says what is wrong)
    return {}


def _own_sizes(dataset: str, specs: tuple[str, ...], image_size: tuple[int, ...]
               ) -> dict[str, int]:
  try:
    with contextlib.redirect_stdout(io.StringIO()):  # The load prints the scan's warnings.
      source = datasets.find(dataset, image_size)
    sizes = {}
    for spec in specs:
      sizes[spec] = 0
      for name, first, end in _parts(source, spec):
        height, width, channels = source.header_shape(name)
        sizes[spec] += (end - first) * (math.prod(image_size or (height, width)) * channels + 4)
    return sizes
  except Exception:  # pylint: disable=broad-except  (open_splits or load then says what is wrong)
    return {}


def open_splits(dataset: str, data_dir: str, specs: tuple[str, ...], *, download: bool,
                cache_dir: epath.Path | None, image_size: tuple[int, ...] = ()
                ) -> tuple[input_pipeline.DatasetInfo, dict[str, StreamSplit | OwnSplit]]:
  """The splits of a TFDS dataset, opened for reading by index (converted once if needed), or
  of own data (datasets.SOURCES), read where they are."""
  image_size = tuple(image_size)
  source = datasets.find(dataset, image_size)
  if source is not None:
    return _open_own(source, specs, image_size)
  builder = input_pipeline.find_builder(dataset, data_dir, download)
  folder = arrayrecord_folder(builder, cache_dir)
  reader = tfds.builder_from_directory(folder)
  split_names = tuple(reader.info.splits)
  splits = {}
  for spec in specs:
    input_pipeline.parse_split(spec, split_names, dataset)  # One line for a bad spec.
    splits[spec] = _open_split(reader, spec, image_size)
  shapes = {spec: split.image_shape for spec, split in splits.items()}
  if len(set(shapes.values())) > 1:
    raise errors.UserError(
        f"{dataset}: its splits' images differ in shape ({shapes}); input_mode='stream' "
        "needs one shape: set --config.image_size=\"(H, W)\", or use input_mode='tfdata'.")
  label = reader.info.features['label']
  info = input_pipeline.DatasetInfo(dataset, next(iter(shapes.values())), label.num_classes,
                                    tuple(label.names))
  return info, splits


def _open_split(reader, spec: str, image_size: tuple[int, ...]) -> StreamSplit:
  try:
    source = reader.as_data_source(spec)
    labels_source = reader.as_data_source(spec, decoders={'image': tfds.decode.SkipDecoding()})
    instructions = reader.info.splits[spec].file_instructions
  except Exception as e:  # pylint: disable=broad-except  (TFDS: ValueError, KeyError, ...)
    raise errors.ConfigError(f'split {spec!r} of {reader.name} cannot be streamed '
                             f'({type(e).__name__}: {errors.first_line(e)}).') from None
  if not len(source):
    raise errors.ConfigError(f'split {spec!r} of {reader.name} holds no examples.')
  files, start = [], 0
  for instruction in instructions:
    files.append((instruction.filename, start, start + instruction.take))
    start += instruction.take
  split = StreamSplit(spec, source, labels_source, tuple(files), (), image_size,
                      tuple(instruction.skip for instruction in instructions))
  split.image_shape = split.read(np.zeros(1, np.int64))['image'].shape[1:]
  return split


def _open_own(source, specs: tuple[str, ...], image_size: tuple[int, ...]
              ) -> tuple[input_pipeline.DatasetInfo, dict[str, OwnSplit]]:
  """Own data's split specs, sliced as input_pipeline.load slices them; each of the source's
  splits they read is opened once, and every image of them gets one shape, as `load` gives."""
  parts = {spec: _parts(source, spec) for spec in specs}  # Every spec checked first.
  readers = {name: source.reader(name)
             for name in dict.fromkeys(name for p in parts.values() for name, _, _ in p)}
  sizes = {name: image_size or reader.image_shape[:2] for name, reader in readers.items()}
  (a, size_a), *others = sizes.items()
  for b, size_b in others:
    if size_b != size_a:
      raise errors.UserError(
          f'{source.name}: the images of split {a!r} are {size_a[0]}x{size_a[1]}, those of '
          f'{b!r} {size_b[0]}x{size_b[1]} (HxW); set --config.image_size="(H, W)" to resize them '
          'all to one size.')
  image_shape = (*size_a, max(reader.image_shape[-1] for reader in readers.values()))
  splits = {}
  for spec, spec_parts in parts.items():
    pieces = tuple((readers[name], first, end) for name, first, end in spec_parts if end > first)
    if not pieces:
      raise errors.ConfigError(
          f'split {spec!r} of {source.name} holds no examples; give config.train_split and '
          "config.eval_split slices that hold some, e.g. 'test[:1000]' or 'train[90%:]'.")
    splits[spec] = OwnSplit(spec, pieces, image_shape, image_size)
  info = input_pipeline.DatasetInfo(source.name, image_shape, len(source.class_names),
                                    source.class_names, source.identity)
  return info, splits


def _parts(source, spec: str) -> list[tuple[str, int, int]]:
  """(split, first, end) of each slice of the source's splits that `spec` reads, in order,
  with TFDS's rounding of percentages (as input_pipeline.load slices own data)."""
  names = input_pipeline.parse_split(spec, source.split_names, source.name)  # One line if bad.
  counts = {name: source.split_size(name) for name in names}
  try:
    absolute = tfds.core.ReadInstruction.from_spec(spec).to_absolute(
        {name: types.SimpleNamespace(num_examples=n) for name, n in counts.items()})
  except (ValueError, TypeError) as e:
    raise errors.ConfigError(f'split {spec!r} of {source.name} is invalid '
                             f'({errors.first_line(e)}).') from None
  rows = [(part.splitname, range(counts[part.splitname])[part.from_:part.to])
          for part in absolute]
  return [(name, r.start, r.stop) for name, r in rows]


# --- TFRecord -> ArrayRecord, once, atomically -------------------------------------------

def arrayrecord_folder(builder, cache_dir: epath.Path | None) -> epath.Path:
  """The folder of the dataset's ArrayRecord files: its own if it is prepared in ArrayRecord,
  else its converted copy in the cache (converted now if there is none yet)."""
  info = builder.info
  if info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    return epath.Path(builder.data_dir)
  if cache_dir is None:
    raise errors.ConfigError(
        f"input_mode='stream' reads ArrayRecord files; {builder.name} is prepared as "
        f"{info.file_format.value} in {builder.data_dir} and its converted copy goes in the cache "
        "folder, which config.cache_dir='none' turns off: set a cache dir (or $MNIST_JAX_CACHE).")
  target = cache_dir / FOLDER / input_pipeline.cache_key(builder)
  if not (target / 'dataset_info.json').exists():
    convert(builder, target)
  return target


def convert(builder, target: epath.Path) -> None:
  """Converts a prepared dataset version (TFRecord shards and metadata) into ArrayRecord in
  `target`: written into a temporary folder beside it, renamed once complete. Every shard must
  hold as many records as the dataset's metadata says (a truncated TFRecord file just ends)."""
  from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
  version_dir = epath.Path(builder.data_dir)
  input_pipeline.tensorflow()  # Reads the TFRecords; GPUs hidden first.
  target.parent.mkdir(parents=True, exist_ok=True)
  _remove_stale(target)
  tmp = target.parent / f'{_TMP_PREFIX}{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  tmp.mkdir()
  shards = sorted(version_dir.glob('*.tfrecord-*'))
  print(f'converting {version_dir} ({len(shards)} TFRecord shards) to ArrayRecord in {target} '
        '(once, for input_mode=stream)', flush=True)
  reader = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.TFRECORD]
  writer = file_adapters.ADAPTER_FOR_FORMAT[file_adapters.FileFormat.ARRAY_RECORD]
  try:
    for shard in shards:
      count = [0]  # Records read so far (streamed: a shard is never held whole either).

      def records(shard=shard, count=count):
        for i, record in enumerate(reader.make_tf_data(shard)):
          count[0] = i + 1
          yield i, record.numpy()

      writer.write_examples(tmp / shard.name.replace('.tfrecord-', '.array_record-'), records())
      if count[0] != _shard_length(builder, shard.name):
        raise ValueError(f'{shard.name} holds {count[0]} records, its metadata says '
                         f'{_shard_length(builder, shard.name)}')
    for meta in version_dir.glob('*.json'):
      (tmp / meta.name).write_text(meta.read_text())
    _set_file_format(tmp / 'dataset_info.json', 'array_record')
    try:
      tmp.rename(target)
    except OSError:  # Another run converted it first: use theirs.
      if not (target / 'dataset_info.json').exists():
        raise
  except Exception as e:  # pylint: disable=broad-except  (OS, TF's DataLossError, ...)
    # A full disk: an OSError, or ArrayRecord's writer's RuntimeError ('write() failed: No
    # space left on device; ...').
    writing = isinstance(e, OSError) or 'No space left on device' in str(e)
    fix = ('free some disk space there, or set --config.cache_dir elsewhere' if writing
           else f'{version_dir} may be damaged: prepare it again')
    raise errors.UserError(f'converting {version_dir} to ArrayRecord in {target.parent} failed '
                           f'({type(e).__name__}: {errors.first_line(e) or "no message"}); '
                           f'nothing half-converted is kept; {fix}.') from None
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def _shard_length(builder, shard_name: str) -> int:
  """The records a shard '<name>-<split>.tfrecord-<i>-of-<n>' holds, by the metadata."""
  stem, numbers = shard_name.split('.tfrecord-')
  split = stem[len(builder.name.split('/')[0]) + 1:]
  return builder.info.splits[split].shard_lengths[int(numbers.split('-')[0])]


def _set_file_format(info_path: epath.Path, file_format: str) -> None:
  import json  # pylint: disable=g-import-not-at-top
  info = json.loads(info_path.read_text())
  info['fileFormat'] = file_format
  info_path.write_text(json.dumps(info, indent=2))


def _remove_stale(target: epath.Path) -> None:
  """Removes what killed conversions of `target` left behind (their process is gone)."""
  for leftover in target.parent.glob(f'{_TMP_PREFIX}{target.name}-*'):
    pid = leftover.name[len(f'{_TMP_PREFIX}{target.name}-'):].split('-')[0]
    if not pid.isdigit() or not _alive(int(pid)):
      shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
    return True
  except ProcessLookupError:
    return False
  except PermissionError:
    return True


# --- Batches -------------------------------------------------------------------------------

def steps_per_chunk(batch_size: int, image_shape: tuple[int, ...]) -> int:
  """How many steps a chunk of CHUNK_BYTES decoded examples holds (at least one)."""
  return max(1, CHUNK_BYTES // (batch_size * (math.prod(image_shape) + 4)))


def host_batches(split: StreamSplit | OwnSplit, chunks: list[dict[str, np.ndarray]]
                 ) -> Iterator[dict[str, np.ndarray]]:
  """The planned chunks' examples, read by index and decoded in threads, prefetched.

  Each chunk holds 'index' and 'mask' [(N,) K, B]; yields 'image' [(N,) K, B, H, W, C] uint8,
  'label' [(N,) K, B] int32 and 'mask', as input_pipeline.tf_batches does.
  """
  return split.batches(chunks)


# --- The conversion ahead of a run: `python -m mnist_jax.stream DATASET` ------------------

def prepare(dataset: str, data_dir: str = '', cache_dir: str = '') -> epath.Path:
  """The folder a stream run of `dataset` reads: its own ArrayRecord files, or the copy in the
  cache (resolved as a run resolves config.cache_dir), converted now if there is none yet."""
  from mnist_jax.infra import process  # pylint: disable=g-import-not-at-top
  builder = input_pipeline.find_builder(dataset, data_dir, download=False)
  return arrayrecord_folder(builder, process.resolve_cache_dir(cache_dir))


def main(argv: list[str] | None = None) -> int:
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m mnist_jax.stream',
      description='Converts a prepared TFDS dataset to ArrayRecord for input_mode=stream, once '
                  '(what the first stream run does), and prints the folder a run reads.')
  parser.add_argument('dataset', help="as config.dataset, e.g. 'mnist'")
  parser.add_argument('--data_dir', default='', help='as config.data_dir')
  parser.add_argument('--cache_dir', default='', help='as config.cache_dir')
  args = parser.parse_args(argv)
  try:
    print(prepare(args.dataset, args.data_dir, args.cache_dir), flush=True)
  except errors.UserError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
