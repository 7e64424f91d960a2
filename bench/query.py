"""QUERY on a daemon holding a million jobs (issue 9, targets 1 and 2).

``query_memory``: one client sends ``QUERY`` (every job) with a 4,000-byte request id, so
the answer is ~4 GB (each of the 1,000,000 lines repeats the id), and reads it slowly: it
reads nothing for ``STALL_SECONDS``, then at most ``READ_RATE`` bytes a second through a
small receive buffer.  The figure is the daemon's peak RSS growth over the query: its peak
(``VmHWM``) is reset through ``/proc/PID/clear_refs`` before the query and read after it,
and ``VmRSS`` is sampled every 20 ms meanwhile.  A daemon that grows past
``RSS_KILL_BYTES`` is killed and the scenario reports how far it got.

``query_stall``: on a daemon holding 1,000,000 jobs, (b) a full ``QUERY`` read as fast as
the client can while a second connection sends one ``GET`` every 2 ms (its round trips are
the figure) and (c) a job is due 0.5 s after the QUERY was sent (its trigger lag, from
STAT, is the figure; the daemon has run no other job); then (a) 400 pipelined
``QUERY nomatch.`` on one connection.  A fresh daemon per run.

Both daemons replay a logfile written directly with the daemon's codec
(``bench.common.write_logfile``: one rule, ``job.0000001``... planned over the next 30
days), written once per benchmark run and copied for each daemon.  The scenarios talk to
the daemon over TCP only, so they measure whatever the daemon does.
"""

from __future__ import annotations

import contextlib
import resource
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import Connection, check_all_ok, pipeline
from bench.common import MB, SECOND_NS, Context, percentile, quote, wait_for_runs, write_logfile
from bench.daemon import HOST, BenchError, Daemon, DaemonSettings
from bench.report import Metric, at_most

#: Jobs held by the daemon (``--quick``: ``QUICK_JOBS``).
JOBS = 1_000_000
QUICK_JOBS = 100_000
#: Bytes of the request id of ``query_memory``'s QUERY (its line stays under 4,096 bytes).
REQUEST_ID_BYTES = 4_000
#: ``query_memory``'s reader: nothing for this long after sending, then paced.
STALL_SECONDS = 2.0
READ_RATE = 100_000_000  # bytes per second
#: Its receive buffer (the kernel doubles it) and its reads.
SLOW_RCVBUF = 64 * 1024
SLOW_READ_BYTES = 64 * 1024
#: RSS sampling interval, and the RSS at which a daemon is killed (the machine's safety).
SAMPLE_SECONDS = 0.02
RSS_KILL_BYTES = 4 << 30
#: The daemon's address space is capped at this (``prlimit``), in case sampling is late.
ADDRESS_SPACE_LIMIT = 6 << 30
#: Deadlines (seconds).
START_TIMEOUT = 120.0
QUERY_DEADLINE = 240.0
FULL_QUERY_DEADLINE = 120.0
NOMATCH_DEADLINE = 180.0
RUN_DEADLINE = 60.0
#: ``query_stall``: pipelined no-match QUERYs, GET interval, the due job's offset from
#: the QUERY's send with 1M jobs (scaled with the job count: 50 ms with ``--quick``).
NOMATCH_QUERIES = 400
GET_INTERVAL = 0.002
DUE_AFTER_NS = 500_000_000
#: Target thresholds (issue 9).
TARGET_GROWTH_MB = 50
TARGET_NOMATCH_MS = 50
TARGET_GET_P99_MS = 20
TARGET_LAG_MS = 5

FAST_BUFFER = 4 << 20
#: A planned job's line: `` job.0000001 planned <19-digit ns>\n`` after the request id.
_LINE_TAIL = len(" job.0000001 planned 1234567890123456789\n")

LOGFILE = DaemonSettings(persistence="logfile", fsync=True)
STAMPING = DaemonSettings(persistence="logfile", fsync=True, shell_path="/bin/bash")

_sources: dict[tuple[Path, int], Path] = {}


def _jobs(ctx: Context) -> int:
    return QUICK_JOBS if ctx.quick else JOBS


def _source(ctx: Context, n: int) -> Path:
    """The logfile of ``n`` planned jobs, written once per benchmark run."""
    key = (ctx.root, n)
    if key not in _sources:
        path = ctx.workdir("query-source") / "logfile"
        t = time.perf_counter()
        size = write_logfile(path, n)
        ctx.say(f"wrote {n:,} jobs ({size / MB:.0f} MB) in {time.perf_counter() - t:.1f} s")
        _sources[key] = path
    return _sources[key]


@contextlib.contextmanager
def _holding(ctx: Context, name: str, n: int, settings: DaemonSettings) -> Iterator[Daemon]:
    """A daemon that replayed ``n`` planned jobs from a copy of the shared logfile."""
    workdir = ctx.workdir(name)
    shutil.copyfile(_source(ctx, n), workdir / "logfile")
    d = Daemon(workdir, settings).start(timeout=START_TIMEOUT)
    try:
        loaded = d.loaded_line()
        if loaded.jobs != n:
            raise BenchError(f"the daemon loaded {loaded.jobs:,} jobs, expected {n:,}")
        yield d
    finally:
        d.stop()


class RssWatch(threading.Thread):
    """Samples a daemon's ``VmRSS``; kills the daemon if it passes ``limit`` bytes."""

    def __init__(self, daemon: Daemon, limit: int) -> None:
        super().__init__(name="bench-rss", daemon=True)
        self.daemon_ = daemon
        self.limit = limit
        self.peak = 0
        self.killed_at: int | None = None  # RSS when the daemon was killed
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                rss = self.daemon_.rss_bytes()
            except (OSError, BenchError):
                return  # the daemon is gone
            self.peak = max(self.peak, rss)
            if rss > self.limit:
                self.killed_at = rss
                self.daemon_.kill()
                return
            self._stop_event.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(10)


def _reset_peak(d: Daemon) -> None:
    """Reset the daemon's ``VmHWM`` to its current RSS (Linux ``clear_refs`` 5)."""
    Path(f"/proc/{d.pid}/clear_refs").write_text("5")


@dataclass(slots=True)
class _Read:
    """What ``query_memory``'s reader got."""

    total: int = 0
    lines: int = 0
    first: bytes = b""
    tail: bytes = b""
    seconds: float = 0.0
    ended: str = ""  # why reading stopped: "OK", "closed", "deadline"


def _slow_read(port: int, request: bytes, expected_lines: int, deadline: float) -> _Read:
    """Send ``request``; read nothing for a while, then at most ``READ_RATE`` bytes/s."""
    got = _Read()
    buf = bytearray(SLOW_READ_BYTES)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        sock.settimeout(10.0)
        sock.connect((HOST, port))
        start = time.perf_counter()
        sock.sendall(request)
        time.sleep(STALL_SECONDS)
        paced = time.perf_counter()
        sock.settimeout(max(1.0, deadline - paced))
        while got.lines < expected_lines:
            try:
                n = sock.recv_into(buf)
            except TimeoutError:
                got.ended = "deadline"
                break
            if n == 0:
                got.ended = "closed"
                break
            if not got.first:
                got.first = bytes(buf[:64])
            got.total += n
            got.lines += buf.count(b"\n", 0, n)
            got.tail = (got.tail + bytes(buf[max(0, n - 64) : n]))[-64:]
            now = time.perf_counter()
            if now > deadline:
                got.ended = "deadline"
                break
            ahead = got.total / READ_RATE - (now - paced)
            if ahead > 0:
                time.sleep(ahead)
        else:
            got.ended = "OK"
        got.seconds = time.perf_counter() - start
    finally:
        sock.close()
    return got


def scenario_query_memory(ctx: Context) -> list[Metric]:
    """Issue 9: daemon peak RSS growth, QUERY of 1M jobs, 4 KB id, slow reader (< 50 MB)."""
    n = _jobs(ctx)
    rid = "q" * REQUEST_ID_BYTES
    request = f"{rid} QUERY\n".encode()
    expected_bytes = n * (len(rid) + _LINE_TAIL) + len(rid) + len(" OK\n")
    with _holding(ctx, "query-memory", n, LOGFILE) as d:
        with contextlib.suppress(ValueError, OSError):  # a guard only: best effort
            resource.prlimit(d.pid, resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT,) * 2)
        _reset_peak(d)
        rss0 = d.rss_bytes()
        watch = RssWatch(d, RSS_KILL_BYTES)
        watch.start()
        try:
            got = _slow_read(d.port, request, n + 1, time.perf_counter() + QUERY_DEADLINE)
        finally:
            watch.stop()
        alive = watch.killed_at is None
        hwm = 0  # unreadable once the daemon is gone (killed, or died by itself)
        with contextlib.suppress(OSError, BenchError):
            hwm = d.status_kb("VmHWM") * 1024
        peak = max(watch.peak, hwm)
        log_tail = d.log_text()[-300:] if not alive or got.ended != "OK" else ""
    growth = (peak - rss0) / MB
    complete = got.ended == "OK" and got.tail.endswith(rid[-32:].encode() + b" OK\n")
    if got.ended == "OK" and (got.lines != n + 1 or not got.first.startswith(rid[:60].encode())):
        raise BenchError(f"QUERY answered {got.lines:,} lines, expected {n + 1:,}")
    if complete and got.total != expected_bytes:
        raise BenchError(f"QUERY answered {got.total:,} bytes, expected {expected_bytes:,}")
    if watch.killed_at is not None:
        outcome = (
            f"The daemon was KILLED by the benchmark when its RSS reached"
            f" {watch.killed_at / MB:,.0f} MB, {got.seconds:.1f} s after the QUERY was sent,"
            f" with {got.lines:,} lines ({got.total / MB:,.0f} MB) of the answer read."
        )
    elif not complete:
        outcome = (
            f"The answer did not complete ({got.ended}) after {got.seconds:.1f} s:"
            f" {got.lines:,} lines ({got.total / MB:,.0f} MB) read; daemon log ends"
            f" {log_tail!r}."
        )
    else:
        outcome = (
            f"Answer complete: {got.lines:,} lines ({n:,} jobs + OK), {got.total:,} bytes,"
            f" in {got.seconds:.1f} s ({got.total / MB / got.seconds:.0f} MB/s overall)."
        )
    ctx.say(f"query_memory: RSS {rss0 / MB:.0f} MB, peak growth {growth:,.1f} MB. {outcome}")
    how = (
        f"A daemon holding {n:,} planned jobs (replayed from a logfile, fsync on);"
        f" one client sends `QUERY` with a {REQUEST_ID_BYTES:,}-byte request id (a"
        f" {len(request):,}-byte line), so every answer line repeats the id"
        f" ({expected_bytes / MB:,.0f} MB in all), through a {SLOW_RCVBUF // 1024} KiB"
        f" SO_RCVBUF: it reads nothing for {STALL_SECONDS:.0f} s, then at most"
        f" {READ_RATE / MB:.0f} MB/s in {SLOW_READ_BYTES // 1024} KiB reads. Growth = peak"
        f" RSS during the query (VmHWM, reset with /proc/PID/clear_refs before it, and"
        f" VmRSS sampled every {SAMPLE_SECONDS * 1000:.0f} ms) - VmRSS before it"
        f" ({rss0 / MB:.0f} MB). {outcome} Guard: the daemon is killed at"
        f" {RSS_KILL_BYTES / MB:,.0f} MB RSS, its address space capped at"
        f" {ADDRESS_SPACE_LIMIT / MB:,.0f} MB."
    )
    metrics = [
        Metric(
            "query_memory",
            "query_memory_rss_growth_mb",
            f"daemon peak RSS growth, QUERY of {n:,} jobs, 4 KB id, slow reader",
            growth,
            "MB",
            at_most(TARGET_GROWTH_MB),
            "",
            how,
        )
    ]
    if complete:
        metrics += [
            Metric(
                "query_memory",
                "query_memory_seconds",
                f"that QUERY's answer ({got.total / MB:,.0f} MB): sent → `OK` read",
                got.seconds,
                "s",
                None,
                "",
                f"Includes the {STALL_SECONDS:.0f} s the reader waits before reading; the"
                f" reader is paced at {READ_RATE / MB:.0f} MB/s, so this is at least"
                f" {STALL_SECONDS + got.total / READ_RATE:.1f} s.",
            )
        ]
    return metrics


# ------------------------------------------------------------------------ query_stall


class GetSampler(threading.Thread):
    """One ``GET`` every ``GET_INTERVAL`` s on its own connection; round trips in ms."""

    def __init__(self, port: int, job_id: str) -> None:
        super().__init__(name="bench-get", daemon=True)
        self.conn = Connection(port, timeout=FULL_QUERY_DEADLINE)
        self.line = f"g GET {job_id}\n".encode()
        self.samples: list[float] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self.conn.roundtrip(self.line)  # connected and answering before the clock starts

    def run(self) -> None:
        clock = time.perf_counter
        try:
            next_at = clock()
            while not self._stop_event.is_set():
                t = clock()
                answer = self.conn.roundtrip(self.line)
                self.samples.append((clock() - t) * 1000)
                if not answer.startswith(b"g OK "):
                    raise BenchError(f"GET answered {answer!r}")
                next_at = max(next_at + GET_INTERVAL, clock())
                self._stop_event.wait(max(0.0, next_at - clock()))
        except BaseException as e:  # reported by the scenario
            self.error = e

    def stop(self) -> list[float]:
        self._stop_event.set()
        self.join(FULL_QUERY_DEADLINE)
        self.conn.close()
        if self.error is not None:
            raise BenchError(f"GET sampler failed: {self.error}")
        return self.samples


@dataclass(slots=True)
class _StallRun:
    nomatch_s: float = 0.0
    query_s: float = 0.0
    query_bytes: int = 0
    gets_ms: list[float] = field(default_factory=list)
    lag_ms: float = 0.0
    child_lag_ms: float = 0.0
    due_after_s: float = 0.0  # due time - QUERY sent
    due_before_end_s: float = 0.0  # QUERY's OK read - due time (> 0: due during it)


def _full_query(port: int, expected_lines: int) -> tuple[float, int]:
    """``f QUERY`` read as fast as this client can: (seconds, bytes)."""
    sock = socket.create_connection((HOST, port), timeout=10.0)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FAST_BUFFER)
        sock.settimeout(FULL_QUERY_DEADLINE)
        lines = total = 0
        tail = b""
        start = time.perf_counter()
        deadline = start + FULL_QUERY_DEADLINE
        sock.sendall(b"f QUERY\n")
        while lines < expected_lines:
            try:
                chunk = sock.recv(1 << 20)
            except TimeoutError:
                raise BenchError(f"full QUERY: {lines:,} lines after its deadline") from None
            if not chunk:
                raise BenchError(f"full QUERY: connection closed after {lines:,} lines")
            lines += chunk.count(b"\n")
            total += len(chunk)
            tail = (tail + chunk[-16:])[-16:]
            if time.perf_counter() > deadline:
                raise BenchError(f"full QUERY: {lines:,} lines after its deadline")
        seconds = time.perf_counter() - start
    finally:
        sock.close()
    if lines != expected_lines or not tail.endswith(b"\nf OK\n"):
        raise BenchError(f"full QUERY: {lines:,} lines ending {tail!r}")
    return seconds, total


def _stall_run(ctx: Context, n: int, run: int) -> _StallRun:
    """One fresh daemon: full QUERY with GETs and a due job, then the no-match QUERYs."""
    out = _StallRun()
    with _holding(ctx, "query-stall", n, STAMPING) as d:
        stamps = d.workdir / "stamps.txt"
        conn = Connection(d.port)
        command = f"echo $ZTICK_EXECUTION_NS ${{EPOCHREALTIME/./}} >> {stamps}"
        conn.command(f"RULE SET rule.due due. shell {quote(command)}")
        due_ns = time.time_ns() + DUE_AFTER_NS * n // JOBS
        conn.command(f"SET due.{run} {due_ns}")
        sampler = GetSampler(d.port, f"job.{n // 2:07d}")
        sampler.start()
        sent_ns = time.time_ns()
        try:
            out.query_s, out.query_bytes = _full_query(d.port, n + 2)  # + due.N, OK
        finally:
            out.gets_ms = sampler.stop()
        out.due_after_s = (due_ns - sent_ns) / SECOND_NS
        out.due_before_end_s = (sent_ns / SECOND_NS + out.query_s) - due_ns / SECOND_NS
        _, stat, _ = wait_for_runs(conn, 1, time.time() + RUN_DEADLINE, 0.02)
        if int(stat["jobs_failed"]):
            raise BenchError(f"the due job failed; see {d.workdir}/daemon.log")
        out.lag_ms = int(stat["trigger_lag_max_us"]) / 1000
        rows = [line.split() for line in stamps.read_text().splitlines()]
        if len(rows) != 1:
            raise BenchError(f"{len(rows)} stamps for 1 due job in {stamps}")
        out.child_lag_ms = (int(rows[0][1]) - int(rows[0][0]) // 1000) / 1000
        conn.close()

        payload = b"".join(f"n{i} QUERY nomatch.\n".encode() for i in range(NOMATCH_QUERIES))
        answers = pipeline(d.port, payload, NOMATCH_QUERIES, timeout=NOMATCH_DEADLINE)
        check_all_ok(answers, NOMATCH_QUERIES, "QUERY nomatch.")
        out.nomatch_s = answers.seconds
    gets = sorted(out.gets_ms)
    ctx.say(
        f"query_stall run {run + 1}: 400 x QUERY nomatch. {out.nomatch_s * 1000:.1f} ms;"
        f" full QUERY {out.query_s:.2f} s, {len(gets)} GETs meanwhile, max {gets[-1]:.1f} ms;"
        f" due job lag {out.lag_ms:.2f} ms (child {out.child_lag_ms:.2f} ms)"
    )
    return out


def scenario_query_stall(ctx: Context) -> list[Metric]:
    """Issue 9: 1M jobs: 400 x QUERY nomatch. (< 50 ms), GET p99 and a due job during a QUERY."""
    n = _jobs(ctx)
    runs = [_stall_run(ctx, n, r) for r in range(ctx.repeats)]
    gets = sorted(g for r in runs for g in r.gets_ms)
    nomatch_ms = [r.nomatch_s * 1000 for r in runs]
    lags = [r.lag_ms for r in runs]
    during = sum(1 for r in runs if r.due_before_end_s > 0)

    def each(values: list[float], digits: int = 1) -> str:
        return " / ".join(f"{v:.{digits}f}" for v in values)

    setup = (
        f"A fresh daemon per run holding {n:,} planned jobs (replayed from a logfile,"
        f" fsync on); {len(runs)} run(s)."
    )
    return [
        Metric(
            "query_stall",
            "query_nomatch_400_ms",
            f"400 pipelined `QUERY nomatch.` with {n:,} jobs: send → 400th OK",
            statistics.median(nomatch_ms),
            "ms",
            at_most(TARGET_NOMATCH_MS),
            "",
            f"{setup} {NOMATCH_QUERIES} `nN QUERY nomatch.` lines (no job matches) sent in"
            f" one sendall on a new connection; time from the send to the last `OK` read;"
            f" median of the runs ({each(nomatch_ms)} ms).",
        ),
        Metric(
            "query_stall",
            "query_get_p99_ms",
            f"GET round trip p99 during a full QUERY of {n:,} jobs",
            percentile(gets, 0.99),
            "ms",
            at_most(TARGET_GET_P99_MS),
            "",
            f"{setup} One client sends `QUERY` (every job, {runs[0].query_bytes / MB:.0f} MB"
            f" of answer) and reads it as fast as it can (1 MiB reads, 4 MiB SO_RCVBUF);"
            f" another connection sends one `GET` every {GET_INTERVAL * 1000:.0f} ms (the"
            f" next one at once if a GET took longer) from the QUERY's send to its `OK`;"
            f" {len(gets):,} round trips pooled: p50 {percentile(gets, 0.5):.2f} ms, max"
            f" {gets[-1]:.1f} ms. The client is one Python process (two threads).",
        ),
        Metric(
            "query_stall",
            "query_due_lag_ms",
            f"a job due {DUE_AFTER_NS * n // JOBS / 1e9:g} s into that QUERY: trigger lag"
            " (worst run)",
            max(lags),
            "ms",
            at_most(TARGET_LAG_MS),
            "",
            f"Same runs: a job `due.N` (rule `shell` run by /bin/bash) is SET to fire"
            f" {DUE_AFTER_NS * n // JOBS / 1e9:g} s from just before the QUERY is sent; lag = STAT"
            f" `trigger_lag_max_us` once it ran (the daemon's runner start - due time; the"
            f" daemon ran no other job); per run {each(lags, 2)} ms. The child's own clock"
            f" (bash `$EPOCHREALTIME` - due, spawn included):"
            f" {each([r.child_lag_ms for r in runs], 2)} ms. The job was due while the"
            f" QUERY's answer was still being read in {during} of {len(runs)} run(s) (QUERY"
            f" end - due: {each([r.due_before_end_s for r in runs], 2)} s).",
        ),
        Metric(
            "query_stall",
            "query_full_s",
            f"full QUERY of {n:,} jobs, read as fast as possible",
            statistics.median(r.query_s for r in runs),
            "s",
            None,
            "",
            f"The QUERY of the runs above: send → `OK` read; per run"
            f" {each([r.query_s for r in runs], 2)} s, {runs[0].query_bytes:,} bytes.",
        ),
    ]
