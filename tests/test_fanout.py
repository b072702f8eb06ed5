"""FanOut in a Beam pipeline (DirectRunner): every matching event delivered once, in per-key order.

Sinks are real archives on local disk, read back with the archive reader.
"""

import collections
import json
import random

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to

from tests.demo import DEMO_SCHEMAS, REG  # noqa: F401
from sourcebeam.transforms.archive import iter_archive, list_archive_files, read_archive_file
from sourcebeam.transforms.fanout import MATCHED, UNMATCHED, FanOut, prepare_archive_sinks
from sourcebeam.transforms.fanout_core import naive_match, parse_subscribers
from tests.cli import run_cli as _run_cli
T0 = 1_795_000_000_000


def envelope(key, seq, etype, minute=0):
  data = ({'user_id': key, 'product_id': 'p-1', 'quantity': 1} if etype.startswith('Cart')
          else {'user_id': key, 'product_id': 'p-1'} if etype == 'ProductViewed'
          else {'product_id': key, 'name': 'n', 'brand': 'b', 'description': 'd', 'category': 'c'})
  return {'event_id': f'{key}-{seq}', 'event_type': etype, 'schema_version': 1,
          'partition_key': key, 'sequence': seq, 'event_time': T0 + minute * 60_000 + seq,
          'origin': 'test', 'follows_from': None, 'raw_sequence': None, 'data': data}


def make_events():
  """Users with cart and view events, products created; spread over two hours."""
  events = []
  for u in range(12):
    key = f'u-{u:03d}'
    for seq in range(1, 31):
      etype = ('CartItemAdded', 'CartItemRemoved', 'ProductViewed')[seq % 3]
      events.append(envelope(key, seq, etype, minute=seq * 3))
  for p in range(5):
    events.append(envelope(f'p-{p:03d}', 1, 'ProductCreated', minute=p))
  return events


def subscriber_doc(tmp_path):
  return {'subscribers': [
      {'name': 'everything', 'sink': str(tmp_path / 'everything')},
      {'name': 'carts', 'event_types': ['CartItemAdded', 'CartItemRemoved'],
       'sink': str(tmp_path / 'carts')},
      {'name': 'some-users', 'keys': ['u-00[1-3]', 'u-010'], 'sink': str(tmp_path / 'some-users')},
      {'name': 'views-u00', 'event_types': ['ProductViewed'], 'keys': ['u-00*'],
       'sink': str(tmp_path / 'views-u00')},
      {'name': 'catalog', 'event_types': ['ProductCreated'], 'sink': str(tmp_path / 'catalog')},
      {'name': 'nobody', 'event_types': ['RoleAdded'], 'sink': str(tmp_path / 'nobody')},
  ]}


def delivered_in_order(path):
  """A subscriber archive's events, file by file in name order (one worker's delivery order)."""
  out = []
  for f in sorted(list_archive_files(path), key=lambda f: f.path):
    out.extend(read_archive_file(f.path, REG))
  return out


def test_every_matching_event_once_in_per_key_order(tmp_path):
  subs = parse_subscribers(subscriber_doc(tmp_path), REG.event_types)
  prepare_archive_sinks(subs)
  events = make_events()
  shuffled = events + [events[5], events[40]]  # two copies the ordering step must drop
  random.Random(3).shuffle(shuffled)
  shuffled.append({**envelope('u-000', 99, 'CartItemAdded'), 'partition_key': 17})  # invalid key
  with beam.Pipeline() as p:
    # max_buffered=7: many flushes, so order across files is exercised, not just within one.
    result = p | beam.Create(shuffled) | FanOut(subs, registry=REG, max_buffered=7, run_id='t1')
    totals = result.counts | beam.CombinePerKey(sum)
    want = collections.Counter()
    for e in events:
      for i in naive_match(subs, e['event_type'], e['partition_key']):
        want[subs[i].name] += 1
      want[MATCHED if naive_match(subs, e['event_type'], e['partition_key']) else UNMATCHED] += 1
    assert_that(totals, equal_to(list(want.items())), label='Counts')
    assert_that(result.unprocessed | beam.Map(lambda r: (r['reason'], r['sequence'])),
                equal_to([('duplicate', events[5]['sequence']), ('duplicate', events[40]['sequence']),
                          ('invalid_key', None)]), label='Unprocessed')
  assert want['nobody'] == 0 and want['everything'] == len(events)
  for s in subs:
    got = delivered_in_order(s.sink.target)
    expected = [e for e in events if naive_match([s], e['event_type'], e['partition_key'])]
    assert sorted(e['event_id'] for e in got) == sorted(e['event_id'] for e in expected), s.name
    per_key = collections.defaultdict(list)
    for e in got:
      per_key[e['partition_key']].append(e['sequence'])
    for key, seqs in per_key.items():
      assert seqs == sorted(seqs), (s.name, key, seqs)
    by_id = {e['event_id']: e for e in expected}
    assert all(e == by_id[e['event_id']] for e in got), s.name


def test_a_key_with_a_gap_is_held_not_skipped(tmp_path):
  subs = parse_subscribers({'subscribers': [{'name': 'all', 'sink': str(tmp_path / 'all')}]},
                           REG.event_types)
  prepare_archive_sinks(subs)
  events = [envelope('u-1', s, 'ProductViewed') for s in (1, 2, 4, 5)]
  with beam.Pipeline() as p:
    result = p | beam.Create(events) | FanOut(subs, registry=REG, run_id='t2')
    assert_that(result.status | beam.Map(lambda s: (s['key'], s['last_processed'], s['buffered'])),
                equal_to([('u-1', 2, 2)]))
  assert [e['sequence'] for e in iter_archive(str(tmp_path / 'all'), REG)] == [1, 2]


def test_deflate_archive_sinks_read_back(tmp_path):
  subs = parse_subscribers({'subscribers': [{'name': 'all', 'sink': str(tmp_path / 'all')}]},
                           REG.event_types)
  prepare_archive_sinks(subs)
  events = make_events()
  with beam.Pipeline() as p:
    _ = p | beam.Create(events) | FanOut(subs, registry=REG, archive_codec='deflate')
  assert sorted(e['event_id'] for e in iter_archive(str(tmp_path / 'all'), REG)) == sorted(
      e['event_id'] for e in events)


def run_cli(*args):
  return _run_cli('fanout', *args)


@pytest.mark.cli
def test_cli_fans_out_an_archive_and_counts_in_and_out(tmp_path):
  from sourcebeam.transforms.archive import WriteArchive
  events = make_events()
  src = str(tmp_path / 'source')
  with beam.Pipeline() as p:
    _ = p | beam.Create(events) | WriteArchive(src, registry=REG)
  doc = subscriber_doc(tmp_path)
  (tmp_path / 'subs.json').write_text(json.dumps(doc))
  proc = run_cli('--subscribers', str(tmp_path / 'subs.json'), '--source', src,
                 '--out', str(tmp_path / 'out'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  subs = parse_subscribers(doc, REG.event_types)
  for s in subs:
    n = sum(1 for e in events if naive_match([s], e['event_type'], e['partition_key']))
    assert summary['deliveries'][s.name] == n == sum(1 for _ in iter_archive(s.sink.target, REG))
  assert summary['in'] == summary['events'] == len(events)
  assert summary['delivered_events'] + summary['unmatched'] == len(events)
  assert json.loads(proc.stdout.strip().splitlines()[-1])['deliveries'] == summary['deliveries']


@pytest.mark.cli
@pytest.mark.parametrize('args, words', [
    (['--source', 'kafka://nohost/t'], ['kafka://HOST:PORT/TOPIC']),
    (['--source', '/does/not/exist'], ['/does/not/exist']),
    (['--source', 'kafka://127.0.0.1:9/t', '--max-records', '0'], ['--max-records']),
])
def test_cli_bad_arguments_are_one_line_and_exit_2(tmp_path, args, words):
  (tmp_path / 'subs.json').write_text(json.dumps(subscriber_doc(tmp_path)))
  proc = run_cli('--subscribers', str(tmp_path / 'subs.json'), '--out', str(tmp_path / 'o'), *args)
  assert proc.returncode == 2, proc.stderr
  assert 'Traceback' not in proc.stderr
  for w in words:
    assert w in proc.stderr


@pytest.mark.cli
def test_cli_bad_subscriber_file_is_exit_2(tmp_path):
  (tmp_path / 'subs.json').write_text(json.dumps({'subscribers': [{'name': 'x', 'sink': '/a',
                                                                   'event_types': ['Nope']}]}))
  proc = run_cli('--subscribers', str(tmp_path / 'subs.json'), '--source', str(tmp_path),
                 '--out', str(tmp_path / 'o'))
  assert proc.returncode == 2
  assert "subscriber 'x'" in proc.stderr and 'Nope' in proc.stderr and 'Traceback' not in proc.stderr
