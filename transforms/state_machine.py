"""A per-key state machine with one event-time timer, in batch and in streaming.

Joins with a timeout (:class:`~sourcebeam.transforms.joins.JoinPairs`), long-ride
alerts, sessions that expire: many keyed consumers are the same shape. Each key
holds one value of state; an element arrives and a plain-Python step function
returns the new state, the timer to set (or none), and what to emit; when the
timer fires another step function does the same. :class:`KeyedStateMachine`
runs such a pair of functions (:class:`Machine`) with two expansions, one rule:

* streaming (unbounded input): a stateful DoFn, one ``ReadModifyWriteState`` and
  one watermark timer per key, built by :func:`make_state_machine_fn`;
* batch (bounded input, the default there): one ``GroupByKey``, then each key's
  elements folded through the same step function in one call, then its timer
  fired until the machine clears it. A bounded run's watermark reaches the end of
  time only after every element, so every timer of the streaming expansion fires
  after every element of its key too: both give the same outputs, with the same
  timestamps (an element's output carries the element's timestamp, a timer's the
  timer's time), and the batch one without a state read, a state write and a
  timer per element (a replay's taxi consumer: two such steps per ride event).

Elements of one key arrive in no particular order in either expansion (a
``GroupByKey`` and a runner's shuffle both leave it open): a machine whose result
depends on the order of its key's elements gives one of the results that order
allows in both.

Every output PCollection is re-windowed with
:func:`~sourcebeam.transforms.timing.timer_output_windowing` (timer output is
behind the watermark when it fires).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, NamedTuple, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import PickleCoder
from apache_beam.transforms import window
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from sourcebeam.transforms.errors import ConfigError
from sourcebeam.transforms.expansions import check_expansion, chosen_expansion
from sourcebeam.transforms.timing import timer_output_windowing, ts_of_millis

__all__ = ['KeyedStateMachine', 'Machine', 'Step', 'make_state_machine_fn', 'run_key', 'MAIN',
           'MAX_TIMER_ROUNDS']

MAIN = 'main'
# A timer that fires and sets itself again is fired again at once (the watermark is past
# it); a machine that never stops doing so is a bug in its step function, said as such.
MAX_TIMER_ROUNDS = 1000


class Step(NamedTuple):
  """What a step function returns: the key's new state (None clears it), the timer to
  set in epoch millis (None clears it), main outputs, and ``(tag, value)`` outputs."""
  state: Any = None
  timer: Optional[int] = None
  outputs: Tuple[Any, ...] = ()
  tagged: Tuple[Tuple[str, Any], ...] = ()


class Machine(NamedTuple):
  """The step functions: ``on_event(state, key, element)`` and ``on_timer(state, key)``,
  each returning a :class:`Step` (``state`` is None for a key with none)."""
  on_event: Callable[[Any, Any, Any], Step]
  on_timer: Callable[[Any, Any], Step]


def _emit(step: Step, timestamp: Optional[Timestamp] = None) -> Iterable:
  """The step's outputs, at ``timestamp`` (None: the DoFn's own, the element's or the timer's)."""
  for out in step.outputs:
    yield out if timestamp is None else window.TimestampedValue(out, timestamp)
  for tag, out in step.tagged:
    yield pvalue.TaggedOutput(tag, out if timestamp is None else
                              window.TimestampedValue(out, timestamp))


def make_state_machine_fn(machine: Machine, key_type: type = str) -> beam.DoFn:
  """The streaming expansion's DoFn over ``(key, element)``.

  Its timer is named for the key type: Beam's FnApiRunner (2.77) mixes up the timers of
  two stateful DoFns of one pipeline that share a timer name but not a key coder (a
  ``ValueError`` decoding timers), as two machines of one app may well do.
  """
  state_spec = ReadModifyWriteStateSpec('state', PickleCoder())
  timer_spec = TimerSpec(f'timer_{key_type.__name__}', TimeDomain.WATERMARK)

  class StateMachineFn(beam.DoFn):

    def process(self, element, state=beam.DoFn.StateParam(state_spec),
                timer=beam.DoFn.TimerParam(timer_spec)):
      key, value = element
      yield from self._apply(machine.on_event(state.read(), key, value), state, timer)

    @on_timer(timer_spec)
    def fire(self, key=beam.DoFn.KeyParam, state=beam.DoFn.StateParam(state_spec),
             timer=beam.DoFn.TimerParam(timer_spec)):
      yield from self._apply(machine.on_timer(state.read(), key), state, timer)

    @staticmethod
    def _apply(step: Step, state, timer) -> Iterable:
      if step.state is None:
        state.clear()
      else:
        state.write(step.state)
      if step.timer is None:
        timer.clear()
      else:
        timer.set(ts_of_millis(step.timer))
      yield from _emit(step)

  return StateMachineFn()


def run_key(machine: Machine, key: Any, timed: Iterable[Tuple[Timestamp, Any]]) -> Iterable:
  """One key's whole bounded run (the batch expansion, plain Python): every element in the
  order given, then the timer fired until the machine clears it; outputs timestamped."""
  state, timer = None, None
  for timestamp, value in timed:
    step = machine.on_event(state, key, value)
    state, timer = step.state, step.timer
    yield from _emit(step, timestamp)
  for _ in range(MAX_TIMER_ROUNDS):
    if timer is None:
      return
    step = machine.on_timer(state, key)
    fired_at, state, timer = timer, step.state, step.timer
    yield from _emit(step, ts_of_millis(fired_at))
  raise ConfigError(f'key {key!r}: the timer was still set after {MAX_TIMER_ROUNDS} firings '
                    'at the end of the input: on_timer must clear it (return timer=None) '
                    'once nothing is left to wait for')


class _Timed(beam.DoFn):
  def process(self, element, timestamp=beam.DoFn.TimestampParam):
    key, value = element
    yield key, (timestamp, value)


class _RunKeys(beam.DoFn):
  def __init__(self, machine: Machine):
    self.machine = machine

  def process(self, grouped):
    key, timed = grouped
    yield from run_key(self.machine, key, timed)


class KeyedStateMachine(beam.PTransform):
  """``(key, element)`` -> ``{'main': ..., tag: ...}`` PCollections of the machine's outputs.

  The input's element type must say its key type (``.with_output_types(Tuple[int, Any])``
  on the step that keys it): state and grouping need a deterministic key coder.

  Args:
    machine: the step functions (:class:`Machine`).
    tags: the tags the machine emits besides the main output.
    key_type: the key's Python type (the batch expansion's grouping is typed with it).
    expansion: ``'auto'`` (batch for bounded input), ``'batch'`` or ``'streaming'``.
  """

  def __init__(self, machine: Machine, *, tags: Sequence[str] = (), key_type: type = str,
               expansion: str = 'auto'):
    super().__init__()
    check_expansion(expansion)
    if MAIN in tags:
      raise ConfigError(f'{MAIN!r} is the main output, not a tag')
    self.machine, self.tags, self.key_type = machine, tuple(tags), key_type
    self._expansion = expansion

  def chosen_expansion(self, pcoll: beam.PCollection) -> str:
    return chosen_expansion(self._expansion, pcoll)

  def expand(self, keyed: beam.PCollection) -> Dict[str, beam.PCollection]:
    keyed = keyed | 'Global' >> beam.WindowInto(window.GlobalWindows())
    if self.chosen_expansion(keyed) == 'batch':
      fn, keyed = _RunKeys(self.machine), (
          keyed
          | 'Timed' >> beam.ParDo(_Timed()).with_output_types(Tuple[self.key_type, Any])
          | 'PerKey' >> beam.GroupByKey())
    else:
      fn = make_state_machine_fn(self.machine, self.key_type)
    out = keyed | 'Steps' >> beam.ParDo(fn).with_outputs(*self.tags, main=MAIN)
    return {name: out[name] | timer_output_windowing(f'{name.capitalize()}Windowing')
            for name in (MAIN, ) + self.tags}
