"""What the compaction scenarios read off the daemon and the machine while it compacts.

:class:`StatPoller` polls STAT on its own connection (``compression``, the round trip, the
daemon's RSS); :class:`OtherLoad` estimates how much of the machine other processes used;
:func:`done_line` reads the daemon's ``compaction done in X s`` log line.
"""

from __future__ import annotations

import os
import re
import resource
import threading
import time
from dataclasses import dataclass

from bench.client import Connection
from bench.daemon import BenchError, Daemon
from bench.machine import ForeignLoad, cpu_ticks

#: STAT polling interval while a compaction runs.
POLL_SECONDS = 0.02
#: A compaction that has not ended after this long fails the scenario.
COMPACTION_DEADLINE = 600.0

_DONE = re.compile(
    r"compaction done in (?P<seconds>[0-9.]+)s: (?P<frames_before>\d+) frames"
    r" \((?P<bytes_before>\d+) bytes\) -> (?P<frames_after>\d+) frames"
    r" \((?P<bytes_after>\d+) bytes\)"
)


# ------------------------------------------------------------------- other load


def _our_cpu(daemon: Daemon | None) -> float:
    """CPU seconds of this process, its reaped children and ``daemon`` (if running)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    return total + (daemon.cpu_seconds() if daemon is not None else 0.0)


class OtherLoad:
    """The share of the machine (%) other processes used meanwhile: two estimates, the smaller.

    ``ForeignLoad`` (bench/machine.py) sums the CPU of processes outside this benchmark's
    tree, their reaped children included, which over-counts when another program reaps a
    long-running child during the window (its whole lifetime lands in the window).  The
    second estimate is the machine's busy time (``/proc/stat``) minus the CPU of this
    process and its daemon(s), which over-counts the kernel work (writeback, journal)
    this benchmark causes.  Both are upper bounds; the smaller one is kept.
    """

    def __init__(self, daemon: Daemon | None = None) -> None:
        self._foreign = ForeignLoad()
        self._ticks = cpu_ticks()
        self._ours = _our_cpu(daemon)

    def stop(self, daemon: Daemon | None = None) -> float:
        """Percent of all cores other processes used since construction."""
        foreign = self._foreign.stop()
        total, idle = cpu_ticks()
        hz = os.sysconf("SC_CLK_TCK")
        capacity = (total - self._ticks[0]) / hz
        busy = capacity - (idle - self._ticks[1]) / hz
        if capacity <= 0:
            return foreign
        others = 100.0 * max(0.0, busy - (_our_cpu(daemon) - self._ours)) / capacity
        return min(foreign, others)


# ------------------------------------------------------------------- STAT polling


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float  # perf_counter when the answer was complete
    compression: str
    roundtrip: float  # s
    rss: int  # daemon VmRSS bytes then


class StatPoller:
    """A thread polling STAT on its own connection every ``interval`` s, recording each."""

    def __init__(self, daemon: Daemon, interval: float = POLL_SECONDS) -> None:
        self.daemon = daemon
        self.interval = interval
        self.samples: list[_Sample] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-stat-poller", daemon=True)

    def __enter__(self) -> StatPoller:
        self._thread.start()
        if not self._first.wait(30.0) or self.error is not None:
            self.stop()
            raise BenchError(f"STAT poller did not get a first answer: {self.error}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            conn = Connection(self.daemon.port, timeout=60.0)
        except OSError as e:
            self.error = e
            self._first.set()
            return
        try:
            while not self._stop.is_set():
                t = time.perf_counter()
                stat = conn.stat()
                now = time.perf_counter()
                self.samples.append(
                    _Sample(now, stat["compression"], now - t, self.daemon.rss_bytes())
                )
                self._first.set()
                self._stop.wait(self.interval)
        except Exception as e:  # reported by stop()
            self.error = e
            self._first.set()
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop polling; raise what went wrong in the thread, if anything."""
        self._stop.set()
        self._thread.join(60.0)
        if self.error is not None:
            raise BenchError(f"STAT poller failed: {self.error}")

    def wait_end(self, since: float, deadline: float) -> _Sample:
        """The first sample after ``since`` whose ``compression`` is success or failure."""
        while True:
            for s in reversed(self.samples):
                if s.at < since:
                    break
                if s.compression in ("success", "failure"):
                    return self.first_end(since)
            if self.error is not None:
                raise BenchError(f"STAT poller failed: {self.error}")
            if time.perf_counter() > deadline:
                raise BenchError(f"the compaction did not end within {COMPACTION_DEADLINE:.0f}s")
            time.sleep(self.interval / 2)

    def first_end(self, since: float) -> _Sample:
        """The first success/failure sample after ``since``."""
        for s in self.samples:
            if s.at >= since and s.compression in ("success", "failure"):
                return s
        raise BenchError("no end of compaction seen")

    def between(self, start: float, end: float) -> list[_Sample]:
        """Samples answered within [start, end]."""
        return [s for s in self.samples if start <= s.at <= end]


def done_line(daemon: Daemon, timeout: float = 10.0) -> re.Match[str]:
    """The daemon's ``compaction done in X s`` log line (waiting for the log to show it)."""
    deadline = time.perf_counter() + timeout
    while True:
        found = _DONE.search(daemon.log_text())
        if found is not None:
            return found
        if time.perf_counter() > deadline:
            raise BenchError(f"no 'compaction done' line in {daemon.workdir}/daemon.log")
        time.sleep(0.05)
