"""The append-only logfile backend, with group commit (SPEC §5).

Appends made during one reactor turn are encoded into a buffer and written together
with one ``os.write`` at the start of the next turn.  With ``fsync`` on, every append
of the turn shares one ``Commit``; after the write, an ``fsync`` runs off the reactor
thread and resolves the commits of every batch it covers.  While an ``fsync`` is in
flight, newly written batches wait for the next one, which starts as soon as the
current one finishes: under load at most one ``fsync`` is in flight and each covers
many requests.

The file is always cut back to a frame boundary when something goes wrong: a torn last
frame found at load, a failed write (for example ``ENOSPC``) or a failed ``fsync``.  So
a later append is never glued onto partial bytes.

Compaction (:meth:`LogfileStore.compact`) rewrites the log beside itself while appends
go on: a snapshot is written to ``<path>.compact.tmp`` off the reactor thread, the bytes
appended meanwhile follow it, and the file is fsynced and renamed over the log (then the
directory is fsynced).  Until the rename the old log is complete and in use; after it
the new one is.  A crash at any point therefore leaves one complete log, and at most a
stale temporary file, which the next ``load`` removes.

A ``path`` that leads through a symbolic link is resolved once, when the store is made:
the log, its temporary files and the rename live beside the link's target, and the link
is left alone (it keeps naming the current log).

Opening the file and judging the end of its replay are in ``loading``, the fsyncs and
the shutdown (``flush``, ``close``) in ``syncing`` (``Syncing``, a base class of
``LogfileStore``); appending and compaction, which write the file, are here.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ztick_tw.metrics import NO_METRICS, Metrics
from ztick_tw.model import Entry
from ztick_tw.store.base import Commit, CompactionAborted, IStore, StoreError, describe_os_error
from ztick_tw.store.codec import encode
from ztick_tw.store.loading import (
    COMPACT_SUFFIX,
    Loading,
    open_logfile,
    read_all,
    resolve_logfile_path,
    settle_end,
    sync_directory,
)
from ztick_tw.store.scanning import scan
from ztick_tw.store.sync_thread import SyncRunner, SyncThread, thread_pool_runner
from ztick_tw.store.syncing import Syncing

__all__ = [
    "CompactionResult",
    "LogfileStore",
    "SnapshotWriter",
]


#: Bytes gathered before one ``os.write`` while a snapshot is written.
_CHUNK = 1 << 20

#: Bytes appended during a compaction that are copied off the reactor thread before the
#: final swap (which copies the rest on the reactor thread, then fsyncs and renames).
_TAIL_ON_REACTOR = 1 << 20

#: Writes a snapshot through ``out(bytes)`` and returns how many frames it wrote; runs
#: off the reactor thread and must raise ``CompactionAborted`` when ``stopping()`` is true.
SnapshotWriter = Callable[[Callable[[bytes], None], Callable[[], bool]], int]


@dataclass(frozen=True, slots=True)
class CompactionResult:
    """What one compaction did."""

    frames_before: int  # frames in the log when it started, plus those appended meanwhile
    frames_after: int
    bytes_before: int
    bytes_after: int


log = Logger()


# Indirection so tests can inject short writes and write errors.
_os_write = os.write


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``, looping on short writes; OSError on failure."""
    view = memoryview(data)
    while view:
        written = _os_write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write() wrote nothing")
        view = view[written:]


@implementer(IStore)
class LogfileStore(Syncing):
    """Entries appended to a binary logfile, replayed by ``load()`` at startup.

    ``load()`` must run (to the end) before ``append()``; it opens the file for
    appending.  ``fsync=True`` makes ``append`` return a ``Commit`` that resolves once
    the entry is on disk; ``fsync=False`` returns ``None`` (written at the next reactor
    turn, synced by the operating system when it likes).
    """

    name = "logfile"
    #: Where fsync latencies are reported (``ztick_tw.metrics.install``); off by default.
    metrics: Metrics = NO_METRICS

    def __init__(
        self,
        reactor: IReactorTime,
        path: str,
        fsync: bool,
        sync_runner: SyncRunner | None = None,
        recover: bool = False,
    ) -> None:
        self._reactor = reactor
        #: The path as configured, and the file it names (``path`` itself unless a
        #: symbolic link is involved, then the link's target, resolved once here).
        self.configured_path = path
        self.path = resolve_logfile_path(path)
        self.fsync = fsync
        self.recover = recover
        self._sync_runner = sync_runner
        self._sync_thread: SyncThread | None = None  # the fsyncs' own thread (lazily)
        self._fd: int | None = None
        self._loaded = False
        self._closed = False
        self._buffer: list[bytes] = []
        self._flush_call: IDelayedCall | None = None
        self._batch: Commit | None = None  # shared by appends not yet written
        self._unsynced: list[Commit] = []  # written, waiting for the next fsync
        self._syncing: list[Commit] = []  # covered by the fsync in flight
        self._sync_in_flight = False
        self._written_size = 0  # file size after the last successful write
        self._synced_size = 0  # file size covered by the last successful fsync
        #: Counters for STAT and tests.
        self.frames_written = 0
        self.syncs = 0
        self.frames_in_log = 0  # frames in the current file (replayed + appended)
        # Compaction state: bytes written since it started (None: not compacting).
        self._tail: list[bytes] | None = None
        self._tail_frames = 0
        self._tail_skip = 0  # frames buffered before the snapshot: not copied again
        self._compact_abort = False
        self._generation = 0  # bumped when a compaction swaps files
        self._retired_fd: int | None = None  # the old file, until its fsync returns

    # ----------------------------------------------------------------- loading

    def load(self) -> Loading:
        """Yield every entry of the logfile in order, then open it for appending.

        A missing file is an empty log (the file is created).  A torn last frame (a
        crash mid-write) is logged with its offset and the number of bytes dropped,
        and the file is truncated to the end of the last good frame so that later
        appends are never glued onto partial bytes.

        Damage before the end (a complete frame that does not decode, or an
        impossible length) raises ``CorruptLogError(path, offset, reason)`` after the
        frames before it were yielded; nothing is changed on disk.  With
        ``recover=True`` the damage is logged as an error instead, the frames before
        it are kept, and the file is truncated at the bad frame: every frame from the
        damage on is lost from the log.  The cut bytes are saved beside the logfile
        in ``<path>.corrupt-<offset>`` for the operator.

        The garbage collector is paused while entries are yielded: replaying a
        million jobs creates a million long-lived objects, and collections triggered
        by them would otherwise cost more than the decoding itself.

        What it returns is an iterator of the entries that can also hand the pairs
        ``SCHEDULE SET`` writes to a sink instead (``Loading.divert_scheduled``).
        """
        return Loading(self._load)

    def _load(self, loading: Loading) -> Iterator[Entry]:
        if self._loaded or self._fd is not None:
            raise StoreError(f"logfile {self.path}: load() called twice")
        if self._closed:
            raise StoreError(f"logfile {self.path}: load() after close()")
        fd, created = open_logfile(self.path, self.configured_path)
        ok = False
        try:
            if created:
                sync_directory(self.path)
            data = read_all(fd)
            result = scan(data, scheduled=loading.scheduled)
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                yield from result
            finally:
                if gc_was_enabled:
                    gc.enable()
            loading.diverted = result.diverted
            size = settle_end(self.path, fd, data, result, self.recover)
            ok = True
        finally:
            if not ok:
                os.close(fd)
        self._fd = fd
        self._loaded = True
        self._written_size = self._synced_size = size
        self.frames_in_log = result.count + 2 * result.diverted + result.skipped

    # ----------------------------------------------------------------- appending

    def append(self, entry: Entry) -> Commit | None:
        """Buffer ``entry`` for the write at the next reactor turn.

        Raises ``CodecError`` (a ``ValueError``) if the entry cannot be encoded;
        nothing is buffered then.  Returns the batch ``Commit`` with ``fsync`` on,
        else ``None``.
        """
        if self._fd is None:
            raise StoreError(
                f"logfile {self.path}: "
                + ("append after close()" if self._closed else "append before load()")
            )
        self._buffer.append(encode(entry))
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)
        if not self.fsync:
            return None
        commit = self._batch
        if commit is None:
            commit = self._batch = Commit()
        return commit

    def _flush(self) -> None:
        """Write the buffered batch; with fsync on, queue its commit for syncing."""
        self._flush_call = None
        try:
            commit = self._write_buffer()
        except StoreError:
            return  # logged, commit failed, file cut back
        if commit is not None:
            self._unsynced.append(commit)
            self._start_sync()

    def _write_buffer(self) -> Commit | None:
        """Write the buffer; return the batch commit (now waiting for an fsync).

        On a write error the file is cut back to its last frame boundary, the batch
        commit is resolved with the error, which is logged and raised as StoreError.
        """
        commit, self._batch = self._batch, None
        buffer = self._buffer
        fd = self._fd
        if not buffer or fd is None:
            return commit
        self._buffer = []
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        try:
            _write_all(fd, data)
        except OSError as exc:
            offset = self._written_size
            self._cut_back(offset)
            error = StoreError(
                f"logfile {self.path}: writing {len(buffer)} entries ({len(data)} bytes) "
                f"at byte offset {offset} failed: {describe_os_error(exc)}"
            )
            log.error("{message}; those entries are not stored", message=str(error))
            if commit is not None:
                commit.resolve(error)
            raise error from exc
        self._written_size += len(data)
        self.frames_written += len(buffer)
        self.frames_in_log += len(buffer)
        if self._tail is not None:
            skip, self._tail_skip = self._tail_skip, 0
            if skip:
                # Buffered before the snapshot was taken, so already in it.
                self._tail.append(b"".join(buffer[skip:]))
                self._tail_frames += len(buffer) - skip
            else:
                self._tail.append(data)
                self._tail_frames += len(buffer)
        return commit

    def _cut_back(self, size: int) -> None:
        """Truncate the file to ``size`` (a frame boundary) after a failure.

        A compaction running meanwhile is abandoned: its snapshot may hold changes
        whose frames are now cut off (and undone in memory).
        """
        if self._tail is not None:
            self._compact_abort = True
        self._written_size = size
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            log.critical(
                "logfile {path}: could not truncate back to {size} bytes after a failure: "
                "{error}; the file may end with a partial frame",
                path=self.path,
                size=size,
                error=describe_os_error(exc),
            )

    # ----------------------------------------------------------------- the thread pool

    def _runner(self) -> SyncRunner:
        if self._sync_runner is None:
            self._sync_runner = thread_pool_runner(self._reactor)
        return self._sync_runner

    # ----------------------------------------------------------------- compaction

    @property
    def compacting(self) -> bool:
        """True while a compaction runs."""
        return self._tail is not None

    @property
    def size(self) -> int:
        """Bytes in the current logfile (as written)."""
        return self._written_size

    def compact(self, write_snapshot: SnapshotWriter) -> Deferred[CompactionResult]:
        """Rewrite the log as ``write_snapshot`` describes it, without stopping appends.

        Call it in the same reactor turn as the snapshot is taken: every append from
        then on is also copied after the snapshot, so replaying the new file gives the
        state the old one gives.  ``write_snapshot`` runs in the reactor's thread pool.
        Fires with a ``CompactionResult``, or fails with ``StoreError`` (the old log is
        then untouched and still in use) or ``CompactionAborted``.
        """
        if self._fd is None:
            return fail(
                StoreError(f"logfile {self.path}: compact() before load() or after close()")
            )
        if self._tail is not None:
            return fail(StoreError(f"logfile {self.path}: a compaction is already running"))
        temp = self.path + COMPACT_SUFFIX
        try:
            temp_fd = os.open(
                temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            return fail(
                StoreError(f"logfile {self.path}: cannot create {temp}: {describe_os_error(exc)}")
            )
        self._tail = []
        self._tail_frames = 0
        self._tail_skip = len(self._buffer)
        self._compact_abort = False
        frames_before = self.frames_in_log
        bytes_before = self._written_size

        def stopping() -> bool:
            return self._compact_abort

        def write_all_snapshot() -> int:
            pending: list[bytes] = []
            size = 0

            def out(data: bytes) -> None:
                nonlocal size
                pending.append(data)
                size += len(data)
                if size >= _CHUNK:
                    flush_pending()

            def flush_pending() -> None:
                nonlocal size
                if pending:
                    _write_all(temp_fd, b"".join(pending))
                    pending.clear()
                    size = 0
                if self._compact_abort:
                    raise self._abandoned()

            count = write_snapshot(out, stopping)
            flush_pending()
            os.fsync(temp_fd)
            return count

        snapshot_frames = 0
        swapped = False  # once true, temp_fd is the live logfile: never close it here

        def copy_tail(_: object = None) -> Deferred[None] | None:
            """Copy appends made meanwhile off the reactor thread while there are many."""
            tail = self._tail
            if self._compact_abort or tail is None:
                raise self._abandoned()
            if sum(len(chunk) for chunk in tail) <= _TAIL_ON_REACTOR:
                return None
            data = b"".join(tail)
            tail.clear()
            d = self._runner()(lambda: _write_all(temp_fd, data))
            return d.addCallback(copy_tail)

        def snapshot_written(frames: int) -> Deferred[None] | None:
            nonlocal snapshot_frames
            snapshot_frames = frames
            return copy_tail()

        def swap(_: object) -> CompactionResult:
            nonlocal swapped
            if self._compact_abort or self._fd is None:
                raise self._abandoned()
            # Appends buffered in this very turn go to the new file after the swap.
            tail = self._tail or []
            frames_after = snapshot_frames + self._tail_frames
            try:
                _write_all(temp_fd, b"".join(tail))
                os.fsync(temp_fd)
                new_size = os.fstat(temp_fd).st_size
                fcntl.flock(temp_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.rename(temp, self.path)
            except OSError as exc:
                raise StoreError(
                    f"logfile {self.path}: finishing the compaction in {temp} failed:"
                    f" {describe_os_error(exc)}; the logfile is unchanged"
                ) from exc
            # From here on the new file is the log.
            self._tail = None
            swapped = True
            sync_directory(self.path)
            old_fd = self._fd
            self._fd = temp_fd
            self._generation += 1
            self._written_size = self._synced_size = new_size
            self.frames_in_log = frames_after
            for commit in self._unsynced:
                commit.resolve()  # their bytes were copied and fsynced with the tail
            self._unsynced = []
            self._retired_fd = old_fd
            if not self._sync_in_flight:
                self._close_retired()
            return CompactionResult(
                frames_before + self._tail_frames, frames_after, bytes_before, new_size
            )

        def cleanup(failure: Failure) -> Failure:
            self._tail = None
            if not swapped:
                os.close(temp_fd)
                with contextlib.suppress(OSError):
                    os.unlink(temp)
            error = failure.value
            if isinstance(error, OSError):
                failure = Failure(  # type: ignore[no-untyped-call]
                    StoreError(
                        f"logfile {self.path}: writing {temp} failed:"
                        f" {describe_os_error(error)}; the logfile is unchanged"
                    )
                )
            return failure

        try:
            d: Deferred[Any] = self._runner()(write_all_snapshot)
        except Exception:
            d = fail()
        d.addCallback(snapshot_written)
        d.addCallback(swap)
        d.addErrback(cleanup)
        return d

    def abandon_compaction(self) -> None:
        """Make a running compaction give up soon (at shutdown); the log is unchanged."""
        if self._tail is not None:
            self._compact_abort = True

    def _abandoned(self) -> CompactionAborted:
        why = "the logfile was closed" if self._closed else "stopped, or a logfile write failed"
        return CompactionAborted(f"logfile {self.path}: compaction abandoned: {why}")

    def _close_retired(self) -> None:
        """Close the file a compaction replaced (once no fsync uses it any more).

        Its last close frees the old file's blocks, which takes tens of milliseconds
        for a large log: done in the thread pool unless the store is closing.
        """
        fd, self._retired_fd = self._retired_fd, None
        if fd is None:
            return
        if self._closed:
            os.close(fd)
            return
        d = self._runner()(lambda: os.close(fd))
        d.addErrback(
            lambda f: log.failure(
                "logfile {path}: closing the replaced file failed", f, path=self.path
            )
        )
