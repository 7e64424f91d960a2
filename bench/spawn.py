"""Issue 9, defect 4: child spawning must not stall the reactor.

``shell_drain``: 3,000 `shell true` jobs fall due at the same instant on a daemon with the
default ``max_concurrent_runs`` (64) and a logfile with fsync.  While they drain, a second
connection sends one ``GET`` every 5 ms (the next at once if one took longer) and records
each round trip.  Figures: jobs/s sustained over the drain, and the GET round trip p50/p99
of the GETs sent between the due time and the moment STAT shows every job ended.
"""

from __future__ import annotations

import statistics
import threading
import time

from bench.client import Connection
from bench.common import (
    LOGFILE_FSYNC,
    SECOND_NS,
    Context,
    fire_daemon,
    percentile,
    schedule,
    wait_for_runs,
)
from bench.daemon import BenchError
from bench.report import Metric, at_least, at_most

JOBS = 3_000
GET_INTERVAL = 0.005
TARGET_GET_P99_MS = 10
TARGET_RATE = 1_000


class _GetSampler(threading.Thread):
    """One ``GET`` every ``GET_INTERVAL`` s on its own connection: (send time, round trip)."""

    def __init__(self, port: int, job_id: str) -> None:
        super().__init__(name="bench-spawn-get", daemon=True)
        self.conn = Connection(port, timeout=60)
        self.line = f"g GET {job_id}\n".encode()
        self.samples: list[tuple[float, float]] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self.conn.roundtrip(self.line)  # connected and answering before sampling starts

    def run(self) -> None:
        try:
            next_at = time.time()
            while not self._stop_event.is_set():
                sent = time.time()
                t = time.perf_counter()
                answer = self.conn.roundtrip(self.line)
                self.samples.append((sent, (time.perf_counter() - t) * 1000))
                if not answer.startswith(b"g OK "):
                    raise BenchError(f"GET answered {answer!r}")
                next_at = max(next_at + GET_INTERVAL, time.time())
                self._stop_event.wait(max(0.0, next_at - time.time()))
        except BaseException as e:  # reported by the scenario
            self.error = e

    def stop(self) -> list[tuple[float, float]]:
        self._stop_event.set()
        self.join(60)
        self.conn.close()
        if self.error is not None:
            raise BenchError(f"GET sampler failed: {self.error}")
        return self.samples


def _drain(ctx: Context, n: int) -> tuple[float, list[float], float, int]:
    """One fresh daemon: (jobs/s, sorted GET ms during the drain, daemon CPU s, peak pending)."""
    settings = LOGFILE_FSYNC
    with fire_daemon(ctx, "shell-drain", settings) as d:
        conn = Connection(d.port)
        conn.command("RULE SET rule.drain drain. shell true")
        conn.command(f"SET probe.job {time.time_ns() + 86_400 * SECOND_NS}")
        due = time.time_ns() + 2 * SECOND_NS
        schedule(d, "drain.", [due] * n)
        sampler = _GetSampler(d.port, "probe.job")
        sampler.start()
        cpu0 = d.cpu_seconds()
        try:
            done_at, stat, max_pending = wait_for_runs(conn, n, due / 1e9 + 120, 0.02)
        finally:
            samples = sampler.stop()
        cpu = d.cpu_seconds() - cpu0
        conn.close()
    if int(stat["jobs_failed"]):
        raise BenchError(f"{stat['jobs_failed']} drain jobs failed; see {d.workdir}/daemon.log")
    start = due / 1e9
    during = sorted(ms for sent, ms in samples if start <= sent <= done_at)
    if len(during) < 10:
        raise BenchError(f"only {len(during)} GETs were sent while the jobs drained")
    rate = n / (done_at - start)
    ctx.say(
        f"drain: {n} `true` jobs at {rate:,.0f}/s; {len(during)} GETs meanwhile,"
        f" p50 {percentile(during, 0.5):.2f} ms p99 {percentile(during, 0.99):.2f} ms"
        f" max {during[-1]:.2f} ms"
    )
    return rate, during, cpu, max_pending


def scenario_shell_drain(ctx: Context) -> list[Metric]:
    """Issue 9: 3,000 `shell true` due at once: jobs/s (>= 1,000), another GET p99 (<= 10 ms)."""
    n = JOBS
    runs = sorted((_drain(ctx, n) for _ in range(ctx.repeats)), key=lambda r: r[0])
    rate, gets, cpu, max_pending = runs[len(runs) // 2]
    p99s = [percentile(r[1], 0.99) for r in runs]
    how = (
        f"{n:,} `shell true` jobs (/bin/sh -c true) all due at the same instant; another"
        f" connection sends one `GET` every {GET_INTERVAL * 1000:.0f} ms (the next at once if"
        f" one took longer); jobs/s = jobs / (time STAT first showed all ended - due time),"
        f" STAT polled every 20 ms on a third connection. {LOGFILE_FSYNC.describe()}."
        f" {len(runs)} run(s) on fresh daemons; figures from the run with the median rate"
        f" (rates {' / '.join(f'{r[0]:,.0f}' for r in runs)}/s; GET p99"
        f" {' / '.join(f'{p:.2f}' for p in p99s)} ms); in that run daemon CPU"
        f" {100 * cpu * rate / n:.0f}% of one core, {1000 * cpu / n:.2f} ms per job,"
        f" executions_pending peaked at {max_pending}; none failed."
    )
    return [
        Metric(
            "shell_drain",
            "shell_drain_per_s",
            f"trivial shell jobs/s while {n:,} due at once drain",
            rate,
            "jobs/s",
            at_least(TARGET_RATE),
            "",
            how,
        ),
        Metric(
            "shell_drain",
            "shell_drain_get_p99_ms",
            f"another client's GET round trip p99 while {n:,} shell jobs drain",
            percentile(gets, 0.99),
            "ms",
            at_most(TARGET_GET_P99_MS),
            "",
            f"Same run: {len(gets)} GETs sent during the drain; p50"
            f" {percentile(gets, 0.5):.2f} ms, max {gets[-1]:.2f} ms; median p99 over runs"
            f" {statistics.median(p99s):.2f} ms.",
        ),
        Metric(
            "shell_drain",
            "shell_drain_get_p50_ms",
            "another client's GET round trip p50 (same run)",
            percentile(gets, 0.5),
            "ms",
            None,
            "",
            "",
        ),
    ]
