"""The SPEC §8-9 instructions on the line protocol: words, answers, reasons, order.

A real ``ZtickProtocol`` on a ``StringTransport``, a real scheduler and operations, fake
runners and store, all on a ``Clock`` (``tests.helpers.make_harness``).
"""

from __future__ import annotations

import pytest

from tests.helpers import EPOCH_NS, SECOND_NS, Conn, Harness, make_harness
from ztick_tw.model import Rule, ShellSpec
from ztick_tw.protocol.extension import field, quote
from ztick_tw.protocol.tokenizer import tokenize


def _ask(h: Harness, line: str, conn: Conn | None = None) -> list[str]:
    c = conn if conn is not None else h.connect()
    c.send(line.encode() + b"\n")
    return c.take().decode().splitlines()


@pytest.fixture
def h() -> Harness:
    """A harness with one rule matching every job."""
    harness = make_harness()
    harness.scheduler.set_rule(Rule("r", "", ShellSpec("true")))
    return harness


def test_schedule_set_answers_the_first_instant(h: Harness) -> None:
    """``SCHEDULE SET`` answers ``ID OK <first_ns>``; GET shows the job planned then."""
    midnight = EPOCH_NS + 6400 * SECOND_NS  # 2023-11-15T00:00:00Z, the day after EPOCH
    assert _ask(h, 'a SCHEDULE SET beat "every 30 minutes starting tomorrow 00:00"') == [
        f"a OK {midnight}"
    ]
    assert _ask(h, "b GET beat") == [f"b OK planned {midnight}"]


def test_schedule_get_lists_every_option_and_pastes_back(h: Harness) -> None:
    """``SCHEDULE GET`` echoes the text, every option with its effective value, and state."""
    _ask(h, 'a SCHEDULE SET j "every 1 hour" tz=Europe/Paris limit=3')
    (line,) = _ask(h, "b SCHEDULE GET j")
    words = tokenize(line)
    assert words[:3] == ["b", "OK", "every 1 hour"]
    assert "tz=Europe/Paris" in words and "limit=3" in words
    assert words[-3:] == [f"next={EPOCH_NS}", "runs=0", "paused=0"]
    # The line without the read-only fields pastes back as SCHEDULE SET.
    options = words[3:-3]
    again = " ".join([quote(words[2]), *(field(w) for w in options)])
    assert _ask(h, f"c SCHEDULE SET k {again}")[0].startswith("c OK ")
    (line2,) = _ask(h, "d SCHEDULE GET k")
    assert tokenize(line2)[2:-3] == words[2:-3]


def test_listschedules_filters_by_prefix(h: Harness) -> None:
    """``LISTSCHEDULES <prefix>`` lists only scheduled jobs under the prefix, then OK."""
    _ask(h, 'a SCHEDULE SET x.1 "every 1 minute"')
    _ask(h, 'a SCHEDULE SET y.1 "every 1 minute"')
    _ask(h, "a SET x.2 1700000100000000000")
    lines = _ask(h, "l LISTSCHEDULES x.")
    assert [line.split()[1] for line in lines[:-1]] == ["x.1"]
    assert lines[-1] == "l OK"


def test_preview_lists_instants_with_iso_times(h: Harness) -> None:
    """``PREVIEW`` lists ``ID <ns> <ISO 8601>`` per instant (the seed's example), then OK."""
    lines = _ask(h, 'p PREVIEW "daily and mon-fri starting May 2, 2024" 5')
    days = [line.split()[2][:10] for line in lines[:-1]]
    assert days == ["2024-05-02", "2024-05-03", "2024-05-06", "2024-05-07", "2024-05-08"]
    assert lines[-1] == "p OK"


def test_bad_schedule_is_refused_with_a_reason(h: Harness) -> None:
    """Bad input to the new instructions answers ``ID ERROR <reason>`` and changes nothing."""
    (line,) = _ask(h, 'e SCHEDULE SET j "every 0 minutes"')
    assert line.startswith("e ERROR ") and len(line) > len("e ERROR ")
    assert _ask(h, "g GET j") == ["g ERROR"]  # ztick's instructions keep the bare ERROR
    assert _ask(h, 'e PREVIEW "every 1 minute" 0')[0].startswith("e ERROR count 0")
    assert _ask(h, 'e PREVIEW "every 1 minute" 5 colour=blue')[0].startswith("e ERROR ")
    assert _ask(h, "e SCHEDULE FROB j")[0].startswith("e ERROR unknown SCHEDULE word")
    assert _ask(h, "e SCHEDULE GET nojob")[0].startswith("e ERROR ")


def test_schedule_get_of_a_one_shot_job_is_an_error(h: Harness) -> None:
    """``SCHEDULE GET/REMOVE`` of a job without a schedule answer ``ID ERROR <reason>``."""
    _ask(h, "a SET one 1700000100000000000")
    assert "has no schedule" in _ask(h, "b SCHEDULE GET one")[0]
    assert "has no schedule" in _ask(h, "b SCHEDULE REMOVE one")[0]


def test_pause_resume_and_get(h: Harness) -> None:
    """``PAUSE`` makes GET say ``paused``; ``RESUME`` makes it planned again."""
    _ask(h, "a SET j 1700000100000000000")
    assert _ask(h, "b PAUSE j") == ["b OK"]
    assert _ask(h, "c GET j") == ["c OK paused 1700000100000000000"]
    assert _ask(h, "d QUERY j") == ["d j paused 1700000100000000000", "d OK"]
    assert _ask(h, "e RESUME j") == ["e OK"]
    assert _ask(h, "f GET j") == ["f OK planned 1700000100000000000"]
    assert _ask(h, "g PAUSE nojob")[0].startswith("g ERROR no job")


def test_run_answers_once_started_and_in_order(h: Harness) -> None:
    """``RUN`` answers ``ID OK`` once the run has started; answers stay in request order."""
    _ask(h, "a SET j 1800000000000000000")
    c = h.connect()
    c.send(b"r RUN j\ns STAT\n")
    out = c.take().decode().splitlines()
    assert out[0] == "r OK"
    assert out[-1] == "s OK"
    assert h.runner.started == ["j"]
    assert _ask(h, "g GET j")[0].startswith("g OK triggered ")
    h.runner.complete("j")
    assert _ask(h, "g GET j") == ["g OK planned 1800000000000000000"]


def test_run_without_a_rule_says_why(h: Harness) -> None:
    """``RUN`` of a job no rule matches answers ``ID ERROR`` naming the reason."""
    h.scheduler.remove_rule("r")
    _ask(h, "a SET j 1800000000000000000")
    assert "no rule matches" in _ask(h, "r RUN j")[0]


def test_rule_policy_sets_and_shows(h: Harness) -> None:
    """``RULE POLICY`` sets the keys given, keeps the others and shows the whole policy."""
    (line,) = _ask(h, "a RULE POLICY r retries=3")
    assert line.startswith("a OK ") and "retries=3" in line and "timeout=" in line
    (line,) = _ask(h, "b RULE POLICY r timeout=2s")
    assert "retries=3" in line and "timeout=2s" in line
    assert _ask(h, "c RULE POLICY nosuch")[0].startswith("c ERROR no rule")
    assert _ask(h, "d RULE POLICY r retries=-1")[0].startswith("d ERROR ")


def test_stat_ends_with_the_extension_keys(h: Harness) -> None:
    """STAT lists SPEC §9's keys after ztick's, in order."""
    _ask(h, 'a SCHEDULE SET j "every 1 minute"')
    _ask(h, "b PAUSE j")
    lines = _ask(h, "s STAT")
    keys = [line.split()[1] for line in lines[:-1]]
    assert keys[-5:] == [
        "jobs_paused",
        "schedules_total",
        "occurrences_missed",
        "runs_retried",
        "runs_timed_out",
    ]
    values = dict(line.split()[1:3] for line in lines[:-1])
    assert values["jobs_paused"] == "1" and values["schedules_total"] == "1"


def test_quote_escapes_quotes_backslashes_and_controls() -> None:
    r"""Quoted output escapes ``"`` and ``\\`` and writes control characters as JSON escapes."""
    assert quote('a "b" \\ c\n\x1b') == '"a \\"b\\" \\\\ c\\n\\u001b"'
    assert field("tz=UTC") == "tz=UTC"
    assert field("until=-") == "until=-"
    assert field("detail=two words") == 'detail="two words"'
