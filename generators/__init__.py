"""Deterministic generators of raw retail and taxi events, for demos, tests and benchmarks.

Same seed, same bytes. The command line is ``run.py generate`` (:mod:`generators.cli`);
the same generators are plain Python iterators for tests and benchmarks:

* :mod:`generators.retail`: ``retail_events(n, seed=1, phases=None, start=None)`` yields
  Hello, Retail! envelopes (dicts exactly as written, event_time as ISO-8601 'Z');
  ``timed_retail_events`` yields ``(event_time_millis, envelope)``.
* :mod:`generators.taxi`: ``taxi_rides_and_fares(n_rides, seed=1, ...)`` yields
  ``('ride' | 'fare', Flink-model record)`` in delivery order (out of order within
  ``max_delay_s``); ``write_rides_and_fares(n, rides_path, fares_path, ...)``;
  ``taxi_envelopes(n_rides, ...)`` yields RideStarted / RideEnded / FarePaid envelopes;
  ``taxi_feed`` yields the underlying ``TaxiEvent`` tuples.
* :mod:`generators.riders`: ``rider_events(n_trips, seed=1, ...)`` yields RideRequested,
  RiderPickedUp, RiderDroppedOff and TaxiLocationReported envelopes in event-time order.
* :mod:`generators.phases`: arrival shapes (``parse_phases(spec)``, ``constant``, ``ramp``,
  ``pause``, ``day_phases(n)`` for a sample day); pass them as ``phases=``.
* :mod:`generators.faults`: ``inject(timed_lines, Faults(duplicates, out_of_order_s,
  malformed), seed)`` turns a clean stream into a tech-debt one.
* :mod:`generators.jsonl`: ``write_jsonl(events_or_lines, path)``, ``encode_line``,
  ``read_jsonl``.

For example, a sample day of retail events::

    from sourcebeam.generators import phases, retail
    from sourcebeam.generators.jsonl import write_jsonl
    write_jsonl(retail.retail_events(n, seed=1, phases=phases.day_phases(n)), 'day.jsonl')
"""
