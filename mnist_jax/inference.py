"""A trained model out of its workdir: load it, predict with it (export.py ships it).

  from mnist_jax import inference
  model = inference.load('workdirs/mlp-20261204-101500')   # the newest valid checkpoint
  probs = model.predict(images)          # uint8 [B, H, W, C] as the dataset's, or float32 in
                                         # [0, 1]; returns float32 probabilities [B, classes]
  model.class_names[probs.argmax(-1)[0]], model.config, model.summary, model.step

What a workdir holds is enough: its config.json (the config, and the dataset's image shape
and class names) and its checkpoints. The model is rebuilt from `config.model`, and only its
arrays are read from the checkpoint (the parameters and the model's other collections, such as
BatchNorm's statistics; not the optimizer state: Orbax's partial restore). No data is loaded
and TensorFlow is not imported. Prediction runs in evaluation mode (BatchNorm uses its stored
statistics, dropout is off) through one jitted function, `steps.probabilities`, the one that
evaluation and the report use, in batches padded to a power of two (at most `batch_size`), so
a few programs serve every batch and the persistent compilation cache keeps them between
processes.

A workdir of several replicas (`num_seeds`, `config.sweep`) holds them all: `replica=` picks
one by name ('learning_rate=0.001,seed=0') or index; the default is the best by the headline
test metric (accuracy) at the loaded step, as metrics.jsonl recorded it.
"""

import concurrent.futures
import csv
import dataclasses
import functools
import glob
import io
import json
import os
import sys
import time
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from mnist_jax import checkpoint
from mnist_jax import datasets
from mnist_jax import metrics
from mnist_jax import models
from mnist_jax import steps
from mnist_jax import sweeps
from mnist_jax import writers
from mnist_jax.infra import errors
from mnist_jax.infra import process
from mnist_jax.infra import storage

DEFAULT_BATCH_SIZE = 256  # Images per jitted call (the largest padded batch).


class NotAModel(errors.UserError):
  """The workdir holds no trained model (no run, or no checkpoint), or not the replica asked."""


@dataclasses.dataclass
class Model:
  """A trained model: its arrays, how to apply them, and what it was trained on."""
  config: ml_collections.ConfigDict  # The run's config (the workdir's config.json).
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]  # (H, W, C): what `predict` takes, the dataset's.
  step: int  # The checkpoint's.
  replica: str | None  # Its name, in a workdir of several replicas; None for a single run.
  summary: dict | None  # The workdir's summary.json (None until the run finished).
  workdir: epath.Path
  variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...}: the model's collections.
  apply_fn: Any  # The model's `apply` (Linen's, or models/_nnx.py's for an NNX model).
  weights: str = 'raw'  # 'ema': the debiased moving average of the weights (config.ema_decay).
  model_takes_mask: bool = False
  batch_size: int = DEFAULT_BATCH_SIZE

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def probabilities(self, images_BxHxWxC: jax.Array) -> jax.Array:
    """The pure function of the images, with the arrays closed over (constants once traced):
    what export.py exports."""
    return steps.probabilities(self.apply_fn, self.variables, images_BxHxWxC,
                               model_takes_mask=self.model_takes_mask)

  def predict(self, images: np.ndarray) -> np.ndarray:
    """float32 probabilities [B, classes] for images [B, H, W, C] (uint8, or floats in [0, 1];
    [B, H, W] for one channel)."""
    images = np.asarray(images)
    if images.ndim == len(self.image_shape) and self.image_shape[-1] == 1:
      images = images[..., None]
    if images.shape[1:] != self.image_shape:
      raise ValueError(f'a batch of images [B, H, W, C] of shape {images.shape}: this model '
                       f'takes [B, {", ".join(map(str, self.image_shape))}] '
                       '(datasets.conform_image converts any image).')
    if images.dtype.kind == 'f':
      low, high = float(images.min(initial=0.0)), float(images.max(initial=0.0))
      if not (np.isfinite(low) and np.isfinite(high) and 0 <= low and high <= 1):
        raise ValueError(f'float images must be in [0, 1]; these are in [{low:g}, {high:g}] '
                         '(pass uint8 pixels as they are, or divide by 255).')
      images = images.astype(np.float32)
    elif images.dtype != np.uint8:
      raise ValueError(f'images of dtype {images.dtype}: expected uint8 pixels (0-255) or '
                       'floats in [0, 1].')
    out = []
    for start in range(0, len(images), self.batch_size):
      batch = images[start:start + self.batch_size]
      padded = min(self.batch_size, 1 << max(len(batch) - 1, 0).bit_length())
      batch = np.concatenate([batch, np.zeros((padded - len(batch), *self.image_shape),
                                              batch.dtype)])
      out.append(_probabilities(self.apply_fn, self.model_takes_mask, self.variables,
                                batch)[:len(images[start:start + self.batch_size])])
    if not out:
      return np.zeros((0, self.num_classes), np.float32)
    return np.concatenate(jax.device_get(out))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _probabilities(apply_fn, model_takes_mask, variables, images):
  return steps.probabilities(apply_fn, variables, images, model_takes_mask=model_takes_mask)


def load(workdir: str, *, step: int | None = None, replica: int | str | None = None,
         weights: str = '', batch_size: int = DEFAULT_BATCH_SIZE, cache_dir: str = '') -> Model:
  """The model trained in `workdir`: from its newest valid checkpoint, or `step`'s.

  `replica`: in a workdir of several replicas, which one (name or index; default: the best).
  `weights`: 'ema' (the default for a run with config.ema_decay > 0: the debiased moving
  average) or 'raw' (the trained weights themselves; the only ones without an EMA).
  `cache_dir`: as config.cache_dir ('' the default cache, 'none' none): where compiled
  programs are kept between processes.
  """
  workdir = storage.as_path(workdir)
  config, dataset = _read_config(workdir)
  directory = process.resolve_cache_dir(cache_dir or config.get('cache_dir', ''))
  if directory:
    process.enable_compilation_cache(directory)
  image_shape = tuple(dataset['image_shape'])
  class_names = tuple(dataset['class_names']) or tuple(map(str, range(dataset['num_classes'])))
  decay = float(config.get('ema_decay', 0.0))
  weights = weights or ('ema' if decay else 'raw')
  if weights not in ('ema', 'raw') or (weights == 'ema' and not decay):
    raise NotAModel(f'weights={weights!r} is invalid for {workdir}: expected '
                    + ("'ema' or 'raw'." if decay else "'raw' (its run kept no EMA: "
                       'config.ema_decay=0).'))
  replica_list = sweeps.replicas(config)
  model, variables = _model_of(config, dataset, workdir, len(replica_list))
  part = dict(params=variables.pop('params'), model_state=variables)
  if weights == 'ema':  # The average (and its count) instead: optax.ema's state.
    count = jax.ShapeDtypeStruct((len(replica_list),) if len(replica_list) > 1 else (),
                                 jnp.int32, sharding=_default_device())
    part = dict(ema=optax.EmaState(count=count, ema=part))
  _check_shapes(workdir, part, step)
  restored, loaded_step = checkpoint.restore_part(
      workdir / 'checkpoints', part, step, retry_seconds=float(
          config.get('cloud_retry_seconds', storage.DEFAULT_RETRY_SECONDS)))
  if weights == 'ema':
    restored = steps.debiased(restored['ema'], decay)  # An EmaState, as the part asked.
  variables = {'params': restored['params'], **restored.get('model_state', {})}
  summary = _read_json(workdir / 'summary.json')
  name, index = None, 0
  finite = _finite(variables, len(replica_list))
  if len(replica_list) > 1:
    index = _replica_index(replica, replica_list, workdir, loaded_step, config, finite,
                           weights)
    variables = jax.tree.map(lambda x: x[index], variables)
    name = replica_list[index].name
  elif replica not in (None, 0, replica_list[0].name):
    raise NotAModel(f'{workdir} holds one run, not replicas: replica={replica!r} does not '
                    'apply; leave it out.')
  if not finite[index]:
    raise NotAModel(f'the {weights} weights at step {loaded_step} in {workdir}'
                    + (f' (replica {name})' if name else '') + ' hold NaN or Inf: that '
                    'replica diverged. Choose another replica, or an earlier --step.')
  return Model(config=config, class_names=class_names, image_shape=image_shape,
               step=loaded_step, replica=name, summary=summary, workdir=workdir,
               variables=variables, apply_fn=model.apply, weights=weights,
               model_takes_mask=steps.takes_mask(model), batch_size=batch_size)


def _read_json(path: epath.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _tuples(value):
  """JSON's lists back to tuples (Linen modules must be hashable)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _read_config(workdir: epath.Path) -> tuple[ml_collections.ConfigDict, dict]:
  """The run's config and its dataset's shape and classes, from `workdir/config.json`."""
  if not workdir.is_dir():
    raise NotAModel(f'{workdir} does not exist: give the --workdir of a trained run.')
  written = _read_json(workdir / 'config.json')
  if written is None:
    raise NotAModel(f'{workdir} holds no run (no readable config.json): give the --workdir of '
                    'a trained run.')
  dataset = written.pop('resolved', {}).get('dataset')
  if not dataset:
    raise NotAModel(f'{workdir}/config.json predates inference (it does not name the '
                    'dataset\'s image shape): run the same training command again in this '
                    'workdir (it trains nothing more once finished) to rewrite it.')
  return ml_collections.ConfigDict(_tuples(written)), dataset


def _model_of(config: ml_collections.ConfigDict, dataset: dict, workdir: epath.Path,
              num_replicas: int) -> tuple[Any, dict]:
  """The model config.json names, and its collections as abstract arrays; NotAModel when
  this code cannot build it (a field it does not take, a model it does not have)."""
  try:
    models.check(config.model)
    model = models.build(config.model, dataset['num_classes'])
    return model, _abstract_variables(model, tuple(dataset['image_shape']), num_replicas)
  except (errors.ConfigError, ImportError, TypeError, ValueError) as e:
    why = errors.first_line(e).rstrip('.')
    why = why if isinstance(e, errors.ConfigError) else f'{type(e).__name__}: {why}'
    raise NotAModel(f'{workdir}/config.json does not match the model code here ({why}): '
                    'predict and export with the code version that trained it, or train '
                    'again.') from None


def _check_shapes(workdir: epath.Path, part: dict, step: int | None) -> None:
  """NotAModel when the checkpoint's arrays are not the shapes config.json's model has (a
  config.json edited, or from another run): a mismatch, not an unreadable checkpoint."""
  directory = workdir / 'checkpoints'
  try:
    saved = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
    step = step if step is not None else max(saved)
    metadata = ocp.PyTreeCheckpointHandler().metadata(directory / str(step) / checkpoint.STATE)
  except Exception:  # pylint: disable=broad-except  (restoring says what is missing or bad)
    return
  saved_shapes = checkpoint._shapes(metadata)  # pylint: disable=protected-access
  wanted_shapes = checkpoint._shapes({checkpoint.STATE: part})  # pylint: disable=protected-access
  wrong = sorted(k for k, shape in wanted_shapes.items() if saved_shapes.get(k) != shape)
  if wrong:
    path = wrong[0].removeprefix(f'{checkpoint.STATE}/')
    raise NotAModel(f'the checkpoint at step {step} in {directory} does not match '
                    f'{workdir}/config.json ({path}: saved {saved_shapes.get(wrong[0], "none")}, '
                    f'the config\'s model {wanted_shapes[wrong[0]]}): restore the config.json '
                    'that trained it, or train again.')


def _abstract_variables(model, image_shape: tuple[int, ...], num_replicas: int) -> dict:
  """The model's collections as abstract arrays on the default device, [R, ...] for R
  replicas: shapes only, nothing initialized (`jax.eval_shape`)."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape), jnp.float32)))
  sharding = _default_device()
  lead = (num_replicas,) if num_replicas > 1 else ()
  return dict(jax.tree.map(
      lambda x: jax.ShapeDtypeStruct((*lead, *x.shape), x.dtype, sharding=sharding), shapes))


def _default_device() -> jax.sharding.Sharding:
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _finite(variables, num_replicas: int) -> list[bool]:
  """Per replica, whether every array is finite."""
  per_leaf = [np.isfinite(np.asarray(x)).reshape(num_replicas if num_replicas > 1 else 1, -1)
              .all(axis=1) for x in jax.tree.leaves(variables)]
  return list(np.logical_and.reduce(per_leaf)) if per_leaf else [True] * num_replicas


def _replica_index(replica: int | str | None, replica_list, workdir: epath.Path, step: int,
                   config: ml_collections.ConfigDict, finite: list[bool], weights: str) -> int:
  names = [r.name for r in replica_list]
  if isinstance(replica, int) or (isinstance(replica, str) and replica.isdigit()):
    index = int(replica)
    if not 0 <= index < len(names):
      raise NotAModel(f'replica {index} is out of range: {workdir} holds {len(names)} '
                      f'replicas (0 to {len(names) - 1}).')
    return index
  if replica is not None:
    if replica not in names:
      raise NotAModel(f'{workdir} holds no replica {replica!r}; it holds: {", ".join(names)}.')
    return names.index(replica)
  return _best(workdir, step, config, finite, weights)


def _best(workdir: epath.Path, step: int, config, finite: list[bool], weights: str) -> int:
  """The best replica whose weights are finite, by the headline test metric of the newest
  epoch record at or before `step` in metrics.jsonl (for a checkpoint mid-epoch, the epoch
  before it; with an EMA, the average's metric); the first finite one without a record."""
  name = metrics.headline(('loss', *config.metrics))
  key = f"test_{'ema_' if weights == 'ema' else ''}{name}_per_replica"
  record = None
  try:
    for entry in writers.read_records(workdir, warn=False):  # Damaged lines skipped.
      if entry['step'] <= step and key in entry:
        record = entry if record is None or entry['step'] >= record['step'] else record
  except OSError:
    pass
  if record is None:
    return next((i for i, ok in enumerate(finite) if ok), 0)
  diverged = record.get('diverged_at_step') or [None] * len(finite)
  alive = [ok and (d is None or d > step) for ok, d in zip(finite, diverged)]
  return metrics.best_first(record[key], name, alive)[0]



# --- The command line: python run.py --mode=predict --workdir=W --images='GLOB' -------------

class SomeImagesFailed(errors.UserError):
  exit_code = 3  # The others were predicted.


def predict_files(config: ml_collections.ConfigDict, workdir: str, pattern: str,
                  output: str = '', replica: str = '', step: int = 0,
                  weights: str = '') -> list[tuple]:
  """Predicts every file `pattern` matches (PNG, JPEG, .npy): prints `path,prediction,
  probability` per image (an .npy file's images as path[i]), or writes them as a CSV to
  `output`. A file that cannot be read or converted is named on stderr and the others are
  predicted; then SomeImagesFailed (exit status 3). `config` gives only this command's options
  (eval_batch_size, cache_dir); the model is the workdir's, with `weights` as `load` takes."""
  paths = _matching(pattern)
  if output:
    _check_writable(output)
  model = load(workdir, step=step or None, replica=replica or None, weights=weights,
               batch_size=config.eval_batch_size, cache_dir=config.cache_dir)
  start = time.perf_counter()
  rows, failed = _predict_paths(model, paths, print_rows=not output)
  if output:
    _write_csv(output, rows, model, time.perf_counter() - start)
  if failed:
    raise SomeImagesFailed(
        f'{len(failed)} of {len(paths)} files could not be read or converted (named above); '
        f'the other {len(paths) - len(failed)} were predicted'
        + (f' and written to {output}.' if output else '.'))
  return rows


def _predict_paths(model: Model, paths: list[str], print_rows: bool) -> tuple[list, list]:
  """(rows, the paths that failed): files read by a thread pool ahead of the model, a batch at
  a time; each row printed as its batch is predicted where `print_rows`."""
  rows, failed = [], []
  show = sys.stderr.isatty() and len(paths) > model.batch_size
  bar = tqdm.tqdm(total=len(paths), desc='predicting', unit=' images', leave=False,
                  disable=not show, file=sys.stderr)
  chunks = [paths[i:i + model.batch_size] for i in range(0, len(paths), model.batch_size)]
  pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1)
  try:
    with bar:
      for chunk in pool.map(lambda chunk: [_read(p, model.image_shape) for p in chunk], chunks):
        names, images = _readable(chunk, failed, bar)
        if images:
          probs = model.predict(np.stack(images))
          best = probs.argmax(-1)
          rows += [(name, model.class_names[b], f'{p[b]:.6f}')
                   for name, b, p in zip(names, best, probs)]
          if print_rows:  # (Row by row: one huge write to a closed pipe fails silently.)
            bar.clear()
            for row in rows[-len(names):]:
              print(_csv_line(row), end='')
        bar.update(len(chunk))
    sys.stdout.flush()
  finally:  # Stopped early (a closed stdout, Ctrl-C): the files not yet read are not read.
    pool.shutdown(cancel_futures=True)
  return rows, failed


def _readable(chunk: list[tuple], failed: list[str], bar) -> tuple[list[str], list]:
  """The names and images of a chunk's files that were read; each other one is named on
  stderr and added to `failed`."""
  names, images = [], []
  for path, read in chunk:
    if isinstance(read, errors.UserError):
      failed.append(path)
      bar.clear()
      print(f'error: {read}', file=sys.stderr, flush=True)
      continue
    names += [f'{path}[{i}]' for i in range(len(read))] if datasets.is_npy(path) else [path]
    images += read
  return names, images


def _write_csv(output: str, rows: list[tuple], model: Model, seconds: float) -> None:
  text = _csv_line(('path', 'prediction', 'probability')) + ''.join(map(_csv_line, rows))
  try:
    storage.write_bytes_atomic(storage.as_path(output), text.encode())
  except OSError as e:
    raise errors.UserError(f'cannot write {output} ({type(e).__name__}: '
                           f'{errors.first_line(e)}); the predictions were not saved.') from None
  print(f'wrote {len(rows):,} predictions to {output} ({len(rows) / seconds:,.0f} images/s, '
        f'reading included; checkpoint step {model.step}, {model.weights} weights'
        + (f', replica {model.replica}' if model.replica else '') + ')', flush=True)


def _check_writable(output: str) -> None:
  """Before anything is predicted: a CSV that could not be written is one line now."""
  path = storage.as_path(output)
  if storage.is_remote(path):
    storage.check_access(path.parent)
    return
  folder = path.parent
  why = ('it is a folder' if path.is_dir() else
         f'{folder} does not exist' if not folder.is_dir() else
         f'{folder} is not writable' if not os.access(folder, os.W_OK | os.X_OK) else '')
  if why:
    raise errors.UserError(f'--output={output} cannot be written: {why}. Give a CSV path in a '
                           'folder that exists and is writable; nothing was predicted.')


def _csv_line(row) -> str:
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator='\n').writerow(row)
  return buffer.getvalue()


def _read(path: str, image_shape) -> tuple[str, list[np.ndarray] | errors.UserError]:
  try:
    return path, datasets.read_for_model(path, image_shape)
  except errors.UserError as e:
    return path, e


def _matching(pattern: str) -> list[str]:
  """The files `pattern` matches (a glob, `**` recursive; a folder: every image in it)."""
  if not pattern:
    raise errors.UserError('--mode=predict needs --images: a glob of PNG, JPEG or .npy files, '
                           "e.g. --images='digits/*.png'.")
  expanded = os.path.expanduser(pattern)
  if os.path.isdir(expanded):
    expanded = os.path.join(expanded, '**', '*')
  paths = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
  usable = [p for p in paths if p.lower().endswith(datasets.PREDICT_SUFFIXES)]
  if not usable:
    found = (f'{len(paths)} files, none of them PNG, JPEG or .npy' if paths else 'no file')
    raise errors.UserError(f'--images={pattern!r} matches {found}; give a glob of image files '
                           "(quoted, e.g. --images='digits/*.png').")
  return usable
