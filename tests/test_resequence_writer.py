"""The event writer and the publishing step number a key's events by one rule.

The writer (`run.py serve writer`, real, on a real Kafka broker) gives each key's accepted
events 1, 2, 3 ... in acceptance order and answers a repeated event_id with its first receipt.
Its topic, read back with Kafka's own client and put through `run.py publish` as raw events,
is published with the writer's own sequences (as ``sequence`` and as ``raw_sequence``), also
when a message is read twice (at-least-once delivery) and the lines are shuffled.
"""

from __future__ import annotations

import json
import random

import pytest

import run
from sourcebeam.schemas.envelope import from_json
from tests.demo import REG
from tests.test_writer import Running, _all_messages, event, topic  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration


def test_a_publish_of_the_writers_topic_keeps_the_writers_sequences(kafka, topic, tmp_path):
  rnd = random.Random(5)
  users = ['u1', 'u2', 'u3']
  events = [event(rnd.choice(users), f'p{i}', event_id=f'e{i:03d}',
                  event_time=f'2026-11-26T10:{i // 60:02d}:{i % 60:02d}Z') for i in range(60)]
  writer = Running(kafka, topic, str(tmp_path / 'writer.db'))
  try:
    for i in range(0, 60, 7):
      status, body, _ = writer.post(events[i:i + 7])
      assert status == 201, body
    status, body, _ = writer.post([events[3], events[40]])  # retries: their first receipts
    assert [r['duplicate'] for r in body['receipts']] == [True, True]
  finally:
    writer.stop()
  lines = [m.value() for m in _all_messages(kafka, topic)]
  assert len(lines) == 60
  writer_numbers = {e['event_id']: (e['partition_key'], e['sequence'])
                    for e in (from_json(v.decode()) for v in lines)}
  # Read twice (at-least-once) and out of order, as a raw stream may deliver it.
  raw = lines + [lines[10], lines[11]]
  rnd.shuffle(raw)
  (tmp_path / 'raw.jsonl').write_bytes(b'\n'.join(raw) + b'\n')
  out = tmp_path / 'published'
  assert run.main(['publish', '--input', str(tmp_path / 'raw.jsonl'), '--out', str(out)]) == 0
  published = [from_json(l) for l in (out / 'published.jsonl').read_text().splitlines()]
  assert {e['event_id']: (e['partition_key'], e['sequence']) for e in published} == writer_numbers
  assert all(e['raw_sequence'] == e['sequence'] for e in published)
  summary = json.loads((out / 'summary.json').read_text())
  assert (summary['duplicates_dropped'], summary['dead_lettered'], summary['gaps']) == (2, 0, 0)
  assert all(REG.get(e['event_type']) for e in published)
