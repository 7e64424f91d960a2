"""Running blocking calls off the reactor thread: ``SyncRunner``, and one thread for fsyncs.

``thread_pool_runner`` is the default ``SyncRunner``, the reactor's thread pool.
``SyncThread`` is the group commit's: one thread for its fsyncs.

The reactor's thread pool costs each hand-off several locks and wake-ups (``Team``,
``LockWorker``, a condition variable per worker): with fsyncs of ~0.3 ms covering a few
dozen changes each (50 REST clients with one request in flight), the hand-off cost the
reactor thread more than the fsync saved it (measured with ``strace -c``: 15 futex calls
per fsync through the pool, 10 through this thread; REST PUT/s up by a third under
strace).  Here a ``SimpleQueue`` (C, one lock) carries the call to one thread and
``callFromThread`` carries the result back.  The compaction's long writes stay on the
thread pool, so a group commit never waits behind them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.internet.threads import deferToThreadPool

__all__ = ["SyncRunner", "SyncThread", "thread_pool_runner"]

#: Runs a blocking callable off the reactor thread; the Deferred fires (on the reactor
#: thread) with its result or its exception.
SyncRunner = Callable[[Callable[[], Any]], "Deferred[Any]"]


def thread_pool_runner(reactor: object) -> SyncRunner:
    """The default ``SyncRunner``: the reactor's own thread pool."""
    from_threads = IReactorFromThreads(reactor)
    threads = IReactorThreads(reactor)

    def run(blocking: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(from_threads, threads.getThreadPool(), blocking)

    return run


class SyncThread:
    """A ``SyncRunner`` on one thread of its own.

    Calls run one after another, in order; each Deferred fires on the reactor thread.
    The thread starts with the first call (never before twistd forks) and ends after
    ``stop``; it is a daemon thread, so a call that hangs never holds the process.
    """

    def __init__(self, reactor: object, name: str = "ztick-fsync") -> None:
        self._call_from_thread = IReactorFromThreads(reactor).callFromThread
        self._queue: SimpleQueue[tuple[Callable[[], Any], Deferred[Any]] | None] = SimpleQueue()
        self._name = name
        self._thread: threading.Thread | None = None

    def __call__(self, blocking: Callable[[], Any]) -> Deferred[Any]:
        """Run ``blocking`` on the thread; the Deferred fires with its result or error."""
        d: Deferred[Any] = Deferred()
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
            self._thread.start()
        self._queue.put((blocking, d))
        return d

    def stop(self) -> None:
        """End the thread once the calls queued before this one have run."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None

    def _work(self) -> None:
        queue = self._queue
        call = self._call_from_thread
        while True:
            item = queue.get()
            if item is None:
                return
            blocking, d = item
            try:
                result = blocking()
            except BaseException as e:  # handed to the reactor thread, as deferToThread does
                call(d.errback, e)
            else:
                call(d.callback, result)
