"""The event writer and the publishing resequencer number a key's events by one rule.

The writer (pipelines/writer_service.py, run here as is, over an in-memory log instead of
Kafka) gives each key's accepted events 1, 2, 3 ... in acceptance order and answers a
repeated event_id with its first receipt. Read back as raw events, its log is already a
published stream: the resequencer publishes every event with the writer's sequence, as
``raw_sequence`` and as ``sequence``, also when the log is read with a message twice
(at-least-once delivery)."""

import json
import random
import threading

import pytest

from sourcebeam.pipelines.writer_service import Writer, WriterState
from sourcebeam.schemas.envelope import from_json
from sourcebeam.transforms.resequence_core import EVENT_TIME, ResequenceConfig, published_sequences, resequence

TOKEN = 'a-long-enough-test-token'


class MemoryLog:
  """The writer's log, in memory: one partition, offsets in append order."""

  topic = 'retail'
  partitions = [0]

  def __init__(self):
    self.messages = []
    self.lock = threading.Lock()

  def append(self, messages):
    out = []
    with self.lock:
      for key, value, _ts in messages:
        self.messages.append((key, value))
        out.append(((0, len(self.messages) - 1), None))
    return out

  def read_tail(self, partition, start):
    with self.lock:
      return iter([]), len(self.messages)

  def healthy(self):
    return True

  def close(self):
    pass


@pytest.fixture
def writer(tmp_path):
  w = Writer(MemoryLog(), WriterState(str(tmp_path / 'writer.db')), {TOKEN})
  yield w
  w.close()


def post(writer, events):
  status, body, _ = writer.handle('POST', '/events', {'Authorization': f'Bearer {TOKEN}'},
                                  json.dumps(events).encode('utf-8'))
  assert status in (200, 201), body
  return body['receipts']


def cart_add(i, user, t):
  return {'event_id': f'e{i:03d}', 'event_type': 'CartItemAdded', 'origin': 'web',
          'event_time': 1_767_225_600_000 + t,
          'data': {'user_id': user, 'product_id': f'p{i}', 'quantity': 1}}


def test_the_writers_log_is_published_with_the_writers_own_sequences(writer):
  rnd = random.Random(5)
  users = ['u1', 'u2', 'u3']
  events = [cart_add(i, rnd.choice(users), i * 1000) for i in range(60)]
  receipts = []
  for i in range(0, 60, 7):
    receipts += post(writer, events[i:i + 7])
  receipts += post(writer, [events[3], events[40]])         # retries: first receipts, not appended
  assert [r['duplicate'] for r in receipts[-2:]] == [True, True]
  log = [from_json(value.decode('utf-8')) for _, value in writer.log.messages]
  assert len(log) == 60
  writer_numbers = {e['event_id']: (e['partition_key'], e['sequence']) for e in log}
  for u in users:
    assert sorted(s for k, s in writer_numbers.values() if k == u) == list(
        range(1, sum(1 for k, _ in writer_numbers.values() if k == u) + 1))

  # The rule: the resequencer gives every event the writer's sequence...
  assert published_sequences(log) == writer_numbers
  # ...also when the log is delivered at least once (a message read twice) and shuffled.
  again = log + [log[10], log[11]]
  rnd.shuffle(again)
  result = resequence(again)
  assert {e['event_id']: (e['partition_key'], e['sequence']) for e in result.published} == writer_numbers
  assert all(e['raw_sequence'] == e['sequence'] for e in result.published)
  assert len(result.duplicates) == 2 and result.dead_letters == []


def test_events_posted_in_event_time_order_get_the_same_numbers_from_a_publish_of_the_posts(writer):
  """Without a sequence the writer numbers in arrival order and a publish (order_by='event_time')
  in (event_time, event_id) order: the two agree when each key's events reach the writer in
  event-time order, as from one client per key. (A client that sends its own sequences is
  not renumbered by the writer: see docs/publishing.md.)"""
  events = [cart_add(i, 'u1' if i % 2 else 'u2', i * 1000) for i in range(20)]
  post(writer, events[:10])
  post(writer, events[10:] + [events[4]])                  # a retry inside a batch of new ones
  log = [from_json(value.decode('utf-8')) for _, value in writer.log.messages]
  writer_numbers = {e['event_id']: (e['partition_key'], e['sequence']) for e in log}
  posted = [dict(e, partition_key=e['data']['user_id'], sequence=None, schema_version=1,
                 follows_from=None) for e in events + [events[4]]]
  assert published_sequences(posted, ResequenceConfig(order_by=EVENT_TIME)) == writer_numbers
