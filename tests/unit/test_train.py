"""End to end: `train.train_and_evaluate` on TFDS mock data, asserting on what it writes."""

import json
import math
import re

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import tiny_config
from mnist_jax import train

NUM_TRAIN = NUM_TEST = 50  # mock_data gives every split this many examples.
BATCH_SIZE = 16  # 50 = 3 * 16 + 2: the last batch holds 2 real examples.
EVAL_BATCH_SIZE = 8  # 50 = 6 * 8 + 2.
NUM_EPOCHS = 2
STEPS_PER_CALL = 3  # Does not divide the 4 steps of an epoch: each epoch's 2nd call pads 2 steps.
STEPS_PER_EPOCH = math.ceil(NUM_TRAIN / BATCH_SIZE)
HIDDEN = 32
NUM_PARAMS = 28 * 28 * 1 * HIDDEN + HIDDEN + HIDDEN * 10 + 10  # 25,450


def small_config(**overrides):
  """The tiny config at this module's sizes, with TensorBoard and the report on."""
  return tiny_config(**{'model.hidden_sizes': (HIDDEN,), 'batch_size': BATCH_SIZE,
                        'eval_batch_size': EVAL_BATCH_SIZE, 'num_epochs': NUM_EPOCHS,
                        'steps_per_call': STEPS_PER_CALL, 'write_tensorboard': True,
                        'write_report': True, **overrides})


def read_run(workdir):
  return dict(summary=json.loads((workdir / 'summary.json').read_text()),
              config=json.loads((workdir / 'config.json').read_text()),
              records=[json.loads(line) for line in
                       (workdir / 'metrics.jsonl').read_text().splitlines()])


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Five small runs into fresh workdirs, all on the same mock data."""
  variants = {
      'device': dict(input_mode='device'),
      'tfdata': dict(input_mode='tfdata'),
      'device_again': dict(input_mode='device'),
      'seed1': dict(input_mode='device', seed=1),
      'whole_epoch_calls': dict(input_mode='device', steps_per_call=0),  # No padded steps.
  }
  out = {}
  with tfds.testing.mock_data(num_examples=NUM_TRAIN):
    for name, overrides in variants.items():
      config = small_config(**overrides)
      workdir = tmp_path_factory.mktemp(name) / 'workdir'  # Not created yet: the run makes it.
      returned = train.train_and_evaluate(config, str(workdir))
      out[name] = dict(read_run(workdir), returned=returned, workdir=workdir,
                       config_dict=config.to_dict())
  return out


@pytest.mark.parametrize('name', ['device', 'tfdata'])
def test_summary(runs, name):
  run = runs[name]
  summary = run['summary']
  assert 0.0 <= summary['test_accuracy'] <= 1.0
  assert 0.0 <= summary['train_accuracy'] <= 1.0
  assert np.isfinite(summary['test_loss']) and summary['test_loss'] > 0
  assert summary['num_params'] == NUM_PARAMS
  assert re.fullmatch(r'[0-9a-f]{64}', summary['param_fingerprint'])
  assert summary['steps'] == NUM_EPOCHS * STEPS_PER_EPOCH == 8
  assert summary['epochs'] == NUM_EPOCHS
  assert summary['seed'] == 0
  assert summary['input_mode'] == name
  assert summary == run['returned']  # The file holds what train_and_evaluate returned.


@pytest.mark.parametrize('name', ['device', 'tfdata'])
def test_metrics_jsonl(runs, name):
  records, summary = runs[name]['records'], runs[name]['summary']
  assert [r['epoch'] for r in records] == [1, 2]
  assert [r['step'] for r in records] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
  for r in records:
    assert {'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy'} <= set(r)
    for key in ('train_loss', 'test_loss'):
      assert np.isfinite(r[key]) and r[key] > 0
    # Accuracies are over exactly the 50 real examples (padding would change the denominator).
    for key in ('train_accuracy', 'test_accuracy'):
      assert 0.0 <= r[key] <= 1.0
      assert r[key] * NUM_TRAIN == pytest.approx(round(r[key] * NUM_TRAIN), abs=1e-6)
  assert records[-1]['test_accuracy'] == summary['test_accuracy']
  assert records[-1]['test_loss'] == summary['test_loss']
  assert records[-1]['train_loss'] == summary['train_loss']
  # Training moves the model: the second epoch's training loss differs from the first's.
  assert records[1]['train_loss'] != records[0]['train_loss']


@pytest.mark.parametrize('name', ['device', 'tfdata'])
def test_config_json_round_trips(runs, name):
  written, config_dict = runs[name]['config'], runs[name]['config_dict']
  expected = json.loads(json.dumps(config_dict))  # Tuples become lists, as in any JSON.
  assert {k: written[k] for k in expected} == expected
  assert written['model']['hidden_sizes'] == [HIDDEN]
  assert written['batch_size'] == BATCH_SIZE
  assert written['input_mode'] == name
  assert written['resolved']['input_mode'] == name
  assert written['resolved']['cache_dir'] == ''  # cache_dir='none': nothing cached.


def scalars_from_event_files(workdir):
  values = {}
  for path in workdir.glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        number = (float(tf.make_ndarray(value.tensor)) if value.HasField('tensor')
                  else value.simple_value)
        values.setdefault(value.tag, {})[event.step] = number
  return values


@pytest.mark.parametrize('name', ['device', 'tfdata'])
def test_tensorboard_event_file(runs, name):
  workdir, records = runs[name]['workdir'], runs[name]['records']
  event_files = list(workdir.glob('events.out.tfevents.*'))
  assert event_files and all(f.stat().st_size > 0 for f in event_files)
  scalars = scalars_from_event_files(workdir)
  for key in ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy'):
    assert key in scalars, sorted(scalars)
    for r in records:
      assert scalars[key][r['step']] == pytest.approx(r[key], rel=1e-6)


def test_same_config_gives_the_same_params(runs):
  assert (runs['device']['summary']['param_fingerprint'] ==
          runs['device_again']['summary']['param_fingerprint'])
  assert runs['device']['records'] == [
      dict(r, examples_per_sec=a['examples_per_sec'], elapsed_s=a['elapsed_s'],
           epoch_seconds=a['epoch_seconds'])
      for r, a in zip(runs['device_again']['records'], runs['device']['records'])]


def test_another_seed_gives_other_params(runs):
  assert (runs['device']['summary']['param_fingerprint'] !=
          runs['seed1']['summary']['param_fingerprint'])
  assert runs['seed1']['summary']['seed'] == 1


def metric_values(run):
  keys = ('train_loss', 'train_accuracy', 'test_loss', 'test_accuracy')
  return np.array([[r[k] for k in keys] for r in run['records']])


def test_input_modes_train_the_same(runs):
  """'device' and 'tfdata' feed the same examples in the same order: the same losses."""
  np.testing.assert_allclose(metric_values(runs['tfdata']), metric_values(runs['device']),
                             rtol=1e-6, atol=1e-7)
  assert runs['tfdata']['summary']['steps'] == runs['device']['summary']['steps']


def test_padded_steps_change_nothing(runs):
  """Calls of 3 steps (2 of them padding at each epoch's end) train exactly like whole-epoch
  calls that have no padding."""
  padded, whole = runs['device'], runs['whole_epoch_calls']
  np.testing.assert_allclose(metric_values(padded), metric_values(whole), rtol=1e-6, atol=1e-7)
  assert padded['summary']['steps'] == whole['summary']['steps'] == 8
