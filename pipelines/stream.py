"""The live path: the same publish step and consumers, fed by a Kafka topic.

``run.py stream --source kafka://HOST:PORT/TOPIC --out DIR [beam options]``
reads the topic with Beam's ``ReadFromKafka`` (a cross-language transform: it
runs on Prism and Flink, see :mod:`pipelines.runners`), sends every message
through the publishing step of ``run.py publish`` (the boundary, then the
resequencer numbering each key 1, 2, 3 ... without holes, with its timers for
holes: :class:`transforms.live_archive.PublishKafkaMessages`, which keeps each
message's Kafka offset; ``--published-source`` skips the renumbering for a topic
that is already a published stream, such as the event writer's), and then:

* with ``--max-records N`` (a bounded read of the first N messages, so a run
  ends): applies every consumer of the application (``--app``, the demo
  without it) with :class:`sourcebeam.transforms.consumers.ApplyApp`, the same
  consumer objects ``run.py replay`` applies to the archive, and writes the
  same outputs under ``DIR/consumers/`` and a ``summary.json``. Same code,
  other source: a test checks that a replay and a run from Kafka give
  identical outputs;
* always, when asked: ``--views DSN`` keeps the app's views in a database
  with per-partition positions (:mod:`transforms.view_store`, read by
  ``run.py serve views``), ``--publish-topic T`` writes the published stream
  back to Kafka, keyed by partition key, with ``WriteToKafka``, and
  ``--output-topic-prefix P`` sends the app's projections (``P.<name>``, keyed
  by partition key) and the outputs its consumers declare ``live``
  (``P.<consumer>.<output>``; for the demo ``P.taxi.joined``, rides joined with
  fares, and ``P.riders.rider_located``, riders joined with their taxi's position
  across partition keys) to Kafka, computed by the same transforms as the
  replay's, live or bounded;
* ``--archive PATH [--archive-window SECONDS] [--archive-flush SECONDS]``:
  the live path archives too (:mod:`transforms.live_archive`), in fixed
  event-time windows (default 3600 s: the archive's ``hour=`` partition) whose
  files appear every ``--archive-flush`` seconds (default 60) while the stream
  runs, each with a sidecar under ``PATH/_offsets/`` naming the Kafka offset
  of each of its events (dead letters' offsets too), so today's live stream is
  tomorrow's replay.

``run.py stream --from-archive PATH --source kafka://HOST:PORT/TOPIC --out DIR``
hands off from archive to live (:mod:`transforms.handoff`): it replays the
archive's events up to the per-partition offsets the archive recorded (the
contiguous prefix of covered offsets), then reads the topic from exactly those
offsets, into the same consumers, views and published topic; no event is
missed or doubled at the hand-off. With ``--max-records N`` it reads N messages
after the recorded offsets and stops. An archive without recorded offsets, or
with another topic's, is a usage error (exit 2), as is a recorded offset Kafka
no longer retains. ``--archive`` may name the same archive, to keep archiving.

Event time: the read takes each message's Kafka timestamp (CreateTime) as its
element timestamp, so producers set it to the event's ``event_time`` and the
watermark follows event time; a live producer writing events as they happen
gets that for free, and a producer replaying history must set it.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.kafka import WriteToKafka

from sourcebeam.pipelines import outputs, runners, worker_tuning
from sourcebeam.pipelines.apps import add_app_argument, load_app
from sourcebeam.pipelines.cli import UsageError
from sourcebeam.pipelines.publish import (add_resequence_arguments, publishing_counts,
                                             resequence_options)
from sourcebeam.pipelines.replay import not_applied, unprocessed_by_reason
from sourcebeam.pipelines.options import Pipeline, pipeline_options, stop_after_dry_run
from sourcebeam.schemas.envelope import to_json
from sourcebeam.transforms.app import App
from sourcebeam.transforms.consumers import ApplyApp, AppResult, WriteAppOutputs, held_counts
from sourcebeam.transforms.counting import WriteCounts, read_counts
from sourcebeam.transforms.keyspace import to_line
from sourcebeam.transforms.archive import read_manifest
from sourcebeam.transforms.archive_format import DEFAULT_BUCKETS
from sourcebeam.transforms.handoff import ReplayThenLive, plan_handoff
from sourcebeam.transforms.kafka_read import (DEFAULT_POLL_TIMEOUT_S, ReadKafkaMessages,
                                              check_bounded_read, read_consumer_config)
from sourcebeam.transforms.kafka_url import TOPIC_NAME, KafkaTopic, parse_kafka_url
from sourcebeam.transforms.live_archive import (
    DEFAULT_FLUSH_SECONDS, DEFAULT_WINDOW_SECONDS, ArchiveLive, PublishKafkaMessages, view_source)
from sourcebeam.transforms.publish import dead_letter_json

def parse_source(text: str) -> KafkaTopic:
  source = parse_kafka_url(text)
  if not source:
    raise UsageError(f'--source must look like kafka://HOST:PORT/TOPIC, got {text!r}')
  return source


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--source', required=True, metavar='kafka://HOST:PORT/TOPIC',
                      help='the raw (or published) event topic to read from its earliest offset')
  parser.add_argument('--out', required=True, metavar='DIR',
                      help='where published events, dead letters, consumer outputs and summary.json go')
  parser.add_argument('--max-records', type=int, metavar='N',
                      help='read the first N messages and stop (a bounded run); without it the '
                           'run is live and unbounded. With --from-archive: N messages after the '
                           "archive's recorded offsets. From 10,000 KafkaIO splits N among readers "
                           'that each own some partitions; a warning says when one must wait for '
                           'more messages than its partitions hold')
  parser.add_argument('--views', metavar='DSN',
                      help="also keep the app's views in this database (SQLite path or postgresql://)")
  parser.add_argument('--stage-times', action='store_true',
                      help='with --views: also record when each event reached each stage of the '
                           "view pipeline, in the view store's stage_times table (what "
                           '`run.py bench causal --breakdown` reads)')
  parser.add_argument('--publish-topic', metavar='TOPIC',
                      help='also write the published events to this Kafka topic')
  parser.add_argument('--output-topic-prefix', '--joined-topic-prefix', metavar='PREFIX',
                      dest='output_topic_prefix',
                      help="also send the app's projections to Kafka topics PREFIX.<name> (keyed by "
                           'partition key) and the outputs its consumers declare live to '
                           'PREFIX.<consumer>.<output> (the demo: rides joined with fares to '
                           'PREFIX.taxi.joined, riders located by their taxi to '
                           'PREFIX.riders.rider_located)')
  parser.add_argument('--group-id', default='sourcebeam-stream',
                      help='Kafka consumer group (default: sourcebeam-stream)')
  parser.add_argument('--kafka-consumer', action='append', default=[], metavar='KEY=VALUE',
                      help='a Kafka consumer setting for the read (repeatable), e.g. '
                           'fetch.max.wait.ms=100 or max.poll.records=200')
  parser.add_argument('--kafka-poll-timeout', type=int, default=DEFAULT_POLL_TIMEOUT_S,
                      metavar='SECONDS',
                      help="the splittable Kafka read's polling timeout (Prism, Dataflow), whole "
                           'seconds, at least 1: how long it may keep a bundle open while records '
                           "keep coming (default %(default)s, KafkaIO's; Flink's read takes only "
                           'that)')
  parser.add_argument('--archive', metavar='PATH',
                      help='also archive the published events (local, s3:// or gs://) while the '
                           'stream runs, in event-time windows, with the Kafka offsets each file '
                           'covers under PATH/_offsets/ (what --from-archive hands off from)')
  parser.add_argument('--archive-window', type=int, default=DEFAULT_WINDOW_SECONDS, metavar='SECONDS',
                      help='event-time window of the live archive (default: %(default)s, an hour, '
                           "the archive's own partition)")
  parser.add_argument('--archive-flush', type=int, default=DEFAULT_FLUSH_SECONDS, metavar='SECONDS',
                      help='write what a window holds so far every SECONDS of processing time '
                           '(default: %(default)s); the window also closes on the watermark')
  parser.add_argument('--from-archive', metavar='PATH',
                      help='first replay this archive (written by stream --archive) up to the '
                           'per-partition Kafka offsets it recorded, then read --source from exactly '
                           'those offsets: no event missed or doubled at the hand-off')
  parser.add_argument('--published-source', action='store_true',
                      help='the topic is already a published stream (the event writer\'s): keep '
                           'its sequences instead of renumbering each key')
  add_resequence_arguments(parser)
  add_app_argument(parser)


def read_kafka(p: beam.Pipeline, source: KafkaTopic, group_id: str,
               max_records: Optional[int], **read_options: Any) -> beam.PCollection:
  return p | 'ReadKafka' >> ReadKafkaMessages(
      source.bootstrap, source.topic, group_id, max_records,
      expansion_service=runners.kafka_io_service(p.options), **read_options)


def kafka_read_options(args: argparse.Namespace, beam_args: List[str]) -> Dict[str, Any]:
  """``--kafka-consumer KEY=VALUE`` and ``--kafka-poll-timeout`` as ReadKafkaMessages' options.
  On Flink the read is KafkaIO's legacy unbounded read, which refuses a poll timeout other
  than KafkaIO's default (its reader polls on its own)."""
  config = {}
  for item in args.kafka_consumer:
    key, sep, value = item.partition('=')
    if not sep or not key.strip():
      raise UsageError(f'--kafka-consumer takes KEY=VALUE, got {item!r}')
    config[key.strip()] = value.strip()
  read_consumer_config('', args.group_id, config)  # ConfigError now for a setting the read owns
  timeout = args.kafka_poll_timeout
  legacy = runners.runner_of(beam_args) in runners.FLINK_RUNNERS
  if legacy and timeout != DEFAULT_POLL_TIMEOUT_S:
    raise UsageError(f'--kafka-poll-timeout is for the splittable Kafka read (Prism, Dataflow); '
                     f"Flink's read (KafkaIO's legacy one) takes only the default "
                     f'{DEFAULT_POLL_TIMEOUT_S}')
  if timeout < 1:
    raise UsageError('--kafka-poll-timeout is whole seconds, at least 1 (with 0 the splittable '
                     'read would return without polling)')
  return {'consumer_config': config, 'poll_timeout_s': timeout}



class ArchiveSettings(NamedTuple):
  """Where and how a live run archives (``--archive``, ``--archive-window``, ``--archive-flush``)."""
  path: str
  window_seconds: int = DEFAULT_WINDOW_SECONDS
  flush_seconds: int = DEFAULT_FLUSH_SECONDS


def _archive_layout(path: str) -> Tuple[str, int]:
  """(format, buckets) to write: the archive's own if it exists, else avro in 16 buckets."""
  try:
    manifest = read_manifest(path)
  except ValueError as e:
    raise UsageError(f'cannot add to {path}: {e}') from None
  return (manifest['format'], manifest['buckets']) if manifest else ('avro', DEFAULT_BUCKETS)


def build_stream(p: beam.Pipeline, app: App, source: KafkaTopic, out: str, *,
                 max_records: Optional[int], views: Optional[str] = None,
                 publish_topic: Optional[str] = None, group_id: str = 'sourcebeam-stream',
                 archive: Optional[ArchiveSettings] = None, from_archive: Optional[str] = None,
                 output_topic_prefix: Optional[str] = None,
                 resequence: Optional[Dict[str, Any]] = None,
                 renumber: bool = True,
                 stage_times: bool = False,
                 kafka_read: Optional[Dict[str, Any]] = None) -> Dict[str, beam.PCollection]:
  registry = app.registry
  if from_archive:
    handoff = p | 'ReplayThenLive' >> ReplayThenLive(
        from_archive, source, registry=registry, max_records=max_records,
        expansion_service=runners.kafka_io_service(p.options), resequence=resequence,
        renumber=renumber)
    result, live, messages = handoff, handoff.live, handoff.messages
  else:
    messages = read_kafka(p, source, group_id, max_records, **(kafka_read or {}))
    result = live = messages | 'Publish' >> PublishKafkaMessages(
        registry, resequence=resequence, renumber=renumber)
  # The consumers' own held_on_gap is counted below: the resequencer's is publish_held here.
  counts = {'in': messages, 'published': result.published,
            **publishing_counts(result.dead_letters, result.duplicates, result.stats,
                                'publish_held')}
  if views and app.views:
    from sourcebeam.transforms.view_store import ViewChanges, WriteViewsToStore
    ((result.published_refs | 'ViewEvents' >> beam.Map(lambda pr: (pr[0], view_source(pr[1]))),
      result.dead_refs | 'ViewRefused' >> beam.Map(lambda dr: (None, view_source(dr[1]))))
     | 'AsViewMessages' >> beam.Flatten()
     | 'ViewChanges' >> ViewChanges(app, stage_times=stage_times)
     | 'WriteViews' >> WriteViewsToStore(views, [v.name for v in app.views],
                                         stage_times=stage_times))
  if publish_topic:
    result.published | 'PublishToKafka' >> ToKafka(
        lambda e: (e['partition_key'].encode(), to_json(e).encode()), source.bootstrap, publish_topic)
  if archive:
    fmt, buckets = _archive_layout(archive.path)
    counts['archive/sidecars'] = (live.published_refs, live.dead_refs) | 'ArchiveLive' >> ArchiveLive(
        archive.path, window_seconds=archive.window_seconds, flush_seconds=archive.flush_seconds,
        format=fmt, buckets=buckets, registry=registry)
  applied = None
  if max_records is not None:
    result.published | 'PublishedJson' >> beam.Map(to_json) | 'WritePublished' >> outputs.write_lines(
        out, 'published.jsonl')
    result.dead_letters | 'DeadLetterJson' >> beam.Map(dead_letter_json) | 'WriteDead' >> (
        outputs.write_lines(out, 'dead_letters.jsonl'))
    result.duplicates | 'DuplicateJson' >> beam.Map(dead_letter_json) | 'WriteDuplicates' >> (
        outputs.write_lines(out, 'duplicates.jsonl'))
    applied = result.published | 'Consumers' >> ApplyApp(app)
    counts['events'] = result.published
    counts.update(applied | 'WriteOutputs' >> WriteAppOutputs(app, outputs.join(out, 'consumers')))
    counts.update(held_counts(applied.held))
  if output_topic_prefix:
    if applied is None:  # live: the projections and the consumers (the views go to the store)
      applied = result.published | 'Consumers' >> ApplyApp(app, kinds=('projection',))
    for name, (topic, pcoll, message) in live_outputs(app, applied, output_topic_prefix).items():
      pcoll | f'ToKafka {name}' >> ToKafka(message, source.bootstrap, topic)
  return counts


def output_topic(prefix: str, name: str) -> str:
  """``--output-topic-prefix P``'s topic for the output ``name``: ``P.taxi.joined`` ..."""
  return f'{prefix}.{name.replace("/", ".")}'


def _encode_key(key: Any) -> Optional[bytes]:
  return None if key is None else str(key).encode('utf-8')


def live_outputs(app: App, applied: AppResult, prefix: str
                 ) -> Dict[str, Tuple[str, beam.PCollection, Callable[[Any], Tuple[bytes, bytes]]]]:
  """``{output: (topic, PCollection, element -> (key, value) bytes)}`` of what a run sends to
  Kafka: every projection (keyed by partition key, the output as JSON) and each consumer
  output named in its ``live`` (keyed by its key function, the output's line)."""
  sent = {}
  for name, pcoll in applied.projections.items():
    sent[name] = (output_topic(prefix, name), pcoll,
                  lambda kv: (_encode_key(kv[0]), to_line(kv[1]).encode('utf-8')))
  for c in app.transforms:
    if c.live is None:
      continue
    keyed = {c.name: c.live} if callable(c.live) else {f'{c.name}/{k}': f for k, f in c.live.items()}
    for name, key_fn in keyed.items():
      if name not in applied.consumers:
        raise UsageError(f'consumer {c.name} declares live output {name!r}, which it does not '
                         f'return (it returns {sorted(k for k in applied.consumers if k.startswith(c.name))})')
      sent[name] = (output_topic(prefix, name), applied.consumers[name],
                    lambda e, f=key_fn: (_encode_key(f(e)), to_line(e).encode('utf-8')))
  return sent


class ToKafka(beam.PTransform):
  """Elements -> ``topic``, each as the (key, value) bytes ``message`` makes of it, through
  Beam's ``WriteToKafka`` with the expansion service this runner needs."""

  def __init__(self, message: Callable[[Any], Tuple[bytes, bytes]], bootstrap: str, topic: str):
    super().__init__()
    self.message, self.bootstrap, self.topic = message, bootstrap, topic

  def expand(self, pcoll):
    return (pcoll
            # The cross-language write needs the element type to pick its coder.
            | 'Message' >> beam.Map(self.message).with_output_types(Tuple[bytes, bytes])
            | 'WriteToKafka' >> WriteToKafka(
                producer_config={'bootstrap.servers': self.bootstrap}, topic=self.topic,
                expansion_service=runners.kafka_io_service(pcoll.pipeline.options)))


def run(source: KafkaTopic, out: str, beam_args: List[str], *, app: App, max_records: Optional[int],
        views: Optional[str] = None, publish_topic: Optional[str] = None,
        group_id: str = 'sourcebeam-stream', archive: Optional[ArchiveSettings] = None,
        from_archive: Optional[str] = None,
        output_topic_prefix: Optional[str] = None,
        resequence: Optional[Dict[str, Any]] = None,
        renumber: bool = True,
        stage_times: bool = False,
        kafka_read: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, Any]]:
  bounded = max_records is not None
  if views and not bounded:  # the live view pipeline: latency first (explicit options win)
    beam_args = runners.live_view_args(beam_args)
  from sourcebeam.transforms.view_store import is_postgres
  options = pipeline_options(beam_args, streaming=not bounded,
                             worker_extras=['postgres'] if views and is_postgres(views) else [])
  FileSystems.set_options(options)
  plan = None
  if from_archive:  # before anything runs: a bad archive is one line and exit 2
    plan = plan_handoff(from_archive, source.topic)
  if bounded and not runners.is_dry_run(beam_args):  # warns if a reader must wait for more
    check_bounded_read(source.bootstrap, source.topic, max_records, group_id=group_id,
                       start_offsets=dict(plan.offsets) if plan else None)
  outputs.prepare(out)
  started = time.monotonic()
  with Pipeline(options=options) as p:
    counts = build_stream(p, app, source, out, max_records=max_records, views=views,
                          publish_topic=publish_topic, group_id=group_id, archive=archive,
                          from_archive=from_archive, output_topic_prefix=output_topic_prefix,
                          resequence=resequence, renumber=renumber,
                          stage_times=stage_times, kafka_read=kafka_read)
    if bounded:
      counts | 'Counts' >> WriteCounts(outputs.join(out, '_counts.json'))
    elif views:  # a live view pipeline runs for good in this process: latency first
      worker_tuning.freeze_startup_heap()
  stop_after_dry_run(p, beam_args)
  if not bounded:
    return None
  seconds = time.monotonic() - started
  counted = read_counts(outputs.join(out, '_counts.json'))
  summary = {k: counted.pop(k, 0) for k in ('in', 'published', 'dead_lettered', 'events', 'gaps',
                                            'missing_raw_sequences', 'duplicates_dropped',
                                            'publish_held', 'held_on_gap', 'held_on_gap_keys')}
  summary.update(app=app.name, source=f'kafka://{source.bootstrap}/{source.topic}', outputs=counted,
                 seconds=round(seconds, 3))
  if plan is not None:
    summary['handoff'] = {'archive': from_archive, 'archived_events': plan.archived_events,
                          'offsets': {f'{t}/{p}': o for (t, p), o in sorted(plan.offsets.items())}}
  if summary['in'] != (summary['published'] + summary['dead_lettered'] +
                       summary['duplicates_dropped'] + summary.pop('publish_held')):
    raise AssertionError(f'events lost in publish: {summary}')
  summary['unprocessed'] = unprocessed_by_reason(outputs.join(out, 'consumers'))
  outputs.write_json(out, 'summary.json', summary)
  return summary


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  source = parse_source(args.source)
  if args.max_records is not None and args.max_records <= 0:
    raise UsageError('--max-records must be positive')
  if args.archive_window < 1 or args.archive_flush < 1:
    raise UsageError('--archive-window and --archive-flush must be at least 1 second')
  if args.output_topic_prefix is not None and not TOPIC_NAME.match(args.output_topic_prefix):
    raise UsageError('--output-topic-prefix must be letters, digits, ".", "_" or "-", '
                     f'got {args.output_topic_prefix!r}')
  kafka_read = kafka_read_options(args, beam_args)
  app = load_app(args.app)
  archive = ArchiveSettings(args.archive, args.archive_window, args.archive_flush) if args.archive else None
  summary = run(source, args.out, beam_args, app=app, max_records=args.max_records,
                views=args.views, publish_topic=args.publish_topic, group_id=args.group_id,
                archive=archive, from_archive=args.from_archive,
                output_topic_prefix=args.output_topic_prefix,
                resequence=resequence_options(args), renumber=not args.published_source,
                stage_times=args.stage_times, kafka_read=kafka_read)
  if summary:
    print(f'read {summary["in"]} messages from {summary["source"]}: {summary["published"]} '
          f'published, {summary["dead_lettered"]} dead-lettered, {summary["duplicates_dropped"]} '
          f'duplicates dropped; summary in {args.out}/summary.json', file=sys.stderr)
    print(f'not applied: {not_applied(summary)}', file=sys.stderr)
  return 0
