"""The posix_spawn + pidfd spawner, and SpawnQueue's pacing.

Children are real, on the real reactor; the queue runs on a Clock.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import threading
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from ztick_tw.runners import spawn, spawn_queue, spawner
from ztick_tw.runners.spawn import (
    FDS_PER_CHILD,
    SpawnedProcess,
    native_spawn_supported,
    spawn_child,
)
from ztick_tw.runners.spawn_queue import SLICE_RUNS, SpawnQueue

SH = "/bin/sh"


class _Child(ProcessProtocol):
    """Records what a child did; ``ended`` fires with (stdout, stderr, processEnded reason)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.exited: Failure | None = None
        self.calls: list[str] = []
        self.made: Deferred[None] = Deferred()
        self.failed: Deferred[OSError] = Deferred()  # the spawn failed
        self.ended: Deferred[tuple[bytes, bytes, Failure]] = Deferred()

    def connectionMade(self) -> None:
        self.calls.append("connectionMade")
        self.made.callback(None)

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processExited(self, reason: Failure) -> None:
        self.calls.append("processExited")
        self.exited = reason

    def processEnded(self, reason: Failure) -> None:
        self.calls.append("processEnded")
        self.ended.callback((bytes(self.out), bytes(self.err), reason))


def _env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", os.defpath)}


def _spawn(child: _Child, argv: list[str], **kw: Any) -> SpawnedProcess:
    return spawn_child(
        reactor, child, argv[0], argv, _env(), on_failure=child.failed.callback, **kw
    )


def _sh(command: str) -> _Child:
    child = _Child()
    _spawn(child, [SH, "-c", command])
    return child


async def _sleeper(**kw: Any) -> tuple[_Child, SpawnedProcess, int]:
    """A ``sleep 30`` child, once it has started: (protocol, transport, pid)."""
    child = _Child()
    transport = _spawn(child, ["/bin/sleep", "30"], **kw)
    await child.made
    assert transport.pid is not None
    return child, transport, transport.pid


def _proc_stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


class SpawnChildTests(unittest.TestCase):
    def test_supported_here(self) -> None:
        """The real reactor on this Linux can use posix_spawn + pidfd; MemoryReactor cannot."""
        assert native_spawn_supported(reactor)
        assert not native_spawn_supported(MemoryReactorClock())  # type: ignore[no-untyped-call]

    async def test_exit_status_zero_and_output(self) -> None:
        """Stdout and stderr arrive separately; exit 0 ends with ProcessDone."""
        child = _sh("echo out; echo err >&2")
        out, err, reason = await child.ended
        assert (out, err) == (b"out\n", b"err\n")
        assert isinstance(reason.value, ProcessDone)
        assert child.calls == ["connectionMade", "processExited", "processEnded"]

    async def test_environment_given_encoded(self) -> None:
        """An environment of ``b"NAME=value"`` entries reaches the child as it is."""
        child = _Child()
        env = [b"PATH=" + os.fsencode(os.environ.get("PATH", os.defpath)), b"ZT_A=1 2"]
        spawn_child(
            reactor,
            child,
            SH,
            [SH, "-c", 'printf %s "$ZT_A"'],
            env,
            on_failure=child.failed.callback,
        )
        out, _, reason = await child.ended
        assert out == b"1 2"
        assert isinstance(reason.value, ProcessDone)

    async def test_spawn_attributes_are_shared(self) -> None:
        """Children with the same flags and default signals share one set of attributes."""
        await _sh("true").ended
        count = len(spawner._attrs)
        for _ in range(3):
            await _sh("true").ended
        assert len(spawner._attrs) == count
        child = _Child()
        _spawn(child, [SH, "-c", "true"], new_session=False)
        await child.ended
        assert any(not flags & spawner._SETSID for flags, _ in spawner._attrs)  # its own

    async def test_exit_status(self) -> None:
        """A non-zero exit is a ProcessTerminated carrying the exit code."""
        _, _, reason = await _sh("exit 3").ended
        assert isinstance(reason.value, ProcessTerminated)
        assert reason.value.exitCode == 3
        assert reason.value.signal is None

    async def test_killed_by_signal(self) -> None:
        """A child killed by a signal ends with ProcessTerminated carrying the signal."""
        _, _, reason = await _sh("kill -9 $$").ended
        assert isinstance(reason.value, ProcessTerminated)
        assert reason.value.signal == signal.SIGKILL

    async def test_signal_process_through_pidfd(self) -> None:
        """transport.signalProcess reaches the child (here SIGTERM ends a sleep)."""
        child, transport, _ = await _sleeper()
        transport.signalProcess("TERM")
        _, _, reason = await child.ended
        assert isinstance(reason.value, ProcessTerminated)
        assert reason.value.signal == signal.SIGTERM

    async def test_default_signal_dispositions(self) -> None:
        """Signals the daemon ignores (SIGPIPE) are at their default in the child.

        A non-interactive shell cannot undo an inherited SIG_IGN, so ``kill -PIPE $$``
        kills it only if the disposition was reset; and ``yes | head -1`` ends quietly.
        """
        assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # as in the daemon
        _, _, reason = await _sh("kill -s PIPE $$; echo survived").ended
        assert isinstance(reason.value, ProcessTerminated)
        assert reason.value.signal == signal.SIGPIPE
        out, err, reason = await _sh("yes | head -1").ended
        assert (out, err) == (b"y\n", b"")
        assert isinstance(reason.value, ProcessDone)
        out, _, _ = await _sh("grep SigIgn /proc/self/status").ended
        ignored = int(out.split()[1], 16)
        # (glibc's posix_spawn leaves its own internal signals 32 and 33 ignored: not ours.)
        assert ignored & ~(0b11 << 31) == 0, hex(ignored)

    async def test_stdin_is_dev_null(self) -> None:
        """The child's stdin is /dev/null: it reads EOF at once."""
        out, _, reason = await _sh("cat; readlink /proc/self/fd/0").ended
        assert out == b"/dev/null\n"
        assert isinstance(reason.value, ProcessDone)

    async def test_no_daemon_descriptor_leaks(self) -> None:
        """The child holds only 0, 1, 2 (and the directory ``ls`` itself opens)."""
        fds = os.listdir("/proc/self/fd")
        assert len(fds) > 5  # this process holds the reactor's, the pipes... none must leak
        out, _, _ = await _sh("ls /proc/self/fd").ended
        assert sorted(out.split()) == [b"0", b"1", b"2", b"3"]

    async def test_own_session_and_process_group(self) -> None:
        """With new_session the child leads its own session and group; without, it does not."""
        child, transport, pid = await _sleeper()
        fields = _proc_stat(pid)
        assert (int(fields[2]), int(fields[3])) == (pid, pid)  # pgrp, session
        transport.signalProcess("KILL")
        await child.ended
        other, transport, pid = await _sleeper(new_session=False)
        assert int(_proc_stat(pid)[2]) == os.getpgrp()
        transport.signalProcess("KILL")
        await other.ended

    async def test_descriptors_per_child(self) -> None:
        """A live child holds FDS_PER_CHILD descriptors here, and none once it ended."""
        await _sh("true").ended  # one-time descriptors (/dev/null, the reactor's wakers)
        before = len(os.listdir("/proc/self/fd"))
        child, transport, _ = await _sleeper()
        assert len(os.listdir("/proc/self/fd")) - before == FDS_PER_CHILD == 3
        transport.signalProcess("KILL")
        await child.ended
        assert len(os.listdir("/proc/self/fd")) == before

    async def test_exec_failure(self) -> None:
        """A program that cannot be executed gives on_failure its OSError.

        No descriptor is left, and the protocol hears nothing.
        """
        await _sh("true").ended  # one-time descriptors
        before = len(os.listdir("/proc/self/fd"))
        child = _Child()
        _spawn(child, ["/no/such/program"])
        error = await child.failed
        assert error.errno == errno.ENOENT
        assert child.calls == []
        assert len(os.listdir("/proc/self/fd")) == before

    def test_pipes_lacking_descriptors_raise(self) -> None:
        """EMFILE making the pipes is raised at once (the queue then waits and retries)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")), hard))
        try:
            with pytest.raises(OSError) as raised:
                _spawn(_Child(), ["/bin/true"])
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert raised.value.errno == errno.EMFILE

    async def test_reactor_thread_is_not_held_by_the_exec(self) -> None:
        """spawn_child returns before the child has started: the exec is not waited for."""
        child = _Child()
        _spawn(child, ["/bin/true"])
        assert child.calls == []  # connectionMade comes on a later turn
        _, _, reason = await child.ended
        assert isinstance(reason.value, ProcessDone)

    def test_spawner_is_one_daemon_thread(self) -> None:
        """One spawner thread (two cost the GET latency target), a daemon: exit never waits."""
        spawn._get_spawner()
        threads = [t for t in threading.enumerate() if t.name.startswith("ztick-spawn-")]
        assert len(threads) == spawn.SPAWN_THREADS == 1
        assert all(t.daemon for t in threads)

    def test_request_that_cannot_be_prepared_closes_the_pipes(self) -> None:
        """If preparing the C arguments fails, the pipes just made are closed, nothing leaks."""

        def broken(*args: Any) -> Any:
            raise MemoryError

        self.patch(spawn, "_Request", broken)  # type: ignore[no-untyped-call]
        spawn._prepare_descriptors()  # one-time descriptors
        spawn._get_spawner()
        before = sorted(os.listdir("/proc/self/fd"))
        with pytest.raises(MemoryError):
            _spawn(_Child(), ["/bin/true"])
        assert sorted(os.listdir("/proc/self/fd")) == before

    async def test_request_failing_on_the_thread_is_reported(self) -> None:
        """A request that raises on the spawner thread still answers (EINVAL), pipes closed.

        The thread survives it: the next child starts normally.
        """
        await _sh("true").ended  # one-time descriptors
        before = len(os.listdir("/proc/self/fd"))

        def broken(self: Any) -> tuple[int, int]:
            raise RuntimeError("injected")

        real_run = spawner._Request.run
        self.patch(spawner._Request, "run", broken)  # type: ignore[no-untyped-call]
        child = _Child()
        _spawn(child, ["/bin/true"])
        error = await child.failed
        assert error.errno == errno.EINVAL
        assert child.calls == []
        assert len(os.listdir("/proc/self/fd")) == before
        self.patch(spawner._Request, "run", real_run)  # type: ignore[no-untyped-call]
        _, _, reason = await _sh("true").ended
        assert isinstance(reason.value, ProcessDone)

    def test_without_ctypes_posix_spawn_native_spawn_is_not_supported(self) -> None:
        """Where libc's posix_spawn cannot be reached through ctypes, callers fall back."""
        self.patch(spawn, "_libc_checked", True)  # type: ignore[no-untyped-call]
        self.patch(spawn, "_libc", None)  # type: ignore[no-untyped-call]
        assert not native_spawn_supported(reactor)

    def test_nul_byte_raises_value_error(self) -> None:
        """A NUL byte in an argument is a ValueError (the runner turns it into a reason)."""
        with pytest.raises(ValueError, match="null"):
            _spawn(_Child(), [SH, "-c", "echo a\0b"])

    async def test_without_pidfd_sigchld_reaping_ends_the_run(self) -> None:
        """If no pidfd can be had (out of descriptors), Twisted's SIGCHLD reaping is used."""

        def no_pidfd(pid: int, flags: int = 0) -> int:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        original = os.pidfd_open
        os.pidfd_open = no_pidfd
        self.addCleanup(setattr, os, "pidfd_open", original)
        child = _sh("echo hi; exit 4")
        out, _, reason = await child.ended
        assert out == b"hi\n"
        assert isinstance(reason.value, ProcessTerminated)
        assert reason.value.exitCode == 4


@implementer(ILogObserver)
class _Warnings:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "ztick_tw.runners.spawn":
            self.texts.append(formatEvent(event))


class _TurnClock(Clock):
    """A Clock whose ``turn()`` runs only the calls due when it starts.

    As a reactor turn does; ``Clock.advance(0)`` would also run the ``callLater(0)`` they make.
    """

    def turn(self) -> None:
        due = [call for call in self.calls if call.getTime() <= self.seconds()]
        for call in due:
            self.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)


class SpawnQueueTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = _TurnClock()
        self.started: list[int] = []
        self.failures: list[int] = []  # errnos to raise, one per start, before succeeding
        self.queue: SpawnQueue[int] = SpawnQueue(self.clock, self.start, "test runs")
        self.log = _Warnings()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)

    def start(self, item: int) -> None:
        if self.failures:
            code = self.failures.pop(0)
            raise OSError(code, os.strerror(code))
        self.started.append(item)

    def test_starts_on_a_later_turn_in_slices(self) -> None:
        """Nothing starts inside add(); each reactor turn starts at most SLICE_RUNS, in order."""
        for i in range(40):
            self.queue.add(i)
        assert self.started == []
        turns = 0
        while len(self.started) < 40:
            self.clock.turn()
            turns += 1
            assert self.started == list(range(min(40, turns * SLICE_RUNS)))
            assert len(self.queue) == 40 - len(self.started)
        assert turns == -(-40 // SLICE_RUNS)
        assert self.clock.getDelayedCalls() == []

    def test_shortage_waits_and_keeps_order(self) -> None:
        """EMFILE keeps the item first in line until wake(); nothing is lost or reordered."""
        self.failures = [errno.EMFILE]
        for i in range(3):
            self.queue.add(i)
        self.clock.advance(0)
        assert self.started == []
        assert len(self.queue) == 3
        self.queue.add(3)  # a new item does not jump the queue or retry early
        self.clock.advance(0)
        assert self.started == []
        self.queue.wake()  # a child ended
        self.clock.advance(0)
        assert self.started == [0, 1, 2, 3]
        [warning] = [t for t in self.log.texts if "cannot start" in t]
        assert "the daemon is out of file descriptors (" in warning
        assert "limit" in warning
        assert any("start again after 1 attempts" in t for t in self.log.texts)

    def test_shortage_retried_after_backoff(self) -> None:
        """Without wake() (no child running) the start is retried after a back-off."""
        self.failures = [errno.EAGAIN, errno.ENFILE, errno.ENOMEM]
        self.queue.add(7)
        self.clock.advance(0)
        self.clock.advance(spawn_queue.RETRY_FIRST)
        self.clock.advance(2 * spawn_queue.RETRY_FIRST)
        assert self.started == []
        self.clock.advance(4 * spawn_queue.RETRY_FIRST)
        assert self.started == [7]
        # One warning for the three shortages (rate limited), naming the first cause.
        warnings = [t for t in self.log.texts if "cannot start" in t]
        assert len(warnings) == 1, warnings
        assert "cannot start another process now" in warnings[0]

    def test_other_errors_do_not_block_the_queue(self) -> None:
        """A non-transient error from start() is logged and the next item goes on."""
        self.failures = [errno.ENOENT]
        self.queue.add(1)
        self.queue.add(2)
        self.clock.advance(0)
        assert self.started == [2]
        assert any("starting test runs failed" in t for t in self.log.texts)
        assert len(self.flushLoggedErrors(FileNotFoundError)) == 1  # type: ignore[no-untyped-call]

    def test_start_all_and_clear(self) -> None:
        """start_all() starts everything at once; what a shortage kept back is returned."""
        for i in range(40):
            self.queue.add(i)
        assert self.queue.start_all() == []
        assert self.started == list(range(40))
        self.queue.add(40)
        self.queue.add(41)
        self.failures = [errno.EMFILE]
        assert self.queue.start_all() == [40, 41]
        assert self.clock.getDelayedCalls() == []
        self.queue.add(42)
        assert self.queue.clear() == [42]
        assert self.clock.getDelayedCalls() == []

    def test_remove_takes_an_item_out(self) -> None:
        """remove() drops a queued item (a cancelled run); the others start in order."""
        for i in range(3):
            self.queue.add(i)
        assert self.queue.remove(1)
        assert not self.queue.remove(1)
        self.clock.turn()
        assert self.started == [0, 2]
        self.queue.add(3)
        assert self.queue.remove(3)
        assert self.clock.getDelayedCalls() == []  # nothing left: no pump armed

    def test_retry_puts_back_first_in_order_and_waits(self) -> None:
        """Starts that fail later (on the spawner thread) go back first, in their order.

        Two such failures make one wait (one back-off step, not two), and a pump already
        armed for the next turn does not retry them at once.
        """
        for i in range(4):
            self.queue.add(i)
        self.clock.turn()
        assert self.started == [0, 1, 2, 3]
        self.started.clear()
        self.queue.add(4)  # a pump is armed for the next turn
        eagain = OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        self.queue.retry(1, eagain)
        self.queue.retry(2, eagain)
        assert len(self.queue) == 3
        self.clock.turn()
        assert self.started == []  # waiting, not retried at once
        self.clock.advance(spawn_queue.RETRY_FIRST)
        assert self.started == [1, 2, 4]
        warnings = [t for t in self.log.texts if "cannot start" in t]
        assert len(warnings) == 1 and "cannot start another process now" in warnings[0]
        assert any("start again after 2 attempts" in t for t in self.log.texts)

    def test_retry_then_wake_starts_at_once(self) -> None:
        """A put-back start is retried as soon as wake() says a child ended."""
        self.queue.retry(9, OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
        self.clock.turn()
        assert self.started == []
        self.queue.wake()
        self.clock.turn()
        assert self.started == [9]
