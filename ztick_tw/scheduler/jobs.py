"""The job table: every job's time and status, and the order in which planned jobs fall due.

This is plain state with no I/O and no clock, built to hold millions of jobs in one
process.  Each job costs one dict entry whose value is a single packed ``int``:

    packed = (execution_ns + 2**63) << 34 | status << 32 | seq

``seq`` (32 bits) is a sequence number given to a planned job each time it is set.  The
due-heap holds the *same* int objects as the dict (a planned job's packed value orders by
time, then by ``seq``, which is the order the jobs were set: jobs due at the same instant
fire in the order they were set, as in ztick).  ``_seq_ids[seq]`` gives the job id back.

Re-setting or removing a planned job does not search the heap: its old heap entry just
stops matching the dict ("stale") and is skipped when it reaches the top.  When stale
entries and holes outnumber live ones, the heap and sequence table are rebuilt in one
O(n) pass that keeps the relative order, so every operation stays O(log n) amortized.

The ids are also kept sorted (``SortedIds``, about 9 bytes per job: one pointer to the
dict's own id object) so that a prefix query costs O(log n + matches) and can be resumed
after the last id it returned (``scan``), instead of scanning every job.  A new id is not
inserted in sorted order when it is set: it waits in a small buffer that is sorted and
merged in every ``FOLD_AT`` new ids or before a scan.  With a million ids, ids that grow
(``job.0000001``...) then cost 0.12-0.15 µs each instead of 0.44 µs for a
``SortedList.add``; random ids cost 3-5 µs either way (cache misses while bisecting).
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterable, Iterator, Mapping, Sequence

from ztick_tw.model import I64_MAX, I64_MIN, JobStatus

_OFFSET = 1 << 63
_SHIFT = 34
_STATUS_SHIFT = 32
_SEQ_MASK = (1 << 32) - 1
_STATUS_MASK = 3 << _STATUS_SHIFT
_LOW_MASK = (1 << _SHIFT) - 1

PLANNED = int(JobStatus.PLANNED)
TRIGGERED = int(JobStatus.TRIGGERED)
EXECUTED = int(JobStatus.EXECUTED)
FAILED = int(JobStatus.FAILED)

_STATUSES = tuple(JobStatus)

#: Ids are kept in sorted chunks of at most ``2 * _CHUNK`` (a full one is cut in two).
_CHUNK = 1000
#: New ids wait in an unsorted buffer until there are this many, then are folded in.  A
#: fold of 256 random ids into a million takes about 1 ms here (1,024: 4-5 ms, too much
#: for one reactor turn); ids that grow fold in 0.2 ms; the cost per id is the same.
FOLD_AT = 256


def pack(execution_ns: int, status: int, seq: int = 0) -> int:
    """Pack a job's time, status and sequence number into one int (see module doc)."""
    return ((execution_ns + _OFFSET) << _SHIFT) | (status << _STATUS_SHIFT) | seq


def unpack_ns(packed: int) -> int:
    """The execution time (ns since the epoch) of a packed value."""
    return (packed >> _SHIFT) - _OFFSET


def unpack_status(packed: int) -> JobStatus:
    """The status of a packed value."""
    return _STATUSES[(packed >> _STATUS_SHIFT) & 3]


class SortedIds:
    """Every job id, sorted for prefix scans, and cheap to add to.

    The ids live in sorted chunks (``_chunks``, with ``_maxes[k]`` the last id of chunk
    ``k``), as in ``sortedcontainers.SortedList`` but with no positional index: a scan
    finds its place by bisecting ids, not positions.  A new id is only put in ``_fresh``
    (a dict used as an ordered set); every ``FOLD_AT`` new ids, or before a scan, the
    fresh ids are sorted and merged into the chunks in one pass.  A fold is bounded work
    (at most ``FOLD_AT`` ids), so no reactor turn ever sorts or merges the whole index.
    Ids that only grow (``job.0000001``, ``job.0000002``...) fold with one ``extend``.
    """

    __slots__ = ("_chunks", "_fresh", "_maxes")

    def __init__(self, ids: Iterable[str] = ()) -> None:
        ordered = sorted(ids)
        self._chunks: list[list[str]] = [
            ordered[i : i + _CHUNK] for i in range(0, len(ordered), _CHUNK)
        ]
        self._maxes: list[str] = [chunk[-1] for chunk in self._chunks]
        self._fresh: dict[str, None] = {}  # added, not folded in yet

    def __len__(self) -> int:
        return sum(map(len, self._chunks)) + len(self._fresh)

    def __iter__(self) -> Iterator[str]:
        """Every id, in order (folds the fresh ones in first)."""
        if self._fresh:
            self._fold()
        for chunk in self._chunks:
            yield from chunk

    def add(self, job_id: str) -> None:
        """Add an id that is not in the index: O(1), plus a bounded fold every ``FOLD_AT``."""
        fresh = self._fresh
        fresh[job_id] = None
        if len(fresh) >= FOLD_AT:
            self._fold()

    def remove(self, job_id: str) -> None:
        """Remove an id that is in the index (``KeyError`` if it is not)."""
        fresh = self._fresh
        if job_id in fresh:
            del fresh[job_id]
            return
        chunks = self._chunks
        maxes = self._maxes
        pos = bisect_left(maxes, job_id)
        chunk = chunks[pos] if pos < len(chunks) else []
        i = bisect_left(chunk, job_id)
        if i == len(chunk) or chunk[i] != job_id:
            raise KeyError(job_id)
        del chunk[i]
        if len(chunk) < _CHUNK // 2 and len(chunks) > 1:
            # Keep chunks from thinning out: join this one to a neighbour (cut again
            # if that makes it too long).
            if pos == len(chunks) - 1:
                pos -= 1
            chunk = chunks[pos]
            chunk.extend(chunks[pos + 1])
            del chunks[pos + 1]
            del maxes[pos + 1]
            maxes[pos] = chunk[-1]
            self._cut(pos)
        elif not chunk:
            del chunks[pos]
            del maxes[pos]
        elif i == len(chunk):
            maxes[pos] = chunk[-1]

    def _cut(self, pos: int) -> None:
        """Cut chunk ``pos`` in two if it is too long."""
        chunk = self._chunks[pos]
        if len(chunk) > 2 * _CHUNK:
            self._chunks.insert(pos + 1, chunk[_CHUNK:])
            del chunk[_CHUNK:]
            self._maxes.insert(pos, chunk[-1])

    def _fold(self) -> None:
        """Sort the fresh ids and merge them into the chunks (at most ``FOLD_AT`` ids)."""
        batch = sorted(self._fresh)
        self._fresh = {}
        chunks = self._chunks
        maxes = self._maxes
        if not chunks or batch[0] > maxes[-1]:
            # All after the last id: one extend, then full chunks are cut off the end.
            if not chunks:
                chunks.append([])
                maxes.append("")
            last = chunks[-1]
            last.extend(batch)
            maxes[-1] = batch[-1]
            if len(last) > 2 * _CHUNK:
                del chunks[-1]
                del maxes[-1]
                for i in range(0, len(last), _CHUNK):
                    piece = last[i : i + _CHUNK]
                    chunks.append(piece)
                    maxes.append(piece[-1])
            return
        pos = 0
        end = len(maxes)
        for job_id in batch:
            pos = bisect_left(maxes, job_id, pos, end)
            if pos == end:
                pos -= 1
                chunk = chunks[pos]
                chunk.append(job_id)
                maxes[pos] = job_id
            else:
                chunk = chunks[pos]
                insort(chunk, job_id)
            if len(chunk) > 2 * _CHUNK:
                self._cut(pos)
                end += 1

    def scan(self, prefix: str, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` ids that start with ``prefix``, in order.

        From the first id at or after ``prefix``, or after ``after`` if given; stops at
        the first id that does not start with ``prefix``.  Folds the fresh ids in first.
        """
        if self._fresh:
            self._fold()
        chunks = self._chunks
        maxes = self._maxes
        if after is None:
            pos = bisect_left(maxes, prefix)
            if pos == len(maxes):
                return []
            i = bisect_left(chunks[pos], prefix)
        else:
            pos = bisect_right(maxes, after)
            if pos == len(maxes):
                return []
            i = bisect_right(chunks[pos], after)
        out: list[str] = []
        while pos < len(chunks) and len(out) < limit:
            part = chunks[pos][i : i + limit - len(out)]
            if not part[-1].startswith(prefix):
                # The matches end inside this part (they are contiguous: ids are sorted).
                for job_id in part:
                    if not job_id.startswith(prefix):
                        break
                    out.append(job_id)
                return out
            if not part[0].startswith(prefix):
                return out
            out.extend(part)
            pos += 1
            i = 0
        return out


class JobTable:
    """Jobs by id, plus a heap of planned jobs ordered by due time then by set order."""

    def __init__(self) -> None:
        self._jobs: dict[str, int] = {}
        self._heap: list[int] = []
        self._seq_ids: list[str | None] = []
        self._counts = [0, 0, 0, 0]  # by status
        self._next_seq = 0
        self._ids = SortedIds()  # every id, sorted: the prefix index
        self._loading = False  # between the first ``load`` and ``finish_load``

    # -- reading ---------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def get(self, job_id: str) -> tuple[JobStatus, int] | None:
        """``(status, execution_ns)`` of a job, or ``None`` if there is no such job."""
        packed = self._jobs.get(job_id)
        if packed is None:
            return None
        return _STATUSES[(packed >> _STATUS_SHIFT) & 3], (packed >> _SHIFT) - _OFFSET

    def raw(self, job_id: str) -> int | None:
        """The packed value of a job: changes whenever the job is set, fired or finished."""
        return self._jobs.get(job_id)

    def count(self, status: JobStatus) -> int:
        """How many jobs have ``status``."""
        return self._counts[status]

    def items(self, prefix: str = "") -> Iterator[tuple[str, JobStatus, int]]:
        """``(id, status, execution_ns)`` of every job whose id starts with ``prefix``.

        Jobs come in the order they were first set (after a replay, a job re-set in
        the log comes where its last planned frame was).  The table must not change
        while the iterator is in use.
        """
        for job_id, packed in self._jobs.items():
            if job_id.startswith(prefix):
                yield (
                    job_id,
                    _STATUSES[(packed >> _STATUS_SHIFT) & 3],
                    (packed >> _SHIFT) - _OFFSET,
                )

    def scan(
        self, prefix: str, after: str | None = None, limit: int = 1000
    ) -> list[tuple[str, JobStatus, int]]:
        """Up to ``limit`` jobs whose id starts with ``prefix``, in id order.

        With ``after``, the scan resumes after that id (which need not exist any more),
        so a long answer can be read in slices while the table changes in between: every
        job that exists for the whole scan and is not re-keyed is returned exactly once.
        Costs O(log n + limit), whatever the number of jobs.
        """
        jobs = self._jobs
        statuses = _STATUSES
        out: list[tuple[str, JobStatus, int]] = []
        for job_id in self._ids.scan(prefix, after, limit):
            packed = jobs[job_id]
            out.append(
                (job_id, statuses[(packed >> _STATUS_SHIFT) & 3], (packed >> _SHIFT) - _OFFSET)
            )
        return out

    def next_due(self) -> int | None:
        """The due time of the earliest planned job, or ``None`` if none is planned."""
        heap = self._heap
        jobs = self._jobs
        seq_ids = self._seq_ids
        while heap:
            top = heap[0]
            job_id = seq_ids[top & _SEQ_MASK]
            if job_id is not None and jobs.get(job_id) == top:
                return (top >> _SHIFT) - _OFFSET
            heapq.heappop(heap)
            seq_ids[top & _SEQ_MASK] = None
        return None

    # -- writing ---------------------------------------------------------------------

    def set(self, job_id: str, execution_ns: int) -> None:
        """Create or replace a job: new time, status ``planned``."""
        if not I64_MIN <= execution_ns <= I64_MAX:
            raise ValueError(f"execution time {execution_ns} is outside the signed 64-bit range")
        old = self._jobs.get(job_id)
        if old is not None:
            self._counts[(old >> _STATUS_SHIFT) & 3] -= 1
        else:
            self._ids.add(job_id)
        seq = self._next_seq
        if seq > _SEQ_MASK:
            self._compact()
            seq = self._next_seq
        packed = ((execution_ns + _OFFSET) << _SHIFT) | seq
        self._next_seq = seq + 1
        self._seq_ids.append(job_id)
        self._jobs[job_id] = packed
        self._counts[PLANNED] += 1
        heapq.heappush(self._heap, packed)
        self._maybe_compact()

    def set_status(self, job_id: str, status: JobStatus) -> int:
        """Give an existing job a non-planned status, keeping its time.

        Returns the new packed value.  A planned job that leaves ``planned`` this way is
        no longer due.  To plan a job again, ``set`` it.
        """
        if status == PLANNED:
            raise ValueError("use set() to plan a job again")
        old = self._jobs[job_id]
        self._counts[(old >> _STATUS_SHIFT) & 3] -= 1
        packed = (old & ~_LOW_MASK) | (int(status) << _STATUS_SHIFT)
        self._jobs[job_id] = packed
        self._counts[status] += 1
        return packed

    def remove(self, job_id: str) -> bool:
        """Delete a job; ``False`` if there was no such job."""
        old = self._jobs.pop(job_id, None)
        if old is None:
            return False
        self._ids.remove(job_id)
        self._counts[(old >> _STATUS_SHIFT) & 3] -= 1
        self._maybe_compact()
        return True

    def pop_due(self, now_ns: int, limit: int) -> list[tuple[str, int, int]]:
        """Take up to ``limit`` planned jobs due at or before ``now_ns``, earliest first.

        Each is marked ``triggered`` and returned as ``(id, execution_ns, packed)`` where
        ``packed`` is its new (triggered) value, for later "is it still the same run"
        checks.
        """
        heap = self._heap
        jobs = self._jobs
        seq_ids = self._seq_ids
        counts = self._counts
        limit_key = ((now_ns + _OFFSET) << _SHIFT) | _LOW_MASK
        out: list[tuple[str, int, int]] = []
        triggered_bits = TRIGGERED << _STATUS_SHIFT
        while heap and len(out) < limit:
            top = heap[0]
            if top > limit_key:
                break
            heapq.heappop(heap)
            seq = top & _SEQ_MASK
            job_id = seq_ids[seq]
            seq_ids[seq] = None
            if job_id is None or jobs.get(job_id) != top:
                continue
            packed = (top & ~_LOW_MASK) | triggered_bits
            jobs[job_id] = packed
            counts[PLANNED] -= 1
            counts[TRIGGERED] += 1
            out.append((job_id, (top >> _SHIFT) - _OFFSET, packed))
        return out

    def restore(self, job_id: str, packed: int | None) -> None:
        """Put a job back as it was (``packed`` from ``raw``), or delete it (``None``).

        Used to undo a change whose logfile write failed.  A planned job gets its old
        sequence number back when its slot is intact (else a new one).
        """
        old = self._jobs.pop(job_id, None)
        if old is not None:
            self._counts[(old >> _STATUS_SHIFT) & 3] -= 1
        if packed is None:
            if old is not None:
                self._ids.remove(job_id)
            self._maybe_compact()
            return
        if old is None:
            self._ids.add(job_id)
        if (packed >> _STATUS_SHIFT) & 3 == PLANNED:
            seq = packed & _SEQ_MASK
            if seq < len(self._seq_ids) and self._seq_ids[seq] == job_id:
                # Its sequence slot is intact: the very same value comes back.
                self._jobs[job_id] = packed
                self._counts[PLANNED] += 1
                heapq.heappush(self._heap, packed)
            else:
                # Back in the dict first, so that ``set`` treats it as a re-set (the id
                # is already in the index).
                self._jobs[job_id] = packed
                self._counts[PLANNED] += 1
                self.set(job_id, unpack_ns(packed))
        else:
            self._jobs[job_id] = packed
            self._counts[(packed >> _STATUS_SHIFT) & 3] += 1

    @staticmethod
    def replay_order(
        jobs: Mapping[str, int], seq_ids: Sequence[str | None]
    ) -> Iterator[tuple[str, int, int, int]]:
        """``(id, execution_ns, status, packed)`` of a snapshot's jobs, in replay order.

        Planned jobs come first in sequence order (so, replayed, jobs due at the same
        instant keep their firing order), then every other job.  Works on the copies
        ``snapshot`` returns, from any thread.
        """
        for seq, job_id in enumerate(seq_ids):
            if job_id is None:
                continue
            packed = jobs.get(job_id)
            if packed is None or packed & _LOW_MASK != seq:
                continue  # removed, re-set since, or no longer planned
            yield job_id, (packed >> _SHIFT) - _OFFSET, PLANNED, packed
        for job_id, packed in jobs.items():
            status = (packed >> _STATUS_SHIFT) & 3
            if status != PLANNED:
                yield job_id, (packed >> _SHIFT) - _OFFSET, status, packed

    def snapshot(self) -> tuple[dict[str, int], tuple[str | None, ...]]:
        """Copies of the job dict and the sequence table, for a compaction to read.

        Both are invisible to the garbage collector once it has looked at them (a dict
        of str to int, a tuple of str), so a million-job snapshot does not slow down
        every full collection while the compaction runs.
        """
        return dict(self._jobs), tuple(self._seq_ids)

    # -- bulk loading ----------------------------------------------------------------

    def load(self, job_id: str, execution_ns: int, status: int) -> None:
        """Replay one job frame without maintaining the heap; call ``finish_load`` after.

        A planned job gets its sequence number here, in frame order, so jobs due at
        the same instant fire in the order they were set, as before the restart.
        """
        jobs = self._jobs
        counts = self._counts
        self._loading = True
        old = jobs.get(job_id)
        if old is not None:
            counts[(old >> _STATUS_SHIFT) & 3] -= 1
        if status:
            jobs[job_id] = ((execution_ns + _OFFSET) << _SHIFT) | (status << _STATUS_SHIFT)
        else:
            seq = self._next_seq
            self._next_seq = seq + 1
            self._seq_ids.append(job_id)
            jobs[job_id] = ((execution_ns + _OFFSET) << _SHIFT) | seq
        counts[status] += 1

    def unload(self, job_id: str) -> None:
        """Replay one job removal frame (no error if the job is unknown)."""
        old = self._jobs.pop(job_id, None)
        if old is not None:
            self._counts[(old >> _STATUS_SHIFT) & 3] -= 1
            if not self._loading:
                self._ids.remove(job_id)

    def finish_load(self) -> None:
        """Build the due-heap and the id index from the loaded jobs, each in one pass."""
        if self._loading or len(self._ids) != len(self._jobs):
            self._ids = SortedIds(self._jobs)
        self._loading = False
        heap = [packed for packed in self._jobs.values() if not packed & _STATUS_MASK]
        heapq.heapify(heap)
        self._heap = heap
        if self._next_seq > _SEQ_MASK:
            self._compact()
        else:
            self._maybe_compact()

    # -- housekeeping ------------------------------------------------------------------

    @property
    def heap_size(self) -> int:
        """Entries in the due-heap, stale ones included (for tests and benchmarks)."""
        return len(self._heap)

    def _maybe_compact(self) -> None:
        if len(self._seq_ids) > 2 * self._counts[PLANNED] + 4096:
            self._compact()

    def _compact(self) -> None:
        """Renumber live planned jobs 0..n-1 keeping their order, and rebuild the heap."""
        jobs = self._jobs
        new_ids: list[str | None] = []
        heap: list[int] = []
        for seq, job_id in enumerate(self._seq_ids):
            if job_id is None:
                continue
            packed = jobs.get(job_id, -1)
            if packed & _LOW_MASK != seq:
                continue  # removed, re-set since, or no longer planned: a stale entry
            packed = (packed & ~_LOW_MASK) | len(new_ids)
            new_ids.append(job_id)
            jobs[job_id] = packed
            heap.append(packed)
        heapq.heapify(heap)
        self._heap = heap
        self._seq_ids = new_ids
        self._next_seq = len(new_ids)
