""".ci/check_wheels.py without the network: markers per target, what counts as missing.

The index is replaced by fakes: a `query` that knows which (package, target) pairs have a wheel,
or a `run` that plays pip's part (its report file, its error messages).
"""

import io
import json
import pathlib
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import check_wheels as cw  # pylint: disable=g-import-not-at-top,wrong-import-position

PYPROJECT = tomllib.loads((cw.REPO / 'pyproject.toml').read_text())
PY = '3.12'
LINUX = cw.Target(cw.LINUX_X86_64, PY)
MAC = cw.Target(cw.MACOS_ARM64, PY)
ARM = cw.Target(cw.LINUX_AARCH64, PY)
WINDOWS = cw.Target(cw.WINDOWS_AMD64, PY)


def names(reqs):
  return sorted(r.name.lower() for r in reqs)


def tensorflows(target, pyproject=PYPROJECT):
  return [r.name for r in cw.requirements_for(target, pyproject) if r.name.startswith('tensorflow')
          and r.name != 'tensorflow-datasets']


# --- Which requirements apply where: the project's own markers. ---

@pytest.mark.parametrize('target, expected', [
    (LINUX, ['tensorflow-cpu']), (WINDOWS, ['tensorflow-cpu']),
    (MAC, ['tensorflow']), (ARM, ['tensorflow']),
])
def test_each_platform_gets_the_tensorflow_that_ships_there(target, expected):
  assert tensorflows(target) == expected


def test_the_requirement_keeps_its_range_and_loses_its_marker():
  (tf,) = [r for r in cw.requirements_for(MAC, PYPROJECT) if r.name == 'tensorflow']
  assert tf.marker is None
  assert tf.specifier.contains('2.21.0') and not tf.specifier.contains('2.22.0')


def test_jaxlib_is_checked_in_jaxs_range_and_the_test_extra_is_included():
  reqs = {r.name: r for r in cw.requirements_for(LINUX, PYPROJECT)}
  assert str(reqs['jaxlib'].specifier) == str(reqs['jax'].specifier)
  assert 'pytest' in reqs
  # Every dependency line but the other platforms' tensorflow, plus jaxlib, plus each extra's
  # lines (gcsfs is in two extras: one requirement).
  project = PYPROJECT['project']
  extras = {Requirement(r).name for lines in project['optional-dependencies'].values()
            for r in lines}
  assert len(reqs) == len(project['dependencies']) - 1 + 1 + len(extras)


def test_markers_are_evaluated_for_the_target_not_for_this_machine():
  pyproject = {'project': {'dependencies': [
      'a; sys_platform == "win32"', 'b; platform_machine == "arm64" and sys_platform == "darwin"',
      'c; python_version >= "3.13"', 'd; os_name == "nt"', 'e']}}
  assert names(cw.requirements_for(WINDOWS, pyproject)) == ['a', 'd', 'e']
  assert names(cw.requirements_for(MAC, pyproject)) == ['b', 'e']
  assert names(cw.requirements_for(cw.Target(cw.LINUX_X86_64, '3.13'), pyproject)) == ['c', 'e']
  assert names(cw.requirements_for(LINUX, pyproject)) == ['e']


def test_extras_requirements_apply_only_under_their_extra_marker():
  pyproject = {'project': {'dependencies': ['x'], 'optional-dependencies': {
      'test': ['pytest; extra == "test"', 'never; extra == "other"']}}}
  assert names(cw.requirements_for(LINUX, pyproject)) == ['pytest', 'x']


# --- Which Pythons and targets. ---

def test_pythons_come_from_requires_python():
  assert cw.declared_pythons('>=3.11,<3.14') == ['3.11', '3.12', '3.13']
  assert cw.declared_pythons('>=3.10', newest_known='3.14') == ['3.10', '3.11', '3.12', '3.13',
                                                                  '3.14']
  with pytest.raises(ValueError, match='allows no CPython'):
    cw.declared_pythons('>=4')


def test_the_five_targets():
  targets = cw.default_targets(['3.11', '3.12', '3.13'])
  assert [t.name for t in targets] == [
      'Linux x86_64, Python 3.11', 'Linux x86_64, Python 3.13', 'macOS arm64, Python 3.13',
      'Linux aarch64, Python 3.13', 'Windows amd64, Python 3.13']
  assert len(cw.default_targets(['3.11', '3.12', '3.13'], every_python=True)) == 12


def test_the_declared_pythons_match_the_project():
  assert cw.declared_pythons(PYPROJECT['project']['requires-python'])[0] == '3.11'


def test_linux_tags_cover_the_older_manylinux_releases():
  tags = cw.LINUX_AARCH64.tags
  assert tags[0] == 'manylinux_2_28_aarch64'
  assert {'manylinux_2_17_aarch64', 'manylinux2014_aarch64', 'manylinux_2_27_aarch64'} <= set(tags)
  assert not any('x86_64' in t for t in tags)


# --- Reporting: a fake index. ---

def fake_query(missing=(), unreachable=(), requires=None, sources=(), versions=None):
  """An index with a wheel for everything except (name, platform name) pairs in `missing`;
  of those, the names in `sources` have a source archive. Every package has version 1.0, or
  with `versions`, the first of them in the requirement's range."""
  asked = []

  def query(reqs, target, constraints, allow_source=False):
    asked.append((target.name, constraints, [str(r) for r in reqs], allow_source))
    out = {}
    for r in reqs:
      key = (r.name, target.platform.name)
      deps = tuple((requires or {}).get(r.name, ()))
      if key in unreachable:
        out[r.name] = cw.Unreachable('Failed to establish a new connection')
      elif key in missing and allow_source and r.name in sources:
        out[r.name] = cw.Found('1.0', f'{r.name}-1.0.tar.gz', deps)
      elif key in missing:
        out[r.name] = cw.Missing('no wheel in range; for this target the index has none')
      elif version := next((v for v in versions or ['1.0'] if versions is None
                            or r.specifier.contains(v)), None):
        out[r.name] = cw.Found(version, f'{r.name}-{version}-py3-none-any.whl', deps)
      else:
        out[r.name] = cw.Missing('no wheel in range')
    return out
  query.asked = asked
  return query


def test_a_missing_wheel_is_listed_with_its_target_and_exits_1(capsys):
  query = fake_query(missing={('tensorflow', 'macOS arm64')})
  reports = cw.check([LINUX, MAC], PYPROJECT, query)
  assert cw.print_reports(reports) == cw.EXIT_MISSING
  out = capsys.readouterr().out
  assert 'MISSING: 1 requirement(s)' in out
  assert 'macOS arm64, Python 3.12: tensorflow<2.22,>=2.18: no wheel in range' in out
  n = len({r.name for r in cw.requirements_for(LINUX, PYPROJECT)})
  assert f'Linux x86_64, Python 3.12: {n}/{n} with wheels' in out
  assert f'macOS arm64, Python 3.12: {n - 1}/{n} with wheels' in out


def test_all_found_exits_0(capsys):
  assert cw.print_reports(cw.check([LINUX, MAC, ARM, WINDOWS], PYPROJECT,
                                    fake_query())) == cw.EXIT_OK
  assert 'All targets have a wheel' in capsys.readouterr().out


def test_an_unreachable_index_is_not_reported_as_missing(capsys):
  query = fake_query(unreachable={('jax', 'Linux x86_64'), ('numpy', 'Linux x86_64')})
  assert cw.print_reports(cw.check([LINUX], PYPROJECT, query)) == cw.EXIT_UNREACHABLE
  out = capsys.readouterr().out
  assert 'MISSING' not in out
  assert out.splitlines()[-1].startswith('INDEX UNREACHABLE: could not ask the package index '
                                         'about 2 requirement(s)')


def test_missing_wins_over_unreachable():
  query = fake_query(missing={('jax', 'macOS arm64')}, unreachable={('numpy', 'macOS arm64')})
  assert cw.print_reports(cw.check([MAC], PYPROJECT, query), out=io.StringIO()) == 1


def test_under_constraints_the_dependencies_of_dependencies_are_checked_too():
  pyproject = {'project': {'dependencies': ['top[extra1]>=1']}}
  requires = {'top': ('mid>=1', 'winonly; sys_platform == "win32"', 'opt; extra == "extra1"',
                      'notasked; extra == "other"'),
              'mid': ('leaf<2', 'top'),  # A cycle back to the top: asked only once.
              'opt': ('leaf>=0.5',)}
  query = fake_query(missing={('leaf', 'Linux x86_64')}, requires=requires)
  report = cw.check_target(LINUX, pyproject, query, transitive=True)
  assert sorted(report.results) == ['leaf', 'mid', 'opt', 'top']
  assert [str(r) for r, _ in report.missing()] == ['leaf<2,>=0.5']  # Both ranges, merged.
  windows = cw.check_target(WINDOWS, pyproject, query, transitive=True)
  assert sorted(windows.results) == ['leaf', 'mid', 'opt', 'top', 'winonly']
  assert windows.missing() == []
  direct = cw.check_target(LINUX, pyproject, query, transitive=False)
  assert sorted(direct.results) == ['top']


@pytest.mark.parametrize('late_range, times_asked, version', [('<3', 1, '1.0'), ('>=2', 2, '2.0')])
def test_a_package_is_asked_again_only_when_a_later_range_excludes_what_was_found(
    late_range, times_asked, version):
  pyproject = {'project': {'dependencies': ['top']}}
  requires = {'top': ('a', 'b'), 'a': ('mid>=0.5',), 'b': ('c',), 'c': (f'mid{late_range}',)}
  query = fake_query(requires=requires, versions=['1.0', '2.0'])
  report = cw.check_target(LINUX, pyproject, query, transitive=True)
  asked_mid = [r for _, _, reqs, _ in query.asked for r in reqs if r.startswith('mid')]
  assert len(asked_mid) == times_asked
  assert report.results['mid'][1].version == version
  assert str(report.results['mid'][0].specifier) == str(cw.SpecifierSet(f'>=0.5,{late_range}'))


def test_unpinned_packages_are_named(tmp_path):
  constraints = tmp_path / 'c.txt'
  constraints.write_text('# comment\ntop==1.0\nMid_Pkg==1.0  # trailing\n')
  pyproject = {'project': {'dependencies': ['top']}}
  query = fake_query(requires={'top': ('mid-pkg', 'free')})
  report = cw.check_target(LINUX, pyproject, query, constraints=constraints, transitive=True)
  assert report.unpinned == ['free']
  out = io.StringIO()
  assert cw.print_reports([report], out=out) == cw.EXIT_OK
  assert '    not pinned by the constraints here: free==1.0\n' in out.getvalue()
  assert cw.pinned_names(constraints) == {'top', 'mid-pkg'}
  assert all(c == constraints for _, c, _, _ in query.asked)


def test_a_source_only_package_is_listed_not_failed_unless_others_get_a_wheel(capsys):
  pyproject = {'project': {'dependencies': ['top']}}
  requires = {'top': ('puresdist', 'compiled')}
  everywhere = {('puresdist', p.name) for p in (cw.LINUX_X86_64, cw.MACOS_ARM64)}
  query = fake_query(missing=everywhere | {('compiled', 'macOS arm64')}, requires=requires,
                     sources={'puresdist', 'compiled'})
  reports = [cw.check_target(t, pyproject, query, transitive=True) for t in (LINUX, MAC)]
  linux, mac = reports
  assert linux.results['puresdist'][1] == cw.Found('1.0', 'puresdist-1.0.tar.gz')
  assert linux.results['compiled'][1].is_wheel and not mac.results['compiled'][1].is_wheel
  missing, unreachable = cw.problems(reports)
  assert [(rep.target.name, str(req)) for rep, req, _ in missing] == [
      ('macOS arm64, Python 3.12', 'compiled')]
  assert 'other targets get a wheel' in missing[0][2].reason and unreachable == []
  assert cw.print_reports(reports) == cw.EXIT_MISSING
  out = capsys.readouterr().out
  assert 'Linux x86_64, Python 3.12: 2/3 with wheels; source only: puresdist 1.0' in out
  # Without the constraints walk, sources are never asked for: no wheel is missing.
  direct = cw.check_target(MAC, {'project': {'dependencies': ['puresdist']}}, query)
  assert isinstance(direct.results['puresdist'][1], cw.Missing)


# --- pip's side: its messages, its report, its command line. ---

NO_WHEEL = ('ERROR: Could not find a version that satisfies the requirement '
            'tensorflow-cpu<2.22,>=2.18 (from versions: none)\n'
            'ERROR: No matching distribution found for tensorflow-cpu<2.22,>=2.18\n')
OFFLINE = ("WARNING: Retrying (Retry(total=1, connect=None, read=None, redirect=None, status=None))"
           " after connection broken by 'NewConnectionError(\"HTTPSConnection(host='pypi.org', "
           "port=443): Failed to establish a new connection: [Errno 111] Connection refused\")'"
           ": /simple/jax/\n" + NO_WHEEL)


def test_pip_saying_no_version_is_missing_and_names_the_package():
  failure, name = cw.classify_failure(NO_WHEEL)
  assert failure == cw.Missing('no wheel in range; for this target the index has none')
  assert name == 'tensorflow-cpu'


def test_a_long_version_list_is_shortened():
  message = ('ERROR: Could not find a version that satisfies the requirement jaxlib<0.11,>=0.7 '
             '(from versions: 0.4.13, 0.4.18, 0.5.0, 0.6.1, 0.6.2)')
  failure, name = cw.classify_failure(message)
  assert failure.reason.endswith('has 5 versions up to, 0.5.0, 0.6.1, 0.6.2')
  assert name == 'jaxlib'


def test_pip_saying_wrong_python_is_missing():
  failure, name = cw.classify_failure(
      "ERROR: Package 'jax' requires a different Python: 3.10.0 not in '>=3.11'")
  assert failure == cw.Missing("needs another Python: 3.10.0 not in '>=3.11'")
  assert name == 'jax'


def test_a_pin_without_a_wheel_is_missing_and_names_the_package():
  failure, name = cw.classify_failure(
      'ERROR: Cannot install promise because these package versions have conflicting '
      'dependencies.\nThe conflict is caused by:\n    The user requested promise\n'
      '    The user requested (constraint) promise==2.3\nERROR: ResolutionImpossible: ...')
  assert failure == cw.Missing("no wheel in both the range and the constraints' pin")
  assert name == 'promise'


def test_connection_errors_are_unreachable_even_when_pip_also_says_not_found():
  failure, name = cw.classify_failure(OFFLINE)
  assert isinstance(failure, cw.Unreachable)
  assert 'Failed to establish a new connection' in failure.reason
  assert name is None


PIP_OPTIONS_WITH_VALUES = {'--python-version', '--implementation', '--target', '--report',
                           '--retries', '--timeout', '--platform', '-c'}


def requirements_in(args):
  """The positional arguments of `python -m pip install ...`: the requirements."""
  reqs, rest = [], iter(args[4:])
  for arg in rest:
    if arg in PIP_OPTIONS_WITH_VALUES:
      next(rest)
    elif not arg.startswith('-'):
      reqs.append(Requirement(arg))
  return reqs


class FakePip:
  """Plays pip: fails like pip for `missing` names, else writes a report like pip's."""

  def __init__(self, missing=(), output=NO_WHEEL):
    self.missing, self.output, self.calls = set(missing), output, []

  def __call__(self, args, **kwargs):
    assert args[1:4] == ['-m', 'pip', 'install'] and '--dry-run' in args and '--no-deps' in args
    reqs = requirements_in(args)
    self.calls.append([r.name for r in reqs])
    for r in reqs:
      if r.name in self.missing:
        return subprocess.CompletedProcess(args, 1, '', self.output.replace('tensorflow-cpu',
                                                                            r.name))
    report = args[args.index('--report') + 1]
    installs = [{'metadata': {'name': r.name, 'version': '2.0', 'requires_dist': ['dep>=1']},
                 'download_info': {'url': f'https://files/x/{r.name}-2.0-cp312-cp312-'
                                          f'win_amd64.whl#sha256=0'}} for r in reqs]
    pathlib.Path(report).write_text(json.dumps({'install': installs}))
    return subprocess.CompletedProcess(args, 0, '', '')


def test_pip_query_asks_once_when_everything_is_there():
  pip = FakePip()
  reqs = [Requirement('aa>=1'), Requirement('bb'), Requirement('cc')]
  out = cw.pip_query(reqs, WINDOWS, None, run=pip)
  assert pip.calls == [['aa', 'bb', 'cc']]
  assert out['aa'] == cw.Found('2.0', 'aa-2.0-cp312-cp312-win_amd64.whl', ('dep>=1',))


def test_pip_query_finds_every_missing_one_after_pip_stops_at_the_first():
  pip = FakePip(missing={'bb', 'dd'})
  reqs = [Requirement(n) for n in ('aa', 'bb', 'cc', 'dd')]
  out = cw.pip_query(reqs, MAC, None, run=pip)
  assert {n: type(r).__name__ for n, r in out.items()} == {
      'aa': 'Found', 'bb': 'Missing', 'cc': 'Found', 'dd': 'Missing'}
  assert pip.calls == [['aa', 'bb', 'cc', 'dd'], ['aa', 'cc', 'dd'], ['aa', 'cc']]


def test_pip_query_asks_one_by_one_when_pip_names_nothing():
  pip = FakePip(missing={'bb'}, output='ERROR: something else went wrong\n')
  out = cw.pip_query([Requirement('aa'), Requirement('bb')], MAC, None, run=pip)
  assert out['aa'] == cw.Found('2.0', 'aa-2.0-cp312-cp312-win_amd64.whl', ('dep>=1',))
  assert out['bb'] == cw.Missing('ERROR: something else went wrong')


def test_pip_query_offline_is_unreachable_for_all_after_trying_again():
  pip, pauses = FakePip(missing={'aa'}, output=OFFLINE), []
  out = cw.pip_query([Requirement('aa'), Requirement('bb')], LINUX, None, run=pip,
                     pauses_s=(5, 20), sleep=pauses.append)
  assert {type(r) for r in out.values()} == {cw.Unreachable}
  assert len(pip.calls) == 3 and pauses == [5, 20]


def test_pip_query_gets_over_a_reset_connection():
  pip, pauses = FakePip(missing={'aa'}, output=OFFLINE), []
  def run(args, **kwargs):
    if len(pip.calls) == 1:
      pip.missing.clear()  # The index answers the second time.
    return pip(args, **kwargs)
  out = cw.pip_query([Requirement('aa'), Requirement('bb')], LINUX, None, run=run,
                     pauses_s=(5, 20), sleep=pauses.append)
  assert {type(r) for r in out.values()} == {cw.Found}
  assert len(pip.calls) == 2 and pauses == [5]


def test_pip_args_name_the_target():
  args = cw.pip_args([Requirement('tensorflow>=2.18')], MAC, pathlib.Path('c.txt'), 'r.json', 't')
  joined = ' '.join(args)
  assert '--only-binary=:all:' in args and '--no-deps' in args
  assert '--python-version 3.12' in joined and '--platform macosx_14_0_arm64' in joined
  assert '-c c.txt' in joined and args[-1] == 'tensorflow>=2.18'
  assert '--use-feature=fast-deps' not in args
  with_sources = cw.pip_args([Requirement('x')], MAC, None, 'r.json', 't', fast_deps=True,
                             allow_source=True)
  assert '--only-binary=:all:' not in with_sources and '--use-feature=fast-deps' in with_sources
  assert '-c' not in with_sources


# --- The newest local Python, for CI's second run. ---

PROBED = [('/pyenv/3.12.1', ('CPython', '3.12.1')), ('/pyenv/3.13.0', ('CPython', '3.13.0')),
          ('/pyenv/3.14.0', ('CPython', '3.14.0')), ('/pyenv/pypy3.13', ('PyPy', '3.13.1')),
          ('/shims/python3.13', None), ('/usr/bin/python3.13', ('CPython', '3.13.5'))]


def test_the_newest_allowed_cpython_is_chosen():
  assert cw.choose_newest_python(PROBED, '>=3.11,<3.14', than='3.11.7') == '/pyenv/3.13.0'
  assert cw.choose_newest_python(PROBED, '>=3.11', than='3.11.7') == '/pyenv/3.14.0'


def test_no_newer_python_is_none():
  assert cw.choose_newest_python(PROBED, '>=3.11,<3.14', than='3.13.2') is None
  # Another patch release of the same minor version is not a newer Python.
  assert cw.choose_newest_python([('/a', ('CPython', '3.11.9'))], '>=3.11', than='3.11.7') is None
  assert cw.choose_newest_python([], '>=3.11', than='3.11.7') is None
