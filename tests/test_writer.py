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
import threading
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import pytest

from sourcebeam.pipelines import writer_service
from sourcebeam.pipelines.serve import Running as Serving
from sourcebeam.schemas.envelope import from_json, make_envelope, to_json
from tests.cli import run_cli, run_py
from tests.demo import REG, ROOT
from tests.service_fixtures import consume, create_topic, free_port, produce

pytestmark = pytest.mark.integration

TOKEN = 'test-token-' + uuid.uuid4().hex
HEADERS = {'Authorization': f'Bearer {TOKEN}', 'Content-Type': 'application/json'}


class Running:
  """A writer serving on a free loopback port in this process (its own event loop)."""

  def __init__(self, bootstrap: str, topic: str, state: str, server_options: Optional[Dict] = None,
               **kw):
    self.writer = writer_service.build(bootstrap, topic, state, {TOKEN}, REG, partitions=3, **kw)
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
  lost = make_envelope(REG, 'CartItemAdded', {'user_id': 'u9', 'product_id': 'p2', 'quantity': 1},
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
  """`run.py serve ARGS` as a process of its own: signals stop it (SIGTERM) or kill it (SIGKILL)."""
  return run_py('serve', *args)


def test_cli_needs_tokens_and_serves_until_sigterm(kafka, topic, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != writer_service.TOKENS_ENV}
  no_tokens = run_cli('serve', 'writer', '--bootstrap', kafka, '--topic', topic, '--port', '0',
                      '--state', str(tmp_path / 'w.db'), env={writer_service.TOKENS_ENV: None})
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
  for _ in range(500):
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
                   '--state', str(tmp_path / 'w.db'), '--ack-timeout', '5')
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
    # After taking over from the killed writer (it never released its lease: a settle wait,
    # logged) and reconciling (a 'recovered N receipt(s)' line may come too).
    assert 'taking over topic' in _wait_listening(proc)
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


# --- sequences belong to the writer (issue 15, item 1) ---------------------------------------------

def _sequences_by_key(bootstrap: str, topic: str) -> Dict[str, List[int]]:
  """Each key's sequences in offset order, as an independent consumer reads the topic."""
  by_key: Dict[str, List[Tuple[int, int, int]]] = {}
  for m in _all_messages(bootstrap, topic):
    env_ = json.loads(m.value())
    by_key.setdefault(env_['partition_key'], []).append((m.partition(), m.offset(), env_['sequence']))
  return {k: [s for _, _, s in sorted(v)] for k, v in by_key.items()}


def test_a_client_sequence_is_accepted_only_if_it_is_the_keys_next(writer, kafka, topic):
  s, r, _ = writer.post(event('u1'))
  assert s == 201 and r['sequence'] == 1
  # A repeated sequence and a gap are refused with the expected one; nothing is written.
  for sent in (1, 3, 100):
    s, body, _ = writer.post(event('u1', sequence=sent))
    assert s == 409, body
    assert body['expected_sequence'] == 2 and body['partition_key'] == 'u1'
    assert body['conflicts'] == [{'index': 0, 'event_id': body['conflicts'][0]['event_id'],
                                  'partition_key': 'u1', 'sequence': sent, 'expected_sequence': 2}]
  s, r, _ = writer.post(event('u1', sequence=2))
  assert s == 201 and r['sequence'] == 2
  # Within one batch: two events claiming 3 -> the batch is refused whole (the second needed 4).
  s, body, _ = writer.post([event('u1', sequence=3), event('u1', sequence=3), event('u2')])
  assert s == 409 and 'nothing was written' in body['error']
  assert [(c['index'], c['expected_sequence']) for c in body['conflicts']] == [(1, 4)]
  # An auto-numbered event takes the next one first; an explicit one after it must follow it.
  s, body, _ = writer.post([event('u1'), event('u1', sequence=3)])
  assert s == 409 and body['conflicts'][0]['expected_sequence'] == 4
  s, body, _ = writer.post([event('u1', sequence=3), event('u1'), event('u1', sequence=5)])
  assert s == 201 and [r['sequence'] for r in body['receipts']] == [3, 4, 5]
  # A sequence sent as a string is read with ASCII digits only.
  s, body, _ = writer.post(event('u1', sequence='６'))
  assert s == 400 and 'digits 0-9' in body['events'][0]['reason']
  s, r, _ = writer.post(event('u1', sequence='6'))
  assert s == 201 and r['sequence'] == 6
  # A retried event_id is answered with its first receipt, whatever sequence it carries now.
  s, r2, _ = writer.post(event('u1', event_id=r['event_id'], sequence=99))
  assert s == 200 and r2['duplicate'] and r2['offset'] == r['offset'] and r2['sequence'] == 6
  assert _sequences_by_key(kafka, topic) == {'u1': [1, 2, 3, 4, 5, 6]}


def test_explicit_sequences_racing_auto_numbered_ones_never_repeat_or_skip(writer, kafka, topic):
  """The issue's race: clients sending explicit sequences (retrying on 409 with the expected
  one, like an expected-version loop) against clients letting the writer number; all on one key."""
  accepted: List[Dict[str, Any]] = []
  conflicts, errors = [0], []
  lock = threading.Lock()

  def explicit(n: int) -> None:
    expected = 1
    try:
      for _ in range(n):
        while True:
          s, body, _ = writer.post(event('racer', sequence=expected))
          if s == 201:
            with lock:
              accepted.append(body)
            expected = body['sequence'] + 1
            break
          assert s == 409, body
          with lock:
            conflicts[0] += 1
          expected = body['expected_sequence']
    except Exception as e:  # surfaced below
      errors.append(e)

  def auto(n: int) -> None:
    try:
      for _ in range(n):
        s, body, _ = writer.post(event('racer'))
        assert s == 201, body
        with lock:
          accepted.append(body)
    except Exception as e:
      errors.append(e)

  threads = ([threading.Thread(target=explicit, args=(10,)) for _ in range(4)] +
             [threading.Thread(target=auto, args=(10,)) for _ in range(4)])
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  assert not errors, errors[:3]
  assert len(accepted) == 80
  assert conflicts[0] > 0, 'no explicit sequence ever lost a race: the test raced nothing'
  assert sorted(r['sequence'] for r in accepted) == list(range(1, 81))
  assert _sequences_by_key(kafka, topic) == {'racer': list(range(1, 81))}


# --- one writer per topic: the lease ------------------------------------------------------------

def _health(w: Running, token: bool = True):
  headers = HEADERS if token else {}
  return w.request('GET', '/health', headers=headers)


def test_a_second_writer_fences_the_first_and_no_key_is_numbered_twice(kafka, topic, tmp_path):
  """Writer A serves a client posting to one key; writer B starts on the same topic (its own
  state file). B fences A at once and waits for A's last appends to settle before it numbers
  anything; from then on A refuses every write (503), B continues the key's sequences, and
  the topic holds each key's sequences once, without gaps."""
  a = Running(kafka, topic, str(tmp_path / 'a.db'), ack_timeout=2, lease_ms=1500)
  acked_by_a: List[Dict[str, Any]] = []
  refused_by_a: List[Dict[str, Any]] = []
  stop = threading.Event()

  def client_of_a() -> None:
    while not stop.is_set():
      try:
        s, body, _ = a.post(event('shared-key'))
      except OSError:
        continue
      (acked_by_a if s == 201 else refused_by_a).append(body)
      if refused_by_a and refused_by_a[-1].get('error', '').startswith('another writer'):
        stop.wait(0.05)

  client = threading.Thread(target=client_of_a)
  client.start()
  b = None
  try:
    deadline = time.monotonic() + 30
    while len(acked_by_a) < 20 and time.monotonic() < deadline:
      time.sleep(0.01)
    assert len(acked_by_a) >= 20, 'writer A did not write'
    started = time.monotonic()
    b = Running(kafka, topic, str(tmp_path / 'b.db'), ack_timeout=2)
    took = time.monotonic() - started
    # B waited for A's lease (1.5 s) + ack timeout (2 s) + margin (2 s) after fencing it.
    assert took >= 5.5, took
    s, health, _ = _health(b)
    assert s == 200 and health['lease']['took_over_from'] == a.writer.lease.holder
    # A learns it was fenced at its next renewal (every second): its writes are refused.
    deadline = time.monotonic() + 10
    while not any('another writer took over' in r.get('error', '') for r in refused_by_a):
      assert time.monotonic() < deadline, refused_by_a[-3:]
      time.sleep(0.05)
    n_a = len(acked_by_a)
    s, body, _ = a.post(event('shared-key'))
    assert s == 503 and 'another writer took over' in body['error']
    s, health, _ = _health(a)
    assert s == 503 and health['status'] == 'fenced'
    s, live, _ = _health(a, token=False)
    assert (s, live) == (503, {'status': 'unavailable'})
    # B continues the key where A's acknowledged writes ended.
    s, r, _ = b.post(event('shared-key'))
    assert s == 201 and r['sequence'] == n_a + 1, (r, n_a)
  finally:
    stop.set()
    client.join(30)
    if b is not None:
      b.stop()
    a.stop()
  assert len(acked_by_a) == n_a  # nothing acknowledged by A after it was fenced
  assert _sequences_by_key(kafka, topic) == {'shared-key': list(range(1, n_a + 2))}


def test_a_writer_that_stopped_cleanly_is_taken_over_at_once(kafka, topic, tmp_path):
  a = Running(kafka, topic, str(tmp_path / 'w.db'))
  try:
    holder = a.writer.lease.holder
    assert a.post(event('u1'))[0] == 201
  finally:
    a.stop()
  started = time.monotonic()
  b = Running(kafka, topic, str(tmp_path / 'w.db'))
  try:
    assert time.monotonic() - started < 5.5  # no settle wait: A said it released the lease
    s, health, _ = _health(b)
    assert health['lease']['took_over_from'] == holder and health['lease']['waited_s'] == 0
    assert b.post(event('u1'))[1]['sequence'] == 2
  finally:
    b.stop()


def test_cli_writer_exits_1_when_another_writer_takes_its_topic(kafka, topic, tmp_path):
  env = dict(os.environ, **{writer_service.TOKENS_ENV: TOKEN})
  port = free_port()
  proc = subprocess.Popen(_serve_cmd('writer', '--bootstrap', kafka, '--topic', topic, '--port',
                                     str(port), '--state', str(tmp_path / 'cli.db'),
                                     '--ack-timeout', '2'),
                          env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
  b = None
  try:
    _wait_listening(proc)
    b = Running(kafka, topic, str(tmp_path / 'b.db'), ack_timeout=2)
    rest = proc.communicate(timeout=60)[1]
  finally:
    proc.kill()
    if b is not None:
      b.stop()
  assert proc.returncode == 1, rest
  assert 'another writer took over topic' in rest and 'Traceback' not in rest


# --- event_time: what the log accepts, at the door (issue 15, item 5) ----------------------------

def _iso_in(seconds: float) -> str:
  import datetime
  t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
  return t.strftime('%Y-%m-%dT%H:%M:%S.%fZ')


def test_an_event_time_kafka_would_refuse_is_400_at_the_door_and_sinks_no_retry(writer, kafka, topic):
  """Kafka 4 refuses timestamps more than an hour ahead of the broker's clock
  (message.timestamp.after.max.ms), and would refuse every retry. The writer refuses such an
  event with 400 naming the limit; a batch is all-or-nothing at the door, so the batch holding
  it writes nothing and says which event is at fault; the good events alone then go through."""
  far = event('u1', 'p9', event_time=_iso_in(2 * 3600))
  s, body, _ = writer.post(far)
  assert s == 400, body
  reason = body['events'][0]['reason']
  assert 'ahead of the writer\'s clock' in reason and 'at most 59 min 55 s ahead' in reason
  assert 'message.timestamp.after.max.ms is 1 h' in reason
  assert body['event_time_limits']['max_ahead_ms'] == 3_595_000
  good = [event('u1', 'p1', event_time=_iso_in(0)), event('u2', 'p2', event_time=_iso_in(50 * 60))]
  s, body, _ = writer.post([good[0], far, good[1]])
  assert s == 400 and 'all-or-nothing' in body['error']
  assert [e['index'] for e in body['events']] == [1]
  assert sum(end_offsets(kafka, topic)) == 0
  # The same good events without the bad one: written (50 minutes ahead is within the limit,
  # and Kafka itself accepts it).
  s, body, _ = writer.post(good)
  assert s == 201 and [r['sequence'] for r in body['receipts']] == [1, 1]
  assert sum(end_offsets(kafka, topic)) == 2


def test_a_topics_own_timestamp_limit_in_the_past_is_read_and_stated(kafka, tmp_path):
  """A topic configured to refuse old timestamps (message.timestamp.before.max.ms = 1 day)."""
  from confluent_kafka.admin import AdminClient, NewTopic
  name = f'writer-old-{uuid.uuid4().hex[:8]}'
  admin = AdminClient({'bootstrap.servers': kafka})
  admin.create_topics([NewTopic(name, 3, 1, config={
      'message.timestamp.before.max.ms': str(86_400_000)})])[name].result(30)
  w = Running(kafka, name, str(tmp_path / 'w.db'), ack_timeout=5)
  try:
    s, body, _ = w.post(event('u1', event_time=_iso_in(-2 * 86400)))
    assert s == 400, body
    assert 'behind the writer\'s clock' in body['events'][0]['reason']
    assert 'message.timestamp.before.max.ms is 1 d' in body['events'][0]['reason']
    s, r, _ = w.post(event('u1', event_time=_iso_in(-3600)))
    assert s == 201 and r['sequence'] == 1
  finally:
    w.stop()


def test_numbers_sent_as_strings_need_ascii_digits(writer, kafka, topic):
  for quantity in ('٣', '１', '²'):
    s, body, _ = writer.post(event('u1', quantity=quantity))
    assert s == 400, (quantity, body)
  s, r, _ = writer.post(event('u1', quantity='3'))
  assert s == 201 and 'data.quantity converted from a string' in r['repairs']
  assert sum(end_offsets(kafka, topic)) == 1


def test_health_without_a_token_shows_only_liveness(writer, topic):
  s, body, headers = _health(writer, token=False)
  assert (s, body) == (200, {'status': 'ok'})
  s, body, _ = _health(writer)
  assert s == 200 and body['topic'] == topic and 'receipts' in body
  s, body, _ = writer.request('GET', '/health', headers={'Authorization': 'Bearer wrong-token-0123456789'})
  assert s == 401


def test_stage_timing_is_answered_only_when_asked(writer, kafka, topic):
  """``Sourcebeam-Timing`` on a POST: the answer says when the writer received it, began
  appending, had Kafka's acknowledgement, recorded the receipt and answered, in that order;
  without the header nothing is said."""
  from sourcebeam.pipelines.serve import TIMING_HEADER, parse_timing
  status, _, headers = writer.post(event('u1'))
  assert status == 201 and TIMING_HEADER not in headers
  before = time.time()
  status, body, headers = writer.post([event('u1', 'p2'), event('u2')],
                                      headers=dict(HEADERS, **{TIMING_HEADER: '1'}))
  after = time.time()
  assert status == 201 and len(body['receipts']) == 2
  marks = parse_timing(headers[TIMING_HEADER])
  assert list(marks) == ['received', 'appending', 'acked', 'recorded', 'answered']
  stages = list(marks.values())
  assert before <= stages[0] and stages == sorted(stages) and stages[-1] <= after
