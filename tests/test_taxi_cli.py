"""End to end: `run.py taxi join|long-rides|hourly-tips|cleanse` (in process) on
generated rides and fares (plus bad lines), checked against answers computed
here in plain Python from the same files."""

import collections
import json

import pytest

from sourcebeam.generators.taxi import write_rides_and_fares
from sourcebeam.schemas.envelope import iso_to_millis
from tests.cli import run_cli

pytestmark = pytest.mark.cli
H = 3_600_000
BAD_RIDES = ['not json at all', '{"rideId": 5}', json.dumps({
    'rideId': 'x', 'isStart': True, 'eventTime': '2026-11-26T00:00:00Z', 'startLon': 1.0,
    'startLat': 1.0, 'endLon': 1.0, 'endLat': 1.0, 'passengerCnt': 1, 'taxiId': 1,
    'driverId': 1})]
BAD_FARES = ['[]', '{"rideId": 1, "taxiId": 1, "driverId": 1, "startTime": "noon", '
                   '"paymentType": "CARD", "tip": 1, "tolls": 0, "totalFare": 3}']


@pytest.fixture(scope='module')
def feed(tmp_path_factory):
  d = tmp_path_factory.mktemp('taxi')
  rides, fares = str(d / 'rides.jsonl'), str(d / 'fares.jsonl')
  # lots of long and lost rides, so every branch is exercised in a small feed
  write_rides_and_fares(150, rides, fares, seed=11, long_ride_share=0.1, lost_end_share=0.05)
  with open(rides, 'a') as f:
    f.write('\n'.join(BAD_RIDES) + '\n')
  with open(fares, 'a') as f:
    f.write('\n'.join(BAD_FARES) + '\n')
  good = lambda p: [json.loads(l) for l in open(p) if _is_good(l)]
  return {'dir': d, 'rides': rides, 'fares': fares,
          'ride_records': good(rides), 'fare_records': good(fares)}


def _is_good(line):
  return line.strip() not in BAD_RIDES + BAD_FARES


def run_taxi(*args):
  return run_cli('taxi', *args)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def ok(proc):
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr


def dead_letter_reasons(out):
  return sorted(d['reason'].split(':')[0] for d in read_jsonl(out / 'dead_letters.jsonl'))


def test_join(feed, tmp_path):
  out = tmp_path / 'join'
  ok(run_taxi('join', '--rides', feed['rides'], '--fares', feed['fares'], '--out', str(out)))
  starts = {r['rideId'] for r in feed['ride_records'] if r['isStart']}
  fare_ids = {f['rideId'] for f in feed['fare_records']}
  joined = read_jsonl(out / 'joined.jsonl')
  assert sorted(j['ride']['rideId'] for j in joined) == sorted(starts & fare_ids)
  assert all(j['ride']['rideId'] == j['fare']['rideId'] and j['ride']['isStart'] for j in joined)
  unmatched = read_jsonl(out / 'unmatched.jsonl')
  assert sorted(u['record']['rideId'] for u in unmatched) == sorted(starts ^ fare_ids)
  summary = json.load(open(out / 'summary.json'))
  assert summary['balanced'] is True
  assert summary['counts']['dead_letters'] == len(BAD_RIDES) + len(BAD_FARES)
  assert summary['counts']['joined'] == len(joined)
  assert summary['counts']['ride_lines_in'] == len(feed['ride_records']) + len(BAD_RIDES)
  assert dead_letter_reasons(out) == sorted([
      'a fare must be a JSON object, not list', "fare field 'startTime' is not an ISO-8601 time",
      'malformed JSON', "ride field 'rideId' must be an integer, not 'x'",
      'ride lacks field(s) isStart, eventTime, startLon, startLat, endLon, endLat, '
      'passengerCnt, taxiId, driverId'])


def test_join_expiry_is_configurable(feed, tmp_path):
  """With fares dropped, every START expires to unmatched with the configured time."""
  fares = tmp_path / 'no_fares.jsonl'
  fares.write_text('')
  out = tmp_path / 'join'
  ok(run_taxi('join', '--rides', feed['rides'], '--fares', str(fares), '--out', str(out),
              '--expire-after-minutes', '5'))
  unmatched = read_jsonl(out / 'unmatched.jsonl')
  starts = [r for r in feed['ride_records'] if r['isStart']]
  assert len(unmatched) == len(starts)
  assert {u['reason'] for u in unmatched} == {'no fare within 5 min'}
  assert read_jsonl(out / 'joined.jsonl') == []


def test_long_rides(feed, tmp_path):
  out = tmp_path / 'long'
  ok(run_taxi('long-rides', '--rides', feed['rides'], '--out', str(out)))
  by_ride = collections.defaultdict(dict)
  for r in feed['ride_records']:
    by_ride[r['rideId']]['start' if r['isStart'] else 'end'] = iso_to_millis(r['eventTime'])
  expected = sorted(i for i, se in by_ride.items()
                    if 'end' not in se or se['end'] - se['start'] > 2 * H)
  alerts = read_jsonl(out / 'alerts.jsonl')
  assert sorted(a['rideId'] for a in alerts) == expected
  assert len(expected) >= 5  # the feed really has long and lost rides
  assert read_jsonl(out / 'ignored.jsonl') == []
  summary = json.load(open(out / 'summary.json'))
  assert summary['balanced'] and summary['counts']['alerts'] == len(expected)


def test_hourly_tips(feed, tmp_path):
  out = tmp_path / 'tips'
  ok(run_taxi('hourly-tips', '--fares', feed['fares'], '--out', str(out)))
  sums = collections.defaultdict(lambda: collections.Counter())
  for f in feed['fare_records']:
    t = iso_to_millis(f['startTime'])
    sums[t - t % H + H][f['driverId']] += round(f['tip'] * 100)
  expected = []
  for end, per_driver in sorted(sums.items()):
    driver, cents = min(per_driver.items(), key=lambda dc: (-dc[1], dc[0]))
    expected.append({'windowEnd': end, 'driverId': driver, 'totalTips': cents / 100})
  got = sorted(read_jsonl(out / 'hourly_tips.jsonl'), key=lambda r: r['windowEnd'])
  assert got == expected
  assert json.load(open(out / 'summary.json'))['counts']['hours'] == len(expected)


def test_cleanse(feed, tmp_path):
  out = tmp_path / 'clean'
  ok(run_taxi('cleanse', '--rides', feed['rides'], '--out', str(out)))
  inside = lambda lon, lat: -74.05 <= lon <= -73.7 and 40.5 <= lat <= 41.0
  expected = sorted((r['rideId'], r['isStart']) for r in feed['ride_records']
                    if inside(r['startLon'], r['startLat']) and inside(r['endLon'], r['endLat']))
  got = read_jsonl(out / 'rides.jsonl')
  assert sorted((r['rideId'], r['isStart']) for r in got) == expected
  assert len(expected) < len(feed['ride_records'])  # some rides really were outside
  counts = json.load(open(out / 'summary.json'))['counts']
  assert counts['kept'] + counts['outside_nyc'] == len(feed['ride_records'])


@pytest.mark.parametrize('args,message', [
    (['cleanse', '--rides', '/nonexistent/rides.jsonl', '--out', '{tmp}'],
     'error: --rides /nonexistent/rides.jsonl: no such file'),
    (['join', '--rides', '{rides}', '--fares', '/nonexistent/f.jsonl', '--out', '{tmp}'],
     'error: --fares /nonexistent/f.jsonl: no such file'),
    ([], 'error: choose a taxi pipeline: join, long-rides, hourly-tips or cleanse'),
])
def test_bad_arguments_are_one_line_and_exit_2(feed, tmp_path, args, message):
  args = [a.format(tmp=tmp_path, rides=feed['rides']) for a in args]
  proc = run_taxi(*args)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == message
  assert 'Traceback' not in proc.stderr
