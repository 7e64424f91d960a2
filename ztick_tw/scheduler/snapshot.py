"""A frozen copy of the scheduler's state, written out as logfile frames by a compaction.

``Scheduler.snapshot`` copies the job dict, the sequence table and the rules on the
reactor thread (tens of milliseconds for a million jobs); :meth:`Snapshot.write` then
turns the copies into frames in a worker thread while the reactor goes on serving.

Frames come out in an order that replays to the same state: planned jobs in their
sequence order (so jobs due at the same instant still fire in the order they were set),
then every other job, then the rules in the order they were first set, then the
extension entries of SPEC §8-9 (schedules, run states, pauses, rule policies: frame
types 16-20) as the scheduler lists them, after every job and rule they refer to.  Executed and
failed jobs due before ``cutoff_ns`` (the retention limit) are left out and listed in
``expired``, for the scheduler to forget once the compacted log is in place.

Writing holds the GIL for at most ``work`` seconds at a time, then sleeps ``rest``
seconds, so a compaction takes a bounded share of the reactor's interpreter time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ztick_tw.model import Entry, Rule
from ztick_tw.scheduler.jobs import EXECUTED, FAILED, JobTable
from ztick_tw.store.base import CompactionAborted
from ztick_tw.store.codec import encode, encode_job_fields

__all__ = ["Snapshot", "Throttle"]


@dataclass
class Throttle:
    """Caps the share of time a worker thread holds the GIL: ``work`` on, ``rest`` off."""

    work: float = 0.001
    rest: float = 0.012
    clock: Callable[[], float] = time.perf_counter
    sleep: Callable[[float], None] = time.sleep
    _started: float = field(default=-1.0, init=False)

    def __call__(self) -> None:
        """Called often by the worker; sleeps when the current slice is used up."""
        now = self.clock()
        if self._started < 0:
            self._started = now
        elif now - self._started >= self.work:
            self.sleep(self.rest)
            self._started = self.clock()


@dataclass
class Snapshot:
    """The state to write: copies owned by the snapshot, safe to read from a thread."""

    jobs: dict[str, int]
    seq_ids: Sequence[str | None]
    rules: list[Rule]
    cutoff_ns: int | None = None  # executed/failed jobs due before this are dropped
    throttle: Callable[[], None] = field(default_factory=Throttle)
    expired: list[tuple[str, int]] = field(default_factory=list)
    #: Extension entries (types 16-20), written after the rules, in this order.
    #: SPEC §8-9 entries, written after the rules; an iterable built from copies, so
    #: that turning a million schedules into entries happens here, in the worker thread.
    extensions: Iterable[Entry] = field(default_factory=list)
    #: How many frames to write between throttle checks.
    batch: int = 256

    def write(self, out: Callable[[bytes], None], stopping: Callable[[], bool]) -> int:
        """Write every frame through ``out``; return the number written."""
        cutoff = self.cutoff_ns
        pace = self.throttle
        batch = self.batch
        expired = self.expired
        chunk: list[bytes] = []
        frames = 0

        def emit() -> None:
            out(b"".join(chunk))
            chunk.clear()
            if stopping():
                raise CompactionAborted()
            pace()

        for job_id, ns, status, packed in JobTable.replay_order(self.jobs, self.seq_ids):
            if cutoff is not None and ns < cutoff and status in (EXECUTED, FAILED):
                expired.append((job_id, packed))
                continue
            chunk.append(encode_job_fields(job_id, ns, status))
            frames += 1
            if len(chunk) >= batch:
                emit()
        for rule in self.rules:
            chunk.append(encode(rule))
            frames += 1
            if len(chunk) >= batch:
                emit()
        for entry in self.extensions:
            chunk.append(encode(entry))
            frames += 1
            if len(chunk) >= batch:
                emit()
        if chunk:
            emit()
        return frames
