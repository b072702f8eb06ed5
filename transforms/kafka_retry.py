"""Asking a Kafka broker, through confluent-kafka, while it may still be settling.

Just after a broker starts or a topic is created, a partition's leader or a consumer group's
coordinator is still being elected: offset reads answer NOT_LEADER_FOR_PARTITION and
committed-offset reads NOT_COORDINATOR. Those answers mean "ask again", not "fail": a fresh
clone's first test met both.
"""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar('T')


def retry_transient(call: Callable[[], T], wait: float = 30.0) -> T:
  """``call()``, again every half second for up to ``wait`` seconds while Kafka's error is
  retriable (or a leader or the topic's metadata is not there yet); any other error at once."""
  from confluent_kafka import KafkaError, KafkaException
  transient = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
               KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError.NOT_COORDINATOR,
               KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE}
  deadline = time.monotonic() + wait
  while True:
    try:
      return call()
    except KafkaException as e:
      error = e.args[0] if e.args else None
      again = isinstance(error, KafkaError) and (error.retriable() or error.code() in transient)
      if not again or time.monotonic() > deadline:
        raise
      time.sleep(0.5)
