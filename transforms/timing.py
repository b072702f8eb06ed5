"""Output of event-time timers, and the lateness that keeps it.

An event-time timer's output carries the timer's time, which is behind the
watermark when the timer fires as the watermark jumps (the end of a bounded
stream, a burst after a stall). A downstream ``GroupByKey`` with no allowed
lateness drops such output as late. So a stateful transform re-windows every
output PCollection its timers write to into the global window with
:data:`TIMER_OUTPUT_LATENESS` of allowed lateness (:func:`timer_output_windowing`);
a consumer that groups it in its own windows must allow lateness too.

Also here, :func:`in_global_window`: a PCollection taken into the global window only when it
is not there already, for steps whose state or output spans windows.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.transforms import window
from apache_beam.utils.timestamp import Duration, Timestamp

__all__ = ['TIMER_OUTPUT_LATENESS', 'timer_output_windowing', 'in_global_window', 'ts_of_millis',
           'millis_of_ts']

# Longer than one day, so that output in the global window (whose end is a day
# before the end of time) is not late even when the watermark reaches the end of time.
TIMER_OUTPUT_LATENESS = Duration(seconds=7 * 24 * 3600)


def timer_output_windowing(label: str) -> beam.PTransform:
  """Global window with enough allowed lateness that timer output is never dropped."""
  return label >> beam.WindowInto(window.GlobalWindows(),
                                  allowed_lateness=TIMER_OUTPUT_LATENESS)


def in_global_window(pcoll: beam.PCollection, label: str = 'Global') -> beam.PCollection:
  """``pcoll`` in the global window: itself when its window function is the global one
  already (re-windowing would cost a step per element and change nothing), else through
  ``WindowInto(GlobalWindows())`` labelled ``label``."""
  if isinstance(pcoll.windowing.windowfn, window.GlobalWindows):
    return pcoll
  return pcoll | label >> beam.WindowInto(window.GlobalWindows())


def ts_of_millis(millis: int) -> Timestamp:
  return Timestamp(micros=millis * 1000)


def millis_of_ts(ts: Timestamp) -> int:
  return ts.micros // 1000
