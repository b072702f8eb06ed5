"""`run.py bench ordering`: its input is what it claims, and its last line is the JSON summary.
(Speed is never asserted here: the benchmark's ratios are measured in its own run.)"""

import collections
import json

import pytest

from sourcebeam.benchmarks.ordering import _check_complete, envelope_at, shuffled_order
from tests.cli import run_cli


def test_input_is_complete_per_key_sequences_in_shuffled_order():
  n, keys = 1000, 7
  order = shuffled_order(n, seed=5)
  assert sorted(order) == list(range(n)) and list(order) != list(range(n))
  per_key = collections.defaultdict(list)
  for idx in order:
    e = envelope_at(idx, keys)
    per_key[e['partition_key']].append(e['sequence'])
  assert len(per_key) == keys
  for seqs in per_key.values():
    assert sorted(seqs) == list(range(1, len(seqs) + 1))   # each key: 1..m exactly once
  assert any(seqs != sorted(seqs) for seqs in per_key.values())  # and they arrive shuffled


def test_incomplete_ordering_fails_the_benchmark():
  with pytest.raises(AssertionError, match='incomplete'):
    _check_complete({'key': 'k', 'buffered': 1, 'unprocessed': 0, 'processed': 3, 'received': 4})


@pytest.mark.cli
def test_cli_prints_a_table_and_a_json_last_line():
  code, out, _ = run_cli('bench', 'ordering', '--events', '3000', '--keys', '30')
  assert code == 0
  lines = out.strip().splitlines()
  assert any(l.startswith('ProcessInOrder (batch expansion)') for l in lines)
  summary = json.loads(lines[-1])
  assert (summary['events'], summary['keys']) == (3000, 30)
  assert summary['ratio'] == pytest.approx(
      summary['events_per_sec'] / summary['baseline_events_per_sec'], rel=0.01)


@pytest.mark.cli
def test_cli_rejects_nonsense():
  code, _, err = run_cli('bench', 'ordering', '--events', '0')
  assert code == 2
  assert 'must be positive' in err
