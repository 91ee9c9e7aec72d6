"""The optimizer: any optax optimizer and schedule by name, in a chain built from the config.

  clip_by_global_norm(config.grad_clip_norm)          if > 0
  add_decayed_weights(config.weight_decay, mask)      if > 0, for an optimizer without its own
  optax.<optimizer>(learning_rate=schedule, **config.optimizer_kwargs)
                                                      (weight_decay=..., mask=... if it has one)

`schedule` is `optax.<lr_schedule>` (its usual arguments default from the config, see
`_schedule_defaults`), after a linear warmup from 0 over `config.warmup_steps` steps if any.
Weight decay leaves biases and normalization scales alone (`decay_mask`). With every extra
off (the notebook's config) the optimizer is the bare `optax.<optimizer>`, exactly Keras's
RMSprop for configs/mlp.py.
"""

import inspect

import jax
import ml_collections
import numpy as np
import optax

from mnist_jax import sweeps


def decay_mask(params):
  """True for the leaves weight decay applies to: kernels; not biases or norm scales (1-D)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def accepts(make, argument: str) -> bool:
  return argument in inspect.signature(make).parameters


def _schedule_defaults(learning_rate: float, decay_steps: int) -> dict:
  return dict(value=learning_rate, init_value=learning_rate, peak_value=learning_rate,
              decay_steps=decay_steps, transition_steps=decay_steps)


def create_schedule(config: ml_collections.ConfigDict, total_steps: int,
                    learning_rate: float | None = None) -> optax.Schedule:
  """`optax.<lr_schedule>(**lr_schedule_kwargs)` after `warmup_steps` of linear warmup.

  Its missing arguments come from the config: the learning rate (or `learning_rate`) as its
  value/peak, and the steps after the warmup as its decay/transition steps.
  """
  lr = config.learning_rate if learning_rate is None else learning_rate
  warmup = config.warmup_steps
  make = getattr(optax, config.lr_schedule)
  kwargs = {k: v for k, v in _schedule_defaults(lr, max(total_steps - warmup, 1)).items()
            if accepts(make, k)}
  kwargs.update(config.lr_schedule_kwargs)
  schedule = make(**kwargs)
  if not warmup:
    return schedule
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), schedule], [warmup])


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int,
                     swept: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """The chain of the module docstring. With `swept` hyperparameters (a sweep, sweeps.py), the
  whole chain is built inside `optax.inject_hyperparams`, so their values are optimizer state
  that each replica sets to its own (`sweeps.assign`); the learning rate then scales the
  schedule built at rate 1."""
  swept = tuple(name for name in swept if name in sweeps.optimizer_hyperparameters(config))
  if not swept:
    return _chain(config, total_steps, {})
  factory = lambda **values: _chain(config, total_steps, values)
  # inject_hyperparams reads the hyperparameters' names from the factory's signature.
  factory.__signature__ = inspect.Signature(
      [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY) for name in swept])
  return optax.inject_hyperparams(factory)(**{name: float(sweeps.config_value(config, name))
                                              for name in swept})


def _chain(config: ml_collections.ConfigDict, total_steps: int,
           values: dict) -> optax.GradientTransformation:
  """The chain, with `values` (swept hyperparameters, traced) in place of the config's."""
  make = getattr(optax, config.optimizer)
  kwargs = dict(config.optimizer_kwargs)
  kwargs.update({k: v for k, v in values.items()
                 if accepts(make, k) and k not in ('learning_rate', 'weight_decay')})
  clip = values.get('grad_clip_norm', config.grad_clip_norm)
  decay = values.get('weight_decay', config.weight_decay)
  chain = []
  if 'grad_clip_norm' in values or config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(clip))
  if accepts(make, 'weight_decay'):  # Decoupled (AdamW-style), inside the optimizer.
    kwargs.update(weight_decay=decay, **({'mask': decay_mask} if accepts(make, 'mask') else {}))
  elif 'weight_decay' in values or config.weight_decay:  # Added to the gradient (SGD's L2).
    chain.append(optax.add_decayed_weights(decay, mask=decay_mask))
  if 'learning_rate' in values:
    unit, peak = create_schedule(config, total_steps, learning_rate=1.0), values['learning_rate']
    schedule = lambda count: peak * unit(count)
  else:
    schedule = create_schedule(config, total_steps)
  tx = make(learning_rate=schedule, **kwargs)
  return optax.chain(*chain, tx) if chain else tx


def warn_if_the_schedule_moved(config: ml_collections.ConfigDict, steps_per_epoch: int,
                               saved_epochs: int, step: int) -> None:
  """More (or fewer) epochs than the checkpoints' run: say so if the learning rate from here
  on differs from the one that run would have used (a schedule that spans the run)."""
  if saved_epochs == config.num_epochs:
    return
  old, new = (create_schedule(config, steps_per_epoch * e)
              for e in (saved_epochs, config.num_epochs))
  ahead = np.linspace(step, steps_per_epoch * min(saved_epochs, config.num_epochs),
                      16).astype(int)
  if not np.allclose([old(s) for s in ahead], [new(s) for s in ahead], rtol=1e-6, atol=0):
    print(f'warning: num_epochs is {config.num_epochs}, the checkpoints\' run had '
          f'{saved_epochs}: from step {step} on, the learning-rate schedule follows the new '
          f'length ({steps_per_epoch * config.num_epochs} steps).', flush=True)
