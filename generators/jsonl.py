"""What every generator shares: fast ids, fast timestamps, and JSON-lines output.

Benchmarks generate millions of events, so the per-event work here is kept to
string formatting: event ids are UUID-4 strings made from the seeded RNG's bits
(deterministic, no ``uuid`` objects), and ISO-8601 timestamps reuse the
formatted second they share with their neighbours.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Union

Line = Union[bytes, str, Mapping[str, Any]]

# One encoder, built once: json.dumps with non-default arguments builds a new
# encoder on every call.
_encode = json.JSONEncoder(separators=(',', ':')).encode


def encode_line(record: Line) -> bytes:
  """One JSON line (no newline) for a dict; str and bytes lines pass through."""
  if isinstance(record, bytes):
    return record
  if isinstance(record, str):
    return record.encode('utf-8')
  return _encode(record).encode('utf-8')


def event_id_from_bits(bits: int) -> str:
  """A UUID-4 string from 128 random bits (the version and variant set as UUID 4 wants)."""
  h = '%032x' % bits
  return f'{h[:8]}-{h[8:12]}-4{h[13:16]}-{"89ab"[bits & 3]}{h[17:20]}-{h[20:]}'


class IsoClock:
  """Epoch millis to '2026-11-26T00:00:00.123Z', caching the formatted second."""

  __slots__ = ('_sec', '_prefix')

  def __init__(self):
    self._sec = None
    self._prefix = ''

  def __call__(self, millis: int) -> str:
    sec, ms = divmod(millis, 1000)
    if sec != self._sec:
      self._sec = sec
      self._prefix = time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(sec))
    return f'{self._prefix}.{ms:03d}Z'


def open_output(path: str, buffer_bytes: int = 1 << 20):
  """A binary file for writing ('-' is stdout); parent directories are created."""
  if path == '-':
    return os.fdopen(os.dup(sys.stdout.fileno()), 'wb', buffering=buffer_bytes)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  return open(path, 'wb', buffering=buffer_bytes)


def write_lines(lines: Iterable[bytes], path: str, batch: int = 4096) -> int:
  """Write already-encoded lines (without newlines) to path; returns how many."""
  n = 0
  buf = []
  with open_output(path) as f:
    for line in lines:
      buf.append(line)
      if len(buf) >= batch:
        f.write(b'\n'.join(buf) + b'\n')
        n += len(buf)
        buf.clear()
    if buf:
      f.write(b'\n'.join(buf) + b'\n')
      n += len(buf)
  return n


def write_jsonl(events_or_lines: Iterable[Line], path: str) -> int:
  """Write dicts (as compact JSON) or ready lines (str/bytes) as JSON lines; returns how many."""
  return write_lines((encode_line(e) for e in events_or_lines), path)


def read_jsonl(path: str, parse: Callable[[str], Any] = json.loads) -> list:
  """Every line of a JSON-lines file, parsed (for tests and small files)."""
  with open(path, encoding='utf-8') as f:
    return [parse(line) for line in f if line.strip()]
