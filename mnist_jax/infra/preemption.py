"""Stopping on request: SIGTERM (a preemption notice) and SIGINT (Ctrl-C) save and exit.

Inside `Stopper`, either signal only sets a flag; the training loop asks `stop_signal()` after
every jitted call, and on a signal saves the state at that step, waits for the save and raises
`Preempted` (exit status 128 + the signal: 143 for SIGTERM, 130 for Ctrl-C). A second Ctrl-C
stops the process at once, without waiting for a save in flight: Orbax writes into a temporary
folder that is only renamed into place once whole, so the last whole checkpoint stays intact.

With several processes, a signal that reaches any of them must become a decision they all
share, or the others would wait forever in the next collective for the one that left. So
`stop_signal()` is one tiny collective per call: every process contributes the signal it got
(0 for none) and all take the largest, at the same step; they then save the same step together
and all exit with that signal's status.
"""

import os
import signal
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from mnist_jax.infra import errors

_NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'SIGINT (Ctrl-C)'}


class Preempted(errors.UserError):
  """A stop was requested: the state was saved; rerunning in the same workdir continues.

  `complete`: the signal came after the last epoch's stop check (while the last checkpoint
  was finished, the summary or the report written), all of which finished first.
  """

  def __init__(self, signum: int, step: int, directory, complete: bool = False):
    if complete:
      text = (f'{_NAMES.get(signum, signum)}: training is complete and saved (the checkpoint '
              f'at step {step} in {directory}, and summary.json); a rerun has nothing left to '
              'train.')
    else:
      text = (f'{_NAMES.get(signum, signum)}: saved the checkpoint at step {step} in '
              f'{directory}; run again with the same --workdir to continue from it.')
    super().__init__(text)
    self.exit_code = 128 + signum  # As a shell reports a process that signal stopped.
    self.agreed = True  # stop_signal() made it every process's decision, at the same step.


class Terminated(BaseException):
  """SIGTERM outside a `Stopper` (after `raise_on_sigterm`): while a run starts or ends, with
  no training in flight to save. A BaseException, as KeyboardInterrupt is, so that no
  `except Exception` swallows it; `finally` blocks run as it passes."""


def raise_on_sigterm() -> None:
  """SIGTERM raises `Terminated` from now on, wherever no `Stopper` handles it (main thread)."""

  def handle(signum, frame):
    del signum, frame
    raise Terminated()

  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, handle)


class Stopper:
  """Turns SIGTERM and SIGINT into a flag for the duration of the block (main thread only)."""

  def __init__(self):
    self.signum = 0  # The signal this process got, 0 for none.
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in _NAMES:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      print('\nerror: second Ctrl-C: stopped at once; the last whole checkpoint is intact '
            '(a save that was in flight is discarded at the next start).', file=sys.stderr,
            flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signum = self.signum or signum

  def stop_signal(self) -> int:
    """The signal to stop for, agreed by every process (0: go on). Call it at the same point
    in every process."""
    if jax.process_count() == 1:
      return self.signum
    return int(np.max(multihost_utils.process_allgather(np.int32(self.signum))))

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
