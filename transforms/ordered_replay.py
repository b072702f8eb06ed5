"""Ordered archive replay without a global shuffle: one work item per key bucket.

A live pipeline keeps per-key order with :class:`transforms.ordering.ProcessInOrder`,
whose bounded expansion groups every event by key (a shuffle of the whole
archive) before it sorts each key. The archive layout makes that shuffle
unnecessary (see :mod:`transforms.archive_format`): every event of a partition
key lives in the same bucket, in every hour, and every file is sorted by
``(partition_key, sequence, event_id)``. So a replay can:

1. list the archive's files and group them by bucket (a shuffle of file
   *names*, a few hundred strings, not of events);
2. give each bucket to one worker, which reads the bucket's files hour by hour
   (k-way merging the files of one hour, when several runs wrote it);
3. feed each event to its key's :class:`transforms.ordering_core.Orderer`, the
   core ``ProcessInOrder`` runs too, with the *same handler objects* the live
   pipeline uses; per-key state lives in a dict for as long as the bucket is
   being read.

Events are applied in sequence order per key; duplicates, events below the
initial sequence and handler errors are reported exactly as ``ProcessInOrder``
reports them (the same core, fed the same way: ``receive`` without event
times, then ``finish``), and keys left waiting on a gap are counted in the
bucket's stats. Events of types the reader's registry does not know (written
by an application with more types) are counted as ``unknown_type`` and skipped;
events of types no key space orders and no one asked for are ``unclaimed``. Different buckets run in parallel; within a bucket, memory
holds the key states and one hour's files, never the whole bucket.

What is read is checked, not trusted: a file whose events are not in its
bucket or hour, or not sorted, would break the no-shuffle argument, so such a
file is reported as corrupt (with the first offending event) and none of its
events are applied, like a file that does not decode. Per-bucket stats count
files, events decoded per event type, events claimed by no key space, and keys
still waiting on a gap at the end.

Parallelism is one work item per bucket, so the archive's bucket count (16 by
default, fixed when the archive is first written) caps how many workers a
replay can use; archives meant for big replays want more buckets.

Scale-out (``run.py replay`` uses this transform for every application's views and
projections, through :class:`sourcebeam.transforms.consumers.ReplayApp`)::

    # A bigger Flink cluster, archive on S3 (credentials from the environment, as
    # boto3 reads them on every worker; SOURCEBEAM_S3_ENDPOINT only for non-AWS S3).
    # Python workers: a Beam worker pool beside each TaskManager
    # (python -m apache_beam.runners.worker.worker_pool_main --service_port=50000),
    # or --environment_type=DOCKER with Beam's SDK image; not LOOPBACK (the default
    # here, which runs every worker inside the submitting process).
    python run.py replay --archive s3://BUCKET/archive --out s3://BUCKET/replay \
        --runner=FlinkRunner --flink_master=JOBMANAGER:8081 --parallelism=16 \
        --sdk_worker_parallelism=NUM_SLOTS_PER_TASKMANAGER \
        --environment_type=EXTERNAL --environment_config=localhost:50000

    # Dataflow, archive on GCS (Sourcebeam is installed on the workers through
    # --setup_file, which run.py adds; add --dry_run=True to build the job only).
    python run.py replay --archive gs://BUCKET/archive --out gs://BUCKET/replay \
        --runner=DataflowRunner --project=PROJECT --region=REGION \
        --temp_location=gs://BUCKET/tmp --max_num_workers=16 --machine_type=n2-standard-2

Usage::

    replay = p | OrderedArchiveReplay('s3://bucket/archive', [KeySpace('user', types, handler)],
                                      registry=app.registry)
    replay.outputs      # (key, output) of the handlers, in each key's order
    replay.unprocessed  # duplicates and the like, as ProcessInOrder reports them
    replay.corrupt      # {path, reason} per file not read
    replay.stats        # one record per bucket: files, events, by_type, unknown_type, ...
    replay.passthrough  # the events asked for by type (for consumers that are not per key)
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import gc
import heapq
import itertools
from typing import (Any, Callable, Dict, FrozenSet, Hashable, Iterable, Iterator, List,
                    NamedTuple, Optional, Sequence, Tuple)

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows, TimestampCombiner

from sourcebeam.schemas.envelope import Envelope
from sourcebeam.schemas.registry import Registry
from sourcebeam.transforms.archive import (CorruptArchiveFile, IncompatibleSchema, check_archive_path,
                                           match_data_files, read_archive_file, _require_registry)
from sourcebeam.transforms.archive_format import ArchiveFile, bucket_of, parse_file_path, sort_key
from sourcebeam.transforms.ordering_core import DictBuffer, Handler, KeyState, Orderer, OrderingConfig

__all__ = ['KeySpace', 'BucketReplay', 'replay_bucket', 'read_checked_file', 'OrderedArchiveReplay',
           'ReplayResult', 'OUTPUTS', 'UNPROCESSED', 'STATUS', 'CORRUPT', 'STATS', 'PASSTHROUGH']

OUTPUTS = 'outputs'
UNPROCESSED = 'unprocessed'
STATUS = 'status'
CORRUPT = 'corrupt'
STATS = 'stats'
PASSTHROUGH = 'passthrough'

# latest_by(key, output): the identity under which only the last output is kept (a view's
# final value per key), or None to keep every output.
LatestBy = Callable[[Any, Any], Optional[Hashable]]


@dataclasses.dataclass(frozen=True)
class KeySpace:
  """A handler and the event types it orders per partition key.

  Like one ``ProcessInOrder(handler)`` applied to the events of those types. An
  event type belongs to at most one key space.
  """
  name: str
  event_types: FrozenSet[str]
  handler: Handler


# ---------------------------------------------------------------------------
# Reading one file, checked against the layout


def _hour_start_millis(hour: str) -> int:
  dt = datetime.datetime.strptime(hour, '%Y-%m-%dT%H')
  return calendar.timegm(dt.timetuple()) * 1000


def check_placement(events: Sequence[Envelope], f: ArchiveFile, buckets: int) -> Optional[str]:
  """Why the events of file ``f`` break the layout's promises, or None.

  Every event must be in the file's hour and bucket, and the file sorted by
  (partition_key, sequence): what lets the replay skip the shuffle. The bucket
  is computed once per run of one key (files are sorted by key), so the check
  costs two comparisons per event.
  """
  lo = _hour_start_millis(f.hour)
  hi = lo + 3_600_000
  prev_key, prev_seq = None, None
  for env in events:
    key, seq, t = env['partition_key'], env['sequence'], env['event_time']
    if key != prev_key:
      if prev_key is not None and key < prev_key:
        return f'event {env["event_id"]} is out of order (key {key!r} after {prev_key!r})'
      if bucket_of(key, buckets) != f.bucket:
        return (f'event {env["event_id"]} has key {key!r} of bucket {bucket_of(key, buckets)}, '
                f'not {f.bucket}')
      prev_key = key
    elif seq < prev_seq:
      return f'event {env["event_id"]} is out of order (sequence {seq} after {prev_seq})'
    prev_seq = seq
    if not lo <= t < hi:
      return f'event {env["event_id"]} has event_time {t}, outside hour {f.hour}'
  return None


def read_checked_file(f: ArchiveFile, registry: Any, buckets: int) -> List[Envelope]:
  """Every event of one archive file, decoded and checked against the layout.

  Raises CorruptArchiveFile (undecodable, or events outside their bucket or
  hour, or unsorted) or IncompatibleSchema; all or nothing, like
  :func:`transforms.archive.read_archive_file`.
  """
  events = read_archive_file(f.path, registry)
  problem = check_placement(events, f, buckets)
  if problem:
    raise CorruptArchiveFile(f.path, f'breaks the archive layout: {problem}')
  return events


# ---------------------------------------------------------------------------
# One bucket, in plain Python


class BucketReplay:
  """Per-key ordering of one bucket's events, for several key spaces at once.

  ``feed`` takes events in any order (the archive gives them hour by hour,
  sorted by key and sequence within each hour); each goes to the
  :class:`Orderer` of its event type's key space with its key's state, through
  ``Orderer.receive`` exactly as the batch expansion of ``ProcessInOrder``
  feeds it (no event times). ``finish`` ends the input like bounded input
  ends. Outputs are ``(key, output)`` pairs; where ``latest_by(key, output)``
  gives an identity, only the last output per identity is kept (a view's final
  value: per key, outputs come in sequence order), else every output is.

  ``registry`` (optional) tells unknown event types from unclaimed ones;
  ``passthrough`` (True, or event type names) selects the events ``feed``
  also hands back for other consumers of the same read.
  """

  def __init__(self, key_spaces: Sequence[KeySpace], config: OrderingConfig = OrderingConfig(),
               latest_by: Optional[LatestBy] = None, final_status: bool = False,
               registry: Optional[Registry] = None, passthrough: Any = False):
    route: Dict[str, int] = {}
    for i, ks in enumerate(key_spaces):
      for t in ks.event_types:
        if t in route:
          raise ValueError(f'event type {t} is in key spaces {key_spaces[route[t]].name} '
                           f'and {ks.name}; give each type one key space')
        route[t] = i
    self.key_spaces = tuple(key_spaces)
    self._names = [ks.name for ks in key_spaces]
    self._route = route
    self._orderers = [Orderer(ks.handler, config) for ks in key_spaces]
    self._keys: List[Dict[Any, Tuple[KeyState, DictBuffer]]] = [{} for _ in key_spaces]
    self._latest_by = latest_by
    self._final_status = final_status
    self._known = None if registry is None else frozenset(registry.current)
    self._pass_all = passthrough is True
    self._pass = frozenset() if passthrough in (True, False, None) else frozenset(passthrough)
    self.latest: Dict[Hashable, Tuple[Any, Any]] = {}
    self.outputs: List[Tuple[Any, Any]] = []
    self.unprocessed: List[Dict[str, Any]] = []
    self.status: List[Dict[str, Any]] = []
    self.events = 0
    self.by_type: Dict[str, int] = {}
    self.unclaimed = 0
    self.unknown_type = 0

  def feed(self, events: Iterable[Envelope], passthrough: Optional[List[Envelope]] = None) -> None:
    """Route each event to its key space's orderer; the events asked for by type are also
    appended to ``passthrough`` (when given); events of unknown types are counted and
    skipped, and those nobody reads counted as unclaimed.

    The cyclic garbage collector is paused for the call (one hour's files):
    with a bucket's key states alive, its full collections cost ~15% of the
    replay and find nothing (envelopes, states and records hold no cycles);
    reference counting still frees everything as usual.
    """
    paused = gc.isenabled()
    if paused:
      gc.disable()
    try:
      self._feed(events, passthrough)
    finally:
      if paused:
        gc.enable()

  def _feed(self, events: Iterable[Envelope], passthrough: Optional[List[Envelope]]) -> None:
    route, orderers, keys = self._route, self._orderers, self._keys
    unprocessed, by_type = self.unprocessed, self.by_type
    known, pass_all, pass_types = self._known, self._pass_all, self._pass
    collect, names = self._collect_outputs, self._names
    n = 0
    for env in events:
      n += 1
      etype = env['event_type']
      if known is not None and etype not in known:
        self.unknown_type += 1
        continue
      by_type[etype] = by_type.get(etype, 0) + 1
      passed = pass_all or etype in pass_types
      if passed and passthrough is not None:
        passthrough.append(env)
      i = route.get(etype)
      if i is None:
        if not passed:
          self.unclaimed += 1
        continue
      key = env['partition_key']
      cell = keys[i].get(key)
      if cell is None:
        cell = keys[i][key] = (orderers[i].new_state(key), DictBuffer())
      act = orderers[i].receive(cell[0], cell[1], env['sequence'], env)
      if act.outputs:
        collect(act.outputs)
      if act.unprocessed:
        unprocessed.extend(dict(r, key_space=names[i]) for r in act.unprocessed)
      while cell[0].backlog:  # only with max_events_per_activation: drain as the batch path does
        self._collect(orderers[i].drain(cell[0], cell[1]), names[i])
    self.events += n

  def _collect_outputs(self, outputs: List[Tuple[Any, Any]]) -> None:
    latest_by = self._latest_by
    if latest_by is None:
      self.outputs.extend(outputs)
      return
    for kv in outputs:
      ident = latest_by(kv[0], kv[1])
      if ident is None:
        self.outputs.append(kv)
      else:
        self.latest[ident] = kv

  def _collect(self, act, key_space: str) -> None:
    self._collect_outputs(act.outputs)
    self.unprocessed.extend(dict(r, key_space=key_space) for r in act.unprocessed)
    self.status.extend(dict(r, key_space=key_space) for r in act.status)

  def finish(self) -> Dict[str, int]:
    """End of input: finish every key (gap timeouts as bounded input has them) and
    return counts of keys and of keys still waiting on a gap."""
    keys = waiting = buffered = 0
    for name, orderer, cells in zip(self._names, self._orderers, self._keys):
      for st, buf in cells.values():
        self._collect(orderer.finish(st, buf), name)
        if self._final_status:
          self.status.append(dict(orderer.status(st, buf, 'final'), key_space=name))
        keys += 1
        if st.buffered:
          waiting += 1
          buffered += st.buffered
    return {'keys': keys, 'keys_waiting_on_gap': waiting, 'events_left_buffered': buffered}

  def take(self) -> Tuple[List[Tuple[Any, Any]], List[Dict[str, Any]], List[Dict[str, Any]]]:
    """What has been produced since the last take (outputs kept by ``latest_by`` only come
    out of :meth:`take_latest`, after :meth:`finish`)."""
    outs, self.outputs = self.outputs, []
    unp, self.unprocessed = self.unprocessed, []
    status, self.status = self.status, []
    return outs, unp, status

  def take_latest(self) -> List[Tuple[Any, Any]]:
    """The last output per ``latest_by`` identity."""
    outs = list(self.latest.values())
    self.latest = {}
    return outs


def _hours(files: Iterable[ArchiveFile]) -> Iterator[Tuple[str, List[ArchiveFile]]]:
  ordered = sorted(files, key=lambda f: (f.hour, f.path))
  for hour, group in itertools.groupby(ordered, key=lambda f: f.hour):
    yield hour, list(group)


Reader = Callable[[ArchiveFile], List[Envelope]]


def replay_bucket(files: Iterable[ArchiveFile], replay: BucketReplay, reader: Reader,
                  with_passthrough: bool = False) -> Iterator[Tuple[str, Any]]:
  """Replay one bucket's files hour by hour; yields ``(tag, value)`` as produced.

  Tags: OUTPUTS ``(key, output)``, UNPROCESSED, STATUS, CORRUPT ``{path,
  reason}``, PASSTHROUGH (the events asked for by type, when ``with_passthrough``)
  and, last, STATS. Only one hour's files are decoded at a time: a file's
  events are released once fed, and what the replay keeps is its keys' states.
  """
  stats: Dict[str, Any] = {'files': 0, 'corrupt_files': 0}
  bucket = None
  for _, hour_files in _hours(files):
    decoded = []
    for f in hour_files:
      bucket = f.bucket
      try:
        decoded.append(reader(f))
        stats['files'] += 1
      except (CorruptArchiveFile, IncompatibleSchema) as e:
        stats['corrupt_files'] += 1
        reason = e.reason if isinstance(e, CorruptArchiveFile) else str(e)
        if reason.startswith(f.path + ': '):
          reason = reason[len(f.path) + 2:]
        yield CORRUPT, {'path': f.path, 'reason': reason}
    events = decoded[0] if len(decoded) == 1 else heapq.merge(*decoded, key=sort_key)
    del decoded
    passed: Optional[List[Envelope]] = [] if with_passthrough else None
    replay.feed(events, passed)
    del events
    for env in passed or ():
      yield PASSTHROUGH, env
    yield from _tagged(replay.take())
  stats.update(replay.finish())
  yield from _tagged(replay.take())
  for kv in replay.take_latest():
    yield OUTPUTS, kv
  stats.update(bucket=bucket, events=replay.events, by_type=dict(sorted(replay.by_type.items())),
               unclaimed=replay.unclaimed, unknown_type=replay.unknown_type)
  yield STATS, stats


def _tagged(taken) -> Iterator[Tuple[str, Any]]:
  outs, unp, status = taken
  for kv in outs:
    yield OUTPUTS, kv
  for rec in unp:
    yield UNPROCESSED, rec
  for rec in status:
    yield STATUS, rec


# ---------------------------------------------------------------------------
# Beam


class _ReplayBucket(beam.DoFn):
  """One bucket's files -> ordered handler outputs, reports and stats."""

  def __init__(self, key_spaces: Sequence[KeySpace], config: OrderingConfig,
               latest_by: Optional[LatestBy], final_status: bool, registry: Registry,
               buckets: int, passthrough: Any):
    self._key_spaces, self._config = tuple(key_spaces), config
    self._latest_by, self._final_status = latest_by, final_status
    self._reg, self._buckets = registry, buckets
    self._passthrough = passthrough
    self._events = Metrics.counter('ordered_replay', 'events_read')
    self._corrupt = Metrics.counter('ordered_replay', 'corrupt_files')

  def _read(self, f: ArchiveFile) -> List[Envelope]:
    return read_checked_file(f, self._reg, self._buckets)

  def process(self, element):
    _, paths = element
    files = [f for f in (parse_file_path(p) for p in paths) if f is not None]
    replay = BucketReplay(self._key_spaces, self._config, self._latest_by, self._final_status,
                          self._reg, self._passthrough)
    with_passthrough = self._passthrough not in (False, None) and self._passthrough != frozenset()
    for tag, value in replay_bucket(files, replay, self._read, with_passthrough):
      if tag == OUTPUTS:
        yield value
      else:
        if tag == STATS:
          self._events.inc(value['events'])
        elif tag == CORRUPT:
          self._corrupt.inc()
        yield pvalue.TaggedOutput(tag, value)


class ReplayResult(NamedTuple):
  """The outputs of :class:`OrderedArchiveReplay`."""
  outputs: beam.PCollection      # (key, output), or the latest per latest_by
  unprocessed: beam.PCollection  # as ProcessInOrder reports them
  status: beam.PCollection       # final status per key (final_status=True)
  corrupt: beam.PCollection      # {path, reason}
  stats: beam.PCollection        # one record per bucket
  passthrough: beam.PCollection  # the events asked for by type (passthrough=...)


class OrderedArchiveReplay(beam.PTransform):
  """Replay the archive at ``path`` through per-key ordered handlers, one bucket per work item.

  Args:
    path: the archive (local, ``s3://``, ``gs://``).
    key_spaces: which handler orders which event types (:class:`KeySpace`).
    registry: the reader's schemas (the application's ``app.registry``).
    latest_by: keep only the last output per ``latest_by(key, output)`` (a
      final view) where it gives an identity; None keeps every output.
    final_status: one status record per key and key space at the end.
    passthrough: True, or event type names: also emit those events (for
      consumers of the same read that are not per key).
    ordering: ``ProcessInOrder``'s per-key options: ``initial_sequence``,
      ``gap_timeout`` (seconds; bounded input skips or marks gaps at the end),
      ``gap_policy``, ``continue_on_handler_error``, ``max_buffered_per_key``.
  """

  def __init__(self, path: str, key_spaces: Sequence[KeySpace], *, registry: Registry,
               latest_by: Optional[LatestBy] = None, final_status: bool = False,
               passthrough: Any = False, initial_sequence: int = 1,
               max_buffered_per_key: Optional[int] = None, gap_timeout: Optional[float] = None,
               gap_policy: str = 'hold', continue_on_handler_error: bool = False):
    super().__init__()
    self._path = path.rstrip('/')
    self._key_spaces = tuple(key_spaces)
    BucketReplay(self._key_spaces)  # validates the key spaces now, not on a worker
    self._latest_by, self._final_status = latest_by, final_status
    self._registry = _require_registry(registry)
    self._passthrough = passthrough if passthrough in (True, False, None) else frozenset(passthrough)
    self._config = OrderingConfig(
        initial_sequence=initial_sequence, max_buffered_per_key=max_buffered_per_key,
        gap_timeout_event_time=None if gap_timeout is None else int(round(gap_timeout * 1e6)),
        gap_policy=gap_policy, continue_on_handler_error=continue_on_handler_error)

  def expand(self, pbegin) -> ReplayResult:
    manifest = check_archive_path(self._path)
    matched = pbegin | 'MatchFiles' >> match_data_files(self._path, manifest)
    results = (
        matched.files  # files that do not fit the manifest and layout: in matched.corrupt
        | 'ByBucket' >> beam.Map(lambda m: (parse_file_path(m.path).bucket, m.path))
        # A grouping's output is stamped at the end of its window by default: the end of time
        # here, behind which every event (re-stamped at its event time downstream) would be
        # late, and a runner that honours lateness (Prism) drops late data from event-time
        # windows (a replay's hourly taxi tips came out empty). Stamp the groups at the
        # earliest file's time (the start of time) instead, ahead of every event.
        | 'EarliestTimestamp' >> beam.WindowInto(
            GlobalWindows(), timestamp_combiner=TimestampCombiner.OUTPUT_AT_EARLIEST)
        | 'GroupBucketFiles' >> beam.GroupByKey()
        | 'ReplayBucket' >> beam.ParDo(_ReplayBucket(
            self._key_spaces, self._config, self._latest_by, self._final_status,
            self._registry, manifest['buckets'], self._passthrough))
        .with_outputs(UNPROCESSED, STATUS, CORRUPT, STATS, PASSTHROUGH, main=OUTPUTS))
    # The bucket replay's outputs carry its earliest-timestamp windowing; the files refused
    # before it, the default one. Flatten wants one windowing (Beam warns otherwise).
    refused = results[CORRUPT] | 'CorruptWindowing' >> beam.WindowInto(GlobalWindows())
    corrupt = (matched.corrupt, refused) | 'AllCorrupt' >> beam.Flatten()
    return ReplayResult(results[OUTPUTS], results[UNPROCESSED], results[STATUS],
                        corrupt, results[STATS], results[PASSTHROUGH])
