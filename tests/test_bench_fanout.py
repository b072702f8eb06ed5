"""`run.py bench fanout` at a tiny size: the JSON line's shape and its consistency.

Speed is not asserted here (the benchmark reports it); the deliveries are checked
inside the benchmark against the filters applied one by one.
"""

import json

import pytest

from tests.demo import DEMO_SCHEMAS, REG  # noqa: F401
from sourcebeam.benchmarks.fanout import bench_subscriber_doc, parse_sizes
from sourcebeam.transforms.errors import ConfigError
from sourcebeam.transforms.fanout_core import parse_subscribers
from tests.cli import run_cli


def run_bench(*args):
  return run_cli('bench', 'fanout', *args)


@pytest.mark.cli
def test_bench_fanout_json_line_has_eps_and_ratio_per_subscriber_count(tmp_path):
  proc = run_bench('--subscribers', '1,3,12', '--events', '1500', '--cache-dir', str(tmp_path / 'cache'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = proc.stdout.strip().splitlines()[-1]
  result = json.loads(last)
  assert set(result['eps']) == set(result['ratio']) == {'1', '3', '12'}
  assert all(v > 0 for v in result['eps'].values())
  assert result['ratio']['1'] == 1.0
  for n in ('3', '12'):
    assert result['ratio'][n] == pytest.approx(result['eps'][n] / result['eps']['1'], rel=0.01)
    assert result['eps'][n] == pytest.approx(1500 / result['seconds'][n], rel=0.01)
  assert result['events'] == 1500
  assert result['deliveries_per_event']['1'] == 1.0
  assert result['deliveries_per_event']['12'] > result['deliveries_per_event']['3'] >= 1.0
  assert result['target']['subscribers'] == 12 and 'met' in result['target']
  assert 'deliveries/s' in proc.stdout.split(last)[0]  # the table comes first


def test_the_bench_subscribers_are_a_valid_file_and_one_takes_everything(tmp_path):
  types = REG.event_types
  subs = parse_subscribers(bench_subscriber_doc(100, str(tmp_path), types), types)
  assert len(subs) == 100 and subs[0].event_types is None and subs[0].keys.matches_all
  assert len({s.sink.target for s in subs}) == 100


@pytest.mark.cli
def test_sizes_always_include_one_and_bad_sizes_are_usage_errors():
  assert parse_sizes('100,10') == [1, 10, 100]
  with pytest.raises(ConfigError):
    parse_sizes('0,5')
  with pytest.raises(ConfigError):
    parse_sizes('a')
  proc = run_bench('--subscribers', 'x')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
