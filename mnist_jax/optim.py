"""Optimizers and learning-rate schedules by name, straight from optax.

`config.optimizer = 'adamw'` with `config.optimizer_kwargs = dict(weight_decay=1e-4)` builds
`optax.adamw(learning_rate=schedule, weight_decay=1e-4)`; `config.lr_schedule` names an optax
schedule whose usual arguments default from the config (see `_SCHEDULE_DEFAULTS`).
"""

import inspect

import ml_collections
import optax


def _schedule_defaults(config: ml_collections.ConfigDict, total_steps: int) -> dict:
  lr = config.learning_rate
  return dict(value=lr, init_value=lr, peak_value=lr, decay_steps=total_steps,
              transition_steps=total_steps)


def create_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """`optax.<lr_schedule>(**lr_schedule_kwargs)`, missing arguments filled from the config."""
  make = getattr(optax, config.lr_schedule)
  accepted = inspect.signature(make).parameters
  kwargs = {k: v for k, v in _schedule_defaults(config, total_steps).items() if k in accepted}
  kwargs.update(config.lr_schedule_kwargs)
  return make(**kwargs)


def create_optimizer(config: ml_collections.ConfigDict,
                     total_steps: int) -> optax.GradientTransformation:
  make = getattr(optax, config.optimizer)
  return make(learning_rate=create_schedule(config, total_steps), **config.optimizer_kwargs)
