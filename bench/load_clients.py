"""``load1000``'s client fleet: the worker processes and their connections.

One forked worker holds its share of the connections in one ``selectors`` loop, each
connection a closed loop of SET/GET/QUERY checked against what it set, and reports what
it saw over a pipe.
"""

from __future__ import annotations

import contextlib
import random
import resource
import selectors
import socket
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path

from bench.common import DAY_NS, SECOND_NS, percentile
from bench.daemon import HOST, BenchError, die_with_parent

#: Jobs per connection (``c0123.j00`` ... ``c0123.j19``), set again and again.
IDS_PER_CONNECTION = 20
#: One request in this many (at random) is a QUERY of the connection's prefix.
QUERY_EVERY = 20
#: A connect that takes longer than this fails the scenario.
CONNECT_TIMEOUT = 30.0
#: A request unanswered this long counts as an error and ends its connection.
ANSWER_TIMEOUT_NS = 30 * SECOND_NS
#: Error messages kept per worker (all errors are counted).
KEPT_ERRORS = 10

SET, GET, QUERY = 0, 1, 2
KINDS = ("SET", "GET", "QUERY")


@dataclass(slots=True)
class ConnResult:
    """What one client connection did."""

    index: int
    answered: int  # answers received (all, including those after the end)
    p99_us: float
    max_us: float
    per_second: list[int]  # answers received in each second of the run
    alive: bool  # not closed by the daemon, no timeout


@dataclass(slots=True)
class WorkerResult:
    """What one client process reports back."""

    conns: list[ConnResult]
    latencies_us: dict[int, bytes]  # kind -> array('d') of latencies in µs
    in_window: int  # answers received between the start and the end of the run
    errors: int
    messages: list[str]
    cpu_seconds: float  # this process's user + system CPU during the run
    jobs: dict[str, int]  # every job this worker's connections set last: id -> time


@dataclass(slots=True)
class _Client:
    index: int
    sock: socket.socket
    prefix: str
    rnd: random.Random
    jobs: dict[str, int] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    n: int = 0  # requests sent; the request id
    kind: int = SET
    job: str = ""
    ns: int = 0
    sent_ns: int = 0
    buf: bytes = b""
    next_j: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))
    per_second: list[int] = field(default_factory=list)
    running: bool = True  # a request in flight or about to be sent
    alive: bool = True  # False: the connection failed (closed, timed out...)


def _raise_nofile(needed: int) -> None:
    """Soft ``RLIMIT_NOFILE`` up to the hard limit; fail if that is still under ``needed``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = int(Path("/proc/sys/fs/nr_open").read_text())
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < needed:
        raise BenchError(f"the client may open only {soft} files (hard limit), needs {needed}")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Loop:
    """One worker's selector loop over its connections."""

    def __init__(self, clients: list[_Client], seconds: int) -> None:
        self.clients = clients
        self.seconds = seconds
        self.base_ns = time.time_ns() + DAY_NS
        self.latencies = {kind: array("d") for kind in (SET, GET, QUERY)}
        self.in_window = 0
        self.errors = 0
        self.messages: list[str] = []
        self.start_ns = 0
        self.end_ns = 0

    def error(self, c: _Client, text: str) -> None:
        self.errors += 1
        if len(self.messages) < KEPT_ERRORS:
            self.messages.append(f"connection {c.index} ({c.prefix}*), request {c.n}: {text}")

    def request(self, c: _Client) -> bytes:
        """The next request of ``c`` (and what it expects), as bytes."""
        c.n += 1
        n = c.n
        # At random, not every QUERY_EVERY-th request: the connections run in step, so
        # a fixed period would send all 1,000 QUERYs at once, in waves.
        if c.jobs and c.rnd.random() * QUERY_EVERY < 1:
            c.kind = QUERY
            return f"{n} QUERY {c.prefix}\n".encode()
        if n % 2 == 1 or not c.jobs:
            c.kind = SET
            c.job = f"{c.prefix}j{c.next_j:02d}"
            c.next_j = (c.next_j + 1) % IDS_PER_CONNECTION
            c.ns = self.base_ns + c.rnd.randrange(29 * DAY_NS)
            return f"{n} SET {c.job} {c.ns}\n".encode()
        c.kind = GET
        c.job = c.rnd.choice(c.ids)
        return f"{n} GET {c.job}\n".encode()

    def send(self, c: _Client, sel: selectors.BaseSelector) -> bool:
        """Send the next request of ``c``; False (and the connection dropped) on failure."""
        line = self.request(c)
        c.sent_ns = time.monotonic_ns()
        try:
            sent = c.sock.send(line)
        except OSError as e:
            sent = -1
            self.error(c, f"send failed: {e!r}")
        else:
            if sent != len(line):
                self.error(c, f"only {sent} of {len(line)} bytes of a request line sent")
        if sent != len(line):
            self.drop(c, sel)
            return False
        return True

    def drop(self, c: _Client, sel: selectors.BaseSelector, failed: bool = True) -> None:
        c.running = False
        c.alive = c.alive and not failed
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(c.sock)

    def complete(self, c: _Client) -> bool:
        """Whether ``c.buf`` holds the whole answer to the request in flight."""
        buf = c.buf
        if not buf.endswith(b"\n"):
            return False
        if c.kind != QUERY:
            return True
        last = buf[buf.rfind(b"\n", 0, len(buf) - 1) + 1 : -1]
        rid = str(c.n).encode()
        return last in (rid + b" OK", rid + b" ERROR") or not last.startswith(rid + b" ")

    def check(self, c: _Client) -> None:
        """Check the answer in ``c.buf`` against what ``c`` set; record the job on a SET OK."""
        rid = str(c.n)
        got = c.buf.decode(errors="replace")
        if c.kind == SET:
            if got != f"{rid} OK\n":
                self.error(c, f"SET {c.job} {c.ns} answered {got!r}")
                return
            if c.job not in c.jobs:
                c.ids.append(c.job)
            c.jobs[c.job] = c.ns
        elif c.kind == GET:
            want = f"{rid} OK planned {c.jobs[c.job]}\n"
            if got != want:
                self.error(c, f"GET {c.job}: expected {want!r}, got {got!r}")
        else:
            lines = got.split("\n")[:-1]
            want_lines = sorted(f"{rid} {j} planned {ns}" for j, ns in c.jobs.items())
            if lines[-1] != f"{rid} OK" or sorted(lines[:-1]) != want_lines:
                missing = sorted(set(want_lines) - set(lines))[:3]
                extra = sorted(set(lines[:-1]) - set(want_lines))[:3]
                self.error(
                    c,
                    f"QUERY {c.prefix}: {len(lines) - 1} lines ending {lines[-1]!r} for"
                    f" {len(want_lines)} jobs; missing {missing}, unexpected {extra}",
                )

    def run(self, start_ns: int, end_ns: int) -> None:
        self.start_ns, self.end_ns = start_ns, end_ns
        seconds = self.seconds
        sel = selectors.DefaultSelector()
        for c in self.clients:
            sel.register(c.sock, selectors.EVENT_READ, c)
            c.per_second = [0] * seconds
        time.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
        active = sum(1 for c in self.clients if self.send(c, sel))
        next_check = start_ns + SECOND_NS
        latencies = self.latencies
        try:
            while active:
                for key, _ in sel.select(0.25):
                    c = key.data
                    try:
                        data = c.sock.recv(1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        self.error(c, f"recv failed: {e!r}")
                        self.drop(c, sel)
                        active -= 1
                        continue
                    now = time.monotonic_ns()
                    if not data:
                        self.error(
                            c,
                            f"the daemon closed the connection (after {len(c.latencies)}"
                            f" answers; unanswered: {c.buf!r})",
                        )
                        self.drop(c, sel)
                        active -= 1
                        continue
                    c.buf += data
                    if not self.complete(c):
                        continue
                    latency = (now - c.sent_ns) / 1000
                    c.latencies.append(latency)
                    latencies[c.kind].append(latency)
                    second = (now - start_ns) // SECOND_NS
                    if 0 <= second < seconds:
                        c.per_second[second] += 1
                        self.in_window += 1
                    self.check(c)
                    c.buf = b""
                    if now >= end_ns:
                        self.drop(c, sel, failed=False)
                        active -= 1
                    elif not self.send(c, sel):
                        active -= 1
                now = time.monotonic_ns()
                if now >= next_check:
                    next_check = now + SECOND_NS
                    for c in self.clients:
                        if c.running and now - c.sent_ns > ANSWER_TIMEOUT_NS:
                            self.error(c, f"no answer within {ANSWER_TIMEOUT_NS // SECOND_NS} s")
                            self.drop(c, sel)
                            active -= 1
        finally:
            sel.close()

    def result(self, cpu_seconds: float) -> WorkerResult:
        conns: list[ConnResult] = []
        jobs: dict[str, int] = {}
        for c in self.clients:
            ordered = sorted(c.latencies)
            conns.append(
                ConnResult(
                    c.index,
                    len(ordered),
                    percentile(ordered, 0.99),
                    ordered[-1] if ordered else 0.0,
                    c.per_second,
                    c.alive,
                )
            )
            jobs.update(c.jobs)
        return WorkerResult(
            conns,
            {kind: values.tobytes() for kind, values in self.latencies.items()},
            self.in_window,
            self.errors,
            self.messages,
            cpu_seconds,
            jobs,
        )


def client_worker(
    pipe: Pipe,
    port: int,
    first: int,
    count: int,
    seconds: int,
    width: int,
    wave: int,
    jobs: dict[str, int],
) -> None:
    """A client process: connect ``count`` sockets, run the loop when told, report.

    ``jobs`` are the jobs an earlier wave left in the daemon (id -> time): each
    connection starts out knowing those of its prefix.
    """
    socks: list[socket.socket] = []
    try:
        die_with_parent()
        _raise_nofile(count + 64)
        clients: list[_Client] = []
        by_prefix: dict[str, dict[str, int]] = {}
        for j, ns in jobs.items():
            by_prefix.setdefault(j[: j.index(".") + 1], {})[j] = ns
        connect_seconds: list[float] = []
        for i in range(first, first + count):
            t = time.monotonic()
            try:
                sock = socket.create_connection((HOST, port), timeout=CONNECT_TIMEOUT)
            except OSError as e:
                raise BenchError(
                    f"connecting client {i} (this worker had {len(socks)} of its {count}"
                    f" connections open) to {HOST}:{port} failed: {e!r}"
                ) from None
            connect_seconds.append(time.monotonic() - t)
            socks.append(sock)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            c = _Client(i, sock, f"c{i:0{width}d}.", random.Random(f"{wave}.{i}"))
            c.jobs = by_prefix.get(c.prefix, {})
            c.ids = list(c.jobs)
            clients.append(c)
        pipe.send(("connected", connect_seconds))
        if not pipe.poll(120.0):
            raise BenchError("no go from the benchmark within 120 s")
        message = pipe.recv()
        if message[0] != "go":
            return
        _, start_ns, end_ns = message
        loop = _Loop(clients, seconds)
        cpu0 = _cpu()
        loop.run(start_ns, end_ns)
        pipe.send(("result", loop.result(_cpu() - cpu0)))
    except BaseException as e:
        with contextlib.suppress(OSError):
            pipe.send(("error", f"{type(e).__name__}: {e}"))
    finally:
        for sock in socks:
            sock.close()
        pipe.close()
