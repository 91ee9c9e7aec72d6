"""Bad config values are refused with a ConfigError naming the field, before anything is written."""

import math
import re

import pytest
import tensorflow_datasets as tfds

from mnist_jax.infra import errors
from mnist_jax import train
from mnist_jax import validation

BAD_VALUES = [
    ('learning_rate', math.nan),
    ('learning_rate', -1.0),
    ('learning_rate', 0.0),
    ('learning_rate', math.inf),
    ('batch_size', 0),
    ('batch_size', -16),
    ('eval_batch_size', 0),
    ('num_epochs', 0),
    ('optimizer', 'nope'),
    ('lr_schedule', 'nope'),
    ('model.name', 'nope'),
    ('model.activation', 'nope'),
    ('model.kernel_init', 'nope'),
    ('input_mode', 'nope'),
    ('optimizer_kwargs.decay', 1.0),
    ('optimizer_kwargs.eps', -1e-7),
    ('grad_accum_steps', 0),
    ('grad_accum_steps', 3),  # Does not divide batch_size=128.
    ('ema_decay', 1.0),
    ('ema_decay', -0.1),
    ('compute_dtype', 'float64'),
    ('compute_dtype', 'bf16'),
]


def set_field(config, path, value):
  *parents, leaf = path.split('.')
  node = config
  for key in parents:
    node = node[key]
  node[leaf] = value


def test_the_shipped_config_is_valid(mlp_config):
  validation.validate(mlp_config)  # Raises if the checks are too strict.


@pytest.mark.parametrize('path, value', BAD_VALUES, ids=[f'{p}={v}' for p, v in BAD_VALUES])
def test_bad_value_names_the_field(mlp_config, path, value):
  set_field(mlp_config, path, value)
  with pytest.raises(errors.ConfigError, match=rf'config\.{re.escape(path)}=') as info:
    validation.validate(mlp_config)
  assert 'expected' in str(info.value)  # Says what is allowed.
  assert isinstance(info.value, errors.UserError) and info.value.exit_code == 2


@pytest.mark.parametrize('path, value', [('learning_rate', math.nan), ('learning_rate', -1.0),
                                         ('batch_size', 0), ('optimizer', 'nope'),
                                         ('model.name', 'nope')])
def test_train_refuses_before_writing_anything(mlp_config, tmp_path, path, value):
  set_field(mlp_config, path, value)
  workdir = tmp_path / 'workdir'
  # Mock data: if validation let the value through, the run would train and write files here.
  with tfds.testing.mock_data(num_examples=8), pytest.raises(errors.ConfigError) as info:
    train.train_and_evaluate(mlp_config, str(workdir))
  assert f'config.{path}=' in str(info.value)
  assert not workdir.exists()
  assert list(tmp_path.iterdir()) == []



@pytest.mark.parametrize('path', ['checkpoint_every_steps', 'steps_per_call', 'seed',
                                  'warmup_steps', 'optimizer_kwargs.decay',
                                  'loss_kwargs.label_smoothing'])
def test_a_bool_is_no_number_for_any_rule(mlp_config, path):
  """True is an int to Python; every rule refuses it alike (some let it through before)."""
  mlp_config.loss_kwargs = dict(label_smoothing=0.0)
  config = mlp_config.to_dict()  # A plain dict: the ConfigDict's field types don't stop it.
  set_field(config, path, True)
  with pytest.raises(errors.ConfigError, match=rf'^config\.{re.escape(path)}=True is invalid'):
    validation.validate(type(mlp_config)(config))
