"""The retail views: per-key handlers that build views from the published stream.

Part of the demo application (see ``app.py`` beside this module), written with
Sourcebeam's public API. "Do (much) more with your event consumers": each view
is a handler, plain Python, that the app registers with ``app.view``::

    handler.initial_state(key) -> state
    handler.apply(state, event) -> (new_state, outputs)

Sourcebeam orders each partition key's events once (a user's views, cart
changes, logins and purchases share one sequence) and hands each view the
event types it declares, so a view never waits on a gap made by types it does
not read.

Each view's record, what ``retail/<view>.jsonl`` holds per key and the view
API answers, is a flat dict with a fixed shape per view (the same shape in JSON
lines and Parquet; see :data:`PARQUET_SCHEMAS`)::

    cart:              {view, key, items: [{product_id, quantity}], as_of_sequence, event_time}
    catalog:           {view, key, product_id, brand, name, description, category,
                        image_url, as_of_sequence, event_time}
    recently_viewed:   {view, key, products: [product_id, newest first], as_of_sequence,
                        event_time}
    frequently_viewed: {view, key, products: [{product_id, views}], as_of_sequence,
                        event_time}

``key`` is the partition key (user_id, or product_id for the catalog),
``as_of_sequence`` the sequence of the last event the view applied and
``event_time`` its time (epoch millis).

Each handler is split in two: ``step(state, event) -> new_state`` for the
event types in ``event_types`` (the state change; ``apply`` is ``step`` with no
outputs) and ``record(event, state)`` (the view record after it), which the
app's ``record=`` function calls only for the value it keeps. States are
immutable values: ``step`` returns a new state and never changes its input.
"""

from __future__ import annotations

import bisect
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

from sourcebeam import QuantityORSet

Envelope = Mapping[str, Any]
Record = Dict[str, Any]

VIEWS = ('cart', 'catalog', 'recently_viewed', 'frequently_viewed')
RECENT_LIMIT = 10
FREQUENT_LIMIT = 10

# The key spaces: which event types share a partition key's sequence (declared in the
# schemas: the types keyed by user_id, and those keyed by product_id).
USER_EVENT_TYPES = frozenset({
    'ProductViewed', 'CartItemAdded', 'CartItemRemoved', 'ProductPurchased',
    'UserLoggedIn', 'PhoneNumberUpdated', 'RoleAdded'})
PRODUCT_EVENT_TYPES = frozenset({'ProductCreated', 'ProductImageAdded'})


def _record(view: str, event: Envelope, **fields) -> Record:
  return {'view': view, 'key': event['partition_key'], **fields,
          'as_of_sequence': event['sequence'], 'event_time': event['event_time']}


# --- cart ---------------------------------------------------------------------------

class CartState(NamedTuple):
  """A user's cart: an OR-Set with quantities, so two regions' carts merge."""
  items: QuantityORSet = QuantityORSet()


class CartHandler:
  """Cart contents per user.

  CartItemAdded adds its quantity; CartItemRemoved takes away up to its
  quantity (never below zero); ProductPurchased empties that product's line
  from the cart (what was bought is no longer in the cart). Each change is an
  add to the user's :class:`QuantityORSet` tagged with the event id, so a
  replica of the cart kept in another region merges with this one
  (:func:`merge_carts`) and a replayed event changes nothing.
  """

  view = 'cart'
  event_types = frozenset({'CartItemAdded', 'CartItemRemoved', 'ProductPurchased'})

  def initial_state(self, key: str) -> CartState:
    return CartState()

  def apply(self, state: CartState, event: Envelope) -> Tuple[CartState, List[Record]]:
    return _apply(self, state, event)

  def step(self, state: CartState, event: Envelope) -> CartState:
    kind, data = event['event_type'], event['data']
    items = state.items
    if kind == 'CartItemAdded':
      items = items.add(data['product_id'], event['event_id'], max(0, data['quantity']))
    elif kind == 'CartItemRemoved':
      have = items.quantity(data['product_id'])
      items = items.add(data['product_id'], event['event_id'], -min(have, max(0, data['quantity'])))
    else:  # ProductPurchased
      items = items.remove(data['product_id'])
    return CartState(items)

  def record(self, event: Envelope, state: CartState) -> Record:
    return cart_record(event, state)


def cart_record(event: Envelope, state: CartState) -> Record:
  return _record('cart', event, items=[
      {'product_id': p, 'quantity': q} for p, q in sorted(state.items.value().items())])


def merge_carts(a: CartState, b: CartState) -> CartState:
  """Two regions' copies of one user's cart, merged (commutative, idempotent)."""
  return CartState(a.items.merge(b.items))


# --- catalog ---------------------------------------------------------------------------

PRODUCT_FIELDS = ('brand', 'name', 'description', 'category')


class CatalogHandler:
  """The product catalog: the latest product data with its image, per product_id.

  ProductCreated sets (or, when repeated, updates) the product's fields;
  ProductImageAdded sets its image. A record is emitted on each change; a
  product whose image came first shows ``None`` fields until it is created.
  """

  view = 'catalog'
  event_types = frozenset({'ProductCreated', 'ProductImageAdded'})

  def initial_state(self, key: str) -> Dict[str, Any]:
    return {'product_id': key, **{f: None for f in PRODUCT_FIELDS}, 'image_url': None}

  def apply(self, state: Dict[str, Any], event: Envelope) -> Tuple[Dict[str, Any], List[Record]]:
    return _apply(self, state, event)

  def step(self, state: Dict[str, Any], event: Envelope) -> Dict[str, Any]:
    data = event['data']
    if event['event_type'] == 'ProductCreated':
      return dict(state, **{f: data[f] for f in PRODUCT_FIELDS})
    return dict(state, image_url=data['image_url'])  # ProductImageAdded

  def record(self, event: Envelope, state: Dict[str, Any]) -> Record:
    return _record('catalog', event, **state)


def catalog_by_category(records: Iterable[Record]) -> Dict[Optional[str], List[Record]]:
  """The catalog view grouped by category, products sorted by id within each."""
  out: Dict[Optional[str], List[Record]] = {}
  for r in sorted(records, key=lambda r: r['product_id']):
    out.setdefault(r['category'], []).append(r)
  return out


# --- recently and frequently viewed ----------------------------------------------------------

class RecentlyViewedHandler:
  """The last 10 distinct products a user viewed, newest first."""

  view = 'recently_viewed'
  event_types = frozenset({'ProductViewed'})

  def __init__(self, limit: int = RECENT_LIMIT):
    self.limit = limit

  def initial_state(self, key: str) -> Tuple[str, ...]:
    return ()

  def apply(self, state: Tuple[str, ...], event: Envelope) -> Tuple[Tuple[str, ...], List[Record]]:
    return _apply(self, state, event)

  def step(self, state: Tuple[str, ...], event: Envelope) -> Tuple[str, ...]:
    product = event['data']['product_id']
    if state and state[0] == product:  # viewed again: nothing moves
      return state
    # The state's products are distinct: moving one to the front is two slices.
    i = state.index(product) if product in state else len(state)
    return ((product,) + state[:i] + state[i + 1:])[:self.limit]

  def record(self, event: Envelope, state: Tuple[str, ...]) -> Record:
    return _record('recently_viewed', event, products=list(state))


class ViewCounts(NamedTuple):
  """Frequently viewed state: views per product, and the ranking's head kept up to date.

  ``top`` is ``(-views, product_id)`` of the ``limit`` best products, best
  first: :func:`top_viewed` of ``counts``, maintained per view instead of
  re-sorting every product the user ever viewed. ``counts`` is never changed
  in place (a new dict per view).
  """
  counts: Mapping[str, int] = {}
  top: Tuple[Tuple[int, str], ...] = ()


class FrequentlyViewedHandler:
  """A user's 10 most viewed products: most views first, ties by product_id."""

  view = 'frequently_viewed'
  event_types = frozenset({'ProductViewed'})

  def __init__(self, limit: int = FREQUENT_LIMIT):
    self.limit = limit

  def initial_state(self, key: str) -> ViewCounts:
    return ViewCounts()

  def apply(self, state: ViewCounts, event: Envelope) -> Tuple[ViewCounts, List[Record]]:
    return _apply(self, state, event)

  def step(self, state: ViewCounts, event: Envelope) -> ViewCounts:
    if not isinstance(state, ViewCounts):  # a plain {product: views} (state kept before 2026-11)
      state = ViewCounts(state, tuple((-n, p) for p, n in sorted(
          state.items(), key=lambda pc: (-pc[1], pc[0]))[:self.limit]))
    product = event['data']['product_id']
    counts = dict(state.counts)
    views = counts[product] = counts.get(product, 0) + 1
    return ViewCounts(counts, bump_top(state.top, product, views, self.limit))

  def record(self, event: Envelope, state: ViewCounts) -> Record:
    return _record('frequently_viewed', event,
                   products=[{'product_id': p, 'views': -n} for n, p in state.top])


def bump_top(top: Tuple[Tuple[int, str], ...], product: str, views: int,
             limit: int) -> Tuple[Tuple[int, str], ...]:
  """The top ``limit`` after ``product`` got its ``views``-th view, from the top before.

  Exact because counts only grow: a product outside the top can only enter it
  by its own view, and then only by displacing the last entry. Costs
  O(limit) per view, not a sort of every product viewed.
  """
  entry = (-views, product)
  rest = [e for e in top if e[1] != product]
  if len(rest) == len(top) and len(top) >= limit and not entry < top[-1]:
    return top  # not in the top before, and not enough views to enter it
  bisect.insort(rest, entry)
  return tuple(rest[:limit])


def top_viewed(counts: Mapping[str, int], limit: int) -> List[Dict[str, Any]]:
  """The definition :func:`bump_top` keeps: most views first, ties by product_id."""
  ranked = sorted(counts.items(), key=lambda pc: (-pc[1], pc[0]))[:limit]
  return [{'product_id': p, 'views': n} for p, n in ranked]


# --- the view records ---------------------------------------------------------------------

def _apply(handler: Any, state: Any, event: Envelope) -> Tuple[Any, List[Record]]:
  """A retail handler's ``apply``: its ``step`` for its event types, no outputs (a view's
  value is its state; the record is built from it by :func:`view_record`)."""
  if event['event_type'] not in handler.event_types:
    return state, []
  return handler.step(state, event), []


def latest(records: Iterable[Record]) -> Dict[Tuple[str, str], Record]:
  """Plain-Python view: the latest record per (view, key)."""
  out: Dict[Tuple[str, str], Record] = {}
  for r in records:
    k = (r['view'], r['key'])
    if k not in out or r['as_of_sequence'] >= out[k]['as_of_sequence']:
      out[k] = r
  return out


HANDLERS = {'cart': CartHandler, 'catalog': CatalogHandler,
            'recently_viewed': RecentlyViewedHandler, 'frequently_viewed': FrequentlyViewedHandler}


class ViewRecord:
  """``record=`` of a retail view: the handler's record of the final state and last event."""

  def __init__(self, handler: Any):
    self.handler = handler

  def __call__(self, key: str, state: Any, event: Envelope) -> Record:
    return self.handler.record(event, state)


def _parquet_schemas():
  import pyarrow as pa
  head = [('view', pa.string()), ('key', pa.string())]
  tail = [('as_of_sequence', pa.int64()), ('event_time', pa.int64())]
  return {
      'cart': pa.schema(head + [('items', pa.list_(pa.struct(
          [('product_id', pa.string()), ('quantity', pa.int64())])))] + tail),
      'catalog': pa.schema(head + [(f, pa.string()) for f in ('product_id',) + PRODUCT_FIELDS
                                   + ('image_url',)] + tail),
      'recently_viewed': pa.schema(head + [('products', pa.list_(pa.string()))] + tail),
      'frequently_viewed': pa.schema(head + [('products', pa.list_(pa.struct(
          [('product_id', pa.string()), ('views', pa.int64())])))] + tail),
  }


PARQUET_SCHEMAS = _parquet_schemas()
