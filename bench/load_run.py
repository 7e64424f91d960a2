"""``load1000``'s run: the waves of clients against one daemon, and the reference daemon.

A wave: the client workers started, connected, let go and collected while the daemon is
watched.  Two waves on one daemon, then the reference daemon given the same jobs.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from multiprocessing.connection import wait

from bench.client import Connection, check_all_ok, pipeline, set_lines
from bench.common import LOGFILE_FSYNC, MB, SECOND_NS, Context
from bench.daemon import BenchError, Daemon
from bench.load_clients import ANSWER_TIMEOUT_NS, WorkerResult, client_worker
from bench.load_watch import (
    fd_count,
    fd_kinds,
    idle_round_trips,
    listen_backlog,
    nofile_limits,
    query_all,
    tcp_counters,
    wait_fds,
    warm_up,
)

#: Client processes; each holds ``connections / WORKERS`` sockets.
WORKERS = 2
#: After the clients leave: how long the daemon gets to close them (fd count polled).
CLOSE_TIMEOUT = 15.0
#: Then this long before the "after, settled" RSS reading (the same on the reference).
SETTLE_SECONDS = 5.0


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
            target=client_worker,
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
