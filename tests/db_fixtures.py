"""A session-wide PostgreSQL server for tests: the ``postgres`` fixture (and ``pg_dsn``).

Use it from a test module with ``from tests.db_fixtures import postgres, pg_dsn`` and
mark the tests ``@pytest.mark.integration``.

The server is started through the project's own script, ``scripts/postgres.sh``
(which installs PostgreSQL from Debian's packages if it is missing), once per
session, and stopped at the end. If ``scripts/postgres.sh start`` already runs one
on the default port and state directory, the fixture uses it and leaves it
running; otherwise it starts a private instance on a free port in a temporary
state directory (readable by the ``postgres`` OS user the server runs as). A
server that cannot start FAILS the tests that need it; it never skips them.

``pg_dsn`` gives each test its own fresh database on that server, dropped after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import urllib.parse
import uuid
from typing import Dict, Iterable, Optional

import pytest

from tests.demo import ROOT
from tests.service_fixtures import free_port

SCRIPT = os.path.join(ROOT, 'scripts', 'postgres.sh')


def _run(action: str, env: Dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run([SCRIPT, action], env=env, capture_output=True, text=True, timeout=timeout)


def _env(port: Optional[int] = None, state_dir: Optional[str] = None) -> Dict[str, str]:
  env = dict(os.environ)
  env.pop('PG_PORT', None)
  env.pop('SOURCEBEAM_STATE_DIR', None)
  if port is not None:
    env['PG_PORT'] = str(port)
  if state_dir is not None:
    env['SOURCEBEAM_STATE_DIR'] = state_dir
  return env


@pytest.fixture(scope='session')
def postgres() -> Iterable[str]:
  """The DSN (``postgresql://sourcebeam:...@127.0.0.1:PORT/sourcebeam``) of a running server."""
  default = _env()
  if _run('status', default, timeout=60).returncode == 0:
    yield _run('dsn', default, timeout=60).stdout.strip()
    return
  # A private instance. Under /tmp with mode 755: the server runs as the postgres user.
  state_dir = tempfile.mkdtemp(prefix='sourcebeam-pg-')
  os.chmod(state_dir, 0o755)
  env = _env(free_port(), state_dir)
  try:
    result = _run('start', env)
  except subprocess.TimeoutExpired as e:
    result = subprocess.CompletedProcess(e.cmd, 1, '', f'timed out after {e.timeout}s')
  if result.returncode != 0:
    _run('stop', env, timeout=60)
    pytest.fail(f'postgres could not start through scripts/postgres.sh: {result.stderr[-2000:]}',
                pytrace=False)
  try:
    yield _run('dsn', env, timeout=60).stdout.strip()
  finally:
    _run('stop', env, timeout=60)
    shutil.rmtree(state_dir, ignore_errors=True)


def _admin(dsn: str, sql: str) -> None:
  """Runs one statement outside a transaction (CREATE/DROP DATABASE need that)."""
  from sourcebeam.transforms.view_store import _connect_postgres
  conn = _connect_postgres(dsn)
  try:
    conn.autocommit = True
    conn.cursor().execute(sql)
  finally:
    conn.close()


@pytest.fixture
def pg_dsn(postgres: str) -> Iterable[str]:
  """A fresh database for one test on the session's server; dropped afterwards."""
  name = f't_{uuid.uuid4().hex[:12]}'  # generated here, never user input
  _admin(postgres, f'CREATE DATABASE {name}')
  u = urllib.parse.urlsplit(postgres)
  yield urllib.parse.urlunsplit((u.scheme, u.netloc, '/' + name, '', ''))
  _admin(postgres, f'DROP DATABASE IF EXISTS {name} WITH (FORCE)')
