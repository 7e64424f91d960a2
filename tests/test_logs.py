"""Tests for ztick_tw.logs: one escaped line per event, level filters, JSON, and twistd.

The unit tests use real Twisted observers writing to a StringIO; the end-to-end ones run
the real daemon (``twistd -n ztick`` and ``python -m ztick_tw``) with a config file.
"""

from __future__ import annotations

import io
import json
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.logger import (
    LegacyLogObserverWrapper,
    LogBeginner,
    Logger,
    LogLevel,
    LogPublisher,
    eventsFromJSONLogFile,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.log import ILogObserver as ILegacyLogObserver
from twisted.python.log import textFromEventDict
from zope.interface import implementer

from tests.e2e.daemon import Daemon, daemon, now_ns, quote, wait_status
from ztick_tw.logs import (
    apply_under_twistd,
    escape,
    make_observer,
    one_line,
    wrap_observers,
)

#: Any character a log line must not carry raw: C0/C1 controls, DEL, line separators.
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\u202e]")


def _text_log(threshold: LogLevel | None = LogLevel.info) -> tuple[Logger, io.StringIO]:
    out = io.StringIO()
    publisher = LogPublisher(make_observer(threshold, "text", out))
    return Logger(namespace="ztick_tw.test", observer=publisher), out


def _lines(out: io.StringIO) -> list[str]:
    text = out.getvalue()
    assert text.endswith("\n") or not text
    return text.splitlines()


# ----------------------------------------------------------------------------- escaping


def test_job_id_with_nul_esc_newline_and_cr_is_one_escaped_line() -> None:
    """An id holding NUL, ESC, a newline and a CR is logged as one line, each escaped."""
    log, out = _text_log()
    log.info("job {job_id} failed: no rule matches it", job_id="a\x00b\x1b[2Jc\nd\re")
    (line,) = _lines(out)
    assert line.endswith(
        r" [ztick_tw.test#info] job a\x00b\x1b[2Jc\nd\re failed: no rule matches it"
    )
    assert RAW_CONTROL.search(out.getvalue()) is None


def test_a_forged_log_line_stays_inside_its_event() -> None:
    """A newline followed by a fake timestamped line cannot start a line of its own."""
    log, out = _text_log()
    forged = "x\n2026-12-03T07:50:51+0000 [ztick_tw#info] listening on tcp:1"
    log.info("request {request_id} refused", request_id=forged)
    lines = _lines(out)
    assert len(lines) == 1
    assert "x\\n2026-12-03T07:50:51+0000 [ztick_tw#info] listening" in lines[0]


def test_multi_line_job_output_is_one_line_with_escaped_newlines() -> None:
    """A job's multi-line stdout (as the process runner logs it) is one line."""
    log, out = _text_log()
    log.info(
        "job {job_id} {stream}: {text}\n[{dropped} more bytes dropped]",
        job_id="j",
        stream="stdout",
        text="line 1\nline 2\n\tindented\r\n",
        dropped=282,
    )
    (line,) = _lines(out)
    assert line.endswith(r"job j stdout: line 1\nline 2\n\tindented\r\n\n[282 more bytes dropped]")


def test_values_without_control_characters_are_shown_as_they_are() -> None:
    """Plain values, backslashes included, are not touched, and the event is not copied."""
    event = {"log_format": "job {job_id} at {path}", "job_id": "a.b", "path": "C:\\tmp\\n"}
    assert one_line(event) is event
    log, out = _text_log()
    log.info("job {job_id} at {path}", job_id="a.b", path="C:\\tmp\\n")
    assert _lines(out)[0].endswith("job a.b at C:\\tmp\\n")


def test_backslashes_are_doubled_only_in_a_value_that_needed_escaping() -> None:
    r"""``a\n`` (backslash, n) and ``a<newline>`` stay distinguishable once escaped."""
    assert escape("a\\n") == "a\\n"
    assert escape("a\\n\n") == "a\\\\n\\n"
    assert escape("\x00\x7f\x85\u2028\u202e") == "\\x00\\x7f\\x85\\u2028\\u202e"


def test_repr_fields_are_not_escaped_twice() -> None:
    """A ``{x!r}`` field is left to repr(), which already escapes."""
    log, out = _text_log()
    log.info("got {line!r}", line="a\nb")
    assert _lines(out)[0].endswith("got 'a\\nb'")


def test_an_exception_message_with_a_newline_is_escaped() -> None:
    """A non-string value whose str() holds a newline (an exception) is escaped too."""
    log, out = _text_log()
    log.warn("run failed: {reason}", reason=OSError("cannot\nexecute"))
    (line,) = _lines(out)
    assert line.endswith("run failed: cannot\\nexecute")


def test_numbers_keep_their_format_spec() -> None:
    """Escaping leaves number formatting alone (``{duration:.3f}``)."""
    log, out = _text_log()
    log.info("job {job_id} ran {duration:.3f}s", job_id="j\x1b", duration=0.0046)
    assert _lines(out)[0].endswith("job j\\x1b ran 0.005s")


def test_a_traceback_keeps_its_indented_continuation_lines() -> None:
    """log.failure still shows the traceback, each continuation line indented by a tab."""
    log, out = _text_log()
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.failure("step {step} failed", step="flush\nthe log")
    lines = _lines(out)
    assert lines[0].endswith("step flush\\nthe log failed")
    assert len(lines) > 2
    assert all(line.startswith("\t") for line in lines[1:])


def test_json_output_carries_the_raw_values_on_one_line() -> None:
    """The JSON format keeps the value unchanged: JSON escapes it, one object per line."""
    out = io.StringIO()
    log = Logger(namespace="t", observer=LogPublisher(make_observer(LogLevel.info, "json", out)))
    log.info("job {job_id} stdout: {text}", job_id="a\x00\x1b\n", text="1\n2")
    (line,) = out.getvalue().splitlines()
    event = json.loads(line)
    assert (event["job_id"], event["text"]) == ("a\x00\x1b\n", "1\n2")


# ----------------------------------------------------------------------------- levels


def test_level_threshold_drops_less_severe_events() -> None:
    """``warn`` keeps warn and error events and drops info and debug ones."""
    log, out = _text_log(LogLevel.warn)
    log.debug("debug line")
    log.info("info line")
    log.warn("warn line")
    log.error("error line")
    assert [line.split("] ", 1)[1] for line in _lines(out)] == ["warn line", "error line"]


def test_level_off_drops_everything() -> None:
    """``off`` (threshold None) lets no event through, errors included."""
    log, out = _text_log(None)
    log.error("error line")
    log.critical("critical line")
    assert out.getvalue() == ""


# ----------------------------------------------------------------------------- under twistd


def test_wrapped_text_observer_is_filtered_and_escaped() -> None:
    """The text observer of twistd, wrapped for level warn / text: info dropped, values escaped."""
    out = io.StringIO()
    (wrapped,) = wrap_observers([textFileLogObserver(out)], LogLevel.warn, "text")
    log = Logger(namespace="t", observer=LogPublisher(wrapped))
    log.info("dropped {x}", x="i")
    log.warn("kept {x}", x="w\nx")
    (line,) = out.getvalue().splitlines()
    assert line.endswith("[t#warn] kept w\\nx")


def test_wrapped_file_observer_writes_json_to_the_same_file() -> None:
    """With format json, twistd's file observer becomes a JSON observer on its file."""
    out = io.StringIO()
    (wrapped,) = wrap_observers([textFileLogObserver(out)], LogLevel.info, "json")
    log = Logger(namespace="t", observer=LogPublisher(wrapped))
    log.info("job {job_id}", job_id="j\n")
    events = list(eventsFromJSONLogFile(io.StringIO(out.getvalue())))
    assert [e["job_id"] for e in events] == ["j\n"]


def test_an_explicit_twistd_logger_keeps_its_format_and_is_filtered() -> None:
    """``twistd --logger``: that observer keeps its own format; the level still applies."""
    out = io.StringIO()
    chosen = jsonFileLogObserver(out, recordSeparator="")
    (wrapped,) = wrap_observers([chosen], LogLevel.warn, "text", keep_format=True)
    log = Logger(namespace="t", observer=LogPublisher(wrapped))
    log.info("dropped")
    log.error("kept {x}", x="1")
    assert [json.loads(line)["x"] for line in out.getvalue().splitlines()] == ["1"]


def test_an_observer_that_is_not_a_file_stays_text_but_escaped() -> None:
    """A non-file observer (``--syslog``) cannot turn JSON; it gets escaped one-line text.

    twistd hands a syslog observer over as a legacy observer in a
    ``LegacyLogObserverWrapper``; the legacy side sees the escaped message.
    """
    seen: list[str | None] = []

    @implementer(ILegacyLogObserver)
    class LegacySyslog:
        def __call__(self, event_dict: dict[str, object]) -> None:
            seen.append(textFromEventDict(event_dict))

    observer = LegacyLogObserverWrapper(LegacySyslog())
    (wrapped,) = wrap_observers([observer], LogLevel.info, "json")
    Logger(namespace="t", observer=LogPublisher(wrapped)).info("id {i}", i="a\nb")
    assert seen == ["id a\\nb"]


def test_apply_under_twistd_wraps_the_next_begin_logging_to() -> None:
    """The observers twistd hands to the log beginner are wrapped, buffered events too.

    A real ``LogBeginner`` on its own publisher: an info event logged before twistd
    begins logging (as the plugin's startup lines are) is filtered out at level warn,
    a warn event is kept, and the beginner is left as it was.
    """
    publisher = LogPublisher()
    beginner = LogBeginner(publisher, io.StringIO(), sys, warnings)
    log = Logger(namespace="t", observer=publisher)
    apply_under_twistd(LogLevel.warn, "text", beginner=beginner)
    log.info("buffered info")
    log.warn("buffered warn {x}", x="a\x1bb")
    out = io.StringIO()
    beginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False)
    log.info("live info")
    log.error("live error")
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == [
        "buffered warn a\\x1bb",
        "live error",
    ]
    assert "beginLoggingTo" not in vars(beginner)


def test_apply_under_twistd_can_be_undone() -> None:
    """The undo function leaves the beginner untouched when twistd never began logging."""
    beginner = LogBeginner(LogPublisher(), io.StringIO(), sys, warnings)
    undo = apply_under_twistd(LogLevel.warn, "text", beginner=beginner)
    assert "beginLoggingTo" in vars(beginner)
    undo()
    assert "beginLoggingTo" not in vars(beginner)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture
def ztick(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon setup in a fresh directory; every process it started is killed afterwards."""
    with daemon(tmp_path / "d") as d:
        yield d


def test_twistd_applies_log_level(ztick: Daemon) -> None:
    """``twistd -n ztick`` with ``level = "warn"``: warnings are logged, info lines are not.

    An unquoted value (read as ztick reads it) gives a startup warning; the "listening
    on" line and twistd's own "starting up" lines are info, so they are absent.
    """
    ztick.config_path.write_text(
        '[log]\nlevel = "warn"\n'
        f'[controller]\nlisten = "tcp:{ztick.port}:interface=127.0.0.1"\n'
        "[database]\nlogfile_path = ztick.log\n"
    )
    ztick.start("twistd")
    ztick.client().ok("SET tw.level 2030-01-06 03:00:00")
    ztick.stop()
    output = ztick.runs[-1].output()
    assert "[ztick_tw#warn]" in output and "unquoted value ztick.log" in output, output
    assert "#info]" not in output, output
    assert "listening on" not in output
    assert "starting up" not in output


def test_twistd_applies_json_format(ztick: Daemon) -> None:
    """``twistd -n ztick`` with ``format = "json"``: stdout is one JSON object per line.

    The daemon's own events (the "listening on" line with its named fields) and
    twistd's are all there, as JSON.
    """
    ztick.write_config(
        {
            "log": {"format": "json"},
            "controller": {"listen": f"tcp:{ztick.port}:interface=127.0.0.1"},
            "database": {"logfile_path": "ztick.log"},
        }
    )
    run = ztick.start("twistd")
    ztick.stop()
    lines = [line for line in run.stdout_path.read_text().splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line parses
    listening = [e for e in events if str(e.get("log_format", "")).startswith("listening on")]
    assert len(listening) == 1
    assert listening[0]["endpoint"] == f"tcp:{ztick.port}:interface=127.0.0.1"
    assert any(e.get("log_namespace", "").startswith("twisted.scripts") for e in events)


def test_job_id_and_output_are_escaped_end_to_end(ztick: Daemon) -> None:
    """A job whose id holds ESC and whose output spans lines logs one escaped line.

    ``python -m ztick_tw``: the shell job prints two lines and an ANSI escape; the
    daemon's stderr has exactly one line for that output, and no raw control byte.
    """
    ztick.start()
    c = ztick.client()
    job = "esc.\x1b[31mred"
    command = "printf 'one\\ntwo\\033[0m'"  # printf makes the newline and the ESC
    c.ok(f"RULE SET r.esc esc. shell {quote(command)}")
    c.ok(f"SET {quote(job)} {now_ns()}")
    assert wait_status(c, job, ["executed", "failed"]) == "executed"
    ztick.stop()
    stderr = ztick.runs[-1].stderr()
    assert RAW_CONTROL.search(stderr) is None, stderr
    output_lines = [line for line in stderr.splitlines() if " output: " in line]
    assert len(output_lines) == 1, stderr
    assert output_lines[0].endswith("job esc.\\x1b[31mred output: one\\ntwo\\x1b[0m")


def test_tally_reports_at_once_then_counts_until_the_interval_passes() -> None:
    """The first event is reported at once; later ones are counted until 10 s have passed."""
    from twisted.internet.task import Clock

    from ztick_tw.logs import Tally

    clock = Clock()
    tally = Tally(clock, 10.0)
    assert tally.note() == 1
    assert [tally.note() for _ in range(5)] == [0] * 5
    clock.advance(9.9)
    assert tally.note() == 0
    clock.advance(0.1)
    assert tally.note() == 7  # the 6 held back, and this one
    assert tally.note() == 0
