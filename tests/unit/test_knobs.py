"""The knobs: gradient accumulation (config.grad_accum_steps) and the EMA (config.ema_decay)."""

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp
import ml_collections

from mnist_jax import models
from mnist_jax import steps
from mnist_jax.models import mlp


def _state(name='mlp', ema_decay=0.0, **fields):
  model = models.build(ml_collections.ConfigDict(dict(name=name, **fields)), 10)
  return steps.create_train_state(jax.random.PRNGKey(0), model,
                                  optax.rmsprop(1e-3, decay=0.9, eps=1e-7), (28, 28, 1),
                                  ema_decay=ema_decay)


def _batches(n_steps=10, batch=128, padded_last=20):
  rng = np.random.default_rng(0)
  out = []
  for i in range(n_steps):
    mask = np.ones(batch, np.float32)
    if i == n_steps - 1:
      mask[-padded_last:] = 0  # An epoch's padded last batch: the padding never counts.
    out.append(dict(image=rng.integers(0, 256, (batch, 28, 28, 1)).astype(np.uint8),
                    label=rng.integers(0, 10, batch).astype(np.int32), mask=mask))
  return out


def _train(state, task, batches):
  for batch in batches:
    state, _ = steps.train_step_jit(state, batch, task=task)
  return state


@pytest.mark.parametrize('name, fields', [('mlp', dict(hidden_sizes=(32,))),
                                          ('cnn', dict(features=(4,), hidden_sizes=(8,)))])
def test_4_micro_batches_of_32_update_as_one_batch_of_128(name, fields):
  batches = _batches()
  whole = _train(_state(name, **fields), steps.Task(), batches)
  accumulated = _train(_state(name, **fields), steps.Task(grad_accum_steps=4), batches)
  assert int(accumulated.step) == 10
  for a, b in zip(jax.tree.leaves(accumulated.params), jax.tree.leaves(whole.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # Not a vacuous comparison: the parameters moved.
  moved = jax.tree.leaves(_state(name, **fields).params)[0]
  assert not np.allclose(jax.tree.leaves(whole.params)[0], moved)


def test_accumulated_metric_sums_are_the_whole_batch_sums():
  batch = _batches(1, padded_last=37)[0]
  _, whole = steps.train_step_jit(_state(hidden_sizes=(32,)), batch, task=steps.Task())
  _, accumulated = steps.train_step_jit(_state(hidden_sizes=(32,)), batch,
                                        task=steps.Task(grad_accum_steps=8))
  assert float(accumulated['count']) == float(whole['count']) == 128 - 37
  for key in ('loss', 'accuracy', 'loss_mean'):
    np.testing.assert_allclose(accumulated[key], whole[key], rtol=1e-5)


def test_batchnorm_sees_each_micro_batch_and_skips_an_empty_one():
  """cnn_bn: the statistics after 4 micro-batches are 4 momentum updates (not one); a batch
  with fewer real examples than micro-batches leaves the empty ones out (no NaN)."""
  fields = dict(features=(4,), hidden_sizes=(8,))
  batch = _batches(1, padded_last=126)[0]  # 2 real examples, 4 micro-batches.
  state, sums = steps.train_step_jit(_state('cnn_bn', **fields), batch,
                                     task=steps.Task(grad_accum_steps=4, model_takes_mask=True))
  leaves = jax.tree.leaves(state.model_state)
  assert leaves and all(np.all(np.isfinite(x)) for x in leaves)
  assert float(sums['count']) == 2


def test_ema_is_the_debiased_average_of_the_trained_weights():
  batches = _batches(5)
  decay = 0.8
  state = _state(hidden_sizes=(16,), ema_decay=decay)
  task = steps.Task(ema_decay=decay)
  history = []
  for batch in batches:
    state, _ = steps.train_step_jit(state, batch, task=task)
    history.append(jax.device_get(state.params))
  assert int(state.ema.count) == 5
  # optax.ema with debias: sum_t (1 - d) d^(n - t) p_t / (1 - d^n).
  weights = [(1 - decay) * decay ** (len(history) - 1 - t) for t in range(len(history))]
  expected = jax.tree.map(lambda *ps: sum(w * p for w, p in zip(weights, ps))
                          / (1 - decay ** len(history)), *history)
  averaged = steps.ema_weights(state, decay)
  for a, b in zip(jax.tree.leaves(averaged.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # After one step the debiased average is that step's weights: not dragged toward zero.
  one, _ = steps.train_step_jit(_state(hidden_sizes=(16,), ema_decay=decay), batches[0],
                                task=task)
  for a, b in zip(jax.tree.leaves(steps.ema_weights(one, decay).params),
                  jax.tree.leaves(one.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_the_fingerprint_covers_the_ema_and_is_unchanged_without_one():
  from mnist_jax import writers  # pylint: disable=g-import-not-at-top
  plain = _state(hidden_sizes=(16,))
  assert steps.fingerprinted(plain) == (plain.params, plain.model_state)
  with_ema = _state(hidden_sizes=(16,), ema_decay=0.9)
  moved = with_ema.replace(ema=with_ema.ema._replace(count=with_ema.ema.count + 1))
  assert (writers.fingerprint(*steps.fingerprinted(with_ema))
          != writers.fingerprint(*steps.fingerprinted(moved)))
  assert writers.fingerprint(*steps.fingerprinted(with_ema)) != writers.fingerprint(
      *steps.fingerprinted(plain))


# --- Mixed precision (config.compute_dtype) -----------------------------------------------------

from mnist_jax import mixed_precision  # pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_jax.infra import errors  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = {'mlp': dict(hidden_sizes=(32,)), 'cnn_bn': dict(features=(4,), hidden_sizes=(8,)),
        'cnn_nnx': dict(features=(4,), hidden_sizes=(8,))}


def _dtype_state(name, compute_dtype, loss_scale=False):
  model = models.build(ml_collections.ConfigDict(dict(name=name, **TINY[name])), 10,
                       compute_dtype)
  state = steps.create_train_state(jax.random.PRNGKey(0), model,
                                   optax.rmsprop(1e-3, decay=0.9, eps=1e-7), (28, 28, 1),
                                   loss_scale=loss_scale)
  return state, steps.Task(model_takes_mask=steps.takes_mask(model), compute_dtype=compute_dtype)


@pytest.mark.parametrize('name', sorted(TINY))
def test_bfloat16_computes_in_bfloat16_and_keeps_float32_state(name):
  (f32, _), (bf16, task) = _dtype_state(name, 'float32'), _dtype_state(name, 'bfloat16')
  for a, b in zip(jax.tree.leaves((f32.params, f32.model_state)),
                  jax.tree.leaves((bf16.params, bf16.model_state))):
    assert a.dtype == b.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)  # The same initial values: only the arithmetic differs.
  batch = _batches(1)[0]
  logits32, _ = steps._logits(task, f32, f32.params, batch['image'] / 255.0, batch['mask'],
                              train=False)
  logits16, _ = steps._logits(task, bf16, bf16.params, batch['image'] / 255.0, batch['mask'],
                              train=False)
  assert logits16.dtype == jnp.float32  # Cast back before the loss and metrics.
  diff = float(jnp.max(jnp.abs(logits32 - logits16)))
  assert 0 < diff < 0.1 * float(jnp.max(jnp.abs(logits32))) + 0.05  # bf16's rounding, no more.
  trained, sums = steps.train_step_jit(bf16, batch, task=task)
  for leaf in jax.tree.leaves((trained.params, trained.opt_state, trained.model_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32)
  assert np.isfinite(float(sums['loss_mean']))


def test_float16_skips_a_step_whose_gradients_overflow_and_backs_off():
  state, task = _dtype_state('mlp', 'float16', loss_scale=True)
  assert float(state.loss_scale.scale) == mixed_precision.INITIAL_SCALE
  batch = _batches(1)[0]
  before = jax.device_get((state.params, state.opt_state))  # (The step donates its state.)
  fine, sums = steps.train_step_jit(state, batch, task=task)
  assert int(fine.loss_scale.skipped_steps) == 0 and float(sums['count']) == 128 - 20
  assert not np.allclose(fine.params['Dense_0']['kernel'], before[0]['Dense_0']['kernel'])
  # A scale that float16's range cannot hold: the logits' cotangent overflows to inf.
  huge = _dtype_state('mlp', 'float16', loss_scale=True)[0].replace(
      loss_scale=mixed_precision.init(2.0 ** 40))
  skipped, sums = steps.train_step_jit(huge, batch, task=task)
  assert int(skipped.step) == 1  # Counted as a step, ...
  for a, b in zip(jax.tree.leaves((skipped.params, skipped.opt_state)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)  # ... but nothing moved.
  assert int(skipped.loss_scale.skipped_steps) == 1
  assert float(skipped.loss_scale.scale) == 2.0 ** 39
  assert float(sums['count']) == 0 and float(sums['loss_mean']) == 0  # Trained on nothing.


def test_the_loss_scale_grows_after_a_run_of_finite_steps():
  scale = mixed_precision.init(8.0)
  for _ in range(mixed_precision.GROWTH_INTERVAL - 1):
    scale = mixed_precision.LossScale(scale.scale, scale.finite_steps + 1, scale.skipped_steps)
  grown = mixed_precision.update(scale, jnp.asarray(True))
  assert float(grown.scale) == 16.0 and int(grown.finite_steps) == 0
  backed_off = mixed_precision.update(grown, jnp.asarray(False))
  assert float(backed_off.scale) == 8.0 and int(backed_off.skipped_steps) == 1


def test_float32_is_the_same_program_as_before():
  """compute_dtype='float32' passes dtype=float32 to every layer: the same arithmetic as the
  layers' own default (dtype None, inferred from the float32 inputs), bit for bit."""
  batch = _batches(1)[0]
  plain = models.create(models.module_class('mlp'), 10, hidden_sizes=(32,))  # No dtype given.
  typed = models.build(ml_collections.ConfigDict(dict(name='mlp', hidden_sizes=(32,))), 10,
                       'float32')
  assert typed.dtype == jnp.float32
  params = plain.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  images = batch['image'] / 255.0
  np.testing.assert_array_equal(plain.apply(params, images), typed.apply(params, images))


def test_config_model_dtype_is_refused_with_the_field_to_use():
  with pytest.raises(errors.ConfigError, match='compute_dtype'):
    models.check(ml_collections.ConfigDict(dict(name='mlp', dtype='bfloat16')))


def test_a_model_without_a_dtype_trains_in_float32_and_says_so_once(monkeypatch, capsys):
  """compute_dtype='bfloat16' for a Model that takes no `dtype`: built as it is, with one
  warning line that names the model and what to add; none for float32 or a model with one."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Untyped(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x):
      return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))

  model = models.create(Untyped, 10)
  monkeypatch.setattr(models, 'module_class', lambda name: Untyped)
  built = models.build(ml_collections.ConfigDict(dict(name='untyped')), 10, 'float32')
  assert built.num_classes == 10 and capsys.readouterr().out == ''  # float32: nothing said.
  assert models.warn_unless_typed(Untyped, 'untyped', 'bfloat16') is True
  assert models.warn_unless_typed(Untyped, 'untyped', 'float32') is False
  assert models.warn_unless_typed(mlp.Model, 'mlp', 'bfloat16') is False
  err = capsys.readouterr().out.strip().splitlines()
  assert err == ["warning: config.compute_dtype='bfloat16', but the model 'untyped' takes no "
                 '`dtype` argument: it computes in float32. Give its Model a `dtype` field and '
                 'pass it to its layers (docs/knobs.md).']
  assert model.apply(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4))),
                     jnp.ones((2, 4))).dtype == jnp.float32
