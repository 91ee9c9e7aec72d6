"""Checkpoints with Orbax: save every N steps and at the end, keep the last K, resume the latest.

A checkpoint holds the whole training state (params, optimizer state, step, RNG) and the running
metric sums of the current epoch. The position in the data needs no saving: the data order is a
pure function of (seed, epoch), so the step alone says where to continue.
"""

import pathlib
import re
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from mnist_jax import errors


class IncompatibleCheckpoint(errors.UserError):
  pass


class Checkpointer:
  """A thin layer over `ocp.CheckpointManager` that restores the newest *valid* checkpoint."""

  def __init__(self, directory: pathlib.Path, *, keep: int, asynchronous: bool = True):
    self.directory = directory.absolute()
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=asynchronous, create=True,
            cleanup_tmp_directories=True))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, item: Any) -> None:
    """Starts an (async) save; the previous save is finished first."""
    self._manager.save(step, args=ocp.args.StandardSave(item), force=True)

  def restore_latest(self, template: Any) -> tuple[Any, int] | None:
    """The newest checkpoint that restores, shaped like `template`; None when there is none.

    A checkpoint that fails to restore (truncated or deleted files) is skipped with a warning
    naming its step; if none restores, the run stops rather than silently starting over.
    """
    steps = self.steps()
    if not steps:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    self._check_compatible(steps[-1], abstract)
    for step in reversed(steps):
      try:
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract)), step
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint at step %d in %s cannot be restored (%s: %s); trying an '
                        'older one.', step, self.directory, type(e).__name__, e)
        print(f'warning: checkpoint at step {step} is unreadable; trying an older one.',
              flush=True)
    raise errors.UserError(
        f'None of the checkpoints in {self.directory} (steps {steps}) can be restored. Move '
        'the folder away to start over, or point --workdir at another folder.')

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
          f'({path}: saved {saved_shapes.get(path)}, this config {wanted_shapes.get(path)}). '
          'Use another --workdir, or the config that wrote them.')

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Array shapes by path, paths spelled alike for saved metadata and live dataclasses."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(re.findall(r'\w+', jax.tree_util.keystr(path))): tuple(leaf.shape)
          for path, leaf in flat if len(getattr(leaf, 'shape', ())) > 0}
