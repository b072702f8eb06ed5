"""The schema registry: an application's event types, their versions and key rules.

An application keeps its event schemas as ``.avsc`` files in one folder (the
demo application's are in ``demo/schemas/``; see :class:`sourcebeam.App`).
Each event type's file carries, next to its Avro fields, Sourcebeam attributes:

* ``version``: the schema version of this file (the current one; older versions
  live in ``history/`` as ``<Type>.v<N>.avsc``);
* ``partition_key``: the field whose value orders the event (carts by
  ``user_id``, catalog by ``product_id``, rides by ``rideId``), so the key rule
  is declared once, in the schema, and nowhere else;
* ``event_time_field`` (optional): a data field that carries the event's own
  time, used to repair an envelope that lost its ``event_time``;
* ``key_space`` (optional): the name of the sequence its events share. Events
  of one key space and one partition key are numbered 1, 2, 3 ... together and
  ordered together; by default the key space is the partition key field's
  name, so every type keyed by ``user_id`` shares one sequence per user.

The envelope (``Envelope.avsc`` beside this module, the same for every
application) wraps them: its ``data`` field is a union of the registry's event
types, built here from the files (never edited by hand), so one archive file
holds any mix of events and a reader with newer schemas resolves older files by
Avro schema resolution.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

import fastavro

ENVELOPE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'Envelope.avsc')

# Avro primitive types used by event fields, mapped to the Python types they accept.
_AVRO_PRIMITIVES = ('string', 'int', 'long', 'double', 'float', 'boolean')
_NAME_RE = re.compile(r'^[A-Z][A-Za-z0-9]*$')


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
  name: str            # e.g. OrderPlaced
  fullname: str        # e.g. shop.orders.OrderPlaced
  version: int
  partition_key: str   # data field that holds the partition key
  event_time_field: Optional[str]
  key_space: str       # the sequence this type's events share per partition key
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


def _parse_field(type_name: str, raw: Any) -> Field:
  if not isinstance(raw, dict) or not isinstance(raw.get('name'), str) or 'type' not in raw:
    raise SchemaError(f'{type_name}: every field needs a "name" and a "type", got {raw!r}')
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
  if not isinstance(raw, dict) or raw.get('type') != 'record' or not isinstance(name, str):
    raise SchemaError(f'{path}: not an Avro record schema with a "name"')
  if not _NAME_RE.match(name):
    raise SchemaError(f'{path}: event type name {name!r} must be letters and digits, '
                      'starting with a capital (e.g. OrderPlaced)')
  for attr in ('namespace', 'version', 'partition_key', 'fields'):
    if attr not in raw:
      raise SchemaError(f'{path}: schema of {name} lacks "{attr}"')
  if isinstance(raw['version'], bool) or not isinstance(raw['version'], int) or raw['version'] < 1:
    raise SchemaError(f'{path}: "version" of {name} must be a whole number >= 1')
  if not isinstance(raw['fields'], list) or not raw['fields']:
    raise SchemaError(f'{path}: "fields" of {name} must be a non-empty list')
  fields = tuple(_parse_field(name, f) for f in raw['fields'])
  if raw['partition_key'] not in [f.name for f in fields]:
    raise SchemaError(
        f'{path}: partition_key {raw["partition_key"]!r} is not a field of {name}')
  etf = raw.get('event_time_field')
  if etf is not None and etf not in [f.name for f in fields]:
    raise SchemaError(f'{path}: event_time_field {etf!r} is not a field of {name}')
  key_space = raw.get('key_space', raw['partition_key'])
  if not isinstance(key_space, str) or not key_space:
    raise SchemaError(f'{path}: key_space of {name} must be a non-empty string')
  return EventType(
      name=name,
      fullname=f'{raw["namespace"]}.{name}',
      version=raw['version'],
      partition_key=raw['partition_key'],
      event_time_field=etf,
      key_space=key_space,
      fields=fields,
      schema=raw)


class Registry:
  """An application's event types by name and version, and the envelope schema that unions them.

  Plain data, picklable: pipelines ship the registry itself to their workers, so
  a remote worker needs no copy of the schema folder.
  """

  def __init__(self, schema_dir: str):
    self.schema_dir = schema_dir
    self.current: Dict[str, EventType] = {}
    self.versions: Dict[str, Dict[int, EventType]] = {}
    if not os.path.isdir(schema_dir):
      raise SchemaError(f'schema folder {schema_dir} does not exist')
    for fname in sorted(os.listdir(schema_dir)):
      if fname.endswith('.avsc') and fname != os.path.basename(ENVELOPE_FILE):
        et = _load_event_type(os.path.join(schema_dir, fname))
        if et.name in self.current:
          raise SchemaError(f'{schema_dir}: event type {et.name} is defined twice')
        self.current[et.name] = et
        self.versions.setdefault(et.name, {})[et.version] = et
    if not self.current:
      raise SchemaError(f'schema folder {schema_dir} holds no event schemas (*.avsc)')
    history = os.path.join(schema_dir, 'history')
    if os.path.isdir(history):
      for fname in sorted(os.listdir(history)):
        if fname.endswith('.avsc'):
          et = _load_event_type(os.path.join(history, fname))
          self.versions.setdefault(et.name, {})[et.version] = et
    with open(ENVELOPE_FILE, encoding='utf-8') as f:
      self.envelope_json = json.load(f)
    self.by_fullname = {et.fullname: et for et in self.current.values()}
    if len(self.by_fullname) != len(self.current):
      raise SchemaError(f'{schema_dir}: two event types share a full name')
    # The envelope's data union: every current type, in a fixed order (by full name).
    self.envelope_json['fields'][-1]['type'] = sorted(self.by_fullname)

  @property
  def event_types(self) -> List[str]:
    return sorted(self.current)

  def key_spaces(self) -> Dict[str, FrozenSet[str]]:
    """Key space -> the event types that share its per-key sequence."""
    out: Dict[str, set] = {}
    for et in self.current.values():
      out.setdefault(et.key_space, set()).add(et.name)
    return {k: frozenset(v) for k, v in sorted(out.items())}

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

  @functools.cached_property
  def fingerprint(self) -> str:
    """A digest of the envelope schema: registries with equal fingerprints read and write alike."""
    return hashlib.sha1(json.dumps(self.envelope_schema(), sort_keys=True).encode()).hexdigest()

  def ordering_key(self, env: Mapping[str, Any]) -> str:
    """The key an event is numbered and ordered under: its key space and partition key,
    ``user_id:u-1`` (sequences are per key space; the space's name has no ``:``)."""
    et = self.current.get(env.get('event_type'))
    return f'{et.key_space if et else ""}:{env["partition_key"]}'

  def partition_key_rules(self) -> Dict[str, str]:
    """Event type -> the data field that is its partition key."""
    return {name: et.partition_key for name, et in self.current.items()}

  def __getstate__(self):
    state = dict(self.__dict__)
    state.pop('parsed_envelope', None)  # rebuilt on first use: smaller pickles
    return state


def split_ordering_key(ordering_key: Any) -> Tuple[Optional[str], Any]:
  """``(key space, partition key)`` of a :meth:`Registry.ordering_key` (``(None, key)`` for a
  plain key)."""
  if isinstance(ordering_key, str) and ':' in ordering_key:
    space, _, key = ordering_key.partition(':')
    return space, key
  return None, ordering_key


def report_key(record: Mapping[str, Any]) -> Dict[str, Any]:
  """A report keyed by ordering key (a status, a dead letter...) with ``key`` the partition
  key again and ``key_space`` beside it."""
  space, key = split_ordering_key(record.get('key'))
  if space is None:
    return dict(record)
  return dict(record, key=key, key_space=space)


@functools.lru_cache(maxsize=None)
def registry(schema_dir: str) -> Registry:
  """The process-wide registry for a schema directory (loaded once)."""
  return Registry(os.path.abspath(schema_dir))
