"""Readiness polls with deadlines, instead of fixed sleeps.

``wait_until(condition, timeout, what)`` calls ``condition()`` every ``interval`` seconds
until it returns something truthy (which it returns), and fails the test naming ``what``
when ``timeout`` seconds pass first. It returns as soon as the thing is ready, so an idle
machine does not wait for a loaded one's sleep, and a loaded one gets the whole deadline.
With ``proc`` it also fails at once, with the end of the process's stderr, when that process
exits while it waits.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional


def _stderr_tail(proc) -> str:
  try:
    _, err = proc.communicate(timeout=30)
  except Exception as e:  # noqa: BLE001 (a diagnostic only)
    return f'(stderr unavailable: {e})'
  if isinstance(err, bytes):
    err = err.decode('utf-8', 'replace')
  return (err or '')[-3000:]


def wait_until(condition: Callable[[], Any], timeout: float, what: str, *,
               interval: float = 0.2, proc=None,
               describe: Optional[Callable[[], str]] = None) -> Any:
  """Polls ``condition()`` until it is truthy; AssertionError after ``timeout`` seconds."""
  deadline = time.monotonic() + timeout
  while True:
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f'waiting for {what}: the process exited with {proc.returncode}: '
                           f'{_stderr_tail(proc)}')
    value = condition()
    if value:
      return value
    if time.monotonic() >= deadline:
      detail = f' ({describe()})' if describe is not None else ''
      raise AssertionError(f'waited {timeout:.0f}s for {what}{detail}')
    time.sleep(interval)
