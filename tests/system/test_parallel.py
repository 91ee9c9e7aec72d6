"""Data parallelism and multi-process runs give the single-device run's numbers.

The global batch is split over all devices along the mesh's 'data' axis and the state is
replicated (mnist_jax/executor.py), so the number of devices, and of processes, must change
nothing but the order of float sums: the same per-step losses, metrics and final parameters to
float tolerance. Every run here happens in a fresh process (tests/parallel_utils.py), since the
fake CPU device count and the distributed runtime are fixed when JAX's backend starts:

  * one process with 8 fake CPU devices and one with 1 device, global batch 16, both input
    modes; a batch size that 8 devices cannot split is refused before anything runs;
  * two processes on this machine with 2 CPU devices each (`run.py --distributed`, coordinator
    on 127.0.0.1 at a free port, gloo), sharing one workdir, where only process 0 writes the
    logs and orbax writes the checkpoints collectively; then, in the same runtime, the tfdata
    mode through `train.train_and_evaluate`.

All the processes start together (they spend most of their time starting up) and are killed if
they outlive the timeout or, for the pair, as soon as one of them fails.

All runs use tfds.testing.mock_data, which generates every split from a fixed seed, so each
process sees the same examples (the matching losses below depend on it).
"""

import json

import numpy as np
import pytest

import parallel_utils
from parallel_utils import params
from parallel_utils import result

pytestmark = pytest.mark.slow  # Fresh processes: about 35 s in all on 2 CPU cores.

NUM_EXAMPLES = 50  # Per split (mock data).
BATCH_SIZE = 16  # 2 examples a device with 8 devices; 50 = 3 * 16 + 2: a padded last batch.
EVAL_BATCH_SIZE = 16
NUM_EPOCHS = 2
STEPS_PER_EPOCH = 4
STEPS_PER_CALL = 2
HIDDEN = 32
NUM_PARAMS = 784 * HIDDEN + HIDDEN + HIDDEN * 10 + 10  # 25,450
MODES = ('device', 'tfdata')
# Float tolerances: only the order of the cross-device sums differs between the runs.
RTOL, ATOL = 1e-5, 1e-6
TIMEOUT_S = 600  # Only a hang takes this long (a busy 2-core host: minutes).
# The summary fields that hold measurements of time (they differ from run to run).
TIMING_FIELDS = ('train_seconds', 'total_seconds')


def overrides(input_mode: str, **more) -> dict:
  return {'input_mode': input_mode, 'model.hidden_sizes': [HIDDEN], 'batch_size': BATCH_SIZE,
          'eval_batch_size': EVAL_BATCH_SIZE, 'num_epochs': NUM_EPOCHS,
          'steps_per_call': STEPS_PER_CALL, 'write_report': False, **more}


# configs/cnn_bn.py shrunk: BatchNorm (its statistics are over the global batch), dropout and
# augmentation, on the same data and batches.
BN_OVERRIDES = {'input_mode': 'device', 'model.features': [4], 'model.hidden_sizes': [8],
                'batch_size': BATCH_SIZE, 'eval_batch_size': EVAL_BATCH_SIZE,
                'num_epochs': NUM_EPOCHS, 'steps_per_call': STEPS_PER_CALL, 'scan_unroll': 1,
                'warmup_steps': 2, 'write_report': False}
# Each BatchNorm adds two cross-device reductions per step in another order: a little more room.
BN_RTOL, BN_ATOL = 1e-4, 1e-5
# A sweep of two learning rates (two replicas, vmapped) on the same data.
SWEEP_OVERRIDES = overrides('device', **{'sweep.learning_rate': [1e-3, 3e-3]})
# The knobs on that sweep: an EMA of the weights, and 2 micro-batches of 8 (1 a device).
KNOBS_OVERRIDES = dict(SWEEP_OVERRIDES, ema_decay=0.9, grad_accum_steps=2)


def own_npz(path) -> dict:
  """Your own data (config.dataset='npz:...'): 50 random 28x28 digits a split, and the
  overrides that train on it as the mock-data runs train."""
  rng = np.random.default_rng(0)
  arrays = {f'{split}_{what}': (rng.integers(0, 256, (NUM_EXAMPLES, 28, 28), dtype=np.uint8)
                                if what == 'images' else rng.integers(0, 10, NUM_EXAMPLES))
            for split in ('train', 'test') for what in ('images', 'labels')}
  np.savez(path, **arrays)
  return overrides('device', dataset=f'npz:{path}')


def as_flags(fields: dict) -> list[str]:
  """The same overrides as run.py flags."""
  def value(v):
    return f"({','.join(map(str, v))},)" if isinstance(v, list) else str(v)
  return [f'--config.{k}={value(v)}' for k, v in fields.items()]


def assert_same_training(run, reference):
  """Same per-step losses and metrics, to float tolerance."""
  got, want = run['summary'], reference['summary']
  assert got['steps'] == want['steps'] == NUM_EPOCHS * STEPS_PER_EPOCH
  assert got['num_params'] == want['num_params'] == NUM_PARAMS
  # Accuracies are counts over 50 examples: equal unless a logit sits on a tie.
  assert got['test_accuracy'] == pytest.approx(want['test_accuracy'], abs=1e-9)
  assert got['train_accuracy'] == pytest.approx(want['train_accuracy'], abs=1e-9)
  for key in ('test_loss', 'train_loss'):
    assert got[key] == pytest.approx(want[key], rel=RTOL), key
  np.testing.assert_allclose(run['losses'], reference['losses'], rtol=RTOL, atol=ATOL)
  assert len(np.ravel(run['losses'])) == NUM_EPOCHS * STEPS_PER_EPOCH


def assert_same_params(got: dict, want: dict):
  assert sorted(got) == sorted(want)
  assert len(got) == 4  # Two Dense layers: kernel and bias each.
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)


# --- Every process starts at once ------------------------------------------------------------

# Two processes on this machine, 2 CPU devices each (so each process's columns of a batch are
# split over its own devices too), run `run.py --distributed` in device mode with the report
# on (process 0 alone predicts with the global state for it), then, in the same runtime,
# `train_and_evaluate` in tfdata mode (each process reads only its columns through tf.data).
MULTI_PROCESS_DEVICES = 2


@pytest.fixture(scope='module')
def launched(tmp_path_factory):
  """Starts every run of this file together (they are mostly start-up time), kills leftovers.

  One process with 8 CPU devices and one with 1 run the same jobs; two processes form one
  distributed runtime and run a job per input mode, each job's processes sharing a workdir.
  """
  root = tmp_path_factory.mktemp('parallel')
  workdirs, logs = root / 'workdirs', root / 'logs'
  own = own_npz(root / 'own.npz')
  jobs8 = [
      # run.py itself, with a batch 8 devices cannot split: refused before anything runs.
      dict(name='batch12', argv=['--config=configs/mlp.py', f'--workdir={workdirs}/batch12',
                                 *as_flags(overrides('device', batch_size=12)),
                                 '--config.cache_dir=none', '--config.download=False']),
      *[dict(name=mode, workdir=str(workdirs / f'{mode}8'), overrides=overrides(mode))
        for mode in MODES],
      dict(name='bn', config='cnn_bn', workdir=str(workdirs / 'bn8'), overrides=BN_OVERRIDES),
      dict(name='sweep', workdir=str(workdirs / 'sweep8'), overrides=SWEEP_OVERRIDES),
      dict(name='knobs', workdir=str(workdirs / 'knobs8'), overrides=KNOBS_OVERRIDES),
      dict(name='own', workdir=str(workdirs / 'own8'), overrides=own),
      # The evaluation batch is split over the devices as well (last: today it fails late).
      dict(name='eval_batch12', workdir=str(workdirs / 'eval_batch12'),
           overrides=overrides('device', eval_batch_size=12, num_epochs=1)),
  ]
  jobs1 = [dict(name=mode, workdir=str(workdirs / f'{mode}1'), overrides=overrides(mode))
           for mode in MODES]
  jobs1.append(dict(name='bn', config='cnn_bn', workdir=str(workdirs / 'bn1'),
                    overrides=BN_OVERRIDES))
  jobs1.append(dict(name='sweep', workdir=str(workdirs / 'sweep1'), overrides=SWEEP_OVERRIDES))
  jobs1.append(dict(name='knobs', workdir=str(workdirs / 'knobs1'), overrides=KNOBS_OVERRIDES))
  jobs1.append(dict(name='own', workdir=str(workdirs / 'own1'), overrides=own))
  state = dict(root=root, workdirs=workdirs, out8=root / 'out8', out1=root / 'out1')
  children = []
  try:
    state['single'] = [
        parallel_utils.start('devices8', dict(out=str(state['out8']), num_examples=NUM_EXAMPLES,
                                              jobs=jobs8),
                             parallel_utils.child_env(8, root / 'cache8'), logs),
        parallel_utils.start('devices1', dict(out=str(state['out1']), num_examples=NUM_EXAMPLES,
                                              jobs=jobs1),
                             parallel_utils.child_env(1, root / 'cache1'), logs)]
    children += state['single']
    pair = dict(workdirs={m: root / f'multi_{m}' for m in MODES}, out=root / 'out_multi',
                children=[])
    address = f'127.0.0.1:{parallel_utils.free_port()}'
    for process_id in range(2):
      argv = ['--config=configs/mlp.py', f"--workdir={pair['workdirs']['device']}",
              '--distributed', f'--coordinator_address={address}', '--num_processes=2',
              f'--process_id={process_id}', *as_flags(overrides('device', write_report=True)),
              f"--config.cache_dir={root / 'cache_multi'}", '--config.download=False']
      jobs = [dict(name='device', argv=argv),
              dict(name='tfdata', workdir=str(pair['workdirs']['tfdata']),
                   overrides=overrides('tfdata')),
              dict(name='own', workdir=str(root / 'multi_own'), overrides=own),
              # Streamed: each process reads (memory-maps) only its columns of each batch.
              dict(name='own_stream', workdir=str(root / 'multi_own_stream'),
                   overrides=dict(own, input_mode='stream'))]
      child = parallel_utils.start(
          f'process{process_id}', dict(out=str(pair['out']), num_examples=NUM_EXAMPLES, jobs=jobs),
          parallel_utils.child_env(MULTI_PROCESS_DEVICES, root / 'cache_multi'), logs)
      pair['children'].append(child)
      children.append(child)
    state['pair'] = pair
    yield state
  finally:
    for child in children:  # Whatever a failed test or fixture left running.
      if child.process.poll() is None:
        child.process.kill()
        child.process.wait()


# --- One process: 8 fake devices against 1 -------------------------------------------------

@pytest.fixture(scope='module')
def data_parallel(launched):
  """The 8-device and the 1-device process, finished."""
  parallel_utils.wait_all(launched['single'], TIMEOUT_S)
  runs = dict(launched, children={c.name: c for c in launched['single']})
  for mode in MODES:  # The runs the tests compare must have finished.
    for out, child in ((runs['out8'], 'devices8'), (runs['out1'], 'devices1')):
      assert result(out, mode)['exit_code'] == 0, runs['children'][child].describe()
  return runs


def test_runs_used_8_and_1_devices(data_parallel):
  for mode in MODES:
    eight, one = result(data_parallel['out8'], mode), result(data_parallel['out1'], mode)
    assert (eight['device_count'], eight['local_device_count'], eight['process_count']) == (8, 8, 1)
    assert (one['device_count'], one['local_device_count'], one['process_count']) == (1, 1, 1)
    assert eight['summary']['input_mode'] == one['summary']['input_mode'] == mode
  assert ', input_mode=device, 8x cpu' in data_parallel['children']['devices8'].log
  assert ', input_mode=device, 1x cpu' in data_parallel['children']['devices1'].log


@pytest.mark.parametrize('mode', MODES)
def test_8_devices_train_as_1_device(data_parallel, mode):
  assert_same_training(result(data_parallel['out8'], mode), result(data_parallel['out1'], mode))


@pytest.mark.parametrize('mode', MODES)
def test_8_devices_give_1_device_params(data_parallel, mode):
  assert_same_params(params(data_parallel['out8'], mode), params(data_parallel['out1'], mode))


def test_8_devices_train_a_batch_norm_model_as_1_device(data_parallel):
  """BatchNorm normalizes with, and keeps, statistics of the global batch: split over 8
  devices it trains as on one, its running statistics included."""
  eight, one = (result(data_parallel[out], 'bn') for out in ('out8', 'out1'))
  assert eight['exit_code'] == one['exit_code'] == 0
  assert (eight['device_count'], one['device_count']) == (8, 1)
  np.testing.assert_allclose(eight['losses'], one['losses'], rtol=BN_RTOL, atol=BN_ATOL)
  assert eight['summary']['test_accuracy'] == pytest.approx(one['summary']['test_accuracy'],
                                                            abs=1e-9)
  got, want = params(data_parallel['out8'], 'bn'), params(data_parallel['out1'], 'bn')
  assert sorted(got) == sorted(want)
  stats = [k for k in want if k.startswith("model_state['batch_stats']")]
  assert len(stats) == 4  # Mean and variance of two BatchNorm layers.
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=BN_RTOL, atol=BN_ATOL, err_msg=key)
  # They moved from their initial values (mean 0, variance 1), so the comparison means something.
  assert np.abs(want["model_state['batch_stats']['BatchNorm_0']['mean']"]).max() > 1e-3


def test_8_devices_train_a_sweep_as_1_device(data_parallel):
  eight, one = (result(data_parallel[out], 'sweep') for out in ('out8', 'out1'))
  assert eight['exit_code'] == one['exit_code'] == 0
  np.testing.assert_allclose(eight['losses'], one['losses'], rtol=RTOL, atol=ATOL)
  assert [r['replica'] for r in eight['summary']['replicas']] == [
      'learning_rate=0.001,seed=0', 'learning_rate=0.003,seed=0']
  got, want = params(data_parallel['out8'], 'sweep'), params(data_parallel['out1'], 'sweep')
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)
    assert want[key].shape[0] == 2  # One per replica.
  kernel = want["['Dense_0']['kernel']"]
  assert not np.allclose(kernel[0], kernel[1])  # The two rates trained differently.


def test_8_devices_train_a_sweep_with_ema_and_accumulation_as_1_device(data_parallel):
  eight, one = (result(data_parallel[out], 'knobs') for out in ('out8', 'out1'))
  assert eight['exit_code'] == one['exit_code'] == 0
  np.testing.assert_allclose(eight['losses'], one['losses'], rtol=RTOL, atol=ATOL)
  for key in ('test_loss', 'test_ema_loss'):
    assert eight['summary'][key] == pytest.approx(one['summary'][key], rel=RTOL), key
  got, want = params(data_parallel['out8'], 'knobs'), params(data_parallel['out1'], 'knobs')
  averages = [k for k in want if k.startswith("model_state['ema']")]
  assert len(averages) == 5  # The count, and the average of each of the 4 parameters.
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=RTOL, atol=ATOL, err_msg=key)
  # Accumulating changed nothing but the order of the sums: the sweep's plain run is the same.
  sweep = params(data_parallel['out1'], 'sweep')
  for key in sweep:
    np.testing.assert_allclose(want[key], sweep[key], rtol=RTOL, atol=ATOL, err_msg=key)
  kernel = next(v for k, v in want.items()
                if k.startswith("model_state['ema']") and k.endswith("['Dense_0']['kernel']"))
  assert not np.allclose(kernel, want["['Dense_0']['kernel']"])  # The average lags behind.


def test_8_devices_train_your_own_data_as_1_device(data_parallel):
  eight, one = (result(data_parallel[out], 'own') for out in ('out8', 'out1'))
  assert eight['exit_code'] == one['exit_code'] == 0, (eight['error'], one['error'])
  assert_same_training(eight, one)
  assert_same_params(params(data_parallel['out8'], 'own'), params(data_parallel['out1'], 'own'))
  # Not the mock data's run: other examples, other parameters.
  mock = params(data_parallel['out1'], 'device')["['Dense_0']['kernel']"]
  assert not np.allclose(params(data_parallel['out1'], 'own')["['Dense_0']['kernel']"], mock)


def test_input_modes_agree_on_8_devices(data_parallel):
  out = data_parallel['out8']
  assert_same_training(result(out, 'tfdata'), result(out, 'device'))
  assert_same_params(params(out, 'tfdata'), params(out, 'device'))


def test_params_moved(data_parallel):
  """The comparisons above compare trained parameters: biases start at zero and moved."""
  trained = params(data_parallel['out8'], 'device')
  assert np.abs(trained["['Dense_1']['bias']"]).max() > 1e-4


def test_batch_not_divisible_by_device_count_is_refused_before_anything_runs(data_parallel):
  run = result(data_parallel['out8'], 'batch12')
  assert run['exit_code'] == 2  # ConfigError's status, from run.py.
  assert run['summary'] is None and run['losses'] == []  # Nothing trained.
  log = data_parallel['children']['devices8'].log
  errors = [line for line in log.splitlines() if line.startswith('error:')]
  assert errors and 'config.batch_size=12 is invalid' in errors[0], log[-3000:]
  assert 'device count (8)' in errors[0]
  assert not (data_parallel['workdirs'] / 'batch12').exists()  # Nothing written.


def test_eval_batch_not_divisible_by_device_count_is_refused_before_anything_runs(
    data_parallel):
  run = result(data_parallel['out8'], 'eval_batch12')
  assert run['exit_code'] == 2, run['error']
  assert run['error'].startswith('ConfigError: config.eval_batch_size=12 is invalid')
  assert run['losses'] == []
  assert not (data_parallel['workdirs'] / 'eval_batch12').exists()


# --- Two processes on this machine ---------------------------------------------------------

@pytest.fixture(scope='module')
def finished_pair(launched):
  pair = launched['pair']
  parallel_utils.wait_all(pair['children'], TIMEOUT_S, stop_on_failure=True)
  for child in pair['children']:
    assert child.process.returncode == 0, child.describe()
  return dict(pair, logs={child.name: child.log for child in pair['children']})


@pytest.fixture(params=MODES)
def two_processes(request, finished_pair, data_parallel):
  """One job of the finished 2-process pair, and the single-process run to compare it with."""
  mode = request.param
  return dict(finished_pair, mode=mode, workdir=finished_pair['workdirs'][mode],
              report=mode == 'device', single=data_parallel['out1'])


def test_two_processes_train_your_own_data_as_one(finished_pair, data_parallel):
  single = result(data_parallel['out1'], 'own')
  for process_index in range(2):
    run = result(finished_pair['out'], 'own', process_index)
    assert run['exit_code'] == 0, run['error']
    assert run['process_count'] == 2
    assert_same_training(run, single)
    assert_same_params(params(finished_pair['out'], 'own', process_index),
                       params(data_parallel['out1'], 'own'))


def test_two_processes_streaming_your_own_data_train_as_one_device_mode_process(
    finished_pair, data_parallel):
  single = result(data_parallel['out1'], 'own')
  assert single['summary']['input_mode'] == 'device'
  for process_index in range(2):
    run = result(finished_pair['out'], 'own_stream', process_index)
    assert run['exit_code'] == 0, run['error']
    assert run['process_count'] == 2 and run['summary']['input_mode'] == 'stream'
    assert_same_training(run, single)
    assert_same_params(params(finished_pair['out'], 'own_stream', process_index),
                       params(data_parallel['out1'], 'own'))


def test_two_processes_joined_one_runtime(two_processes):
  n = MULTI_PROCESS_DEVICES
  for process_index in range(2):
    run = result(two_processes['out'], two_processes['mode'], process_index)
    assert run['exit_code'] == 0
    assert run['process_index'] == process_index
    assert (run['process_count'], run['device_count'], run['local_device_count']) == (2, 2 * n, n)


def test_two_processes_train_as_one(two_processes):
  mode, out = two_processes['mode'], two_processes['out']
  single = result(two_processes['single'], mode)
  for process_index in range(2):
    run = result(out, mode, process_index)
    assert run['summary']['input_mode'] == mode
    assert_same_training(run, single)
    assert_same_params(params(out, mode, process_index), params(two_processes['single'], mode))


def test_processes_hold_the_same_state(two_processes):
  """The state is replicated: both processes end with bit-identical parameters and metrics."""
  out, mode = two_processes['out'], two_processes['mode']
  first, second = result(out, mode, 0), result(out, mode, 1)
  drop = lambda s: {k: v for k, v in s.items() if k not in TIMING_FIELDS}
  assert drop(first['summary']) == drop(second['summary'])  # Fingerprint included.
  assert first['losses'] == second['losses']
  for key, value in params(out, mode, 0).items():
    np.testing.assert_array_equal(params(out, mode, 1)[key], value, err_msg=key)


def test_only_process_0_writes_logs(two_processes):
  workdir = two_processes['workdir']
  names = sorted(p.name for p in workdir.iterdir())
  events = [n for n in names if n.startswith('events.out.tfevents.')]
  assert len(events) == 1, names  # A second writer would add its own event file.
  report = ['report.md', 'report.png'] if two_processes['report'] else []
  # '.lock': process 0's, held for both (the file stays; the kernel drops the flock).
  assert sorted(set(names) - set(events)) == sorted([
      '.lock', 'checkpoints', 'config.json', 'metrics.jsonl', 'summary.json', *report
  ]), names  # Also: no temporary file left behind by a second writer.
  holder = json.loads((workdir / '.lock').read_text())
  assert holder['pid'] == two_processes['children'][0].process.pid, holder  # Process 0.
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['epoch'] for r in records] == list(range(1, NUM_EPOCHS + 1))  # Written once.
  assert [r['step'] for r in records] == [STEPS_PER_EPOCH * e for e in range(1, NUM_EPOCHS + 1)]
  written = json.loads((workdir / 'summary.json').read_text())
  returned = result(two_processes['out'], two_processes['mode'], 0)['summary']
  assert {k: v for k, v in written.items() if k != 'versions'} == returned
  assert written['versions']['process_count'] == '2'
  config = json.loads((workdir / 'config.json').read_text())
  assert config['input_mode'] == two_processes['mode'] and config['batch_size'] == BATCH_SIZE


def test_only_process_0_prints(two_processes):
  logs, mode = two_processes['logs'], two_processes['mode']
  for line in (f'parameters, input_mode={mode}, {2 * MULTI_PROCESS_DEVICES}x cpu', 'epoch 1/2 ',
               'epoch 2/2 ', f"wrote {two_processes['workdir']}"):
    assert line in logs['process0'], logs['process0'][-3000:]
    assert line not in logs['process1'], logs['process1'][-3000:]


def test_checkpoints_written_collectively(two_processes):
  """One checkpoint per epoch end, each whole (orbax saves from all processes together)."""
  directory = two_processes['workdir'] / 'checkpoints'
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  assert steps == [STEPS_PER_EPOCH * e for e in range(1, NUM_EPOCHS + 1)]
  assert not [p.name for p in directory.iterdir() if 'tmp' in p.name]  # No half-written save.
