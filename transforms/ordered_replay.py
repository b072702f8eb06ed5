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
bucket's stats. Different buckets run in parallel; within a bucket, memory
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

Scale-out (``run.py replay`` uses this transform for the retail views)::

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

    replay = p | ReplayRetailProjections('s3://bucket/archive')
    replay.views.cart        # one final record per user (as RetailProjections gives)
    replay.views.unprocessed # duplicates and the like, as ProcessInOrder reports them
    replay.corrupt           # {path, reason} per file not read
    replay.stats             # one record per bucket: files, events, by_type, ...
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
                                match_data_files, read_archive_file, _registry_for, _schema_dir)
from sourcebeam.transforms.archive_format import (ArchiveFile, bucket_of,
                                       parse_file_path, sort_key)
from sourcebeam.transforms.ordering_core import DictBuffer, Handler, KeyState, Orderer, OrderingConfig
from sourcebeam.transforms.projections import (VIEWS, CartHandler, CatalogHandler, CombinedHandler,
                                    DeferredRecords, FrequentlyViewedHandler, PRODUCT_EVENT_TYPES,
                                    ProjectionViews, RecentlyViewedHandler, USER_EVENT_TYPES, built)

__all__ = ['KeySpace', 'BucketReplay', 'replay_bucket', 'read_checked_file', 'retail_key_spaces',
           'OrderedArchiveReplay', 'ReplayRetailProjections', 'ReplayResult', 'RetailReplay',
           'OUTPUTS', 'UNPROCESSED', 'STATUS', 'CORRUPT', 'STATS', 'UNCLAIMED']

OUTPUTS = 'outputs'
UNPROCESSED = 'unprocessed'
STATUS = 'status'
CORRUPT = 'corrupt'
STATS = 'stats'
UNCLAIMED = 'unclaimed'

LatestBy = Callable[[Any, Any], Hashable]


@dataclasses.dataclass(frozen=True)
class KeySpace:
  """A handler and the event types it orders per partition key.

  Like one ``ProcessInOrder(handler)`` applied to the events of those types:
  RetailProjections orders user events and product events separately, so it is
  two key spaces. An event type belongs to at most one key space.
  """
  name: str
  event_types: FrozenSet[str]
  handler: Handler


def retail_key_spaces(deferred: bool = False) -> Tuple[KeySpace, ...]:
  """The key spaces of :class:`transforms.projections.RetailProjections`, same handlers.

  ``deferred=True`` wraps them in :class:`DeferredRecords`: the same state
  changes, but a record is built only for the output a final view keeps (use
  it with ``latest_by``; :class:`BucketReplay` builds what it hands out).
  """
  user = CombinedHandler([CartHandler(), RecentlyViewedHandler(), FrequentlyViewedHandler()])
  product = CatalogHandler()
  if deferred:
    user, product = DeferredRecords(user), DeferredRecords(product)
  return (KeySpace('user', USER_EVENT_TYPES, user), KeySpace('product', PRODUCT_EVENT_TYPES, product))


def latest_view_record(key: Any, record: Dict[str, Any]) -> Tuple[str, Any]:
  """The retail views' identity of a record: one final record per (view, key)."""
  return record['view'], key


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
  ends. Outputs are ``(key, output)`` pairs; with ``latest_by`` only the last
  output per ``latest_by(key, output)`` is kept (the final view), which is what
  RetailProjections' ``LatestRecordFn`` keeps, since per key outputs come in
  sequence order.
  """

  def __init__(self, key_spaces: Sequence[KeySpace], config: OrderingConfig = OrderingConfig(),
               latest_by: Optional[LatestBy] = None, final_status: bool = False):
    route: Dict[str, int] = {}
    for i, ks in enumerate(key_spaces):
      for t in ks.event_types:
        if t in route:
          raise ValueError(f'event type {t} is in key spaces {key_spaces[route[t]].name} '
                           f'and {ks.name}; give each type one key space')
        route[t] = i
    self.key_spaces = tuple(key_spaces)
    self._route = route
    self._orderers = [Orderer(ks.handler, config) for ks in key_spaces]
    self._keys: List[Dict[Any, Tuple[KeyState, DictBuffer]]] = [{} for _ in key_spaces]
    self._latest_by = latest_by
    self._final_status = final_status
    self.latest: Dict[Hashable, Tuple[Any, Any]] = {}
    self.outputs: List[Tuple[Any, Any]] = []
    self.unprocessed: List[Dict[str, Any]] = []
    self.status: List[Dict[str, Any]] = []
    self.events = 0
    self.by_type: Dict[str, int] = {}
    self.unclaimed = 0

  def feed(self, events: Iterable[Envelope], unclaimed: Optional[List[Envelope]] = None) -> None:
    """Route each event to its key space's orderer; events of no key space are
    counted (and appended to ``unclaimed`` when given).

    The cyclic garbage collector is paused for the call (one hour's files):
    with a bucket's key states alive, its full collections cost ~15% of the
    replay and find nothing (envelopes, states and records hold no cycles);
    reference counting still frees everything as usual.
    """
    paused = gc.isenabled()
    if paused:
      gc.disable()
    try:
      self._feed(events, unclaimed)
    finally:
      if paused:
        gc.enable()

  def _feed(self, events: Iterable[Envelope], unclaimed: Optional[List[Envelope]]) -> None:
    route, orderers, keys = self._route, self._orderers, self._keys
    latest_by, latest, outputs = self._latest_by, self.latest, self.outputs
    unprocessed, by_type = self.unprocessed, self.by_type
    n = 0
    for env in events:
      n += 1
      etype = env['event_type']
      by_type[etype] = by_type.get(etype, 0) + 1
      i = route.get(etype)
      if i is None:
        self.unclaimed += 1
        if unclaimed is not None:
          unclaimed.append(env)
        continue
      key = env['partition_key']
      cell = keys[i].get(key)
      if cell is None:
        cell = keys[i][key] = (orderers[i].new_state(key), DictBuffer())
      act = orderers[i].receive(cell[0], cell[1], env['sequence'], env)
      if act.outputs:
        if latest_by is None:
          outputs.extend(act.outputs)
        else:
          for kv in act.outputs:
            latest[latest_by(kv[0], kv[1])] = kv
      if act.unprocessed:
        unprocessed.extend(act.unprocessed)
      while cell[0].backlog:  # only with max_events_per_activation: drain as the batch path does
        self._collect(orderers[i].drain(cell[0], cell[1]))
    self.events += n

  def _collect(self, act) -> None:
    if self._latest_by is None:
      self.outputs.extend(act.outputs)
    else:
      for kv in act.outputs:
        self.latest[self._latest_by(kv[0], kv[1])] = kv
    self.unprocessed.extend(act.unprocessed)
    self.status.extend(act.status)

  def finish(self) -> Dict[str, int]:
    """End of input: finish every key (gap timeouts as bounded input has them) and
    return counts of keys and of keys still waiting on a gap."""
    keys = waiting = buffered = 0
    for orderer, cells in zip(self._orderers, self._keys):
      for st, buf in cells.values():
        self._collect(orderer.finish(st, buf))
        if self._final_status:
          self.status.append(orderer.status(st, buf, 'final'))
        keys += 1
        if st.buffered:
          waiting += 1
          buffered += st.buffered
    return {'keys': keys, 'keys_waiting_on_gap': waiting, 'events_left_buffered': buffered}

  def take(self) -> Tuple[List[Tuple[Any, Any]], List[Dict[str, Any]], List[Dict[str, Any]]]:
    """What has been produced since the last take (final outputs only after finish).

    Outputs are handed out built (:func:`transforms.projections.built`), as the
    handler's ``apply`` would have given them.
    """
    if self._latest_by is None:
      outs = [(k, built(v)) for k, v in self.outputs]
      self.outputs = []
    else:
      outs = []
    unp, self.unprocessed = self.unprocessed, []
    status, self.status = self.status, []
    return outs, unp, status

  def take_latest(self) -> List[Tuple[Any, Any]]:
    """The last output per ``latest_by``, built (only these records are ever built
    when the key spaces' handlers defer them)."""
    outs = [(k, built(v)) for k, v in self.latest.values()]
    self.latest = {}
    return outs


def _hours(files: Iterable[ArchiveFile]) -> Iterator[Tuple[str, List[ArchiveFile]]]:
  ordered = sorted(files, key=lambda f: (f.hour, f.path))
  for hour, group in itertools.groupby(ordered, key=lambda f: f.hour):
    yield hour, list(group)


Reader = Callable[[ArchiveFile], List[Envelope]]


def replay_bucket(files: Iterable[ArchiveFile], replay: BucketReplay, reader: Reader,
                  with_unclaimed: bool = False) -> Iterator[Tuple[str, Any]]:
  """Replay one bucket's files hour by hour; yields ``(tag, value)`` as produced.

  Tags: OUTPUTS ``(key, output)``, UNPROCESSED, STATUS, CORRUPT ``{path,
  reason}``, UNCLAIMED (events of no key space, when asked) and, last, STATS.
  Only one hour's files are decoded at a time: a file's events are released
  once fed, and what the replay keeps is its keys' states.
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
    unclaimed: Optional[List[Envelope]] = [] if with_unclaimed else None
    replay.feed(events, unclaimed)
    del events
    for env in unclaimed or ():
      yield UNCLAIMED, env
    yield from _tagged(replay.take())
  stats.update(replay.finish())
  yield from _tagged(replay.take())
  for kv in replay.take_latest():
    yield OUTPUTS, kv
  stats.update(bucket=bucket, events=replay.events, by_type=dict(sorted(replay.by_type.items())),
               unclaimed=replay.unclaimed)
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
               latest_by: Optional[LatestBy], final_status: bool, schema_dir: str,
               buckets: int, with_unclaimed: bool):
    self._key_spaces, self._config = tuple(key_spaces), config
    self._latest_by, self._final_status = latest_by, final_status
    self._schema_dir, self._buckets = schema_dir, buckets
    self._with_unclaimed = with_unclaimed
    self._events = Metrics.counter('ordered_replay', 'events_read')
    self._corrupt = Metrics.counter('ordered_replay', 'corrupt_files')

  def setup(self):
    self._reg = _registry_for(self._schema_dir)

  def _read(self, f: ArchiveFile) -> List[Envelope]:
    return read_checked_file(f, self._reg, self._buckets)

  def process(self, element):
    _, paths = element
    files = [f for f in (parse_file_path(p) for p in paths) if f is not None]
    replay = BucketReplay(self._key_spaces, self._config, self._latest_by, self._final_status)
    for tag, value in replay_bucket(files, replay, self._read, self._with_unclaimed):
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
  unclaimed: beam.PCollection    # events of no key space (with_unclaimed=True)


class OrderedArchiveReplay(beam.PTransform):
  """Replay the archive at ``path`` through per-key ordered handlers, one bucket per work item.

  Args:
    path: the archive (local, ``s3://``, ``gs://``).
    key_spaces: which handler orders which event types (:class:`KeySpace`).
    latest_by: keep only the last output per ``latest_by(key, output)`` (a
      final view); None keeps every output.
    final_status: one status record per key and key space at the end.
    with_unclaimed: emit events of no key space (for other consumers of the
      same read) instead of only counting them.
    registry: reader schemas (a Registry or a schema directory).
    ordering: ``ProcessInOrder``'s per-key options: ``initial_sequence``,
      ``gap_timeout`` (seconds; bounded input skips or marks gaps at the end),
      ``gap_policy``, ``continue_on_handler_error``, ``max_buffered_per_key``.
  """

  def __init__(self, path: str, key_spaces: Sequence[KeySpace], *,
               latest_by: Optional[LatestBy] = None, final_status: bool = False,
               with_unclaimed: bool = False, registry: Any = None, initial_sequence: int = 1,
               max_buffered_per_key: Optional[int] = None, gap_timeout: Optional[float] = None,
               gap_policy: str = 'hold', continue_on_handler_error: bool = False):
    super().__init__()
    self._path = path.rstrip('/')
    self._key_spaces = tuple(key_spaces)
    BucketReplay(self._key_spaces)  # validates the key spaces now, not on a worker
    self._latest_by, self._final_status = latest_by, final_status
    self._with_unclaimed = with_unclaimed
    self._schema_dir = _schema_dir(registry)
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
            self._schema_dir, manifest['buckets'], self._with_unclaimed))
        .with_outputs(UNPROCESSED, STATUS, CORRUPT, STATS, UNCLAIMED, main=OUTPUTS))
    corrupt = (matched.corrupt, results[CORRUPT]) | 'AllCorrupt' >> beam.Flatten()
    return ReplayResult(results[OUTPUTS], results[UNPROCESSED], results[STATUS],
                        corrupt, results[STATS], results[UNCLAIMED])


class RetailReplay(NamedTuple):
  """The retail views from an archive, and what the read found."""
  views: ProjectionViews
  corrupt: beam.PCollection
  stats: beam.PCollection
  unclaimed: beam.PCollection


class ReplayRetailProjections(beam.PTransform):
  """The fast path of ``archive | ReadArchive | RetailProjections()`` on bounded input.

  Same handlers, same final view records (one per view and key) and same
  unprocessed records, without shuffling events: see the module docstring.
  ``with_unclaimed=True`` also emits the events the retail views do not use
  (rides, riders...) so other consumers can share the one read.
  """

  def __init__(self, path: str, *, with_unclaimed: bool = False, registry: Any = None, **ordering):
    super().__init__()
    self._replay = OrderedArchiveReplay(path, retail_key_spaces(deferred=True),
                                        latest_by=latest_view_record,
                                        with_unclaimed=with_unclaimed, registry=registry,
                                        **ordering)

  def expand(self, pbegin) -> RetailReplay:
    result = pbegin | 'OrderedReplay' >> self._replay
    split = (result.outputs
             | 'DropKey' >> beam.Map(lambda kv: kv[1])
             | 'ByView' >> beam.Partition(lambda r, n: VIEWS.index(r['view']), len(VIEWS)))
    views = ProjectionViews(unprocessed=result.unprocessed, **dict(zip(VIEWS, split)))
    return RetailReplay(views, result.corrupt, result.stats, result.unclaimed)
