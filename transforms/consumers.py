"""Every consumer of an application, applied the same way to a replay and to a live stream.

:class:`ApplyApp` takes published envelopes from any source (a bounded read of
Kafka, a live topic, any PCollection in a test) and :class:`ReplayApp` takes an
archive path; both give an :class:`AppResult` from the *same* consumer objects
of the :class:`~sourcebeam.transforms.app.App`:

* views and projections: the events of each key space are ordered once per key
  (``ProcessInOrder`` on a PCollection; the archive's bucket-by-bucket replay,
  with no shuffle of events, in :class:`ReplayApp`) behind one
  :class:`~sourcebeam.transforms.keyspace.KeySpaceHandler`; a view's bounded
  result is its latest change per key (``final``), its live one every change;
* consumers (transforms): applied to the events of the types they read,
  timestamped at their event time.

:class:`WriteAppOutputs` writes an :class:`AppResult` of a bounded run as files:
``OUT/<view>.jsonl`` (one line per key: ``{"key", "state"}`` or the view's
``record``; ``OUT/<view>.parquet`` too with a ``parquet_schema``),
``OUT/<projection>.jsonl`` (``{"key", "output"}``), ``OUT/<consumer>.jsonl``
or ``OUT/<consumer>/<output>.jsonl``, and ``OUT/unprocessed.jsonl`` (events
ordering or a handler could not apply, with the key space or the consumer and
the reason). It returns every output's PCollection by name, to count.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.transforms import window

from sourcebeam.transforms.app import App, View
from sourcebeam.transforms.archive_format import join
from sourcebeam.transforms.errors import ConfigError
from sourcebeam.transforms.keyspace import (Emitted, Failed, KeySpaceHandler, ViewChange,
                                            failure_record, to_line)
from sourcebeam.transforms.ordered_replay import KeySpace, OrderedArchiveReplay
from sourcebeam.transforms.ordering import ProcessInOrder
from sourcebeam.transforms.single_file import WriteSingleFile

__all__ = ['AppResult', 'ApplyApp', 'ReplayApp', 'WriteAppOutputs', 'at_event_time',
           'key_space_handlers', 'view_line', 'UNPROCESSED_FILE']

UNPROCESSED = 'unprocessed'
UNPROCESSED_FILE = 'unprocessed.jsonl'


class AppResult(NamedTuple):
  """What an application's consumers produced, by consumer name."""
  views: Dict[str, beam.PCollection]        # (key, ViewChange): final per key, or every change
  projections: Dict[str, beam.PCollection]  # (key, output)
  consumers: Dict[str, beam.PCollection]    # 'name' or 'name/output' -> the transform's elements
  unprocessed: beam.PCollection             # {key, sequence, reason, event, key_space|consumer...}
  held: beam.PCollection                    # {key_space, keys, events} left waiting on a gap at the end


def at_event_time(env):
  return window.TimestampedValue(env, env['event_time'] / 1000.0)


def key_space_handlers(app: App, kinds: Sequence[str] = ('view', 'projection')) -> List[KeySpace]:
  """One :class:`KeySpace` per key space some view or projection (of ``kinds``) reads."""
  spaces = []
  for plan in app.key_space_plans():
    members = [(i, c) for i, c in zip(plan.ids, plan.consumers) if c.kind in kinds]
    if members:
      spaces.append(KeySpace(plan.name, plan.event_types, KeySpaceHandler(members)))
  return spaces


def latest_view_change(key: Any, output: Any) -> Optional[tuple]:
  """A view keeps its last change per key; projections' outputs and failures are all kept."""
  return (output.consumer, key) if type(output) is ViewChange else None


class _SplitPerKey(beam.DoFn):
  """Per-key outputs of every key space -> one output per consumer, failures to unprocessed."""

  def __init__(self, names: List[str]):
    self._names = names

  def process(self, kv):
    key, out = kv
    kind = type(out)
    if kind is ViewChange:
      yield pvalue.TaggedOutput(f'c{out.consumer}', (key, out))
    elif kind is Emitted:
      yield pvalue.TaggedOutput(f'c{out.consumer}', (key, out.output))
    elif kind is Failed:
      yield pvalue.TaggedOutput(UNPROCESSED, failure_record(key, out, self._names[out.consumer]))


class _LatestChange(beam.CombineFn):
  """The change with the highest sequence: a view's value for one key."""

  def create_accumulator(self):
    return None

  def add_input(self, acc, change):
    if acc is None or change.event['sequence'] > acc.event['sequence']:
      return change
    return acc

  def merge_accumulators(self, accs):
    out = None
    for a in accs:
      if a is not None:
        out = self.add_input(out, a)
    return out

  def extract_output(self, acc):
    return acc


def _split(app: App, per_key_outputs: beam.PCollection, final: bool,
           kinds: Sequence[str] = ('view', 'projection')):
  per_key = app.per_key
  names = [c.name for c in per_key]
  split = per_key_outputs | 'PerConsumer' >> beam.ParDo(_SplitPerKey(names)).with_outputs(
      UNPROCESSED, *[f'c{i}' for i in range(len(per_key))])
  views, projections = {}, {}
  for i, c in enumerate(per_key):
    if c.kind not in kinds:
      continue
    pcoll = split[f'c{i}']
    if isinstance(c, View):
      if final:
        pcoll = pcoll | f'Latest {c.name}' >> beam.CombinePerKey(_LatestChange())
      views[c.name] = pcoll
    else:
      projections[c.name] = pcoll
  return views, projections, split[UNPROCESSED]


class _RouteToConsumers(beam.DoFn):
  """Each event once, stamped at its event time, to every transform consumer reading its type:
  one step per event, where a timestamping step and a filter per consumer were three."""

  def __init__(self, routes: Dict[str, Tuple[str, ...]], to_all: Tuple[str, ...]):
    self._routes, self._to_all = routes, to_all

  def process(self, env):
    tags = self._routes.get(env['event_type'], self._to_all)
    if tags:
      stamped = window.TimestampedValue(env, env['event_time'] / 1000.0)
      for tag in tags:
        yield pvalue.TaggedOutput(tag, stamped)


def _route(app: App, events: beam.PCollection):
  """``events`` (not yet at their event time) -> one PCollection per transform consumer: the
  events of its types (all of them with no ``event_types``), at their event time."""
  tags = [f'c{i}' for i in range(len(app.transforms))]
  to_all = tuple(t for t, c in zip(tags, app.transforms) if c.event_types is None)
  routes: Dict[str, List[str]] = {}
  for tag, c in zip(tags, app.transforms):
    for name in c.event_types or ():
      routes.setdefault(name, list(to_all)).append(tag)
  routed = events | 'Events per consumer' >> beam.ParDo(_RouteToConsumers(
      {name: tuple(ts) for name, ts in routes.items()}, to_all)).with_outputs(*tags)
  return [routed[t] for t in tags]


def _apply_transforms(app: App, events: beam.PCollection) -> Dict[str, beam.PCollection]:
  """Each transform consumer on the events of its types, at their event time."""
  out: Dict[str, beam.PCollection] = {}
  if not app.transforms:
    return out
  for c, read in zip(app.transforms, _route(app, events)):
    try:
      result = read | c.name >> c.transform
    except ValueError as e:
      if read.is_bounded:
        raise
      # Beam refuses, while the pipeline is built, what cannot run on an endless stream (a
      # grouping in the global window waits for an end that never comes).
      raise ConfigError(f'consumer {c.name} cannot run on a live (unbounded) stream: {e}. '
                        'Window what it groups, or skip it when its input is not bounded '
                        '(events.is_bounded)') from None
    if isinstance(result, dict):
      for sub, pcoll in result.items():
        out[f'{c.name}/{sub}'] = pcoll
    elif isinstance(result, beam.PCollection):
      out[c.name] = result
    else:
      raise TypeError(f'consumer {c.name} returned {type(result).__name__}: a consumer returns a '
                      'PCollection or a dict of named PCollections')
  return out


class ApplyApp(beam.PTransform):
  """Published envelopes -> every consumer of ``app``: an :class:`AppResult`.

  ``final``: views as their latest change per key (the default for bounded
  input) or every change (unbounded, where there is no end to wait for).
  ``kinds``: which per-key consumers to run (a live run keeps its views with
  :class:`~sourcebeam.transforms.view_store.ViewChanges` and asks here for the
  projections only).
  ``ordering`` passes options to ``ProcessInOrder`` (``gap_timeout``...;
  ``continue_on_handler_error`` is always on: the key space handler reports a
  consumer's error itself and goes on).
  """

  def __init__(self, app: App, *, final: Optional[bool] = None,
               kinds: Sequence[str] = ('view', 'projection'), **ordering):
    super().__init__()
    self.app, self.final, self.kinds, self.ordering = app, final, tuple(kinds), ordering

  def expand(self, events) -> AppResult:
    app = self.app
    timed = events | 'AtEventTime' >> beam.Map(at_event_time)
    final = events.is_bounded if self.final is None else self.final
    outputs, unprocessed, held = [], [], []
    for ks in key_space_handlers(app, self.kinds):
      types = ks.event_types
      ordered = (timed
                 | f'Events of {ks.name}' >> beam.Filter(lambda e, t=types: e['event_type'] in t)
                 | f'Order {ks.name}' >> ProcessInOrder(ks.handler, continue_on_handler_error=True,
                                                        **self.ordering))
      outputs.append(ordered.outputs)
      unprocessed.append(ordered.unprocessed | f'Unprocessed {ks.name}' >> beam.Map(
          lambda r, name=ks.name: dict(r, key_space=name)))
      held.append(ordered.status | f'Held {ks.name}' >> beam.FlatMap(
          lambda st, name=ks.name: [{'key_space': name, 'keys': 1, 'events': st['buffered']}]
          if st.get('trigger') == 'final' and st.get('buffered') else []))
    views, projections, failures = {}, {}, None
    if outputs:
      merged = tuple(outputs) | 'PerKeyOutputs' >> beam.Flatten()
      views, projections, failures = _split(app, merged, final, self.kinds)
      unprocessed.append(failures)
    consumers = _apply_transforms(app, events)
    unp = (tuple(unprocessed) | 'AllUnprocessed' >> beam.Flatten() if unprocessed else
           events.pipeline | 'NoUnprocessed' >> beam.Create([]))
    waiting = (tuple(held) | 'AllHeld' >> beam.Flatten() if held else
               events.pipeline | 'NoneHeld' >> beam.Create([]))
    return AppResult(views, projections, consumers, unp, waiting)


class ReplayResult(NamedTuple):
  result: AppResult
  corrupt: beam.PCollection   # {path, reason} per archive file not read
  stats: beam.PCollection     # per bucket: files, events, by_type, unclaimed, unknown_type, keys...


class ReplayApp(beam.PTransform):
  """An archive -> every consumer of ``app``, views and projections by the fast ordered replay.

  Same consumer objects and the same results as ``ReadArchive | ApplyApp``, without
  shuffling events: each key bucket is one work item that orders every key space
  of the bucket's keys (:class:`~sourcebeam.transforms.ordered_replay.OrderedArchiveReplay`);
  the events the transforms read come out of the same read.
  """

  def __init__(self, app: App, path: str, **ordering):
    super().__init__()
    self.app = app
    types = app.consumer_event_types()
    passthrough = True if types is None else (types or False)
    self._replay = OrderedArchiveReplay(
        path, key_space_handlers(app), registry=app.registry, latest_by=latest_view_change,
        passthrough=passthrough, continue_on_handler_error=True, **ordering)

  def expand(self, pbegin) -> ReplayResult:
    app = self.app
    replay = pbegin | 'OrderedReplay' >> self._replay
    views, projections, failures = _split(app, replay.outputs, final=False)  # already final
    unprocessed = (replay.unprocessed, failures) | 'AllUnprocessed' >> beam.Flatten()
    # The bucket replay's outputs carry its earliest-timestamp windowing (see there); the
    # consumers get the default one, as over ReadArchive, so their groupings take Beam's
    # plain path instead of its general trigger driver.
    consumers = _apply_transforms(
        app, replay.passthrough | 'DefaultWindowing' >> beam.WindowInto(window.GlobalWindows()))
    held = replay.stats | 'Held' >> beam.FlatMap(
        lambda s: [{'key_space': None, 'keys': s['keys_waiting_on_gap'],
                    'events': s['events_left_buffered']}] if s.get('events_left_buffered') else [])
    return ReplayResult(AppResult(views, projections, consumers, unprocessed, held),
                        replay.corrupt, replay.stats)


def view_line(view: View, key: str, change: ViewChange) -> str:
  """A view's line for one key: ``view.record(key, state, last event)`` as JSON."""
  try:
    return to_line(view.record(key, change.state, change.event))
  except TypeError as e:
    raise TypeError(f'view {view.name}, key {key!r}: its record is not JSON ({e}); return '
                    'JSON-able states or give the view a record= function') from None


def _projection_line(name: str, kv) -> str:
  try:
    return to_line({'key': kv[0], 'output': kv[1]})
  except TypeError as e:
    raise TypeError(f'projection {name}, key {kv[0]!r}: its output is not JSON ({e})') from None


def _write(pcoll: beam.PCollection, out: str, name: str, suffix: str = '.jsonl'):
  return pcoll | f'Write {name}{suffix}' >> WriteSingleFile(join(out, name) + suffix)


class WriteAppOutputs(beam.PTransform):
  """An :class:`AppResult` of a bounded run -> files under ``out``; returns ``{name: PCollection}``
  of what was written (``unprocessed`` included) for :class:`~sourcebeam.transforms.counting.WriteCounts`."""

  def __init__(self, app: App, out: str):
    super().__init__()
    self.app, self.out = app, out

  def expand(self, result: AppResult) -> Dict[str, beam.PCollection]:
    counts: Dict[str, beam.PCollection] = {}
    for name, pcoll in result.views.items():
      view = self.app.get(name)
      records = pcoll | f'Record {name}' >> beam.Map(
          lambda kv, v=view: v.record(kv[0], kv[1].state, kv[1].event))
      _write(records | f'Line {name}' >> beam.Map(
          lambda r, v=view: view_line_of_record(v, r)), self.out, name)
      if view.parquet_schema is not None:
        _ = records | f'Write {name}.parquet' >> beam.io.WriteToParquet(
            join(self.out, name), view.parquet_schema, file_name_suffix='.parquet',
            shard_name_template='', num_shards=1)
      counts[name] = pcoll
    for name, pcoll in result.projections.items():
      _write(pcoll | f'Line {name}' >> beam.Map(lambda kv, n=name: _projection_line(n, kv)),
             self.out, name)
      counts[name] = pcoll
    for name, pcoll in result.consumers.items():
      _write(pcoll | f'Line {name}' >> beam.Map(to_line), self.out, name)
      counts[name] = pcoll
    _write(result.unprocessed | 'Line unprocessed' >> beam.Map(to_line), self.out, UNPROCESSED)
    counts[UNPROCESSED] = result.unprocessed
    return counts


def held_counts(held: beam.PCollection) -> Dict[str, beam.PCollection]:
  """``held_on_gap`` (events) and ``held_on_gap_keys`` as PCollections of that many elements,
  for :class:`~sourcebeam.transforms.counting.WriteCounts`: what no consumer applied because
  its key still waited on a gap when the input ended."""
  return {'held_on_gap': held | 'Held events' >> beam.FlatMap(lambda h: [None] * h['events']),
          'held_on_gap_keys': held | 'Held keys' >> beam.FlatMap(lambda h: [None] * h['keys'])}


def view_line_of_record(view: View, record: Any) -> str:
  try:
    return to_line(record)
  except TypeError as e:
    raise TypeError(f'view {view.name}: its record is not JSON ({e}); return JSON-able states '
                    'or give the view a record= function') from None
