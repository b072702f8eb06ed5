"""`run.py bench causal --rate R`: how long until a write is visible, and what receipts buy.

Brings up what it needs (a Kafka broker through ``run.py services`` unless one
already answers on the default port; the writer, the live view pipeline and the
view API through :class:`pipelines.live_stack.LiveStack`), posts a background load
of ``R`` events a second, and then, on top of it:

* ``--reads`` times Add to Cart then View Cart **with** the add's receipt: the
  read waits until the view has applied the write, so the time from sending the
  POST to the answer is the write's time to visible (p50 / p95 / p99);
* ``--reads`` times the same **without** a receipt: a plain read answers at once,
  and counts as stale when the item just added is not in the cart.

Prints a table and, last, one JSON object with ``rate``, ``p50_ms``, ``p95_ms``,
``p99_ms``, ``receipt_reads``, ``receipt_reads_ok``, ``plain_reads``,
``plain_reads_stale``, the load actually achieved, what the pipeline applied per
second (``pipeline_applied_eps``: all load events over the time until the views
caught up; ``while_loaded``: written and applied events a second between the end of the
warm-up and the end of the load, from looks at the receipts and the views' positions every
0.5 s, with the backlog at the first and last look and its most; ``kept_up``: every receipt
read answered and applied >= 98% of written),
the cores each part of the stack used meanwhile (``cpu_cores``: writer,
views, stream with its runner and workers) and the machine's load average before and
after (``load_average``: the machine is shared). A pipeline that cannot keep up with ``R`` shows as receipt reads that
time out (504, after ``--max-wait-ms``); three in a row end those rounds. Beam options after the
arguments choose the pipeline's runner (default: embedded Flink).

``--breakdown`` also says where the time goes, stage by stage, for each write read
with its receipt: the writer and the view API answer with the times each reached
(the ``Sourcebeam-Timing`` header, asked for by these requests only), the pipeline
records its own in the view store (``run.py stream --stage-times``), and the
client adds its own; all are wall-clock times on this one machine. Printed as a
table of p50 / p90 / p99 / mean per stage (:data:`STAGES`), and as ``breakdown``
in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from sourcebeam.pipelines import services
from sourcebeam.pipelines.cli import DataError, UsageError
from sourcebeam.pipelines.live_stack import (DEFAULT_RUNNER_ARGS, LiveStack, Load, StackError,
                                             add_then_view, percentile)

# Kept up: applied at least this share of what was written while loaded (the slopes of
# BacklogLooks; each look misses what is in flight, so the two agree to about 1%).
KEEP_UP = 0.98


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--rate', type=float, default=200,
                      help='background load in events per second (default 200)')
  parser.add_argument('--reads', type=int, default=100,
                      help='Add to Cart / View Cart rounds with receipts, and as many without (default 100)')
  parser.add_argument('--warmup', type=float, default=5,
                      help='seconds of load before measuring (default 5)')
  parser.add_argument('--max-wait-ms', type=int, default=30000,
                      help='longest a read waits for its receipt before a 504 (default 30000); '
                           'three such reads in a row end the receipt rounds: the pipeline cannot '
                           'keep up with the load')
  parser.add_argument('--workdir', help='where the stack keeps its databases and logs (default: a temp dir)')
  parser.add_argument('--breakdown', action='store_true',
                      help='also time each stage of every write read with its receipt (writer, '
                           'Kafka, each pipeline step, store commit, view API) and print where '
                           'the time goes')
  parser.add_argument('--bootstrap', metavar='HOST:PORT',
                      help='a running Kafka broker to use (default: the one of `run.py services`, '
                           'started for the run if it is not up)')


def _kafka() -> tuple:
  """(bootstrap, ports to stop or None): the default broker if it is up, else one started here."""
  ports = services.Ports()
  if services.status('kafka', ports).healthy:
    return f'127.0.0.1:{ports.kafka}', None
  print('starting Kafka through scripts/kafka.sh ...', file=sys.stderr)
  services.start('kafka', ports)
  return f'127.0.0.1:{ports.kafka}', ports


# One round's marks: the client's (post_sent, receipt_at, get_sent, answer), the writer's
# (w.received, w.appending, w.acked, w.recorded, w.answered), the pipeline's (p.bundle, p.seen,
# p.handled, p.sink, p.begun, p.committing: see transforms/view_store.py) and the view API's
# (v.received, v.checked, v.noticed, v.answered). Each stage: (name, what it covers, its start
# and end mark). The first rows are the write's path to visible, one after the other (their
# means add up to the mean total); the last ones are the reader's side path.
Marks = Dict[str, Optional[float]]


def _span(start: str, end: str) -> Callable[[Marks], Optional[float]]:
  def ms(m: Marks) -> Optional[float]:
    a, b = m.get(start), m.get(end)
    return None if a is None or b is None else (b - a) * 1000
  return ms


def _after_both(start_a: str, start_b: str, end: str) -> Callable[[Marks], Optional[float]]:
  """From the later of two marks to ``end``."""
  def ms(m: Marks) -> Optional[float]:
    a, b, c = m.get(start_a), m.get(start_b), m.get(end)
    return None if None in (a, b, c) else (c - max(a, b)) * 1000
  return ms


STAGES: Tuple[Tuple[str, str, Callable[[Marks], Optional[float]]], ...] = (
    ('POST -> writer', 'HTTP request in (keep-alive connection)', _span('post_sent', 'w.received')),
    ('writer: door -> produce', 'validation, the append thread picks it up',
     _span('w.received', 'w.appending')),
    ('Kafka produce -> ack', 'acks=all on the one broker', _span('w.appending', 'w.acked')),
    ('ack -> pipeline sees it', 'Kafka fetch, the runner\'s source, first bundle, to the Python '
     'worker', _span('w.acked', 'p.seen')),
    ('  of which: bundle start -> seen', 'the first Python bundle was open this long before the '
     'event reached Python', _span('p.bundle', 'p.seen')),
    ('seen -> handler', 'keyed exchange to the ordering, its bundle', _span('p.seen', 'p.handled')),
    ('handler -> store writer', 'to the sink step, its bundle', _span('p.handled', 'p.sink')),
    ('store writer -> transaction', 'waiting for the bundle\'s end (one transaction a bundle) '
     'and the write lock', _span('p.sink', 'p.begun')),
    ('transaction -> commit', 'rows, positions, progress', _span('p.begun', 'p.committing')),
    ('commit -> view API notices', 'from the commit, or from the read\'s arrival if later',
     _after_both('p.committing', 'v.received', 'v.noticed')),
    ('view API: notice -> answer', 'the value read and the answer made',
     _span('v.noticed', 'v.answered')),
    ('answer -> client', 'HTTP answer back', _span('v.answered', 'answer')),
    ('TOTAL: POST -> visible', 'what the benchmark reports', _span('post_sent', 'answer')),
    ('side: ack -> receipt at client', 'the writer records the receipt (SQLite) and answers',
     _span('w.acked', 'receipt_at')),
    ('side: receipt -> read at view API', 'the GET with after= sent and received',
     _span('receipt_at', 'v.received')),
)


def round_marks(r: Dict[str, Any], pipeline: Optional[Dict[str, Any]]) -> Marks:
  """One round of :func:`add_then_view` (``timing=True``) and the pipeline's stage times for
  its write -> the flat marks :data:`STAGES` read."""
  marks: Marks = {k: r[k] for k in ('post_sent', 'receipt_at', 'get_sent', 'answer')}
  marks.update({f'w.{k}': v for k, v in r['writer'].items()})
  marks.update({f'v.{k}': v for k, v in r['views'].items()})
  marks.update({f'p.{k}': v for k, v in (pipeline or {}).items()})
  return marks


def breakdown(rounds: List[Marks]) -> List[Dict[str, Any]]:
  """Per stage of :data:`STAGES`: p50, p90, p99 and mean milliseconds over ``rounds``."""
  table = []
  for name, what, fn in STAGES:
    values = [v for v in (fn(m) for m in rounds) if v is not None]
    table.append({'stage': name, 'covers': what, 'n': len(values),
                  'p50_ms': percentile(values, 0.5), 'p90_ms': percentile(values, 0.9),
                  'p99_ms': percentile(values, 0.99),
                  'mean_ms': round(sum(values) / len(values), 2) if values else None})
  return table


def print_breakdown(table: List[Dict[str, Any]], out=sys.stdout) -> None:
  print(f'{"stage":<36} {"p50 ms":>9} {"p90 ms":>9} {"p99 ms":>9} {"mean ms":>9}  covers', file=out)
  for row in table:
    cells = ' '.join(f'{row[k] if row[k] is not None else "-"!s:>9}'
                     for k in ('p50_ms', 'p90_ms', 'p99_ms', 'mean_ms'))
    print(f'{row["stage"]:<36} {cells}  {row["covers"]}', file=out)


class BacklogLooks(threading.Thread):
  """Looks at the stack's backlog every ``every`` seconds while the load runs after its
  warm-up: written and applied events (:meth:`LiveStack.backlog`). Their rates are the slopes
  of least-squares lines through the looks: each look misses what is in flight at that
  moment, and one line through many looks is steadier than two looks' difference."""

  def __init__(self, stack: LiveStack, load: Load, every: float = 0.5):
    super().__init__(daemon=True)
    self.stack, self.load, self.every = stack, load, every
    self.looks: List[Tuple[float, int, int]] = []
    self.error: Optional[str] = None
    self.stopping = threading.Event()

  def run(self) -> None:
    while True:
      try:
        self.looks.append((time.monotonic(), *self.stack.backlog(self.load.receipts)))
      except (StackError, OSError) as e:
        self.error = str(e)
        return
      if self.stopping.wait(self.every):
        return

  def stop(self) -> None:
    self.stopping.set()
    self.join(30)

  def summary(self) -> Dict[str, Any]:
    if self.error or len(self.looks) < 2:
      raise DataError(f'could not follow the backlog while loaded: {self.error or "too few looks"}')
    t = [look[0] for look in self.looks]
    backlog = [w - a for _, w, a in self.looks]
    return {'seconds': round(t[-1] - t[0], 1), 'looks': len(self.looks),
            'written_eps': round(_slope(t, [look[1] for look in self.looks]), 1),
            'applied_eps': round(_slope(t, [look[2] for look in self.looks]), 1),
            'backlog_events': {'first': backlog[0], 'last': backlog[-1], 'most': max(backlog)}}


def _slope(x: List[float], y: List[int]) -> float:
  """The slope of the least-squares line through (x, y); 0 for fewer than two points."""
  return statistics.linear_regression(x, y).slope if len(x) >= 2 else 0.0


def measure(bootstrap: str, rate: float, reads: int, warmup: float, workdir: str,
            runner_args: List[str], max_wait_ms: int = 30000,
            timing: bool = False) -> Dict[str, Any]:
  stack = LiveStack(bootstrap, f'bench-causal-{uuid.uuid4().hex[:8]}', workdir,
                    runner_args=runner_args or DEFAULT_RUNNER_ARGS, max_wait_ms=max_wait_ms,
                    stage_times=timing)
  print(f'starting the writer, the view API and the live pipeline ({" ".join(stack.runner_args)}) ...',
        file=sys.stderr)
  started = time.monotonic()
  with stack:
    print(f'stack up in {time.monotonic() - started:.1f}s; load {rate:g} ev/s', file=sys.stderr)
    load_avg_before = os.getloadavg()[0]
    cpu_before, cpu_from = stack.cpu_seconds(), time.monotonic()
    load = Load(stack, rate)
    load.start()
    try:
      time.sleep(warmup)
      looks = BacklogLooks(stack, load)
      looks.start()
      print(f'{reads} Add to Cart / View Cart with receipts ...', file=sys.stderr)
      with_receipts = add_then_view(stack, reads, with_receipts=True, give_up_after=3,
                                    timing=timing)
      print(f'{reads} without ...', file=sys.stderr)
      plain = add_then_view(stack, reads, with_receipts=False)
    finally:
      looks.stop()
      load.stop()
    caught_up = time.monotonic()
    stack.wait_caught_up(load.receipts, timeout=1800)
    catch_up_s = time.monotonic() - caught_up
    # What the live pipeline applied per second over the whole load, backlog included.
    applied_eps = len(load.receipts) / (time.monotonic() - load.started_at)
    steady = looks.summary()
    # The cores each part used meanwhile (the machine is shared: this is what the stack costs).
    cpu_after, seconds = stack.cpu_seconds(), time.monotonic() - cpu_from
    cpu = {name: round((cpu_after[name] - cpu_before.get(name, 0.0)) / seconds, 2)
           for name in cpu_after}
    table = None
    if timing:
      shown = [r for r in with_receipts['rounds'] if r['shown']]
      times = stack.stage_times([r['receipt'] for r in shown])
      marks = [round_marks(r, times.get((r['receipt']['topic'], r['receipt']['partition'],
                                         r['receipt']['offset']))) for r in shown]
      with open(os.path.join(workdir, 'breakdown-marks.json'), 'w') as f:
        json.dump(marks, f)  # every round's marks, to look at beyond the table
      table = breakdown(marks)
  if load.errors:
    raise DataError(f'the writer refused the load: {load.errors[0]}')
  latencies = with_receipts['latencies_ms']
  return {
      'rate': rate, 'load_eps': round(load.achieved_rate, 1), 'load_events': len(load.receipts),
      'runner': ' '.join(stack.runner_args),
      'p50_ms': percentile(latencies, 0.50), 'p95_ms': percentile(latencies, 0.95),
      'p99_ms': percentile(latencies, 0.99), 'max_ms': round(max(latencies), 2) if latencies else None,
      'receipt_reads': with_receipts['reads'], 'receipt_reads_ok': with_receipts['ok'],
      'plain_reads': plain['reads'], 'plain_reads_stale': plain['missing'],
      'catch_up_s': round(catch_up_s, 2), 'pipeline_applied_eps': round(applied_eps, 1),
      'while_loaded': steady,
      'kept_up': (with_receipts['ok'] == with_receipts['reads'] == reads and
                  steady['applied_eps'] >= KEEP_UP * steady['written_eps']),
      'cpu_cores': cpu, 'load_average': [round(load_avg_before, 2), round(os.getloadavg()[0], 2)],
      **({'breakdown': table} if table is not None else {}),
  }


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  if args.rate <= 0 or args.reads <= 0 or args.warmup < 0:
    raise UsageError('--rate and --reads must be positive, --warmup not negative')
  bootstrap, started_ports = (args.bootstrap, None) if args.bootstrap else _kafka()
  try:
    with tempfile.TemporaryDirectory(prefix='bench-causal-') as tmp:
      result = measure(bootstrap, args.rate, args.reads, args.warmup, args.workdir or tmp, beam_args,
                       args.max_wait_ms, timing=args.breakdown)
  finally:
    if started_ports is not None:
      services.stop('kafka', started_ports)
  print(f'{"rate":>8} {"load":>8} {"p50 ms":>9} {"p95 ms":>9} {"p99 ms":>9} {"receipt ok":>11} '
        f'{"plain stale":>12}')
  print(f'{result["rate"]:>8g} {result["load_eps"]:>8} {result["p50_ms"]!s:>9} {result["p95_ms"]!s:>9} '
        f'{result["p99_ms"]!s:>9} {result["receipt_reads_ok"]:>5}/{result["receipt_reads"]:<5} '
        f'{result["plain_reads_stale"]:>6}/{result["plain_reads"]:<5}')
  steady = result['while_loaded']
  print(f'while loaded ({steady["seconds"]} s after the warm-up, {steady["looks"]} looks): written '
        f'{steady["written_eps"]} ev/s, applied {steady["applied_eps"]} ev/s, backlog '
        f'{steady["backlog_events"]["first"]} -> {steady["backlog_events"]["last"]} events (most '
        f'{steady["backlog_events"]["most"]}); kept up: {str(result["kept_up"]).lower()}')
  print(f'pipeline applied {result["pipeline_applied_eps"]} ev/s over the whole load; cores used: ' +
        ', '.join(f'{k} {v}' for k, v in result['cpu_cores'].items()) +
        f'; load average {result["load_average"][0]} before, {result["load_average"][1]} after')
  if result.get('breakdown'):
    print()
    print_breakdown(result['breakdown'])
  print(json.dumps(result))
  return 0
