"""The publishing boundary, without Beam: every bad-input case and every documented repair."""

import json

import pytest

from tests.demo import DEMO_SCHEMAS, REG  # noqa: F401
from sourcebeam.schemas.validation import publish_raw


def good(**overrides):
  raw = {
      'event_id': 'e1', 'event_type': 'CartItemAdded', 'schema_version': 1, 'partition_key': 'u1',
      'sequence': 1, 'event_time': '2026-11-26T10:00:00Z', 'origin': 'web/cart',
      'follows_from': None, 'data': {'user_id': 'u1', 'product_id': 'p1', 'quantity': 2},
  }
  for k, v in overrides.items():
    if v is DROP:
      raw.pop(k)
    else:
      raw[k] = v
  return raw


DROP = object()


def publish(obj):
  line = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
  return publish_raw(line, REG, source='test.jsonl')


def refused(obj, reason_part):
  env, dead, _ = publish(obj)
  assert env is None, f'expected a dead letter, got {env}'
  assert reason_part in dead['reason'], dead['reason']
  assert dead['source'] == 'test.jsonl'
  return dead


def test_a_clean_event_publishes_unchanged():
  env, dead, repairs = publish(good())
  assert dead is None and repairs == []
  assert env['event_time'] == 1_795_687_200_000
  assert env['data'] == {'user_id': 'u1', 'product_id': 'p1', 'quantity': 2}


BAD = [
    (b'{"event_type": "CartItemAdded", ', 'malformed JSON'),
    (b'\xff\xfe{"a":1}', 'not UTF-8'),
    (b'[1, 2]', 'must be a JSON object'),
    (b'   ', 'blank line'),
    (good(data=DROP), 'data is missing'),
    (good(data={'user_id': 'u1', 'quantity': 2}), "missing field 'product_id'"),
    (good(data={'user_id': 'u1', 'product_id': 'p1', 'quantity': 2, 'color': 'red'}),
     "unexpected field(s) ['color']"),
    (good(colour='red'), "unexpected envelope field(s) ['colour']"),
    (good(data={'user_id': 'u1', 'product_id': 'p1', 'quantity': 'two'}),
     'data.quantity must be a whole number'),
    (good(data={'user_id': 7, 'product_id': 'p1', 'quantity': 2}, partition_key=DROP),
     'data.user_id must be a string'),
    (good(data={'user_id': 'u1', 'product_id': 'p1', 'quantity': 2**40}), 'does not fit in an Avro int'),
    (good(event_type='CartExploded'), "unknown event type 'CartExploded'"),
    (good(event_type=DROP), 'event_type is missing'),
    (good(schema_version=7), 'unknown schema version 7 of CartItemAdded'),
    (good(schema_version='one'), 'schema_version must be a whole number'),
    (good(event_time='yesterday'), 'is not an ISO-8601 timestamp'),
    (good(event_time='1970-01-02T00:00:00Z'), 'absurd'),
    (good(event_time='2999-01-01T00:00:00Z'), 'absurd'),
    (good(event_time=DROP), 'event_time is missing'),
    (good(event_time=[2026]), 'must be an ISO-8601 string or epoch milliseconds'),
    (good(sequence=-3), 'sequence must be >= 1'),
    (good(sequence=0), 'sequence must be >= 1'),
    (good(sequence=2.5), 'sequence must be a whole number'),
    (good(sequence=True), 'sequence must be a whole number'),
    (good(sequence=DROP), 'sequence is missing'),
    (good(sequence=2**63), 'does not fit in an Avro long'),
    (good(origin=''), 'origin is missing'),
    (good(partition_key='u2'), "partition_key 'u2' disagrees with the key rule"),
    (good(follows_from=12), 'follows_from must be an event_id string'),
    (good(data={'user_id': 'u1', 'product_id': 'p1', 'quantity': None}), 'data.quantity is null'),
]


@pytest.mark.parametrize('raw,reason', BAD, ids=[r for _, r in BAD])
def test_bad_input_is_dead_lettered_with_a_reason(raw, reason):
  refused(raw, reason)


def test_an_oversized_payload_is_dead_lettered_whole():
  big = good(origin='x' * 70_000)
  dead = refused(big, 'over the limit of 65536 bytes')
  assert json.loads(dead['raw']) == big


def test_non_utf8_keeps_the_exact_bytes():
  raw = b'{"a":"\xe9t\xe9"}'
  dead = refused(raw, 'not UTF-8')
  import base64
  assert base64.b64decode(dead['raw_base64']) == raw


def test_deeply_nested_json_is_a_dead_letter_not_a_crash():
  refused(b'[' * 30_000 + b']' * 30_000, 'malformed JSON')


REPAIRS = [
    (good(partition_key=DROP), 'partition_key filled from user_id', lambda e: e['partition_key'] == 'u1'),
    (good(event_time='2026-11-26T11:00:00+01:00'), 'event_time normalised to UTC',
     lambda e: e['event_time'] == 1_795_687_200_000),
    (good(event_time='2026-11-26T10:00:00'), 'event_time normalised to UTC',
     lambda e: e['event_time'] == 1_795_687_200_000),
    (good(event_time=1_795_687_200), 'event_time converted from epoch seconds',
     lambda e: e['event_time'] == 1_795_687_200_000),
    (good(data={'user_id': 'u1', 'product_id': 'p1', 'quantity': '3'}), 'data.quantity converted from a string',
     lambda e: e['data']['quantity'] == 3),
    (good(data={'user_id': 'u1', 'product_id': 'p1', 'quantity': 3.0}), 'data.quantity converted from a whole float',
     lambda e: e['data']['quantity'] == 3),
    (good(sequence='12'), 'sequence converted from a string', lambda e: e['sequence'] == 12),
    (good(event_id=DROP), 'event_id derived from the raw line', lambda e: len(e['event_id']) == 36),
    (good(schema_version=DROP), 'schema_version set to the current version', lambda e: e['schema_version'] == 1),
]


@pytest.mark.parametrize('raw,repair,check', REPAIRS, ids=[r for _, r, _ in REPAIRS])
def test_documented_repairs(raw, repair, check):
  env, dead, repairs = publish(raw)
  assert dead is None, dead
  assert repair in repairs
  assert check(env)


def test_event_time_is_repaired_from_the_events_own_time_field():
  ride = {'event_type': 'RideStarted', 'sequence': 1, 'origin': 'taxi-meter', 'data': {
      'rideId': 1, 'isStart': True, 'eventTime': '2020-01-01T00:00:00Z', 'startLon': -73.9,
      'startLat': 40.7, 'endLon': 0, 'endLat': 0, 'passengerCnt': 1, 'taxiId': 3, 'driverId': 4}}
  env, dead, repairs = publish(ride)
  assert dead is None
  assert env['event_time'] == env['data']['eventTime'] == 1_577_836_800_000
  assert 'event_time taken from data.eventTime' in repairs
  assert env['partition_key'] == '1'


def test_derived_event_ids_are_stable():
  raw = good(event_id=DROP)
  assert publish(raw)[0]['event_id'] == publish(raw)[0]['event_id']


# --- the parser: orjson where it agrees with json.loads, json.loads everywhere else ---------

import json as _json

from sourcebeam.schemas.validation import parse_json


@pytest.mark.parametrize('text', [
    '{"a":1,"a":2}', '{"a":18446744073709551616}', '{"a":-9223372036854775809}',
    '{"a":9223372036854775808}', '{"a":-0}', '{"a":-0.0}', '{"a":1e400}', '{"a":NaN}',
    '{"a":-Infinity}', '{"a":"\\ud800"}', '{"a":0.1}', '{"a":5e-324}',
    '{"a":123456789012345678901234567890.5}', ' {"a":1}\n', '{"\\u00e9":"\\u0000"}',
    '{"id":"1234567890123456789012345"}', '"\u2028"'])
def test_parse_json_gives_what_json_loads_gives(text):
  got, want = parse_json(text), _json.loads(text)
  assert repr(got) == repr(want)
  assert type(got) is type(want)


@pytest.mark.parametrize('text', ['{"a":"\x01"}', '[' * 3000 + ']' * 3000, '\ufeff{}', '{"a":1} x',
                                  '{"a":', '', '{"a":\u2028}', "{'a':1}"])
def test_parse_json_refuses_with_json_loads_own_error(text):
  try:
    _json.loads(text)
  except (ValueError, RecursionError) as e:
    want = (type(e), str(e))
  with pytest.raises(want[0]) as got:
    parse_json(text)
  assert str(got.value) == want[1]


def test_a_huge_integer_is_dead_lettered_as_before():
  env, dead, _ = publish_raw(
      b'{"event_type":"CartItemAdded","partition_key":"u1","sequence":1,'
      b'"event_time":"2026-11-26T10:00:00Z","origin":"web","event_id":"e1",'
      b'"data":{"user_id":"u1","product_id":"p1","quantity":18446744073709551617}}', REG)
  assert env is None
  assert dead['reason'] == 'data.quantity 18446744073709551617 does not fit in an Avro int'
