"""Logfile compaction (issue 5): growth, compaction time, replay, SET throughput meanwhile.

``compaction``: a logfile of 1,000,000 jobs x 10 mutations (10,000,001 frames; ``--quick``:
100,000 jobs, 1,000,001 frames), written directly with the daemon's codec
(:func:`write_mutated_logfile` says exactly what is in it).  Per run, on a fresh copy of
it: the daemon's replay (spawn to port accepting, and its own ``loaded ... in X s``),
its RSS, then a compaction started with SIGUSR1 and followed by polling STAT
``compression`` every 20 ms until ``success`` (the daemon's own ``compaction done in
X s`` line is read too), the file size after, and the replay of the compacted file by a
new daemon.  The state is checked to survive: STAT's job counts and 1,000 sampled GETs
are the same before the compaction, after it, and after the restart.

``compaction_set``: pipelined SETs on one connection (logfile backend, fsync on, as in
``set_logfile``) to a daemon that replayed 1,000,000 planned jobs (``--quick``: 100,000),
measured with no compaction and while a compaction runs (SIGUSR1 right before the load).
A second connection polls STAT every 20 ms throughout, so the run knows whether the
whole measured window lay inside the compaction (a run where it did not is repeated);
the same poller runs during the normal runs so both see the same extra load.

Both use the default ``compression_interval`` (3600 s), which never fires within a run:
every run checks STAT says ``idle`` before the SIGUSR1.
"""

from __future__ import annotations

import statistics
import time

from bench.client import set_lines
from bench.common import MB, Context, future_times, job_ids, rates, write_logfile
from bench.compaction_log import MUTATIONS, write_mutated_logfile
from bench.compaction_run import (
    ATTEMPTS,
    NOISY_PERCENT,
    SAMPLED_GETS,
    SETTINGS,
    STALL_WINDOW,
    SetRun,
    compaction_run,
    measure_set,
    per_run,
)
from bench.compaction_watch import POLL_SECONDS
from bench.daemon import BenchError
from bench.report import Metric, at_least

#: Jobs in the logfiles (``--quick``: ``QUICK_JOBS``).
JOBS = 1_000_000
QUICK_JOBS = 100_000
#: Pipelined SETs per ``compaction_set`` measurement (as ``set_logfile``).
SET_LOAD = 200_000
QUICK_SET_LOAD = 30_000
#: The issue's target: SET throughput during a compaction at least this share of normal.
TARGET_SHARE = 0.8


def scenario_compaction(ctx: Context) -> list[Metric]:
    """Issue 5: 1M jobs x 10 mutations: log size, compaction time, replay before/after."""
    n = QUICK_JOBS if ctx.quick else JOBS
    source = ctx.workdir("compaction-source") / "logfile"
    t = time.perf_counter()
    content = write_mutated_logfile(source, n)
    ctx.say(
        f"wrote {content.frames:,} frames ({content.size / MB:.0f} MB) in"
        f" {time.perf_counter() - t:.1f} s"
    )
    runs = [compaction_run(ctx, source, content, r) for r in range(ctx.repeats)]
    source.unlink()
    k = len(runs)
    first = runs[0]
    if any((r.size_before, r.size_after) != (first.size_before, first.size_after) for r in runs):
        raise BenchError(
            "the runs' file sizes differ: " + str([(r.size_before, r.size_after) for r in runs])
        )

    def med(attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in runs))

    def each(attr: str, scale: float = 1.0, fmt: str = ".2f") -> str:
        return per_run([getattr(r, attr) * scale for r in runs], fmt)

    label_n = f"{n:,} jobs x {MUTATIONS}"
    return [
        Metric(
            "compaction",
            "compaction_log_before_mb",
            f"logfile of {label_n} mutations, before compaction",
            first.size_before / MB,
            "MB",
            None,
            "",
            content.describe(),
        ),
        Metric(
            "compaction",
            "compaction_log_after_mb",
            "the same logfile after compaction",
            first.size_after / MB,
            "MB",
            None,
            "",
            f"{first.frames_before:,} frames -> {first.frames_after:,} (one per job and rule;"
            f" default retention 0 keeps executed and failed jobs), {first.size_before:,} ->"
            f" {first.size_after:,} bytes, as the daemon logged and os.stat shows; STAT job"
            f" counts and {min(SAMPLED_GETS, n):,} sampled GETs were the same before the"
            f" compaction, after it and after a restart on the compacted file.",
        ),
        Metric(
            "compaction",
            "compaction_growth_x",
            f"logfile growth: {MUTATIONS} mutations per job vs compacted (size ratio)",
            first.size_before / first.size_after,
            "x",
            None,
            "",
            f"Size before / size after compaction ({first.size_before:,} / {first.size_after:,}"
            f" bytes): what compaction wins back after {MUTATIONS} writes per job.",
        ),
        Metric(
            "compaction",
            "compaction_seconds",
            f"compaction time, {first.frames_before:,} frames -> {first.frames_after:,}",
            med("compaction_wall"),
            "s",
            None,
            "",
            f"`kill -USR1` to the first STAT (polled every {POLL_SECONDS * 1000:.0f} ms on"
            f" a second connection) answering `compression success`, no load but that"
            f" polling; median of {k} ({each('compaction_wall')} s); the daemon's own"
            f" `compaction done in X s`: {each('compaction_logged', fmt='.3f')} s. Daemon CPU"
            f" meanwhile"
            f" {each('compaction_cpu')} s (the snapshot writer is throttled to a share of"
            f" the interpreter, so the wall time is mostly its rests). Largest VmRSS sampled"
            f" during it {each('rss_peak_during', 1 / MB, '.0f')} MB (RSS before"
            f" {each('rss_before', 1 / MB, '.0f')} MB; the snapshot copies the job dict and"
            f" sequence table). Slowest STAT round trip during it"
            f" {each('stat_max_during_ms', fmt='.1f')} ms (idle p50"
            f" {each('stat_p50_idle_ms', fmt='.2f')} ms); within {STALL_WINDOW} s of the"
            f" signal (the snapshot copy, on the reactor thread)"
            f" {each('stat_max_start_ms', fmt='.1f')} ms, within {STALL_WINDOW} s of the end"
            f" (the swap on the reactor thread: final copy, fsync, rename, and closing the"
            f" replaced file, which frees its blocks)"
            f" {each('stat_max_end_ms', fmt='.1f')} ms. {SETTINGS.describe()}. Other"
            f" processes used {each('foreign', fmt='.0f')}% of the machine during each run"
            f" (replay, compaction, restart).",
        ),
        Metric(
            "compaction",
            "compaction_replay_before_s",
            f"replay of the {content.frames:,}-frame log (start to accepting)",
            med("startup_before"),
            "s",
            None,
            "",
            f"Spawning `python -m ztick_tw` (interpreter start included) until a TCP connect"
            f" succeeds, file in the page cache (freshly copied, then `sync`); median of {k}"
            f" ({each('startup_before')} s); the daemon's own `loaded ... in X s`:"
            f" {each('loaded_before', fmt='.3f')} s. VmRSS after replay"
            f" {each('rss_before', 1 / MB, '.0f')} MB, peak (VmHWM, replay reads the whole"
            f" file) {each('hwm_replay', 1 / MB, '.0f')} MB.",
        ),
        Metric(
            "compaction",
            "compaction_replay_after_s",
            f"replay of the compacted {first.frames_after:,}-frame log (start to accepting)",
            med("startup_after"),
            "s",
            None,
            "",
            f"A new daemon on the compacted file, same method; median of {k}"
            f" ({each('startup_after')} s); its `loaded ... in X s`:"
            f" {each('loaded_after', fmt='.3f')} s; VmRSS after replay"
            f" {each('rss_after_restart', 1 / MB, '.0f')} MB.",
        ),
        Metric(
            "compaction",
            "compaction_rss_mb",
            f"daemon RSS after replaying the {content.frames:,}-frame log",
            med("rss_before") / MB,
            "MB",
            None,
            "",
            f"VmRSS right after replay (before compacting); median of {k}"
            f" ({each('rss_before', 1 / MB, '.0f')} MB).",
        ),
    ]


def scenario_compaction_set(ctx: Context) -> list[Metric]:
    """Issue 5: SET/s (1 conn, fsync) on 1M jobs while compacting vs not (≥ 80%)."""
    n = QUICK_JOBS if ctx.quick else JOBS
    count = QUICK_SET_LOAD if ctx.quick else SET_LOAD
    source = ctx.workdir("compaction-set-source") / "logfile"
    write_logfile(source, n)
    payload = set_lines(job_ids(n + 1, count), future_times(count, seed=51))
    normal: list[SetRun] = []
    during: list[SetRun] = []
    redone: list[SetRun] = []
    for run in range(ctx.repeats):
        # Alternate the order so that drift in the machine's state hits both alike.
        for compacting in (False, True) if run % 2 == 0 else (True, False):
            kept, others = measure_set(ctx, source, n, payload, count, compacting, run)
            (during if compacting else normal).append(kept)
            redone += others
    source.unlink()
    best_normal = max(normal, key=lambda r: r.rate)
    best_during = max(during, key=lambda r: r.rate)
    share = best_during.rate / best_normal.rate
    pairs = [d.rate / m.rate for d, m in zip(during, normal, strict=True)]
    k = len(normal)
    partial = [r for r in redone if r.compacting and r.overlap < 1.0]
    noisy = [r for r in redone if not (r.compacting and r.overlap < 1.0)]
    setup = (
        f"{count:,} pipelined SETs (new ids, due in the next 30 days) on one connection,"
        f" one pre-built blob, every OK after its frame was fsynced (group commit), to a"
        f" fresh daemon that replayed a logfile of 1 rule + {n:,} planned jobs; a second"
        f" connection polls STAT every {POLL_SECONDS * 1000:.0f} ms throughout (in both"
        f" kinds of run). {SETTINGS.describe()}."
    )

    def foreign(runs: list[SetRun]) -> str:
        return per_run([r.foreign for r in runs], ".0f")

    return [
        Metric(
            "compaction_set",
            "compaction_set_normal_per_s",
            f"SET/s, 1 connection pipelined, fsync, {n:,} jobs, no compaction",
            best_normal.rate,
            "SET/s",
            None,
            "",
            f"{setup} Best of {k} ({rates([r.rate for r in normal])}); best run:"
            f" {best_normal.usage.describe()}; slowest STAT round trip in the window"
            f" {per_run([r.stat_max_ms for r in normal], '.1f')} ms; other processes used"
            f" {foreign(normal)}% of the machine during the windows.",
        ),
        Metric(
            "compaction_set",
            "compaction_set_during_per_s",
            f"SET/s, the same while a compaction of the {n:,} jobs runs",
            best_during.rate,
            "SET/s",
            None,
            "",
            f"The same load sent right after `kill -USR1` (the snapshot copy on the reactor"
            f" thread falls inside the window); each measured window lay wholly inside the"
            f" compaction (a STAT answered after the last OK still said `running`):"
            f" windows {', '.join(f'{r.window_start:.2f}-{r.window_end:.2f}' for r in during)}"
            f" s after the signal, compactions (SIGUSR1 to STAT success, under this load)"
            f" {per_run([r.compaction_seconds for r in during])} s. Best of {k}"
            f" ({rates([r.rate for r in during])}); best run: {best_during.usage.describe()};"
            f" slowest STAT round trip in the window"
            f" {per_run([r.stat_max_ms for r in during], '.1f')} ms; other processes used"
            f" {foreign(during)}% of the machine during the windows.",
        ),
        Metric(
            "compaction_set",
            "compaction_set_share_percent",
            "SET/s during a compaction, as % of SET/s without",
            100 * share,
            "%",
            at_least(100 * TARGET_SHARE),
            "",
            f"Best during / best without ({best_during.rate:,.0f} / {best_normal.rate:,.0f});"
            f" the runs were interleaved (without, during; then the other way round), each"
            f" on a fresh daemon; the {k} pairwise ratios were"
            f" {per_run([100 * p for p in pairs], '.0f')}% (median"
            f" {100 * statistics.median(pairs):.0f}%). A run was measured again (up to"
            f" {ATTEMPTS} times, the least disturbed valid one kept) when other processes"
            f" used over {NOISY_PERCENT:.0f}% of the machine during its window"
            f" ({len(noisy)} such run(s)) or, during a compaction, when its window was not"
            f" wholly inside the compaction ({len(partial)} run(s)"
            + (
                f": overlaps {per_run([100 * r.overlap for r in partial], '.1f')}%"
                if partial
                else ""
            )
            + ").",
        ),
    ]
