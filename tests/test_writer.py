"""The event writer against a real Kafka broker (scripts/kafka.sh), over real HTTP on loopback.

Receipts are checked against what independent consumers read: confluent-kafka's
consumer at the receipt's partition and offset, and Kafka's own console consumer.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import pytest

from sourcebeam.pipelines import writer_service
from sourcebeam.pipelines.serve import Running as Serving
from sourcebeam.schemas.envelope import from_json, make_envelope, to_json
from tests.service_fixtures import consume, create_topic, free_port, produce

pytestmark = pytest.mark.integration

TOKEN = 'test-token-' + uuid.uuid4().hex
HEADERS = {'Authorization': f'Bearer {TOKEN}', 'Content-Type': 'application/json'}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Running:
  """A writer serving on a free loopback port in this process (its own event loop)."""

  def __init__(self, bootstrap: str, topic: str, state: str, server_options: Optional[Dict] = None,
               **kw):
    self.writer = writer_service.build(bootstrap, topic, state, {TOKEN}, partitions=3, **kw)
    self.server = Serving(self.writer, '127.0.0.1', 0, **(server_options or {}))
    self.port = self.server.port

  def request(self, method: str, path: str, body: Any = None, headers: Optional[Dict] = None,
              raw: Optional[bytes] = None) -> Tuple[int, Dict[str, Any], Dict[str, str]]:
    conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=60)
    try:
      data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
      conn.request(method, path, body=data, headers=HEADERS if headers is None else headers)
      resp = conn.getresponse()
      return resp.status, json.loads(resp.read()), dict(resp.getheaders())
    finally:
      conn.close()

  def post(self, body: Any, **kw):
    return self.request('POST', '/events', body, **kw)

  def stop(self) -> None:
    self.server.stop()


@pytest.fixture
def topic(kafka) -> str:
  name = f'writer-{uuid.uuid4().hex[:8]}'
  create_topic(kafka, name, partitions=3)
  return name


@pytest.fixture
def writer(kafka, topic, tmp_path):
  w = Running(kafka, topic, str(tmp_path / 'writer.db'), max_body_bytes=64 * 1024)
  yield w
  w.stop()


def event(user: str, product: str = 'p1', quantity: int = 1, **extra) -> Dict[str, Any]:
  e = {'event_type': 'CartItemAdded', 'event_time': '2026-11-26T10:00:00Z', 'origin': 'web-cart',
       'data': {'user_id': user, 'product_id': product, 'quantity': quantity}}
  e.update(extra)
  return e


def read_at(bootstrap: str, topic: str, partition: int, offset: int):
  """The message at (partition, offset), read by a fresh consumer."""
  from confluent_kafka import Consumer, TopicPartition
  c = Consumer({'bootstrap.servers': bootstrap, 'group.id': f't-{uuid.uuid4()}',
                'enable.auto.commit': False})
  try:
    c.assign([TopicPartition(topic, partition, offset)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      m = c.poll(1.0)
      if m is not None and m.error() is None:
        return m
    raise AssertionError(f'nothing at {topic}:{partition}:{offset}')
  finally:
    c.close()


def end_offsets(bootstrap: str, topic: str) -> List[int]:
  from confluent_kafka import Consumer, TopicPartition
  c = Consumer({'bootstrap.servers': bootstrap, 'group.id': f't-{uuid.uuid4()}'})
  try:
    return [c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1] for p in range(3)]
  finally:
    c.close()


def test_receipts_name_the_partition_and_offset_consumers_read(writer, kafka, topic):
  batch = [event('u1', 'p1'), event('u2', 'p2'), event('u1', 'p3', 2), event('u3', 'p4'),
           event('u1', 'p5')]
  status, body, _ = writer.post(batch)
  assert status == 201, body
  receipts = body['receipts']
  assert len(receipts) == 5
  for sent, r in zip(batch, receipts):
    assert r['after'] == f'{topic}:{r["partition"]}:{r["offset"]}'
    m = read_at(kafka, topic, r['partition'], r['offset'])
    env = from_json(m.value().decode())
    assert m.key().decode() == env['partition_key'] == sent['data']['user_id']
    assert env['event_id'] == r['event_id'] and env['sequence'] == r['sequence']
    assert env['data'] == sent['data']
    # The Kafka timestamp is the event time: a streaming read takes it as event time.
    assert m.timestamp()[1] == env['event_time']
  # Per key: one partition, sequences 1, 2, 3 in offset order.
  u1 = [r for r in receipts if r['partition_key'] == 'u1']
  assert len({r['partition'] for r in u1}) == 1
  assert [r['sequence'] for r in u1] == [1, 2, 3]
  assert [r['offset'] for r in u1] == sorted(r['offset'] for r in u1)
  assert [r['sequence'] for r in receipts if r['partition_key'] != 'u1'] == [1, 1]
  # Kafka's own console consumer sees exactly these five events.
  seen = consume(kafka, topic, 5, timeout_ms=15000)
  assert sorted(json.loads(v)['event_id'] for _, v in seen) == sorted(r['event_id'] for r in receipts)
  # A single event answers with one receipt, and the key's sequence goes on.
  status, r, _ = writer.post(event('u1', 'p6'))
  assert status == 201 and r['sequence'] == 4 and r['partition'] == u1[0]['partition']
  assert r['offset'] > u1[-1]['offset'] and r['duplicate'] is False


def test_same_partition_as_kafkas_own_producer(writer, kafka, topic):
  """The writer partitions keys like Java clients (murmur2), so other producers agree."""
  for user in ('alice', 'bob', 'carol', 'dave'):
    _, r, _ = writer.post(event(user))
    before = end_offsets(kafka, topic)
    produce(kafka, topic, [(user, '{"probe":true}')])
    after = end_offsets(kafka, topic)
    grew = [p for p in range(3) if after[p] > before[p]]
    assert grew == [r['partition']], (user, before, after, r)


def test_retrying_an_event_id_returns_the_first_receipt_and_appends_once(writer, kafka, topic):
  e = event('u7', event_id='order-42-add')
  s1, r1, _ = writer.post(e)
  s2, r2, _ = writer.post(e)
  s3, r3, _ = writer.post(dict(e, data=dict(e['data'], quantity=9)))  # first write wins
  assert (s1, s2, s3) == (201, 200, 200)
  assert r1['duplicate'] is False and r2['duplicate'] is True and r3['duplicate'] is True
  for r in (r2, r3):
    assert {k: r[k] for k in ('topic', 'partition', 'offset', 'event_id', 'sequence')} == \
           {k: r1[k] for k in ('topic', 'partition', 'offset', 'event_id', 'sequence')}
  # A batch mixing the retried event with a new one appends only the new one.
  s4, b4, _ = writer.post([e, event('u7', 'p2')])
  assert s4 == 201
  assert b4['receipts'][0]['offset'] == r1['offset'] and b4['receipts'][0]['duplicate']
  assert b4['receipts'][1]['sequence'] == 2
  assert sum(end_offsets(kafka, topic)) == 2


def test_concurrent_clients_share_flushes_and_keep_per_key_order(writer, kafka, topic):
  """8 clients posting at once: every key's sequences are 1..n in offset order, no gaps,
  and an event_id sent by two clients at once is appended once."""
  results, errors = [], []

  def client(c):
    try:
      for i in range(15):
        status, r, _ = writer.post(event(f'k{i % 3}', f'p{c}'))
        assert status == 201, r
        results.append(r)
      status, r, _ = writer.post(event('k0', event_id='shared-event'))
      assert status in (200, 201), r
      results.append(r)
    except Exception as e:  # surfaced below
      errors.append(e)

  threads = [threading.Thread(target=client, args=(c,)) for c in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  shared = [r for r in results if r['event_id'] == 'shared-event']
  assert len({(r['partition'], r['offset']) for r in shared}) == 1
  assert sum(not r['duplicate'] for r in shared) == 1
  unique = {r['event_id']: r for r in results}.values()
  for key in ('k0', 'k1', 'k2'):
    mine = sorted((r for r in unique if r['partition_key'] == key), key=lambda r: r['offset'])
    assert [r['sequence'] for r in mine] == list(range(1, len(mine) + 1))
    assert len({r['partition'] for r in mine}) == 1
  assert sum(end_offsets(kafka, topic)) == 8 * 15 + 1


def test_tokens_are_required(writer, kafka, topic):
  status, body, headers = writer.post(event('u1'), headers={'Content-Type': 'application/json'})
  assert status == 401 and 'bearer token is required' in body['error']
  assert headers['WWW-Authenticate'].startswith('Bearer')
  status, body, _ = writer.post(event('u1'), headers={'Authorization': 'Bearer not-the-token'})
  assert status == 401 and body['error'] == 'the bearer token is not valid'
  status, body, _ = writer.post(event('u1'), headers={'Authorization': f'Basic {TOKEN}'})
  assert status == 401
  assert sum(end_offsets(kafka, topic)) == 0


def test_bad_input_gets_clear_4xx_and_writes_nothing(writer, kafka, topic):
  bad_batch = [event('u1'), {'event_type': 'CartItemAdded', 'origin': 'x',
                             'event_time': '2026-11-26T10:00:00Z',
                             'data': {'user_id': 'u1', 'product_id': 'p1'}},
               event('u2', quantity='lots'), {'event_type': 'CartExploded', 'data': {}}]
  status, body, _ = writer.post(bad_batch)
  assert status == 400
  assert 'nothing was written' in body['error']
  assert [e['index'] for e in body['events']] == [1, 2, 3]
  assert "missing field 'quantity'" in body['events'][0]['reason']
  assert 'whole number' in body['events'][1]['reason']
  assert 'unknown event type' in body['events'][2]['reason']
  status, body, _ = writer.post(None, raw=b'{"event_type": ')
  assert status == 400 and body['error'].startswith('malformed JSON')
  status, body, _ = writer.post(None, raw=b'[]')
  assert status == 400 and 'empty batch' in body['error']
  status, body, _ = writer.post(None, raw=b'"just a string"')
  assert status == 400
  status, body, _ = writer.post([event('u1', event_id='x1'), event('u2', event_id='x1')])
  assert status == 400 and 'repeated' in body['error']
  status, body, _ = writer.post(event('u1', partition_key='u2'))
  assert status == 400 and 'disagrees with the key rule' in body['events'][0]['reason']
  # Oversized body: refused (413) before it is parsed.
  status, body, _ = writer.post([event('u1', origin='x' * 1000)] * 100)
  assert status == 413 and body['limit_bytes'] == 64 * 1024
  status, body, _ = writer.request('GET', '/nowhere')
  assert status == 404 and '/events' in body['routes']
  status, body, headers = writer.request('GET', '/events')
  assert status == 405 and headers['Allow'] == 'POST, OPTIONS'
  status, body, _ = writer.request('DELETE', '/health')
  assert status == 405
  status, body, _ = writer.request('GET', '/health')
  assert status == 200 and body['status'] == 'ok' and body['partitions'] == [0, 1, 2]
  assert sum(end_offsets(kafka, topic)) == 0


def test_restart_keeps_sequences_and_receipts(kafka, topic, tmp_path):
  state = str(tmp_path / 'writer.db')
  w = Running(kafka, topic, state)
  try:
    _, b, _ = w.post([event('u1', event_id='a1'), event('u1'), event('u2')])
  finally:
    w.stop()
  w = Running(kafka, topic, state)
  try:
    s, r, _ = w.post(event('u1', event_id='a1'))
    assert s == 200 and r['duplicate'] and r['offset'] == b['receipts'][0]['offset']
    s, r, _ = w.post(event('u1'))
    assert s == 201 and r['sequence'] == 3
    s, r, _ = w.post(event('u2'))
    assert r['sequence'] == 2
  finally:
    w.stop()
  assert sum(end_offsets(kafka, topic)) == 5


def test_events_acknowledged_but_not_recorded_are_recovered_at_start(kafka, topic, tmp_path):
  """The crash window: Kafka acked, the writer died before recording the receipt."""
  state = str(tmp_path / 'writer.db')
  w = Running(kafka, topic, state)
  try:
    _, first, _ = w.post(event('u9'))
  finally:
    w.stop()
  # What the dead writer had appended: u9's next event, straight into Kafka.
  lost = make_envelope('CartItemAdded', {'user_id': 'u9', 'product_id': 'p2', 'quantity': 1},
                       event_id='lost-1', sequence=2, event_time=1_790_000_000_000, origin='web')
  produce(kafka, topic, [('u9', to_json(lost))])
  w = Running(kafka, topic, state)
  try:
    s, r, _ = w.post(event('u9', event_id='lost-1'))  # the client's retry
    assert s == 200 and r['duplicate'] and r['sequence'] == 2
    assert r['partition'] == first['partition'] and r['offset'] == first['offset'] + 1
    s, r, _ = w.post(event('u9'))
    assert s == 201 and r['sequence'] == 3
  finally:
    w.stop()
  assert sum(end_offsets(kafka, topic)) == 3


def _serve_cmd(*args: str) -> List[str]:
  return [sys.executable, os.path.join(ROOT, 'run.py'), 'serve', *args]


def test_cli_needs_tokens_and_serves_until_sigterm(kafka, topic, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != writer_service.TOKENS_ENV}
  cmd = _serve_cmd('writer', '--bootstrap', kafka, '--topic', topic, '--port', '0',
                   '--state', str(tmp_path / 'w.db'))
  no_tokens = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert no_tokens.returncode == 2
  assert no_tokens.stderr.strip().startswith('error: no bearer tokens configured')
  assert 'Traceback' not in no_tokens.stderr
  tokens = tmp_path / 'tokens'
  tokens.write_text(f'# writer tokens\n{TOKEN}\n')
  port = free_port()
  cmd = _serve_cmd('writer', '--bootstrap', kafka, '--topic', topic, '--port', str(port),
                   '--state', str(tmp_path / 'w.db'), '--tokens-file', str(tokens))
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stderr.readline()
    assert f'listening on http://127.0.0.1:{port}' in line, line
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    conn.request('POST', '/events', body=json.dumps(event('cli-user')), headers=HEADERS)
    resp = conn.getresponse()
    receipt = json.loads(resp.read())
    assert resp.status == 201 and receipt['topic'] == topic and receipt['sequence'] == 1
  finally:
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=30)[1]
  assert proc.returncode == 0, rest
  assert TOKEN not in line + rest


def _wait_listening(proc: subprocess.Popen) -> str:
  lines = []
  for _ in range(20):
    lines.append(proc.stderr.readline())
    if 'listening on' in lines[-1] or not lines[-1]:
      break
  assert 'listening on' in lines[-1], lines
  return ''.join(lines)


def _all_messages(bootstrap: str, topic: str) -> List[Any]:
  from confluent_kafka import Consumer, TopicPartition
  c = Consumer({'bootstrap.servers': bootstrap, 'group.id': f't-{uuid.uuid4()}',
                'enable.auto.commit': False})
  out = []
  try:
    for p in range(3):
      high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1]
      if not high:
        continue
      c.assign([TopicPartition(topic, p, 0)])
      got = 0
      while got < high:
        m = c.poll(5.0)
        assert m is not None, f'partition {p}: read {got} of {high}'
        if m.error() is None:
          out.append(m)
          got += 1
  finally:
    c.close()
  return out


def test_killed_mid_batch_every_acknowledged_event_is_in_kafka_exactly_once(kafka, topic, tmp_path):
  """SIGKILL the writer process while a client streams batches; restart it; the client
  retries everything with the same event_ids. Each event is in Kafka once, each receipt
  answered before the kill still names it, and every key's sequences run 1..n."""
  env = dict(os.environ, **{writer_service.TOKENS_ENV: TOKEN})
  port = free_port()
  cmd = _serve_cmd('writer', '--bootstrap', kafka, '--topic', topic, '--port', str(port),
                   '--state', str(tmp_path / 'w.db'))
  batches = [[event(f'k{(b * 20 + i) % 7}', f'p{i}', event_id=f'b{b}-{i}') for i in range(20)]
             for b in range(40)]
  acked: Dict[str, Dict[str, Any]] = {}

  def post(batch) -> Dict[str, Any]:
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    try:
      conn.request('POST', '/events', body=json.dumps(batch), headers=HEADERS)
      resp = conn.getresponse()
      body = json.loads(resp.read())
      assert resp.status in (200, 201), body
      return body
    finally:
      conn.close()

  def stream():
    for batch in batches:
      try:
        body = post(batch)
      except (OSError, http.client.HTTPException):
        return  # the writer died under us
      acked.update((r['event_id'], r) for r in body['receipts'])

  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
  try:
    _wait_listening(proc)
    client = threading.Thread(target=stream)
    client.start()
    while len(acked) < 5 * 20 and client.is_alive():
      time.sleep(0.005)
    proc.kill()
    client.join(60)
  finally:
    proc.kill()
    proc.wait(30)
  before = dict(acked)
  assert 100 <= len(before) < 800, len(before)
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
  try:
    _wait_listening(proc)  # after reconciling: a 'recovered N receipt(s)' line may come first
    after = {}
    for batch in batches:  # the client retries everything
      after.update((r['event_id'], r) for r in post(batch)['receipts'])
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
  for event_id, r in before.items():
    assert (after[event_id]['partition'], after[event_id]['offset']) == (r['partition'], r['offset'])
  messages = _all_messages(kafka, topic)
  ids = [json.loads(m.value())['event_id'] for m in messages]
  assert len(ids) == len(set(ids)) == 40 * 20
  by_key: Dict[str, List[Tuple[int, int]]] = {}
  for m in messages:
    env_ = json.loads(m.value())
    assert after[env_['event_id']]['offset'] == m.offset()
    by_key.setdefault(env_['partition_key'], []).append((m.offset(), env_['sequence']))
  for key, seqs in by_key.items():
    assert [s for _, s in sorted(seqs)] == list(range(1, len(seqs) + 1)), key
