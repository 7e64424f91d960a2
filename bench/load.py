"""``load1000``: 1,000 connections doing SET/GET/QUERY at once against one daemon.

Each connection is a closed loop (one request in flight, the next one sent when the
answer is in), so a request's latency is meaningful.  Connection ``i`` only touches its
own jobs ``c<i>.j00`` ... ``c<i>.j19``: it SETs them in turn (each time with a new due
time a day to a month ahead), GETs one it has set (the answer must be ``planned`` with
the exact time it set last), and one request in 20, at random, QUERYs its prefix
``c<i>.`` (the answer must be exactly its jobs).  Any other answer is an error.

The client runs in ``WORKERS`` processes (forked), each holding its share of the sockets
in one ``selectors`` loop, with ``RLIMIT_NOFILE`` raised to the hard limit.  The parent
process only coordinates and watches the daemon: STAT ``connections``, ``VmRSS`` and
``/proc/PID/fd`` before, during and after.  The same clients run twice (two waves, each
connecting anew): the first wave's "after" RSS is compared with a fresh daemon given the
same final jobs over one connection (the jobs the clients set stay in the daemon), and
the second wave must not add to it (what a leak per connection or request would do).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import resource
import selectors
import socket
import statistics
import subprocess
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait
from pathlib import Path

from bench.client import Connection, check_all_ok, pipeline, set_lines
from bench.common import DAY_NS, LOGFILE_FSYNC, MB, SECOND_NS, Context, percentile, rates
from bench.daemon import HOST, BenchError, Daemon, die_with_parent
from bench.report import Metric, at_least, at_most

#: Client processes; each holds ``connections / WORKERS`` sockets.
WORKERS = 2
#: Jobs per connection (``c0123.j00`` ... ``c0123.j19``), set again and again.
IDS_PER_CONNECTION = 20
#: One request in this many (at random) is a QUERY of the connection's prefix.
QUERY_EVERY = 20
#: A connect that takes longer than this fails the scenario.
CONNECT_TIMEOUT = 30.0
#: A connect slower than this was held up (a dropped SYN is sent again after 1 s).
SLOW_CONNECT = 0.5
#: A request unanswered this long counts as an error and ends its connection.
ANSWER_TIMEOUT_NS = 30 * SECOND_NS
#: After the clients leave: how long the daemon gets to close them (fd count polled).
CLOSE_TIMEOUT = 15.0
#: Then this long before the "after, settled" RSS reading (the same on the reference).
SETTLE_SECONDS = 5.0
#: How much more RSS than "before + the cost of the final jobs" still counts as flat.
RSS_TOLERANCE_MB = 4.0
#: How much RSS a second wave of the same clients may add.  With 1,000 clients RSS moved
#: by -0.9 to +1.2 MB from one wave to the next (malloc's heap; stale due-heap entries
#: between compactions), and five waves in a row stayed within 64.0-65.2 MB; a connection
#: takes about 8 kB at the peak, so leaking whole connections would add far more.
SECOND_WAVE_TOLERANCE_MB = 2.0
#: Error messages kept per worker (all errors are counted).
KEPT_ERRORS = 10

SET, GET, QUERY = 0, 1, 2
KINDS = ("SET", "GET", "QUERY")


# --------------------------------------------------------------------- the daemon's side


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


# --------------------------------------------------------------------------- the client


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


def _worker(
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


# --------------------------------------------------------------------------- the run


@dataclass(slots=True)
class Wave:
    """One run of all the clients against the daemon, and how the daemon looked."""

    connections: int
    seconds: int
    held: int  # STAT connections - 1 (the STAT connection itself) once all connected
    held_min: int  # the lowest STAT connections - 1 seen during the run
    connect_seconds: float  # until every client was connected
    connect_times: list[float]  # each connect() call
    listen_overflows: int  # TcpExt ListenOverflows during the connects (machine-wide)
    syn_retransmits: int  # TcpExt TCPSynRetrans during the connects (machine-wide)
    results: list[WorkerResult]
    rss_start: int
    rss_peak: int
    rss_after: int  # as soon as the daemon's fd count was back
    rss_settled: int  # SETTLE_SECONDS later
    fds_start: int
    fds_during: int
    fds_after: int
    fds_settled: int
    fds_leftover: str
    close_seconds: float
    daemon_cpu: float
    wall: float

    @property
    def jobs(self) -> dict[str, int]:
        """Every job the clients set last: id -> time."""
        return {j: ns for r in self.results for j, ns in r.jobs.items()}


def _collect(
    pipes: list[Pipe], want: str, deadline: float, on_wait: Callable[[], None] | None = None
) -> list[object]:
    """Receive one ``want`` message from every pipe (an ``error`` message raises)."""
    got: dict[int, object] = {}
    while len(got) < len(pipes):
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"the client workers did not report {want!r} in time")
        ready = wait([p for i, p in enumerate(pipes) if i not in got], min(left, 0.1))
        if on_wait is not None:
            on_wait()
        for p in ready:
            assert isinstance(p, Pipe)
            try:
                tag, value = p.recv()
            except EOFError:
                raise BenchError(f"a client worker died before reporting {want!r}") from None
            if tag == "error":
                raise BenchError(f"client worker: {value}")
            got[pipes.index(p)] = value
    return [got[i] for i in range(len(pipes))]


def run_wave(
    ctx: Context, d: Daemon, connections: int, seconds: int, wave: int, jobs: dict[str, int]
) -> Wave:
    """Connect ``connections`` clients, run them ``seconds`` s, watch the daemon throughout.

    ``jobs`` are what earlier waves left in the daemon (id -> time).
    """
    pid = d.pid
    fds_start = fd_count(pid)
    rss_start = d.rss_bytes()
    mp = multiprocessing.get_context("fork")
    width = max(4, len(str(connections - 1)))
    share = -(-connections // WORKERS)
    pipes: list[Pipe] = []
    procs: list[multiprocessing.process.BaseProcess] = []
    for w in range(WORKERS):
        first = w * share
        count = min(share, connections - first)
        if count <= 0:
            break
        mine, theirs = mp.Pipe()
        proc = mp.Process(
            target=_worker,
            args=(theirs, d.port, first, count, seconds, width, wave, jobs),
            name=f"bench-load-{w}",
            daemon=True,
        )
        proc.start()
        theirs.close()
        pipes.append(mine)
        procs.append(proc)
    try:
        t0 = time.monotonic()
        tcp0 = tcp_counters()
        connected = _collect(pipes, "connected", t0 + 120.0)
        connect_seconds = time.monotonic() - t0
        tcp1 = tcp_counters()
        connect_times = sorted(x for times in connected if isinstance(times, list) for x in times)
        stat_conn = Connection(d.port)
        held = 0
        for _ in range(500):  # the daemon may not have accepted the last ones yet
            held = int(stat_conn.stat()["connections"]) - 1
            if held >= connections:
                break
            time.sleep(0.01)
        fds_during = fd_count(pid)
        ctx.say(
            f"{connections} clients connected in {connect_seconds:.2f} s (slowest connect"
            f" {connect_times[-1]:.2f} s); STAT connections"
            f" says {held} (+1 for STAT); daemon fds {fds_start} -> {fds_during}"
        )
        rss_peak = d.rss_bytes()
        held_min = held
        cpu0 = d.cpu_seconds()
        start_ns = time.monotonic_ns() + SECOND_NS // 5
        end_ns = start_ns + seconds * SECOND_NS
        for p in pipes:
            p.send(("go", start_ns, end_ns))
        last_stat = time.monotonic()

        def watch() -> None:
            nonlocal rss_peak, held_min, last_stat
            try:
                rss_peak = max(rss_peak, d.rss_bytes())
            except (OSError, BenchError):
                raise BenchError(
                    f"the daemon (pid {pid}) went away during the run; the end of its log:\n"
                    f"{d.log_text()[-2000:]}"
                ) from None
            now = time.monotonic()
            if now - last_stat >= 1.0 and time.monotonic_ns() < end_ns:
                last_stat = now
                held_min = min(held_min, int(stat_conn.stat()["connections"]) - 1)

        results = _collect(
            pipes, "result", time.monotonic() + seconds + ANSWER_TIMEOUT_NS / 1e9 + 60, watch
        )
        daemon_cpu = d.cpu_seconds() - cpu0
        wall = (time.monotonic_ns() - start_ns) / 1e9
        for worker in procs:
            worker.join(30)
        stat_conn.close()
    finally:
        for p in pipes:
            with contextlib.suppress(OSError):
                p.send(("stop",))
            p.close()
        for worker in procs:
            if worker.is_alive():
                worker.kill()
                worker.join(5)

    fds_after, close_seconds = wait_fds(pid, fds_start, CLOSE_TIMEOUT)
    rss_after = d.rss_bytes()
    ctx.say(
        f"clients gone: daemon fds {fds_after} after {close_seconds:.2f} s"
        f" (before: {fds_start}); RSS {rss_after / MB:.1f} MB; settling {SETTLE_SECONDS:.0f} s"
    )
    time.sleep(SETTLE_SECONDS)
    rss_settled = d.rss_bytes()
    fds_settled = fd_count(pid)
    leftover = ""
    if fds_settled > fds_start:
        leftover = ", ".join(f"{n} {kind}" for kind, n in fd_kinds(pid).most_common())
    return Wave(
        connections,
        seconds,
        held,
        held_min,
        connect_seconds,
        connect_times,
        tcp1.get("ListenOverflows", 0) - tcp0.get("ListenOverflows", 0),
        tcp1.get("TCPSynRetrans", 0) - tcp0.get("TCPSynRetrans", 0),
        [r for r in results if isinstance(r, WorkerResult)],
        rss_start,
        rss_peak,
        rss_after,
        rss_settled,
        fds_start,
        fds_during,
        fds_after,
        fds_settled,
        leftover,
        close_seconds,
        daemon_cpu,
        wall,
    )


@dataclass(slots=True)
class LoadRun:
    """The whole scenario on one daemon: two waves of the same clients, then checks."""

    nofile: tuple[int, int]
    rss_before: int
    fds_before: int
    waves: list[Wave]
    hwm: int
    jobs: dict[str, int]
    jobs_wrong: list[str]
    stat_after: dict[str, str]
    query_idle_us: float  # QUERY of one connection's prefix on the idle daemon afterwards
    get_idle_us: float
    backlog: int | None  # the daemon's listen queue length
    log_problems: list[str]  # the daemon's warn/error/critical log lines


def run_load(ctx: Context, d: Daemon, connections: int, seconds: int) -> LoadRun:
    """Two waves of ``connections`` clients for ``seconds`` s each, on daemon ``d``.

    The second wave reuses the same job ids, so the job table does not grow: whatever
    RSS it adds over the first wave's "after" is memory the daemon did not give back
    or reuse (a leak per connection or per request).
    """
    pid = d.pid
    soft, hard = nofile_limits(pid)
    if soft != resource.RLIM_INFINITY and soft < connections + 256:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
        ctx.say(f"raised the daemon's open-files limit from {soft} to {hard}")
    nofile = nofile_limits(pid)
    backlog = listen_backlog(d.port)
    warm_up(d.port)
    time.sleep(0.5)  # let the daemon close the warm-up connection
    fds_before = fd_count(pid)
    rss_before = d.rss_bytes()
    waves: list[Wave] = []
    for k in range(2):
        ctx.say(f"wave {k + 1} of 2")
        waves.append(run_wave(ctx, d, connections, seconds, k, waves[-1].jobs if waves else {}))
    hwm = d.status_kb("VmHWM") * 1024
    expected = waves[-1].jobs
    found = query_all(d.port, "c")
    wrong = [
        f"{j}: expected planned {ns}, daemon has {found.get(j)}"
        for j, ns in expected.items()
        if found.get(j) != ("planned", ns)
    ]
    wrong += [f"{j}: unexpected job {found[j]}" for j in found.keys() - expected.keys()]
    conn = Connection(d.port)
    stat_after = conn.stat()
    conn.close()
    some = min(expected)
    query_us, get_us = idle_round_trips(d.port, some.split(".")[0] + ".", some, 200)
    return LoadRun(
        nofile,
        rss_before,
        fds_before,
        waves,
        hwm,
        expected,
        wrong,
        stat_after,
        query_us,
        get_us,
        backlog,
        [
            line
            for line in d.log_text().splitlines()
            if any(f"#{level}]" in line for level in ("warn", "error", "critical"))
        ],
    )


def reference_rss(ctx: Context, jobs: dict[str, int]) -> tuple[int, int]:
    """RSS of a fresh daemon before and after the same jobs are SET over one connection."""
    with Daemon(ctx.workdir("load1000-reference"), LOGFILE_FSYNC) as d:
        warm_up(d.port)
        time.sleep(0.5)
        fds_before = fd_count(d.pid)
        before = d.rss_bytes()
        ids = list(jobs)
        answers = pipeline(d.port, set_lines(ids, [jobs[j] for j in ids]), len(ids))
        check_all_ok(answers, len(ids), "reference SETs")
        wait_fds(d.pid, fds_before, CLOSE_TIMEOUT)
        time.sleep(SETTLE_SECONDS)
        return before, d.rss_bytes()


# --------------------------------------------------------------------------- figures


def _ms(us: float) -> float:
    return us / 1000


def load1000(ctx: Context) -> list[Metric]:
    """Run the scenario and turn it into figures."""
    connections = 200 if ctx.quick else 1000
    seconds = 5 if ctx.quick else 30
    with Daemon(ctx.workdir("load1000"), LOGFILE_FSYNC) as d:
        run = run_load(ctx, d, connections, seconds)
    ref_before, ref_after = reference_rss(ctx, run.jobs)
    return _metrics(ctx, run, ref_before, ref_after)


def _metrics(ctx: Context, run: LoadRun, ref_before: int, ref_after: int) -> list[Metric]:
    first, last = run.waves[0], run.waves[-1]
    n, seconds, waves = first.connections, first.seconds, len(run.waves)
    results = [r for w in run.waves for r in w.results]
    by_kind: dict[int, list[float]] = {SET: [], GET: [], QUERY: []}
    for r in results:
        for kind, raw in r.latencies_us.items():
            samples = array("d")
            samples.frombytes(raw)
            by_kind[kind] += samples
    everything = sorted(v for values in by_kind.values() for v in values)
    for values in by_kind.values():
        values.sort()
    in_window = sum(r.in_window for r in results)
    rates_each = [sum(r.in_window for r in w.results) / w.seconds for w in run.waves]
    rate = in_window / (seconds * waves)
    errors = sum(r.errors for r in results) + len(run.jobs_wrong)
    messages = [m for r in results for m in r.messages] + run.jobs_wrong[:KEPT_ERRORS]
    client_cpu = sum(r.cpu_seconds for r in results)
    daemon_cpu = sum(w.daemon_cpu for w in run.waves)
    wall = sum(w.wall for w in run.waves)

    # Per connection (the same index in every wave is the same client).
    answered: Counter[int] = Counter()
    p99s: dict[tuple[int, int], ConnResult] = {}
    idle_seconds = 0
    idle_by_second: Counter[tuple[int, int]] = Counter()
    min_per_second = min(min(c.per_second) for r in results for c in r.conns)
    starved: set[int] = set()
    dead: set[int] = set()
    for k, w in enumerate(run.waves):
        for r in w.results:
            for c in r.conns:
                answered[c.index] += c.answered
                p99s[(k, c.index)] = c
                idle = sum(1 for x in c.per_second if x == 0)
                for second, x in enumerate(c.per_second):
                    if x == 0:
                        idle_by_second[(k, second)] += 1
                idle_seconds += idle
                if idle:
                    starved.add(c.index)
                if not c.alive:
                    dead.add(c.index)
    counts = sorted(answered.values())
    median_count = statistics.median(counts)
    slowest = min(answered, key=lambda i: answered[i])
    (worst_wave, _), worst = max(p99s.items(), key=lambda kv: kv[1].p99_us)

    jobs = len(run.jobs)
    job_cost = ref_after - ref_before
    allowed = run.rss_before + job_cost + RSS_TOLERANCE_MB * MB
    residual = first.rss_settled - run.rss_before - job_cost
    rss_peak = max(w.rss_peak for w in run.waves)
    per_conn_peak = (first.rss_peak - run.rss_before - job_cost) / n
    growth = last.rss_settled - first.rss_settled
    wave2_requests = sum(c.answered for r in last.results for c in r.conns)

    ctx.say(
        f"load: {rate:,.0f} req/s; p50 {_ms(percentile(everything, 0.5)):.1f} ms, p99"
        f" {_ms(percentile(everything, 0.99)):.1f} ms, max {_ms(everything[-1]):.0f} ms;"
        f" errors {errors}; RSS {run.rss_before / MB:.1f} -> peak {rss_peak / MB:.1f} ->"
        f" {first.rss_settled / MB:.1f} -> {last.rss_settled / MB:.1f} MB (jobs alone:"
        f" {job_cost / MB:.1f} MB); fds {run.fds_before} -> {first.fds_during} ->"
        f" {first.fds_settled} -> {last.fds_settled}"
    )
    for m in messages:
        ctx.say(f"  error: {m}")

    what = (
        f"{n:,} connections to one daemon ({LOGFILE_FSYNC.describe()}, other settings"
        f" default), each a closed loop (one request in flight) for {seconds} s, twice"
        f" ({waves} waves of the same clients, reconnecting): SET of its own"
        f" {IDS_PER_CONNECTION} job ids `c0123.j00`...`.j{IDS_PER_CONNECTION - 1:02d}` in turn"
        f" with a new random time 1-30 days ahead, GET of a job it has set (must answer"
        f" `planned` and the time it set last), and at random one request in {QUERY_EVERY} a"
        f" QUERY of its prefix (must list exactly its jobs). Client: {WORKERS} forked"
        f" processes, one `selectors` loop each, RLIMIT_NOFILE raised to the hard limit;"
        f" daemon open-files limit {run.nofile[0]:,}. Figures over both waves unless said."
    )
    lat = "; ".join(
        f"{KINDS[k]} {len(v):,} requests p50 {_ms(percentile(v, 0.5)):.1f} ms p99"
        f" {_ms(percentile(v, 0.99)):.1f} ms max {_ms(v[-1]) if v else 0:.0f} ms"
        for k, v in by_kind.items()
    )
    backlog = f"{run.backlog}" if run.backlog is not None else "unknown"
    connects = (
        "; ".join(
            f"wave {k + 1}: connect() p50 {1000 * percentile(w.connect_times, 0.5):.2f} ms,"
            f" slowest {w.connect_times[-1]:.2f} s,"
            f" {sum(1 for t in w.connect_times if t > SLOW_CONNECT):,} over {SLOW_CONNECT} s,"
            f" kernel ListenOverflows +{w.listen_overflows:,} and TCPSynRetrans"
            f" +{w.syn_retransmits:,} meanwhile"
            for k, w in enumerate(run.waves)
        )
        + f"; the daemon's listen queue holds {backlog} (ss Send-Q)"
    )
    error_text = (
        "none"
        if not errors
        else f"{errors} ({'; '.join(messages[:5])}{'...' if len(messages) > 5 else ''})"
    )
    return [
        Metric(
            "load1000",
            "load_connections_held",
            f"load: connections held at once ({n:,} clients)",
            min(w.held for w in run.waves),
            "connections",
            at_least(n),
            "",
            f"{what} In each wave all {n:,} connected before the run started (in"
            f" {' / '.join(f'{w.connect_seconds:.2f}' for w in run.waves)} s: {connects});"
            f" figure = the"
            f" daemon's STAT `connections` then, minus the STAT connection itself (per wave:"
            f" {' / '.join(f'{w.held:,}' for w in run.waves)}; the lowest value seen once a"
            f" second during the runs: {min(w.held_min for w in run.waves):,}).",
        ),
        Metric(
            "load1000",
            "load_requests_per_s",
            f"load: requests/s, {n:,} connections x 1 in flight (SET/GET/QUERY)",
            rate,
            "req/s",
            None,
            "",
            f"Answers received during the runs / their length ({in_window:,} in"
            f" {waves} x {seconds} s; per wave {rates(rates_each)}/s). Daemon CPU"
            f" {100 * daemon_cpu / wall:.0f}% of one core, client CPU"
            f" {100 * client_cpu / wall:.0f}% of one core (all worker processes). Every"
            f" request's latency, pooled: {lat}. Afterwards, on the idle daemon holding the"
            f" {len(run.jobs):,} jobs, one connection alternating 200 QUERYs of one"
            f" connection's prefix ({IDS_PER_CONNECTION} jobs) with 200 GETs: QUERY p50"
            f" {_ms(run.query_idle_us):.2f} ms, GET p50 {_ms(run.get_idle_us):.2f} ms"
            f" round trip.",
        ),
        Metric(
            "load1000",
            "load_p50_ms",
            "load: latency p50, all requests",
            _ms(percentile(everything, 0.5)),
            "ms",
            None,
            "",
            "",
        ),
        Metric(
            "load1000",
            "load_p99_ms",
            "load: latency p99, all requests",
            _ms(percentile(everything, 0.99)),
            "ms",
            None,
            "",
            "From sending a request to having its whole answer (client clock,"
            " time.monotonic_ns), over every request of every connection.",
        ),
        Metric(
            "load1000",
            "load_max_ms",
            "load: latency max, all requests",
            _ms(everything[-1]),
            "ms",
            None,
            "",
            "",
        ),
        Metric(
            "load1000",
            "load_worst_conn_p99_ms",
            "load: worst per-connection latency p99",
            _ms(worst.p99_us),
            "ms",
            None,
            "",
            f"p99 of each connection's own requests in each wave; the worst is connection"
            f" {worst.index} in wave {worst_wave + 1} ({worst.answered:,} requests, its max"
            f" {_ms(worst.max_us):.0f} ms); the median connection's p99 is"
            f" {_ms(statistics.median(c.p99_us for c in p99s.values())):.1f} ms.",
        ),
        Metric(
            "load1000",
            "load_slowest_vs_median",
            "load: requests of the slowest connection / the median connection",
            answered[slowest] / median_count,
            "x",
            None,
            "",
            f"Requests answered per connection over both waves: slowest (connection"
            f" {slowest}) {answered[slowest]:,}, median {median_count:,.0f}, busiest"
            f" {counts[-1]:,}.",
        ),
        Metric(
            "load1000",
            "load_idle_connection_seconds",
            "load: connection-seconds without an answer (starvation)",
            idle_seconds,
            "conn-s",
            at_most(0),
            "",
            f"Each connection's answers counted per second of each run ({n:,} x"
            f" {seconds} x {waves} = {n * seconds * waves:,} connection-seconds); figure = how"
            f" many got no answer at all; the fewest answers any connection got in any"
            f" second: {min_per_second}."
            + (
                " Connections without an answer, by wave and second of the run: "
                + ", ".join(
                    f"wave {w + 1} second {sec + 1}: {count:,}"
                    for (w, sec), count in sorted(idle_by_second.items())[:12]
                )
                + f" ({len(starved):,} connections concerned)."
                if starved
                else ""
            )
            + (f" Connections that failed: {sorted(dead)[:20]}." if dead else ""),
        ),
        Metric(
            "load1000",
            "load_errors",
            "load: wrong or missing answers",
            errors,
            "errors",
            at_most(0),
            "",
            f"Every answer checked: SET `OK`; GET `OK planned <the time set last>`; QUERY"
            f" exactly the connection's jobs with their times, then `OK`; a closed"
            f" connection, a failed send or {ANSWER_TIMEOUT_NS // SECOND_NS} s without an"
            f" answer count too. After the waves one QUERY of `c` compared all {jobs:,} jobs"
            f" with what the clients set last (STAT jobs_total"
            f" {run.stat_after.get('jobs_total')}). Errors: {error_text}. The daemon's log"
            f" had {len(run.log_problems)} warn/error lines"
            + (f", the first: {run.log_problems[0][:300]!r}." if run.log_problems else "."),
        ),
        Metric(
            "load1000",
            "load_rss_before_mb",
            "load: daemon RSS before the clients connect",
            run.rss_before / MB,
            "MB",
            None,
            "",
            "VmRSS from /proc/PID/status (1 MB = 10^6 bytes), after one STAT connection"
            " came and went, before the clients connected.",
        ),
        Metric(
            "load1000",
            "load_rss_peak_mb",
            "load: daemon RSS during the runs (peak)",
            rss_peak / MB,
            "MB",
            None,
            "",
            f"Largest VmRSS sampled every 0.1 s while the clients ran (per wave"
            f" {' / '.join(f'{w.rss_peak / MB:.1f}' for w in run.waves)} MB; the kernel's"
            f" VmHWM says {run.hwm / MB:.1f} MB). Less the jobs' share, the first wave's peak"
            f" is about {per_conn_peak / 1000:.1f} kB per connection.",
        ),
        Metric(
            "load1000",
            "load_rss_after_mb",
            "load: daemon RSS after the clients left (first wave, 5 s settle)",
            first.rss_settled / MB,
            "MB",
            at_most(allowed / MB),
            "",
            f"VmRSS once the daemon's fd count was back (after {first.close_seconds:.2f} s:"
            f" {first.rss_after / MB:.1f} MB) and {SETTLE_SECONDS:.0f} s later (the"
            f" figure). The clients' {jobs:,} jobs stay in the daemon, so the target is"
            f" before + what the same jobs cost a fresh daemon when SET over one connection"
            f" ({ref_before / MB:.1f} -> {ref_after / MB:.1f} MB: {job_cost / MB:.2f} MB,"
            f" {job_cost / max(1, jobs):.0f} B per job) + {RSS_TOLERANCE_MB:.0f} MB; the"
            f" daemon kept {residual / MB:+.2f} MB over before + jobs. The tolerance is"
            f" for memory that is not a leak: up to {2 * jobs + 4096:,} stale due-heap"
            f" entries that re-SETting leaves until the next compaction (about 60 B each),"
            f" and what the allocators keep of the connections' freed memory (pymalloc"
            f" arenas, malloc's heap). The next figure tells memory kept for reuse from a"
            f" leak.",
        ),
        Metric(
            "load1000",
            "load_rss_second_wave_mb",
            "load: RSS added by a second wave of the same clients",
            growth / MB,
            "MB",
            at_most(SECOND_WAVE_TOLERANCE_MB),
            "",
            f"VmRSS after the second wave (same {n:,} clients reconnecting, same job ids, so"
            f" the job table does not grow; 5 s settle) minus after the first:"
            f" {first.rss_settled / MB:.2f} -> {last.rss_settled / MB:.2f} MB. Memory the"
            f" daemon keeps but reuses does not grow again; a leak would: the limit is"
            f" {SECOND_WAVE_TOLERANCE_MB * MB / n / 1000:.1f} kB per connection or"
            f" {SECOND_WAVE_TOLERANCE_MB * MB / max(1, wave2_requests):.0f} B per request"
            f" of the second wave ({wave2_requests:,} requests), against about"
            f" {per_conn_peak / 1000:.0f} kB per connection at the peak.",
        ),
        Metric(
            "load1000",
            "load_fds_after",
            "load: daemon open fds after all clients left",
            last.fds_settled,
            "fds",
            at_most(run.fds_before),
            "",
            f"len(os.listdir('/proc/PID/fd')): {run.fds_before} before the clients"
            f" connected, {first.fds_during:,} with them connected; once they had left"
            f" (polled every 10 ms) {' / '.join(str(w.fds_after) for w in run.waves)}"
            f" per wave, back after {' / '.join(f'{w.close_seconds:.2f}' for w in run.waves)}"
            f" s, and {' / '.join(str(w.fds_settled) for w in run.waves)}"
            f" {SETTLE_SECONDS:.0f} s later."
            + "".join(
                f" Left open after wave {k + 1}: {w.fds_leftover}."
                for k, w in enumerate(run.waves)
                if w.fds_leftover
            ),
        ),
    ]
