"""Convergent replicated data types (CRDTs) for aggregates that span partitions.

The talk's advice for joins and aggregates across partition keys: compute a
partial aggregate wherever the events are (one partition, one region, one
worker) and *merge* the partials, in any order, any number of times. A
state-based CRDT makes that safe: ``merge`` is commutative, associative and
idempotent, so a Beam combiner may merge accumulators in whatever tree shape
the runner picks, and a retried bundle that merges the same partial twice
changes nothing.

Every type here is a plain, immutable Python value (hashable, comparable by
value) with a pure ``merge(other)`` that returns a new value, ``value()`` for
what the aggregate means, and mutators that return a new value:

* :class:`GCounter`: grow-only counter, one count per replica.
* :class:`PNCounter`: a counter that goes up and down (two G-Counters).
* :class:`ORSet`: observed-remove set; a remove cancels only the adds it has
  seen, so a concurrent add wins.
* :class:`QuantityORSet`: an OR-Set whose adds carry quantities (cart
  contents that two regions edit and later merge).
* :class:`LWWRegister`: last-writer-wins register with a deterministic
  tie-break (timestamp, then replica, then the value's canonical form).

:class:`CRDTCoder` encodes any of them deterministically (registered for each
type), and :class:`MergeCRDTs` is the ``CombineFn`` that merges them.
Elements, replicas, tags and register values must be JSON scalars (str, int,
float, bool, None) or tuples of them: that is what makes the encoding
canonical. Values that Python holds equal (``1``, ``1.0``, ``True``) are one
element of a set: do not mix them in one ORSet, or replicas may converge to the
same set spelled differently.
"""

from __future__ import annotations

import functools
import json
from typing import (Any, Dict, FrozenSet, Iterable, Mapping, Optional, Tuple,
                    Type, TypeVar, Union)

import apache_beam as beam
from apache_beam import coders

Scalar = Union[str, int, float, bool, None, tuple]
T = TypeVar('T', bound='CRDT')


def _canon(x: Any) -> Any:
  """A JSON-able canonical form of an element (tuples become tagged lists)."""
  if isinstance(x, tuple):
    return {'t': [_canon(i) for i in x]}
  if x is None or isinstance(x, (str, int, float, bool)):
    return x
  raise TypeError(
      f'CRDT elements must be JSON scalars or tuples of them, not {type(x).__name__}')


def _uncanon(x: Any) -> Any:
  if isinstance(x, dict):
    return tuple(_uncanon(i) for i in x['t'])
  return x


# Items a cached key may hold: equal values of one of these types have one JSON spelling (not
# floats: -0.0 == 0.0).
_FLAT = frozenset((str, int, bool, type(None)))


def _sort_key(x: Any) -> str:
  """A total order over mixed elements: their canonical JSON text."""
  if type(x) is str:  # the usual element (product ids): cached, the same text
    return _str_sort_key(x)
  if type(x) is tuple and all(type(i) in _FLAT for i in x):
    # A cart's adds, (product, tag, quantity): sorted again at every state write.
    return _flat_tuple_sort_key(x, tuple(map(type, x)))
  return json.dumps(_canon(x), sort_keys=True)


@functools.lru_cache(maxsize=1 << 16)
def _str_sort_key(x: str) -> str:
  """``_sort_key`` of a str, cached: carts sort the same product ids over and over.

  Keyed by str only, so values Python holds equal but spells differently
  (``1``, ``True``) never share an entry.
  """
  return json.dumps(x, sort_keys=True)


@functools.lru_cache(maxsize=1 << 16)
def _flat_tuple_sort_key(x: tuple, types: tuple) -> str:
  """``_sort_key`` of a tuple of strs, ints, bools and Nones, cached. Keyed by the items' types
  too: ``(1, 'a')`` and ``(True, 'a')`` are equal to Python but not the same JSON."""
  return json.dumps(_canon(x), sort_keys=True)


class CRDT:
  """Common behaviour: value equality, hashing, a readable repr."""

  __slots__ = ()

  def _state(self) -> tuple:
    raise NotImplementedError

  def merge(self: T, other: T) -> T:
    raise NotImplementedError

  def __eq__(self, other: object) -> bool:
    return type(self) is type(other) and self._state() == other._state()  # type: ignore[attr-defined]

  def __hash__(self) -> int:
    return hash((type(self).__name__, self._state()))

  def __setattr__(self, name, value):
    raise AttributeError(f'{type(self).__name__} is immutable')

  def _init(self, **fields) -> None:
    for k, v in fields.items():
      object.__setattr__(self, k, v)

  def __reduce__(self):
    return (_from_canonical, (to_canonical(self),))


class GCounter(CRDT):
  """A grow-only counter: each replica counts its own increments; merge takes the max."""

  __slots__ = ('_counts',)

  def __init__(self, counts: Optional[Mapping[Scalar, int]] = None):
    counts = dict(counts or {})
    for r, n in counts.items():
      _canon(r)
      if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f'GCounter count for {r!r} must be an int >= 0, not {n!r}')
    self._init(_counts=tuple(sorted(
        ((r, n) for r, n in counts.items() if n), key=lambda rn: _sort_key(rn[0]))))

  def _state(self) -> tuple:
    return self._counts

  @property
  def counts(self) -> Dict[Scalar, int]:
    return dict(self._counts)

  def increment(self, replica: Scalar, n: int = 1) -> 'GCounter':
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
      raise ValueError(f'a GCounter only grows: increment by {n!r} is not allowed')
    counts = self.counts
    counts[replica] = counts.get(replica, 0) + n
    return GCounter(counts)

  def merge(self, other: 'GCounter') -> 'GCounter':
    counts = self.counts
    for r, n in other._counts:
      counts[r] = max(counts.get(r, 0), n)
    return GCounter(counts)

  def value(self) -> int:
    return sum(n for _, n in self._counts)

  def __repr__(self) -> str:
    return f'GCounter({self.counts!r})'


class PNCounter(CRDT):
  """A counter that goes up and down: increments and decrements as two G-Counters."""

  __slots__ = ('p', 'n')

  def __init__(self, p: Optional[GCounter] = None, n: Optional[GCounter] = None):
    self._init(p=p or GCounter(), n=n or GCounter())

  def _state(self) -> tuple:
    return (self.p._state(), self.n._state())

  def increment(self, replica: Scalar, n: int = 1) -> 'PNCounter':
    return PNCounter(self.p.increment(replica, n), self.n)

  def decrement(self, replica: Scalar, n: int = 1) -> 'PNCounter':
    return PNCounter(self.p, self.n.increment(replica, n))

  def merge(self, other: 'PNCounter') -> 'PNCounter':
    return PNCounter(self.p.merge(other.p), self.n.merge(other.n))

  def value(self) -> int:
    return self.p.value() - self.n.value()

  def __repr__(self) -> str:
    return f'PNCounter(p={self.p.counts!r}, n={self.n.counts!r})'


class ORSet(CRDT):
  """An observed-remove set: every add carries a unique tag; a remove tombstones
  the tags it has observed, so an add it has not seen (a concurrent add) survives.

  ``value()`` is the set of elements with at least one live (added, not
  tombstoned) tag. Tags must be unique per add (an event id is a good tag);
  re-adding with a tombstoned tag has no effect, which is what makes replaying
  an event stream with duplicates harmless.
  """

  __slots__ = ('adds', 'removes')

  def __init__(self, adds: Iterable[Tuple[Scalar, Scalar]] = (),
               removes: Iterable[Tuple[Scalar, Scalar]] = ()):
    adds, removes = frozenset(adds), frozenset(removes)
    for e, t in adds | removes:
      _canon(e), _canon(t)
    self._init(adds=adds, removes=removes)

  def _state(self) -> tuple:
    return (tuple(sorted(self.adds, key=_sort_key)),
            tuple(sorted(self.removes, key=_sort_key)))

  def add(self, element: Scalar, tag: Scalar) -> 'ORSet':
    return ORSet(self.adds | {(element, tag)}, self.removes)

  def remove(self, element: Scalar) -> 'ORSet':
    observed = {(e, t) for e, t in self.adds if e == element}
    return ORSet(self.adds, self.removes | observed)

  def merge(self, other: 'ORSet') -> 'ORSet':
    return ORSet(self.adds | other.adds, self.removes | other.removes)

  def value(self) -> FrozenSet[Scalar]:
    return frozenset(e for e, t in self.adds - self.removes)

  def __contains__(self, element: Scalar) -> bool:
    return element in self.value()

  def __repr__(self) -> str:
    return f'ORSet({sorted(self.value(), key=_sort_key)!r})'


class QuantityORSet(CRDT):
  """An OR-Set whose adds carry a quantity: cart contents that regions merge.

  ``add(element, tag, quantity)`` records a tagged quantity (negative to take
  some away); ``remove(element)`` tombstones every tag of that element it has
  seen (emptying it, as a purchase or a "remove all" does). ``value()`` maps
  each element to the sum of its live quantities, keeping only positive sums.
  Two regions that each add to the same cart and then merge see both adds; a
  remove in one region does not cancel an add it never saw.

  A cart changes one add at a time, so ``add`` and ``remove`` derive the new
  value from this one instead of rebuilding it: only the new add is validated
  (the rest already was), the set of tags and the per-element totals are
  carried over and updated, and ``value()`` is computed at most once per
  value. Values stay immutable; the carried-over parts are private caches that
  never change once set, so equality, hashing and encoding are as before.
  """

  __slots__ = ('adds', 'removes', '_tags', '_totals', '_value')

  def __init__(self, adds: Iterable[Tuple[Scalar, Scalar, int]] = (),
               removes: Iterable[Scalar] = ()):
    adds, removes = frozenset(adds), frozenset(removes)
    for e, t, q in adds:
      _check_quantity_add(e, t, q)
    for t in removes:
      _canon(t)
    self._init(adds=adds, removes=removes, _tags=None, _totals=None, _value=None)

  @classmethod
  def _derived(cls, adds: FrozenSet[Tuple[Scalar, Scalar, int]], removes: FrozenSet[Scalar],
               tags: Optional[FrozenSet[Scalar]],
               totals: Optional[Dict[Scalar, int]]) -> 'QuantityORSet':
    """A value built from validated parts (no re-validation), with its caches."""
    out = object.__new__(cls)
    out._init(adds=adds, removes=removes, _tags=tags, _totals=totals, _value=None)
    return out

  def _state(self) -> tuple:
    return (tuple(sorted(self.adds, key=_sort_key)),
            tuple(sorted(self.removes, key=_sort_key)))

  def _tag_set(self) -> FrozenSet[Scalar]:
    if self._tags is None:
      object.__setattr__(self, '_tags', frozenset(t for _, t, _ in self.adds))
    return self._tags

  def _live_totals(self) -> Dict[Scalar, int]:
    """Sum of live quantities per element, non-positive sums included (a cache: never mutate)."""
    if self._totals is None:
      totals: Dict[Scalar, int] = {}
      for e, t, q in self.adds:
        if t not in self.removes:
          totals[e] = totals.get(e, 0) + q
      object.__setattr__(self, '_totals', totals)
    return self._totals

  def add(self, element: Scalar, tag: Scalar, quantity: int = 1) -> 'QuantityORSet':
    if tag in self._tag_set():
      return self  # a tag names one add: a replayed duplicate changes nothing
    _check_quantity_add(element, tag, quantity)
    totals = None
    if self._totals is not None:
      totals = dict(self._totals)
      if tag not in self.removes:
        totals[element] = totals.get(element, 0) + quantity
    return QuantityORSet._derived(self.adds | {(element, tag, quantity)}, self.removes,
                                  self._tag_set() | {tag}, totals)

  def remove(self, element: Scalar) -> 'QuantityORSet':
    observed = {t for e, t, _ in self.adds if e == element}
    totals = None
    if self._totals is not None:
      # Tombstoning a tag kills every add carrying it (after a merge one tag may
      # name adds of several elements), so take each newly dead add away.
      dead = observed - self.removes
      totals = dict(self._totals)
      for e, t, q in self.adds:
        if t in dead:
          totals[e] -= q
    return QuantityORSet._derived(self.adds, self.removes | observed, self._tags, totals)

  def merge(self, other: 'QuantityORSet') -> 'QuantityORSet':
    return QuantityORSet._derived(self.adds | other.adds, self.removes | other.removes,
                                  None, None)

  def quantity(self, element: Scalar) -> int:
    """``value().get(element, 0)`` without building the whole value."""
    q = self._live_totals().get(element, 0)
    return q if q > 0 else 0

  def value(self) -> Dict[Scalar, int]:
    if self._value is None:
      object.__setattr__(self, '_value', {
          e: q for e, q in sorted(self._live_totals().items(), key=lambda eq: _sort_key(eq[0]))
          if q > 0})
    return dict(self._value)

  def __repr__(self) -> str:
    return f'QuantityORSet({self.value()!r})'


def _check_quantity_add(element: Scalar, tag: Scalar, quantity: int) -> None:
  _canon(element), _canon(tag)
  if not isinstance(quantity, int) or isinstance(quantity, bool):
    raise ValueError(f'quantity of {element!r} must be an int, not {quantity!r}')


class LWWRegister(CRDT):
  """A last-writer-wins register.

  The winner is the write with the greatest ``(timestamp, replica, value)``,
  comparing replica and value by their canonical JSON text. Including the
  value makes the tie-break total: even two writes from one replica at one
  timestamp merge the same way on every replica.
  """

  __slots__ = ('entry',)

  def __init__(self, entry: Optional[Tuple[Scalar, int, Scalar]] = None):
    if entry is not None:
      value, timestamp, replica = entry
      _canon(value), _canon(replica)
      if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise ValueError(f'LWWRegister timestamp must be an int, not {timestamp!r}')
      entry = (value, timestamp, replica)
    self._init(entry=entry)

  def _rank(self) -> tuple:
    if self.entry is None:
      return (0,)
    value, timestamp, replica = self.entry
    return (1, timestamp, _sort_key(replica), _sort_key(value))

  def _state(self) -> tuple:
    return (self.entry,)

  def set(self, value: Scalar, timestamp: int, replica: Scalar) -> 'LWWRegister':
    return self.merge(LWWRegister((value, timestamp, replica)))

  def merge(self, other: 'LWWRegister') -> 'LWWRegister':
    return self if self._rank() >= other._rank() else other

  def value(self) -> Scalar:
    return None if self.entry is None else self.entry[0]

  @property
  def timestamp(self) -> Optional[int]:
    return None if self.entry is None else self.entry[1]

  def __repr__(self) -> str:
    return f'LWWRegister({self.entry!r})'


CRDT_TYPES: Dict[str, Type[CRDT]] = {
    c.__name__: c for c in (GCounter, PNCounter, ORSet, QuantityORSet, LWWRegister)}


def to_canonical(c: CRDT) -> Any:
  """The CRDT as canonical JSON-able data (sorted, so equal values encode equally)."""
  name = type(c).__name__
  if isinstance(c, GCounter):
    body: Any = [[_canon(r), n] for r, n in c._counts]
  elif isinstance(c, PNCounter):
    body = [to_canonical(c.p)[1], to_canonical(c.n)[1]]
  elif isinstance(c, ORSet):
    adds, removes = c._state()
    body = [[[_canon(e), _canon(t)] for e, t in adds], [[_canon(e), _canon(t)] for e, t in removes]]
  elif isinstance(c, QuantityORSet):
    adds, removes = c._state()
    body = [[[_canon(e), _canon(t), q] for e, t, q in adds], [_canon(t) for t in removes]]
  elif isinstance(c, LWWRegister):
    body = None if c.entry is None else [_canon(c.entry[0]), c.entry[1], _canon(c.entry[2])]
  else:
    raise TypeError(f'not a CRDT: {c!r}')
  return [name, body]


def _from_canonical(data: Any) -> CRDT:
  name, body = data
  if name == 'GCounter':
    return GCounter({_uncanon(r): n for r, n in body})
  if name == 'PNCounter':
    return PNCounter(_from_canonical(['GCounter', body[0]]),
                     _from_canonical(['GCounter', body[1]]))
  if name == 'ORSet':
    return ORSet([(_uncanon(e), _uncanon(t)) for e, t in body[0]],
                 [(_uncanon(e), _uncanon(t)) for e, t in body[1]])
  if name == 'QuantityORSet':
    return QuantityORSet([(_uncanon(e), _uncanon(t), q) for e, t, q in body[0]],
                         [_uncanon(t) for t in body[1]])
  if name == 'LWWRegister':
    return LWWRegister(None if body is None else
                       (_uncanon(body[0]), body[1], _uncanon(body[2])))
  raise ValueError(f'unknown CRDT type {name!r}')


class CRDTCoder(coders.Coder):
  """Encodes any CRDT here as canonical JSON: equal values give equal bytes."""

  def encode(self, value: CRDT) -> bytes:
    return json.dumps(to_canonical(value), sort_keys=True,
                      separators=(',', ':')).encode('utf-8')

  def decode(self, encoded: bytes) -> CRDT:
    return _from_canonical(json.loads(encoded.decode('utf-8')))

  def is_deterministic(self) -> bool:
    return True

  def to_type_hint(self):
    return CRDT

  def __eq__(self, other):
    return type(self) is type(other)

  def __hash__(self):
    return hash(type(self))


for _cls in CRDT_TYPES.values():
  coders.registry.register_coder(_cls, CRDTCoder)
coders.registry.register_coder(CRDT, CRDTCoder)


class MergeCRDTs(beam.CombineFn):
  """Merges partial CRDTs of one type (per partition, per region) into one.

  Because merge is commutative, associative and idempotent, the runner may
  combine in any order and shape, and the result is the same.
  """

  def __init__(self, crdt_type: Type[CRDT]):
    self.crdt_type = crdt_type

  def create_accumulator(self) -> CRDT:
    return self.crdt_type()

  def add_input(self, acc: CRDT, value: CRDT) -> CRDT:
    if not isinstance(value, self.crdt_type):
      raise TypeError(f'{type(self).__name__}({self.crdt_type.__name__}) got {value!r}')
    return acc.merge(value)

  def merge_accumulators(self, accs: Iterable[CRDT]) -> CRDT:
    out = self.crdt_type()
    for a in accs:
      out = out.merge(a)
    return out

  def extract_output(self, acc: CRDT) -> CRDT:
    return acc

  def get_accumulator_coder(self):
    return CRDTCoder()


def merge_all(values: Iterable[T], crdt_type: Type[T]) -> T:
  """Plain-Python merge of many partials (what MergeCRDTs does, without Beam)."""
  out = crdt_type()
  for v in values:
    out = out.merge(v)
  return out
