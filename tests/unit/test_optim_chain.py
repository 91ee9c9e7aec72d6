"""Optimizers and schedules by name, and the chain built around them from the config:
gradient clipping, weight decay that leaves biases and norm scales alone, linear warmup."""

import json
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from mnist_jax import optim
from mnist_jax import train
from mnist_jax import writers

NUM_EXAMPLES = 24
BATCH_SIZE = 8
STEPS_PER_EPOCH = NUM_EXAMPLES // BATCH_SIZE

# A kernel (2-D, decayed) and a bias (1-D, never decayed).
PARAMS = {'Dense_0': {'kernel': jnp.array([[1.0, -2.0], [4.0, 0.5]]),
                      'bias': jnp.array([3.0, -1.0])}}


def run_steps(tx, grads_list, params=PARAMS):
  state = tx.init(params)
  for grads in grads_list:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params


def zeros_like(params, n=1):
  return [jax.tree.map(jnp.zeros_like, params)] * n


def test_notebook_config_is_the_bare_optimizer(mlp_config):
  """No extras: exactly optax.rmsprop (not a chain), so the notebook's state is unchanged."""
  tx = optim.create_optimizer(mlp_config, total_steps=10)
  reference = optax.rmsprop(optax.constant_schedule(1e-3), decay=0.9, eps=1e-7)
  assert jax.tree.structure(tx.init(PARAMS)) == jax.tree.structure(reference.init(PARAMS))
  grads = [jax.tree.map(lambda p: 0.1 * p + 0.01, PARAMS)] * 3
  jax.tree.map(np.testing.assert_array_equal, run_steps(tx, grads), run_steps(reference, grads))


def test_decay_mask_is_kernels_only():
  assert optim.decay_mask(PARAMS) == {'Dense_0': {'kernel': True, 'bias': False}}


def test_adamw_decays_kernels_not_biases(mlp_config):
  """adamw on a zero gradient only decays: kernel <- kernel * (1 - lr * wd); the bias stays."""
  mlp_config.optimizer = 'adamw'
  mlp_config.optimizer_kwargs = ml_collections.ConfigDict()
  mlp_config.learning_rate = 0.1
  mlp_config.weight_decay = 0.5
  mlp_config.lr_schedule = 'cosine_decay_schedule'
  tx = optim.create_optimizer(mlp_config, total_steps=4)
  params, kernel = PARAMS, np.asarray(PARAMS['Dense_0']['kernel'])
  state = tx.init(params)
  for step in range(4):
    updates, state = tx.update(zeros_like(params)[0], state, params)
    params = optax.apply_updates(params, updates)
    lr = 0.1 * 0.5 * (1 + np.cos(np.pi * step / 4))  # The schedule at this step.
    kernel = kernel * (1 - lr * 0.5)
    np.testing.assert_allclose(params['Dense_0']['kernel'], kernel, rtol=1e-6)
  np.testing.assert_array_equal(params['Dense_0']['bias'], PARAMS['Dense_0']['bias'])


def test_sgd_weight_decay_is_l2_on_kernels(mlp_config):
  """sgd has no weight_decay: wd * kernel joins the gradient (PyTorch's SGD weight_decay)."""
  mlp_config.optimizer = 'sgd'
  mlp_config.optimizer_kwargs = ml_collections.ConfigDict()
  mlp_config.learning_rate = 0.1
  mlp_config.weight_decay = 0.01
  got = run_steps(optim.create_optimizer(mlp_config, total_steps=10), zeros_like(PARAMS))
  np.testing.assert_allclose(got['Dense_0']['kernel'],
                             PARAMS['Dense_0']['kernel'] * (1 - 0.1 * 0.01), rtol=1e-6)
  np.testing.assert_array_equal(got['Dense_0']['bias'], PARAMS['Dense_0']['bias'])


def test_gradients_are_clipped_to_the_global_norm(mlp_config):
  """sgd(lr=1): the step is minus the gradient, scaled to global norm 1 when larger."""
  mlp_config.optimizer = 'sgd'
  mlp_config.optimizer_kwargs = ml_collections.ConfigDict()
  mlp_config.learning_rate = 1.0
  mlp_config.grad_clip_norm = 1.0
  tx = optim.create_optimizer(mlp_config, total_steps=10)
  big = {'Dense_0': {'kernel': jnp.full((2, 2), 3.0), 'bias': jnp.array([4.0, 0.0])}}  # Norm 7.2.
  norm = float(optax.tree.norm(big))
  got = run_steps(tx, [big])
  np.testing.assert_allclose(got['Dense_0']['kernel'],
                             PARAMS['Dense_0']['kernel'] - 3.0 / norm, rtol=1e-6)
  small = jax.tree.map(lambda g: g / 100, big)  # Norm 0.072: not clipped.
  got = run_steps(tx, [small])
  np.testing.assert_allclose(got['Dense_0']['bias'], PARAMS['Dense_0']['bias'] - jnp.array([0.04, 0.0]),
                             rtol=1e-6)


def test_warmup_then_the_schedule_over_the_remaining_steps(mlp_config):
  mlp_config.learning_rate = 2e-3
  mlp_config.lr_schedule = 'cosine_decay_schedule'
  mlp_config.warmup_steps = 10
  schedule = optim.create_schedule(mlp_config, total_steps=50)
  np.testing.assert_allclose([schedule(s) for s in (0, 5, 10)], [0.0, 1e-3, 2e-3], rtol=1e-6)
  cosine = optax.cosine_decay_schedule(2e-3, decay_steps=40)
  np.testing.assert_allclose([schedule(s) for s in range(10, 51)],
                             [cosine(s) for s in range(41)], rtol=1e-6)


def test_schedule_decay_steps_default_to_total_steps(mlp_config):
  mlp_config.learning_rate = 2e-3
  mlp_config.lr_schedule = 'cosine_decay_schedule'
  total = 30
  schedule = optim.create_schedule(mlp_config, total_steps=total)
  assert float(schedule(0)) == pytest.approx(2e-3, rel=1e-6)
  assert float(schedule(total // 2)) == pytest.approx(1e-3, rel=1e-5)  # Half-way down the cosine.
  assert float(schedule(total)) == pytest.approx(0.0, abs=1e-9)
  assert float(schedule(total + 10)) == pytest.approx(0.0, abs=1e-9)  # Stays at the end value.
  np.testing.assert_allclose(
      [schedule(s) for s in range(total + 1)],
      [optax.cosine_decay_schedule(2e-3, decay_steps=total)(s) for s in range(total + 1)])


def test_schedule_kwargs_override_the_defaults(mlp_config):
  mlp_config.lr_schedule = 'cosine_decay_schedule'
  mlp_config.lr_schedule_kwargs = dict(alpha=0.1)  # End at 10% of the peak instead of 0.
  schedule = optim.create_schedule(mlp_config, total_steps=10)
  assert float(schedule(10)) == pytest.approx(1e-4, rel=1e-5)


def test_whole_chain_trains_on_mock_data(tmp_path, mlp_config, monkeypatch):
  """adamw + weight decay + clipping + warmup + cosine decay, end to end; the schedule spans
  the run's steps, and the config's fields are recorded."""
  config = mlp_config
  config.model.hidden_sizes = (8,)
  config.num_epochs = 2
  config.batch_size = BATCH_SIZE
  config.eval_batch_size = 12
  config.write_report = False
  config.write_tensorboard = False
  config.optimizer = 'adamw'
  config.optimizer_kwargs = ml_collections.ConfigDict(dict(b1=0.8))
  config.weight_decay = 0.05
  config.grad_clip_norm = 1.0
  config.warmup_steps = 2
  config.lr_schedule = 'cosine_decay_schedule'
  calls = []
  original = optim.create_schedule

  def create_schedule(config, total_steps):
    calls.append(total_steps)
    return original(config, total_steps)

  monkeypatch.setattr(optim, 'create_schedule', create_schedule)
  workdir = tmp_path / 'workdir'
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    summary = train.train_and_evaluate(config, str(workdir))
  assert calls == [2 * STEPS_PER_EPOCH]  # The schedule spans the whole run.
  assert summary['steps'] == 2 * STEPS_PER_EPOCH
  assert np.isfinite(summary['test_loss'])
  written = json.loads((workdir / 'config.json').read_text())
  assert written['optimizer_kwargs'] == {'b1': 0.8}
  assert (written['weight_decay'], written['grad_clip_norm'], written['warmup_steps']) == (
      0.05, 1.0, 2)
