"""Fan-out: one read of the published stream, delivered to every matching subscriber.

``events | FanOut(subscribers)`` orders each partition key's events by
sequence once (:class:`transforms.ordering.ProcessInOrder`, which also drops
and reports duplicates), then one DoFn, fused after the ordering, looks up the
subscribers of each event (:class:`transforms.fanout_core.Matcher`) and writes
the event to each of their sinks. Why this shape:

* Per-key order per subscriber follows from per-key order once: a key's events
  leave the ordering step in sequence order, and the delivering DoFn runs in
  the same fused stage, so each subscriber sees them in that order. Ordering
  per (subscriber, key) instead would shuffle every *delivery*: 100 subscribers
  would cost 100 shuffles of the stream.
* Nothing per delivery crosses Beam: a delivery is a ``produce()`` call of
  bytes encoded once per event (Kafka sinks), or a reference to the event's
  Avro datum, encoded once per event, appended to a subscriber's file buffer
  (archive sinks). So the cost of a subscriber is the cost of its own bytes.

Sinks:

* Kafka (``kafka://HOST:PORT/TOPIC``): one confluent-kafka producer per
  worker and broker (Beam's Python ``WriteToKafka`` writes one fixed topic, so
  100 subscribers would need 100 transforms each carrying every event). Keyed
  by partition key with Java's ``murmur2`` partitioner, idempotent (so retries
  keep per-partition order), flushed at the end of every bundle; a record the
  broker refuses fails the bundle with the subscriber's name (Beam retries it:
  at-least-once, like ``WriteToKafka``).
* Archive (a path): a Sourcebeam archive (Avro, the layout of
  :mod:`transforms.archive_format`) that ``ReadArchive`` and ``run.py replay``
  read. A worker buffers the events bound for archive sinks, and at the end of
  a bundle (or every ``max_buffered`` events) sorts them once by
  (hour, bucket, partition key, sequence) and writes each subscriber's share of
  each (hour, bucket) as one file named by run id, worker and flush number. A retried
  bundle can write its events again under another flush id; readers of the
  archive order by sequence and drop such copies (``ProcessInOrder``).

Counts: every bundle emits ``(subscriber, n)`` for the deliveries its sinks
accepted (after the flush), ``('<matched>', n)`` for events delivered to at
least one subscriber and ``('<unmatched>', n)`` for events that matched nobody,
so a bounded run can check events = matched + unmatched + unprocessed + held.
"""

from __future__ import annotations

import collections
import io
import itertools
import logging
import uuid
import zlib
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.transforms import window as beam_window
from apache_beam.utils.windowed_value import WindowedValue

from sourcebeam.schemas.envelope import from_json, to_avro_record, to_json
from sourcebeam.schemas.registry import Registry, report_key
from sourcebeam.transforms.archive_format import (
    DEFAULT_BUCKETS, LAYOUT_VERSION, SORT_ORDER, bucket_of, file_name, hour_of,
    join, make_manifest, partition_dir)
from sourcebeam.transforms.fanout_core import Matcher, Subscriber
from sourcebeam.transforms.ordering import ProcessInOrder

__all__ = ['FanOut', 'FanOutResult', 'ParseEnvelopes', 'MATCHED', 'UNMATCHED', 'UNDELIVERABLE',
           'prepare_archive_sinks']

UNMATCHED = '<unmatched>'  # the counts' name for events no subscriber wanted
MATCHED = '<matched>'      # ... and for events delivered to at least one subscriber
UNDELIVERABLE = 'undeliverable'
ARCHIVE_CODECS = ('null', 'deflate')
DEFAULT_MAX_BUFFERED = 100_000
_LOG = logging.getLogger(__name__)


class FanOutResult(NamedTuple):
  counts: beam.PCollection       # (subscriber name, deliveries) per bundle; '' = unmatched events
  unprocessed: beam.PCollection  # duplicates, invalid keys, gaps (ProcessInOrder), undeliverable
  status: beam.PCollection       # ProcessInOrder's per-key status (final status on bounded input)


class PassThrough:
  """The ordering handler of fan-out: no state, each event out as it is applied."""

  def initial_state(self, key: str) -> None:
    return None

  def apply(self, state: None, event: Dict[str, Any]) -> Tuple[None, List[Dict[str, Any]]]:
    return None, [event]


# ---------------------------------------------------------------------------
# Parsing the published stream


class ParseEnvelopes(beam.DoFn):
  """(source label, bytes) of the published stream -> envelope, or a dead letter with a reason."""
  DEAD = 'dead'

  def process(self, element: Tuple[str, bytes]):
    label, raw = element
    try:
      env = from_json(raw.decode('utf-8'))
      if not isinstance(env, dict):
        raise ValueError('not a JSON object')
      missing = [f for f in ('event_type', 'partition_key', 'sequence', 'event_time') if f not in env]
      if missing:
        raise ValueError(f'no {", ".join(missing)}')
    except (ValueError, UnicodeDecodeError, TypeError, AttributeError) as e:
      yield beam.pvalue.TaggedOutput(self.DEAD, {
          'source': label, 'reason': f'not a published envelope: {str(e)[:300]}',
          'raw': raw[:2000].decode('utf-8', 'replace')})
      return
    yield env


# ---------------------------------------------------------------------------
# Archive sinks: Avro container files assembled from datums encoded once per event


def _zigzag(n: int) -> bytes:
  n = (n << 1) ^ (n >> 63)
  out = bytearray()
  while n & ~0x7F:
    out.append((n & 0x7F) | 0x80)
    n >>= 7
  out.append(n)
  return bytes(out)


class AvroFiles:
  """Avro object container files from pre-encoded datums, readable by ``ReadArchive``.

  The header is what ``fastavro.writer`` writes for the registry's envelope
  schema (so the archive reader recognises its own schema and takes its fast
  path); blocks are the datums as they are (``codec='null'``, the default) or
  deflated at level 1. Why uncompressed by default: compression is the one
  cost paid per delivery rather than per event (every subscriber's copy is
  compressed on its own); measured on 200k events to 100 subscribers (17.8
  deliveries per event), deflate took half the run's time. Files are about 3x
  larger.
  """
  BLOCK_RECORDS = 2_000

  def __init__(self, registry: Registry, codec: str = 'null'):
    if codec not in ARCHIVE_CODECS:
      raise ValueError(f'archive sink codec must be one of {ARCHIVE_CODECS}, not {codec!r}')
    self._codec = codec
    self._registry = registry
    import fastavro
    from fastavro.write import schemaless_writer
    self._schema = registry.parsed_envelope
    self._schemaless = schemaless_writer
    # The schema text fastavro writes (once, not per file: dumping it cost more than the data).
    head = io.BytesIO()
    fastavro.writer(head, self._schema, [])
    self._schema_json = fastavro.reader(io.BytesIO(head.getvalue())).metadata['avro.schema']

  def datum(self, env: Dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    self._schemaless(buf, self._schema, to_avro_record(env, self._registry))
    return buf.getvalue()

  def header(self, metadata: Dict[str, str], sync: bytes) -> bytes:
    """The container header: magic, metadata map (schema, codec, ``metadata``), sync marker."""
    meta = {'avro.schema': self._schema_json, 'avro.codec': self._codec, **metadata}
    parts = [b'Obj\x01', _zigzag(len(meta))]
    for k, v in meta.items():
      kb, vb = k.encode('utf-8'), v.encode('utf-8')
      parts += [_zigzag(len(kb)), kb, _zigzag(len(vb)), vb]
    parts += [b'\x00', sync]
    return b''.join(parts)

  def container(self, datums: Sequence[bytes], metadata: Dict[str, str], sync: bytes) -> bytes:
    parts = [self.header(metadata, sync)]
    for i in range(0, len(datums), self.BLOCK_RECORDS):
      block = datums[i:i + self.BLOCK_RECORDS]
      data = b''.join(block)
      if self._codec == 'deflate':
        z = zlib.compressobj(1, zlib.DEFLATED, -15)
        data = z.compress(data) + z.flush()
      parts += [_zigzag(len(block)), _zigzag(len(data)), data, sync]
    return b''.join(parts)


def prepare_archive_sinks(subscribers: Sequence[Subscriber], buckets: int = DEFAULT_BUCKETS) -> None:
  """Write each archive sink's manifest (or check the existing one) before the pipeline runs."""
  from sourcebeam.transforms.archive import _check_existing_manifest, _write_manifest, ensure_storage_options
  ensure_storage_options()
  for s in subscribers:
    if s.sink.kind == 'archive':
      _check_existing_manifest(s.sink.target, 'avro', buckets)
      _write_manifest(None, s.sink.target, make_manifest('avro', buckets))


class _ArchiveBuffer:
  """One worker's pending archive deliveries: events once, with the subscribers they go to."""

  def __init__(self, subscribers: Sequence[Subscriber], run_id: str, buckets: int,
               registry: Registry, codec: str = 'null'):
    self._subs, self._run_id, self._buckets = subscribers, run_id, buckets
    self._hours: Dict[int, str] = {}  # hour_of's strftime cost more than the rest of add()
    self._pending: List[Tuple[Tuple[str, int, str, int, str], bytes, Tuple[int, ...]]] = []
    self._avro = AvroFiles(registry, codec)
    # Files are named by worker and flush number, so one worker's files of a partition sort in
    # the order it delivered them.
    self._worker, self._flushes = uuid.uuid4().hex[:8], 0

  def __len__(self) -> int:
    return len(self._pending)

  def add(self, env: Dict[str, Any], subs: Tuple[int, ...]) -> None:
    """Encode the event once (ValueError naming why if it cannot be archived) and hold it."""
    key = env['partition_key']
    try:
      t = env['event_time']
      hour = self._hours.get(t // 3_600_000)
      if hour is None:
        hour = self._hours[t // 3_600_000] = hour_of(t)
      sort = (hour, bucket_of(key, self._buckets), key, env['sequence'],
              env.get('event_id') or '')
      datum = self._avro.datum(env)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'cannot archive: {type(e).__name__}: {str(e)[:300]}') from None
    self._pending.append((sort, datum, subs))

  def flush(self) -> Dict[int, int]:
    """Write every pending event to its subscribers' archives; deliveries per subscriber."""
    from sourcebeam.transforms.archive import write_bytes
    if not self._pending:
      return {}
    pending, self._pending = self._pending, []
    pending.sort(key=lambda p: p[0])
    self._flushes += 1
    flush_id = f'{self._worker}-f{self._flushes:06d}'
    delivered: Dict[int, int] = collections.Counter()
    meta = {'sourcebeam.layout_version': str(LAYOUT_VERSION), 'sourcebeam.sorted_by': ','.join(SORT_ORDER),
            'sourcebeam.run_id': self._run_id}
    for (hour, bucket), group in itertools.groupby(pending, key=lambda p: p[0][:2]):
      lists: Dict[int, List[bytes]] = {}
      for _, datum, subs in group:
        for i in subs:  # the datum was encoded once, whatever the number of subscribers
          got = lists.get(i)
          if got is None:
            got = lists[i] = []
          got.append(datum)
      rel = join(partition_dir(hour, bucket), file_name(self._run_id, 0, 'avro', f'-w{flush_id}'))
      meta.update({'sourcebeam.hour': hour, 'sourcebeam.bucket': str(bucket)})
      for i, datums in lists.items():
        sync = uuid.uuid5(uuid.NAMESPACE_URL, f'{self._subs[i].name}/{rel}').bytes
        write_bytes(join(self._subs[i].sink.target, rel), self._avro.container(datums, meta, sync))
        delivered[i] += len(datums)
    return delivered


# ---------------------------------------------------------------------------
# Kafka sinks


class _KafkaSinks:
  """One producer per broker for every Kafka subscriber of a worker."""

  def __init__(self, subscribers: Sequence[Subscriber]):
    from confluent_kafka import Producer
    self._subs = subscribers
    self._producers: Dict[str, Any] = {}
    for s in subscribers:
      if s.sink.kind == 'kafka' and s.sink.bootstrap not in self._producers:
        self._producers[s.sink.bootstrap] = Producer({
            'bootstrap.servers': s.sink.bootstrap, 'enable.idempotence': True,
            'partitioner': 'murmur2_random', 'linger.ms': 5, 'compression.type': 'lz4',
            'queue.buffering.max.messages': 500_000})
    self._sent: Dict[int, int] = collections.Counter()
    self._errors: List[str] = []

  def send(self, i: int, key: bytes, value: bytes) -> None:
    sink = self._subs[i].sink
    producer = self._producers[sink.bootstrap]
    while True:
      try:
        producer.produce(sink.target, value=value, key=key, on_delivery=self._callback(i))
        break
      except BufferError:  # local queue full: let the producer drain, then retry
        producer.poll(0.1)
    self._sent[i] += 1

  def _callback(self, i: int):
    def done(err, _msg):
      if err is not None and len(self._errors) < 5:
        s = self._subs[i]
        self._errors.append(f'subscriber {s.name!r} ({s.sink.describe()}): {err}')
    return done

  def flush(self) -> Dict[int, int]:
    """Wait for every record of the bundle; raise (failing the bundle) if any was refused."""
    for bootstrap, producer in self._producers.items():
      left = producer.flush(120)
      if left:
        self._errors.append(f'{left} records to {bootstrap} not acknowledged after 120 s')
    if self._errors:
      errors, self._errors, self._sent = self._errors, [], collections.Counter()
      raise RuntimeError('Kafka refused fan-out deliveries: ' + '; '.join(errors))
    sent, self._sent = self._sent, collections.Counter()
    return sent

  def close(self) -> None:
    for producer in self._producers.values():
      producer.flush(30)


# ---------------------------------------------------------------------------
# The delivering DoFn


class _Deliver(beam.DoFn):
  """Ordered (key, event) in; each event to every matching subscriber's sink; counts out."""

  def __init__(self, subscribers: Sequence[Subscriber], registry: Registry, run_id: str,
               buckets: int, max_buffered: int,
               codec: str):
    self._subs = list(subscribers)
    self._registry = registry
    self._run_id, self._buckets, self._max, self._codec = run_id, buckets, max_buffered, codec

  def setup(self):
    self._matcher = Matcher(self._subs)
    self._is_kafka = [s.sink.kind == 'kafka' for s in self._subs]
    self._kafka = _KafkaSinks(self._subs) if any(self._is_kafka) else None
    self._archive = (_ArchiveBuffer(self._subs, self._run_id, self._buckets, self._registry,
                                    self._codec)
                     if not all(self._is_kafka) else None)

  def start_bundle(self):
    self._counts: Dict[int, int] = collections.Counter()
    self._unmatched = self._matched = 0
    self._last_ts = None

  def process(self, kv, timestamp=beam.DoFn.TimestampParam):
    env = kv[1]
    self._last_ts = timestamp
    if not isinstance(env.get('event_type'), str):
      yield beam.pvalue.TaggedOutput(UNDELIVERABLE, {
          'key': env.get('partition_key'), 'sequence': env.get('sequence'),
          'reason': 'undeliverable', 'detail': 'event_type is not a string', 'event': env})
      return
    subs = self._matcher.match(env['event_type'], env['partition_key'])
    if not subs:
      self._unmatched += 1
      return
    if self._archive is not None and not all(self._is_kafka[i] for i in subs):
      try:  # encode for the archives first: an event that cannot be archived goes nowhere
        self._archive.add(env, tuple(i for i in subs if not self._is_kafka[i]))
      except ValueError as e:
        yield beam.pvalue.TaggedOutput(UNDELIVERABLE, {
            'key': env.get('partition_key'), 'sequence': env.get('sequence'),
            'reason': 'undeliverable', 'detail': str(e), 'event': env})
        return
    if self._kafka is not None:
      key = value = None
      for i in subs:
        if self._is_kafka[i]:
          if value is None:  # encoded once per event
            key, value = env['partition_key'].encode('utf-8'), to_json(env).encode('utf-8')
          self._kafka.send(i, key, value)
    self._matched += 1
    if self._archive is not None and len(self._archive) >= self._max:
      self._counts.update(self._archive.flush())

  def finish_bundle(self):
    if self._kafka is not None:
      self._counts.update(self._kafka.flush())
    if self._archive is not None:
      self._counts.update(self._archive.flush())
    ts = self._last_ts if self._last_ts is not None else beam_window.MIN_TIMESTAMP
    if ts > beam_window.GlobalWindow().max_timestamp():
      ts = beam_window.GlobalWindow().max_timestamp()
    for i, n in sorted(self._counts.items()):
      yield WindowedValue((self._subs[i].name, n), ts, [beam_window.GlobalWindow()])
    for name, n in ((MATCHED, self._matched), (UNMATCHED, self._unmatched)):
      if n:
        yield WindowedValue((name, n), ts, [beam_window.GlobalWindow()])

  def teardown(self):
    if getattr(self, '_kafka', None) is not None:
      self._kafka.close()


class _SpaceKey:
  """The ordering key of an event (:meth:`Registry.ordering_key`: sequences are per key
  space). Keys must be text: anything else is an invalid key (reported)."""

  def __init__(self, registry: Registry):
    self._registry = registry

  def __call__(self, env: Dict[str, Any]) -> str:
    if not isinstance(env['partition_key'], str):
      raise TypeError(f'partition_key must be a string, got {type(env["partition_key"]).__name__}')
    return self._registry.ordering_key(env)


class FanOut(beam.PTransform):
  """Envelopes in; each delivered to every matching subscriber, in per-key sequence order.

  Args:
    subscribers: from :func:`transforms.fanout_core.load_subscribers`. Archive
      sinks need their manifests first (:func:`prepare_archive_sinks`).
    registry: the application's schemas (``app.registry``): each event is ordered
      within its key space, and archive sinks are written with these schemas.
    run_id: names the files of archive sinks (default: a fresh id).
    gap_timeout: seconds of event time a key waits for a missing sequence
      before moving on (reported in ``unprocessed`` as ``gap_timeout``);
      default: wait (a held key shows in ``status``).
    max_buffered: archive-bound events a worker holds before writing files.
    archive_codec: ``'null'`` (default) or ``'deflate'`` for archive sinks
      (see :class:`AvroFiles` for why uncompressed is the default).
    expansion: ProcessInOrder's expansion (default: batch for bounded input).

  Returns :class:`FanOutResult`. Every event ends in exactly one of: delivered
  (to one or more subscribers), unmatched, unprocessed (duplicate sequence,
  invalid key or sequence, gap), or held on a gap (``status.buffered``).
  """

  def __init__(self, subscribers: Sequence[Subscriber], *, registry: Registry,
               run_id: Optional[str] = None,
               gap_timeout: Optional[float] = None, buckets: int = DEFAULT_BUCKETS,
               max_buffered: int = DEFAULT_MAX_BUFFERED, archive_codec: str = 'null',
               expansion: str = 'auto', label: Optional[str] = None):
    super().__init__(label)
    if not subscribers:
      raise ValueError('FanOut needs at least one subscriber')
    from sourcebeam.transforms.archive import new_run_id
    self._subs = list(subscribers)
    self._registry = registry
    self._run_id = run_id or new_run_id()
    self._gap_timeout, self._buckets = gap_timeout, buckets
    self._max, self._expansion = max_buffered, expansion
    if archive_codec not in ARCHIVE_CODECS:
      raise ValueError(f'archive_codec must be one of {ARCHIVE_CODECS}, not {archive_codec!r}')
    self._codec = archive_codec

  def expand(self, events: beam.PCollection) -> FanOutResult:
    ordered = events | 'OrderPerKey' >> ProcessInOrder(
        PassThrough(), key_fn=_SpaceKey(self._registry), gap_timeout=self._gap_timeout,
        gap_policy='skip' if self._gap_timeout is not None else 'hold',
        expansion=self._expansion)
    # Reports name the partition key, and the key space apart (the ordering key joins them).
    status = ordered.status | 'StatusKeys' >> beam.Map(report_key)
    reported = ordered.unprocessed | 'UnprocessedKeys' >> beam.Map(report_key)
    delivered = ordered.outputs | 'Deliver' >> beam.ParDo(
        _Deliver(self._subs, self._registry, self._run_id, self._buckets, self._max,
                 self._codec)).with_outputs(
            UNDELIVERABLE, main='counts')
    unprocessed = ((reported, delivered[UNDELIVERABLE])
                   | 'Unprocessed' >> beam.Flatten())
    return FanOutResult(delivered.counts, unprocessed, status)
