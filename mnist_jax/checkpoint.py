"""Checkpoints with Orbax: save every N steps and at the end, keep the last K, resume the latest.

A checkpoint holds two items: 'state', the whole training state (params, the model's other
collections, optimizer state, step, RNG) and the running metric sums of the current epoch; and
'run', what the run was made with (the config fields that give the step and the state their
meaning, and the steps per epoch: `run_record`). The position in the data needs no
saving: the data order is a pure function of (seed, epoch), so the step alone says where to
continue, as long as the run is the same run; a workdir whose 'run' differs from the config is
refused before anything is written (`IncompatibleCheckpoint`), naming the fields that differ.

Crash safety (tests/system/test_crash_safety.py):
  * Orbax writes a checkpoint into '<step>.orbax-checkpoint-tmp' and renames it to '<step>' only
    once it is complete, so a process killed mid-save leaves a temporary folder, never a step
    that looks finished; the next start removes such folders before anything else.
  * A step that fails to restore (truncated or deleted files) is skipped with a warning naming
    it, and the newest one that restores is used; none restoring is an error, never a silent
    fresh start. Before the next save the skipped steps are moved out of the way, into
    '<directory>.unreadable/', so the resumed run can save those steps again and they no longer
    count towards `keep`.
  * Checkpoints of another model or optimizer are refused with `IncompatibleCheckpoint`, and left
    as they are.
  * A save that fails (a full disk, a lost mount) stops the run with one line
    (`CheckpointSaveError`) naming the step, the folder and the newest intact checkpoint;
    Orbax's own tracebacks from its background threads are kept out of the way.
  * In a bucket, an outage is waited out for `retry_seconds` at most
    (`config.cloud_retry_seconds`, `storage.bound_retries`), then it is one line naming the
    outage, from a save or a restore alike; a checkpoint that could not be read for want of
    the network is never taken for a damaged one.
"""

import contextlib
import datetime
import errno
import json
import os
import re
import shutil
import sys
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from mnist_jax.infra import errors
from mnist_jax.infra import orbax_logs
from mnist_jax.infra import storage


class IncompatibleCheckpoint(errors.UserError):
  pass


class CheckpointSaveError(errors.UserError):
  pass



# Orbax's name for a checkpoint folder still being written: '<step>.orbax-checkpoint-tmp[...]'.
_TMP_MARK = '.orbax-checkpoint-tmp'
# On object storage, the file that marks a step folder finished (there is no rename).
_COMMIT_MARK = 'commit_success.txt'


STATE, RUN = 'state', 'run'  # The items of a checkpoint.


# Config fields a resumed run may change: they leave what a saved step and state mean as it
# was (more epochs continue the training). Every other field, and the examples and steps per
# epoch, must match the checkpoints' (`Checkpointer.check_run`).
RESUMABLE_FIELDS = ('num_epochs', 'eval_split', 'eval_batch_size', 'data_dir', 'download',
                    'cache_dir', 'input_mode', 'input_memory_budget', 'steps_per_call',
                    'scan_unroll', 'checkpoint_every_steps', 'checkpoint_keep', 'checkpoint_async',
                    'cloud_retry_seconds',
                    'write_tensorboard', 'write_report', 'profile', 'backend_overrides')


def run_record(config: ml_collections.ConfigDict, train_examples: int, steps_per_epoch: int,
               dataset_identity: str | None = None) -> dict:
  """What every checkpoint records of its run: each config field, flattened
  ('model.features': [32, 64]), the number of training examples and steps per epoch, and,
  for own data, what identifies its files (`DatasetInfo.identity`: a changed folder or .npz
  is another dataset)."""
  def flatten(tree, prefix=''):
    for key, value in tree.items():
      if isinstance(value, dict):
        yield from flatten(value, f'{prefix}{key}.')
      else:
        yield f'{prefix}{key}', value

  record = dict(flatten(config.to_dict()), train_examples=train_examples,
                steps_per_epoch=steps_per_epoch)
  if dataset_identity:
    record['dataset_identity'] = dataset_identity
  return json.loads(json.dumps(record))  # As JSON gives it back: tuples are lists.


# Fields added after checkpoints were first written, with the value that means "off": a
# checkpoint without one was written with it off, and is the same run as one that has it so.
ADDED_FIELDS = {'grad_accum_steps': 1, 'ema_decay': 0.0, 'compute_dtype': 'float32'}


def identity(record: dict) -> dict:
  """What a run is: its record less the fields a resumed run may change (RESUMABLE_FIELDS),
  and less added fields at their "off" value (ADDED_FIELDS)."""
  return {k: v for k, v in record.items() if k.split('.')[0] not in RESUMABLE_FIELDS
          and not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}


class Checkpointer:
  """A thin layer over `ocp.CheckpointManager` that restores the newest *valid* checkpoint.

  `read_only` (for evaluating a workdir that another run may be training in) neither creates
  nor cleans anything up.
  """

  def __init__(self, directory: epath.Path, *, keep: int, asynchronous: bool = True,
               read_only: bool = False,
               retry_seconds: float = storage.DEFAULT_RETRY_SECONDS):
    directory = storage.as_path(directory)
    self.directory = directory if storage.is_remote(directory) else directory.absolute()
    if storage.is_remote(directory):
      storage.bound_retries(retry_seconds)
    if not read_only:
      self._remove_unfinished()
    orbax_logs.quiet()
    options = (ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0,
                                            create=False) if read_only else
               ocp.CheckpointManagerOptions(
                   max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True,
                   cleanup_tmp_directories=True))
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=(STATE, RUN), options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       RUN: ocp.JsonCheckpointHandler()})
    self._unreadable: list[int] = []  # Skipped by restore_latest; set aside before a save.
    self._in_flight: int | None = None  # The step of the save not yet known to be finished.
    self._failed: CheckpointSaveError | None = None
    self.saves, self.save_seconds = 0, 0.0  # What the saves cost the loop (blocked in save).

  def _remove_unfinished(self) -> None:
    """Removes the temporary folders of saves a killed run left unfinished, now.

    Orbax does it too (`cleanup_tmp_directories`), but in a background thread that only a
    save waits for; a start that never saves (the run was finished, or stops with an error)
    could leave them.
    """
    if jax.process_index() == 0 and self.directory.is_dir():
      for path in self.directory.iterdir():
        if storage.is_remote(path):
          # No rename on object storage: Orbax writes '<step>/' in place and marks it
          # finished with '<step>/commit_success.txt'; a step without it was never finished.
          if path.name.isdigit() and not (path / _COMMIT_MARK).exists():
            path.rmtree()
        elif _TMP_MARK in path.name and path.is_dir() and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, item: Any, run: dict) -> None:
    """Starts an (async) save of the state `item` and the run's identity; the previous save
    is finished first. A failure of either raises CheckpointSaveError."""
    start = time.perf_counter()
    self.wait()  # The previous save's failure is that save's, not this one's.
    self._set_aside_unreadable()
    with self._saving(step):
      self._manager.save(step, args=ocp.args.Composite(
          **{STATE: ocp.args.StandardSave(item), RUN: ocp.args.JsonSave(run)}), force=True)
    self._in_flight = step
    self.saves += 1
    self.save_seconds += time.perf_counter() - start

  @contextlib.contextmanager
  def _saving(self, step: int):
    """Turns a failed save (this one, or the one in flight) into one clear line."""
    if self._failed:
      raise self._failed
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      failed, self._in_flight = step, None
      outage = storage.outage(e, self.directory)
      intact = [] if outage else [s for s in self.steps() if s < failed]  # (Lists the bucket.)
      self._failed = CheckpointSaveError(
          f'{outage or _save_failure(e)} while saving the checkpoint at step {failed} in '
          f'{self.directory}; '
          + ('the checkpoints finished before it are intact. ' if outage else
             f'the checkpoint at step {intact[-1]} is intact. ' if intact else
             'no earlier checkpoint was finished. ')
          + ('Run the same command again once the network is back, to continue from the '
             'newest of them.' if outage else
             'Fix that, then run the same command again to continue'
             + (' from it.' if intact else '.')))
      raise self._failed from None

  def check_run(self, record: dict) -> dict | None:
    """The 'run' item of the newest checkpoint that has a readable one (None: no checkpoint).

    Raises IncompatibleCheckpoint if it was made by another run than `record` (`run_record`)
    describes, naming every field of `identity` that differs.
    """
    for step in reversed(self.steps()):
      try:
        saved = self._manager.restore(step, args=ocp.args.Composite(
            **{RUN: ocp.args.JsonRestore()}))[RUN]
      except Exception:  # pylint: disable=broad-except  (restore_latest says which is bad)
        continue
      was, now = identity(saved), identity(record)
      changed = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
      if changed:
        fields = '; '.join(f'{k}: saved {was.get(k, "(none)")!r}, now {now.get(k, "(none)")!r}'
                           for k in changed)
        raise IncompatibleCheckpoint(
            f'{self.directory} holds checkpoints of another run, and resuming it would change '
            f'what its step and state mean ({fields}). Use another --workdir, or the saved '
            'values; num_epochs, evaluation, logging and checkpoint options may change.')
      return saved
    return None

  def restore_latest(self, template: Any) -> tuple[Any, int] | None:
    """The newest checkpoint that restores, shaped like `template`; None when there is none.

    A checkpoint that fails to restore (truncated or deleted files) is skipped with a warning
    naming its step; if none restores, the run stops rather than silently starting over. A
    checkpoint whose array shapes differ from the template's raises IncompatibleCheckpoint.
    """
    steps = self.steps()
    if not steps:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    for step in reversed(steps):
      self._check_compatible(step, abstract)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{STATE: ocp.args.StandardRestore(abstract)}))[STATE]
      except Exception as e:  # pylint: disable=broad-except
        if line := storage.describe_error(e, self.directory / str(step)):
          raise storage.StorageError(line) from None  # The bucket: nothing may be set aside.
        why = f'{type(e).__name__}: {errors.first_line(e)}'
        logging.warning('Checkpoint at step %d in %s cannot be restored (%s); trying an older '
                        'one.', step, self.directory, why)
        print(f'warning: checkpoint at step {step} in {self.directory} is unreadable ({why}); '
              'trying an older one.', flush=True)
        self._unreadable.append(step)
        continue
      return restored, step
    raise errors.UserError(
        f'None of the checkpoints in {self.directory} (steps {steps}) can be restored. Move '
        'the folder away to start over, or point --workdir at another folder.')

  def _set_aside_unreadable(self) -> None:
    """Moves the checkpoints restore_latest skipped to '<directory>.unreadable/<step>-<time>'."""
    if not self._unreadable:
      return
    self.wait()
    aside = self.directory.with_name(self.directory.name + '.unreadable')
    if jax.process_index() == 0:
      stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')
      for step in self._unreadable:
        source = self.directory / str(step)
        if source.exists():
          aside.mkdir(parents=True, exist_ok=True)
          target = aside / f'{step}-{stamp}'
          if storage.is_remote(source):
            source.rename(target)  # A copy and a delete on object storage.
          else:
            os.replace(source, target)
          print(f'warning: moved the unreadable checkpoint at step {step} to {target}',
                flush=True)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes('mnist_jax_set_aside_unreadable')
    self._unreadable = []
    self._manager.reload()

  def _check_compatible(self, step: int, abstract: Any) -> None:
    """Compares saved array shapes with the config's, so a mismatch is a clear error."""
    try:
      saved = self._manager.item_metadata(step)[STATE]
    except Exception:  # pylint: disable=broad-except
      return  # Unreadable metadata: restoring will say which checkpoint is bad.
    saved_shapes, wanted_shapes = _shapes(saved), _shapes(abstract)
    if saved_shapes and saved_shapes != wanted_shapes:
      path = sorted(set(saved_shapes) ^ set(wanted_shapes) or
                    {k for k in saved_shapes if saved_shapes[k] != wanted_shapes[k]})[0]
      raise IncompatibleCheckpoint(
          f'{self.directory} holds checkpoints of another model or optimizer than this config '
          f'(step {step}, {path}: saved {saved_shapes.get(path)}, this config '
          f'{wanted_shapes.get(path)}). Use another --workdir, or the config that wrote them; '
          'the checkpoints were left as they are.')

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointSaveError if it failed (once)."""
    if self._failed or self._in_flight is None:
      return  # Nothing in flight (or it failed, and that was said already).
    with self._saving(self._in_flight):
      self._manager.wait_until_finished()
    self._in_flight = None

  def close(self) -> None:
    try:
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      if not self._failed:  # (A failed save raises again here: already said.)
        raise


class NoCheckpoint(errors.UserError):
  pass


def restore_part(directory: epath.Path, part: dict, step: int | None = None, *,
                 retry_seconds: float = storage.DEFAULT_RETRY_SECONDS) -> tuple[dict, int]:
  """Part of the saved training state, read only: `part` names the `TrainState` fields to read,
  as abstract arrays (e.g. {'params': ..., 'model_state': ...}: a model without its optimizer
  state, for inference), from the newest checkpoint that restores, or from `step`'s.

  Orbax's partial restore (`PyTreeRestore(partial_restore=True)`) reads only those arrays.
  """
  directory = storage.as_path(directory)
  directory = directory if storage.is_remote(directory) else directory.absolute()  # (Orbax's.)
  if storage.is_remote(directory):
    storage.bound_retries(retry_seconds)
  orbax_logs.quiet()
  manager = ocp.CheckpointManager(
      directory, item_names=(STATE, RUN),
      options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
      item_handlers={STATE: ocp.PyTreeCheckpointHandler(), RUN: ocp.JsonCheckpointHandler()})
  try:
    saved = sorted(manager.all_steps()) if directory.is_dir() else []
    if not saved:
      raise NoCheckpoint(f'no checkpoint in {directory}: train first, with --mode=train and '
                         'this --workdir.')
    if step is not None and step not in saved:
      raise NoCheckpoint(f'no checkpoint at step {step} in {directory}; it holds steps '
                         f'{saved}.')
    item = {STATE: part}
    args = ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)
    for candidate in reversed([step] if step is not None else saved):
      try:
        restored = manager.restore(candidate, args=ocp.args.Composite(**{STATE: args}))
      except Exception as e:  # pylint: disable=broad-except
        if line := storage.describe_error(e, directory / str(candidate)):
          raise storage.StorageError(line) from None  # The bucket, not the checkpoint.
        why = f'{type(e).__name__}: {errors.first_line(e)}'
        if step is not None:
          raise NoCheckpoint(f'the checkpoint at step {step} in {directory} cannot be '
                             f'restored ({why}).') from None
        print(f'warning: checkpoint at step {candidate} in {directory} is unreadable ({why}); '
              'trying an older one.', file=sys.stderr, flush=True)
        continue
      return restored[STATE][STATE], candidate
    raise NoCheckpoint(f'none of the checkpoints in {directory} (steps {saved}) can be '
                       'restored.')
  finally:
    manager.close()


def _save_failure(e: BaseException) -> str:
  """What went wrong with a save, in a few words: 'no space left on device', or the error's
  first line."""
  chain, seen = [], e
  while seen is not None and len(chain) < 10:
    chain.append(seen)
    seen = seen.__cause__ or seen.__context__
  texts = ' '.join(f'{type(x).__name__}: {x}' for x in chain)
  if any(getattr(x, 'errno', None) == errno.ENOSPC for x in chain) or (
      'No space left on device' in texts or "os_error_code='28'" in texts):
    return 'no space left on device'
  return f'{type(e).__name__}: {errors.first_line(e)}'


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Array shapes by path, paths spelled alike for saved metadata and live dataclasses."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(re.findall(r'\w+', jax.tree_util.keystr(path))): tuple(leaf.shape)
          for path, leaf in flat if len(getattr(leaf, 'shape', ())) > 0}
