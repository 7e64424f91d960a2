"""Run history (issue 10 target: 100,000 jobs x 20 runs x 1 KB output in <= 400 MB RSS).

``history_memory``: a child process (real reactor, real writer thread, a SQLite file in the
scratch directory) records 100,000 job ids x 20 runs with 1 KB of output each through
``History`` (``runs=20``, ``output_bytes=4096``), round after round over every job, as a
daemon whose jobs all run would.  Runs are produced in chunks of ``CHUNK`` begin+finish
pairs on the reactor thread; a chunk is produced while the writer writes the previous one,
and the next waits for it (``flush``), so the queue never holds more than two chunks and
nothing is dropped.  Figures: the child's peak RSS (``ru_maxrss``), the time until every
run is committed (and runs/s); then, on the full file, a paced phase of 5,000 runs/s for
``PACED_S`` s: the reactor-thread cost of ``begin``+``finish`` per run (wall time, so GIL
waits count), the process's CPU share and the writer's lag; a ``read`` round trip; and the
``open`` of the full file after ``close``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import Context
from bench.report import Metric, at_most

TARGET_RSS_MB = 400.0
JOBS = 100_000
QUICK_JOBS = 10_000
RUNS = 20
OUTPUT = 1024
CHUNK = 5_000
PACED_RATE = 5_000
PACED_S = 5
ROOT = Path(__file__).resolve().parent.parent


def _child(path: str, jobs: int) -> dict[str, Any]:
    """In the child: fill the history under the real reactor; the figures as a dict."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, inlineCallbacks
    from twisted.internet.task import LoopingCall, deferLater

    from ztick_tw.history import History

    pool = os.urandom(64 * 1024 + OUTPUT)
    ids = [f"job.{i:07d}" for i in range(jobs)]
    out: dict[str, Any] = {}

    def produce(history: History, first: int, count: int, run_round: int) -> float:
        begin, finish, clock = history.begin, history.finish, time.perf_counter
        due = 1_700_000_000_000_000_000 + run_round * 60_000_000_000
        t0 = clock()
        for k in range(first, first + count):
            start = (k * 97) % (64 * 1024)
            handle = begin(ids[k], due, due + 1000, 1)
            finish(handle, due + 2000, "executed", 0, "exit 0", pool[start : start + OUTPUT])
        return clock() - t0

    @inlineCallbacks
    def main() -> Any:
        history = History(path, runs=RUNS, output_bytes=4096, reactor=reactor)
        history.open()
        on_reactor = 0.0
        previous: Deferred[None] | None = None
        t0 = time.perf_counter()
        for run_round in range(RUNS):
            for first in range(0, jobs, CHUNK):
                on_reactor += produce(history, first, min(CHUNK, jobs - first), run_round)
                if previous is not None:
                    yield previous
                previous = history.flush()
        assert previous is not None
        yield previous
        out["write_s"] = time.perf_counter() - t0
        out["reactor_us"] = on_reactor / (jobs * RUNS) * 1e6
        out["dropped"] = history.dropped_outputs + history.dropped_runs
        out["rss_fill_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

        # 5,000 runs/s on the full file: every 10 ms, the runs due by then.
        cursor = [0]
        lag = [0]
        spent = [0.0]
        reads: list[float] = []
        ticks = [0]

        def tick() -> None:
            count = int((time.perf_counter() - wall0) * PACED_RATE) - cursor[0]
            if count > 0:
                first = cursor[0] % (jobs - count) if count < jobs else 0
                spent[0] += produce(history, first, min(count, jobs), RUNS)
                cursor[0] += count
            lag[0] = max(lag[0], history.pending)
            ticks[0] += 1
            if ticks[0] % 2 == 0:  # a read every 20 ms, timed to its answer
                sent = time.perf_counter()
                history.read(ids[cursor[0] % jobs], 10).addCallback(
                    lambda _: reads.append((time.perf_counter() - sent) * 1000)
                )

        cpu0, wall0 = time.process_time(), time.perf_counter()
        loop = LoopingCall(tick)
        loop.start(0.01)
        yield deferLater(reactor, PACED_S, lambda: None)
        loop.stop()
        yield history.flush()
        wall = time.perf_counter() - wall0
        out["paced_rate"] = cursor[0] / wall
        out["paced_cpu_pct"] = 100 * (time.process_time() - cpu0) / wall
        out["paced_max_pending"] = lag[0]
        out["paced_reactor_us"] = spent[0] / cursor[0] * 1e6
        reads.sort()
        out["paced_read_p50_ms"] = reads[len(reads) // 2]
        out["paced_read_p99_ms"] = reads[min(len(reads) - 1, len(reads) * 99 // 100)]

        t1 = time.perf_counter()
        records = yield history.read(ids[jobs // 2], 10)
        out["read_ms"] = (time.perf_counter() - t1) * 1000
        assert len(records) == 10, records
        yield history.close()
        out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out["file_mb"] = sum(
            os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p)
        ) / (1 << 20)

        again = History(path, runs=RUNS, output_bytes=4096, reactor=reactor)
        t2 = time.perf_counter()
        again.open()
        out["open_s"] = time.perf_counter() - t2
        yield again.close()

    def run() -> None:
        d = main()
        d.addErrback(lambda f: out.setdefault("error", f.getTraceback()))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    return out


def history_memory(ctx: Context) -> list[Metric]:
    """Issue 10: 100,000 jobs x 20 runs x 1 KB of history through History: RSS <= 400 MB."""
    jobs = QUICK_JOBS if ctx.quick else JOBS
    path = ctx.workdir("history-memory") / "logfile.history.sqlite"
    command = [sys.executable, "-m", "bench.history", str(path), str(jobs)]
    child = subprocess.run(command, cwd=ROOT, capture_output=True, check=False, timeout=3600)
    if child.returncode != 0:
        raise RuntimeError(f"history child failed: {child.stderr.decode(errors='replace')}")
    got: dict[str, Any] = json.loads(child.stdout)
    if "error" in got:
        raise RuntimeError(f"history child failed: {got['error']}")
    runs = jobs * RUNS
    ctx.say(
        f"{runs:,} runs in {got['write_s']:.1f} s ({runs / got['write_s']:,.0f}/s), "
        f"peak RSS {got['rss_mb']:.0f} MB, file {got['file_mb']:.0f} MB, "
        f"{got['reactor_us']:.1f} us/run on the reactor, dropped {got['dropped']}"
    )
    ctx.say(
        f"paced {got['paced_rate']:,.0f} runs/s: CPU {got['paced_cpu_pct']:.0f}%, "
        f"{got['paced_reactor_us']:.1f} us/run on the reactor, "
        f"max pending {got['paced_max_pending']}; read {got['read_ms']:.1f} ms; "
        f"reopen {got['open_s'] * 1000:.0f} ms"
    )
    name = "history_memory"
    return [
        Metric(
            name,
            "rss_mb",
            f"peak RSS, {jobs:,} jobs x {RUNS} runs x 1 KB recorded",
            got["rss_mb"],
            "MB",
            at_most(TARGET_RSS_MB),
            detail=f"{got['rss_fill_mb']:.0f} MB after the fill; SQLite file "
            f"{got['file_mb']:.0f} MB; dropped {got['dropped']}",
        ),
        Metric(
            name,
            "write_s",
            f"time to record and commit {runs:,} runs",
            got["write_s"],
            "s",
            detail=f"{runs / got['write_s']:,.0f} runs/s through one writer thread",
        ),
        Metric(
            name,
            "reactor_us",
            f"begin+finish on the reactor thread, per run, at {PACED_RATE:,} runs/s",
            got["paced_reactor_us"],
            "us",
            detail=f"{got['reactor_us']:.1f} us/run during the fill, the writer busy "
            "beside it (GIL)",
        ),
        Metric(
            name,
            "paced_cpu_pct",
            f"process CPU at {PACED_RATE:,} runs/s on the full file",
            got["paced_cpu_pct"],
            "%",
            detail=f"{got['paced_rate']:,.0f} runs/s sustained {PACED_S} s; at most "
            f"{got['paced_max_pending']} operations waiting",
        ),
        Metric(
            name,
            "read_p99_ms",
            f"read(job, 10) round trip p99 while {PACED_RATE:,} runs/s are written",
            got["paced_read_p99_ms"],
            "ms",
            detail=f"p50 {got['paced_read_p50_ms']:.1f} ms; idle: {got['read_ms']:.1f} ms "
            "(reads wait their turn on the writer thread)",
        ),
        Metric(name, "open_ms", "open() of the full file after close", got["open_s"] * 1000, "ms"),
    ]


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], int(sys.argv[2]))))
