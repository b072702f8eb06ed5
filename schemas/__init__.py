"""Sourcebeam's event contract: the Avro schemas, the envelope and the key rules.

``registry()`` loads the ``.avsc`` files in this package; ``schemas.envelope``
converts envelopes between memory, JSON and Avro; ``schemas.validation`` turns
raw events into published envelopes or dead letters.
"""

from sourcebeam.schemas.registry import EventType, Registry, SchemaError, partition_key_rules, registry

__all__ = ['EventType', 'Registry', 'SchemaError', 'partition_key_rules', 'registry']
