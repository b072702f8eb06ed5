"""Sourcebeam: event sourcing on Apache Beam.

The public API, for applications (a team's event schemas and consumers)::

    from sourcebeam import App

    app = App('orders', schemas='schemas')
    app.view('orders', handler=OrderStatus(), event_types=['OrderPlaced', 'OrderShipped'])

and run with ``sourcebeam publish|replay|stream|fanout|serve|keys --app MODULE:app``.
Everything listed in ``__all__`` is importable from here; the library's modules
live in ``sourcebeam.transforms`` (Beam transforms over plain-Python cores) and
``sourcebeam.schemas`` (the envelope, the registry, the publishing boundary),
the commands in ``sourcebeam.pipelines``, the demo application in
``sourcebeam.demo``. Names are imported when first used, so ``import sourcebeam``
is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it
_EXPORTS = {
    # applications
    'App': 'sourcebeam.transforms.app',
    'View': 'sourcebeam.transforms.app',
    'Projection': 'sourcebeam.transforms.app',
    'Consumer': 'sourcebeam.transforms.app',
    'ApplyApp': 'sourcebeam.transforms.consumers',
    'ReplayApp': 'sourcebeam.transforms.consumers',
    'WriteAppOutputs': 'sourcebeam.transforms.consumers',
    'AppResult': 'sourcebeam.transforms.consumers',
    # per-key order: the handler protocol and the transform
    'Handler': 'sourcebeam.transforms.ordering_core',
    'ProcessInOrder': 'sourcebeam.transforms.ordering',
    'OrderedResult': 'sourcebeam.transforms.ordering',
    # CRDTs
    'GCounter': 'sourcebeam.transforms.crdt',
    'PNCounter': 'sourcebeam.transforms.crdt',
    'ORSet': 'sourcebeam.transforms.crdt',
    'QuantityORSet': 'sourcebeam.transforms.crdt',
    'LWWRegister': 'sourcebeam.transforms.crdt',
    'MergeCRDTs': 'sourcebeam.transforms.crdt',
    'CRDTCoder': 'sourcebeam.transforms.crdt',
    'merge_all': 'sourcebeam.transforms.crdt',
    # joins and timers
    'JoinPairs': 'sourcebeam.transforms.joins',
    'JoinResult': 'sourcebeam.transforms.joins',
    'KeyedStateMachine': 'sourcebeam.transforms.state_machine',
    'Machine': 'sourcebeam.transforms.state_machine',
    'Step': 'sourcebeam.transforms.state_machine',
    'timer_output_windowing': 'sourcebeam.transforms.timing',
    'in_global_window': 'sourcebeam.transforms.timing',
    'TIMER_OUTPUT_LATENESS': 'sourcebeam.transforms.timing',
    'ts_of_millis': 'sourcebeam.transforms.timing',
    'millis_of_ts': 'sourcebeam.transforms.timing',
    # the archive, Kafka, publishing
    'WriteArchive': 'sourcebeam.transforms.archive',
    'ReadArchive': 'sourcebeam.transforms.archive',
    'iter_archive': 'sourcebeam.transforms.archive',
    'ReadKafkaMessages': 'sourcebeam.transforms.kafka_read',
    'PublishEvents': 'sourcebeam.transforms.publish',
    # envelopes and schemas
    'Registry': 'sourcebeam.schemas.registry',
    'make_envelope': 'sourcebeam.schemas.envelope',
    'to_json': 'sourcebeam.schemas.envelope',
    'from_json': 'sourcebeam.schemas.envelope',
    'millis_to_iso': 'sourcebeam.schemas.envelope',
    'iso_to_millis': 'sourcebeam.schemas.envelope',
    # errors
    'SourcebeamError': 'sourcebeam.transforms.errors',
    'ConfigError': 'sourcebeam.transforms.errors',
    'DataError': 'sourcebeam.transforms.errors',
}

__all__ = sorted(_EXPORTS) + ['testing']


def __getattr__(name: str) -> Any:
  if name == 'testing':
    return importlib.import_module('sourcebeam.testing')
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f'module sourcebeam has no attribute {name!r}')
  value = getattr(importlib.import_module(module), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(__all__))
