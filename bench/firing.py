"""Target 5: firing real children: trigger lag, 20 `sleep 1` jobs at once, shell jobs/s."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from bench.client import Connection
from bench.common import (
    LOGFILE_FSYNC,
    SECOND_NS,
    Context,
    fire_daemon,
    percentile,
    quote,
    rates,
    schedule,
    wait_for_runs,
)
from bench.daemon import BenchError, DaemonSettings
from bench.report import Metric, at_least, at_most

# ------------------------------------------------------------- 5: firing real children


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
    with fire_daemon(ctx, "trigger-lag", settings) as d:
        conn = Connection(d.port)
        conn.command("RULE SET rule.lag lag. shell true")
        start = time.time_ns() + 2 * SECOND_NS
        due = [start + i * SECOND_NS // rate for i in range(n)]
        schedule(d, "lag.", due)
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
    with fire_daemon(ctx, "trigger-lag-stamped", settings) as d:
        stamps = d.workdir / "stamps.txt"
        conn = Connection(d.port)
        command = f"echo $ZTICK_EXECUTION_NS ${{EPOCHREALTIME/./}} >> {stamps}"
        conn.command(f"RULE SET rule.stamp stamp. shell {quote(command)}")
        start = time.time_ns() + 2 * SECOND_NS
        due = [start + i * SECOND_NS // rate for i in range(n)]
        schedule(d, "stamp.", due)
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
    with fire_daemon(ctx, "sleep-jobs", settings) as d:
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
            schedule(d, prefix, [due] * jobs)
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
    with fire_daemon(ctx, "shell-burst", settings) as d:
        conn = Connection(d.port)
        conn.command("RULE SET rule.burst burst. shell true")
        due = time.time_ns() + 2 * SECOND_NS
        schedule(d, "burst.", [due] * n)
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
    with fire_daemon(ctx, "shell-paced", settings) as d:
        conn = Connection(d.port)
        conn.command("RULE SET rule.paced paced. shell true")
        start = time.time_ns() + 2 * SECOND_NS
        due_list = [start + i * SECOND_NS // rate for i in range(n)]
        schedule(d, "paced.", due_list)
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
