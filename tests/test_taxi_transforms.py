"""The taxi transforms on real runners: bounded input (the watermark reaches the
end of time when the input ends) and streaming with TestStream, including
watermarks between events, late data, and timer output at the end of a stream."""

import json
import os
import uuid

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window

from sourcebeam.demo import taxi_logic as logic
from sourcebeam.demo.taxi import (CleanseRides, HourlyTips, JoinRidesAndFares, LongRideAlerts,
                             ParseTaxiRecords)
from sourcebeam.schemas.envelope import millis_to_iso

T0 = 1_795_651_200_000  # 2026-11-26T00:00:00Z
MIN = logic.MINUTE_MS
H = logic.HOUR_MS


def ride(ride_id, t, is_start=True, lon=-73.98, driver=7):
  return {'rideId': ride_id, 'isStart': is_start, 'eventTime': t, 'startLon': lon,
          'startLat': 40.75, 'endLon': -73.95, 'endLat': 40.78, 'passengerCnt': 1,
          'taxiId': 100 + driver, 'driverId': driver}


def fare(ride_id, t, tip=1.0, driver=7):
  return {'rideId': ride_id, 'taxiId': 100 + driver, 'driverId': driver, 'startTime': t,
          'paymentType': 'CARD', 'tip': tip, 'tolls': 0.0, 'totalFare': 10.0}


def streaming():
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  return TestPipeline(options=options)


def test_stream(steps):
  """steps: ('wm', millis) or (record, event-time millis) -> a TestStream."""
  ts = TestStream()
  for a, b in steps:
    if a == 'wm':
      ts = ts.advance_watermark_to(b / 1000)
    else:
      ts = ts.add_elements([window.TimestampedValue(a, b / 1000)])
  return ts.advance_watermark_to_infinity()


test_stream.__test__ = False  # a helper, not a test


# --- bounded --------------------------------------------------------------------------

def test_parse_splits_records_and_dead_letters():
  lines = [json.dumps(dict(ride(1, T0), eventTime=millis_to_iso(T0))), 'oops', '{"rideId": 2}']
  with TestPipeline() as p:
    parsed = p | beam.Create(lines) | ParseTaxiRecords('ride')
    assert_that(parsed.records, equal_to([ride(1, T0)]))
    assert_that(parsed.dead_letters | beam.Map(lambda d: (d['line'], d['reason'].split(':')[0])),
                equal_to([('oops', 'malformed JSON'),
                          ('{"rideId": 2}', 'ride lacks field(s) isStart, eventTime, startLon, '
                                            'startLat, endLon, endLat, passengerCnt, taxiId, '
                                            'driverId')]),
                label='dead')


def test_bounded_join_long_rides_and_cleanse():
  rides = [ride(1, T0), ride(1, T0 + 3 * H, is_start=False),          # long
           ride(2, T0 + MIN), ride(2, T0 + 2 * H + MIN, is_start=False),  # exactly 2 h
           ride(3, T0 + 2 * MIN, lon=0.0),                                # never ends, outside
           ride(4, T0 + 9 * H, is_start=False)]                           # END without START
  fares = [fare(1, T0), fare(2, T0 + MIN), fare(9, T0 + 5 * MIN)]
  stamped = lambda rs, f: [window.TimestampedValue(r, r[f] / 1000) for r in rs]
  with TestPipeline() as p:
    r = p | 'rides' >> beam.Create(stamped(rides, 'eventTime'))
    f = p | 'fares' >> beam.Create(stamped(fares, 'startTime'))
    joined = (r, f) | JoinRidesAndFares(expire_after_ms=30 * MIN)
    assert_that(joined.joined | beam.Map(lambda j: (j['ride']['rideId'], j['fare']['rideId'])),
                equal_to([(1, 1), (2, 2)]), label='joined')
    assert_that(joined.unmatched | beam.Map(lambda u: (u['side'], u['record']['rideId'],
                                                       u['reason'])),
                equal_to([('ride', 3, 'no fare within 30 min'),
                          ('fare', 9, 'no START ride within 30 min')]), label='unmatched')
    long = r | LongRideAlerts()
    assert_that(long.alerts, equal_to([{'rideId': 1}, {'rideId': 3}]), label='alerts')
    assert_that(long.ignored | beam.Map(lambda i: (i['rideId'], i['reason'])),
                equal_to([(4, 'END without START')]), label='ignored')
    assert_that(r | CleanseRides() | beam.Map(lambda x: x['rideId']),
                equal_to([1, 1, 2, 2, 4]), label='cleansed')


# --- streaming ------------------------------------------------------------------------

def test_streaming_join_with_watermarks_between_events_and_late_data():
  steps = [('wm', T0),
           (ride(1, T0), T0),
           ('wm', T0 + 10_000),
           (fare(1, T0), T0),                   # behind the watermark: still joins
           (fare(2, T0 + 20_000), T0 + 20_000),
           (ride(1, T0 + 5 * MIN, is_start=False), T0 + 5 * MIN),  # END: passed over
           ('wm', T0 + 20_000 + 30 * MIN),      # fare 2's expiry fires here
           (ride(2, T0 + 20_000), T0 + 20_000),  # late START: fare 2 already expired
           ('wm', T0 + 2 * H)]                  # START 2 expires too
  with streaming() as p:
    events = p | test_stream(steps)
    rides = events | 'rides' >> beam.Filter(lambda e: 'isStart' in e)
    fares = events | 'fares' >> beam.Filter(lambda e: 'paymentType' in e)
    out = (rides, fares) | JoinRidesAndFares(expire_after_ms=30 * MIN)
    assert_that(out.joined, equal_to([{'ride': ride(1, T0), 'fare': fare(1, T0)}]))
    assert_that(out.unmatched | beam.Map(lambda u: (u['side'], u['record']['rideId'])),
                equal_to([('fare', 2), ('ride', 2)]), label='unmatched')


def test_streaming_long_rides_in_either_order_once_each():
  steps = [('wm', T0),
           (ride(1, T0 + 90 * MIN, is_start=False), T0 + 90 * MIN),  # END before START
           (ride(1, T0), T0),                                       # 90 min: no alert
           (ride(2, T0 + MIN), T0 + MIN),                           # END comes late
           ('wm', T0 + 2 * H + MIN),                                # exactly 2 h: not yet
           (ride(3, T0 + 2 * MIN), T0 + 2 * MIN),
           (ride(3, T0 + 2 * H + 2 * MIN, is_start=False), T0 + 2 * H + 2 * MIN),
           ('wm', T0 + 3 * H),                                      # ride 2 alerts here
           (ride(2, T0 + 4 * H, is_start=False), T0 + 4 * H),       # late END: no 2nd alert
           ('wm', T0 + 10 * H)]
  with streaming() as p:
    out = p | test_stream(steps) | LongRideAlerts(settle_after_ms=2 * H)
    assert_that(out.alerts, equal_to([{'rideId': 2}]))
    assert_that(out.ignored, equal_to([]), label='ignored')


def test_streaming_hourly_tips_fires_per_hour_and_updates_on_late_fares():
  steps = [('wm', T0),
           (fare(1, T0 + MIN, tip=2.0, driver=1), T0 + MIN),
           (fare(2, T0 + 2 * MIN, tip=3.0, driver=2), T0 + 2 * MIN),
           (fare(3, T0 + H + MIN, tip=1.0, driver=1), T0 + H + MIN),
           ('wm', T0 + H + 2 * MIN),            # hour 1 fires: driver 2, 3.00
           (fare(4, T0 + 3 * MIN, tip=1.5, driver=1), T0 + 3 * MIN),  # late, within lateness
           ('wm', T0 + H + 20 * MIN),           # past hour 1's lateness
           (fare(5, T0 + 4 * MIN, tip=9.0, driver=3), T0 + 4 * MIN),  # too late: dropped
           ('wm', T0 + 3 * H)]
  with streaming() as p:
    out = p | test_stream(steps) | HourlyTips(allowed_lateness_s=600)
    assert_that(out, equal_to([
        {'windowEnd': T0 + H, 'driverId': 2, 'totalTips': 3.0},
        {'windowEnd': T0 + H, 'driverId': 1, 'totalTips': 3.5},   # late pane, accumulated
        {'windowEnd': T0 + 2 * H, 'driverId': 1, 'totalTips': 1.0}]))


class _WriteToDir(beam.DoFn):
  """Test sink: one JSON file per element, read back after the run."""

  def __init__(self, directory):
    self.directory = directory

  def process(self, element):
    with open(os.path.join(self.directory, f'{uuid.uuid4()}.json'), 'w') as f:
      json.dump(element, f)


def _read_dir(directory):
  return sorted(json.load(open(os.path.join(directory, n))) for n in os.listdir(directory))


def test_timer_output_at_end_of_stream_survives_a_downstream_group_by_key(tmp_path):
  """The watermark jumps to the end of time with alert timers pending (a stream
  that ends). The alerts those timers emit are behind the watermark; the
  transform's output windowing allows for it, so a GroupByKey downstream keeps
  them. The control re-windows with no allowed lateness and loses them."""
  kept, control = tmp_path / 'kept', tmp_path / 'control'
  kept.mkdir(), control.mkdir()
  steps = [('wm', T0), (ride(1, T0), T0), (ride(2, T0), T0),
           (ride(2, T0 + 5 * H, is_start=False), T0 + 5 * H)]  # ride 2 settles on arrival
  with streaming() as p:
    alerts = (p | test_stream(steps) | LongRideAlerts()).alerts
    for name, pcoll, out in (
        ('kept', alerts, kept),
        ('control', alerts | 'NoLateness' >> beam.WindowInto(window.GlobalWindows()), control)):
      keyed = pcoll | f'{name} key' >> beam.Map(lambda a: ('alerts', a['rideId']))
      keyed.is_bounded = True  # as assert_that does: a GroupByKey in the global window
      (keyed | f'{name} group' >> beam.GroupByKey()
       | f'{name} ids' >> beam.MapTuple(lambda k, ids: sorted(ids))
       | f'{name} write' >> beam.ParDo(_WriteToDir(str(out))))
  assert sorted(x for pane in _read_dir(kept) for x in pane) == [1, 2]
  assert sorted(x for pane in _read_dir(control) for x in pane) == [2]
