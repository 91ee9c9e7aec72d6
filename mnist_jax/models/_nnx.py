"""A Flax NNX model behind the interface the steps use for a Linen one: `init` and `apply`.

Linen and NNX differ here and nowhere else. The steps, the loop, the checkpoints and the
sweeps see what a Linen model gives them:
  * `init(rng, images) -> {'params': ..., 'batch_stats': ..., ...}`: plain nested dicts of
    arrays, one per variable type (`nnx.Param` -> 'params', `nnx.BatchStat` -> 'batch_stats',
    named as nnx.bridge names them), with string keys (an `nnx.List`'s indices become '0',
    '1', ...), so checkpoints, fingerprints, vmapped replicas, weight decay masks and parameter
    counts handle them as they handle Linen's;
  * `apply(variables, images, train=..., rngs={'dropout': rng}, mutable=[...], mask=...)`: the
    logits, and the updated collections named in `mutable`.

How: `nnx.split` / `nnx.merge`. The module is built once abstractly (`nnx.eval_shape`, no
arrays) for each image shape, and split twice: after `model.train()` and after `model.eval()`.
That gives two graph definitions, static and hashable, that differ only in the modules'
`deterministic` and `use_running_average` attributes. `apply` merges the one for its mode with
the arrays it is given, calls the module and reads the collections back out of it. All of
that happens while JAX traces the step, so the compiled program is the module's arithmetic,
and nothing in Python changes between steps (one compile, as for Linen).

Not `nnx.bridge.ToLinen`: in flax 0.12 it runs the NNX constructor, initializers included,
inside every `apply` before overwriting the variables with `nnx.update`; it never calls
`train()` / `eval()`, so the mode would have to be a constructor argument; and it names its
RNG streams after Linen's, with counts of its own. Splitting and merging ourselves is ~100
lines with every one of those choices explicit.

Randomness. The module's RNG streams (`nnx.RngKey`, `nnx.RngCount`: e.g. the stream that
`nnx.Dropout(..., rngs=rngs)` forks) are not kept in the variables: every `apply` in train mode
reseeds stream i with `fold_in(rngs['dropout'], i)` and count 0, so dropout draws from the
rng the step derives from (seed, step), as a Linen model's does, and a resumed run draws the
same masks. In eval mode (or without `rngs`) the streams get a fixed key: `eval()` makes
dropout deterministic, so none is drawn.

Limits: the module must not create variables in `__call__`; its graph (modules and variables)
must be the same for every image of the same shape.
"""

import dataclasses
import inspect
from typing import Any

from flax import nnx
from flax.nnx import variablelib
import jax
import jax.numpy as jnp

Variables = dict[str, dict[str, Any]]


def is_nnx(cls: Any) -> bool:
  return isinstance(cls, type) and issubclass(cls, nnx.Module)


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
  """The arguments `cls(...)` takes (an NNX module's metaclass hides them from
  `inspect.signature(cls)`: they are its `__init__`'s, less `self`)."""
  if is_nnx(cls):
    return dict(list(inspect.signature(cls.__init__).parameters.items())[1:])
  return dict(inspect.signature(cls).parameters)


def takes(fn, argument: str) -> bool:
  return argument in inspect.signature(fn).parameters


def _collection(variable_type: type) -> str:
  """'params' for nnx.Param, 'batch_stats' for nnx.BatchStat, ... (nnx.bridge's names)."""
  return variablelib.variable_name_from_type(variable_type, allow_register=True)


def _collections(module: nnx.Module) -> Variables:
  """The module's variables but its RNG streams, as nested dicts with string keys."""
  out: Variables = {}
  for path, variable in nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.RngState))):
    node = out.setdefault(_collection(type(variable)), {})
    for key in path[:-1]:
      node = node.setdefault(str(key), {})
    node[str(path[-1])] = variable.get_value()
  return out


def _lookup(variables: Variables, variable, path) -> jax.Array:
  node = variables[_collection(type(variable))]
  for key in path:
    node = node[str(key)]
  return node


def _typed_key(rng: jax.Array) -> jax.Array:
  """A typed key (what nnx.RngKey holds) from a raw uint32 one (what the steps pass)."""
  return rng if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(rng)


@dataclasses.dataclass(frozen=True)
class _Graph:
  """One image shape's graph definitions (train and eval mode) and abstract variables."""
  train: Any
  eval: Any
  flat: tuple  # ((path, abstract Variable), ...), every variable, RNG streams included.


class NNXModel:
  """An `nnx.Module` class and its constructor arguments, used through `init` and `apply`."""

  def __init__(self, module_class: type, kwargs: dict[str, Any]):
    self.module_class = module_class
    self.kwargs = dict(kwargs)  # num_classes and the other config.model fields.
    self._graphs: dict[tuple[int, ...], _Graph] = {}

  def __repr__(self) -> str:
    return f'NNXModel({self.module_class.__module__}.{self.module_class.__name__}, {self.kwargs})'

  @property
  def takes_mask(self) -> bool:
    return takes(self.module_class.__call__, 'mask')

  def construct(self, image_shape, rngs: nnx.Rngs) -> nnx.Module:
    """`Model(num_classes=..., **fields, [image_shape=(H, W, C),] rngs=rngs)`."""
    kwargs = dict(self.kwargs)
    if 'image_shape' in constructor_parameters(self.module_class):
      kwargs['image_shape'] = tuple(int(n) for n in image_shape)
    return self.module_class(**kwargs, rngs=rngs)

  def _graph(self, image_shape) -> _Graph:
    image_shape = tuple(int(n) for n in image_shape)
    if image_shape not in self._graphs:
      module = nnx.eval_shape(lambda: self.construct(image_shape, nnx.Rngs(0)))
      module.train()
      train_def, state = nnx.split(module)
      module.eval()
      eval_def, _ = nnx.split(module)
      self._graphs[image_shape] = _Graph(train_def, eval_def, tuple(nnx.to_flat_state(state)))
    return self._graphs[image_shape]

  def init(self, rng: jax.Array, images_BxHxWxC: jax.Array) -> Variables:
    """The initial variables: the module built with `nnx.Rngs(rng)`."""
    self._graph(images_BxHxWxC.shape[1:])
    return _collections(self.construct(images_BxHxWxC.shape[1:], nnx.Rngs(rng)))

  def merge(self, variables: Variables, image_shape, *, train: bool,
            rng: jax.Array | None = None) -> nnx.Module:
    """The module in train or eval mode holding `variables`, its RNG streams seeded by `rng`."""
    graph = self._graph(image_shape)
    key = _typed_key(rng) if train and rng is not None else jax.random.key(0)
    flat, streams = [], 0
    for path, variable in graph.flat:
      if isinstance(variable, nnx.RngKey):
        value, streams = jax.random.fold_in(key, streams), streams + 1
      elif isinstance(variable, nnx.RngState):  # RngCount: each stream starts at 0.
        value = jnp.zeros(variable.shape, variable.dtype)
      else:
        value = _lookup(variables, variable, path)
      flat.append((path, variable.replace(value)))
    return nnx.merge(graph.train if train else graph.eval, nnx.from_flat_state(flat))

  def __call__(self, variables: Variables, images_BxHxWxC: jax.Array, train: bool = False):
    return self.apply(variables, images_BxHxWxC, train=train)

  def apply(self, variables: Variables, images_BxHxWxC: jax.Array, train: bool = False,
            rngs: dict[str, jax.Array] | None = None, mutable=False,
            mask: jax.Array | None = None):
    """Linen's `apply`: the logits, and with `mutable` (a list of collection names, or True
    for all) the logits and those collections after the call."""
    module = self.merge(variables, images_BxHxWxC.shape[1:], train=train,
                        rng=(rngs or {}).get('dropout'))
    kwargs = dict(mask=mask) if mask is not None and self.takes_mask else {}
    logits = module(images_BxHxWxC, **kwargs)
    if not mutable:
      return logits
    updated = _collections(module)
    names = [n for n in updated if n != 'params'] if mutable is True else list(mutable)
    return logits, {name: updated[name] for name in names}


class NNXModelTakingMask(NNXModel):
  """An NNX model whose `__call__` takes `mask`: the steps read that from this `__call__`."""

  def __call__(self, variables, images_BxHxWxC, train=False, mask=None):
    return self.apply(variables, images_BxHxWxC, train=train, mask=mask)


def wrap(module_class: type, kwargs: dict[str, Any]) -> NNXModel:
  """The adapter for `module_class`: with `mask` in its `__call__`'s signature if the module's
  has it (`steps.takes_mask` reads the signature of the model's class's `__call__`)."""
  cls = NNXModelTakingMask if takes(module_class.__call__, 'mask') else NNXModel
  return cls(module_class, kwargs)
