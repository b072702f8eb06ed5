"""The main job: a sample day through the whole of Sourcebeam, on the embedded default runner.

``python run.py`` (or ``run.py main --out DIR``) shows the product end to end:

1. generate a sample day of raw events (retail at a daily curve, taxi rides and
   fares, riders and taxis), with a few realistic faults, unless DIR/input holds
   them already;
2. publish them (repair, validate, dead-letter), writing the event archive;
3. replay the archive through every pipeline: the same consumers a live stream
   feeds (projections, ordering, joins, CRDT aggregates);
4. write DIR/summary.json with counts per output and events per second, and a
   short human summary.

Beam options pass through (``--runner=PrismRunner``...), so the same job runs on
any runner Sourcebeam supports.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import time
from typing import Any, Dict, List, Optional

from sourcebeam.generators import faults, phases, retail, riders, taxi
from sourcebeam.generators.jsonl import encode_line, write_lines
from sourcebeam.pipelines import outputs, publish, replay
from sourcebeam.pipelines.apps import DEFAULT_APP, add_app_argument, load_app
from sourcebeam.pipelines.cli import Progress, UsageError
from sourcebeam.transforms.app import App

DEFAULT_RETAIL_EVENTS = 20_000
DEFAULT_TAXI_RIDES = 1_000
DEFAULT_RIDER_TRIPS = 40
# A tech-debt stream: a few malformed and re-delivered lines for the publish step to handle.
SAMPLE_FAULTS = faults.Faults(duplicates=0.002, malformed=0.005)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--out', default='out', metavar='DIR',
                      help='where inputs, published events, the archive, outputs and summary.json go '
                           '(default: out)')
  parser.add_argument('--events', type=int, default=DEFAULT_RETAIL_EVENTS,
                      help=f'retail events in the sample day (default: {DEFAULT_RETAIL_EVENTS})')
  parser.add_argument('--taxi-rides', type=int, default=DEFAULT_TAXI_RIDES,
                      help=f'taxi rides in the sample day (default: {DEFAULT_TAXI_RIDES})')
  parser.add_argument('--rider-trips', type=int, default=DEFAULT_RIDER_TRIPS,
                      help=f'rider trips in the sample day (default: {DEFAULT_RIDER_TRIPS})')
  parser.add_argument('--seed', type=int, default=1, help='generator seed (default: 1)')
  parser.add_argument('--archive-format', choices=('avro', 'parquet'), default='avro',
                      help='event archive format (default: avro)')
  parser.add_argument('--regenerate', action='store_true',
                      help='generate the sample day again even if DIR/input has one')
  add_app_argument(parser)


def generate_sample_day(input_dir: str, n_retail: int, n_rides: int, n_trips: int,
                        seed: int) -> Dict[str, int]:
  """Write the raw inputs; returns lines written per file."""
  os.makedirs(input_dir, exist_ok=True)
  retail_lines = faults.inject(
      ((t, encode_line(e))
       for t, e in retail.timed_retail_events(n_retail, seed, phases=phases.day_phases(n_retail))),
      SAMPLE_FAULTS, seed)
  return {
      'retail.jsonl': write_lines(retail_lines, os.path.join(input_dir, 'retail.jsonl')),
      'taxi.jsonl': write_lines((encode_line(e) for e in taxi.taxi_envelopes(n_rides, seed)),
                                os.path.join(input_dir, 'taxi.jsonl')),
      'riders.jsonl': write_lines((encode_line(e) for e in riders.rider_events(n_trips, seed)),
                                  os.path.join(input_dir, 'riders.jsonl')),
  }


def _fresh_dir(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)


def run(out: str, beam_args: List[str], n_retail: int = DEFAULT_RETAIL_EVENTS,
        n_rides: int = DEFAULT_TAXI_RIDES, n_trips: int = DEFAULT_RIDER_TRIPS, seed: int = 1,
        archive_format: str = 'avro', regenerate: bool = False, quiet: bool = False,
        app: Optional[App] = None) -> Dict[str, Any]:
  app = app or load_app(None)
  demo = app is load_app(None)
  if '://' in out:
    raise UsageError('the main job writes to a local --out directory; '
                     'use publish and replay for s3:// or gs:// paths')
  progress = Progress(4, quiet)
  started = time.monotonic()
  input_dir = os.path.join(out, 'input')
  has_input = bool(glob.glob(os.path.join(input_dir, '*.jsonl')))
  if not demo and (regenerate or not has_input):
    raise UsageError(f'app {app.name}: put its raw events in {input_dir}/*.jsonl (the sample day '
                     f'generator writes only the demo\'s events, {DEFAULT_APP})')
  if regenerate or not has_input:
    progress.stage(f'generating a sample day: {n_retail} retail events, {n_rides} taxi rides, '
                   f'{n_trips} rider trips into {input_dir}')
    generate_sample_day(input_dir, n_retail, n_rides, n_trips, seed)
  else:
    progress.stage(f'using the sample day already in {input_dir}')

  archive = os.path.join(out, 'archive')
  published_dir = os.path.join(out, 'published')
  replay_dir = os.path.join(out, 'replay')
  for d in (archive, published_dir, replay_dir):
    _fresh_dir(d)  # a rerun replaces its outputs instead of archiving the day twice

  progress.stage(f'publishing {input_dir}/*.jsonl, archiving to {archive}')
  published = publish.run(os.path.join(input_dir, '*.jsonl'), published_dir, beam_args, app,
                          archive=archive, archive_format=archive_format)

  progress.stage(f'replaying {archive} through every pipeline')
  replayed = replay.run(archive, replay_dir, beam_args, app)

  progress.stage('writing the summary')
  summary = {
      'app': app.name,
      'publish': {k: published[k] for k in ('in', 'published', 'dead_lettered', 'duplicates_dropped',
                                             'gaps', 'missing_raw_sequences', 'held_on_gap',
                                             'archived', 'seconds', 'events_per_sec')},
      'replay': {k: replayed[k] for k in ('events', 'unknown_type', 'unclaimed', 'unprocessed',
                                           'held_on_gap', 'held_on_gap_keys', 'seconds',
                                           'events_per_sec', 'corrupt_files')},
      'outputs': replayed['outputs'],
      'paths': {'input': input_dir, 'published': published_dir, 'archive': archive,
                'replay': replay_dir},
      'seconds': round(time.monotonic() - started, 3),
  }
  outputs.write_json(out, 'summary.json', summary)
  progress.done()
  return summary


def human_summary(summary: Dict[str, Any], out: str) -> str:
  pub, rep = summary['publish'], summary['replay']
  lines = [
      f'Sourcebeam main job done in {summary["seconds"]:.1f}s',
      f'  publish: {pub["in"]:,} raw events -> {pub["published"]:,} published, '
      f'{pub["dead_lettered"]:,} dead-lettered, {pub["duplicates_dropped"]:,} duplicates dropped '
      f'({pub["events_per_sec"]:,.0f} events/s); {pub["gaps"]:,} holes in the raw stream '
      f'({pub["missing_raw_sequences"]:,} raw sequences) skipped, none in the published one',
      f'  archive: {pub["archived"]:,} events in {summary["paths"]["archive"]}',
      f'  replay:  {rep["events"]:,} events through every consumer of app {summary["app"]} '
      f'({rep["events_per_sec"]:,.0f} events/s)',
      '  not applied: ' + replay.not_applied(rep),
  ]
  width = max(len(k) for k in summary['outputs']) if summary['outputs'] else 0
  for name, n in sorted(summary['outputs'].items()):
    lines.append(f'    {name:<{width}}  {n:>9,}')
  lines.append(f'  outputs in {summary["paths"]["replay"]}, summary in {os.path.join(out, "summary.json")}')
  return '\n'.join(lines)


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  for name in ('events', 'taxi_rides', 'rider_trips'):
    if getattr(args, name) < 0:
      raise UsageError(f'--{name.replace("_", "-")} must not be negative')
  summary = run(args.out, beam_args, args.events, args.taxi_rides, args.rider_trips, args.seed,
                args.archive_format, args.regenerate, app=load_app(args.app))
  print(human_summary(summary, args.out))
  if summary['replay']['corrupt_files'] or summary['replay']['held_on_gap']:
    return 1
  return 0
