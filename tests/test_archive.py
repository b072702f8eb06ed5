"""The event archive: round trips (local, S3, GCS), layout, evolution, corrupt files, bad paths."""

import io
import json
import os
import shutil
import subprocess
import sys

import apache_beam as beam
import fastavro
import pytest
from hypothesis import given, settings, strategies as st
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to, is_empty

from tests.demo import DEMO_SCHEMAS, REG  # noqa: F401
from sourcebeam.transforms import storage
from tests.storage_services import free_port
from sourcebeam.transforms.errors import ConfigError
from sourcebeam.pipelines.options import pipeline_options
from sourcebeam.schemas.envelope import make_envelope
from sourcebeam.schemas.registry import Registry
from sourcebeam.transforms.archive import (
    CORRUPT, EVENTS, CorruptArchiveFile, archive_partitions, iter_partition, IncompatibleSchema, ReadArchive, WriteArchive,
    check_archive_path, iter_archive, list_archive_files, read_archive_file, read_manifest,
    scan_archive_files)
from sourcebeam.transforms.archive_format import (
    bucket_of, encode_avro, encode_parquet, hour_of, parse_file_path, read_events, sort_key)

T0 = 1_795_687_200_000  # 2026-11-26T10:00:00Z
HOUR = 3_600_000


def sample_events():
  """A mixed, out-of-order set: several keys and hours, None and set follows_from,
  floats that do not survive a careless text round trip, longs near the limits."""
  events = []
  seq = {}

  def add(event_type, data, t, follows_from=None):
    from sourcebeam.schemas import registry
    key = REG.get(event_type).key_of(data)
    seq[key] = seq.get(key, 0) + 1
    events.append(make_envelope(REG, 
        event_type, data, event_id=f'ev-{len(events):04d}', sequence=seq[key], event_time=t,
        origin='test/archive', follows_from=follows_from))

  for i in range(60):
    user = f'user-{i % 9}'
    add('CartItemAdded', {'user_id': user, 'product_id': f'p-{i % 5}', 'quantity': i + 1},
        T0 + (i * 180_001) % (3 * HOUR))
    if i % 4 == 0:
      add('CartItemRemoved', {'user_id': user, 'product_id': f'p-{i % 5}', 'quantity': 1},
          T0 + (i * 180_001) % (3 * HOUR) + 1, follows_from=events[-1]['event_id'])
  add('ProductCreated', {'product_id': 'p-ü', 'brand': 'Brånd', 'name': 'naïve ☃', 'description': '',
                         'category': 'shoes'}, T0 + 5)
  add('FarePaid', {'rideId': 2**63 - 1, 'taxiId': -(2**63), 'driverId': 7, 'startTime': T0,
                   'paymentType': 'CARD', 'tip': 0.1, 'tolls': 1e-300, 'totalFare': 1 / 3}, T0 + 9)
  add('RideStarted', {'rideId': 2**40 + 3, 'isStart': True, 'eventTime': T0 + HOUR, 'startLon': -73.99,
                      'startLat': 40.75, 'endLon': 0.0, 'endLat': -0.0, 'passengerCnt': 2,
                      'taxiId': 2**33, 'driverId': 2**33 + 1}, T0 + HOUR)
  events.reverse()  # the writer must sort, not rely on input order
  return events


@pytest.fixture(scope='module')
def events():
  return sample_events()


def write(path, events, *, fmt='avro', buckets=4, beam_args=(), **kwargs):
  """Run WriteArchive in a TestPipeline; returns the file records it emitted."""
  files = []
  with TestPipeline(options=pipeline_options(list(beam_args))) as p:
    out = p | beam.Create(events) | WriteArchive(path, format=fmt, buckets=buckets, **dict({"registry": REG}, **kwargs))
    assert_that(out | beam.Map(lambda f: f['events']) | beam.CombineGlobally(sum),
                equal_to([len(events)]))
  storage.use_storage_options(list(beam_args))
  for f in list_archive_files(path):
    files.append(f)
  return files


def read_with_beam(path, expected_events, expected_corrupt_paths=(), beam_args=(), **kwargs):
  with TestPipeline(options=pipeline_options(list(beam_args))) as p:
    result = p | ReadArchive(path, **dict({"registry": REG}, **kwargs))
    assert_that(result[EVENTS], equal_to(expected_events), label='events')
    if expected_corrupt_paths:
      assert_that(result[CORRUPT] | beam.Map(lambda c: c['path']),
                  equal_to(list(expected_corrupt_paths)), label='corrupt_paths')
      assert_that(result[CORRUPT] | beam.Filter(lambda c: not c['reason'] or '\n' in c['reason']),
                  is_empty(), label='one_line_reasons')
    else:
      assert_that(result[CORRUPT], is_empty(), label='no_corrupt')


@pytest.mark.parametrize('fmt', ['avro', 'parquet'])
def test_local_round_trip_is_exact(tmp_path, events, fmt):
  path = str(tmp_path / 'archive')
  write(path, events, fmt=fmt)
  read_with_beam(path, events)
  got = list(iter_archive(path, REG))
  assert sorted(got, key=sort_key) == sorted(events, key=sort_key)
  fare = next(e for e in got if e['event_type'] == 'FarePaid')
  assert fare['data']['rideId'] == 2**63 - 1 and fare['data']['taxiId'] == -(2**63)
  assert fare['data']['tip'] == 0.1 and fare['data']['tolls'] == 1e-300
  assert fare['data']['totalFare'] == 1 / 3 and fare['follows_from'] is None
  assert all(type(e['data']['quantity']) is int for e in got if 'quantity' in e['data'])


@pytest.mark.parametrize('fmt', ['avro', 'parquet'])
def test_layout_is_hour_and_bucket_with_files_sorted_by_key_and_sequence(tmp_path, events, fmt):
  path = str(tmp_path / 'archive')
  files = write(path, events, fmt=fmt, buckets=4)
  assert read_manifest(path)['format'] == fmt and read_manifest(path)['buckets'] == 4
  manifest = json.loads((tmp_path / 'archive' / '_archive.json').read_text())
  assert manifest['layout_version'] == 1
  hours = {f.hour for f in files}
  assert hours == {hour_of(e['event_time']) for e in events} and len(hours) == 3
  assert all(os.path.basename(os.path.dirname(f.path)) == f'bucket={f.bucket:03d}' for f in files)
  buckets_of_key = {}
  total = 0
  for f in files:
    got = read_archive_file(f.path, REG)
    total += len(got)
    assert got == sorted(got, key=sort_key), f'{f.path} is not sorted by (key, sequence)'
    for e in got:
      assert hour_of(e['event_time']) == f.hour
      assert bucket_of(e['partition_key'], 4) == f.bucket
      buckets_of_key.setdefault(e['partition_key'], set()).add(f.bucket)
  assert total == len(events)
  assert all(len(b) == 1 for b in buckets_of_key.values())
  assert not [n for n in os.listdir(os.path.dirname(files[0].path)) if n.startswith('.tmp')]


@pytest.mark.integration  # fresh interpreters (other hash seeds) are the point
def test_bucket_is_stable_across_processes():
  code = 'from transforms.archive_format import bucket_of; print([bucket_of(f"k{i}", 16) for i in range(50)])'
  outs = set()
  for seed in ('1', '2'):
    env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=os.getcwd())
    outs.add(subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                            text=True, check=True).stdout)
  assert len(outs) == 1 and len(set(json.loads(outs.pop()))) > 8


def test_avro_files_carry_partition_metadata_and_split_big_groups(tmp_path, events):
  path = str(tmp_path / 'archive')
  carts = [e for e in events if e['partition_key'] == 'user-0']
  files = write(path, carts, buckets=1, max_events_per_file=3, run_id='r1')
  hour_files = [f for f in files if f.hour == hour_of(T0)]
  assert len(hour_files) > 1
  names = [os.path.basename(f.path) for f in hour_files]
  assert names[0] == 'events-r1-0000.avro'
  with open(hour_files[0].path, 'rb') as fo:
    meta = fastavro.reader(fo).metadata
  assert meta['sourcebeam.hour'] == hour_of(T0) and meta['sourcebeam.bucket'] == '0'
  assert meta['sourcebeam.sorted_by'] == 'partition_key,sequence,event_id'
  chained = [e for f in hour_files for e in read_archive_file(f.path, REG)]
  assert chained == sorted(chained, key=sort_key)  # chunks are consecutive slices


def test_rerun_with_same_run_id_rewrites_identical_files_and_new_runs_add_files(tmp_path, events):
  path = str(tmp_path / 'archive')
  first = write(path, events, run_id='run1')
  before = {f.path: open(f.path, 'rb').read() for f in first}
  again = write(path, events, run_id='run1')  # what a retry does: same names, same bytes
  assert {f.path: open(f.path, 'rb').read() for f in again} == before
  both = write(path, events[:10])  # a second run with a fresh id
  assert len(both) > len(first) and set(before) <= {f.path for f in both}
  assert sorted(iter_archive(path, REG), key=sort_key) == sorted(events + events[:10], key=sort_key)
  merged = []
  for (hour, bucket), part_files in archive_partitions(path).items():
    part = list(iter_partition(part_files, REG))
    assert part == sorted(part, key=sort_key)  # one merge keeps (key, sequence) order across runs
    assert {(hour_of(e['event_time']), bucket_of(e['partition_key'], 4)) for e in part} == {(hour, bucket)}
    merged.extend(part)
  assert len(merged) == len(events) + 10


def test_windowed_input_gets_files_per_window(tmp_path, events):
  """What a live stream does: window first; each window's files are named by its start."""
  path = str(tmp_path / 'archive')
  with TestPipeline() as p:
    _ = (p | beam.Create(events)
         | beam.Map(lambda e: beam.window.TimestampedValue(e, e['event_time'] / 1000))
         | beam.WindowInto(beam.window.FixedWindows(30 * 60))
         | WriteArchive(path, buckets=2, run_id='live', registry=REG))
  files = list_archive_files(path)
  starts = {os.path.basename(f.path).split('-')[2] for f in files}
  assert len(starts) == 6 and all(s.startswith('w') for s in starts)
  assert sorted(iter_archive(path, REG), key=sort_key) == sorted(events, key=sort_key)


def test_writer_refuses_an_archive_with_another_layout(tmp_path, events):
  path = str(tmp_path / 'archive')
  write(path, events[:5], buckets=4)
  with pytest.raises(ConfigError, match='4 buckets'):
    with TestPipeline() as p:
      _ = p | beam.Create(events[:5]) | WriteArchive(path, buckets=8, registry=REG)
  with pytest.raises(ConfigError, match='avro'):
    with TestPipeline() as p:
      _ = p | beam.Create(events[:5]) | WriteArchive(path, format='parquet', buckets=4, registry=REG)
  with pytest.raises(ValueError, match='format'):
    WriteArchive(path, format='csv', registry=REG)


@pytest.mark.parametrize('fmt', ['avro', 'parquet'])
def test_writer_refuses_envelopes_it_cannot_store_exactly(tmp_path, events, fmt):
  """Published envelopes always fit; one that does not is a bug upstream, named, not dropped."""
  bad = dict(events[0], event_id='ev-bad', data=dict(events[0]['data'], surprise=1))
  with pytest.raises(Exception, match=r"ev-bad.*surprise"):
    with TestPipeline() as p:
      _ = p | beam.Create(events[:3] + [bad]) | WriteArchive(str(tmp_path / 'a'), format=fmt, registry=REG)


def test_empty_input_writes_an_empty_readable_archive(tmp_path):
  path = str(tmp_path / 'archive')
  assert write(path, []) == []
  read_with_beam(path, [])
  assert list(iter_archive(path, REG)) == []


_longs = st.integers(-(2**63), 2**63 - 1)
_doubles = st.floats(allow_nan=False, width=64)
_text = st.text(st.characters(blacklist_categories=('Cs',)), max_size=20)


@st.composite
def envelopes(draw):
  """Any valid envelope of the types with the widest value ranges."""
  kind = draw(st.sampled_from(['FarePaid', 'RideStarted', 'ProductCreated']))
  if kind == 'FarePaid':
    data = {'rideId': draw(_longs), 'taxiId': draw(_longs), 'driverId': draw(_longs),
            'startTime': draw(_longs), 'paymentType': draw(_text), 'tip': draw(_doubles),
            'tolls': draw(_doubles), 'totalFare': draw(_doubles)}
  elif kind == 'RideStarted':
    data = {'rideId': draw(_longs), 'isStart': draw(st.booleans()), 'eventTime': draw(_longs),
            'startLon': draw(_doubles), 'startLat': draw(_doubles), 'endLon': draw(_doubles),
            'endLat': draw(_doubles), 'passengerCnt': draw(st.integers(-(2**31), 2**31 - 1)),
            'taxiId': draw(_longs), 'driverId': draw(_longs)}
  else:
    data = {f: draw(_text) for f in ('product_id', 'brand', 'name', 'description', 'category')}
  return make_envelope(REG, kind, data, event_id=draw(_text), sequence=draw(st.integers(1, 2**63 - 1)),
                       event_time=draw(_longs), origin=draw(_text),
                       follows_from=draw(st.none() | _text))


@settings(max_examples=60, deadline=None)
@given(st.lists(envelopes(), max_size=8))
def test_file_formats_round_trip_any_valid_envelope_exactly(batch):
  from sourcebeam.schemas import registry
  reg = REG
  batch = sorted(batch, key=sort_key)
  for fmt, blob in (('avro', encode_avro(batch, reg, name='x')), ('parquet', encode_parquet(batch, reg))):
    got = read_events(io.BytesIO(blob), fmt, reg, f'x.{fmt}')
    assert got == batch and repr(got) == repr(batch)  # repr: -0.0 and 0.0 differ too
  # a retried write produces the same bytes (no timestamps or random sync markers)
  assert encode_parquet(batch, reg) == encode_parquet(batch, reg)
  assert encode_avro(batch, reg, name='x') == encode_avro(batch, reg, name='x')


# ---------------------------------------------------------------------------
# Bad paths and corrupt files


def test_missing_archive_is_a_clear_usage_error(tmp_path):
  missing = str(tmp_path / 'nope')
  with pytest.raises(ConfigError, match='does not exist'):
    check_archive_path(missing)
  with pytest.raises(ConfigError, match='does not exist'):
    list(iter_archive(missing, REG))
  with pytest.raises(ConfigError, match='does not exist'):
    with TestPipeline() as p:
      _ = p | ReadArchive(missing, registry=REG)
  (tmp_path / 'notarchive').mkdir()
  with pytest.raises(ConfigError, match='not a Sourcebeam archive'):
    check_archive_path(str(tmp_path / 'notarchive'))
  (tmp_path / 'notarchive' / '_archive.json').write_text('{"hello": 1}')
  with pytest.raises(ConfigError, match='not a Sourcebeam archive'):
    check_archive_path(str(tmp_path / 'notarchive'))


@pytest.mark.parametrize('fmt', ['avro', 'parquet'])
def test_corrupt_files_are_reported_with_path_and_reason(tmp_path, events, fmt):
  path = str(tmp_path / 'archive')
  files = write(path, events, fmt=fmt, buckets=4)
  by_size = sorted(files, key=lambda f: os.path.getsize(f.path), reverse=True)
  truncated, garbage, empty = by_size[0].path, by_size[1].path, by_size[2].path
  with open(truncated, 'rb') as f:
    blob = f.read()
  with open(truncated, 'wb') as f:
    f.write(blob[:len(blob) * 2 // 3])
  with open(garbage, 'wb') as f:
    f.write(os.urandom(3000))
  open(empty, 'wb').close()
  bad = {truncated, garbage, empty}
  good_events = [e for f in files if f.path not in bad for e in read_archive_file(f.path, REG)]
  assert 0 < len(good_events) < len(events)
  read_with_beam(path, good_events, expected_corrupt_paths=sorted(bad))
  reasons = {}
  for p in bad:
    with pytest.raises(CorruptArchiveFile) as err:
      read_archive_file(p, REG)
    assert err.value.path == p and '\n' not in str(err.value)
    reasons[p] = err.value.reason
  assert 'empty file' in reasons[empty]
  assert fmt in reasons[garbage].lower() or 'magic' in reasons[garbage]


# ---------------------------------------------------------------------------
# Schema evolution


def schema_dir(tmp_path, name, edit=None):
  """A copy of the project's schemas, with CartItemAdded changed by ``edit``."""
  d = tmp_path / name
  d.mkdir()
  for f in os.listdir(DEMO_SCHEMAS):
    if f.endswith('.avsc'):
      shutil.copy(os.path.join(DEMO_SCHEMAS, f), d / f)
  if edit:
    schema = json.loads((d / 'CartItemAdded.avsc').read_text())
    edit(schema)
    (d / 'CartItemAdded.avsc').write_text(json.dumps(schema))
  return str(d)


def add_field(field):
  def edit(schema):
    schema['version'] = 2
    schema['fields'].append(field)
  return edit


def change_type(schema):
  schema['version'] = 2
  next(f for f in schema['fields'] if f['name'] == 'quantity')['type'] = 'string'


@pytest.fixture(scope='module')
def v1_archives(tmp_path_factory, events):
  """An Avro and a Parquet archive written with CartItemAdded v1 (read-only for tests)."""
  base = tmp_path_factory.mktemp('v1')
  v1 = Registry(schema_dir(base, 'v1'))
  paths = {}
  for fmt in ('avro', 'parquet'):
    paths[fmt] = str(base / f'archive-{fmt}')
    write(paths[fmt], events, fmt=fmt, registry=v1)
  return paths


@pytest.mark.parametrize('fmt', ['avro', 'parquet'])
def test_newer_compatible_schema_reads_older_archive(tmp_path, events, v1_archives, fmt):
  v2 = Registry(schema_dir(tmp_path, 'v2', add_field(
      {'name': 'coupon', 'type': ['null', 'string'], 'default': None})))
  expected = []
  for e in events:
    e = dict(e, data=dict(e['data']))
    if e['event_type'] == 'CartItemAdded':
      e['data']['coupon'] = None
    expected.append(e)
  assert sorted(iter_archive(v1_archives[fmt], registry=v2), key=sort_key) == sorted(
      expected, key=sort_key)
  read_with_beam(v1_archives[fmt], expected, registry=v2)


@pytest.mark.parametrize('fmt', ['avro', 'parquet'])
@pytest.mark.parametrize('change,words', [
    (add_field({'name': 'coupon', 'type': 'string'}), ['CartItemAdded', "'coupon'", 'no default']),
    (change_type, ['CartItemAdded', "'quantity'", 'int to string'])])
def test_incompatible_schema_is_refused_naming_type_and_field(tmp_path, events, v1_archives, fmt,
                                                              change, words):
  v2 = Registry(schema_dir(tmp_path, 'v2', change))
  with pytest.raises(IncompatibleSchema) as err:
    list(iter_archive(v1_archives[fmt], registry=v2))
  for w in words:
    assert w in str(err.value)
  files = [f.path for f in list_archive_files(v1_archives[fmt])]
  with TestPipeline() as p:
    result = p | ReadArchive(v1_archives[fmt], registry=v2)
    assert_that(result[EVENTS], is_empty(), label='no_events')
    assert_that(result[CORRUPT] | beam.Map(lambda c: (c['path'], all(w in c['reason'] for w in words))),
                equal_to([(f, True) for f in files]), label='refused')


def fewer_types(tmp_path, keep):
  """A registry of the demo's schemas with only the event types ``keep``."""
  d = tmp_path / 'fewer'
  d.mkdir()
  for name in keep:
    shutil.copy(os.path.join(DEMO_SCHEMAS, f'{name}.avsc'), d / f'{name}.avsc')
  return Registry(str(d))


@pytest.mark.parametrize('fmt', ['avro', 'parquet'])
def test_a_reader_with_fewer_types_counts_and_skips_the_others(tmp_path, events, v1_archives, fmt):
  """An archive written by an app with more event types is read, not refused as corrupt:
  the events of types the reader knows come out, the others are counted and skipped."""
  keep = ['CartItemAdded', 'CartItemRemoved', 'ProductViewed']
  reader = fewer_types(tmp_path, keep)
  wanted = [e for e in events if e['event_type'] in keep]
  others = [e for e in events if e['event_type'] not in keep]
  assert wanted and others
  assert sorted(iter_archive(v1_archives[fmt], reader), key=sort_key) == sorted(wanted, key=sort_key)
  with TestPipeline() as p:
    result = p | ReadArchive(v1_archives[fmt], registry=reader)
    assert_that(result[EVENTS], equal_to(wanted), label='known')
    assert_that(result[CORRUPT], is_empty(), label='nothing_corrupt')
    assert_that(result['unknown_type'], equal_to([e['event_type'] for e in others]), label='unknown')


@pytest.mark.parametrize('fmt', ['avro', 'parquet'])
def test_a_reader_with_more_types_reads_an_older_archive(tmp_path, events, fmt):
  """The other way round: an app that added event types reads what it wrote before."""
  keep = sorted({e['event_type'] for e in events})
  older = fewer_types(tmp_path, keep)
  path = str(tmp_path / 'older')
  write(path, events, fmt=fmt, registry=older)
  assert sorted(iter_archive(path, REG), key=sort_key) == sorted(events, key=sort_key)


# ---------------------------------------------------------------------------
# S3 (moto's server) and GCS (gcp-storage-emulator): real HTTP, real protocols


@pytest.mark.integration
@pytest.mark.parametrize('fmt', ['avro', 'parquet'])
def test_s3_round_trip(s3_service, events, fmt):
  path = s3_service.fresh_prefix(f'archive-{fmt}')
  files = write(path, events, fmt=fmt, buckets=2, beam_args=s3_service.beam_args)
  assert files and all(f.path.startswith(f's3://{s3_service.bucket}/') for f in files)
  read_with_beam(path, events, beam_args=s3_service.beam_args)
  assert sorted(iter_archive(path, REG), key=sort_key) == sorted(events, key=sort_key)
  import boto3  # the objects are really in the S3 server, under the layout's keys
  client = boto3.client('s3', endpoint_url=s3_service.endpoint)
  keys = [o['Key'] for o in client.list_objects_v2(
      Bucket=s3_service.bucket, Prefix=path.split('/', 3)[3])['Contents']]
  assert any(k.endswith('/_archive.json') for k in keys)
  assert sum(parse_file_path(k) is not None for k in keys) == len(files)


@pytest.mark.integration
@pytest.mark.parametrize('fmt', ['avro', 'parquet'])
def test_gcs_round_trip(gcs_service, events, fmt):
  path = gcs_service.fresh_prefix(f'archive-{fmt}')
  files = write(path, events, fmt=fmt, buckets=2, beam_args=gcs_service.beam_args)
  assert files and all(f.path.startswith(f'gs://{gcs_service.bucket}/') for f in files)
  read_with_beam(path, events, beam_args=gcs_service.beam_args)
  assert sorted(iter_archive(path, REG), key=sort_key) == sorted(events, key=sort_key)
  from google.cloud import storage as gcs
  blobs = [b.name for b in gcs.Client.create_anonymous_client().list_blobs(
      gcs_service.bucket, prefix=path.split('/', 3)[3])]
  assert sum(parse_file_path(b) is not None for b in blobs) == len(files)


@pytest.mark.integration
def test_a_fresh_process_finds_cloud_archives_from_the_environment_alone(s3_service, gcs_service,
                                                                          events):
  """What the CLI does: no options set by hand, only SOURCEBEAM_S3_ENDPOINT / STORAGE_EMULATOR_HOST."""
  paths = [s3_service.fresh_prefix('env'), gcs_service.fresh_prefix('env')]
  for path in paths:
    write(path, events[:20], buckets=1)
  code = ('import sys; from transforms.archive import iter_archive; from tests.demo import REG; '
          'print([len(list(iter_archive(p, REG))) for p in sys.argv[1:]])')
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  env.pop('GOOGLE_APPLICATION_CREDENTIALS')  # pipelines.storage supplies it for the emulator
  out = subprocess.run([sys.executable, '-c', code, *paths], env=env, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == '[20, 20]'


@pytest.mark.integration
def test_missing_cloud_archive_or_bucket_is_a_usage_error(s3_service, gcs_service):
  storage.use_storage_options()
  for service in (s3_service, gcs_service):
    with pytest.raises(ConfigError, match='archive .* does not exist'):
      check_archive_path(service.url('no-such-archive'))
    with pytest.raises(ConfigError, match='bucket no-such-bucket does not exist'):
      check_archive_path(f'{service.scheme}://no-such-bucket/archive')
    with pytest.raises(ConfigError, match='bucket no-such-bucket does not exist'):
      with TestPipeline(options=pipeline_options([])) as p:
        _ = p | beam.Create([]) | WriteArchive(f'{service.scheme}://no-such-bucket/archive', registry=REG)


def isolate_env(monkeypatch, *names):
  """Unset ``names`` for this test and restore them (set or unset) afterwards."""
  for name in names:
    monkeypatch.setenv(name, '')
    monkeypatch.delenv(name)


GCP_ENV = ('GOOGLE_APPLICATION_CREDENTIALS', 'GOOGLE_CLOUD_PROJECT', 'STORAGE_EMULATOR_HOST')


def test_unreachable_storage_fails_at_once_with_one_line(monkeypatch):
  """Beam's own clients would retry for minutes; the preflight says what is wrong."""
  isolate_env(monkeypatch, *GCP_ENV)
  closed = f'http://127.0.0.1:{free_port()}'
  monkeypatch.setenv('AWS_ACCESS_KEY_ID', 'x')
  monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'y')
  with pytest.raises(ConfigError, match='cannot reach S3') as err:
    storage.preflight('s3://b/archive', pipeline_options([f'--s3_endpoint_url={closed}']))
  assert '\n' not in str(err.value)
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', closed)
  with pytest.raises(ConfigError, match='cannot reach the GCS emulator'):
    storage.preflight('gs://b/archive')
  for name in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_PROFILE'):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('AWS_SHARED_CREDENTIALS_FILE', '/nonexistent/credentials')
  monkeypatch.setenv('AWS_CONFIG_FILE', '/nonexistent/config')
  monkeypatch.setenv('AWS_EC2_METADATA_DISABLED', 'true')
  with pytest.raises(ConfigError, match='no AWS credentials'):
    storage.preflight('s3://b/archive', pipeline_options([f'--s3_endpoint_url={closed}']))
  storage.preflight('/local/paths/need/no/preflight')


# ---------------------------------------------------------------------------
# Storage options from the environment


def test_storage_args_come_from_the_environment(monkeypatch):
  isolate_env(monkeypatch, 'SOURCEBEAM_S3_ENDPOINT', 'AWS_REGION', 'AWS_DEFAULT_REGION', *GCP_ENV)
  assert storage.storage_args(['--runner=DirectRunner']) == ['--runner=DirectRunner']
  monkeypatch.setenv('SOURCEBEAM_S3_ENDPOINT', 'http://127.0.0.1:9')
  monkeypatch.setenv('AWS_REGION', 'eu-west-1')
  monkeypatch.setenv('AWS_SECRET_ACCESS_KEY', 'not-in-the-options')
  args = storage.storage_args(['--s3_region_name=us-east-2'])
  assert '--s3_endpoint_url=http://127.0.0.1:9' in args
  assert '--s3_region_name=us-east-2' in args and '--s3_region_name=eu-west-1' not in args
  assert not any('not-in-the-options' in a for a in args)
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', 'http://127.0.0.1:9')
  args = storage.storage_args([])
  assert '--project=sourcebeam-local' in args and storage.storage_args(args) == args
  with open(os.environ['GOOGLE_APPLICATION_CREDENTIALS']) as f:
    assert json.load(f)['type'] == 'authorized_user'


def test_avro_writer_schema_differing_only_in_key_order_takes_the_direct_decode(events):
  """fastavro writes the schema's keys in the order of the dict it was given, so files
  from another process can differ byte-wise from the reader's own header: they are
  still the same schema and must skip Avro schema resolution (about 3x slower)."""
  from sourcebeam.transforms.archive_format import _is_own_writer_schema, _own_writer_schema, decode_avro

  def reorder(node):
    if isinstance(node, dict):
      return {k: reorder(node[k]) for k in reversed(list(node))}
    if isinstance(node, list):
      return [reorder(x) for x in node]
    return node

  reg = REG
  own = _own_writer_schema(reg)
  shuffled = json.dumps(reorder(json.loads(own)))
  assert shuffled != own
  assert _is_own_writer_schema(shuffled, reg)
  changed = json.loads(own)
  changed['fields'] = changed['fields'][:-1]
  assert not _is_own_writer_schema(json.dumps(changed), reg)
  blob = encode_avro(events, reg, name='x')
  patched = blob.replace(own.encode(), shuffled.encode())  # same length: keys reordered only
  assert patched != blob and len(patched) == len(blob)
  assert decode_avro(patched, reg, 'x.avro') == decode_avro(blob, reg, 'x.avro')


# ---------------------------------------------------------------------------
# Files that disagree with the manifest or the layout are reported, never skipped (issue 15, 3)


def _run_main(capsys, *argv):
  from tests.cli import run_cli
  return run_cli(*argv)


def _set_manifest_format(path, fmt):
  manifest_path = os.path.join(path, '_archive.json')
  with open(manifest_path) as f:
    manifest = json.load(f)
  manifest['format'] = fmt
  with open(manifest_path, 'w') as f:
    json.dump(manifest, f)


@pytest.mark.cli
def test_a_manifest_naming_the_wrong_format_reports_every_file(tmp_path, events, capsys):
  """`"format": "parquet"` in an Avro archive's manifest: replay exit 0 with 0 events before."""
  path = str(tmp_path / 'archive')
  files = write(path, events, fmt='avro')
  _set_manifest_format(path, 'parquet')
  found, misfits = scan_archive_files(path)
  assert found == [] and [m['path'] for m in misfits] == sorted(f.path for f in files)
  assert all(m['reason'] == (
      'the file is Avro but the archive manifest (_archive.json) says "format": "parquet", '
      'so it was not read: the manifest and the files disagree') for m in misfits)
  with pytest.raises(CorruptArchiveFile, match='says "format": "parquet"'):
    list(iter_archive(path, REG))
  read_with_beam(path, [], expected_corrupt_paths=sorted(f.path for f in files))

  code, _, err = _run_main(capsys, 'replay', '--archive', path, '--out', str(tmp_path / 'r'))
  assert code == 1
  assert f'error: corrupt archive file {files[0].path}: the file is Avro but the archive ' \
         'manifest (_archive.json) says "format": "parquet"' in err
  summary = json.loads((tmp_path / 'r' / 'summary.json').read_text())
  assert sorted(c['path'] for c in summary['corrupt_files']) == sorted(f.path for f in files)
  code, _, err = _run_main(capsys, 'keys', '--archive', path)
  assert code == 1 and 'says "format": "parquet"' in err


@pytest.mark.cli
def test_a_data_file_with_an_unexpected_name_is_reported_not_skipped(tmp_path, events, capsys):
  """A valid `random-name.avro` in a bucket folder was skipped: its events missing, exit 0."""
  path = str(tmp_path / 'archive')
  files = write(path, events, fmt='avro')
  victim = files[0]
  renamed = os.path.join(os.path.dirname(victim.path), 'random-name.avro')
  os.rename(victim.path, renamed)
  hidden = os.path.join(os.path.dirname(files[1].path), '.tmp-0123-events-x-0000.avro')
  shutil.copy(files[1].path, hidden)  # a writer's temporary: not a data file, not reported
  reason = ("file name 'random-name.avro' does not fit the archive layout "
            "(events-<run id>-<chunk>.avro); it holds Avro data: not read")
  found, misfits = scan_archive_files(path)
  assert misfits == [{'path': renamed, 'reason': reason}]
  assert len(found) == len(files) - 1
  with pytest.raises(CorruptArchiveFile, match='does not fit the archive layout'):
    list_archive_files(path)
  kept = [e for f in files[1:] for e in read_archive_file(f.path, REG)]
  read_with_beam(path, kept, expected_corrupt_paths=[renamed])

  code, _, err = _run_main(capsys, 'replay', '--archive', path, '--out', str(tmp_path / 'r'))
  assert code == 1
  assert f'error: corrupt archive file {renamed}: {reason}' in err
  assert err.strip().splitlines()[-1].startswith('error: 1 archive file(s) not read')
  summary = json.loads((tmp_path / 'r' / 'summary.json').read_text())
  assert summary['corrupt_files'] == [{'path': renamed, 'reason': reason}]
  assert summary['events'] == len(kept)


def test_layout_problem_names_what_a_file_is_and_what_the_manifest_says():
  from sourcebeam.transforms.archive_format import layout_problem
  d = 'gs://b/a/hour=2026-11-26T10/bucket=001/'
  assert layout_problem(d + 'events-r-0000.avro', 'avro') is None
  assert layout_problem(d + '.tmp-9-events-r-0000.avro', 'avro') is None  # the writer's temporary
  assert layout_problem(d, 'avro') is None  # an object store's folder marker
  assert layout_problem(d + 'events-r-0000.parquet', 'avro', b'PAR1') == (
      'the file is Parquet but the archive manifest (_archive.json) says "format": "avro", '
      'so it was not read: the manifest and the files disagree')
  assert 'the file is Avro (by its name)' in layout_problem(d + 'x.avro', 'parquet', None)
  assert layout_problem(d + 'events-r-0000.parquet', 'avro', b'Obj\x01') == (
      "file name 'events-r-0000.parquet' does not fit the archive layout "
      "(events-<run id>-<chunk>.avro); it holds Avro data: not read")
  assert layout_problem(d + 'notes.txt', 'parquet', b'hell') == (
      "file name 'notes.txt' does not fit the archive layout (events-<run id>-<chunk>.parquet): "
      'not read')


def test_hour_of_and_millis_to_iso_are_their_uncached_selves():
  import datetime
  from sourcebeam.schemas.envelope import millis_to_iso
  from sourcebeam.transforms.archive_format import hour_of
  epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
  for t in [0, 999, 1000, 946_684_800_000, 1_795_651_200_500, 1_795_654_799_999,
            1_795_654_800_000, 4_102_444_799_999] + list(range(1_795_651_199_000, 1_795_651_201_001, 7)):
    dt = epoch + datetime.timedelta(milliseconds=t)
    for _ in range(2):  # computed, then cached
      assert hour_of(t) == dt.strftime('%Y-%m-%dT%H')
      assert millis_to_iso(t) == dt.strftime('%Y-%m-%dT%H:%M:%S.') + f'{dt.microsecond // 1000:03d}Z'
