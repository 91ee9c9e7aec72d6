"""A model with mutable state (BatchNorm's batch_stats, in configs/cnn_bn.py's model).

Training updates the statistics over the real examples only (the padding of a last batch never
counts), evaluation uses the stored ones, the NaN/Inf check and the fingerprint cover them,
and a run checkpoints, resumes and evaluates them (`--mode=evaluate`), alone or as replicas.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from conftest import REPO_ROOT
from conftest import load_config_module
from mnist_jax import models
from mnist_jax import optim
from mnist_jax import steps
from mnist_jax import train
from mnist_jax import writers

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
NUM_EXAMPLES = 20  # Mock data: 28x28 images.
BATCH_SIZE = 8  # 3 steps an epoch, the last with 4 real examples.


def cnn_bn_config():
  config = load_config_module(REPO_ROOT / 'configs' / 'cnn_bn.py').get_config()
  config.cache_dir = 'none'
  config.download = False
  config.model.features = (4,)
  config.model.hidden_sizes = (8,)
  config.batch_size = BATCH_SIZE
  config.eval_batch_size = 10
  config.num_epochs = 2
  config.warmup_steps = 2
  config.steps_per_call = 2
  config.scan_unroll = 1
  config.write_report = False
  config.write_tensorboard = False
  return config


@pytest.fixture(scope='module')
def tiny():
  config = cnn_bn_config()
  config.augment = ''  # The statistics below are compared with a plain forward pass.
  model = models.build(config.model, NUM_CLASSES)
  task = steps.Task.from_config(config, model)
  tx = optim.create_optimizer(config, total_steps=10)
  return dict(config=config, model=model, task=task, tx=tx)


def new_state(tiny, seed=0):
  return steps.create_train_state(jax.random.PRNGKey(seed), tiny['model'], tiny['tx'],
                                  IMAGE_SHAPE)


def batch(num_real: int, size: int = 8, seed: int = 0):
  """`num_real` examples, then padding: garbage images and labels under mask 0."""
  rng = np.random.default_rng(seed)
  return dict(image=rng.integers(0, 256, (size, *IMAGE_SHAPE), dtype=np.uint8),
              label=rng.integers(0, NUM_CLASSES, size).astype(np.int32),
              mask=(np.arange(size) < num_real).astype(np.float32))


def host(tree):
  return jax.tree.map(np.array, jax.device_get(tree))


def test_state_holds_the_batch_stats_apart_from_the_params(tiny):
  state = new_state(tiny)
  assert list(state.model_state) == ['batch_stats']
  assert 'batch_stats' not in state.params
  stats = host(state.model_state['batch_stats'])
  assert sorted(stats) == ['BatchNorm_0', 'BatchNorm_1']
  np.testing.assert_array_equal(stats['BatchNorm_0']['mean'], np.zeros(4))
  np.testing.assert_array_equal(stats['BatchNorm_0']['var'], np.ones(4))
  assert tiny['task'].model_takes_mask


def test_training_updates_the_statistics_from_the_real_examples_only(tiny):
  """After a step on 5 real + 3 padded examples, the running statistics are exactly those of
  a plain Flax training forward pass over the 5 real examples alone."""
  padded = batch(num_real=5)
  state = new_state(tiny)
  before = host(state)
  after, _ = steps.train_step_jit(state, padded, tiny['task'])
  real = {k: v[:5] for k, v in padded.items()}
  _, expected = tiny['model'].apply(
      {'params': before.params, **before.model_state}, real['image'] / np.float32(255),
      train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(0)})
  got = host(after.model_state)
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7), got,
               host(expected))
  # The test can fail: the padding, had it counted, would have moved the statistics.
  _, unmasked = tiny['model'].apply(
      {'params': before.params, **before.model_state}, padded['image'] / np.float32(255),
      train=True, mutable=['batch_stats'], rngs={'dropout': jax.random.PRNGKey(0)})
  assert not np.allclose(got['batch_stats']['BatchNorm_0']['mean'],
                         host(unmasked)['batch_stats']['BatchNorm_0']['mean'], rtol=1e-3)


def test_evaluation_uses_the_stored_statistics(tiny):
  """With running averages, an example's logits do not depend on the rest of its batch."""
  state, _ = steps.train_step_jit(new_state(tiny), batch(8), tiny['task'])
  whole = steps.predict(state, batch(8, seed=3)['image'], batch_size=8, task=tiny['task'])
  one_by_one = np.concatenate([
      steps.predict(state, batch(8, seed=3)['image'][i:i + 1], batch_size=1, task=tiny['task'])
      for i in range(8)])
  np.testing.assert_allclose(whole, one_by_one, rtol=1e-5, atol=1e-6)
  # ...and they are the trained ones: fresh statistics (mean 0, var 1) give other outputs.
  fresh = state.replace(model_state=new_state(tiny).model_state)
  assert not np.allclose(steps.predict(fresh, batch(8, seed=3)['image'], 8, tiny['task']), whole,
                         atol=1e-4)


def test_empty_steps_leave_the_statistics_alone(tiny):
  state, _ = steps.train_step_jit(new_state(tiny), batch(8), tiny['task'])
  before = host(state)
  chunk = {k: np.stack([v]) for k, v in batch(0).items()}  # One step, all padding.
  after = steps.make_chunk_fns(steps.stacked).train(state, None, chunk, task=tiny['task'])
  jax.tree.map(np.testing.assert_array_equal, host(after[0].model_state), before.model_state)


def test_non_finite_statistics_are_caught_even_with_a_finite_loss(tiny):
  """Training normalizes with the batch's own statistics, so a NaN running mean leaves the
  loss finite; the check after the call must still see it."""
  state = new_state(tiny)
  stats = state.model_state['batch_stats']
  poisoned = dict(stats, BatchNorm_0=dict(stats['BatchNorm_0'],
                                          mean=jnp.full((4,), jnp.nan)))
  state = state.replace(model_state={'batch_stats': poisoned})
  chunk = {k: np.stack([v]) for k, v in batch(8).items()}
  _, _, per_step = steps.make_chunk_fns(steps.stacked).train(
      state, None, chunk, task=tiny['task'])
  assert np.isfinite(np.asarray(per_step['loss'])).all()
  assert not bool(per_step['params_finite'])


def test_fingerprint_covers_the_model_state(tiny):
  state = new_state(tiny)
  base = writers.fingerprint(state.params, state.model_state)
  stats = host(state.model_state)
  stats['batch_stats']['BatchNorm_1']['var'][0] += 1e-6
  assert writers.fingerprint(state.params, stats) != base
  assert writers.fingerprint(state.params, state.model_state) == base
  # A model without state hashes its parameters exactly as before (the notebook's fingerprint).
  assert writers.fingerprint(state.params, {}) == writers.fingerprint(state.params)


class _BatchNormWithoutMask(nn.Module):
  """docs/extending.md's contract without the optional mask: the statistics include padding."""
  num_classes: int

  @nn.compact
  def __call__(self, images_BxHxWxC, train=False):
    x = nn.BatchNorm(use_running_average=not train)(images_BxHxWxC.reshape(
        (images_BxHxWxC.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


def test_a_model_without_mask_gets_none():
  model = _BatchNormWithoutMask(NUM_CLASSES)
  assert not steps.takes_mask(model)
  task = steps.Task(model_takes_mask=steps.takes_mask(model))
  state = steps.create_train_state(jax.random.PRNGKey(0), model, optax.sgd(0.1),
                                   IMAGE_SHAPE)
  new_state_, sums = steps.train_step_jit(state, batch(8), task)
  assert float(sums['count']) == 8.0
  assert 'batch_stats' in new_state_.model_state


# --- End to end on mock data -----------------------------------------------------------------

def run(config, workdir):
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    return train.train_and_evaluate(config, str(workdir))


def test_trains_checkpoints_and_evaluates_the_checkpoint(tmp_path):
  config = cnn_bn_config()
  summary = run(config, tmp_path / 'w')
  assert summary['steps'] == 2 * 3
  assert np.isfinite(summary['test_loss'])
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    evaluated = train.evaluate_checkpoint(config, str(tmp_path / 'w'))
  assert evaluated['param_fingerprint'] == summary['param_fingerprint']
  assert evaluated['test_loss'] == pytest.approx(summary['test_loss'], rel=1e-6)
  assert evaluated['test_accuracy'] == summary['test_accuracy']
  # The checkpoint holds the statistics (a second run in the workdir resumes, finished).
  again = run(config, tmp_path / 'w')
  assert again['param_fingerprint'] == summary['param_fingerprint']


def test_is_reproducible_with_augmentation_and_dropout(tmp_path):
  config = cnn_bn_config()
  assert config.augment and config.model.dropout_rate > 0
  first, second = run(config, tmp_path / 'a'), run(config, tmp_path / 'b')
  assert first['param_fingerprint'] == second['param_fingerprint']
  config.augment = ''
  assert run(config, tmp_path / 'c')['param_fingerprint'] != first['param_fingerprint']


def test_replicas_are_single_runs(tmp_path):
  """num_seeds=2 (vmapped over the state, the statistics included) trains replica i as the
  single run with seed + i does, to float tolerance."""
  config = cnn_bn_config()
  config.num_seeds = 2
  both = run(config, tmp_path / 'both')
  for i in range(2):
    single = cnn_bn_config()
    single.seed = i
    alone = run(single, tmp_path / f'seed{i}')
    assert both['test_loss_per_replica'][i] == pytest.approx(alone['test_loss'], rel=1e-4)
    assert both['train_loss_per_replica'][i] == pytest.approx(alone['train_loss'], rel=1e-4)
