"""Orbax's and TensorStore's log noise after a failure that the run already said in one line.

Installed once per process by `checkpoint.Checkpointer` (`quiet()`); every other log record
and unraisable error goes where it went before.
"""

import inspect
import logging as std_logging
import sys

from absl import logging

from mnist_jax.infra import errors


def quiet() -> None:
  """Keeps a failed restore's or save's leftovers from printing tracebacks after our line.

  When one array of a checkpoint fails to read (or write: a full disk), Orbax gives up and
  closes its event loop while TensorStore is still busy with the others; their completions
  then raise 'Event loop is closed' (or leave an unretrieved coroutine error) in the
  background, which Python prints as tracebacks through `sys.unraisablehook`; asyncio logs
  the other reads' errors as 'Task exception was never retrieved' with a traceback; and a
  failed save's background threads log their errors with tracebacks. Those say nothing the
  warning or the error line does not, so they are logged at debug level instead; every other
  unraisable error or log record goes where it went before. Installed once per process.
  """
  previous = sys.unraisablehook
  if getattr(previous, '_mnist_jax_quiet', False):
    return
  std_logging.getLogger('asyncio').addFilter(_drop_orphaned_tensorstore_reads)
  std_logging.getLogger('absl').addFilter(_drop_failed_save_logs)
  std_logging.getLogger('absl').addFilter(_drop_read_only_notes)

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
    logging.debug('Ignored after a failed checkpoint restore: %s', errors.first_line(error))
  return not orphan


def _drop_failed_save_logs(record: std_logging.LogRecord) -> bool:
  """Orbax's error logs of a failed background save (CheckpointSaveError says it in a line)."""
  failed_save = record.levelno >= std_logging.ERROR and 'orbax' in record.pathname
  if failed_save:
    logging.debug('Orbax: %s', record.getMessage()[:errors.MAX_ERROR_CHARS])
  return not failed_save


def _drop_read_only_notes(record: std_logging.LogRecord) -> bool:
  """Orbax's warnings that a read-only manager (`--mode=evaluate`) is read only: as asked."""
  note = (record.levelno == std_logging.WARNING and 'orbax' in record.pathname
          and ('read_only=True' in record.getMessage()
               or 'directory is read only' in record.getMessage()))
  return not note
