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
    `nn.BatchNorm(...)(x, mask=...)` so that padding never enters the batch statistics.
"""

import importlib
import pkgutil

import flax.linen as nn
import jax

# Initializers in jax.nn.initializers that are init functions themselves, not factories.
_PLAIN_INITIALIZERS = ('zeros', 'ones')


def available() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_'))


def build(model_config, num_classes: int) -> nn.Module:
  """Returns `models.<name>.Model(num_classes=..., **other fields of model_config)`."""
  fields = dict(model_config)
  name = fields.pop('name')
  module = importlib.import_module(f'{__name__}.{name}')
  return module.Model(num_classes=num_classes, **fields)


def initializer(name: str) -> jax.nn.initializers.Initializer:
  """An initializer of jax.nn.initializers by name, e.g. 'glorot_uniform' or 'zeros'."""
  init = getattr(jax.nn.initializers, name)
  return init if name in _PLAIN_INITIALIZERS else init()


def activation(name: str):
  """An activation of flax.linen by name, e.g. 'relu' or 'gelu'."""
  return getattr(nn, name)
