"""`run.py services` and the scripts behind it: the local stack comes up healthy, answers
real clients, reports its status, and goes down without leaving processes behind.

Services run on free ports in a private state directory so this test cannot collide
with a stack a developer (or another test run) has up on the default ports.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import uuid

import pytest

from sourcebeam.pipelines import runners, services
from tests.cli import run_cli as in_process, run_py
from tests.demo import ROOT
from tests.polling import wait_until
from tests.service_fixtures import (consume, create_topic, end_offsets, flink_rest, free_port,
                                    produce)


def run_cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
  """`run.py services ARGS` as a process of its own: the command runs scripts/kafka.sh and
  scripts/flink.sh, child processes that write to its stderr and start the services."""
  return subprocess.run(run_py('services', *args), capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)


def pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie still answers kill 0; it is gone for our purposes.
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split(')')[-1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def port_open(port: int) -> bool:
  with socket.socket() as s:
    s.settimeout(1)
    return s.connect_ex(('127.0.0.1', port)) == 0


@pytest.mark.integration  # needs scripts/install_tools.sh's binaries
def test_install_tools_is_idempotent():
  result = subprocess.run([os.path.join(ROOT, 'scripts', 'install_tools.sh')],
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  # Everything was installed by `make tools` before the tests: this run only checks.
  for part in ('prism v2.77.0', 'flink 1.19.0 distribution', 'maven kafka-broker',
               'maven io-expansion-service', 'flink expansion launcher', 'maven flink-job-server'):
    assert f'{part}: present' in result.stderr, result.stderr
  assert os.access(runners.PRISM_BIN, os.X_OK)
  assert runners.flink_job_server_jar() and runners.io_expansion_jar()


@pytest.mark.integration  # needs scripts/install_tools.sh's binaries
def test_kafka_refuses_a_busy_port_with_a_clear_message(tmp_path):
  with socket.socket() as busy:
    busy.bind(('127.0.0.1', 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    result = run_cli('up', 'kafka', f'--kafka-port={port}', f'--kafka-controller-port={free_port()}',
                     f'--state-dir={tmp_path}', timeout=120)
  assert result.returncode == 1
  assert f'port {port} is already in use' in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'kafka' / 'kafka.pid')


@pytest.mark.cli
def test_unknown_action_is_a_usage_error():
  result = in_process('services', 'restart')
  assert result.returncode == 2
  assert 'invalid choice' in result.stderr and 'Traceback' not in result.stderr


@pytest.mark.integration
def test_services_up_status_down(tmp_path):
  ports = services.Ports(kafka=free_port(), kafka_controller=free_port(),
                         flink_rest=free_port(), flink_rpc=free_port(),
                         expansion=free_port(), flink_expansion=free_port(),
                         job_server=free_port())
  port_args = [f'--kafka-port={ports.kafka}', f'--kafka-controller-port={ports.kafka_controller}',
               f'--flink-port={ports.flink_rest}', f'--flink-rpc-port={ports.flink_rpc}',
               f'--expansion-port={ports.expansion}',
               f'--flink-expansion-port={ports.flink_expansion}',
               f'--job-server-port={ports.job_server}', f'--state-dir={tmp_path}']
  pids = []
  try:
    up = run_cli('up', *port_args)
    assert up.returncode == 0, up.stderr[-4000:]
    assert f'127.0.0.1:{ports.kafka}' in up.stdout
    assert f'http://127.0.0.1:{ports.flink_rest}' in up.stdout
    assert (f'SOURCEBEAM_EXPANSION_SERVICE=127.0.0.1:{ports.expansion} '
            f'SOURCEBEAM_FLINK_EXPANSION_SERVICE=127.0.0.1:{ports.flink_expansion}') in up.stdout
    assert f'SOURCEBEAM_FLINK_JOB_SERVER=127.0.0.1:{ports.job_server}' in up.stdout

    status = run_cli('status', *port_args, timeout=120)
    assert status.returncode == 0, status.stderr
    kafka_line = next(l for l in status.stdout.splitlines() if l.startswith('kafka:'))
    flink_line = next(l for l in status.stdout.splitlines() if l.startswith('flink:'))
    assert 'health=ok' in kafka_line and f'bootstrap=127.0.0.1:{ports.kafka}' in kafka_line
    assert 'health=ok' in flink_line and f'web=http://127.0.0.1:{ports.flink_rest}' in flink_line
    expansion_lines = [l for l in status.stdout.splitlines() if l.startswith('expansion')]
    assert len(expansion_lines) == 2 and all('health=ok' in l for l in expansion_lines)
    assert f'address=127.0.0.1:{ports.flink_expansion}' in expansion_lines[1]
    job_server_line = next(l for l in status.stdout.splitlines() if l.startswith('jobserver:'))
    assert 'health=ok' in job_server_line
    assert f'address=127.0.0.1:{ports.job_server}' in job_server_line
    pids = [int(p) for p in re.findall(r'pid=(\d+)', '\n'.join(
        [kafka_line, flink_line, job_server_line] + expansion_lines))]
    # The broker, the JobManager, the TaskManager, the job server, the two expansion services.
    assert len(pids) == 6 and all(pid_alive(p) for p in pids)

    # Real clients: a metadata round trip and records through the broker ...
    bootstrap = f'127.0.0.1:{ports.kafka}'
    topic = f'status-{uuid.uuid4().hex[:8]}'
    create_topic(bootstrap, topic, partitions=2)
    produce(bootstrap, topic, [('k1', 'hello'), ('k2', 'world')])
    assert sorted(consume(bootstrap, topic, 2)) == [('k1', 'hello'), ('k2', 'world')]
    offsets = end_offsets(bootstrap, topic)  # both partitions, two records between them
    assert set(offsets) == {0, 1} and sum(offsets.values()) == 2
    # ... and the JobManager's REST API sees one TaskManager with two free slots.
    overview = flink_rest(f'localhost:{ports.flink_rest}', '/overview')
    assert overview['taskmanagers'] == 1
    assert overview['slots-total'] == 2 and overview['slots-available'] == 2
    assert overview['flink-version'] == '1.19.0'
    # ... and each expansion service expands a Kafka read (Beam's own client, the gRPC
    # round trip a pipeline makes): KafkaIO's transforms come back with a Java environment
    # of (embedded, the service's loopback worker), which Flink and Prism each can run.
    import apache_beam as beam
    from apache_beam.io.kafka import ReadFromKafka
    for port in (ports.expansion, ports.flink_expansion):
      p = beam.Pipeline()
      _ = p | f'Read {port}' >> ReadFromKafka({'bootstrap.servers': bootstrap}, [topic],
                                              expansion_service=f'127.0.0.1:{port}')
      proto = p.to_runner_api()
      assert any('KafkaIO' in t.unique_name for t in proto.components.transforms.values())
      assert 'beam:env:anyof:v1' in {e.urn for e in proto.components.environments.values()}

    # ... and the job server answers Beam's job API (the call a FlinkRunner pipeline makes
    # first), with no job yet.
    import grpc
    from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc
    with grpc.insecure_channel(f'127.0.0.1:{ports.job_server}') as channel:
      jobs = beam_job_api_pb2_grpc.JobServiceStub(channel).GetJobs(
          beam_job_api_pb2.GetJobsRequest(), timeout=30)
    assert list(jobs.job_info) == []

    # `up` again is a no-op on a healthy stack.
    again = run_cli('up', *port_args)
    assert again.returncode == 0 and 'already running' in again.stderr
  finally:
    down = run_cli('down', *port_args, timeout=200)
  assert down.returncode == 0, down.stderr
  wait_until(lambda: not any(pid_alive(p) for p in pids), 30,
             'the services\' processes to end after `services down`', interval=0.5)
  assert not any(pid_alive(p) for p in pids), 'a service process outlived `services down`'
  assert not any(port_open(p) for p in (ports.kafka, ports.flink_rest, ports.expansion,
                                        ports.flink_expansion, ports.job_server))
  after = run_cli('status', *port_args, timeout=60)
  assert 'kafka: stopped' in after.stdout and 'flink: stopped' in after.stdout
  assert 'expansion: stopped' in after.stdout and 'expansion-flink: stopped' in after.stdout
  assert 'jobserver: stopped' in after.stdout
