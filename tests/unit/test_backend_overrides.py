"""config.backend_overrides: steps_per_call and scan_unroll per backend, and nothing else."""

import importlib

import jax
import pytest
import tensorflow_datasets as tfds

from mnist_jax import checkpoint
from mnist_jax import executor
from mnist_jax.infra import errors
from mnist_jax import train
from mnist_jax import validation


def shipped(name: str):
  config = importlib.import_module(f'configs.{name}').get_config()
  config.cache_dir, config.download = 'none', False
  return config


@pytest.mark.parametrize('name, cpu, gpu', [
    ('mlp', (0, 1), (0, 1)),
    ('cnn', (10, 10), (0, 1)),  # Unrolled on XLA:CPU only (docs/performance.md, "On a GPU").
    ('cnn_bn', (7, 7), (0, 1)),
])
def test_each_backend_gets_its_values(name, cpu, gpu):
  config = shipped(name)
  as_pair = lambda d: (d['steps_per_call'], d['scan_unroll'])
  assert as_pair(executor.for_backend(config, 'cpu')) == cpu
  assert as_pair(executor.for_backend(config, 'gpu')) == gpu
  assert as_pair(executor.for_backend(config, 'tpu')) == cpu  # No TPU entry: the config's own.
  validation.validate(config)


def test_setup_runs_the_steps_as_this_backend_is_told(mlp_config):
  mlp_config.update(num_epochs=1, batch_size=4, eval_batch_size=4, steps_per_call=1,
                    scan_unroll=1, model=dict(mlp_config.model, hidden_sizes=(8,)))
  mlp_config.backend_overrides = dict(cpu=dict(steps_per_call=2, scan_unroll=2),
                                      gpu=dict(steps_per_call=3, scan_unroll=3))
  with tfds.testing.mock_data(num_examples=16):
    run = train.setup(mlp_config)
  expected = dict(cpu=2, gpu=3)[jax.default_backend()]
  assert run.executor.steps_per_call == expected and run.executor.unroll == expected


def test_a_config_without_the_field_runs_as_before(mlp_config):
  del mlp_config['backend_overrides']  # A config file written before the field existed.
  mlp_config.update(steps_per_call=4, scan_unroll=2)
  validation.validate(mlp_config)
  assert executor.for_backend(mlp_config, 'gpu') == dict(steps_per_call=4, scan_unroll=2)


@pytest.mark.parametrize('overrides, message', [
    (dict(cuda=dict(scan_unroll=1)), r'^config\.backend_overrides\.cuda is invalid: expected a '
     r'backend among cpu, gpu, tpu\.$'),
    (dict(gpu=dict(batch_size=256)), r'^config\.backend_overrides\.gpu\.batch_size is invalid: '
     r'a backend may only set steps_per_call, scan_unroll\.$'),
    (dict(gpu=dict(scan_unroll=0)), r'^config\.backend_overrides\.gpu\.scan_unroll=0 is '
     r'invalid: expected an integer > 0\.$'),
    (dict(cpu=dict(steps_per_call=-1)), r'^config\.backend_overrides\.cpu\.steps_per_call=-1 is '
     r'invalid: expected an integer >= 0'),
    (dict(gpu=3), r'^config\.backend_overrides\.gpu=3 is invalid: expected a dict of '
     r'steps_per_call, scan_unroll'),
])
def test_bad_overrides_are_refused_in_one_line(mlp_config, overrides, message):
  mlp_config.backend_overrides = overrides
  with pytest.raises(errors.ConfigError, match=message):
    validation.validate(mlp_config)


def test_a_resumed_run_may_change_them():
  """What a run is (checked against its checkpoints on resume) leaves them out, like
  steps_per_call and scan_unroll themselves: they change how steps run, not what they do."""
  is_run = lambda config: checkpoint.identity(checkpoint.run_record(config, 60, 5))
  before, after = shipped('cnn'), shipped('cnn')
  after.backend_overrides = dict(cpu=dict(steps_per_call=3, scan_unroll=1))
  after.scan_unroll = 2
  assert is_run(before) == is_run(after)
  after.batch_size = 256  # While a field that is not resumable still counts.
  assert is_run(before) != is_run(after)
