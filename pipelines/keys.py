"""`run.py keys --archive PATH [--key-rule RULE ...] [--json]`: the partition-key report.

The talk: "partition key selection is (really) important" and "you can only
guarantee ordering for each specific partition key". This report shows what
the key rule in the schemas (``partition_key`` of each ``.avsc``) does to an
archive, and what an alternative rule would do instead:

* cardinality: how many distinct keys;
* events per key: mean, median, p99, max, the skew (max / mean) and the top keys;
* the parallelism the choice allows: the hottest key is processed serially, so
  no number of workers finishes faster than its events, and
  ``parallelism bound = events / events of the hottest key``; ``effective keys``
  (inverse Simpson index, ``events**2 / sum(count**2)``) is how many equally
  busy keys the distribution is worth; ``balance on W workers`` is the ideal
  load ``events / W`` divided by the busiest worker's load when keys are hashed
  to W workers (CRC32 of the key mod W, as a shuffle would spread them);
* how many events would be ordered differently under the alternative rule.

Alternative rules (``--key-rule``, repeatable or comma separated):

* ``FIELD``: every event type that has a data field FIELD is keyed by it;
  types without it keep their schema rule;
* ``Type=FIELD``: that event type is keyed by FIELD (overrides a bare FIELD).

An unknown type or a field the type's schema lacks is a usage error.

"Ordered differently", precisely: ProcessInOrder applies each key's events as
a chain, each event right after its predecessor on the key. Under the current
rule an event's predecessor is the event before it in its ``partition_key``'s
sequence order. Under the alternative rule the events of each new key are put
in the order they would be sequenced in: by ``event_time``, then current key,
then sequence. An event is ordered differently when its predecessor under the
alternative rule is not the same event as under the current rule (a first
event of a key has no predecessor; gaining or losing one counts). Equal
predecessors for every event mean the same ordering constraints exactly. The
report also counts current keys split over several new keys and new keys that
merge several current keys. Events whose type or data lacks the alternative
field cannot be keyed by it: they are counted as ``unkeyable`` (and keep
neither an alternative key nor a predecessor), never dropped silently.

The report reads the archive in plain Python (``transforms.archive.iter_archive``)
and keeps one small tuple per event (key, sequence, position, event time) to
sort the chains: fine for days of Hello, Retail!'s 10 million events a day on
one machine; a month would want the same statistics as a Beam pipeline.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import zlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from sourcebeam.pipelines.apps import add_app_argument, load_app
from sourcebeam.pipelines.cli import DataError, UsageError
from sourcebeam.schemas.registry import Registry

DEFAULT_TOP = 10
DEFAULT_WORKERS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--archive', required=True, metavar='PATH',
                      help='the event archive to analyse (local, s3:// or gs://)')
  parser.add_argument('--key-rule', action='append', default=[], metavar='RULE',
                      help='alternative key rule: FIELD (every type that has it) or Type=FIELD; '
                           'repeat or separate with commas')
  parser.add_argument('--top', type=int, default=DEFAULT_TOP, help=f'top keys to list (default {DEFAULT_TOP})')
  parser.add_argument('--workers', type=int, default=DEFAULT_WORKERS,
                      help=f'workers for the balance estimate (default {DEFAULT_WORKERS})')
  parser.add_argument('--json', action='store_true', help='print one JSON object instead of tables')
  add_app_argument(parser)


# -- key rules ----------------------------------------------------------------------------

def parse_key_rule(specs: Sequence[str], reg: Registry) -> Dict[str, str]:
  """``--key-rule`` values -> {event type: data field} for every event type.

  Types the rule does not mention keep their schema's partition key.
  Raises UsageError for an empty rule, an unknown type or a missing field.
  """
  rule = {name: et.partition_key for name, et in reg.current.items()}
  bare: List[str] = []
  typed: List[Tuple[str, str]] = []
  for spec in specs:
    for part in spec.split(','):
      part = part.strip()
      if not part:
        raise UsageError(f'empty key rule in {spec!r}')
      if '=' in part:
        type_name, _, field = (p.strip() for p in part.partition('='))
        if type_name not in reg.current:
          raise UsageError(f'key rule {part!r}: unknown event type {type_name!r} '
                           f'(known: {", ".join(reg.event_types)})')
        if field not in reg.current[type_name].field_names:
          raise UsageError(f'key rule {part!r}: {type_name} has no field {field!r} '
                           f'(fields: {", ".join(reg.current[type_name].field_names)})')
        typed.append((type_name, field))
      else:
        if not any(part in et.field_names for et in reg.current.values()):
          raise UsageError(f'key rule {part!r}: no event type has a field {part!r}')
        bare.append(part)
  for field in bare:
    for name, et in reg.current.items():
      if field in et.field_names:
        rule[name] = field
  for type_name, field in typed:
    rule[type_name] = field
  return rule


def key_under(rule: Mapping[str, str], envelope: Mapping[str, Any]) -> Optional[str]:
  """The event's key under ``rule`` (as the envelope would carry it), or None."""
  field = rule.get(envelope.get('event_type'))
  data = envelope.get('data')
  if field is None or not isinstance(data, Mapping) or data.get(field) is None:
    return None
  value = data[field]
  if isinstance(value, bool):
    value = int(value)
  return str(value)


# -- statistics ---------------------------------------------------------------------------

def _percentile(sorted_counts: List[int], q: float) -> int:
  if not sorted_counts:
    return 0
  i = min(len(sorted_counts) - 1, max(0, math.ceil(q * len(sorted_counts)) - 1))
  return sorted_counts[i]


def key_stats(counts: Mapping[str, int], *, top: int = DEFAULT_TOP,
              workers: int = DEFAULT_WORKERS) -> Dict[str, Any]:
  """Cardinality, distribution, skew, top keys and parallelism of {key: events}."""
  n = sum(counts.values())
  k = len(counts)
  ordered = sorted(counts.values())
  mx = ordered[-1] if ordered else 0
  mean = n / k if k else 0.0
  loads = [0] * workers
  for key, c in counts.items():
    loads[zlib.crc32(key.encode('utf-8')) % workers] += c
  busiest = max(loads) if n else 0
  return {
      'events': n,
      'keys': k,
      'mean_per_key': round(mean, 3),
      'median_per_key': _percentile(ordered, 0.5),
      'p99_per_key': _percentile(ordered, 0.99),
      'max_per_key': mx,
      'skew': round(mx / mean, 3) if mean else 0.0,
      'hottest_share': round(mx / n, 6) if n else 0.0,
      'parallelism_bound': round(n / mx, 3) if mx else 0.0,
      'effective_keys': round(n * n / sum(c * c for c in ordered), 3) if n else 0.0,
      'workers': workers,
      'worker_balance': round((n / workers) / busiest, 4) if busiest else 0.0,
      'top_keys': [{'key': key, 'events': c, 'share': round(c / n, 6)}
                   for key, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]],
  }


def _predecessors(chains: Mapping[Any, List[tuple]], ident) -> Dict[tuple, Optional[tuple]]:
  """{event id: the id of the event before it on its key}, chains already sorted."""
  pred = {}
  for chain in chains.values():
    prev = None
    for item in chain:
      eid = ident(item)
      pred[eid] = prev
      prev = eid
  return pred


def analyse(envelopes: Iterable[Mapping[str, Any]], reg: Registry,
            alternative: Optional[Mapping[str, str]] = None,
            *, top: int = DEFAULT_TOP, workers: int = DEFAULT_WORKERS) -> Dict[str, Any]:
  """The whole report as a dict, in one pass over the envelopes (plain Python).

  ``reg`` holds the current key rules (the app's schemas); ``alternative`` is a
  full {event type: field} rule (see :func:`parse_key_rule`); None reports the
  current rule only.
  """
  if workers < 1 or top < 0:
    raise UsageError('--workers must be >= 1 and --top >= 0')
  current_counts: collections.Counter = collections.Counter()
  alt_counts: collections.Counter = collections.Counter()
  by_type: collections.Counter = collections.Counter()
  cur_chains: Dict[str, List[tuple]] = collections.defaultdict(list)
  alt_chains: Dict[str, List[tuple]] = collections.defaultdict(list)
  unkeyable: collections.Counter = collections.Counter()
  n = 0
  for i, env in enumerate(envelopes):
    n += 1
    key = env.get('partition_key')
    if key is None:
      raise DataError(f'event {env.get("event_id", i)!r} has no partition_key')
    seq = env.get('sequence')
    etype = env.get('event_type')
    by_type[etype] += 1
    current_counts[key] += 1
    # One event's identity: its current key and sequence (i breaks ties between copies).
    item = (key, seq if isinstance(seq, int) else -1, i, env.get('event_time') or 0)
    cur_chains[key].append(item)
    if alternative is not None:
      alt = key_under(alternative, env)
      if alt is None:
        unkeyable[etype] += 1
      else:
        alt_counts[alt] += 1
        alt_chains[alt].append(item)
  report: Dict[str, Any] = {
      'events': n,
      'event_types': dict(sorted(by_type.items(), key=lambda kv: str(kv[0]))),
      'current': key_stats(current_counts, top=top, workers=workers),
  }
  if alternative is None:
    return report
  ident = lambda item: item[2]
  for chain in cur_chains.values():
    chain.sort(key=lambda it: (it[1], it[2]))
  for chain in alt_chains.values():
    chain.sort(key=lambda it: (it[3], it[0], it[1], it[2]))
  cur_pred = _predecessors(cur_chains, ident)
  alt_pred = _predecessors(alt_chains, ident)
  changed = sum(1 for eid, p in alt_pred.items() if cur_pred[eid] != p)
  alt_keys_of_cur: Dict[str, set] = collections.defaultdict(set)
  cur_keys_of_alt: Dict[str, set] = collections.defaultdict(set)
  for alt_key, chain in alt_chains.items():
    for item in chain:
      alt_keys_of_cur[item[0]].add(alt_key)
      cur_keys_of_alt[alt_key].add(item[0])
  report['alternative'] = key_stats(alt_counts, top=top, workers=workers)
  report['rule_changes'] = {t: f for t, f in sorted(alternative.items())
                            if t not in reg.current or f != reg.current[t].partition_key}
  report['comparison'] = {
      'ordered_differently': changed,
      'ordered_differently_share': round(changed / n, 6) if n else 0.0,
      'current_keys_split': sum(1 for s in alt_keys_of_cur.values() if len(s) > 1),
      'alternative_keys_merging': sum(1 for s in cur_keys_of_alt.values() if len(s) > 1),
      'unkeyable': sum(unkeyable.values()),
      'unkeyable_by_type': dict(sorted(unkeyable.items(), key=lambda kv: str(kv[0]))),
  }
  return report


# -- output -------------------------------------------------------------------------------

_ROWS = [
    ('keys (cardinality)', 'keys', '{:,}'),
    ('events', 'events', '{:,}'),
    ('events per key: mean', 'mean_per_key', '{:,.2f}'),
    ('events per key: median', 'median_per_key', '{:,}'),
    ('events per key: p99', 'p99_per_key', '{:,}'),
    ('events per key: max', 'max_per_key', '{:,}'),
    ('skew (max / mean)', 'skew', '{:,.2f}'),
    ('hottest key share', 'hottest_share', '{:.2%}'),
    ('parallelism bound (events / max)', 'parallelism_bound', '{:,.1f}'),
    ('effective keys (inverse Simpson)', 'effective_keys', '{:,.1f}'),
]


def format_report(report: Dict[str, Any], archive: str = '') -> str:
  cur, alt = report['current'], report.get('alternative')
  lines = [f'Partition-key report{": " + archive if archive else ""} '
           f'({report["events"]:,} events, {len(report["event_types"])} event types)', '']
  header = f'{"":<36} {"current":>14}' + (f' {"alternative":>14}' if alt else '')
  lines.append(header)
  rows = _ROWS + [(f'balance on {cur["workers"]} workers (hash)', 'worker_balance', '{:.1%}')]
  for label, field, fmt in rows:
    line = f'{label:<36} {fmt.format(cur[field]):>14}'
    if alt:
      line += f' {fmt.format(alt[field]):>14}'
    lines.append(line)
  for name, stats in (('current', cur), ('alternative', alt)):
    if not stats:
      continue
    lines += ['', f'top keys ({name} rule)']
    for t in stats['top_keys']:
      lines.append(f'  {t["key"]:<34} {t["events"]:>10,} {t["share"]:>8.2%}')
  if alt:
    c = report['comparison']
    lines += ['', 'alternative rule: ' + (', '.join(f'{t}={f}' for t, f in report['rule_changes'].items())
                                          or '(same as the schemas)')]
    lines.append(f'  events ordered differently (new predecessor) {c["ordered_differently"]:>10,} '
                 f'{c["ordered_differently_share"]:>8.2%}')
    lines.append(f'  current keys split over several new keys     {c["current_keys_split"]:>10,}')
    lines.append(f'  new keys merging several current keys        {c["alternative_keys_merging"]:>10,}')
    lines.append(f'  events without the alternative key field     {c["unkeyable"]:>10,}')
  return '\n'.join(lines)


def main(args: Any, beam_args: List[str]) -> int:
  from sourcebeam.transforms.archive import CorruptArchiveFile, IncompatibleSchema, check_archive_path, iter_archive
  app = load_app(args.app)
  alternative = parse_key_rule(args.key_rule, app.registry) if args.key_rule else None
  if args.workers < 1 or args.top < 0:
    raise UsageError('--workers must be >= 1 and --top >= 0')
  check_archive_path(args.archive, beam_args)
  try:
    report = analyse(iter_archive(args.archive, app.registry), app.registry, alternative,
                     top=args.top, workers=args.workers)
  except (CorruptArchiveFile, IncompatibleSchema) as e:
    raise DataError(str(e)) from None
  report['archive'] = args.archive
  if args.json:
    print(json.dumps(report, sort_keys=True))
  else:
    print(format_report(report, args.archive))
  return 0
