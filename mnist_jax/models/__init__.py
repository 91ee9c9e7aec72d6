"""Models by name: `config.model.name = 'mlp'` loads `mnist_jax/models/mlp.py` and its `Model`.

The model contract. A model is a module here that defines a Linen `Model`:
  * built as `Model(num_classes=..., **fields)`: its other `config.model` fields are passed as
    keyword arguments;
  * `__call__(images_BxHxWxC, train)` returns the logits [B, num_classes]; the images are
    float32 in [0, 1]; `train` is True in the train step (dropout active, BatchNorm updating
    its statistics) and False in evaluation;
  * it may keep mutable collections besides 'params', e.g. BatchNorm's 'batch_stats': the
    train step applies it with those collections mutable and keeps what comes back in
    `TrainState.model_state`; evaluation uses them as stored; checkpoints, the parameter
    fingerprint and the NaN/Inf check cover them;
  * dropout draws from the 'dropout' rng stream, which the step derives from (seed, step);
  * optional: a `mask` keyword argument. A model that takes one gets the batch's mask [B]
    (1.0 for a real example, 0.0 for the padding of an epoch's last batch), e.g. to pass to
    `nn.BatchNorm(...)(x, mask=...)` so that padding never enters the batch statistics;
  * optional: a `dtype` field (constructor argument). A model that takes one gets
    config.compute_dtype as a jnp dtype (float32, bfloat16, float16) and computes in it by
    passing it on to its layers (`nn.Dense(..., dtype=self.dtype)`), keeping their
    `param_dtype` float32; the step casts its logits to float32. A model without one computes
    in float32 whatever the config says.

`Model` may instead be a Flax NNX module (`nnx.Module`):
  * built as `Model(num_classes=..., **fields, rngs=nnx.Rngs(...))`; a constructor that takes
    `image_shape` also gets the images' (H, W, C), to size its layers;
  * `__call__(images_BxHxWxC)` returns the logits; its `nnx.BatchNorm` and `nnx.Dropout`
    follow `model.train()` / `model.eval()`, which the codebase switches: training steps run
    in train mode, evaluation in eval mode;
  * `nnx.BatchStat` variables are kept like Linen's 'batch_stats'; dropout's RNG stream is
    reseeded from (seed, step) at every step; `mask` is optional as above.
`build` wraps it (models/_nnx.py, the one place where NNX and Linen differ) so that the steps
see Linen's `init` / `apply` and plain dicts of arrays.
"""

import importlib
import inspect
import pkgutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from mnist_jax.infra import errors

def _nnx_adapter(cls: type):
  """models/_nnx.py when `cls` is an NNX module class, else None. flax.nnx (~0.1 s to import)
  is imported only by a run whose model uses it: a class that subclasses nnx.Module has
  imported it already."""
  nnx = sys.modules.get('flax.nnx')
  if nnx is None or not (isinstance(cls, type) and issubclass(cls, nnx.Module)):
    return None
  from mnist_jax.models import _nnx  # pylint: disable=g-import-not-at-top
  return _nnx


def _constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
  adapter = _nnx_adapter(cls)
  return (adapter.constructor_parameters(cls) if adapter
          else dict(inspect.signature(cls).parameters))


# Initializers in jax.nn.initializers that are init functions themselves, not factories.
_PLAIN_INITIALIZERS = ('zeros', 'ones')


def available() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_'))


def module_class(name: str) -> type:
  """`models.<name>.Model`: a Linen or an NNX module class, else a ConfigError."""
  module = importlib.import_module(f'{__name__}.{name}')
  where = f'config.model.name={name!r} is invalid: mnist_jax/models/{name}.py'
  if not hasattr(module, 'Model'):
    raise errors.ConfigError(f'{where} defines no Model (a flax.linen or flax.nnx Module).')
  cls = module.Model
  if not (isinstance(cls, type) and (issubclass(cls, nn.Module) or _nnx_adapter(cls))):
    raise errors.ConfigError(f'{where} defines Model as {cls!r}, which is neither a '
                             'flax.linen.Module nor a flax.nnx.Module class.')
  return cls


# Constructor arguments the run passes itself, never a config.model field.
_SET_BY_THE_RUN = {'num_classes', 'rngs', 'image_shape', 'dtype', 'parent', 'name'}


def check(model_config) -> None:
  """Raises ConfigError unless `models.<name>.Model` can be built from `model_config`: a Linen
  or NNX module class whose constructor takes every field, and needs no other."""
  fields = dict(model_config)
  name = fields.pop('name')
  cls = module_class(name)
  parameters = _constructor_parameters(cls)
  takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
  where = f'models.{name}.Model'
  for field in fields:
    if field in _SET_BY_THE_RUN:
      instead = ' (set config.compute_dtype)' if field == 'dtype' else ''
      raise errors.ConfigError(
          f'config.model.{field} is invalid: the run sets {field} itself{instead}.')
    if field not in parameters and not takes_any:
      accepted = sorted(set(parameters) - _SET_BY_THE_RUN)
      raise errors.ConfigError(
          f"config.model.{field} is invalid: {where} takes no argument {field!r} (it takes: "
          f"{', '.join(accepted) or 'none but num_classes'}).")
  for arg, p in parameters.items():
    if (p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and arg not in fields and arg not in _SET_BY_THE_RUN):
      raise errors.ConfigError(f'config.model.{arg} is missing: {where} needs it.')
  if 'num_classes' not in parameters and not takes_any:
    raise errors.ConfigError(f'{where} is invalid: its constructor must take num_classes.')
  if _nnx_adapter(cls) and 'rngs' not in parameters and not takes_any:
    raise errors.ConfigError(f'{where} is invalid: an NNX Model must take rngs (nnx.Rngs).')


def build(model_config, num_classes: int, dtype: str = 'float32'):
  """`models.<name>.Model(num_classes=..., **other fields of model_config)`: the Linen module,
  or an NNX module class wrapped to look like one (`create`). A Model that takes `dtype` gets
  `dtype` (config.compute_dtype) as a jnp dtype."""
  fields = dict(model_config)
  name = fields.pop('name')
  cls = module_class(name)
  if 'dtype' in _constructor_parameters(cls):
    fields['dtype'] = jnp.dtype(dtype)
  else:
    warn_unless_typed(cls, name, dtype)
  return create(cls, num_classes, **fields)


def warn_unless_typed(cls: type, name: str, dtype: str) -> bool:
  """True, after one warning line, when `dtype` is not float32 and the Model takes none: it
  still trains, in float32. False when the Model takes a `dtype` (or float32 is asked)."""
  if 'dtype' in _constructor_parameters(cls):
    return False
  if jnp.dtype(dtype) != jnp.float32:
    print(f'warning: config.compute_dtype={dtype!r}, but the model {name!r} takes no `dtype` '
          'argument: it computes in float32. Give its Model a `dtype` field and pass it to its '
          'layers (docs/knobs.md).', flush=True)
    return True
  return False


def warn_if_padding_in_statistics(name: str, takes_mask: bool, model_state: dict,
                                  num_examples: int, batch_size: int) -> bool:
  """True, after one warning line, when a model keeps batch statistics (BatchNorm's
  'batch_stats') but takes no `mask`, and the epoch's last batch is padded: its padding
  (copies of example 0) then enters the statistics. False otherwise."""
  padding = -num_examples % batch_size
  if takes_mask or not model_state.get('batch_stats') or not padding:
    return False
  print(f'warning: the model {name!r} keeps BatchNorm statistics but its __call__ takes no '
        f'`mask`: the {padding} padding examples of every epoch\'s last batch ({num_examples} '
        f'examples in batches of {batch_size}) enter them. Give __call__ a `mask` argument and '
        'pass it on, nn.BatchNorm(...)(x, mask=mask[:, None]) (as models/cnn_bn.py does), or '
        'choose a batch_size that divides the training examples.', flush=True)
  return True


def create(cls: type, num_classes: int, **fields):
  """A Linen `Model` built with these arguments, or an NNX one wrapped (models/_nnx.py), with
  the same `init` and `apply`; it is built by `init`, once the image shape is known."""
  adapter = _nnx_adapter(cls)
  if adapter:
    return adapter.wrap(cls, dict(num_classes=num_classes, **fields))
  return cls(num_classes=num_classes, **fields)


def initializer(name: str) -> jax.nn.initializers.Initializer:
  """An initializer of jax.nn.initializers by name, e.g. 'glorot_uniform' or 'zeros'."""
  init = getattr(jax.nn.initializers, name)
  return init if name in _PLAIN_INITIALIZERS else init()


def activation(name: str):
  """An activation of flax.linen by name, e.g. 'relu' or 'gelu'."""
  return getattr(nn, name)
