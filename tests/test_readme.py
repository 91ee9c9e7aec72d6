"""The README's config table is the one generated from configs/mlp.py, so it cannot drift."""

import pathlib
import re

from mnist_jax import config_doc

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_readme_config_table_matches_the_config():
  readme = (REPO / 'README.md').read_text()
  table = re.search(r'<!-- config table: begin -->\n(.*?)\n<!-- config table: end -->', readme,
                    re.S).group(1)
  assert table.strip() == config_doc.markdown_table(str(REPO / 'configs' / 'mlp.py')).strip()


def test_help_lists_every_config_field(tmp_path):
  import subprocess, sys, os  # pylint: disable=g-import-not-at-top,multiple-imports
  out = subprocess.run([sys.executable, 'run.py', '--help'], cwd=REPO, capture_output=True,
                       text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert out.returncode == 1, out.stderr  # absl's --help prints the usage and exits with 1.
  assert 'Traceback' not in out.stderr
  names = [name for name, _, _ in config_doc.fields(str(REPO / 'configs' / 'mlp.py'))]
  assert len(names) > 20
  for name in names:
    assert re.search(rf'^{re.escape(name)}\s', out.stdout, re.M), name
