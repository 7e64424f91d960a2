"""A real ``redis-server`` for the tests, and a tiny blocking client to look inside it.

Loaded as a pytest plugin by ``tests/conftest.py``.  Fixtures:

* ``redis_server`` (session): one started :class:`RedisServer` without a password,
  shared by every test of the session: use unique keys or ``FLUSHALL`` first, and do not
  stop, pause or reconfigure it.
* ``fresh_redis_server`` (function): a factory ``make(password=None) -> RedisServer``
  for servers a test may stop, restart or pause; all are stopped when the test ends.

The server runs ``/usr/bin/redis-server`` on 127.0.0.1 on a free port, in a temporary
directory, without persistence (``--save "" --appendonly no``), in protected mode, with
``DEBUG`` allowed from loopback (``DEBUG SLEEP`` simulates a busy server).  If
redis-server is not installed the tests that need it are skipped, or fail when the
environment says ``CI=true``.

The blocking client (:class:`BlockingRedisClient`, :meth:`RedisServer.command`) has its
own RESP reader, independent of the runner's parser, so a parser bug cannot hide itself.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from urllib.parse import quote

import pytest

from tests.ports import free_port

__all__ = [
    "REDIS_SERVER",
    "BlockingRedisClient",
    "RedisReplyError",
    "RedisServer",
    "Value",
    "fresh_redis_server",
    "redis_server",
    "require_redis",
]

#: The redis-server the tests run.
REDIS_SERVER = "/usr/bin/redis-server"

_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort if a fixture's teardown did not run: never leave a server behind."""
    for process in list(_LIVE):
        with contextlib.suppress(OSError):
            process.kill()
            process.wait(5)
    _LIVE.clear()


def require_redis() -> None:
    """Skip the test (fail it when ``CI=true``) if redis-server is not installed."""
    if os.access(REDIS_SERVER, os.X_OK):
        return
    message = f"{REDIS_SERVER} not found: install it with `apt-get install redis-server`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


class RedisReplyError(Exception):
    """An error reply from the server (``-ERR ...``)."""


#: A reply: simple string ``str``, bulk ``bytes``, ``int``, ``None``, ``list``, or (inside
#: arrays only) a :class:`RedisReplyError`; top-level errors are raised by ``command``.
Value = str | bytes | int | None | list["Value"] | RedisReplyError


def _arg(value: bytes | str | int) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


class BlockingRedisClient:
    """One blocking connection speaking RESP2 (a socket and ``readline``)."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._file = self.sock.makefile("rb")

    def __enter__(self) -> BlockingRedisClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        with contextlib.suppress(OSError):
            self._file.close()
            self.sock.close()

    def send(self, *args: bytes | str | int) -> None:
        """Write one command without reading its reply."""
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = _arg(arg)
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))

    def read_reply(self, timeout: float | None = None) -> Value:
        """Read one reply (or pub/sub message); ``TimeoutError`` if none comes in time."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"connection closed by the server (got {line!r})")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode("utf-8")
        if kind == b"-":
            return RedisReplyError(rest.decode("utf-8"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            length = int(rest)
            if length < 0:
                return None
            data = self._file.read(length + 2)
            assert data.endswith(b"\r\n"), data
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [self.read_reply() for _ in range(count)]
        raise ConnectionError(f"not a RESP reply: {line!r}")

    def command(self, *args: bytes | str | int) -> Value:
        """Send one command and return its reply; an error reply raises it."""
        self.send(*args)
        reply = self.read_reply()
        if isinstance(reply, RedisReplyError):
            raise reply
        return reply

    def next_message(self, timeout: float = 5.0) -> tuple[bytes, bytes]:
        """The next pub/sub ``message`` on a subscribed connection: (channel, data)."""
        reply = self.read_reply(timeout)
        assert isinstance(reply, list) and reply[0] == b"message", reply
        channel, data = reply[1], reply[2]
        assert isinstance(channel, bytes) and isinstance(data, bytes), reply
        return channel, data


class RedisServer:
    """A real redis-server on 127.0.0.1 that tests can start, stop, restart and pause.

    ``password`` turns on ``requirepass`` (the ``default`` user's password).  ACL users
    added with :meth:`add_user` are created again after a restart (nothing else survives
    one: there is no persistence).
    """

    def __init__(self, password: str | None = None, executable: str = REDIS_SERVER) -> None:
        self.password = password
        self.executable = executable
        self.host = "127.0.0.1"
        self.port = 0  # chosen at the first start, kept across restarts
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: str | None = None
        self.paused = False
        self._admin: BlockingRedisClient | None = None
        self._users: dict[str, tuple[str, tuple[str, ...]]] = {}

    # -- life cycle -----------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the server process is alive (paused counts as alive)."""
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.process is not None, "server not started"
        return self.process.pid

    def start(self, timeout: float = 10.0) -> None:
        """Start the server (on the same port as before, if it ran already); wait until up."""
        if self.running:
            return
        fixed = self.port != 0
        for _ in range(5):
            if not fixed:
                self.port = free_port()
            if self._spawn(timeout):
                for name, (password, rules) in self._users.items():
                    self._set_user(name, password, rules)
                return
            if not fixed:
                continue
            time.sleep(0.2)  # same port: maybe not released yet
        raise RuntimeError(f"redis-server would not start on port {self.port}: {self._log()}")

    def _spawn(self, timeout: float) -> bool:
        self.directory = tempfile.mkdtemp(prefix="ztick-tw-redis-")
        argv = [
            self.executable,
            "--port", str(self.port),
            "--bind", self.host,
            "--protected-mode", "yes",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", self.directory,
            "--logfile", os.path.join(self.directory, "redis.log"),
            "--enable-debug-command", "local",
        ]  # fmt: skip
        if self.password is not None:
            argv += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _LIVE.add(self.process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:  # e.g. the port was taken
                _LIVE.discard(self.process)
                self._remove_directory(keep_log=True)
                return False
            try:
                if self.command("PING") == "PONG":
                    return True
            except (OSError, RedisReplyError):
                self._close_admin()
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING within {timeout}s")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its directory."""
        self._close_admin()
        process, self.process = self.process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                if self.paused:
                    os.kill(process.pid, signal.SIGCONT)
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
            _LIVE.discard(process)
        self.paused = False
        self._remove_directory()

    def restart(self) -> None:
        """Stop and start again on the same port (all data is lost, ACL users come back)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server: connections are still accepted, nothing is answered."""
        self._close_admin()
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT a paused server."""
        os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    _last_log = ""

    def _log(self) -> str:
        return self._last_log.strip()[-2000:] or "(no log)"

    def _remove_directory(self, keep_log: bool = False) -> None:
        directory, self.directory = self.directory, None
        if directory is None:
            return
        if keep_log:
            with contextlib.suppress(OSError), open(os.path.join(directory, "redis.log")) as f:
                self._last_log = f.read()
        shutil.rmtree(directory, ignore_errors=True)

    # -- addresses ------------------------------------------------------------------------

    def url(
        self, user: str | None = None, password: str | None = None, db: int | None = None
    ) -> str:
        """``redis://[user[:password]@]127.0.0.1:port[/db]`` (user and password quoted)."""
        auth = ""
        if user is not None or password is not None:
            auth = quote(user or "", safe="")
            if password is not None:
                auth += ":" + quote(password, safe="")
            auth += "@"
        path = "" if db is None else f"/{db}"
        return f"redis://{auth}{self.host}:{self.port}{path}"

    # -- looking inside -------------------------------------------------------------------

    def client(
        self, user: str | None = None, password: str | None = None, timeout: float = 5.0
    ) -> BlockingRedisClient:
        """A new blocking connection, authenticated as ``user`` (default: the admin)."""
        client = BlockingRedisClient(self.host, self.port, timeout)
        try:
            if password is None and user is None:
                password = self.password
            if password is not None:
                if user is None:
                    client.command("AUTH", password)
                else:
                    client.command("AUTH", user, password)
        except BaseException:
            client.close()
            raise
        return client

    def command(self, *args: bytes | str | int) -> Value:
        """Run one command on the server's admin connection (kept open, reopened if lost)."""
        if self._admin is None:
            self._admin = self.client()
        try:
            return self._admin.command(*args)
        except (OSError, ConnectionError):
            self._close_admin()
            raise

    def _close_admin(self) -> None:
        admin, self._admin = self._admin, None
        if admin is not None:
            admin.close()

    def subscribe(self, *channels: str) -> BlockingRedisClient:
        """A connection subscribed to ``channels`` (subscriptions confirmed); close it after."""
        client = self.client()
        try:
            client.send("SUBSCRIBE", *channels)
            for _ in channels:
                reply = client.read_reply()
                assert isinstance(reply, list) and reply[0] == b"subscribe", reply
        except BaseException:
            client.close()
            raise
        return client

    def add_user(self, name: str, password: str, *rules: str) -> None:
        """Create (or replace) the ACL user ``name``; by default it may do everything."""
        rules = rules or ("~*", "&*", "+@all")
        self._users[name] = (password, rules)
        self._set_user(name, password, rules)

    def _set_user(self, name: str, password: str, rules: tuple[str, ...]) -> None:
        self.command("ACL", "SETUSER", name, "reset", "on", f">{password}", *rules)

    def info(self, section: str = "everything") -> dict[str, str]:
        """``INFO section`` as a dict of strings."""
        reply = self.command("INFO", section)
        assert isinstance(reply, bytes), reply
        out: dict[str, str] = {}
        for line in reply.decode().splitlines():
            if line and not line.startswith("#") and ":" in line:
                key, _, value = line.partition(":")
                out[key] = value
        return out

    def connections_received(self) -> int:
        """``total_connections_received``: connections accepted since the server started."""
        return int(self.info("stats")["total_connections_received"])

    def connected_clients(self) -> int:
        """``connected_clients``, the admin connection included."""
        return int(self.info("clients")["connected_clients"])

    def flush(self) -> None:
        """``FLUSHALL``: empty every database."""
        self.command("FLUSHALL")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the whole session (no password; share it politely)."""
    require_redis()
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_redis_server() -> Iterator[Callable[..., RedisServer]]:
    """A factory of started servers the test owns (``make(password=None)``)."""
    require_redis()
    servers: list[RedisServer] = []

    def make(password: str | None = None) -> RedisServer:
        server = RedisServer(password)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.stop()
