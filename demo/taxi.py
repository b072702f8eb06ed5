"""The taxi exercises as Beam transforms, shared by batch and streaming pipelines.

Part of the demo application, written with Sourcebeam's public API (``sourcebeam``).

Each composite wraps the plain-Python logic of :mod:`taxi_logic` (beside this module):

* :class:`ParseTaxiRecords`: JSON lines -> timestamped records + dead letters;
* :class:`CleanseRides`: rides that start and end inside New York City;
* :class:`JoinRidesAndFares`: START rides enriched with their fares by rideId,
  with an event-time timer that expires a side whose partner never came;
* :class:`LongRideAlerts`: rides over two hours, or whose END is two hours late;
* :class:`HourlyTips`: the top-tipped driver of each event-time hour.

The stateful transforms are sourcebeam's ``KeyedStateMachine``s (plain-Python step
functions over one ride's state) in the global window, keyed by rideId, with
event-time timers only (processing-time timers do not fire on a bounded run). On
a stream each ride has state and a timer; on bounded input each ride's records
are grouped and folded at once, and every timer fires after every START, END and
fare of its ride has been seen: a bounded run gives the exact answer.

Timer output and lateness: every output PCollection that timers write to is
re-windowed with sourcebeam's ``timer_output_windowing``; a consumer that groups
it in its own windows must allow lateness too.
"""

from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Duration

from sourcebeam import (JoinPairs, KeyedStateMachine, Machine, Step, millis_of_ts as _millis,
                        ts_of_millis as _ts)

from . import taxi_logic as logic

DEAD_LETTERS = 'dead_letters'
UNMATCHED = 'unmatched'
IGNORED = 'ignored'

# Rides are keyed by their integer rideId: a deterministic key coder for the stateful DoFns.
RideKeyed = Tuple[int, Any]


# --- parsing ------------------------------------------------------------------------

class _ParseFn(beam.DoFn):
  def __init__(self, kind: str):
    self.kind = kind
    self.good = Metrics.counter('taxi', f'{kind}s_parsed')
    self.bad = Metrics.counter('taxi', f'{kind}s_dead_lettered')

  def process(self, line: str):
    try:
      record = logic.parse(self.kind, line)
    except logic.BadRecord as e:
      self.bad.inc()
      yield pvalue.TaggedOutput(DEAD_LETTERS, {'input': self.kind, 'reason': str(e), 'line': line})
      return
    self.good.inc()
    yield window.TimestampedValue(record, _ts(logic.event_time(self.kind, record)))


class Parsed(NamedTuple):
  records: beam.PCollection
  dead_letters: beam.PCollection


class ParseTaxiRecords(beam.PTransform):
  """JSON lines of one kind ('ride' or 'fare') -> records timestamped at their
  event time, and dead letters ``{input, reason, line}`` for lines that are not
  valid records."""

  def __init__(self, kind: str):
    super().__init__()
    if kind not in logic.FIELDS:
      raise ValueError(f'kind must be one of {sorted(logic.FIELDS)}, not {kind!r}')
    self.kind = kind

  def expand(self, lines):
    out = lines | 'Parse' >> beam.ParDo(_ParseFn(self.kind)).with_outputs(
        DEAD_LETTERS, main='records')
    return Parsed(out.records, out[DEAD_LETTERS])


# --- cleansing ------------------------------------------------------------------------

class CleanseRides(beam.PTransform):
  """Only the rides that start and end inside New York City (bounds inclusive)."""

  def expand(self, rides):
    return rides | 'InNYC' >> beam.Filter(logic.starts_and_ends_in_nyc)


# --- rides and fares --------------------------------------------------------------------

class JoinResult(NamedTuple):
  joined: beam.PCollection     # {'ride': record, 'fare': record}, times as millis
  unmatched: beam.PCollection  # {'side', 'reason', 'record'}, times as ISO


class JoinRidesAndFares(beam.PTransform):
  """The enrichment join of START rides with fares by rideId (sourcebeam's JoinPairs).

  Input: ``(rides, fares)`` of parsed records (END rides are passed over).
  Whichever side arrives first waits in state; the match clears state and
  timer. A side still waiting ``expire_after_ms`` of event time after its own
  time goes to ``unmatched``, as does a duplicate of a waiting side.
  """

  def __init__(self, expire_after_ms: int = logic.HOUR_MS):
    super().__init__()
    self.join = JoinPairs(
        'ride', 'fare', left_key=lambda r: r['rideId'], right_key=lambda f: f['rideId'],
        left_time=lambda r: logic.event_time('ride', r),
        right_time=lambda f: logic.event_time('fare', f), expire_after_ms=expire_after_ms,
        key_type=int, key_name='rideId', labels=logic.RIDE_AND_FARE_LABELS)

  def expand(self, rides_and_fares):
    rides, fares = rides_and_fares
    starts = rides | 'StartsOnly' >> beam.Filter(lambda r: r['isStart'])
    out = (starts, fares) | 'JoinPairs' >> self.join
    return JoinResult(out.joined,
                      out.unmatched | 'UnmatchedAsOutput' >> beam.Map(logic.unmatched_to_json_dict))


# --- long rides ---------------------------------------------------------------------------

def _long_ride_step(ride_id: int, step: logic.LongRideStep,
                    record: Optional[Dict[str, Any]] = None) -> Step:
  ignored = () if not step.ignored else ((IGNORED, {
      'rideId': ride_id, 'reason': step.ignored,
      'record': None if record is None else logic.to_output('ride', record)}), )
  return Step(step.state, step.timer, ({'rideId': ride_id}, ) if step.alert else (), ignored)


def long_ride_machine(settle_after_ms: int) -> Machine:
  """Per rideId: START and END in either order; an alert at most once."""

  def on_event(state, ride_id: int, record: Dict[str, Any]) -> Step:
    return _long_ride_step(ride_id, logic.long_ride_on_event(
        state, record['isStart'], record['eventTime'], settle_after_ms), record)

  def on_timer(state, ride_id: int) -> Step:
    return _long_ride_step(ride_id, logic.long_ride_on_timer(state, settle_after_ms))

  return Machine(on_event, on_timer)


class LongRideResult(NamedTuple):
  alerts: beam.PCollection   # {'rideId': n}
  ignored: beam.PCollection  # {'rideId', 'reason', 'record'}: duplicates, ENDs without START


class LongRideAlerts(beam.PTransform):
  """``{'rideId': n}`` for every ride longer than two hours (strictly), or whose
  END has not arrived two hours of event time after its START. Never two alerts
  for one ride. Once a ride is settled its state is gone; after an alert a
  marker waits ``settle_after_ms`` for a late END, and an END whose START never
  comes waits as long; both are then cleared by a timer."""

  def __init__(self, settle_after_ms: int = logic.LONG_RIDE_MS, expansion: str = 'auto'):
    super().__init__()
    self.settle_after_ms, self.expansion = settle_after_ms, expansion

  def expand(self, rides):
    out = (rides
           | 'KeyByRide' >> beam.Map(lambda r: (r['rideId'], r)).with_output_types(RideKeyed)
           | 'Detect' >> KeyedStateMachine(long_ride_machine(self.settle_after_ms),
                                           tags=[IGNORED], key_type=int,
                                           expansion=self.expansion))
    return LongRideResult(out['main'], out[IGNORED])


# --- hourly tips ---------------------------------------------------------------------------

class _TopDriverFn(beam.CombineFn):
  """Tips summed per driver (a dict of driverId -> cents) and, out, the (driverId, cents)
  with the highest sum (ties to the lowest driverId). One combine per window: a window is
  one key of the grouping, where a sum per (driver, window) made every driver a key of its
  own, each with its window's state and timer (a replay's hourly tips spent most of their
  time there)."""

  def create_accumulator(self):
    return {}

  def add_input(self, sums, driver_cents):
    driver, cents = driver_cents
    sums[driver] = sums.get(driver, 0) + cents
    return sums

  def merge_accumulators(self, accumulators):
    merged: Dict[int, int] = {}
    for sums in accumulators:
      for driver, cents in sums.items():
        merged[driver] = merged.get(driver, 0) + cents
    return merged

  def extract_output(self, sums):
    return logic.top_driver(list(sums.items()))


class _WithWindowEnd(beam.DoFn):
  def process(self, driver_cents, win=beam.DoFn.WindowParam):
    if driver_cents is not None:
      yield logic.hourly_tip_record(_millis(win.end), driver_cents)


class HourlyTips(beam.PTransform):
  """Tips summed per driver in one-hour event-time windows, then the top driver
  per hour: ``{'windowEnd': epoch_millis, 'driverId': n, 'totalTips': x}``.

  Fares later than ``allowed_lateness_s`` behind the watermark are dropped by
  the window (Beam's lateness rule); within it, a late fare fires an updated
  (accumulated) result for its hour.
  """

  def __init__(self, window_ms: int = logic.HOUR_MS, allowed_lateness_s: int = 0):
    super().__init__()
    self.window_ms = window_ms
    self.allowed_lateness_s = allowed_lateness_s

  def expand(self, fares):
    windowed = fares | 'Hourly' >> beam.WindowInto(
        window.FixedWindows(self.window_ms / 1000),
        allowed_lateness=Duration(seconds=self.allowed_lateness_s),
        accumulation_mode=beam.trigger.AccumulationMode.ACCUMULATING)
    return (windowed
            | 'DriverCents' >> beam.Map(lambda f: (f['driverId'], logic.tip_cents(f)))
            | 'TopDriver' >> beam.CombineGlobally(_TopDriverFn()).without_defaults()
            | 'WithWindowEnd' >> beam.ParDo(_WithWindowEnd()))
