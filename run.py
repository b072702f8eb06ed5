#!/usr/bin/env python3
"""Sourcebeam's one entry point in a checkout; installed, the same is the ``sourcebeam`` command.

See :mod:`sourcebeam.pipelines.command` (``run.py --help``).
"""

import sys

from sourcebeam.pipelines.command import build_parser, main  # noqa: F401 (tests call run.main)

if __name__ == '__main__':
  sys.exit(main())
