"""Runner-specific options: what each Beam runner needs on this machine.

Everything here points Beam at binaries that ``scripts/install_tools.sh`` put
under ``.cache/``, because Beam's own downloads (Prism from GitHub, shaded jars
from Maven Central) are unreachable or not served here:

* PrismRunner gets ``--prism_location=.cache/bin/prism`` (built with ``go install``)
  and ``--experiments=prism_disable_sdf_split`` (so streaming KafkaIO works).
* FlinkRunner gets ``--flink_job_server_jar`` (Beam's Flink job server, shaded by
  ``scripts/maven/flink-job-server`` from ``beam-runners-flink-1.19:2.70.0``, the
  newest unshaded Flink runner served here), ``--flink_version=1.19`` (the Flink
  of that jar, and of the standalone cluster ``scripts/flink.sh`` runs) and
  ``--environment_type=LOOPBACK`` (the Python workers run in the submitting
  process: there is no Docker engine for Beam's SDK containers), and a capped
  job server heap. With ``SOURCEBEAM_FLINK_JOB_SERVER`` set (``HOST:PORT`` of the job
  server ``run.py services up jobserver`` keeps running) it gets ``--job_endpoint``
  instead of a job server of its own: no JVM start, and a Flink already warm
  (:func:`flink_job_server`). The job still runs where ``--flink_master`` says.
* Every local runner gets ``--beam_services`` pointing Beam's default IO
  expansion service at the local jar (whose launcher makes EMBEDDED the default
  Java environment), so a plain ``ReadFromKafka(...)`` never downloads and runs on
  Prism and Flink alike (for Flink, a launcher that also expands KafkaIO to the
  legacy unbounded read, the only one Beam 2.70's portable Flink runner can stream);
  :func:`kafka_expansion_service` gives the same service explicitly. With
  ``SOURCEBEAM_EXPANSION_SERVICE`` / ``SOURCEBEAM_FLINK_EXPANSION_SERVICE`` set
  (``HOST:PORT`` of the services ``run.py services up expansion`` keeps running),
  the pipeline expands there instead of starting the jar: no JVM start and warm-up
  per pipeline (:func:`io_expansion_service`).
* Remote runners that install Sourcebeam on their own workers get ``--setup_file``.
* DataflowRunner runs Java in Beam's Docker containers: its Kafka IO comes from the
  same local jar started with Docker as the default Java environment
  (:func:`kafka_io_service`), and a dry run must name a ``--temp_location`` (without
  one, Beam looks up a default bucket on GCS, which a dry run must not contact).

Options given explicitly on the command line always win.

A live view pipeline (``run.py stream --views`` without ``--max-records``: the
read-your-writes loop) also gets :func:`live_view_args`, which trade throughput for
latency on Flink (bundles of at most 10 ms, a 5 ms network buffer timeout, one
subtask per step for the one LOOPBACK Python worker); README's "Where a write's time
goes" has the measurements.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Dict, List, Optional

from sourcebeam.pipelines.cli import UsageError
from sourcebeam.pipelines.worker_tuning import (LOCAL_STATE_RUNNERS, cheap_global_windows,
                                                cheap_state_cache_weights,
                                                no_state_sampling_threads, pipelined_state_commits,
                                                quiet_worker_hangups, remembered_dofn_specs)

# The checkout (realpath: the library folders are reached through sourcebeam/'s links), or
# SOURCEBEAM_HOME: where scripts/, setup.py and the tools under .cache/ are.
ROOT = os.environ.get('SOURCEBEAM_HOME') or os.path.dirname(
    os.path.dirname(os.path.realpath(__file__)))
TOOLS_DIR = os.path.join(ROOT, '.cache')
PRISM_BIN = os.path.join(TOOLS_DIR, 'bin', 'prism')
JARS_DIR = os.path.join(TOOLS_DIR, 'jars')
# Java side versions: see scripts/install_tools.sh for why they differ from the Python SDK's.
BEAM_JAVA_VERSION = '2.70.0'
FLINK_VERSION = '1.19'
FLINK_JOB_SERVER_JAR = os.path.join(
    JARS_DIR, f'beam-runners-flink-{FLINK_VERSION}-job-server-{BEAM_JAVA_VERSION}.jar')
IO_EXPANSION_JAR = os.path.join(
    JARS_DIR, f'beam-sdks-java-io-expansion-service-{BEAM_JAVA_VERSION}.jar')
PRISM_OWN_SERVER = 'disable_prism_server_singleton'
# The same service started with --experiments=use_deprecated_read, for Flink (see
# scripts/maven/io-expansion-service/src/.../FlinkExpansionServiceMain.java).
IO_EXPANSION_FLINK_JAR = os.path.join(
    JARS_DIR, f'beam-sdks-java-io-expansion-service-{BEAM_JAVA_VERSION}-flink.jar')
# Running expansion services to use instead of starting the jars per pipeline (HOST:PORT).
EXPANSION_SERVICE_ENV = 'SOURCEBEAM_EXPANSION_SERVICE'
FLINK_EXPANSION_SERVICE_ENV = 'SOURCEBEAM_FLINK_EXPANSION_SERVICE'
FLINK_JOB_SERVER_ENV = 'SOURCEBEAM_FLINK_JOB_SERVER'
# The Gradle target Beam's Python SDK resolves for ReadFromKafka's default expansion service.
IO_EXPANSION_TARGET = 'sdks:java:io:expansion-service:shadowJar'
FLINK_RUNNERS = ('FlinkRunner', )
LOOPBACK = 'LOOPBACK'
JOB_SERVER_HEAP = '-Xmx1536m'
PRISM_NO_SDF_SPLIT = 'prism_disable_sdf_split'
DATAFLOW = 'DataflowRunner'


class ToolMissing(UsageError):
  """A binary from scripts/install_tools.sh is not there: one line saying how to get it."""


def has_option(args: List[str], name: str) -> bool:
  return any(a == name or a.startswith(name + '=') for a in args)


def option_value(args: List[str], name: str) -> Optional[str]:
  for i, a in enumerate(args):
    if a.startswith(name + '='):
      return a.split('=', 1)[1]
    if a == name and i + 1 < len(args):
      return args[i + 1]
  return None


def prism_binary() -> Optional[str]:
  """The Prism binary built by scripts/install_tools.sh (or found on PATH)."""
  if os.access(PRISM_BIN, os.X_OK):
    return PRISM_BIN
  return shutil.which('prism')


def flink_job_server_jar() -> Optional[str]:
  """The Beam Flink job server jar built by scripts/install_tools.sh, if present."""
  return FLINK_JOB_SERVER_JAR if os.path.isfile(FLINK_JOB_SERVER_JAR) else None


def io_expansion_jar(runner: Optional[str] = None) -> Optional[str]:
  """The Beam Java IO expansion service jar for ``runner``, if scripts/install_tools.sh built it."""
  jar = IO_EXPANSION_FLINK_JAR if runner in FLINK_RUNNERS else IO_EXPANSION_JAR
  return jar if os.path.isfile(jar) and os.path.isfile(IO_EXPANSION_JAR) else None


def io_expansion_service(runner: Optional[str] = None) -> Optional[str]:
  """What Kafka IO expands with for ``runner``: the running service the environment names
  (``HOST:PORT``, from ``run.py services up expansion``), else the jar, started for the
  pipeline (a JVM and its warm-up: 5-10 s of every pipeline with Kafka IO)."""
  name = FLINK_EXPANSION_SERVICE_ENV if runner in FLINK_RUNNERS else EXPANSION_SERVICE_ENV
  return _running_service(name, 'expansion') or io_expansion_jar(runner)


def flink_job_server() -> Optional[str]:
  """The running Flink job server the environment names (``HOST:PORT``, from ``run.py
  services up jobserver``), or None: each FlinkRunner pipeline then starts its own (a JVM,
  its warm-up and a cold Flink: 5-10 s of every Flink pipeline)."""
  return _running_service(FLINK_JOB_SERVER_ENV, 'jobserver')


def _running_service(name: str, service: str) -> Optional[str]:
  """``HOST:PORT`` from the environment variable ``name``, checked; None if unset."""
  running = os.environ.get(name)
  if not running:
    return None
  if not re.fullmatch(r'[A-Za-z0-9.-]+:\d+', running):
    raise UsageError(f'{name}={running!r}: it names a running {service} service as HOST:PORT '
                     f'(run.py services up {service} prints it)')
  return running


def _experiments(args: List[str]) -> List[str]:
  found = []
  for i, a in enumerate(args):
    if a.startswith('--experiments=') or a.startswith('--experiment='):
      found.extend(a.split('=', 1)[1].split(','))
    elif a in ('--experiments', '--experiment') and i + 1 < len(args):
      found.extend(args[i + 1].split(','))
  return found


def runner_of(args: List[str]) -> str:
  return (option_value(args, '--runner') or 'DirectRunner').split('.')[-1]


def _require(path: Optional[str], what: str) -> str:
  if not path:
    raise ToolMissing(f'{what} is missing: run scripts/install_tools.sh (or `make tools`)')
  return path


def runner_args(args: List[str]) -> List[str]:
  """``args`` plus what the chosen runner needs here."""
  args = list(args)
  runner = runner_of(args)
  remembered_dofn_specs()
  cheap_global_windows()
  if runner in LOCAL_STATE_RUNNERS:
    cheap_state_cache_weights()
    if (option_value(args, '--direct_running_mode') == 'multi_processing' and
        not has_option(args, '--max_cache_memory_usage_mb')):
      args.append('--max_cache_memory_usage_mb=0')
  if runner == 'PrismRunner':
    if not has_option(args, '--prism_location'):
      prism = prism_binary()
      if prism:
        args.append(f'--prism_location={prism}')
    if PRISM_NO_SDF_SPLIT not in _experiments(args):
      # Prism splits a waiting SDF bundle and starts another on the same Kafka
      # partition: KafkaIO then fails with "KafkaConsumer is not safe for
      # multi-threaded access" (apache/beam#35185). Prism's own switch turns it off.
      args.append(f'--experiments={PRISM_NO_SDF_SPLIT}')
    if PRISM_OWN_SERVER not in _experiments(args):
      # Beam shares one Prism job server per process, made with the options of the first
      # pipeline that asked for one. A DirectRunner pipeline asks first (without
      # --prism_location, so its server can only try GitHub) and poisons it for every
      # later PrismRunner pipeline in the process: give each its own server.
      args.append(f'--experiments={PRISM_OWN_SERVER}')
  if runner in FLINK_RUNNERS:
    running = None if has_option(args, '--job_endpoint') else flink_job_server()
    if running:
      args.append(f'--job_endpoint={running}')
    if not has_option(args, '--flink_version'):
      args.append(f'--flink_version={FLINK_VERSION}')
    if not has_option(args, '--environment_type'):
      args.append(f'--environment_type={LOOPBACK}')
    if (option_value(args, '--environment_type') or '').upper() == LOOPBACK:
      quiet_worker_hangups()
      cheap_state_cache_weights()  # the workers are this process: its state cache, if on
      pipelined_state_commits()
      no_state_sampling_threads()
    if not has_option(args, '--job_endpoint'):  # the pipeline starts its own job server
      if not has_option(args, '--flink_job_server_jar'):
        args.append('--flink_job_server_jar=' +
                    _require(flink_job_server_jar(), 'the Beam Flink job server jar'))
      if not has_option(args, '--job_server_jvm_properties') and not has_option(
          args, '--job_server_jvm_property'):
        # Beam keeps each pipeline's job server JVM until the Python process exits;
        # without a cap each may grow to a quarter of the machine's memory.
        args.append(f'--job_server_jvm_properties={JOB_SERVER_HEAP}')
  if runner == DATAFLOW and is_dry_run(args) and not (
      has_option(args, '--temp_location') or has_option(args, '--staging_location')):
    raise UsageError('a Dataflow dry run needs --temp_location=gs://BUCKET/tmp (nothing is '
                     'written there; without it Beam asks GCS for a default bucket)')
  if runner != DATAFLOW and not has_option(args, '--beam_services'):
    # (Dataflow's Java runs in Beam's Docker containers: see kafka_io_service.)
    service = io_expansion_service(runner)
    if service:
      args.append('--beam_services=' + json.dumps({IO_EXPANSION_TARGET: service}))
  # Workers that are not this process need Sourcebeam installed; LOOPBACK workers are us.
  remote_workers = runner == DATAFLOW or (
      runner in FLINK_RUNNERS + ('PortableRunner', ) and
      (option_value(args, '--environment_type') or '').upper() != LOOPBACK)
  if remote_workers and not has_option(args, '--setup_file'):
    args.append(f'--setup_file={os.path.join(ROOT, "setup.py")}')
  return args


# The command-line arguments that name files a pipeline's workers read or write.
WORKER_PATH_ARGS = ('input', 'out', 'archive', 'from_archive', 'rides', 'fares')


def check_worker_paths(beam_args: List[str], paths: Dict[str, Optional[str]]) -> None:
  """Dataflow's workers see cloud storage, not this machine: a local input would be missing
  there and a local output would be written to a worker's disk and lost, so a real Dataflow
  run refuses local paths (a dry run builds the job only, so any path will do)."""
  if runner_of(beam_args) != DATAFLOW or is_dry_run(beam_args):
    return
  for name, path in paths.items():
    if path and '://' not in path:
      flag = '--' + name.replace('_', '-')
      raise UsageError(f'{flag} {path} is a local path, which Dataflow workers cannot see: '
                       'use gs://BUCKET/...')


# --- the live view pipeline's latency settings -----------------------------------------------------

# Flink's portable runner closes a bundle after 1,000 elements or 1,000 ms, and a step's Python
# work reaches the next step only when its bundle closes: a lone write waited up to a second per
# keyed step. 10 ms bundles (the count stays 1,000: a burst is still cut into few bundles).
LIVE_BUNDLE_MS = 10
LIVE_BUNDLE_SIZE = 1000
# Flink sends a record to the next task when its network buffer is full or after this timeout
# (default 100 ms): the keyed exchange before the ordering waited for it.
LIVE_FLINK_CONF = {'execution.buffer-timeout': '5 ms'}
# Beam's Python SDK keeps no user state between bundles unless given a cache (its default is
# none): every state read of the ordering step was a gRPC round trip to Flink, which does hand
# out cache tokens. In-process (LOOPBACK) workers only, where cheap_state_cache_weights holds.
LIVE_STATE_CACHE_MB = 100
EMBEDDED_FLINK = ('[local]', '[auto]')


def flink_conf_dir(settings: Dict[str, str]) -> str:
  """A Flink configuration folder holding ``settings`` (a ``flink-conf.yaml``), for
  ``--flink_conf_dir``; made once per set of settings under the temporary folder."""
  text = ''.join(f'{k}: {v}\n' for k, v in sorted(settings.items()))
  folder = os.path.join(tempfile.gettempdir(),
                        'sourcebeam-flink-conf-' + hashlib.sha256(text.encode()).hexdigest()[:12])
  path = os.path.join(folder, 'flink-conf.yaml')
  try:
    with open(path) as f:
      if f.read() == text:
        return folder
  except OSError:
    pass
  os.makedirs(folder, exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)  # another process making the same folder writes the same text
  return folder


def live_view_args(args: List[str]) -> List[str]:
  """``args`` plus the latency settings of a live view pipeline, for the options not given.

  FlinkRunner: ``--max_bundle_time_mills`` 10 and ``--max_bundle_size`` 1,000, with LOOPBACK
  workers a 100 MB state cache (``--max_cache_memory_usage_mb``: the ordering step's state
  read from memory, not over gRPC, between bundles; at 1,000 ev/s p99 2.3 -> 1.0 s); on embedded
  Flink (``--flink_master`` ``[local]`` or ``[auto]``, the default) also a Flink configuration
  with a 5 ms network buffer timeout (``--flink_conf_dir``) and, with LOOPBACK workers (one
  Python process, so one interpreter lock for every subtask), ``--parallelism=1``: a second
  subtask per step only doubled the bundles. Other runners: unchanged (Prism's Kafka read holds
  a bundle for up to its poll timeout, a read option, ``stream --kafka-poll-timeout``; 1 s
  measured no better than KafkaIO's 2 s: README).
  """
  args = list(args)
  if runner_of(args) not in FLINK_RUNNERS:
    return args
  if not has_option(args, '--max_bundle_time_mills'):
    args.append(f'--max_bundle_time_mills={LIVE_BUNDLE_MS}')
  if not has_option(args, '--max_bundle_size'):
    args.append(f'--max_bundle_size={LIVE_BUNDLE_SIZE}')
  loopback = (option_value(args, '--environment_type') or LOOPBACK).upper() == LOOPBACK
  if loopback and not has_option(args, '--max_cache_memory_usage_mb'):
    args.append(f'--max_cache_memory_usage_mb={LIVE_STATE_CACHE_MB}')
  if (option_value(args, '--flink_master') or '[auto]') in EMBEDDED_FLINK:
    if not has_option(args, '--flink_conf_dir'):
      args.append(f'--flink_conf_dir={flink_conf_dir(LIVE_FLINK_CONF)}')
    if loopback and not has_option(args, '--parallelism'):
      args.append('--parallelism=1')
  return args


def is_dry_run(args: List[str]) -> bool:
  """True when the runner only builds the job (``--dry_run=True`` on the DataflowRunner)."""
  value = option_value(args, '--dry_run')
  return value is not None and value.lower() in ('true', '1', 'yes')


def kafka_io_service(options):
  """The expansion service a pipeline with these ``PipelineOptions`` gives ``ReadFromKafka``
  and ``WriteToKafka``: None (Beam's default, which ``--beam_services`` points at the local
  jar) except on Dataflow, whose Java workers are Beam's Java SDK containers: the local jar
  with Docker as the default Java environment (Beam's stock jar for this SDK version is not
  served here). The jar itself is what Dataflow stages for the Java workers."""
  from apache_beam.options.pipeline_options import StandardOptions
  if (options.view_as(StandardOptions).runner or '').split('.')[-1] != DATAFLOW:
    return None
  from apache_beam.transforms.external import JavaJarExpansionService
  jar = _require(io_expansion_jar(DATAFLOW), 'the Beam Java IO expansion service jar')
  return JavaJarExpansionService(jar, append_args=['--defaultEnvironmentType=DOCKER'])


def kafka_expansion_service(beam_args: Optional[List[str]] = None):
  """The expansion service for ``ReadFromKafka`` / ``WriteToKafka``: the local jar.

  Use it as ``ReadFromKafka(..., expansion_service=kafka_expansion_service(beam_args))``
  (a plain ``ReadFromKafka(...)`` gets the same jar through ``--beam_services``
  when its options come from :func:`runner_args`).
  Why not Beam's stock service: its jar is not served here, and its Java
  environment is Docker (no engine here) or, inside a pipeline, an ``anyOf`` that
  Prism resolves to the expansion service's loopback worker but the Flink job
  server resolves to Docker. With ``EMBEDDED`` as the default environment the
  ``anyOf`` is (embedded, loopback worker): Flink runs the Java half inside its
  TaskManagers (the job server jar carries KafkaIO and ships itself to the
  cluster) and Prism keeps using the loopback worker. Not for Dataflow: see
  :func:`kafka_io_service`.

  For FlinkRunner (from ``beam_args``) the service also expands KafkaIO to the
  legacy unbounded-source read: Beam 2.70's portable Flink runner cannot
  checkpoint KafkaIO's splittable read, so a streaming job would never emit.
  Prism cannot run the legacy read, so it gets the plain service.
  """
  from apache_beam.transforms.external import JavaJarExpansionService
  runner = runner_of(beam_args or [])
  jar = _require(io_expansion_service(runner), 'the Beam Java IO expansion service jar')
  return JavaJarExpansionService(jar, append_args=['--defaultEnvironmentType=EMBEDDED'])


def java_services(beam_args: Optional[List[str]] = None):
  """Context that keeps Java expansion services (and their loopback workers) alive,
  with Beam's default IO expansion service pointed at the local jar for the runner.

  ``with beam.Pipeline(options=pipeline_options(args)) as p`` does both itself. A
  pipeline started with ``p.run()`` and left running (a streaming run polled, then
  cancelled) must be built and run inside ``with java_services(args):``: otherwise
  a plain ``ReadFromKafka`` looks for Beam's stock jar (not served here), and the
  expansion service stops right after expansion, so on Prism the Java half of
  ``ReadFromKafka`` has no worker left.
  """
  import contextlib
  from apache_beam.utils.subprocess_server import JavaJarServer, SubprocessServer
  stack = contextlib.ExitStack()
  jar = io_expansion_service(runner_of(beam_args or []))
  if jar:
    stack.enter_context(JavaJarServer.beam_services({IO_EXPANSION_TARGET: jar}))
  stack.enter_context(SubprocessServer.cache_subprocesses())
  return stack
