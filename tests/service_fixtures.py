"""Session-wide Kafka and Flink for integration tests: ``kafka`` and ``flink_cluster``,
Beam's IO expansion services (``expansion_services``, which ``kafka`` brings along) and
Beam's Flink job server (``flink_job_server``, which every integration test brings along:
``tests/conftest.py``).

``tests/conftest.py`` registers them for every test module: ask for them by name and
mark the tests ``@pytest.mark.integration``. (Do not import them into a test module as
well: that would make a second fixture, and a second broker or cluster, per session.)

Each fixture starts its service through the project's own scripts
(``scripts/kafka.sh``, ``scripts/flink.sh``, via :mod:`pipelines.services`) once
per test session and stops it at the end. If ``run.py services up`` already runs
the service on its default ports, the fixture uses it and leaves it running.
Otherwise it starts a private instance on free ports in a temporary state
directory, so concurrent test runs in one checkout cannot collide. A service that
cannot start FAILS the tests that need it; it never skips them.

While ``expansion_services`` runs, every pipeline the session builds, in pytest's
process or in a ``run.py`` child, expands its Kafka IO on those two running services
(``SOURCEBEAM_EXPANSION_SERVICE`` and ``SOURCEBEAM_FLINK_EXPANSION_SERVICE`` in the
environment) instead of starting and warming up a JVM for each pipeline; while
``flink_job_server`` runs, every FlinkRunner pipeline is submitted to it
(``SOURCEBEAM_FLINK_JOB_SERVER``) instead of starting a job server of its own.

Helpers for tests: :func:`create_topic`, :func:`produce`, :func:`consume` and
:func:`consume_all` use
Kafka's own command-line tools (through ``scripts/kafka.sh``), independent of Beam,
so a test can feed a pipeline and check what it wrote without trusting Beam's IO
on both ends. :func:`flink_jobs` reads the cluster's REST API.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from typing import Dict, Iterable, List, Optional, Tuple

import pytest

from sourcebeam.pipelines import services
from sourcebeam.pipelines.cli import DataError
from sourcebeam.pipelines.live_stack import free_port  # noqa: F401 (the one free-port helper; tests import it from here)


def _private_ports() -> services.Ports:
  return services.Ports(kafka=free_port(), kafka_controller=free_port(),
                        flink_rest=free_port(), flink_rpc=free_port(),
                        expansion=free_port(), flink_expansion=free_port(),
                        job_server=free_port())


def _service(name: str, tmp_path_factory) -> Tuple[services.Ports, str, bool]:
  """(ports, state dir, started here) of a healthy ``name``; fails the test if it cannot start."""
  default = services.Ports()
  if services.status(name, default).healthy:
    return default, services.DEFAULT_STATE_DIR, False
  ports = _private_ports()
  state_dir = str(tmp_path_factory.mktemp(f'{name}-state'))
  try:
    services.start(name, ports, state_dir)
  except (DataError, subprocess.TimeoutExpired, OSError) as e:
    services.stop(name, ports, state_dir)  # whatever half-started
    pytest.fail(f'{name} could not start through scripts/{name}.sh: {e} '
                f'(logs under {state_dir}; run scripts/install_tools.sh first)', pytrace=False)
  return ports, state_dir, True


def _named_in_environment(service: str, env_of, tmp_path_factory) -> Iterable[Dict[str, str]]:
  """A running ``service``, named in ``os.environ`` for the session (and every process it
  starts) by ``env_of(ports)``: yields the variables and their ``HOST:PORT`` values."""
  ports, state_dir, started = _service(service, tmp_path_factory)
  named = env_of(ports)
  with pytest.MonkeyPatch.context() as env:
    for name, value in named.items():
      env.setenv(name, value)
    yield named
  if started:
    services.stop(service, ports, state_dir)


@pytest.fixture(scope='session')
def expansion_services(tmp_path_factory) -> Iterable[Dict[str, str]]:
  """The running IO expansion services, named in the environment for the session."""
  yield from _named_in_environment('expansion', services.Ports.expansion_env, tmp_path_factory)


@pytest.fixture(scope='session')
def flink_job_server(tmp_path_factory) -> Iterable[Dict[str, str]]:
  """The running Flink job server, named in the environment for the session."""
  yield from _named_in_environment('jobserver', services.Ports.job_server_env, tmp_path_factory)


@pytest.fixture(scope='session')
def kafka(tmp_path_factory, expansion_services) -> Iterable[str]:
  """Bootstrap servers (``127.0.0.1:PORT``) of a running single-node KRaft Kafka broker
  (and the expansion services every pipeline with Kafka IO expands on)."""
  ports, state_dir, started = _service('kafka', tmp_path_factory)
  yield f'127.0.0.1:{ports.kafka}'
  if started:
    services.stop('kafka', ports, state_dir)


@pytest.fixture(scope='session')
def flink_cluster(tmp_path_factory) -> Iterable[str]:
  """``localhost:PORT`` of a running standalone Flink cluster (1 TaskManager, 2 slots)."""
  ports, state_dir, started = _service('flink', tmp_path_factory)
  yield f'localhost:{ports.flink_rest}'
  if started:
    services.stop('flink', ports, state_dir)


# --- Kafka's command-line tools --------------------------------------------------

def _kafka_tool(bootstrap: str, args: List[str], stdin: Optional[str] = None,
                keyed: bool = False, timeout: float = 120) -> str:
  port = bootstrap.rsplit(':', 1)[1]
  env = services.script_env(services.Ports(kafka=int(port)))
  if keyed:
    env['KEYED'] = '1'
  result = subprocess.run([os.path.join(services.SCRIPTS, 'kafka.sh')] + args,
                          input=stdin, env=env, capture_output=True, text=True, timeout=timeout)
  if result.returncode != 0:
    raise AssertionError(f'kafka.sh {" ".join(args)} failed ({result.returncode}): {result.stderr[-2000:]}')
  return result.stdout


def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
  """Creates ``topic`` (if it does not exist) with ``partitions`` partitions."""
  _kafka_tool(bootstrap, ['topic', topic, str(partitions)])


def produce(bootstrap: str, topic: str, records: Iterable[Tuple[str, str]]) -> None:
  """Writes ``(key, value)`` string records to ``topic`` (acks=all), in order."""
  lines = []
  for key, value in records:
    if '\t' in key or '\n' in key or '\n' in value:
      raise ValueError('keys may not hold tabs or newlines, values no newlines')
    lines.append(f'{key}\t{value}\n')
  _kafka_tool(bootstrap, ['produce', topic], stdin=''.join(lines), keyed=True)


def consume(bootstrap: str, topic: str, n: int, timeout_ms: int = 30000) -> List[Tuple[str, str]]:
  """Reads up to ``n`` ``(key, value)`` records of ``topic`` from the beginning."""
  out = _kafka_tool(bootstrap, ['consume', topic, str(n), str(timeout_ms)],
                    timeout=timeout_ms / 1000 + 60)
  records = []
  for line in out.splitlines():
    key, _, value = line.partition('\t')
    records.append((key, value))
  return records


def end_offsets(bootstrap: str, topic: str) -> Dict[int, int]:
  """Each partition's end offset (Kafka's GetOffsetShell): how many records the topic holds,
  for a topic written without transactions."""
  out = _kafka_tool(bootstrap, ['offsets', topic])
  offsets = {}
  for line in out.splitlines():
    _, partition, offset = line.rsplit(':', 2)
    offsets[int(partition)] = int(offset)
  return offsets


def consume_all(bootstrap: str, topic: str, timeout_ms: int = 30000) -> List[Tuple[str, str]]:
  """Every record the topic holds now, read from the beginning: as many as its end offsets
  say, so the read ends when it has them (no idle timeout to wait out)."""
  held = sum(end_offsets(bootstrap, topic).values())
  return consume(bootstrap, topic, held, timeout_ms) if held else []


# --- Flink's REST API ----------------------------------------------------------------

def flink_rest(flink_master: str, path: str) -> dict:
  with urllib.request.urlopen(f'http://{flink_master}{path}', timeout=10) as r:
    return json.loads(r.read())


def flink_jobs(flink_master: str) -> List[dict]:
  """The cluster's jobs (``jid``, ``name``, ``state``...) from ``/jobs/overview``."""
  return flink_rest(flink_master, '/jobs/overview')['jobs']


def flink_cancel(flink_master: str, job_name_prefix: str) -> List[str]:
  """Cancels the cluster's running jobs whose name starts with ``job_name_prefix``.

  Why: cancelling a streaming Beam job from Python ends the job server's invocation
  but leaves the job running on a standalone cluster (Beam 2.70 job server)."""
  cancelled = []
  for job in flink_jobs(flink_master):
    if job['name'].startswith(job_name_prefix) and job['state'] not in ('FINISHED', 'FAILED', 'CANCELED'):
      req = urllib.request.Request(f'http://{flink_master}/jobs/{job["jid"]}?mode=cancel', method='PATCH')
      urllib.request.urlopen(req, timeout=10).close()
      cancelled.append(job['jid'])
  return cancelled
