"""`run.py bench fanout --subscribers 1,10,50,100 [--events N]`: fan-out throughput as subscribers grow.

One archive of N generated retail events is built once (cached under
``.cache/bench/``, the archive ``run.py bench replay`` uses). For each
subscriber count, in the same run, the fan-out pipeline the CLI runs
(``ReadArchive`` -> :class:`transforms.fanout.FanOut`) delivers it to that
many subscribers whose sinks are real archives on local disk (Avro files a
replay can read), one after the other on the runner the Beam options choose.

``eps`` is input events per second (the stream read once); ``ratio`` is each
size's eps over the one-subscriber eps. The target: 100 subscribers at a ratio
of at least 0.5. The subscribers are a fixed mix, so more subscribers also
mean more deliveries per event (``deliveries_per_event`` in the JSON line):
subscriber 0 and every tenth one take every event, the others take two event
types, one type for a tenth of the users, a tenth of the users, or every
product key. Every run's deliveries per subscriber are checked against the
filters applied one by one in plain Python (:func:`fanout_core.naive_match`).

Sizes alternate order between repeats (no size always runs first); each
size keeps its fastest run. ``cpu_seconds`` is that run's CPU time (this
process and finished child processes), a check on wall time on a shared machine.

Prints a table, then (last line) one JSON object with ``eps`` and ``ratio``
maps keyed by subscriber count.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import tempfile
import time
from typing import Any, Dict, List, Sequence, Tuple

from sourcebeam.generators.jsonl import demo_registry
from sourcebeam.pipelines.cli import UsageError

DEFAULT_EVENTS = 200_000
DEFAULT_SIZES = '1,10,50,100'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from sourcebeam.benchmarks.replay import CACHE_DIR
  parser.add_argument('--subscribers', default=DEFAULT_SIZES, metavar='N,N,...',
                      help=f'subscriber counts to measure (default: {DEFAULT_SIZES}); ratios are '
                           'against 1 subscriber, which is always measured')
  parser.add_argument('--events', type=int, default=DEFAULT_EVENTS,
                      help=f'retail events in the archive (default: {DEFAULT_EVENTS:,})')
  parser.add_argument('--repeat', type=int, default=1,
                      help='run every size this many times, interleaved, keeping the fastest '
                           '(less noise on a shared machine; default 1)')
  parser.add_argument('--seed', type=int, default=1, help='generator seed (default: 1)')
  parser.add_argument('--cache-dir', default=CACHE_DIR, help=f'archive cache (default: {CACHE_DIR})')
  parser.add_argument('--work-dir', default=None,
                      help='where subscriber archives are written (default: a temporary directory, '
                           'removed afterwards)')


def parse_sizes(text: str) -> List[int]:
  try:
    sizes = [int(x) for x in text.split(',') if x.strip()]
  except ValueError:
    raise UsageError(f'--subscribers must be counts like 1,10,50,100, got {text!r}') from None
  if not sizes or any(n < 1 for n in sizes):
    raise UsageError(f'--subscribers counts must be at least 1, got {text!r}')
  return sorted(set(sizes) | {1})


def bench_subscriber_doc(n: int, sink_dir: str, event_types: Sequence[str]) -> Dict[str, Any]:
  """The subscriber file for ``n`` subscribers (the mix in the module docstring)."""
  types = sorted(event_types)
  subs = []
  for i in range(n):
    s: Dict[str, Any] = {'name': f'sub-{i:03d}', 'sink': os.path.join(sink_dir, f'sub-{i:03d}')}
    kind = i % 10
    if kind == 0:
      pass  # every event
    elif kind in (1, 5, 8):
      s['event_types'] = [types[i % len(types)], types[(i + 3) % len(types)]]
    elif kind in (2, 6):
      s['event_types'] = [types[i % len(types)]]
      s['keys'] = [f'u-0000{i % 10}*']
    elif kind in (3, 7):
      s['keys'] = [f'u-0000{i % 10}*', f'u-00001{i % 10}?']
    else:
      s['keys'] = ['p-*']
    subs.append(s)
  return {'subscribers': subs}


def _expected(archive: str, subscribers) -> Tuple[int, Dict[str, int]]:
  """Events, and deliveries per subscriber, by the plain definition of the filters."""
  from sourcebeam.transforms.archive import iter_archive
  from sourcebeam.transforms.fanout_core import naive_match
  pairs = collections.Counter((e['event_type'], e['partition_key'])
                              for e in iter_archive(archive, demo_registry()))
  want: Dict[str, int] = collections.Counter()
  for (t, k), c in pairs.items():
    for i in naive_match(subscribers, t, k):
      want[subscribers[i].name] += c
  return sum(pairs.values()), {s.name: want.get(s.name, 0) for s in subscribers}


def _cpu_seconds() -> float:
  """CPU time of this process and its finished children (workers, if the runner uses any)."""
  me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _run_once(archive: str, subscribers, beam_args: List[str]) -> Tuple[float, float, Dict[str, int]]:
  """One fan-out pipeline (the CLI's transforms); (wall seconds, CPU seconds, counts)."""
  import apache_beam as beam
  from sourcebeam.pipelines.options import pipeline_options
  from sourcebeam.transforms.archive import ReadArchive
  from sourcebeam.transforms.fanout import FanOut, prepare_archive_sinks
  prepare_archive_sinks(subscribers)
  out = tempfile.mkdtemp(prefix='fanout-counts-')
  path = os.path.join(out, 'counts.json')
  start, cpu = time.perf_counter(), _cpu_seconds()
  with beam.Pipeline(options=pipeline_options(beam_args)) as p:
    read = p | 'Read' >> ReadArchive(archive, registry=demo_registry())
    result = read['events'] | 'FanOut' >> FanOut(subscribers, registry=demo_registry())
    (result.counts
     | 'Sum' >> beam.CombinePerKey(sum)
     | 'ToDict' >> beam.combiners.ToDict()
     | 'Json' >> beam.Map(json.dumps)
     | 'Write' >> beam.io.WriteToText(path, shard_name_template='', num_shards=1))
  seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
  with open(path) as f:
    found = json.load(f)
  shutil.rmtree(out, ignore_errors=True)
  return seconds, cpu, found


def main(args: Any, beam_args: List[str]) -> int:
  from sourcebeam.benchmarks.replay import archive_path, build_archive
  from sourcebeam.generators.phases import HELLO_RETAIL_RATE
  from sourcebeam.generators.jsonl import demo_registry
  from sourcebeam.transforms.fanout import MATCHED, UNMATCHED
  from sourcebeam.transforms.fanout_core import parse_subscribers
  sizes = parse_sizes(args.subscribers)
  if args.events < 1 or args.repeat < 1:
    raise UsageError('--events and --repeat must be positive')
  archive = archive_path(args.cache_dir, args.events, 'avro', HELLO_RETAIL_RATE, args.seed, 16)
  build_archive(archive, args.events, 'avro', HELLO_RETAIL_RATE, args.seed, 16)
  work = args.work_dir or tempfile.mkdtemp(prefix='bench-fanout-')
  types = demo_registry().event_types
  seconds: Dict[int, float] = {}
  cpu: Dict[int, float] = {}
  deliveries: Dict[int, int] = {}
  try:
    plans = {}
    for n in sizes:
      doc = bench_subscriber_doc(n, os.path.join(work, f'n{n}'), types)
      subs = parse_subscribers(doc, types, where=f'bench ({n} subscribers)')
      plans[n] = (subs, _expected(archive, subs))
    for r in range(args.repeat):
      for n in (sizes if r % 2 == 0 else sizes[::-1]):  # alternate, so no size always goes first
        subs, (events, want) = plans[n]
        shutil.rmtree(os.path.join(work, f'n{n}'), ignore_errors=True)
        s, c, got = _run_once(archive, subs, beam_args)
        got_subs = {s_.name: got.get(s_.name, 0) for s_ in subs}
        if got_subs != want:
          bad = {k: (got_subs[k], want[k]) for k in want if got_subs[k] != want[k]}
          raise AssertionError(f'{n} subscribers: deliveries differ from the filters '
                               f'(got, want): {dict(list(bad.items())[:5])}')
        if got.get(MATCHED, 0) + got.get(UNMATCHED, 0) != events:
          raise AssertionError(f'{n} subscribers: {got.get(MATCHED, 0)} matched + '
                               f'{got.get(UNMATCHED, 0)} unmatched != {events} events')
        if s < seconds.get(n, float('inf')):
          seconds[n], cpu[n] = s, c
        deliveries[n] = sum(want.values())
  finally:
    if not args.work_dir:
      shutil.rmtree(work, ignore_errors=True)
  events = plans[1][1][0]
  eps = {n: events / seconds[n] for n in sizes}
  ratio = {n: eps[n] / eps[1] for n in sizes}
  print(f'fan-out benchmark: {events} retail events from an Avro archive, subscribers with '
        f'archive sinks on local disk, best of {args.repeat}')
  print(f'{"subscribers":>11} {"seconds":>8} {"cpu s":>7} {"events/s":>10} {"deliveries":>11} '
        f'{"per event":>9} {"deliveries/s":>13} {"vs 1":>6}')
  for n in sizes:
    print(f'{n:>11} {seconds[n]:>8.2f} {cpu[n]:>7.2f} {eps[n]:>10.0f} {deliveries[n]:>11} '
          f'{deliveries[n] / events:>9.2f} {deliveries[n] / seconds[n]:>13.0f} {ratio[n]:>6.2f}')
  summary = {
      'events': events, 'subscribers': sizes, 'repeat': args.repeat,
      'eps': {str(n): round(eps[n], 1) for n in sizes},
      'ratio': {str(n): round(ratio[n], 3) for n in sizes},
      'deliveries_per_event': {str(n): round(deliveries[n] / events, 3) for n in sizes},
      'deliveries_per_sec': {str(n): round(deliveries[n] / seconds[n], 1) for n in sizes},
      'seconds': {str(n): round(seconds[n], 3) for n in sizes},
      'cpu_seconds': {str(n): round(cpu[n], 3) for n in sizes},
  }
  largest = max(sizes)
  summary['target'] = {'subscribers': largest, 'min_ratio': 0.5,
                       'met': ratio[largest] >= 0.5}
  print(json.dumps(summary))
  return 0
