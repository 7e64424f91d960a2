"""The hand-off between the reactor thread and the telemetry worker: a bounded queue.

The reactor only appends one small tuple per request or run; when the queue is full
the tuple is dropped and counted, so a collector that is down or slow never costs the
reactor more than an append, and memory stays bounded.  ``deque.append`` and
``deque.popleft`` are atomic in CPython, so no lock is taken on either side.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Generic, NamedTuple, TypeVar

if TYPE_CHECKING:
    from ztick_tw.operations import Caller

#: Events held at most before new ones are dropped.
DEFAULT_CAPACITY = 16_384


#: One operation a transport called (a span): ``(operation, caller, identifier, error,
#: start, end)``: the caller (its token names the span's ``ztick.token``), the job or rule
#: id it names ("" when none), the error's class name ("" when it succeeded), and the
#: reactor's time in seconds.  A plain tuple: a ``NamedTuple`` costs the reactor ~1 µs
#: more per request.
RequestEvent = tuple[str, "Caller", str, str, float, float]


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


E = TypeVar("E")


class EventQueue(Generic[E]):
    """A bounded FIFO of events: ``put`` never blocks, drops (and counts) when full.

    ``items`` is the deque itself, for a producer that appends without a method call
    (checking ``len(items) < capacity`` first and counting ``dropped`` otherwise).
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self.capacity = capacity
        self.items: deque[E] = deque()
        self.dropped = 0  # written by the producer thread only
        self.taken = 0  # written by the consumer thread only
        self.pauses = 0  # times the producer paused (requests: tracing paused when full)
        self.paused_seconds = 0.0  # how long, in all (closed pauses)

    @property
    def accepted(self) -> int:
        """Events queued so far (taken or still waiting)."""
        return self.taken + len(self.items)

    def put(self, event: E) -> bool:
        """Append ``event`` unless the queue is full; False (and counted) when dropped."""
        if len(self.items) >= self.capacity:
            self.dropped += 1
            return False
        self.items.append(event)
        return True

    def drain(self, limit: int) -> list[E]:
        """Take up to ``limit`` events, oldest first (the consumer thread)."""
        items = self.items
        taken: list[E] = []
        while len(taken) < limit:
            try:
                taken.append(items.popleft())
            except IndexError:
                break
        self.taken += len(taken)
        return taken

    def __len__(self) -> int:
        return len(self.items)
