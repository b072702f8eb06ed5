"""One pipeline, two modes: a bounded archive replay on the DirectRunner and a run fed by
Kafka on Prism, on embedded Flink and on the standalone Flink cluster give identical
outputs from the same events; and the replay itself gives them on every runner.

The raw events go both to a file (publish -> archive -> replay) and to a Kafka topic
(`run.py stream --max-records N`, which reads the first N messages and stops, so the
run ends). Published events, retail projections, taxi joins and rider joins must match
line for line.
"""

import glob
import json
import subprocess
import uuid

import pytest

from sourcebeam.generators import retail, riders, taxi
from sourcebeam.generators.jsonl import encode_line
from sourcebeam.pipelines.stream import output_topic
from sourcebeam.schemas.envelope import iso_to_millis
from tests.cli import run_cli as in_process, run_py
from tests.demo import ROOT

LIVE_OUTPUTS = ('taxi/joined', 'riders/rider_located')  # the demo's consumers send these live
COMPARED = ['retail/cart.jsonl', 'retail/catalog.jsonl', 'retail/recently_viewed.jsonl',
            'retail/frequently_viewed.jsonl', 'taxi/joined.jsonl', 'taxi/alerts.jsonl',
            'taxi/hourly_tips.jsonl', 'taxi/rides_in_nyc.jsonl', 'riders/rider_located.jsonl',
            'riders/occupancy.jsonl', 'riders/zone_waiting.jsonl']


def run_cli(*args):
  """`run.py ARGS`, which must succeed: on the DirectRunner in this process; on another runner
  in a process of its own (Beam keeps the runner's job server, Prism or Flink's, and the Java
  expansion service as child processes until the interpreter exits)."""
  if any(a.startswith('--runner=') for a in args):
    proc = subprocess.run(run_py(*args), capture_output=True, text=True, cwd=ROOT, timeout=900)
  else:
    proc = in_process(*args)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def lines(path):
  with open(path, encoding='utf-8') as f:
    return sorted(l for l in f.read().splitlines() if l)


@pytest.fixture(scope='module')
def raw_events():
  """(key, event time millis, raw line), in event-time order as a live stream carries them."""
  events = (list(retail.retail_events(400, seed=11)) + list(taxi.taxi_envelopes(200, seed=11))
            + list(riders.rider_events(3, seed=11)))
  timed = sorted(((e['partition_key'], iso_to_millis(e['event_time']), encode_line(e))
                  for e in events), key=lambda r: r[1])
  return timed + [('broken', timed[-1][1], b'{"event_type": "CartItemAdded", ')]


@pytest.fixture(scope='module')
def replayed(raw_events, tmp_path_factory):
  d = tmp_path_factory.mktemp('replay')
  (d / 'raw.jsonl').write_bytes(b'\n'.join(v for _, _, v in raw_events) + b'\n')
  run_cli('publish', '--input', str(d / 'raw.jsonl'), '--out', str(d / 'published'),
          '--archive', str(d / 'archive'))
  run_cli('replay', '--archive', str(d / 'archive'), '--out', str(d / 'replay'))
  return d


@pytest.fixture(scope='module')
def topic(raw_events, kafka):
  """The raw events in a two-partition topic, each message timestamped with its event time."""
  from confluent_kafka import Producer
  from tests.service_fixtures import create_topic
  name = f'raw-{uuid.uuid4().hex[:8]}'
  create_topic(kafka, name, partitions=2)
  producer = Producer({'bootstrap.servers': kafka, 'acks': 'all'})
  for key, millis, value in raw_events:
    producer.produce(name, key=key.encode(), value=value, timestamp=millis)
  assert producer.flush(60) == 0
  return name


def check_same(replayed, stream_out, n_raw):
  summary = json.loads((stream_out / 'summary.json').read_text())
  assert summary['in'] == n_raw
  assert summary['dead_lettered'] == 1
  assert lines(stream_out / 'published.jsonl') == lines(replayed / 'published' / 'published.jsonl')
  for name in COMPARED:
    want = lines(replayed / 'replay' / name)
    assert want, f'{name} is empty: the comparison would prove nothing'
    assert lines(stream_out / 'consumers' / name) == want, name


def stream_and_check(runner_args, replayed, topic, kafka, raw_events, out):
  """Run the live path over the topic on a runner; its outputs must equal the replay's."""
  from tests.service_fixtures import consume, create_topic
  published_topic, joined_prefix = f'published-{uuid.uuid4().hex[:8]}', f'joined-{uuid.uuid4().hex[:8]}'
  create_topic(kafka, published_topic, partitions=2)
  for name in LIVE_OUTPUTS:
    create_topic(kafka, output_topic(joined_prefix, name))
  run_cli('stream', '--source', f'kafka://{kafka}/{topic}', '--max-records', str(len(raw_events)),
          '--out', str(out), '--publish-topic', published_topic, '--output-topic-prefix',
          joined_prefix, f'--group-id=same-code-{uuid.uuid4().hex[:8]}', *runner_args)
  check_same(replayed, out, len(raw_events))
  # The published stream also went back to Kafka, keyed by partition key,
  published = lines(replayed / 'published' / 'published.jsonl')
  back = consume(kafka, published_topic, len(published))
  assert sorted(v for _, v in back) == published
  assert all(json.loads(v)['partition_key'] == k for k, v in back)
  # and so did the joined streams, keyed by what they joined on.
  rides = lines(replayed / 'replay' / 'taxi' / 'joined.jsonl')
  back = consume(kafka, f'{joined_prefix}.taxi.joined', len(rides))
  assert sorted(v for _, v in back) == rides
  assert all(str(json.loads(v)['ride']['rideId']) == k for k, v in back)
  located = lines(replayed / 'replay' / 'riders' / 'rider_located.jsonl')
  back = consume(kafka, f'{joined_prefix}.riders.rider_located', len(located))
  assert sorted(v for _, v in back) == located
  assert all(json.loads(v)['partition_key'] == k for k, v in back)


RUNNERS = {
    'prism': ['--runner=PrismRunner'],
    'embedded-flink': ['--runner=FlinkRunner', '--flink_master=[local]'],
    'flink-cluster': ['--runner=FlinkRunner'],  # + --flink_master of the flink_cluster fixture
}


def runner_args(runner, request):
  args = list(RUNNERS[runner])
  if runner == 'flink-cluster':
    args.append(f'--flink_master={request.getfixturevalue("flink_cluster")}')
  return args


@pytest.mark.integration
@pytest.mark.parametrize('runner', sorted(RUNNERS))
def test_kafka_on_every_runner_equals_the_replay(runner, replayed, topic, kafka, raw_events,
                                                 tmp_path, request):
  args = runner_args(runner, request)
  job_name = f'same-code-{uuid.uuid4().hex[:8]}'
  stream_and_check([*args, f'--job_name={job_name}'], replayed, topic, kafka, raw_events,
                   tmp_path / 'out')
  if runner == 'flink-cluster':
    # It ran on the cluster (the JobManager knows the job), not in an embedded Flink.
    from tests.service_fixtures import flink_jobs
    flink_master = request.getfixturevalue('flink_cluster')
    assert [j for j in flink_jobs(flink_master) if j['name'].startswith(job_name)]


@pytest.mark.integration
@pytest.mark.parametrize('runner', sorted(RUNNERS))
def test_the_replay_is_the_same_on_every_runner(runner, replayed, tmp_path, request):
  """`run.py replay` of one archive on Prism and Flink equals the DirectRunner's replay."""
  out = tmp_path / 'replay'
  run_cli('replay', '--archive', str(replayed / 'archive'), '--out', str(out),
          *runner_args(runner, request))
  for name in COMPARED:
    assert lines(out / name) == lines(replayed / 'replay' / name), name


@pytest.mark.integration
def test_a_live_run_sends_the_joins_to_kafka_as_they_happen(replayed, topic, kafka, tmp_path):
  """Unbounded (no --max-records) on Prism: the live run writes no files and sends the
  consumers' live outputs (the joins) to Kafka; every ride the replay joined arrives, and
  every rider located live is one the replay located too."""
  import signal
  from tests.service_fixtures import consume, create_topic
  prefix = f'live-joined-{uuid.uuid4().hex[:8]}'
  for name in LIVE_OUTPUTS:
    create_topic(kafka, output_topic(prefix, name))
  # A process of its own: SIGTERM ends the live run (and Prism, its child).
  proc = subprocess.Popen(run_py('stream', '--source', f'kafka://{kafka}/{topic}', '--out',
                                 str(tmp_path / 'out'), '--output-topic-prefix', prefix,
                                 f'--group-id=live-{prefix}', '--runner=PrismRunner'),
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    rides = lines(replayed / 'replay' / 'taxi' / 'joined.jsonl')
    back = consume(kafka, f'{prefix}.taxi.joined', len(rides), timeout_ms=240000)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert sorted(v for _, v in back) == rides
    located = set(lines(replayed / 'replay' / 'riders' / 'rider_located.jsonl'))
    live = consume(kafka, f'{prefix}.riders.rider_located', len(located), timeout_ms=20000)
    assert live and {v for _, v in live} <= located
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
  assert proc.returncode == 143


# A bare host would reach Kafka's Java client, which refuses it deep inside the pipeline.
@pytest.mark.cli
@pytest.mark.parametrize('source', ['http://x/y', 'kafka://localhost/raw', 'kafka://h:9092/a b'])
def test_a_bad_source_is_exit_2(source, tmp_path):
  proc = in_process('stream', '--source', source, '--out', str(tmp_path))
  assert proc.returncode == 2
  assert proc.stderr.strip() == f"error: --source must look like kafka://HOST:PORT/TOPIC, got {source!r}"
