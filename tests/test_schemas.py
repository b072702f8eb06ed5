"""The contract: schemas load, names are past tense, key rules are declared once, Avro round-trips."""

import io
import json
import os
import shutil

import fastavro
import pytest
import re

from sourcebeam.schemas import SchemaError, partition_key_rules, registry
from sourcebeam.schemas.envelope import from_json, iso_to_millis, make_envelope, millis_to_iso, to_avro_record, to_json
from sourcebeam.schemas.registry import SCHEMA_DIR, Registry

RETAIL = ['ProductCreated', 'ProductImageAdded', 'ProductViewed', 'ProductPurchased', 'CartItemAdded',
          'CartItemRemoved', 'UserLoggedIn', 'PhoneNumberUpdated', 'RoleAdded']
TAXI = ['RideStarted', 'RideEnded', 'FarePaid']
IRREGULAR_PAST = {'Paid'}


def test_every_event_type_the_domain_needs_is_there_and_past_tense():
  types = registry().event_types
  for name in RETAIL + TAXI:
    assert name in types
  for name in types:
    words = re.findall('[A-Z][a-z]*', name)
    verb = words[-2] if words[-1] in ('Up', 'Off', 'In', 'Out') else words[-1]
    assert verb.endswith('ed') or verb in IRREGULAR_PAST, f'{name} is not named in the past tense'


def test_key_rules_are_declared_in_the_schemas():
  rules = partition_key_rules()
  assert rules['CartItemAdded'] == 'user_id'
  assert rules['CartItemRemoved'] == 'user_id'
  assert rules['ProductPurchased'] == 'user_id'
  assert rules['ProductCreated'] == 'product_id'
  assert rules['RideStarted'] == 'rideId'
  assert rules['FarePaid'] == 'rideId'
  assert rules['TaxiLocationReported'] == 'taxi_id'


def test_envelope_fields_match_the_contract():
  names = [f['name'] for f in registry().envelope_json['fields']]
  assert names == ['event_id', 'event_type', 'schema_version', 'partition_key', 'sequence',
                   'event_time', 'origin', 'follows_from', 'data']


def test_avro_round_trip_keeps_look_alike_types_apart():
  added = make_envelope('CartItemAdded', {'user_id': 'u', 'product_id': 'p', 'quantity': 1},
                        event_id='a', sequence=1, event_time=1_700_000_000_000, origin='web')
  removed = make_envelope('CartItemRemoved', {'user_id': 'u', 'product_id': 'p', 'quantity': 1},
                          event_id='b', sequence=2, event_time=1_700_000_000_001, origin='web',
                          follows_from='a')
  buf = io.BytesIO()
  fastavro.writer(buf, registry().parsed_envelope, [to_avro_record(added), to_avro_record(removed)])
  buf.seek(0)
  back = list(fastavro.reader(buf))
  assert back == [added, removed]


def test_json_form_round_trips():
  env = make_envelope('RideStarted', {
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
  for f in os.listdir(SCHEMA_DIR):
    if f.endswith('.avsc'):
      shutil.copy(os.path.join(SCHEMA_DIR, f), tmp_path / f)
  broken = json.loads((tmp_path / 'RoleAdded.avsc').read_text())
  broken['partition_key'] = 'nope'
  (tmp_path / 'RoleAdded.avsc').write_text(json.dumps(broken))
  with pytest.raises(SchemaError, match='partition_key .nope. is not a field of RoleAdded'):
    Registry(str(tmp_path))


def test_an_event_type_missing_from_the_envelope_union_is_refused(tmp_path):
  for f in os.listdir(SCHEMA_DIR):
    if f.endswith('.avsc'):
      shutil.copy(os.path.join(SCHEMA_DIR, f), tmp_path / f)
  new = json.loads((tmp_path / 'RoleAdded.avsc').read_text())
  new['name'] = 'RoleRevoked'
  (tmp_path / 'RoleRevoked.avsc').write_text(json.dumps(new))
  with pytest.raises(SchemaError, match='lacks event types'):
    Registry(str(tmp_path))
