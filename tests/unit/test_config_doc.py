"""Config documentation comes from the config file: every field, its default and its comment."""

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

from mnist_jax import config_doc

from conftest import REPO_ROOT  # pylint: disable=g-import-not-at-top
MLP_CONFIG_PATH = str(REPO_ROOT / 'configs' / 'mlp.py')

EXAMPLE_CONFIG = '''
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  # --- Data -----------------------------------------------------------------------------
  config.dataset = 'mnist'  # Inline comment.
  # A block comment
  # over two lines.
  config.data_dir = ''
  config.undocumented = 7

  # --- Model ----------------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.hidden_sizes = (512, 256)  # Hidden widths.
  config.learning_rate = 1e-3  # Peak rate, written as in the file.
  config.optimizer_kwargs = ml_collections.ConfigDict(dict(decay=0.9, eps=1e-7))  # Optimizer args.
  config.schedule_kwargs = ml_collections.ConfigDict({  # Schedule args.
      'warmup': 10,  # Warmup steps.
      'nested': dict(alpha=0.5),
  })
  config.computed = 2 * 3  # Not a literal.
  for name in ('b', 'a'):
    setattr(config, f'looped_{name}', name)
  return config
'''


def _leaves_of_dict(d):
  out = {}
  for key, value in d.items():
    if isinstance(value, dict) and value:  # An empty dict is a field of its own.
      out.update({f'{key}.{k}': v for k, v in _leaves_of_dict(value).items()})
    else:
      out[key] = value
  return out


@pytest.fixture
def example_path(tmp_path) -> str:
  path = tmp_path / 'example.py'
  path.write_text(EXAMPLE_CONFIG)
  return str(path)


def test_mlp_every_field_listed_with_its_default():
  expected = _leaves_of_dict(config_doc.load_config(MLP_CONFIG_PATH).to_dict())
  rows = config_doc.fields(MLP_CONFIG_PATH)
  assert [name for name, _, _ in rows] != []
  assert sorted(name for name, _, _ in rows) == sorted(expected)
  for name, default, _ in rows:
    assert ast.literal_eval(default) == expected[name], name
  by_name = {name: (default, meaning) for name, default, meaning in rows}
  assert by_name['dataset'][0] == "'mnist'"
  assert by_name['learning_rate'][0] == '1e-3'  # As written in the file, not repr's 0.001.
  assert by_name['model.hidden_sizes'][0] == '(512,)'
  assert by_name['optimizer_kwargs.decay'][0] == '0.9'
  assert by_name['optimizer_kwargs.eps'][0] == '1e-7'
  assert by_name['backend_overrides'][0] == '{}'  # Empty dicts are listed (and settable).
  assert by_name['lr_schedule_kwargs'][0] == '{}'
  assert 'TFDS' in by_name['dataset'][1]
  assert 'optax' in by_name['optimizer'][1]


def test_mlp_fields_in_file_order():
  names = [name for name, _, _ in config_doc.fields(MLP_CONFIG_PATH)]
  assert names.index('dataset') < names.index('model.name') < names.index('optimizer')
  assert names.index('optimizer') < names.index('seed')


def test_mlp_every_field_has_a_meaning():
  undocumented = [name for name, _, meaning in config_doc.fields(MLP_CONFIG_PATH) if not meaning]
  assert not undocumented, (
      f'configs/mlp.py fields without a comment (on the line or directly above): {undocumented}')


def test_comment_rules(example_path):
  rows = config_doc.fields(example_path)
  by_name = {name: (default, meaning) for name, default, meaning in rows}
  assert by_name == {
      'dataset': ("'mnist'", 'Inline comment.'),
      'data_dir': ("''", 'A block comment over two lines.'),
      'undocumented': ('7', ''),
      'model.hidden_sizes': ('(512, 256)', 'Hidden widths.'),
      'learning_rate': ('1e-3', 'Peak rate, written as in the file.'),
      'optimizer_kwargs.decay': ('0.9', 'Optimizer args.'),
      'optimizer_kwargs.eps': ('1e-7', 'Optimizer args.'),
      'schedule_kwargs.warmup': ('10', 'Warmup steps.'),
      'schedule_kwargs.nested.alpha': ('0.5', 'Schedule args.'),
      'computed': ('6', 'Not a literal.'),
      'looped_a': ("'a'", ''),
      'looped_b': ("'b'", ''),
  }
  # File order; fields the file does not visibly assign come last, by name.
  assert [name for name, _, _ in rows][:3] == ['dataset', 'data_dir', 'undocumented']
  assert [name for name, _, _ in rows][-2:] == ['looped_a', 'looped_b']


def test_markdown_table_one_row_per_field():
  rows = config_doc.table_rows(MLP_CONFIG_PATH)
  lines = config_doc.markdown_table(MLP_CONFIG_PATH).splitlines()
  assert lines[:2] == ['| field | default | meaning |', '| --- | --- | --- |']
  assert len(lines) == 2 + len(rows)
  for line, (name, default, _) in zip(lines[2:], rows):
    assert line.startswith(f'| `{name}` | `{default}` | ')
    assert line.endswith(' |')


def test_markdown_table_escapes_pipes(tmp_path):
  path = tmp_path / 'pipes.py'
  path.write_text(textwrap.dedent('''
      import ml_collections
      def get_config():
        config = ml_collections.ConfigDict()
        config.mode = 'a|b'  # Either a | b.
        return config
      '''))
  row = config_doc.markdown_table(str(path)).splitlines()[2]
  assert row == r"| `mode` | `'a\|b'` | Either a \| b. |"


def test_text_table_aligned(example_path):
  rows = config_doc.fields(example_path)
  lines = config_doc.text_table(example_path, width=64).splitlines()
  assert all(len(line) <= 64 for line in lines)
  assert any(line.startswith(' ') for line in lines)  # A long meaning wraps.
  starts = [line for line in lines if not line.startswith(' ')]
  assert [line.split()[0] for line in starts] == [name for name, _, _ in rows]
  column = starts[0].index('Inline comment.')
  assert starts[1].index('A block comment') == column
  assert starts[2].rstrip() == starts[2].rstrip()[:column].rstrip()  # No meaning, no trailing pad.


def test_cli_prints_the_markdown_table():
  result = subprocess.run([sys.executable, '-m', 'mnist_jax.config_doc', 'configs/mlp.py'],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=True)
  assert result.stdout == config_doc.markdown_table(MLP_CONFIG_PATH)


def test_cli_usage(capsys):
  assert config_doc.main([]) == 2
  assert 'usage' in capsys.readouterr().err
  assert config_doc.main([MLP_CONFIG_PATH, '--text']) == 0
  assert capsys.readouterr().out == config_doc.text_table(MLP_CONFIG_PATH)


def test_sections_group_the_rows_under_the_files_rules(example_path):
  grouped = dict(config_doc.sections(example_path))
  assert list(grouped) == ['Data', 'Model', '']  # '' holds what the file does not visibly set.
  assert [name for name, _, _ in grouped['Data']] == ['dataset', 'data_dir', 'undocumented']
  assert [name for name, _, _ in grouped['Model']][:3] == [
      'model.hidden_sizes', 'learning_rate', 'optimizer_kwargs.decay']
  text = config_doc.sectioned_text(example_path)
  assert text.startswith('Data:\n  dataset ') and '\nModel:\n  model.hidden_sizes ' in text
  assert '\nOther:\n  looped_a ' in text


def test_docs_configs_table_matches_the_config():
  """docs/configs.md's table is the one generated from configs/mlp.py, so it cannot drift."""
  import re  # pylint: disable=g-import-not-at-top
  page = (REPO_ROOT / 'docs' / 'configs.md').read_text()
  table = re.search(r'<!-- config table: begin -->\n(.*?)\n<!-- config table: end -->', page,
                    re.S).group(1)
  assert table.strip() == config_doc.markdown_table(MLP_CONFIG_PATH).strip()
