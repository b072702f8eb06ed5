"""The view store on SQLite and on a real PostgreSQL server (started by scripts/postgres.sh).

The view rows come from the demo application's real retail views (the same key
space handlers and records a pipeline runs), so the store is tested on what the
streaming pipeline will give it.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.demo import DEMO_APP, REG
from sourcebeam.schemas.envelope import make_envelope
from sourcebeam.transforms.consumers import key_space_handlers
from sourcebeam.transforms.keyspace import ViewChange
from sourcebeam.transforms.view_store import StoreError, ViewStore, WriteViewsToStore, redact, view_row

SPACES = {t: ks for ks in key_space_handlers(DEMO_APP) for t in ks.event_types}
CONSUMERS = dict(enumerate(DEMO_APP.per_key))
VIEWS = [v.name for v in DEMO_APP.views]
CART, CATALOG = 'retail/cart', 'retail/catalog'
RECENT, FREQUENT = 'retail/recently_viewed', 'retail/frequently_viewed'

TOPIC = 'retail'
T0 = 1_790_000_000_000


@pytest.fixture(params=['sqlite', pytest.param('postgres', marks=pytest.mark.integration)])
def dsn(request, tmp_path) -> str:
  if request.param == 'sqlite':
    return str(tmp_path / 'views.db')
  return request.getfixturevalue('pg_dsn')


def changelog(events: List[Tuple[str, Dict[str, Any]]], partition: int = 0,
              first_offset: int = 0) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
  """(row, source) pairs: each event at the next offset, through the app's real views."""
  states: Dict[Tuple[str, str], Any] = {}
  seqs: Dict[str, int] = {}
  out = []
  for i, (event_type, data) in enumerate(events):
    space = SPACES[event_type]
    key = REG.get(event_type).key_of(data)
    seqs[key] = seqs.get(key, 0) + 1
    env = make_envelope(REG, event_type, data, event_id=f'e{first_offset + i}', sequence=seqs[key],
                        event_time=T0 + i, origin='test')
    state = states.get((space.name, key), space.handler.initial_state(key))
    states[(space.name, key)], changes = space.handler.apply(state, env)
    source = {'topic': TOPIC, 'partition': partition, 'offset': first_offset + i}
    for c in changes:
      assert type(c) is ViewChange
      view = CONSUMERS[c.consumer]
      out.append((view_row(view.name, key, view.record(key, c.state, c.event), c.event,
                           view.index), source))
  return out


EVENTS = [
    ('ProductCreated', {'product_id': 'p1', 'brand': 'B', 'name': 'Boot', 'description': 'd',
                        'category': 'shoes'}),
    ('ProductCreated', {'product_id': 'p2', 'brand': 'B', 'name': 'Hat', 'description': 'd',
                        'category': 'hats'}),
    ('ProductCreated', {'product_id': 'p0', 'brand': 'C', 'name': 'Sandal', 'description': 'd',
                        'category': 'shoes'}),
    ('ProductViewed', {'user_id': 'u1', 'product_id': 'p1'}),
    ('ProductViewed', {'user_id': 'u1', 'product_id': 'p2'}),
    ('ProductViewed', {'user_id': 'u1', 'product_id': 'p1'}),
    ('CartItemAdded', {'user_id': 'u1', 'product_id': 'p1', 'quantity': 2}),
    ('CartItemAdded', {'user_id': 'u1', 'product_id': 'p2', 'quantity': 1}),
]


def snapshot(store: ViewStore) -> Dict[str, Any]:
  return {'cart': store.get(CART, 'u1'), 'recent': store.get(RECENT, 'u1'),
          'frequent': store.get(FREQUENT, 'u1'),
          'shoes': store.by_index(CATALOG, 'shoes'), 'positions': store.positions()}


def test_apply_and_query(dsn):
  with ViewStore(dsn, VIEWS) as store:
    counts = store.apply(changelog(EVENTS))
    assert counts == {'applied': 11, 'skipped': 0}  # 3 catalog + 3x2 viewed + 2 cart
    cart = store.get(CART, 'u1')
    assert cart['items'] == [{'product_id': 'p1', 'quantity': 2}, {'product_id': 'p2', 'quantity': 1}]
    assert cart['as_of_sequence'] == 5
    assert store.get(RECENT, 'u1')['products'] == ['p1', 'p2']
    assert store.get(FREQUENT, 'u1')['products'] == [
        {'product_id': 'p1', 'views': 2}, {'product_id': 'p2', 'views': 1}]
    assert [p['product_id'] for p in store.by_index(CATALOG, 'shoes')] == ['p0', 'p1']
    assert store.by_index(CATALOG, 'socks') == []
    assert store.get(CART, 'nobody') is None
    assert store.positions() == [
        {'view': CART, 'topic': TOPIC, 'partition': 0, 'offset': 7},
        {'view': CATALOG, 'topic': TOPIC, 'partition': 0, 'offset': 2},
        {'view': FREQUENT, 'topic': TOPIC, 'partition': 0, 'offset': 5},
        {'view': RECENT, 'topic': TOPIC, 'partition': 0, 'offset': 5}]
    assert store.position(CART, TOPIC, 0) == 7
    assert store.position(CART, TOPIC, 1) is None


def test_redelivered_events_change_views_once(dsn):
  records = changelog(EVENTS)
  with ViewStore(dsn, VIEWS) as store:
    store.apply(records[:6])
    store.apply(records)  # a restart re-delivers the first six
    before = snapshot(store)
    assert store.apply(records) == {'applied': 0, 'skipped': len(records)}
    assert store.apply(list(reversed(records))) == {'applied': 0, 'skipped': len(records)}
    assert snapshot(store) == before
  # A second connection (a restarted pipeline) sees the same and skips the same.
  with ViewStore(dsn, VIEWS) as store:
    assert store.apply(records[3:]) == {'applied': 0, 'skipped': len(records) - 3}
    assert snapshot(store) == before


def test_older_record_never_rolls_a_view_back(dsn):
  records = [r for r in changelog(EVENTS) if r[0]['view'] == CART]
  with ViewStore(dsn, VIEWS) as store:
    store.apply(records[1:])  # the newer cart first
    assert store.apply(records[:1]) == {'applied': 0, 'skipped': 1}
    assert len(store.get(CART, 'u1')['items']) == 2
    # Within one batch the newest offset of a key wins whatever the batch order.
  with ViewStore(dsn, VIEWS) as store:
    store.apply(list(reversed(changelog(EVENTS, partition=3))))
    assert store.position(CART, TOPIC, 3) == 7


def test_a_failing_batch_changes_neither_views_nor_positions(dsn):
  records = changelog(EVENTS)
  with ViewStore(dsn, VIEWS) as store:
    store.apply(records[:3])
    before = snapshot(store)
    later = changelog(EVENTS, first_offset=100)
    bad = ({'view': 'wishlist', 'key': 'u1', 'as_of_sequence': 1, 'event_time': T0},
           {'topic': TOPIC, 'partition': 0, 'offset': 999})  # sorts last: after real writes
    with pytest.raises(StoreError, match='has no value'):
      store.apply(later + [bad])
    assert snapshot(store) == before
    with pytest.raises(StoreError, match='offset'):
      store.apply(later + [(later[0][0], {'topic': TOPIC, 'partition': 0, 'offset': -1})])
    assert snapshot(store) == before
    # The store is still usable after a rollback.
    assert store.apply(later)['applied'] == len(later)
    assert store.position(CART, TOPIC, 0) == 107


def test_positions_per_partition_and_topic(dsn):
  with ViewStore(dsn, VIEWS) as store:
    store.apply(changelog(EVENTS[:3], partition=0) + changelog(EVENTS[3:], partition=1,
                                                               first_offset=40))
    assert {(p['view'], p['partition']): p['offset'] for p in store.positions()} == {
        (CATALOG, 0): 2, (CART, 1): 44, (RECENT, 1): 42, (FREQUENT, 1): 42}
    assert [p['view'] for p in store.positions(CART)] == [CART]


def test_sink_in_a_beam_pipeline(dsn):
  records = changelog(EVENTS)
  # Each element twice, as a runner retrying bundles would deliver them.
  with TestPipeline() as p:
    _ = (p | beam.Create(records + records) | WriteViewsToStore(dsn, VIEWS, batch_size=4))
  with ViewStore(dsn, VIEWS) as store:
    assert store.get(CART, 'u1')['items'] == [{'product_id': 'p1', 'quantity': 2},
                                         {'product_id': 'p2', 'quantity': 1}]
    assert store.position(CART, TOPIC, 0) == 7
    assert [p['product_id'] for p in store.by_index(CATALOG, 'shoes')] == ['p0', 'p1']
    assert store.get(FREQUENT, 'u1')['products'][0] == {'product_id': 'p1', 'views': 2}


def test_redact_hides_the_password():
  assert redact('postgresql://sb:s3cret@127.0.0.1:5433/db') == 'postgresql://sb:***@127.0.0.1:5433/db'
  assert redact('/tmp/views.db') == '/tmp/views.db'


def test_sqlite_dsn_forms(tmp_path):
  path = str(tmp_path / 'v.db')
  with ViewStore('sqlite:///' + path) as store:
    store.apply(changelog(EVENTS[:1]))
  assert os.path.exists(path)
  with ViewStore(path) as store:
    assert store.position(CATALOG, TOPIC, 0) == 0


# --- per-event mode: (source, [records]) per Kafka message, contiguous watermarks ----------------

def outcomes(events, partition: int = 0, first_offset: int = 0):
  """(source, [records]) per event, from the same real handlers as ``changelog``."""
  pairs = changelog(events, partition, first_offset)
  out = []
  for i in range(len(events)):
    source = {'topic': TOPIC, 'partition': partition, 'offset': first_offset + i}
    out.append((source, [r for r, s in pairs if s == source]))
  return out


def test_per_event_positions_are_contiguous_watermarks(dsn):
  done = outcomes(EVENTS)  # offsets 0..7; offsets 0..2 change only the catalog
  with ViewStore(dsn, VIEWS) as store:
    # A parallel pipeline finished offsets 0, 1, 6 and 7 first: the watermark stops at 1.
    store.apply_events([done[i] for i in (0, 1, 6, 7)])
    assert {p['view']: p['offset'] for p in store.positions()} == {v: 1 for v in VIEWS}
    assert store.get(CART, 'u1')['as_of_sequence'] == 5  # the records themselves are in
    # The rest arrives (one event twice): every view is at 7, even those 2..5 did not touch.
    counts = store.apply_events([done[i] for i in (5, 2, 3, 4, 4)])
    assert counts['events'] == 5
    assert {p['view']: p['offset'] for p in store.positions()} == {v: 7 for v in VIEWS}
    before = snapshot(store)
    assert store.apply_events(done)['applied'] == 0  # a replay changes nothing
    assert snapshot(store) == before
    # An event that changed no view still moves the watermark: (source, []).
    store.apply_events([({'topic': TOPIC, 'partition': 0, 'offset': 8}, [])])
    assert store.position(CART, TOPIC, 0) == 8
    # A bad record rolls back the batch, watermark included.
    bad = ({'topic': TOPIC, 'partition': 0, 'offset': 9}, [{'view': CART, 'key': ''}])
    with pytest.raises(StoreError):
      store.apply_events([({'topic': TOPIC, 'partition': 0, 'offset': 10}, []), bad])
    assert store.position(CART, TOPIC, 0) == 8
    # A partition read from a later start offset.
    store.apply_events([({'topic': TOPIC, 'partition': 5, 'offset': 1000}, [])],
                       start_offsets={(TOPIC, 5): 1000})
    assert store.position(CATALOG, TOPIC, 5) == 1000


def test_view_changes_and_sink_in_a_beam_pipeline(dsn):
  """Kafka messages (envelope or None, source) -> ViewChanges -> WriteViewsToStore."""
  user = {}
  messages = []
  for i, (event_type, data) in enumerate(EVENTS):
    key = data.get('user_id') or data['product_id']
    user[key] = user.get(key, 0) + 1
    env = make_envelope(REG, event_type, data, event_id=f'e{i}', sequence=user[key],
                        event_time=T0 + i, origin='test')
    messages.append((env, {'topic': TOPIC, 'partition': 0, 'offset': i}))
  n = len(messages)
  ride = make_envelope(REG, 'RideStarted', _ride_data(), event_id='r1', sequence=1,
                       event_time=T0, origin='test')
  messages += [
      (None, {'topic': TOPIC, 'partition': 0, 'offset': n}),          # dead-lettered at publish
      (ride, {'topic': TOPIC, 'partition': 0, 'offset': n + 1}),      # not a retail view's business
      (messages[6][0], {'topic': TOPIC, 'partition': 0, 'offset': n + 2}),  # a duplicate write
  ]
  with TestPipeline() as p:
    from sourcebeam.transforms.view_store import ViewChanges
    _ = p | beam.Create(messages) | ViewChanges(DEMO_APP) | WriteViewsToStore(dsn, VIEWS, batch_size=3)
  with ViewStore(dsn, VIEWS) as store:
    assert store.get(CART, 'u1')['items'] == [{'product_id': 'p1', 'quantity': 2},
                                         {'product_id': 'p2', 'quantity': 1}]
    assert {p['view']: p['offset'] for p in store.positions()} == {
        v: n + 2 for v in VIEWS}
    assert [p['product_id'] for p in store.by_index(CATALOG, 'shoes')] == ['p0', 'p1']


def _ride_data():
  et = REG.get('RideStarted')
  sample = {'string': 'x', 'int': 1, 'long': T0, 'double': 1.0, 'float': 1.0, 'boolean': True}
  return {f.name: sample[f.type] for f in et.fields}


def test_concurrent_sinks_on_one_partition_leave_no_hole(dsn):
  """Two sink workers finishing one partition's events in parallel: the watermark reaches
  the end (each transaction locks the partition's progress row)."""
  import threading
  n = 60
  done = [({'topic': TOPIC, 'partition': 0, 'offset': i}, []) for i in range(n)]
  errors = []

  def worker(offsets):
    try:
      with ViewStore(dsn, VIEWS) as store:
        for i in offsets:
          store.apply_events([done[i]])
    except Exception as e:  # surfaced below
      errors.append(e)

  threads = [threading.Thread(target=worker, args=(range(k, n, 2),)) for k in (1, 0)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  with ViewStore(dsn, VIEWS) as store:
    assert store.position(CART, TOPIC, 0) == n - 1


def test_kafka_message_shapes_and_dead_letters():
  from sourcebeam.schemas.envelope import to_json
  from sourcebeam.transforms.view_store import kafka_message
  env = make_envelope(REG, 'CartItemAdded', {'user_id': 'u1', 'product_id': 'p1', 'quantity': 1},
                      event_id='e1', sequence=1, event_time=T0, origin='test')
  row = beam.Row(topic=TOPIC, partition=2, offset=41, key=b'u1', value=to_json(env).encode())
  assert kafka_message(row, REG) == (env, {'topic': TOPIC, 'partition': 2, 'offset': 41})
  bad = {'topic': TOPIC, 'partition': 2, 'offset': 42, 'value': b'{"not": "an envelope"}'}
  assert kafka_message(bad, REG) == (None, {'topic': TOPIC, 'partition': 2, 'offset': 42})
  assert kafka_message(dict(bad, value=None), REG)[0] is None  # a tombstone


def test_stage_times_are_recorded_in_order_with_the_rows(dsn):
  """``stage_times=True``: every message's stage times reach the store's ``stage_times`` table in
  the transaction of its rows, each stage at or after the one before it; without the flag the
  sources carry no times and no table is made."""
  import time
  from sourcebeam.transforms.view_store import STAGES, ViewChanges
  messages = []
  seqs: Dict[str, int] = {}
  for i, (event_type, data) in enumerate(EVENTS):
    key = data.get('user_id') or data['product_id']
    seqs[key] = seqs.get(key, 0) + 1
    env = make_envelope(REG, event_type, data, event_id=f'e{i}', sequence=seqs[key],
                        event_time=T0 + i, origin='test')
    messages.append((env, {'topic': TOPIC, 'partition': 0, 'offset': i}))
  n = len(messages)
  messages.append((None, {'topic': TOPIC, 'partition': 0, 'offset': n}))  # read by no view
  before = time.time()
  with TestPipeline() as p:
    _ = (p | beam.Create(messages) | ViewChanges(DEMO_APP, stage_times=True)
         | WriteViewsToStore(dsn, VIEWS, batch_size=3, stage_times=True))
  after = time.time()
  with ViewStore(dsn, VIEWS) as store:
    times = store.read_stage_times([(TOPIC, 0, i) for i in range(n + 1)] + [(TOPIC, 0, n + 5)])
    assert store.get(CART, 'u1') is not None
  assert sorted(times) == [(TOPIC, 0, i) for i in range(n + 1)]  # the missing offset: absent
  for source, marks in times.items():
    handled = marks['handled'] is not None
    assert handled == (source[2] < n), source  # the dead letter reached no handler
    stages = [marks[s] for s in STAGES if marks[s] is not None]
    assert len(stages) == len(STAGES) - (0 if handled else 1)
    assert before <= stages[0] and stages[-1] <= after
    assert stages == sorted(stages), marks  # bundle <= seen <= handled <= sink <= begun <= committing


def test_without_stage_times_nothing_is_timed(tmp_path):
  from sourcebeam.transforms.view_store import ViewChanges
  env = make_envelope(REG, 'CartItemAdded', {'user_id': 'u1', 'product_id': 'p1', 'quantity': 1},
                      event_id='e1', sequence=1, event_time=T0, origin='test')
  db = str(tmp_path / 'views.db')
  with TestPipeline() as p:
    outcomes = (p | beam.Create([(env, {'topic': TOPIC, 'partition': 0, 'offset': 0})])
                | ViewChanges(DEMO_APP))
    _ = outcomes | WriteViewsToStore(db, VIEWS)
    assert_that(outcomes | beam.Map(lambda o: sorted(o[0])),
                equal_to([['offset', 'partition', 'topic']]))
  import sqlite3
  con = sqlite3.connect(db)
  try:
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
  finally:
    con.close()
  assert 'stage_times' not in tables and 'view_rows' in tables


@pytest.mark.integration
def test_postgres_sends_notify_with_each_transaction_that_moves_a_position(pg_dsn):
  """A LISTEN connection gets one notification per transaction that moved a position (per-event
  and records mode), delivered at commit, and none for one that moved nothing."""
  import time
  from sourcebeam.transforms.view_store import POSITIONS_CHANNEL, _connect_postgres
  with ViewStore(pg_dsn, VIEWS) as store:
    listener = _connect_postgres(pg_dsn)
    listener.autocommit = True
    cur = listener.cursor()
    cur.execute(f'LISTEN {POSITIONS_CHANNEL}')

    def notified(n: int) -> List[str]:
      """The channels of the notifications received, once there are ``n`` (or 20 s passed).
      One session's notifications arrive in commit order: once a later commit's is here, an
      earlier one's would be too."""
      deadline = time.monotonic() + 20
      while len(listener.notifications) < n and time.monotonic() < deadline:
        cur.execute('SELECT 1')  # reads what the server sent meanwhile
        time.sleep(0.01)
      got = [channel for _, channel, _ in listener.notifications]
      listener.notifications.clear()
      return got

    try:
      store.apply_events([({'topic': TOPIC, 'partition': 0, 'offset': 0}, []),
                          ({'topic': TOPIC, 'partition': 0, 'offset': 1}, [])])
      assert notified(1) == [POSITIONS_CHANNEL]  # one per transaction, not per position
      store.apply_events([({'topic': TOPIC, 'partition': 0, 'offset': 3}, [])])  # past a gap: no move
      store.apply(changelog(EVENTS[:1], partition=1))  # records mode moves partition 1
      assert notified(1) == [POSITIONS_CHANNEL]  # the records' only
    finally:
      listener.close()


def test_a_batch_is_applied_once_its_first_element_waited_max_delay(tmp_path):
  """The sink applies a batch at the bundle's end, at batch_size, or once its first element has
  waited max_delay while the bundle goes on: with a delay of 0 each element is in the view as
  soon as it arrives; without one, only at the bundle's end."""
  from sourcebeam.transforms.view_store import _WriteViewsFn
  outcomes = [({'topic': TOPIC, 'partition': 0, 'offset': i}, []) for i in range(3)]
  for max_delay_s, seen_mid_bundle in ((0.0, [0, 1, 2]), (None, [None, None, None])):
    db = str(tmp_path / f'views-{max_delay_s}.db')
    fn = _WriteViewsFn(db, VIEWS, batch_size=500, max_delay_s=max_delay_s)
    fn.setup()
    fn.start_bundle()
    seen = []
    with ViewStore(db, VIEWS) as reader:
      for o in outcomes:
        fn.process(o)
        seen.append(reader.position(CART, TOPIC, 0))
      fn.finish_bundle()
      assert reader.position(CART, TOPIC, 0) == 2
    fn.teardown()
    assert seen == seen_mid_bundle, max_delay_s
