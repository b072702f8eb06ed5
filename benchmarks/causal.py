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
``plain_reads_stale``, the load actually achieved and what the pipeline applied per
second (``pipeline_applied_eps``: all load events over the time until the views
caught up). A pipeline that cannot keep up with ``R`` shows as receipt reads that
time out (504, after ``--max-wait-ms``); three in a row end those rounds. Beam options after the
arguments choose the pipeline's runner (default: embedded Flink).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, List

from sourcebeam.pipelines import services
from sourcebeam.pipelines.cli import DataError, UsageError
from sourcebeam.pipelines.live_stack import DEFAULT_RUNNER_ARGS, LiveStack, Load, add_then_view, percentile


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


def _kafka() -> tuple:
  """(bootstrap, ports to stop or None): the default broker if it is up, else one started here."""
  ports = services.Ports()
  if services.status('kafka', ports).healthy:
    return f'127.0.0.1:{ports.kafka}', None
  print('starting Kafka through scripts/kafka.sh ...', file=sys.stderr)
  services.start('kafka', ports)
  return f'127.0.0.1:{ports.kafka}', ports


def measure(bootstrap: str, rate: float, reads: int, warmup: float, workdir: str,
            runner_args: List[str], max_wait_ms: int = 30000) -> Dict[str, Any]:
  stack = LiveStack(bootstrap, f'bench-causal-{uuid.uuid4().hex[:8]}', workdir,
                    runner_args=runner_args or DEFAULT_RUNNER_ARGS, max_wait_ms=max_wait_ms)
  print(f'starting the writer, the view API and the live pipeline ({" ".join(stack.runner_args)}) ...',
        file=sys.stderr)
  started = time.monotonic()
  with stack:
    print(f'stack up in {time.monotonic() - started:.1f}s; load {rate:g} ev/s', file=sys.stderr)
    load = Load(stack, rate)
    load.start()
    try:
      time.sleep(warmup)
      print(f'{reads} Add to Cart / View Cart with receipts ...', file=sys.stderr)
      with_receipts = add_then_view(stack, reads, with_receipts=True, give_up_after=3)
      print(f'{reads} without ...', file=sys.stderr)
      plain = add_then_view(stack, reads, with_receipts=False)
    finally:
      load.stop()
    caught_up = time.monotonic()
    stack.wait_caught_up(load.receipts, timeout=1800)
    catch_up_s = time.monotonic() - caught_up
    # What the live pipeline applied per second over the whole load, backlog included.
    applied_eps = len(load.receipts) / (time.monotonic() - load.started_at)
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
      'kept_up': with_receipts['ok'] == with_receipts['reads'] == reads,
  }


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  if args.rate <= 0 or args.reads <= 0 or args.warmup < 0:
    raise UsageError('--rate and --reads must be positive, --warmup not negative')
  bootstrap, started_ports = _kafka()
  try:
    with tempfile.TemporaryDirectory(prefix='bench-causal-') as tmp:
      result = measure(bootstrap, args.rate, args.reads, args.warmup, args.workdir or tmp, beam_args,
                       args.max_wait_ms)
  finally:
    if started_ports is not None:
      services.stop('kafka', started_ports)
  print(f'{"rate":>8} {"load":>8} {"p50 ms":>9} {"p95 ms":>9} {"p99 ms":>9} {"receipt ok":>11} '
        f'{"plain stale":>12}')
  print(f'{result["rate"]:>8g} {result["load_eps"]:>8} {result["p50_ms"]!s:>9} {result["p95_ms"]!s:>9} '
        f'{result["p99_ms"]!s:>9} {result["receipt_reads_ok"]:>5}/{result["receipt_reads"]:<5} '
        f'{result["plain_reads_stale"]:>6}/{result["plain_reads"]:<5}')
  print(json.dumps(result))
  return 0
