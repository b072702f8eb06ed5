"""The event envelope in memory, in JSON and in Avro.

In memory (and in Avro) an envelope is a plain ``dict`` with the fields of
``Envelope.avsc``, ``event_time`` as epoch milliseconds UTC, and ``data`` as the
event's own dict. Plain dicts are what fastavro and pyarrow read and write
fastest, and what a handler written in plain Python expects.

The JSON form (what the publish pipeline writes and the event writer accepts)
is the same with ``event_time`` as an ISO-8601 UTC string, so a person can read
it.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Dict, Mapping, Optional

from orjson import dumps as _orjson_dumps

from sourcebeam.schemas.registry import Registry

ENVELOPE_FIELDS = ('event_id', 'event_type', 'schema_version', 'partition_key',
                   'sequence', 'event_time', 'origin', 'follows_from', 'raw_sequence', 'data')
# Optional fields the JSON form leaves out when null (so envelopes written before they existed
# read the same, and a published line says only what it has).
OPTIONAL_IN_JSON = ('raw_sequence',)

Envelope = Dict[str, Any]

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _iso_seconds(seconds: int) -> str:
  dt = _EPOCH + datetime.timedelta(seconds=seconds)
  return dt.strftime('%Y-%m-%dT%H:%M:%S.')


# The last few seconds formatted: strftime was a tenth of publishing an event, and events
# come in time order, so most share their second with one just formatted.
_ISO_SECONDS: Dict[int, str] = {}


def millis_to_iso(millis: int) -> str:
  """Epoch milliseconds to ISO-8601 UTC with millisecond precision, e.g. 2026-11-26T10:00:00.000Z."""
  seconds, ms = divmod(millis, 1000)
  prefix = _ISO_SECONDS.get(seconds)
  if prefix is None:
    if len(_ISO_SECONDS) >= 4096:
      _ISO_SECONDS.clear()
    prefix = _ISO_SECONDS[seconds] = _iso_seconds(seconds)
  return f'{prefix}{ms:03d}Z'


def iso_to_millis(text: str, assume_utc: bool = True) -> int:
  """ISO-8601 (any offset, or 'Z') to epoch milliseconds UTC.

  Raises ValueError for text that is not an ISO-8601 timestamp. A timestamp
  without an offset is taken as UTC when ``assume_utc`` (the documented repair).
  """
  t = text.strip()
  if t.endswith('Z') or t.endswith('z'):
    t = t[:-1] + '+00:00'
  dt = datetime.datetime.fromisoformat(t)
  if dt.tzinfo is None:
    if not assume_utc:
      raise ValueError(f'timestamp {text!r} has no UTC offset')
    dt = dt.replace(tzinfo=datetime.timezone.utc)
  delta = dt - _EPOCH
  return (delta.days * 86_400_000 + delta.seconds * 1000 +
          delta.microseconds // 1000)


def make_envelope(registry: Registry,
                  event_type: str,
                  data: Mapping[str, Any],
                  *,
                  event_id: str,
                  sequence: int,
                  event_time: int,
                  origin: str,
                  follows_from: Optional[str] = None,
                  schema_version: Optional[int] = None,
                  raw_sequence: Optional[int] = None) -> Envelope:
  """A well-formed envelope for ``data`` of one of ``registry``'s event types, its partition
  key taken from the type's key rule."""
  et = registry.get(event_type)
  return {
      'event_id': event_id,
      'event_type': event_type,
      'schema_version': et.version if schema_version is None else schema_version,
      'partition_key': et.key_of(data),
      'sequence': sequence,
      'event_time': event_time,
      'origin': origin,
      'follows_from': follows_from,
      'raw_sequence': raw_sequence,
      'data': {f: data[f] for f in et.field_names},
  }


def to_json_dict(env: Mapping[str, Any]) -> Dict[str, Any]:
  out = dict(env)
  out['event_time'] = millis_to_iso(env['event_time'])
  for name in OPTIONAL_IN_JSON:
    if out.get(name) is None:
      out.pop(name, None)
  return out


def to_json(env: Mapping[str, Any]) -> str:
  """One line of the published stream."""
  return compact_json(to_json_dict(env))


def compact_json(value: Any) -> str:
  """``json.dumps(value, separators=(',', ':'), ensure_ascii=False)``, the same text, faster.

  orjson writes what the standard library writes for strings, 64-bit integers, booleans,
  None, lists and dicts with string keys, and floats that print without an exponent in
  both (zero and ``1e-4 <= |x| < 1e16``: checked over a million values). The rest goes to
  the standard library: other floats (``1e-05`` against ``0.00001``, NaN against null),
  what orjson refuses (larger integers, lone surrogates, keys other than strings), and any
  type but those (orjson writes a datetime, json refuses it)."""
  try:
    if _prints_alike(value):
      return _orjson_dumps(value).decode('utf-8')
  except (TypeError, RecursionError):  # orjson's error is a TypeError; deep nesting either way
    pass
  return json.dumps(value, separators=(',', ':'), ensure_ascii=False)


def _prints_alike(value: Any) -> bool:
  t = type(value)
  if t is str or t is int or t is bool or value is None:
    return True
  if t is float:
    return value == 0.0 or 1e-4 <= abs(value) < 1e16  # False for NaN and infinities
  if t is dict:
    value = value.values()
  elif t is not list and t is not tuple:
    return False  # subclasses and other types (orjson writes datetimes, json refuses them)
  for v in value:
    if type(v) is not str and not _prints_alike(v):
      return False
  return True


def from_json(line: str) -> Envelope:
  """Inverse of :func:`to_json` for published (already valid) envelopes."""
  env = json.loads(line)
  if isinstance(env.get('event_time'), str):
    env['event_time'] = iso_to_millis(env['event_time'])
  if isinstance(env, dict) and 'data' in env:
    for name in OPTIONAL_IN_JSON:
      env.setdefault(name, None)
    if list(env) != list(ENVELOPE_FIELDS) and set(env) == set(ENVELOPE_FIELDS):
      env = {k: env[k] for k in ENVELOPE_FIELDS}
  return env


def to_avro_record(env: Mapping[str, Any], registry: Registry) -> Dict[str, Any]:
  """The envelope as fastavro writes it: ``data`` tagged with its record name.

  The tag matters: two event types with identical fields (an item added to a
  cart and one removed from it, say) are otherwise the same record to fastavro,
  which could not tell which branch of the union to write.
  """
  rec = dict(env)
  rec['data'] = (registry.get(env['event_type']).fullname, env['data'])
  return rec
