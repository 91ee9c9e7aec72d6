"""The workdir: prepared before anything is written into it, and held by one run at a time.

`prepare` creates the folder or refuses, in one line, what a user can get wrong: a path that is
a file, a path under a file, a folder this user may not write.

`hold` takes the workdir's lock, `<workdir>/.lock`, for the length of the run. On a local or
network file system it is an advisory `flock` on that file: the kernel drops it when its
process ends however it ends (kill -9, a crash, power loss), so a lock never outlives its run
and the next run needs no manual step. A second run in the same workdir while the first holds
it is refused, naming the first one's pid and host. With several processes, process 0 holds it
for all of them and tells the others whether they may go on.
"""

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket

import jax
import numpy as np
from jax.experimental import multihost_utils

from mnist_jax import errors

LOCK_NAME = '.lock'


class WorkdirError(errors.UserError):
  """The workdir cannot be used: a file, unwritable, or held by another run."""


def prepare(workdir: pathlib.Path) -> None:
  """Creates `workdir` (and its parents) or raises WorkdirError saying why it cannot."""
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f'--workdir={workdir} is a file, not a folder; choose another '
                       '--workdir (the file was left as it is).')
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f'.write_test.{socket.gethostname()}.{os.getpid()}'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    raise WorkdirError(f'--workdir={workdir} cannot be written: {_reason(e, workdir)}; choose '
                       'another --workdir.') from None


def _reason(e: OSError, workdir: pathlib.Path) -> str:
  if e.errno == errno.ENOTDIR:
    parent = next((p for p in workdir.parents if p.exists() and not p.is_dir()), None)
    return f'{parent} is a file, not a folder' if parent else 'a part of it is a file'
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return f'no permission to write there ({os.strerror(e.errno)})'
  return f'{type(e).__name__}: {e.strerror or e}'


class _FileLock:
  """An exclusive flock on `<workdir>/.lock`, whose text says who holds it."""

  def __init__(self, workdir: pathlib.Path):
    self.path = pathlib.Path(workdir) / LOCK_NAME
    self._fd = None

  def acquire(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirError(
          f'{self.path.parent} is in use by another run ({holder}); wait for it to finish, '
          'or use another --workdir.') from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(dict(
        pid=os.getpid(), host=socket.gethostname(),
        started=datetime.datetime.now().isoformat(timespec='seconds'))).encode())
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Drops the flock; the file stays (removing it would race a taker).
      self._fd = None


def _read_holder(fd: int) -> str:
  try:
    holder = json.loads(os.pread(fd, 4096, 0).decode() or '{}')
    return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}")
  except (ValueError, KeyError, OSError):
    return 'pid unknown'


@contextlib.contextmanager
def hold(workdir: pathlib.Path):
  """Holds the workdir's lock for the block (process 0 for every process of the run)."""
  lock, error = _FileLock(workdir), None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except WorkdirError as e:
      error = e
  if jax.process_count() > 1:  # Everyone learns process 0's outcome before writing anything.
    taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not taken and error is None:
      error = WorkdirError(f'{workdir} is in use by another run (process 0 could not take '
                           'its lock); wait for it to finish, or use another --workdir.')
  if error:
    raise error
  try:
    yield
  finally:
    lock.release()
