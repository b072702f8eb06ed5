"""Fan-out subscribers in plain Python: the subscriber file, sinks and matching.

Hello, Retail! fanned one Kinesis stream out to 50+ consumers; each consumer
declared which events it wanted. Here subscribers are declared in one file
(JSON, or TOML for a ``.toml`` file: both read with the standard library)::

    {"subscribers": [
      {"name": "shipping",
       "event_types": ["OrderPlaced", "OrderCancelled"],
       "keys": ["o-00001*"],
       "sink": "kafka://127.0.0.1:9092/shipping"},
      {"name": "order-history", "event_types": ["OrderPlaced"],
       "sink": "s3://bucket/fanout/order-history"}
    ]}

* ``name`` (required): letters, digits, ``.``, ``_``, ``-``; unique in the file.
* ``event_types`` (optional, default: every type): names of the application's event types;
  an unknown name is an error (a typo would otherwise silently match nothing).
* ``keys`` (optional, default: every key): exact partition keys and/or glob
  patterns (``*``, ``?``, ``[...]``); ``prefix*`` is matched as a prefix.
* ``sink`` (required): ``kafka://HOST:PORT/TOPIC`` or an archive path (local
  directory, ``s3://`` or ``gs://``) that becomes a Sourcebeam archive.

Matching is by an index, not a scan: subscribers are grouped by event type
once (those without a type filter join every type's list), so an event is only
checked against the subscribers of its type, and each key check is a set
lookup, a prefix test or one compiled regex. The result for an
(event type, key) pair is cached (keys repeat: a user's events), so a steady
stream costs one dict lookup per event whatever the number of subscribers.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tomllib
from typing import Any, Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from sourcebeam.transforms.errors import ConfigError
from sourcebeam.transforms.kafka_url import parse_kafka_url

_NAME = re.compile(r'^[A-Za-z0-9._-]{1,128}$')
_FIELDS = ('name', 'event_types', 'keys', 'sink')
_GLOB_CHARS = set('*?[')
CACHE_LIMIT = 200_000


class Sink(NamedTuple):
  """Where a subscriber's events go: ``kind`` is ``'kafka'`` or ``'archive'``."""
  kind: str
  target: str                      # the topic, or the archive path
  bootstrap: Optional[str] = None  # Kafka only

  def describe(self) -> str:
    return f'kafka://{self.bootstrap}/{self.target}' if self.kind == 'kafka' else self.target


class KeyFilter(NamedTuple):
  """Exact keys, prefixes and other globs (as one regex); all empty means every key."""
  exact: FrozenSet[str]
  prefixes: Tuple[str, ...]
  pattern: Optional[str]  # regex source of the remaining globs (a str pickles everywhere)

  @property
  def matches_all(self) -> bool:
    return not self.exact and not self.prefixes and self.pattern is None


class Subscriber(NamedTuple):
  name: str
  event_types: Optional[FrozenSet[str]]  # None: every type
  keys: KeyFilter
  sink: Sink


def parse_sink(text: Any, where: str) -> Sink:
  """``kafka://HOST:PORT/TOPIC`` or an archive path; ConfigError naming ``where``."""
  if not isinstance(text, str) or not text.strip():
    raise ConfigError(f'{where}: "sink" must be kafka://HOST:PORT/TOPIC or an archive path')
  text = text.strip()
  if text.startswith('kafka://'):
    kafka = parse_kafka_url(text)
    if not kafka:
      raise ConfigError(f'{where}: sink {text!r} must look like kafka://HOST:PORT/TOPIC '
                       '(topic: letters, digits, ".", "_", "-")')
    return Sink('kafka', kafka.topic, kafka.bootstrap)
  scheme = text.split('://', 1)[0] if '://' in text else None
  if scheme not in (None, 'file', 's3', 'gs'):
    raise ConfigError(f'{where}: sink {text!r}: archive paths are local, s3:// or gs:// '
                     f'(or kafka://HOST:PORT/TOPIC), not {scheme}://')
  return Sink('archive', text.rstrip('/'))


def parse_keys(patterns: Any, where: str) -> KeyFilter:
  if patterns is None:
    return KeyFilter(frozenset(), (), None)
  if not isinstance(patterns, list) or not patterns or not all(
      isinstance(p, str) and p for p in patterns):
    raise ConfigError(f'{where}: "keys" must be a non-empty list of partition keys or glob '
                     'patterns (leave it out to take every key)')
  exact, prefixes, globs = set(), [], []
  for p in patterns:
    if not _GLOB_CHARS & set(p):
      exact.add(p)
    elif p.endswith('*') and not _GLOB_CHARS & set(p[:-1]):
      prefixes.append(p[:-1])
    else:
      globs.append(fnmatch.translate(p))
  pattern = '|'.join(f'(?:{g})' for g in globs) if globs else None
  return KeyFilter(frozenset(exact), tuple(sorted(set(prefixes))), pattern)


def key_matches(keys: KeyFilter, key: str, regex: Optional['re.Pattern[str]'] = None) -> bool:
  """Whether ``key`` passes ``keys`` (``regex`` is ``keys.pattern`` compiled, if given)."""
  if keys.matches_all or key in keys.exact:
    return True
  if keys.prefixes and key.startswith(keys.prefixes):
    return True
  if keys.pattern is not None:
    return bool((regex or re.compile(keys.pattern)).match(key))
  return False


def parse_subscribers(doc: Any, known_types: Sequence[str], where: str = 'subscribers') -> List[Subscriber]:
  """Validate a parsed subscriber document; every error names the subscriber and field."""
  if not isinstance(doc, Mapping) or not isinstance(doc.get('subscribers'), list):
    raise ConfigError(f'{where}: expected an object with a "subscribers" list')
  extra = set(doc) - {'subscribers'}
  if extra:
    raise ConfigError(f'{where}: unknown top-level field(s) {sorted(extra)}; only "subscribers"')
  items = doc['subscribers']
  if not items:
    raise ConfigError(f'{where}: the "subscribers" list is empty')
  known = set(known_types)
  out: List[Subscriber] = []
  seen: Dict[str, int] = {}
  for i, raw in enumerate(items):
    label = f'{where}: subscriber #{i + 1}'
    if not isinstance(raw, Mapping):
      raise ConfigError(f'{label} must be an object with "name" and "sink"')
    name = raw.get('name')
    if not isinstance(name, str) or not _NAME.match(name):
      raise ConfigError(f'{label}: "name" must be 1-128 letters, digits, ".", "_" or "-", '
                       f'got {name!r}')
    label = f'{where}: subscriber {name!r}'
    if name in seen:
      raise ConfigError(f'{label}: the name is used twice (subscribers #{seen[name] + 1} '
                       f'and #{i + 1})')
    seen[name] = i
    unknown = set(raw) - set(_FIELDS)
    if unknown:
      raise ConfigError(f'{label}: unknown field(s) {sorted(unknown)}; fields are {list(_FIELDS)}')
    types = raw.get('event_types')
    if types is not None:
      if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise ConfigError(f'{label}: "event_types" must be a non-empty list of event type names '
                         '(leave it out to take every type)')
      bad = sorted(set(types) - known)
      if bad:
        raise ConfigError(f'{label}: "event_types" names unknown type(s) {bad}; '
                         f'known: {sorted(known)}')
      types = frozenset(types)
    if 'sink' not in raw:
      raise ConfigError(f'{label}: "sink" is missing (kafka://HOST:PORT/TOPIC or an archive path)')
    out.append(Subscriber(name, types, parse_keys(raw.get('keys'), f'{label}'),
                          parse_sink(raw['sink'], label)))
  _check_sinks_unique(out, where)
  return out


def _check_sinks_unique(subs: Sequence[Subscriber], where: str) -> None:
  """Two subscribers writing one archive or topic would interleave each other's events."""
  owner: Dict[Tuple[str, str, Optional[str]], str] = {}
  for s in subs:
    k = (s.sink.kind, s.sink.target, s.sink.bootstrap)
    if k in owner:
      raise ConfigError(f'{where}: subscribers {owner[k]!r} and {s.name!r} have the same sink '
                       f'{s.sink.describe()}')
    owner[k] = s.name


def load_subscribers(path: str, known_types: Sequence[str]) -> List[Subscriber]:
  """Read and validate the subscriber file at ``path`` (``.toml`` is TOML, anything else JSON)
  against the application's event types ``known_types``."""
  if not os.path.isfile(path):
    raise ConfigError(f'subscriber file {path} does not exist')
  try:
    with open(path, 'rb') as f:
      raw = f.read()
    doc = tomllib.loads(raw.decode('utf-8')) if path.endswith('.toml') else json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
    raise ConfigError(f'{path}: not valid {"TOML" if path.endswith(".toml") else "JSON"}: {e}') from None
  return parse_subscribers(doc, known_types, where=path)


class Matcher:
  """Which subscribers (by index) an event of (type, key) goes to, in subscriber order.

  Built once per worker from the subscriber list; see the module docstring for
  why it is an index and a cache rather than a loop over every filter. Sets of
  subscribers are bit masks: one per event type (who wants the type) and one
  per key (whose key filter passes), computed once per key from a dict of exact
  keys, the distinct prefixes and the glob regexes; an event's subscribers are
  the bits of ``type_mask & key_mask``, cached per (type, key).
  """

  def __init__(self, subscribers: Sequence[Subscriber], cache_limit: int = CACHE_LIMIT):
    self._subs = list(subscribers)
    any_type = 0
    self._type_mask: Dict[str, int] = {}
    self._all_keys = 0
    self._exact: Dict[str, int] = {}
    prefixes: Dict[str, int] = {}
    self._regex: List[Tuple['re.Pattern[str]', int]] = []
    for i, s in enumerate(self._subs):
      bit = 1 << i
      if s.event_types is None:
        any_type |= bit
      for t in s.event_types or ():
        self._type_mask[t] = self._type_mask.get(t, 0) | bit
      if s.keys.matches_all:
        self._all_keys |= bit
      for k in s.keys.exact:
        self._exact[k] = self._exact.get(k, 0) | bit
      for pre in s.keys.prefixes:
        prefixes[pre] = prefixes.get(pre, 0) | bit
      if s.keys.pattern is not None:
        self._regex.append((re.compile(s.keys.pattern), bit))
    self._any_type = any_type
    self._type_mask = {t: m | any_type for t, m in self._type_mask.items()}
    self._prefixes = tuple(prefixes.items())
    self._key_cache: Dict[str, int] = {}
    self._cache: Dict[Tuple[str, str], Tuple[int, ...]] = {}
    self._cache_limit = cache_limit

  def key_mask(self, key: str) -> int:
    mask = self._key_cache.get(key)
    if mask is None:
      mask = self._all_keys | self._exact.get(key, 0)
      for pre, bits in self._prefixes:
        if key.startswith(pre):
          mask |= bits
      for rx, bit in self._regex:
        if not mask & bit and rx.match(key):
          mask |= bit
      if len(self._key_cache) >= self._cache_limit:
        self._key_cache.clear()
      self._key_cache[key] = mask
    return mask

  def match(self, event_type: str, key: str) -> Tuple[int, ...]:
    hit = self._cache.get((event_type, key))
    if hit is not None:
      return hit
    mask = self._type_mask.get(event_type, self._any_type) & self.key_mask(key)
    found = []
    while mask:
      low = mask & -mask
      found.append(low.bit_length() - 1)
      mask ^= low
    if len(self._cache) >= self._cache_limit:
      self._cache.clear()
    result = self._cache[(event_type, key)] = tuple(found)
    return result


def naive_match(subscribers: Sequence[Subscriber], event_type: str, key: str) -> Tuple[int, ...]:
  """The definition :class:`Matcher` must agree with: every subscriber's filter, one by one."""
  return tuple(i for i, s in enumerate(subscribers)
               if (s.event_types is None or event_type in s.event_types)
               and (s.keys.matches_all or key in s.keys.exact
                    or any(key.startswith(p) for p in s.keys.prefixes)
                    or (s.keys.pattern is not None and re.match(s.keys.pattern, key))))
