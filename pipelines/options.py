"""One place for pipeline options: what every Sourcebeam pipeline passes to Beam.

``pipeline_options(beam_args)`` turns the pass-through command-line options into
``PipelineOptions``, adding what the runner needs on this machine
(:mod:`pipelines.runners`) and where storage lives (:mod:`pipelines.storage`).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, List

from apache_beam.options.pipeline_options import PipelineOptions

from sourcebeam.pipelines import runners
from sourcebeam.transforms import storage
from sourcebeam.pipelines.cli import JobBuilt


def pipeline_args(beam_args: List[str], *, streaming: bool = False) -> List[str]:
  args = storage.storage_args(runners.runner_args(beam_args))
  if streaming and not runners.has_option(args, '--streaming'):
    args.append('--streaming')
  return args


WORKER_EXTRAS_ENV = 'SOURCEBEAM_WORKER_EXTRAS'  # read by setup.py while Beam builds the sdist


def pipeline_options(beam_args: List[str], *, streaming: bool = False,
                     worker_extras: Iterable[str] = (), **overrides) -> PipelineOptions:
  """The pipeline's options. ``worker_extras``: setup.py extras (``kafka``, ``postgres``) the
  pipeline's DoFns import on their workers; when the workers install Sourcebeam from the sdist
  Beam builds (``--setup_file``), that sdist carries them."""
  args = pipeline_args(beam_args, streaming=streaming)
  extras = sorted(set(worker_extras))
  if extras and runners.has_option(args, '--setup_file'):
    os.environ[WORKER_EXTRAS_ENV] = ','.join(extras)
  return PipelineOptions(args, **overrides)


def stop_after_dry_run(p: Any, beam_args: List[str]) -> None:
  """After ``with beam.Pipeline(...) as p``: a dry run ends the command here (see
  :class:`pipelines.cli.JobBuilt`), before it looks for outputs that were never written."""
  if runners.is_dry_run(beam_args):
    raise JobBuilt(p.result.job)
