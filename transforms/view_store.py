"""The view store: the four retail views in a real database, with per-partition positions.

Why a store and not files: the view API (``run.py serve views``) must answer "does
this view include my write yet?" for a write receipt ``(topic, partition,
offset)``. So the store keeps, next to each view, how far that view has applied
each source partition of the log, and changes both **in one transaction**: a
view and its position can never disagree, even if the writer dies mid-batch.

Backends (chosen by the DSN):

* SQLite (the default): a file path, or ``sqlite:///path``. Embedded, no server;
  WAL mode so the view API reads while the pipeline writes.
* PostgreSQL: ``postgresql://user:password@host:port/database`` (driver: pg8000).

Tables::

    view_cart, view_recently_viewed, view_frequently_viewed, view_catalog
        (key PRIMARY KEY, value JSON text, as_of_sequence, event_time,
         source_topic, source_partition, source_offset [, category for the catalog])
    positions (view, topic, kafka_partition) -> applied_offset
    partition_progress, pending_offsets   (per-event mode: the watermark and offsets done past it)

Two input shapes, one per store (both applied in one transaction per batch):

* **per-event mode** (recommended for a live pipeline): ``(source, [records])``,
  one element per Kafka message consumed, with the view records that message
  produced (possibly none). :meth:`ViewStore.apply_events`; :class:`ViewChanges`
  turns ``(envelope or None, source)`` messages into this shape with the retail
  handlers. The store then knows which offsets are done, so a view's position is
  the partition's *contiguous* watermark: ``position >= offset`` proves the write
  at ``offset`` is in the view however a parallel runner interleaves a
  partition's keys, and also after an event that changed no view.
* **records mode**: ``(record, source)``, one element per view record, e.g.
  ``RetailProjections(final=False)``'s records tagged with their event's source.
  :meth:`ViewStore.apply`. The position is the highest offset applied (a
  high-water mark): it proves inclusion only if each partition's records reach
  the sink in offset order, and it does not move for events that changed no view.

``record`` is a view record of :mod:`transforms.projections` (each the new full
value of one view key: ``{view, key, ..., as_of_sequence, event_time}``) and
``source`` the Kafka position of the message that produced it, ``{'topic': str,
'partition': int, 'offset': int}`` (a ``(topic, partition, offset)`` tuple is
accepted too).

Idempotency: every record is a full value, and a key's events all live in one
partition, in order. A record is skipped when its key's row already holds a
record from the same partition at the same or a later offset, so an event
delivered twice (a restarted pipeline, a retried bundle) changes a view once,
and an old record replayed after a newer one never rolls a view back. This
per-key rule equals "skip offset <= position" when a partition arrives in offset
order, and stays right when a parallel pipeline interleaves a partition's keys.
"""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.parse
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import apache_beam as beam

VIEWS = ('cart', 'catalog', 'recently_viewed', 'frequently_viewed')
TABLES = {view: f'view_{view}' for view in VIEWS}

Record = Mapping[str, Any]
Source = Tuple[str, int, int]  # (topic, partition, offset)


class StoreError(ValueError):
  """A record or source the store cannot apply; the whole batch is rolled back."""


# --- DSNs -------------------------------------------------------------------------------

def is_postgres(dsn: str) -> bool:
  return dsn.startswith(('postgresql://', 'postgres://'))


def redact(dsn: str) -> str:
  """The DSN without its password: what may appear in logs and errors."""
  if not is_postgres(dsn):
    return dsn
  u = urllib.parse.urlsplit(dsn)
  if u.password is None:
    return dsn
  netloc = f'{u.username}:***@{u.hostname}' + (f':{u.port}' if u.port else '')
  return urllib.parse.urlunsplit((u.scheme, netloc, u.path, u.query, u.fragment))


def _sqlite_path(dsn: str) -> str:
  return dsn[len('sqlite:///'):] if dsn.startswith('sqlite:///') else dsn


def _connect_postgres(dsn: str):
  import pg8000.dbapi
  u = urllib.parse.urlsplit(dsn)
  return pg8000.dbapi.connect(
      user=urllib.parse.unquote(u.username or 'postgres'),
      password=urllib.parse.unquote(u.password) if u.password is not None else None,
      host=u.hostname or '127.0.0.1', port=u.port or 5432,
      database=(u.path or '/').lstrip('/') or None, timeout=30)


# --- record checks ------------------------------------------------------------------------

def normalise_source(source: Any) -> Source:
  """A source as ``(topic, partition, offset)``; StoreError if it is not one."""
  if isinstance(source, Mapping):
    try:
      topic, partition, offset = source['topic'], source['partition'], source['offset']
    except KeyError as e:
      raise StoreError(f'source lacks {e.args[0]!r}: expected {{topic, partition, offset}}') from None
  elif isinstance(source, (tuple, list)) and len(source) == 3:
    topic, partition, offset = source
  else:
    raise StoreError(f'source must be {{topic, partition, offset}}, got {source!r}')
  if not isinstance(topic, str) or not topic:
    raise StoreError(f'source topic must be a non-empty string, got {topic!r}')
  for name, v in (('partition', partition), ('offset', offset)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise StoreError(f'source {name} must be a whole number >= 0, got {v!r}')
  return topic, partition, offset


def _check_record(record: Any) -> Tuple[str, str]:
  if not isinstance(record, Mapping):
    raise StoreError(f'a view record must be a dict, got {type(record).__name__}')
  view, key = record.get('view'), record.get('key')
  if view not in TABLES:
    raise StoreError(f'unknown view {view!r}; views: {list(VIEWS)}')
  if not isinstance(key, str) or not key:
    raise StoreError(f'{view} record without a key')
  for f in ('as_of_sequence', 'event_time'):
    if isinstance(record.get(f), bool) or not isinstance(record.get(f), int):
      raise StoreError(f'{view} record of {key!r}: {f} must be a whole number')
  return view, key


# --- the store ----------------------------------------------------------------------------

class ViewStore:
  """One connection to the view store. Not shared between threads: open one per thread.

  Every statement is parameterised; values never become SQL text.
  """

  def __init__(self, dsn: str):
    self.dsn = dsn
    self.postgres = is_postgres(dsn)
    if self.postgres:
      self.conn = _connect_postgres(dsn)
      self._ph = '%s'
    else:
      # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is one transaction.
      self.conn = sqlite3.connect(_sqlite_path(dsn), timeout=30, isolation_level=None,
                                  check_same_thread=False)
      for attempt in range(50):  # switching a new file to WAL can race another connection's
        try:
          self.conn.execute('PRAGMA journal_mode=WAL')
          break
        except sqlite3.OperationalError as e:
          if 'locked' not in str(e) or attempt == 49:
            raise
          time.sleep(0.1)
      self.conn.execute('PRAGMA synchronous=NORMAL')
      self._ph = '?'
    self.create_tables()

  def close(self) -> None:
    try:
      self.conn.close()
    except Exception:  # already closed or broken: nothing to keep
      pass

  def __enter__(self) -> 'ViewStore':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # SQL with '?' placeholders, rewritten for the driver's paramstyle.
  def _sql(self, sql: str) -> str:
    return sql.replace('?', self._ph) if self._ph != '?' else sql

  def _begin(self, cur) -> None:
    if not self.postgres:
      cur.execute('BEGIN IMMEDIATE')  # take the write lock now: no upgrade deadlocks

  def _commit(self) -> None:
    if self.postgres:
      self.conn.commit()
    else:
      self.conn.execute('COMMIT')

  def _rollback(self) -> None:
    try:
      if self.postgres:
        self.conn.rollback()
      else:
        self.conn.execute('ROLLBACK')
    except Exception:  # no transaction open (it failed before BEGIN): nothing to undo
      pass

  def create_tables(self) -> None:
    cur = self.conn.cursor()
    try:
      self._begin(cur)
      if self.postgres:
        # Concurrent CREATE TABLE IF NOT EXISTS can collide in PostgreSQL's catalog: serialise
        # schema creation between connections (sink workers start together).
        cur.execute('SELECT pg_advisory_xact_lock(7261001)')
      for view, table in TABLES.items():
        extra = ', category TEXT' if view == 'catalog' else ''
        cur.execute(f'CREATE TABLE IF NOT EXISTS {table} ('
                    'key TEXT PRIMARY KEY, value TEXT NOT NULL, '
                    'as_of_sequence BIGINT NOT NULL, event_time BIGINT NOT NULL, '
                    'source_topic TEXT NOT NULL, source_partition INTEGER NOT NULL, '
                    f'source_offset BIGINT NOT NULL{extra})')
      cur.execute('CREATE INDEX IF NOT EXISTS view_catalog_category ON view_catalog (category, key)')
      cur.execute('CREATE TABLE IF NOT EXISTS positions ('
                  'view TEXT NOT NULL, topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, '
                  'applied_offset BIGINT NOT NULL, PRIMARY KEY (view, topic, kafka_partition))')
      # Per-event mode: the contiguous watermark of each partition, and the offsets done past it.
      cur.execute('CREATE TABLE IF NOT EXISTS partition_progress ('
                  'topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, '
                  'watermark BIGINT NOT NULL, PRIMARY KEY (topic, kafka_partition))')
      cur.execute('CREATE TABLE IF NOT EXISTS pending_offsets ('
                  'topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, '
                  'kafka_offset BIGINT NOT NULL, PRIMARY KEY (topic, kafka_partition, kafka_offset))')
      self._commit()
    except Exception:
      self._rollback()
      raise

  # --- writing -----------------------------------------------------------------------

  def apply(self, records_with_source: Iterable[Tuple[Record, Any]]) -> Dict[str, int]:
    """Applies a batch of ``(record, source)`` in one transaction; returns counts.

    Records are applied in (topic, partition, offset) order, so within a batch the
    newest record of a key wins. Any bad record rolls back the whole batch: views
    and positions stay as they were. Returns ``{'applied': n, 'skipped': m}``.
    """
    items = []
    for i, item in enumerate(records_with_source):
      if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise StoreError(f'element {i} must be a (record, source) pair')
      items.append((normalise_source(item[1]), i, item[0]))
    items.sort(key=lambda t: (t[0], t[1]))
    counts = {'applied': 0, 'skipped': 0}
    highest: Dict[Tuple[str, str, int], int] = {}
    cur = self.conn.cursor()
    try:
      self._begin(cur)
      entries = [(record, topic, partition, offset) for (topic, partition, offset), _, record in items]
      for view, (_, topic, partition, offset) in zip(self._upsert_many(cur, entries, counts), entries):
        pos_key = (view, topic, partition)
        highest[pos_key] = max(offset, highest.get(pos_key, -1))
      for (view, topic, partition), offset in sorted(highest.items()):
        self._raise_position(cur, view, topic, partition, offset)
      self._commit()
    except BaseException:
      self._rollback()
      raise
    return counts

  def apply_events(self, events: Iterable[Tuple[Any, Sequence[Record]]],
                   start_offsets: Optional[Mapping[Tuple[str, int], int]] = None) -> Dict[str, int]:
    """Applies a batch of per-event outcomes ``(source, [records])`` in one transaction.

    The per-event mode: the pipeline hands over one element per Kafka message it
    consumed, with the view records that message produced (none for a message
    that changed no view, was not a retail event, or was dead-lettered). The
    store then knows which offsets are done, and every view's position for a
    partition is its *contiguous* watermark: the highest offset such that every
    offset from the partition's start up to it is done. So ``position >= offset``
    proves a write is included even when a parallel pipeline finishes a
    partition's events out of order, and a read after an event that changed no
    view is not kept waiting. ``start_offsets`` gives the first offset of a
    partition the pipeline reads (default 0, i.e. from the earliest offset of a
    topic never truncated); it matters only before the first batch of that partition.
    Returns ``{'applied', 'skipped', 'events'}``.
    """
    items = []
    for i, item in enumerate(events):
      if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[1], (list, tuple)):
        raise StoreError(f'event {i} must be a (source, [records]) pair')
      items.append((normalise_source(item[0]), i, item[1]))
    items.sort(key=lambda t: (t[0], t[1]))
    counts = {'applied': 0, 'skipped': 0, 'events': len(items)}
    partitions = sorted({(t, p) for (t, p, _), _, _ in items})
    cur = self.conn.cursor()
    try:
      self._begin(cur)
      # Lock each partition's progress row, in a fixed order (no deadlocks between sinks).
      watermark = {}
      for topic, partition in partitions:
        start = (start_offsets or {}).get((topic, partition), 0)
        cur.execute(self._sql('INSERT INTO partition_progress (topic, kafka_partition, watermark) '
                              'VALUES (?, ?, ?) ON CONFLICT (topic, kafka_partition) DO NOTHING'),
                    (topic, partition, start - 1))
        cur.execute(self._sql('SELECT watermark FROM partition_progress WHERE topic = ? AND '
                              'kafka_partition = ?' + (' FOR UPDATE' if self.postgres else '')),
                    (topic, partition))
        watermark[(topic, partition)] = cur.fetchone()[0]
      done: Dict[Tuple[str, int], set] = {k: set() for k in partitions}
      entries = []
      for (topic, partition, offset), _, records in items:
        entries.extend((record, topic, partition, offset) for record in records)
        if offset > watermark[(topic, partition)]:
          done[(topic, partition)].add(offset)
      self._upsert_many(cur, entries, counts)
      for topic, partition in partitions:
        # The offsets done past the watermark: this batch's and those left pending before.
        # Only what stays past the new watermark is (or remains) stored as pending.
        w0 = w = watermark[(topic, partition)]
        cur.execute(self._sql('SELECT kafka_offset FROM pending_offsets WHERE topic = ? AND '
                              'kafka_partition = ?'), (topic, partition))
        stored = {r[0] for r in cur.fetchall()}
        offsets = stored | done[(topic, partition)]
        while w + 1 in offsets:
          w += 1
        for offset in sorted(o for o in done[(topic, partition)] - stored if o > w):
          cur.execute(self._sql('INSERT INTO pending_offsets (topic, kafka_partition, kafka_offset) '
                                'VALUES (?, ?, ?)'), (topic, partition, offset))
        if w > w0:
          if any(o <= w for o in stored):
            cur.execute(self._sql('DELETE FROM pending_offsets WHERE topic = ? AND '
                                  'kafka_partition = ? AND kafka_offset <= ?'), (topic, partition, w))
          cur.execute(self._sql('UPDATE partition_progress SET watermark = ? WHERE topic = ? AND '
                                'kafka_partition = ?'), (w, topic, partition))
          for view in VIEWS:
            self._raise_position(cur, view, topic, partition, w)
      self._commit()
    except BaseException:
      self._rollback()
      raise
    return counts

  def _upsert_many(self, cur, entries: List[Tuple[Any, str, int, int]],
                   counts: Dict[str, int], rows_per_statement: int = 100) -> List[str]:
    """Writes ``(record, topic, partition, offset)`` entries (in source order), each key only
    if the store does not already hold that offset or a later one; returns each entry's view.

    Only the newest entry of a key in the batch is written (records are full values), in
    multi-row statements: a round trip per hundred rows, not per record. Counts: records of
    keys whose newest record was written are ``applied``, the others ``skipped``.
    """
    views = []
    newest: Dict[Tuple[str, str], Tuple[Any, str, int, int]] = {}
    group: Dict[Tuple[str, str], int] = {}
    for entry in entries:
      view, key = _check_record(entry[0])  # inside the transaction: a bad record rolls back
      views.append(view)
      k = (view, key)
      group[k] = group.get(k, 0) + 1
      old = newest.get(k)
      if old is None or ((old[1], old[2]) == (entry[1], entry[2]) and entry[3] > old[3]) or (
          (old[1], old[2]) != (entry[1], entry[2]) and
          entry[0]['as_of_sequence'] > old[0]['as_of_sequence']):
        newest[k] = entry
    by_view: Dict[str, List[Tuple[Any, str, int, int]]] = {}
    for (view, _), entry in newest.items():
      by_view.setdefault(view, []).append(entry)
    written = set()
    for view, rows in sorted(by_view.items()):
      table = TABLES[view]
      cols = ['key', 'value', 'as_of_sequence', 'event_time',
              'source_topic', 'source_partition', 'source_offset']
      if view == 'catalog':
        cols.append('category')
      updates = ', '.join(f'{c} = excluded.{c}' for c in cols[1:])
      for i in range(0, len(rows), rows_per_statement):
        chunk = rows[i:i + rows_per_statement]
        params: List[Any] = []
        for record, topic, partition, offset in chunk:
          params += [record['key'], json.dumps(record, sort_keys=True, separators=(',', ':')),
                     record['as_of_sequence'], record['event_time'], topic, partition, offset]
          if view == 'catalog':
            params.append(record.get('category'))
        one = '(' + ', '.join('?' * len(cols)) + ')'
        cur.execute(self._sql(
            f'INSERT INTO {table} ({", ".join(cols)}) VALUES {", ".join([one] * len(chunk))} '
            f'ON CONFLICT (key) DO UPDATE SET {updates} WHERE '
            # Same partition: the offset decides (a redelivered or older event is skipped).
            f'({table}.source_topic = excluded.source_topic AND '
            f'{table}.source_partition = excluded.source_partition AND '
            f'{table}.source_offset < excluded.source_offset) OR '
            # The key moved partition (a re-partitioned topic): the sequence decides.
            f'(({table}.source_topic <> excluded.source_topic OR '
            f'{table}.source_partition <> excluded.source_partition) AND '
            f'{table}.as_of_sequence < excluded.as_of_sequence) '
            'RETURNING key'), params)
        written.update((view, r[0]) for r in cur.fetchall())
    for k, n in group.items():
      counts['applied' if k in written else 'skipped'] += n
    return views

  def _raise_position(self, cur, view: str, topic: str, partition: int, offset: int) -> None:
    greatest = 'GREATEST' if self.postgres else 'MAX'
    cur.execute(self._sql(
        'INSERT INTO positions (view, topic, kafka_partition, applied_offset) VALUES (?, ?, ?, ?) '
        'ON CONFLICT (view, topic, kafka_partition) DO UPDATE SET '
        f'applied_offset = {greatest}(positions.applied_offset, excluded.applied_offset)'),
        (view, topic, partition, offset))

  # --- reading -----------------------------------------------------------------------

  def _rows(self, sql: str, params: Sequence[Any]) -> List[tuple]:
    cur = self.conn.cursor()
    try:
      cur.execute(self._sql(sql), list(params))
      rows = cur.fetchall()
    finally:
      if self.postgres:
        self.conn.rollback()  # end the read transaction: the next read sees new commits
    return [tuple(r) for r in rows]

  def get(self, view: str, key: str) -> Optional[Dict[str, Any]]:
    """The current record of one view key, or None."""
    if view not in TABLES:
      raise StoreError(f'unknown view {view!r}')
    rows = self._rows(f'SELECT value FROM {TABLES[view]} WHERE key = ?', (key,))
    return json.loads(rows[0][0]) if rows else None

  def cart(self, user_id: str) -> Optional[Dict[str, Any]]:
    return self.get('cart', user_id)

  def recently_viewed(self, user_id: str) -> Optional[Dict[str, Any]]:
    return self.get('recently_viewed', user_id)

  def frequently_viewed(self, user_id: str) -> Optional[Dict[str, Any]]:
    return self.get('frequently_viewed', user_id)

  def products_by_category(self, category: str, limit: int = 1000) -> List[Dict[str, Any]]:
    """Catalog records of one category, sorted by product id."""
    rows = self._rows('SELECT value FROM view_catalog WHERE category = ? ORDER BY key LIMIT ?',
                      (category, limit))
    return [json.loads(r[0]) for r in rows]

  def positions(self, view: Optional[str] = None) -> List[Dict[str, Any]]:
    """``[{view, topic, partition, offset}]``: how far each view has applied each partition."""
    sql = 'SELECT view, topic, kafka_partition, applied_offset FROM positions'
    params: List[Any] = []
    if view is not None:
      sql += ' WHERE view = ?'
      params.append(view)
    rows = self._rows(sql + ' ORDER BY view, topic, kafka_partition', params)
    return [{'view': v, 'topic': t, 'partition': p, 'offset': o} for v, t, p, o in rows]

  def position(self, view: str, topic: str, partition: int) -> Optional[int]:
    rows = self._rows('SELECT applied_offset FROM positions '
                      'WHERE view = ? AND topic = ? AND kafka_partition = ?',
                      (view, topic, partition))
    return rows[0][0] if rows else None


# --- Beam: the sink ----------------------------------------------------------------------------

def is_record_pair(element: Any) -> bool:
  """``(record, source)`` (records mode) rather than ``(source, [records])`` (per-event mode)."""
  return isinstance(element[0], Mapping) and 'view' in element[0]


class _WriteViewsFn(beam.DoFn):
  """Batches elements per bundle and applies each batch in one transaction: ``(record,
  source)`` pairs with :meth:`ViewStore.apply`, ``(source, [records])`` with
  :meth:`ViewStore.apply_events`."""

  def __init__(self, dsn: str, batch_size: int,
               start_offsets: Optional[Mapping[Tuple[str, int], int]] = None):
    self.dsn = dsn
    self.batch_size = batch_size
    self.start_offsets = dict(start_offsets or {})
    self.applied = beam.metrics.Metrics.counter('view_store', 'applied')
    self.skipped = beam.metrics.Metrics.counter('view_store', 'skipped')
    self.events = beam.metrics.Metrics.counter('view_store', 'events')

  def setup(self):
    self.store = ViewStore(self.dsn)

  def start_bundle(self):
    self.records: List[Tuple[Record, Any]] = []
    self.outcomes: List[Tuple[Any, Sequence[Record]]] = []

  def process(self, element):
    (self.records if is_record_pair(element) else self.outcomes).append(element)
    if len(self.records) + len(self.outcomes) >= self.batch_size:
      self._flush()

  def finish_bundle(self):
    self._flush()

  def _flush(self):
    for batch, apply in ((self.records, self.store.apply),
                         (self.outcomes, lambda b: self.store.apply_events(b, self.start_offsets))):
      if batch:
        counts = apply(batch)
        self.applied.inc(counts['applied'])
        self.skipped.inc(counts['skipped'])
        self.events.inc(counts.get('events', 0))
        batch.clear()

  def teardown(self):
    store = getattr(self, 'store', None)
    if store is not None:
      store.close()


class WriteViewsToStore(beam.PTransform):
  """Writes view records to the view store; the sink of a live projections pipeline.

  Input, either shape (one per store; see the module docstring):

  * per-event mode (recommended): ``(source, [records])``, one per Kafka message
    consumed, as :class:`ViewChanges` gives them; positions are contiguous
    watermarks, right under any parallelism;
  * records mode: ``(record, source)``, one per view record; positions are
    high-water marks, right when each partition arrives in offset order.

  ``source`` is ``{'topic', 'partition', 'offset'}`` of the Kafka message. Each
  bundle is applied in batches of at most ``batch_size``, each in one
  transaction with its positions; a bundle retried by the runner is harmless
  (idempotent by offset). Output: none (counters ``view_store/applied``,
  ``view_store/skipped``, ``view_store/events``).
  """

  def __init__(self, dsn: str, batch_size: int = 500,
               start_offsets: Optional[Mapping[Tuple[str, int], int]] = None):
    super().__init__()
    self.dsn = dsn
    self.batch_size = batch_size
    self.start_offsets = start_offsets

  def expand(self, pairs):
    return pairs | 'ApplyToViewStore' >> beam.ParDo(
        _WriteViewsFn(self.dsn, self.batch_size, self.start_offsets))


# --- Beam: from Kafka messages to per-event outcomes ----------------------------------------------

SOURCE_FIELD = '_source'  # where ViewChanges carries a message's source inside its envelope


def kafka_message(message: Any) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any]]:
  """One consumed Kafka message -> ``(envelope or None, source)``: :class:`ViewChanges`' input.

  ``message`` is what ``ReadFromKafka(..., with_metadata=True)`` yields (a Beam
  Row with ``topic``, ``partition``, ``offset``, ``value``...) or a dict with
  those keys. The value (the envelope's JSON form, as the event writer and the
  publish pipeline write it) goes through the publishing boundary again
  (:func:`schemas.validation.publish_raw`): a message that is not a valid
  envelope gives ``None``, so its offset still counts as done.
  """
  from sourcebeam.schemas.validation import publish_raw
  get = message.get if isinstance(message, Mapping) else (lambda k: getattr(message, k))
  topic, partition, offset = normalise_source(
      (get('topic'), int(get('partition')), int(get('offset'))))
  value = get('value')
  envelope = None
  if value is not None:
    envelope, _, _ = publish_raw(bytes(value) if not isinstance(value, str) else value)
  return envelope, {'topic': topic, 'partition': partition, 'offset': offset}


class PerEventRecords:
  """A handler wrapper: each applied event gives exactly one output, ``(source, records)``.

  The source rides in the event under :data:`SOURCE_FIELD` (an extra key that the
  retail handlers never read), so the records a message produced stay together
  with its offset through ``ProcessInOrder``.
  """

  def __init__(self, handler: Any):
    self.handler = handler

  def initial_state(self, key: str) -> Any:
    return self.handler.initial_state(key)

  def apply(self, state: Any, event: Mapping[str, Any]) -> Tuple[Any, List[Any]]:
    new, outputs = self.handler.apply(state, event)
    return new, [(event[SOURCE_FIELD], list(outputs))]


class _RouteMessages(beam.DoFn):
  """``(envelope or None, source)`` -> user / product events tagged with their source, or
  ``(source, [])`` at once for a message no view projects (dead letter, other domain)."""

  def __init__(self, user_types: Iterable[str], product_types: Iterable[str]):
    self.user_types, self.product_types = frozenset(user_types), frozenset(product_types)

  def process(self, pair):
    envelope, source = pair
    topic, partition, offset = normalise_source(source)
    source = {'topic': topic, 'partition': partition, 'offset': offset}
    kind = envelope.get('event_type') if isinstance(envelope, Mapping) else None
    if kind in self.user_types:
      yield beam.pvalue.TaggedOutput('user', dict(envelope, **{SOURCE_FIELD: source}))
    elif kind in self.product_types:
      yield beam.pvalue.TaggedOutput('product', dict(envelope, **{SOURCE_FIELD: source}))
    else:
      yield source, []


def _unprocessed_outcome(rec: Mapping[str, Any]):
  """An event ordering did not apply (duplicate, handler error...) is done, with no records."""
  event = rec.get('event')
  if isinstance(event, Mapping) and SOURCE_FIELD in event:
    yield event[SOURCE_FIELD], []


class ViewChanges(beam.PTransform):
  """Kafka messages -> one ``(source, [view records])`` per message: WriteViewsToStore's input.

  Input: ``(envelope, source)`` per consumed Kafka message, ``envelope`` the
  published envelope (``None`` for a message the publishing boundary refused),
  ``source`` its ``{'topic', 'partition', 'offset'}``. The retail handlers of
  :mod:`transforms.projections` run under ``ProcessInOrder`` (user events and
  product events, as in ``RetailProjections``), wrapped in
  :class:`PerEventRecords`. Every message comes out exactly once: with the
  records it produced, or with none (not a retail event, refused, a duplicate, a
  handler error); a message whose key waits on a sequence gap comes out when the
  gap fills or times out, so the partition's watermark waits for it too.
  ``ordering`` passes options to ``ProcessInOrder`` (default
  ``continue_on_handler_error=True``: one bad event must not stop a partition).
  """

  def __init__(self, **ordering):
    super().__init__()
    self.ordering = dict({'continue_on_handler_error': True}, **ordering)

  def expand(self, messages):
    from sourcebeam.transforms.ordering import ProcessInOrder
    from sourcebeam.transforms.projections import (PRODUCT_EVENT_TYPES, USER_EVENT_TYPES, CartHandler,
                                        CatalogHandler, CombinedHandler, FrequentlyViewedHandler,
                                        RecentlyViewedHandler)
    routed = messages | 'Route' >> beam.ParDo(
        _RouteMessages(USER_EVENT_TYPES, PRODUCT_EVENT_TYPES)).with_outputs(
            'user', 'product', main='none')
    users = routed.user | 'OrderPerUser' >> ProcessInOrder(PerEventRecords(CombinedHandler(
        [CartHandler(), RecentlyViewedHandler(), FrequentlyViewedHandler()])), **self.ordering)
    products = routed.product | 'OrderPerProduct' >> ProcessInOrder(
        PerEventRecords(CatalogHandler()), **self.ordering)
    return ((routed.none,
             users.outputs | 'UserOutcomes' >> beam.Values(),
             products.outputs | 'ProductOutcomes' >> beam.Values(),
             users.unprocessed | 'UserLeftovers' >> beam.FlatMap(_unprocessed_outcome),
             products.unprocessed | 'ProductLeftovers' >> beam.FlatMap(_unprocessed_outcome))
            | 'AllOutcomes' >> beam.Flatten())
