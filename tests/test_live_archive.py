"""The live path archives: windows of published events, each file with the Kafka offsets it covers.

Unit tests (sidecars; ArchiveLive over messages shaped like ReadFromKafka's, on
Beam's local runner) and integration tests on Prism with a real Kafka broker:
a bounded ``run.py stream --archive`` and an unbounded one, terminated after
its files appear.
"""

import glob
import json
import os
import signal
import subprocess
import time
import uuid

import apache_beam as beam
import pytest

from tests.demo import DEMO_SCHEMAS, REG  # noqa: F401
from sourcebeam.generators import retail
from sourcebeam.generators.jsonl import encode_line
from sourcebeam.schemas.envelope import iso_to_millis, to_json
from sourcebeam.transforms.archive import iter_archive, read_archive_file
from sourcebeam.transforms.handoff import read_sidecars, recorded_offsets
from sourcebeam.transforms.live_archive import (
    ArchiveLive, PublishKafkaMessages, SidecarError, encode_sidecar, parse_sidecar, sidecar_path)
from tests.cli import run_py
from tests.demo import ROOT
from tests.polling import wait_until

BROKEN = b'{"event_type": "CartItemAdded", '


def raw_events(n, seed=5):
  """(key, event time millis, raw bytes) in event-time order, plus one broken line at the end."""
  events = sorted(retail.retail_events(n, seed=seed), key=lambda e: iso_to_millis(e['event_time']))
  timed = [(e['partition_key'], iso_to_millis(e['event_time']), encode_line(e)) for e in events]
  return timed + [('broken', timed[-1][1], BROKEN)]


# --- sidecars, plain Python ------------------------------------------------------------

def test_a_sidecar_round_trips():
  blob = encode_sidecar('events', [('raw', 0, 5), ('raw', 1, 2)], file='hour=x/bucket=001/f.avro',
                        run_id='r1')
  body = parse_sidecar(blob, 'x.json')
  assert body == {'kind': 'events', 'file': 'hour=x/bucket=001/f.avro', 'run_id': 'r1',
                  'sources': [('raw', 0, 5), ('raw', 1, 2)]}
  dead = parse_sidecar(encode_sidecar('dead_letters', [('raw', 0, 9)], file=None, run_id='r1'), 'y')
  assert dead['file'] is None and dead['sources'] == [('raw', 0, 9)]


@pytest.mark.parametrize('blob, reason', [
    (b'{', 'not JSON'),
    (b'{"sidecar_version": 2}', 'not a version 1'),
    (b'{"sidecar_version": 1, "kind": "x"}', 'kind must be'),
    (b'{"sidecar_version": 1, "kind": "events", "file": null, "sources": []}', 'names its data file'),
    (b'{"sidecar_version": 1, "kind": "dead_letters", "file": null, "sources": [["t", -1, 0]]}',
     'bad source'),
])
def test_a_bad_sidecar_is_a_one_line_error(blob, reason):
  with pytest.raises(SidecarError, match=reason) as e:
    parse_sidecar(blob, 'p.json')
  assert str(e.value).startswith('p.json: ')


def test_sidecar_path_mirrors_the_data_file():
  assert (sidecar_path('s3://b/arc/', 's3://b/arc/hour=2026-11-26T10/bucket=003/events-r-0000.avro')
          == 's3://b/arc/_offsets/hour=2026-11-26T10/bucket=003/events-r-0000.avro.json')
  with pytest.raises(ValueError):
    sidecar_path('/a', '/b/f.avro')


# --- ArchiveLive on Beam's local runner, messages shaped like ReadFromKafka's ---------

def test_archive_live_records_each_events_offset(tmp_path):
  """Every message (published or dead-lettered) is covered once; each file's sidecar lists
  the offsets of its events in file order."""
  events = raw_events(300)
  messages = [{'topic': 'raw', 'partition': i % 3, 'offset': i // 3, 'value': v,
               'ts': millis / 1000.0} for i, (_, millis, v) in enumerate(events)]
  archive = str(tmp_path / 'archive')
  with beam.Pipeline() as p:
    published = (p | beam.Create(messages)
                 | beam.Map(lambda m: beam.window.TimestampedValue(m, m['ts']))
                 | PublishKafkaMessages(REG))
    (published.published_refs, published.dead_refs) | ArchiveLive(
        archive, window_seconds=600, flush_seconds=1, buckets=4, run_id='t1', registry=REG)
  sidecars = read_sidecars(archive)
  covered = sorted(ref for _, body in sidecars for ref in body['sources'])
  assert covered == sorted((m['topic'], m['partition'], m['offset']) for m in messages)
  by_ref = {(m['topic'], m['partition'], m['offset']): m['value'] for m in messages}
  dead = [body for _, body in sidecars if body['kind'] == 'dead_letters']
  assert [by_ref[r] for body in dead for r in body['sources']] == [BROKEN]
  n_files = 0
  for path, body in sidecars:
    if body['kind'] != 'events':
      continue
    n_files += 1
    # Bounded input is one pane in the global window (its names carry no window start;
    # the unbounded test below checks windowed, paned names).
    assert '-w' not in body['file']
    archived = read_archive_file(os.path.join(archive, body['file']), REG)
    assert [e['event_id'] for e in archived] == [
        json.loads(by_ref[r])['event_id'] for r in body['sources']]
  assert n_files > 1
  assert recorded_offsets(archive) == {('raw', 0): 101, ('raw', 1): 100, ('raw', 2): 100}


# --- On Prism, from Kafka ---------------------------------------------------------------

def produce_timed(kafka, topic, events, partitions=2):
  from confluent_kafka import Producer
  producer = Producer({'bootstrap.servers': kafka, 'acks': 'all', 'linger.ms': 5})
  for key, millis, value in events:
    producer.produce(topic, key=key.encode(), value=value, timestamp=millis)
  assert producer.flush(60) == 0


def new_topic(kafka, partitions=2):
  from tests.service_fixtures import create_topic
  name = f'live-{uuid.uuid4().hex[:8]}'
  create_topic(kafka, name, partitions=partitions)
  return name


def run_cli(*args, timeout=600):
  """`run.py ARGS` on Prism, as a process of its own: Beam keeps Prism and the Java expansion
  service, its children, until the interpreter exits."""
  proc = subprocess.run(run_py(*args), capture_output=True, text=True, cwd=ROOT, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def end_offsets(kafka, topic):
  from confluent_kafka import Consumer, TopicPartition
  c = Consumer({'bootstrap.servers': kafka, 'group.id': f'check-{uuid.uuid4().hex}'})
  try:
    parts = c.list_topics(topic, timeout=15).topics[topic].partitions
    return {(topic, p): c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1]
            for p in parts}
  finally:
    c.close()


@pytest.mark.integration
def test_a_bounded_stream_archives_what_it_published(kafka, tmp_path):
  events = raw_events(400)
  topic = new_topic(kafka)
  produce_timed(kafka, topic, events)
  out, archive = tmp_path / 'out', tmp_path / 'archive'
  started = time.monotonic()
  run_cli('stream', '--source', f'kafka://{kafka}/{topic}', '--max-records', str(len(events)),
          '--out', str(out), '--archive', str(archive), '--archive-window', '600',
          '--archive-flush', '5', '--runner=PrismRunner')
  print(f'bounded stream + archive of {len(events)} messages: {time.monotonic() - started:.1f}s')
  published = sorted((out / 'published.jsonl').read_text().splitlines())
  archived = sorted(to_json(e) for e in iter_archive(str(archive), REG))
  assert len(archived) == len(published) == len(events) - 1
  assert archived == published
  assert recorded_offsets(str(archive)) == end_offsets(kafka, topic)
  summary = json.loads((out / 'summary.json').read_text())
  assert summary['outputs']['archive/sidecars'] == len(read_sidecars(str(archive)))


@pytest.mark.integration
def test_an_unbounded_stream_writes_archive_files_while_it_runs(kafka, tmp_path):
  """A live run (no --max-records) on Prism: files and offsets appear while it runs, and
  cover every message produced, without the run ending."""
  events = raw_events(200, seed=8)
  topic = new_topic(kafka)
  produce_timed(kafka, topic, events)
  want = end_offsets(kafka, topic)
  out, archive = tmp_path / 'out', tmp_path / 'archive'
  # A process of its own (and its own process group): a live run ends only with a signal.
  proc = subprocess.Popen(
      run_py('stream', '--source', f'kafka://{kafka}/{topic}', '--out', str(out), '--archive',
             str(archive), '--archive-window', '3600', '--archive-flush', '2',
             '--runner=PrismRunner'),
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / 'stderr.txt', 'w'),
      start_new_session=True)
  started = time.monotonic()
  try:
    got = {}

    def archive_complete():
      nonlocal got
      assert proc.poll() is None, (tmp_path / 'stderr.txt').read_text()[-3000:]
      if os.path.exists(archive / '_archive.json') and glob.glob(str(archive / '_offsets' / '*' / '*')):
        try:
          got = recorded_offsets(str(archive))
        except Exception:  # a sidecar being renamed into place: look again
          got = {}
      return got == want
    wait_until(archive_complete, 240, 'the live archive to record every produced offset',
               interval=0.5, describe=lambda: f'recorded {got}, produced {want}')
    print(f'unbounded stream: archive complete after {time.monotonic() - started:.1f}s')
    assert got == want, f'recorded {got}, produced {want}'
    assert proc.poll() is None  # still running: the files came from early firings
    assert sum(1 for _ in iter_archive(str(archive), REG)) == len(events) - 1
    files = [body['file'] for _, body in read_sidecars(str(archive)) if body['kind'] == 'events']
    assert files and all('-w' in f and '-p' in f for f in files), files  # windowed, paned
  finally:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait(30)
