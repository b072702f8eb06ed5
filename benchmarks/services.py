"""`run.py bench services`: the writer and the view API under bursts, waiting reads and slow clients.

Brings up a Kafka broker (the default one through ``run.py services`` unless it
already answers), then ``run.py serve writer`` (a fresh topic) and ``run.py serve
views`` (a fresh SQLite view store) as their own processes, and measures from
client threads in this process:

* **idle**: plain view reads (4 keep-alive clients) and writer POSTs (one event
  each, 4 keep-alive clients): p50 / p99;
* **waiting**: ``--waiting`` reads (default 300) wait on the receipt of a real
  write the view has not applied; meanwhile the same plain reads and POSTs again,
  and how often the one position watcher read the store. Then the write is applied
  to the store (as the live view pipeline would: the view record and its position
  in one transaction) and the time until every waiting read answered is taken;
* **burst**: ``--burst`` clients (default 300), each on a new connection, released
  at once, on the view API (GET) and on the writer (POST): p50 / p99 / max;
* **slow clients**: ``--slow`` connections (default 100) that never finish their
  request head, and plain reads meanwhile.

No live pipeline runs here: the store is fed directly so the reads wait exactly as
long as the benchmark decides (``bench causal`` measures the pipeline). Prints a
table and, last, one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from sourcebeam.pipelines.cli import DataError, UsageError
from sourcebeam.pipelines.live_stack import RUN_PY, cart_item_added, free_port, percentile
from sourcebeam.pipelines.runners import ROOT


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--waiting', type=int, default=300, help='reads waiting on a receipt (default 300)')
  parser.add_argument('--burst', type=int, default=300, help='clients of each burst (default 300)')
  parser.add_argument('--slow', type=int, default=100,
                      help='connections that never finish their request head (default 100)')
  parser.add_argument('--reads', type=int, default=400, help='plain reads per phase (default 400)')
  parser.add_argument('--posts', type=int, default=200, help='writer POSTs per phase (default 200)')
  parser.add_argument('--bootstrap', help='a running Kafka broker, HOST:PORT (default: the local one '
                                          'on 9092, started through run.py services if it is not up)')
  parser.add_argument('--workdir', help='where the services keep their files and logs (default: a temp dir)')


class _Process:
  def __init__(self, name: str, args: List[str], env: Dict[str, str], workdir: str):
    self.port = free_port()
    self.log_path = os.path.join(workdir, f'{name}.log')
    log = open(self.log_path, 'ab')
    self.proc = subprocess.Popen([sys.executable, RUN_PY, 'serve', name, '--port', str(self.port)] + args,
                                 cwd=ROOT, env=dict(os.environ, **env), stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
      if self.proc.poll() is not None:
        raise DataError(f'serve {name} exited: {self._tail()}')
      try:
        with socket.create_connection(('127.0.0.1', self.port), timeout=1):
          return
      except OSError:
        time.sleep(0.2)
    raise DataError(f'serve {name} did not listen within 120 s: {self._tail()}')

  def _tail(self) -> str:
    with open(self.log_path, 'rb') as f:
      return f.read().decode('utf-8', 'replace')[-1500:]

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)
      try:
        self.proc.wait(60)
      except subprocess.TimeoutExpired:
        self.proc.kill()


def _request(conn: http.client.HTTPConnection, method: str, path: str, headers: Dict[str, str],
             body: Optional[bytes] = None) -> Tuple[int, Any]:
  conn.request(method, path, body=body, headers=headers)
  resp = conn.getresponse()
  raw = resp.read()
  return resp.status, json.loads(raw) if raw else None


def _clients(port: int, n_clients: int, total: int, call: Callable[[http.client.HTTPConnection, int], int]
             ) -> List[float]:
  """``total`` calls spread over ``n_clients`` keep-alive connections; the seconds of each."""
  seconds: List[float] = []
  errors: List[str] = []
  lock = threading.Lock()

  def client(c: int) -> None:
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    try:
      for i in range(c, total, n_clients):
        t = time.monotonic()
        status = call(conn, i)
        took = time.monotonic() - t
        with lock:
          seconds.append(took)
          if status >= 300:
            errors.append(str(status))
    finally:
      conn.close()

  threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  if errors:
    raise DataError(f'{len(errors)} of {total} calls failed, e.g. status {errors[0]}')
  return seconds


def _burst(port: int, n: int, method: str, path: str, headers: Dict[str, str],
           body_of: Callable[[int], Optional[bytes]] = lambda i: None, timeout: float = 60.0
           ) -> Tuple[List[float], int, List[float]]:
  """``n`` clients on new connections released at once: (seconds, answered OK, finish times)."""
  barrier = threading.Barrier(n)
  seconds: List[float] = []
  finished: List[float] = []
  ok = [0]
  lock = threading.Lock()

  def client(i: int) -> None:
    body = body_of(i)
    barrier.wait()
    t = time.monotonic()
    status = 0
    try:
      conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
      status, _ = _request(conn, method, path, headers, body)
      conn.close()
    except (OSError, http.client.HTTPException):
      pass
    with lock:
      seconds.append(time.monotonic() - t)
      finished.append(time.monotonic())
      ok[0] += status < 300
  threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout + 30)
  return seconds, ok[0], finished


def _ms(seconds: List[float]) -> Dict[str, Optional[float]]:
  ms = [s * 1000 for s in seconds]
  return {'p50': percentile(ms, 0.5), 'p99': percentile(ms, 0.99),
          'max': round(max(ms), 2) if ms else None}


def measure(bootstrap: str, workdir: str, waiting: int, burst: int, slow: int, reads: int,
            posts: int) -> Dict[str, Any]:
  from sourcebeam.transforms.view_store import ViewStore
  writer_token, views_token = uuid.uuid4().hex, uuid.uuid4().hex
  writer_auth = {'Authorization': f'Bearer {writer_token}', 'Content-Type': 'application/json'}
  views_auth = {'Authorization': f'Bearer {views_token}'}
  db = os.path.join(workdir, 'views.db')
  topic = f'bench-services-{uuid.uuid4().hex[:8]}'
  writer = _Process('writer', ['--bootstrap', bootstrap, '--topic', topic, '--state',
                               os.path.join(workdir, 'writer.db')],
                    {'SOURCEBEAM_WRITER_TOKENS': writer_token}, workdir)
  views = None
  try:
    with ViewStore(db) as store:  # an empty store with its tables, as a pipeline would leave it
      store.positions()
    views = _Process('views', ['--db', db, '--max-wait-ms', '120000'],
                     {'SOURCEBEAM_VIEWS_TOKENS': views_token}, workdir)
    post_body = lambda i: json.dumps(cart_item_added(f'bench-u{i % 50}', f'p{i}')).encode()

    def read(conn, i):
      return _request(conn, 'GET', f'/carts/bench-u{i % 50}', views_auth)[0]

    def post(conn, i):
      return _request(conn, 'POST', '/events', writer_auth, post_body(i))[0]

    def health() -> Dict[str, Any]:
      conn = http.client.HTTPConnection('127.0.0.1', views.port, timeout=30)
      try:
        return _request(conn, 'GET', '/health', views_auth)[1]
      finally:
        conn.close()

    print('idle: plain reads and POSTs ...', file=sys.stderr)
    _clients(views.port, 4, 50, read)  # warm-up: connections, the store's pages
    _clients(writer.port, 4, 20, post)
    idle_reads = _clients(views.port, 4, reads, read)
    idle_posts = _clients(writer.port, 4, posts, post)

    print(f'{waiting} reads waiting on a receipt ...', file=sys.stderr)
    conn = http.client.HTTPConnection('127.0.0.1', writer.port, timeout=60)
    status, receipt = _request(conn, 'POST', '/events', writer_auth,
                               json.dumps(cart_item_added('bench-waited', 'p-waited')).encode())
    conn.close()
    if status != 201:
      raise DataError(f'the writer answered {status}: {receipt}')
    waiters: List[Any] = []
    waiter = threading.Thread(target=lambda: waiters.append(_burst(
        views.port, waiting, 'GET', f'/carts/bench-waited?after={receipt["after"]}', views_auth,
        timeout=300)))
    waiter.start()
    deadline = time.monotonic() + 120
    while health()['waiting_reads'] < waiting:
      if time.monotonic() > deadline:
        raise DataError(f'only {health()["waiting_reads"]} of {waiting} reads were waiting after 120 s')
      time.sleep(0.05)
    polls0, t0 = health()['position_polls'], time.monotonic()
    waiting_reads = _clients(views.port, 4, reads, read)
    waiting_posts = _clients(writer.port, 4, posts, post)
    during = health()
    polls, over = during['position_polls'] - polls0, time.monotonic() - t0
    if during['waiting_reads'] != waiting:
      raise DataError(f'{waiting - during["waiting_reads"]} waiting reads ended early')
    with ViewStore(db) as store:  # the write reaches the view, with its position
      applied = time.monotonic()
      store.apply([({'view': 'retail/cart', 'key': 'bench-waited',
                     'value': {'view': 'cart', 'key': 'bench-waited',
                               'items': [{'product_id': 'p-waited', 'quantity': 1}]},
                     'as_of_sequence': receipt['sequence'], 'event_time': int(time.time() * 1000)},
                    {'topic': receipt['topic'], 'partition': receipt['partition'],
                     'offset': receipt['offset']})])
    waiter.join(300)
    _, answered, finished = waiters[0]
    wake_ms = round((max(finished) - applied) * 1000, 1)

    print(f'bursts of {burst} clients ...', file=sys.stderr)
    views_burst, views_ok, _ = _burst(views.port, burst, 'GET', '/carts/bench-u1', views_auth)
    writer_burst, writer_ok, _ = _burst(writer.port, burst, 'POST', '/events', writer_auth, post_body)

    print(f'{slow} slow clients ...', file=sys.stderr)
    sockets = []
    for _ in range(slow):
      s = socket.create_connection(('127.0.0.1', views.port), timeout=10)
      s.sendall(b'GET /carts/x HTTP/1.1\r\nHost: x\r\nX-Slow: ')
      sockets.append(s)
    slow_reads = _clients(views.port, 4, reads, read)
    for s in sockets:
      s.close()
  finally:
    if views is not None:
      views.stop()
    writer.stop()
  return {
      'waiting_reads': waiting, 'waiting_reads_answered': answered,
      'all_waiting_answered_ms_after_the_write': wake_ms,
      'position_polls_per_s_while_waiting': round(polls / over, 1),
      'plain_read_ms_idle': _ms(idle_reads), 'plain_read_ms_while_waiting': _ms(waiting_reads),
      'post_ms_idle': _ms(idle_posts), 'post_ms_while_waiting': _ms(waiting_posts),
      'burst_clients': burst, 'views_burst_ms': _ms(views_burst), 'views_burst_ok': views_ok,
      'writer_burst_ms': _ms(writer_burst), 'writer_burst_ok': writer_ok,
      'slow_clients': slow, 'plain_read_ms_with_slow_clients': _ms(slow_reads),
  }


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  if beam_args:
    raise UsageError(f'unknown arguments for bench services: {" ".join(beam_args)}')
  if min(args.waiting, args.burst, args.reads, args.posts) < 1 or args.slow < 0:
    raise UsageError('--waiting, --burst, --reads and --posts must be positive, --slow not negative')
  from sourcebeam.benchmarks.causal import _kafka
  from sourcebeam.pipelines import services
  bootstrap, started_ports = (args.bootstrap, None) if args.bootstrap else _kafka()
  try:
    with tempfile.TemporaryDirectory(prefix='bench-services-') as tmp:
      result = measure(bootstrap, args.workdir or tmp, args.waiting, args.burst, args.slow,
                       args.reads, args.posts)
  finally:
    if started_ports is not None:
      services.stop('kafka', started_ports)
  print(f'{"":44} {"p50 ms":>9} {"p99 ms":>9} {"max ms":>9}')
  rows = [('plain reads, idle', 'plain_read_ms_idle'),
          (f'plain reads, {args.waiting} reads waiting', 'plain_read_ms_while_waiting'),
          ('writer POSTs, idle', 'post_ms_idle'),
          (f'writer POSTs, {args.waiting} reads waiting', 'post_ms_while_waiting'),
          (f'view API burst of {args.burst}', 'views_burst_ms'),
          (f'writer burst of {args.burst}', 'writer_burst_ms'),
          (f'plain reads, {args.slow} slow clients', 'plain_read_ms_with_slow_clients')]
  for label, k in rows:
    r = result[k]
    print(f'{label:44} {r["p50"]!s:>9} {r["p99"]!s:>9} {r["max"]!s:>9}')
  print(f'{result["waiting_reads_answered"]}/{args.waiting} waiting reads answered '
        f'{result["all_waiting_answered_ms_after_the_write"]} ms after the write reached the view; '
        f'{result["position_polls_per_s_while_waiting"]} position polls/s while they waited')
  print(json.dumps(result))
  return 0
