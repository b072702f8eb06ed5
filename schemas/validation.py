"""Validate and repair one raw ("tech-debt") event: plain Python, no Beam.

Everyone's first job is to fix the stream. :func:`publish_raw` turns one raw JSON
line into either a clean published envelope or a dead letter with a reason a
person can act on. It never raises on bad input.

What it repairs (and records in the returned ``repairs`` list):

* ``partition_key`` missing or empty: derived from the event type's key rule;
* ``event_time`` with any UTC offset: normalised to UTC; without an offset:
  taken as UTC; given as epoch seconds or milliseconds: converted;
* ``event_time`` missing: taken from the event's own time field where its schema
  names one (``eventTime`` of rides, ``startTime`` of fares);
* time fields inside ``data`` (``eventTime``, ``startTime``…) given as ISO-8601
  strings: converted to epoch milliseconds;
* numbers sent as strings (``"quantity": "2"``) and whole floats for integer
  fields (``2.0``): converted;
* ``event_id`` missing: a UUID derived from the raw line, so publishing the same
  raw line twice gives the same id;
* ``schema_version`` missing: the current version of the event type.

What it refuses (dead letter): malformed JSON, non-UTF-8 bytes, a line over the
size limit, unknown event type or schema version, missing or unexpected fields
(in the envelope or in ``data``), wrong types, a ``partition_key`` that
disagrees with the key rule (its sequence numbers would belong to another key),
a sequence that is not a whole number >= 1, unparseable timestamps and absurd
ones (before 2000-01-01 or from 2100 on).
"""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from typing import Any, Dict, List, Optional, Tuple, Union

from orjson import JSONDecodeError as _OrjsonError, loads as _orjson_loads

from sourcebeam.schemas.envelope import ENVELOPE_FIELDS, Envelope, iso_to_millis
from sourcebeam.schemas.registry import EventType, Field, Registry

DEFAULT_MAX_EVENT_BYTES = 64 * 1024
MIN_EVENT_TIME = 946_684_800_000    # 2000-01-01T00:00:00Z
MAX_EVENT_TIME = 4_102_444_800_000  # 2100-01-01T00:00:00Z
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
LONG_MIN, LONG_MAX = -(2**63), 2**63 - 1
_ID_NAMESPACE = uuid.UUID('5f1c2a3e-8e55-4a8e-9d7b-0b6a8c5e1d21')

DeadLetter = Dict[str, Any]


class Invalid(ValueError):
  """A raw event that cannot be published; the message is the dead letter's reason."""


def dead_letter(raw: Union[bytes, str], reason: str,
                source: Optional[str] = None) -> DeadLetter:
  """A dead letter keeps the raw line whole: as text, or base64 if not UTF-8."""
  dl: DeadLetter = {'reason': reason}
  if isinstance(raw, bytes):
    try:
      dl['raw'] = raw.decode('utf-8')
    except UnicodeDecodeError:
      dl['raw'] = raw.decode('utf-8', 'backslashreplace')
      dl['raw_base64'] = base64.b64encode(raw).decode('ascii')
  else:
    dl['raw'] = raw
  if source is not None:
    dl['source'] = source
  return dl


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_time(value: Any, what: str, repairs: List[str]) -> int:
  """A timestamp in any accepted form to epoch millis UTC, or Invalid."""
  if isinstance(value, str):
    text = value.strip()
    try:
      millis = iso_to_millis(text)
    except ValueError:
      raise Invalid(f'{what} {value!r} is not an ISO-8601 timestamp') from None
    if not (text.endswith('Z') or text.endswith('+00:00')):
      repairs.append(f'{what} normalised to UTC')
  elif _is_number(value):
    if isinstance(value, float) and not math.isfinite(value):
      raise Invalid(f'{what} {value!r} is not a timestamp')
    if abs(value) < 100_000_000_000:  # before 1973 in millis: these are seconds
      millis = int(round(value * 1000))
      repairs.append(f'{what} converted from epoch seconds')
    else:
      millis = int(value)
  else:
    raise Invalid(f'{what} must be an ISO-8601 string or epoch milliseconds, '
                  f'got {type(value).__name__}')
  if not MIN_EVENT_TIME <= millis < MAX_EVENT_TIME:
    raise Invalid(f'{what} {value!r} is absurd: outside 2000-01-01 .. 2100-01-01')
  return millis


def _coerce(field: Field, value: Any, where: str, repairs: List[str],
            time_field: bool) -> Any:
  """Check one data value against its Avro type, applying the documented repairs."""
  if value is None:
    if field.nullable:
      return None
    raise Invalid(f'{where} is null but required')
  t = field.type
  if t == 'string':
    if isinstance(value, str):
      return value
    raise Invalid(f'{where} must be a string, got {type(value).__name__}')
  if t == 'boolean':
    if isinstance(value, bool):
      return value
    raise Invalid(f'{where} must be true or false, got {value!r}')
  if t in ('int', 'long'):
    if time_field and isinstance(value, str):
      try:
        millis = iso_to_millis(value)
      except ValueError:
        raise Invalid(f'{where} {value!r} is not an ISO-8601 timestamp') from None
      repairs.append(f'{where} converted from ISO-8601')
      return millis
    if isinstance(value, str):
      try:
        value = int(value.strip())
      except ValueError:
        raise Invalid(f'{where} must be a whole number, got {value!r}') from None
      repairs.append(f'{where} converted from a string')
    elif isinstance(value, float) and value.is_integer():
      value = int(value)
      repairs.append(f'{where} converted from a whole float')
    if not isinstance(value, int) or isinstance(value, bool):
      raise Invalid(f'{where} must be a whole number, got {value!r}')
    lo, hi = (INT_MIN, INT_MAX) if t == 'int' else (LONG_MIN, LONG_MAX)
    if not lo <= value <= hi:
      raise Invalid(f'{where} {value} does not fit in an Avro {t}')
    return value
  # double / float
  if isinstance(value, str):
    try:
      value = float(value.strip())
    except ValueError:
      raise Invalid(f'{where} must be a number, got {value!r}') from None
    repairs.append(f'{where} converted from a string')
  if not _is_number(value):
    raise Invalid(f'{where} must be a number, got {type(value).__name__}')
  value = float(value)
  if not math.isfinite(value):
    raise Invalid(f'{where} must be a finite number, got {value!r}')
  return value


def validate_data(et: EventType, data: Any, repairs: List[str]) -> Dict[str, Any]:
  """``data`` checked against one version of its event type."""
  if not isinstance(data, dict):
    raise Invalid(f'data of {et.name} must be an object, got {type(data).__name__}')
  extra = sorted(set(data) - set(et.field_names))
  if extra:
    raise Invalid(f'data of {et.name} v{et.version} has unexpected field(s) {extra}')
  out = {}
  for f in et.fields:
    where = f'data.{f.name}'
    if f.name not in data:
      if f.has_default:
        out[f.name] = f.default
        continue
      raise Invalid(f'data of {et.name} v{et.version} is missing field {f.name!r}')
    out[f.name] = _coerce(f, data[f.name], where, repairs,
                          time_field=(f.name == et.event_time_field))
  return out


def upgrade_data(old: EventType, new: EventType, data: Dict[str, Any]) -> Dict[str, Any]:
  """Data written with an older version, as the current version reads it."""
  if old.version == new.version:
    return data
  out = {}
  for f in new.fields:
    if f.name in data:
      out[f.name] = data[f.name]
    elif f.has_default:
      out[f.name] = f.default
    else:
      raise Invalid(f'{new.name} v{new.version} cannot read v{old.version}: '
                    f'field {f.name!r} is new and has no default')
  return out


def _sequence(value: Any, repairs: List[str]) -> int:
  if isinstance(value, str):
    try:
      value = int(value.strip())
    except ValueError:
      raise Invalid(f'sequence must be a whole number >= 1, got {value!r}') from None
    repairs.append('sequence converted from a string')
  if isinstance(value, float) and value.is_integer():
    value = int(value)
    repairs.append('sequence converted from a whole float')
  if isinstance(value, bool) or not isinstance(value, int):
    raise Invalid(f'sequence must be a whole number >= 1, got {value!r}')
  if value < 1:
    raise Invalid(f'sequence must be >= 1 (per-key sequences start at 1), got {value}')
  if value > LONG_MAX:
    raise Invalid(f'sequence {value} does not fit in an Avro long')
  return value


def validate_envelope(obj: Any, raw: bytes, repairs: List[str], reg: Registry,
                      require_sequence: bool = True) -> Envelope:
  """A decoded raw JSON object to a published envelope of one of ``reg``'s types, or Invalid.

  ``require_sequence=False`` lets an event without a ``sequence`` through (as None): the
  publishing step's resequencer then orders such a stream by event time, or says why not.
  """
  if not isinstance(obj, dict):
    raise Invalid(f'an event must be a JSON object, got {type(obj).__name__}')
  extra = sorted(set(obj) - set(ENVELOPE_FIELDS))
  if extra:
    raise Invalid(f'unexpected envelope field(s) {extra}; '
                  f'the envelope has {list(ENVELOPE_FIELDS)}')
  event_type = obj.get('event_type')
  if not isinstance(event_type, str) or not event_type:
    raise Invalid('event_type is missing')
  if event_type not in reg.current:
    raise Invalid(f'unknown event type {event_type!r}; known: {reg.event_types}')
  version = obj.get('schema_version')
  if version is None:
    version = reg.current[event_type].version
    repairs.append('schema_version set to the current version')
  if isinstance(version, bool) or not isinstance(version, int):
    raise Invalid(f'schema_version must be a whole number, got {version!r}')
  try:
    written = reg.get(event_type, version)
  except KeyError as e:
    raise Invalid(str(e.args[0])) from None
  current = reg.current[event_type]
  if 'data' not in obj:
    raise Invalid('data is missing')
  data = upgrade_data(written, current, validate_data(written, obj['data'], repairs))

  key = current.key_of(data)
  given_key = obj.get('partition_key')
  if given_key is None or given_key == '':
    repairs.append(f'partition_key filled from {current.partition_key}')
  elif not isinstance(given_key, str):
    raise Invalid(f'partition_key must be a string, got {type(given_key).__name__}')
  elif given_key != key:
    raise Invalid(f'partition_key {given_key!r} disagrees with the key rule of '
                  f'{event_type} ({current.partition_key} = {key!r})')

  if 'sequence' not in obj or obj['sequence'] is None:
    if require_sequence:
      raise Invalid('sequence is missing (per-key sequence numbers start at 1)')
    sequence = None
  else:
    sequence = _sequence(obj['sequence'], repairs)
  raw_sequence = obj.get('raw_sequence')
  if raw_sequence is not None:
    raw_sequence = _sequence(raw_sequence, repairs)

  if obj.get('event_time') is not None:
    event_time = parse_time(obj['event_time'], 'event_time', repairs)
  elif current.event_time_field:
    event_time = parse_time(data[current.event_time_field], 'event_time', repairs)
    repairs.append(f'event_time taken from data.{current.event_time_field}')
  else:
    raise Invalid('event_time is missing')

  origin = obj.get('origin')
  if not isinstance(origin, str) or not origin.strip():
    raise Invalid('origin is missing: say who or what decided or observed this event')
  follows_from = obj.get('follows_from')
  if follows_from is not None and not isinstance(follows_from, str):
    raise Invalid(f'follows_from must be an event_id string, got {follows_from!r}')

  event_id = obj.get('event_id')
  if event_id is None or event_id == '':
    event_id = str(uuid.uuid5(_ID_NAMESPACE, raw.decode('utf-8')))
    repairs.append('event_id derived from the raw line')
  elif not isinstance(event_id, str):
    raise Invalid(f'event_id must be a string, got {type(event_id).__name__}')

  return {
      'event_id': event_id,
      'event_type': event_type,
      'schema_version': current.version,
      'partition_key': key,
      'sequence': sequence,
      'event_time': event_time,
      'origin': origin,
      'follows_from': follows_from,
      'raw_sequence': raw_sequence,
      'data': data,
  }


def parse_json(text: Union[bytes, str]) -> Any:
  """One raw line's JSON value: the publishing boundary's parser.

  orjson (~3x faster than the standard library here) parses the lines it reads exactly
  as ``json.loads`` does; the others go to ``json.loads``: a line orjson refuses (the
  standard library accepts ``NaN``, ``1e400``, lone surrogates, and raises the error
  the dead letter's reason has always quoted) and a line with a run of 19 or more
  digits (orjson turns integers beyond 64 bits into floats). So what parses, to what
  value, and every reason are the standard library's.
  """
  if _LONG_DIGITS(text) is None:
    try:
      return _orjson_loads(text)
    except _OrjsonError:
      pass
  return json.loads(text)


_LONG_DIGITS = re.compile(r'\d{19}').search


def publish_raw(raw: Union[bytes, str],
                reg: Registry,
                source: Optional[str] = None,
                max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
                require_sequence: bool = True
                ) -> Tuple[Optional[Envelope], Optional[DeadLetter], List[str]]:
  """One raw line to ``(envelope, None, repairs)`` or ``(None, dead_letter, [])``, checked
  against the application's schemas in ``reg``."""
  raw_bytes = raw.encode('utf-8') if isinstance(raw, str) else raw
  repairs: List[str] = []
  try:
    if len(raw_bytes) > max_event_bytes:
      raise Invalid(f'event is {len(raw_bytes)} bytes, over the limit of '
                    f'{max_event_bytes} bytes')
    try:
      text = raw_bytes.decode('utf-8')
    except UnicodeDecodeError as e:
      raise Invalid(f'line is not UTF-8 (byte {e.start}: {raw_bytes[e.start:e.start + 1]!r})') from None
    if not text.strip():
      raise Invalid('blank line')
    try:
      obj = parse_json(text)
    except ValueError as e:
      raise Invalid(f'malformed JSON: {e}') from None
    env = validate_envelope(obj, raw_bytes, repairs, reg, require_sequence)
    return env, None, repairs
  except Invalid as e:
    return None, dead_letter(raw_bytes, str(e), source), []
  except RecursionError:
    return None, dead_letter(raw_bytes, 'malformed JSON: nested too deeply', source), []
