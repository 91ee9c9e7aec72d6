"""The docs run as written: `--help` lists every config field, and every worked example of
docs/extending.md (and the README's short one) trains."""

import re

from conftest import REPO_ROOT
from mnist_jax import config_doc

REPO = REPO_ROOT


def test_help_lists_every_config_field(tmp_path):
  import subprocess, sys, os  # pylint: disable=g-import-not-at-top,multiple-imports
  out = subprocess.run([sys.executable, 'run.py', '--help'], cwd=REPO, capture_output=True,
                       text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert out.returncode == 1, out.stderr  # absl's --help prints the usage and exits with 1.
  assert 'Traceback' not in out.stderr
  rows = config_doc.table_rows(str(REPO / 'configs' / 'mlp.py'))
  assert len(rows) > 20
  # The flags first, then the config fields, by section in the file's order.
  assert out.stdout.index('--workdir:') < out.stdout.index('Config fields') < out.stdout.index(
      '\nData:\n') < out.stdout.index('\nModel:\n') < out.stdout.index('\nLogging:\n')
  fields_text = out.stdout[out.stdout.index('Config fields'):]
  for name, _, _ in rows:
    assert re.search(rf'^  {re.escape(name)}\s', fields_text, re.M), name
  # config.sweep's fields share one row ('sweep.<name>') that names each of them.
  help_text = ' '.join(out.stdout.split())
  for name, _, _ in config_doc.fields(str(REPO / 'configs' / 'mlp.py')):
    if name.startswith('sweep.'):
      assert re.search(rf'\b{name.split(".")[1]}\b', help_text.split('sweep.<name>')[1]), name


# --- The worked examples of docs/extending.md, run as a reader would use them ----------------

import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import struct  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

from conftest import readme_example  # pylint: disable=g-import-not-at-top,wrong-import-position
from conftest import shrink  # pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_jax import augment  # pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_jax import losses  # pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_jax import metrics  # pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from mnist_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_EXAMPLES = 24


example = readme_example  # The Python block that follows `<!-- example: TAG -->`.


def add_to_module(module, registry: str, tag: str, monkeypatch):
  """Runs the README's block as if pasted at the end of `module`; undone after the test."""
  monkeypatch.setattr(module, registry, dict(getattr(module, registry)))
  namespace = dict(vars(module))
  exec(example(tag), namespace)  # pylint: disable=exec-used
  return namespace


tiny = shrink  # tiny(config): conftest's tiny job.


def run(config, workdir):
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    return train.train_and_evaluate(config, str(workdir))


def tensorboard_tags(workdir) -> set[str]:
  """The scalar tags of the TFRecord-framed event files tensorboardX wrote."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in workdir.glob('events.out.tfevents.*'):
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      tags.update(value.tag for value in event.summary.value)
      offset += 12 + length + 4
  return tags


def test_metric_example_reaches_every_output(tmp_path, mlp_config, monkeypatch, capsys):
  namespace = add_to_module(metrics, 'METRICS', 'metric', monkeypatch)
  top3 = namespace['top3_accuracy']
  assert metrics.METRICS['top3_accuracy'] is top3
  logits = jnp.array([[0.0, 4.0, 3.0, 2.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
  np.testing.assert_array_equal(top3(logits, jnp.array([3, 3])), [1.0, 0.0])  # Ranks 3 and 4.

  config = tiny(mlp_config)
  config.metrics = ('accuracy', 'top3_accuracy')
  config.write_tensorboard = config.write_report = True
  summary = run(config, tmp_path)
  out = capsys.readouterr().out
  assert re.search(r'train loss \S+ accuracy \S+ top3_accuracy \S+  \|  test loss \S+ '
                   r'accuracy \S+ top3_accuracy \S+', out), out
  assert 1.0 >= summary['test_top3_accuracy'] >= summary['test_accuracy']
  records = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert all({'train_top3_accuracy', 'test_top3_accuracy'} <= set(r) for r in records)
  assert json.loads((tmp_path / 'summary.json').read_text())['test_top3_accuracy'] == \
      summary['test_top3_accuracy']
  report = (tmp_path / 'report.md').read_text()
  assert f"| test top3 accuracy | {summary['test_top3_accuracy']:.4f} |" in report
  assert "| train top3 accuracy | test loss |" in report, report  # Per-epoch table columns.
  assert {'train_top3_accuracy', 'test_top3_accuracy'} <= tensorboard_tags(tmp_path)


def test_the_readmes_metric_example_is_the_one_docs_extending_runs():
  readme = (REPO / 'README.md').read_text()
  short = re.search(r'## Extending it\n.*?```python\n(.*?)```', readme, re.S).group(1)
  assert short.strip() and short in example('metric')


def test_augment_example_trains_reproducibly(tmp_path, mlp_config, monkeypatch):
  namespace = add_to_module(augment, 'OPS', 'augment', monkeypatch)
  images = jax.random.uniform(jax.random.PRNGKey(1), (4, 6, 6, 1))
  noisy = namespace['noise'](jax.random.PRNGKey(2), images, std=0.5)
  assert 0.0 <= float(noisy.min()) and float(noisy.max()) <= 1.0
  assert float(jnp.abs(noisy - images).mean()) > 0.1
  np.testing.assert_array_equal(namespace['noise'](jax.random.PRNGKey(2), images, std=0.0),
                                images)
  with pytest.raises(ValueError, match='noise'):
    augment.check('noise(-1)')

  config = tiny(mlp_config)
  config.augment = 'shift(2)|noise(0.1)'
  first = run(config, tmp_path / 'a')['param_fingerprint']
  assert run(config, tmp_path / 'b')['param_fingerprint'] == first
  config.augment = 'shift(2)'
  assert run(config, tmp_path / 'c')['param_fingerprint'] != first


def test_loss_example_is_the_brier_score(tmp_path, mlp_config, monkeypatch):
  namespace = add_to_module(losses, 'LOSSES', 'loss', monkeypatch)
  logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], np.float32)
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  expected = ((probs - np.eye(3)[[0, 2]]) ** 2).sum(-1)
  np.testing.assert_allclose(namespace['brier'](logits, np.array([0, 2])), expected, rtol=1e-6)

  config = tiny(mlp_config)
  config.loss = 'brier'
  config.loss_kwargs = {}
  summary = run(config, tmp_path)
  assert 0.0 < summary['test_loss'] < 2.0  # A Brier score lies in [0, 2].


def test_model_example_trains_with_batch_stats(tmp_path, mlp_config, monkeypatch):
  package = tmp_path / 'models'
  package.mkdir()
  (package / 'bn_mlp.py').write_text(example('model bn_mlp'))
  monkeypatch.setattr(models, '__path__', [*models.__path__, str(package)])
  monkeypatch.delitem(sys.modules, 'mnist_jax.models.bn_mlp', raising=False)
  assert 'bn_mlp' in models.available()
  namespace = {}
  exec(example('config bn_mlp'), namespace)  # pylint: disable=exec-used
  config = namespace['get_config']()
  assert config.model.to_dict() == dict(name='bn_mlp', width=256)
  for field, value in mlp_config.items():  # Offline, uncached, and tiny.
    if field in ('cache_dir', 'download'):
      config[field] = value
  config.batch_size, config.eval_batch_size, config.num_epochs = 8, 12, 2
  config.write_tensorboard = config.write_report = False
  summary = run(config, tmp_path / 'w')
  assert summary['steps'] == 2 * 3 and np.isfinite(summary['test_loss'])
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    evaluated = train.evaluate_checkpoint(config, str(tmp_path / 'w'))
  assert evaluated['param_fingerprint'] == summary['param_fingerprint']
  assert evaluated['test_loss'] == pytest.approx(summary['test_loss'], rel=1e-6)
  sys.modules.pop('mnist_jax.models.bn_mlp', None)


def test_nnx_model_example_trains_with_batch_stats(tmp_path, mlp_config, monkeypatch):
  """The NNX version of the example: BatchNorm statistics, dropout, --mode=evaluate."""
  package = tmp_path / 'models'
  package.mkdir()
  (package / 'bn_mlp_nnx.py').write_text(example('model bn_mlp_nnx'))
  monkeypatch.setattr(models, '__path__', [*models.__path__, str(package)])
  monkeypatch.delitem(sys.modules, 'mnist_jax.models.bn_mlp_nnx', raising=False)
  namespace = {}
  exec(example('config bn_mlp'), namespace)  # pylint: disable=exec-used
  config = namespace['get_config']()
  config.model.name = 'bn_mlp_nnx'  # What the README says to change.
  for field, value in mlp_config.items():  # Offline, uncached, and tiny.
    if field in ('cache_dir', 'download'):
      config[field] = value
  config.batch_size, config.eval_batch_size, config.num_epochs = 8, 12, 2
  config.write_tensorboard = config.write_report = False
  summary = run(config, tmp_path / 'w')
  assert summary['steps'] == 2 * 3 and np.isfinite(summary['test_loss'])
  assert summary['num_params'] == 784 * 256 + 2 * 256 + 256 * 10 + 10
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    evaluated = train.evaluate_checkpoint(config, str(tmp_path / 'w'))
  assert evaluated['param_fingerprint'] == summary['param_fingerprint']
  assert evaluated['test_loss'] == pytest.approx(summary['test_loss'], rel=1e-6)
  # BatchNorm's statistics are a collection of their own, as a Linen model's batch_stats.
  model = models.build(config.model, 10)
  assert list(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))) == [
      'params', 'batch_stats']
  sys.modules.pop('mnist_jax.models.bn_mlp_nnx', None)
