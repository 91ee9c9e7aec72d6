"""Where a run's files live: a local folder, or object storage (gs://, s3://), through one path type.

Every path a run writes or reads should come from `as_path`: an `etils.epath.Path`, the type
Orbax and TFDS take. A local path behaves as `pathlib.Path` does; `gs://bucket/dir` keeps its
scheme (`pathlib.Path` would make it a local folder named 'gs:') and goes through gcsfs, which
the `gcs` extra installs (`pip install "mnist_jax[gcs]"`); `s3://` likewise through s3fs.

Object stores differ from a file system in ways the run has to respect; the helpers here do:
  * An object is written whole, in one request: a reader sees the old or the new content,
    never half (so `write_json_atomic` needs no temporary file there); there is no rename
    (gcsfs copies and deletes) and no append (gcsfs silently overwrites): `open_append`
    keeps the content and rewrites the object at each flush.
  * 'Create only if absent' is a request precondition (ifGenerationMatch=0 on GCS), which
    makes `create_exclusive` and `WorkdirLock` atomic across machines.
  * Folders do not exist: `mkdir` does nothing, and an empty 'folder' does not exist.
  * A missing bucket, missing credentials, a permission error or the network: `check_access`
    and `cloud_errors` turn each into one line naming the fix (`StorageError`).
  * An outage is waited out for a bounded time only: gcsfs (every file but the checkpoints'
    arrays) gives up after 6 tries, ~30 s; TensorStore (Orbax's array reads and writes) would
    retry for ~15 minutes, and `bound_retries` holds it to `config.cloud_retry_seconds`.

Importing this module makes etils use gcsfs, not TensorFlow's tf.io.gfile, for gs:// paths
(EPATH_USE_TF=false: TensorFlow costs seconds to import, and its GCS client ignores
STORAGE_EMULATOR_HOST), and gcsfs its plain GCS client (without a gRPC bucket-layout call
before every operation). Both only where the variables are unset.
"""

import contextlib
import datetime
import fcntl
import importlib.util
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from typing import Any

from etils import epath

from mnist_jax.infra import errors

os.environ.setdefault('EPATH_USE_TF', 'false')
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')

# scheme -> (the fsspec package it needs, the extra of this project that installs it).
CLIENTS = {'gs': ('gcsfs', 'gcs'), 's3': ('s3fs', None)}


class StorageError(errors.UserError):
  """Object storage refused or failed; the message is one line that says what to do."""


class MissingClient(StorageError):
  pass


class WorkdirBusy(StorageError):
  pass


def scheme(path: Any) -> str | None:
  """'gs', 's3' (any 'x://' prefix, in fact) or None for a local path."""
  match = re.match(r'^([a-z][a-z0-9+.-]*)://', os.fspath(path))
  return match[1] if match else None


def is_remote(path: Any) -> bool:
  return scheme(path) is not None


def as_path(path: Any) -> epath.Path:
  """The path type for everything a run writes or reads; refuses 'gs:/x' (one slash)."""
  text = os.fspath(path)
  mangled = re.match(r'^(gs|s3):/(?!/)', text)
  if mangled:
    raise StorageError(f'{text!r} is not an object-store path (one slash after '
                       f'"{mangled[1]}:"); write {mangled[1]}://{text[len(mangled[0]):]}')
  if scheme(text) not in (None, *CLIENTS):
    raise StorageError(f'{text}: unsupported storage scheme {scheme(text)}:// '
                       f'(supported: a local path, {", ".join(s + "://" for s in CLIENTS)})')
  require_client(text)
  if scheme(text):
    quiet_client_logs()
  return epath.Path(text)


def require_client(path: Any) -> None:
  """Raises MissingClient, one line naming the package, when the path's client is absent.

  Imports it (gcsfs: ~2 s): a run on object storage needs it next anyway.
  """
  name = scheme(path)
  if name not in CLIENTS:
    return
  package, extra = CLIENTS[name]
  try:
    importlib.import_module(package)
  except ImportError as e:
    also = f'  (or pip install "mnist_jax[{extra}]")' if extra else ''
    broken = '' if importlib.util.find_spec(package) is None else f' ({e})'
    raise MissingClient(f'{os.fspath(path)}: writing to {name}:// needs the {package} package, '
                        f'which is not installed{broken}: pip install {package}{also}') from None


def _bucket_and_key(path: Any) -> tuple[str, str]:
  rest = os.fspath(path).split('://', 1)[1]
  bucket, _, key = rest.partition('/')
  return bucket, key


def _filesystem(path: Any):
  import fsspec  # pylint: disable=g-import-not-at-top
  quiet_client_logs()
  return fsspec.filesystem('gcs' if scheme(path) == 'gs' else scheme(path))


# ------------------------------------------------------------------------------------------
# Writes.

def write_bytes_atomic(path: epath.Path, data: bytes) -> None:
  """Writes so that a reader (or a killed run) never sees half a file."""
  path = epath.Path(path)
  if is_remote(path):
    path.write_bytes(data)  # One upload: the object changes whole, or not at all.
    return
  tmp = path.with_name(f'.{path.name}{TMP_INFIX}{os.getpid()}')
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  except BaseException:  # A full disk, a signal: no half-written temporary file stays.
    tmp.unlink(missing_ok=True)
    raise


# What `write_bytes_atomic` names its temporary files: `.<name>.tmp<pid>`.
TMP_INFIX = '.tmp'
# A temporary file untouched this long whose writer's pid is not running here is an orphan.
ORPHAN_SECONDS = 60


def remove_orphaned_tmp(folder) -> list[str]:
  """Removes the temporary files of `write_bytes_atomic` that a killed writer left in a local
  `folder` (its pid no longer runs, and the file has not changed for ORPHAN_SECONDS: a writer
  on another host of a shared file system keeps its file changing); returns their names."""
  if is_remote(folder) or not os.path.isdir(folder):
    return []
  removed = []
  for entry in os.scandir(folder):
    match = re.fullmatch(r'\..+' + re.escape(TMP_INFIX) + r'(\d+)', entry.name)
    if not match or not entry.is_file(follow_symlinks=False):
      continue
    try:
      if time.time() - entry.stat().st_mtime < ORPHAN_SECONDS or _pid_runs(int(match[1])):
        continue
      os.unlink(entry.path)
      removed.append(entry.name)
    except OSError:
      pass  # Gone already, or not ours to remove: it does no harm.
  return removed


def _pid_runs(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # Another user's process: it runs.
    return True
  return True


def write_json_atomic(path: epath.Path, obj: Any) -> None:
  write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode())


def create_exclusive(path: epath.Path, text: str) -> bool:
  """Creates `path` holding `text` only if nothing is there; False if something was.

  Atomic: of several processes (or machines) racing, exactly one gets True. Locally with
  O_CREAT|O_EXCL; on GCS with the precondition ifGenerationMatch=0 (a 412 answer: taken).
  """
  path = epath.Path(path)
  if not is_remote(path):
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True
  if scheme(path) != 'gs':
    raise StorageError(f'{path}: an exclusive create is only implemented for gs:// and local '
                       'paths')
  try:
    _filesystem(path).pipe_file(os.fspath(path), text.encode(), mode='create')
  except FileExistsError:  # gcsfs's name for 412 Precondition Failed.
    return False
  return True


def _generation(path: epath.Path) -> int | None:
  """The GCS generation of the object at `path`; None if there is none."""
  try:
    info = _filesystem(path).info(os.fspath(path))
  except FileNotFoundError:
    return None
  return int(info['generation']) if info.get('generation') else None


def delete_if_generation(path: epath.Path, generation: int) -> bool:
  """Deletes the object only if it is still `generation` (ifGenerationMatch); True if so."""
  bucket, key = _bucket_and_key(path)
  fs = _filesystem(path)
  try:
    fs.call('DELETE', 'b/{}/o/{}', bucket, key, ifGenerationMatch=str(generation))
  except (FileExistsError, FileNotFoundError):  # 412: someone replaced it; 404: gone.
    return False
  finally:
    fs.invalidate_cache(os.fspath(path))
  return True


class ObjectAppender:
  """An append-only file on object storage: the content stays in memory, and each flush
  rewrites the whole object (objects cannot be appended to). Opening an existing object
  continues it. Meant for small logs (metrics.jsonl, TensorBoard event files).
  """

  def __init__(self, path: epath.Path, *, keep_existing: bool = True):
    self.path = epath.Path(path)
    self._data = bytearray()
    if keep_existing and self.path.exists():
      self._data += self.path.read_bytes()
    self._flushed = len(self._data) if self._data else -1  # -1: not written yet.
    self.closed = False

  def write(self, data: bytes | str) -> int:
    if self.closed:
      raise ValueError(f'write to closed {self.path}')
    self._data += data.encode() if isinstance(data, str) else data
    return len(data)

  def flush(self) -> None:
    if not self.closed and self._flushed != len(self._data) and not offline():
      self.path.write_bytes(bytes(self._data))
      self._flushed = len(self._data)

  def close(self) -> None:
    try:
      self.flush()
    finally:
      self.closed = True  # Also when the flush failed: never tried again (at exit, say).

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_append(path: epath.Path):
  """A file to append to, flushed as the caller flushes: local `open(path, 'a')`, or an
  ObjectAppender on object storage. Writes take str."""
  path = epath.Path(path)
  return ObjectAppender(path) if is_remote(path) else open(path, 'a')


class _TensorboardWriterFactory:
  """tensorboardX's writer registry entry for an object-store scheme (see below)."""

  def open(self, path):
    return ObjectAppender(epath.Path(path), keep_existing=False)  # A new event file per run.

  def directory_check(self, path):
    del path  # Object stores have no folders to create.


def register_tensorboard_writers() -> None:
  """tensorboardX writes gs:// and s3:// event files through gcsfs/s3fs (ObjectAppender).

  Its own GCS writer needs google-cloud-storage, and after `close()` uploads again when it is
  garbage-collected (retrying for 120 s if the network is gone); its S3 one needs boto3.
  """
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  for name in CLIENTS:
    record_writer.register_writer_factory(name, _TensorboardWriterFactory())


# What tensorboardX's own object-store writers import when tensorboardX is imported, and
# `register_tensorboard_writers` replaces: google-cloud-storage alone takes ~0.2 s.
TENSORBOARDX_UNUSED_CLIENTS = ('google.cloud.storage', 'boto3')


def tensorboardx():
  """tensorboardX, imported without the clients of its own GCS and S3 writers (unused: event
  files in buckets go through `register_tensorboard_writers`, which this calls)."""
  if 'tensorboardX' not in sys.modules:
    kept_out = [name for name in TENSORBOARDX_UNUSED_CLIENTS if name not in sys.modules]
    for name in kept_out:
      sys.modules[name] = None  # `import name` raises ImportError: tensorboardX goes without.
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top,unused-import
    finally:
      for name in kept_out:
        if sys.modules.get(name, 0) is None:
          del sys.modules[name]  # Importable again, for whoever needs it.
  register_tensorboard_writers()
  return sys.modules['tensorboardX']


# ------------------------------------------------------------------------------------------
# A lock on the workdir: one run at a time, wherever the workdir lives.

LOCK_NAME = '.lock'


class WorkdirLock:
  """Refuses a second run in the same workdir while the first is alive.

  Local: an flock on `<workdir>/.lock`, which the kernel releases when the process dies
  (kill -9 included); the file itself stays. Object storage: the object `<workdir>/.lock`,
  created only if absent (atomic), holding its owner (host, pid) and a heartbeat that a
  thread renews every `lease_s / 4` seconds; the owner deletes it on release. A lock left by a
  dead run (kill -9, a lost machine) is taken over when its owner is a dead process on this
  host, or its heartbeat is older than `lease_s`; the takeover deletes exactly the stale
  object (ifGenerationMatch), so of two runs taking over, one wins.
  """

  def __init__(self, workdir: epath.Path, *, lease_s: float = 120.0):
    self.path = epath.Path(workdir) / LOCK_NAME
    self.lease_s = lease_s
    self._owner = dict(id=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid())
    self._generation: int | None = None
    self._file = None
    self._stop = threading.Event()
    self._thread = None

  def acquire(self) -> 'WorkdirLock':
    if is_remote(self.path):
      self._acquire_object()
    else:
      self._acquire_local()
    return self

  def _acquire_local(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)  # A new workdir starts here.
    self._file = open(self.path, 'a+')
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = _parse_holder(self._file.read())
      self._file.close()
      self._file = None
      raise WorkdirBusy(f'another run is using {self.path.parent} ({_describe(holder)}); wait '
                        'for it to finish, or use another --workdir.') from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(json.dumps(self._content()))  # Who holds it, for the next one's message.
    self._file.flush()

  def _content(self) -> dict:
    return dict(self._owner, heartbeat=time.time(), lease_s=self.lease_s)

  def _acquire_object(self) -> None:
    for _ in range(3):
      if create_exclusive(self.path, json.dumps(self._content())):
        self._generation = _generation(self.path)
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name='mnist_jax-workdir-lock')
        self._thread.start()
        return
      generation = _generation(self.path)
      if generation is None:
        continue  # Released in between: try again.
      holder = self._read_holder()
      if not self._is_stale(holder):
        raise WorkdirBusy(
            f'another run is using {self.path.parent} ({_describe(holder)}); wait for it to '
            f'finish, or use another --workdir. If that run is dead, its lock goes stale '
            f'{self.lease_s:.0f} s after its last heartbeat, or delete {self.path}.')
      delete_if_generation(self.path, generation)  # Loses quietly to another taker.
    raise WorkdirBusy(f'could not take the lock {self.path} (other runs keep taking it).')

  def _read_holder(self) -> dict:
    try:
      return _parse_holder(self.path.read_text())
    except FileNotFoundError:
      return {}

  def _is_stale(self, holder: dict) -> bool:
    if not holder:
      return True  # Unreadable or half-written content: not a lock anyone can renew.
    if holder.get('host') == self._owner['host'] and not _pid_alive(int(holder.get('pid', -1))):
      return True
    return time.time() - float(holder.get('heartbeat', 0)) > float(holder.get('lease_s', 0))

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.lease_s / 4) and not offline():
      try:
        if _generation(self.path) != self._generation:
          logging.warning('The workdir lock %s was taken over; stopping its heartbeat.',
                          self.path)
          return
        self.path.write_text(json.dumps(self._content()))
        self._generation = _generation(self.path)
      except Exception as e:  # pylint: disable=broad-except  (the network: try again later)
        logging.warning('Could not renew the workdir lock %s: %s', self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._thread:
      self._thread.join()
      self._thread = None
    if self._generation is not None and not offline():
      with contextlib.suppress(Exception):  # Not deleted: it goes stale after lease_s.
        delete_if_generation(self.path, self._generation)
      self._generation = None
    if self._file:
      self._file.close()  # Releases the flock; the file stays (see the class docstring).
      self._file = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _parse_holder(text: str) -> dict:
  """A lock file's holder (host, pid, heartbeat, lease_s), or {} where the file is cut short,
  not JSON or holds values of the wrong kind (an editor, a kill mid-write): owner unknown."""
  try:
    holder = json.loads(text or '{}')
    if not isinstance(holder, dict):
      return {}
    float(holder.get('heartbeat', 0)), float(holder.get('lease_s', 0))
    int(holder.get('pid', -1))
    datetime.datetime.fromtimestamp(float(holder.get('heartbeat', 0)))
  except (ValueError, TypeError, OverflowError, OSError):
    return {}
  return holder


def _describe(holder: dict) -> str:
  if not holder:
    return 'owner unknown'
  seen = datetime.datetime.fromtimestamp(float(holder.get('heartbeat', 0))).strftime('%H:%M:%S')
  return f"host {holder.get('host')}, pid {holder.get('pid')}, last seen {seen}"


# ------------------------------------------------------------------------------------------
# The errors a cloud user meets, as one line each.

_NO_CREDENTIALS = ('no Google Cloud credentials were found (or they were refused): run `gcloud '
                   'auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to '
                   'a service-account key file; on a Cloud VM or TPU, give its service account '
                   'access to the bucket.')


def _permission_denied(bucket: str) -> str:
  return (f'permission denied on gs://{bucket}: the credentials in use may not read, list or '
          f'create objects there; grant them roles/storage.objectAdmin on the bucket (gcloud '
          f'storage buckets add-iam-policy-binding gs://{bucket} --member=... '
          f'--role=roles/storage.objectAdmin), or check GOOGLE_APPLICATION_CREDENTIALS.')


def _missing_bucket(bucket: str) -> str:
  return (f'the bucket gs://{bucket} does not exist: create it (gcloud storage buckets create '
          f'gs://{bucket}), or fix the bucket name in --workdir.')


def _unreachable(path: Any, cause: str) -> str:
  endpoint = os.environ.get('STORAGE_EMULATOR_HOST') or 'storage.googleapis.com'
  return f'cannot reach Cloud Storage ({endpoint}) for {os.fspath(path)}: {cause}'


# Set once an outage outlasted the retries: the run is stopping, and its last best-effort
# writes to the bucket (the logs' final flush, the lock's release) are skipped instead of
# each waiting out the retries again; what they would have written, the rerun writes.
_offline = threading.Event()


def offline() -> bool:
  return _offline.is_set()


def outage(e: BaseException, path: Any) -> str | None:
  """'cannot reach Cloud Storage (<endpoint>) for <path>: <cause>' when `e` is a network
  failure on an object-storage path (which then sets `offline()`); else None."""
  if not is_remote(path) or not _is_network_error(e):
    return None
  _offline.set()
  return _unreachable(path, str(e).splitlines()[0] if str(e) else type(e).__name__)


def _is_network_error(e: BaseException) -> bool:
  names = {type(x).__name__ for x in _chain(e)}
  network = {'ClientConnectorError', 'ClientConnectorDNSError', 'ClientOSError',
             'ServerDisconnectedError', 'ConnectionError', 'ConnectionRefusedError',
             'ConnectionResetError', 'gaierror', 'TimeoutError', 'ServerTimeoutError'}
  # TensorStore, out of retries: 'ABORTED: All 8 retry attempts failed: CURL error ...'.
  return bool(names & network) or any(
      re.match(r'(UNAVAILABLE|DEADLINE_EXCEEDED)', str(x)) or 'CURL error' in str(x)
      for x in _chain(e))


# TensorStore's backoff: 1 s, doubling, at most 32 s between tries (its defaults).
_FIRST_DELAY_S, _MAX_DELAY_S = 1, 32
DEFAULT_RETRY_SECONDS = 120.0  # config.cloud_retry_seconds's default.


def bound_retries(seconds: float) -> int:
  """Makes TensorStore, which reads and writes Orbax's checkpoint arrays on gs:// and s3://,
  give up on an unreachable bucket after retrying for about `seconds` (its default, 32 tries,
  waits ~15 minutes); returns the number of tries.

  Orbax builds a TensorStore context for every save and restore from one module-level
  default (`tensorstore_utils.get_ts_context`), which has no option for this: the retry
  resources are added to that default.
  """
  tries, waited = 0, 0.0
  while waited < seconds:
    waited += min(_FIRST_DELAY_S * 2 ** tries, _MAX_DELAY_S)
    tries += 1
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=g-import-not-at-top
  retries = {'max_retries': max(tries, 1), 'initial_delay': f'{_FIRST_DELAY_S}s',
             'max_delay': f'{_MAX_DELAY_S}s'}
  for default in (tensorstore_utils._BASE_TS_CONTEXT,  # pylint: disable=protected-access
                  tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):  # pylint: disable=protected-access
    default['gcs_request_retries'] = dict(retries)
    default['s3_request_retries'] = dict(retries)
  return max(tries, 1)


def _chain(e: BaseException):
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def describe_error(e: BaseException, path: Any) -> str | None:
  """One line for an object-storage failure on `path`; None if `e` is not one."""
  if not is_remote(path):
    return None
  bucket, _ = _bucket_and_key(path)
  text = ' '.join(str(x) for x in _chain(e))
  status = next((getattr(x, 'code', None) for x in _chain(e)
                 if isinstance(getattr(x, 'code', None), int)), None)
  if status == 401 or 'Anonymous caller' in text or 'DefaultCredentialsError' in text or (
      'credentials' in text.lower() and 'not found' in text.lower()):
    return f'{os.fspath(path)}: {_NO_CREDENTIALS}'
  if status == 403 or 'Forbidden' in text or 'PERMISSION_DENIED' in text:
    return _permission_denied(bucket)
  if line := outage(e, path):
    return (f'{line}. What is already in the bucket (the last finished checkpoint '
            'included) is intact: run the same command again to continue once the network is '
            'back.')
  return None


@contextlib.contextmanager
def cloud_errors(path: Any):
  """Turns an object-storage failure inside the block into a one-line StorageError."""
  try:
    yield
  except errors.UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    line = describe_error(e, path)
    if line is None:
      raise
    raise StorageError(line) from e


def check_access(path: Any) -> None:
  """Fails early, in one line, when the workdir's bucket is missing, forbidden or unreachable.

  Lists at most one object under `path` (storage.objects.list, which a missing bucket
  answers with 404); nothing for a local path.
  """
  if not is_remote(path):
    return
  require_client(path)
  if scheme(path) != 'gs':
    return
  bucket, key = _bucket_and_key(path)
  with cloud_errors(path):
    try:
      _filesystem(path).call('GET', 'b/{}/o', bucket, prefix=key, maxResults=1, json_out=True)
    except FileNotFoundError:
      raise StorageError(_missing_bucket(bucket)) from None


def quiet_client_logs() -> None:
  """gcsfs logs every failed request with a traceback before raising; the run says it once.
  (Unless the gcsfs logger was given a level, e.g. by GCSFS_DEBUG.)"""
  logger = logging.getLogger('gcsfs')
  if logger.level == logging.NOTSET:
    logger.setLevel(logging.CRITICAL)
