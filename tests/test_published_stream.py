"""A published stream without holes: `run.py publish`, `stream` and `replay` as a user runs them.

The resequencer itself (its rule, both expansions, TestStream and Prism) is tested in
tests/test_resequence*.py; here the commands: every good raw event published once, 1..n per
key, holes and conflicts dead-lettered with their reason, duplicates counted, and a replay
that says what it could not apply.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest

import run
from sourcebeam.schemas.envelope import from_json
from sourcebeam.transforms.archive import iter_archive
from tests.demo import REG, ROOT
from tests.test_validation import good

FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'before-raw-sequence')


def line(**overrides) -> bytes:
  return json.dumps(good(**overrides)).encode()


def cart(seq: int, user: str = 'u1', **overrides) -> bytes:
  """User ``user``'s raw event number ``seq`` (its product tells the events apart)."""
  return line(event_id=f'{user}-{seq}', sequence=seq, partition_key=user,
              event_time=f'2026-11-26T10:00:{seq:02d}Z',
              data={'user_id': user, 'product_id': f'p{seq}', 'quantity': 1}, **overrides)


def the_case():
  """The issue's key: its 3rd raw event malformed (dead-lettered), its 5th re-delivered;
  another key clean; and a conflict: a key's raw 2 sent twice with different content."""
  u1 = [cart(1), cart(2), b'{"event_type": "CartItemAdded", "sequence": 3, "data": ',
        cart(4), cart(5), cart(6), cart(5)]
  u2 = [cart(i, 'u2') for i in (1, 2, 3)]
  u3 = [cart(1, 'u3'), cart(2, 'u3'), line(event_id='u3-2b', sequence=2, partition_key='u3',
                                          event_time='2026-11-26T10:00:09Z',
                                          data={'user_id': 'u3', 'product_id': 'other',
                                                'quantity': 7})]
  return u1 + u2 + u3


def publish(folder, lines, *extra):
  """`run.py publish` of ``lines`` in ``folder`` (made if new): (exit code, output folder)."""
  folder.mkdir(parents=True, exist_ok=True)
  raw = folder / 'raw.jsonl'
  raw.write_bytes(b'\n'.join(lines) + b'\n')
  out = folder / 'published'
  code = run.main(['publish', '--input', str(raw), '--out', str(out), *extra])
  return code, out


def read_jsonl(path):
  return [json.loads(l) for l in open(path, encoding='utf-8').read().splitlines() if l]


def check_published_case(published, dead, duplicates, summary):
  by_key = {}
  for e in published:
    by_key.setdefault(e['partition_key'], []).append((e['sequence'], e['raw_sequence'], e['event_id']))
  # u1: raw 1, 2, 4, 5, 6 published as 1..5, each once; raw 3 a hole; the second 5 dropped.
  assert sorted(by_key['u1']) == [(1, 1, 'u1-1'), (2, 2, 'u1-2'), (3, 4, 'u1-4'),
                                  (4, 5, 'u1-5'), (5, 6, 'u1-6')]
  assert sorted(by_key['u2']) == [(1, 1, 'u2-1'), (2, 2, 'u2-2'), (3, 3, 'u2-3')]
  # u3: the first raw 2 kept, the other content at raw 2 a conflict.
  assert sorted(by_key['u3']) == [(1, 1, 'u3-1'), (2, 2, 'u3-2')]
  reasons = sorted(d['reason'] for d in dead)
  assert 'conflict' in reasons and 'gap' in reasons
  gap = next(d for d in dead if d['reason'] == 'gap')
  assert gap['key'] == 'u1' and gap['missing'] == [3, 3] and gap['key_space'] == 'user_id'
  conflict = next(d for d in dead if d['reason'] == 'conflict')
  assert conflict['event_id'] == 'u3-2b' and conflict['conflicts_with'] == 'u3-2'
  assert [(d['key'], d['raw_sequence']) for d in duplicates] == [('u1', 5)]
  assert summary['duplicates_dropped'] == 1 and summary['gaps'] == 1
  assert summary['missing_raw_sequences'] == 1 and summary['held_on_gap'] == 0
  assert summary['in'] == (summary['published'] + summary['dead_lettered'] +
                           summary['duplicates_dropped'])


def test_publish_numbers_every_key_without_holes_and_says_what_it_dropped(tmp_path, capsys):
  code, out = publish(tmp_path, the_case())
  assert code == 0
  check_published_case(read_jsonl(out / 'published.jsonl'), read_jsonl(out / 'dead_letters.jsonl'),
                       read_jsonl(out / 'duplicates.jsonl'),
                       json.loads((out / 'summary.json').read_text()))
  err = capsys.readouterr().err
  assert 'dropped 1 duplicate(s), skipped 1 hole(s) of 1 raw sequence(s)' in err


def test_the_same_raw_events_in_any_order_publish_the_same_stream(tmp_path):
  import random
  lines = the_case()
  _, first = publish(tmp_path / 'a', lines)
  random.Random(4).shuffle(lines)
  _, second = publish(tmp_path / 'b', lines)
  key = lambda e: (e['partition_key'], e['sequence'])
  assert sorted(read_jsonl(first / 'published.jsonl'), key=key) == sorted(
      read_jsonl(second / 'published.jsonl'), key=key)


def test_a_raw_stream_without_sequences_is_published_in_event_time_order(tmp_path):
  lines = [line(event_id=f'e{i}', sequence=None, event_time=f'2026-11-26T10:00:{s:02d}Z')
           for i, s in enumerate([30, 10, 20])]
  code, out = publish(tmp_path, lines, '--order-by', 'event_time')
  assert code == 0
  published = sorted(read_jsonl(out / 'published.jsonl'), key=lambda e: e['sequence'])
  assert [(e['sequence'], e['event_id']) for e in published] == [(1, 'e1'), (2, 'e2'), (3, 'e0')]
  assert all('raw_sequence' not in e for e in published)  # none to keep: the JSON leaves it out
  # By raw sequence (the default), an event without one is a dead letter saying so.
  code, out = publish(tmp_path / 'by-raw', lines)
  assert code == 0
  assert {d['reason'] for d in read_jsonl(out / 'dead_letters.jsonl')} == {
      'sequence is missing (per-key sequence numbers start at 1)'}


@pytest.mark.parametrize('args, message', [
    (['--first-sequence', 'soon'],
     "--first-sequence must be a whole number or first_seen, got 'soon'"),
    (['--gap-timeout', '-1'], '--gap-timeout must be >= 0 seconds'),
    (['--history', '0'], '--history must be at least 1'),
])
def test_bad_publishing_options_are_exit_2(tmp_path, capsys, args, message):
  code, _ = publish(tmp_path, [cart(1)], *args)
  assert code == 2
  assert capsys.readouterr().err.strip() == f'error: {message}'


def test_an_archive_written_before_raw_sequence_still_replays(tmp_path):
  """Files written by Sourcebeam before the envelope had raw_sequence (Avro and Parquet, from
  the commit before it, kept in tests/fixtures/): read with raw_sequence null, replayed."""
  order = lambda e: (e['event_id'], e['event_type'], e['partition_key'], e['sequence'])
  want = sorted((json.loads(l) for l in open(os.path.join(FIXTURES, 'events.jsonl'))), key=order)
  for fmt in ('avro', 'parquet'):
    archive = os.path.join(FIXTURES, f'archive-{fmt}')
    got = sorted(iter_archive(archive, REG), key=order)
    assert got == [dict(e, raw_sequence=None) for e in want], fmt
    out = tmp_path / fmt
    assert run.main(['replay', '--archive', archive, '--out', str(out)]) == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['events'] == len(want) and summary['corrupt_files'] == []
    assert summary['outputs']['retail/cart'] > 0


def test_a_replay_with_events_held_on_a_gap_exits_1_saying_how_many(tmp_path, capsys):
  """An archive with a hole (not published by Sourcebeam's publish step): the replay applies
  what it can and ends with exit 1 and one line with how many events and keys it held."""
  import apache_beam as beam
  from sourcebeam.transforms.archive import WriteArchive
  envelopes = [from_json(l.decode()) for l in (cart(1), cart(2), cart(4), cart(5), cart(1, 'u2'))]
  for e in envelopes:
    e['raw_sequence'] = None
  archive = str(tmp_path / 'archive')
  with beam.Pipeline() as p:
    _ = p | beam.Create(envelopes) | WriteArchive(archive, registry=REG)
  capsys.readouterr()
  assert run.main(['replay', '--archive', archive, '--out', str(tmp_path / 'out')]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ('error: 2 event(s) of 1 key(s) were never applied: their keys waited on a '
                     'sequence gap when the archive ended (a hole in the published stream; see '
                     '_replay_stats.jsonl)')
  assert 'not applied: 2 held on a gap (1 keys)' in '\n'.join(err)
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  assert (summary['held_on_gap'], summary['held_on_gap_keys']) == (2, 1)


@pytest.mark.integration
def test_a_stream_from_kafka_on_prism_publishes_what_publish_publishes(kafka, tmp_path):
  """The same raw events in a Kafka topic, read by `run.py stream --max-records` on Prism (the
  Kafka read is cross-language): the same published stream, dead letters and duplicates as
  `run.py publish` of the file on the DirectRunner."""
  from confluent_kafka import Producer
  from tests.service_fixtures import create_topic
  lines = the_case()
  topic = f'raw-{uuid.uuid4().hex[:8]}'
  create_topic(kafka, topic, partitions=2)
  producer = Producer({'bootstrap.servers': kafka, 'acks': 'all'})
  for i, value in enumerate(lines):
    producer.produce(topic, key=str(i % 2).encode(), value=value)
  assert producer.flush(60) == 0
  out = tmp_path / 'stream'
  code = run.main(['stream', '--source', f'kafka://{kafka}/{topic}', '--max-records',
                   str(len(lines)), '--out', str(out), f'--group-id=t-{topic}',
                   '--runner=PrismRunner'])
  assert code == 0
  summary = json.loads((out / 'summary.json').read_text())
  check_published_case(read_jsonl(out / 'published.jsonl'), read_jsonl(out / 'dead_letters.jsonl'),
                       read_jsonl(out / 'duplicates.jsonl'), summary)
  assert summary['held_on_gap'] == 0 and summary['unprocessed'] == {}
