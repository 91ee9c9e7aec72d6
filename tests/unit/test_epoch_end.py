"""The end of an epoch and of a run: a failed evaluation keeps the epoch's training, and a rerun
past the trained epochs says so (in-process, on mock data)."""

import json

import jax
import pytest
import tensorflow_datasets as tfds

from conftest import tiny_config
from mnist_jax import executor
from mnist_jax import train
from mnist_jax.infra import errors

NUM_EXAMPLES = 20  # Batches of 8: 3 steps an epoch.
STEPS_PER_EPOCH = 3


def run(config, workdir):
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    return train.train_and_evaluate(config, str(workdir))


def records(workdir):
  keep = ('epoch', 'step', 'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy')
  history = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return {r['epoch']: {k: r[k] for k in keep} for r in history}  # A repeated epoch: the last.


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('whole')
  return run(tiny_config(num_epochs=3), workdir), workdir


def counting_train_calls(monkeypatch):
  calls = []
  original = executor.Executor.train_call

  def train_call(self, state, *args, **kwargs):
    calls.append(1)
    return original(self, state, *args, **kwargs)
  monkeypatch.setattr(executor.Executor, 'train_call', train_call)
  return calls


def test_a_failed_evaluation_keeps_the_epochs_training(tmp_path, monkeypatch, uninterrupted):
  """Epoch 2's evaluation runs out of memory: one line naming eval_batch_size; the trained
  state is saved first. The rerun evaluates epoch 2 without training it again and ends as the
  uninterrupted run."""
  original = executor.Executor.evaluate
  evaluations = []

  def evaluate(self, state):
    evaluations.append(1)
    if len(evaluations) == 2:
      raise jax.errors.JaxRuntimeError(
          'RESOURCE_EXHAUSTED: Out of memory allocating 51880000016 bytes.')
    return original(self, state)
  monkeypatch.setattr(executor.Executor, 'evaluate', evaluate)
  workdir = tmp_path / 'w'
  with pytest.raises(errors.UserError) as raised:
    run(tiny_config(num_epochs=3), workdir)
  message = str(raised.value)
  assert 'ran out of memory' in message and 'eval_batch_size=12' in message, message
  assert f'checkpoint at step {2 * STEPS_PER_EPOCH}' in message, message
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir()
                if p.name.isdigit())[-1] == 2 * STEPS_PER_EPOCH

  monkeypatch.setattr(executor.Executor, 'evaluate', original)
  calls = counting_train_calls(monkeypatch)
  summary = run(tiny_config(num_epochs=3, eval_batch_size=10), workdir)
  whole, whole_dir = uninterrupted
  assert summary['param_fingerprint'] == whole['param_fingerprint']
  assert summary['steps'] == 3 * STEPS_PER_EPOCH
  assert len(calls) == 1  # Epoch 3 only (3 steps, one call): epoch 2 is not trained again.
  got, want = records(workdir), records(whole_dir)
  assert sorted(got) == [1, 2, 3]
  for epoch in (1, 2, 3):
    assert got[epoch] == pytest.approx(want[epoch], rel=1e-6), epoch


def test_a_rerun_with_fewer_epochs_says_it_is_trained_past_them(tmp_path, capsys,
                                                                uninterrupted):
  whole, whole_dir = uninterrupted
  workdir = tmp_path / 'w'
  run(tiny_config(num_epochs=3), workdir)
  capsys.readouterr()
  summary = run(tiny_config(num_epochs=1), workdir)
  out = capsys.readouterr().out
  assert 'already trained past num_epochs=1: to step 9 (epoch 3)' in out, out
  assert summary['epochs'] == 3 and summary['steps'] == 9
  assert summary['param_fingerprint'] == whole['param_fingerprint']
