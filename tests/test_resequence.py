"""Resequence on Beam's DirectRunner: both expansions on bounded input (TestPipeline), holes
that never fill skipped live after the event-time limit (watermark) and the processing-time
limit (TestStream's clock), copies and conflicts, the summary and the metrics, and both
expansions against the plain-Python ``resequence``."""

import json
import random
import time

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import BeamAssertException, assert_that, equal_to
from apache_beam.transforms import window

from sourcebeam.transforms.errors import ConfigError
from sourcebeam.transforms.resequence import Resequence, SummarizeStats
from sourcebeam.transforms.resequence_core import EVENT_TIME, ResequenceConfig, resequence
from tests.test_resequence_core import ev

EXPANSIONS = ['batch', 'streaming']
# On bounded input on the DirectRunner. Without a processing-time limit the streaming
# expansion runs on the FnApiRunner (the DirectRunner's fallback when Prism cannot be had);
# a processing-time timer would send it to the bundle-based runner, which does not hold the
# watermark for timers: what the end of input releases is then late for every downstream
# GroupByKey, assert_that's included (see transforms/resequence.py).
BOUNDED = {'batch': dict(expansion='batch'),
           'streaming': dict(expansion='streaming', gap_timeout_processing=None)}


def issue_input():
  """Keys a and b: the 3rd raw event never arrives (dead-lettered upstream), the 5th
  arrives twice; key c is clean. Shuffled."""
  events = [ev(k, s) for k in 'ab' for s in (1, 2, 4, 5, 5, 6, 7)]
  events += [ev('c', s) for s in (1, 2, 3)]
  random.Random(13).shuffle(events)
  return events


def issue_published():
  return ([(k, seq, raw) for k in 'ab' for seq, raw in enumerate((1, 2, 4, 5, 6, 7), 1)] +
          [('c', s, s) for s in (1, 2, 3)])


def seq_triples(label):
  return label >> beam.Map(lambda e: (e['partition_key'], e['sequence'], e['raw_sequence']))


def published_once(events):
  """Every published event_id exactly once."""
  ids = [e['event_id'] for e in events]
  if len(ids) != len(set(ids)):
    raise BeamAssertException(f'published twice: {sorted(ids)}')


@pytest.mark.parametrize('expansion', EXPANSIONS)
def test_third_missing_fifth_redelivered_publishes_one_to_n_on_the_direct_runner(expansion):
  p = TestPipeline()
  result = p | beam.Create(issue_input()) | Resequence(source='raw.jsonl', **BOUNDED[expansion])
  assert_that(result.published | seq_triples('Triples'), equal_to(issue_published()),
              label='published')
  assert_that(result.published, published_once, label='once')
  assert_that(result.dead_letters | beam.Map(lambda d: (d['reason'], d['key'], d['missing'],
                                                         d['source'])),
              equal_to([('gap', 'a', [3, 3], 'raw.jsonl'), ('gap', 'b', [3, 3], 'raw.jsonl')]),
              label='gaps')
  assert_that(result.duplicates | beam.Map(lambda d: (d['key'], d['raw_sequence'], d['duplicate_of'])),
              equal_to([('a', 5, 'a-5'), ('b', 5, 'b-5')]), label='duplicates')
  assert_that(result.stats | SummarizeStats(), equal_to([{
      'keys': 3, 'keys_with_gaps': 2, 'received': 17, 'published': 15, 'duplicates_dropped': 2,
      'dead_lettered': 0, 'dead_lettered_by_reason': {}, 'gaps': 2, 'missing_raw_sequences': 2,
      'held': 0}]), label='summary')
  p.run().wait_until_finish()


def test_conflict_is_dead_lettered_duplicates_counted_and_metrics_say_so():
  events = [ev('k', 1), ev('k', 2),
            ev('k', 2, eid='k-2-again'),                 # same slot, same content: a duplicate
            ev('k', 3), ev('k', 3, eid='k-3b', t=5, qty=7),  # same slot, other content: conflict
            ev('k', 4, eid='k-1'),                       # k-1's event_id, other content: conflict
            {'sequence': 1, 'event_id': 'no-key'}]       # no partition key
  p = TestPipeline()
  result = p | beam.Create(events) | Resequence()
  assert_that(result.published | seq_triples('Triples'),
              equal_to([('k', 1, 1), ('k', 2, 2), ('k', 3, 3)]), label='published')
  assert_that(result.dead_letters | beam.Map(lambda d: (d['reason'], d.get('event_id'),
                                                         d.get('conflicts_with'))),
              equal_to([('conflict', 'k-3b', 'k-3'), ('conflict', 'k-1', 'k-1'),
                        ('invalid_key', 'no-key', None)]), label='dead')
  assert_that(result.duplicates | beam.Map(lambda d: (d['event_id'], d['by'])),
              equal_to([('k-2-again', 'raw_sequence')]), label='duplicates')
  run = p.run()
  run.wait_until_finish()
  counters = {}
  for c in run.metrics().query(MetricsFilter().with_namespace('resequence'))['counters']:
    counters[c.key.metric.name] = counters.get(c.key.metric.name, 0) + c.committed  # over steps
  assert counters == {'received': 7, 'published': 3, 'duplicates_dropped': 1, 'dead_lettered': 3}


@pytest.mark.parametrize('expansion', EXPANSIONS)
def test_end_of_bounded_input_closes_every_hole(expansion):
  events = [ev('k', s) for s in (3, 4, 8)]
  p = TestPipeline()
  result = p | beam.Create(events) | Resequence(expansion=expansion, gap_timeout=None,
                                                gap_timeout_processing=None)  # no limit: the end
  assert_that(result.published | seq_triples('Triples'),
              equal_to([('k', 1, 3), ('k', 2, 4), ('k', 3, 8)]), label='published')
  assert_that(result.dead_letters | beam.Map(lambda d: (d['missing'], d['trigger'])),
              equal_to([([1, 2], 'end_of_input'), ([5, 7], 'end_of_input')]), label='gaps')
  assert_that(result.stats | beam.Map(lambda s: (s['held'], s['missing_raw_sequences'])),
              equal_to([(0, 5)]), label='stats')
  p.run().wait_until_finish()


# -- live: TestStream on the bundle-based direct runner -----------------------------------------

def streaming_pipeline():
  return TestPipeline(options=PipelineOptions(['--streaming']))


def at(event, seconds):
  return window.TimestampedValue(event, seconds)


def with_ts(label):
  return label >> beam.Map(lambda e, t=beam.DoFn.TimestampParam:
                           (e['partition_key'], e['sequence'], e['raw_sequence'],
                            t.micros // 1_000_000))


def test_live_hole_is_skipped_after_the_event_time_limit_then_a_late_arrival_is_dead_lettered():
  stream = (TestStream()
            .advance_watermark_to(0)
            .add_elements([at(ev('a', 1), 0), at(ev('a', 2), 1), at(ev('a', 4), 2),
                           at(ev('a', 5), 3), at(ev('b', 1), 3)])
            .advance_watermark_to(10)                # a waits on raw 3 since 2: deadline 32
            .add_elements([at(ev('a', 5), 11)])      # the re-delivered 5th
            .advance_watermark_to(40)                # past the deadline: a moves on
            .add_elements([at(ev('a', 6), 41), at(ev('a', 3), 42)])
            .advance_watermark_to_infinity())
  p = streaming_pipeline()
  result = p | stream | Resequence(gap_timeout=30, gap_timeout_processing=None)
  assert_that(result.published | with_ts('ts'), equal_to([
      ('a', 1, 1, 0), ('a', 2, 2, 1), ('b', 1, 1, 3),
      ('a', 3, 4, 2), ('a', 4, 5, 3),                 # released by the timer, own timestamps
      ('a', 5, 6, 41)]), label='published')
  assert_that(result.dead_letters | beam.Map(lambda d: (d['reason'], d['key'], d.get('missing'),
                                                         d.get('trigger'), d.get('raw_sequence'))),
              equal_to([('gap', 'a', [3, 3], 'event_time', None), ('late', 'a', None, None, 3)]),
              label='dead')
  assert_that(result.duplicates | beam.Map(lambda d: (d['key'], d['raw_sequence'])),
              equal_to([('a', 5)]), label='duplicates')
  p.run().wait_until_finish()


def test_live_hole_is_skipped_after_the_processing_time_limit():
  # The DoFn reads the wall clock; TestStream's clock starts at 0: bring it to the wall clock.
  stream = (TestStream()
            .advance_processing_time(int(time.time()))
            .advance_watermark_to(0)
            .add_elements([at(ev('a', 1), 0), at(ev('a', 3), 0), at(ev('b', 1), 0),
                           at(ev('b', 3), 0)])
            .advance_processing_time(30)              # half the limit: both wait
            .add_elements([at(ev('a', 2), 1)])        # a's hole fills in time
            .advance_processing_time(120)             # past the limit: b moves on
            .add_elements([at(ev('b', 4), 2)])
            .advance_watermark_to_infinity())
  p = streaming_pipeline()
  result = p | stream | Resequence(gap_timeout=None, gap_timeout_processing=60)
  assert_that(result.published | seq_triples('Triples'), equal_to([
      ('a', 1, 1), ('a', 2, 2), ('a', 3, 3), ('b', 1, 1), ('b', 2, 3), ('b', 3, 4)]),
      label='published')
  assert_that(result.dead_letters | beam.Map(lambda d: (d['reason'], d['key'], d['missing'],
                                                         d['trigger'])),
              equal_to([('gap', 'b', [2, 2], 'processing_time')]), label='dead')
  p.run().wait_until_finish()


def test_unsequenced_stream_is_published_in_event_time_order():
  events = [ev('k', None, eid=f'e{i}', t=t) for i, t in enumerate((30, 10, 20, 10))]
  events.append(events[0])
  p = TestPipeline()
  result = p | beam.Create(events) | Resequence(order_by=EVENT_TIME)
  assert_that(result.published | beam.Map(lambda e: (e['sequence'], e['event_id'], e['raw_sequence'])),
              equal_to([(1, 'e1', None), (2, 'e3', None), (3, 'e2', None), (4, 'e0', None)]),
              label='published')
  assert_that(result.duplicates | beam.Map(lambda d: d['event_id']), equal_to(['e0']),
              label='duplicates')
  p.run().wait_until_finish()


# -- both expansions, and the plain function, agree ------------------------------------------------

def random_input(seed: int, keys: int = 40):
  """Keys with holes, copies (same event_id) and a missing first event, shuffled."""
  rnd = random.Random(seed)
  events = []
  for k in range(keys):
    key = f'k{k:02d}'
    for s in range(1, rnd.randint(2, 15)):
      if rnd.random() < 0.2:
        continue                                      # a hole
      events += [at(ev(key, s), rnd.randint(0, 1000))] * rnd.choice((1, 1, 1, 2, 3))
  rnd.shuffle(events)
  return events


def canon(records):
  drop = ('trigger', 'detail')
  return sorted(json.dumps({k: v for k, v in r.items() if k not in drop}, sort_keys=True)
                for r in records)


@pytest.mark.parametrize('seed', [1, 2])
def test_expansions_and_the_plain_function_agree(seed):
  events = random_input(seed)
  want = resequence([t.value for t in events], ResequenceConfig())
  p = TestPipeline()
  source = p | beam.Create(events)
  for expansion in EXPANSIONS:
    r = source | expansion >> Resequence(**BOUNDED[expansion])
    for part in ('published', 'dead_letters', 'duplicates', 'stats'):
      expected = canon(getattr(want, part))
      assert_that(getattr(r, part) | f'{expansion}{part}' >> beam.combiners.ToList()
                  | f'{expansion}{part}canon' >> beam.Map(canon),
                  equal_to([expected]), label=f'{expansion}_{part}')
    # Published envelopes keep their input timestamps.
    stamps = {(t.value['partition_key'], t.value['sequence']): t.timestamp.micros // 1_000_000
              for t in events}
    assert_that(r.published | f'{expansion}ts' >> beam.Map(
        lambda e, t=beam.DoFn.TimestampParam: stamps[(e['partition_key'], e['raw_sequence'])]
        == t.micros // 1_000_000), equal_to([True] * len(want.published)), label=f'{expansion}_ts')
  p.run().wait_until_finish()


def test_bad_options_fail_at_construction():
  with pytest.raises(ConfigError, match='expansion'):
    Resequence(expansion='fast')
  with pytest.raises(ConfigError, match='gap_timeout'):
    Resequence(gap_timeout=-1)
  with pytest.raises(ConfigError, match='first_sequence'):
    Resequence(first_sequence='first')
