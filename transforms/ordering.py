"""ProcessInOrder: per-key ordered processing, the Python counterpart of Beam
Java's ``OrderedEventProcessor`` (sdks/java/extensions/ordered).

The talk's rule is "you can only guarantee ordering for each specific
partition key": events of one key are applied strictly in sequence order, and
different keys never wait for each other. Events arrive shuffled (parallel
producers, retries, replays), so the transform re-sequences them per key,
buffers early events, drops and reports copies, and reports or skips gaps that
never fill.

Usage::

    result = events | ProcessInOrder(CartHandler(), gap_timeout=600, gap_policy='skip')
    result.outputs      # (key, output) for each output of handler.apply
    result.unprocessed  # {key, sequence, reason, event, [detail]} for every event not applied
    result.status       # {key, last_processed, buffered, received, duplicates, ...} per key

The handler protocol (plain Python, no Beam; see
:class:`transforms.ordering_core.Handler`)::

    class Handler(Protocol):
      def initial_state(self, key: str) -> Any: ...
      def apply(self, state: Any, event: Any) -> Tuple[Any, Iterable[Any]]: ...

``apply`` is called for each key's events in sequence order, each sequence
number once; the state must be picklable (it lives in Beam state with a
PickleCoder). The algorithm itself (buffer, duplicates, gaps, status, timeout
decisions) is :mod:`transforms.ordering_core`; this module only wraps it.

Unprocessed reasons: ``duplicate`` (a sequence already applied or already
buffered: the first copy wins), ``before_initial`` (below ``initial_sequence``),
``invalid_sequence`` (not an integer in the signed 64-bit range),
``invalid_key`` (``key_fn`` failed or gave something other than a str, int or
bytes), ``handler_error`` (``detail`` holds the error text), ``buffer_overflow``
(an early event arrived while its key already buffered ``max_buffered_per_key``
events: the newcomer is reported, the buffer is kept), ``gap_timeout`` (under
``gap_policy='skip'``: one record with ``event=None`` and
``missing_from``/``missing_to`` when the key moves past a gap, and any skipped
sequence that arrives later). Per key, always:
``received == processed + buffered + unprocessed`` (the gap records carry no
event and are not counted).

Status records (see ``Orderer.status``) say why they were emitted in
``trigger``: ``final`` (end of bounded input), ``request`` (a
:class:`StatusRequest` in the input), ``interval`` / ``interval_processing``
(``status_interval*``: at most one per interval, only for keys that changed),
``gap_timeout`` (``gap_policy='hold'``: the key waits past its timeout).

Two expansions, one algorithm:

* ``batch`` (the default for bounded input): GroupByKey, sort each key's events
  by sequence in memory and run the core once per key. No per-element state
  access, so it is the fast path for archive replay. It behaves as if every
  event arrived in sequence order and then the watermark reached infinity
  (event-time gap timeouts fire on gaps that never filled, final status).
* ``streaming`` (the default for unbounded input): a stateful DoFn in the
  global window. Per-key state is the core's ``KeyState`` in a
  ReadModifyWriteState; the buffer is an ``OrderedListState`` keyed by sequence
  (``state='ordered_list'``) or, as the fallback, a dict pickled with the key's
  state (``state='value'``). ``state='auto'`` picks ``ordered_list`` only on
  ``--runner=FnApiRunner``, the one runner here where it works: Beam 2.77's
  bundle-based direct runner (TestStream, processing-time timers) and Flink
  (apache/beam#21358) lack it, and Prism 2.77 crashes on its first
  ``clear_range`` of a bundle (``panic: assignment to entry in nil map`` in
  ``engine.(*TentativeData).ClearOrderedListState``, seen here), so Prism, the
  DirectRunner (which tries Prism first) and every other runner get ``value``.
  ``value`` re-pickles a key's buffer on each event, which only costs while
  the key has a gap; ``ordered_list`` reads just the run it releases.

On bounded input both expansions give identical outputs, unprocessed records and
final status (tested), except where arrival order is the point: which of two
copies of one sequence is kept, and which early events overflow the buffer.

Timers (streaming): one event-time timer per key, set to the earliest of the
gap deadline, the next status interval, a backlog drain, and the end of the
global window (final status on bounded input); with processing-time options one
processing-time timer too (declared only then: a processing-time timer sends a
whole DirectRunner pipeline to the bundle-based runner).

Timestamps and lateness: what an arriving event releases carries that event's
timestamp (in both expansions). What an event-time timer releases (a gap
timeout, a drained backlog) carries the timer's time, e.g. the first waiting
event's timestamp + ``gap_timeout``; a processing-time timer's output carries
the key's latest event timestamp. Those can be behind the watermark
downstream: Beam 2.77's bundle-based direct runner does not hold the watermark
for pending timers, so a windowed GroupByKey after ProcessInOrder drops them as
late unless its window allows lateness (both cases tested). ProcessInOrder
itself works in the global window, where nothing is late; when you window its
outputs, set ``allowed_lateness`` to at least ``gap_timeout`` plus how far your
watermark may jump. The final status at the end of bounded input comes from a
timer at the end of the global window and has the same caveat on that runner.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import PickleCoder
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import (OrderedListStateSpec, ReadModifyWriteStateSpec,
                                              TimerSpec, on_timer)
from apache_beam.utils.timestamp import Timestamp

from sourcebeam.transforms.expansions import check_expansion, chosen_expansion
from sourcebeam.transforms.ordering_core import (HOLD, INT64_MAX, INVALID_KEY, SKIP, Activation,
                                      DictBuffer, Handler, KeyState, Orderer, OrderingConfig,
                                      batch_order)
from sourcebeam.transforms.timing import in_global_window

__all__ = ['ProcessInOrder', 'OrderedResult', 'StatusRequest', 'Handler', 'OrderingConfig',
           'HOLD', 'SKIP']

UNPROCESSED = 'unprocessed'
STATUS = 'status'
# Timers fire at millisecond precision, so every time the DoFn compares with a
# firing time is kept in whole milliseconds (as microseconds).
_END_MICROS = window.GlobalWindow().max_timestamp().micros // 1000 * 1000


def _ceil_millis(micros: int) -> int:
  return -(-micros // 1000) * 1000


class OrderedResult(NamedTuple):
  """The three outputs of ProcessInOrder."""
  outputs: beam.PCollection
  unprocessed: beam.PCollection
  status: beam.PCollection


@dataclasses.dataclass(frozen=True)
class StatusRequest:
  """Put one in the input to ask for a key's status now (trigger ``request``).

  Not an event: it is not counted as received and never reaches the handler.
  The batch expansion answers it with the key's state at the end of the input.
  """
  key: Any


def default_key(event: Any) -> Any:
  return event['partition_key']


def default_sequence(event: Any) -> Any:
  return event['sequence']


def _seconds_to_micros(seconds: Optional[float]) -> Optional[int]:
  return None if seconds is None else int(round(seconds * 1_000_000))


# Keys Beam can encode deterministically (a stateful DoFn and a GroupByKey need that).
_KEY_TYPES = (str, int, bytes)


class _KeyBySequence(beam.DoFn):
  """event -> (key, (sequence, event)); events without a usable key -> unprocessed.

  With ``with_timestamps`` (the batch expansion) the value is
  ``(sequence, (event, timestamp micros))``: a GroupByKey in the global window
  stamps its output at the end of time, so the batch path carries each event's
  own timestamp through it and gives it back to the outputs the event releases.
  """

  def __init__(self, key_fn: Callable[[Any], Any], sequence_fn: Callable[[Any], Any],
               with_timestamps: bool = False):
    self._key_fn = key_fn
    self._sequence_fn = sequence_fn
    self._with_timestamps = with_timestamps

  def process(self, event, ts=beam.DoFn.TimestampParam):
    if isinstance(event, StatusRequest):
      yield (event.key, (None, (event, ts.micros) if self._with_timestamps else event))
      return
    try:
      key = self._key_fn(event)
      problem = (None if isinstance(key, _KEY_TYPES) and not isinstance(key, bool) else
                 f'key must be str, int or bytes, got {type(key).__name__}')
    except Exception as e:  # bad input is reported, never a traceback
      key, problem = None, f'{type(e).__name__}: {e}'
    if problem is not None:
      yield pvalue.TaggedOutput(UNPROCESSED, {
          'key': None, 'sequence': None, 'reason': INVALID_KEY, 'event': event,
          'detail': f'cannot take the key: {problem}'})
      return
    try:
      seq = self._sequence_fn(event)
    except Exception:
      seq = None  # the core reports it as invalid_sequence, counted for its key
    yield (key, (seq, (event, ts.micros) if self._with_timestamps else event))


def _emit(act: Activation, timestamp: Optional[Timestamp] = None):
  """An Activation as the DoFn's main and tagged outputs."""
  if timestamp is None:
    for kv in act.outputs:
      yield kv
    for rec in act.unprocessed:
      yield pvalue.TaggedOutput(UNPROCESSED, rec)
    for rec in act.status:
      yield pvalue.TaggedOutput(STATUS, rec)
  else:
    for kv in act.outputs:
      yield window.TimestampedValue(kv, timestamp)
    for rec in act.unprocessed:
      yield pvalue.TaggedOutput(UNPROCESSED, window.TimestampedValue(rec, timestamp))
    for rec in act.status:
      yield pvalue.TaggedOutput(STATUS, window.TimestampedValue(rec, timestamp))


class _OrderKeyBatch(beam.DoFn):
  """Batch expansion: one key's grouped events, sorted, through the core."""

  def __init__(self, handler: Handler, config: OrderingConfig, final_status: bool):
    self._handler = handler
    self._config = config
    self._final_status = final_status

  def setup(self):
    self._orderer = Orderer(self._handler, self._config)

  def process(self, kv):
    """Like the streaming expansion with events arriving in sequence order:
    what an event releases carries that event's timestamp; what the end of the
    input releases (gap timeouts) and status carry the key's latest timestamp."""
    key, values = kv
    requests = 0
    events = []
    latest = None
    for seq, (event, ts) in values:
      if latest is None or ts > latest:
        latest = ts
      if isinstance(event, StatusRequest):
        requests += 1
      else:
        events.append((seq, (event, ts)))
    orderer = self._orderer
    st, buf, act = orderer.new_state(key), DictBuffer(), Activation()
    for seq, (event, ts) in batch_order(events, self._config.initial_sequence):
      orderer.receive(st, buf, seq, event, None, None, act)
      while st.backlog:
        orderer.drain(st, buf, None, None, act)
      if act.outputs or act.unprocessed:
        yield from _emit(act, Timestamp(micros=ts))
        act.outputs.clear()
        act.unprocessed.clear()
    end = orderer.finish(st, buf)
    for _ in range(requests):
      end.status.append(orderer.status(st, buf, 'request'))
    if self._final_status:
      end.status.append(orderer.status(st, buf, 'final'))
    end.status[:0] = act.status
    yield from _emit(end, Timestamp(micros=latest))


@dataclasses.dataclass
class _Cell:
  """What the streaming DoFn keeps per key in one ReadModifyWriteState."""
  st: KeyState
  buf: Optional[DictBuffer]      # the 'value' fallback's buffer; None with ordered_list
  et_due: Optional[int] = None   # micros the event-time timer is set for
  pt_due: Optional[int] = None
  next_status_et: Optional[int] = None
  next_status_pt: Optional[int] = None
  finished: bool = False
  status_mark_et: Optional[tuple] = None   # _progress_mark at the last interval status
  status_mark_pt: Optional[tuple] = None


def _progress_mark(st: KeyState) -> tuple:
  return (st.received, st.next_expected, st.buffered, st.gap_timed_out, st.blocked_at)


class _OrderedListBuffer:
  """The core's Buffer over an OrderedListState, sorted by sequence.

  Sort keys are sequence - 1: Beam's ordered list takes sort keys in
  [-2**63, 2**63 - 1), and only sequences above the key's initial one (itself
  above -2**63) are ever buffered, so Long.MAX_VALUE fits.
  """

  def __init__(self, state):
    self._state = state

  @staticmethod
  def _ts(seq: int) -> Timestamp:
    return Timestamp(micros=seq - 1)

  def contains(self, seq: int) -> bool:
    for _ in self._state.read_range(self._ts(seq), self._ts(seq + 1)):
      return True
    return False

  def add(self, seq: int, event: Any) -> None:
    self._state.add((self._ts(seq), event))

  def take_run(self, start: int, limit: Optional[int]) -> List[Tuple[int, Any]]:
    end = INT64_MAX + 1 if limit is None else min(start + limit, INT64_MAX + 1)
    run = []
    expect = start
    for ts, event in self._state.read_range(self._ts(start), self._ts(end)):
      if ts.micros + 1 != expect:
        break
      run.append((expect, event))
      expect += 1
    if run:
      self._state.clear_range(self._ts(start), self._ts(expect))
    return run

  def first(self) -> Optional[int]:
    for ts, _ in self._state.read_range(Timestamp(micros=-(1 << 63)), Timestamp(micros=INT64_MAX)):
      return ts.micros + 1
    return None


META = ReadModifyWriteStateSpec('meta', PickleCoder())
BUFFER = OrderedListStateSpec('buffer', PickleCoder())


class _OrderKeyStreamingBase(beam.DoFn):
  """The streaming expansion's logic; subclasses only declare state and timers.

  (Beam reads state and timer declarations from the process signature, and a
  declared processing-time timer sends a whole DirectRunner pipeline to the
  bundle-based runner, so each combination is its own small class.)
  """

  def __init__(self, handler: Handler, config: OrderingConfig, *, final_status: bool,
               status_interval: Optional[int], status_interval_processing: Optional[int]):
    self._handler = handler
    self._config = config
    self._final_status = final_status
    self._status_interval = status_interval
    self._status_interval_pt = status_interval_processing

  def setup(self):
    self._orderer = Orderer(self._handler, self._config)

  # -- state in and out -------------------------------------------------------

  def _load(self, key, meta, ordered) -> Tuple[_Cell, Any]:
    cell = meta.read()
    if cell is None:
      cell = _Cell(st=self._orderer.new_state(key), buf=None if ordered is not None else DictBuffer())
    buf = cell.buf if ordered is None else _OrderedListBuffer(ordered)
    return cell, buf

  def _now_pt(self) -> Optional[int]:
    if self._config.gap_timeout_processing_time is None and self._status_interval_pt is None:
      return None
    return Timestamp.now().micros

  def _arm_status(self, cell: _Cell, now_et: Optional[int], now_pt: Optional[int]) -> None:
    """Start the next status interval if the key changed since its last status."""
    mark = _progress_mark(cell.st)
    if (self._status_interval is not None and cell.next_status_et is None and
        now_et is not None and mark != cell.status_mark_et and
        now_et + self._status_interval < _END_MICROS):
      cell.next_status_et = now_et + self._status_interval
    if (self._status_interval_pt is not None and cell.next_status_pt is None and
        now_pt is not None and mark != cell.status_mark_pt):
      cell.next_status_pt = now_pt + self._status_interval_pt

  def _schedule(self, cell: _Cell, now_et: int, now_pt: Optional[int], tick, tick_pt) -> None:
    """Set the key's timers to the earliest thing it waits for."""
    st = cell.st
    gap_et, gap_pt = self._orderer.gap_deadlines(st)
    due = []
    if st.backlog and tick_pt is None:
      due.append(now_et)
    if gap_et is not None:
      due.append(gap_et)
    if cell.next_status_et is not None:
      due.append(cell.next_status_et)
    if self._final_status and not cell.finished:
      due.append(_END_MICROS)
    et_due = min(_ceil_millis(min(due)), _END_MICROS) if due else None
    if et_due is not None and et_due != cell.et_due:
      tick.set(Timestamp(micros=et_due))
    cell.et_due = et_due
    if tick_pt is not None:
      due = []
      if st.backlog:
        due.append(now_pt)
      if gap_pt is not None:
        due.append(gap_pt)
      if cell.next_status_pt is not None:
        due.append(cell.next_status_pt)
      pt_due = _ceil_millis(min(due)) if due else None
      if pt_due is not None and pt_due != cell.pt_due:
        tick_pt.set(Timestamp(micros=pt_due))
      cell.pt_due = pt_due

  # -- activations -------------------------------------------------------------

  def _on_element(self, element, ts: Timestamp, meta, ordered, tick, tick_pt):
    key, (seq, event) = element
    cell, buf = self._load(key, meta, ordered)
    now_et, now_pt = ts.micros, self._now_pt()
    if isinstance(event, StatusRequest):
      act = Activation(status=[self._orderer.status(cell.st, buf, 'request')])
    else:
      act = self._orderer.receive(cell.st, buf, seq, event, event_time=now_et, processing_time=now_pt)
    self._arm_status(cell, now_et, now_pt)
    self._schedule(cell, now_et, now_pt, tick, tick_pt)
    meta.write(cell)
    return _emit(act)

  def _on_tick(self, key, ts: Timestamp, meta, ordered, tick, tick_pt):
    cell, buf = self._load(key, meta, ordered)
    st, orderer = cell.st, self._orderer
    now_et = ts.micros
    cell.et_due = None
    act = orderer.drain(st, buf, event_time=now_et)
    act.extend(orderer.on_time(st, buf, event_time=now_et))
    if cell.next_status_et is not None and now_et >= cell.next_status_et:
      # One status per interval, and only for a key that changed since the last
      # one (else a watermark jumping to infinity would fire intervals forever).
      cell.next_status_et = None
      if _progress_mark(st) != cell.status_mark_et:
        act.status.append(orderer.status(st, buf, 'interval'))
        cell.status_mark_et = _progress_mark(st)
    if now_et >= _END_MICROS and not cell.finished:
      # Bounded input ended: what the batch expansion does at the end, too.
      act.extend(orderer.finish(st, buf))
      if self._final_status:
        act.status.append(orderer.status(st, buf, 'final'))
      cell.finished = True
    now_pt = self._now_pt()
    self._arm_status(cell, now_et, now_pt)
    self._schedule(cell, now_et, now_pt, tick, tick_pt)
    meta.write(cell)
    return _emit(act)

  def _on_tick_pt(self, key, ts: Timestamp, meta, ordered, tick, tick_pt):
    cell, buf = self._load(key, meta, ordered)
    st, orderer = cell.st, self._orderer
    now_pt = ts.micros
    cell.pt_due = None
    act = orderer.drain(st, buf, processing_time=now_pt)
    act.extend(orderer.on_time(st, buf, processing_time=now_pt))
    if cell.next_status_pt is not None and now_pt >= cell.next_status_pt:
      cell.next_status_pt = None
      if _progress_mark(st) != cell.status_mark_pt:
        act.status.append(orderer.status(st, buf, 'interval_processing'))
        cell.status_mark_pt = _progress_mark(st)
    now_et = st.last_event_time if st.last_event_time is not None else 0
    self._arm_status(cell, None, now_pt)
    self._schedule(cell, now_et, now_pt, tick, tick_pt)
    meta.write(cell)
    return _emit(act, Timestamp(micros=now_et) if st.last_event_time is not None else None)


# A TimerSpec takes one callback, so each class declares its own.
TICK_V = TimerSpec('tick', TimeDomain.WATERMARK)


class _StreamValue(_OrderKeyStreamingBase):

  def process(self, element, ts=beam.DoFn.TimestampParam, meta=beam.DoFn.StateParam(META),
              tick=beam.DoFn.TimerParam(TICK_V)):
    return self._on_element(element, ts, meta, None, tick, None)

  @on_timer(TICK_V)
  def on_tick(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam,
              meta=beam.DoFn.StateParam(META), tick=beam.DoFn.TimerParam(TICK_V)):
    return self._on_tick(key, ts, meta, None, tick, None)


TICK_OL = TimerSpec('tick', TimeDomain.WATERMARK)


class _StreamOrderedList(_OrderKeyStreamingBase):

  def process(self, element, ts=beam.DoFn.TimestampParam, meta=beam.DoFn.StateParam(META),
              ordered=beam.DoFn.StateParam(BUFFER), tick=beam.DoFn.TimerParam(TICK_OL)):
    return self._on_element(element, ts, meta, ordered, tick, None)

  @on_timer(TICK_OL)
  def on_tick(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam,
              meta=beam.DoFn.StateParam(META), ordered=beam.DoFn.StateParam(BUFFER),
              tick=beam.DoFn.TimerParam(TICK_OL)):
    return self._on_tick(key, ts, meta, ordered, tick, None)


TICK_VPT = TimerSpec('tick', TimeDomain.WATERMARK)
TICK_PT_VPT = TimerSpec('tick_pt', TimeDomain.REAL_TIME)


class _StreamValuePt(_OrderKeyStreamingBase):

  def process(self, element, ts=beam.DoFn.TimestampParam, meta=beam.DoFn.StateParam(META),
              tick=beam.DoFn.TimerParam(TICK_VPT), tick_pt=beam.DoFn.TimerParam(TICK_PT_VPT)):
    return self._on_element(element, ts, meta, None, tick, tick_pt)

  @on_timer(TICK_VPT)
  def on_tick(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam,
              meta=beam.DoFn.StateParam(META), tick=beam.DoFn.TimerParam(TICK_VPT),
              tick_pt=beam.DoFn.TimerParam(TICK_PT_VPT)):
    return self._on_tick(key, ts, meta, None, tick, tick_pt)

  @on_timer(TICK_PT_VPT)
  def on_tick_pt(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam,
                 meta=beam.DoFn.StateParam(META), tick=beam.DoFn.TimerParam(TICK_VPT),
                 tick_pt=beam.DoFn.TimerParam(TICK_PT_VPT)):
    return self._on_tick_pt(key, ts, meta, None, tick, tick_pt)


TICK_OLPT = TimerSpec('tick', TimeDomain.WATERMARK)
TICK_PT_OLPT = TimerSpec('tick_pt', TimeDomain.REAL_TIME)


class _StreamOrderedListPt(_OrderKeyStreamingBase):

  def process(self, element, ts=beam.DoFn.TimestampParam, meta=beam.DoFn.StateParam(META),
              ordered=beam.DoFn.StateParam(BUFFER), tick=beam.DoFn.TimerParam(TICK_OLPT),
              tick_pt=beam.DoFn.TimerParam(TICK_PT_OLPT)):
    return self._on_element(element, ts, meta, ordered, tick, tick_pt)

  @on_timer(TICK_OLPT)
  def on_tick(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam,
              meta=beam.DoFn.StateParam(META), ordered=beam.DoFn.StateParam(BUFFER),
              tick=beam.DoFn.TimerParam(TICK_OLPT), tick_pt=beam.DoFn.TimerParam(TICK_PT_OLPT)):
    return self._on_tick(key, ts, meta, ordered, tick, tick_pt)

  @on_timer(TICK_PT_OLPT)
  def on_tick_pt(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam,
                 meta=beam.DoFn.StateParam(META), ordered=beam.DoFn.StateParam(BUFFER),
                 tick=beam.DoFn.TimerParam(TICK_OLPT), tick_pt=beam.DoFn.TimerParam(TICK_PT_OLPT)):
    return self._on_tick_pt(key, ts, meta, ordered, tick, tick_pt)


_STREAMING_FNS = {
    ('value', False): _StreamValue,
    ('ordered_list', False): _StreamOrderedList,
    ('value', True): _StreamValuePt,
    ('ordered_list', True): _StreamOrderedListPt,
}

# Runners on which OrderedListState works (Beam 2.77, checked here; see the module docstring).
_ORDERED_LIST_RUNNERS = ('FnApiRunner',)


class ProcessInOrder(beam.PTransform):
  """Apply ``handler`` to each key's events strictly in sequence order.

  Args:
    handler: the per-key consumer (:class:`transforms.ordering_core.Handler`).
    key_fn, sequence_fn: take the key and the sequence from an event; default
      ``event['partition_key']`` and ``event['sequence']`` (envelopes, or any
      dict with those fields).
    initial_sequence: each key's first sequence number (default 1).
    max_buffered_per_key: most early events one key holds; past it an early
      event goes to unprocessed as ``buffer_overflow`` (the buffer is kept).
    gap_timeout: seconds of event time a key waits on a gap (from the
      timestamp of its first event that had to wait) before ``gap_policy``.
    gap_timeout_processing: the same in processing time (streaming only).
    gap_policy: ``'hold'`` keeps waiting and emits a status with
      ``gap_timed_out=True``; ``'skip'`` moves past the missing sequences and
      reports them as ``gap_timeout``.
    continue_on_handler_error: False (default, like Java): a key whose handler
      raised stops; later events stay buffered and show in status. True: the
      failing event is reported and the key goes on with its previous state.
    max_events_per_activation: cap on events applied per element or timer
      firing; a longer released backlog drains over timer firings.
    status_interval / status_interval_processing: seconds between status
      records per key, in event / processing time (streaming expansion).
    final_status: emit one status per key at the end of bounded input.
    state: ``'auto'``, ``'ordered_list'`` or ``'value'`` (streaming expansion).
    expansion: ``'auto'`` (batch for bounded input), ``'batch'`` or
      ``'streaming'``.
  """

  def __init__(self,
               handler: Handler,
               *,
               key_fn: Callable[[Any], Any] = default_key,
               sequence_fn: Callable[[Any], Any] = default_sequence,
               initial_sequence: int = 1,
               max_buffered_per_key: Optional[int] = None,
               gap_timeout: Optional[float] = None,
               gap_timeout_processing: Optional[float] = None,
               gap_policy: str = HOLD,
               continue_on_handler_error: bool = False,
               max_events_per_activation: Optional[int] = None,
               status_interval: Optional[float] = None,
               status_interval_processing: Optional[float] = None,
               final_status: bool = True,
               state: str = 'auto',
               expansion: str = 'auto',
               label: Optional[str] = None):
    super().__init__(label)
    for name in ('initial_state', 'apply'):
      if not callable(getattr(handler, name, None)):
        raise TypeError(f'handler {handler!r} has no {name}(); see transforms.ordering_core.Handler')
    if state not in ('auto', 'ordered_list', 'value'):
      raise ValueError(f"state must be 'auto', 'ordered_list' or 'value', got {state!r}")
    check_expansion(expansion)
    for name, v in (('status_interval', status_interval),
                    ('status_interval_processing', status_interval_processing)):
      if v is not None and v <= 0:
        raise ValueError(f'{name} must be > 0 seconds, got {v!r}')
    self._handler = handler
    self._key_fn = key_fn
    self._sequence_fn = sequence_fn
    self._config = OrderingConfig(
        initial_sequence=initial_sequence,
        max_buffered_per_key=max_buffered_per_key,
        gap_timeout_event_time=_seconds_to_micros(gap_timeout),
        gap_timeout_processing_time=_seconds_to_micros(gap_timeout_processing),
        gap_policy=gap_policy,
        continue_on_handler_error=continue_on_handler_error,
        max_events_per_activation=max_events_per_activation)
    self._status_interval = _seconds_to_micros(status_interval)
    self._status_interval_pt = _seconds_to_micros(status_interval_processing)
    self._final_status = final_status
    self._state = state
    self._expansion = expansion

  def chosen_expansion(self, pcoll: beam.PCollection) -> str:
    return chosen_expansion(self._expansion, pcoll)

  def chosen_state(self, pcoll: beam.PCollection) -> str:
    if self._state != 'auto':
      return self._state
    runner = (pcoll.pipeline.options.view_as(beam.options.pipeline_options.StandardOptions).runner
              if pcoll.pipeline.options else None)
    runner_name = runner if isinstance(runner, str) else type(runner).__name__ if runner else ''
    return 'ordered_list' if runner_name.split('.')[-1] in _ORDERED_LIST_RUNNERS else 'value'

  def expand(self, pcoll: beam.PCollection) -> OrderedResult:
    # One key's order spans windows: its state must not restart per window.
    pcoll = in_global_window(pcoll, 'GlobalWindow')
    batch = self.chosen_expansion(pcoll) == 'batch'
    keyed = (pcoll
             | 'KeyBySequence' >> beam.ParDo(_KeyBySequence(self._key_fn, self._sequence_fn,
                                                            with_timestamps=batch))
             .with_output_types(Tuple[Any, Tuple[Any, Any]])
             .with_outputs(UNPROCESSED, main='keyed'))
    if batch:
      ordered = (keyed.keyed
                 | 'GroupByKey' >> beam.GroupByKey()
                 | 'OrderEachKey' >> beam.ParDo(
                     _OrderKeyBatch(self._handler, self._config, self._final_status))
                 .with_outputs(UNPROCESSED, STATUS, main='outputs'))
    else:
      uses_pt = (self._config.gap_timeout_processing_time is not None or
                 self._status_interval_pt is not None)
      fn_class = _STREAMING_FNS[(self.chosen_state(pcoll), uses_pt)]
      fn = fn_class(self._handler, self._config, final_status=self._final_status,
                    status_interval=self._status_interval,
                    status_interval_processing=self._status_interval_pt)
      ordered = (keyed.keyed
                 | 'OrderEachKey' >> beam.ParDo(fn).with_outputs(UNPROCESSED, STATUS, main='outputs'))
    unprocessed = ((keyed[UNPROCESSED], ordered[UNPROCESSED])
                   | 'Unprocessed' >> beam.Flatten())
    return OrderedResult(ordered.outputs, unprocessed, ordered[STATUS])
