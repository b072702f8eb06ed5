"""The view API: an application's views, each read able to wait for write receipts.

Routes (all GET)::

    /views                     the app's views: name, index, route
    /views/{view}/{key}        one key of a view (a view name may hold "/": retail/cart)
    /views/{view}?{index}=...  the keys of a view whose index field has that value
    /positions                 how far every view has applied every partition
    /health
    ...and each view's own ``route`` (the demo: /carts/{key}, /products?category=...,
    /users/{key}/recently-viewed, /users/{key}/frequently-viewed)

Effect after cause: each view read takes ``after=<receipt>``, one or more, as the
writer's compact receipt ``topic:partition:offset`` (repeat the parameter or
separate receipts with commas: ``after=retail:0:41,retail:2:7``). The read answers
only once the view's stored position for each receipt's partition is at or past
the receipt's offset, checking every ``--poll-ms`` for at most ``--max-wait-ms``
(a request may ask for less with ``wait_ms``); past that, 504 with the positions
the view has reached. Without ``after`` it answers at once with what it has and
its positions. The value is read *after* the positions are seen, and the store
moves a view and its positions in one transaction, so a satisfied receipt's
write is in the answer.

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
import contextlib
import logging
import queue
import re
import threading
import time
import urllib.parse
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from sourcebeam.pipelines.apps import load_app
from sourcebeam.pipelines.cli import UsageError
from sourcebeam.pipelines.serve import (Answer, HttpError, make_server, method_not_allowed, not_found,
                             serve_until_stopped)
from sourcebeam.transforms.app import App
from sourcebeam.transforms.view_store import ViewStore, redact

log = logging.getLogger('sourcebeam.views')

MAX_RECEIPTS = 100
MAX_KEY_CHARS = 256
TOPIC_RE = re.compile(r'^[A-Za-z0-9._-]{1,249}$')  # Kafka's legal topic names

Receipts = Dict[Tuple[str, int], int]  # (topic, partition) -> offset the view must reach


def parse_receipts(values: List[str]) -> Receipts:
  """``after`` values (repeated, each possibly comma-separated) -> {(topic, partition): offset}.

  Several receipts for one partition need only the highest. HttpError 400 on a bad one.
  """
  out: Receipts = {}
  items = [item.strip() for v in values for item in v.split(',')]
  if len(items) > MAX_RECEIPTS:
    raise HttpError(400, f'{len(items)} receipts; at most {MAX_RECEIPTS} per request')
  for item in items:
    parts = item.rsplit(':', 2)
    if len(parts) != 3:
      raise HttpError(400, f'bad receipt {item!r}: expected topic:partition:offset',
                      example='retail:0:42')
    topic, partition, offset = parts
    if not TOPIC_RE.match(topic):
      raise HttpError(400, f'bad receipt {item!r}: {topic!r} is not a Kafka topic name')
    if not (partition.isdigit() and offset.isdigit()) or len(partition) > 9 or len(offset) > 18:
      raise HttpError(400, f'bad receipt {item!r}: partition and offset must be whole numbers >= 0')
    k = (topic, int(partition))
    out[k] = max(out.get(k, -1), int(offset))
  return out


def _key(segment: str, what: str) -> str:
  key = urllib.parse.unquote(segment)
  if not key or len(key) > MAX_KEY_CHARS:
    raise HttpError(400, f'{what} must be 1 to {MAX_KEY_CHARS} characters')
  return key


class ViewsApi:
  """Plain-Python request handling; ``handle`` gives ``(status, body, headers)``.

  Store connections are pooled (at most ``max_connections`` in use): sqlite3 and
  pg8000 connections must not be shared between threads at once.
  """

  max_body_bytes = 0  # GET only: any body is refused

  def __init__(self, app: App, dsn: str, max_wait_ms: int = 5000, poll_ms: int = 20,
               max_connections: int = 16):
    self.app = app
    self.views = {v.name: v for v in app.views}
    self.routes = view_routes(app)
    self.dsn, self.max_wait_ms, self.poll_ms = dsn, max_wait_ms, poll_ms
    self.pool: 'queue.LifoQueue[ViewStore]' = queue.LifoQueue()
    # At most this many connections at once (a PostgreSQL server has few to give); a waiting
    # read holds one only while it looks, never while it sleeps.
    self.slots = threading.BoundedSemaphore(max_connections)
    self.pool.put(ViewStore(dsn))  # fail at start-up, not at the first request, on a bad DSN

  @contextlib.contextmanager
  def store(self) -> Iterator[ViewStore]:
    with self.slots:
      try:
        store = self.pool.get_nowait()
      except queue.Empty:
        store = ViewStore(self.dsn)
      try:
        yield store
      except HttpError:
        self.pool.put(store)
        raise
      except Exception:
        store.close()  # a broken connection is not put back
        raise
      else:
        self.pool.put(store)

  def close(self) -> None:
    while True:
      try:
        self.pool.get_nowait().close()
      except queue.Empty:
        return

  def _route(self, path: str) -> Tuple[str, Optional[str]]:
    """(view or special route, key; None to list by the view's index) for a path; 404 else."""
    if path in ('/positions', '/health', '/views'):
      return path[1:], None
    if path.startswith('/views/'):
      rest = path[len('/views/'):]
      if rest in self.views:
        if self.views[rest].index is None:
          raise HttpError(404, f'view {rest} has no index to list by: ask for one key, '
                               f'/views/{rest}/{{key}}')
        return rest, None
      name, _, segment = rest.rpartition('/')
      if name in self.views and segment:
        return name, _key(segment, 'key')
      raise HttpError(404, f'no view {name or rest!r} in app {self.app.name}',
                      views=sorted(self.views))
    parts = path.split('/')
    for template, view in self.routes:
      if len(template) == len(parts) and all(t == p or (t == '{key}' and p)
                                               for t, p in zip(template, parts)):
        i = template.index('{key}') if '{key}' in template else None
        return view, None if i is None else _key(parts[i], 'key')
    raise not_found(path, ['/views', '/views/{view}/{key}', '/views/{view}?{index}=...',
                           '/positions', '/health'] + ['/'.join(t) for t, _ in self.routes])

  def check(self, method: str, path: str, headers: Mapping[str, str]) -> None:
    self._route(urllib.parse.urlsplit(path).path)
    if method != 'GET':
      raise method_not_allowed(method, 'GET')

  def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Answer:
    self.check(method, path, headers)
    url = urllib.parse.urlsplit(path)
    view, key = self._route(url.path)
    try:
      params = urllib.parse.parse_qs(url.query, keep_blank_values=True, strict_parsing=bool(url.query),
                                     max_num_fields=MAX_RECEIPTS + 10)
    except ValueError as e:
      raise HttpError(400, f'bad query string: {e}') from None
    special = view in ('positions', 'health', 'views')
    index = None if special or key is not None else self.views[view].index
    allowed = {'after', 'wait_ms'} | ({index} if index else set())
    unknown = sorted(set(params) - allowed)
    if unknown or special and params:
      raise HttpError(400, f'unknown query parameter(s) {unknown or sorted(params)}',
                      allowed=sorted(allowed) if not special else [])
    if view == 'views':
      return 200, {'app': self.app.name, 'views': [
          {'name': v.name, 'index': v.index, 'route': v.route, 'event_types': sorted(v.event_types)}
          for v in self.views.values()]}, {}
    if view == 'health':
      with self.store() as store:
        store.positions()  # a round trip to the database
      return 200, {'status': 'ok', 'db': redact(self.dsn)}, {}
    if view == 'positions':
      with self.store() as store:
        return 200, {'positions': store.positions()}, {}
    if index is not None:
      values = params.get(index, [])
      if len(values) != 1 or not values[0]:
        raise HttpError(400, f'give exactly one {index}: ?{index}=...')
      key = values[0]
    receipts = parse_receipts(params.get('after', []))
    wait_ms = self.max_wait_ms
    if 'wait_ms' in params:
      w = params['wait_ms'][-1]
      if not w.isdigit():
        raise HttpError(400, f'wait_ms must be a whole number of milliseconds, got {w!r}')
      wait_ms = min(int(w), self.max_wait_ms)
    return self._read(view, key, index, receipts, wait_ms)

  def _read(self, view: str, key: str, index: Optional[str], receipts: Receipts,
            wait_ms: int) -> Answer:
    start = time.monotonic()
    deadline = start + wait_ms / 1000
    slept = False
    while True:
      with self.store() as store:
        positions = store.positions(view)
      reached = {(p['topic'], p['partition']): p['offset'] for p in positions}
      pending = [(t, p, o) for (t, p), o in sorted(receipts.items())
                 if reached.get((t, p), -1) < o]
      if not pending:
        break
      if time.monotonic() >= deadline:
        waited = int((time.monotonic() - start) * 1000)
        raise HttpError(
            504, f'the {view} view has not applied {len(pending)} receipt(s) after {waited} ms',
            view=view, waited_ms=waited,
            pending=[{'after': f'{t}:{p}:{o}', 'position': reached.get((t, p))}
                     for t, p, o in pending],
            positions=_positions(positions))
      time.sleep(min(self.poll_ms / 1000, max(0.0, deadline - time.monotonic())))
      slept = True
    waited_ms = int((time.monotonic() - start) * 1000) if slept else 0
    # Read the value after the positions: the write the receipt names is in it.
    with self.store() as store:
      if index is not None:
        body = {'view': view, 'index': index, index: key, 'values': store.by_index(view, key)}
      else:
        value = store.get(view, key)
        body = {'view': view, 'key': key, 'found': value is not None, 'value': value}
    body['positions'] = _positions(positions)
    body['waited_ms'] = waited_ms  # time spent waiting for receipts; 0 when none had to wait
    return 200, body, {}


def view_routes(app: App) -> List[Tuple[List[str], str]]:
  """Each view's own ``route`` as (path segments, view); two views may not share one."""
  routes, seen = [], {}
  for v in app.views:
    if v.route is None:
      continue
    if v.route in seen:
      raise UsageError(f'views {seen[v.route]} and {v.name} both declare route {v.route}')
    seen[v.route] = v.name
    routes.append((v.route.split('/'), v.name))
  return routes


def _positions(positions: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  return [{'topic': p['topic'], 'partition': p['partition'], 'offset': p['offset']}
          for p in positions]


def run(args: argparse.Namespace) -> int:
  """``serve views``: open the store, serve until stopped."""
  if args.max_wait_ms < 0 or args.poll_ms < 1 or args.max_connections < 1:
    raise UsageError('--max-wait-ms must be >= 0, --poll-ms and --max-connections >= 1')
  try:
    api = ViewsApi(load_app(args.app), args.db, args.max_wait_ms, args.poll_ms,
                   args.max_connections)
  except Exception as e:  # the password never appears: the message names the redacted DSN
    raise UsageError(f'cannot open the view store {redact(args.db)}: '
                     f'{type(e).__name__}: {str(e).replace(args.db, redact(args.db))}') from None
  try:
    server = make_server(api, args.host, args.port)
  except OSError as e:
    api.close()
    raise UsageError(f'cannot listen on {args.host}:{args.port}: {e.strerror}') from None
  return serve_until_stopped(server, api.close, f'view API ({redact(args.db)})')
