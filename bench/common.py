"""What every benchmark scenario shares: the Context, constants, daemon settings and helpers.

Imports no scenario module: the scenario modules build on it, and the registry
(``bench.scenarios``) on them.
"""

from __future__ import annotations

import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.client import Answers, Connection, check_all_ok, pipeline, set_lines
from bench.daemon import BenchError, Daemon, DaemonSettings

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


def fire_daemon(ctx: Context, name: str, settings: DaemonSettings) -> Daemon:
    return Daemon(ctx.workdir(name), settings)


def schedule(d: Daemon, prefix: str, due: Sequence[int]) -> None:
    payload = set_lines([f"{prefix}{i:06d}" for i in range(len(due))], due)
    check_all_ok(pipeline(d.port, payload, len(due)), len(due), f"scheduling {prefix}*")
