"""Config validation: every bad value is refused before any data is loaded or compiled."""

import errno
import inspect
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from mnist_jax import augment
from mnist_jax import datasets
from mnist_jax import executor
from mnist_jax.infra import errors
from mnist_jax.infra import storage
from mnist_jax import losses
from mnist_jax import metrics
from mnist_jax import mixed_precision
from mnist_jax import models
from mnist_jax import sweeps


def _is_positive_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _is_int(x: Any) -> bool:
  """An integer, and not a bool (True is an int to Python, never a size or a count here)."""
  return isinstance(x, int) and not isinstance(x, bool)


def _is_positive_int(x: Any) -> bool:
  return _is_int(x) and x > 0


def _is_int_at_least_0(x: Any) -> bool:
  return _is_int(x) and x >= 0


def _is_fraction(x: Any) -> bool:
  """A number in [0, 1)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1


def _is_finite_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_number_at_least_0(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0


def _named_in(namespace) -> Callable[[Any], bool]:
  return lambda name: isinstance(name, str) and callable(getattr(namespace, name, None))


def _image_size(size: Any) -> bool:
  return isinstance(size, (tuple, list)) and (not size or (len(size) == 2 and all(
      _is_positive_int(x) for x in size)))


def _dataset(name: Any) -> bool:
  """A TFDS name, or `kind:location` of own data with a location."""
  if not isinstance(name, str) or not name:
    return False
  kind, colon, location = name.partition(':')
  return not (colon and kind in datasets.SOURCES) or bool(location)


def _is_bool(x: Any) -> bool:
  return isinstance(x, bool)


def _positive_ints(sizes: Any) -> bool:
  """A tuple (or list) of integers > 0: layer widths; () for none."""
  return isinstance(sizes, (tuple, list)) and all(_is_positive_int(x) for x in sizes)


def _split_name(split: Any) -> bool:
  return isinstance(split, str) and bool(split.strip())


# Linux's limits: PATH_MAX bytes in all, NAME_MAX bytes a component.
MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255


def path_problem(path: str) -> str | None:
  """Why `path` cannot name a file here (a NUL or line break, a length beyond Linux's limits),
  or None."""
  if '\0' in path:
    return 'it holds a NUL character'
  if '\n' in path or '\r' in path:
    return 'it holds a line break'
  if len(path.encode()) > MAX_PATH_BYTES:
    return f'it is {len(path.encode())} bytes long, more than the {MAX_PATH_BYTES} a path may be'
  longest = max(path.split('/'), key=lambda part: len(part.encode()))
  if len(longest.encode()) > MAX_NAME_BYTES:
    return (f'its part {longest[:20]}... is {len(longest.encode())} bytes long, more than the '
            f'{MAX_NAME_BYTES} a file name may be')
  return None


def _path_string(path: Any) -> bool:
  return isinstance(path, str) and path_problem(path) is None


def _metric_names(names: Any) -> bool:
  return (isinstance(names, (tuple, list)) and len(set(names)) == len(names)
          and all(isinstance(n, str) and n in metrics.METRICS for n in names))


# (field path, check, what is allowed). Paths into sub-dicts use dots; a missing optional
# field (e.g. an optimizer without `decay`) is skipped.
_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ('dataset', _dataset,
     "a TFDS name (e.g. 'mnist'), 'image_folder:/path/root' or 'npz:/path/file.npz'"),
    ('image_size', _image_size, "(H, W), two integers > 0, or () for the images' own size"),
    ('learning_rate', _is_positive_number, 'a finite number > 0'),
    ('batch_size', _is_positive_int, 'an integer > 0'),
    ('eval_batch_size', _is_positive_int, 'an integer > 0'),
    ('num_epochs', _is_positive_int, 'an integer > 0'),
    ('seed', _is_int_at_least_0, 'an integer >= 0'),
    ('checkpoint_every_steps', _is_int_at_least_0,
     'an integer >= 0 (0: at the end of every epoch)'),
    ('checkpoint_keep', _is_positive_int, 'an integer > 0'),
    ('cloud_retry_seconds', _is_positive_number, 'seconds, a finite number > 0'),
    ('num_seeds', _is_positive_int, 'an integer > 0'),
    ('steps_per_call', _is_int_at_least_0, 'an integer >= 0 (0: an epoch)'),
    ('scan_unroll', _is_positive_int, 'an integer > 0'),
    ('optimizer_kwargs.decay', _is_fraction, 'a number in [0, 1)'),
    ('optimizer_kwargs.eps', _is_positive_number, 'a finite number > 0'),
    ('optimizer', _named_in(optax), 'an optax optimizer, e.g. sgd, adam, adamw, rmsprop'),
    ('lr_schedule', _named_in(optax),
     'an optax schedule, e.g. constant_schedule, cosine_decay_schedule'),
    ('model.activation', _named_in(nn), 'a flax.linen activation, e.g. relu, gelu, tanh'),
    ('model.kernel_init', _named_in(jax.nn.initializers),
     'a jax.nn.initializers name, e.g. glorot_uniform, lecun_normal, he_normal'),
    ('model.bias_init', _named_in(jax.nn.initializers), 'a jax.nn.initializers name, e.g. zeros'),
    ('input_mode', lambda x: x == 'auto' or x in executor.INPUT_MODES,
     f"one of auto, {', '.join(executor.INPUT_MODES)}"),
    ('input_memory_budget', _is_int_at_least_0, 'bytes, an integer >= 0 (0: auto never streams)'),
    ('loss', lambda x: x in losses.LOSSES, f"one of {', '.join(losses.LOSSES)}"),
    ('loss_kwargs.label_smoothing', _is_fraction, 'a number in [0, 1)'),
    ('metrics', _metric_names,
     f"a tuple of distinct names among {', '.join(metrics.METRICS)}"),
    ('augment', lambda x: isinstance(x, str),
     "a string of ops like 'shift(2)|rotate(10)', or '' for none"),
    ('grad_clip_norm', _is_number_at_least_0, 'a finite number >= 0 (0: no clipping)'),
    ('weight_decay', _is_number_at_least_0, 'a finite number >= 0 (0: none)'),
    ('warmup_steps', _is_int_at_least_0, 'an integer >= 0 (0: no warmup)'),
    ('grad_accum_steps', _is_positive_int, 'an integer > 0 (1: off)'),
    ('ema_decay', _is_fraction, 'a number in [0, 1) (0: off), e.g. 0.999'),
    ('compute_dtype', lambda x: x in mixed_precision.DTYPES,
     f"one of {', '.join(mixed_precision.DTYPES)}"),
    ('train_split', _split_name, "a split name, sliced as TFDS slices, e.g. 'train[:90%]'"),
    ('eval_split', _split_name, "a split name, sliced as TFDS slices, e.g. 'test'"),
    ('data_dir', _path_string,
     "a path (no NUL or line break, at most 4096 bytes, 255 a part), or '' for the default"),
    ('cache_dir', _path_string,
     "a path (no NUL or line break, at most 4096 bytes, 255 a part), '' or 'none'"),
    ('model.hidden_sizes', _positive_ints, 'a tuple of widths, integers > 0, e.g. (512,)'),
    ('model.features', _positive_ints, 'a tuple of channel counts, integers > 0, e.g. (32, 64)'),
    ('model.kernel_size', _is_positive_int, 'an integer > 0'),
    ('model.dropout_rate', _is_fraction, 'a number in [0, 1) (0: no dropout)'),
    ('model.batch_norm_momentum', _is_fraction, 'a number in [0, 1), e.g. 0.9'),
    *((field, _is_bool, 'True or False') for field in (
        'download', 'checkpoint_async', 'write_tensorboard', 'write_report', 'profile')),
]

# JAX's seeds are 32-bit (jax.random.PRNGKey(2**32) is PRNGKey(0)): every replica's must fit.
MAX_SEED = 2**32 - 1

# What config.backend_overrides.<backend> may set: how the steps run, never what they compute.
BACKENDS = ('cpu', 'gpu', 'tpu')
BACKEND_FIELDS = executor.BACKEND_FIELDS

# Set elsewhere in the config (optim.py passes them to the optimizer itself).
_OPTIMIZER_ARGS_FROM_CONFIG = {'learning_rate': 'learning_rate and lr_schedule',
                               'weight_decay': 'weight_decay', 'mask': 'weight_decay'}


def _rules_for(path: str) -> list[tuple[Callable[[Any], bool], str]]:
  """The (check, what is allowed) pairs of _RULES for one field path."""
  return [(ok, allowed) for rule_path, ok, allowed in _RULES if rule_path == path]


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
      shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:60] + '...'
      raise errors.ConfigError(f'config.{path}={shown} is invalid: expected {allowed}.')
  last_seed = config.seed + config.num_seeds - 1
  if last_seed > MAX_SEED:
    raise errors.ConfigError(
        f'config.seed={config.seed} is invalid with num_seeds={config.num_seeds}: the replicas\' '
        f'seeds run to {last_seed}, and JAX\'s seeds are 32-bit (2**32 would train as seed 0); '
        f'expected seed + num_seeds - 1 <= {MAX_SEED}.')
  _check_optimizer_kwargs(config)
  _check_kwargs(losses.get(config.loss), dict(config.loss_kwargs), 'loss_kwargs',
                f'losses.{config.loss}', skip=2)
  _check_sweep(config)
  _check_backend_overrides(config)
  # The images' size is known here only if image_size sets it; else `check_augment` runs
  # again once the dataset's shape is known (before anything is compiled).
  size = tuple(config.image_size)
  check_augment(config, (*size, 1) if size else augment.ANY_IMAGE_SHAPE)
  if config.model.name not in models.available():
    raise errors.ConfigError(f'config.model.name={config.model.name!r} is invalid: expected '
                             f"one of {', '.join(models.available())}.")
  models.check(config.model)  # A Model, Linen or NNX, that takes every field.
  accum = config.get('grad_accum_steps', 1)
  if accum > 1 and config.batch_size % (accum * jax.device_count()):
    raise errors.ConfigError(
        f'config.grad_accum_steps={accum} is invalid with batch_size={config.batch_size}: '
        f'expected micro-batches of batch_size / grad_accum_steps examples that split over '
        f'the {jax.device_count()} device(s), i.e. batch_size a multiple of '
        f'{accum * jax.device_count()}.')
  for field in ('batch_size', 'eval_batch_size'):  # Both are split over all devices.
    if config[field] % jax.device_count():
      raise errors.ConfigError(
          f'config.{field}={config[field]} is invalid: expected a multiple of the '
          f'device count ({jax.device_count()}).')


def check_cache_dir(config: ml_collections.ConfigDict, cache_dir) -> None:
  """The cache folder (resolved: config.cache_dir, $MNIST_JAX_CACHE or ~/.cache/mnist_jax) can
  be written, checked before anything is decoded; temporary files a killed writer left in it
  are removed. None (caches off) and a bucket (checked when written) pass."""
  if cache_dir is None or storage.is_remote(cache_dir):
    return
  folder = pathlib.Path(cache_dir)
  where = f'the cache folder {folder} (config.cache_dir={config.cache_dir!r})'
  fix = ("; give another --config.cache_dir (or 'none' for no caches), or set "
         '$MNIST_JAX_CACHE.')
  problem = path_problem(str(folder))
  if problem:
    raise errors.ConfigError(f'{where} cannot be used: {problem}{fix}')
  try:
    if folder.exists() and not folder.is_dir():
      raise errors.ConfigError(f'{where} is a file, not a folder{fix}')
    data = folder / 'data'
    data.mkdir(parents=True, exist_ok=True)
    probe = data / f'.write_test.{os.getpid()}'
    probe.write_text('')
    probe.unlink()
  except OSError as e:
    why = (f'no permission to write there ({os.strerror(e.errno)})'
           if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
           else 'a part of it is a file' if e.errno == errno.ENOTDIR
           else f'{type(e).__name__}: {e.strerror or e}')
    raise errors.ConfigError(f'{where} cannot be written: {why}{fix}') from None
  for name in storage.remove_orphaned_tmp(data):
    print(f'note: removed {data / name}, the unfinished file of a cache writer that was '
          'stopped.', flush=True)


def check_augment(config: ml_collections.ConfigDict, image_shape: tuple[int, ...]) -> None:
  """config.augment's ops take their arguments and leave an image of `image_shape` (HxWxC)."""
  try:
    augment.check(config.augment, tuple(image_shape))
  except ValueError as e:
    raise errors.ConfigError(
        f'config.augment={config.augment!r} is invalid: {e}; expected ops of '
        "mnist_jax/augment.py separated by '|', e.g. 'shift(2)|rotate(10)'.") from None


def _check_optimizer_kwargs(config: ml_collections.ConfigDict) -> None:
  """optax.<optimizer> must take learning_rate plus config.optimizer_kwargs (e.g. sgd has no
  decay or eps, which the default config's RMSprop needs)."""
  kwargs = dict(config.optimizer_kwargs)
  for name, field in _OPTIMIZER_ARGS_FROM_CONFIG.items():
    if name in kwargs:
      raise errors.ConfigError(
          f'config.optimizer_kwargs.{name} is invalid: set config.{field} instead (the '
          f'optimizer gets it from there).')
  _check_kwargs(getattr(optax, config.optimizer), kwargs, 'optimizer_kwargs',
                f'optax.{config.optimizer}', skip=0, bound=dict(learning_rate=1.0))


def _check_kwargs(fn: Callable, kwargs: dict, field: str, what: str, *, skip: int,
                  bound: dict | None = None) -> None:
  """`fn` must take `kwargs` after its first `skip` positional arguments (and `bound`)."""
  try:
    inspect.signature(fn).bind(*[None] * skip, **(bound or {}), **kwargs)
  except TypeError as e:
    params = list(inspect.signature(fn).parameters)[skip:]
    accepted = ', '.join(p for p in params if p not in (bound or {})) or 'none'
    raise errors.ConfigError(
        f'config.{field}={kwargs} is invalid for {what} ({e}): expected arguments among: '
        f'{accepted}; --config.{field}={{}} for none.') from None


def _check_sweep(config: ml_collections.ConfigDict) -> None:
  """Each swept field applies to this config, and each of its values is one the field would
  take on its own."""
  allowed = sweeps.sweepable(config)
  for name, values in sweeps.swept(config).items():
    field = f'config.sweep.{name}'
    if name not in allowed:
      raise errors.ConfigError(
          f'{field} is invalid: optax.{config.optimizer} with losses.{config.loss} has no '
          f"{name} to sweep; expected one of: {', '.join(allowed)}.")
    if not values:
      raise errors.ConfigError(f'{field}=() is invalid: expected a non-empty tuple of values, '
                               f"e.g. --config.sweep.{name}='(0.1,0.2)'.")
    rules = _rules_for(sweeps.CONFIG_FIELDS.get(name, f'optimizer_kwargs.{name}'))
    if name == 'grad_clip_norm':  # Swept, the clipping is on: a norm of 0 would zero it all.
      rules = [(_is_positive_number, 'a finite number > 0')]
    for value in values:
      for ok, expected in rules or [(_is_finite_number, 'a finite number')]:
        if not ok(value):
          raise errors.ConfigError(
              f'{field}={tuple(values)!r} is invalid: expected each value to be {expected}, '
              f'and {value!r} is not.')


def _check_backend_overrides(config: ml_collections.ConfigDict) -> None:
  """Each entry names a backend, and sets only fields of BACKEND_FIELDS to values they take."""
  for backend, fields in config.get('backend_overrides', {}).items():
    if backend not in BACKENDS:
      raise errors.ConfigError(f'config.backend_overrides.{backend} is invalid: expected a '
                               f"backend among {', '.join(BACKENDS)}.")
    if not isinstance(fields, (dict, ml_collections.ConfigDict)):
      raise errors.ConfigError(
          f'config.backend_overrides.{backend}={fields!r} is invalid: expected a dict of '
          f"{', '.join(BACKEND_FIELDS)}, e.g. {{'scan_unroll': 1}}.")
    for name, value in fields.items():
      field = f'config.backend_overrides.{backend}.{name}'
      if name not in BACKEND_FIELDS:
        raise errors.ConfigError(f"{field} is invalid: a backend may only set "
                                 f"{', '.join(BACKEND_FIELDS)}.")
      for ok, allowed in _rules_for(name):
        if not ok(value):
          raise errors.ConfigError(f'{field}={value!r} is invalid: expected {allowed}.')
