"""The view store: an application's views in a real database, with per-partition positions.

Why a store and not files: the view API (``run.py serve views``) must answer "does
this view include my write yet?" for a write receipt ``(topic, partition,
offset)``. So the store keeps, next to each view, how far that view has applied
each source partition of the log, and changes both **in one transaction**: a
view and its position can never disagree, even if the writer dies mid-batch.

Backends (chosen by the DSN):

* SQLite (the default): a file path, or ``sqlite:///path``. Embedded, no server;
  WAL mode so the view API reads while the pipeline writes.
* PostgreSQL: ``postgresql://user:password@host:port/database`` (driver: pg8000).

Tables (one set for every view of every application; a view is a name)::

    view_rows (view, key) -> value JSON text, as_of_sequence, event_time, index_value,
                             source_topic, source_partition, source_offset
    positions (view, topic, kafka_partition) -> applied_offset   (PostgreSQL: a transaction
                             that moves one also sends NOTIFY sourcebeam_positions)
    partition_progress, pending_offsets   (per-event mode: the watermark and offsets done past it)
    stage_times (topic, kafka_partition, kafka_offset) -> when the event reached each stage
                                          (only with ``stage_times=True``; see below)

A row is one key of one view: ``{view, key, value, as_of_sequence, event_time[, index]}``
where ``value`` is the view's record of that key (what ``GET /views/<view>/<key>``
answers), ``as_of_sequence`` and ``event_time`` those of the last event it applied,
and ``index`` the value of the view's index field (``GET /views/<view>?<index>=V``
lists a view's keys by it). :class:`ViewChanges` makes rows from an application's
views.

Two input shapes, one per store (both applied in one transaction per batch):

* **per-event mode** (recommended for a live pipeline): ``(source, [rows])``,
  one element per Kafka message consumed, with the rows that message produced
  (possibly none). :meth:`ViewStore.apply_events`; :class:`ViewChanges` turns
  ``(envelope or None, source)`` messages into this shape with an app's views.
  The store then knows which offsets are done, so a view's position is the
  partition's *contiguous* watermark: ``position >= offset`` proves the write at
  ``offset`` is in the view however a parallel runner interleaves a partition's
  keys, and also after an event that changed no view.
* **records mode**: ``(row, source)``, one element per row.
  :meth:`ViewStore.apply`. The position is the highest offset applied (a
  high-water mark): it proves inclusion only if each partition's rows reach the
  sink in offset order, and it does not move for events that changed no view.

``source`` is the Kafka position of the message that produced a row, ``{'topic':
str, 'partition': int, 'offset': int}`` (a ``(topic, partition, offset)`` tuple is
accepted too).

Idempotency: every row is a full value, and a key's events all live in one
partition, in order. A row is skipped when its key's row already holds a value
from the same partition at the same or a later offset, so an event delivered
twice (a restarted pipeline, a retried bundle) changes a view once, and an old
value replayed after a newer one never rolls a view back. This per-key rule
equals "skip offset <= position" when a partition arrives in offset order, and
stays right when a parallel pipeline interleaves a partition's keys.

Stage times (``run.py stream --stage-times``, read by ``run.py bench causal
--breakdown``): :class:`ViewChanges` and :class:`WriteViewsToStore` built with
``stage_times=True`` carry, inside each message's source, the Unix times at which
it reached each stage of the view pipeline, and the store writes them to
``stage_times`` in the same transaction as the event's rows and positions:

* ``bundle``: when the bundle that first saw the message in Python started (the
  runner starts a bundle when its first element arrives: after the Kafka read);
* ``seen``: when that Python step (the routing to key spaces) got the message;
* ``handled``: when the view handler applied it (after the keyed exchange to the
  ordering; none for a message no view reads);
* ``sink``: when the store's writer got its outcome;
* ``begun``: when the store transaction holding it had its write lock;
* ``committing``: just before that transaction's COMMIT.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import urllib.parse
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import apache_beam as beam

from sourcebeam.schemas.registry import Registry
from sourcebeam.transforms.keyspace import Failed, ViewChange, json_default

ROWS_TABLE = 'view_rows'
# PostgreSQL: every transaction that moves a position also sends NOTIFY on this channel (delivered
# at commit, so a listener that re-reads the positions sees the move): the view API listens
# instead of polling.
POSITIONS_CHANNEL = 'sourcebeam_positions'
STAGE_TIMES_TABLE = 'stage_times'
TIMES = 'times'  # where a source carries its stage times (with stage_times=True)
STAGES = ('bundle', 'seen', 'handled', 'sink', 'begun', 'committing')
_LOG = logging.getLogger(__name__)

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


def sqlite_path(dsn: str) -> str:
  """The file of a SQLite DSN (a path, or ``sqlite:///path``)."""
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
    raise StoreError(f'a view row must be a dict, got {type(record).__name__}')
  view, key = record.get('view'), record.get('key')
  if not isinstance(view, str) or not view:
    raise StoreError(f'a view row needs a view name, got {view!r}')
  if not isinstance(key, str) or not key:
    raise StoreError(f'{view} row without a key')
  if 'value' not in record:
    raise StoreError(f'{view} row of {key!r} has no value')
  for f in ('as_of_sequence', 'event_time'):
    if isinstance(record.get(f), bool) or not isinstance(record.get(f), int):
      raise StoreError(f'{view} row of {key!r}: {f} must be a whole number')
  return view, key


def view_row(view: str, key: str, value: Any, event: Mapping[str, Any],
             index: Optional[str] = None) -> Dict[str, Any]:
  """The store's row for one key of one view: its record ``value`` as of ``event``."""
  row = {'view': view, 'key': key, 'value': value, 'as_of_sequence': event['sequence'],
         'event_time': event['event_time']}
  if index is not None and isinstance(value, Mapping):
    row['index'] = value.get(index)
  return row


# --- the store ----------------------------------------------------------------------------

class ViewStore:
  """One connection to the view store. Not shared between threads: open one per thread.

  Every statement is parameterised; values never become SQL text.
  """

  def __init__(self, dsn: str, views: Sequence[str] = (), stage_times: bool = False):
    self.dsn = dsn
    self.views = tuple(views)  # whose positions per-event batches move (every view of the app)
    self.stage_times = stage_times  # record the stage times sources carry (module docstring)
    self.postgres = is_postgres(dsn)
    if self.postgres:
      self.conn = _connect_postgres(dsn)
      self._ph = '%s'
    else:
      # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is one transaction.
      self.conn = sqlite3.connect(sqlite_path(dsn), timeout=30, isolation_level=None,
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
    self._positions_moved = False
    if not self.postgres:
      cur.execute('BEGIN IMMEDIATE')  # take the write lock now: no upgrade deadlocks

  def _commit(self) -> None:
    if self.postgres:
      if getattr(self, '_positions_moved', False):
        self.conn.cursor().execute(f'NOTIFY {POSITIONS_CHANNEL}')  # sent at the commit below
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
      cur.execute(f'CREATE TABLE IF NOT EXISTS {ROWS_TABLE} ('
                  'view TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, '
                  'as_of_sequence BIGINT NOT NULL, event_time BIGINT NOT NULL, '
                  'index_value TEXT, source_topic TEXT NOT NULL, '
                  'source_partition INTEGER NOT NULL, source_offset BIGINT NOT NULL, '
                  'PRIMARY KEY (view, key))')
      cur.execute(f'CREATE INDEX IF NOT EXISTS view_rows_index ON {ROWS_TABLE} '
                  '(view, index_value, key)')
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
      if self.stage_times:
        cur.execute(f'CREATE TABLE IF NOT EXISTS {STAGE_TIMES_TABLE} ('
                    'topic TEXT NOT NULL, kafka_partition INTEGER NOT NULL, '
                    'kafka_offset BIGINT NOT NULL, ' +
                    ''.join(f'{stage} DOUBLE PRECISION, ' for stage in STAGES) +
                    'PRIMARY KEY (topic, kafka_partition, kafka_offset))')
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
    that changed no view, was of a type no view reads, or was dead-lettered). The
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
    times = []
    for i, item in enumerate(events):
      if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[1], (list, tuple)):
        raise StoreError(f'event {i} must be a (source, [records]) pair')
      items.append((normalise_source(item[0]), i, item[1]))
      if self.stage_times and isinstance(item[0], Mapping) and isinstance(item[0].get(TIMES), Mapping):
        times.append((items[-1][0], item[0][TIMES]))
    items.sort(key=lambda t: (t[0], t[1]))
    counts = {'applied': 0, 'skipped': 0, 'events': len(items)}
    partitions = sorted({(t, p) for (t, p, _), _, _ in items})
    cur = self.conn.cursor()
    try:
      self._begin(cur)
      begun = time.time()
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
          for view in self.views:
            self._raise_position(cur, view, topic, partition, w)
      if times:
        self._record_stage_times(cur, times, begun)
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
    rows = list(newest.values())
    written = set()
    cols = ['view', 'key', 'value', 'as_of_sequence', 'event_time', 'index_value',
            'source_topic', 'source_partition', 'source_offset']
    updates = ', '.join(f'{c} = excluded.{c}' for c in cols[2:])
    t = ROWS_TABLE
    one = '(' + ', '.join('?' * len(cols)) + ')'
    for i in range(0, len(rows), rows_per_statement):
      chunk = rows[i:i + rows_per_statement]
      params: List[Any] = []
      for record, topic, partition, offset in chunk:
        index = record.get('index')
        params += [record['view'], record['key'],
                   json.dumps(record['value'], sort_keys=True, separators=(',', ':'),
                              default=json_default),
                   record['as_of_sequence'], record['event_time'],
                   None if index is None else str(index), topic, partition, offset]
      cur.execute(self._sql(
          f'INSERT INTO {t} ({", ".join(cols)}) VALUES {", ".join([one] * len(chunk))} '
          f'ON CONFLICT (view, key) DO UPDATE SET {updates} WHERE '
          # Same partition: the offset decides (a redelivered or older event is skipped).
          f'({t}.source_topic = excluded.source_topic AND '
          f'{t}.source_partition = excluded.source_partition AND '
          f'{t}.source_offset < excluded.source_offset) OR '
          # The key moved partition (a re-partitioned topic): the sequence decides.
          f'(({t}.source_topic <> excluded.source_topic OR '
          f'{t}.source_partition <> excluded.source_partition) AND '
          f'{t}.as_of_sequence < excluded.as_of_sequence) '
          'RETURNING view, key'), params)
      written.update((r[0], r[1]) for r in cur.fetchall())
    for k, n in group.items():
      counts['applied' if k in written else 'skipped'] += n
    return views

  def _record_stage_times(self, cur, times: List[Tuple[Source, Mapping[str, Any]]],
                          begun: float) -> None:
    """Writes each event's stage times (the first application of an offset wins)."""
    cols = ('topic', 'kafka_partition', 'kafka_offset') + STAGES
    committing = time.time()
    for (topic, partition, offset), marks in times:
      values = dict(marks, begun=begun, committing=committing)
      stage_values = [values.get(stage) for stage in STAGES]
      cur.execute(self._sql(
          f'INSERT INTO {STAGE_TIMES_TABLE} ({", ".join(cols)}) VALUES '
          f'({", ".join("?" * len(cols))}) ON CONFLICT (topic, kafka_partition, kafka_offset) '
          'DO NOTHING'),
          [topic, partition, offset] + [None if v is None else float(v) for v in stage_values])

  def read_stage_times(self, sources: Iterable[Source]) -> Dict[Source, Dict[str, Optional[float]]]:
    """{(topic, partition, offset): {stage: Unix time}} of those of ``sources`` the store has
    stage times for (written with ``stage_times=True``)."""
    out = {}
    for topic, partition, offset in sources:
      rows = self._rows(f'SELECT {", ".join(STAGES)} FROM {STAGE_TIMES_TABLE} WHERE topic = ? '
                        'AND kafka_partition = ? AND kafka_offset = ?', (topic, partition, offset))
      if rows:
        out[(topic, partition, offset)] = dict(zip(STAGES, rows[0]))
    return out

  def _raise_position(self, cur, view: str, topic: str, partition: int, offset: int) -> None:
    self._positions_moved = True
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
    """The current value (the view's record) of one key of one view, or None."""
    rows = self._rows(f'SELECT value FROM {ROWS_TABLE} WHERE view = ? AND key = ?', (view, key))
    return json.loads(rows[0][0]) if rows else None

  def by_index(self, view: str, value: str, limit: int = 1000) -> List[Dict[str, Any]]:
    """The values of one view whose index field equals ``value``, sorted by key."""
    rows = self._rows(f'SELECT value FROM {ROWS_TABLE} WHERE view = ? AND index_value = ? '
                      'ORDER BY key LIMIT ?', (view, value, limit))
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
  """``(row, source)`` (records mode) rather than ``(source, [rows])`` (per-event mode)."""
  return isinstance(element[0], Mapping) and 'view' in element[0]


class _WriteViewsFn(beam.DoFn):
  """Batches elements per bundle and applies each batch in one transaction: ``(record,
  source)`` pairs with :meth:`ViewStore.apply`, ``(source, [records])`` with
  :meth:`ViewStore.apply_events`. A batch is applied at the bundle's end, when it holds
  ``batch_size`` elements, or when its first element has waited ``max_delay_s`` while the
  bundle goes on (checked as elements arrive)."""

  def __init__(self, dsn: str, views: Sequence[str], batch_size: int,
               start_offsets: Optional[Mapping[Tuple[str, int], int]] = None,
               stage_times: bool = False, max_delay_s: Optional[float] = None):
    self.dsn = dsn
    self.views = tuple(views)
    self.batch_size = batch_size
    self.max_delay_s = max_delay_s
    self.start_offsets = dict(start_offsets or {})
    self.stage_times = stage_times
    self.applied = beam.metrics.Metrics.counter('view_store', 'applied')
    self.skipped = beam.metrics.Metrics.counter('view_store', 'skipped')
    self.events = beam.metrics.Metrics.counter('view_store', 'events')

  def setup(self):
    self.store = ViewStore(self.dsn, self.views, stage_times=self.stage_times)

  def start_bundle(self):
    self.records: List[Tuple[Record, Any]] = []
    self.outcomes: List[Tuple[Any, Sequence[Record]]] = []
    self.first_pending: Optional[float] = None

  def process(self, element):
    if is_record_pair(element):
      self.records.append(element)
    else:
      source = element[0]
      if self.stage_times and isinstance(source, Mapping) and isinstance(source.get(TIMES), Mapping):
        element = (dict(source, **{TIMES: dict(source[TIMES], sink=time.time())}), element[1])
      self.outcomes.append(element)
    now = time.monotonic()
    if self.first_pending is None:
      self.first_pending = now
    if (len(self.records) + len(self.outcomes) >= self.batch_size or
        (self.max_delay_s is not None and now - self.first_pending >= self.max_delay_s)):
      self._flush()

  def finish_bundle(self):
    self._flush()

  def _flush(self):
    self.first_pending = None
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
  """Writes view rows to the view store; the sink of a live views pipeline. ``views``: the
  names of every view the pipeline keeps (their positions move together in per-event mode).

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
  ``view_store/skipped``, ``view_store/events``). ``stage_times``: also record the
  stage times the sources carry (:class:`ViewChanges` with ``stage_times=True``)
  in the store's ``stage_times`` table, in the same transactions.

  ``max_delay_ms`` (default 25): a batch is also applied once its first element has
  waited that long while the bundle goes on. A live runner's bundle of a keyed step
  lasts as long as its elements' state round trips take; without this, the first
  write of a long bundle would wait for the whole bundle (measured on Flink under
  load: 145 to 317 ms at the median). ``None``: per bundle and per ``batch_size``
  only.
  """

  def __init__(self, dsn: str, views: Sequence[str], batch_size: int = 500,
               start_offsets: Optional[Mapping[Tuple[str, int], int]] = None,
               stage_times: bool = False, max_delay_ms: Optional[int] = 25):
    super().__init__()
    self.dsn = dsn
    self.views = tuple(views)
    self.batch_size = batch_size
    self.start_offsets = start_offsets
    self.stage_times = stage_times
    self.max_delay_s = None if max_delay_ms is None else max_delay_ms / 1000

  def expand(self, pairs):
    return pairs | 'ApplyToViewStore' >> beam.ParDo(
        _WriteViewsFn(self.dsn, self.views, self.batch_size, self.start_offsets,
                      self.stage_times, self.max_delay_s))


# --- Beam: from Kafka messages to per-event outcomes ----------------------------------------------

SOURCE_FIELD = '_source'  # where ViewChanges carries a message's source inside its envelope


def kafka_message(message: Any, registry: Registry) -> Tuple[Optional[Dict[str, Any]], Dict[str, Any]]:
  """One consumed Kafka message -> ``(envelope or None, source)``: :class:`ViewChanges`' input.

  ``message`` is what ``ReadFromKafka(..., with_metadata=True)`` yields (a Beam
  Row with ``topic``, ``partition``, ``offset``, ``value``...) or a dict with
  those keys. The value (the envelope's JSON form, as the event writer and the
  publish pipeline write it) goes through the publishing boundary again with the
  app's ``registry`` (:func:`schemas.validation.publish_raw`): a message that is
  not a valid envelope gives ``None``, so its offset still counts as done.
  """
  from sourcebeam.schemas.validation import publish_raw
  get = message.get if isinstance(message, Mapping) else (lambda k: getattr(message, k))
  topic, partition, offset = normalise_source(
      (get('topic'), int(get('partition')), int(get('offset'))))
  value = get('value')
  envelope = None
  if value is not None:
    envelope, _, _ = publish_raw(bytes(value) if not isinstance(value, str) else value, registry)
  return envelope, {'topic': topic, 'partition': partition, 'offset': offset}


class PerEventRecords:
  """A handler wrapper: each applied event gives exactly one output, ``(source, outputs)``.

  The source rides in the event under :data:`SOURCE_FIELD` (an extra key that
  handlers never read), so what a message produced stays together with its
  offset through ``ProcessInOrder``.
  """

  def __init__(self, handler: Any):
    self.handler = handler

  def initial_state(self, key: str) -> Any:
    return self.handler.initial_state(key)

  def apply(self, state: Any, event: Mapping[str, Any]) -> Tuple[Any, List[Any]]:
    new, outputs = self.handler.apply(state, event)
    source = event[SOURCE_FIELD]
    if TIMES in source:  # stage times: when the handler applied it
      source = dict(source, **{TIMES: dict(source[TIMES], handled=time.time())})
    return new, [(source, list(outputs))]


class _RouteMessages(beam.DoFn):
  """``(envelope or None, source)`` -> the event tagged with its source, to its key space's
  ordering, or ``(source, [])`` at once for a message no view reads (dead letter, other types)."""

  def __init__(self, routes: Mapping[str, str], stage_times: bool = False):
    self.routes = dict(routes)  # event type -> key space
    self.stage_times = stage_times

  def start_bundle(self):
    self.bundle_started = time.time()

  def process(self, pair):
    envelope, source = pair
    topic, partition, offset = normalise_source(source)
    source = {'topic': topic, 'partition': partition, 'offset': offset}
    if self.stage_times:
      source[TIMES] = {'bundle': self.bundle_started, 'seen': time.time()}
    space = self.routes.get(envelope.get('event_type')) if isinstance(envelope, Mapping) else None
    if space is None:
      yield source, []
    else:
      yield beam.pvalue.TaggedOutput(space, dict(envelope, **{SOURCE_FIELD: source}))


class _Rows(beam.DoFn):
  """``(key, (source, per-key outputs))`` -> ``(source, [view rows])``; a view whose handler
  failed on the event is logged and left as it was (the offset is still done)."""

  def __init__(self, views: Mapping[int, Any]):
    self.views = dict(views)  # consumer id -> View

  def process(self, kv):
    key, (source, outs) = kv
    rows = []
    for out in outs:
      view = self.views[out.consumer]
      if type(out) is ViewChange:
        rows.append(view_row(view.name, key, view.record(key, out.state, out.event), out.event,
                             view.index))
      elif type(out) is Failed:
        _LOG.warning('view %s could not apply event %s of key %r: %s', view.name,
                     out.event.get('event_id'), key, out.error)
    yield source, rows


def _unprocessed_outcome(rec: Mapping[str, Any]):
  """An event ordering did not apply (a duplicate...) is done, with no rows."""
  event = rec.get('event')
  if isinstance(event, Mapping) and SOURCE_FIELD in event:
    yield event[SOURCE_FIELD], []


class ViewChanges(beam.PTransform):
  """Kafka messages -> one ``(source, [view rows])`` per message: WriteViewsToStore's input.

  Input: ``(envelope, source)`` per consumed Kafka message, ``envelope`` the
  published envelope (``None`` for a message the publishing boundary refused),
  ``source`` its ``{'topic', 'partition', 'offset'}``. The app's views run under
  ``ProcessInOrder``, one ordering per key space, behind the same
  :class:`~sourcebeam.transforms.keyspace.KeySpaceHandler` a replay uses, wrapped
  in :class:`PerEventRecords`. Every message comes out exactly once: with the
  rows it produced, or with none (no view reads its type, refused, a duplicate,
  a handler error); a message whose key waits on a sequence gap comes out when
  the gap fills or times out, so the partition's watermark waits for it too.
  ``ordering`` passes options to ``ProcessInOrder``. ``stage_times``: each source
  carries the times the message reached each stage (module docstring), for
  :class:`WriteViewsToStore` with ``stage_times=True`` to record.
  """

  def __init__(self, app: Any, stage_times: bool = False, **ordering):
    super().__init__()
    self.app = app
    self.stage_times = stage_times
    self.ordering = dict(ordering, continue_on_handler_error=True)

  def expand(self, messages):
    from sourcebeam.transforms.consumers import key_space_handlers
    from sourcebeam.transforms.ordering import ProcessInOrder
    spaces = key_space_handlers(self.app, kinds=('view',))
    routes = {t: ks.name for ks in spaces for t in ks.event_types}
    views = {i: c for i, c in enumerate(self.app.per_key) if c.kind == 'view'}
    routed = messages | 'Route' >> beam.ParDo(_RouteMessages(routes, self.stage_times)).with_outputs(
        *[ks.name for ks in spaces], main='none')
    outcomes = [routed.none]
    for ks in spaces:
      ordered = routed[ks.name] | f'Order {ks.name}' >> ProcessInOrder(
          PerEventRecords(ks.handler), **self.ordering)
      outcomes.append(ordered.outputs | f'Rows {ks.name}' >> beam.ParDo(_Rows(views)))
      outcomes.append(ordered.unprocessed | f'Leftovers {ks.name}' >> beam.FlatMap(
          _unprocessed_outcome))
    return tuple(outcomes) | 'AllOutcomes' >> beam.Flatten()
