"""CRDTs: semantics of each type, the merge laws (hypothesis), convergence under
reordered and duplicated delivery, the coder, and MergeCRDTs on a real runner."""

import pickle

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import given, settings, strategies as st

from sourcebeam.transforms.crdt import (CRDTCoder, GCounter, LWWRegister, MergeCRDTs,
                             ORSet, PNCounter, QuantityORSet, merge_all)

REPLICAS = st.sampled_from(['r1', 'r2', 'r3', 7, ('eu', 1)])
# No True beside 1: Python holds them as one set element (see transforms/crdt.py).
ELEMENTS = st.sampled_from(['a', 'b', 'c', 1, 2.5, ('x', 1), None, False])


# --- strategies: histories of operations at origin replicas -------------------
# Each op is applied to its origin replica's state; the resulting state is what
# the origin ships. Delivery of shipped states in any order, with duplicates,
# must converge.

def _history(draw_ops, empty):
  @st.composite
  def history(draw):
    states = {}
    shipped = []
    for replica, op in draw(draw_ops):
      new = op(states.get(replica, empty()))
      states[replica] = new
      shipped.append(new)
    return shipped
  return history()


def gcounter_op():
  return st.tuples(REPLICAS, st.integers(0, 5)).map(
      lambda rn: (rn[0], lambda c, rn=rn: c.increment(rn[0], rn[1])))


def pncounter_op():
  return st.tuples(REPLICAS, st.integers(0, 5), st.booleans()).map(
      lambda t: (t[0], lambda c, t=t: c.increment(t[0], t[1]) if t[2]
                 else c.decrement(t[0], t[1])))


def orset_op():
  # tags come from a strategy, so adds may reuse a tag (a replayed duplicate)
  return st.tuples(REPLICAS, ELEMENTS, st.integers(0, 20), st.booleans()).map(
      lambda t: (t[0], lambda s, t=t: s.add(t[1], t[2]) if t[3] else s.remove(t[1])))


def qorset_op():
  return st.tuples(REPLICAS, ELEMENTS, st.integers(0, 20), st.integers(-3, 5),
                   st.booleans()).map(
      lambda t: (t[0], lambda s, t=t: s.add(t[1], ('tag', t[2]), t[3]) if t[4]
                 else s.remove(t[1])))


def lww_op():
  return st.tuples(REPLICAS, ELEMENTS, st.integers(0, 5)).map(
      lambda t: (t[0], lambda r, t=t: r.set(t[1], t[2], t[0])))


KINDS = {
    'GCounter': (GCounter, gcounter_op),
    'PNCounter': (PNCounter, pncounter_op),
    'ORSet': (ORSet, orset_op),
    'QuantityORSet': (QuantityORSet, qorset_op),
    'LWWRegister': (LWWRegister, lww_op),
}


def values_of(kind):
  cls, op = KINDS[kind]
  return _history(st.lists(op(), max_size=8), cls).flatmap(
      lambda shipped: st.sampled_from(shipped) if shipped else st.just(cls()))


@pytest.mark.parametrize('kind', sorted(KINDS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_merge_is_commutative_associative_idempotent(kind, data):
  a, b, c = (data.draw(values_of(kind)) for _ in range(3))
  assert a.merge(b) == b.merge(a)
  assert a.merge(b).merge(c) == a.merge(b.merge(c))
  assert a.merge(a) == a
  assert a.merge(b).merge(b) == a.merge(b)


@pytest.mark.parametrize('kind', sorted(KINDS))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_replicas_converge_under_any_order_with_duplicates(kind, data):
  cls, op = KINDS[kind]
  shipped = data.draw(_history(st.lists(op(), min_size=1, max_size=10), cls))
  expected = merge_all(shipped, cls)
  for _ in range(3):  # three receiving replicas, each its own delivery order
    deliveries = data.draw(st.permutations(
        shipped + data.draw(st.lists(st.sampled_from(shipped), max_size=5))))
    replica = cls()
    for s in deliveries:
      replica = replica.merge(s)
    assert replica == expected
    assert replica.value() == expected.value()


@pytest.mark.parametrize('kind', sorted(KINDS))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_coder_round_trips_and_is_canonical(kind, data):
  a, b = data.draw(values_of(kind)), data.draw(values_of(kind))
  coder = CRDTCoder()
  assert coder.decode(coder.encode(a)) == a
  assert pickle.loads(pickle.dumps(a)) == a
  # equal values built in different orders encode to equal bytes
  assert coder.encode(a.merge(b)) == coder.encode(b.merge(a))


# --- semantics ----------------------------------------------------------------

def test_gcounter_counts_and_rejects_decrease():
  c = GCounter().increment('a').increment('a', 2).increment('b', 4)
  assert c.value() == 7
  assert c.counts == {'a': 3, 'b': 4}
  with pytest.raises(ValueError, match='only grows'):
    c.increment('a', -1)
  # merging a stale copy of replica a does not double count
  assert c.merge(GCounter().increment('a')).value() == 7


def test_pncounter_goes_up_and_down():
  c = PNCounter().increment('z1', 5).decrement('z1', 2).decrement('z2')
  assert c.value() == 2
  assert c.merge(PNCounter().increment('z2', 3)).value() == 5


def test_orset_concurrent_add_wins_over_remove():
  base = ORSet().add('rider-1', 'e1')
  region_a = base.remove('rider-1')
  region_b = base.add('rider-1', 'e2')
  assert region_a.value() == frozenset()
  assert region_a.merge(region_b).value() == frozenset({'rider-1'})
  # a remove that observed both adds removes the element for good
  assert region_a.merge(region_b).remove('rider-1').value() == frozenset()


def test_orset_duplicate_add_with_removed_tag_stays_removed():
  s = ORSet().add('x', 't1').remove('x')
  assert s.add('x', 't1').value() == frozenset()


def test_quantity_orset_merges_two_regions_carts():
  us = QuantityORSet().add('shoe', 'us-1', 2).add('hat', 'us-2', 1)
  eu = QuantityORSet().add('shoe', 'eu-1', 1).add('sock', 'eu-2', 3)
  both = us.merge(eu)
  assert both.value() == {'hat': 1, 'shoe': 3, 'sock': 3}
  # a removal of 1 shoe, then a purchase of socks, in the EU region
  eu2 = both.add('shoe', 'eu-3', -1).remove('sock')
  assert eu2.value() == {'hat': 1, 'shoe': 2}
  # meanwhile the US region added another sock: the EU purchase never saw it
  us2 = both.add('sock', 'us-3', 1)
  assert eu2.merge(us2).value() == {'hat': 1, 'shoe': 2, 'sock': 1}
  # a replayed add (same tag) changes nothing
  assert eu2.add('shoe', 'eu-3', -1) == eu2


def test_lww_register_later_wins_and_ties_break_deterministically():
  r = LWWRegister().set('old', 10, 'a').set('new', 20, 'a')
  assert r.value() == 'new' and r.timestamp == 20
  assert r.set('older', 5, 'z').value() == 'new'
  x, y = LWWRegister().set('from-a', 30, 'a'), LWWRegister().set('from-b', 30, 'b')
  assert x.merge(y).value() == y.merge(x).value() == 'from-b'
  assert LWWRegister().value() is None


def test_values_are_immutable_and_validated():
  c = GCounter()
  with pytest.raises(AttributeError):
    c._counts = ()
  with pytest.raises(TypeError, match='JSON scalars'):
    ORSet().add(object(), 't')
  with pytest.raises(ValueError, match='int'):
    QuantityORSet().add('x', 't', 1.5)


# --- Beam ---------------------------------------------------------------------

def test_merge_crdts_combines_partitions_on_a_runner():
  """Per-partition counters, per key, merged by CombinePerKey in any shape."""
  partials = [
      ('zone-1', PNCounter().increment('p0', 3)),
      ('zone-1', PNCounter().increment('p1', 2).decrement('p1')),
      ('zone-1', PNCounter().increment('p0', 3)),  # a duplicate partial
      ('zone-2', PNCounter().decrement('p0', 1).increment('p0', 4)),
  ]
  sets = [ORSet().add('a', 1), ORSet().add('b', 2), ORSet().add('a', 1).remove('a')]
  with TestPipeline() as p:
    merged = (p | 'counters' >> beam.Create(partials)
              | 'per zone' >> beam.CombinePerKey(MergeCRDTs(PNCounter))
              | beam.MapTuple(lambda zone, c: (zone, c.value())))
    assert_that(merged, equal_to([('zone-1', 4), ('zone-2', 3)]))
    one = (p | 'sets' >> beam.Create(sets)
           | beam.CombineGlobally(MergeCRDTs(ORSet))
           | beam.Map(lambda s: sorted(s.value())))
    assert_that(one, equal_to([['b']]), label='orset')


def test_registered_coder_is_deterministic_for_grouping():
  """A CRDT can be a grouping key: its registered coder is deterministic."""
  key = ORSet().add('a', 1).add('b', 2)
  same = ORSet().add('b', 2).add('a', 1)
  coder = beam.coders.registry.get_coder(ORSet)
  assert isinstance(coder, CRDTCoder) and coder.is_deterministic()
  with TestPipeline() as p:
    out = (p | beam.Create([(key, 1), (same, 2)]).with_output_types(
        beam.typehints.Tuple[ORSet, int])
           | beam.GroupByKey()
           | beam.MapTuple(lambda k, vs: (sorted(k.value()), sorted(vs))))
    assert_that(out, equal_to([(['a', 'b'], [1, 2])]))


# --- QuantityORSet's incremental internals (carts change one add at a time) ----

def _reference_value(s):
  """The definition of value(): live quantities summed per element, positive sums only."""
  totals = {}
  for e, t, q in s.adds:
    if t not in s.removes:
      totals[e] = totals.get(e, 0) + q
  return {e: q for e, q in totals.items() if q > 0}


QOPS = st.lists(st.one_of(
    st.tuples(st.just('add'), ELEMENTS, st.integers(0, 12), st.integers(-3, 5)),
    st.tuples(st.just('remove'), ELEMENTS),
    st.tuples(st.just('merge'), st.lists(st.tuples(ELEMENTS, st.integers(0, 12),
                                                   st.integers(-3, 5)), max_size=3),
              st.lists(st.integers(0, 12).map(lambda i: ('tag', i)), max_size=2))),
    max_size=25)


@settings(max_examples=200, deadline=None)
@given(QOPS, st.booleans())
def test_quantity_orset_derived_values_equal_values_built_from_scratch(ops, read_early):
  """add/remove/merge carry tags and totals over; the result must equal the same adds
  and removes given to the constructor, with the same value, quantity, hash and encoding,
  whether or not value() was read (and cached) on the way."""
  s = QuantityORSet()
  for op in ops:
    if read_early:
      s.value()
    if op[0] == 'add':
      s = s.add(op[1], ('tag', op[2]), op[3])
    elif op[0] == 'remove':
      s = s.remove(op[1])
    else:
      s = s.merge(QuantityORSet([(e, ('tag', t), q) for e, t, q in op[1]], op[2]))
    fresh = QuantityORSet(s.adds, s.removes)
    assert s == fresh and hash(s) == hash(fresh)
    assert s.value() == fresh.value() == _reference_value(fresh)
    assert list(s.value()) == list(fresh.value())  # same (canonical) order
    for e in ('a', 'b', 1, None):
      assert s.quantity(e) == fresh.value().get(e, 0)
    assert CRDTCoder().encode(s) == CRDTCoder().encode(fresh)
    assert pickle.loads(pickle.dumps(s)) == s


def test_quantity_orset_value_is_a_copy_and_duplicates_are_free():
  s = QuantityORSet().add('shoe', 'e1', 2)
  v = s.value()
  v['shoe'] = 99
  assert s.value() == {'shoe': 2}
  assert s.add('shoe', 'e1', 5) is s  # a replayed add: the same value, not a copy
  with pytest.raises(AttributeError):
    s._totals = {}


_SCALARS = st.one_of(st.text(max_size=6), st.integers(-3, 3), st.booleans(), st.none(),
                     st.floats(allow_nan=False, allow_infinity=False, width=16))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_SCALARS, _SCALARS, _SCALARS), max_size=12))
def test_the_cached_sort_keys_of_flat_tuples_are_their_canonical_json(items):
  # The order every canonical encoding sorts by: the elements' canonical JSON text, cached
  # for flat tuples (a cart's adds) without confusing values Python holds equal (1, True, 1.0,
  # -0.0 and 0.0).
  import json
  from sourcebeam.transforms.crdt import _canon, _sort_key
  for x in items + [(1, 'a'), (True, 'a'), (1.0, 'a'), (0.0, 'a'), (-0.0, 'a')]:
    assert _sort_key(x) == json.dumps(_canon(x), sort_keys=True)
  assert len({_sort_key((1, 'a')), _sort_key((True, 'a')), _sort_key((1.0, 'a'))}) == 3
