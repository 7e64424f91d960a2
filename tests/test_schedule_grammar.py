"""The schedule grammar of SPEC §8: the seed 004 examples, every form, and the errors."""

from __future__ import annotations

import itertools

import pytest

from ztick_tw.schedules import (
    Options,
    ScheduleError,
    compile_schedule,
    parse_options,
    parse_time,
)

#: Friday 2024-05-10 15:20 UTC: "now" in these tests.
NOW = parse_time("2024-05-10T15:20:00Z")


def preview(text: str, count: int = 5, *options: str, now: int = NOW) -> list[str]:
    """ISO strings of the first ``count`` instants of ``text``."""
    schedule = compile_schedule(text, parse_options(options), now)
    return [schedule.iso(t) for t in schedule.preview(count)]


def z(*stamps: str) -> list[str]:
    """``"2024-05-02 00:00"`` -> ``"2024-05-02T00:00:00+00:00"``."""
    return [s.replace(" ", "T") + ":00+00:00" for s in stamps]


SEED_PAGE = [
    (
        "daily and mon-fri starting May 2, 2024",
        z(
            "2024-05-02 00:00",
            "2024-05-03 00:00",
            "2024-05-06 00:00",
            "2024-05-07 00:00",
            "2024-05-08 00:00",
        ),
    ),
    (
        "every 6 hours & mon-fri & jun-aug & 2024 starting 2024-06-03",
        z(
            "2024-06-03 00:00",
            "2024-06-03 06:00",
            "2024-06-03 12:00",
            "2024-06-03 18:00",
            "2024-06-04 00:00",
        ),
    ),
    ("hourly starting 00:30", z("2024-05-10 00:30", "2024-05-10 01:30", "2024-05-10 02:30")),
    ("daily starting tomorrow 00:30", z("2024-05-11 00:30", "2024-05-12 00:30")),
    ("weekly starting Monday at 12:15 PM", z("2024-05-13 12:15", "2024-05-20 12:15")),
    ("monthly starting 2nd", z("2024-05-02 00:00", "2024-06-02 00:00", "2024-07-02 00:00")),
    (
        "every 10 seconds starting 2024-01-01",
        ["2024-01-01T00:00:00+00:00", "2024-01-01T00:00:10+00:00", "2024-01-01T00:00:20+00:00"],
    ),
    ("yearly starting 2025-07-01 12:00", z("2025-07-01 12:00", "2026-07-01 12:00")),
    ("30 * * may-aug mon-fri", z("2024-05-10 15:30", "2024-05-10 16:30")),
    ("daily and weekly", z("2024-05-10 15:20", "2024-05-17 15:20", "2024-05-24 15:20")),
    (
        "daily or 0 14 * * * starting 00:00",
        z("2024-05-10 00:00", "2024-05-10 14:00", "2024-05-11 00:00", "2024-05-11 14:00"),
    ),
    ("0 0,14 * * *", z("2024-05-11 00:00", "2024-05-11 14:00", "2024-05-12 00:00")),
    ("every 30 minutes", z("2024-05-10 15:20", "2024-05-10 15:50", "2024-05-10 16:20")),
    ("hourly", z("2024-05-10 15:20", "2024-05-10 16:20")),
    ("daily starting 00:00", z("2024-05-10 00:00", "2024-05-11 00:00")),
    ("daily and mon-fri and 2024", z("2024-05-10 15:20", "2024-05-13 15:20")),
]


@pytest.mark.parametrize(("text", "expected"), SEED_PAGE)
def test_seed_page_examples_preview_what_the_page_says(text: str, expected: list[str]) -> None:
    """Every schedule string on the Meerschaum page (seed 004) previews what it describes."""
    assert preview(text, len(expected)) == expected


def test_six_hours_weekdays_summer_equals_its_cron_version() -> None:
    """The seed's combined schedule gives the same instants as its cron equivalent."""
    combined = preview("every 6 hours & mon-fri & jun-aug & 2024 starting 2024-06-03", 200)
    cron = preview("0 0,6,12,18 * jun-aug mon-fri", 200, now=parse_time("2024-06-03T00:00:00Z"))
    assert combined == cron


@pytest.mark.parametrize(
    ("text", "step_ns"),
    [
        ("every 500 milliseconds", 500_000_000),
        ("every 1 millisecond", 1_000_000),
        ("every 2 seconds", 2 * 10**9),
        ("every 1 second", 10**9),
        ("every 3 minutes", 180 * 10**9),
        ("every 2 hours", 7200 * 10**9),
        ("every 2 days", 2 * 86400 * 10**9),
        ("every 1 week", 7 * 86400 * 10**9),
        ("secondly", 10**9),
        ("minutely", 60 * 10**9),
        ("hourly", 3600 * 10**9),
        ("daily", 86400 * 10**9),
        ("weekly", 7 * 86400 * 10**9),
        ("EVERY 5 Minutes", 300 * 10**9),
    ],
)
def test_every_units_and_aliases_step_exactly(text: str, step_ns: int) -> None:
    """`every N <unit>` (plural or not, any case) and secondly..weekly step by the unit."""
    s = compile_schedule(text, Options(), NOW)
    got = s.preview(4)
    assert got[0] == NOW
    assert [b - a for a, b in itertools.pairwise(got)] == [step_ns] * 3


def test_monthly_and_yearly_keep_the_calendar_date() -> None:
    """`monthly` and `yearly` step by calendar months and years, not fixed durations."""
    assert preview("monthly starting 2024-01-15", 3) == z(
        "2024-01-15 00:00", "2024-02-15 00:00", "2024-03-15 00:00"
    )
    assert preview("every 2 years starting 2024-02-29", 3) == z(
        "2024-02-29 00:00", "2026-02-28 00:00", "2028-02-29 00:00"
    )


def test_every_month_from_jan_31_takes_last_days_and_never_drifts() -> None:
    """From Jan 31: Feb 29, Mar 31, Apr 30, May 31 ... counted from the start (no drift)."""
    got = preview("every 1 month starting 2024-01-31", 13)
    days = [g[:10] for g in got]
    assert days == [
        "2024-01-31",
        "2024-02-29",
        "2024-03-31",
        "2024-04-30",
        "2024-05-31",
        "2024-06-30",
        "2024-07-31",
        "2024-08-31",
        "2024-09-30",
        "2024-10-31",
        "2024-11-30",
        "2024-12-31",
        "2025-01-31",
    ]
    s = compile_schedule("every 1 month starting 2024-01-31", Options(), NOW)
    assert s.iso(s.after(parse_time("2024-02-29T00:00:00Z")) or 0).startswith("2024-03-31")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0 12 * * 7", z("2024-05-12 12:00", "2024-05-19 12:00")),
        ("0 12 * * 0", z("2024-05-12 12:00", "2024-05-19 12:00")),
        ("0 12 * * sun", z("2024-05-12 12:00", "2024-05-19 12:00")),
        ("0 12 * * Sunday", z("2024-05-12 12:00", "2024-05-19 12:00")),
        ("*/20 16 * * *", z("2024-05-10 16:00", "2024-05-10 16:20", "2024-05-10 16:40")),
        ("0 9-10 * * mon,wed", z("2024-05-13 09:00", "2024-05-13 10:00", "2024-05-15 09:00")),
        ("0 0 1 jan-mar *", z("2025-01-01 00:00", "2025-02-01 00:00", "2025-03-01 00:00")),
        ("0 0 1 January *", z("2025-01-01 00:00", "2026-01-01 00:00")),
        ("@hourly", z("2024-05-10 16:00", "2024-05-10 17:00")),
        ("@daily", z("2024-05-11 00:00", "2024-05-12 00:00")),
        ("@weekly", z("2024-05-12 00:00", "2024-05-19 00:00")),
        ("@monthly", z("2024-06-01 00:00", "2024-07-01 00:00")),
        ("@yearly", z("2025-01-01 00:00", "2026-01-01 00:00")),
        # Vixie: both day fields restricted -> a day matches if either does.
        ("0 0 13 * fri", z("2024-05-13 00:00", "2024-05-17 00:00", "2024-05-24 00:00")),
        ("mon-fri", z("2024-05-13 00:00", "2024-05-14 00:00")),
        ("mon through fri or sat", z("2024-05-11 00:00", "2024-05-13 00:00")),
    ],
)
def test_cron_forms(text: str, expected: list[str]) -> None:
    """Five-field cron (names, ranges, lists, steps, 7 = Sunday, Vixie OR) and @macros."""
    assert preview(text, len(expected)) == expected


@pytest.mark.parametrize(
    ("start", "first"),
    [
        ("2024-01-01", "2024-01-01T00:00:00+00:00"),
        ("2024-01-01 12:00", "2024-01-01T12:00:00+00:00"),
        ("2024-01-01T12:00:00+02:00", "2024-01-01T10:00:00+00:00"),
        ("00:30", "2024-05-10T00:30:00+00:00"),
        ("tomorrow 10:00", "2024-05-11T10:00:00+00:00"),
        ("tomorrow at 10am", "2024-05-11T10:00:00+00:00"),
        ("Monday at 12:15 PM", "2024-05-13T12:15:00+00:00"),
        ("friday 9:00", "2024-05-10T09:00:00+00:00"),
        ("2nd", "2024-05-02T00:00:00+00:00"),
        ("May 2, 2024", "2024-05-02T00:00:00+00:00"),
        ("may 2nd", "2024-05-02T00:00:00+00:00"),
        ("2 May 2024 at 08:00", "2024-05-02T08:00:00+00:00"),
        ("12 AM", "2024-05-10T00:00:00+00:00"),
    ],
)
def test_starting_forms(start: str, first: str) -> None:
    """Every `starting` form of SPEC §8 (and `beginning`) resolves against now in tz."""
    for word in ("starting", "beginning", "STARTING"):
        s = compile_schedule(f"every 1 day {word} {start}", Options(), NOW)
        assert s.iso(s.start_ns) == first
        assert s.first() == s.start_ns


def test_start_in_another_zone_is_read_there() -> None:
    """`starting 02:00` with tz=America/New_York is 02:00 New York time."""
    assert preview("daily starting 2024-05-10 02:00", 1, "tz=America/New_York") == [
        "2024-05-10T02:00:00-04:00"
    ]


def test_restart_keeps_the_recorded_start() -> None:
    """A schedule compiled again with its start_ns keeps it, whatever now is."""
    first = compile_schedule("daily starting tomorrow 00:30", Options(), NOW)
    later = compile_schedule(
        "daily starting tomorrow 00:30", Options(), NOW + 10**15, first.start_ns
    )
    assert later.start_ns == first.start_ns
    assert later.preview(3) == first.preview(3)


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("every 0 minutes", "word 2 '0'", "never fires"),
        ("every -5 minutes", "word 2 '-5'", "negative"),
        ("every 5 fortnights", "word 3 'fortnights'", "unknown unit"),
        ("*/0 * * * *", "word 1 '*/0'", "step 0"),
        ("0 -1 * * *", "word 2 '-1'", "negative"),
        ("0 25 * * *", "word 2 '25'", "hour"),
        ("0 0 * * funday", "word 5 'funday'", "weekday"),
        ("daily and fooday", "word 3 'fooday'", "unknown word"),
        ("daily and or weekly", "word 3 'or'", "cannot both"),
        ("daily and weekly or hourly", "word 4 'or'", "cannot both"),
        ("daily starting", "word 2 'starting'", "time must follow"),
        ("daily starting 25:00", "word 3 '25:00'", "time"),
        ("daily starting Feb 30, 2024", "word 4 '30,'", "does not exist"),
        ("daily starting 2nd soon", "word 4 'soon'", "expected a time"),
        ("@fortnightly", "word 1 '@fortnightly'", "unknown macro"),
        ("daily weekly", "word 2 'weekly'", "unexpected word"),
        ("and daily", "word 1 'and'", "must come before"),
    ],
)
def test_errors_say_what_and_where(text: str, where: str, what: str) -> None:
    """A bad schedule raises ScheduleError naming the word number, the word and the fault."""
    with pytest.raises(ScheduleError) as caught:
        compile_schedule(text, Options(), NOW)
    assert f"at {where}:" in str(caught.value)
    assert what in str(caught.value)


def test_empty_schedule_is_an_error() -> None:
    """An empty schedule is refused with a reason."""
    with pytest.raises(ScheduleError, match="empty schedule"):
        compile_schedule("   ", Options(), NOW)


def test_decay_without_an_every_part_is_an_error() -> None:
    """`decay` applies to `every` schedules; a cron-only schedule with decay is refused."""
    with pytest.raises(ScheduleError, match="decay applies"):
        compile_schedule("0 9 * * *", parse_options(["decay=1"]), NOW)


@pytest.mark.parametrize(
    "text",
    [
        "daily and mon-fri",
        "daily & mon-fri",
        "daily&mon-fri",
        "DAILY AND MON-FRI",
        "daily and mon through fri",
        "daily and mon thru fri",
        "daily and mon - fri",
        "daily and Monday-Friday",
        "daily and monday through friday",
        "daily and mon,tues,wed,thurs,fri",
    ],
)
def test_aliases_mean_the_same_schedule(text: str) -> None:
    """`&`/`and`, `through`/`thru`/` - `, full and short names, any case: one schedule."""
    assert preview(text, 6) == preview("daily and mon-fri", 6)


def test_or_with_pipe_and_full_month_names() -> None:
    """`|` is `or`; `September` is `sep`; a fragment in `or` fires at 00:00 of its days."""
    assert preview("0 12 1 September * | sat", 3) == preview("0 12 1 sep * or sat", 3)
    assert preview("0 12 1 sep * or sat", 3) == z(
        "2024-05-11 00:00", "2024-05-18 00:00", "2024-05-25 00:00"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("jun-aug", z("2024-06-01 00:00", "2024-06-02 00:00")),
        ("2025", z("2025-01-01 00:00", "2025-01-02 00:00")),
        ("sat,sun and jun-aug", z("2024-06-01 00:00", "2024-06-02 00:00", "2024-06-08 00:00")),
        ("fri-mon", z("2024-05-11 00:00", "2024-05-12 00:00", "2024-05-13 00:00")),
        ("every 1 hour and 2025", z("2025-01-01 00:20", "2025-01-01 01:20")),
    ],
)
def test_fragments(text: str, expected: list[str]) -> None:
    """Fragments alone fire at 00:00 of their days; with `and` they filter other parts."""
    assert preview(text, len(expected)) == expected


def test_until_before_any_occurrence_leaves_none() -> None:
    """A schedule whose first instant is at or after `until` has no occurrence."""
    s = compile_schedule(
        "daily starting 2024-06-01", parse_options(["until=2024-06-01T00:00:00Z"]), NOW
    )
    assert s.first() is None
    assert s.preview(5) == []
