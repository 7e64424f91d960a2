"""The run history's SQLite database: the schema and every statement.

A ``Database`` is used by one thread only (the history's writer thread; or the caller's,
when the history runs without a thread).  ``apply`` writes a batch of operations in one
transaction, so thousands of runs cost one commit.

File layout (``PRAGMA user_version`` = 1)::

    jobs (job TEXT PRIMARY KEY, last_run INTEGER)      -- the last run number given out
    runs (job, run, due, started, ended, outcome, attempt, exit_code, detail, output BLOB)
        UNIQUE INDEX runs_by_job (job, run)             -- reads, prunes, finishes
        INDEX runs_running (outcome) WHERE outcome = 'running'   -- crash recovery at open
    meta (key TEXT PRIMARY KEY, value INTEGER)          -- runs / output_bytes last used

Run numbers come from ``jobs.last_run``, read once per job into a bounded cache and
written back once per batch, so they are never reused until ``forget`` deletes the job's
row.  A run numbered ``k`` prunes the job's runs numbered ``<= k - runs``: a job never
holds more than ``runs`` rows.

A batch's rows go out as multi-row statements (``INSERT ... VALUES (...), (...)``), not
one statement per run: ``sqlite3`` releases and takes back the GIL around every step, and
at 5,000 runs/s three steps a run were 15,000 GIL hand-offs a second with the reactor
thread, which left the writer seconds behind on a busy machine (20,000 runs queued, and
the garbage collector's full passes growing with them: 15 ms, then 66 ms).

WAL with ``synchronous = NORMAL``: a crash (kill -9) loses nothing committed and never
corrupts the file; a power cut may lose the last commits.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from typing import Any

from ztick_tw.history.records import RunHandle, RunRecord

__all__ = [
    "BEGIN",
    "CLOSE",
    "FINISH",
    "FLUSH",
    "FORGET",
    "INTERRUPTED",
    "READ",
    "SCHEMA_VERSION",
    "SKIPPED",
    "Database",
    "HistoryError",
]

# Operation kinds: the first item of each queued tuple.
BEGIN = 0  # (BEGIN, handle)
FINISH = 1  # (FINISH, handle)
SKIPPED = 2  # (SKIPPED, job_id, due_ns, detail)
FORGET = 3  # (FORGET, job_id)
READ = 4  # (READ, job_id, n, token) -> token answered with list[RunRecord]
FLUSH = 5  # (FLUSH, token) -> token answered with None once all before it is committed
CLOSE = 6  # (CLOSE, token) -> like FLUSH, then the database closes

SCHEMA_VERSION = 1
INTERRUPTED = "interrupted by a restart"
"""The detail of a run found ``running`` at ``open`` (the process died during it)."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS jobs (job TEXT PRIMARY KEY, last_run INTEGER NOT NULL)"
    " WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS runs (job TEXT NOT NULL, run INTEGER NOT NULL,"
    " due INTEGER NOT NULL, started INTEGER, ended INTEGER, outcome TEXT NOT NULL,"
    " attempt INTEGER NOT NULL, exit_code INTEGER, detail TEXT NOT NULL, output BLOB NOT NULL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS runs_by_job ON runs (job, run)",
    "CREATE INDEX IF NOT EXISTS runs_running ON runs (outcome) WHERE outcome = 'running'",
)
_LAST_RUN = "SELECT last_run FROM jobs WHERE job = ?"
#: Multi-row statements: a prefix, one ``row`` per item (joined by commas), a suffix.
_INSERT = ("INSERT OR REPLACE INTO runs VALUES ", "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", "")
_SET_LAST = (
    "INSERT INTO jobs (job, last_run) VALUES ",
    "(?, ?)",
    " ON CONFLICT (job) DO UPDATE SET last_run = excluded.last_run",
)
_PRUNE_MANY = (
    "DELETE FROM runs WHERE rowid IN (SELECT runs.rowid FROM (VALUES ",
    "(?, ?)",
    ") AS p JOIN runs ON runs.job = p.column1 AND runs.run <= p.column2)",
)
#: Rows per multi-row statement (90 x 10 values stays under SQLite's old 999 limit).
CHUNK = 90
#: Jobs whose last run number is cached at most (the cache is emptied when full).
LAST_RUN_CACHE = 200_000
_FINISH = (
    "UPDATE runs SET ended = ?, outcome = ?, exit_code = ?, detail = ?, output = ?"
    " WHERE job = ? AND run = ? AND outcome = 'running'"
)
_READ = (
    "SELECT run, due, started, ended, outcome, attempt, exit_code, detail, output"
    " FROM runs WHERE job = ? ORDER BY run DESC LIMIT ?"
)


@functools.lru_cache(maxsize=64)
def _statement(prefix: str, row: str, suffix: str, count: int) -> str:
    return prefix + ", ".join([row] * count) + suffix


def _many(
    db: sqlite3.Connection, form: tuple[str, str, str], rows: Sequence[Sequence[Any]]
) -> None:
    """Run ``form`` over ``rows``, ``CHUNK`` rows to a statement (one step each)."""
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start : start + CHUNK]
        db.execute(_statement(*form, len(chunk)), [v for row in chunk for v in row])


class HistoryError(Exception):
    """The history file cannot be used (opened, read or written)."""


class Database:
    """The SQLite connection and the statements; one thread at a time, see the module."""

    def __init__(self, path: str | None, runs: int, output_bytes: int) -> None:
        self.path = path
        self.runs = runs
        self.output_bytes = output_bytes
        self._conn: sqlite3.Connection | None = None
        self._last: dict[str, int] = {}  # job -> last run number given out (as in jobs)

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise HistoryError("the run history is not open")
        return self._conn

    def open(self) -> int:
        """Open (create) the file and recover it; the number of interrupted runs marked.

        A run left ``running`` by a crash becomes ``failed`` with detail ``INTERRUPTED``.
        When ``runs`` or ``output_bytes`` is lower than the file was last used with, every
        job is cut down to them now (a scan, once).
        """
        where = self.path if self.path is not None else ":memory:"
        if sqlite3.sqlite_version_info < (3, 35, 0):  # RETURNING
            raise HistoryError(f"the run history needs SQLite 3.35+, not {sqlite3.sqlite_version}")
        try:
            conn = sqlite3.connect(where, isolation_level=None, check_same_thread=True)
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot open the run history {where}: {exc}") from None
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise HistoryError(
                    f"the run history {where} was written by a newer ztick-tw "
                    f"(schema {version}, this one knows {SCHEMA_VERSION})"
                )
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA journal_size_limit = 67108864")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            marked = conn.execute(
                "UPDATE runs SET outcome = 'failed', detail = ? WHERE outcome = 'running'",
                (INTERRUPTED,),
            ).rowcount
            self._shrink(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            raise HistoryError(f"cannot open the run history {where}: {exc}") from None
        except HistoryError:
            conn.close()
            raise
        self._conn = conn
        return marked

    def _shrink(self, conn: sqlite3.Connection) -> None:
        stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if self.runs < stored.get("runs", self.runs):
            conn.execute(
                "DELETE FROM runs WHERE run <= "
                "(SELECT last_run FROM jobs WHERE jobs.job = runs.job) - ?",
                (self.runs,),
            )
        if self.output_bytes < stored.get("output_bytes", self.output_bytes):
            if self.output_bytes == 0:
                conn.execute("UPDATE runs SET output = x'' WHERE length(output) > 0")
            else:
                conn.execute(
                    "UPDATE runs SET output = substr(output, -?) WHERE length(output) > ?",
                    (self.output_bytes, self.output_bytes),
                )
        conn.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            (("runs", self.runs), ("output_bytes", self.output_bytes)),
        )

    def close(self) -> None:
        """Close the connection (a last checkpoint folds the WAL into the file)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def _prefetch(self, batch: Sequence[tuple[Any, ...]]) -> None:
        """Read the last run numbers of the batch's jobs not cached, a chunk at a time."""
        last = self._last
        missing = {
            op[1].job_id if op[0] == BEGIN else op[1] for op in batch if op[0] in (BEGIN, SKIPPED)
        }
        missing.difference_update(last)
        if not missing:
            return
        jobs = list(missing)
        db = self._db
        for start in range(0, len(jobs), CHUNK * 5):
            chunk = jobs[start : start + CHUNK * 5]
            marks = ", ".join("?" * len(chunk))
            found = db.execute(f"SELECT job, last_run FROM jobs WHERE job IN ({marks})", chunk)
            for job in chunk:
                last[job] = 0
            for job, run in found.fetchall():
                last[job] = int(run)

    def forget_numbers(self) -> None:
        """Drop the cached run numbers (after a failed batch: the file is the truth)."""
        self._last.clear()

    def apply(self, batch: Sequence[tuple[Any, ...]]) -> list[tuple[object, object]]:
        """Write ``batch`` in one transaction; ``(token, answer)`` for its READ/FLUSH/CLOSE.

        On an error the transaction is rolled back (the whole batch is lost) and the
        error raised as ``HistoryError``.
        """
        db = self._db
        answers: list[tuple[object, object]] = []
        inserts: list[tuple[object, ...]] = []
        prunes: list[tuple[str, int]] = []
        touched: dict[str, int] = {}
        runs = self.runs
        last = self._last
        if len(last) > LAST_RUN_CACHE:
            last.clear()

        def next_run(job_id: str) -> int:
            run = last.get(job_id)
            if run is None:
                row = db.execute(_LAST_RUN, (job_id,)).fetchone()
                run = 0 if row is None else int(row[0])
            run += 1
            last[job_id] = touched[job_id] = run
            return run

        def flush() -> None:
            if touched:
                _many(db, _SET_LAST, list(touched.items()))
                touched.clear()
            if inserts:
                _many(db, _INSERT, inserts)
                inserts.clear()
            if prunes:
                _many(db, _PRUNE_MANY, prunes)
                prunes.clear()

        try:
            db.execute("BEGIN")
            self._prefetch(batch)
            for op in batch:
                kind = op[0]
                if kind == BEGIN:
                    handle: RunHandle = op[1]
                    run = next_run(handle.job_id)
                    handle.run = run
                    result = handle.result
                    if result is None:
                        ended, outcome, code, detail, output = None, "running", None, "", b""
                    else:
                        ended, outcome, code, detail, output = result
                        handle.merged = True
                    inserts.append(
                        (handle.job_id, run, handle.due_ns, handle.started_ns, ended, outcome,
                         handle.attempt, code, detail, output)
                    )  # fmt: skip
                    if run > runs:
                        prunes.append((handle.job_id, run - runs))
                elif kind == FINISH:
                    handle = op[1]
                    if handle.merged or handle.run is None or handle.result is None:
                        continue
                    flush()
                    ended, outcome, code, detail, output = handle.result
                    db.execute(
                        _FINISH, (ended, outcome, code, detail, output, handle.job_id, handle.run)
                    )
                elif kind == SKIPPED:
                    _, job_id, due_ns, detail = op
                    run = next_run(job_id)
                    inserts.append(
                        (job_id, run, due_ns, None, None, "skipped", 0, None, detail, b"")
                    )
                    if run > runs:
                        prunes.append((job_id, run - runs))
                elif kind == FORGET:
                    flush()
                    db.execute("DELETE FROM runs WHERE job = ?", (op[1],))
                    db.execute("DELETE FROM jobs WHERE job = ?", (op[1],))
                    last.pop(op[1], None)
                elif kind == READ:
                    flush()
                    answers.append((op[3], self._read(op[1], op[2])))
                else:  # FLUSH, CLOSE
                    answers.append((op[1], None))
            flush()
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            last.clear()  # numbers given out in the rolled-back batch: read them again
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise HistoryError(f"cannot write the run history: {exc}") from exc
        return answers

    def _read(self, job_id: str, n: int) -> list[RunRecord]:
        if n <= 0:
            return []
        rows: Sequence[tuple[Any, ...]] = self._db.execute(_READ, (job_id, n)).fetchall()
        return [RunRecord(*row) for row in rows]
