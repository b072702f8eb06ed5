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

``max_records`` bounds the read (a run that ends) — KafkaIO counts records per
reader split, so give it at most what the topic holds.
"""

from __future__ import annotations

from typing import Optional, Tuple

import apache_beam as beam
from apache_beam.io.kafka import ReadFromKafka

from pipelines.runners import kafka_io_service


class ReadKafkaMessages(beam.PTransform):
  """PBegin -> ReadFromKafka(with_metadata=True) records of ``topic``, timestamped by CreateTime."""

  def __init__(self, bootstrap: str, topic: str, group_id: str, max_records: Optional[int] = None):
    super().__init__()
    self.bootstrap, self.topic, self.group_id, self.max_records = bootstrap, topic, group_id, max_records

  def expand(self, pbegin):
    return pbegin | 'ReadFromKafka' >> ReadFromKafka(
        consumer_config={'bootstrap.servers': self.bootstrap, 'auto.offset.reset': 'earliest',
                         'group.id': self.group_id, 'enable.auto.commit': 'false'},
        topics=[self.topic], with_metadata=True, max_num_records=self.max_records,
        timestamp_policy=ReadFromKafka.create_time_policy,
        expansion_service=kafka_io_service(pbegin.pipeline.options))


def message_value(message) -> Tuple[str, bytes]:
  """A ReadFromKafka(with_metadata=True) record -> (source label, raw bytes): PublishEvents' input."""
  return f'kafka://{message.topic}/{message.partition}@{message.offset}', bytes(message.value or b'')
