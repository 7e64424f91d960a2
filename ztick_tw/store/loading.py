"""Opening a logfile and judging the end of its replay (``LogfileStore.load``).

Before the replay: ztick's leftovers beside the log are merged into it, the file is
opened (created if missing) and locked so that two daemons never share one log, and the
temporary file of an interrupted compaction is removed.  After it: a torn last frame is
cut off, a corrupt one stops the load (or, with ``recover``, is cut off and saved beside
the log), and frames of a newer version's types are reported.  The replay itself, and
what the store keeps of it, is ``LogfileStore._load``.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterator

from twisted.logger import Logger

from ztick_tw.model import Entry
from ztick_tw.store.base import CorruptLogError, StoreError, describe_os_error
from ztick_tw.store.fastpath import ScheduledSink
from ztick_tw.store.leftovers import merge_ztick_leftovers
from ztick_tw.store.scanning import Scan

__all__ = [
    "COMPACT_SUFFIX",
    "Loading",
    "lock_logfile",
    "open_logfile",
    "read_all",
    "remove_stale_compaction",
    "resolve_logfile_path",
    "save_damaged",
    "settle_end",
    "sync_directory",
]

#: The log lines keep the namespace they had when this was part of ``logfile``.
log = Logger(namespace="ztick_tw.store.logfile")

#: The temporary file a compaction writes, beside the logfile.
COMPACT_SUFFIX = ".compact.tmp"


def resolve_logfile_path(path: str) -> str:
    """``path``, or the file it names when a symbolic link is on the way (resolved).

    A compaction renames a new file over the logfile, and leftovers, temporary and
    ``.corrupt-<offset>`` files are written beside it: all of that happens beside the
    link's target, so a logfile linked into a data volume stays there and the link
    keeps pointing at it.  A link whose target does not exist yet names that target.
    """
    resolved = os.path.realpath(path)
    return path if resolved == os.path.abspath(path) else resolved


def read_all(fd: int) -> bytes:
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


def open_logfile(path: str, configured_path: str) -> tuple[int, bool]:
    """Open the logfile for reading and appending, locked: ``(fd, created)``.

    ztick's leftovers beside it are merged into it first; afterwards the temporary file
    of an interrupted compaction is removed.  ``created``: the file did not exist (its
    directory entry is then not durable yet: ``sync_directory``).
    """
    if path != configured_path:
        log.info(
            "logfile {configured} leads through a symbolic link to {path}: the log is"
            " kept there, and compactions replace it beside itself (the link stays)",
            configured=configured_path,
            path=path,
        )
    for line in merge_ztick_leftovers(path):
        log.warn("{message}", message=line)
    existed = os.path.exists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        lock_logfile(fd, path)
    except BaseException:
        os.close(fd)
        raise
    remove_stale_compaction(path)
    return fd, not existed


def settle_end(path: str, fd: int, data: bytes, result: Scan, recover: bool) -> int:
    """After the scan of ``data``: deal with what stopped it; the size the log keeps.

    A torn last frame is cut off (logged).  A corrupt frame raises ``CorruptLogError``,
    or with ``recover`` is cut off with everything after it, which is saved beside the
    log (logged as an error).  Frames of unknown types are reported.
    """
    size = result.good_end
    problem = result.problem
    if problem is not None:
        if problem.kind == "corrupt":
            if not recover:
                raise CorruptLogError(path, problem.offset, problem.reason)
            saved = save_damaged(path, data[problem.offset :], problem.offset)
            log.error(
                "logfile {path}: corrupt frame at byte offset {offset}: {reason}; "
                "recovering: kept the {count} entries before it, cut off {dropped} "
                "bytes from there on ({saved})",
                path=path,
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
                path=path,
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
            path=path,
            frames=f"{result.skipped} frame{'' if result.skipped == 1 else 's'}",
            skipped=result.skipped,
            types=", ".join(f"type {t}: {c}" for t, c in sorted(result.skipped_types.items())),
        )
    return size


def remove_stale_compaction(path: str) -> None:
    """Delete the temporary file of a compaction that a crash interrupted.

    It is never needed: until the rename that ends a compaction, the logfile
    itself holds everything.
    """
    stale = path + COMPACT_SUFFIX
    try:
        size = os.stat(stale).st_size
        os.unlink(stale)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warn(
            "logfile {path}: cannot remove {stale}, left by an interrupted compaction: {error}",
            path=path,
            stale=stale,
            error=describe_os_error(exc),
        )
        return
    log.warn(
        "logfile {path}: removed {stale} ({size} bytes), left by a compaction that was"
        " interrupted; the logfile itself is complete",
        path=path,
        stale=stale,
        size=size,
    )


def sync_directory(path: str) -> None:
    """Make a newly created logfile's directory entry durable."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # pragma: no cover - platform without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError as exc:  # pragma: no cover - filesystem refuses directory fsync
        log.warn(
            "logfile {path}: could not sync directory {directory}: {error}",
            path=path,
            directory=directory,
            error=describe_os_error(exc),
        )
    finally:
        os.close(dir_fd)


def lock_logfile(fd: int, path: str) -> None:
    """Take an exclusive lock on the logfile, so two daemons never share one log.

    The lock lives as long as the descriptor; a second ztick-tw on the same file
    stops before it reads (let alone truncates) anything.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise StoreError(
                f"logfile {path} is in use by another process (is another ztick-tw running on it?)"
            ) from None
        raise StoreError(f"logfile {path}: cannot lock it: {describe_os_error(exc)}") from None


def save_damaged(path: str, damaged: bytes, offset: int) -> str:
    """Save the bytes cut off at ``offset`` to ``<path>.corrupt-<offset>``; says how it went."""
    target = f"{path}.corrupt-{offset}"
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
