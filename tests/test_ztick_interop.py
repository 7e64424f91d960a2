"""Interop with ztick: its logfiles load into ztick-tw, ztick-tw's load into ztick.

The frames come from ``tests/ztick_frames.py``, an encoder and reader written from SPEC
§5 without ztick_tw's codec; its byte fixtures are in ``tests/fixtures/ztick/``.

* ztick → ztick-tw: every fixture scans, loads through ``LogfileStore`` and the
  scheduler's replay, and dumps (``python -m ztick_tw dump``, text and JSON) exactly as
  the independent model says; the real daemon serves one over TCP.
* ztick-tw → ztick: the logfile the real daemon writes (rules of every runner kind, sets,
  removals, executed, failed and running jobs, then a compaction) is read by the
  ztick-like reader, which finds exactly the state the daemon answers with.
* ztick-tw's own frames (types 16-20, SPEC §8-9): a log holding them loads in the
  ztick-like reader, which skips them as ztick does, to exactly the jobs and rules;
  ztick-tw itself loads a newer version's log past the frame types it does not know.
* ztick's compaction leftovers (``logfile.to_compress``, ``logfile.compressed`` and
  ``.compressed.tmp``): ``merge_ztick_leftovers`` for every combination of files, torn
  tails, corruption, and a crash at every step of the merge; then the real daemon.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from tests import ztick_frames as zf
from tests.e2e.daemon import Daemon, daemon, now_ns, wait_status, wait_until
from tests.ztick_frames import (
    FAR,
    FIXTURES,
    UNICODE_ID,
    Record,
    RemoveJob,
    RemoveRule,
    SetJob,
    SetRule,
    State,
)
from ztick_tw.model import (
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
    RunnerSpec,
    RunState,
    ScheduleRemoval,
    ScheduleSet,
    ShellSpec,
)
from ztick_tw.scheduler.core import Scheduler
from ztick_tw.store.base import StoreError
from ztick_tw.store.codec import encode
from ztick_tw.store.leftovers import (
    COMPRESSED,
    COMPRESSED_TMP,
    MERGE_SUFFIX,
    TO_COMPRESS,
    ZTICK_LEFTOVERS,
    merge_ztick_leftovers,
)
from ztick_tw.store.logfile import LogfileStore
from ztick_tw.store.scanning import scan

SPEC_EXAMPLE = bytes.fromhex("00 00 00 10 00 00 04 74 6f 74 6f 16 47 bb 5c ee e1 50 00 00")

ALL_FIXTURES = sorted(FIXTURES)
TORN = {"torn-tail", "torn-header"}


# --------------------------------------------------------------------------- helpers


def runner_of(spec: RunnerSpec) -> zf.Runner:
    """ztick-tw's runner spec in the independent model's terms."""
    match spec:
        case ShellSpec(command=command):
            return zf.shell(command)
        case AmqpSpec(dsn=dsn, exchange=exchange, routing_key=routing_key):
            return zf.amqp(dsn, exchange, routing_key)
        case DirectSpec(executable=executable, arguments=arguments):
            return zf.direct(executable, *arguments)
        case AwfSpec(workflow=workflow, inputs=inputs):
            return zf.awf(workflow, *inputs)
        case HttpSpec(method=method, url=url):
            return zf.http(method, url)
        case RedisSpec(url=url, command=command, key=key):
            return zf.redis(url, command, key)
    raise AssertionError(spec)


def record_of(entry: Entry) -> Record:
    """A ztick-tw log entry in the independent model's terms."""
    match entry:
        case Job(id=job_id, execution_ns=ns, status=status):
            return SetJob(job_id, ns, status.wire)
        case Rule(id=rule_id, pattern=pattern, runner=runner):
            return SetRule(rule_id, pattern, runner_of(runner))
        case JobRemoval(id=job_id):
            return RemoveJob(job_id)
        case RuleRemoval(id=rule_id):
            return RemoveRule(rule_id)
    raise AssertionError(entry)


def scanned_state(data: bytes) -> State:
    """The state ztick-tw's codec replays from ``data`` (a torn tail is ignored)."""
    result = scan(data)
    records = [record_of(entry) for entry in result]
    assert result.problem is None or result.problem.kind == "torn", result.problem
    return zf.replay(records)


def dump(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m ztick_tw dump PATH ARGS...`` run to completion."""
    return subprocess.run(
        [sys.executable, "-m", "ztick_tw", "dump", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def interrupted_failed(state: State) -> dict[str, tuple[str, int]]:
    """QUERY answers after a start with ``interrupted_jobs = "fail"``."""
    return {
        job_id: ("failed" if status == "triggered" else status, ns)
        for job_id, (status, ns) in zf.query_lines(state).items()
    }


@pytest.fixture
def ztick_tw(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon setup in a fresh directory; every process it started is killed afterwards."""
    with daemon(tmp_path / "d") as d:
        yield d


# --------------------------------------------------------------------------- the fixtures


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_fixture_file_matches_its_generator(name: str) -> None:
    """Each committed .bin file is exactly what ``python -m tests.ztick_frames`` writes."""
    fixture = FIXTURES[name]
    assert fixture.path.read_bytes() == fixture.data()


def test_fixture_directory_holds_only_generated_files(tmp_path: Path) -> None:
    """No stale fixture is left behind, and the generator writes the same bytes anywhere."""
    committed = sorted(p.name for p in zf.FIXTURE_DIR.iterdir())
    assert committed == sorted(f"{name}.bin" for name in FIXTURES)
    written = zf.write_fixtures(tmp_path)
    assert sorted(p.name for p in written) == committed
    for path in written:
        assert path.read_bytes() == (zf.FIXTURE_DIR / path.name).read_bytes()


def test_independent_encoder_gives_the_spec_worked_example() -> None:
    """The hand encoder packs SPEC §5's worked example byte for byte."""
    assert zf.encode(SetJob("toto", 1605457800000000000)) == SPEC_EXAMPLE
    assert zf.read_log(SPEC_EXAMPLE).records == [SetJob("toto", 1605457800000000000)]


def test_fixtures_cover_every_runner_kind_status_and_frame_type() -> None:
    """every-frame has all six runner kinds, the four statuses, both removals, a unicode id."""
    records = FIXTURES["every-frame"].records
    kinds = {r.runner.kind for r in records if isinstance(r, SetRule)}
    statuses = {r.status for r in records if isinstance(r, SetJob)}
    assert kinds == set(zf.KINDS)
    assert statuses == set(zf.STATUSES)
    assert any(isinstance(r, RemoveJob) for r in records)
    assert any(isinstance(r, RemoveRule) for r in records)
    assert UNICODE_ID in zf.replay(records).jobs
    direct_args = [r.runner.items for r in records if isinstance(r, SetRule)]
    assert ("-s", "http://example.com/", ";") in direct_args  # direct with args
    assert ("format=pdf", "target=main") in direct_args  # awf with inputs
    ztick_written = FIXTURES["ztick-written"].records
    assert {r.runner.kind for r in ztick_written if isinstance(r, SetRule)} == set(zf.KINDS)
    assert {r.status for r in ztick_written if isinstance(r, SetJob)} == {"planned"}


def test_ztick_reader_stops_at_an_incomplete_frame_and_skips_bad_ones() -> None:
    """The ztick-like reader keeps a torn tail aside and skips an undecodable frame."""
    good = zf.encode(SetJob("a", 1))
    bad = zf.frame(b"\x00\x00\x01a" + bytes(8) + b"\x07")  # status byte 7
    torn = zf.encode(SetJob("b", 2))[:-1]
    log = zf.read_log(good + bad + good + torn)
    assert log.records == [SetJob("a", 1), SetJob("a", 1)]
    assert log.skipped == [len(good)]
    assert log.remaining == torn
    assert log.end == 2 * len(good) + len(bad)


# --------------------------------------------------------------------------- ztick -> ztick-tw


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_codec_decodes_every_frame_as_the_spec_says(name: str) -> None:
    """ztick-tw's codec reads each fixture frame by frame as the independent model."""
    fixture = FIXTURES[name]
    result = scan(fixture.data())
    assert [record_of(entry) for entry in result] == list(fixture.records)
    assert result.good_end == fixture.good_end
    if name in TORN:
        assert result.problem is not None and result.problem.kind == "torn"
        assert result.problem.offset == fixture.good_end
    else:
        assert result.problem is None


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_logfile_store_loads_exactly_the_expected_jobs_and_rules(
    name: str, tmp_path: Path
) -> None:
    """A copy of each fixture loads into the scheduler with exactly the model's state."""
    fixture = FIXTURES[name]
    path = tmp_path / "logfile"
    shutil.copyfile(fixture.path, path)
    clock = Clock()
    store = LogfileStore(clock, str(path), fsync=False)
    scheduler = Scheduler(clock, store, {})
    summary = scheduler.replay(store.load())
    try:
        expected = fixture.state()
        assert summary.frames == len(fixture.records)
        assert (summary.jobs, summary.rules) == (len(expected.jobs), len(expected.rules))
        jobs = {job_id: (status.wire, ns) for job_id, status, ns in scheduler.query()}
        assert jobs == zf.query_lines(expected)
        for job_id, (ns, status) in expected.jobs.items():
            got = scheduler.get_job(job_id)
            assert got is not None and (got[0].wire, got[1]) == (status, ns)
        rules = {
            rule.id: SetRule(rule.id, rule.pattern, runner_of(rule.runner))
            for rule in scheduler.list_rules()
        }
        assert rules == expected.rules
        removed = {r.id for r in fixture.records if isinstance(r, RemoveJob)}
        for job_id in removed - expected.jobs.keys():
            assert scheduler.get_job(job_id) is None
    finally:
        store.close()
    # A torn tail is cut off on disk, so that later appends follow whole frames.
    assert path.stat().st_size == fixture.good_end


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_dump_text_shows_every_frame(name: str) -> None:
    """``ztick-tw dump`` prints one SPEC §6 text line per frame of each fixture."""
    fixture = FIXTURES[name]
    done = dump(fixture.path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [zf.text_line(r) for r in fixture.records]
    if name in TORN:
        assert (
            f"partial trailing frame at byte offset {fixture.good_end}"
            f" ({len(fixture.tail)} bytes) ignored"
        ) in done.stderr
    else:
        assert done.stderr == ""


@pytest.mark.parametrize("name", ALL_FIXTURES)
def test_dump_json_shows_every_frame(name: str) -> None:
    """``dump --format json`` prints one SPEC §6 object per frame, byte for byte."""
    fixture = FIXTURES[name]
    done = dump(fixture.path, "--format", "json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [json.loads(line) for line in lines] == [zf.json_object(r) for r in fixture.records]
    assert lines == [zf.json_line(r) for r in fixture.records]


@pytest.mark.parametrize("name", ["ztick-written", "every-frame"])
def test_dump_compact_shows_the_live_state(name: str) -> None:
    """``dump --compact`` prints only the live jobs and rules, in order of last write."""
    fixture = FIXTURES[name]
    done = dump(fixture.path, "--compact")
    assert done.returncode == 0, done.stderr
    survivors = zf.compact(fixture.records)
    assert done.stdout.splitlines() == [zf.text_line(r) for r in survivors]
    assert zf.replay(survivors) == fixture.state()


def test_daemon_serves_a_ztick_logfile(tmp_path: Path) -> None:
    """The real daemon started on a copy of every-frame answers GET/QUERY/LISTRULES with it.

    The job that was ``triggered`` is an interrupted run; with ``interrupted_jobs =
    "fail"`` it is failed at startup (and that is appended, for ztick to read too).
    """
    fixture = FIXTURES["every-frame"]
    expected = fixture.state()
    with daemon(tmp_path / "d", {"scheduler": {"interrupted_jobs": "fail"}}) as ztick_tw:
        shutil.copyfile(fixture.path, ztick_tw.logfile)
        ztick_tw.start()
        client = ztick_tw.client()
        want = interrupted_failed(expected)
        assert client.query() == want
        for job_id, (status, ns) in want.items():
            assert client.get(job_id) == (status, ns)
        assert client.get("removed.job") is None
        assert client.get("never.set") is None
        rules = sorted(zf.listrules_line(r) for r in expected.rules.values())
        assert sorted(client.rules()) == rules
        assert client.stat()["jobs_total"] == str(len(expected.jobs))
        ztick_tw.stop()
        data = ztick_tw.logfile.read_bytes()
    # ztick reads the file back with the interrupted run failed and nothing else changed.
    log = zf.read_log(data)
    assert (log.skipped, log.remaining) == ([], b"")
    back = zf.replay(log.records)
    assert zf.query_lines(back) == want
    assert back.rules == expected.rules


# --------------------------------------------------------------------------- ztick-tw -> ztick

# (request, the rule it stores) for every runner kind.
RULES: list[tuple[str, SetRule]] = [
    ('RULE SET r.ok ok. shell "exit 0"', SetRule("r.ok", "ok.", zf.shell("exit 0"))),
    ("RULE SET r.fail fail. shell false", SetRule("r.fail", "fail.", zf.shell("false"))),
    (
        'RULE SET r.direct direct. direct /bin/true "a b" ";"',
        SetRule("r.direct", "direct.", zf.direct("/bin/true", "a b", ";")),
    ),
    ('RULE SET r.slow slow. shell "sleep 30"', SetRule("r.slow", "slow.", zf.shell("sleep 30"))),
    (
        "RULE SET r.awf awf. awf nightly --input k=v --input x=y",
        SetRule("r.awf", "awf.", zf.awf("nightly", "k=v", "x=y")),
    ),
    (
        "RULE SET r.http http. http POST http://127.0.0.1:9/hook",
        SetRule("r.http", "http.", zf.http("POST", "http://127.0.0.1:9/hook")),
    ),
    (
        "RULE SET r.amqp amqp. amqp amqp://guest:guest@127.0.0.1:5672/ ex rk",
        SetRule("r.amqp", "amqp.", zf.amqp("amqp://guest:guest@127.0.0.1:5672/", "ex", "rk")),
    ),
    (
        "RULE SET r.redis redis. redis redis://127.0.0.1:6379/0 RPUSH queue",
        SetRule("r.redis", "redis.", zf.redis("redis://127.0.0.1:6379/0", "RPUSH", "queue")),
    ),
]


def test_a_logfile_the_daemon_wrote_loads_in_ztick(ztick_tw: Daemon) -> None:
    """The ztick loader finds in ztick-tw's logfile exactly the state the daemon serves.

    Rules of every runner kind, a removed rule, jobs executed, failed (runner failure
    and no rule), running, planned, re-set, removed, a unicode id; then the same after
    a compaction (SIGUSR1), whose output holds one frame per live job and rule.
    """
    ztick_tw.start()
    client = ztick_tw.client()
    for request, _ in RULES:
        client.ok(request)
    client.ok("RULE SET r.gone gone. shell true")
    client.ok("REMOVERULE r.gone")
    now = now_ns()
    due = {"ok.1": "executed", "fail.1": "failed", "direct.1": "executed"}
    due |= {"norule.1": "failed", "slow.1": "triggered"}
    for job_id in due:
        client.ok(f"SET {job_id} {now}")
    client.ok(f"SET later.1 {FAR}")
    client.ok(f'SET "{UNICODE_ID}" {FAR + 1}')
    client.ok(f"SET removed.1 {FAR}")
    client.ok("REMOVE removed.1")
    client.ok(f"SET reset.1 {FAR}")
    client.ok(f"SET reset.1 {FAR + 2}")
    for job_id, status in due.items():
        assert wait_status(client, job_id, [status]) == status
    expected_jobs = {job_id: (now, status) for job_id, status in due.items()}
    expected_jobs |= {"later.1": (FAR, "planned"), UNICODE_ID: (FAR + 1, "planned")}
    expected_jobs["reset.1"] = (FAR + 2, "planned")
    expected_rules = {rule.id: rule for _, rule in RULES}

    def ztick_view() -> State | None:
        log = zf.read_log(ztick_tw.logfile.read_bytes())
        assert log.skipped == []
        state = zf.replay(log.records)
        return state if state.jobs == expected_jobs and not log.remaining else None

    state = wait_until(ztick_view, "the logfile to hold every status transition")
    assert state.rules == expected_rules
    # ztick's view is the daemon's view.
    assert zf.query_lines(state) == client.query()
    assert sorted(zf.listrules_line(r) for r in state.rules.values()) == sorted(client.rules())
    done = dump(ztick_tw.logfile)
    log = zf.read_log(ztick_tw.logfile.read_bytes())
    assert done.stdout.splitlines() == [zf.text_line(r) for r in log.records]

    # After a compaction the file is still a ztick logfile, now one frame per live entry.
    before = len(log.records)
    run = ztick_tw.current
    assert run is not None
    os.kill(run.pid, signal.SIGUSR1)
    wait_until(lambda: client.stat()["compression"] == "success", "the compaction to succeed")
    compacted = zf.read_log(ztick_tw.logfile.read_bytes())
    assert (compacted.skipped, compacted.remaining) == ([], b"")
    assert len(compacted.records) == len(expected_jobs) + len(expected_rules) < before
    assert all(isinstance(r, SetJob | SetRule) for r in compacted.records)
    again = zf.replay(compacted.records)
    assert (again.jobs, again.rules) == (expected_jobs, expected_rules)
    assert list(ztick_tw.workdir.glob("*.tmp")) == []
    ztick_tw.stop()
    # The run stopped at shutdown stays triggered, which ztick loads as it is.
    final = zf.replay(zf.read_log(ztick_tw.logfile.read_bytes()).records)
    assert final.jobs == expected_jobs


# --------------------------------------------------------------------------- extension frames

#: A ztick-tw log of a scheduled job's life: ztick's frames with the extension's between.
SCHEDULED_LOG: list[Entry] = [
    Rule("r.backup", "backup.", ShellSpec("tar czf /tmp/b.tgz /etc")),
    RulePolicy("r.backup", Policy(timeout_ns=600 * 10**9, retries=2)),
    ScheduleSet("backup.daily", "daily", "tz=Europe/Paris limit=0", zf.PAST),
    Job("backup.daily", zf.PAST),
    RunState("backup.daily", 0, zf.PAST, 1, zf.PAST),
    Job("backup.daily", zf.PAST, JobStatus.TRIGGERED),
    Job("backup.daily", zf.PAST + 86_400 * 10**9),
    RunState("backup.daily", 1, zf.PAST + 86_400 * 10**9, 1, zf.PAST + 86_400 * 10**9),
    Pause("backup.daily", True, zf.PAST + 3600 * 10**9),
    Job("one.shot", FAR),
    Pause("one.shot", True, zf.PAST),
    Pause("one.shot", False, zf.PAST + 1),
    ScheduleSet("gone.hourly", "hourly", "tz=UTC", zf.PAST),
    Job("gone.hourly", FAR),
    ScheduleRemoval("gone.hourly"),
    Job(UNICODE_ID, FAR + 1),
    RunState(UNICODE_ID, 3, -(2**63), 2, FAR + 1),
]


def test_a_log_with_extension_frames_loads_in_ztick() -> None:
    """The ztick loader skips every frame of types 16-20 and loads the rest as it is.

    The frames it skips are exactly the extension's, at their offsets; what it loads
    is the ztick-tw log's jobs and rules, with the state ztick-tw's own type-0 frames
    give (a scheduled job is a one-shot job at its next occurrence for ztick).
    """
    frames = [encode(e) for e in SCHEDULED_LOG]
    data = b"".join(frames)
    offsets = [sum(len(f) for f in frames[:i]) for i in range(len(frames))]
    log = zf.read_log(data)
    assert (log.remaining, log.end) == (b"", len(data))
    ztick_entries = [e for e in SCHEDULED_LOG if isinstance(e, Job | Rule)]
    assert log.records == [record_of(e) for e in ztick_entries]
    assert log.skipped == [
        offset
        for offset, entry in zip(offsets, SCHEDULED_LOG, strict=True)
        if not isinstance(entry, Job | Rule)
    ]
    state = zf.replay(log.records)
    assert state.jobs == {
        "backup.daily": (zf.PAST + 86_400 * 10**9, "planned"),
        "one.shot": (FAR, "planned"),
        "gone.hourly": (FAR, "planned"),
        UNICODE_ID: (FAR + 1, "planned"),
    }
    assert list(state.rules) == ["r.backup"]
    # Every extension frame is a whole frame with a type byte from 16 to 20.
    assert {data[offset + 4] for offset in log.skipped} == set(range(16, 21))


def test_dump_compact_of_a_scheduled_log_reads_in_ztick_too() -> None:
    """The compacted form (jobs, rules, then extensions) loads in ztick to the same state."""
    from ztick_tw.dump import compact

    data = b"".join(encode(e) for e in compact(SCHEDULED_LOG))
    log = zf.read_log(data)
    full = zf.replay(zf.read_log(b"".join(encode(e) for e in SCHEDULED_LOG)).records)
    again = zf.replay(log.records)
    assert (again.jobs, again.rules) == (full.jobs, full.rules)
    # The policy; backup.daily's schedule, run state and pause; the unicode job's run state.
    assert len(log.skipped) == 5


def _texts(events: Sequence[Mapping[str, Any]]) -> str:
    return "\n".join(formatEvent(dict(e)) for e in events)


def test_ztick_tw_loads_a_newer_log_past_frame_types_it_does_not_know(tmp_path: Path) -> None:
    """Frames of types 21 and up (a newer ztick-tw's) are skipped at load, as ztick does.

    Every known entry before and after them is loaded, the skipped frames are counted
    in a warning, nothing is cut from the file, and appends go on after it.
    """
    newer = [zf.frame(b"\x15" + b"future"), zf.frame(b"\xc8"), zf.frame(b"\x15")]
    entries = SCHEDULED_LOG[:5]
    data = (
        encode(entries[0])
        + newer[0]
        + b"".join(encode(e) for e in entries[1:4])
        + newer[1]
        + newer[2]
        + encode(entries[4])
    )
    path = tmp_path / "logfile"
    path.write_bytes(data)
    clock = Clock()
    store = LogfileStore(clock, str(path), fsync=False)
    with capturedLogs() as events:
        loaded = list(store.load())
    try:
        assert loaded == entries
        assert store.frames_in_log == len(entries) + 3
        assert path.read_bytes() == data
        assert (
            f"logfile {path}: skipped 3 frames of entry types this version does not know"
            " (type 21: 2, type 200: 1), written by a newer ztick-tw" in _texts(events)
        )
        store.append(Job("after", FAR))
        clock.advance(0)
        store.flush()
    finally:
        store.close()
    result = scan(path.read_bytes())
    assert [*result] == [*entries, Job("after", FAR)]
    assert (result.problem, result.skipped) == (None, 3)


# --------------------------------------------------------------------------- leftovers: unit

T_RECORDS = FIXTURES["leftover-to-compress"].records
L_RECORDS = FIXTURES["leftover-logfile"].records
#: An earlier cycle's log, whose compacted form an unfinished later cycle leaves beside T.
OLDER_RECORDS: tuple[Record, ...] = (
    SetRule("rule.ancient", "ancient.", zf.shell("echo ancient")),
    SetJob("ancient.1", FAR + 11),
    SetJob("old.1", FAR + 12),  # T sets it again
    SetJob("dropped", FAR),
    RemoveJob("dropped"),
)

T = zf.encode_all(T_RECORDS)
L = zf.encode_all(L_RECORDS)
C_OF_T = zf.encode_all(zf.ztick_compress(T_RECORDS))
C_OLDER = zf.encode_all(zf.ztick_compress(OLDER_RECORDS))


def write_files(directory: Path, files: dict[str, bytes]) -> Path:
    """Create ``files`` (name -> bytes) in ``directory``; returns the logfile's path."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory / "logfile"


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory``, name -> bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# (what happened, the files ztick left (plus the logfile "logfile"), the expected records)
CRASH_STATES: list[tuple[str, dict[str, bytes], tuple[Record, ...]]] = [
    ("renamed, no new logfile yet", {TO_COMPRESS: T}, T_RECORDS),
    ("renamed, new logfile in use", {TO_COMPRESS: T, "logfile": L}, T_RECORDS + L_RECORDS),
    (
        "writing compressed.tmp",
        {TO_COMPRESS: T, "logfile": L, COMPRESSED_TMP: C_OF_T[: len(C_OF_T) // 2]},
        T_RECORDS + L_RECORDS,
    ),
    (
        "compressed.tmp written, not renamed",
        {TO_COMPRESS: T, "logfile": L, COMPRESSED_TMP: C_OF_T},
        T_RECORDS + L_RECORDS,
    ),
    (
        "compressed, to_compress not yet deleted",
        {TO_COMPRESS: T, "logfile": L, COMPRESSED: C_OF_T},
        T_RECORDS + L_RECORDS,
    ),
    ("cycle finished", {COMPRESSED: C_OF_T, "logfile": L}, T_RECORDS + L_RECORDS),
    ("cycle finished, no write since", {COMPRESSED: C_OF_T}, T_RECORDS),
    (
        "second cycle interrupted after a finished one",
        {COMPRESSED: C_OLDER, TO_COMPRESS: T, "logfile": L},
        OLDER_RECORDS + T_RECORDS + L_RECORDS,
    ),
    (
        "second cycle writing compressed.tmp after a finished one",
        {COMPRESSED: C_OLDER, COMPRESSED_TMP: C_OF_T[:7], TO_COMPRESS: T, "logfile": L},
        OLDER_RECORDS + T_RECORDS + L_RECORDS,
    ),
]


@pytest.mark.parametrize(
    ("files", "records"),
    [(files, records) for _, files, records in CRASH_STATES],
    ids=[what for what, _, _ in CRASH_STATES],
)
def test_merge_recovers_every_ztick_crash_state(
    tmp_path: Path, files: dict[str, bytes], records: tuple[Record, ...]
) -> None:
    """Whatever ztick's compaction left, the merged logfile replays to the whole state."""
    logfile = write_files(tmp_path / "db", files)
    lines = merge_ztick_leftovers(str(logfile))
    assert lines and any("merged" in line for line in lines)
    assert sorted(os.listdir(logfile.parent)) == ["logfile"]
    assert scanned_state(logfile.read_bytes()) == zf.replay(records)
    assert stat.S_IMODE(logfile.stat().st_mode) == 0o600
    # Nothing is left to do at the next start.
    assert merge_ztick_leftovers(str(logfile)) == []


def test_merged_bytes_are_the_leftovers_then_the_logfile(tmp_path: Path) -> None:
    """The merge is a raw concatenation: compressed, then to_compress, then the logfile."""
    logfile = write_files(tmp_path, {COMPRESSED: C_OLDER, TO_COMPRESS: T, "logfile": L})
    merge_ztick_leftovers(str(logfile))
    assert logfile.read_bytes() == C_OLDER + T + L


@pytest.mark.parametrize(
    ("leftover", "cut"),
    [(TO_COMPRESS, 3), (TO_COMPRESS, 1), (COMPRESSED, 5), (COMPRESSED, 2)],
    ids=["to_compress-payload", "to_compress-header", "compressed-payload", "compressed-header"],
)
def test_a_torn_leftover_is_cut_back_to_its_last_whole_frame(
    tmp_path: Path, leftover: str, cut: int
) -> None:
    """A leftover ending mid-frame loses only that frame; the logfile's frames follow whole."""
    base = T if leftover == TO_COMPRESS else C_OF_T
    torn = zf.encode(SetJob("torn.job", FAR))
    torn = torn[: len(torn) - cut] if cut > 2 else torn[:cut]
    logfile = write_files(tmp_path, {leftover: base + torn, "logfile": L})
    lines = merge_ztick_leftovers(str(logfile))
    assert any(f"torn last frame at byte offset {len(base)}" in line for line in lines)
    data = logfile.read_bytes()
    assert data == base + L
    result = scan(data)
    list(result)
    assert result.problem is None
    assert scanned_state(data) == zf.replay(T_RECORDS + L_RECORDS)


def test_both_leftovers_torn(tmp_path: Path) -> None:
    """Both compressed and to_compress torn: each is cut, nothing is glued together."""
    torn = zf.encode(SetJob("torn.job", FAR))[:9]
    logfile = write_files(
        tmp_path, {COMPRESSED: C_OLDER + torn, TO_COMPRESS: T + torn, "logfile": L}
    )
    lines = merge_ztick_leftovers(str(logfile))
    assert sum("torn last frame" in line for line in lines) == 2
    assert logfile.read_bytes() == C_OLDER + T + L
    assert "torn.job" not in scanned_state(logfile.read_bytes()).jobs


def test_a_torn_logfile_is_copied_as_it_is_for_load_to_cut(tmp_path: Path) -> None:
    """The logfile's own torn tail stays at the end of the merge, where load cuts it off."""
    torn = zf.encode(SetJob("torn.job", FAR))[:-4]
    logfile = write_files(tmp_path, {TO_COMPRESS: T, "logfile": L + torn})
    merge_ztick_leftovers(str(logfile))
    assert logfile.read_bytes() == T + L + torn
    clock = Clock()
    store = LogfileStore(clock, str(logfile), fsync=False)
    entries = [record_of(e) for e in store.load()]
    store.close()
    assert zf.replay(entries) == zf.replay(T_RECORDS + L_RECORDS)
    assert logfile.stat().st_size == len(T + L)


@pytest.mark.parametrize("leftover", [TO_COMPRESS, COMPRESSED])
def test_a_corrupt_leftover_stops_with_its_name_and_offset(tmp_path: Path, leftover: str) -> None:
    """A frame that does not decode raises StoreError naming the file and the offset."""
    bad = bytearray(zf.encode(SetJob("bad", 1)))
    bad[-1] = 9  # status byte 9
    data = T + bytes(bad) + T
    logfile = write_files(tmp_path, {leftover: data, "logfile": L, COMPRESSED_TMP: b"x"})
    before = snapshot(tmp_path)
    with pytest.raises(StoreError) as caught:
        merge_ztick_leftovers(str(logfile))
    message = str(caught.value)
    assert str(tmp_path / leftover) in message
    assert f"byte offset {len(T)}" in message
    assert snapshot(tmp_path) == before  # nothing changed, no temporary file left


def test_a_lone_compressed_tmp_is_deleted(tmp_path: Path) -> None:
    """compressed.tmp without its input is never needed: removed, the logfile untouched."""
    logfile = write_files(tmp_path, {COMPRESSED_TMP: C_OF_T[:10], "logfile": L})
    inode = logfile.stat().st_ino
    lines = merge_ztick_leftovers(str(logfile))
    assert len(lines) == 1 and COMPRESSED_TMP in lines[0]
    assert snapshot(tmp_path) == {"logfile": L}
    assert logfile.stat().st_ino == inode


def test_nothing_to_do(tmp_path: Path) -> None:
    """No leftovers: [] and nothing touched; a missing logfile is not created."""
    logfile = write_files(tmp_path, {"logfile": L, "other.to_compress": b"x"})
    inode = logfile.stat().st_ino
    assert merge_ztick_leftovers(str(logfile)) == []
    assert snapshot(tmp_path) == {"logfile": L, "other.to_compress": b"x"}
    assert logfile.stat().st_ino == inode
    empty = tmp_path / "empty"
    empty.mkdir()
    assert merge_ztick_leftovers(str(empty / "logfile")) == []
    assert os.listdir(empty) == []


def test_a_stale_merge_file_is_removed_or_replaced(tmp_path: Path) -> None:
    """A merge interrupted before its rename leaves ``<logfile>.merge.tmp``: harmless."""
    stale = zf.encode(SetJob("stale", 1)) * 3
    logfile = write_files(tmp_path, {"logfile": L, "logfile" + MERGE_SUFFIX: stale})
    lines = merge_ztick_leftovers(str(logfile))
    assert len(lines) == 1 and MERGE_SUFFIX in lines[0]
    assert snapshot(tmp_path) == {"logfile": L}
    write_files(tmp_path, {TO_COMPRESS: T, "logfile" + MERGE_SUFFIX: stale})
    merge_ztick_leftovers(str(logfile))
    assert snapshot(tmp_path) == {"logfile": T + L}


def test_the_current_directory_is_never_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leftovers of an old ztick in the working directory are mentioned, not merged."""
    cwd = tmp_path / "cwd"
    write_files(cwd, {TO_COMPRESS: T, COMPRESSED: C_OF_T})
    logfile = write_files(tmp_path / "db", {"logfile": L})
    monkeypatch.chdir(cwd)
    lines = merge_ztick_leftovers(str(logfile))
    assert len(lines) == 1
    assert str(cwd / TO_COMPRESS) in lines[0] and "not merged" in lines[0]
    assert snapshot(cwd) == {COMPRESSED: C_OF_T, TO_COMPRESS: T}
    assert snapshot(tmp_path / "db") == {"logfile": L}


def test_a_relative_logfile_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``logfile_path = "logfile"`` the working directory is the logfile's: merged."""
    write_files(tmp_path, {TO_COMPRESS: T, "logfile": L})
    monkeypatch.chdir(tmp_path)
    lines = merge_ztick_leftovers("logfile")
    assert not any("not merged" in line for line in lines)
    assert snapshot(tmp_path) == {"logfile": T + L}


def test_a_logfile_named_like_a_leftover_is_not_treated_as_one(tmp_path: Path) -> None:
    """A logfile called ``logfile.compressed`` is the log: to_compress goes before it."""
    write_files(tmp_path, {TO_COMPRESS: T, COMPRESSED: L})
    lines = merge_ztick_leftovers(str(tmp_path / COMPRESSED))
    assert lines
    assert snapshot(tmp_path) == {COMPRESSED: T + L}


def test_a_logfile_in_use_is_left_alone(tmp_path: Path) -> None:
    """While another process holds the logfile's lock nothing is merged or changed."""
    logfile = write_files(tmp_path, {TO_COMPRESS: T, "logfile": L})
    before = snapshot(tmp_path)
    fd = os.open(logfile, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreError, match="in use by another process"):
            merge_ztick_leftovers(str(logfile))
    finally:
        os.close(fd)
    assert snapshot(tmp_path) == before


class Crash(BaseException):
    """The process dies here (raised instead of a file-system change)."""


class CrashAt:
    """Failure injection: the ``at``-th file change under ``root`` does not happen.

    A file change is an ``os.write`` to a file under ``root`` (half of it is written:
    a torn write), an ``os.rename`` or an ``os.unlink`` of a path under ``root``.
    """

    def __init__(self, root: Path, at: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = str(root)
        self.at = at
        self.count = 0
        real_write, real_rename, real_unlink = os.write, os.rename, os.unlink

        def write(fd: int, data: bytes | memoryview) -> int:
            if self._mine(os.readlink(f"/proc/self/fd/{fd}")) and self._step():
                real_write(fd, bytes(data)[: len(data) // 2])
                raise Crash
            return real_write(fd, data)

        def rename(src: str, dst: str) -> None:
            if self._mine(str(src)) and self._step():
                raise Crash
            real_rename(src, dst)

        def unlink(path: str) -> None:
            if self._mine(str(path)) and self._step():
                raise Crash
            real_unlink(path)

        monkeypatch.setattr(os, "write", write)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "unlink", unlink)

    def _mine(self, path: str) -> bool:
        return path.startswith(self.root + os.sep)

    def _step(self) -> bool:
        self.count += 1
        return self.count - 1 == self.at


@pytest.mark.parametrize(
    ("files", "records"),
    [(files, records) for _, files, records in CRASH_STATES],
    ids=[what for what, _, _ in CRASH_STATES],
)
def test_a_crash_at_any_step_of_the_merge_loses_nothing(
    tmp_path: Path, files: dict[str, bytes], records: tuple[Record, ...]
) -> None:
    """Kill the merge before each of its file changes in turn; the next start recovers all."""
    expected = zf.replay(records)
    crashed_at = []
    at = 0
    while True:
        directory = tmp_path / f"crash-{at}"
        logfile = write_files(directory, files)
        with pytest.MonkeyPatch.context() as patch:
            CrashAt(directory, at, patch)
            try:
                merge_ztick_leftovers(str(logfile))
            except Crash:
                crashed_at.append(at)
            else:
                break
        # The next start: merging again gives the whole state, and cleans up.
        merge_ztick_leftovers(str(logfile))
        assert scanned_state(logfile.read_bytes()) == expected, f"crash before change {at}"
        assert sorted(os.listdir(directory)) == ["logfile"], f"crash before change {at}"
        at += 1
    assert scanned_state(logfile.read_bytes()) == expected
    # Writes of the merge file, its rename, and one unlink per leftover were all hit.
    leftovers = [name for name in files if name in ZTICK_LEFTOVERS]
    assert len(crashed_at) >= 2 + len(leftovers)


def test_a_crash_after_the_rename_then_appends_then_restart(tmp_path: Path) -> None:
    """Leftovers surviving a crash after the rename, then new appends: still the whole state."""
    logfile = write_files(tmp_path, {TO_COMPRESS: T, "logfile": L, COMPRESSED: C_OF_T})
    with pytest.MonkeyPatch.context() as patch:
        # Changes 0-1: the two leftovers written, 2: the logfile copied, 3: the rename,
        # 4: the first leftover removed.
        CrashAt(tmp_path, 4, patch)
        with pytest.raises(Crash):
            merge_ztick_leftovers(str(logfile))
    assert set(os.listdir(tmp_path)) == {TO_COMPRESS, COMPRESSED, "logfile"}
    later = (RemoveJob("old.2"), SetJob("kept.1", FAR + 99))
    with open(logfile, "ab") as f:
        f.write(zf.encode_all(later))
    merge_ztick_leftovers(str(logfile))
    assert os.listdir(tmp_path) == ["logfile"]
    assert scanned_state(logfile.read_bytes()) == zf.replay(T_RECORDS + L_RECORDS + later)


# --------------------------------------------------------------------------- leftovers: daemon


def leftover_setup(variant: str) -> tuple[dict[str, bytes], tuple[Record, ...]]:
    """Files for one leftover variant (besides the logfile) and the records they hold."""
    t, c = FIXTURES["leftover-to-compress"], FIXTURES["leftover-compressed"]
    if variant == "to_compress":
        half = c.data()[: len(c.data()) // 2]
        return {TO_COMPRESS: t.data(), COMPRESSED_TMP: half}, t.records
    if variant == "compressed":
        assert zf.replay(c.records) == zf.replay(t.records)  # the fixture is faithful
        return {COMPRESSED: c.data()}, c.records
    return {COMPRESSED: C_OLDER, TO_COMPRESS: t.data()}, OLDER_RECORDS + t.records


@pytest.mark.parametrize("variant", ["to_compress", "compressed", "older-compressed"])
def test_daemon_serves_the_union_of_ztick_leftovers_and_logfile(
    ztick_tw: Daemon, variant: str
) -> None:
    """With ztick's leftovers beside the logfile the daemon serves both, then removes them.

    After a restart the same state remains (it now lives in the logfile alone).
    """
    files, records = leftover_setup(variant)
    write_files(ztick_tw.workdir, files)
    logfile_fixture = FIXTURES["leftover-logfile"]
    ztick_tw.logfile.write_bytes(logfile_fixture.data())
    expected = zf.replay(records + logfile_fixture.records)
    rules = sorted(zf.listrules_line(r) for r in expected.rules.values())

    for _ in range(2):
        ztick_tw.start()
        left = [name for name in ZTICK_LEFTOVERS if (ztick_tw.workdir / name).exists()]
        assert left == [], "not merged: is merge_ztick_leftovers called by LogfileStore.load?"
        client = ztick_tw.client()
        assert client.query() == zf.query_lines(expected)
        assert client.get("later-removed") is None
        assert sorted(client.rules()) == rules
        ztick_tw.stop()
    assert scanned_state(ztick_tw.logfile.read_bytes()) == expected
    ztick_view = zf.read_log(ztick_tw.logfile.read_bytes())
    assert (ztick_view.skipped, ztick_view.remaining) == ([], b"")
    assert zf.replay(ztick_view.records) == expected
