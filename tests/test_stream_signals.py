"""Stopping a live `run.py stream` with SIGTERM stops what it started: its children, its job.

Beam runs the runner's job server (Prism here) and the Java expansion service for
Kafka as child processes of the command. A service manager or a user's `kill`
signals the command alone; it must exit with 143 and take its children with it.
"""

import os
import signal
import subprocess
import uuid

import pytest

from sourcebeam.pipelines import runners
from tests.cli import run_py
from tests.demo import ROOT
from tests.polling import wait_until
from tests.tiers import child_processes as children  # (pid, from /proc) -> {pid: name}


def alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().split(') ')[1][0] != 'Z'
  except OSError:
    return False


@pytest.mark.integration
def test_sigterm_stops_a_live_stream_and_its_children(kafka, tmp_path):
  from tests.service_fixtures import create_topic
  topic = f'signals-{uuid.uuid4().hex[:8]}'
  create_topic(kafka, topic)
  # A process of its own: the point is the signal, and the children it must take with it.
  # Without the session's running expansion services, so that it starts its own (a child).
  env = {k: v for k, v in os.environ.items()
         if k not in (runners.EXPANSION_SERVICE_ENV, runners.FLINK_EXPANSION_SERVICE_ENV)}
  proc = subprocess.Popen(run_py('stream', '--source', f'kafka://{kafka}/{topic}', '--out',
                                 str(tmp_path / 'out'), '--archive', str(tmp_path / 'archive'),
                                 '--runner=PrismRunner'),
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  started = {}
  try:
    def runner_and_expansion_service():
      started.update(children(proc.pid))
      return {'prism', 'java'} <= set(started.values())
    wait_until(runner_and_expansion_service, 300, 'Prism and the Java expansion service',
               interval=0.5, proc=proc, describe=lambda: f'children: {started}')
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert {'prism', 'java'} <= set(started.values()), started
    # The job runs on Prism: its first bundle wrote the archive's manifest.
    wait_until((tmp_path / 'archive' / '_archive.json').exists, 300,
               'the job to start on Prism (the archive manifest its first bundle writes)',
               proc=proc)
    started.update(children(proc.pid))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert 'terminated' in err.splitlines(), err[-3000:]
    wait_until(lambda: not any(alive(p) for p in started), 30, 'the children to end',
               interval=0.5, describe=lambda: f'alive: {[started[p] for p in started if alive(p)]}')
    assert not [started[p] for p in started if alive(p)], 'children outlived the command'
  finally:
    if proc.poll() is None:
      proc.kill()
    for p in started:
      if alive(p):
        os.kill(p, signal.SIGKILL)


def _jobs(endpoint: str):
  """{job id: state name} of the job server at ``endpoint`` (Beam's job API)."""
  import grpc
  from apache_beam.portability.api import beam_job_api_pb2, beam_job_api_pb2_grpc
  with grpc.insecure_channel(endpoint) as channel:
    infos = beam_job_api_pb2_grpc.JobServiceStub(channel).GetJobs(
        beam_job_api_pb2.GetJobsRequest(), timeout=30).job_info
  return {j.job_id: beam_job_api_pb2.JobState.Enum.Name(j.state) for j in infos}


@pytest.mark.integration
def test_sigterm_cancels_a_live_stream_on_the_running_flink_job_server(kafka, flink_job_server,
                                                                        tmp_path):
  """A job on a running job server does not end with the process that submitted it (no job
  server of its own dies with it): the stopped command cancels its job."""
  from tests.service_fixtures import create_topic
  endpoint = flink_job_server[runners.FLINK_JOB_SERVER_ENV]
  topic = f'signals-{uuid.uuid4().hex[:8]}'
  create_topic(kafka, topic)
  before = set(_jobs(endpoint))
  # A process of its own: the point is the signal.
  proc = subprocess.Popen(run_py('stream', '--source', f'kafka://{kafka}/{topic}', '--out',
                                 str(tmp_path / 'out'), '--runner=FlinkRunner',
                                 '--flink_master=[local]'),
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  mine = {}
  try:
    def running():
      mine.update({j: s for j, s in _jobs(endpoint).items() if j not in before})
      return 'RUNNING' in mine.values()
    wait_until(running, 300, 'the stream job to run on the job server', interval=0.5, proc=proc,
               describe=lambda: f'its jobs: {mine}')
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert 'Traceback' not in err, err[-3000:]

    def cancelled():
      mine.update({j: s for j, s in _jobs(endpoint).items() if j in mine})
      return set(mine.values()) == {'CANCELLED'}
    wait_until(cancelled, 60, 'the job to be cancelled', interval=0.5,
               describe=lambda: f'its jobs: {mine}')
  finally:
    if proc.poll() is None:
      proc.kill()
