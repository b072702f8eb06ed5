"""Fan-out subscribers in plain Python: the file format, its errors, and matching (no Beam)."""

import json
import random

import pytest

from sourcebeam.transforms.errors import ConfigError
from sourcebeam.transforms.fanout_core import (Matcher, Sink, key_matches, load_subscribers, naive_match,
                                    parse_keys, parse_subscribers)

TYPES = ['CartItemAdded', 'CartItemRemoved', 'ProductCreated', 'ProductViewed', 'UserLoggedIn']


def subs(*items):
  return parse_subscribers({'subscribers': list(items)}, TYPES)


def test_a_json_file_and_a_toml_file_give_the_same_subscribers(tmp_path):
  doc = {'subscribers': [
      {'name': 'carts', 'event_types': ['CartItemAdded', 'CartItemRemoved'], 'keys': ['u-1*'],
       'sink': 'kafka://127.0.0.1:9092/carts'},
      {'name': 'all', 'sink': 's3://bucket/fanout/all/'}]}
  (tmp_path / 's.json').write_text(json.dumps(doc))
  (tmp_path / 's.toml').write_text(
      '[[subscribers]]\nname = "carts"\nevent_types = ["CartItemAdded", "CartItemRemoved"]\n'
      'keys = ["u-1*"]\nsink = "kafka://127.0.0.1:9092/carts"\n\n'
      '[[subscribers]]\nname = "all"\nsink = "s3://bucket/fanout/all/"\n')
  a = load_subscribers(str(tmp_path / 's.json'), TYPES)
  b = load_subscribers(str(tmp_path / 's.toml'), TYPES)
  assert a == b
  assert a[0].sink == Sink('kafka', 'carts', '127.0.0.1:9092')
  assert a[0].event_types == frozenset({'CartItemAdded', 'CartItemRemoved'})
  assert a[0].keys.prefixes == ('u-1',)
  assert a[1].sink == Sink('archive', 's3://bucket/fanout/all')
  assert a[1].event_types is None and a[1].keys.matches_all


def test_subscribers_are_checked_against_the_apps_event_types(tmp_path):
  from tests.demo import REG
  (tmp_path / 's.json').write_text(json.dumps(
      {'subscribers': [{'name': 'x', 'event_types': ['ProductViewed'], 'sink': str(tmp_path / 'a')}]}))
  assert load_subscribers(str(tmp_path / 's.json'), REG.event_types)[0].event_types == frozenset(
      {'ProductViewed'})
  with pytest.raises(ConfigError, match='unknown type'):
    load_subscribers(str(tmp_path / 's.json'), ['OrderPlaced'])


@pytest.mark.parametrize('doc, words', [
    ({'subs': []}, ['"subscribers" list']),
    ({'subscribers': []}, ['empty']),
    ({'subscribers': [{'sink': '/a'}]}, ['subscriber #1', '"name"']),
    ({'subscribers': [{'name': 'bad name', 'sink': '/a'}]}, ['subscriber #1', '"name"']),
    ({'subscribers': [{'name': 'a'}]}, ["subscriber 'a'", '"sink" is missing']),
    ({'subscribers': [{'name': 'a', 'sink': '/a'}, {'name': 'a', 'sink': '/b'}]},
     ["subscriber 'a'", 'used twice']),
    ({'subscribers': [{'name': 'a', 'sink': '/a', 'event_types': ['CartAdded']}]},
     ["subscriber 'a'", 'event_types', "'CartAdded'"]),
    ({'subscribers': [{'name': 'a', 'sink': '/a', 'event_types': 'CartItemAdded'}]},
     ["subscriber 'a'", 'event_types']),
    ({'subscribers': [{'name': 'a', 'sink': '/a', 'keys': []}]}, ["subscriber 'a'", '"keys"']),
    ({'subscribers': [{'name': 'a', 'sink': '/a', 'filter': 1}]}, ["subscriber 'a'", "'filter'"]),
    ({'subscribers': [{'name': 'a', 'sink': 'kafka://host/topic'}]},
     ["subscriber 'a'", 'kafka://HOST:PORT/TOPIC']),
    ({'subscribers': [{'name': 'a', 'sink': 'http://x/y'}]}, ["subscriber 'a'", 'http://']),
    ({'subscribers': [{'name': 'a', 'sink': 7}]}, ["subscriber 'a'", '"sink"']),
    ({'subscribers': [{'name': 'a', 'sink': '/x'}, {'name': 'b', 'sink': '/x/'}]},
     ["'a'", "'b'", 'same sink']),
])
def test_bad_subscriber_files_name_the_subscriber_and_the_field(doc, words):
  with pytest.raises(ConfigError) as e:
    parse_subscribers(doc, TYPES, where='subs.json')
  for w in words:
    assert w in str(e.value)


def test_unreadable_files_are_usage_errors(tmp_path):
  with pytest.raises(ConfigError, match='does not exist'):
    load_subscribers(str(tmp_path / 'missing.json'), TYPES)
  (tmp_path / 'bad.json').write_text('{"subscribers": [')
  with pytest.raises(ConfigError, match='not valid JSON'):
    load_subscribers(str(tmp_path / 'bad.json'), TYPES)
  (tmp_path / 'bad.toml').write_text('[[subscribers]\n')
  with pytest.raises(ConfigError, match='not valid TOML'):
    load_subscribers(str(tmp_path / 'bad.toml'), TYPES)


def test_keys_are_exact_prefixes_or_globs():
  f = parse_keys(['u-1', 'p-*', 'u-2?', 'x[ab]*'], 'w')
  assert f.exact == frozenset({'u-1'}) and f.prefixes == ('p-',)
  assert key_matches(f, 'u-1') and not key_matches(f, 'u-10')
  assert key_matches(f, 'p-') and key_matches(f, 'p-007')
  assert key_matches(f, 'u-23') and not key_matches(f, 'u-234')
  assert key_matches(f, 'xa-1') and not key_matches(f, 'xc-1')
  assert key_matches(parse_keys(None, 'w'), 'anything')


def test_matcher_gives_subscribers_in_file_order():
  s = subs({'name': 'all', 'sink': '/all'},
           {'name': 'carts', 'event_types': ['CartItemAdded'], 'sink': '/carts'},
           {'name': 'u1', 'keys': ['u-1*'], 'sink': '/u1'},
           {'name': 'one', 'event_types': ['CartItemAdded'], 'keys': ['u-17'], 'sink': '/one'})
  m = Matcher(s)
  assert m.match('CartItemAdded', 'u-17') == (0, 1, 2, 3)
  assert m.match('CartItemAdded', 'u-2') == (0, 1)
  assert m.match('ProductViewed', 'u-17') == (0, 2)
  assert m.match('SomethingNew', 'p-1') == (0,)  # unknown types go to the any-type subscribers
  assert Matcher(s[1:]).match('ProductViewed', 'p-1') == ()


def test_matcher_agrees_with_the_filters_one_by_one_on_random_subscribers():
  rng = random.Random(7)
  keys = [f'u-{i}' for i in range(60)] + [f'p-{i}' for i in range(40)]
  for _ in range(20):
    items = []
    for i in range(rng.randint(1, 120)):  # past 64 subscribers: masks wider than a machine word
      item = {'name': f's{i}', 'sink': f'/s{i}'}
      if rng.random() < 0.6:
        item['event_types'] = rng.sample(TYPES, rng.randint(1, 3))
      if rng.random() < 0.6:
        item['keys'] = rng.sample(keys, 2) + rng.sample(['u-1*', 'p-*', 'u-?', 'p-[12]?', 'q*'], 2)
      items.append(item)
    s = subs(*items)
    m = Matcher(s, cache_limit=50)  # small: the cache is cleared and refilled on the way
    for _ in range(400):
      t, k = rng.choice(TYPES + ['Unknown']), rng.choice(keys + ['zz'])
      assert m.match(t, k) == naive_match(s, t, k), (t, k)
