"""`run.py bench NAME ...`: dispatch to one benchmark module.

Each benchmark module provides ``add_arguments(parser)`` and
``main(args, beam_args) -> int`` and prints, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any, List

BENCHMARKS = {
    'ordering': ('sourcebeam.benchmarks.ordering', 'ProcessInOrder on shuffled input against a plain stateful DoFn'),
    'resequence': ('sourcebeam.benchmarks.resequence', 'the publishing resequencer, batch and streaming, against ProcessInOrder'),
    'replay': ('sourcebeam.benchmarks.replay', 'archive replay against raw decode and a naive Beam pipeline'),
    'fanout': ('sourcebeam.benchmarks.fanout', 'fan-out throughput as subscribers grow'),
    'causal': ('sourcebeam.benchmarks.causal', 'POST-to-visible latency and read-your-writes with receipts'),
    'services': ('sourcebeam.benchmarks.services', 'the writer and the view API under waiting reads, bursts and slow clients'),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest='benchmark', metavar='BENCHMARK', required=True)
  for name, (module, help_text) in BENCHMARKS.items():
    sp = sub.add_parser(name, help=help_text, description=help_text)
    sp.set_defaults(_bench_module=module)
    try:
      importlib.import_module(module).add_arguments(sp)
    except ModuleNotFoundError as e:
      if not (e.name and module.startswith(e.name)):
        raise
      sp.set_defaults(_bench_missing=f'benchmark {name} is not built yet')


def main(args: Any, beam_args: List[str]) -> int:
  from sourcebeam.pipelines.cli import UsageError
  if getattr(args, '_bench_missing', None):
    raise UsageError(args._bench_missing)
  return importlib.import_module(args._bench_module).main(args, beam_args)
