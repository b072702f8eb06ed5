"""Payments: orders joined with their payments, across partition keys.

Orders are keyed by ``order_id``, payments by ``payment_id`` (the payment
provider's own number); a payment names the order it pays. The consumer
``paid_orders`` joins the two streams on ``order_id`` with Sourcebeam's
``JoinPairs`` (state per order, an event-time timeout for the side whose partner
never comes), so it crosses partition keys; ``payments`` is a plain per-key view
of each payment.
"""

import apache_beam as beam

from sourcebeam import App, JoinPairs

app = App('payments', schemas='schemas')

DAY_MS = 24 * 3_600_000


class LastPayment:
  """One payment's amount and order (a payment is one event, but a provider may resend it)."""

  def initial_state(self, payment_id):
    return None

  def apply(self, state, event):
    return {'order_id': event['data']['order_id'],
            'amount_cents': event['data']['amount_cents']}, []


app.view('payments', handler=LastPayment(), event_types=['PaymentReceived'])


def _paid(pair):
  order, payment = pair['order']['data'], pair['payment']['data']
  return {'order_id': order['order_id'], 'customer_id': order['customer_id'],
          'total_cents': order['total_cents'], 'payment_id': payment['payment_id'],
          'paid_cents': payment['amount_cents'],
          'settled': payment['amount_cents'] == order['total_cents']}


class PaidOrders(beam.PTransform):
  """Orders with their payment (``paid``), and orders or payments left alone for a day
  (``unmatched``, with the reason)."""

  def expand(self, events):
    orders = events | 'Orders' >> beam.Filter(lambda e: e['event_type'] == 'OrderPlaced')
    payments = events | 'Payments' >> beam.Filter(lambda e: e['event_type'] == 'PaymentReceived')
    joined = (orders, payments) | 'ByOrder' >> JoinPairs(
        'order', 'payment', left_key=lambda e: e['data']['order_id'],
        right_key=lambda e: e['data']['order_id'], left_time=lambda e: e['event_time'],
        right_time=lambda e: e['event_time'], expire_after_ms=DAY_MS, key_name='order_id')
    return {'paid': joined.joined | 'Paid' >> beam.Map(_paid),
            'unmatched': joined.unmatched | 'Unmatched' >> beam.Map(lambda u: {
                'side': u['side'], 'reason': u['reason'], 'event_id': u['record']['event_id'],
                'order_id': u['record']['data']['order_id']})}


app.consumer('paid_orders', PaidOrders(), event_types=['OrderPlaced', 'PaymentReceived'],
             live={'paid': lambda paid: paid['order_id']})
