"""A run whose workdir is a bucket (`--workdir=gs://bkt/run`), against a local GCS emulator.

The emulator (tests/gcs_emulator.py) serves the GCS JSON API on 127.0.0.1 in this process;
`run.py` runs in child processes (tests/crash_utils.py, TFDS mock data, the tiny job), pointed
at it by STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL. Every file of the run must land in
the bucket and nothing locally; the parameters must be those of the same run into a local
workdir; a killed run must resume from the bucket, bit-identical; a second run in the same
bucket path must be refused (the lock is an object created with ifGenerationMatch=0); and the
errors a cloud user meets are one line each.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

import crash_utils as cu
import gcs_emulator
from crash_utils import Fault

pytestmark = pytest.mark.slow

RUN = 'gs://bkt/run'


@pytest.fixture(scope='module')
def gcs():
  if not gcs_emulator.available():
    pytest.skip(gcs_emulator.MISSING_REASON)
  server = gcs_emulator.GcsEmulator(bucket='bkt').start()
  saved = {k: os.environ.get(k) for k in server.env()}
  os.environ.update(server.env())  # For this process's own clients (gcs.objects, ...).
  yield server
  server.stop()
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


@pytest.fixture(scope='module')
def lab(gcs, tmp_path_factory, compile_cache):
  base = tmp_path_factory.mktemp('gcs_runs')
  runner = cu.Runner(base / 'logs', env=gcs.env())  # The fork server may predate the emulator.
  args = lambda **kw: cu.config_args(compile_cache, num_epochs=2, write_report=True,
                                     write_tensorboard=True, **kw)
  local = runner.run(base / 'local', args(), state_file=base / 'local_state.json')
  assert local.returncode == 0, local.explain()
  return dict(base=base, runner=runner, args=args, gcs=gcs,
              local=json.loads((base / 'local' / 'summary.json').read_text()),
              local_state=json.loads((base / 'local_state.json').read_text()))


def bucket_json(gcs, name):
  return json.loads(gcs.objects(name)[name])


def no_local_gs_folder():
  return not (cu.REPO_ROOT / 'gs:').exists() and not os.path.exists('gs:')


def test_a_run_and_its_rerun_write_everything_into_the_bucket(lab):
  gcs, runner, base = lab['gcs'], lab['runner'], lab['base']
  first = runner.run(RUN, lab['args'](), state_file=base / 'gcs_state.json')
  assert first.returncode == 0, first.explain()
  second = runner.run(RUN, lab['args']())
  assert second.returncode == 0, second.explain()
  assert second.resumed_from() == 2 * cu.STEPS_PER_EPOCH  # Found its checkpoints there.
  names = set(gcs.objects('run/'))
  for name in ('summary.json', 'metrics.jsonl', 'config.json', 'report.png', 'report.md'):
    assert f'run/{name}' in names, sorted(names)
  assert 'run/.lock' not in names  # Released (deleted) at the end of each run.
  assert any(n.startswith('run/checkpoints/10/state/') for n in names), sorted(names)
  assert any(n.startswith('run/events.out.tfevents.') for n in names), sorted(names)
  assert no_local_gs_folder()
  summary = bucket_json(gcs, 'run/summary.json')
  assert summary['param_fingerprint'] == lab['local']['param_fingerprint']
  assert json.loads((base / 'gcs_state.json').read_text()) == lab['local_state']
  epochs = [json.loads(l)['epoch'] for l in gcs.objects('run/metrics.jsonl')
            ['run/metrics.jsonl'].decode().splitlines()]
  assert epochs == [1, 2]


def test_a_killed_run_resumes_from_the_bucket_bit_identical(lab):
  gcs, runner = lab['gcs'], lab['runner']
  killed = runner.run('gs://bkt/killed', lab['args'](), faults=[Fault('train_call', 4)])
  assert killed.killed, killed.explain()
  finished = [n for n in gcs.objects('killed/checkpoints/') if n.endswith('/commit_success.txt')
              and n.count('/') == 3]
  resumed = runner.run('gs://bkt/killed', lab['args']())
  assert resumed.returncode == 0, resumed.explain()
  assert resumed.resumed_from() == max(int(n.split('/')[2]) for n in finished)
  assert (bucket_json(gcs, 'killed/summary.json')['param_fingerprint']
          == lab['local']['param_fingerprint'])
  assert no_local_gs_folder()


def test_an_outage_during_the_last_save_is_one_line_and_the_rerun_continues(lab):
  """The bucket goes away halfway through the final checkpoint's arrays: TensorStore gives up
  after config.cloud_retry_seconds (4 s here; its own default retries ~15 minutes), the run
  stops with one line, and once the bucket is back the same command resumes from the
  epoch before and ends as the uninterrupted run."""
  gcs, runner = lab['gcs'], lab['runner']
  args = lab['args'](cloud_retry_seconds=4)
  gcs.outage_at(f'outage/checkpoints/{2 * cu.STEPS_PER_EPOCH}/state/')
  try:
    cut = runner.run('gs://bkt/outage', args)
  finally:
    gcs.end_outage()
  assert gcs.outage_started.is_set()
  assert cut.returncode == 1, cut.explain()
  assert not cut.has_traceback(), cut.explain()
  [line] = cut.error_lines()
  assert line.startswith(f'error: cannot reach Cloud Storage ({gcs.url}) for '
                         'gs://bkt/outage/checkpoints'), line
  assert line.endswith('Run the same command again once the network is back, to continue '
                       'from the newest of them.'), line
  print(f'the cut run took {cut.seconds:.1f} s')
  assert cut.seconds < 90, cut.explain()  # Unbounded, TensorStore retries for ~15 minutes.
  finished = [int(n.split('/')[2]) for n in gcs.objects('outage/checkpoints/')
              if n.endswith('/commit_success.txt') and n.count('/') == 3]
  assert max(finished) < 2 * cu.STEPS_PER_EPOCH, finished
  resumed = runner.run('gs://bkt/outage', args)
  assert resumed.returncode == 0, resumed.explain()
  assert resumed.resumed_from() == max(finished)
  assert (bucket_json(gcs, 'outage/summary.json')['param_fingerprint']
          == lab['local']['param_fingerprint'])


def test_a_second_run_in_the_same_bucket_path_is_refused(lab):
  gcs, runner, base = lab['gcs'], lab['runner'], lab['base']
  release = base / 'release'
  first = runner.start('gs://bkt/busy', lab['args'](checkpoint_async=False),
                       faults=[Fault('train_call', 3, 'WAIT', release=str(release))])
  cu.wait_until_waiting(release, first)
  lock = bucket_json(gcs, 'busy/.lock')
  second = runner.run('gs://bkt/busy', lab['args']())
  release.write_text('')
  done = first.wait()
  assert second.returncode == 1, second.explain()
  [line] = second.error_lines()
  assert 'another run is using gs://bkt/busy' in line and f"pid {lock['pid']}" in line, line
  assert done.returncode == 0, done.explain()
  assert lock['pid'] == first.process.pid
  assert '.lock' not in {n.split('/')[-1] for n in gcs.objects('busy/')}  # Released at the end.


@pytest.mark.parametrize('case, fix', [
    ('missing_bucket', 'does not exist: create it (gcloud storage buckets create gs://nobkt)'),
    ('forbidden', 'permission denied on gs://closed'),
    ('no_credentials', 'gcloud auth application-default login'),
])
def test_cloud_errors_are_one_line(lab, case, fix):
  gcs, runner = lab['gcs'], lab['runner']
  workdir = {'missing_bucket': 'gs://nobkt/run', 'forbidden': 'gs://closed/run',
             'no_credentials': 'gs://private/run'}[case]
  if case != 'missing_bucket':
    bucket = workdir.split('/')[2]
    gcs.create_bucket(bucket)
    gcs.deny(bucket, 403 if case == 'forbidden' else 401)
  result = runner.run(workdir, lab['args']())
  assert result.returncode == 1, result.explain()
  assert not result.has_traceback(), result.explain()
  [line] = result.error_lines()
  assert fix in line, line


def test_without_the_client_a_bucket_run_is_one_line_naming_the_package(tmp_path, lab):
  """gcsfs hidden (an import that fails, as when it is not installed)."""
  hide = tmp_path / 'hide'
  (hide / 'gcsfs').mkdir(parents=True)
  (hide / 'gcsfs' / '__init__.py').write_text('raise ImportError("No module named gcsfs")\n')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide), os.environ.get('PYTHONPATH', '')]))
  wrapper = textwrap.dedent('''
      import runpy, sys
      import tensorflow_datasets as tfds
      sys.argv = ['run.py', *sys.argv[1:]]
      with tfds.testing.mock_data(num_examples=20):
        runpy.run_path('run.py', run_name='__main__')
  ''')
  out = subprocess.run([sys.executable, '-c', wrapper, *lab['args'](), f'--workdir={RUN}2'],
                       cwd=cu.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  [line] = [l for l in out.stderr.splitlines() if l.startswith('error:')]
  assert 'needs the gcsfs package' in line and 'pip install gcsfs' in line, line
  assert 'Traceback' not in out.stderr
