"""The ``net_http`` scenario's webhook receiver: an asyncio HTTP/1.1 keep-alive server.

:func:`http_receiver` serves on 127.0.0.1 until SIGTERM (``python -m bench.network
http-receiver --port 0``; it prints its port).  It answers every request ``200`` with an
empty body and :class:`HookLog` records the arrival time (``time.time_ns()``) of each, the
job id (``X-Ztick-Job-Id``) and, from the ztick body's ``execution``, the delivery lag
(arrival - due).  ``GET /count`` and ``GET /summary`` (JSON) are for the benchmark, which
runs the receiver in a child process through :class:`HttpReceiver`.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from bench.common import percentile
from bench.daemon import HOST, BenchError, die_with_parent

ROOT = Path(__file__).resolve().parent.parent

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[^\r\n]*chunked", re.IGNORECASE)
_JOB_ID = re.compile(rb"\r\nx-ztick-job-id:[ \t]*([^\r\n]*)", re.IGNORECASE)
_EXECUTION = re.compile(rb'"execution":(\d+)')
_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_UNSUPPORTED = b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class HookLog:
    """What the http receiver has seen: arrival times, job ids, delivery lags."""

    def __init__(self) -> None:
        self.arrivals: list[int] = []
        self.lags_us: list[int] = []
        self.ids: set[bytes] = set()
        self.bad = 0
        self.connections = 0  # connections that carried at least one webhook

    def hit(self, head: bytes, body: bytes) -> None:
        """Record one webhook request (its head without the final blank line, its body)."""
        now = time.time_ns()
        self.arrivals.append(now)
        found = _JOB_ID.search(head)
        if found is None:
            self.bad += 1
        else:
            self.ids.add(found[1])
        execution = _EXECUTION.search(body)
        if execution is not None:
            self.lags_us.append((now - int(execution[1])) // 1000)

    def summary(self) -> dict[str, float]:
        """Counts, first/last arrival (ns) and delivery-lag percentiles (µs)."""
        lags = sorted(self.lags_us)
        return {
            "count": len(self.arrivals),
            "distinct": len(self.ids),
            "bad": self.bad,
            "connections": self.connections,
            "first_ns": min(self.arrivals, default=0),
            "last_ns": max(self.arrivals, default=0),
            "lag_p50_us": percentile(lags, 0.5),
            "lag_p99_us": percentile(lags, 0.99),
            "lag_max_us": lags[-1] if lags else 0,
        }


def _json_response(data: dict[str, float]) -> bytes:
    body = json.dumps(data).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % len(body) + body


class HookProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: requests with Content-Length bodies, pipelining ok."""

    def __init__(self, log: HookLog) -> None:
        self.log = log
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.hooked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        """Answer every complete request in the buffer (one write for all of them)."""
        buf = self.buffer + data if self.buffer else data
        out: list[bytes] = []
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buf[:end]
            if _CHUNKED.search(head):
                self.log.bad += 1
                out.append(_UNSUPPORTED)
                buf = b""
                break
            length = _CONTENT_LENGTH.search(head)
            total = end + 4 + (int(length[1]) if length else 0)
            if len(buf) < total:
                break
            body, buf = buf[end + 4 : total], buf[total:]
            if head.startswith(b"GET /count "):
                out.append(_json_response({"count": len(self.log.arrivals)}))
            elif head.startswith(b"GET /summary "):
                out.append(_json_response(self.log.summary()))
            else:
                self.log.hit(head, body)
                out.append(_OK)
                if not self.hooked:
                    self.hooked = True
                    self.log.connections += 1
        self.buffer = buf
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
            if out[-1] is _UNSUPPORTED:
                self.transport.close()


def http_receiver(port: int) -> None:
    """Serve webhooks on 127.0.0.1:``port`` (0: any), print the port, run until SIGTERM."""

    async def serve() -> None:
        log = HookLog()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: HookProtocol(log), HOST, port, backlog=1024)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        print(server.sockets[0].getsockname()[1], flush=True)
        await stop.wait()
        server.close()

    asyncio.run(serve())


class HttpReceiver:
    """:func:`http_receiver` in a child process, used as a context manager."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: http.client.HTTPConnection | None = None

    @property
    def pid(self) -> int:
        """The receiver's process id."""
        if self._proc is None:
            raise BenchError("the http receiver is not running")
        return self._proc.pid

    def start(self, timeout: float = 15.0) -> HttpReceiver:
        """Spawn the receiver and read its port."""
        log = open(self.workdir / "receiver.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "bench.network", "http-receiver", "--port", "0"],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                preexec_fn=die_with_parent,
            )
        finally:
            log.close()
        assert self._proc.stdout is not None
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        line = self._proc.stdout.readline() if ready else b""
        if not line.strip().isdigit():
            self.stop()
            raise BenchError(
                f"the http receiver did not start within {timeout:.0f}s (log"
                f" {self.workdir / 'receiver.log'})"
            )
        self.port = int(line)
        return self

    def get(self, path: str) -> dict[str, float]:
        """``GET path`` on a kept connection; the JSON answer."""
        if self._conn is None:
            self._conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        self._conn.request("GET", path)
        response = self._conn.getresponse()
        data: dict[str, float] = json.loads(response.read())
        return data

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 5 s) and reap."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()

    def __enter__(self) -> HttpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
