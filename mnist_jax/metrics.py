"""Metrics by name: per-example functions, summed under the padding mask, divided once.

`config.metrics = ('accuracy', 'top5_accuracy')` names functions registered here with
`@metric`. Each maps `(logits_BxC, labels_B)` to one value per example, `[B]`. The steps sum
every metric (and the loss) over the real examples of each batch (`masked_sums`), the sums
add up over an epoch, and `summarize` divides by the count of examples once, at the end.

Adding a metric means adding a function here and its name to `config.metrics`: the epoch
line, metrics.jsonl, TensorBoard, summary.json and the report all follow from that.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

METRICS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {}
COUNT = 'count'  # The number of real examples behind a set of sums.


def metric(fn):
  """Registers `fn` under its name, for `config.metrics`."""
  METRICS[fn.__name__] = fn
  return fn


@metric
def accuracy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
  return (jnp.argmax(logits_BxC, axis=-1) == labels_B).astype(jnp.float32)


def top_k_accuracy(logits_BxC: jax.Array, labels_B: jax.Array, k: int) -> jax.Array:
  """1 where the label is among the k largest logits.

  Ties rank the lower class first, as argmax does, so k=1 is exactly `accuracy`.
  """
  label_logit_Bx1 = jnp.take_along_axis(logits_BxC, labels_B[:, None], axis=-1)
  classes_1xC = jnp.arange(logits_BxC.shape[-1])[None, :]
  ahead_BxC = (logits_BxC > label_logit_Bx1) | ((logits_BxC == label_logit_Bx1)
                                                & (classes_1xC < labels_B[:, None]))
  return (jnp.sum(ahead_BxC, axis=-1) < k).astype(jnp.float32)


@metric
def top5_accuracy(logits_BxC: jax.Array, labels_B: jax.Array) -> jax.Array:
  return top_k_accuracy(logits_BxC, labels_B, 5)


def masked_sums(values: Mapping[str, jax.Array], mask_B: jax.Array) -> dict[str, jax.Array]:
  """Each per-example value [B] summed over the real examples, plus their count."""
  real_B = mask_B > 0  # `where`, not a product: padding can never leak a NaN into the sums.
  sums = {k: jnp.sum(jnp.where(real_B, v, 0.0)) for k, v in values.items()}
  sums[COUNT] = jnp.sum(mask_B)
  return sums


def zero_sums(keys) -> dict[str, jax.Array]:
  return {k: jnp.zeros(()) for k in (*keys, COUNT)}


def add_sums(a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  return {k: a[k] + b[k] for k in a}


def summarize(sums: Mapping[str, Any], prefix: str = '',
              alive: np.ndarray | None = None) -> dict[str, Any]:
  """Means over the real examples, e.g. {'test_loss': ..., 'test_accuracy': ...}.

  Sums with a replica axis [N] give the mean over replicas (those `alive`, if given: a
  diverged replica of a sweep does not count), plus each replica's value (`*_per_replica`)
  and the standard deviation (`*_std`).
  """
  sums = jax.device_get(sums)
  count = np.maximum(np.asarray(sums[COUNT], np.float64), 1.0)
  values = {k: np.asarray(v) / count for k, v in sums.items() if k != COUNT}
  if not count.ndim:
    return {f'{prefix}{k}': float(v) for k, v in values.items()}
  alive = np.ones(count.shape, bool) if alive is None else np.asarray(alive, bool)
  summary = {}
  for k, v in values.items():
    summary[f'{prefix}{k}'] = float(np.mean(v[alive])) if alive.any() else float('nan')
  for k, v in values.items():
    summary[f'{prefix}{k}_per_replica'] = [float(x) for x in v]
    summary[f'{prefix}{k}_std'] = float(np.std(v[alive])) if alive.any() else float('nan')
  return summary


def headline(value_names: Sequence[str]) -> str:
  """The value a run reports first (its last line, a report's title, a sweep's best): the
  first metric after the loss, else the loss."""
  return value_names[1] if len(value_names) > 1 else value_names[0]


def best_first(scores: Sequence[float], name: str,
               alive: Sequence[bool] | None = None) -> list[int]:
  """Indices of `scores` (values of the metric `name`), best first: the highest, or the
  lowest for a loss; those not `alive` (diverged) last, in their order."""
  alive = [True] * len(scores) if alive is None else list(alive)
  sign = 1.0 if name == 'loss' else -1.0
  return sorted(range(len(scores)), key=lambda i: (not alive[i], sign * float(scores[i])
                                                   if alive[i] else 0.0))
