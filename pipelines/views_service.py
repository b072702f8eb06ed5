"""The view API: an application's views, each read able to wait for write receipts.

Routes (GET and HEAD; OPTIONS answers the methods and the CORS policy), all in
one table built from the app (:func:`routes_of`)::

    /views                     the app's views: name, index, route, event types
    /views/{view}/{key}        one key of a view (a view name may hold "/": retail/cart)
    /views/{view}?{index}=...  the keys of a view whose index field has that value
    ...each view's own route   (the demo: /carts/{key}, /products?category=...,
                                /users/{key}/recently-viewed, /users/{key}/frequently-viewed)
    /positions                 how far every view has applied every partition
    /health                    liveness; with a valid token also the store and the waiting reads

Effect after cause: each view read takes ``after=<receipt>``, one or more, as the
writer's compact receipt ``topic:partition:offset`` (repeat the parameter or
separate receipts with commas: ``after=retail:0:41,retail:2:7``). The read answers
only once the view's stored position for each receipt's partition is at or past
the receipt's offset, for at most ``--max-wait-ms`` (a request may ask for less
with ``wait_ms``); past that, 504 with the positions the view has reached.
Without ``after`` it answers at once with what it has and its positions. The
value is read *after* the positions are seen, and the store moves a view and its
positions in one transaction, so a satisfied receipt's write is in the answer.

Waiting costs no thread: a waiting read is a coroutine on the event loop, and one
:class:`PositionWatcher` per process reads the positions while any read waits and
wakes the reads whose receipts are met, so N waiting reads cost one loop, not N.
The watcher is told of new positions rather than polling them: on PostgreSQL it
LISTENs for the NOTIFY the store sends in the transaction that moves a position
(:class:`PostgresChanges`, asyncpg on the event loop); on SQLite a thread checks
``PRAGMA data_version`` every ``--poll-ms`` (a counter SQLite bumps on another
connection's commit; no table read) and the positions are read only after a commit
(:class:`SqliteChanges`). Either way they are re-read at least every second too, and
without a feed they are polled every ``--poll-ms``. The store (sqlite3 or pg8000,
both blocking) is used only from a bounded thread pool of ``--max-connections``
threads, each with its own connection.

Tokens: with ``$SOURCEBEAM_VIEWS_TOKENS`` (comma-separated) or ``--tokens-file``,
every route but ``/health`` needs ``Authorization: Bearer <token>`` (401 before
anything else). Without tokens the API is open, which ``serve views`` allows only
on a loopback address unless ``--no-auth`` says so (and then it warns).

With the store fed in per-event mode (``ViewChanges`` -> ``WriteViewsToStore``) a
position is the partition's contiguous watermark, so a satisfied receipt proves
inclusion under any parallelism; in records mode it is a high-water mark, which
proves it only when each partition reaches the sink in offset order (see
:mod:`transforms.view_store`). Answer shape::

    {"view": "retail/cart", "key": "u1", "found": true, "value": {...the view record...},
     "positions": [{"topic", "partition", "offset"}...], "waited_ms": 12}
    {"view": "retail/catalog", "index": "category", "category": "shoes", "values": [...], ...}
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import logging
import re
import sys
import threading
import time
import urllib.parse
from typing import Any, Awaitable, Callable, Dict, FrozenSet, List, Mapping, Optional, Set, Tuple

from sourcebeam.pipelines.apps import load_app
from sourcebeam.pipelines.cli import UsageError
from sourcebeam.pipelines.serve import (Answer, HttpError, check_http_arguments, check_token,
                                        is_loopback, load_tokens, not_found, parse_uint,
                                        serve_until_stopped, timing_header, token_given,
                                        wants_timing)
from sourcebeam.transforms.app import App
from sourcebeam.transforms.view_store import ViewStore, redact

log = logging.getLogger('sourcebeam.views')

TOKENS_ENV = 'SOURCEBEAM_VIEWS_TOKENS'
MAX_RECEIPTS = 100
MAX_KEY_CHARS = 256
TOPIC_RE = re.compile(r'[A-Za-z0-9._-]{1,249}')  # Kafka's legal topic names (fullmatch only)

Receipts = Dict[Tuple[str, int], int]  # (topic, partition) -> offset the view must reach


# --- routes: the one table ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Route:
  """One route. ``pattern`` segments in braces match one non-empty path segment (URL-decoded).

  ``kind``: ``view`` (a view read that may wait for receipts), ``views`` (the list),
  ``positions`` or ``health``. A view route names its ``view``, or takes it from the ``{view}``
  path parameter; its key is the ``{key_param}`` path parameter, or the query
  parameter ``key_query``. ``read`` picks how the store is read (see :data:`READERS`).
  """
  pattern: str
  kind: str = 'view'
  view: Optional[str] = None
  key_param: Optional[str] = None
  key_query: Optional[str] = None
  read: str = 'get'

  @property
  def segments(self) -> Tuple[str, ...]:
    return tuple(self.pattern.strip('/').split('/'))

  @property
  def query(self) -> FrozenSet[str]:
    """The query parameters this route takes."""
    if self.kind != 'view':
      return frozenset()
    return frozenset({'after', 'wait_ms'} | ({self.key_query} if self.key_query else set()))


STATIC_ROUTES: Tuple[Route, ...] = (
    Route('/views', kind='views'),
    Route('/positions', kind='positions'),
    Route('/health', kind='health'),
)


def routes_of(app: App) -> Tuple[Route, ...]:
  """The one route table of an app's view API: each view by name (one key, and the listing by
  its index if it has one), each view's own route, and the static routes."""
  routes: List[Route] = []
  seen: Dict[str, str] = {}
  for v in app.views:
    own = [Route(f'/views/{v.name}/{{key}}', view=v.name, key_param='key')]
    if v.index:
      own.append(Route(f'/views/{v.name}', view=v.name, key_query=v.index, read='by_index'))
    if v.route:
      own.append(Route(v.route, view=v.name, key_param='key') if '{key}' in v.route else
                 Route(v.route, view=v.name, key_query=v.index, read='by_index'))
    for r in own:
      if r.pattern in seen:
        raise UsageError(f'views {seen[r.pattern]} and {v.name} both answer {r.pattern}')
      seen[r.pattern] = v.name
    routes.extend(own)
  return tuple(routes) + STATIC_ROUTES


# How a view route reads the store: (store, route, view, key) -> the answer's fields.
READERS: Dict[str, Callable[[ViewStore, Route, str, str], Dict[str, Any]]] = {
    'get': lambda store, route, view, key: _found(store.get(view, key), view, key),
    'by_index': lambda store, route, view, key: {
        'view': view, 'index': route.key_query, route.key_query: key,
        'values': store.by_index(view, key)},
}


def _found(value: Any, view: str, key: str) -> Dict[str, Any]:
  return {'view': view, 'key': key, 'found': value is not None, 'value': value}


def match(path: str, routes: Tuple[Route, ...]) -> Tuple[Route, Dict[str, str]]:
  """(route, path parameters) of a raw path; HttpError 404 for no route, 400 for a bad key."""
  parts = path[1:].split('/') if path.startswith('/') else None
  for route in routes:
    segs = route.segments
    if parts is None or len(parts) != len(segs):
      continue
    params = {}
    for want, got in zip(segs, parts):
      if want.startswith('{') and want.endswith('}'):
        if not got:
          break
        params[want[1:-1]] = got
      elif want != got:
        break
    else:
      return route, {k: _key(v, k) for k, v in params.items()}
  raise not_found(path, [r.pattern + (f'?{r.key_query}=...' if r.key_query else '') for r in routes])


def _key(segment: str, what: str) -> str:
  try:
    key = urllib.parse.unquote(segment, errors='strict')
  except UnicodeDecodeError:
    raise HttpError(400, f'{what} is not UTF-8 once %-decoded') from None
  if not key or len(key) > MAX_KEY_CHARS:
    raise HttpError(400, f'{what} must be 1 to {MAX_KEY_CHARS} characters')
  return key


def parse_receipts(values: List[str]) -> Receipts:
  """``after`` values (repeated, each possibly comma-separated) -> {(topic, partition): offset}.

  Several receipts for one partition need only the highest. Partition and offset are
  read with ASCII digits only; a topic is a whole Kafka topic name (no newline). HttpError
  400 on a bad one.
  """
  out: Receipts = {}
  items = [item.strip(' ') for v in values for item in v.split(',')]
  if len(items) > MAX_RECEIPTS:
    raise HttpError(400, f'{len(items)} receipts; at most {MAX_RECEIPTS} per request')
  for item in items:
    parts = item.rsplit(':', 2)
    if len(parts) != 3:
      raise HttpError(400, f'bad receipt {item!r}: expected topic:partition:offset',
                      example='retail:0:42')
    topic, partition, offset = parts
    if not TOPIC_RE.fullmatch(topic):
      raise HttpError(400, f'bad receipt {item!r}: {topic!r} is not a Kafka topic name')
    try:
      k = (topic, parse_uint(partition, 'partition', 9))
      o = parse_uint(offset, 'offset', 18)
    except HttpError:
      raise HttpError(400, f'bad receipt {item!r}: partition and offset must be whole numbers '
                           '>= 0 written with the digits 0-9') from None
    out[k] = max(out.get(k, -1), o)
  return out


@dataclasses.dataclass
class Read:
  """A parsed request: the route, the view and key, the receipts to wait for, and how long."""
  route: Route
  view: Optional[str] = None
  key: Optional[str] = None
  receipts: Receipts = dataclasses.field(default_factory=dict)
  wait_ms: int = 0


def pending_receipts(receipts: Receipts, positions: List[Dict[str, Any]]) -> List[Tuple[str, int, int]]:
  """The receipts a view's positions have not reached yet."""
  reached = {(p['topic'], p['partition']): p['offset'] for p in positions}
  return [(t, p, o) for (t, p), o in sorted(receipts.items()) if reached.get((t, p), -1) < o]


# --- waiting: one watcher per process, told of commits where the store can tell ------------------

# With a change feed, the positions are re-read on each change the feed reports and, as a
# safety net (a notification lost with a dropped connection), at least this often.
RESYNC_S = 1.0
MIN_POLL_S = 0.01


class SqliteChanges:
  """Tells the watcher of commits to a SQLite store: a thread checks ``PRAGMA data_version``
  (which changes when another connection commits; no table is read) every ``check_s`` while
  reads wait, and sets the watcher's event when it changed. Idle while no read waits."""

  def __init__(self, path: str, check_s: float):
    self.path, self.check_s = path, check_s
    self.checks = 0
    self._active = threading.Event()
    self._stopping = False
    self._thread: Optional[threading.Thread] = None

  async def start(self, wake: Callable[[], None]) -> bool:
    import sqlite3
    conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.execute('PRAGMA data_version').fetchone()  # fails now, at start, on a bad file
    self._thread = threading.Thread(target=self._run, args=(conn, wake), daemon=True,
                                    name='views-sqlite-changes')
    self._thread.start()
    return True

  @property
  def listening(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def active(self, on: bool) -> None:
    (self._active.set if on else self._active.clear)()

  def _run(self, conn, wake: Callable[[], None]) -> None:
    try:
      last = None
      while not self._stopping:
        if not self._active.wait(0.5):
          last = None  # idle: the first check after a pause always wakes the watcher
          continue
        version = conn.execute('PRAGMA data_version').fetchone()[0]
        self.checks += 1
        if version != last:
          last = version
          wake()
        time.sleep(self.check_s)
    except Exception as e:  # the watcher's resync keeps reads answered, more slowly
      log.warning('watching the view store for commits stopped: %s', e)
    finally:
      conn.close()

  async def stop(self) -> None:
    self._stopping = True
    self._active.set()
    if self._thread is not None:
      await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5)


class PostgresChanges:
  """Tells the watcher of commits that moved positions in a PostgreSQL store: LISTEN on
  :data:`~sourcebeam.transforms.view_store.POSITIONS_CHANNEL` (the store sends NOTIFY in the
  transaction that moves a position) on one asyncpg connection on the event loop. A dropped
  connection is reopened; meanwhile the watcher polls."""

  def __init__(self, dsn: str):
    self.dsn = dsn
    self.notifications = 0
    self._conn = None
    self._wake: Callable[[], None] = lambda: None
    self._reconnect: Optional['asyncio.Task[None]'] = None
    self.listening = False

  async def start(self, wake: Callable[[], None]) -> bool:
    self._wake = wake
    return await self._listen()

  async def _listen(self) -> bool:
    from sourcebeam.transforms.view_store import POSITIONS_CHANNEL
    try:
      import asyncpg
      self._conn = await asyncpg.connect(self.dsn, timeout=30)
      await self._conn.add_listener(POSITIONS_CHANNEL, self._notified)
      self._conn.add_termination_listener(self._lost)
    except Exception as e:
      log.warning('cannot LISTEN for position changes (%s: %s); polling instead',
                  type(e).__name__, str(e).replace(self.dsn, redact(self.dsn)))
      self.listening = False
      return False
    self.listening = True
    self._wake()  # anything committed before LISTEN took effect: read once more
    return True

  def _notified(self, *args) -> None:
    self.notifications += 1
    self._wake()

  def _lost(self, *args) -> None:
    self.listening = False
    log.warning('the LISTEN connection to the view store was lost; polling until it is back')
    if self._reconnect is None or self._reconnect.done():
      self._reconnect = asyncio.get_running_loop().create_task(self._again())

  async def _again(self) -> None:
    while not await self._listen():
      await asyncio.sleep(RESYNC_S)

  def active(self, on: bool) -> None:
    pass  # notifications cost nothing while no read waits

  async def stop(self) -> None:
    if self._reconnect is not None:
      self._reconnect.cancel()
    if self._conn is not None:
      conn, self._conn = self._conn, None
      conn.remove_termination_listener(self._lost)
      await conn.close()


class PositionWatcher:
  """Wakes the reads whose receipts the view positions meet: N waiting reads cost one loop.
  Lives on the event loop.

  While any read waits it reads the positions, then waits for the next change: told by
  ``changes`` (:class:`PostgresChanges`, :class:`SqliteChanges`) when the store can tell,
  re-reading at least every :data:`RESYNC_S` anyway; without a feed (or while it is down) it
  polls every ``poll_s`` (at least 10 ms).
  """

  def __init__(self, fetch: Callable[[], Awaitable[List[Dict[str, Any]]]], poll_s: float,
               changes: Any = None):
    self.fetch, self.poll_s, self.changes = fetch, poll_s, changes
    # Polling reads the positions each time: not more often than every 10 ms.
    self.fallback_s = max(poll_s, MIN_POLL_S)
    self.waiters: Dict['asyncio.Future[Tuple[List[Dict[str, Any]], float]]', Tuple[str, Receipts]] = {}
    self.task: Optional['asyncio.Task[None]'] = None
    self.polls = 0
    self.errors = 0
    self.told = False  # whether the feed is telling (else: polling)
    self._changed: Optional[asyncio.Event] = None

  async def start(self) -> None:
    loop = asyncio.get_running_loop()
    self._changed = asyncio.Event()

    def wake() -> None:  # from any thread
      loop.call_soon_threadsafe(self._changed.set)
    if self.changes is not None:
      self.told = await self.changes.start(wake)

  async def wait(self, view: str, receipts: Receipts, timeout: float,
                 marks: Optional[Dict[str, float]] = None) -> List[Dict[str, Any]]:
    """The view's positions once they meet ``receipts``; asyncio.TimeoutError after ``timeout``.
    ``marks['noticed']`` gets the Unix time the positions that met them were read."""
    loop = asyncio.get_running_loop()
    fut: 'asyncio.Future[Tuple[List[Dict[str, Any]], float]]' = loop.create_future()
    self.waiters[fut] = (view, receipts)
    if self.task is None or self.task.done():
      self.task = loop.create_task(self._run())
    try:
      positions, noticed = await asyncio.wait_for(fut, timeout)
    finally:
      self.waiters.pop(fut, None)
    if marks is not None:
      marks['noticed'] = noticed
    return positions

  def _waiting(self) -> bool:
    return any(not f.done() for f in self.waiters)

  async def _run(self) -> None:
    if self._changed is None:
      await self.start()
    if self.changes is not None:
      self.changes.active(True)
    try:
      while self._waiting():
        self._changed.clear()  # before the read: a commit during it wakes the next round
        try:
          positions = await self.fetch()
          fetched = time.time()
        except Exception as e:  # the waiting reads time out with 504 if this goes on
          self.errors += 1
          log.warning('reading the view positions failed: %s', e)
        else:
          self.polls += 1
          by_view: Dict[str, List[Dict[str, Any]]] = {}
          for p in positions:
            by_view.setdefault(p['view'], []).append(p)
          for fut, (view, receipts) in list(self.waiters.items()):
            mine = by_view.get(view, [])
            if not fut.done() and not pending_receipts(receipts, mine):
              fut.set_result((mine, fetched))
        if self._waiting():
          told = self.changes is not None and getattr(self.changes, 'listening', self.told)
          try:
            await asyncio.wait_for(self._changed.wait(), RESYNC_S if told else self.fallback_s)
          except asyncio.TimeoutError:
            pass
    finally:
      if self.changes is not None:
        self.changes.active(False)

  async def stop(self) -> None:
    if self.task is not None and not self.task.done():
      self.task.cancel()
      try:
        await self.task
      except asyncio.CancelledError:
        pass
    if self.changes is not None:
      await self.changes.stop()


# --- the API -------------------------------------------------------------------------------------

class ViewsApi:
  """Plain-Python request handling: :meth:`parse` (sync, no I/O) and :meth:`handle` (async;
  the store through a bounded thread pool, waiting through the one watcher)."""

  max_body_bytes = 0  # GET only: any body is refused

  def __init__(self, app: App, dsn: str, max_wait_ms: int = 5000, poll_ms: int = 2,
               max_connections: int = 16, tokens: Optional[Set[str]] = None,
               routes: Optional[Tuple[Route, ...]] = None):
    self.app = app
    self.dsn, self.max_wait_ms, self.poll_ms = dsn, max_wait_ms, poll_ms
    self.tokens = set(tokens or ())
    self.routes = routes_of(app) if routes is None else routes
    self.executor = concurrent.futures.ThreadPoolExecutor(max_connections,
                                                          thread_name_prefix='views-db')
    self._local = threading.local()
    self._stores: List[ViewStore] = []
    self._stores_lock = threading.Lock()
    self.watcher: Optional[PositionWatcher] = None
    self.fatal: Callable[[str], None] = lambda reason: None
    try:  # fail at start-up, not at the first request, on a bad DSN
      self.executor.submit(self._with_store, lambda s: s.positions()).result()
    except BaseException:
      self.close()
      raise

  # --- the store, from the pool's threads only ---------------------------------------------

  def _with_store(self, fn: Callable[[ViewStore], Any]) -> Any:
    store = getattr(self._local, 'store', None)
    if store is None:
      store = ViewStore(self.dsn)
      self._local.store = store
      with self._stores_lock:
        self._stores.append(store)
    try:
      return fn(store)
    except Exception:
      self._local.store = None  # a broken connection is not used again
      with self._stores_lock:
        if store in self._stores:
          self._stores.remove(store)
      store.close()
      raise

  async def db(self, fn: Callable[[ViewStore], Any]) -> Any:
    try:
      return await asyncio.get_running_loop().run_in_executor(self.executor, self._with_store, fn)
    except Exception as e:
      log.warning('the view store failed: %s: %s', type(e).__name__,
                  str(e).replace(self.dsn, redact(self.dsn)))
      raise HttpError(503, 'the view store did not answer; retry') from None

  async def start(self) -> None:
    from sourcebeam.transforms.view_store import is_postgres, sqlite_path
    changes = (PostgresChanges(self.dsn) if is_postgres(self.dsn) else
               SqliteChanges(sqlite_path(self.dsn), self.poll_ms / 1000))
    self.watcher = PositionWatcher(lambda: self.db(lambda s: s.positions()), self.poll_ms / 1000,
                                   changes)
    await self.watcher.start()

  async def stop(self) -> None:
    if self.watcher is not None:
      await self.watcher.stop()

  def close(self) -> None:
    self.executor.shutdown(wait=True)
    with self._stores_lock:
      stores, self._stores = self._stores, []
    for store in stores:
      store.close()

  # --- requests --------------------------------------------------------------------------------

  def methods(self, path: str) -> List[str]:
    match(path, self.routes)  # 404 for no such route
    return ['GET']

  def check(self, method: str, target: str, headers: Mapping[str, str]) -> None:
    """Route and token, before anything is read."""
    route, _ = match(urllib.parse.urlsplit(target).path, self.routes)
    if self.tokens and route.kind != 'health':
      check_token(headers, self.tokens)

  def parse(self, target: str) -> Read:
    """A request target -> :class:`Read` (plain Python, no I/O); HttpError 4xx when bad."""
    url = urllib.parse.urlsplit(target)
    route, params = match(url.path, self.routes)
    try:
      query = urllib.parse.parse_qs(url.query, keep_blank_values=True,
                                    strict_parsing=bool(url.query), errors='strict',
                                    max_num_fields=MAX_RECEIPTS + 10)
    except (ValueError, UnicodeDecodeError) as e:
      raise HttpError(400, f'bad query string: {e}') from None
    unknown = sorted(set(query) - route.query)
    if unknown:
      raise HttpError(400, f'unknown query parameter(s) {unknown}', allowed=sorted(route.query))
    if route.kind != 'view':
      return Read(route)
    view = route.view or params.get('view')
    if route.key_query:
      values = query.get(route.key_query, [])
      if len(values) != 1 or not values[0]:
        raise HttpError(400, f'give exactly one {route.key_query}: {route.pattern}?{route.key_query}=...')
      key = values[0]
      if len(key) > MAX_KEY_CHARS:
        raise HttpError(400, f'{route.key_query} must be 1 to {MAX_KEY_CHARS} characters')
    else:
      key = params[route.key_param or 'key']
    wait_ms = self.max_wait_ms
    if 'wait_ms' in query:
      wait_ms = min(parse_uint(query['wait_ms'][-1], 'wait_ms', 9), self.max_wait_ms)
    return Read(route, view, key, parse_receipts(query.get('after', [])), wait_ms)

  async def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Answer:
    marks = {'received': time.time()} if wants_timing(headers) else None
    self.check(method, target, headers)
    read = self.parse(target)
    if read.route.kind == 'health':
      return await self._health(bool(self.tokens) and token_given(headers, self.tokens))
    if read.route.kind == 'positions':
      return 200, {'positions': await self.db(lambda s: s.positions())}, {}
    if read.route.kind == 'views':
      return 200, {'app': self.app.name, 'views': [
          {'name': v.name, 'index': v.index, 'route': v.route, 'event_types': sorted(v.event_types)}
          for v in self.app.views]}, {}
    if marks is None:
      return await self._read(read)
    status, payload, extra = await self._read(read, marks)
    marks['answered'] = time.time()
    return status, payload, dict(extra, **timing_header(marks))

  async def _health(self, detailed: bool) -> Answer:
    if not detailed:
      return 200, {'status': 'ok'}, {}  # liveness only: nothing about the store or the views
    positions = await self.db(lambda s: s.positions())
    watcher = self.watcher
    return 200, {'status': 'ok', 'db': redact(self.dsn), 'views': sorted({p['view'] for p in positions}),
                 'waiting_reads': len(watcher.waiters) if watcher else 0,
                 'position_polls': watcher.polls if watcher else 0,
                 'position_changes': _how_told(watcher)}, {}

  async def _read(self, read: Read, marks: Optional[Dict[str, float]] = None) -> Answer:
    """A view read; ``marks`` (stage timing) gets ``checked`` (the first positions read) and
    ``noticed`` (when positions meeting the receipts were read)."""
    view, key, receipts = read.view, read.key, read.receipts
    route = read.route
    read_store = lambda s: READERS[route.read](s, route, view, key)
    start = time.monotonic()
    waited_ms = 0
    if receipts:
      positions = await self.db(lambda s: s.positions(view))
      if marks is not None:
        marks['checked'] = marks['noticed'] = time.time()
      if pending_receipts(receipts, positions):
        timeout = max(0.0, read.wait_ms / 1000 - (time.monotonic() - start))
        try:
          positions = await self.watcher.wait(view, receipts, timeout, marks)
        except asyncio.TimeoutError:
          positions = await self.db(lambda s: s.positions(view))
          pending = pending_receipts(receipts, positions)
          if pending:
            reached = {(p['topic'], p['partition']): p['offset'] for p in positions}
            waited = int((time.monotonic() - start) * 1000)
            raise HttpError(
                504, f'the {view} view has not applied {len(pending)} receipt(s) after {waited} ms',
                view=view, waited_ms=waited,
                pending=[{'after': f'{t}:{p}:{o}', 'position': reached.get((t, p))}
                         for t, p, o in pending],
                positions=_positions(positions))
        waited_ms = int((time.monotonic() - start) * 1000)
      # Read the value after the positions: the write the receipt names is in it.
      body = await self.db(read_store)
    else:
      positions, body = await self.db(lambda s: (s.positions(view), read_store(s)))
    body['positions'] = _positions(positions)
    body['waited_ms'] = waited_ms  # time spent waiting for receipts; 0 when none had to wait
    return 200, body, {}


def _how_told(watcher: Optional[PositionWatcher]) -> str:
  """How the watcher learns of new positions: ``notify`` (PostgreSQL LISTEN), ``data_version``
  (SQLite commits, checked every --poll-ms) or ``polling`` (the positions read every --poll-ms)."""
  changes = watcher.changes if watcher else None
  if changes is None or not getattr(changes, 'listening', False):
    return 'polling'
  return 'notify' if isinstance(changes, PostgresChanges) else 'data_version'


def _positions(positions: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  return [{'topic': p['topic'], 'partition': p['partition'], 'offset': p['offset']}
          for p in positions]


def run(args: argparse.Namespace) -> int:
  """``serve views``: check the options and the token policy, open the store, serve until stopped."""
  if args.max_wait_ms < 0 or args.poll_ms < 1 or args.max_connections < 1:
    raise UsageError('--max-wait-ms must be >= 0, --poll-ms and --max-connections >= 1')
  cors = check_http_arguments(args)
  tokens = load_tokens(TOKENS_ENV, args.tokens_file)
  if tokens and args.no_auth:
    raise UsageError(f'--no-auth contradicts the configured tokens (${TOKENS_ENV} / --tokens-file)')
  if not tokens and not is_loopback(args.host):
    if not args.no_auth:
      raise UsageError(f'--host {args.host} is reachable beyond this machine: set ${TOKENS_ENV} '
                       '(comma-separated) or --tokens-file so reads need a bearer token, or pass '
                       '--no-auth to serve every view to anyone who can connect')
    print(f'warning: the view API listens on {args.host} without tokens: anyone who can reach it '
          f'reads every view (set ${TOKENS_ENV} to require a bearer token)', file=sys.stderr, flush=True)
  try:
    api = ViewsApi(load_app(args.app), args.db, args.max_wait_ms, args.poll_ms,
                   args.max_connections, tokens)
  except Exception as e:  # the password never appears: the message names the redacted DSN
    raise UsageError(f'cannot open the view store {redact(args.db)}: '
                     f'{type(e).__name__}: {str(e).replace(args.db, redact(args.db))}') from None
  auth = 'bearer tokens' if tokens else 'no tokens'
  return serve_until_stopped(api, args, f'view API ({redact(args.db)}; {auth}; CORS: '
                                        f'{cors.describe()})', cors)
