"""``--app MODULE:ATTR``: which application a command runs (the demo without it).

Every command that runs consumers or reads an application's events takes
``--app``. ``MODULE`` is imported with the current directory first on
``sys.path`` (a team's project is the folder the command runs in), ``ATTR``
(default ``app``) must be a :class:`sourcebeam.App`. Anything wrong is one
line and exit 2 before a pipeline starts: a module that cannot be imported
(with the error it raised), no such attribute, not an App, a schema folder that
is missing or invalid, a consumer registered wrongly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional

from sourcebeam.pipelines.cli import UsageError
from sourcebeam.transforms.app import App
from sourcebeam.transforms.errors import ConfigError

DEFAULT_APP = 'sourcebeam.demo:app'


def add_app_argument(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--app', metavar='MODULE:ATTR', default=None,
                      help='the application to run: a module (imported from the current '
                           f'directory) and its App attribute (default: {DEFAULT_APP}, the demo '
                           'of retail, taxi and riders)')


def load_app(spec: Optional[str]) -> App:
  """The App named by ``--app`` (the demo for None); UsageError saying what is wrong."""
  spec = spec or DEFAULT_APP
  module_name, _, attr = spec.partition(':')
  attr = attr or 'app'
  if not module_name or not all(part.isidentifier() for part in module_name.split('.')) or (
      not attr.isidentifier()):
    raise UsageError(f'--app {spec!r} must look like MODULE:ATTR, e.g. orders.app:app')
  cwd = os.getcwd()
  if cwd not in sys.path:
    sys.path.insert(0, cwd)
  try:
    module = importlib.import_module(module_name)
  except ConfigError as e:  # the app's own registration refused something
    raise UsageError(f'--app {spec}: {e}') from None
  except ModuleNotFoundError as e:
    if e.name and (module_name == e.name or module_name.startswith(e.name + '.')):
      raise UsageError(f'--app {spec}: no module named {e.name!r} (looked in {cwd} and on '
                       'the Python path)') from None
    raise UsageError(f'--app {spec}: importing {module_name} failed: {e}') from None
  except Exception as e:  # the module's own code failed: say where, in one line
    raise UsageError(f'--app {spec}: importing {module_name} failed: '
                     f'{type(e).__name__}: {e}') from None
  if not hasattr(module, attr):
    raise UsageError(f'--app {spec}: module {module_name} has no attribute {attr!r}')
  app = getattr(module, attr)
  if not isinstance(app, App):
    raise UsageError(f'--app {spec}: {module_name}.{attr} is a {type(app).__name__}, not a '
                     'sourcebeam.App')
  ship_by_value(module_name)
  return app


def ship_by_value(module_name: str) -> None:
  """Pickle the application's code by value, so remote workers run it without having it.

  Beam pickles a DoFn's classes and functions by reference (module and name) unless
  cloudpickle is told otherwise, and a team's application is not installed on a Flink
  cluster's worker pools or on Dataflow's workers (only Sourcebeam is, from
  setup.py). Registering the app's top-level package makes every module of it travel
  inside the pipeline instead. Sourcebeam's own modules (the demo) stay by reference.
  """
  top = module_name.split('.')[0]
  if top == 'sourcebeam':
    return
  from apache_beam.internal import cloudpickle
  cloudpickle.register_pickle_by_value(sys.modules[top])
