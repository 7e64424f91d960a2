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

Run numbers come from ``jobs.last_run`` (an upsert per run), so nothing per job is held
in memory, and they are never reused until ``forget`` deletes the job's row.  A run
numbered ``k`` prunes the job's runs numbered ``<= k - runs``: a job never holds more than
``runs`` rows.  WAL with ``synchronous = NORMAL``: a crash (kill -9) loses nothing
committed and never corrupts the file; a power cut may lose the last commits.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
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
_NEXT_RUN = (
    "INSERT INTO jobs (job, last_run) VALUES (?, 1)"
    " ON CONFLICT (job) DO UPDATE SET last_run = last_run + 1 RETURNING last_run"
)
_INSERT = "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_FINISH = (
    "UPDATE runs SET ended = ?, outcome = ?, exit_code = ?, detail = ?, output = ?"
    " WHERE job = ? AND run = ? AND outcome = 'running'"
)
_PRUNE = "DELETE FROM runs WHERE job = ? AND run <= ?"
_READ = (
    "SELECT run, due, started, ended, outcome, attempt, exit_code, detail, output"
    " FROM runs WHERE job = ? ORDER BY run DESC LIMIT ?"
)


class HistoryError(Exception):
    """The history file cannot be used (opened, read or written)."""


class Database:
    """The SQLite connection and the statements; one thread at a time, see the module."""

    def __init__(self, path: str | None, runs: int, output_bytes: int) -> None:
        self.path = path
        self.runs = runs
        self.output_bytes = output_bytes
        self._conn: sqlite3.Connection | None = None

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

    def apply(self, batch: Iterable[tuple[Any, ...]]) -> list[tuple[object, object]]:
        """Write ``batch`` in one transaction; ``(token, answer)`` for its READ/FLUSH/CLOSE.

        On an error the transaction is rolled back (the whole batch is lost) and the
        error raised as ``HistoryError``.
        """
        db = self._db
        answers: list[tuple[object, object]] = []
        inserts: list[tuple[object, ...]] = []
        prunes: list[tuple[str, int]] = []
        runs = self.runs

        def flush() -> None:
            if inserts:
                db.executemany(_INSERT, inserts)
                inserts.clear()
            if prunes:
                db.executemany(_PRUNE, prunes)
                prunes.clear()

        try:
            db.execute("BEGIN")
            for op in batch:
                kind = op[0]
                if kind == BEGIN:
                    handle: RunHandle = op[1]
                    run = db.execute(_NEXT_RUN, (handle.job_id,)).fetchone()[0]
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
                    run = db.execute(_NEXT_RUN, (job_id,)).fetchone()[0]
                    inserts.append(
                        (job_id, run, due_ns, None, None, "skipped", 0, None, detail, b"")
                    )
                    if run > runs:
                        prunes.append((job_id, run - runs))
                elif kind == FORGET:
                    flush()
                    db.execute("DELETE FROM runs WHERE job = ?", (op[1],))
                    db.execute("DELETE FROM jobs WHERE job = ?", (op[1],))
                elif kind == READ:
                    flush()
                    answers.append((op[3], self._read(op[1], op[2])))
                else:  # FLUSH, CLOSE
                    answers.append((op[1], None))
            flush()
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise HistoryError(f"cannot write the run history: {exc}") from exc
        return answers

    def _read(self, job_id: str, n: int) -> list[RunRecord]:
        if n <= 0:
            return []
        rows: Sequence[tuple[Any, ...]] = self._db.execute(_READ, (job_id, n)).fetchall()
        return [RunRecord(*row) for row in rows]
