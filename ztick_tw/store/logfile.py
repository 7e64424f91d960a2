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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorFromThreads,
    IReactorThreads,
    IReactorTime,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ztick_tw.metrics import NO_METRICS, Metrics
from ztick_tw.model import Entry
from ztick_tw.store.base import Commit, CompactionAborted, CorruptLogError, IStore, StoreError
from ztick_tw.store.codec import encode, scan
from ztick_tw.store.fastpath import ScheduledSink
from ztick_tw.store.leftovers import merge_ztick_leftovers
from ztick_tw.store.sync_thread import SyncThread

__all__ = [
    "COMPACT_SUFFIX",
    "CompactionAborted",
    "CompactionResult",
    "Loading",
    "LogfileStore",
    "SnapshotWriter",
    "SyncRunner",
    "resolve_logfile_path",
    "thread_pool_runner",
]

#: The temporary file a compaction writes, beside the logfile.
COMPACT_SUFFIX = ".compact.tmp"

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

#: Runs a blocking callable off the reactor thread; the Deferred fires (on the reactor
#: thread) with its result or its exception.
SyncRunner = Callable[[Callable[[], Any]], "Deferred[Any]"]

# Indirection so tests can inject short writes and write errors.
_os_write = os.write


def thread_pool_runner(reactor: object) -> SyncRunner:
    """The default ``SyncRunner``: the reactor's own thread pool."""
    from_threads = IReactorFromThreads(reactor)
    threads = IReactorThreads(reactor)

    def run(blocking: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(from_threads, threads.getThreadPool(), blocking)

    return run


def describe_os_error(exc: BaseException) -> str:
    """``No space left on device (ENOSPC)`` style text for an OSError."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{os.strerror(exc.errno)} ({name})"
    return str(exc) or type(exc).__name__


def resolve_logfile_path(path: str) -> str:
    """``path``, or the file it names when a symbolic link is on the way (resolved).

    A compaction renames a new file over the logfile, and leftovers, temporary and
    ``.corrupt-<offset>`` files are written beside it: all of that happens beside the
    link's target, so a logfile linked into a data volume stays there and the link
    keeps pointing at it.  A link whose target does not exist yet names that target.
    """
    resolved = os.path.realpath(path)
    return path if resolved == os.path.abspath(path) else resolved


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``, looping on short writes; OSError on failure."""
    view = memoryview(data)
    while view:
        written = _os_write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write() wrote nothing")
        view = view[written:]


def _read_all(fd: int) -> bytes:
    """The whole file behind ``fd``, read from offset 0."""
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, max(size - offset, 1 << 16), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class Loading(Iterator[Entry]):
    """The entries of a logfile being loaded (what ``LogfileStore.load`` returns).

    Iterating it runs the load.  Before that, ``divert_scheduled(sink)`` may ask for
    each schedule set followed by the ``planned`` job frame of the same job (what
    ``SCHEDULE SET`` appends) to be handed to ``sink`` instead of yielded as two
    entries, in log order (see ``Scan``); ``diverted`` then says how many pairs were,
    once the iteration is over.  The scheduler's replay uses this: a million scheduled
    jobs load without two million entry objects.
    """

    __slots__ = ("_entries", "_load", "diverted", "scheduled")

    def __init__(self, load: Callable[[Loading], Iterator[Entry]]) -> None:
        self._load = load
        self._entries: Iterator[Entry] | None = None
        self.scheduled: ScheduledSink | None = None
        self.diverted = 0

    def divert_scheduled(self, sink: ScheduledSink) -> None:
        """Hand schedule + job pairs to ``sink`` (before the iteration starts)."""
        if self._entries is not None:
            raise StoreError("divert_scheduled() after the load started")
        self.scheduled = sink

    def __iter__(self) -> Iterator[Entry]:
        # The generator itself, so a ``for`` loop over the entries pays nothing more.
        if self._entries is None:
            self._entries = self._load(self)
        return self._entries

    def __next__(self) -> Entry:
        return next(iter(self))


@implementer(IStore)
class LogfileStore:
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
        if self.path != self.configured_path:
            log.info(
                "logfile {configured} leads through a symbolic link to {path}: the log is"
                " kept there, and compactions replace it beside itself (the link stays)",
                configured=self.configured_path,
                path=self.path,
            )
        for line in merge_ztick_leftovers(self.path):
            log.warn("{message}", message=line)
        existed = os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        self._remove_stale_compaction()
        ok = False
        try:
            if not existed:
                self._sync_directory()
            data = _read_all(fd)
            result = scan(data, scheduled=loading.scheduled)
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                yield from result
            finally:
                if gc_was_enabled:
                    gc.enable()
            loading.diverted = result.diverted
            size = result.good_end
            problem = result.problem
            if problem is not None:
                if problem.kind == "corrupt":
                    if not self.recover:
                        raise CorruptLogError(self.path, problem.offset, problem.reason)
                    saved = self._save_damaged(data[problem.offset :], problem.offset)
                    log.error(
                        "logfile {path}: corrupt frame at byte offset {offset}: {reason}; "
                        "recovering: kept the {count} entries before it, cut off {dropped} "
                        "bytes from there on ({saved})",
                        path=self.path,
                        offset=problem.offset,
                        reason=problem.reason,
                        count=result.count + 2 * result.diverted,
                        dropped=problem.dropped,
                        saved=saved,
                    )
                else:
                    log.warn(
                        "logfile {path}: torn last frame at byte offset {offset} "
                        "({dropped} bytes: {reason}) cut off: a write interrupted by a "
                        "crash; appends continue after the last whole frame",
                        path=self.path,
                        offset=problem.offset,
                        dropped=problem.dropped,
                        reason=problem.reason,
                    )
                os.ftruncate(fd, size)
                os.fsync(fd)
            if result.skipped_types:
                log.warn(
                    "logfile {path}: skipped {frames} of entry types this version does "
                    "not know ({types}), written by a newer ztick-tw; the rest is loaded, and "
                    "the next compaction leaves them out",
                    path=self.path,
                    frames=f"{result.skipped} frame{'' if result.skipped == 1 else 's'}",
                    skipped=result.skipped,
                    types=", ".join(
                        f"type {t}: {c}" for t, c in sorted(result.skipped_types.items())
                    ),
                )
            ok = True
        finally:
            if not ok:
                os.close(fd)
        self._fd = fd
        self._loaded = True
        self._written_size = self._synced_size = size
        self.frames_in_log = result.count + 2 * result.diverted + result.skipped

    def _remove_stale_compaction(self) -> None:
        """Delete the temporary file of a compaction that a crash interrupted.

        It is never needed: until the rename that ends a compaction, the logfile
        itself holds everything.
        """
        stale = self.path + COMPACT_SUFFIX
        try:
            size = os.stat(stale).st_size
            os.unlink(stale)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warn(
                "logfile {path}: cannot remove {stale}, left by an interrupted compaction:"
                " {error}",
                path=self.path,
                stale=stale,
                error=describe_os_error(exc),
            )
            return
        log.warn(
            "logfile {path}: removed {stale} ({size} bytes), left by a compaction that was"
            " interrupted; the logfile itself is complete",
            path=self.path,
            stale=stale,
            size=size,
        )

    def _sync_directory(self) -> None:
        """Make a newly created logfile's directory entry durable."""
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # pragma: no cover - platform without directory fds
            return
        try:
            os.fsync(dir_fd)
        except OSError as exc:  # pragma: no cover - filesystem refuses directory fsync
            log.warn(
                "logfile {path}: could not sync directory {directory}: {error}",
                path=self.path,
                directory=directory,
                error=describe_os_error(exc),
            )
        finally:
            os.close(dir_fd)

    def _lock(self, fd: int) -> None:
        """Take an exclusive lock on the logfile, so two daemons never share one log.

        The lock lives as long as the descriptor; a second ztick-tw on the same file
        stops before it reads (let alone truncates) anything.
        """
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StoreError(
                    f"logfile {self.path} is in use by another process"
                    " (is another ztick-tw running on it?)"
                ) from None
            raise StoreError(
                f"logfile {self.path}: cannot lock it: {describe_os_error(exc)}"
            ) from None

    def _save_damaged(self, damaged: bytes, offset: int) -> str:
        target = f"{self.path}.corrupt-{offset}"
        try:
            # Private like the logfile itself: the bytes can hold credentials.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as out:
                out.write(damaged)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            return f"could not save them to {target}: {describe_os_error(exc)}"
        return f"saved to {target}"

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

    # ----------------------------------------------------------------- syncing

    def _runner(self) -> SyncRunner:
        if self._sync_runner is None:
            self._sync_runner = thread_pool_runner(self._reactor)
        return self._sync_runner

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
            self._sync_directory()
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
