"""One place for pipeline options: what every Sourcebeam pipeline passes to Beam.

``pipeline_options(beam_args)`` turns the pass-through command-line options into
``PipelineOptions``, adding what the runner needs on this machine
(:mod:`pipelines.runners`) and where storage lives (:mod:`pipelines.storage`).
"""

from __future__ import annotations

from typing import List

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import runners, storage


def pipeline_args(beam_args: List[str], *, streaming: bool = False) -> List[str]:
  args = storage.storage_args(runners.runner_args(beam_args))
  if streaming and not runners.has_option(args, '--streaming'):
    args.append('--streaming')
  return args


def pipeline_options(beam_args: List[str], *, streaming: bool = False,
                     **overrides) -> PipelineOptions:
  return PipelineOptions(pipeline_args(beam_args, streaming=streaming), **overrides)


def is_dry_run(beam_args: List[str]) -> bool:
  """True when the runner only builds the job (``--dry_run=True`` on the DataflowRunner)."""
  value = runners.option_value(beam_args, '--dry_run')
  return value is not None and value.lower() in ('true', '1', 'yes')


DRY_RUN_MESSAGE = 'dry run: the job was built and validated, not run; nothing was written'
