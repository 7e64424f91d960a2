"""The hand-off between the reactor thread and the telemetry worker: a bounded queue.

The reactor only appends one small tuple per request or run; when the queue is full
the tuple is dropped and counted, so a collector that is down or slow never costs the
reactor more than an append, and memory stays bounded.  ``deque.append`` and
``deque.popleft`` are atomic in CPython, so no lock is taken on either side.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

#: Events held at most before new ones are dropped.
DEFAULT_CAPACITY = 16_384


class RequestEvent(NamedTuple):
    """One operation called by a transport (a span)."""

    operation: str
    token: str  # the caller's token name, "" when anonymous
    identifier: str  # the job or rule id the call names, "" when none
    error: str  # the error's class name, "" when it succeeded
    start_ns: int
    end_ns: int


class RunEvent(NamedTuple):
    """One runner execution (a span, a run counted, its duration and trigger lag)."""

    job_id: str
    rule_id: str
    runner: str
    attempt: int
    outcome: str  # success, failure, timeout, cancelled, interrupted
    start_ns: int
    end_ns: int
    lag_ns: int  # fired - due; < 0 when unknown


Event = RequestEvent | RunEvent


class EventQueue:
    """A bounded FIFO of events: ``put`` never blocks, drops (and counts) when full."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self._items: deque[Event] = deque()
        self.dropped = 0  # written by the producer thread only
        self.accepted = 0

    def put(self, event: Event) -> bool:
        """Append ``event`` unless the queue is full; False (and counted) when dropped."""
        if len(self._items) >= self.capacity:
            self.dropped += 1
            return False
        self._items.append(event)
        self.accepted += 1
        return True

    def drain(self, limit: int) -> list[Event]:
        """Take up to ``limit`` events, oldest first (the consumer thread)."""
        items = self._items
        taken: list[Event] = []
        while len(taken) < limit:
            try:
                taken.append(items.popleft())
            except IndexError:
                break
        return taken

    def __len__(self) -> int:
        return len(self._items)
