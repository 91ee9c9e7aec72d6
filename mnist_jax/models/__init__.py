"""Models by name: `config.model.name = 'mlp'` loads `mnist_jax/models/mlp.py` and its `Model`.

Adding a model means adding a module here that defines a Linen `Model(num_classes, **fields)`
whose `__call__(images_BxHxWxC, train)` returns logits; its other config fields are passed as
keyword arguments.
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
