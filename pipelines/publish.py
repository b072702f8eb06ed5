"""Fix the stream: publish raw events, dead-letter what cannot be repaired, archive the rest.

``run.py publish --input RAW --out DIR [--archive PATH] [--app MODULE:ATTR]``
reads raw JSON lines (a local path, a glob, ``s3://`` or ``gs://``; ``-`` or a
named pipe is copied to a temporary file first, see :mod:`pipelines.inputs`),
checks them against the application's schemas (the demo's without ``--app``),
and writes:

* ``DIR/published.jsonl``: clean envelopes in their JSON form, every key space's
  partition key numbered 1, 2, 3 ... without holes or repeats (the resequencer,
  :mod:`transforms.resequence`; ``raw_sequence`` keeps the raw number);
* ``DIR/dead_letters.jsonl``: each refused line whole, with a reason (a line over
  ``--max-event-bytes`` is cut off while it is read: its first bytes are kept);
* ``DIR/duplicates.jsonl``: one line per copy dropped (same event, or same key and raw
  sequence with the same content);
* ``DIR/summary.json``: counts, with ``in == published + dead_lettered +
  duplicates_dropped`` always; ``gaps`` (dead letters naming raw sequences that never
  came, which carry no input) and ``missing_raw_sequences`` apart;
* the archive at PATH when ``--archive`` is given (Avro by default).

What it repairs and what it refuses is documented in :mod:`schemas.validation`.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Dict, List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from sourcebeam.pipelines import outputs
from sourcebeam.pipelines.apps import add_app_argument, load_app
from sourcebeam.pipelines.cli import UsageError
from sourcebeam.pipelines.inputs import check_input, raw_input  # noqa: F401 (check_input: API)
from sourcebeam.pipelines.options import Pipeline, pipeline_options, stop_after_dry_run
from sourcebeam.schemas.validation import DEFAULT_MAX_EVENT_BYTES
from sourcebeam.transforms.app import App
from sourcebeam.transforms.archive import WriteArchive
from sourcebeam.transforms.bounded_publish import PublishLineBatches
from sourcebeam.transforms.counting import WriteSummedCounts, read_counts
from sourcebeam.transforms.line_reader import ReadRawLineBatches
from sourcebeam.transforms.publish import is_gap
from sourcebeam.transforms.resequence import (DEFAULT_GAP_TIMEOUT, DEFAULT_GAP_TIMEOUT_PROCESSING,
                                              DEFAULT_HISTORY, EVENT_TIME, FIRST_SEEN,
                                              RAW_SEQUENCE)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--input', required=True, metavar='RAW',
                      help='raw events as JSON lines: a file, a glob, an s3:// or gs:// path, '
                           'or - (stdin) or a named pipe (copied to a temporary file first)')
  parser.add_argument('--out', required=True, metavar='DIR',
                      help='where published.jsonl, dead_letters.jsonl and summary.json go')
  parser.add_argument('--archive', metavar='PATH',
                      help='also write the published events to the event archive at PATH '
                           '(local, s3:// or gs://)')
  parser.add_argument('--archive-format', choices=('avro', 'parquet'), default='avro',
                      help='archive file format (default: avro)')
  parser.add_argument('--max-event-bytes', type=int, default=DEFAULT_MAX_EVENT_BYTES,
                      help=f'lines longer than this are dead-lettered (default: {DEFAULT_MAX_EVENT_BYTES})')
  add_resequence_arguments(parser)
  add_app_argument(parser)


def add_resequence_arguments(parser: argparse.ArgumentParser) -> None:
  """The publishing step's numbering options (publish, stream and the main job share them)."""
  group = parser.add_argument_group(
      'publishing order', 'each key is published as 1, 2, 3 ... in raw order; a raw sequence '
      'that never arrives (a hole) holds the key\'s later events for a bounded time, then is '
      'dead-lettered (reason gap); the end of a bounded input closes every hole')
  group.add_argument('--order-by', choices=(RAW_SEQUENCE, EVENT_TIME), default=RAW_SEQUENCE,
                     help='raw_sequence (default): the raw stream\'s own per-key sequence; '
                          'event_time: for raw streams without one (ties by event_id)')
  group.add_argument('--first-sequence', default='1', metavar='N|first_seen',
                     help="each key's first raw sequence (default 1); first_seen: the first "
                          'that arrives (a stream read from its middle)')
  group.add_argument('--gap-timeout', type=float, default=DEFAULT_GAP_TIMEOUT, metavar='SECONDS',
                     help='event-time seconds a key holds its events behind a hole '
                          f'(default {DEFAULT_GAP_TIMEOUT:g}; live and bounded)')
  group.add_argument('--gap-timeout-processing', type=float,
                     default=DEFAULT_GAP_TIMEOUT_PROCESSING, metavar='SECONDS',
                     help='wall-clock seconds a live run holds them (default '
                          f'{DEFAULT_GAP_TIMEOUT_PROCESSING:g}); 0 turns it off')
  group.add_argument('--history', type=int, default=DEFAULT_HISTORY, metavar='N',
                     help='raw sequences per key remembered to recognise re-delivered copies '
                          f'(default {DEFAULT_HISTORY}); an older copy is dead-lettered late')


def resequence_options(args: argparse.Namespace) -> Dict[str, Any]:
  """The resequencer's options from :func:`add_resequence_arguments`; UsageError if bad."""
  first: Any = args.first_sequence
  if first != FIRST_SEEN:
    if not first.isascii() or not first.lstrip('-').isdigit():
      raise UsageError(f'--first-sequence must be a whole number or first_seen, got {first!r}')
    first = int(first)
  for name in ('gap_timeout', 'gap_timeout_processing'):
    if getattr(args, name) < 0:
      raise UsageError(f'--{name.replace("_", "-")} must be >= 0 seconds')
  if args.history < 1:
    raise UsageError('--history must be at least 1')
  return {'order_by': args.order_by, 'first_sequence': first, 'gap_timeout': args.gap_timeout,
          'gap_timeout_processing': args.gap_timeout_processing or None, 'history': args.history}


def publishing_counts(dead_letters: beam.PCollection, duplicates: beam.PCollection,
                      stats: beam.PCollection, held: str) -> Dict[str, beam.PCollection]:
  """What a publishing step counts (publish, stream), as PCollections of that many elements:
  ``dead_lettered`` (events refused), ``gaps`` (the reports of raw sequences that never came:
  no input behind them) and their ``missing_raw_sequences``, ``duplicates_dropped``, and under
  the name ``held`` the events the resequencer still held when a bounded input ended."""
  events_dead, gaps = dead_letters | 'GapsApart' >> beam.Partition(lambda d, n: int(is_gap(d)), 2)
  return {'dead_lettered': events_dead, 'gaps': gaps, 'duplicates_dropped': duplicates,
          'missing_raw_sequences': gaps | 'Missing' >> beam.FlatMap(lambda g: [None] * g['count']),
          held: stats | 'PublishHeld' >> beam.FlatMap(lambda s: [None] * s['held'])}


#: Raw lines per element from the read to the publishing boundary.
BATCH_LINES = 1000


def build_publish(p: beam.Pipeline, app: App, input_pattern: str, out: str,
                  archive: Optional[str] = None, archive_format: str = 'avro',
                  max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                  source_name: Optional[str] = None,
                  resequence: Optional[Dict[str, Any]] = None) -> None:
  """Publish (and archive) raw lines against ``app``'s schemas, and count them into
  ``out/_counts.json``.

  A bounded input is published in key buckets, a batch of lines per Beam element
  (:mod:`transforms.bounded_publish`). Lines over ``max_event_bytes`` are cut off while
  they are read and dead-lettered with their first bytes (:mod:`transforms.line_reader`);
  ``source_name`` names the lines' source when the input is a temporary copy (of stdin,
  say)."""
  writer = (WriteArchive(archive, format=archive_format, registry=app.registry)
            if archive else None)
  lines = p | 'ReadRaw' >> ReadRawLineBatches(input_pattern, max_event_bytes, BATCH_LINES)
  publishing = PublishLineBatches(app.registry, max_event_bytes, resequence, archive=writer,
                                  source_name=source_name)
  result = lines | 'Publish' >> publishing
  result.published | 'WritePublished' >> outputs.write_lines(out, 'published.jsonl')
  result.dead_letters | 'WriteDeadLetters' >> outputs.write_lines(out, 'dead_letters.jsonl')
  result.duplicates | 'WriteDuplicates' >> outputs.write_lines(out, 'duplicates.jsonl')
  result.counts | 'Counts' >> WriteSummedCounts(outputs.join(out, '_counts.json'),
                                                publishing.counted)


def run(input_pattern: str, out: str, beam_args: List[str], app: App,
        archive: Optional[str] = None, archive_format: str = 'avro',
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        resequence: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  options = pipeline_options(beam_args)
  FileSystems.set_options(options)
  with raw_input(input_pattern) as raw:  # stdin or a pipe: copied to a file first
    outputs.prepare(out)
    started = time.monotonic()
    with Pipeline(options=options) as p:
      build_publish(p, app, raw.pattern, out, archive, archive_format, max_event_bytes,
                    source_name=raw.source_name, resequence=resequence)
    stop_after_dry_run(p, beam_args)
  seconds = time.monotonic() - started
  summary: Dict[str, Any] = read_counts(outputs.join(out, '_counts.json'))
  summary.update(app=app.name, seconds=round(seconds, 3),
                 events_per_sec=round(summary['in'] / seconds, 1) if seconds else None,
                 outputs={'published': outputs.join(out, 'published.jsonl'),
                          'dead_letters': outputs.join(out, 'dead_letters.jsonl'),
                          'duplicates': outputs.join(out, 'duplicates.jsonl')})
  if archive:
    summary['outputs']['archive'] = archive
  if raw.spooled_bytes is not None:
    summary['input'] = {'given': input_pattern, 'spooled_bytes': raw.spooled_bytes}
  if summary['in'] != (summary['published'] + summary['dead_lettered'] +
                       summary['duplicates_dropped'] + summary['held_on_gap']):
    raise AssertionError(f'events lost in publish: {summary}')
  outputs.write_json(out, 'summary.json', summary)
  return summary


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  if args.max_event_bytes <= 0:
    raise UsageError('--max-event-bytes must be positive')
  app = load_app(args.app)
  summary = run(args.input, args.out, beam_args, app, args.archive, args.archive_format,
                args.max_event_bytes, resequence_options(args))
  print(f'published {summary["published"]} of {summary["in"]} events, '
        f'dead-lettered {summary["dead_lettered"]}, dropped {summary["duplicates_dropped"]} '
        f'duplicate(s), skipped {summary["gaps"]} hole(s) of {summary["missing_raw_sequences"]} '
        f'raw sequence(s) ({summary["events_per_sec"]} events/s); summary in '
        f'{args.out}/summary.json', file=sys.stderr)
  return 0
