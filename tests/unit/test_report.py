"""report.png and report.md: written, decodable, the right size, holding the run's numbers."""

import json
import re

from matplotlib import image as mpimg
from matplotlib import text as mtext
import numpy as np
import pytest

from mnist_jax import report

CONFIG = dict(dataset='mnist', model=dict(name='mlp', hidden_sizes=[512]), optimizer='rmsprop',
              learning_rate=1e-3, optimizer_kwargs=dict(decay=0.9, eps=1e-7), num_epochs=5)


def make_history(num_epochs: int) -> list[dict]:
  return [dict(epoch=e, train_loss=0.3 / e, train_accuracy=1 - 0.08 / e, test_loss=0.15 / e,
               test_accuracy=1 - 0.04 / e) for e in range(1, num_epochs + 1)]


def make_worst(num_wrong: int, channels: int = 1) -> dict:
  rng = np.random.default_rng(0)
  return dict(image=rng.integers(0, 256, (num_wrong, 28, 28, channels), dtype=np.uint8),
              label=np.arange(num_wrong) % 10, predicted=(np.arange(num_wrong) + 1) % 10,
              confidence=np.linspace(0.999, 0.5, num_wrong))


def make_confusion(num_wrong: int) -> np.ndarray:
  confusion = np.diag(np.full(10, 1000))
  for i in range(num_wrong):
    confusion[i % 10, (i + 1) % 10] += 1
  return confusion


def make_summary(history: list[dict]) -> dict:
  final = history[-1]
  return dict(test_accuracy=final['test_accuracy'], test_loss=final['test_loss'],
              train_accuracy=final['train_accuracy'], train_loss=final['train_loss'],
              epochs=len(history), steps=469 * len(history), num_params=407050,
              param_fingerprint='0123abcd' * 8, train_seconds=3.71, total_seconds=5.02)


def write(tmp_path, num_epochs: int, num_wrong: int, channels: int = 1):
  history = make_history(num_epochs)
  return history, report.write_report(tmp_path, history, make_confusion(num_wrong),
                                      make_worst(num_wrong, channels), make_summary(history),
                                      CONFIG)


def figure_texts(num_epochs: int, num_wrong: int) -> list[str]:
  history = make_history(num_epochs)
  fig = report._figure(history, make_confusion(num_wrong), make_worst(num_wrong), CONFIG)
  return [t.get_text() for t in fig.findobj(mtext.Text)]


def assert_png(path):
  pixels = mpimg.imread(path)
  width, height = report.PIXEL_SIZE
  assert pixels.shape[:2] == (height, width) == (1000, 1600)
  assert pixels[..., :3].std() > 0.05  # Not a blank canvas.


@pytest.mark.parametrize('num_epochs, num_wrong', [(5, 16), (1, 0), (2, 3), (3, 40)])
def test_png_written_and_sized(tmp_path, num_epochs, num_wrong):
  _, (png, md) = write(tmp_path, num_epochs, num_wrong)
  assert (png, md) == (tmp_path / 'report.png', tmp_path / 'report.md')
  assert_png(png)


def test_rgb_examples(tmp_path):
  _, (png, _) = write(tmp_path, 2, 4, channels=3)
  assert_png(png)


def test_markdown_holds_the_numbers(tmp_path):
  history, (_, md) = write(tmp_path, 5, 16)
  text = md.read_text()
  assert f"| test accuracy | {history[-1]['test_accuracy']:.4f} |" in text
  assert '| steps | 2,345 |' in text and '| parameters | 407,050 |' in text
  assert '`' + '0123abcd' * 8 + '`' in text
  assert '| training time | 3.7 s |' in text and '| total time | 5.0 s |' in text
  assert '](report.png)' in text
  epoch_rows = re.findall(r'^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$', text,
                          re.MULTILINE)
  assert [tuple(map(float, row)) for row in epoch_rows] == [
      tuple(round(r[k], 4) for k in ('epoch', 'train_loss', 'train_accuracy', 'test_loss',
                                     'test_accuracy')) for r in history]
  config_json = re.search(r'```json\n(.*?)\n```', text, re.DOTALL).group(1)
  assert json.loads(config_json) == CONFIG


def test_markdown_one_epoch_and_missing_summary_fields(tmp_path):
  history = make_history(1)
  _, md = report.write_report(tmp_path, history, make_confusion(0), make_worst(0),
                              dict(test_accuracy=0.96), CONFIG)
  text = md.read_text()
  assert '| test accuracy | 0.9600 |' in text
  assert '| 1 | 0.3000 | 0.9200 | 0.1500 | 0.9600 |' in text
  assert 'steps' not in text.split('## Per epoch')[0]


def test_figure_title_and_panels():
  texts = figure_texts(5, 16)
  title = 'mnist mlp (512,), rmsprop lr=0.001: test accuracy 0.9920 after 5 epochs'
  assert title in texts
  assert {'loss per epoch', 'accuracy per epoch', 'predicted', 'true'} <= set(texts)
  assert 'most confidently wrong (16 of 16 errors)' in texts
  assert 'true 0 / pred 1 (100%)' in texts and 'true 5 / pred 6 (50%)' in texts
  assert 'no errors' not in texts


def test_figure_no_errors():
  texts = figure_texts(1, 0)
  assert 'no errors' in texts
  assert 'mnist mlp (512,), rmsprop lr=0.001: test accuracy 0.9600 after 1 epoch' in texts


def test_figure_shows_at_most_16_examples():
  texts = figure_texts(2, 40)
  assert 'most confidently wrong (16 of 40 errors)' in texts
  assert sum(t.startswith('true ') and '/ pred' in t for t in texts) == report.MAX_WORST
