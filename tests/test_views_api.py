"""The view API over real HTTP on loopback, on SQLite and on a real PostgreSQL server.

The store is fed by the real retail handlers' records (tests/test_view_store.py's
``changelog``) through a second connection, as the streaming pipeline's sink would.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import threading
import time
import urllib.parse
from typing import Any, Dict, Optional, Tuple

import pytest

from sourcebeam.pipelines.serve import Running
from sourcebeam.pipelines.views_service import ViewsApi

from tests.cli import run_cli, run_py
from tests.polling import wait_until
from tests.service_fixtures import free_port
from tests.demo import DEMO_APP, REG, ROOT
from tests.test_view_store import EVENTS, TOPIC, VIEWS, changelog
from sourcebeam.transforms.view_store import ViewStore


@pytest.fixture(params=['sqlite', pytest.param('postgres', marks=pytest.mark.integration)])
def dsn(request, tmp_path) -> str:
  if request.param == 'sqlite':
    return str(tmp_path / 'views.db')
  return request.getfixturevalue('pg_dsn')


class Api:
  """The view API serving on a free loopback port, on its own event loop in this process."""

  def __init__(self, dsn: str, max_wait_ms: int = 3000, server_options: Optional[Dict] = None, **kw):
    self.api = ViewsApi(DEMO_APP, dsn, max_wait_ms=max_wait_ms, **dict({'poll_ms': 10}, **kw))
    self.server = Running(self.api, '127.0.0.1', 0, **(server_options or {}))
    self.port = self.server.port

  def get(self, path: str, method: str = 'GET', body: Optional[bytes] = None,
          headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, Any], Dict[str, str]]:
    conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=30)
    try:
      conn.request(method, path, body=body, headers=headers or {})
      resp = conn.getresponse()
      raw = resp.read()
      return resp.status, (json.loads(raw) if raw else None), dict(resp.getheaders())
    finally:
      conn.close()

  def stop(self):
    self.server.stop()


@pytest.fixture
def api(dsn):
  a = Api(dsn)
  yield a
  a.stop()


RECORDS = changelog(EVENTS)  # offsets 0..7 on partition 0; cart changes at 6 and 7


def apply(dsn: str, upto_offset: int, partition_records=RECORDS) -> None:
  with ViewStore(dsn, VIEWS) as store:
    store.apply([r for r in partition_records if r[1]['offset'] <= upto_offset])


def test_without_after_answers_at_once_with_positions(api, dsn):
  status, body, _ = api.get('/carts/u1')
  assert status == 200 and body['found'] is False and body['value'] is None
  assert body['positions'] == []
  apply(dsn, 6)
  status, body, _ = api.get('/carts/u1')
  assert status == 200 and body['found']
  assert body['value']['items'] == [{'product_id': 'p1', 'quantity': 2}]
  assert body['positions'] == [{'topic': TOPIC, 'partition': 0, 'offset': 6}]
  assert body['waited_ms'] == 0  # without after= it never waits
  status, body, _ = api.get('/products?category=shoes')
  assert [p['product_id'] for p in body['values']] == ['p0', 'p1']
  assert body['positions'] == [{'topic': TOPIC, 'partition': 0, 'offset': 2}]
  status, body, _ = api.get('/users/u1/recently-viewed')
  assert body['value']['products'] == ['p1', 'p2']
  status, body, _ = api.get('/users/u1/frequently-viewed')
  assert body['value']['products'][0] == {'product_id': 'p1', 'views': 2}
  status, body, _ = api.get('/positions')
  assert {(p['view'], p['offset']) for p in body['positions']} == {
      ('retail/cart', 6), ('retail/catalog', 2), ('retail/recently_viewed', 5),
      ('retail/frequently_viewed', 5)}
  status, body, _ = api.get('/health')
  assert (status, body) == (200, {'status': 'ok'})  # liveness only without a token
  password = urllib.parse.urlsplit(dsn).password
  if password:  # PostgreSQL: the DSN a token holder sees on /health is redacted
    token = 'views-token-' + os.urandom(8).hex()
    a = Api(dsn, tokens={token})
    try:
      status, body, _ = a.get('/health', headers={'Authorization': f'Bearer {token}'})
    finally:
      a.stop()
    assert status == 200 and password not in json.dumps(body) and '***' in body['db']


def test_after_waits_until_the_view_includes_the_write(api, dsn):
  apply(dsn, 6)
  # Already applied: answers at once.
  status, body, _ = api.get(f'/carts/u1?after={TOPIC}:0:6')
  assert status == 200 and body['positions'] == [{'topic': TOPIC, 'partition': 0, 'offset': 6}]
  assert body['waited_ms'] == 0
  # Not yet applied: the read waits; the "pipeline" applies offset 7 only after the read began.
  timer = threading.Timer(0.4, apply, (dsn, 7))
  timer.start()
  status, body, _ = api.get(f'/carts/u1?after={TOPIC}:0:7&after={TOPIC}:0:3')
  timer.join()
  assert status == 200, body
  assert body['value']['items'] == [{'product_id': 'p1', 'quantity': 2},
                                    {'product_id': 'p2', 'quantity': 1}]
  assert body['positions'] == [{'topic': TOPIC, 'partition': 0, 'offset': 7}]
  assert body['waited_ms'] > 0  # it answered only once offset 7 (applied later) was in the view


def _until(condition, what: str, timeout: float = 20.0) -> None:
  """Polls ``condition`` until it holds; fails after ``timeout`` seconds saying ``what``."""
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, f'timed out waiting for {what}'
    time.sleep(0.01)


def test_the_watcher_is_told_of_commits_instead_of_polling_positions(dsn):
  """A read waits on a write committed after it began. PostgreSQL: the watcher LISTENs, and with
  polling set to once a minute the read is still answered, woken by the store's NOTIFY. SQLite:
  the watcher checks data_version many times while the read waits, yet reads the positions only
  when a commit happened."""
  from sourcebeam.pipelines.views_service import _how_told
  from sourcebeam.transforms.view_store import is_postgres
  postgres = is_postgres(dsn)
  a = Api(dsn, max_wait_ms=30000, poll_ms=60000 if postgres else 1)
  try:
    apply(dsn, 6)
    watcher = a.api.watcher
    assert _how_told(watcher) == ('notify' if postgres else 'data_version')
    results = []
    reader = threading.Thread(target=lambda: results.append(a.get(f'/carts/u1?after={TOPIC}:0:7')))
    reader.start()
    _until(lambda: watcher.waiters, 'the read to wait')
    if not postgres:
      checks = watcher.changes.checks
      _until(lambda: watcher.changes.checks >= checks + 20, '20 data_version checks')
      assert watcher.polls <= 2  # checked 20 times, the positions read at most twice
    polls = watcher.polls
    apply(dsn, 7)
    reader.join(30)
    status, body, _ = results[0]
    assert status == 200 and len(body['value']['items']) == 2, body
    assert watcher.polls <= polls + 2  # read once (twice at most) after the commit
    if postgres:
      assert watcher.changes.notifications >= 1
  finally:
    a.stop()


def test_stage_timing_is_answered_only_when_asked(api, dsn):
  """``Sourcebeam-Timing`` on a request: the answer says when the read was received, first
  checked, noticed its receipt met and answered, in that order; without it, no such header."""
  from sourcebeam.pipelines.serve import TIMING_HEADER, parse_timing
  apply(dsn, 6)
  status, _, headers = api.get(f'/carts/u1?after={TOPIC}:0:6')
  assert status == 200 and TIMING_HEADER not in headers
  timer = threading.Timer(0.2, apply, (dsn, 7))
  timer.start()
  before = time.time()
  status, body, headers = api.get(f'/carts/u1?after={TOPIC}:0:7', headers={TIMING_HEADER: '1'})
  after = time.time()
  timer.join()
  assert status == 200 and body['waited_ms'] > 0
  marks = parse_timing(headers[TIMING_HEADER])
  assert list(marks) == ['received', 'checked', 'noticed', 'answered']
  assert before <= marks['received'] <= marks['checked'] < marks['noticed'] <= marks['answered'] <= after


def test_many_waiting_reads_share_few_connections(dsn):
  a = Api(dsn, max_connections=3)  # fewer connections than waiting readers
  try:
    apply(dsn, 6)
    results = []
    readers = [threading.Thread(target=lambda: results.append(a.get(f'/carts/u1?after={TOPIC}:0:7')))
               for _ in range(24)]
    for t in readers:
      t.start()
    wait_until(lambda: waiting_reads(a) == 24, 30, 'the 24 reads to wait for offset 7',
               interval=0.02, describe=lambda: f'{waiting_reads(a)} waiting')
    apply(dsn, 7)
    for t in readers:
      t.join(30)
    assert len(results) == 24
    assert all(s == 200 and len(b['value']['items']) == 2 for s, b, _ in results), results[:2]
  finally:
    a.stop()


def test_past_the_limit_504_says_how_far_the_view_got(dsn):
  a = Api(dsn, max_wait_ms=300)
  try:
    apply(dsn, 7)
    status, body, _ = a.get(f'/carts/u1?after={TOPIC}:0:99,{TOPIC}:1:0,{TOPIC}:0:5')
    assert status == 504 and body['waited_ms'] >= 300
    assert 'has not applied 2 receipt(s)' in body['error']
    assert body['pending'] == [{'after': f'{TOPIC}:0:99', 'position': 7},
                               {'after': f'{TOPIC}:1:0', 'position': None}]
    assert body['positions'] == [{'topic': TOPIC, 'partition': 0, 'offset': 7}]
  finally:
    a.stop()
  # A request may ask to wait less than the limit.
  a = Api(dsn, max_wait_ms=600_000)
  try:
    status, body, _ = a.get(f'/users/u1/recently-viewed?after={TOPIC}:0:99&wait_ms=0')
    assert status == 504 and body['waited_ms'] < 600_000
    assert body['pending'] == [{'after': f'{TOPIC}:0:99', 'position': 5}]
  finally:
    a.stop()


def test_bad_requests_get_clear_4xx(api):
  for after in ('nonsense', 'retail:0', 'retail:x:1', 'retail:0:-1', 're tail:0:1', ':0:1',
                'retail:0:1,', 'retail:0:99999999999999999999'):
    status, body, _ = api.get('/carts/u1?after=' + urllib.parse.quote(after))
    assert status == 400, (after, body)
    assert 'receipt' in body['error'], body
  status, body, _ = api.get('/carts/u1?after=' + ','.join(['t:0:1'] * 101))
  assert status == 400 and 'at most 100' in body['error']
  status, body, _ = api.get('/carts/u1?colour=red')
  assert status == 400 and 'unknown query parameter' in body['error']
  status, body, _ = api.get('/products')
  assert status == 400 and 'category' in body['error']
  status, body, _ = api.get('/products?category=a&category=b')
  assert status == 400
  status, body, _ = api.get('/carts/u1?after=t:0:1&wait_ms=soon')
  assert status == 400 and 'wait_ms' in body['error']
  for path in ('/carts', '/carts/', '/users/u1', '/users/u1/wishlist', '/nope', '/'):
    status, body, _ = api.get(path)
    assert status == 404, path
    assert '/carts/{key}' in body['routes']
  status, body, headers = api.get('/carts/u1', method='POST', body=b'{"x": 1}')
  assert status == 405 and headers['Allow'] == 'GET, HEAD, OPTIONS'
  status, body, _ = api.get('/carts/' + 'u' * 300)
  assert status == 400
  # Keys are data, never SQL: a hostile key is just a key that has no cart.
  status, body, _ = api.get('/carts/' + urllib.parse.quote("u1' OR '1'='1"))
  assert status == 200 and body['found'] is False


def waiting_reads(api: Api) -> int:
  """The reads waiting for a receipt (the one position watcher's), as /health counts them."""
  watcher = api.api.watcher
  return len(watcher.waiters) if watcher else 0


def _serve_cmd(*args: str):
  """`run.py serve ARGS` as a process of its own: it serves until a signal stops it."""
  return run_py('serve', *args)


@pytest.mark.integration  # `serve views` as a process: SIGTERM stops it
def test_cli_serves_views_until_sigterm(tmp_path):
  db = str(tmp_path / 'views.db')
  apply(db, 7)
  bad = run_cli('serve', 'views', '--db', str(tmp_path / 'no' / 'such' / 'dir.db'))
  assert bad.returncode == 2 and bad.stderr.startswith('error: cannot open the view store')
  assert 'Traceback' not in bad.stderr
  port = free_port()
  proc = subprocess.Popen(_serve_cmd('views', '--db', db, '--port', str(port), '--max-wait-ms', '200'),
                          cwd=ROOT, stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stderr.readline()
    assert f'listening on http://127.0.0.1:{port}' in line, line
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    conn.request('GET', f'/carts/u1?after={TOPIC}:0:7')
    resp = conn.getresponse()
    assert resp.status == 200 and len(json.loads(resp.read())['value']['items']) == 2
    conn.request('GET', f'/carts/u1?after={TOPIC}:0:8')  # the same keep-alive connection
    resp = conn.getresponse()
    assert resp.status == 504 and json.loads(resp.read())['pending'][0]['position'] == 7
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
  assert proc.returncode == 0


@pytest.mark.integration
def test_postgres_password_is_never_shown(postgres):
  bad = postgres.replace('@', 'x@', 1)  # a wrong password
  password = urllib.parse.urlsplit(bad).password
  result = run_cli('serve', 'views', '--db', bad, '--port', '0')
  assert result.returncode == 2 and 'Traceback' not in result.stderr
  assert password not in result.stderr and '***' in result.stderr


@pytest.mark.integration
def test_writer_receipts_are_honoured_by_views_built_from_the_topic(kafka, tmp_path):
  """The pieces joined on real data: receipts from the writer (real Kafka), views built by
  ViewChanges + WriteViewsToStore from the messages at those offsets, reads that wait for
  the receipts. Not the issue's acceptance test: the pipeline here is a bounded Beam run
  over what the topic holds, not the live streaming pipeline."""
  import apache_beam as beam
  from apache_beam.testing.test_pipeline import TestPipeline
  from confluent_kafka import Consumer, TopicPartition
  from tests.service_fixtures import create_topic
  from tests.test_writer import Running, event
  from sourcebeam.transforms.view_store import ViewChanges, WriteViewsToStore, kafka_message

  topic = f'views-{os.getpid()}-{int(time.time() * 1000) % 100000}'
  create_topic(kafka, topic, partitions=3)
  writer = Running(kafka, topic, str(tmp_path / 'writer.db'))
  try:
    _, product, _ = writer.post({'event_type': 'ProductCreated', 'event_time': '2026-11-26T10:00:00Z',
                                 'origin': 'catalog-admin',
                                 'data': {'product_id': 'p1', 'brand': 'B', 'name': 'Boot',
                                          'description': 'd', 'category': 'shoes'}})
    _, batch, _ = writer.post([event('u1', 'p9'), event('u2', 'p9'), event('u1', 'p1', 3)])
  finally:
    writer.stop()
  added = batch['receipts'][2]
  db = str(tmp_path / 'views.db')
  api = Api(db, max_wait_ms=20000)
  try:
    answers = {}
    reader = threading.Thread(target=lambda: answers.update(
        cart=api.get(f'/carts/u1?after={added["after"]}'),
        shoes=api.get(f'/products?category=shoes&after={product["after"]}')))
    reader.start()
    wait_until(lambda: waiting_reads(api) >= 1, 30, 'the cart read to wait', interval=0.02)
    assert reader.is_alive()  # waiting: nothing has built the views yet
    # Every message of the topic with its Kafka coordinates.
    c = Consumer({'bootstrap.servers': kafka, 'group.id': f'test-{topic}', 'enable.auto.commit': False})
    messages = []
    try:
      for p in range(3):
        high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=15)[1]
        if high == 0:
          continue
        c.assign([TopicPartition(topic, p, 0)])
        while not messages or messages[-1].partition != p or messages[-1].offset < high - 1:
          m = c.poll(5.0)
          assert m is not None and m.error() is None
          # What ReadFromKafka(with_metadata=True) gives a pipeline: a Row per message.
          messages.append(beam.Row(topic=topic, partition=m.partition(), offset=m.offset(),
                                   key=m.key(), value=m.value()))
    finally:
      c.close()
    assert len(messages) == 4
    with TestPipeline() as p:
      _ = (p | beam.Create(messages) | beam.Map(kafka_message, REG) | ViewChanges(DEMO_APP)
           | WriteViewsToStore(db, VIEWS))
    reader.join(30)
    status, cart, _ = answers['cart']
    assert status == 200, cart
    assert cart['value']['items'] == [{'product_id': 'p1', 'quantity': 3},
                                      {'product_id': 'p9', 'quantity': 1}]
    assert {'topic': topic, 'partition': added['partition'], 'offset': added['offset']} in cart['positions']
    status, shoes, _ = answers['shoes']
    assert status == 200 and [x['product_id'] for x in shoes['values']] == ['p1']
    # One past the last write of u1's partition: the view has not got there.
    status, body, _ = api.get(f'/carts/u1?after={topic}:{added["partition"]}:{added["offset"] + 1}'
                              '&wait_ms=100')
    assert status == 504 and body['pending'][0]['position'] == added['offset']
  finally:
    api.stop()


# --- numbers, tokens, the loopback policy (issue 15, items 9 and 12) -------------------------------

def test_numbers_are_read_with_ascii_digits_only_without_a_server():
  """Plain Python, no server: the parsing the API does before any store access."""
  from sourcebeam.pipelines.serve import HttpError, parse_uint
  from sourcebeam.pipelines.views_service import parse_receipts
  assert parse_receipts(['retail:0:41,retail:2:7', 'retail:0:3']) == {('retail', 0): 41, ('retail', 2): 7}
  for bad in ('t:0:²', 't:²:1', 't:0:٣', 't:0:１', 't\n:0:1', 't:0:1\n', 't:0: 1', 't:0:1_0',
              't:0:+1', 't:0:-1', 'ｔ:0:1'):
    with pytest.raises(HttpError) as e:
      parse_receipts([bad])
    assert e.value.status == 400, bad
  for bad in ('²', '٣', '１', ' 5', '5 ', '1_000', '+5', '', '1e3'):
    with pytest.raises(HttpError) as e:
      parse_uint(bad, 'wait_ms')
    assert e.value.status == 400 and 'digits 0-9' in e.value.error
  assert parse_uint('0042', 'wait_ms') == 42


def test_numbers_with_other_digits_are_400_not_500(api, dsn):
  apply(dsn, 7)
  for query in ('after=t:0:%C2%B2', 'wait_ms=%C2%B2', 'after=t:0:%D9%A3', 'after=t:0:%EF%BC%91',
                'wait_ms=%D9%A3', 'after=t%0A:0:1', 'after=t:0:1%0A', 'wait_ms=1%0A', 'after=t:%EF%BC%91:1'):
    status, body, _ = api.get(f'/carts/u1?{query}')
    assert status == 400, (query, body)
    assert 'digits 0-9' in body['error'] or 'topic name' in body['error'], body
  status, body, _ = api.get(f'/carts/u1?after={TOPIC}:0:7&wait_ms=0100')
  assert status == 200 and len(body['value']['items']) == 2


def test_tokens_guard_every_route_but_health_which_then_shows_only_liveness(dsn):
  token = 'views-token-' + os.urandom(8).hex()
  a = Api(dsn, tokens={token})
  auth = {'Authorization': f'Bearer {token}'}
  try:
    apply(dsn, 7)
    for path in ('/carts/u1', '/products?category=shoes', '/users/u1/recently-viewed', '/positions'):
      status, body, headers = a.get(path)
      assert status == 401 and headers['WWW-Authenticate'].startswith('Bearer'), path
      status, _, _ = a.get(path, headers={'Authorization': 'Bearer not-the-token-0123456789'})
      assert status == 401
      status, _, _ = a.get(path, headers=auth)
      assert status == 200, path
    # A token is checked before the query: a stranger learns nothing, not even a 400.
    assert a.get('/carts/u1?after=nonsense')[0] == 401
    status, body, _ = a.get('/health')
    assert (status, body) == (200, {'status': 'ok'})  # liveness only: no database, no views
    status, body, _ = a.get('/health', headers=auth)
    assert status == 200 and body['views'] == sorted(VIEWS)
    assert body['waiting_reads'] == 0 and 'db' in body
    assert a.get('/health', headers={'Authorization': 'Bearer not-the-token-0123456789'})[0] == 401
  finally:
    a.stop()
  # Without tokens (loopback's default), /health is liveness only too.
  a = Api(dsn)
  try:
    assert a.get('/health')[1] == {'status': 'ok'}
  finally:
    a.stop()


def test_routes_live_in_one_table_built_from_the_app():
  from sourcebeam.pipelines.serve import HttpError
  from sourcebeam.pipelines.views_service import Route, match, routes_of
  routes = routes_of(DEMO_APP)
  assert match('/carts/u%2F1', routes)[1] == {'key': 'u/1'}  # a key may hold an encoded slash
  assert match('/users/u1/recently-viewed', routes)[0].view == 'retail/recently_viewed'
  assert match('/views/retail/cart/u1', routes)[0].view == 'retail/cart'  # every view by name
  by_index = match('/views/retail/catalog', routes)[0]
  assert (by_index.view, by_index.key_query, by_index.read) == ('retail/catalog', 'category',
                                                                 'by_index')
  for path in ('/carts', '/carts/', '/carts/u1/', '//carts/u1', 'carts/u1', '/views/retail/cart',
               '/views/nope/u1'):
    with pytest.raises(HttpError) as e:
      match(path, routes)
    assert e.value.status == 404, path
  # A new route is a row: here a generic one taking the view from the path.
  extended = routes + (Route('/any/{view}/{key}'),)
  route, params = match('/any/cart/u9', extended)
  assert route.kind == 'view' and params == {'view': 'cart', 'key': 'u9'}


def test_the_views_route_lists_the_apps_views(api):
  status, body, _ = api.get('/views')
  assert status == 200 and body['app'] == 'demo'
  assert [v['name'] for v in body['views']] == [v.name for v in DEMO_APP.views]
  assert {v['name']: v['route'] for v in body['views']}['retail/cart'] == '/carts/{key}'


def test_any_view_by_name_and_by_index(api, dsn):
  apply(dsn, 7)
  status, body, _ = api.get('/views/retail/cart/u1')
  assert status == 200 and body['view'] == 'retail/cart' and body['found']
  assert body['value']['items'] == [{'product_id': 'p1', 'quantity': 2},
                                    {'product_id': 'p2', 'quantity': 1}]
  status, body, _ = api.get('/views/retail/catalog?category=shoes')
  assert status == 200 and body['index'] == 'category' and body['category'] == 'shoes'
  assert [p['product_id'] for p in body['values']] == ['p0', 'p1']


@pytest.mark.integration  # `serve views` as a process: SIGTERM stops it
def test_cli_beyond_loopback_needs_tokens_or_says_no_auth_and_warns(tmp_path):
  db = str(tmp_path / 'views.db')
  apply(db, 7)
  env = {k: v for k, v in os.environ.items() if k != 'SOURCEBEAM_VIEWS_TOKENS'}
  refused = run_cli('serve', 'views', '--db', db, '--host', '0.0.0.0', '--port', '0',
                    env={'SOURCEBEAM_VIEWS_TOKENS': None})
  assert refused.returncode == 2 and 'reachable beyond this machine' in refused.stderr
  assert 'SOURCEBEAM_VIEWS_TOKENS' in refused.stderr and 'Traceback' not in refused.stderr
  port = free_port()
  proc = subprocess.Popen(_serve_cmd('views', '--db', db, '--host', '0.0.0.0', '--port', str(port),
                                     '--no-auth'), cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
  try:
    warning = proc.stderr.readline()
    assert warning.startswith('warning: the view API listens on 0.0.0.0 without tokens'), warning
    assert 'listening on' in proc.stderr.readline()
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
  assert proc.returncode == 0


@pytest.mark.integration  # `serve views` as a process: SIGTERM stops it
def test_cli_tokens_from_the_environment(tmp_path):
  db = str(tmp_path / 'views.db')
  apply(db, 7)
  token = 'views-token-' + os.urandom(8).hex()
  port = free_port()
  proc = subprocess.Popen(_serve_cmd('views', '--db', db, '--port', str(port)), cwd=ROOT,
                          env=dict(os.environ, SOURCEBEAM_VIEWS_TOKENS=token),
                          stderr=subprocess.PIPE, text=True)
  try:
    line = proc.stderr.readline()
    assert 'listening on' in line and 'bearer tokens' in line and token not in line
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    conn.request('GET', '/carts/u1')
    resp = conn.getresponse()
    assert resp.status == 401 and 'bearer token' in json.loads(resp.read())['error']
    conn.request('GET', '/carts/u1', headers={'Authorization': f'Bearer {token}'})
    resp = conn.getresponse()
    assert resp.status == 200 and len(json.loads(resp.read())['value']['items']) == 2
  finally:
    proc.send_signal(signal.SIGTERM)
    rest = proc.communicate(timeout=30)[1]
  assert proc.returncode == 0 and token not in rest
