"""Sweeps in one program: a grid of hyperparameter values x seeds, trained side by side.

`--config.sweep.learning_rate='(3e-4,1e-3,3e-3)'` trains the three learning rates at once;
with `--config.num_seeds=2`, all six (value, seed) pairs. Several swept fields make a grid.
Each pair is a *replica*: one vmapped copy of the training state. Its hyperparameters live in
the state (optax.inject_hyperparams turns the optimizer's into optimizer state; the loss's are
`TrainState.loss_hparams`), so one compiled program trains all of them, and each replica
computes what a separate run with its values and seed computes (`tests/unit/test_sweeps.py`).

Sweepable: the learning rate (the schedule's peak: the config's schedule built at rate 1 and
scaled by the value), `weight_decay`, `grad_clip_norm`, the loss's `label_smoothing`, and any
float argument of the chosen optax optimizer (`decay`, `eps`, `b1`, `b2`, `momentum`, ...).
Unswept (every field None), a run builds its optimizer exactly as without this module.
"""

import dataclasses
import functools
import inspect
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import numpy as np
import optax

from mnist_jax import metrics

# Sweepable fields that are not optimizer arguments, and where each lives in the config.
CONFIG_FIELDS = {'learning_rate': 'learning_rate', 'weight_decay': 'weight_decay',
                 'grad_clip_norm': 'grad_clip_norm',
                 'label_smoothing': 'loss_kwargs.label_smoothing'}
LOSS_FIELDS = ('label_smoothing',)  # Swept through TrainState.loss_hparams.


@functools.cache
def optimizer_fields() -> tuple[str, ...]:
  """Float arguments of optax's optimizers (those taking a learning_rate), e.g. b1, decay."""
  names = set()
  for name in dir(optax):
    make = getattr(optax, name)
    if name.startswith('_') or not inspect.isfunction(make):
      continue
    params = inspect.signature(make).parameters
    if next(iter(params), None) != 'learning_rate':
      continue
    names.update(p for p, spec in params.items()
                 if isinstance(spec.default, float) or (p == 'momentum'))
  return tuple(sorted(names - set(CONFIG_FIELDS)))


def config_fields() -> ml_collections.ConfigDict:
  """`config.sweep`: a placeholder (None: not swept) per sweepable field; a placeholder, not
  (), so the command line can set it (ml_collections cannot override a None default)."""
  return ml_collections.ConfigDict(
      {name: config_dict.placeholder(tuple) for name in (*CONFIG_FIELDS, *optimizer_fields())})


def swept(config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """The swept fields and their values, in the config's order; {} when nothing is swept."""
  return {name: tuple(values) for name, values in config.sweep.items() if values is not None}


def optimizer_hyperparameters(config: ml_collections.ConfigDict) -> list[str]:
  """What the optimizer chain of this config can take as a swept value (optim.py)."""
  make = getattr(optax, config.optimizer)
  return ['learning_rate', 'weight_decay', 'grad_clip_norm'] + [
      p for p in inspect.signature(make).parameters
      if p in optimizer_fields() and p not in ('weight_decay',)]


def loss_hyperparameters(config: ml_collections.ConfigDict) -> list[str]:
  from mnist_jax import losses  # pylint: disable=g-import-not-at-top
  params = inspect.signature(losses.get(config.loss)).parameters
  return [name for name in LOSS_FIELDS if name in params]


def sweepable(config: ml_collections.ConfigDict) -> list[str]:
  """What this config can sweep: its optimizer's float arguments, and more."""
  return optimizer_hyperparameters(config) + loss_hyperparameters(config)


def config_value(config: ml_collections.ConfigDict, name: str) -> float:
  """The value the config gives a sweepable field (0.0 for an optimizer's None default)."""
  if name in CONFIG_FIELDS:
    node = config
    for key in CONFIG_FIELDS[name].split('.'):
      node = node.get(key, 0.0) if isinstance(node, ml_collections.ConfigDict) else node
    return float(node)
  if name in config.optimizer_kwargs:
    return float(config.optimizer_kwargs[name])
  default = inspect.signature(getattr(optax, config.optimizer)).parameters[name].default
  return 0.0 if default is None else float(default)


@dataclasses.dataclass(frozen=True)
class Replica:
  """One (point of the grid, seed) pair."""
  hparams: dict[str, float]  # The swept values ({} without a sweep).
  seed: int

  @property
  def name(self) -> str:
    """'learning_rate=0.001,seed=1': a TensorBoard run name, a table row."""
    return ','.join([*(f'{k}={v:g}' for k, v in self.hparams.items()), f'seed={self.seed}'])


def replicas(config: ml_collections.ConfigDict) -> list[Replica]:
  """Every point of the grid (the first field varying slowest) times every seed."""
  grid = swept(config)
  points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
  return [Replica(point, config.seed + s) for point in points for s in range(config.num_seeds)]


def stacked_hparams(replica_list: Sequence[Replica]) -> dict[str, np.ndarray]:
  """The swept values, one array per field: [R] for R replicas, a scalar for one."""
  names = replica_list[0].hparams
  values = {n: np.asarray([r.hparams[n] for r in replica_list], np.float32) for n in names}
  return values if len(replica_list) > 1 else {n: v[0] for n, v in values.items()}


def assign(state, hparams: dict[str, Any]):
  """The state with the swept values set: in the optimizer state (inject_hyperparams) and in
  `loss_hparams`. Traced inside the (vmapped) init, one replica's values at a time."""
  opt_state = state.opt_state
  if hasattr(opt_state, 'hyperparams'):  # optax.inject_hyperparams's state.
    opt_state = opt_state._replace(hyperparams={
        k: jnp.asarray(hparams.get(k, v), jnp.asarray(v).dtype)
        for k, v in opt_state.hyperparams.items()})
  loss = {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items() if k in LOSS_FIELDS}
  return state.replace(opt_state=opt_state, loss_hparams=loss)


# --- The replicas of a run, side by side: their bookkeeping ---------------------------------


@dataclasses.dataclass
class Replicas:
  """The replicas a run trains at once (one for a plain run), and what the loop keeps of them.

  State and results carry a leading replica axis [R, ...] when R > 1. In a sweep, a replica
  whose loss or parameters go non-finite is marked diverged (`diverged`, per replica the step
  it diverged at, 0 while it has not; `steps.check_finite` marks it) and the others train on;
  seeds alone share a fate: one non-finite replica stops the run.
  """
  items: list[Replica]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'Replicas':
    return cls(replicas(config))

  def __len__(self) -> int:
    return len(self.items)

  @property
  def names(self) -> list[str]:
    return [r.name for r in self.items]

  @property
  def sweeping(self) -> bool:
    """Several replicas of swept values (a one-value sweep is a single run)."""
    return len(self.items) > 1 and bool(self.items[0].hparams)

  def no_divergence(self) -> np.ndarray | None:
    """Per replica of a sweep, 0 (none diverged yet); None without a sweep."""
    return np.zeros(len(self.items), np.int32) if self.sweeping else None

  def pick(self, tree, i: int):
    """Replica i of a state or result (the tree itself for a single run)."""
    return tree if len(self.items) == 1 else jax.tree.map(lambda x: x[i], tree)

  @staticmethod
  def alive(diverged: np.ndarray | None) -> np.ndarray | None:
    return None if diverged is None else np.asarray(diverged) == 0

  def epoch_summary(self, record: dict, diverged: np.ndarray | None, headline: str) -> dict:
    """With several replicas: how many are alive and, for a sweep, the best of them by the
    headline test metric, and the step each diverged at."""
    if len(self.items) == 1:
      return {}
    alive = np.ones(len(self.items), bool) if diverged is None else diverged == 0
    out = dict(replicas_alive=int(alive.sum()))
    if not self.sweeping:
      return out
    scores = record[f'test_{headline}_per_replica']
    best = metrics.best_first(scores, headline, alive)[0]
    out['best'] = dict(replica=self.items[best].name, index=best,
                       **{f'test_{headline}': scores[best]})
    out['diverged_at_step'] = [int(d) if d else None for d in diverged]
    return out

  def final_summary(self, config, params_and_model_state, record: dict,
                    value_names: Sequence[str]) -> dict:
    """Each replica's fingerprint and, as a table, its values, seed and test results."""
    from mnist_jax import writers  # pylint: disable=g-import-not-at-top
    fingerprints = [writers.fingerprint(*self.pick(params_and_model_state, i))
                    for i in range(len(self.items))]
    diverged = record.get('diverged_at_step', [None] * len(self.items))
    table = [dict(replica=r.name, hparams=r.hparams, seed=r.seed,
                  **{f'test_{n}': record[f'test_{n}_per_replica'][i] for n in value_names},
                  param_fingerprint=fingerprints[i], diverged_at_step=diverged[i])
             for i, r in enumerate(self.items)]
    out = dict(param_fingerprint_per_replica=fingerprints, replicas=table,
               replicas_alive=record['replicas_alive'])
    if self.sweeping:
      out.update(best=record['best'], swept=swept(config))
    return out
