"""The run history: real SQLite files in tmp dirs, bounded per job, crash-safe, batched.

Most tests run the history without its thread (``threaded=False``: ``pump()`` writes what
is queued on the test's thread), so they are deterministic; the time of the rate-limited
logs is a ``Clock``.  ``RealThreadTests`` runs the real writer thread under the real
reactor, and one test kills a real child process in the middle of a run.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial import unittest as trial

from tests.helpers import EventLog, make_clock
from ztick_tw.history import (
    DROPPED_OUTPUT,
    INTERRUPTED,
    History,
    HistoryError,
    RunRecord,
)
from ztick_tw.history import database as database_module
from ztick_tw.history import store as store_module

ROOT = Path(__file__).resolve().parent.parent


def make(path: Path | None, clock: Clock | None = None, **kwargs: int) -> History:
    """An opened history without a thread on ``path`` (``None``: in memory)."""
    history = History(
        None if path is None else str(path),
        reactor=clock or make_clock(),
        threaded=False,
        **kwargs,
    )
    history.open()
    return history


def read(history: History, job_id: str, n: int = 100) -> list[RunRecord]:
    """The job's runs (newest first), written and read through the queue."""
    found: list[list[RunRecord]] = []
    history.read(job_id, n).addCallback(found.append)
    history.pump()
    assert len(found) == 1
    return found[0]


def record(history: History, job_id: str, count: int, output: bytes = b"out") -> None:
    """``count`` runs of ``job_id`` begun and finished (executed, exit 0)."""
    for i in range(count):
        handle = history.begin(job_id, 1000 + i, 2000 + i, 1)
        history.finish(handle, 3000 + i, "executed", 0, "exit 0", output)


def closed(history: History) -> None:
    """Close the history and check the close fired."""
    done: list[object] = []
    history.close().addCallback(done.append)
    assert done == [None]


def test_a_run_is_read_back_with_every_field(tmp_path: Path) -> None:
    """Begin then finish gives one record: number 1, the times, outcome, exit, detail, output."""
    history = make(tmp_path / "h.sqlite")
    handle = history.begin("backup.daily", 10, 11, 2)
    history.pump()
    assert handle.run == 1
    assert read(history, "backup.daily") == [
        RunRecord(1, 10, 11, None, "running", 2, None, "", b"")
    ]
    history.finish(handle, 12, "failed", 3, "exit 3", b"boom\n")
    assert read(history, "backup.daily") == [
        RunRecord(1, 10, 11, 12, "failed", 2, 3, "exit 3", b"boom\n")
    ]
    closed(history)


def test_newest_first_and_n_limits(tmp_path: Path) -> None:
    """read(job, n) gives the n newest runs, newest first; n <= 0 gives none."""
    history = make(tmp_path / "h.sqlite")
    record(history, "j", 5)
    assert [r.run for r in read(history, "j", 3)] == [5, 4, 3]
    assert read(history, "j", 0) == []
    assert read(history, "unknown") == []


def test_only_the_last_runs_are_kept_and_numbers_go_on(tmp_path: Path) -> None:
    """With runs=3, 7 runs leave runs 5..7 in the file; the next one is 8, never a reused 1."""
    path = tmp_path / "h.sqlite"
    history = make(path, runs=3)
    record(history, "j", 7)
    assert [r.run for r in read(history, "j")] == [7, 6, 5]
    record(history, "j", 1)
    assert [r.run for r in read(history, "j")] == [8, 7, 6]
    closed(history)
    rows = sqlite3.connect(path).execute("SELECT count(*) FROM runs").fetchone()[0]
    assert rows == 3


def test_a_big_batch_is_a_few_statements_and_gives_the_same_rows(tmp_path: Path) -> None:
    """500 runs over 200 jobs in one batch: a handful of SQL statements, exact results.

    ``sqlite3`` hands the GIL back and forth around every statement step, so the writer
    runs multi-row statements (per batch: run numbers, rows, prunes), not ~3 a run.
    """
    path = tmp_path / "h.sqlite"
    history = make(path, runs=2)
    statements: list[str] = []
    history._db._db.set_trace_callback(statements.append)
    for i in range(500):  # job k gets runs at i = k, k + 200, k + 400 (3 or 2 runs)
        handle = history.begin(f"j{i % 200:03d}", i, i, 1)
        history.finish(handle, i + 1, "executed", 0, "", b"")
    history.pump()
    assert len(statements) < 40, f"{len(statements)} statements for 500 runs"
    assert [r.run for r in read(history, "j000")] == [3, 2]
    assert [r.due_ns for r in read(history, "j000")] == [400, 200]
    assert [r.run for r in read(history, "j150")] == [2, 1]
    closed(history)
    db = sqlite3.connect(path)
    assert db.execute("SELECT count(*) FROM runs").fetchone()[0] == 100 * 2 + 100 * 2
    assert db.execute("SELECT last_run FROM jobs WHERE job = 'j099'").fetchone()[0] == 3


def test_numbers_go_on_when_the_number_cache_is_emptied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``LAST_RUN_CACHE`` jobs the cache is emptied; numbers are read from the file."""
    monkeypatch.setattr(database_module, "LAST_RUN_CACHE", 3)
    history = make(tmp_path / "h.sqlite")
    for _ in range(3):
        for job in ("a", "b", "c", "d", "e"):
            record(history, job, 1)
            history.pump()
    assert [r.run for r in read(history, "a")] == [3, 2, 1]
    assert [r.run for r in read(history, "e")] == [3, 2, 1]


def test_the_tail_of_the_output_is_kept(tmp_path: Path) -> None:
    """output_bytes=4 keeps the last 4 bytes; output_bytes=0 keeps none."""
    history = make(tmp_path / "a.sqlite", output_bytes=4)
    record(history, "j", 1, b"0123456789")
    assert read(history, "j")[0].output == b"6789"
    none = make(tmp_path / "b.sqlite", output_bytes=0)
    record(none, "j", 1, b"0123456789")
    assert read(none, "j")[0].output == b""


def test_skipped_entries_have_no_times_and_attempt_zero(tmp_path: Path) -> None:
    """skipped() takes a run number like a run, with started/ended None and attempt 0."""
    history = make(tmp_path / "h.sqlite")
    record(history, "j", 1)
    history.skipped("j", 99, "overlap: still running")
    assert read(history, "j")[0] == RunRecord(
        2, 99, None, None, "skipped", 0, None, "overlap: still running", b""
    )


def test_forget_deletes_the_runs_and_the_numbering(tmp_path: Path) -> None:
    """forget(job) removes its runs; a job of the same id starts again at run 1; others stay."""
    history = make(tmp_path / "h.sqlite")
    record(history, "gone", 3)
    record(history, "kept", 2)
    history.forget("gone")
    assert read(history, "gone") == []
    record(history, "gone", 1)
    assert [r.run for r in read(history, "gone")] == [1]
    assert [r.run for r in read(history, "kept")] == [2, 1]


def test_a_finish_after_forget_does_not_bring_the_job_back(tmp_path: Path) -> None:
    """A run still going when its job is removed leaves no history behind when it ends."""
    history = make(tmp_path / "h.sqlite")
    handle = history.begin("j", 1, 2, 1)
    history.pump()
    history.forget("j")
    history.finish(handle, 3, "executed", 0, "", b"x")
    assert read(history, "j") == []


def test_history_survives_a_restart(tmp_path: Path) -> None:
    """Closed and reopened, the runs are there and numbering continues after them."""
    path = tmp_path / "h.sqlite"
    history = make(path)
    record(history, "j", 2, b"first life")
    closed(history)
    again = make(path)
    assert [(r.run, r.output) for r in read(again, "j")] == [
        (2, b"first life"),
        (1, b"first life"),
    ]
    record(again, "j", 1)
    assert read(again, "j")[0].run == 3
    assert again.interrupted == 0


def test_in_memory_history(tmp_path: Path) -> None:
    """path=None keeps the history in memory: it works, and nothing is written to disk."""
    history = make(None)
    assert history.path is None
    record(history, "j", 2)
    assert [r.run for r in read(history, "j")] == [2, 1]
    closed(history)


def test_a_run_cut_short_by_kill_9_reads_failed_after_open(tmp_path: Path) -> None:
    """A child records a run begun, is killed with SIGKILL; open() marks it failed, interrupted."""
    path = tmp_path / "h.sqlite"
    script = f"""
import os, signal, sys
from twisted.internet import reactor
from ztick_tw.history import History
h = History({str(path)!r}, reactor=reactor)
h.open()
done = h.begin("j", 5, 6, 1)
h.finish(done, 7, "executed", 0, "exit 0", b"ok")
h.begin("j", 8, 9, 2)
def landed(_):
    sys.stdout.write("written\\n"); sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)
h.flush().addCallback(landed)
reactor.run()
"""
    child = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    assert child.stdout == b"written\n"
    history = make(path)
    assert history.interrupted == 1
    assert read(history, "j") == [
        RunRecord(2, 8, 9, None, "failed", 2, None, INTERRUPTED, b""),
        RunRecord(1, 5, 6, 7, "executed", 1, 0, "exit 0", b"ok"),
    ]
    record(history, "j", 1)
    assert read(history, "j", 1)[0].run == 3


def test_many_runs_share_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """5,000 runs (10,000 operations) are written in 3 transactions of at most BATCH_MAX."""
    history = make(tmp_path / "h.sqlite")
    sizes: list[int] = []
    apply = database_module.Database.apply

    def counting(self: database_module.Database, batch: list[tuple[object, ...]]) -> object:
        sizes.append(len(batch))
        return apply(self, batch)

    monkeypatch.setattr(database_module.Database, "apply", counting)
    record(history, "j", 5_000)
    history.pump()
    assert sizes == [store_module.BATCH_MAX, store_module.BATCH_MAX, 10_000 - 2 * 4096]
    assert len(read(history, "j", 10_000)) == 20


def test_a_full_queue_drops_the_oldest_output_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over max_pending_output, the oldest waiting outputs become DROPPED_OUTPUT; logged once."""
    events = EventLog()
    monkeypatch.setattr(store_module, "log", Logger(observer=events))
    history = make(tmp_path / "h.sqlite", max_pending_output=250, output_bytes=100)
    for i in range(5):
        handle = history.begin(f"j{i}", i, i, 1)
        history.finish(handle, i, "executed", 0, "", bytes([65 + i]) * 100)
    history.pump()
    outputs = [read(history, f"j{i}")[0].output for i in range(5)]
    assert outputs == [DROPPED_OUTPUT] * 3 + [b"D" * 100, b"E" * 100]
    assert history.dropped_outputs == 3
    warnings = [e for e in events.events if "dropped the output" in e["log_format"]]
    assert len(warnings) == 1  # rate-limited: the later drops are counted, not logged


def test_a_queue_far_behind_stops_recording_runs_but_keeps_forget_and_read(
    tmp_path: Path,
) -> None:
    """Over max_pending_ops, begin/skipped are dropped (finish too); forget and read go on."""
    history = make(tmp_path / "h.sqlite", max_pending_ops=3)
    record(history, "old", 1)
    history.pump()
    kept = history.begin("a", 1, 1, 1)
    history.skipped("a", 2, "x")
    history.forget("old")
    lost = history.begin("a", 3, 3, 1)
    history.skipped("a", 4, "y")
    assert lost.dropped and not kept.dropped
    history.finish(lost, 5, "executed", 0, "", b"")
    assert history.dropped_runs == 2
    assert [r.run for r in read(history, "a")] == [2, 1]
    assert read(history, "old") == []


def test_lower_limits_at_reopen_cut_old_history(tmp_path: Path) -> None:
    """Reopened with fewer runs and output_bytes, every job is cut down to them at open."""
    path = tmp_path / "h.sqlite"
    history = make(path, runs=10)
    record(history, "j", 6, b"0123456789")
    closed(history)
    smaller = make(path, runs=2, output_bytes=3)
    assert [(r.run, r.output) for r in read(smaller, "j")] == [(6, b"789"), (5, b"789")]


def test_a_write_error_fails_the_batch_and_the_writer_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch whose write fails errbacks its reads and is counted; the next batch works."""
    events = EventLog()
    monkeypatch.setattr(store_module, "log", Logger(observer=events))
    history = make(tmp_path / "h.sqlite")
    apply = database_module.Database.apply
    calls: list[int] = []

    def failing_once(self: database_module.Database, batch: list[tuple[object, ...]]) -> object:
        calls.append(len(batch))
        if len(calls) == 1:
            raise HistoryError("cannot write the run history: disk I/O error")
        return apply(self, batch)

    monkeypatch.setattr(database_module.Database, "apply", failing_once)
    record(history, "j", 1)
    errors: list[Failure] = []
    history.read("j", 5).addErrback(errors.append)
    history.pump()
    assert len(errors) == 1 and isinstance(errors[0].value, HistoryError)
    assert history.errors == 1
    assert any("records lost" in e["log_format"] for e in events.events)
    record(history, "j", 1)
    assert [r.run for r in read(history, "j")] == [1]


def test_a_run_lost_to_a_write_error_never_finishes_another_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The number of a rolled-back begin is given out again; its finish must not land there."""
    history = make(tmp_path / "h.sqlite")
    apply = database_module.Database.apply
    calls: list[int] = []

    def failing_once(self: database_module.Database, batch: list[tuple[object, ...]]) -> object:
        calls.append(len(batch))
        answers = apply(self, batch)
        if len(calls) == 1:  # the begin was written, then the commit "fails"
            self._db.execute("DELETE FROM jobs")
            self._db.execute("DELETE FROM runs")
            raise HistoryError("cannot write the run history: disk I/O error")
        return answers

    monkeypatch.setattr(database_module.Database, "apply", failing_once)
    lost = history.begin("j", 1, 1, 1)
    history.pump()
    assert lost.dropped and lost.run is None
    kept = history.begin("j", 2, 2, 1)
    history.pump()
    history.finish(lost, 3, "failed", 1, "lost", b"lost")
    history.finish(kept, 4, "executed", 0, "kept", b"kept")
    assert read(history, "j") == [RunRecord(1, 2, 2, 4, "executed", 1, 0, "kept", b"kept")]


def test_after_close_nothing_is_recorded_and_reads_fail(tmp_path: Path) -> None:
    """close() writes what was queued; later runs are dropped and read() fails."""
    path = tmp_path / "h.sqlite"
    history = make(path)
    record(history, "j", 2)
    closed(history)
    handle = history.begin("j", 1, 1, 1)
    assert handle.dropped
    errors: list[object] = []
    history.read("j", 1).addErrback(errors.append)
    assert len(errors) == 1
    assert len(read(make(path), "j")) == 2


def test_unknown_outcome_is_refused(tmp_path: Path) -> None:
    """finish() takes only executed/failed/timeout/cancelled."""
    history = make(tmp_path / "h.sqlite")
    handle = history.begin("j", 1, 1, 1)
    with pytest.raises(ValueError, match="outcome"):
        history.finish(handle, 2, "running", None, "", b"")


def test_a_file_that_is_not_a_database_is_an_error(tmp_path: Path) -> None:
    """open() raises HistoryError naming the file when it is not SQLite."""
    path = tmp_path / "h.sqlite"
    path.write_bytes(b"this is not a database, just some text" * 100)
    history = History(str(path), reactor=make_clock(), threaded=False)
    with pytest.raises(HistoryError, match=r"h\.sqlite"):
        history.open()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A file written by a newer ztick-tw (user_version > 1) is not opened."""
    path = tmp_path / "h.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 7")
    conn.close()
    with pytest.raises(HistoryError, match="newer"):
        History(str(path), reactor=make_clock()).open()


def test_the_file_is_in_wal_mode(tmp_path: Path) -> None:
    """The file is opened in WAL mode (readers never block the writer, crash-safe)."""
    path = tmp_path / "h.sqlite"
    closed(make(path))
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


class RealThreadTests(trial.TestCase):
    """The real writer thread under the real reactor."""

    def test_real_thread_writes_reads_and_close_drains(self) -> Deferred[None]:
        """2,000 runs through the thread; read answers on the reactor thread; close drains."""
        directory = tempfile.mkdtemp(prefix="ztick-history-")
        path = os.path.join(directory, "h.sqlite")
        history = History(path, runs=5, reactor=global_reactor)
        history.open()
        for i in range(2_000):
            handle = history.begin(f"job.{i % 100}", i, i, 1)
            history.finish(handle, i + 1, "executed", 0, "exit 0", b"x" * 1000)
        threads: list[threading.Thread] = []

        def got(records: list[RunRecord]) -> Deferred[None]:
            threads.append(threading.current_thread())
            assert [r.run for r in records] == [20, 19, 18, 17, 16]
            for i in range(300):
                handle = history.begin("late", i, i, 1)
                history.finish(handle, i, "executed", 0, "", b"")
            return history.close()

        def check(_: None) -> None:
            assert threads == [threading.main_thread()]
            conn = sqlite3.connect(path)
            late = "SELECT max(run), count(*) FROM runs WHERE job = 'late'"
            assert conn.execute(late).fetchone() == (300, 5)
            assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 100 * 5 + 5
            conn.close()

        return history.read("job.7", 10).addCallback(got).addCallback(check)

    def test_writer_gathers_runs_but_answers_reads_at_once(self) -> Deferred[None]:
        """Woken by runs, the writer waits ``GATHER_S`` to write them together.

        A read (or a flush) makes it write at once.  The writer's sleep is recorded (and
        skipped): runs alone make it gather, a pending read does not.
        """
        directory = tempfile.mkdtemp(prefix="ztick-history-")
        history = History(os.path.join(directory, "h.sqlite"), reactor=global_reactor)
        sleeps: list[float] = []
        history._sleep = sleeps.append
        history.open()
        handle = history.begin("g", 1, 1, 1)
        history.finish(handle, 2, "executed", 0, "", b"")

        def after_runs(_: None) -> Deferred[list[RunRecord]]:
            assert store_module.GATHER_S in sleeps
            sleeps.clear()
            return history.read("g", 1)

        def after_read(records: list[RunRecord]) -> Deferred[None]:
            assert [r.outcome for r in records] == ["executed"]
            assert sleeps == []
            return history.close()

        ready: Deferred[None] = deferLater(global_reactor, 0.2, lambda: None)
        return ready.addCallback(after_runs).addCallback(after_read)
