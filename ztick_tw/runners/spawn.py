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
import queue
import resource
import signal
import threading
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

try:
    import ctypes
except ImportError:  # pragma: no cover - CPython built without _ctypes
    ctypes = None  # type: ignore[assignment]

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


# ---------------------------------------------------------------------------- libc

#: Threads that make the ``posix_spawn`` calls (see :class:`_Spawner`).
SPAWN_THREADS = 1

# <spawn.h> flags (glibc and musl agree).
_SETSIGDEF = 0x04
_SETSIGMASK = 0x08
_SETSID = 0x80
#: Room for a posix_spawn_file_actions_t (80 bytes on x86-64 glibc), a posix_spawnattr_t
#: (336) and a sigset_t (128): generous, as only libc knows their real sizes.
_OPAQUE_BYTES = 1024


class _Libc:
    """The libc calls, typed.  Through ctypes, ``posix_spawn`` runs without the GIL."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        vp, cint = ctypes.c_void_p, ctypes.c_int
        charpp = ctypes.POINTER(ctypes.c_char_p)
        self.spawn = self._fn(
            libc.posix_spawn, [ctypes.POINTER(cint), ctypes.c_char_p, vp, vp, charpp, charpp]
        )
        self.fa_init = self._fn(libc.posix_spawn_file_actions_init, [vp])
        self.fa_dup2 = self._fn(libc.posix_spawn_file_actions_adddup2, [vp, cint, cint])
        self.fa_destroy = self._fn(libc.posix_spawn_file_actions_destroy, [vp])
        self.attr_init = self._fn(libc.posix_spawnattr_init, [vp])
        self.attr_flags = self._fn(libc.posix_spawnattr_setflags, [vp, ctypes.c_short])
        self.attr_sigdef = self._fn(libc.posix_spawnattr_setsigdefault, [vp, vp])
        self.attr_sigmask = self._fn(libc.posix_spawnattr_setsigmask, [vp, vp])
        self.attr_destroy = self._fn(libc.posix_spawnattr_destroy, [vp])
        self.sigemptyset = self._fn(libc.sigemptyset, [vp])
        self.sigaddset = self._fn(libc.sigaddset, [vp, cint])

    @staticmethod
    def _fn(fn: Any, argtypes: list[Any]) -> Any:
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
        return fn


_libc: _Libc | None = None
_libc_checked = False


def _load_libc() -> _Libc | None:
    """The spawn calls of libc, or ``None`` without ctypes or without those symbols."""
    global _libc, _libc_checked
    if not _libc_checked:
        _libc_checked = True
        try:
            _libc = _Libc() if ctypes is not None else None
        except (OSError, AttributeError):  # no libc to load, or no posix_spawn in it
            _libc = None
    return _libc


def _cstrings(items: Sequence[bytes]) -> Any:
    """A NULL-terminated ``char *[]`` (the array keeps the bytes alive)."""
    array = (ctypes.c_char_p * (len(items) + 1))(*items, None)
    return array


#: Spawn attributes made once per (flags, signals given their default) and never destroyed:
#: ``posix_spawn`` only reads them, so concurrent calls share one (a few per daemon).
_attrs: dict[tuple[int, tuple[int, ...]], Any] = {}


def _spawn_attr(libc: _Libc, flags: int, sigdef: Sequence[int]) -> Any:
    """The ``posix_spawnattr_t`` for ``flags`` and ``sigdef`` (an empty signal mask)."""
    key = (flags, tuple(sigdef))
    attr = _attrs.get(key)
    if attr is None:
        attr = ctypes.create_string_buffer(_OPAQUE_BYTES)
        sigset = ctypes.create_string_buffer(_OPAQUE_BYTES)
        mask = ctypes.create_string_buffer(_OPAQUE_BYTES)
        libc.attr_init(attr)
        libc.sigemptyset(sigset)
        for signum in sigdef:
            libc.sigaddset(sigset, signum)
        libc.sigemptyset(mask)
        libc.attr_sigdef(attr, sigset)  # (copied into attr: the sets need not outlive it)
        libc.attr_sigmask(attr, mask)
        libc.attr_flags(attr, flags)
        _attrs[key] = attr
    return attr


class _Request:
    """One prepared ``posix_spawn`` call: every C argument, built on the reactor thread.

    Per call only the file actions (this child's pipes) and the argv/envp arrays are
    made; the attributes are shared (:func:`_spawn_attr`).
    """

    def __init__(
        self,
        libc: _Libc,
        path: bytes,
        argv: list[bytes],
        envp: list[bytes],
        dups: Sequence[tuple[int, int]],
        flags: int,
        sigdef: Sequence[int],
    ) -> None:
        self.libc = libc
        self.path = path
        self.argv = _cstrings(argv)
        self.envp = _cstrings(envp)
        self.actions = ctypes.create_string_buffer(_OPAQUE_BYTES)
        self.attr = _spawn_attr(libc, flags, sigdef)
        self.pid = ctypes.c_int(0)
        libc.fa_init(self.actions)
        for parent_fd, child_fd in dups:
            libc.fa_dup2(self.actions, parent_fd, child_fd)

    def run(self) -> tuple[int, int]:
        """Spawn (any thread; the GIL is released meanwhile): (errno or 0, pid)."""
        libc = self.libc
        try:
            error = libc.spawn(
                ctypes.byref(self.pid), self.path, self.actions, self.attr, self.argv, self.envp
            )
        finally:
            libc.fa_destroy(self.actions)
        return error, self.pid.value


class _Spawner:
    """Daemon threads (:data:`SPAWN_THREADS`) that make prepared ``posix_spawn`` calls.

    Why a thread: ``posix_spawn`` returns once the child has exec'd (vfork semantics),
    and CPython 3.11's ``os.posix_spawn`` holds the GIL all that time: 0.57 ms p50 and
    3 ms p99 per child, measured on the reactor thread during a 3,000-job drain, which
    capped it at 925 jobs/s.  Here that wait happens without the GIL (ctypes releases
    it); the result goes back to the reactor thread through ``callFromThread``.

    The threads are daemon threads blocked in a queue: they never hold up the end of
    the process.  Nothing else runs on them, and they touch no reactor state.
    """

    def __init__(self, libc: _Libc, threads: int) -> None:
        self.libc = libc
        self._requests: queue.SimpleQueue[tuple[_Request, Any, Callable[[int, int], None]]] = (
            queue.SimpleQueue()
        )
        for n in range(threads):
            threading.Thread(target=self._work, name=f"ztick-spawn-{n}", daemon=True).start()

    def submit(self, request: _Request, reactor: Any, done: Callable[[int, int], None]) -> None:
        self._requests.put((request, reactor, done))

    def _work(self) -> None:
        while True:
            request, reactor, done = self._requests.get()
            try:
                error, pid = request.run()
            except BaseException:  # never lose a request: report it as failed
                error, pid = errno.EINVAL, 0
            reactor.callFromThread(done, error, pid)


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
