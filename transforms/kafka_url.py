"""``kafka://HOST:PORT/TOPIC``: how Sourcebeam's command lines and subscriber files name a topic.

One parser for every place that takes a topic (``run.py stream --source``, fan-out
sinks and sources), in plain Python so that the subscriber-file checks test without
Beam.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Optional

# Kafka's own rule for topic names; a bootstrap server needs its port (the Java client refuses
# a bare host, which would otherwise fail deep inside the pipeline).
TOPIC_NAME = re.compile(r'^[A-Za-z0-9._-]{1,249}$')
_KAFKA_URL = re.compile(r'^kafka://(?P<bootstrap>[^/\s]+:\d+)/(?P<topic>[A-Za-z0-9._-]{1,249})$')


class KafkaTopic(NamedTuple):
  """A topic on a broker, as ``kafka://HOST:PORT/TOPIC`` names it."""
  bootstrap: str
  topic: str


def parse_kafka_url(text: str) -> Optional[KafkaTopic]:
  """``kafka://HOST:PORT/TOPIC`` -> KafkaTopic; None for anything else (callers word the error)."""
  m = _KAFKA_URL.match(text or '')
  return KafkaTopic(m['bootstrap'], m['topic']) if m else None
