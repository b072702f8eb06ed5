"""Where pipelines write: output directories on local disk, S3 or GCS.

One file per output (``DIR/published.jsonl``, ``DIR/cart.jsonl``...) so a person
and a test can read it whole; paths go through Beam's FileSystems, so ``DIR``
may be ``s3://`` or ``gs://``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from sourcebeam.transforms.single_file import WriteSingleFile


def join(out: str, name: str) -> str:
  return FileSystems.join(out, name) if '://' in out else os.path.join(out, name)


def prepare(out: str) -> None:
  """Create a local output directory (object stores need none)."""
  if '://' not in out:
    os.makedirs(out, exist_ok=True)


def write_lines(out: str, name: str) -> beam.PTransform:
  """A single-file text sink for ``DIR/name``."""
  return WriteSingleFile(join(out, name))


def write_json(out: str, name: str, obj: Any) -> str:
  path = join(out, name)
  with FileSystems.create(path) as f:
    f.write((json.dumps(obj, indent=2, sort_keys=True) + '\n').encode('utf-8'))
  return path


def read_lines(path: str) -> Iterator[str]:
  with FileSystems.open(path) as f:
    for line in f.read().decode('utf-8').splitlines():
      if line:
        yield line
