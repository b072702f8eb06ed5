"""The schema registry: every event type, its versions and its partition-key rule.

The `.avsc` files beside this module are the single source of truth. Each event
type's file carries, next to its Avro fields, two Sourcebeam attributes:

* ``version``: the schema version of this file (the current one; older versions
  live in ``history/`` as ``<Type>.v<N>.avsc``);
* ``partition_key``: the field whose value orders the event (carts by
  ``user_id``, catalog by ``product_id``, rides by ``rideId``), so the key rule
  is declared once, in the schema, and nowhere else;
* ``event_time_field`` (optional): a data field that carries the event's own
  time, used to repair an envelope that lost its ``event_time``.

``Envelope.avsc`` wraps them: its ``data`` field is a union of every event type,
so one archive file holds any mix of events, and a reader with newer schemas
resolves older files by Avro schema resolution.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import fastavro

SCHEMA_DIR = os.path.dirname(os.path.abspath(__file__))
HISTORY_DIR = os.path.join(SCHEMA_DIR, 'history')
ENVELOPE_FILE = 'Envelope.avsc'

# Avro primitive types used by event fields, mapped to the Python types they accept.
_AVRO_PRIMITIVES = ('string', 'int', 'long', 'double', 'float', 'boolean')


class SchemaError(ValueError):
  """A schema file is missing, malformed or incompatible with another."""


@dataclasses.dataclass(frozen=True)
class Field:
  name: str
  type: str  # one of _AVRO_PRIMITIVES
  nullable: bool
  has_default: bool
  default: Any


@dataclasses.dataclass(frozen=True)
class EventType:
  """One version of one event type."""
  name: str            # e.g. CartItemAdded
  fullname: str        # e.g. sourcebeam.retail.CartItemAdded
  version: int
  partition_key: str   # data field that holds the partition key
  event_time_field: Optional[str]
  fields: Tuple[Field, ...]
  schema: Mapping[str, Any]  # the raw .avsc JSON

  @property
  def field_names(self) -> Tuple[str, ...]:
    return tuple(f.name for f in self.fields)

  def key_of(self, data: Mapping[str, Any]) -> str:
    """The partition key of an event of this type, as the envelope carries it."""
    value = data[self.partition_key]
    if isinstance(value, bool):
      value = int(value)
    return str(value)


def _parse_field(type_name: str, raw: Mapping[str, Any]) -> Field:
  ftype = raw['type']
  nullable = False
  if isinstance(ftype, list):
    non_null = [t for t in ftype if t != 'null']
    if len(non_null) != 1 or len(ftype) > 2:
      raise SchemaError(
          f'{type_name}.{raw["name"]}: only ["null", T] unions are supported')
    nullable, ftype = True, non_null[0]
  if ftype not in _AVRO_PRIMITIVES:
    raise SchemaError(
        f'{type_name}.{raw["name"]}: type {ftype!r} is not one of {_AVRO_PRIMITIVES}')
  return Field(raw['name'], ftype, nullable, 'default' in raw, raw.get('default'))


def _load_event_type(path: str) -> EventType:
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise SchemaError(f'cannot read schema {path}: {e}') from e
  name = raw.get('name')
  for attr in ('namespace', 'version', 'partition_key', 'fields'):
    if attr not in raw:
      raise SchemaError(f'{path}: schema of {name} lacks "{attr}"')
  fields = tuple(_parse_field(name, f) for f in raw['fields'])
  if raw['partition_key'] not in [f.name for f in fields]:
    raise SchemaError(
        f'{path}: partition_key {raw["partition_key"]!r} is not a field of {name}')
  return EventType(
      name=name,
      fullname=f'{raw["namespace"]}.{name}',
      version=int(raw['version']),
      partition_key=raw['partition_key'],
      event_time_field=raw.get('event_time_field'),
      fields=fields,
      schema=raw)


class Registry:
  """Event types by name and version, and the envelope schema that unions them."""

  def __init__(self, schema_dir: str = SCHEMA_DIR):
    self.schema_dir = schema_dir
    self.current: Dict[str, EventType] = {}
    self.versions: Dict[str, Dict[int, EventType]] = {}
    for fname in sorted(os.listdir(schema_dir)):
      if fname.endswith('.avsc') and fname != ENVELOPE_FILE:
        et = _load_event_type(os.path.join(schema_dir, fname))
        self.current[et.name] = et
        self.versions.setdefault(et.name, {})[et.version] = et
    history = os.path.join(schema_dir, 'history')
    if os.path.isdir(history):
      for fname in sorted(os.listdir(history)):
        if fname.endswith('.avsc'):
          et = _load_event_type(os.path.join(history, fname))
          self.versions.setdefault(et.name, {})[et.version] = et
    with open(os.path.join(schema_dir, ENVELOPE_FILE), encoding='utf-8') as f:
      self.envelope_json = json.load(f)
    union = self.envelope_json['fields'][-1]['type']
    missing = sorted(set(et.fullname for et in self.current.values()) - set(union))
    if missing:
      raise SchemaError(
          f'{ENVELOPE_FILE}: data union lacks event types {missing}; add them')
    self.by_fullname = {et.fullname: et for et in self.current.values()}

  @property
  def event_types(self) -> List[str]:
    return sorted(self.current)

  def get(self, name: str, version: Optional[int] = None) -> EventType:
    """An event type by name (and version); KeyError with a clear message if unknown."""
    if name not in self.current:
      raise KeyError(f'unknown event type {name!r}')
    if version is None:
      return self.current[name]
    try:
      return self.versions[name][version]
    except KeyError:
      known = sorted(self.versions[name])
      raise KeyError(
          f'unknown schema version {version} of {name} (known: {known})') from None

  def envelope_schema(self) -> Dict[str, Any]:
    """The envelope with every event type inlined: a complete, parseable Avro schema."""
    env = json.loads(json.dumps(self.envelope_json))
    env['fields'][-1]['type'] = [
        json.loads(json.dumps(self.by_fullname[n].schema))
        for n in self.envelope_json['fields'][-1]['type']
    ]
    return env

  @functools.cached_property
  def parsed_envelope(self):
    return fastavro.parse_schema(self.envelope_schema())


@functools.lru_cache(maxsize=None)
def registry(schema_dir: str = SCHEMA_DIR) -> Registry:
  """The process-wide registry for a schema directory (loaded once)."""
  return Registry(schema_dir)


def partition_key_rules() -> Dict[str, str]:
  """Event type -> the data field that is its partition key."""
  return {name: et.partition_key for name, et in registry().current.items()}
