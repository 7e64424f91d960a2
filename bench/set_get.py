"""Targets 1-3: SET throughput (memory and logfile + fsync backends) and GET latency."""

from __future__ import annotations

import contextlib
import os
import statistics

from bench.client import (
    Connection,
    check_all_ok,
    pipeline,
    pipeline_many,
    request_response_many,
    set_lines,
)
from bench.common import (
    LOGFILE_FSYNC,
    MEMORY,
    Context,
    Usage,
    future_times,
    get_latencies,
    job_ids,
    measured,
    percentile,
    rates,
)
from bench.daemon import Daemon, DaemonSettings, process_cpu_seconds
from bench.floor import FloorServer
from bench.report import Metric, at_least, at_most

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
