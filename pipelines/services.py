"""`run.py services up|down|status [kafka|flink|expansion|jobserver|all]`: the local stack, one command.

Kafka (a KRaft broker), Flink (a standalone JobManager + TaskManager), Beam's
Java IO expansion services and Beam's Flink job server (both kept running, so a
pipeline with Kafka IO, or on FlinkRunner, does not start and warm up a JVM of
its own) are started and stopped by ``scripts/kafka.sh``, ``scripts/flink.sh``,
``scripts/expansion.sh`` and ``scripts/jobserver.sh``; this module
only chooses ports and the state directory and calls them, so the command line,
the test fixtures (``tests/service_fixtures.py``) and CI all start the services
the same way. Their binaries come from ``scripts/install_tools.sh``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from typing import Dict, List

from sourcebeam.pipelines import runners
from sourcebeam.pipelines.cli import DataError, UsageError

SCRIPTS = os.path.join(runners.ROOT, 'scripts')
DEFAULT_STATE_DIR = os.path.join(runners.TOOLS_DIR, 'services')
SERVICES = ('kafka', 'flink', 'expansion', 'jobserver')


@dataclasses.dataclass
class Ports:
  """Where the services listen; every port is on 127.0.0.1."""
  kafka: int = 9092
  kafka_controller: int = 9093
  flink_rest: int = 8081
  flink_rpc: int = 6123
  expansion: int = 8097
  flink_expansion: int = 8098
  job_server: int = 8099

  def env(self) -> Dict[str, str]:
    return {
        'KAFKA_PORT': str(self.kafka),
        'KAFKA_CONTROLLER_PORT': str(self.kafka_controller),
        'FLINK_REST_PORT': str(self.flink_rest),
        'FLINK_RPC_PORT': str(self.flink_rpc),
        'EXPANSION_PORT': str(self.expansion),
        'FLINK_EXPANSION_PORT': str(self.flink_expansion),
        'JOB_SERVER_PORT': str(self.job_server),
    }

  def expansion_env(self) -> Dict[str, str]:
    """The environment that points every pipeline's Kafka IO at the running expansion services."""
    return {runners.EXPANSION_SERVICE_ENV: f'127.0.0.1:{self.expansion}',
            runners.FLINK_EXPANSION_SERVICE_ENV: f'127.0.0.1:{self.flink_expansion}'}

  def job_server_env(self) -> Dict[str, str]:
    """The environment that sends every FlinkRunner pipeline to the running job server."""
    return {runners.FLINK_JOB_SERVER_ENV: f'127.0.0.1:{self.job_server}'}


def script_env(ports: Ports, state_dir: str = DEFAULT_STATE_DIR) -> Dict[str, str]:
  env = dict(os.environ)
  env.update(ports.env())
  env['SOURCEBEAM_STATE_DIR'] = state_dir
  return env


def run_script(service: str, action: str, ports: Ports, state_dir: str = DEFAULT_STATE_DIR,
               capture: bool = False, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs ``scripts/<service>.sh <action>``; its progress lines go to our stderr."""
  if service not in SERVICES:
    raise UsageError(f'unknown service {service!r}: choose from {", ".join(SERVICES)}')
  return subprocess.run(
      [os.path.join(SCRIPTS, f'{service}.sh'), action], env=script_env(ports, state_dir),
      stdout=subprocess.PIPE if capture else None, text=True, timeout=timeout, check=False)


def start(service: str, ports: Ports, state_dir: str = DEFAULT_STATE_DIR) -> None:
  result = run_script(service, 'start', ports, state_dir)
  if result.returncode != 0:
    raise DataError(f'{service} did not start (exit {result.returncode}); see the messages above')


def stop(service: str, ports: Ports, state_dir: str = DEFAULT_STATE_DIR) -> None:
  run_script(service, 'stop', ports, state_dir)


def status(service: str, ports: Ports, state_dir: str = DEFAULT_STATE_DIR) -> 'Status':
  result = run_script(service, 'status', ports, state_dir, capture=True, timeout=60)
  return Status(service, result.returncode, (result.stdout or '').strip())


@dataclasses.dataclass
class Status:
  service: str
  code: int  # 0 healthy, 1 running but unhealthy, 3 stopped
  line: str

  @property
  def healthy(self) -> bool:
    return self.code == 0

  @property
  def running(self) -> bool:
    return self.code in (0, 1)


def tools_line() -> str:
  """Which binaries from scripts/install_tools.sh are present."""
  have = {
      'prism': runners.prism_binary(),
      'flink-job-server': runners.flink_job_server_jar(),
      'io-expansion-service': runners.io_expansion_jar(),
      'kafka-jars': os.path.isdir(os.path.join(runners.JARS_DIR, 'kafka')) or None,
  }
  return 'tools: ' + ' '.join(f'{k}={"ok" if v else "missing"}' for k, v in have.items())


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('action', choices=('up', 'down', 'status'),
                      help='up: start (and wait until healthy); down: stop; status: pid, ports, health')
  parser.add_argument('which', nargs='?', default='all', choices=SERVICES + ('all', ),
                      help='which service (default: all)')
  d = Ports()
  parser.add_argument('--kafka-port', type=int, default=d.kafka,
                      help=f'Kafka bootstrap port on 127.0.0.1 (default {d.kafka})')
  parser.add_argument('--kafka-controller-port', type=int, default=d.kafka_controller,
                      help=f'Kafka KRaft controller port (default {d.kafka_controller})')
  parser.add_argument('--flink-port', type=int, default=d.flink_rest,
                      help=f'Flink REST API and web UI port (default {d.flink_rest})')
  parser.add_argument('--flink-rpc-port', type=int, default=d.flink_rpc,
                      help=f'Flink JobManager RPC port (default {d.flink_rpc})')
  parser.add_argument('--expansion-port', type=int, default=d.expansion,
                      help=f'the IO expansion service for Prism and the DirectRunner (default '
                           f'{d.expansion})')
  parser.add_argument('--flink-expansion-port', type=int, default=d.flink_expansion,
                      help=f'the IO expansion service for Flink (default {d.flink_expansion})')
  parser.add_argument('--job-server-port', type=int, default=d.job_server,
                      help=f"Beam's Flink job server (default {d.job_server})")
  parser.add_argument('--state-dir', default=DEFAULT_STATE_DIR,
                      help='where the services keep data, logs and pid files (default .cache/services)')


def _export(env: Dict[str, str]) -> str:
  """The shell line that puts ``env`` in the environment of later commands."""
  return 'export ' + ' '.join(f'{k}={v}' for k, v in env.items())


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  if beam_args:
    raise UsageError(f'unknown arguments for services: {" ".join(beam_args)}')
  ports = Ports(args.kafka_port, args.kafka_controller_port, args.flink_port, args.flink_rpc_port,
                args.expansion_port, args.flink_expansion_port, args.job_server_port)
  which = list(SERVICES) if args.which == 'all' else [args.which]
  state_dir = os.path.abspath(args.state_dir)
  if args.action == 'up':
    for service in which:
      start(service, ports, state_dir)
    if 'kafka' in which:
      print(f'kafka: bootstrap servers 127.0.0.1:{ports.kafka}  (use --source kafka://127.0.0.1:{ports.kafka}/TOPIC)')
    if 'flink' in which:
      print(f'flink: web UI http://127.0.0.1:{ports.flink_rest}  '
            f'(use --runner=FlinkRunner --flink_master=localhost:{ports.flink_rest})')
    if 'expansion' in which:
      print(f'expansion: Kafka IO expands on 127.0.0.1:{ports.expansion} (Flink: '
            f'{ports.flink_expansion}) for pipelines started with  {_export(ports.expansion_env())}')
    if 'jobserver' in which:
      print(f'jobserver: FlinkRunner pipelines submit to 127.0.0.1:{ports.job_server} when '
            f'started with  {_export(ports.job_server_env())}')
    return 0
  if args.action == 'down':
    for service in reversed(which):
      stop(service, ports, state_dir)
    return 0
  print(tools_line())
  worst = 0
  for service in which:
    st = status(service, ports, state_dir)
    print(st.line or f'{service}: no status (exit {st.code})')
    if st.code == 1:
      worst = 1
  sys.stdout.flush()
  return worst
