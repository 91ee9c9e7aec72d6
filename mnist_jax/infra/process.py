"""Process settings, made once before a run: quiet logs, the XLA:CPU flags and the caches.

Nothing here changes what a run computes; each makes the process faster (the flags, the
compilation cache), keeps work from being done twice (the decoded-data cache) or keeps the
run's output its own (the logs).
"""

import importlib.metadata
import logging
import os
import pathlib
import re
import sys

from etils import epath
import jax

from mnist_jax.infra import storage


# jaxlib 0.9 and later run XLA:CPU convolutions through YNNPACK. On a 2-core AVX2 EPYC that made
# the 14x14x32->64 convolution of configs/cnn.py and its input gradient ~2x slower than XLA's
# own (Eigen) convolution (26 vs 14 ms and 30 vs 12 ms), and the CNN's whole train step 1.48x
# slower (115.6 vs 78.3 ms; benchmarks/profile_cnn.py). The flag removes only convolutions from
# YNNPACK's fusion types; dots (the MLP) and every other op compile as before. jaxlib 0.7 and 0.8
# have neither the flag nor YNNPACK convolutions, and XLA stops at a flag it does not know.
CPU_XLA_FLAGS = {
    'xla_cpu_experimental_ynn_fusion_type': '-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'}
_CPU_XLA_FLAGS_SINCE = (0, 9)


def use_cpu_xla_flags(environ=os.environ) -> list[str]:
  """Adds `CPU_XLA_FLAGS` to XLA_FLAGS in `environ`; returns the flags it added.

  Takes effect only if JAX's backend has not started yet (XLA reads XLA_FLAGS once), so call
  it first thing. A flag the user already set in XLA_FLAGS is left as they set it; nothing is
  added for a jaxlib older than 0.9. Other backends ignore XLA:CPU's flags.
  """
  version = tuple(int(p) for p in importlib.metadata.version('jaxlib').split('.')[:2])
  if version < _CPU_XLA_FLAGS_SINCE:
    return []
  current = environ.get('XLA_FLAGS', '').split()
  added = [f'--{name}={value}' for name, value in CPU_XLA_FLAGS.items()
           if not any(f.startswith(f'--{name}=') for f in current)]
  if added:
    environ['XLA_FLAGS'] = ' '.join(current + added)
  return added


# glibc's malloc serves a large block from the arena of the thread that asks for it, once its
# dynamic mmap threshold has risen to the size of the first large block freed (up to 32 MB),
# and an arena keeps what is freed below its trim threshold (twice that). Stream mode's chunks
# (stream.CHUNK_BYTES of decoded examples, 8 MB for configs/mlp.py) are allocated by tf.data's
# and XLA's threads, up to 16 arenas on 2 cores, and each arena that once held one keeps ~11 MB
# free: the more chunks an epoch has, the more arenas, so host memory grew with the dataset
# (configs/mlp.py, MNIST against 4x MNIST, one epoch: +96 MB of peak RSS, all of it free
# memory in 15 arenas, read from malloc_info). A fixed threshold gives blocks this large their
# own mapping, returned when freed: -6 MB. It must stay above the blocks a program reuses at
# every call (XLA's activations: with 4 MB, configs/cnn.py's 12.8 MB ones cost 13% more CPU),
# so stream mode sets it only when its chunks are at least this large.
CHUNK_MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # <malloc.h>


def return_freed_chunks(threshold: int = CHUNK_MMAP_THRESHOLD, environ=os.environ) -> bool:
  """Has glibc's malloc map blocks of `threshold` bytes and more on their own, and unmap them
  when freed (see above); returns whether it did. Nothing is done without glibc's mallopt
  (musl, macOS), or where the user chose (MALLOC_MMAP_THRESHOLD_, or an allocator in
  LD_PRELOAD). Process-wide; it takes effect for later allocations, from any thread."""
  if 'MALLOC_MMAP_THRESHOLD_' in environ or 'LD_PRELOAD' in environ:
    return False
  import ctypes  # pylint: disable=g-import-not-at-top
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return mallopt(_M_MMAP_THRESHOLD, threshold) == 1


# Log lines meant for TFDS's developers, not for a user of a prepared dataset: a version folder
# without metadata (TFDS looks in each candidate folder before it finds or misses the data; a
# missing dataset is run.py's one error line) and its own mock data calling a deprecated field.
TFDS_NOISE = re.compile(r'Variant folder .* has no dataset_info\.json'
                        r'|`TensorInfo\.dtype` is deprecated')


def asks_for_logs(argv: list[str]) -> bool:
  """Whether the command line sets absl's verbosity (`-v 0`, `--verbosity=1`, ...)."""
  return any(arg in ('-v', '--verbosity') or arg.startswith(('-v=', '--verbosity='))
             for arg in argv[1:])


def _not_tfds_noise(record: logging.LogRecord) -> bool:
  return not TFDS_NOISE.search(record.getMessage())


def quiet_logs(argv: list[str], environ=os.environ) -> bool:
  """Keeps a run's output its own, unless `argv` sets the verbosity; returns whether it did.

  Call it before anything imports TensorFlow (it reads its environment once):
  - TensorFlow's C++ logs only errors (TF_CPP_MIN_LOG_LEVEL=2);
  - TensorFlow's oneDNN kernels are off (TF_ENABLE_ONEDNN_OPTS=0), which also ends the
    `oneDNN custom operations are on` lines that no log level hides. TensorFlow here only reads,
    decodes and casts integers (tf.data), none of which is a oneDNN kernel: nothing the run
    computes changes;
  - TFDS's warnings for its developers (TFDS_NOISE) are dropped.
  A variable the user set is left as they set it. Warnings meant for the user (run.py's own,
  and any other library's) still print.
  """
  environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  if asks_for_logs(argv):
    return False
  environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  # absl's own logger (an ABSLLogger): asking `logging` for 'absl' before absl is imported
  # would make it a plain Logger, and absl's warnings would reach stderr at every level.
  absl_logging.get_absl_logger().addFilter(_not_tfds_noise)
  return True


def resolve_cache_dir(cache_dir: str) -> epath.Path | None:
  if cache_dir == 'none':
    return None
  path = cache_dir or os.environ.get('MNIST_JAX_CACHE') or '~/.cache/mnist_jax'
  return storage.as_path(path if storage.is_remote(path) else os.path.expanduser(path))


def enable_compilation_cache(cache_dir: epath.Path) -> None:
  """JAX's persistent cache: a second run loads compiled programs instead of compiling."""
  jax.config.update('jax_compilation_cache_dir', str(cache_dir / 'jax'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  _replace_damaged_cache_entries(cache_dir / 'jax')


def _replace_damaged_cache_entries(folder: epath.Path) -> None:
  """A compiled program whose cache file is damaged (cut short by a kill, a full disk) is
  compiled again either way; JAX warns in two lines at every run and never replaces the file,
  as one is there. Here the file is removed, so the program compiled now is cached again, with
  one line. (JAX's private module: if it changes, JAX's own handling stays.)"""
  import warnings  # pylint: disable=g-import-not-at-top
  try:
    from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
    original = compilation_cache.get_executable_and_time
  except (ImportError, AttributeError):
    return
  if getattr(original, 'replaces_damaged', False):
    return

  def get_executable_and_time(cache_key, *args, **kwargs):
    try:
      return original(cache_key, *args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  (zstd, zlib, XLA: any damage)
      done = 'compiled again'
      if not storage.is_remote(folder):
        for suffix in ('-cache', '-atime'):
          (pathlib.Path(folder) / f'{cache_key}{suffix}').unlink(missing_ok=True)
        done = 'removed, the program is compiled and cached again'
      print(f"warning: the compilation cache's entry {cache_key[:40]}... in {folder} is "
            f'damaged ({type(e).__name__}); {done}.', file=sys.stderr, flush=True)
      raise

  get_executable_and_time.replaces_damaged = True
  compilation_cache.get_executable_and_time = get_executable_and_time
  warnings.filterwarnings('ignore', message='Error reading persistent compilation cache entry')
