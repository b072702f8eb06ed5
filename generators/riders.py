"""Riders and taxis: two streams with different partition keys that tell one story.

A rider asks for a ride (``RideRequested``, keyed by ``rider_id``, from
``rider-app``); a free taxi is dispatched, drives to the rider and picks them up
(``RiderPickedUp``, naming the taxi, from ``driver-app``), drives to another
zone and drops them off (``RiderDroppedOff``). While it moves, the taxi reports
its position every few seconds (``TaxiLocationReported``, keyed by ``taxi_id``,
from ``taxi-gps``): on its way to the rider and with the rider inside, ending
with a report at the drop-off. Joining each rider's current taxi with that
taxi's positions gives where the rider is: the canonical ``RiderLocated``.

So that the join's timers have work to do, a few taxis have a broken GPS and
never report (a pickup with no position), and a few requests are cancelled
before any taxi comes.

Events are emitted in event-time order and sequenced per partition key from 1,
so per-key order is event-time order; requests follow the arrival phases
(:mod:`generators.phases`), one trip per arrival. Same seed, same events.
"""

from __future__ import annotations

import heapq
import math
import random
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from sourcebeam.generators import phases as phases_mod
from sourcebeam.generators.jsonl import iso_clock, event_id_from_bits
from sourcebeam.generators.jsonl import demo_registry

RIDER_TYPES = ('RideRequested', 'RiderPickedUp', 'RiderDroppedOff', 'TaxiLocationReported')
TRIP_RATE = 1.0          # ride requests per second by default
DEFAULT_REPORT_INTERVAL_S = 5.0
FIRST_TAXI_ID = 7000

# (zone, lon, lat, share of requests)
ZONES = (
    ('Midtown', -73.984, 40.754, 0.22),
    ('Upper East Side', -73.958, 40.773, 0.10),
    ('Upper West Side', -73.975, 40.787, 0.08),
    ('Chelsea', -74.001, 40.746, 0.08),
    ('Greenwich Village', -74.000, 40.733, 0.07),
    ('Financial District', -74.009, 40.707, 0.08),
    ('Harlem', -73.945, 40.811, 0.05),
    ('Williamsburg', -73.957, 40.714, 0.07),
    ('Downtown Brooklyn', -73.987, 40.692, 0.06),
    ('Long Island City', -73.948, 40.744, 0.05),
    ('Astoria', -73.923, 40.764, 0.04),
    ('JFK Airport', -73.779, 40.641, 0.05),
    ('LaGuardia Airport', -73.874, 40.776, 0.05),
)


def rider_id(i: int) -> str:
  return f'rider-{i:06d}'


def timed_rider_events(n_trips: int,
                       seed: int = 1,
                       phases: Optional[Sequence[phases_mod.Phase]] = None,
                       start: Union[int, str, None] = None,
                       report_interval_s: float = DEFAULT_REPORT_INTERVAL_S,
                       riders: Optional[int] = None,
                       broken_gps_share: float = 0.02,
                       cancel_share: float = 0.03) -> Iterator[Tuple[int, Dict]]:
  """(event time in epoch millis, raw envelope) for up to n_trips trips, in event-time order."""
  ph = phases_mod.resolve(n_trips, phases, default_rate=TRIP_RATE)
  rng = random.Random(seed)
  rand, bits, gauss = rng.random, rng.getrandbits, rng.gauss
  iso = iso_clock()
  versions = {t: demo_registry().current[t].version for t in RIDER_TYPES}
  n_riders = riders or max(20, n_trips // 3)
  interval_ms = max(1, int(report_interval_s * 1000))
  zone_cum, acc = [], 0.0
  for z in ZONES:
    acc += z[3]
    zone_cum.append(acc)
  zone_cum[-1] = 1.0

  # Heap of (time, tiebreak, kind, payload): kind 'event' is a planned rider
  # event, kind 'move' a taxi in motion whose next report is due at time.
  heap: List[Tuple] = []
  tiebreak = 0
  free_taxis: List[Tuple[int, int]] = []  # (free from, taxi index)
  taxi_pos: List[Tuple[float, float]] = []
  taxi_gps_ok: List[bool] = []
  rider_busy: Dict[int, int] = {}          # rider -> time their trip ends
  seq: Dict[str, int] = {}

  def push(t: int, kind: str, payload) -> None:
    nonlocal tiebreak
    tiebreak += 1
    heapq.heappush(heap, (t, tiebreak, kind, payload))

  def pick_zone() -> int:
    x = rand()
    for i, c in enumerate(zone_cum):
      if x <= c:
        return i
    return 0

  def spot(zone: int) -> Tuple[float, float]:
    z = ZONES[zone]
    return round(gauss(z[1], 0.004), 6), round(gauss(z[2], 0.004), 6)

  def envelope(t: int, etype: str, data: Dict, eid: str, origin: str,
               ff: Optional[str]) -> Tuple[int, Dict]:
    key = data['rider_id'] if 'rider_id' in data else str(data['taxi_id'])
    s = seq.get(key, 0) + 1
    seq[key] = s
    return t, {'event_id': eid, 'event_type': etype, 'schema_version': versions[etype],
               'partition_key': key, 'sequence': s, 'event_time': iso(t), 'origin': origin,
               'follows_from': ff, 'data': data}

  def due(before: Optional[int]) -> Iterator[Tuple[int, Dict]]:
    """Everything planned for earlier than ``before`` (everything, if None)."""
    while heap and (before is None or heap[0][0] < before):
      t, _, kind, payload = heapq.heappop(heap)
      if kind == 'event':
        yield envelope(t, *payload)
        continue
      # payload: [taxi index, legs [(t0, t1, lon0, lat0, lon1, lat1)], end]
      taxi, legs, end = payload
      for t0, t1, lon0, lat0, lon1, lat1 in legs:
        if t <= t1:
          f = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
          lon = round(lon0 + (lon1 - lon0) * f + gauss(0, 0.00005), 6)
          lat = round(lat0 + (lat1 - lat0) * f + gauss(0, 0.00005), 6)
          break
      yield envelope(t, 'TaxiLocationReported',
                     {'taxi_id': FIRST_TAXI_ID + taxi, 'lon': lon, 'lat': lat},
                     event_id_from_bits(bits(128)), 'taxi-gps', None)
      if t < end:
        push(min(end, t + int(interval_ms * (0.8 + 0.4 * rand()))), 'move', payload)

  for t in phases_mod.arrival_times(ph, start, limit=n_trips):
    yield from due(t)

    r = int(n_riders * rand() ** 1.5)
    for _ in range(8):  # a rider has one trip at a time
      if rider_busy.get(r, -1) < t:
        break
      r = (r + 1) % n_riders
    else:
      r = n_riders
      n_riders += 1
    rid = rider_id(r)
    zone = pick_zone()
    lon, lat = spot(zone)
    req_id = event_id_from_bits(bits(128))
    push(t, 'event', ('RideRequested', {'rider_id': rid, 'zone': ZONES[zone][0], 'lon': lon,
                                        'lat': lat}, req_id, 'rider-app', None))
    if rand() < cancel_share:
      rider_busy[r] = t
      continue

    if free_taxis and free_taxis[0][0] <= t:
      taxi = heapq.heappop(free_taxis)[1]
    else:
      taxi = len(taxi_pos)
      taxi_pos.append(spot(pick_zone()))
      taxi_gps_ok.append(rand() >= broken_gps_share)
    dispatched = t + 5_000 + int(rand() * 25_000)
    pickup_t = dispatched + 120_000 + int(rand() * 360_000)
    dest = pick_zone()
    if dest == zone:
      dest = (dest + 1 + int(rand() * (len(ZONES) - 1))) % len(ZONES)
    dlon, dlat = spot(dest)
    km = math.hypot((dlon - lon) * 84.0, (dlat - lat) * 111.0)
    drop_t = pickup_t + int((4 + km * 2.2 * (0.8 + 0.6 * rand())) * 60_000)
    rider_busy[r] = drop_t

    pickup_id, drop_id = event_id_from_bits(bits(128)), event_id_from_bits(bits(128))
    taxi_id = FIRST_TAXI_ID + taxi
    push(pickup_t, 'event', ('RiderPickedUp', {'rider_id': rid, 'taxi_id': taxi_id,
                                               'zone': ZONES[zone][0]},
                             pickup_id, 'driver-app', req_id))
    push(drop_t, 'event', ('RiderDroppedOff', {'rider_id': rid, 'taxi_id': taxi_id,
                                               'zone': ZONES[dest][0]},
                           drop_id, 'driver-app', pickup_id))
    if taxi_gps_ok[taxi]:
      tlon, tlat = taxi_pos[taxi]
      legs = [(dispatched, pickup_t, tlon, tlat, lon, lat),
              (pickup_t, drop_t, lon, lat, dlon, dlat)]
      push(dispatched, 'move', (taxi, legs, drop_t))
    taxi_pos[taxi] = (dlon, dlat)
    heapq.heappush(free_taxis, (drop_t + int(rand() * 120_000), taxi))

  yield from due(None)


def rider_events(n_trips: int, seed: int = 1, **kwargs) -> Iterator[Dict]:
  """Raw rider and taxi envelopes (dicts exactly as written) for up to n_trips trips."""
  for _, env in timed_rider_events(n_trips, seed, **kwargs):
    yield env
