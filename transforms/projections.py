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
:class:`RetailProjections` wires the handlers to the stream;
:class:`WriteProjections` writes each view as JSON lines and Parquet.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam

from transforms.crdt import QuantityORSet

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

  def initial_state(self, key: str) -> CartState:
    return CartState()

  def apply(self, state: CartState, event: Envelope) -> Tuple[CartState, List[Record]]:
    kind, data = event['event_type'], event['data']
    items = state.items
    if kind == 'CartItemAdded':
      items = items.add(data['product_id'], event['event_id'], max(0, data['quantity']))
    elif kind == 'CartItemRemoved':
      have = items.value().get(data['product_id'], 0)
      items = items.add(data['product_id'], event['event_id'], -min(have, max(0, data['quantity'])))
    elif kind == 'ProductPurchased':
      items = items.remove(data['product_id'])
    else:
      return state, []
    new = CartState(items)
    return new, [cart_record(event, new)]


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

  def initial_state(self, key: str) -> Dict[str, Any]:
    return {'product_id': key, **{f: None for f in PRODUCT_FIELDS}, 'image_url': None}

  def apply(self, state: Dict[str, Any], event: Envelope) -> Tuple[Dict[str, Any], List[Record]]:
    kind, data = event['event_type'], event['data']
    if kind == 'ProductCreated':
      new = dict(state, **{f: data[f] for f in PRODUCT_FIELDS})
    elif kind == 'ProductImageAdded':
      new = dict(state, image_url=data['image_url'])
    else:
      return state, []
    return new, [_record('catalog', event, **new)]


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

  def __init__(self, limit: int = RECENT_LIMIT):
    self.limit = limit

  def initial_state(self, key: str) -> Tuple[str, ...]:
    return ()

  def apply(self, state: Tuple[str, ...], event: Envelope) -> Tuple[Tuple[str, ...], List[Record]]:
    if event['event_type'] != 'ProductViewed':
      return state, []
    product = event['data']['product_id']
    new = ((product,) + tuple(p for p in state if p != product))[:self.limit]
    return new, [_record('recently_viewed', event, products=list(new))]


class FrequentlyViewedHandler:
  """A user's 10 most viewed products: most views first, ties by product_id."""

  view = 'frequently_viewed'

  def __init__(self, limit: int = FREQUENT_LIMIT):
    self.limit = limit

  def initial_state(self, key: str) -> Dict[str, int]:
    return {}

  def apply(self, state: Dict[str, int], event: Envelope) -> Tuple[Dict[str, int], List[Record]]:
    if event['event_type'] != 'ProductViewed':
      return state, []
    product = event['data']['product_id']
    new = dict(state)
    new[product] = new.get(product, 0) + 1
    return new, [_record('frequently_viewed', event, products=top_viewed(new, self.limit))]


def top_viewed(counts: Mapping[str, int], limit: int) -> List[Dict[str, Any]]:
  ranked = sorted(counts.items(), key=lambda pc: (-pc[1], pc[0]))[:limit]
  return [{'product_id': p, 'views': n} for p, n in ranked]


# --- several handlers on one stream ------------------------------------------------------------

class CombinedHandler:
  """Several handlers over one key space, ordered once: the state is a tuple of
  their states and the outputs are all of theirs, in handler order."""

  def __init__(self, handlers: Sequence[Any]):
    self.handlers = tuple(handlers)

  def initial_state(self, key: str) -> tuple:
    return tuple(h.initial_state(key) for h in self.handlers)

  def apply(self, state: tuple, event: Envelope) -> Tuple[tuple, List[Any]]:
    new_states, outputs = [], []
    for h, s in zip(self.handlers, state):
      s2, out = h.apply(s, event)
      new_states.append(s2)
      outputs.extend(out)
    return tuple(new_states), outputs


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
    from transforms.ordering import ProcessInOrder  # the ordering issue's transform

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
