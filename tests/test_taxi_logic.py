"""The taxi exercises' plain-Python logic: parsing, cleansing, the join and
long-ride state machines, hourly-tip arithmetic. No Beam here."""

import json

import pytest
from hypothesis import given, settings, strategies as st

from sourcebeam.demo import taxi_logic as logic
from sourcebeam.transforms.joins import Sides, pair_on_arrival, pair_on_expiry
from sourcebeam.schemas.envelope import millis_to_iso

T0 = 1_795_651_200_000  # 2026-11-26T00:00:00Z
H = logic.HOUR_MS


def ride(ride_id=1, is_start=True, t=T0, lon=-73.98, lat=40.75, end_lon=-73.95, end_lat=40.78,
         driver=7):
  return {'rideId': ride_id, 'isStart': is_start, 'eventTime': millis_to_iso(t),
          'startLon': lon, 'startLat': lat, 'endLon': end_lon, 'endLat': end_lat,
          'passengerCnt': 1, 'taxiId': 100 + driver, 'driverId': driver}


def fare(ride_id=1, t=T0, tip=1.5, driver=7):
  return {'rideId': ride_id, 'taxiId': 100 + driver, 'driverId': driver,
          'startTime': millis_to_iso(t), 'paymentType': 'CARD', 'tip': tip, 'tolls': 0.0,
          'totalFare': 20.0}


# --- parsing ---------------------------------------------------------------------

def test_parse_ride_and_fare_convert_times_to_millis():
  r = logic.parse('ride', json.dumps(ride(t=T0 + 1234)))
  assert r['eventTime'] == T0 + 1234 and r['isStart'] is True and r['startLon'] == -73.98
  f = logic.parse('fare', json.dumps(dict(fare(), extra='dropped')))
  assert f['startTime'] == T0 and 'extra' not in f
  assert logic.to_output('fare', f)['startTime'] == '2026-11-26T00:00:00.000Z'


@pytest.mark.parametrize('kind,line,reason', [
    ('ride', 'not json', 'malformed JSON'),
    ('ride', '[1, 2]', 'must be a JSON object'),
    ('ride', json.dumps({k: v for k, v in ride().items() if k != 'taxiId'}), 'lacks field(s) taxiId'),
    ('ride', json.dumps(dict(ride(), rideId='12')), "'rideId' must be an integer"),
    ('ride', json.dumps(dict(ride(), rideId=True)), "'rideId' must be an integer"),
    ('ride', json.dumps(dict(ride(), isStart='yes')), "'isStart' must be true or false"),
    ('ride', json.dumps(dict(ride(), eventTime='yesterday')), "not an ISO-8601 time"),
    ('ride', json.dumps(dict(ride(), eventTime=12345)), "ISO-8601 UTC string"),
    ('ride', json.dumps(dict(ride(), startLon=None)), "'startLon' must be a finite number"),
    ('ride', '{"rideId": 1, "isStart": true, "eventTime": "2026-11-26T00:00:00Z", '
             '"startLon": NaN, "startLat": 1, "endLon": 1, "endLat": 1, "passengerCnt": 1, '
             '"taxiId": 1, "driverId": 1}', "'startLon' must be a finite number"),
    ('fare', json.dumps(dict(fare(), tip='1.0')), "'tip' must be a finite number"),
    ('fare', json.dumps(dict(fare(), paymentType=3)), "'paymentType' must be a string"),
])
def test_parse_rejects_bad_lines_with_a_reason(kind, line, reason):
  with pytest.raises(logic.BadRecord, match=reason.replace('(', r'\(').replace(')', r'\)')):
    logic.parse(kind, line)


# --- cleansing ------------------------------------------------------------------------

@pytest.mark.parametrize('lon,lat,inside', [
    (-74.05, 40.5, True), (-73.7, 41.0, True), (-73.9, 40.7, True),
    (-74.0501, 40.7, False), (-73.6999, 40.7, False), (-73.9, 40.4999, False),
    (-73.9, 41.0001, False), (0.0, 0.0, False)])
def test_nyc_bounds_are_inclusive(lon, lat, inside):
  assert logic.in_nyc(lon, lat) is inside


def test_cleansing_needs_both_ends_inside():
  parse = lambda r: logic.parse('ride', json.dumps(r))
  assert logic.starts_and_ends_in_nyc(parse(ride()))
  assert not logic.starts_and_ends_in_nyc(parse(ride(end_lon=-74.175, end_lat=40.69)))
  assert not logic.starts_and_ends_in_nyc(parse(ride(lon=0.0, lat=0.0)))


# --- rides and fares -----------------------------------------------------------------------

R = logic.parse('ride', json.dumps(ride()))
F = logic.parse('fare', json.dumps(fare()))
EXPIRE = 30 * logic.MINUTE_MS
SIDES = Sides('ride', 'fare', 'rideId', logic.RIDE_AND_FARE_LABELS)


def arrive(state, side, record):
  """The taxi join's step: sourcebeam's pair join with the taxi's sides, keys and words."""
  return pair_on_arrival(state, side, record, logic.event_time(side, record), EXPIRE, SIDES)


@pytest.mark.parametrize('first,second', [(('ride', R), ('fare', F)), (('fare', F), ('ride', R))])
def test_join_matches_whichever_side_comes_first_and_clears_state(first, second):
  s1 = arrive(None, *first)
  assert s1.state[:2] == first and s1.joined is None and s1.timer == T0 + EXPIRE
  s2 = arrive(s1.state, *second)
  assert s2.joined == {'ride': R, 'fare': F}
  assert s2.state is None and s2.timer is None and not s2.unmatched


def test_join_expiry_sends_waiting_side_to_unmatched():
  s1 = arrive(None, 'fare', F)
  s2 = pair_on_expiry(s1.state, EXPIRE, SIDES)
  assert s2.state is None and s2.timer is None and s2.joined is None
  [u] = s2.unmatched
  assert u['side'] == 'fare' and u['reason'] == 'no START ride within 30 min'
  assert logic.unmatched_to_json_dict(u)['record']['startTime'] == '2026-11-26T00:00:00.000Z'
  assert pair_on_expiry(None, EXPIRE, SIDES).unmatched == ()


def test_join_duplicate_side_is_unmatched_and_the_original_keeps_waiting():
  s1 = arrive(None, 'ride', R)
  s2 = arrive(s1.state, 'ride', R)
  assert s2.state == s1.state and s2.timer == s1.timer
  assert [u['reason'] for u in s2.unmatched] == ['duplicate ride for this rideId']
  assert arrive(s2.state, 'fare', F).joined == {'ride': R, 'fare': F}


# --- long rides -----------------------------------------------------------------------------

SETTLE = 60 * logic.MINUTE_MS


def run_long_ride(events, timers_at=()):
  """Drive the state machine like a runner: events in order, then any timer that
  is due when the watermark reaches each time in timers_at (and finally the end)."""
  state, timer, alerts, ignored = None, None, 0, []

  def fire_until(wm):
    nonlocal state, timer, alerts
    while timer is not None and timer <= wm:
      step = logic.long_ride_on_timer(state, SETTLE)
      state, timer = step.state, step.timer
      alerts += step.alert
      ignored.extend([step.ignored] if step.ignored else [])

  for ev in events:
    if ev[0] == 'wm':
      fire_until(ev[1])
      continue
    is_start, t = ev
    step = logic.long_ride_on_event(state, is_start, t, SETTLE)
    state, timer = step.state, step.timer
    alerts += step.alert
    ignored.extend([step.ignored] if step.ignored else [])
  fire_until(float('inf'))
  return alerts, state, ignored


@pytest.mark.parametrize('duration,alerts', [(2 * H, 0), (2 * H + 1, 1), (H, 0), (5 * H, 1)])
@pytest.mark.parametrize('end_first', [False, True])
def test_long_ride_alerts_strictly_over_two_hours_in_either_order(duration, alerts, end_first):
  events = [(True, T0), (False, T0 + duration)]
  if end_first:
    events.reverse()
  assert run_long_ride(events) == (alerts, None, [])


def test_exactly_two_hours_with_the_watermark_at_two_hours_is_not_an_alert():
  assert run_long_ride([(True, T0), ('wm', T0 + 2 * H), (False, T0 + 2 * H)]) == (0, None, [])


def test_missing_end_alerts_once_and_a_late_end_is_cleaned_up():
  assert run_long_ride([(True, T0)]) == (1, None, [])
  # alert when the watermark passes start + 2h, then the END arrives: no second alert
  assert run_long_ride([(True, T0), ('wm', T0 + 3 * H), (False, T0 + 4 * H)]) == (1, None, [])
  # the END arrives after the marker expired: it waits for a START, then is cleared
  alerts, state, ignored = run_long_ride(
      [(True, T0), ('wm', T0 + 6 * H), (False, T0 + 7 * H)])
  assert (alerts, state, ignored) == (1, None, ['END without START'])


def test_duplicates_are_ignored_with_a_reason_and_never_alert_twice():
  alerts, state, ignored = run_long_ride(
      [(True, T0), (True, T0), ('wm', T0 + 3 * H), (True, T0), (False, T0 + 5 * H),
       (False, T0 + 5 * H)])
  assert alerts == 1 and state is None
  assert ignored == ['duplicate START', 'duplicate START', 'END without START']


@settings(max_examples=200, deadline=None)
@given(duration=st.integers(0, 5 * H), has_end=st.booleans(), order=st.booleans(),
       wm_at=st.lists(st.integers(0, 8 * H), max_size=3))
def test_long_ride_state_machine_matches_the_definition(duration, has_end, order, wm_at):
  """Whatever the arrival order and watermark steps (with events on time: never
  behind the watermark), the alert count is the definition's answer and no
  state is left at the end."""
  events = [(True, T0)] + ([(False, T0 + duration)] if has_end else [])
  if order:
    events.reverse()
  # interleave watermark steps that never pass a not-yet-arrived event's time
  stream, pending = [], list(events)
  for w in sorted(wm_at):
    while pending and pending[0][1] <= T0 + w:
      stream.append(pending.pop(0))
    if not pending or all(e[1] >= T0 + w for e in pending):
      stream.append(('wm', T0 + w))
  stream.extend(pending)
  expected = 1 if (not has_end or duration > 2 * H) else 0
  alerts, state, _ = run_long_ride(stream)
  assert (alerts, state) == (expected, None)


# --- hourly tips ------------------------------------------------------------------------------

def test_top_driver_highest_sum_and_lowest_id_on_ties():
  assert logic.top_driver([(5, 100), (3, 250), (4, 250)]) == (3, 250)
  assert logic.top_driver([]) is None
  assert logic.tip_cents({'tip': 0.1 + 0.2}) == 30
  assert logic.hourly_tip_record(T0, (3, 250)) == {'windowEnd': T0, 'driverId': 3,
                                                   'totalTips': 2.5}
