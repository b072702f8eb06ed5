"""Taxi rides and fares in the Flink training data model, delivered like a real feed.

A ride is a START (``isStart`` true, ``eventTime`` = pickup time), an END
(``eventTime`` = drop-off time) and a fare (``startTime`` = pickup time). The
simulation keeps a fleet: a taxi takes a ride only when its last ride is over,
each taxi has one driver, and each driver has their own tipping clientele, so
the hourly top tipper is a real answer rather than noise.

What the taxi pipelines must cope with is here on purpose:

* out of order: each event is delivered after a random delay of up to
  ``max_delay_s`` (default 60 s) and the feed is ordered by delivery, so an END
  (or a fare) can come before its START, but never by more than the bound:
  every event's time is >= (latest event time delivered before it) - max_delay;
* most rides start and end inside New York City (lon -74.05..-73.7, lat
  40.5..41.0) and some do not (Newark, Long Island, a GPS reading of 0,0);
* some rides last more than two hours; some last under a minute (so their END
  can be delivered before their START); some rides' END never arrives.

Start times follow the arrival phases (:mod:`generators.phases`), one ride per
arrival. Two forms: Flink-model records (times as ISO-8601 strings) for the
taxi pipelines, and envelope-shaped raw events (``RideStarted``, ``RideEnded``,
``FarePaid``, keyed by ``rideId``, sequenced per ride in delivery order) for the
publish pipeline. Same seed, same feed, in both forms.
"""

from __future__ import annotations

import heapq
import math
import random
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from sourcebeam.generators import phases as phases_mod
from sourcebeam.generators.jsonl import LineWriter, event_id_from_bits, iso_clock, record_encoder
from sourcebeam.generators.jsonl import demo_registry

# The Flink training data model's field names, in its order.
TAXI_RIDE_FIELDS = ('rideId', 'isStart', 'eventTime', 'startLon', 'startLat', 'endLon',
                    'endLat', 'passengerCnt', 'taxiId', 'driverId')
TAXI_FARE_FIELDS = ('rideId', 'taxiId', 'driverId', 'startTime', 'paymentType', 'tip',
                    'tolls', 'totalFare')

NYC_LON = (-74.05, -73.7)
NYC_LAT = (40.5, 41.0)

TAXI_RATE = 5.0               # rides per second by default: ~430,000 a day, like NYC
DEFAULT_MAX_DELAY_S = 60.0
FIRST_RIDE_ID = 2026000001
FIRST_TAXI_ID = 2026000000
FIRST_DRIVER_ID = 2026500000

# (lon, lat, spread in degrees, weight): where rides start.
HOTSPOTS = (
    (-73.985, 40.755, 0.015, 0.45),  # Midtown
    (-74.005, 40.715, 0.012, 0.15),  # Lower Manhattan
    (-73.960, 40.780, 0.015, 0.12),  # Upper East / West Side
    (-73.950, 40.690, 0.025, 0.10),  # Brooklyn
    (-73.880, 40.750, 0.030, 0.08),  # Queens
    (-73.785, 40.645, 0.010, 0.05),  # JFK
    (-73.873, 40.774, 0.006, 0.05),  # LaGuardia
)
# Places outside the bounds where some rides start or end.
OUTSIDE = ((-74.175, 40.690), (-73.500, 40.800), (0.0, 0.0), (-74.250, 40.900))


def _flink_encoder(event_type: str, time_field: str) -> Callable[[Dict], str]:
  fields = [(f.name, 'string' if f.name == time_field else f.type)
            for f in demo_registry().current[event_type].fields]
  return record_encoder(fields)


class TaxiEvent(NamedTuple):
  delivered: int           # when the feed delivered it, epoch millis
  event_type: str          # RideStarted, RideEnded or FarePaid
  event_time: int          # eventTime of rides, startTime of fares, epoch millis
  record: Dict[str, object]  # Flink-model fields, times as epoch millis
  event_id: str
  follows_from: Optional[str]


def in_nyc(lon: float, lat: float) -> bool:
  return NYC_LON[0] <= lon <= NYC_LON[1] and NYC_LAT[0] <= lat <= NYC_LAT[1]


def _clamp(x: float, lo: float, hi: float) -> float:
  return lo if x < lo else hi if x > hi else x


def taxi_feed(n_rides: int,
              seed: int = 1,
              phases: Optional[Sequence[phases_mod.Phase]] = None,
              start: Union[int, str, None] = None,
              max_delay_s: float = DEFAULT_MAX_DELAY_S,
              long_ride_share: float = 0.015,
              lost_end_share: float = 0.01,
              outside_share: float = 0.03,
              short_ride_share: float = 0.02) -> Iterator[TaxiEvent]:
  """Every event of up to n_rides rides, in delivery order."""
  ph = phases_mod.resolve(n_rides, phases, default_rate=TAXI_RATE)
  rng = random.Random(seed)
  rand, bits, gauss = rng.random, rng.getrandbits, rng.gauss
  max_delay_ms = int(max_delay_s * 1000)
  hot_cum, acc = [], 0.0
  for h in HOTSPOTS:
    acc += h[3]
    hot_cum.append(acc)
  hot_cum[-1] = 1.0

  free: List[Tuple[int, int]] = []  # (free from, taxi index): taxis between rides
  tip_rate: List[float] = []         # per driver: the share of the fare they get as tip
  pending: List[Tuple] = []          # (delivered, counter, TaxiEvent) not yet delivered
  counter = 0

  def place() -> Tuple[float, float]:
    x = rand()
    for h, c in zip(HOTSPOTS, hot_cum):
      if x <= c:
        return (_clamp(round(gauss(h[0], h[2]), 6), NYC_LON[0], NYC_LON[1]),
                _clamp(round(gauss(h[1], h[2]), 6), NYC_LAT[0], NYC_LAT[1]))
    return HOTSPOTS[0][0], HOTSPOTS[0][1]

  def deliver(ev_type: str, t: int, rec: Dict, eid: str, ff: Optional[str]) -> None:
    nonlocal counter
    d = t + int(rand() * (max_delay_ms + 1))
    counter += 1
    heapq.heappush(pending, (d, counter, TaxiEvent(d, ev_type, t, rec, eid, ff)))

  for k, t in enumerate(phases_mod.arrival_times(ph, start, limit=n_rides)):
    while pending and pending[0][0] < t:
      yield heapq.heappop(pending)[2]

    if free and free[0][0] <= t:
      taxi = heapq.heappop(free)[1]
    else:
      taxi = len(tip_rate)
      # a few drivers whose passengers tip generously, most ordinary, some poorly
      x = rand()
      tier = 0.28 if x < 0.05 else 0.18 if x < 0.35 else 0.10
      tip_rate.append(tier * (0.8 + 0.4 * rand()))
    ride_id = FIRST_RIDE_ID + k
    taxi_id, driver_id = FIRST_TAXI_ID + taxi, FIRST_DRIVER_ID + taxi

    x = rand()
    if x < long_ride_share:
      minutes = 121 + rand() * 120
    elif x < long_ride_share + short_ride_share:  # a hop, or a meter started by mistake
      minutes = 0.1 + rand() * 1.4
    else:
      minutes = min(90.0, max(2.0, math.exp(gauss(2.45, 0.6))))  # median ~12 min
    end_t = t + int(minutes * 60_000)
    heapq.heappush(free, (end_t + int(rand() * 300_000), taxi))

    start_lon, start_lat = place()
    km = minutes * (0.25 + 0.3 * rand())
    x = rand()
    if x < outside_share:
      o = OUTSIDE[int(rand() * len(OUTSIDE))]
      if x < outside_share / 2:
        end_lon, end_lat = o
      else:
        start_lon, start_lat = o
        end_lon, end_lat = place()
    else:
      bearing = rand() * 2 * math.pi
      end_lon = _clamp(round(start_lon + km / 84.0 * math.cos(bearing), 6), *NYC_LON)
      end_lat = _clamp(round(start_lat + km / 111.0 * math.sin(bearing), 6), *NYC_LAT)
    x = rand()
    passengers = 1 if x < 0.7 else 2 if x < 0.85 else 3 + int(rand() * 4)

    start_id, end_id, fare_id = (event_id_from_bits(bits(128)) for _ in range(3))
    ride = {'rideId': ride_id, 'isStart': True, 'eventTime': t, 'startLon': start_lon,
            'startLat': start_lat, 'endLon': end_lon, 'endLat': end_lat,
            'passengerCnt': passengers, 'taxiId': taxi_id, 'driverId': driver_id}
    deliver('RideStarted', t, ride, start_id, None)
    if rand() >= lost_end_share:
      end = dict(ride, isStart=False, eventTime=end_t)
      deliver('RideEnded', end_t, end, end_id, start_id)

    card = rand() < 0.68
    base = round(3.0 + 1.75 * km + 0.35 * minutes, 2)
    tolls = 6.94 if rand() < 0.08 else 0.0
    tip = round(base * tip_rate[taxi] * (0.6 + 0.8 * rand()), 2) if card else 0.0
    fare = {'rideId': ride_id, 'taxiId': taxi_id, 'driverId': driver_id, 'startTime': t,
            'paymentType': 'CARD' if card else 'CASH', 'tip': tip, 'tolls': tolls,
            'totalFare': round(base + tolls + tip, 2)}
    deliver('FarePaid', t, fare, fare_id, start_id)

  while pending:
    yield heapq.heappop(pending)[2]


def flink_record(ev: TaxiEvent, iso: Callable[[int], str]) -> Dict[str, object]:
  """The record as the taxi pipelines read it: times as ISO-8601 UTC strings."""
  rec = dict(ev.record)
  if ev.event_type == 'FarePaid':
    rec['startTime'] = iso(rec['startTime'])
  else:
    rec['eventTime'] = iso(rec['eventTime'])
  return rec


def taxi_rides_and_fares(n_rides: int, seed: int = 1, **kwargs) -> Iterator[Tuple[str, Dict]]:
  """('ride' | 'fare', Flink-model record with ISO-8601 times) in delivery order."""
  iso = iso_clock()
  for ev in taxi_feed(n_rides, seed, **kwargs):
    yield ('fare' if ev.event_type == 'FarePaid' else 'ride'), flink_record(ev, iso)


def envelopes(feed: Iterator[TaxiEvent]) -> Iterator[Tuple[TaxiEvent, Dict]]:
  """Each feed event with its raw envelope: keyed by rideId, sequenced per ride as delivered."""
  iso = iso_clock()
  versions = {t: demo_registry().current[t].version for t in ('RideStarted', 'RideEnded', 'FarePaid')}
  seq: Dict[int, int] = {}
  for ev in feed:
    ride_id = ev.record['rideId']
    s = seq.get(ride_id, 0) + 1
    if s == 3:  # a ride has at most three events: forget it
      del seq[ride_id]
    else:
      seq[ride_id] = s
    if ev.event_type == 'FarePaid':
      origin = 'payment-terminal' if ev.record['paymentType'] == 'CARD' else 'taxi-meter/cash'
    else:
      origin = 'taxi-meter'
    yield ev, {'event_id': ev.event_id, 'event_type': ev.event_type,
               'schema_version': versions[ev.event_type], 'partition_key': str(ride_id),
               'sequence': s, 'event_time': iso(ev.event_time), 'origin': origin,
               'follows_from': ev.follows_from, 'data': ev.record}


def taxi_envelopes(n_rides: int, seed: int = 1, **kwargs) -> Iterator[Dict]:
  """Raw RideStarted / RideEnded / FarePaid envelopes in delivery order."""
  for _, env in envelopes(taxi_feed(n_rides, seed, **kwargs)):
    yield env


def write_rides_and_fares(n_rides: int, rides_path: str, fares_path: str, seed: int = 1,
                          **kwargs) -> Tuple[int, int]:
  """Write the Flink-model rides and fares files; returns (ride lines, fare lines)."""
  with LineWriter(rides_path) as rides, LineWriter(fares_path) as fares:
    for ev, line in flink_lines(taxi_feed(n_rides, seed, **kwargs)):
      (fares if ev.event_type == 'FarePaid' else rides).write(line)
  return rides.count, fares.count


def flink_lines(feed: Iterable[TaxiEvent]) -> Iterator[Tuple[TaxiEvent, bytes]]:
  """Each event with its Flink-model JSON line (times as ISO-8601 strings)."""
  iso = iso_clock()
  ride_enc = _flink_encoder('RideStarted', 'eventTime')
  fare_enc = _flink_encoder('FarePaid', 'startTime')
  for ev in feed:
    enc = fare_enc if ev.event_type == 'FarePaid' else ride_enc
    yield ev, enc(flink_record(ev, iso)).encode()
