"""Time rules of SPEC §8: DST gaps and folds, exact intervals, decay, until, properties.

DST days in Europe/Paris and America/New_York; properties of after() and preview().
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from ztick_tw.schedules import Options, compile_schedule, parse_options, parse_time

HOUR = 3600 * 10**9


def walk(text: str, now: str, count: int, *options: str) -> list[str]:
    """ISO strings of ``count`` instants from the start."""
    s = compile_schedule(text, parse_options(options), parse_time(now))
    return [s.iso(t) for t in s.preview(count)]


def test_paris_spring_gap_daily_fires_once_after_the_gap() -> None:
    """`daily starting 02:30` in Paris: 2024-03-31 02:30 does not exist -> 03:00 once.

    The next day is back at 02:30.
    """
    assert walk("daily starting 02:30", "2024-03-30T12:00:00Z", 3, "tz=Europe/Paris") == [
        "2024-03-30T02:30:00+01:00",
        "2024-03-31T03:00:00+02:00",
        "2024-04-01T02:30:00+02:00",
    ]


def test_paris_fall_fold_daily_fires_once_at_the_first_occurrence() -> None:
    """On 2024-10-27 02:30 happens twice in Paris: the schedule fires at the first one only."""
    assert walk("daily starting 02:30", "2024-10-26T12:00:00Z", 3, "tz=Europe/Paris") == [
        "2024-10-26T02:30:00+02:00",
        "2024-10-27T02:30:00+02:00",
        "2024-10-28T02:30:00+01:00",
    ]


def test_new_york_cron_gap_and_fold() -> None:
    """Cron `30 2 * * *` in New York: 03:00 EDT on 2024-03-10, the first 01:30 of the fold."""
    assert walk("30 2 * * *", "2024-03-09T12:00:00Z", 3, "tz=America/New_York") == [
        "2024-03-10T03:00:00-04:00",
        "2024-03-11T02:30:00-04:00",
        "2024-03-12T02:30:00-04:00",
    ]
    assert walk("30 1 * * *", "2024-11-02T12:00:00Z", 3, "tz=America/New_York") == [
        "2024-11-03T01:30:00-04:00",
        "2024-11-04T01:30:00-05:00",
        "2024-11-05T01:30:00-05:00",
    ]


def test_cron_in_the_fold_fires_once_for_every_wall_minute() -> None:
    """`*/30 * * * *` across the Paris fall-back: each wall time once.

    The repeated hour's second pass is not fired again (SPEC: a fold fires once, first).
    """
    got = walk("*/30 * * * *", "2024-10-27T00:15:00Z", 4, "tz=Europe/Paris")
    assert got == [
        "2024-10-27T02:30:00+02:00",
        "2024-10-27T03:00:00+01:00",
        "2024-10-27T03:30:00+01:00",
        "2024-10-27T04:00:00+01:00",
    ]


def test_every_n_hours_stays_exact_across_dst() -> None:
    """`every 1 hour` in Paris across both changes: always exactly one hour apart."""
    for now in ("2024-03-30T22:30:00Z", "2024-10-26T22:30:00Z"):
        s = compile_schedule("every 1 hour", parse_options(["tz=Europe/Paris"]), parse_time(now))
        got = s.preview(6)
        assert [b - a for a, b in itertools.pairwise(got)] == [HOUR] * 5


def test_weekly_in_new_york_keeps_the_wall_time_across_dst() -> None:
    """`weekly starting Monday at 09:00` keeps 09:00 local before and after the change."""
    got = walk(
        "weekly starting 2024-03-04 09:00", "2024-03-01T00:00:00Z", 3, "tz=America/New_York"
    )
    assert got == [
        "2024-03-04T09:00:00-05:00",
        "2024-03-11T09:00:00-04:00",
        "2024-03-18T09:00:00-04:00",
    ]


def test_decay_follows_spec_formula() -> None:
    """Next = prev + interval * max(1, ceil(age/step))**decay, age = prev - start."""
    s = compile_schedule("every 10 seconds", parse_options(["decay=1", "decay_step=20s"]), 0)
    got = [t // 10**9 for t in s.preview(7)]
    # ages 0,10 -> x1; 20 -> x1; 30 -> x2; 50 -> x3; 80 -> x4; 120 -> x6
    assert got == [0, 10, 20, 30, 50, 80, 120]
    half = compile_schedule("every 100 seconds", parse_options(["decay=-1", "decay_step=100s"]), 0)
    assert [t // 10**9 for t in half.preview(4)] == [0, 100, 200, 250]


def test_until_and_limit_shorten_preview_and_until_ends_after() -> None:
    """`until` ends the schedule (after() returns None at or past it); `limit` caps preview."""
    opts = parse_options(["until=2024-01-01T00:00:30Z"])
    s = compile_schedule("every 10 seconds starting 2024-01-01", opts, 0)
    assert len(s.preview(100)) == 3
    assert s.after(parse_time("2024-01-01T00:00:20Z")) is None
    limited = compile_schedule("every 10 seconds", parse_options(["limit=4"]), 0)
    assert len(limited.preview(100)) == 4
    assert limited.after(30 * 10**9) == 40 * 10**9  # after() does not apply limit


def test_start_in_the_past_is_the_first_occurrence() -> None:
    """A start in the past is still the first occurrence (the scheduler fires it at once)."""
    s = compile_schedule(
        "every 1 day starting 2020-01-01", Options(), parse_time("2024-01-01T00:00:00Z")
    )
    assert s.first() == parse_time("2020-01-01T00:00:00Z")


SCHEDULES = [
    ("every 7 seconds", ()),
    ("every 90 minutes", ("tz=Europe/Paris",)),
    ("every 3 seconds", ("decay=0.5", "decay_step=1d")),
    ("daily starting 02:30", ("tz=Europe/Paris",)),
    ("every 1 month starting 2024-01-31", ("tz=America/New_York",)),
    ("30 2 * * *", ("tz=Europe/Paris",)),
    ("*/15 * * * *", ("tz=America/New_York",)),
    ("0 0 13 * fri", ()),
    ("daily and mon-fri", ("tz=Europe/Paris",)),
    ("every 6 hours & mon-fri & jun-aug", ()),
    ("daily or 0 14 * * * starting 00:00", ("tz=America/New_York",)),
    ("mon-fri or sat", ("tz=Europe/Paris",)),
]
# 2023-01-01 .. 2027-01-01, so DST changes are crossed.
instants = st.integers(min_value=1_672_531_200 * 10**9, max_value=1_798_761_600 * 10**9)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SCHEDULES), instants, instants)
def test_after_is_strictly_later_and_monotone(
    case: tuple[str, tuple[str, ...]], now: int, x: int
) -> None:
    """after(x) > x, and after(after(x)) > after(x), for every kind of schedule."""
    text, options = case
    s = compile_schedule(text, parse_options(options), now)
    a = s.after(x)
    assert a is not None and a > x
    b = s.after(a)
    assert b is not None and b > a
    assert s.after(a - 1) == a  # nothing between x and a: a is the first after a - 1


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SCHEDULES), instants)
def test_preview_agrees_with_iterating_after(case: tuple[str, tuple[str, ...]], now: int) -> None:
    """preview(n) is first() then after() repeatedly, and a fresh schedule agrees."""
    text, options = case
    s = compile_schedule(text, parse_options(options), now)
    got = s.preview(20)
    fresh = compile_schedule(text, parse_options(options), now)
    t = fresh.first()
    walked: list[int] = []
    while t is not None and len(walked) < 20:
        walked.append(t)
        t = fresh.after(t)
    assert got == walked
    assert all(a < b for a, b in itertools.pairwise(got))
    # an unrelated query in between does not change the answers (caches are safe)
    probe = compile_schedule(text, parse_options(options), now)
    probe.after(now + 10**18)
    assert [probe.after(t - 1) for t in got] == got
