"""Hostile clients against the real daemon over TCP (issue 9, defects 1, 2, 3 and 9).

A client that vanishes mid-line, a client that reads a huge QUERY slowly, and a flood of
sockets that never authenticate.  Waits have deadlines; nothing asserts how long
something took (the benchmarks measure that).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import Daemon, LineClient, daemon, now_ns, wait_until
from tests.e2e.test_security import ALPHA_SECRET, auth_config, write_auth_file

SECOND = 1_000_000_000


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon without auth, logging at debug level."""
    with daemon(tmp_path / "d", {"log": {"level": "debug"}}) as d:
        yield d


def test_client_vanishing_mid_line_has_nothing_run(plain: Daemon) -> None:
    """A partial last line is never run, whether the client half-closes or its process dies.

    ``SET cut 1`` is what remains of a SET whose timestamp was cut short: run, it would
    fire the job at once.  Both connections close without an answer to it, and the daemon
    logs that it dropped the line.
    """
    run = plain.start()
    later = now_ns() + 3600 * SECOND
    with LineClient(plain.port) as c:
        c.ok(f"RULE SET r cut. shell {quote_shell('touch ' + str(plain.workdir / 'ran'))}")
        c.ok(f"SET keep {later}")
    half = LineClient(plain.port)
    half.send(f"a SET keep2 {later}\nb SET cut.half 1".encode())
    half.sock.shutdown(socket.SHUT_WR)
    assert half.read_to_eof() == b"a OK\n"
    half.close()
    # a client process that dies mid-line: the kernel closes its socket with a FIN
    script = (
        "import socket, os\n"
        f"s = socket.create_connection(('127.0.0.1', {plain.port}))\n"
        "s.sendall(b'c SET cut.crash 1')\n"
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    with LineClient(plain.port) as c:
        wait_until(
            lambda: run.stderr().count("dropped the unterminated last line") == 2 or None,
            "both drops logged",
        )
        assert c.get("cut.half") is None
        assert c.get("cut.crash") is None
        assert c.get("keep2") == ("planned", later)
    assert not (plain.workdir / "ran").exists()
    assert plain.stop() == 0


def quote_shell(command: str) -> str:
    """A shell command as one quoted protocol token."""
    return '"' + command.replace("\\", "\\\\").replace('"', '\\"') + '"'


def test_huge_query_read_slowly_does_not_stall_other_clients(plain: Daemon) -> None:
    """While one client reads a 20,000-job QUERY slowly, another is answered at once.

    The slow reader then gets every job once, in id order, followed by ``OK``.
    """
    plain.start()
    later = now_ns() + 3600 * SECOND
    n = 20_000
    with LineClient(plain.port, timeout=60) as c:
        for start in range(0, n, 10_000):
            ids = [f"q{i}" for i in range(start, start + 10_000)]
            c.send_lines(
                [
                    f"{rid} SET bulk.{i:06d} {later}"
                    for rid, i in zip(ids, range(start, start + 10_000), strict=True)
                ]
            )
            for rid in ids:
                assert c.read_line() == f"{rid} OK"
    slow = LineClient(plain.port, timeout=60)
    slow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    rid = "r" * 500  # long request ids: the answer (11 MB) far exceeds the socket buffers
    slow.send(f"{rid} QUERY bulk.\n".encode())
    time.sleep(0.5)  # the slow reader reads nothing for a while
    with LineClient(plain.port) as other:
        assert other.get(f"bulk.{n - 1:06d}") == ("planned", later)
        assert other.stat()["jobs_total"] == str(n)
    count = 0
    expected = 0
    buffer = b""
    while True:
        chunk = slow.sock.recv(1 << 20)
        assert chunk, "the daemon closed the slow reader's connection"
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        done = False
        for line in lines:
            words = line.split(b" ")
            assert words[0] == rid.encode()
            if words[1] == b"OK":
                done = True
                break
            assert words[1] == f"bulk.{expected:06d}".encode()
            expected += 1
            count += 1
        if done:
            break
    assert count == n
    slow.close()
    assert plain.stop() == 0


class SilentFlood:
    """Sockets from several source addresses that connect and never send anything.

    Each one the daemon closes is opened again at once, until ``stop``.
    """

    def __init__(self, port: int, sources: list[str], per_source: int) -> None:
        self.port = port
        self.sources = sources
        self.per_source = per_source
        self.opened = 0
        self.closed_by_daemon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SilentFlood:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _open(self, sel: selectors.BaseSelector, source: str) -> None:
        s = socket.socket()
        s.setblocking(False)
        s.bind((source, 0))
        with contextlib.suppress(BlockingIOError):
            s.connect((("127.0.0.1"), self.port))
        sel.register(s, selectors.EVENT_READ, source)
        self.opened += 1

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            for source in self.sources:
                for _ in range(self.per_source):
                    self._open(sel, source)
            deadline = time.monotonic() + 120
            while not self._stop.is_set() and time.monotonic() < deadline:
                for key, _ in sel.select(0.05):
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    try:
                        data = s.recv(4096)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(s)
                        s.close()
                        self.closed_by_daemon += 1
                        self._open(sel, key.data)
        finally:
            for key in list(sel.get_map().values()):
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]
            sel.close()


def test_silent_socket_flood_cannot_lock_out_valid_clients(tmp_path: Path) -> None:
    """Sockets that never AUTH, reopened as they are closed, leave room for valid clients.

    The flood comes from 20 addresses, 40 sockets each, against ``max_connections = 300``
    and at most 200 unauthenticated (24 per address): the daemon drops the oldest silent
    sockets of the most crowded addresses, and each of 18 valid clients, from another
    address, authenticates.
    """
    path = write_auth_file(tmp_path)
    config = auth_config(
        path, max_connections=300, max_unauthenticated=200, max_unauthenticated_per_source=24
    )
    config["log"] = {"level": "info"}
    with daemon(tmp_path / "d", config) as d:
        d.start()
        sources = [f"127.0.0.{i}" for i in range(10, 30)]
        with SilentFlood(d.port, sources, per_source=40) as flood:
            wait_until(lambda: flood.closed_by_daemon > 500 or None, "the daemon drops sockets")
            results = []
            for _ in range(18):
                s = socket.socket()
                s.settimeout(15)
                s.bind(("127.0.0.2", 0))
                s.connect(("127.0.0.1", d.port))
                s.sendall(f"AUTH {ALPHA_SECRET}\nq1 STAT\n".encode())
                answer = b""
                with contextlib.suppress(OSError):
                    while not answer.endswith(b"q1 OK\n"):
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        answer += chunk
                results.append(answer.startswith(b"OK\n") and answer.endswith(b"q1 OK\n"))
                s.close()
                time.sleep(0.1)
        assert results == [True] * 18
        assert d.current is not None
        assert "waiting to authenticate (at most 200, 24 per address)" in d.current.stderr()
        assert d.stop() == 0
        assert os.path.exists(d.logfile)
