"""The benchmark scenarios.  Each starts its own daemon(s) and returns ``Metric``s.

Conventions: SET throughput figures are the **best of N runs**, each on a fresh daemon
(N = 3, or 1 with ``--quick``); latencies, durations and job-firing figures (which other
load on the machine moves most) are the **median** of the runs or of pooled samples, as
each metric's detail says.  Job due times are in the future
(random over the next 30 days) unless the scenario is about firing jobs.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import (
    Answers,
    Connection,
    check_all_ok,
    pipeline,
    pipeline_many,
    request_response_many,
    set_lines,
)
from bench.daemon import BenchError, Daemon, DaemonSettings, process_cpu_seconds
from bench.floor import FloorServer
from bench.report import Metric, at_least, at_most

SECOND_NS = 1_000_000_000
DAY_NS = 86_400 * SECOND_NS
MB = 1_000_000

MEMORY = DaemonSettings(persistence="memory")
LOGFILE_FSYNC = DaemonSettings(persistence="logfile", fsync=True)


@dataclass
class Context:
    """What every scenario gets: mode, a scratch directory, progress output."""

    quick: bool
    root: Path
    repeats: int
    _dirs: int = field(default=0, init=False)

    def workdir(self, name: str) -> Path:
        """A new empty directory for one daemon."""
        self._dirs += 1
        path = self.root / f"{self._dirs:03d}-{name}"
        path.mkdir(parents=True)
        return path

    def say(self, text: str) -> None:
        """Progress on stderr."""
        print(f"  {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ helpers


def job_ids(start: int, count: int) -> list[str]:
    """``job.0000001`` style ids (7 digits, more when needed)."""
    return [f"job.{i:07d}" for i in range(start, start + count)]


def future_times(count: int, seed: int) -> list[int]:
    """Due times spread at random over the next 30 days (at least a day ahead)."""
    rnd = random.Random(seed)
    base = time.time_ns() + DAY_NS
    return [base + rnd.randrange(29 * DAY_NS) for _ in range(count)]


@dataclass(frozen=True, slots=True)
class Usage:
    """CPU used by the daemon and by this (client) process during one measurement."""

    wall: float
    daemon_cpu: float
    client_cpu: float

    def describe(self) -> str:
        """``daemon CPU 98%, client CPU 35%`` of one core over the measurement."""
        if self.wall <= 0:
            return ""
        return (
            f"daemon CPU {100 * self.daemon_cpu / self.wall:.0f}%,"
            f" client CPU {100 * self.client_cpu / self.wall:.0f}% of one core"
        )


def _client_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measured(daemon: Daemon, run: Callable[[], Answers]) -> tuple[Answers, Usage]:
    """Run a load and record who used how much CPU meanwhile."""
    d0, c0, t0 = daemon.cpu_seconds(), _client_cpu(), time.perf_counter()
    answers = run()
    wall = time.perf_counter() - t0
    return answers, Usage(wall, daemon.cpu_seconds() - d0, _client_cpu() - c0)


def rates(values: Sequence[float]) -> str:
    """``98,000 / 103,000 / 110,000``."""
    return " / ".join(f"{v:,.0f}" for v in values)


def quote(text: str) -> str:
    """A quoted protocol token: backslash escapes double quotes and backslashes."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wait_for_runs(
    conn: Connection, total: int, deadline: float, interval: float
) -> tuple[float, dict[str, str], int]:
    """Poll STAT until ``total`` jobs have ended (executed or failed).

    Returns the wall time (``time.time()``) when that was first seen, the last STAT,
    and the largest ``executions_pending`` seen.
    """
    max_pending = 0
    while True:
        stat = conn.stat()
        now = time.time()
        max_pending = max(max_pending, int(stat["executions_pending"]))
        ended = int(stat["jobs_executed"]) + int(stat["jobs_failed"])
        if ended >= total:
            return now, stat, max_pending
        if now > deadline:
            raise BenchError(
                f"only {ended} of {total} jobs ended by the deadline"
                f" (pending {stat['executions_pending']},"
                f" in flight {stat['executions_inflight']})"
            )
        time.sleep(interval)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-int(fraction * 1_000_000) * len(sorted_values) // 1_000_000))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# ------------------------------------------------------------------ 1-2: SET throughput


def _set_runs(
    ctx: Context, settings: DaemonSettings, name: str, n: int, connections: int
) -> tuple[list[float], list[Usage]]:
    """``n`` pipelined SETs over ``connections`` connections, on a fresh daemon per run."""
    ids = job_ids(1, n)
    times = future_times(n, seed=1)
    per = n // connections
    payloads = [
        set_lines(ids[i * per : (i + 1) * per], times[i * per : (i + 1) * per], tag=f"c{i}.")
        for i in range(connections)
    ]
    found: list[float] = []
    usages: list[Usage] = []
    for run in range(ctx.repeats):
        with Daemon(ctx.workdir(name), settings) as d:
            if connections == 1:
                answers, usage = measured(d, lambda: pipeline(d.port, payloads[0], per))
            else:
                answers, usage = measured(
                    d, lambda: pipeline_many(d.port, payloads, [per] * connections)
                )
            check_all_ok(answers, per * connections, name)
            found.append(per * connections / answers.seconds)
            usages.append(usage)
            ctx.say(f"{name} run {run + 1}: {found[-1]:,.0f} SET/s ({usage.describe()})")
    return found, usages


def scenario_set_memory(ctx: Context) -> list[Metric]:
    """Target 1: pipelined SETs on one connection, memory backend (and 50 connections)."""
    n = 50_000 if ctx.quick else 200_000
    one, usage1 = _set_runs(ctx, MEMORY, "set-memory-1conn", n, 1)
    many, usage50 = _set_runs(ctx, MEMORY, "set-memory-50conn", n, 50)
    best1 = one.index(max(one))
    best50 = many.index(max(many))
    return [
        Metric(
            "set_memory",
            "set_memory_1conn_per_s",
            "SET/s, 1 connection pipelined, memory backend",
            max(one),
            "SET/s",
            at_least(100_000),
            "437/s",
            f"{n:,} SETs (distinct ids, due in the next 30 days) sent as one pre-built blob on"
            f" one connection; fresh daemon per run; best of {len(one)} runs"
            f" ({rates(one)}); best run: {usage1[best1].describe()}.",
        ),
        Metric(
            "set_memory",
            "set_memory_50conn_per_s",
            "SET/s, 50 connections pipelined, memory backend",
            max(many),
            "SET/s",
            None,
            "",
            f"{n:,} SETs split over 50 connections ({n // 50:,} each), all pipelined at once"
            f" by one selector loop; best of {len(many)} runs ({rates(many)});"
            f" best run: {usage50[best50].describe()}.",
        ),
    ]


def scenario_set_logfile(ctx: Context) -> list[Metric]:
    """Target 2: the same with the logfile backend and fsync on; 50 connections too."""
    n = 50_000 if ctx.quick else 200_000
    one, usage1 = _set_runs(ctx, LOGFILE_FSYNC, "set-fsync-1conn", n, 1)
    many, usage50 = _set_runs(ctx, LOGFILE_FSYNC, "set-fsync-50conn", n, 50)
    # 50 clients that each wait for every OK before sending the next SET.
    per = 200 if ctx.quick else 1000
    rr_rates: list[float] = []
    rr_usage: list[Usage] = []
    times = future_times(50 * per, seed=2)
    requests = [
        [f"r{c}.{k} SET rr.{c}.{k} {times[c * per + k]}\n".encode() for k in range(per)]
        for c in range(50)
    ]
    for run in range(ctx.repeats):
        with Daemon(ctx.workdir("set-fsync-50conn-rr"), LOGFILE_FSYNC) as d:
            answers, usage = measured(d, lambda: request_response_many(d.port, requests))
            check_all_ok(answers, 50 * per, "50 connections request/response")
            rr_rates.append(50 * per / answers.seconds)
            rr_usage.append(usage)
            ctx.say(f"set-fsync-50conn-rr run {run + 1}: {rr_rates[-1]:,.0f} SET/s")
    b1, b50, brr = (x.index(max(x)) for x in (one, many, rr_rates))
    return [
        Metric(
            "set_logfile",
            "set_fsync_1conn_per_s",
            "SET/s, 1 connection pipelined, logfile + fsync_on_persist",
            max(one),
            "SET/s",
            at_least(50_000),
            "383/s",
            f"{n:,} SETs on one connection; every OK is sent only after its frame was"
            f" fsynced (group commit); fresh daemon and logfile per run; best of {len(one)}"
            f" ({rates(one)}); best run: {usage1[b1].describe()}.",
        ),
        Metric(
            "set_logfile",
            "set_fsync_50conn_per_s",
            "SET/s, 50 connections pipelined, logfile + fsync_on_persist",
            max(many),
            "SET/s",
            None,
            "4,750/s",
            f"{n:,} SETs over 50 connections, all pipelined; best of {len(many)}"
            f" ({rates(many)}); best run: {usage50[b50].describe()}.",
        ),
        Metric(
            "set_logfile",
            "set_fsync_50conn_rr_per_s",
            "SET/s, 50 connections x 1 request in flight, logfile + fsync_on_persist",
            max(rr_rates),
            "SET/s",
            None,
            "4,750/s",
            f"50 connections x {per:,} SETs, each client sends its next SET only when the"
            f" previous OK arrived (so an fsync covers at most 50 SETs); best of"
            f" {len(rr_rates)} ({rates(rr_rates)}); best run: {rr_usage[brr].describe()}.",
        ),
    ]


# ---------------------------------------------------------------------- 3: GET latency


def get_latencies(port: int, job_id: str, count: int, warmup: int) -> list[float]:
    """Round-trip times (µs) of ``count`` sequential GETs on one connection."""
    conn = Connection(port)
    try:
        line = f"g GET {job_id}\n".encode()
        for _ in range(warmup):
            conn.roundtrip(line)
        samples: list[float] = []
        clock = time.perf_counter_ns
        for _ in range(count):
            t = clock()
            answer = conn.roundtrip(line)
            samples.append((clock() - t) / 1000)
            if not answer.startswith(b"g OK "):
                raise BenchError(f"GET answered {answer!r}")
        return samples
    finally:
        conn.close()


def scenario_get_latency(ctx: Context) -> list[Metric]:
    """Target 3: GET round trip on loopback, one request in flight (with the machine's floor)."""
    count = 5_000 if ctx.quick else 20_000
    pooled: dict[str, list[float]] = {"ztick-tw": [], "twisted": [], "raw": []}
    p50s: dict[str, list[float]] = {name: [] for name in pooled}
    cpu_per_request: dict[str, list[float]] = {name: [] for name in pooled}
    pinned: dict[str, list[float]] = {}
    with (
        Daemon(ctx.workdir("get-latency"), MEMORY) as d,
        FloorServer("twisted") as tw,
        FloorServer("raw") as raw,
    ):
        conn = Connection(d.port)
        conn.command(f"SET job.0000001 {future_times(1, 3)[0]}")
        conn.close()
        servers = {
            "ztick-tw": (d.port, d.pid),
            "twisted": (tw.port, tw.pid),
            "raw": (raw.port, raw.pid),
        }
        for run in range(ctx.repeats):
            # Interleaved, so that all three see the same machine conditions.
            for name, (port, pid) in servers.items():
                cpu0 = process_cpu_seconds(pid)
                samples = sorted(get_latencies(port, "job.0000001", count, warmup=1000))
                cpu = process_cpu_seconds(pid) - cpu0
                cpu_per_request[name].append(cpu / (count + 1000) * 1e6)
                p50s[name].append(percentile(samples, 0.5))
                pooled[name] += samples
            ctx.say(
                f"get run {run + 1}: p50 "
                + ", ".join(f"{name} {p[-1]:.0f} µs" for name, p in p50s.items())
            )
        pinned = _pinned_latencies(d.pid, d.port, count)
    for samples in pooled.values():
        samples.sort()
    ours = pooled["ztick-tw"]

    def runs_of(name: str) -> str:
        return " / ".join(f"{p:.0f}" for p in p50s[name])

    def cpu_of(name: str) -> str:
        return f"{statistics.median(cpu_per_request[name]):.0f} µs"

    floor = (
        f"Floor on this machine with the same client, measured in turn with the daemon: a"
        f" bare Twisted protocol answering each line p50"
        f" {percentile(pooled['twisted'], 0.5):.0f} µs (p99"
        f" {percentile(pooled['twisted'], 0.99):.0f}, server CPU {cpu_of('twisted')} per"
        f" request), a blocking Python socket loop p50 {percentile(pooled['raw'], 0.5):.0f} µs"
        f" (p99 {percentile(pooled['raw'], 0.99):.0f}, {cpu_of('raw')}); per-run p50s:"
        f" twisted {runs_of('twisted')}, raw {runs_of('raw')} µs."
    )
    placement = "; ".join(
        f"{where}: p50 {percentile(v, 0.5):.0f} µs, p99 {percentile(v, 0.99):.0f} µs"
        for where, v in pinned.items()
    )
    how = (
        f"{len(p50s['ztick-tw'])} connection(s) x {count:,} sequential `GET` (after 1,000"
        f" warm-up), one request in flight, TCP_NODELAY, timed with perf_counter_ns around"
        f" sendall+recv in a Python client; all {len(ours):,} samples pooled (p50 per run:"
        f" {runs_of('ztick-tw')} µs); memory backend, 1 job; daemon CPU per GET"
        f" {cpu_of('ztick-tw')} (user+system, kernel included). {floor}"
        + (
            f" With the daemon's main thread and the client pinned ({count:,} GETs each):"
            f" {placement}."
            if placement
            else ""
        )
    )
    return [
        Metric(
            "get_latency",
            "get_p50_us",
            "GET round trip p50 (loopback)",
            percentile(ours, 0.5),
            "µs",
            at_most(100),
            "2.1 ms",
            how,
        ),
        Metric(
            "get_latency",
            "get_p99_us",
            "GET round trip p99 (loopback)",
            percentile(ours, 0.99),
            "µs",
            None,
            "",
            "Same samples as the p50.",
        ),
        Metric(
            "get_latency",
            "floor_twisted_p50_us",
            "floor: bare Twisted echo round trip p50, same client",
            percentile(pooled["twisted"], 0.5),
            "µs",
            None,
            "",
            "",
        ),
    ] + [
        Metric(
            "get_latency",
            f"get_p50_us_{key}",
            f"GET round trip p50, client and daemon pinned to {where}",
            percentile(values, 0.5),
            "µs",
            None,
            "",
            "",
        )
        for (where, values), key in zip(pinned.items(), ("same_core", "two_cores"), strict=False)
    ]


def _pinned_latencies(pid: int, port: int, count: int) -> dict[str, list[float]]:
    """GET latencies with the daemon's main thread and this thread on fixed CPUs.

    Shows how much of the round trip is the kernel waking a process on another
    (idle) CPU.  Both affinities are restored afterwards.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return {}
    mine, theirs = os.sched_getaffinity(0), os.sched_getaffinity(pid)
    out: dict[str, list[float]] = {}
    try:
        for where, (daemon_cpu, client_cpu) in {
            "one core": (cpus[0], cpus[0]),
            "two cores": (cpus[0], cpus[1]),
        }.items():
            os.sched_setaffinity(pid, {daemon_cpu})
            os.sched_setaffinity(0, {client_cpu})
            out[where] = sorted(get_latencies(port, "job.0000001", count, warmup=500))
    finally:
        os.sched_setaffinity(0, mine)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, theirs)
    return out


# ------------------------------------------------------------ 4: a million jobs, replay


def _load_million(
    ctx: Context, d: Daemon, ids: list[str], times: list[int], batch: int
) -> list[float]:
    """SET every job in batches of ``batch`` (one connection per batch); rates per batch."""
    found: list[float] = []
    for lo in range(0, len(ids), batch):
        payload = set_lines(ids[lo : lo + batch], times[lo : lo + batch])
        answers = pipeline(d.port, payload, len(ids[lo : lo + batch]), timeout=300)
        check_all_ok(answers, len(ids[lo : lo + batch]), f"loading batch at {lo}")
        found.append(len(ids[lo : lo + batch]) / answers.seconds)
    ctx.say(f"loaded {len(ids):,} jobs; batch rates {rates(found)}")
    return found


def scenario_million(ctx: Context) -> list[Metric]:
    """Target 4: RSS for 1M planned jobs; SET speed on a full server vs an empty one."""
    n = 1_000_000
    batch = 100_000
    ids = job_ids(1, n)
    times = future_times(n, seed=4)
    extra = 5 if not ctx.quick else 1
    extra_ids = [job_ids(n + 1 + k * batch, batch) for k in range(extra)]
    extra_times = [future_times(batch, seed=40 + k) for k in range(extra)]
    extra_payloads = [set_lines(i, t) for i, t in zip(extra_ids, extra_times, strict=True)]
    metrics: list[Metric] = []

    with Daemon(ctx.workdir("million-memory"), MEMORY) as d:
        rss_empty = d.rss_bytes()
        load_rates = _load_million(ctx, d, ids, times, batch)
        rss_full = d.rss_bytes()
        hwm = d.status_kb("VmHWM") * 1024
        stat_conn = Connection(d.port)
        jobs_total = int(stat_conn.stat()["jobs_total"])
        stat_conn.close()
        if jobs_total != n:
            raise BenchError(f"STAT jobs_total is {jobs_total}, expected {n}")
        full_get = sorted(get_latencies(d.port, ids[n // 2], 5_000, warmup=500))
        # Paired rounds: the same new 100k batch on a fresh empty daemon, then on this
        # one, back to back, so that both see the same machine conditions.
        after: list[float] = []
        empty: list[float] = []
        cpu_after: list[float] = []
        cpu_empty: list[float] = []
        for k in range(extra):
            with Daemon(ctx.workdir("million-empty-batch"), MEMORY) as e:
                cpu0 = e.cpu_seconds()
                answers = pipeline(e.port, extra_payloads[k], batch)
                cpu_empty.append((e.cpu_seconds() - cpu0) / batch * 1e6)
                check_all_ok(answers, batch, "batch on an empty server")
                empty.append(batch / answers.seconds)
            cpu0 = d.cpu_seconds()
            answers = pipeline(d.port, extra_payloads[k], batch)
            cpu_after.append((d.cpu_seconds() - cpu0) / batch * 1e6)
            check_all_ok(answers, batch, "batch after 1M")
            after.append(batch / answers.seconds)
        ctx.say(
            f"100k batches, empty / after 1M jobs: {rates(empty)} / {rates(after)} SET/s;"
            f" RSS {rss_full / MB:.0f} MB"
        )
    ratios = sorted(e / a for e, a in zip(empty, after, strict=True))
    slowdown = statistics.median(ratios)

    metrics += [
        Metric(
            "million",
            "bytes_per_job_memory",
            "RSS growth per planned job (1M jobs, memory backend)",
            (rss_full - rss_empty) / n,
            "B",
            None,
            "~280 B",
            "(VmRSS with 1M jobs - VmRSS of the empty daemon) / 1,000,000.",
        ),
        Metric(
            "million",
            "rss_1m_memory_mb",
            "daemon RSS with 1,000,000 planned jobs (memory backend)",
            rss_full / MB,
            "MB",
            at_most(250),
            "~280 MB (280 B/job)",
            f"VmRSS of the daemon after 1,000,000 pipelined SETs (ids job.0000001...,"
            f" random due times over the next 30 days), read from /proc/PID/status;"
            f" 1 MB = 10^6 bytes. Empty daemon: {rss_empty / MB:.0f} MB, so"
            f" {(rss_full - rss_empty) / n:.0f} bytes per job; peak (VmHWM)"
            f" {hwm / MB:.0f} MB. ztick's figure is ~280 bytes/job.",
        ),
        Metric(
            "million",
            "set_after_1m_slowdown",
            "100k SETs after 1M jobs vs on an empty server (slowdown)",
            slowdown,
            "x",
            at_most(1.5),
            "5.3x (8,300 → 1,570/s at 110k jobs)",
            f"{len(ratios)} paired round(s): a new 100,000-SET pipelined batch on a fresh"
            f" empty daemon, then the same batch (same ids and times) on the daemon holding"
            f" 1,000,000+ jobs; figure = median of the per-pair rate ratios"
            f" ({' / '.join(f'{r:.2f}' for r in ratios)}). Rates empty: {rates(empty)}/s,"
            f" after 1M: {rates(after)}/s; daemon CPU per SET empty"
            f" {' / '.join(f'{c:.1f}' for c in cpu_empty)} µs, after 1M"
            f" {' / '.join(f'{c:.1f}' for c in cpu_after)} µs. Rates of the ten 100k batches"
            f" that loaded the million (0 to 1M jobs): {rates(load_rates)}/s.",
        ),
        Metric(
            "million",
            "get_p50_us_1m",
            "GET round trip p50 with 1,000,000 jobs",
            percentile(full_get, 0.5),
            "µs",
            None,
            "",
            f"5,000 sequential GETs of one job on the daemon holding 1M jobs;"
            f" p99 {percentile(full_get, 0.99):.0f} µs.",
        ),
    ]

    if not ctx.quick:
        with Daemon(ctx.workdir("million-logfile"), LOGFILE_FSYNC) as d:
            rss_empty_log = d.rss_bytes()
            log_rates = _load_million(ctx, d, ids, times, batch)
            rss_log = d.rss_bytes()
        metrics.append(
            Metric(
                "million",
                "rss_1m_logfile_mb",
                "daemon RSS with 1,000,000 planned jobs (logfile + fsync)",
                rss_log / MB,
                "MB",
                at_most(250),
                "~280 MB (280 B/job)",
                f"As above with the logfile backend and fsync_on_persist = true (empty:"
                f" {rss_empty_log / MB:.0f} MB; {(rss_log - rss_empty_log) / n:.0f} bytes/job);"
                f" load rates per 100k batch: {rates(log_rates)}/s.",
            )
        )
    return metrics


def write_logfile(path: Path, n: int) -> int:
    """A logfile of one rule and ``n`` planned-job frames, written with the daemon's codec."""
    from ztick_tw.model import Job, Rule, ShellSpec
    from ztick_tw.store.codec import encode

    ids = job_ids(1, n)
    times = future_times(n, seed=5)
    with open(path, "wb") as f:
        f.write(encode(Rule("rule.all", "job.", ShellSpec("true"))))
        for lo in range(0, n, 100_000):
            chunk = zip(ids[lo : lo + 100_000], times[lo : lo + 100_000], strict=True)
            f.write(b"".join(encode(Job(i, t)) for i, t in chunk))
    return path.stat().st_size


def scenario_replay(ctx: Context) -> list[Metric]:
    """Target 4: a 1M-frame logfile replays (startup to accepting) in ≤ 3 s."""
    n = 1_000_000
    source = ctx.workdir("replay-source") / "logfile"
    size = write_logfile(source, n)
    startups: list[float] = []
    loads: list[float] = []
    rss: list[float] = []
    for _ in range(ctx.repeats):
        work = ctx.workdir("replay")
        (work / "logfile").write_bytes(source.read_bytes())
        with Daemon(work, LOGFILE_FSYNC) as d:
            line = d.loaded_line()
            if line.jobs != n or line.frames != n + 1:
                raise BenchError(f"replay loaded {line}, expected {n} jobs in {n + 1} frames")
            startups.append(d.startup_seconds)
            loads.append(line.seconds)
            rss.append(d.rss_bytes() / MB)
        ctx.say(f"replay: accepting after {startups[-1]:.2f} s, loaded in {loads[-1]:.2f} s")
    runs = len(startups)
    return [
        Metric(
            "replay",
            "replay_1m_startup_s",
            "1M-frame logfile: daemon start to port accepting",
            statistics.median(startups),
            "s",
            at_most(3),
            "",
            f"Logfile of 1 rule + 1,000,000 planned-job frames ({size / MB:.0f} MB, written"
            f" with ztick_tw.store.codec.encode, in the page cache); time from spawning"
            f" `python -m ztick_tw` (interpreter and Twisted import included) until a TCP"
            f" connect succeeds (polled every 2 ms); median of {runs}"
            f" ({' / '.join(f'{s:.2f}' for s in startups)} s). RSS after replay:"
            f" {statistics.median(rss):.0f} MB.",
        ),
        Metric(
            "replay",
            "replay_1m_loaded_s",
            "1M-frame logfile: the daemon's own 'loaded ... in X s'",
            statistics.median(loads),
            "s",
            at_most(3),
            "",
            f"The seconds in the daemon's startup log line (read, decode and apply the log,"
            f" build the due-heap); median of {runs}"
            f" ({' / '.join(f'{s:.3f}' for s in loads)} s).",
        ),
    ]


# ------------------------------------------------------------- 5: firing real children


def _fire_daemon(ctx: Context, name: str, settings: DaemonSettings) -> Daemon:
    return Daemon(ctx.workdir(name), settings)


def _schedule(d: Daemon, prefix: str, due: Sequence[int]) -> None:
    payload = set_lines([f"{prefix}{i:06d}" for i in range(len(due))], due)
    check_all_ok(pipeline(d.port, payload, len(due)), len(due), f"scheduling {prefix}*")


@dataclass(frozen=True, slots=True)
class _LagRun:
    p50_us: int
    p99_us: int
    max_us: int
    max_pending: int
    cpu_percent: float


def _lag_run(ctx: Context, rate: int, seconds: int, settings: DaemonSettings) -> _LagRun:
    """One daemon, ``rate * seconds`` `true` jobs due evenly; the STAT lag at the end."""
    n = rate * seconds
    with _fire_daemon(ctx, "trigger-lag", settings) as d:
        conn = Connection(d.port)
        conn.command("RULE SET rule.lag lag. shell true")
        start = time.time_ns() + 2 * SECOND_NS
        due = [start + i * SECOND_NS // rate for i in range(n)]
        _schedule(d, "lag.", due)
        cpu0 = d.cpu_seconds()
        done_at, stat, max_pending = wait_for_runs(conn, n, due[-1] / 1e9 + 30, interval=0.25)
        cpu = d.cpu_seconds() - cpu0
        conn.close()
    failed = int(stat["jobs_failed"])
    if failed:
        raise BenchError(f"{failed} of {n} `true` jobs failed; see {d.workdir}/daemon.log")
    run = _LagRun(
        int(stat["trigger_lag_p50_us"]),
        int(stat["trigger_lag_p99_us"]),
        int(stat["trigger_lag_max_us"]),
        max_pending,
        100 * cpu / max(1e-9, done_at - start / 1e9),
    )
    ctx.say(f"trigger lag: p50 {run.p50_us} µs p99 {run.p99_us} µs max {run.max_us} µs")
    return run


def scenario_trigger_lag(ctx: Context) -> list[Metric]:
    """Target 5a: lag p99 with 250 `true` jobs/s due for ~20 s (STAT), plus own lag."""
    seconds = 5 if ctx.quick else 20
    rate = 250
    n = rate * seconds
    settings = LOGFILE_FSYNC
    runs = [_lag_run(ctx, rate, seconds, settings) for _ in range(ctx.repeats)]
    # The run with the median p99 gives all three figures, so they belong together.
    runs.sort(key=lambda r: r.p99_us)
    mid = runs[len(runs) // 2]

    def each(attr: str) -> str:
        return " / ".join(f"{getattr(r, attr) / 1000:.2f}" for r in runs)

    window = min(n, 4096)
    how = (
        f"{n:,} jobs due {rate}/s (one every {1000 // rate} ms) for {seconds} s, rule"
        f" `shell true` (/bin/sh -c true via setsid), {settings.describe()}, log level info;"
        f" STAT read when all had run (its window is the last {window:,} runs); lag ="
        f" runner start - due time as the daemon measures it. All executed, none failed."
        f" {len(runs)} run(s), each on a fresh daemon; the figures are from the run with the"
        f" median p99 (p99 of each run: {each('p99_us')} ms; max: {each('max_us')} ms)."
        f" executions_pending peaked at {max(r.max_pending for r in runs)} (polled every"
        f" 0.25 s); daemon CPU about {statistics.median(r.cpu_percent for r in runs):.0f}%"
        f" of one core while firing."
    )
    metrics = [
        Metric(
            "trigger_lag",
            "trigger_lag_p99_us",
            f"trigger lag p99, {rate} `true` jobs/s for {seconds} s (STAT)",
            mid.p99_us / 1000,
            "ms",
            at_most(2),
            "",
            how,
        ),
        Metric(
            "trigger_lag",
            "trigger_lag_p50_us",
            "trigger lag p50 (same run, STAT)",
            mid.p50_us / 1000,
            "ms",
            None,
            "",
            "",
        ),
        Metric(
            "trigger_lag",
            "trigger_lag_max_us",
            "trigger lag max (same run, STAT)",
            mid.max_us / 1000,
            "ms",
            None,
            "",
            "",
        ),
    ]
    metrics += _stamped_lag(ctx, rate)
    return metrics


def _stamped_lag(ctx: Context, rate: int) -> list[Metric]:
    """Lag measured from outside: each child (bash) writes its own start time."""
    seconds = 3 if ctx.quick else 10
    n = rate * seconds
    settings = DaemonSettings(persistence="logfile", fsync=True, shell_path="/bin/bash")
    with _fire_daemon(ctx, "trigger-lag-stamped", settings) as d:
        stamps = d.workdir / "stamps.txt"
        conn = Connection(d.port)
        command = f"echo $ZTICK_EXECUTION_NS ${{EPOCHREALTIME/./}} >> {stamps}"
        conn.command(f"RULE SET rule.stamp stamp. shell {quote(command)}")
        start = time.time_ns() + 2 * SECOND_NS
        due = [start + i * SECOND_NS // rate for i in range(n)]
        _schedule(d, "stamp.", due)
        _, stat, _ = wait_for_runs(conn, n, due[-1] / 1e9 + 30, interval=0.25)
        conn.close()
    lags = sorted(
        int(child_us) - int(due_ns) // 1000
        for due_ns, child_us in (line.split() for line in stamps.read_text().splitlines())
    )
    if len(lags) != n:
        raise BenchError(f"{len(lags)} stamps for {n} jobs in {stamps}")
    lags_ms = [x / 1000 for x in lags]
    ctx.say(f"child-observed lag: p50 {percentile(lags_ms, 0.5):.2f} ms")
    return [
        Metric(
            "trigger_lag",
            "child_lag_p99_ms",
            f"lag seen by the child p99, {rate} jobs/s (bash stamps)",
            percentile(lags_ms, 0.99),
            "ms",
            None,
            "",
            f"Own measurement, not the daemon's: {n:,} jobs due {rate}/s for {seconds} s,"
            f" shell = /bin/bash, each child runs `echo $ZTICK_EXECUTION_NS"
            f" ${{EPOCHREALTIME/./}} >> stamps` (a builtin, no fork); lag = the child's"
            f" clock reading - due time, so it adds setsid + bash exec and start-up to the"
            f" daemon's lag. p50 {percentile(lags_ms, 0.5):.2f} ms, max {lags_ms[-1]:.2f} ms;"
            f" the daemon's STAT for this run: p50 {int(stat['trigger_lag_p50_us']) / 1000:.2f}"
            f" ms, p99 {int(stat['trigger_lag_p99_us']) / 1000:.2f} ms. {settings.describe()}.",
        )
    ]


def scenario_sleep_jobs(ctx: Context) -> list[Metric]:
    """Target 5b: 20 `sleep 1` jobs due together all finish within 2 s of the due time."""
    jobs = 20
    rounds = ctx.repeats
    settings = LOGFILE_FSYNC
    child_spans: list[float] = []
    recorded_spans: list[float] = []
    starts: list[float] = []
    with _fire_daemon(ctx, "sleep-jobs", settings) as d:
        done = d.workdir / "done.txt"
        conn = Connection(d.port)
        command = (
            f"s=$(date +%s%N); sleep 1; echo $ZTICK_JOB_ID $ZTICK_EXECUTION_NS $s"
            f" $(date +%s%N) >> {done}"
        )
        conn.command(f"RULE SET rule.sleep sleep. shell {quote(command)}")
        for r in range(rounds):
            due = time.time_ns() + 1 * SECOND_NS
            prefix = f"sleep.{r}."
            _schedule(d, prefix, [due] * jobs)
            deadline = due / 1e9 + 30
            while True:
                lines = conn.command(f"QUERY {prefix}")[:-1]
                now = time.time_ns()
                if len(lines) == jobs and all(" executed " in line for line in lines):
                    break
                if any(" failed " in line for line in lines):
                    raise BenchError(f"a sleep job failed: {lines}")
                if now / 1e9 > deadline:
                    raise BenchError(f"sleep jobs not all executed 30 s after due: {lines}")
                time.sleep(0.005)
            recorded_spans.append((now - due) / 1e9)
            rows = [
                line.split() for line in done.read_text().splitlines() if line.startswith(prefix)
            ]
            if len(rows) != jobs:
                raise BenchError(f"{len(rows)} stamps for {jobs} sleep jobs in {done}")
            child_spans.append((max(int(row[3]) for row in rows) - due) / 1e9)
            starts.append((max(int(row[2]) for row in rows) - due) / 1e9)
            ctx.say(
                f"20 x sleep 1 round {r + 1}: last finished {child_spans[-1]:.3f} s after due,"
                f" all recorded executed {recorded_spans[-1]:.3f} s after"
            )
        conn.close()
    return [
        Metric(
            "sleep_jobs",
            "sleep20_all_done_s",
            "20 x `sleep 1` due together: due → last one finished",
            statistics.median(child_spans),
            "s",
            at_most(2),
            "20.5 s",
            f"20 jobs due at the same instant, rule `shell` running `sleep 1` between two"
            f" `date +%s%N` stamps appended to a file; figure = last child's end stamp - due"
            f" time; median of {rounds} rounds ({' / '.join(f'{s:.3f}' for s in child_spans)}"
            f" s). Last child started {statistics.median(starts) * 1000:.0f} ms after due."
            f" {settings.describe()}.",
        ),
        Metric(
            "sleep_jobs",
            "sleep20_all_recorded_s",
            "20 x `sleep 1`: due → all 20 `executed` in the daemon (QUERY poll)",
            statistics.median(recorded_spans),
            "s",
            at_most(2),
            "20.5 s",
            f"Same rounds; QUERY polled every 5 ms until all 20 show `executed`; median of"
            f" {rounds} ({' / '.join(f'{s:.3f}' for s in recorded_spans)} s).",
        ),
    ]


def _burst_run(ctx: Context, n: int, settings: DaemonSettings) -> tuple[float, int, float]:
    """``n`` `true` jobs due at once on a fresh daemon: (jobs/s, peak pending, daemon CPU s)."""
    with _fire_daemon(ctx, "shell-burst", settings) as d:
        conn = Connection(d.port)
        conn.command("RULE SET rule.burst burst. shell true")
        due = time.time_ns() + 2 * SECOND_NS
        _schedule(d, "burst.", [due] * n)
        cpu0 = d.cpu_seconds()
        done_at, stat, max_pending = wait_for_runs(conn, n, due / 1e9 + 60, 0.02)
        cpu = d.cpu_seconds() - cpu0
        conn.close()
    if int(stat["jobs_failed"]):
        raise BenchError(f"{stat['jobs_failed']} burst jobs failed; see {d.workdir}/daemon.log")
    span = done_at - due / 1e9
    ctx.say(f"burst: {n} `true` jobs in {span:.2f} s = {n / span:,.0f}/s")
    return n / span, max_pending, cpu


def scenario_shell_rate(ctx: Context) -> list[Metric]:
    """Target 5c: ≥ 500 trivial shell jobs/s sustained (a burst, and a paced run)."""
    settings = LOGFILE_FSYNC
    burst_n = 2_000 if ctx.quick else 5_000
    bursts = sorted(
        (_burst_run(ctx, burst_n, settings) for _ in range(ctx.repeats)), key=lambda b: b[0]
    )
    burst_rate, max_pending, cpu = bursts[len(bursts) // 2]
    burst_span = burst_n / burst_rate

    rate = 500
    seconds = 4 if ctx.quick else 10
    n = rate * seconds
    with _fire_daemon(ctx, "shell-paced", settings) as d:
        conn = Connection(d.port)
        conn.command("RULE SET rule.paced paced. shell true")
        start = time.time_ns() + 2 * SECOND_NS
        due_list = [start + i * SECOND_NS // rate for i in range(n)]
        _schedule(d, "paced.", due_list)
        paced_done, paced_stat, paced_pending = wait_for_runs(
            conn, n, due_list[-1] / 1e9 + 60, 0.05
        )
        conn.close()
    if int(paced_stat["jobs_failed"]):
        raise BenchError(f"{paced_stat['jobs_failed']} paced jobs failed")
    behind_ms = (paced_done - due_list[-1] / 1e9) * 1000
    paced_rate = n / (paced_done - start / 1e9)
    ctx.say(f"paced {rate}/s: all done {behind_ms:.0f} ms after the last due time")
    return [
        Metric(
            "shell_rate",
            "shell_burst_per_s",
            "trivial shell jobs/s sustained (5,000 due at once)"
            if not ctx.quick
            else f"trivial shell jobs/s sustained ({burst_n:,} due at once)",
            burst_rate,
            "jobs/s",
            at_least(500),
            "",
            f"{burst_n:,} `shell true` jobs all due at the same instant, so the daemon runs"
            f" flat out (64 at a time, the rest queued: executions_pending peaked at"
            f" {max_pending}); figure = jobs / (time all were recorded ended - due time),"
            f" STAT polled every 20 ms; median of {len(bursts)} run(s) on fresh daemons"
            f" ({rates([b[0] for b in bursts])}/s); in that run daemon CPU"
            f" {100 * cpu / burst_span:.0f}% of one core, {1000 * cpu / burst_n:.2f} ms of"
            f" daemon CPU per job; none failed. {settings.describe()}.",
        ),
        Metric(
            "shell_rate",
            "shell_paced_500_behind_ms",
            f"{n:,} `true` jobs paced {rate}/s: last ended after the last due time",
            behind_ms,
            "ms",
            None,
            "",
            f"{n:,} jobs due one every 2 ms for {seconds} s; completion rate over the run"
            f" {paced_rate:,.0f}/s (jobs / (last recorded end - first due)), max"
            f" executions_pending seen {paced_pending} (polled every 50 ms); STAT lag"
            f" p50 {int(paced_stat['trigger_lag_p50_us']) / 1000:.2f} ms, p99"
            f" {int(paced_stat['trigger_lag_p99_us']) / 1000:.2f} ms, max"
            f" {int(paced_stat['trigger_lag_max_us']) / 1000:.2f} ms.",
        ),
    ]


def scenario_load1000(ctx: Context) -> list[Metric]:
    """Issue 3: 1,000 connections x SET/GET/QUERY for 30 s: answers, fairness, RSS, fds."""
    from bench.load import load1000  # bench.load builds on this module

    return load1000(ctx)


def _elsewhere(module: str, function: str, doc: str) -> Callable[[Context], list[Metric]]:
    """The scenario ``module.function``, imported when it runs.

    Those modules build on this one, so they cannot be imported while it loads.
    """

    def run(ctx: Context) -> list[Metric]:
        found: Callable[[Context], list[Metric]] = getattr(
            importlib.import_module(module), function
        )
        return found(ctx)

    run.__doc__ = doc
    return run


SCENARIOS: dict[str, Callable[[Context], list[Metric]]] = {
    "set_memory": scenario_set_memory,
    "set_logfile": scenario_set_logfile,
    "get_latency": scenario_get_latency,
    "million": scenario_million,
    "replay": scenario_replay,
    "trigger_lag": scenario_trigger_lag,
    "sleep_jobs": scenario_sleep_jobs,
    "shell_rate": scenario_shell_rate,
    "load1000": scenario_load1000,
    "net_http": _elsewhere(
        "bench.network",
        "scenario_net_http",
        "Issue 4: http POSTs/s, 10,000 due in 1 s (≥ 1,000/s).",
    ),
    "net_redis": _elsewhere(
        "bench.network",
        "scenario_net_redis",
        "Issue 4: redis RPUSH/s, 10,000 due in 1 s (≥ 2,000/s).",
    ),
    "net_amqp": _elsewhere(
        "bench.network",
        "scenario_net_amqp",
        "Issue 4: amqp publishes/s, 10,000 due in 1 s (≥ 2,000/s).",
    ),
    "compaction": _elsewhere(
        "bench.compaction",
        "scenario_compaction",
        "Issue 5: 1M jobs x 10 mutations: log size, compaction time, replay.",
    ),
    "compaction_set": _elsewhere(
        "bench.compaction",
        "scenario_compaction_set",
        "Issue 5: SET/s (1 conn, fsync) on 1M jobs while compacting (≥ 80%).",
    ),
    "query_memory": _elsewhere(
        "bench.query",
        "scenario_query_memory",
        "Issue 9: daemon peak RSS growth, QUERY of 1M jobs, 4 KB id, slow reader (< 50 MB).",
    ),
    "query_stall": _elsewhere(
        "bench.query",
        "scenario_query_stall",
        "Issue 9: 1M jobs: 400 x QUERY nomatch. (< 50 ms), GET p99 and a due job during a QUERY.",
    ),
    "shell_drain": _elsewhere(
        "bench.spawn",
        "scenario_shell_drain",
        "Issue 9: 3,000 `shell true` due at once: jobs/s (>= 1,000), another GET p99 (<= 10 ms).",
    ),
    "next_occurrence": _elsewhere(
        "bench.schedules",
        "next_occurrence",
        "Issue 10: median µs of Schedule.after(prev), every/cron/combined (≤ 20 µs).",
    ),
    "history_memory": _elsewhere(
        "bench.history",
        "history_memory",
        "Issue 10: 100,000 jobs x 20 runs x 1 KB of history: RSS <= 400 MB.",
    ),
    "recurring_redis": _elsewhere(
        "bench.recurring",
        "scenario_recurring_redis",
        "Issue 10: 5,000 jobs `every 1 second` via redis RPUSH for 60 s"
        " (≥ 4,900 runs/s, lag p99 ≤ 5 ms, 0 missed).",
    ),
    "schedules_memory": _elsewhere(
        "bench.recurring",
        "scenario_schedules_memory",
        "Issue 10: 1M scheduled jobs: RSS (≤ 400 MB) and log replay (≤ 5 s),"
        " 10 texts and all-distinct.",
    ),
    "client_pipeline": _elsewhere(
        "bench.client_bench",
        "client_pipeline",
        "Issue 11: SET/s through ztick_tw.client's pipeline (≥ 100,000/s).",
    ),
    "rest_throughput": _elsewhere(
        "bench.rest",
        "rest_throughput",
        "Issue 11: PUT /jobs/{id} req/s over 50 keep-alive connections (≥ 10,000/s),"
        " GET /jobs/{id} p50 (≤ 300 µs).",
    ),
    "telemetry_overhead": _elsewhere(
        "bench.telemetry",
        "telemetry_overhead",
        "Issue 11: SET/s with OTLP telemetry on vs off (≥ 0.90).",
    ),
    "metrics_scrape": _elsewhere(
        "bench.metrics",
        "metrics_scrape",
        "Issue 11: /metrics scrape with 1M jobs held (≤ 10 ms).",
    ),
}
