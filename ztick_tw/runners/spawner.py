"""libc's ``posix_spawn`` through ctypes, and the thread that calls it (for ``spawn.py``).

:class:`_Libc` types the libc calls; :class:`_Request` is one prepared call (every C
argument built on the reactor thread, the spawn attributes shared per flags and signal
set: :func:`_spawn_attr`); :class:`_Spawner` makes the calls on its daemon threads,
without the GIL, and hands each result back to the reactor thread.  The process-wide
state (libc loaded once, the one spawner started once) is ``spawn.py``'s.
"""

from __future__ import annotations

import errno
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

try:
    import ctypes
except ImportError:  # pragma: no cover - CPython built without _ctypes
    ctypes = None  # type: ignore[assignment]

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


def load_libc() -> _Libc | None:
    """The spawn calls of libc, or ``None`` without ctypes or without those symbols."""
    if ctypes is None:
        return None
    try:
        return _Libc()
    except (OSError, AttributeError):  # no libc to load, or no posix_spawn in it
        return None


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
    """Daemon threads (``spawn.SPAWN_THREADS``) that make prepared ``posix_spawn`` calls.

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
