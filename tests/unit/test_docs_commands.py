"""Every command in the docs runs as written: each fenced `bash` line of README.md and docs/*.md
that names run.py is parsed by run.py's own flags and ml_collections' config flag, as run.py
parses its command line, so a renamed flag, a removed config field or a value of the wrong type
fails here, not in front of a reader."""

import json
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

from conftest import DOC_PAGES
from conftest import REPO_ROOT

_BASH = re.compile(r'```bash\n(.*?)```', re.S)
_INLINE = re.compile(r'`(python run\.py [^`]+)`')


def _argv(tokens: list[str]) -> list[str] | None:
  """run.py's argv from a shell line's tokens (`... python run.py ARGS`), or None."""
  for i, token in enumerate(tokens):
    if ' run.py' in token or token.startswith('run.py '):  # A quoted command (ssh --command).
      inner = _argv(shlex.split(token.split('&&')[-1]))
      if inner is not None:
        return inner
    if token == 'run.py' or token.endswith('/run.py'):
      args = [t for t in tokens[i + 1:] if t != '...']
      if '...' in tokens and not any(t.startswith('--config=') for t in args):
        args.insert(0, '--config=configs/mlp.py')  # `python run.py ... --distributed`.
      return ['run.py', *args]
  return None


def doc_commands() -> list[tuple[str, list[str]]]:
  """(page, argv) of every run.py command in a fenced bash block of the docs."""
  found = []
  for page in DOC_PAGES:
    text = page.read_text()
    lines = [line for block in _BASH.findall(text)
             for line in block.replace('\\\n', ' ').splitlines()]
    lines += _INLINE.findall(re.sub(r'\s*\n\s*', ' ', _BASH.sub('', text)))  # `python run.py ...`
    for line in lines:
      argv = _argv(shlex.split(line, comments=True)) if 'run.py' in line else None
      if argv is not None and argv != ['run.py', '--help']:  # (--help: tests/unit/test_readme.py.)
        found.append((page.relative_to(REPO_ROOT).as_posix(), argv))
  return found


def doc_config_files() -> dict[str, str]:
  """Config files the docs write out in full (a Python block that opens with `# configs/x.py`)."""
  files = {}
  for page in DOC_PAGES:
    for block in re.findall(r'```python\n# (configs/\w+\.py)\n(.*?)```', page.read_text(), re.S):
      files[block[0]] = block[1]
  return files


# In a fresh process: run.py's flags (deep copies, per command) and a config flag that reads its
# overrides from the command's own argv, as run.py's reads them from sys.argv.
_PARSER = textwrap.dedent('''
    import copy, importlib.util, json, sys
    from absl import flags
    from ml_collections import config_flags
    spec = importlib.util.spec_from_file_location('run_program', 'run.py')
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    problems = []
    for page, argv in json.load(sys.stdin):
      values = flags.FlagValues()
      for name, flag in run.FLAGS._flags().items():  # pylint: disable=protected-access
        if name != 'config' and name == flag.name:
          values[name] = copy.deepcopy(flag)
      config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True,
                                      sys_argv=argv)
      try:
        values(argv)
        values.config.keys()  # Loads the file and applies the overrides.
      except Exception as e:  # pylint: disable=broad-except
        problems.append(f'{page}: {" ".join(argv)}: {type(e).__name__}: {e}')
    print(json.dumps(problems))
''')


def test_the_docs_name_run_py_in_many_commands():
  pages = {page for page, _ in doc_commands()}
  assert len(doc_commands()) >= 20 and {'README.md', 'docs/extending.md', 'docs/scaling.md',
                                        'docs/inference.md'} <= pages, pages


def test_every_run_py_command_in_the_docs_parses_with_run_pys_flags(tmp_path):
  extra = tmp_path / 'configs'
  extra.mkdir()
  shown = doc_config_files()
  for name, source in shown.items():
    (extra / pathlib.Path(name).name).write_text(source)
  commands = []
  for page, argv in doc_commands():
    argv = [f'--config={extra / arg.split("/")[-1]}'
            if arg.startswith('--config=') and arg[len('--config='):] in shown
            and not (REPO_ROOT / arg[len('--config='):]).exists() else arg for arg in argv]
    commands.append((page, argv))
  out = subprocess.run([sys.executable, '-c', _PARSER], input=json.dumps(commands), cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=600, check=True)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_wrong_flag_or_field_in_a_doc_command_is_caught():
  """The check can fail: a misspelt flag, a field the config lacks, a value of the wrong type."""
  commands = [('x.md', ['run.py', '--config=configs/mlp.py', bad]) for bad in (
      '--workdri=/tmp/w', '--config.num_epoch=3', '--config.num_epochs=three', '--mode=fly')]
  out = subprocess.run([sys.executable, '-c', _PARSER], input=json.dumps(commands), cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=600, check=True)
  problems = json.loads(out.stdout.strip().splitlines()[-1])
  assert [p.split(': ')[1].split()[-1] for p in problems] == [
      '--workdri=/tmp/w', '--config.num_epoch=3', '--config.num_epochs=three', '--mode=fly']
