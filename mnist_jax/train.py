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
import sys
import time

from etils import epath
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
from mnist_jax import storage
from mnist_jax import sweeps
from mnist_jax import validation
from mnist_jax import workdir as workdir_lib
from mnist_jax import writers


class NonFiniteError(errors.UserError):
  pass


def resolve_cache_dir(cache_dir: str) -> epath.Path | None:
  if cache_dir == 'none':
    return None
  path = cache_dir or os.environ.get('MNIST_JAX_CACHE') or '~/.cache/mnist_jax'
  return storage.as_path(path if storage.is_remote(path) else os.path.expanduser(path))


def enable_compilation_cache(cache_dir: epath.Path) -> None:
  """JAX's persistent cache: a second run loads compiled programs instead of compiling."""
  jax.config.update('jax_compilation_cache_dir', str(cache_dir / 'jax'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


# On a terminal the progress bar moves after every call, so calls are shorter there.
INTERACTIVE_STEPS_PER_CALL = 50
# With config.profile, calls of at most this many steps (the same results, in shorter calls),
# of which the trace records PROFILE_CALLS after the first (which compiles).
PROFILE_STEPS_PER_CALL = 10
PROFILE_CALLS = 3


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
  cache_dir: epath.Path | None
  identity: dict  # What the run is (saved in every checkpoint): see `run_identity`.
  replicas: list[sweeps.Replica]  # One, or the seeds and swept values trained side by side.

  @property
  def sweeping(self) -> bool:
    """Several replicas of swept values (a one-value sweep is a single run)."""
    return len(self.replicas) > 1 and bool(self.replicas[0].hparams)


def setup(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config, loads the data and builds the initial (replicated) state."""
  validation.validate(config)
  cache_dir = resolve_cache_dir(config.cache_dir)
  if cache_dir:
    enable_compilation_cache(cache_dir)
  info, splits = input_pipeline.load(
      config.dataset, config.data_dir, (config.train_split, config.eval_split),
      download=config.download, cache_dir=cache_dir,
      image_size=tuple(config.get('image_size', ())))
  model = models.build(config.model, info.num_classes)
  task = steps.Task.from_config(config, model)
  mode_name = input_modes.resolve(config.input_mode, splits)
  replicas = sweeps.replicas(config)
  execution = for_backend(config)
  mode = input_modes.create(
      mode_name, splits, train_split=config.train_split, eval_split=config.eval_split,
      seeds=[r.seed for r in replicas], batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size,
      steps_per_call=min(execution['steps_per_call'] or _default_steps_per_call(),
                         config.checkpoint_every_steps or 1 << 30,
                         PROFILE_STEPS_PER_CALL if config.profile else 1 << 30),
      scan_unroll=execution['scan_unroll'], task=task)
  tx = optim.create_optimizer(config, mode.steps_per_epoch * config.num_epochs,
                              swept=tuple(sweeps.swept(config)))
  init = functools.partial(_init_replica, model=model, tx=tx, image_shape=info.image_shape)
  # Replica i starts exactly as a single run with its seed and values would.
  rngs = [jax.random.PRNGKey(r.seed) for r in replicas]
  rng, hparams = (rngs[0] if len(rngs) == 1 else jax.numpy.stack(rngs),
                  sweeps.stacked_hparams(replicas))
  if len(replicas) > 1:
    init = jax.vmap(init)
  # Runs once: XLA's backend optimizations would cost more compile time (~1 s on a CPU, for the
  # random initializers) than they could ever save. The values are the same.
  state = jax.jit(init, out_shardings=mode.replicated,
                  compiler_options=dict(xla_backend_optimization_level=1))(rng, hparams)
  num_params = writers.count_params(state.params) // len(replicas)
  return Setup(info, mode_name, mode, task, state, num_params, cache_dir,
               run_identity(config, mode, info.identity), replicas)


def for_backend(config: ml_collections.ConfigDict, backend: str | None = None) -> dict:
  """steps_per_call and scan_unroll on `backend` (default: JAX's): the config's, or
  config.backend_overrides.<backend>'s where that sets them (configs/cnn.py unrolls its steps on
  XLA:CPU, where that makes convolutions fast, and not on a GPU, where it only slows compiling)."""
  overrides = config.get('backend_overrides', {}).get(backend or jax.default_backend(), {})
  return {name: overrides.get(name, config[name]) for name in validation.BACKEND_FIELDS}


def _init_replica(rng, hparams, *, model, tx, image_shape) -> steps.TrainState:
  return sweeps.assign(steps.create_train_state(rng, model, tx, image_shape), hparams)


# Config fields a resumed run may change: they leave what a saved step and state mean as it
# was (more epochs continue the training). Every other field, and the steps per epoch, must
# match the checkpoints' (`checkpoint.Checkpointer.check_run`).
RESUMABLE_FIELDS = ('num_epochs', 'eval_split', 'eval_batch_size', 'data_dir', 'download',
                    'cache_dir', 'input_mode', 'steps_per_call', 'scan_unroll',
                    'checkpoint_every_steps', 'checkpoint_keep', 'checkpoint_async',
                    'write_tensorboard', 'write_report', 'profile', 'backend_overrides')


def run_identity(config: ml_collections.ConfigDict, mode: input_modes.InputMode,
                 dataset_identity: str | None = None) -> dict:
  """The config fields that define the run, flattened ('model.features': [32, 64]), the
  number of training examples and steps per epoch, and, for own data, what identifies its
  files (`DatasetInfo.identity`: a changed folder or .npz is another dataset)."""
  def flatten(tree, prefix=''):
    for key, value in tree.items():
      if key in RESUMABLE_FIELDS and not prefix:
        continue
      if isinstance(value, dict):
        yield from flatten(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value

  identity = dict(flatten(config.to_dict()), train_examples=len(mode.train),
                  steps_per_epoch=mode.steps_per_epoch)
  if dataset_identity:
    identity['dataset_identity'] = dataset_identity
  return json.loads(json.dumps(identity))  # As JSON gives it back: tuples are lists.


def replica(tree, i: int, num_replicas: int):
  """Replica i of a state or result that has a leading replica axis when num_replicas > 1."""
  return tree if num_replicas == 1 else jax.tree.map(lambda x: x[i], tree)


def _epoch_line(record: dict, run: 'Setup', num_epochs: int) -> str:
  """'epoch 2/5  train loss 0.1071 accuracy 0.9686  |  test loss ... |  16,359 ex/s  9.3s'.

  With several replicas the values are means over those that have not diverged; the headline
  metric's test value also shows their spread, and for a sweep the best replica.
  """
  def values(split):
    return ' '.join(f'{name} {record[f"{split}_{name}"]:.4f}' for name in run.task.value_names)

  name = _headline(run.task)
  spread = ''
  if f'test_{name}_std' in record:
    spread = (f" ± {record[f'test_{name}_std']:.4f} (mean ± std of {record['replicas_alive']} "
              f"{'replicas' if run.sweeping else 'seeds'})")
  if run.sweeping:
    best = record['best']
    spread += f"  best {best[f'test_{name}']:.4f} ({best['replica']})"
  return (f"epoch {record['epoch']}/{num_epochs}  train {values('train')}  |  "
          f"test {values('test')}{spread}  |  "
          f"{record['examples_per_sec']:,.0f} ex/s  {record['elapsed_s']:.1f}s")


def _check_finite(unchecked: list, diverged: np.ndarray | None = None,
                  replicas: list | None = None) -> None:
  """Stops the run at the first step whose loss, or whose gradient update, is NaN or Inf.

  `unchecked` holds (per_step, first step, last step) of every call since the last check,
  oldest first; it is emptied. Checking them all (not only the last call) names the first bad
  step. Non-finite gradients poison the parameters and so every later loss: if a call's losses
  are finite but its final parameters are not, the bad update was its last step.

  In a sweep (`diverged`: per replica, the step it diverged at, 0 while it has not), a
  replica that goes non-finite is marked and the others go on; only when every replica has
  diverged does the run stop.
  """
  for per_step, first_step, last_step in unchecked:
    loss = np.asarray(per_step['loss'])
    loss_RxK = loss.reshape(-1, loss.shape[-1])  # R replicas (1 for a single run).
    finite_R = np.asarray(per_step['params_finite']).reshape(-1)
    bad_RxK = ~np.isfinite(loss_RxK)
    for r in range(len(loss_RxK)) if diverged is not None else ():
      if diverged[r] or (finite_R[r] and not bad_RxK[r].any()):
        continue
      bad = np.flatnonzero(bad_RxK[r])
      diverged[r] = first_step + bad[0] + 1 if bad.size else last_step
      print(f'warning: replica {replicas[r].name} diverged at step {diverged[r]} (loss '
            f'{loss_RxK[r, bad[0]] if bad.size else "finite, parameters not"}); the others go '
            'on.', flush=True)
    if diverged is not None and not diverged.all():
      continue
    bad = np.flatnonzero(bad_RxK.any(axis=0))
    if bad.size:
      what, step = f'loss is {loss_RxK[:, bad[0]].tolist()}', first_step + bad[0] + 1
    elif not np.all(finite_R):
      what, step = 'gradients are non-finite (the update made the parameters NaN/Inf)', last_step
    else:
      continue
    raise NonFiniteError(
        f'{what} at step {step}; stopping without saving this state (the last checkpoint is '
        'kept). Lower the learning rate or check the data.')
  unchecked.clear()


def _write_header(workdir: epath.Path, config, run: Setup) -> None:
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
  workdir = storage.as_path(workdir)  # gs://... stays gs://.
  run = setup(config)  # Validates the config first: a bad one writes nothing.
  workdir_lib.prepare(workdir)
  try:
    with storage.cloud_errors(workdir), workdir_lib.hold(workdir):
      return _train_and_finish(config, run, workdir, start)
  except OSError as e:
    if e.errno != errno.ENOSPC:
      raise
    raise DiskFull(f'no space left on device writing {e.filename or workdir}; what was written '
                   'before is intact. Free some space, then run the same command again to '
                   'continue from the last checkpoint.') from None


def _train_and_finish(config, run: Setup, workdir: epath.Path, start: float) -> dict:
  is_writer = jax.process_index() == 0
  ckpt = checkpoint.Checkpointer(workdir / 'checkpoints', keep=config.checkpoint_keep,
                                 asynchronous=config.checkpoint_async)
  logger = None
  try:
    saved = ckpt.check_run(_run_record(config, run), may_differ=('num_epochs',))
    restored = ckpt.restore_latest(_item(run, run.state, run.mode.zero_sums(),
                                         _no_divergence(run)))
    if saved and restored:
      _warn_if_the_schedule_moved(config, run, saved['num_epochs'], restored[1])
    if is_writer:
      _write_header(workdir, config, run)
    logger = writers.MetricLogger(
        workdir, tensorboard=config.write_tensorboard, enabled=is_writer,
        replica_names=[r.name for r in run.replicas] if len(run.replicas) > 1 else None)
    with preemption.Stopper() as stopper:
      profiler = _Profiler(workdir) if config.profile and is_writer else None
      state, record, diverged, train_seconds = _train_loop(config, run, ckpt, logger,
                                                           restored, stopper, start, profiler)
  finally:  # Also on errors: finish the pending save, so the last checkpoint stays whole.
    try:
      ckpt.wait()
    finally:
      ckpt.close()
      if logger:
        logger.close()
  return _finish(workdir, config, run, state, record, diverged, train_seconds, start, is_writer)


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


def _no_divergence(run: Setup) -> np.ndarray | None:
  """Per replica of a sweep, the step it diverged at (0: not); None without a sweep."""
  return np.zeros(len(run.replicas), np.int32) if run.sweeping else None


def _item(run: Setup, state, epoch_sums, diverged) -> dict:
  """What a checkpoint saves: the state, the epoch's running sums, and (a sweep) which
  replicas diverged when."""
  item = dict(state=state, epoch_sums=epoch_sums)
  if diverged is not None:
    item['diverged'] = run.mode.put_replicated(diverged)
  return item


class _Profiler:
  """A jax.profiler trace of PROFILE_CALLS steady-state calls, after the first one (which
  compiles): TensorBoard's profile plugin reads it from <workdir>/plugins/profile/, and
  Perfetto (ui.perfetto.dev) opens its perfetto_trace.json.gz."""

  def __init__(self, workdir: epath.Path):
    self.workdir, self.calls = workdir, 0

  def after_call(self, state) -> None:
    self.calls += 1
    if self.calls in (1, 1 + PROFILE_CALLS):
      jax.block_until_ready(state)  # The trace holds exactly the calls in between.
      if self.calls == 1:
        jax.profiler.start_trace(str(self.workdir), create_perfetto_trace=True)
      else:
        jax.profiler.stop_trace()
        print(f'profile: traced {PROFILE_CALLS} calls into {self.workdir}/plugins/profile/',
              flush=True)

  def close(self) -> None:
    if 1 <= self.calls < 1 + PROFILE_CALLS:  # The run ended first: keep what was traced.
      jax.profiler.stop_trace()


def _train_loop(config, run: Setup, ckpt, logger, restored, stopper, start, profiler=None):
  mode, state, epoch_sums = run.mode, run.state, run.mode.zero_sums()
  diverged = _no_divergence(run)
  if restored:
    state, epoch_sums = restored[0]['state'], restored[0]['epoch_sums']
    if diverged is not None:
      diverged = np.asarray(jax.device_get(restored[0]['diverged']), np.int32)
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
      if profiler:
        profiler.after_call(state)
      previous, step = step, step + mode.real_steps(chunk)
      unchecked.append((per_step, previous, step))
      if progress.due():
        progress.update(step - epoch * spe, _running(epoch_sums, run.task))
      # A stop in an epoch's last call waits for the epoch's end (evaluation, record, sums
      # reset), so the checkpoint never holds a finished epoch whose record is missing.
      stop = stopper.stop_signal()
      if (stop and step % spe) or (every and step // every > previous // every and step % spe):
        _check_finite(unchecked, diverged, run.replicas)
        ckpt.save(step, _item(run, state, epoch_sums, diverged), _run_record(config, run))
      if stop and step % spe:
        ckpt.wait()
        progress.close()
        raise preemption.Preempted(stop, step, ckpt.directory)
    _check_finite(unchecked, diverged, run.replicas)  # Also waits for the epoch to finish.
    epoch_seconds = time.perf_counter() - epoch_start
    train_seconds += epoch_seconds
    alive = None if diverged is None else diverged == 0
    record = dict(epoch=epoch + 1, **metrics.summarize(epoch_sums, 'train_', alive),
                  **metrics.summarize(mode.evaluate(state), 'test_', alive),
                  examples_per_sec=examples / epoch_seconds, epoch_seconds=epoch_seconds,
                  elapsed_s=time.perf_counter() - start)
    record.update(_replica_summary(run, record, diverged))
    logger.write(step, record)
    epoch_sums = mode.zero_sums()
    ckpt.save(step, _item(run, state, epoch_sums, diverged), _run_record(config, run))
    progress.end_epoch(_epoch_line(record, run, config.num_epochs))
    if stop and epoch + 1 < config.num_epochs:
      ckpt.wait()
      progress.close()
      raise preemption.Preempted(stop, step, ckpt.directory)
  if profiler:
    profiler.close()
  return state, record, diverged, train_seconds


def _replica_summary(run: Setup, record: dict, diverged: np.ndarray | None) -> dict:
  """With several replicas: how many are alive and, for a sweep, each one's values and the
  best of them by the headline test metric (the highest; the lowest for a loss)."""
  if len(run.replicas) == 1:
    return {}
  alive = np.ones(len(run.replicas), bool) if diverged is None else diverged == 0
  out = dict(replicas_alive=int(alive.sum()))
  if not run.sweeping:
    return out
  name = _headline(run.task)
  scores = np.asarray(record[f'test_{name}_per_replica'], np.float64)
  scores = np.where(alive, scores if name != 'loss' else -scores, -np.inf)
  best = int(np.argmax(scores))
  out['best'] = dict(replica=run.replicas[best].name, index=best,
                     **{f'test_{name}': record[f'test_{name}_per_replica'][best]})
  out['diverged_at_step'] = [int(d) if d else None for d in diverged]
  return out


def _step_of(state) -> int:
  return int(np.asarray(jax.device_get(state.step)).reshape(-1)[0])  # Replicas step together.


def _headline(task: steps.Task) -> str:
  """The value a run's last line reports: the first metric (else the loss)."""
  return task.value_names[1] if len(task.value_names) > 1 else task.value_names[0]


def _running(sums, task: steps.Task) -> dict:
  """The running loss and first metric as device scalars (fetched only if a line draws)."""
  count = jax.numpy.maximum(sums[metrics.COUNT], 1.0)
  return {name: jax.numpy.mean(sums[name] / count) for name in task.value_names[:2]}


def _finish(workdir, config, run: Setup, state, record, diverged, train_seconds, start,
            is_writer):
  if record is None:  # The run had finished already: evaluate its final state again.
    record = metrics.summarize(run.mode.evaluate(state), 'test_',
                               None if diverged is None else diverged == 0)
    record.update(_replica_summary(run, record, diverged))
  summary = dict(
      {k: v for k, v in record.items() if k.startswith(('test_', 'train_'))},
      epochs=config.num_epochs, steps=_step_of(state), num_params=run.num_params,
      param_fingerprint=writers.fingerprint(state.params, state.model_state),
      train_seconds=train_seconds, total_seconds=time.perf_counter() - start,
      input_mode=run.mode_name, seed=config.seed, num_seeds=config.num_seeds,
      class_names=list(run.info.class_names), versions=writers.versions())
  if len(run.replicas) > 1:
    summary.update(_per_replica(config, run, state, record))
  if is_writer:
    # Written before the report too, so a failing report (e.g. a broken matplotlib) still
    # leaves the run's results; rewritten after it with the final total time.
    writers.write_json(workdir / 'summary.json', summary)
    if config.write_report:
      _write_report(workdir, config, run, state, summary)
    summary['total_seconds'] = time.perf_counter() - start
    writers.write_json(workdir / 'summary.json', summary)
    print(f"done: {_result_words(run, summary)}, {summary['steps']} steps, "
          f"{train_seconds:.1f}s of training ({summary['total_seconds']:.1f}s in all); "
          f'wrote {workdir}', flush=True)
  return summary


def _per_replica(config, run: Setup, state, record: dict) -> dict:
  """Each replica's fingerprint and, as a table, its values, seed and test results."""
  num = len(run.replicas)
  fingerprints = [writers.fingerprint(*replica((state.params, state.model_state), i, num))
                  for i in range(num)]
  diverged = record.get('diverged_at_step', [None] * num)
  table = [dict(replica=r.name, hparams=r.hparams, seed=r.seed,
                **{f'test_{n}': record[f'test_{n}_per_replica'][i] for n in run.task.value_names},
                param_fingerprint=fingerprints[i], diverged_at_step=diverged[i])
           for i, r in enumerate(run.replicas)]
  out = dict(param_fingerprint_per_replica=fingerprints, replicas=table,
             replicas_alive=record['replicas_alive'])
  if run.sweeping:
    out.update(best=record['best'], swept=sweeps.swept(config))
  return out


def _result_words(run: Setup, summary: dict) -> str:
  """'test accuracy 0.9786', '... ± 0.0016 over 5 seeds [...]', or a sweep's best and mean."""
  name = _headline(run.task)
  words = f"test {name} {summary[f'test_{name}']:.4f}"
  if run.sweeping:
    return (f"best test {name} {summary['best'][f'test_{name}']:.4f} "
            f"({summary['best']['replica']}); mean {summary[f'test_{name}']:.4f} over "
            f"{summary['replicas_alive']} of {len(run.replicas)} replicas")
  if len(run.replicas) > 1:
    words += (f" ± {summary[f'test_{name}_std']:.4f} over {len(run.replicas)} seeds "
              f"{summary[f'test_{name}_per_replica']}")
  return words


def _write_report(workdir: epath.Path, config, run: Setup, state, summary: dict) -> None:
  """report.png and report.md, from the test set's predictions (report.py does the rest).

  With several replicas, the predictions are the first replica's, or the best one's in a sweep.
  """
  from mnist_jax import report  # pylint: disable=g-import-not-at-top  (matplotlib: only here)
  shown = summary['best']['index'] if run.sweeping else 0
  state = replica(state, shown, len(run.replicas))
  probs = steps.predict(state, run.mode.eval.image, config.eval_batch_size, run.task)
  report.write_run_report(workdir, writers.read_history(workdir), run.mode.eval, probs,
                          summary, config.to_dict())


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the newest valid checkpoint in `workdir` without training (every replica)."""
  run = setup(config)
  # Read only: another run may be training in this workdir; nothing here is changed.
  ckpt = checkpoint.Checkpointer(storage.as_path(workdir) / 'checkpoints',
                                 keep=config.checkpoint_keep, read_only=True)
  ckpt.check_run(_run_record(config, run), may_differ=('num_epochs',))
  restored = ckpt.restore_latest(_item(run, run.state, run.mode.zero_sums(),
                                       _no_divergence(run)))
  ckpt.close()
  if restored is None:
    raise errors.UserError(f'No checkpoint in {ckpt.directory} to evaluate.')
  state, diverged = restored[0]['state'], restored[0].get('diverged')
  alive = None if diverged is None else np.asarray(diverged) == 0
  result = dict(step=_step_of(state), **metrics.summarize(run.mode.evaluate(state), 'test_', alive),
                param_fingerprint=writers.fingerprint(state.params, state.model_state))
  if len(run.replicas) > 1:
    result['replicas'] = [
        dict(replica=r.name, **{f'test_{n}': result[f'test_{n}_per_replica'][i]
                                for n in run.task.value_names})
        for i, r in enumerate(run.replicas)]
  print(json.dumps(result), flush=True)
  return result
