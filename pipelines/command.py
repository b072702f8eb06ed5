"""Sourcebeam's one entry point: ``run.py`` in a checkout, the ``sourcebeam`` command once installed.

With no subcommand it runs the main job: generate a sample day of retail and taxi
events (if none exists), publish them, archive them, and replay the archive
through every pipeline, writing outputs and summary.json under out/.

Each subcommand lives in its own module, which provides ``add_arguments(parser)``
and ``main(args, beam_args) -> int``. Arguments a subcommand does not know are
Beam pipeline options (``--runner``, ``--flink_master``...) and pass through;
one that looks like a misspelling of the subcommand's or Beam's is refused
(exit 2, "did you mean ...?": ``pipelines/pass_through.py``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

# name -> (module, one-line help). Modules are imported only when chosen, so
# `run.py --help` stays fast and one broken pipeline cannot break the others.
SUBCOMMANDS = {
    'main': ('sourcebeam.pipelines.main_job', 'the main job (the default): generate, publish, archive, replay everything'),
    'generate': ('sourcebeam.generators.cli', 'generate deterministic raw retail or taxi events as JSON lines'),
    'publish': ('sourcebeam.pipelines.publish', 'fix the stream: raw JSON events in, published events and dead letters out'),
    'replay': ('sourcebeam.pipelines.replay', 'replay an event archive through the pipelines'),
    'keys': ('sourcebeam.pipelines.keys', 'partition-key report of an archive: cardinality, skew, hot keys'),
    'taxi': ('sourcebeam.pipelines.taxi', 'taxi pipelines: join, long-rides, hourly-tips, cleanse'),
    'stream': ('sourcebeam.pipelines.stream', 'run the pipelines live from Kafka (optionally after an archive replay)'),
    'services': ('sourcebeam.pipelines.services', 'bring the local stack (Kafka, Flink, the IO expansion services, the Flink job server) up, down, or show its status'),
    'serve': ('sourcebeam.pipelines.serve', 'the event writer (POST /events, receipts) and the view API (reads that wait for receipts)'),
    'fanout': ('sourcebeam.pipelines.fanout', 'deliver the published stream to many declared subscribers (filters, own sinks, backfill)'),
    'bench': ('sourcebeam.benchmarks.cli', 'benchmarks: ordering, replay, fanout, causal'),
}


def build_parser(chosen: Optional[str] = None) -> argparse.ArgumentParser:
  """The parser; only the chosen subcommand's module is imported (fast, and isolated)."""
  parser = argparse.ArgumentParser(
      prog='sourcebeam' if os.path.basename(sys.argv[0] if sys.argv else '') == 'sourcebeam' else 'run.py',
      description='Sourcebeam: event sourcing on Apache Beam. Without a subcommand, runs the main job.',
      epilog='Unknown --options are passed to Beam (e.g. --runner=FlinkRunner --flink_master=[local]). '
             'See `run.py SUBCOMMAND --help`.')
  sub = parser.add_subparsers(dest='command', metavar='SUBCOMMAND')
  for name, (module, help_text) in SUBCOMMANDS.items():
    sp = sub.add_parser(name, help=help_text, description=help_text)
    sp.set_defaults(_module=module)
    if name == chosen:
      importlib.import_module(module).add_arguments(sp)
  return parser


def main(argv: Optional[List[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0].startswith('-') and argv[0] not in ('-h', '--help'):
    argv = ['main'] + argv
  parser = build_parser(argv[0] if argv[0] in SUBCOMMANDS else None)
  args, beam_args = parser.parse_known_args(argv)
  from sourcebeam.pipelines.cli import run_command
  from sourcebeam.pipelines.pass_through import command_options
  return run_command(importlib.import_module(args._module), args, beam_args,
                     own_options=command_options(parser, args.command))
