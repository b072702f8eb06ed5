"""Runner-specific options: what each Beam runner needs on this machine.

Prism is built locally by scripts/install_tools.sh (Beam's own download from
GitHub is unreachable here), so every DirectRunner or PrismRunner pipeline gets
``--prism_location``. Remote runners get ``--setup_file`` so workers install
Sourcebeam's packages.
"""

from __future__ import annotations

import os
import shutil
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS_DIR = os.path.join(ROOT, '.cache')
PRISM_BIN = os.path.join(TOOLS_DIR, 'bin', 'prism')


def has_option(args: List[str], name: str) -> bool:
  return any(a == name or a.startswith(name + '=') for a in args)


def option_value(args: List[str], name: str) -> Optional[str]:
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


def runner_of(args: List[str]) -> str:
  return (option_value(args, '--runner') or 'DirectRunner').split('.')[-1]


def runner_args(args: List[str]) -> List[str]:
  """``args`` plus what the chosen runner needs here."""
  args = list(args)
  runner = runner_of(args)
  if runner == 'PrismRunner' and not has_option(args, '--prism_location'):
    prism = prism_binary()
    if prism:
      args.append(f'--prism_location={prism}')
  if runner in ('DataflowRunner', 'FlinkRunner', 'PortableRunner') and not has_option(
      args, '--setup_file'):
    args.append(f'--setup_file={os.path.join(ROOT, "setup.py")}')
  return args
