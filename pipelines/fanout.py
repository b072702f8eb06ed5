"""`run.py fanout`: one read of the published stream, delivered to every declared subscriber.

``run.py fanout --subscribers FILE --source SOURCE --out DIR [--max-records N]
[--archive PATH] [beam options]``

* ``FILE`` declares the subscribers (JSON, or TOML for ``.toml``): name,
  optional ``event_types`` and ``keys`` filters, and a ``sink`` that is
  ``kafka://HOST:PORT/TOPIC`` or an archive path (see
  :mod:`transforms.fanout_core`).
* ``SOURCE`` is the published stream, ``kafka://HOST:PORT/TOPIC`` (JSON
  envelopes as ``run.py stream --publish-topic`` writes them), or an archive
  path (a bounded replay through the same fan-out).
* ``--archive PATH`` backfills: the archive's events and then the live topic,
  read from its earliest offset, go through one per-key ordering step, so each
  subscriber receives a key's history and then its live events in sequence
  order, each sequence once. Why no gap and no duplicate, without depending on
  where the archive ended in the topic: the ordering step applies sequence
  ``n + 1`` of a key only after ``n`` and drops any sequence already applied
  (counted in the summary as ``duplicate``), and the topic is read from a point
  at or before the archive's end (its earliest offset). If Kafka's retention
  has already dropped events the archive does not hold, the key waits on the
  gap instead of skipping it (``held_on_gap`` in the summary, or
  ``--gap-timeout`` to move on and report the gap).

Why the topic is read from its earliest offset with no committed offsets: the
fan-out keeps no position of its own, and per-key ordering state lives in the
runner; a restart re-reads the retained topic (subscribers then receive those
events again: delivery is at-least-once across restarts, exactly-once per key
within a run). ``transforms.handoff`` (the live stream's archive with recorded
Kafka offsets) gives an offset-exact hand-off for the raw topic; fan-out reads
the published topic, whose per-key sequence numbers make the hand-off exact
without offsets.

With ``--max-records N`` (Kafka) or an archive source the run is bounded and
writes ``DIR/summary.json``: events in, deliveries out per subscriber, events
that matched nobody, and every event not delivered with its reason
(``DIR/unprocessed.jsonl``, ``DIR/dead_letters.jsonl`` for messages that were
not envelopes). Without ``--max-records`` a Kafka source runs live until stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from sourcebeam.pipelines import outputs, runners
from sourcebeam.pipelines.apps import add_app_argument, load_app
from sourcebeam.pipelines.cli import UsageError
from sourcebeam.transforms.app import App
from sourcebeam.pipelines.options import Pipeline, pipeline_options, stop_after_dry_run
from sourcebeam.transforms.fanout import ARCHIVE_CODECS, MATCHED, UNMATCHED, FanOut, ParseEnvelopes, prepare_archive_sinks
from sourcebeam.transforms.kafka_read import ReadKafkaMessages, check_bounded_read, message_value
from sourcebeam.transforms.fanout_core import Subscriber, load_subscribers, parse_sink

COUNTS_FILE = '_fanout_counts.json'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = (
      'Subscriber file (JSON; TOML if it ends in .toml):\n'
      '  {"subscribers": [\n'
      '    {"name": "carts", "event_types": ["CartItemAdded", "CartItemRemoved"],\n'
      '     "keys": ["u-00001*"], "sink": "kafka://127.0.0.1:9092/carts"},\n'
      '    {"name": "catalog", "event_types": ["ProductCreated"], "sink": "/data/catalog"}]}\n'
      'event_types and keys are optional (default: all); keys are exact keys or globs.\n'
      'Each subscriber receives every matching event once, in sequence order per partition key.\n'
      'Unknown --options go to Beam (Kafka sources need --runner=PrismRunner or Flink).')
  parser.add_argument('--subscribers', required=True, metavar='FILE',
                      help='the subscriber file (see below)')
  parser.add_argument('--source', required=True, metavar='SOURCE',
                      help='the published stream, kafka://HOST:PORT/TOPIC (JSON envelopes, read '
                           'from the earliest offset), or an archive path to fan out')
  parser.add_argument('--out', required=True, metavar='DIR',
                      help='where summary.json, unprocessed.jsonl and dead_letters.jsonl go')
  parser.add_argument('--max-records', type=int, metavar='N',
                      help='read the first N Kafka messages and stop (a bounded run)')
  parser.add_argument('--archive', metavar='PATH',
                      help='backfill: deliver this archive\'s events first, then attach to the '
                           'live topic without a gap or a duplicate per key')
  parser.add_argument('--gap-timeout', type=float, metavar='SECONDS',
                      help='event-time seconds a key waits for a missing sequence before skipping '
                           'it (reported); default: wait')
  parser.add_argument('--archive-codec', choices=ARCHIVE_CODECS, default='null',
                      help='Avro codec of archive sinks (default: null; deflate costs CPU per '
                           'delivery, see transforms/fanout.py)')
  parser.add_argument('--group-id', default='sourcebeam-fanout',
                      help='Kafka consumer group (default: sourcebeam-fanout)')
  add_app_argument(parser)


def _is_kafka(source: str) -> bool:
  return source.startswith('kafka://')


def read_events(p: beam.Pipeline, app: App, source: str, *, archive: Optional[str],
                max_records: Optional[int], group_id: str) -> Dict[str, beam.PCollection]:
  """``{'events', 'dead', 'in'}`` from the source, with the backfill archive's events first."""
  from sourcebeam.transforms.archive import ReadArchive
  if not _is_kafka(source):
    read = p | 'ReadSource' >> ReadArchive(source, registry=app.registry)
    return {'events': read['events'], 'dead': read['corrupt'], 'in': read['events']}
  messages = read_kafka(p, source, group_id, max_records)
  parsed = (messages
            | 'Values' >> beam.Map(message_value)
            | 'Parse' >> beam.ParDo(ParseEnvelopes()).with_outputs(ParseEnvelopes.DEAD, main='events'))
  if archive is None:
    return {'events': parsed.events, 'dead': parsed[ParseEnvelopes.DEAD], 'in': messages}
  backfill = p | 'ReadBackfill' >> ReadArchive(archive, registry=app.registry)
  events = (backfill['events'], parsed.events) | 'BackfillThenLive' >> beam.Flatten()
  dead = (backfill['corrupt'], parsed[ParseEnvelopes.DEAD]) | 'AllDead' >> beam.Flatten()
  ins = (backfill['events'], messages) | 'AllIn' >> beam.Flatten()
  return {'events': events, 'dead': dead, 'in': ins, 'backfill': backfill['events']}


def read_kafka(p: beam.Pipeline, source: str, group_id: str, max_records: Optional[int]) -> beam.PCollection:
  """The topic from its earliest offset, never committing offsets (see the module docstring)."""
  sink = parse_sink(source, '--source')
  return p | 'ReadKafka' >> ReadKafkaMessages(
      sink.bootstrap, sink.target, group_id, max_records,
      expansion_service=runners.kafka_io_service(p.options))


def _count(pcoll: beam.PCollection, name: str, label: str) -> beam.PCollection:
  return pcoll | label >> beam.Map(lambda _: (name, 1))


def _unprocessed_json(rec: Dict[str, Any]) -> str:
  from sourcebeam.schemas.envelope import to_json
  rec = dict(rec)
  ev = rec.get('event')
  if isinstance(ev, dict):
    try:
      rec['event'] = json.loads(to_json(ev))
    except Exception:  # pylint: disable=broad-except
      rec['event'] = repr(ev)[:2000]
  return json.dumps(rec, default=repr, sort_keys=True)


def build(p: beam.Pipeline, app: App, subscribers: Sequence[Subscriber], source: str, out: str, *,
          archive: Optional[str], max_records: Optional[int], gap_timeout: Optional[float],
          group_id: str, bounded: bool, archive_codec: str = 'null') -> None:
  read = read_events(p, app, source, archive=archive, max_records=max_records, group_id=group_id)
  result = read['events'] | 'FanOut' >> FanOut(subscribers, registry=app.registry,
                                               gap_timeout=gap_timeout, archive_codec=archive_codec)
  if not bounded:
    return
  result.unprocessed | 'UnprocessedJson' >> beam.Map(_unprocessed_json) | 'WriteUnprocessed' >> (
      outputs.write_lines(out, 'unprocessed.jsonl'))
  read['dead'] | 'DeadJson' >> beam.Map(json.dumps, sort_keys=True) | 'WriteDead' >> (
      outputs.write_lines(out, 'dead_letters.jsonl'))
  parts = [
      _count(read['in'], 'in', 'CountIn'),
      _count(read['events'], 'events', 'CountEvents'),
      _count(read['dead'], 'dead_lettered', 'CountDead'),
      result.counts,
      result.unprocessed | 'ByReason' >> beam.Map(lambda r: (f'unprocessed:{r["reason"]}', 1)),
      result.status | 'Held' >> beam.Map(lambda s: ('held_on_gap', s.get('buffered', 0))),
  ]
  if 'backfill' in read:
    parts.append(_count(read['backfill'], 'backfill_events', 'CountBackfill'))
  (parts
   | 'AllCounts' >> beam.Flatten()
   | 'Sum' >> beam.CombinePerKey(sum)
   | 'ToDict' >> beam.combiners.ToDict()
   | 'ToJson' >> beam.Map(lambda d: json.dumps(d, sort_keys=True))
   | 'WriteCounts' >> outputs.write_lines(out, COUNTS_FILE))


def summarize(counted: Dict[str, int], subscribers: Sequence[Subscriber]) -> Dict[str, Any]:
  """The run's summary from its counts; AssertionError if an event is unaccounted for."""
  unprocessed = {k.split(':', 1)[1]: v for k, v in counted.items() if k.startswith('unprocessed:')}
  summary = {
      'in': counted.get('in', 0), 'events': counted.get('events', 0),
      'dead_lettered': counted.get('dead_lettered', 0),
      'delivered_events': counted.get(MATCHED, 0), 'unmatched': counted.get(UNMATCHED, 0),
      'unprocessed': unprocessed, 'held_on_gap': counted.get('held_on_gap', 0),
      'deliveries': {s.name: counted.get(s.name, 0) for s in subscribers},
  }
  if 'backfill_events' in counted:
    summary['backfill_events'] = counted['backfill_events']
  summary['total_deliveries'] = sum(summary['deliveries'].values())
  accounted = (summary['delivered_events'] + summary['unmatched'] + sum(unprocessed.values())
               + summary['held_on_gap'])
  if summary['events'] != accounted:
    raise AssertionError(f'fan-out lost track of events: {summary}')
  return summary


def run(subscribers: Sequence[Subscriber], source: str, out: str, beam_args: List[str], *,
        app: App, archive: Optional[str] = None, max_records: Optional[int] = None,
        gap_timeout: Optional[float] = None, group_id: str = 'sourcebeam-fanout',
        archive_codec: str = 'null') -> Optional[Dict[str, Any]]:
  """Run the fan-out; the summary for a bounded run, None for a live one (after it stops)."""
  bounded = not _is_kafka(source) or max_records is not None
  kafka_sinks = any(s.sink.kind == 'kafka' for s in subscribers)
  options = pipeline_options(beam_args, streaming=not bounded,
                             worker_extras=['kafka'] if kafka_sinks else [])
  FileSystems.set_options(options)
  if _is_kafka(source) and bounded and not runners.is_dry_run(beam_args):
    kafka = parse_sink(source, '--source')
    check_bounded_read(kafka.bootstrap, kafka.target, max_records, group_id=group_id)
  outputs.prepare(out)
  prepare_archive_sinks(subscribers)
  started = time.monotonic()
  with Pipeline(options=options) as p:
    build(p, app, subscribers, source, out, archive=archive, max_records=max_records,
          gap_timeout=gap_timeout, group_id=group_id, bounded=bounded, archive_codec=archive_codec)
  stop_after_dry_run(p, beam_args)
  if not bounded:
    return None
  with FileSystems.open(outputs.join(out, COUNTS_FILE)) as f:
    counted = json.loads(f.read().decode('utf-8'))
  summary = summarize(counted, subscribers)
  summary.update(app=app.name, source=source, archive=archive, seconds=round(time.monotonic() - started, 3))
  outputs.write_json(out, 'summary.json', summary)
  return summary


def check_arguments(args: argparse.Namespace) -> None:
  if args.max_records is not None and args.max_records <= 0:
    raise UsageError('--max-records must be positive')
  if args.gap_timeout is not None and args.gap_timeout <= 0:
    raise UsageError('--gap-timeout must be positive')
  if _is_kafka(args.source):
    if parse_sink(args.source, '--source').kind != 'kafka':
      raise UsageError(f'--source must be kafka://HOST:PORT/TOPIC or an archive path, got {args.source!r}')
  else:
    from sourcebeam.transforms.archive import check_archive_path
    if args.max_records is not None:
      raise UsageError('--max-records applies to a Kafka source; an archive source is bounded')
    if args.archive:
      raise UsageError('--archive backfills before a live Kafka source; the source is an archive')
    check_archive_path(args.source)
  if args.archive:
    from sourcebeam.transforms.archive import check_archive_path
    check_archive_path(args.archive)


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  app = load_app(args.app)
  subscribers = load_subscribers(args.subscribers, app.registry.event_types)
  check_arguments(args)
  summary = run(subscribers, args.source, args.out, beam_args, app=app, archive=args.archive,
                max_records=args.max_records, gap_timeout=args.gap_timeout, group_id=args.group_id,
                archive_codec=args.archive_codec)
  if summary:
    print(f'fan-out of {summary["events"]} events to {len(subscribers)} subscribers: '
          f'{summary["total_deliveries"]} deliveries, {summary["unmatched"]} matched nobody, '
          f'{sum(summary["unprocessed"].values())} not delivered (see unprocessed.jsonl), '
          f'{summary["dead_lettered"]} dead-lettered; summary in {args.out}/summary.json',
          file=sys.stderr)
    print(json.dumps({'deliveries': summary['deliveries']}))
  return 0
