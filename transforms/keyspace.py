"""One key space's consumers behind one handler: order each key's events once, then hand each
view and projection its own types. Plain Python, no Beam.

:class:`KeySpaceHandler` is a :class:`~sourcebeam.transforms.ordering_core.Handler`
whose state is a tuple with one state per consumer (views and projections of
one key space) and whose outputs say which consumer they belong to:

* :class:`ViewChange` ``(consumer, state, event)`` for each event a view
  applied (its new state, and the event, for ``as_of`` fields): the latest
  per key is the view;
* :class:`Emitted` ``(consumer, output)`` for each output of a projection;
* :class:`Failed` ``(consumer, event, error)`` when a consumer's handler raised:
  the others go on, and the failing consumer keeps its state from before the event.

``consumer`` is the consumer's id: its position among the app's per-key
consumers (:attr:`sourcebeam.App.per_key`), so outputs of several key spaces
can share one stream. A consumer's ``initial_state(key)`` is called when the
key's first event of its types arrives, not before.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

from sourcebeam.schemas.envelope import Envelope

__all__ = ['KeySpaceHandler', 'ViewChange', 'Emitted', 'Failed', 'unprocessed_record', 'to_line',
           'json_default']


class ViewChange(NamedTuple):
  consumer: int
  state: Any
  event: Envelope


class Emitted(NamedTuple):
  consumer: int
  output: Any


class Failed(NamedTuple):
  consumer: int
  event: Envelope
  error: str


class _Unset:
  """A consumer that has seen no event of the key yet (pickles to the same singleton)."""

  def __reduce__(self):
    return (_unset, ())

  def __repr__(self) -> str:
    return 'UNSET'


_UNSET = _Unset()


def _unset() -> _Unset:
  return _UNSET


class KeySpaceHandler:
  """The views and projections of one key space as one per-key handler.

  ``consumers``: ``(id, consumer)`` pairs, each consumer a
  :class:`sourcebeam.transforms.app.View` or ``Projection`` (anything with
  ``handler``, ``event_types`` and ``kind``).
  """

  def __init__(self, consumers: Sequence[Tuple[int, Any]]):
    self.ids = tuple(i for i, _ in consumers)
    by_type: Dict[str, List[Tuple[int, int, Any, bool]]] = {}
    for pos, (cid, c) in enumerate(consumers):
      for t in sorted(c.event_types):
        by_type.setdefault(t, []).append((pos, cid, c.handler, c.kind == 'view'))
    self._by_type = {t: tuple(v) for t, v in by_type.items()}
    self._n = len(consumers)

  def initial_state(self, key: str) -> tuple:
    return (_UNSET,) * self._n

  def apply(self, state: tuple, event: Envelope) -> Tuple[tuple, List[Any]]:
    targets = self._by_type.get(event['event_type'])
    if not targets:
      return state, []
    states = list(state)
    outputs: List[Any] = []
    for pos, cid, handler, is_view in targets:
      s = states[pos]
      try:
        if s is _UNSET:
          s = handler.initial_state(event['partition_key'])
        s, out = handler.apply(s, event)
        out = [] if is_view or out is None else list(out)
      except Exception as e:  # user code: reported as data, never a crash, never a stop
        outputs.append(Failed(cid, event, f'{type(e).__name__}: {e}'))
        continue
      states[pos] = s
      if is_view:
        outputs.append(ViewChange(cid, s, event))
      else:
        outputs.extend(Emitted(cid, o) for o in out)
    return tuple(states), outputs


def unprocessed_record(rec: Dict[str, Any], key_space: str = None, consumer: str = None
                       ) -> Dict[str, Any]:
  """An ordering report (``{key, sequence, reason, event, [detail]}``) or a consumer's
  failure, as ``OUT/unprocessed.jsonl`` has it: with the key space or the consumer."""
  out = dict(rec)
  if key_space is not None:
    out['key_space'] = key_space
  if consumer is not None:
    out['consumer'] = consumer
  return out


def failure_record(key: str, failed: Failed, consumer: str) -> Dict[str, Any]:
  return {'key': key, 'sequence': failed.event.get('sequence'), 'reason': 'handler_error',
          'consumer': consumer, 'event': failed.event, 'detail': failed.error}


def json_default(value: Any) -> Any:
  """What ``json.dumps`` cannot write by itself, as JSON: sets (sorted), CRDTs and other
  objects with ``value()``, objects with ``_asdict()`` or dataclasses; else TypeError."""
  if isinstance(value, (set, frozenset)):
    return sorted(value, key=lambda v: json.dumps(v, sort_keys=True, default=str))
  if hasattr(value, '_asdict'):
    return value._asdict()
  import dataclasses
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return dataclasses.asdict(value)
  if callable(getattr(value, 'value', None)):
    return value.value()
  if isinstance(value, bytes):
    return value.decode('utf-8', 'backslashreplace')
  raise TypeError(f'{type(value).__name__} is not JSON serializable')


def to_line(record: Any) -> str:
  """One output line: a ``str`` as it is (a line its consumer formatted), anything else as
  compact JSON with sorted keys."""
  if isinstance(record, str):
    return record
  return json.dumps(record, sort_keys=True, separators=(',', ':'), ensure_ascii=False,
                    default=json_default)
