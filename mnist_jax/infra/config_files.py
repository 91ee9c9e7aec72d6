"""What went wrong with a `--config` file, as one line: run.py asks only once absl's parsing or
the first use of the config has failed (a file that loads costs nothing here).

ml_collections loads the file lazily and reports its failures as tracebacks folded into a flag
error (or, for a missing file, as "config_config" on first use); this module loads the file
again, step by step, to say which step failed: the file is missing, does not parse, raises on
import, has no `get_config`, or its `get_config` raises or returns something that is not the
config that configs/mlp.py (every shipped config's base) describes. It also names an override
(`--config.a.b=...`) of a field the config does not have, with the section's fields.
"""

import difflib
import importlib.util
import pathlib
import re
from typing import Any

import ml_collections

from mnist_jax.infra import errors

REFERENCE = pathlib.Path(__file__).resolve().parents[2] / 'configs' / 'mlp.py'
START_FROM = 'start from configs/mlp.py (from configs import mlp; config = mlp.get_config())'


def config_flag(argv: list[str]) -> str | None:
  """The value of --config in argv (`--config=X` or `--config X`), if given."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load(flag: str) -> ml_collections.ConfigDict:
  """The config of `--config=flag` (a path, optionally `:arg` for get_config), or ConfigError."""
  path, args = flag, []
  if not pathlib.Path(path).is_file() and ':' in flag:  # ml_collections' 'file.py:arg'.
    path, rest = flag.split(':', 1)
    args = [rest]
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.ConfigError(
        f'the config file {flag} (--config) does not exist; give the path of a Python file '
        'whose get_config() returns the config, such as --config=configs/mlp.py')
  try:
    source = path.read_text()
    compile(source, str(path), 'exec')
  except SyntaxError as e:
    raise errors.ConfigError(f'the config file {path} (--config) has a syntax error at line '
                             f'{e.lineno}: {e.msg}; fix it and run again') from None
  except (OSError, UnicodeDecodeError) as e:
    raise errors.ConfigError(f'the config file {path} (--config) cannot be read: '
                             f'{errors.first_line(e)}') from None
  spec = importlib.util.spec_from_file_location(f'config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # pylint: disable=broad-except  (the user's code: any error)
    raise errors.ConfigError(f'the config file {path} (--config) raised while it was imported: '
                             f'{type(e).__name__}: {errors.first_line(e)}') from None
  if not callable(getattr(module, 'get_config', None)):
    raise errors.ConfigError(f'the config file {path} (--config) defines no get_config(); '
                             f'define one that returns the config ({START_FROM})')
  try:
    config = module.get_config(*args)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.ConfigError(f'the config file {path} (--config): its get_config() raised '
                             f'{type(e).__name__}: {errors.first_line(e)}') from None
  check(config, str(path))
  return config


def check(config: Any, path: str) -> None:
  """A config is an ml_collections.ConfigDict with every top-level field of configs/mlp.py."""
  if not isinstance(config, ml_collections.ConfigDict):
    raise errors.ConfigError(
        f'the config file {path} (--config): its get_config() returned a '
        f'{type(config).__name__}, not an ml_collections.ConfigDict; {START_FROM}')
  missing = sorted(set(_reference().keys()) - set(config.keys()))
  if missing:
    raise errors.ConfigError(
        f'the config file {path} (--config): its get_config() returns a config without the '
        f"field{'s' * (len(missing) > 1)} {', '.join(missing)}; {START_FROM} and change "
        'only what differs')


def unknown_override(config: ml_collections.ConfigDict, argv: list[str]) -> str | None:
  """The line for the first `--config.a.b=...` whose field the config does not have."""
  for arg in argv:
    match = re.match(r'--config\.([\w.]+)(=|$)', arg)
    if not match:
      continue
    section, names = config, match[1].split('.')
    for depth, name in enumerate(names):
      if not isinstance(section, ml_collections.ConfigDict):
        break  # A field below a value (a dict field's key): ml_collections' own message.
      if name not in section:
        field = '.'.join(names[:depth + 1])
        fields = sorted(section.keys())
        close = difflib.get_close_matches(name, fields, n=1)
        if close:
          return (f'the config has no field {field!r}; did you mean '
                  f"{'.'.join(names[:depth] + close)!r}?")
        where = 'config.' + '.'.join(names[:depth]) if depth else 'the config'
        return f"the config has no field {field!r}; {where}'s fields: {', '.join(fields)}"
      section = section[name]
  return None


def _reference() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location('config_reference_mlp', REFERENCE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
