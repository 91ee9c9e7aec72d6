"""The workdir: prepared before anything is written into it, and held by one run at a time.

`prepare` creates the folder or refuses, in one line, what a user can get wrong: a path that is
a file, a path under a file, a folder this user may not write.

`hold` takes the workdir's lock, `<workdir>/.lock` (`storage.WorkdirLock`), for the length of
the run. On a local or network file system it is an advisory `flock` on that file: the kernel
drops it when its process ends however it ends (kill -9, a crash, power loss), so a lock never
outlives its run and the next run needs no manual step. On object storage it is an object
created only if absent (atomic), kept alive by a heartbeat, and taken over once its owner is
gone. A second run in the same workdir while the first holds it is refused, naming the first
one's host and pid. With several processes, process 0 holds it for all of them and tells the
others whether they may go on.
"""

import contextlib
import errno
import os
import pathlib
import socket

from etils import epath
import jax
import numpy as np
from jax.experimental import multihost_utils

from mnist_jax.infra import errors
from mnist_jax.infra import storage

LOCK_NAME = storage.LOCK_NAME


class WorkdirError(errors.UserError):
  """The workdir cannot be used: a file, unwritable, or held by another run."""


def prepare(workdir: epath.Path) -> None:
  """Creates `workdir` (and its parents) or raises WorkdirError saying why it cannot.

  On object storage there is nothing to create: the bucket must exist and be writable
  (`storage.check_access`, one line if not).
  """
  if storage.is_remote(workdir):
    storage.check_access(workdir)
    return
  workdir = pathlib.Path(workdir)
  if '\0' in str(workdir) or '\n' in str(workdir):
    raise WorkdirError(f'--workdir={str(workdir)!r} cannot be used: it holds a NUL character or '
                       'a line break; choose another --workdir.')
  try:
    if workdir.exists() and not workdir.is_dir():
      raise WorkdirError(f'--workdir={workdir} is a file, not a folder; choose another '
                         '--workdir (the file was left as it is).')
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
  if e.errno == errno.ENAMETOOLONG:
    return (f'the path ({len(str(workdir).encode())} bytes) or one of its parts (at most 255 '
            'bytes each) is too long')
  if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return f'no permission to write there ({os.strerror(e.errno)})'
  return f'{type(e).__name__}: {e.strerror or e}'


@contextlib.contextmanager
def hold(workdir: epath.Path):
  """Holds the workdir's lock for the block (process 0 for every process of the run)."""
  lock, error = storage.WorkdirLock(workdir), None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except errors.UserError as e:
      error = e
  if jax.process_count() > 1:  # Everyone learns process 0's outcome before writing anything.
    taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not taken and error is None:
      error = WorkdirError(f'{workdir} is in use by another run (process 0 could not take '
                           'its lock); wait for it to finish, or use another --workdir.')
  if error:
    error.agreed = True  # Every process raises it here, after the broadcast.
    raise error
  try:
    yield
  finally:
    lock.release()


class DiskFull(errors.UserError):
  pass


@contextlib.contextmanager
def guarded(workdir: epath.Path):
  """A run's time in its workdir: the lock held (`hold`), and an object-storage failure or a
  full disk inside the block turned into one line; what was written before stays intact."""
  try:
    with storage.cloud_errors(workdir), hold(workdir):
      yield
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    raise DiskFull(f'no space left on device writing {e.filename or workdir}; what was written '
                   'before is intact. Free some space, then run the same command again to '
                   'continue from the last checkpoint.') from None
