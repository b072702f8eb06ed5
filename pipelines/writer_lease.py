"""The event writer's lease on its topic: one writer numbers a topic's keys at a time.

Why: the writer gives each key its next ``sequence`` from what it knows (its state
file, reconciled with the topic's tail at start). Two writer processes on one
topic would each number a key from their own view (1, 1, 2, 2, ...), and the
ordering downstream would drop one of each pair as a duplicate: an acknowledged
write lost. So a writer holds a lease on its topic, and the mechanism is Kafka's
own fencing of transactional producers:

* every writer of topic ``T`` opens a transactional producer with the id
  ``sourcebeam-writer.T``. Opening it (``init_transactions``) *fences* every
  earlier producer with that id: Kafka refuses its next transactional call
  (``_FENCED``), whatever it believes;
* the holder renews its lease every second by committing a tiny transaction (a
  record on the topic ``T.writer-lease``). A commit succeeds only while no newer
  writer has opened the id, so a renewal that succeeded proves the lease was held
  when it was sent. The writer appends events only within :data:`LEASE_MS` of the
  sending of its last successful renewal; a renewal refused as fenced ends its
  writing for good (503, and ``serve writer`` exits 1);
* a newcomer fences the holder at start and then waits until the old holder's
  last appends have settled (its lease, plus its acknowledgement timeout, plus a
  margin; both are in its lease records) before it reads the topic's tail and
  numbers anything. If the last holder released the lease cleanly on shutdown
  (its last record says ``released``), there is nothing to wait for.

The events themselves are not written in Kafka transactions: a transaction's
commit markers take offsets in the partitions they touch, and the view store's
positions are contiguous offset watermarks of the messages a pipeline saw; a
marker is never seen, so reads would wait for ever.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Callable, Dict, Optional

log = logging.getLogger('sourcebeam.writer.lease')

LEASE_MS = 5000          # appends only within this long after the last successful renewal was sent
RENEW_EVERY_S = 1.0      # a renewal a second: a slow or failed one or two do not stop writes
SETTLE_MARGIN_MS = 2000  # added to the old holder's lease and ack timeout before taking over
LEASE_TOPIC_CONFIG = {'retention.ms': str(3600_000), 'segment.ms': str(600_000),
                      'cleanup.policy': 'delete'}


def lease_topic(topic: str) -> str:
  return f'{topic}.writer-lease'


def transactional_id(topic: str) -> str:
  return f'sourcebeam-writer.{topic}'


class WriterLease:
  """The lease of one writer on ``topic``: :meth:`acquire`, :meth:`valid`, :meth:`release`.

  ``on_fenced(reason)`` is called once (from the renewal thread) when a newer writer
  took over. ``settle_ms`` is what a successor must wait after fencing this writer:
  its lease plus its acknowledgement timeout (recorded in each lease record).
  """

  def __init__(self, bootstrap: str, topic: str, ack_timeout_s: float, lease_ms: int = LEASE_MS,
               on_fenced: Optional[Callable[[str], None]] = None):
    self.bootstrap, self.topic, self.lease_ms = bootstrap, topic, lease_ms
    self.ack_timeout_ms = int(ack_timeout_s * 1000)
    self.on_fenced = on_fenced
    self.holder = f'{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}'
    self.producer: Any = None
    self.valid_until = 0.0  # monotonic
    self.ready = False      # the old holder's appends have settled
    self.fenced: Optional[str] = None
    self.previous: Optional[Dict[str, Any]] = None
    self.waited_s = 0.0
    self.renewals = 0
    self._lock = threading.Lock()  # one transactional call at a time
    self._stopping = threading.Event()
    self._thread: Optional[threading.Thread] = None

  # --- taking and keeping it -------------------------------------------------------------

  def acquire(self, ensure_topic: Callable[..., Any], timeout: float = 60.0) -> None:
    """Fences any earlier writer of the topic, then waits until its appends have settled.
    Returns once this writer may append; raises if Kafka cannot give the lease."""
    from confluent_kafka import Producer
    ensure_topic(lease_topic(self.topic), 1, LEASE_TOPIC_CONFIG)
    self.producer = Producer({
        'bootstrap.servers': self.bootstrap, 'transactional.id': transactional_id(self.topic),
        'transaction.timeout.ms': 60000, 'linger.ms': 0, 'client.id': 'sourcebeam-writer-lease',
        'logger': log})
    self.producer.init_transactions(timeout)  # the fence: earlier holders' calls now fail
    fenced_at = time.monotonic()
    self.previous = self._last_record()
    self._renew('held')
    self._thread = threading.Thread(target=self._renew_loop, name='writer-lease', daemon=True)
    self._thread.start()
    prev = self.previous
    if prev and prev.get('state') == 'held':
      settle = (int(prev.get('lease_ms', LEASE_MS)) + int(prev.get('ack_timeout_ms', 30000)) +
                SETTLE_MARGIN_MS) / 1000
      log.warning('taking over topic %s from writer %s, which did not release it: waiting %.1f s '
                  'for its last appends to settle', self.topic, prev.get('holder'), settle)
      while time.monotonic() < fenced_at + settle:
        if self.fenced:
          raise RuntimeError(self.fenced)
        time.sleep(min(0.2, max(0.0, fenced_at + settle - time.monotonic())))
      self.waited_s = time.monotonic() - fenced_at
    self.ready = True

  def valid(self) -> bool:
    """Whether this writer may hand an append to Kafka now."""
    return self.ready and self.fenced is None and time.monotonic() < self.valid_until

  def why_not(self) -> str:
    if self.fenced:
      return self.fenced
    if not self.ready:
      return f'this writer is still taking over topic {self.topic}'
    return (f'this writer could not renew its lease on topic {self.topic} within '
            f'{self.lease_ms} ms (is Kafka reachable?)')

  def _renew(self, state: str) -> None:
    sent = time.monotonic()
    record = {'topic': self.topic, 'holder': self.holder, 'state': state, 'lease_ms': self.lease_ms,
              'ack_timeout_ms': self.ack_timeout_ms, 'at_ms': int(time.time() * 1000)}
    with self._lock:
      self.producer.begin_transaction()
      self.producer.produce(lease_topic(self.topic), key=self.topic.encode('utf-8'),
                            value=json.dumps(record).encode('utf-8'))
      self.producer.commit_transaction(max(1.0, self.lease_ms / 1000))
    if state == 'held':
      self.valid_until = sent + self.lease_ms / 1000
    self.renewals += 1

  def _renew_loop(self) -> None:
    from confluent_kafka import KafkaException
    while not self._stopping.wait(RENEW_EVERY_S):
      try:
        self._renew('held')
      except KafkaException as e:
        error = e.args[0] if e.args else None
        if error is not None and hasattr(error, 'fatal') and error.fatal():
          self._lost(f'another writer took over topic {self.topic}; this one no longer writes'
                     if 'fenced' in str(error).lower() or error.name() in (
                         '_FENCED', 'PRODUCER_FENCED', 'INVALID_PRODUCER_EPOCH')
                     else f'the writer lease on topic {self.topic} failed: {error}')
          return
        log.warning('renewing the writer lease on topic %s failed: %s', self.topic, e)
        self._abort_quietly()
      except Exception as e:  # keep renewing: the lease lapses on its own if this goes on
        log.warning('renewing the writer lease on topic %s failed: %s', self.topic, e)
        self._abort_quietly()

  def _abort_quietly(self) -> None:
    try:
      with self._lock:
        self.producer.abort_transaction(5)
    except Exception:  # nothing open, or the producer is gone: the next renewal says which
      pass

  def _lost(self, reason: str) -> None:
    self.fenced = reason
    self.valid_until = 0.0
    log.error('%s', reason)
    if self.on_fenced is not None:
      self.on_fenced(reason)

  # --- giving it back -------------------------------------------------------------------------

  def release(self, clean: bool = True) -> None:
    """Stops renewing. ``clean``: no append of this writer is still in flight, so the lease
    record says 'released' and a successor need not wait (never after being fenced)."""
    self._stopping.set()
    if self._thread is not None:
      self._thread.join(30)
    self.valid_until = 0.0
    if clean and self.producer is not None and self.fenced is None and self.ready:
      try:
        self._renew('released')
      except Exception as e:  # a successor then waits out the settle time: safe, only slower
        log.warning('could not release the writer lease on topic %s: %s', self.topic, e)
    self.producer = None

  # --- the last holder ------------------------------------------------------------------------

  def _read_from(self, consumer: Any, topic: str, start: int) -> Optional[Dict[str, Any]]:
    from confluent_kafka import KafkaError, TopicPartition
    last = None
    consumer.assign([TopicPartition(topic, 0, start)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      msg = consumer.poll(1.0)
      if msg is None:
        continue
      if msg.error() is not None:
        if msg.error().code() == KafkaError._PARTITION_EOF:
          return last
        raise RuntimeError(f'reading {topic}: {msg.error()}')
      try:
        record = json.loads(msg.value())
      except ValueError:
        continue
      if isinstance(record, dict) and record.get('topic') == self.topic:
        last = record
    raise RuntimeError(f'reading {topic} to its end took over 30 s')

  def _last_record(self) -> Optional[Dict[str, Any]]:
    """The last committed lease record of the topic, or None."""
    from confluent_kafka import Consumer, TopicPartition
    from sourcebeam.transforms.kafka_retry import retry_transient
    consumer = Consumer({'bootstrap.servers': self.bootstrap, 'group.id': f'sourcebeam-lease-{uuid.uuid4()}',
                         'enable.auto.commit': False, 'isolation.level': 'read_committed',
                         'enable.partition.eof': True, 'logger': log})
    try:
      tp = TopicPartition(lease_topic(self.topic), 0)
      low, high = retry_transient(lambda: consumer.get_watermark_offsets(tp, timeout=15))
      # The tail first (records and their commit markers); the whole partition if the tail
      # holds no committed record (aborted renewals only).
      for start in dict.fromkeys((max(low, high - 200), low)):
        if start >= high:
          continue
        last = self._read_from(consumer, tp.topic, start)
        if last is not None:
          return last
      return None
    finally:
      consumer.close()
