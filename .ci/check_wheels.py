"""Asks the package index whether the project installs from wheels where we say it does.

    python .ci/check_wheels.py                               # the declared ranges
    python .ci/check_wheels.py --constraints constraints.txt # ... and the pinned tested set
    python .ci/check_wheels.py --every-python                # all declared Pythons everywhere

For each target (Linux x86_64 at the oldest and the newest Python that `requires-python` allows;
macOS arm64, Linux aarch64 and Windows amd64 at the newest), every requirement in pyproject.toml
(`dependencies` and the extras) whose environment marker holds on that target, plus jaxlib in
jax's range, is resolved by pip as it resolves a wheel for that platform:

    pip install --dry-run --no-deps --only-binary=:all: --platform P --python-version V ...

(`pip download` with the same flags chooses the same wheel; the dry run only reads the wheel's
metadata.) pip does not evaluate markers for the target, only for the machine it runs on, so this
script does, with `packaging`.

With `--constraints FILE` it also checks what `pip install -e ".[test]" -c FILE` would install on
each target: it resolves the direct requirements under the pins, then follows each chosen wheel's
own requirements (markers evaluated for the target again) until nothing new comes up, and names
what FILE does not pin there. A package without any wheel (a pure-Python source archive, such as
promise) is listed, not failed: pip builds it the same way everywhere.

Exit status, so that CI can tell the cases apart:
  0  every requirement has a wheel on every target
  1  some have none: listed, one line each, with what pip said
  2  usage error (bad arguments, a pip without --dry-run/--report)
  3  the package index could not be reached (one line), and no wheel is known to be missing
It needs nothing but the package index (pip's own configuration says which).

`--newest-local-python` only prints the newest CPython on this machine that `requires-python`
allows (CI's second test run), or nothing.
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from typing import Callable, Iterable, Mapping, Sequence

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = pathlib.Path(__file__).resolve().parents[1]

EXIT_OK, EXIT_MISSING, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# A pip run that could not reach the index is tried again after these pauses (seconds): under
# load the index's connections are sometimes reset, which is not an outage.
UNREACHABLE_PAUSES_S = (5, 20)

# The newest CPython minor release this script knows of; the newest Python checked is the
# newest one that `requires-python` allows, up to this. Raise it when a new CPython is out.
NEWEST_KNOWN_PYTHON = '3.14'
# Linux wheels are checked for glibc 2.28 (RHEL/Rocky 8, Debian 10 and everything newer): a
# wheel found here installs on any newer Linux; macOS for 14 (Sonoma) and newer.
MANYLINUX_GLIBC = (2, 28)
MACOS_VERSION = '14_0'


@dataclasses.dataclass(frozen=True)
class Platform:
  """A place to install on: pip's wheel tags for it and its PEP 508 marker values."""
  name: str
  tags: tuple[str, ...]  # pip --platform values (pip expands a macosx tag to older releases).
  sys_platform: str
  platform_system: str
  platform_machine: str
  os_name: str


def _manylinux(arch: str) -> tuple[str, ...]:
  major, newest = MANYLINUX_GLIBC
  tags = [f'manylinux_{major}_{minor}_{arch}' for minor in range(newest, 16, -1)]
  return tuple(tags + [f'manylinux2014_{arch}'])  # manylinux2014 is manylinux_2_17.


LINUX_X86_64 = Platform('Linux x86_64', _manylinux('x86_64'), 'linux', 'Linux', 'x86_64', 'posix')
LINUX_AARCH64 = Platform('Linux aarch64', _manylinux('aarch64'), 'linux', 'Linux', 'aarch64',
                         'posix')
MACOS_ARM64 = Platform('macOS arm64', (f'macosx_{MACOS_VERSION}_arm64',), 'darwin', 'Darwin',
                       'arm64', 'posix')
WINDOWS_AMD64 = Platform('Windows amd64', ('win_amd64',), 'win32', 'Windows', 'AMD64', 'nt')


@dataclasses.dataclass(frozen=True)
class Target:
  platform: Platform
  python: str  # 'X.Y'

  @property
  def name(self) -> str:
    return f'{self.platform.name}, Python {self.python}'

  def marker_env(self, extra: str = '') -> dict[str, str]:
    """The values PEP 508 markers see on this target (a CPython X.Y.0)."""
    p = self.platform
    return dict(
        python_version=self.python, python_full_version=f'{self.python}.0',
        implementation_name='cpython', implementation_version=f'{self.python}.0',
        platform_python_implementation='CPython', sys_platform=p.sys_platform,
        platform_system=p.platform_system, platform_machine=p.platform_machine,
        os_name=p.os_name, platform_release='', platform_version='', extra=extra)


def declared_pythons(requires_python: str, newest_known: str = NEWEST_KNOWN_PYTHON) -> list[str]:
  """The CPython minor versions ('3.11', ...) that `requires-python` allows, oldest first."""
  spec = SpecifierSet(requires_python)
  newest_minor = Version(newest_known).minor
  allowed = [f'3.{minor}' for minor in range(0, newest_minor + 1)
             if spec.contains(f'3.{minor}.0', prereleases=True)]
  if not allowed:
    raise ValueError(f'requires-python {requires_python!r} allows no CPython up to {newest_known}')
  return allowed


def default_targets(pythons: Sequence[str], every_python: bool = False) -> list[Target]:
  """Linux x86_64 at the oldest and newest Python; the other platforms at the newest."""
  oldest, newest = pythons[0], pythons[-1]
  if every_python:
    return [Target(p, v) for p in (LINUX_X86_64, MACOS_ARM64, LINUX_AARCH64, WINDOWS_AMD64)
            for v in pythons]
  targets = [Target(LINUX_X86_64, oldest)]
  if newest != oldest:
    targets.append(Target(LINUX_X86_64, newest))
  return targets + [Target(p, newest) for p in (MACOS_ARM64, LINUX_AARCH64, WINDOWS_AMD64)]


def project_requirements(pyproject: Mapping) -> list[tuple[Requirement, str]]:
  """(requirement, extra) for every dependency and every extra's dependency; extra '' for none."""
  project = pyproject['project']
  reqs = [(Requirement(r), '') for r in project.get('dependencies', [])]
  for extra, extra_reqs in project.get('optional-dependencies', {}).items():
    reqs += [(Requirement(r), extra) for r in extra_reqs]
  return reqs


def requirements_for(target: Target, pyproject: Mapping) -> list[Requirement]:
  """The project's requirements that apply on `target` (markers dropped), plus jaxlib.

  jaxlib is not a direct dependency, but jax needs it at its own version and it is the one
  with platform wheels, so it is checked in jax's range.
  """
  reqs = []
  for req, extra in project_requirements(pyproject):
    if req.marker is None or req.marker.evaluate(target.marker_env(extra)):
      reqs.append(_without_marker(req))
  names = {canonicalize_name(r.name) for r in reqs}
  if 'jax' in names and 'jaxlib' not in names:
    jax = next(r for r in reqs if canonicalize_name(r.name) == 'jax')
    reqs.append(Requirement(f'jaxlib{jax.specifier}'))
  return reqs


def _without_marker(req: Requirement) -> Requirement:
  extras = f'[{",".join(sorted(req.extras))}]' if req.extras else ''
  return Requirement(f'{req.name}{extras}{req.specifier}')


# --- What the index says about one requirement on one target. ---

@dataclasses.dataclass(frozen=True)
class Found:
  version: str
  file: str  # The file pip chose: a wheel, or (when sources were allowed) a source archive.
  requires_dist: tuple[str, ...] = ()

  @property
  def is_wheel(self) -> bool:
    return self.file.endswith('.whl')


@dataclasses.dataclass(frozen=True)
class Missing:
  reason: str  # What pip said, in one line.


@dataclasses.dataclass(frozen=True)
class Unreachable:
  reason: str


Result = Found | Missing | Unreachable
# query(requirements, target, constraints file or None, allow_source=False)
#   -> {canonical name: Result}, one per requirement.
Query = Callable[..., dict[str, Result]]

# What pip prints when it cannot talk to an index (urllib3/requests errors, DNS, TLS, proxies).
_NETWORK_ERRORS = re.compile(
    r'NewConnectionError|Failed to establish a new connection|Temporary failure in name '
    r'resolution|Name or service not known|nodename nor servname|ConnectTimeoutError|'
    r'ReadTimeoutError|Connection refused|ProxyError|Could not fetch URL|Max retries exceeded|'
    r'SSLError|connection broken|Network is unreachable', re.I)
_NO_VERSION = re.compile(r'Could not find a version that satisfies the requirement (.+)')
_WRONG_PYTHON = re.compile(r"Package '([^']+)' requires a different Python: (.+)")
_CONFLICT = re.compile(r'Cannot install (\S+) because')  # The range and the pin exclude all.


def classify_failure(pip_output: str) -> tuple[Missing | Unreachable, str | None]:
  """A failed pip run: no wheel (Missing) or no answer from the index (Unreachable).

  Also returns the name of the requirement pip gave up on, when its message names one.
  """
  lines = [l.strip() for l in pip_output.splitlines() if l.strip()]
  network = next((l for l in lines if _NETWORK_ERRORS.search(l)), None)
  if network is not None:
    return Unreachable(network), None
  wrong_python = _first_match(_WRONG_PYTHON, lines)
  if wrong_python is not None:  # Every release in range needs another Python.
    return (Missing(f'needs another Python: {wrong_python.group(2)}'),
            canonicalize_name(wrong_python.group(1)))
  conflict = _first_match(_CONFLICT, lines)
  if conflict is not None:
    return (Missing('no wheel in both the range and the constraints\' pin'),
            _name_of(conflict.group(1)))
  no_version = _first_match(_NO_VERSION, lines)
  if no_version is None:  # Some other failure: say what pip said.
    errors = [l for l in lines if l.startswith('ERROR:')] or lines[-1:] or ['pip failed, silently']
    return Missing(' '.join(errors)), None
  # 'tensorflow-cpu<2.22,>=2.18 (from versions: none)': what the index has for this target.
  requirement, _, versions = no_version.group(1).partition(' (from versions: ')
  versions = versions.rstrip(')').split(', ')
  if len(versions) > 4:
    versions = [f'{len(versions)} versions up to'] + versions[-3:]
  return (Missing(f'no wheel in range; for this target the index has {", ".join(versions)}'),
          _name_of(requirement))


def _name_of(requirement: str) -> str:
  return canonicalize_name(re.split(r'[\[<>=!~;@ ]', requirement, maxsplit=1)[0])


def _first_match(pattern: re.Pattern, lines: Iterable[str]) -> re.Match | None:
  return next((m for m in map(pattern.search, lines) if m), None)


@functools.cache
def _pip_has_fast_deps() -> bool:
  """Whether this pip can read a wheel's metadata with HTTP range requests (--use-feature)."""
  return subprocess.run([sys.executable, '-m', 'pip', 'install', '--use-feature=fast-deps',
                         '--help'], capture_output=True).returncode == 0


def pip_args(reqs: Sequence[Requirement], target: Target, constraints: pathlib.Path | None,
             report: str, target_dir: str, fast_deps: bool = False,
             allow_source: bool = False) -> list[str]:
  """pip's command line for one question: the wheels of `reqs` on `target`, as a JSON report.

  `allow_source` lets pip fall back on a source archive (it then builds its metadata).

  `fast_deps` reads each wheel's metadata with HTTP range requests instead of downloading the
  wheel (an index without PEP 658 metadata otherwise makes pip download TensorFlow's 350 MB to
  read it); it changes how the metadata arrives, not which wheel pip chooses.
  """
  args = [sys.executable, '-m', 'pip', 'install', '--dry-run', '--ignore-installed', '--no-deps',
          '--python-version', target.python, '--implementation', 'cp',
          '--target', target_dir, '--report', report, '--quiet', '--no-input',
          '--disable-pip-version-check', '--retries', '3', '--timeout', '30']
  if not allow_source:
    args.append('--only-binary=:all:')
  if fast_deps:
    args.append('--use-feature=fast-deps')
  for tag in target.platform.tags:
    args += ['--platform', tag]
  if constraints is not None:
    args += ['-c', str(constraints)]
  return args + [str(r) for r in reqs]


def pip_query(reqs: Sequence[Requirement], target: Target, constraints: pathlib.Path | None,
              allow_source: bool = False, *,
              run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
              fast_deps: bool = False,
              pauses_s: Sequence[float] = UNREACHABLE_PAUSES_S,
              sleep: Callable[[float], None] = time.sleep) -> dict[str, Result]:
  """Asks pip for all of `reqs` at once; when that fails, finds out which ones have no wheel.

  pip stops at the first requirement it cannot satisfy and names it: that one is Missing, and
  the rest are asked again (each one alone when pip's message names none). A run that could not
  reach the index is tried again after each of `pauses_s`: a reset connection is not an outage.
  """
  if not reqs:
    return {}
  again = functools.partial(pip_query, target=target, constraints=constraints,
                            allow_source=allow_source, run=run, fast_deps=fast_deps,
                            pauses_s=pauses_s, sleep=sleep)
  for pause_s in (*pauses_s, None):
    answer, culprit = _pip_once(lambda report, target_dir: pip_args(
        reqs, target, constraints, report, target_dir, fast_deps, allow_source), run)
    if not isinstance(answer, Unreachable) or pause_s is None:
      break
    sleep(pause_s)
  if isinstance(answer, dict):
    return answer
  if isinstance(answer, Unreachable) or len(reqs) == 1:
    return {canonicalize_name(r.name): answer for r in reqs}
  if culprit is None or culprit not in {canonicalize_name(r.name) for r in reqs}:
    out = {}
    for r in reqs:  # pip's message names no requirement of ours: ask one by one.
      out.update(again([r]))
    return out
  rest = [r for r in reqs if canonicalize_name(r.name) != culprit]
  return {culprit: answer, **again(rest)}


def _pip_once(make_args: Callable[[str, str], list[str]], run):
  """One pip run: ({name: Found}, None), or (Missing | Unreachable, the name pip gave up on)."""
  with tempfile.TemporaryDirectory(prefix='check_wheels_') as tmp:
    report = os.path.join(tmp, 'report.json')
    proc = run(make_args(report, os.path.join(tmp, 'target')), capture_output=True, text=True)
    if proc.returncode != 0:
      return classify_failure((proc.stdout or '') + '\n' + (proc.stderr or ''))
    with open(report) as f:
      installs = json.load(f)['install']
  found = {}
  for item in installs:
    meta = item['metadata']
    file = item['download_info']['url'].rsplit('/', 1)[-1].split('#')[0]
    found[canonicalize_name(meta['name'])] = Found(meta['version'], file,
                                                   tuple(meta.get('requires_dist', ())))
  return found, None


# --- Checking targets. ---

@dataclasses.dataclass
class TargetReport:
  target: Target
  results: dict[str, tuple[Requirement, Result]]  # canonical name -> (what was asked, answer)
  constraints: pathlib.Path | None = None
  unpinned: list[str] = dataclasses.field(default_factory=list)  # Found, but not in constraints.

  @property
  def name(self) -> str:
    return self.target.name + (f' under {self.constraints.name}' if self.constraints else '')

  def missing(self) -> list[tuple[Requirement, Missing]]:
    return [(r, res) for r, res in self.results.values() if isinstance(res, Missing)]

  def unreachable(self) -> list[tuple[Requirement, Unreachable]]:
    return [(r, res) for r, res in self.results.values() if isinstance(res, Unreachable)]


def check_target(target: Target, pyproject: Mapping, query: Query,
                 constraints: pathlib.Path | None = None, transitive: bool = False,
                 max_rounds: int = 30) -> TargetReport:
  """Resolves the project's requirements on `target`; with `transitive`, their requirements too.

  Each round asks the index for the requirements that are new (or whose range or extras grew)
  since the last one, and adds what the wheels found there require on this target. In that
  walk a requirement without a wheel is asked again with source archives allowed: some
  pure-Python packages ship only one (promise, which tensorflow-datasets needs), and pip builds
  it everywhere, here too; `problems` decides whether that is acceptable.
  """
  wanted: dict[str, Requirement] = {canonicalize_name(r.name): r
                                    for r in requirements_for(target, pyproject)}
  results: dict[str, tuple[Requirement, Result]] = {}
  for _ in range(max_rounds):
    pending = []
    for name, req in wanted.items():
      if name not in results:
        pending.append(req)
      elif _still_fits(req, *results[name]):
        results[name] = (req, results[name][1])
      elif isinstance(results[name][1], Found):
        pending.append(req)  # Its range or extras changed: ask again.
    if not pending:
      break
    answers = {canonicalize_name(n): res for n, res in query(pending, target, constraints).items()}
    for req in pending:
      name = canonicalize_name(req.name)
      results[name] = (req, answers.get(name) or Missing('pip chose no wheel for it'))
    if not transitive:
      break
    no_wheel = [req for req in pending
                if isinstance(results[canonicalize_name(req.name)][1], Missing)]
    sources = query(no_wheel, target, constraints, allow_source=True) if no_wheel else {}
    for name, answer in sources.items():
      if isinstance(answer, Found):
        results[canonicalize_name(name)] = (results[canonicalize_name(name)][0], answer)
    for req in pending:
      answer = results[canonicalize_name(req.name)][1]
      if isinstance(answer, Found):
        for dep in _applicable(answer.requires_dist, req.extras, target):
          _merge(wanted, dep)
  else:
    raise RuntimeError(f'{target.name}: requirements still changing after {max_rounds} rounds')
  report = TargetReport(target, results, constraints)
  if constraints is not None:
    pinned = pinned_names(constraints)
    report.unpinned = sorted(n for n, (_, res) in results.items()
                             if isinstance(res, Found) and n not in pinned)
  return report


def _still_fits(req: Requirement, asked: Requirement, answer: Result) -> bool:
  """Whether the answer to `asked` also answers `req`: nothing new to ask the index."""
  if not isinstance(answer, Found):
    return str(req) == str(asked)
  return (set(req.extras) <= set(asked.extras) and
          req.specifier.contains(answer.version, prereleases=True))


def _applicable(requires_dist: Iterable[str], extras: Iterable[str],
                target: Target) -> list[Requirement]:
  """The requirements of a wheel that hold on `target` when it is installed with `extras`."""
  out = []
  for line in requires_dist:
    dep = Requirement(line)
    if dep.marker is None or any(dep.marker.evaluate(target.marker_env(e))
                                 for e in ('', *extras)):
      out.append(_without_marker(dep))
  return out


def _merge(wanted: dict[str, Requirement], dep: Requirement) -> None:
  name = canonicalize_name(dep.name)
  if name not in wanted:
    wanted[name] = dep
    return
  old = wanted[name]
  extras = sorted(set(old.extras) | set(dep.extras))
  extras_str = f'[{",".join(extras)}]' if extras else ''
  merged = Requirement(f'{old.name}{extras_str}{old.specifier & dep.specifier}')
  if str(merged) != str(old):
    wanted[name] = merged


def pinned_names(constraints: pathlib.Path) -> set[str]:
  names = set()
  for line in constraints.read_text().splitlines():
    line = line.split('#', 1)[0].strip()
    if line and not line.startswith('-'):
      names.add(canonicalize_name(Requirement(line).name))
  return names


def check(targets: Sequence[Target], pyproject: Mapping, query: Query,
          constraints: pathlib.Path | None = None, jobs: int = 4) -> list[TargetReport]:
  """The declared ranges on every target; with `constraints`, also all of it under the pins."""
  runs = [(t, None, False) for t in targets]
  if constraints is not None:
    runs += [(t, constraints, True) for t in targets]
  with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    futures = [pool.submit(check_target, t, pyproject, query, c, tr) for t, c, tr in runs]
    return [f.result() for f in futures]


def problems(reports: Sequence[TargetReport]) -> tuple[list, list]:
  """(missing, unreachable): lists of (report, requirement, Missing | Unreachable).

  A package found only as a source archive counts as missing where another target got a wheel
  of it: it has compiled code, and installing it there would need a compiler. One that has no
  wheel anywhere (a pure-Python sdist) builds the same everywhere and is only listed.
  """
  has_wheel = {n for rep in reports for n, (_, res) in rep.results.items()
               if isinstance(res, Found) and res.is_wheel}
  missing, unreachable = [], []
  for rep in reports:
    for name, (req, res) in rep.results.items():
      if isinstance(res, Missing):
        missing.append((rep, req, res))
      elif isinstance(res, Unreachable):
        unreachable.append((rep, req, res))
      elif not res.is_wheel and name in has_wheel:
        missing.append((rep, req, Missing(f'only {res.file} here; other targets get a wheel')))
  return missing, unreachable


def print_reports(reports: Sequence[TargetReport], out=None) -> int:
  """Prints one line per target and what is missing; returns the exit status."""
  out = out or sys.stdout
  for rep in reports:
    found = sorted((n, res) for n, (_, res) in rep.results.items() if isinstance(res, Found))
    wheels = [(n, res) for n, res in found if res.is_wheel]
    line = f'{rep.name}: {len(wheels)}/{len(rep.results)} with wheels'
    binary = [f'{n} {res.version}' for n, res in wheels if not res.file.endswith('-none-any.whl')]
    if binary and not rep.constraints:
      line += f'; platform wheels: {", ".join(binary)}'
    if sources := [f'{n} {res.version}' for n, res in found if not res.is_wheel]:
      line += f'; source only: {", ".join(sources)}'
    print(line, file=out)
    if rep.unpinned:
      unpinned = [f'{n}=={rep.results[n][1].version}' for n in rep.unpinned]
      print(f'    not pinned by the constraints here: {", ".join(unpinned)}', file=out)
  missing, unreachable = problems(reports)
  if missing:
    print(f'\nMISSING: {len(missing)} requirement(s) without a wheel:', file=out)
    for rep, req, res in missing:
      print(f'  {rep.name}: {req}: {res.reason}', file=out)
    return EXIT_MISSING
  if unreachable:
    _, _, first = unreachable[0]
    print(f'INDEX UNREACHABLE: could not ask the package index about {len(unreachable)} '
          f'requirement(s); no wheel is known to be missing ({first.reason})', file=out)
    return EXIT_UNREACHABLE
  print('All targets have a wheel for every requirement.', file=out)
  return EXIT_OK


# --- The newest Python on this machine that the project allows (for CI's second test run). ---

def local_pythons() -> list[str]:
  """Interpreters to consider: pyenv's installed versions first, then python3.N on PATH."""
  found = []
  pyenv = shutil.which('pyenv')
  root = (subprocess.run([pyenv, 'root'], capture_output=True, text=True).stdout.strip()
          if pyenv else os.environ.get('PYENV_ROOT', os.path.expanduser('~/.pyenv')))
  found += sorted(str(p) for p in pathlib.Path(root).glob('versions/*/bin/python3'))
  found += [w for minor in range(30, 9, -1) if (w := shutil.which(f'python3.{minor}'))]
  return found


def probe_python(executable: str) -> tuple[str, str] | None:
  """(implementation, 'X.Y.Z') of an interpreter, or None when it does not run (a pyenv shim
  for a version that is not selected fails, for one)."""
  try:
    proc = subprocess.run([executable, '-c', 'import platform, sys; print(platform.'
                           'python_implementation(), "%d.%d.%d" % sys.version_info[:3])'],
                          capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  parts = proc.stdout.split()
  return (parts[0], parts[1]) if proc.returncode == 0 and len(parts) == 2 else None


def choose_newest_python(probed: Iterable[tuple[str, tuple[str, str] | None]],
                         requires_python: str, than: str) -> str | None:
  """The newest CPython among (path, probe) that `requires-python` allows and whose X.Y is
  newer than `than`'s; the first one found wins a tie. None when there is none."""
  allowed = SpecifierSet(requires_python)
  best = None
  for path, info in probed:
    if info is None or info[0] != 'CPython' or not allowed.contains(info[1], prereleases=True):
      continue
    minor = Version(info[1]).release[:2]
    if minor > Version(than).release[:2] and (best is None or minor > best[0]):
      best = (minor, path)
  return best and best[1]


def _check_pip() -> str | None:
  """An error message when this pip cannot do a dry run with a report (pip < 22.2)."""
  proc = subprocess.run([sys.executable, '-m', 'pip', '--version'], capture_output=True, text=True)
  match = re.match(r'pip (\d+)\.(\d+)', proc.stdout)
  if not match or (int(match[1]), int(match[2])) < (22, 2):
    return f'check_wheels needs pip >= 22.2 (--dry-run --report); found: {proc.stdout.strip()!r}'
  return None


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--pyproject', type=pathlib.Path, default=REPO / 'pyproject.toml')
  parser.add_argument('--constraints', type=pathlib.Path, default=None,
                      help='also check everything an install under these pins brings in')
  parser.add_argument('--every-python', action='store_true',
                      help='every declared Python on every platform, not only the five targets')
  parser.add_argument('--jobs', type=int, default=5, help='pip runs at once (mostly waiting)')
  parser.add_argument('--newest-local-python', action='store_true',
                      help='only print the path of the newest CPython on this machine that '
                           'requires-python allows, newer than this one (nothing if none)')
  args = parser.parse_args(argv)
  if args.newest_local_python:
    requires = tomllib.loads(args.pyproject.read_text())['project'].get('requires-python', '>=3')
    here = '%d.%d.%d' % sys.version_info[:3]
    newest = choose_newest_python(((p, probe_python(p)) for p in local_pythons()), requires, here)
    if newest:
      print(newest)
    return EXIT_OK
  if args.constraints is not None and not args.constraints.is_file():
    parser.error(f'no constraints file {args.constraints}')
  if (error := _check_pip()) is not None:
    print(error, file=sys.stderr)
    return EXIT_USAGE
  pyproject = tomllib.loads(args.pyproject.read_text())
  pythons = declared_pythons(pyproject['project'].get('requires-python', '>=3'))
  targets = default_targets(pythons, args.every_python)
  print(f'requires-python {pyproject["project"].get("requires-python")!r}: '
        f'Pythons {", ".join(pythons)}; {len(targets)} targets'
        + (f'; also with {args.constraints}' if args.constraints else ''))
  query = functools.partial(pip_query, fast_deps=_pip_has_fast_deps())
  reports = check(targets, pyproject, query, args.constraints, args.jobs)
  return print_reports(reports)


if __name__ == '__main__':
  sys.exit(main())
