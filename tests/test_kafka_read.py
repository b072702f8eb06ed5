"""A bounded Kafka read (`--max-records N`) that cannot end with what the topic holds is
said before it starts.

KafkaIO splits a bound of N among readers that each own some partitions; a reader whose
partitions hold less than its share polls until more arrives (for ever, if nothing does).
A run may mean to wait for messages still to be produced (the hand-off tests do), so this is
a warning, not a refusal. These tests pin the arithmetic (from Beam's
BoundedReadFromUnboundedSource and KafkaUnboundedSource.split) and check both outcomes
against a real broker.
"""

import subprocess
import uuid

import pytest

from sourcebeam.transforms.kafka_read import bounded_read_shares, unreadable_bound
from tests.cli import run_cli, run_py
from tests.demo import ROOT
WAITS = ('--max-records 10530: KafkaIO reads it with 2 readers of about 5265 messages each, and '
         'the reader of partition(s) 1 finds 3400, so the run waits until they hold 5265; to read '
         'what the topic holds now, use at most 9999 (one reader)')


def test_under_ten_thousand_one_reader_owns_every_partition():
  assert bounded_read_shares(9_999, [2, 0, 1]) == [([0, 1, 2], 9_999)]


def test_the_bound_is_shared_evenly_and_partitions_dealt_round_robin():
  assert bounded_read_shares(10_530, [0, 1, 2]) == [([0, 2], 5_265), ([1], 5_265)]
  assert bounded_read_shares(25_000, [0, 1, 2, 3]) == [([0, 3], 8_334), ([1], 8_333), ([2], 8_333)]
  # No more readers than partitions, nor than 100.
  assert len(bounded_read_shares(1_000_000, [0, 1])) == 2
  assert len(bounded_read_shares(5_000_000, list(range(300)))) == 100


def test_a_reader_short_of_its_share_makes_the_bound_unreadable():
  available = {0: 3_600, 1: 3_400, 2: 3_530}  # 10,530 in all
  assert unreadable_bound(9_999, available) is None
  assert unreadable_bound(10_530, available) == WAITS
  assert unreadable_bound(10_530, {0: 5_265, 1: 5_265}) is None
  assert unreadable_bound(500, {0: 100, 1: 100}) == (
      '--max-records 500: the topic holds 200 messages after where the read starts, so the run '
      'waits for 300 more')


@pytest.mark.integration
def test_stream_and_fanout_say_when_their_readers_must_wait(kafka, tmp_path):
  """10,530 from partitions of 3,600 / 3,400 / 3,530: the reader of partition 1 must wait for
  1,865 more. The command says so before it builds the pipeline; then it is stopped."""
  import signal
  from confluent_kafka import Producer
  from tests.service_fixtures import create_topic
  topic = f'uneven-{uuid.uuid4().hex[:8]}'
  create_topic(kafka, topic, partitions=3)
  producer = Producer({'bootstrap.servers': kafka, 'acks': 'all', 'linger.ms': 20})
  for partition, n in ((0, 3_600), (1, 3_400), (2, 3_530)):
    for _ in range(n):
      producer.produce(topic, value=b'{"not": "an event"}', partition=partition)
  assert producer.flush(60) == 0
  (tmp_path / 'subs.json').write_text('{"subscribers": [{"name": "all", "sink": "%s"}]}'
                                      % (tmp_path / 'all'))
  for command in (['stream'], ['fanout', '--subscribers', str(tmp_path / 'subs.json')]):
    # A process of its own: the run waits for ever, so SIGTERM ends it.
    proc = subprocess.Popen(run_py(*command, '--source', f'kafka://{kafka}/{topic}',
                                   '--max-records', '10530', '--out', str(tmp_path / 'out'),
                                   '--runner=PrismRunner'),
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
      first = proc.stderr.readline().strip()
    finally:
      proc.send_signal(signal.SIGTERM)
      proc.communicate(timeout=120)
    assert first == f'warning: {WAITS}'
    assert proc.returncode == 143


@pytest.mark.integration
def test_a_missing_topic_is_exit_2_before_the_pipeline(kafka, tmp_path):
  proc = run_cli('stream', '--source', f'kafka://{kafka}/no-such-topic-{uuid.uuid4().hex[:6]}',
                 '--max-records', '10', '--out', str(tmp_path / 'out'))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'does not exist at' in proc.stderr.strip().splitlines()[-1]


@pytest.mark.integration
def test_a_bound_over_ten_thousand_that_every_reader_can_fill_ends(kafka, tmp_path):
  """The other half of the arithmetic: 10,600 from two partitions of 5,300 is two readers of
  5,300 each, so the run ends, every message counted (here all dead-lettered: not events)."""
  import json
  from confluent_kafka import Producer
  from tests.service_fixtures import create_topic
  topic = f'even-{uuid.uuid4().hex[:8]}'
  create_topic(kafka, topic, partitions=2)
  producer = Producer({'bootstrap.servers': kafka, 'acks': 'all', 'linger.ms': 20})
  for partition in (0, 1):
    for _ in range(5_300):
      producer.produce(topic, value=b'{"not": "an event"}', partition=partition)
  assert producer.flush(60) == 0
  # On Prism as a process of its own: Beam keeps Prism and the Java expansion service, its
  # children, until the interpreter exits.
  proc = subprocess.run(run_py('stream', '--source', f'kafka://{kafka}/{topic}', '--max-records',
                               '10600', '--out', str(tmp_path / 'out'), '--runner=PrismRunner'),
                        capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  assert (summary['in'], summary['dead_lettered']) == (10_600, 10_600)


def test_consumer_settings_add_to_the_reads_own_and_may_not_override_them():
  from sourcebeam.transforms.errors import ConfigError
  from sourcebeam.transforms.kafka_read import OWN_SETTINGS, ReadKafkaMessages, read_consumer_config
  config = read_consumer_config('b:9092', 'g', {'fetch.max.wait.ms': '50', 'max.poll.records': '200'})
  assert config == {'bootstrap.servers': 'b:9092', 'auto.offset.reset': 'earliest', 'group.id': 'g',
                    'enable.auto.commit': 'false', 'fetch.max.wait.ms': '50',
                    'max.poll.records': '200'}
  read = ReadKafkaMessages('b:9092', 't', 'g', consumer_config={'fetch.min.bytes': '1'},
                           poll_timeout_s=1)
  assert read.config['fetch.min.bytes'] == '1' and read.poll_timeout_s == 1
  for key in OWN_SETTINGS:
    with pytest.raises(ConfigError, match=key):
      read_consumer_config('b:9092', 'g', {key: 'x'})
  for timeout in (0, -1, 1.5, True):
    with pytest.raises(ConfigError, match='whole seconds'):
      ReadKafkaMessages('b:9092', 't', 'g', poll_timeout_s=timeout)


@pytest.mark.parametrize('args, said', [
    (['--kafka-consumer', 'enable.auto.commit=true'], 'enable.auto.commit'),
    (['--kafka-consumer', 'fetch.max.wait.ms'], 'KEY=VALUE'),
    (['--kafka-poll-timeout', '0'], 'at least 1'),
    (['--kafka-poll-timeout', '1', '--runner=FlinkRunner'], "Flink's read"),
])
@pytest.mark.cli
def test_stream_refuses_bad_kafka_read_options_before_it_starts(args, said, tmp_path):
  proc = run_cli('stream', '--source', 'kafka://127.0.0.1:1/t', '--out', str(tmp_path / 'out'),
                 *args)
  assert proc.returncode == 2 and said in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
  assert not (tmp_path / 'out').exists()  # refused before anything was made
