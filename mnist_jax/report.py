"""A run's report: `report.png` (curves, confusion matrix, worst errors) and `report.md`.

`write_run_report` takes what the run has (its per-epoch history, the test split and the
model's probabilities on it) and prepares the rest here: the confusion matrix and the most
confidently wrong examples. The curves and tables show the loss and every metric the
history holds (config.metrics), so a new metric needs nothing here.

Matplotlib is imported here only, with the Agg canvas: no display is needed.
"""

import io
import json
import pathlib
from typing import Any

from matplotlib import gridspec
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from mnist_jax import metrics
from mnist_jax.infra import storage

FIGSIZE = (16, 10)  # Inches.
DPI = 100
PIXEL_SIZE = (FIGSIZE[0] * DPI, FIGSIZE[1] * DPI)  # (width, height) of report.png.
MAX_WORST = 16  # Most-confidently-wrong examples shown, on a 4 x 4 grid.
_MAX_ANNOTATED_CLASSES = 20  # Confusion matrices larger than this get no counts in the cells.


def _names(config: dict) -> tuple[str, str]:
  """('mlp (512,)', 'rmsprop lr=0.001') from the config, tolerating missing fields."""
  model = config.get('model', {})
  model_name = ' '.join(str(part) for part in (model.get('name', 'model'),
                                               tuple(model.get('hidden_sizes', ())) or '') if part)
  optimizer = config.get('optimizer', 'optimizer')
  if 'learning_rate' in config:
    optimizer += f" lr={config['learning_rate']:g}"
  return model_name, optimizer


def metric_names(record: dict) -> list[str]:
  """'loss', then the metrics of a record in their order (its 'test_<name>' keys; the EMA's
  'test_ema_<name>' are those metrics' of the averaged weights)."""
  names = [k[len('test_'):] for k in record if k.startswith('test_')
           and not k.startswith('test_ema_') and not k.endswith(('_std', '_per_replica'))]
  return ['loss'] + [name for name in names if name != 'loss']


def headline(record: dict) -> str:
  """The metric a title reports (`metrics.headline`)."""
  return metrics.headline(metric_names(record))


def confusion_matrix(labels_N: np.ndarray, predicted_N: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """Counts [C, C]: rows the true class, columns the predicted one."""
  confusion = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(confusion, (labels_N, predicted_N), 1)
  return confusion


def worst_errors(images, labels_N, probs_NxC, limit: int = MAX_WORST) -> dict:
  """The `limit` wrong predictions made with the highest confidence, most confident first."""
  predicted, confidence = probs_NxC.argmax(-1), probs_NxC.max(-1)
  wrong = np.flatnonzero(predicted != labels_N)
  worst = wrong[np.argsort(-confidence[wrong], kind='stable')][:limit]
  return dict(image=images[worst], label=labels_N[worst], predicted=predicted[worst],
              confidence=confidence[worst])


def _plot_curves(ax, history: list[dict], metric: str) -> None:
  epochs = [record['epoch'] for record in history]
  for split, style in (('train', 'o-'), ('test', 's-'), ('test_ema', 'd--')):
    if f'{split}_{metric}' in history[-1]:  # test_ema: the EMA's weights (config.ema_decay).
      ax.plot(epochs, [record[f'{split}_{metric}'] for record in history], style,
              label=split.replace('_', ' '))
  ax.set(title=f'{metric} per epoch', xlabel='epoch', ylabel=metric)
  if len(epochs) <= 20:
    ax.set_xticks(epochs)
  else:
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  ax.legend()


def missing_classes(confusion_CxC: np.ndarray, class_names: list[str] | None = None) -> list[str]:
  """The classes the test split has no example of (their confusion rows are empty)."""
  names = _class_names(len(confusion_CxC), class_names)
  return [names[i] for i in np.flatnonzero(np.asarray(confusion_CxC).sum(axis=1) == 0)]


def _class_names(num_classes: int, class_names: list[str] | None) -> list[str]:
  return list(class_names) if class_names and len(class_names) == num_classes else [
      str(i) for i in range(num_classes)]


def _plot_confusion(ax, confusion: np.ndarray, class_names: list[str] | None = None) -> None:
  """Colour on a log scale, so a handful of errors shows next to a thousand correct."""
  confusion = np.asarray(confusion)
  num_classes = len(confusion)
  ax.imshow(np.log1p(confusion), cmap='Blues')
  missing = missing_classes(confusion, class_names)
  title = f'confusion matrix ({int(confusion.sum()):,} test examples)'
  if missing:
    title += f"\nno test examples of: {', '.join(missing)}"
  ax.set(title=title, xlabel='predicted', ylabel='true')
  if num_classes > _MAX_ANNOTATED_CLASSES:
    return
  names = _class_names(num_classes, class_names)
  ax.set_xticks(range(num_classes), names, rotation=90 if max(map(len, names)) > 2 else 0)
  ax.set_yticks(range(num_classes), names)
  threshold = np.log1p(confusion.max()) / 2
  for (true, predicted), count in np.ndenumerate(confusion):
    ax.text(predicted, true, str(count), ha='center', va='center', fontsize=8,
            color='white' if np.log1p(count) > threshold else ('black' if count else '0.75'))


def _plot_worst(fig, cell, worst: dict, num_errors: int,
                class_names: list[str] | None = None) -> None:
  name = lambda i: class_names[int(i)] if class_names else str(int(i))
  shown = min(len(worst['label']), MAX_WORST)
  grid = cell.subgridspec(5, 4, height_ratios=(0.3, 1, 1, 1, 1), hspace=0.45, wspace=0.1)
  header = fig.add_subplot(grid[0, :])
  header.set_axis_off()
  header.text(0.5, 0.5, f'most confidently wrong ({shown} of {num_errors:,} errors)',
              ha='center', va='center', fontsize=12)
  if not shown:
    ax = fig.add_subplot(grid[1:, :])
    ax.text(0.5, 0.5, 'no errors' if not num_errors else 'no examples recorded',
            ha='center', va='center', fontsize=20)
    ax.set_axis_off()
    return
  # One axes holds the 4 x 4 grid, the images tiled into one (white between them, room for
  # each title above its image): an axes each took 16 times ~20 ms to build, most of the
  # report's drawing time.
  images = np.asarray(worst['image'][:shown])
  height, width, channels = images.shape[1:]
  ax = fig.add_subplot(grid[1:, :])
  box = ax.get_position()  # The tiles fill the axes' shape, as the 16 axes filled it.
  pitch_y = round(height * 1.35)
  pitch_x = max(width, round(pitch_y * box.width * FIGSIZE[0] / (box.height * FIGSIZE[1])))
  tiled = np.full((4 * pitch_y, 4 * pitch_x, channels), 255, np.uint8)
  for i in range(shown):
    top = (i // 4) * pitch_y + pitch_y - height
    left = (i % 4) * pitch_x + (pitch_x - width) // 2
    tiled[top:top + height, left:left + width] = images[i]
    ax.text(left + width / 2, top - 0.04 * height,
            f"true {name(worst['label'][i])} / pred {name(worst['predicted'][i])} "
            f"({100 * float(worst['confidence'][i]):.0f}%)", fontsize=9, ha='center',
            va='bottom')
  ax.imshow(tiled[..., 0] if channels == 1 else tiled, cmap='gray', vmin=0, vmax=255,
            interpolation='nearest')
  ax.set_axis_off()


def _title(final: dict, config: dict, summary: dict | None = None) -> str:
  model, optimizer = _names(config)
  epochs = f"{final['epoch']} epoch{'s' if final['epoch'] != 1 else ''}"
  name = headline(final)
  if summary and summary.get('swept'):
    best = summary['best']
    return (f"{config.get('dataset', '')} {model}, {optimizer}: sweep of "
            f"{len(summary['replicas'])} replicas, best test {name.replace('_', ' ')} "
            f"{best[f'test_{name}']:.4f} ({best['replica']}) after {epochs}").strip()
  return (f"{config.get('dataset', '')} {model}, {optimizer}: test {name.replace('_', ' ')} "
          f"{final[f'test_{name}']:.4f} after {epochs}").strip()


def _figure(history, confusion, worst, config, summary=None) -> Figure:
  """Curves (or, for a sweep, one curve per replica and the result against the swept value),
  the confusion matrix and the most confident mistakes (of the best replica of a sweep)."""
  fig = Figure(figsize=FIGSIZE, dpi=DPI)
  FigureCanvasAgg(fig)
  grid = gridspec.GridSpec(2, 2, figure=fig, left=0.05, right=0.97, top=0.9, bottom=0.06,
                           hspace=0.3, wspace=0.15)
  if summary and summary.get('swept'):
    name = headline(history[-1])
    _plot_replica_curves(fig.add_subplot(grid[0, 0]), history, name, summary['replicas'])
    _plot_sweep(fig.add_subplot(grid[0, 1]), summary, name)
  else:
    names = metric_names(history[-1])  # One curve panel each, side by side in the top row.
    curves = grid[0, :].subgridspec(1, len(names), wspace=0.2)
    for i, name in enumerate(names):
      _plot_curves(fig.add_subplot(curves[0, i]), history, name)
  class_names = (summary or {}).get('class_names') or None
  _plot_confusion(fig.add_subplot(grid[1, 0]), confusion, class_names)
  _plot_worst(fig, grid[1, 1], worst, int(np.sum(confusion) - np.trace(confusion)), class_names)
  fig.suptitle(_title(history[-1], config, summary), fontsize=16)
  return fig


def _plot_replica_curves(ax, history: list[dict], name: str, replicas: list[dict]) -> None:
  """The test metric per epoch, one curve per replica (a diverged one's curve stops)."""
  for i, replica in enumerate(replicas):
    diverged = replica['diverged_at_step']
    kept = [r for r in history if diverged is None or r.get('step', 0) < diverged]
    ax.plot([r['epoch'] for r in kept], [r[f'test_{name}_per_replica'][i] for r in kept], 'o-',
            markersize=3, label=replica['replica'] + (' (diverged)' if diverged else ''))
  ax.set(title=f'test {name} per epoch, per replica', xlabel='epoch', ylabel=name)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.grid(alpha=0.3)
  if len(replicas) <= 12:
    ax.legend(fontsize=7)


def _plot_sweep(ax, summary: dict, name: str) -> None:
  """The final test metric against the first swept field, one line per value of the others;
  the seeds' mean, with their standard deviation as error bars; diverged replicas left out."""
  field = next(iter(summary['swept']))
  groups = {}
  for replica in summary['replicas']:
    others = tuple((k, v) for k, v in replica['hparams'].items() if k != field)
    if replica['diverged_at_step'] is None:
      groups.setdefault(others, {}).setdefault(replica['hparams'][field], []).append(
          replica[f'test_{name}'])
  for others, by_value in groups.items():
    xs = sorted(by_value)
    ax.errorbar(xs, [np.mean(by_value[x]) for x in xs], yerr=[np.std(by_value[x]) for x in xs],
                fmt='o-', capsize=4,
                label=', '.join(f'{k}={v:g}' for k, v in others) or 'mean ± std over seeds')
  values = [v for v in summary['swept'][field] if v > 0]
  if field == 'learning_rate' or (values and max(values) / min(values) >= 10):
    ax.set_xscale('log')
  ax.set(title=f'final test {name} against {field}', xlabel=field, ylabel=name)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)


def _final_rows(summary: dict) -> list[tuple[str, str]]:
  names = metric_names(summary)
  formats = [(f'{split}_{name}', f"{split.replace('_', ' ')} {name.replace('_', ' ')}", '{:.4f}')
             for split in ('test', 'test_ema', 'train') for name in names[1:] + names[:1]]
  formats += [('epochs', 'epochs', '{}'),
             ('steps', 'steps', '{:,}'), ('num_params', 'parameters', '{:,}'),
             ('param_fingerprint', 'parameter fingerprint', '`{}`'),
             ('skipped_steps', 'float16 steps skipped', '{:,}'),
             ('loss_scale', 'float16 loss scale', '{:g}'),
             ('train_seconds', 'training time', '{:.1f} s'),
             ('total_seconds', 'total time', '{:.1f} s'), ('input_mode', 'input mode', '{}'),
             ('seed', 'seed', '{}')]
  rows = [(label, fmt.format(summary[key])) for key, label, fmt in formats if key in summary]
  versions = summary.get('versions', {})
  if versions:
    rows.append(('software', ', '.join(f'{k} {versions[k]}' for k in
                                       ('jax', 'jaxlib', 'flax', 'optax') if k in versions)))
    rows.append(('device', f"{versions.get('device_count', '?')}x {versions.get('device', '?')}"
                           f" ({versions.get('backend', '?')})"))
  return rows


def _markdown(history, summary, config, png_name: str, confusion_CxC=None) -> str:
  model, optimizer = _names(config)
  lines = [f"# {config.get('dataset', 'Run')} report: {model}, {optimizer}", '',
           f'![curves, confusion matrix and worst errors]({png_name})', '',
           '## Final', '', '| | |', '| --- | --- |']
  lines += [f'| {label} | {value} |' for label, value in _final_rows(summary)]
  if confusion_CxC is not None:
    lines += ['', *_class_lines(np.asarray(confusion_CxC), summary.get('class_names'))]
  columns = [f"{split}_{name}" for split in ('train', 'test')
             for name in metric_names(history[-1])]
  lines += ['', '## Per epoch', '',
            '| epoch | ' + ' | '.join(c.replace('_', ' ') for c in columns) + ' |',
            '| ---: |' + ' ---: |' * len(columns)]
  lines += [f"| {r['epoch']} | " + ' | '.join(f'{r[c]:.4f}' for c in columns) + ' |'
            for r in history]
  if summary.get('replicas'):
    lines += ['', *_replica_table(summary, metric_names(history[-1]))]
  lines += ['', '## Config', '', '```json',
            json.dumps(config, indent=2, sort_keys=True, default=str), '```', '']
  return '\n'.join(lines)


def _class_lines(confusion_CxC: np.ndarray, class_names: list[str] | None) -> list[str]:
  """Each class's test examples and recall; the classes the test split lacks, said so."""
  names = _class_names(len(confusion_CxC), class_names)
  lines = ['## Classes', '']
  missing = missing_classes(confusion_CxC, class_names)
  if missing:
    lines += [f"The test split has no examples of {len(missing)} of the {len(names)} classes: "
              f"{', '.join(missing)}.", '']
  lines += ['| class | test examples | recall |', '| --- | ---: | ---: |']
  for i, name in enumerate(names):
    count = int(confusion_CxC[i].sum())
    recall = f'{confusion_CxC[i, i] / count:.4f}' if count else '(no examples)'
    lines.append(f'| {name} | {count:,} | {recall} |')
  return lines


def _replica_table(summary: dict, names: list[str]) -> list[str]:
  """Every replica, best first by the headline test metric (lowest first for a loss)."""
  key, replicas = metrics.headline(names), summary['replicas']
  order = metrics.best_first([r[f'test_{key}'] for r in replicas], key,
                             [r['diverged_at_step'] is None for r in replicas])
  rows = [replicas[i] for i in order]
  fields = list(rows[0]['hparams'])
  header = [*fields, 'seed', *(f'test {n}' for n in names), 'diverged at step']
  lines = ['## Replicas, best first', '', '| ' + ' | '.join(header) + ' |',
           '|' + ' ---: |' * len(header)]
  for r in rows:
    cells = [f"{r['hparams'][f]:g}" for f in fields] + [str(r['seed'])]
    cells += [f"{r[f'test_{n}']:.4f}" for n in names]
    cells.append('' if r['diverged_at_step'] is None else str(r['diverged_at_step']))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def write_run_report(workdir: pathlib.Path, history: list[dict], split, probs_NxC: np.ndarray,
                     summary: dict, config: dict[str, Any]):
  """The report of a run: `split` holds the test images [N, H, W, C] and labels [N], and
  `probs_NxC` the model's class probabilities for them."""
  predicted = probs_NxC.argmax(-1)
  return write_report(workdir, history,
                      confusion_matrix(split.label, predicted, probs_NxC.shape[-1]),
                      worst_errors(split.image, split.label, probs_NxC), summary, config)


def write_report(workdir: pathlib.Path, history: list[dict], confusion_CxC: np.ndarray,
                 worst: dict, summary: dict, config: dict[str, Any]
                 ) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes report.png and report.md into `workdir`; returns their paths.

  Args:
    workdir: an existing directory.
    history: one record per epoch: epoch, and train_<name> and test_<name> for the loss and
      each metric (e.g. train_loss, train_accuracy, test_loss, test_accuracy).
    confusion_CxC: counts, rows the true class, columns the predicted one.
    worst: image uint8 [M, H, W, C], label [M], predicted [M], confidence [M] (M may be 0).
    summary: the run's summary (summary.json); missing entries are left out. Its
      class_names, if any, label the confusion matrix and the worst errors.
    config: the resolved config as a dict (`config.to_dict()`).
  """
  workdir = storage.as_path(workdir)
  png_path, md_path = workdir / 'report.png', workdir / 'report.md'
  png = io.BytesIO()  # Then one write: matplotlib would take gs://... for a local file name.
  # zlib level 1, not PIL's 6: a quarter of the drawing time less (~0.05 s), the file ~8% larger.
  _figure(history, confusion_CxC, worst, config, summary).savefig(
      png, format='png', dpi=DPI, pil_kwargs={'compress_level': 1})
  storage.write_bytes_atomic(png_path, png.getvalue())
  storage.write_bytes_atomic(md_path, _markdown(history, summary, config, png_path.name,
                                                confusion_CxC).encode())
  return png_path, md_path
