"""`run.py taxi join|long-rides|hourly-tips|cleanse`: the Flink training exercises.

Input is JSON lines in the Flink training model (rides: rideId, isStart,
eventTime, startLon, startLat, endLon, endLat, passengerCnt, taxiId,
driverId; fares: rideId, taxiId, driverId, startTime, paymentType, tip, tolls,
totalFare), times as ISO-8601 UTC. Each command reads its inputs, applies the
transforms of :mod:`transforms.taxi` (the same ones a streaming pipeline
uses) and writes, under ``--out DIR``:

* its output as JSON lines (``joined.jsonl`` and ``unmatched.jsonl``,
  ``alerts.jsonl`` and ``ignored.jsonl``, ``hourly_tips.jsonl``, ``rides.jsonl``);
* ``dead_letters.jsonl``: every input line that is not a valid record, with a reason;
* ``summary.json``: what went in and what came out, counted by the pipeline.

Each ``run_*`` function builds and runs one pipeline from its arguments and
Beam options, and returns the summary.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from sourcebeam.pipelines.cli import UsageError
from sourcebeam.pipelines.options import Pipeline, pipeline_options, stop_after_dry_run
from sourcebeam.demo import taxi as taxi_tf
from sourcebeam.demo import taxi_logic as logic
from sourcebeam.transforms.counting import WriteCounts, read_counts
from sourcebeam.transforms.single_file import WriteSingleFile

COUNTS_FILE = '.counts.json'


# --- shared plumbing ------------------------------------------------------------------

def _check_input(path: Optional[str], flag: str) -> str:
  if not path:
    raise UsageError(f'{flag} is required')
  try:
    matched = FileSystems.match([path])[0].metadata_list
  except Exception as e:  # a bad scheme or unreachable store: still one line
    raise UsageError(f'{flag} {path}: {e}') from None
  if not matched:
    raise UsageError(f'{flag} {path}: no such file')
  return path


def _check_out(out: Optional[str]) -> str:
  if not out:
    raise UsageError('--out is required')
  try:
    FileSystems.mkdirs(out)
  except Exception:  # already exists (local) or not needed (object stores)
    pass
  if '://' not in out and not os.path.isdir(out):
    raise UsageError(f'--out {out}: not a directory')
  return out


def _write_jsonl(pcoll, out: str, name: str, to_json=None):
  """DIR/<name>.jsonl, one file, one JSON object per line."""
  fmt = to_json or (lambda rec: json.dumps(rec, sort_keys=True, separators=(',', ':')))
  return (pcoll
          | f'Format {name}' >> beam.Map(fmt)
          | f'Write {name}' >> WriteSingleFile(FileSystems.join(out, name) + '.jsonl'))


def _write_counts(p, counted: Dict[str, beam.PCollection], out: str) -> None:
  counted | 'Counts' >> WriteCounts(FileSystems.join(out, COUNTS_FILE))


def _read_counts(out: str) -> Dict[str, int]:
  path = FileSystems.join(out, COUNTS_FILE)
  counts = read_counts(path)
  FileSystems.delete([path])
  return counts


def _read(p, kind: str, path: str):
  lines = p | f'Read {kind}s' >> beam.io.ReadFromText(path)
  return lines, lines | f'Parse {kind}s' >> taxi_tf.ParseTaxiRecords(kind)


def _finish(command: str, out: str, inputs: Dict[str, str], counts: Dict[str, int],
            balanced: bool, **params) -> Dict:
  summary = {'command': f'taxi {command}', 'inputs': inputs, 'params': params,
             'counts': {k: counts.get(k, 0) for k in sorted(counts)},
             'balanced': balanced}
  with FileSystems.create(FileSystems.join(out, 'summary.json')) as f:
    f.write((json.dumps(summary, indent=2, sort_keys=True) + '\n').encode('utf-8'))
  return summary


# --- the four pipelines ------------------------------------------------------------------

def run_join(rides: str, fares: str, out: str, beam_args: List[str],
             expire_after_minutes: float = 60.0) -> Dict:
  """START rides enriched with fares -> joined.jsonl; expired or duplicate sides
  -> unmatched.jsonl. Every START ride and fare ends joined or unmatched."""
  expire_ms = int(expire_after_minutes * logic.MINUTE_MS)
  with Pipeline(options=pipeline_options(beam_args)) as p:
    ride_lines, parsed_rides = _read(p, 'ride', rides)
    fare_lines, parsed_fares = _read(p, 'fare', fares)
    result = ((parsed_rides.records, parsed_fares.records)
              | 'Join' >> taxi_tf.JoinRidesAndFares(expire_ms))
    dead = ((parsed_rides.dead_letters, parsed_fares.dead_letters)
            | 'AllDeadLetters' >> beam.Flatten())
    _write_jsonl(result.joined, out, 'joined', lambda j: json.dumps(
        logic.joined_to_json_dict(j), sort_keys=True, separators=(',', ':')))
    _write_jsonl(result.unmatched, out, 'unmatched')
    _write_jsonl(dead, out, 'dead_letters')
    starts = parsed_rides.records | 'Starts' >> beam.Filter(lambda r: r['isStart'])
    ends = parsed_rides.records | 'Ends' >> beam.Filter(lambda r: not r['isStart'])
    _write_counts(p, {'ride_lines_in': ride_lines, 'fare_lines_in': fare_lines,
                      'start_rides': starts, 'end_rides_passed_over': ends,
                      'fares': parsed_fares.records, 'joined': result.joined,
                      'unmatched': result.unmatched, 'dead_letters': dead}, out)
  stop_after_dry_run(p, beam_args)
  c = _read_counts(out)
  balanced = (c['ride_lines_in'] + c['fare_lines_in'] ==
              c['start_rides'] + c['end_rides_passed_over'] + c['fares'] + c['dead_letters']
              and c['start_rides'] + c['fares'] == 2 * c['joined'] + c['unmatched'])
  return _finish('join', out, {'rides': rides, 'fares': fares}, c, balanced,
                 expire_after_minutes=expire_after_minutes)


def run_long_rides(rides: str, out: str, beam_args: List[str],
                   settle_after_minutes: float = 120.0) -> Dict:
  """alerts.jsonl: rides over two hours or with no END two hours after START;
  ignored.jsonl: duplicates and ENDs whose START never came."""
  with Pipeline(options=pipeline_options(beam_args)) as p:
    ride_lines, parsed = _read(p, 'ride', rides)
    result = parsed.records | 'LongRides' >> taxi_tf.LongRideAlerts(
        int(settle_after_minutes * logic.MINUTE_MS))
    _write_jsonl(result.alerts, out, 'alerts')
    _write_jsonl(result.ignored, out, 'ignored')
    _write_jsonl(parsed.dead_letters, out, 'dead_letters')
    _write_counts(p, {'ride_lines_in': ride_lines, 'rides': parsed.records,
                      'alerts': result.alerts, 'ignored': result.ignored,
                      'dead_letters': parsed.dead_letters}, out)
  stop_after_dry_run(p, beam_args)
  c = _read_counts(out)
  return _finish('long-rides', out, {'rides': rides}, c,
                 c['ride_lines_in'] == c['rides'] + c['dead_letters'],
                 settle_after_minutes=settle_after_minutes)


def run_hourly_tips(fares: str, out: str, beam_args: List[str]) -> Dict:
  """hourly_tips.jsonl: the top-tipped driver of each event-time hour."""
  with Pipeline(options=pipeline_options(beam_args)) as p:
    fare_lines, parsed = _read(p, 'fare', fares)
    tips = parsed.records | 'HourlyTips' >> taxi_tf.HourlyTips()
    _write_jsonl(tips, out, 'hourly_tips')
    _write_jsonl(parsed.dead_letters, out, 'dead_letters')
    _write_counts(p, {'fare_lines_in': fare_lines, 'fares': parsed.records,
                      'hours': tips, 'dead_letters': parsed.dead_letters}, out)
  stop_after_dry_run(p, beam_args)
  c = _read_counts(out)
  return _finish('hourly-tips', out, {'fares': fares}, c,
                 c['fare_lines_in'] == c['fares'] + c['dead_letters'])


def run_cleanse(rides: str, out: str, beam_args: List[str]) -> Dict:
  """rides.jsonl: only the rides that start and end inside New York City."""
  with Pipeline(options=pipeline_options(beam_args)) as p:
    ride_lines, parsed = _read(p, 'ride', rides)
    kept = parsed.records | 'Cleanse' >> taxi_tf.CleanseRides()
    outside = parsed.records | 'Outside' >> beam.Filter(
        lambda r: not logic.starts_and_ends_in_nyc(r))
    _write_jsonl(kept, out, 'rides', lambda r: json.dumps(
        logic.to_output('ride', r), sort_keys=True, separators=(',', ':')))
    _write_jsonl(parsed.dead_letters, out, 'dead_letters')
    _write_counts(p, {'ride_lines_in': ride_lines, 'rides': parsed.records,
                      'kept': kept, 'outside_nyc': outside,
                      'dead_letters': parsed.dead_letters}, out)
  stop_after_dry_run(p, beam_args)
  c = _read_counts(out)
  return _finish('cleanse', out, {'rides': rides}, c,
                 c['ride_lines_in'] == c['kept'] + c['outside_nyc'] + c['dead_letters'])


# --- command line --------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest='taxi_command', metavar='PIPELINE')

  def common(name: str, help_text: str, rides: bool, fares: bool) -> argparse.ArgumentParser:
    sp = sub.add_parser(name, help=help_text, description=help_text)
    if rides:
      sp.add_argument('--rides', required=True, help='rides, JSON lines (a path or glob)')
    if fares:
      sp.add_argument('--fares', required=True, help='fares, JSON lines (a path or glob)')
    sp.add_argument('--out', required=True, help='output directory')
    return sp

  sp = common('join', 'START rides joined with fares by rideId', True, True)
  sp.add_argument('--expire-after-minutes', type=float, default=60.0,
                  help='event time a side waits for its partner before it is unmatched '
                       '(default 60)')
  sp = common('long-rides', 'alerts for rides over two hours', True, False)
  sp.add_argument('--settle-after-minutes', type=float, default=120.0,
                  help='event time an alerted ride waits for its late END, and an END for '
                       'its START, before the state is cleared (default 120)')
  common('hourly-tips', 'the top-tipped driver of each hour', False, True)
  common('cleanse', 'rides that start and end in New York City', True, False)


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  command = getattr(args, 'taxi_command', None)
  if not command:
    raise UsageError('choose a taxi pipeline: join, long-rides, hourly-tips or cleanse')
  rides = _check_input(args.rides, '--rides') if hasattr(args, 'rides') else None
  fares = _check_input(args.fares, '--fares') if hasattr(args, 'fares') else None
  out = _check_out(args.out)
  if command == 'join':
    if args.expire_after_minutes <= 0:
      raise UsageError('--expire-after-minutes must be positive')
    summary = run_join(rides, fares, out, beam_args, args.expire_after_minutes)
  elif command == 'long-rides':
    if args.settle_after_minutes <= 0:
      raise UsageError('--settle-after-minutes must be positive')
    summary = run_long_rides(rides, out, beam_args, args.settle_after_minutes)
  elif command == 'hourly-tips':
    summary = run_hourly_tips(fares, out, beam_args)
  else:
    summary = run_cleanse(rides, out, beam_args)
  print(json.dumps(summary['counts'], sort_keys=True))
  return 0 if summary['balanced'] else 1
