"""The live path: the same publish step and consumers, fed by a Kafka topic.

``run.py stream --source kafka://HOST:PORT/TOPIC --out DIR [beam options]``
reads the topic with Beam's ``ReadFromKafka`` (a cross-language transform: it
runs on Prism and Flink, see :mod:`pipelines.runners`), sends every message
through the publishing boundary (:class:`transforms.publish.PublishEvents`),
and then:

* with ``--max-records N`` (a bounded read of the first N messages, so a run
  ends): applies :func:`pipelines.consumers.apply_consumers`, the very function
  ``run.py replay`` applies to the archive, and writes the same outputs and a
  ``summary.json``. Same code, other source: a test checks that a replay and a
  run from Kafka give identical outputs;
* always, when asked: ``--views DSN`` keeps the retail views in a database
  with per-partition positions (:mod:`transforms.view_store`, read by
  ``run.py serve views``), ``--publish-topic T`` writes the published stream
  back to Kafka, keyed by partition key, with ``WriteToKafka``.

Event time: the read takes each message's Kafka timestamp (CreateTime) as its
element timestamp, so producers set it to the event's ``event_time`` and the
watermark follows event time; a live producer writing events as they happen
gets that for free, and a producer replaying history must set it.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.kafka import ReadFromKafka, WriteToKafka

from pipelines import consumers, outputs
from pipelines.cli import UsageError
from pipelines.options import pipeline_options
from schemas.envelope import to_json
from transforms.counting import WriteCounts, read_counts
from transforms.publish import PublishEvents, dead_letter_json

_SOURCE = re.compile(r'^kafka://(?P<bootstrap>[^/]+)/(?P<topic>[A-Za-z0-9._-]+)$')


class KafkaSource(NamedTuple):
  bootstrap: str
  topic: str


def parse_source(text: str) -> KafkaSource:
  m = _SOURCE.match(text or '')
  if not m:
    raise UsageError(f'--source must look like kafka://HOST:PORT/TOPIC, got {text!r}')
  return KafkaSource(m['bootstrap'], m['topic'])


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--source', required=True, metavar='kafka://HOST:PORT/TOPIC',
                      help='the raw (or published) event topic to read from its earliest offset')
  parser.add_argument('--out', required=True, metavar='DIR',
                      help='where published events, dead letters, consumer outputs and summary.json go')
  parser.add_argument('--max-records', type=int, metavar='N',
                      help='read the first N messages and stop (a bounded run); without it the '
                           'run is live and unbounded')
  parser.add_argument('--views', metavar='DSN',
                      help='also keep the retail views in this database (SQLite path or postgresql://)')
  parser.add_argument('--publish-topic', metavar='TOPIC',
                      help='also write the published events to this Kafka topic')
  parser.add_argument('--group-id', default='sourcebeam-stream',
                      help='Kafka consumer group (default: sourcebeam-stream)')


def _message_value(message) -> Tuple[str, bytes]:
  """A ReadFromKafka(with_metadata=True) record -> (source label, raw bytes)."""
  value = message.value
  return f'kafka://{message.topic}/{message.partition}@{message.offset}', bytes(value or b'')


def read_kafka(p: beam.Pipeline, source: KafkaSource, group_id: str,
               max_records: Optional[int]) -> beam.PCollection:
  # No auto-commit: a run's handler state (carts, orderings) lives in the runner, so a
  # restarted run without a runner checkpoint must read from the start to rebuild it; a
  # group offset committed by the last run would resume it with empty state, and the view
  # store would take wrong values at later offsets. (Flink resumes from its own checkpoints.)
  return p | 'ReadKafka' >> ReadFromKafka(
      consumer_config={'bootstrap.servers': source.bootstrap, 'auto.offset.reset': 'earliest',
                       'group.id': group_id, 'enable.auto.commit': 'false'},
      topics=[source.topic], with_metadata=True, max_num_records=max_records,
      timestamp_policy=ReadFromKafka.create_time_policy)


def build_stream(p: beam.Pipeline, source: KafkaSource, out: str, *, max_records: Optional[int],
                 views: Optional[str] = None, publish_topic: Optional[str] = None,
                 group_id: str = 'sourcebeam-stream') -> Dict[str, beam.PCollection]:
  messages = read_kafka(p, source, group_id, max_records)
  result = messages | 'Values' >> beam.Map(_message_value) | 'Publish' >> PublishEvents()
  counts = {'in': messages, 'published': result.published, 'dead_lettered': result.dead_letters}
  if views:
    from transforms.view_store import ViewChanges, WriteViewsToStore, kafka_message
    (messages
     | 'AsViewMessages' >> beam.Map(kafka_message)
     | 'ViewChanges' >> ViewChanges()
     | 'WriteViews' >> WriteViewsToStore(views))
  if publish_topic:
    (result.published
     | 'KeyedJson' >> beam.Map(lambda e: (e['partition_key'].encode(), to_json(e).encode()))
     .with_output_types(Tuple[bytes, bytes])
     | 'PublishToKafka' >> WriteToKafka(producer_config={'bootstrap.servers': source.bootstrap},
                                        topic=publish_topic))
  if max_records is not None:
    result.published | 'PublishedJson' >> beam.Map(to_json) | 'WritePublished' >> outputs.write_lines(
        out, 'published.jsonl')
    result.dead_letters | 'DeadLetterJson' >> beam.Map(dead_letter_json) | 'WriteDead' >> (
        outputs.write_lines(out, 'dead_letters.jsonl'))
    counts.update(consumers.apply_consumers(result.published, outputs.join(out, 'consumers')))
  return counts


def run(source: KafkaSource, out: str, beam_args: List[str], *, max_records: Optional[int],
        views: Optional[str] = None, publish_topic: Optional[str] = None,
        group_id: str = 'sourcebeam-stream') -> Optional[Dict[str, Any]]:
  bounded = max_records is not None
  options = pipeline_options(beam_args, streaming=not bounded)
  FileSystems.set_options(options)
  outputs.prepare(out)
  started = time.monotonic()
  with beam.Pipeline(options=options) as p:
    counts = build_stream(p, source, out, max_records=max_records, views=views,
                          publish_topic=publish_topic, group_id=group_id)
    if bounded:
      counts | 'Counts' >> WriteCounts(outputs.join(out, '_counts.json'))
  if not bounded:
    return None
  seconds = time.monotonic() - started
  counted = read_counts(outputs.join(out, '_counts.json'))
  summary = {k: counted.pop(k) for k in ('in', 'published', 'dead_lettered', 'events')}
  summary.update(source=f'kafka://{source.bootstrap}/{source.topic}', outputs=counted,
                 seconds=round(seconds, 3))
  if summary['in'] != summary['published'] + summary['dead_lettered']:
    raise AssertionError(f'events lost in publish: {summary}')
  outputs.write_json(out, 'summary.json', summary)
  return summary


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  source = parse_source(args.source)
  if args.max_records is not None and args.max_records <= 0:
    raise UsageError('--max-records must be positive')
  summary = run(source, args.out, beam_args, max_records=args.max_records, views=args.views,
                publish_topic=args.publish_topic, group_id=args.group_id)
  if summary:
    print(f'read {summary["in"]} messages from {summary["source"]}: {summary["published"]} '
          f'published, {summary["dead_lettered"]} dead-lettered; summary in {args.out}/summary.json',
          file=sys.stderr)
  return 0
