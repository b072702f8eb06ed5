"""Every consumer of the published stream, applied the same way to a replay and a live stream.

:func:`apply_consumers` is the one function both ``run.py replay`` (bounded,
from the archive) and the live pipeline (unbounded, from Kafka) call, so the
business code is the same object in both modes; a transform picks a faster
expansion for bounded input where it has one.

Consumers and their outputs under DIR:

* ``retail/``: the retail projections (cart, catalog, recently and frequently
  viewed) as JSON lines and Parquet, and ``unprocessed.jsonl``: events the
  per-key ordering could not apply (duplicates, gaps), each with a reason;
* ``taxi/``: rides joined with fares (``joined.jsonl`` / ``unmatched.jsonl``),
  long-ride ``alerts.jsonl``, ``hourly_tips.jsonl`` and the rides inside New
  York City (``rides_in_nyc.jsonl``), fed by the RideStarted / RideEnded / FarePaid
  events of the stream;
* ``riders/``: the canonical joined stream ``rider_located.jsonl`` (riders
  joined with their taxi's positions across partition keys), ``unmatched.jsonl``,
  and CRDT aggregates merged across partitions: ``occupancy.jsonl`` (an ORSet of
  riders per taxi) and ``zone_waiting.jsonl`` (a PNCounter of riders waiting per zone).
"""

from __future__ import annotations

import json
from typing import Dict, Tuple

import apache_beam as beam
from apache_beam.transforms import window

from sourcebeam.pipelines import outputs
from sourcebeam.schemas.envelope import to_json
from sourcebeam.transforms import taxi_logic
from sourcebeam.transforms.projections import RetailProjections, WriteProjections
from sourcebeam.transforms.riders import LocateRiders, TaxiOccupancy, ZoneRiderCounts
from sourcebeam.transforms.taxi import CleanseRides, HourlyTips, JoinRidesAndFares, LongRideAlerts

RIDE_EVENTS = ('RideStarted', 'RideEnded')


def _json(record) -> str:
  return json.dumps(record, sort_keys=True, separators=(',', ':'), ensure_ascii=False)


def write_jsonl(pcoll: beam.PCollection, out: str, name: str, fmt=_json) -> None:
  label = name.replace('/', ' ')
  pcoll | f'Format {label}' >> beam.Map(fmt) | f'Write {label}' >> outputs.write_lines(out, name)


def at_event_time(env):
  return window.TimestampedValue(env, env['event_time'] / 1000.0)


def retail_consumers(events: beam.PCollection, out: str) -> Dict[str, beam.PCollection]:
  views = events | 'RetailProjections' >> RetailProjections()
  views | 'WriteProjections' >> WriteProjections(outputs.join(out, 'retail'))
  write_jsonl(views.unprocessed, out, 'retail/unprocessed.jsonl')
  counts = {f'retail/{name}': pc for name, pc in views.views().items()}
  counts['retail/unprocessed'] = views.unprocessed
  return counts


def _rides_and_fares(events: beam.PCollection) -> Tuple[beam.PCollection, beam.PCollection]:
  rides = (events
           | 'Rides' >> beam.Filter(lambda e: e['event_type'] in RIDE_EVENTS)
           | 'RideRecords' >> beam.Map(lambda e: e['data']))
  fares = (events
           | 'Fares' >> beam.Filter(lambda e: e['event_type'] == 'FarePaid')
           | 'FareRecords' >> beam.Map(lambda e: e['data']))
  return rides, fares


def taxi_consumers(events: beam.PCollection, out: str) -> Dict[str, beam.PCollection]:
  """The Flink training exercises, fed by the published stream's ride and fare events."""
  rides, fares = _rides_and_fares(events)
  joined = (rides, fares) | 'JoinRidesAndFares' >> JoinRidesAndFares()
  alerts = rides | 'LongRides' >> LongRideAlerts()
  tips = fares | 'HourlyTips' >> HourlyTips()
  cleansed = rides | 'Cleanse' >> CleanseRides()
  write_jsonl(joined.joined, out, 'taxi/joined.jsonl', lambda j: _json(taxi_logic.joined_to_json_dict(j)))
  write_jsonl(joined.unmatched, out, 'taxi/unmatched.jsonl')
  write_jsonl(alerts.alerts, out, 'taxi/alerts.jsonl')
  write_jsonl(tips, out, 'taxi/hourly_tips.jsonl')
  write_jsonl(cleansed, out, 'taxi/rides_in_nyc.jsonl', lambda r: _json(taxi_logic.to_output('ride', r)))
  return {'taxi/joined': joined.joined, 'taxi/unmatched': joined.unmatched,
          'taxi/alerts': alerts.alerts, 'taxi/hourly_tips': tips, 'taxi/rides_in_nyc': cleansed}


def rider_consumers(events: beam.PCollection, out: str) -> Dict[str, beam.PCollection]:
  located = events | 'LocateRiders' >> LocateRiders()
  occupancy = events | 'TaxiOccupancy' >> TaxiOccupancy()
  waiting = events | 'ZoneRiderCounts' >> ZoneRiderCounts()
  write_jsonl(located.located, out, 'riders/rider_located.jsonl', to_json)
  write_jsonl(located.unmatched, out, 'riders/unmatched.jsonl')
  write_jsonl(occupancy, out, 'riders/occupancy.jsonl',
         lambda kv: _json({'taxi_id': kv[0], 'riders': sorted(kv[1].value())}))
  write_jsonl(waiting, out, 'riders/zone_waiting.jsonl',
         lambda kv: _json({'zone': kv[0], 'waiting': kv[1].value()}))
  return {'riders/rider_located': located.located, 'riders/unmatched': located.unmatched,
          'riders/occupancy': occupancy, 'riders/zone_waiting': waiting}


def joined_streams(timed: beam.PCollection) -> Dict[str, beam.PCollection]:
  """Only the two joins, for a live run that sends them to Kafka without writing files:
  the same transforms under the same labels as in :func:`apply_consumers`."""
  rides, fares = _rides_and_fares(timed)
  return {'taxi/joined': ((rides, fares) | 'JoinRidesAndFares' >> JoinRidesAndFares()).joined,
          'riders/rider_located': (timed | 'LocateRiders' >> LocateRiders()).located}


# Joined streams as Kafka messages: (key, value) bytes, keyed by what each join joined on.
JOINED_MESSAGES = {
    'taxi/joined': lambda j: (str(j['ride']['rideId']).encode(),
                              _json(taxi_logic.joined_to_json_dict(j)).encode()),
    'riders/rider_located': lambda e: (e['partition_key'].encode(), to_json(e).encode()),
}
JOINED_TOPIC_SUFFIX = {'taxi/joined': 'taxi-joined', 'riders/rider_located': 'rider-located'}


def apply_consumers(events: beam.PCollection, out: str) -> Dict[str, beam.PCollection]:
  """Feed published envelopes to every consumer; returns ``{output: PCollection}`` to count."""
  timed = events | 'AtEventTime' >> beam.Map(at_event_time)
  counts: Dict[str, beam.PCollection] = {'events': timed}
  counts.update(retail_consumers(timed, out))
  counts.update(taxi_consumers(timed, out))
  counts.update(rider_consumers(timed, out))
  return counts
