"""Per-key ordering decisions in plain Python: the algorithm behind ProcessInOrder.

Everything :class:`transforms.ordering.ProcessInOrder` decides for one key lives
here, free of Beam, so that property tests can hit it directly and the Beam
DoFn stays a thin wrapper that only moves state in and out of Beam's state
cells and sets timers:

* which sequence number a key expects next, and what it does with an event
  that is early (buffer it), a copy (``duplicate``), below the key's first
  number (``before_initial``), not a 64-bit integer (``invalid_sequence``), or
  early while the buffer is full (``buffer_overflow``);
* applying the handler strictly in sequence order, each number once, and what a
  raising handler means (``handler_error``; by default the key then stops, like
  Beam Java's ``OrderedEventProcessor``, and later events stay buffered);
* gap timeouts (``hold``: keep waiting and say so in status; ``skip``: move past
  the missing numbers, report them with reason ``gap_timeout``, and send any of
  them that turn up later to ``unprocessed`` with the same reason);
* a cap on how many events one activation applies, so a released backlog of
  thousands is drained over several timer firings instead of one huge bundle.

The handler protocol (what a consumer writes) is :class:`Handler`. Times given
to this module are integers in one unit of the caller's choice (the Beam
wrapper uses microseconds); the core only compares them.

Accounting invariant, per key, at every moment::

    received == processed + buffered + unprocessed_inputs

where ``unprocessed_inputs`` counts the unprocessed records that carry an input
event (every one except the gap report of a ``skip``, which carries none).
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import (Any, Dict, Iterable, List, Optional,
                    Protocol, Tuple)

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

DUPLICATE = 'duplicate'
BEFORE_INITIAL = 'before_initial'
INVALID_SEQUENCE = 'invalid_sequence'
INVALID_KEY = 'invalid_key'
HANDLER_ERROR = 'handler_error'
BUFFER_OVERFLOW = 'buffer_overflow'
GAP_TIMEOUT = 'gap_timeout'
REASONS = (DUPLICATE, BEFORE_INITIAL, INVALID_SEQUENCE, INVALID_KEY,
           HANDLER_ERROR, BUFFER_OVERFLOW, GAP_TIMEOUT)

HOLD = 'hold'
SKIP = 'skip'
GAP_POLICIES = (HOLD, SKIP)


class Handler(Protocol):
  """A per-key consumer: state + event -> new state + outputs, in plain Python.

  ``ProcessInOrder`` calls ``initial_state(key)`` once per key (lazily, before
  the key's first applied event) and then ``apply`` for each of the key's
  events strictly in sequence order, each sequence number at most once. The
  state must be picklable (Beam keeps it in state cells with a PickleCoder) and
  ``apply`` should not mutate its input state in place if it raises, because a
  raising call leaves the previous state in force. Outputs may be any picklable
  values; they are emitted as ``(key, output)``. Returning no outputs is fine.
  """

  def initial_state(self, key: str) -> Any:
    ...

  def apply(self, state: Any, event: Any) -> Tuple[Any, Iterable[Any]]:
    ...


@dataclasses.dataclass(frozen=True)
class OrderingConfig:
  """The per-key policy. See ``ProcessInOrder`` for the user-facing options."""
  initial_sequence: int = 1
  # Most events one key may hold waiting for a gap; None means unbounded. An
  # early event that arrives while the key already holds this many is not kept:
  # it goes to unprocessed as buffer_overflow (the buffered ones stay).
  max_buffered_per_key: Optional[int] = None
  # Time a key may wait on a gap, in event time / processing time (caller's
  # unit), measured from the moment the key started waiting (its first buffered
  # event since it last made progress). None: wait forever.
  gap_timeout_event_time: Optional[int] = None
  gap_timeout_processing_time: Optional[int] = None
  gap_policy: str = HOLD
  # False (default, like Java): after a handler error the key stops applying
  # events; later ones are buffered and show in status. True: the failing event
  # is reported and the key moves on with the state from before it.
  continue_on_handler_error: bool = False
  # Most events applied in one activation (one element or timer firing); the
  # rest of a released backlog waits for a drain timer. None: no cap.
  max_events_per_activation: Optional[int] = None

  def __post_init__(self):
    if isinstance(self.initial_sequence, bool) or not isinstance(self.initial_sequence, int):
      raise ValueError(f'initial_sequence must be an int, got {self.initial_sequence!r}')
    if not INT64_MIN < self.initial_sequence <= INT64_MAX:
      raise ValueError(f'initial_sequence {self.initial_sequence} is outside (-2**63, 2**63-1]')
    if self.gap_policy not in GAP_POLICIES:
      raise ValueError(f'gap_policy must be one of {GAP_POLICIES}, got {self.gap_policy!r}')
    for name in ('max_buffered_per_key', 'max_events_per_activation'):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f'{name} must be a positive int or None, got {v!r}')
    for name in ('gap_timeout_event_time', 'gap_timeout_processing_time'):
      v = getattr(self, name)
      if v is not None and v < 0:
        raise ValueError(f'{name} must be >= 0 or None, got {v!r}')


class Buffer(Protocol):
  """Where a key's early events wait. Holds at most one event per sequence.

  The core only ever asks for sequences above the key's next expected one, so
  a store sorted by sequence (Beam's OrderedListState) can answer each call
  with one range read.
  """

  def contains(self, seq: int) -> bool:
    ...

  def add(self, seq: int, event: Any) -> None:
    ...

  def take_run(self, start: int, limit: Optional[int]) -> List[Tuple[int, Any]]:
    """Remove and return the contiguous run start, start+1, ... (at most limit)."""
    ...

  def first(self) -> Optional[int]:
    """The smallest buffered sequence, or None when empty."""
    ...


class DictBuffer:
  """A Buffer in a plain dict: plain-Python use, the batch expansion, and the
  ``value`` state fallback (where it is pickled with the key's state)."""

  __slots__ = ('events',)

  def __init__(self, events: Optional[Dict[int, Any]] = None):
    self.events: Dict[int, Any] = {} if events is None else events

  def contains(self, seq: int) -> bool:
    return seq in self.events

  def add(self, seq: int, event: Any) -> None:
    self.events[seq] = event

  def take_run(self, start: int, limit: Optional[int]) -> List[Tuple[int, Any]]:
    run = []
    seq = start
    events = self.events
    while seq in events and (limit is None or len(run) < limit):
      run.append((seq, events.pop(seq)))
      seq += 1
    return run

  def first(self) -> Optional[int]:
    return min(self.events) if self.events else None

  def __len__(self) -> int:
    return len(self.events)

  def __getstate__(self):
    return self.events

  def __setstate__(self, events):
    self.events = events


@dataclasses.dataclass
class KeyState:
  """Everything the core remembers about one key (picklable)."""
  key: Any
  next_expected: int
  handler_state: Any = None
  handler_started: bool = False
  received: int = 0
  processed: int = 0
  buffered: int = 0
  duplicates: int = 0
  unprocessed: int = 0          # unprocessed records that carry an input event
  by_reason: Dict[str, int] = dataclasses.field(default_factory=dict)
  blocked_at: Optional[int] = None   # sequence whose handler raised (key stopped)
  skipped: List[Tuple[int, int]] = dataclasses.field(default_factory=list)  # inclusive ranges
  gap_since_event_time: Optional[int] = None
  gap_since_processing_time: Optional[int] = None
  gap_timed_out: bool = False
  backlog: bool = False         # a contiguous run waits for the drain timer
  last_event_time: Optional[int] = None
  initial: int = 1

  @property
  def last_processed(self) -> Optional[int]:
    """The highest sequence the key has moved past (applied, failed or skipped)."""
    return None if self.next_expected == self.initial else self.next_expected - 1


@dataclasses.dataclass
class Activation:
  """What one call into the core produced."""
  outputs: List[Tuple[Any, Any]] = dataclasses.field(default_factory=list)
  unprocessed: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
  status: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

  def extend(self, other: 'Activation') -> None:
    self.outputs.extend(other.outputs)
    self.unprocessed.extend(other.unprocessed)
    self.status.extend(other.status)


def sequence_problem(seq: Any, initial_sequence: int) -> Optional[str]:
  """None for a usable sequence, else the reason it cannot be ordered."""
  if isinstance(seq, bool) or not isinstance(seq, int):
    return INVALID_SEQUENCE
  if seq < INT64_MIN or seq > INT64_MAX:
    return INVALID_SEQUENCE
  if seq < initial_sequence:
    return BEFORE_INITIAL
  return None


class Orderer:
  """Applies one handler to each key's events in sequence order.

  Stateless itself: every call takes the key's :class:`KeyState` and
  :class:`Buffer`, mutates them, and returns an :class:`Activation`.
  """

  def __init__(self, handler: Handler, config: OrderingConfig = OrderingConfig()):
    self.handler = handler
    self.config = config

  # -- state ---------------------------------------------------------------

  def new_state(self, key: Any) -> KeyState:
    return KeyState(key=key, next_expected=self.config.initial_sequence,
                    initial=self.config.initial_sequence)

  def status(self, st: KeyState, buf: Buffer, trigger: str) -> Dict[str, Any]:
    """The key's status record: progress, backlog and every counter."""
    return {
        'key': st.key,
        'trigger': trigger,
        'last_processed': st.last_processed,
        'next_expected': st.next_expected,
        'buffered': st.buffered,
        'first_buffered': buf.first() if st.buffered else None,
        'received': st.received,
        'processed': st.processed,
        'duplicates': st.duplicates,
        'unprocessed': st.unprocessed,
        'unprocessed_by_reason': dict(sorted(st.by_reason.items())),
        'blocked_at': st.blocked_at,
        'gap_timed_out': st.gap_timed_out,
        'gaps_skipped': len(st.skipped),
        'backlog': st.backlog,
    }

  # -- events --------------------------------------------------------------

  def receive(self, st: KeyState, buf: Buffer, seq: Any, event: Any,
              event_time: Optional[int] = None,
              processing_time: Optional[int] = None,
              into: Optional[Activation] = None) -> Activation:
    """One event of the key arrived: apply it (and what it unblocks), buffer it,
    or report it. Results go to ``into`` (a new Activation if None), which is
    returned: passing one saves an allocation per event on the batch path."""
    act = Activation() if into is None else into
    st.received += 1
    if event_time is not None and (st.last_event_time is None or event_time > st.last_event_time):
      st.last_event_time = event_time
    problem = sequence_problem(seq, self.config.initial_sequence)
    if problem is not None:
      self._reject(st, act, problem, seq, event)
      return act
    if seq < st.next_expected:
      reason = GAP_TIMEOUT if self._was_skipped(st, seq) else DUPLICATE
      self._reject(st, act, reason, seq, event)
      return act
    if seq == st.next_expected and st.blocked_at is None and not st.backlog:
      self._apply(st, act, seq, event)
      if st.buffered or st.gap_since_event_time is not None or st.gap_since_processing_time is not None:
        self._release(st, buf, act, self._cap(already=1), event_time, processing_time)
      else:
        st.gap_timed_out = False  # what _release concludes for an empty buffer
      return act
    # Early (or the key is stopped / draining): it has to wait.
    if buf.contains(seq):
      self._reject(st, act, DUPLICATE, seq, event)
      return act
    cap = self.config.max_buffered_per_key
    if cap is not None and st.buffered >= cap:
      self._reject(st, act, BUFFER_OVERFLOW, seq, event,
                   detail=f'key already buffers {st.buffered} events (max_buffered_per_key={cap})')
      return act
    buf.add(seq, event)
    st.buffered += 1
    if st.gap_since_event_time is None and event_time is not None:
      st.gap_since_event_time = event_time
    if st.gap_since_processing_time is None and processing_time is not None:
      st.gap_since_processing_time = processing_time
    return act

  def drain(self, st: KeyState, buf: Buffer, event_time: Optional[int] = None,
            processing_time: Optional[int] = None,
            into: Optional[Activation] = None) -> Activation:
    """Continue a backlog cut short by ``max_events_per_activation``."""
    act = Activation() if into is None else into
    if st.backlog:
      st.backlog = False
      self._release(st, buf, act, self._cap(), event_time, processing_time)
    return act

  def on_time(self, st: KeyState, buf: Buffer, event_time: Optional[int] = None,
              processing_time: Optional[int] = None) -> Activation:
    """Time passed (a timer fired): act on a gap that waited too long."""
    act = Activation()
    if not self.gap_expired(st, event_time, processing_time):
      return act
    if self.config.gap_policy == SKIP:
      self._skip_gap(st, buf, act, event_time, processing_time)
    else:
      st.gap_timed_out = True
      act.status.append(self.status(st, buf, 'gap_timeout'))
    return act

  def finish(self, st: KeyState, buf: Buffer) -> Activation:
    """The input ended (bounded input, watermark at infinity): drain any
    backlog, then apply an event-time gap timeout to what still waits, exactly
    as the streaming timers would once the watermark passed every deadline."""
    act = Activation()
    while True:
      act.extend(self.drain(st, buf))
      if st.backlog:
        continue
      if self.config.gap_timeout_event_time is None or not self._waiting_on_gap(st):
        break
      if self.config.gap_policy == SKIP:
        self._skip_gap(st, buf, act, None, None)
      else:
        if not st.gap_timed_out:
          st.gap_timed_out = True
          act.status.append(self.status(st, buf, 'gap_timeout'))
        break
    return act

  # -- deadlines for the wrapper's timers ------------------------------------

  def _waiting_on_gap(self, st: KeyState) -> bool:
    return st.buffered > 0 and st.blocked_at is None and not st.backlog

  def gap_expired(self, st: KeyState, event_time: Optional[int],
                  processing_time: Optional[int]) -> bool:
    if not self._waiting_on_gap(st):
      return False
    et, pt = self.gap_deadlines(st)
    return ((et is not None and event_time is not None and event_time >= et) or
            (pt is not None and processing_time is not None and processing_time >= pt))

  def gap_deadlines(self, st: KeyState) -> Tuple[Optional[int], Optional[int]]:
    """When the current gap times out in event time and in processing time."""
    if not self._waiting_on_gap(st) or (st.gap_timed_out and self.config.gap_policy == HOLD):
      return None, None
    c = self.config
    et = (st.gap_since_event_time + c.gap_timeout_event_time
          if c.gap_timeout_event_time is not None and st.gap_since_event_time is not None else None)
    pt = (st.gap_since_processing_time + c.gap_timeout_processing_time
          if c.gap_timeout_processing_time is not None and st.gap_since_processing_time is not None
          else None)
    return et, pt

  # -- internals -------------------------------------------------------------

  def _cap(self, already: int = 0) -> Optional[int]:
    cap = self.config.max_events_per_activation
    return None if cap is None else max(cap - already, 0)

  def _was_skipped(self, st: KeyState, seq: int) -> bool:
    i = bisect.bisect_right(st.skipped, (seq, INT64_MAX + 1)) - 1
    return i >= 0 and st.skipped[i][0] <= seq <= st.skipped[i][1]

  def _reject(self, st: KeyState, act: Activation, reason: str, seq: Any, event: Any,
              detail: Optional[str] = None) -> None:
    st.unprocessed += 1
    st.by_reason[reason] = st.by_reason.get(reason, 0) + 1
    if reason == DUPLICATE:
      st.duplicates += 1
    rec = {'key': st.key, 'sequence': seq, 'reason': reason, 'event': event}
    if detail:
      rec['detail'] = detail
    act.unprocessed.append(rec)

  def _apply(self, st: KeyState, act: Activation, seq: int, event: Any) -> None:
    try:
      if not st.handler_started:
        st.handler_state = self.handler.initial_state(st.key)
        st.handler_started = True
      new_state, outs = self.handler.apply(st.handler_state, event)
      outs = list(outs) if outs is not None else []
    except Exception as e:  # the handler is user code: report, never crash the pipeline
      self._reject(st, act, HANDLER_ERROR, seq, event, detail=f'{type(e).__name__}: {e}')
      st.next_expected = seq + 1
      if not self.config.continue_on_handler_error:
        st.blocked_at = seq
      return
    st.handler_state = new_state
    st.processed += 1
    st.next_expected = seq + 1
    if outs:
      key = st.key
      act.outputs.extend((key, o) for o in outs)

  def _release(self, st: KeyState, buf: Buffer, act: Activation, limit: Optional[int],
               event_time: Optional[int], processing_time: Optional[int]) -> None:
    """Apply the buffered run that now continues the key's sequence."""
    while st.buffered and st.blocked_at is None:
      if limit is not None and limit <= 0:
        st.backlog = buf.contains(st.next_expected)
        break
      run = buf.take_run(st.next_expected, limit)
      if not run:
        break
      st.buffered -= len(run)
      if limit is not None:
        limit -= len(run)
      for i, (seq, event) in enumerate(run):
        self._apply(st, act, seq, event)
        if st.blocked_at is not None:
          # Put back what the stopped key may no longer apply.
          for seq2, event2 in run[i + 1:]:
            buf.add(seq2, event2)
            st.buffered += 1
          break
    # The key made progress: a wait on what is still buffered starts now.
    st.gap_timed_out = False
    if st.buffered:
      st.gap_since_event_time = event_time
      st.gap_since_processing_time = processing_time
    else:
      st.gap_since_event_time = st.gap_since_processing_time = None

  def _skip_gap(self, st: KeyState, buf: Buffer, act: Activation,
                event_time: Optional[int], processing_time: Optional[int]) -> None:
    first = buf.first()
    if first is None or first <= st.next_expected:
      return
    missing = (st.next_expected, first - 1)
    st.skipped.append(missing)
    act.unprocessed.append({
        'key': st.key, 'sequence': missing[0], 'reason': GAP_TIMEOUT, 'event': None,
        'missing_from': missing[0], 'missing_to': missing[1],
        'detail': f'skipped missing sequences {missing[0]}..{missing[1]} after gap timeout'})
    st.next_expected = first
    self._release(st, buf, act, self._cap(), event_time, processing_time)


def process_key(orderer: Orderer, key: Any, events: Iterable[Tuple[Any, Any]],
                event_time: Optional[int] = None) -> Tuple[KeyState, DictBuffer, Activation]:
  """Run one key's (sequence, event) pairs through the core in the given order,
  then finish as bounded input does. The reference for tests and the batch path."""
  st = orderer.new_state(key)
  buf = DictBuffer()
  act = Activation()
  receive = orderer.receive
  for seq, event in events:
    receive(st, buf, seq, event, event_time, None, act)
    while st.backlog:
      orderer.drain(st, buf, event_time, None, act)
  act.extend(orderer.finish(st, buf))
  return st, buf, act


def batch_order(events: Iterable[Tuple[Any, Any]], initial_sequence: int) -> List[Tuple[Any, Any]]:
  """One key's (sequence, event) pairs in the order the batch expansion feeds
  them: unusable sequences first (they are only reported), then by sequence;
  the sort is stable, so of two copies of one sequence the first seen is kept."""
  bad, good = [], []
  for seq, ev in events:
    (bad if sequence_problem(seq, initial_sequence) else good).append((seq, ev))
  good.sort(key=lambda p: p[0])
  return bad + good
