"""ProcessInOrder on real Beam runners: the batch expansion and the streaming
expansion (ReadModifyWrite fallback and OrderedListState) on the FnApiRunner,
TestStream scenarios on the bundle-based direct runner (gap timeouts in event
and processing time, status on a timer and on demand, lateness downstream), and
a property test that both expansions agree."""

import collections
import json
import random
import time
from typing import Any, Dict, List

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Duration
from hypothesis import given, settings, strategies as st

from sourcebeam.pipelines.options import pipeline_options
from sourcebeam.transforms.ordering import ProcessInOrder, StatusRequest
from sourcebeam.transforms.ordering_core import Orderer, OrderingConfig, batch_order, process_key


class Positions:
  """Handler: outputs (sequence, how many events the key applied so far), so an
  output proves its event was applied in order; no output for silent events;
  raises for boom events."""

  def initial_state(self, key):
    return 0

  def apply(self, count, event):
    if event.get('boom'):
      raise RuntimeError(f'boom at {event["sequence"]}')
    count += 1
    return count, ([] if event.get('silent') else [(event['sequence'], count)])


def ev(key, seq, **extra) -> Dict[str, Any]:
  return {'partition_key': key, 'sequence': seq, **extra}


MODES = [dict(expansion='batch'),
         dict(expansion='streaming', state='value'),
         dict(expansion='streaming', state='ordered_list')]
MODE_IDS = ['batch', 'streaming-value', 'streaming-ordered_list']


def canon(x) -> str:
  return json.dumps(x, sort_keys=True, default=repr)


def same_multiset(expected: List[Any]):
  want = sorted(canon(x) for x in expected)

  def check(actual):
    got = sorted(canon(x) for x in actual)
    if got != want:
      raise BeamAssertException(f'expected {want}\n got {got}')
  return check


def mixed_input():
  """Many keys interleaved: in order, shuffled, gapped, duplicated, bad."""
  events = []
  events += [ev('inorder', s) for s in range(1, 6)]
  events += [ev('shuffled', s) for s in (3, 1, 5, 2, 4)]
  events += [ev('gapped', s) for s in (1, 2, 4, 5)]
  events += [ev('dups', s) for s in (1, 1, 3, 3, 2)]
  events += [ev('boom', 1), ev('boom', 2, boom=True), ev('boom', 3)]
  events += [ev('silent', 1, silent=True), ev('silent', 2)]
  events += [ev('bad', 0), ev('bad', 'x'), ev('bad', 1)]
  events += [{'sequence': 1, 'no': 'key'}]
  rnd = random.Random(7)
  rnd.shuffle(events)
  return events


def expected_outputs():
  return ([('inorder', (s, s)) for s in range(1, 6)] +
          [('shuffled', (s, s)) for s in range(1, 6)] +
          [('gapped', (1, 1)), ('gapped', (2, 2))] +
          [('dups', (s, s)) for s in (1, 2, 3)] +
          [('boom', (1, 1))] +
          [('silent', (2, 2))] +
          [('bad', (1, 1))])


@pytest.mark.parametrize('mode', MODES, ids=MODE_IDS)
def test_mixed_keys_every_mode(mode):
  with beam.Pipeline(options=pipeline_options([])) as p:
    result = p | beam.Create(mixed_input()) | ProcessInOrder(Positions(), **mode)
    assert_that(result.outputs, equal_to(expected_outputs()), label='outputs')
    reasons = result.unprocessed | beam.Map(lambda r: (r['key'], r['sequence'], r['reason']))
    assert_that(reasons, equal_to([
        ('dups', 1, 'duplicate'), ('dups', 3, 'duplicate'), ('boom', 2, 'handler_error'),
        ('bad', 0, 'before_initial'), ('bad', 'x', 'invalid_sequence'),
        (None, None, 'invalid_key')]), label='unprocessed')
    final = (result.status
             | beam.Map(lambda s: (s['key'], s['trigger'], s['last_processed'], s['buffered'],
                                   s['received'], s['duplicates'], s['blocked_at'])))
    assert_that(final, equal_to([
        ('inorder', 'final', 5, 0, 5, 0, None), ('shuffled', 'final', 5, 0, 5, 0, None),
        ('gapped', 'final', 2, 2, 4, 0, None), ('dups', 'final', 3, 0, 5, 2, None),
        ('boom', 'final', 2, 1, 3, 0, 2), ('silent', 'final', 2, 0, 2, 0, None),
        ('bad', 'final', 1, 0, 3, 0, None)]), label='status')


@pytest.mark.parametrize('mode', MODES[1:], ids=MODE_IDS[1:])
def test_backlog_of_thousands_drains_in_order_with_a_cap(mode):
  n = 3000
  events = [ev('big', s) for s in range(2, n + 1)] + [ev('big', 1), ev('small', 1)]
  with beam.Pipeline(options=pipeline_options([])) as p:
    result = (p | beam.Create(events)
              | ProcessInOrder(Positions(), max_events_per_activation=250, **mode))
    in_order = result.outputs | beam.Map(lambda kv: kv[1][0] == kv[1][1])
    assert_that(in_order | beam.combiners.Count.PerElement(), equal_to([(True, n + 1)]),
                label='all_in_order')
    assert_that(result.unprocessed, equal_to([]), label='nothing_unprocessed')


def test_long_max_value_sits_in_ordered_list_state():
  big = (1 << 63) - 1
  events = [ev('k', 1), ev('k', big), ev('k', big + 1), ev('k', -4)]
  with beam.Pipeline(options=pipeline_options([])) as p:
    result = (p | beam.Create(events)
              | ProcessInOrder(Positions(), expansion='streaming', state='ordered_list',
                               gap_timeout=1, gap_policy='skip'))
    assert_that(result.outputs, equal_to([('k', (1, 1)), ('k', (big, 2))]), label='outputs')
    assert_that(result.unprocessed | beam.Map(lambda r: (r['sequence'], r['reason'])),
                equal_to([(big + 1, 'invalid_sequence'), (-4, 'before_initial'),
                          (2, 'gap_timeout')]), label='unprocessed')


def test_custom_key_and_sequence_functions_and_plain_dicts():
  rows = [{'user': 'u1', 'n': 2}, {'user': 'u1', 'n': 1}, {'user': 'u2', 'n': 1}]

  class Collect:
    def initial_state(self, key):
      return []

    def apply(self, seen, row):
      return seen + [row['n']], [tuple(seen + [row['n']])]

  with beam.Pipeline(options=pipeline_options([])) as p:
    result = (p | beam.Create(rows)
              | ProcessInOrder(Collect(), key_fn=lambda r: r['user'], sequence_fn=lambda r: r['n']))
    assert_that(result.outputs, equal_to([('u1', (1,)), ('u1', (1, 2)), ('u2', (1,))]))


def test_handler_without_protocol_is_rejected_at_construction():
  with pytest.raises(TypeError, match='initial_state'):
    ProcessInOrder(object())
  with pytest.raises(ValueError, match='gap_policy'):
    ProcessInOrder(Positions(), gap_policy='later')


# -- both expansions agree ---------------------------------------------------------------

def _tag(name):
  return beam.Map(lambda x, name=name: (name, x))


def _agree(tagged):
  by = {}
  for name, x in tagged:
    by.setdefault(name, []).append(canon(x))
  if sorted(by.get('batch', [])) != sorted(by.get('streaming', [])):
    raise BeamAssertException(f'expansions differ: {by}')


def assert_expansions_agree(events, streaming_state='value', **options):
  """Run the batch and the streaming expansion on one input in one pipeline."""
  with beam.Pipeline(options=pipeline_options([])) as p:
    source = p | beam.Create(events)
    batch = source | 'Batch' >> ProcessInOrder(Positions(), expansion='batch', **options)
    stream = source | 'Streaming' >> ProcessInOrder(
        Positions(), expansion='streaming', state=streaming_state, **options)
    for part in ('outputs', 'unprocessed', 'status'):
      both = ((getattr(batch, part) | f'TagB{part}' >> _tag('batch'),
               getattr(stream, part) | f'TagS{part}' >> _tag('streaming'))
              | f'Flatten{part}' >> beam.Flatten())
      assert_that(both, _agree, label=f'agree_{part}')
    # And both equal the plain-Python reference.
    orderer = Orderer(Positions(), OrderingConfig(
        gap_timeout_event_time=None if options.get('gap_timeout') is None else 1,
        gap_policy=options.get('gap_policy', 'hold')))
    want = []
    by_key: Dict[str, list] = {}
    for e in events:
      by_key.setdefault(e['partition_key'], []).append((e['sequence'], e))
    for key, pairs in by_key.items():
      _, _, act = process_key(orderer, key, batch_order(pairs, 1))
      want += act.outputs
    assert_that(batch.outputs, same_multiset(want), label='reference')


def test_expansions_agree_on_the_mixed_input_with_skip():
  events = [e for e in mixed_input() if 'partition_key' in e]
  assert_expansions_agree(events, gap_timeout=60, gap_policy='skip')


def test_expansions_agree_with_ordered_list_state_and_hold():
  events = [e for e in mixed_input() if 'partition_key' in e]
  assert_expansions_agree(events, streaming_state='ordered_list', gap_timeout=60)


@st.composite
def shuffled_keys(draw):
  events = []
  for k in range(draw(st.integers(1, 4))):
    n = draw(st.integers(1, 15))
    seqs = [s for s in range(1, n + 1) if draw(st.integers(0, 4))]  # some gaps
    seqs += draw(st.lists(st.sampled_from(seqs), max_size=3)) if seqs else []  # some copies
    events += [ev(f'k{k}', s) for s in seqs]
  draw(st.randoms()).shuffle(events)
  return events


@settings(max_examples=4, deadline=None)
@given(shuffled_keys(), st.sampled_from(['hold', 'skip']))
def test_property_expansions_agree(events, policy):
  assert_expansions_agree(events, gap_timeout=30, gap_policy=policy)


# -- streaming with TestStream (bundle-based direct runner) ---------------------------------

def streaming_options():
  return PipelineOptions(['--streaming'])


def at(event, seconds):
  return window.TimestampedValue(event, seconds)


def with_timestamp(label):
  return label >> beam.Map(lambda x, t=beam.DoFn.TimestampParam: (x, t.micros // 1_000_000))


def test_event_time_gap_timeout_skips_then_reports_the_late_event():
  stream = (TestStream()
            .advance_watermark_to(0)
            .add_elements([at(ev('a', 1), 0), at(ev('a', 3), 2), at(ev('a', 4), 3),
                           at(ev('b', 2), 4), at(ev('b', 1), 5)])
            .advance_watermark_to(6)      # a's gap started at 2; deadline 7 not reached
            .advance_watermark_to(30)     # now it is
            .add_elements([at(ev('a', 2), 31), at(ev('a', 5), 32)])
            .advance_watermark_to_infinity())
  with beam.Pipeline(options=streaming_options()) as p:
    result = p | stream | ProcessInOrder(Positions(), gap_timeout=5, gap_policy='skip')
    assert_that(result.outputs | with_timestamp('ts'), equal_to([
        (('a', (1, 1)), 0),
        (('b', (1, 1)), 5), (('b', (2, 2)), 5),     # key b never waits for key a
        (('a', (3, 2)), 7), (('a', (4, 3)), 7),     # released by the timer at 2 + 5
        (('a', (5, 4)), 32)]), label='outputs')
    assert_that(result.unprocessed | beam.Map(lambda r: (r['key'], r['sequence'], r['reason'],
                                                        r['event'] is None)),
                equal_to([('a', 2, 'gap_timeout', True), ('a', 2, 'gap_timeout', False)]),
                label='unprocessed')


def test_hold_policy_reports_in_status_then_resumes():
  stream = (TestStream()
            .advance_watermark_to(0)
            .add_elements([at(ev('a', 1), 0), at(ev('a', 3), 1)])
            .advance_watermark_to(20)
            .add_elements([at(ev('a', 2), 21)])
            .advance_watermark_to_infinity())
  with beam.Pipeline(options=streaming_options()) as p:
    result = p | stream | ProcessInOrder(Positions(), gap_timeout=10, final_status=False)
    assert_that(result.outputs | with_timestamp('ts'), equal_to([
        (('a', (1, 1)), 0), (('a', (2, 2)), 21), (('a', (3, 3)), 21)]), label='outputs')
    assert_that(result.status | beam.Map(lambda s: (s['trigger'], s['gap_timed_out'],
                                                    s['next_expected'], s['buffered'])),
                equal_to([('gap_timeout', True, 2, 1)]), label='status')
    assert_that(result.unprocessed, equal_to([]), label='unprocessed')


def test_processing_time_gap_timeout():
  # The DoFn reads the wall clock; bring TestStream's clock (which starts at 0) to it.
  stream = (TestStream()
            .advance_processing_time(int(time.time()))
            .advance_watermark_to(0)
            .add_elements([at(ev('a', 1), 0), at(ev('a', 3), 0), at(ev('b', 1), 0), at(ev('b', 3), 0)])
            .advance_processing_time(30)           # half the timeout: nothing happens
            .add_elements([at(ev('a', 2), 1)])     # a's gap fills in time
            .advance_processing_time(120)          # past the timeout: b skips 2
            .add_elements([at(ev('b', 2), 2)])     # too late for b
            .advance_watermark_to_infinity())
  with beam.Pipeline(options=streaming_options()) as p:
    result = p | stream | ProcessInOrder(Positions(), gap_timeout_processing=60, gap_policy='skip')
    assert_that(result.outputs, equal_to([
        ('a', (1, 1)), ('a', (2, 2)), ('a', (3, 3)), ('b', (1, 1)), ('b', (3, 2))]),
        label='outputs')
    assert_that(result.unprocessed | beam.Map(lambda r: (r['key'], r['sequence'], r['reason'],
                                                        r['event'] is None)),
                equal_to([('b', 2, 'gap_timeout', True), ('b', 2, 'gap_timeout', False)]),
                label='unprocessed')


def test_status_on_an_event_time_timer_and_on_demand():
  stream = (TestStream()
            .advance_watermark_to(0)
            .add_elements([at(ev('a', 1), 0), at(ev('a', 3), 1)])
            .advance_watermark_to(12)
            .add_elements([at(ev('a', 2), 13), at(StatusRequest('a'), 14)])
            .advance_watermark_to(25)
            .advance_watermark_to_infinity())
  with beam.Pipeline(options=streaming_options()) as p:
    result = p | stream | ProcessInOrder(Positions(), status_interval=10, final_status=False)
    assert_that(result.status | beam.Map(lambda s: (s['trigger'], s['last_processed'],
                                                    s['buffered'], s['received'])),
                equal_to([('interval', 1, 1, 2),      # watermark passed 0 + 10
                          ('request', 3, 0, 3),       # asked for at 14
                          ('interval', 3, 0, 3)]),    # watermark passed 20
                label='status')


def _released_by_timer_then_windowed(allowed_lateness):
  stream = (TestStream()
            .advance_watermark_to(0)
            .add_elements([at(ev('a', 1), 0), at(ev('a', 3), 2), at(ev('a', 4), 3)])
            .advance_watermark_to(30)       # one jump past the 2 + 5 deadline and the window end
            .advance_watermark_to_infinity())
  p = beam.Pipeline(options=streaming_options())
  result = p | stream | ProcessInOrder(Positions(), gap_timeout=5, gap_policy='skip')
  grouped = (result.outputs
             | beam.WindowInto(window.FixedWindows(10), allowed_lateness=allowed_lateness)
             | beam.GroupByKey()
             | beam.MapTuple(lambda k, vs: (k, sorted(vs))))
  return p, grouped


def test_timer_output_is_late_for_a_downstream_window_without_lateness():
  # Why ProcessInOrder documents allowed lateness: Beam 2.77's bundle-based runner does not
  # hold the watermark for event-time timers, so (3, 4) released at 7 miss the [0, 10) pane.
  p, grouped = _released_by_timer_then_windowed(0)
  assert_that(grouped, equal_to([('a', [(1, 1)])]))
  p.run().wait_until_finish()


def test_timer_output_is_kept_with_allowed_lateness_downstream():
  p, grouped = _released_by_timer_then_windowed(Duration(seconds=60))
  assert_that(grouped | beam.FlatMapTuple(lambda k, vs: vs),
              equal_to([(1, 1), (3, 2), (4, 3)]))
  p.run().wait_until_finish()


@pytest.mark.parametrize('runner, state', [
    ('FnApiRunner', 'ordered_list'), ('DirectRunner', 'value'), ('PrismRunner', 'value'),
    ('FlinkRunner', 'value')])
def test_auto_state_follows_the_runner(runner, state):
  p = beam.Pipeline(options=PipelineOptions([f'--runner={runner}']))
  pcoll = p | beam.Create([ev('k', 1)])
  assert ProcessInOrder(Positions()).chosen_state(pcoll) == state
  assert ProcessInOrder(Positions(), state='value').chosen_state(pcoll) == 'value'
  assert ProcessInOrder(Positions()).chosen_expansion(pcoll) == 'batch'


def test_fn_api_runner_streaming_expansion_uses_ordered_list_state():
  events = [ev('k', s) for s in (4, 2, 3, 1)]
  with beam.Pipeline(options=PipelineOptions(['--runner=FnApiRunner'])) as p:
    result = p | beam.Create(events) | ProcessInOrder(Positions(), expansion='streaming')
    assert_that(result.outputs, equal_to([('k', (s, s)) for s in range(1, 5)]))


def test_batch_outputs_carry_the_timestamp_of_the_event_that_released_them():
  events = [at(ev('a', 2), 20), at(ev('a', 1), 10), at(ev('a', 4), 40), at(ev('a', 1), 50)]
  with beam.Pipeline(options=pipeline_options([])) as p:
    result = (p | beam.Create(events)
              | ProcessInOrder(Positions(), gap_timeout=5, gap_policy='skip'))
    # Sorted, 1 (t=10) then 2 (t=20) arrive in order; 4 waits and is released by
    # the gap timeout at the end of the input, stamped with the key's latest time.
    assert_that(result.outputs | with_timestamp('ts'), equal_to([
        (('a', (1, 1)), 10), (('a', (2, 2)), 20), (('a', (4, 3)), 50)]), label='outputs')
    assert_that(result.unprocessed | beam.Map(lambda r: (r['sequence'], r['reason']))
                | with_timestamp('uts'),
                equal_to([((1, 'duplicate'), 50), ((3, 'gap_timeout'), 50)]), label='unprocessed')


def test_events_without_a_usable_key_are_reported():
  events = [ev(None, 1), ev({'not': 'a key'}, 1), ev(True, 1), {'sequence': 1}, 'not a dict',
            ev('fine', 1)]
  with beam.Pipeline(options=pipeline_options([])) as p:
    result = p | beam.Create(events) | ProcessInOrder(Positions())
    assert_that(result.outputs, equal_to([('fine', (1, 1))]), label='outputs')
    assert_that(result.unprocessed | beam.Map(lambda r: (r['key'], r['reason'], r['detail'].split(':')[0])),
                equal_to([(None, 'invalid_key', 'cannot take the key')] * 5), label='unprocessed')


def test_backlog_drains_on_event_time_timers_in_streaming():
  n = 200
  stream = (TestStream()
            .advance_watermark_to(0)
            .add_elements([at(ev('a', s), 0) for s in range(2, n + 1)])
            .add_elements([at(ev('a', 1), 1)])     # releases 10 now, the rest on drain timers
            .advance_watermark_to(5)
            .add_elements([at(ev('a', n + 1), 6)])
            .advance_watermark_to_infinity())
  with beam.Pipeline(options=streaming_options()) as p:
    result = (p | stream
              | ProcessInOrder(Positions(), max_events_per_activation=10, final_status=False))

    def check(actual):
      # (sequence == position) proves order; the first 10 carry the releasing event's
      # time (1 s), the drained rest the drain timer's (also 1 s), the last event its own.
      got = collections.Counter((kv[1][0] == kv[1][1], t) for kv, t in actual)
      if got != {(True, 1): n, (True, 6): 1}:
        raise BeamAssertException(f'unexpected outputs: {got}')
    assert_that(result.outputs | with_timestamp('ts'), check)


@settings(max_examples=3, deadline=None)
@given(shuffled_keys(), st.integers(1, 4))
def test_property_streaming_outputs_are_each_keys_contiguous_prefix(events, batches):
  """Random arrival in several TestStream batches: every key's output is its
  contiguous prefix, in order, and every copy is reported as a duplicate."""
  stream = TestStream().advance_watermark_to(0)
  size = max(1, -(-len(events) // batches))
  for i in range(0, len(events), size):
    stream = stream.add_elements([at(e, i) for e in events[i:i + size]]).advance_watermark_to(i + 1)
  stream = stream.advance_watermark_to_infinity()
  want, unprocessed = [], 0
  by_key: Dict[str, list] = {}
  for e in events:
    by_key.setdefault(e['partition_key'], []).append(e['sequence'])
  for key, seqs in by_key.items():
    m = 0
    while m + 1 in set(seqs):
      m += 1
    want += [(key, (s, s)) for s in range(1, m + 1)]
    unprocessed += len(seqs) - len(set(seqs))
  with beam.Pipeline(options=streaming_options()) as p:
    result = p | stream | ProcessInOrder(Positions(), final_status=False)
    assert_that(result.outputs, equal_to(want), label='outputs')
    assert_that(result.unprocessed | beam.Map(lambda r: r['reason']),
                equal_to(['duplicate'] * unprocessed), label='unprocessed')
