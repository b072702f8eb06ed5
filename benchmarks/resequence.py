"""`run.py bench resequence --events N --keys K`: the publishing resequencer's throughput.

In one process, on the same shuffled input as `run.py bench ordering` (envelopes with
per-key raw sequences 1..n), one after the other on the runner the Beam options choose
(DirectRunner by default):

* input only (generate + Map), and the ordering benchmark's baseline (a stateful DoFn
  storing each key's last sequence);
* ProcessInOrder's batch and streaming expansions (the consumers' ordering step) with a
  handler that emits each event, for comparison;
* Resequence, batch expansion (bounded publish) and streaming expansion (the stateful
  DoFn; no processing-time limit, so the DirectRunner runs it on the FnApiRunner);
* with ``--faults``, Resequence's batch expansion again on a dirty copy of the input:
  1 raw event in 100 missing and 1 in 100 delivered twice.

Prints a table, then (last line) one JSON object with events/s per pipeline.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Dict, List

import apache_beam as beam

from sourcebeam.benchmarks.ordering import GenerateShuffled, _baseline, _floor
from sourcebeam.pipelines.cli import UsageError
from sourcebeam.pipelines.options import pipeline_options
from sourcebeam.transforms.ordering import ProcessInOrder
from sourcebeam.transforms.resequence import Resequence, SummarizeStats


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--events', type=int, default=200_000, help='events in the input (default 200000)')
  parser.add_argument('--keys', type=int, default=1_000, help='partition keys (default 1000)')
  parser.add_argument('--seed', type=int, default=42, help='shuffle seed (default 42)')
  parser.add_argument('--repeat', type=int, default=1,
                      help='run every pipeline this many times, interleaved, keeping the fastest')
  parser.add_argument('--faults', action='store_true',
                      help='also time the batch expansion on input with 1%% holes and 1%% copies')


class _Dirty(beam.DoFn):
  """1 event in 100 missing (a hole), 1 in 100 sent twice (a copy), spread over the keys."""

  def process(self, e):
    mixed = (int(e['event_id'][1:]) * 2654435761 >> 16) % 100
    if mixed == 7:
      return
    yield e
    if mixed == 3:
      yield dict(e)


def _check(expect_published: bool):
  def check(summary: Dict[str, Any]) -> None:
    if summary['held'] or summary['received'] != (summary['published'] + summary['dead_lettered']
                                                  + summary['duplicates_dropped']):
      raise AssertionError(f'resequence lost events: {summary}')
    if expect_published and summary['published'] != summary['received']:
      raise AssertionError(f'a clean input must be published whole: {summary}')
  return check


def _resequence(expansion: str, dirty: bool = False):
  def build(pcoll):
    if dirty:
      pcoll = pcoll | 'Dirty' >> beam.ParDo(_Dirty())
    result = pcoll | Resequence(expansion=expansion, gap_timeout_processing=None)
    _ = result.stats | SummarizeStats() | 'Check' >> beam.Map(_check(not dirty))
  return build


class EmitEach:
  """ProcessInOrder's handler here: each event out as it is applied, as Resequence publishes
  each one (``bench ordering``'s handler emits nothing, which skips the output cost)."""

  def initial_state(self, key: str) -> int:
    return 0

  def apply(self, state: int, event: Dict[str, Any]):
    return state, [event]


def _ordered(expansion: str):
  def build(pcoll):
    _ = pcoll | ProcessInOrder(EmitEach(), expansion=expansion, final_status=False)
  return build


def main(args: Any, beam_args: List[str]) -> int:
  if args.events < 1 or args.keys < 1 or args.repeat < 1:
    raise UsageError('--events, --keys and --repeat must be positive')
  n = args.events
  runs = [('input only (generate + Map)', _floor),
          ('baseline: stateful DoFn, last sequence', _baseline),
          ('ProcessInOrder (batch expansion)', _ordered('batch')),
          ('ProcessInOrder (streaming expansion)', _ordered('streaming')),
          ('Resequence (batch expansion)', _resequence('batch')),
          ('Resequence (streaming expansion)', _resequence('streaming'))]
  if args.faults:
    runs.append(('Resequence (batch, 1% holes, 1% copies)', _resequence('batch', dirty=True)))
  seconds: Dict[str, float] = {}
  for _ in range(args.repeat):
    for name, build in runs:
      start = time.perf_counter()
      with beam.Pipeline(options=pipeline_options(beam_args)) as p:
        build(p | GenerateShuffled(n, args.keys, args.seed))
      s = time.perf_counter() - start
      seconds[name] = min(s, seconds.get(name, s))
  print(f'resequence benchmark: {n} events, {args.keys} keys, shuffled (seed {args.seed}), '
        f'best of {args.repeat}')
  print(f'{"pipeline":<44} {"seconds":>8} {"events/s":>10}')
  for name, _ in runs:
    print(f'{name:<44} {seconds[name]:>8.2f} {n / seconds[name]:>10.0f}')
  rate = {name: round(n / s, 1) for name, s in seconds.items()}
  summary = {
      'events': n, 'keys': args.keys, 'repeat': args.repeat,
      'batch_events_per_sec': rate['Resequence (batch expansion)'],
      'streaming_events_per_sec': rate['Resequence (streaming expansion)'],
      'process_in_order_batch_events_per_sec': rate['ProcessInOrder (batch expansion)'],
      'process_in_order_streaming_events_per_sec': rate['ProcessInOrder (streaming expansion)'],
      'baseline_events_per_sec': rate['baseline: stateful DoFn, last sequence'],
      'input_only_events_per_sec': rate['input only (generate + Map)'],
  }
  if args.faults:
    summary['batch_with_faults_events_per_sec'] = rate['Resequence (batch, 1% holes, 1% copies)']
  print(json.dumps(summary))
  return 0


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_arguments(parser)
  known, rest = parser.parse_known_args()
  raise SystemExit(main(known, rest))
