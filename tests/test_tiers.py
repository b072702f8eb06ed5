"""The tiers' rules (tests/tiers.py), proved in the fast tier itself.

* Every way of starting a process fails a fast-tier test, here, in this very process.
* A fast-tier test that starts a process fails, even when it catches the error; an
  integration test may; a test that uses a service fixture is an integration test, so
  ``-m "not integration"`` never sets a service up; a test that asks for a service at run
  time without the mark fails before it starts; the in-process command line needs the
  ``cli`` (or ``integration``) mark. Each in a pytest session of its own, run in this
  process by pytester (no subprocess).
* A session of the fast tier ends with pytest's process childless (checked at the end of
  every such session by tests/tiers.py; here its helper reads this process's children).
"""

import asyncio
import multiprocessing
import os
import subprocess
import sys

import pytest

from tests import tiers
from tests.tiers import GUARD, ProcessStarted


def take_refusals():
  """This test's refused attempts, taken off the record (made on purpose: not a failure)."""
  entry = GUARD.armed
  assert entry is not None, 'the process guard is not armed in a fast-tier test'
  attempts = list(entry['attempts'])
  entry['attempts'].clear()
  return attempts


def _refused(start) -> None:
  with pytest.raises(ProcessStarted, match='not marked @pytest.mark.integration'):
    start()


def test_a_fast_test_can_start_no_process_in_any_way():
  before = tiers.child_processes()
  _refused(lambda: subprocess.run(['true']))
  _refused(lambda: subprocess.Popen([sys.executable, '-c', 'pass']))
  _refused(lambda: subprocess.check_output('echo hi', shell=True))
  _refused(lambda: os.system('true'))
  _refused(os.fork)
  _refused(lambda: os.posix_spawn('/bin/true', ['true'], dict(os.environ)))
  _refused(lambda: os.popen('true').read())
  for method in ('fork', 'spawn', 'forkserver'):
    _refused(lambda: multiprocessing.get_context(method).Process(target=print).start())

  async def via_asyncio():
    await asyncio.create_subprocess_exec('true')
  _refused(lambda: asyncio.run(via_asyncio()))
  attempts = take_refusals()
  assert len(attempts) >= 11, attempts
  assert 'fork_exec(true)' in attempts and 'system(true)' in attempts and 'fork()' in attempts
  assert tiers.child_processes() == before  # nothing started


def test_the_guard_is_armed_in_the_fast_tier_and_the_test_is_in_it(request):
  assert tiers.tier_of(request.node) == 'fast'
  assert GUARD.armed is not None and GUARD.armed['nodeid'] == request.node.nodeid


def test_child_processes_reads_the_process_tree():
  """(The session check's helper: pytest's parent has pytest as a child; pytest's own
  children are what the check looks at.)"""
  assert os.getpid() in tiers.child_processes(os.getppid())
  assert all(isinstance(pid, int) and name for pid, name in tiers.child_processes().items())


NESTED = '''
import subprocess

import pytest


@pytest.fixture(scope='session')
def kafka():
  raise AssertionError('the service fixture was set up')


@pytest.fixture
def topic(kafka):
  return 'a topic'


def test_starts_a_process():
  subprocess.run(['true'])


def test_starts_a_process_and_swallows_the_error():
  try:
    subprocess.run(['true'])
  except Exception:
    pass


def test_runs_the_command_line_unmarked():
  from tests.cli import run_cli
  run_cli('--help')


@pytest.mark.cli
def test_runs_the_command_line_marked_cli():
  from tests.cli import run_cli
  assert run_cli('--help').returncode == 0


def test_asks_for_a_service_at_run_time(request):
  request.getfixturevalue('kafka')


def test_uses_a_service_through_another_fixture(topic):
  pass


@pytest.mark.integration
def test_an_integration_test_may_start_processes():
  from tests.tiers import GUARD
  assert GUARD.armed is None


def test_plain_logic():
  assert 1 + 1 == 2
'''

INI = '''[pytest]
markers =
    cli: the command line in process
    integration: processes and services
'''


@pytest.fixture
def nested(pytester):
  pytester.makeini(INI)
  pytester.makepyfile(test_nested=NESTED)
  return pytester


def _outcomes(result):
  return {r.nodeid.split('::')[-1]: r.outcome for r in result.reprec.getreports('pytest_runtest_logreport')
          if r.when == 'call' or r.outcome != 'passed'}


NESTED_OUTCOMES = {
    'test_starts_a_process': 'failed',
    'test_starts_a_process_and_swallows_the_error': 'failed',
    'test_runs_the_command_line_unmarked': 'failed',
    'test_runs_the_command_line_marked_cli': 'passed',
    'test_asks_for_a_service_at_run_time': 'failed',
    'test_uses_a_service_through_another_fixture': 'failed',  # integration, kafka set up
    'test_an_integration_test_may_start_processes': 'passed',
    'test_plain_logic': 'passed',
}


def test_the_rules_in_a_session_of_their_own(nested):
  result = nested.runpytest_inprocess('-p', 'tests.tiers', '-p', 'no:cacheprovider')
  outcomes = _outcomes(result)
  assert outcomes == NESTED_OUTCOMES, outcomes
  text = result.stdout.str()
  assert 'started a process (fork_exec(true))' in text
  assert 'tried to (and something caught the error): fork_exec(true)' in text
  assert 'marked neither @pytest.mark.cli nor @pytest.mark.integration' in text
  assert "uses the service fixture 'kafka' (through request.getfixturevalue)" in text
  assert 'the service fixture was set up' in text  # only by the auto-marked integration test


def test_the_fast_tier_sets_up_no_service(nested):
  """``-m "not integration"``: the test that needs Kafka through a fixture is deselected."""
  result = nested.runpytest_inprocess('-p', 'tests.tiers', '-p', 'no:cacheprovider',
                                      '-m', 'not integration and not cli',
                                      '-k', 'not asks_for and not starts_a_process and not unmarked')
  assert _outcomes(result) == {'test_plain_logic': 'passed'}
  assert 'the service fixture was set up' not in result.stdout.str()
  result.assert_outcomes(passed=1, deselected=7)


@pytest.mark.integration  # a pytest session of its own, and its xdist workers, are processes
def test_the_rules_hold_in_every_xdist_worker(nested, monkeypatch):
  """The Makefile runs the fast and cli tiers on every core (``-n auto``): each worker arms its
  own guard, so the outcomes are those of one process, and the controller ends childless
  (its workers gone). In a process of its own, so no other test's children count."""
  from tests.demo import ROOT
  monkeypatch.setenv('PYTHONPATH', ROOT)
  result = nested.runpytest_subprocess('-p', 'tests.tiers', '-p', 'no:cacheprovider',
                                       '-n', '2', '--dist', 'worksteal', '-rA')
  outcomes = {}
  for line in result.stdout.lines:
    word, _, rest = line.partition(' test_nested.py::')
    if word in ('PASSED', 'FAILED', 'ERROR') and rest:
      outcomes[rest.split(' ')[0]] = 'passed' if word == 'PASSED' else 'failed'
  assert outcomes == NESTED_OUTCOMES, result.stdout.str()[-3000:]
  assert 'created: 2/2 workers' in result.stdout.str()
  assert 'pytest has child processes' not in result.stdout.str()
