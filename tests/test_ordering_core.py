"""The per-key ordering algorithm in plain Python: every scenario of issue 3 and
property tests, without Beam (transforms/ordering_core.py)."""

from typing import Any, Dict, List

import pytest
from hypothesis import given, settings, strategies as st

from sourcebeam.transforms.ordering_core import (INT64_MAX, Activation, DictBuffer, Orderer, OrderingConfig,
                                      batch_order, process_key)


class Recorder:
  """Handler whose state is the tuple of applied sequences; outputs the
  sequence, nothing for events marked silent, and raises for events marked boom."""

  def initial_state(self, key):
    return ()

  def apply(self, state, event):
    if event.get('boom'):
      raise ValueError(f'cannot apply {event["sequence"]}')
    state = state + (event['sequence'],)
    return state, ([] if event.get('silent') else [event['sequence']])


def ev(seq, key='k', **extra) -> Dict[str, Any]:
  return {'partition_key': key, 'sequence': seq, **extra}


def run(seqs, config=OrderingConfig(), events=None):
  """Feed one key's events in the given order (no timeouts fire until finish)."""
  orderer = Orderer(Recorder(), config)
  events = events if events is not None else [ev(s) for s in seqs]
  st, buf, act = process_key(orderer, 'k', [(e['sequence'], e) for e in events])
  return orderer, st, buf, act


def outputs(act: Activation) -> List[Any]:
  return [o for _, o in act.outputs]


def reasons(act: Activation) -> List[tuple]:
  return [(r['sequence'], r['reason']) for r in act.unprocessed]


def check_accounting(st, act):
  with_event = sum(1 for r in act.unprocessed if r['event'] is not None)
  assert st.received == st.processed + st.buffered + with_event
  assert st.unprocessed == with_event


def test_perfect_order():
  _, st, _, act = run([1, 2, 3, 4, 5])
  assert outputs(act) == [1, 2, 3, 4, 5]
  assert act.unprocessed == []
  assert (st.last_processed, st.buffered, st.received, st.duplicates) == (5, 0, 5, 0)
  assert st.handler_state == (1, 2, 3, 4, 5)


def test_shuffled_order_applies_in_sequence():
  _, st, _, act = run([4, 2, 5, 1, 3])
  assert outputs(act) == [1, 2, 3, 4, 5]
  assert st.handler_state == (1, 2, 3, 4, 5)
  check_accounting(st, act)


def test_missing_first_event_buffers_everything():
  orderer, st, buf, act = run([2, 3, 4])
  assert outputs(act) == []
  assert st.last_processed is None and st.buffered == 3
  status = orderer.status(st, buf, 'request')
  assert (status['next_expected'], status['first_buffered'], status['buffered']) == (1, 2, 3)
  check_accounting(st, act)


def test_missing_first_event_skipped_on_gap_timeout():
  _, st, _, act = run([3, 2], OrderingConfig(gap_timeout_event_time=10, gap_policy='skip'))
  assert outputs(act) == [2, 3]
  gap = act.unprocessed[0]
  assert (gap['reason'], gap['missing_from'], gap['missing_to'], gap['event']) == (
      'gap_timeout', 1, 1, None)


def test_gap_that_never_fills_holds_and_reports():
  orderer, st, buf, act = run([1, 2, 4, 5], OrderingConfig(gap_timeout_event_time=10))
  assert outputs(act) == [1, 2]
  assert st.buffered == 2 and st.gap_timed_out
  [status] = act.status
  assert (status['trigger'], status['gap_timed_out'], status['next_expected'],
          status['first_buffered']) == ('gap_timeout', True, 3, 4)
  check_accounting(st, act)


def test_gap_that_never_fills_without_timeout_just_waits():
  _, st, _, act = run([1, 2, 4, 5])
  assert outputs(act) == [1, 2] and act.status == [] and not st.gap_timed_out


def test_gap_filled_late_releases_in_order():
  _, st, _, act = run([1, 2, 4, 5, 6, 3])
  assert outputs(act) == [1, 2, 3, 4, 5, 6]
  assert st.buffered == 0


def test_duplicates_before_and_after_the_gap():
  _, st, _, act = run([1, 1, 2, 4, 4, 5, 2, 3, 5])
  assert outputs(act) == [1, 2, 3, 4, 5]
  # 1 and 2 were already applied; the second 4 was already buffered; the last 5 came after release.
  assert reasons(act) == [(1, 'duplicate'), (4, 'duplicate'), (2, 'duplicate'), (5, 'duplicate')]
  assert st.duplicates == 4
  check_accounting(st, act)


def test_first_copy_of_a_duplicate_wins():
  events = [ev(2, v='first'), ev(2, v='second'), ev(1)]
  _, st, _, act = run(None, events=events)
  assert act.unprocessed[0]['event']['v'] == 'second'


def test_sequence_below_initial():
  _, st, _, act = run([0, 1, -3], OrderingConfig())
  assert reasons(act) == [(0, 'before_initial'), (-3, 'before_initial')]
  _, st, _, act = run([5, 10, 11], OrderingConfig(initial_sequence=10))
  assert outputs(act) == [10, 11] and reasons(act) == [(5, 'before_initial')]


def test_long_max_and_negative_sequences():
  _, st, buf, act = run([1, INT64_MAX, INT64_MAX + 1, -1, -(1 << 63) - 1])
  assert outputs(act) == [1]
  assert reasons(act) == [(INT64_MAX + 1, 'invalid_sequence'), (-1, 'before_initial'),
                          (-(1 << 63) - 1, 'invalid_sequence')]
  assert st.buffered == 1 and buf.first() == INT64_MAX
  # Skipping the gap up to Long.MAX_VALUE applies it.
  _, st, _, act = run([1, INT64_MAX], OrderingConfig(gap_timeout_event_time=0, gap_policy='skip'))
  assert outputs(act) == [1, INT64_MAX]
  assert act.unprocessed[0]['missing_to'] == INT64_MAX - 1
  # Negative sequences work from a negative initial sequence.
  _, st, _, act = run([-8, -10, -9], OrderingConfig(initial_sequence=-10))
  assert outputs(act) == [-10, -9, -8]


@pytest.mark.parametrize('bad', ['3', None, 2.0, True, [1]])
def test_non_integer_sequences_are_invalid(bad):
  _, st, _, act = run(None, events=[ev(1), ev(bad)])
  assert reasons(act) == [(bad, 'invalid_sequence')]
  check_accounting(st, act)


def test_handler_error_stops_the_key_by_default():
  events = [ev(1), ev(2, boom=True), ev(4), ev(3)]
  orderer, st, buf, act = run(None, events=events)
  assert outputs(act) == [1]
  [err] = act.unprocessed
  assert (err['sequence'], err['reason']) == (2, 'handler_error')
  assert err['detail'] == 'ValueError: cannot apply 2'
  assert st.blocked_at == 2 and st.buffered == 2 and st.handler_state == (1,)
  status = orderer.status(st, buf, 'request')
  assert (status['blocked_at'], status['buffered'], status['first_buffered']) == (2, 2, 3)
  check_accounting(st, act)


def test_handler_error_during_backlog_release_puts_the_rest_back():
  events = [ev(1), ev(3), ev(4, boom=True), ev(5), ev(2)]
  _, st, buf, act = run(None, events=events)
  assert outputs(act) == [1, 2, 3]
  assert reasons(act) == [(4, 'handler_error')]
  assert st.buffered == 1 and buf.first() == 5


def test_handler_error_can_continue():
  events = [ev(1), ev(2, boom=True), ev(4), ev(3)]
  _, st, _, act = run(None, OrderingConfig(continue_on_handler_error=True), events=events)
  assert outputs(act) == [1, 3, 4]
  assert st.handler_state == (1, 3, 4) and st.blocked_at is None
  check_accounting(st, act)


def test_backlog_of_thousands_released_at_once():
  n = 5000
  orderer = Orderer(Recorder())
  st, buf = orderer.new_state('k'), DictBuffer()
  for s in range(n, 1, -1):
    assert orderer.receive(st, buf, s, ev(s)).outputs == []
  assert st.buffered == n - 1
  act = orderer.receive(st, buf, 1, ev(1))
  assert outputs(act) == list(range(1, n + 1))
  assert st.buffered == 0 and len(buf) == 0


def test_backlog_drains_in_capped_activations():
  n, cap = 1000, 64
  orderer = Orderer(Recorder(), OrderingConfig(max_events_per_activation=cap))
  st, buf = orderer.new_state('k'), DictBuffer()
  for s in range(2, n + 1):
    orderer.receive(st, buf, s, ev(s))
  act = orderer.receive(st, buf, 1, ev(1))
  got, activations = outputs(act), 1
  assert len(got) == cap and st.backlog
  # While draining, an arriving copy of a pending sequence is still a duplicate.
  assert reasons(orderer.receive(st, buf, cap + 1, ev(cap + 1))) == [(cap + 1, 'duplicate')]
  while st.backlog:
    act = orderer.drain(st, buf)
    assert len(act.outputs) <= cap
    got += outputs(act)
    activations += 1
  assert got == list(range(1, n + 1))
  assert activations == -(-n // cap)


def test_handler_that_outputs_nothing_for_some_events():
  events = [ev(s, silent=(s % 2 == 0)) for s in (3, 1, 2, 4, 5)]
  _, st, _, act = run(None, events=events)
  assert outputs(act) == [1, 3, 5]
  assert st.processed == 5 and st.handler_state == (1, 2, 3, 4, 5)


def test_buffer_overflow_reports_the_newcomer_and_keeps_the_buffer():
  _, st, buf, act = run([1, 3, 4, 5, 6, 2], OrderingConfig(max_buffered_per_key=2))
  assert reasons(act) == [(5, 'buffer_overflow'), (6, 'buffer_overflow')]
  assert 'max_buffered_per_key=2' in act.unprocessed[0]['detail']
  assert outputs(act) == [1, 2, 3, 4]
  check_accounting(st, act)


def test_event_time_gap_timeout_fires_at_its_deadline_and_late_arrivals_are_reported():
  orderer = Orderer(Recorder(), OrderingConfig(gap_timeout_event_time=50, gap_policy='skip'))
  st, buf = orderer.new_state('k'), DictBuffer()
  orderer.receive(st, buf, 1, ev(1), event_time=90)
  orderer.receive(st, buf, 3, ev(3), event_time=100)   # the wait starts at 100
  orderer.receive(st, buf, 4, ev(4), event_time=120)
  assert orderer.gap_deadlines(st) == (150, None)
  assert orderer.on_time(st, buf, event_time=149).outputs == []
  act = orderer.on_time(st, buf, event_time=150)
  assert outputs(act) == [3, 4]
  assert reasons(act) == [(2, 'gap_timeout')]
  late = orderer.receive(st, buf, 2, ev(2), event_time=160)
  assert reasons(late) == [(2, 'gap_timeout')] and late.unprocessed[0]['event'] == ev(2)
  # A copy of an applied event is still a duplicate, not a gap_timeout.
  assert reasons(orderer.receive(st, buf, 3, ev(3), event_time=161)) == [(3, 'duplicate')]


def test_gap_clock_restarts_when_the_key_progresses():
  orderer = Orderer(Recorder(), OrderingConfig(gap_timeout_processing_time=50, gap_policy='skip'))
  st, buf = orderer.new_state('k'), DictBuffer()
  orderer.receive(st, buf, 2, ev(2), processing_time=0)
  orderer.receive(st, buf, 4, ev(4), processing_time=10)
  orderer.receive(st, buf, 1, ev(1), processing_time=40)  # releases 1, 2; now waits on 3 since 40
  assert orderer.gap_deadlines(st) == (None, 90)
  assert orderer.on_time(st, buf, processing_time=89).outputs == []
  assert outputs(orderer.on_time(st, buf, processing_time=90)) == [4]


def test_hold_reports_once_and_resumes_when_the_gap_fills():
  orderer = Orderer(Recorder(), OrderingConfig(gap_timeout_event_time=5))
  st, buf = orderer.new_state('k'), DictBuffer()
  orderer.receive(st, buf, 2, ev(2), event_time=0)
  act = orderer.on_time(st, buf, event_time=5)
  assert [s['trigger'] for s in act.status] == ['gap_timeout'] and st.gap_timed_out
  assert orderer.gap_deadlines(st) == (None, None)  # no more timers while holding
  act = orderer.receive(st, buf, 1, ev(1), event_time=9)
  assert outputs(act) == [1, 2] and not st.gap_timed_out


def test_config_rejects_nonsense():
  for bad in (dict(gap_policy='drop'), dict(initial_sequence='1'), dict(max_buffered_per_key=0),
              dict(max_events_per_activation=-1), dict(gap_timeout_event_time=-1),
              dict(initial_sequence=-(1 << 63))):
    with pytest.raises(ValueError):
      OrderingConfig(**bad)


def test_batch_order_puts_bad_sequences_first_and_is_stable():
  pairs = [(3, 'a'), ('x', 'b'), (1, 'c'), (3, 'd'), (0, 'e')]
  assert batch_order(pairs, 1) == [('x', 'b'), (0, 'e'), (1, 'c'), (3, 'a'), (3, 'd')]


# -- property tests ------------------------------------------------------------

@st.composite
def key_streams(draw):
  """Per key: sequences 1..n with some missing, some repeated, all shuffled."""
  keys = draw(st.integers(1, 4))
  streams = {}
  for k in range(keys):
    n = draw(st.integers(0, 25))
    present = [s for s in range(1, n + 1) if not draw(st.booleans()) or s % 3]
    dups = draw(st.lists(st.sampled_from(present), max_size=5)) if present else []
    seqs = present + dups
    draw(st.randoms()).shuffle(seqs)
    streams[f'key{k}'] = seqs
  return streams


def contiguous_prefix(seqs, start=1):
  have, m = set(seqs), start - 1
  while m + 1 in have:
    m += 1
  return list(range(start, m + 1))


@settings(max_examples=300, deadline=None)
@given(key_streams())
def test_property_outputs_are_the_contiguous_prefix_in_order(streams):
  orderer = Orderer(Recorder())
  for key, seqs in streams.items():
    st_, buf, act = process_key(orderer, key, [(s, ev(s, key)) for s in seqs])
    prefix = contiguous_prefix(seqs)
    assert [o for _, o in act.outputs] == prefix
    assert (st_.handler_state if st_.handler_started else ()) == tuple(prefix)
    assert st_.duplicates == len(seqs) - len(set(seqs))
    assert st_.buffered == len(set(seqs)) - len(prefix)
    check_accounting(st_, act)


@settings(max_examples=300, deadline=None)
@given(key_streams(), st.integers(1, 5), st.booleans())
def test_property_skip_applies_every_distinct_event_once_in_order(streams, cap, capped):
  config = OrderingConfig(gap_timeout_event_time=0, gap_policy='skip',
                          max_events_per_activation=cap if capped else None)
  orderer = Orderer(Recorder(), config)
  for key, seqs in streams.items():
    st_, buf, act = process_key(orderer, key, [(s, ev(s, key)) for s in seqs])
    distinct = sorted(set(seqs))
    assert [o for _, o in act.outputs] == distinct
    missing = [s for s in range(1, max(distinct, default=0) + 1) if s not in set(seqs)]
    reported = [s for r in act.unprocessed if r['reason'] == 'gap_timeout'
                for s in range(r['missing_from'], r['missing_to'] + 1)]
    assert reported == missing
    assert st_.buffered == 0
    check_accounting(st_, act)


@settings(max_examples=200, deadline=None)
@given(key_streams(), st.integers(1, 6))
def test_property_overflow_never_loses_an_event(streams, cap):
  orderer = Orderer(Recorder(), OrderingConfig(max_buffered_per_key=cap))
  for key, seqs in streams.items():
    st_, buf, act = process_key(orderer, key, [(s, ev(s, key)) for s in seqs])
    assert st_.buffered <= cap
    applied = [o for _, o in act.outputs]
    assert applied == sorted(applied) and applied == list(range(1, len(applied) + 1))
    check_accounting(st_, act)


def test_initial_state_that_raises_is_a_handler_error():
  class BadStart(Recorder):
    def initial_state(self, key):
      raise KeyError(key)

  orderer = Orderer(BadStart())
  st, buf, act = process_key(orderer, 'k', [(1, ev(1)), (2, ev(2))])
  assert reasons(act) == [(1, 'handler_error')]
  assert act.unprocessed[0]['detail'] == "KeyError: 'k'"
  assert st.blocked_at == 1 and st.buffered == 1
  check_accounting(st, act)
