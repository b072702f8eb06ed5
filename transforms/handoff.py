"""Replay the archive, then attach to the live stream: no gap, no duplicate.

A live run with ``--archive`` (:mod:`transforms.live_archive`) records, beside
every archive file, the Kafka offset of each of its events, and the offsets of
the dead letters it did not archive. From those records:

* :func:`recorded_offsets` gives, per ``(topic, partition)``, the next offset to
  read: one past the *contiguous* prefix of offsets the archive covers, starting
  at the first offset it recorded. Windows close out of offset order (event time
  is not offset order), so offsets past a gap may be archived too; they are
  outside the prefix.
* :class:`ReplayThenLive` emits the archive's events whose offsets are inside the
  prefix (each offset once, even when two runs archived it), then Kafka from the
  recorded offsets, through the publishing boundary. Offsets past the prefix
  come only from Kafka, so nothing is missed or doubled at the hand-off. The
  publishing step numbers each key from its first raw event, so the archive's
  events go through the resequencer again with the live ones, as the raw events
  they were (their ``raw_sequence``): each key is numbered on from where the
  archive left it, and the archived events get the sequences they had.
* :class:`ReadKafkaFrom` reads a topic from exactly given per-partition offsets.

How ReadKafkaFrom starts at given offsets: Beam's ``ReadFromKafka`` takes no
per-partition start offsets, but it starts a partition at its consumer group's
committed offset when there is one (measured on Prism with the 2.70 expansion
service, on both the bounded read behind ``max_num_records`` and the unbounded
splittable read). So ReadKafkaFrom commits the offsets to a fresh consumer group
with confluent_kafka before the pipeline starts and reads with that group;
partitions without a recorded offset have no commit and start at the earliest.
A filter that drops offsets below the recorded ones stays behind the read as a
safety net: a runner path that ignored the commits would re-read the retained
log from the earliest offset but still hand over exactly. If Kafka no longer
retains a recorded offset (retention moved past it), the events between would
be lost, so that is an error before the pipeline starts.

The plan (which files, which offsets) is fixed when the pipeline is built, so
the Kafka read and the replay agree on one set of offsets.
"""

from __future__ import annotations

import bisect
import dataclasses
import uuid
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms import window as beam_window

from sourcebeam.schemas.registry import Registry
from sourcebeam.transforms.errors import ConfigError
from sourcebeam.transforms.archive import check_archive_path, ensure_storage_options, read_archive_file
from sourcebeam.transforms.archive_format import join
from sourcebeam.transforms.kafka_read import ReadKafkaMessages, partition_offsets
from sourcebeam.transforms.live_archive import (
    DEAD_DIR, OFFSETS_DIR, Published, SidecarError, ValidateKafkaMessages, parse_sidecar,
    renumber)
from sourcebeam.transforms.publish import needs_sequence, numbering

__all__ = ['TopicPartition', 'Ranges', 'recorded_offsets', 'plan_handoff', 'HandoffPlan',
           'ReadKafkaFrom', 'ReplayThenLive', 'HandoffError', 'kafka_start_check', 'commit_offsets']

TopicPartition = Tuple[str, int]
Ranges = List[Tuple[int, int]]  # sorted, disjoint, half-open [lo, hi)


class HandoffError(ConfigError):
  """The archive cannot be handed off to this source (one line saying why)."""


# ---------------------------------------------------------------------------
# Offset ranges (plain Python)


def to_ranges(offsets: Iterable[int]) -> Ranges:
  """Offsets -> sorted disjoint half-open ranges."""
  out: Ranges = []
  for o in sorted(set(offsets)):
    if out and out[-1][1] == o:
      out[-1] = (out[-1][0], o + 1)
    else:
      out.append((o, o + 1))
  return out


def union(a: Ranges, b: Ranges) -> Ranges:
  out: Ranges = []
  for lo, hi in sorted(a + b):
    if out and lo <= out[-1][1]:
      out[-1] = (out[-1][0], max(out[-1][1], hi))
    else:
      out.append((lo, hi))
  return out


def subtract(a: Ranges, b: Ranges) -> Ranges:
  """Offsets in ``a`` and not in ``b``."""
  out: Ranges = []
  for lo, hi in a:
    for blo, bhi in b:
      if bhi <= lo or blo >= hi:
        continue
      if blo > lo:
        out.append((lo, blo))
      lo = max(lo, bhi)
      if lo >= hi:
        break
    if lo < hi:
      out.append((lo, hi))
  return out


def clip(a: Ranges, lo: int, hi: int) -> Ranges:
  return [(max(l, lo), min(h, hi)) for l, h in a if min(h, hi) > max(l, lo)]


def contains(a: Ranges, offset: int) -> bool:
  i = bisect.bisect_right(a, (offset, float('inf'))) - 1
  return i >= 0 and a[i][0] <= offset < a[i][1]


def prefix(covered: Ranges) -> Tuple[int, int]:
  """``(first, next)``: the contiguous run of covered offsets from the first one."""
  return covered[0] if covered else (0, 0)


# ---------------------------------------------------------------------------
# The plan


@dataclasses.dataclass(frozen=True)
class ReplayItem:
  """One archive file to replay: only events whose offsets are in ``allowed``."""
  data_file: str
  sidecar: str
  allowed: Dict[TopicPartition, Ranges]


@dataclasses.dataclass(frozen=True)
class HandoffPlan:
  offsets: Dict[TopicPartition, int]      # next offset to read from Kafka
  starts: Dict[TopicPartition, int]       # first offset the archive recorded
  items: List[ReplayItem]                 # files to replay, each with its allowed offsets
  archived_events: int                    # events the replay will emit


def _sidecar_patterns(archive: str) -> List[str]:
  return [join(archive, OFFSETS_DIR, 'hour=*', 'bucket=*', '*.json'),
          join(archive, OFFSETS_DIR, DEAD_DIR, '*.json')]


def _read(path: str) -> bytes:
  with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return f.read()


def read_sidecars(archive: str) -> List[Tuple[str, Dict[str, Any]]]:
  """Every offsets sidecar of the archive, ``(path, content)``, in (run id, path) order.

  HandoffError for a sidecar that cannot be read: the hand-off cannot be exact
  without it.
  """
  ensure_storage_options()
  archive = archive.rstrip('/')
  paths: List[str] = []
  for result in FileSystems.match(_sidecar_patterns(archive)):
    paths.extend(m.path for m in result.metadata_list)
  out = []
  for path in paths:
    try:
      out.append((path, parse_sidecar(_read(path), path)))
    except SidecarError as e:
      raise HandoffError(f'cannot hand off from {archive}: {e}') from None
  return sorted(out, key=lambda pc: (pc[1]['run_id'], pc[0]))


def plan_from_sidecars(archive: str, sidecars: Sequence[Tuple[str, Dict[str, Any]]]
                       ) -> HandoffPlan:
  """Prefix per partition, and which events of which file to replay (plain Python)."""
  archive = archive.rstrip('/')
  per_sidecar: List[Dict[TopicPartition, Ranges]] = []
  covered: Dict[TopicPartition, Ranges] = {}
  for _, body in sidecars:
    byp: Dict[TopicPartition, List[int]] = {}
    for t, p, o in body['sources']:
      byp.setdefault((t, p), []).append(o)
    ranges = {tp: to_ranges(offs) for tp, offs in byp.items()}
    per_sidecar.append(ranges)
    for tp, r in ranges.items():
      covered[tp] = union(covered.get(tp, []), r)
  starts = {tp: prefix(r)[0] for tp, r in covered.items()}
  offsets = {tp: prefix(r)[1] for tp, r in covered.items()}
  claimed: Dict[TopicPartition, Ranges] = {}
  items: List[ReplayItem] = []
  events = 0
  for (path, body), ranges in zip(sidecars, per_sidecar):
    allowed: Dict[TopicPartition, Ranges] = {}
    for tp, r in ranges.items():
      mine = subtract(clip(r, starts[tp], offsets[tp]), claimed.get(tp, []))
      if mine:
        allowed[tp] = mine
        claimed[tp] = union(claimed.get(tp, []), mine)
    if body['kind'] == 'events' and allowed:
      items.append(ReplayItem(join(archive, body['file']), path, allowed))
      events += sum(1 for t, p, o in body['sources']
                    if (t, p) in allowed and contains(allowed[(t, p)], o))
  return HandoffPlan(offsets, starts, items, events)


def plan_handoff(archive: str, topic: Optional[str] = None) -> HandoffPlan:
  """The hand-off plan of the archive at ``archive``; HandoffError if it has no offsets,
  or (with ``topic``) if it recorded offsets of other topics."""
  check_archive_path(archive)
  sidecars = read_sidecars(archive)
  if not sidecars:
    raise HandoffError(
        f'archive {archive} has no recorded Kafka offsets ({OFFSETS_DIR}/ is empty): only an '
        'archive written by `run.py stream --archive` can hand off to a live stream')
  plan = plan_from_sidecars(archive, sidecars)
  if topic is not None:
    topics = sorted({t for t, _ in plan.offsets})
    if topics != [topic]:
      raise HandoffError(f'archive {archive} recorded offsets of topic(s) {", ".join(topics)}, '
                         f'not of {topic}: hand off to the topic it archived')
  return plan


def recorded_offsets(archive_path: str) -> Dict[TopicPartition, int]:
  """Per ``(topic, partition)``: the next offset to read, one past the contiguous archived prefix."""
  return dict(plan_handoff(archive_path).offsets)


# ---------------------------------------------------------------------------
# Kafka


def kafka_start_check(bootstrap: str, topic: str, offsets: Dict[TopicPartition, int]
                      ) -> Dict[int, Tuple[int, int]]:
  """``{partition: (low, high)}`` of the topic; HandoffError if a recorded offset is gone.

  A recorded offset below the partition's low watermark means Kafka deleted
  events the archive does not hold: the hand-off would miss them.
  """
  marks, _ = partition_offsets(bootstrap, topic)
  for (t, p), offset in sorted(offsets.items()):
    if t != topic:
      continue
    if p not in marks:
      raise HandoffError(f'the archive recorded partition {p} of {topic}, which has only '
                         f'{len(marks)} partitions at {bootstrap}')
    low, high = marks[p]
    if offset < low:
      raise HandoffError(f'{topic}/{p}: the archive ends at offset {offset} but Kafka keeps only '
                         f'offsets from {low}: offsets {offset}..{low - 1} are in neither')
    if offset > high:
      raise HandoffError(f'{topic}/{p}: the archive recorded offsets up to {offset} but the '
                         f'partition ends at {high}: is this the topic the archive came from?')
  return marks


def commit_offsets(bootstrap: str, group_id: str, offsets: Dict[TopicPartition, int]) -> None:
  """Commit ``offsets`` (next offset to read per partition) to consumer group ``group_id``."""
  from confluent_kafka import Consumer, KafkaException, TopicPartition as KTP
  if not offsets:
    return
  consumer = Consumer({'bootstrap.servers': bootstrap, 'group.id': group_id,
                       'enable.auto.commit': False})
  try:
    consumer.commit(offsets=[KTP(t, p, o) for (t, p), o in sorted(offsets.items())],
                    asynchronous=False)
  except KafkaException as e:
    raise HandoffError(f'cannot commit the hand-off offsets to {bootstrap}: {e}') from None
  finally:
    consumer.close()


class ReadKafkaFrom(beam.PTransform):
  """Kafka records of ``topic`` from exactly ``offsets`` (per ``(topic, partition)``).

  Partitions without a recorded offset start at the earliest. ``max_records``
  bounds the read to that many records at or after the offsets (so a bounded
  run ends). Yields ReadFromKafka(with_metadata=True) records, timestamped
  with their Kafka CreateTime. The offsets are committed to a fresh consumer
  group when the pipeline is built: see the module docstring.
  """

  def __init__(self, bootstrap: str, topic: str, offsets: Dict[TopicPartition, int], *,
               max_records: Optional[int] = None, expansion_service=None):
    super().__init__()
    self._expansion_service = expansion_service
    self._bootstrap, self._topic = bootstrap, topic
    self._offsets = {(t, int(p)): int(o) for (t, p), o in offsets.items() if t == topic}
    self._max_records = max_records
    self.group_id = f'sourcebeam-handoff-{uuid.uuid4().hex[:12]}'

  def expand(self, pbegin):
    kafka_start_check(self._bootstrap, self._topic, self._offsets)
    commit_offsets(self._bootstrap, self.group_id, self._offsets)
    offsets, topic = dict(self._offsets), self._topic
    return (
        pbegin
        | 'ReadKafka' >> ReadKafkaMessages(self._bootstrap, topic, self.group_id, self._max_records,
                                         expansion_service=self._expansion_service)
        | 'FromOffsets' >> beam.Filter(  # safety net: see the module docstring
            lambda m: int(m.offset) >= offsets.get((topic, int(m.partition)), 0)))


# ---------------------------------------------------------------------------
# Replay then live


class _ReplayFile(beam.DoFn):
  """One archive file's events whose offsets the plan gives it: ``(envelope, SourceRef)``."""

  def __init__(self, registry: Registry):
    self._registry = registry

  def process(self, item: ReplayItem):
    body = parse_sidecar(_read(item.sidecar), item.sidecar)
    events = read_archive_file(item.data_file, self._registry)  # CorruptArchiveFile fails the run: see below
    if len(events) != len(body['sources']):
      # The file and its offsets disagree: replaying part would miss or double events.
      raise HandoffError(f'cannot hand off: {item.data_file} has {len(events)} events but its '
                         f'sidecar {item.sidecar} records {len(body["sources"])} offsets')
    for env, ref in zip(events, body['sources']):
      allowed = item.allowed.get((ref[0], ref[1]))
      if allowed and contains(allowed, ref[2]):
        yield beam_window.TimestampedValue((env, ref), env['event_time'] / 1000.0)


class HandoffResult(NamedTuple):
  """What :class:`ReplayThenLive` gives: a :class:`transforms.live_archive.Published` over
  archive + live, plus ``messages`` (one element per offset consumed, from the
  archive or Kafka: the ``in`` count) and ``live`` (the Kafka part alone, e.g. to
  archive it again)."""
  published: beam.PCollection
  dead_letters: beam.PCollection
  published_refs: beam.PCollection
  dead_refs: beam.PCollection
  duplicates: beam.PCollection
  stats: beam.PCollection
  messages: beam.PCollection
  live: Published


def as_raw(pair: Tuple[Dict[str, Any], Any]) -> Tuple[Dict[str, Any], Any]:
  """An archived (published) envelope as the raw event it was published from: its
  ``raw_sequence`` back as its sequence (an archive written before ``raw_sequence`` holds
  the raw sequence as the sequence itself)."""
  env, ref = pair
  raw = env.get('raw_sequence')
  return dict(env, sequence=env['sequence'] if raw is None else raw, raw_sequence=None), ref


def _is_live(ref: Any, offsets: Dict[TopicPartition, int]) -> bool:
  return int(ref[2]) >= offsets.get((ref[0], int(ref[1])), 0)


class ReplayThenLive(beam.PTransform):
  """PBegin -> the archive's events up to the recorded offsets, then Kafka from them.

  ``source`` is ``(bootstrap, topic)`` (e.g. :class:`transforms.kafka_url.KafkaTopic`);
  ``registry`` the application's schemas (archived events are read, live ones published, with them).
  Returns a :class:`HandoffResult`; its ``published`` is the published stream:
  every offset of the topic from the archive's first recorded one, exactly once.
  Archived events carry their event time as timestamp; Kafka ones their CreateTime.
  ``max_records`` bounds the Kafka part (records after the recorded offsets);
  ``expansion_service`` is the Kafka read's (see :class:`ReadKafkaMessages`);
  ``resequence`` the publishing step's numbering options (None: its defaults;
  ``renumber=False`` keeps the topic's sequences).
  HandoffError (a ConfigError) when the pipeline is built, if the archive has no
  recorded offsets, recorded another topic, or Kafka no longer holds an offset.
  """

  def __init__(self, archive_path: str, source: Tuple[str, str], *, registry: Registry,
               max_records: Optional[int] = None, expansion_service=None,
               resequence: Optional[Dict[str, Any]] = None, renumber: bool = True):
    super().__init__()
    self._registry = registry
    self._resequence = numbering(resequence, renumber)
    self._expansion_service = expansion_service
    self._archive = archive_path.rstrip('/')
    self._bootstrap, self._topic = source[0], source[1]
    self._max_records = max_records
    self.plan: Optional[HandoffPlan] = None

  def expand(self, pbegin):
    self.plan = plan = plan_handoff(self._archive, self._topic)
    archived = (pbegin
                | 'ArchiveFiles' >> beam.Create(plan.items)
                | 'SpreadFiles' >> beam.Reshuffle()
                | 'ReplayFiles' >> beam.ParDo(_ReplayFile(self._registry)))
    messages = pbegin | 'Live' >> ReadKafkaFrom(self._bootstrap, self._topic, plan.offsets,
                                                 max_records=self._max_records,
                                                 expansion_service=self._expansion_service)
    validated, dead = messages | 'ValidateLive' >> ValidateKafkaMessages(
        self._registry, require_sequence=needs_sequence(self._resequence))
    if self._resequence is not None:
      archived = archived | 'AsRaw' >> beam.Map(as_raw)
    everything = (archived, validated) | 'AllValidated' >> beam.Flatten()
    out = renumber(everything, dead, self._registry, self._resequence)
    offsets = dict(plan.offsets)
    live_refs = out.published_refs | 'LiveRefs' >> beam.Filter(lambda pr: _is_live(pr[1], offsets))
    live_dead = out.dead_refs | 'LiveDeadRefs' >> beam.Filter(lambda dr: _is_live(dr[1], offsets))
    live = Published(live_refs | 'LiveEnvelopes' >> beam.Map(lambda pr: pr[0]),
                     live_dead | 'LiveDeadLetters' >> beam.Map(lambda dr: dr[0]),
                     live_refs, live_dead, out.duplicates, out.stats)
    return HandoffResult(
        published=out.published, dead_letters=out.dead_letters,
        published_refs=out.published_refs, dead_refs=out.dead_refs, duplicates=out.duplicates,
        stats=out.stats, messages=(archived, messages) | 'AllMessages' >> beam.Flatten(),
        live=live)
