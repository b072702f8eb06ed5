"""The publishing resequencer's plain-Python core (transforms/resequence_core.py), without Beam:
property tests over any interleaving and duplication of a key's raw events, and the
edge cases one by one (holes, limits, copies, conflicts, the history window, options)."""

import pickle
import random
from typing import Any, Dict, List

import pytest
from hypothesis import given, settings, strategies as st

from sourcebeam.transforms.errors import ConfigError
from sourcebeam.transforms.resequence_core import (
    BEFORE_START, CONFLICT, EVENT_TIME, FIRST_SEEN, GAP, INVALID_EVENT, INVALID_KEY,
    INVALID_SEQUENCE, LATE, MISSING_SEQUENCE, Activation, ResequenceConfig, Resequencer,
    fingerprint, published_sequences, resequence)

NO_LIMITS = ResequenceConfig(max_wait_event_time=None, max_wait_processing_time=None)
S = 1_000_000  # one second in microseconds


def ev(key: str, seq, eid=None, t=0, **data) -> Dict[str, Any]:
  """A validated-but-raw envelope; its content is (key, event_time, data)."""
  return {'event_id': eid or f'{key}-{seq}', 'event_type': 'CartItemAdded', 'schema_version': 1,
          'partition_key': key, 'sequence': seq, 'event_time': 1_700_000_000_000 + t,
          'origin': 'test', 'follows_from': None, 'data': data or {'raw': seq}}


class Run:
  """One key through the core, recording everything, checking the accounting on every call."""

  def __init__(self, config=NO_LIMITS, key='k'):
    self.rs = Resequencer(config)
    self.st = self.rs.new_state(key)
    self.act = Activation()

  def _check(self):
    s = self.rs.stats(self.st)
    assert s['received'] == s['published'] + s['duplicates_dropped'] + s['dead_lettered'] + s['held']

  def send(self, *events, ts=None, pt=None):
    for e in events:
      self.rs.receive(self.st, e, ts, pt, self.act)
      self._check()
    return self

  def time(self, et=None, pt=None):
    self.rs.on_time(self.st, et, pt, self.act)
    self._check()
    return self

  def finish(self):
    self.rs.finish(self.st, self.act)
    self._check()
    assert not self.st.held
    return self

  @property
  def published(self):
    return [(e['sequence'], e['raw_sequence'], e['event_id']) for e, _ in self.act.published]

  def dead(self, reason=None):
    return [d for d in self.act.dead_letters if reason is None or d['reason'] == reason]


# -- the case -----------------------------------------------------------------------------

def test_third_missing_fifth_redelivered_publishes_one_to_n_each_once():
  raw = [ev('k', s) for s in (1, 2, 4, 5, 5, 6, 7)]
  for order in (raw, raw[::-1], random.Random(3).sample(raw, len(raw))):
    r = Run().send(*order).finish()
    assert r.published == [(1, 1, 'k-1'), (2, 2, 'k-2'), (3, 4, 'k-4'), (4, 5, 'k-5'),
                           (5, 6, 'k-6'), (6, 7, 'k-7')]
    [gap] = r.dead()
    assert gap['reason'] == GAP and gap['missing'] == [3, 3] and gap['count'] == 1
    assert gap['after_event_id'] == 'k-2' and gap['before_event_id'] == 'k-4'
    assert gap['trigger'] == 'end_of_input' and 'raw' not in gap
    [dup] = r.act.duplicates
    assert (dup['raw_sequence'], dup['duplicate_of'], dup['by']) == (5, 'k-5', 'event_id')
    assert r.rs.stats(r.st)['duplicates_dropped'] == 1


def test_published_envelope_keeps_everything_and_adds_raw_sequence():
  e = ev('k', 7)
  r = Run(ResequenceConfig(first_sequence=7)).send(e)
  [(out, ts)] = r.act.published
  assert out == dict(e, sequence=1, raw_sequence=7)
  assert e['sequence'] == 7, 'the input is not mutated'


# -- properties -------------------------------------------------------------------------------------

@st.composite
def raw_key_stream(draw):
  """A key's raw stream: good events at some raw sequences (holes allowed), each sent
  1 to 3 times (a copy may carry another event_id: a re-derived id), in any order."""
  n = draw(st.integers(1, 14))
  present = sorted(draw(st.sets(st.integers(1, n), min_size=1)))
  sends = []
  for s in present:
    for c in range(draw(st.integers(1, 3))):
      eid = f'k-{s}' if draw(st.booleans()) or c == 0 else f'k-{s}-copy{c}'
      sends.append(ev('k', s, eid=eid))
  order = draw(st.permutations(sends))
  return present, order


@given(raw_key_stream())
@settings(max_examples=300, deadline=None)
def test_property_any_interleaving_and_duplication_gives_one_to_n_in_raw_order(case):
  present, order = case
  r = Run().send(*order).finish()
  seqs = [p[0] for p in r.published]
  raws = [p[1] for p in r.published]
  assert seqs == list(range(1, len(present) + 1)), 'no hole, no repeat'
  assert raws == present, 'each good event once, in raw order'
  for out, _ in r.act.published:  # the content is the slot's
    assert out['data'] == {'raw': out['raw_sequence']}
  assert len(r.act.duplicates) == len(order) - len(present)
  missing = [s for s in range(1, present[-1] + 1) if s not in present]
  assert sum(d['count'] for d in r.dead(GAP)) == len(missing)
  assert not [d for d in r.act.dead_letters if d['reason'] != GAP]
  # The bounded plain function gives the same sequences for the same raw input.
  batch = resequence(order, NO_LIMITS)
  assert [(e['sequence'], e['raw_sequence']) for e in batch.published] == list(zip(seqs, raws))
  assert len(batch.duplicates) == len(r.act.duplicates)


@given(raw_key_stream(), st.randoms(use_true_random=False))
@settings(max_examples=200, deadline=None)
def test_property_resequence_is_deterministic_whatever_the_input_order(case, rnd):
  present, order = case
  other = list(order)
  rnd.shuffle(other)
  a, b = resequence(order), resequence(other)
  assert a.published == b.published
  assert a.dead_letters == b.dead_letters
  assert sorted(map(repr, a.duplicates)) == sorted(map(repr, b.duplicates))


@st.composite
def timed_stream(draw):
  """Copies, conflicts and holes in several keys, with time passing (limits firing) between
  arrivals, events arriving after their gap was skipped, and a small history."""
  keys = ['a', 'b', 'c']
  sends = []
  for k in keys:
    for s in draw(st.sets(st.integers(1, 12), min_size=1)):
      for c in range(draw(st.integers(1, 2))):
        variant = draw(st.sampled_from(['same', 'same', 'copy_id', 'conflict']))
        if c == 0 or variant == 'same':
          sends.append(ev(k, s))
        elif variant == 'copy_id':
          sends.append(ev(k, s, eid=f'{k}-{s}-x'))
        else:
          sends.append(ev(k, s, eid=f'{k}-{s}-c', other=True))
  steps = []
  for e in draw(st.permutations(sends)):
    steps.append(('event', e))
    if draw(st.integers(0, 3)) == 0:
      steps.append(('time', None))
  return steps


@given(timed_stream(), st.sampled_from([1, 3, 50]))
@settings(max_examples=300, deadline=None)
def test_property_under_any_timing_no_hole_no_repeat_and_nothing_lost(steps, history):
  cfg = ResequenceConfig(max_wait_event_time=10 * S, max_wait_processing_time=None,
                         history=history, max_held=5)
  rs = Resequencer(cfg)
  states, act = {}, Activation()
  clock = 0
  for kind, e in steps:
    clock += S
    if kind == 'event':
      st_ = states.setdefault(e['partition_key'], rs.new_state(e['partition_key']))
      rs.receive(st_, e, clock, None, act)
    else:
      clock += 20 * S    # past every hold: limits fire
      for st_ in states.values():
        rs.on_time(st_, clock, None, act)
  for st_ in states.values():
    rs.finish(st_, act)
  by_key: Dict[str, List] = {}
  for out, _ in act.published:
    by_key.setdefault(out['partition_key'], []).append(out)
  for key, st_ in states.items():
    outs = by_key.get(key, [])
    assert [o['sequence'] for o in outs] == list(range(1, len(outs) + 1))
    raws = [o['raw_sequence'] for o in outs]
    assert raws == sorted(set(raws)), 'raw order, each slot once'
    ids = [o['event_id'] for o in outs]
    assert len(ids) == len(set(ids)), 'no event published twice'
    s = rs.stats(st_)
    assert s['held'] == 0
    assert s['received'] == s['published'] + s['duplicates_dropped'] + s['dead_lettered']
  total_in = sum(1 for kind, _ in steps if kind == 'event')
  events_out = (len(act.published) + len(act.duplicates) +
                len([d for d in act.dead_letters if d['reason'] != GAP]))
  assert total_in == events_out, 'every input ends in exactly one output'


@given(timed_stream())
@settings(max_examples=150, deadline=None)
def test_property_a_key_state_pickled_at_any_point_decides_the_same(steps):
  """The streaming expansion keeps KeyState in Beam state (pickled between bundles, history
  as fingerprints, the event_id index rebuilt): it must decide exactly as the live object."""
  cfg = ResequenceConfig(max_wait_event_time=10 * S, max_wait_processing_time=None, history=4)
  rs = Resequencer(cfg)
  live, stored = {}, {}
  act_live, act_stored = Activation(), Activation()
  clock = 0
  for kind, e in steps:
    clock += S
    for states, act, roundtrip in ((live, act_live, False), (stored, act_stored, True)):
      if kind == 'event':
        k = e['partition_key']
        st_ = states.setdefault(k, rs.new_state(k))
        rs.receive(st_, e, clock, None, act)
      else:
        for st_ in states.values():
          rs.on_time(st_, clock + 20 * S, None, act)
      if roundtrip:
        for k in states:
          states[k] = pickle.loads(pickle.dumps(states[k]))
    if kind != 'event':
      clock += 20 * S
  for states, act in ((live, act_live), (stored, act_stored)):
    for st_ in states.values():
      rs.finish(st_, act)
  assert act_live.published == act_stored.published
  assert act_live.dead_letters == act_stored.dead_letters
  assert act_live.duplicates == act_stored.duplicates


@st.composite
def unsequenced_stream(draw):
  times = draw(st.lists(st.integers(0, 20), min_size=1, max_size=15))
  events = []
  for i, t in enumerate(times):
    e = ev('k', None, eid=f'e{i:02d}', t=t)
    events += [e] * draw(st.integers(1, 2))
  return draw(st.permutations(events))


@given(unsequenced_stream())
@settings(max_examples=200, deadline=None)
def test_property_event_time_order_for_streams_without_raw_sequences(order):
  cfg = ResequenceConfig(order_by=EVENT_TIME, max_wait_event_time=None, max_wait_processing_time=None)
  r = Run(cfg).send(*order).finish()
  distinct = sorted({(e['event_time'], e['event_id']) for e in order})
  assert [(o['event_time'], o['event_id']) for o, _ in r.act.published] == distinct
  assert [o['sequence'] for o, _ in r.act.published] == list(range(1, len(distinct) + 1))
  assert all(o['raw_sequence'] is None for o, _ in r.act.published)
  assert len(r.act.duplicates) == len(order) - len(distinct)


# -- holes and limits ---------------------------------------------------------------------------

def test_event_time_limit_skips_the_hole_then_a_late_arrival_is_dead_lettered():
  cfg = ResequenceConfig(max_wait_event_time=60 * S, max_wait_processing_time=None)
  r = Run(cfg)
  r.send(ev('k', 1), ts=0).send(ev('k', 3), ts=10 * S).send(ev('k', 4), ts=20 * S)
  assert r.rs.deadlines(r.st) == (70 * S, None)
  r.time(et=69 * S)
  assert r.published == [(1, 1, 'k-1')]
  r.time(et=70 * S)
  assert r.published == [(1, 1, 'k-1'), (2, 3, 'k-3'), (3, 4, 'k-4')]
  [gap] = r.dead(GAP)
  assert gap['missing'] == [2, 2] and gap['trigger'] == 'event_time'
  assert gap['published_before'] == 1
  r.send(ev('k', 2), ts=80 * S)
  [late] = r.dead(LATE)
  assert late['raw_sequence'] == 2 and late['gap'] == [2, 2] and late['event_id'] == 'k-2'
  assert r.rs.deadlines(r.st) == (None, None)


def test_processing_time_limit_and_the_oldest_waiting_event_sets_it():
  cfg = ResequenceConfig(max_wait_event_time=None, max_wait_processing_time=30 * S)
  r = Run(cfg).send(ev('k', 3), pt=100 * S).send(ev('k', 6), pt=110 * S)
  assert r.rs.deadlines(r.st) == (None, 130 * S)
  r.time(pt=130 * S)     # raw 1..2 skipped, 3 published; 6 waits on 4..5 since 110
  assert r.published == [(1, 3, 'k-3')]
  assert [d['missing'] for d in r.dead(GAP)] == [[1, 2]]
  assert r.rs.deadlines(r.st) == (None, 140 * S)
  r.send(ev('k', 4), pt=135 * S)
  r.time(pt=140 * S)
  assert r.published == [(1, 3, 'k-3'), (2, 4, 'k-4'), (3, 6, 'k-6')]
  assert [d['missing'] for d in r.dead(GAP)] == [[1, 2], [5, 5]]
  assert [d['trigger'] for d in r.dead(GAP)] == ['processing_time'] * 2


def test_several_due_holes_are_skipped_in_one_firing():
  cfg = ResequenceConfig(max_wait_event_time=5 * S, max_wait_processing_time=None)
  r = Run(cfg).send(ev('k', 2), ev('k', 4), ev('k', 7), ts=0).time(et=5 * S)
  assert [p[1] for p in r.published] == [2, 4, 7]
  assert [d['missing'] for d in r.dead(GAP)] == [[1, 1], [3, 3], [5, 6]]
  assert r.rs.stats(r.st)['missing_raw_sequences'] == 4


def test_max_held_moves_the_key_on_without_waiting():
  r = Run(ResequenceConfig(max_held=3, max_wait_event_time=None, max_wait_processing_time=None))
  r.send(ev('k', 1), ev('k', 3), ev('k', 4), ev('k', 5))
  assert r.published == [(1, 1, 'k-1')]
  r.send(ev('k', 6))
  assert [p[1] for p in r.published] == [1, 3, 4, 5, 6]
  [gap] = r.dead(GAP)
  assert gap['trigger'] == 'max_held' and gap['missing'] == [2, 2]


def test_end_of_input_closes_every_hole_and_nothing_waits():
  r = Run(ResequenceConfig()).send(ev('k', 5), ev('k', 9), ev('k', 10)).finish()
  assert r.published == [(1, 5, 'k-5'), (2, 9, 'k-9'), (3, 10, 'k-10')]
  assert [d['missing'] for d in r.dead(GAP)] == [[1, 4], [6, 8]]
  assert r.dead(GAP)[0]['after_raw_sequence'] is None


# -- copies and conflicts ---------------------------------------------------------------------

def test_same_raw_sequence_and_content_under_another_event_id_is_a_duplicate():
  r = Run().send(ev('k', 1), ev('k', 1, eid='other-id')).finish()
  assert r.published == [(1, 1, 'k-1')]
  [dup] = r.act.duplicates
  assert (dup['event_id'], dup['by'], dup['duplicate_of'], dup['duplicate_of_raw_sequence']) == (
      'other-id', 'raw_sequence', 'k-1', 1)


def test_conflict_after_publishing_is_dead_lettered_naming_the_event_it_conflicts_with():
  r = Run(ResequenceConfig(source='raw.jsonl')).send(ev('k', 1), ev('k', 1, eid='x', qty=9))
  [c] = r.dead(CONFLICT)
  assert c['event_id'] == 'x' and c['conflicts_with'] == 'k-1' and c['conflicts_with_sequence'] == 1
  assert c['source'] == 'raw.jsonl' and c['key'] == 'k' and c['raw_sequence'] == 1
  assert '"qty":9' in c['raw'], 'the dead letter keeps the event as a raw line'
  assert r.published == [(1, 1, 'k-1')]


def test_conflict_while_waiting_keeps_the_earlier_event_time_whatever_arrives_first():
  early, later = ev('k', 2, eid='b', t=0, v=1), ev('k', 2, eid='a', t=5, v=2)
  for order in ([early, later], [later, early]):
    r = Run().send(*order, ev('k', 1)).finish()
    assert r.published == [(1, 1, 'k-1'), (2, 2, 'b')]
    [c] = r.dead(CONFLICT)
    assert c['event_id'] == 'a' and c['conflicts_with'] == 'b'


def test_event_id_repeated_under_a_new_raw_sequence_consumes_the_slot():
  # A re-delivery that got a new raw sequence: dropped, and no hole is left behind.
  r = Run().send(ev('k', 1), ev('k', 2), ev('k', 3, eid='k-1', raw=1), ev('k', 4)).finish()
  assert r.published == [(1, 1, 'k-1'), (2, 2, 'k-2'), (3, 4, 'k-4')]
  assert not r.dead()
  [dup] = r.act.duplicates
  assert (dup['raw_sequence'], dup['by'], dup['duplicate_of_raw_sequence']) == (3, 'event_id', 1)


def test_event_id_reused_with_other_content_is_a_conflict():
  r = Run().send(ev('k', 1), ev('k', 2, eid='k-1')).finish()
  assert r.published == [(1, 1, 'k-1')]
  [c] = r.dead(CONFLICT)
  assert c['raw_sequence'] == 2 and c['conflicts_with_raw_sequence'] == 1


def test_history_window_copies_inside_are_recognised_older_ones_are_late_never_republished():
  r = Run(ResequenceConfig(history=3, max_wait_event_time=None, max_wait_processing_time=None))
  r.send(*[ev('k', s) for s in range(1, 11)])
  r.send(ev('k', 8))                      # inside the window (8, 9, 10): a duplicate
  r.send(ev('k', 9, eid='z', other=1))    # inside: a conflict
  r.send(ev('k', 2))                      # outside: cannot tell, so late
  r.send(ev('k', 2, eid='zz', other=2))
  assert len(r.published) == 10
  assert [d['raw_sequence'] for d in r.act.duplicates] == [8]
  assert [d['raw_sequence'] for d in r.dead(CONFLICT)] == [9]
  assert [(d['raw_sequence'], d['history']) for d in r.dead(LATE)] == [(2, 3), (2, 3)]
  assert len(r.st.recent) == 3 and len(r.st.recent_ids) == 3, 'memory stays bounded'


def test_history_forgets_declared_gaps_too():
  r = Run(ResequenceConfig(history=2)).send(ev('k', 3)).finish()
  assert r.st.gaps == [(1, 2)]
  r.send(*[ev('k', s) for s in range(4, 9)])
  assert r.st.gaps == []


# -- the first raw sequence, and what cannot be ordered -------------------------------------------

def test_first_sequence_defaults_to_one_so_a_missing_first_event_is_a_gap():
  r = Run().send(ev('k', 2)).finish()
  assert r.dead(GAP)[0]['missing'] == [1, 1]


def test_first_seen_starts_the_key_at_its_first_arrival():
  r = Run(ResequenceConfig(first_sequence=FIRST_SEEN)).send(ev('k', 40), ev('k', 41), ev('k', 39))
  assert r.published == [(1, 40, 'k-40'), (2, 41, 'k-41')]
  assert r.dead()[0]['reason'] == BEFORE_START
  b = resequence([ev('k', 41), ev('k', 39), ev('k', 40)],
                 ResequenceConfig(first_sequence=FIRST_SEEN))
  assert [e['raw_sequence'] for e in b.published] == [39, 40, 41], 'bounded: the lowest starts'


def test_an_explicit_first_sequence_dead_letters_what_is_below_it():
  r = Run(ResequenceConfig(first_sequence=10)).send(ev('k', 9), ev('k', 10)).finish()
  assert r.published == [(1, 10, 'k-10')]
  assert r.dead()[0]['reason'] == BEFORE_START


def test_what_cannot_be_ordered_is_dead_lettered_with_its_reason():
  r = Run().send(ev('k', None), ev('k', 'x'), ev('k', True), ev('k', 1 << 63),
                 {'partition_key': 'k', 'sequence': 1}, 'not a dict').finish()
  assert [d['reason'] for d in r.dead()] == [MISSING_SEQUENCE, INVALID_SEQUENCE, INVALID_SEQUENCE,
                                             INVALID_SEQUENCE, INVALID_EVENT, INVALID_EVENT]
  res = resequence([{'sequence': 1, 'event_id': 'e'}, ev('k', 1)])
  assert [d['reason'] for d in res.dead_letters] == [INVALID_KEY]
  assert sum(s['received'] for s in res.stats) == 2


def test_event_time_order_late_arrival_and_limits():
  cfg = ResequenceConfig(order_by=EVENT_TIME, max_wait_event_time=10 * S,
                         max_wait_processing_time=None)
  r = Run(cfg).send(ev('k', None, eid='b', t=2), ts=2 * S).send(ev('k', None, eid='c', t=30),
                                                                 ts=30 * S)
  r.time(et=12 * S)          # b's hold is over, c's is not
  assert r.published == [(1, None, 'b')]
  r.send(ev('k', None, eid='a', t=1), ts=31 * S)   # sorts before b, which is out: late
  assert r.dead(LATE)[0]['event_id'] == 'a'
  r.send(ev('k', None, eid='b', t=2), ts=32 * S)   # a copy of b: a duplicate
  assert r.act.duplicates[0]['duplicate_of'] == 'b' 
  r.finish()
  assert r.published == [(1, None, 'b'), (2, None, 'c')]


# -- the numbering rule other producers use, and the options ------------------------------------

def test_published_sequences_is_the_identity_on_an_already_clean_stream():
  clean = [ev(k, s) for k in 'xy' for s in range(1, 6)]
  assert published_sequences(clean) == {e['event_id']: (e['partition_key'], e['sequence'])
                                        for e in clean}


def test_fingerprint_ignores_event_id_and_sequences_only():
  a = ev('k', 1)
  assert fingerprint(a) == fingerprint(dict(a, event_id='z', sequence=9, raw_sequence=3))
  assert fingerprint(a) == fingerprint(dict(reversed(list(a.items()))))
  assert fingerprint(a) != fingerprint(dict(a, event_time=a['event_time'] + 1))


@pytest.mark.parametrize('bad', [dict(order_by='arrival'), dict(first_sequence='1'),
                                 dict(history=0), dict(max_held=-1),
                                 dict(max_wait_event_time=-1)])
def test_bad_options_are_config_errors(bad):
  with pytest.raises(ConfigError):
    ResequenceConfig(**bad)
