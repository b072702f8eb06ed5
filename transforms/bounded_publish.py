"""Publishing a bounded input in key buckets: one Beam element per batch, not per event.

:class:`~sourcebeam.transforms.publish.PublishEvents` moves each event through Beam on
its own: the boundary, a shuffle to its key for the resequencer, a shuffle to its (hour,
bucket) for the archive, the JSON lines and the counts. Issue 17's profile of ``run.py
publish`` found about 330 us of CPU per event, nearly all of it Beam's per-element work;
the publishing itself (parse, validate, repair, number) was a tenth. A bounded input needs
neither per-event shuffle:

* every event of an ordering key has the key's partition key, so it falls in one
  partition-key bucket (the archive's, :func:`~sourcebeam.transforms.archive_format.bucket_of`);
* the resequencer's batch rule numbers a key from all its events at once
  (:func:`~sourcebeam.transforms.resequence_core.resequence_key`, what the batch expansion
  of :class:`~sourcebeam.transforms.resequence.Resequence` runs per key);
* an archive partition is one (hour, bucket): the bucket's published events cut by hour.

So :class:`PublishLineBatches` takes the raw lines in batches
(:class:`~sourcebeam.transforms.line_reader.ReadRawLineBatches`), checks each batch at the
publishing boundary (:func:`~sourcebeam.schemas.validation.publish_raw`) and sends its
events on as one list per bucket; each bucket, grouped once, is resequenced key by key and
written: published JSON lines, dead letters and duplicates as blocks of lines (a text sink
writes a block as its lines), its archive files hour by hour
(:class:`~sourcebeam.transforms.archive.PartitionWriter`), and its counts.

What comes out is what ``PublishEvents`` and ``WriteArchive`` give for the same input: the
same lines (in another order), the same archive files but for their run id, the same
counts. A live stream stays event by event (``run.py stream``): a live key cannot wait for
all its events. A bucket is held in memory while it is numbered: with the archive's 16
buckets, a sixteenth of the input's published events.
"""

from __future__ import annotations

import pickle
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from sourcebeam.schemas.envelope import to_json
from sourcebeam.schemas.registry import Registry, report_key
from sourcebeam.schemas.validation import DEFAULT_MAX_EVENT_BYTES, publish_raw
from sourcebeam.transforms.archive import PartitionWriter, WriteArchive
from sourcebeam.transforms.archive_format import DEFAULT_BUCKETS, bucket_of, partition_of
from sourcebeam.transforms.line_reader import too_long_dead_letter
from sourcebeam.transforms.publish import dead_letter_json, is_gap, needs_sequence, without_source
from sourcebeam.transforms.resequence import Resequence
from sourcebeam.transforms.resequence_core import (SOURCE, Resequencer, ResequenceConfig,
                                                   key_of, resequence_key)

DEAD_LETTERS = 'dead_letters'
DUPLICATES = 'duplicates'
COUNTS = 'counts'
PUBLISHED = 'published'

#: What :class:`PublishLineBatches` counts (its ``counts`` are partial dicts of these names):
#: ``in == published + dead_lettered + duplicates_dropped + held_on_gap``; ``gaps`` (dead
#: letters naming raw sequences that never came) and their ``missing_raw_sequences`` apart.
COUNTED = ('in', 'published', 'dead_lettered', 'duplicates_dropped', 'gaps',
           'missing_raw_sequences', 'held_on_gap')
ARCHIVED = 'archived'
#: Lines per block of a text output (a block is one element of the text sink).
BLOCK_LINES = 5000


class PublishedBlocks(NamedTuple):
  """What :class:`PublishLineBatches` gives."""
  published: beam.PCollection     # blocks of published JSON lines (str, lines joined by \n)
  dead_letters: beam.PCollection  # blocks of dead-letter JSON lines
  duplicates: beam.PCollection    # blocks of duplicate-record JSON lines
  counts: beam.PCollection        # partial counts {name: n}, names in COUNTED (+ ARCHIVED)


def blocks(lines: List[str], size: int = BLOCK_LINES) -> Iterable[str]:
  """``lines`` as blocks of at most ``size`` lines joined by newlines (none when empty)."""
  for i in range(0, len(lines), size):
    yield '\n'.join(lines[i:i + size])


class _CheckBatch(beam.DoFn):
  """A batch of raw lines through the publishing boundary: its events as one pickled list
  per partition-key bucket, ``(bucket, pickle of [(ordering key, envelope with its source)...])``,
  its dead letters as blocks of lines, and its counts.

  Pickled, because a local runner's grouping holds every grouped value in memory until the
  last one came, decoded (the FnApiRunner's ``GroupingBuffer``): bytes are ~200 per event
  where an envelope dict is several times that, and Beam's coder is not asked to take each
  dict apart and back (``run.py publish`` of a million events: peak 2.36 -> 1.87 GB, 16.4k ->
  18.6k events/s)."""

  def __init__(self, registry: Registry, max_event_bytes: int, require_sequence: bool,
               config: ResequenceConfig, buckets: int, source_name: Optional[str]):
    self._registry, self._limit = registry, max_event_bytes
    self._require_sequence, self._config = require_sequence, config
    self._buckets, self._source_name = buckets, source_name
    self._published = Metrics.counter('publish', 'published')
    self._repaired = Metrics.counter('publish', 'repaired')
    self._dead = Metrics.counter('publish', 'dead_lettered')

  def setup(self):
    self._rs = Resequencer(self._config)

  def process(self, batch: List[Tuple[str, bytes, int]]):
    reg, limit, require, buckets = self._registry, self._limit, self._require_sequence, self._buckets
    ordering_key = reg.ordering_key
    by_bucket: Dict[int, List[Tuple[str, Dict[str, Any]]]] = {}
    dead: List[Dict[str, Any]] = []
    repaired = events = 0
    for source, data, length in batch:
      source = self._source_name or source
      if length > limit:  # cut off while read: its first bytes kept
        dead.append(too_long_dead_letter(source, data, length, limit))
        continue
      env, dl, repairs = publish_raw(data, reg, source, limit, require)
      if env is None:
        dead.append(dl)
        continue
      repaired += bool(repairs)
      if source is not None:
        env[SOURCE] = source
      key, problem = key_of(env)
      if problem is not None:
        dead.append(self._rs.invalid_key(env, problem))
        continue
      by_bucket.setdefault(bucket_of(key, buckets), []).append((ordering_key(env), env))
      events += 1
    self._dead.inc(len(dead))
    self._published.inc(events)
    self._repaired.inc(repaired)
    for bucket, keyed in by_bucket.items():
      yield bucket, pickle.dumps(keyed, protocol=pickle.HIGHEST_PROTOCOL)
    for block in blocks([dead_letter_json(d) for d in dead]):
      yield pvalue.TaggedOutput(DEAD_LETTERS, block)
    yield pvalue.TaggedOutput(COUNTS, {'in': len(batch), 'dead_lettered': len(dead)})


class _PublishBucket(beam.DoFn):
  """One bucket's events, grouped, numbered key by key and written."""

  def __init__(self, config: ResequenceConfig, archive: Optional[PartitionWriter],
               buckets: int):
    self._config, self._archive, self._buckets = config, archive, buckets

  def setup(self):
    self._rs = Resequencer(self._config)

  def process(self, element: Tuple[int, Iterable[bytes]]):
    bucket, batches = element
    by_key: Dict[str, List[Tuple[Dict[str, Any], None]]] = {}
    for batch in batches:
      for key, env in pickle.loads(batch):
        by_key.setdefault(key, []).append((env, None))
    published: List[str] = []
    by_hour: Dict[str, List[Dict[str, Any]]] = {}
    dead: List[Dict[str, Any]] = []
    duplicates: List[Dict[str, Any]] = []
    held = 0
    for key in sorted(by_key):
      act, stats = resequence_key(self._rs, key, by_key[key])
      held += stats['held']
      for env, _ in act.published:
        env = without_source(env)
        published.append(to_json(env))
        if self._archive is not None:
          by_hour.setdefault(partition_of(env, self._buckets)[0], []).append(env)
      dead.extend(report_key(d) for d in act.dead_letters)
      duplicates.extend(report_key(d) for d in act.duplicates)
    del by_key
    gaps = [d for d in dead if is_gap(d)]
    counts = {'published': len(published), 'dead_lettered': len(dead) - len(gaps),
              'gaps': len(gaps), 'missing_raw_sequences': sum(g['count'] for g in gaps),
              'duplicates_dropped': len(duplicates), 'held_on_gap': held}
    yield from blocks(published)
    del published
    for tag, records in ((DEAD_LETTERS, dead), (DUPLICATES, duplicates)):
      for block in blocks([dead_letter_json(r) for r in records]):
        yield pvalue.TaggedOutput(tag, block)
    if self._archive is not None:
      counts[ARCHIVED] = sum(record['events'] for hour in sorted(by_hour)
                             for record in self._archive.write(hour, bucket, by_hour[hour]))
    yield pvalue.TaggedOutput(COUNTS, counts)


class PublishLineBatches(beam.PTransform):
  """Batches of raw lines (from :class:`~sourcebeam.transforms.line_reader.ReadRawLineBatches`)
  to a :class:`PublishedBlocks`, and the archive when ``archive`` (a :class:`WriteArchive`,
  whose format, buckets and run id are used) is given.

  ``registry`` is the application's schemas; ``resequence`` the keyword options of
  :class:`~sourcebeam.transforms.resequence.Resequence` (None: its defaults), checked when
  the transform is built; ``source_name`` names every line's source (for input copied to a
  temporary file first), by default its file.
  """

  def __init__(self, registry: Registry, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
               resequence: Optional[Mapping[str, Any]] = None, *,
               archive: Optional[WriteArchive] = None, source_name: Optional[str] = None):
    super().__init__()
    options = dict(resequence or {})
    self._config = Resequence(**options).config  # options checked now, not on a worker
    self._require_sequence = needs_sequence(options)
    self._registry, self._limit = registry, max_event_bytes
    self._archive, self._source_name = archive, source_name
    self._buckets = archive.buckets if archive is not None else DEFAULT_BUCKETS

  @property
  def counted(self) -> Tuple[str, ...]:
    """The names its counts carry."""
    return COUNTED + ((ARCHIVED,) if self._archive is not None else ())

  def expand(self, line_batches) -> PublishedBlocks:
    checked = line_batches | 'CheckBatches' >> beam.ParDo(_CheckBatch(
        self._registry, self._limit, self._require_sequence, self._config, self._buckets,
        self._source_name)).with_outputs(DEAD_LETTERS, COUNTS, main='events')
    writer = None
    if self._archive is not None:
      writer = self._archive.partition_writer()
      self._archive.write_manifest(line_batches.pipeline)
    out = (checked.events
           | 'GroupBuckets' >> beam.GroupByKey()
           | 'PublishBuckets' >> beam.ParDo(_PublishBucket(self._config, writer, self._buckets))
           .with_outputs(DEAD_LETTERS, DUPLICATES, COUNTS, main=PUBLISHED))
    return PublishedBlocks(
        out[PUBLISHED],
        (checked[DEAD_LETTERS], out[DEAD_LETTERS]) | 'AllDeadLetters' >> beam.Flatten(),
        out[DUPLICATES],
        (checked[COUNTS], out[COUNTS]) | 'AllCounts' >> beam.Flatten())
