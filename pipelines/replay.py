"""Replay an event archive through an application's consumers: the same ones as the live stream.

``run.py replay --archive PATH --out DIR [--app MODULE:ATTR]`` reads every
archived event (local, ``s3://`` or ``gs://``) and feeds it to every consumer
of the application (the demo without ``--app``) with
:class:`sourcebeam.transforms.consumers.ReplayApp`: views and projections by
the fast ordered replay (one work item per key bucket, each key's events
through the same handler objects and ordering core as a live pipeline, no
shuffle of events), and the consumers that are transforms on the events of
their types from the same read. Only the source differs from ``run.py stream``.

A corrupt archive file does not stop the replay: it is listed with its path and
reason in ``DIR/corrupt_files.jsonl`` and ``summary.json``, and the command
exits 1. So is a file the replay does not read because it does not fit the
archive: a data file of another format than the manifest's (the reason names
both) or a file in a bucket folder whose name is not a data file's
(:class:`transforms.archive.MatchArchiveFiles`). ``summary.json`` also says what the replay did not apply: events of
types the application does not know (``unknown_type``: written by an app with
more types; counted and skipped), events of types no consumer reads
(``unclaimed``), and ``unprocessed`` events by reason.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Dict, List

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from sourcebeam.pipelines import outputs
from sourcebeam.pipelines.apps import add_app_argument, load_app
from sourcebeam.pipelines.cli import DataError
from sourcebeam.pipelines.options import Pipeline, pipeline_options, stop_after_dry_run
from sourcebeam.transforms.app import App
from sourcebeam.transforms.archive import check_archive_path
from sourcebeam.transforms.consumers import (ReplayApp, WriteAppOutputs, UNPROCESSED_FILE,
                                             held_counts)
from sourcebeam.transforms.counting import WriteCounts, read_counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--archive', required=True, metavar='PATH',
                      help='the event archive to replay (local, s3:// or gs://)')
  parser.add_argument('--out', required=True, metavar='DIR',
                      help='where the consumers\' outputs and summary.json go')
  add_app_argument(parser)


STATS_FILE = '_replay_stats.jsonl'


def build_replay(p: beam.Pipeline, app: App, archive: str, out: str) -> Dict[str, beam.PCollection]:
  """Every consumer of ``app`` fed from one read of the archive; returns ``{output:
  PCollection}`` to count, and writes the read's per-bucket stats (events decoded per
  type, unclaimed, unknown types, keys left waiting on a gap) to ``DIR/_replay_stats.jsonl``."""
  replay = p | 'ReplayArchive' >> ReplayApp(app, archive)
  replay.corrupt | 'CorruptJson' >> beam.Map(json.dumps) | 'WriteCorrupt' >> outputs.write_lines(
      out, 'corrupt_files.jsonl')
  replay.stats | 'StatsJson' >> beam.Map(json.dumps) | 'WriteStats' >> outputs.write_lines(
      out, STATS_FILE)
  counts = dict(replay.result | 'WriteOutputs' >> WriteAppOutputs(app, out))
  counts.update(held_counts(replay.result.held))
  counts['corrupt_files'] = replay.corrupt
  return counts


def unprocessed_by_reason(out: str) -> Dict[str, int]:
  """``OUT/unprocessed.jsonl`` counted by reason."""
  by_reason: Dict[str, int] = {}
  for line in outputs.read_lines(outputs.join(out, UNPROCESSED_FILE)):
    reason = json.loads(line).get('reason', 'unknown')
    by_reason[reason] = by_reason.get(reason, 0) + 1
  return dict(sorted(by_reason.items()))


def run(archive: str, out: str, beam_args: List[str], app: App) -> Dict[str, Any]:
  options = pipeline_options(beam_args)
  FileSystems.set_options(options)
  check_archive_path(archive, beam_args)
  outputs.prepare(out)
  started = time.monotonic()
  with Pipeline(options=options) as p:
    build_replay(p, app, archive, out) | 'Counts' >> WriteCounts(outputs.join(out, '_counts.json'))
  stop_after_dry_run(p, beam_args)
  seconds = time.monotonic() - started
  counts = read_counts(outputs.join(out, '_counts.json'))
  held, held_keys = counts.pop('held_on_gap', 0), counts.pop('held_on_gap_keys', 0)
  stats = [json.loads(l) for l in outputs.read_lines(outputs.join(out, STATS_FILE))]
  summary: Dict[str, Any] = {
      'app': app.name,
      'archive': archive,
      'events': sum(s['events'] for s in stats),
      'unknown_type': sum(s.get('unknown_type', 0) for s in stats),
      'unclaimed': sum(s.get('unclaimed', 0) for s in stats),
      'unprocessed': unprocessed_by_reason(out),
      'held_on_gap': held,
      'held_on_gap_keys': held_keys,
      'corrupt_files': [json.loads(l) for l in outputs.read_lines(outputs.join(out, 'corrupt_files.jsonl'))],
      'outputs': counts,
      'seconds': round(seconds, 3),
  }
  summary['events_per_sec'] = round(summary['events'] / seconds, 1) if seconds else None
  outputs.write_json(out, 'summary.json', summary)
  return summary


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  app = load_app(args.app)
  summary = run(args.archive, args.out, beam_args, app)
  print(f'replayed {summary["events"]} events ({summary["events_per_sec"]} events/s) '
        f'into {len(summary["outputs"])} outputs of app {app.name}; summary in '
        f'{args.out}/summary.json', file=sys.stderr)
  print(f'not applied: {not_applied(summary)}', file=sys.stderr)
  if summary['corrupt_files']:
    for c in summary['corrupt_files']:
      print(f'error: corrupt archive file {c["path"]}: {c["reason"]}', file=sys.stderr)
    raise DataError(f'{len(summary["corrupt_files"])} archive file(s) not read: corrupt, or not '
                    'what the archive\'s manifest and layout say (listed above and in summary.json)')
  if summary['held_on_gap']:
    raise DataError(f'{summary["held_on_gap"]} event(s) of {summary["held_on_gap_keys"]} key(s) '
                    'were never applied: their keys waited on a sequence gap when the archive '
                    'ended (a hole in the published stream; see _replay_stats.jsonl)')
  return 0


def not_applied(summary: Dict[str, Any]) -> str:
  """What a run did not apply, by reason, in one line ('nothing' when it applied everything)."""
  parts = [f'{summary[k]:,} {k.replace("_", " ")}' for k in ('unknown_type', 'unclaimed')
           if summary.get(k)]
  if summary.get('held_on_gap'):
    parts.append(f'{summary["held_on_gap"]:,} held on a gap ({summary["held_on_gap_keys"]:,} keys)')
  parts += [f'{n:,} {reason.replace("_", " ")}'
            for reason, n in summary.get('unprocessed', {}).items()]
  return ', '.join(parts) if parts else 'nothing'
