"""config.profile: a jax.profiler trace of a few steady-state calls of the train step.

TensorBoard's profile plugin reads it from <workdir>/plugins/profile/, and Perfetto
(ui.perfetto.dev) opens its perfetto_trace.json.gz.
"""

import jax

# With config.profile, calls of at most this many steps (the same results, in shorter calls),
# of which the trace records CALLS after the first (which compiles).
STEPS_PER_CALL = 10
CALLS = 3


class Profiler:
  """Traces CALLS calls after the first; does nothing when not `enabled`."""

  def __init__(self, workdir, enabled: bool):
    self.workdir, self.enabled, self.calls = workdir, enabled, 0

  def __enter__(self) -> 'Profiler':
    return self

  def after_call(self, state) -> None:
    if not self.enabled:
      return
    self.calls += 1
    if self.calls in (1, 1 + CALLS):
      jax.block_until_ready(state)  # The trace holds exactly the calls in between.
      if self.calls == 1:
        jax.profiler.start_trace(str(self.workdir), create_perfetto_trace=True)
      else:
        jax.profiler.stop_trace()
        print(f'profile: traced {CALLS} calls into {self.workdir}/plugins/profile/', flush=True)

  def __exit__(self, *exc) -> None:
    if self.enabled and 1 <= self.calls < 1 + CALLS:  # The run ended first: keep the trace.
      jax.profiler.stop_trace()
