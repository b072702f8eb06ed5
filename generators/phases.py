"""Arrival shapes in phases, the way a load-testing tool describes load.

A generator does not pick event times at random: it asks a schedule of phases
when the next event arrives. A phase is one of

* a constant arrival rate for a duration (``rate=200,duration=1h``),
* a linear ramp from one rate to another over a duration
  (``ramp=50..400,duration=20m``),
* a pause: no arrivals for a duration (``pause=5m``).

Arrivals are spread evenly by the rate (the k-th arrival happens where the
integral of the rate reaches k - 1/2), so a phase of 200 events/s for an hour
holds exactly 720,000 events, and the event times of a file say exactly what
load it models. Everything here is plain Python and deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterator, List, Optional, Sequence, Union

from sourcebeam.schemas.envelope import iso_to_millis

DEFAULT_START = '2026-11-26T00:00:00Z'
DEFAULT_START_MS = iso_to_millis(DEFAULT_START)

# Hello, Retail!'s load: about 10 million events a day.
HELLO_RETAIL_EVENTS_PER_DAY = 10_000_000
HELLO_RETAIL_RATE = HELLO_RETAIL_EVENTS_PER_DAY / 86_400  # ~115.7 events/s

PHASES_HELP = (
    'Phases are separated by ";", each is comma-separated key=value: '
    '"rate=R,duration=D" (constant R events/s), "ramp=A..B,duration=D" (linear ramp '
    'from A to B events/s), "pause=D" (no events). Rates may end in /s, /m or /h '
    '(e.g. 6000/m); durations are like 90s, 10m, 1h30m, 500ms, 1d (a bare number is '
    'seconds). Example: "rate=50,duration=10m;ramp=50..400,duration=20m;pause=5m;'
    'rate=200,duration=30m".')


class PhaseSpecError(ValueError):
  """A phases spec, rate or duration that cannot be read; the message says why."""


@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase: the arrival rate goes linearly from ``rate_from`` to ``rate_to``."""
  duration_s: float
  rate_from: float = 0.0
  rate_to: float = 0.0

  @property
  def kind(self) -> str:
    if self.rate_from == 0 and self.rate_to == 0:
      return 'pause'
    return 'rate' if self.rate_from == self.rate_to else 'ramp'

  @property
  def expected_events(self) -> float:
    return (self.rate_from + self.rate_to) / 2 * self.duration_s

  def __str__(self) -> str:
    d = format_duration(self.duration_s)
    if self.kind == 'pause':
      return f'pause={d}'
    if self.kind == 'rate':
      return f'rate={_num(self.rate_from)},duration={d}'
    return f'ramp={_num(self.rate_from)}..{_num(self.rate_to)},duration={d}'


def constant(rate: float, duration_s: float) -> Phase:
  return Phase(duration_s, rate, rate)


def ramp(rate_from: float, rate_to: float, duration_s: float) -> Phase:
  return Phase(duration_s, rate_from, rate_to)


def pause(duration_s: float) -> Phase:
  return Phase(duration_s, 0.0, 0.0)


def _num(x: float) -> str:
  return f'{x:g}'


_DURATION_PART = re.compile(r'(\d+(?:\.\d+)?)(ms|s|m|h|d)')
_UNIT_S = {'ms': 0.001, 's': 1.0, 'm': 60.0, 'h': 3600.0, 'd': 86400.0}


def parse_duration(text: str) -> float:
  """'90s', '10m', '1h30m', '500ms', '1d' or a bare number of seconds, to seconds."""
  t = str(text).strip().lower()
  if not t:
    raise PhaseSpecError('empty duration')
  try:
    value = float(t)
  except ValueError:
    pos, value = 0, 0.0
    for m in _DURATION_PART.finditer(t):
      if m.start() != pos:
        break
      value += float(m.group(1)) * _UNIT_S[m.group(2)]
      pos = m.end()
    if pos != len(t) or pos == 0:
      raise PhaseSpecError(
          f'bad duration {text!r}: use e.g. 90s, 10m, 1h30m, 500ms, 1d') from None
  if not math.isfinite(value) or value < 0:
    raise PhaseSpecError(f'bad duration {text!r}: must be a finite, non-negative time')
  return value


def format_duration(seconds: float) -> str:
  if seconds >= 3600 and seconds % 3600 == 0:
    return f'{seconds / 3600:g}h'
  if seconds >= 60 and seconds % 60 == 0:
    return f'{seconds / 60:g}m'
  return f'{seconds:g}s'


def parse_rate(text: str) -> float:
  """'200', '200/s', '6000/m', '720000/h' to events per second."""
  t = str(text).strip().lower()
  per = 1.0
  for suffix, seconds in (('/s', 1.0), ('/m', 60.0), ('/h', 3600.0)):
    if t.endswith(suffix):
      t, per = t[:-len(suffix)], seconds
      break
  try:
    value = float(t) / per
  except ValueError:
    raise PhaseSpecError(f'bad rate {text!r}: use events per second, e.g. 200 or 6000/m') from None
  if not math.isfinite(value) or value < 0:
    raise PhaseSpecError(f'bad rate {text!r}: must be a finite, non-negative number')
  return value


def parse_phases(spec: str) -> List[Phase]:
  """A phases spec (see PHASES_HELP) to a list of phases, or PhaseSpecError."""
  phases = []
  parts = [p.strip() for p in str(spec).split(';')]
  if not any(parts):
    raise PhaseSpecError('empty phases spec; ' + PHASES_HELP)
  for i, part in enumerate(parts, 1):
    if not part:
      continue
    kv = {}
    for item in part.split(','):
      if '=' not in item:
        raise PhaseSpecError(f'phase {i} {part!r}: {item.strip()!r} is not key=value')
      k, v = item.split('=', 1)
      k = k.strip().lower()
      if k in kv:
        raise PhaseSpecError(f'phase {i} {part!r}: {k} given twice')
      kv[k] = v.strip()
    keys = set(kv)
    if keys == {'pause'}:
      phases.append(pause(parse_duration(kv['pause'])))
    elif keys == {'rate', 'duration'}:
      phases.append(constant(parse_rate(kv['rate']), parse_duration(kv['duration'])))
    elif keys == {'ramp', 'duration'}:
      if '..' not in kv['ramp']:
        raise PhaseSpecError(f'phase {i} {part!r}: ramp must be FROM..TO, e.g. ramp=50..400')
      a, b = kv['ramp'].split('..', 1)
      phases.append(ramp(parse_rate(a), parse_rate(b), parse_duration(kv['duration'])))
    else:
      raise PhaseSpecError(
          f'phase {i} {part!r}: expected rate=R,duration=D or ramp=A..B,duration=D '
          f'or pause=D')
  if sum(p.expected_events for p in phases) < 0.5:
    raise PhaseSpecError(f'phases {spec!r} hold no events')
  return phases


def total_events(phases: Sequence[Phase]) -> int:
  """How many arrivals the phases hold (rounded to the nearest whole event)."""
  return int(math.floor(sum(p.expected_events for p in phases) + 0.5))


def total_duration_s(phases: Sequence[Phase]) -> float:
  return sum(p.duration_s for p in phases)


def constant_for(n: int, rate: float = HELLO_RETAIL_RATE) -> List[Phase]:
  """n events at a constant rate (by default Hello, Retail!'s ~116 events/s)."""
  if rate <= 0:
    raise PhaseSpecError(f'rate must be positive, got {rate:g}')
  return [constant(rate, n / rate)]


# Relative arrival rate at each hour of a retail day (UTC taken as local time),
# 0h..24h: quiet at night, a lunch bump and an evening peak. Scaled by
# day_phases so the day holds exactly n events; the peak is ~1.7x the mean,
# like Hello, Retail!'s 200/s peak on 116/s average.
DAY_CURVE = (0.45, 0.30, 0.20, 0.15, 0.15, 0.20, 0.35, 0.60, 0.85, 1.00, 1.10, 1.20,
             1.35, 1.30, 1.15, 1.10, 1.15, 1.30, 1.45, 1.55, 1.60, 1.45, 1.10, 0.70, 0.45)


def day_phases(n: int = HELLO_RETAIL_EVENTS_PER_DAY) -> List[Phase]:
  """A sample day: 24 one-hour ramps along DAY_CURVE, holding n events in all."""
  trapezoid_mean = sum((a + b) / 2 for a, b in zip(DAY_CURVE, DAY_CURVE[1:])) / 24
  scale = n / 86_400 / trapezoid_mean
  return [ramp(a * scale, b * scale, 3600.0) for a, b in zip(DAY_CURVE, DAY_CURVE[1:])]


def to_millis(start: Union[int, str, None]) -> int:
  """A start time as epoch millis: int millis, an ISO-8601 string, or None (the default)."""
  if start is None:
    return DEFAULT_START_MS
  if isinstance(start, bool):
    raise PhaseSpecError(f'bad start time {start!r}')
  if isinstance(start, int):
    return start
  try:
    return iso_to_millis(str(start))
  except ValueError:
    raise PhaseSpecError(
        f'bad start time {start!r}: use ISO-8601, e.g. {DEFAULT_START}') from None


def arrival_times(phases: Sequence[Phase], start: Union[int, str, None] = None,
                  limit: Optional[int] = None) -> Iterator[int]:
  """Event times (epoch millis, non-decreasing) of the arrivals the phases hold.

  The k-th arrival (k = 1, 2, ...) is where the integral of the rate, counted
  from the start of the first phase, reaches k - 1/2. ``limit`` stops early.
  """
  t0_ms = to_millis(start)
  n_total = total_events(phases)
  if limit is not None:
    n_total = min(n_total, limit)
  k = 0           # arrivals emitted so far
  before = 0.0    # integral of the rate before this phase
  offset_s = 0.0  # start of this phase, seconds after t0
  for p in phases:
    a, b, dur = p.rate_from, p.rate_to, p.duration_s
    end_count = before + p.expected_events
    base_ms = t0_ms + offset_s * 1000.0
    if a == b and a > 0:
      inv = 1000.0 / a
      while k < n_total and k + 0.5 <= end_count:
        yield int(base_ms + (k + 0.5 - before) * inv)
        k += 1
    elif a != b:
      slope = (b - a) / dur  # rate change per second
      while k < n_total and k + 0.5 <= end_count:
        c = k + 0.5 - before  # arrivals into this phase
        # a*tau + slope/2*tau^2 = c, solved in the form that is stable when slope ~ 0
        denom = a + math.sqrt(max(a * a + 2.0 * slope * c, 0.0))
        tau = 2.0 * c / denom if denom > 0 else dur
        yield int(base_ms + min(tau, dur) * 1000.0)
        k += 1
    before = end_count
    offset_s += dur
    if k >= n_total:
      return


def resolve(n: Optional[int] = None, phases: Optional[Sequence[Phase]] = None,
            default_rate: float = HELLO_RETAIL_RATE) -> List[Phase]:
  """The phases a generator runs: the given ones, or n events at the default rate."""
  if phases:
    return list(phases)
  if n is None:
    raise PhaseSpecError('give a number of events or phases')
  return constant_for(max(int(n), 0), default_rate) if n else [pause(0.0)]
