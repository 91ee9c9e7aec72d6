"""inference.load and predict, in process: the model a workdir holds, and how images convert.

tests/system/test_predict_export.py runs run.py's --mode=predict and --mode=export in fresh
processes, and the exported artifacts without mnist_jax.
"""

import json
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from predict_utils import CLASSES
from predict_utils import trained
from mnist_jax import datasets
from mnist_jax import export
from mnist_jax import inference
from mnist_jax import writers
from mnist_jax.infra import errors

@pytest.mark.parametrize('name', ['mlp', 'cnn_bn', 'cnn_nnx'])
def test_load_gives_the_trained_model(tmp_path, name):
  workdir, summary, arrays = trained(tmp_path, name)
  model = inference.load(str(workdir), cache_dir='none')
  assert model.class_names == CLASSES and model.image_shape == (28, 28, 1)
  assert model.step == summary['steps'] and model.replica is None
  assert model.summary['param_fingerprint'] == summary['param_fingerprint']
  params, rest = model.variables['params'], {k: v for k, v in model.variables.items()
                                             if k != 'params'}
  assert writers.fingerprint(params, rest) == summary['param_fingerprint']  # Every array.
  assert ('batch_stats' in rest) == (name == 'cnn_bn')
  probs = model.predict(arrays['test_images'])
  assert probs.shape == (21, 3) and probs.dtype == np.float32
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  accuracy = np.mean(probs.argmax(-1) == arrays['test_labels'])
  assert accuracy == pytest.approx(summary['test_accuracy'], abs=1e-6)
  # Floats in [0, 1] are the same images; [B, H, W] is one channel.
  np.testing.assert_allclose(model.predict(arrays['test_images'].astype(np.float32) / 255),
                             probs, atol=1e-6)
  np.testing.assert_allclose(model.predict(arrays['test_images'][..., 0]), probs, atol=1e-6)


def test_predict_pads_batches_and_matches_the_report_function(tmp_path):
  workdir, _, arrays = trained(tmp_path, 'cnn_bn')
  model = inference.load(str(workdir), cache_dir='none', batch_size=8)
  images = arrays['test_images']  # 21: batches of 8, 8 and 5 (padded to 8).
  probs = model.predict(images)
  singles = np.concatenate([model.predict(images[i:i + 1]) for i in range(len(images))])
  np.testing.assert_allclose(singles, probs, atol=1e-6)  # Padding changes no example.
  config = json.loads((workdir / 'config.json').read_text())
  assert config['resolved']['dataset']['class_names'] == list(CLASSES)
  assert model.predict(images[:0]).shape == (0, 3)
  with pytest.raises(ValueError, match=r'this model takes \[B, 28, 28, 1\]'):
    model.predict(np.zeros((2, 14, 14, 1), np.uint8))
  with pytest.raises(ValueError, match=r'float images must be in \[0, 1\]; these are in \[0, 250\]'):
    model.predict(images.astype(np.float32))  # 0-255 as floats: not silently wrong.
  with pytest.raises(ValueError, match='dtype int64: expected uint8'):
    model.predict(images.astype(np.int64))


def test_load_reads_an_older_step(tmp_path):
  workdir, summary, _ = trained(tmp_path, 'mlp', checkpoint_keep=5)
  steps_per_epoch = summary['steps'] // 3
  model = inference.load(str(workdir), step=steps_per_epoch, cache_dir='none')
  assert model.step == steps_per_epoch
  assert writers.fingerprint(model.variables['params']) != summary['param_fingerprint']
  with pytest.raises(errors.UserError, match=r'no checkpoint at step 5 in .*holds steps \[6, 12, 18\]'):
    inference.load(str(workdir), step=5, cache_dir='none')


def test_replicas_default_to_the_best_and_are_chosen_by_name_or_index(tmp_path):
  workdir, summary, arrays = trained(tmp_path, 'mlp', num_seeds=3)
  scores = summary['test_accuracy_per_replica']
  names = [row['replica'] for row in summary['replicas']]
  best = inference.load(str(workdir), cache_dir='none')
  assert best.replica == names[int(np.argmax(scores))]
  for i, name in enumerate(names):
    by_name = inference.load(str(workdir), replica=name, cache_dir='none')
    by_index = inference.load(str(workdir), replica=i, cache_dir='none')
    assert by_name.replica == by_index.replica == name
    assert (writers.fingerprint(by_name.variables['params'])
            == summary['param_fingerprint_per_replica'][i])
    accuracy = np.mean(by_index.predict(arrays['test_images']).argmax(-1)
                       == arrays['test_labels'])
    assert accuracy == pytest.approx(scores[i], abs=1e-6)
  with pytest.raises(inference.NotAModel, match='replica 3 is out of range: .* 3 replicas'):
    inference.load(str(workdir), replica=3, cache_dir='none')
  with pytest.raises(inference.NotAModel, match="no replica 'seed=9'; it holds: seed=0"):
    inference.load(str(workdir), replica='seed=9', cache_dir='none')


def test_a_workdir_without_a_model_is_one_clear_error(tmp_path):
  with pytest.raises(inference.NotAModel, match='does not exist'):
    inference.load(str(tmp_path / 'nowhere'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(inference.NotAModel, match='holds no run'):
    inference.load(str(tmp_path / 'empty'))
  workdir, _, _ = trained(tmp_path, 'mlp')
  for path in sorted((workdir / 'checkpoints').iterdir()):
    for child in sorted(path.rglob('*'), reverse=True):
      child.unlink() if child.is_file() else child.rmdir()
    path.rmdir()
  with pytest.raises(errors.UserError, match='no checkpoint in .*train first'):
    inference.load(str(workdir), cache_dir='none')


def _edit_model_config(source, target, **fields):
  """A copy of the workdir `source` whose config.json's model has `fields` changed."""
  shutil.copytree(source, target)
  written = json.loads((target / 'config.json').read_text())
  written['model'].update(fields)
  (target / 'config.json').write_text(json.dumps(written))
  return target


def test_a_config_json_that_does_not_match_the_model_is_one_clear_error(tmp_path, capsys):
  workdir, _, _ = trained(tmp_path, 'mlp')  # hidden_sizes (8,)
  unknown = _edit_model_config(workdir, tmp_path / 'unknown', depth=3)
  with pytest.raises(inference.NotAModel, match=r'unknown/config.json does not match the model '
                     r"code here \(config.model.depth is invalid: .* no argument 'depth'"):
    inference.load(str(unknown), cache_dir='none')
  wider = _edit_model_config(workdir, tmp_path / 'wider', hidden_sizes=[16])
  with pytest.raises(inference.NotAModel, match=r'the checkpoint at step 18 in .*wider/checkpoints '
                     r'does not match .*wider/config.json \(params/Dense_0/bias: saved \(8,\), '
                     r"the config's model \(16,\)\)"):
    inference.load(str(wider), cache_dir='none')
  assert 'unreadable' not in capsys.readouterr().err  # Not each checkpoint tried and failed.


# --- Conversion of any image to the dataset's format ------------------------------------------

def test_conform_image_converts_values_channels_and_size():
  gray = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
  assert datasets.conform_image(gray, (28, 28, 1)).shape == (28, 28, 1)
  np.testing.assert_array_equal(datasets.conform_image(gray, (28, 28, 1))[..., 0], gray)
  np.testing.assert_array_equal(  # Floats in [0, 1]: round(x * 255).
      datasets.conform_image(gray / 255.0, (28, 28, 1))[..., 0], gray)
  rgb = np.zeros((28, 28, 3), np.uint8)
  rgb[..., 0] = 100  # Pure red: PIL's luma 0.299 * 100 = 29.9.
  assert np.all(datasets.conform_image(rgb, (28, 28, 1)) == 30)
  color = datasets.conform_image(gray, (28, 28, 3))  # Gray repeated into 3 channels.
  assert color.shape == (28, 28, 3) and np.all(color == gray[..., None])
  big = np.full((56, 84), 200, np.uint8)  # Resized, bilinear, aspect ratio not kept.
  small = datasets.conform_image(big, (28, 28, 1))
  assert small.shape == (28, 28, 1) and np.all(small == 200)


@pytest.mark.parametrize('image, words', [
    (np.zeros((5,), np.uint8), r'holds uint8\[5\]'),
    (np.zeros((28, 28, 2), np.uint8), r'holds uint8\[28, 28, 2\]'),
    (np.full((28, 28), 1.5), r'values are in \[1.5, 1.5\]'),
    (np.full((28, 28), np.nan, np.float32), r'values are in \[nan, nan\]'),
    (np.zeros((28, 28), np.int64), r'holds int64\[28, 28\]; expected uint8'),
])
def test_conform_image_refuses_what_it_cannot_convert(image, words):
  with pytest.raises(errors.UserError, match=rf'cannot convert x.npy: (it |its )?{words}'):
    datasets.conform_image(image, (28, 28, 1), 'x.npy')


def test_sixteen_bit_images_are_scaled_to_eight_bits_and_alpha_is_dropped(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  wide = np.array([[0, 128, 129, 257, 32896, 65535]], np.uint16)  # round(x / 257)
  np.testing.assert_array_equal(datasets.conform_image(wide, (1, 6, 1))[..., 0],
                                [[0, 0, 1, 1, 128, 255]])
  gray = np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.uint8)
  Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / 'gray16.png')
  assert Image.open(tmp_path / 'gray16.png').mode == 'I;16'
  read = datasets.read_for_model(str(tmp_path / 'gray16.png'), (28, 28, 1))
  np.testing.assert_array_equal(read[0][..., 0], gray)  # Not clipped at 255.
  rgba = np.random.default_rng(1).integers(0, 256, (28, 28, 4)).astype(np.uint8)
  Image.fromarray(rgba).save(tmp_path / 'rgba.png')
  Image.fromarray(rgba[..., :3]).save(tmp_path / 'rgb.png')
  read = [datasets.read_for_model(str(tmp_path / f'{name}.png'), (28, 28, 3))[0]
          for name in ('rgba', 'rgb')]
  np.testing.assert_array_equal(read[0], read[1])  # Alpha dropped, not composited.
  np.testing.assert_array_equal(read[0], rgba[..., :3])


def test_read_for_model_reads_png_jpeg_and_npy_stacks(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rgb = np.random.default_rng(0).integers(0, 255, (40, 30, 3)).astype(np.uint8)
  Image.fromarray(rgb).save(tmp_path / 'a.png')
  Image.fromarray(rgb).save(tmp_path / 'a.jpg')
  np.save(tmp_path / 'stack.npy', np.zeros((4, 28, 28), np.uint8))
  np.save(tmp_path / 'one.npy', np.zeros((28, 28, 1), np.float32))
  png = datasets.read_for_model(str(tmp_path / 'a.png'), (28, 28, 1))
  expected = np.asarray(Image.fromarray(rgb).convert('L').resize((28, 28),
                                                                 Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(png[0][..., 0], expected)
  assert datasets.read_for_model(str(tmp_path / 'a.jpg'), (28, 28, 3))[0].shape == (28, 28, 3)
  assert len(datasets.read_for_model(str(tmp_path / 'stack.npy'), (28, 28, 1))) == 4
  assert len(datasets.read_for_model(str(tmp_path / 'one.npy'), (28, 28, 1))) == 1
  (tmp_path / 'bad.png').write_bytes(b'not an image')
  with pytest.raises(errors.UserError, match=r'cannot read .*bad.png \(UnidentifiedImageError'):
    datasets.read_for_model(str(tmp_path / 'bad.png'), (28, 28, 1))
  np.save(tmp_path / 'empty.npy', np.zeros((0, 28, 28), np.uint8))
  with pytest.raises(errors.UserError, match=r'cannot convert .*empty.npy: it holds '
                     r'uint8\[0, 28, 28\], a stack of no images'):
    datasets.read_for_model(str(tmp_path / 'empty.npy'), (28, 28, 1))


PREDICT_OPTIONS = ml_collections.ConfigDict(dict(eval_batch_size=8, cache_dir='none'))


def _printed(capsys) -> tuple[list[list[str]], list[str]]:
  out, err = capsys.readouterr()
  return [line.split(',') for line in out.splitlines()], err.splitlines()


def test_predict_files_names_npy_images_whatever_the_case_and_refuses_empty_stacks(
    tmp_path, capsys):
  workdir, _, arrays = trained(tmp_path, 'mlp')
  folder = tmp_path / 'in'
  folder.mkdir()
  np.save(folder / 'one.npy', arrays['test_images'][0])
  (folder / 'one.npy').rename(folder / 'ONE.NPY')
  np.save(folder / 'empty.npy', arrays['test_images'][:0])
  capsys.readouterr()  # (Training's lines.)
  with pytest.raises(inference.SomeImagesFailed, match='1 of 2 files .* the other 1 were'):
    inference.predict_files(PREDICT_OPTIONS, str(workdir), f'{folder}/*')
  rows, err = _printed(capsys)
  assert [row[0] for row in rows] == [f'{folder}/ONE.NPY[0]']  # As one.npy's: path[0].
  assert err[0] == (f'error: cannot convert {folder}/empty.npy: it holds uint8[0, 28, 28, 1], '
                    'a stack of no images; give a file of at least one image.')


@pytest.mark.parametrize('where, why', [('missing/out.csv', 'missing does not exist'),
                                        ('.', 'it is a folder')])
def test_an_output_that_cannot_be_written_fails_before_anything_is_predicted(
    tmp_path, capsys, where, why):
  np.save(tmp_path / 'x.npy', np.zeros((2, 28, 28), np.uint8))
  output = tmp_path / where  # The workdir does not exist: the output is checked first.
  with pytest.raises(errors.UserError, match=rf'--output={output} cannot be written: .*{why}'):
    inference.predict_files(PREDICT_OPTIONS, str(tmp_path / 'nowhere'), f'{tmp_path}/x.npy',
                            output=str(output))
  assert capsys.readouterr().out == ''



def test_an_ema_run_predicts_with_its_average_by_default(tmp_path):
  workdir, summary, arrays = trained(tmp_path, 'cnn_bn', ema_decay=0.5)
  averaged = inference.load(str(workdir), cache_dir='none')
  raw = inference.load(str(workdir), weights='raw', cache_dir='none')
  assert (averaged.weights, raw.weights) == ('ema', 'raw')
  images, labels = arrays['test_images'], arrays['test_labels']
  for model, key in ((averaged, 'test_ema_accuracy'), (raw, 'test_accuracy')):
    accuracy = np.mean(model.predict(images).argmax(-1) == labels)
    assert accuracy == pytest.approx(summary[key], abs=1e-6)
  params = (averaged.variables['params'], raw.variables['params'])
  assert writers.fingerprint(params[0]) != writers.fingerprint(params[1])
  assert 'batch_stats' in averaged.variables  # BatchNorm's statistics are averaged too.
  with pytest.raises(inference.NotAModel, match="weights='ema' is invalid .*config.ema_decay=0"):
    (tmp_path / 'b').mkdir()
    inference.load(str(trained(tmp_path / 'b', 'mlp')[0]), weights='ema', cache_dir='none')


def test_predict_files_and_export_take_the_weights(tmp_path, capsys):
  workdir, _, arrays = trained(tmp_path, 'mlp', ema_decay=0.9)
  np.save(tmp_path / 'images.npy', arrays['test_images'])
  models = {w: inference.load(str(workdir), weights=w, cache_dir='none') for w in ('ema', 'raw')}
  probs = {w: m.predict(arrays['test_images']) for w, m in models.items()}
  assert np.abs(probs['ema'] - probs['raw']).max() > 1e-3  # The two are told apart.
  capsys.readouterr()  # (Training's lines.)
  for weights, expected in (('', 'ema'), ('raw', 'raw')):
    inference.predict_files(PREDICT_OPTIONS, str(workdir), f'{tmp_path}/images.npy',
                            weights=weights)
    rows, _ = _printed(capsys)
    np.testing.assert_allclose([float(row[2]) for row in rows], probs[expected].max(-1),
                               atol=2e-6)
  description = export.export(PREDICT_OPTIONS, str(workdir), weights='raw')
  assert description['source']['weights'] == 'raw'
  written = json.loads((workdir / 'export' / export.MODEL_JSON).read_text())
  assert written['source']['weights'] == 'raw'
  exported = jax.export.deserialize(bytearray((workdir / 'export' / export.JAX_EXPORT)
                                              .read_bytes()))
  np.testing.assert_allclose(exported.call(arrays['test_images']), probs['raw'], atol=1e-5)
  assert export.describe(models['ema'], {})['source']['weights'] == 'ema'  # The default.


def test_a_relative_workdir_loads(tmp_path, monkeypatch):
  workdir, summary, _ = trained(tmp_path, 'mlp')
  monkeypatch.chdir(tmp_path)
  model = inference.load(workdir.name, cache_dir='none')
  assert model.summary['param_fingerprint'] == summary['param_fingerprint']


def test_the_default_replica_mid_epoch_is_the_last_epochs_best_and_never_a_diverged_one(
    tmp_path):
  """A sweep with a learning rate that diverges: its replica is never the default, at an epoch
  end or at a checkpoint mid-epoch (no epoch record of that step); chosen, it is one line."""
  workdir, summary, _ = trained(tmp_path, 'mlp', checkpoint_every_steps=4, checkpoint_keep=20,
                                **{'sweep.learning_rate': (1e38, 3e-3)})
  assert summary['replicas'][0]['diverged_at_step'] is not None
  good = summary['replicas'][1]['replica']
  steps_saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir())
  mid = [s for s in steps_saved if s % 6]  # 6 steps an epoch: 4, 8, 10 (not 6, 12, 18).
  assert mid
  for step in steps_saved:
    assert inference.load(str(workdir), step=step, cache_dir='none').replica == good
  with pytest.raises(inference.NotAModel, match='hold NaN or Inf: that replica diverged'):
    inference.load(str(workdir), replica=0, cache_dir='none')
