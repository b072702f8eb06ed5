"""The retail projections: per-key handlers that build views from the published stream.

"Do (much) more with your event consumers": each view is a handler, plain
Python, applied by :class:`transforms.ordering.ProcessInOrder` to one
partition key's events strictly in sequence order::

    handler.initial_state(key) -> state
    handler.apply(state, envelope) -> (new_state, outputs)

A user's stream mixes event types (views, cart changes, logins, purchases) and
its sequence numbers run across all of them, so every handler takes *every*
event of its key space and passes over the types it does not project
(returning its state unchanged and no output); filtering a key's events before
ordering would leave gaps that never fill.

Each output is a projection record, a flat dict with a fixed shape per view
(the same shape in JSON lines and Parquet; see :data:`PARQUET_SCHEMAS`)::

    cart:              {view, key, items: [{product_id, quantity}], as_of_sequence, event_time}
    catalog:           {view, key, product_id, brand, name, description, category,
                        image_url, as_of_sequence, event_time}
    recently_viewed:   {view, key, products: [product_id, newest first], as_of_sequence,
                        event_time}
    frequently_viewed: {view, key, products: [{product_id, views}], as_of_sequence,
                        event_time}

``key`` is the partition key (user_id, or product_id for the catalog),
``as_of_sequence`` the sequence of the last event applied and ``event_time``
its time (epoch millis). The latest record per key is the view.

Each retail handler is split in two, and ``apply`` is just the two together:
``step(state, event) -> new_state`` for the event types in ``event_types``
(the state change) and ``record(event, state)`` (the view record after it).
The split lets a bounded replay, which keeps only the last record per key,
build that one record at the end (:class:`DeferredRecords`) with the same
``step`` and ``record`` code the live pipeline runs, and lets
:class:`CombinedHandler` skip the handlers an event type does not concern.
States are immutable values: ``step`` returns a new state and never changes
its input (the ordering core keeps the old state when a handler raises, and a
deferred record holds the state it was made from).
:class:`RetailProjections` wires the handlers to the stream;
:class:`WriteProjections` writes each view as JSON lines and Parquet.
"""

from __future__ import annotations

import bisect
import json
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam

from sourcebeam.transforms.crdt import QuantityORSet

Envelope = Mapping[str, Any]
Record = Dict[str, Any]

VIEWS = ('cart', 'catalog', 'recently_viewed', 'frequently_viewed')
RECENT_LIMIT = 10
FREQUENT_LIMIT = 10

# The key spaces: which event types share a partition key's sequence.
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


# --- several handlers on one stream ------------------------------------------------------------

def _apply(handler: Any, state: Any, event: Envelope) -> Tuple[Any, List[Record]]:
  """A retail handler's ``apply``: its ``step`` and ``record`` for its event types;
  other types pass over (the state unchanged, no output)."""
  if event['event_type'] not in handler.event_types:
    return state, []
  new = handler.step(state, event)
  return new, [handler.record(event, new)]


class CombinedHandler:
  """Several handlers over one key space, ordered once: the state is a tuple of
  their states and the outputs are all of theirs, in handler order.

  A handler that declares ``event_types`` (the types it projects; every other
  type passes it over unchanged) is only called for those types: most events
  concern one of the handlers, not all of them.
  """

  def __init__(self, handlers: Sequence[Any]):
    self.handlers = tuple(handlers)
    self._types = tuple(getattr(h, 'event_types', None) for h in self.handlers)
    self._typed = any(t is not None for t in self._types)

  def initial_state(self, key: str) -> tuple:
    return tuple(h.initial_state(key) for h in self.handlers)

  def apply(self, state: tuple, event: Envelope) -> Tuple[tuple, List[Any]]:
    kind = event['event_type'] if self._typed else None
    new_states, outputs = [], []
    for h, s, types in zip(self.handlers, state, self._types):
      if types is not None and kind not in types:
        new_states.append(s)
        continue
      s2, out = h.apply(s, event)
      new_states.append(s2)
      outputs.extend(out)
    return tuple(new_states), outputs


class PendingRecord:
  """A view record not built yet: ``handler.record(event, state)`` when needed.

  ``record['view']`` answers without building (what picks the latest record per
  view and key); any other field, or :meth:`build`, builds the record.
  """

  __slots__ = ('view', 'handler', 'event', 'state')

  def __init__(self, handler: Any, event: Envelope, state: Any):
    self.view, self.handler, self.event, self.state = handler.view, handler, event, state

  def build(self) -> Record:
    return self.handler.record(self.event, self.state)

  def __getitem__(self, name: str) -> Any:
    return self.view if name == 'view' else self.build()[name]

  def __repr__(self) -> str:
    return f'PendingRecord({self.view!r}, sequence={self.event["sequence"]!r})'


def built(output: Any) -> Any:
  """An output as the handler's ``apply`` gives it: a PendingRecord is built."""
  return output.build() if type(output) is PendingRecord else output


def defers_records(handler: Any) -> bool:
  """Whether ``handler`` (or every handler a CombinedHandler holds) has ``step``/``record``."""
  if isinstance(handler, CombinedHandler):
    return all(defers_records(h) for h in handler.handlers)
  return all(hasattr(handler, a) for a in ('step', 'record', 'event_types', 'view'))


class DeferredRecords:
  """A retail handler (or CombinedHandler of them) whose outputs are PendingRecords.

  For a bounded replay that keeps only the last record per view and key: the
  state changes per event exactly as ``handler.apply`` changes it (the same
  ``step``), but the record, the costlier half for most events, is built by
  the same ``record`` only for the output that is kept (:func:`built`). Each
  pending record holds the immutable state it was made from, so building it
  late gives the record ``apply`` would have given then.
  """

  def __init__(self, handler: Any):
    if not defers_records(handler):
      raise TypeError(f'{type(handler).__name__} has no step/record to defer')
    self.handler = handler
    self._combined = isinstance(handler, CombinedHandler)
    parts = handler.handlers if self._combined else (handler,)
    # Event type -> the (position, handler) pairs it concerns, in handler order.
    by_type: Dict[str, List[Tuple[int, Any]]] = {}
    for i, h in enumerate(parts):
      for t in h.event_types:
        by_type.setdefault(t, []).append((i, h))
    self._by_type = {t: tuple(hs) for t, hs in by_type.items()}

  def initial_state(self, key: str) -> Any:
    return self.handler.initial_state(key)

  def apply(self, state: Any, event: Envelope) -> Tuple[Any, List[PendingRecord]]:
    concerned = self._by_type.get(event['event_type'])
    if not concerned:
      return state, []
    if not self._combined:
      h = concerned[0][1]
      new = h.step(state, event)
      return new, [PendingRecord(h, event, new)]
    states, outputs = list(state), []
    for i, h in concerned:
      s = states[i] = h.step(states[i], event)
      outputs.append(PendingRecord(h, event, s))
    return tuple(states), outputs


def latest(records: Iterable[Record]) -> Dict[Tuple[str, str], Record]:
  """Plain-Python view: the latest record per (view, key)."""
  out: Dict[Tuple[str, str], Record] = {}
  for r in records:
    k = (r['view'], r['key'])
    if k not in out or r['as_of_sequence'] >= out[k]['as_of_sequence']:
      out[k] = r
  return out


# --- Beam: the projections as transforms ----------------------------------------------------------

class LatestRecordFn(beam.CombineFn):
  """The record with the highest ``as_of_sequence``: the view of one key."""

  def create_accumulator(self):
    return None

  def add_input(self, acc, record):
    return record if acc is None or record['as_of_sequence'] > acc['as_of_sequence'] else acc

  def merge_accumulators(self, accs):
    out = None
    for a in accs:
      if a is not None:
        out = self.add_input(out, a)
    return out

  def extract_output(self, acc):
    return acc


class ProjectionViews(NamedTuple):
  """One PCollection of view records per view, and the events ordering could not apply."""
  cart: beam.PCollection
  catalog: beam.PCollection
  recently_viewed: beam.PCollection
  frequently_viewed: beam.PCollection
  unprocessed: beam.PCollection  # ProcessInOrder's records: duplicates, gaps, handler errors

  def views(self) -> Dict[str, beam.PCollection]:
    return {v: getattr(self, v) for v in VIEWS}


class RetailProjections(beam.PTransform):
  """Published envelopes -> the four retail views.

  User-keyed events (views, cart, purchases, logins...) are ordered once per
  user and fed to the cart, recently-viewed and frequently-viewed handlers
  together; product-keyed events to the catalog handler. Other event types
  (rides, riders) are not retail views' business and are passed over.

  ``final``: True gives one record per key, the latest (the view); False gives
  every record (the changelog, what a live view store applies). The default is
  True for bounded input and False for unbounded input, where "final" has no
  end to wait for. ``ordering`` passes options to ``ProcessInOrder``
  (``gap_timeout``, ``gap_policy``, ``expansion``...).
  """

  def __init__(self, final: Optional[bool] = None, **ordering):
    super().__init__()
    self.final = final
    self.ordering = ordering

  def expand(self, envelopes):
    from sourcebeam.transforms.ordering import ProcessInOrder  # the ordering issue's transform

    users = envelopes | 'UserEvents' >> beam.Filter(
        lambda e: e['event_type'] in USER_EVENT_TYPES)
    products = envelopes | 'ProductEvents' >> beam.Filter(
        lambda e: e['event_type'] in PRODUCT_EVENT_TYPES)
    by_user = users | 'OrderPerUser' >> ProcessInOrder(
        CombinedHandler([CartHandler(), RecentlyViewedHandler(), FrequentlyViewedHandler()]),
        **self.ordering)
    by_product = products | 'OrderPerProduct' >> ProcessInOrder(CatalogHandler(), **self.ordering)
    records = ((by_user.outputs, by_product.outputs)
               | 'AllRecords' >> beam.Flatten()
               | 'DropKey' >> beam.Map(lambda key_record: key_record[1]))
    split = records | 'ByView' >> beam.Partition(lambda r, n: VIEWS.index(r['view']), len(VIEWS))
    final = envelopes.is_bounded if self.final is None else self.final
    views = {}
    for view, pcoll in zip(VIEWS, split):
      if final:
        pcoll = (pcoll
                 | f'Key {view}' >> beam.Map(lambda r: (r['key'], r))
                 | f'Latest {view}' >> beam.CombinePerKey(LatestRecordFn())
                 | f'View {view}' >> beam.Values())
      views[view] = pcoll
    unprocessed = ((by_user.unprocessed, by_product.unprocessed)
                   | 'AllUnprocessed' >> beam.Flatten())
    return ProjectionViews(unprocessed=unprocessed, **views)


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


def record_to_json(record: Record) -> str:
  return json.dumps(record, sort_keys=True, separators=(',', ':'), ensure_ascii=False)


class WriteProjections(beam.PTransform):
  """Writes each view as ``DIR/<view>.jsonl`` and ``DIR/<view>.parquet`` (one
  file each) and returns ``{view: PCollection of one int}``, the records written.

  Input: a :class:`ProjectionViews` or a dict ``{view: PCollection}``.
  """

  def __init__(self, out_dir: str):
    super().__init__()
    self.out_dir = out_dir

  def expand(self, views):
    from apache_beam.io.filesystems import FileSystems
    if isinstance(views, ProjectionViews):
      views = views.views()
    counts = {}
    for view, pcoll in views.items():
      prefix = FileSystems.join(self.out_dir, view)
      _ = (pcoll
           | f'Json {view}' >> beam.Map(record_to_json)
           | f'WriteJsonl {view}' >> beam.io.WriteToText(
               prefix, file_name_suffix='.jsonl', shard_name_template='', num_shards=1))
      _ = pcoll | f'WriteParquet {view}' >> beam.io.WriteToParquet(
          prefix, PARQUET_SCHEMAS[view], file_name_suffix='.parquet',
          shard_name_template='', num_shards=1)
      counts[view] = (pcoll
                      | f'Global {view}' >> beam.WindowInto(beam.window.GlobalWindows())
                      | f'Count {view}' >> beam.combiners.Count.Globally())
    return counts
