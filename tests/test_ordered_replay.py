"""The ordered archive replay: same results as ReadArchive | ApplyApp, without a shuffle of events."""

import copy
import gc
import json
import random
import shutil
import weakref

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.demo import DEMO_APP, DEMO_SCHEMAS, REG
from sourcebeam.generators import retail, taxi
from sourcebeam.pipelines.options import pipeline_options
from sourcebeam.schemas.envelope import iso_to_millis
from sourcebeam.schemas.registry import Registry
from sourcebeam.transforms.archive import ReadArchive, WriteArchive, list_archive_files
from sourcebeam.transforms.archive_format import CorruptArchiveFile, encode_avro
from sourcebeam.transforms.consumers import ApplyApp, ReplayApp, WriteAppOutputs, key_space_handlers
from sourcebeam.transforms.keyspace import ViewChange
from sourcebeam.transforms.ordered_replay import (CORRUPT, OUTPUTS, PASSTHROUGH, STATS, UNPROCESSED,
                                                  BucketReplay, KeySpace, OrderedArchiveReplay,
                                                  check_placement, read_checked_file, replay_bucket)
from sourcebeam.transforms.ordering_core import Orderer, batch_order, process_key


def demo_key_spaces():
  """The demo app's views as key spaces: what ReplayApp runs."""
  return key_space_handlers(DEMO_APP)

HOUR = 3_600_000


def envelopes(n, seed=3, rate=0.1):
  """Generated retail envelopes at ``rate`` events/s (so a few hours), event_time in millis."""
  out = []
  for t, env in retail.timed_retail_events(n, seed, phases=[retail.phases_mod.constant(rate, n / rate)]):
    env['event_time'] = t
    env['raw_sequence'] = None  # as published envelopes have it (and the archive gives it back)
    out.append(env)
  return out


def messy_archive_input(n=1500, seed=3):
  """What real archives hold: re-delivered copies, lost events (gaps), an event below
  the first sequence, sequences whose event time runs backwards across an hour,
  and events no retail view uses (taxi rides and fares)."""
  rng = random.Random(seed)
  events = envelopes(n, seed)
  kept = [e for i, e in enumerate(events) if i < 50 or rng.random() > 0.01]   # ~1% lost: gaps
  dups = [copy.deepcopy(e) for e in rng.sample(kept, 25)]                       # re-delivered
  # A late writer: some events stamped an hour earlier than their key's previous event,
  # so a key's sequence order and the archive's hour order disagree.
  for e in rng.sample(kept[100:], 15):
    e['event_time'] = max(e['event_time'] - HOUR, events[0]['event_time'])
  zero = copy.deepcopy(kept[200])
  zero['event_id'] = 'seq-zero'
  zero['sequence'] = 0
  rides = []
  for env in taxi.taxi_envelopes(15, seed):
    if isinstance(env['event_time'], str):
      env['event_time'] = iso_to_millis(env['event_time'])
    env['event_time'] = events[0]['event_time'] + (env['event_time'] % (2 * HOUR))
    env['raw_sequence'] = None
    rides.append(env)
  everything = kept + dups + [zero] + rides
  rng.shuffle(everything)
  return everything


def write_archive(path, events, fmt='avro', buckets=4, runs=2, max_events_per_file=150):
  """Written by ``runs`` separate runs (so partitions hold several files to merge)."""
  per_run = [events[i::runs] for i in range(runs)]
  for part in per_run:
    with TestPipeline(options=pipeline_options([])) as p:
      _ = p | beam.Create(part) | WriteArchive(path, format=fmt, buckets=buckets,
                                               max_events_per_file=max_events_per_file, registry=REG)


@pytest.fixture(scope='module', params=['avro', 'parquet'])
def archive(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(f'archive-{request.param}') / 'a')
  events = messy_archive_input()
  write_archive(path, events, fmt=request.param)
  return path, events


def _canon(records):
  return sorted(json.dumps(r, sort_keys=True, default=str) for r in records)


def written(tmp_path, name, build):
  """Every output file ``build(p)``'s AppResult gives, as sorted lines: {relative path: lines}."""
  import glob
  import os
  out = str(tmp_path / name)
  with TestPipeline(options=pipeline_options([])) as p:
    _ = build(p) | WriteAppOutputs(DEMO_APP, out)
  files = glob.glob(f'{out}/**/*.jsonl', recursive=True)
  return {os.path.relpath(f, out): sorted(open(f).read().splitlines()) for f in files}


@pytest.fixture(scope='module')
def reference_outputs(archive, tmp_path_factory):
  """Every consumer of the demo app applied to ReadArchive's events (the PCollection path,
  ProcessInOrder per key space): what each fast path must write, built once per archive."""
  return written(tmp_path_factory.mktemp('reference'), 'ref',
                 lambda p: (p | ReadArchive(archive[0], registry=REG))['events']
                 | ApplyApp(DEMO_APP))


def test_replay_app_writes_what_apply_app_writes_over_read_archive(archive, reference_outputs,
                                                                   tmp_path):
  """The equivalence: every view, consumer and unprocessed record of the demo app is the
  same, line for line, whether the archive goes through the fast bucket replay or through
  ReadArchive and the PCollection path (ProcessInOrder per key space)."""
  path, events = archive
  fast = written(tmp_path, 'fast', lambda p: (p | ReplayApp(DEMO_APP, path)).result)
  ref = reference_outputs
  assert sorted(fast) == sorted(ref) and len(fast) >= 14
  for name in ref:
    assert fast[name] == ref[name], name
  assert ref['unprocessed.jsonl'] and ref['retail/cart.jsonl'] and ref['taxi/joined.jsonl']


def test_replay_stats_count_every_event(archive):
  path, events = archive
  with TestPipeline(options=pipeline_options([])) as p:
    got = p | ReplayApp(DEMO_APP, path)
    assert_that(got.stats | beam.combiners.ToList(), lambda s: _check_stats(s[0], len(events)))


def _check_stats(stats, n):
  assert sum(s['events'] for s in stats) == n
  # Rides and fares are read by the taxi consumer: claimed. Nothing here is unknown.
  assert sum(s['unclaimed'] for s in stats) == 0 and sum(s['unknown_type'] for s in stats) == 0
  assert all(s['corrupt_files'] == 0 for s in stats)
  assert sum(s['keys_waiting_on_gap'] for s in stats) > 0  # the lost events leave gaps


def latest_changes(pairs):
  """{(consumer, key): state} of the last view change per view and key."""
  out = {}
  for key, change in pairs:
    if type(change) is ViewChange:
      out[(change.consumer, key)] = (change.event['sequence'], change.state)
  return out


def test_plain_python_replay_equals_the_ordering_core_per_key(archive):
  """Without Beam: each key's outputs and reports equal process_key over its sorted events,
  the batch ProcessInOrder path, although the replay feeds events hour by hour."""
  path, events = archive
  files = list_archive_files(path)
  got_out, got_unp = [], []
  for bucket in sorted({f.bucket for f in files}):
    replay = BucketReplay(demo_key_spaces())
    for tag, value in replay_bucket([f for f in files if f.bucket == bucket], replay,
                                    lambda f: read_checked_file(f, REG, 4)):
      assert tag != CORRUPT
      if tag == OUTPUTS:
        got_out.append(value)
      elif tag == UNPROCESSED:
        got_unp.append(value)
  want_out, want_unp = [], []
  for ks in demo_key_spaces():
    orderer = Orderer(ks.handler)
    per_key = {}
    for e in events:
      if e['event_type'] in ks.event_types:
        per_key.setdefault(e['partition_key'], []).append((e['sequence'], e))
    for key, evs in per_key.items():
      _, _, act = process_key(orderer, key, batch_order(evs, 1))
      want_out.extend(act.outputs)
      want_unp.extend(dict(u, key_space=ks.name) for u in act.unprocessed)
  # Without latest_by every output is kept, in sequence order per key: the last per
  # (view, key) is the view.
  assert len(got_out) == len(want_out)
  assert latest_changes(got_out) == latest_changes(want_out)
  assert _canon(got_unp) == _canon(want_unp)
  assert {u['reason'] for u in got_unp} == {'duplicate', 'before_initial'}


def test_every_output_in_sequence_order_without_latest_by(archive):
  path, events = archive
  files = list_archive_files(path)
  replay = BucketReplay(demo_key_spaces())
  outs = [v for t, v in replay_bucket([f for f in files if f.bucket == 1], replay,
                                      lambda f: read_checked_file(f, REG, 4)) if t == OUTPUTS]
  assert outs
  last = {}
  for key, change in outs:
    seq = change.event['sequence']
    assert seq >= last.get((change.consumer, key), 0)
    last[(change.consumer, key)] = seq


def test_a_bucket_is_streamed_hour_by_hour_never_whole(archive):
  """At most one hour's files of the bucket are decoded and alive at any moment."""
  path, _ = archive
  files = [f for f in list_archive_files(path) if f.bucket == 2]
  hours = {f.hour for f in files}
  assert len(hours) >= 3
  refs = []
  max_alive_hours = []

  class Events(list):
    __hash__ = object.__hash__

  def reader(f):
    gc.collect()
    alive = [r() for r in refs if r() is not None]
    max_alive_hours.append(len({ev.hour for ev in alive if ev.hour != f.hour}))
    evs = Events(read_checked_file(f, REG, 4))
    evs.hour = f.hour
    refs.append(weakref.ref(evs))
    return evs

  replay = BucketReplay(demo_key_spaces())
  for _ in replay_bucket(files, replay, reader):
    pass
  assert len(max_alive_hours) == len(files)
  # When a file is opened, no file of another hour is still alive.
  assert max(max_alive_hours) == 0


def test_a_file_breaking_the_layout_is_reported_and_not_applied(tmp_path, archive):
  path, _ = archive
  files = list_archive_files(path)
  f = files[0]
  events = read_checked_file(f, REG, 4)
  wrong_bucket = [dict(e) for e in events]
  wrong_bucket[0]['partition_key'] = next(
      k for k in (f'u-{i:07d}' for i in range(1000))
      if __import__('zlib').crc32(k.encode()) % 4 != f.bucket)
  assert 'bucket' in check_placement(wrong_bucket, f, 4)
  unsorted = list(reversed(events))
  if len({e['partition_key'] for e in events}) > 1:
    assert 'out of order' in check_placement(unsorted, f, 4)
  late = [dict(e) for e in events]
  late[-1]['event_time'] += 2 * HOUR
  assert 'outside hour' in check_placement(late, f, 4)

  copy_path = tmp_path / 'copy'
  shutil.copytree(path, copy_path)
  victim = [g for g in list_archive_files(str(copy_path)) if g.format == 'avro']
  if victim:  # rewrite one Avro file with an event moved to another hour
    v = victim[0]
    evs = read_checked_file(v, REG, 4)
    evs[0] = dict(evs[0], event_time=evs[0]['event_time'] + 5 * HOUR)
    with open(v.path, 'wb') as out:
      out.write(encode_avro(evs, REG))
    with pytest.raises(CorruptArchiveFile, match='outside hour'):
      read_checked_file(v, REG, 4)
    replay = BucketReplay(demo_key_spaces())
    tags = [(t, x) for t, x in replay_bucket([g for g in list_archive_files(str(copy_path))
                                              if g.bucket == v.bucket], replay,
                                             lambda g: read_checked_file(g, REG, 4))]
    corrupt = [x for t, x in tags if t == CORRUPT]
    assert [c['path'] for c in corrupt] == [v.path]
    stats = [x for t, x in tags if t == STATS][0]
    assert stats['corrupt_files'] == 1
    assert stats['events'] == sum(len(read_checked_file(g, REG, 4))
                                  for g in list_archive_files(str(copy_path))
                                  if g.bucket == v.bucket and g.path != v.path)


def test_events_asked_for_by_type_are_passed_on_and_unknown_types_counted(archive, tmp_path):
  path, events = archive
  ride_types = {'RideStarted', 'RideEnded', 'FarePaid'}
  rides = sorted(e['event_id'] for e in events if e['event_type'] in ride_types)
  assert rides
  # A reader that knows only the retail types and the rides: the rest is unknown, not corrupt.
  d = tmp_path / 'schemas'
  d.mkdir()
  retail_types = {e['event_type'] for e in events} - ride_types
  for name in retail_types | ride_types:
    shutil.copy(f'{DEMO_SCHEMAS}/{name}.avsc', d / f'{name}.avsc')
  few = Registry(str(d))
  with TestPipeline(options=pipeline_options([])) as p:
    got = p | OrderedArchiveReplay(path, [], registry=REG, passthrough=ride_types)
    assert_that(got.passthrough | beam.Map(lambda e: e['event_id']), equal_to(rides), label='Rides')
    stats = got.stats | beam.combiners.ToList()
    assert_that(stats, lambda s: _check_counts(s[0], len(events) - len(rides), 0), label='Unclaimed')
  only_rides = Registry.__new__(Registry)
  only_rides.__dict__.update(few.__dict__)
  only_rides.current = {t: few.current[t] for t in ride_types}
  with TestPipeline(options=pipeline_options([])) as p:
    got = p | OrderedArchiveReplay(path, [], registry=only_rides, passthrough=True)
    assert_that(got.passthrough | beam.Map(lambda e: e['event_id']), equal_to(rides), label='Rides')
    stats = got.stats | beam.combiners.ToList()
    assert_that(stats, lambda s: _check_counts(s[0], 0, len(events) - len(rides)), label='Unknown')


def _check_counts(stats, unclaimed, unknown):
  assert sum(s['unclaimed'] for s in stats) == unclaimed
  assert sum(s['unknown_type'] for s in stats) == unknown


def test_general_key_spaces_with_every_output_and_final_status(archive):
  """OrderedArchiveReplay with a handler of one's own, every output kept."""
  path, events = archive

  class CountPerKey:
    def initial_state(self, key):
      return 0

    def apply(self, state, event):
      return state + 1, [(state + 1, event['sequence'])]

  with TestPipeline(options=pipeline_options([])) as p:
    result = p | OrderedArchiveReplay(
        path, [KeySpace('products', frozenset({'ProductCreated', 'ProductImageAdded'}), CountPerKey())],
        registry=REG, final_status=True)
    # The n-th applied event of a key is its sequence n: order kept, no gaps in products here.
    assert_that(result.outputs | beam.Map(lambda kv: kv[1][0] == kv[1][1]) | beam.Distinct(),
                equal_to([True]), label='InOrder')
    n_products = len({e['partition_key'] for e in events
                      if e['event_type'] in ('ProductCreated', 'ProductImageAdded')})
    assert_that(result.status | beam.combiners.Count.Globally(), equal_to([n_products]),
                label='Status')


def test_an_event_type_in_two_key_spaces_is_refused():
  class H:
    def initial_state(self, key):
      return None

    def apply(self, state, event):
      return state, []

  with pytest.raises(ValueError, match='one key space'):
    BucketReplay([KeySpace('a', frozenset({'ProductViewed'}), H()),
                  KeySpace('b', frozenset({'ProductViewed'}), H())])


@pytest.mark.integration  # the Dataflow job stages an sdist, built in a process of its own
def test_the_replay_shuffles_file_names_not_events_and_builds_for_dataflow(archive, tmp_path):
  """`run.py replay`'s pipeline, built for Dataflow without contacting Google
  (``--dry_run``): the retail views' only GroupByKey is the one over file names."""
  from apache_beam.portability import common_urns
  from sourcebeam.pipelines.replay import build_replay
  path, _ = archive
  args = ['--runner=DataflowRunner', '--project=sourcebeam-dry-run', '--region=us-central1',
          '--temp_location=gs://sourcebeam-dry-run/tmp', '--job_name=sourcebeam-replay',
          '--sdk_location=container', '--dry_run=True']
  p = beam.Pipeline(options=pipeline_options(args))
  build_replay(p, DEMO_APP, path, 'gs://sourcebeam-dry-run/out')
  job = p.run().job
  transforms = job.proto_pipeline.components.transforms.values()
  gbks = {t.unique_name for t in transforms
          if t.spec.urn == common_urns.primitives.GROUP_BY_KEY.urn}
  # The views' only GroupByKey is over file names; the taxi and rider consumers (joins
  # across keys) group events themselves.
  per_key_gbks = {n for n in gbks if n.startswith('ReplayArchive/')
                  and not n.startswith(('ReplayArchive/taxi/', 'ReplayArchive/riders/'))}
  assert per_key_gbks == {'ReplayArchive/OrderedReplay/GroupBucketFiles'}
  assert any(t.unique_name == 'ReplayArchive/OrderedReplay/ReplayBucket' for t in transforms)


def test_run_py_replay_writes_what_the_consumers_write_over_read_archive(archive, reference_outputs,
                                                                        tmp_path):
  """`run.py replay` (the fast path for views, one read shared with the taxi and rider
  consumers) writes the same files, line for line, as every consumer applied to
  ReadArchive's events, and its summary says what it did not apply."""
  import os
  from sourcebeam.pipelines import replay as replay_cmd
  path, events = archive
  old = reference_outputs
  new = str(tmp_path / 'new')
  summary = replay_cmd.run(path, new, [], DEMO_APP)
  assert summary['events'] == len(events)
  assert len(old) >= 14
  for name, lines in old.items():
    with open(os.path.join(new, name)) as b:
      assert lines == sorted(b.read().splitlines()), name
  assert summary['outputs']['unprocessed'] > 0
  assert summary['unprocessed'] == {'before_initial': 1, 'duplicate': 25}
  assert summary['unclaimed'] == 0 and summary['unknown_type'] == 0


def test_the_replay_flattens_one_windowing_so_beam_has_nothing_to_warn(archive, caplog):
  """Every replay printed Beam's warning that a Flatten's inputs differ in windowing (the
  files refused by the layout check and those refused by the bucket replay)."""
  with caplog.at_level('WARNING'):
    with TestPipeline(options=pipeline_options([])) as p:
      replay = p | ReplayApp(DEMO_APP, archive[0])
      assert_that(replay.corrupt, equal_to([]))
  assert not [r for r in caplog.records if 'same window' in r.getMessage()]
