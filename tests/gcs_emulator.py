"""A local Google Cloud Storage server for tests: `gcp-storage-emulator` on 127.0.0.1.

    with GcsEmulator(bucket='bkt') as gcs:    # a free port; the variables below are set
      ... write gs://bkt/... through gcsfs, tensorstore (Orbax) or google-cloud-storage ...
      gcs.objects('run/')                    # {name: bytes}, read from the server's memory

The server keeps its objects in memory and runs in a thread of this process (it starts in
~20 ms). While it runs, these variables point every client at it (and are restored after):

  STORAGE_EMULATOR_HOST        gcsfs and google-cloud-storage
  TENSORSTORE_GCS_HTTP_URL     tensorstore, so Orbax's array writes
  GOOGLE_AUTH_TOKEN_FOR_TESTING  tensorstore: a fixed token instead of a credentials search
  FSSPEC_GCS_TOKEN=anon        gcsfs: no credentials search (it would probe the GCE metadata
                               server, ~3 s offline)
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false  gcsfs: no gRPC storage-layout call per operation
  EPATH_USE_TF=false           etils.epath: gcsfs rather than tf.io.gfile (TensorFlow's import
                               costs seconds, and its GCS client ignores the emulator)

`env()` returns the same variables for a subprocess (`python run.py ...`).

The emulator (2026.7.19) accepts but ignores request preconditions and answers `moveTo` with
501 (which gcsfs retries for ~30 s before it copies instead). This module adds, in this
process only, the GCS behaviour the tests rely on:
  * `ifGenerationMatch` / `ifGenerationNotMatch` on uploads, copies and deletes: 412 when
    they fail, as GCS does (0 means "the object must not exist": an atomic create);
  * `moveTo` (a rename on the server);
  * `deny(bucket, status)`: answer every request on that bucket with GCS's 401 or 403 JSON
    error, which the emulator cannot produce (it has no IAM);
  * `outage()`: stop listening (clients get "connection refused") and come back on the same
    port with the same objects, to test a network failure mid-run; `outage_at(prefix)`
    starts one at the first request that writes an object under `prefix` (that request gets
    a 503), to cut a save off halfway.
Everything else is the emulator's own behaviour.
"""

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from http import HTTPStatus
from http import server as http_server

import pytest

try:
  from gcp_storage_emulator import server as emulator_server
  from gcp_storage_emulator.exceptions import NotFound
  from gcp_storage_emulator.handlers import buckets as emulator_buckets
  from gcp_storage_emulator.handlers import objects as emulator_objects
except ImportError:  # The test extras are not installed.
  emulator_server = None

MISSING_REASON = ('the GCS emulator is not installed (pip install -e ".[test]" installs '
                  'gcp-storage-emulator)')

_ERROR_MESSAGES = {
    401: 'Anonymous caller does not have storage.objects.list access to the Google Cloud '
         'Storage bucket. Permission \'storage.objects.list\' denied on resource (or it may '
         'not exist).',
    403: 'caller@example.iam.gserviceaccount.com does not have storage.objects.create access '
         'to the Google Cloud Storage object. Permission \'storage.objects.create\' denied on '
         'resource (or it may not exist).',
}


def available() -> bool:
  return emulator_server is not None


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class GcsEmulator:
  """An in-memory GCS JSON-API server on 127.0.0.1 with one bucket."""

  def __init__(self, bucket: str = 'bkt', port: int | None = None):
    if not available():
      pytest.skip(MISSING_REASON)
    self.bucket = bucket
    self.port = port or free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.denied: dict[str, int] = {}  # bucket -> HTTP status to answer with.
    self._saved_env: dict[str, str | None] = {}
    self._server = None
    self._down = False
    self._outage_lock = threading.Lock()
    self.outage_prefix: str | None = None  # `outage_at`: the writes that start an outage.
    self.outage_started = threading.Event()
    self._stopping: threading.Thread | None = None

  def env(self) -> dict[str, str]:
    return dict(STORAGE_EMULATOR_HOST=self.url, TENSORSTORE_GCS_HTTP_URL=self.url,
                GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator', FSSPEC_GCS_TOKEN='anon',
                GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false', EPATH_USE_TF='false')

  def start(self) -> 'GcsEmulator':
    """Starts the server (the variables are set by `__enter__` or the test fixture)."""
    _install_gcs_behaviour()
    logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)
    self._server = emulator_server.create_server('127.0.0.1', self.port, in_memory=True)
    self._server._storage.mnist_jax_emulator = self  # The handlers below look for it.
    self.create_bucket(self.bucket)
    self._listen()
    return self

  def stop(self) -> None:
    if self._server:
      self._server.stop()
      self._server = None

  def reset(self) -> None:
    """Back to one empty bucket, nothing denied (between tests sharing one server)."""
    self._server._storage.wipe()
    self.denied.clear()
    self.outage_prefix = None
    self.create_bucket(self.bucket)
    forget_cached_clients()

  def __enter__(self) -> 'GcsEmulator':
    self.start()
    for key, value in self.env().items():
      self._saved_env[key] = os.environ.get(key)
      os.environ[key] = value
    forget_cached_clients()
    return self

  def __exit__(self, *exc) -> None:
    self.stop()
    for key, value in self._saved_env.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
    self._saved_env = {}
    forget_cached_clients()

  def _listen(self) -> None:
    storage = self._server._storage
    self._server._api = emulator_server.APIThread('127.0.0.1', self.port, storage, daemon=True)
    self._server.start()

  @contextlib.contextmanager
  def outage(self):
    """No server on the port (connection refused) until the block ends or `end_outage()`
    is called (from a timer, say); the objects survive."""
    self._server.stop()
    self._down = True
    try:
      yield
    finally:
      self.end_outage()

  def outage_at(self, prefix: str, methods: tuple[str, ...] = ('POST', 'PUT')) -> None:
    """Starts an outage (until `end_outage()`) at the first request of `methods` (writes, by
    default) on an object whose name starts with `prefix`: that request is answered 503, and
    the server stops listening."""
    self.outage_started.clear()
    self.outage_methods = methods
    self.outage_prefix = prefix

  def _start_outage_now(self) -> None:
    self.outage_prefix = None
    self._down = True
    self.outage_started.set()
    # Not from the request's own thread: stopping waits for the request to finish.
    self._stopping = threading.Thread(target=self._server.stop, daemon=True)
    self._stopping.start()

  def end_outage(self) -> None:
    with self._outage_lock:
      if not self._down:
        return
      if self._stopping:
        self._stopping.join()
        self._stopping = None
      for _ in range(50):  # The port can take a moment to be free again.
        try:
          self._listen()
          break
        except OSError:
          time.sleep(0.1)
      self._down = False

  def deny(self, bucket: str, status: int = 403) -> None:
    """Every request on `bucket` gets GCS's `status` error (401: no credentials; 403)."""
    self.denied[bucket] = status

  def create_bucket(self, name: str) -> None:
    storage = self._server._storage
    emulator_buckets.create_bucket(name, storage)
    # No soft delete: a deleted object is gone, as in a bucket without a retention policy.
    storage.buckets[name]['softDeletePolicy'] = {'retentionDurationSeconds': '0'}

  def objects(self, prefix: str = '', bucket: str | None = None) -> dict[str, bytes]:
    """{name: content} of the objects under `prefix`, straight from the server's memory."""
    storage = self._server._storage
    bucket = bucket or self.bucket
    names = sorted(n for n in storage.objects.get(bucket, {}) if n.startswith(prefix))
    return {n: storage.get_file(bucket, n) for n in names}

  def generation(self, name: str, bucket: str | None = None) -> int:
    return int(self._server._storage.get_file_obj(bucket or self.bucket, name)['generation'])


# ------------------------------------------------------------------------------------------
# What the emulator lacks, added to its request handlers (once per process).

class _QuietHTTPServer(http_server.HTTPServer):
  """No traceback on stderr when a client hangs up before the response is written."""

  def handle_error(self, request, client_address):
    pass


def _query(request, name):
  values = request.query.get(name)
  return values[0] if values else None


def _current_generation(storage, bucket, name) -> int:
  try:
    return int(storage.get_file_obj(bucket, name)['generation'])
  except NotFound:
    return 0


def _write_error(response, status: int, message: str, reason: str) -> None:
  response.status = HTTPStatus(status)
  response.json({'error': {'code': status, 'message': message,
                           'errors': [{'message': message, 'domain': 'global',
                                       'reason': reason}]}})


def _target_name(request):
  """The object a request writes: its name in the query, the metadata or the path."""
  data = request.data if request.method in ('POST', 'PUT') else None
  name = _query(request, 'name')
  if name is None and isinstance(data, dict):
    name = (data.get('meta') or {}).get('name') or data.get('name')
  if name is None:
    name = request.params.get('dest_object_id') or request.params.get('object_id')
  return name


def _guarded(handler, *, target_bucket_key='bucket_name'):
  """Wraps an emulator handler with GCS's preconditions and `deny`."""

  def wrapped(request, response, storage, *args, **kwargs):
    emulator = getattr(storage, 'mnist_jax_emulator', None)
    bucket = request.params.get('bucket_name')
    if emulator and bucket in emulator.denied:
      status = emulator.denied[bucket]
      _write_error(response, status, _ERROR_MESSAGES[status],
                   'required' if status == 401 else 'forbidden')
      return None
    if (emulator and emulator.outage_prefix is not None
        and request.method in emulator.outage_methods):
      name = _target_name(request)
      if name and name.startswith(emulator.outage_prefix):
        emulator._start_outage_now()
        _write_error(response, 503, 'Service unavailable (an outage, for a test).', 'backendError')
        return None
    match, not_match = _query(request, 'ifGenerationMatch'), _query(request, 'ifGenerationNotMatch')
    if match is not None or not_match is not None:
      target_bucket = request.params.get(target_bucket_key) or bucket
      name = _target_name(request)
      current = _current_generation(storage, target_bucket, name) if name else 0
      if not_match is not None and int(not_match) == current and request.method == 'GET':
        response.status = HTTPStatus.NOT_MODIFIED  # A cached read: the copy is current.
        return None
      if (match is not None and int(match) != current) or (
          not_match is not None and int(not_match) == current):
        _write_error(response, 412, 'At least one of the pre-conditions you specified did not '
                     'hold.', 'conditionNotMet')
        return None
    return handler(request, response, storage, *args, **kwargs)

  return wrapped


def _move(request, response, storage, *args, **kwargs):
  """objects.move: POST /storage/v1/b/{bucket}/o/{source}/moveTo/o/{destination}."""
  bucket = request.params['bucket_name']
  source, destination = request.params['object_id'], request.params['dest_object_id']
  try:
    moved = emulator_objects._copy(request.base_url, storage, bucket, source, bucket,
                                   destination)
    storage.delete_file(bucket, source)
  except NotFound:
    response.status = HTTPStatus.NOT_FOUND
    return
  response.json(moved)


_installed = False
_install_lock = threading.Lock()


def _install_gcs_behaviour() -> None:
  global _installed
  with _install_lock:
    if _installed:
      return
    emulator_server.server.HTTPServer = _QuietHTTPServer  # APIThread builds its server so.
    wrapped = {}
    for _, methods in emulator_server.HANDLERS:
      for method, handler in list(methods.items()):
        key = 'dest_bucket_name' if handler in (emulator_objects.copy,
                                                emulator_objects.rewrite) else 'bucket_name'
        wrapped.setdefault(handler, _guarded(handler, target_bucket_key=key))
        methods[method] = wrapped[handler]
    # Uploads POSTed without the /upload prefix are routed to `objects.insert` by name.
    emulator_objects.insert = wrapped.get(emulator_objects.insert, emulator_objects.insert)
    prefix = emulator_server.settings.API_ENDPOINT
    move_route = (rf'^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/'
                  r'(?P<dest_object_id>.*[^/]+)$', {'POST': _guarded(_move)})
    # Before the generic object route, which would otherwise match the whole path.
    emulator_server.HANDLERS = (move_route,) + tuple(emulator_server.HANDLERS)
    _installed = True


def forget_cached_clients() -> None:
  """Makes the next gcsfs filesystem read the variables again (endpoint, token).

  fsspec reads FSSPEC_GCS_TOKEN once, at import; gcsfs and etils cache filesystems.
  """
  if 'fsspec' in sys.modules:
    import fsspec.config  # pylint: disable=g-import-not-at-top
    gcs_conf = fsspec.config.conf.setdefault('gcs', {})
    gcs_conf.pop('token', None)
    if os.environ.get('FSSPEC_GCS_TOKEN'):
      gcs_conf['token'] = os.environ['FSSPEC_GCS_TOKEN']
  if 'gcsfs' in sys.modules:
    sys.modules['gcsfs'].GCSFileSystem.clear_instance_cache()
  if 'etils.epath.backend' in sys.modules:
    sys.modules['etils.epath.backend'].fsspec_backend._get_filesystem.cache_clear()
