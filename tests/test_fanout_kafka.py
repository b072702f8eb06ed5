"""Fan-out with a real Kafka broker (scripts/kafka.sh) on Prism: subscriber topics and backfill.

Kafka is fed and read with Kafka's own command-line tools (tests/service_fixtures.py),
so neither end trusts Beam's Kafka IO.
"""

import collections
import json
import random
import subprocess
import uuid

import apache_beam as beam
import pytest

from tests.demo import DEMO_SCHEMAS, REG  # noqa: F401
from sourcebeam.schemas.envelope import from_json, to_json
from tests.cli import run_py
from tests.demo import ROOT
from tests.polling import wait_until
from tests.service_fixtures import consume_all, create_topic, produce
from tests.test_fanout import envelope
from tests.tiers import child_processes


def cli(*args):
  """`run.py fanout ARGS` on Prism, as a process of its own: Beam keeps Prism and the Java
  expansion service, its children, until the interpreter exits."""
  return run_py('fanout', *args, '--runner=PrismRunner')


def user_events(users, seqs):
  out = []
  for u in range(users):
    for s in seqs:
      out.append(envelope(f'u-{u:03d}', s, ('CartItemAdded', 'ProductViewed', 'CartItemRemoved')[s % 3],
                          minute=s))
  return out


def records(events):
  return [(e['partition_key'], to_json(e)) for e in events]


def topics(kafka, names, partitions=2):
  suffix = uuid.uuid4().hex[:8]
  out = {n: f'fanout-{n}-{suffix}' for n in names}
  for t in out.values():
    create_topic(kafka, t, partitions)
  return out


def subscriber_file(tmp_path, kafka, t):
  doc = {'subscribers': [
      {'name': 'all', 'sink': f'kafka://{kafka}/{t["all"]}'},
      {'name': 'carts', 'event_types': ['CartItemAdded', 'CartItemRemoved'],
       'sink': f'kafka://{kafka}/{t["carts"]}'},
      {'name': 'u-001', 'keys': ['u-001'], 'sink': f'kafka://{kafka}/{t["u1"]}'},
      {'name': 'archive', 'keys': ['u-00[02]'], 'sink': str(tmp_path / 'sub-archive')},
  ]}
  path = tmp_path / 'subs.json'
  path.write_text(json.dumps(doc))
  return str(path)


def check_topic(kafka, topic, expected):
  """The topic holds exactly ``expected`` (each once), keyed by partition key, in per-key order."""
  got = consume_all(kafka, topic)
  events = []
  for key, value in got:
    e = from_json(value)
    assert key == e['partition_key'], (topic, key, e['partition_key'])
    events.append(e)
  assert sorted(e['event_id'] for e in events) == sorted(e['event_id'] for e in expected), topic
  per_key = collections.defaultdict(list)
  for e in events:
    per_key[e['partition_key']].append(e['sequence'])
  for key, seqs in per_key.items():
    assert seqs == sorted(seqs), (topic, key, seqs)
  return events


@pytest.mark.integration
def test_kafka_subscribers_get_their_events_keyed_and_in_per_key_order(kafka, tmp_path):
  from sourcebeam.transforms.archive import iter_archive
  t = topics(kafka, ['src', 'all', 'carts', 'u1'])
  events = user_events(4, range(1, 13))
  shuffled = list(events)
  random.Random(5).shuffle(shuffled)  # out of order per key in the source: the fan-out reorders
  produce(kafka, t['src'], records(shuffled) + [('u-bad', 'not json')])
  proc = subprocess.run(cli('--subscribers', subscriber_file(tmp_path, kafka, t),
                            '--source', f'kafka://{kafka}/{t["src"]}',
                            '--max-records', str(len(shuffled) + 1), '--out', str(tmp_path / 'out')),
                        capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  check_topic(kafka, t['all'], events)
  check_topic(kafka, t['carts'], [e for e in events if e['event_type'].startswith('Cart')])
  check_topic(kafka, t['u1'], [e for e in events if e['partition_key'] == 'u-001'])
  archived = list(iter_archive(str(tmp_path / 'sub-archive'), REG))
  assert sorted(e['event_id'] for e in archived) == sorted(
      e['event_id'] for e in events if e['partition_key'] in ('u-000', 'u-002'))
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  assert summary['in'] == len(events) + 1 and summary['dead_lettered'] == 1
  assert summary['deliveries'] == {'all': 48, 'carts': 32, 'u-001': 12, 'archive': 24}
  dead = [json.loads(l) for l in (tmp_path / 'out' / 'dead_letters.jsonl').read_text().splitlines()]
  assert len(dead) == 1 and 'not a published envelope' in dead[0]['reason']


@pytest.mark.integration
def test_backfill_then_live_has_no_gap_and_no_duplicate(kafka, tmp_path):
  """Archive: sequences 1-10 per key. Topic: 6-15 before the run (retention already dropped
  1-5), 16-20 produced while the run is going. Every subscriber must get 1-20 per key, once
  each, in order; the overlap 6-10 is dropped as duplicates."""
  from sourcebeam.transforms.archive import WriteArchive
  t = topics(kafka, ['src', 'all', 'carts', 'u1'])
  users = 3
  archive = str(tmp_path / 'archive')
  with beam.Pipeline() as p:
    _ = p | beam.Create(user_events(users, range(1, 11))) | WriteArchive(archive, registry=REG)
  produce(kafka, t['src'], records(user_events(users, range(6, 16))))
  live_later = user_events(users, range(16, 21))
  n_topic = users * 15
  proc = subprocess.Popen(cli('--subscribers', subscriber_file(tmp_path, kafka, t),
                              '--source', f'kafka://{kafka}/{t["src"]}', '--archive', archive,
                              '--max-records', str(n_topic), '--out', str(tmp_path / 'out')),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  try:
    # The job is built and submitted to Prism, which the command starts only then.
    wait_until(lambda: 'prism' in child_processes(proc.pid).values(), 600,
               'the fan-out job to start on Prism', proc=proc)
    assert proc.poll() is None, proc.communicate()[1][-3000:]  # still waiting for the live events
    produce(kafka, t['src'], records(live_later))
    out, err = proc.communicate(timeout=900)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, err[-3000:]
  everything = user_events(users, range(1, 21))
  check_topic(kafka, t['all'], everything)
  check_topic(kafka, t['carts'], [e for e in everything if e['event_type'].startswith('Cart')])
  u1 = check_topic(kafka, t['u1'], [e for e in everything if e['partition_key'] == 'u-001'])
  assert [e['sequence'] for e in u1] == list(range(1, 21))
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  assert summary['backfill_events'] == users * 10
  assert summary['unprocessed'] == {'duplicate': users * 5}
  assert summary['held_on_gap'] == 0
  assert summary['deliveries']['all'] == users * 20
