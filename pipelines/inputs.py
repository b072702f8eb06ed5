"""A command's raw input: files and globs as they are, streams (stdin, a FIFO) copied first.

Beam reads files: it sizes them, splits them and may read a range twice on a
retry. A pipe has no size (Beam's file sources saw 0 bytes in
``cat raw.jsonl | run.py publish --input /dev/stdin`` and published "0 of 0
events", exit 0) and can be read only once. So a stream given as input (``-``,
``/dev/stdin``, a named pipe, a character device) is copied to a temporary file
before the pipeline starts, the byte count is said on stderr, and the copy is
deleted when the command ends. A terminal as stdin, a directory, and a pipe
inside a glob are refused at once (exit 2), before anything runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import stat
import sys
import tempfile
from typing import BinaryIO, Callable, Iterator, Optional

from apache_beam.io.filesystems import FileSystems

from sourcebeam.pipelines.cli import UsageError

STDIN_NAMES = ('-', '/dev/stdin', '/dev/fd/0', '/proc/self/fd/0')
_COPY_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class RawInput:
  """What the pipeline reads: ``pattern``; for a copied stream, the name its lines carry
  (``source_name``) and how many bytes were copied (``spooled_bytes``)."""
  given: str
  pattern: str
  source_name: Optional[str] = None
  spooled_bytes: Optional[int] = None


def _is_local(pattern: str) -> bool:
  return FileSystems.get_scheme(pattern) in (None, 'file')


def _local_path(pattern: str) -> str:
  return pattern[len('file://'):] if pattern.startswith('file://') else pattern


def is_stream(path: str) -> bool:
  """True for a local path that is a pipe, a socket or a character device (not a file)."""
  try:
    mode = os.stat(path).st_mode
  except OSError:
    return False
  return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)


def check_input(pattern: str) -> None:
  """A one-line UsageError when the raw input does not exist, is a directory, or a glob
  matches a pipe or device (which can be read only alone, as the whole input)."""
  if _is_local(pattern) and os.path.isdir(_local_path(pattern)):
    raise UsageError(f'input {pattern} is a directory: give a file or a glob '
                     f'(e.g. {pattern.rstrip("/")}/*.jsonl)')
  try:
    matched = FileSystems.match([pattern])[0].metadata_list
  except Exception as e:  # a filesystem's own error for a bad path or bucket
    raise UsageError(f'cannot read input {pattern}: {str(e).splitlines()[0]}') from None
  if not matched:
    raise UsageError(f'input {pattern} does not exist (no file matches)')
  if _is_local(pattern):
    for m in matched:
      if os.path.isdir(m.path):
        raise UsageError(f'input {m.path} (matched by {pattern}) is a directory')
      if is_stream(m.path):
        raise UsageError(f'input {m.path} (matched by {pattern}) is a pipe or device: '
                         'give it alone as --input')


def spool(stream: BinaryIO, into: str) -> int:
  """Copy ``stream`` to the file ``into`` in fixed-size chunks; the number of bytes."""
  n = 0
  with open(into, 'wb') as out:
    while True:
      chunk = stream.read(_COPY_CHUNK)
      if not chunk:
        return n
      out.write(chunk)
      n += len(chunk)


def _stdin_binary() -> BinaryIO:
  return getattr(sys.stdin, 'buffer', sys.stdin)


@contextlib.contextmanager
def raw_input(pattern: str, *, stdin: Optional[Callable[[], BinaryIO]] = None,
              say: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
              ) -> Iterator[RawInput]:
  """The input to read for ``--input PATTERN``; a stream is copied to a temporary file
  first (deleted on exit). UsageError (exit 2) when it cannot be read."""
  stdin = stdin or _stdin_binary
  if pattern in STDIN_NAMES:
    stream = stdin()
    if hasattr(stream, 'isatty') and stream.isatty():
      raise UsageError(f'--input {pattern} reads stdin, which is a terminal: '
                       'pipe the events in (cat raw.jsonl | run.py publish --input - ...)')
    name, opener = ('stdin' if pattern == '-' else pattern), (lambda: contextlib.nullcontext(stream))
  elif _is_local(pattern) and is_stream(_local_path(pattern)):
    name, opener = pattern, (lambda: open(_local_path(pattern), 'rb'))
  else:
    check_input(pattern)
    yield RawInput(pattern, pattern)
    return
  tmpdir = tempfile.mkdtemp(prefix='sourcebeam-input-')
  try:
    copy = os.path.join(tmpdir, 'input.jsonl')
    with opener() as stream:
      n = spool(stream, copy)
    say(f'read {n} bytes from {name} into a temporary file ({copy}) before publishing')
    yield RawInput(pattern, copy, source_name=name, spooled_bytes=n)
  finally:
    shutil.rmtree(tmpdir, ignore_errors=True)
