"""The read-your-writes loop, whole: event writer, live view pipeline, view API.

Why a module: the acceptance test of effect-after-cause (Add to Cart, then View
Cart), the fault test and ``run.py bench causal`` all need the same real stack,
started the way a user starts it, each part its own process:

* ``run.py serve writer`` appends events to a Kafka topic and answers receipts;
* ``run.py stream --source kafka://.../TOPIC --views DSN`` (a real runner,
  embedded Flink by default) keeps the retail views in the database with per-partition positions;
* ``run.py serve views`` answers reads, waiting for ``after=<receipt>``.

:class:`LiveStack` starts and stops them (the stream in its own process group, so
stopping it also stops the runner and the Java expansion service it spawned),
:class:`Load` posts a steady background load, and :func:`add_then_view` is the
acceptance scenario. Kafka itself comes from ``run.py services`` / the test
fixtures; this module never starts a broker.
"""

from __future__ import annotations

import datetime
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

from sourcebeam.pipelines.runners import ROOT
from sourcebeam.pipelines.serve import TIMING_HEADER, parse_timing

RUN_PY = os.path.join(ROOT, 'run.py')

# The live view pipeline's default runner. Embedded Flink, because of how each runner reads
# Kafka: Flink runs KafkaIO's legacy unbounded read, which hands on each record as it comes;
# on Prism the splittable read keeps a bundle open while records keep coming, up to its poll
# timeout (whole seconds, at least 1), and Prism passes a bundle's output on only when it
# ends. `run.py stream --views` adds the latency settings (pipelines.runners.live_view_args):
# README's "Where a write's time goes" has the breakdown of both runners.
DEFAULT_RUNNER_ARGS = ('--runner=FlinkRunner', '--flink_master=[local]')


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def iso_now() -> str:
  now = datetime.datetime.now(datetime.timezone.utc)
  return now.strftime('%Y-%m-%dT%H:%M:%S.') + f'{now.microsecond // 1000:03d}Z'


def cart_item_added(user: str, product: str, quantity: int = 1) -> Dict[str, Any]:
  """A raw CartItemAdded as a shop front sends it; the writer fills id, key and sequence."""
  return {'event_type': 'CartItemAdded', 'event_time': iso_now(), 'origin': 'web-cart',
          'data': {'user_id': user, 'product_id': product, 'quantity': quantity}}


def product_viewed(user: str, product: str) -> Dict[str, Any]:
  return {'event_type': 'ProductViewed', 'event_time': iso_now(), 'origin': 'web-catalog',
          'data': {'user_id': user, 'product_id': product}}


class StackError(RuntimeError):
  """A part of the stack did not start or answer in time; the message says which and where its log is."""


class Http:
  """One keep-alive HTTP/1.1 connection (one per thread): a view read costs a round trip, not a handshake."""

  def __init__(self, port: int, token: Optional[str] = None, timeout: float = 60.0):
    self.port, self.token, self.timeout = port, token, timeout
    self.conn: Optional[http.client.HTTPConnection] = None
    self.last_headers: Dict[str, str] = {}  # of the last answer

  def request(self, method: str, path: str, body: Any = None,
              headers: Optional[Dict[str, str]] = None) -> Tuple[int, Any]:
    headers = dict(headers or {}, **{'Content-Type': 'application/json'})
    if self.token:
      headers['Authorization'] = f'Bearer {self.token}'
    data = None if body is None else json.dumps(body).encode()
    for attempt in (0, 1):
      if self.conn is None:
        self.conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=self.timeout)
      try:
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        raw = response.read()
        self.last_headers = dict(response.getheaders())
        return response.status, json.loads(raw) if raw else None
      except (ConnectionError, http.client.HTTPException):
        self.close()  # the server closed an idle connection: reconnect once
        if attempt:
          raise
    raise AssertionError('unreachable')

  def close(self) -> None:
    if self.conn is not None:
      self.conn.close()
      self.conn = None


def last_receipts(receipts: Sequence[Dict[str, Any]]) -> Dict[int, Dict[str, Any]]:
  """Per partition, the receipt of the highest offset among ``receipts``."""
  last: Dict[int, Dict[str, Any]] = {}
  for r in receipts:
    if r['partition'] not in last or r['offset'] > last[r['partition']]['offset']:
      last[r['partition']] = r
  return last


class LiveStack:
  """Writer, streaming view pipeline and view API on one Kafka topic, as subprocesses.

  ``runner_args`` are the Beam options of the streaming pipeline (default embedded Flink).
  ``stage_times``: the pipeline records when each event reached each of its stages
  (``run.py stream --stage-times``; :meth:`stage_times` reads them). Logs go to
  ``workdir``. Use as a context manager, or call :meth:`start` / :meth:`stop`;
  :meth:`kill_pipeline` / :meth:`start_pipeline` are for fault tests.
  """

  def __init__(self, bootstrap: str, topic: str, workdir: str, *, db: Optional[str] = None,
               runner_args: Sequence[str] = DEFAULT_RUNNER_ARGS, partitions: int = 3,
               max_wait_ms: int = 30000, stage_times: bool = False):
    self.bootstrap, self.topic, self.workdir = bootstrap, topic, workdir
    self.db = db or os.path.join(workdir, 'views.db')
    self.runner_args = list(runner_args)
    self.partitions, self.max_wait_ms = partitions, max_wait_ms
    self.record_stage_times = stage_times
    self.token = uuid.uuid4().hex  # configured through the environment, as a user would
    self.writer_port, self.views_port = free_port(), free_port()
    self.procs: Dict[str, subprocess.Popen] = {}
    self.pipeline_starts = 0
    os.makedirs(workdir, exist_ok=True)

  # --- processes ---------------------------------------------------------------------

  def _spawn(self, name: str, args: List[str]) -> subprocess.Popen:
    log = open(os.path.join(self.workdir, f'{name}.log'), 'ab')
    env = dict(os.environ, SOURCEBEAM_WRITER_TOKENS=self.token, PYTHONUNBUFFERED='1')
    proc = subprocess.Popen([sys.executable, RUN_PY] + args, cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    self.procs[name] = proc
    return proc

  def log_tail(self, name: str, chars: int = 1500) -> str:
    try:
      with open(os.path.join(self.workdir, f'{name}.log'), 'rb') as f:
        return f.read().decode('utf-8', 'replace')[-chars:]
    except OSError:
      return ''

  def _wait_http(self, name: str, port: int, deadline: float) -> None:
    client = Http(port)
    while time.monotonic() < deadline:
      if self.procs[name].poll() is not None:
        raise StackError(f'{name} exited with {self.procs[name].returncode}: {self.log_tail(name)}')
      try:
        if client.request('GET', '/health')[0] == 200:
          return
      except OSError:
        pass
      finally:
        client.close()
      time.sleep(0.2)
    raise StackError(f'{name} did not answer /health on port {port}: {self.log_tail(name)}')

  def start(self, timeout: float = 300) -> 'LiveStack':
    """Starts the three parts, in order; if one does not come up, stops those it started."""
    try:
      return self._start(timeout)
    except BaseException:
      self.stop()
      raise

  def _start(self, timeout: float) -> 'LiveStack':
    deadline = time.monotonic() + timeout
    self._spawn('writer', ['serve', 'writer', '--bootstrap', self.bootstrap, '--topic', self.topic,
                           '--partitions', str(self.partitions), '--port', str(self.writer_port),
                           '--state', os.path.join(self.workdir, 'writer.db')])
    self._wait_http('writer', self.writer_port, deadline)  # the writer creates the topic
    self._spawn('views', ['serve', 'views', '--db', self.db, '--port', str(self.views_port),
                          '--max-wait-ms', str(self.max_wait_ms)])
    self._wait_http('views', self.views_port, deadline)
    self.start_pipeline()
    self.wait_pipeline_ready(deadline - time.monotonic())
    return self

  def start_pipeline(self) -> None:
    """Starts the live view pipeline. Each start has its own consumer group and reads the
    topic from the start: a restarted run rebuilds its handler state, and the store's
    per-partition offsets skip what it had already applied."""
    self.pipeline_starts += 1
    # The writer numbers each key itself (its topic is a published stream): no renumbering.
    self._spawn('stream', ['stream', '--source', f'kafka://{self.bootstrap}/{self.topic}',
                           '--out', os.path.join(self.workdir, 'stream-out'), '--views', self.db,
                           '--published-source',
                           '--group-id', f'live-stack-{uuid.uuid4().hex[:8]}'] +
                ['--stage-times'] * self.record_stage_times + self.runner_args)

  def wait_pipeline_ready(self, timeout: float = 300) -> float:
    """Posts one event and waits until the view shows it; returns the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    receipt = self.post(cart_item_added('live-stack-probe', f'probe-{uuid.uuid4().hex[:6]}'))
    views = Http(self.views_port)
    try:
      while time.monotonic() < deadline:
        if self.procs['stream'].poll() is not None:
          raise StackError(f'the streaming pipeline exited with {self.procs["stream"].returncode}: '
                           f'{self.log_tail("stream")}')
        status, _ = views.request('GET', f'/carts/live-stack-probe?after={receipt["after"]}&wait_ms=2000')
        if status == 200:
          return time.monotonic() - started
    finally:
      views.close()
    raise StackError(f'the streaming pipeline did not apply an event within {timeout:.0f}s: '
                     f'{self.log_tail("stream")}')

  def kill_pipeline(self) -> None:
    """SIGKILL to the pipeline's whole process group: the runner and its workers die mid-bundle."""
    self._signal('stream', signal.SIGKILL)

  def _signal(self, name: str, sig: int) -> None:
    proc = self.procs.get(name)
    if proc is None:
      return
    try:
      os.killpg(proc.pid, sig)
    except ProcessLookupError:
      pass
    try:
      proc.wait(30)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait(30)

  def stop(self) -> None:
    """SIGTERM to each process group, SIGKILL after 30 s: the stream command then cancels its
    job, which on a running job server (``run.py services up jobserver``) would outlive it."""
    for name in ('stream', 'views', 'writer'):
      if name in self.procs:
        self._signal(name, signal.SIGTERM)
    self.procs.clear()

  def __enter__(self) -> 'LiveStack':
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()

  # --- clients -----------------------------------------------------------------------

  def writer_client(self) -> Http:
    return Http(self.writer_port, self.token)

  def views_client(self) -> Http:
    return Http(self.views_port)

  def post(self, events: Any, client: Optional[Http] = None,
           headers: Optional[Dict[str, str]] = None) -> Any:
    """POSTs one event (-> its receipt) or a list (-> the list of receipts)."""
    own = client is None
    client = client or self.writer_client()
    try:
      status, body = client.request('POST', '/events', events, headers)
    finally:
      if own:
        client.close()
    if status != 201:
      raise StackError(f'the writer answered {status}: {body}')
    return body['receipts'] if isinstance(events, list) else body

  def cpu_seconds(self) -> Dict[str, float]:
    """CPU seconds (user + system) each part has used so far, with every process it started
    (each part is its own session: the pipeline's runner JVMs and workers count as the
    pipeline's). Read from /proc; {} where there is none."""
    return {name: session_cpu_seconds(proc.pid) for name, proc in self.procs.items()}

  def stage_times(self, receipts: Sequence[Dict[str, Any]]) -> Dict[Tuple[str, int, int], Dict[str, Any]]:
    """{(topic, partition, offset): {stage: Unix time}} the pipeline recorded for the
    events of ``receipts`` (with ``stage_times=True``; see :mod:`transforms.view_store`)."""
    from sourcebeam.transforms.view_store import ViewStore
    with ViewStore(self.db) as store:
      return store.read_stage_times([(r['topic'], r['partition'], r['offset']) for r in receipts])

  def backlog(self, receipts: Sequence[Dict[str, Any]]) -> Tuple[int, int]:
    """``(written, applied)``: the events ``receipts`` say the topic holds so far (each
    partition's highest receipted offset + 1) and how many of them every view has applied
    (per partition the least far view's position + 1), summed over partitions."""
    written = {p: r['offset'] + 1 for p, r in last_receipts(list(receipts)).items()}
    views = self.views_client()
    try:
      status, body = views.request('GET', '/positions')
    finally:
      views.close()
    if status != 200:
      raise StackError(f'the view API answered {status} for /positions: {body}')
    reached: Dict[int, int] = {}
    for p in body['positions']:
      reached[p['partition']] = min(reached.get(p['partition'], p['offset'] + 1), p['offset'] + 1)
    return sum(written.values()), sum(min(reached.get(p, 0), n) for p, n in written.items())

  def wait_caught_up(self, receipts: Sequence[Dict[str, Any]], timeout: float = 300) -> None:
    """Waits until every view has applied the last of ``receipts`` on each partition."""
    after = ','.join(r['after'] for r in last_receipts(receipts).values())
    # One read per view, each waiting for every partition's last receipt.
    reads = [f'/carts/x?after={after}&wait_ms=2000',
             f'/users/x/recently-viewed?after={after}&wait_ms=2000',
             f'/users/x/frequently-viewed?after={after}&wait_ms=2000',
             f'/products?category=x&after={after}&wait_ms=2000']
    deadline = time.monotonic() + timeout
    views = self.views_client()
    try:
      while time.monotonic() < deadline:
        if all(views.request('GET', path)[0] == 200 for path in reads):
          return
        if self.procs['stream'].poll() is not None:
          raise StackError(f'the streaming pipeline exited: {self.log_tail("stream")}')
    finally:
      views.close()
    raise StackError(f'the views did not reach {after} within {timeout:.0f}s')


MAX_LOAD_BATCH = 500  # events per POST of the load (the writer takes at most --max-batch, 1000)


class Load(threading.Thread):
  """A steady background load: ``rate`` events a second in batches every ``tick`` seconds.

  Shoppers view products and add some to carts (about 4 views to 1 add), spread
  over ``users`` users, so the pipeline's per-key ordering and every user view
  work. Keeps every receipt, for catching up and checking afterwards.
  """

  def __init__(self, stack: LiveStack, rate: float, users: int = 500, products: int = 200,
               tick: float = 0.1, seed: int = 7):
    super().__init__(daemon=True)
    self.stack, self.rate, self.tick = stack, rate, tick
    self.users, self.products = users, products
    self.random = random.Random(seed)
    self.stopping = threading.Event()
    self.receipts: List[Dict[str, Any]] = []
    self.errors: List[str] = []
    self.started_at = self.stopped_at = 0.0

  def _event(self) -> Dict[str, Any]:
    user = f'load-u{self.random.randrange(self.users)}'
    product = f'load-p{self.random.randrange(self.products)}'
    if self.random.random() < 0.2:
      return cart_item_added(user, product, self.random.randint(1, 3))
    return product_viewed(user, product)

  def run(self) -> None:
    client = self.stack.writer_client()
    self.started_at = time.monotonic()
    sent = 0.0
    try:
      while not self.stopping.is_set():
        due = self.rate * (time.monotonic() - self.started_at)
        n = int(due - sent)
        while n > 0:  # after a slow answer, what is due goes in batches the writer accepts
          batch = min(n, MAX_LOAD_BATCH)
          try:
            self.receipts.extend(self.stack.post([self._event() for _ in range(batch)], client))
          except (StackError, OSError) as e:
            self.errors.append(str(e))
          sent += batch
          n -= batch
        self.stopping.wait(self.tick)
    finally:
      self.stopped_at = time.monotonic()
      client.close()

  def stop(self) -> None:
    self.stopping.set()
    self.join(60)

  @property
  def achieved_rate(self) -> float:
    seconds = (self.stopped_at or time.monotonic()) - self.started_at
    return len(self.receipts) / seconds if seconds > 0 else 0.0


def add_then_view(stack: LiveStack, n: int, with_receipts: bool,
                  user: Optional[str] = None, give_up_after: Optional[int] = None,
                  timing: bool = False) -> Dict[str, Any]:
  """The acceptance scenario: ``n`` times, add a new product to a cart, then read the cart.

  With receipts the read carries ``after=<the add's receipt>``; without, it reads at
  once, as Hello, Retail!'s cart page did. Returns how many reads showed the item
  and, per add, the milliseconds from sending the POST to the read that showed it
  (the write's time to visible, for reads with receipts). ``give_up_after`` ends the
  rounds after that many reads in a row missed (a pipeline that cannot keep up with
  the load makes every receipt read wait its whole limit); ``reads`` says how many ran.
  ``timing``: both requests ask the services for their stage times (``Sourcebeam-Timing``),
  and ``rounds`` lists, per round, the receipt, whether the read showed the item
  (``shown``) and Unix times: the client's (``post_sent``, ``receipt_at``, ``get_sent``,
  ``answer``), the writer's (``writer``: received, appending, acked, recorded, answered) and
  the view API's (``views``: received, checked, noticed, answered).
  """
  user = user or f'shopper-{uuid.uuid4().hex[:8]}'
  writer, views = stack.writer_client(), stack.views_client()
  ok, missing, latencies_ms, failures, missed_in_a_row = 0, 0, [], [], 0
  rounds: List[Dict[str, Any]] = []
  ask = {TIMING_HEADER: '1'} if timing else None
  try:
    for i in range(n):
      if give_up_after is not None and missed_in_a_row >= give_up_after:
        break
      product = f'{user}-item-{i}'
      started, post_sent = time.monotonic(), time.time()
      receipt = stack.post(cart_item_added(user, product), writer, headers=ask)
      got_receipt, writer_marks = time.time(), parse_timing(writer.last_headers.get(TIMING_HEADER))
      path = f'/carts/{urllib.parse.quote(user)}'
      if with_receipts:
        path += f'?after={receipt["after"]}'
      get_sent = time.time()
      status, body = views.request('GET', path, headers=ask)
      elapsed_ms = (time.monotonic() - started) * 1000
      if timing:
        rounds.append({'receipt': receipt, 'post_sent': post_sent, 'receipt_at': got_receipt,
                       'get_sent': get_sent, 'answer': time.time(), 'writer': writer_marks,
                       'views': parse_timing(views.last_headers.get(TIMING_HEADER))})
      items = {item['product_id'] for item in ((body or {}).get('value') or {}).get('items', [])}
      if timing:
        rounds[-1]['shown'] = status == 200 and product in items
      if status == 200 and product in items:
        ok += 1
        missed_in_a_row = 0
        latencies_ms.append(elapsed_ms)
      else:
        missing += 1
        missed_in_a_row += 1
        if with_receipts:
          failures.append({'product': product, 'status': status, 'body': body})
  finally:
    writer.close()
    views.close()
  return {'reads': ok + missing, 'ok': ok, 'missing': missing, 'latencies_ms': latencies_ms,
          'failures': failures[:5], 'rounds': rounds}


def session_cpu_seconds(session: int) -> float:
  """User + system CPU seconds of the live processes of ``session`` (Linux /proc; 0.0 elsewhere)."""
  tick = os.sysconf('SC_CLK_TCK') if hasattr(os, 'sysconf') else 100
  total = 0
  try:
    pids = [d for d in os.listdir('/proc') if d.isdigit()]
  except OSError:
    return 0.0
  for pid in pids:
    try:
      with open(f'/proc/{pid}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
      continue  # gone meanwhile
    # After the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime ...
    if int(fields[3]) == session:
      total += int(fields[11]) + int(fields[12])
  return total / tick


def percentile(values: Sequence[float], q: float) -> Optional[float]:
  """The ``q`` quantile (0..1) by nearest rank; None for no values."""
  if not values:
    return None
  ordered = sorted(values)
  rank = max(1, int(-(-q * len(ordered) // 1)))  # ceil(q * n), at least 1
  return round(ordered[min(rank, len(ordered)) - 1], 2)
