"""KeyedStateMachine: both expansions give the same outputs at the same timestamps on
bounded input; the plain-Python run of one key; a timer that never stops is an error."""

import glob
import json
from typing import Any, Tuple

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Timestamp

from sourcebeam import ConfigError, JoinPairs, KeyedStateMachine, Machine, Step
from sourcebeam.demo import taxi_logic as logic
from sourcebeam.demo.taxi import long_ride_machine
from sourcebeam.transforms.state_machine import run_key

T0 = 1_795_651_200_000
MIN, H = logic.MINUTE_MS, logic.HOUR_MS


def counting_machine(limit: int) -> Machine:
  """Counts a key's elements; at the end its timer fires ``limit`` times, once a minute."""

  def on_event(state, key, element):
    n, _ = state or (0, 0)
    return Step((n + 1, 0), T0 + 10 * MIN, (f'{key}:{element}', ), (('seen', n + 1), ))

  def on_timer(state, key):
    n, fired = state
    if fired + 1 >= limit:
      return Step(None, None, (f'{key}:done after {n}', ))
    return Step((n, fired + 1), T0 + 10 * MIN + (fired + 1) * MIN, (f'{key}:fired {fired + 1}', ))

  return Machine(on_event, on_timer)


def test_one_key_runs_every_element_then_its_timer_until_cleared():
  ts = [Timestamp(micros=(T0 + i * MIN) * 1000) for i in range(2)]
  got = list(run_key(counting_machine(3), 'k', zip(ts, ['a', 'b'])))
  main = [(v.value, v.timestamp) for v in got if isinstance(v, window.TimestampedValue)]
  at = lambda ms: Timestamp(micros=ms * 1000)
  assert main == [('k:a', ts[0]), ('k:b', ts[1]), ('k:fired 1', at(T0 + 10 * MIN)),
                  ('k:fired 2', at(T0 + 11 * MIN)), ('k:done after 2', at(T0 + 12 * MIN))]
  tagged = [(t.tag, t.value.value) for t in got if isinstance(t, beam.pvalue.TaggedOutput)]
  assert tagged == [('seen', 1), ('seen', 2)]


def test_a_timer_that_is_never_cleared_is_an_error_naming_the_key():
  forever = Machine(lambda s, k, e: Step(1, T0), lambda s, k: Step(1, T0))
  with pytest.raises(ConfigError, match=r"key 'k7': the timer was still set after 1000 firings"):
    list(run_key(forever, 'k7', [(Timestamp(0), 'x')]))


def test_an_unknown_expansion_is_a_config_error():
  with pytest.raises(ConfigError, match="expansion must be 'auto', 'batch' or 'streaming'"):
    KeyedStateMachine(counting_machine(1), expansion='fast')
  with pytest.raises(ConfigError, match="expansion must be"):
    JoinPairs('a', 'b', left_key=str, right_key=str, left_time=int, right_time=int,
              expire_after_ms=1, expansion='fast')


def _run(expansion: str, out_dir) -> dict:
  """The long-ride machine, the join and a machine firing its timer three times, on one
  bounded input, with the expansion forced: each output's (value, timestamp) lines."""
  rides = [(1, T0, True), (1, T0 + 3 * H, False), (2, T0 + MIN, True),
           (2, T0 + 2 * H + MIN, False), (3, T0 + 2 * MIN, True), (4, T0 + 9 * H, False)]
  records = [{'rideId': i, 'isStart': s, 'eventTime': t} for i, t, s in rides]
  fares = [{'rideId': i, 'startTime': T0 + i * MIN} for i in (1, 2, 9)]
  with TestPipeline() as p:
    r = p | 'Rides' >> beam.Create([window.TimestampedValue(x, x['eventTime'] / 1000)
                                    for x in records])
    f = p | 'Fares' >> beam.Create([window.TimestampedValue(x, x['startTime'] / 1000)
                                    for x in fares])
    long = (r
            | beam.Map(lambda x: (x['rideId'], x)).with_output_types(Tuple[int, Any])
            | 'Long' >> KeyedStateMachine(long_ride_machine(H), tags=['ignored'], key_type=int,
                                          expansion=expansion))
    starts = r | 'Starts' >> beam.Filter(lambda x: x['isStart'])
    joined = (starts, f) | JoinPairs('ride', 'fare', left_key=lambda x: x['rideId'],
                                right_key=lambda x: x['rideId'],
                                left_time=lambda x: x['eventTime'],
                                right_time=lambda x: x['startTime'], expire_after_ms=30 * MIN,
                                key_type=int, expansion=expansion)
    counted = (r
               | 'ByParity' >> beam.Map(lambda x: (str(x['rideId'] % 2), x['rideId']))
               .with_output_types(Tuple[str, Any])
               | 'Count' >> KeyedStateMachine(counting_machine(3), tags=['seen'],
                                              expansion=expansion))
    named = {'alerts': long['main'], 'ignored': long['ignored'], 'joined': joined.joined,
             'unmatched': joined.unmatched, 'counted': counted['main'], 'seen': counted['seen']}
    for name, pcoll in named.items():
      (pcoll
       | f'Stamp {name}' >> beam.Map(lambda v, t=beam.DoFn.TimestampParam:
                                     json.dumps([v, t.micros // 1000], sort_keys=True))
       | f'Write {name}' >> beam.io.WriteToText(str(out_dir / name)))
  return {name: sorted(line for path in glob.glob(str(out_dir / name) + '*')
                       for line in open(path).read().splitlines())
          for name in named}


def test_both_expansions_give_the_same_outputs_at_the_same_timestamps(tmp_path):
  batch, streaming = _run('batch', tmp_path / 'batch'), _run('streaming', tmp_path / 'streaming')
  # A pair carries the timestamp of whichever side arrived second: the order of a key's
  # elements is the runner's in both expansions, so only that may differ.
  pairs = lambda lines: sorted(json.dumps(json.loads(x)[0], sort_keys=True) for x in lines)
  assert pairs(batch.pop('joined')) == pairs(streaming.pop('joined'))
  assert batch == streaming
  line = lambda v, t: json.dumps([v, t], sort_keys=True)
  assert batch['alerts'] == sorted([line({'rideId': 1}, T0 + 3 * H),
                                    line({'rideId': 3}, T0 + 2 * MIN + 2 * H + 1)])
  # Ride 3's alert leaves a marker that a second timer clears an hour later.
  assert batch['ignored'] == [line({'rideId': 4, 'reason': 'END without START',
                                    'record': None}, T0 + 10 * H)]
  assert sorted(json.loads(x)[0]['reason'] for x in batch['unmatched']) == [
      'no fare within 30 min', 'no ride within 30 min']
  # Three rides of each parity: three element outputs, then three firings, a minute apart.
  assert {line(f'{k}:fired 1', T0 + 10 * MIN) for k in '01'} <= set(batch['counted'])
  assert {line(f'{k}:done after 3', T0 + 12 * MIN) for k in '01'} <= set(batch['counted'])
  assert len(batch['counted']) == 12 and len(batch['seen']) == 6
