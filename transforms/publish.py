"""Fix the stream: raw ("tech-debt") JSON lines in, published envelopes and dead letters out.

The talk's first job for everyone: publish high-quality events. ``PublishEvents``
wraps the plain-Python publishing boundary (:func:`schemas.validation.publish_raw`)
so every raw line ends in exactly one of two outputs: ``published`` (a clean
envelope) or ``dead_letters`` (the raw line whole, with a reason a person can
act on). Nothing is dropped, so ``in == published + dead_lettered`` always.
"""

from __future__ import annotations

import json
from typing import Iterable, Tuple, Union

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from sourcebeam.schemas.registry import Registry
from sourcebeam.schemas.validation import DEFAULT_MAX_EVENT_BYTES, publish_raw

PUBLISHED = 'published'
DEAD_LETTERS = 'dead_letters'

RawLine = Union[bytes, str, Tuple[str, bytes]]


class _PublishFn(beam.DoFn):
  """One raw line to one published envelope or one dead letter."""

  def __init__(self, registry: Registry, max_event_bytes: int):
    self._registry = registry
    self._max_event_bytes = max_event_bytes
    self._repaired = Metrics.counter('publish', 'repaired')
    self._dead = Metrics.counter('publish', 'dead_lettered')
    self._published = Metrics.counter('publish', 'published')

  def process(self, element: RawLine) -> Iterable:
    source = None
    if isinstance(element, tuple):
      source, element = element
    env, dead, repairs = publish_raw(element, self._registry, source, self._max_event_bytes)
    if env is None:
      self._dead.inc()
      yield pvalue.TaggedOutput(DEAD_LETTERS, dead)
    else:
      self._published.inc()
      if repairs:
        self._repaired.inc()
      yield env


class PublishEvents(beam.PTransform):
  """Raw lines (bytes, str, or ``(source, bytes)``) to ``published`` and ``dead_letters``.

  Events are checked against ``registry``, the application's schemas (``app.registry``).
  The result has attributes ``published`` (envelope dicts) and ``dead_letters``
  (dicts with ``reason``, ``raw``, and ``source`` when known).
  """

  def __init__(self, registry: Registry, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES):
    super().__init__()
    self._registry = registry
    self._max_event_bytes = max_event_bytes

  def expand(self, raw_lines):
    return raw_lines | 'ValidateAndRepair' >> beam.ParDo(
        _PublishFn(self._registry, self._max_event_bytes)).with_outputs(DEAD_LETTERS, main=PUBLISHED)


def dead_letter_json(dead_letter: dict) -> str:
  return json.dumps(dead_letter, ensure_ascii=False, separators=(',', ':'))
