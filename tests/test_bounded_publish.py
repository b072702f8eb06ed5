"""Publishing a bounded input in key buckets gives what publishing event by event gives."""

import json
import os
from collections import Counter

import apache_beam as beam
from apache_beam.io import source_test_utils

from tests.demo import REG  # noqa: F401
from sourcebeam.generators import faults, retail, riders, taxi
from sourcebeam.generators.jsonl import encode_line
from sourcebeam.pipelines import publish
from sourcebeam.pipelines.apps import load_app
from sourcebeam.schemas.envelope import to_json
from sourcebeam.transforms.archive import WriteArchive, archive_partitions, iter_partition
from sourcebeam.transforms.bounded_publish import blocks
from sourcebeam.transforms.line_reader import LimitedLineSource, ReadRawLines
from sourcebeam.transforms.publish import PublishEvents, dead_letter_json

LIMIT = 2000


def messy_input(directory):
  """Two raw files of the demo's domains with duplicates, malformed lines, holes (the
  malformed lines' raw sequences), reordering, a blank line and a line over the limit."""
  os.makedirs(directory)
  timed = ((t, encode_line(e)) for t, e in retail.timed_retail_events(400, 3))
  lines = list(faults.inject(timed, faults.Faults(duplicates=0.05, malformed=0.05,
                                                  out_of_order_s=30), 3))
  lines += [encode_line(e) for e in taxi.taxi_envelopes(20, 3)]
  lines += [b'', b'{"event_type": "CartItemAdded", "data": "' + b'x' * LIMIT + b'"}']
  lines += [encode_line(e) for e in riders.rider_events(2, 3)]
  half = len(lines) // 2
  for name, part in (('a.jsonl', lines[:half]), ('b.jsonl', lines[half:])):
    with open(os.path.join(directory, name), 'wb') as f:
      f.write(b'\n'.join(part) + b'\n')
  return len(lines)


def publish_event_by_event(pattern, out, archive):
  """The publishing step one event per element: PublishEvents and WriteArchive."""
  with beam.Pipeline() as p:
    read = p | ReadRawLines(pattern, LIMIT)
    result = read.lines | PublishEvents(REG, LIMIT)
    dead = (result.dead_letters, read.too_long) | 'Dead' >> beam.Flatten()
    for name, pcoll, fmt in (('published', result.published, to_json),
                             ('dead_letters', dead, dead_letter_json),
                             ('duplicates', result.duplicates, dead_letter_json)):
      pcoll | f'{name} json' >> beam.Map(fmt) | f'write {name}' >> beam.io.WriteToText(
          os.path.join(out, f'{name}.jsonl'), shard_name_template='', num_shards=1)
    result.published | WriteArchive(archive, registry=REG)


def archive_contents(archive):
  """(hour, bucket) -> the events of its files in file order, file by file."""
  return {part: [[e for e in iter_partition([f], REG)] for f in sorted(files, key=lambda f: f.path)]
          for part, files in archive_partitions(archive).items()}


def lines(path):
  with open(path, encoding='utf-8') as f:
    return Counter(f.read().splitlines())


def test_the_same_lines_archive_and_counts_as_publishing_event_by_event(tmp_path, monkeypatch):
  n = messy_input(tmp_path / 'raw')
  pattern = str(tmp_path / 'raw' / '*.jsonl')
  publish_event_by_event(pattern, str(tmp_path / 'each'), str(tmp_path / 'each-archive'))
  # Small batches, so a key's events come in many batches from both files.
  monkeypatch.setattr(publish, 'BATCH_LINES', 7)
  summary = publish.run(pattern, str(tmp_path / 'buckets'), [], load_app(None),
                        archive=str(tmp_path / 'bucket-archive'), max_event_bytes=LIMIT)

  for name in ('published', 'dead_letters', 'duplicates'):
    expected = lines(tmp_path / 'each' / f'{name}.jsonl')
    assert lines(tmp_path / 'buckets' / f'{name}.jsonl') == expected, name
  assert archive_contents(str(tmp_path / 'bucket-archive')) == archive_contents(
      str(tmp_path / 'each-archive'))
  published = sum(lines(tmp_path / 'each' / 'published.jsonl').values())
  dead = [json.loads(l) for l in lines(tmp_path / 'each' / 'dead_letters.jsonl').elements()]
  gaps = [d for d in dead if d['reason'] == 'gap']
  duplicates = sum(lines(tmp_path / 'each' / 'duplicates.jsonl').values())
  assert gaps and duplicates and len(dead) > len(gaps)  # the input exercised every output
  assert {k: summary[k] for k in ('in', 'published', 'dead_lettered', 'duplicates_dropped',
                                  'gaps', 'missing_raw_sequences', 'held_on_gap', 'archived')} == {
      'in': n, 'published': published, 'dead_lettered': len(dead) - len(gaps),
      'duplicates_dropped': duplicates, 'gaps': len(gaps),
      'missing_raw_sequences': sum(g['count'] for g in gaps), 'held_on_gap': 0,
      'archived': published}


def test_blocks_join_lines_and_give_none_for_none():
  assert list(blocks([])) == []
  assert list(blocks(['a', 'b', 'c'], size=2)) == ['a\nb', 'c']


def test_line_batches_cover_every_line_once_across_split_ranges(tmp_path):
  path = tmp_path / 'lines.txt'
  expected = [f'line {i} ' * (i % 5) for i in range(300)]
  path.write_bytes('\n'.join(expected).encode() + b'\n')
  source = LimitedLineSource(str(path), 100, batch_lines=8)
  got = []
  splits = list(source.split(desired_bundle_size=500))
  assert len(splits) > 3
  for split in splits:
    for batch in source_test_utils.read_from_source(split.source, split.start_position,
                                                    split.stop_position):
      assert 1 <= len(batch) <= 8
      got.extend(data.decode() for _, data, _ in batch)
  assert got == expected
