"""Testing an application: its events through its consumers, in a TestPipeline or in one call.

With Beam's own testing tools (what a pipeline test usually looks like)::

    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to
    from sourcebeam import ApplyApp
    from sourcebeam.testing import CreateEvents, view_states

    def test_a_shipped_order_is_not_open():
      with TestPipeline() as p:
        result = p | CreateEvents(app, [placed, shipped]) | ApplyApp(app)
        assert_that(view_states(result, 'orders'), equal_to([('o-1', {...})]))

or in one call, the outputs exactly as ``run.py replay`` writes them::

    outputs = run_app(app, [placed, shipped])
    assert outputs['orders'] == [{'key': 'o-1', 'state': {...}}]

Events are given as a producer sends them (dicts in the envelope's JSON form,
or JSON lines) and go through the same publishing boundary as ``run.py
publish``; an event it refuses fails the test with the dead letter's reason,
since a test's events are meant to be good ones.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Iterable, List, Mapping, Union

import apache_beam as beam

from sourcebeam.schemas.envelope import Envelope
from sourcebeam.transforms.app import App
from sourcebeam.transforms.consumers import (AppResult, ApplyApp, UNPROCESSED_FILE,
                                             WriteAppOutputs, at_event_time)

__all__ = ['published', 'CreateEvents', 'view_states', 'projection_outputs', 'run_app']

RawEvent = Union[Mapping[str, Any], str, bytes]


def published(app: App, events: Iterable[RawEvent]) -> List[Envelope]:
  """Each raw event through the app's publishing boundary; ValueError naming the first one
  refused, with the reason."""
  out = []
  for i, raw in enumerate(events):
    line = raw if isinstance(raw, (str, bytes)) else json.dumps(raw)
    env, dead, _ = app.publish(line, source=f'event #{i}')
    if env is None:
      raise ValueError(f'event #{i} was refused by app {app.name}: {dead["reason"]}')
    out.append(env)
  return out


class CreateEvents(beam.PTransform):
  """PBegin -> the app's published envelopes of ``events``, timestamped at their event time."""

  def __init__(self, app: App, events: Iterable[RawEvent]):
    super().__init__()
    self.envelopes = published(app, events)

  def expand(self, pbegin):
    return (pbegin
            | 'Events' >> beam.Create(self.envelopes)
            | 'AtEventTime' >> beam.Map(at_event_time))


def view_states(result: AppResult, name: str) -> beam.PCollection:
  """``(key, state)`` of a view of an :class:`~sourcebeam.transforms.consumers.AppResult`."""
  return result.views[name] | f'States of {name}' >> beam.Map(lambda kv: (kv[0], kv[1].state))


def projection_outputs(result: AppResult, name: str) -> beam.PCollection:
  """``(key, output)`` of a projection of an AppResult."""
  return result.projections[name]


def run_app(app: App, events: Iterable[RawEvent], beam_args: Iterable[str] = ()
            ) -> Dict[str, List[Any]]:
  """Run every consumer of ``app`` on ``events`` (a bounded run, on the DirectRunner unless
  ``beam_args`` say otherwise) and return each output's lines, parsed: ``{name: [line...]}``
  with ``unprocessed`` too, as ``run.py`` writes them under ``OUT/``."""
  from apache_beam.options.pipeline_options import PipelineOptions
  envelopes = published(app, events)
  out = tempfile.mkdtemp(prefix=f'sourcebeam-{app.name}-')
  try:
    with beam.Pipeline(options=PipelineOptions(list(beam_args))) as p:
      result = p | 'Events' >> beam.Create(envelopes) | 'Consumers' >> ApplyApp(app)
      names = list(result | 'Write' >> WriteAppOutputs(app, out))
    outputs: Dict[str, List[Any]] = {}
    for name in names:
      path = os.path.join(out, f'{name}.jsonl' if name != 'unprocessed' else UNPROCESSED_FILE)
      with open(path, encoding='utf-8') as f:
        outputs[name] = sorted((json.loads(line) for line in f if line.strip()),
                               key=lambda r: json.dumps(r, sort_keys=True))
    return outputs
  finally:
    shutil.rmtree(out, ignore_errors=True)
