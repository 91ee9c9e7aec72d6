"""Progress while training: a live bar on a terminal, rare plain lines in a log.

  progress = Progress(num_epochs, steps_per_epoch)
  for epoch in range(1, num_epochs + 1):
    progress.start_epoch(epoch)
    for ...:  # After each jitted chunk:
      progress.update(steps_done, dict(loss=loss, accuracy=accuracy))
    progress.end_epoch(epoch_line)

The running values (the loss and a metric or two, by name) are converted with float() only
when a line is drawn, so passing device arrays costs a device sync only then; `due()` says whether the next update would draw at all.
"""

import shutil
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

_BAR_WIDTH = (10, 30)  # The bar's least and greatest width in characters.


def _format(values: Mapping[str, Any]) -> str:
  return ' '.join(f'{name} {float(value):.4f}' for name, value in values.items())


def format_duration(seconds: float) -> str:
  """'0:07', '12:34', '1:02:03'."""
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes}:{secs:02d}'


class Progress:
  """Progress of `num_epochs` epochs of `steps_per_epoch` steps each.

  Interactive (default: when `stream` is a terminal): one line redrawn in place with '\\r', at
  most once per `redraw_interval_s`. Otherwise: one plain line at most every `min_interval_s`
  since the last line written, so a log holds the epoch lines and rarely anything else.
  """

  def __init__(self, num_epochs: int, steps_per_epoch: int, stream: TextIO | None = None,
               interactive: bool | None = None, min_interval_s: float = 30.0, *,
               redraw_interval_s: float = 0.1, clock: Callable[[], float] = time.monotonic):
    self._num_epochs = num_epochs
    self._steps_per_epoch = max(steps_per_epoch, 1)
    self._stream = sys.stdout if stream is None else stream
    if interactive is None:
      interactive = bool(getattr(self._stream, 'isatty', lambda: False)())
    self.interactive = interactive
    self._interval = redraw_interval_s if interactive else min_interval_s
    self._clock = clock
    self._epoch = 0
    self._last_output = clock()
    self._bar_length = 0  # Characters of the bar now on screen (0: none).
    self._start_epoch_state()

  def _start_epoch_state(self) -> None:
    self._epoch_start = self._clock()
    self._first_update: tuple[float, int] | None = None  # (time, steps) of the first update.
    self._drawn_in_epoch = False

  def start_epoch(self, epoch: int) -> None:
    self._epoch = epoch
    self._start_epoch_state()

  def due(self) -> bool:
    """Whether an update now would draw (the first of an interactive epoch always does)."""
    if self.interactive and not self._drawn_in_epoch:
      return True
    return self._clock() - self._last_output >= self._interval

  def update(self, steps_done_in_epoch: int, values: Mapping[str, Any]) -> None:
    now = self._clock()
    if self._first_update is None:
      self._first_update = (now, steps_done_in_epoch)
    if not self.due():
      return
    if self.interactive:
      self._draw_bar(steps_done_in_epoch, _format(values), now)
    else:
      self._write(f'{self._status(steps_done_in_epoch, _format(values), now)}\n')
    self._drawn_in_epoch = True
    self._last_output = now

  def end_epoch(self, line: str) -> None:
    """Replaces the bar, if any, with `line` (the epoch's summary)."""
    self._clear_bar()
    self._write(line + '\n')
    self._last_output = self._clock()

  def close(self) -> None:
    """Ends a bar left on screen (training stopped mid-epoch), so later output starts clean."""
    if self._bar_length:
      self._write('\n')
      self._bar_length = 0

  def _steps_per_sec(self, steps: int, now: float) -> float:
    """Measured from the first update of the epoch (leaves compilation out) once past it."""
    first_time, first_steps = self._first_update or (self._epoch_start, 0)
    if steps > first_steps and now > first_time:
      return (steps - first_steps) / (now - first_time)
    elapsed = now - self._epoch_start
    return steps / elapsed if elapsed > 0 else 0.0

  def _eta(self, steps: int, now: float) -> str:
    rate = self._steps_per_sec(steps, now)
    return format_duration((self._steps_per_epoch - steps) / rate) if rate > 0 else '?'

  def _status(self, steps: int, values: str, now: float) -> str:
    return (f'epoch {self._epoch}/{self._num_epochs}: {steps}/{self._steps_per_epoch} steps, '
            f'{self._steps_per_sec(steps, now):,.1f} steps/s, ETA {self._eta(steps, now)}, '
            f'{values}')

  def _draw_bar(self, steps: int, values: str, now: float) -> None:
    head = f'epoch {self._epoch}/{self._num_epochs} '
    tail = (f' {steps}/{self._steps_per_epoch}  {self._steps_per_sec(steps, now):,.1f} steps/s  '
            f'ETA {self._eta(steps, now)}  {values}')
    columns = shutil.get_terminal_size().columns - 1  # A full line would wrap on some terminals.
    width = min(max(columns - len(head) - len(tail) - 2, _BAR_WIDTH[0]), _BAR_WIDTH[1])
    filled = round(width * min(steps / self._steps_per_epoch, 1.0))
    text = f"{head}[{'#' * filled}{'.' * (width - filled)}]{tail}"[:columns]
    self._write('\r' + text.ljust(self._bar_length))
    self._bar_length = len(text)

  def _clear_bar(self) -> None:
    if self._bar_length:
      self._write('\r' + ' ' * self._bar_length + '\r')
      self._bar_length = 0

  def _write(self, text: str) -> None:
    self._stream.write(text)
    self._stream.flush()
