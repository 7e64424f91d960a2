"""``ztick-tw dump``: text and JSON rendering as ztick prints them, compact, follow, errors."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ztick_tw.dump import compact, format_json, format_text, iso_time, main
from ztick_tw.model import (
    I64_MIN,
    AmqpSpec,
    AwfSpec,
    DirectSpec,
    Entry,
    HttpSpec,
    Job,
    JobRemoval,
    JobStatus,
    Pause,
    Policy,
    RedisSpec,
    Rule,
    RulePolicy,
    RuleRemoval,
    RunState,
    ScheduleRemoval,
    ScheduleSet,
    ShellSpec,
)
from ztick_tw.store.codec import encode
from ztick_tw.store.scanning import scan

NS = 1605457800000000000


def run(argv: list[str], sleep: Callable[[float], None] | None = None) -> tuple[int, str, str]:
    """Run dump with captured streams; returns (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    status = main(argv, out, err) if sleep is None else main(argv, out, err, sleep=sleep)
    return status, out.getvalue(), err.getvalue()


def write_log(path: Path, entries: list[Entry], tail: bytes = b"") -> bytes:
    """Write ``entries`` as a logfile (plus raw ``tail`` bytes); return the bytes."""
    data = b"".join(encode(e) for e in entries) + tail
    path.write_bytes(data)
    return data


# ztick's own dump tests, and the same style for the runners its stored dump lacks.
TEXT_CASES: list[tuple[Entry, str]] = [
    (Job("my-job", NS), "SET my-job 1605457800000000000 planned"),
    (Job("j", -5, JobStatus.FAILED), "SET j -5 failed"),
    (
        Rule("my-rule", "*/5 * * * *", ShellSpec("echo hello")),
        "RULE SET my-rule */5 * * * * shell echo hello",
    ),
    (
        Rule("direct-rule", "* * * * *", DirectSpec("/usr/bin/notify-send")),
        "RULE SET direct-rule * * * * * direct /usr/bin/notify-send",
    ),
    (
        Rule("curl-rule", "0 * * * *", DirectSpec("/usr/bin/curl", ("-s", "http://example.com"))),
        "RULE SET curl-rule 0 * * * * direct /usr/bin/curl -s http://example.com",
    ),
    (
        Rule("a", "n.", AmqpSpec("amqp://localhost", "events", "job.done")),
        "RULE SET a n. amqp amqp://localhost events job.done",
    ),
    (
        Rule("w", "report.", AwfSpec("generate-report", ("format=pdf", "target=main"))),
        "RULE SET w report. awf generate-report --input format=pdf --input target=main",
    ),
    (
        Rule("h", "hook.", HttpSpec("POST", "https://hooks.example.com/x")),
        "RULE SET h hook. http POST https://hooks.example.com/x",
    ),
    (
        Rule("q", "q.", RedisSpec("redis://localhost:6379/0", "RPUSH", "backup:tasks")),
        "RULE SET q q. redis redis://localhost:6379/0 RPUSH backup:tasks",
    ),
    (JobRemoval("old-job"), "REMOVE old-job"),
    (RuleRemoval("old-rule"), "REMOVERULE old-rule"),
]

OPTIONS = "tz=Europe/Paris limit=0 until=- overlap=skip"
SECOND = 10**9

#: ztick-tw's extension frames (types 16-20), as they read in text and in JSON.
EXTENSION_CASES: list[tuple[Entry, str, str]] = [
    (
        ScheduleSet("backup.daily", 'daily and mon-fri starting "May 2, 2024"', OPTIONS, NS),
        f'SCHEDULE SET backup.daily "daily and mon-fri starting \\"May 2, 2024\\"" {OPTIONS}'
        f" start={NS}",
        '{"type":"schedule_set","identifier":"backup.daily",'
        '"schedule":"daily and mon-fri starting \\"May 2, 2024\\"",'
        f'"options":"{OPTIONS}","start":{NS}}}',
    ),
    (
        ScheduleRemoval("backup.daily"),
        "SCHEDULE REMOVE backup.daily",
        '{"type":"schedule_remove","identifier":"backup.daily"}',
    ),
    (
        RunState("backup.daily", 3, NS, 2, NS - 5),
        f"RUNSTATE backup.daily runs=3 occurrence={NS} attempt=2 due={NS - 5}",
        '{"type":"run_state","identifier":"backup.daily","runs":3,'
        f'"occurrence":{NS},"attempt":2,"due":{NS - 5}}}',
    ),
    (
        RunState("ended", 5, I64_MIN, 1, I64_MIN),
        "RUNSTATE ended runs=5 occurrence=- attempt=1 due=-",
        '{"type":"run_state","identifier":"ended","runs":5,"occurrence":null,"attempt":1,'
        '"due":null}',
    ),
    (
        Pause("backup.daily", True, NS),
        f"PAUSE backup.daily {NS}",
        f'{{"type":"pause","identifier":"backup.daily","since":{NS}}}',
    ),
    (
        Pause("backup.daily", False, NS + 1),
        f"RESUME backup.daily {NS + 1}",
        f'{{"type":"resume","identifier":"backup.daily","since":{NS + 1}}}',
    ),
    (
        RulePolicy("r", Policy(30 * SECOND, 3, SECOND // 2, 5400 * SECOND)),
        "RULE POLICY r timeout=30s retries=3 backoff=500ms..1h30m",
        '{"type":"rule_policy","identifier":"r","timeout":30000000000,"retries":3,'
        '"backoff_min":500000000,"backoff_max":5400000000000}',
    ),
    (
        RulePolicy("r", Policy(retries=0)),
        "RULE POLICY r retries=0",
        '{"type":"rule_policy","identifier":"r","timeout":null,"retries":0,'
        '"backoff_min":null,"backoff_max":null}',
    ),
    (
        RulePolicy("r", Policy(backoff_max_ns=60 * SECOND)),
        "RULE POLICY r backoff=-..1m",
        '{"type":"rule_policy","identifier":"r","timeout":null,"retries":null,'
        '"backoff_min":null,"backoff_max":60000000000}',
    ),
]

JSON_CASES: list[tuple[Entry, str]] = [
    (
        Job("my-job", NS),
        '{"type":"set","identifier":"my-job","execution":1605457800000000000,"status":"planned"}',
    ),
    (
        Rule("my-rule", "*/5 * * * *", ShellSpec("echo hello")),
        '{"type":"rule_set","identifier":"my-rule","pattern":"*/5 * * * *",'
        '"runner":{"type":"shell","command":"echo hello"}}',
    ),
    (
        Rule("amqp-rule", "notify.", AmqpSpec("amqp://localhost", "events", "job.done")),
        '{"type":"rule_set","identifier":"amqp-rule","pattern":"notify.",'
        '"runner":{"type":"amqp","dsn":"amqp://localhost","exchange":"events",'
        '"routing_key":"job.done"}}',
    ),
    (
        Rule("direct-rule", "* * * * *", DirectSpec("/usr/bin/notify-send")),
        '{"type":"rule_set","identifier":"direct-rule","pattern":"* * * * *",'
        '"runner":{"type":"direct","executable":"/usr/bin/notify-send","args":[]}}',
    ),
    (
        Rule("curl-rule", "0 * * * *", DirectSpec("/usr/bin/curl", ("-s", "http://example.com"))),
        '{"type":"rule_set","identifier":"curl-rule","pattern":"0 * * * *",'
        '"runner":{"type":"direct","executable":"/usr/bin/curl",'
        '"args":["-s","http://example.com"]}}',
    ),
    (
        Rule("w", "r.", AwfSpec("wf", ("k=v",))),
        '{"type":"rule_set","identifier":"w","pattern":"r.",'
        '"runner":{"type":"awf","workflow":"wf","inputs":["k=v"]}}',
    ),
    (
        Rule("h", "h.", HttpSpec("GET", "http://x/")),
        '{"type":"rule_set","identifier":"h","pattern":"h.",'
        '"runner":{"type":"http","method":"GET","url":"http://x/"}}',
    ),
    (
        Rule("q", "q.", RedisSpec("redis://r", "SET", "k")),
        '{"type":"rule_set","identifier":"q","pattern":"q.",'
        '"runner":{"type":"redis","url":"redis://r","command":"SET","key":"k"}}',
    ),
    (JobRemoval("old-job"), '{"type":"remove","identifier":"old-job"}'),
    (RuleRemoval("old-rule"), '{"type":"remove_rule","identifier":"old-rule"}'),
]


@pytest.mark.parametrize(("entry", "line"), TEXT_CASES, ids=lambda v: str(v)[:30])
def test_text_rendering(entry: Entry, line: str) -> None:
    """Each entry renders as ztick's text dump line."""
    assert format_text(entry) == line


@pytest.mark.parametrize(("entry", "line"), JSON_CASES, ids=lambda v: str(v)[:30])
def test_json_rendering(entry: Entry, line: str) -> None:
    """Each entry renders as ztick's JSON object, byte for byte, and is valid JSON."""
    assert format_json(entry) == line
    json.loads(line)


@pytest.mark.parametrize(("entry", "text", "line"), EXTENSION_CASES, ids=lambda v: str(v)[:30])
def test_extension_frames_read_like_the_protocol(entry: Entry, text: str, line: str) -> None:
    """Types 16-20 render as the instruction that wrote them, and as one JSON object.

    The schedule text is quoted (inner quotes escaped), "none" times are ``-`` in text
    and ``null`` in JSON, a policy shows only the keys it sets, durations as the
    protocol writes them.
    """
    assert format_text(entry) == text
    assert format_json(entry) == line
    json.loads(line)


def test_extension_json_values_round_trip_through_a_json_reader() -> None:
    """A JSON reader gets the schedule text, options and numbers back exactly."""
    entry, _, line = EXTENSION_CASES[0]
    assert isinstance(entry, ScheduleSet)
    obj = json.loads(line)
    assert (obj["schedule"], obj["options"], obj["start"]) == (entry.text, OPTIONS, NS)
    assert json.loads(format_json(ScheduleSet("j", "a\nb\x1b", "", 0)))["schedule"] == "a\nb\x1b"


def test_extension_frames_with_iso_times(tmp_path: Path) -> None:
    """--iso turns the extension frames' times into ISO 8601 too ("none" stays none)."""
    path = tmp_path / "logfile"
    write_log(
        path,
        [
            ScheduleSet("j", "hourly", "tz=UTC", JAN_2030_NS),
            RunState("j", 0, JAN_2030_NS, 1, I64_MIN),
            Pause("j", True, JAN_2030_NS),
        ],
    )
    iso = "2030-01-06T03:00:00.000000000Z"
    status, out, err = run([str(path), "--iso"])
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f'SCHEDULE SET j "hourly" tz=UTC start={iso}',
        f"RUNSTATE j runs=0 occurrence={iso} attempt=1 due=-",
        f"PAUSE j {iso}",
    ]
    status, out, err = run([str(path), "--iso", "--format", "json"])
    objects = [json.loads(line) for line in out.splitlines()]
    assert (objects[0]["start"], objects[0]["start_iso"]) == (JAN_2030_NS, iso)
    assert (objects[1]["occurrence_iso"], objects[1]["due"], objects[1]["due_iso"]) == (
        iso,
        None,
        None,
    )
    assert objects[2]["since_iso"] == iso


def test_dump_file_with_every_extension_frame(tmp_path: Path) -> None:
    """A logfile mixing ztick's frames and the extension's prints every one, in order."""
    path = tmp_path / "logfile"
    entries = [Job("backup.daily", NS), *(e for e, _, _ in EXTENSION_CASES)]
    write_log(path, entries)
    status, out, err = run([str(path)])
    assert (status, err) == (0, "")
    assert out.splitlines() == [format_text(e) for e in entries]
    status, out, err = run([str(path), "--format", "json"])
    assert (status, err) == (0, "")
    assert [json.loads(line)["type"] for line in out.splitlines()] == [
        "set", "schedule_set", "schedule_remove", "run_state", "run_state", "pause", "resume",
        "rule_policy", "rule_policy", "rule_policy",
    ]  # fmt: skip


def test_frames_of_a_newer_version_are_skipped_with_a_warning(tmp_path: Path) -> None:
    """Types from 21 up are not shown; stderr counts them by type; the exit status is 0."""
    path = tmp_path / "logfile"
    newer = b"\x00\x00\x00\x03\x15ab"
    data = encode(Job("a", 1)) + newer + newer + b"\x00\x00\x00\x01\x30" + encode(Job("b", 2))
    path.write_bytes(data)
    status, out, err = run([str(path)])
    assert status == 0
    assert out.splitlines() == ["SET a 1 planned", "SET b 2 planned"]
    assert err == (
        f"dump: {path}: warning: skipped 3 frames of entry types this version does not "
        "know (type 21: 2, type 48: 1), written by a newer ztick-tw\n"
    )
    path.write_bytes(newer)
    assert run([str(path)]) == (
        0,
        "",
        f"dump: {path}: warning: skipped 1 frame of entry types this version does not know "
        "(type 21: 1), written by a newer ztick-tw\n",
    )


DOCS_LOGFILE = Path(__file__).resolve().parent.parent / "docs" / "logfile.md"
_HEX_BYTE = re.compile(r"[0-9a-f]{2}")


def _documented_frames() -> list[tuple[bytes, list[str]]]:
    """Each hex block of docs/logfile.md: its bytes and the dump lines the page gives.

    A line's leading two-digit hex words are bytes; text after them on the same line
    is a dump line, else the dump line is the backticked one right after the block.
    """
    blocks: list[tuple[bytes, list[str]]] = []
    lines = DOCS_LOGFILE.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i] != "```":
            i += 1
            continue
        data, shown = bytearray(), []
        i += 1
        while lines[i] != "```":
            words = lines[i].split()
            count = 0
            while count < len(words) and _HEX_BYTE.fullmatch(words[count]):
                count += 1
            data += bytes.fromhex(" ".join(words[:count]))
            rest = " ".join(words[count:])
            if rest and rest.split()[0] in ("PAUSE", "RESUME"):
                shown.append(rest)
            i += 1
        if not shown:
            shown.append(lines[i + 1].split("`")[1])
        blocks.append((bytes(data), shown))
        i += 1
    return blocks


def test_the_worked_examples_of_docs_logfile_are_right() -> None:
    """Every hex example in docs/logfile.md scans cleanly and dumps as the page says."""
    blocks = _documented_frames()
    assert len(blocks) == 7  # types 16, 17, 18 twice, 19 (two frames), 20 twice
    for data, shown in blocks:
        result = scan(data)
        entries = list(result)
        assert (result.problem, result.good_end) == (None, len(data)), shown
        assert [format_text(e) for e in entries] == shown


def test_json_escapes_like_ztick() -> None:
    """Quotes, backslashes and control characters are escaped as ztick does; UTF-8 stays."""
    line = format_json(JobRemoval('a"b\\c\nd\re\tf\x00g\x08h\x1fé'))
    assert line == (
        '{"type":"remove","identifier":"a\\"b\\\\c\\nd\\re\\tf\\u0000g\\u0008h\\u001fé"}'
    )
    assert json.loads(line)["identifier"] == 'a"b\\c\nd\re\tf\x00g\x08h\x1fé'


def test_dump_text_file(tmp_path: Path) -> None:
    """The dump prints one text line per frame, in file order, and exits 0."""
    path = tmp_path / "logfile"
    write_log(path, [e for e, _ in TEXT_CASES])
    status, out, err = run([str(path)])
    assert (status, err) == (0, "")
    assert out == "".join(line + "\n" for _, line in TEXT_CASES)


def test_dump_json_file(tmp_path: Path) -> None:
    """--format json prints one JSON object per line."""
    path = tmp_path / "logfile"
    write_log(path, [e for e, _ in JSON_CASES])
    status, out, err = run([str(path), "--format", "json"])
    assert (status, err) == (0, "")
    assert out == "".join(line + "\n" for _, line in JSON_CASES)


def test_empty_file_prints_nothing(tmp_path: Path) -> None:
    """An empty logfile is valid: no output, exit 0."""
    path = tmp_path / "logfile"
    path.write_bytes(b"")
    assert run([str(path)]) == (0, "", "")


def test_compact_keeps_final_live_state(tmp_path: Path) -> None:
    """--compact shows survivors only, last write wins, in order of last write."""
    path = tmp_path / "logfile"
    write_log(
        path,
        [
            Job("a", 1),
            Job("b", 2),
            Rule("r", "a", ShellSpec("x")),
            Job("a", 3, JobStatus.EXECUTED),
            JobRemoval("b"),
            Job("c", 4),
            Rule("gone", "g", ShellSpec("y")),
            RuleRemoval("gone"),
            Job("r", 9),  # a job named like a rule does not hide it
        ],
    )
    status, out, _ = run([str(path), "--compact"])
    assert status == 0
    assert out.splitlines() == [
        "RULE SET r a shell x",
        "SET a 3 executed",
        "SET c 4 planned",
        "SET r 9 planned",
    ]


def test_compact_keeps_live_extension_entries_after_jobs_and_rules() -> None:
    """--compact keeps the last schedule, run state, pause and policy of live jobs and rules.

    They come after every job and rule, in order of last write; removals drop them:
    a job removal all of its job's, a schedule removal the schedule and run state,
    a resume the pause, a rule removal the policy; entries of ids that are not live
    are left out.
    """
    entries: list[Entry] = [
        Rule("r", "s.", ShellSpec("true")),
        RulePolicy("r", Policy(retries=1)),
        Job("s.a", 10),
        ScheduleSet("s.a", "hourly", "tz=UTC", 1),
        RunState("s.a", 0, 10, 1, 10),
        Pause("s.a", True, 5),
        Job("s.a", 10, JobStatus.TRIGGERED),
        RulePolicy("r", Policy(retries=2)),  # last write wins
        Job("s.b", 20),
        ScheduleSet("s.b", "daily", "tz=UTC", 2),
        RunState("s.b", 1, 20, 1, 20),
        Pause("s.b", True, 6),
        Pause("s.b", False, 7),  # resumed: not paused any more
        ScheduleRemoval("s.b"),  # drops the schedule and the run state
        Job("s.c", 30),
        ScheduleSet("s.c", "daily", "tz=UTC", 3),
        Pause("s.c", True, 8),
        JobRemoval("s.c"),  # drops everything of s.c
        Pause("ghost", True, 9),  # no such job: not live
        Rule("gone", "g.", ShellSpec("x")),
        RulePolicy("gone", Policy(retries=4)),
        RuleRemoval("gone"),
        RunState("s.a", 1, 11, 1, 11),  # the run state after the next planned frame
    ]
    assert compact(entries) == [
        Rule("r", "s.", ShellSpec("true")),
        Job("s.a", 10, JobStatus.TRIGGERED),
        Job("s.b", 20),
        ScheduleSet("s.a", "hourly", "tz=UTC", 1),
        Pause("s.a", True, 5),
        RulePolicy("r", Policy(retries=2)),
        RunState("s.a", 1, 11, 1, 11),
    ]


def test_compact_planned_frame_drops_the_run_state_before_it() -> None:
    """A planned job frame resets the attempt on replay: the run state before it goes."""
    entries: list[Entry] = [Job("j", 1), RunState("j", 0, 1, 3, 1), Job("j", 2)]
    assert compact(entries) == [Job("j", 2)]
    triggered: list[Entry] = [
        Job("j", 1),
        RunState("j", 0, 1, 3, 1),
        Job("j", 1, JobStatus.TRIGGERED),
    ]
    assert compact(triggered) == [Job("j", 1, JobStatus.TRIGGERED), RunState("j", 0, 1, 3, 1)]


def test_compact_file_in_text(tmp_path: Path) -> None:
    """``dump --compact`` of a file prints the live extension lines after jobs and rules."""
    path = tmp_path / "logfile"
    write_log(
        path,
        [
            Job("a", NS),
            ScheduleSet("a", "every 5 minutes", "tz=UTC", NS),
            RunState("a", 1, NS, 1, NS),
            ScheduleSet("a", "every 10 minutes", "tz=UTC", NS),
            Job("b", NS),
            Pause("b", True, NS),
        ],
    )
    status, out, err = run([str(path), "--compact"])
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        f"SET a {NS} planned",
        f"SET b {NS} planned",
        f"RUNSTATE a runs=1 occurrence={NS} attempt=1 due={NS}",
        f'SCHEDULE SET a "every 10 minutes" tz=UTC start={NS}',
        f"PAUSE b {NS}",
    ]


def test_compact_function_removal_then_set() -> None:
    """A job removed and then set again is live; removals of unknown ids are harmless."""
    assert compact([Job("a", 1), JobRemoval("a"), JobRemoval("zz"), Job("a", 2)]) == [Job("a", 2)]


def test_missing_file_exits_1(tmp_path: Path) -> None:
    """A missing logfile exits 1 with a message naming it."""
    path = tmp_path / "nope"
    status, out, err = run([str(path)])
    assert (status, out) == (1, "")
    assert err == f"dump: {path}: no such file\n"


def test_directory_exits_1(tmp_path: Path) -> None:
    """A directory instead of a file exits 1 with a message."""
    status, _, err = run([str(tmp_path)])
    assert status == 1
    assert "is a directory" in err


def test_bad_arguments_exit_2() -> None:
    """An unknown format is a usage error on stderr, exit 2."""
    status, out, err = run(["x", "--format", "xml"])
    assert (status, out) == (2, "")
    assert "invalid choice: 'xml'" in err
    assert "usage: ztick-tw dump" in err


def test_help_goes_to_stdout() -> None:
    """--help prints usage on stdout and exits 0."""
    status, out, _ = run(["--help"])
    assert status == 0
    assert "--compact" in out and "--follow" in out


def test_corrupt_frame_prints_what_came_before(tmp_path: Path) -> None:
    """A corrupt frame: earlier frames are printed, then an error naming its offset; exit 1."""
    path = tmp_path / "logfile"
    good = write_log(path, [Job("a", 1), Job("b", 2)])
    bad = bytearray(encode(Job("c", 3)))
    bad[-1] = 8
    path.write_bytes(good + bytes(bad) + encode(Job("d", 4)))
    status, out, err = run([str(path)])
    assert status == 1
    assert out == "SET a 1 planned\nSET b 2 planned\n"
    assert err.startswith(f"dump: {path}: corrupt frame at byte offset {len(good)}: ")
    assert "bad job status byte 8" in err


def test_torn_tail_warns_and_exits_0(tmp_path: Path) -> None:
    """A partial trailing frame is reported on stderr and otherwise ignored."""
    path = tmp_path / "logfile"
    good = write_log(path, [Job("a", 1)])
    path.write_bytes(good + encode(Job("b", 2))[:6])
    status, out, err = run([str(path)])
    assert (status, out) == (0, "SET a 1 planned\n")
    assert err == (
        f"dump: {path}: warning: partial trailing frame at byte offset {len(good)} "
        "(6 bytes) ignored\n"
    )


class Appender:
    """A fake ``sleep`` for --follow: each call performs the next scripted step.

    When the script is exhausted it raises KeyboardInterrupt, like Ctrl-C.
    """

    def __init__(self, steps: list[Callable[[], None]]) -> None:
        self.steps = steps
        self.delays: list[float] = []

    def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if not self.steps:
            raise KeyboardInterrupt
        self.steps.pop(0)()


def append_bytes(path: Path, data: bytes) -> Callable[[], None]:
    """A step appending raw bytes to ``path``."""

    def step() -> None:
        with open(path, "ab") as f:
            f.write(data)

    return step


def test_follow_prints_appended_frames_and_waits_on_torn_tail(tmp_path: Path) -> None:
    """--follow prints new frames as they land; a half-written frame is waited on."""
    path = tmp_path / "logfile"
    write_log(path, [Job("a", 1)])
    frame = encode(Job("b", 2))
    sleep = Appender(
        [
            append_bytes(path, encode(JobRemoval("a"))),
            append_bytes(path, frame[:5]),  # torn: nothing printed yet
            lambda: None,
            append_bytes(path, frame[5:] + encode(RuleRemoval("r"))),
        ]
    )
    status, out, err = run([str(path), "--follow"], sleep=sleep)
    assert (status, err) == (0, "")
    assert out == "SET a 1 planned\nREMOVE a\nSET b 2 planned\nREMOVERULE r\n"
    assert sleep.delays == [0.2] * 5


def test_follow_json_and_corruption(tmp_path: Path) -> None:
    """--follow in JSON; a corrupt appended frame ends it with the absolute offset."""
    path = tmp_path / "logfile"
    first = write_log(path, [Job("a", 1)])
    second = encode(Job("b", 2))
    bad = b"\x00\x00\x00\x02\x09\x09"
    sleep = Appender([append_bytes(path, second + bad), lambda: None])
    status, out, err = run([str(path), "--follow", "--format", "json"], sleep=sleep)
    assert status == 1
    assert [json.loads(line)["identifier"] for line in out.splitlines()] == ["a", "b"]
    assert f"corrupt frame at byte offset {len(first) + len(second)}" in err
    assert "unknown entry type byte 9" in err


def test_follow_picks_up_a_replaced_file(tmp_path: Path) -> None:
    """When the logfile is replaced (compaction), --follow reads the new file."""
    path = tmp_path / "logfile"
    write_log(path, [Job("a", 1), Job("a", 2)])

    def replace() -> None:
        fresh = tmp_path / "logfile.new"
        write_log(fresh, [Job("a", 2)])
        os.replace(fresh, path)

    sleep = Appender([replace, append_bytes(path, encode(Job("z", 3)))])
    status, out, err = run([str(path), "--follow"], sleep=sleep)
    assert status == 0
    assert out.splitlines() == [
        "SET a 1 planned",
        "SET a 2 planned",
        "SET a 2 planned",
        "SET z 3 planned",
    ]
    assert "replaced" in err


def test_follow_compact_prints_state_then_new_frames(tmp_path: Path) -> None:
    """--compact --follow prints the live state, then every new frame as it comes."""
    path = tmp_path / "logfile"
    write_log(path, [Job("a", 1), JobRemoval("a"), Job("b", 2)])
    sleep = Appender([append_bytes(path, encode(JobRemoval("b")))])
    status, out, _ = run([str(path), "--compact", "--follow"], sleep=sleep)
    assert status == 0
    assert out == "SET b 2 planned\nREMOVE b\n"


def test_large_log_is_printed_completely(tmp_path: Path) -> None:
    """Output is chunked internally, yet every frame of a big log is printed once."""
    path = tmp_path / "logfile"
    write_log(path, [Job(f"job.{i:05d}", i) for i in range(10001)])
    status, out, _ = run([str(path)])
    lines = out.splitlines()
    assert status == 0
    assert len(lines) == 10001
    assert lines[0] == "SET job.00000 0 planned"
    assert lines[-1] == "SET job.10000 10000 planned"


#: 2030-01-06 03:00:00 UTC in nanoseconds.
JAN_2030_NS = 1_893_898_800_000_000_000


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (JAN_2030_NS, "2030-01-06T03:00:00.000000000Z"),
        (NS + 123_456_789, "2020-11-15T16:30:00.123456789Z"),
        (0, "1970-01-01T00:00:00.000000000Z"),
        (-5, "1969-12-31T23:59:59.999999995Z"),
        (2**63 - 1, "2262-04-11T23:47:16.854775807Z"),
    ],
)
def test_iso_time_is_utc_with_nanoseconds(ns: int, text: str) -> None:
    """Nanoseconds since the epoch become ISO 8601 UTC with all nine fraction digits."""
    assert iso_time(ns) == text


def test_iso_text_replaces_the_number_and_json_adds_a_field(tmp_path: Path) -> None:
    """--iso shows ISO times: in place of the number in text, as a new field in JSON.

    JSON keeps ``execution`` and adds ``execution_iso`` right after it; rules and
    removals are unchanged; nanoseconds stay the default.
    """
    path = tmp_path / "logfile"
    rule = Rule("r", "j.", ShellSpec("true"))
    write_log(path, [rule, Job("j.1", JAN_2030_NS, JobStatus.TRIGGERED), JobRemoval("j.0")])
    status, out, err = run([str(path), "--iso"])
    assert (status, err) == (0, "")
    assert out.splitlines() == [
        "RULE SET r j. shell true",
        "SET j.1 2030-01-06T03:00:00.000000000Z triggered",
        "REMOVE j.0",
    ]
    status, out, err = run([str(path), "--iso", "--format", "json", "--compact"])
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[1] == (
        '{"type":"set","identifier":"j.1","execution":1893898800000000000,'
        '"execution_iso":"2030-01-06T03:00:00.000000000Z","status":"triggered"}'
    )
    assert json.loads(lines[1])["execution"] == JAN_2030_NS
    assert lines[0] == format_json(rule)
    assert run([str(path)])[1].splitlines()[1] == f"SET j.1 {JAN_2030_NS} triggered"


def _default_sigint() -> None:
    """In the child: SIGINT as in a terminal (a shell's background job inherits it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _follow_in_subprocess(path: Path) -> subprocess.Popen[bytes]:
    """``python -m ztick_tw dump --follow path``, once it printed the file's first line.

    SIGINT is set back to its default in the child: started from a background job (CI
    launched with ``&``), it would inherit SIGINT ignored and Python would then never
    raise ``KeyboardInterrupt``, which is not what a user at a terminal has.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "ztick_tw", "dump", "--follow", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=_default_sigint,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 30)
    assert ready, "dump --follow printed nothing within 30 s"
    assert process.stdout.readline() == b"SET a 1 planned\n"
    return process


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_follow_ends_with_status_0_on_sigterm_as_on_sigint(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """A real ``dump --follow`` process exits 0, silently, on SIGTERM as on SIGINT."""
    path = tmp_path / "logfile"
    write_log(path, [Job("a", 1)])
    process = _follow_in_subprocess(path)
    try:
        process.send_signal(signum)
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (process.returncode, err) == (0, b"")
