"""mnist_jax.infra.storage: local paths as today, and gs:// against a local GCS emulator.

The emulator tests skip (with the reason) when the test extras are not installed; the local
ones always run. tests/gcs_emulator.py says what the emulator does and what it is given.
"""

import concurrent.futures
import json
import os
import socket
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import gcs_emulator
from mnist_jax.infra import errors
from mnist_jax.infra import storage


@pytest.fixture(scope='module')
def gcs_server():
  if not gcs_emulator.available():
    pytest.skip(gcs_emulator.MISSING_REASON)
  server = gcs_emulator.GcsEmulator(bucket='bkt').start()
  yield server
  server.stop()


@pytest.fixture
def gcs(gcs_server, monkeypatch, tmp_path):
  """The emulator with an empty bucket 'bkt', its variables set; the cwd is an empty tmp dir
  (so a stray local 'gs:' folder would show)."""
  gcs_server.reset()
  for key, value in gcs_server.env().items():
    monkeypatch.setenv(key, value)
  gcs_emulator.forget_cached_clients()
  monkeypatch.chdir(tmp_path)
  yield gcs_server
  assert not os.path.exists(tmp_path / 'gs:'), 'a gs:// path was written as a local folder'
  monkeypatch.undo()
  gcs_emulator.forget_cached_clients()


def _race(fn, n=8):
  """Calls fn(i) for i < n in n threads released at once; the results in order."""
  barrier = threading.Barrier(n)

  def run(i):
    barrier.wait()
    return fn(i)

  with concurrent.futures.ThreadPoolExecutor(n) as pool:
    return list(pool.map(run, range(n)))


# ------------------------------------------------------------------------------------------
# Paths.

def test_local_paths_are_unchanged(tmp_path):
  path = storage.as_path(tmp_path / 'run')
  assert os.fspath(path) == os.fspath(tmp_path / 'run')
  assert os.fspath(storage.as_path('workdirs/mlp')) == 'workdirs/mlp'  # Relative stays so.
  assert not storage.is_remote(path)


def test_gs_path_keeps_its_scheme(gcs):
  path = storage.as_path('gs://bkt/run') / 'checkpoints'
  assert os.fspath(path) == 'gs://bkt/run/checkpoints'
  assert storage.scheme(path) == 'gs'


@pytest.mark.parametrize('text, fix', [('gs:/bkt/run', 'gs://bkt/run'),
                                       ('s3:/bkt/run', 's3://bkt/run')])
def test_a_mangled_url_is_refused_with_the_fix(text, fix):
  with pytest.raises(storage.StorageError) as e:
    storage.as_path(text)
  assert str(e.value) == (f"{text!r} is not an object-store path (one slash after "
                          f'"{text[:2]}:"); write {fix}')


def test_an_unknown_scheme_is_refused():
  with pytest.raises(storage.StorageError, match=r'^ftp://x/y: unsupported storage scheme '
                     r'ftp:// \(supported: a local path, gs://, s3://\)$'):
    storage.as_path('ftp://x/y')


def test_a_missing_client_is_one_line_naming_the_package(monkeypatch):
  monkeypatch.setitem(sys.modules, 'gcsfs', None)  # `import gcsfs` raises ImportError.
  monkeypatch.setattr(storage.importlib.util, 'find_spec', lambda name, *a: None)
  with pytest.raises(storage.MissingClient) as e:
    storage.as_path('gs://bkt/run')
  assert str(e.value) == ('gs://bkt/run: writing to gs:// needs the gcsfs package, which is '
                          'not installed: pip install gcsfs  (or pip install '
                          '"mnist_jax[gcs]")')
  assert isinstance(e.value, errors.UserError) and e.value.exit_code == 1
  storage.as_path('/tmp/local')  # A local path needs nothing.


def test_local_use_imports_neither_gcsfs_nor_tensorflow(tmp_path):
  code = textwrap.dedent(f'''
      import sys
      from mnist_jax.infra import storage
      path = storage.as_path({str(tmp_path)!r}) / 'x.json'
      storage.write_json_atomic(path, {{'a': 1}})
      print(sorted(m for m in ('gcsfs', 'fsspec', 'tensorflow', 'google.cloud.storage')
                   if m in sys.modules))
  ''')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


# ------------------------------------------------------------------------------------------
# Writes: atomic JSON, exclusive create, append.

def test_write_json_atomic_local(tmp_path):
  path = storage.as_path(tmp_path) / 'summary.json'
  storage.write_json_atomic(path, {'b': 2, 'a': [1.5]})
  storage.write_json_atomic(path, {'b': 3})
  assert path.read_text() == '{\n  "b": 3\n}\n'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['summary.json']  # No temporary left.


def test_write_json_atomic_gs(gcs):
  path = storage.as_path('gs://bkt/run') / 'summary.json'
  storage.write_json_atomic(path, {'b': 2, 'a': [1.5]})
  storage.write_json_atomic(path, {'b': 3})
  assert gcs.objects('run/') == {'run/summary.json': b'{\n  "b": 3\n}\n'}


def test_create_exclusive_local(tmp_path):
  path = storage.as_path(tmp_path) / 'lock'
  assert storage.create_exclusive(path, 'first')
  assert not storage.create_exclusive(path, 'second')
  assert path.read_text() == 'first'
  won = _race(lambda i: storage.create_exclusive(storage.as_path(tmp_path) / 'race', f'{i}'))
  assert won.count(True) == 1
  assert (tmp_path / 'race').read_text() == str(won.index(True))


def test_create_exclusive_gs_is_atomic(gcs):
  path = storage.as_path('gs://bkt/run/lock')
  assert storage.create_exclusive(path, 'first')
  assert not storage.create_exclusive(path, 'second')
  assert gcs.objects('run/') == {'run/lock': b'first'}
  won = _race(lambda i: storage.create_exclusive(storage.as_path('gs://bkt/run/race'), f'{i}'))
  assert won.count(True) == 1
  assert gcs.objects('run/race') == {'run/race': str(won.index(True)).encode()}


def test_delete_if_generation_deletes_only_that_generation(gcs):
  path = storage.as_path('gs://bkt/run/lock')
  path.write_text('old')
  old = gcs.generation('run/lock')
  path.write_text('new')
  assert not storage.delete_if_generation(path, old)
  assert gcs.objects('run/') == {'run/lock': b'new'}
  assert storage.delete_if_generation(path, gcs.generation('run/lock'))
  assert gcs.objects('run/') == {}


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_open_append_continues_and_flushes(where, tmp_path, request):
  if where == 'gs':
    gcs = request.getfixturevalue('gcs')
    path, read = storage.as_path('gs://bkt/run/metrics.jsonl'), (
        lambda: gcs.objects('run/').get('run/metrics.jsonl'))
  else:
    path = storage.as_path(tmp_path) / 'metrics.jsonl'
    read = lambda: path.read_bytes() if path.exists() else None
  with storage.open_append(path) as f:
    f.write('{"epoch": 1}\n')
    f.flush()
    assert read() == b'{"epoch": 1}\n'  # Visible after a flush: a killed run keeps it.
    f.write('{"epoch": 2}\n')
  with storage.open_append(path) as f:  # A resumed run appends.
    f.write('{"epoch": 3}\n')
  assert read() == b'{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n'


def _scalars(event_file: bytes) -> list[tuple[int, str, float]]:
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  found, i = [], 0
  while i < len(event_file):
    (length,) = struct.unpack('<Q', event_file[i:i + 8])
    event = event_pb2.Event.FromString(event_file[i + 12:i + 12 + length])
    found += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    i += 12 + length + 4
  return found


def test_tensorboard_events_go_to_the_bucket(gcs):
  import tensorboardX  # pylint: disable=g-import-not-at-top
  storage.register_tensorboard_writers()
  writer = tensorboardX.SummaryWriter('gs://bkt/run')
  try:
    writer.add_scalar('train_loss', 0.25, 5)
    # tensorboardX queues events for a thread; flush() does not wait for it.
    for _ in range(100):
      writer.flush()
      objects = gcs.objects('run/')
      if objects and _scalars(next(iter(objects.values()))):
        break
      time.sleep(0.05)
    (name, data), = gcs.objects('run/').items()
    assert name.startswith('run/events.out.tfevents.')
    assert _scalars(data) == [(5, 'train_loss', 0.25)]
    writer.add_scalar('train_loss', 0.125, 10)
  finally:
    writer.close()
  assert _scalars(gcs.objects('run/')[name]) == [(5, 'train_loss', 0.25),
                                                (10, 'train_loss', 0.125)]


# ------------------------------------------------------------------------------------------
# The workdir lock.

_HOLD_LOCK = textwrap.dedent('''
    import sys, time
    from mnist_jax.infra import storage
    lock = storage.WorkdirLock(storage.as_path(sys.argv[1]), lease_s=float(sys.argv[2]))
    lock.acquire()
    print('locked', flush=True)
    time.sleep(600)
''')


def _hold_lock_in_child(workdir, env=None, lease_s=120.0):
  child = subprocess.Popen([sys.executable, '-c', _HOLD_LOCK, str(workdir), str(lease_s)],
                           stdout=subprocess.PIPE, text=True, env=env)
  assert child.stdout.readline().strip() == 'locked'
  return child


def test_local_lock_refuses_a_second_run_and_frees_on_kill9(tmp_path):
  child = _hold_lock_in_child(tmp_path)
  try:
    with pytest.raises(storage.WorkdirBusy, match=rf'^another run is using {tmp_path} \(host '
                       rf'.+, pid {child.pid}, last seen .+\); wait for it to finish'):
      storage.WorkdirLock(storage.as_path(tmp_path)).acquire()
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait()
  with storage.WorkdirLock(storage.as_path(tmp_path)):  # The kernel released it.
    pass


def test_local_lock_creates_a_new_workdir(tmp_path):
  with storage.WorkdirLock(storage.as_path(tmp_path / 'new' / 'run')):
    holder = json.loads((tmp_path / 'new' / 'run' / '.lock').read_text())
    assert (holder['host'], holder['pid']) == (socket.gethostname(), os.getpid())


def test_gs_lock_refuses_a_second_run_and_is_deleted_on_release(gcs):
  workdir = storage.as_path('gs://bkt/run')
  with storage.WorkdirLock(workdir):
    holder = json.loads(gcs.objects('run/')['run/.lock'])
    assert holder['pid'] == os.getpid()
    with pytest.raises(storage.WorkdirBusy, match=r'^another run is using gs://bkt/run '
                       rf'\(host .+, pid {os.getpid()}, last seen .+\).*delete '
                       r'gs://bkt/run/.lock\.$'):
      storage.WorkdirLock(workdir).acquire()
  assert gcs.objects('run/') == {}


def test_gs_lock_of_a_killed_run_on_this_host_is_taken_over(gcs):
  child = _hold_lock_in_child('gs://bkt/run', env=dict(os.environ))
  child.send_signal(signal.SIGKILL)
  child.wait()
  assert json.loads(gcs.objects('run/')['run/.lock'])['pid'] == child.pid  # Left behind.
  with storage.WorkdirLock(storage.as_path('gs://bkt/run')):
    assert json.loads(gcs.objects('run/')['run/.lock'])['pid'] == os.getpid()


@pytest.mark.parametrize('age_s, taken', [(5.0, False), (300.0, True)])
def test_gs_lock_of_another_host_goes_stale_after_its_lease(gcs, age_s, taken):
  other = dict(id='x', host='other-host', pid=1, heartbeat=time.time() - age_s, lease_s=120.0)
  storage.as_path('gs://bkt/run/.lock').write_text(json.dumps(other))
  lock = storage.WorkdirLock(storage.as_path('gs://bkt/run'))
  if taken:
    with lock:
      assert json.loads(gcs.objects('run/')['run/.lock'])['host'] != 'other-host'
  else:
    with pytest.raises(storage.WorkdirBusy, match='host other-host, pid 1'):
      lock.acquire()


def test_gs_lock_takeover_race_has_one_winner(gcs):
  stale = dict(id='x', host='other-host', pid=1, heartbeat=0.0, lease_s=1.0)
  storage.as_path('gs://bkt/run/.lock').write_text(json.dumps(stale))
  locks = [storage.WorkdirLock(storage.as_path('gs://bkt/run')) for _ in range(6)]

  def take(i):
    try:
      locks[i].acquire()
      return True
    except storage.WorkdirBusy:
      return False

  won = _race(take, n=len(locks))
  try:
    assert won.count(True) == 1
    assert json.loads(gcs.objects('run/')['run/.lock'])['id'] == locks[won.index(True)]._owner['id']
  finally:
    for lock in locks:
      lock.release()


def test_gs_lock_heartbeat_renews_it(gcs):
  with storage.WorkdirLock(storage.as_path('gs://bkt/run'), lease_s=0.4):
    first = json.loads(gcs.objects('run/')['run/.lock'])['heartbeat']
    time.sleep(0.5)
    assert json.loads(gcs.objects('run/')['run/.lock'])['heartbeat'] > first


# ------------------------------------------------------------------------------------------
# Errors a cloud user meets, one line each.

def test_missing_bucket(gcs):
  with pytest.raises(storage.StorageError) as e:
    storage.check_access('gs://nobkt/run')
  assert str(e.value) == ('the bucket gs://nobkt does not exist: create it (gcloud storage '
                          'buckets create gs://nobkt), or fix the bucket name in --workdir.')
  storage.check_access('gs://bkt/run')  # An existing bucket, even empty, passes.


def test_permission_denied(gcs):
  gcs.deny('bkt', 403)
  with pytest.raises(storage.StorageError, match=r'^permission denied on gs://bkt: .*'
                     r'roles/storage.objectAdmin'):
    storage.check_access('gs://bkt/run')
  with pytest.raises(storage.StorageError, match=r'^permission denied on gs://bkt: '):
    with storage.cloud_errors('gs://bkt/run'):
      storage.as_path('gs://bkt/run/config.json').write_text('{}')


def test_no_credentials(gcs):
  gcs.deny('bkt', 401)  # What GCS answers a request without (valid) credentials.
  with pytest.raises(storage.StorageError) as e:
    storage.check_access('gs://bkt/run')
  assert str(e.value) == (
      'gs://bkt/run: no Google Cloud credentials were found (or they were refused): run '
      '`gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a '
      'service-account key file; on a Cloud VM or TPU, give its service account access to '
      'the bucket.')


def test_no_credentials_from_google_auth():
  exceptions = pytest.importorskip('google.auth.exceptions', reason=gcs_emulator.MISSING_REASON)
  error = exceptions.DefaultCredentialsError('Your default credentials were not found. To '
                                             'set up Application Default Credentials, ...')
  assert storage.describe_error(error, 'gs://bkt/run').startswith(
      'gs://bkt/run: no Google Cloud credentials were found')


def test_other_errors_pass_through(gcs):
  with pytest.raises(FileNotFoundError):
    with storage.cloud_errors('gs://bkt/run'):
      storage.as_path('gs://bkt/run/absent.json').read_text()
  assert storage.describe_error(RuntimeError('x'), '/tmp/local') is None


def test_a_short_outage_is_retried(gcs):
  path = storage.as_path('gs://bkt/run/summary.json')
  path.write_text('before')
  with gcs.outage():
    threading.Timer(1.0, gcs.end_outage).start()
    storage.write_json_atomic(path, {'after': True})  # gcsfs retries after 1-2 s: succeeds.
  assert gcs.objects('run/') == {'run/summary.json': b'{\n  "after": true\n}\n'}


@pytest.mark.slow
def test_a_long_outage_is_one_line_and_keeps_the_bucket(gcs):
  path = storage.as_path('gs://bkt/run/summary.json')
  path.write_text('before')
  start = time.perf_counter()
  with gcs.outage():
    with pytest.raises(storage.StorageError) as e:
      with storage.cloud_errors(path):
        path.write_text('after')
  seconds = time.perf_counter() - start
  assert str(e.value).startswith(f'cannot reach Cloud Storage ({gcs.url}) for '
                                 'gs://bkt/run/summary.json: Cannot connect to host')
  assert str(e.value).endswith('run the same command again to continue once the network is '
                               'back.')
  assert '\n' not in str(e.value)
  assert 20 < seconds < 120  # gcsfs retries 6 times, backing off, before it gives up.
  assert gcs.objects('run/') == {'run/summary.json': b'before'}


# --- An outage under Orbax: TensorStore's retries, bounded (config.cloud_retry_seconds) ----

def test_bound_retries_sums_tensorstores_backoff_to_the_bound():
  assert storage.bound_retries(4) == 3  # 1 + 2 + 4 s.
  assert storage.bound_retries(120) == 8  # 1 + 2 + 4 + 8 + 16 + 32 + 32 + 32 s.
  assert storage.bound_retries(0.5) == 1
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=g-import-not-at-top
  for default in (tensorstore_utils._BASE_TS_CONTEXT,  # pylint: disable=protected-access
                  tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):  # pylint: disable=protected-access
    assert default['gcs_request_retries'] == {'max_retries': 1, 'initial_delay': '1s',
                                              'max_delay': '32s'}
  storage.bound_retries(storage.DEFAULT_RETRY_SECONDS)


@pytest.fixture
def quick_gcsfs_retries(monkeypatch):
  """gcsfs's backoff between its 6 tries (0.5-1.5 s, doubling: ~30 s in all) 20x shorter, so
  that what an outage test waits for is TensorStore's bound, not gcsfs's own."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from gcsfs import retry  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(retry, 'asyncio', types.SimpleNamespace(
      sleep=lambda seconds: asyncio.sleep(seconds / 20)))


def _checkpointed(directory):
  """A Checkpointer in the bucket with step 1 finished, and the state it saved."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mnist_jax import checkpoint  # pylint: disable=g-import-not-at-top
  state = {'w': jnp.arange(3000, dtype=jnp.float32).reshape(30, 100)}
  ckpt = checkpoint.Checkpointer(directory, keep=3, retry_seconds=4)
  ckpt.save(1, state, {'run': 1})
  ckpt.wait()
  return ckpt, state


@pytest.mark.slow
def test_an_outage_while_a_checkpoint_is_written_is_one_line_within_the_bound(
    gcs, quick_gcsfs_retries):
  from mnist_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt, state = _checkpointed('gs://bkt/run/checkpoints')
  gcs.outage_at('run/checkpoints/2/state/')  # Cut off halfway through step 2's arrays.
  start = time.perf_counter()
  with pytest.raises(checkpoint.CheckpointSaveError) as e:
    ckpt.save(2, state, {'run': 1})
    ckpt.wait()
  seconds = time.perf_counter() - start
  assert gcs.outage_started.is_set()
  assert str(e.value).startswith(f'cannot reach Cloud Storage ({gcs.url}) for '
                                 'gs://bkt/run/checkpoints: ')
  assert str(e.value).endswith(
      'while saving the checkpoint at step 2 in gs://bkt/run/checkpoints; the checkpoints '
      'finished before it are intact. Run the same command again once the network is back, '
      'to continue from the newest of them.')
  assert '\n' not in str(e.value)
  assert seconds < 30, seconds  # TensorStore's 4 s bound (1 + 2 + 4 s); unbounded, ~15 min.
  gcs.end_outage()
  again = checkpoint.Checkpointer('gs://bkt/run/checkpoints', keep=3, retry_seconds=4)
  assert again.steps() == [1]  # Step 2 was never finished: removed at the start.
  restored, step = again.restore_latest(state)
  assert step == 1 and (restored['w'] == state['w']).all()


@pytest.mark.slow
def test_an_outage_while_a_checkpoint_is_read_is_one_line_and_sets_nothing_aside(
    gcs, quick_gcsfs_retries):
  from mnist_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt, state = _checkpointed('gs://bkt/run/checkpoints')
  ckpt.save(2, state, {'run': 1})
  ckpt.wait()
  reader = checkpoint.Checkpointer('gs://bkt/run/checkpoints', keep=3, retry_seconds=4)
  gcs.outage_at('run/checkpoints/2/state/d/', methods=('GET',))  # Its arrays (TensorStore).
  start = time.perf_counter()
  with pytest.raises(storage.StorageError) as e:
    reader.restore_latest(state)
  seconds = time.perf_counter() - start
  assert gcs.outage_started.is_set()
  assert str(e.value).startswith(f'cannot reach Cloud Storage ({gcs.url}) for '
                                 'gs://bkt/run/checkpoints/2: ')
  assert str(e.value).endswith('run the same command again to continue once the network is '
                               'back.')
  assert seconds < 30, seconds  # TensorStore's 4 s bound; without one, it retries ~15 min.
  gcs.end_outage()
  # Step 2 is not taken for a damaged checkpoint: nothing is set aside, and it restores.
  assert not gcs.objects('run/checkpoints.unreadable/')
  again = checkpoint.Checkpointer('gs://bkt/run/checkpoints', keep=3, retry_seconds=4)
  assert again.steps() == [1, 2]
  assert again.restore_latest(state)[1] == 2
