"""Replay an event archive through the pipelines: the same consumers as the live stream.

``run.py replay --archive PATH --out DIR`` reads every archived event (local,
``s3://`` or ``gs://``) with :class:`transforms.archive.ReadArchive` and feeds
them to :func:`pipelines.consumers.apply_consumers`, the function the live
pipeline uses too. Only the source differs. A corrupt archive file does not stop
the replay: it is listed with its path and reason in ``DIR/corrupt_files.jsonl``
and ``summary.json``, and the command exits 1. So is a file the replay does not
read because it does not fit the archive: a data file of another format than the
manifest's (the reason names both) or a file in a bucket folder whose name is not
a data file's (:class:`transforms.archive.MatchArchiveFiles`).

The retail projections take the archive's fast path,
:class:`transforms.ordered_replay.ReplayRetailProjections`: one work item per
key bucket, each key's events through the same handlers and ordering core,
without shuffling events (same views and unprocessed records as
``RetailProjections`` on ``ReadArchive``; tested). The one read also hands the
events the retail views do not use (rides, fares, riders) to the taxi and
rider consumers, the same functions the live pipeline calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from sourcebeam.pipelines import consumers, outputs
from sourcebeam.pipelines.cli import DataError
from sourcebeam.pipelines.options import pipeline_options, stop_after_dry_run
from sourcebeam.transforms.archive import check_archive_path
from sourcebeam.transforms.counting import WriteCounts, read_counts
from sourcebeam.transforms.ordered_replay import ReplayRetailProjections
from sourcebeam.transforms.projections import WriteProjections


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--archive', required=True, metavar='PATH',
                      help='the event archive to replay (local, s3:// or gs://)')
  parser.add_argument('--out', required=True, metavar='DIR',
                      help='where the pipelines\' outputs and summary.json go')


STATS_FILE = '_replay_stats.jsonl'


def build_replay(p: beam.Pipeline, archive: str, out: str) -> Dict[str, beam.PCollection]:
  """Every consumer fed from one read of the archive; returns ``{output: PCollection}``
  to count, and writes the read's per-bucket stats (events decoded per type) to
  ``DIR/_replay_stats.jsonl``."""
  replay = p | 'ReplayArchive' >> ReplayRetailProjections(archive, with_unclaimed=True)
  replay.corrupt | 'CorruptJson' >> beam.Map(json.dumps) | 'WriteCorrupt' >> outputs.write_lines(
      out, 'corrupt_files.jsonl')
  replay.stats | 'StatsJson' >> beam.Map(json.dumps) | 'WriteStats' >> outputs.write_lines(
      out, STATS_FILE)
  views = replay.views
  views | 'WriteProjections' >> WriteProjections(outputs.join(out, 'retail'))
  consumers.write_jsonl(views.unprocessed, out, 'retail/unprocessed.jsonl')
  counts: Dict[str, beam.PCollection] = {f'retail/{name}': pc for name, pc in views.views().items()}
  counts['retail/unprocessed'] = views.unprocessed
  others = replay.unclaimed | 'AtEventTime' >> beam.Map(consumers.at_event_time)
  counts.update(consumers.taxi_consumers(others, out))
  counts.update(consumers.rider_consumers(others, out))
  counts['corrupt_files'] = replay.corrupt
  return counts


def run(archive: str, out: str, beam_args: List[str]) -> Dict[str, Any]:
  options = pipeline_options(beam_args)
  FileSystems.set_options(options)
  check_archive_path(archive, beam_args)
  outputs.prepare(out)
  started = time.monotonic()
  with beam.Pipeline(options=options) as p:
    build_replay(p, archive, out) | 'Counts' >> WriteCounts(outputs.join(out, '_counts.json'))
  stop_after_dry_run(p, beam_args)
  seconds = time.monotonic() - started
  counts = read_counts(outputs.join(out, '_counts.json'))
  stats = [json.loads(l) for l in outputs.read_lines(outputs.join(out, STATS_FILE))]
  summary: Dict[str, Any] = {
      'archive': archive,
      'events': sum(s['events'] for s in stats),
      'corrupt_files': [json.loads(l) for l in outputs.read_lines(outputs.join(out, 'corrupt_files.jsonl'))],
      'outputs': counts,
      'seconds': round(seconds, 3),
  }
  summary['events_per_sec'] = round(summary['events'] / seconds, 1) if seconds else None
  outputs.write_json(out, 'summary.json', summary)
  return summary


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  summary = run(args.archive, args.out, beam_args)
  print(f'replayed {summary["events"]} events ({summary["events_per_sec"]} events/s) '
        f'into {len(summary["outputs"])} outputs; summary in {args.out}/summary.json',
        file=sys.stderr)
  if summary['corrupt_files']:
    for c in summary['corrupt_files']:
      print(f'error: corrupt archive file {c["path"]}: {c["reason"]}', file=sys.stderr)
    raise DataError(f'{len(summary["corrupt_files"])} archive file(s) not read: corrupt, or not '
                    'what the archive\'s manifest and layout say (listed above and in summary.json)')
  return 0
