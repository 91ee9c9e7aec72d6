"""Errors that mean the user must change something; run.py prints them without a traceback."""


class UserError(Exception):
  """A problem with the run's inputs (config, data, workdir); the message says how to fix it."""

  exit_code = 1
  # True where every process of a multi-process run raises it at the same point, by a
  # decision they shared (a stop, process 0's lock): they can then leave together.
  agreed = False


class ConfigError(UserError):
  """An invalid config value, found before any data is loaded or anything is compiled."""

  exit_code = 2


# How much of a library's error a line quotes (TensorStore's messages run to kilobytes).
MAX_ERROR_CHARS = 300


def first_line(e: Exception) -> str:
  text = str(e).strip().splitlines()[0] if str(e).strip() else ''
  return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + '...'
