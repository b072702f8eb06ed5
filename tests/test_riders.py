"""Riders and taxis: the per-taxi join in plain Python, LocateRiders on bounded input
and in streaming (TestStream), and the CRDT aggregates (occupancy, zone counts)."""

import collections
import io
import random

import apache_beam as beam
import fastavro
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window

from tests.demo import DEMO_SCHEMAS, REG  # noqa: F401
from sourcebeam.generators.riders import rider_events
from sourcebeam.schemas.envelope import iso_to_millis, make_envelope, to_avro_record, to_json
from sourcebeam.schemas.validation import publish_raw
from sourcebeam.demo.riders import (LocateRiders, TaxiJoin, TaxiOccupancy, ZoneRiderCounts,
                               join_taxi_events, rider_located_id, rider_occupancy,
                               sequence_rider, taxi_of)

T0 = 1_795_651_200_000
S = 1000


class Events:
  def __init__(self):
    self.seq = collections.Counter()
    self.n = 0

  def __call__(self, event_type, t, **data):
    self.n += 1
    key = data.get('rider_id', str(data.get('taxi_id')))
    self.seq[key] += 1
    return make_envelope(REG, event_type, data, event_id=f'e{self.n:03d}', sequence=self.seq[key],
                         event_time=T0 + t, origin='test')


def pickup(ev, t, rider='r1', taxi=7):
  return ev('RiderPickedUp', t, rider_id=rider, taxi_id=taxi, zone='Midtown')


def dropoff(ev, t, rider='r1', taxi=7):
  return ev('RiderDroppedOff', t, rider_id=rider, taxi_id=taxi, zone='SoHo')


def position(ev, t, lon, taxi=7):
  return ev('TaxiLocationReported', t, taxi_id=taxi, lon=lon, lat=40.7)


JOIN = TaxiJoin(max_position_age_ms=30 * S, pickup_timeout_ms=60 * S)


def run(events, join=JOIN, taxi=7):
  located, unmatched = join_taxi_events(join, taxi, events)
  return ([(l.rider_id, l.lon, l.located_at - T0) for l in located],
          [(u['kind'], u['reason']) for u in unmatched])


# --- the join in plain Python -------------------------------------------------------------

def test_fresh_position_locates_at_pickup_then_each_position_locates_riders_inside():
  ev = Events()
  events = [position(ev, 0, -73.1), pickup(ev, 10 * S), pickup(ev, 12 * S, rider='r2'),
            position(ev, 15 * S, -73.2), dropoff(ev, 20 * S), position(ev, 25 * S, -73.3),
            dropoff(ev, 25 * S, rider='r2')]
  random.Random(1).shuffle(events)  # arrival order does not matter
  located, unmatched = run(events)
  assert located == [('r1', -73.1, 0), ('r2', -73.1, 0), ('r1', -73.2, 15 * S),
                     ('r2', -73.2, 15 * S), ('r2', -73.3, 25 * S)]
  assert unmatched == []


def test_stale_position_is_not_used_and_expires_to_unmatched():
  ev = Events()
  located, unmatched = run([position(ev, 0, -73.1), pickup(ev, 31 * S),
                            position(ev, 40 * S, -73.2), dropoff(ev, 50 * S)])
  assert located == [('r1', -73.2, 40 * S)]
  assert unmatched == [('position', 'stale: located no rider within 30000 ms')]


def test_pickup_without_position_times_out_and_early_dropoff_is_reported():
  ev = Events()
  located, unmatched = run([pickup(ev, 0), dropoff(ev, 120 * S)])  # broken GPS
  assert located == []
  assert unmatched == [('pickup', 'no position of taxi 7 within 60000 ms of pickup')]
  ev = Events()
  assert run([pickup(ev, 0), dropoff(ev, 20 * S)])[1] == [
      ('pickup', 'dropped off before any position')]
  ev = Events()
  assert run([dropoff(ev, 0)])[1] == [('dropoff', 'no pickup of r1 in taxi 7')]


def test_a_position_after_the_timeout_still_locates_the_rider():
  ev = Events()
  located, unmatched = run([pickup(ev, 0), position(ev, 90 * S, -73.5), dropoff(ev, 100 * S)])
  assert located == [('r1', -73.5, 90 * S)]
  assert unmatched == [('pickup', 'no position of taxi 7 within 60000 ms of pickup')]


def test_no_state_is_left_behind_a_trip_without_drop_off_is_reported():
  join = TaxiJoin(max_position_age_ms=30 * S, pickup_timeout_ms=60 * S, max_trip_ms=600 * S)
  ev = Events()
  state = join.initial_state(7)
  unmatched = []
  for e in (position(ev, 0, -73.1), pickup(ev, 5 * S), pickup(ev, 6 * S, rider='r2'),
            dropoff(ev, 50 * S, rider='r2')):
    state, _, un = join.apply(state, e)
    unmatched += un
  state, _, un = join.advance(state, 599 * S + T0)
  assert [t.rider_id for t in state.trips] == ['r1'] and unmatched + un == []
  state, _, un = join.finish(state)
  assert state.is_empty()
  assert [(u['kind'], u['reason']) for u in un] == [('trip', 'no drop-off within 600000 ms of pickup')]


def test_rider_located_envelopes_are_valid_deterministic_and_sequenced():
  ev = Events()
  events = [pickup(ev, 0), position(ev, 5 * S, -73.1), position(ev, 10 * S, -73.2)]
  located, _ = join_taxi_events(JOIN, 7, events)
  envs = sequence_rider(REG, reversed(located))
  assert [e['sequence'] for e in envs] == [1, 2]
  assert [e['follows_from'] for e in envs] == [events[1]['event_id'], events[2]['event_id']]
  assert envs[0]['event_id'] == rider_located_id('r1', events[1]['event_id'])
  assert envs[0]['partition_key'] == 'r1' and envs[0]['event_time'] == T0 + 5 * S
  assert envs[0]['data'] == {'rider_id': 'r1', 'taxi_id': 7, 'lon': -73.1, 'lat': 40.7,
                             'located_at': T0 + 5 * S}
  for e in envs:
    published, dead, repairs = publish_raw(to_json(e), REG)
    assert dead is None and repairs == [] and published == e
    fastavro.schemaless_writer(io.BytesIO(), REG.parsed_envelope, to_avro_record(e, REG))


# --- generated riders and taxis -------------------------------------------------------------

def published_rider_events(n_trips, seed):
  return [dict(e, event_time=iso_to_millis(e['event_time']))
          for e in rider_events(n_trips, seed=seed, broken_gps_share=0.2)]


@pytest.fixture(scope='module')
def generated():
  events = published_rider_events(25, seed=3)
  join = TaxiJoin()
  by_taxi = collections.defaultdict(list)
  for e in events:
    if e['event_type'] != 'RideRequested':
      by_taxi[taxi_of(e)].append(e)
  located, unmatched = [], []
  for taxi, evs in by_taxi.items():
    loc, un = join_taxi_events(join, taxi, evs)
    located += loc
    unmatched += un
  by_rider = collections.defaultdict(list)
  for l in located:
    by_rider[l.rider_id].append(l)
  envelopes = [e for locs in by_rider.values() for e in sequence_rider(REG, locs)]
  return events, envelopes, unmatched


def test_generated_trips_every_pickup_is_located_or_unmatched(generated):
  """Pickups in taxis that report are located; pickups in taxis with a broken
  GPS (which never report) are unmatched; nothing else is."""
  events, envelopes, unmatched = generated
  pickups = [e for e in events if e['event_type'] == 'RiderPickedUp']
  reporting = {e['data']['taxi_id'] for e in events if e['event_type'] == 'TaxiLocationReported'}
  located = {(e['partition_key'], e['data']['taxi_id']) for e in envelopes}
  unmatched_ids = {u['event_id'] for u in unmatched if u['kind'] == 'pickup'}
  broken = [p for p in pickups if p['data']['taxi_id'] not in reporting]
  assert broken and len(broken) < len(pickups)  # the feed has both kinds
  for p in pickups:
    key = (p['partition_key'], p['data']['taxi_id'])
    if p['data']['taxi_id'] in reporting:
      assert key in located and p['event_id'] not in unmatched_ids
    else:
      assert key not in located and p['event_id'] in unmatched_ids
  assert len(unmatched_ids) == len(broken)
  # a located rider is where the taxi reported itself
  reports = {e['event_id']: e for e in events if e['event_type'] == 'TaxiLocationReported'}
  for env in envelopes:
    rep = reports[env['follows_from']]
    assert (env['data']['lon'], env['data']['lat']) == (rep['data']['lon'], rep['data']['lat'])
    assert env['data']['taxi_id'] == rep['data']['taxi_id']


def test_locate_riders_bounded_matches_plain_python(generated):
  events, envelopes, unmatched = generated
  shuffled = list(events)
  random.Random(9).shuffle(shuffled)
  with TestPipeline() as p:
    out = p | beam.Create(shuffled) | LocateRiders(REG)
    assert_that(out.located, equal_to(envelopes))
    assert_that(out.unmatched | beam.Map(lambda u: (u['kind'], u['event_id'])),
                equal_to([(u['kind'], u['event_id']) for u in unmatched]), label='unmatched')


def test_locate_riders_streaming_with_watermarks_between_events():
  """Events arrive in event-time order with watermark steps, one position out of
  order; the streaming expansion gives the same envelopes as the bounded one."""
  ev = Events()
  events = [position(ev, 0, -73.1), pickup(ev, 10 * S), position(ev, 20 * S, -73.2),
            pickup(ev, 21 * S, rider='r2', taxi=8),  # taxi 8 never reports
            position(ev, 30 * S, -73.3), dropoff(ev, 35 * S), position(ev, 40 * S, -73.4)]
  located, _ = join_taxi_events(JOIN, 7, [e for e in events if taxi_of(e) == 7])
  expected = sequence_rider(REG, located)
  assert len(expected) == 3
  stream = (TestStream()
            .advance_watermark_to((T0) / 1000)
            .add_elements([window.TimestampedValue(events[0], T0 / 1000),
                           window.TimestampedValue(events[1], (T0 + 10 * S) / 1000)])
            .advance_watermark_to((T0 + 15 * S) / 1000)
            .add_elements([window.TimestampedValue(e, e['event_time'] / 1000)
                           for e in (events[4], events[2], events[3])])  # 30 s before 20 s
            .advance_watermark_to((T0 + 32 * S) / 1000)
            .add_elements([window.TimestampedValue(e, e['event_time'] / 1000)
                           for e in events[5:]])
            .advance_watermark_to((T0 + 300 * S) / 1000)
            .advance_watermark_to_infinity())
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  with TestPipeline(options=options) as p:
    out = p | stream | LocateRiders(REG, max_position_age_ms=30 * S, pickup_timeout_ms=60 * S)
    assert_that(out.located, equal_to(expected))
    assert_that(out.unmatched | beam.Map(lambda u: (u['kind'], u['partition_key'], u['reason'])),
                equal_to([('pickup', 'r2', 'no position of taxi 8 within 60000 ms of pickup'),
                          ('position', '7', 'stale: located no rider within 30000 ms')]),
                label='unmatched')


# --- CRDT aggregates ------------------------------------------------------------------------

def test_occupancy_partials_merge_into_riders_in_each_taxi():
  ev = Events()
  r1 = [pickup(ev, 0, 'r1', 7), dropoff(ev, 10 * S, 'r1', 7), pickup(ev, 20 * S, 'r1', 8)]
  r2 = [pickup(ev, 5 * S, 'r2', 7)]
  p1, p2 = rider_occupancy(reversed(r1)), rider_occupancy(r2)  # sequence order is restored
  assert p1[7].value() == frozenset() and p1[8].value() == frozenset({'r1'})
  assert p1[7].merge(p2[7]).value() == frozenset({'r2'})


def test_taxi_occupancy_and_zone_counts_on_generated_trips():
  events = published_rider_events(30, seed=4)
  cut = max(e['event_time'] for e in events) - 20 * 60 * S  # stop mid-way: some riders inside
  events = [e for e in events if e['event_time'] <= cut]
  inside = collections.defaultdict(set)
  waiting = collections.Counter()
  for e in sorted(events, key=lambda e: (e['event_time'], e['sequence'])):
    if e['event_type'] == 'RiderPickedUp':
      inside[e['data']['taxi_id']].add(e['data']['rider_id'])
      waiting[e['data']['zone']] -= 1
    elif e['event_type'] == 'RiderDroppedOff':
      inside[e['data']['taxi_id']].discard(e['data']['rider_id'])
    elif e['event_type'] == 'RideRequested':
      waiting[e['data']['zone']] += 1
  assert any(inside.values())
  random.Random(5).shuffle(events)
  with TestPipeline() as p:
    envs = p | beam.Create(events)
    occupancy = envs | TaxiOccupancy() | beam.MapTuple(lambda taxi, s: (taxi, sorted(s.value())))
    assert_that(occupancy, equal_to([(t, sorted(rs)) for t, rs in inside.items()]))
    zones = envs | ZoneRiderCounts(buckets=4) | beam.MapTuple(lambda z, c: (z, c.value()))
    assert_that(zones, equal_to(list(waiting.items())), label='zones')


def test_locate_riders_streaming_late_position_is_unmatched_not_lost():
  """A position that arrives behind the watermark, older than the taxi's latest
  position, is reported as late; the on-time ones locate the rider."""
  ev = Events()
  p0, up, p20, late = (position(ev, 0, -73.1), pickup(ev, 10 * S), position(ev, 20 * S, -73.2),
                       position(ev, 5 * S, -73.9))
  stamped = lambda e: window.TimestampedValue(e, e['event_time'] / 1000)
  stream = (TestStream()
            .advance_watermark_to(T0 / 1000)
            .add_elements([stamped(p0), stamped(up), stamped(p20)])
            .advance_watermark_to((T0 + 25 * S) / 1000)
            .add_elements([stamped(late)])             # 5 s, with the watermark at 25 s
            .advance_watermark_to((T0 + 30 * S) / 1000)
            .add_elements([stamped(dropoff(ev, 30 * S))])
            .advance_watermark_to((T0 + 300 * S) / 1000)
            .advance_watermark_to_infinity())
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  with TestPipeline(options=options) as p:
    out = p | stream | LocateRiders(REG, max_position_age_ms=30 * S, pickup_timeout_ms=60 * S)
    assert_that(out.located | beam.Map(lambda e: (e['sequence'], e['data']['lon'])),
                equal_to([(1, -73.1), (2, -73.2)]))
    assert_that(out.unmatched | beam.Map(lambda u: (u['kind'], u['event_id'], u['reason'])),
                equal_to([('position', late['event_id'],
                           "late: older than the taxi's latest position")]), label='unmatched')
