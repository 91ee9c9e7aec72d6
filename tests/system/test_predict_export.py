"""--mode=predict and --mode=export in fresh processes, and the exported artifacts run without
mnist_jax: jax.export's with jax alone, ONNX with onnxruntime alone (no JAX)."""

import csv
import json
import subprocess
import textwrap

import numpy as np
import pytest

from conftest import REPO_ROOT
from conftest import readme_example
from predict_utils import CLASSES
from predict_utils import trained

# Each script prints one JSON line; it also says what it imported (what a consumer needs).
INFERENCE = '''
import json, sys, numpy as np
from mnist_jax import inference
model = inference.load(sys.argv[1], cache_dir='none')
np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))
print(json.dumps(dict(tensorflow='tensorflow' in sys.modules)))
'''
JAX_CONSUMER = '''
import json, sys, numpy as np, jax
exported = jax.export.deserialize(bytearray(open(sys.argv[1], 'rb').read()))
np.save(sys.argv[3], np.asarray(exported.call(np.load(sys.argv[2]))))
print(json.dumps(dict(mnist_jax=any(m.startswith('mnist_jax') for m in sys.modules),
                      tensorflow='tensorflow' in sys.modules)))
'''
ONNX_CONSUMER = '''
import json, sys, numpy as np, onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])
np.save(sys.argv[3], session.run(['probabilities'], {'images': np.load(sys.argv[2])})[0])
print(json.dumps(dict(jax='jax' in sys.modules, mnist_jax='mnist_jax' in sys.modules)))
'''


def _run(args, env, python, timeout=300):
  return subprocess.run([python, *args], cwd=REPO_ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


def _script(code, args, env, python) -> dict:
  out = _run(['-c', textwrap.dedent(code), *map(str, args)], env, python)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _mode(mode, name, workdir, env, python, *flags):
  return _run(['run.py', f'--config=configs/{name}.py', f'--mode={mode}',
               f'--workdir={workdir}', '--config.cache_dir=none', *flags], env, python)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['mlp', 'cnn', 'cnn_bn', 'cnn_nnx'])
def test_exported_artifacts_give_predicts_probabilities(tmp_path, name, subprocess_env,
                                                        python):
  workdir, summary, arrays = trained(tmp_path, name)
  images = tmp_path / 'images.npy'
  np.save(images, arrays['test_images'])  # uint8 [21, 28, 28, 1]: the dataset's own.
  out = _mode('export', name, workdir, subprocess_env, python)
  assert out.returncode == 0, out.stderr
  assert 'Traceback' not in out.stderr and f'to {workdir}/export' in out.stdout
  export = workdir / 'export'
  description = json.loads((export / 'model.json').read_text())
  assert description['class_names'] == list(CLASSES)
  assert description['input']['dtype'] == 'uint8'
  assert description['input']['shape'] == ['batch', 28, 28, 1]
  assert description['output']['shape'] == ['batch', 3]
  assert description['source']['step'] == summary['steps']

  imported = _script(INFERENCE, [workdir, images, tmp_path / 'predict.npy'], subprocess_env,
                     python)
  assert imported == dict(tensorflow=False)  # inference never imports TensorFlow.
  imported = _script(JAX_CONSUMER, [export / 'model.jax_export', images, tmp_path / 'jax.npy'],
                     subprocess_env, python)
  assert imported == dict(mnist_jax=False, tensorflow=False)
  imported = _script(ONNX_CONSUMER, [export / 'model.onnx', images, tmp_path / 'onnx.npy'],
                     subprocess_env, python)
  assert imported == dict(jax=False, mnist_jax=False)

  predicted = np.load(tmp_path / 'predict.npy')
  assert predicted.shape == (21, 3)
  accuracy = np.mean(predicted.argmax(-1) == arrays['test_labels'])
  assert accuracy == pytest.approx(summary['test_accuracy'], abs=1e-6)
  np.testing.assert_allclose(np.load(tmp_path / 'jax.npy'), predicted, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.load(tmp_path / 'onnx.npy'), predicted, rtol=0, atol=1e-4)


def _write_pngs(folder, images, labels):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder.mkdir()
  for i, (image, label) in enumerate(zip(images, labels)):
    Image.fromarray(image[..., 0]).save(folder / f'{i:03d}_{CLASSES[label]}.png')


@pytest.mark.slow
def test_predict_on_png_files_matches_evaluate(tmp_path, subprocess_env, python):
  workdir, summary, arrays = trained(tmp_path, 'cnn_bn')
  _write_pngs(tmp_path / 'pngs', arrays['test_images'], arrays['test_labels'])
  out = _mode('predict', 'cnn_bn', workdir, subprocess_env, python,
              f'--images={tmp_path}/pngs/*.png')
  assert out.returncode == 0, out.stderr
  printed = list(csv.reader(out.stdout.splitlines()))
  out = _mode('predict', 'cnn_bn', workdir, subprocess_env, python,
              f'--images={tmp_path}/pngs/*.png', f'--output={tmp_path}/out.csv')
  assert out.returncode == 0, out.stderr
  assert f'wrote 21 predictions to {tmp_path}/out.csv' in out.stdout
  with open(tmp_path / 'out.csv', newline='') as f:
    rows = list(csv.reader(f))
  assert rows[0] == ['path', 'prediction', 'probability'] and rows[1:] == printed
  assert len(printed) == 21 and all(len(row) == 3 for row in printed)
  # --mode=evaluate with the run's own config: the workdir's config.json, as a config file.
  (tmp_path / 'same_run.py').write_text(textwrap.dedent(f'''
      import json
      import ml_collections
      def tuples(x):
        if isinstance(x, dict):
          return {{k: tuples(v) for k, v in x.items()}}
        return tuple(map(tuples, x)) if isinstance(x, list) else x
      def get_config():
        written = json.load(open({str(workdir / 'config.json')!r}))
        written.pop('resolved')
        return ml_collections.ConfigDict(tuples(written))
  '''))
  evaluated = _run(['run.py', f'--config={tmp_path}/same_run.py', '--mode=evaluate',
                    f'--workdir={workdir}'], subprocess_env, python)
  assert evaluated.returncode == 0, evaluated.stderr
  test_accuracy = json.loads(evaluated.stdout.strip().splitlines()[-1])['test_accuracy']
  right = [row[1] == row[0].rsplit('_', 1)[1][:-len('.png')] for row in printed]
  assert np.mean(right) == pytest.approx(test_accuracy, abs=1e-6)
  assert test_accuracy == pytest.approx(summary['test_accuracy'], abs=1e-6)
  # The same labels and probabilities as inference's predict on the arrays.
  np.save(tmp_path / 'images.npy', arrays['test_images'])
  _script(INFERENCE, [workdir, tmp_path / 'images.npy', tmp_path / 'predict.npy'],
          subprocess_env, python)
  predicted = np.load(tmp_path / 'predict.npy')
  assert [row[1] for row in printed] == [CLASSES[i] for i in predicted.argmax(-1)]
  np.testing.assert_allclose([float(row[2]) for row in printed], predicted.max(-1), atol=1e-6)


@pytest.mark.slow
def test_predict_and_export_failures_are_one_line(tmp_path, subprocess_env, python):
  workdir, _, arrays = trained(tmp_path, 'mlp')
  images = tmp_path / 'mixed'
  _write_pngs(images, arrays['test_images'][:3], arrays['test_labels'][:3])
  (images / 'corrupt.png').write_bytes(b'\x89PNG not really')
  np.save(images / 'wrong.npy', np.zeros((28, 28, 2), np.uint8))
  np.save(images / 'stack.npy', arrays['test_images'][:2])
  np.save(images / 'empty.npy', arrays['test_images'][:0])

  out = _mode('predict', 'mlp', workdir, subprocess_env, python, f'--images={images}/*')
  assert out.returncode == 3, out.stderr
  assert 'Traceback' not in out.stderr
  errors = out.stderr.strip().splitlines()
  assert len(errors) == 4, out.stderr
  assert errors[0].startswith(f'error: cannot read {images}/corrupt.png (')
  assert errors[1] == (f'error: cannot convert {images}/empty.npy: it holds '
                       'uint8[0, 28, 28, 1], a stack of no images; give a file of at least one '
                       'image.')
  assert errors[2].startswith(f'error: cannot convert {images}/wrong.npy: it holds '
                              'uint8[28, 28, 2]')
  assert errors[3] == ('error: 3 of 7 files could not be read or converted (named above); '
                       'the other 4 were predicted.')
  paths = [row[0] for row in csv.reader(out.stdout.splitlines())]
  assert paths == [*(str(p) for p in sorted(images.glob('*.png')) if 'corrupt' not in p.name),
                   f'{images}/stack.npy[0]', f'{images}/stack.npy[1]']

  def one_line(out, code, text):
    assert out.returncode == code, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in out.stderr, out.stderr
    assert text in lines[0], lines[0]

  one_line(_mode('predict', 'mlp', workdir, subprocess_env, python,
                 f'--images={tmp_path}/none/*.png'), 1,
           f"--images='{tmp_path}/none/*.png' matches no file")
  one_line(_mode('predict', 'mlp', tmp_path / 'missing', subprocess_env, python,
                 f'--images={images}/*.png'), 1, f'{tmp_path}/missing does not exist')
  (tmp_path / 'empty').mkdir()
  one_line(_mode('export', 'mlp', tmp_path / 'empty', subprocess_env, python), 1,
           f'{tmp_path}/empty holds no run (no readable config.json)')
  untrained = tmp_path / 'untrained'
  untrained.mkdir()
  (untrained / 'config.json').write_text((workdir / 'config.json').read_text())
  one_line(_mode('export', 'mlp', untrained, subprocess_env, python), 1,
           f'no checkpoint in {untrained}/checkpoints: train first')
  one_line(_run(['run.py', '--config=configs/mlp.py', '--mode=predict', f'--images={images}'],
                subprocess_env, python), 2, '--mode=predict needs --workdir')
  for mode in ('predict', 'export'):  # Its run kept no moving average.
    one_line(_mode(mode, 'mlp', workdir, subprocess_env, python, '--weights=ema',
                   f'--images={images}/*.png'), 1,
             "weights='ema' is invalid for")
  one_line(_mode('predict', 'mlp', workdir, subprocess_env, python, f'--images={images}/*.png',
                 f'--output={tmp_path}/missing/out.csv'), 1,
           f'--output={tmp_path}/missing/out.csv cannot be written: {tmp_path}/missing does '
           'not exist')
  edited = tmp_path / 'edited'
  edited.mkdir()
  written = json.loads((workdir / 'config.json').read_text())
  written['model']['depth'] = 3  # A field this code's model does not take.
  (edited / 'config.json').write_text(json.dumps(written))
  one_line(_mode('export', 'mlp', edited, subprocess_env, python), 1,
           f'{edited}/config.json does not match the model code here')
  before = sorted(p.name for p in workdir.iterdir())
  (workdir / 'export').write_text('a file where the export folder goes')
  one_line(_mode('export', 'mlp', workdir, subprocess_env, python), 1,
           f'cannot write the export into {workdir}/export (')
  assert sorted(p.name for p in workdir.iterdir()) == sorted([*before, 'export'])
  assert (workdir / 'export').read_text() == 'a file where the export folder goes'


@pytest.mark.slow
def test_predict_into_a_closed_pipe_ends_quietly(tmp_path, subprocess_env, python):
  """`... --mode=predict | head -1`: no BrokenPipeError traceback, exit status 141 (128 +
  SIGPIPE) as a shell reports for `cat` stopped so."""
  workdir, _, arrays = trained(tmp_path, 'mlp')
  np.save(tmp_path / 'many.npy', np.repeat(arrays['test_images'], 250, axis=0))  # 5,250 lines.
  process = subprocess.Popen(
      [python, 'run.py', '--config=configs/mlp.py', '--mode=predict', f'--workdir={workdir}',
       '--config.cache_dir=none', f'--images={tmp_path}/many.npy'], cwd=REPO_ROOT,
      env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = process.stdout.readline()
  process.stdout.close()
  stderr = process.stderr.read()
  assert process.wait(timeout=300) == 141, stderr
  assert first.startswith(f'{tmp_path}/many.npy[0],') and stderr == ''


@pytest.mark.slow
def test_the_readme_consumers_run_as_written(tmp_path, subprocess_env, python):
  """docs/inference.md's two ten-line consumers, in the export folder with a digit.png, in fresh
  processes: they print the class name and probability that predict gives."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  workdir, _, arrays = trained(tmp_path, 'cnn_bn')
  assert _mode('export', 'cnn_bn', workdir, subprocess_env, python).returncode == 0
  export = workdir / 'export'
  image = arrays['test_images'][4]
  Image.fromarray(image[..., 0]).save(export / 'digit.png')
  np.save(tmp_path / 'one.npy', image[None])
  _script(INFERENCE, [workdir, tmp_path / 'one.npy', tmp_path / 'probs.npy'], subprocess_env,
          python)
  probs = np.load(tmp_path / 'probs.npy')[0]
  for tag in ('jax_export_consumer', 'onnx_consumer'):
    out = subprocess.run([python, '-c', readme_example(tag)], cwd=export,
                         env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    name, probability = out.stdout.split()
    assert name == CLASSES[probs.argmax()]
    assert float(probability) == pytest.approx(float(probs.max()), abs=1e-4)
