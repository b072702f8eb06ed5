"""The demo's retail views: their handlers in plain Python, and the views of an app run by
ApplyApp / WriteAppOutputs on a real runner with real JSON-lines and Parquet files."""

import json
import random

import pytest

from hypothesis import given, settings, strategies as st

from tests.demo import DEMO_SCHEMAS, REG
from sourcebeam.demo.app import add_retail_views
from sourcebeam.schemas.envelope import make_envelope
from sourcebeam.transforms.app import App
from sourcebeam.demo.retail import (CartHandler, CartState, CatalogHandler,
                                    FrequentlyViewedHandler, RecentlyViewedHandler,
                                    catalog_by_category, latest, merge_carts, top_viewed)


def retail_app() -> App:
  """An app of the demo's schemas with only its retail views."""
  app = App('retail-views', schemas=DEMO_SCHEMAS)
  add_retail_views(app)
  return app

T0 = 1_795_651_200_000


class Stream:
  """Envelopes of one partition key, sequenced from 1 like the published stream."""

  def __init__(self, region='us'):
    self.seq = 0
    self.region = region

  def __call__(self, event_type, **data):
    self.seq += 1
    return make_envelope(REG, event_type, data, event_id=f'{self.region}-{data.get("user_id", data.get("product_id"))}-{self.seq}',
                         sequence=self.seq, event_time=T0 + self.seq * 1000, origin='test')


def fold(handler, events, key='u1'):
  """A view handler over one key's events: its final state, and its record after each event
  of its types (a view's changelog)."""
  state, records = handler.initial_state(key), []
  for e in events:
    state, out = handler.apply(state, e)
    assert out == []  # a view's value is its state
    if e['event_type'] in handler.event_types:
      records.append(handler.record(e, state))
  return state, records


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


def test_the_user_views_share_one_ordering_and_each_gets_its_types():
  from sourcebeam.transforms.consumers import key_space_handlers
  app = retail_app()
  [user] = [ks for ks in key_space_handlers(app) if ks.name == 'user_id']
  ev = Stream()
  events = [ev('ProductViewed', user_id='u1', product_id='p1'),
            ev('UserLoggedIn', user_id='u1', name='x'),
            ev('CartItemAdded', user_id='u1', product_id='p1', quantity=1)]
  state, changes = user.handler.initial_state('u1'), []
  for e in events:
    state, out = user.handler.apply(state, e)
    changes.extend(out)
  names = [app.per_key[c.consumer].name for c in changes]
  assert names == ['retail/recently_viewed', 'retail/frequently_viewed', 'retail/cart']
  assert [c.event['sequence'] for c in changes] == [1, 1, 3]
  assert isinstance(state[0], CartState) and state[0].items.value() == {'p1': 1}


# --- Beam: the views of an app, written ----------------------------------------------------------

def _published_retail(n, seed):
  from sourcebeam.generators.retail import retail_events
  from sourcebeam.schemas.envelope import iso_to_millis
  events = []
  for e in retail_events(n, seed=seed):
    e = dict(e, event_time=iso_to_millis(e['event_time']))
    events.append(e)
  return events


def _expected_views(events):
  from sourcebeam.demo.retail import PRODUCT_EVENT_TYPES, USER_EVENT_TYPES
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
    handlers = ([CartHandler(), RecentlyViewedHandler(), FrequentlyViewedHandler()]
                if space == 'user' else [CatalogHandler()])
    for handler in handlers:
      out.extend(fold(handler, evs, key)[1])
  return latest(out)


def test_retail_views_write_final_views_as_jsonl_and_parquet(tmp_path):
  import apache_beam as beam
  import pyarrow.parquet as pq
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that, equal_to
  from sourcebeam.demo.retail import VIEWS
  from sourcebeam.transforms.consumers import ApplyApp, WriteAppOutputs

  events = _published_retail(400, seed=5)
  expected = _expected_views(events)
  assert {v for v, _ in expected} == set(VIEWS)  # the fixture exercises every view
  ride = make_envelope(REG, 'TaxiLocationReported', {'taxi_id': 1, 'lon': 0.0, 'lat': 0.0},
                       event_id='t1', sequence=1, event_time=T0, origin='taxi-gps')
  duplicate = next(e for e in events if e['event_type'] == 'CartItemAdded')
  shuffled = events + [ride, duplicate]
  random.Random(2).shuffle(shuffled)
  app = retail_app()
  with TestPipeline() as p:
    result = p | beam.Create(shuffled) | ApplyApp(app)
    counts = result | WriteAppOutputs(app, str(tmp_path))
    for view in VIEWS:
      n = sum(1 for v, _ in expected if v == view)
      assert_that(counts[f'retail/{view}'] | f'n {view}' >> beam.combiners.Count.Globally(),
                  equal_to([n]), label=f'count {view}')
    assert_that(result.unprocessed | beam.Map(lambda u: (u['reason'], u['sequence'], u['key_space'])),
                equal_to([('duplicate', duplicate['sequence'], 'user_id')]), label='unprocessed')
  for view in VIEWS:
    want = sorted((r for (v, _), r in expected.items() if v == view), key=lambda r: r['key'])
    with open(tmp_path / 'retail' / f'{view}.jsonl') as f:
      got_json = sorted((json.loads(l) for l in f), key=lambda r: r['key'])
    assert got_json == want
    got_parquet = sorted(pq.read_table(tmp_path / 'retail' / f'{view}.parquet').to_pylist(),
                         key=lambda r: r['key'])
    assert got_parquet == want


def test_retail_views_streaming_changelog_applies_events_in_sequence_order():
  """Out-of-order arrival with watermarks between: the changelog's records follow
  sequence order per key, and its latest record per key is the bounded view."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.test_stream import TestStream
  from apache_beam.testing.util import assert_that, equal_to
  from apache_beam.transforms import window
  from sourcebeam.transforms.consumers import ApplyApp

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
  app = retail_app()

  def records(result, name):
    view = app.get(name)
    return result.views[name] | f'Records {name}' >> beam.Map(
        lambda kv: view.record(kv[0], kv[1].state, kv[1].event))

  with TestPipeline(options=options) as p:
    result = p | stream | ApplyApp(app)
    assert_that(records(result, 'retail/cart'), equal_to(cart), label='cart')
    assert_that(records(result, 'retail/recently_viewed'), equal_to(recent), label='recent')
    assert_that(records(result, 'retail/frequently_viewed'), equal_to(frequent), label='frequent')
    assert_that(records(result, 'retail/catalog'), equal_to(catalog), label='catalog')


# --- the step/record split, incremental top-k ------------------------------------------------

from sourcebeam.demo.retail import ViewCounts, bump_top  # noqa: E402

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
  new, _ = h.apply({'a': 3, 'b': 1, 'c': 2}, views(['b'])[0])
  assert isinstance(new, ViewCounts) and new.counts == {'a': 3, 'b': 2, 'c': 2}
  assert h.record(views(['b'])[0], new)['products'] == [{'product_id': 'a', 'views': 3}, {'product_id': 'b', 'views': 2}]


@settings(max_examples=150, deadline=None)
@given(RETAIL_USER_EVENTS)
def test_states_are_values_never_changed_in_place(spec):
  """The ordering core keeps a key's old state when a handler raises, and a view's final
  record is built from the state it was given: a step never changes its input state."""
  for handler in (CartHandler(), RecentlyViewedHandler(), FrequentlyViewedHandler()):
    state = handler.initial_state('u1')
    for e in user_events(spec):
      before = repr(state)
      new, _ = handler.apply(state, e)
      assert repr(state) == before
      state = new
