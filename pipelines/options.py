"""One place for runner options: what every pipeline passes to Beam.

``pipeline_options(beam_args)`` turns the pass-through command-line options into
``PipelineOptions`` and fills in what this project knows and Beam cannot:
where the locally built Prism binary is (Beam would otherwise try to download it
from GitHub) and the ``--setup_file`` that ships Sourcebeam's packages to
remote workers.
"""

from __future__ import annotations

import os
import shutil
from typing import List, Optional

from apache_beam.options.pipeline_options import PipelineOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS_DIR = os.path.join(ROOT, '.cache')
PRISM_BIN = os.path.join(TOOLS_DIR, 'bin', 'prism')


def _has_option(args: List[str], name: str) -> bool:
  return any(a == name or a.startswith(name + '=') for a in args)


def _option_value(args: List[str], name: str) -> Optional[str]:
  for i, a in enumerate(args):
    if a.startswith(name + '='):
      return a.split('=', 1)[1]
    if a == name and i + 1 < len(args):
      return args[i + 1]
  return None


def prism_binary() -> Optional[str]:
  """The Prism binary built by scripts/install_tools.sh (or found on PATH)."""
  if os.access(PRISM_BIN, os.X_OK):
    return PRISM_BIN
  return shutil.which('prism')


def runner_of(beam_args: List[str]) -> str:
  return (_option_value(beam_args, '--runner') or 'DirectRunner').split('.')[-1]


def pipeline_options(beam_args: List[str], *, streaming: bool = False,
                     **overrides) -> PipelineOptions:
  args = list(beam_args)
  runner = runner_of(args)
  if runner in ('PrismRunner', 'DirectRunner') and not _has_option(args, '--prism_location'):
    prism = prism_binary()
    if prism:
      args.append(f'--prism_location={prism}')
  if runner in ('DataflowRunner', 'FlinkRunner', 'PortableRunner') and not _has_option(
      args, '--setup_file'):
    args.append(f'--setup_file={os.path.join(ROOT, "setup.py")}')
  if streaming and not _has_option(args, '--streaming'):
    args.append('--streaming')
  return PipelineOptions(args, **overrides)
