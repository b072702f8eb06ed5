"""Count what goes in and what comes out, inside the pipeline.

Counts are computed from the data itself (each output counted per bundle, summed) and
written as one small JSON object next to the outputs, so they hold on every
runner (local, Flink, Dataflow) and for outputs on S3 or GCS, without relying
on a runner's metrics API.
"""

from __future__ import annotations

import json
from typing import Dict, Iterable

import apache_beam as beam
from apache_beam.transforms import window
from apache_beam.io.filesystems import FileSystems

from sourcebeam.transforms.single_file import WriteSingleFile
from sourcebeam.transforms.timing import in_global_window


class _CountBundle(beam.DoFn):
  """Elements counted as they pass: one ``{name: n}`` per bundle that had any."""

  def __init__(self, name: str):
    self._name = name

  def start_bundle(self):
    self._n = 0

  def process(self, _):
    self._n += 1

  def finish_bundle(self):
    if self._n:
      yield window.GlobalWindows.windowed_value({self._name: self._n})


def count_per_bundle(pcoll: beam.PCollection, name: str) -> beam.PCollection:
  """``pcoll``'s elements counted per bundle, as partial counts ``{name: n}`` in the global
  window (to sum with :class:`WriteSummedCounts`): one step per element. ``Count.Globally``
  took three and its pre-combining, and a replay of a million events counts ~700,000 output
  elements this way."""
  # (hourly outputs...: a partial count is in no one window of theirs)
  pcoll = in_global_window(pcoll, f'Global {name}')
  return pcoll | f'Count {name}' >> beam.ParDo(_CountBundle(name))


class WriteCounts(beam.PTransform):
  """``{name: PCollection}`` to one JSON file ``{name: count}`` at ``path``."""

  def __init__(self, path: str):
    super().__init__()
    self._path = path

  def expand(self, pcolls: Dict[str, beam.PCollection]):
    partial = [count_per_bundle(pc, name) for name, pc in sorted(pcolls.items())]
    return (partial
            | 'AllCounts' >> beam.Flatten()
            | 'Sum' >> WriteSummedCounts(self._path, sorted(pcolls)))


class WriteSummedCounts(beam.PTransform):
  """Partial counts, dicts ``{name: n}`` (from a step that counts in bulk, one per batch), to
  the same file as :class:`WriteCounts`: their sums, with every name in ``names`` (0 if none
  counted it)."""

  def __init__(self, path: str, names: Iterable[str]):
    super().__init__()
    self._path = path
    self._zero = {name: 0 for name in names}

  def expand(self, partial_counts):
    return (
        (partial_counts | 'Global' >> beam.WindowInto(window.GlobalWindows()),
         partial_counts.pipeline | 'Zero' >> beam.Create([self._zero]))
        | 'AllCounts' >> beam.Flatten()
        | 'Sum' >> beam.CombineGlobally(_SumCounts()).without_defaults()
        | 'Write' >> _WriteCountsFile(self._path))


class _SumCounts(beam.CombineFn):

  def create_accumulator(self) -> Dict[str, int]:
    return {}

  def add_input(self, acc: Dict[str, int], counts: Dict[str, int]) -> Dict[str, int]:
    for name, n in counts.items():
      acc[name] = acc.get(name, 0) + n
    return acc

  def merge_accumulators(self, accs):
    out: Dict[str, int] = {}
    for acc in accs:
      self.add_input(out, acc)
    return out

  def extract_output(self, acc: Dict[str, int]) -> Dict[str, int]:
    return acc


class _WriteCountsFile(beam.PTransform):
  """One ``{name: count}`` dict to the JSON file at ``path``."""

  def __init__(self, path: str):
    super().__init__()
    self._path = path

  def expand(self, counts):
    return (counts
            | 'ToJson' >> beam.Map(lambda d: json.dumps(d, sort_keys=True))
            | 'Write' >> WriteSingleFile(self._path))


def read_counts(path: str) -> Dict[str, int]:
  """The counts a finished pipeline wrote with :class:`WriteCounts`."""
  with FileSystems.open(path) as f:
    return json.loads(f.read().decode('utf-8'))
