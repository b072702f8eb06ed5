"""The event writer: ``POST /events`` appends events to Kafka and answers with write receipts.

Hello, Retail!'s writer returned a receipt that nothing used. Here the receipt
``{topic, partition, offset, event_id}`` (and its compact form ``after``,
``topic:partition:offset``) is what a reader passes to the view API to read its
own write (effect after cause).

A request (one event, or a JSON array of events: a batch) goes through:

1. a bearer token (``SOURCEBEAM_WRITER_TOKENS`` or ``--tokens-file``; never in code,
   never logged): 401 without one or with a wrong one;
2. the publishing boundary (:func:`schemas.validation.validate_envelope`, the same
   rules as the publish pipeline): any invalid event refuses the whole batch, 400
   with the reason of each; ``event_id`` is assigned (a UUID) where missing;
3. in one append thread, so sequences and Kafka order agree (concurrent requests
   are appended together: one producer flush, one SQLite commit): events whose ``event_id``
   already has a receipt are answered with that first receipt and not appended
   again; the others get the key's next ``sequence`` where missing, and are
   produced with the partition key as the Kafka message key (so a key's events
   land in one partition, in order; murmur2, like Java clients) by an idempotent
   producer with ``acks=all``;
4. only after the broker acknowledged every event: receipts and the keys' last
   sequences are recorded in one SQLite transaction (``--state``), then answered.

Guarantees, and the crash window. Kafka is the source of truth, the SQLite file
a cache of it. A crash (or a lost acknowledgement) between the broker's ack and
the SQLite commit leaves events in Kafka without receipts; so at start-up, and
before the next write after any failed or timed-out produce, the writer reads
each partition from past its last recorded offset to the end and records the
receipts and sequences of what it finds there. Hence, with a single writer per
topic: every acknowledged event is in Kafka exactly once per ``event_id`` (a
retry with the same ``event_id`` returns the first receipt, even across a crash
and restart); sequences of a key never repeat and never skip after a restart.
An event whose produce failed is answered 503 and may or may not be in Kafka;
retrying it with the same ``event_id`` is always safe. A batch is all-or-nothing
at validation; at append, Kafka has no multi-partition atomicity here, so on a
broker failure the 503 lists the receipts of the events that were acknowledged
and the ``event_id`` of those that were not (retry the batch: done ones answer
with their receipts). A retried ``event_id`` whose content differs is still
answered with the first receipt: the first write wins.
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Set, Tuple

from sourcebeam.pipelines.apps import load_app
from sourcebeam.pipelines.cli import UsageError
from sourcebeam.pipelines.serve import (Answer, HttpError, make_server, method_not_allowed, not_found,
                             serve_until_stopped)
from sourcebeam.schemas.envelope import to_json
from sourcebeam.schemas.registry import Registry
from sourcebeam.schemas.validation import DEFAULT_MAX_EVENT_BYTES, Invalid, validate_envelope
from sourcebeam.transforms.kafka_retry import retry_transient

log = logging.getLogger('sourcebeam.writer')

TOKENS_ENV = 'SOURCEBEAM_WRITER_TOKENS'
ROUTES = {'/events': 'POST', '/health': 'GET'}


# --- tokens ----------------------------------------------------------------------------------

def load_tokens(tokens_file: Optional[str] = None,
                environ: Mapping[str, str] = os.environ) -> Set[str]:
  """Bearer tokens from a file (one a line, ``#`` comments) or ``$SOURCEBEAM_WRITER_TOKENS``."""
  if tokens_file:
    try:
      with open(tokens_file, encoding='utf-8') as f:
        lines = f.read().splitlines()
    except OSError as e:
      raise UsageError(f'cannot read the tokens file {tokens_file}: {e.strerror}') from None
    tokens = {line.strip() for line in lines if line.strip() and not line.lstrip().startswith('#')}
  else:
    tokens = {t.strip() for t in environ.get(TOKENS_ENV, '').split(',') if t.strip()}
  if not tokens:
    raise UsageError(f'no bearer tokens configured: set ${TOKENS_ENV} (comma-separated) or '
                     'pass --tokens-file; writes need a token')
  short = [t for t in tokens if len(t) < 16]
  if short:
    raise UsageError(f'{len(short)} configured token(s) shorter than 16 characters; use longer ones')
  return tokens


def check_token(headers: Mapping[str, str], tokens: Iterable[str]) -> None:
  """401 unless the Authorization header carries one of ``tokens`` (compared in constant time)."""
  challenge = {'WWW-Authenticate': 'Bearer realm="sourcebeam"'}
  auth = headers.get('Authorization') or ''
  scheme, _, given = auth.partition(' ')
  if scheme.lower() != 'bearer' or not given.strip():
    raise HttpError(401, 'a bearer token is required (Authorization: Bearer <token>)', challenge)
  given_b = given.strip().encode('utf-8')
  ok = False
  for t in tokens:
    ok |= hmac.compare_digest(given_b, t.encode('utf-8'))
  if not ok:
    raise HttpError(401, 'the bearer token is not valid', challenge)


# --- receipts and sequences (SQLite) -------------------------------------------------------------

class WriterState:
  """Receipts by event_id, the last sequence of each key, and how far each partition was
  reconciled with Kafka. One SQLite file; used under the writer's ``state_lock``."""

  def __init__(self, path: str):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    self.conn.execute('PRAGMA journal_mode=WAL')
    self.conn.execute('PRAGMA synchronous=FULL')  # a receipt we answered must survive a crash
    self.conn.executescript('''
      CREATE TABLE IF NOT EXISTS receipts (
        event_id TEXT PRIMARY KEY, topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL,
        kafka_offset INTEGER NOT NULL, partition_key TEXT NOT NULL, sequence INTEGER NOT NULL);
      CREATE INDEX IF NOT EXISTS receipts_position ON receipts (topic, kafka_partition, kafka_offset);
      CREATE TABLE IF NOT EXISTS sequences (
        partition_key TEXT PRIMARY KEY, last_sequence INTEGER NOT NULL);
      CREATE TABLE IF NOT EXISTS reconciled (
        topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
        PRIMARY KEY (topic, kafka_partition));
    ''')

  def close(self) -> None:
    self.conn.close()

  def receipt(self, event_id: str) -> Optional[Dict[str, Any]]:
    row = self.conn.execute(
        'SELECT topic, kafka_partition, kafka_offset, partition_key, sequence FROM receipts '
        'WHERE event_id = ?', (event_id,)).fetchone()
    if row is None:
      return None
    return make_receipt(row[0], row[1], row[2], event_id, row[3], row[4])

  def last_sequence(self, key: str) -> int:
    row = self.conn.execute('SELECT last_sequence FROM sequences WHERE partition_key = ?',
                            (key,)).fetchone()
    return row[0] if row else 0

  def count(self) -> int:
    return self.conn.execute('SELECT COUNT(*) FROM receipts').fetchone()[0]

  def resume_offset(self, topic: str, partition: int) -> int:
    """Where reconciliation of a partition starts: the end of the last fully acknowledged
    group (everything before it has its receipt), or 0 for a partition never seen."""
    row = self.conn.execute('SELECT next_offset FROM reconciled WHERE topic = ? AND '
                            'kafka_partition = ?', (topic, partition)).fetchone()
    return row[0] if row else 0

  def record(self, receipts: List[Dict[str, Any]],
             reconciled: Optional[Dict[Tuple[str, int], int]] = None) -> int:
    """Records receipts (first one per event_id wins) and raises the keys' last sequences,
    in one transaction. Returns how many receipts were new."""
    new = 0
    self.conn.execute('BEGIN IMMEDIATE')
    try:
      for r in receipts:
        cur = self.conn.execute(
            'INSERT OR IGNORE INTO receipts (event_id, topic, kafka_partition, kafka_offset, '
            'partition_key, sequence) VALUES (?, ?, ?, ?, ?, ?)',
            (r['event_id'], r['topic'], r['partition'], r['offset'], r['partition_key'],
             r['sequence']))
        new += cur.rowcount
        self.conn.execute(
            'INSERT INTO sequences (partition_key, last_sequence) VALUES (?, ?) '
            'ON CONFLICT (partition_key) DO UPDATE SET '
            'last_sequence = MAX(last_sequence, excluded.last_sequence)',
            (r['partition_key'], r['sequence']))
      for (topic, partition), next_offset in (reconciled or {}).items():
        self.conn.execute(
            'INSERT INTO reconciled (topic, kafka_partition, next_offset) VALUES (?, ?, ?) '
            'ON CONFLICT (topic, kafka_partition) DO UPDATE SET '
            'next_offset = MAX(next_offset, excluded.next_offset)', (topic, partition, next_offset))
      self.conn.execute('COMMIT')
    except BaseException:
      self.conn.execute('ROLLBACK')
      raise
    return new


def make_receipt(topic: str, partition: int, offset: int, event_id: str, partition_key: str,
                 sequence: int) -> Dict[str, Any]:
  return {'topic': topic, 'partition': partition, 'offset': offset, 'event_id': event_id,
          'partition_key': partition_key, 'sequence': sequence,
          'after': f'{topic}:{partition}:{offset}'}


# --- Kafka -------------------------------------------------------------------------------------

class KafkaLog:
  """The topic, through confluent-kafka: an idempotent producer (acks=all) and a reader of
  partition tails for reconciliation."""

  def __init__(self, bootstrap: str, topic: str, partitions: int, ack_timeout: float):
    from confluent_kafka import Producer
    self.bootstrap, self.topic, self.ack_timeout = bootstrap, topic, ack_timeout
    self.producer = Producer({
        'bootstrap.servers': bootstrap,
        'client.id': 'sourcebeam-writer',
        'enable.idempotence': True,   # acks=all, no duplicates or reordering on internal retries
        'acks': 'all',
        'partitioner': 'murmur2_random',  # the Java clients' partitioner: same key, same partition
        'linger.ms': 2,
        'message.timeout.ms': int(ack_timeout * 1000),
        'socket.timeout.ms': 10000,
        'logger': log,  # librdkafka's messages through Python logging, not raw stderr
    })
    self.partitions = self._ensure_topic(partitions)

  def _ensure_topic(self, partitions: int) -> List[int]:
    from confluent_kafka.admin import AdminClient, NewTopic
    md = self.producer.list_topics(timeout=15)
    t = md.topics.get(self.topic)
    if t is None or t.error is not None:
      admin = AdminClient({'bootstrap.servers': self.bootstrap, 'logger': log})
      futures = admin.create_topics([NewTopic(self.topic, partitions, 1)], request_timeout=15)
      try:
        futures[self.topic].result(timeout=30)
      except Exception as e:  # TOPIC_ALREADY_EXISTS from a concurrent creation is fine
        if 'already exists' not in str(e).lower():
          raise
      deadline = time.monotonic() + 30
      while True:
        t = self.producer.list_topics(self.topic, timeout=15).topics.get(self.topic)
        # A new topic's partitions exist before their leaders are elected; reading an
        # offset before then is NOT_LEADER_FOR_PARTITION.
        if (t is not None and t.error is None and t.partitions and
            all(pm.leader >= 0 for pm in t.partitions.values())):
          break
        if time.monotonic() > deadline:
          raise RuntimeError(f'topic {self.topic} did not appear after creating it')
        time.sleep(0.2)
    return sorted(t.partitions)

  def append(self, messages: List[Tuple[bytes, bytes, int]]) -> List[Tuple[Optional[Tuple[int, int]], Optional[str]]]:
    """Produces ``(key, value, timestamp_ms)`` messages in order; per message
    ``((partition, offset), None)`` once acknowledged, or ``(None, reason)``.

    The Kafka timestamp is the event's ``event_time``: a streaming pipeline reads it
    as the element's event time (``run.py stream``), so windows and watermarks follow
    when things happened, not when the writer was reached."""
    results: List[Any] = [None] * len(messages)

    def done(i):
      def cb(err, msg):
        results[i] = (None, str(err)) if err is not None else ((msg.partition(), msg.offset()), None)
      return cb

    for i, (key, value, timestamp) in enumerate(messages):
      while True:
        try:
          self.producer.produce(self.topic, key=key, value=value, timestamp=timestamp,
                                on_delivery=done(i))
          break
        except BufferError:  # the local queue is full: let deliveries drain
          self.producer.poll(0.05)
    remaining = self.producer.flush(self.ack_timeout + 5)
    return [r if r is not None else
            (None, f'no acknowledgement within {self.ack_timeout}s ({remaining} pending)')
            for r in results]

  def read_tail(self, partition: int, start: int) -> Tuple[Iterator[Any], int]:
    """The messages of a partition from ``start`` to its end now (a lazy iterator: a long
    tail is never held in memory), and that end offset."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition
    consumer = Consumer({'bootstrap.servers': self.bootstrap, 'group.id': f'sourcebeam-writer-{uuid.uuid4()}',
                         'enable.auto.commit': False, 'auto.offset.reset': 'earliest',
                         'isolation.level': 'read_uncommitted', 'enable.partition.eof': True,
                         'logger': log})
    try:
      low, high = retry_transient(
          lambda: consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=15))
    except BaseException:
      consumer.close()
      raise
    start = max(start, low)

    def messages() -> Iterator[Any]:
      try:
        if start >= high:
          return
        consumer.assign([TopicPartition(self.topic, partition, start)])
        stalled = time.monotonic() + 30  # no message for this long: the broker is not answering
        while True:
          msg = consumer.poll(1.0)
          if msg is None:
            if time.monotonic() > stalled:
              raise RuntimeError(f'reading partition {partition} towards offset {high} stalled')
            continue
          if msg.error() is not None:
            if msg.error().code() == KafkaError._PARTITION_EOF:
              return  # the end: everything up to the high watermark was read
            raise RuntimeError(f'reading partition {partition}: {msg.error()}')
          stalled = time.monotonic() + 30
          yield msg
          if msg.offset() >= high - 1:
            return
      finally:
        consumer.close()

    return messages(), high

  def healthy(self) -> bool:
    try:
      self.producer.list_topics(self.topic, timeout=2)
      return True
    except Exception:
      return False

  def close(self) -> None:
    if self.producer is not None:
      self.producer.flush(5)
      self.producer = None  # librdkafka's client is destroyed with its last reference


# --- the writer -----------------------------------------------------------------------------------

class _Request:
  """One POST waiting for the append thread: its envelopes, and its answer when done."""

  def __init__(self, envelopes: List[Tuple[Dict[str, Any], bool, List[str]]], single: bool):
    self.envelopes, self.single = envelopes, single
    self.done = threading.Event()
    self.answer: Optional[Answer] = None
    self.error: Optional[BaseException] = None


class Writer:
  """The plain-Python writer behind ``POST /events``; :meth:`handle` gives ``(status, body, headers)``.

  Request threads validate; one append thread does everything that must be in
  order (receipt look-ups, sequence assignment, produce, record). It takes every
  request waiting when it starts a round (group commit: one producer flush and
  one SQLite transaction for all of them), so concurrent clients share flushes
  instead of queueing behind each other's.
  """

  def __init__(self, kafka_log: KafkaLog, state: WriterState, tokens: Set[str],
               registry: Registry, max_body_bytes: int = 1 << 20, max_batch: int = 1000,
               max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, max_group_events: int = 5000):
    self.log, self.state, self.tokens = kafka_log, state, tokens
    self.registry = registry  # the app's schemas: what the writer accepts
    self.max_body_bytes, self.max_batch, self.max_event_bytes = max_body_bytes, max_batch, max_event_bytes
    self.max_group_events = max_group_events
    self.state_lock = threading.Lock()  # the SQLite connection: append thread and /health
    self.needs_reconcile = True
    self._reconcile()
    self.requests: 'queue.Queue[Optional[_Request]]' = queue.Queue()
    self.thread = threading.Thread(target=self._append_loop, name='writer-append', daemon=True)
    self.thread.start()

  def close(self) -> None:
    self.requests.put(None)
    self.thread.join(timeout=60)
    self.log.close()
    self.state.close()

  # Route and token, before the body is read.
  def check(self, method: str, path: str, headers: Mapping[str, str]) -> None:
    route = urllib.parse.urlsplit(path).path
    if route not in ROUTES:
      raise not_found(route, ROUTES)
    if method != ROUTES[route]:
      raise method_not_allowed(method, ROUTES[route])
    if route == '/events':
      check_token(headers, self.tokens)

  def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
    self.check(method, path, headers)
    if urllib.parse.urlsplit(path).path == '/health':
      with self.state_lock:
        count = self.state.count()
      ok = self.log.healthy() and self.thread.is_alive()
      return (200 if ok else 503), {'status': 'ok' if ok else 'kafka unreachable',
                                    'topic': self.log.topic, 'partitions': self.log.partitions,
                                    'receipts': count}, {}
    return self.post_events(body)

  def post_events(self, body: bytes) -> Answer:
    events, single = parse_body(body, self.max_batch)
    envelopes, errors = [], []
    for i, obj in enumerate(events):
      try:
        envelopes.append(self._validate(obj))
      except Invalid as e:
        errors.append({'index': i, 'reason': str(e)})
    if errors:
      raise HttpError(400, f'{len(errors)} of {len(events)} event(s) are invalid; nothing was written',
                      events=errors)
    ids = [env['event_id'] for env, _, _ in envelopes]
    dup = sorted({e for e in ids if ids.count(e) > 1})
    if dup:
      raise HttpError(400, f'event_id(s) repeated within one batch: {dup}; nothing was written')
    if not self.thread.is_alive():
      raise HttpError(503, 'the writer is shutting down')
    request = _Request(envelopes, single)
    self.requests.put(request)
    request.done.wait()
    if request.error is not None:
      raise request.error
    return request.answer

  def _validate(self, obj: Any) -> Tuple[Dict[str, Any], bool, List[str]]:
    """(envelope, sequence_given, repairs) or Invalid; assigns a UUID event_id where missing."""
    if not isinstance(obj, dict):
      raise Invalid(f'an event must be a JSON object, got {type(obj).__name__}')
    obj = dict(obj)
    repairs: List[str] = []
    if obj.get('event_id') in (None, ''):
      obj['event_id'] = str(uuid.uuid4())
      repairs.append('event_id assigned')
    seq_given = obj.get('sequence') is not None
    if not seq_given:
      obj['sequence'] = 1  # a placeholder for validation: the key's next sequence is set later
    raw = json.dumps(obj, separators=(',', ':'), ensure_ascii=False).encode('utf-8')
    if len(raw) > self.max_event_bytes:
      raise Invalid(f'event is {len(raw)} bytes, over the limit of {self.max_event_bytes} bytes')
    env = validate_envelope(obj, raw, repairs, self.registry)
    if not seq_given:
      repairs.append('sequence assigned')
    return env, seq_given, [r for r in repairs if r != 'schema_version set to the current version']

  # --- the append thread ----------------------------------------------------------------

  def _append_loop(self) -> None:
    while True:
      first = self.requests.get()
      if first is None:
        return
      group, n, stop = [first], len(first.envelopes), False
      while n < self.max_group_events:
        try:
          more = self.requests.get_nowait()
        except queue.Empty:
          break
        if more is None:
          stop = True
          break
        group.append(more)
        n += len(more.envelopes)
      try:
        self._append_group(group)
      except BaseException as e:  # answer every waiting request, whatever happened
        log.exception('appending a group of %d request(s) failed', len(group))
        for r in group:
          if not r.done.is_set():
            r.error = e if isinstance(e, HttpError) else HttpError(
                500, 'internal error while appending; retry with the same event_id (safe)')
            r.done.set()
      if stop:
        return

  def _append_group(self, group: List[_Request]) -> None:
    if self.needs_reconcile:
      try:
        self._reconcile()
      except Exception as e:
        log.warning('reconciling with Kafka failed: %s', e)
        raise HttpError(503, 'the writer cannot reach Kafka to reconcile its receipts; '
                             'retry later (safe: no duplicates)') from None
    # Per request and event: a receipt already recorded, or the index of a message to append.
    plan: List[List[Tuple[str, Any]]] = []
    messages: List[Tuple[bytes, bytes, int]] = []
    pending: List[Tuple[Dict[str, Any], List[str]]] = []
    in_group: Dict[str, int] = {}
    next_seq: Dict[str, int] = {}
    with self.state_lock:
      for request in group:
        steps = []
        for env, seq_given, repairs in request.envelopes:
          event_id = env['event_id']
          first = self.state.receipt(event_id)
          if first is not None:
            steps.append(('recorded', first))
            continue
          if event_id in in_group:  # the same event sent concurrently: appended once
            steps.append(('again', in_group[event_id]))
            continue
          key = env['partition_key']
          last = next_seq.get(key, self.state.last_sequence(key))
          if not seq_given:
            env['sequence'] = last + 1
          next_seq[key] = max(last, env['sequence'])
          in_group[event_id] = len(messages)
          steps.append(('new', len(messages)))
          messages.append((key.encode('utf-8'), to_json(env).encode('utf-8'), env['event_time']))
          pending.append((env, repairs))
        plan.append(steps)
    results = self.log.append(messages) if messages else []
    receipts: List[Optional[Dict[str, Any]]] = []
    for (env, _), (where, _) in zip(pending, results):
      receipts.append(None if where is None else make_receipt(
          self.log.topic, where[0], where[1], env['event_id'], env['partition_key'], env['sequence']))
    acked = [r for r in receipts if r is not None]
    # Everything below a fully acknowledged group's offsets has its receipt: reconciliation
    # may start there. After a failure it must not: a message whose ack was lost may sit
    # below an acknowledged one, so the next round re-reads from the last known-good point.
    complete = len(acked) == len(messages)
    known: Dict[Tuple[str, int], int] = {}
    if complete:
      for r in acked:
        k = (r['topic'], r['partition'])
        known[k] = max(known.get(k, 0), r['offset'] + 1)
    if acked:
      with self.state_lock:
        self.state.record(acked, known)
    if not complete:
      self.needs_reconcile = True  # a failed produce may still have reached the log
    for request, steps in zip(group, plan):
      request.answer, request.error = self._answer(request, steps, pending, results, receipts)
      request.done.set()

  def _answer(self, request: _Request, steps, pending, results, receipts):
    out, failed, appended = [], [], False
    for i, (kind, ref) in enumerate(steps):
      if kind == 'recorded':
        out.append(dict(ref, duplicate=True))
      elif receipts[ref] is None:
        failed.append({'index': i, 'event_id': pending[ref][0]['event_id'],
                       'reason': results[ref][1]})
      elif kind == 'again':
        out.append(dict(receipts[ref], duplicate=True))
      else:
        r = dict(receipts[ref], duplicate=False)
        if pending[ref][1]:
          r['repairs'] = pending[ref][1]
        out.append(r)
        appended = True
    if failed:
      return None, HttpError(
          503, f'the broker did not acknowledge {len(failed)} of {len(steps)} event(s); '
               'retry with the same event_id (safe: no duplicates)', receipts=out, failed=failed)
    status = 201 if appended else 200
    return (status, out[0] if request.single else {'receipts': out}, {}), None

  def _reconcile(self, chunk: int = 5000) -> None:
    """Records receipts and sequences of events in Kafka past what the state file knows:
    closes the window between a broker ack and our commit (see the module docstring)."""
    from sourcebeam.schemas.envelope import from_json
    new = 0
    for p in self.log.partitions:
      with self.state_lock:
        start = self.state.resume_offset(self.log.topic, p)
      messages, end = self.log.read_tail(p, start)
      found = []
      for m in messages:
        try:
          env = from_json(m.value().decode('utf-8'))
          found.append(make_receipt(self.log.topic, m.partition(), m.offset(), env['event_id'],
                                    env['partition_key'], int(env['sequence'])))
        except (ValueError, KeyError, TypeError, AttributeError):
          log.warning('partition %d offset %d is not an envelope; passed over', p, m.offset())
        if len(found) >= chunk:
          with self.state_lock:
            new += self.state.record(found)
          found = []
      with self.state_lock:  # the partition's end is recorded only once all before it is
        new += self.state.record(found, {(self.log.topic, p): end})
    if new:
      log.warning('recovered %d receipt(s) of events in Kafka that were not recorded', new)
    self.needs_reconcile = False


def parse_body(body: bytes, max_batch: int) -> Tuple[List[Any], bool]:
  """The request body as a list of events, and whether it was a single event."""
  if not body.strip():
    raise HttpError(400, 'the body is empty; send one event (a JSON object) or a JSON array')
  try:
    doc = json.loads(body.decode('utf-8'))
  except UnicodeDecodeError:
    raise HttpError(400, 'the body is not UTF-8') from None
  except RecursionError:
    raise HttpError(400, 'malformed JSON: nested too deeply') from None
  except ValueError as e:
    raise HttpError(400, f'malformed JSON: {e}') from None
  if isinstance(doc, dict):
    return [doc], True
  if isinstance(doc, list):
    if not doc:
      raise HttpError(400, 'an empty batch; send at least one event')
    if len(doc) > max_batch:
      raise HttpError(413, f'a batch of {len(doc)} events is over the limit of {max_batch}',
                      limit_events=max_batch)
    return doc, False
  raise HttpError(400, f'the body must be an event (a JSON object) or a JSON array of events, '
                       f'got {type(doc).__name__}')


def build(bootstrap: str, topic: str, state_path: str, tokens: Set[str], registry: Registry,
          partitions: int = 3, max_body_bytes: int = 1 << 20, max_batch: int = 1000,
          ack_timeout: float = 30.0) -> Writer:
  return Writer(KafkaLog(bootstrap, topic, partitions, ack_timeout), WriterState(state_path),
                tokens, registry, max_body_bytes=max_body_bytes, max_batch=max_batch)


def run(args: argparse.Namespace) -> int:
  """``serve writer``: validate the options, connect to Kafka, serve until stopped."""
  tokens = load_tokens(args.tokens_file)
  if ':' in args.topic or ',' in args.topic:
    raise UsageError(f'topic {args.topic!r} may not contain ":" or "," (receipts use them)')
  for name in ('max_body_bytes', 'max_batch', 'partitions'):
    if getattr(args, name) < 1:
      raise UsageError(f'--{name.replace("_", "-")} must be at least 1')
  app = load_app(args.app)
  try:
    writer = build(args.bootstrap, args.topic, args.state, tokens, app.registry, args.partitions,
                   args.max_body_bytes, args.max_batch, args.ack_timeout)
  except Exception as e:  # Kafka unreachable, unwritable state file...
    raise UsageError(f'the writer could not start: {e}') from None
  try:
    server = make_server(writer, args.host, args.port)
  except OSError as e:
    writer.close()
    raise UsageError(f'cannot listen on {args.host}:{args.port}: {e.strerror}') from None
  return serve_until_stopped(server, writer.close, f'event writer (topic {args.topic})')
