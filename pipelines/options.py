"""One place for pipeline options: what every Sourcebeam pipeline passes to Beam.

``pipeline_options(beam_args)`` turns the pass-through command-line options into
``PipelineOptions``, adding what the runner needs on this machine
(:mod:`pipelines.runners`) and where storage lives (:mod:`pipelines.storage`).
Commands build their pipelines with :class:`Pipeline`, which cancels the job when
the command is stopped while it waits.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, List

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from sourcebeam.pipelines import runners, worker_tuning
from sourcebeam.transforms import storage
from sourcebeam.pipelines.cli import JobBuilt


def pipeline_args(beam_args: List[str], *, streaming: bool = False) -> List[str]:
  args = storage.storage_args(runners.runner_args(beam_args))
  if streaming and not runners.has_option(args, '--streaming'):
    args.append('--streaming')
  if not runners.has_option(args, '--streaming'):
    worker_tuning.batch_gc_thresholds()  # a bounded run: see there
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


class Pipeline(beam.Pipeline):
  """``beam.Pipeline`` whose ``with`` block cancels the job when the wait for it is stopped.

  ``run.py`` turns Ctrl-C and SIGTERM into ``KeyboardInterrupt``. A job whose job server
  is the command's own child ends with it anyway, but a job on a Flink cluster, or on the
  running job server (``run.py services up jobserver``), would go on without the process
  that submitted it (a live stream: reading Kafka for ever). Cancelling is best effort: a
  runner that cannot cancel says so in one line and the command still stops.
  """

  def __exit__(self, exc_type, exc_val, exc_tb):
    try:
      return super().__exit__(exc_type, exc_val, exc_tb)
    except KeyboardInterrupt:
      result = getattr(self, 'result', None)  # set once the job is submitted
      if result is not None:
        try:
          result.cancel()
        except Exception as e:  # noqa: BLE001 (any runner's refusal; the stop goes on)
          print(f'could not cancel the job: {type(e).__name__}: {e}'.splitlines()[0],
                file=sys.stderr)
      raise


def stop_after_dry_run(p: Any, beam_args: List[str]) -> None:
  """After ``with beam.Pipeline(...) as p``: a dry run ends the command here (see
  :class:`pipelines.cli.JobBuilt`), before it looks for outputs that were never written."""
  if runners.is_dry_run(beam_args):
    raise JobBuilt(p.result.job)
