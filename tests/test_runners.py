"""The same pipeline on every runner: Prism, Flink embedded, a standalone Flink cluster,
Kafka in and out through Beam's cross-language IO, and a Dataflow job built by dry run.

The pipeline is a small event-sourcing shape: timestamped events per key, a stateful
DoFn that buffers them and releases a per-key total from an event-time timer, written
to files. Expected outputs are computed in plain Python from the same events.
Options go through :func:`pipelines.options.pipeline_options`, the project's one path
to Beam, so these tests check what ``run.py`` subcommands get on each runner.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from typing import Dict, Iterable, List, Tuple

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.io.kafka import ReadFromKafka, WriteToKafka
from apache_beam.transforms.external import JavaJarExpansionService
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import BagStateSpec, TimerSpec, on_timer
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.subprocess_server import JavaJarServer

from sourcebeam.pipelines import runners, worker_tuning
from sourcebeam.pipelines.cli import UsageError
from sourcebeam.pipelines.options import pipeline_options
# The kafka and flink_cluster fixtures come from tests/conftest.py (one instance per session).
from tests.service_fixtures import consume, create_topic, flink_cancel, flink_jobs, produce

# (key, amount, event time in seconds)
EVENTS: List[Tuple[str, int, int]] = [
    (f'cart-{i % 4}', (i * 7) % 11 + 1, 1_700_000_000 + i * 13) for i in range(40)
]


def expected_totals(events: Iterable[Tuple[str, int, int]]) -> List[str]:
  totals: Dict[str, List[int]] = {}
  for key, amount, _ in events:
    totals.setdefault(key, []).append(amount)
  return sorted(f'{k}\t{sum(v)}\t{len(v)}' for k, v in totals.items())


class TotalAtWatermark(beam.DoFn):
  """Buffers a key's amounts and emits ``key, total, count`` once the watermark passes
  the key's last event: state plus an event-time timer, the core of every consumer."""
  AMOUNTS = BagStateSpec('amounts', VarIntCoder())
  FLUSH = TimerSpec('flush', TimeDomain.WATERMARK)

  def process(self, element: Tuple[str, int], timestamp=beam.DoFn.TimestampParam,
              amounts=beam.DoFn.StateParam(AMOUNTS), flush=beam.DoFn.TimerParam(FLUSH)):
    amounts.add(element[1])
    flush.set(timestamp + 1)

  @on_timer(FLUSH)
  def on_flush(self, key=beam.DoFn.KeyParam, amounts=beam.DoFn.StateParam(AMOUNTS)):
    values = list(amounts.read())
    amounts.clear()
    yield f'{key}\t{sum(values)}\t{len(values)}'


def build_totals(p: beam.Pipeline, out_prefix: str) -> None:
  (p
   | 'Events' >> beam.Create(EVENTS)
   | 'Stamp' >> beam.Map(lambda e: TimestampedValue((e[0], e[1]), e[2])).with_output_types(Tuple[str, int])
   | 'TotalPerKey' >> beam.ParDo(TotalAtWatermark())
   | 'Write' >> beam.io.WriteToText(out_prefix))


def read_lines(prefix: str) -> List[str]:
  lines = []
  for path in glob.glob(prefix + '*'):
    with open(path) as f:
      lines.extend(line.rstrip('\n') for line in f if line.strip())
  return sorted(lines)


def run_totals(beam_args: List[str], tmp_path) -> List[str]:
  out = str(tmp_path / 'totals')
  with beam.Pipeline(options=pipeline_options(beam_args)) as p:
    build_totals(p, out)
  return read_lines(out)


# --- what each runner gets (fast; some need the installed binaries) -------------

@pytest.mark.integration  # needs scripts/install_tools.sh's binaries
def test_flink_gets_local_job_server_version_and_loopback(no_running_expansion):
  args = runners.runner_args(['--runner=FlinkRunner', '--flink_master=[local]'])
  assert runners.option_value(args, '--flink_job_server_jar') == runners.FLINK_JOB_SERVER_JAR
  assert os.path.isfile(runners.FLINK_JOB_SERVER_JAR), 'run scripts/install_tools.sh'
  assert runners.option_value(args, '--flink_version') == runners.FLINK_VERSION
  assert runners.option_value(args, '--environment_type') == 'LOOPBACK'
  assert runners.option_value(args, '--job_server_jvm_properties') == runners.JOB_SERVER_HEAP
  assert not runners.has_option(args, '--job_endpoint')
  # LOOPBACK workers are this process: nothing to install on them.
  assert not runners.has_option(args, '--setup_file')


def test_a_running_flink_job_server_named_in_the_environment_replaces_the_jar(monkeypatch):
  monkeypatch.setenv(runners.FLINK_JOB_SERVER_ENV, '127.0.0.1:8099')
  args = runners.runner_args(['--runner=FlinkRunner', '--flink_master=localhost:8081'])
  assert runners.option_value(args, '--job_endpoint') == '127.0.0.1:8099'
  assert runners.option_value(args, '--flink_master') == 'localhost:8081'  # where the job runs
  assert runners.option_value(args, '--environment_type') == 'LOOPBACK'
  for own_server in ('--flink_job_server_jar', '--job_server_jvm_properties'):
    assert not runners.has_option(args, own_server)
  # An explicit endpoint wins; other runners are not sent there.
  mine = runners.runner_args(['--runner=FlinkRunner', '--job_endpoint=elsewhere:1'])
  assert [a for a in mine if a.startswith('--job_endpoint')] == ['--job_endpoint=elsewhere:1']
  assert not runners.has_option(runners.runner_args(['--runner=DirectRunner']), '--job_endpoint')
  monkeypatch.setenv(runners.FLINK_JOB_SERVER_ENV, 'http://x')
  with pytest.raises(UsageError, match="SOURCEBEAM_FLINK_JOB_SERVER='http://x'.*services up "
                                       "jobserver"):
    runners.runner_args(['--runner=FlinkRunner'])


def test_explicit_options_win():
  args = runners.runner_args(['--runner=FlinkRunner', '--flink_job_server_jar=/x.jar',
                              '--environment_type=PROCESS', '--flink_version=1.20'])
  assert runners.option_value(args, '--flink_job_server_jar') == '/x.jar'
  assert runners.option_value(args, '--environment_type') == 'PROCESS'
  assert runners.option_value(args, '--flink_version') == '1.20'
  assert runners.has_option(args, '--setup_file')  # PROCESS workers need the package


def test_a_live_view_pipeline_on_embedded_flink_is_tuned_for_latency():
  args = runners.live_view_args(['--runner=FlinkRunner', '--flink_master=[local]'])
  assert runners.option_value(args, '--max_bundle_time_mills') == '10'
  assert runners.option_value(args, '--max_bundle_size') == '1000'
  assert runners.option_value(args, '--parallelism') == '1'  # one LOOPBACK Python worker
  assert runners.option_value(args, '--max_cache_memory_usage_mb') == '100'  # state between bundles
  conf = runners.option_value(args, '--flink_conf_dir')
  with open(os.path.join(conf, 'flink-conf.yaml')) as f:
    assert f.read() == 'execution.buffer-timeout: 5 ms\n'
  assert runners.live_view_args(['--runner=FlinkRunner'])[1:] == args[2:]  # [auto] is embedded too
  # Explicit options win; a cluster keeps its own configuration and parallelism.
  mine = runners.live_view_args(['--runner=FlinkRunner', '--max_bundle_time_mills=50',
                                 '--parallelism=2', '--flink_conf_dir=/conf'])
  assert mine == ['--runner=FlinkRunner', '--max_bundle_time_mills=50', '--parallelism=2',
                  '--flink_conf_dir=/conf', '--max_bundle_size=1000',
                  '--max_cache_memory_usage_mb=100']
  cluster = runners.live_view_args(['--runner=FlinkRunner', '--flink_master=localhost:8081'])
  assert cluster == ['--runner=FlinkRunner', '--flink_master=localhost:8081',
                     '--max_bundle_time_mills=10', '--max_bundle_size=1000',
                     '--max_cache_memory_usage_mb=100']
  pool = runners.live_view_args(['--runner=FlinkRunner', '--environment_type=EXTERNAL'])
  assert not runners.has_option(pool, '--parallelism')  # worker processes of their own
  # ... whose state cache would weigh each value by walking every module (cheap_state_cache_weights
  # is this process's): no cache for them unless asked.
  assert not runners.has_option(pool, '--max_cache_memory_usage_mb')
  assert runners.live_view_args(['--runner=PrismRunner']) == ['--runner=PrismRunner']


@pytest.fixture
def no_running_expansion(monkeypatch):
  """Without the running Java services an integration session names in the environment."""
  for name in (runners.EXPANSION_SERVICE_ENV, runners.FLINK_EXPANSION_SERVICE_ENV,
               runners.FLINK_JOB_SERVER_ENV):
    monkeypatch.delenv(name, raising=False)


@pytest.mark.integration  # needs scripts/install_tools.sh's binaries
def test_prism_and_default_io_expansion_service_are_local(no_running_expansion):
  args = runners.runner_args(['--runner=PrismRunner'])
  assert runners.option_value(args, '--prism_location') == runners.PRISM_BIN
  assert os.access(runners.PRISM_BIN, os.X_OK), 'run scripts/install_tools.sh'
  services = json.loads(runners.option_value(args, '--beam_services'))
  assert services == {runners.IO_EXPANSION_TARGET: runners.IO_EXPANSION_JAR}
  # The key is the Gradle target ReadFromKafka's default expansion service resolves.
  from apache_beam.io import kafka as beam_kafka
  with JavaJarServer.beam_services(services):
    assert beam_kafka.default_io_expansion_service().path_to_jar == runners.IO_EXPANSION_JAR


def test_prism_does_not_split_kafka_reads():
  args = runners.runner_args(['--runner=PrismRunner', '--experiments=other'])
  assert '--experiments=prism_disable_sdf_split' in args and '--experiments=other' in args
  again = runners.runner_args(args)
  assert again.count('--experiments=prism_disable_sdf_split') == 1


@pytest.mark.integration  # needs scripts/install_tools.sh's binaries
def test_kafka_expansion_service_uses_local_jar_with_embedded_java(no_running_expansion):
  service = runners.kafka_expansion_service(['--runner=PrismRunner'])
  assert isinstance(service, JavaJarExpansionService)
  assert service.path_to_jar == runners.IO_EXPANSION_JAR
  assert '--defaultEnvironmentType=EMBEDDED' in service._append_args
  # Flink gets the launcher that expands KafkaIO to the legacy read (see runners.py).
  flink = runners.kafka_expansion_service(['--runner=FlinkRunner'])
  assert flink.path_to_jar == runners.IO_EXPANSION_FLINK_JAR
  flink_args = runners.runner_args(['--runner=FlinkRunner'])
  assert json.loads(runners.option_value(flink_args, '--beam_services')) == {
      runners.IO_EXPANSION_TARGET: runners.IO_EXPANSION_FLINK_JAR}


def test_running_expansion_services_named_in_the_environment_replace_the_jars(monkeypatch):
  monkeypatch.setenv(runners.EXPANSION_SERVICE_ENV, '127.0.0.1:8097')
  monkeypatch.setenv(runners.FLINK_EXPANSION_SERVICE_ENV, 'localhost:8098')
  for runner, address in (('PrismRunner', '127.0.0.1:8097'), ('DirectRunner', '127.0.0.1:8097'),
                          ('FlinkRunner', 'localhost:8098')):
    assert runners.io_expansion_service(runner) == address
    assert runners.kafka_expansion_service([f'--runner={runner}']).path_to_jar == address
  args = runners.runner_args([])  # the DirectRunner's: no tool needed
  assert json.loads(runners.option_value(args, '--beam_services')) == {
      runners.IO_EXPANSION_TARGET: '127.0.0.1:8097'}
  # Explicit options still win, and Dataflow keeps its own (Docker) Java environment.
  mine = runners.runner_args(['--beam_services={"x": "y"}'])
  assert runners.option_value(mine, '--beam_services') == '{"x": "y"}'
  assert not runners.has_option(runners.runner_args(['--runner=DataflowRunner']), '--beam_services')
  monkeypatch.setenv(runners.FLINK_EXPANSION_SERVICE_ENV, '/some/file.jar')
  with pytest.raises(UsageError, match="SOURCEBEAM_FLINK_EXPANSION_SERVICE='/some/file.jar'"):
    runners.io_expansion_service('FlinkRunner')


def test_dataflow_gets_setup_file_and_keeps_beams_expansion_service():
  args = runners.runner_args(['--runner=DataflowRunner'])
  assert runners.option_value(args, '--setup_file').endswith('setup.py')
  assert not runners.has_option(args, '--beam_services')


# --- real runs ---------------------------------------------------------------------

@pytest.mark.integration
def test_totals_on_prism(tmp_path):
  assert run_totals(['--runner=PrismRunner'], tmp_path) == expected_totals(EVENTS)


@pytest.mark.integration
def test_totals_on_embedded_flink(tmp_path):
  assert run_totals(['--runner=FlinkRunner', '--flink_master=[local]'], tmp_path) == expected_totals(EVENTS)


@pytest.mark.integration
def test_totals_on_standalone_flink_cluster(tmp_path, flink_cluster):
  job_name = f'sourcebeam-totals-{uuid.uuid4().hex[:8]}'
  got = run_totals(['--runner=FlinkRunner', f'--flink_master={flink_cluster}',
                    f'--job_name={job_name}'], tmp_path)
  assert got == expected_totals(EVENTS)
  # It ran on the cluster, not in an embedded Flink: the JobManager knows the job.
  jobs = [j for j in flink_jobs(flink_cluster) if j['name'].startswith(job_name)]
  assert len(jobs) == 1, flink_jobs(flink_cluster)
  assert jobs[0]['state'] == 'FINISHED'
  assert jobs[0]['tasks']['finished'] == jobs[0]['tasks']['total'] > 0


def _kafka_round_trip(beam_args: List[str], bootstrap: str, tmp_path, expansion=None) -> None:
  """Events produced with Kafka's own tools -> ReadFromKafka -> totals -> WriteToKafka
  and files; the output topic is read back with Kafka's own tools. ``expansion``
  None: Beam's default expansion service, i.e. what ``--beam_services`` points at."""
  source, sink = f'events-{uuid.uuid4().hex[:8]}', f'totals-{uuid.uuid4().hex[:8]}'
  create_topic(bootstrap, source, partitions=2)
  create_topic(bootstrap, sink)
  records = [(key, f'{amount}') for key, amount, _ in EVENTS]
  produce(bootstrap, source, records)
  out = str(tmp_path / 'kafka-totals')
  with beam.Pipeline(options=pipeline_options(beam_args)) as p:
    totals = (
        p
        | 'ReadEvents' >> ReadFromKafka(
            consumer_config={'bootstrap.servers': bootstrap, 'auto.offset.reset': 'earliest'},
            topics=[source], max_num_records=len(records), expansion_service=expansion)
        | 'Decode' >> beam.Map(lambda kv: (kv[0].decode(), int(kv[1].decode())))
        | 'Sum' >> beam.CombinePerKey(sum))
    totals | 'Format' >> beam.MapTuple(lambda k, v: f'{k}\t{v}') | 'Write' >> beam.io.WriteToText(out)
    (totals
     | 'Encode' >> beam.MapTuple(lambda k, v: (k.encode(), str(v).encode())).with_output_types(Tuple[bytes, bytes])
     | 'WriteTotals' >> WriteToKafka(producer_config={'bootstrap.servers': bootstrap}, topic=sink,
                                     expansion_service=expansion))
  want: Dict[str, int] = {}
  for key, amount in records:
    want[key] = want.get(key, 0) + int(amount)
  assert read_lines(out) == sorted(f'{k}\t{v}' for k, v in want.items())
  assert sorted(consume(bootstrap, sink, len(want))) == sorted((k, str(v)) for k, v in want.items())


@pytest.mark.integration
def test_kafka_in_and_out_on_prism(tmp_path, kafka):
  _kafka_round_trip(['--runner=PrismRunner'], kafka, tmp_path, runners.kafka_expansion_service())


@pytest.mark.integration
def test_kafka_in_and_out_on_standalone_flink_cluster(tmp_path, kafka, flink_cluster):
  # Plain ReadFromKafka / WriteToKafka: the local jar comes from --beam_services.
  _kafka_round_trip(['--runner=FlinkRunner', f'--flink_master={flink_cluster}'], kafka, tmp_path)


def _live_kafka(beam_args: List[str], bootstrap: str) -> None:
  """A live (unbounded, --streaming) read: records produced after the pipeline started
  come out on the output topic; then the run is cancelled."""
  from apache_beam.runners.runner import PipelineState
  source, sink = f'live-{uuid.uuid4().hex[:8]}', f'live-out-{uuid.uuid4().hex[:8]}'
  create_topic(bootstrap, source)
  create_topic(bootstrap, sink)
  with runners.java_services(beam_args):
    p = beam.Pipeline(options=pipeline_options(beam_args, streaming=True))
    (p
     | 'ReadLive' >> ReadFromKafka(
         consumer_config={'bootstrap.servers': bootstrap, 'auto.offset.reset': 'earliest'},
         topics=[source])
     | 'Shout' >> beam.Map(lambda kv: (kv[0], kv[1].upper())).with_output_types(Tuple[bytes, bytes])
     | 'WriteLive' >> WriteToKafka(producer_config={'bootstrap.servers': bootstrap}, topic=sink))
    result = p.run()
    try:
      produce(bootstrap, source, [('a', 'one'), ('b', 'two')])
      assert sorted(consume(bootstrap, sink, 2, timeout_ms=150000)) == [('a', 'ONE'), ('b', 'TWO')]
      produce(bootstrap, source, [('c', 'three')])
      assert sorted(consume(bootstrap, sink, 3, timeout_ms=120000)) == [
          ('a', 'ONE'), ('b', 'TWO'), ('c', 'THREE')]
      assert result.state == PipelineState.RUNNING
    finally:
      result.cancel()
  assert result.state == PipelineState.CANCELLED


@pytest.mark.integration
def test_streaming_kafka_on_prism_sees_events_produced_while_it_runs(kafka):
  _live_kafka(['--runner=PrismRunner'], kafka)


@pytest.mark.integration
def test_streaming_kafka_on_standalone_flink_cluster_sees_events_produced_while_it_runs(
    kafka, flink_cluster):
  job_name = f'sourcebeam-live-{uuid.uuid4().hex[:8]}'
  try:
    _live_kafka(['--runner=FlinkRunner', f'--flink_master={flink_cluster}', f'--job_name={job_name}'],
                kafka)
    assert [j['name'] for j in flink_jobs(flink_cluster) if j['name'].startswith(job_name)]
  finally:
    flink_cancel(flink_cluster, job_name)


# --- Dataflow: the job it would submit, built without contacting Google ------------

DATAFLOW_DRY_RUN_ARGS = [
    '--runner=DataflowRunner', '--project=sourcebeam-dry-run', '--region=us-central1',
    '--temp_location=gs://sourcebeam-dry-run/tmp', '--job_name=sourcebeam-totals',
    '--sdk_location=container', '--dry_run=True',
]


@pytest.mark.integration  # the Dataflow job stages an sdist, built in a process of its own
def test_dataflow_dry_run_builds_the_job():
  p = beam.Pipeline(options=pipeline_options(DATAFLOW_DRY_RUN_ARGS))
  build_totals(p, 'gs://sourcebeam-dry-run/out/totals')
  result = p.run()
  job = result.job
  assert job.proto.name == 'sourcebeam-totals'
  assert json.loads(job.json())['type'] == 'JOB_TYPE_BATCH'
  names = {t.unique_name for t in job.proto_pipeline.components.transforms.values()}
  assert {'Events', 'Stamp', 'TotalPerKey', 'Write'} <= names
  # The stateful DoFn is there as a ParDo with its state and timer.
  pardo = next(t for t in job.proto_pipeline.components.transforms.values()
               if t.unique_name == 'TotalPerKey')
  from apache_beam.portability.api import beam_runner_api_pb2
  payload = beam_runner_api_pb2.ParDoPayload.FromString(pardo.spec.payload)
  assert set(payload.state_specs) == {'amounts'} and set(payload.timer_family_specs) == {'ts-flush'}  # Beam prefixes timer families
  # Dataflow runs Python in Beam's SDK container.
  envs = list(job.proto_pipeline.components.environments.values())
  assert envs and all(e.urn == 'beam:env:docker:v1' for e in envs)


def test_local_runners_weigh_state_without_walking_every_module():
  from apache_beam.runners.worker import statecache
  runners.runner_args([])
  assert statecache.get_deep_size is worker_tuning._state_value_size
  # The same weights as objsize's own walk, for the values state holds.
  import objsize
  for value in ({'a': [1, 2.5, 'x' * 100], 'b': None}, ('ride', {'rideId': 7}, 1795651200000),
                [frozenset({'u1', 'u2'})], b'bytes' * 10):
    assert worker_tuning._state_value_size(value) == objsize.get_deep_size(
        value, get_size_func=statecache._size_func,
        get_referents_func=statecache._get_referents_func, filter_func=statecache._filter_func)
  # Worker processes of the multi-process DirectRunner run without the cache, unless told.
  args = runners.runner_args(['--direct_num_workers=2', '--direct_running_mode=multi_processing'])
  assert '--max_cache_memory_usage_mb=0' in args
  args = runners.runner_args(['--direct_running_mode=multi_processing',
                              '--max_cache_memory_usage_mb=64'])
  assert [a for a in args if a.startswith('--max_cache')] == ['--max_cache_memory_usage_mb=64']
  assert not any(a.startswith('--max_cache') for a in runners.runner_args([]))


class _RunnerEndOfState:
  """The runner's end of Beam's state API, in memory: it takes requests at once and records
  when the worker first waits for an answer (a remote runner answers later)."""

  def __init__(self):
    self.events: List[str] = []
    self.bags: Dict[bytes, list] = {}

  def _answer(self):
    from apache_beam.runners.worker.sdk_worker import _Future
    events = self.events

    class Answer(_Future):
      def wait(self, timeout=None):
        events.append('wait')
        return super().wait(timeout)

    return Answer().set(None)

  def blocking_get(self, state_key, coder):
    return list(self.bags.get(state_key.SerializeToString(), []))

  def clear(self, state_key):
    self.events.append('clear')
    self.bags[state_key.SerializeToString()] = []
    return self._answer()

  def extend(self, state_key, coder, elements):
    self.events.append('append')
    self.bags.setdefault(state_key.SerializeToString(), []).extend(elements)
    return self._answer()


def test_a_bundles_state_writes_all_go_to_the_runner_before_its_commit_waits():
  from apache_beam.coders import StrUtf8Coder
  from apache_beam.coders.coders import GlobalWindowCoder
  from apache_beam.runners.worker import bundle_processor
  from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
  from apache_beam.transforms.window import GlobalWindow
  worker_tuning.pipelined_state_commits()
  worker_tuning.pipelined_state_commits()  # idempotent
  runner = _RunnerEndOfState()
  cell, bag = ReadModifyWriteStateSpec('cell', VarIntCoder()), BagStateSpec('bag', VarIntCoder())

  def bundle(writes):
    context = bundle_processor.FnApiUserStateContext(runner, 'step', StrUtf8Coder(),
                                                      GlobalWindowCoder())
    for key, n in writes:
      context.get_state(cell, key, GlobalWindow()).write(n)
      context.get_state(bag, key, GlobalWindow()).add(n)
    context.commit()
    context.reset()
    return context

  bundle([('k1', 1), ('k2', 2), ('k3', 3)])
  # Each key's cell cleared and written and its bag appended, for all three keys, then the
  # waits: not a wait after each key.
  assert runner.events[:9] == ['clear', 'append', 'append'] * 3
  assert set(runner.events[9:]) == {'wait'}
  runner.events.clear()
  read = bundle([('k1', 10)])
  assert runner.events[:3] == ['clear', 'append', 'append']
  # What the runner holds is what Beam's own commits write: the cell's last value, every add.
  assert read.get_state(cell, 'k1', GlobalWindow()).read() == 10
  assert sorted(read.get_state(bag, 'k1', GlobalWindow()).read()) == [1, 10]
  assert read.get_state(cell, 'k3', GlobalWindow()).read() == 3
  # Within a bundle the answers are awaited at its very end, after its later steps finished.
  runner.events.clear()
  with worker_tuning.state_answers_at_bundle_end():
    bundle([('k2', 20), ('k3', 30)])
    assert runner.events == ['clear', 'append', 'append'] * 2
  assert set(runner.events[6:]) == {'wait'} and len(runner.events) > 6


def test_bundles_start_no_sampling_thread_and_counters_still_count():
  import threading
  from apache_beam.metrics.metric import MetricsFilter
  from apache_beam.runners.worker import statesampler
  from apache_beam.utils.counters import CounterFactory
  worker_tuning.no_state_sampling_threads()
  worker_tuning.no_state_sampling_threads()  # idempotent
  sampler = statesampler.StateSampler('stage', CounterFactory())
  before = set(threading.enumerate())
  sampler.start()
  assert set(threading.enumerate()) == before and sampler.started
  assert statesampler.get_current_tracker() is sampler  # what user counters find their step by
  sampler.stop_if_still_running()
  assert sampler.finished and statesampler.get_current_tracker() is None
  sampler.reset()
  assert not sampler.started and not sampler.finished  # ready for the next bundle

  class Count(beam.DoFn):
    def __init__(self):
      self.seen = beam.metrics.Metrics.counter('test', 'seen')

    def process(self, element):
      self.seen.inc()
      yield element

  p = beam.Pipeline()
  _ = p | beam.Create(range(5)) | beam.ParDo(Count())
  result = p.run()
  result.wait_until_finish()
  seen = result.metrics().query(MetricsFilter().with_name('seen'))['counters']
  assert [c.committed for c in seen] == [5]


def test_a_live_process_keeps_its_startup_heap_out_of_full_collections():
  import gc
  worker_tuning.freeze_startup_heap()
  frozen = gc.get_freeze_count()
  assert frozen > 1000  # Beam and what it loads: never walked by a full collection again
  worker_tuning.freeze_startup_heap()  # once per process
  assert gc.get_freeze_count() == frozen


def test_each_dofns_state_and_timer_specs_are_inspected_once_with_beams_answers():
  import gc
  from apache_beam.transforms import userstate
  runners.runner_args([])
  memo = userstate.get_dofn_specs
  inspect_specs = memo.__wrapped__
  worker_tuning.remembered_dofn_specs()  # idempotent: wraps once
  assert userstate.get_dofn_specs is memo

  class Stateful(beam.DoFn):
    BAG = BagStateSpec('amounts', VarIntCoder())
    FLUSH = TimerSpec('flush', TimeDomain.WATERMARK)

    def process(self, kv, bag=beam.DoFn.StateParam(BAG), flush=beam.DoFn.TimerParam(FLUSH)):
      yield kv

    @on_timer(FLUSH)
    def on_flush(self, bag=beam.DoFn.StateParam(BAG)):
      yield 0

  class Plain(beam.DoFn):
    def process(self, x):
      yield x

  class Twice(beam.DoFn):  # Beam refuses it: the same state twice in one method
    BAG = BagStateSpec('b', VarIntCoder())

    def process(self, x, a=beam.DoFn.StateParam(BAG), b=beam.DoFn.StateParam(BAG)):
      yield x

  for fn in (Stateful(), Plain(), beam.Map(len).fn):
    want = inspect_specs(fn)
    first, again = memo(fn), memo(fn)
    assert first == again == want
    first[0].clear()  # an answer handed out is the caller's own
    assert memo(fn) == want
  assert userstate.is_stateful_dofn(Stateful()) and not userstate.is_stateful_dofn(Plain())
  refused = Twice()
  for _ in range(2):
    with pytest.raises(ValueError, match='duplicate'):
      memo(refused)
  # Kept while the instance lives, by identity; forgotten when it goes.
  fn = Stateful()
  memo(fn)
  key = id(fn)
  assert key in worker_tuning._dofn_specs
  del fn
  gc.collect()
  assert key not in worker_tuning._dofn_specs


def test_a_job_server_hanging_up_on_its_loopback_workers_prints_no_traceback(capsys, caplog):
  """A Flink job's end: the job server cancels its LOOPBACK workers' gRPC streams, and Beam's
  worker threads die of it. That is not an error; anything else in those threads still is."""
  import grpc
  import threading

  class Cancelled(grpc.RpcError):
    def __init__(self, code):
      super().__init__('Multiplexer hanging up')
      self._code = code

    def code(self):
      return self._code

  runners.runner_args(['--runner=FlinkRunner', '--job_endpoint=localhost:1'])  # installs it
  hooks = []
  saved = threading.excepthook
  threading.excepthook = lambda args: hooks.append(args.exc_value)  # pytest's, in a test
  try:
    worker_tuning.quiet_worker_hangups()

    def die(exc):
      def run():
        raise exc
      t = threading.Thread(target=run, name='run_worker_7-1')
      t.start()
      t.join()

    die(Cancelled(grpc.StatusCode.CANCELLED))
    assert hooks == []
    unavailable = Cancelled(grpc.StatusCode.UNAVAILABLE)
    die(unavailable)
    die(ValueError('a bug'))
    assert [type(e) for e in hooks] == [Cancelled, ValueError] and hooks[0] is unavailable
  finally:
    threading.excepthook = saved
  import logging
  log = logging.getLogger('apache_beam.runners.worker.data_plane')
  for exc in (Cancelled(grpc.StatusCode.CANCELLED), Cancelled(grpc.StatusCode.UNAVAILABLE)):
    try:
      raise exc
    except grpc.RpcError:
      log.exception('Failed to read inputs in the data plane.')
  assert [r.exc_info[1].code() for r in caplog.records] == [grpc.StatusCode.UNAVAILABLE]


def test_a_bounded_pipeline_raises_the_collection_thresholds_and_a_live_one_keeps_them():
  import gc
  from sourcebeam.pipelines.options import pipeline_args
  saved = gc.get_threshold()
  try:
    gc.set_threshold(700, 10, 10)  # Python's own
    pipeline_args([], streaming=True)
    assert gc.get_threshold() == (700, 10, 10)
    pipeline_args([])
    assert gc.get_threshold() == worker_tuning.BATCH_GC_THRESHOLDS
    gc.set_threshold(100_000, 50, 200)
    worker_tuning.batch_gc_thresholds()  # only ever raises them
    assert gc.get_threshold() == (100_000, 50, 200)
  finally:
    gc.set_threshold(*saved)


def test_the_global_window_is_made_once_with_its_end_unchanged():
  from apache_beam.transforms import window
  end = window.GlobalWindow().max_timestamp()
  worker_tuning.cheap_global_windows()
  worker_tuning.cheap_global_windows()  # idempotent
  assert window.GlobalWindow.__init__.sourcebeam_once
  assert window.GlobalWindow() is window.GlobalWindow()
  assert window.GlobalWindow().max_timestamp() == end
  assert window.GlobalWindow().end == window.GlobalWindow._getTimestampFromProto()
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that, equal_to
  with TestPipeline(options=pipeline_options([])) as p:
    out = (p | beam.Create([1, 2]) | 'Fixed' >> beam.WindowInto(window.FixedWindows(10))
           | 'Global' >> beam.WindowInto(window.GlobalWindows()) | beam.Map(lambda x: (x % 2, x))
           | beam.GroupByKey() | beam.MapTuple(lambda k, vs: (k, sorted(vs))))
    assert_that(out, equal_to([(0, [2]), (1, [1])]))
