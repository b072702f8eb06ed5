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

Input of :meth:`ViewStore.apply` and of the Beam sink :class:`WriteViewsToStore`:
pairs ``(record, source)``, where ``record`` is a view record of
:class:`transforms.projections.RetailProjections` (``final=False``: each record is
the new full value of one view key; ``{view, key, ..., as_of_sequence,
event_time}``) and ``source`` is the Kafka position of the event that produced it,
``{'topic': str, 'partition': int, 'offset': int}`` (a ``(topic, partition,
offset)`` tuple is accepted too).

Idempotency: every record is a full value, and a key's events all live in one
partition, in order. A record is skipped when its key's row already holds a
record from the same partition at the same or a later offset, so an event
delivered twice (a restarted pipeline, a retried write) changes a view once, and
an old record replayed after a newer one never rolls a view back. This per-key
rule equals the per-partition rule "skip offset <= position" when a partition's
records arrive in offset order, and stays right when a parallel pipeline
interleaves different keys of one partition. ``positions`` records the highest
offset applied per (view, partition); a record skipped as a duplicate still
counts as applied for it.

What the position promises: ``position >= offset`` means the view has applied
every record of that partition up to ``offset`` *if* the sink receives each
partition's records in offset order (see the module docstring of
``pipelines/views_service.py`` and the report to the pipeline's author).
"""

from __future__ import annotations

import json
import sqlite3
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
      self.conn.execute('PRAGMA journal_mode=WAL')
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
    applied = skipped = 0
    highest: Dict[Tuple[str, str, int], int] = {}
    greatest = 'GREATEST' if self.postgres else 'MAX'
    cur = self.conn.cursor()
    try:
      self._begin(cur)
      for (topic, partition, offset), _, record in items:
        view, key = _check_record(record)  # checked inside: a bad record rolls back the batch
        table = TABLES[view]
        cols = ['key', 'value', 'as_of_sequence', 'event_time',
                'source_topic', 'source_partition', 'source_offset']
        values = [key, json.dumps(record, sort_keys=True, separators=(',', ':')),
                  record['as_of_sequence'], record['event_time'], topic, partition, offset]
        if view == 'catalog':
          cols.append('category')
          values.append(record.get('category'))
        updates = ', '.join(f'{c} = excluded.{c}' for c in cols[1:])
        cur.execute(self._sql(
            f'INSERT INTO {table} ({", ".join(cols)}) VALUES ({", ".join("?" * len(cols))}) '
            f'ON CONFLICT (key) DO UPDATE SET {updates} WHERE '
            # Same partition: the offset decides (a redelivered or older event is skipped).
            f'({table}.source_topic = excluded.source_topic AND '
            f'{table}.source_partition = excluded.source_partition AND '
            f'{table}.source_offset < excluded.source_offset) OR '
            # The key moved partition (a re-partitioned topic): the sequence decides.
            f'(({table}.source_topic <> excluded.source_topic OR '
            f'{table}.source_partition <> excluded.source_partition) AND '
            f'{table}.as_of_sequence < excluded.as_of_sequence)'), values)
        if cur.rowcount and cur.rowcount > 0:
          applied += 1
        else:
          skipped += 1
        pos_key = (view, topic, partition)
        highest[pos_key] = max(offset, highest.get(pos_key, -1))
      for (view, topic, partition), offset in sorted(highest.items()):
        cur.execute(self._sql(
            'INSERT INTO positions (view, topic, kafka_partition, applied_offset) VALUES (?, ?, ?, ?) '
            'ON CONFLICT (view, topic, kafka_partition) DO UPDATE SET '
            f'applied_offset = {greatest}(positions.applied_offset, excluded.applied_offset)'),
            (view, topic, partition, offset))
      self._commit()
    except BaseException:
      self._rollback()
      raise
    return {'applied': applied, 'skipped': skipped}

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

class _WriteViewsFn(beam.DoFn):
  """Batches ``(record, source)`` pairs per bundle and applies each batch in one transaction."""

  def __init__(self, dsn: str, batch_size: int):
    self.dsn = dsn
    self.batch_size = batch_size
    self.applied = beam.metrics.Metrics.counter('view_store', 'applied')
    self.skipped = beam.metrics.Metrics.counter('view_store', 'skipped')

  def setup(self):
    self.store = ViewStore(self.dsn)

  def start_bundle(self):
    self.batch: List[Tuple[Record, Any]] = []

  def process(self, element):
    self.batch.append(element)
    if len(self.batch) >= self.batch_size:
      self._flush()

  def finish_bundle(self):
    self._flush()

  def _flush(self):
    if self.batch:
      counts = self.store.apply(self.batch)
      self.applied.inc(counts['applied'])
      self.skipped.inc(counts['skipped'])
      self.batch = []

  def teardown(self):
    store = getattr(self, 'store', None)
    if store is not None:
      store.close()


class WriteViewsToStore(beam.PTransform):
  """Writes view records to the view store; the sink of a live projections pipeline.

  Input: a PCollection of ``(record, source)`` pairs (see the module docstring):
  ``record`` a RetailProjections view record, ``source`` ``{'topic', 'partition',
  'offset'}`` of the Kafka event that produced it. Each bundle is applied in
  batches of at most ``batch_size``, each in one transaction with its positions;
  a bundle retried by the runner is harmless (idempotent by offset). Output: none
  (counters ``view_store/applied`` and ``view_store/skipped``).
  """

  def __init__(self, dsn: str, batch_size: int = 500):
    super().__init__()
    self.dsn = dsn
    self.batch_size = batch_size

  def expand(self, pairs):
    return pairs | 'ApplyToViewStore' >> beam.ParDo(_WriteViewsFn(self.dsn, self.batch_size))
