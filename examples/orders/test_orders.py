"""The orders app's consumers on Beam's TestPipeline, as its team tests them."""

from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from sourcebeam import ApplyApp
from sourcebeam.testing import CreateEvents, run_app, view_states

from orders import app


def placed(order, customer, minute):
  return {'event_type': 'OrderPlaced', 'sequence': 1, 'origin': 'test',
          'event_time': f'2026-11-30T10:{minute:02d}:00Z',
          'data': {'order_id': order, 'customer_id': customer, 'total_cents': 1000}}


def shipped(order, minute):
  return {'event_type': 'OrderShipped', 'sequence': 2, 'origin': 'test',
          'event_time': f'2026-11-30T10:{minute:02d}:00Z',
          'data': {'order_id': order, 'carrier': 'dhl'}}


def test_a_shipped_order_is_no_longer_open():
  with TestPipeline() as p:
    result = (p
              | CreateEvents(app, [placed('o-1', 'c-1', 0), placed('o-2', 'c-1', 1),
                                   shipped('o-1', 5)])
              | ApplyApp(app))
    assert_that(view_states(result, 'orders'), equal_to([
        ('o-1', {'status': 'shipped', 'customer_id': 'c-1', 'total_cents': 1000}),
        ('o-2', {'status': 'open', 'customer_id': 'c-1', 'total_cents': 1000})]), label='orders')
    assert_that(result.consumers['open_orders'], equal_to([
        {'customer_id': 'c-1', 'open_orders': ['o-2']}]), label='open')


def test_events_out_of_order_give_the_same_views():
  # Shipped arrives before placed: each order's events are applied in sequence order.
  outputs = run_app(app, [shipped('o-1', 5), placed('o-1', 'c-1', 0)])
  assert outputs['orders'] == [
      {'key': 'o-1', 'state': {'status': 'shipped', 'customer_id': 'c-1', 'total_cents': 1000}}]
  assert outputs['open_orders'] == [{'customer_id': 'c-1', 'open_orders': []}]
