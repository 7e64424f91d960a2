"""The REST API's speed (issue 11): ``PUT /jobs/{id}`` throughput, ``GET /jobs/{id}`` p50.

``rest_throughput``: a daemon with a logfile and fsync on; 50 keep-alive connections
each send ``PUT /jobs/{id}`` and wait for the answer (answered once durable), all driven
from one asyncio loop; the figure is answers a second (target >= 10,000).  Then one
connection sends ``GET /jobs/{id}`` one at a time; the figure is the p50 round trip
(target <= 300 µs).
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench.daemon import process_cpu_seconds
from bench.report import Metric, at_least, at_most

if TYPE_CHECKING:
    from bench.scenarios import Context

CONNECTIONS = 50


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port, http = _free_port(), _free_port()
    (workdir / "ztick.toml").write_text(
        f'[controller]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        '[database]\nlogfile_path = "ztick.log"\nfsync_on_persist = true\n'
        f'[http]\nlisten = "tcp:{http}:interface=127.0.0.1"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "ztick_tw", "-c", "ztick.toml"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", http), timeout=1).close()
            return proc, http
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the daemon's REST listener never came up")


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> bytes:
    writer.write(request)
    status = await reader.readline()
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def _puts(port: int, per_connection: int) -> float:
    body = b'{"execution": "2099-01-01T00:00:00Z"}'

    async def one(c: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(per_connection):
            request = (
                b"PUT /jobs/bench.%d.%d HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                b"\r\ncontent-length: %d\r\n\r\n%s" % (c, i, len(body), body)
            )
            status = await _exchange(reader, writer, request)
            if b" 200 " not in status:
                raise RuntimeError(f"PUT answered {status!r}")
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one(c) for c in range(CONNECTIONS)))
    return CONNECTIONS * per_connection / (time.perf_counter() - started)


def _gets(port: int, n: int) -> float:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = sock.makefile("rb")
    samples = []
    for i in range(n):
        request = b"GET /jobs/bench.0.%d HTTP/1.1\r\nhost: x\r\n\r\n" % (i % 10)
        t0 = time.perf_counter()
        sock.sendall(request)
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        reader.read(length)
        samples.append(time.perf_counter() - t0)
    sock.close()
    return statistics.median(samples) * 1e6


def rest_throughput(ctx: Context) -> list[Metric]:
    """``PUT /jobs/{id}`` answers/s over 50 keep-alive connections; ``GET`` p50 (µs)."""
    per_connection = 100 if ctx.quick else 1000
    proc, port = _start(ctx.workdir("rest"))
    try:
        cpu = process_cpu_seconds(proc.pid)
        rate = asyncio.run(_puts(port, per_connection))
        cpu_us = (process_cpu_seconds(proc.pid) - cpu) / (CONNECTIONS * per_connection) * 1e6
        p50 = _gets(port, 1000 if ctx.quick else 10000)
    finally:
        proc.terminate()
        proc.wait(30)
    return [
        Metric(
            "rest",
            "put_rate",
            "PUT /jobs/{id}, 50 connections",
            rate,
            "req/s",
            at_least(10_000),
            "",
            f"{CONNECTIONS} keep-alive connections x {per_connection} PUTs, each answered once"
            " its change is fsynced (logfile, fsync_on_persist), the next sent when the answer"
            " came, all driven by one asyncio loop in the benchmark's process; the daemon"
            f" used {cpu_us:.0f} µs of CPU per PUT (all threads). HTTP framing: httptools.",
        ),
        Metric("rest", "get_p50", "GET /jobs/{id} p50, one connection", p50, "µs", at_most(300)),
    ]
