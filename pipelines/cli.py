"""What every subcommand shares: one-line errors, exit codes and progress lines.

Bad arguments (the command's :class:`UsageError`, the library's
:class:`~sourcebeam.transforms.errors.ConfigError`) end with one line on stderr
and exit code 2, never a traceback;
a run that finished but found bad data (a corrupt archive file, say) exits 1, and
so does a pipeline that failed while running (one line with the cause; set
``SOURCEBEAM_DEBUG=1`` to see the traceback).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional


from sourcebeam.transforms.errors import ConfigError, DataError  # the library's: exit 2 and 1


class UsageError(ConfigError):
  """Arguments that cannot work (missing input, bad option): exit 2 with this message."""


class JobBuilt(Exception):
  """A dry run (``--dry_run=True`` on the DataflowRunner) built the job and ran nothing.

  There is no output to summarize, so the command stops here: exit 0, with what
  would be submitted (:func:`describe_job`) as one JSON object on stdout.
  """

  def __init__(self, job: Any):
    super().__init__('dry run')
    self.job = job


class Terminated(KeyboardInterrupt):
  """SIGTERM, raised like Ctrl-C so that Beam's own clean-up runs: the runner's job server and
  the Java expansion services are this process's children and would otherwise outlive it."""


def _terminate(signum: int, frame: Any) -> None:
  raise Terminated()


def run_command(module: Any, args: Any, beam_args: List[str],
                own_options: Optional[List[str]] = None) -> int:
  """Run a subcommand's ``main``; with ``own_options`` (its option strings), pass-through
  options that look like misspellings of them or of Beam's are refused first
  (:mod:`pipelines.pass_through`)."""
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _terminate)
  try:
    if own_options is not None:
      from sourcebeam.pipelines.pass_through import check_pass_through
      check_pass_through(beam_args, own_options, getattr(args, 'command', None) or '')
    from sourcebeam.pipelines.runners import WORKER_PATH_ARGS, check_worker_paths
    check_worker_paths(beam_args, {name: getattr(args, name, None) for name in WORKER_PATH_ARGS})
    return int(module.main(args, beam_args) or 0)
  except ConfigError as e:  # the command's UsageError and the library's own
    print(f'error: {e}', file=sys.stderr)
    return 2
  except DataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  except JobBuilt as built:
    print(json.dumps(describe_job(built.job), sort_keys=True))
    print('dry run: the job was built and validated, not run; nothing was written',
          file=sys.stderr)
    return 0
  except Terminated:
    print('terminated', file=sys.stderr)
    return 143
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return 130
  except Exception as e:  # a pipeline that failed while running: say why in one line
    if os.environ.get('SOURCEBEAM_DEBUG'):
      raise
    print(f'error: {type(e).__name__}: {_first_line(e)} '
          f'(set SOURCEBEAM_DEBUG=1 for the traceback)', file=sys.stderr)
    return 1


def describe_job(job: Any) -> Dict[str, Any]:
  """What a Dataflow job built by a dry run would run: its name, batch or streaming, its
  top-level steps, and each environment's container and staged files (Sourcebeam itself
  is ``workflow.tar.gz``, built from setup.py; a Kafka read adds Beam's Java container)."""
  from apache_beam.portability.api import beam_runner_api_pb2 as api
  components = job.proto_pipeline.components
  root = components.transforms[job.proto_pipeline.root_transform_ids[0]]
  steps = [components.transforms[t].unique_name for t in root.subtransforms]
  environments = []
  for env in components.environments.values():
    staged = [api.ArtifactStagingToRolePayload.FromString(d.role_payload).staged_name
              for d in env.dependencies if d.role_urn == 'beam:artifact:role:staging_to:v1']
    image = (api.DockerPayload.FromString(env.payload).container_image
             if env.urn == 'beam:env:docker:v1' else None)
    environments.append({'urn': env.urn, 'container_image': image, 'staged': sorted(staged)})
  return {'dry_run': True, 'job_name': job.proto.name,
          'type': json.loads(job.json())['type'],
          'steps': steps, 'transforms': len(components.transforms),
          'environments': sorted(environments, key=lambda e: e['container_image'] or '')}


def _first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[0][:500] if lines else 'no message'


class Progress:
  """Numbered stage lines on stderr, with the time each stage took."""

  def __init__(self, total: int, quiet: bool = False):
    self.total, self.n, self.quiet = total, 0, quiet
    self._t = None

  def stage(self, text: str) -> None:
    self.done()
    self.n += 1
    self._t = time.monotonic()
    if not self.quiet:
      print(f'[{self.n}/{self.total}] {text} ...', file=sys.stderr, flush=True)

  def done(self) -> None:
    if self._t is not None and not self.quiet:
      print(f'      done in {time.monotonic() - self._t:.1f}s', file=sys.stderr, flush=True)
    self._t = None
