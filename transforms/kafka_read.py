"""The one way Sourcebeam reads a Kafka topic: ``ReadKafkaMessages``.

Every live pipeline (``run.py stream``, ``run.py fanout``, the archive-to-live
hand-off) reads the same way, so this is the one place for it:

* ``with_metadata=True``: each record keeps its topic, partition and offset, which
  the view store's positions, the live archive's offset sidecars and dead letters
  need;
* the element timestamp is the message's Kafka timestamp (``CreateTime``), so the
  watermark follows event time (the event writer sets it to ``event_time``);
* a consumer group without a committed offset starts at the earliest offset;
* no auto-commit. A run's handler state (carts, orderings) lives in the runner,
  so a restarted run without a runner checkpoint must read from the start to
  rebuild it; a group offset committed by the last run would resume it with empty
  state, and the view store would take wrong values at later offsets. Offsets
  committed on purpose (the hand-off commits its start offsets to a fresh group)
  are still where the read starts.

Latency options: ``consumer_config`` adds Kafka consumer settings (``fetch.min.bytes``,
``fetch.max.wait.ms``, ``max.poll.records``...) to the read's own, which it may not
override (:data:`OWN_SETTINGS`); ``poll_timeout_s`` is the splittable read's polling
timeout (Prism, Dataflow: KafkaIO's ``consumer_polling_timeout``), whole seconds, at
least 1. The defaults are already the fast ones for a read that keeps up: with
``fetch.min.bytes`` 1 the broker answers a waiting fetch with the first new record, so
``fetch.max.wait.ms`` bounds only fetches that find nothing. The splittable read keeps a
bundle open while records keep coming, for up to ``poll_timeout_s``: its output reaches
the next step only then.

``max_records`` bounds the read (a run that ends). KafkaIO divides the bound
among readers that each own some partitions (:func:`bounded_read_shares`), and a
reader whose partitions hold less than its share waits until they receive more,
for ever if nothing more comes: :func:`check_bounded_read` says so before the
pipeline starts (a run may mean to wait for messages still to be produced).
"""

from __future__ import annotations

import sys
import uuid
from typing import Dict, List, Mapping, Optional, Tuple

import apache_beam as beam
from apache_beam.io.kafka import ReadFromKafka

from sourcebeam.transforms.errors import ConfigError
from sourcebeam.transforms.kafka_retry import retry_transient

# Beam's BoundedReadFromUnboundedSource: one reader per this many records, at most 100.
_RECORDS_PER_READER, _MAX_READERS = 10_000, 100
# The consumer settings the read decides (see the module docstring); consumer_config may add others.
OWN_SETTINGS = ('bootstrap.servers', 'group.id', 'enable.auto.commit', 'auto.offset.reset')
DEFAULT_POLL_TIMEOUT_S = 2  # KafkaIO's own default


def read_consumer_config(bootstrap: str, group_id: str,
                    extra: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
  """The read's consumer settings plus ``extra``; ConfigError if ``extra`` sets one of
  :data:`OWN_SETTINGS` or is not text."""
  config = {'bootstrap.servers': bootstrap, 'auto.offset.reset': 'earliest',
            'group.id': group_id, 'enable.auto.commit': 'false'}
  for key, value in (extra or {}).items():
    if key in OWN_SETTINGS:
      raise ConfigError(f'the Kafka read sets {key} itself ({", ".join(OWN_SETTINGS)} are its own)')
    if not isinstance(key, str) or not key or not isinstance(value, str):
      raise ConfigError(f'a Kafka consumer setting is KEY=VALUE text, got {key!r}={value!r}')
    config[key] = value
  return config


class ReadKafkaMessages(beam.PTransform):
  """PBegin -> ReadFromKafka(with_metadata=True) records of ``topic``, timestamped by CreateTime.

  ``expansion_service``: where the cross-language read is expanded; None is Beam's
  default (the IO expansion service jar that ``--beam_services`` names, or Beam's own).
  ``consumer_config`` (extra consumer settings) and ``poll_timeout_s``: see the module
  docstring; ConfigError for a setting the read owns or a timeout under 1 s.
  """

  def __init__(self, bootstrap: str, topic: str, group_id: str, max_records: Optional[int] = None,
               *, expansion_service=None, consumer_config: Optional[Mapping[str, str]] = None,
               poll_timeout_s: int = DEFAULT_POLL_TIMEOUT_S):
    super().__init__()
    self.bootstrap, self.topic, self.group_id, self.max_records = bootstrap, topic, group_id, max_records
    self.expansion_service = expansion_service
    self.config = read_consumer_config(bootstrap, group_id, consumer_config)
    if isinstance(poll_timeout_s, bool) or not isinstance(poll_timeout_s, int) or poll_timeout_s < 1:
      # KafkaIO takes whole seconds, and with 0 its splittable read returns without polling.
      raise ConfigError(f'the Kafka poll timeout is whole seconds, at least 1; got {poll_timeout_s!r}')
    self.poll_timeout_s = poll_timeout_s

  def expand(self, pbegin):
    return pbegin | 'ReadFromKafka' >> ReadFromKafka(
        consumer_config=dict(self.config),
        topics=[self.topic], with_metadata=True, max_num_records=self.max_records,
        timestamp_policy=ReadFromKafka.create_time_policy,
        consumer_polling_timeout=self.poll_timeout_s,
        expansion_service=self.expansion_service)
    # (KafkaIO's legacy read, which Flink runs, refuses any other timeout than the default.)


def message_value(message) -> Tuple[str, bytes]:
  """A ReadFromKafka(with_metadata=True) record -> (source label, raw bytes): PublishEvents' input."""
  return f'kafka://{message.topic}/{message.partition}@{message.offset}', bytes(message.value or b'')


def bounded_read_shares(max_records: int, partitions: List[int]) -> List[Tuple[List[int], int]]:
  """How KafkaIO reads ``max_records`` from ``partitions``: ``[(partitions, records)]``, one
  per reader. Beam asks for ``min(100, N // 10,000 + 1)`` readers, KafkaIO deals the sorted
  partitions to ``min(that, #partitions)`` readers round-robin, and each reader reads its
  even share of N (the first ``N % readers`` one more), waiting until it has."""
  ordered = sorted(partitions)
  readers = min(_MAX_READERS, max_records // _RECORDS_PER_READER + 1, len(ordered))
  return [(ordered[i::readers], max_records // readers + (1 if i < max_records % readers else 0))
          for i in range(readers)]


def unreadable_bound(max_records: int, available: Mapping[int, int]) -> Optional[str]:
  """Why a bounded read of ``max_records`` cannot end yet, given the messages ``available``
  per partition after the read's start offsets; None when every reader can fill its share."""
  shares = bounded_read_shares(max_records, list(available))
  total = sum(available.values())
  for owned, share in shares:
    held = sum(available[p] for p in owned)
    if held >= share:
      continue
    if len(shares) == 1:
      return (f'--max-records {max_records}: the topic holds {total} messages after where the '
              f'read starts, so the run waits for {max_records - total} more')
    return (f'--max-records {max_records}: KafkaIO reads it with {len(shares)} readers of about '
            f'{share} messages each, and the reader of partition(s) {", ".join(map(str, owned))} '
            f'finds {held}, so the run waits until they hold {share}; to read what the topic '
            f'holds now, use at most {min(total, _RECORDS_PER_READER - 1)} (one reader)')
  return None


def partition_offsets(bootstrap: str, topic: str, group_id: Optional[str] = None
                      ) -> Tuple[Dict[int, Tuple[int, int]], Dict[int, int]]:
  """``({partition: (low, high)}, {partition: committed offset of group_id})`` of ``topic``,
  read with Kafka's own client; ConfigError if the broker or the topic is not there."""
  from confluent_kafka import Consumer, KafkaException, TopicPartition
  consumer = Consumer({'bootstrap.servers': bootstrap, 'enable.auto.commit': False,
                       'group.id': group_id or f'sourcebeam-check-{uuid.uuid4().hex}'})
  try:
    meta = consumer.list_topics(topic, timeout=15).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
      raise ConfigError(f'topic {topic} does not exist at {bootstrap}')
    marks = {p: retry_transient(lambda: consumer.get_watermark_offsets(
        TopicPartition(topic, p), timeout=15)) for p in meta.partitions}
    committed = {}
    if group_id:
      committed = {tp.partition: tp.offset for tp in retry_transient(lambda: consumer.committed(
          [TopicPartition(topic, p) for p in marks], timeout=15)) if tp.offset >= 0}
    return marks, committed
  except KafkaException as e:
    raise ConfigError(f'cannot reach Kafka at {bootstrap}: {e}') from None
  finally:
    consumer.close()


def check_bounded_read(bootstrap: str, topic: str, max_records: int, *, group_id: str,
                       start_offsets: Optional[Mapping[Tuple[str, int], int]] = None) -> None:
  """A warning line on stderr if a read of ``max_records`` from ``topic`` cannot end with what
  the topic holds now; ConfigError if the topic or the broker is not there. The read starts at
  ``start_offsets`` (per (topic, partition)) or else at ``group_id``'s committed offsets, or
  else at the earliest, as ``ReadKafkaMessages`` does."""
  marks, starts = partition_offsets(bootstrap, topic, group_id if start_offsets is None else None)
  if start_offsets is not None:
    starts = {p: o for (t, p), o in start_offsets.items() if t == topic}
  available = {p: high - max(low, starts.get(p, low)) for p, (low, high) in marks.items()}
  problem = unreadable_bound(max_records, available)
  if problem:
    print(f'warning: {problem}', file=sys.stderr, flush=True)
