"""The deadlines of a runner's jobs in flight: one heap, finished jobs dropped in bulk.

A network runner arms one timer for the earliest deadline of the jobs it has in flight
(runs may have different timeouts).  A job that finishes is not searched for in the
heap; its entry just stays until it reaches the top.  At 5,000 runs a second with a 30 s
timeout that would keep 150,000 finished jobs alive (and walked by every full garbage
collection: 100-400 ms pauses of the reactor, measured), so once finished entries are
most of the heap it is rebuilt without them: O(n) now and then, O(log n) amortized.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Generic, Protocol, TypeVar


class _HasDone(Protocol):
    @property
    def done(self) -> bool:
        """Whether the job has finished (its deadline no longer matters)."""


J = TypeVar("J", bound=_HasDone)

#: Rebuilding is considered once the heap holds this many entries.
PRUNE_MIN = 1024


class Deadlines(Generic[J]):
    """A heap of ``(deadline, order, job)``; see the module docstring."""

    __slots__ = ("_heap", "_order", "_prune_at")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, J]] = []
        self._order = itertools.count()  # ties keep push order (jobs do not compare)
        self._prune_at = PRUNE_MIN

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, deadline: float, job: J) -> None:
        """Watch ``job``'s deadline."""
        heap = self._heap
        heapq.heappush(heap, (deadline, next(self._order), job))
        if len(heap) >= self._prune_at:
            live = [entry for entry in heap if not entry[2].done]
            heapq.heapify(live)
            self._heap = live
            self._prune_at = max(PRUNE_MIN, 2 * len(live))

    def earliest(self) -> float | None:
        """The earliest deadline of a job not done (``None``: none)."""
        heap = self._heap
        while heap and heap[0][2].done:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_expired(self, now: float) -> list[J]:
        """Take the jobs not done whose deadline is at or before ``now``."""
        heap = self._heap
        expired: list[J] = []
        while heap and (heap[0][2].done or heap[0][0] <= now):
            job = heapq.heappop(heap)[2]
            if not job.done:
                expired.append(job)
        return expired

    def clear(self) -> None:
        """Forget every deadline."""
        self._heap = []
        self._prune_at = PRUNE_MIN
