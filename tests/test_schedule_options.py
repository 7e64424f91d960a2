"""Options, durations and rule policies (SPEC §8-9): parse, render, paste back, errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztick_tw.model import Policy
from ztick_tw.schedules import (
    Options,
    ScheduleError,
    compile_schedule,
    format_duration,
    parse_duration,
    parse_options,
    parse_policy,
    render_policy,
)


def test_defaults_render_every_key_in_canonical_order() -> None:
    """Options() renders every key with its default, in SPEC order."""
    assert Options().render() == [
        "tz=UTC",
        "limit=0",
        "until=-",
        "decay=0",
        "decay_step=1d",
        "jitter=0s",
        "overlap=skip",
        "misfire=once",
        "grace=-",
    ]


def test_defaults_paste_back() -> None:
    """The rendered defaults parse back to the defaults (a listing pastes back)."""
    assert parse_options(Options().render()) == Options()
    assert parse_options([]) == Options()


def test_every_option_parses_and_renders_back() -> None:
    """Each option is read, and render() pastes back to equal options."""
    words = [
        "tz=Europe/Paris",
        "limit=5",
        "until=2024-05-02T10:00:00+02:00",
        "decay=1.5",
        "decay_step=1h30m",
        "jitter=500ms",
        "overlap=queue",
        "misfire=all",
        "grace=5m",
    ]
    options = parse_options(words)
    assert options == Options(
        "Europe/Paris",
        5,
        1714636800 * 10**9,
        1.5,
        5400 * 10**9,
        500_000_000,
        "queue",
        "all",
        300 * 10**9,
    )
    rendered = options.render()
    assert "until=2024-05-02T08:00:00Z" in rendered
    assert parse_options(rendered) == options


def test_until_without_offset_is_read_in_tz() -> None:
    """`until=2024-05-02T10:00` with tz=Europe/Paris is 08:00 UTC."""
    a = parse_options(["tz=Europe/Paris", "until=2024-05-02T10:00"])
    b = parse_options(["until=2024-05-02T10:00", "tz=Europe/Paris"])
    assert a.until_ns == b.until_ns == 1714636800 * 10**9


@pytest.mark.parametrize(
    ("words", "fragment"),
    [
        (["bogus=1"], "at option 1 'bogus=1': unknown option 'bogus'"),
        (["limit=1", "tz=Mars/Olympus"], "at option 2 'tz=Mars/Olympus': unknown time zone"),
        (["limit=-1"], "cannot be negative"),
        (["limit=x"], "whole number"),
        (["overlap=sometimes"], "overlap must be one of skip|allow|queue|replace"),
        (["misfire=never"], "misfire must be one of once|all|skip"),
        (["jitter=5 minutes"], "bad duration"),
        (["jitter=-5s"], "negative duration"),
        (["decay_step=0s"], "more than 0"),
        (["decay=fast"], "decay must be a number"),
        (["until=yesterday"], "bad time"),
        (["limit"], "expected key=value"),
        (["limit=1", "limit=2"], "given twice"),
    ],
)
def test_option_errors_say_what_and_where(words: list[str], fragment: str) -> None:
    """A bad option raises ScheduleError naming the option's position and the fault."""
    with pytest.raises(ScheduleError) as caught:
        parse_options(words)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("500ms", 500_000_000),
        ("30s", 30 * 10**9),
        ("5m", 300 * 10**9),
        ("1h30m", 5400 * 10**9),
        ("2d", 2 * 86400 * 10**9),
        ("1w", 7 * 86400 * 10**9),
        ("1.5s", 1_500_000_000),
        ("0", 0),
    ],
)
def test_durations(text: str, ns: int) -> None:
    """The duration forms of SPEC §8."""
    assert parse_duration(text) == ns


@given(st.integers(min_value=0, max_value=2**62))
def test_format_duration_pastes_back(ns: int) -> None:
    """format_duration(ns) parses back to ns."""
    assert parse_duration(format_duration(ns)) == ns


def test_format_duration_canonical_forms() -> None:
    """Largest units first: 1h30m, 500ms, 0s, 2d."""
    assert [format_duration(n) for n in (5400 * 10**9, 500_000_000, 0, 2 * 86400 * 10**9)] == [
        "1h30m",
        "500ms",
        "0s",
        "2d",
    ]


def test_policy_keeps_keys_not_given_and_renders_effective_values() -> None:
    """RULE POLICY sets the keys given, keeps the others; render shows effective values."""
    defaults = Policy(30 * 10**9, 0, 10**9, 300 * 10**9)
    p = parse_policy(["retries=3"], Policy())
    assert p == Policy(None, 3, None, None)
    p = parse_policy(["timeout=10s", "backoff=2s..1m"], p)
    assert p == Policy(10 * 10**9, 3, 2 * 10**9, 60 * 10**9)
    assert render_policy(p, defaults) == ["timeout=10s", "retries=3", "backoff=2s..1m"]
    assert render_policy(Policy(), defaults) == ["timeout=30s", "retries=0", "backoff=1s..5m"]
    assert parse_policy(render_policy(p, defaults), Policy()) == p


@pytest.mark.parametrize(
    ("words", "fragment"),
    [
        (["timeout=soon"], "bad duration"),
        (["retries=-1"], "cannot be negative"),
        (["backoff=5m..1s"], "minimum is more than its maximum"),
        (["backoff=5s"], "backoff=<min>..<max>"),
        (["color=red"], "unknown policy key 'color'"),
    ],
)
def test_policy_errors(words: list[str], fragment: str) -> None:
    """A bad policy word raises ScheduleError with the reason."""
    with pytest.raises(ScheduleError, match="at option 1") as caught:
        parse_policy(words, Policy())
    assert fragment in str(caught.value)


def test_options_reach_the_compiled_schedule() -> None:
    """compile_schedule keeps the options it was given (the scheduler enforces them)."""
    options = parse_options(["jitter=5s", "overlap=replace", "misfire=skip", "grace=1m"])
    s = compile_schedule("every 1 minute", options, 0)
    assert s.options is options
    assert s.preview(2) == [0, 60 * 10**9]  # no jitter in preview


@pytest.mark.parametrize("count", [0, -1, 1001])
def test_preview_count_outside_1_to_1000_is_an_error(count: int) -> None:
    """PREVIEW's count must be 1 to 1000 (SPEC §8)."""
    s = compile_schedule("every 1 minute", Options(), 0)
    with pytest.raises(ScheduleError, match="1 to 1000"):
        s.preview(count)
    assert len(s.preview(1000)) == 1000
