"""Tests for ``ztick_tw.scheduler.jobs.JobTable``: packed jobs and the lazy due-heap."""

from __future__ import annotations

import bisect
import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ztick_tw.model import I64_MAX, I64_MIN, JobStatus
from ztick_tw.scheduler import jobs as jobs_module
from ztick_tw.scheduler.jobs import JobTable, SortedIds, pack, unpack_ns, unpack_status

P, T, E, F = JobStatus.PLANNED, JobStatus.TRIGGERED, JobStatus.EXECUTED, JobStatus.FAILED


class Reference:
    """The obvious model: a dict of jobs plus a sorted list of planned ``(ns, seq, id)``."""

    def __init__(self) -> None:
        self.jobs: dict[str, tuple[JobStatus, int, int]] = {}  # id -> (status, ns, seq)
        self.planned: list[tuple[int, int, str]] = []
        self.seq = 0

    def _unplan(self, job_id: str) -> None:
        old = self.jobs.get(job_id)
        if old is not None and old[0] == P:
            key = (old[1], old[2], job_id)
            i = bisect.bisect_left(self.planned, key)
            assert self.planned[i] == key
            del self.planned[i]

    def set(self, job_id: str, ns: int) -> None:
        self._unplan(job_id)
        self.seq += 1
        self.jobs[job_id] = (P, ns, self.seq)
        bisect.insort(self.planned, (ns, self.seq, job_id))

    def remove(self, job_id: str) -> bool:
        if job_id not in self.jobs:
            return False
        self._unplan(job_id)
        del self.jobs[job_id]
        return True

    def set_status(self, job_id: str, status: JobStatus) -> None:
        self._unplan(job_id)
        _, ns, _ = self.jobs[job_id]
        self.jobs[job_id] = (status, ns, 0)

    def next_due(self) -> int | None:
        return self.planned[0][0] if self.planned else None

    def pop_due(self, now: int, limit: int) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        while self.planned and len(out) < limit and self.planned[0][0] <= now:
            ns, _, job_id = self.planned.pop(0)
            self.jobs[job_id] = (T, ns, 0)
            out.append((job_id, ns))
        return out

    def count(self, status: JobStatus) -> int:
        return sum(1 for s, _, _ in self.jobs.values() if s == status)

    def get(self, job_id: str) -> tuple[JobStatus, int] | None:
        found = self.jobs.get(job_id)
        return None if found is None else (found[0], found[1])


def assert_agree(table: JobTable, ref: Reference) -> None:
    """Table and model agree on size, counts per status, every job and ``next_due``."""
    assert len(table) == len(ref.jobs)
    for status in JobStatus:
        assert table.count(status) == ref.count(status), status
    assert table.next_due() == ref.next_due()
    assert {(i, s, n) for i, s, n in table.items()} == {
        (i, s, n) for i, (s, n, _) in ref.jobs.items()
    }


# -- packing -------------------------------------------------------------------------


@pytest.mark.parametrize("ns", [I64_MIN, -1, 0, 1, 1_700_000_000_000_000_000, I64_MAX])
@pytest.mark.parametrize("status", list(JobStatus))
def test_pack_round_trip(ns: int, status: JobStatus) -> None:
    """``pack`` keeps time and status recoverable across the whole i64 range."""
    packed = pack(ns, int(status), (1 << 32) - 1)
    assert unpack_ns(packed) == ns
    assert unpack_status(packed) is status


def test_packed_planned_values_order_by_time_then_seq() -> None:
    """Planned packed values compare by time first, then by sequence number."""
    assert pack(-1, 0, 99) < pack(0, 0, 0) < pack(0, 0, 1) < pack(1, 0, 0)
    assert pack(I64_MIN, 0, (1 << 32) - 1) < pack(I64_MIN + 1, 0, 0)


# -- basic operations ----------------------------------------------------------------------


def test_set_get_and_counts() -> None:
    """``set`` creates a planned job; ``get``, ``in``, ``len`` and ``count`` see it."""
    table = JobTable()
    assert table.get("a") is None
    assert "a" not in table
    table.set("a", 10)
    table.set("b", -5)
    assert table.get("a") == (P, 10)
    assert table.get("b") == (P, -5)
    assert "a" in table
    assert len(table) == 2
    assert table.count(P) == 2
    assert table.next_due() == -5


def test_set_rejects_out_of_range() -> None:
    """Times outside i64 are refused and leave the table unchanged."""
    table = JobTable()
    with pytest.raises(ValueError, match="signed 64-bit"):
        table.set("a", I64_MAX + 1)
    with pytest.raises(ValueError):
        table.set("a", I64_MIN - 1)
    assert len(table) == 0
    table.set("a", I64_MAX)
    table.set("b", I64_MIN)
    assert table.pop_due(I64_MIN, 10) == [("b", I64_MIN, table.raw("b"))]
    assert table.next_due() == I64_MAX


def test_reset_replaces_time_and_status() -> None:
    """Setting an existing job replaces its time and puts it back to planned."""
    table = JobTable()
    table.set("a", 10)
    table.pop_due(10, 10)
    table.set_status("a", E)
    assert table.get("a") == (E, 10)
    table.set("a", 50)
    assert table.get("a") == (P, 50)
    assert table.count(P) == 1
    assert table.count(E) == 0
    assert table.next_due() == 50


def test_reset_later_moves_the_job() -> None:
    """Re-setting the earliest job later makes the next job the earliest."""
    table = JobTable()
    table.set("a", 10)
    table.set("b", 20)
    table.set("a", 30)
    assert table.next_due() == 20
    assert [j for j, _, _ in table.pop_due(100, 10)] == ["b", "a"]


def test_remove() -> None:
    """``remove`` deletes a job, updates counts and the due order; unknown is ``False``."""
    table = JobTable()
    table.set("a", 10)
    table.set("b", 20)
    assert table.remove("a") is True
    assert table.remove("a") is False
    assert table.get("a") is None
    assert table.count(P) == 1
    assert table.next_due() == 20
    assert [j for j, _, _ in table.pop_due(100, 10)] == ["b"]
    assert table.next_due() is None


def test_pop_due_marks_triggered_and_respects_now_and_limit() -> None:
    """``pop_due`` takes only due jobs, at most ``limit``, earliest first, as triggered."""
    table = JobTable()
    for i, ns in enumerate([30, 10, 20, 40]):
        table.set(f"j{i}", ns)
    got = table.pop_due(30, 2)
    assert [(j, n) for j, n, _ in got] == [("j1", 10), ("j2", 20)]
    for job_id, _, packed in got:
        assert table.raw(job_id) == packed
        assert unpack_status(packed) is T
    assert table.count(T) == 2
    assert table.count(P) == 2
    assert [(j, n) for j, n, _ in table.pop_due(30, 10)] == [("j0", 30)]
    assert table.pop_due(39, 10) == []
    assert table.next_due() == 40


def test_equal_times_pop_in_set_order() -> None:
    """Jobs due at the same instant come out in the order they were (last) set."""
    table = JobTable()
    for name in ["c", "a", "b", "d"]:
        table.set(name, 100)
    table.set("a", 100)  # re-set: goes after the others
    assert [j for j, _, _ in table.pop_due(100, 10)] == ["c", "b", "d", "a"]


def test_set_status_leaves_heap_and_keeps_time() -> None:
    """``set_status`` on a planned job takes it out of the due order; planned is refused."""
    table = JobTable()
    table.set("a", 10)
    table.set("b", 20)
    packed = table.set_status("a", F)
    assert unpack_status(packed) is F
    assert unpack_ns(packed) == 10
    assert table.get("a") == (F, 10)
    assert table.next_due() == 20
    with pytest.raises(ValueError):
        table.set_status("b", P)
    with pytest.raises(KeyError):
        table.set_status("nope", F)


def test_raw_changes_on_every_transition() -> None:
    """The packed value differs after set, re-set, fire and finish (used as a run check)."""
    table = JobTable()
    table.set("a", 10)
    first = table.raw("a")
    table.set("a", 10)
    second = table.raw("a")
    assert first != second
    ((_, _, triggered),) = table.pop_due(10, 1)
    assert triggered not in (first, second)
    assert table.set_status("a", E) != triggered


def test_items_prefix_and_order() -> None:
    """``items`` filters by prefix and yields jobs in first-set order."""
    table = JobTable()
    table.set("app.b", 2)
    table.set("other", 3)
    table.set("app.a", 1)
    table.set("app.b", 5)
    assert list(table.items("app.")) == [("app.b", P, 5), ("app.a", P, 1)]
    assert [j for j, _, _ in table.items()] == ["app.b", "other", "app.a"]
    assert list(table.items("zzz")) == []


# -- loading ---------------------------------------------------------------------------


def test_load_and_finish_load() -> None:
    """Replayed frames (last write wins, removals delete) give the right table and heap."""
    table = JobTable()
    table.load("a", 30, P)
    table.load("b", 10, P)
    table.load("c", 5, E)
    table.load("d", 7, T)
    table.load("e", 1, P)
    table.unload("e")
    table.unload("never")
    table.load("c", 6, F)
    table.finish_load()
    assert len(table) == 4
    assert table.get("c") == (F, 6)
    assert [table.count(s) for s in JobStatus] == [2, 1, 0, 1]
    assert table.next_due() == 10
    assert [j for j, _, _ in table.pop_due(100, 10)] == ["b", "a"]


def test_loaded_equal_times_keep_last_set_order() -> None:
    """After replay, jobs due at the same instant fire in the order of their last SET.

    A live table given set(a), set(b), set(a) fires b then a; a table replayed from the
    same frames must do the same.
    """
    live = JobTable()
    replayed = JobTable()
    for job_id in ["a", "b", "c", "a"]:
        live.set(job_id, 100)
        replayed.load(job_id, 100, P)
    replayed.finish_load()
    expected = [j for j, _, _ in live.pop_due(100, 10)]
    assert expected == ["b", "c", "a"]
    assert [j for j, _, _ in replayed.pop_due(100, 10)] == expected


def test_set_after_load_goes_after_loaded_jobs() -> None:
    """A job set after replay at the same time as loaded jobs fires after them."""
    table = JobTable()
    table.load("x", 5, P)
    table.load("y", 5, P)
    table.finish_load()
    table.set("z", 5)
    table.set("w", 4)
    assert [j for j, _, _ in table.pop_due(5, 10)] == ["w", "x", "y", "z"]


# -- compaction ------------------------------------------------------------------------


def test_compaction_bounds_heap_and_preserves_order() -> None:
    """Many re-sets trigger compaction; the heap shrinks and the due order is kept."""
    table = JobTable()
    ref = Reference()
    names = [f"j{i}" for i in range(50)]
    for name in names:
        table.set(name, 1000)
        ref.set(name, 1000)
    rnd = random.Random(7)
    max_heap = 0
    for _ in range(20_000):
        name = rnd.choice(names)
        ns = rnd.choice([1000, 1000, 999, 1001])
        table.set(name, ns)
        ref.set(name, ns)
        max_heap = max(max_heap, table.heap_size)
    # 20k sets of 50 jobs: without compaction the heap would hold 20k entries
    assert max_heap <= 2 * 50 + 4096 + 1
    assert_agree(table, ref)
    assert [(j, n) for j, n, _ in table.pop_due(2000, 100)] == ref.pop_due(2000, 100)


def test_compaction_after_removals() -> None:
    """Removing most jobs compacts the heap; the rest still pop in order."""
    table = JobTable()
    for i in range(10_000):
        table.set(f"j{i:05}", 10_000 - i // 2)
    for i in range(0, 10_000):
        if i % 100:
            table.remove(f"j{i:05}")
    assert table.heap_size < 10_000
    assert table.count(P) == 100
    got = [j for j, _, _ in table.pop_due(10**9, 1000)]
    assert got == sorted(
        (f"j{i:05}" for i in range(0, 10_000, 100)), key=lambda j: 10_000 - int(j[1:]) // 2
    )


# -- random comparison with the reference ---------------------------------------------


def test_random_operations_agree_with_reference() -> None:
    """100k seeded random sets, re-sets, removes, status changes and pops match the model."""
    rnd = random.Random(20240601)
    table = JobTable()
    ref = Reference()
    pool = [f"job{i}" for i in range(3000)]
    now = 0
    for step in range(100_000):
        r = rnd.random()
        job_id = rnd.choice(pool)
        if r < 0.55:
            ns = now + rnd.randrange(-50, 400)
            table.set(job_id, ns)
            ref.set(job_id, ns)
        elif r < 0.70:
            assert table.remove(job_id) == ref.remove(job_id)
        elif r < 0.75:
            if job_id in ref.jobs:
                status = rnd.choice([E, F])
                table.set_status(job_id, status)
                ref.set_status(job_id, status)
        elif r < 0.80:
            assert table.next_due() == ref.next_due()
        else:
            now += rnd.randrange(0, 40)
            limit = rnd.randrange(1, 30)
            got = table.pop_due(now, limit)
            assert [(j, n) for j, n, _ in got] == ref.pop_due(now, limit)
        if step % 5000 == 0:
            assert_agree(table, ref)
    assert_agree(table, ref)
    assert [(j, n) for j, n, _ in table.pop_due(10**12, 10**6)] == ref.pop_due(10**12, 10**6)
    assert table.next_due() is None


class JobTableMachine(RuleBasedStateMachine):
    """Hypothesis stateful comparison of ``JobTable`` with ``Reference``."""

    def __init__(self) -> None:
        super().__init__()
        self.table = JobTable()
        self.ref = Reference()
        self.now = 0

    ids = st.sampled_from(["a", "b", "c", "d", "e", "f"])

    @rule(job_id=ids, ns=st.integers(min_value=-3, max_value=6))
    def set_job(self, job_id: str, ns: int) -> None:
        self.table.set(job_id, ns)
        self.ref.set(job_id, ns)

    @rule(job_id=ids)
    def remove_job(self, job_id: str) -> None:
        assert self.table.remove(job_id) == self.ref.remove(job_id)

    @precondition(lambda self: bool(self.ref.jobs))
    @rule(data=st.data(), status=st.sampled_from([E, F, T]))
    def change_status(self, data: st.DataObject, status: JobStatus) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.ref.jobs)))
        self.table.set_status(job_id, status)
        self.ref.set_status(job_id, status)

    @rule(step=st.integers(min_value=0, max_value=3), limit=st.integers(min_value=1, max_value=4))
    def pop(self, step: int, limit: int) -> None:
        self.now += step
        got = self.table.pop_due(self.now, limit)
        assert [(j, n) for j, n, _ in got] == self.ref.pop_due(self.now, limit)

    @rule()
    def compact(self) -> None:
        self.table._compact()

    @invariant()
    def agree(self) -> None:
        assert_agree(self.table, self.ref)


JobTableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60)
TestJobTableMachine = JobTableMachine.TestCase


# -- the prefix index ------------------------------------------------------------------


def test_new_ids_wait_unsorted_and_fold_in_bounded_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new id costs no sorted insert: it waits in a buffer of fewer than ``FOLD_AT``.

    The buffer is folded into the sorted chunks ``FOLD_AT`` ids at a time, or before a
    scan, so no call ever sorts or merges more than ``FOLD_AT`` ids.
    """
    monkeypatch.setattr(jobs_module, "FOLD_AT", 8)
    monkeypatch.setattr(jobs_module, "_CHUNK", 4)
    table = JobTable()
    index = table._ids
    assert isinstance(index, SortedIds)
    folded: list[int] = []
    fold = SortedIds._fold

    def counting_fold(self: SortedIds) -> None:
        folded.append(len(self._fresh))
        fold(self)

    monkeypatch.setattr(SortedIds, "_fold", counting_fold)
    ids = [f"job.{i:03}" for i in range(50)]
    random.Random(5).shuffle(ids)
    for n, job_id in enumerate(ids[:7], 1):
        table.set(job_id, n)
        assert len(index._fresh) == n  # waiting, not sorted in
    assert index._chunks == []
    for n, job_id in enumerate(ids[7:], 8):
        table.set(job_id, n)
        assert len(index._fresh) < 8
    assert folded == [8] * 6
    assert [j for j, _, _ in table.scan("job.", None, 100)] == sorted(ids)
    assert folded == [8] * 6 + [2]
    assert all(1 <= len(chunk) <= 8 for chunk in index._chunks)
    assert index._maxes == [chunk[-1] for chunk in index._chunks]


def test_growing_ids_fold_by_extending_the_last_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids set in increasing order (``job.0000001``...) fold in at the end, in full chunks.

    The index holds the very id objects of the job dict (no second copy of an id).
    """
    monkeypatch.setattr(jobs_module, "FOLD_AT", 10)
    monkeypatch.setattr(jobs_module, "_CHUNK", 4)
    table = JobTable()
    ids = [f"job.{i:07}" for i in range(1, 36)]
    for job_id in ids:
        table.set(job_id, 1)
    assert list(table._ids) == ids
    assert [len(chunk) for chunk in table._ids._chunks] == [4] * 7 + [7]
    keys = {id(k) for k in table._jobs}
    assert all(id(job_id) in keys for chunk in table._ids._chunks for job_id in chunk)


def test_removing_every_id_empties_the_index(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids removed while waiting or after being folded in leave no trace, down to nothing.

    Removing an id the index does not hold is a ``KeyError``.
    """
    monkeypatch.setattr(jobs_module, "FOLD_AT", 5)
    monkeypatch.setattr(jobs_module, "_CHUNK", 4)
    table = JobTable()
    ids = [f"j{i:02}" for i in range(30)]
    random.Random(3).shuffle(ids)
    for job_id in ids:
        table.set(job_id, 1)
    assert [j for j, _, _ in table.scan("j", "j09", 3)] == ["j10", "j11", "j12"]
    table.set("late", 1)  # waits in the buffer
    assert table.remove("late")
    for job_id in ids:
        assert table.remove(job_id)
        assert [j for j, _, _ in table.scan("", None, 100)] == sorted(table._jobs)
    assert table._ids._chunks == []
    assert table._ids._maxes == []
    with pytest.raises(KeyError):
        table._ids.remove("j00")
    table.set("again", 2)
    assert table.scan("", None, 10) == [("again", P, 2)]


def _model_scan(model: set[str], prefix: str, after: str | None, limit: int) -> list[str]:
    """What ``scan`` must return, from a plain ``sorted()`` of the ids."""
    out: list[str] = []
    for job_id in sorted(model):
        if (job_id < prefix) if after is None else (job_id <= after):
            continue
        if not job_id.startswith(prefix) or len(out) == limit:
            break
        out.append(job_id)
    return out


class IndexMachine(RuleBasedStateMachine):
    """Random sets, removes, undos, status changes and (resumed) scans against ``sorted()``.

    Chunks and folds are made tiny so that cuts, joins and folds into the middle happen
    within a few steps.  An open paged scan runs across the changes: it must list, in
    increasing order and once each, every id that existed for its whole duration.
    """

    def __init__(self) -> None:
        super().__init__()
        self._saved = (jobs_module._CHUNK, jobs_module.FOLD_AT)
        jobs_module._CHUNK, jobs_module.FOLD_AT = 4, 3
        self.table = JobTable()
        self.model: set[str] = set()
        self.undo: dict[str, int | None] = {}
        self.paging: tuple[str, str | None] | None = None  # (prefix, after) of an open scan
        self.stable: set[str] = set()  # ids present for the whole open scan
        self.seen: list[str] = []

    def teardown(self) -> None:
        jobs_module._CHUNK, jobs_module.FOLD_AT = self._saved

    ids = st.text(st.sampled_from("ab.1"), min_size=1, max_size=4)

    @rule(job_id=ids, ns=st.integers(0, 9))
    def set_job(self, job_id: str, ns: int) -> None:
        self.undo[job_id] = self.table.raw(job_id)
        self.table.set(job_id, ns)
        self.model.add(job_id)

    @rule(job_id=ids)
    def remove_job(self, job_id: str) -> None:
        self.undo[job_id] = self.table.raw(job_id)
        assert self.table.remove(job_id) == (job_id in self.model)
        self.model.discard(job_id)
        self.stable.discard(job_id)

    @rule(job_id=ids)
    def restore_job(self, job_id: str) -> None:
        if job_id not in self.undo:
            return
        packed = self.undo.pop(job_id)
        self.table.restore(job_id, packed)
        if packed is None:
            self.model.discard(job_id)
            self.stable.discard(job_id)
        else:
            self.model.add(job_id)

    @rule(job_id=ids)
    def fail_job(self, job_id: str) -> None:
        if job_id in self.model:
            self.table.set_status(job_id, JobStatus.FAILED)

    @rule(
        prefix=st.text(st.sampled_from("ab.1"), max_size=2),
        after=st.none() | ids,
        limit=st.integers(1, 5),
    )
    def scan(self, prefix: str, after: str | None, limit: int) -> None:
        got = self.table.scan(prefix, after, limit)
        assert [j for j, _, _ in got] == _model_scan(self.model, prefix, after, limit)
        assert all(self.table.get(j) == (s, n) for j, s, n in got)

    @precondition(lambda self: self.paging is None)
    @rule(prefix=st.text(st.sampled_from("ab.1"), max_size=2))
    def open_scan(self, prefix: str) -> None:
        self.paging = (prefix, None)
        self.stable = {j for j in self.model if j.startswith(prefix)}
        self.seen = []

    @precondition(lambda self: self.paging is not None)
    @rule(limit=st.integers(1, 3))
    def next_page(self, limit: int) -> None:
        assert self.paging is not None
        prefix, after = self.paging
        page = [j for j, _, _ in self.table.scan(prefix, after, limit)]
        assert page == _model_scan(self.model, prefix, after, limit)
        self.seen += page
        if len(page) < limit:
            assert self.seen == sorted(set(self.seen))  # increasing: none twice
            assert self.stable <= set(self.seen)
            self.paging = None
        else:
            self.paging = (prefix, page[-1])

    @rule()
    def iterate(self) -> None:
        """Iterating the index folds it and lists every id in order."""
        assert list(self.table._ids) == sorted(self.model)

    @rule()
    def reload(self) -> None:
        """Rebuild the table from a replay of its jobs (the index is built in one pass)."""
        fresh = JobTable()
        for job_id, status, ns in self.table.items():
            fresh.load(job_id, ns, int(status))
        fresh.finish_load()
        self.table = fresh
        self.undo.clear()

    @invariant()
    def index_is_sorted_model(self) -> None:
        """Chunks sorted, fresh ids apart from them, together exactly the model's ids."""
        index = self.table._ids
        chunked = [job_id for chunk in index._chunks for job_id in chunk]
        assert chunked == sorted(set(chunked))
        assert sorted(chunked + list(index._fresh)) == sorted(self.model)
        assert len(index) == len(self.model)
        assert len(index._fresh) < jobs_module.FOLD_AT
        assert index._maxes == [chunk[-1] for chunk in index._chunks]
        assert all(0 < len(chunk) <= 2 * jobs_module._CHUNK for chunk in index._chunks)


IndexMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=80, deadline=None)
TestIndexMachine = IndexMachine.TestCase
