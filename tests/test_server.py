"""Tests for ``ztick_tw.protocol.server``: the ztick line protocol on a ``StringTransport``."""

from __future__ import annotations

from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.helpers import (
    EPOCH_NS,
    SECOND_NS,
    STAT_KEYS,
    Conn,
    FakeStore,
    Harness,
    make_harness,
)
from ztick_tw.auth import Token, TokenStore
from ztick_tw.model import (
    AmqpSpec,
    AwfSpec,
    DirectSpec,
    HttpSpec,
    Job,
    JobRemoval,
    JobStatus,
    RedisSpec,
    Rule,
    RuleRemoval,
    ShellSpec,
)
from ztick_tw.protocol.server import MAX_LINE_BYTES, ZtickFactory, ZtickProtocol
from ztick_tw.scheduler.core import Scheduler
from ztick_tw.store.base import StoreError

FUTURE = EPOCH_NS + 3600 * SECOND_NS
REACTOR_TCP = cast(IReactorTCP, reactor)
REACTOR_TIME = cast(IReactorTime, reactor)


def one(h: Harness, data: bytes) -> tuple[Conn, bytes]:
    """Send ``data`` on a new connection and return it with the answer bytes."""
    conn = h.connect()
    conn.send(data)
    return conn, conn.take()


# -- SET --------------------------------------------------------------------------------


def test_set_ns() -> None:
    """``ID SET job ns`` answers ``ID OK``, stores the job and persists it as planned."""
    h = make_harness()
    _, out = one(h, f"r1 SET job {FUTURE}\n".encode())
    assert out == b"r1 OK\n"
    assert h.scheduler.get_job("job") == (JobStatus.PLANNED, FUTURE)
    assert h.store.entries == [Job("job", FUTURE, JobStatus.PLANNED)]


def test_store_refusing_a_write_answers_error_and_keeps_the_connection() -> None:
    """A store that raises on append gets ``ID ERROR``; the connection keeps serving."""
    h = make_harness()
    h.store.closed = True
    conn, out = one(h, f"r1 SET job {FUTURE}\n".encode())
    assert out == b"r1 ERROR\n"
    conn.send(b"r2 STAT\n")
    assert conn.take().startswith(b"r2 uptime_ns ")


@pytest.mark.parametrize(
    ("args", "ns"),
    [
        ("2030-01-02 03:04:05", 1893553445 * SECOND_NS),
        ('"2030-01-02 03:04:05"', 1893553445 * SECOND_NS),
        ("-1000", -1000),
        (str(2**63 - 1), 2**63 - 1),
        (str(-(2**63)), -(2**63)),
        ("1_000", 1000),
        ("123 456", 123),
    ],
)
def test_set_time_forms(args: str, ns: int) -> None:
    """SET accepts ns (also negative, i64 bounds), two-token and quoted datetimes."""
    h = make_harness()
    _, out = one(h, f"r SET j {args}\n".encode())
    assert out == b"r OK\n"
    assert h.scheduler.get_job("j") == (JobStatus.PLANNED, ns)


@pytest.mark.parametrize(
    "line",
    [
        f"r SET j {2**63}",
        f"r SET j {-(2**63) - 1}",
        "r SET j garbage",
        "r SET j 12abc",
        "r SET j 2023-02-29 00:00:00",
        "r SET j 2023-13-01 00:00:00",
        "r SET j 2023-01-01 24:00:00",
        "r SET j 2023-01-01",
        'r SET j "2023-01-01 24:00:00"',
        'r SET j ""',
        "r SET j",
        "r SET",
        'r SET j "unterminated',
    ],
)
def test_set_invalid_answers_error_and_stores_nothing(line: str) -> None:
    """A bad SET answers a bare ``ID ERROR`` and stores and persists nothing."""
    h = make_harness()
    conn, out = one(h, line.encode() + b"\n")
    assert out == b"r ERROR\n"
    assert h.scheduler.get_job("j") is None
    assert len(h.scheduler.jobs) == 0
    assert h.store.entries == []
    assert not conn.closed


def test_set_replaces_time_and_status() -> None:
    """Re-SET of an executed job gives it the new time and status planned."""
    h = make_harness()
    conn = h.connect()
    conn.send(b'r RULE SET all "" shell true\n')
    conn.send(f"r SET j {EPOCH_NS - SECOND_NS}\n".encode())
    h.clock.advance(0)
    h.runner.complete("j")
    conn.take()
    conn.send(b"g GET j\n")
    assert conn.take() == f"g OK executed {EPOCH_NS - SECOND_NS}\n".encode()
    conn.send(f"s SET j {FUTURE}\ng GET j\n".encode())
    assert conn.take() == f"s OK\ng OK planned {FUTURE}\n".encode()


def test_set_extra_args_ignored() -> None:
    """Extra tokens after a datetime are ignored."""
    h = make_harness()
    _, out = one(h, b"r SET j 2030-01-02 03:04:05 extra stuff\n")
    assert out == b"r OK\n"


# -- GET / QUERY / REMOVE ---------------------------------------------------------------


def test_get_exact_bytes() -> None:
    """GET answers ``ID OK <status> <ns>``; unknown or missing job is ``ID ERROR``."""
    h = make_harness()
    conn = h.connect()
    conn.send(b"a SET j -42\n")
    conn.take()
    h.scheduler.stop(0)  # keep j planned
    conn.send(b"g1 GET j\ng2 GET nope\ng3 GET\ng4 GET j extra\n")
    assert conn.take() == b"g1 OK planned -42\ng2 ERROR\ng3 ERROR\ng4 OK planned -42\n"


def test_query_exact_bytes() -> None:
    """QUERY lists ``ID <job> <status> <ns>`` per match then ``ID OK``; none is just OK."""
    h = make_harness()
    conn = h.connect()
    conn.send(b"s SET app.1 10\ns SET db.1 20\ns SET app.2 30\n")
    conn.take()
    h.scheduler.stop(0)
    conn.send(b"q QUERY app.\n")
    assert conn.take() == b"q app.1 planned 10\nq app.2 planned 30\nq OK\n"
    conn.send(b"q QUERY zzz\n")
    assert conn.take() == b"q OK\n"
    conn.send(b"q QUERY\n")
    # in id order (the prefix index), not in the order the jobs were set
    assert conn.take() == (b"q app.1 planned 10\nq app.2 planned 30\nq db.1 planned 20\nq OK\n")
    conn.send(b'q QUERY ""\n')
    assert conn.take().count(b"\n") == 4


def test_query_shows_statuses() -> None:
    """QUERY shows each job's current status."""
    h = make_harness()
    conn = h.connect()
    conn.send(b"r RULE SET r ok shell true\n")
    past = EPOCH_NS - SECOND_NS
    conn.send(f"s SET ok.1 {past}\ns SET ok.2 {past}\ns SET none {past}\n".encode())
    h.clock.advance(0)
    h.runner.complete("ok.2")
    conn.take()
    conn.send(b"q QUERY\n")
    assert (
        conn.take()
        == (
            f"q none failed {past}\nq ok.1 triggered {past}\nq ok.2 executed {past}\nq OK\n"
        ).encode()
    )


def test_remove_exact_bytes() -> None:
    """REMOVE answers OK and persists a removal; unknown or missing job is ERROR."""
    h = make_harness()
    conn = h.connect()
    conn.send(f"s SET j {FUTURE}\n".encode())
    conn.take()
    conn.send(b"r1 REMOVE j\nr2 REMOVE j\nr3 REMOVE\n")
    assert conn.take() == b"r1 OK\nr2 ERROR\nr3 ERROR\n"
    assert h.store.entries[-1] == JobRemoval("j")
    assert len(h.store.entries) == 2


# -- RULE SET / REMOVERULE / LISTRULES ------------------------------------------------------


LISTRULES_CASES = [
    ('RULE SET r1 backup. shell "echo  hi"', "r1 backup. shell echo  hi", ShellSpec("echo  hi")),
    ("RULE SET r2 app. direct /bin/echo a b", "r2 app. direct /bin/echo a b", None),
    (
        "RULE SET r3 wf. awf deploy --input env=prod --input v=2",
        "r3 wf. awf deploy --input env=prod --input v=2",
        AwfSpec("deploy", ("env=prod", "v=2")),
    ),
    (
        "RULE SET r4 hook. http POST https://example.com/hook",
        "r4 hook. http POST https://example.com/hook",
        HttpSpec("POST", "https://example.com/hook"),
    ),
    (
        "RULE SET r5 mq. amqp amqp://u:p@mq:5672/v ex rk",
        "r5 mq. amqp amqp://u:p@mq:5672/v ex rk",
        AmqpSpec("amqp://u:p@mq:5672/v", "ex", "rk"),
    ),
    (
        "RULE SET r6 rd. redis redis://:pw@127.0.0.1:6379/1 RPUSH queue",
        "r6 rd. redis redis://:pw@127.0.0.1:6379/1 RPUSH queue",
        RedisSpec("redis://:pw@127.0.0.1:6379/1", "RPUSH", "queue"),
    ),
]


def test_listrules_renders_all_six_runner_kinds() -> None:
    """LISTRULES renders each rule raw as ztick does, then ``ID OK``."""
    h = make_harness()
    conn = h.connect()
    for request, _, _ in LISTRULES_CASES:
        conn.send(b"s " + request.encode() + b"\n")
    assert conn.take() == b"s OK\n" * 6
    conn.send(b"l LISTRULES\n")
    expected = "".join(f"l {line}\n" for _, line, _ in LISTRULES_CASES) + "l OK\n"
    assert conn.take() == expected.encode()
    assert h.scheduler.rules.get("r2") == Rule("r2", "app.", DirectSpec("/bin/echo", ("a", "b")))
    for (_, _, spec), stored in zip(LISTRULES_CASES, h.scheduler.list_rules(), strict=True):
        if spec is not None:
            assert stored.runner == spec


def test_listrules_empty_and_extra_args() -> None:
    """LISTRULES with no rules is just ``ID OK``; extra arguments are ignored."""
    h = make_harness()
    _, out = one(h, b"l LISTRULES\nm LISTRULES extra args\n")
    assert out == b"l OK\nm OK\n"


def test_rule_set_persists_and_replaces() -> None:
    """RULE SET persists the rule; setting the same id replaces it."""
    h = make_harness()
    _, out = one(h, b"a RULE SET r p shell one\nb RULE SET r q shell two\nl LISTRULES\n")
    assert out == b"a OK\nb OK\nl r q shell two\nl OK\n"
    assert h.store.entries == [
        Rule("r", "p", ShellSpec("one")),
        Rule("r", "q", ShellSpec("two")),
    ]


def test_rule_set_empty_pattern_quoted() -> None:
    """An empty quoted pattern is accepted and matches every job."""
    h = make_harness()
    _, out = one(h, b'a RULE SET all "" shell true\n')
    assert out == b"a OK\n"
    assert h.scheduler.rules.match("anything") == Rule("all", "", ShellSpec("true"))


@pytest.mark.parametrize(
    "args",
    [
        "r p",
        "r p shell",
        "r p bash x",
        "r p SHELL x",
        "r p direct",
        "r p http GET",
        "r p http get http://h/",
        "r p http PATCH http://h/",
        "r p http GET ftp://h/",
        "r p http GET http://",
        "r p http GET http://[::1",
        "r p awf",
        "r p awf wf --input",
        "r p awf wf --input novalue",
        "r p awf wf --other a=1",
        "r p amqp amqp://h ex",
        "r p amqp http://h ex rk",
        "r p amqp amqp:// ex rk",
        "r p amqp amqp://h:port ex rk",
        "r p redis redis://h PUBLISH",
        "r p redis rediss://h PUBLISH k",
        "r p redis redis://h GET k",
        "r p redis http://h PUBLISH k",
        "r p redis redis://h/x PUBLISH k",
    ],
)
def test_rule_set_invalid_runner_args(args: str) -> None:
    """Invalid runner arguments answer ``ID ERROR``; nothing is stored or persisted."""
    h = make_harness()
    conn, out = one(h, f"e RULE SET {args}\n".encode())
    assert out == b"e ERROR\n"
    assert len(h.scheduler.rules) == 0
    assert h.store.entries == []
    assert not conn.closed


def test_rule_without_set_is_silent() -> None:
    """``RULE`` not followed by ``SET`` is not an instruction: no answer."""
    h = make_harness()
    _, out = one(h, b"a RULE\nb RULE GET r\nc RULE set r p shell x\nd STAT x\n")
    assert out.startswith(b"d uptime_ns ")
    assert b"a " not in out and b"b " not in out and b"c " not in out


def test_removerule_exact_bytes() -> None:
    """REMOVERULE answers OK and persists; unknown or missing rule is ERROR."""
    h = make_harness()
    _, out = one(
        h, b"a RULE SET r p shell x\nb REMOVERULE r\nc REMOVERULE r\nd REMOVERULE\nl LISTRULES\n"
    )
    assert out == b"a OK\nb OK\nc ERROR\nd ERROR\nl OK\n"
    assert h.store.entries[-1] == RuleRemoval("r")


# -- STAT -----------------------------------------------------------------------------------


def stat(conn: Conn, request_id: str = "s") -> dict[str, str]:
    """Send STAT and return the answered key/value pairs (checking order and framing)."""
    conn.send(f"{request_id} STAT\n".encode())
    lines = conn.take().decode().split("\n")
    assert lines[-1] == ""
    assert lines[-2] == f"{request_id} OK"
    pairs = [line.split(" ") for line in lines[:-2]]
    assert all(len(p) == 3 and p[0] == request_id for p in pairs)
    assert [p[1] for p in pairs] == STAT_KEYS
    return {p[1]: p[2] for p in pairs}


def test_stat_keys_order_and_values() -> None:
    """STAT gives exactly SPEC's keys in order, the lag keys, SPEC §9's, then ``ID OK``."""
    h = make_harness(max_concurrent=1)
    conn = h.connect()
    other = h.connect()
    h.clock.advance(5)
    past = EPOCH_NS - SECOND_NS
    conn.send(b"r RULE SET r job shell true\n")
    conn.send(f"a SET job.1 {past}\nb SET job.2 {past}\nc SET none {past}\n".encode())
    conn.send(f"d SET later {FUTURE}\ne SET job.3 {past}\n".encode())
    h.clock.advance(0)  # job.1 runs, job.2 and job.3 wait, none fails
    h.clock.advance(2)
    h.runner.complete("job.1")  # job.2 starts 2 s late
    conn.take()
    values = stat(conn)
    assert values == {
        "uptime_ns": str(7 * SECOND_NS),
        "connections": "2",
        "jobs_total": "5",
        "jobs_planned": "1",
        "jobs_triggered": "2",
        "jobs_executed": "1",
        "jobs_failed": "1",
        "rules_total": "1",
        "executions_pending": "1",
        "executions_inflight": "1",
        "persistence": "memory",
        "compression": "idle",
        "auth_enabled": "0",
        "tls_enabled": "0",
        "framerate": "512",
        "trigger_lag_p50_us": values["trigger_lag_p50_us"],
        "trigger_lag_p99_us": values["trigger_lag_p99_us"],
        "trigger_lag_max_us": values["trigger_lag_max_us"],
        "jobs_paused": "0",
        "schedules_total": "0",
        "occurrences_missed": "0",
        "runs_retried": "0",
        "runs_timed_out": "0",
    }
    assert int(values["trigger_lag_p50_us"]) <= 1
    assert abs(int(values["trigger_lag_max_us"]) - 2_000_000) <= 2
    h.disconnect(other)
    assert stat(conn)["connections"] == "1"


def test_stat_factory_options() -> None:
    """STAT reflects the factory's persistence, compression, auth, TLS and framerate."""
    h = make_harness()
    factory = ZtickFactory(
        h.scheduler,
        h.clock,
        persistence="logfile",
        framerate=60,
        compression=lambda: "running",
        tokens=TokenStore([(Token("t", "*"), "secret")]),
        tls_enabled=True,
    )
    proto = factory.buildProtocol(None)
    assert isinstance(proto, ZtickProtocol)
    transport = StringTransportWithDisconnection()
    transport.protocol = proto
    proto.makeConnection(transport)
    proto.dataReceived(b"AUTH secret\n")
    assert transport.value() == b"OK\n"
    transport.clear()
    values = stat(Conn(proto, transport), "x")
    assert values["persistence"] == "logfile"
    assert values["compression"] == "running"
    assert values["auth_enabled"] == "1"
    assert values["tls_enabled"] == "1"
    assert values["framerate"] == "60"
    assert values["uptime_ns"] == "0"
    transport.loseConnection()
    assert factory.connections == 0


def test_stat_extra_args_ignored() -> None:
    """Extra arguments to STAT are ignored."""
    h = make_harness()
    conn = h.connect()
    conn.send(b"s STAT all the things\n")
    assert conn.take().endswith(b"s OK\n")


# -- silence and framing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"   ",
        b"\r",
        b"onlyid",
        b"r1 UNKNOWN x",
        b"r1 set j 1",
        b"r1 get j",
        b"r1 stat",
        b"r1 \xff\xfe GET",
        b"\xffr1 GET j",
        b'r1 NOPE "unterminated',
        b'"unterminated',
        b"r1\tSTAT",
        b"AUTH secret",
    ],
)
def test_malformed_or_unknown_lines_are_silent(line: bytes) -> None:
    """Lines with fewer than two tokens or an unknown instruction get no answer."""
    h = make_harness()
    conn, out = one(h, line + b"\nz GET nope\n")
    assert out == b"z ERROR\n"
    assert not conn.closed


def test_auth_secret_never_reaches_the_log() -> None:
    """With auth off, ``AUTH <secret>`` is an unknown line; the secret is not logged."""
    h = make_harness()
    with capturedLogs() as events:
        one(h, b"AUTH hunter2-secret\n")
    assert events, "the ignored line is still logged"
    assert not any("hunter2" in repr(event) for event in events)


@pytest.mark.parametrize(
    "line",
    [b"r1 SET j\xff 5", b"r1 SET \xe9t\xe9 5", b"r1 GET caf\xe9", b'r1 RULE SET r "\xff" shell x'],
)
def test_invalid_utf8_in_known_instruction_answers_error(line: bytes) -> None:
    """Invalid UTF-8 after a known instruction answers ``ID ERROR`` and stores nothing."""
    h = make_harness()
    conn, out = one(h, line + b"\n")
    assert out == b"r1 ERROR\n"
    assert len(h.scheduler.jobs) == 0
    assert len(h.scheduler.rules) == 0
    assert not conn.closed


def test_crlf_is_tolerated() -> None:
    r"""A trailing ``\r`` is stripped, so ``ID STAT\r\n`` and ``ID GET job\r\n`` work."""
    h = make_harness()
    conn = h.connect()
    conn.send(f"a SET job {FUTURE}\r\nb GET job\r\n".encode())
    assert conn.take() == f"a OK\nb OK planned {FUTURE}\n".encode()
    assert "job" in h.scheduler.jobs


def test_request_id_echoed_unescaped() -> None:
    """The request id is echoed as parsed: a quoted id with spaces keeps its spaces."""
    h = make_harness()
    _, out = one(h, b'"my id" GET nope\n"q\\"x" LISTRULES\n')
    assert out == b'my id ERROR\nq"x OK\n'


def test_tabs_are_token_characters() -> None:
    """A tab is part of a token, so a job id may contain a tab."""
    h = make_harness()
    conn = h.connect()
    conn.send(f"a SET j\tk {FUTURE}\nb GET j\tk\nc GET j\n".encode())
    assert conn.take() == f"a OK\nb OK planned {FUTURE}\nc ERROR\n".encode()


def test_pipelined_requests_answered_in_order_in_one_write() -> None:
    """Many requests in one chunk are answered in request order with a single write."""
    h = make_harness()
    conn = h.connect()
    before = conn.writes()
    conn.send(
        f"1 SET a {FUTURE}\n2 GET a\n3 GET b\n4 junk\n5 REMOVE a\n6 GET a\n7 LISTRULES\n".encode()
    )
    assert conn.take() == f"1 OK\n2 OK planned {FUTURE}\n3 ERROR\n5 OK\n6 ERROR\n7 OK\n".encode()
    assert conn.writes() == before + 1


def test_lines_split_across_chunks() -> None:
    """Requests split at any byte boundary are reassembled; a partial line waits."""
    h = make_harness()
    conn = h.connect()
    data = f"a SET job {FUTURE}\nb GET job\n".encode()
    for i in range(len(data)):
        conn.send(data[i : i + 1])
    assert conn.take() == f"a OK\nb OK planned {FUTURE}\n".encode()
    conn.send(b"c GET jo")
    assert conn.take() == b""
    conn.send(b"b\nd GET nope")
    assert conn.take() == f"c OK planned {FUTURE}\n".encode()
    conn.send(b"\n")
    assert conn.take() == b"d ERROR\n"


def test_no_write_for_silent_chunk() -> None:
    """A chunk with nothing to answer writes nothing."""
    h = make_harness()
    conn = h.connect()
    before = conn.writes()
    conn.send(b"junk\n\nx NOPE\n")
    assert conn.writes() == before
    assert conn.take() == b""


# -- answers held for the disk -----------------------------------------------------------------


def test_pending_commit_holds_later_answers_on_that_connection_only() -> None:
    """An answer waiting for its Commit holds back later ones (even GET), not other conns."""
    h = make_harness(hold=True)
    first = h.connect()
    second = h.connect()
    first.send(f"a SET job {FUTURE}\nb GET job\nc GET nope\n".encode())
    assert first.take() == b""
    second.send(b"x GET job\ny STAT\n")
    out = second.take()
    assert out.startswith(f"x OK planned {FUTURE}\ny uptime_ns ".encode())
    h.store.resolve()
    assert first.take() == f"a OK\nb OK planned {FUTURE}\nc ERROR\n".encode()
    first.send(b"d GET job\n")
    assert first.take() == f"d OK planned {FUTURE}\n".encode()


def test_answers_before_a_pending_commit_are_written() -> None:
    """Answers ready before a pending request are written at once."""
    h = make_harness(hold=True)
    conn = h.connect()
    conn.send(f"a GET job\nb SET job {FUTURE}\nc GET job\n".encode())
    assert conn.take() == b"a ERROR\n"
    h.store.resolve()
    assert conn.take() == f"b OK\nc OK planned {FUTURE}\n".encode()


def test_failed_commit_turns_ok_into_error() -> None:
    """When a Commit fails, its request answers ``ID ERROR``; later answers are unchanged."""
    h = make_harness(hold=True)
    conn = h.connect()
    conn.send(f"a SET job {FUTURE}\nb GET job\nc REMOVE job\n".encode())
    assert conn.take() == b""
    h.store.resolve(0, StoreError("disk full"))
    assert conn.take() == f"a ERROR\nb OK planned {FUTURE}\n".encode()
    h.store.resolve(1)
    assert conn.take() == b"c OK\n"


def test_commits_resolving_out_of_order_keep_answer_order() -> None:
    """A later Commit resolving first does not let its answer jump ahead."""
    h = make_harness(hold=True)
    conn = h.connect()
    conn.send(f"a SET j1 {FUTURE}\nb SET j2 {FUTURE}\nc RULE SET r p shell x\n".encode())
    h.store.resolve(2)
    h.store.resolve(1, StoreError("x"))
    assert conn.take() == b""
    h.store.resolve(0)
    assert conn.take() == b"a OK\nb ERROR\nc OK\n"


def test_group_commit_shared_by_several_requests() -> None:
    """Requests sharing one group Commit are all answered when it resolves, in order."""
    h = make_harness(hold=True, group=True)
    conn = h.connect()
    conn.send(f"a SET j1 {FUTURE}\nb GET j1\nc SET j2 {FUTURE}\n".encode())
    assert len(h.store.commits) == 1
    assert conn.take() == b""
    h.store.resolve()
    assert conn.take() == f"a OK\nb OK planned {FUTURE}\nc OK\n".encode()


def test_commit_pending_across_chunks() -> None:
    """Answers to later chunks also wait behind an earlier pending Commit."""
    h = make_harness(hold=True)
    conn = h.connect()
    conn.send(f"a SET j {FUTURE}\n".encode())
    conn.send(b"b GET j\n")
    conn.send(b"c LISTRULES\n")
    assert conn.take() == b""
    h.store.resolve()
    assert conn.take() == f"a OK\nb OK planned {FUTURE}\nc OK\n".encode()


def test_commit_resolving_after_disconnect_is_harmless() -> None:
    """A Commit that resolves after its connection closed writes nothing and raises nothing."""
    h = make_harness(hold=True)
    conn = h.connect()
    conn.send(f"a SET j {FUTURE}\n".encode())
    h.disconnect(conn)
    h.store.resolve()
    assert conn.take() == b""
    assert h.factory.connections == 0


def test_already_resolved_commit_answers_at_once() -> None:
    """A Commit resolved before the reply is queued does not hold anything."""
    h = make_harness(hold=True, group=True)
    conn = h.connect()
    conn.send(f"a SET j1 {FUTURE}\n".encode())
    h.store.resolve()
    conn.take()
    h.store.cut()
    h.store.hold = False
    conn.send(f"b SET j2 {FUTURE}\nc GET j2\n".encode())
    assert conn.take() == f"b OK\nc OK planned {FUTURE}\n".encode()


# -- line length -------------------------------------------------------------------------------


def test_line_of_exactly_max_bytes_is_accepted() -> None:
    """A line of exactly 4096 bytes (without its newline) is handled."""
    h = make_harness()
    conn = h.connect()
    prefix = b"q QUERY "
    line = prefix + b"x" * (MAX_LINE_BYTES - len(prefix))
    assert len(line) == MAX_LINE_BYTES
    conn.send(line + b"\n")
    assert conn.take() == b"q OK\n"
    assert not conn.closed


def test_long_line_closes_connection_after_earlier_answers() -> None:
    """A line over 4096 bytes: earlier answers are written, then only that conn closes."""
    h = make_harness()
    conn = h.connect()
    other = h.connect()
    long_line = b"q QUERY " + b"x" * MAX_LINE_BYTES
    conn.send(f"a SET j {FUTURE}\n".encode() + long_line + b"\nb GET j\n")
    assert conn.take() == b"a OK\n"
    assert conn.closed
    conn.send(b"c GET j\n")
    assert conn.take() == b""
    other.send(b"d GET j\n")
    assert other.take() == f"d OK planned {FUTURE}\n".encode()
    assert not other.closed


def test_long_partial_line_closes_without_waiting_for_newline() -> None:
    """A partial line already over 4096 bytes closes the connection (bounded memory)."""
    h = make_harness()
    conn = h.connect()
    conn.send(b"a GET j\n" + b"y" * 3000)
    assert conn.take() == b"a ERROR\n"
    assert not conn.closed
    conn.send(b"y" * 1200)
    assert conn.closed
    assert conn.transport.producerState == "paused"
    assert len(conn.proto._buffer) == 0


def test_long_line_with_pending_commit_closes_after_resolution() -> None:
    """With an answer waiting for the disk, a long line closes once it is written."""
    h = make_harness(hold=True)
    conn = h.connect()
    conn.send(f"a SET j {FUTURE}\n".encode() + b"z" * (MAX_LINE_BYTES + 1) + b"\n")
    assert conn.take() == b""
    assert not conn.closed
    h.store.resolve()
    assert conn.take() == b"a OK\n"
    assert conn.closed


# -- half-close and disconnect ------------------------------------------------------------------


def test_half_close_answers_then_closes() -> None:
    """After the client half-closes, pending lines are answered, then the conn closes."""
    h = make_harness()
    conn = h.connect()
    conn.send(f"a SET j {FUTURE}\nb GET j\n".encode())
    conn.proto.readConnectionLost()
    assert conn.take() == f"a OK\nb OK planned {FUTURE}\n".encode()
    assert conn.closed


def test_set_refuses_a_job_id_with_a_nul_byte() -> None:
    """``SET`` of an id holding NUL answers ERROR and logs why; nothing is stored."""
    h = make_harness()
    conn = h.connect()
    with capturedLogs() as events:
        conn.send(f"s SET a\x00b {FUTURE}\n".encode())  # a raw NUL byte in the id
    assert conn.take() == b"s ERROR\n"
    assert h.store.entries == []
    assert any("NUL byte" in str(e.get("reason")) for e in events)


def test_half_close_drops_unterminated_last_line() -> None:
    """A last line with no newline before the half-close is never run (it may be cut short).

    ``SET j 17433036`` cut from a longer timestamp would otherwise plan the job for
    1970 and fire it at once.  The line is dropped and logged; the connection closes.
    """
    h = make_harness()
    conn = h.connect()
    conn.send(f"a SET keep {FUTURE}\nb SET cut 1".encode())
    assert conn.take() == b"a OK\n"
    with capturedLogs() as events:
        conn.proto.readConnectionLost()
    assert conn.take() == b""
    assert conn.closed
    assert h.scheduler.get_job("cut") is None
    assert h.store.entries == [Job("keep", FUTURE)]
    dropped = [e for e in events if "unterminated last line" in e["log_format"]]
    assert len(dropped) == 1 and dropped[0]["size"] == len(b"b SET cut 1")


def test_half_close_runs_every_whole_line_held_back() -> None:
    """Whole lines still buffered at the half-close (behind a long answer) all run."""
    h = make_harness()
    conn = h.connect()
    for i in range(3000):
        h.scheduler.set_job(f"bulk.{i:05d}", FUTURE)
    conn.send(f"q QUERY bulk.\na SET after {FUTURE}\nb GET after\nc SET cut 1".encode())
    conn.proto.readConnectionLost()
    for _ in range(100):
        h.clock.advance(0)
    out = conn.take()
    assert out.endswith(f"q OK\na OK\nb OK planned {FUTURE}\n".encode())
    assert out.count(b"\n") == 3000 + 3  # the jobs, q OK, a OK, b OK
    assert conn.closed
    assert h.scheduler.get_job("cut") is None


def test_half_close_waits_for_pending_commit() -> None:
    """Half-close with an answer waiting for the disk closes only after it is written."""
    h = make_harness(hold=True)
    conn = h.connect()
    conn.send(f"a SET j {FUTURE}\nb GET j\n".encode())
    conn.proto.readConnectionLost()
    assert not conn.closed
    assert conn.take() == b""
    h.store.resolve()
    assert conn.take() == f"a OK\nb OK planned {FUTURE}\n".encode()
    assert conn.closed


def test_half_close_of_idle_connection_closes() -> None:
    """Half-close with nothing sent just closes."""
    h = make_harness()
    conn = h.connect()
    conn.proto.readConnectionLost()
    assert conn.closed
    assert conn.take() == b""


def test_write_connection_lost_closes() -> None:
    """When the client stops reading, the server closes the connection."""
    h = make_harness()
    conn = h.connect()
    conn.proto.writeConnectionLost()
    assert conn.closed
    conn.send(b"a LISTRULES\n")
    assert conn.take() == b""


def test_connection_count() -> None:
    """The factory counts live connections; a second connectionLost does not double-count."""
    h = make_harness()
    a = h.connect()
    b = h.connect()
    assert h.factory.connections == 2
    h.disconnect(a)
    h.disconnect(a)
    assert h.factory.connections == 1
    h.disconnect(b)
    assert h.factory.connections == 0


# -- real sockets ------------------------------------------------------------------------------


class _Collect(Protocol):
    """Sends ``payload``, half-closes, and fires ``done`` with everything received."""

    def __init__(self, payload: bytes, done: Deferred[bytes]) -> None:
        self.payload = payload
        self.done = done
        self.received: list[bytes] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.payload)
        self.transport.loseWriteConnection()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(b"".join(self.received))


class _CollectFactory(ClientFactory):
    def __init__(self, payload: bytes, done: Deferred[bytes]) -> None:
        self.payload = payload
        self.done = done

    def buildProtocol(self, addr: object) -> Protocol:
        return _Collect(self.payload, self.done)


class RealSocketTests(unittest.TestCase):
    """The protocol over real TCP on 127.0.0.1, as ``echo ... | socat`` uses it."""

    def setUp(self) -> None:
        self.store = FakeStore()
        self.scheduler = Scheduler(REACTOR_TIME, self.store, {})
        self.scheduler.start()
        self.factory = ZtickFactory(self.scheduler, REACTOR_TIME, persistence="memory")
        self.port = REACTOR_TCP.listenTCP(0, self.factory, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self.scheduler.stop, 0)

    def _exchange(self, payload: bytes) -> Deferred[bytes]:
        done: Deferred[bytes] = Deferred()
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        REACTOR_TCP.connectTCP("127.0.0.1", address.port, _CollectFactory(payload, done))
        return done

    def test_half_closed_client_gets_all_answers(self) -> Deferred[None]:
        """A client that sends and half-closes gets every answer, in order, then EOF.

        Its unterminated last line (``e GET j``) is dropped, not run.
        """
        ns = 4102444800 * SECOND_NS  # 2100-01-01, never due during the test
        payload = f"a SET j {ns}\nb GET j\njunk\nc QUERY\nd REMOVE j\ne GET j".encode()

        def check(data: bytes) -> None:
            assert data == (f"a OK\nb OK planned {ns}\nc j planned {ns}\nc OK\nd OK\n".encode())
            assert self.store.entries == [Job("j", ns), JobRemoval("j")]

        return self._exchange(payload).addCallback(check)

    def test_long_line_drops_only_that_client(self) -> Deferred[None]:
        """A client sending an over-long line is dropped; another client is still served."""
        bad = b"a LISTRULES\n" + b"x" * (MAX_LINE_BYTES * 4) + b"\nb LISTRULES\n"

        def check_bad(data: bytes) -> Deferred[bytes]:
            assert data == b"a OK\n"
            return self._exchange(b"c LISTRULES\n")

        def check_good(data: bytes) -> None:
            assert data == b"c OK\n"
            assert self.factory.connections == 0

        return self._exchange(bad).addCallback(check_bad).addCallback(check_good)


# -- chunking invariance ---------------------------------------------------------------------

_REQUESTS = [
    f"a SET j1 {FUTURE}",
    f"b SET j2 {FUTURE}",
    "c GET j1",
    "d GET nope",
    "e QUERY j",
    "f REMOVE j2",
    "g REMOVE j2",
    'h RULE SET r "" shell "echo hi"',
    "i LISTRULES",
    "junk",
    "",
    "k SET j3 garbage",
    'l GET "j1"',
    "m REMOVERULE r",
]


@given(
    st.lists(st.sampled_from(_REQUESTS), min_size=1, max_size=12),
    st.lists(st.integers(min_value=1, max_value=40), max_size=30),
    st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_answers_do_not_depend_on_chunking(lines: list[str], cuts: list[int], crlf: bool) -> None:
    """However the bytes are split into chunks, the answers are the same bytes."""
    payload = "".join(line + ("\r\n" if crlf else "\n") for line in lines).encode()
    whole = make_harness().connect()
    whole.send(payload)
    expected = whole.take()
    chunked = make_harness().connect()
    pos = 0
    for cut in cuts:
        chunked.send(payload[pos : pos + cut])
        pos += cut
    chunked.send(payload[pos:])
    assert chunked.take() == expected
    assert expected.count(b"\n") >= sum(1 for line in lines if line and line[0] in "abcdefghilm")


def test_request_ids_are_escaped_and_bounded_in_the_log() -> None:
    """A request id with control characters is logged escaped and cut to a bounded length."""
    h = make_harness()
    with capturedLogs() as events:
        one(h, b"\x1b[31mred" + b"x" * 500 + b" GET nope\n")
    texts = [str(e.get("request_id")) for e in events if "request_id" in e]
    assert texts, "the refused GET is logged with its request id"
    assert all("\x1b" not in t and len(t) <= 83 for t in texts)
    assert texts[0].startswith("\\x1b[31mred")
