"""`run.py serve writer|views`: the event writer and the view API over HTTP.

* ``serve writer --bootstrap HOST:PORT --topic T [--port P] [--tokens-file F]``:
  ``POST /events`` appends events to Kafka and answers with write receipts
  (:mod:`pipelines.writer_service`).
* ``serve views --db DSN [--port P] [--max-wait-ms N]``: the retail views, each
  read able to wait for a receipt (``after=topic:partition:offset``)
  (:mod:`pipelines.views_service`).

Both are small ``http.server`` services (the standard library, threaded): each
request is plain Python logic returning ``(status, JSON payload)``, so the logic
is testable without sockets and the HTTP layer stays thin. What they share lives
here: JSON answers, JSON errors (never a traceback), body limits, and a server
that stops cleanly on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Optional, Tuple

from sourcebeam.pipelines.apps import add_app_argument
from sourcebeam.pipelines.cli import UsageError

log = logging.getLogger('sourcebeam.serve')

DRAIN_LIMIT = 16 << 20  # bytes of an oversized body read and dropped before a 413

Answer = Tuple[int, Dict[str, Any], Dict[str, str]]  # status, JSON body, extra headers


class HttpError(Exception):
  """An answer other than success: status, a one-line error and optional details."""

  def __init__(self, status: int, error: str, headers: Optional[Dict[str, str]] = None,
               **detail: Any):
    super().__init__(error)
    self.status, self.error, self.headers, self.detail = status, error, headers or {}, detail

  def answer(self) -> Answer:
    return self.status, {'error': self.error, **self.detail}, self.headers


class JsonHandler(BaseHTTPRequestHandler):
  """Routes each request to ``app.handle(method, path, headers, body) -> Answer``.

  ``app.check(method, path, headers)`` runs first and may refuse the request
  (unknown route, wrong method, missing token) before its body is read.
  The body is read here, within ``app.max_body_bytes``: a larger body is refused
  with 413 before it is read. Any unexpected error is a 500 with one line, logged
  with its traceback on the server side only.
  """

  server_version = 'Sourcebeam'
  protocol_version = 'HTTP/1.1'  # keep-alive: a client doing many reads reuses its connection
  # Headers and body go out in two writes; with Nagle's algorithm and the client's delayed ACK
  # every keep-alive answer would wait ~40 ms.
  disable_nagle_algorithm = True
  app: Any = None  # set by make_server

  def _dispatch(self, method: str) -> None:
    try:
      body = b''
      try:
        # Route and authorise before reading a body: a stranger cannot make us read one.
        self.app.check(method, self.path, self.headers)
      except HttpError:
        self._drop_body()
        raise
      if method in ('POST', 'PUT', 'PATCH'):
        body = self._read_body()
      status, payload, headers = self.app.handle(method, self.path, self.headers, body)
    except HttpError as e:
      status, payload, headers = e.answer()
    except Exception:  # a bug, not bad input: say so briefly, keep the details in the log
      log.exception('unexpected error on %s %s', method, self.path.split('?', 1)[0])
      status, payload, headers = 500, {'error': 'internal error; see the server log'}, {}
    self._send(status, payload, headers)

  def _drop_body(self) -> None:
    """Reads and drops a refused request's body (up to DRAIN_LIMIT), so the client can read
    our answer: closing on unread data would reset the connection under it."""
    try:
      n = int(self.headers.get('Content-Length') or 0)
    except ValueError:
      n = -1
    if n < 0 or n > DRAIN_LIMIT or self.headers.get('Transfer-Encoding'):
      self.close_connection = True
      return
    while n > 0:
      chunk = self.rfile.read(min(n, 65536))
      if not chunk:
        break
      n -= len(chunk)

  def _read_body(self) -> bytes:
    length = self.headers.get('Content-Length')
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      self.close_connection = True
      raise HttpError(411, 'chunked bodies are not accepted; send Content-Length')
    if length is None:
      self.close_connection = True
      raise HttpError(411, 'Content-Length is required')
    try:
      n = int(length)
      if n < 0:
        raise ValueError
    except ValueError:
      self.close_connection = True
      raise HttpError(400, f'bad Content-Length {length!r}') from None
    limit = self.app.max_body_bytes
    if n > limit:
      self._drop_body()
      raise HttpError(413, f'body of {length} bytes is over the limit of {limit} bytes',
                      limit_bytes=limit)
    return self.rfile.read(n)

  def _send(self, status: int, payload: Dict[str, Any], headers: Dict[str, str]) -> None:
    data = json.dumps(payload, separators=(',', ':'), ensure_ascii=False).encode('utf-8')
    try:
      self.send_response(status)
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(data)))
      for k, v in headers.items():
        self.send_header(k, v)
      if self.close_connection:
        self.send_header('Connection', 'close')
      self.end_headers()
      self.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
      pass  # the client went away; nothing to answer

  def do_GET(self):
    self._dispatch('GET')

  def do_POST(self):
    self._dispatch('POST')

  def do_PUT(self):
    self._dispatch('PUT')

  def do_DELETE(self):
    self._dispatch('DELETE')

  def do_PATCH(self):
    self._dispatch('PATCH')

  def log_message(self, format: str, *args: Any) -> None:
    # The request line only (never headers: they carry the bearer token).
    log.debug('%s %s', self.address_string(), format % args)


def method_not_allowed(method: str, allowed: str) -> HttpError:
  return HttpError(405, f'{method} is not allowed here; use {allowed}', {'Allow': allowed},
                   allowed=allowed.split(', '))


def not_found(path: str, routes: Any) -> HttpError:
  return HttpError(404, f'no such route {path!r}', routes=list(routes))


def make_server(app: Any, host: str = '127.0.0.1', port: int = 0) -> ThreadingHTTPServer:
  """A threaded HTTP server for ``app`` (port 0: a free port; see ``server.server_address``)."""
  handler = type('Handler', (JsonHandler,), {'app': app})
  server = ThreadingHTTPServer((host, port), handler)
  server.daemon_threads = True
  return server


def serve_until_stopped(server: ThreadingHTTPServer, on_stop: Callable[[], None],
                        what: str) -> int:
  """Serves until SIGTERM or Ctrl-C, then closes the server and ``on_stop``."""
  host, port = server.server_address[:2]
  print(f'{what} listening on http://{host}:{port}', file=sys.stderr, flush=True)

  def stop(signum, frame):
    threading.Thread(target=server.shutdown, daemon=True).start()

  previous = signal.signal(signal.SIGTERM, stop)
  try:
    server.serve_forever(poll_interval=0.2)
  except KeyboardInterrupt:
    pass
  finally:
    signal.signal(signal.SIGTERM, previous)
    server.server_close()
    on_stop()
  print(f'{what} stopped', file=sys.stderr, flush=True)
  return 0


# --- the command line ---------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest='service', metavar='SERVICE')
  w = sub.add_parser('writer', help='the event writer: POST /events -> Kafka, with write receipts')
  w.add_argument('--bootstrap', required=True, help='Kafka bootstrap servers, HOST:PORT')
  w.add_argument('--topic', required=True, help='the topic events are appended to')
  w.add_argument('--partitions', type=int, default=3,
                 help='partitions of the topic if the writer has to create it (default 3)')
  w.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1)')
  w.add_argument('--port', type=int, default=8700, help='port to listen on (default 8700; 0: any)')
  w.add_argument('--tokens-file', help='bearer tokens, one a line (else $SOURCEBEAM_WRITER_TOKENS, '
                                       'comma-separated)')
  w.add_argument('--state', default='.cache/writer/writer.db',
                 help='SQLite file of receipts and per-key sequences (default .cache/writer/writer.db)')
  w.add_argument('--max-body-bytes', type=int, default=1 << 20,
                 help='largest request body accepted (default 1 MiB)')
  w.add_argument('--max-batch', type=int, default=1000, help='most events in one POST (default 1000)')
  w.add_argument('--ack-timeout', type=float, default=30.0,
                 help='seconds to wait for the broker to acknowledge a write (default 30)')
  add_app_argument(w)
  v = sub.add_parser('views', help="the view API: an application's views, each read able to wait "
                                   'for write receipts')
  v.add_argument('--db', required=True,
                 help='the view store: a SQLite file path, or postgresql://user:password@host:port/db')
  v.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1)')
  v.add_argument('--port', type=int, default=8701, help='port to listen on (default 8701; 0: any)')
  v.add_argument('--max-wait-ms', type=int, default=5000,
                 help='longest a read waits for its after= receipts before a 504 (default 5000)')
  v.add_argument('--poll-ms', type=int, default=20,
                 help='how often a waiting read checks the view positions (default 20)')
  v.add_argument('--max-connections', type=int, default=16,
                 help='most database connections in use at once (default 16)')
  add_app_argument(v)


def main(args: argparse.Namespace, beam_args) -> int:
  if beam_args:
    raise UsageError(f'unknown arguments for serve: {" ".join(beam_args)}')
  if args.service == 'writer':
    from sourcebeam.pipelines import writer_service
    return writer_service.run(args)
  if args.service == 'views':
    from sourcebeam.pipelines import views_service
    return views_service.run(args)
  raise UsageError('choose a service: serve writer ... or serve views ... (see serve --help)')
