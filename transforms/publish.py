"""Fix the stream: raw ("tech-debt") JSON lines in, a published stream and dead letters out.

The talk's first job for everyone: publish high-quality events. ``PublishEvents``
is the publishing step, in two parts:

1. the publishing boundary (:func:`schemas.validation.publish_raw`): each raw line
   validated against the application's schemas and repaired where it can be, or
   dead-lettered with a reason a person can act on;
2. the resequencer (:class:`transforms.resequence.Resequence`): every key space's
   partition key numbered 1, 2, 3 ... in raw order, without holes or repeats;
   duplicates dropped and counted, conflicts and holes dead-lettered (a hole after
   a bounded wait, or at the end of bounded input), each published event keeping
   its ``raw_sequence``.

Nothing is dropped without a count: ``in == published + dead_lettered +
duplicates_dropped`` always (the ``gap`` dead letters, which name missing raw
sequences, carry no input event and are counted apart as ``gaps``).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, NamedTuple, Optional, Tuple, Union

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from sourcebeam.schemas.envelope import compact_json
from sourcebeam.schemas.registry import Registry, report_key
from sourcebeam.schemas.validation import DEFAULT_MAX_EVENT_BYTES, publish_raw
from sourcebeam.transforms.resequence import EVENT_TIME, GAP, SOURCE, Resequence, Resequenced

PUBLISHED = 'published'
DEAD_LETTERS = 'dead_letters'

RawLine = Union[bytes, str, Tuple[str, bytes]]


class _PublishFn(beam.DoFn):
  """One raw line to one published envelope or one dead letter."""

  def __init__(self, registry: Registry, max_event_bytes: int, require_sequence: bool = True,
               keep_source: bool = False):
    self._registry = registry
    self._max_event_bytes = max_event_bytes
    self._require_sequence = require_sequence
    self._keep_source = keep_source  # the line's source rides along for the resequencer
    self._repaired = Metrics.counter('publish', 'repaired')
    self._dead = Metrics.counter('publish', 'dead_lettered')
    self._published = Metrics.counter('publish', 'published')

  def process(self, element: RawLine) -> Iterable:
    source = None
    if isinstance(element, tuple):
      source, element = element
    env, dead, repairs = publish_raw(element, self._registry, source, self._max_event_bytes,
                                     self._require_sequence)
    if env is not None and self._keep_source and source is not None:
      env[SOURCE] = source
    if env is None:
      self._dead.inc()
      yield pvalue.TaggedOutput(DEAD_LETTERS, dead)
    else:
      self._published.inc()
      if repairs:
        self._repaired.inc()
      yield env


class Published(NamedTuple):
  """What the publishing step gives."""
  published: beam.PCollection     # envelopes: 1, 2, 3 ... per key, with raw_sequence
  dead_letters: beam.PCollection  # {reason, raw, source...}: refused lines, conflicts, gaps...
  duplicates: beam.PCollection    # one record per copy dropped (duplicates_dropped)
  stats: beam.PCollection         # the resequencer's per-key stats (transforms.resequence)


def resequenced(validated: beam.PCollection, registry: Registry, options: Mapping[str, Any],
                label: str = 'Resequence') -> Resequenced:
  """Validated envelopes (each may carry its ``_source``) through the resequencer with
  ``options`` (:class:`Resequence`'s keywords), numbered per key space
  (``registry.ordering_key``); reports say the partition key and the key space."""
  out = validated | label >> Resequence(key_fn=registry.ordering_key, **options)
  return Resequenced(out.published,
                     out.dead_letters | f'{label} dead letter keys' >> beam.Map(report_key),
                     out.duplicates | f'{label} duplicate keys' >> beam.Map(report_key),
                     out.stats | f'{label} stats keys' >> beam.Map(report_key))


def without_source(env: Dict[str, Any]) -> Dict[str, Any]:
  """A published envelope without the source it carried through the resequencer."""
  if SOURCE in env:
    env = dict(env)
    del env[SOURCE]
  return env


def is_gap(dead_letter: Dict[str, Any]) -> bool:
  """A dead letter naming missing raw sequences (no input event behind it)."""
  return dead_letter.get('reason') == GAP


def numbering(resequence: Optional[Mapping[str, Any]], renumber: bool) -> Optional[Dict[str, Any]]:
  """The resequencer's options a publishing step runs with: ``resequence`` (None for its
  defaults), or None when it keeps the raw sequences (``renumber=False``)."""
  return dict(resequence or {}) if renumber else None


def needs_sequence(options: Optional[Mapping[str, Any]]) -> bool:
  """Whether the boundary refuses an event without a raw sequence: unless it is numbered in
  event-time order."""
  return (options or {}).get('order_by') != EVENT_TIME


class PublishEvents(beam.PTransform):
  """Raw lines (bytes, str, or ``(source, bytes)``) to a :class:`Published` stream.

  Events are checked against ``registry``, the application's schemas (``app.registry``),
  then numbered per key space and key by the resequencer with ``resequence``, the keyword
  options of :class:`~sourcebeam.transforms.resequence.Resequence` (None: its defaults).
  ``renumber=False`` publishes the raw sequences as they are, holes and repeats included:
  only for a stream already published, such as the event writer's. Dead letters are dicts
  with ``reason``, ``raw``, and ``source`` when known.
  """

  def __init__(self, registry: Registry, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
               resequence: Optional[Mapping[str, Any]] = None, *, renumber: bool = True):
    super().__init__()
    self._registry = registry
    self._max_event_bytes = max_event_bytes
    self._options = numbering(resequence, renumber)
    if self._options is not None:
      Resequence(**self._options)  # options checked now, not on a worker

  def expand(self, raw_lines) -> Published:
    options = self._options
    validated = raw_lines | 'ValidateAndRepair' >> beam.ParDo(
        _PublishFn(self._registry, self._max_event_bytes,
                   require_sequence=needs_sequence(options),
                   keep_source=options is not None)).with_outputs(DEAD_LETTERS, main=PUBLISHED)
    if options is None:
      empty = raw_lines.pipeline | 'NoReports' >> beam.Create([])
      return Published(validated[PUBLISHED], validated[DEAD_LETTERS], empty, empty)
    out = resequenced(validated[PUBLISHED], self._registry, options)
    return Published(
        out.published | 'WithoutSource' >> beam.Map(without_source),
        (validated[DEAD_LETTERS], out.dead_letters) | 'AllDeadLetters' >> beam.Flatten(),
        out.duplicates, out.stats)


def dead_letter_json(dead_letter: dict) -> str:
  return compact_json(dead_letter)
