"""`run.py bench replay`: the whole application's replay and publish against raw decode.

What it measures, in one run, on one archive of N events of the demo app (every
domain in the main job's proportions: retail events, taxi rides and fares, rider
trips with their taxis' positions; built once at Hello, Retail!'s ~116 events/s
unless ``--rate``, cached under ``.cache/bench/`` with the raw JSON lines it was
published from beside it; ``--retail-only`` builds the retail-only archive of
before issue 17; ``--archive PATH`` and ``--input RAW`` measure another app's own):

* ``raw_decode_eps``: the archive's files decoded to envelope dicts, the form
  handlers take, in plain Python on one core (fastavro for Avro, pyarrow for
  Parquet; ``raw_columnar_eps`` adds pyarrow's Arrow-only read for Parquet).
  The ceiling for anything in Python that looks at every event.
* ``best_decode_eps``: the best fastavro / Arrow decode of the same envelopes
  (the archive's schema with its ``data`` union) to dicts, in memory: fastavro's
  reader on an uncompressed and on a deflated container, Arrow's ``to_pylist``
  of the Parquet layout (Arrow's columnar read alone is reported beside, in
  ``best_decode``); ``raw_vs_best_decode`` is how close the archive gets.
* ``naive_beam_eps``: what a first Beam pipeline does: ``ReadArchive``, key by
  partition key, a stateful DoFn keeping each key's last sequence (so a
  shuffle of every event to its key).
* ``replay_eps``: Sourcebeam's full replay of the application (``--app``, the
  demo without it), :class:`ReplayApp`: decode, check every file against the
  layout, per-key ordering through the ordering core, every view (final record
  per key), projection and consumer, unprocessed records, per-bucket stats, all
  counted at the end.
* ``consumer_us_per_event``: each consumer replayed alone, less the replay of no
  consumer (read, layout check, ordering), per archive event (wall time; the
  same in CPU time in ``consumer_cpu_us_per_event``).
* ``parse_eps`` and ``publish_eps``: the raw lines merely parsed with the
  publishing boundary's parser (``schemas.validation.parse_json``), one core,
  and ``run.py publish --archive`` of the same lines (the whole command).

Each measurement runs in a fresh process (so ``peak_rss_mb`` is the replay's
own: its process plus its worker processes) and counts from the pipeline's
outputs are checked against the archive (every event accounted for). Each also
reports its CPU seconds (``replay_vs_raw_decode_cpu``, ``publish_vs_parse_cpu``):
on a machine shared with other work the wall time stretches with the load, the
CPU time much less, and ``load_average`` says how shared it was.
``speedup_vs_realtime`` is the archive's event-time span over the replay's wall
time. ``--workers 1,2`` repeats the replay with that many workers (the
DirectRunner's processes, or Flink's ``--parallelism``) and reports each.

Issue 17, the whole app (profiles of the replay of a 100k-event app archive):

* Beam's SDK worker caches user state between bundles and weighs each cached
  value with ``objsize.get_deep_size``, which first walks the globals of every
  loaded module (~2,000 with Beam's GCP and AWS extras): ~7 ms per stateful key
  written. The taxi consumer (rides joined with fares and long-ride alerts in
  per-ride state with timers) spent 49 of 64 s there, the naive pipeline most of
  its time. Local runners now weigh it without that walk
  (:func:`sourcebeam.pipelines.worker_tuning.cheap_state_cache_weights`).
* What remains is Beam's own per-element cost in the consumers that are Beam
  transforms (taxi: two stateful DoFns with timers, a windowed combine; riders:
  three groupings of envelopes), against a few microseconds per event for the
  views that run inside the bucket replay, and a fixed cost of a few CPU seconds
  per pipeline (Beam inspects every DoFn's signatures while it builds and
  translates the pipeline).
* Publish: the standard library's JSON parser and ``strftime`` (hour of each
  event, ISO time of each published line) were a fifth of the plain-Python part;
  orjson (kept to the lines it reads exactly as ``json.loads``) and per-hour /
  per-second caches cut them. The rest was Beam's per-element work: the read, a
  grouping of every event to its key for the resequencer and another by (hour,
  bucket) for the archive, the published JSON and the counts (~330 us of CPU per
  event in all). A bounded publish now moves a batch of lines per element and
  groups once per partition-key bucket (:mod:`sourcebeam.transforms.bounded_publish`):
  what is left is the publishing itself (boundary ~25, resequencer ~10, published
  JSON ~5, Avro ~15 us per event) and Beam's coding of the batches.

Before issue 17 (retail only): profile, before optimising (cProfile and timed parts of
the plain-Python bucket replay, 200k Avro events; the same code the Beam DoFn runs):

* Decoding was the first surprise: ``read_archive_file`` ran at 40% of plain
  fastavro's speed because files written by another process carry the same
  schema with JSON keys in another order, so the byte comparison failed and
  every file went through Avro schema resolution. Comparing the schemas as JSON
  values (``archive_format._is_own_writer_schema``) made it equal to fastavro.
* After that, per event: decode ~8-10 us, the layout check ~0.3 us, the
  ordering core's ``receive`` (with a no-op handler) ~2-4 us, the retail
  handlers ~13-20 us. Within the handlers (cProfile, 200k events, 146k of them
  views): ``FrequentlyViewedHandler`` re-sorted the user's whole view count on
  every view (``top_viewed``: 2.6M sort-key calls, the biggest single cost);
  the cart's ``QuantityORSet`` re-validated every add (``_canon`` per element)
  and rescanned every tag on each change, and rebuilt and re-sorted its value
  (a ``json.dumps`` per element) twice per change; every applied event built
  its output record (a dict, a products list, the top-10 dicts) although a
  bounded replay keeps only the last per view and key (31,775 records kept of
  ~330k built); ``CombinedHandler`` called all three user handlers for every
  event, though each event type concerns one or two.
* Fixed, with outputs unchanged (a 200k replay's outputs hash the same before
  and after; tests pin each path): frequently viewed keeps its top 10
  incrementally (``projections.bump_top``, exact because counts only grow);
  ``QuantityORSet.add``/``remove`` derive tags and per-element totals from the
  value they extend (only the new add is validated; ``value()`` computed at
  most once per value); the retail handlers are ``step`` + ``record`` and
  :class:`ReplayRetailProjections` runs them through ``DeferredRecords``, which
  builds only the records it keeps; ``CombinedHandler`` skips handlers by
  ``event_types``; Parquet rows are built with ``dict(zip(...))``. States stay
  immutable values (no in-place mutation: the ordering core keeps the old state
  when a handler raises, and a deferred record holds the state it came from).
* After (CPU seconds, best of 3, plain-Python bucket replay of the 200k
  archive, old and new code in the same session): the whole replay went from
  23.7-29.7 us to 17-18 us per event, the handlers from ~14-20 us to ~6 us;
  decode + layout check (8-10 us) is now half of the replay and the ordering
  core (~2 us) most of the rest. In Beam on 1M events the replay went from
  0.29x to 0.35-0.52x of raw decode in its run (22,201 -> 29,597-32,429 ev/s).
* 10,000x real time at Hello, Retail!'s rate is 1.16M events/s: twelve times
  what fastavro alone decodes on one core here (~60-90k/s), so no Python
  replay that looks at every event reaches it on 2 cores. At ~17 us per event
  per core it needs ~20 busy cores. The replay parallelises per bucket (a
  key's state runs through every hour, so hours stay in order within a bucket):
  an archive written with 32 buckets (``WriteArchive(path, buckets=32)``, or
  this benchmark's ``--buckets 32``; 16 buckets cap it at ~940k/s) on a
  Flink or Dataflow cluster of 20-30 worker cores is the way (the README's
  "Replaying a big archive on Flink or Dataflow").
* Python's cyclic GC spent ~10-15% on full collections over a bucket's key states
  and found nothing: paused while a bucket's hour of files is fed.
* Beam adds little to the replay: only per-bucket work items and the final
  records cross it (1M events: 34 s in plain Python, 35 s in Beam). The naive
  pipeline spends its time moving every event through Beam state: about 20x
  slower per event than its decode.
"""

from __future__ import annotations

import argparse
import collections
import heapq
import io
import itertools
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from sourcebeam.pipelines.apps import add_app_argument

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
CACHE_DIR = os.path.join(ROOT, '.cache', 'bench')
DEFAULT_EVENTS = 1_000_000
BUILD_RUN_ID = 'bench'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--events', type=int, default=DEFAULT_EVENTS,
                      help=f'events in the archive, every domain of the demo app in the main '
                           f'job\'s proportions (default: {DEFAULT_EVENTS:,})')
  parser.add_argument('--archive', default=None, metavar='PATH',
                      help='measure this existing archive instead of building one (an app other '
                           'than the demo: its own archive); with --input for publish')
  parser.add_argument('--input', default=None, metavar='RAW',
                      help='raw JSON lines of the same events, for the publish and parse '
                           'measurements (with --archive)')
  parser.add_argument('--retail-only', action='store_true',
                      help='build a retail-only archive (the benchmark before issue 17)')
  parser.add_argument('--skip-consumers', action='store_true',
                      help='do not time each consumer alone')
  parser.add_argument('--skip-publish', action='store_true',
                      help='do not time publish and parse')
  parser.add_argument('--format', choices=('avro', 'parquet'), default='avro',
                      help='archive format (default: avro)')
  parser.add_argument('--rate', type=float, default=None,
                      help='events per second of event time when generating the archive '
                           '(default: Hello, Retail!\'s 10M/day, ~116/s)')
  parser.add_argument('--buckets', type=int, default=16, help='archive key buckets (default: 16)')
  parser.add_argument('--seed', type=int, default=1, help='generator seed (default: 1)')
  parser.add_argument('--sizes', default=None, metavar='N,N,...',
                      help='run at several archive sizes (the last one gives the JSON line)')
  parser.add_argument('--plot', default=None, metavar='PNG',
                      help='write a plot of events/s against archive size for the three lines')
  parser.add_argument('--workers', default=None, metavar='W,W,...',
                      help='also time the replay with each worker count (DirectRunner processes, '
                           'or --parallelism on Flink) and report the speed-up')
  parser.add_argument('--skip-naive', action='store_true', help='do not run the naive baseline')
  parser.add_argument('--cache-dir', default=CACHE_DIR, help=f'archive cache (default: {CACHE_DIR})')
  add_app_argument(parser)


# ---------------------------------------------------------------------------
# The archive, built once per (events, format, rate, seed, buckets)


def archive_path(cache_dir: str, n: int, fmt: str, rate: float, seed: int, buckets: int) -> str:
  return os.path.join(cache_dir, f'retail-{fmt}-n{n}-r{rate:g}-s{seed}-b{buckets}')


def _built(path: str) -> Optional[Dict[str, Any]]:
  """The facts of the archive already built at ``path`` (its ``_bench.json``), or None after
  clearing ``path`` for a new build."""
  facts_path = os.path.join(path, '_bench.json')
  if os.path.exists(facts_path):
    with open(facts_path) as f:
      return json.load(f)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.makedirs(path)
  return None


def write_hour_files(path: str, hour: str, events: List[Dict[str, Any]], reg: Any, fmt: str,
                     buckets: int, chunk_no: Dict[Tuple[str, int], int]) -> int:
  """One hour's events as the archive's files, per bucket in the archive's sort order and
  chunks; ``chunk_no`` numbers each (hour, bucket)'s files across calls (a late event of an
  hour already written gets a file of its own). Returns the number of files written."""
  from sourcebeam.transforms.archive import write_bytes
  from sourcebeam.transforms.archive_format import (DEFAULT_MAX_EVENTS_PER_FILE, LAYOUT_VERSION,
                                                    SORT_ORDER, bucket_of, chunks, encode_avro,
                                                    encode_parquet, file_name, join,
                                                    partition_dir, sort_key)
  by_bucket: Dict[int, List[Dict[str, Any]]] = collections.defaultdict(list)
  for e in events:
    by_bucket[bucket_of(e['partition_key'], buckets)].append(e)
  files = 0
  for bucket, group in sorted(by_bucket.items()):
    group.sort(key=sort_key)
    for chunk in chunks(group, DEFAULT_MAX_EVENTS_PER_FILE):
      i = chunk_no[hour, bucket]
      chunk_no[hour, bucket] += 1
      rel = join(partition_dir(hour, bucket), file_name(BUILD_RUN_ID, i, fmt))
      meta = {'sourcebeam.layout_version': str(LAYOUT_VERSION), 'sourcebeam.hour': hour,
              'sourcebeam.bucket': str(bucket), 'sourcebeam.sorted_by': ','.join(SORT_ORDER),
              'sourcebeam.run_id': BUILD_RUN_ID}
      blob = (encode_avro(chunk, reg, metadata=meta, name=rel) if fmt == 'avro'
              else encode_parquet(chunk, reg, metadata=meta))
      os.makedirs(os.path.dirname(join(path, rel)), exist_ok=True)
      write_bytes(join(path, rel), blob)
      files += 1
  return files


def build_archive(path: str, n: int, fmt: str, rate: float, seed: int, buckets: int) -> Dict[str, Any]:
  """Write (or find) the archive; returns its facts ``{events, span_ms, files}``.

  Written in plain Python with the archive's own encoders and layout (Beam's
  WriteArchive would shuffle 10M events for no benefit here), hour by hour as
  the generator produces them, so memory holds one hour of events.
  """
  facts = _built(path)
  if facts is not None:
    return facts
  from sourcebeam.generators import phases, retail
  from sourcebeam.generators.jsonl import demo_registry
  from sourcebeam.transforms.archive import write_bytes
  from sourcebeam.transforms.archive_format import MANIFEST_NAME, hour_of, join, make_manifest
  reg = demo_registry()
  files = 0

  def flush(hour: str, events: List[Dict[str, Any]]) -> None:
    nonlocal files
    files += write_hour_files(path, hour, events, reg, fmt, buckets, collections.Counter())

  hour, pending, first, last, count = None, [], None, None, 0
  for t, env in retail.timed_retail_events(n, seed, phases=phases.constant_for(n, rate)):
    env['event_time'] = t
    h = hour_of(t)
    if h != hour and pending:
      flush(hour, pending)
      pending = []
    hour = h
    pending.append(env)
    first = t if first is None else first
    last, count = t, count + 1
  if pending:
    flush(hour, pending)
  write_bytes(join(path, MANIFEST_NAME), json.dumps(make_manifest(fmt, buckets), indent=2).encode())
  facts = {'events': count, 'span_ms': (last - first) if count else 0, 'files': files,
           'format': fmt, 'rate': rate, 'seed': seed, 'buckets': buckets}
  with open(os.path.join(path, '_bench.json'), 'w') as f:
    json.dump(facts, f)
  return facts


# The main job's sample day (pipelines/main_job.py defaults): 20,000 retail events, 1,000 taxi
# rides (2,993 events) and 40 rider trips (11,592 events, most of them taxi positions).
MAIN_JOB_MIX = {'retail_events': 20_000, 'taxi_rides': 1_000, 'rider_trips': 40}
MAIN_JOB_EVENTS = 34_585  # what that day's three generators give


def app_archive_path(cache_dir: str, n: int, fmt: str, rate: float, seed: int, buckets: int) -> str:
  return os.path.join(cache_dir, f'app-{fmt}-n{n}-r{rate:g}-s{seed}-b{buckets}')


def raw_path_of(path: str) -> str:
  """The raw JSON lines the archive's events were published from (beside the archive)."""
  return path.rstrip('/') + '.raw.jsonl'


def _app_arrivals(n: int, rate: float, seed: int) -> Iterable[Tuple[int, bytes]]:
  """(arrival millis, raw JSON line) of the demo app's three domains, merged in arrival order.

  Each domain arrives at its share of ``rate`` in the main job's proportions: retail
  events, taxi rides (three events each, delivered late by up to a minute) and rider trips
  (a request, a pickup, a drop-off and the taxi's positions every 5 s). Each generator
  gives more than enough; the caller takes the first ``n`` (a prefix in arrival order
  keeps every key's sequences without a hole).
  """
  from sourcebeam.generators import phases, retail, riders, taxi
  from sourcebeam.generators.jsonl import encode_line
  scale = n / MAIN_JOB_EVENTS
  span_s = n / rate
  # Rider trips last ~25 min, so their positions ramp up over the first half hour: each
  # generator may give 1.5x its share, the prefix of n keeps what arrives first.
  n_retail = int(MAIN_JOB_MIX['retail_events'] * scale * 1.5) + 1000
  n_rides = int(MAIN_JOB_MIX['taxi_rides'] * scale * 1.5) + 10
  n_trips = int(MAIN_JOB_MIX['rider_trips'] * scale * 1.5) + 2
  retail_rate = MAIN_JOB_MIX['retail_events'] * scale / span_s
  ride_rate = MAIN_JOB_MIX['taxi_rides'] * scale / span_s
  trip_rate = MAIN_JOB_MIX['rider_trips'] * scale / span_s
  streams = [
      ((t, encode_line(e)) for t, e in retail.timed_retail_events(
          n_retail, seed, phases=phases.constant_for(n_retail, retail_rate))),
      ((ev.delivered, encode_line(e)) for ev, e in taxi.envelopes(taxi.taxi_feed(
          n_rides, seed, phases=phases.constant_for(n_rides, ride_rate)))),
      ((t, encode_line(e)) for t, e in riders.timed_rider_events(
          n_trips, seed, phases=phases.constant_for(n_trips, trip_rate))),
  ]
  return itertools.islice(heapq.merge(*streams, key=lambda te: te[0]), n)


def build_app_archive(path: str, n: int, fmt: str, rate: float, seed: int,
                      buckets: int) -> Dict[str, Any]:
  """The demo app's archive of ``n`` events (every domain, main job proportions) and the raw
  lines they were published from (:func:`raw_path_of`); returns its facts.

  Each raw line goes through the publishing boundary (``publish_raw``, what ``run.py
  publish`` does per line), and the published envelopes are written with the archive's
  own encoders and layout, a few hours at a time (taxi events arrive late, so an hour is
  written once arrivals are two hours past it; a late event still gets its own file).
  """
  facts = _built(path)
  if facts is not None:
    return facts
  from sourcebeam.generators.jsonl import demo_registry
  from sourcebeam.schemas.validation import publish_raw
  from sourcebeam.transforms.archive import write_bytes
  from sourcebeam.transforms.archive_format import MANIFEST_NAME, hour_of, join, make_manifest
  reg = demo_registry()
  files = 0
  chunk_no: Dict[Tuple[str, int], int] = collections.Counter()

  def flush(hour: str, events: List[Dict[str, Any]]) -> None:
    nonlocal files
    files += write_hour_files(path, hour, events, reg, fmt, buckets, chunk_no)

  pending: Dict[str, List[Dict[str, Any]]] = collections.defaultdict(list)
  first = last = None
  count = 0
  by_type: Dict[str, int] = collections.Counter()
  with open(raw_path_of(path), 'wb') as raw_out:
    for arrived, line in _app_arrivals(n, rate, seed):
      raw_out.write(line + b'\n')
      env, dead, _ = publish_raw(line, reg)
      if env is None:
        raise RuntimeError(f'generated event dead-lettered: {dead}')
      t = env['event_time']
      pending[hour_of(t)].append(env)
      by_type[env['event_type']] += 1
      first = t if first is None else min(first, t)
      last = t if last is None else max(last, t)
      count += 1
      if count % 50_000 == 0:  # hours two hours behind the arrivals are complete
        done = hour_of(arrived - 2 * 3_600_000)
        for hour in sorted(h for h in pending if h < done):
          flush(hour, pending.pop(hour))
  for hour in sorted(pending):
    flush(hour, pending.pop(hour))
  write_bytes(join(path, MANIFEST_NAME), json.dumps(make_manifest(fmt, buckets), indent=2).encode())
  facts = {'events': count, 'span_ms': (last - first) if count else 0, 'files': files,
           'format': fmt, 'rate': rate, 'seed': seed, 'buckets': buckets,
           'by_type': dict(sorted(by_type.items())), 'raw': raw_path_of(path)}
  with open(os.path.join(path, '_bench.json'), 'w') as f:
    json.dump(facts, f)
  return facts


# ---------------------------------------------------------------------------
# The three measurements, each in its own process


def _peak_rss_mb() -> float:
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return round((own + children) / 1024, 1)  # ru_maxrss is in KiB on Linux


def measure_raw_decode(path: str) -> Dict[str, Any]:
  """Every file decoded to dicts, no Beam, no checks: the decode ceiling."""
  from sourcebeam.transforms.archive import list_archive_files
  import fastavro
  import pyarrow as pa
  import pyarrow.parquet as pq
  files = list_archive_files(path)
  started = time.perf_counter()
  cpu = time.process_time()
  n = 0
  for f in files:
    with open(f.path, 'rb') as fo:
      blob = fo.read()
    if f.format == 'avro':
      n += len(list(fastavro.reader(io.BytesIO(blob))))
    else:
      n += len(pq.read_table(pa.BufferReader(blob)).to_pylist())
  seconds = time.perf_counter() - started
  out = {'events': n, 'seconds': seconds, 'cpu_seconds': time.process_time() - cpu}
  if files and files[0].format == 'parquet':
    started = time.perf_counter()
    rows = 0
    for f in files:
      with open(f.path, 'rb') as fo:
        rows += pq.read_table(pa.BufferReader(fo.read())).num_rows
    out['columnar_seconds'] = time.perf_counter() - started
  out['peak_rss_mb'] = _peak_rss_mb()
  return out


def measure_best_decode(path: str, app_spec: Optional[str] = None,
                        limit: int = 200_000) -> Dict[str, Any]:
  """The best fastavro / Arrow decode of the archive's own envelopes, in memory, one core.

  The first ``limit`` events (to bound memory) are written again as: an Avro container
  with the archive's envelope schema and its ``data`` union, uncompressed and deflated
  (the archive's codec), decoded with ``fastavro.reader`` (the fastest fastavro reader of
  record dicts); the archive's Parquet layout decoded to dicts by Arrow (``to_pylist``),
  and Arrow's columnar read alone (no Python objects: a ceiling no dict-consuming code
  reaches). ``best_eps`` is the best of the decodes that give envelope dicts.
  """
  import fastavro
  import pyarrow as pa
  import pyarrow.parquet as pq
  from sourcebeam.transforms.archive import list_archive_files
  from sourcebeam.transforms.archive_format import encode_parquet, read_events
  from sourcebeam.pipelines.apps import load_app
  files = list_archive_files(path)
  reg = load_app(app_spec).registry
  events: List[Dict[str, Any]] = []
  for f in files:
    with open(f.path, 'rb') as fo:
      events.extend(read_events(fo, f.format, reg, f.path))
    if len(events) >= limit:
      break
  events = events[:limit]
  n = len(events)
  out: Dict[str, Any] = {'events': n}

  def best_of(fn, repeat: int = 3) -> float:
    best = float('inf')
    for _ in range(repeat):
      started = time.perf_counter()
      got = fn()
      best = min(best, time.perf_counter() - started)
      assert got == n, (got, n)
    return n / best if best else 0.0

  for codec in ('null', 'deflate'):
    buf = io.BytesIO()
    from sourcebeam.schemas.envelope import to_avro_record
    fastavro.writer(buf, reg.parsed_envelope, (to_avro_record(e, reg) for e in events),
                    codec=codec)
    blob = buf.getvalue()
    out[f'fastavro_{codec}_eps'] = round(best_of(lambda: len(list(fastavro.reader(io.BytesIO(blob))))))
  pblob = encode_parquet(events, reg)
  out['arrow_to_pylist_eps'] = round(best_of(
      lambda: len(pq.read_table(pa.BufferReader(pblob)).to_pylist())))
  out['arrow_columnar_eps'] = round(best_of(lambda: pq.read_table(pa.BufferReader(pblob)).num_rows))
  out['best_eps'] = max(out['fastavro_null_eps'], out['fastavro_deflate_eps'],
                        out['arrow_to_pylist_eps'])
  out['best_decoder'] = max(('fastavro_null_eps', 'fastavro_deflate_eps', 'arrow_to_pylist_eps'),
                            key=lambda k: out[k])
  return out


def measure_parse(raw: str) -> Dict[str, Any]:
  """The raw JSON lines merely parsed, one core, with the parser the publishing boundary
  uses (:func:`sourcebeam.schemas.validation.parse_json`): what publish cannot beat."""
  from sourcebeam.schemas.validation import parse_json
  with open(raw, 'rb') as f:
    lines = f.read().splitlines()
  best = best_cpu = float('inf')
  for _ in range(3):
    started, cpu = time.perf_counter(), time.process_time()
    for line in lines:
      parse_json(line.decode('utf-8'))  # publish_raw decodes (and checks) UTF-8 first too
    best = min(best, time.perf_counter() - started)
    best_cpu = min(best_cpu, time.process_time() - cpu)
  return {'events': len(lines), 'seconds': best, 'cpu_seconds': best_cpu,
          'peak_rss_mb': _peak_rss_mb()}


def measure_publish(raw: str, beam_args: List[str], app_spec: Optional[str]) -> Dict[str, Any]:
  """``run.py publish`` of the raw lines with ``--archive`` (the whole command's pipeline:
  read, validate and repair, published JSON, dead letters, the Avro archive)."""
  from sourcebeam.pipelines import publish
  from sourcebeam.pipelines.apps import load_app
  out_dir = tempfile.mkdtemp(prefix='bench-publish-')
  try:
    summary = publish.run(raw, os.path.join(out_dir, 'out'), beam_args, load_app(app_spec),
                          archive=os.path.join(out_dir, 'archive'))
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
  return {'events': summary['in'], 'published': summary['published'],
          'dead_lettered': summary['dead_lettered'], 'seconds': summary['seconds'],
          'peak_rss_mb': _peak_rss_mb()}


def _write_json(obj: Any, path: str) -> None:
  from apache_beam.io.filesystems import FileSystems
  with FileSystems.create(path) as f:
    f.write(json.dumps(obj, sort_keys=True).encode('utf-8'))


def _count_in_one_combine(named: Dict[str, Any], path: str) -> None:
  """``{name: PCollection}`` -> ``path`` holding ``{'counts': {name: n}, 'stats': [...]}``;
  the ``stats`` PCollection's records are kept whole.

  Each output counted per bundle (what ``WriteCounts`` does), and one shuffle for every
  output (not one per output, as ``WriteCounts`` has), so the benchmark pipeline fits a small
  Flink TaskManager's network buffers.
  """
  import apache_beam as beam
  from apache_beam.transforms.window import GlobalWindows
  from sourcebeam.transforms.counting import count_per_bundle

  class CountByName(beam.CombineFn):
    def create_accumulator(self):
      return ({}, [])

    def add_input(self, acc, item):
      if isinstance(item, dict):  # partial counts
        for name, n in item.items():
          acc[0][name] = acc[0].get(name, 0) + n
      else:
        acc[1].append(item[1])
      return acc

    def merge_accumulators(self, accs):
      counts, stats = {}, []
      for c, s in accs:
        for k, v in c.items():
          counts[k] = counts.get(k, 0) + v
        stats.extend(s)
      return counts, stats

    def extract_output(self, acc):
      return {'counts': acc[0], 'stats': acc[1]}

  parts = [count_per_bundle(pc, name) for name, pc in sorted(named.items()) if name != 'stats']
  if 'stats' in named:
    parts.append(named['stats'] | 'Tag stats' >> beam.Map(lambda v: ('stats', v))
                 | 'Global stats' >> beam.WindowInto(GlobalWindows()))
  _ = (parts
       | 'AllOutputs' >> beam.Flatten()
       | 'CountByName' >> beam.CombineGlobally(CountByName())
       | 'WriteCounts' >> beam.Map(_write_json, path))


def measure_naive(path: str, beam_args: List[str], app_spec: Optional[str] = None) -> Dict[str, Any]:
  """ReadArchive, key, a stateful DoFn keeping the last sequence per key."""
  import apache_beam as beam
  from apache_beam.coders import VarIntCoder
  from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
  from sourcebeam.pipelines.apps import load_app
  from sourcebeam.pipelines.options import pipeline_options
  from sourcebeam.transforms.archive import ReadArchive

  class LastSequence(beam.DoFn):
    LAST = ReadModifyWriteStateSpec('last', VarIntCoder())

    def process(self, kv, last=beam.DoFn.StateParam(LAST)):
      seq = kv[1]['sequence']
      prev = last.read()
      if prev is None or seq > prev:
        last.write(seq)
      yield 1

  out_dir = tempfile.mkdtemp(prefix='bench-naive-')
  result = os.path.join(out_dir, 'counts.json')
  try:
    options = pipeline_options(beam_args)
    started = time.perf_counter()
    with beam.Pipeline(options=options) as p:
      events = (p | 'Read' >> ReadArchive(path, with_timestamps=False,
                                          registry=load_app(app_spec).registry))['events']
      seen = (events
              | 'Key' >> beam.Map(lambda e: (e['partition_key'], e)).with_output_types(
                  beam.typehints.Tuple[str, Any])
              | 'LastSequence' >> beam.ParDo(LastSequence()))
      _count_in_one_combine({'events': seen}, result)
    seconds = time.perf_counter() - started
    with open(result) as f:
      n = json.load(f)['counts'].get('events', 0)
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
  return {'events': n, 'seconds': seconds, 'peak_rss_mb': _peak_rss_mb()}


def app_with_only(app, names: Sequence[str]):
  """A copy of ``app`` with only the consumers named (the same objects)."""
  import copy
  sub = copy.copy(app)
  sub._consumers = {n: c for n, c in app._consumers.items() if n in names}  # noqa: SLF001
  return sub


def measure_replay(path: str, beam_args: List[str], app_spec: Optional[str] = None,
                   only: Optional[Sequence[str]] = None) -> Dict[str, Any]:
  """The app's whole replay (every consumer, :class:`ReplayApp`) with every output counted
  in the pipeline; ``only``: the replay of just those consumers (``[]``: none, the read,
  layout check and ordering alone)."""
  import apache_beam as beam
  from sourcebeam.pipelines.apps import load_app
  from sourcebeam.pipelines.options import pipeline_options
  from sourcebeam.transforms.consumers import ReplayApp

  app = load_app(app_spec)
  if only is not None:
    app = app_with_only(app, only)
  out_dir = tempfile.mkdtemp(prefix='bench-replay-')
  result = os.path.join(out_dir, 'counts.json')
  try:
    options = pipeline_options(beam_args)
    started = time.perf_counter()
    with beam.Pipeline(options=options) as p:
      replay = p | ReplayApp(app, path)
      named = {**replay.result.views, **replay.result.projections, **replay.result.consumers}
      named.update(unprocessed=replay.result.unprocessed, corrupt=replay.corrupt,
                   stats=replay.stats)
      _count_in_one_combine(named, result)
    seconds = time.perf_counter() - started
    with open(result) as f:
      got = json.load(f)
  finally:
    shutil.rmtree(out_dir, ignore_errors=True)
  counts = {name: got['counts'].get(name, 0) for name in sorted(named) if name != 'stats'}
  stats = got['stats']
  by_type: Dict[str, int] = collections.Counter()
  for s in stats:
    by_type.update(s['by_type'])
  return {'events': sum(s['events'] for s in stats), 'seconds': seconds, 'outputs': counts,
          'buckets': len(stats), 'files': sum(s['files'] for s in stats),
          'keys': sum(s['keys'] for s in stats),
          'keys_waiting_on_gap': sum(s['keys_waiting_on_gap'] for s in stats),
          'by_type': dict(sorted(by_type.items())), 'peak_rss_mb': _peak_rss_mb()}


def _cpu_seconds() -> float:
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _child(conn, fn, args) -> None:
  try:
    started = _cpu_seconds()
    value = fn(*args)
    if isinstance(value, dict):
      # CPU time of the whole measurement (setup included): on a shared machine the wall
      # time stretches with the load, the CPU time much less.
      value.setdefault('cpu_seconds', round(_cpu_seconds() - started, 3))
    conn.send(('ok', value))
  except BaseException as e:  # reported in the parent with the child's traceback
    import traceback
    conn.send(('error', f'{type(e).__name__}: {e}\n{traceback.format_exc()}'))
  finally:
    conn.close()


def _in_child(fn, *args) -> Dict[str, Any]:
  """Run one measurement in a fresh, non-daemon process (own memory peak; it may start
  worker processes of its own)."""
  ctx = multiprocessing.get_context('spawn')
  parent, child = ctx.Pipe(duplex=False)
  proc = ctx.Process(target=_child, args=(child, fn, args))
  proc.start()
  child.close()
  try:
    status, value = parent.recv()
  except EOFError:
    status, value = 'error', f'the measurement process died (exit code {proc.join() or proc.exitcode})'
  proc.join()
  if status != 'ok':
    raise RuntimeError(f'{getattr(fn, "__name__", fn)} failed: {value}')
  return value


def workers_args(beam_args: List[str], workers: int) -> List[str]:
  """The Beam options that give the replay ``workers`` parallel workers on its runner."""
  from sourcebeam.pipelines.runners import has_option, runner_of
  args = [a for a in beam_args if not a.startswith((
      '--parallelism', '--sdk_worker_parallelism', '--direct_num_workers', '--direct_running_mode'))]
  if runner_of(args) in ('FlinkRunner', 'PortableRunner'):
    # Flink runs the Python stages in SDK worker processes, one per TaskManager by
    # default, shared by its slots: one per slot, or parallelism 2 is one core.
    return args + [f'--parallelism={workers}', f'--sdk_worker_parallelism={workers}']
  if runner_of(args) == 'DirectRunner' and not has_option(args, '--direct_running_mode'):
    mode = 'in_memory' if workers == 1 else 'multi_processing'
    return args + [f'--direct_num_workers={workers}', f'--direct_running_mode={mode}']
  return args


# ---------------------------------------------------------------------------
# One size, several sizes, the plot


def archive_facts(path: str) -> Dict[str, Any]:
  """Events, files and event-time span of an existing archive (``--archive``)."""
  from sourcebeam.transforms.archive import list_archive_files
  from sourcebeam.transforms.archive_format import read_events
  from sourcebeam.generators.jsonl import demo_registry
  import fastavro
  files = list_archive_files(path)
  lo = hi = None
  n = 0
  for f in files:
    with open(f.path, 'rb') as fo:
      if f.format == 'avro':
        events = fastavro.reader(fo)
      else:
        events = read_events(fo, f.format, demo_registry(), f.path)
      for e in events:
        t = e['event_time']
        lo = t if lo is None or t < lo else lo
        hi = t if hi is None or t > hi else hi
        n += 1
  return {'events': n, 'files': len(files), 'span_ms': (hi - lo) if n else 0,
          'format': files[0].format if files else None}


def _is_demo(app_spec: Optional[str]) -> bool:
  from sourcebeam.pipelines.apps import DEFAULT_APP
  return app_spec in (None, DEFAULT_APP, 'sourcebeam.demo', 'sourcebeam.demo:app')


def run_size(n: int, args: argparse.Namespace, beam_args: List[str], log) -> Dict[str, Any]:
  from sourcebeam.generators.phases import HELLO_RETAIL_RATE
  from sourcebeam.pipelines.apps import load_app
  from sourcebeam.pipelines.cli import UsageError
  rate = args.rate or HELLO_RETAIL_RATE
  started = time.perf_counter()
  raw_lines = args.input
  if args.archive:
    path = args.archive
    log(f'archive {path}: measuring it as it is')
    facts = _in_child(archive_facts, path)
    rate = facts['events'] / (facts['span_ms'] / 1000) if facts['span_ms'] else rate
  elif not _is_demo(args.app):
    raise UsageError(f'--app {args.app}: the benchmark builds only the demo app\'s archive; give '
                     'the app\'s own with --archive PATH (and its raw lines with --input RAW)')
  elif args.retail_only:
    path = archive_path(args.cache_dir, n, args.format, rate, args.seed, args.buckets)
    log(f'archive {path}: building or reusing (retail only)')
    facts = _in_child(build_archive, path, n, args.format, rate, args.seed, args.buckets)
  else:
    path = app_archive_path(args.cache_dir, n, args.format, rate, args.seed, args.buckets)
    log(f'archive {path}: building or reusing (every domain of the demo app)')
    facts = _in_child(build_app_archive, path, n, args.format, rate, args.seed, args.buckets)
    raw_lines = raw_lines or facts['raw']
  log(f'  {facts["events"]:,} events in {facts["files"]} files, event-time span '
      f'{facts["span_ms"] / 3_600_000:.1f} h ({time.perf_counter() - started:.1f}s)')
  raw = _in_child(measure_raw_decode, path)
  log(f'  raw decode: {raw["events"] / raw["seconds"]:,.0f} events/s')
  best = _in_child(measure_best_decode, path, args.app)
  log(f'  best fastavro/Arrow decode of the same envelopes: {best["best_eps"]:,} events/s '
      f'({best["best_decoder"]}; Arrow columnar alone {best["arrow_columnar_eps"]:,})')
  naive = None
  if not args.skip_naive:
    naive = _in_child(measure_naive, path, beam_args, args.app)
    log(f'  naive Beam: {naive["events"] / naive["seconds"]:,.0f} events/s')
  worker_counts = [int(w) for w in args.workers.split(',')] if args.workers else [None]
  replays = {}
  for w in worker_counts:
    wargs = beam_args if w is None else workers_args(beam_args, w)
    replays[w] = _in_child(measure_replay, path, wargs, args.app)
    log(f'  replay{"" if w is None else f" ({w} workers)"}: '
        f'{replays[w]["events"] / replays[w]["seconds"]:,.0f} events/s')
  best_w = min(replays, key=lambda w: replays[w]['seconds'])
  rep = replays[best_w]
  alone: Dict[str, Dict[str, Any]] = {}
  if not args.skip_consumers:
    names = [c.name for c in load_app(args.app).consumers]
    for name in [None] + names:
      alone[name] = _in_child(measure_replay, path, beam_args, args.app,
                              [] if name is None else [name])
      log(f'  replay with {"no consumer" if name is None else name + " alone"}: '
          f'{alone[name]["seconds"]:.1f}s')
  parse = publish = None
  if raw_lines and not args.skip_publish:
    parse = _in_child(measure_parse, raw_lines)
    log(f'  parse raw lines: {parse["events"] / parse["seconds"]:,.0f} events/s')
    publish = _in_child(measure_publish, raw_lines, beam_args, args.app)
    log(f'  publish: {publish["events"] / publish["seconds"]:,.0f} events/s')
  for name, m in (('raw decode', raw), ('naive', naive), *(
      (f'replay w={w}', r) for w, r in replays.items())):
    if m is not None and m['events'] != facts['events']:
      raise RuntimeError(f'{name} counted {m["events"]} events, the archive holds {facts["events"]}')
  result: Dict[str, Any] = {
      'events': facts['events'],
      'format': args.format,
      'rate': round(rate, 3),
      'files': facts['files'],
      'span_hours': round(facts['span_ms'] / 3_600_000, 3),
      'span_seconds': round(facts['span_ms'] / 1000, 3),
      'raw_decode_eps': round(raw['events'] / raw['seconds']),
      'naive_beam_eps': round(naive['events'] / naive['seconds']) if naive else None,
      'replay_eps': round(rep['events'] / rep['seconds']),
      'replay_seconds': round(rep['seconds'], 3),
      'speedup_vs_realtime': round(facts['span_ms'] / 1000 / rep['seconds']),
      'peak_rss_mb': rep['peak_rss_mb'],
      'replay_vs_naive': round(rep['seconds'] and naive['seconds'] / rep['seconds'], 2) if naive else None,
      'replay_vs_raw_decode': round(raw['seconds'] / rep['seconds'], 3),
      'outputs': rep['outputs'],
      'keys': rep['keys'],
      'keys_waiting_on_gap': rep['keys_waiting_on_gap'],
      'by_type': rep['by_type'],
  }
  if 'columnar_seconds' in raw:
    result['raw_columnar_eps'] = round(raw['events'] / raw['columnar_seconds'])
  # The same ratio in CPU seconds (the replay's whole process: Beam's start-up included),
  # less bent by other work on a shared machine than wall time.
  result['replay_cpu_seconds'] = rep['cpu_seconds']
  result['replay_vs_raw_decode_cpu'] = round(raw['cpu_seconds'] / rep['cpu_seconds'], 3)
  result['load_average'] = [round(x, 2) for x in os.getloadavg()]
  result['best_decode_eps'] = best['best_eps']
  result['best_decode'] = best
  result['raw_vs_best_decode'] = round(result['raw_decode_eps'] / best['best_eps'], 3)
  if alone:
    events = facts['events']
    skeleton = alone[None]['seconds']
    result['replay_skeleton_us_per_event'] = round(skeleton / events * 1e6, 2)
    result['consumer_us_per_event'] = {
        name: round((m['seconds'] - skeleton) / events * 1e6, 2)
        for name, m in alone.items() if name is not None}
    result['consumer_alone_seconds'] = {
        ('(none)' if name is None else name): round(m['seconds'], 3) for name, m in alone.items()}
    skeleton_cpu = alone[None]['cpu_seconds']
    result['consumer_cpu_us_per_event'] = {
        name: round((m['cpu_seconds'] - skeleton_cpu) / events * 1e6, 2)
        for name, m in alone.items() if name is not None}
  if parse is not None:
    result['parse_eps'] = round(parse['events'] / parse['seconds'])
    result['publish_eps'] = round(publish['events'] / publish['seconds'])
    result['publish_vs_parse'] = round(result['publish_eps'] / result['parse_eps'], 3)
    result['publish_peak_rss_mb'] = publish['peak_rss_mb']
    result['publish_cpu_seconds'] = publish['cpu_seconds']
    result['publish_vs_parse_cpu'] = round(parse['cpu_seconds'] / publish['cpu_seconds'], 3)
    if publish['events'] != facts['events'] and not args.archive:
      raise RuntimeError(f'publish counted {publish["events"]} lines, the archive holds '
                         f'{facts["events"]} events')
  if best_w is not None:
    result['workers'] = best_w
    result['replay_eps_by_workers'] = {
        str(w): round(r['events'] / r['seconds']) for w, r in replays.items()}
    base = replays[worker_counts[0]]['seconds']
    result['speedup_by_workers'] = {str(w): round(base / r['seconds'], 2) for w, r in replays.items()}
    result['peak_rss_mb_by_workers'] = {str(w): r['peak_rss_mb'] for w, r in replays.items()}
  return result


def plot(results: Sequence[Dict[str, Any]], path: str, title: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  sizes = [r['events'] for r in results]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for key, label in (('raw_decode_eps', 'raw decode (no Beam, 1 core)'),
                     ('replay_eps', 'Sourcebeam replay (ordered, projections)'),
                     ('naive_beam_eps', 'naive Beam (read, key, stateful DoFn)')):
    ys = [r.get(key) for r in results]
    if any(y is not None for y in ys):
      ax.plot(sizes, ys, marker='o', label=label)
  rate = results[-1].get('rate')
  if rate:  # what the archive's own event rate, sped up, would need
    for factor, style in ((1_000, ':'), (10_000, '--')):
      ax.axhline(rate * factor, color='grey', linestyle=style, linewidth=1)
      ax.annotate(f'{factor:,}x real time ({rate * factor:,.0f}/s)', (sizes[0], rate * factor),
                  textcoords='offset points', xytext=(2, 3), fontsize=8, color='grey')
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('archive size (events)')
  ax.set_ylabel('events per second')
  ax.set_title(title)
  ax.grid(True, which='both', alpha=0.3)
  # Between the 10,000x line and the lines below: the upper right is empty at every size.
  ax.legend(loc='upper right', bbox_to_anchor=(1, 0.88), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _table(results: Sequence[Dict[str, Any]]) -> str:
  head = f'{"events":>11} {"raw decode/s":>13} {"naive Beam/s":>13} {"replay/s":>11} ' \
         f'{"vs naive":>9} {"vs raw":>7} {"x realtime":>11} {"peak MB":>8}'
  lines = [head, '-' * len(head)]
  for r in results:
    naive = f'{r["naive_beam_eps"]:>13,}' if r['naive_beam_eps'] else f'{"-":>13}'
    vs_naive = f'{r["replay_vs_naive"]:>8.2f}x' if r['replay_vs_naive'] else f'{"-":>9}'
    lines.append(f'{r["events"]:>11,} {r["raw_decode_eps"]:>13,} {naive} {r["replay_eps"]:>11,} '
                 f'{vs_naive} {r["replay_vs_raw_decode"]:>7.2f} {r["speedup_vs_realtime"]:>11,} '
                 f'{r["peak_rss_mb"]:>8,.0f}')
  r = results[-1]
  lines.append('')
  lines.append(f'best fastavro/Arrow decode of the same envelopes: {r["best_decode_eps"]:,}/s '
               f'({r["best_decode"]["best_decoder"]}); the archive\'s raw decode is '
               f'{r["raw_vs_best_decode"]:.2f}x of it')
  lines.append(f'replay vs raw decode in CPU seconds: {r["replay_vs_raw_decode_cpu"]:.3f}x; load '
               f'average {r["load_average"]}')
  if 'publish_eps' in r:
    lines.append(f'publish {r["publish_eps"]:,}/s vs parse alone {r["parse_eps"]:,}/s: '
                 f'{r["publish_vs_parse"]:.3f}x')
  if 'consumer_us_per_event' in r:
    lines.append('')
    lines.append(f'{"consumer":<28} {"alone s":>9} {"us/event":>9} {"CPU us/event":>13}   (over '
                 f'the replay of no consumer: {r["replay_skeleton_us_per_event"]:.2f} us/event)')
    for name, us in r['consumer_us_per_event'].items():
      lines.append(f'{name:<28} {r["consumer_alone_seconds"][name]:>9.2f} {us:>9.2f} '
                   f'{r["consumer_cpu_us_per_event"][name]:>13.2f}')
  return '\n'.join(lines)


def main(args: argparse.Namespace, beam_args: List[str]) -> int:
  from sourcebeam.pipelines.cli import UsageError
  sizes = [int(s) for s in args.sizes.split(',')] if args.sizes else [args.events]
  if any(s < 1 for s in sizes):
    raise UsageError('archive sizes must be at least 1 event')
  if args.rate is not None and args.rate <= 0:
    raise UsageError('--rate must be positive')

  def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

  results = [run_size(n, args, beam_args, log) for n in sizes]
  print(_table(results))
  if args.plot:
    from sourcebeam.pipelines.runners import runner_of
    plot(results, args.plot, f'Archive replay, {args.format}, {runner_of(beam_args)}')
    log(f'plot written to {args.plot}')
  final = dict(results[-1])
  final['runner'] = beam_args and next((a.split('=', 1)[1] for a in beam_args
                                        if a.startswith('--runner=')), None) or 'DirectRunner'
  if len(results) > 1:
    final['by_size'] = [{k: r[k] for k in ('events', 'raw_decode_eps', 'naive_beam_eps',
                                           'replay_eps', 'speedup_vs_realtime', 'peak_rss_mb')}
                        for r in results]
  print(json.dumps(final, sort_keys=True))
  return 0
