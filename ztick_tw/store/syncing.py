"""The durable side of ``LogfileStore``: fsyncs of the group commit, flush and close.

A batch the store has written waits in ``_unsynced`` for an ``fsync``, which runs off
the reactor thread (on a thread of its own, or the injected ``SyncRunner``) and
resolves the commits of every batch it covers.  While one is in flight, newly written
batches wait for the next one, which starts as soon as the current one finishes.  A
failed ``fsync`` fails those commits and cuts the file back to what the last good one
covered.  At shutdown, ``flush`` writes and fsyncs on the reactor thread, blocking, and
``close`` closes the file.

``Syncing`` is a base class of ``LogfileStore`` and works on its state; writing the
batches (``_write_buffer``), cutting the file back (``_cut_back``) and the file a
compaction replaced (``_close_retired``) stay the store's.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from twisted.internet.defer import fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from ztick_tw.store.base import Commit, StoreError, describe_os_error
from ztick_tw.store.sync_thread import SyncRunner, SyncThread

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

    from ztick_tw.metrics import Metrics

__all__ = ["Syncing"]

#: The log lines keep the namespace they had when this was part of ``logfile``.
log = Logger(namespace="ztick_tw.store.logfile")


class Syncing:
    """The fsyncs, ``write_through``, ``flush`` and ``close`` of ``LogfileStore``."""

    if TYPE_CHECKING:  # the state and methods of LogfileStore this works with
        path: str
        fsync: bool
        metrics: Metrics
        syncs: int
        _reactor: IReactorTime
        _sync_runner: SyncRunner | None
        _sync_thread: SyncThread | None
        _fd: int | None
        _closed: bool
        _flush_call: IDelayedCall | None
        _unsynced: list[Commit]
        _syncing: list[Commit]
        _sync_in_flight: bool
        _written_size: int
        _synced_size: int
        _compact_abort: bool
        _generation: int

        def _flush(self) -> None: ...
        def _write_buffer(self) -> Commit | None: ...
        def _cut_back(self, size: int) -> None: ...
        def _close_retired(self) -> None: ...

    def _fsync_runner(self) -> SyncRunner:
        """The group commit's runner: an injected one, else a thread of its own."""
        if self._sync_runner is not None:
            return self._sync_runner
        if self._sync_thread is None:
            self._sync_thread = SyncThread(self._reactor)
        return self._sync_thread

    def _start_sync(self) -> None:
        """Start an fsync covering every written batch, unless one is in flight."""
        fd = self._fd
        if self._sync_in_flight or not self._unsynced or fd is None:
            return
        commits, self._unsynced = self._unsynced, []
        target = self._written_size
        self._sync_in_flight = True
        self._syncing = commits
        generation = self._generation

        metrics = self.metrics

        def blocking_fsync() -> None:
            if metrics.on:
                started = time.perf_counter()  # a latency, measured where it happens
                os.fsync(fd)
                metrics.fsync(time.perf_counter() - started)
            else:
                os.fsync(fd)

        try:
            d = self._fsync_runner()(blocking_fsync)
        except Exception:
            d = fail()

        def done(_: object) -> None:
            self._sync_finished(commits, target, None, generation)

        def failed(failure: Failure) -> None:
            self._sync_finished(commits, target, failure.value, generation)

        d.addCallbacks(done, failed)
        d.addErrback(
            lambda f: log.failure("logfile {path}: fsync bookkeeping failed", f, path=self.path)
        )

    def _sync_finished(
        self,
        commits: list[Commit],
        target: int,
        error: BaseException | None,
        generation: int | None = None,
    ) -> None:
        self._sync_in_flight = False
        self._syncing = []
        if generation is not None and generation != self._generation:
            # A compaction swapped files while this fsync ran on the old one; the swap
            # fsynced the new file, which holds these commits' bytes too.
            self._close_retired()
            for commit in commits:
                commit.resolve()
        elif error is None or self._closed or self._synced_size >= target:
            # Success, or a synchronous flush() already made these bytes durable.
            self._synced_size = max(self._synced_size, min(target, self._written_size))
            self.syncs += error is None
            for commit in commits:
                commit.resolve()
        else:
            doomed = commits + self._unsynced
            self._unsynced = []
            keep = self._synced_size
            failure = StoreError(
                f"logfile {self.path}: fsync failed: {describe_os_error(error)}; "
                f"the last {self._written_size - keep} bytes written were cut off "
                f"(file back to {keep} bytes)"
            )
            failure.__cause__ = error
            log.error("{message}", message=str(failure))
            self._cut_back(keep)
            for commit in doomed:
                commit.resolve(failure)
        self._start_sync()

    # ----------------------------------------------------------------- shutdown

    def write_through(self) -> None:
        """Write the buffered batch now instead of at the end of the reactor turn.

        The fsync (with ``fsync`` on) is started as usual, off the reactor thread.
        """
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush()

    def flush(self) -> None:
        """Write the buffer and fsync now, blocking; resolves every pending commit.

        Raises ``StoreError`` if the write or the fsync fails (the affected commits
        are resolved with the error and the file is cut back to a frame boundary).
        """
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        fd = self._fd
        if fd is None:
            return
        write_error: StoreError | None = None
        try:
            commit = self._write_buffer()
        except StoreError as exc:
            write_error, commit = exc, None
        pending = self._syncing + self._unsynced
        self._unsynced = []
        if commit is not None:
            pending.append(commit)
        try:
            os.fsync(fd)
        except OSError as exc:
            if not self.fsync:
                # Every frame written was answered OK already and is whole: cutting the
                # file back would throw away acknowledged writes the disk may well hold.
                error = StoreError(
                    f"logfile {self.path}: fsync failed: {describe_os_error(exc)}; with"
                    " fsync_on_persist off the frames written were already acknowledged:"
                    " they are left in the file, but may not have reached the disk"
                )
                log.error("{message}", message=str(error))
                raise error from exc
            keep = self._synced_size
            error = StoreError(
                f"logfile {self.path}: fsync failed: {describe_os_error(exc)}; "
                f"file cut back to {keep} bytes"
            )
            log.error("{message}", message=str(error))
            self._cut_back(keep)
            for waiting in pending:
                waiting.resolve(error)
            raise error from exc
        self._synced_size = self._written_size
        self.syncs += 1
        for done in pending:
            done.resolve()
        if write_error is not None:
            raise write_error

    def close(self) -> None:
        """Flush, fsync and close the file.  Idempotent; appends afterwards fail."""
        if self._closed:
            return
        self._closed = True
        self._compact_abort = True
        fd = self._fd
        if fd is None:
            return
        try:
            self.flush()
        finally:
            self._fd = None
            self._close_retired()
            os.close(fd)
            if self._sync_thread is not None:
                self._sync_thread.stop()
