"""Session-wide fixtures: the storage services ``s3_service`` and ``gcs_service``, and
``sample_day``, the demo's sample day through the main job (built once, read by many).

Each starts a real server on loopback once per test session (moto's S3 server,
gcp-storage-emulator), points Beam at it through the environment that
:mod:`pipelines.storage` reads, and stops it at the end. A service that cannot
start fails the tests that need it; it never skips them.
"""

import pathlib
from typing import Any, NamedTuple

import pytest

from tests.storage_services import GcsServer, S3Server, ServiceError, StorageService


def _start(server) -> StorageService:
  try:
    return server.start()
  except ServiceError as e:
    pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope='session')
def s3_service():
  """A running S3-compatible endpoint (moto) with a bucket: ``.url(...)`` gives ``s3://`` paths."""
  server = S3Server()
  service = _start(server)
  yield service
  server.stop()


@pytest.fixture(scope='session')
def gcs_service():
  """A running GCS emulator with a bucket: ``.url(...)`` gives ``gs://`` paths."""
  server = GcsServer()
  service = _start(server)
  yield service
  server.stop()


@pytest.fixture(scope='session')
def sample_day(tmp_path_factory):
  """The demo's sample day through the main job (`run.py --out DIR`, small sizes), once per
  session, in process: generated, published (with dead letters), archived and replayed.
  ``.out`` is the main job's output folder, ``.archive`` its published archive, ``.proc`` the
  command's (returncode, stdout, stderr). Tests only read it: copy what you would change."""
  from tests.cli import run_cli
  out = tmp_path_factory.mktemp('sample-day') / 'out'
  proc = run_cli('--out', str(out), *SAMPLE_DAY_SIZES)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return SampleDay(out, out / 'archive', proc)


SAMPLE_DAY_SIZES = ['--events', '1500', '--taxi-rides', '200', '--rider-trips', '4']


class SampleDay(NamedTuple):
  out: pathlib.Path
  archive: pathlib.Path
  proc: Any


# Service fixtures are registered here, once, so a session-scoped service starts once per
# run whichever modules use it (a fixture imported into several modules is one fixture
# per module to pytest, and would start its service again).
from tests.db_fixtures import pg_dsn, postgres  # noqa: E402,F401
from tests.service_fixtures import (expansion_services, flink_cluster, flink_job_server,  # noqa: E402,F401
                                    kafka)


@pytest.fixture(autouse=True)
def _flink_pipelines_on_one_job_server(request):
  """Integration tests submit every FlinkRunner pipeline (in pytest's process or in a
  ``run.py`` child) to one running Flink job server, started once per session: a job server
  of each pipeline's own cost a JVM start and a cold Flink, ~6 s of each Flink pipeline
  (README's test figures)."""
  if request.node.get_closest_marker('integration'):
    request.getfixturevalue('flink_job_server')


# Pipelines built in pytest's process (TestPipeline, the in-process CLI) inspect each DoFn's
# state and timer specs once, as every command does (pipelines/runners.py).
from sourcebeam.pipelines.worker_tuning import remembered_dofn_specs  # noqa: E402

remembered_dofn_specs()
