"""The generators: deterministic, clean through the publishing boundary, realistic, fast to run.

Every check here reads what the generators really write (files, JSON lines)
and runs it through the real ``schemas.validation.publish_raw``.
"""

import collections
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.demo import DEMO_SCHEMAS, REG  # noqa: F401
from sourcebeam.generators import faults, phases, retail, riders, taxi
from sourcebeam.generators.jsonl import _encode, encode_json, encode_line, iso_clock, read_jsonl, write_jsonl
from sourcebeam.schemas.envelope import iso_to_millis
from sourcebeam.schemas.validation import publish_raw
from tests.cli import run_cli
START = iso_to_millis(phases.DEFAULT_START)
UUID4 = re.compile(r'^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$')


@pytest.fixture(scope='module')
def retail_20k():
  return list(retail.retail_events(20_000, seed=11))


@pytest.fixture(scope='module')
def taxi_feed_3k():
  return list(taxi.taxi_feed(3_000, seed=5))


@pytest.fixture(scope='module')
def rider_stream():
  return list(riders.timed_rider_events(60, seed=4, report_interval_s=5, broken_gps_share=0.1))


def publish_all(events):
  """Each event as its JSON line through publish_raw: (published, dead letters, repaired)."""
  published, dead, repaired = [], [], []
  for e in events:
    env, dl, repairs = publish_raw(encode_line(e) if isinstance(e, dict) else e, REG)
    if dl is not None:
      dead.append(dl)
    else:
      published.append(env)
      if repairs:
        repaired.append((env, repairs))
  return published, dead, repaired


def assert_sequences_follow_event_time(events):
  by_key = collections.defaultdict(list)
  for e in events:
    by_key[e['partition_key']].append((iso_to_millis(e['event_time']), e['sequence']))
  for key, items in by_key.items():
    assert [s for _, s in items] == list(range(1, len(items) + 1)), key
    times = [t for t, _ in items]
    assert times == sorted(times), key


# --- retail -----------------------------------------------------------------


def test_retail_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
  a, b, c = (str(tmp_path / n) for n in ('a.jsonl', 'b.jsonl', 'c.jsonl'))
  assert write_jsonl(retail.retail_events(3000, seed=7), a) == 3000
  write_jsonl(retail.retail_events(3000, seed=7), b)
  write_jsonl(retail.retail_events(3000, seed=8), c)
  assert open(a, 'rb').read() == open(b, 'rb').read()
  assert open(a, 'rb').read() != open(c, 'rb').read()


def test_retail_events_publish_cleanly_without_repairs(retail_20k):
  published, dead, repaired = publish_all(retail_20k)
  assert dead == [] and repaired == []
  assert len(published) == len(retail_20k)
  for raw, env in zip(retail_20k[:500], published):
    assert env['event_time'] == iso_to_millis(raw['event_time'])
    # Validation alone leaves provenance empty: the resequencer fills raw_sequence.
    assert env['raw_sequence'] is None
    assert {k: v for k, v in env.items() if k not in ('event_time', 'raw_sequence')} == {
        k: v for k, v in raw.items() if k != 'event_time'}


def test_written_lines_are_what_json_writes(retail_20k, taxi_feed_3k, rider_stream):
  """The compiled envelope encoder writes exactly json.dumps's bytes."""
  taxi_envs = [env for _, env in taxi.envelopes(iter(taxi_feed_3k))]
  for e in retail_20k[:5000] + taxi_envs + [e for _, e in rider_stream[:3000]]:
    assert encode_json(e) == _encode(e)
    assert json.loads(encode_line(e)) == e
  # Values of the wrong type (as faults and tech-debt producers write them) too.
  iso = iso_clock()
  for ev, line in taxi.flink_lines(taxi_feed_3k[:1000]):
    assert line == _encode(taxi.flink_record(ev, iso)).encode()
  odd = dict(taxi_envs[0], follows_from=123, data=dict(taxi_envs[0]['data'], isStart='n/a',
                                                        passengerCnt='2', startLon=5))
  odd_retail = dict(retail_20k[0], sequence=True, data=dict(retail_20k[0]['data'], name=None))
  for e in (odd, odd_retail, {'a': float('nan'), 1: [2]}, dict(retail_20k[0], extra=1)):
    assert encode_json(e) == _encode(e)


def test_retail_envelope_fields(retail_20k):
  assert {e['event_type'] for e in retail_20k} == set(retail.RETAIL_TYPES)
  ids = [e['event_id'] for e in retail_20k]
  assert len(set(ids)) == len(ids)
  assert all(UUID4.match(i) for i in ids[:2000])
  reg = REG
  for e in retail_20k:
    et = reg.current[e['event_type']]
    assert e['partition_key'] == e['data'][et.partition_key]
    assert e['schema_version'] == et.version
    assert e['event_time'].endswith('Z')
    assert e['origin']
  origins = collections.Counter(e['origin'] for e in retail_20k)
  for origin in ('web/cart', 'mobile-app/product-page', 'merchant-portal', 'photographer-app'):
    assert origins[origin] > 0, origin


def test_retail_sequences_start_at_1_per_key_in_event_time_order(retail_20k):
  assert_sequences_follow_event_time(retail_20k)


def test_retail_mix_is_realistic(retail_20k):
  n = collections.Counter(e['event_type'] for e in retail_20k)
  assert n['ProductViewed'] > 5 * n['CartItemAdded']
  assert n['CartItemAdded'] > n['ProductPurchased'] > 0
  assert 0 < n['CartItemRemoved'] < n['CartItemAdded']
  assert min(n[t] for t in retail.RETAIL_TYPES) > 0
  users = {e['data']['user_id'] for e in retail_20k if 'user_id' in e['data']}
  assert len(users) > 400
  views = collections.Counter(e['data']['product_id'] for e in retail_20k
                              if e['event_type'] == 'ProductViewed')
  top = sum(c for _, c in views.most_common(max(1, len(views) // 100)))
  assert top > 0.1 * sum(views.values())  # top 1% of products: over 10% of views


def test_retail_story_is_consistent(retail_20k):
  """Products exist before they are seen; carts only lose what they hold; causes come first."""
  created, seen, carts = set(), {}, collections.defaultdict(collections.Counter)
  from_cart = purchases = adds_after_view = adds = 0
  for e in retail_20k:
    t, d, ff = e['event_type'], e['data'], e['follows_from']
    assert ff is None or ff in seen, 'follows_from must name an earlier event'
    cause = seen.get(ff)
    if t == 'ProductCreated':
      created.add(d['product_id'])
    elif t == 'ProductImageAdded':
      assert d['product_id'] in created and cause['event_type'] == 'ProductCreated'
    elif 'product_id' in d:
      assert d['product_id'] in created
    if t == 'CartItemAdded':
      adds += 1
      carts[d['user_id']][d['product_id']] += d['quantity']
      if cause is not None:
        assert cause['event_type'] == 'ProductViewed' and cause['data'] == {
            'user_id': d['user_id'], 'product_id': d['product_id']}
        adds_after_view += 1
    elif t == 'CartItemRemoved':
      assert carts[d['user_id']][d['product_id']] >= d['quantity'] > 0
      carts[d['user_id']][d['product_id']] -= d['quantity']
      assert cause['event_type'] == 'CartItemAdded'
    elif t == 'ProductPurchased':
      purchases += 1
      if cause['event_type'] == 'CartItemAdded':
        from_cart += 1
        assert carts[d['user_id']][d['product_id']] == d['quantity']
        carts[d['user_id']][d['product_id']] = 0
      assert cause['data']['product_id'] == d['product_id']
      assert d['price'] > 0
    seen[e['event_id']] = e
  assert from_cart > 0.8 * purchases
  assert adds_after_view > 0.8 * adds


def test_retail_event_times_follow_the_phases():
  ph = phases.parse_phases('rate=100,duration=30s;pause=1m;rate=10,duration=60s')
  events = list(retail.retail_events(10_000, seed=1, phases=ph, start='2026-01-01T00:00:00Z'))
  assert len(events) == 3600
  t = [iso_to_millis(e['event_time']) for e in events]
  t0 = iso_to_millis('2026-01-01T00:00:00Z')
  assert t0 <= t[0] < t0 + 10 and t[2999] < t0 + 30_000 <= t0 + 90_000 <= t[3000]
  assert t[-1] < t0 + 150_000


def test_retail_default_load_is_hello_retail():
  events = list(retail.retail_events(1160, seed=1))
  span_s = (iso_to_millis(events[-1]['event_time']) - iso_to_millis(events[0]['event_time'])) / 1000
  assert 9.9 < span_s < 10.1  # ~116 events/s: 10 million a day


# --- phases -----------------------------------------------------------------


def test_constant_phase_has_exact_rate():
  times = list(phases.arrival_times([phases.constant(200, 60)], START))
  assert len(times) == 12_000
  per_second = collections.Counter((t - START) // 1000 for t in times)
  assert set(per_second) == set(range(60)) and set(per_second.values()) == {200}


def test_ramp_and_pause():
  ph = phases.parse_phases('ramp=0..100,duration=100s;pause=5m;rate=1/s,duration=10s')
  times = list(phases.arrival_times(ph, START))
  assert len(times) == 5000 + 10
  assert sum(1 for t in times[:5000] if t < START + 50_000) == 1250  # the integral of the ramp
  assert times[4999] < START + 100_000 and times[5000] >= START + 400_000


def test_phases_spec_round_trip_and_units():
  spec = 'rate=50,duration=10m;ramp=50..400,duration=20m;pause=5m;rate=200,duration=30m'
  ph = phases.parse_phases(spec)
  assert ';'.join(str(p) for p in ph) == spec
  assert phases.total_events(ph) == 50 * 600 + 225 * 1200 + 200 * 1800
  assert phases.total_duration_s(ph) == 65 * 60
  assert phases.parse_duration('1h30m') == 5400 and phases.parse_duration('500ms') == 0.5
  assert phases.parse_rate('6000/m') == 100


@pytest.mark.parametrize('spec', [
    '', 'rate=50', 'rate=abc,duration=1m', 'ramp=5,duration=1m', 'rate=5,duration=10x',
    'pause=5m', 'rate=-1,duration=1m', 'rate=5,duration=1m,extra=1', 'rate=5;duration=1m',
    'rate=5,rate=6,duration=1m'])
def test_bad_phase_specs_are_refused(spec):
  with pytest.raises(phases.PhaseSpecError):
    phases.parse_phases(spec)


_rates = st.floats(min_value=0, max_value=40, allow_nan=False)
_phase = st.one_of(
    st.builds(phases.constant, _rates, st.floats(min_value=0.5, max_value=60)),
    st.builds(phases.ramp, _rates, _rates, st.floats(min_value=0.5, max_value=60)),
    st.builds(phases.pause, st.floats(min_value=0, max_value=60)))


@settings(max_examples=60, deadline=None)
@given(st.lists(_phase, min_size=1, max_size=5))
def test_arrivals_follow_any_phases(ph):
  """Every phase gets its share of arrivals (within rounding), inside its own time window."""
  times = list(phases.arrival_times(ph, START))
  assert len(times) == phases.total_events(ph)
  assert times == sorted(times)
  begin, expected = 0.0, 0.0
  for p in ph:
    expected += p.expected_events
    end = begin + p.duration_s
    got = sum(1 for t in times if t < START + end * 1000)
    assert abs(got - expected) <= 1.5, (p, got, expected)
    begin = end
  assert all(START <= t <= START + begin * 1000 for t in times)


def test_sample_day_is_quiet_at_night_and_peaks_in_the_evening():
  times = list(phases.arrival_times(phases.day_phases(48_000), START))
  assert len(times) == 48_000
  assert START <= times[0] and times[-1] < START + 86_400_000
  per_hour = collections.Counter((t - START) // 3_600_000 for t in times)
  mean = 48_000 / 24
  assert per_hour[3] < 0.25 * mean
  assert max(per_hour.values()) == max(per_hour[h] for h in range(18, 22))
  assert 1.4 * mean < max(per_hour.values()) < 2.0 * mean


# --- taxi -------------------------------------------------------------------


def test_taxi_files_have_the_flink_fields_and_are_deterministic(tmp_path):
  r1, f1, r2, f2 = (str(tmp_path / n) for n in ('r1', 'f1', 'r2', 'f2'))
  assert taxi.write_rides_and_fares(500, r1, f1, seed=3)[1] == 500
  taxi.write_rides_and_fares(500, r2, f2, seed=3)
  assert open(r1, 'rb').read() == open(r2, 'rb').read()
  assert open(f1, 'rb').read() == open(f2, 'rb').read()
  rides, fares = read_jsonl(r1), read_jsonl(f1)
  assert all(tuple(r) == taxi.TAXI_RIDE_FIELDS for r in rides)
  assert all(tuple(f) == taxi.TAXI_FARE_FIELDS for f in fares)
  assert all(r['eventTime'].endswith('Z') and iso_to_millis(r['eventTime']) for r in rides)
  assert all(f['paymentType'] in ('CASH', 'CARD') for f in fares)
  assert {f['rideId'] for f in fares} == {r['rideId'] for r in rides if r['isStart']}


def test_taxi_feed_is_out_of_order_within_the_bound(taxi_feed_3k):
  latest, ends_first, started = 0, 0, set()
  behind = []
  for ev in taxi_feed_3k:
    assert ev.event_time >= latest - 60_000
    behind.append(latest - ev.event_time)
    latest = max(latest, ev.event_time)
    if ev.event_type == 'RideStarted':
      started.add(ev.record['rideId'])
    elif ev.event_type == 'RideEnded' and ev.record['rideId'] not in started:
      ends_first += 1
  assert ends_first > 0
  assert sum(1 for b in behind if b > 0) > len(behind) // 4  # really out of order
  delivered = [ev.delivered for ev in taxi_feed_3k]
  assert delivered == sorted(delivered)


def test_taxi_feed_has_the_hard_cases(taxi_feed_3k):
  starts = {ev.record['rideId']: ev.record for ev in taxi_feed_3k if ev.event_type == 'RideStarted'}
  ends = {ev.record['rideId']: ev.record for ev in taxi_feed_3k if ev.event_type == 'RideEnded'}
  outside = [r for r in starts.values() if not (taxi.in_nyc(r['startLon'], r['startLat'])
                                                and taxi.in_nyc(r['endLon'], r['endLat']))]
  assert 0 < len(outside) < 0.1 * len(starts)
  long_rides = [i for i, e in ends.items() if e['eventTime'] - starts[i]['eventTime'] > 7_200_000]
  assert len(long_rides) > 0
  assert 0 < len(starts) - len(ends) < 0.05 * len(starts)  # some ENDs never arrive
  # a taxi never carries two rides at once
  by_taxi = collections.defaultdict(list)
  for i, s in starts.items():
    by_taxi[s['taxiId']].append((s['eventTime'], ends[i]['eventTime'] if i in ends else None))
  for rides in by_taxi.values():
    rides.sort()
    for (_, end), (nxt, _) in zip(rides, rides[1:]):
      assert end is None or end <= nxt


def test_taxi_tips_vary_by_driver(taxi_feed_3k):
  rate = collections.defaultdict(list)
  for ev in taxi_feed_3k:
    f = ev.record
    if ev.event_type == 'FarePaid' and f['paymentType'] == 'CARD':
      rate[f['driverId']].append(f['tip'] / (f['totalFare'] - f['tip'] - f['tolls']))
    if ev.event_type == 'FarePaid' and f['paymentType'] == 'CASH':
      assert f['tip'] == 0
  means = sorted(sum(v) / len(v) for v in rate.values() if len(v) >= 2)
  assert means[-1] > 2 * means[len(means) // 2]


def test_taxi_envelopes_publish_cleanly_sequenced_per_ride(taxi_feed_3k):
  envs = [env for _, env in taxi.envelopes(iter(taxi_feed_3k))]
  published, dead, repaired = publish_all(envs)
  assert dead == [] and repaired == [] and len(published) == len(taxi_feed_3k)
  by_ride = collections.defaultdict(list)
  for e in envs:
    by_ride[e['partition_key']].append(e)
  for key, evs in by_ride.items():
    assert [e['sequence'] for e in evs] == list(range(1, len(evs) + 1))
    start = [e for e in evs if e['event_type'] == 'RideStarted'][0]
    assert all(e['follows_from'] == start['event_id'] for e in evs if e is not start)
  assert {e['event_type'] for e in envs} == {'RideStarted', 'RideEnded', 'FarePaid'}


# --- riders and taxis --------------------------------------------------------


def test_rider_events_publish_cleanly_in_event_time_order(rider_stream):
  events = [e for _, e in rider_stream]
  published, dead, repaired = publish_all(events)
  assert dead == [] and repaired == [] and len(published) == len(events)
  assert set(e['event_type'] for e in events) == set(riders.RIDER_TYPES)
  assert_sequences_follow_event_time(events)
  times = [t for t, _ in rider_stream]
  assert times == sorted(times)


def test_riders_and_taxis_tell_one_story(rider_stream):
  events = [e for _, e in rider_stream]
  by_id = {e['event_id']: e for e in events}
  positions = collections.defaultdict(list)
  for t, e in rider_stream:
    if e['event_type'] == 'TaxiLocationReported':
      positions[e['data']['taxi_id']].append(t)
  trips = [(by_id[e['follows_from']], e) for e in events if e['event_type'] == 'RiderDroppedOff']
  assert len(trips) > 40
  with_positions = 0
  for pickup, drop in trips:
    request = by_id[pickup['follows_from']]
    assert pickup['event_type'] == 'RiderPickedUp' and request['event_type'] == 'RideRequested'
    assert request['data']['rider_id'] == pickup['data']['rider_id'] == drop['data']['rider_id']
    assert pickup['data']['taxi_id'] == drop['data']['taxi_id']
    t0, t1 = iso_to_millis(pickup['event_time']), iso_to_millis(drop['event_time'])
    assert t0 < t1
    during = [t for t in positions[pickup['data']['taxi_id']] if t0 <= t <= t1]
    if during:
      with_positions += 1
      gaps = [b - a for a, b in zip([t0] + during, during)]
      assert max(gaps) <= 6_000 and during[-1] == t1  # every ~5 s, and at the drop-off
  assert len(trips) * 0.7 < with_positions < len(trips)  # a few broken GPS units


# --- faults -----------------------------------------------------------------


def test_malformed_lines_are_dead_letters_at_the_requested_rate():
  stats = collections.Counter()
  timed = ((t, encode_line(e)) for t, e in retail.timed_retail_events(6000, seed=2))
  lines = list(faults.inject(timed, faults.Faults(malformed=0.05), seed=2, stats=stats))
  again = ((t, encode_line(e)) for t, e in retail.timed_retail_events(6000, seed=2))
  assert list(faults.inject(again, faults.Faults(malformed=0.05), seed=2)) == lines
  published, dead, _ = publish_all(lines)
  assert len(lines) == 6000 and len(published) + len(dead) == 6000
  assert len(dead) == stats['malformed']
  assert 0.035 * 6000 < len(dead) < 0.065 * 6000
  assert {k.split(':')[1] for k in stats if ':' in k} == set(faults.ENVELOPE_MALFORMATIONS)


@pytest.mark.parametrize('kind', faults.ENVELOPE_MALFORMATIONS)
def test_every_malformation_is_refused_for_every_domain(kind, taxi_feed_3k, rider_stream):
  import random
  rng = random.Random(kind)
  samples = (list(retail.retail_events(300, seed=9))
             + [env for _, env in taxi.envelopes(iter(taxi_feed_3k[:100]))]
             + [e for _, e in rider_stream[:100]])
  for e in samples:
    bad, k = faults.corrupt(encode_line(e), rng, kind)
    assert k == kind
    assert publish_raw(bad, REG)[1] is not None, bad


@pytest.mark.parametrize('kind', faults.RECORD_MALFORMATIONS)
def test_flink_records_are_corrupted_too(kind, tmp_path):
  import random
  rng = random.Random(kind)
  rides = str(tmp_path / 'rides.jsonl')
  taxi.write_rides_and_fares(50, rides, str(tmp_path / 'fares.jsonl'), seed=1)
  for line in open(rides, 'rb').read().splitlines():
    bad, k = faults.corrupt(line, rng, kind)
    assert k == kind and bad != line
    try:
      rec = json.loads(bad.decode('utf-8'))
    except ValueError:  # UnicodeDecodeError is a ValueError too
      assert kind in ('truncated', 'not-utf8')
      continue
    good = json.loads(line)
    if kind == 'missing-field':
      assert set(rec) < set(good)
    elif kind == 'wrong-type':
      assert [type(rec[f]) for f in good] != [type(good[f]) for f in good]
    else:
      assert kind == 'absurd-time' and rec['eventTime'] in faults.ABSURD_TIMES


def test_duplicates_are_redelivered_later_and_still_publish():
  stats = collections.Counter()
  timed = [(t, encode_line(e)) for t, e in retail.timed_retail_events(4000, seed=3)]
  lines = list(faults.inject(iter(timed), faults.Faults(duplicates=0.05), seed=3, stats=stats))
  assert len(lines) == 4000 + stats['duplicates'] and 120 < stats['duplicates'] < 280
  published, dead, _ = publish_all(lines)
  assert dead == []
  counts = collections.Counter(e['event_id'] for e in published)
  assert sum(c - 1 for c in counts.values()) == stats['duplicates']
  assert sorted(set(lines)) == sorted(line for _, line in timed)


def test_out_of_order_delivery_stays_within_the_bound_and_is_deterministic():
  def run():
    timed = ((t, encode_line(e)) for t, e in retail.timed_retail_events(4000, seed=4))
    return list(faults.inject(timed, faults.Faults(out_of_order_s=30), seed=4))
  lines = run()
  assert lines == run()
  times = [iso_to_millis(json.loads(line)['event_time']) for line in lines]
  latest, late = 0, 0
  for t in times:
    assert t >= latest - 30_000
    late += t < latest
    latest = max(latest, t)
  assert late > 1000
  assert sorted(times) == sorted(t for t, _ in retail.timed_retail_events(4000, seed=4))


# --- the command line ---------------------------------------------------------


def run_generate(*args, cwd):
  return run_cli('generate', *args, cwd=cwd)


@pytest.mark.cli
def test_cli_generates_the_same_bytes_and_says_what_it_did(tmp_path):
  p = run_generate('--events', '2000', '--seed', '5', '--out', 'a.jsonl', cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  # the same bytes as the (deterministic) Python API writes
  assert (tmp_path / 'a.jsonl').read_bytes() == b''.join(
      encode_line(e) + b'\n' for e in retail.retail_events(2000, seed=5))
  summary = p.stderr.strip().splitlines()
  assert len(summary) == 1 and '2,000 events' in summary[0] and 'ProductViewed' in summary[0]
  assert '2026-11-26T00:00:' in summary[0]


@pytest.mark.cli
def test_cli_phases_faults_and_bad_spec(tmp_path):
  p = run_generate('--phases', 'rate=20,duration=30s;pause=1m;ramp=20..40,duration=30s',
                   '--malformed', '2%', '--duplicates', '0.01', '--out', 'raw.jsonl', cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  lines = (tmp_path / 'raw.jsonl').read_bytes().splitlines()
  published, dead, _ = publish_all(lines)
  assert len(published) + len(dead) == len(lines) >= 1500
  assert f'{len(dead):,} malformed' in p.stderr
  p = run_generate('--phases', 'rate=50,duraton=10m', '--out', 'x.jsonl', cwd=tmp_path)
  assert p.returncode == 2
  assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith('error:')
  assert 'Traceback' not in p.stderr and not (tmp_path / 'x.jsonl').exists()


def in_process(*argv):
  """generate's own parser and main, without a subprocess (what run.py does after dispatch)."""
  import argparse
  from sourcebeam.generators import cli
  parser = argparse.ArgumentParser(prog='run.py generate')
  cli.add_arguments(parser)
  args, beam_args = parser.parse_known_args(list(argv))
  return parser, cli.main(args, beam_args)


@pytest.mark.cli
def test_cli_taxi(tmp_path):
  p = run_generate('--domain', 'taxi', '--events', '300', '--rides', 'rides.jsonl',
                   '--fares', 'fares.jsonl', '--out', 'taxi.jsonl', cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  rides = read_jsonl(str(tmp_path / 'rides.jsonl'))
  assert tuple(rides[0]) == taxi.TAXI_RIDE_FIELDS and len(read_jsonl(str(tmp_path / 'fares.jsonl'))) == 300
  envs = (tmp_path / 'taxi.jsonl').read_bytes().splitlines()
  assert len(envs) == len(rides) + 300 and publish_all(envs)[1] == []


def test_generate_riders(tmp_path):
  out = str(tmp_path / 'riders.jsonl')
  _, rc = in_process('--domain', 'riders', '--events', '20', '--report-interval', '30s',
                     '--out', out, '--quiet')
  assert rc == 0
  events = read_jsonl(out)
  assert publish_all(events)[1] == [] and sum(e['event_type'] == 'RideRequested' for e in events) == 20


def test_generate_help_explains_every_option():
  import argparse
  from sourcebeam.generators import cli
  parser = argparse.ArgumentParser(prog='run.py generate')
  cli.add_arguments(parser)
  text = parser.format_help()
  for option in ('--events', '--seed', '--out', '--domain', '--rides', '--fares', '--start',
                 '--rate', '--duration', '--phases', '--day', '--duplicates', '--out-of-order',
                 '--malformed', '--report-interval', 'ramp=A..B', 's3://'):
    assert option in text, option
  for action in parser._actions:
    assert action.help, action.dest


def test_generate_to_s3_through_beams_filesystems(s3_service):
  """`--out s3://...` writes through Beam's FileSystems to a real S3 endpoint (moto)."""
  from apache_beam.io.filesystems import FileSystems
  from sourcebeam.generators import cli
  path = s3_service.url('generated', 'retail.jsonl')
  _, rc = in_process('--events', '700', '--seed', '3', '--out', path, '--quiet',
                     *s3_service.beam_args)
  assert rc == 0
  with FileSystems.open(path) as f:
    assert f.read() == b''.join(encode_line(e) + b'\n' for e in retail.retail_events(700, seed=3))
  bad = s3_service.url('generated', 'x.jsonl').replace(s3_service.bucket, 'no-such-bucket', 1)
  with pytest.raises(cli.UsageError, match='cannot write s3://no-such-bucket/'):
    in_process('--events', '5', '--out', bad)
