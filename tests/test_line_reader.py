"""The line reader with a length limit: plain-Python core, Beam source, ReadRawLines."""

import io
import json
import random

import apache_beam as beam
import pytest
from apache_beam.io import source_test_utils
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from sourcebeam.transforms.line_reader import (
    LimitedLineSource, Line, LineReader, ReadRawLines, too_long_dead_letter)


class CountingFile(io.BytesIO):
  """A file that counts the bytes handed out, to check that each byte is read once."""

  def __init__(self, data):
    super().__init__(data)
    self.handed_out = 0

  def read(self, n=-1):
    got = super().read(n)
    self.handed_out += len(got)
    return got


def lines_of(data, max_bytes, chunk=7):
  return list(LineReader(io.BytesIO(data), max_bytes, chunk))


def test_lines_split_like_text_files():
  data = b'a\nbb\r\n\nccc'
  got = lines_of(data, 100)
  assert [(l.offset, l.data, l.length) for l in got] == [
      (0, b'a', 1), (2, b'bb', 2), (6, b'', 0), (7, b'ccc', 3)]
  assert lines_of(b'x\n', 100) == [Line(0, b'x', 1)]  # no empty line after the last separator
  assert lines_of(b'', 100) == []


@pytest.mark.parametrize('chunk', [1, 2, 3, 5, 64 * 1024])
def test_a_line_over_the_limit_keeps_its_first_bytes_and_its_full_length(chunk):
  long = b'{"x": "' + b'y' * 1000 + b'"}'
  data = b'ok\n' + long + b'\r\n' + b'after\n' + b'z' * 11
  got = list(LineReader(io.BytesIO(data), 10, chunk))
  assert [(l.data, l.length, l.cut) for l in got] == [
      (b'ok', 2, False), (long[:10], len(long), True), (b'after', 5, False),
      (b'z' * 10, 11, True)]
  assert [l.offset for l in got] == [0, 3, 3 + len(long) + 2, 3 + len(long) + 8]


@pytest.mark.parametrize('limit', [1, 2, 3, 4])
def test_a_line_exactly_at_the_limit_is_not_cut(limit):
  for chunk in (1, 2, 3, 64):
    for ending in (b'\n', b'\r\n'):
      got = list(LineReader(io.BytesIO(b'q' * limit + ending + b'q'), limit, chunk))
      assert [(l.data, l.length) for l in got] == [(b'q' * limit, limit), (b'q', 1)]
    got = list(LineReader(io.BytesIO(b'q' * limit), limit, chunk))  # last line, no separator
    assert [(l.data, l.length) for l in got] == [(b'q' * limit, limit)]


def test_the_buffer_never_holds_more_than_the_limit_plus_one_chunk():
  """Memory by construction: a 5 MB line through a 1 KB limit and 4 KB chunks."""
  limit, chunk = 1024, 4096
  f = CountingFile(b'a' * (5 * 1024 * 1024) + b'\n' + b'b' * 100 + b'\n')
  reader = LineReader(f, limit, chunk)
  got = list(reader)
  assert [(len(l.data), l.length) for l in got] == [(limit, 5 * 1024 * 1024), (100, 100)]
  assert reader.peak_buffered <= limit + chunk + 1
  assert f.handed_out == reader.bytes_read == len(f.getvalue())  # each byte read once


def test_each_byte_is_searched_once_so_time_is_linear():
  """Time by construction: the separator search never goes back over bytes it has searched."""
  searched = []

  class Spy(bytearray):
    def find(self, sub, start=0, *a):
      found = super().find(sub, start, *a)
      searched.append((found + 1 if found >= 0 else len(self)) - start)
      return found

  f = io.BytesIO(b'c' * 200_000 + b'\n' + b'short\n' * 1000)
  reader = LineReader(f, 50_000, 1000)
  reader._buf = Spy()
  while reader.next_line() is not None:
    if type(reader._buf) is not Spy:  # pragma: no cover - the buffer is grown in place
      raise AssertionError('buffer replaced')
  assert sum(searched) == len(f.getvalue())  # every byte looked at exactly once


def test_skip_partial_line_stops_at_its_range_end():
  data = b'x' * 1000 + b'\nnext\n'
  f = CountingFile(data)
  f.seek(99)
  reader = LineReader(f, 10, 16, offset=99)
  assert reader.skip_partial_line(before=200) is False  # no line starts in [100, 200)
  assert f.handed_out <= 200 - 99 + 16
  f2 = io.BytesIO(data)
  f2.seek(99)
  reader = LineReader(f2, 10, 16, offset=99)
  assert reader.skip_partial_line(before=2000) is True
  assert reader.next_offset == 1001
  assert reader.next_line() == Line(1001, b'next', 4)


def test_too_long_dead_letter_states_limit_and_length_and_keeps_text():
  dl = too_long_dead_letter('raw.jsonl', 'é'.encode() * 5 + b'\xc3', 50_000_000, 11)
  assert dl['raw'] == 'ééééé' and 'raw_base64' not in dl  # a cut character is dropped
  assert dl['reason'] == ('event is 50000000 bytes, over the limit of 11 bytes '
                          '(--max-event-bytes): cut off while reading, the first 10 bytes kept')
  assert (dl['source'], dl['line_bytes'], dl['kept_bytes']) == ('raw.jsonl', 50_000_000, 10)


def _write_lines(tmp_path, name='in.jsonl', n=300, seed=3):
  rnd = random.Random(seed)
  lines = []
  for i in range(n):
    size = rnd.choice([0, 1, 5, 20, 80, 300])
    lines.append(b'%d:' % i + b'v' * size)
  data = b'\n'.join(lines) + b'\n'
  path = tmp_path / name
  path.write_bytes(data)
  return str(path), lines


def test_source_splits_read_every_line_once(tmp_path):
  path, lines = _write_lines(tmp_path)
  source = LimitedLineSource(path, 100)
  expected = [(path, l[:100], len(l)) for l in lines]
  assert sorted(source_test_utils.read_from_source(source)) == sorted(expected)
  for bundle in (7, 64, 500, 4096):
    splits = [(s.source, s.start_position, s.stop_position)
              for s in source.split(desired_bundle_size=bundle)]
    assert len(splits) > 1 or bundle > len(b'\n'.join(lines))
    source_test_utils.assert_sources_equal_reference_source((source, None, None), splits)


def test_source_dynamic_splits_are_exhaustively_consistent(tmp_path):
  path, _ = _write_lines(tmp_path, n=12)
  source = LimitedLineSource(path, 30, chunk_bytes=4)
  source_test_utils.assert_split_at_fraction_exhaustive(source, perform_multi_threaded_test=False)


def test_read_raw_lines_in_a_pipeline(tmp_path):
  (tmp_path / 'a.jsonl').write_bytes(b'one\n' + b'L' * 500 + b'\ntwo')
  (tmp_path / 'b.jsonl').write_bytes(b'three\n')
  with TestPipeline() as p:
    read = p | ReadRawLines(str(tmp_path / '*.jsonl'), 100)
    assert_that(read.lines | beam.MapTuple(lambda s, l: (s.rsplit('/', 1)[1], l)),
                equal_to([('a.jsonl', b'one'), ('a.jsonl', b'two'), ('b.jsonl', b'three')]),
                label='lines')
    assert_that(read.too_long | beam.Map(lambda d: (d['raw'], d['line_bytes'])),
                equal_to([('L' * 100, 500)]), label='too_long')


OPENED = []  # module level: the source is pickled (by reference) before it reads


class CountingSource(LimitedLineSource):
  def open_file(self, file_name):
    with open(file_name, 'rb') as f:
      OPENED.append(CountingFile(f.read()))
    return OPENED[-1]


def test_a_line_over_many_ranges_is_read_once_not_once_per_range(tmp_path):
  """Ranges that start inside a long line stop at their own end instead of scanning its rest."""
  path = tmp_path / 'long.jsonl'
  data = b'a\n' + b'x' * 100_000 + b'\nb\n'
  path.write_bytes(data)
  del OPENED[:]
  source = CountingSource(str(path), 50, chunk_bytes=256)
  splits = list(source.split(desired_bundle_size=1000))
  assert len(splits) > 90
  records = [r for s in splits
             for r in source_test_utils.read_from_source(s.source, s.start_position, s.stop_position)]
  assert sorted(records) == sorted([(str(path), b'a', 1), (str(path), b'x' * 50, 100_000),
                                    (str(path), b'b', 1)])
  # each range reads at most its own bytes and one chunk, plus the lines it owns
  assert len(OPENED) == len(splits)
  assert sum(f.handed_out for f in OPENED) <= 2 * len(data) + len(splits) * 256


def test_compressed_input_is_read_whole(tmp_path):
  import gzip
  path = tmp_path / 'raw.jsonl.gz'
  path.write_bytes(gzip.compress(b'one\n' + b'L' * 300 + b'\r\ntwo\n'))
  got = source_test_utils.read_from_source(LimitedLineSource(str(path), 100))
  assert got == [(str(path), b'one', 3), (str(path), b'L' * 100, 300), (str(path), b'two', 3)]
