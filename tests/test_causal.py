"""Effect after cause on the real stack: Add to Cart, then View Cart.

Everything runs as a user runs it: a real Kafka broker, ``run.py serve writer``,
the live view pipeline ``run.py stream --views`` on a real runner (embedded Flink,
see :mod:`pipelines.live_stack`), ``run.py serve views`` on SQLite. The
acceptance test adds an item and reads the cart with the add's receipt, 100 times
in a row under a background load of 200 events a second; the same reads without
the receipt show how often a plain read misses the write. The fault test kills
the pipeline mid-load, restarts it, and compares every view with a replay of the
topic's events from an archive.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from typing import Dict, List

import pytest

from tests.demo import DEMO_APP, REG
from sourcebeam.pipelines.live_stack import LiveStack, Load, StackError, add_then_view, percentile
from sourcebeam.transforms.view_store import ROWS_TABLE
from tests.cli import run_cli
from tests.polling import wait_until

VIEWS = [v.name for v in DEMO_APP.views]

pytestmark = pytest.mark.integration

LOAD_RATE = 200


def _topic(name: str) -> str:
  return f'{name}-{uuid.uuid4().hex[:8]}'


def _more_writes(load: Load, n: int, what: str) -> None:
  """Waits until the background load has written ``n`` more events (its receipts)."""
  target = len(load.receipts) + n
  wait_until(lambda: len(load.receipts) >= target or load.errors, 120, what,
             describe=lambda: f'{len(load.receipts)} of {target} receipts, errors {load.errors[:3]}')


def test_add_to_cart_then_view_cart_with_the_receipt_100_times_under_load(kafka, tmp_path):
  with LiveStack(kafka, _topic('causal'), str(tmp_path)) as stack:
    load = Load(stack, LOAD_RATE)
    load.start()
    try:
      _more_writes(load, LOAD_RATE, 'the first second of background load')
      with_receipts = add_then_view(stack, 100, with_receipts=True)
      plain = add_then_view(stack, 100, with_receipts=False)
    finally:
      load.stop()
    report = {'load_eps': round(load.achieved_rate, 1), 'load_events': len(load.receipts),
              'receipt_reads_ok': with_receipts['ok'],
              'p50_ms': percentile(with_receipts['latencies_ms'], 0.5),
              'p99_ms': percentile(with_receipts['latencies_ms'], 0.99),
              'plain_reads_stale': plain['missing']}
    print('add to cart, view cart:', json.dumps(report))
    assert not load.errors, load.errors[:3]
    assert load.achieved_rate >= 0.95 * LOAD_RATE, report
    # With the receipt: the item is there every time.
    assert with_receipts['ok'] == 100 and not with_receipts['failures'], with_receipts['failures']
    # Without: every read answered; how many missed the write is the point of receipts.
    assert plain['ok'] + plain['missing'] == 100
    assert plain['missing'] > 0, ('no plain read missed its write: the pipeline applied each add '
                                  'before the next HTTP round trip, so this run shows nothing')


def _view_rows(db: str) -> Dict[str, List[dict]]:
  con = sqlite3.connect(db)
  try:
    return {view: sorted((json.loads(v) for (v,) in con.execute(
        f'SELECT value FROM {ROWS_TABLE} WHERE view = ?', (view,))), key=lambda r: r['key'])
            for view in VIEWS}
  finally:
    con.close()


def _replayed_views(out: str) -> Dict[str, List[dict]]:
  views = {}
  for view in VIEWS:
    with open(os.path.join(out, f'{view}.jsonl')) as f:
      views[view] = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r['key'])
  return views


def _run(*args: str) -> None:
  proc = run_cli(*args)  # the replay, on the DirectRunner in this process
  assert proc.returncode == 0, proc.stderr[-3000:]


def _all_envelopes(bootstrap: str, topic: str) -> List[dict]:
  """Every message of the topic through the publishing boundary, read with Kafka's own client."""
  from sourcebeam.schemas.validation import publish_raw
  from tests.test_writer import _all_messages
  envelopes = []
  for m in _all_messages(bootstrap, topic):
    envelope, _, reasons = publish_raw(m.value(), REG)
    assert envelope is not None, reasons
    envelopes.append(envelope)
  return envelopes


def _archive(envelopes: List[dict], path: str) -> None:
  import apache_beam as beam
  from sourcebeam.transforms.archive import WriteArchive
  with beam.Pipeline() as p:
    _ = p | beam.Create(envelopes) | WriteArchive(path, registry=REG)


def test_a_killed_pipeline_restarts_and_its_views_equal_a_replay_of_the_archive(kafka, tmp_path):
  topic = _topic('killed')
  with LiveStack(kafka, topic, str(tmp_path / 'stack')) as stack:
    load = Load(stack, LOAD_RATE, users=100)
    load.start()
    try:
      # The pipeline has applied two seconds of the load (the views' positions show it),
      _more_writes(load, 2 * LOAD_RATE, 'two seconds of load')
      stack.wait_caught_up(list(load.receipts))
      stack.kill_pipeline()  # SIGKILL to the runner mid-load: bundles in flight are lost
      _more_writes(load, LOAD_RATE, 'writes while no pipeline runs')
      stack.start_pipeline()
      stack.wait_pipeline_ready()
      _more_writes(load, LOAD_RATE, 'writes after the restart')
    finally:
      load.stop()
    assert not load.errors, load.errors[:3]
    stack.wait_caught_up(load.receipts)
    live = _view_rows(stack.db)
    assert stack.pipeline_starts == 2
    # The benchmark's backlog probe: the topic's events, every one applied by every view.
    backlog = stack.backlog(load.receipts)
  # The same events archived (read back from Kafka with its own client), then replayed.
  envelopes = _all_envelopes(kafka, topic)
  assert len(envelopes) == len(load.receipts) + 2  # the load and the two readiness probes
  assert backlog == (len(envelopes), len(envelopes))
  archive, replay_out = str(tmp_path / 'archive'), str(tmp_path / 'replay')
  _archive(envelopes, archive)
  _run('replay', '--archive', archive, '--out', replay_out)
  replayed = _replayed_views(replay_out)
  assert sum(len(rows) for rows in live.values()) > 100
  for view in VIEWS:
    assert live[view] == replayed[view], view  # nothing lost, nothing applied twice


def test_a_stack_that_does_not_come_up_stops_what_it_started(kafka, tmp_path):
  """The pipeline fails at once (no such runner): start() says so, and the writer and the view
  API it had started are stopped, not left running."""
  stack = LiveStack(kafka, _topic('broken'), str(tmp_path), runner_args=['--runner=NoSuchRunner'])
  started = []
  spawn = stack._spawn
  stack._spawn = lambda name, args: started.append(spawn(name, args)) or started[-1]
  with pytest.raises(StackError, match='exited'):
    stack.start(timeout=240)
  assert len(started) == 3  # writer, view API, pipeline
  assert all(p.poll() is not None for p in started), [p.args for p in started if p.poll() is None]
