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
