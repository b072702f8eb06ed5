"""Riders and taxis: a join across partition keys into the canonical ``RiderLocated``.

Part of the demo application, written with Sourcebeam's public API (``sourcebeam``).

Rider events are keyed by rider (``RideRequested``, ``RiderPickedUp`` naming its
taxi, ``RiderDroppedOff``); positions are keyed by taxi
(``TaxiLocationReported``). Where is each rider? Re-key the pickups and
drop-offs by taxi, join them with that taxi's positions in per-taxi state, and
emit ``RiderLocated`` envelopes keyed by rider again.

The join, per taxi, in event-time order (:class:`TaxiJoin`, plain Python):

* a position locates every rider in the taxi at that time;
* a pickup is located at once by the taxi's latest position if that is at most
  ``max_position_age_ms`` old;
* a trip with no drop-off ``max_trip_ms`` after its pickup leaves state, to
  ``unmatched`` as well, so no state is left behind;
* a position that ages out having located no rider is expired to
  ``unmatched`` (a stale position: the taxi was empty), and a pickup that no
  position located within ``pickup_timeout_ms`` goes to ``unmatched`` (a
  taxi with a broken GPS); a drop-off before any position, or without a
  pickup in that taxi, is unmatched too.

Arrival order is not event-time order (in a bounded run it is arbitrary), so
:class:`LocateRiders` buffers each taxi's events and applies them once the
watermark has passed them: on bounded input by sorting each taxi's events
(one GroupByKey), in streaming with an event-time timer per taxi.

``RiderLocated`` envelopes are deterministic: ``event_id`` is a UUID-5 of the
rider and the location event, ``follows_from`` the location event's id, and the
per-rider ``sequence`` follows ``located_at`` (bounded) or arrival (streaming).

Also here, the CRDT aggregates across partitions: :class:`TaxiOccupancy` (an
``ORSet`` of riders per taxi, built per rider partition and merged) and
:class:`ZoneRiderCounts` (riders waiting per zone as a ``PNCounter`` per
partition bucket, merged).
"""

from __future__ import annotations

import dataclasses
import uuid
import zlib
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import PickleCoder
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (BagStateSpec, ReadModifyWriteStateSpec,
                                              TimerSpec, on_timer)
from sourcebeam import (TIMER_OUTPUT_LATENESS, MergeCRDTs, ORSet, PNCounter, Registry,
                        in_global_window, make_envelope)
from sourcebeam import ts_of_millis as _ts

Envelope = Dict[str, Any]

RIDER_EVENTS = ('RiderPickedUp', 'RiderDroppedOff')
LOCATION_EVENT = 'TaxiLocationReported'
ORIGIN = 'sourcebeam/riders-join'
RIDER_LOCATED_NAMESPACE = uuid.UUID('5b1f7a36-0d8e-4c55-9a51-2f1e3c7d9b40')
UNMATCHED = 'unmatched'

# Same-millisecond events: a pickup, then the position, then a drop-off, so a
# report at the pickup or drop-off instant locates the rider.
_RANK = {'RiderPickedUp': 0, LOCATION_EVENT: 1, 'RiderDroppedOff': 2}


def event_order(env: Mapping[str, Any]) -> Tuple[int, int, str]:
  return (env['event_time'], _RANK[env['event_type']], env['event_id'])


def rider_located_id(rider_id: str, location_event_id: str) -> str:
  return str(uuid.uuid5(RIDER_LOCATED_NAMESPACE, f'{rider_id}|{location_event_id}'))


# --- the join in plain Python ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Position:
  event_id: str
  t: int
  lon: float
  lat: float
  used: bool = False


@dataclasses.dataclass(frozen=True)
class Trip:
  rider_id: str
  pickup: Envelope
  located: bool = False
  timed_out: bool = False


@dataclasses.dataclass(frozen=True)
class TaxiState:
  taxi_id: int
  position: Optional[Position] = None
  trips: Tuple[Trip, ...] = ()
  clock: int = -(2**62)   # event time applied up to

  def is_empty(self) -> bool:
    return self.position is None and not self.trips


class Located(NamedTuple):
  """One rider at one taxi position: becomes a RiderLocated envelope."""
  rider_id: str
  taxi_id: int
  lon: float
  lat: float
  located_at: int
  location_event_id: str


def unmatched_record(kind: str, reason: str, event: Envelope) -> Dict[str, Any]:
  return {'kind': kind, 'reason': reason, 'event_id': event['event_id'],
          'partition_key': event['partition_key'], 'event_time': event['event_time'],
          'event': event}


class TaxiJoin:
  """The per-taxi join as a pure state machine, driven in event-time order.

  ``apply(state, event)`` for each event (in :func:`event_order`), and
  ``advance(state, t)`` as event time passes ``t`` (expiring positions and
  pickups whose deadlines are <= t). Both return ``(state, located, unmatched)``.
  """

  def __init__(self, max_position_age_ms: int = 60_000, pickup_timeout_ms: int = 120_000,
               max_trip_ms: int = 6 * 3_600_000):
    if min(max_position_age_ms, pickup_timeout_ms, max_trip_ms) <= 0:
      raise ValueError('max_position_age_ms, pickup_timeout_ms and max_trip_ms must be positive')
    self.max_position_age_ms = max_position_age_ms
    self.pickup_timeout_ms = pickup_timeout_ms
    self.max_trip_ms = max_trip_ms

  def initial_state(self, taxi_id: int) -> TaxiState:
    return TaxiState(taxi_id)

  def next_deadline(self, state: TaxiState) -> Optional[int]:
    times = [trip.pickup['event_time'] + self.pickup_timeout_ms
             for trip in state.trips if not trip.located and not trip.timed_out]
    times += [trip.pickup['event_time'] + self.max_trip_ms for trip in state.trips]
    if state.position is not None:
      times.append(state.position.t + self.max_position_age_ms)
    return min(times) if times else None

  def advance(self, state: TaxiState, t: int):
    """Event time reached ``t``: expire what is due, oldest deadline first."""
    located: List[Located] = []
    unmatched: List[Dict[str, Any]] = []
    while True:
      due = self.next_deadline(state)
      if due is None or due > t:
        break
      pos = state.position
      if pos is not None and pos.t + self.max_position_age_ms == due:
        if not pos.used:
          unmatched.append({'kind': 'position', 'reason':
                            f'stale: located no rider within {self.max_position_age_ms} ms',
                            'event_id': pos.event_id, 'partition_key': str(state.taxi_id),
                            'event_time': pos.t, 'event': None})
        state = dataclasses.replace(state, position=None)
        continue
      trips = []
      for trip in state.trips:
        if trip.pickup['event_time'] + self.max_trip_ms <= due:
          # no drop-off ever came: the trip leaves state, reported (not lost)
          unmatched.append(unmatched_record(
              'trip', f'no drop-off within {self.max_trip_ms} ms of pickup', trip.pickup))
          continue
        if (not trip.located and not trip.timed_out and
            trip.pickup['event_time'] + self.pickup_timeout_ms == due):
          unmatched.append(unmatched_record(
              'pickup', f'no position of taxi {state.taxi_id} within '
              f'{self.pickup_timeout_ms} ms of pickup', trip.pickup))
          trip = dataclasses.replace(trip, timed_out=True)
        trips.append(trip)
      state = dataclasses.replace(state, trips=tuple(trips))
    state = dataclasses.replace(state, clock=max(state.clock, t))
    return state, located, unmatched

  def apply(self, state: TaxiState, event: Envelope):
    t, kind, data = event['event_time'], event['event_type'], event['data']
    state, located, unmatched = self.advance(state, t)
    if kind == LOCATION_EVENT:
      pos = state.position
      if pos is not None and t < pos.t:
        unmatched.append(unmatched_record(
            'position', 'late: older than the taxi\'s latest position', event))
        return state, located, unmatched
      new = Position(event['event_id'], t, data['lon'], data['lat'])
      trips = []
      for trip in state.trips:
        located.append(Located(trip.rider_id, state.taxi_id, new.lon, new.lat, t,
                               new.event_id))
        trips.append(dataclasses.replace(trip, located=True))
      new = dataclasses.replace(new, used=bool(trips))
      return dataclasses.replace(state, position=new, trips=tuple(trips)), located, unmatched
    rider = data['rider_id']
    if kind == 'RiderPickedUp':
      trips = [trip for trip in state.trips if trip.rider_id != rider]
      if len(trips) != len(state.trips):
        unmatched.append(unmatched_record('pickup', 'picked up again without a drop-off',
                                          event))
      trip = Trip(rider, event)
      pos = state.position
      if pos is not None and t - pos.t <= self.max_position_age_ms:
        located.append(Located(rider, state.taxi_id, pos.lon, pos.lat, pos.t, pos.event_id))
        trip = dataclasses.replace(trip, located=True)
        state = dataclasses.replace(state, position=dataclasses.replace(pos, used=True))
      return dataclasses.replace(state, trips=tuple(trips) + (trip,)), located, unmatched
    if kind == 'RiderDroppedOff':
      mine = [trip for trip in state.trips if trip.rider_id == rider]
      rest = tuple(trip for trip in state.trips if trip.rider_id != rider)
      if not mine:
        unmatched.append(unmatched_record('dropoff', f'no pickup of {rider} in taxi '
                                          f'{state.taxi_id}', event))
      elif not mine[0].located and not mine[0].timed_out:
        unmatched.append(unmatched_record('pickup', 'dropped off before any position',
                                          mine[0].pickup))
      return dataclasses.replace(state, trips=rest), located, unmatched
    raise ValueError(f'TaxiJoin cannot apply a {kind} event')

  def finish(self, state: TaxiState):
    """The end of input: every deadline passes."""
    return self.advance(state, 2**62)


def taxi_of(env: Mapping[str, Any]) -> int:
  return int(env['data']['taxi_id'])


def join_taxi_events(join: TaxiJoin, taxi_id: int, events: Iterable[Envelope]):
  """Plain-Python run over all of one taxi's events (the bounded expansion)."""
  state = join.initial_state(taxi_id)
  located: List[Located] = []
  unmatched: List[Dict[str, Any]] = []
  for env in sorted(events, key=event_order):
    state, loc, un = join.apply(state, env)
    located += loc
    unmatched += un
  state, loc, un = join.finish(state)
  return located + loc, unmatched + un


def rider_located_envelope(registry: Registry, loc: Located, sequence: int) -> Envelope:
  return make_envelope(
      registry, 'RiderLocated',
      {'rider_id': loc.rider_id, 'taxi_id': loc.taxi_id, 'lon': loc.lon, 'lat': loc.lat,
       'located_at': loc.located_at},
      event_id=rider_located_id(loc.rider_id, loc.location_event_id), sequence=sequence,
      event_time=loc.located_at, origin=ORIGIN, follows_from=loc.location_event_id)


def sequence_rider(registry: Registry, located: Iterable[Located]) -> List[Envelope]:
  """One rider's locations -> RiderLocated envelopes sequenced from 1 by time."""
  ordered = sorted(located, key=lambda l: (l.located_at, l.location_event_id))
  return [rider_located_envelope(registry, l, i) for i, l in enumerate(ordered, 1)]


# --- Beam ------------------------------------------------------------------------------

class _StreamingTaxiJoinFn(beam.DoFn):
  """Per taxi: buffer events, apply them in event-time order as the watermark passes."""

  PENDING = BagStateSpec('pending', PickleCoder())
  STATE = ReadModifyWriteStateSpec('state', PickleCoder())
  TIMER_AT = ReadModifyWriteStateSpec('timer_at', PickleCoder())
  TIMER = TimerSpec('timer', TimeDomain.WATERMARK)

  def __init__(self, join: TaxiJoin):
    self.join = join

  def process(self, element, pending=beam.DoFn.StateParam(PENDING),
              timer_at=beam.DoFn.StateParam(TIMER_AT), timer=beam.DoFn.TimerParam(TIMER)):
    _, env = element
    pending.add(env)
    at = timer_at.read()
    if at is None or env['event_time'] < at:
      timer.set(_ts(env['event_time']))
      timer_at.write(env['event_time'])

  @on_timer(TIMER)
  def fire(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam,
           pending=beam.DoFn.StateParam(PENDING), state_cell=beam.DoFn.StateParam(STATE),
           timer_at=beam.DoFn.StateParam(TIMER_AT), timer=beam.DoFn.TimerParam(TIMER)):
    now = ts.micros // 1000
    state = state_cell.read() or self.join.initial_state(key)
    events = sorted(pending.read(), key=event_order)
    due = [e for e in events if e['event_time'] <= now]
    later = [e for e in events if e['event_time'] > now]
    located: List[Located] = []
    unmatched: List[Dict[str, Any]] = []
    for env in due:
      state, loc, un = self.join.apply(state, env)
      located += loc
      unmatched += un
    state, loc, un = self.join.advance(state, now)
    located += loc
    unmatched += un
    pending.clear()
    for env in later:
      pending.add(env)
    if state.is_empty():
      state_cell.clear()
    else:
      state_cell.write(state)
    nexts = [t for t in ([later[0]['event_time']] if later else []) +
             [self.join.next_deadline(state)] if t is not None]
    if nexts:
      timer.set(_ts(min(nexts)))
      timer_at.write(min(nexts))
    else:
      timer_at.clear()
    for l in located:
      yield l
    for u in unmatched:
      yield pvalue.TaggedOutput(UNMATCHED, u)


class _StreamingSequenceFn(beam.DoFn):
  """Per rider: number RiderLocated envelopes in arrival order."""

  COUNT = ReadModifyWriteStateSpec('count', PickleCoder())

  def __init__(self, registry: Registry):
    self.registry = registry

  def process(self, element, count=beam.DoFn.StateParam(COUNT)):
    _, loc = element
    n = (count.read() or 0) + 1
    count.write(n)
    yield rider_located_envelope(self.registry, loc, n)


class RidersResult(NamedTuple):
  located: beam.PCollection    # RiderLocated envelopes, keyed (partition_key) by rider
  unmatched: beam.PCollection  # {kind, reason, event_id, partition_key, event_time, event}


class LocateRiders(beam.PTransform):
  """Published envelopes -> RiderLocated envelopes, and unmatched pickups and positions.

  Only RiderPickedUp, RiderDroppedOff and TaxiLocationReported take part; other
  event types are passed over. ``registry``: the app's schemas (RiderLocated is one
  of its types). ``expansion``: 'auto' (batch for bounded input), 'batch' or 'streaming'.
  """

  def __init__(self, registry: Registry, max_position_age_ms: int = 60_000,
               pickup_timeout_ms: int = 120_000, max_trip_ms: int = 6 * 3_600_000,
               expansion: str = 'auto'):
    super().__init__()
    self.registry = registry
    if expansion not in ('auto', 'batch', 'streaming'):
      raise ValueError(f"expansion must be 'auto', 'batch' or 'streaming', not {expansion!r}")
    self.join = TaxiJoin(max_position_age_ms, pickup_timeout_ms, max_trip_ms)
    self.expansion = expansion

  def expand(self, envelopes):
    if self.expansion == 'batch' or (self.expansion == 'auto' and envelopes.is_bounded):
      return self._expand_batch(envelopes)
    by_taxi = (envelopes
               | 'JoinEvents' >> beam.Filter(
                   lambda e: e['event_type'] in RIDER_EVENTS or e['event_type'] == LOCATION_EVENT)
               | 'KeyByTaxi' >> beam.Map(lambda e: (taxi_of(e), e)).with_output_types(Tuple[int, Any])
               | 'Global' >> beam.WindowInto(window.GlobalWindows()))
    joined = by_taxi | 'Join' >> beam.ParDo(_StreamingTaxiJoinFn(self.join)).with_outputs(
        UNMATCHED, main='located')
    located = (joined.located
               | 'ByRider' >> beam.Map(lambda l: (l.rider_id, l))
               | 'Sequence' >> beam.ParDo(_StreamingSequenceFn(self.registry)))
    return RidersResult(
        located | 'LocatedWindowing' >> beam.WindowInto(
            window.GlobalWindows(), allowed_lateness=TIMER_OUTPUT_LATENESS),
        joined[UNMATCHED] | 'UnmatchedWindowing' >> beam.WindowInto(
            window.GlobalWindows(), allowed_lateness=TIMER_OUTPUT_LATENESS))

  def _expand_batch(self, envelopes) -> RidersResult:
    """Each taxi's events grouped once and joined in event-time order; each rider's
    locations grouped once and numbered by time."""
    by_taxi = envelopes | 'ByTaxi' >> beam.FlatMap(_keyed_by_taxi).with_output_types(
        Tuple[int, Any])
    # One join over all of a taxi's events, whatever windows they came in. (In the global
    # window already, re-windowing each event would only cost: 5% of a replay of the riders
    # consumer alone, 320,000 events, went to it.)
    by_taxi = in_global_window(by_taxi)
    join, registry = self.join, self.registry
    joined = (by_taxi
              | 'PerTaxi' >> beam.GroupByKey()
              | 'Join' >> beam.FlatMapTuple(lambda taxi, evs: _tag(
                  *join_taxi_events(join, taxi, evs))).with_outputs(UNMATCHED, main='located'))
    located = (joined.located
               | 'ByRider' >> beam.Map(lambda l: (l.rider_id, l))
               | 'PerRider' >> beam.GroupByKey()
               | 'Sequence' >> beam.FlatMapTuple(
                   lambda rider, locs: sequence_rider(registry, locs)))
    return RidersResult(located, joined[UNMATCHED])


def _keyed_by_taxi(env: Envelope) -> List[Tuple[int, Envelope]]:
  """``[(taxi, event)]`` for the events the join takes, ``[]`` for the others."""
  kind = env['event_type']
  if kind == LOCATION_EVENT or kind in RIDER_EVENTS:
    return [(taxi_of(env), env)]
  return []


def _tag(located, unmatched):
  yield from located
  for u in unmatched:
    yield pvalue.TaggedOutput(UNMATCHED, u)


# --- CRDT aggregates across partitions ----------------------------------------------------------

def rider_occupancy(events: Iterable[Envelope]) -> Dict[int, ORSet]:
  """One rider's partition, in sequence order -> a partial ORSet of riders per taxi.

  A pickup adds the rider tagged with the pickup's event id; a drop-off removes
  the rider from that taxi (the tags this partition observed)."""
  sets: Dict[int, ORSet] = {}
  for e in sorted(events, key=lambda e: e['sequence']):
    if e['event_type'] not in RIDER_EVENTS:
      continue
    taxi, rider = taxi_of(e), e['data']['rider_id']
    s = sets.get(taxi, ORSet())
    sets[taxi] = s.add(rider, e['event_id']) if e['event_type'] == 'RiderPickedUp' else s.remove(rider)
  return sets


class TaxiOccupancy(beam.PTransform):
  """Published envelopes -> ``(taxi_id, ORSet of riders in it)``, merged across partitions.

  Each rider's events (one partition key) build a partial ORSet per taxi in
  sequence order; ``MergeCRDTs(ORSet)`` merges the partials of all partitions
  per taxi. ``value()`` of the result is the set of riders in the taxi at the
  end of the input (bounded input, or per window).
  """

  def expand(self, envelopes):
    return (envelopes
            | 'RiderEvents' >> beam.Filter(lambda e: e['event_type'] in RIDER_EVENTS)
            | 'ByRider' >> beam.Map(lambda e: (e['partition_key'], e))
            | 'PerRider' >> beam.GroupByKey()
            | 'Partials' >> beam.FlatMapTuple(lambda rider, evs: rider_occupancy(evs).items())
            | 'MergePerTaxi' >> beam.CombinePerKey(MergeCRDTs(ORSet)))


def partition_bucket(key: str, buckets: int) -> int:
  """A stable partition bucket (the same in every process, unlike hash())."""
  return zlib.crc32(key.encode('utf-8')) % buckets


def zone_delta(env: Mapping[str, Any]) -> Optional[Tuple[str, int]]:
  """Riders waiting per zone: a request adds one, a pickup takes one away."""
  if env['event_type'] == 'RideRequested':
    return env['data']['zone'], 1
  if env['event_type'] == 'RiderPickedUp':
    return env['data']['zone'], -1
  return None


def bucket_counter(bucket: int, deltas: Iterable[int]) -> PNCounter:
  c = PNCounter()
  up = sum(d for d in deltas if d > 0)
  down = -sum(d for d in deltas if d < 0)
  replica = f'partition-{bucket}'
  return c.increment(replica, up).decrement(replica, down)


class ZoneRiderCounts(beam.PTransform):
  """Published envelopes -> ``(zone, PNCounter)`` of riders waiting per zone.

  Each partition bucket (riders hashed into ``buckets``) counts its own
  requests and pickups per zone as a PNCounter with itself as the replica;
  ``MergeCRDTs(PNCounter)`` merges the buckets per zone. A request never
  picked up (cancelled) stays counted.
  """

  def __init__(self, buckets: int = 8):
    super().__init__()
    self.buckets = buckets

  def expand(self, envelopes):
    buckets = self.buckets
    return (envelopes
            | 'ZoneDeltas' >> beam.FlatMap(lambda e: [
                ((d[0], partition_bucket(e['partition_key'], buckets)), d[1])
                for d in [zone_delta(e)] if d is not None])
            | 'PerZoneBucket' >> beam.GroupByKey()
            | 'BucketCounters' >> beam.MapTuple(
                lambda zb, deltas: (zb[0], bucket_counter(zb[1], list(deltas))))
            | 'MergePerZone' >> beam.CombinePerKey(MergeCRDTs(PNCounter)))
