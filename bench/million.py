"""Target 4: a million jobs held (RSS, SET speed on a full server) and their log's replay."""

from __future__ import annotations

import statistics

from bench.client import Connection, check_all_ok, pipeline, set_lines
from bench.common import (
    LOGFILE_FSYNC,
    MB,
    MEMORY,
    Context,
    future_times,
    get_latencies,
    job_ids,
    percentile,
    rates,
    write_logfile,
)
from bench.daemon import BenchError, Daemon
from bench.report import Metric, at_most

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
