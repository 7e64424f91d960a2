"""Load generators that are not the bottleneck: pre-built bytes, big buffers, no parsing.

``pipeline`` sends one pre-built blob with ``sendall`` from a thread while the calling
thread reads and counts newline bytes (``bytes.count`` runs in C).  ``pipeline_many`` does
the same over many connections with one ``selectors`` loop.  ``Connection`` is a plain
request/response client for GET latency, STAT and polling.  Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.daemon import HOST, BenchError

BUFFER_BYTES = 4 << 20
RECV_BYTES = 1 << 20


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER_BYTES)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFFER_BYTES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def set_lines(ids: Sequence[str], times_ns: Sequence[int], tag: str = "s") -> bytes:
    """One ``<tag><i> SET <id> <ns>`` line per job, as one blob."""
    return "".join(
        f"{tag}{i} SET {job_id} {ns}\n"
        for i, (job_id, ns) in enumerate(zip(ids, times_ns, strict=True))
    ).encode()


@dataclass(slots=True)
class Answers:
    """What came back from a pipelined run."""

    seconds: float
    data: bytes

    def count(self, needle: bytes) -> int:
        """How many times ``needle`` occurs in the answers."""
        return self.data.count(needle)


def check_all_ok(answers: Answers, expected: int, what: str) -> None:
    """Raise unless exactly ``expected`` answers are ``... OK``."""
    ok = answers.count(b" OK\n")
    lines = answers.count(b"\n")
    if ok != expected or lines != expected:
        sample = answers.data[:200].decode(errors="replace")
        raise BenchError(
            f"{what}: expected {expected} OK answers, got {ok} OK in {lines} lines"
            f" (start: {sample!r})"
        )


def pipeline(port: int, payload: bytes, lines: int, timeout: float = 120.0) -> Answers:
    """Send ``payload`` on one connection; time until ``lines`` answer lines are back."""
    sock = _connect(port, 10.0)
    sock.settimeout(timeout)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(payload)
        except OSError as e:  # the reader notices the missing answers and reports
            errors.append(e)

    chunks: list[bytes] = []
    sender = threading.Thread(target=send, name="bench-sender", daemon=True)
    try:
        count = 0
        deadline = time.perf_counter() + timeout
        start = time.perf_counter()
        sender.start()
        while count < lines:
            try:
                chunk = sock.recv(RECV_BYTES)
            except TimeoutError:
                raise BenchError(
                    f"no answer for {timeout:.0f}s after {count} of {lines} answers"
                ) from None
            if not chunk:
                raise BenchError(
                    f"daemon closed the connection after {count} of {lines} answers"
                    f" (send error: {errors[0] if errors else 'none'})"
                )
            count += chunk.count(b"\n")
            chunks.append(chunk)
            if time.perf_counter() > deadline:
                raise BenchError(f"only {count} of {lines} answers within {timeout:.0f}s")
        seconds = time.perf_counter() - start
        sender.join(timeout)
    finally:
        sock.close()
    return Answers(seconds, b"".join(chunks))


@dataclass(slots=True)
class _Conn:
    sock: socket.socket
    payload: memoryview
    expected: int
    sent: int = 0
    received: int = 0
    chunks: list[bytes] = field(default_factory=list)


def pipeline_many(
    port: int, payloads: Sequence[bytes], lines: Sequence[int], timeout: float = 120.0
) -> Answers:
    """Like ``pipeline`` over ``len(payloads)`` connections at once (one selector loop).

    Every connection is opened before the clock starts; the time is until the last
    connection has all its answers.  The answers of all connections are concatenated.
    """
    conns = [
        _Conn(_connect(port, 10.0), memoryview(p), n) for p, n in zip(payloads, lines, strict=True)
    ]
    sel = selectors.DefaultSelector()
    try:
        for i, c in enumerate(conns):
            c.sock.setblocking(False)
            sel.register(c.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, i)
        open_conns = len(conns)
        start = time.perf_counter()
        deadline = start + timeout
        while open_conns:
            if time.perf_counter() > deadline:
                done = sum(c.received for c in conns)
                raise BenchError(f"only {done} of {sum(lines)} answers within {timeout:.0f}s")
            for key, events in sel.select(1.0):
                c = conns[key.data]
                if events & selectors.EVENT_WRITE and c.sent < len(c.payload):
                    with contextlib.suppress(BlockingIOError):
                        c.sent += c.sock.send(c.payload[c.sent : c.sent + BUFFER_BYTES])
                    if c.sent == len(c.payload):
                        sel.modify(c.sock, selectors.EVENT_READ, key.data)
                if events & selectors.EVENT_READ:
                    try:
                        chunk = c.sock.recv(RECV_BYTES)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        raise BenchError(
                            f"daemon closed connection {key.data} after {c.received} answers"
                        )
                    c.received += chunk.count(b"\n")
                    c.chunks.append(chunk)
                    if c.received >= c.expected:
                        sel.unregister(c.sock)
                        open_conns -= 1
        seconds = time.perf_counter() - start
    finally:
        sel.close()
        for c in conns:
            c.sock.close()
    return Answers(seconds, b"".join(b"".join(c.chunks) for c in conns))


def request_response_many(
    port: int, requests: Sequence[Sequence[bytes]], timeout: float = 120.0
) -> Answers:
    """Many connections, each with exactly one request in flight (send, await, send...).

    ``requests[i]`` are the lines of connection ``i``.  This is how a client that waits
    for each ``OK`` behaves; with fsync on, one fsync then covers one request per
    connection at most.
    """
    socks = [_connect(port, 10.0) for _ in requests]
    sel = selectors.DefaultSelector()
    chunks: list[list[bytes]] = [[] for _ in requests]
    nexts = [0] * len(requests)
    pending = [b""] * len(requests)
    try:
        for i, s in enumerate(socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
        open_conns = sum(1 for r in requests if r)
        start = time.perf_counter()
        deadline = start + timeout
        for i, s in enumerate(socks):
            if requests[i]:
                s.send(requests[i][0])
                nexts[i] = 1
        while open_conns:
            if time.perf_counter() > deadline:
                raise BenchError(f"request/response run not done within {timeout:.0f}s")
            for key, _ in sel.select(1.0):
                i = key.data
                try:
                    chunk = socks[i].recv(RECV_BYTES)
                except BlockingIOError:
                    continue
                if not chunk:
                    raise BenchError(f"daemon closed connection {i}")
                chunks[i].append(chunk)
                buf = pending[i] + chunk
                answered = buf.count(b"\n")
                pending[i] = buf[buf.rfind(b"\n") + 1 :]
                for _ in range(answered):
                    if nexts[i] < len(requests[i]):
                        socks[i].send(requests[i][nexts[i]])
                        nexts[i] += 1
                    else:
                        sel.unregister(socks[i])
                        open_conns -= 1
                        break
        seconds = time.perf_counter() - start
    finally:
        sel.close()
        for s in socks:
            s.close()
    return Answers(seconds, b"".join(b"".join(c) for c in chunks))


class Connection:
    """A blocking request/response connection (GET latency, STAT, polling)."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = _connect(port, timeout)
        self.sock.settimeout(timeout)
        self._buffer = b""
        self._n = 0

    def close(self) -> None:
        """Close the connection."""
        self.sock.close()

    def roundtrip(self, line: bytes) -> bytes:
        """Send one request line, return its one answer line (without its newline)."""
        self.sock.sendall(line)
        return self._read_line()

    def _read_line(self) -> bytes:
        buf = self._buffer
        while True:
            nl = buf.find(b"\n")
            if nl >= 0:
                self._buffer = buf[nl + 1 :]
                return buf[:nl]
            chunk = self.sock.recv(RECV_BYTES)
            if not chunk:
                raise BenchError("daemon closed the connection")
            buf += chunk

    def command(self, text: str) -> list[str]:
        """Send ``<id> <text>``; return the answer lines (without the id) up to OK/ERROR."""
        self._n += 1
        rid = f"c{self._n}"
        self.sock.sendall(f"{rid} {text}\n".encode())
        out: list[str] = []
        while True:
            line = self._read_line().decode()
            rest = line[len(rid) + 1 :] if line.startswith(rid + " ") else line
            if rest in ("OK", "ERROR") or (rest.startswith("OK ") and not text.startswith("STAT")):
                out.append(rest)
                if rest == "ERROR":
                    raise BenchError(f"{text!r} answered ERROR")
                return out
            out.append(rest)

    def stat(self) -> dict[str, str]:
        """``STAT`` as a dict."""
        pairs = (line.split(" ", 1) for line in self.command("STAT")[:-1])
        return {k: v for k, v in pairs}
