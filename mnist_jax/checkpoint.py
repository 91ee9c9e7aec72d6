"""Checkpoints with Orbax: save every N steps and at the end, keep the last K, resume the latest.

A checkpoint holds the whole training state (params, optimizer state, step, RNG) and the running
metric sums of the current epoch. The position in the data needs no saving: the data order is a
pure function of (seed, epoch), so the step alone says where to continue.

Crash safety (tests/test_crash_safety.py):
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
"""

import datetime
import inspect
import logging as std_logging
import os
import pathlib
import re
import shutil
import sys
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from mnist_jax import errors


class IncompatibleCheckpoint(errors.UserError):
  pass


# How much of a restore error the warning quotes (TensorStore's messages run to kilobytes).
_MAX_ERROR_CHARS = 300
# Orbax's name for a checkpoint folder still being written: '<step>.orbax-checkpoint-tmp[...]'.
_TMP_MARK = '.orbax-checkpoint-tmp'


class Checkpointer:
  """A thin layer over `ocp.CheckpointManager` that restores the newest *valid* checkpoint."""

  def __init__(self, directory: pathlib.Path, *, keep: int, asynchronous: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    self._remove_unfinished()
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True,
            cleanup_tmp_directories=True))
    self._unreadable: list[int] = []  # Skipped by restore_latest; set aside before a save.

  def _remove_unfinished(self) -> None:
    """Removes the temporary folders of saves a killed run left unfinished, now.

    Orbax does it too (`cleanup_tmp_directories`), but in a background thread that only a
    save waits for; a start that never saves (the run was finished, or stops with an error)
    could leave them.
    """
    if jax.process_index() == 0 and self.directory.is_dir():
      for path in self.directory.iterdir():
        if _TMP_MARK in path.name and path.is_dir() and not path.is_symlink():
          shutil.rmtree(path, ignore_errors=True)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, item: Any) -> None:
    """Starts an (async) save; the previous save is finished first."""
    self._set_aside_unreadable()
    self._manager.save(step, args=ocp.args.StandardSave(item), force=True)

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
    _quiet_orphaned_restore_errors()  # Before: they can come while a failed restore unwinds.
    for step in reversed(steps):
      self._check_compatible(step, abstract)
      try:
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # pylint: disable=broad-except
        why = f'{type(e).__name__}: {_first_line(e)}'
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
      saved = self._manager.item_metadata(step)
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
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _quiet_orphaned_restore_errors() -> None:
  """Keeps a failed restore's leftovers from printing tracebacks after the warning.

  When one array of a checkpoint fails to read, Orbax gives up on the restore and closes its
  event loop while TensorStore is still reading the others; their completions then raise
  'Event loop is closed' (or leave an unretrieved coroutine error) in the background, during
  or after the failed restore, which Python prints as tracebacks through
  `sys.unraisablehook`, and asyncio logs the other reads' errors as 'Task exception was never
  retrieved' with a traceback. Those say nothing the warning does not, so they are logged at
  debug level instead; every other unraisable error or asyncio log record goes where it went
  before. Installed once per process, by the first restore.
  """
  previous = sys.unraisablehook
  if getattr(previous, '_mnist_jax_quiet', False):
    return
  std_logging.getLogger('asyncio').addFilter(_drop_orphaned_tensorstore_reads)

  def hook(unraisable):
    orphan = (isinstance(unraisable.exc_value, RuntimeError)
              and 'Event loop is closed' in str(unraisable.exc_value)) or (
                  inspect.iscoroutine(unraisable.object)
                  and 'orbax' in unraisable.object.cr_code.co_filename)
    if orphan:
      logging.debug('Ignored after a failed checkpoint restore: %r', unraisable.exc_value)
    else:
      previous(unraisable)

  hook._mnist_jax_quiet = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


def _drop_orphaned_tensorstore_reads(record: std_logging.LogRecord) -> bool:
  error = record.exc_info[1] if record.exc_info else None
  orphan = (record.getMessage().startswith('Task exception was never retrieved')
            and error is not None and 'tensorstore_spec' in str(error))
  if orphan:
    logging.debug('Ignored after a failed checkpoint restore: %s', _first_line(error))
  return not orphan


def _first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else ''
  return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + '...'


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Array shapes by path, paths spelled alike for saved metadata and live dataclasses."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(re.findall(r'\w+', jax.tree_util.keystr(path))): tuple(leaf.shape)
          for path, leaf in flat if len(getattr(leaf, 'shape', ())) > 0}
