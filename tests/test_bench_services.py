"""`run.py bench services`: a small run against the real broker states every figure it promises
(the full run, 300 waiting reads and bursts of 300, is in README's benchmark table)."""

import json

import pytest

from tests.cli import run_cli


@pytest.mark.integration  # the benchmark starts `run.py serve writer` and `serve views`
def test_a_small_run_states_waiting_reads_bursts_and_slow_clients(kafka, tmp_path):
  proc = run_cli('bench', 'services', '--bootstrap', kafka, '--waiting', '40', '--burst', '40',
                 '--slow', '10', '--reads', '40', '--posts', '20', '--workdir', str(tmp_path))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result['waiting_reads_answered'] == 40
  assert result['views_burst_ok'] == result['writer_burst_ok'] == 40
  for k in ('plain_read_ms_idle', 'plain_read_ms_while_waiting', 'post_ms_idle',
            'post_ms_while_waiting', 'views_burst_ms', 'writer_burst_ms',
            'plain_read_ms_with_slow_clients'):
    assert 0 < result[k]['p50'] <= result[k]['p99'] <= result[k]['max'], (k, result[k])
  assert result['all_waiting_answered_ms_after_the_write'] >= 0
  # One watcher, reading the positions at most every --poll-ms (10); on SQLite only after a commit
  # or once a second, and nothing commits while they wait: possibly never.
  assert 0 <= result['position_polls_per_s_while_waiting'] <= 1000 / 10 + 1
  assert 'plain reads, 40 reads waiting' in proc.stdout


@pytest.mark.cli
def test_bad_arguments_are_exit_2_with_one_line():
  proc = run_cli('bench', 'services', '--waiting', '0')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr and '--waiting' in proc.stderr
