"""Options a command does not know: Beam's pass through, misspellings are refused.

``run.py`` hands every option its subcommand does not define to Beam (``--runner``,
``--flink_master``...). Beam drops options it does not know, or forwards them
unchecked to a portable runner, so a misspelled option used to change a run's
result with exit 0: ``publish --archive-formt parquet`` wrote Avro, ``replay
--runnr=PrismRunner`` ran on the DirectRunner, ``keys --tpo 5`` was ignored.

Now an unknown option is checked before anything runs:

* a real Beam pipeline option passes through. The list is Beam's own: every
  ``PipelineOptions`` subclass's argparse definitions, as Beam itself parses them;
* an option close to one of the subcommand's own options or to a Beam option
  (``difflib``; ``-`` and ``_`` and case do not count) is refused with exit 2 and
  "did you mean ...?";
* a single-dash option Beam does not know is refused (Beam drops them);
* anything else passes through with a warning: runners take options of their
  own that Beam's Python SDK does not define (Dataflow, Prism, Flink's uber jar).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import re
import sys
from typing import Callable, FrozenSet, Iterable, List, Optional

from sourcebeam.pipelines.cli import UsageError

CUTOFF = 0.6  # difflib's default: '--tpo' is 0.67 from '--top'
_NUMBER = re.compile(r'^-\d')


@functools.lru_cache(maxsize=1)
def beam_option_strings() -> FrozenSet[str]:
  """Every option string Beam's pipeline options define (``--runner``, ``--no_use_public_ips``...),
  read from the argparse definitions of all ``PipelineOptions`` subclasses."""
  import apache_beam  # noqa: F401  (imports the runners' and IOs' option classes)
  from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser
  names = set()
  seen, stack = set(), list(PipelineOptions.__subclasses__())
  while stack:
    cls = stack.pop()
    if cls in seen:
      continue
    seen.add(cls)
    stack.extend(cls.__subclasses__())
    parser = _BeamArgumentParser(allow_abbrev=False)
    try:
      cls._add_argparse_args(parser)  # pylint: disable=protected-access
    except Exception:  # pylint: disable=broad-except  (a user's options class that fails alone)
      continue
    for action in parser._actions:  # pylint: disable=protected-access
      names.update(s for s in action.option_strings if s not in ('-h', '--help'))
  return frozenset(names)


def command_options(parser: argparse.ArgumentParser, command: Optional[str]) -> List[str]:
  """The option strings of ``run.py``'s subcommand ``command`` and of its own subcommands."""
  sub = _subparsers(parser)
  chosen = sub.get(command) if command else None
  return sorted(_all_options(chosen)) if chosen is not None else []


def _subparsers(parser: argparse.ArgumentParser) -> dict:
  for action in parser._actions:  # pylint: disable=protected-access
    if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
      return dict(action.choices)
  return {}


def _all_options(parser: argparse.ArgumentParser) -> set:
  names = set()
  for action in parser._actions:  # pylint: disable=protected-access
    names.update(action.option_strings)
  for sub in _subparsers(parser).values():
    names |= _all_options(sub)
  return names


def unknown_option_names(beam_args: Iterable[str]) -> List[str]:
  """The option names among the pass-through arguments (values and numbers left out)."""
  names = []
  for arg in beam_args:
    if arg == '--':
      break
    if arg.startswith('-') and arg != '-' and not _NUMBER.match(arg):
      names.append(arg.split('=', 1)[0])
  return names


def _norm(option: str) -> str:
  return option.lstrip('-').lower().replace('-', '_')


def suggest(name: str, own: Iterable[str], beam: Iterable[str]) -> Optional[str]:
  """The option ``name`` most likely meant, preferring the command's own, or None."""
  best, best_score = None, CUTOFF
  target = _norm(name)
  for candidates in (own, beam):
    for option in sorted(candidates):
      if option in ('-h', '--help'):
        continue
      score = 1.0 if _norm(option) == target else difflib.SequenceMatcher(
          None, target, _norm(option)).ratio()
      if score > best_score or score == 1.0 and best_score < 1.0:
        best, best_score = option, score
  return best


def check_pass_through(beam_args: List[str], own: Iterable[str], command: str,
                       warn: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
                       ) -> None:
  """UsageError (exit 2) for a pass-through option that looks like a misspelling."""
  names = unknown_option_names(beam_args)
  if not names:
    return
  beam, own = beam_option_strings(), list(own)
  where = f'run.py {command}' if command else 'run.py'
  for name in names:
    if name in beam:
      continue
    guess = suggest(name, own, beam)
    if guess:
      origin = ', a Beam pipeline option' if guess in beam and guess not in own else ''
      raise UsageError(f'unknown option {name} for {where}: did you mean {guess}{origin}? '
                       f'(see {where} --help)')
    if not name.startswith('--'):
      raise UsageError(f'unknown option {name} for {where} (see {where} --help)')
    warn(f'warning: {name} is neither an option of {where} nor a Beam pipeline option; '
         'it goes to the runner unchecked')
