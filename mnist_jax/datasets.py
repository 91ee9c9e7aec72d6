"""Your own data by config: a folder of images, or arrays in an .npz file.

  --config.dataset=image_folder:/path/to/root   root/<split>/<class name>/*.png|jpg|jpeg
  --config.dataset=npz:/path/to/file.npz        <split>_images, <split>_labels [, class_names]

`config.dataset` names a source by the prefix before its first ':' (`SOURCES`); a name without
a known prefix is a TFDS dataset (input_pipeline). A source lists its splits and classes, and
says what identifies its data (names, sizes and modification times of what it reads), without
decoding anything; `decode(split)` returns a whole split as uint8 images [N, H, W, C] and int32
labels [N]. Slicing ('train[:90%]'), resizing and caching are input_pipeline's.

For input_mode='stream', `reader(split)` opens a split for reading by index instead (an image
folder's files decoded when asked for, an .npz's arrays memory-mapped), with the same pixels
`decode` gives; `header_shape(split)` is its images' shape from headers alone (stream.py).
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import math
import os
import pathlib
import struct
import sys
import time
import zipfile

import numpy as np

from mnist_jax.infra import errors

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
# Files that file managers leave in folders: never data, never worth a word.
_SYSTEM_FILES = ('thumbs.db', 'desktop.ini')
# PIL modes decoded as one channel; every other mode (RGB, RGBA, P, CMYK, ...) becomes RGB.
_GRAY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')
_FILES_PER_TASK = 256  # Images one decoding task reads (a thread pool runs the tasks).


def _digest(value) -> str:
  return hashlib.sha256(repr(value).encode()).hexdigest()[:16]


def _is_system(name: str) -> bool:
  return name.startswith('.') or name.lower() in _SYSTEM_FILES


def _stamp(entry: os.DirEntry) -> tuple[str, int, int]:
  stat = entry.stat()
  return entry.name, stat.st_size, stat.st_mtime_ns


class ImageFolder:
  """root/<split>/<class>/*.png|jpg|jpeg: classes are the class folders' names across all
  splits, sorted (as strings), so every split labels a class alike; a class may be missing
  from a split. Files that are not PNG or JPEG are ignored (hidden and system files silently,
  others with a count). An image that does not decode stops the run, naming it: a skipped
  file would silently change the dataset."""

  kind = 'image_folder'

  def __init__(self, dataset: str, location: str, image_size: tuple[int, ...] = ()):
    self.name, self.image_size = dataset, tuple(image_size)
    self.root = pathlib.Path(location).expanduser()
    if not location or not self.root.is_dir():
      what = 'is not a folder' if self.root.exists() else 'does not exist'
      raise errors.UserError(f'config.dataset={dataset!r}: {self.root} {what}; expected a '
                             'folder root/<split>/<class>/*.png (or .jpg, .jpeg).')
    self.root = self.root.resolve()
    self._files, self._stamps, ignored = {}, {}, []
    for split_dir in sorted(os.scandir(self.root), key=lambda e: e.name):
      if split_dir.is_dir() and not _is_system(split_dir.name):
        self._files[split_dir.name], self._stamps[split_dir.name] = self._scan(split_dir,
                                                                               ignored)
    if not self._files:
      raise errors.UserError(f'config.dataset={dataset!r}: {self.root} holds no split folders; '
                             'expected root/<split>/<class>/*.png, e.g. root/train/cat/1.png.')
    self.split_names = tuple(self._files)
    self.class_names = tuple(sorted({c for split in self._files.values() for c in split}))
    self.identity = f'{self.kind}-' + _digest((str(self.root), self.image_size, self._stamps))
    if ignored:
      print(f'warning: {dataset}: ignored {len(ignored):,} files that are not '
            f"{'/'.join(s[1:].upper() for s in IMAGE_SUFFIXES)} images (e.g. {ignored[0]}).",
            flush=True)

  def _scan(self, split_dir: os.DirEntry, ignored: list) -> tuple[dict, list]:
    """{class: sorted image paths} and the stamps of one split folder."""
    files, stamps = {}, []
    for class_dir in sorted(os.scandir(split_dir.path), key=lambda e: e.name):
      if _is_system(class_dir.name):
        continue
      if not class_dir.is_dir():
        raise errors.UserError(
            f'config.dataset={self.name!r}: {class_dir.path} is a file where class folders are '
            f'expected: images go in {split_dir.path}/<class name>/.')
      images = []
      for entry in sorted(os.scandir(class_dir.path), key=lambda e: e.name):
        if entry.name.lower().endswith(IMAGE_SUFFIXES) and entry.is_file():
          images.append(entry)
        elif not _is_system(entry.name):
          ignored.append(entry.path)
      files[class_dir.name] = [e.path for e in images]
      stamps.append((class_dir.name, [_stamp(e) for e in images]))
    return files, stamps

  def split_size(self, split: str) -> int:
    return sum(len(paths) for paths in self._files[split].values())

  def check(self, split: str) -> None:
    if not self.split_size(split):
      raise errors.UserError(
          f'config.dataset={self.name!r}: split {split!r} holds no images; expected '
          f'{self.root / split}/<class>/*.png (or .jpg, .jpeg).')

  def cache_name(self, split: str) -> str:
    """Names the decoded split after what it was decoded from: a changed file, a new or
    removed one, another class set or image size is another name, so it is decoded again."""
    key = (str(self.root), self.image_size, self.class_names, split, self._stamps[split])
    return f'{self.kind}-{_digest(key)}-{split}'

  def files(self, split: str) -> tuple[list[str], np.ndarray]:
    """The split's image paths, class by class and by name (the order it is read in), and
    their int32 labels [N]."""
    labels = [(path, self.class_names.index(name))
              for name, paths in self._files[split].items() for path in paths]
    return [path for path, _ in labels], np.array([l for _, l in labels], np.int32)

  def decode(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    self.check(split)
    paths, labels = self.files(split)
    images = _decode_images(paths, self.image_size, f'{self.name} {split}')
    return _stack(images, paths, self.name), labels

  def header_shape(self, split: str) -> tuple[int, int, int]:
    """(H, W, C) of the split's first image, from its header: what `auto` sizes the split by
    (its other images may differ; `reader` reads every header)."""
    return _header(self.files(split)[0][0])

  def reader(self, split: str) -> 'FolderReader':
    """The split read by index. Every image's header is read now (in threads; no pixels), so
    the split has the size and channels `decode` would give it (3 channels if any image has
    colour), and images of other sizes are refused now, as `decode` refuses them."""
    self.check(split)
    paths, labels = self.files(split)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      shapes = [shape for task in pool.map(lambda task: [_header(p) for p in task],
                                           _tasks(paths)) for shape in task]
    print(f'{self.name} {split}: read the headers of {len(paths):,} images in '
          f'{time.perf_counter() - start:.1f}s (their pixels are decoded as steps need them)',
          flush=True)
    if not self.image_size:
      for shape, path in zip(shapes, paths):
        if shape[:2] != shapes[0][:2]:
          raise _size_error(self.name, path, shape, paths[0], shapes[0])
    channels = max(shape[-1] for shape in shapes)
    return FolderReader(paths, labels, (*(self.image_size or shapes[0][:2]), channels),
                        self.image_size, self.name)


@dataclasses.dataclass(frozen=True)
class FolderReader:
  """An image folder's split read by index: each image decoded when asked for, as `decode`
  decodes it (resized to image_size; gray ones repeated into 3 channels if the split has
  colour)."""
  paths: list[str]
  label: np.ndarray  # [N] int32.
  image_shape: tuple[int, int, int]
  image_size: tuple[int, ...]
  dataset: str

  def __len__(self) -> int:
    return len(self.paths)

  def images(self, rows_M: np.ndarray) -> np.ndarray:
    """uint8 images [M, H, W, C] of the split's examples `rows_M`."""
    images = np.empty((len(rows_M), *self.image_shape), np.uint8)
    for i, row in enumerate(rows_M):
      image = _decode_image(self.paths[row], self.image_size)
      if image.shape[:2] != self.image_shape[:2]:  # The file changed since it was opened.
        raise _size_error(self.dataset, self.paths[row], image.shape, self.paths[0],
                          self.image_shape)
      images[i] = image  # A gray image broadcasts into 3 channels: np.repeat's values.
    return images


def _tasks(paths: list[str]) -> list[list[str]]:
  return [paths[i:i + _FILES_PER_TASK] for i in range(0, len(paths), _FILES_PER_TASK)]


def _decode_images(paths: list[str], image_size: tuple[int, ...], what: str) -> list[np.ndarray]:
  """Decodes `paths` in a thread pool (PIL decodes outside the GIL), with a progress bar on a
  terminal and one line when done."""
  import tqdm  # pylint: disable=g-import-not-at-top  (only when there is something to decode)
  start = time.perf_counter()
  tasks = _tasks(paths)
  images = []
  bar = tqdm.tqdm(total=len(paths), desc=f'decoding {what}', unit=' images', leave=False,
                  disable=not sys.stderr.isatty(), file=sys.stderr)
  with bar, concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    for decoded in pool.map(lambda task: [_decode_image(p, image_size) for p in task], tasks):
      images += decoded
      bar.update(len(decoded))
  print(f'{what}: decoded {len(paths):,} images in {time.perf_counter() - start:.1f}s',
        flush=True)
  return images


def _decode_image(path: str, image_size: tuple[int, ...]) -> np.ndarray:
  """uint8 [H, W, 1] for a grayscale image, [H, W, 3] for any other; resized to image_size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      image = image.convert('L' if image.mode in _GRAY_MODES else 'RGB')
      if image_size:
        image = image.resize(image_size[::-1], Image.Resampling.BILINEAR)  # PIL: (W, H).
      array = np.asarray(image, np.uint8)
  except Exception as e:  # pylint: disable=broad-except  (PIL: OSError, SyntaxError, ...)
    raise _undecodable(path, e) from None
  return array[..., None] if array.ndim == 2 else array


def _header(path: str) -> tuple[int, int, int]:
  """(H, W, C) of an image as `_decode_image` decodes it (before resizing), from its header
  alone: PIL reads the pixels only when asked for them."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      return image.height, image.width, 1 if image.mode in _GRAY_MODES else 3
  except Exception as e:  # pylint: disable=broad-except  (PIL: OSError, SyntaxError, ...)
    raise _undecodable(path, e) from None


def _undecodable(path: str, e: Exception) -> errors.UserError:
  return errors.UserError(
      f'cannot decode {path} ({type(e).__name__}: {" ".join(str(e).split()) or "unreadable"}); '
      'every image is read (none is skipped): replace or delete this file.')


def _size_error(dataset: str, path: str, shape: tuple, first: str,
                first_shape: tuple) -> errors.UserError:
  (height, width), size = shape[:2], first_shape[:2]
  return errors.UserError(
      f'config.dataset={dataset!r}: {path} is {height}x{width} (HxW), '
      f'but {first} is {size[0]}x{size[1]}; set --config.image_size="({size[0]}, '
      f'{size[1]})" to resize every image to one size.')


def _stack(images: list[np.ndarray], paths: list[str], dataset: str) -> np.ndarray:
  """One array [N, H, W, C]: gray images get 3 channels if any image has colour; images of
  other sizes than the first are refused, naming the first such file."""
  size = images[0].shape[:2]
  for image, path in zip(images, paths):
    if image.shape[:2] != size:
      raise _size_error(dataset, path, image.shape, paths[0], size)
  if any(image.shape[-1] == 3 for image in images):
    images = [np.repeat(image, 3, -1) if image.shape[-1] == 1 else image for image in images]
  return np.stack(images)


def resize_images(images_NxHxWxC: np.ndarray, image_size: tuple[int, ...]) -> np.ndarray:
  """uint8 images resized to image_size (H, W), bilinear, as an image folder's are."""
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    return np.stack(list(pool.map(lambda image: resize_image(image, image_size),
                                  images_NxHxWxC)))


def resize_image(image_HxWxC: np.ndarray, image_size: tuple[int, ...]) -> np.ndarray:
  """One uint8 image resized to image_size (H, W), bilinear (PIL)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  gray = image_HxWxC.shape[-1] == 1
  resized = Image.fromarray(image_HxWxC[..., 0] if gray else image_HxWxC).resize(
      image_size[::-1], Image.Resampling.BILINEAR)
  array = np.asarray(resized, np.uint8)
  return array[..., None] if gray else array


class NpzFile:
  """<split>_images uint8 [N, H, W] or [N, H, W, C] (C 1 or 3), or floats in [0, 1], which
  become uint8 as round(x * 255); <split>_labels integers [N]; class_names optional, a string
  array [num_classes] (without it, the classes are 0 .. the largest label, named by number)."""

  kind = 'npz'

  def __init__(self, dataset: str, location: str, image_size: tuple[int, ...] = ()):
    del image_size  # input_pipeline resizes arrays after loading.
    self.name = dataset
    path = pathlib.Path(location).expanduser()
    if not location or not path.is_file():
      what = 'is not a file' if path.exists() else 'does not exist'
      raise errors.UserError(f'config.dataset={dataset!r}: {path} {what}; expected an .npz '
                             'file with <split>_images and <split>_labels arrays.')
    self.path = path.resolve()
    try:
      self._npz = np.load(self.path, allow_pickle=False)
      self._arrays = list(self._npz.files)
    except Exception as e:  # pylint: disable=broad-except  (zipfile, OS, value errors)
      raise errors.UserError(f'config.dataset={dataset!r}: cannot read {self.path} as an .npz '
                             f'({type(e).__name__}: {" ".join(str(e).split())}).') from None
    # A split with one of its two arrays is a split too: then the missing one is named.
    self.split_names = tuple(sorted({k.rsplit('_', 1)[0] for k in self._arrays
                                     if k.endswith(('_images', '_labels'))}))
    if not self.split_names:
      raise errors.UserError(f'config.dataset={dataset!r}: {self.path} holds no <split>_images '
                             f'and <split>_labels arrays (it holds: {", ".join(self._arrays) or "nothing"}).')
    self.class_names = self._class_names()
    stat = self.path.stat()
    self.identity = f'{self.kind}-' + _digest((str(self.path), stat.st_size, stat.st_mtime_ns))

  def _array(self, key: str) -> np.ndarray:
    if key not in self._arrays:
      raise errors.UserError(f'config.dataset={self.name!r}: {self.path} has no array {key!r} '
                             f'(it holds: {", ".join(self._arrays)}).')
    try:
      return self._npz[key]
    except ValueError as e:  # An object array (pickled): refused, as allow_pickle is off.
      raise errors.UserError(f'config.dataset={self.name!r}: {key} in {self.path} cannot be '
                             f'read without pickle ({e}); save it as a numeric or string '
                             'array.') from None

  def _class_names(self) -> tuple[str, ...]:
    if 'class_names' not in self._arrays:
      top = max((int(self._labels(s).max(initial=-1)) for s in self.split_names), default=-1)
      return tuple(str(i) for i in range(top + 1))
    names = self._array('class_names')
    if names.ndim != 1 or names.dtype.kind not in 'US' or not len(names):
      raise errors.UserError(f'config.dataset={self.name!r}: class_names holds '
                             f'{names.dtype}{list(names.shape)}; expected strings [num_classes], '
                             "e.g. np.array(['cat', 'dog']).")
    names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist())
    if len(set(names)) != len(names):
      raise errors.UserError(f'config.dataset={self.name!r}: class_names repeats a name: '
                             f'{list(names)}.')
    return names

  def _labels(self, split: str) -> np.ndarray:
    labels = self._array(f'{split}_labels')
    if labels.ndim != 1 or labels.dtype.kind not in 'iu':
      raise errors.UserError(f'config.dataset={self.name!r}: {split}_labels holds '
                             f'{labels.dtype}{list(labels.shape)}; expected integers [N].')
    if len(labels) and labels.min() < 0:
      raise errors.UserError(f'config.dataset={self.name!r}: {split}_labels holds '
                             f'{labels.min()}; expected class indices >= 0.')
    return labels

  def split_size(self, split: str) -> int:
    return len(self._labels(split))

  def check(self, split: str) -> None:
    self.decode(split)  # Cheap: the arrays are read, checked and converted; nothing decodes.

  @functools.cache  # pylint: disable=method-cache-max-size-none  (a source lives for a load)
  def decode(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    return self._decode(split)

  def cache_name(self, split: str) -> None:
    del split
    return None  # The file is its own cache: reading it back is as fast.

  def _decode(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels, what = self._checked(split, self._array(f'{split}_images'))
    images = _uint8(images, what)
    self._check_classes(split, labels)
    return images, labels.astype(np.int32)

  def header_shape(self, split: str) -> tuple[int, int, int]:
    """(H, W, C) of the split's images, from their .npy header alone."""
    shape = self._header(f'{split}_images')[0]
    return (*shape[1:], 1) if len(shape) == 3 else tuple(shape[1:])

  def reader(self, split: str) -> 'NpzReader':
    """The split read by index: its images memory-mapped from the file, checked now by their
    .npy header (the float range is checked as they are read); the labels read whole."""
    images, labels, what = self._checked(split, self._mapped(f'{split}_images'))
    if images.dtype.kind != 'f':
      _uint8(images[:0], what)  # Refuses other dtypes than uint8 now, by the header.
    self._check_classes(split, labels)
    return NpzReader(images, labels.astype(np.int32), what)

  def _checked(self, split: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """Images [N, H, W, C] (C 1 or 3), as many as the labels, and what they hold (for errors)."""
    labels = self._labels(split)
    what = f'config.dataset={self.name!r}: {split}_images holds {images.dtype}{list(images.shape)}'
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise errors.UserError(f'{what}; expected images [N, H, W] or [N, H, W, C], C 1 or 3.')
    if len(images) != len(labels):
      raise errors.UserError(f'{what}, but {split}_labels holds {len(labels):,} labels; '
                             'expected one label per image.')
    if not len(images):
      raise errors.UserError(f'{what}: split {split!r} holds no examples.')
    return images, labels, what

  def _check_classes(self, split: str, labels: np.ndarray) -> None:
    top = int(labels.max())
    if top >= len(self.class_names):
      raise errors.UserError(
          f'config.dataset={self.name!r}: {split}_labels holds {top}, but class_names has '
          f'{len(self.class_names)} names: labels must be 0..{len(self.class_names) - 1}.')

  def _member(self, key: str) -> zipfile.ZipInfo:
    if key not in self._arrays:
      self._array(key)  # Says which arrays there are.
    with zipfile.ZipFile(self.path) as archive:
      names = archive.namelist()
      return archive.getinfo(f'{key}.npy' if f'{key}.npy' in names else key)

  def _header(self, key: str) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, offset of the data within the member) of array `key`, from
    its .npy header (read through zipfile: a compressed member inflates only that far)."""
    info = self._member(key)
    try:
      with zipfile.ZipFile(self.path) as archive, archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(member)
        return shape, fortran, dtype, member.tell()
    except Exception as e:  # pylint: disable=broad-except  (zipfile, OS, value errors)
      raise self._damaged(key, e) from None

  def _mapped(self, key: str) -> np.ndarray:
    """Array `key`, memory-mapped from the file: np.savez stores each array as an .npy file
    at an offset of the zip (after the member's local header), so nothing is read whole."""
    member = self._member(key)
    if member.compress_type != zipfile.ZIP_STORED:
      raise errors.UserError(
          f'config.dataset={self.name!r}: {key} in {self.path} is compressed '
          "(np.savez_compressed), and input_mode='stream' reads images by index, which needs "
          'them stored: save the file again with np.savez, or use input_mode device or tfdata.')
    shape, fortran, dtype, data_offset = self._header(key)
    if dtype.hasobject:
      raise errors.UserError(f'config.dataset={self.name!r}: {key} in {self.path} cannot be '
                             'read without pickle (it holds objects); save it as a numeric '
                             'array.')
    with open(self.path, 'rb') as f:
      f.seek(member.header_offset)
      local = f.read(30)  # A zip local file header: 30 bytes, then the name and extra field.
    nbytes = math.prod(shape) * dtype.itemsize
    if len(local) < 30 or local[:4] != b'PK\x03\x04' or data_offset + nbytes != member.file_size:
      raise self._damaged(key, ValueError('its zip entry does not match its .npy header'))
    name_length, extra_length = struct.unpack('<HH', local[26:30])
    offset = member.header_offset + 30 + name_length + extra_length + data_offset
    if offset + nbytes > self.path.stat().st_size:
      raise self._damaged(key, EOFError(f'{key} ends past the end of the file'))
    if not nbytes:
      return np.zeros(shape, dtype)
    return np.memmap(self.path, dtype, 'r', offset, shape, 'F' if fortran else 'C')

  def _damaged(self, key: str, e: Exception) -> errors.UserError:
    return errors.UserError(f'config.dataset={self.name!r}: cannot read {key} in {self.path}: '
                            f'the file is damaged or cut short ({type(e).__name__}: '
                            f'{errors.first_line(e) or "unreadable"}); write it again.')


@dataclasses.dataclass(frozen=True)
class NpzReader:
  """An .npz's split read by index from its memory-mapped images, converted as `decode`
  converts them."""
  mapped: np.ndarray  # [N, H, W, C], uint8 or floats in [0, 1].
  label: np.ndarray  # [N] int32.
  what: str  # What the images array holds, for errors.

  def __len__(self) -> int:
    return len(self.label)

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.mapped.shape[1:])

  def images(self, rows_M: np.ndarray) -> np.ndarray:
    """uint8 images [M, H, W, C] of the split's examples `rows_M`."""
    return _uint8(np.asarray(self.mapped[rows_M]), self.what)


def _uint8(images: np.ndarray, what: str) -> np.ndarray:
  """uint8 images as they are; floats in [0, 1] as round(x * 255); anything else refused."""
  if images.dtype.kind == 'f':
    low, high = float(images.min()), float(images.max())
    if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= 1):
      raise errors.UserError(f'{what} in [{low:g}, {high:g}]; expected floats in [0, 1] (or '
                             'uint8 in [0, 255]).')
    return np.round(images * 255).astype(np.uint8)
  if images.dtype != np.uint8:
    raise errors.UserError(f'{what}; expected uint8 in [0, 255] or floats in [0, 1] (e.g. '
                           'images.astype(np.uint8)).')
  return images


# What `kind:` before the first ':' of config.dataset names; anything else is a TFDS name.
SOURCES = {ImageFolder.kind: ImageFolder, NpzFile.kind: NpzFile}


def find(dataset: str, image_size: tuple[int, ...] = ()):
  """The source `dataset` names (`kind:location`), or None for a TFDS dataset."""
  kind, colon, location = dataset.partition(':')
  if not colon or kind not in SOURCES:
    return None
  return SOURCES[kind](dataset, location, image_size)


# --- Images to predict: any file, converted to what a model was trained on ------------------

PREDICT_SUFFIXES = (*IMAGE_SUFFIXES, '.npy')


def read_for_model(path: str, image_shape: tuple[int, int, int]) -> list[np.ndarray]:
  """A PNG or JPEG file (one image) or an .npy file (one image, or a stack of them) as uint8
  images of `image_shape` (H, W, C), converted as `conform_image` says. Raises UserError,
  naming the file, when it cannot be read or converted."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if is_npy(path):
    try:
      array = np.load(path, allow_pickle=False)
    except Exception as e:  # pylint: disable=broad-except  (OS, value, pickle errors)
      raise errors.UserError(f'cannot read {path} ({type(e).__name__}: '
                             f'{errors.first_line(e) or "unreadable"}).') from None
    return [conform_image(image, image_shape, path) for image in _npy_images(array, path)]
  try:
    with Image.open(path) as image:
      array = _pixels(image)
  except Exception as e:  # pylint: disable=broad-except  (PIL: OSError, SyntaxError, ...)
    raise errors.UserError(f'cannot read {path} ({type(e).__name__}: '
                           f'{" ".join(str(e).split()) or "unreadable"}).') from None
  return [conform_image(array, image_shape, path)]


def is_npy(path: str) -> bool:
  return path.lower().endswith('.npy')


def _pixels(image) -> np.ndarray:
  """A PIL image's pixels: uint8 gray or RGB, or uint16 gray for a 16-bit one ('I;16', or 'I'
  within 16 bits), which conform_image scales to 8 bits. An alpha channel is dropped."""
  if image.mode.startswith('I'):
    array = np.asarray(image)
    if array.size and 0 <= array.min() and array.max() <= np.iinfo(np.uint16).max:
      return array.astype(np.uint16)
  return np.asarray(image.convert('L' if image.mode in _GRAY_MODES else 'RGB'), np.uint8)


def _npy_images(array: np.ndarray, path: str) -> list[np.ndarray]:
  """[H, W] and [H, W, C] are one image; [N, H, W] and [N, H, W, C] are N (N > 0). A 3-D
  array is [H, W, C] when its last axis is at most 4 long (then C must be 1 or 3), else
  [N, H, W]."""
  one = array.ndim == 2 or (array.ndim == 3 and array.shape[-1] <= 4)
  shape = f'{array.dtype}{list(array.shape)}'
  if not one and array.ndim not in (3, 4):
    raise errors.UserError(f'cannot convert {path}: it holds {shape}; expected [H, W], '
                           '[H, W, C] or a stack [N, H, W(, C)], C 1 or 3.')
  if not one and not len(array):
    raise errors.UserError(f'cannot convert {path}: it holds {shape}, a stack of no images; '
                           'give a file of at least one image.')
  return [array] if one else list(array)


def conform_image(image: np.ndarray, image_shape: tuple[int, int, int],
                  what: str = 'the image') -> np.ndarray:
  """Any image as the dataset's: uint8 [H, W, C] of `image_shape`.

  * Values: uint8 as they are; uint16 (a 16-bit PNG) scaled to 8 bits, round(x / 257), so
    65535 is 255; floats in [0, 1] as round(x * 255) (as an .npz dataset's).
  * Channels: a colour image becomes gray by PIL's luma (L = 0.299 R + 0.587 G + 0.114 B)
    for a 1-channel dataset; a gray one is repeated into 3 channels for a colour dataset.
  * Size: resized to (H, W), bilinear (PIL), as `config.image_size` resizes an image folder.
    The aspect ratio is not kept: crop first for that.
  Nothing else changes: MNIST's digits are white (255) on black (0), and a dark digit on white
  paper must be inverted first (255 - image).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = np.asarray(image)
  shape = f'{image.dtype}{list(image.shape)}'
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or 0 in image.shape:
    raise errors.UserError(f'cannot convert {what}: it holds {shape}; expected an image '
                           '[H, W] or [H, W, C], C 1 or 3.')
  if image.dtype.kind == 'f':
    low, high = (float(image.min()), float(image.max()))
    if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= 1):
      raise errors.UserError(f'cannot convert {what}: its values are in [{low:g}, {high:g}]; '
                             'expected floats in [0, 1] or uint8 in [0, 255].')
    image = np.round(image * 255).astype(np.uint8)
  elif image.dtype == np.uint16:
    image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
  elif image.dtype != np.uint8:
    raise errors.UserError(f'cannot convert {what}: it holds {shape}; expected uint8 in '
                           '[0, 255], uint16 or floats in [0, 1].')
  height, width, channels = image_shape
  if image.shape == tuple(image_shape):
    return image
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  if channels == 1 and pil.mode != 'L':
    pil = pil.convert('L')
  if pil.size != (width, height):
    pil = pil.resize((width, height), Image.Resampling.BILINEAR)
  array = np.asarray(pil, np.uint8)
  array = array[..., None] if array.ndim == 2 else array
  return np.repeat(array, 3, -1) if channels == 3 and array.shape[-1] == 1 else array
