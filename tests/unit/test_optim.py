"""The optimizer of configs/mlp.py is Keras's RMSprop(lr=1e-3, rho=0.9, epsilon=1e-7).

Keras's update (keras/src/optimizers/rmsprop.py, `update_step`, non-centered, no momentum):
    v = rho * v + (1 - rho) * g**2          (v starts at zeros)
    p = p - lr * g / sqrt(v + epsilon)
Note that Keras (and optax's default `eps_in_sqrt=True`) adds epsilon INSIDE the square root;
PyTorch's RMSprop uses sqrt(v) + eps. For gradients of ordinary size the two agree to ~1e-6,
so the gradients below include tiny and zero entries, where they differ by 10x.
"""

import jax
import numpy as np
import optax
import pytest

from mnist_jax import optim

RHO, EPS, LR = 0.9, 1e-7, 1e-3

PARAMS = {'w': np.array([[1.0, -2.0], [0.5, 0.0]], np.float32), 'b': np.array([0.25, -0.125, 3.0], np.float32)}
GRADS = [
    {'w': np.array([[0.5, -1.5], [2.0, 1e-4]], np.float32), 'b': np.array([-0.3, 0.0, 7.0], np.float32)},
    {'w': np.array([[-0.2, 0.4], [1.0, -3e-4]], np.float32), 'b': np.array([0.6, 1e-5, -2.0], np.float32)},
]


def keras_rmsprop(params, grads_list, *, eps_in_sqrt=True):
  """The Keras formula in float64 numpy; returns the params after each step."""
  p = {k: v.astype(np.float64) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  history = []
  for grads in grads_list:
    for k in p:
      g = grads[k].astype(np.float64)
      v[k] = RHO * v[k] + (1 - RHO) * g**2
      denominator = np.sqrt(v[k] + EPS) if eps_in_sqrt else np.sqrt(v[k]) + EPS
      p[k] = p[k] - LR * g / denominator
    history.append({k: x.copy() for k, x in p.items()})
  return history, v


def run_optimizer(tx, params, grads_list):
  state = tx.init(params)
  history = []
  for grads in grads_list:
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(jax.device_get(params))
  return history, state


@pytest.fixture
def tx(mlp_config):
  return optim.create_optimizer(mlp_config, total_steps=100)


def test_config_hyperparameters(mlp_config):
  assert mlp_config.optimizer == 'rmsprop'
  assert mlp_config.learning_rate == LR
  assert dict(mlp_config.optimizer_kwargs) == dict(decay=RHO, eps=EPS)
  assert mlp_config.lr_schedule == 'constant_schedule'


def test_two_rmsprop_steps_match_keras_formula(tx):
  expected, expected_v = keras_rmsprop(PARAMS, GRADS)
  got, state = run_optimizer(tx, PARAMS, GRADS)
  for step in range(2):
    for k in PARAMS:
      np.testing.assert_allclose(got[step][k], expected[step][k], rtol=1e-6, atol=1e-7,
                                 err_msg=f'step {step + 1}, param {k}')
  # The second moment the optimizer keeps is Keras's v.
  nus = [x for x in jax.tree.leaves(state) if np.shape(x) == PARAMS['w'].shape]
  assert any(np.allclose(nu, expected_v['w'], rtol=1e-6, atol=1e-12) for nu in nus)


def test_step_sizes_by_hand(tx):
  """A few entries worked out on paper, independent of the helper above."""
  got, _ = run_optimizer(tx, PARAMS, GRADS[:1])
  # g = 0.5: v = 0.1 * 0.25 = 0.025; step = 1e-3 * 0.5 / sqrt(0.025 + 1e-7) = 3.16227135e-3.
  assert got[0]['w'][0, 0] == pytest.approx(1.0 - 3.16227135e-3, abs=1e-7)
  # g = 0: no move at all.
  assert got[0]['b'][1] == np.float32(-0.125)
  # g = 1e-4: v = 1e-9; step = 1e-7 / sqrt(1.01e-7) = 3.1466e-4 (sqrt(v) + eps would give 3.15e-3).
  assert got[0]['w'][1, 1] == pytest.approx(-1e-7 / np.sqrt(1.01e-7), rel=1e-4)


def test_first_step_is_not_pytorch_style_eps(tx):
  """Guards the epsilon placement: sqrt(v) + eps (PyTorch) moves tiny gradients 10x further."""
  pytorch_style, _ = keras_rmsprop(PARAMS, GRADS[:1], eps_in_sqrt=False)
  got, _ = run_optimizer(tx, PARAMS, GRADS[:1])
  assert not np.allclose(got[0]['w'], pytorch_style[0]['w'], rtol=1e-6, atol=1e-7)


def test_matches_keras_rmsprop_itself(tx):
  """Cross-check against keras.optimizers.RMSprop when Keras is installed (with TensorFlow)."""
  keras = pytest.importorskip('keras')
  import tensorflow as tf
  if keras.backend.backend() != 'tensorflow':
    pytest.skip(f'Keras backend is {keras.backend.backend()}, not tensorflow')
  variables = {k: tf.Variable(v) for k, v in PARAMS.items()}
  opt = keras.optimizers.RMSprop(learning_rate=LR, rho=RHO, epsilon=EPS)
  got, _ = run_optimizer(tx, PARAMS, GRADS)
  for step, grads in enumerate(GRADS):
    opt.apply_gradients([(tf.constant(grads[k]), variables[k]) for k in PARAMS])
    for k in PARAMS:
      np.testing.assert_allclose(got[step][k], variables[k].numpy(), rtol=1e-6, atol=1e-7,
                                 err_msg=f'step {step + 1}, param {k}')


def test_learning_rate_comes_from_config(mlp_config):
  """learning_rate=3e-4 moves every parameter 0.3x as far as 1e-3 does (RMSprop's step is lr-linear)."""
  ref, _ = run_optimizer(optim.create_optimizer(mlp_config, 100), PARAMS, GRADS[:1])
  mlp_config.learning_rate = 3e-4
  got, _ = run_optimizer(optim.create_optimizer(mlp_config, 100), PARAMS, GRADS[:1])
  for k in PARAMS:
    np.testing.assert_allclose(PARAMS[k] - got[0][k], 0.3 * (PARAMS[k] - ref[0][k]),
                               rtol=1e-3, atol=1e-8)


def test_schedule_defaults_from_config(mlp_config):
  """A decaying schedule by name gets its learning rate and length from the config."""
  mlp_config.lr_schedule = 'linear_schedule'
  mlp_config.lr_schedule_kwargs = dict(end_value=0.0)
  schedule = optim.create_schedule(mlp_config, total_steps=10)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [1e-3, 5e-4, 0.0],
                             rtol=1e-6, atol=1e-12)
