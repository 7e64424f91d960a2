"""Start child processes cheaply, and in slices, without stalling the reactor.

:func:`spawn_child` starts one child with libc's ``posix_spawn`` behind Twisted's
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
* no ``setsid`` program: ``POSIX_SPAWN_SETSID`` makes the child a session and
  process group leader itself;
* the child's stdin is ``/dev/null`` (one descriptor opened once), stdout and stderr are
  pipes; the signals Python ignores (SIGPIPE, SIGXFSZ) get their default disposition;
* the call is made on one spawner thread through ctypes, which releases the GIL:
  ``posix_spawn`` returns only once the child has exec'd (vfork semantics), and
  CPython 3.11's ``os.posix_spawn`` holds the GIL all that time, measured at 0.57 ms p50
  and 3 ms p99 per child on the reactor thread.  With the thread, a drain of 3,000
  ``shell true`` jobs (``bench --only shell_drain``) went from 925 to about 1,000 jobs/s
  and another client's GET p99 from 8.3 to 6.3-7.1 ms.  Measured again alternating both
  versions, 9 invocations each (27 and 30 drains) on a busier machine: jobs/s about
  the same (median 747 before, 766 with the thread), GET p99 median 12.1 -> 9.3 ms and
  p50 4.8 -> 1.4 ms: the thread mostly gives the reactor its time back.  Two threads
  gave 1,200-1,300 jobs/s but a GET p99 of 14-24 ms (the reactor then competes with two
  threads for the GIL), so there is one;
* its exit is seen through a pidfd the reactor watches (``os.pidfd_open``), then reaped
  with ``waitpid(pid, WNOHANG)``; no SIGCHLD handler and no scan of every child.

A live child holds :data:`FDS_PER_CHILD` descriptors in the daemon.

Modules: the pacing of starts (:class:`SpawnQueue`, :data:`TRANSIENT_ERRNOS`,
:func:`shortage_reason`) is ``spawn_queue.py``, the libc calls and the spawner thread
(``_Libc``, ``_Request``, ``_Spawner``) are ``spawner.py``.
What stays here is the process-wide state (descriptors prepared, libc loaded and the
spawner started, each once) and the child itself.
"""

from __future__ import annotations

import errno
import importlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet import process as _process
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ztick_tw.runners.spawner import (
    _SETSID,
    _SETSIGDEF,
    _SETSIGMASK,
    _Libc,
    _Request,
    _Spawner,
    load_libc,
)

__all__ = [
    "FDS_PER_CHILD",
    "SPAWN_THREADS",
    "SpawnedProcess",
    "native_spawn_supported",
    "spawn_child",
]

log = Logger()

#: ``_signal.getsignal``: the C function behind ``signal.getsignal``, without the enum.
_getsignal: Callable[[int], object] = importlib.import_module("_signal").getsignal

#: Descriptors one live child holds in the daemon: the read ends of its stdout and
#: stderr pipes, and its pidfd.  (While it is being started, its two write ends too.)
FDS_PER_CHILD = 3


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

    It needs a real POSIX reactor (one that watches descriptors), libc's ``posix_spawn``
    reachable through ctypes, and pidfds (Linux >= 5.3).  Elsewhere, and with test
    reactors such as ``MemoryReactor``, the caller uses ``reactor.spawnProcess``.
    """
    global _pidfd_checked
    if not isinstance(reactor, PosixReactorBase):
        return False
    if not hasattr(os, "pidfd_open") or _load_libc() is None:
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


# ---------------------------------------------------------------------------- libc

#: Threads that make the ``posix_spawn`` calls (see :class:`_Spawner`).
SPAWN_THREADS = 1

_libc: _Libc | None = None
_libc_checked = False


def _load_libc() -> _Libc | None:
    """The spawn calls of libc, loaded once, or ``None`` (see ``spawner.load_libc``)."""
    global _libc, _libc_checked
    if not _libc_checked:
        _libc_checked = True
        _libc = load_libc()
    return _libc


_spawner: _Spawner | None = None


def _get_spawner() -> _Spawner:
    global _spawner
    if _spawner is None:
        libc = _load_libc()
        if libc is None:
            raise OSError(errno.ENOSYS, "posix_spawn is not available through ctypes")
        _spawner = _Spawner(libc, SPAWN_THREADS)
    return _spawner


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
    """A child started by ``posix_spawn``; Twisted's ``Process`` does the pipe handling.

    The pipes are made at once (an ``OSError`` such as EMFILE is raised here); the spawn
    itself happens on a spawner thread.  When it is done, on the reactor thread, the
    protocol gets ``makeConnection`` (``pid`` is set from then on), or ``on_failure`` is
    called with the ``OSError`` of a spawn that failed (the protocol hears nothing).
    """

    _watcher: _ExitWatcher | None = None
    _reap_registered = False

    def __init__(
        self,
        reactor: Any,
        proto: ProcessProtocol,
        executable: str,
        argv: Sequence[str],
        env: Mapping[str, str] | Sequence[bytes],
        new_session: bool,
        on_failure: Callable[[OSError], None],
    ) -> None:
        # Not Process.__init__: that one spawns (scanning every descriptor).
        _process._BaseProcess.__init__(self, proto)
        self._reactor = reactor
        self.pipes: dict[int, _process.ProcessReader] = {}
        self._on_failure = on_failure
        path = os.fsencode(executable)
        args = [os.fsencode(arg) for arg in argv]
        if isinstance(env, Mapping):
            envp = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
            checked: Sequence[bytes] = (path, *args, *envp)
        else:  # encoded and checked by the caller (the process runners, once per runner)
            envp = list(env)
            checked = (path, *args)
        if any(b"\0" in item for item in checked):
            raise ValueError("embedded null byte")
        spawner = _get_spawner()
        _prepare_descriptors()
        opened: list[int] = []
        try:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            opened += (out_r, out_w)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            opened += (err_r, err_w)
            flags = _SETSIGDEF | _SETSIGMASK | (_SETSID if new_session else 0)
            dups = ((_devnull, 0), (out_w, 1), (err_w, 2))
            request = _Request(spawner.libc, path, args, envp, dups, flags, _default_signals())
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        self._fds = (out_r, out_w, err_r, err_w)
        spawner.submit(request, reactor, self._spawned)

    def _spawned(self, error: int, pid: int) -> None:
        """On the reactor thread, once the spawner thread made the call."""
        out_r, out_w, err_r, err_w = self._fds
        os.close(out_w)
        os.close(err_w)
        if error:
            os.close(out_r)
            os.close(err_r)
            self.proto = None
            self._on_failure(OSError(error, os.strerror(error)))
            return
        self.pid = pid
        self.status = -1
        reactor = self._reactor
        self.pipes[1] = _process.ProcessReader(reactor, self, 1, out_r)  # type: ignore[no-untyped-call]
        self.pipes[2] = _process.ProcessReader(reactor, self, 2, err_r)  # type: ignore[no-untyped-call]
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1  # out of descriptors: fall back to Twisted's SIGCHLD reaping
        proto = self.proto
        if proto is not None:
            try:
                proto.makeConnection(self)
            except Exception:
                log.failure("while starting the protocol of pid {pid}", pid=pid)
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
    env: Mapping[str, str] | Sequence[bytes],
    *,
    new_session: bool = True,
    on_failure: Callable[[OSError], None],
) -> SpawnedProcess:
    """Start ``executable`` with ``argv`` and ``env``, connected to ``proto``.

    ``env`` is a mapping, or the ``b"NAME=value"`` entries already encoded (then the
    caller has checked them for NUL bytes: a per-runner environment is encoded once).

    ``executable`` is a path (no ``PATH`` search).  The child starts on a spawner
    thread: ``proto.makeConnection`` follows on the reactor thread, or ``on_failure``
    with the ``OSError`` saying why it could not start (exec errors such as ENOENT, or
    one of :data:`TRANSIENT_ERRNOS`).  Raises at once ``OSError`` when the pipes cannot
    be made (EMFILE...) and ``ValueError`` for a NUL byte in an argument or the
    environment.
    """
    return SpawnedProcess(reactor, proto, executable, argv, env, new_session, on_failure)
