"""Reading lines with a length limit: a line longer than the limit is cut off while it is read.

A reader that reads a whole line before it looks at its length lets one very long
line take time and memory without bound (a 16 MB line took 35 s through Beam's
text source, a 50 MB one did not finish in 4 minutes). Here the limit applies
*while reading*:

* :class:`LineReader` is the plain-Python core (no Beam): it reads a binary file
  in chunks of ``chunk_bytes``, and hands out :class:`Line` records. A line of at
  most ``max_bytes`` comes out whole; a longer one comes out with its first
  ``max_bytes`` bytes and its full length, and the rest of it is read and
  counted but never kept. Its buffer never holds more than
  ``max_bytes + chunk_bytes + 1`` bytes (``peak_buffered`` says how many it
  did), and every byte is searched for the separator once, so time is linear in
  the input whatever the lines look like.
* :class:`LimitedLineSource` is a Beam ``FileBasedSource`` over the core: local,
  ``s3://`` and ``gs://`` files and globs, compressed files by extension, and
  uncompressed files split into byte ranges like Beam's text source (a line
  belongs to the range its first byte is in; a range that starts inside a line
  skips to the next line start and never scans past its own end for it, so a
  line that spans many ranges is still read once).
* :class:`ReadRawLines` is what a publishing step reads with: every line as
  ``(source, bytes)``, and every line over the limit as a dead letter instead
  (the first bytes kept, the reason stating the limit and the line's length),
  so ``in == lines + too_long`` and nothing is dropped.

Lines end at ``\\n``; a ``\\r`` before it is not part of the line (as in Beam's
text source). A last line without a separator is a line; a file that ends with
a separator has no empty line after it. Empty lines are lines (of length 0).
"""

from __future__ import annotations

import dataclasses
from typing import BinaryIO, Iterator, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io import filebasedsource
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics

from sourcebeam.schemas.validation import dead_letter

__all__ = ['Line', 'LineReader', 'LimitedLineSource', 'ReadRawLines', 'RawLines', 'ReadRawLineBatches',
           'too_long_reason', 'too_long_dead_letter', 'DEFAULT_CHUNK_BYTES', 'LINES', 'TOO_LONG']

DEFAULT_CHUNK_BYTES = 64 * 1024
LINES = 'lines'
TOO_LONG = 'too_long'
_NL = b'\n'


@dataclasses.dataclass(frozen=True)
class Line:
  """One line: its byte offset in the file, its bytes (at most the limit) and its full length."""
  offset: int
  data: bytes
  length: int

  @property
  def cut(self) -> bool:
    """True when the line was longer than the limit and ``data`` is only its first bytes."""
    return self.length > len(self.data)


class LineReader:
  """Lines of a binary file object, each cut off at ``max_bytes`` while it is read.

  ``offset`` is the file position the object is at (for ``Line.offset``). Use
  :meth:`skip_partial_line` first when that position may be inside a line.
  """

  def __init__(self, fileobj: BinaryIO, max_bytes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               offset: int = 0):
    if max_bytes < 1 or chunk_bytes < 1:
      raise ValueError('max_bytes and chunk_bytes must be at least 1')
    self._f, self._max, self._chunk = fileobj, max_bytes, chunk_bytes
    self._buf = bytearray()
    self._start = 0         # where the unread part of _buf starts
    self._scan = 0          # where the search for the next separator resumes (>= _start)
    self._base = offset     # file offset of _buf[0]
    self._eof = False
    self.peak_buffered = 0  # the most bytes _buf ever held
    self.bytes_read = 0

  # -- reading chunks

  def _fill(self) -> bool:
    """Append one chunk to the buffer (dropping what was consumed); False at end of file."""
    if self._eof:
      return False
    chunk = self._f.read(self._chunk)
    if not chunk:
      self._eof = True
      return False
    if self._start:
      del self._buf[:self._start]
      self._base += self._start
      self._scan -= self._start
      self._start = 0
    self._buf += chunk
    self.bytes_read += len(chunk)
    self.peak_buffered = max(self.peak_buffered, len(self._buf))
    return True

  @property
  def next_offset(self) -> int:
    """The file offset where the next line starts."""
    return self._base + self._start

  def has_more(self) -> bool:
    """True if another line follows (reads at most one chunk to find out)."""
    return self._start < len(self._buf) or self._fill()

  def skip_partial_line(self, before: Optional[int] = None) -> bool:
    """Skip to just after the next separator; the bytes skipped are never kept.

    Returns False, having read no further than offset ``before`` (plus one chunk),
    when no line starts before ``before`` (or before end of file).
    """
    while True:
      i = self._buf.find(_NL, self._scan)
      if i >= 0:
        self._start = self._scan = i + 1
        return before is None or self.next_offset < before
      # nothing to keep: drop what was searched
      self._start = self._scan = len(self._buf)
      if before is not None and self.next_offset + 1 >= before:
        return False
      if not self._fill():
        return False

  def next_line(self) -> Optional[Line]:
    """The next line, or None at end of file."""
    offset = self.next_offset
    while True:
      i = self._buf.find(_NL, self._scan)
      if i >= 0:
        end = i - 1 if i > self._start and self._buf[i - 1] == 0x0D else i
        data = bytes(self._buf[self._start:min(end, self._start + self._max)])
        length = end - self._start
        self._start = self._scan = i + 1
        return Line(offset, data, length)
      self._scan = len(self._buf)
      if len(self._buf) - self._start > self._max + 1:  # +1: a '\r' that may end the line
        return self._cut_line(offset)
      if not self._fill():
        if self._start == len(self._buf):
          return None
        length = len(self._buf) - self._start
        data = bytes(self._buf[self._start:self._start + self._max])
        self._start = self._scan = len(self._buf)
        return Line(offset, data, length)

  def _cut_line(self, offset: int) -> Line:
    """A line already longer than the limit: keep its first bytes, count the rest."""
    kept = bytes(self._buf[self._start:self._start + self._max])
    length = len(self._buf) - self._start
    last = self._buf[-1:]
    self._start = self._scan = len(self._buf)
    while self._fill():
      i = self._buf.find(_NL, self._scan)
      if i >= 0:
        before = self._buf[i - 1:i] if i > self._start else last
        length += i - self._start - (1 if before == b'\r' else 0)
        self._start = self._scan = i + 1
        return Line(offset, kept, length)
      length += len(self._buf) - self._start
      last = self._buf[-1:]
      self._start = self._scan = len(self._buf)
    return Line(offset, kept, length)

  def __iter__(self) -> Iterator[Line]:
    while True:
      line = self.next_line()
      if line is None:
        return
      yield line


# ---------------------------------------------------------------------------
# Dead letters for lines over the limit


def too_long_reason(length: int, limit: int, kept: int) -> str:
  return (f'event is {length} bytes, over the limit of {limit} bytes (--max-event-bytes): '
          f'cut off while reading, the first {kept} bytes kept')


def _utf8_prefix(data: bytes) -> bytes:
  """``data`` without a UTF-8 character cut in two at its end (so a text line stays text)."""
  for back in range(1, min(4, len(data)) + 1):
    b = data[-back]
    if b < 0x80:
      return data
    if b >= 0xC0:  # a lead byte: is its character complete?
      need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
      return data if back >= need else data[:-back]
  return data


def too_long_dead_letter(source: Optional[str], data: bytes, length: int, limit: int) -> dict:
  """The dead letter of a line cut off at ``limit`` bytes: its first bytes and why."""
  kept = _utf8_prefix(data)
  dl = dead_letter(kept, too_long_reason(length, limit, len(kept)), source)
  dl.update(line_bytes=length, kept_bytes=len(kept))
  return dl


# ---------------------------------------------------------------------------
# Beam


class LimitedLineSource(filebasedsource.FileBasedSource):
  """Lines of the files matching ``pattern`` as ``(file name, first bytes, full length)``.

  A line over ``max_line_bytes`` has only its first ``max_line_bytes`` bytes (see
  :class:`LineReader`). Uncompressed files are split into byte ranges. With
  ``batch_lines`` N the records come as lists of up to N consecutive lines of one range:
  one element per N lines, for a step that handles lines in bulk (a bounded publish).
  """

  def __init__(self, pattern: str, max_line_bytes: int, *,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES,
               compression_type: str = CompressionTypes.AUTO, validate: bool = False,
               batch_lines: int = 0):
    super().__init__(pattern, compression_type=compression_type, splittable=True,
                     validate=validate)
    if max_line_bytes < 1:
      raise ValueError('max_line_bytes must be at least 1')
    if batch_lines < 0:
      raise ValueError('batch_lines must be 0 (one record per line) or more')
    self._max, self._chunk, self._batch = max_line_bytes, chunk_bytes, batch_lines

  def read_records(self, file_name, range_tracker):
    if not self._batch:
      yield from self._records(file_name, range_tracker)
      return
    batch = []
    for record in self._records(file_name, range_tracker):
      batch.append(record)
      if len(batch) == self._batch:
        yield batch
        batch = []
    if batch:
      yield batch

  def _records(self, file_name, range_tracker):
    start = range_tracker.start_position()
    with self.open_file(file_name) as f:
      if start > 0:
        f.seek(start - 1)
        reader = LineReader(f, self._max, self._chunk, offset=start - 1)
        if not reader.skip_partial_line(before=range_tracker.stop_position()):
          return
      else:
        reader = LineReader(f, self._max, self._chunk)
      while reader.has_more() and range_tracker.try_claim(reader.next_offset):
        line = reader.next_line()
        if line is None:
          return
        yield file_name, line.data, line.length

  def output_type_hint(self):
    record = beam.typehints.Tuple[str, bytes, int]
    return beam.typehints.List[record] if self._batch else record


class RawLines(NamedTuple):
  """What :class:`ReadRawLines` reads."""
  lines: beam.PCollection     # (source, bytes): every line within the limit
  too_long: beam.PCollection  # dead letters: lines over the limit, first bytes kept


class _SplitTooLong(beam.DoFn):

  def __init__(self, limit: int, source_name: Optional[str]):
    self._limit, self._source_name = limit, source_name
    self._too_long = Metrics.counter('read_lines', 'too_long')

  def process(self, record: Tuple[str, bytes, int]):
    source, data, length = record
    source = self._source_name or source
    if length > self._limit:
      self._too_long.inc()
      yield pvalue.TaggedOutput(TOO_LONG, too_long_dead_letter(source, data, length, self._limit))
    else:
      yield source, data


class ReadRawLines(beam.PTransform):
  """Raw lines of the files matching ``pattern``, each line within ``max_line_bytes``.

  Returns :class:`RawLines`: ``lines`` as ``(source, bytes)`` and ``too_long``
  as dead letters (``reason``, ``raw`` = the first bytes, ``source``,
  ``line_bytes``, ``kept_bytes``). ``source_name`` names every line's source
  (for input copied to a temporary file first, such as stdin); by default it is
  the file's path.
  """

  def __init__(self, pattern: str, max_line_bytes: int, *, source_name: Optional[str] = None,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    super().__init__()
    self._source = LimitedLineSource(pattern, max_line_bytes, chunk_bytes=chunk_bytes)
    self._limit, self._source_name = max_line_bytes, source_name

  def expand(self, pbegin) -> RawLines:
    read = (pbegin
            | 'Read' >> beam.io.Read(self._source)
            | 'SplitTooLong' >> beam.ParDo(_SplitTooLong(self._limit, self._source_name))
            .with_outputs(TOO_LONG, main=LINES))
    return RawLines(read[LINES], read[TOO_LONG])


class ReadRawLineBatches(beam.PTransform):
  """The lines of the files matching ``pattern`` in lists of up to ``batch_lines``
  ``(file name, first bytes, full length)`` records, for a step that handles lines in bulk
  and dead-letters those over the limit itself (a line's length over ``max_line_bytes``
  says it was cut off while read; see :class:`ReadRawLines` for one line per element)."""

  def __init__(self, pattern: str, max_line_bytes: int, batch_lines: int = 1000, *,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    super().__init__()
    if batch_lines < 1:
      raise ValueError('batch_lines must be at least 1')
    self._source = LimitedLineSource(pattern, max_line_bytes, chunk_bytes=chunk_bytes,
                                     batch_lines=batch_lines)

  def expand(self, pbegin):
    return pbegin | 'Read' >> beam.io.Read(self._source)
