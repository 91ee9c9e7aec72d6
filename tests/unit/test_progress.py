"""Progress output: a throttled live bar on a terminal, only rare plain lines in a log."""

import io

import pytest

from mnist_jax import progress

NUM_EPOCHS, STEPS = 5, 469


class FakeClock:

  def __init__(self):
    self.now = 1000.0

  def __call__(self) -> float:
    return self.now


class CountingFloat:
  """A stand-in for a device array: counts how often it is read."""

  reads = 0

  def __init__(self, value: float):
    self.value = value

  def __float__(self) -> float:
    CountingFloat.reads += 1
    return self.value


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
  monkeypatch.setenv('COLUMNS', '120')


def epoch_line(epoch: int) -> str:
  return f'epoch {epoch}/{NUM_EPOCHS}  train loss 0.1000 acc 0.9700  |  test acc 0.9750'


def run(seconds_per_step: float, interactive: bool, steps_per_update: int = 1) -> str:
  """5 epochs of 469 steps, an update after every `steps_per_update` steps, on a fake clock."""
  stream, clock = io.StringIO(), FakeClock()
  bar = progress.Progress(NUM_EPOCHS, STEPS, stream, interactive=interactive, clock=clock)
  for epoch in range(1, NUM_EPOCHS + 1):
    bar.start_epoch(epoch)
    for steps in range(steps_per_update, STEPS + 1, steps_per_update):
      clock.now += seconds_per_step * steps_per_update
      bar.update(steps, dict(loss=0.5 / steps, accuracy=1 - 1 / steps))
    bar.end_epoch(epoch_line(epoch))
  return stream.getvalue()


def test_format_duration():
  assert progress.format_duration(7.4) == '0:07'
  assert progress.format_duration(754) == '12:34'
  assert progress.format_duration(3723) == '1:02:03'


def test_log_fast_epochs_only_epoch_lines():
  out = run(seconds_per_step=0.01, interactive=False)  # 4.7 s an epoch.
  assert out.splitlines() == [epoch_line(epoch) for epoch in range(1, NUM_EPOCHS + 1)]
  assert '\r' not in out


def test_log_slow_epochs_rare_progress_lines():
  out = run(seconds_per_step=0.2, interactive=False)  # 94 s an epoch, 469 s in all.
  lines = out.splitlines()
  assert '\r' not in out
  assert len(lines) < 30  # 5 epoch lines + at most one progress line per 30 s.
  for epoch in range(1, NUM_EPOCHS + 1):
    assert epoch_line(epoch) in lines
  progress_lines = [line for line in lines if 'ETA' in line]
  assert 10 <= len(progress_lines) <= 469 / 30 + 1
  # At steps 150 of epoch 1 (30 s in): 5 steps/s, (469 - 150) / 5 = 63.8 s left.
  assert progress_lines[0] == ('epoch 1/5: 150/469 steps, 5.0 steps/s, ETA 1:04, '
                               f'loss {0.5 / 150:.4f} accuracy {1 - 1 / 150:.4f}')


def test_log_reads_lazy_values_only_when_printing():
  stream, clock = io.StringIO(), FakeClock()
  bar = progress.Progress(1, STEPS, stream, interactive=False, min_interval_s=30, clock=clock)
  bar.start_epoch(1)
  CountingFloat.reads = 0
  for steps in range(1, STEPS + 1):
    clock.now += 0.01
    assert not bar.due()
    bar.update(steps, dict(loss=CountingFloat(0.1), accuracy=CountingFloat(0.9)))
  assert CountingFloat.reads == 0
  clock.now += 30
  assert bar.due()
  bar.update(STEPS, dict(loss=CountingFloat(0.1), accuracy=CountingFloat(0.9)))
  assert CountingFloat.reads == 2
  assert not bar.due()


def test_interactive_bar_is_throttled():
  out = run(seconds_per_step=0.01, interactive=True)  # 4.69 s an epoch; redraws <= 10/s.
  redraws = out.count('ETA')
  assert NUM_EPOCHS * 40 <= redraws <= NUM_EPOCHS * (4.69 / 0.1 + 1)
  assert '\r' in out
  assert 'steps/s' in out and f'/{STEPS}' in out and 'loss ' in out and ' accuracy ' in out
  # Each epoch's bar is cleared before its summary line; only summary lines end with newlines.
  lines = out.split('\n')
  assert len(lines) == NUM_EPOCHS + 1
  for epoch, line in enumerate(lines[:-1], start=1):
    assert line.endswith('\r' + epoch_line(epoch))
  assert lines[-1] == ''


def test_interactive_bar_draws_every_update_when_updates_are_rare():
  out = run(seconds_per_step=0.01, interactive=True, steps_per_update=100)  # One per second.
  assert out.count('ETA') == NUM_EPOCHS * (STEPS // 100)


def test_interactive_bar_contents():
  stream, clock = io.StringIO(), FakeClock()
  bar = progress.Progress(NUM_EPOCHS, STEPS, stream, interactive=True, clock=clock)
  bar.start_epoch(2)
  clock.now += 3.0  # Compilation.
  bar.update(1, dict(loss=2.0, accuracy=0.1))
  clock.now += 1.0
  bar.update(101, dict(loss=0.25, accuracy=0.875))  # 100 steps/s since the first update: (469 - 101) / 100 s left.
  last = stream.getvalue().split('\r')[-1]
  assert last.startswith('epoch 2/5 [#####')
  assert ' 101/469  100.0 steps/s  ETA 0:04  loss 0.2500 accuracy 0.8750' in last
  assert last.count('#') == round(30 * 101 / 469)


def test_interactive_bar_fits_a_narrow_terminal(monkeypatch):
  monkeypatch.setenv('COLUMNS', '60')
  out = run(seconds_per_step=0.01, interactive=True)
  assert max(len(chunk.strip('\n')) for chunk in out.split('\r') if 'ETA' in chunk) <= 59


def test_interactive_end_epoch_without_updates():
  stream = io.StringIO()
  bar = progress.Progress(1, STEPS, stream, interactive=True, clock=FakeClock())
  bar.start_epoch(1)
  bar.end_epoch('epoch 1/1 done')
  assert stream.getvalue() == 'epoch 1/1 done\n'


def test_close_ends_a_bar_left_on_screen():
  stream = io.StringIO()
  bar = progress.Progress(1, STEPS, stream, interactive=True, clock=FakeClock())
  bar.start_epoch(1)
  bar.update(10, dict(loss=0.5, accuracy=0.5))
  bar.close()
  bar.close()
  assert stream.getvalue().endswith('\n') and stream.getvalue().count('\n') == 1


def test_interactive_defaults_to_isatty():
  class Terminal(io.StringIO):

    def isatty(self):
      return True

  assert progress.Progress(1, 1, Terminal()).interactive
  assert not progress.Progress(1, 1, io.StringIO()).interactive
