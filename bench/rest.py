"""The REST API's speed (issue 11): ``PUT /jobs/{id}`` throughput, ``GET /jobs/{id}`` p50.

``rest_throughput``: a daemon with a logfile and fsync on; 50 keep-alive connections
each send ``PUT /jobs/{id}`` and wait for the answer (answered once durable), all driven
from one asyncio loop; the figure is answers a second (target >= 10,000).  Then one
connection sends ``GET /jobs/{id}`` one at a time; the figure is the p50 round trip
(target <= 300 µs).  A fresh daemon per run, median of ``ctx.repeats`` runs.

When ``ZTICK_BIN`` names a ztick executable, ztick's own REST server (``ztick server``,
same logfile + fsync settings) gets the same requests and its medians go in the ``ztick``
column.  ztick answers every request with ``connection: close`` and serves one connection
at a time, so it cannot be given keep-alive connections: its load opens a new connection
per request (50 at a time for PUT, one at a time for GET), and ztick-tw is measured under
that same load too, for a like-for-like line in the details.  Every answer's status is
checked: anything but 2xx (or a connection that fails) is counted, never skipped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from bench.common import Context
from bench.daemon import BenchError, die_with_parent, process_cpu_seconds
from bench.report import Metric, at_least, at_most, fmt_number
from tests.ports import free_port

CONNECTIONS = 50
BODY = b'{"execution": "2099-01-01T00:00:00Z"}'


@dataclass(frozen=True, slots=True)
class Run:
    """One daemon's figures under one load."""

    put_rate: float
    put_cpu_us: float
    put_bad: int
    get_p50_us: float
    get_bad: int


def _wait_listening(proc: subprocess.Popen[bytes], port: int, what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited ({proc.returncode}) before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise BenchError(f"{what}'s REST listener never came up")


def _spawn(argv: list[str], workdir: Path, http: int, what: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        argv,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    _wait_listening(proc, http, what)
    return proc


def _start_ours(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port, http = free_port(), free_port()
    (workdir / "ztick.toml").write_text(
        f'[controller]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        '[database]\nlogfile_path = "ztick.log"\nfsync_on_persist = true\n'
        f'[http]\nlisten = "tcp:{http}:interface=127.0.0.1"\n'
    )
    argv = [sys.executable, "-m", "ztick_tw", "-c", "ztick.toml"]
    return _spawn(argv, workdir, http, "ztick-tw"), http


def _start_ztick(workdir: Path, binary: str) -> tuple[subprocess.Popen[bytes], int]:
    # ztick's keys (src/interfaces/config.zig): listen addresses are host:port; framerate,
    # log level and telemetry stay at ztick's defaults (512 frames/s, info, off).
    port, http = free_port(), free_port()
    (workdir / "ztick.toml").write_text(
        f'[controller]\nlisten = "127.0.0.1:{port}"\n'
        '[database]\npersistence = "logfile"\nlogfile_path = "ztick.log"\n'
        "fsync_on_persist = true\n"
        f'[http]\nlisten = "127.0.0.1:{http}"\n'
    )
    return _spawn([binary, "server", "-c", "ztick.toml"], workdir, http, "ztick"), http


def ztick_binary() -> tuple[str | None, str]:
    """``ZTICK_BIN`` if it names an executable, else ``None`` and why not."""
    value = os.environ.get("ZTICK_BIN", "")
    if not value:
        return None, "ZTICK_BIN is not set (see bench/README.md)"
    path = shutil.which(value)
    if path is None:
        return None, f"ZTICK_BIN={value!r} is not an executable file"
    return path, ""


def _put_request(key: bytes) -> bytes:
    return (
        b"PUT /jobs/%s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
        b"\r\ncontent-length: %d\r\n\r\n%s" % (key, len(BODY), BODY)
    )


def _ok(status_line: bytes) -> bool:
    parts = status_line.split(b" ", 2)
    return len(parts) >= 2 and parts[1][:1] == b"2"


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


async def _puts(port: int, per_connection: int, prefix: bytes, keep_alive: bool) -> int:
    """PUTs from 50 clients at once; returns how many were not answered 2xx."""
    bad = 0

    async def one(c: int) -> None:
        nonlocal bad
        conn = await asyncio.open_connection("127.0.0.1", port) if keep_alive else None
        for i in range(per_connection):
            request = _put_request(b"%s.%d.%d" % (prefix, c, i))
            reader, writer = conn or await asyncio.open_connection("127.0.0.1", port)
            try:
                bad += not _ok(await _exchange(reader, writer, request))
            except (OSError, asyncio.IncompleteReadError):
                bad += 1
                if keep_alive:
                    raise
            if not keep_alive:
                writer.close()
        if conn:
            conn[1].close()

    await asyncio.gather(*(one(c) for c in range(CONNECTIONS)))
    return bad


def _gets(port: int, n: int, prefix: bytes, keep_alive: bool) -> tuple[float, int]:
    """``n`` GETs one at a time: the p50 round trip (µs) and how many were not 2xx.

    Without keep-alive each GET opens its own connection, and the connect is timed too.
    """
    samples, bad = [], 0
    conn: tuple[socket.socket, BinaryIO] | None = None
    for i in range(n):
        request = b"GET /jobs/%s.0.%d HTTP/1.1\r\nhost: x\r\n\r\n" % (prefix, i % 10)
        t0 = time.perf_counter()
        if conn is None:
            sock = socket.create_connection(("127.0.0.1", port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = sock, sock.makefile("rb")
        sock, reader = conn
        sock.sendall(request)
        status = reader.readline()
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = reader.read(length)
        samples.append(time.perf_counter() - t0)
        bad += not _ok(status) or len(body) != length
        if not keep_alive:
            reader.close()
            sock.close()
            conn = None
    if conn is not None:
        conn[1].close()
        conn[0].close()
    return statistics.median(samples) * 1e6, bad


def _measure(
    proc: subprocess.Popen[bytes], port: int, per_connection: int, gets: int, keep_alive: bool
) -> Run:
    prefix = b"bench"
    cpu = process_cpu_seconds(proc.pid)
    started = time.perf_counter()
    put_bad = asyncio.run(_puts(port, per_connection, prefix, keep_alive))
    rate = CONNECTIONS * per_connection / (time.perf_counter() - started)
    cpu_us = (process_cpu_seconds(proc.pid) - cpu) / (CONNECTIONS * per_connection) * 1e6
    p50, get_bad = _gets(port, gets, prefix, keep_alive)
    return Run(rate, cpu_us, put_bad, p50, get_bad)


def _run(
    ctx: Context, binary: str | None, per_connection: int, gets: int, keep_alive: bool
) -> Run:
    workdir = ctx.workdir("rest-ztick" if binary else "rest")
    proc, port = _start_ztick(workdir, binary) if binary else _start_ours(workdir)
    try:
        return _measure(proc, port, per_connection, gets, keep_alive)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _runs(runs: list[Run], unit: str, field: str) -> str:
    return " / ".join(fmt_number(getattr(r, field), unit) for r in runs)


def _median(runs: list[Run], field: str) -> float:
    return float(statistics.median(float(getattr(r, field)) for r in runs))


def rest_throughput(ctx: Context) -> list[Metric]:
    """``PUT /jobs/{id}`` answers/s over 50 keep-alive connections; ``GET`` p50 (µs)."""
    per_connection = 100 if ctx.quick else 1000
    gets = 1000 if ctx.quick else 10000
    # ztick serves ~300-500 requests/s (one connection at a time, one fsync each): a
    # smaller load keeps its runs to seconds; ztick-tw gets the same one alongside.
    z_per_connection, z_gets = (20, 200) if ctx.quick else (100, 1000)
    binary, why = ztick_binary()
    if binary is None:
        ctx.say(f"rest_throughput: ztick column left empty: {why}")
    ours: list[Run] = []
    ours_close: list[Run] = []
    theirs: list[Run] = []
    for run in range(ctx.repeats):
        ctx.say(f"rest_throughput run {run + 1}/{ctx.repeats}")
        ours.append(_run(ctx, None, per_connection, gets, keep_alive=True))
        if binary:
            ours_close.append(_run(ctx, None, z_per_connection, z_gets, keep_alive=False))
            theirs.append(_run(ctx, binary, z_per_connection, z_gets, keep_alive=False))
    bad = sum(r.put_bad + r.get_bad for r in ours)
    if bad:
        raise BenchError(f"ztick-tw answered {bad} REST requests with a non-2xx status")
    n = len(ours)
    put_detail = (
        f"{CONNECTIONS} keep-alive connections x {per_connection} PUTs, each answered once"
        " its change is fsynced (logfile, fsync_on_persist), the next sent when the answer"
        " came, all driven by one asyncio loop in the benchmark's process; a fresh daemon"
        f" per run, median of {n} ({_runs(ours, 'req/s', 'put_rate')}); the daemon used"
        f" {_runs(ours, 'µs', 'put_cpu_us')} of CPU per PUT (all threads); every answer"
        " 2xx. HTTP framing: httptools."
    )
    get_detail = (
        f"{gets} GETs one at a time on one keep-alive connection (TCP_NODELAY), after the"
        f" PUTs; median of {n} runs' p50 ({_runs(ours, 'µs', 'get_p50_us')}); every"
        " answer 2xx."
    )
    z_put = z_get = ""
    if binary and theirs:
        z_put, z_get, extra_put, extra_get = _ztick_figures(
            theirs, ours_close, z_per_connection, z_gets
        )
        put_detail += extra_put
        get_detail += extra_get
    return [
        Metric(
            "rest_throughput",
            "put_rate",
            "PUT /jobs/{id}, 50 connections",
            _median(ours, "put_rate"),
            "req/s",
            at_least(10_000),
            z_put,
            put_detail,
        ),
        Metric(
            "rest_throughput",
            "get_p50",
            "GET /jobs/{id} p50, one connection",
            _median(ours, "get_p50_us"),
            "µs",
            at_most(300),
            z_get,
            get_detail,
        ),
    ]


def _ztick_figures(
    theirs: list[Run], ours_close: list[Run], per_connection: int, gets: int
) -> tuple[str, str, str, str]:
    """The ``ztick`` cells and the like-for-like sentences for the details."""
    put_bad = sum(r.put_bad for r in theirs)
    get_bad = sum(r.get_bad for r in theirs)
    mine_bad = sum(r.put_bad + r.get_bad for r in ours_close)
    z_put = (
        f"{fmt_number(_median(theirs, 'put_rate'), 'req/s')}, no keep-alive"
        if not put_bad
        else f"invalid: {put_bad} non-2xx"
    )
    z_get = (
        f"{fmt_number(_median(theirs, 'get_p50_us'), 'µs')}, no keep-alive"
        if not get_bad
        else f"invalid: {get_bad} non-2xx"
    )
    extra_put = (
        f" ztick (`ztick server`, [database] logfile + fsync_on_persist = true, default"
        " framerate 512) answers with `connection: close` and serves one connection at a"
        f" time, so both got {CONNECTIONS} clients x {per_connection} PUTs with a new"
        f" connection per request: ztick {_runs(theirs, 'req/s', 'put_rate')}"
        f" ({_runs(theirs, 'µs', 'put_cpu_us')} of CPU per PUT), ztick-tw"
        f" {_runs(ours_close, 'req/s', 'put_rate')}"
        f" ({_runs(ours_close, 'µs', 'put_cpu_us')} of CPU per PUT); non-2xx or failed:"
        f" ztick {put_bad}, ztick-tw {sum(r.put_bad for r in ours_close)}."
    )
    extra_get = (
        f" ztick: {gets} GETs one at a time, each on a new connection (connect included,"
        f" as ztick closes after every answer): p50 {_runs(theirs, 'µs', 'get_p50_us')};"
        f" ztick-tw under the same load {_runs(ours_close, 'µs', 'get_p50_us')};"
        f" non-2xx or failed: ztick {get_bad}, ztick-tw"
        f" {sum(r.get_bad for r in ours_close)}."
    )
    if mine_bad:
        extra_put += f" (ztick-tw's no-keep-alive runs had {mine_bad} non-2xx.)"
    return z_put, z_get, extra_put, extra_get
