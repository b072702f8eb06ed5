"""`run.py bench replay` end to end on a small archive: the JSON line's fields and their consistency.

Speed is not asserted here (the benchmark reports it); counts are.
"""

import json
import os
import subprocess

import pytest

from tests.demo import DEMO_SCHEMAS, REG, ROOT  # noqa: F401
from sourcebeam.benchmarks.replay import archive_path, build_archive, workers_args
from sourcebeam.transforms.archive import iter_archive, list_archive_files
from tests.cli import run_cli, run_py

FIELDS = ('events', 'raw_decode_eps', 'naive_beam_eps', 'replay_eps', 'speedup_vs_realtime',
          'peak_rss_mb')


def run_bench(*args, timeout=600):
  # A process of its own: the benchmark runs each measurement in a spawned process (its own
  # memory peak), which needs a plain interpreter as the parent, not pytest.
  return subprocess.run(run_py('bench', 'replay', *args), capture_output=True, text=True,
                        cwd=ROOT, timeout=timeout)


@pytest.mark.integration
def test_bench_replay_json_line_is_complete_and_consistent(tmp_path):
  plot = tmp_path / 'replay.png'
  # The retail-only archive (the whole app's is checked below and by the consumer tests);
  # without the per-consumer and publish runs, which triple the time.
  proc = run_bench('--sizes', '1000,2000', '--cache-dir', str(tmp_path / 'cache'),
                   '--plot', str(plot), '--retail-only', '--skip-consumers', '--skip-publish')
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = proc.stdout.strip().splitlines()[-1]
  result = json.loads(last)
  for field in FIELDS:
    assert field in result, field
    assert result[field] > 0, field
  assert result['events'] == 2000
  assert sum(result['by_type'].values()) == 2000
  # A clean generated archive: nothing corrupt, nothing unprocessed, no key left waiting.
  outputs = result['outputs']
  assert outputs['corrupt'] == 0 and outputs['unprocessed'] == 0
  assert result['keys_waiting_on_gap'] == 0
  # One final record per key and view: every product is in the catalog (it was created),
  # every user who viewed has both viewed views.
  assert outputs['retail/catalog'] == len({e['partition_key'] for e in _archive(tmp_path, 2000)
                                    if e['event_type'] == 'ProductCreated'})
  viewers = {e['partition_key'] for e in _archive(tmp_path, 2000) if e['event_type'] == 'ProductViewed'}
  assert outputs['retail/recently_viewed'] == outputs['retail/frequently_viewed'] == len(viewers)
  assert result['keys'] == len({e['partition_key'] for e in _archive(tmp_path, 2000)})
  # speedup = event-time span / replay wall time; rates = events / seconds.
  assert result['speedup_vs_realtime'] == pytest.approx(
      result['span_seconds'] / result['replay_seconds'], rel=0.01, abs=1)
  assert result['replay_eps'] == pytest.approx(2000 / result['replay_seconds'], rel=0.01)
  assert [r['events'] for r in result['by_size']] == [1000, 2000]
  assert plot.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # The table comes before the JSON line.
  assert 'raw decode/s' in proc.stdout.split(last)[0]


def _archive(tmp_path, n):
  from sourcebeam.generators.phases import HELLO_RETAIL_RATE
  return list(iter_archive(archive_path(str(tmp_path / 'cache'), n, 'avro', HELLO_RETAIL_RATE, 1, 16), REG))


def test_archive_is_built_once_and_holds_the_generated_events(tmp_path):
  path = archive_path(str(tmp_path), 500, 'parquet', 50.0, 3, 4)
  facts = build_archive(path, 500, 'parquet', 50.0, 3, 4)
  events = list(iter_archive(path, REG))
  assert facts['events'] == len(events) == 500
  assert facts['span_ms'] == max(e['event_time'] for e in events) - min(e['event_time'] for e in events)
  assert facts['span_ms'] == pytest.approx(500 / 50.0 * 1000, rel=0.01)
  files = list_archive_files(path)
  assert facts['files'] == len(files) and {f.bucket for f in files} <= set(range(4))
  stamp = {f.path: os.stat(f.path).st_mtime_ns for f in files}
  assert build_archive(path, 500, 'parquet', 50.0, 3, 4) == facts
  assert {f.path: os.stat(f.path).st_mtime_ns for f in list_archive_files(path)} == stamp


def test_workers_map_to_each_runners_parallelism():
  assert workers_args(['--runner=FlinkRunner', '--parallelism=4'], 2) == [
      '--runner=FlinkRunner', '--parallelism=2', '--sdk_worker_parallelism=2']
  assert workers_args([], 2) == ['--direct_num_workers=2', '--direct_running_mode=multi_processing']
  assert workers_args([], 1) == ['--direct_num_workers=1', '--direct_running_mode=in_memory']


@pytest.mark.cli
def test_bad_sizes_are_a_usage_error(tmp_path):
  proc = run_cli('bench', 'replay', '--sizes', '0', '--cache-dir', str(tmp_path))
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr


# --- the whole app's archive (issue 17) ---------------------------------------------------

from sourcebeam.benchmarks.replay import (app_archive_path, app_with_only, build_app_archive,
                                          measure_parse, raw_path_of)


def test_app_archive_holds_every_domain_and_the_raw_lines_it_was_published_from(tmp_path):
  from sourcebeam.schemas.validation import publish_raw
  path = app_archive_path(str(tmp_path), 6000, 'avro', 116.0, 1, 4)
  facts = build_app_archive(path, 6000, 'avro', 116.0, 1, 4)
  events = list(iter_archive(path, REG))
  assert facts['events'] == len(events) == 6000
  types = {e['event_type'] for e in events}
  assert {'ProductViewed', 'CartItemAdded', 'RideStarted', 'FarePaid',
          'TaxiLocationReported', 'RideRequested'} <= types
  assert sum(facts['by_type'].values()) == 6000
  # The raw lines publish to exactly the archive's events.
  with open(raw_path_of(path), 'rb') as f:
    published = [publish_raw(line, REG)[0] for line in f.read().splitlines()]
  # (The three generators draw event ids from the same seed, as in the main job's sample day,
  # so an id can repeat across domains: compare whole events.)
  def key(e):
    return json.dumps(e, sort_keys=True)
  assert sorted(published, key=key) == sorted(events, key=key)
  # A prefix in arrival order: every key's sequences run 1, 2, 3... without a hole.
  seqs = {}
  for e in events:
    seqs.setdefault(e['partition_key'], []).append(e['sequence'])
  assert all(sorted(s) == list(range(1, len(s) + 1)) for s in seqs.values())
  assert facts['span_ms'] == max(e['event_time'] for e in events) - min(e['event_time'] for e in events)
  assert build_app_archive(path, 6000, 'avro', 116.0, 1, 4) == facts  # built once
  parsed = measure_parse(raw_path_of(path))
  assert parsed['events'] == 6000 and parsed['seconds'] > 0


def test_app_with_only_keeps_the_named_consumers_and_leaves_the_app_alone():
  from sourcebeam.pipelines.apps import load_app
  app = load_app(None)
  names = [c.name for c in app.consumers]
  sub = app_with_only(app, ['taxi', 'retail/cart'])
  assert [c.name for c in sub.consumers] == ['retail/cart', 'taxi']
  assert sub.registry is app.registry
  assert [c.name for c in app.consumers] == names
  assert app_with_only(app, []).consumers == ()
