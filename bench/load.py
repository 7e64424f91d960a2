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

import statistics
from array import array
from collections import Counter

from bench.common import LOGFILE_FSYNC, MB, SECOND_NS, Context, percentile, rates
from bench.daemon import Daemon
from bench.load_clients import (
    ANSWER_TIMEOUT_NS,
    GET,
    IDS_PER_CONNECTION,
    KEPT_ERRORS,
    KINDS,
    QUERY,
    QUERY_EVERY,
    SET,
    ConnResult,
)
from bench.load_run import SETTLE_SECONDS, WORKERS, LoadRun, reference_rss, run_load
from bench.report import Metric, at_least, at_most

#: A connect slower than this was held up (a dropped SYN is sent again after 1 s).
SLOW_CONNECT = 0.5
#: How much more RSS than "before + the cost of the final jobs" still counts as flat.
RSS_TOLERANCE_MB = 4.0
#: How much RSS a second wave of the same clients may add.  With 1,000 clients RSS moved
#: by -0.9 to +1.2 MB from one wave to the next (malloc's heap; stale due-heap entries
#: between compactions), and five waves in a row stayed within 64.0-65.2 MB; a connection
#: takes about 8 kB at the peak, so leaking whole connections would add far more.
SECOND_WAVE_TOLERANCE_MB = 2.0

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
