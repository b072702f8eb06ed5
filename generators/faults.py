"""Realistic faults, injected into a clean stream so every consumer can be tested against them.

Three knobs, each off by default and deterministic for a seed:

* ``duplicates``: the share of events delivered a second time, a few dozen lines
  later, as an at-least-once producer does after a retry;
* ``out_of_order_s``: each event is delivered after a random delay of up to this
  many seconds, so the stream is ordered by delivery, not by event time (an
  event is never more than the bound behind the latest event time before it);
* ``malformed``: the share of lines corrupted the ways tech-debt streams are:
  truncated JSON, non-UTF-8 bytes, a missing field, a wrong type, an unknown
  (often legacy Hello, Retail!) event type, an absurd timestamp, a negative
  sequence, an unknown envelope field. Every corrupted envelope line is one
  that ``schemas.validation.publish_raw`` refuses, so the dead letters a
  publish run reports can be checked against what was injected.

Corruption works on the JSON line, so it applies to envelope lines and to the
plain Flink-model taxi records alike (with the kinds that make sense for each).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import json
import random
from typing import Counter, Iterable, Iterator, List, Optional, Tuple

from sourcebeam.generators.jsonl import encode_line

ENVELOPE_MALFORMATIONS = ('truncated', 'not-utf8', 'missing-field', 'wrong-type',
                          'unknown-type', 'absurd-time', 'negative-sequence', 'unknown-field')
RECORD_MALFORMATIONS = ('truncated', 'not-utf8', 'missing-field', 'wrong-type', 'absurd-time')

# What Hello, Retail! called the event types: a legacy producer still sends these.
LEGACY_TYPES = {
    'ProductCreated': 'product/create', 'ProductImageAdded': 'product/image',
    'ProductViewed': 'product/view', 'ProductPurchased': 'product/purchase',
    'CartItemAdded': 'cart/add', 'CartItemRemoved': 'cart/remove',
    'UserLoggedIn': 'user-info/login', 'PhoneNumberUpdated': 'user-info/update-phone',
    'RoleAdded': 'user-info/add-role',
}
ABSURD_TIMES = ('1970-01-01T00:00:00.000Z', '2999-12-31T23:59:59.999Z', 0)
_TIME_FIELDS = ('eventTime', 'startTime')
_SEED_SALT = 0x5EEDFA17


@dataclasses.dataclass(frozen=True)
class Faults:
  duplicates: float = 0.0
  out_of_order_s: float = 0.0
  malformed: float = 0.0

  def __post_init__(self):
    for name in ('duplicates', 'malformed'):
      v = getattr(self, name)
      if not 0.0 <= v <= 1.0:
        raise ValueError(f'{name} must be a share between 0 and 1, got {v:g}')
    if not self.out_of_order_s >= 0:
      raise ValueError(f'out-of-order delay must be >= 0 seconds, got {self.out_of_order_s:g}')

  @property
  def any(self) -> bool:
    return bool(self.duplicates or self.out_of_order_s or self.malformed)


def corrupt(line: bytes, rng: random.Random, kind: Optional[str] = None) -> Tuple[bytes, str]:
  """One line corrupted in one realistic way; returns (bad line, kind)."""
  try:
    obj = json.loads(line)
  except ValueError:
    obj = None
  envelope = isinstance(obj, dict) and isinstance(obj.get('data'), dict)
  if kind is None:
    kinds = ENVELOPE_MALFORMATIONS if envelope else RECORD_MALFORMATIONS
    kind = kinds[int(rng.random() * len(kinds))]
  if kind == 'truncated' or not isinstance(obj, dict):
    # any proper prefix of a JSON object is malformed JSON
    return line[:1 + int(rng.random() * (len(line) - 2))], 'truncated'
  if kind == 'not-utf8':
    # a Latin-1 producer: 'café' written as b'caf\xe9'
    i = line.find(b':"')
    i = len(line) // 2 if i < 0 else i + 2
    return line[:i] + b'caf\xe9 ' + line[i:], kind
  target = obj['data'] if envelope else obj
  if kind == 'missing-field':
    if envelope and rng.random() < 0.3:
      obj.pop('origin' if rng.random() < 0.5 else 'sequence')
    else:
      names = list(target)
      target.pop(names[int(rng.random() * len(names))])
  elif kind == 'wrong-type':
    names = list(target)
    name = names[int(rng.random() * len(names))]
    v = target[name]
    target[name] = 12345 if isinstance(v, str) else 'n/a'
  elif kind == 'unknown-type':
    t = obj.get('event_type', '')
    obj['event_type'] = LEGACY_TYPES.get(t, f'{t}V2')
  elif kind == 'absurd-time':
    absurd = ABSURD_TIMES[int(rng.random() * len(ABSURD_TIMES))]
    if envelope:
      obj['event_time'] = absurd
    else:
      for f in _TIME_FIELDS:
        if f in obj:
          obj[f] = absurd
  elif kind == 'negative-sequence':
    s = obj.get('sequence', 1)
    obj['sequence'] = -s if isinstance(s, int) and s > 0 and rng.random() < 0.8 else 0
  elif kind == 'unknown-field':
    obj['timeOrigin'] = obj.get('event_time')  # Hello, Retail!'s envelope field
  else:
    raise ValueError(f'unknown malformation {kind!r}')
  return encode_line(obj), kind


def inject(timed_lines: Iterable[Tuple[int, bytes]], faults: Faults, seed: int = 1,
           stats: Optional[Counter] = None) -> Iterator[bytes]:
  """Deliver (event time millis, line) pairs with the faults applied.

  ``stats`` (a Counter) receives how many duplicates and malformed lines (per
  kind) were injected.
  """
  rng = random.Random(seed ^ _SEED_SALT)
  rand = rng.random
  stats = stats if stats is not None else collections.Counter()
  lines = _delayed(timed_lines, faults.out_of_order_s, rng) if faults.out_of_order_s else (
      line for _, line in timed_lines)
  dup_p, bad_p = faults.duplicates, faults.malformed
  redeliver: List[Tuple[int, int, bytes]] = []  # (output index due, tiebreak, line)
  out = 0

  def emit(line: bytes) -> bytes:
    if bad_p and rand() < bad_p:
      line, kind = corrupt(line, rng)
      stats['malformed'] += 1
      stats[f'malformed:{kind}'] += 1
    return line

  for line in lines:
    while redeliver and redeliver[0][0] <= out:
      out += 1
      yield emit(heapq.heappop(redeliver)[2])
    if dup_p and rand() < dup_p:
      stats['duplicates'] += 1
      heapq.heappush(redeliver, (out + 1 + int(rand() * 50), out, line))
    out += 1
    yield emit(line)
  while redeliver:
    out += 1
    yield emit(heapq.heappop(redeliver)[2])


def _delayed(timed_lines: Iterable[Tuple[int, bytes]], delay_s: float,
             rng: random.Random) -> Iterator[bytes]:
  """Lines ordered by delivery time = event time + a random delay up to delay_s."""
  max_ms = int(delay_s * 1000)
  heap: List[Tuple[int, int, bytes]] = []
  for i, (t, line) in enumerate(timed_lines):
    while heap and heap[0][0] < t:
      yield heapq.heappop(heap)[2]
    heapq.heappush(heap, (t + int(rng.random() * (max_ms + 1)), i, line))
  while heap:
    yield heapq.heappop(heap)[2]
