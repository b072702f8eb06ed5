"""The partition-key report (pipelines/keys.py): statistics in plain Python, the
alternative-rule semantics, and `run.py keys` on a real archive."""

import itertools
import json

import apache_beam as beam
import pytest
from hypothesis import given, settings, strategies as st

from tests.cli import run_cli as _run_cli
from tests.demo import DEMO_SCHEMAS, REG  # noqa: F401
from sourcebeam.generators import retail
from sourcebeam.transforms.errors import ConfigError
from sourcebeam.pipelines.keys import analyse, key_stats, key_under, parse_key_rule
from sourcebeam.pipelines.options import pipeline_options
from sourcebeam.schemas.envelope import iso_to_millis, make_envelope
from sourcebeam.transforms.archive import WriteArchive

T0 = 1_795_687_200_000


def cart(user, product, seq, t, event_type='CartItemAdded'):
  return make_envelope(REG, event_type, {'user_id': user, 'product_id': product, 'quantity': 1},
                       event_id=f'{user}-{seq}', sequence=seq, event_time=T0 + t, origin='test')


def test_key_stats_distribution_skew_and_parallelism():
  counts = {'a': 6, 'b': 2, 'c': 1, 'd': 1}
  s = key_stats(counts, top=2, workers=1)
  assert (s['events'], s['keys'], s['max_per_key'], s['median_per_key'], s['p99_per_key']) == (
      10, 4, 6, 1, 6)
  assert s['mean_per_key'] == 2.5 and s['skew'] == 2.4
  assert s['hottest_share'] == 0.6
  assert s['parallelism_bound'] == round(10 / 6, 3)       # the hottest key is serial
  assert s['effective_keys'] == round(100 / (36 + 4 + 1 + 1), 3)
  assert s['worker_balance'] == 1.0                        # one worker is always balanced
  assert s['top_keys'] == [{'key': 'a', 'events': 6, 'share': 0.6},
                           {'key': 'b', 'events': 2, 'share': 0.2}]


def test_worker_balance_with_one_hot_key():
  counts = {f'k{i}': 1 for i in range(99)}
  counts['hot'] = 901
  s = key_stats(counts, workers=4)
  # The busiest worker carries at least the hot key: balance <= (1000 / 4) / 901.
  assert s['worker_balance'] <= round(250 / 901, 4)
  assert s['parallelism_bound'] == round(1000 / 901, 3)


def test_empty_input():
  r = analyse([], REG, parse_key_rule(['product_id'], REG))
  assert r['events'] == 0 and r['current']['keys'] == 0 and r['comparison']['ordered_differently'] == 0


def test_parse_key_rule_forms():
  schema = REG.partition_key_rules()
  assert parse_key_rule([], REG) == schema
  bare = parse_key_rule(['product_id'], REG)
  assert bare['CartItemAdded'] == 'product_id' and bare['ProductViewed'] == 'product_id'
  assert bare['UserLoggedIn'] == 'user_id'            # no product_id: keeps its schema rule
  typed = parse_key_rule(['CartItemAdded=product_id, CartItemRemoved=product_id'], REG)
  assert typed['CartItemAdded'] == typed['CartItemRemoved'] == 'product_id'
  assert typed['ProductViewed'] == schema['ProductViewed']
  # Type=FIELD overrides a bare FIELD whatever the order.
  both = parse_key_rule(['ProductViewed=user_id', 'product_id'], REG)
  assert both['ProductViewed'] == 'user_id' and both['CartItemAdded'] == 'product_id'


@pytest.mark.parametrize('spec, message', [
    ('Nope=user_id', 'unknown event type'),
    ('CartItemAdded=colour', 'has no field'),
    ('colour', 'no event type has a field'),
    ('user_id,,', 'empty key rule'),
])
def test_bad_key_rules_are_usage_errors(spec, message):
  with pytest.raises(ConfigError, match=message):
    parse_key_rule([spec], REG)


def test_key_under_rule():
  env = cart('u1', 'p9', 1, 0)
  assert key_under({'CartItemAdded': 'product_id'}, env) == 'p9'
  assert key_under({}, env) is None
  assert key_under({'CartItemAdded': 'missing'}, env) is None


def test_same_rule_orders_nothing_differently():
  events = [cart('u1', 'p1', 1, 0), cart('u1', 'p2', 2, 5), cart('u2', 'p1', 1, 3)]
  r = analyse(events, REG, parse_key_rule(['CartItemAdded=user_id'], REG))
  assert r['comparison']['ordered_differently'] == 0
  assert r['rule_changes'] == {}
  assert r['alternative']['keys'] == r['current']['keys'] == 2


def test_alternative_rule_counts_new_predecessors_splits_and_merges():
  # u1 adds p1 then p2 then p1; u2 adds p1 in between (by event time).
  events = [cart('u1', 'p1', 1, 0), cart('u1', 'p2', 2, 10), cart('u1', 'p1', 3, 20),
            cart('u2', 'p1', 1, 15)]
  r = analyse(events, REG, parse_key_rule(['CartItemAdded=product_id'], REG))
  c = r['comparison']
  # Current chains: u1: 1 -> 2 -> 3, u2: 1. Alternative chains by time:
  # p1: u1/1 -> u2/1 -> u1/3, p2: u1/2.
  # u1/1: none -> none (same); u1/2: u1/1 -> none (differs); u2/1: none -> u1/1 (differs);
  # u1/3: u1/2 -> u2/1 (differs).
  assert c['ordered_differently'] == 3
  assert c['ordered_differently_share'] == 0.75
  assert c['current_keys_split'] == 1          # u1 spreads over p1 and p2
  assert c['alternative_keys_merging'] == 1    # p1 merges u1 and u2
  assert c['unkeyable'] == 0
  assert r['rule_changes'] == {'CartItemAdded': 'product_id'}
  assert r['alternative']['keys'] == 2 and r['alternative']['max_per_key'] == 3


def test_events_without_the_alternative_field_are_counted_not_dropped():
  data = {f: 'u1' for f in _fields('UserLoggedIn')}
  login = make_envelope(REG, 'UserLoggedIn', data, event_id='l1', sequence=4, event_time=T0, origin='test')
  events = [cart('u1', 'p1', 1, 0), login]
  r = analyse(events, REG, {'CartItemAdded': 'product_id'})   # a partial rule: logins have none
  assert r['comparison']['unkeyable'] == 1
  assert r['comparison']['unkeyable_by_type'] == {'UserLoggedIn': 1}
  assert r['alternative']['events'] + r['comparison']['unkeyable'] == r['events']


def _fields(name):
    return REG.current[name].field_names


@st.composite
def carts(draw):
  events = []
  seqs = {}
  for i in range(draw(st.integers(0, 30))):
    user = draw(st.sampled_from(['u1', 'u2', 'u3']))
    product = draw(st.sampled_from(['p1', 'p2']))
    seqs[user] = seqs.get(user, 0) + 1
    events.append(cart(user, product, seqs[user], i))
  return events


@settings(max_examples=60, deadline=None)
@given(carts())
def test_property_report_accounts_for_every_event(events):
  r = analyse(events, REG, parse_key_rule(['product_id'], REG))
  assert r['current']['events'] == r['alternative']['events'] + r['comparison']['unkeyable'] == len(events)
  assert sum(t['events'] for t in key_stats(
      {k: v for k, v in _counts(events).items()}, top=100)['top_keys']) == len(events)
  # The first event of each key under both rules can never count; everything else may.
  assert 0 <= r['comparison']['ordered_differently'] <= len(events)
  # Nothing changes when every user only ever touches one product.
  one_product = [e for e in events if (e['data']['user_id'], e['data']['product_id']) in
                 {('u1', 'p1'), ('u2', 'p2')}]
  for e in one_product:
    e['sequence'] = 0
  _renumber(one_product)
  r1 = analyse(one_product, REG, parse_key_rule(['product_id'], REG))
  assert r1['comparison']['ordered_differently'] == 0


def _counts(events):
  counts = {}
  for e in events:
    counts[e['partition_key']] = counts.get(e['partition_key'], 0) + 1
  return counts


def _renumber(events):
  seqs = {}
  for e in events:
    seqs[e['partition_key']] = seqs.get(e['partition_key'], 0) + 1
    e['sequence'] = seqs[e['partition_key']]


# -- the command on a real archive ----------------------------------------------------------

@pytest.fixture(scope='module')
def archive(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('keys') / 'archive')
  events = []
  for e in itertools.islice(retail.retail_events(600, seed=3), 600):
    e = dict(e)
    e['event_time'] = iso_to_millis(e['event_time'])
    events.append(e)
  with beam.Pipeline(options=pipeline_options([])) as p:
    _ = p | beam.Create(events) | WriteArchive(path, buckets=2, registry=REG)
  return path, events


def run_cli(argv):
  return _run_cli(*argv)


@pytest.mark.cli
def test_cli_json_matches_the_plain_python_report(archive):
  path, events = archive
  code, out, err = run_cli(['keys', '--archive', path, '--key-rule', 'product_id', '--json'])
  assert code == 0, err
  report = json.loads(out.strip().splitlines()[-1])
  want = analyse(sorted(events, key=lambda e: e['event_id']), REG, parse_key_rule(['product_id'], REG))
  assert report['events'] == 600
  for part in ('current', 'alternative', 'comparison', 'event_types'):
    assert report[part] == want[part], part
  assert report['comparison']['ordered_differently'] > 0


@pytest.mark.cli
def test_cli_table(archive):
  path, _ = archive
  code, out, err = run_cli(['keys', '--archive', path, '--key-rule', 'CartItemAdded=product_id',
                            '--top', '3', '--workers', '8'])
  assert code == 0, err
  assert 'keys (cardinality)' in out and 'balance on 8 workers (hash)' in out
  assert 'alternative rule: CartItemAdded=product_id' in out
  assert out.count('top keys') == 2


@pytest.mark.cli
@pytest.mark.parametrize('argv, message', [
    (['--archive', '/nonexistent/archive'], 'does not exist'),
    (['--archive', 'ARCHIVE', '--key-rule', 'Nope=x'], 'unknown event type'),
])
def test_cli_errors_are_one_line(archive, argv, message):
  argv = [a.replace('ARCHIVE', archive[0]) for a in argv]
  code, out, err = run_cli(['keys'] + argv)
  assert code == 2
  assert message in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1
