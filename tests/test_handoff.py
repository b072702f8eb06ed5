"""Replay the archive up to its recorded offsets, then Kafka from exactly there.

Unit tests for the offset arithmetic and the plan (gaps, dead letters, two runs
archiving the same offsets), the CLI's errors, and the integration test on
Prism with a real broker: archive a prefix live, lose one sidecar (a crash
between a file and its offsets), then ``run.py stream --from-archive`` while
more events are produced; every event comes out exactly once.
"""

import json
import os
import subprocess
import time
import uuid

import pytest

from tests.demo import DEMO_SCHEMAS, REG  # noqa: F401
from sourcebeam.generators import retail
from sourcebeam.generators.jsonl import encode_line
from sourcebeam.schemas.envelope import iso_to_millis, to_json
from sourcebeam.schemas.validation import publish_raw
from sourcebeam.transforms.archive_format import MANIFEST_NAME, make_manifest
from sourcebeam.transforms.handoff import (
    HandoffError, clip, contains, plan_from_sidecars, plan_handoff, read_sidecars,
    recorded_offsets, subtract, to_ranges, union)
from sourcebeam.transforms.live_archive import encode_sidecar, parse_sidecar
from tests.cli import run_cli, run_py
from tests.demo import ROOT
from tests.polling import wait_until
from tests.tiers import child_processes

BROKEN = b'{"event_type": "CartItemAdded", '


# --- offset ranges -------------------------------------------------------------------

def test_ranges():
  assert to_ranges([5, 1, 2, 3, 9, 2]) == [(1, 4), (5, 6), (9, 10)]
  assert union([(0, 3), (8, 9)], [(3, 5), (7, 8)]) == [(0, 5), (7, 9)]
  assert subtract([(0, 10)], [(2, 3), (5, 7)]) == [(0, 2), (3, 5), (7, 10)]
  assert subtract([(0, 4)], [(0, 10)]) == []
  assert clip([(0, 3), (5, 9)], 2, 6) == [(2, 3), (5, 6)]
  assert [o for o in range(12) if contains([(1, 4), (9, 10)], o)] == [1, 2, 3, 9]


def sidecar(kind, refs, run_id, file=None):
  return parse_sidecar(encode_sidecar(kind, refs, file=file, run_id=run_id), 'x')


def test_the_prefix_stops_at_the_first_gap_and_dead_letters_count():
  a = sidecar('events', [('t', 0, o) for o in (0, 1, 2, 5, 6)] + [('t', 1, 7)], 'r1', 'f/a.avro')
  dead = sidecar('dead_letters', [('t', 0, 3)], 'r1')
  plan = plan_from_sidecars('/arc', [('/arc/_offsets/a', a), ('/arc/_offsets/d', dead)])
  assert plan.offsets == {('t', 0): 4, ('t', 1): 8}   # 4 was never archived
  assert plan.starts == {('t', 0): 0, ('t', 1): 7}
  [item] = plan.items
  assert item.data_file == '/arc/f/a.avro'
  assert item.allowed == {('t', 0): [(0, 3)], ('t', 1): [(7, 8)]}  # 5 and 6 come from Kafka
  assert plan.archived_events == 4


def test_an_offset_archived_by_two_runs_is_replayed_once():
  a = sidecar('events', [('t', 0, o) for o in (0, 1, 2, 5, 6)], 'r1', 'f/a.avro')
  dead = sidecar('dead_letters', [('t', 0, 3)], 'r1')
  again = sidecar('events', [('t', 0, o) for o in (2, 4, 5, 6, 7)], 'r2', 'f/b.avro')  # a later run
  plan = plan_from_sidecars('/arc', [('/arc/_offsets/a', a), ('/arc/_offsets/d', dead),
                                     ('/arc/_offsets/b', again)])
  assert plan.offsets == {('t', 0): 8}
  assert [(i.data_file, i.allowed) for i in plan.items] == [
      ('/arc/f/a.avro', {('t', 0): [(0, 3), (5, 7)]}), ('/arc/f/b.avro', {('t', 0): [(4, 5), (7, 8)]})]
  assert plan.archived_events == 7  # offsets 0..7 but 3, each once


# --- errors --------------------------------------------------------------------------

def cli(*args):
  """`run.py ARGS`: in this process; on Prism in a process of its own (Beam keeps Prism and
  the Java expansion service, its children, until the interpreter exits)."""
  if '--runner=PrismRunner' in args:
    return subprocess.run(run_py(*args), capture_output=True, text=True, cwd=ROOT, timeout=300)
  return run_cli(*args)


def live_archive_stub(path, topic):
  """An archive with a manifest and one dead-letter sidecar of ``topic``."""
  os.makedirs(path / '_offsets' / 'dead')
  (path / MANIFEST_NAME).write_text(json.dumps(make_manifest('avro', 16)))
  (path / '_offsets' / 'dead' / 'r1-w0-p0000.json').write_bytes(
      encode_sidecar('dead_letters', [(topic, 0, 0)], file=None, run_id='r1'))


@pytest.mark.cli
def test_an_archive_without_offsets_is_exit_2(tmp_path):
  (tmp_path / 'raw.jsonl').write_bytes(b'\n'.join(
      encode_line(e) for e in retail.retail_events(20, seed=3)) + b'\n')
  assert cli('publish', '--input', str(tmp_path / 'raw.jsonl'), '--out', str(tmp_path / 'pub'),
             '--archive', str(tmp_path / 'arc')).returncode == 0
  proc = cli('stream', '--from-archive', str(tmp_path / 'arc'), '--source', 'kafka://127.0.0.1:9/raw',
             '--out', str(tmp_path / 'out'))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().startswith(f'error: archive {tmp_path / "arc"} has no recorded Kafka offsets')


@pytest.mark.cli
def test_offsets_of_another_topic_are_exit_2(tmp_path):
  live_archive_stub(tmp_path / 'arc', 'raw')
  assert recorded_offsets(str(tmp_path / 'arc')) == {('raw', 0): 1}
  proc = cli('stream', '--from-archive', str(tmp_path / 'arc'), '--source',
             'kafka://127.0.0.1:9/other', '--out', str(tmp_path / 'out'))
  assert proc.returncode == 2, proc.stderr
  assert 'recorded offsets of topic(s) raw, not of other' in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def test_a_missing_archive_and_a_bad_sidecar_are_usage_errors(tmp_path):
  with pytest.raises(HandoffError.__mro__[1], match='does not exist'):
    plan_handoff(str(tmp_path / 'nothing'))
  live_archive_stub(tmp_path / 'arc', 'raw')
  (tmp_path / 'arc' / '_offsets' / 'dead' / 'r1-w0-p0001.json').write_text('{"sidecar_version": 1')
  with pytest.raises(HandoffError, match='not JSON'):
    plan_handoff(str(tmp_path / 'arc'))


# --- the hand-off on Prism, with events produced during the replay ----------------------

def produce_timed(kafka, topic, events):
  from confluent_kafka import Producer
  producer = Producer({'bootstrap.servers': kafka, 'acks': 'all', 'linger.ms': 5})
  for key, millis, value in events:
    producer.produce(topic, key=key.encode(), value=value, timestamp=millis)
  assert producer.flush(60) == 0


@pytest.mark.integration
def test_replay_then_live_misses_nothing_and_doubles_nothing(kafka, tmp_path):
  from tests.service_fixtures import create_topic
  envs = sorted(retail.retail_events(600, seed=21), key=lambda e: iso_to_millis(e['event_time']))
  timed = [(e['partition_key'], iso_to_millis(e['event_time']), encode_line(e)) for e in envs]
  before = timed[:400] + [('broken', timed[399][1], BROKEN)]
  during = timed[400:] + [('broken', timed[-1][1], BROKEN)]
  topic = f'handoff-{uuid.uuid4().hex[:8]}'
  create_topic(kafka, topic, partitions=2)
  produce_timed(kafka, topic, before)
  source = f'kafka://{kafka}/{topic}'
  archive = tmp_path / 'archive'
  proc = cli('stream', '--source', source, '--max-records', str(len(before)), '--out',
             str(tmp_path / 'live'), '--archive', str(archive), '--archive-window', '300',
             '--runner=PrismRunner')
  assert proc.returncode == 0, proc.stderr[-3000:]
  full = recorded_offsets(str(archive))
  assert sum(full.values()) == len(before)
  # A crash between a data file and its sidecar: drop the sidecar of a file in the middle
  # of partition 0's offsets. Its offsets are no longer covered, so the prefix stops there
  # and everything after it (even what later files hold) must come from Kafka.
  with_p0 = sorted((min(o for _, part, o in body['sources'] if part == 0), path)
                   for path, body in read_sidecars(str(archive))
                   if body['kind'] == 'events' and any(part == 0 for _, part, _ in body['sources']))
  _, lost_path = with_p0[len(with_p0) // 2]
  os.remove(lost_path)
  offsets = recorded_offsets(str(archive))
  assert offsets[(topic, 0)] < full[(topic, 0)]
  live_part = len(before) + len(during) - sum(offsets.values())

  out = tmp_path / 'handoff'
  started = time.monotonic()
  run = subprocess.Popen(
      run_py('stream', '--from-archive', str(archive), '--source', source, '--max-records',
             str(live_part), '--out', str(out), '--runner=PrismRunner'),
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # The job is built (its start offsets committed, KafkaIO expanded) and being submitted to
  # Prism, which the command starts only then: the archive read is starting.
  wait_until(lambda: 'prism' in child_processes(run.pid).values(), 300,
             'the hand-off job to start on Prism', proc=run)
  assert run.poll() is None, run.communicate()[1][-3000:]
  produce_timed(kafka, topic, during)  # written while the replay runs
  produced_at = time.monotonic() - started
  _, stderr = run.communicate(timeout=600)
  assert run.returncode == 0, stderr[-3000:]
  print(f'hand-off: {sum(offsets.values())} offsets recorded, {live_part} read live; events '
        f'produced {produced_at:.1f}s into a {time.monotonic() - started:.1f}s run')

  summary = json.loads((out / 'summary.json').read_text())
  handoff = summary['handoff']
  assert 0 < handoff['archived_events'] < 400
  assert summary['in'] == len(before) + len(during)
  published = sorted(l for l in (out / 'published.jsonl').read_text().splitlines() if l)
  # The generator numbers each key 1, 2, 3 ... without holes: the published stream keeps
  # those numbers and names each one as the raw sequence it came from.
  want = sorted(to_json(dict(env, raw_sequence=env['sequence']))
                for env in (publish_raw(v, REG)[0] for _, _, v in timed))
  assert published == want                                       # every event, exactly once
  assert len({json.loads(l)['event_id'] for l in published}) == len(timed)
  dead = [json.loads(l)['source'] for l in (out / 'dead_letters.jsonl').read_text().splitlines()]
  # Dead letters are live only: the one in `during` always, the one in `before` only if
  # the lost sidecar's gap left it outside the prefix.
  assert 1 <= len(dead) == summary['dead_lettered'] <= 2
  for label in dead:
    part, _, offset = label[len(f'kafka://{topic}/'):].partition('@')
    assert int(offset) >= offsets[(topic, int(part))], label


@pytest.mark.integration
def test_read_kafka_from_starts_exactly_at_the_offsets(kafka, tmp_path):
  """ReadFromKafka has no start offsets; committed to a fresh group, they are where it starts.

  With ``max_records`` the read stops after that many records: had the commit been
  ignored, it would return offsets 0..3 of partition 0 (the filter behind it would then
  drop them), not 6..9 and 0..1 of the unrecorded partition 1.
  """
  import apache_beam as beam
  from sourcebeam.pipelines.options import pipeline_options
  from tests.service_fixtures import create_topic
  from sourcebeam.transforms.handoff import ReadKafkaFrom
  topic = f'from-{uuid.uuid4().hex[:8]}'
  create_topic(kafka, topic, partitions=2)
  from confluent_kafka import Producer
  producer = Producer({'bootstrap.servers': kafka, 'acks': 'all'})
  for i in range(10):
    producer.produce(topic, value=str(i).encode(), partition=0)
  for i in range(2):
    producer.produce(topic, value=str(i).encode(), partition=1)
  assert producer.flush(30) == 0
  out = tmp_path / 'offsets.json'
  with beam.Pipeline(options=pipeline_options(['--runner=PrismRunner'])) as p:
    (p | ReadKafkaFrom(kafka, topic, {(topic, 0): 6}, max_records=6)
     | beam.Map(lambda m: (int(m.partition), int(m.offset)))
     | beam.combiners.ToList()
     | beam.Map(lambda xs, path=str(out): open(path, 'w').write(json.dumps(sorted(xs)))))
  assert json.loads(out.read_text()) == [[0, 6], [0, 7], [0, 8], [0, 9], [1, 0], [1, 1]]
