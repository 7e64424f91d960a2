"""Prometheus ``/metrics`` (issue 11): scrape time with 1,000,000 jobs held, and SET cost.

``metrics_scrape``: a child process holds a scheduler with 1,000,000 planned jobs
(``--quick``: 100,000) and 100 rules, its histograms filled as after real runs, and serves
``/metrics`` with ``ztick_tw.metrics.metrics_service`` on 127.0.0.1.  This process scrapes
it over one keep-alive HTTP connection (``SCRAPES`` times after a warm-up) and reports
p50/p99/max of the whole request (connect excluded, body read included); then the same
against a child holding no jobs, to show the cost does not grow with the jobs held.
Target: p50 ≤ 10 ms with 1,000,000 jobs.

Then, in this process, ``SET`` (``Scheduler.set_job``, memory store) with metrics off and
with ``PrometheusMetrics`` installed: SET never calls a hook, so both rates are the same
within noise; the ratio is reported.

The daemon does not mount ``/metrics`` until ``service.py`` wires it, so the child uses
the same classes directly (scheduler, operations, ``metrics_service``) rather than
``python -m ztick_tw``.
"""

from __future__ import annotations

import gc
import http.client
import statistics
import subprocess
import sys
import time
from typing import Any

from bench.common import Context
from bench.report import Metric, at_most
from tests.ports import free_port

#: Jobs the child holds (``--quick``: ``QUICK_JOBS``).
JOBS = 1_000_000
QUICK_JOBS = 100_000
#: Timed scrapes per child (after ``WARMUP``).
SCRAPES = 200
WARMUP = 10
#: SETs per timed SET pass.
SETS = 200_000
#: Passes of each (metrics off, on); the best of each is compared.
SET_PASSES = 8


def _serve(jobs: int, port: int) -> None:
    """The child: hold ``jobs`` jobs and serve ``/metrics`` on ``port`` until stdin closes."""
    from twisted.internet import reactor as _reactor

    from ztick_tw.model import Rule, ShellSpec
    from ztick_tw.operations import Operations
    from ztick_tw.prometheus import PrometheusMetrics, install, metrics_service
    from ztick_tw.scheduler.core import Scheduler
    from ztick_tw.store.memory import MemoryStore

    reactor: Any = _reactor
    scheduler = Scheduler(reactor, MemoryStore(), {})
    for i in range(100):
        scheduler.set_rule(Rule(f"rule.{i}", f"job.{i:02d}", ShellSpec("true")))
    base = 2**62
    for i in range(jobs):
        scheduler.set_job(f"job.{i:07d}", base + i)
    metrics = PrometheusMetrics(Operations(scheduler, reactor, persistence="memory"))
    install(metrics, scheduler, None)
    # Every label set a busy daemon has, with observations in every bucket.
    for kind in ("shell", "direct", "awf", "http", "redis", "amqp"):
        for word in ("executed", "failed", "timeout", "cancelled", "interrupted"):
            for ms in (1, 30, 700, 9000):
                metrics.run_ended(kind, word, ms * 1_000_000)
    for us in (50, 400, 3000, 80_000):
        metrics.trigger_lag(us * 1000)
        metrics.fsync(us / 1e6)
    metrics.compaction("success", 1.5)
    service = metrics_service(f"tcp:{port}:interface=127.0.0.1", metrics, reactor)
    service.startService()  # type: ignore[no-untyped-call]

    def stdin_closed() -> None:
        reactor.stop()

    from twisted.internet import stdio
    from twisted.internet.protocol import Protocol

    class Watch(Protocol):
        def connectionLost(self, reason: object = None) -> None:
            stdin_closed()

    stdio.StandardIO(Watch(), reactor=reactor)  # type: ignore[no-untyped-call]
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


def _child(jobs: int) -> tuple[subprocess.Popen[str], int]:
    """Start a child holding ``jobs`` jobs; its process and port once it serves."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.metrics", "serve", str(jobs), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the metrics child did not start: {line!r}")
    return proc, port


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _scrapes(port: int, count: int) -> tuple[list[float], int]:
    """Time ``count`` GET /metrics on one keep-alive connection; seconds each, body size."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    size = 0
    times: list[float] = []
    try:
        for i in range(WARMUP + count):
            started = time.perf_counter()
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read()
            took = time.perf_counter() - started
            if response.status != 200 or b"ztick_jobs" not in body:
                raise RuntimeError(f"bad scrape: {response.status}")
            size = len(body)
            if i >= WARMUP:
                times.append(took)
    finally:
        conn.close()
    return times, size


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _set_rate(with_metrics: bool, count: int) -> float:
    """SET/s of ``Scheduler.set_job`` on a memory store, metrics installed or not."""
    from twisted.internet.task import Clock

    from ztick_tw.operations import Operations
    from ztick_tw.prometheus import PrometheusMetrics, install
    from ztick_tw.scheduler.core import Scheduler
    from ztick_tw.store.memory import MemoryStore

    clock = Clock()
    scheduler = Scheduler(clock, MemoryStore(), {})
    if with_metrics:
        metrics = PrometheusMetrics(Operations(scheduler, clock, persistence="memory"))
        install(metrics, scheduler, None)
    ids = [f"job.{i:07d}" for i in range(count)]
    base = 2**62
    set_job = scheduler.set_job
    started = time.process_time()  # CPU time: other processes on the machine do not count
    for i, job_id in enumerate(ids):
        set_job(job_id, base + i)
    return count / (time.process_time() - started)


def metrics_scrape(ctx: Context) -> list[Metric]:
    """``/metrics`` scrape time with 1,000,000 jobs held (≤ 10 ms), and with none."""
    jobs = QUICK_JOBS if ctx.quick else JOBS
    figures: dict[int, tuple[list[float], int]] = {}
    for held in (jobs, 0):
        ctx.say(f"metrics: child holding {held:,} jobs")
        proc, port = _child(held)
        try:
            figures[held] = _scrapes(port, SCRAPES)
        finally:
            _stop(proc)
    full, size = figures[jobs]
    empty, _ = figures[0]
    p50 = statistics.median(full) * 1000
    ctx.say(
        f"metrics: {jobs:,} jobs p50 {p50:.2f} ms p99 {_quantile(full, 0.99) * 1000:.2f} ms;"
        f" 0 jobs p50 {statistics.median(empty) * 1000:.2f} ms; {size} bytes"
    )
    rates_off: list[float] = []
    rates_on: list[float] = []
    for i in range(max(SET_PASSES, ctx.repeats)):
        # alternate which goes first, so warm-up and the collector favour neither
        for with_metrics in (False, True) if i % 2 == 0 else (True, False):
            gc.collect()
            rate = _set_rate(with_metrics, SETS)
            (rates_on if with_metrics else rates_off).append(rate)
    # best of each: the machine is shared, and noise only ever slows a pass down
    off, on = max(rates_off), max(rates_on)
    label = f"{jobs // 1000}k" if jobs < 1_000_000 else f"{jobs // 1_000_000}M"
    return [
        Metric(
            "metrics_scrape",
            "scrape_p50_ms",
            f"/metrics scrape p50, {label} jobs held",
            p50,
            "ms",
            at_most(10.0),
            detail=f"{SCRAPES} scrapes, one keep-alive connection, {size} bytes",
        ),
        Metric(
            "metrics_scrape",
            "scrape_p99_ms",
            f"/metrics scrape p99, {label} jobs held",
            _quantile(full, 0.99) * 1000,
            "ms",
        ),
        Metric(
            "metrics_scrape",
            "scrape_max_ms",
            f"/metrics scrape max, {label} jobs held",
            max(full) * 1000,
            "ms",
        ),
        Metric(
            "metrics_scrape",
            "scrape_empty_p50_ms",
            "/metrics scrape p50, no jobs held",
            statistics.median(empty) * 1000,
            "ms",
        ),
        Metric(
            "metrics_scrape",
            "set_ratio",
            "Scheduler.set_job rate (best pass, CPU time), metrics on / off",
            on / off,
            "x",
            detail=f"off {off:,.0f}/s, on {on:,.0f}/s (memory store, in process)",
        ),
    ]


def main(argv: list[str]) -> int:
    """``serve JOBS PORT`` (the child), or run the scenario and print its figures."""
    if argv[:1] == ["serve"]:
        _serve(int(argv[1]), int(argv[2]))
        return 0
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as root:
        ctx = Context(quick="--quick" in argv, root=Path(root), repeats=3)
        for m in metrics_scrape(ctx):
            print(f"{m.label}: {m.value:.3f} {m.unit} {m.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
