"""The event archive: write published events to Avro or Parquet, read them back.

``WriteArchive`` partitions envelopes by event-time hour and partition-key
bucket, sorts each (hour, bucket) group by ``(partition_key, sequence)`` and
writes it as one file (or a few, for big groups), so a replay can keep per-key
order without a global shuffle. ``ReadArchive`` is the bounded source a replay
starts from. Both go through Beam's ``FileSystems``: local paths, ``s3://`` and
``gs://`` work alike (see :mod:`pipelines.storage` for endpoints and emulators).
The layout and file formats are described in :mod:`transforms.archive_format`.

Writes are idempotent under Beam retries: file names are fixed when the
pipeline is built (run id, window, pane, chunk) and file contents are a pure
function of the group (sorted, with a sync marker derived from the name), so a
retried bundle rewrites the same bytes. Each run has its own run id, so two
runs into one archive add files side by side. Local files are written to a
hidden temporary name and renamed into place (atomic); S3 and GCS objects only
appear when their upload completes, so they are written in place.

For a live (unbounded) stream, window the events before ``WriteArchive`` (for
example hourly windows with an early trigger): each window and pane gets its own
files, named by window start and pane index.
"""

from __future__ import annotations

import datetime
import heapq
import io
import json
import logging
import re
import uuid
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io import fileio
from apache_beam.metrics import Metrics
from apache_beam.transforms import window as beam_window

from sourcebeam.transforms import storage
from sourcebeam.transforms.errors import ConfigError
from sourcebeam.schemas.envelope import Envelope
from sourcebeam.schemas.registry import Registry
from sourcebeam.transforms.archive_format import (
    AVRO_CODECS, DEFAULT_BUCKETS, DEFAULT_MAX_EVENTS_PER_FILE, LAYOUT_VERSION,
    MANIFEST_NAME, SORT_ORDER, ArchiveFile, CorruptArchiveFile, IncompatibleSchema,
    bucket_files_pattern, chunks, encode_avro, encode_parquet, file_name,
    is_hidden, join, layout_problem, make_manifest, parse_file_path, parse_manifest,
    partition_dir, partition_of, read_events, sort_key)

__all__ = [
    'WriteArchive', 'ReadArchive', 'check_archive_path', 'read_archive_file', 'iter_archive',
    'list_archive_files', 'scan_archive_files', 'archive_partitions', 'iter_partition',
    'read_manifest', 'match_data_files', 'MatchArchiveFiles', 'MatchedFiles', 'known_events',
    'CorruptArchiveFile', 'IncompatibleSchema', 'EVENTS', 'CORRUPT', 'UNKNOWN_TYPE']

EVENTS = 'events'
CORRUPT = 'corrupt'
UNKNOWN_TYPE = 'unknown_type'
_LOCAL_SCHEMES = (None, 'file')
_RUN_ID_RE = re.compile(r'^[A-Za-z0-9_.]{1,64}$')
_LOG = logging.getLogger(__name__)



def _require_registry(reg: Any) -> Registry:
  if not isinstance(reg, Registry):
    raise TypeError(f'registry must be the application\'s schema Registry (app.registry), '
                    f'got {type(reg).__name__}')
  return reg


def new_run_id() -> str:
  """A run id that sorts by start time and cannot collide with another run's."""
  now = datetime.datetime.now(datetime.timezone.utc)
  return now.strftime('%Y%m%dT%H%M%SZ') + '_' + uuid.uuid4().hex[:8]


# ---------------------------------------------------------------------------
# Plain-Python access through Beam's FileSystems (tests, benchmarks, the CLI)


def ensure_storage_options() -> None:
  """Give Beam's FileSystems the storage options from the environment, if nobody has.

  Outside a pipeline FileSystems has no options, and ``s3://`` would go to AWS
  even with SOURCEBEAM_S3_ENDPOINT set. A pipeline (or an explicit
  :func:`pipelines.storage.use_storage_options`) sets them and is left alone.
  """
  if FileSystems._pipeline_options is None:  # pylint: disable=protected-access
    storage.use_storage_options()


def _is_local(path: str) -> bool:
  return FileSystems.get_scheme(path) in _LOCAL_SCHEMES


def write_bytes(path: str, blob: bytes) -> None:
  """Write one file; atomically (temporary name + rename) on local disk."""
  if not _is_local(path):
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      f.write(blob)
    return
  dirname, name = path.rsplit('/', 1) if '/' in path else ('.', path)
  tmp = f'{dirname}/.tmp-{uuid.uuid4().hex}-{name}'
  with FileSystems.create(tmp, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    f.write(blob)
  FileSystems.rename([tmp], [path])


def read_manifest(path: str) -> Optional[Dict[str, Any]]:
  """The archive's manifest, None if it has none; ValueError if it is not valid."""
  ensure_storage_options()
  mpath = join(path, MANIFEST_NAME)
  if not FileSystems.exists(mpath):
    return None
  with FileSystems.open(mpath, compression_type=CompressionTypes.UNCOMPRESSED) as f:
    return parse_manifest(f.read(), mpath)


def match_data_files(path: str, manifest: Dict[str, Any]) -> 'MatchArchiveFiles':
  """Every data file of the archive at ``path``, and every file of its bucket folders that is
  not one (reported, never skipped): see :class:`MatchArchiveFiles`."""
  return MatchArchiveFiles(path, manifest)


def _head(path: str, n: int = 4) -> Optional[bytes]:
  """A file's first bytes (what it holds), None if it cannot be read."""
  try:
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
      return f.read(n)
  except Exception:  # pylint: disable=broad-except
    return None


def misfit_reason(path: str, fmt: str) -> Optional[str]:
  """Why a file in a bucket folder is not a data file of a ``fmt`` archive (None if it is
  one, or hidden); the reason names what the file holds when it can be read."""
  if layout_problem(path, fmt) is None:
    return None
  return layout_problem(path, fmt, _head(path))


class MatchedFiles(NamedTuple):
  """What :class:`MatchArchiveFiles` found."""
  files: beam.PCollection    # FileMetadata of every data file the manifest and layout name
  corrupt: beam.PCollection  # {'path', 'reason'}: files in bucket folders that are not


class _CheckLayout(beam.DoFn):
  """Data files through; anything else in a bucket folder to ``corrupt``, with the reason."""

  def __init__(self, fmt: str):
    self._fmt = fmt
    self._misfits = Metrics.counter('archive', 'files_not_in_layout')

  def process(self, metadata):
    if is_hidden(metadata.path):
      return
    reason = misfit_reason(metadata.path, self._fmt)
    if reason is None:
      yield metadata
      return
    self._misfits.inc()
    _LOG.warning('archive file %s not read: %s', metadata.path, reason)
    yield beam.pvalue.TaggedOutput(CORRUPT, {'path': metadata.path, 'reason': reason})


class MatchArchiveFiles(beam.PTransform):
  """The files of the archive at ``path`` (whose manifest is ``manifest``).

  Matches every file in the bucket folders, not only the names the manifest's
  format gives, so that a file a replay would not read is reported instead of
  silently missed: a data file of the other format (the manifest and the files
  disagree) or a name that does not fit the layout goes to ``corrupt`` with its
  reason. Hidden files (the writer's temporaries) are not data files. An empty
  archive matches nothing, not an error.
  """

  def __init__(self, path: str, manifest: Dict[str, Any]):
    super().__init__()
    self._path, self._fmt = path.rstrip('/'), manifest['format']

  def expand(self, pbegin) -> MatchedFiles:
    checked = (
        pbegin
        | 'MatchFiles' >> fileio.MatchFiles(bucket_files_pattern(self._path),
                                            empty_match_treatment=fileio.EmptyMatchTreatment.ALLOW)
        | 'CheckLayout' >> beam.ParDo(_CheckLayout(self._fmt)).with_outputs(CORRUPT, main='files'))
    return MatchedFiles(checked.files, checked[CORRUPT])


def check_archive_path(path: str, beam_args: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """The manifest of the archive at ``path``, or ConfigError saying why there is none.

  The CLI calls this before building a pipeline, so a wrong path is one line
  and exit code 2, not a traceback from deep inside a runner. Pass the
  command's Beam arguments as ``beam_args`` when they may name storage options
  (``--s3_endpoint_url``...); otherwise the environment's are used.
  """
  if not path:
    raise ConfigError('no archive path given')
  if beam_args is not None:
    storage.use_storage_options(beam_args)
  ensure_storage_options()
  storage.preflight(path, FileSystems._pipeline_options)  # pylint: disable=protected-access
  try:
    manifest = read_manifest(path)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  except Exception as e:  # storage errors: unknown bucket, endpoint down, no access
    raise ConfigError(f'cannot read archive {path}: {_one_line(e)}') from None
  if manifest is None:
    if _is_local(path) and FileSystems.exists(path):
      raise ConfigError(f'{path} is not a Sourcebeam archive (it has no {MANIFEST_NAME})')
    raise ConfigError(f'archive {path} does not exist (no {MANIFEST_NAME} there); '
                     'write one with `run.py publish --archive PATH`')
  return manifest


def scan_archive_files(path: str, fmt: Optional[str] = None
                       ) -> Tuple[List[ArchiveFile], List[Dict[str, str]]]:
  """The archive's data files in replay order, and ``{'path', 'reason'}`` for every other
  file in its bucket folders (a file of the other format, a name outside the layout)."""
  if fmt is None:
    fmt = check_archive_path(path)['format']
  result = FileSystems.match([bucket_files_pattern(path)])[0]
  files, misfits = [], []
  for m in result.metadata_list:
    if is_hidden(m.path):
      continue
    reason = misfit_reason(m.path, fmt)
    if reason is None:
      files.append(parse_file_path(m.path))
    else:
      misfits.append({'path': m.path, 'reason': reason})
  files.sort(key=lambda f: (f.hour, f.bucket, f.path))
  misfits.sort(key=lambda m: m['path'])
  return files, misfits


def list_archive_files(path: str, fmt: Optional[str] = None) -> List[ArchiveFile]:
  """The archive's data files, ordered by (hour, bucket, name): the replay order.

  Raises CorruptArchiveFile for the first file in a bucket folder that is not a data
  file of the manifest's format (see :func:`scan_archive_files`): skipping it would
  lose its events without a word.
  """
  files, misfits = scan_archive_files(path, fmt)
  if misfits:
    raise CorruptArchiveFile(misfits[0]['path'], misfits[0]['reason'])
  return files


def read_archive_file(path: str, registry: Registry) -> List[Envelope]:
  """Every event of one archive file, resolved to ``registry``'s current schemas.

  Events of types ``registry`` does not know (written by an application with
  more types) are returned as written; :func:`known_events` separates them.
  Raises CorruptArchiveFile (one-line reason) or IncompatibleSchema.
  """
  reg = _require_registry(registry)
  fmt = 'parquet' if path.endswith('.parquet') else 'avro'
  ensure_storage_options()
  try:
    fo = _open_for_read(path)
  except Exception as e:
    raise CorruptArchiveFile(path, f'cannot open ({_one_line(e)})') from None
  with fo:
    return read_events(fo, fmt, reg, path)


def _open_for_read(path: str):
  """A readable file: through FileSystems, except S3 objects, read with a shared client.

  See :func:`pipelines.storage.s3_client`: Beam's S3 filesystem pays for a new
  boto3 client on each open, several times the cost of reading a small file.
  """
  if FileSystems.get_scheme(path) != 's3':
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)
  bucket, _, key = path[len('s3://'):].partition('/')
  client = storage.s3_client(FileSystems._pipeline_options)  # pylint: disable=protected-access
  return io.BytesIO(client.get_object(Bucket=bucket, Key=key)['Body'].read())


def known_events(events: List[Envelope], registry: Registry
                 ) -> Tuple[List[Envelope], List[Envelope]]:
  """``(events of types registry knows, the others)``: the others were written by an
  application with more event types, and are counted and skipped, not read as corrupt."""
  current = registry.current
  if all(e['event_type'] in current for e in events):
    return events, []
  known, unknown = [], []
  for e in events:
    (known if e['event_type'] in current else unknown).append(e)
  return known, unknown


def iter_archive(path: str, registry: Registry) -> Iterator[Envelope]:
  """Every event of an archive, file by file in (hour, bucket) order; no Beam.

  Within a file events are in (partition_key, sequence) order; events of types
  ``registry`` does not know are skipped (see :func:`known_events`). Raises
  ConfigError for a missing archive and CorruptArchiveFile / IncompatibleSchema
  at the first bad file.
  """
  manifest = check_archive_path(path)
  reg = _require_registry(registry)
  for f in list_archive_files(path, manifest['format']):
    yield from known_events(read_archive_file(f.path, reg), reg)[0]


def archive_partitions(path: str) -> Dict[Tuple[str, int], List[ArchiveFile]]:
  """The archive's files grouped by (hour, bucket), in replay order."""
  parts: Dict[Tuple[str, int], List[ArchiveFile]] = {}
  for f in list_archive_files(path):
    parts.setdefault((f.hour, f.bucket), []).append(f)
  return parts


def iter_partition(files: Sequence[ArchiveFile], registry: Registry) -> Iterator[Envelope]:
  """The events of one (hour, bucket) in (partition_key, sequence) order, across all its files.

  Every file is sorted, so a k-way merge suffices: what a replay that keeps
  per-key order without a shuffle does with the files of several runs.
  """
  reg = _require_registry(registry)
  yield from heapq.merge(*(read_archive_file(f.path, reg) for f in files), key=sort_key)


def _one_line(e: BaseException) -> str:
  text = ' '.join(str(e).split()) or type(e).__name__
  return text if len(text) <= 300 else text[:297] + '...'


# ---------------------------------------------------------------------------
# Writing


def _check_existing_manifest(path: str, fmt: str, buckets: int) -> None:
  ensure_storage_options()
  storage.preflight(path, FileSystems._pipeline_options)  # pylint: disable=protected-access
  try:
    existing = read_manifest(path)
  except ValueError as e:
    raise ConfigError(f'cannot add to {path}: {e}') from None
  if existing and (existing['format'], existing['buckets']) != (fmt, buckets):
    raise ConfigError(
        f'archive {path} holds {existing["format"]} files in {existing["buckets"]} buckets; '
        f'cannot add {fmt} files in {buckets} buckets (write a new archive instead)')


class PartitionWriter:
  """Writes one (hour, bucket) group of envelopes as the archive's files, in plain Python:
  sorted by (partition_key, sequence), cut into files of at most ``max_events_per_file``,
  each named by the run id, its chunk number and ``tag`` (the window and pane; '' in batch).
  Yields one record per file written (see :class:`WriteArchive`)."""

  def __init__(self, path: str, fmt: str, run_id: str, registry: Registry, codec: str,
               max_events_per_file: int):
    self._path, self._fmt, self._run_id = path, fmt, run_id
    self._reg, self._codec, self._max = registry, codec, max_events_per_file

  def write(self, hour: str, bucket: int, events: Sequence[Envelope], tag: str = '',
            sources: Optional[Sequence[Any]] = None) -> Iterator[Dict[str, Any]]:
    """``events`` (with ``sources[i]`` event i's, recorded per file when given), any order."""
    if sources is not None:  # sorted together, so sources[i] stays event i's
      pairs = sorted(zip(events, sources), key=lambda pair: sort_key(pair[0]))
      events, sources = [e for e, _ in pairs], [s for _, s in pairs]
    else:
      events = sorted(events, key=sort_key)
    for n, chunk in enumerate(chunks(events, self._max)):
      name = file_name(self._run_id, n, self._fmt, tag)
      rel = join(partition_dir(hour, bucket), name)
      meta = {
          'sourcebeam.layout_version': str(LAYOUT_VERSION), 'sourcebeam.hour': hour,
          'sourcebeam.bucket': str(bucket), 'sourcebeam.sorted_by': ','.join(SORT_ORDER),
          'sourcebeam.run_id': self._run_id}
      if self._fmt == 'avro':
        blob = encode_avro(chunk, self._reg, codec=self._codec, metadata=meta, name=rel)
      else:
        blob = encode_parquet(chunk, self._reg, metadata=meta)
      out = join(self._path, rel)
      write_bytes(out, blob)
      record = {'path': out, 'events': len(chunk), 'hour': hour, 'bucket': bucket}
      if sources is not None:
        record['sources'] = sources[n * self._max:n * self._max + len(chunk)]
      yield record


class _WritePartitionFiles(beam.DoFn):
  """One (hour, bucket) group through :class:`PartitionWriter`."""

  def __init__(self, writer: PartitionWriter, with_sources: bool = False):
    self._writer = writer
    self._with_sources = with_sources
    self._files = Metrics.counter('archive', 'files_written')
    self._events = Metrics.counter('archive', 'events_written')

  def process(self, element, win=beam.DoFn.WindowParam, pane=beam.DoFn.PaneInfoParam):
    (hour, bucket), events = element
    sources = None
    if self._with_sources:
      pairs = list(events)
      events, sources = [e for e, _ in pairs], [s for _, s in pairs]
    for record in self._writer.write(hour, bucket, list(events), self._window_tag(win, pane),
                                     sources):
      self._files.inc()
      self._events.inc(record['events'])
      yield record

  @staticmethod
  def _window_tag(win, pane) -> str:
    """'' for the global window's first pane (batch); window start and pane otherwise."""
    index = getattr(pane, 'index', 0) or 0
    if isinstance(win, beam_window.GlobalWindow) and index == 0:
      return ''
    start = '' if isinstance(win, beam_window.GlobalWindow) else f'-w{win.start.micros // 1000}'
    return f'{start}-p{index:04d}'


def _write_manifest(_, path: str, manifest: Dict[str, Any]) -> str:
  write_bytes(join(path, MANIFEST_NAME), json.dumps(manifest, indent=2).encode('utf-8'))
  return join(path, MANIFEST_NAME)


class WriteArchive(beam.PTransform):
  """Archive envelopes under ``path``, partitioned by event-time hour and key bucket.

  Returns a PCollection of one record per file written:
  ``{'path': str, 'events': int, 'hour': 'YYYY-MM-DDTHH', 'bucket': int}``.

  Bounded input is grouped directly; unbounded input must be windowed first
  (GroupByKey per (hour, bucket) needs windows or triggers on a live stream).
  ``run_id`` defaults to a fresh id per pipeline construction; pass one to make
  file names reproducible. With ``with_sources=True`` the input is
  ``(envelope, source)`` pairs and each file record also has ``'sources'``: the
  pairs' sources in the file's event order (the live archive records Kafka
  offsets this way, see :mod:`transforms.live_archive`).
  """

  def __init__(self, path: str, format: str = 'avro', buckets: int = DEFAULT_BUCKETS, *,
               registry: Registry, codec: str = 'deflate',
               max_events_per_file: int = DEFAULT_MAX_EVENTS_PER_FILE,
               run_id: Optional[str] = None, with_sources: bool = False):
    super().__init__()
    self._with_sources = with_sources
    self._manifest = make_manifest(format, buckets)  # validates format and buckets
    if codec not in AVRO_CODECS:
      raise ValueError(f'Avro codec must be one of {AVRO_CODECS}, not {codec!r}')
    if max_events_per_file < 1:
      raise ValueError('max_events_per_file must be at least 1')
    run_id = run_id or new_run_id()
    if not _RUN_ID_RE.match(run_id):
      raise ValueError(f'run_id {run_id!r} must be 1-64 letters, digits, "_" or "."')
    self._path = path.rstrip('/')
    self._fmt, self._buckets, self._codec = format, buckets, codec
    self._registry = _require_registry(registry)
    self._max = max_events_per_file
    self.run_id = run_id

  def expand(self, pcoll):
    buckets, with_sources = self._buckets, self._with_sources
    files = (
        pcoll
        | 'ByHourAndBucket' >> beam.Map(
            lambda x: (partition_of(x[0] if with_sources else x, buckets), x))
        | 'GroupPartitions' >> beam.GroupByKey()
        | 'SortAndWrite' >> beam.ParDo(_WritePartitionFiles(self.partition_writer(),
                                                             self._with_sources)))
    self.write_manifest(pcoll.pipeline)
    return files

  @property
  def buckets(self) -> int:
    return self._buckets

  def partition_writer(self) -> PartitionWriter:
    """The plain-Python writer of one (hour, bucket) group, for a step that groups its own
    events by partition (a bounded publish, :mod:`transforms.bounded_publish`)."""
    return PartitionWriter(self._path, self._fmt, self.run_id, self._registry, self._codec,
                           self._max)

  def write_manifest(self, pipeline: beam.Pipeline) -> None:
    """Check what is already at the archive's path, and write its manifest when ``pipeline``
    runs (what :meth:`expand` does besides the files)."""
    _check_existing_manifest(self._path, self._fmt, self._buckets)
    _ = (
        pipeline
        | 'Manifest' >> beam.Create([None])
        | 'WriteManifest' >> beam.Map(_write_manifest, self._path, self._manifest))


# ---------------------------------------------------------------------------
# Reading


class _DecodeArchiveFile(beam.DoFn):
  """Decodes one archive file; a file that cannot be read goes to ``corrupt``."""

  def __init__(self, registry: Registry, with_timestamps: bool):
    self._reg, self._with_timestamps = registry, with_timestamps
    self._events = Metrics.counter('archive', 'events_read')
    self._corrupt = Metrics.counter('archive', 'corrupt_files')
    self._unknown = Metrics.counter('archive', 'unknown_type')

  def process(self, metadata):
    path = metadata.path
    try:
      events = read_archive_file(path, self._reg)
    except (CorruptArchiveFile, IncompatibleSchema) as e:
      self._corrupt.inc()
      reason = e.reason if isinstance(e, CorruptArchiveFile) else str(e)
      if reason.startswith(path + ': '):
        reason = reason[len(path) + 2:]
      _LOG.warning('archive file %s not read: %s', path, reason)
      yield beam.pvalue.TaggedOutput(CORRUPT, {'path': path, 'reason': reason})
      return
    events, unknown = known_events(events, self._reg)
    self._events.inc(len(events))
    for env in unknown:  # an application with fewer types than the writer's: counted, skipped
      self._unknown.inc()
      yield beam.pvalue.TaggedOutput(UNKNOWN_TYPE, env['event_type'])
    if self._with_timestamps:
      for env in events:
        yield beam_window.TimestampedValue(env, env['event_time'] / 1000.0)
    else:
      yield from events


class ReadArchive(beam.PTransform):
  """The bounded source of a replay: every event of the archive at ``path``.

  Returns ``{'events': PCollection[envelope], 'corrupt': PCollection[{'path', 'reason'}],
  'unknown_type': PCollection[event type name]}``: the last names, once per event, the
  events skipped because ``registry`` does not know their type.
  Events carry their ``event_time`` as element timestamp (so windows and
  event-time timers behave as they would live), unless ``with_timestamps`` is
  False. ``registry`` (a Registry or a schema directory) gives the reader
  schemas; files written with older compatible schemas are resolved to it, and
  files it cannot resolve are reported in ``corrupt`` with the type and field.
  The archive must exist when the pipeline is built (ConfigError otherwise).
  """

  def __init__(self, path: str, *, registry: Registry, with_timestamps: bool = True):
    super().__init__()
    self._path = path.rstrip('/')
    self._registry = _require_registry(registry)
    self._with_timestamps = with_timestamps

  def expand(self, pbegin):
    manifest = check_archive_path(self._path)
    matched = pbegin | 'MatchFiles' >> match_data_files(self._path, manifest)
    results = (
        matched.files
        | 'SpreadFiles' >> beam.Reshuffle()
        | 'Decode' >> beam.ParDo(_DecodeArchiveFile(self._registry, self._with_timestamps))
        .with_outputs(CORRUPT, UNKNOWN_TYPE, main=EVENTS))
    corrupt = (matched.corrupt, results[CORRUPT]) | 'AllCorrupt' >> beam.Flatten()
    return {EVENTS: results[EVENTS], CORRUPT: corrupt, UNKNOWN_TYPE: results[UNKNOWN_TYPE]}
