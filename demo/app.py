"""The demo application: Hello, Retail!'s retail views, the Flink training's taxi exercises,
and riders located by their taxi across partition keys.

What ``run.py`` runs without ``--app`` (and with ``--app sourcebeam.demo:app``),
written only with Sourcebeam's public API, like any team's application:

* ``retail/cart``, ``retail/catalog``, ``retail/recently_viewed``,
  ``retail/frequently_viewed``: per-key views (:mod:`retail`), with their own
  record shape and Parquet schema, and the view API's routes ``/carts/{key}``,
  ``/products?category=``, ``/users/{key}/recently-viewed``,
  ``/users/{key}/frequently-viewed``;
* ``taxi``: a consumer (a composite transform) of rides and fares: the
  enrichment join, long-ride alerts, hourly tips, rides inside NYC
  (:mod:`taxi`); its joined stream goes to Kafka in a live run;
* ``riders``: a consumer of rider and taxi events: the join across partition
  keys into ``RiderLocated`` events, and CRDT aggregates merged across
  partitions (:mod:`riders`); its located stream goes to Kafka in a live run.
"""

from __future__ import annotations

import json

import apache_beam as beam

from sourcebeam import App, to_json

from . import retail, riders, taxi, taxi_logic

ROUTES = {'cart': '/carts/{key}', 'recently_viewed': '/users/{key}/recently-viewed',
          'frequently_viewed': '/users/{key}/frequently-viewed', 'catalog': '/products'}


def add_retail_views(app: App) -> None:
  """The four retail views (``retail/<view>``), with their record shape, Parquet schema and
  the view API's routes."""
  for handler in (retail.CartHandler(), retail.RecentlyViewedHandler(),
                  retail.FrequentlyViewedHandler(), retail.CatalogHandler()):
    app.view(f'retail/{handler.view}', handler=handler, event_types=handler.event_types,
             record=retail.ViewRecord(handler), parquet_schema=retail.PARQUET_SCHEMAS[handler.view],
             index='category' if handler.view == 'catalog' else None, route=ROUTES[handler.view])


def _json(record) -> str:
  return json.dumps(record, sort_keys=True, separators=(',', ':'), ensure_ascii=False)


RIDE_EVENTS = ('RideStarted', 'RideEnded')
RIDER_AGGREGATE_EVENTS = ('RideRequested',) + riders.RIDER_EVENTS


class TaxiConsumers(beam.PTransform):
  """The Flink training exercises, fed by the published stream's ride and fare events."""

  def expand(self, events):
    rides = (events
             | 'Rides' >> beam.Filter(lambda e: e['event_type'] in RIDE_EVENTS)
             | 'RideRecords' >> beam.Map(lambda e: e['data']))
    fares = (events
             | 'Fares' >> beam.Filter(lambda e: e['event_type'] == 'FarePaid')
             | 'FareRecords' >> beam.Map(lambda e: e['data']))
    joined = (rides, fares) | 'JoinRidesAndFares' >> taxi.JoinRidesAndFares()
    alerts = rides | 'LongRides' >> taxi.LongRideAlerts()
    cleansed = rides | 'Cleanse' >> taxi.CleanseRides()
    return {
        'joined': joined.joined | 'JoinedJson' >> beam.Map(
            lambda j: _json(taxi_logic.joined_to_json_dict(j))),
        'unmatched': joined.unmatched,
        'alerts': alerts.alerts,
        'hourly_tips': fares | 'HourlyTips' >> taxi.HourlyTips(),
        'rides_in_nyc': cleansed | 'RideJson' >> beam.Map(
            lambda r: _json(taxi_logic.to_output('ride', r))),
    }


class RiderConsumers(beam.PTransform):
  """Riders located by their taxi's positions (a join across partition keys) and the CRDT
  aggregates: riders per taxi (an ORSet) and riders waiting per zone (a PNCounter)."""

  def __init__(self, registry):
    super().__init__()
    self.registry = registry  # RiderLocated is one of the app's event types

  def expand(self, events):
    located = events | 'LocateRiders' >> riders.LocateRiders(self.registry)
    joined = {'rider_located': located.located | 'LocatedJson' >> beam.Map(to_json),
              'unmatched': located.unmatched}
    if not events.is_bounded:
      # The aggregates are the state at the end of the input; a live stream has no end: it
      # sends the located riders only.
      return joined
    # Both aggregates read rider events only: filtered once, not once each from every position.
    rider_events = events | 'RiderEventsOnly' >> beam.Filter(
        lambda e: e['event_type'] in RIDER_AGGREGATE_EVENTS)
    occupancy = rider_events | 'TaxiOccupancy' >> riders.TaxiOccupancy()
    waiting = rider_events | 'ZoneRiderCounts' >> riders.ZoneRiderCounts()
    return {
        **joined,
        'occupancy': occupancy | 'OccupancyJson' >> beam.Map(
            lambda kv: _json({'taxi_id': kv[0], 'riders': sorted(kv[1].value())})),
        'zone_waiting': waiting | 'WaitingJson' >> beam.Map(
            lambda kv: _json({'zone': kv[0], 'waiting': kv[1].value()})),
    }


def _ride_key(line: str) -> str:
  return str(json.loads(line)['ride']['rideId'])


def _rider_key(line: str) -> str:
  return json.loads(line)['partition_key']


def add_taxi(app: App) -> None:
  app.consumer('taxi', TaxiConsumers(), event_types=['RideStarted', 'RideEnded', 'FarePaid'],
               live={'joined': _ride_key})


def add_riders(app: App) -> None:
  app.consumer('riders', RiderConsumers(app.registry),
               event_types=['RideRequested', 'RiderPickedUp', 'RiderDroppedOff',
                            'TaxiLocationReported'],
               live={'rider_located': _rider_key})


app = App('demo', schemas='schemas')
add_retail_views(app)
add_taxi(app)
add_riders(app)
