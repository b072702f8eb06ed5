"""Retail projection handlers in plain Python, and RetailProjections /
WriteProjections on a real runner with real JSON-lines and Parquet files."""

import json
import random

import pytest

from hypothesis import given, settings, strategies as st

from sourcebeam.schemas.envelope import make_envelope
from sourcebeam.transforms.projections import (CartHandler, CartState, CatalogHandler, CombinedHandler,
                                    FrequentlyViewedHandler, RecentlyViewedHandler,
                                    catalog_by_category, latest, merge_carts, top_viewed)

T0 = 1_795_651_200_000


class Stream:
  """Envelopes of one partition key, sequenced from 1 like the published stream."""

  def __init__(self, region='us'):
    self.seq = 0
    self.region = region

  def __call__(self, event_type, **data):
    self.seq += 1
    return make_envelope(event_type, data, event_id=f'{self.region}-{data.get("user_id", data.get("product_id"))}-{self.seq}',
                         sequence=self.seq, event_time=T0 + self.seq * 1000, origin='test')


def fold(handler, events, key='u1'):
  state, outputs = handler.initial_state(key), []
  for e in events:
    state, out = handler.apply(state, e)
    outputs.extend(out)
  return state, outputs


def items(record):
  return {i['product_id']: i['quantity'] for i in record['items']}


# --- cart ------------------------------------------------------------------------------

def test_cart_adds_removes_and_purchase_empties_what_was_bought():
  ev = Stream()
  events = [
      ev('UserLoggedIn', user_id='u1', name='Ada'),
      ev('CartItemAdded', user_id='u1', product_id='p1', quantity=2),
      ev('ProductViewed', user_id='u1', product_id='p9'),
      ev('CartItemAdded', user_id='u1', product_id='p2', quantity=1),
      ev('CartItemRemoved', user_id='u1', product_id='p1', quantity=1),
      ev('CartItemRemoved', user_id='u1', product_id='p2', quantity=5),   # more than there is
      ev('CartItemAdded', user_id='u1', product_id='p3', quantity=4),
      ev('ProductPurchased', user_id='u1', product_id='p3', quantity=4, price=9.5),
      ev('CartItemAdded', user_id='u1', product_id='p2', quantity=1),     # not eaten by the -5
  ]
  state, out = fold(CartHandler(), events)
  assert [r['as_of_sequence'] for r in out] == [2, 4, 5, 6, 7, 8, 9]  # other types passed over
  assert [items(r) for r in out] == [
      {'p1': 2}, {'p1': 2, 'p2': 1}, {'p1': 1, 'p2': 1}, {'p1': 1}, {'p1': 1, 'p3': 4},
      {'p1': 1}, {'p1': 1, 'p2': 1}]
  last = out[-1]
  assert last == {'view': 'cart', 'key': 'u1', 'items': [
      {'product_id': 'p1', 'quantity': 1}, {'product_id': 'p2', 'quantity': 1}],
      'as_of_sequence': 9, 'event_time': T0 + 9000}


def test_cart_passes_over_other_types_unchanged():
  ev = Stream()
  h = CartHandler()
  s0 = h.initial_state('u1')
  for e in (ev('UserLoggedIn', user_id='u1', name='x'), ev('RoleAdded', user_id='u1', role='r'),
            ev('PhoneNumberUpdated', user_id='u1', phone='1'),
            ev('ProductViewed', user_id='u1', product_id='p')):
    assert h.apply(s0, e) == (s0, [])


def test_two_regions_carts_merge():
  """The same user shops in two regions; their cart states merge: both regions'
  adds survive, each region's purchase empties only what it had seen."""
  us, eu = Stream('us'), Stream('eu')
  s_us, _ = fold(CartHandler(), [us('CartItemAdded', user_id='u1', product_id='shoe', quantity=1),
                                 us('CartItemAdded', user_id='u1', product_id='hat', quantity=1)])
  s_eu, _ = fold(CartHandler(), [eu('CartItemAdded', user_id='u1', product_id='shoe', quantity=2),
                                 eu('ProductPurchased', user_id='u1', product_id='hat',
                                    quantity=1, price=3.0)])
  merged = merge_carts(s_us, s_eu)
  assert merged == merge_carts(s_eu, s_us) == merge_carts(merged, s_us)
  assert merged.items.value() == {'hat': 1, 'shoe': 3}


# --- catalog ----------------------------------------------------------------------------

def test_catalog_latest_product_with_image():
  ev = Stream()
  events = [ev('ProductImageAdded', product_id='p1', image_url='http://img/1a.jpg'),
            ev('ProductCreated', product_id='p1', brand='B', name='Boot', description='d',
               category='shoes'),
            ev('ProductImageAdded', product_id='p1', image_url='http://img/1b.jpg'),
            ev('ProductCreated', product_id='p1', brand='B', name='Boot 2', description='d2',
               category='boots')]
  _, out = fold(CatalogHandler(), events, key='p1')
  assert out[0]['name'] is None and out[0]['image_url'] == 'http://img/1a.jpg'
  assert out[-1] == {'view': 'catalog', 'key': 'p1', 'product_id': 'p1', 'brand': 'B',
                     'name': 'Boot 2', 'description': 'd2', 'category': 'boots',
                     'image_url': 'http://img/1b.jpg', 'as_of_sequence': 4,
                     'event_time': T0 + 4000}
  by_cat = catalog_by_category([out[-1], dict(out[-1], product_id='p0', category='boots'),
                                dict(out[1], product_id='p2')])
  assert {c: [r['product_id'] for r in rs] for c, rs in by_cat.items()} == {
      'boots': ['p0', 'p1'], 'shoes': ['p2']}


# --- recently / frequently viewed -----------------------------------------------------------

def views(products, extra_every=0):
  ev = Stream()
  out = []
  for i, p in enumerate(products):
    if extra_every and i % extra_every == 0:
      out.append(ev('CartItemAdded', user_id='u1', product_id='c', quantity=1))
    out.append(ev('ProductViewed', user_id='u1', product_id=p))
  return out


def test_recently_viewed_last_ten_distinct_newest_first():
  products = [f'p{i}' for i in range(12)] + ['p3', 'p11', 'p3']
  _, out = fold(RecentlyViewedHandler(), views(products, extra_every=4))
  assert out[-1]['products'] == ['p3', 'p11', 'p10', 'p9', 'p8', 'p7', 'p6', 'p5', 'p4', 'p2']
  assert len(out) == len(products)  # cart events passed over


def test_frequently_viewed_top_ten_with_deterministic_ties():
  products = ['a'] * 3 + ['b'] * 3 + ['c'] * 5 + [f'z{i:02d}' for i in range(12)]
  rng = random.Random(4)
  rng.shuffle(products)
  _, out = fold(FrequentlyViewedHandler(), views(products))
  top = out[-1]['products']
  assert top[:3] == [{'product_id': 'c', 'views': 5}, {'product_id': 'a', 'views': 3},
                     {'product_id': 'b', 'views': 3}]
  assert [t['product_id'] for t in top[3:]] == [f'z{i:02d}' for i in range(7)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from('abcdefghijklmnop'), max_size=40))
def test_view_handlers_match_their_definitions(products):
  events = views(products)
  _, recent = fold(RecentlyViewedHandler(), events)
  _, frequent = fold(FrequentlyViewedHandler(), events)
  if not products:
    assert recent == frequent == []
    return
  expected_recent = []
  for p in reversed(products):
    if p not in expected_recent:
      expected_recent.append(p)
  assert recent[-1]['products'] == expected_recent[:10]
  counts = {p: products.count(p) for p in set(products)}
  assert frequent[-1]['products'] == top_viewed(counts, 10)
  assert sorted(frequent[-1]['products'], key=lambda x: (-x['views'], x['product_id'])) == \
      frequent[-1]['products']


def test_combined_handler_runs_each_handler_on_one_stream():
  ev = Stream()
  events = [ev('ProductViewed', user_id='u1', product_id='p1'),
            ev('CartItemAdded', user_id='u1', product_id='p1', quantity=1)]
  h = CombinedHandler([CartHandler(), RecentlyViewedHandler(), FrequentlyViewedHandler()])
  state, out = fold(h, events)
  assert [r['view'] for r in out] == ['recently_viewed', 'frequently_viewed', 'cart']
  assert isinstance(state[0], CartState)
  assert {k: r['as_of_sequence'] for k, r in latest(out).items()} == {
      ('cart', 'u1'): 2, ('recently_viewed', 'u1'): 1, ('frequently_viewed', 'u1'): 1}


# --- Beam: RetailProjections and WriteProjections ----------------------------------------------

def _published_retail(n, seed):
  from sourcebeam.generators.retail import retail_events
  from sourcebeam.schemas.envelope import iso_to_millis
  events = []
  for e in retail_events(n, seed=seed):
    e = dict(e, event_time=iso_to_millis(e['event_time']))
    events.append(e)
  return events


def _expected_views(events):
  from sourcebeam.transforms.projections import PRODUCT_EVENT_TYPES, USER_EVENT_TYPES
  by_key = {}
  for e in events:
    space = 'user' if e['event_type'] in USER_EVENT_TYPES else (
        'product' if e['event_type'] in PRODUCT_EVENT_TYPES else None)
    if space:
      by_key.setdefault((space, e['partition_key']), []).append(e)
  out = []
  for (space, key), evs in by_key.items():
    evs.sort(key=lambda e: e['sequence'])
    assert [e['sequence'] for e in evs] == list(range(1, len(evs) + 1))  # a gap-free fixture
    handler = (CombinedHandler([CartHandler(), RecentlyViewedHandler(), FrequentlyViewedHandler()])
               if space == 'user' else CatalogHandler())
    out.extend(fold(handler, evs, key)[1])
  return latest(out)


def test_retail_projections_write_final_views_as_jsonl_and_parquet(tmp_path):
  import apache_beam as beam
  import pyarrow.parquet as pq
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that, equal_to
  from sourcebeam.transforms.projections import VIEWS, RetailProjections, WriteProjections

  events = _published_retail(400, seed=5)
  expected = _expected_views(events)
  assert {v for v, _ in expected} == set(VIEWS)  # the fixture exercises every view
  ride = make_envelope('TaxiLocationReported', {'taxi_id': 1, 'lon': 0.0, 'lat': 0.0},
                       event_id='t1', sequence=1, event_time=T0, origin='taxi-gps')
  duplicate = next(e for e in events if e['event_type'] == 'CartItemAdded')
  shuffled = events + [ride, duplicate]
  random.Random(2).shuffle(shuffled)
  with TestPipeline() as p:
    views = p | beam.Create(shuffled) | RetailProjections()
    counts = views | WriteProjections(str(tmp_path))
    for view in VIEWS:
      n = sum(1 for v, _ in expected if v == view)
      assert_that(counts[view], equal_to([n]), label=f'count {view}')
    assert_that(views.unprocessed | beam.Map(lambda u: (u['reason'], u['sequence'])),
                equal_to([('duplicate', duplicate['sequence'])]), label='unprocessed')
  for view in VIEWS:
    want = sorted((r for (v, _), r in expected.items() if v == view), key=lambda r: r['key'])
    with open(tmp_path / f'{view}.jsonl') as f:
      got_json = sorted((json.loads(l) for l in f), key=lambda r: r['key'])
    assert got_json == want
    got_parquet = sorted(pq.read_table(tmp_path / f'{view}.parquet').to_pylist(),
                         key=lambda r: r['key'])
    assert got_parquet == want


def test_retail_projections_streaming_changelog_applies_events_in_sequence_order():
  """Out-of-order arrival with watermarks between: the changelog's records follow
  sequence order per key, and its latest record per key is the bounded view."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.test_stream import TestStream
  from apache_beam.testing.util import assert_that, equal_to
  from apache_beam.transforms import window
  from sourcebeam.transforms.projections import RetailProjections

  ev, pv = Stream(), Stream()
  user = [ev('UserLoggedIn', user_id='u1', name='Ada'),
          ev('ProductViewed', user_id='u1', product_id='p1'),
          ev('CartItemAdded', user_id='u1', product_id='p1', quantity=2),
          ev('ProductViewed', user_id='u1', product_id='p2'),
          ev('CartItemRemoved', user_id='u1', product_id='p1', quantity=1)]
  product = [pv('ProductCreated', product_id='p1', brand='B', name='N', description='D',
                category='C'),
             pv('ProductImageAdded', product_id='p1', image_url='http://i/1')]
  arrival = [[user[2], product[1]], [user[0], user[4]], [user[1], product[0], user[3]]]
  stream = TestStream().advance_watermark_to(T0 / 1000)
  for i, batch in enumerate(arrival):
    stream = stream.add_elements(
        [window.TimestampedValue(e, e['event_time'] / 1000) for e in batch])
    stream = stream.advance_watermark_to((T0 + (i + 1) * 2000) / 1000)
  stream = stream.advance_watermark_to((T0 + 60_000) / 1000).advance_watermark_to_infinity()
  _, cart = fold(CartHandler(), user)
  _, recent = fold(RecentlyViewedHandler(), user)
  _, frequent = fold(FrequentlyViewedHandler(), user)
  _, catalog = fold(CatalogHandler(), product, key='p1')
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  with TestPipeline(options=options) as p:
    views = p | stream | RetailProjections()
    assert_that(views.cart, equal_to(cart), label='cart')
    assert_that(views.recently_viewed, equal_to(recent), label='recent')
    assert_that(views.frequently_viewed, equal_to(frequent), label='frequent')
    assert_that(views.catalog, equal_to(catalog), label='catalog')


# --- the step/record split, incremental top-k, deferred records ------------------------------

from sourcebeam.transforms.projections import (DeferredRecords, PendingRecord, ViewCounts, built,  # noqa: E402
                                    bump_top, defers_records)

RETAIL_USER_EVENTS = st.lists(st.tuples(
    st.sampled_from(['ProductViewed'] * 4 + ['CartItemAdded', 'CartItemRemoved',
                                             'ProductPurchased', 'UserLoggedIn']),
    st.sampled_from('abcdefghijklmno'), st.integers(0, 4)), max_size=60)


def user_events(spec):
  ev = Stream()
  out = []
  for kind, p, q in spec:
    if kind == 'ProductViewed':
      out.append(ev(kind, user_id='u1', product_id=p))
    elif kind == 'UserLoggedIn':
      out.append(ev(kind, user_id='u1', name='x'))
    elif kind == 'ProductPurchased':
      out.append(ev(kind, user_id='u1', product_id=p, quantity=q, price=1.0))
    else:
      out.append(ev(kind, user_id='u1', product_id=p, quantity=q))
  return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from('abcdefghijklmnopqrstuvwxyz'[:15]), max_size=80),
       st.integers(1, 12))
def test_bump_top_keeps_top_viewed_after_every_view(products, limit):
  counts, top = {}, ()
  for p in products:
    counts[p] = counts.get(p, 0) + 1
    top = bump_top(top, p, counts[p], limit)
    assert [{'product_id': q, 'views': -n} for n, q in top] == top_viewed(counts, limit)


def test_frequently_viewed_takes_a_state_kept_as_a_plain_dict():
  """States written before the ranking was kept incrementally were {product: views}."""
  h = FrequentlyViewedHandler(limit=2)
  new, out = h.apply({'a': 3, 'b': 1, 'c': 2}, views(['b'])[0])
  assert isinstance(new, ViewCounts) and new.counts == {'a': 3, 'b': 2, 'c': 2}
  assert out[0]['products'] == [{'product_id': 'a', 'views': 3}, {'product_id': 'b', 'views': 2}]


@settings(max_examples=150, deadline=None)
@given(RETAIL_USER_EVENTS)
def test_deferred_records_build_what_apply_gives(spec):
  """DeferredRecords changes state with the same steps, and each pending record, built
  whenever, equals the record apply gave for that event; states are never changed in place."""
  events = user_events(spec)
  live = CombinedHandler([CartHandler(), RecentlyViewedHandler(), FrequentlyViewedHandler()])
  deferred = DeferredRecords(
      CombinedHandler([CartHandler(), RecentlyViewedHandler(), FrequentlyViewedHandler()]))
  s_live, s_def = live.initial_state('u1'), deferred.initial_state('u1')
  want, pending = [], []
  for e in events:
    s_live, out = live.apply(s_live, e)
    want.extend(out)
    snapshot = repr(s_def)
    s2, outs = deferred.apply(s_def, e)
    assert repr(s_def) == snapshot  # the input state is untouched
    s_def = s2
    assert all(isinstance(o, PendingRecord) for o in outs)
    pending.extend(outs)
  assert s_def == s_live
  assert [p['view'] for p in pending] == [r['view'] for r in want]
  assert [built(p) for p in pending] == want  # built late, from the states they hold


def test_deferred_records_for_one_handler_and_what_cannot_defer():
  ev = Stream()
  image = ev('ProductImageAdded', product_id='p1', image_url='http://i')
  h = DeferredRecords(CatalogHandler())
  s, out = h.apply(h.initial_state('p1'), image)
  assert built(out[0]) == CatalogHandler().apply(CatalogHandler().initial_state('p1'), image)[1][0]
  assert h.apply(s, ev('ProductViewed', user_id='u', product_id='p1')) == (s, [])
  assert built({'plain': 1}) == {'plain': 1}

  class Custom:
    def initial_state(self, key):
      return 0

    def apply(self, state, event):
      return state + 1, [state]

  assert not defers_records(Custom()) and not defers_records(CombinedHandler([Custom()]))
  with pytest.raises(TypeError, match='no step/record'):
    DeferredRecords(CombinedHandler([CartHandler(), Custom()]))


def test_combined_handler_still_calls_handlers_without_event_types():
  class Counter:
    def initial_state(self, key):
      return 0

    def apply(self, state, event):
      return state + 1, []

  h = CombinedHandler([CartHandler(), Counter()])
  ev = Stream()
  state, _ = fold(h, [ev('UserLoggedIn', user_id='u1', name='x'),
                      ev('CartItemAdded', user_id='u1', product_id='p', quantity=1)])
  assert state[1] == 2 and state[0].items.value() == {'p': 1}
