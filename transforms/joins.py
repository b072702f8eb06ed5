"""Joining two streams on a key: one record of each side per key, with an event-time timeout.

The enrichment join of the Flink training (rides with their fares) and of
many event-sourced systems (orders with their payments, shipments with their
orders): each key has at most one record of each side; whichever arrives first
waits in state for its partner, and the partner completes the join. A side
still waiting ``expire_after_ms`` of event time after its own time goes to
``unmatched`` with a reason, as does a second copy of a waiting side: nothing
is dropped without a word. The two sides may be keyed differently in the
published stream (a payment keyed by ``payment_id`` names its ``order_id``):
``left_key`` and ``right_key`` take the join key from each side's record, so
this is how a join crosses partition keys.

Plain Python (:func:`pair_on_arrival`, :func:`pair_on_expiry`) and one Beam
transform (:class:`JoinPairs`: a :class:`~sourcebeam.transforms.state_machine.
KeyedStateMachine` keyed by the join key, in the global window: state and an
event-time timer per key on a stream, one grouping per key on bounded input).
On bounded input every timer fires after every record has been seen: a bounded
run gives the exact answer. Timer output is re-windowed with enough allowed
lateness that a downstream grouping keeps it (:mod:`sourcebeam.transforms.timing`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import apache_beam as beam

from sourcebeam.transforms.expansions import check_expansion
from sourcebeam.transforms.state_machine import MAIN, KeyedStateMachine, Machine, Step

__all__ = ['JoinPairs', 'JoinResult', 'PairStep', 'pair_machine', 'pair_on_arrival', 'pair_on_expiry',
           'UNMATCHED']

UNMATCHED = 'unmatched'
MINUTE_MS = 60_000

Waiting = Tuple[str, Any, int]   # (side, record, its event time in millis)


class PairStep(NamedTuple):
  state: Optional[Waiting]                  # the waiting side, or None
  joined: Optional[Dict[str, Any]]          # {left: record, right: record}
  unmatched: Tuple[Dict[str, Any], ...]     # {'side', 'reason', 'record'}
  timer: Optional[int]                      # expiry time to set (millis); None: clear it


class Sides(NamedTuple):
  left: str
  right: str
  key_name: str                             # how reasons name the key, e.g. 'rideId'
  labels: Mapping[str, str]                 # how reasons name each side, e.g. {'ride': 'START ride'}

  def other(self, side: str) -> str:
    return self.right if side == self.left else self.left


def pair_on_arrival(state: Optional[Waiting], side: str, record: Any, time_ms: int,
                    expire_after_ms: int, sides: Sides) -> PairStep:
  """One record of ``side`` arrives for its key.

  The first side waits in state with an expiry timer; the other side completes
  the join and clears state and timer. A second copy of a side that is already
  waiting is unmatched ('duplicate'), never silently dropped.
  """
  if state is None:
    return PairStep((side, record, time_ms), None, (), time_ms + expire_after_ms)
  waiting_side, waiting, waiting_time = state
  if waiting_side == side:
    return PairStep(state, None, ({'side': side, 'reason': f'duplicate {side} for this '
                                   f'{sides.key_name}', 'record': record},),
                    waiting_time + expire_after_ms)
  left, right = (record, waiting) if side == sides.left else (waiting, record)
  return PairStep(None, {sides.left: left, sides.right: right}, (), None)


def pair_on_expiry(state: Optional[Waiting], expire_after_ms: int, sides: Sides) -> PairStep:
  """The expiry timer fired: the waiting side's partner did not come in time."""
  if state is None:
    return PairStep(None, None, (), None)
  side, record, _ = state
  other = sides.other(side)
  label = sides.labels.get(other, other)
  minutes = expire_after_ms / MINUTE_MS
  return PairStep(None, None, ({'side': side, 'reason': f'no {label} within {minutes:g} min',
                                'record': record},), None)


def _step(step: PairStep) -> Step:
  return Step(step.state, step.timer, () if step.joined is None else (step.joined, ),
              tuple((UNMATCHED, u) for u in step.unmatched))


def pair_machine(expire_after_ms: int, sides: Sides) -> Machine:
  """The join as a :class:`~sourcebeam.transforms.state_machine.Machine` over
  ``(side, record, time_ms)`` elements."""

  def on_event(state: Optional[Waiting], _key, element) -> Step:
    side, record, time_ms = element
    return _step(pair_on_arrival(state, side, record, time_ms, expire_after_ms, sides))

  def on_timer(state: Optional[Waiting], _key) -> Step:
    return _step(pair_on_expiry(state, expire_after_ms, sides))

  return Machine(on_event, on_timer)


class JoinResult(NamedTuple):
  joined: beam.PCollection     # {left: record, right: record}
  unmatched: beam.PCollection  # {'side', 'reason', 'record'}


class JoinPairs(beam.PTransform):
  """``(left, right)`` PCollections of records -> pairs joined on a key, one of each side.

  Args:
    left, right: the sides' names (keys of each joined dict, ``side`` of unmatched).
    left_key, right_key: the join key of a record of each side.
    left_time, right_time: a record's event time in epoch millis (what the expiry counts from).
    expire_after_ms: how long a side waits for its partner, in event time.
    key_type: the join key's Python type (``str`` or ``int``): stateful processing needs a
      deterministic key coder.
    key_name, labels: how unmatched reasons name the key and the sides
      (``"no START ride within 60 min"``).
    expansion: ``'auto'`` (a grouping per key for bounded input, state and a timer per key
      otherwise), ``'batch'`` or ``'streaming'``: see :mod:`sourcebeam.transforms.state_machine`.
  """

  def __init__(self, left: str, right: str, *, left_key: Callable[[Any], Any],
               right_key: Callable[[Any], Any], left_time: Callable[[Any], int],
               right_time: Callable[[Any], int], expire_after_ms: int, key_type: type = str,
               key_name: str = 'key', labels: Optional[Mapping[str, str]] = None,
               expansion: str = 'auto'):
    super().__init__()
    if left == right:
      raise ValueError('the two sides of a join need different names')
    if expire_after_ms <= 0:
      raise ValueError(f'expire_after_ms must be positive, not {expire_after_ms}')
    self.sides = Sides(left, right, key_name, dict(labels or {}))
    self.left_key, self.right_key = left_key, right_key
    self.left_time, self.right_time = left_time, right_time
    self.expire_after_ms, self.key_type = expire_after_ms, key_type
    self.machine = pair_machine(expire_after_ms, self.sides)
    self.expansion = check_expansion(expansion)

  def expand(self, sides):
    left, right = sides
    s = self.sides
    keyed = Tuple[self.key_type, Any]
    lk, rk, lt, rt = self.left_key, self.right_key, self.left_time, self.right_time
    keyed_left = left | f'Key {s.left}' >> beam.Map(
        lambda r: (lk(r), (s.left, r, lt(r)))).with_output_types(keyed)
    keyed_right = right | f'Key {s.right}' >> beam.Map(
        lambda r: (rk(r), (s.right, r, rt(r)))).with_output_types(keyed)
    out = ((keyed_left, keyed_right)
           | 'Both' >> beam.Flatten()
           | 'Join' >> KeyedStateMachine(self.machine, tags=[UNMATCHED], key_type=self.key_type,
                                         expansion=self.expansion))
    return JoinResult(out[MAIN], out[UNMATCHED])
