"""Next-occurrence computation (issue 10 target: <= 20 us median).

``next_occurrence``: for each schedule below, ``Schedule.after(prev)`` where ``prev`` is the
previous occurrence (what the scheduler does after each run), timed one call at a time
with ``perf_counter_ns`` over a long walk through the schedule (DST days included for the
Paris ones); the figure is the median per kind (``every``, cron, combined ``and``/``or``)
and the worst median among that kind's schedules.  Pure CPU, no daemon.
"""

from __future__ import annotations

import statistics
import time

from bench.common import Context
from bench.report import Metric, at_most
from ztick_tw.schedules import compile_schedule, parse_options, parse_time

TARGET_US = 20.0
CALLS = 20_000
QUICK_CALLS = 2_000
NOW = "2024-03-01T00:00:00Z"

#: (kind, schedule, options)
SCHEDULES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("every", "every 1 second", ()),
    ("every", "every 30 minutes", ()),
    ("every", "every 10 seconds", ("decay=1", "decay_step=1d")),
    ("every", "daily starting 02:30", ("tz=Europe/Paris",)),
    ("every", "every 1 month starting 2024-01-31", ()),
    ("cron", "*/5 * * * *", ()),
    ("cron", "30 2 * * *", ("tz=Europe/Paris",)),
    ("cron", "0 9 * * mon-fri", ("tz=America/New_York",)),
    ("cron", "30 * * may-aug mon-fri", ()),
    ("combined", "daily and mon-fri starting May 2, 2024", ()),
    ("combined", "every 6 hours & mon-fri & jun-aug starting 2024-06-03", ()),
    ("combined", "daily or 0 14 * * * starting 00:00", ("tz=Europe/Paris",)),
)


def _timings(text: str, options: tuple[str, ...], calls: int) -> list[float]:
    """Microseconds of each ``after(prev)`` along the schedule."""
    schedule = compile_schedule(text, parse_options(options), parse_time(NOW))
    prev = schedule.first()
    out: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        if prev is None:  # the walk ran past year 9999: start again
            prev = schedule.first()
            assert prev is not None
        t0 = clock()
        nxt = schedule.after(prev)
        out.append((clock() - t0) / 1000)
        prev = nxt
    return out


def next_occurrence(ctx: Context) -> list[Metric]:
    """Issue 10: median us of Schedule.after(prev) for every / cron / combined (<= 20 us)."""
    calls = QUICK_CALLS if ctx.quick else CALLS
    by_kind: dict[str, list[float]] = {}
    worst: dict[str, tuple[float, str]] = {}
    for kind, text, options in SCHEDULES:
        samples = [x for _ in range(ctx.repeats) for x in _timings(text, options, calls)]
        median = statistics.median(samples)
        ctx.say(f"{kind:9} {median:6.2f} us  {text} {' '.join(options)}")
        by_kind.setdefault(kind, []).extend(samples)
        if median > worst.get(kind, (0.0, ""))[0]:
            worst[kind] = (median, text)
    metrics = []
    for kind, samples in by_kind.items():
        median, text = worst[kind]
        names = ", ".join(f"`{' '.join((t, *o))}`" for k, t, o in SCHEDULES if k == kind)
        p99 = statistics.quantiles(samples, n=100)[98]
        metrics.append(
            Metric(
                "next_occurrence",
                f"after_{kind}_us",
                f"Schedule.after(prev) median, {kind} schedules",
                statistics.median(samples),
                "us",
                at_most(TARGET_US),
                "",
                f"In process, no daemon: {names}; {calls:,} consecutive after(prev) calls "
                f"each x {ctx.repeats} run(s), each timed with perf_counter_ns; median of all "
                f"calls of the kind (p99 {p99:.1f} us); slowest schedule {text!r} "
                f"(median {median:.2f} us).",
            )
        )
    return metrics
