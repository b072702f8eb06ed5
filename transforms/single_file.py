"""One text file of lines from a bounded PCollection, without holding the lines in memory.

Beam's ``WriteToText(..., num_shards=1)`` sends every line through one grouping to a
single writer, and a local runner keeps a grouping's values in memory until its input
is done (the FnApiRunner's ``GroupingBuffer``, decoded, then encoded again in one piece):
a replay of 10 M events held every line of its outputs there, 2.8 M located riders among
them. :class:`WriteSingleFile` writes what a command's outputs need, one file per output,
another way: each bundle writes its lines to a part file beside the target as they come,
and one step, once every bundle is done (the parts as a side input), joins the parts into
the file in the parts' name order and removes them. Memory is a bundle's write buffer,
whatever the output's size; the lines are read back once, as blocks of bytes.

A bundle that fails and is retried leaves a part no step names; the join removes every
part of its write (named by a run id), named or not. An unbounded PCollection (a live
stream has no end to join at) is written by ``WriteToText`` as before.
"""

from __future__ import annotations

import uuid
from typing import List

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import AsList
from apache_beam.transforms.window import GlobalWindows

from sourcebeam.transforms.timing import in_global_window

__all__ = ['WriteSingleFile']

_COPY_BYTES = 1 << 20


class _WriteParts(beam.DoFn):
  """Each bundle's lines to a part file of their own; the part's path once the bundle ends."""

  def __init__(self, prefix: str):
    self._prefix = prefix

  def start_bundle(self):
    self._path, self._file = None, None

  def process(self, line: str):
    if self._file is None:
      self._path = f'{self._prefix}{uuid.uuid4().hex}'
      self._file = FileSystems.create(self._path)
    self._file.write(line.encode('utf-8'))
    self._file.write(b'\n')

  def finish_bundle(self):
    if self._file is not None:
      self._file.close()
      self._file = None
      yield GlobalWindows.windowed_value(self._path)


def _join_parts(_, path: str, prefix: str, parts: List[str]) -> str:
  """The named parts, in name order, into ``path``; then every part of this write is removed."""
  with FileSystems.create(path) as out:
    for part in sorted(parts):
      with FileSystems.open(part) as f:
        while True:
          chunk = f.read(_COPY_BYTES)
          if not chunk:
            break
          out.write(chunk)
  left = [m.path for r in FileSystems.match([f'{prefix}*']) for m in r.metadata_list]
  if left:
    FileSystems.delete(left)
  return path


class WriteSingleFile(beam.PTransform):
  """Lines (``str``, without their newline) -> the one text file at ``path``; returns a
  PCollection of that path once written. Every line ends with a newline; no line, an empty
  file. The order of the lines is not defined (as with ``WriteToText``)."""

  def __init__(self, path: str):
    super().__init__()
    self._path = path

  def expand(self, lines):
    if not lines.is_bounded:
      return lines | 'Write' >> beam.io.WriteToText(self._path, shard_name_template='',
                                                    num_shards=1)
    folder, name = FileSystems.split(self._path)
    prefix = FileSystems.join(folder, f'.{name}.part-{uuid.uuid4().hex[:12]}-')
    # A part holds lines of any window: its path is in the global one.
    parts = in_global_window(lines) | 'WriteParts' >> beam.ParDo(_WriteParts(prefix))
    return (lines.pipeline
            | 'Once' >> beam.Create([None])
            | 'JoinParts' >> beam.Map(_join_parts, self._path, prefix, AsList(parts)))
