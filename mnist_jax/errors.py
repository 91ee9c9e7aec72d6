"""Errors that mean the user must change something; run.py prints them without a traceback."""


class UserError(Exception):
  """A problem with the run's inputs (config, data, workdir); the message says how to fix it."""

  exit_code = 1


class ConfigError(UserError):
  """An invalid config value, found before any data is loaded or anything is compiled."""

  exit_code = 2
