"""The command line in pytest's own process: ``run_cli(*argv)`` is ``run.py ARGV``.

It calls ``run.main(argv)`` (what ``run.py`` does) with stdout and stderr captured and
returns ``(returncode, stdout, stderr)``, a named tuple with the fields of
``subprocess.CompletedProcess``, so a test reads it as it read a subprocess's result. What a
process would have of its own is given to the command for the call and put back after:
the working directory (``cwd``), environment variables (``env``: name -> value, or None to
unset), stdin (``stdin``: bytes fed through a real pipe), the SIGTERM handler the command
installs, and the WARNING log lines the command prints on stderr (``logging.basicConfig``
in ``pipelines/cli.py``). Exit codes are the process's: argparse's ``SystemExit`` is caught.

A test that uses it is in the ``cli`` tier: mark it ``@pytest.mark.cli`` (or
``integration``); from a fast-tier test it fails, so ``make test-fast`` never runs a command.

A ``run.py`` subprocess is for what only a process can show: signals (SIGTERM, SIGKILL),
its child processes (Prism, the Flink job server, the Java expansion service: Beam keeps them
until the interpreter exits), or a fresh interpreter (a server under load from this
process's clients). Such tests are integration tests and say why in a comment;
:func:`run_py` is their command line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import sys
import threading
from typing import Dict, List, NamedTuple, Optional

import pytest

from tests.demo import ROOT
from tests.tiers import CLI, INTEGRATION, current_item

RUN_PY = os.path.join(ROOT, 'run.py')
_LOG_FORMAT = '%(levelname)s %(name)s: %(message)s'  # pipelines/cli.py's basicConfig


class Result(NamedTuple):
  returncode: int
  stdout: str
  stderr: str


def run_py(*argv: str) -> List[str]:
  """``[python, run.py, *argv]``: the command line of a ``run.py`` subprocess."""
  return [sys.executable, RUN_PY, *argv]


def _check_tier() -> None:
  item = current_item()
  if item is not None and not (item.get_closest_marker(CLI) or item.get_closest_marker(INTEGRATION)):
    pytest.fail(f'{item.nodeid} runs the command line (tests/cli.py) but is marked neither '
                '@pytest.mark.cli nor @pytest.mark.integration', pytrace=False)


@contextlib.contextmanager
def _environment(env: Optional[Dict[str, Optional[str]]]):
  saved = {name: os.environ.get(name) for name in (env or {})}
  try:
    for name, value in (env or {}).items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    yield
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


@contextlib.contextmanager
def _cwd(path: Optional[str]):
  before = os.getcwd()
  if path is not None:
    os.chdir(path)
  try:
    yield
  finally:
    os.chdir(before)


@contextlib.contextmanager
def _stdin(data: Optional[bytes]):
  """``sys.stdin`` reading ``data`` from a real pipe, as ``cat file | run.py`` gives it."""
  if data is None:
    yield
    return
  read_fd, write_fd = os.pipe()

  def feed():
    with os.fdopen(write_fd, 'wb') as w:
      try:
        w.write(data)
      except BrokenPipeError:  # the command stopped reading
        pass

  writer = threading.Thread(target=feed, daemon=True)
  writer.start()
  saved = sys.stdin
  sys.stdin = io.TextIOWrapper(os.fdopen(read_fd, 'rb'))
  try:
    yield
  finally:
    stream, sys.stdin = sys.stdin, saved
    stream.close()
    writer.join(10)


@contextlib.contextmanager
def _warnings_to(stream: io.StringIO):
  """The command's WARNING (and worse) log lines on its stderr, as in a process of its own."""
  root = logging.getLogger()
  handlers_before = list(root.handlers)
  handler = logging.StreamHandler(stream)
  handler.setLevel(logging.WARNING)
  handler.setFormatter(logging.Formatter(_LOG_FORMAT))
  root.addHandler(handler)
  try:
    yield
  finally:
    root.removeHandler(handler)
    for h in list(root.handlers):  # a basicConfig that found no handler added one
      if h not in handlers_before:
        root.removeHandler(h)


def run_cli(*argv: str, cwd: Optional[str] = None, env: Optional[Dict[str, Optional[str]]] = None,
            stdin: Optional[bytes] = None) -> Result:
  """``run.py ARGV`` in this process: (returncode, stdout, stderr)."""
  _check_tier()
  import run
  out, err = io.StringIO(), io.StringIO()
  sigterm = signal.getsignal(signal.SIGTERM)
  try:
    with _environment(env), _cwd(cwd), _stdin(stdin), _warnings_to(err), \
        contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      try:
        code = run.main([str(a) for a in argv])
      except SystemExit as e:  # argparse: --help, or arguments it cannot parse
        if e.code is None or isinstance(e.code, int):
          code = e.code or 0
        else:
          print(e.code, file=sys.stderr)
          code = 1
  finally:
    if threading.current_thread() is threading.main_thread():
      signal.signal(signal.SIGTERM, sigterm)
  return Result(int(code), out.getvalue(), err.getvalue())
