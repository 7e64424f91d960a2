"""The http runner against hostile webhook receivers: raw sockets on 127.0.0.1.

Each server here is a plain blocking socket in a thread, so it sends as fast as the
kernel lets it, independently of the reactor the runner lives in.  It counts what it
managed to send before it saw the connection end; the runner's own log line says how
many response head bytes it read before it aborted the connection.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogEvent

from tests.test_http_runner import _Base, _Events
from ztick_tw.model import HttpSpec
from ztick_tw.runners.base import Execution, Outcome
from ztick_tw.runners.http import (
    MAX_HEAD_BYTES,
    MAX_HEAD_LINE_BYTES,
    MAX_HEADER_LINES,
    MAX_INFORMATIONAL,
    HttpRunner,
)
from ztick_tw.runners.message import NetworkOptions

#: One read of the client: Twisted reads at most this many bytes at a time.
READ_CHUNK = 65536

#: A piece a script yields to make the server wait a moment before the next write.
PAUSE = b""

#: What a hostile server does with one connection once the request has arrived: it
#: answers with the pieces of the iterator it returns, for as long as it yields them.
Script = Callable[[], Iterator[bytes]]


def _brief(outcome: Outcome) -> Outcome:
    """``outcome`` without the details (output...): success, reason, interrupted."""
    return Outcome(outcome.success, outcome.reason, outcome.interrupted)


def _execution(method: str, url: str, job_id: str = "job.1") -> Execution:
    return Execution(job_id, 1, "rule.http", 1, HttpSpec(method, url), 2)


def _read_request(conn: socket.socket) -> bool:
    """Read one request (head and Content-Length body); False at end of stream."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            return False
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        more = conn.recv(65536)
        if not more:
            return False
        body += more
    return True


class Hostile:
    """A raw-socket server: answers each request on a connection with ``script()``.

    ``sent`` counts the bytes the kernel accepted from it; ``ended`` is set when a
    connection ended (the client closed or reset it, or the script ran out and the
    client closed after it).  ``error`` names the error the server saw, if any.
    """

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.sent = 0
        self.accepted = 0
        self.requests = 0
        self.error = ""
        self.ended = threading.Event()
        self.stopping = False
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/hook"

    def stop(self) -> None:
        """Stop serving; wakes the thread from a blocking call on its connection."""
        self.stopping = True
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)
        self.listener.close()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            self.conn = conn
            conn.settimeout(20)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                if self.tls is not None:
                    conn = self.conn = self.tls.wrap_socket(conn, server_side=True)
                while not self.stopping and _read_request(conn):
                    self.requests += 1
                    for piece in self.script():
                        if self.stopping:
                            break
                        if piece is PAUSE:
                            time.sleep(0.05)
                        conn.sendall(piece)
                        self.sent += len(piece)
            except OSError as e:
                self.error = type(e).__name__
            finally:
                conn.close()
                self.ended.set()


def _refused(log: _Events) -> list[LogEvent]:
    """The events of responses refused for their head (they carry ``received`` and ``why``)."""
    return [e for e in log.events if "received" in e and "why" in e]


def _forever(piece: Callable[[int], bytes], head: bytes = b"") -> Script:
    def script() -> Iterator[bytes]:
        if head:
            yield head
        n = 0
        while True:
            yield piece(n)
            n += 1

    return script


def _pooled(runner: HttpRunner) -> int:
    """Idle connections in the runner's pool (Twisted's private ``_connections``)."""
    pool: Any = runner.pool
    return sum(len(idle) for idle in pool._connections.values())


class HostileServerTests(_Base):
    """Each test serves a hostile script; ``_Base`` makes the PKI and collects the log."""

    def hostile(self, script: Script, tls: bool = False) -> Hostile:
        context = None
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.pki.server.cert_path, self.pki.server.key_path)
        server = Hostile(script, context)
        self.addCleanup(server.stop)
        return server

    def runner(self, **options: Any) -> HttpRunner:
        # The timeout is a deadline here: without the limits each job would run into it.
        options.setdefault("timeout", 5.0)
        options.setdefault("http_ca_file", self.pki.ca.cert_path)
        return super().runner(**options)

    async def wait_ended(self, server: Hostile) -> bool:
        """Wait (at most 10 s) until the server saw its connection end."""
        for _ in range(1000):
            if server.ended.is_set():
                return True
            await deferLater(reactor, 0.01, lambda: None)
        return False

    async def refused(
        self, script: Script, method: str, why: str, tls: bool = False
    ) -> tuple[Hostile, int]:
        """Run one job against ``script``: it fails with ``why``, nothing is kept.

        Returns the server and the number of response head bytes the runner read.
        """
        server = self.hostile(script, tls)
        runner = self.runner()
        outcome = await runner.run(_execution(method, server.url()))
        assert _brief(outcome) == Outcome(False, f"http {method} {server.url()}: {why}")
        # The runner aborted the connection: the server saw it end, and it is not pooled.
        assert await self.wait_ended(server)
        assert _pooled(runner) == 0
        assert runner.running == 0
        [event] = _refused(self.log)
        assert event["why"] == why
        received = event["received"]
        assert isinstance(received, int)
        # Memory stays bounded: at most the limit and one more read were taken in.
        assert 0 < received <= MAX_HEAD_BYTES + READ_CHUNK
        assert received <= server.sent
        return server, received

    async def test_endless_header_lines(self) -> None:
        """``200 OK`` then header lines forever: refused after 100 header lines."""
        await self.refused(
            _forever(lambda n: b"X-Flood-%d: %d\r\n" % (n, n), b"HTTP/1.1 200 OK\r\n"),
            "POST",
            f"response has more than {MAX_HEADER_LINES} header lines",
        )

    async def test_endless_header_lines_over_https(self) -> None:
        """The same over https: the limits hold under TLS too."""
        await self.refused(
            _forever(lambda n: b"X-Flood-%d: %d\r\n" % (n, n), b"HTTP/1.1 200 OK\r\n"),
            "POST",
            f"response has more than {MAX_HEADER_LINES} header lines",
            tls=True,
        )

    async def test_endless_long_header_lines(self) -> None:
        """Header lines of 4 KiB forever: refused once the head passes 64 KiB."""
        line = b"X-Big: " + b"b" * 4089 + b"\r\n"
        _, received = await self.refused(
            _forever(lambda n: line, b"HTTP/1.1 200 OK\r\n"),
            "GET",
            f"response headers exceeded {MAX_HEAD_BYTES} bytes",
        )
        assert received <= MAX_HEAD_BYTES + len(line)

    async def test_endless_continuation_lines(self) -> None:
        """One header continued over lines forever: refused after 100 header lines."""
        await self.refused(
            _forever(lambda n: b" more\r\n", b"HTTP/1.1 200 OK\r\nX-Long: start\r\n"),
            "PUT",
            f"response has more than {MAX_HEADER_LINES} header lines",
        )

    async def test_endless_status_line(self) -> None:
        """A status line sent byte by byte, never ended: refused past 16 KiB."""
        _, received = await self.refused(
            _forever(lambda n: b"HTTP/1.1 200 OK"[n % 15 : n % 15 + 1]),
            "DELETE",
            f"response status line exceeded {MAX_HEAD_LINE_BYTES} bytes",
        )
        assert received <= MAX_HEAD_LINE_BYTES + READ_CHUNK

    async def test_one_huge_header_line(self) -> None:
        """A single 1 MiB header line: refused with a reason, not "connection closed"."""

        def script() -> Iterator[bytes]:
            yield b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * (1024 * 1024) + b"\r\n\r\n"

        await self.refused(
            script, "POST", f"response header line exceeded {MAX_HEAD_LINE_BYTES} bytes"
        )

    async def test_informational_flood(self) -> None:
        """``100 Continue`` repeated forever: refused after 5 informational responses."""
        await self.refused(
            _forever(lambda n: b"HTTP/1.1 100 Continue\r\n\r\n"),
            "POST",
            f"more than {MAX_INFORMATIONAL} informational (1xx) responses",
        )

    async def test_informational_flood_with_headers(self) -> None:
        """``103 Early Hints`` with headers, repeated: the same limit applies."""
        hint = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        await self.refused(
            _forever(lambda n: hint),
            "GET",
            f"more than {MAX_INFORMATIONAL} informational (1xx) responses",
        )

    async def test_endless_chunked_body(self) -> None:
        """A chunked body that never ends is cut off at the body limit; status decides."""
        chunk = b"1000\r\n" + b"c" * 4096 + b"\r\n"
        server = self.hostile(
            _forever(
                lambda n: chunk,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            )
        )
        runner = self.runner()
        outcome = await runner.run(_execution("POST", server.url()))
        assert _brief(outcome) == Outcome(True)
        assert await self.wait_ended(server)
        assert _pooled(runner) == 0
        cut = [e for e in self.log.events if "response body longer than" in e["log_format"]]
        assert [e["limit"] for e in cut] == [NetworkOptions().http_max_response_bytes]

    async def test_endless_chunk_size_line(self) -> None:
        """A chunk-size line that never ends: the body is cut short, the connection dropped."""
        server = self.hostile(
            _forever(
                lambda n: b"1" * 1024,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            )
        )
        runner = self.runner()
        outcome = await runner.run(_execution("POST", server.url()))
        assert _brief(outcome) == Outcome(True)
        assert await self.wait_ended(server)
        assert _pooled(runner) == 0
        short = [e for e in self.log.events if "response body cut short" in e["log_format"]]
        assert len(short) == 1

    async def test_status_line_then_silence(self) -> None:
        """Half a head and then nothing: the timeout ends the job and drops the connection."""

        def script() -> Iterator[bytes]:
            yield b"HTTP/1.1 200 OK\r\nX-Partial: "

        server = self.hostile(script)
        runner = self.runner(timeout=0.3)
        outcome = await runner.run(_execution("POST", server.url()))
        assert _brief(outcome) == Outcome(False, f"http POST {server.url()}: timed out after 0.3s")
        assert await self.wait_ended(server)
        assert _pooled(runner) == 0

    async def test_large_head_within_limits(self) -> None:
        """A head just inside every limit, after 1xx responses, works and is reused.

        The head, three informational responses first, 99 headers of nearly 64 KiB in
        all and the start of the body, arrives in one write; the job succeeds and the
        next job reuses the connection.
        """
        informational = (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 102 Processing\r\n\r\n"
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        )
        status = b"HTTP/1.1 200 OK\r\n"
        fixed = b"Content-Length: 5\r\n\r\n"
        room = MAX_HEAD_BYTES - len(informational) - len(status) - len(fixed)
        size = room // 98
        lines = [b"X-H%02d: " % n + b"v" * (size - 9) + b"\r\n" for n in range(98)]
        head = informational + status + b"".join(lines) + fixed
        assert MAX_HEAD_BYTES - 200 < len(head) <= MAX_HEAD_BYTES

        def script() -> Iterator[bytes]:
            yield head + b"hello"

        server = self.hostile(script)
        runner = self.runner()
        for n in range(3):
            assert _brief(
                await runner.run(_execution("POST", server.url(), f"ok.{n}"))
            ) == Outcome(True)
        assert server.requests == 3
        assert server.accepted == 1
        assert _refused(self.log) == []

    async def test_head_and_body_in_one_read(self) -> None:
        """A small head with a 60 KiB body in the same write is not counted as head."""
        body = b"b" * 60000

        def script() -> Iterator[bytes]:
            yield b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(body) + body

        server = self.hostile(script)
        runner = self.runner()
        outcome = await runner.run(_execution("GET", server.url()))
        assert _brief(outcome) == Outcome(
            False, f"http GET {server.url()}: status 500: " + "b" * 200
        )
        assert (await runner.run(_execution("GET", server.url()))).reason == outcome.reason
        assert server.accepted == 1
        assert _refused(self.log) == []

    async def test_limits_are_exact(self) -> None:
        """Each limit admits a head exactly at it and refuses one a byte or line over.

        Each head is sent in one write, so it mostly arrives in one read, where the runner
        checks the whole head at once.
        """
        await self.exact_limits(split=False)

    async def test_limits_are_exact_line_by_line(self) -> None:
        """The same heads sent in two writes a moment apart, so they are checked by line."""
        await self.exact_limits(split=True)

    async def exact_limits(self, split: bool) -> None:
        status = b"HTTP/1.1 200 OK\r\n"
        length = b"Content-Length: 0\r\n"

        def lines(count: int) -> bytes:
            return status + b"".join(b"X-%03d: v\r\n" % n for n in range(count - 1)) + length

        def total(size: int) -> bytes:
            room = size - len(status) - len(length) - 2
            fill = [b"X-%d: " % n + b"f" * (room // 5 - 8) + b"\r\n" for n in range(5)]
            fill[0] = fill[0][:6] + b"f" * (room - sum(map(len, fill))) + fill[0][6:]
            head = status + b"".join(fill) + length
            assert len(head) + 2 == size
            return head

        def line(size: int) -> bytes:
            return status + b"X-Line: " + b"l" * (size - 9) + b"\r\n" + length

        cases = [
            (lines(MAX_HEADER_LINES), ""),
            (
                lines(MAX_HEADER_LINES + 1),
                f"response has more than {MAX_HEADER_LINES} header lines",
            ),
            (total(MAX_HEAD_BYTES), ""),
            (total(MAX_HEAD_BYTES + 1), f"response headers exceeded {MAX_HEAD_BYTES} bytes"),
            (line(MAX_HEAD_LINE_BYTES), ""),
            (
                line(MAX_HEAD_LINE_BYTES + 1),
                f"response header line exceeded {MAX_HEAD_LINE_BYTES} bytes",
            ),
        ]
        heads = iter([head + b"\r\n" for head, _ in cases])

        def script() -> Iterator[bytes]:
            head = next(heads)
            if split:
                yield head[: len(head) // 2]
                yield PAUSE
                yield head[len(head) // 2 :]
            else:
                yield head

        server = self.hostile(script)
        runner = self.runner()
        for n, (_, why) in enumerate(cases):
            outcome = await runner.run(_execution("POST", server.url(), f"limit.{n}"))
            expected = Outcome(False, f"http POST {server.url()}: {why}") if why else Outcome(True)
            assert (n, _brief(outcome)) == (n, expected)
        # Each accepted head left its connection for the next job; each refusal closed it.
        assert server.accepted == 3
