"""The taxi exercises' business logic, in plain Python (no Beam).

The Flink training exercises (ride cleansing, rides-and-fares, long-ride alerts,
hourly tips) are small state machines per key. Writing them here as pure
functions of ``(state, input) -> (new state, outputs, timer)`` means they can be
tested exhaustively without a runner, and the Beam DoFns in
:mod:`transforms.taxi` only move state and timers in and out of Beam.

Records are the Flink training model's dicts, with times as epoch millis
(``eventTime`` for rides, ``startTime`` for fares) once parsed.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from sourcebeam import iso_to_millis, millis_to_iso

RIDE_FIELDS: Dict[str, str] = {
    'rideId': 'int', 'isStart': 'bool', 'eventTime': 'time', 'startLon': 'number',
    'startLat': 'number', 'endLon': 'number', 'endLat': 'number',
    'passengerCnt': 'int', 'taxiId': 'int', 'driverId': 'int'}
FARE_FIELDS: Dict[str, str] = {
    'rideId': 'int', 'taxiId': 'int', 'driverId': 'int', 'startTime': 'time',
    'paymentType': 'str', 'tip': 'number', 'tolls': 'number', 'totalFare': 'number'}
TIME_FIELD = {'ride': 'eventTime', 'fare': 'startTime'}
FIELDS = {'ride': RIDE_FIELDS, 'fare': FARE_FIELDS}

NYC_LON = (-74.05, -73.7)
NYC_LAT = (40.5, 41.0)

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
LONG_RIDE_MS = 2 * HOUR_MS

Record = Dict[str, Any]


class BadRecord(ValueError):
  """A line that is not a valid ride or fare; the message is the dead-letter reason."""


# --- parsing -------------------------------------------------------------------

def _check(kind: str, name: str, value: Any, typ: str) -> Any:
  if typ == 'int':
    if isinstance(value, bool) or not isinstance(value, int):
      raise BadRecord(f'{kind} field {name!r} must be an integer, not {value!r}')
    return value
  if typ == 'bool':
    if not isinstance(value, bool):
      raise BadRecord(f'{kind} field {name!r} must be true or false, not {value!r}')
    return value
  if typ == 'number':
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise BadRecord(f'{kind} field {name!r} must be a finite number, not {value!r}')
    return float(value)
  if typ == 'str':
    if not isinstance(value, str):
      raise BadRecord(f'{kind} field {name!r} must be a string, not {value!r}')
    return value
  if typ == 'time':
    if not isinstance(value, str):
      raise BadRecord(f'{kind} field {name!r} must be an ISO-8601 UTC string, not {value!r}')
    try:
      return iso_to_millis(value)
    except ValueError:
      raise BadRecord(f'{kind} field {name!r} is not an ISO-8601 time: {value!r}') from None
  raise AssertionError(typ)


def parse(kind: str, line: str) -> Record:
  """One JSON line -> a ride or fare record with its time as epoch millis.

  Raises :class:`BadRecord` with a one-line reason for malformed JSON, a
  missing field or a wrong type. Extra fields are kept out: the record has
  exactly the training model's fields.
  """
  try:
    raw = json.loads(line)
  except ValueError as e:
    raise BadRecord(f'malformed JSON: {e}') from None
  if not isinstance(raw, dict):
    raise BadRecord(f'a {kind} must be a JSON object, not {type(raw).__name__}')
  fields = FIELDS[kind]
  missing = [f for f in fields if f not in raw]
  if missing:
    raise BadRecord(f'{kind} lacks field(s) {", ".join(missing)}')
  return {name: _check(kind, name, raw[name], typ) for name, typ in fields.items()}


def event_time(kind: str, record: Mapping[str, Any]) -> int:
  return record[TIME_FIELD[kind]]


def to_output(kind: str, record: Mapping[str, Any]) -> Record:
  """A record as the pipelines write it: its time back to ISO-8601 UTC."""
  out = dict(record)
  field = TIME_FIELD[kind]
  out[field] = millis_to_iso(record[field])
  return out


# --- ride cleansing --------------------------------------------------------------

def in_nyc(lon: float, lat: float) -> bool:
  """Inside New York City's bounding box, bounds inclusive."""
  return NYC_LON[0] <= lon <= NYC_LON[1] and NYC_LAT[0] <= lat <= NYC_LAT[1]


def starts_and_ends_in_nyc(ride: Mapping[str, Any]) -> bool:
  return (in_nyc(ride['startLon'], ride['startLat']) and
          in_nyc(ride['endLon'], ride['endLat']))


# --- rides and fares: the enrichment join (sourcebeam's JoinPairs, with the taxi's words) -----

RIDE_AND_FARE_LABELS = {'ride': 'START ride', 'fare': 'fare'}


def unmatched_to_json_dict(u: Mapping[str, Any]) -> Record:
  """A join's unmatched record with its ride or fare as the outputs show it (times as ISO)."""
  return {'side': u['side'], 'reason': u['reason'], 'record': to_output(u['side'], u['record'])}


def joined_to_json_dict(joined: Mapping[str, Record]) -> Record:
  return {'ride': to_output('ride', joined['ride']), 'fare': to_output('fare', joined['fare'])}


# --- long-ride alerts --------------------------------------------------------------

class LongRideState(NamedTuple):
  start: Optional[int] = None   # START eventTime, if seen
  end: Optional[int] = None     # END eventTime, if seen before its START
  alerted: bool = False         # alert sent; waiting only to absorb a late END


class LongRideStep(NamedTuple):
  state: Optional[LongRideState]
  alert: bool
  ignored: Optional[str]        # reason, if this input changed nothing
  timer: Optional[int]          # timer time to set; None: clear the timer


def _too_long(start: int, end: int) -> bool:
  return end - start > LONG_RIDE_MS


def long_ride_on_event(state: Optional[LongRideState], is_start: bool, t: int,
                       settle_after_ms: int) -> LongRideStep:
  """A START or END of one ride arrives (in any order).

  The timer for a START is set at start + 2 h + 1 ms: an event-time timer
  fires once the watermark reaches its time, and an END exactly two hours
  after the START (not a long ride) may still arrive while the watermark is
  at start + 2 h.
  """
  s = state or LongRideState()
  if is_start:
    if s.start is not None:
      return LongRideStep(state, False, 'duplicate START', _pending_timer(s, settle_after_ms))
    if s.end is not None:   # END came first: the ride is settled now
      return LongRideStep(None, _too_long(t, s.end), None, None)
    return LongRideStep(LongRideState(start=t), False, None, t + LONG_RIDE_MS + 1)
  if s.end is not None:
    return LongRideStep(state, False, 'duplicate END', _pending_timer(s, settle_after_ms))
  if s.start is None:       # END before START: wait for the START, but not forever
    return LongRideStep(LongRideState(end=t), False, None, t + settle_after_ms)
  if s.alerted:             # the late END of a ride already alerted: settled, no new alert
    return LongRideStep(None, False, None, None)
  return LongRideStep(None, _too_long(s.start, t), None, None)


def _pending_timer(s: LongRideState, settle_after_ms: int) -> Optional[int]:
  if s.alerted:
    return s.start + LONG_RIDE_MS + 1 + settle_after_ms
  if s.start is not None:
    return s.start + LONG_RIDE_MS + 1
  if s.end is not None:
    return s.end + settle_after_ms
  return None


def long_ride_on_timer(state: Optional[LongRideState], settle_after_ms: int) -> LongRideStep:
  """The ride's timer fired.

  A START still waiting two hours on: alert, and keep a marker (cleared by a
  later timer) so a late END settles quietly. A marker, or an END whose START
  never came, expires: nothing is left behind.
  """
  if state is None:
    return LongRideStep(None, False, None, None)
  if state.start is not None and not state.alerted:
    return LongRideStep(LongRideState(start=state.start, alerted=True), True, None,
                        state.start + LONG_RIDE_MS + 1 + settle_after_ms)
  if state.end is not None and state.start is None:
    return LongRideStep(None, False, 'END without START', None)
  return LongRideStep(None, False, None, None)


# --- hourly tips ---------------------------------------------------------------------

def tip_cents(fare: Mapping[str, Any]) -> int:
  """Tips are summed in whole cents: exact, and the same in any order."""
  return int(round(fare['tip'] * 100))


def top_driver(sums: List[Tuple[int, int]]) -> Optional[Tuple[int, int]]:
  """(driverId, cents) with the highest sum; ties go to the lowest driverId."""
  if not sums:
    return None
  return min(sums, key=lambda dc: (-dc[1], dc[0]))


def hourly_tip_record(window_end_ms: int, driver_cents: Tuple[int, int]) -> Record:
  driver, cents = driver_cents
  return {'windowEnd': window_end_ms, 'driverId': driver, 'totalTips': cents / 100}
