"""The group commit's own fsync thread (``ztick_tw.store.sync_thread``)."""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from typing import Any

import pytest
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from zope.interface import implementer

from ztick_tw.store.sync_thread import SyncThread


@implementer(IReactorFromThreads)
class _Hand:
    """A reactor's ``callFromThread``: calls wait in a queue until ``run_one``."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )

    def callFromThread(  # type: ignore[override]
        self, f: Callable[..., Any], *args: Any, **kw: Any
    ) -> None:
        """Queue ``f(*args)`` for ``run_one``."""
        self.calls.put((f, args))

    def run_one(self) -> None:
        """Run the next call handed over (waiting for it up to 10 s)."""
        f, args = self.calls.get(timeout=10)
        f(*args)


def test_calls_run_in_order_on_one_other_thread_and_answer_on_the_reactor() -> None:
    """Each call runs off the caller's thread, in order, and its result comes back."""
    hand = _Hand()
    sync = SyncThread(hand)
    seen: list[tuple[int, str]] = []
    results: list[object] = []

    def work(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i

    for i in range(5):
        sync(functools.partial(work, i)).addCallback(results.append)
    for _ in range(5):
        hand.run_one()  # the callbacks run here, on this (the "reactor") thread
    assert results == [0, 1, 2, 3, 4]
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert {name for _, name in seen} == {"ztick-fsync"}
    sync.stop()


def test_an_error_fails_the_deferred_and_the_thread_goes_on() -> None:
    """An exception (an fsync's OSError) fails that call's Deferred; the next call runs."""
    hand = _Hand()
    sync = SyncThread(hand)

    def broken() -> None:
        raise OSError(5, "Input/output error")

    failures: list[BaseException | None] = []

    def failed(f: Failure) -> None:
        failures.append(f.value)

    sync(broken).addErrback(failed)
    after: list[object] = []
    sync(lambda: "next").addCallback(after.append)
    hand.run_one()
    hand.run_one()
    assert isinstance(failures[0], OSError) and failures[0].errno == 5
    assert after == ["next"]
    sync.stop()


def test_stop_ends_the_thread_after_what_was_queued() -> None:
    """``stop`` lets queued calls finish, then the thread ends; a later call starts anew."""
    hand = _Hand()
    sync = SyncThread(hand, name="ztick-fsync-stop-test")
    done: list[object] = []
    sync(lambda: 1).addCallback(done.append)
    sync.stop()
    hand.run_one()
    assert done == [1]
    for t in threading.enumerate():
        if t.name == "ztick-fsync-stop-test":
            t.join(10)
            assert not t.is_alive()
    sync(lambda: 2).addCallback(done.append)
    hand.run_one()
    assert done == [1, 2]
    sync.stop()


@pytest.mark.parametrize("count", [1, 200])
def test_every_queued_call_is_answered(count: int) -> None:
    """However many calls are queued at once, each Deferred fires exactly once."""
    hand = _Hand()
    sync = SyncThread(hand)
    fired: list[int] = []
    for i in range(count):
        sync(functools.partial(int, i)).addCallback(fired.append)
    for _ in range(count):
        hand.run_one()
    assert fired == list(range(count))
    assert hand.calls.empty()
    sync.stop()
