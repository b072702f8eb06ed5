"""`run.py serve writer|views`: the event writer and the view API over HTTP.

* ``serve writer --bootstrap HOST:PORT --topic T [--port P] [--tokens-file F]``:
  ``POST /events`` appends events to Kafka and answers with write receipts
  (:mod:`pipelines.writer_service`).
* ``serve views --db DSN [--port P] [--max-wait-ms N]``: the retail views, each
  read able to wait for a receipt (``after=topic:partition:offset``)
  (:mod:`pipelines.views_service`).

Both run on aiohttp's low-level HTTP/1.1 server (one asyncio event loop per
process): a read waiting for a receipt is a suspended coroutine, not a thread, so
hundreds of them cost no more than their sockets. Blocking work (the database,
validation of a large batch) runs in each service's bounded thread pool, never on
the event loop.

Each service is an *app* of plain Python: it names the methods of a path
(``methods``), refuses a request before its body is read (``check``: route, token)
and answers it (``handle`` -> ``(status, JSON payload, headers)``). What the two
share lives here, in one place:

* every answer is JSON, errors included: those of the app (:class:`HttpError`)
  and those of the HTTP layer itself (malformed requests 400, unknown methods 501,
  request target too long 414, headers too large 431, HTTP versions other than
  1.0/1.1 505), never HTML and never a traceback;
* a real listen backlog (``--backlog``, default 1024; the standard library's is 5);
* per-connection timeouts: a connection that has not sent a whole request head
  within ``--idle-timeout`` seconds (also between keep-alive requests) is closed,
  and a body that has not arrived within ``--body-timeout`` seconds is answered
  408 and the connection closed;
* a body is read only after the request passed ``check`` (a request without a
  valid token is answered 401 before one byte of its body is read), only with a
  Content-Length within the app's limit (413 otherwise, 411 without one); a GET,
  HEAD or OPTIONS with a body is refused (400) and its connection closed, so one
  connection never carries two answers to one request;
* HEAD is answered like GET without the body; OPTIONS with the methods allowed
  (``Allow``) and the CORS policy (:class:`CorsPolicy`);
* numbers in requests are read with ASCII digits only (:func:`parse_uint`);
* bearer tokens (:func:`load_tokens`, :func:`check_token`), compared in constant
  time, never logged.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import threading
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from sourcebeam.pipelines.apps import add_app_argument
from sourcebeam.pipelines.cli import DataError, UsageError

log = logging.getLogger('sourcebeam.serve')

Answer = Tuple[int, Dict[str, Any], Dict[str, str]]  # status, JSON body, extra headers

# Limits of the HTTP layer. The request target and a header field get different limits so a
# too-long line can be told apart (414 for the target, 431 for a header).
MAX_TARGET_BYTES = 8192
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 100
DEFAULT_BACKLOG = 1024
DEFAULT_IDLE_TIMEOUT = 15.0
DEFAULT_BODY_TIMEOUT = 10.0
# After an answer that leaves a body unread (401, 413, a refused GET body...), at most this
# long is spent draining what the client still sends, so it can read the answer before the
# connection closes (closing on unread data would reset it); then the connection is closed.
LINGER_SECONDS = 2.0
SERVER_NAME = 'Sourcebeam'
KNOWN_METHODS = ('GET', 'HEAD', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS')
_TOKEN_CHARS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token: a method's syntax
_ASCII_UINT = re.compile(r'[0-9]+')


class HttpError(Exception):
  """An answer other than success: status, a one-line error and optional details."""

  def __init__(self, status: int, error: str, headers: Optional[Dict[str, str]] = None,
               **detail: Any):
    super().__init__(error)
    self.status, self.error, self.headers, self.detail = status, error, headers or {}, detail

  def answer(self) -> Answer:
    return self.status, {'error': self.error, **self.detail}, self.headers


def method_not_allowed(method: str, allowed: Sequence[str]) -> HttpError:
  allow = ', '.join(allowed)
  return HttpError(405, f'{method} is not allowed here; use {allow}', {'Allow': allow},
                   allowed=list(allowed))


def not_found(path: str, routes: Iterable[str]) -> HttpError:
  return HttpError(404, f'no such route {path!r}', routes=list(routes))


def parse_uint(text: str, what: str, max_digits: int = 18) -> int:
  """A whole number >= 0 written with ASCII digits only (``int()`` and ``str.isdigit`` also
  take ``²``, ``٣`` or ``１``, and ``int()`` takes ``_`` and spaces); HttpError 400 otherwise."""
  if not isinstance(text, str) or not _ASCII_UINT.fullmatch(text) or len(text) > max_digits:
    raise HttpError(400, f'{what} must be a whole number >= 0 written with the digits 0-9 '
                         f'(at most {max_digits}), got {text!r}')
  return int(text)


# --- tokens ------------------------------------------------------------------------------------

def load_tokens(env_var: str, tokens_file: Optional[str] = None,
                environ: Mapping[str, str] = os.environ) -> Set[str]:
  """Bearer tokens from a file (one a line, ``#`` comments) or ``$env_var`` (comma-separated);
  empty if neither has any. UsageError for an unreadable file or a token under 16 characters."""
  if tokens_file:
    try:
      with open(tokens_file, encoding='utf-8') as f:
        lines = f.read().splitlines()
    except OSError as e:
      raise UsageError(f'cannot read the tokens file {tokens_file}: {e.strerror}') from None
    tokens = {line.strip() for line in lines if line.strip() and not line.lstrip().startswith('#')}
  else:
    tokens = {t.strip() for t in environ.get(env_var, '').split(',') if t.strip()}
  short = [t for t in tokens if len(t) < 16]
  if short:
    raise UsageError(f'{len(short)} configured token(s) shorter than 16 characters; use longer ones')
  return tokens


def check_token(headers: Mapping[str, str], tokens: Iterable[str]) -> None:
  """401 unless the Authorization header carries one of ``tokens`` (compared in constant time)."""
  challenge = {'WWW-Authenticate': 'Bearer realm="sourcebeam"'}
  auth = headers.get('Authorization') or ''
  scheme, _, given = auth.partition(' ')
  if scheme.lower() != 'bearer' or not given.strip():
    raise HttpError(401, 'a bearer token is required (Authorization: Bearer <token>)', challenge)
  given_b = given.strip().encode('utf-8')
  ok = False
  for t in tokens:
    ok |= hmac.compare_digest(given_b, t.encode('utf-8'))
  if not ok:
    raise HttpError(401, 'the bearer token is not valid', challenge)


def token_given(headers: Mapping[str, str], tokens: Iterable[str]) -> bool:
  """For routes open to all (``/health``): False without an Authorization header, True with a
  valid token, 401 with an invalid one."""
  if not headers.get('Authorization'):
    return False
  check_token(headers, tokens)
  return True


# --- stage timing (``run.py bench causal --breakdown``) -----------------------------------------

# A request that carries this header (any value) is answered with the same header listing when
# the service reached each stage of the request, as ``name=<Unix time in seconds>`` pairs:
# ``Sourcebeam-Timing: received=1733071234.120311, acked=1733071234.131002, answered=...``.
# Wall-clock times, so a client on the same machine can line them up with its own and with the
# pipeline's (the view store's ``stage_times``). Nothing else changes; without the header
# nothing is measured.
TIMING_HEADER = 'Sourcebeam-Timing'


def wants_timing(headers: Mapping[str, str]) -> bool:
  return TIMING_HEADER in headers


def timing_header(marks: Mapping[str, Optional[float]]) -> Dict[str, str]:
  """The answer header for ``marks`` (stage -> Unix time; None entries are left out)."""
  return {TIMING_HEADER: ', '.join(f'{k}={v:.6f}' for k, v in marks.items() if v is not None)}


def parse_timing(value: Optional[str]) -> Dict[str, float]:
  """A ``Sourcebeam-Timing`` answer header -> {stage: Unix time}; {} without one."""
  marks = {}
  for part in (value or '').split(','):
    name, sep, t = part.strip().partition('=')
    if sep:
      try:
        marks[name] = float(t)
      except ValueError:
        pass
  return marks


def is_loopback(host: str) -> bool:
  """Whether listening on ``host`` reaches this machine only (127.0.0.0/8, ::1, localhost)."""
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host.strip('[]')).is_loopback
  except ValueError:
    return False  # a host name: it may resolve to anything


class CorsPolicy:
  """Which web origins a browser may call the service from.

  Default: none. No CORS header is ever sent, so a browser lets only pages served
  from the service's own origin read its answers. ``origins`` (exact
  ``scheme://host[:port]`` strings, or ``*`` for any) are answered with
  ``Access-Control-Allow-Origin`` naming the caller's origin; preflights
  (``OPTIONS``) also get the route's methods, the ``Authorization`` and
  ``Content-Type`` request headers, and a 10-minute cache. Credentials (cookies)
  are never allowed: tokens travel in the Authorization header.
  """

  def __init__(self, origins: Sequence[str] = ()):
    self.origins = tuple(o.rstrip('/') for o in origins)
    for o in self.origins:
      if o != '*' and not re.fullmatch(r'https?://[^/\s]+', o):
        raise UsageError(f'--cors-origin {o!r} is not an origin (scheme://host[:port]) or *')

  def describe(self) -> str:
    return ('no cross-origin browser access' if not self.origins else
            'cross-origin reads from ' + ', '.join(self.origins))

  def allows(self, origin: Optional[str]) -> bool:
    return bool(origin) and ('*' in self.origins or origin in self.origins)

  def headers(self, origin: Optional[str], preflight_methods: Optional[Sequence[str]] = None
              ) -> Dict[str, str]:
    if not self.allows(origin):
      return {}
    out = {'Access-Control-Allow-Origin': origin, 'Vary': 'Origin'}
    if preflight_methods is not None:
      out.update({'Access-Control-Allow-Methods': ', '.join(preflight_methods),
                  'Access-Control-Allow-Headers': 'Authorization, Content-Type',
                  'Access-Control-Max-Age': '600'})
    return out


# --- the HTTP layer (aiohttp's low-level server) ------------------------------------------------

def _protocol_error(status: int, exc: Optional[BaseException], message: Optional[str]
                    ) -> Tuple[int, str]:
  """What a request the HTTP parser refused gets: (status, one-line error)."""
  from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, LineTooLong
  text = str(getattr(exc, 'message', '') or message or exc or '').strip()
  first = text.splitlines()[0][:200] if text else 'malformed request'
  if isinstance(exc, LineTooLong):
    if len(exc.args) > 1 and exc.args[1] == MAX_TARGET_BYTES:
      return 414, f'the request target is longer than {MAX_TARGET_BYTES} bytes'
    return 431, f'a request header is longer than {MAX_FIELD_BYTES} bytes'
  if 'too many headers' in text.lower():
    return 431, f'more than {MAX_HEADERS} request headers'
  if isinstance(exc, BadHttpMethod):
    line = re.search(r"b'([^']*)'", text)
    parts = line.group(1).split(' ') if line else []
    method = parts[0] if parts else ''
    # A well-formed request line with a method we do not know: 501. Anything else: 400.
    if len(parts) == 3 and parts[2].startswith('HTTP/') and _TOKEN_CHARS.fullmatch(method):
      return 501, f'method {method} is not implemented; use one of {", ".join(KNOWN_METHODS)}'
    return 400, 'not an HTTP/1.1 request'
  if isinstance(exc, BadStatusLine) and 'version' in text.lower():
    return 505, 'HTTP version not supported; use HTTP/1.1'
  if status >= 500:
    return 500, 'internal error; see the server log'
  return 400, f'malformed request: {first}'


def _json_response(status: int, payload: Optional[Dict[str, Any]], headers: Mapping[str, str],
                   close: bool = False):
  from aiohttp import web
  resp = web.Response(status=status)
  if payload is not None and status not in (204, 304):
    resp.body = json.dumps(payload, separators=(',', ':'), ensure_ascii=False).encode('utf-8')
    resp.headers['Content-Type'] = 'application/json'
  resp.headers['Server'] = SERVER_NAME
  resp.headers['Cache-Control'] = 'no-store'
  for k, v in headers.items():
    resp.headers[k] = v
  if close:
    resp.force_close()
  return resp


def _server_class():
  """aiohttp's low-level server whose protocol answers its own errors as JSON."""
  from aiohttp import web_server
  from aiohttp.web_protocol import RequestHandler

  class JsonErrorsProtocol(RequestHandler):
    def handle_error(self, request, status=500, exc=None, message=None):
      status, error = _protocol_error(status, exc, message)
      if status == 500:
        log.error('error handling a request', exc_info=exc)
      else:
        log.debug('refused a malformed request: %s', error)
      if request.writer.output_size > 0:
        raise ConnectionError('an answer was already being sent')
      return _json_response(status, {'error': error}, {}, close=True)

  class JsonErrorsServer(web_server.Server):
    def __call__(self):
      return JsonErrorsProtocol(self, loop=self._loop, **self._kwargs)

  return JsonErrorsServer


class Service:
  """One app served on one event loop. ``await start()``, ``port``, ``await stop()``.

  The app provides ``methods(path) -> [methods]`` (HttpError 404 for no such
  route), ``check(method, target, headers)`` (before any body is read),
  ``async handle(method, target, headers, body) -> Answer`` and
  ``max_body_bytes``; optionally ``async start()`` / ``async stop()`` (on the loop).
  HEAD reaches the app as GET.
  """

  def __init__(self, app: Any, host: str = '127.0.0.1', port: int = 0, *,
               backlog: int = DEFAULT_BACKLOG, idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
               body_timeout: float = DEFAULT_BODY_TIMEOUT, cors: Optional[CorsPolicy] = None,
               linger: float = LINGER_SECONDS):
    self.app, self.host, self.requested_port = app, host, port
    self.backlog, self.idle_timeout, self.body_timeout = backlog, idle_timeout, body_timeout
    self.cors = cors or CorsPolicy()
    self.linger = linger
    self.port: Optional[int] = None
    self._server = self._listener = None

  async def start(self) -> None:
    if hasattr(self.app, 'start'):
      await self.app.start()
    self._server = _server_class()(
        self._dispatch, handler_cancellation=True, keepalive_timeout=self.idle_timeout,
        lingering_time=self.linger, max_line_size=MAX_TARGET_BYTES,
        max_field_size=MAX_FIELD_BYTES, max_headers=MAX_HEADERS, access_log=None)
    loop = asyncio.get_running_loop()
    try:
      self._listener = await loop.create_server(self._server, self.host, self.requested_port,
                                                backlog=self.backlog, reuse_address=True)
    except BaseException:
      if hasattr(self.app, 'stop'):
        await self.app.stop()
      raise
    self.port = self._listener.sockets[0].getsockname()[1]

  async def stop(self, timeout: float = 5.0) -> None:
    if self._listener is not None:
      self._listener.close()
      self._server.pre_shutdown()
      await self._server.shutdown(timeout)
      await self._listener.wait_closed()
      self._listener = None
    if hasattr(self.app, 'stop'):
      await self.app.stop()

  async def _dispatch(self, request) -> Any:
    headers = request.headers
    origin = headers.get('Origin')
    method = request.method
    close = False
    body_read = False
    has_body = bool(request.content_length) or 'Transfer-Encoding' in headers
    try:
      if request.version not in ((1, 0), (1, 1)):
        raise HttpError(505, 'HTTP version not supported; use HTTP/1.1')
      target = request.raw_path
      path = target.split('?', 1)[0]
      allowed = list(self.app.methods(path))  # 404 for no such route
      allowed = allowed + (['HEAD'] if 'GET' in allowed else []) + ['OPTIONS']
      if has_body and method in ('GET', 'HEAD', 'OPTIONS'):
        close = True
        raise HttpError(400, f'a {method} request carries no body; this one declares one')
      if method == 'OPTIONS':
        return _json_response(204, None, dict(self.cors.headers(origin, allowed),
                                              Allow=', '.join(allowed)))
      if method not in allowed:
        raise method_not_allowed(method, allowed)
      as_method = 'GET' if method == 'HEAD' else method
      # Route and authorise before reading a body: a stranger cannot make us read one.
      self.app.check(as_method, target, headers)
      body = b''
      if method in ('POST', 'PUT', 'PATCH'):
        body = await self._read_body(request)
        body_read = True
      status, payload, extra = await self.app.handle(as_method, target, headers, body)
    except HttpError as e:
      status, payload, extra = e.answer()
      close = close or e.status in (408, 411, 413)
    except asyncio.CancelledError:
      raise  # the client went away
    except Exception:  # a bug, not bad input: say so briefly, keep the details in the log
      log.exception('unexpected error on %s %s', method, request.path)
      status, payload, extra = 500, {'error': 'internal error; see the server log'}, {}
    if has_body and not body_read:
      close = True  # never read: drained briefly after the answer, then the connection closes
    return _json_response(status, payload, dict(self.cors.headers(origin), **extra), close)

  async def _read_body(self, request) -> bytes:
    if request.headers.get('Transfer-Encoding'):
      raise HttpError(411, 'chunked bodies are not accepted; send Content-Length')
    n = request.content_length
    if n is None:
      raise HttpError(411, 'Content-Length is required')
    limit = self.app.max_body_bytes
    if n > limit:
      raise HttpError(413, f'body of {n} bytes is over the limit of {limit} bytes', limit_bytes=limit)
    if request.version == (1, 1) and request.headers.get('Expect', '').lower() == '100-continue':
      await request.writer.write(b'HTTP/1.1 100 Continue\r\n\r\n')
    try:
      return await asyncio.wait_for(request.content.readexactly(n), self.body_timeout)
    except asyncio.TimeoutError:
      raise HttpError(408, f'the body did not arrive within {self.body_timeout:g} s') from None
    except asyncio.IncompleteReadError:
      raise HttpError(400, f'the body ended before its Content-Length of {n} bytes') from None


class Running:
  """A service on its own event loop in a background thread: for tests and embedding.

  ``port`` once started; ``stop()`` stops serving, then calls the app's ``close()``.
  """

  def __init__(self, app: Any, host: str = '127.0.0.1', port: int = 0, **options: Any):
    self.app = app
    self.loop = asyncio.new_event_loop()
    self.service = Service(app, host, port, **options)
    self._started = threading.Event()
    self._error: Optional[BaseException] = None
    self.thread = threading.Thread(target=self._run, name='http-service', daemon=True)
    self.thread.start()
    self._started.wait()
    if self._error is not None:
      self.thread.join()
      raise self._error
    self.port = self.service.port

  def _run(self) -> None:
    asyncio.set_event_loop(self.loop)
    try:
      self.loop.run_until_complete(self.service.start())
    except BaseException as e:
      self._error = e
      self._started.set()
      self.loop.close()
      return
    self._started.set()
    self.loop.run_forever()
    self.loop.close()

  def stop(self, close_app: bool = True) -> None:
    if self.thread.is_alive():
      asyncio.run_coroutine_threadsafe(self.service.stop(), self.loop).result(60)
      self.loop.call_soon_threadsafe(self.loop.stop)
      self.thread.join(60)
    if close_app and hasattr(self.app, 'close'):
      self.app.close()


def serve_until_stopped(app: Any, args: argparse.Namespace, what: str,
                        cors: Optional[CorsPolicy] = None) -> int:
  """Serves ``app`` until SIGTERM or Ctrl-C (exit 0), or until the app gives up
  (``app.fatal``, an asyncio-free callback it may call from any thread: exit 1 with its reason)."""
  reason: List[str] = []

  async def main() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    service = Service(app, args.host, args.port, backlog=args.backlog,
                      idle_timeout=args.idle_timeout, body_timeout=args.body_timeout, cors=cors)
    try:
      await service.start()
    except OSError as e:
      raise UsageError(f'cannot listen on {args.host}:{args.port}: {e.strerror}') from None

    def give_up(why: str) -> None:
      reason.append(why)
      loop.call_soon_threadsafe(stop.set)

    app.fatal = give_up
    for sig in (signal.SIGTERM, signal.SIGINT):
      loop.add_signal_handler(sig, stop.set)
    print(f'{what} listening on http://{args.host}:{service.port}', file=sys.stderr, flush=True)
    try:
      await stop.wait()
    finally:
      for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
      await service.stop()

  try:
    asyncio.run(main())
  finally:
    app.close()
  if reason:
    raise DataError(f'{what} stopped: {reason[0]}')
  print(f'{what} stopped', file=sys.stderr, flush=True)
  return 0


# --- the command line ---------------------------------------------------------------------------

def _add_http_arguments(p: argparse.ArgumentParser, default_port: int, tokens_env: str) -> None:
  p.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1)')
  p.add_argument('--port', type=int, default=default_port,
                 help=f'port to listen on (default {default_port}; 0: any)')
  p.add_argument('--backlog', type=int, default=DEFAULT_BACKLOG,
                 help=f'connections the kernel queues before they are accepted (default {DEFAULT_BACKLOG})')
  p.add_argument('--idle-timeout', type=float, default=DEFAULT_IDLE_TIMEOUT,
                 help='seconds a connection may take to send a request head, or stay idle between '
                      f'keep-alive requests, before it is closed (default {DEFAULT_IDLE_TIMEOUT:g})')
  p.add_argument('--body-timeout', type=float, default=DEFAULT_BODY_TIMEOUT,
                 help='seconds a request body may take to arrive before a 408 '
                      f'(default {DEFAULT_BODY_TIMEOUT:g})')
  p.add_argument('--tokens-file', help=f'bearer tokens, one a line (else ${tokens_env}, '
                                       'comma-separated)')
  p.set_defaults(tokens_env=tokens_env)
  p.add_argument('--cors-origin', action='append', default=[], metavar='ORIGIN',
                 help='a web origin (scheme://host[:port], or *) browsers may call from; repeat '
                      'for more (default: none, no cross-origin access)')


def check_http_arguments(args: argparse.Namespace) -> CorsPolicy:
  if args.backlog < 1 or args.idle_timeout <= 0 or args.body_timeout <= 0:
    raise UsageError('--backlog must be >= 1, --idle-timeout and --body-timeout > 0')
  return CorsPolicy(args.cors_origin)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest='service', metavar='SERVICE')
  w = sub.add_parser('writer', help='the event writer: POST /events -> Kafka, with write receipts')
  w.add_argument('--bootstrap', required=True, help='Kafka bootstrap servers, HOST:PORT')
  w.add_argument('--topic', required=True, help='the topic events are appended to')
  w.add_argument('--partitions', type=int, default=3,
                 help='partitions of the topic if the writer has to create it (default 3)')
  w.add_argument('--state', default='.cache/writer/writer.db',
                 help='SQLite file of receipts and per-key sequences (default .cache/writer/writer.db)')
  w.add_argument('--max-body-bytes', type=int, default=1 << 20,
                 help='largest request body accepted (default 1 MiB)')
  w.add_argument('--max-batch', type=int, default=1000, help='most events in one POST (default 1000)')
  w.add_argument('--ack-timeout', type=float, default=30.0,
                 help='seconds to wait for the broker to acknowledge a write (default 30); a writer '
                      'taking over the topic from one that did not stop cleanly waits this plus '
                      'the lease (5 s) before it writes')
  _add_http_arguments(w, 8700, 'SOURCEBEAM_WRITER_TOKENS')
  add_app_argument(w)
  v = sub.add_parser('views', help="the view API: an application's views, each read able to "
                                   'wait for write receipts')
  v.add_argument('--db', required=True,
                 help='the view store: a SQLite file path, or postgresql://user:password@host:port/db')
  v.add_argument('--max-wait-ms', type=int, default=5000,
                 help='longest a read waits for its after= receipts before a 504 (default 5000)')
  v.add_argument('--poll-ms', type=int, default=2,
                 help='SQLite: how often, while reads wait, the store is checked for a new commit '
                      '(PRAGMA data_version: no table read; the positions are read after one); '
                      'PostgreSQL is watched with LISTEN/NOTIFY instead and its positions are '
                      'polled this often (at least every 10 ms) only while that connection is '
                      'down (default 2)')
  v.add_argument('--max-connections', type=int, default=16,
                 help='database connections (and threads using them) at most (default 16)')
  v.add_argument('--no-auth', action='store_true',
                 help='serve without tokens on an address beyond loopback (a warning is printed)')
  _add_http_arguments(v, 8701, 'SOURCEBEAM_VIEWS_TOKENS')
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
