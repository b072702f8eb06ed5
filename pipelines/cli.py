"""What every subcommand shares: one-line errors, exit codes and progress lines.

Bad arguments end with one line on stderr and exit code 2, never a traceback;
a run that finished but found bad data (a corrupt archive file, say) exits 1, and
so does a pipeline that failed while running (one line with the cause; set
``SOURCEBEAM_DEBUG=1`` to see the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, List


class UsageError(Exception):
  """Arguments that cannot work (missing input, bad path): exit 2 with this message."""


class DataError(Exception):
  """The run could not complete because of bad data: exit 1 with this message."""


def run_command(module: Any, args: Any, beam_args: List[str]) -> int:
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  try:
    return int(module.main(args, beam_args) or 0)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return 130
  except Exception as e:  # a pipeline that failed while running: say why in one line
    if os.environ.get('SOURCEBEAM_DEBUG'):
      raise
    print(f'error: {type(e).__name__}: {_first_line(e)} '
          f'(set SOURCEBEAM_DEBUG=1 for the traceback)', file=sys.stderr)
    return 1


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0][:500] if lines else 'no message'


class Progress:
  """Numbered stage lines on stderr, with the time each stage took."""

  def __init__(self, total: int, quiet: bool = False):
    self.total, self.n, self.quiet = total, 0, quiet
    self._t = None

  def stage(self, text: str) -> None:
    self.done()
    self.n += 1
    self._t = time.monotonic()
    if not self.quiet:
      print(f'[{self.n}/{self.total}] {text} ...', file=sys.stderr, flush=True)

  def done(self) -> None:
    if self._t is not None and not self.quiet:
      print(f'      done in {time.monotonic() - self._t:.1f}s', file=sys.stderr, flush=True)
    self._t = None
