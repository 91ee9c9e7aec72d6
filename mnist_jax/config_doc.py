"""Documentation of every config field, read from the config file itself so it cannot drift.

A field's meaning is the comment on its assignment's line, else the comment lines directly above
it (section rules such as `# --- Data ---` are not meanings). The leaves of a nested literal,
`config.x = ml_collections.ConfigDict(dict(a=1, b=2))`, inherit the comment of `config.x` unless
they have their own.

  python -m mnist_jax.config_doc configs/mlp.py          # a Markdown table
  python -m mnist_jax.config_doc configs/mlp.py --text   # plain aligned text
"""

import ast
import importlib.util
import io
import pathlib
import re
import sys
import textwrap
import tokenize
from typing import Any, NamedTuple

import ml_collections

_SECTION_RULE = re.compile(r'^\s*(---|===)')


class _Source(NamedTuple):
  line: int  # Where the field is assigned (for ordering).
  default: str  # The value's text in the file.
  meaning: str


def load_config(config_path: str) -> ml_collections.ConfigDict:
  """Executes the file's `get_config()`, as `--config=path` does."""
  path = pathlib.Path(config_path)
  spec = importlib.util.spec_from_file_location(f'_config_doc_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


class _Comments:
  """The file's comments by line number: after code on the line (inline), or alone on it."""

  def __init__(self, source: str):
    self.inline, self.alone = {}, {}
    lines = source.splitlines()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
      if token.type == tokenize.COMMENT:
        row, col = token.start
        where = self.alone if not lines[row - 1][:col].strip() else self.inline
        where[row] = token.string.lstrip('#').strip()

  def above(self, line: int) -> str:
    """The block of comment lines directly above `line`, up to a blank line or a section rule."""
    block = []
    line -= 1
    while line in self.alone and not _SECTION_RULE.match(self.alone[line]):
      block.insert(0, self.alone[line])
      line -= 1
    return ' '.join(text for text in block if text)

  def of(self, first_line: int, last_line: int) -> str:
    return (self.inline.get(first_line) or self.inline.get(last_line)
            or self.above(first_line))


def _attribute_path(node: ast.AST, root: str) -> str | None:
  """'model.hidden_sizes' for `root.model.hidden_sizes`, else None."""
  names = []
  while isinstance(node, ast.Attribute):
    names.insert(0, node.attr)
    node = node.value
  if isinstance(node, ast.Name) and node.id == root and names:
    return '.'.join(names)
  return None


def _dict_entries(node: ast.AST) -> list[tuple[str, ast.AST, int]] | None:
  """(key, value, line) of `ConfigDict(dict(k=v))`, `ConfigDict({'k': v})`, `dict(...)`, `{...}`."""
  if isinstance(node, ast.Call):
    name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, 'id', '')
    if name in ('ConfigDict', 'FrozenConfigDict') and len(node.args) == 1:
      return _dict_entries(node.args[0])
    if name == 'dict' and not node.args and all(k.arg for k in node.keywords):
      return [(k.arg, k.value, k.lineno) for k in node.keywords]
  if isinstance(node, ast.Dict) and all(
      isinstance(k, ast.Constant) and isinstance(k.value, str) for k in node.keys):
    return [(k.value, v, k.lineno) for k, v in zip(node.keys, node.values)]
  return None


def _leaf_sources(source: str, comments: _Comments, name: str, value: ast.AST, line: int,
                  meaning: str, assign_line: int) -> dict[str, _Source]:
  entries = _dict_entries(value)
  if entries is None:
    return {name: _Source(line, ast.get_source_segment(source, value) or '', meaning)}
  found = {}
  for key, child, child_line in entries:
    own = comments.of(child_line, child.end_lineno) if child_line != assign_line else ''
    found.update(_leaf_sources(source, comments, f'{name}.{key}', child, child_line,
                               own or meaning, assign_line))
  return found


def _config_name(tree: ast.Module) -> str:
  """The variable `get_config` returns (usually `config`)."""
  for node in ast.walk(tree):
    if isinstance(node, ast.FunctionDef) and node.name == 'get_config':
      for child in ast.walk(node):
        if isinstance(child, ast.Return) and isinstance(child.value, ast.Name):
          return child.value.id
  return 'config'


def _source_fields(source: str) -> dict[str, _Source]:
  """Every field the file assigns, by dotted name, with its value's text and its comment."""
  tree = ast.parse(source)
  root, comments = _config_name(tree), _Comments(source)
  found = {}
  for node in sorted((n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))),
                     key=lambda n: n.lineno):
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    for target in targets:
      name = _attribute_path(target, root)
      if name and node.value is not None:
        meaning = comments.of(node.lineno, node.end_lineno)
        found.update(_leaf_sources(source, comments, name, node.value, node.lineno, meaning,
                                   node.lineno))
  return found


def _leaves(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
  leaves = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and value:  # An empty one is a leaf.
      leaves.update(_leaves(value, f'{prefix}{key}.'))
    else:
      leaves[f'{prefix}{key}'] = (value.to_dict() if isinstance(value, ml_collections.ConfigDict)
                                  else value)
  return leaves


def _default_text(text: str, value: Any) -> str:
  """The file's text for the value when it is a literal equal to it, else repr(value)."""
  try:
    literal = ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    return repr(value)
  return text if type(literal) is type(value) and literal == value else repr(value)


def fields(config_path: str) -> list[tuple[str, str, str]]:
  """(dotted name, default, meaning) of every leaf of `get_config()`, in the file's order.

  Names are relative to the config (`model.hidden_sizes`, set with `--config.model.hidden_sizes`).
  A field the file does not visibly assign (a loop, an update call) comes last, with repr(value)
  as its default and an empty meaning.
  """
  sources = _source_fields(pathlib.Path(config_path).read_text())
  leaves = _leaves(load_config(config_path))
  missing = _Source(sys.maxsize, '', '')

  def source(name: str) -> _Source:
    """The leaf's own source, else its nearest assigned parent's (`config.x = make_dict()`)."""
    parts = name.split('.')
    for end in range(len(parts), 0, -1):
      found = sources.get('.'.join(parts[:end]))
      if found:
        return found if end == len(parts) else found._replace(default='')
    return missing

  ordered = sorted(leaves, key=lambda name: (source(name).line, name))
  return [(name, _default_text(source(name).default, leaves[name]), source(name).meaning)
          for name in ordered]


# A run of at least this many sibling fields with the same default and meaning (a dict built
# by a function, such as config.sweep) is one row of the tables: 'sweep.<name>'.
_COLLAPSE_AT = 4


def table_rows(config_path: str) -> list[tuple[str, str, str]]:
  """The rows of the tables: `fields`, with runs of alike siblings collapsed into one."""
  rows, out = fields(config_path), []
  i = 0
  while i < len(rows):
    parent, default, meaning = rows[i][0].rpartition('.')[0], rows[i][1], rows[i][2]
    j = i
    while (j < len(rows) and parent and rows[j][0].rpartition('.')[0] == parent
           and rows[j][1:] == (default, meaning)):
      j += 1
    if j - i >= _COLLAPSE_AT:
      names = ', '.join(name.rpartition('.')[2] for name, _, _ in rows[i:j])
      out.append((f'{parent}.<name>', default, f'{meaning} <name> is one of: {names}.'))
      i = j
    else:
      out.append(rows[i])
      i += 1
  return out


def _markdown_cell(text: str) -> str:
  return text.replace('|', r'\|')


def markdown_table(config_path: str) -> str:
  rows = ['| field | default | meaning |', '| --- | --- | --- |']
  rows += [f'| `{name}` | `{_markdown_cell(default)}` | {_markdown_cell(meaning)} |'
           for name, default, meaning in table_rows(config_path)]
  return '\n'.join(rows) + '\n'


def text_table(config_path: str, width: int = 100) -> str:
  """Aligned columns for `--help`; long meanings wrap under the meaning column."""
  rows = table_rows(config_path)
  name_width = max(len(name) for name, _, _ in rows)
  default_width = max(len(default) for _, default, _ in rows)
  return _aligned(rows, name_width, default_width, width, margin='')


_SECTION_TITLE = re.compile(r'^\s*#\s*---\s*(.*?)\s*-*\s*$')


def sections(config_path: str) -> list[tuple[str, list[tuple[str, str, str]]]]:
  """`table_rows` grouped by the file's section rules (`# --- Data ---`), in the file's order;
  a field assigned before any rule, or not visibly, is in the section ''."""
  source = pathlib.Path(config_path).read_text()
  titles = {number: match[1] for number, line in enumerate(source.splitlines(), 1)
            if (match := _SECTION_TITLE.match(line))}
  assigned = _source_fields(source)

  def section(name: str) -> str:
    parts = name.split('.')
    found = next((assigned[p] for p in ('.'.join(parts[:end]) for end in range(len(parts), 0, -1))
                  if p in assigned), None)
    above = [number for number in titles if found and number < found.line]
    return titles[max(above)] if above else ''

  grouped: dict[str, list[tuple[str, str, str]]] = {}
  for row in table_rows(config_path):
    grouped.setdefault(section(row[0]), []).append(row)
  return list(grouped.items())


def sectioned_text(config_path: str, width: int = 100) -> str:
  """`text_table`'s columns under one heading a section ('Data:', 'Model:', ...)."""
  rows = table_rows(config_path)
  name_width = max(len(name) for name, _, _ in rows)
  default_width = max(len(default) for _, default, _ in rows)
  return '\n'.join(f'{title or "Other"}:\n' + _aligned(group, name_width, default_width, width)
                   for title, group in sections(config_path))


def _aligned(rows, name_width: int, default_width: int, width: int, margin: str = '  ') -> str:
  """Name, default and meaning columns after `margin`; a long meaning wraps under its column."""
  indent = ' ' * (len(margin) + name_width + default_width + 4)
  lines = []
  for name, default, meaning in rows:
    head = f'{margin}{name:<{name_width}}  {default:<{default_width}}  '
    wrapped = textwrap.wrap(meaning, max(width - len(indent), 20)) or ['']
    lines.append((head + wrapped[0]).rstrip())
    lines += [indent + more for more in wrapped[1:]]
  return '\n'.join(lines) + '\n'


def main(argv: list[str]) -> int:
  args = [arg for arg in argv if arg != '--text']
  if len(args) != 1:
    print('usage: python -m mnist_jax.config_doc CONFIG_PATH [--text]', file=sys.stderr)
    return 2
  print(text_table(args[0]) if '--text' in argv else markdown_table(args[0]), end='')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
