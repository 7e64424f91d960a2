"""The persistence interface the scheduler talks to, and the group-commit handle."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

from zope.interface import Attribute, Interface

from ztick_tw.model import Entry


class StoreError(Exception):
    """A persistence failure that the operator must see (message says what and where)."""


class CompactionAborted(StoreError):
    """A compaction was given up because the store was closed or a write failed."""


class CorruptLogError(StoreError):
    """The logfile is damaged before its last frame; ``offset`` is the first bad byte."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt frame at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


def describe_os_error(exc: BaseException) -> str:
    """``No space left on device (ENOSPC)`` style text for an OSError."""
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"{os.strerror(exc.errno)} ({name})"
    return str(exc) or type(exc).__name__


class Commit:
    """A group of appended entries that become durable together.

    The store hands the same ``Commit`` to every append made in one reactor turn; it
    is resolved once, when the group is on disk (``error is None``) or has failed to
    get there (``error`` says why).  Subscribers are called exactly once, in the order
    they subscribed; subscribing to a resolved commit calls back at once.
    """

    __slots__ = ("_subscribers", "done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: BaseException | None = None
        self._subscribers: list[Callable[[Commit], None]] = []

    def subscribe(self, callback: Callable[[Commit], None]) -> None:
        """Call ``callback(self)`` when the commit resolves (now, if it has)."""
        if self.done:
            callback(self)
        else:
            self._subscribers.append(callback)

    def resolve(self, error: BaseException | None = None) -> None:
        """Mark the group durable (or failed) and notify every subscriber once."""
        if self.done:
            return
        self.done = True
        self.error = error
        subscribers, self._subscribers = self._subscribers, []
        for callback in subscribers:
            callback(self)


class IStore(Interface):
    """Where the scheduler's changes go so that they survive a restart."""

    name: str = Attribute("'logfile' or 'memory', as shown by STAT persistence")

    def load() -> Iterator[Entry]:
        """Yield every stored entry in write order, for replay at startup.

        A torn last frame is reported in the log and cut off so later appends are
        never glued to it.  Damage before the last frame raises ``CorruptLogError``.
        """

    def append(entry: Entry) -> Commit | None:
        """Record ``entry``.

        Returns ``None`` when nothing needs to wait (memory backend, or
        ``fsync_on_persist = false``), else the ``Commit`` that resolves when the
        entry is on disk.  Never blocks the reactor.
        """

    def write_through() -> None:
        """Hand buffered entries to the operating system now, without waiting for fsync.

        The scheduler calls this after marking jobs ``triggered`` and before starting
        their runners, so a daemon killed while a job runs can never have lost the
        record that the job started (only a power loss before the next fsync can).
        """

    def flush() -> None:
        """Write whatever is buffered now (used at shutdown); may block briefly."""

    def close() -> None:
        """Flush, sync and release the file; further appends are an error."""
