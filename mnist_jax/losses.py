"""Losses by name: `config.loss = 'softmax_cross_entropy'`, arguments in `config.loss_kwargs`.

A loss is a per-example function `(logits_BxC, labels_B, **kwargs) -> loss_B`. The train step
averages it over the batch's real examples (padding never counts) and reports it as the
metric 'loss'. Adding a loss means adding a function here, decorated with `@loss`.
"""

from collections.abc import Callable
import numbers

import jax
import jax.numpy as jnp
import optax

LOSSES: dict[str, Callable[..., jax.Array]] = {}


def loss(fn):
  """Registers `fn` under its name, for `config.loss`."""
  LOSSES[fn.__name__] = fn
  return fn


@loss
def softmax_cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
  """Cross-entropy of softmax(logits) against the labels, optionally smoothed.

  With `label_smoothing` a, the target puts 1 - a on the label and spreads a evenly over all
  classes (optax.smooth_labels). a = 0 (a Python number) computes exactly the notebook's loss,
  from integer labels; a traced value (a swept hyperparameter) always takes the smoothed path.
  """
  if isinstance(label_smoothing, numbers.Number) and label_smoothing == 0:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
  targets_BxC = optax.smooth_labels(jax.nn.one_hot(labels_B, logits_BxC.shape[-1]),
                                    label_smoothing)
  return optax.softmax_cross_entropy(logits_BxC, targets_BxC)


@loss
def sigmoid_cross_entropy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
  """One binary cross-entropy per class (one-vs-rest on one-hot targets), summed over classes."""
  targets_BxC = jax.nn.one_hot(labels_B, logits_BxC.shape[-1])
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits_BxC, targets_BxC), axis=-1)


def get(name: str) -> Callable[..., jax.Array]:
  return LOSSES[name]
