"""The shared request/answer module and the CLI's human times, without a daemon."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from ztick_tw.client import wire
from ztick_tw.client.cli import completions, parse_args
from ztick_tw.client.commands import Usage
from ztick_tw.client.times import TimeError, duration_ns, iso_local, iso_utc, parse_when
from ztick_tw.protocol.extension import history_fields
from ztick_tw.protocol.extension import quote as server_quote
from ztick_tw.protocol.tokenizer import tokenize

NOW = datetime(2026, 12, 3, 10, 42, 0, tzinfo=UTC)
NOW_NS = wire.datetime_to_ns(NOW)
SECOND = 10**9


@pytest.fixture
def paris() -> Iterator[None]:
    """Local time is Europe/Paris (UTC+1 in winter, +2 in summer) for the test."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Europe/Paris"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


def answer(call: wire.Call[wire.T], *lines: str) -> wire.Answer[wire.T]:
    """Feed ``lines`` to an ``Answer``, checking it completes exactly on the last one."""
    a = wire.Answer(call)
    for i, line in enumerate(lines):
        assert a.feed(line) == (i == len(lines) - 1), line
    return a


def test_requests_are_quoted_so_the_server_reads_the_same_tokens() -> None:
    """Every word of a call comes back intact through the server's own tokenizer."""
    call = wire.rule_set("r 1", "", "shell", 'echo "a\\b" c')
    line = wire.format_request("c1", call).decode()
    assert line.endswith("\n")
    assert tokenize(line[:-1]) == ["c1", "RULE", "SET", "r 1", "", "shell", 'echo "a\\b" c']


def test_a_request_with_a_line_break_or_too_long_is_refused() -> None:
    """A newline would split the request in two; a line over 4096 bytes is cut off."""
    with pytest.raises(ValueError):
        wire.format_request("c1", wire.get_job("a\nb"))
    with pytest.raises(ValueError):
        wire.format_request("c1", wire.get_job("x" * 5000))


def test_datetimes_become_nanoseconds_and_back() -> None:
    """An aware datetime is sent as ns; a naive one is refused as ambiguous."""
    assert wire.set_job("j", NOW).words == ("SET", "j", str(NOW_NS))
    assert wire.ns_to_datetime(NOW_NS) == NOW
    assert wire.ns_to_datetime(-SECOND) == datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC)
    with pytest.raises(ValueError):
        wire.set_job("j", datetime(2030, 1, 1))


def test_one_line_answers_give_typed_results() -> None:
    """GET gives a Job with an aware UTC datetime; SCHEDULE SET the first ns."""
    job = answer(wire.get_job("a b"), f"OK planned {NOW_NS}").result()
    assert job == wire.Job("a b", "planned", NOW, NOW_NS)
    assert job.execution.tzinfo is UTC
    assert answer(wire.schedule_set("j", "hourly"), f"OK {NOW_NS}").result() == NOW_NS
    assert answer(wire.set_job("j", 5), "OK").result() is None


def test_errors_carry_the_reason_or_none() -> None:
    """``ERROR <reason>`` raises ZtickError with the reason; ztick's bare ERROR an empty one."""
    with pytest.raises(wire.ZtickError) as e:
        answer(wire.history("x"), "ERROR no job 'x'").result()
    assert e.value.reason == "no job 'x'"
    with pytest.raises(wire.ZtickError) as e:
        answer(wire.get_job("x"), "ERROR").result()
    assert e.value.reason == ""


def test_multi_line_answers_end_at_ok_even_with_odd_job_ids() -> None:
    """QUERY body lines for jobs named ``OK`` or ``ERROR`` do not end the answer."""
    a = answer(
        wire.query(),
        f"OK planned {NOW_NS}",
        f"ERROR failed {NOW_NS}",
        f"spaced id executed {NOW_NS}",
        "OK",
    )
    jobs = a.result()
    assert [(j.id, j.status) for j in jobs] == [
        ("OK", "planned"),
        ("ERROR", "failed"),
        ("spaced id", "executed"),
    ]


def test_stat_numbers_are_ints_and_words_stay_text() -> None:
    """STAT's values are ints where they are numbers."""
    got = answer(wire.stat(), "uptime_ns 12", "persistence logfile", "OK").result()
    assert got == {"uptime_ns": 12, "persistence": "logfile"}


def test_listrules_splits_an_empty_pattern() -> None:
    """An empty pattern shows as two spaces; it parses back as ``""``."""
    rules = answer(wire.list_rules(), "r.all  shell logger hi", "OK").result()
    assert rules == [wire.Rule("r.all", "", "shell", ("logger", "hi"))]


def test_quoted_fields_read_back_what_the_server_quoted() -> None:
    """``fields`` undoes the server's quoting: quotes, backslashes, control characters."""
    tricky = 'a "b" \\ c\n\t\x1b end'
    text = f"{server_quote('every 5 seconds')} tz=UTC detail={server_quote(tricky)} next=-"
    assert wire.fields(text) == ["every 5 seconds", "tz=UTC", f"detail={tricky}", "next=-"]


def test_schedule_and_history_lines_parse() -> None:
    """SCHEDULE GET and HISTORY lines become Schedule and Run records."""
    view = answer(
        wire.schedule_get("ping"),
        'OK "every 5 seconds" tz=UTC limit=0 next=-  runs=3 paused=1',
    ).result()
    options = {"tz": "UTC", "limit": "0"}
    assert view == wire.Schedule("ping", "every 5 seconds", options, None, None, 3, True)

    class Record:
        run, due_ns, started_ns, ended_ns = 2, 5, 6, None
        outcome, attempt, exit_code, detail, output = "running", 1, None, "", b'say "hi"\n'

    (run,) = answer(wire.history("j"), history_fields(Record()), "OK").result()
    assert run == wire.Run(2, 5, 6, None, "running", 1, None, "", 'say "hi"\n')
    assert run.started == wire.ns_to_datetime(6) and run.ended is None


def test_preview_and_policy_parse() -> None:
    """PREVIEW lines keep the server's ISO text; RULE POLICY's ``timeout=-`` is None."""
    (instant,) = answer(
        wire.preview("hourly", 1), f"{NOW_NS} 2026-12-03T11:42:00+01:00", "OK"
    ).result()
    assert instant == wire.Instant(NOW_NS, NOW, "2026-12-03T11:42:00+01:00")
    policy = answer(
        wire.rule_policy("r", {"retries": "2"}), "OK timeout=- retries=2 backoff=1s..5m"
    )
    assert policy.result() == wire.Policy(None, 2, "1s..5m")
    assert wire.rule_policy("r", {"retries": "2"}).words == ("RULE", "POLICY", "r", "retries=2")


def test_human_times_relative_and_absolute(paris: None) -> None:
    """``in 5m``, ``+90s``, ``now``, ``tomorrow 02:00`` and dates read as local time."""
    assert parse_when(["in", "5m"], NOW) == NOW_NS + 300 * SECOND
    assert parse_when(["in", "1h30m"], NOW) == NOW_NS + 5400 * SECOND
    assert parse_when(["+90s"], NOW) == NOW_NS + 90 * SECOND
    assert parse_when(["now"], NOW) == NOW_NS
    assert parse_when(["1700000000000000000"], NOW) == 1700000000000000000
    tomorrow_2 = datetime(2026, 12, 4, 1, 0, tzinfo=UTC)  # 02:00 in Paris, winter
    assert parse_when(["tomorrow", "02:00"], NOW) == wire.datetime_to_ns(tomorrow_2)
    summer = datetime(2030, 7, 1, 0, 0, tzinfo=UTC)  # 02:00 in Paris, summer
    assert parse_when(["2030-07-01", "02:00"], NOW) == wire.datetime_to_ns(summer)
    assert parse_when(["2030-07-01T02:00:00.5"], NOW) == wire.datetime_to_ns(summer) + SECOND // 2


def test_human_times_with_a_zone(paris: None) -> None:
    """``UTC``, ``Z`` or an offset overrides local time."""
    utc = wire.datetime_to_ns(datetime(2030, 1, 1, 2, 0, tzinfo=UTC))
    assert parse_when(["2030-01-01", "02:00", "UTC"], NOW) == utc
    assert parse_when(["2030-01-01T02:00:00Z"], NOW) == utc
    plus2 = datetime(2030, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2)))
    assert parse_when(["2030-01-01", "02:00:00+02:00"], NOW) == wire.datetime_to_ns(plus2)


@pytest.mark.parametrize(
    "words", [[], ["tomorrow"], ["in", "5 parsecs"], ["2024-02-30", "00:00"], ["soon"]]
)
def test_bad_human_times_are_refused(words: list[str]) -> None:
    """Words that are no time raise TimeError (the CLI's usage error)."""
    with pytest.raises(TimeError):
        parse_when(words, NOW)


def test_times_are_shown_with_every_nanosecond(paris: None) -> None:
    """Local ISO output keeps the nine fraction digits and the offset of that date."""
    assert iso_local(NOW_NS + 123) == "2026-12-03T11:42:00.000000123+01:00"
    assert iso_local(wire.datetime_to_ns(datetime(2030, 7, 1, tzinfo=UTC))).endswith("+02:00")
    assert iso_utc(-1) == "1969-12-31T23:59:59.999999999Z"
    assert duration_ns("2d") == 2 * 86400 * SECOND


def test_completion_of_instruction_words() -> None:
    """Tab completes the first word, and RULE/SCHEDULE's second word, case-insensitively."""
    assert completions("SCH", "SCH") == ["SCHEDULE "]
    assert completions("g", "SCHEDULE g") == ["GET "]
    assert completions("RE", "RE") == ["REMOVE ", "REMOVERULE ", "RESUME "]
    assert completions("x", "GET x") == []


def test_cli_options_anywhere_and_usage_errors() -> None:
    """Options mix with words; ``--`` ends them; unknown options are usage errors."""
    s, words = parse_args(["get", "--port", "9", "job", "--json", "--", "--odd"])
    assert (s.port, s.as_json, words) == (9, True, ["get", "job", "--odd"])
    with pytest.raises(Usage):
        parse_args(["--nope"])
    with pytest.raises(Usage):
        parse_args(["--port", "x"])
