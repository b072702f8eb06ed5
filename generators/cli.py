"""`run.py generate`: deterministic raw events as JSON lines, for demos, tests and benchmarks.

The main form is ``run.py generate --events N --seed S --out FILE``. The arrival
shape (``--rate``/``--duration``, ``--phases``, ``--day``) sets the event
times; the fault knobs (``--duplicates``, ``--out-of-order``, ``--malformed``)
turn the clean stream into a realistic tech-debt one. Generation is plain
Python, not a Beam pipeline, so Beam options are refused here.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import sys
import textwrap
import time
from typing import Counter, Dict, Iterable, Iterator, List, Optional, Tuple

from sourcebeam.generators import faults as faults_mod
from sourcebeam.generators import phases as phases_mod
from sourcebeam.generators import retail, riders, taxi
from sourcebeam.generators.jsonl import LineWriter, encode_line, is_remote, iso_clock, write_lines
from sourcebeam.pipelines.cli import UsageError

# --events when nothing else says how many: events, rides, ride requests
DEFAULT_EVENTS = {'retail': 10_000, 'taxi': 10_000, 'riders': 1_000}
DOMAINS = ('retail', 'taxi', 'riders')

DESCRIPTION = """\
Generate deterministic raw events as JSON lines (same seed, same bytes).

domains:
  retail  Hello, Retail! events in the envelope shape (ProductCreated, ProductImageAdded,
          ProductViewed, CartItemAdded, CartItemRemoved, ProductPurchased, UserLoggedIn,
          PhoneNumberUpdated, RoleAdded); N is the number of events. Without an arrival
          shape, events arrive at Hello, Retail!'s ~116 events/s (10 million a day).
  taxi    rides and fares in the Flink training data model; N is the number of rides
          (each gives a START, usually an END, and a fare; default 5 rides/s). --rides
          and --fares write the plain Flink-model files (for `run.py taxi`), --out writes
          RideStarted / RideEnded / FarePaid envelopes (for `run.py publish`). The feed is
          always out of order within --out-of-order (default 60s).
  riders  riders and taxis: RideRequested, RiderPickedUp, RiderDroppedOff (keyed by rider)
          and TaxiLocationReported every few seconds while a taxi moves (keyed by taxi);
          N is the number of ride requests (default 1 per second).

examples:
  run.py generate --events 100000 --seed 7 --out raw.jsonl
  run.py generate --events 1000000 --day --out day.jsonl
  run.py generate --rate 200 --duration 1h --out peak.jsonl
  run.py generate --phases "rate=50,duration=10m;ramp=50..400,duration=20m;pause=5m;rate=200,duration=30m" --out load.jsonl
  run.py generate --events 50000 --duplicates 0.01 --out-of-order 30s --malformed 0.02 --out dirty.jsonl
  run.py generate --domain taxi --events 20000 --rides rides.jsonl --fares fares.jsonl
  run.py generate --domain riders --events 500 --out riders.jsonl
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.description = DESCRIPTION
  parser.epilog = 'arrival phases:\n' + textwrap.fill(
      phases_mod.PHASES_HELP, width=88, initial_indent='  ', subsequent_indent='  ',
      break_on_hyphens=False, break_long_words=False)
  parser.add_argument('--domain', choices=DOMAINS, default='retail',
                      help='what to generate (default: retail)')
  parser.add_argument('--events', metavar='N',
                      help='how many events (retail, default 10,000), rides (taxi, default 10,000) '
                           'or ride requests (riders, default 1,000); with --rate/--duration/--phases '
                           'as many as they hold, and N caps them')
  parser.add_argument('--seed', default='1', metavar='S',
                      help='random seed (an integer, default 1): same seed, same bytes')
  parser.add_argument('--out', metavar='FILE',
                      help='where to write the raw envelope events as JSON lines: a local path, '
                           '"-" for stdout, or s3://... / gs://... (through Beam\'s filesystems; '
                           'endpoints from SOURCEBEAM_S3_ENDPOINT / STORAGE_EMULATOR_HOST or Beam '
                           'options such as --s3_endpoint_url; a .gz name is gzipped)')
  parser.add_argument('--rides', metavar='FILE', help='taxi: write Flink-model TaxiRide records here')
  parser.add_argument('--fares', metavar='FILE', help='taxi: write Flink-model TaxiFare records here')
  parser.add_argument('--start', default=phases_mod.DEFAULT_START, metavar='TIME',
                      help=f'event time of the first phase, ISO-8601 (default {phases_mod.DEFAULT_START})')
  shape = parser.add_argument_group('arrival shape (event times follow it)')
  shape.add_argument('--rate', metavar='R',
                     help='constant arrival rate in events/s (rides/s for taxi, requests/s for '
                          'riders; or 6000/m, 720000/h); with --duration, or with --events for N/R '
                          'seconds')
  shape.add_argument('--duration', metavar='D',
                     help='how long the constant rate lasts (90s, 10m, 1h30m); with --events alone, '
                          'N events spread evenly over D')
  shape.add_argument('--phases', metavar='SPEC',
                     help='load-test phases: "rate=R,duration=D;ramp=A..B,duration=D;pause=D" '
                          '(see the end of this help)')
  shape.add_argument('--day', action='store_true',
                     help='a sample day: N events over 24 hours from --start, quiet at night, a lunch '
                          'bump and an evening peak ~1.7x the mean')
  shape.add_argument('--report-interval', default='5s', metavar='D',
                     help='riders: how often a moving taxi reports its position (default 5s)')
  bad = parser.add_argument_group('faults (off by default, deterministic for a seed)')
  bad.add_argument('--duplicates', metavar='P',
                   help='share of events delivered twice, a few dozen lines later (0.01 or 1%%)')
  bad.add_argument('--out-of-order', metavar='D',
                   help='deliver each event after a random delay up to D (e.g. 30s): a stream ordered '
                        'by delivery, at most D behind its latest event time. Taxi: the feed\'s '
                        'bound, default 60s')
  bad.add_argument('--malformed', metavar='P',
                   help='share of lines corrupted (truncated JSON, non-UTF-8 bytes, missing field, '
                        'wrong type, unknown event type, absurd timestamp, negative sequence, '
                        'unknown field); each one a dead letter for `run.py publish`')
  parser.add_argument('--quiet', action='store_true', help='no summary line on stderr')


def _int(text: Optional[str], what: str, minimum: int) -> Optional[int]:
  if text is None:
    return None
  try:
    v = int(str(text).replace('_', '').replace(',', ''))
  except ValueError:
    raise UsageError(f'{what} must be a whole number, got {text!r}') from None
  if v < minimum:
    raise UsageError(f'{what} must be >= {minimum}, got {v}')
  return v


def _share(text: Optional[str], what: str) -> float:
  if text is None:
    return 0.0
  t = str(text).strip()
  try:
    v = float(t[:-1]) / 100 if t.endswith('%') else float(t)
  except ValueError:
    raise UsageError(f'{what} must be a share like 0.01 or 1%, got {text!r}') from None
  if not 0.0 <= v <= 1.0:
    raise UsageError(f'{what} must be between 0 and 1 (or 0% and 100%), got {text!r}')
  return v


def _duration(text: str, what: str) -> float:
  try:
    return phases_mod.parse_duration(text)
  except phases_mod.PhaseSpecError as e:
    raise UsageError(f'{what}: {e}') from None


def resolve_shape(args: argparse.Namespace, default_rate: float, default_n: int
                  ) -> Tuple[int, List[phases_mod.Phase]]:
  """(how many, phases) from --events and the arrival-shape options."""
  n = _int(args.events, '--events', 1)
  try:
    if args.phases is not None:
      if args.rate or args.duration or args.day:
        raise UsageError('--phases cannot be combined with --rate, --duration or --day')
      ph = phases_mod.parse_phases(args.phases)
    elif args.day:
      if args.rate or args.duration:
        raise UsageError('--day cannot be combined with --rate or --duration')
      n = n or default_n
      ph = phases_mod.day_phases(n)
    elif args.rate is not None or args.duration is not None:
      rate = phases_mod.parse_rate(args.rate) if args.rate is not None else None
      dur = phases_mod.parse_duration(args.duration) if args.duration is not None else None
      if rate is not None and dur is not None:
        ph = [phases_mod.constant(rate, dur)]
      elif rate is not None:
        if n is None:
          raise UsageError('--rate needs --duration or --events')
        if rate <= 0:
          raise UsageError('--rate must be positive')
        ph = phases_mod.constant_for(n, rate)
      else:
        if n is None:
          raise UsageError('--duration needs --rate or --events')
        if dur <= 0:
          raise UsageError('--duration must be positive')
        ph = [phases_mod.constant(n / dur, dur)]
    else:
      n = n or default_n
      ph = phases_mod.constant_for(n, default_rate)
  except phases_mod.PhaseSpecError as e:
    raise UsageError(str(e)) from None
  held = phases_mod.total_events(ph)
  if held < 1:
    raise UsageError('the arrival shape holds no events: give a positive rate and duration')
  return (min(n, held) if n else held), ph


class Tally:
  """Counts events per type and the event-time span while they stream past."""

  def __init__(self):
    self.types: Counter = collections.Counter()
    self.first: Optional[int] = None
    self.last: Optional[int] = None

  def timed(self, events: Iterable[Tuple[int, Dict]]) -> Iterator[Tuple[int, Dict]]:
    types = self.types
    lo = hi = None
    for t, e in events:
      types[e['event_type']] += 1
      if lo is None or t < lo:
        lo = t
      if hi is None or t > hi:
        hi = t
      yield t, e
    self.first, self.last = lo, hi

  def describe(self) -> str:
    n = sum(self.types.values())
    kinds = ', '.join(f'{k} {v:,}' for k, v in self.types.most_common())
    if self.first is None:
      return f'{n:,} events'
    iso = iso_clock()
    span = (self.last - self.first) / 1000
    return (f'{n:,} events ({kinds}), event time {iso(self.first)} .. {iso(self.last)} '
            f'({_span(span)})')


def _span(seconds: float) -> str:
  if seconds >= 3600:
    return f'{seconds / 3600:.1f} h'
  if seconds >= 60:
    return f'{seconds / 60:.1f} min'
  return f'{seconds:.1f} s'


def _lines(timed: Iterable[Tuple[int, Dict]], faults: faults_mod.Faults, seed: int,
           stats: Counter) -> Iterator[bytes]:
  if faults.any:
    return faults_mod.inject(((t, encode_line(e)) for t, e in timed), faults, seed, stats)
  return (encode_line(e) for _, e in timed)


@contextlib.contextmanager
def _writing(*paths: str) -> Iterator[None]:
  """Turns a failure to write into one line naming the path, never a traceback.

  Beam's S3 and GCS clients log a full traceback at ERROR before they raise; for
  remote paths those logs are held back, and the error is said once, below.
  """
  remote = any(is_remote(p) for p in paths)
  if remote:
    logging.disable(logging.ERROR)
  try:
    yield
  except OSError as e:
    where = e.filename or ' / '.join(paths)
    raise UsageError(f'cannot write {where}: {e.strerror or e}') from None
  except Exception as e:  # pylint: disable=broad-except
    if not any(is_remote(p) for p in paths):
      raise
    # Beam's filesystems wrap the cloud client's errors in layers: say it in one line
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise UsageError(f'cannot write {" / ".join(paths)}: {first}') from None
  finally:
    if remote:
      logging.disable(logging.NOTSET)


def _write(lines: Iterable[bytes], path: str) -> int:
  with _writing(path):
    return write_lines(lines, path)


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  remote = [p for p in (args.out, args.rides, args.fares) if p and is_remote(p)]
  if beam_args and not remote:
    raise UsageError(f'unknown option(s) for generate: {" ".join(beam_args)} (see run.py generate --help)')
  seed = _int(args.seed, '--seed', -(2**63))
  try:
    start = phases_mod.to_millis(args.start)
  except phases_mod.PhaseSpecError as e:
    raise UsageError(str(e)) from None
  duplicates = _share(args.duplicates, '--duplicates')
  malformed = _share(args.malformed, '--malformed')
  out_of_order = _duration(args.out_of_order, '--out-of-order') if args.out_of_order else 0.0

  if args.domain == 'taxi':
    if not (args.out or args.rides or args.fares):
      raise UsageError('taxi needs --out FILE (envelopes) and/or --rides FILE --fares FILE')
    if bool(args.rides) != bool(args.fares):
      raise UsageError('give both --rides and --fares')
  else:
    if not args.out:
      raise UsageError('--out FILE is required')
    if args.rides or args.fares:
      raise UsageError('--rides and --fares are for --domain taxi')

  if remote:  # s3:// and gs:// go through Beam's FileSystems, set up as pipelines set them up
    from sourcebeam.transforms.storage import use_storage_options
    use_storage_options(beam_args)

  default_rate = {'retail': phases_mod.HELLO_RETAIL_RATE, 'taxi': taxi.TAXI_RATE,
                  'riders': riders.TRIP_RATE}[args.domain]
  n, ph = resolve_shape(args, default_rate, DEFAULT_EVENTS[args.domain])
  stats: Counter = collections.Counter()
  tally = Tally()
  t0 = time.monotonic()
  written = []

  if args.domain == 'retail':
    events = retail.timed_retail_events(n, seed=seed, phases=ph, start=start)
    faults = faults_mod.Faults(duplicates, out_of_order, malformed)
    lines = _write(_lines(tally.timed(events), faults, seed, stats), args.out)
    written.append(f'{args.out} ({lines:,} lines)')
  elif args.domain == 'riders':
    interval = _duration(args.report_interval, '--report-interval')
    if interval <= 0:
      raise UsageError('--report-interval must be positive')
    events = riders.timed_rider_events(n, seed=seed, phases=ph, start=start,
                                       report_interval_s=interval)
    faults = faults_mod.Faults(duplicates, out_of_order, malformed)
    lines = _write(_lines(tally.timed(events), faults, seed, stats), args.out)
    written.append(f'{args.out} ({lines:,} lines)')
  else:
    # The feed is out of order by nature; the knob sets its bound. Each output
    # replays the same deterministic feed, so they agree event for event.
    delay = out_of_order if args.out_of_order else taxi.DEFAULT_MAX_DELAY_S
    faults = faults_mod.Faults(duplicates, 0.0, malformed)

    def feed():
      return taxi.taxi_feed(n, seed, phases=ph, start=start, max_delay_s=delay)

    counted = False
    if args.out:
      timed = ((ev.delivered, env) for ev, env in taxi.envelopes(_taxi_tally(feed(), tally)))
      lines = _write(_lines(timed, faults, seed, stats), args.out)
      written.append(f'envelopes {args.out} ({lines:,} lines)')
      counted = True
    if args.rides and not faults.any:  # one pass, both files
      with _writing(args.rides, args.fares):
        with LineWriter(args.rides) as rides, LineWriter(args.fares) as fares:
          for ev, line in taxi.flink_lines(_taxi_tally(feed(), None if counted else tally)):
            (fares if ev.event_type == 'FarePaid' else rides).write(line)
      written += [f'rides {args.rides} ({rides.count:,} lines)',
                  f'fares {args.fares} ({fares.count:,} lines)']
    elif args.rides:  # each file has its own duplicates and malformed lines
      for which, path, salt in (('ride', args.rides, 1), ('fare', args.fares, 2)):
        evs = (ev for ev in _taxi_tally(feed(), None if counted or which == 'fare' else tally)
               if (ev.event_type == 'FarePaid') == (which == 'fare'))
        timed = ((ev.delivered, line) for ev, line in taxi.flink_lines(evs))
        lines = _write(faults_mod.inject(timed, faults, seed + salt, stats), path)
        written.append(f'{which}s {path} ({lines:,} lines)')

  elapsed = time.monotonic() - t0
  if not args.quiet:
    total = sum(tally.types.values())
    unit = {'taxi': f'{n:,} rides: ', 'riders': f'{n:,} ride requests: '}.get(args.domain, '')
    fault_text = ''
    if stats:
      fault_text = '; faults: ' + ', '.join(
          f'{v:,} {k}' for k, v in sorted(stats.items()) if ':' not in k)
    print(f'generate {args.domain}: {unit}{tally.describe()}; {elapsed:.1f} s '
          f'({total / max(elapsed, 1e-9):,.0f} events/s){fault_text} -> {", ".join(written)}',
          file=sys.stderr)
  return 0


def _taxi_tally(feed: Iterable[taxi.TaxiEvent], tally: Optional[Tally]) -> Iterator[taxi.TaxiEvent]:
  """The feed, counting event types and event times when tally is given."""
  if tally is None:
    yield from feed
    return
  for ev in feed:
    tally.types[ev.event_type] += 1
    t = ev.event_time
    if tally.first is None or t < tally.first:
      tally.first = t
    if tally.last is None or t > tally.last:
      tally.last = t
    yield ev
