"""Pacing child starts: :class:`SpawnQueue`, for the process runners.

:class:`SpawnQueue` paces the starts: at most :data:`SLICE_RUNS` children or
:data:`SLICE_SECONDS` of spawning per reactor turn, so other clients are served while a
burst drains; and a start that fails for want of descriptors or memory (EMFILE, ENFILE,
EAGAIN, ENOMEM: :data:`TRANSIENT_ERRNOS`) is not a failure: it waits, first in line, for
a child to end or a short back-off, and is tried again.  It knows nothing of how a child
is started (``spawn.py``): its ``start`` callable does that.
"""

from __future__ import annotations

import errno
import os
import resource
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

__all__ = [
    "RETRY_FIRST",
    "RETRY_MAX",
    "SHORTAGE_LOG_INTERVAL",
    "SLICE_RUNS",
    "SLICE_SECONDS",
    "TRANSIENT_ERRNOS",
    "SpawnQueue",
    "shortage_reason",
]

#: The namespace these lines had before the queue left ``spawn.py``: log filters (and the
#: text log's ``[namespace#level]``) stay as they were.
log = Logger(namespace="ztick_tw.runners.spawn")

#: Errors of a start that say "not now" rather than "never": out of descriptors (per
#: process or system-wide), or of processes or memory.
TRANSIENT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})

#: At most this many starts per reactor turn...
SLICE_RUNS = 8
#: ...and no new start once this many seconds of the turn went into starting.
SLICE_SECONDS = 0.001

#: Back-off before retrying a start that lacked resources (doubling up to the max).
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
#: At most one "out of descriptors" warning per this many seconds.
SHORTAGE_LOG_INTERVAL = 10.0


def shortage_reason(error: OSError) -> str:
    """What a transient start error means, naming the real cause."""
    if error.errno == errno.EMFILE:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        try:
            count = str(len(os.listdir("/proc/self/fd")) - 1)
        except OSError:
            count = "all"  # listing them needs a descriptor too
        return f"the daemon is out of file descriptors ({count} open, limit {limit})"
    if error.errno == errno.ENFILE:
        return "the system is out of file descriptors (ENFILE: the system-wide table is full)"
    return f"the system cannot start another process now ({error.strerror})"


T = TypeVar("T")


class SpawnQueue(Generic[T]):
    """Starts queued items in order, a slice per reactor turn, waiting out shortages.

    ``start(item)`` starts one item.  If it raises ``OSError`` with an errno in
    :data:`TRANSIENT_ERRNOS`, the item stays first in line and the queue waits until
    :meth:`wake` (a child ended, so descriptors were freed) or a back-off, whichever
    comes first; any other exception is ``start``'s own business and is logged.
    """

    def __init__(self, clock: IReactorTime, start: Callable[[T], None], what: str) -> None:
        self._clock = clock
        self._start = start
        self._what = what
        self._items: deque[T] = deque()
        self._call: IDelayedCall | None = None
        self._waiting = False  # for resources
        self._backoff = RETRY_FIRST
        self._last_warning: float | None = None
        self._shortages = 0
        self._returned = 0  # items put back by retry() since the last start

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        """Queue ``item``; it starts on a later reactor turn."""
        self._items.append(item)
        if not self._waiting:
            self._arm(0)

    def retry(self, item: T, error: OSError) -> None:
        """``item``'s start failed later (on a spawner thread) for want of resources.

        It goes back first in line, behind the items returned the same way before it
        since the last start (so several failures keep their order), and the queue
        waits as if ``start`` had raised ``error``.
        """
        self._items.insert(min(self._returned, len(self._items)), item)
        self._returned += 1
        if self._waiting:
            self._shortages += 1  # already waiting: no second back-off step
            return
        self._cancel()  # a pump armed for this turn would retry at once
        self._short(error)

    def wake(self) -> None:
        """Resources were freed: retry a start that lacked them, now."""
        if self._waiting:
            self._waiting = False
            self._cancel()
            if self._items:
                self._arm(0)

    def remove(self, item: T) -> bool:
        """Take ``item`` out of the queue (its run was cancelled); False if not queued."""
        try:
            self._items.remove(item)
        except ValueError:
            return False
        if not self._items:
            self._cancel()
            self._waiting = False
        return True

    def clear(self) -> list[T]:
        """Remove and return every item not started yet; stop pumping."""
        items = list(self._items)
        self._items.clear()
        self._cancel()
        self._waiting = False
        return items

    def start_all(self) -> list[T]:
        """Start every queued item now, without slices (shutdown); return those left.

        The items left are the ones a shortage of resources kept from starting.
        """
        self._cancel()
        self._waiting = False
        while self._items:
            if not self._start_first():
                break
        return self.clear()

    def _arm(self, delay: float) -> None:
        if self._call is None:
            self._call = self._clock.callLater(delay, self._pump)

    def _cancel(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _start_first(self) -> bool:
        """Start the first item; False (it stays first) when resources lacked."""
        item = self._items.popleft()  # before starting: its callbacks may use the queue
        self._returned = 0
        try:
            self._start(item)
        except OSError as e:
            if e.errno in TRANSIENT_ERRNOS:
                self._items.appendleft(item)
                self._short(e)
                return False
            log.failure("starting {what} failed", what=self._what)
        except Exception:
            log.failure("starting {what} failed", what=self._what)
        self._backoff = RETRY_FIRST
        if self._shortages:
            log.info(
                "{what} start again after {count} attempts lacked resources",
                what=self._what,
                count=self._shortages,
            )
            self._shortages = 0
        return True

    def _pump(self) -> None:
        self._call = None
        self._waiting = False
        deadline = self._clock.seconds() + SLICE_SECONDS
        started = 0
        while self._items:
            if not self._start_first():
                return
            started += 1
            if started >= SLICE_RUNS or self._clock.seconds() >= deadline:
                break
        if self._items and not self._waiting:
            self._arm(0)

    def _short(self, error: OSError) -> None:
        """A start lacked resources: log (rate limited) and wait for ``wake`` or back-off."""
        self._shortages += 1
        now = self._clock.seconds()
        if self._last_warning is None or now - self._last_warning >= SHORTAGE_LOG_INTERVAL:
            self._last_warning = now
            log.warn(
                "cannot start {what} now: {reason}; {waiting} wait and are retried as others end",
                what=self._what,
                reason=shortage_reason(error),
                waiting=len(self._items),
                errno_name=errno.errorcode.get(error.errno or 0, "?"),
            )
        self._waiting = True
        self._arm(self._backoff)
        self._backoff = min(RETRY_MAX, self._backoff * 2)
