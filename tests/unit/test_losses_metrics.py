"""Losses and metrics by name, and how the step uses them (and augmentation).

Losses and metrics are per-example functions; the step sums them over the real examples and
`metrics.summarize` divides once. Values are checked against numpy by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mnist_jax import losses
from mnist_jax import metrics
from mnist_jax import models
from mnist_jax import optim
from mnist_jax import steps

LOGITS = np.array([[2.0, 1.0, 0.5, -1.0, 0.0, 0.1],
                   [0.0, 3.0, 0.2, 0.1, 0.3, 0.4],
                   [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
LABELS = np.array([0, 4, 2], np.int32)


def log_softmax(x):
  x = x.astype(np.float64)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cross_entropy_is_the_notebook_loss():
  expected = -log_softmax(LOGITS)[np.arange(3), LABELS]
  np.testing.assert_allclose(losses.softmax_cross_entropy(LOGITS, LABELS), expected, rtol=1e-6)


@pytest.mark.parametrize('smoothing', [0.1, 0.3])
def test_label_smoothing_by_hand(smoothing):
  """Target: 1 - a + a/C on the label, a/C elsewhere."""
  num_classes = LOGITS.shape[1]
  targets = np.full(LOGITS.shape, smoothing / num_classes)
  targets[np.arange(3), LABELS] += 1 - smoothing
  expected = -(targets * log_softmax(LOGITS)).sum(-1)
  got = losses.softmax_cross_entropy(LOGITS, LABELS, label_smoothing=smoothing)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert not np.allclose(got, losses.softmax_cross_entropy(LOGITS, LABELS), rtol=1e-3)


def test_a_traced_smoothing_of_0_equals_the_integer_label_path():
  """A swept (traced) label_smoothing takes the smoothed path: at 0 it gives the same loss."""
  traced = jax.jit(lambda a: losses.softmax_cross_entropy(LOGITS, LABELS, a))(0.0)
  np.testing.assert_allclose(traced, losses.softmax_cross_entropy(LOGITS, LABELS), rtol=1e-6)


def test_sigmoid_cross_entropy_by_hand():
  p = 1 / (1 + np.exp(-LOGITS.astype(np.float64)))
  onehot = np.eye(LOGITS.shape[1])[LABELS]
  expected = -(onehot * np.log(p) + (1 - onehot) * np.log(1 - p)).sum(-1)
  np.testing.assert_allclose(losses.sigmoid_cross_entropy(LOGITS, LABELS), expected, rtol=1e-5)


def test_accuracy_and_top_k_by_hand():
  # Row 0: label 0 has the largest logit. Row 1: label 4 (0.3) has 3.0 and 0.4 ahead of it.
  # Row 2: all tied; argmax picks class 0, and ties rank lower classes first: label 2 is 3rd.
  np.testing.assert_array_equal(metrics.accuracy(LOGITS, LABELS), [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(metrics.top_k_accuracy(LOGITS, LABELS, 1), [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(metrics.top_k_accuracy(LOGITS, LABELS, 2), [1.0, 0.0, 0.0])
  np.testing.assert_array_equal(metrics.top_k_accuracy(LOGITS, LABELS, 3), [1.0, 1.0, 1.0])
  np.testing.assert_array_equal(metrics.top5_accuracy(LOGITS, LABELS), [1.0, 1.0, 1.0])
  low = np.array([[0.0, 5, 4, 3, 2, 1]], np.float32)  # Label 0 ranks 6th.
  np.testing.assert_array_equal(metrics.top5_accuracy(low, np.array([0])), [0.0])
  # k=1 is the accuracy, ties included, on random logits with many ties.
  rounded = np.round(np.random.default_rng(0).normal(size=(500, 6)))
  labels = np.random.default_rng(1).integers(0, 6, 500)
  np.testing.assert_array_equal(metrics.top_k_accuracy(rounded, labels, 1),
                                metrics.accuracy(rounded, labels))


def test_masked_sums_count_real_examples_only():
  values = dict(loss=jnp.array([1.0, 2.0, jnp.nan]), accuracy=jnp.array([1.0, 0.0, 1.0]))
  sums = metrics.masked_sums(values, jnp.array([1.0, 1.0, 0.0]))
  assert {k: float(v) for k, v in sums.items()} == dict(loss=3.0, accuracy=1.0, count=2.0)


def test_summarize_divides_once_and_spreads_replicas():
  sums = dict(loss=np.array([3.0, 6.0]), accuracy=np.array([2.0, 1.0]), count=np.array([4.0, 4.0]))
  summary = metrics.summarize(sums, 'test_')
  assert summary['test_loss'] == pytest.approx(1.125)
  assert summary['test_accuracy_per_replica'] == [0.5, 0.25]
  assert summary['test_accuracy_std'] == pytest.approx(0.125)


# --- In the step -------------------------------------------------------------------------------

IMAGE_SHAPE = (4, 4, 1)


def state_and_batch(config_overrides=None, seed=0):
  from conftest import load_config_module  # pylint: disable=g-import-not-at-top
  config = load_config_module().get_config()
  config.model.hidden_sizes = (8,)
  for key, value in (config_overrides or {}).items():
    config[key] = value
  model = models.build(config.model, 6)
  task = steps.Task.from_config(config, model)
  state = steps.create_train_state(jax.random.PRNGKey(seed), model,
                                   optim.create_optimizer(config, 10), IMAGE_SHAPE)
  rng = np.random.default_rng(0)
  batch = dict(image=rng.integers(0, 256, (6, *IMAGE_SHAPE), dtype=np.uint8),
               label=rng.integers(0, 6, 6).astype(np.int32),
               mask=np.array([1, 1, 1, 1, 0, 0], np.float32))
  return task, state, batch


def test_step_reports_every_configured_metric_over_real_examples():
  task, state, batch = state_and_batch(dict(metrics=('accuracy', 'top5_accuracy')))
  sums = steps.eval_step_jit(state, batch, task)
  assert sorted(sums) == ['accuracy', 'count', 'loss', 'top5_accuracy']
  logits = state.apply_fn({'params': state.params}, batch['image'][:4] / np.float32(255))
  assert float(sums['top5_accuracy']) == float(metrics.top5_accuracy(logits, batch['label'][:4])
                                               .sum())
  assert float(sums['count']) == 4.0


def test_step_minimizes_the_configured_loss():
  """With SGD(lr=1) the update is minus the gradient of the mean smoothed loss."""
  task, state, batch = state_and_batch(dict(loss_kwargs=dict(label_smoothing=0.2)))
  state = state.replace(tx=optax.sgd(1.0), opt_state=optax.sgd(1.0).init(state.params))
  params = jax.tree.map(np.array, state.params)
  real = {k: v[:4] for k, v in batch.items()}

  def mean_loss(p):
    logits = state.apply_fn({'params': p}, real['image'] / np.float32(255))
    return losses.softmax_cross_entropy(logits, real['label'], label_smoothing=0.2).mean()

  grads = jax.grad(mean_loss)(params)
  new_state, sums = steps.train_step_jit(state, batch, task)
  jax.tree.map(lambda n, p, g: np.testing.assert_allclose(n, p - g, rtol=1e-5, atol=1e-7),
               new_state.params, params, grads)
  assert float(sums['loss']) == pytest.approx(4 * float(mean_loss(params)), rel=1e-5)


def test_augmentation_draws_from_the_step_in_training_only():
  """The augmented step is reproducible, draws anew at every step, and evaluation never
  augments."""
  plain, state, batch = state_and_batch()
  task, _, _ = state_and_batch(dict(augment='shift(1)|erase(1.0)'))
  fresh = lambda: state_and_batch()[1]  # The jitted step donates its state: a new one each.
  run = lambda t, s: np.concatenate([np.ravel(x) for x in jax.tree.leaves(
      jax.device_get(steps.train_step_jit(s, batch, t)[0].params))])
  augmented = run(task, fresh())
  np.testing.assert_array_equal(augmented, run(task, fresh()))  # Reproducible.
  assert not np.array_equal(augmented, run(plain, fresh()))  # It augments.
  # RMSprop at a constant rate: the step number alone changes nothing...
  np.testing.assert_array_equal(run(plain, fresh()), run(plain, fresh().replace(step=5)))
  # ...but the augmentation draws from (rng, step).
  assert not np.array_equal(augmented, run(task, fresh().replace(step=5)))
  evaluate = lambda t: {k: float(v) for k, v in steps.eval_step_jit(state, batch, t).items()}
  assert evaluate(task) == evaluate(plain)


def test_tasks_are_hashable_and_equal_by_value():
  """The task is a static argument of the jitted functions: equal configs, one program."""
  a, _, _ = state_and_batch(dict(metrics=('accuracy', 'top5_accuracy')))
  b, _, _ = state_and_batch(dict(metrics=('accuracy', 'top5_accuracy')))
  assert a == b and hash(a) == hash(b)
  assert a != state_and_batch()[0]
