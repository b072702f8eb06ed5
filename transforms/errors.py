"""The library's errors: what a caller did wrong, and what the data did wrong.

The library raises these and never exits; the command layer (``run.py``) turns
them into exit codes: :class:`ConfigError` is exit 2 (fix the arguments, the
application or the configuration, then run again) and :class:`DataError` is
exit 1 (the run finished or stopped because of bad data). Both carry a
one-line message meant for the person who ran the command.
"""

from __future__ import annotations

__all__ = ['SourcebeamError', 'ConfigError', 'DataError']


class SourcebeamError(Exception):
  """Base of the errors Sourcebeam raises on purpose, with a one-line message."""


class ConfigError(SourcebeamError, ValueError):
  """Arguments or configuration that cannot work: a missing archive, a bad path, an
  application that does not load, a topic that does not exist."""


class DataError(SourcebeamError):
  """Data the run could not accept: a corrupt file, events it could not apply."""
