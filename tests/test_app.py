"""Applications: registration checks, the per-key dispatch, and an app's consumers on Beam.

Plain Python and the DirectRunner only (no service); the orders example's own runs through
the command line are in tests/test_examples.py.
"""

from __future__ import annotations

import ast
import os
import pathlib

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from sourcebeam import ApplyApp, App, ConfigError
from sourcebeam.testing import CreateEvents, published, run_app, view_states
from sourcebeam.transforms.keyspace import Emitted, Failed, KeySpaceHandler, ViewChange
from tests.demo import DEMO_SCHEMAS, ROOT

ORDERS = os.path.join(ROOT, 'examples', 'orders')


def orders_app() -> App:
  return App('orders-test', schemas=os.path.join(ORDERS, 'schemas'))


class Count:
  """A handler counting a key's events; its outputs are the running counts."""

  def initial_state(self, key):
    return 0

  def apply(self, state, event):
    return state + 1, [state + 1]


class Boom:
  """A handler that fails on cancelled orders."""

  def initial_state(self, key):
    return []

  def apply(self, state, event):
    if event['event_type'] == 'OrderCancelled':
      raise RuntimeError('cannot take a cancellation')
    return state + [event['sequence']], []


def placed(order, customer='c-1', seq=1, minute=0):
  return {'event_type': 'OrderPlaced', 'sequence': seq, 'origin': 'test',
          'event_time': f'2026-11-30T10:{minute:02d}:00Z',
          'data': {'order_id': order, 'customer_id': customer, 'total_cents': 100}}


def shipped(order, seq=2, minute=5):
  return {'event_type': 'OrderShipped', 'sequence': seq, 'origin': 'test',
          'event_time': f'2026-11-30T10:{minute:02d}:00Z',
          'data': {'order_id': order, 'carrier': 'dhl'}}


def cancelled(order, seq=2, minute=5):
  return {'event_type': 'OrderCancelled', 'sequence': seq, 'origin': 'test',
          'event_time': f'2026-11-30T10:{minute:02d}:00Z',
          'data': {'order_id': order, 'reason': 'no'}}


# --- registration ----------------------------------------------------------------------------

def test_a_relative_schema_folder_is_the_creating_modules(tmp_path):
  schemas = tmp_path / 'schemas'
  schemas.mkdir()
  for f in os.listdir(os.path.join(ORDERS, 'schemas')):
    (schemas / f).write_text(pathlib.Path(ORDERS, 'schemas', f).read_text())
  module = tmp_path / 'shop.py'
  module.write_text("from sourcebeam import App\napp = App('shop', schemas='schemas')\n")
  namespace = {'__file__': str(module)}
  exec(compile(module.read_text(), str(module), 'exec'), namespace)  # a module elsewhere
  app = namespace['app']
  assert app.registry.schema_dir == str(schemas)
  assert app.registry.event_types == ['OrderCancelled', 'OrderPlaced', 'OrderShipped']


@pytest.mark.parametrize('register, message', [
    (lambda a: a.view('v', handler=Count(), event_types=['Nope']), r"\['Nope'\] are not in app"),
    (lambda a: a.view('v', handler=object(), event_types=['OrderPlaced']), 'has no initial_state'),
    (lambda a: a.projection('p', handler=Count(), event_types=[]), 'event_types is empty'),
    (lambda a: a.view('v', handler=Count(), event_types='OrderPlaced'), 'must be a list'),
    (lambda a: [a.view('v', handler=Count(), event_types=['OrderPlaced']),
                a.projection('v', handler=Count(), event_types=['OrderPlaced'])],
     "two consumers are named 'v'"),
    (lambda a: a.consumer('unprocessed', beam.Map(str)), "Sourcebeam's own outputs"),
    (lambda a: a.consumer('bad name!', beam.Map(str)), 'must be letters'),
    (lambda a: a.consumer('c', 'not a transform'), 'not a Beam PTransform'),
    (lambda a: a.view('v', handler=Count(), event_types=['OrderPlaced'], route='/x'),
     'needs a "{key}" segment'),
])
def test_registration_refuses_what_cannot_work_naming_it(register, message):
  with pytest.raises(ConfigError, match=message):
    register(orders_app())


def test_a_per_key_consumer_reads_one_key_space():
  app = App('mixed', schemas=DEMO_SCHEMAS)
  with pytest.raises(ConfigError, match='different key spaces'):
    app.view('v', handler=Count(), event_types=['CartItemAdded', 'ProductCreated'])


def test_a_missing_or_empty_schema_folder_is_a_config_error(tmp_path):
  with pytest.raises(ConfigError, match='does not exist'):
    App('x', schemas=str(tmp_path / 'missing'))
  with pytest.raises(ConfigError, match='holds no event schemas'):
    App('x', schemas=str(tmp_path))
  with pytest.raises(ConfigError, match='app name'):
    App('no spaces allowed', schemas=str(tmp_path))


# --- the per-key dispatch, plain Python -------------------------------------------------------

def test_each_consumer_gets_its_types_in_order_and_starts_at_its_first_event():
  app = orders_app()
  app.view('all', handler=Count(), event_types=['OrderPlaced', 'OrderShipped', 'OrderCancelled'])
  app.projection('shipments', handler=Count(), event_types=['OrderShipped'])
  handler = KeySpaceHandler(list(enumerate(app.per_key)))
  events = published(app, [placed('o-1'), shipped('o-1')])
  state, out1 = handler.apply(handler.initial_state('o-1'), events[0])
  assert [type(o) for o in out1] == [ViewChange]  # the projection has not started
  assert repr(state[1]) == 'UNSET'
  state, out2 = handler.apply(state, events[1])
  assert out2 == [ViewChange(0, 2, events[1]), Emitted(1, 1)]


def test_a_failing_consumer_is_reported_and_the_others_go_on():
  app = orders_app()
  app.view('good', handler=Count(), event_types=['OrderPlaced', 'OrderCancelled'])
  app.view('bad', handler=Boom(), event_types=['OrderPlaced', 'OrderCancelled'])
  handler = KeySpaceHandler(list(enumerate(app.per_key)))
  events = published(app, [placed('o-1'), cancelled('o-1')])
  state, _ = handler.apply(handler.initial_state('o-1'), events[0])
  state, out = handler.apply(state, events[1])
  assert out[0] == ViewChange(0, 2, events[1])
  assert type(out[1]) is Failed and out[1].consumer == 1
  assert out[1].error == 'RuntimeError: cannot take a cancellation'
  assert state[1] == [1]  # the failing consumer keeps its state from before the event


# --- on Beam ------------------------------------------------------------------------------------

def test_apply_app_views_projections_consumers_and_failures_on_a_test_pipeline():
  app = orders_app()
  app.view('orders', handler=Count(), event_types=['OrderPlaced', 'OrderShipped', 'OrderCancelled'])
  app.projection('placed', handler=Count(), event_types=['OrderPlaced'])
  app.view('fragile', handler=Boom(), event_types=['OrderPlaced', 'OrderCancelled'])
  app.consumer('customers', beam.Filter(lambda e: e['event_type'] == 'OrderPlaced')
               | beam.Map(lambda e: e['data']['customer_id']), event_types=['OrderPlaced'])
  events = [placed('o-1', 'c-1'), shipped('o-1'), placed('o-2', 'c-2', minute=1),
            cancelled('o-2', minute=2), placed('o-1', 'c-1')]  # the last: a re-delivery
  with TestPipeline() as p:
    result = p | CreateEvents(app, events) | ApplyApp(app)
    assert_that(view_states(result, 'orders'), equal_to([('o-1', 2), ('o-2', 2)]), label='view')
    assert_that(result.projections['placed'], equal_to([('o-1', 1), ('o-2', 1)]), label='proj')
    assert_that(result.consumers['customers'], equal_to(['c-1', 'c-2', 'c-1']), label='consumer')
    assert_that(view_states(result, 'fragile'), equal_to([('o-1', [1]), ('o-2', [1])]),
                label='fragile')
    assert_that(result.unprocessed | beam.Map(lambda u: (u['reason'], u['key'],
                                                          u.get('consumer') or u['key_space'])),
                equal_to([('handler_error', 'o-2', 'fragile'), ('duplicate', 'o-1', 'order_id')]),
                label='unprocessed')


def test_a_consumer_that_cannot_run_live_is_a_config_error_naming_it():
  """Built on an endless stream (TestStream), a grouping in the global window is refused while
  the pipeline is built, as a ConfigError naming the consumer; the demo's consumers build."""
  from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
  from apache_beam.testing.test_stream import TestStream
  from tests.demo import DEMO_APP

  def live_events(p):
    return p | TestStream().add_elements([]).advance_watermark_to_infinity()

  app = orders_app()
  app.consumer('totals', beam.Map(lambda e: (e['data']['customer_id'], 1)) | beam.GroupByKey(),
               event_types=['OrderPlaced'])
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  p = beam.Pipeline(options=options)
  with pytest.raises(ConfigError, match=r'consumer totals cannot run on a live \(unbounded\) stream'):
    live_events(p) | ApplyApp(app, kinds=('projection',))
  result = live_events(beam.Pipeline(options=options)) | ApplyApp(DEMO_APP, kinds=('projection',))
  assert 'riders/rider_located' in result.consumers and 'riders/occupancy' not in result.consumers


def load_example(name: str):
  """An example app's module, imported from its folder as its README runs it."""
  import importlib
  import sys
  folder = os.path.join(ROOT, 'examples', name)
  sys.path.insert(0, folder)
  try:
    return importlib.import_module(name)
  finally:
    sys.path.remove(folder)


def test_run_app_gives_the_outputs_as_written():
  app = load_example('orders').app
  outputs = run_app(app, [placed('o-1', 'c-1'), placed('o-2', 'c-1', minute=1), shipped('o-1')])
  assert outputs['orders'] == [
      {'key': 'o-1', 'state': {'customer_id': 'c-1', 'status': 'shipped', 'total_cents': 100}},
      {'key': 'o-2', 'state': {'customer_id': 'c-1', 'status': 'open', 'total_cents': 100}}]
  assert outputs['open_orders'] == [{'customer_id': 'c-1', 'open_orders': ['o-2']}]
  assert outputs['unprocessed'] == []


def test_test_events_that_would_be_refused_fail_loudly():
  bad = dict(placed('o-1'), data={'order_id': 'o-1'})
  with pytest.raises(ValueError, match="missing field 'customer_id'"):
    published(orders_app(), [bad])


# --- the layers --------------------------------------------------------------------------------

def _imports(path):
  tree = ast.parse(pathlib.Path(path).read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      yield node.module
    elif isinstance(node, ast.Import):
      yield from (a.name for a in node.names)


def test_the_library_imports_no_command_and_no_demo():
  for folder in ('transforms', 'schemas'):
    for path in pathlib.Path(ROOT, folder).glob('*.py'):
      for module in _imports(path):
        assert not module.startswith(('sourcebeam.pipelines', 'pipelines', 'sourcebeam.demo',
                                      'sourcebeam.generators', 'sourcebeam.benchmarks')), (
            f'{path.name} imports {module}')
        assert module.split('.')[0] not in ('transforms', 'schemas', 'pipelines', 'generators'), (
            f'{path.name} imports {module} outside the sourcebeam package')


def test_the_library_names_no_demo_event_type():
  from tests.demo import REG
  for folder in ('transforms', 'schemas'):
    for path in pathlib.Path(ROOT, folder).glob('*.py'):
      text = path.read_text()
      named = [t for t in REG.event_types if t in text]
      assert not named, f'{path.name} names the demo\'s event types {named}'


def test_the_demo_and_the_examples_use_only_the_public_api():
  import sourcebeam
  for folder in ('demo', os.path.join('examples', 'orders'), os.path.join('examples', 'payments')):
    for path in pathlib.Path(ROOT, folder).glob('*.py'):
      for module in _imports(path):
        if module.startswith('sourcebeam'):
          assert module in ('sourcebeam', 'sourcebeam.testing'), (
              f'{path} imports {module}: only `from sourcebeam import` (and sourcebeam.testing)')
      tree = ast.parse(path.read_text())
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ('sourcebeam', 'sourcebeam.testing'):
          public = (sourcebeam.__all__ if node.module == 'sourcebeam' else
                    __import__('sourcebeam.testing', fromlist=['__all__']).__all__)
          for alias in node.names:
            assert alias.name in public, f'{path}: {alias.name} is not public'
