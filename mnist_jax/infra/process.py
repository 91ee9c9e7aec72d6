"""Process settings, made once before a run: the XLA:CPU flags and the caches.

Nothing here changes what a run computes; each makes the process faster (the flags, the
compilation cache) or keeps work from being done twice (the decoded-data cache).
"""

import importlib.metadata
import os

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
