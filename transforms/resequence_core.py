"""The publishing resequencer in plain Python: raw per-key order in, 1, 2, 3 ... out.

A tech-debt stream numbers each partition key's events with its own *raw*
sequence, full of holes (a line dead-lettered upstream keeps its number) and
repeats (a re-delivered line keeps its number too). The published stream
numbers each key's events ``1, 2, 3 ...`` with no hole and no repeat, in raw
order. This module decides, for one key at a time, free of Beam; the Beam
wrapper (:mod:`transforms.resequence`) only moves :class:`KeyState` in and out
of state and sets the timers this module asks for.

The rule (one rule, used by the batch and the streaming expansion alike, and by
:func:`resequence`, the plain function)::

    Per key, walk the raw sequences upwards from the key's first one. Each
    raw sequence is one slot. A slot's event is published with sequence
    1 + (events published before it), and with ``raw_sequence`` = its slot,
    unless its event_id was already published (a duplicate, or a conflict if
    the content differs). A slot that never fills is a gap: the key holds the
    events after it for a bounded time, then moves on and reports the gap.

* **Ordering.** ``order_by='raw_sequence'`` (default): by the envelope's
  ``sequence`` (the raw one); an event without one is dead-lettered
  ``missing_sequence``. ``order_by='event_time'``: for raw streams without
  sequences: by ``(event_time, event_id)``; an event is held until its hold
  limit passes (nothing can say that no earlier event is still coming) and
  one that arrives after a later one was published is dead-lettered ``late``.
* **First raw sequence.** ``first_sequence=1`` (default): raw sequences start at
  1, as the publishing boundary and the event writer number them, so a key
  whose raw 1 never came reports it as a gap. An int ``n``: raw sequences start
  at ``n``; lower ones are dead-lettered ``before_start``. ``'first_seen'``: the
  first raw sequence the key receives is its start (for a stream read from
  the middle); in a bounded run that is the key's lowest raw sequence,
  live it is the first to *arrive*.
* **Duplicates** (dropped, counted, one record each on the ``duplicates``
  output): a copy with the same content (every envelope field but
  ``event_id`` and ``sequence``) at the same raw sequence, whatever its
  event_id; and a copy with the same event_id and content under another raw
  sequence (it consumes that slot, publishes nothing).
* **Conflicts** (dead letter ``conflict``, naming the event_id it conflicts
  with): a different content at a raw sequence already taken, or an event_id
  already taken by a different content. Among copies of one raw sequence that
  are waiting together the one with the smaller ``(event_time, event_id)``
  wins (so a bounded run's result does not depend on arrival order); once one
  is published, it stays the winner.
* **History.** After publishing, a key remembers ``history`` raw sequences
  (default 1000) with their event_id and a 64-bit content fingerprint, and the
  gaps it declared among them. A copy of a raw sequence older than that is
  dead-lettered ``late`` (it cannot be told from a conflict: never dropped
  silently, never re-published). An event_id is recognised as a duplicate
  while the raw sequence it was published at is in the window. Beyond it, in
  ``event_time`` order a copy (same event_time) sorts before what the key
  already published and is dead-lettered ``late``; in raw order a copy re-sent
  under a *new* raw sequence after its original left the window cannot be
  recognised and is published again: the one case bounded memory cannot
  cover (a re-delivered raw line keeps its raw sequence, and that is always
  caught).
* **Holds.** An event waits at most ``max_wait_event_time`` past its own
  timestamp (watermark) and ``max_wait_processing_time`` past its arrival
  (wall clock), and a key holds at most ``max_held`` events; whichever comes
  first, the key moves past the gap before its oldest waiting event and
  dead-letters it: ``{reason: 'gap', key, missing: [first, last], count, ...}``.
  At the end of bounded input every hole closes the same way
  (``trigger: 'end_of_input'``). A raw sequence that arrives after its gap
  was declared is dead-lettered ``late``.

Accounting, per key and at every moment::

    received == published + duplicates_dropped + dead_lettered + held

where ``dead_lettered`` counts dead letters that carry an input event (gap
records carry none). At the end of bounded input ``held`` is 0.

Times given to this module are integers in microseconds (element timestamps
and the wall clock); the envelope's ``event_time`` (epoch millis) is only used
to order ``event_time`` streams and to pick a conflict's winner.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections import abc
import hashlib
import json
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from sourcebeam.transforms.errors import ConfigError

__all__ = ['ResequenceConfig', 'KeyState', 'Activation', 'Resequencer', 'resequence',
           'published_sequences', 'fingerprint', 'batch_order', 'ResequenceResult',
           'GAP', 'CONFLICT', 'LATE', 'MISSING_SEQUENCE', 'INVALID_SEQUENCE', 'BEFORE_START',
           'INVALID_KEY', 'INVALID_EVENT', 'DEAD_LETTER_REASONS', 'RAW_SEQUENCE', 'EVENT_TIME',
           'FIRST_SEEN']

# Dead-letter reasons.
GAP = 'gap'                              # raw sequences that never came (no event)
CONFLICT = 'conflict'                    # same slot or event_id, different content
LATE = 'late'                            # its place in the order was already passed
MISSING_SEQUENCE = 'missing_sequence'    # order_by='raw_sequence' and no raw sequence
INVALID_SEQUENCE = 'invalid_sequence'    # not a whole number in the signed 64-bit range
BEFORE_START = 'before_start'            # below the key's first raw sequence
INVALID_KEY = 'invalid_key'              # no usable partition_key
INVALID_EVENT = 'invalid_event'          # not an envelope dict, or no usable event_id / event_time
DEAD_LETTER_REASONS = (GAP, CONFLICT, LATE, MISSING_SEQUENCE, INVALID_SEQUENCE, BEFORE_START,
                       INVALID_KEY, INVALID_EVENT)

RAW_SEQUENCE = 'raw_sequence'
EVENT_TIME = 'event_time'
FIRST_SEEN = 'first_seen'

# Gap triggers.
EVENT_TIME_LIMIT = 'event_time'
PROCESSING_TIME_LIMIT = 'processing_time'
MAX_HELD = 'max_held'
END_OF_INPUT = 'end_of_input'

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

DEFAULT_HISTORY = 1000
DEFAULT_MAX_HELD = 10_000
DEFAULT_MAX_WAIT_EVENT_TIME = 300 * 1_000_000       # 5 minutes of event time
DEFAULT_MAX_WAIT_PROCESSING_TIME = 60 * 1_000_000   # 1 minute of wall-clock time

_CONTENT_EXCLUDED = ('event_id', 'sequence', 'raw_sequence')
# Where an event carries, unseen by the rule, where it came from (a file, a Kafka offset): not
# content, not part of ``raw``; dead letters and duplicate records name it as their ``source``.
SOURCE = '_source'


@dataclasses.dataclass(frozen=True)
class ResequenceConfig:
  """The per-key policy; see the module docstring. Times in microseconds."""
  order_by: str = RAW_SEQUENCE
  first_sequence: Union[int, str] = 1
  history: int = DEFAULT_HISTORY
  max_held: int = DEFAULT_MAX_HELD
  max_wait_event_time: Optional[int] = DEFAULT_MAX_WAIT_EVENT_TIME
  max_wait_processing_time: Optional[int] = DEFAULT_MAX_WAIT_PROCESSING_TIME
  source: Optional[str] = None          # named in every dead letter, if given

  def __post_init__(self):
    if self.order_by not in (RAW_SEQUENCE, EVENT_TIME):
      raise ConfigError(f"order_by must be {RAW_SEQUENCE!r} or {EVENT_TIME!r}, got {self.order_by!r}")
    fs = self.first_sequence
    if fs != FIRST_SEEN and (isinstance(fs, bool) or not isinstance(fs, int) or
                             not INT64_MIN < fs <= INT64_MAX):
      raise ConfigError(f"first_sequence must be a 64-bit int or {FIRST_SEEN!r}, got {fs!r}")
    for name in ('history', 'max_held'):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f'{name} must be a positive int, got {v!r}')
    for name in ('max_wait_event_time', 'max_wait_processing_time'):
      v = getattr(self, name)
      if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
        raise ConfigError(f'{name} must be an int >= 0 (microseconds) or None, got {v!r}')


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(',', ':'), ensure_ascii=False,
                              default=repr)


def fingerprint(event: Mapping[str, Any]) -> int:
  """A 64-bit fingerprint of an envelope's content: every field but ``event_id``,
  ``sequence`` and ``raw_sequence``, in canonical JSON. Stable across processes."""
  content = {k: v for k, v in event.items() if k not in _CONTENT_EXCLUDED and k != SOURCE}
  return int.from_bytes(hashlib.blake2b(_CANONICAL.encode(content).encode('utf-8'),
                                        digest_size=8).digest(), 'big')


# A waiting event is a plain tuple (cheap to build and to pickle):
# (event, event_id, timestamp, arrival processing time).
Held = Tuple[Dict[str, Any], str, Optional[int], Optional[int]]
_EV, _ID, _TS, _PT = range(4)


def _fp(content: Any) -> int:
  """History keeps a published event's content as the event itself until the key's state is
  pickled (then as its fingerprint): fingerprints cost only where a copy needs comparing,
  or where the state is stored (streaming)."""
  return content if type(content) is int else fingerprint(content)


def _same(a: Any, b: Any) -> bool:
  return a is b or _fp(a) == _fp(b)


def _order(h: Held) -> Tuple[int, str]:
  """Where a waiting event sorts among copies (raw order) or among all (event-time order)."""
  return (_event_time(h[_EV]), h[_ID])


def _event_time(event: Mapping[str, Any]) -> int:
  t = event.get('event_time')
  return t if isinstance(t, int) and not isinstance(t, bool) else INT64_MAX


@dataclasses.dataclass
class KeyState:
  """Everything the resequencer remembers about one key (picklable)."""
  key: Any
  start: Optional[int] = None        # first raw sequence (None: first_seen, nothing yet)
  next_raw: Optional[int] = None     # the slot the key waits for (raw_sequence order)
  next_pub: int = 1                  # the next published sequence
  # Waiting events: raw_sequence order by slot, event_time order by event_id.
  held: Dict[Any, Held] = dataclasses.field(default_factory=dict)
  held_order: List[Tuple[int, str]] = dataclasses.field(default_factory=list)  # event_time order
  wait_since_et: Optional[int] = None    # oldest timestamp among the held events
  wait_since_pt: Optional[int] = None    # oldest arrival among the held events
  # History, oldest first: raw_sequence order: slot -> (event_id, content, published
  # sequence or None); event_time order: event_id -> (event_id, content, published
  # sequence). Content is the event, or its fingerprint once pickled (see _fp).
  recent: Dict[Any, Tuple] = dataclasses.field(default_factory=dict)
  recent_ids: Dict[str, int] = dataclasses.field(default_factory=dict)  # event_id -> slot
  gaps: List[Tuple[int, int]] = dataclasses.field(default_factory=list)  # declared, in window
  last_order: Optional[Tuple[int, str]] = None  # event_time order: the last one released
  # Counters.
  received: int = 0
  published: int = 0
  duplicates: int = 0
  dead_lettered: int = 0
  by_reason: Dict[str, int] = dataclasses.field(default_factory=dict)
  gap_records: int = 0
  missing: int = 0

  def __getstate__(self):
    recent = self.recent
    for k, v in recent.items():
      if type(v[1]) is not int:
        recent[k] = (v[0], fingerprint(v[1]), v[2])
    state = dict(self.__dict__)
    state.pop('recent_ids')   # rebuilt from recent on load
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    # Raw order: event_id -> slot. (Event-time order keys recent by event_id itself.)
    self.recent_ids = ({v[0]: slot for slot, v in self.recent.items()}
                       if self.recent and type(next(iter(self.recent))) is int else {})


@dataclasses.dataclass
class Activation:
  """What one call into the resequencer produced. Published entries are
  ``(envelope, timestamp)``: the event's own input timestamp (micros or None)."""
  published: List[Tuple[Dict[str, Any], Optional[int]]] = dataclasses.field(default_factory=list)
  dead_letters: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  duplicates: List[Dict[str, Any]] = dataclasses.field(default_factory=list)


def sequence_problem(seq: Any) -> Optional[str]:
  """None for a usable raw sequence, else why it is not one."""
  if seq is None:
    return MISSING_SEQUENCE
  if isinstance(seq, bool) or not isinstance(seq, int) or not INT64_MIN < seq <= INT64_MAX:
    return INVALID_SEQUENCE
  return None


def raw_json(event: Any) -> str:
  """The event as a raw line the publishing boundary accepts again (dead letters' ``raw``)."""
  if isinstance(event, abc.Mapping) and (SOURCE in event or event.get('raw_sequence') is None):
    event = {k: v for k, v in event.items()
             if k != SOURCE and not (k == 'raw_sequence' and v is None)}
  return json.dumps(event, ensure_ascii=False, separators=(',', ':'), default=repr)


class Resequencer:
  """Per-key decisions. Stateless itself: every call takes the key's
  :class:`KeyState`, mutates it and adds to an :class:`Activation`."""

  def __init__(self, config: ResequenceConfig = ResequenceConfig()):
    self.config = config
    self._by_raw = config.order_by == RAW_SEQUENCE

  def new_state(self, key: Any) -> KeyState:
    st = KeyState(key=key)
    if self._by_raw and self.config.first_sequence != FIRST_SEEN:
      st.start = st.next_raw = self.config.first_sequence
    return st

  # -- records ---------------------------------------------------------------------------------

  def _dead(self, st: KeyState, act: Activation, reason: str, event: Any, detail: str,
            **fields) -> None:
    st.dead_lettered += 1
    st.by_reason[reason] = st.by_reason.get(reason, 0) + 1
    act.dead_letters.append(self.dead_letter(reason, st.key, event, detail, **fields))

  def dead_letter(self, reason: str, key: Any, event: Any, detail: str, **fields) -> Dict[str, Any]:
    """The publish step's dead-letter shape: ``reason``, ``raw`` (the event as a line the
    boundary accepts again), ``source`` when known, plus what to act on."""
    dl: Dict[str, Any] = {'reason': reason, 'detail': detail, 'key': key}
    if isinstance(event, abc.Mapping):
      dl['raw_sequence'] = event.get('sequence')
      dl['event_id'] = event.get('event_id')
    dl.update(fields)
    if event is not None:
      dl['raw'] = raw_json(event)
    if isinstance(event, abc.Mapping) and event.get(SOURCE) is not None:
      dl['source'] = event[SOURCE]
    elif self.config.source is not None:
      dl['source'] = self.config.source
    return dl

  def invalid_key(self, event: Any, problem: str) -> Dict[str, Any]:
    """The dead letter of an event without a usable key (``problem``: why, from :func:`key_of`)."""
    return self.dead_letter(INVALID_KEY, None, event, f'cannot resequence without a key: {problem}')

  def _duplicate(self, st: KeyState, act: Activation, event: Mapping[str, Any], by: str,
                 of_event_id: str, of_raw: Any) -> None:
    """One record per copy dropped. Only what does not depend on arrival order (whether the
    original was already published when the copy came), so bounded runs compare equal."""
    st.duplicates += 1
    record = {
        'key': st.key, 'raw_sequence': event.get('sequence'), 'event_id': event.get('event_id'),
        'by': by, 'duplicate_of': of_event_id, 'duplicate_of_raw_sequence': of_raw}
    if event.get(SOURCE) is not None:
      record['source'] = event[SOURCE]
    act.duplicates.append(record)

  def stats(self, st: KeyState) -> Dict[str, Any]:
    """The key's counters: ``received == published + duplicates_dropped + dead_lettered + held``."""
    return {
        'key': st.key,
        'received': st.received,
        'published': st.published,
        'duplicates_dropped': st.duplicates,
        'dead_lettered': st.dead_lettered,
        'dead_lettered_by_reason': dict(sorted(st.by_reason.items())),
        'gaps': st.gap_records,
        'missing_raw_sequences': st.missing,
        'held': len(st.held),
        'last_sequence': st.next_pub - 1,
        'next_raw_sequence': st.next_raw,
    }

  # -- events ---------------------------------------------------------------------------------

  def receive(self, st: KeyState, event: Any, ts: Optional[int] = None,
              pt: Optional[int] = None, into: Optional[Activation] = None) -> Activation:
    """One of the key's events arrived (element timestamp ``ts``, wall clock ``pt``)."""
    act = Activation() if into is None else into
    st.received += 1
    if type(event) is not dict and not isinstance(event, abc.Mapping):
      self._dead(st, act, INVALID_EVENT, None,
                 f'not an envelope: {type(event).__name__}', event_repr=repr(event)[:1000])
      return act
    eid = event.get('event_id')
    if not isinstance(eid, str) or not eid:
      self._dead(st, act, INVALID_EVENT, event, f'event_id must be a non-empty string, got {eid!r}')
      return act
    if self._by_raw:
      self._receive_raw(st, act, event, eid, ts, pt)
    else:
      self._receive_by_time(st, act, event, eid, ts, pt)
    return act

  def _receive_raw(self, st, act, event, eid, ts, pt) -> None:
    raw = event.get('sequence')
    problem = sequence_problem(raw)
    if problem == MISSING_SEQUENCE:
      self._dead(st, act, problem, event,
                 'the event has no raw sequence; this stream is ordered by raw sequence '
                 "(order_by='raw_sequence')")
      return
    if problem is not None:
      self._dead(st, act, problem, event, f'raw sequence {raw!r} is not a 64-bit whole number')
      return
    if st.start is None:             # first_seen: the first arrival starts the key
      st.start = st.next_raw = raw
    if raw < st.start:
      self._dead(st, act, BEFORE_START, event,
                 f'raw sequence {raw} is below the key\'s first raw sequence {st.start}')
      return
    if raw < st.next_raw:
      self._passed_slot(st, act, event, eid, raw)
      return
    held = st.held.get(raw)
    if held is not None:
      new = (event, eid, ts, pt)
      # Two copies wait for one slot: the smaller (event_time, event_id) keeps it.
      keep, drop = (new, held) if _order(new) < _order(held) else (held, new)
      if keep is new:
        st.held[raw] = new
        self._recompute_wait(st)
      if _same(keep[_EV], drop[_EV]):
        self._duplicate(st, act, drop[_EV],
                        'event_id' if keep[_ID] == drop[_ID] else 'raw_sequence', keep[_ID], raw)
      else:
        self._dead(st, act, CONFLICT, drop[_EV],
                   f'raw sequence {raw} of key {st.key!r} arrived twice with different content; '
                   f'kept event_id {keep[_ID]!r}', conflicts_with=keep[_ID])
      return
    st.held[raw] = (event, eid, ts, pt)
    if ts is not None and (st.wait_since_et is None or ts < st.wait_since_et):
      st.wait_since_et = ts
    if pt is not None and (st.wait_since_pt is None or pt < st.wait_since_pt):
      st.wait_since_pt = pt
    if raw == st.next_raw:
      self._release_raw(st, act)
    else:
      while len(st.held) > self.config.max_held:
        self._skip_gap(st, act, MAX_HELD)

  def _passed_slot(self, st, act, event, eid, raw) -> None:
    """A raw sequence the key already moved past: a copy, a conflict, or late."""
    rec = st.recent.get(raw)
    if rec is not None:
      r_eid, r_content, r_pub = rec
      if _same(r_content, event):
        self._duplicate(st, act, event, 'raw_sequence' if r_eid != eid else 'event_id',
                        r_eid, raw)
      else:
        self._dead(st, act, CONFLICT, event,
                   f'raw sequence {raw} of key {st.key!r} was already taken by event_id '
                   f'{r_eid!r} with different content'
                   + (f' (published as sequence {r_pub})' if r_pub is not None else ''),
                   conflicts_with=r_eid, conflicts_with_sequence=r_pub)
      return
    for lo, hi in st.gaps:
      if lo <= raw <= hi:
        self._dead(st, act, LATE, event,
                   f'raw sequence {raw} of key {st.key!r} arrived after the key moved past it '
                   f'(gap {lo}..{hi} was declared missing)', gap=[lo, hi])
        return
    self._dead(st, act, LATE, event,
               f'raw sequence {raw} of key {st.key!r} is older than the {self.config.history} '
               f'raw sequences the key remembers (next expected {st.next_raw}): it cannot be told '
               'from a conflict, so it is not published', history=self.config.history)

  def _note_wait(self, st: KeyState, ts, pt) -> None:
    if ts is not None and (st.wait_since_et is None or ts < st.wait_since_et):
      st.wait_since_et = ts
    if pt is not None and (st.wait_since_pt is None or pt < st.wait_since_pt):
      st.wait_since_pt = pt

  def _recompute_wait(self, st: KeyState) -> None:
    st.wait_since_et = st.wait_since_pt = None
    for h in st.held.values():
      self._note_wait(st, h[_TS], h[_PT])

  def _release_raw(self, st: KeyState, act: Activation) -> None:
    """Publish the run of held slots that continues the key's raw order."""
    held, recent, recent_ids = st.held, st.recent, st.recent_ids
    slot = st.next_raw
    h = held.pop(slot, None)
    while h is not None:
      event, eid = h[0], h[1]
      prior = recent_ids.get(eid)
      if prior is not None:
        p_eid, p_content, p_pub = recent[prior]
        if _same(p_content, event):
          self._duplicate(st, act, event, 'event_id', eid, prior)
        else:
          self._dead(st, act, CONFLICT, event,
                     f'event_id {eid!r} was already taken at raw sequence {prior} of key '
                     f'{st.key!r} by different content', conflicts_with=eid,
                     conflicts_with_raw_sequence=prior, conflicts_with_sequence=p_pub)
        recent[slot] = (eid, event, None)
      else:
        out = dict(event)
        out['sequence'] = st.next_pub
        out['raw_sequence'] = slot
        act.published.append((out, h[_TS]))
        recent[slot] = (eid, event, st.next_pub)
        recent_ids[eid] = slot
        st.next_pub += 1
        st.published += 1
      slot += 1
      h = held.pop(slot, None)
    st.next_raw = slot
    if len(recent) > self.config.history or st.gaps:
      self._forget(st)
    if held:
      self._recompute_wait(st)
    else:
      st.wait_since_et = st.wait_since_pt = None

  def _forget(self, st: KeyState) -> None:
    """Keep the history to the last ``history`` raw sequences."""
    floor = st.next_raw - self.config.history
    recent, recent_ids = st.recent, st.recent_ids
    while recent:
      slot = next(iter(recent))
      if slot >= floor:
        break
      eid = recent.pop(slot)[0]
      if recent_ids.get(eid) == slot:
        del recent_ids[eid]
    if st.gaps and st.gaps[0][1] < floor:
      st.gaps = [g for g in st.gaps if g[1] >= floor]

  def _skip_gap(self, st: KeyState, act: Activation, trigger: str) -> None:
    """Move past the gap before the oldest waiting slot and publish what follows it."""
    first = min(st.held)
    lo, hi = st.next_raw, first - 1
    after = st.recent.get(lo - 1)
    st.gaps.append((lo, hi))
    st.gap_records += 1
    st.missing += hi - lo + 1
    act.dead_letters.append(self.dead_letter(
        GAP, st.key, None,
        f'raw sequence{"s" if hi > lo else ""} {lo}' + (f'..{hi}' if hi > lo else '') +
        f' of key {st.key!r} never arrived; moved on after {_TRIGGER_TEXT[trigger]}',
        missing=[lo, hi], count=hi - lo + 1, trigger=trigger,
        after_raw_sequence=lo - 1 if lo > st.start else None,
        after_event_id=after[0] if after is not None else None,
        before_raw_sequence=first, before_event_id=st.held[first][_ID],
        published_before=st.next_pub - 1))
    st.next_raw = first
    self._release_raw(st, act)

  # -- event_time order --------------------------------------------------------------------------

  def _receive_by_time(self, st, act, event, eid, ts, pt) -> None:
    t = event.get('event_time')
    if isinstance(t, bool) or not isinstance(t, int):
      self._dead(st, act, INVALID_EVENT, event,
                 f"event_time must be epoch millis to order by it (order_by='event_time'), got {t!r}")
      return
    rec = st.recent.get(eid)
    if rec is not None:
      _, r_content, r_pub = rec
      if _same(r_content, event):
        self._duplicate(st, act, event, 'event_id', eid, None)
      else:
        self._dead(st, act, CONFLICT, event,
                   f'event_id {eid!r} of key {st.key!r} was already published as sequence '
                   f'{r_pub} with different content', conflicts_with=eid,
                   conflicts_with_sequence=r_pub)
      return
    new = (event, eid, ts, pt)
    held = st.held.get(eid)
    if held is not None:
      # Same event_id twice while waiting: the smaller (event_time, fingerprint) stays.
      keep, drop = ((new, held) if (_order(new), _fp(event)) < (_order(held), _fp(held[_EV]))
                    else (held, new))
      if keep is new:
        self._unhold_by_time(st, eid)
        self._hold_by_time(st, new)
      if _same(keep[_EV], drop[_EV]):
        self._duplicate(st, act, drop[_EV], 'event_id', eid, None)
      else:
        self._dead(st, act, CONFLICT, drop[_EV],
                   f'event_id {eid!r} of key {st.key!r} arrived twice with different content; '
                   f'kept the one at event_time {_order(keep)[0]}', conflicts_with=eid)
      return
    order = _order(new)
    if st.last_order is not None and order <= st.last_order:
      self._dead(st, act, LATE, event,
                 f'event_time {order[0]} of key {st.key!r} arrived after the key published up to '
                 f'event_time {st.last_order[0]} (event_id {st.last_order[1]!r}); publishing it now '
                 'would break event-time order', published_up_to=list(st.last_order))
      return
    self._hold_by_time(st, new)
    if len(st.held) > self.config.max_held:
      self._release_by_time(st, act, len(st.held) - self.config.max_held)

  def _hold_by_time(self, st: KeyState, h: Held) -> None:
    st.held[h[_ID]] = h
    bisect.insort(st.held_order, _order(h))
    self._note_wait(st, h[_TS], h[_PT])

  def _unhold_by_time(self, st: KeyState, eid: str) -> None:
    h = st.held.pop(eid)
    i = bisect.bisect_left(st.held_order, _order(h))
    del st.held_order[i]
    self._recompute_wait(st)

  def _release_by_time(self, st: KeyState, act: Activation, count: int) -> None:
    """Publish the ``count`` earliest waiting events, in (event_time, event_id) order."""
    take, st.held_order = st.held_order[:count], st.held_order[count:]
    for order in take:
      h = st.held.pop(order[1])
      out = dict(h[_EV])
      out['sequence'] = st.next_pub
      out['raw_sequence'] = h[_EV].get('sequence')
      act.published.append((out, h[_TS]))
      st.recent[h[_ID]] = (h[_ID], h[_EV], st.next_pub)
      st.next_pub += 1
      st.published += 1
      st.last_order = order
    while len(st.recent) > self.config.history:
      del st.recent[next(iter(st.recent))]
    self._recompute_wait(st)

  def _release_due_by_time(self, st: KeyState, act: Activation, now_et, now_pt) -> None:
    """Publish every waiting event whose own hold is over, with all that sorts before it."""
    c = self.config
    last_due = -1
    for i, order in enumerate(st.held_order):
      h = st.held[order[1]]
      ts, pt = h[_TS], h[_PT]
      if ((c.max_wait_event_time is not None and ts is not None and now_et is not None and
           now_et >= ts + c.max_wait_event_time) or
          (c.max_wait_processing_time is not None and pt is not None and now_pt is not None and
           now_pt >= pt + c.max_wait_processing_time)):
        last_due = i
    if last_due >= 0:
      self._release_by_time(st, act, last_due + 1)

  # -- time -------------------------------------------------------------------------------------

  def deadlines(self, st: KeyState) -> Tuple[Optional[int], Optional[int]]:
    """When the key's oldest waiting event's hold ends, in event time and processing time."""
    if not st.held:
      return None, None
    c = self.config
    et = (st.wait_since_et + c.max_wait_event_time
          if c.max_wait_event_time is not None and st.wait_since_et is not None else None)
    pt = (st.wait_since_pt + c.max_wait_processing_time
          if c.max_wait_processing_time is not None and st.wait_since_pt is not None else None)
    return et, pt

  def on_time(self, st: KeyState, now_et: Optional[int] = None, now_pt: Optional[int] = None,
              into: Optional[Activation] = None) -> Activation:
    """Time passed (a timer fired): end the holds that are over."""
    act = Activation() if into is None else into
    if not self._by_raw:
      self._release_due_by_time(st, act, now_et, now_pt)
      return act
    while st.held:   # each skip publishes a run; what still waits may be due too
      et, pt = self.deadlines(st)
      if et is not None and now_et is not None and now_et >= et:
        self._skip_gap(st, act, EVENT_TIME_LIMIT)
      elif pt is not None and now_pt is not None and now_pt >= pt:
        self._skip_gap(st, act, PROCESSING_TIME_LIMIT)
      else:
        break
    return act

  def finish(self, st: KeyState, into: Optional[Activation] = None) -> Activation:
    """The input ended (bounded): close every hole, publish everything held."""
    act = Activation() if into is None else into
    if self._by_raw:
      while st.held:
        self._skip_gap(st, act, END_OF_INPUT)
    else:
      self._release_by_time(st, act, len(st.held_order))
    return act


_TRIGGER_TEXT = {
    EVENT_TIME_LIMIT: 'the event-time hold limit',
    PROCESSING_TIME_LIMIT: 'the processing-time hold limit',
    MAX_HELD: 'holding the most events a key may hold (max_held)',
    END_OF_INPUT: 'the end of the input',
}


# -- bounded, in plain Python ----------------------------------------------------------------------

def batch_order(config: ResequenceConfig, events: Iterable[Tuple[Any, Any]]) -> List[Tuple[Any, Any]]:
  """One key's ``(event, payload)`` pairs in the order the batch expansion feeds them:
  what cannot be ordered first (it is only reported), then by raw sequence (or
  event time), copies of one slot by ``(event_time, event_id)``. Feeding a key's
  events in this order gives the same result as any arrival order in which
  every copy of a slot waits for it together (see the module docstring)."""
  bad, good = [], []
  by_raw = config.order_by == RAW_SEQUENCE
  for ev, payload in events:
    if ((type(ev) is not dict and not isinstance(ev, abc.Mapping)) or
        type(ev.get('event_id')) is not str):
      bad.append((ev, payload))
      continue
    if by_raw:
      if sequence_problem(ev.get('sequence')) is not None:
        bad.append((ev, payload))
        continue
      good.append(((ev['sequence'], _event_time(ev), ev['event_id']), ev, payload))
    else:
      t = ev.get('event_time')
      if isinstance(t, bool) or not isinstance(t, int):
        bad.append((ev, payload))
        continue
      good.append(((t, ev['event_id']), ev, payload))
  good.sort(key=lambda g: g[0])
  return bad + [(ev, payload) for _, ev, payload in good]


def resequence_key(rs: Resequencer, key: Any, events: Iterable[Tuple[Any, Any]]
                   ) -> Tuple[Activation, Dict[str, Any]]:
  """All of one key's ``(event, payload)`` pairs of a bounded input, in :func:`batch_order`,
  then the end of the input: what the key publishes, dead-letters and drops, and its stats."""
  st = rs.new_state(key)
  act = Activation()
  receive = rs.receive
  for ev, _ in batch_order(rs.config, events):
    receive(st, ev, None, None, act)
  rs.finish(st, act)
  return act, rs.stats(st)


@dataclasses.dataclass
class ResequenceResult:
  """What :func:`resequence` gives: the same three outputs as the Beam transform, plus
  each key's stats."""
  published: List[Dict[str, Any]]
  dead_letters: List[Dict[str, Any]]
  duplicates: List[Dict[str, Any]]
  stats: List[Dict[str, Any]]


def resequence(events: Iterable[Any], config: ResequenceConfig = ResequenceConfig()
               ) -> ResequenceResult:
  """Resequence bounded raw envelopes in plain Python: exactly what the Beam
  transform's batch expansion publishes (and what the streaming expansion
  publishes once the input ends, when no hold limit fired). Deterministic: the
  result does not depend on the order of ``events``."""
  by_key: Dict[Any, List[Tuple[Any, None]]] = {}
  invalid: List[Dict[str, Any]] = []
  rs = Resequencer(config)
  for ev in events:
    key, problem = key_of(ev)
    if problem is not None:
      invalid.append(rs.invalid_key(ev if isinstance(ev, abc.Mapping) else None, problem))
      continue
    by_key.setdefault(key, []).append((ev, None))
  published, dead, dups, stats = [], list(invalid), [], []
  for key in sorted(by_key, key=repr):
    act, key_stats = resequence_key(rs, key, by_key[key])
    published.extend(env for env, _ in act.published)
    dead.extend(act.dead_letters)
    dups.extend(act.duplicates)
    stats.append(key_stats)
  for _ in invalid:   # counted under key None, as the Beam transform does
    stats.append(rs.stats(KeyState(key=None, received=1, dead_lettered=1,
                                   by_reason={INVALID_KEY: 1})))
  return ResequenceResult(published, dead, dups, stats)


def published_sequences(events: Iterable[Any], config: ResequenceConfig = ResequenceConfig()
                        ) -> Dict[str, Tuple[Any, int]]:
  """``event_id -> (partition_key, published sequence)`` for bounded raw events: the
  numbering rule of the published stream, for any producer that must agree with
  it (the event writer numbers each key's accepted events 1, 2, 3 ... in
  acceptance order and answers a repeated event_id with its first receipt; its
  output, read back as raw events, is numbered identically here)."""
  return {env['event_id']: (env['partition_key'], env['sequence'])
          for env in resequence(events, config).published}


def key_of(event: Any) -> Tuple[Any, Optional[str]]:
  """``(partition_key, None)`` or ``(None, why it has none)``; keys are non-empty strings,
  as in the envelope."""
  if not isinstance(event, abc.Mapping):
    return None, f'not an envelope: {type(event).__name__}'
  key = event.get('partition_key')
  if not isinstance(key, str) or not key:
    return None, f'partition_key must be a non-empty string, got {key!r}'
  return key, None
