"""The event writer: ``POST /events`` appends events to Kafka and answers with write receipts.

Hello, Retail!'s writer returned a receipt that nothing used. Here the receipt
``{topic, partition, offset, event_id}`` (and its compact form ``after``,
``topic:partition:offset``) is what a reader passes to the view API to read its
own write (effect after cause).

A request (one event, or a JSON array of events: a batch) goes through:

1. a bearer token (``SOURCEBEAM_WRITER_TOKENS`` or ``--tokens-file``; never in code,
   never logged): 401 without one or with a wrong one, before the body is read;
2. the door, all-or-nothing for a batch: the publishing boundary
   (:func:`schemas.validation.validate_envelope`, the same rules as the publish
   pipeline; numbers sent as strings must use ASCII digits), and an ``event_time``
   the topic accepts (:class:`EventTimeLimits`: Kafka refuses a message whose
   timestamp is too far from the broker's clock, by default more than an hour ahead).
   Any event refused here refuses the whole batch: 400 with the index and reason of
   each, nothing written. ``event_id`` is assigned (a UUID) where missing;
3. in one append thread, so sequences and Kafka order agree (concurrent requests
   are appended together: one producer flush, one SQLite commit): events whose
   ``event_id`` already has a receipt are answered with that first receipt and not
   appended again. **Sequences belong to the writer**: an event without ``sequence``
   gets its key's next one; an event with one is accepted only if it is exactly
   the key's next (optimistic concurrency, like an expected version): otherwise the
   request is refused, 409 with the expected sequence, nothing of it written.
   Events are produced with the partition key as the Kafka message key (one
   partition per key, in order; murmur2, like Java clients) by an idempotent
   producer with ``acks=all``, and only while the writer holds its lease on the
   topic (:mod:`pipelines.writer_lease`: a second writer fences the first, so two
   writers never number one key);
4. only after the broker acknowledged every event: receipts and the keys' last
   sequences are recorded in one SQLite transaction (``--state``), then answered.

Guarantees, and the crash window. Kafka is the source of truth, the SQLite file
a cache of it. A crash (or a lost acknowledgement) between the broker's ack and
the SQLite commit leaves events in Kafka without receipts; so at start-up (after
taking the lease), and before the next write after any failed or timed-out
produce, the writer reads each partition from past its last recorded offset to
the end and records the receipts and sequences of what it finds there. Hence:
every acknowledged event is in Kafka exactly once per ``event_id`` (a retry with
the same ``event_id`` returns the first receipt, even across a crash and
restart); a key's sequences are 1, 2, 3... in offset order, never repeated or
skipped. An event whose produce failed is answered 503 and may or may not be in
Kafka; retrying it with the same ``event_id`` is always safe. Kafka has no
multi-partition atomicity for non-transactional writes, so on a broker failure
the 503 lists the receipts of the events that were acknowledged and the
``event_id`` of those that were not (retry the batch: done ones answer with their
receipts). A retried ``event_id`` whose content differs is still answered with the
first receipt: the first write wins.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import json
import logging
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
import uuid
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple

from sourcebeam.pipelines.apps import load_app
from sourcebeam.pipelines.cli import UsageError
from sourcebeam.pipelines.serve import (Answer, HttpError, check_http_arguments, check_token,
                                        load_tokens as _load_tokens, method_not_allowed, not_found,
                                        serve_until_stopped, timing_header, token_given,
                                        wants_timing)
from sourcebeam.pipelines.writer_lease import LEASE_MS, WriterLease, lease_topic
from sourcebeam.schemas.envelope import to_json
from sourcebeam.schemas.registry import Registry
from sourcebeam.schemas.validation import DEFAULT_MAX_EVENT_BYTES, Invalid, validate_envelope
from sourcebeam.transforms.kafka_retry import retry_transient

log = logging.getLogger('sourcebeam.writer')

TOKENS_ENV = 'SOURCEBEAM_WRITER_TOKENS'
ROUTES = {'/events': 'POST', '/health': 'GET'}
LONG_MAX = 2**63 - 1


# --- tokens ----------------------------------------------------------------------------------

def load_tokens(tokens_file: Optional[str] = None,
                environ: Mapping[str, str] = os.environ) -> Set[str]:
  """Bearer tokens from a file (one a line, ``#`` comments) or ``$SOURCEBEAM_WRITER_TOKENS``;
  writes always need one."""
  tokens = _load_tokens(TOKENS_ENV, tokens_file, environ)
  if not tokens:
    raise UsageError(f'no bearer tokens configured: set ${TOKENS_ENV} (comma-separated) or '
                     'pass --tokens-file; writes need a token')
  return tokens


# --- event times Kafka accepts -------------------------------------------------------------------

def _iso(millis: int) -> str:
  try:
    t = datetime.datetime.fromtimestamp(millis / 1000, datetime.timezone.utc)
  except (OverflowError, ValueError, OSError):
    return f'{millis} ms'
  return t.strftime('%Y-%m-%dT%H:%M:%S.') + f'{t.microsecond // 1000:03d}Z'


def _duration(ms: int) -> str:
  """``1 h``, ``59 min 55 s``, ``250 ms``: the two largest units that are not zero."""
  parts = []
  for unit, size in (('d', 86_400_000), ('h', 3_600_000), ('min', 60_000), ('s', 1000), ('ms', 1)):
    if ms >= size:
      parts.append(f'{ms // size} {unit}')
      ms %= size
  return ' '.join(parts[:2]) or '0 ms'


class EventTimeLimits:
  """The ``event_time`` values the topic accepts, checked at the door.

  The writer uses ``event_time`` as the Kafka timestamp (so a streaming read's event
  time is when things happened). With ``message.timestamp.type=CreateTime`` the
  broker refuses a message whose timestamp is more than
  ``message.timestamp.after.max.ms`` ahead of its clock (Kafka 4: one hour) or more
  than ``message.timestamp.before.max.ms`` behind it (default: no limit), and it
  would refuse a retry the same way. So such an event is refused here with 400,
  the limit stated. Margins: ``skew_ms`` for clocks that disagree, and an event
  must stay acceptable for ``settle_ms`` (the ack timeout) while it is appended.
  ``LogAppendTime`` topics take any timestamp (the broker replaces it).
  """

  def __init__(self, topic: str, timestamp_type: str = 'CreateTime',
               after_max_ms: int = 3_600_000, before_max_ms: int = LONG_MAX,
               settle_ms: int = 30_000, skew_ms: int = 5_000):
    self.topic, self.timestamp_type = topic, timestamp_type
    self.after_max_ms, self.before_max_ms = after_max_ms, before_max_ms
    self.settle_ms, self.skew_ms = settle_ms, skew_ms

  @property
  def max_ahead_ms(self) -> Optional[int]:
    if self.timestamp_type != 'CreateTime' or self.after_max_ms >= LONG_MAX // 2:
      return None
    return max(0, self.after_max_ms - self.skew_ms)

  @property
  def max_behind_ms(self) -> Optional[int]:
    if self.timestamp_type != 'CreateTime' or self.before_max_ms >= LONG_MAX // 2:
      return None
    return max(0, self.before_max_ms - self.skew_ms - self.settle_ms)

  def describe(self) -> Dict[str, Any]:
    return {'max_ahead_ms': self.max_ahead_ms, 'max_behind_ms': self.max_behind_ms,
            'timestamp_type': self.timestamp_type}

  def check(self, event_time: int, now_ms: Optional[int] = None) -> None:
    """Invalid (the reason naming the limit) for an event time the topic would refuse."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    ahead, behind = self.max_ahead_ms, self.max_behind_ms
    if ahead is not None and event_time > now + ahead:
      raise Invalid(
          f'event_time {_iso(event_time)} is {_duration(event_time - now)} ahead of the writer\'s '
          f'clock; topic {self.topic} accepts event times at most {_duration(ahead)} ahead (Kafka\'s '
          f'message.timestamp.after.max.ms is {_duration(self.after_max_ms)}, less '
          f'{_duration(self.skew_ms)} for clock skew): the latest accepted now is {_iso(now + ahead)}')
    if behind is not None and event_time < now - behind:
      raise Invalid(
          f'event_time {_iso(event_time)} is {_duration(now - event_time)} behind the writer\'s '
          f'clock; topic {self.topic} accepts event times at most {_duration(behind)} behind (Kafka\'s '
          f'message.timestamp.before.max.ms is {_duration(self.before_max_ms)}, less margins for '
          f'clock skew and the append): the earliest accepted now is {_iso(now - behind)}')


def _ascii_numbers(obj: Mapping[str, Any], repairs: List[str]) -> None:
  """Numbers sent as strings must use ASCII digits: the publishing boundary converts them
  with ``int()``/``float()``, which also take ``٣`` or ``１``."""
  for repair in repairs:
    if not repair.endswith(' converted from a string'):
      continue
    where = repair[:-len(' converted from a string')]
    value: Any = obj
    for part in where.split('.'):
      value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, str) and not value.isascii():
      raise Invalid(f'{where} {value!r} is not written with the digits 0-9')


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

# The broker's refusals that a retry meets again: the event itself is at fault, not the broker.
_PERMANENT = ('INVALID_TIMESTAMP', 'MSG_SIZE_TOO_LARGE', 'INVALID_RECORD', 'RECORD_LIST_TOO_LARGE',
              'INVALID_REQUIRED_ACKS', 'TOPIC_AUTHORIZATION_FAILED')


class KafkaLog:
  """The topic, through confluent-kafka: an idempotent producer (acks=all), a reader of
  partition tails for reconciliation, and the topic's timestamp limits."""

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
    self.partitions = self.ensure_topic(topic, partitions)
    self.limits = self._event_time_limits()

  def ensure_topic(self, name: str, partitions: int,
                   config: Optional[Dict[str, str]] = None) -> List[int]:
    """The topic's partitions, creating it first if it does not exist; waits for leaders."""
    from confluent_kafka.admin import AdminClient, NewTopic
    md = self.producer.list_topics(timeout=15)
    t = md.topics.get(name)
    if t is None or t.error is not None:
      admin = AdminClient({'bootstrap.servers': self.bootstrap, 'logger': log})
      futures = admin.create_topics([NewTopic(name, partitions, 1, config=dict(config or {}))],
                                    request_timeout=15)
      try:
        futures[name].result(timeout=30)
      except Exception as e:  # TOPIC_ALREADY_EXISTS from a concurrent creation is fine
        if 'already exists' not in str(e).lower():
          raise
      deadline = time.monotonic() + 30
      while True:
        t = self.producer.list_topics(name, timeout=15).topics.get(name)
        # A new topic's partitions exist before their leaders are elected; reading an
        # offset before then is NOT_LEADER_FOR_PARTITION.
        if (t is not None and t.error is None and t.partitions and
            all(pm.leader >= 0 for pm in t.partitions.values())):
          break
        if time.monotonic() > deadline:
          raise RuntimeError(f'topic {name} did not appear after creating it')
        time.sleep(0.2)
    return sorted(t.partitions)

  def _event_time_limits(self) -> EventTimeLimits:
    from confluent_kafka.admin import AdminClient, ConfigResource
    admin = AdminClient({'bootstrap.servers': self.bootstrap, 'logger': log})
    resource = ConfigResource(ConfigResource.Type.TOPIC, self.topic)
    settle = int(self.ack_timeout * 1000)
    try:
      config = list(admin.describe_configs([resource], request_timeout=15).values())[0].result(30)
      get = lambda k, default: config[k].value if k in config and config[k].value is not None else default
      return EventTimeLimits(self.topic, get('message.timestamp.type', 'CreateTime'),
                             int(get('message.timestamp.after.max.ms', 3_600_000)),
                             int(get('message.timestamp.before.max.ms', LONG_MAX)), settle)
    except Exception as e:  # no right to describe configs: assume Kafka 4's defaults
      log.warning('could not read the timestamp limits of topic %s (%s); assuming Kafka\'s defaults '
                  '(at most 1 h ahead)', self.topic, e)
      return EventTimeLimits(self.topic, settle_ms=settle)

  def append(self, messages: List[Tuple[bytes, bytes, int]],
             may_append: Callable[[], bool] = lambda: True,
             ack_times: Optional[List[Optional[float]]] = None
             ) -> List[Tuple[Optional[Tuple[int, int]], Optional[str], bool]]:
    """Produces ``(key, value, timestamp_ms)`` messages in order; per message
    ``((partition, offset), None, False)`` once acknowledged, or ``(None, reason, permanent)``.
    ``may_append`` is asked before each message is handed to the producer (the lease).
    ``ack_times``, a list as long as ``messages``, gets the Unix time each answer arrived.

    The Kafka timestamp is the event's ``event_time``: a streaming pipeline reads it
    as the element's event time (``run.py stream``), so windows and watermarks follow
    when things happened, not when the writer was reached."""
    results: List[Any] = [None] * len(messages)

    def done(i):
      def cb(err, msg):
        if ack_times is not None:
          ack_times[i] = time.time()
        results[i] = ((None, f'{err.name()}: {err.str()}', err.name() in _PERMANENT)
                      if err is not None else ((msg.partition(), msg.offset()), None, False))
      return cb

    for i, (key, value, timestamp) in enumerate(messages):
      if not may_append():
        results[i] = (None, 'the writer lost its lease on the topic before appending', False)
        continue
      while True:
        try:
          self.producer.produce(self.topic, key=key, value=value, timestamp=timestamp,
                                on_delivery=done(i))
          break
        except BufferError:  # the local queue is full: let deliveries drain
          self.producer.poll(0.05)
    remaining = self.producer.flush(self.ack_timeout + 5)
    return [r if r is not None else
            (None, f'no acknowledgement within {self.ack_timeout}s ({remaining} pending)', False)
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

  def close(self) -> bool:
    """Flushes and closes the producer; whether nothing was left in flight."""
    remaining = 0
    if self.producer is not None:
      remaining = self.producer.flush(5)
      self.producer = None  # librdkafka's client is destroyed with its last reference
    return remaining == 0


# --- the writer -----------------------------------------------------------------------------------

class _Request:
  """One POST for the append thread: its envelopes, and a future of its answer."""

  def __init__(self, envelopes: List[Tuple[Dict[str, Any], bool, List[str]]], single: bool):
    self.envelopes, self.single = envelopes, single
    self.future: 'concurrent.futures.Future[Answer]' = concurrent.futures.Future()
    # Stage times (Unix seconds) when the client asked for them (Sourcebeam-Timing), else None.
    self.times: Optional[Dict[str, Optional[float]]] = None


class Writer:
  """The plain-Python writer behind ``POST /events``.

  :meth:`post_events` (blocking) or the HTTP layer's :meth:`handle` (async) give
  ``(status, body, headers)``. Validation runs in a small thread pool; one append
  thread does everything that must be in order (receipt look-ups, sequence checks
  and assignment, produce, record). It takes every request waiting when it starts
  a round (group commit: one producer flush and one SQLite transaction for all of
  them), so concurrent clients share flushes instead of queueing behind each other's.
  A waiting POST holds no thread: it awaits its request's future.
  """

  def __init__(self, kafka_log: KafkaLog, state: WriterState, tokens: Set[str],
               registry: Registry, max_body_bytes: int = 1 << 20, max_batch: int = 1000,
               max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, max_group_events: int = 5000,
               lease: Optional[WriterLease] = None):
    self.log, self.state, self.tokens = kafka_log, state, tokens
    self.registry = registry  # the app's schemas: what the writer accepts
    self.max_body_bytes, self.max_batch, self.max_event_bytes = max_body_bytes, max_batch, max_event_bytes
    self.max_group_events = max_group_events
    self.lease = lease
    self.fatal: Callable[[str], None] = lambda reason: None  # serve_until_stopped: stop serving
    if lease is not None:
      lease.on_fenced = lambda reason: self.fatal(reason)
    self.state_lock = threading.Lock()  # the SQLite connection: append thread and /health
    self.needs_reconcile = True
    self._reconcile()
    self.pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix='writer-validate')
    self.requests: 'queue.Queue[Optional[_Request]]' = queue.Queue()
    self.thread = threading.Thread(target=self._append_loop, name='writer-append', daemon=True)
    self.thread.start()

  def close(self) -> None:
    self.requests.put(None)
    self.thread.join(timeout=60)
    self.pool.shutdown(wait=True)
    settled = self.log.close()
    if self.lease is not None:
      self.lease.release(clean=settled)
    self.state.close()

  # --- HTTP: routes and token before the body, then the answer ----------------------------

  def methods(self, path: str) -> List[str]:
    if path not in ROUTES:
      raise not_found(path, ROUTES)
    return [ROUTES[path]]

  def check(self, method: str, target: str, headers: Mapping[str, str]) -> None:
    route = urllib.parse.urlsplit(target).path
    if method not in self.methods(route):
      raise method_not_allowed(method, self.methods(route))
    if route == '/events':
      check_token(headers, self.tokens)

  async def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Answer:
    self.check(method, target, headers)
    loop = asyncio.get_running_loop()
    if urllib.parse.urlsplit(target).path == '/health':
      if token_given(headers, self.tokens):
        return await loop.run_in_executor(self.pool, self.health, True)
      return self.health(False)
    received = time.time() if wants_timing(headers) else None
    request = await loop.run_in_executor(self.pool, self.prepare, body)
    if received is None:
      return await asyncio.wrap_future(self.submit(request))
    request.times = {'received': received}
    status, payload, extra = await asyncio.wrap_future(self.submit(request))
    request.times['answered'] = time.time()
    return status, payload, dict(extra, **timing_header(request.times))

  def health(self, detailed: bool = False) -> Answer:
    """Liveness for anyone; with a valid token also the topic, the lease and the counts."""
    fenced = self.lease is not None and self.lease.fenced is not None
    alive = self.thread.is_alive() and not fenced
    if not detailed:
      return (200 if alive else 503), {'status': 'ok' if alive else 'unavailable'}, {}
    with self.state_lock:
      count = self.state.count()
    kafka_ok = self.log.healthy()
    ok = alive and kafka_ok
    body: Dict[str, Any] = {
        'status': 'ok' if ok else ('fenced' if fenced else 'kafka unreachable' if not kafka_ok
                                   else 'append thread stopped'),
        'topic': self.log.topic, 'partitions': self.log.partitions, 'receipts': count,
        'event_time_limits': self.log.limits.describe()}
    if self.lease is not None:
      prev = self.lease.previous or {}
      body['lease'] = {'holder': self.lease.holder, 'valid': self.lease.valid(),
                       'lease_topic': lease_topic(self.log.topic), 'renewals': self.lease.renewals,
                       'took_over_from': prev.get('holder'), 'waited_s': round(self.lease.waited_s, 3)}
      if fenced:
        body['lease']['fenced'] = self.lease.fenced
    return (200 if ok else 503), body, {}

  # --- the request, without HTTP ------------------------------------------------------------

  def post_events(self, body: bytes) -> Answer:
    """A POST's body -> its answer (blocking); HttpError for a refusal."""
    return self.submit(self.prepare(body)).result()

  def prepare(self, body: bytes) -> _Request:
    """Parses and validates a body at the door, all-or-nothing: HttpError 400 if any event is
    refused (each listed with its index and reason), nothing written."""
    events, single = parse_body(body, self.max_batch)
    envelopes, errors = [], []
    now_ms = int(time.time() * 1000)
    for i, obj in enumerate(events):
      try:
        envelopes.append(self._validate(obj, now_ms))
      except Invalid as e:
        errors.append({'index': i, 'reason': str(e)})
    if errors:
      detail: Dict[str, Any] = {'events': errors}
      if any('event_time' in e['reason'] and 'accepts event times' in e['reason'] for e in errors):
        detail['event_time_limits'] = self.log.limits.describe()
      raise HttpError(400, f'{len(errors)} of {len(events)} event(s) are invalid; nothing was '
                           'written (a batch is all-or-nothing at the door)', **detail)
    ids = [env['event_id'] for env, _, _ in envelopes]
    dup = sorted({e for e in ids if ids.count(e) > 1})
    if dup:
      raise HttpError(400, f'event_id(s) repeated within one batch: {dup}; nothing was written')
    return _Request(envelopes, single)

  def submit(self, request: _Request) -> 'concurrent.futures.Future[Answer]':
    if not self.thread.is_alive():
      raise HttpError(503, 'the writer is shutting down')
    self.requests.put(request)
    return request.future

  def _validate(self, obj: Any, now_ms: int) -> Tuple[Dict[str, Any], bool, List[str]]:
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
    env = validate_envelope(obj, raw, repairs, self.registry)  # the one call of the publishing boundary
    _ascii_numbers(obj, repairs)
    self.log.limits.check(env['event_time'], now_ms)
    if not seq_given:
      repairs.append('sequence assigned')
    return env, seq_given, [r for r in repairs if r != 'schema_version set to the current version']

  # --- the append thread ----------------------------------------------------------------

  def _append_loop(self) -> None:
    while True:
      first = self.requests.get()
      if first is None:
        return
      taken, n, stop = [first], len(first.envelopes), False
      while n < self.max_group_events:
        try:
          more = self.requests.get_nowait()
        except queue.Empty:
          break
        if more is None:
          stop = True
          break
        taken.append(more)
        n += len(more.envelopes)
      # A request whose client went away before its turn is dropped: nothing of it written.
      group = [r for r in taken if r.future.set_running_or_notify_cancel()]
      try:
        if group:
          self._append_group(group)
      except BaseException as e:  # answer every waiting request, whatever happened
        if not isinstance(e, HttpError):
          log.exception('appending a group of %d request(s) failed', len(group))
        for r in group:
          if not r.future.done():
            r.future.set_exception(e if isinstance(e, HttpError) else HttpError(
                500, 'internal error while appending; retry with the same event_id (safe)'))
      if stop:
        return

  def _append_group(self, group: List[_Request]) -> None:
    if self.lease is not None and not self.lease.valid():
      raise HttpError(503, f'{self.lease.why_not()}; nothing was written')
    if self.needs_reconcile:
      try:
        self._reconcile()
      except Exception as e:
        log.warning('reconciling with Kafka failed: %s', e)
        raise HttpError(503, 'the writer cannot reach Kafka to reconcile its receipts; '
                             'retry later (safe: no duplicates)') from None
    # Per request (None: refused) and event: a receipt already recorded, or the index of a
    # message to append.
    plan: List[Optional[List[Tuple[str, Any]]]] = []
    messages: List[Tuple[bytes, bytes, int]] = []
    pending: List[Tuple[Dict[str, Any], List[str]]] = []
    in_group: Dict[str, int] = {}
    next_seq: Dict[str, int] = {}  # key -> last sequence given out in this group
    with self.state_lock:
      for request in group:
        steps = self._plan(request, next_seq, in_group)
        if steps is None:
          plan.append(None)
          continue
        final = []
        for kind, ref in steps:
          if kind == 'new':
            env, repairs = ref
            in_group[env['event_id']] = len(messages)
            next_seq[env['partition_key']] = env['sequence']
            final.append(('new', len(messages)))
            messages.append((env['partition_key'].encode('utf-8'), to_json(env).encode('utf-8'),
                             env['event_time']))
            pending.append((env, repairs))
          else:
            final.append((kind, ref))
        plan.append(final)
    may_append = self.lease.valid if self.lease is not None else (lambda: True)
    timed = [r for r in group if r.times is not None]
    for r in timed:
      r.times['appending'] = time.time()
    ack_times: Optional[List[Optional[float]]] = [None] * len(messages) if timed else None
    results = self.log.append(messages, may_append, ack_times) if messages else []
    receipts: List[Optional[Dict[str, Any]]] = []
    for (env, _), (where, _, _) in zip(pending, results):
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
    if timed:
      recorded = time.time()
      for request, steps in zip(group, plan):
        if request.times is not None:
          acks = [ack_times[ref] for kind, ref in steps or () if kind == 'new' and ack_times[ref]]
          request.times.update(acked=max(acks) if acks else None, recorded=recorded)
    for request, steps in zip(group, plan):
      if steps is None or request.future.done():
        continue
      answer, error = self._answer(request, steps, pending, results, receipts)
      if error is not None:
        request.future.set_exception(error)
      else:
        request.future.set_result(answer)

  def _plan(self, request: _Request, next_seq: Dict[str, int], in_group: Dict[str, int]
            ) -> Optional[List[Tuple[str, Any]]]:
    """One request's steps, or None after refusing it (409: a sequence that is not its key's
    next). Sequences are given out only to a request accepted whole."""
    steps: List[Tuple[str, Any]] = []
    conflicts: List[Dict[str, Any]] = []
    mine: Dict[str, int] = {}  # key -> last sequence within this request
    for i, (env, seq_given, repairs) in enumerate(request.envelopes):
      event_id = env['event_id']
      first = self.state.receipt(event_id)
      if first is not None:
        steps.append(('recorded', first))
        continue
      if event_id in in_group:  # the same event sent concurrently: appended once
        steps.append(('again', in_group[event_id]))
        continue
      key = env['partition_key']
      last = mine[key] if key in mine else (
          next_seq[key] if key in next_seq else self.state.last_sequence(key))
      expected = last + 1
      if seq_given and env['sequence'] != expected:
        conflicts.append({'index': i, 'event_id': event_id, 'partition_key': key,
                          'sequence': env['sequence'], 'expected_sequence': expected})
        continue
      mine[key] = expected
      steps.append(('new', (dict(env, sequence=expected), repairs)))
    if not conflicts:
      return steps
    if request.single:
      c = conflicts[0]
      error = HttpError(409, f'sequence {c["sequence"]} is not the next of key {c["partition_key"]!r}: '
                             f'expected {c["expected_sequence"]}; nothing was written',
                        expected_sequence=c['expected_sequence'], partition_key=c['partition_key'],
                        conflicts=conflicts)
    else:
      error = HttpError(409, f'{len(conflicts)} of {len(request.envelopes)} event(s) do not carry '
                             "their key's next sequence; nothing was written", conflicts=conflicts)
    request.future.set_exception(error)
    return None

  def _answer(self, request: _Request, steps, pending, results, receipts):
    out, failed, appended = [], [], False
    for i, (kind, ref) in enumerate(steps):
      if kind == 'recorded':
        out.append(dict(ref, duplicate=True))
      elif receipts[ref] is None:
        failed.append({'index': i, 'event_id': pending[ref][0]['event_id'],
                       'reason': results[ref][1], 'retriable': not results[ref][2]})
      elif kind == 'again':
        out.append(dict(receipts[ref], duplicate=True))
      else:
        r = dict(receipts[ref], duplicate=False)
        if pending[ref][1]:
          r['repairs'] = pending[ref][1]
        out.append(r)
        appended = True
    if failed:
      if all(not f['retriable'] for f in failed):
        return None, HttpError(
            400, f'Kafka refused {len(failed)} of {len(steps)} event(s) for good; '
                 'a retry would be refused the same way', receipts=out, failed=failed)
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
          ack_timeout: float = 30.0, lease_ms: int = LEASE_MS) -> Writer:
  """Connects to Kafka, takes the writer lease on ``topic`` (fencing any earlier writer, and
  waiting for its appends to settle if it did not release the lease), reconciles, and
  returns the writer."""
  kafka_log = KafkaLog(bootstrap, topic, partitions, ack_timeout)
  lease = WriterLease(bootstrap, topic, ack_timeout, lease_ms)
  try:
    lease.acquire(kafka_log.ensure_topic)
    return Writer(kafka_log, WriterState(state_path), tokens, registry,
                  max_body_bytes=max_body_bytes, max_batch=max_batch, lease=lease)
  except BaseException:
    lease.release(clean=False)
    kafka_log.close()
    raise


def run(args: argparse.Namespace) -> int:
  """``serve writer``: validate the options, connect to Kafka, take the lease, serve until stopped."""
  tokens = load_tokens(args.tokens_file)
  cors = check_http_arguments(args)
  if ':' in args.topic or ',' in args.topic:
    raise UsageError(f'topic {args.topic!r} may not contain ":" or "," (receipts use them)')
  if len(lease_topic(args.topic)) > 249:
    raise UsageError(f'topic {args.topic!r} is too long: its lease topic '
                     f'{lease_topic(args.topic)!r} must fit in 249 characters')
  for name in ('max_body_bytes', 'max_batch', 'partitions'):
    if getattr(args, name) < 1:
      raise UsageError(f'--{name.replace("_", "-")} must be at least 1')
  if args.ack_timeout <= 0:
    raise UsageError('--ack-timeout must be > 0')
  app = load_app(args.app)
  try:
    writer = build(args.bootstrap, args.topic, args.state, tokens, app.registry, args.partitions,
                   args.max_body_bytes, args.max_batch, args.ack_timeout)
  except Exception as e:  # Kafka unreachable, unwritable state file...
    raise UsageError(f'the writer could not start: {e}') from None
  return serve_until_stopped(writer, args, f'event writer (topic {args.topic})', cors)
