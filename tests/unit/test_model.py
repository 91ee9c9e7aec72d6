"""The model of configs/mlp.py: shapes, parameter count, Keras's initialisation, the forward pass."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mnist_jax import models
from mnist_jax.models import layers

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


@pytest.fixture(scope='module')
def mlp_params():
  from conftest import load_config_module
  config = load_config_module().get_config()
  model = models.build(config.model, NUM_CLASSES)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)))['params']
  return model, jax.device_get(params)


def test_available_models_include_mlp():
  assert 'mlp' in models.available()


def test_output_shape_and_dtype(mlp_params):
  model, params = mlp_params
  images = np.random.default_rng(0).random((5, *IMAGE_SHAPE), np.float32)
  logits = model.apply({'params': params}, images, train=False)
  assert logits.shape == (5, NUM_CLASSES)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_parameter_count_matches_keras_notebook(mlp_params):
  _, params = mlp_params
  shapes = {k: {n: v.shape for n, v in layer.items()} for k, layer in params.items()}
  assert shapes == {'Dense_0': {'kernel': (784, 512), 'bias': (512,)},
                    'Dense_1': {'kernel': (10, 512), 'bias': (10,)}}  # Stored transposed.
  # The notebook's model.summary() reports 407,050 trainable parameters.
  assert sum(x.size for x in jax.tree.leaves(params)) == 407_050


@pytest.mark.parametrize('layer, fan_in, fan_out, var_rtol', [
    ('Dense_0', 784, 512, 0.02),  # 401k samples: the variance estimate's rel. std is ~0.0014.
    ('Dense_1', 512, 10, 0.08),  # 5k samples: rel. std ~0.0125.
])
def test_kernels_are_glorot_uniform(mlp_params, layer, fan_in, fan_out, var_rtol):
  _, params = mlp_params
  kernel = np.asarray(params[layer]['kernel'], np.float64)
  if layer == 'Dense_1':
    kernel = kernel.T  # The logits layer stores its kernel [classes, features].
  limit = np.sqrt(6.0 / (fan_in + fan_out))
  assert kernel.shape == (fan_in, fan_out)
  assert np.abs(kernel).max() <= limit
  # Uniform, not (truncated) normal: the values reach close to the limit and fill it evenly.
  assert np.abs(kernel).max() >= 0.99 * limit
  assert np.mean(np.abs(kernel) > limit / 2) == pytest.approx(0.5, abs=0.05)
  # Variance 2 / (fan_in + fan_out) (lecun_* would give 1 / fan_in, he_* 2 / fan_in).
  np.testing.assert_allclose(kernel.var(), 2.0 / (fan_in + fan_out), rtol=var_rtol)
  assert abs(kernel.mean()) < 0.05 * limit


def test_biases_are_zero(mlp_params):
  _, params = mlp_params
  for layer in ('Dense_0', 'Dense_1'):
    np.testing.assert_array_equal(params[layer]['bias'], 0.0)


def test_forward_pass_matches_numpy(mlp_params):
  """Flatten (row-major, like Keras's Flatten), Dense, relu, Dense: logits by hand."""
  model, params = mlp_params
  rng = np.random.default_rng(1)
  images = rng.random((3, *IMAGE_SHAPE), np.float32)
  # Non-zero biases, so a dropped bias would show.
  params = jax.tree.map(np.array, params)
  params['Dense_0']['bias'] = rng.normal(size=512).astype(np.float32) * 0.1
  params['Dense_1']['bias'] = rng.normal(size=10).astype(np.float32) * 0.1
  x = images.reshape(3, -1).astype(np.float64)
  hidden = np.maximum(x @ params['Dense_0']['kernel'] + params['Dense_0']['bias'], 0.0)
  expected = hidden @ params['Dense_1']['kernel'].T + params['Dense_1']['bias']
  logits = model.apply({'params': params}, images, train=False)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_model_fields_come_from_config():
  config = ml_collections.ConfigDict(dict(name='mlp', hidden_sizes=(7, 5), activation='tanh',
                                          kernel_init='zeros', bias_init='ones'))
  model = models.build(config, 3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 1)))['params']
  assert [params[f'Dense_{i}']['kernel'].shape for i in range(3)] == [(4, 7), (7, 5), (3, 5)]
  # Zero kernels and unit biases: every logit is 1, whatever the input.
  logits = model.apply({'params': params}, np.ones((2, 2, 2, 1), np.float32))
  np.testing.assert_array_equal(logits, np.ones((2, 3)))


@pytest.mark.parametrize('init', ['glorot_uniform', 'lecun_normal'])
def test_logits_layer_is_nn_dense_with_a_transposed_kernel(init):
  """Same initial values (drawn [features, classes], even for fan-in-only initializers) and
  the same outputs as nn.Dense, from the same rng."""
  x = np.random.default_rng(0).normal(size=(6, 20)).astype(np.float32)
  kwargs = dict(kernel_init=models.initializer(init), bias_init=models.initializer('ones'))
  dense = nn.Dense(3, **kwargs)
  logits = layers.Logits(3, **kwargs)
  dense_params = dense.init(jax.random.PRNGKey(4), x)['params']
  logits_params = logits.init(jax.random.PRNGKey(4), x)['params']
  assert logits_params['kernel'].shape == (3, 20)
  np.testing.assert_array_equal(logits_params['kernel'], dense_params['kernel'].T)
  np.testing.assert_array_equal(logits_params['bias'], dense_params['bias'])
  np.testing.assert_allclose(logits.apply({'params': logits_params}, x),
                             dense.apply({'params': dense_params}, x), rtol=1e-6, atol=1e-6)
