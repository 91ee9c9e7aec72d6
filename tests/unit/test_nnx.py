"""Models in Flax NNX (models/_nnx.py): the same contract, steps and runs as Linen ones.

The NNX CNN (models/cnn_nnx.py), given the Linen CNN's initial parameters, trains to the same
losses; an NNX model with BatchNorm and dropout keeps its statistics as a Linen one does (updated
in train mode over the real examples, used as stored in eval mode), draws dropout from the
step's rng, and runs end to end on mock data: checkpoints, resume, --mode=evaluate, replicas.
Bad model files are one ConfigError before any data loads.
"""

import json
import textwrap

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import REPO_ROOT
from conftest import load_config_module
from mnist_jax.infra import errors
from mnist_jax import models
from mnist_jax import optim
from mnist_jax import steps
from mnist_jax import train
from mnist_jax import validation
from mnist_jax import writers
from mnist_jax.models import _nnx
from mnist_jax.models import cnn_nnx

IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
NUM_EXAMPLES = 20  # Per split of the mock data.
BATCH_SIZE = 8  # 3 steps an epoch, the last with 4 real examples.


def tiny_cnn_config(name='cnn_nnx'):
  config = load_config_module(REPO_ROOT / 'configs' / f'{name}.py').get_config()
  config.cache_dir = 'none'
  config.download = False
  config.model.features = (4, 8)
  config.model.hidden_sizes = (16,)
  config.batch_size, config.eval_batch_size, config.num_epochs = BATCH_SIZE, 10, 2
  config.steps_per_call, config.scan_unroll = 2, 1
  config.write_report = config.write_tensorboard = False
  return config


def batch(num_real: int, size: int = BATCH_SIZE, seed: int = 0):
  """`num_real` examples, then padding: garbage images and labels under mask 0."""
  rng = np.random.default_rng(seed)
  return dict(image=rng.integers(0, 256, (size, *IMAGE_SHAPE), dtype=np.uint8),
              label=rng.integers(0, NUM_CLASSES, size).astype(np.int32),
              mask=(np.arange(size) < num_real).astype(np.float32))


def host(tree):
  return jax.tree.map(np.array, jax.device_get(tree))


# --- The NNX CNN against the Linen CNN ---------------------------------------------------------

def test_the_nnx_cnn_is_built_by_name_with_the_linen_cnns_shapes():
  config = tiny_cnn_config()
  model = models.build(config.model, NUM_CLASSES)
  assert isinstance(model, _nnx.NNXModel) and model.module_class is cnn_nnx.Model
  assert not steps.takes_mask(model)
  assert model.kwargs == dict(num_classes=10, features=(4, 8), hidden_sizes=(16,), kernel_size=3,
                              dropout_rate=0.0, activation='relu', kernel_init='glorot_uniform',
                              bias_init='zeros', dtype=np.dtype('float32'))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE)))
  assert jax.tree.map(jnp.shape, variables) == {'params': {
      'convs': {'0': {'kernel': (3, 3, 1, 4), 'bias': (4,)},
                '1': {'kernel': (3, 3, 4, 8), 'bias': (8,)}},
      'hidden': {'0': {'kernel': (7 * 7 * 8, 16), 'bias': (16,)}},
      'logits': {'kernel': (16, 10), 'bias': (10,)}}}
  linen = models.build(tiny_cnn_config('cnn').model, NUM_CLASSES)
  linen_params = jax.eval_shape(linen.init, jax.random.PRNGKey(0),
                                jnp.zeros((1, *IMAGE_SHAPE)))['params']
  assert (writers.count_params(variables['params']) == writers.count_params(linen_params)
          == 6_794)


def nnx_params_from_linen(linen_params, num_convs: int, num_hidden: int) -> dict:
  """The Linen CNN's parameters in the NNX CNN's layout (its logits kernel transposed)."""
  return dict(
      convs={str(i): dict(linen_params[f'Conv_{i}']) for i in range(num_convs)},
      hidden={str(i): dict(linen_params[f'Dense_{i}']) for i in range(num_hidden)},
      logits=dict(kernel=linen_params[f'Dense_{num_hidden}']['kernel'].T,
                  bias=linen_params[f'Dense_{num_hidden}']['bias']))


def test_from_the_same_parameters_the_nnx_cnn_trains_to_the_linen_cnns_losses():
  """configs/cnn.py and configs/cnn_nnx.py (shrunk), Adam with the cosine schedule, 6 steps on
  the same batches (each with padding), from the Linen CNN's initial parameters: the same
  per-step losses to 1e-5, and the same parameters after."""
  real = (5, 8, 7, 8, 3, 8)
  chunk = {k: np.stack([batch(n, seed=i)[k] for i, n in enumerate(real)]) for k in batch(8)}
  results = {}
  for name in ('cnn', 'cnn_nnx'):
    config = tiny_cnn_config(name)
    model = models.build(config.model, NUM_CLASSES)
    tx = optim.create_optimizer(config, total_steps=6)
    results[name] = dict(model=model, tx=tx, task=steps.Task.from_config(config, model),
                         state=steps.create_train_state(jax.random.PRNGKey(0), model, tx,
                                                        IMAGE_SHAPE))
  linen, nnx_run = results['cnn'], results['cnn_nnx']
  params = nnx_params_from_linen(host(linen['state'].params), num_convs=2, num_hidden=1)
  assert jax.tree.structure(params) == jax.tree.structure(host(nnx_run['state'].params))
  nnx_run['state'] = nnx_run['state'].replace(params=params,
                                              opt_state=nnx_run['tx'].init(params))
  fns = steps.make_chunk_fns(steps.stacked)
  losses, finals = {}, {}
  for name, r in results.items():
    state, sums, per_step = fns.train(r['state'], None, chunk, task=r['task'])
    losses[name], finals[name] = np.asarray(per_step['loss']), host(state.params)
    assert float(sums['count']) == sum(real)
  np.testing.assert_allclose(losses['cnn_nnx'], losses['cnn'], rtol=1e-5)
  assert len(set(np.round(losses['cnn'], 4))) == 6  # The losses move: the test can fail.
  want = nnx_params_from_linen(finals['cnn'], num_convs=2, num_hidden=1)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6),
               finals['cnn_nnx'], want)


# --- An NNX model with BatchNorm and dropout --------------------------------------------------

class BatchNormDropout(nnx.Module):
  """Conv -> BatchNorm -> relu -> pool, Dense -> BatchNorm -> relu -> dropout, logits; the
  batch's mask keeps the padding out of the statistics. Written as Flax's NNX MNIST example
  writes it: BatchNorm and Dropout follow model.train() / model.eval()."""

  def __init__(self, num_classes, image_shape, width=8, dropout_rate=0.5, *, rngs):
    self.conv = nnx.Conv(image_shape[-1], 4, (3, 3), use_bias=False, rngs=rngs)
    self.norm0 = nnx.BatchNorm(4, rngs=rngs)
    self.dense = nnx.Linear(14 * 14 * 4, width, use_bias=False, rngs=rngs)
    self.norm1 = nnx.BatchNorm(width, rngs=rngs)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
    self.logits = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, images, mask=None):
    real = None if mask is None else mask > 0
    x = self.norm0(self.conv(images), mask=None if real is None else real[:, None, None, None])
    x = nnx.max_pool(nnx.relu(x), (2, 2), strides=(2, 2))
    x = self.norm1(self.dense(x.reshape((x.shape[0], -1))),
                   mask=None if real is None else real[:, None])
    return self.logits(self.dropout(nnx.relu(x)))


@pytest.fixture(scope='module')
def bn():
  model = models.create(BatchNormDropout, NUM_CLASSES, width=8)
  task = steps.Task(model_takes_mask=steps.takes_mask(model))
  tx = optim.create_optimizer(ml_collections.ConfigDict(dict(
      optimizer='adamw', optimizer_kwargs={}, learning_rate=1e-2, lr_schedule='constant_schedule',
      lr_schedule_kwargs={}, warmup_steps=0, grad_clip_norm=0.0, weight_decay=1e-2)), 10)
  return dict(model=model, task=task, tx=tx)


def new_state(bn, seed=0):
  return steps.create_train_state(jax.random.PRNGKey(seed), bn['model'], bn['tx'], IMAGE_SHAPE)


def test_the_state_holds_params_and_batch_stats_as_plain_dicts(bn):
  state = new_state(bn)
  assert bn['task'].model_takes_mask
  assert sorted(state.params) == ['conv', 'dense', 'logits', 'norm0', 'norm1']
  assert list(state.model_state) == ['batch_stats']  # No RNG stream: it comes from the step.
  stats = host(state.model_state['batch_stats'])
  assert sorted(stats) == ['norm0', 'norm1']
  np.testing.assert_array_equal(stats['norm1']['mean'], np.zeros(8))
  np.testing.assert_array_equal(stats['norm1']['var'], np.ones(8))
  assert all(type(leaf) is dict for leaf in (state.params, state.params['norm0']))  # pylint: disable=unidiomatic-typecheck


def test_weight_decay_applies_to_kernels_only(bn):
  mask = optim.decay_mask(new_state(bn).params)
  assert mask == dict(conv=dict(kernel=True), dense=dict(kernel=True),
                      logits=dict(kernel=True, bias=False),
                      norm0=dict(scale=False, bias=False), norm1=dict(scale=False, bias=False))


def plain_nnx_train_statistics(bn, variables, images):
  """BatchNorm's running statistics after one train-mode call, in NNX alone: no adapter."""
  module = bn['model'].construct(IMAGE_SHAPE, nnx.Rngs(0))
  for collection in ('params', 'batch_stats'):
    for layer, values in variables[collection].items():
      for name, value in values.items():
        getattr(getattr(module, layer), name)[...] = value
  module.train()
  module(images)
  return {name: dict(mean=np.array(getattr(module, name).mean[...]),
                     var=np.array(getattr(module, name).var[...])) for name in ('norm0', 'norm1')}


def test_training_updates_the_statistics_from_the_real_examples_only(bn):
  padded = batch(num_real=5)
  state = new_state(bn)
  before = host(state)
  after, _ = steps.train_step_jit(state, padded, bn['task'])
  variables = {'params': before.params, **before.model_state}
  expected = plain_nnx_train_statistics(bn, variables, padded['image'][:5] / np.float32(255))
  got = host(after.model_state['batch_stats'])
  jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7), got,
               expected)
  unmasked = plain_nnx_train_statistics(bn, variables, padded['image'] / np.float32(255))
  assert not np.allclose(got['norm0']['mean'], unmasked['norm0']['mean'], rtol=1e-3)
  assert not np.allclose(got['norm0']['mean'], before.model_state['batch_stats']['norm0']['mean'])


def test_evaluation_uses_the_stored_statistics(bn):
  state, _ = steps.train_step_jit(new_state(bn), batch(8), bn['task'])
  images = batch(8, seed=3)['image']
  whole = steps.predict(state, images, batch_size=8, task=bn['task'])
  one_by_one = np.concatenate([steps.predict(state, images[i:i + 1], batch_size=1,
                                             task=bn['task']) for i in range(8)])
  np.testing.assert_allclose(whole, one_by_one, rtol=1e-5, atol=1e-6)
  fresh = state.replace(model_state=new_state(bn).model_state)
  assert not np.allclose(steps.predict(fresh, images, 8, bn['task']), whole, atol=1e-4)


def test_dropout_draws_from_the_step_rng_in_training_only(bn):
  model, variables = bn['model'], host(new_state(bn))
  variables = {'params': variables.params, **variables.model_state}
  images = batch(8)['image'] / np.float32(255)
  apply = jax.jit(model.apply, static_argnames=('train', 'mutable'))
  train = lambda key: apply(variables, images, train=True, mutable=('batch_stats',),
                            rngs={'dropout': jax.random.PRNGKey(key)})[0]
  np.testing.assert_array_equal(train(1), train(1))
  assert not np.allclose(train(1), train(2))
  evaluate = lambda key: apply(variables, images, train=False,
                               rngs={'dropout': jax.random.PRNGKey(key)})
  np.testing.assert_array_equal(evaluate(1), evaluate(2))
  # Through the step: the rng is folded with the step number, so step 0 and 1 differ.
  sums = [steps.train_step_jit(new_state(bn).replace(step=s), batch(8), bn['task'])[1]['loss']
          for s in (0, 1, 0)]
  assert float(sums[0]) == float(sums[2]) and float(sums[0]) != float(sums[1])


def test_non_finite_statistics_are_caught(bn):
  state = new_state(bn)
  stats = host(state.model_state)
  stats['batch_stats']['norm0']['mean'][:] = np.nan
  chunk = {k: np.stack([v]) for k, v in batch(8).items()}
  _, _, per_step = steps.make_chunk_fns(steps.stacked).train(
      state.replace(model_state=stats), None, chunk, task=bn['task'])
  assert np.isfinite(np.asarray(per_step['loss'])).all()
  assert not bool(per_step['params_finite'])


def test_the_adapter_compiles_the_train_chunk_once(bn):
  """No Python-side state between calls: once the state is the jitted function's own output
  (the first state's step is a Python int), every call hits the jit cache."""
  fn = steps.make_chunk_fns(steps.stacked).train
  chunk = {k: np.stack([v, v]) for k, v in batch(6).items()}
  state, _, _ = fn(new_state(bn), None, chunk, task=bn['task'])
  state, _, _ = fn(state, None, chunk, task=bn['task'])
  compiled = fn._cache_size()  # pylint: disable=protected-access
  for _ in range(3):
    state, _, _ = fn(state, None, chunk, task=bn['task'])
  assert fn._cache_size() == compiled  # pylint: disable=protected-access
  assert int(state.step) == 10


# --- End to end on mock data, with an NNX model file ---------------------------------------

BN_MODEL_FILE = '''
from flax import nnx


class Model(nnx.Module):

  def __init__(self, num_classes, image_shape, width=16, *, rngs):
    h, w, c = image_shape
    self.dense = nnx.Linear(h * w * c, width, use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(width, rngs=rngs)
    self.dropout = nnx.Dropout(0.3, rngs=rngs)
    self.logits = nnx.Linear(width, num_classes, rngs=rngs)

  def __call__(self, images, mask=None):
    x = self.dense(images.reshape((images.shape[0], -1)))
    x = nnx.relu(self.norm(x, mask=None if mask is None else mask[:, None] > 0))
    return self.logits(self.dropout(x))
'''


@pytest.fixture
def model_files(tmp_path, monkeypatch):
  """A folder on models' path: write `<name>.py` there and name it in config.model.name."""
  package = tmp_path / 'models'
  package.mkdir()
  monkeypatch.setattr(models, '__path__', [*models.__path__, str(package)])

  def add(name, text):
    (package / f'{name}.py').write_text(textwrap.dedent(text))
    monkeypatch.delitem(__import__('sys').modules, f'mnist_jax.models.{name}', raising=False)
  return add


def bn_mlp_config(mlp_config):
  config = mlp_config
  config.model = ml_collections.ConfigDict(dict(name='bn_nnx', width=16))
  config.batch_size, config.eval_batch_size, config.num_epochs = BATCH_SIZE, 10, 2
  config.steps_per_call = 2
  config.write_report = config.write_tensorboard = False
  return config


def run(config, workdir):
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    return train.train_and_evaluate(config, str(workdir))


def test_trains_resumes_and_evaluates_its_checkpoint(tmp_path, mlp_config, model_files):
  model_files('bn_nnx', BN_MODEL_FILE)
  config = bn_mlp_config(mlp_config)
  whole = run(config, tmp_path / 'whole')
  assert whole['steps'] == 2 * 3 and np.isfinite(whole['test_loss'])
  assert whole['num_params'] == 784 * 16 + 2 * 16 + 16 * 10 + 10
  config.num_epochs = 1  # Stopped after an epoch, then resumed from its checkpoint.
  first = run(config, tmp_path / 'resumed')
  assert first['param_fingerprint'] != whole['param_fingerprint']
  config.num_epochs = 2
  resumed = run(config, tmp_path / 'resumed')
  assert resumed['param_fingerprint'] == whole['param_fingerprint']
  assert resumed['test_loss'] == whole['test_loss']
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    evaluated = train.evaluate_checkpoint(config, str(tmp_path / 'whole'))
  assert evaluated['param_fingerprint'] == whole['param_fingerprint']
  assert evaluated['test_loss'] == pytest.approx(whole['test_loss'], rel=1e-6)
  assert evaluated['test_accuracy'] == whole['test_accuracy']
  # Dropout and the statistics are in the fingerprint: another seed trains other values.
  config.seed = 1
  assert run(config, tmp_path / 'seed1')['param_fingerprint'] != whole['param_fingerprint']


def test_replicas_are_single_runs(tmp_path, mlp_config, model_files):
  model_files('bn_nnx', BN_MODEL_FILE)
  config = bn_mlp_config(mlp_config)
  config.num_seeds = 2
  both = run(config, tmp_path / 'both')
  for i in range(2):
    single = bn_mlp_config(load_config_module().get_config())
    single.cache_dir, single.download, single.seed = 'none', False, i
    alone = run(single, tmp_path / f'seed{i}')
    assert both['test_loss_per_replica'][i] == pytest.approx(alone['test_loss'], rel=1e-4)
    assert both['train_loss_per_replica'][i] == pytest.approx(alone['train_loss'], rel=1e-4)


def test_a_sweep_writes_its_report_and_tensorboard(tmp_path, mlp_config, model_files):
  """config.sweep over an NNX model with BatchNorm: two learning rates x two seeds in one
  program, each replica trained as its own run, with report.png, report.md and TensorBoard
  events holding the run's numbers."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(REPO_ROOT / 'tests' / 'unit'))
  from test_train import scalars_from_event_files  # pylint: disable=g-import-not-at-top
  model_files('bn_nnx', BN_MODEL_FILE)
  config = bn_mlp_config(mlp_config)
  config.write_report = config.write_tensorboard = True
  config.sweep = ml_collections.ConfigDict(dict(learning_rate=(1e-3, 3e-3)))
  config.num_seeds = 2
  summary = run(config, tmp_path / 'sweep')
  assert len(summary['replicas']) == 4
  assert len(set(summary['param_fingerprint_per_replica'])) == 4
  losses = summary['test_loss_per_replica']
  assert summary['best']['replica'] in [r['replica'] for r in summary['replicas']]
  single = bn_mlp_config(load_config_module().get_config())
  single.cache_dir, single.download, single.learning_rate = 'none', False, 3e-3
  single.seed = 1
  alone = run(single, tmp_path / 'alone')
  names = [r['replica'] for r in summary['replicas']]
  i = next(i for i, r in enumerate(summary['replicas'])
           if r['seed'] == 1 and r['hparams']['learning_rate'] == pytest.approx(3e-3))
  assert losses[i] == pytest.approx(alone['test_loss'], rel=1e-4), names
  workdir = tmp_path / 'sweep'
  assert (workdir / 'report.png').stat().st_size > 10_000
  assert f"| test accuracy | {summary['test_accuracy']:.4f} |" in (workdir / 'report.md').read_text()
  scalars = scalars_from_event_files(workdir)
  final = json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])
  tag = next(t for t in scalars if t.startswith('test_loss'))
  assert list(scalars[tag].values())[-1] == pytest.approx(
      np.ravel(final[tag] if tag in final else final['test_loss'])[0], rel=1e-6), sorted(scalars)


def test_the_nnx_cnn_config_trains_on_mock_data(tmp_path):
  config = tiny_cnn_config()
  config.num_epochs = 1
  summary = run(config, tmp_path / 'w')
  assert summary['steps'] == 3 and np.isfinite(summary['test_loss'])
  assert summary['num_params'] == 6_794


# --- Bad model files: one ConfigError, before any data loads --------------------------------

@pytest.mark.parametrize('text, message', [
    ('X = 1\n', r"config.model.name='bad' is invalid: mnist_jax/models/bad.py defines no Model"),
    ('Model = 3\n', r'defines Model as 3, which is neither a flax.linen.Module nor a flax.nnx'),
    ('class Model:\n  def __init__(self, num_classes): pass\n', 'neither a flax.linen.Module'),
])
def test_a_file_without_a_linen_or_nnx_model_is_refused(mlp_config, model_files, tmp_path,
                                                         text, message):
  model_files('bad', text)
  mlp_config.model = ml_collections.ConfigDict(dict(name='bad'))
  mlp_config.data_dir = str(tmp_path / 'no_data')  # Loading would fail otherwise.
  with pytest.raises(errors.ConfigError, match=message):
    train.train_and_evaluate(mlp_config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('name', ['cnn', 'cnn_nnx'])
def test_a_field_the_constructor_does_not_take_is_named(name):
  config = tiny_cnn_config(name)
  config.model.depth = 3
  with pytest.raises(errors.ConfigError,
                     match=rf"config.model.depth is invalid: models.{name}.Model takes no "
                           r"argument 'depth' \(it takes: activation, bias_init, "):
    validation.validate(config)


def test_a_missing_argument_and_one_the_run_sets_are_named(model_files):
  model_files('needs_width', BN_MODEL_FILE.replace('width=16', 'width'))
  config = ml_collections.ConfigDict(dict(name='needs_width'))
  with pytest.raises(errors.ConfigError, match=r'config.model.width is missing: '
                                               r'models.needs_width.Model needs it'):
    models.check(config)
  config.width, config.image_shape = 4, (28, 28, 1)
  with pytest.raises(errors.ConfigError, match='config.model.image_shape is invalid: the run '
                                               'sets image_shape itself'):
    models.check(config)
  del config['image_shape']
  models.check(config)  # Now it is fine.
