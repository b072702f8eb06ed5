"""`run.py bench replay`: archive replay against raw decode and a naive Beam pipeline.

What it measures, in one run, on one archive of N generated retail events
(built once at Hello, Retail!'s ~116 events/s unless ``--rate``, cached under
``.cache/bench/``):

* ``raw_decode_eps``: the archive's files decoded to envelope dicts, the form
  handlers take, in plain Python on one core (fastavro for Avro, pyarrow for
  Parquet; ``raw_columnar_eps`` adds pyarrow's Arrow-only read for Parquet).
  The ceiling for anything in Python that looks at every event.
* ``naive_beam_eps``: what a first Beam pipeline does: ``ReadArchive``, key by
  partition key, a stateful DoFn keeping each key's last sequence (so a
  shuffle of every event to its key).
* ``replay_eps``: Sourcebeam's full replay of the application (``--app``, the
  demo without it), :class:`ReplayApp`: decode, check every file against the
  layout, per-key ordering through the ordering core, every view (final record
  per key), projection and consumer, unprocessed records, per-bucket stats, all
  counted at the end.

Each measurement runs in a fresh process (so ``peak_rss_mb`` is the replay's
own: its process plus its worker processes) and counts from the pipeline's
outputs are checked against the archive (every event accounted for).
``speedup_vs_realtime`` is the archive's event-time span over the replay's wall
time. ``--workers 1,2`` repeats the replay with that many workers (the
DirectRunner's processes, or Flink's ``--parallelism``) and reports each.

Profile, before optimising (cProfile and timed parts of the plain-Python bucket
replay, 200k Avro events; the same code the Beam DoFn runs):

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
import io
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence

from sourcebeam.pipelines.apps import add_app_argument

ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
CACHE_DIR = os.path.join(ROOT, '.cache', 'bench')
DEFAULT_EVENTS = 1_000_000
BUILD_RUN_ID = 'bench'


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--events', type=int, default=DEFAULT_EVENTS,
                      help=f'retail events in the archive (default: {DEFAULT_EVENTS:,})')
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


def build_archive(path: str, n: int, fmt: str, rate: float, seed: int, buckets: int) -> Dict[str, Any]:
  """Write (or find) the archive; returns its facts ``{events, span_ms, files}``.

  Written in plain Python with the archive's own encoders and layout (Beam's
  WriteArchive would shuffle 10M events for no benefit here), hour by hour as
  the generator produces them, so memory holds one hour of events.
  """
  facts_path = os.path.join(path, '_bench.json')
  if os.path.exists(facts_path):
    with open(facts_path) as f:
      return json.load(f)
  from sourcebeam.generators import phases, retail
  from sourcebeam.generators.jsonl import demo_registry
  from sourcebeam.transforms.archive import write_bytes
  from sourcebeam.transforms.archive_format import (DEFAULT_MAX_EVENTS_PER_FILE, LAYOUT_VERSION, MANIFEST_NAME,
                                         SORT_ORDER, bucket_of, chunks, encode_avro,
                                         encode_parquet, file_name, hour_of, join, make_manifest,
                                         partition_dir, sort_key)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.makedirs(path)
  reg = demo_registry()
  files = 0

  def flush(hour: str, events: List[Dict[str, Any]]) -> None:
    nonlocal files
    by_bucket: Dict[int, List[Dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
      by_bucket[bucket_of(e['partition_key'], buckets)].append(e)
    for bucket, group in sorted(by_bucket.items()):
      group.sort(key=sort_key)
      for i, chunk in enumerate(chunks(group, DEFAULT_MAX_EVENTS_PER_FILE)):
        rel = join(partition_dir(hour, bucket), file_name(BUILD_RUN_ID, i, fmt))
        meta = {'sourcebeam.layout_version': str(LAYOUT_VERSION), 'sourcebeam.hour': hour,
                'sourcebeam.bucket': str(bucket), 'sourcebeam.sorted_by': ','.join(SORT_ORDER),
                'sourcebeam.run_id': BUILD_RUN_ID}
        blob = (encode_avro(chunk, reg, metadata=meta, name=rel) if fmt == 'avro'
                else encode_parquet(chunk, reg, metadata=meta))
        os.makedirs(os.path.dirname(join(path, rel)), exist_ok=True)
        write_bytes(join(path, rel), blob)
        files += 1

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
  with open(facts_path, 'w') as f:
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
  n = 0
  for f in files:
    with open(f.path, 'rb') as fo:
      blob = fo.read()
    if f.format == 'avro':
      n += len(list(fastavro.reader(io.BytesIO(blob))))
    else:
      n += len(pq.read_table(pa.BufferReader(blob)).to_pylist())
  seconds = time.perf_counter() - started
  out = {'events': n, 'seconds': seconds}
  if files and files[0].format == 'parquet':
    started = time.perf_counter()
    rows = 0
    for f in files:
      with open(f.path, 'rb') as fo:
        rows += pq.read_table(pa.BufferReader(fo.read())).num_rows
    out['columnar_seconds'] = time.perf_counter() - started
  out['peak_rss_mb'] = _peak_rss_mb()
  return out


def _write_json(obj: Any, path: str) -> None:
  from apache_beam.io.filesystems import FileSystems
  with FileSystems.create(path) as f:
    f.write(json.dumps(obj, sort_keys=True).encode('utf-8'))


def _count_in_one_combine(named: Dict[str, Any], path: str) -> None:
  """``{name: PCollection}`` -> ``path`` holding ``{'counts': {name: n}, 'stats': [...]}``;
  the ``stats`` PCollection's records are kept whole.

  One shuffle for every output (not one per output, as WriteCounts has), so
  the benchmark pipeline fits a small Flink TaskManager's network buffers.
  """
  import apache_beam as beam

  class CountByName(beam.CombineFn):
    def create_accumulator(self):
      return ({}, [])

    def add_input(self, acc, item):
      name, value = item
      if name == 'stats':
        acc[1].append(value)
      else:
        acc[0][name] = acc[0].get(name, 0) + 1
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

  tagged = [pc | f'Tag {name}' >> beam.Map(lambda v, name=name: (name, v if name == 'stats' else None))
            for name, pc in sorted(named.items())]
  _ = (tagged
       | 'AllOutputs' >> beam.Flatten()
       | 'CountByName' >> beam.CombineGlobally(CountByName())
       | 'WriteCounts' >> beam.Map(_write_json, path))


def measure_naive(path: str, beam_args: List[str]) -> Dict[str, Any]:
  """ReadArchive, key, a stateful DoFn keeping the last sequence per key."""
  import apache_beam as beam
  from apache_beam.coders import VarIntCoder
  from apache_beam.transforms.userstate import ReadModifyWriteStateSpec
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
      events = (p | 'Read' >> ReadArchive(path, with_timestamps=False))['events']
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


def measure_replay(path: str, beam_args: List[str], app_spec: Optional[str] = None) -> Dict[str, Any]:
  """The app's whole replay (every consumer, :class:`ReplayApp`) with every output counted
  in the pipeline."""
  import apache_beam as beam
  from sourcebeam.pipelines.apps import load_app
  from sourcebeam.pipelines.options import pipeline_options
  from sourcebeam.transforms.consumers import ReplayApp

  app = load_app(app_spec)
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


def _child(conn, fn, args) -> None:
  try:
    conn.send(('ok', fn(*args)))
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


def run_size(n: int, args: argparse.Namespace, beam_args: List[str], log) -> Dict[str, Any]:
  from sourcebeam.generators.phases import HELLO_RETAIL_RATE
  rate = args.rate or HELLO_RETAIL_RATE
  path = archive_path(args.cache_dir, n, args.format, rate, args.seed, args.buckets)
  log(f'archive {path}: building or reusing')
  started = time.perf_counter()
  facts = _in_child(build_archive, path, n, args.format, rate, args.seed, args.buckets)
  log(f'  {facts["events"]:,} events in {facts["files"]} files, event-time span '
      f'{facts["span_ms"] / 3_600_000:.1f} h ({time.perf_counter() - started:.1f}s)')
  raw = _in_child(measure_raw_decode, path)
  log(f'  raw decode: {raw["events"] / raw["seconds"]:,.0f} events/s')
  naive = None
  if not args.skip_naive:
    naive = _in_child(measure_naive, path, beam_args)
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
