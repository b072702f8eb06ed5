"""Raw retail events from Hello, Retail!'s domain, as a clean producer writes them.

The generator runs a small simulation rather than drawing each event alone, so
that the stream tells a consistent story a consumer can check:

* a merchant creates the catalog first (``ProductCreated``, from
  ``merchant-portal``), a photographer adds images (``ProductImageAdded``, from
  ``photographer-app``, following the creation); new products keep arriving;
* users view products (by far the most common event), with a Zipf-like
  popularity: a few products get most of the views;
* a cart add usually follows a view of that product by that user
  (``follows_from`` is the view's ``event_id``); a removal only removes what is
  in the cart; a purchase is usually of something in the cart (following its
  cart add) and empties that line of the cart;
* users log in, change phone numbers, are granted roles.

Every event is an envelope dict as ``schemas.validation.publish_raw`` accepts it
without repairs: event ids are UUIDs from the seeded RNG, per-partition-key
sequences start at 1 and follow event time, event times follow the arrival
phases (:mod:`generators.phases`) as ISO-8601 UTC strings. Same seed, same events.
"""

from __future__ import annotations

import bisect
import collections
import random
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from sourcebeam.generators import phases as phases_mod
from sourcebeam.generators.jsonl import iso_clock, event_id_from_bits
from sourcebeam.generators.jsonl import demo_registry

Envelope = Dict[str, object]

# The mix once the initial catalog exists: share of arrivals per event type.
RETAIL_MIX: Tuple[Tuple[str, float], ...] = (
    ('ProductViewed', 0.740),
    ('CartItemAdded', 0.090),
    ('CartItemRemoved', 0.025),
    ('ProductPurchased', 0.040),
    ('UserLoggedIn', 0.070),
    ('PhoneNumberUpdated', 0.010),
    ('RoleAdded', 0.004),
    ('ProductCreated', 0.012),
    ('ProductImageAdded', 0.009),
)
RETAIL_TYPES = tuple(t for t, _ in RETAIL_MIX)

BRANDS = ('Nordstrom', 'Halogen', 'Caslon', 'Zella', 'BP.', 'Treasure & Bond', 'Rodd & Gunn',
          'Madewell', 'Levi\'s', 'Patagonia', 'Nike', 'Adidas', 'UGG', 'Sorel', 'Vince')
CATEGORIES = ('Shoes', 'Dresses', 'Jackets', 'Sweaters', 'Jeans', 'Handbags', 'Jewelry',
              'Beauty', 'Home', 'Kids', 'Activewear', 'Accessories')
ADJECTIVES = ('Classic', 'Slim', 'Relaxed', 'Cozy', 'Waterproof', 'Organic', 'Vintage',
              'Quilted', 'Cropped', 'Merino', 'Leather', 'Linen', 'Recycled', 'Everyday')
NOUNS = ('Boot', 'Sneaker', 'Tote', 'Cardigan', 'Parka', 'Midi Dress', 'Denim Jacket',
         'Crewneck', 'Legging', 'Scarf', 'Beanie', 'Chino', 'Blazer', 'Candle', 'Serum')
FIRST_NAMES = ('Ava', 'Ben', 'Chloe', 'Diego', 'Emma', 'Finn', 'Grace', 'Hiro', 'Isla',
               'Jamal', 'Kai', 'Lena', 'Mateo', 'Nora', 'Omar', 'Priya', 'Quinn', 'Rosa',
               'Sam', 'Tariq', 'Uma', 'Victor', 'Wen', 'Ximena', 'Yusuf', 'Zoe')
LAST_NAMES = ('Anderson', 'Brown', 'Chen', 'Dubois', 'Evans', 'Fischer', 'Garcia', 'Hansen',
              'Ito', 'Johnson', 'Kim', 'Lopez', 'Muller', 'Nguyen', 'Okafor', 'Patel',
              'Rossi', 'Smith', 'Tanaka', 'Walker')
ROLES = ('photographer', 'merchant', 'customer-support', 'admin')
CHANNELS = ('web', 'web', 'web', 'mobile-app', 'mobile-app')

_RECENT_VIEWS = 4096  # views a cart add can follow from


def user_id(i: int) -> str:
  return f'u-{i:07d}'


def product_id(i: int) -> str:
  return f'p-{i:06d}'


def user_name(i: int) -> str:
  return f'{FIRST_NAMES[i % len(FIRST_NAMES)]} {LAST_NAMES[(i // len(FIRST_NAMES)) % len(LAST_NAMES)]}'


def default_users(n: int) -> int:
  """Many users: one per ~20 events, at least 20, at most a million."""
  return max(20, min(1_000_000, n // 20))


def default_products(n: int) -> int:
  """The initial catalog: one product per ~100 events, 5 to 5000."""
  return max(5, min(5000, n // 100))


def timed_retail_events(n: int,
                        seed: int = 1,
                        phases: Optional[Sequence[phases_mod.Phase]] = None,
                        start: Union[int, str, None] = None,
                        users: Optional[int] = None,
                        products: Optional[int] = None,
                        ) -> Iterator[Tuple[int, Envelope]]:
  """(event time in epoch millis, envelope dict) for up to n retail events.

  ``phases`` give the arrival shape (default: Hello, Retail!'s ~116 events/s);
  when they hold fewer than n arrivals, the stream ends with them.
  """
  ph = phases_mod.resolve(n, phases)
  times = phases_mod.arrival_times(ph, start, limit=n)
  rng = random.Random(seed)
  rand, bits = rng.random, rng.getrandbits
  iso = iso_clock()
  versions = {t: demo_registry().current[t].version for t in RETAIL_TYPES}
  key_field = {t: demo_registry().current[t].partition_key for t in RETAIL_TYPES}  # the key rules
  n_users = users or default_users(n)
  n_initial = products or default_products(n)

  cum, acc = [], 0.0
  for _, w in RETAIL_MIX:
    acc += w
    cum.append(acc)
  cum[-1] = 1.0  # rand() < 1, so bisect never runs off the end
  pick_type = bisect.bisect_right

  seq: Dict[str, int] = {}
  prod_ids: List[str] = []
  prices: List[float] = []
  prod_created: List[str] = []  # ProductCreated event id per product
  images: List[int] = []        # images per product
  awaiting_image: Deque[int] = collections.deque()
  popularity: List[int] = []    # product indices, most popular first
  recent_views: List[Tuple[int, int, str]] = []
  rv_next = 0
  carts: Dict[int, Dict[int, List]] = {}  # user -> product -> [quantity, add event id]
  cart_users: List[int] = []
  cart_pos: Dict[int, int] = {}
  last_login: Dict[int, str] = {}
  uid_cache: Dict[int, str] = {}
  # origins[u % 5][what]: each user sticks to one channel
  origins = [{what: f'{c}/{what}' for what in ('product-page', 'cart', 'checkout', 'login', 'account')}
             for c in CHANNELS]

  def uid(u: int) -> str:
    s = uid_cache.get(u)
    if s is None:
      s = uid_cache[u] = user_id(u)
    return s

  def drop_cart_line(u: int, p: int) -> None:
    cart = carts[u]
    del cart[p]
    if not cart:
      del carts[u]
      i = cart_pos.pop(u)
      last = cart_users.pop()
      if last != u:
        cart_users[i] = last
        cart_pos[last] = i

  def create_product() -> Tuple[str, str, Dict, Optional[str]]:
    i = len(prod_ids)
    pid = product_id(i)
    prod_ids.append(pid)
    prices.append(round(rng.lognormvariate(3.3, 0.7), 2))
    images.append(0)
    awaiting_image.append(i)
    popularity.insert(int(rand() * (len(popularity) + 1)), i)
    adj, noun = ADJECTIVES[int(rand() * len(ADJECTIVES))], NOUNS[int(rand() * len(NOUNS))]
    brand = BRANDS[int(rand() * len(BRANDS))]
    data = {'product_id': pid, 'brand': brand, 'name': f'{adj} {noun}',
            'description': f'{adj} {noun.lower()} by {brand}.',
            'category': CATEGORIES[int(rand() * len(CATEGORIES))]}
    return 'ProductCreated', 'merchant-portal', data, None

  def pick_product() -> int:
    # Zipf-like (s ~ 1): rank r has probability ~ 1/(r+1)
    c = len(popularity)
    r = int((c + 1) ** rand()) - 1
    return popularity[r if r < c else c - 1]

  for k, t in enumerate(times):
    eid = event_id_from_bits(bits(128))
    ff = None
    if k < n_initial:
      etype, origin, data, ff = create_product()
      prod_created.append(eid)
    else:
      etype = RETAIL_TYPES[pick_type(cum, rand())]
      if etype == 'CartItemRemoved' or etype == 'ProductPurchased':
        if not cart_users and not (etype == 'ProductPurchased' and recent_views):
          etype = 'ProductViewed'
      if etype == 'CartItemAdded' and not recent_views:
        etype = 'ProductViewed'

      if etype == 'ProductViewed':
        u = int(n_users * rand() ** 2)
        p = pick_product()
        origin = origins[u % 5]['product-page']
        data = {'user_id': uid(u), 'product_id': prod_ids[p]}
        if len(recent_views) < _RECENT_VIEWS:
          recent_views.append((u, p, eid))
        else:
          recent_views[rv_next] = (u, p, eid)
          rv_next = (rv_next + 1) % _RECENT_VIEWS
      elif etype == 'CartItemAdded':
        if rand() < 0.9:
          u, p, ff = recent_views[int(rand() * len(recent_views))]
        else:
          u, p = int(n_users * rand() ** 2), pick_product()
        x = rand()
        q = 1 if x < 0.8 else (2 if x < 0.95 else 3)
        cart = carts.get(u)
        if cart is None:
          cart = carts[u] = {}
          cart_pos[u] = len(cart_users)
          cart_users.append(u)
        line = cart.get(p)
        if line is None:
          cart[p] = [q, eid]
        else:
          line[0] += q
          line[1] = eid
        origin = origins[u % 5]['cart']
        data = {'user_id': uid(u), 'product_id': prod_ids[p], 'quantity': q}
      elif etype == 'CartItemRemoved':
        u = cart_users[int(rand() * len(cart_users))]
        cart = carts[u]
        p = next(iter(cart)) if len(cart) == 1 else list(cart)[int(rand() * len(cart))]
        line = cart[p]
        ff = line[1]
        q = line[0] if (line[0] == 1 or rand() < 0.7) else 1
        if q == line[0]:
          drop_cart_line(u, p)
        else:
          line[0] -= q
        origin = origins[u % 5]['cart']
        data = {'user_id': uid(u), 'product_id': prod_ids[p], 'quantity': q}
      elif etype == 'ProductPurchased':
        if cart_users and (rand() < 0.9 or not recent_views):
          u = cart_users[int(rand() * len(cart_users))]
          cart = carts[u]
          p = next(iter(cart)) if len(cart) == 1 else list(cart)[int(rand() * len(cart))]
          q, ff = cart[p]
          drop_cart_line(u, p)
        else:  # "buy now" straight from a product page
          u, p, ff = recent_views[int(rand() * len(recent_views))]
          q = 1
        origin = origins[u % 5]['checkout']
        data = {'user_id': uid(u), 'product_id': prod_ids[p], 'quantity': q, 'price': prices[p]}
      elif etype == 'UserLoggedIn':
        u = int(n_users * rand() ** 2)
        last_login[u] = eid
        origin = origins[u % 5]['login']
        data = {'user_id': uid(u), 'name': user_name(u)}
      elif etype == 'PhoneNumberUpdated':
        u = int(n_users * rand() ** 2)
        ff = last_login.get(u)
        origin = origins[u % 5]['account']
        data = {'user_id': uid(u),
                'phone': f'+1-{200 + int(rand() * 800)}-555-{int(rand() * 10000):04d}'}
      elif etype == 'RoleAdded':
        u = int(n_users * rand())
        origin = 'admin-console'
        data = {'user_id': uid(u), 'role': ROLES[int(rand() * len(ROLES))]}
      elif etype == 'ProductCreated':
        etype, origin, data, ff = create_product()
        prod_created.append(eid)
      else:  # ProductImageAdded
        if awaiting_image and rand() < 0.8:
          p = awaiting_image.popleft()
        else:
          p = int(rand() * len(prod_ids))
        images[p] += 1
        ff = prod_created[p]
        origin = 'photographer-app'
        data = {'product_id': prod_ids[p],
                'image_url': f'https://images.sourcebeam.example/products/{prod_ids[p]}/{images[p]}.jpg'}

    key = data[key_field[etype]]
    s = seq.get(key, 0) + 1
    seq[key] = s
    yield t, {'event_id': eid, 'event_type': etype, 'schema_version': versions[etype],
              'partition_key': key, 'sequence': s, 'event_time': iso(t), 'origin': origin,
              'follows_from': ff, 'data': data}


def retail_events(n: int,
                  seed: int = 1,
                  phases: Optional[Sequence[phases_mod.Phase]] = None,
                  start: Union[int, str, None] = None,
                  users: Optional[int] = None,
                  products: Optional[int] = None) -> Iterator[Envelope]:
  """Up to n raw retail envelopes (dicts exactly as written as JSON lines)."""
  for _, env in timed_retail_events(n, seed, phases, start, users, products):
    yield env
