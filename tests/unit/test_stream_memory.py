"""Stream mode's host memory does not grow with the number of chunks an epoch has.

Chunks of decoded examples are allocated and freed by many threads (tf.data's, XLA's); glibc's
malloc would keep each freed chunk in the arena of the thread that allocated it
(`process.return_freed_chunks` says why), so the more chunks, the more arenas held one.
"""

import ctypes
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mnist_jax import executor as executor_lib
from mnist_jax.infra import process

try:
  ctypes.CDLL(None).mallopt
  GLIBC = True
except AttributeError:
  GLIBC = False

# 12 threads each allocate an 8 MB block (a chunk) at once and free it; then the growth of the
# process's anonymous memory is printed. A first 8 MB block freed beforehand raises glibc's
# dynamic mmap threshold, as stream mode's first chunk does.
PROBE = textwrap.dedent("""
    import sys, threading
    import numpy as np
    from mnist_jax.infra import process

    def rss_anon_mb():
      for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
          return int(line.split()[1]) / 1024

    if sys.argv[1] == 'fixed':
      assert process.return_freed_chunks(environ={})
    first = np.ones(8 << 20, np.uint8)
    del first
    before = rss_anon_mb()
    barrier = threading.Barrier(12)

    def chunk():
      barrier.wait()
      block = np.ones(8 << 20, np.uint8)
      barrier.wait()  # All 12 held at once: 12 arenas, not one reused.
      del block

    threads = [threading.Thread(target=chunk) for _ in range(12)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    print(rss_anon_mb() - before)
""")


def _growth_mb(mode: str) -> float:
  out = subprocess.run([sys.executable, '-c', PROBE, mode], capture_output=True, text=True,
                       check=True)
  return float(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason='glibc only (other allocators have no such arenas)')
def test_freed_chunks_go_back_to_the_system():
  assert _growth_mb('default') > 48  # Without it: ~8 MB kept by each of the 12 arenas.
  assert _growth_mb('fixed') < 8


def test_a_user_choice_of_allocator_or_threshold_is_left_alone():
  assert not process.return_freed_chunks(environ={'MALLOC_MMAP_THRESHOLD_': '131072'})
  assert not process.return_freed_chunks(environ={'LD_PRELOAD': 'libjemalloc.so'})
  assert process.return_freed_chunks(environ={}) == GLIBC


class _Split:
  """A split of n 28x28x1 images, for the executor's arithmetic only."""

  def __init__(self, n):
    self.n, self.image_shape, self.label = n, (28, 28, 1), np.zeros(n, np.int32)

  def __len__(self):
    return self.n


@pytest.mark.parametrize('batch_size, steps_per_call, sets', [
    (128, 0, True),  # configs/mlp.py: 83 steps a chunk, 8.3 MB.
    (128, 10, False),  # configs/cnn.py: 10 steps, 1 MB (a fixed threshold would cost XLA).
])
def test_stream_mode_sets_the_threshold_only_for_chunks_that_large(monkeypatch, batch_size,
                                                                   steps_per_call, sets):
  calls = []
  monkeypatch.setattr(process, 'return_freed_chunks', lambda: calls.append(1) or True)
  executor_lib.StreamExecutor(
      dict(train=_Split(60_000), test=_Split(10_000)), train_split='train', eval_split='test',
      seeds=[0], batch_size=batch_size, eval_batch_size=1000, steps_per_call=steps_per_call)
  assert bool(calls) == sets
