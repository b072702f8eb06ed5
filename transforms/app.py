"""An application: a team's event schemas and the consumers that read them.

Sourcebeam runs any application with the same commands, live and in replay, on
every runner; the demo (retail, taxi, riders) is one application among others::

    from sourcebeam import App

    app = App('orders', schemas='schemas')          # the folder of .avsc files, beside this module
    app.view('orders', handler=OrderStatus(), event_types=['OrderPlaced', 'OrderShipped'])
    app.projection('shipments', handler=Shipments(), event_types=['OrderShipped'])
    app.consumer('open_per_customer', OpenOrdersPerCustomer())

Three kinds of consumer, registered by name (names are unique in an app and
name the outputs: ``OUT/<name>.jsonl``; a ``/`` in a name makes a folder):

* a **view** is per partition key: its handler (``initial_state(key)`` and
  ``apply(state, event) -> (new_state, outputs)``, the
  :class:`~sourcebeam.transforms.ordering_core.Handler` protocol) is applied to
  each key's events of ``event_types`` in sequence order, and the view is the
  latest state per key (outputs are ignored). A bounded run writes one line per
  key, ``{"key": K, "state": S}`` (or what ``record(key, state, event)``
  returns: the last applied event is at hand for ``as_of`` fields); a live run
  keeps it in the view store, served at ``GET /views/<name>/<key>``;
* a **projection** is per partition key too, and what counts is every output
  its handler returns: ``{"key": K, "output": O}`` lines, or Kafka messages live;
* a **consumer** is any ``PTransform`` over the published events (envelope
  dicts timestamped at their event time), returning a PCollection or a dict of
  named PCollections: joins across partition keys, CRDT aggregates.

Per-key order: events of one key space (the event types whose schemas share a
``key_space``, by default those keyed by the same field) are ordered once per
key, and each view or projection is then handed the events of its types, in
that order; so a view of some of a key's types never waits on a gap made by
types it does not read. A handler that raises on an event does not stop the
others: the event is reported as unprocessed with the consumer's name and the
error, and that consumer keeps its state from before the event.

Registration checks everything it can at once and raises
:class:`~sourcebeam.transforms.errors.ConfigError` naming the problem (a name
used twice, an event type the schemas do not have, a handler without
``initial_state``/``apply``), so ``run.py --app`` refuses a broken app before
any pipeline starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Mapping, Optional, Tuple, Union

import apache_beam as beam

from sourcebeam.schemas.envelope import Envelope, make_envelope
from sourcebeam.schemas.registry import Registry, SchemaError
from sourcebeam.schemas.validation import DEFAULT_MAX_EVENT_BYTES, publish_raw
from sourcebeam.transforms.errors import ConfigError

__all__ = ['App', 'View', 'Projection', 'Consumer', 'KeySpacePlan', 'default_record']

_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$')
_APP_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$')
# Files every run writes beside the consumers' outputs: no consumer may take their names.
RESERVED_NAMES = frozenset({'summary', 'unprocessed', 'corrupt_files', 'published', 'dead_letters',
                            'events', 'views', 'positions', 'health'})

Record = Callable[[str, Any, Envelope], Any]


def default_record(key: str, state: Any, event: Envelope) -> Dict[str, Any]:
  """A view's line and stored value unless the view says otherwise: ``{"key", "state"}``."""
  return {'key': key, 'state': state}


@dataclasses.dataclass(frozen=True)
class View:
  """A per-key view: the latest handler state per key (see the module docstring)."""
  name: str
  handler: Any
  event_types: FrozenSet[str]
  key_space: str
  record: Record = default_record
  parquet_schema: Any = None            # a pyarrow.Schema: also write OUT/<name>.parquet
  index: Optional[str] = None           # a field of the record the view API can list by
  route: Optional[str] = None           # an extra API path, e.g. '/carts/{key}'

  kind = 'view'


@dataclasses.dataclass(frozen=True)
class Projection:
  """A per-key projection: every output of the handler, in each key's order."""
  name: str
  handler: Any
  event_types: FrozenSet[str]
  key_space: str
  kind = 'projection'


@dataclasses.dataclass(frozen=True)
class Consumer:
  """Any transform over the published events (joins across keys, CRDT aggregates).

  ``event_types``: the types it reads (None: every type); a replay reads only
  those for it. ``live``: the outputs a live run sends to Kafka, as a key
  function per output (``{'joined': key_fn}``, or one function for a consumer
  that returns a single PCollection).
  """
  name: str
  transform: beam.PTransform
  event_types: Optional[FrozenSet[str]] = None
  live: Union[None, Callable[[Any], Any], Mapping[str, Callable[[Any], Any]]] = None
  kind = 'consumer'


PerKey = Union[View, Projection]


@dataclasses.dataclass(frozen=True)
class KeySpacePlan:
  """The per-key consumers of one key space, ordered together once per key."""
  name: str
  event_types: FrozenSet[str]     # every type of the key space (what is ordered)
  consumers: Tuple[PerKey, ...]   # views and projections reading some of them
  ids: Tuple[int, ...]            # each consumer's position in App.per_key


def _caller_dir(depth: int = 2) -> str:
  """The folder of the module that called App(...): relative schema folders are resolved there."""
  frame = inspect.stack()[depth]
  filename = frame.filename
  if not filename or filename.startswith('<'):
    return os.getcwd()
  return os.path.dirname(os.path.abspath(filename))


class App:
  """An application: its event schemas (``schemas=DIR``) and its consumers.

  ``schemas`` is a folder of ``.avsc`` files in the format of Sourcebeam's
  schemas (``version``, ``partition_key``, optional ``event_time_field`` and
  ``key_space``; older versions in ``history/``); a relative folder is
  resolved against the folder of the module that creates the app. The
  envelope's ``data`` union is built from them.
  """

  def __init__(self, name: str, schemas: str):
    if not isinstance(name, str) or not _APP_NAME_RE.match(name):
      raise ConfigError(f'app name {name!r} must be 1-64 letters, digits, ".", "_" or "-"')
    if not isinstance(schemas, (str, os.PathLike)):
      raise ConfigError(f'app {name}: schemas must be a folder path, got {type(schemas).__name__}')
    folder = os.fspath(schemas)
    if not os.path.isabs(folder):
      folder = os.path.join(_caller_dir(), folder)
    try:
      self.registry = Registry(os.path.normpath(folder))
    except SchemaError as e:
      raise ConfigError(f'app {name}: {e}') from None
    self.name = name
    self._consumers: Dict[str, Union[View, Projection, Consumer]] = {}

  def __repr__(self) -> str:
    return f'App({self.name!r}, {len(self.registry.current)} event types, {list(self._consumers)})'

  # --- registration --------------------------------------------------------------------

  def view(self, name: str, *, handler: Any, event_types: Iterable[str],
           record: Optional[Record] = None, parquet_schema: Any = None,
           index: Optional[str] = None, route: Optional[str] = None) -> View:
    """Register a per-key view; see the module docstring. ``record(key, state, event)``
    shapes its line and stored value (default ``{"key", "state"}``); ``parquet_schema``
    (a pyarrow schema of the records) also writes ``OUT/<name>.parquet``; ``index`` names
    a record field the view API can list keys by (``GET /views/<name>?<index>=V``);
    ``route`` an extra API path for one key (``'/carts/{key}'``) or, with ``index``, for
    the listing (``'/products'``)."""
    types, space = self._per_key_types(name, handler, event_types)
    if record is not None and not callable(record):
      raise ConfigError(f'view {name}: record must be a function (key, state, event) -> record')
    if index is not None and (not isinstance(index, str) or not index.isidentifier()):
      raise ConfigError(f'view {name}: index must be the name of a record field')
    if route is not None:
      self._check_route(name, route, index)
    return self._add(View(name, handler, types, space, record or default_record,
                          parquet_schema, index, route))

  def projection(self, name: str, *, handler: Any, event_types: Iterable[str]) -> Projection:
    """Register a per-key projection: every output of ``handler.apply``, per key in order."""
    types, space = self._per_key_types(name, handler, event_types)
    return self._add(Projection(name, handler, types, space))

  def consumer(self, name: str, transform: beam.PTransform, *,
               event_types: Optional[Iterable[str]] = None,
               live: Union[None, Callable[[Any], Any], Mapping[str, Callable[[Any], Any]]] = None
               ) -> Consumer:
    """Register any PTransform over the app's published events (timestamped envelope dicts)."""
    self._check_name(name)
    if not isinstance(transform, beam.PTransform):
      raise ConfigError(f'consumer {name}: {transform!r} is not a Beam PTransform')
    types = None if event_types is None else self._check_types(name, event_types)
    if live is not None and not callable(live) and not (
        isinstance(live, Mapping) and all(callable(f) for f in live.values())):
      raise ConfigError(f'consumer {name}: live must be a key function or a dict of them per output')
    return self._add(Consumer(name, transform, types, live))

  def _add(self, consumer):
    self._consumers[consumer.name] = consumer
    return consumer

  def _check_name(self, name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 200:
      raise ConfigError(f'app {self.name}: consumer name {name!r} must be letters, digits, '
                        '".", "_" or "-", with "/" between parts')
    if name in self._consumers:
      raise ConfigError(f'app {self.name}: two consumers are named {name!r}')
    if name.split('/')[0] in RESERVED_NAMES or name in RESERVED_NAMES:
      raise ConfigError(f'app {self.name}: {name!r} is a name Sourcebeam\'s own outputs use '
                        f'({", ".join(sorted(RESERVED_NAMES))})')

  def _check_types(self, name: str, event_types: Iterable[str]) -> FrozenSet[str]:
    if isinstance(event_types, str) or not isinstance(event_types, Iterable):
      raise ConfigError(f'{name}: event_types must be a list of event type names')
    types = frozenset(event_types)
    if not types:
      raise ConfigError(f'{name}: event_types is empty')
    unknown = sorted(t for t in types if t not in self.registry.current)
    if unknown:
      raise ConfigError(f'{name}: event type(s) {unknown} are not in app {self.name}\'s schemas '
                        f'({", ".join(self.registry.event_types)})')
    return types

  def _per_key_types(self, name: str, handler: Any, event_types: Iterable[str]
                     ) -> Tuple[FrozenSet[str], str]:
    self._check_name(name)
    for method in ('initial_state', 'apply'):
      if not callable(getattr(handler, method, None)):
        raise ConfigError(f'{name}: handler {type(handler).__name__} has no {method}() '
                          '(a handler has initial_state(key) and apply(state, event))')
    types = self._check_types(name, event_types)
    spaces = {self.registry.current[t].key_space for t in types}
    if len(spaces) > 1:
      by_space = {s: sorted(t for t in types if self.registry.current[t].key_space == s)
                  for s in sorted(spaces)}
      raise ConfigError(f'{name}: event types of different key spaces {by_space}: a per-key '
                        'consumer reads one key space (use app.consumer to join across keys)')
    return types, spaces.pop()

  @staticmethod
  def _check_route(name: str, route: str, index: Optional[str]) -> None:
    if not isinstance(route, str) or not route.startswith('/') or route.startswith('/views'):
      raise ConfigError(f'view {name}: route must be a path like "/carts/{{key}}", not under /views')
    segments = route.split('/')[1:]
    if route.count('{') != segments.count('{key}') or segments.count('{key}') > 1 or not all(
        segments):
      raise ConfigError(f'view {name}: route {route!r} may hold "{{key}}" once, as a whole '
                        'path segment, like "/users/{key}/cart"')
    if '{key}' not in segments and index is None:
      raise ConfigError(f'view {name}: route {route!r} needs a "{{key}}" segment (or an index '
                        'to list by)')

  # --- what was registered ---------------------------------------------------------------

  @property
  def consumers(self) -> Tuple[Union[View, Projection, Consumer], ...]:
    return tuple(self._consumers.values())

  @property
  def views(self) -> Tuple[View, ...]:
    return tuple(c for c in self._consumers.values() if isinstance(c, View))

  @property
  def projections(self) -> Tuple[Projection, ...]:
    return tuple(c for c in self._consumers.values() if isinstance(c, Projection))

  @property
  def transforms(self) -> Tuple[Consumer, ...]:
    return tuple(c for c in self._consumers.values() if isinstance(c, Consumer))

  @property
  def per_key(self) -> Tuple[PerKey, ...]:
    """Views and projections, in registration order (their ids in per-key outputs)."""
    return tuple(c for c in self._consumers.values() if isinstance(c, (View, Projection)))

  def key_space_plans(self) -> Tuple[KeySpacePlan, ...]:
    """One plan per key space that some view or projection reads."""
    spaces = self.registry.key_spaces()
    plans: Dict[str, List[Tuple[int, PerKey]]] = {}
    for i, c in enumerate(self.per_key):
      plans.setdefault(c.key_space, []).append((i, c))
    return tuple(KeySpacePlan(space, spaces[space], tuple(c for _, c in members),
                              tuple(i for i, _ in members))
                 for space, members in sorted(plans.items()))

  def consumer_event_types(self) -> Optional[FrozenSet[str]]:
    """The types the transforms read (None: some transform reads every type)."""
    types: set = set()
    for c in self.transforms:
      if c.event_types is None:
        return None
      types |= c.event_types
    return frozenset(types)

  def read_types(self) -> FrozenSet[str]:
    """Every event type some consumer of the app reads."""
    consumer = self.consumer_event_types()
    if consumer is None:
      return frozenset(self.registry.current)
    return frozenset().union(consumer, *(c.event_types for c in self.per_key))

  def get(self, name: str) -> Union[View, Projection, Consumer]:
    try:
      return self._consumers[name]
    except KeyError:
      raise ConfigError(f'app {self.name} has no consumer {name!r} '
                        f'(it has: {", ".join(self._consumers) or "none"})') from None

  # --- events ------------------------------------------------------------------------------

  def envelope(self, event_type: str, data: Mapping[str, Any], **fields) -> Envelope:
    """A published envelope of one of the app's types (``event_id``, ``sequence``,
    ``event_time`` in epoch millis and ``origin`` are required keywords)."""
    return make_envelope(self.registry, event_type, data, **fields)

  def publish(self, raw: Union[bytes, str], source: Optional[str] = None,
              max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES):
    """The publishing boundary for one raw line: ``(envelope, dead_letter, repairs)``."""
    return publish_raw(raw, self.registry, source, max_event_bytes)
