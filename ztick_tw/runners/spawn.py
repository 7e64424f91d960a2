"""Start child processes cheaply, and in slices, without stalling the reactor.

:func:`spawn_child` starts one child with ``os.posix_spawn`` behind Twisted's
``IProcessTransport`` (a :class:`twisted.internet.process.Process` whose ``__init__`` is
replaced), so a :class:`~twisted.internet.protocol.ProcessProtocol` sees what it sees
from ``reactor.spawnProcess``: ``makeConnection``, ``outReceived``/``errReceived``,
``processExited`` and ``processEnded`` with ``ProcessDone``/``ProcessTerminated``.
What it does not do, and why it is cheaper than ``reactor.spawnProcess``:

* no descriptor scan: the pipes are made close-on-exec (``os.pipe2(O_CLOEXEC)``) and
  every descriptor of the daemon already is (PEP 446: Python opens files, sockets and
  pipes non-inheritable; the reactor's epoll object is made with ``EPOLL_CLOEXEC`` and
  its waker pipes with ``os.pipe``).  Descriptors inherited from whoever started the
  daemon are marked close-on-exec once, before the first spawn
  (:func:`_prepare_descriptors`), so nothing of the daemon leaks into a job;
* no ``setsid`` program: ``posix_spawn(setsid=True)`` makes the child a session and
  process group leader itself;
* the child's stdin is ``/dev/null`` (one descriptor opened once), stdout and stderr are
  pipes; the signals Python ignores (SIGPIPE, SIGXFSZ) get their default disposition;
* its exit is seen through a pidfd the reactor watches (``os.pidfd_open``), then reaped
  with ``waitpid(pid, WNOHANG)``; no SIGCHLD handler and no scan of every child.

A live child holds :data:`FDS_PER_CHILD` descriptors in the daemon.

:class:`SpawnQueue` paces the starts: at most :data:`SLICE_RUNS` children or
:data:`SLICE_SECONDS` of spawning per reactor turn, so other clients are served while a
burst drains; and a start that fails for want of descriptors or memory (EMFILE, ENFILE,
EAGAIN, ENOMEM) is not a failure: it waits, first in line, for a child to end or a short
back-off, and is tried again.
"""

from __future__ import annotations

import errno
import importlib
import os
import resource
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from twisted.internet import process as _process
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IReadDescriptor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = [
    "FDS_PER_CHILD",
    "SLICE_RUNS",
    "SLICE_SECONDS",
    "TRANSIENT_ERRNOS",
    "SpawnQueue",
    "SpawnedProcess",
    "native_spawn_supported",
    "shortage_reason",
    "spawn_child",
]

log = Logger()

#: ``_signal.getsignal``: the C function behind ``signal.getsignal``, without the enum.
_getsignal: Callable[[int], object] = importlib.import_module("_signal").getsignal

#: Descriptors one live child holds in the daemon: the read ends of its stdout and
#: stderr pipes, and its pidfd.  (While it is being started, its two write ends too.)
FDS_PER_CHILD = 3

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


# ---------------------------------------------------------------------------- preparing

_prepared = False
_devnull = -1


def _prepare_descriptors() -> None:
    """Once per process: 0-2 open, everything else close-on-exec, /dev/null at hand.

    If the daemon was started with 0, 1 or 2 closed, a pipe could land there and be
    clobbered by the child's ``dup2``; they are opened on /dev/null instead.  A
    descriptor inherited from the daemon's parent is the only kind that may lack
    close-on-exec (everything the daemon opens has it); it gets it here.
    """
    global _prepared, _devnull
    if _prepared:
        return
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            new = os.open(os.devnull, os.O_RDWR)
            if new != fd:
                os.dup2(new, fd)
                os.close(new)
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        names = []
    for name in names:
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    os.set_inheritable(fd, False)
            except OSError:
                pass  # the directory's own descriptor, closed by now
    _devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    _prepared = True


_pidfd_checked: bool | None = None


def native_spawn_supported(reactor: object) -> bool:
    """Whether :func:`spawn_child` works with ``reactor`` on this system.

    It needs a real POSIX reactor (one that watches descriptors), ``os.posix_spawn`` and
    pidfds (Linux >= 5.3).  Elsewhere, and with test reactors such as ``MemoryReactor``,
    the caller uses ``reactor.spawnProcess``.
    """
    global _pidfd_checked
    if not isinstance(reactor, PosixReactorBase):
        return False
    if not hasattr(os, "posix_spawn") or not hasattr(os, "pidfd_open"):
        return False
    if _pidfd_checked is None:
        try:
            os.close(os.pidfd_open(os.getpid()))
            _pidfd_checked = True
        except OSError as e:
            # ENOSYS: an older kernel; anything else (EMFILE...) says the call exists.
            _pidfd_checked = e.errno != errno.ENOSYS
    return _pidfd_checked


def _default_signals() -> list[int]:
    """The signals the daemon ignores (SIG_IGN survives exec): the child gets SIG_DFL.

    (``_signal.getsignal``: ``signal.getsignal`` wraps each answer in an enum, ten times
    slower, and this runs for every child.)
    """
    ignored = signal.SIG_IGN
    return [signum for signum in range(1, signal.NSIG) if _getsignal(signum) == ignored]


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


# ---------------------------------------------------------------------------- one child


@implementer(IReadDescriptor)
class _ExitWatcher:
    """The reactor watches a child's pidfd: readable once the child has exited."""

    def __init__(self, reactor: Any, child: SpawnedProcess, pidfd: int) -> None:
        self.reactor = reactor
        self.child = child
        self.fd = pidfd
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "pidfd"

    def doRead(self) -> None:
        self.child.reapProcess()

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def signal(self, signum: int) -> None:
        signal.pidfd_send_signal(self.fd, signum)

    def close(self) -> None:
        if self.fd >= 0:
            self.reactor.removeReader(self)
            os.close(self.fd)
            self.fd = -1


class SpawnedProcess(_process.Process):
    """A child started by ``posix_spawn``; Twisted's ``Process`` does the pipe handling."""

    _watcher: _ExitWatcher | None = None
    _reap_registered = False

    def __init__(
        self,
        reactor: Any,
        proto: ProcessProtocol,
        executable: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        new_session: bool,
    ) -> None:
        # Not Process.__init__: that one spawns (scanning every descriptor).
        _process._BaseProcess.__init__(self, proto)
        self._reactor = reactor
        self.pipes: dict[int, _process.ProcessReader] = {}
        _prepare_descriptors()
        opened: list[int] = []
        try:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            opened += (out_r, out_w)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            opened += (err_r, err_w)
            self.pid = os.posix_spawn(
                executable,
                list(argv),
                env,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, _devnull, 0),
                    (os.POSIX_SPAWN_DUP2, out_w, 1),
                    (os.POSIX_SPAWN_DUP2, err_w, 2),
                ],
                setsigdef=_default_signals(),
                setsigmask=(),
                setsid=new_session,
            )
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        os.close(out_w)
        os.close(err_w)
        self.status = -1
        self.pipes[1] = _process.ProcessReader(reactor, self, 1, out_r)  # type: ignore[no-untyped-call]
        self.pipes[2] = _process.ProcessReader(reactor, self, 2, err_r)  # type: ignore[no-untyped-call]
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            pidfd = -1  # out of descriptors: fall back to Twisted's SIGCHLD reaping
        try:
            proto.makeConnection(self)  # type: ignore[no-untyped-call]
        except Exception:
            log.failure("while starting the protocol of pid {pid}", pid=self.pid)
        if pidfd >= 0:
            self._watcher = _ExitWatcher(reactor, self, pidfd)
            self.reapProcess()  # it may have exited already
        elif self.pid is not None:
            self._reap_registered = True
            _process.registerReapProcessHandler(self.pid, self)  # type: ignore[no-untyped-call]

    def reapProcess(self) -> None:
        """Reap the child if it has exited (never blocks); then ``processEnded``."""
        pid = self.pid
        if pid is None:
            return
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else reaped it: its status is lost.
            log.warn("pid {pid} was reaped elsewhere; its exit status is unknown", pid=pid)
            reaped, status = pid, 255 << 8
        if not reaped:
            return
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._reap_registered and _process.reapProcessHandlers.get(pid) is self:
            _process.unregisterReapProcessHandler(pid, self)  # type: ignore[no-untyped-call]
        self._reap_registered = False
        self.processEnded(status)

    def signalProcess(self, signalID: Any) -> None:
        """Signal the child through its pidfd (no pid reuse race), else by pid."""
        if signalID in ("HUP", "STOP", "INT", "KILL", "TERM"):
            signalID = getattr(signal, f"SIG{signalID}")
        if self.pid is None:
            raise _process.ProcessExitedAlready()
        if self._watcher is None:
            super().signalProcess(signalID)  # type: ignore[no-untyped-call]
            return
        try:
            self._watcher.signal(signalID)
        except ProcessLookupError:
            raise _process.ProcessExitedAlready() from None


def spawn_child(
    reactor: Any,
    proto: ProcessProtocol,
    executable: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    new_session: bool = True,
) -> SpawnedProcess:
    """Start ``executable`` with ``argv`` and ``env`` and connect it to ``proto``.

    ``executable`` is a path (no ``PATH`` search).  Raises ``OSError`` when the child
    cannot be started (its ``errno`` says why: see :data:`TRANSIENT_ERRNOS`) and
    ``ValueError`` for an argument or environment entry with a NUL byte.
    """
    return SpawnedProcess(reactor, proto, executable, argv, env, new_session)


# ---------------------------------------------------------------------------- pacing

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

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: T) -> None:
        """Queue ``item``; it starts on a later reactor turn."""
        self._items.append(item)
        if not self._waiting:
            self._arm(0)

    def wake(self) -> None:
        """Resources were freed: retry a start that lacked them, now."""
        if self._waiting:
            self._waiting = False
            self._cancel()
            if self._items:
                self._arm(0)

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
