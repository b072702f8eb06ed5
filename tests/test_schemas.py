"""The contract: schemas load, names are past tense, key rules are declared once, Avro round-trips."""

import io
import json
import os
import shutil

import fastavro
import pytest
import re

from tests.demo import DEMO_SCHEMAS, REG  # noqa: F401
from sourcebeam.schemas import SchemaError
from sourcebeam.schemas.envelope import from_json, iso_to_millis, make_envelope, millis_to_iso, to_avro_record, to_json
from sourcebeam.schemas.registry import Registry

RETAIL = ['ProductCreated', 'ProductImageAdded', 'ProductViewed', 'ProductPurchased', 'CartItemAdded',
          'CartItemRemoved', 'UserLoggedIn', 'PhoneNumberUpdated', 'RoleAdded']
TAXI = ['RideStarted', 'RideEnded', 'FarePaid']
IRREGULAR_PAST = {'Paid'}


def test_every_event_type_the_domain_needs_is_there_and_past_tense():
  types = REG.event_types
  for name in RETAIL + TAXI:
    assert name in types
  for name in types:
    words = re.findall('[A-Z][a-z]*', name)
    verb = words[-2] if words[-1] in ('Up', 'Off', 'In', 'Out') else words[-1]
    assert verb.endswith('ed') or verb in IRREGULAR_PAST, f'{name} is not named in the past tense'


def test_key_rules_are_declared_in_the_schemas():
  rules = REG.partition_key_rules()
  assert rules['CartItemAdded'] == 'user_id'
  assert rules['CartItemRemoved'] == 'user_id'
  assert rules['ProductPurchased'] == 'user_id'
  assert rules['ProductCreated'] == 'product_id'
  assert rules['RideStarted'] == 'rideId'
  assert rules['FarePaid'] == 'rideId'
  assert rules['TaxiLocationReported'] == 'taxi_id'


def test_envelope_fields_match_the_contract():
  names = [f['name'] for f in REG.envelope_json['fields']]
  assert names == ['event_id', 'event_type', 'schema_version', 'partition_key', 'sequence',
                   'event_time', 'origin', 'follows_from', 'raw_sequence', 'data']


def test_avro_round_trip_keeps_look_alike_types_apart():
  added = make_envelope(REG, 'CartItemAdded', {'user_id': 'u', 'product_id': 'p', 'quantity': 1},
                        event_id='a', sequence=1, event_time=1_700_000_000_000, origin='web')
  removed = make_envelope(REG, 'CartItemRemoved', {'user_id': 'u', 'product_id': 'p', 'quantity': 1},
                          event_id='b', sequence=2, event_time=1_700_000_000_001, origin='web',
                          follows_from='a')
  buf = io.BytesIO()
  fastavro.writer(buf, REG.parsed_envelope, [to_avro_record(added, REG), to_avro_record(removed, REG)])
  buf.seek(0)
  back = list(fastavro.reader(buf))
  assert back == [added, removed]


def test_json_form_round_trips():
  env = make_envelope(REG, 'RideStarted', {
      'rideId': 2**40, 'isStart': True, 'eventTime': 1_700_000_000_000, 'startLon': -73.9,
      'startLat': 40.7, 'endLon': -73.95, 'endLat': 40.75, 'passengerCnt': 2, 'taxiId': 7,
      'driverId': 9}, event_id='r', sequence=1, event_time=1_700_000_000_000, origin='taxi-meter')
  line = to_json(env)
  assert json.loads(line)['event_time'] == '2023-11-14T22:13:20.000Z'
  assert from_json(line) == env
  assert env['partition_key'] == str(2**40)


def test_time_conversions():
  assert millis_to_iso(0) == '1970-01-01T00:00:00.000Z'
  assert iso_to_millis('2026-11-26T11:00:00+01:00') == iso_to_millis('2026-11-26T10:00:00Z')
  assert iso_to_millis(millis_to_iso(1_795_683_600_123)) == 1_795_683_600_123


def test_a_schema_without_key_rule_is_refused(tmp_path):
  for f in os.listdir(DEMO_SCHEMAS):
    if f.endswith('.avsc'):
      shutil.copy(os.path.join(DEMO_SCHEMAS, f), tmp_path / f)
  broken = json.loads((tmp_path / 'RoleAdded.avsc').read_text())
  broken['partition_key'] = 'nope'
  (tmp_path / 'RoleAdded.avsc').write_text(json.dumps(broken))
  with pytest.raises(SchemaError, match='partition_key .nope. is not a field of RoleAdded'):
    Registry(str(tmp_path))


def test_the_envelope_union_is_built_from_the_schema_folder(tmp_path):
  for f in os.listdir(DEMO_SCHEMAS):
    if f.endswith('.avsc'):
      shutil.copy(os.path.join(DEMO_SCHEMAS, f), tmp_path / f)
  new = json.loads((tmp_path / 'RoleAdded.avsc').read_text())
  new['name'] = 'RoleRevoked'
  (tmp_path / 'RoleRevoked.avsc').write_text(json.dumps(new))
  reg = Registry(str(tmp_path))
  union = reg.envelope_json['fields'][-1]['type']
  assert 'sourcebeam.retail.RoleRevoked' in union and len(union) == len(REG.current) + 1
  assert union == sorted(union)  # one order, whatever the folder listing
  fastavro.parse_schema(reg.envelope_schema())  # a complete, valid Avro schema


@pytest.mark.parametrize('files, message', [
    ({}, 'holds no event schemas'),
    ({'A.avsc': '{not json'}, 'cannot read schema'),
    ({'A.avsc': '{"type": "enum", "name": "A"}'}, 'not an Avro record schema'),
    ({'A.avsc': '{"type": "record", "name": "lower", "namespace": "n", "version": 1, '
                '"partition_key": "k", "fields": [{"name": "k", "type": "string"}]}'},
     'must be letters and digits'),
    ({'A.avsc': '{"type": "record", "name": "A", "namespace": "n", "version": 0, '
                '"partition_key": "k", "fields": [{"name": "k", "type": "string"}]}'},
     'whole number >= 1'),
    ({'A.avsc': '{"type": "record", "name": "A", "namespace": "n", "version": 1, '
                '"partition_key": "k", "event_time_field": "t", '
                '"fields": [{"name": "k", "type": "string"}]}'}, 'event_time_field'),
])
def test_a_bad_schema_folder_is_refused_naming_the_problem(tmp_path, files, message):
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  with pytest.raises(SchemaError, match=message):
    Registry(str(tmp_path))
  with pytest.raises(SchemaError, match='does not exist'):
    Registry(str(tmp_path / 'missing'))


def test_key_spaces_group_types_by_their_key_field_unless_a_schema_names_its_own():
  spaces = REG.key_spaces()
  assert spaces['user_id'] >= {'CartItemAdded', 'ProductViewed', 'UserLoggedIn'}
  assert spaces['product_id'] == {'ProductCreated', 'ProductImageAdded'}
  assert 'RiderLocated' in spaces['rider_located']  # an output stream numbers its own events
  assert 'RiderLocated' not in spaces['rider_id']


def test_a_registry_pickles_with_its_schemas_not_their_folder(tmp_path):
  import pickle
  back = pickle.loads(pickle.dumps(REG))
  assert back.fingerprint == REG.fingerprint and back.event_types == REG.event_types
  assert back.parsed_envelope  # rebuilt on first use


def test_compact_json_writes_what_the_standard_library_writes():
  import datetime
  import math
  import random
  import struct
  from sourcebeam.schemas.envelope import compact_json
  rnd = random.Random(7)
  floats = [0.0, -0.0, 1.0, 19.99, 1e-4, 1e-5, 9.999e15, 1e16, 1.5e16, 1e22, 2.5e-7,
            float('nan'), float('inf'), -float('inf')]
  for _ in range(20000):
    floats.append(struct.unpack('d', struct.pack('Q', rnd.getrandbits(64)))[0])
    floats.append(round(rnd.uniform(-1e5, 1e5), rnd.randint(0, 6)))
    floats.append(rnd.uniform(-1e-3, 1e-3))
  values = floats + [
      {'a': [1, True, None, {'b': 2 ** 63 - 1, 'c': 'é\u2028\x00"\\\n'}], 'd': (1.5, 'x')},
      2 ** 64, -2 ** 63, 10 ** 30, '\ud800 lone surrogate', {1: 'int key'}, [1e-9],
      {'deep': [[[[[0.1]]]]]}, ''.join(chr(i) for i in range(0x3000))]
  for v in values:
    want = json.dumps(v, separators=(',', ':'), ensure_ascii=False)
    assert compact_json(v) == want, (v, want)
  assert sum(1 for f in floats if not math.isfinite(f)) >= 3
  deep = [0.5]
  for _ in range(5000):
    deep = [deep]
  try:
    want = json.dumps(deep)
  except RecursionError:
    want = RecursionError
  try:
    got = compact_json(deep)
  except RecursionError:
    got = RecursionError
  assert got == want
  with pytest.raises(TypeError):  # orjson would write it; the standard library refuses it
    compact_json({'at': datetime.datetime(2026, 1, 1)})
