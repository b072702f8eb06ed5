"""Count what goes in and what comes out, inside the pipeline.

Counts are computed from the data itself (``Count.Globally`` per output) and
written as one small JSON object next to the outputs, so they hold on every
runner (local, Flink, Dataflow) and for outputs on S3 or GCS, without relying
on a runner's metrics API.
"""

from __future__ import annotations

import json
from typing import Dict

import apache_beam as beam
from apache_beam.transforms import window
from apache_beam.io.filesystems import FileSystems


class WriteCounts(beam.PTransform):
  """``{name: PCollection}`` to one JSON file ``{name: count}`` at ``path``."""

  def __init__(self, path: str):
    super().__init__()
    self._path = path

  def expand(self, pcolls: Dict[str, beam.PCollection]):
    counted = [
        pc
        | f'Global {name}' >> beam.WindowInto(window.GlobalWindows())
        | f'Count {name}' >> beam.combiners.Count.Globally()
        | f'Name {name}' >> beam.Map(lambda n, name=name: (name, n))
        for name, pc in sorted(pcolls.items())
    ]
    return (
        counted
        | 'AllCounts' >> beam.Flatten()
        | 'ToDict' >> beam.combiners.ToDict()
        | 'ToJson' >> beam.Map(lambda d: json.dumps(d, sort_keys=True))
        | 'Write' >> beam.io.WriteToText(self._path, shard_name_template='', num_shards=1))


def read_counts(path: str) -> Dict[str, int]:
  """The counts a finished pipeline wrote with :class:`WriteCounts`."""
  with FileSystems.open(path) as f:
    return json.loads(f.read().decode('utf-8'))
