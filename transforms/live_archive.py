"""The live path archives too: a stream writes the archive in event-time windows.

Like Kinesis Firehose to S3, a live run of ``run.py stream ... --archive PATH``
writes the events it publishes to the archive while it runs, so today's live
stream is tomorrow's replay. Events are windowed in fixed event-time windows
(``window_seconds``, default one hour: the archive's own ``hour=`` partition)
and written through :class:`transforms.archive.WriteArchive` with a trigger
that fires early every ``flush_seconds`` of processing time (default 60), on
the watermark, and for late data; panes discard what they fired, so no event is
written twice. Each pane writes its own files (named by window start and pane).

Offsets. The hand-off from archive to live (:mod:`transforms.handoff`) must know
exactly which Kafka messages the archive holds. So every data file gets a
sidecar, written *after* the file is complete::

  PATH/_offsets/hour=H/bucket=B/<data file name>.json
      {"kind": "events", "file": "hour=H/bucket=B/events-...avro",
       "sources": [[topic, partition, offset], ...]}   # one per event, in file order

and every pane of dead letters (messages the publishing boundary refused: they
consume offsets too, but are not archived) gets one::

  PATH/_offsets/dead/<run id>-w<window start>-p<pane>.json
      {"kind": "dead_letters", "file": null, "sources": [[topic, partition, offset], ...]}

A sidecar exists only once its events are durable, so the offsets named by
sidecars are exactly the messages the archive covers; a crash between a data
file and its sidecar leaves offsets uncovered (and the hand-off reads them from
Kafka again), never covered without data. Messages later than
``allowed_lateness_seconds`` (default one day) behind the watermark are dropped
by Beam's windowing and are never covered: the recorded prefix stops before
them, which keeps the hand-off exact (they are read from Kafka) but stalls the
prefix until a run archives them.

Plain-Python parts (sidecar encoding and parsing, source references) are
testable without Beam.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterable, Mapping, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.transforms import trigger as beam_trigger
from apache_beam.transforms import window as beam_window
from apache_beam.utils.timestamp import Duration

from sourcebeam.transforms.archive import WriteArchive, write_bytes
from sourcebeam.transforms.archive_format import DEFAULT_BUCKETS, join
from sourcebeam.transforms.publish import (  # the one publishing step
    DEAD_LETTERS, _PublishFn, needs_sequence, numbering, resequenced, without_source)
from sourcebeam.transforms.resequence import SOURCE
from sourcebeam.schemas.registry import Registry
from sourcebeam.schemas.validation import DEFAULT_MAX_EVENT_BYTES

__all__ = [
    'SourceRef', 'OFFSETS_DIR', 'SIDECAR_VERSION', 'DEFAULT_WINDOW_SECONDS',
    'DEFAULT_FLUSH_SECONDS', 'DEFAULT_ALLOWED_LATENESS_SECONDS', 'kafka_ref', 'source_label',
    'view_source', 'sidecar_path', 'encode_sidecar', 'parse_sidecar', 'SidecarError',
    'Published', 'PublishKafkaMessages', 'ValidateKafkaMessages', 'renumber', 'ArchiveLive']

SourceRef = Tuple[str, int, int]  # (topic, partition, offset) of one Kafka message
OFFSETS_DIR = '_offsets'
DEAD_DIR = 'dead'
SIDECAR_VERSION = 1
DEFAULT_WINDOW_SECONDS = 3600
DEFAULT_FLUSH_SECONDS = 60
DEFAULT_ALLOWED_LATENESS_SECONDS = 24 * 3600
KINDS = ('events', 'dead_letters')


class SidecarError(ValueError):
  """An offsets sidecar that cannot be trusted (bad JSON, wrong shape): one-line reason."""


# ---------------------------------------------------------------------------
# Plain Python


def kafka_ref(message: Any) -> SourceRef:
  """``(topic, partition, offset)`` of a ReadFromKafka(with_metadata=True) record (or a dict)."""
  get = message.get if isinstance(message, Mapping) else (lambda k: getattr(message, k))
  return str(get('topic')), int(get('partition')), int(get('offset'))


def source_label(ref: SourceRef) -> str:
  """The label dead letters carry: ``kafka://topic/partition@offset``."""
  return f'kafka://{ref[0]}/{ref[1]}@{ref[2]}'


def view_source(ref: SourceRef) -> Dict[str, Any]:
  """A ref in the form the view store takes (``{'topic', 'partition', 'offset'}``)."""
  return {'topic': ref[0], 'partition': ref[1], 'offset': ref[2]}


def sidecar_path(archive: str, data_file: str) -> str:
  """Where the offsets of ``data_file`` (a path under ``archive``) are recorded."""
  archive = archive.rstrip('/')
  if not data_file.startswith(archive + '/'):
    raise ValueError(f'{data_file} is not under {archive}')
  return join(archive, OFFSETS_DIR, data_file[len(archive) + 1:] + '.json')


def dead_sidecar_path(archive: str, run_id: str, window_start_ms: int, pane: int) -> str:
  return join(archive, OFFSETS_DIR, DEAD_DIR, f'{run_id}-w{window_start_ms}-p{pane:04d}.json')


def encode_sidecar(kind: str, sources: Iterable[SourceRef], *, file: Optional[str],
                   run_id: str) -> bytes:
  """A sidecar's bytes; ``file`` is the data file's path relative to the archive (or None)."""
  if kind not in KINDS:
    raise ValueError(f'sidecar kind must be one of {KINDS}, not {kind!r}')
  body = {'sidecar_version': SIDECAR_VERSION, 'kind': kind, 'file': file, 'run_id': run_id,
          'sources': [[t, int(p), int(o)] for t, p, o in sources]}
  return json.dumps(body, separators=(',', ':')).encode('utf-8')


def parse_sidecar(blob: bytes, where: str) -> Dict[str, Any]:
  """A sidecar's content, checked; SidecarError naming ``where`` and the problem."""
  try:
    body = json.loads(blob)
  except (ValueError, UnicodeDecodeError) as e:
    raise SidecarError(f'{where}: not JSON ({e})') from None
  if not isinstance(body, dict) or body.get('sidecar_version') != SIDECAR_VERSION:
    raise SidecarError(f'{where}: not a version {SIDECAR_VERSION} offsets sidecar')
  if body.get('kind') not in KINDS:
    raise SidecarError(f'{where}: kind must be one of {KINDS}')
  file = body.get('file')
  if (body['kind'] == 'events') != isinstance(file, str):
    raise SidecarError(f'{where}: an events sidecar names its data file, a dead-letter one none')
  sources = body.get('sources')
  if not isinstance(sources, list):
    raise SidecarError(f'{where}: sources must be a list')
  refs = []
  for s in sources:
    if (not isinstance(s, list) or len(s) != 3 or not isinstance(s[0], str) or not s[0]
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in s[1:])):
      raise SidecarError(f'{where}: bad source {s!r} (want [topic, partition, offset])')
    refs.append((s[0], s[1], s[2]))
  return {'kind': body['kind'], 'file': file, 'run_id': str(body.get('run_id', '')),
          'sources': refs}


# ---------------------------------------------------------------------------
# Beam


class _PublishWithSource(_PublishFn):
  """The publishing boundary (same function, same metrics), keeping each message's offset."""

  def process(self, message):
    ref = kafka_ref(message)
    value = message.get('value') if isinstance(message, Mapping) else message.value
    for out in super().process((source_label(ref), bytes(value or b''))):
      if isinstance(out, pvalue.TaggedOutput):
        yield pvalue.TaggedOutput(DEAD_LETTERS, (out.value, ref))
      else:
        yield (out, ref)


class Published(NamedTuple):
  """A publish result with offsets: every Kafka message is in exactly one of ``published_refs``
  and ``dead_refs`` (dead letters, and copies dropped as duplicates: they consume offsets too).
  ``duplicates`` and ``stats`` are the resequencer's (empty when a run does not renumber)."""
  published: beam.PCollection       # envelopes
  dead_letters: beam.PCollection    # dead-letter dicts; ``source`` is kafka://topic/partition@offset
  published_refs: beam.PCollection  # (envelope, SourceRef)
  dead_refs: beam.PCollection       # (dead letter or duplicate record, SourceRef)
  duplicates: beam.PCollection      # one record per copy dropped
  stats: beam.PCollection           # the resequencer's per-key stats at the end of bounded input


def _with_ref(pair) -> Dict[str, Any]:
  env, ref = pair
  return dict(env, **{SOURCE: tuple(ref)})


def _ref_in(record: Dict[str, Any]) -> Optional[SourceRef]:
  """The message offset a resequencer report carries as its ``source``, if any."""
  ref = record.get('source')
  return tuple(ref) if isinstance(ref, (tuple, list)) and len(ref) == 3 else None


def _ref_of(record: Dict[str, Any]) -> Iterable[Tuple[Dict[str, Any], SourceRef]]:
  """A resequencer report carrying a message's offset -> ``(report, ref)`` with its ``source``
  as the message's label. Gap reports carry no offset (no message behind them): none."""
  ref = _ref_in(record)
  if ref is not None:
    yield dict(record, source=source_label(ref)), ref


def _label_source(record: Dict[str, Any]) -> Dict[str, Any]:
  ref = _ref_in(record)
  return record if ref is None else dict(record, source=source_label(ref))


def renumber(validated_refs: beam.PCollection, dead_refs: beam.PCollection, registry: Registry,
             resequence: Optional[Mapping[str, Any]], label: str = 'Renumber') -> Published:
  """Validated ``(envelope, SourceRef)`` pairs through the resequencer (``resequence``: its
  options; None keeps the sequences as they are), offsets kept: a :class:`Published`."""
  if resequence is None:
    empty = validated_refs.pipeline | f'{label} no reports' >> beam.Create([])
    return Published(validated_refs | f'{label} envelopes' >> beam.Map(lambda pair: pair[0]),
                     dead_refs | f'{label} dead letters' >> beam.Map(lambda pair: pair[0]),
                     validated_refs, dead_refs, empty, empty)
  # The streaming expansion even for a bounded read (--max-records): the batch one's grouping
  # restamps events behind a watermark already at the end, and event-time windows downstream
  # (a consumer's hourly sums, the live archive) drop them as late on Prism.
  options = {'expansion': 'streaming', **resequence}
  out = resequenced(validated_refs | f'{label} carry offsets' >> beam.Map(_with_ref), registry,
                    options, label=f'{label} resequence')
  refs = out.published | f'{label} published refs' >> beam.Map(
      lambda env: (without_source(env), env[SOURCE]))
  renumbered_dead = out.dead_letters | f'{label} dead refs' >> beam.FlatMap(_ref_of)
  dropped = out.duplicates | f'{label} duplicate refs' >> beam.FlatMap(_ref_of)
  all_dead_refs = (dead_refs, renumbered_dead, dropped) | f'{label} all dead refs' >> beam.Flatten()
  dead_letters = ((dead_refs | f'{label} boundary dead letters' >> beam.Map(lambda pair: pair[0]),
                   out.dead_letters | f'{label} labelled' >> beam.Map(_label_source))
                  | f'{label} all dead letters' >> beam.Flatten())
  return Published(refs | f'{label} envelopes' >> beam.Map(lambda pair: pair[0]), dead_letters,
                   refs, all_dead_refs,
                   out.duplicates | f'{label} labelled duplicates' >> beam.Map(_label_source),
                   out.stats)


class ValidateKafkaMessages(beam.PTransform):
  """Kafka records -> ``(validated (envelope, SourceRef), (dead letter, SourceRef))``: the
  publishing boundary against ``registry`` (the application's schemas), offsets kept."""

  def __init__(self, registry: Registry, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
               require_sequence: bool = True):
    super().__init__()
    self._registry = registry
    self._max_event_bytes = max_event_bytes
    self._require_sequence = require_sequence

  def expand(self, messages):
    results = messages | 'Publish' >> beam.ParDo(
        _PublishWithSource(self._registry, self._max_event_bytes, self._require_sequence,
                           keep_source=False)).with_outputs(DEAD_LETTERS, main='published')
    return results.published, results[DEAD_LETTERS]


class PublishKafkaMessages(beam.PTransform):
  """Kafka records -> :class:`Published`: the publishing step (the boundary against
  ``registry``, the application's schemas, then the resequencer with the options
  ``resequence``, None for its defaults; ``renumber=False`` keeps the topic's sequences, for
  a topic already published such as the event writer's), keeping each message's offset."""

  def __init__(self, registry: Registry, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
               resequence: Optional[Mapping[str, Any]] = None, *, renumber: bool = True):
    super().__init__()
    self._registry = registry
    self._max_event_bytes = max_event_bytes
    self._resequence = numbering(resequence, renumber)

  def expand(self, messages) -> Published:
    validated, dead = messages | 'Validate' >> ValidateKafkaMessages(
        self._registry, self._max_event_bytes, require_sequence=needs_sequence(self._resequence))
    return renumber(validated, dead, self._registry, self._resequence)


class _WriteEventSidecar(beam.DoFn):
  """After WriteArchive wrote a file: record the Kafka offsets of its events."""

  def __init__(self, archive: str, run_id: str):
    self._archive, self._run_id = archive.rstrip('/'), run_id

  def process(self, record):
    rel = record['path'][len(self._archive) + 1:]
    path = sidecar_path(self._archive, record['path'])
    write_bytes(path, encode_sidecar('events', record['sources'], file=rel, run_id=self._run_id))
    yield {'path': record['path'], 'sidecar': path, 'events': record['events']}


class _WriteDeadSidecar(beam.DoFn):
  """One pane of dead letters: record their offsets as covered (no data file)."""

  def __init__(self, archive: str, run_id: str):
    self._archive, self._run_id = archive.rstrip('/'), run_id

  def process(self, element, win=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
    _, refs = element
    refs = sorted(refs)
    start = -1 if isinstance(win, beam_window.GlobalWindow) else win.start.micros // 1000
    path = dead_sidecar_path(self._archive, self._run_id, start, getattr(pane, 'index', 0) or 0)
    write_bytes(path, encode_sidecar('dead_letters', refs, file=None, run_id=self._run_id))
    yield {'path': None, 'sidecar': path, 'events': 0}


def live_windows(window_seconds: int, flush_seconds: int, allowed_lateness_seconds: int,
                 bounded: bool = False) -> beam.WindowInto:
  """Fixed event-time windows that fire early (processing time), on time and late; discarding.

  Bounded input (a ``--max-records`` run, a test) has no processing time to wait
  for: it is one pane in the global window, written when the input ends (Beam's
  batch runners cannot run processing-time triggers). The global window also
  keeps what a stateful step releases when the input ends (the resequencer's
  held events, stamped with their own times behind a watermark already at the
  end): fixed windows would drop them as late, Prism does.
  """
  if bounded:
    return beam.WindowInto(beam_window.GlobalWindows())
  return beam.WindowInto(
      beam_window.FixedWindows(window_seconds),
      trigger=beam_trigger.AfterWatermark(
          early=beam_trigger.AfterProcessingTime(flush_seconds),
          late=beam_trigger.AfterProcessingTime(flush_seconds)),
      accumulation_mode=beam_trigger.AccumulationMode.DISCARDING,
      allowed_lateness=Duration(seconds=allowed_lateness_seconds))


class ArchiveLive(beam.PTransform):
  """``(published_refs, dead_refs)`` of a :class:`Published` -> archive files plus offsets sidecars.

  Returns a PCollection of ``{'path', 'sidecar', 'events'}``, one per sidecar
  written (``path`` None for dead-letter panes). Works on bounded input too (one
  pane, when the input ends), which is how a ``--max-records`` run archives.
  """

  def __init__(self, path: str, *, window_seconds: int = DEFAULT_WINDOW_SECONDS,
               flush_seconds: int = DEFAULT_FLUSH_SECONDS,
               allowed_lateness_seconds: int = DEFAULT_ALLOWED_LATENESS_SECONDS,
               format: str = 'avro', buckets: int = DEFAULT_BUCKETS,
               run_id: Optional[str] = None, registry: Optional[Registry] = None):
    super().__init__()
    if window_seconds < 1 or flush_seconds < 1 or allowed_lateness_seconds < 0:
      raise ValueError('window and flush must be at least one second, lateness not negative')
    self._path = path.rstrip('/')
    self._window, self._flush, self._lateness = window_seconds, flush_seconds, allowed_lateness_seconds
    self._write = WriteArchive(self._path, format, buckets, registry=registry, run_id=run_id,
                               with_sources=True)
    self.run_id = self._write.run_id

  def expand(self, pcolls):
    published_refs, dead_refs = pcolls
    bounded = published_refs.is_bounded and dead_refs.is_bounded
    windows = lambda: live_windows(self._window, self._flush, self._lateness, bounded)
    files = (published_refs
             | 'Window events' >> windows()
             | 'WriteArchive' >> self._write
             | 'RecordOffsets' >> beam.ParDo(_WriteEventSidecar(self._path, self.run_id)))
    dead = (dead_refs
            | 'Window dead letters' >> windows()
            | 'DeadRefs' >> beam.Map(lambda pair: ('dead', pair[1]))
            | 'GroupDead' >> beam.GroupByKey()
            | 'RecordDeadOffsets' >> beam.ParDo(_WriteDeadSidecar(self._path, self.run_id)))
    return (files, dead) | 'Sidecars' >> beam.Flatten()
