"""The training loop: `train_and_evaluate(config, workdir)` trains, evaluates and reports.

Usable from a notebook:
  from mnist_jax import train
  from configs import mlp
  summary = train.train_and_evaluate(mlp.get_config(), '/tmp/mnist')

A run in a workdir that holds checkpoints resumes from the newest valid one: same parameters,
optimizer state, step, RNG and position in the data as the run that wrote it.

`train_and_evaluate` reads top to bottom: setup, restore, the epochs (with their hooks:
checkpoints, preemption, progress, profile), evaluation, the report. What keeps a run safe
(the workdir's lock, signals, storage, errors) is in `mnist_jax/infra/`; the loop calls it
through `workdir.guarded`, `preemption.Stopper` and `checkpoint.Checkpointer`.
"""

import dataclasses
import functools
import io
import json
import sys
import threading
import time
from collections.abc import Callable

from etils import epath
import jax
import ml_collections
import numpy as np

from mnist_jax import checkpoint
from mnist_jax import datasets
from mnist_jax import executor as executor_lib
from mnist_jax import input_pipeline
from mnist_jax import metrics
from mnist_jax import mixed_precision
from mnist_jax import models
from mnist_jax import optim
from mnist_jax import profiler as profiler_lib
from mnist_jax import progress as progress_lib
from mnist_jax import steps
from mnist_jax import sweeps
from mnist_jax import validation
from mnist_jax import writers
from mnist_jax.infra import errors
from mnist_jax.infra import preemption
from mnist_jax.infra import process
from mnist_jax.infra import storage
from mnist_jax.infra import workdir as workdir_lib

# On a terminal the progress bar moves after every call, so calls are shorter there.
INTERACTIVE_STEPS_PER_CALL = 50

# Called with the final training state once training has ended, before the summary and the
# report: a public hook for notebooks and tests (tests/crash_utils.py records the state).
AFTER_TRAINING: list[Callable[[steps.TrainState], None]] = []


@dataclasses.dataclass
class Setup:
  """Everything a run needs before its first step."""
  info: input_pipeline.DatasetInfo
  mode_name: str
  executor: executor_lib.Executor
  task: steps.Task
  state: steps.TrainState
  num_params: int
  cache_dir: epath.Path | None
  record: dict  # What the run is (saved in every checkpoint): `checkpoint.run_record`.
  replicas: sweeps.Replicas  # One, or the seeds and swept values trained side by side.

  @property
  def headline(self) -> str:
    return metrics.headline(self.task.value_names)


@dataclasses.dataclass
class Loop:
  """What the epoch loop carries from call to call (and a checkpoint saves)."""
  state: steps.TrainState
  epoch_sums: dict  # The running metric sums of the epoch so far.
  diverged: np.ndarray | None  # Per replica of a sweep, the step it diverged at (0: not).
  step: int
  record: dict | None = None  # The last epoch's record.
  train_seconds: float = 0.0

  def item(self, run: Setup) -> dict:
    """What a checkpoint saves: the state, the epoch's running sums, and (a sweep) which
    replicas diverged when."""
    item = dict(state=self.state, epoch_sums=self.epoch_sums)
    if self.diverged is not None:
      item['diverged'] = run.executor.put_replicated(self.diverged)
    return item


def _fewest(*steps_per_call: int) -> int:
  """The smallest of some steps-per-call limits, where 0 means none (an epoch a call)."""
  return min((n for n in steps_per_call if n), default=0)


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config, loads the data and builds the initial (replicated) state."""
  validation.validate(config)
  cache_dir = process.resolve_cache_dir(config.cache_dir)
  validation.check_cache_dir(config, cache_dir)  # Before anything is decoded into it.
  if cache_dir:
    process.enable_compilation_cache(cache_dir)
  if config.augment and not config.image_size:  # A TFDS dataset's metadata has its images' size:
    _check_augment_early(config, cache_dir)  # an augmentation that blanks them is refused now.
  # Decoded whole (device, tfdata) or opened for streaming (stream), as the mode reads them.
  mode_name, why, info, splits = executor_lib.load(config, cache_dir)
  validation.check_augment(config, info.image_shape)  # Now that the images' size is known.
  model = models.build(config.model, info.num_classes, config.get('compute_dtype', 'float32'))
  task = steps.Task.from_config(config, model)
  replicas = sweeps.Replicas.from_config(config)
  execution = executor_lib.for_backend(config)
  executor = executor_lib.create(
      mode_name, splits, why=why, train_split=config.train_split, eval_split=config.eval_split,
      seeds=[r.seed for r in replicas.items], batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size,
      steps_per_call=_fewest(
          execution['steps_per_call'] or (INTERACTIVE_STEPS_PER_CALL * sys.stdout.isatty()),
          config.checkpoint_every_steps,
          profiler_lib.STEPS_PER_CALL * bool(config.profile)),
      scan_unroll=execution['scan_unroll'], task=task)
  tx = optim.create_optimizer(config, executor.steps_per_epoch * config.num_epochs,
                              swept=tuple(sweeps.swept(config)))
  init = functools.partial(_init_replica, model=model, tx=tx, image_shape=info.image_shape,
                           ema_decay=task.ema_decay,
                           loss_scale=mixed_precision.needs_loss_scale(task.compute_dtype))
  # Replica i starts exactly as a single run with its seed and values would.
  rngs = [jax.random.PRNGKey(r.seed) for r in replicas.items]
  rng, hparams = (rngs[0] if len(rngs) == 1 else jax.numpy.stack(rngs),
                  sweeps.stacked_hparams(replicas.items))
  if len(replicas) > 1:
    init = jax.vmap(init)
  # Runs once: XLA's backend optimizations would cost more compile time (~1 s on a CPU, for the
  # random initializers) than they could ever save. The values are the same.
  state = jax.jit(init, out_shardings=executor.replicated,
                  compiler_options=dict(xla_backend_optimization_level=1))(rng, hparams)
  num_params = writers.count_params(state.params) // len(replicas)
  if jax.process_index() == 0:
    models.warn_if_padding_in_statistics(config.model.name, task.model_takes_mask,
                                         state.model_state, len(executor.train),
                                         config.batch_size)
  record = checkpoint.run_record(config, len(executor.train), executor.steps_per_epoch,
                                 info.identity)
  return Setup(info, mode_name, executor, task, state, num_params, cache_dir, record, replicas)


def _check_augment_early(config: ml_collections.ConfigDict, cache_dir) -> None:
  """`validation.check_augment` with a TFDS dataset's image shape, from its metadata (setup
  checks again once the data is loaded, for every kind of dataset)."""
  if config.dataset.partition(':')[0] in datasets.SOURCES:
    return  # Own data: its size is known once it is read.
  try:
    shape = tuple(input_pipeline.metadata_builder(config.dataset, config.data_dir, cache_dir)
                  .info.features['image'].shape)
  except Exception:  # pylint: disable=broad-except  (not prepared, unknown: the load says so)
    return
  if len(shape) == 3 and all(shape):
    validation.check_augment(config, shape)


def _init_replica(rng, hparams, *, model, tx, image_shape, ema_decay,
                  loss_scale) -> steps.TrainState:
  return sweeps.assign(
      steps.create_train_state(rng, model, tx, image_shape, ema_decay, loss_scale), hparams)


EMA_PREFIX = 'test_ema_'  # The averaged weights' test values (config.ema_decay > 0).


def _evaluate(run: Setup, state: steps.TrainState, alive) -> dict:
  """The test values of the state ('test_loss', ...) and, with an EMA, of its averaged
  weights ('test_ema_loss', ...)."""
  record = metrics.summarize(run.executor.evaluate(state), 'test_', alive)
  if run.task.ema_decay:
    averaged = steps.ema_weights(state, run.task.ema_decay)
    record.update(metrics.summarize(run.executor.evaluate(averaged), EMA_PREFIX, alive))
  return record


def _loss_scale_record(state: steps.TrainState) -> dict:
  """float16: the steps skipped so far (non-finite gradients; over all replicas) and the
  current loss scale (the smallest replica's); {} for other dtypes."""
  if not state.loss_scale:
    return {}
  scale = jax.device_get(state.loss_scale)
  return dict(skipped_steps=int(np.sum(scale.skipped_steps)),
              loss_scale=float(np.min(scale.scale)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` into `workdir`; returns the final summary (also in summary.json).

  Holds the workdir's lock throughout: a second run in the same workdir is refused.
  """
  # --- Setup: a bad config is refused before anything is written ---------------------------
  start = time.perf_counter()
  workdir = storage.as_path(workdir)  # gs://... stays gs://.
  run = setup(config)
  workdir_lib.prepare(workdir)
  is_writer = jax.process_index() == 0  # Only process 0 writes and talks.
  executor, spe = run.executor, run.executor.steps_per_epoch
  # The stop handling covers everything after setup, to the summary: a SIGTERM or Ctrl-C at
  # any point saves (or has saved) the state, then exits with one line (`_stop`).
  with workdir_lib.guarded(workdir), preemption.Stopper() as stopper:
    ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', keep=config.checkpoint_keep,
                                   asynchronous=config.checkpoint_async,
                                   retry_seconds=config.cloud_retry_seconds)
    logger = None
    try:
      # --- Restore: the newest valid checkpoint, else the initial state ------------------
      saved, loop = _restore(run, ckpt)
      if saved and loop:
        optim.warn_if_the_schedule_moved(config, spe, saved['num_epochs'], loop.step)
      if is_writer:
        _write_header(workdir, config, run)
      if loop:
        print(f'resumed from the checkpoint at step {loop.step} in {ckpt.directory}',
              flush=True)
        _say_if_trained_past(loop.step, spe, config.num_epochs)
      else:
        loop = Loop(run.state, executor.zero_sums(), run.replicas.no_divergence(),
                    _step_of(run.state))
      logger = writers.MetricLogger(
          workdir, tensorboard=config.write_tensorboard, enabled=is_writer,
          replica_names=run.replicas.names if len(run.replicas) > 1 else None)
      progress = progress_lib.Progress(config.num_epochs, spe,
                                       None if is_writer else io.StringIO())
      end_epoch = functools.partial(_end_epoch, run, loop, ckpt, logger, progress, config,
                                    start)
      if loop.step % spe == 0 and _has_examples(loop.epoch_sums):
        # Saved after its epoch's training, before an evaluation that failed: evaluate it now
        # (its checkpoint stays as saved; the next one supersedes it).
        end_epoch(loop.step // spe - 1, examples=0, epoch_seconds=0.0, save=False)

      saves_warning = _SavesWarning(config.checkpoint_every_steps, spe)
      import_report = config.write_report and is_writer  # Once the first steps are running.

      # --- The epochs, with their hooks: checkpoints, preemption, progress, profile ------
      with profiler_lib.Profiler(workdir, config.profile and is_writer) as profiler:
        for epoch in range(loop.step // spe, config.num_epochs):
          epoch_start = time.perf_counter()
          progress.start_epoch(epoch + 1)
          chunks = executor.epoch_chunks(epoch, start=loop.step - epoch * spe)
          examples = sum(int(chunk['mask'].sum()) for chunk in chunks)
          unchecked = []  # (per_step, first step, last step) of calls not yet checked.
          for chunk, inputs in zip(chunks, executor.train_inputs(chunks)):
            loop.state, sums, per_step = executor.train_call(
                loop.state, *inputs, guard_empty_steps=executor.guard_empty_steps(chunk))
            loop.epoch_sums = metrics.add_sums(loop.epoch_sums, sums)
            if import_report:
              _import_report_while_training()
              import_report = False
            profiler.after_call(loop.state)
            previous, loop.step = loop.step, loop.step + executor.real_steps(chunk)
            unchecked.append((per_step, previous, loop.step))
            if progress.due():
              progress.update(loop.step - epoch * spe, _running(loop.epoch_sums, run.task))
            # A stop in an epoch's last call waits for the epoch's end (evaluation, record,
            # sums reset), so a checkpoint never holds a finished epoch without its record.
            stop = stopper.stop_signal()
            every = config.checkpoint_every_steps
            if loop.step % spe and (stop or (every and loop.step // every > previous // every)):
              steps.check_finite(unchecked, loop.diverged, run.replicas.names)
              ckpt.save(loop.step, loop.item(run), run.record)
              saves_warning.check(ckpt, time.perf_counter() - epoch_start)
            if stop and loop.step % spe:
              _stop(stop, loop.step, ckpt, progress)
          steps.check_finite(unchecked, loop.diverged, run.replicas.names)  # (Waits, too.)
          epoch_seconds = time.perf_counter() - epoch_start
          loop.train_seconds += epoch_seconds
          end_epoch(epoch, examples=examples, epoch_seconds=epoch_seconds)
          if stop and epoch + 1 < config.num_epochs:
            _stop(stop, loop.step, ckpt, progress)
    finally:  # Also on errors: finish the pending save, so the last checkpoint stays whole.
      try:
        ckpt.wait()
      finally:
        ckpt.close()
        if logger:
          logger.close()
    for hook in AFTER_TRAINING:
      hook(loop.state)

    # --- The summary and the report -------------------------------------------------------
    summary = _finish(workdir, config, run, loop, start, is_writer)
    stop = stopper.stop_signal()  # One after the last epoch: all of the above finished first.
    if stop:
      raise preemption.Preempted(stop, loop.step, ckpt.directory, complete=True)
    return summary


def _end_epoch(run: Setup, loop: Loop, ckpt: checkpoint.Checkpointer, logger, progress,
               config: ml_collections.ConfigDict, start: float, epoch: int, *, examples: int,
               epoch_seconds: float, save: bool = True) -> None:
  """Evaluation, the epoch's record, its checkpoint. The trained state is saved first if the
  evaluation fails (the epoch's sums kept: the rerun evaluates it, without training it again)."""
  alive = run.replicas.alive(loop.diverged)
  try:
    evaluated = _evaluate(run, loop.state, alive)
  except Exception as e:  # pylint: disable=broad-except  (any failure: the training is saved)
    if save:
      ckpt.save(loop.step, loop.item(run), run.record)
      ckpt.wait()
    progress.close()
    words = ('ran out of memory' if 'RESOURCE_EXHAUSTED' in str(e)
             else f'failed ({type(e).__name__}: {errors.first_line(e)})')
    raise errors.UserError(
        f'the evaluation after epoch {epoch + 1} {words}, with '
        f'eval_batch_size={config.eval_batch_size}; the epoch\'s training is saved (the '
        f'checkpoint at step {loop.step} in {ckpt.directory}). Run again with a smaller '
        '--config.eval_batch_size (a safe change on resume) to evaluate it and go on.') from None
  loop.record = dict(
      epoch=epoch + 1, **metrics.summarize(loop.epoch_sums, 'train_', alive), **evaluated,
      examples_per_sec=examples / epoch_seconds if epoch_seconds else 0.0,
      epoch_seconds=epoch_seconds, elapsed_s=time.perf_counter() - start,
      **_loss_scale_record(loop.state))
  loop.record.update(run.replicas.epoch_summary(loop.record, loop.diverged, run.headline))
  logger.write(loop.step, loop.record)
  loop.epoch_sums = run.executor.zero_sums()
  if save:
    ckpt.save(loop.step, loop.item(run), run.record)
  progress.end_epoch(_epoch_line(loop.record, run, config.num_epochs))


class _SavesWarning:
  """Warns once when checkpoint_every_steps saves so often that saving takes most of the time."""

  SHARE = 0.5  # Of the epoch's time so far, spent blocked in saves.
  AFTER = 5  # Saves seen before judging.

  def __init__(self, every: int, steps_per_epoch: int):
    self.every, self.steps_per_epoch, self.done = every, steps_per_epoch, False

  def check(self, ckpt: checkpoint.Checkpointer, seconds: float) -> None:
    if self.done or ckpt.saves < self.AFTER or ckpt.save_seconds < self.SHARE * seconds:
      return
    self.done = True
    per_save = ckpt.save_seconds / ckpt.saves
    print(f'warning: checkpoint_every_steps={self.every} saves '
          f'{self.steps_per_epoch // self.every} times an epoch, {per_save:.2f} s each: '
          f'{ckpt.save_seconds / seconds:.0%} of the time so far goes to saving. A larger '
          f'--config.checkpoint_every_steps (or 0: at epoch ends only) trains faster.',
          file=sys.stderr, flush=True)


def _has_examples(sums) -> bool:
  return float(np.sum(jax.device_get(sums[metrics.COUNT]))) > 0


def _say_if_trained_past(step: int, steps_per_epoch: int, num_epochs: int) -> None:
  if step > steps_per_epoch * num_epochs:
    print(f'note: this workdir is already trained past num_epochs={num_epochs}: to step '
          f'{step} (epoch {-(-step // steps_per_epoch)}); nothing is trained, its newest '
          'checkpoint is evaluated. Give a larger --config.num_epochs to train on.',
          flush=True)


def _restore(run: Setup, ckpt: checkpoint.Checkpointer) -> tuple[dict | None, Loop | None]:
  """The newest checkpoint's run record and its loop state; (None, None) without one.

  Checkpoints of another run (`checkpoint.identity` differs) are refused, naming the fields.
  """
  saved = ckpt.check_run(run.record)
  template = Loop(run.state, run.executor.zero_sums(), run.replicas.no_divergence(), 0)
  restored = ckpt.restore_latest(template.item(run))
  if restored is None:
    return saved, None
  item, step = restored
  diverged = template.diverged
  if diverged is not None:
    diverged = np.asarray(jax.device_get(item['diverged']), np.int32)
  return saved, Loop(item['state'], item['epoch_sums'], diverged, step)


def _stop(signal: int, step: int, ckpt: checkpoint.Checkpointer, progress) -> None:
  """Stops on a signal (SIGTERM, Ctrl-C) once the checkpoint at `step` is written."""
  ckpt.wait()
  progress.close()
  raise preemption.Preempted(signal, step, ckpt.directory)


def _write_header(workdir: epath.Path, config, run: Setup) -> None:
  storage.write_json_atomic(workdir / 'config.json', dict(config.to_dict(), resolved=dict(
      input_mode=run.mode_name, data_dir=input_pipeline.resolve_data_dir(config.data_dir) or '',
      cache_dir=str(run.cache_dir or ''),
      # What inference.load needs to rebuild the model without the data.
      dataset=dict(name=run.info.name, image_shape=list(run.info.image_shape),
                   num_classes=run.info.num_classes, class_names=list(run.info.class_names)))))
  print(f'{run.info.name}: {len(run.executor.train):,} train / {len(run.executor.eval):,} '
        f'test examples, {run.num_params:,} parameters, '
        f'input_mode={run.mode_name}{run.executor.why}, '
        f'{jax.device_count()}x {jax.devices()[0].device_kind}', flush=True)


def _epoch_line(record: dict, run: Setup, num_epochs: int) -> str:
  """'epoch 2/5  train loss 0.1071 accuracy 0.9686  |  test loss ... |  16,359 ex/s  9.3s'.

  With several replicas the values are means over those that have not diverged; the headline
  metric's test value also shows their spread, and for a sweep the best replica.
  """
  def values(split):
    return ' '.join(f'{name} {record[f"{split}_{name}"]:.4f}' for name in run.task.value_names)

  name, spread = run.headline, ''
  if f'test_{name}_std' in record:
    spread = (f" ± {record[f'test_{name}_std']:.4f} (mean ± std of {record['replicas_alive']} "
              f"{'replicas' if run.replicas.sweeping else 'seeds'})")
  if run.replicas.sweeping:
    best = record['best']
    spread += f"  best {best[f'test_{name}']:.4f} ({best['replica']})"
  knobs = (f"  |  ema test {values('test_ema')}" if f'{EMA_PREFIX}{name}' in record else '')
  if 'skipped_steps' in record:
    knobs += (f"  |  float16: {record['skipped_steps']} steps skipped, loss scale "
              f"{record['loss_scale']:g}")
  return (f"epoch {record['epoch']}/{num_epochs}  train {values('train')}  |  "
          f"test {values('test')}{spread}{knobs}  |  "
          f"{record['examples_per_sec']:,.0f} ex/s  {record['elapsed_s']:.1f}s")


def _step_of(state) -> int:
  return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])  # Replicas step together.


def _running(sums, task: steps.Task) -> dict:
  """The running loss and first metric as device scalars (fetched only if a line draws)."""
  count = jax.numpy.maximum(sums[metrics.COUNT], 1.0)
  return {name: jax.numpy.mean(sums[name] / count) for name in task.value_names[:2]}


def _finish(workdir, config, run: Setup, loop: Loop, start: float, is_writer: bool) -> dict:
  record = loop.record
  if record is None:  # The run had finished already: evaluate its final state again.
    alive = run.replicas.alive(loop.diverged)
    record = _evaluate(run, loop.state, alive)
    record.update(run.replicas.epoch_summary(record, loop.diverged, run.headline))
  state = loop.state
  summary = dict(
      {k: v for k, v in record.items() if k.startswith(('test_', 'train_'))},
      epochs=max(config.num_epochs, -(-_step_of(state) // run.executor.steps_per_epoch)),
      steps=_step_of(state), num_params=run.num_params, **_loss_scale_record(state),
      param_fingerprint=writers.fingerprint(*steps.fingerprinted(state)),
      train_seconds=loop.train_seconds, total_seconds=time.perf_counter() - start,
      input_mode=run.mode_name, seed=config.seed, num_seeds=config.num_seeds,
      class_names=list(run.info.class_names), versions=writers.versions())
  if len(run.replicas) > 1:
    summary.update(run.replicas.final_summary(config, steps.fingerprinted(state), record,
                                              run.task.value_names))
  if is_writer:
    # Written before the report too, so a failing report (e.g. a broken matplotlib) still
    # leaves the run's results; rewritten after it with the final total time.
    storage.write_json_atomic(workdir / 'summary.json', summary)
    if config.write_report:
      _write_report(workdir, config, run, state, summary)
    summary['total_seconds'] = time.perf_counter() - start
    storage.write_json_atomic(workdir / 'summary.json', summary)
    print(f"done: {_result_words(run, summary)}, {summary['steps']} steps, "
          f"{loop.train_seconds:.1f}s of training ({summary['total_seconds']:.1f}s in all); "
          f'wrote {workdir}', flush=True)
  return summary


def _result_words(run: Setup, summary: dict) -> str:
  """'test accuracy 0.9786', '... ± 0.0016 over 5 seeds [...]', or a sweep's best and mean."""
  name = run.headline
  words = f"test {name} {summary[f'test_{name}']:.4f}"
  if f'{EMA_PREFIX}{name}' in summary:
    words += f" (ema {summary[f'{EMA_PREFIX}{name}']:.4f})"
  if run.replicas.sweeping:
    return (f"best test {name} {summary['best'][f'test_{name}']:.4f} "
            f"({summary['best']['replica']}); mean {summary[f'test_{name}']:.4f} over "
            f"{summary['replicas_alive']} of {len(run.replicas)} replicas")
  if len(run.replicas) > 1:
    words += (f" ± {summary[f'test_{name}_std']:.4f} over {len(run.replicas)} seeds "
              f"{summary[f'test_{name}_per_replica']}")
  return words


def _import_report_while_training() -> None:
  """Imports the report's matplotlib (~0.4 s) in a thread, while the main thread waits for the
  steps (started after the first call is traced and dispatched: the import holds the GIL most
  of its time). The report's own import then finds it done (or waits for the rest). A failure
  here is left to that import to raise, after summary.json is written."""
  def run():
    try:
      from mnist_jax import report  # pylint: disable=g-import-not-at-top,unused-import
    except Exception:  # pylint: disable=broad-except
      pass
  threading.Thread(target=run, name='import-report', daemon=True).start()


def _write_report(workdir: epath.Path, config, run: Setup, state, summary: dict) -> None:
  """report.png and report.md, from the test set's predictions (report.py does the rest).

  With several replicas, the predictions are the first replica's, or the best one's in a sweep;
  with an EMA, the averaged weights'.
  """
  from mnist_jax import report  # pylint: disable=g-import-not-at-top  (matplotlib: only here)
  shown = summary['best']['index'] if run.replicas.sweeping else 0
  if run.task.ema_decay:
    state = steps.ema_weights(state, run.task.ema_decay)
  probs = run.executor.predict(run.replicas.pick(state, shown), config.eval_batch_size)
  report.write_run_report(workdir, writers.read_history(workdir), run.executor.eval, probs,
                          summary, config.to_dict())


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the newest valid checkpoint in `workdir` without training (every replica; with
  an EMA, both the raw weights, test_*, and the average, test_ema_*)."""
  run = setup(config)
  # Read only: another run may be training in this workdir; nothing here is changed.
  ckpt = checkpoint.Checkpointer(storage.as_path(workdir) / 'checkpoints',
                                 keep=config.checkpoint_keep, read_only=True,
                                 retry_seconds=config.cloud_retry_seconds)
  try:
    _, loop = _restore(run, ckpt)
  finally:
    ckpt.close()
  if loop is None:
    raise errors.UserError(f'No checkpoint in {ckpt.directory} to evaluate.')
  result = dict(step=loop.step,
                **_evaluate(run, loop.state, run.replicas.alive(loop.diverged)),
                param_fingerprint=writers.fingerprint(*steps.fingerprinted(loop.state)))
  if len(run.replicas) > 1:
    result['replicas'] = [
        dict(replica=r.name, **{f'test_{n}': result[f'test_{n}_per_replica'][i]
                                for n in run.task.value_names})
        for i, r in enumerate(run.replicas.items)]
  print(json.dumps(result), flush=True)
  return result
