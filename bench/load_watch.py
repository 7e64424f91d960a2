"""``load1000``, the daemon's side: what the scenario reads off the daemon and the kernel.

The daemon's fds, open-files limit and listen queue, the kernel's TCP counters, and the
checks made on connections of their own (QUERY all, idle round trips, a warm-up STAT).
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path

from bench.client import Connection
from bench.daemon import HOST, BenchError


def fd_count(pid: int) -> int:
    """Open file descriptors of process ``pid`` (entries of ``/proc/PID/fd``)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_kinds(pid: int) -> Counter[str]:
    """What the open fds of ``pid`` are: ``socket``, ``pipe``, ``anon_inode:[eventpoll]``..."""
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            kinds[target.split(":[")[0] if ":[" in target else target] += 1
    return kinds


def tcp_counters() -> dict[str, int]:
    """The kernel's ``TcpExt`` counters (machine-wide), from ``/proc/net/netstat``."""
    lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names and names[0] == "TcpExt:":
            return {k: int(v) for k, v in zip(names[1:], values[1:], strict=False)}
    return {}


def listen_backlog(port: int) -> int | None:
    """The accept-queue length of the socket listening on ``port`` (``ss``'s Send-Q)."""
    try:
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, timeout=10
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out[2]) if len(out) > 2 and out[2].isdigit() else None


def nofile_limits(pid: int) -> tuple[int, int]:
    """Soft and hard ``RLIMIT_NOFILE`` of ``pid``."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    return soft, hard


def wait_fds(pid: int, target: int, timeout: float) -> tuple[int, float]:
    """Poll ``pid``'s fd count until it is at most ``target``: (last count, seconds taken)."""
    start = time.monotonic()
    while True:
        count = fd_count(pid)
        waited = time.monotonic() - start
        if count <= target or waited > timeout:
            return count, waited
        time.sleep(0.01)


def query_all(port: int, prefix: str, timeout: float = 60.0) -> dict[str, tuple[str, int]]:
    """``QUERY prefix`` on a new connection: job id -> (status, time)."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(f"q QUERY {prefix}\n".encode())
        chunks: list[bytes] = []
        tail = b""
        while not tail.endswith(b"\nq OK\n") and tail != b"q OK\n":
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise BenchError(f"daemon closed the connection during QUERY {prefix}")
            chunks.append(chunk)
            tail = (tail + chunk)[-16:]
    out: dict[str, tuple[str, int]] = {}
    for line in b"".join(chunks).decode().splitlines()[:-1]:
        _, job_id, status, ns = line.split(" ")
        out[job_id] = (status, int(ns))
    return out


def idle_round_trips(port: int, prefix: str, job: str, count: int) -> tuple[float, float]:
    """Median round trips (µs) of ``QUERY prefix`` and ``GET job``, alternating, one socket."""
    conn = Connection(port)
    queries: list[float] = []
    gets: list[float] = []
    try:
        for _ in range(count):
            for text, samples in ((f"QUERY {prefix}", queries), (f"GET {job}", gets)):
                t = time.perf_counter_ns()
                conn.command(text)
                samples.append((time.perf_counter_ns() - t) / 1000)
    finally:
        conn.close()
    return statistics.median(queries), statistics.median(gets)


def warm_up(port: int) -> None:
    """One STAT on a connection of its own, so that "before" is a daemon that has served one."""
    conn = Connection(port)
    conn.stat()
    conn.close()
