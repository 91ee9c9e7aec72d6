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
import optax


def decay_mask(params):
  """True for the leaves weight decay applies to: kernels; not biases or norm scales (1-D)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def accepts(make, argument: str) -> bool:
  return argument in inspect.signature(make).parameters


def _schedule_defaults(config: ml_collections.ConfigDict, decay_steps: int) -> dict:
  lr = config.learning_rate
  return dict(value=lr, init_value=lr, peak_value=lr, decay_steps=decay_steps,
              transition_steps=decay_steps)


def create_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """`optax.<lr_schedule>(**lr_schedule_kwargs)` after `warmup_steps` of linear warmup.

  Its missing arguments come from the config: the learning rate as its value/peak, and the
  steps after the warmup as its decay/transition steps.
  """
  warmup = config.warmup_steps
  make = getattr(optax, config.lr_schedule)
  kwargs = {k: v for k, v in _schedule_defaults(config, max(total_steps - warmup, 1)).items()
            if accepts(make, k)}
  kwargs.update(config.lr_schedule_kwargs)
  schedule = make(**kwargs)
  if not warmup:
    return schedule
  return optax.join_schedules(
      [optax.linear_schedule(0.0, config.learning_rate, warmup), schedule], [warmup])


def create_optimizer(config: ml_collections.ConfigDict,
                     total_steps: int) -> optax.GradientTransformation:
  make = getattr(optax, config.optimizer)
  kwargs = dict(config.optimizer_kwargs)
  chain = []
  if config.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if accepts(make, 'weight_decay'):  # Decoupled (AdamW-style), inside the optimizer.
    kwargs.update(weight_decay=config.weight_decay,
                  **({'mask': decay_mask} if accepts(make, 'mask') else {}))
  elif config.weight_decay:  # Added to the gradient (SGD-style L2), before the optimizer.
    chain.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
  tx = make(learning_rate=create_schedule(config, total_steps), **kwargs)
  return optax.chain(*chain, tx) if chain else tx
