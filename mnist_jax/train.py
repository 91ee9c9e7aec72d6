"""The training loop: `train_and_evaluate(config, workdir)` trains, evaluates and reports.

Usable from a notebook:
  from mnist_jax import train
  from configs import mlp
  summary = train.train_and_evaluate(mlp.get_config(), '/tmp/mnist')
"""

import os
import pathlib
import time

import jax
import ml_collections

from mnist_jax import input_modes
from mnist_jax import input_pipeline
from mnist_jax import metrics
from mnist_jax import models
from mnist_jax import optim
from mnist_jax import steps
from mnist_jax import validation


def resolve_cache_dir(cache_dir: str) -> pathlib.Path | None:
  if cache_dir == 'none':
    return None
  return pathlib.Path(cache_dir or os.environ.get('MNIST_JAX_CACHE')
                      or '~/.cache/mnist_jax').expanduser()


def enable_compilation_cache(cache_dir: pathlib.Path) -> None:
  """JAX's persistent cache: a second run loads compiled programs instead of compiling."""
  jax.config.update('jax_compilation_cache_dir', str(cache_dir / 'jax'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def _epoch_line(record: dict, num_epochs: int) -> str:
  return (f"epoch {record['epoch']}/{num_epochs}  "
          f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}  |  "
          f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}  |  "
          f"{record['examples_per_sec']:,.0f} ex/s  {record['elapsed_s']:.1f}s")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` into `workdir`; returns the final summary (also in summary.json)."""
  validation.validate(config)
  start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  cache_dir = resolve_cache_dir(config.cache_dir)
  if cache_dir:
    enable_compilation_cache(cache_dir)
  input_pipeline.hide_gpus_from_tensorflow()
  info, splits = input_pipeline.load(
      config.dataset, config.data_dir, (config.train_split, config.eval_split),
      download=config.download, cache_dir=cache_dir)
  mode_name = input_modes.resolve(config.input_mode, splits)
  mode = input_modes.create(
      mode_name, splits, train_split=config.train_split, eval_split=config.eval_split,
      seed=config.seed, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
      steps_per_call=config.steps_per_call)

  model = models.build(config.model, info.num_classes)
  tx = optim.create_optimizer(config, mode.steps_per_epoch * config.num_epochs)
  state = steps.create_train_state(jax.random.PRNGKey(config.seed), model, tx, info.image_shape)
  num_params = metrics.count_params(state.params)

  workdir.mkdir(parents=True, exist_ok=True)
  metrics.write_json(workdir / 'config.json', dict(config.to_dict(), resolved=dict(
      input_mode=mode_name, data_dir=input_pipeline.resolve_data_dir(config.data_dir) or '',
      cache_dir=str(cache_dir or ''))))
  print(f'{info.name}: {len(mode.train):,} train / {len(mode.eval):,} test examples, '
        f'{num_params:,} parameters, input_mode={mode_name}, '
        f'{jax.device_count()}x {jax.devices()[0].device_kind}', flush=True)

  logger = metrics.MetricLogger(workdir, tensorboard=config.write_tensorboard)
  train_seconds = 0.0
  for epoch in range(1, config.num_epochs + 1):
    epoch_start = time.perf_counter()
    state, train_sums = mode.train_epoch(state, epoch - 1)
    record = dict(epoch=epoch, **metrics.summarize(train_sums, 'train_'))  # Waits for the epoch.
    epoch_seconds = time.perf_counter() - epoch_start
    train_seconds += epoch_seconds
    record.update(metrics.summarize(mode.evaluate(state), 'test_'),
                  examples_per_sec=len(mode.train) / epoch_seconds,
                  elapsed_s=time.perf_counter() - start)
    logger.write(int(state.step), record)
    print(_epoch_line(record, config.num_epochs), flush=True)
  logger.close()

  summary = dict(
      test_accuracy=record['test_accuracy'], test_loss=record['test_loss'],
      train_accuracy=record['train_accuracy'], train_loss=record['train_loss'],
      epochs=config.num_epochs, steps=int(state.step), num_params=num_params,
      param_fingerprint=metrics.fingerprint(state.params), train_seconds=train_seconds,
      total_seconds=time.perf_counter() - start, input_mode=mode_name, seed=config.seed,
      versions=metrics.versions())
  metrics.write_json(workdir / 'summary.json', summary)
  print(f"done: test accuracy {summary['test_accuracy']:.4f}, {summary['steps']} steps in "
        f"{train_seconds:.1f}s of training ({summary['total_seconds']:.1f}s in all); "
        f'wrote {workdir}', flush=True)
  return summary
