"""The cron stepping of the engine checked against cronsim's own iterator.

The engine steps over cronsim's parsed fields itself (for speed and SPEC §8's DST rule);
in UTC, and for fixed-time expressions in a zone (where cronsim applies the same gap and
fold rule as SPEC), both must give the same instants.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from cronsim import CronSim
from hypothesis import given, settings
from hypothesis import strategies as st

from ztick_tw.schedules import compile_schedule, parse_options


def _field(low: int, high: int, names: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    number = st.integers(low, high)
    single = number.map(str) | (st.sampled_from(names) if names else number.map(str))
    ranged = st.tuples(number, number).map(lambda ab: f"{min(ab)}-{max(ab)}")
    stepped = st.tuples(st.sampled_from(["*", f"{low}-{high}"]), st.integers(1, 7)).map(
        lambda ts: f"{ts[0]}/{ts[1]}"
    )
    listed = st.lists(number, min_size=2, max_size=4).map(lambda xs: ",".join(map(str, xs)))
    return st.sampled_from(["*"]) | single | ranged | stepped | listed


CRON = st.tuples(
    _field(0, 59),
    _field(0, 23),
    _field(1, 28),
    _field(1, 12, ("jan", "jun", "dec")),
    _field(0, 7, ("mon", "fri", "sun")),
).map(" ".join)
#: 2024-01-01 .. 2026-01-01
INSTANTS = st.integers(1_704_067_200, 1_767_225_600)


def _cronsim(expr: str, start: datetime, count: int) -> list[int]:
    it = CronSim(expr, start)
    return [int(next(it).timestamp()) * 10**9 for _ in range(count)]


@settings(max_examples=150, deadline=None)
@given(CRON, INSTANTS)
def test_utc_matches_cronsim(expr: str, seconds: int) -> None:
    """In UTC the engine's next instants equal cronsim's for any five-field expression."""
    schedule = compile_schedule(expr, parse_options([]), seconds * 10**9)
    got = schedule.preview(6)
    expected = _cronsim(expr, datetime.fromtimestamp(seconds - 1, UTC).replace(second=59), 6)
    assert got == expected


@settings(max_examples=80, deadline=None)
@given(
    st.integers(0, 59),
    st.integers(0, 23),
    st.sampled_from(["Europe/Paris", "America/New_York"]),
    st.sampled_from(["2024-03-", "2024-10-", "2024-11-"]),
    st.integers(1, 28),
)
def test_fixed_time_in_a_zone_matches_cronsim(
    minute: int, hour: int, tz: str, month: str, day: int
) -> None:
    """`M H * * *` in Paris / New York around DST days: the same instants as cronsim.

    cronsim's Debian-style fix-up for fixed times is SPEC's rule: gap -> the first minute
    after it, fold -> the first occurrence.
    """
    expr = f"{minute} {hour} * * *"
    start = datetime.fromisoformat(f"{month}{day:02d}T00:00:00").replace(tzinfo=ZoneInfo(tz))
    now = int(start.timestamp()) * 10**9
    schedule = compile_schedule(expr, parse_options([f"tz={tz}"]), now)
    expected = _cronsim(expr, start, 8)
    got = schedule.preview(8)
    if got and got[0] == now:  # cronsim looks strictly after its start
        got = schedule.preview(9)[1:]
    assert got == expected
