"""Sourcebeam's event contract: the envelope, the schema registry and the publishing boundary.

``schemas.registry`` loads an application's ``.avsc`` files (a :class:`Registry`
per schema folder) and builds the envelope schema around them;
``schemas.envelope`` converts envelopes between memory, JSON and Avro;
``schemas.validation`` turns raw events into published envelopes or dead letters.
"""

from sourcebeam.schemas.registry import EventType, Registry, SchemaError, registry

__all__ = ['EventType', 'Registry', 'SchemaError', 'registry']
