"""The training loop: `train_and_evaluate(config, workdir)` trains, evaluates and reports.

Usable from a notebook:
  from mnist_jax import train
  from configs import mlp
  summary = train.train_and_evaluate(mlp.get_config(), '/tmp/mnist')

A run in a workdir that holds checkpoints resumes from the newest valid one: same parameters,
optimizer state, step, RNG and position in the data as the run that wrote it.
"""

import dataclasses
import errno
import functools
import io
import json
import os
import pathlib
import sys
import time

import jax
import ml_collections
import numpy as np

from mnist_jax import checkpoint
from mnist_jax import errors
from mnist_jax import input_modes
from mnist_jax import input_pipeline
from mnist_jax import metrics
from mnist_jax import models
from mnist_jax import optim
from mnist_jax import preemption
from mnist_jax import progress as progress_lib
from mnist_jax import steps
from mnist_jax import validation
from mnist_jax import workdir as workdir_lib
from mnist_jax import writers


class NonFiniteError(errors.UserError):
  pass


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


# On a terminal the progress bar moves after every call, so calls are shorter there.
INTERACTIVE_STEPS_PER_CALL = 50


def _default_steps_per_call() -> int:
  return INTERACTIVE_STEPS_PER_CALL if sys.stdout.isatty() else 1 << 30  # (An epoch.)


@dataclasses.dataclass
class Setup:
  """Everything a run needs before its first step."""
  info: input_pipeline.DatasetInfo
  mode_name: str
  mode: input_modes.InputMode
  task: steps.Task
  state: steps.TrainState
  num_params: int
  cache_dir: pathlib.Path | None
  identity: dict  # What the run is (saved in every checkpoint): see `run_identity`.


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config, loads the data and builds the initial (replicated) state."""
  validation.validate(config)
  cache_dir = resolve_cache_dir(config.cache_dir)
  if cache_dir:
    enable_compilation_cache(cache_dir)
  info, splits = input_pipeline.load(
      config.dataset, config.data_dir, (config.train_split, config.eval_split),
      download=config.download, cache_dir=cache_dir)
  model = models.build(config.model, info.num_classes)
  task = steps.Task.from_config(config, model)
  mode_name = input_modes.resolve(config.input_mode, splits)
  mode = input_modes.create(
      mode_name, splits, train_split=config.train_split, eval_split=config.eval_split,
      seed=config.seed, batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
      steps_per_call=min(config.steps_per_call or _default_steps_per_call(),
                         config.checkpoint_every_steps or 1 << 30),
      scan_unroll=config.scan_unroll, num_replicas=config.num_seeds, task=task)
  tx = optim.create_optimizer(config, mode.steps_per_epoch * config.num_epochs)
  init = functools.partial(steps.create_train_state, model=model, tx=tx,
                           image_shape=info.image_shape)
  if config.num_seeds == 1:
    rng = jax.random.PRNGKey(config.seed)
  else:  # Replica i starts exactly as a single run with seed + i would.
    rng = jax.numpy.stack([jax.random.PRNGKey(config.seed + i) for i in range(config.num_seeds)])
    init = jax.vmap(init)
  # Runs once: XLA's backend optimizations would cost more compile time (~1 s on a CPU, for the
  # random initializers) than they could ever save. The values are the same.
  state = jax.jit(init, out_shardings=mode.replicated,
                  compiler_options=dict(xla_backend_optimization_level=1))(rng)
  num_params = writers.count_params(state.params) // config.num_seeds
  return Setup(info, mode_name, mode, task, state, num_params, cache_dir,
               run_identity(config, mode))


# Config fields a resumed run may change: they leave what a saved step and state mean as it
# was (more epochs continue the training). Every other field, and the steps per epoch, must
# match the checkpoints' (`checkpoint.Checkpointer.check_run`).
RESUMABLE_FIELDS = ('num_epochs', 'eval_split', 'eval_batch_size', 'data_dir', 'download',
                    'cache_dir', 'input_mode', 'steps_per_call', 'scan_unroll',
                    'checkpoint_every_steps', 'checkpoint_keep', 'checkpoint_async',
                    'write_tensorboard', 'write_report')


def run_identity(config: ml_collections.ConfigDict, mode: input_modes.InputMode) -> dict:
  """The config fields that define the run, flattened ('model.features': [32, 64]), and the
  number of training examples and steps per epoch."""
  def flatten(tree, prefix=''):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from flatten(value, f'{prefix}{key}.')
      elif key not in RESUMABLE_FIELDS or prefix:
        yield f'{prefix}{key}', value

  identity = dict(flatten(config.to_dict()), train_examples=len(mode.train),
                  steps_per_epoch=mode.steps_per_epoch)
  return json.loads(json.dumps(identity))  # As JSON gives it back: tuples are lists.


def replica(tree, i: int, num_replicas: int):
  """Replica i of a state or result that has a leading replica axis when num_replicas > 1."""
  return tree if num_replicas == 1 else jax.tree.map(lambda x: x[i], tree)


def _epoch_line(record: dict, task: steps.Task, num_epochs: int) -> str:
  """'epoch 2/5  train loss 0.1071 accuracy 0.9686  |  test loss ... |  16,359 ex/s  9.3s'.

  With several seeds, the headline metric's test value also shows its spread over them.
  """
  def values(split):
    return ' '.join(f'{name} {record[f"{split}_{name}"]:.4f}' for name in task.value_names)

  spread_of = f'test_{_headline(task)}'
  spread = (f" ± {record[f'{spread_of}_std']:.4f} (mean ± std of "
            f"{len(record[f'{spread_of}_per_replica'])} seeds)"
            if f'{spread_of}_std' in record else '')
  return (f"epoch {record['epoch']}/{num_epochs}  train {values('train')}  |  "
          f"test {values('test')}{spread}  |  "
          f"{record['examples_per_sec']:,.0f} ex/s  {record['elapsed_s']:.1f}s")


def _check_finite(unchecked: list) -> None:
  """Stops the run at the first step whose loss, or whose gradient update, is NaN or Inf.

  `unchecked` holds (per_step, first step, last step) of every call since the last check,
  oldest first; it is emptied. Checking them all (not only the last call) names the first bad
  step. Non-finite gradients poison the parameters and so every later loss: if a call's losses
  are finite but its final parameters are not, the bad update was its last step.
  """
  for per_step, first_step, last_step in unchecked:
    loss = np.asarray(per_step['loss'])
    loss_RxK = loss.reshape(-1, loss.shape[-1])  # R replicas (1 for a single run).
    bad = np.flatnonzero(~np.isfinite(loss_RxK).all(axis=0))
    if bad.size:
      what, step = f'loss is {loss_RxK[:, bad[0]].tolist()}', first_step + bad[0] + 1
    elif not np.all(per_step['params_finite']):
      what, step = 'gradients are non-finite (the update made the parameters NaN/Inf)', last_step
    else:
      continue
    raise NonFiniteError(
        f'{what} at step {step}; stopping without saving this state (the last checkpoint is '
        'kept). Lower the learning rate or check the data.')
  unchecked.clear()


def _write_header(workdir: pathlib.Path, config, run: Setup) -> None:
  writers.write_json(workdir / 'config.json', dict(config.to_dict(), resolved=dict(
      input_mode=run.mode_name, data_dir=input_pipeline.resolve_data_dir(config.data_dir) or '',
      cache_dir=str(run.cache_dir or ''))))
  print(f'{run.info.name}: {len(run.mode.train):,} train / {len(run.mode.eval):,} test '
        f'examples, {run.num_params:,} parameters, input_mode={run.mode_name}, '
        f'{jax.device_count()}x {jax.devices()[0].device_kind}', flush=True)


class DiskFull(errors.UserError):
  pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` into `workdir`; returns the final summary (also in summary.json).

  Holds the workdir's lock throughout: a second run in the same workdir is refused.
  """
  start = time.perf_counter()
  run = setup(config)  # Validates the config first: a bad one writes nothing.
  workdir = pathlib.Path(workdir)
  workdir_lib.prepare(workdir)
  try:
    with workdir_lib.hold(workdir):
      return _train_and_finish(config, run, workdir, start)
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    raise DiskFull(f'no space left on device writing {e.filename or workdir}; what was written '
                   'before is intact. Free some space, then run the same command again to '
                   'continue from the last checkpoint.') from None


def _train_and_finish(config, run: Setup, workdir: pathlib.Path, start: float) -> dict:
  is_writer = jax.process_index() == 0
  ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', keep=config.checkpoint_keep,
                                 asynchronous=config.checkpoint_async)
  logger = None
  try:
    saved = ckpt.check_run(_run_record(config, run), may_differ=('num_epochs',))
    restored = ckpt.restore_latest(dict(state=run.state, epoch_sums=run.mode.zero_sums()))
    if saved and restored:
      _warn_if_the_schedule_moved(config, run, saved['num_epochs'], restored[1])
    if is_writer:
      _write_header(workdir, config, run)
    logger = writers.MetricLogger(workdir, tensorboard=config.write_tensorboard,
                                  enabled=is_writer)
    with preemption.Stopper() as stopper:
      state, record, train_seconds = _train_loop(config, run, ckpt, logger, restored,
                                                 stopper, start)
  finally:  # Also on errors: finish the pending save, so the last checkpoint stays whole.
    try:
      ckpt.wait()
    finally:
      ckpt.close()
      if logger:
        logger.close()
  return _finish(workdir, config, run, state, record, train_seconds, start, is_writer)


def _run_record(config, run: Setup) -> dict:
  """What a checkpoint records of its run: its identity, and the epochs it was to train."""
  return dict(run.identity, num_epochs=config.num_epochs)


def _warn_if_the_schedule_moved(config, run: Setup, saved_epochs: int, step: int) -> None:
  """More (or fewer) epochs than the checkpoints' run: say so if the learning rate from here
  on differs from the one that run would have used (a schedule that spans the run)."""
  if saved_epochs == config.num_epochs:
    return
  spe = run.mode.steps_per_epoch
  old, new = (optim.create_schedule(config, spe * e) for e in (saved_epochs, config.num_epochs))
  ahead = np.linspace(step, spe * min(saved_epochs, config.num_epochs), 16).astype(int)
  if not np.allclose([old(s) for s in ahead], [new(s) for s in ahead], rtol=1e-6, atol=0):
    print(f'warning: num_epochs is {config.num_epochs}, the checkpoints\' run had '
          f'{saved_epochs}: from step {step} on, the learning-rate schedule follows the new '
          f'length ({spe * config.num_epochs} steps).', flush=True)


def _train_loop(config, run: Setup, ckpt, logger, restored, stopper, start):
  mode, state, epoch_sums = run.mode, run.state, run.mode.zero_sums()
  if restored:
    state, epoch_sums = restored[0]['state'], restored[0]['epoch_sums']
    print(f'resumed from the checkpoint at step {restored[1]} in {ckpt.directory}', flush=True)
  spe, every = mode.steps_per_epoch, config.checkpoint_every_steps
  step = previous = _step_of(state)
  # Only process 0 talks; the others train silently.
  progress = progress_lib.Progress(config.num_epochs, spe,
                                   None if jax.process_index() == 0 else io.StringIO())
  train_seconds, record = 0.0, None
  for epoch in range(step // spe, config.num_epochs):
    epoch_start = time.perf_counter()
    progress.start_epoch(epoch + 1)
    chunks = mode.epoch_chunks(epoch, start=step - epoch * spe)
    examples = sum(int(chunk['mask'].sum()) for chunk in chunks)
    unchecked = []  # (per_step, first step) of the calls not yet checked for NaN/Inf.
    for chunk, args in zip(chunks, mode.train_inputs(chunks)):
      state, sums, per_step = mode.train_call(
          state, *args, guard_empty_steps=mode.guard_empty_steps(chunk))
      epoch_sums = metrics.add_sums(epoch_sums, sums)
      previous, step = step, step + mode.real_steps(chunk)
      unchecked.append((per_step, previous, step))
      if progress.due():
        progress.update(step - epoch * spe, _running(epoch_sums, run.task))
      # A stop in an epoch's last call waits for the epoch's end (evaluation, record, sums
      # reset), so the checkpoint never holds a finished epoch whose record is missing.
      stop = stopper.stop_signal()
      if (stop and step % spe) or (every and step // every > previous // every and step % spe):
        _check_finite(unchecked)
        ckpt.save(step, dict(state=state, epoch_sums=epoch_sums), _run_record(config, run))
      if stop and step % spe:
        ckpt.wait()
        progress.close()
        raise preemption.Preempted(stop, step, ckpt.directory)
    _check_finite(unchecked)  # Also waits for the epoch to finish.
    epoch_seconds = time.perf_counter() - epoch_start
    train_seconds += epoch_seconds
    record = dict(epoch=epoch + 1, **metrics.summarize(epoch_sums, 'train_'),
                  **metrics.summarize(mode.evaluate(state), 'test_'),
                  examples_per_sec=examples / epoch_seconds, epoch_seconds=epoch_seconds,
                  elapsed_s=time.perf_counter() - start)
    logger.write(step, record)
    epoch_sums = mode.zero_sums()
    ckpt.save(step, dict(state=state, epoch_sums=epoch_sums), _run_record(config, run))
    progress.end_epoch(_epoch_line(record, run.task, config.num_epochs))
    if stop and epoch + 1 < config.num_epochs:
      ckpt.wait()
      progress.close()
      raise preemption.Preempted(stop, step, ckpt.directory)
  return state, record, train_seconds


def _step_of(state) -> int:
  return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])  # Replicas step together.


def _headline(task: steps.Task) -> str:
  """The value a run's last line reports: the first metric (else the loss)."""
  return task.value_names[1] if len(task.value_names) > 1 else task.value_names[0]


def _running(sums, task: steps.Task) -> dict:
  """The running loss and first metric as device scalars (fetched only if a line draws)."""
  count = jax.numpy.maximum(sums[metrics.COUNT], 1.0)
  return {name: jax.numpy.mean(sums[name] / count) for name in task.value_names[:2]}


def _finish(workdir, config, run: Setup, state, record, train_seconds, start, is_writer):
  test = record or metrics.summarize(run.mode.evaluate(state), 'test_')  # None: was finished.
  summary = dict(
      {k: v for k, v in test.items() if k.startswith(('test_', 'train_'))},
      epochs=config.num_epochs, steps=_step_of(state), num_params=run.num_params,
      param_fingerprint=writers.fingerprint(state.params, state.model_state),
      train_seconds=train_seconds, total_seconds=time.perf_counter() - start,
      input_mode=run.mode_name, seed=config.seed, num_seeds=config.num_seeds,
      versions=writers.versions())
  if config.num_seeds > 1:
    summary['param_fingerprint_per_replica'] = [
        writers.fingerprint(*replica((state.params, state.model_state), i, config.num_seeds))
        for i in range(config.num_seeds)]
  if is_writer:
    # Written before the report too, so a failing report (e.g. a broken matplotlib) still
    # leaves the run's results; rewritten after it with the final total time.
    writers.write_json(workdir / 'summary.json', summary)
    if config.write_report:
      _write_report(workdir, config, run, state, summary)
    summary['total_seconds'] = time.perf_counter() - start
    writers.write_json(workdir / 'summary.json', summary)
    name = _headline(run.task)
    spread = (f" ± {summary[f'test_{name}_std']:.4f} over {config.num_seeds} seeds "
              f"{summary[f'test_{name}_per_replica']}" if config.num_seeds > 1 else '')
    print(f"done: test {name} {summary[f'test_{name}']:.4f}{spread}, {summary['steps']} steps, "
          f"{train_seconds:.1f}s of training ({summary['total_seconds']:.1f}s in all); "
          f'wrote {workdir}', flush=True)
  return summary


def _write_report(workdir: pathlib.Path, config, run: Setup, state, summary: dict) -> None:
  """report.png and report.md, from the test set's predictions (report.py does the rest)."""
  from mnist_jax import report  # pylint: disable=g-import-not-at-top  (matplotlib: only here)
  state = replica(state, 0, config.num_seeds)  # With several seeds, the report shows the first.
  probs = steps.predict(state, run.mode.eval.image, config.eval_batch_size, run.task)
  report.write_run_report(workdir, writers.read_history(workdir), run.mode.eval, probs,
                          summary, config.to_dict())


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the newest valid checkpoint in `workdir` without training."""
  run = setup(config)
  # Read only: another run may be training in this workdir; nothing here is changed.
  ckpt = checkpoint.Checkpointer(pathlib.Path(workdir) / 'checkpoints',
                                 keep=config.checkpoint_keep, read_only=True)
  ckpt.check_run(_run_record(config, run), may_differ=('num_epochs',))
  restored = ckpt.restore_latest(dict(state=run.state, epoch_sums=run.mode.zero_sums()))
  if restored is None:
    raise errors.UserError(f'No checkpoint in {ckpt.directory} to evaluate.')
  state = restored[0]['state']
  result = dict(step=_step_of(state), **metrics.summarize(run.mode.evaluate(state), 'test_'),
                param_fingerprint=writers.fingerprint(state.params, state.model_state))
  ckpt.close()
  print(json.dumps(result), flush=True)
  return result
