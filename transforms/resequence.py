"""Resequence: the publishing step that gives every partition key 1, 2, 3 ... with no hole.

Validated-but-raw envelopes in (``sequence`` is the source's raw sequence, or
None for streams without one), the published stream out::

    result = envelopes | Resequence(source='raw.jsonl')
    result.published     # envelopes, sequence = 1, 2, 3 ... per key, raw_sequence = provenance
    result.dead_letters  # {reason, detail, key, ...}: gap, conflict, late, ...
    result.duplicates    # one record per copy dropped (duplicates_dropped = its count)
    result.stats         # one record per key at the end of bounded input

The rule, the options' meaning and every dead-letter reason are in
:mod:`transforms.resequence_core`, which decides everything in plain Python;
this module only moves a key's state in and out of Beam and sets its timers.

Two expansions, one rule (like :class:`transforms.ordering.ProcessInOrder`):

* ``batch`` (default for bounded input): GroupByKey, each key's events sorted
  by raw sequence (or event time) and run through the core once, then the end
  of input closes every hole. No state, no timers: the fast path for
  ``run.py publish`` and the main job. Deterministic whatever the input order.
* ``streaming`` (default for unbounded input): a stateful DoFn in the global
  window, built by :func:`make_resequence_fn` (one ReadModifyWrite cell per
  key holding the core's ``KeyState``; an event-time timer for the hold limit
  and the end of bounded input; a processing-time timer only when
  ``gap_timeout_processing`` is set, because a processing-time timer sends a
  whole DirectRunner pipeline to the bundle-based runner and keeps it off
  Prism). No OrderedListState, so it runs on every runner here (FnApiRunner,
  bundle-based direct runner, Prism, Flink).

On bounded input both expansions publish the same envelopes with the same
sequences, dead letters and duplicates (tested), unless a hold limit fires
before the input ends (only possible with a TestStream-like source), or two
copies of one raw sequence arrive on either side of the moment it is
published: then the first one stays published (the batch expansion picks the
smaller ``(event_time, event_id)``), and with different content the other is
the conflict. The published sequences are the same either way.

On Beam's bundle-based direct runner (TestStream, or a processing-time timer on
the DirectRunner), what the end of a bounded input releases in the streaming
expansion comes from a timer after the watermark reached infinity, and every
downstream GroupByKey (``assert_that``'s too) drops it as late: that runner does
not hold the watermark for timers. Bounded input takes the batch expansion by
default; the FnApiRunner, Prism and Flink hold it.

Timestamps: each published envelope keeps its input element's timestamp (in
both expansions), also when a timer releases it, so its event-time window
downstream is the one it would have had without the hold. An event held for a
gap is emitted up to ``gap_timeout`` after the watermark passed it: window the
published stream with ``allowed_lateness`` of at least ``gap_timeout`` (the
live archive allows a day). Dead letters, duplicates and stats emitted by a
timer carry the key's latest input timestamp.

Counters (Beam metrics, namespace ``resequence``): ``received``, ``published``,
``duplicates_dropped``, ``dead_lettered`` (events), ``gaps`` (gap records),
``missing_raw_sequences``. For a summary that holds on every runner, count the
PCollections (``duplicates`` -> ``duplicates_dropped``) or combine ``stats``
with :class:`SummarizeStats`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Tuple, Union

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import PickleCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from sourcebeam.transforms.errors import ConfigError
from sourcebeam.transforms.expansions import check_expansion, chosen_expansion
from sourcebeam.transforms.resequence_core import (
    DEFAULT_HISTORY, DEFAULT_MAX_HELD, EVENT_TIME, FIRST_SEEN, GAP, INVALID_KEY, RAW_SEQUENCE, SOURCE,
    Activation, KeyState, ResequenceConfig, Resequencer, batch_order, key_of)
from sourcebeam.transforms.timing import in_global_window

__all__ = ['Resequence', 'Resequenced', 'SummarizeStats', 'summarize_stats', 'make_resequence_fn',
           'ResequenceConfig', 'RAW_SEQUENCE', 'EVENT_TIME', 'FIRST_SEEN']

PUBLISHED = 'published'
DEAD_LETTERS = 'dead_letters'
DUPLICATES = 'duplicates'
STATS = 'stats'

DEFAULT_GAP_TIMEOUT = 300.0            # seconds of event time
DEFAULT_GAP_TIMEOUT_PROCESSING = 60.0  # seconds of wall-clock time

# Timers fire at millisecond precision: deadlines are rounded up to whole milliseconds.
_END_MICROS = window.GlobalWindow().max_timestamp().micros // 1000 * 1000


def _ceil_millis(micros: int) -> int:
  return -(-micros // 1000) * 1000


def _seconds_to_micros(seconds: Optional[float]) -> Optional[int]:
  return None if seconds is None else int(round(seconds * 1_000_000))


class Resequenced(NamedTuple):
  """The four outputs of :class:`Resequence`."""
  published: beam.PCollection
  dead_letters: beam.PCollection
  duplicates: beam.PCollection
  stats: beam.PCollection


class _Counters:
  """The step's Beam metrics."""

  def __init__(self):
    c = lambda name: Metrics.counter('resequence', name)  # noqa: E731
    self.received = c('received')
    self.published = c('published')
    self.duplicates = c('duplicates_dropped')
    self.dead = c('dead_lettered')
    self.gaps = c('gaps')
    self.missing = c('missing_raw_sequences')

  def count_stats(self, stats: Dict[str, Any]) -> None:
    """A key's whole run at once (the batch expansion)."""
    for counter, name in ((self.received, 'received'), (self.published, 'published'),
                          (self.duplicates, 'duplicates_dropped'), (self.dead, 'dead_lettered'),
                          (self.gaps, 'gaps'), (self.missing, 'missing_raw_sequences')):
      if stats[name]:
        counter.inc(stats[name])

  def count(self, act: Activation, received: int = 0) -> None:
    if received:
      self.received.inc(received)
    if act.published:
      self.published.inc(len(act.published))
    if act.duplicates:
      self.duplicates.inc(len(act.duplicates))
    if act.dead_letters:
      gaps = [d for d in act.dead_letters if d['reason'] == GAP]
      if len(gaps) < len(act.dead_letters):
        self.dead.inc(len(act.dead_letters) - len(gaps))
      if gaps:
        self.gaps.inc(len(gaps))
        self.missing.inc(sum(g['count'] for g in gaps))


def _emit(act: Activation, other_ts: Optional[int], current_ts: Optional[int] = None):
  """An Activation as the DoFn's outputs. Published envelopes carry their own input
  timestamp (``current_ts``, the element's, needs no restamping); the rest carry
  ``other_ts`` (None: the current element's or timer's)."""
  for env, ts in act.published:
    yield (env if ts is None or ts == current_ts else
           window.TimestampedValue(env, Timestamp(micros=ts)))
  for tag, recs in ((DEAD_LETTERS, act.dead_letters), (DUPLICATES, act.duplicates)):
    for rec in recs:
      yield pvalue.TaggedOutput(
          tag, rec if other_ts is None else window.TimestampedValue(rec, Timestamp(micros=other_ts)))


class _KeyEvents(beam.DoFn):
  """envelope -> (partition_key, (envelope, timestamp micros)); no usable key -> dead letter."""

  def __init__(self, config: ResequenceConfig, key_fn: Optional[Callable[[Any], str]] = None):
    self._config = config
    self._key_fn = key_fn

  def setup(self):
    self._rs = Resequencer(self._config)
    self._counters = _Counters()

  def process(self, event, ts=beam.DoFn.TimestampParam):
    key, problem = key_of(event)
    if problem is None and self._key_fn is not None:
      key = self._key_fn(event)
    if problem is not None:
      self._counters.received.inc()
      self._counters.dead.inc()
      yield pvalue.TaggedOutput(DEAD_LETTERS, self._rs.invalid_key(
          event if isinstance(event, dict) else None, problem))
      # Counted in the stats too, under key None, so the run's totals add up.
      st = KeyState(key=None, received=1, dead_lettered=1, by_reason={INVALID_KEY: 1})
      yield pvalue.TaggedOutput(STATS, self._rs.stats(st))
      return
    yield key, (event, ts.micros)


def _reset(timer, due: Optional[int], was: Optional[int]) -> Optional[int]:
  """Set ``timer`` to ``due`` micros (clear it for None) unless it is already there; ``due``."""
  if due != was:
    if due is None:
      timer.clear()
    else:
      timer.set(Timestamp(micros=due))
  return due


class _ResequencerFn(beam.DoFn):
  """What both expansions hold: the core built from the config on each worker, its counters."""

  def __init__(self, config: ResequenceConfig, stats: bool):
    self._config = config
    self._stats = stats

  def setup(self):
    self._rs = Resequencer(self._config)
    self._counters = _Counters()


class _ResequenceKeyBatch(_ResequencerFn):
  """Batch expansion: one key's grouped events, sorted, through the core, then the end."""

  def process(self, kv):
    """Like the streaming expansion with the key's events arriving in raw order, then the
    end of the input: what an event publishes carries its own timestamp, a dead letter or
    duplicate the timestamp of the event that caused it, the end's records and the stats
    the key's latest timestamp."""
    key, values = kv
    rs = self._rs
    st = rs.new_state(key)
    act = Activation()
    dead, dups = act.dead_letters, act.duplicates
    dead_ts, dups_ts = [], []
    latest = None
    receive = rs.receive
    for event, ts in batch_order(self._config, values):
      if latest is None or ts > latest:
        latest = ts
      receive(st, event, ts, None, act)
      if len(dead) != len(dead_ts):
        dead_ts.extend([ts] * (len(dead) - len(dead_ts)))
      if len(dups) != len(dups_ts):
        dups_ts.extend([ts] * (len(dups) - len(dups_ts)))
    rs.finish(st, act)
    dead_ts.extend([latest] * (len(dead) - len(dead_ts)))
    stats = rs.stats(st)
    self._counters.count_stats(stats)
    for env, ts in act.published:
      yield window.TimestampedValue(env, Timestamp(micros=ts))
    for tag, recs, stamps in ((DEAD_LETTERS, dead, dead_ts), (DUPLICATES, dups, dups_ts)):
      for rec, ts in zip(recs, stamps):
        yield pvalue.TaggedOutput(tag, window.TimestampedValue(rec, Timestamp(micros=ts)))
    if self._stats:
      yield pvalue.TaggedOutput(STATS, window.TimestampedValue(stats, Timestamp(micros=latest)))


try:  # Beam's SDK worker weighs what its state cache holds; CacheAware says how.
  from apache_beam.runners.worker.statecache import CacheAware
except ImportError:  # pragma: no cover - other SDK versions
  CacheAware = object


@dataclasses.dataclass
class _Cell(CacheAware):
  """What the streaming DoFn keeps per key in its one ReadModifyWrite state.

  The SDK worker's state cache measures each cached value by walking every object it
  references (objsize), which for a key's held envelopes and history cost more than the
  resequencing itself; the cell gives an estimate of its size instead."""
  st: KeyState
  et_due: Optional[int] = None   # micros the event-time timer is set for
  pt_due: Optional[int] = None
  last_ts: Optional[int] = None  # the key's latest input timestamp
  finished: bool = False

  def get_referents_for_cache(self):
    return []

  def __sizeof__(self):
    st = self.st
    return (2048 + _HELD_EVENT_BYTES * len(st.held) +
            _HISTORY_ENTRY_BYTES * (len(st.recent) + len(st.recent_ids) + len(st.gaps)))


# Rough sizes for the state cache's weighing (an envelope with its data dict in memory; one
# history entry: a slot, an event_id string and a tuple).
_HELD_EVENT_BYTES = 1500
_HISTORY_ENTRY_BYTES = 160


class _ResequenceStreamingBase(_ResequencerFn):
  """The streaming expansion's logic; :func:`make_resequence_fn` declares state and timers."""

  def _load(self, key, state) -> _Cell:
    cell = state.read()
    return _Cell(st=self._rs.new_state(key)) if cell is None else cell

  def _now_pt(self) -> Optional[int]:
    return None if self._config.max_wait_processing_time is None else Timestamp.now().micros

  def _schedule(self, cell: _Cell, tick, tick_pt) -> None:
    """Set the timers to the key's next deadline (and the end of bounded input)."""
    et, pt = self._rs.deadlines(cell.st)
    due = []
    if et is not None:
      due.append(_ceil_millis(et))
    if not cell.finished and (self._stats or cell.st.held):
      due.append(_END_MICROS)
    cell.et_due = _reset(tick, min(min(due), _END_MICROS) if due else None, cell.et_due)
    if tick_pt is not None:
      # A pending processing-time timer keeps a pipeline running (Prism waits for it
      # after the input ended): cleared as soon as the key holds nothing.
      cell.pt_due = _reset(tick_pt, None if pt is None else _ceil_millis(pt), cell.pt_due)

  def on_element(self, element, ts: Timestamp, state, tick, tick_pt=None):
    key, event = element
    cell = self._load(key, state)
    if cell.last_ts is None or ts.micros > cell.last_ts:
      cell.last_ts = ts.micros
    act = self._rs.receive(cell.st, event, ts.micros, self._now_pt())
    self._counters.count(act, 1)
    self._schedule(cell, tick, tick_pt)
    state.write(cell)
    return _emit(act, None, ts.micros)

  def on_event_time(self, key, ts: Timestamp, state, tick, tick_pt=None):
    cell = self._load(key, state)
    cell.et_due = None
    act = self._rs.on_time(cell.st, now_et=ts.micros)
    stats = None
    if ts.micros >= _END_MICROS and not cell.finished:
      # The input ended: what the batch expansion does at the end, too.
      self._rs.finish(cell.st, act)
      cell.finished = True
      stats = self._rs.stats(cell.st) if self._stats else None
    self._counters.count(act)
    self._schedule(cell, tick, tick_pt)
    state.write(cell)
    yield from _emit(act, cell.last_ts)
    if stats is not None:
      yield pvalue.TaggedOutput(STATS, stats if cell.last_ts is None else
                                window.TimestampedValue(stats, Timestamp(micros=cell.last_ts)))

  def on_processing_time(self, key, ts: Timestamp, state, tick, tick_pt):
    cell = self._load(key, state)
    cell.pt_due = None
    act = self._rs.on_time(cell.st, now_pt=ts.micros)
    self._counters.count(act)
    self._schedule(cell, tick, tick_pt)
    state.write(cell)
    return _emit(act, cell.last_ts)


def make_resequence_fn(config: ResequenceConfig, stats: bool = True) -> beam.DoFn:
  """The streaming expansion's stateful DoFn over ``(key, envelope)``, with a
  processing-time timer declared only when ``config`` has a processing-time limit."""
  state_spec = ReadModifyWriteStateSpec('key_state', PickleCoder())
  tick_spec = TimerSpec('tick', TimeDomain.WATERMARK)
  if config.max_wait_processing_time is None:

    class ResequenceFn(_ResequenceStreamingBase):

      def process(self, element, ts=beam.DoFn.TimestampParam,
                  state=beam.DoFn.StateParam(state_spec), tick=beam.DoFn.TimerParam(tick_spec)):
        return self.on_element(element, ts, state, tick)

      @on_timer(tick_spec)
      def on_tick(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam,
                  state=beam.DoFn.StateParam(state_spec), tick=beam.DoFn.TimerParam(tick_spec)):
        return self.on_event_time(key, ts, state, tick)

    return ResequenceFn(config, stats)

  tick_pt_spec = TimerSpec('tick_pt', TimeDomain.REAL_TIME)

  class ResequenceFnWithProcessingTime(_ResequenceStreamingBase):

    def process(self, element, ts=beam.DoFn.TimestampParam,
                state=beam.DoFn.StateParam(state_spec), tick=beam.DoFn.TimerParam(tick_spec),
                tick_pt=beam.DoFn.TimerParam(tick_pt_spec)):
      return self.on_element(element, ts, state, tick, tick_pt)

    @on_timer(tick_spec)
    def on_tick(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam,
                state=beam.DoFn.StateParam(state_spec), tick=beam.DoFn.TimerParam(tick_spec),
                tick_pt=beam.DoFn.TimerParam(tick_pt_spec)):
      return self.on_event_time(key, ts, state, tick, tick_pt)

    @on_timer(tick_pt_spec)
    def on_tick_pt(self, key=beam.DoFn.KeyParam, ts=beam.DoFn.TimestampParam,
                   state=beam.DoFn.StateParam(state_spec), tick=beam.DoFn.TimerParam(tick_spec),
                   tick_pt=beam.DoFn.TimerParam(tick_pt_spec)):
      return self.on_processing_time(key, ts, state, tick, tick_pt)

  return ResequenceFnWithProcessingTime(config, stats)


class Resequence(beam.PTransform):
  """Validated raw envelopes to the published stream: per key 1, 2, 3 ... in raw order.

  Args:
    order_by: ``'raw_sequence'`` (default; an event without one is dead-lettered
      ``missing_sequence``) or ``'event_time'`` (streams without raw sequences:
      by ``(event_time, event_id)``).
    first_sequence: each key's first raw sequence: ``1`` (default), another int,
      or ``'first_seen'`` (the first to arrive; in a bounded run the lowest).
    history: raw sequences per key remembered after publishing to recognise
      duplicates and conflicts (default 1000); older copies are dead-lettered
      ``late``.
    max_held: most events a key holds waiting on a gap (default 10,000); one
      more and the key moves past the gap (dead letter ``gap``, trigger
      ``max_held``).
    gap_timeout: seconds of event time an event may wait (from its timestamp,
      by the watermark) before the key moves past the gap before it (default
      300; None: no event-time limit).
    gap_timeout_processing: the same in wall-clock seconds from its arrival
      (default 60; None: none, and no processing-time timer is declared).
      Streaming expansion only: a bounded batch run waits for the end.
    source: named in every dead letter (the input path or topic), unless the event
      carries its own (``_source``: a line's file, a message's offset).
    key_fn: the key each event is numbered under (default its ``partition_key``; an
      application's ``registry.ordering_key`` numbers per key space).
    stats: emit one stats record per key at the end of bounded input.
    expansion: ``'auto'`` (batch for bounded input), ``'batch'`` or ``'streaming'``.
  """

  def __init__(self, *,
               order_by: str = RAW_SEQUENCE,
               first_sequence: Union[int, str] = 1,
               history: int = DEFAULT_HISTORY,
               max_held: int = DEFAULT_MAX_HELD,
               gap_timeout: Optional[float] = DEFAULT_GAP_TIMEOUT,
               gap_timeout_processing: Optional[float] = DEFAULT_GAP_TIMEOUT_PROCESSING,
               source: Optional[str] = None,
               key_fn: Optional[Callable[[Any], str]] = None,
               stats: bool = True,
               expansion: str = 'auto',
               label: Optional[str] = None):
    super().__init__(label)
    self._key_fn = key_fn
    check_expansion(expansion)
    for name, v in (('gap_timeout', gap_timeout), ('gap_timeout_processing', gap_timeout_processing)):
      if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
        raise ConfigError(f'{name} must be seconds >= 0 or None, got {v!r}')
    self.config = ResequenceConfig(
        order_by=order_by, first_sequence=first_sequence, history=history, max_held=max_held,
        max_wait_event_time=_seconds_to_micros(gap_timeout),
        max_wait_processing_time=_seconds_to_micros(gap_timeout_processing),
        source=source)
    self._stats = stats
    self._expansion = expansion

  def chosen_expansion(self, pcoll: beam.PCollection) -> str:
    return chosen_expansion(self._expansion, pcoll)

  def expand(self, pcoll: beam.PCollection) -> Resequenced:
    # A key's numbering spans windows: its state must not restart per window.
    pcoll = in_global_window(pcoll, 'GlobalWindow')
    keyed = (pcoll
             | 'KeyByPartition' >> beam.ParDo(_KeyEvents(self.config, self._key_fn))
             .with_output_types(Tuple[str, Tuple[Any, Any]])
             .with_outputs(DEAD_LETTERS, STATS, main='keyed'))
    if self.chosen_expansion(pcoll) == 'batch':
      out = (keyed.keyed
             | 'GroupByKey' >> beam.GroupByKey()
             | 'ResequenceEachKey' >> beam.ParDo(_ResequenceKeyBatch(self.config, self._stats))
             .with_outputs(DEAD_LETTERS, DUPLICATES, STATS, main=PUBLISHED))
    else:
      out = (keyed.keyed
             | 'DropTimestamps' >> beam.MapTuple(lambda k, v: (k, v[0]))
             .with_output_types(Tuple[str, Any])
             | 'ResequenceEachKey' >> beam.ParDo(make_resequence_fn(self.config, self._stats))
             .with_outputs(DEAD_LETTERS, DUPLICATES, STATS, main=PUBLISHED))
    dead = (keyed[DEAD_LETTERS], out[DEAD_LETTERS]) | 'DeadLetters' >> beam.Flatten()
    stats = out[STATS]
    if self._stats:
      stats = (keyed[STATS], out[STATS]) | 'Stats' >> beam.Flatten()
    return Resequenced(out[PUBLISHED], dead, out[DUPLICATES], stats)


# -- the run's summary -------------------------------------------------------------------------

_SUMMED = ('received', 'published', 'duplicates_dropped', 'dead_lettered', 'gaps',
           'missing_raw_sequences', 'held')


def summarize_stats(stats: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
  """Per-key stats records to the run's totals (plus ``keys`` and
  ``keys_with_gaps``); ``received == published + duplicates_dropped + dead_lettered + held``."""
  acc = _SumStats().create_accumulator()
  for s in stats:
    acc = _SumStats().add_input(acc, s)
  return _SumStats().extract_output(acc)


class _SumStats(beam.CombineFn):

  def create_accumulator(self):
    return {'keys': 0, 'keys_with_gaps': 0, 'dead_lettered_by_reason': {},
            **{k: 0 for k in _SUMMED}}

  def add_input(self, acc, s):
    acc['keys'] += 0 if s['key'] is None else 1   # key None: events without a usable key
    acc['keys_with_gaps'] += 1 if s['gaps'] else 0
    for k in _SUMMED:
      acc[k] += s[k]
    for r, n in s['dead_lettered_by_reason'].items():
      acc['dead_lettered_by_reason'][r] = acc['dead_lettered_by_reason'].get(r, 0) + n
    return acc

  def merge_accumulators(self, accs):
    accs = list(accs)
    out = self.create_accumulator()
    for a in accs:
      for k in ('keys', 'keys_with_gaps') + _SUMMED:
        out[k] += a[k]
      for r, n in a['dead_lettered_by_reason'].items():
        out['dead_lettered_by_reason'][r] = out['dead_lettered_by_reason'].get(r, 0) + n
    return out

  def extract_output(self, acc):
    acc['dead_lettered_by_reason'] = dict(sorted(acc['dead_lettered_by_reason'].items()))
    return acc


class SummarizeStats(beam.PTransform):
  """``Resequenced.stats`` to one totals dict (see :func:`summarize_stats`). Dead letters
  without a key (``invalid_key``) are in ``dead_letters`` only, not in per-key stats."""

  def expand(self, stats):
    return (stats
            | 'Global' >> beam.WindowInto(window.GlobalWindows())
            | 'Sum' >> beam.CombineGlobally(_SumStats()))
