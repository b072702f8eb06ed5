"""Which expansion a transform with two takes: one rule for every such transform.

``ProcessInOrder``, ``Resequence`` and ``KeyedStateMachine`` each have a batch
expansion (a grouping per key, for bounded input) and a streaming one (state and
timers per key); ``expansion='auto'`` picks by whether the input is bounded.
"""

from __future__ import annotations

import apache_beam as beam

from sourcebeam.transforms.errors import ConfigError

__all__ = ['EXPANSIONS', 'check_expansion', 'chosen_expansion']

EXPANSIONS = ('auto', 'batch', 'streaming')


def check_expansion(expansion: str) -> str:
  if expansion not in EXPANSIONS:
    raise ConfigError(f"expansion must be 'auto', 'batch' or 'streaming', got {expansion!r}")
  return expansion


def chosen_expansion(expansion: str, pcoll: beam.PCollection) -> str:
  """``expansion`` itself, or for ``'auto'``: batch for bounded input, streaming otherwise."""
  if expansion != 'auto':
    return expansion
  return 'batch' if pcoll.is_bounded else 'streaming'
