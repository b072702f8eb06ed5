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
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

Line = Union[bytes, str, Mapping[str, Any]]

# One encoder, built once: json.dumps with non-default arguments builds a new
# encoder on every call.
_encode = json.JSONEncoder(separators=(',', ':')).encode


try:
  from _json import encode_basestring_ascii as _quote  # the C function json itself uses
except ImportError:  # pragma: no cover - CPython always has _json
  from json.encoder import encode_basestring_ascii as _quote


def demo_registry():
  """The demo application's schemas: what these generators write."""
  from sourcebeam.demo import app
  return app.registry


def _field_code(expr: str, avro_type: str) -> str:
  """Python source of an f-string part that writes one value as json would."""
  if avro_type == 'string':
    return f'{{_q({expr})}}'
  if avro_type in ('int', 'long'):
    return f'{{_int({expr})}}'
  if avro_type == 'boolean':
    return f'{{_bool({expr})}}'
  return f'{{_float({expr})}}'


def _build_envelope_encoders() -> Dict[str, Callable[[Mapping[str, Any]], str]]:
  """One compiled f-string per event type: envelope and data written in one go.

  The json module's encoder costs several microseconds per event; a formatted
  string costs a fraction of that, and benchmarks write millions of events.
  Each encoder refuses (TypeError) anything json would write differently, and
  the caller then falls back to json itself.
  """
  encoders = {}
  for name, et in demo_registry().current.items():
    data = ','.join(f'"{f.name}":' + _field_code(f'd["{f.name}"]', f.type) for f in et.fields)
    src = (
        'def enc(e):\n'
        '  d = e["data"]\n'
        f'  if len(e) != 9 or len(d) != {len(et.fields)}: raise TypeError\n'
        '  ff = e["follows_from"]\n'
        '  return (f\'{{"event_id":{_q(e["event_id"])},"event_type":{_q(e["event_type"])},'
        '"schema_version":{_int(e["schema_version"])},"partition_key":{_q(e["partition_key"])},'
        '"sequence":{_int(e["sequence"])},"event_time":{_q(e["event_time"])},'
        '"origin":{_q(e["origin"])},"follows_from":{"null" if ff is None else _q(ff)},'
        f'"data":{{{{{data}}}}}}}}}\')\n')
    scope = {'_q': _quote, '_int': _strict_int, '_float': _strict_float, '_bool': _strict_bool}
    exec(compile(src, f'<envelope encoder {name}>', 'exec'), scope)  # pylint: disable=exec-used
    encoders[name] = scope['enc']
  return encoders


def record_encoder(fields: Sequence[Tuple[str, str]]) -> Callable[[Mapping[str, Any]], str]:
  """A fast encoder for flat records with these (name, Avro type) fields, in this order.

  What it writes is what json.dumps(separators=(',', ':')) writes for such a
  record; anything else (another shape, a value of another type) goes to json.
  """
  body = ','.join(f'"{n}":' + _field_code(f'r["{n}"]', t) for n, t in fields)
  src = ('def enc(r):\n'
         f'  if len(r) != {len(fields)}: raise TypeError\n'
         f'  return f\'{{{{{body}}}}}\'\n')
  scope = {'_q': _quote, '_int': _strict_int, '_float': _strict_float, '_bool': _strict_bool}
  exec(compile(src, '<record encoder>', 'exec'), scope)  # pylint: disable=exec-used
  fast = scope['enc']

  def encode(record: Mapping[str, Any]) -> str:
    try:
      return fast(record)
    except (TypeError, KeyError):
      return _encode(record)

  return encode


def _strict_int(v: Any) -> str:
  if type(v) is not int:
    raise TypeError
  return int.__repr__(v)


def _strict_bool(v: Any) -> str:
  if v is True:
    return 'true'
  if v is False:
    return 'false'
  raise TypeError


_INF = float('inf')


def _strict_float(v: Any) -> str:
  if type(v) is not float or not -_INF < v < _INF:
    raise TypeError
  return float.__repr__(v)


_envelope_encoders: Optional[Dict[str, Callable[[Mapping[str, Any]], str]]] = None


def encode_json(record: Mapping[str, Any]) -> str:
  """Compact JSON for a dict, as json.dumps(separators=(',', ':')) writes it.

  Envelopes of known event types take a compiled fast path (several times
  faster than the json module) that writes the fields in envelope and schema
  order, which is the order every generator builds them in, so the bytes are
  the same; anything else goes through json.
  """
  global _envelope_encoders
  if _envelope_encoders is None:
    _envelope_encoders = _build_envelope_encoders()
  enc = _envelope_encoders.get(record.get('event_type')) if 'data' in record else None
  if enc is not None:
    try:
      return enc(record)
    except (TypeError, KeyError):
      pass
  return _encode(record)


def encode_line(record: Line) -> bytes:
  """One JSON line (no newline) for a dict; str and bytes lines pass through."""
  if isinstance(record, bytes):
    return record
  if isinstance(record, str):
    return record.encode('utf-8')
  return encode_json(record).encode('utf-8')


def event_id_from_bits(bits: int) -> str:
  """A UUID-4 string from 128 random bits (the version and variant set as UUID 4 wants)."""
  h = '%032x' % bits
  return f'{h[:8]}-{h[8:12]}-4{h[13:16]}-{"89ab"[bits & 3]}{h[17:20]}-{h[20:]}'


def iso_clock() -> Callable[[int], str]:
  """A function from epoch millis to '2026-11-26T00:00:00.123Z' that caches the formatted second."""
  last = [None, '']
  gmtime, strftime = time.gmtime, time.strftime

  def iso(millis: int) -> str:
    sec, ms = divmod(millis, 1000)
    if sec != last[0]:
      last[0] = sec
      last[1] = strftime('%Y-%m-%dT%H:%M:%S', gmtime(sec))
    return f'{last[1]}.{ms:03d}Z'

  return iso




def is_remote(path: str) -> bool:
  """A path Beam's FileSystems must open (s3://, gs://...), not the local disk."""
  return '://' in path and not path.startswith('file://')


def open_output(path: str, buffer_bytes: int = 1 << 20):
  """A binary file for writing: '-' is stdout; s3:// and gs:// paths go through Beam's
  FileSystems (pointed at an endpoint by pipelines.storage.use_storage_options), where a
  .gz name means gzip; local parent directories are created."""
  if path == '-':
    return os.fdopen(os.dup(sys.stdout.fileno()), 'wb', buffering=buffer_bytes)
  if is_remote(path):
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.create(path, mime_type='application/x-ndjson')
  if path.startswith('file://'):
    path = path[len('file://'):]
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  return open(path, 'wb', buffering=buffer_bytes)


class LineWriter:
  """Buffered JSON-lines output: lines are joined and written in batches."""

  def __init__(self, path: str, batch: int = 4096):
    self.path, self.batch, self.count = path, batch, 0
    self._f = open_output(path)
    self._buf = []

  def write(self, line: bytes) -> None:
    self._buf.append(line)
    if len(self._buf) >= self.batch:
      self.flush()

  def flush(self) -> None:
    if self._buf:
      self._f.write(b'\n'.join(self._buf) + b'\n')
      self.count += len(self._buf)
      self._buf.clear()

  def close(self) -> None:
    self.flush()
    self._f.close()

  def __enter__(self) -> 'LineWriter':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def write_lines(lines: Iterable[bytes], path: str, batch: int = 4096) -> int:
  """Write already-encoded lines (without newlines) to path; returns how many."""
  with LineWriter(path, batch) as w:
    write = w.write
    for line in lines:
      write(line)
  return w.count


def write_jsonl(events_or_lines: Iterable[Line], path: str) -> int:
  """Write dicts (as compact JSON) or ready lines (str/bytes) as JSON lines; returns how many."""
  return write_lines((encode_line(e) for e in events_or_lines), path)


def read_jsonl(path: str, parse: Callable[[str], Any] = json.loads) -> list:
  """Every line of a JSON-lines file, parsed (for tests and small files)."""
  with open(path, encoding='utf-8') as f:
    return [parse(line) for line in f if line.strip()]
