"""`run.py bench ordering --events N --keys K`: ProcessInOrder on shuffled input
against a plain stateful DoFn that only stores each key's last sequence.

Both run in the same process on the same input (envelope dicts with per-key
sequences 1..n, shuffled, generated inside each pipeline from one shuffled
order), on the runner the Beam options choose
(DirectRunner by default), one after the other. The baseline is the cheapest
keyed stateful work Beam can do per event, so the ratio says what ordering
costs on top of "touch each key's state once per event". The target is a
ratio of at least 0.5.

Prints a table, then (last line) one JSON object:
``{"events", "keys", "events_per_sec", "baseline_events_per_sec", "ratio", ...}``.
"""

from __future__ import annotations

import argparse
import array
import json
import random
import time
from typing import Any, Dict, List, Tuple

import apache_beam as beam
from apache_beam.coders import VarIntCoder
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec

from sourcebeam.pipelines.cli import UsageError
from sourcebeam.pipelines.options import pipeline_options
from sourcebeam.transforms.ordering import ProcessInOrder

EPOCH_MILLIS = 1_795_000_000_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--events', type=int, default=200_000, help='events in the input (default 200000)')
  parser.add_argument('--keys', type=int, default=1_000, help='partition keys (default 1000)')
  parser.add_argument('--seed', type=int, default=42, help='shuffle seed (default 42)')
  parser.add_argument('--repeat', type=int, default=1,
                      help='run every pipeline this many times, interleaved, and keep each one\'s '
                           'fastest run (less noise on a shared machine; default 1)')
  parser.add_argument('--streaming-expansion', action='store_true',
                      help='also time the streaming (stateful DoFn) expansion on the same input')


def envelope_at(idx: int, keys: int) -> Dict[str, Any]:
  """Event number idx: key idx % keys, and the key's (idx // keys + 1)-th event."""
  k = idx % keys
  return {
      'event_id': f'e{idx}', 'event_type': 'CartItemAdded', 'schema_version': 1,
      'partition_key': f'user-{k}', 'sequence': idx // keys + 1,
      'event_time': EPOCH_MILLIS + idx, 'origin': 'bench', 'follows_from': None,
      'data': {'user_id': f'user-{k}', 'product_id': f'p{idx % 97}', 'quantity': 1}}


def shuffled_order(n: int, seed: int) -> array.array:
  order = list(range(n))
  random.Random(seed).shuffle(order)
  return array.array('q', order)


class GenerateShuffled(beam.PTransform):
  """The input, built inside the pipeline: n envelopes in a shuffled order.

  Only the shuffled order of event numbers (a compact int array) travels with
  the pipeline; a Create of 200,000 envelope dicts would spend most of the
  benchmark in Create's type inference and in pickling the payload.
  """

  def __init__(self, n: int, keys: int, seed: int, chunk: int = 5_000):
    super().__init__()
    self._order = shuffled_order(n, seed)
    self._keys = keys
    self._chunks = [(i, min(i + chunk, n)) for i in range(0, n, chunk)]

  def expand(self, pbegin):
    order, keys = self._order, self._keys
    return (pbegin
            | 'Chunks' >> beam.Create(self._chunks)
            | 'Envelopes' >> beam.FlatMap(
                lambda c: (envelope_at(order[i], keys) for i in range(c[0], c[1])))
            .with_output_types(Dict[str, Any]))


class LastSequence:
  """The ordered counterpart of the baseline: remember the last sequence, emit nothing."""

  def initial_state(self, key: str) -> int:
    return 0

  def apply(self, state: int, event: Dict[str, Any]) -> Tuple[int, list]:
    return event['sequence'], []


class StoreLastSequence(beam.DoFn):
  """The baseline: a plain stateful DoFn that stores each key's last sequence."""
  LAST = ReadModifyWriteStateSpec('last', VarIntCoder())

  def process(self, kv, last=beam.DoFn.StateParam(LAST)):
    last.write(kv[1]['sequence'])


def _run(args, beam_args, build) -> float:
  start = time.perf_counter()
  with beam.Pipeline(options=pipeline_options(beam_args)) as p:
    build(p | GenerateShuffled(args.events, args.keys, args.seed))
  return time.perf_counter() - start


def _baseline(pcoll):
  _ = (pcoll
       | 'Key' >> beam.Map(lambda e: (e['partition_key'], e))
       | 'StoreLast' >> beam.ParDo(StoreLastSequence()))


def _ordered(expansion):
  def build(pcoll):
    result = pcoll | ProcessInOrder(LastSequence(), expansion=expansion)
    _ = result.status | 'CheckAll' >> beam.Map(_check_complete)
  return build


def _check_complete(status: Dict[str, Any]) -> None:
  # Every key's input is complete and unique, so everything must have been applied.
  if status['buffered'] or status['unprocessed'] or status['processed'] != status['received']:
    raise AssertionError(f'incomplete ordering for {status["key"]}: {status}')


def _floor(pcoll):
  _ = pcoll | 'Touch' >> beam.Map(lambda e: e['sequence'])


def main(args: Any, beam_args: List[str]) -> int:
  if args.events < 1 or args.keys < 1:
    raise UsageError('--events and --keys must be positive')
  n = args.events
  runs = [('input only (generate + Map)', _floor),
          ('baseline: stateful DoFn, last sequence', _baseline),
          ('ProcessInOrder (batch expansion)', _ordered('batch'))]
  if args.streaming_expansion:
    runs.append(('ProcessInOrder (streaming expansion)', _ordered('streaming')))
  if args.repeat < 1:
    raise UsageError('--repeat must be >= 1')
  seconds: Dict[str, float] = {}
  for _ in range(args.repeat):
    for name, build in runs:
      s = _run(args, beam_args, build)
      seconds[name] = min(s, seconds.get(name, s))
  base = seconds[runs[1][0]]
  ordered = seconds[runs[2][0]]
  print(f'ordering benchmark: {n} events, {args.keys} keys, shuffled (seed {args.seed}), '
        f'best of {args.repeat}')
  print(f'{"pipeline":<42} {"seconds":>8} {"events/s":>10} {"vs baseline":>12}')
  for name, _ in runs:
    s = seconds[name]
    print(f'{name:<42} {s:>8.2f} {n / s:>10.0f} {base / s:>11.2f}x')
  summary = {
      'events': n, 'keys': args.keys, 'repeat': args.repeat,
      'events_per_sec': round(n / ordered, 1),
      'baseline_events_per_sec': round(n / base, 1),
      'ratio': round(base / ordered, 3),
      'input_only_events_per_sec': round(n / seconds[runs[0][0]], 1),
  }
  if args.streaming_expansion:
    summary['streaming_events_per_sec'] = round(n / seconds[runs[3][0]], 1)
  print(json.dumps(summary))
  return 0
