"""configs/cnn.py: the CNN model by name, its shapes and parameter count, and runs on mock data."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from conftest import REPO_ROOT
from conftest import load_config_module
from mnist_jax import models
from mnist_jax import train
from mnist_jax.models import cnn
from mnist_jax.models import layers

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
CNN_CONFIG_PATH = REPO_ROOT / 'configs' / 'cnn.py'


def cnn_param_count(features, hidden_sizes, kernel_size=3, in_channels=1, side=28,
                    num_classes=NUM_CLASSES) -> int:
  """By hand: 'SAME' convs keep H and W, each 2x2/2 max-pool halves them (rounding down)."""
  count, channels = 0, in_channels
  for f in features:
    count += kernel_size * kernel_size * channels * f + f
    channels, side = f, side // 2
  width = side * side * channels
  for h in hidden_sizes:
    count += width * h + h
    width = h
  return count + width * num_classes + num_classes


def cnn_config():
  config = load_config_module(CNN_CONFIG_PATH).get_config()
  config.cache_dir = 'none'
  config.download = False
  return config


def init_shapes(model) -> dict:
  """The parameters' shapes, without computing them."""
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)))
  return variables['params']


def test_model_is_chosen_by_name():
  config = cnn_config()
  assert config.model.name == 'cnn'
  assert 'cnn' in models.available() and 'mlp' in models.available()
  model = models.build(config.model, NUM_CLASSES)
  assert type(model) is cnn.Model  # pylint: disable=unidiomatic-typecheck
  # Every other field of config.model reaches the module.
  assert tuple(model.features) == (32, 64) and tuple(model.hidden_sizes) == (128,)
  assert (model.kernel_size, model.dropout_rate, model.activation) == (3, 0.0, 'relu')
  assert model.num_classes == NUM_CLASSES


def test_output_shape_and_dtype():
  """configs/cnn.py's model on a batch (random parameters of the right shapes: no init compile)."""
  model = models.build(cnn_config().model, NUM_CLASSES)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.05, s.shape).astype(s.dtype),
                        init_shapes(model))
  images = np.random.default_rng(0).random((5, *IMAGE_SHAPE), np.float32)
  logits = jax.jit(model.apply)({'params': params}, images)
  assert logits.shape == (5, NUM_CLASSES)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_parameter_shapes_and_count():
  params = init_shapes(models.build(cnn_config().model, NUM_CLASSES))
  shapes = {k: {n: v.shape for n, v in layer.items()} for k, layer in params.items()}
  assert shapes == {'Conv_0': {'kernel': (3, 3, 1, 32), 'bias': (32,)},
                    'Conv_1': {'kernel': (3, 3, 32, 64), 'bias': (64,)},
                    'Dense_0': {'kernel': (7 * 7 * 64, 128), 'bias': (128,)},
                    'Dense_1': {'kernel': (10, 128), 'bias': (10,)}}  # Stored transposed.
  # Conv 3x3x1x32 + 32, conv 3x3x32x64 + 64, dense 7*7*64 x 128 + 128, logits 128 x 10 + 10.
  assert sum(x.size for x in jax.tree.leaves(params)) == 421_642
  assert cnn_param_count((32, 64), (128,)) == 421_642


@pytest.mark.parametrize('features, hidden_sizes', [
    ((4, 8), (16,)),
    ((4, 8, 16), ()),  # 28 -> 14 -> 7 -> 3: the third pool rounds down.
    ((5,), (6, 7)),
])
def test_parameter_count_follows_the_fields(features, hidden_sizes):
  config = ml_collections.ConfigDict(dict(name='cnn', features=features,
                                          hidden_sizes=hidden_sizes))
  model = models.build(config, NUM_CLASSES)
  params = init_shapes(model)
  assert sum(x.size for x in jax.tree.leaves(params)) == cnn_param_count(features, hidden_sizes)
  logits = jax.eval_shape(model.apply, {'params': params}, jnp.zeros((2, *IMAGE_SHAPE)))
  assert logits.shape == (2, NUM_CLASSES)


class FlaxLayersCNN(nn.Module):
  """configs/cnn.py's network on Flax's own nn.Conv and nn.max_pool: what cnn.Model must compute."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    inits = dict(kernel_init=nn.initializers.glorot_uniform(), bias_init=nn.initializers.zeros)
    for features in (32, 64):
      x = nn.relu(nn.Conv(features, (3, 3), **inits)(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(128, **inits)(x.reshape((x.shape[0], -1))))
    return layers.Logits(NUM_CLASSES, **inits, name='Dense_1')(x)


def test_same_parameters_logits_and_gradients_as_with_flax_layers():
  """Same initial parameters (so fingerprints and checkpoints compare), logits and gradients."""
  model = models.build(cnn_config().model, NUM_CLASSES)
  reference = FlaxLayersCNN()
  images = np.random.default_rng(2).random((8, *IMAGE_SHAPE), np.float32)
  labels = np.arange(8) % NUM_CLASSES
  init = lambda m: jax.jit(m.init)(jax.random.PRNGKey(0), images)['params']
  params, ref_params = init(model), init(reference)
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_array_equal(a, b)

  def loss_and_grads(m):
    def loss(p):
      logits = m.apply({'params': p}, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (loss, logits), grads = loss_and_grads(model)
  (ref_loss, ref_logits), ref_grads = loss_and_grads(reference)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))


def test_dropout_only_in_training():
  # No conv block (features=()): the dropout after the hidden layer, without a conv to compile.
  config = ml_collections.ConfigDict(dict(name='cnn', features=(), hidden_sizes=(64,),
                                          dropout_rate=0.5))
  model = models.build(config, NUM_CLASSES)
  images = np.random.default_rng(1).random((3, *IMAGE_SHAPE), np.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), images)['params']
  apply_jit = jax.jit(model.apply, static_argnames='train')
  apply = lambda key, train: apply_jit({'params': params}, images, train=train,
                                       rngs={'dropout': jax.random.PRNGKey(key)})
  np.testing.assert_array_equal(apply(1, False), apply(2, False))  # Evaluation: no dropout.
  assert not np.allclose(apply(1, True), apply(2, True))  # Training: masks from the rng.
  np.testing.assert_array_equal(apply(1, True), apply(1, True))


# --- Runs on mock data ----------------------------------------------------------------------

NUM_EXAMPLES = 40  # Per split (mock data).
BATCH_SIZE = 16  # 3 steps an epoch; the last holds 8 real examples.
STEPS_PER_EPOCH = 3


def read(workdir, name):
  return json.loads((workdir / name).read_text())


@pytest.mark.slow
def test_small_cnn_trains_one_epoch_on_mock_data(tmp_path):
  config = cnn_config()
  config.model.features = (4, 8)
  config.model.hidden_sizes = (16,)
  config.num_epochs = 1
  config.batch_size = BATCH_SIZE
  config.eval_batch_size = 20
  config.write_report = False
  workdir = tmp_path / 'workdir'
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    returned = train.train_and_evaluate(config, str(workdir))
  summary = read(workdir, 'summary.json')
  assert summary == returned
  expected = (3 * 3 * 1 * 4 + 4) + (3 * 3 * 4 * 8 + 8) + (7 * 7 * 8 * 16 + 16) + (16 * 10 + 10)
  assert summary['num_params'] == expected == cnn_param_count((4, 8), (16,)) == 6_794
  assert summary['steps'] == STEPS_PER_EPOCH and summary['epochs'] == 1
  assert np.isfinite(summary['test_loss']) and np.isfinite(summary['train_loss'])
  assert 0.0 <= summary['test_accuracy'] <= 1.0
  written = read(workdir, 'config.json')
  assert written['model']['name'] == 'cnn' and written['model']['features'] == [4, 8]
  assert written['optimizer'] == 'adam'
  assert len((workdir / 'metrics.jsonl').read_text().splitlines()) == 1
