"""Orders: a shop's order stream, and the open orders of each customer.

The README's "Build your own application" walks through this file. Events
(``schemas/``) are keyed by ``order_id``; the app has

* a view, ``orders``: each order's status, customer and total;
* a consumer, ``open_orders``: the open orders of each customer. Orders of one
  customer live in different partitions (one per order), so each order's events
  build, in order, a partial OR-Set of its customer's open orders, and the
  partials merge per customer: a CRDT, so no partition waits for another.
"""

import apache_beam as beam

from sourcebeam import App, MergeCRDTs, ORSet, ProcessInOrder

app = App('orders', schemas='schemas')


class OrderStatus:
  """One order: placed (open), then shipped or cancelled."""

  def initial_state(self, order_id):
    return {'status': None, 'customer_id': None, 'total_cents': 0}

  def apply(self, state, event):
    data = event['data']
    if event['event_type'] == 'OrderPlaced':
      state = {'status': 'open', 'customer_id': data['customer_id'],
               'total_cents': data['total_cents']}
    elif event['event_type'] == 'OrderShipped':
      state = dict(state, status='shipped')
    else:
      state = dict(state, status='cancelled')
    return state, []


app.view('orders', handler=OrderStatus(),
         event_types=['OrderPlaced', 'OrderShipped', 'OrderCancelled'])


class OpenOrderSet:
  """One order's part of its customer's open orders: (customer, OR-Set) after each event."""

  def initial_state(self, order_id):
    return None, ORSet()

  def apply(self, state, event):
    customer, open_orders = state
    order_id = event['data']['order_id']
    if event['event_type'] == 'OrderPlaced':
      customer = event['data']['customer_id']
      open_orders = open_orders.add(order_id, event['event_id'])
    else:
      open_orders = open_orders.remove(order_id)
    return (customer, open_orders), [(customer, open_orders)] if customer else []


class OpenOrders(beam.PTransform):
  """Open orders per customer: ``{"customer_id", "open_orders": [order ids]}``."""

  def expand(self, events):
    per_order = events | 'PerOrder' >> ProcessInOrder(OpenOrderSet())
    return (per_order.outputs
            | 'Partials' >> beam.Values()
            | 'MergePerCustomer' >> beam.CombinePerKey(MergeCRDTs(ORSet))
            | 'AsRecord' >> beam.MapTuple(lambda customer, orders: {
                'customer_id': customer, 'open_orders': sorted(orders.value())}))


app.consumer('open_orders', OpenOrders(),
             event_types=['OrderPlaced', 'OrderShipped', 'OrderCancelled'])
