"""The suite's tiers, and the rules that keep each honest (loaded by tests/conftest.py).

Three tiers, chosen by marker (``pytest.ini``) and by Makefile target:

* fast (no marker; ``make test-fast``): pure logic and transforms on the DirectRunner
  or a TestPipeline, in pytest's own process;
* ``cli`` (``make test-cli``): the command line in pytest's process (``run.main``
  through :func:`tests.cli.run_cli`), on the DirectRunner;
* ``integration`` (``make test-integration``): anything that starts a process or a
  service: Kafka, Flink, PostgreSQL, the S3 and GCS emulators, Prism, Java, a
  ``run.py`` subprocess (signals, child processes, a fresh interpreter).

The rules:

* a test that uses a service fixture (:data:`SERVICE_FIXTURES`, directly or through
  another fixture) is marked ``integration`` when it is collected; one that asks for a
  service with ``request.getfixturevalue`` without the mark fails at once, before the
  service starts;
* a test outside ``integration`` cannot start a process: while its fixtures are set up
  and while it runs, every way of starting one (``subprocess``, ``os.fork``,
  ``os.posix_spawn``, ``os.system``, ``multiprocessing``, ``asyncio``'s subprocesses)
  raises :class:`ProcessStarted`, and the test fails even if something caught that
  error (Beam's DirectRunner catches everything a Prism start raises, for one);
* at the end of a session that ran no ``integration`` test, pytest's process has no
  child process (:func:`child_processes`, from ``/proc``), or the session fails.

The rules hold per process: under pytest-xdist (``-n``, as the Makefile runs the fast and
cli tiers) each worker arms its own guard and checks its own children, and the workers
themselves are the only processes the controller starts.

``tests/test_tiers.py`` proves each rule.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Optional

import pytest

# Fixtures that start (or connect to) a service. A fixture that depends on one of these is
# covered too: pytest's ``item.fixturenames`` holds every fixture a test needs, transitively.
SERVICE_FIXTURES = frozenset({'kafka', 'flink_cluster', 'expansion_services', 'flink_job_server',
                              'postgres', 'pg_dsn', 's3_service', 'gcs_service'})

INTEGRATION = 'integration'
CLI = 'cli'


class ProcessStarted(AssertionError):
  """A test outside the integration tier tried to start a process."""


def tier_of(item: pytest.Item) -> str:
  if item.get_closest_marker(INTEGRATION):
    return INTEGRATION
  if item.get_closest_marker(CLI):
    return CLI
  return 'fast'


# --- the process guard ---------------------------------------------------------------------

class _Guard:
  """While armed (a stack: pytester's in-process sessions nest), every process start raises
  ProcessStarted and is recorded for the armed test."""

  def __init__(self):
    self._lock = threading.Lock()
    self._stack: List[Dict[str, Any]] = []
    self._originals: Dict[Any, Any] = {}
    self._installs = 0

  # Every function that can start a process, at the lowest level Python reaches:
  # subprocess.Popen (and asyncio's subprocesses, os.popen) ends in _posixsubprocess.fork_exec
  # or os.posix_spawn; multiprocessing in os.fork or _posixsubprocess.fork_exec; os.spawn*,
  # pty.fork in os.fork / os.forkpty; os.system is its own.
  def _targets(self):
    import _posixsubprocess
    import subprocess
    targets = [(_posixsubprocess, 'fork_exec')]
    if getattr(subprocess, '_fork_exec', None) is not None:  # its own name for fork_exec
      targets.append((subprocess, '_fork_exec'))
    for name in ('fork', 'forkpty', 'posix_spawn', 'posix_spawnp', 'system'):
      if hasattr(os, name):
        targets.append((os, name))
    return targets

  def install(self) -> None:
    with self._lock:
      self._installs += 1
      if self._installs > 1:
        return
      for module, name in self._targets():
        original = getattr(module, name)
        self._originals[(module, name)] = original
        setattr(module, name, self._wrap(name, original))

  def uninstall(self) -> None:
    with self._lock:
      self._installs -= 1
      if self._installs > 0:
        return
      for (module, name), original in self._originals.items():
        setattr(module, name, original)
      self._originals.clear()

  def _wrap(self, name, original):
    guard = self

    def guarded(*args, **kwargs):
      entry = guard.armed
      if entry is not None:
        what = f'{name.lstrip("_")}({_describe(name, args)})'
        entry['attempts'].append(what)
        raise ProcessStarted(
            f'{entry["nodeid"]} started a process ({what}), but it is not marked '
            f'@pytest.mark.integration: the fast and cli tiers start no process (tests/tiers.py)')
      return original(*args, **kwargs)

    guarded.__wrapped__ = original
    return guarded

  def arm(self, nodeid: str, open: bool = False) -> Dict[str, Any]:
    """Guards what runs until :meth:`disarm`; ``open`` lets it start processes (an integration
    test, even inside a fast test's pytester session)."""
    entry = {'nodeid': nodeid, 'attempts': [], 'open': open}
    self._stack.append(entry)
    return entry

  def disarm(self, entry: Dict[str, Any]) -> None:
    for i in range(len(self._stack) - 1, -1, -1):
      if self._stack[i] is entry:
        del self._stack[i]
        return

  @property
  def armed(self) -> Optional[Dict[str, Any]]:
    """The guarding entry, or None when processes may start."""
    if not self._stack or self._stack[-1]['open']:
      return None
    return self._stack[-1]


def _describe(name: str, args) -> str:
  if name in ('fork_exec', '_fork_exec') and args:
    argv = args[0]
  elif name in ('posix_spawn', 'posix_spawnp') and len(args) > 1:
    argv = args[1]
  elif name == 'system' and args:
    argv = [args[0]]
  else:
    return ''
  try:
    words = [a.decode() if isinstance(a, bytes) else str(a) for a in argv]
  except TypeError:
    return repr(argv)[:200]
  return ' '.join(words)[:200]


GUARD = _Guard()


def child_processes(pid: Optional[int] = None) -> Dict[int, str]:
  """The live (not zombie) child processes of ``pid`` (default: this one), with their names."""
  pid = os.getpid() if pid is None else pid
  found = {}
  for entry in os.listdir('/proc'):
    if not entry.isdigit():
      continue
    try:
      with open(f'/proc/{entry}/stat') as f:
        stat = f.read()
    except OSError:
      continue
    name = stat[stat.index('(') + 1:stat.rindex(')')]
    state, ppid = stat[stat.rindex(')') + 2:].split()[:2]
    if int(ppid) == pid and state != 'Z':
      found[int(entry)] = name
  return found


# --- hooks (tests/conftest.py imports them; pytester sessions load this module with -p) --------

_current: List[pytest.Item] = []


def current_item() -> Optional[pytest.Item]:
  """The test being set up, run or torn down (None between tests)."""
  return _current[-1] if _current else None


def _check_service_request(argname: str) -> None:
  """A service asked for by name at run time (``request.getfixturevalue``) by a test that is
  not marked integration fails before the service starts."""
  item = current_item()
  if argname in SERVICE_FIXTURES and item is not None and tier_of(item) != INTEGRATION:
    pytest.fail(f'{item.nodeid} uses the service fixture {argname!r} (through '
                'request.getfixturevalue) but is not marked @pytest.mark.integration', pytrace=False)


_getfixturevalue: List[Any] = []


def _install_request_check() -> None:
  from _pytest.fixtures import FixtureRequest
  original = FixtureRequest.getfixturevalue
  _getfixturevalue.append(original)
  if len(_getfixturevalue) > 1:
    return

  def getfixturevalue(self, argname: str):
    _check_service_request(argname)
    return original(self, argname)

  FixtureRequest.getfixturevalue = getfixturevalue


def _uninstall_request_check() -> None:
  from _pytest.fixtures import FixtureRequest
  original = _getfixturevalue.pop()
  if not _getfixturevalue:
    FixtureRequest.getfixturevalue = original


def pytest_configure(config):
  GUARD.install()
  _install_request_check()
  config.stash[_ran_integration] = False


def pytest_unconfigure(config):
  GUARD.uninstall()
  _uninstall_request_check()


_ran_integration = pytest.StashKey[bool]()
_entry = pytest.StashKey[Dict[str, Any]]()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Tests that use a service fixture are integration tests (before ``-m`` selects)."""
  for item in items:
    if SERVICE_FIXTURES & set(getattr(item, 'fixturenames', ())) and not item.get_closest_marker(
        INTEGRATION):
      item.add_marker(INTEGRATION)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  _current.append(item)
  if tier_of(item) == INTEGRATION:
    item.config.stash[_ran_integration] = True
  try:
    yield
  finally:
    _current.pop()


def _guarded_phase(item):
  """Arms the guard around a phase of a test outside the integration tier (and opens it
  around an integration test's)."""
  entry = GUARD.arm(item.nodeid, open=tier_of(item) == INTEGRATION)
  item.stash[_entry] = entry
  return entry


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
  entry = _guarded_phase(item)
  try:
    yield
  finally:
    GUARD.disarm(entry)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
  entry = _guarded_phase(item)
  try:
    yield
  finally:
    GUARD.disarm(entry)

# (Teardown is not guarded: the last test of a module or session tears down the module's and
# the session's fixtures, which may be an integration test's Kafka broker.)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """A process start that something caught still fails the test."""
  outcome = yield
  report = outcome.get_result()
  entry = item.stash.get(_entry, None)
  if entry is None or entry['open'] or call.when not in ('setup', 'call') or not entry['attempts']:
    return
  attempts = list(entry['attempts'])
  entry['attempts'].clear()
  if report.failed and call.excinfo is not None and call.excinfo.errisinstance(ProcessStarted):
    return  # already failed, saying so
  report.outcome = 'failed'
  report.longrepr = (f'{item.nodeid} is in the {tier_of(item)} tier, which starts no process, '
                     f'but it tried to (and something caught the error): {"; ".join(attempts)}. '
                     'Mark it @pytest.mark.integration, or keep it in this process.')


@pytest.hookimpl(trylast=True)  # after pytest-xdist's controller has stopped its workers
def pytest_sessionfinish(session, exitstatus):
  """A session that ran no integration test leaves pytest's process without children.

  Under pytest-xdist (``make test-fast`` runs on every core) each worker is such a session
  and checks itself; the controller runs no test and checks once its workers are gone."""
  if session.config.stash.get(_ran_integration, True) or not session.testscollected:
    return
  children = child_processes()
  if children:
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    reporter = session.config.pluginmanager.get_plugin('terminalreporter')
    message = (f'the fast/cli tiers must start no process, but pytest has child processes: '
               f'{children}')
    if reporter is not None:
      reporter.write_line(message, red=True)
