"""Config validation: every bad value is refused before any data is loaded or compiled."""

import inspect
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from mnist_jax import errors
from mnist_jax import input_modes
from mnist_jax import models


def _is_positive_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _is_positive_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _named_in(namespace, kind: type | None = None) -> Callable[[Any], bool]:
  return lambda name: isinstance(name, str) and callable(getattr(namespace, name, None))


def _names(namespace) -> str:
  return ', '.join(n for n in dir(namespace) if not n.startswith('_'))[:300] + ', ...'


# (field path, check, what is allowed). Paths into sub-dicts use dots; a missing optional
# field (e.g. an optimizer without `decay`) is skipped.
_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ('learning_rate', _is_positive_number, 'a finite number > 0'),
    ('batch_size', _is_positive_int, 'an integer > 0'),
    ('eval_batch_size', _is_positive_int, 'an integer > 0'),
    ('num_epochs', _is_positive_int, 'an integer > 0'),
    ('seed', lambda x: isinstance(x, int) and not isinstance(x, bool) and x >= 0,
     'an integer >= 0'),
    ('checkpoint_every_steps', lambda x: isinstance(x, int) and x >= 0,
     'an integer >= 0 (0: at the end of every epoch)'),
    ('checkpoint_keep', _is_positive_int, 'an integer > 0'),
    ('num_seeds', _is_positive_int, 'an integer > 0'),
    ('steps_per_call', lambda x: isinstance(x, int) and x >= 0, 'an integer >= 0 (0: an epoch)'),
    ('scan_unroll', _is_positive_int, 'an integer > 0'),
    ('optimizer_kwargs.decay', lambda x: isinstance(x, (int, float)) and 0 <= x < 1,
     'a number in [0, 1)'),
    ('optimizer_kwargs.eps', _is_positive_number, 'a finite number > 0'),
    ('optimizer', _named_in(optax), 'an optax optimizer, e.g. sgd, adam, adamw, rmsprop'),
    ('lr_schedule', _named_in(optax),
     'an optax schedule, e.g. constant_schedule, cosine_decay_schedule'),
    ('model.activation', _named_in(nn), 'a flax.linen activation, e.g. relu, gelu, tanh'),
    ('model.kernel_init', _named_in(jax.nn.initializers),
     'a jax.nn.initializers name, e.g. glorot_uniform, lecun_normal, he_normal'),
    ('model.bias_init', _named_in(jax.nn.initializers), 'a jax.nn.initializers name, e.g. zeros'),
    ('input_mode', lambda x: x == 'auto' or x in input_modes.INPUT_MODES,
     f"one of auto, {', '.join(input_modes.INPUT_MODES)}"),
]


def _lookup(config: ml_collections.ConfigDict, path: str):
  node = config
  for key in path.split('.'):
    if key not in node:
      return _MISSING
    node = node[key]
  return node


_MISSING = object()


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first bad field and what it allows."""
  for path, ok, allowed in _RULES:
    value = _lookup(config, path)
    if value is not _MISSING and not ok(value):
      raise errors.ConfigError(f'config.{path}={value!r} is invalid: expected {allowed}.')
  _check_optimizer_kwargs(config)
  if config.model.name not in models.available():
    raise errors.ConfigError(f'config.model.name={config.model.name!r} is invalid: expected '
                             f"one of {', '.join(models.available())}.")
  for field in ('batch_size', 'eval_batch_size'):  # Both are split over all devices.
    if config[field] % jax.device_count():
      raise errors.ConfigError(
          f'config.{field}={config[field]} is invalid: expected a multiple of the '
          f'device count ({jax.device_count()}).')


def _check_optimizer_kwargs(config: ml_collections.ConfigDict) -> None:
  """optax.<optimizer> must take learning_rate plus config.optimizer_kwargs (e.g. sgd has no
  decay or eps, which the default config's RMSprop needs)."""
  make = getattr(optax, config.optimizer)
  kwargs = dict(config.optimizer_kwargs)
  try:
    inspect.signature(make).bind(learning_rate=1.0, **kwargs)
  except TypeError as e:
    accepted = ', '.join(p for p in inspect.signature(make).parameters if p != 'learning_rate')
    raise errors.ConfigError(
        f'config.optimizer_kwargs={kwargs} is invalid for optax.{config.optimizer} ({e}): '
        f'expected arguments among: {accepted}; --config.optimizer_kwargs={{}} for none.'
    ) from None
