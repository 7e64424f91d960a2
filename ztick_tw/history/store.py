"""The run history (SPEC §9 HISTORY): SQLite through one writer thread.

Why SQLite and not the logfile: history is written on every run (5,000 runs/s and more),
read per job, bounded per job (the last ``runs`` runs, the last ``output_bytes`` bytes of
each) and removed with its job.  In the logfile that would be millions of frames of output
to replay at every start and to copy at every compaction, and SET's fsync path would share
its disk writes with run output.  A separate SQLite file gives per-job indexed reads,
in-place pruning, crash safety (WAL) and no replay, and it never touches the logfile, so
the SET path and compaction do not see it.  ztick does not know the file.

Threads: the reactor thread only appends to a bounded queue (``begin``/``finish``/...
never block on I/O); one writer thread owns the connection and applies the queue in
batches, one transaction per batch (up to ``BATCH_MAX`` operations per commit).  Reads
go through the same queue, so a read sees every write made before it; its ``Deferred``
fires on the reactor thread (``callFromThread``) once the batch is committed.

Bounds: when more than ``max_pending_output`` bytes of output wait in the queue, the
oldest waiting outputs are replaced by ``DROPPED_OUTPUT`` (the runs are still recorded);
when ``max_pending_ops`` operations wait, new runs are not recorded at all (``forget``,
``read`` and ``close`` are always queued).  Both are counted and logged at most every 10 s.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ztick_tw.history.database import (
    BEGIN,
    CLOSE,
    FINISH,
    FLUSH,
    FORGET,
    READ,
    SKIPPED,
    Database,
    HistoryError,
)
from ztick_tw.history.records import FINISHED, RunHandle, RunRecord
from ztick_tw.logs import Tally

__all__ = ["BATCH_MAX", "DROPPED_OUTPUT", "History"]

log = Logger()

BATCH_MAX = 4096
#: How long the writer lets runs gather after a wake-up (not for reads, flushes, close).
GATHER_S = 0.05
"""Operations written per transaction at most (more wait for the next one)."""

DROPPED_OUTPUT = b"[output dropped: the run history could not keep up]"
"""The output recorded for a run whose output was shed from a full queue."""

_Op = tuple[Any, ...]


class History:
    """Per-job run history, see the module.  ``path=None``: an in-memory database.

    ``threaded=False`` runs no thread: operations wait in the queue until ``pump()``
    writes them on the calling thread and fires the answers at once (for tests and
    offline tools).  ``reactor`` gives the time for rate-limited logs and, threaded,
    ``callFromThread``.
    """

    def __init__(
        self,
        path: str | None,
        *,
        runs: int = 20,
        output_bytes: int = 4096,
        reactor: IReactorTime,
        threaded: bool = True,
        max_pending_ops: int = 100_000,
        max_pending_output: int = 16 << 20,
    ) -> None:
        if runs < 1 or output_bytes < 0:
            raise ValueError("runs must be >= 1 and output_bytes >= 0")
        self._db = Database(path, runs, output_bytes)
        self._reactor = reactor
        self._threaded = threaded
        self._output_bytes = output_bytes
        self._max_ops = max_pending_ops
        self._max_output = max_pending_output
        self._lock = threading.Lock()  # the queue's bookkeeping; held for microseconds
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()  # C: put never blocks
        self._idle = False  # the writer is (about to be) waiting on _wake
        self._urgent = False  # a read or flush waits: write at once, do not gather
        self._sleep: Callable[[float], None] = time.sleep
        self._queue: deque[_Op] = deque()
        self._outputs: deque[RunHandle] = deque()  # finishes waiting whose output may be shed
        self._pending_output = 0
        self._thread: threading.Thread | None = None
        self._opened = False
        self._closing: Deferred[None] | None = None
        self._closed = False
        self._output_tally = Tally(reactor)
        self._run_tally = Tally(reactor)
        self._error_tally = Tally(reactor)
        self.dropped_outputs = 0
        """Outputs replaced by ``DROPPED_OUTPUT`` because the queue was full."""
        self.dropped_runs = 0
        """Runs and skips not recorded because the queue was full (or after ``close``)."""
        self.errors = 0
        """Batches lost to a write error."""
        self.interrupted = 0
        """Runs found ``running`` at ``open`` and marked failed."""

    @property
    def path(self) -> str | None:
        """The SQLite file, ``None`` in memory."""
        return self._db.path

    @property
    def pending(self) -> int:
        """Operations queued and not yet taken by the writer."""
        return len(self._queue)

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Open the file, mark runs a crash interrupted, start the writer; may block briefly.

        Call it at startup, before the reactor serves.  Raises ``HistoryError`` when the
        file cannot be used.  A run found ``running`` reads afterwards as outcome
        ``failed`` with detail ``interrupted by a restart``.
        """
        if self._opened:
            raise HistoryError("the run history is already open")
        if not self._threaded:
            self.interrupted = self._db.open()
        else:
            self._start_writer()
        self._opened = True
        if self.interrupted:
            log.warn(
                "run history: {count} runs were interrupted by a restart; marked failed",
                count=self.interrupted,
            )

    def _start_writer(self) -> None:
        """Open the database on a new writer thread, wait for it, raise its problem."""
        ready = threading.Event()
        problem: list[BaseException] = []

        def main() -> None:
            try:
                self.interrupted = self._db.open()
            except BaseException as exc:
                problem.append(exc)
                return
            finally:
                ready.set()
            self._writer_loop()

        self._thread = threading.Thread(target=main, name="ztick-history", daemon=True)
        self._thread.start()
        ready.wait()
        if problem:
            self._thread.join()
            raise problem[0]

    def close(self) -> Deferred[None]:
        """Write everything queued, close the file; fires once closed.  Idempotent.

        Runs begun or finished afterwards are not recorded.
        """
        if self._closing is None:
            self._closing = Deferred()
            if not self._opened:
                self._queue.clear()
                self._closed = True
                self._closing.callback(None)
            else:
                self._put((CLOSE, self._closing))
                if not self._threaded:
                    self.pump()
        result: Deferred[None] = Deferred()

        def chain(outcome: object) -> object:
            result.callback(None)
            return outcome

        self._closing.addBoth(chain)
        return result

    # ------------------------------------------------------------------ recording

    def begin(self, job_id: str, due_ns: int, started_ns: int, attempt: int) -> RunHandle:
        """Record a run of ``job_id`` as ``running``; never blocks.  Give the handle to finish."""
        handle = RunHandle(job_id, due_ns, started_ns, attempt)
        if self._closing is not None or len(self._queue) >= self._max_ops:
            handle.dropped = True
            self._drop_run()
            return handle
        self._put((BEGIN, handle))
        return handle

    def finish(
        self,
        handle: RunHandle,
        ended_ns: int,
        outcome: str,
        exit_code: int | None,
        detail: str,
        output: bytes,
    ) -> None:
        """Record how the run ended; never blocks.

        ``outcome``: executed failed timeout cancelled.  The tail of ``output`` is kept.
        """
        if outcome not in FINISHED:
            raise ValueError(f"outcome must be one of {sorted(FINISHED)}, got {outcome!r}")
        if handle.dropped or handle.result is not None:
            return
        limit = self._output_bytes
        if len(output) <= limit and type(output) is bytes:
            kept = output
        else:
            kept = bytes(output[-limit:]) if limit else b""
        handle.result = (ended_ns, outcome, exit_code, detail, kept)
        if self._closing is not None:
            return  # the close is queued before this: it will not be written
        self._put((FINISH, handle), handle if kept else None)

    def skipped(self, job_id: str, due_ns: int, detail: str) -> None:
        """Record an occurrence that did not run (overlap, misfire...); never blocks."""
        if self._closing is not None or len(self._queue) >= self._max_ops:
            self._drop_run()
            return
        self._put((SKIPPED, job_id, due_ns, detail))

    def forget(self, job_id: str) -> None:
        """Delete the job's runs and its run numbering (the job was removed)."""
        if self._closing is None:
            self._put((FORGET, job_id))

    def read(self, job_id: str, n: int) -> Deferred[list[RunRecord]]:
        """The job's last ``n`` runs, newest first, once every write queued before is done."""
        if self._closing is not None:
            return fail(HistoryError("the run history is closed"))
        d: Deferred[list[RunRecord]] = Deferred()
        self._urgent = True  # a client waits: no gathering
        self._put((READ, job_id, n, d))
        return d

    def flush(self) -> Deferred[None]:
        """Fires once everything queued before it is committed."""
        if self._closing is not None:
            return succeed(None) if self._closed else self.close()
        d: Deferred[None] = Deferred()
        self._urgent = True
        self._put((FLUSH, d))
        return d

    # ------------------------------------------------------------------ the queue

    def _put(self, op: _Op, output_of: RunHandle | None = None) -> None:
        if output_of is None:
            self._queue.append(op)  # atomic; the writer only pops from the other end
        else:
            with self._lock:
                self._queue.append(op)
                assert output_of.result is not None
                self._outputs.append(output_of)
                self._pending_output += len(output_of.result[4])
                if self._pending_output > self._max_output:
                    self._shed_output()
        if self._idle:
            self._idle = False
            self._wake.put(None)

    def _shed_output(self) -> None:
        """Replace the oldest waiting outputs until the waiting output fits (lock held)."""
        shed = 0
        while self._pending_output > self._max_output and self._outputs:
            handle = self._outputs.popleft()
            result = handle.result
            assert result is not None
            self._pending_output -= len(result[4])
            handle.result = (*result[:4], DROPPED_OUTPUT)
            shed += 1
        self.dropped_outputs += shed
        for _ in range(shed - 1):
            self._output_tally.note()
        count = self._output_tally.note()
        if count:
            log.warn(
                "run history: the writer is behind; dropped the output of {count} runs "
                "({total} so far)",
                count=count,
                total=self.dropped_outputs,
            )

    def _drop_run(self) -> None:
        self.dropped_runs += 1
        count = self._run_tally.note()
        if count and self._closing is None:
            log.warn(
                "run history: the writer is far behind; {count} runs not recorded "
                "({total} so far)",
                count=count,
                total=self.dropped_runs,
            )

    def _take(self) -> list[_Op]:
        """Up to ``BATCH_MAX`` queued operations, oldest first (lock held)."""
        batch: list[_Op] = []
        queue, outputs = self._queue, self._outputs
        while queue and len(batch) < BATCH_MAX:
            op = queue.popleft()
            if op[0] == FINISH and outputs and outputs[0] is op[1]:
                result = outputs.popleft().result
                assert result is not None
                self._pending_output -= len(result[4])
            batch.append(op)
        return batch

    # ------------------------------------------------------------------ the writer

    def pump(self) -> None:
        """Without a thread: write everything queued now, on this thread, and answer."""
        if self._threaded and self._opened:
            raise HistoryError("pump() is for a history without a writer thread")
        while True:
            with self._lock:
                batch = self._take()
            if not batch:
                return
            self._deliver(self._write(batch))

    def _writer_loop(self) -> None:
        while True:
            # Idle first, then look: a _put after the look sees _idle and wakes us.
            self._idle = True
            if not self._queue:
                self._wake.get()
            self._idle = False
            if not self._urgent and self._closing is None and len(self._queue) < BATCH_MAX:
                # Let writes gather: one wake-up and one transaction per GATHER_S, not
                # one per run.  A writer thread that wakes for every run takes the GIL
                # from the reactor each time (measured: 3,000 shell runs draining went
                # from 977 to 746 jobs/s, another client's GET p99 from 5.6 to 11.8 ms).
                # A full batch waiting is written at once: a writer that naps while it
                # is behind falls further behind (40,000 runs queued at 5,000 runs/s).
                self._sleep(GATHER_S)
            self._urgent = False
            with self._lock:
                batch = self._take()
            if not batch:
                continue
            answers = self._write(batch)
            if answers:
                self._reactor_call(self._deliver, answers)
            if self._closed:
                return

    def _reactor_call(self, f: Callable[..., object], *args: object) -> None:
        IReactorFromThreads(self._reactor).callFromThread(f, *args)

    def _write(self, batch: list[_Op]) -> list[tuple[Any, object]]:
        """Apply ``batch`` (writer side); the answers to deliver, failures included."""
        try:
            answers: list[tuple[Any, object]] = self._db.apply(batch)
        except Exception as exc:  # HistoryError, or a bug: the writer must go on
            self._db.forget_numbers()
            self.errors += 1
            failure = Failure(exc)  # type: ignore[no-untyped-call]
            answers = [(op[-1], failure) for op in batch if op[0] in (READ, FLUSH, CLOSE)]
            lost = sum(1 for op in batch if op[0] in (BEGIN, FINISH, SKIPPED))
            for op in batch:
                if op[0] == BEGIN:  # rolled back: its number may be given out again
                    op[1].run = None
                    op[1].dropped = True
            self._report_error(str(exc), lost)
        if any(op[0] == CLOSE for op in batch):
            try:
                self._db.close()
            except Exception as exc:
                self._report_error(f"cannot close the run history: {exc}", 0)
            self._closed = True
        return answers

    def _report_error(self, problem: str, lost: int) -> None:
        if self._threaded and self._opened:
            self._reactor_call(self._log_error, problem, lost)
        else:
            self._log_error(problem, lost)

    def _log_error(self, problem: str, lost: int) -> None:
        count = self._error_tally.note()
        if count:
            log.error(
                "run history: {problem}; {lost} records lost ({count} failed batches)",
                problem=problem,
                lost=lost,
                count=count,
            )

    @staticmethod
    def _deliver(answers: list[tuple[Any, object]]) -> None:
        for token, answer in answers:
            if isinstance(answer, Failure):
                token.errback(answer)
            else:
                token.callback(answer)
