"""The redis runner: its RESP2 parser, its connection logic on a fake clock, and real redis.

Real-server tests use the ``redis_server`` (shared, no password) and
``fresh_redis_server`` (owned by the test) fixtures of ``tests/redis_server.py``.
Time is faked (``MemoryReactorClock``) only where the test is about timing: back-off
windows, timeouts and shutdown grace.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable

import pytest
from twisted.internet import error as neterror
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests import redis_server as redis_server_module
from tests.redis_server import RedisReplyError, RedisServer, require_redis
from ztick_tw.model import RedisSpec, ShellSpec
from ztick_tw.runners.backoff import BACKOFF_MAX
from ztick_tw.runners.base import Execution, IRunner, Outcome
from ztick_tw.runners.message import NetworkOptions, rich_body
from ztick_tw.runners.redis import BACKOFF_START, RedisRunner
from ztick_tw.runners.resp import (
    RedisClientProtocol,
    RedisEndpoint,
    RedisError,
    Reply,
    RespParser,
    RespProtocolError,
    encode_command,
    parse_redis_url,
)

DUE_NS = 1_700_000_000_123_456_789
FAKE_URL = "redis://127.0.0.1:6379"


def _brief(outcome: Outcome) -> Outcome:
    """``outcome`` without the details (output...): success, reason, interrupted."""
    return Outcome(outcome.success, outcome.reason, outcome.interrupted)


def _execution(
    spec: RedisSpec | ShellSpec,
    job_id: str = "job.1",
    attempt: int = 1,
    timeout: float | None = None,
) -> Execution:
    return Execution(job_id, DUE_NS, "rule.1", attempt, spec, fired_ns=DUE_NS + 5, timeout=timeout)


def _unique(prefix: str = "k") -> str:
    return f"{prefix}.{uuid.uuid4().hex[:12]}"


# ------------------------------------------------------------------------ RESP parser


def _plain(replies: list[Reply]) -> list[object]:
    """Replies with error values turned into comparable ``("error", text)`` tuples."""

    def convert(value: Reply) -> object:
        if isinstance(value, RedisError):
            return ("error", value.message)
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return [convert(r) for r in replies]


STREAM = (
    b"+OK\r\n"
    b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    b":42\r\n"
    b":-7\r\n"
    b"$5\r\nhello\r\n"
    b"$-1\r\n"
    b"$0\r\n\r\n"
    b"$4\r\na\r\nb\r\n"
    b"*-1\r\n"
    b"*0\r\n"
    b"*3\r\n:1\r\n*2\r\n$1\r\nx\r\n*1\r\n+deep\r\n$-1\r\n"
    b"*2\r\n*0\r\n-ERR inner\r\n"
    b"+\xc3\xa9t\xc3\xa9\r\n"
)
EXPECTED: list[object] = [
    "OK",
    ("error", "WRONGTYPE Operation against a key holding the wrong kind of value"),
    42,
    -7,
    b"hello",
    None,
    b"",
    b"a\r\nb",
    None,
    [],
    [1, [b"x", ["deep"]], None],
    [[], ("error", "ERR inner")],
    "été",
]


def test_parser_whole_stream() -> None:
    """Every RESP2 type parses, nested arrays, null bulk/array and binary bulk included."""
    parser = RespParser()
    assert _plain(parser.feed(STREAM)) == EXPECTED
    assert parser.pending == 0


def test_parser_split_at_every_byte_boundary() -> None:
    """Split into two chunks at any offset, the stream gives the same replies."""
    for cut in range(len(STREAM) + 1):
        parser = RespParser()
        got = parser.feed(STREAM[:cut]) + parser.feed(STREAM[cut:])
        assert _plain(got) == EXPECTED, cut


def test_parser_one_byte_at_a_time() -> None:
    """Fed byte by byte, the parser yields each reply exactly when its last byte comes."""
    parser = RespParser()
    got: list[Reply] = []
    for i in range(len(STREAM)):
        got += parser.feed(STREAM[i : i + 1])
    assert _plain(got) == EXPECTED


def test_parser_three_way_splits() -> None:
    """Every split into three chunks (around the nested array) gives the same replies."""
    start = STREAM.index(b"*3\r\n")
    end = STREAM.index(b"*2\r\n*0")
    for a in range(start, end + 1):
        for b in range(a, end + 1):
            parser = RespParser()
            got = parser.feed(STREAM[:a]) + parser.feed(STREAM[a:b]) + parser.feed(STREAM[b:])
            assert _plain(got) == EXPECTED, (a, b)


def test_parser_keeps_incomplete_data() -> None:
    """An incomplete bulk string yields nothing and waits for the rest."""
    parser = RespParser()
    assert parser.feed(b"$10\r\n01234") == []
    assert parser.pending == len(b"$10\r\n01234")
    assert parser.feed(b"56789\r\n:1") == [b"0123456789"]
    assert parser.feed(b"\r\n") == [1]


@pytest.mark.parametrize(
    "data",
    [
        b"?what\r\n",
        b"HTTP/1.1 400 Bad Request\r\n",
        b":12x\r\n",
        b"$abc\r\n",
        b"$-2\r\n",
        b"*-3\r\n",
        b"$3\r\nabcXY",
        b":\r\n",
        b":--5\r\n",
        b":-\r\n",
        b"$+3\r\nabc\r\n",
    ],
)
def test_parser_rejects_garbage(data: bytes) -> None:
    """Bytes that are not RESP2 raise RespProtocolError."""
    with pytest.raises(RespProtocolError):
        RespParser().feed(data)


def test_parser_limits() -> None:
    """A line or a bulk string over the limits is a protocol error, not unbounded memory."""
    with pytest.raises(RespProtocolError):
        RespParser(max_line=16).feed(b"+" + b"x" * 32)
    with pytest.raises(RespProtocolError):
        RespParser(max_bulk=8).feed(b"$9\r\n")


def test_encode_command_round_trip() -> None:
    """A command is a RESP array of bulk strings; parsing it gives the arguments back."""
    args = (b"RPUSH", b"queue key", b"job \r\n\x00 \xff")
    data = encode_command(*args)
    assert data.startswith(b"*3\r\n$5\r\nRPUSH\r\n$9\r\nqueue key\r\n")
    assert RespParser().feed(data) == [list(args)]


# ------------------------------------------------------------------------ the fixture


def test_require_redis_skips_or_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without redis-server the tests skip, naming the package; with CI=true they fail."""
    monkeypatch.setattr(redis_server_module, "REDIS_SERVER", "/nonexistent/redis-server")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install redis-server"):
        require_redis()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install redis-server"):
        require_redis()


def test_fixture_server_restart_keeps_port_and_users(
    fresh_redis_server: Callable[..., RedisServer],
) -> None:
    """restart() reuses the port and recreates ACL users; stop() leaves no process behind."""
    server = fresh_redis_server(password="pw")
    server.add_user("bob", "b0b")
    port, pid, directory = server.port, server.pid, server.directory
    with server.client() as client:
        assert client.command("ACL", "WHOAMI") == b"default"
    server.restart()
    assert server.port == port and server.pid != pid
    assert directory is not None and not os.path.exists(directory)
    with server.client("bob", "b0b") as client:
        assert client.command("ACL", "WHOAMI") == b"bob"
    with pytest.raises(RedisReplyError, match="WRONGPASS"):
        server.client("bob", "wrong")
    pid = server.pid
    server.stop()
    assert not os.path.exists(f"/proc/{pid}")
    assert not server.running


# ------------------------------------------------------------------------ URL parsing


def test_parse_url_defaults_and_parts() -> None:
    """Host, port (6379 by default), percent-decoded user and password, and db."""
    assert parse_redis_url("redis://h") == RedisEndpoint("h", 6379)
    e = parse_redis_url("redis://us%40er:p%3Ass%20w@[::1]:7000/12")
    assert (e.host, e.port, e.username, e.password, e.db) == ("::1", 7000, "us@er", "p:ss w", 12)
    assert e.label == "[::1]:7000/12"
    assert "p:ss" not in repr(e)
    assert parse_redis_url("redis://:pw@h/").password == "pw"
    assert parse_redis_url("redis://:pw@h/").username is None


@pytest.mark.parametrize(
    "url", ["rediss://h", "http://h", "redis://", "redis://h:99999", "redis://h/x", "redis://[::1"]
)
def test_parse_url_rejects(url: str) -> None:
    """Other schemes, no host, a bad port or a non-numeric db are refused."""
    with pytest.raises(ValueError):
        parse_redis_url(url)


def test_handshake_commands() -> None:
    """AUTH pass / AUTH user pass / AUTH user "" and SELECT db, in that order."""
    assert parse_redis_url("redis://h").handshake() == []
    assert parse_redis_url("redis://:pw@h/3").handshake() == [
        ("auth", encode_command(b"AUTH", b"pw")),
        ("select", encode_command(b"SELECT", b"3")),
    ]
    assert parse_redis_url("redis://u:pw@h").handshake() == [
        ("auth", encode_command(b"AUTH", b"u", b"pw"))
    ]
    assert parse_redis_url("redis://u@h/0").handshake() == [
        ("auth", encode_command(b"AUTH", b"u", b"")),
        ("select", encode_command(b"SELECT", b"0")),
    ]


# ------------------------------------------------------------ connection logic, fake clock


class _Wire:
    """A ``StringTransportWithDisconnection`` connected to ``protocol``, typed."""

    def __init__(self, protocol: Protocol) -> None:
        self.transport = StringTransportWithDisconnection()  # type: ignore[no-untyped-call]
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)  # type: ignore[no-untyped-call]

    @property
    def connected(self) -> bool:
        """Whether the runner has not closed it."""
        return bool(self.transport.connected)

    def value(self) -> bytes:
        """Everything the runner wrote since the last ``clear``."""
        data: bytes = self.transport.value()  # type: ignore[no-untyped-call]
        return data

    def clear(self) -> None:
        """Forget what was written so far."""
        self.transport.clear()  # type: ignore[no-untyped-call]

    def loseConnection(self) -> None:
        """The server closes the connection."""
        self.transport.loseConnection()  # type: ignore[no-untyped-call]


class FakeReactorTests(unittest.SynchronousTestCase):
    """The runner against ``MemoryReactorClock``: connections are driven by hand."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()  # type: ignore[no-untyped-call]
        self.runner = RedisRunner(self.reactor, NetworkOptions(timeout=2.0))

    def job(
        self,
        job_id: str = "job.1",
        url: str = FAKE_URL,
        key: str = "q",
        timeout: float | None = None,
    ) -> Deferred[Outcome]:
        return self.runner.run(_execution(RedisSpec(url, "RPUSH", key), job_id, timeout=timeout))

    def connect(self, index: int = -1) -> tuple[Protocol, _Wire]:
        host, port, factory, _, _ = self.reactor.tcpClients[index]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert isinstance(protocol, Protocol)
        wire = _Wire(protocol)
        return protocol, wire

    def refuse(self, index: int = -1) -> None:
        factory = self.reactor.tcpClients[index][2]
        refused = Failure(neterror.ConnectionRefusedError())  # type: ignore[no-untyped-call]
        factory.clientConnectionFailed(self.reactor.connectors[index], refused)

    def outcome(self, d: Deferred[Outcome]) -> Outcome:
        result = self.successResultOf(d)
        assert isinstance(result, Outcome)
        return result

    def test_provides_irunner(self) -> None:
        """RedisRunner provides IRunner and starts with nothing running."""
        assert verifyObject(IRunner, self.runner)
        assert self.runner.running == 0
        assert self.runner.connections == 0

    def test_backoff_window_doubles_caps_and_resets(self) -> None:
        """After failed connects jobs fail at once for 0.5 s, 1 s, 2 s ... 30 s; success resets."""
        d = self.job()
        assert len(self.reactor.tcpClients) == 1
        self.refuse()
        assert _brief(self.outcome(d)) == Outcome(
            False, "redis 127.0.0.1:6379: connection refused"
        )
        window = BACKOFF_START
        windows = []
        for _ in range(9):
            windows.append(window)
            attempts = len(self.reactor.tcpClients)
            self.reactor.advance(window - 0.01)
            fast = self.outcome(self.job())
            assert _brief(fast) == Outcome(
                False,
                "redis 127.0.0.1:6379: unavailable (last connect attempt: connection refused)",
            )
            assert len(self.reactor.tcpClients) == attempts  # no new connect in the window
            self.reactor.advance(0.01)
            d = self.job()
            assert len(self.reactor.tcpClients) == attempts + 1
            self.refuse()
            assert "connection refused" in self.outcome(d).reason
            window = min(window * 2, BACKOFF_MAX)
        assert windows == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
        # A connection that comes up resets the window to its start.
        self.reactor.advance(BACKOFF_MAX)
        d = self.job()
        protocol, transport = self.connect()
        protocol.dataReceived(b":1\r\n")
        assert _brief(self.outcome(d)) == Outcome(True)
        transport.loseConnection()
        d = self.job()
        self.refuse()
        self.outcome(d)
        self.reactor.advance(BACKOFF_START - 0.01)
        assert "unavailable" in self.outcome(self.job()).reason
        self.reactor.advance(0.01)
        self.job()
        self.refuse()  # the reconnect happened after exactly 0.5 s

    def test_connect_errors_are_named(self) -> None:
        """Connect failures become short reasons; the connect timeout is the job timeout."""
        errors: list[tuple[Exception, str]] = [
            (neterror.TimeoutError(), "connect timed out"),  # type: ignore[no-untyped-call]
            (neterror.DNSLookupError("h"), "cannot resolve host"),
            (neterror.NoRouteError(), "no route to host"),  # type: ignore[no-untyped-call]
            (
                neterror.ConnectError(osError="Network is unreachable."),  # type: ignore[no-untyped-call]
                "network is unreachable",
            ),
        ]
        for i, (error, why) in enumerate(errors):
            url = f"redis://127.0.0.1:{7000 + i}"
            d = self.job(url=url)
            assert self.reactor.tcpClients[-1][:2] == ("127.0.0.1", 7000 + i)
            assert self.reactor.tcpClients[-1][3] == 2.0
            factory = self.reactor.tcpClients[-1][2]
            failure = Failure(error)  # type: ignore[no-untyped-call]
            factory.clientConnectionFailed(self.reactor.connectors[-1], failure)
            assert _brief(self.outcome(d)) == Outcome(False, f"redis 127.0.0.1:{7000 + i}: {why}")

    def test_jobs_queue_while_connecting_then_pipeline(self) -> None:
        """Jobs wait for one connection and its AUTH/SELECT, then go out in one write, in order."""
        url = "redis://alice:s3cret@127.0.0.1:6379/2"
        ds = [self.job(f"job.{i}", url=url) for i in range(3)]
        assert len(self.reactor.tcpClients) == 1
        assert self.runner.running == 3
        protocol, transport = self.connect()
        assert transport.value() == encode_command(b"AUTH", b"alice", b"s3cret") + encode_command(
            b"SELECT", b"2"
        )
        transport.clear()
        protocol.dataReceived(b"+OK\r\n+")
        assert transport.value() == b""  # jobs wait until AUTH and SELECT are accepted
        protocol.dataReceived(b"OK\r\n")
        assert transport.value() == b"".join(
            encode_command(b"RPUSH", b"q", f"job.{i}".encode()) for i in range(3)
        )
        replies = b":1\r\n:2\r\n-WRONGTYPE wrong kind\r\n"
        for i in range(len(replies)):
            protocol.dataReceived(replies[i : i + 1])
        assert [self.outcome(d) for d in ds] == [
            Outcome(True, output=b":1"),
            Outcome(True, output=b":2"),
            Outcome(
                False,
                "redis 127.0.0.1:6379/2: RPUSH q: WRONGTYPE wrong kind",
                output=b"-WRONGTYPE wrong kind",
            ),
        ]
        assert self.runner.running == 0
        # The next job goes straight onto the open connection.
        transport.clear()
        d = self.job("job.9", url=url)
        assert transport.value() == encode_command(b"RPUSH", b"q", b"job.9")
        assert len(self.reactor.tcpClients) == 1
        protocol.dataReceived(b":4\r\n")
        assert self.outcome(d).success

    def test_auth_refused(self) -> None:
        """A refused AUTH fails the waiting jobs without the password, closes, backs off."""
        url = "redis://:hunter2@127.0.0.1:6379"
        ds = [self.job(f"job.{i}", url=url) for i in range(2)]
        protocol, transport = self.connect()
        protocol.dataReceived(
            b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
            b"-NOAUTH Authentication required.\r\n"
        )
        for d in ds:
            outcome = self.outcome(d)
            assert outcome.reason == (
                "redis 127.0.0.1:6379: auth refused:"
                " WRONGPASS invalid username-password pair or user is disabled."
            )
            assert "hunter2" not in outcome.reason
        assert not transport.connected
        assert self.runner.connections == 0
        fast = self.outcome(self.job(url=url))
        assert fast.reason.startswith(
            "redis 127.0.0.1:6379: unavailable (last connect attempt: auth refused: WRONGPASS"
        )
        assert len(self.reactor.tcpClients) == 1

    def test_select_refused(self) -> None:
        """A refused SELECT (db out of range) fails the jobs with ``select refused``."""
        d = self.job(url="redis://127.0.0.1:6379/99")
        protocol, _ = self.connect()
        protocol.dataReceived(b"-ERR DB index is out of range\r\n-ERR x\r\n")
        assert _brief(self.outcome(d)) == Outcome(
            False, "redis 127.0.0.1:6379/99: select refused: ERR DB index is out of range"
        )

    def test_timeout_while_connecting_fails_only_expired_jobs(self) -> None:
        """A job waiting for a slow connect fails at its own deadline; later ones go on."""
        d1 = self.job("job.1")
        self.reactor.advance(1)
        d2 = self.job("job.2")
        self.reactor.advance(1)
        assert _brief(self.outcome(d1)) == Outcome(
            False, "redis 127.0.0.1:6379: timed out after 2s connecting"
        )
        assert self.runner.running == 1
        protocol, transport = self.connect()
        assert transport.value() == encode_command(b"RPUSH", b"q", b"job.2")
        protocol.dataReceived(b":1\r\n")
        assert self.outcome(d2).success
        assert not self.job("job.3").called

    def test_reply_timeout_poisons_the_pipeline(self) -> None:
        """A late reply fails every job on the connection, drops it; the next job reconnects."""
        self.job("job.0")
        protocol, transport = self.connect()
        protocol.dataReceived(b":1\r\n")
        d1 = self.job("job.1")
        self.reactor.advance(1.5)
        d2 = self.job("job.2")
        self.reactor.advance(0.5)
        reason = "redis 127.0.0.1:6379: timed out after 2s waiting for a reply"
        assert self.outcome(d1) == Outcome(False, reason, timed_out=True)
        # job.2's own time was not up: it fails with the connection, not timed out.
        dropped = "redis 127.0.0.1:6379: connection dropped: no reply within 2s"
        assert self.outcome(d2) == Outcome(False, dropped)
        assert not transport.connected
        protocol.dataReceived(b":2\r\n:3\r\n")  # late replies are ignored
        self.job("job.3")
        assert len(self.reactor.tcpClients) == 2  # no back-off after a timeout
        assert self.reactor.getDelayedCalls()  # the new job's deadline is watched

    def test_own_timeout_while_connecting(self) -> None:
        """A job with a shorter timeout of its own fails alone while connecting; not sent."""
        slow = self.job("job.slow")
        quick = self.job("job.quick", timeout=0.5)
        self.reactor.advance(0.5)
        assert self.outcome(quick) == Outcome(
            False, "redis 127.0.0.1:6379: timed out after 0.5s connecting", timed_out=True
        )
        assert not slow.called
        protocol, transport = self.connect()
        assert transport.value() == encode_command(b"RPUSH", b"q", b"job.slow")
        protocol.dataReceived(b":1\r\n")
        assert self.outcome(slow) == Outcome(True, output=b":1")

    def test_own_timeout_on_a_later_job_drops_the_connection(self) -> None:
        """A later job's shorter timeout expiring first still drops the pipeline."""
        self.job("job.0")
        protocol, transport = self.connect()
        protocol.dataReceived(b":1\r\n")
        first = self.job("job.1")  # the default, 2 s
        later = self.job("job.2", timeout=0.5)
        self.reactor.advance(0.5)
        assert self.outcome(later) == Outcome(
            False, "redis 127.0.0.1:6379: timed out after 0.5s waiting for a reply", timed_out=True
        )
        assert self.outcome(first) == Outcome(
            False, "redis 127.0.0.1:6379: connection dropped: no reply within 0.5s"
        )
        assert not transport.connected

    def test_zero_timeout_means_no_limit(self) -> None:
        """A run with timeout=0 waits for its reply however long it takes."""
        self.job("job.0")
        protocol, _ = self.connect()
        protocol.dataReceived(b":1\r\n")
        d = self.job("job.1", timeout=0)
        self.reactor.advance(3600)
        assert not d.called
        protocol.dataReceived(b":2\r\n")
        assert self.outcome(d) == Outcome(True, output=b":2")

    def test_cancel_a_job_not_sent_drops_it(self) -> None:
        """A job cancelled while the connection is being made fires cancelled, is not sent."""
        dropped = self.job("job.1")
        kept = self.job("job.2")
        dropped.cancel()
        assert self.outcome(dropped) == Outcome(False, "cancelled", cancelled=True)
        assert self.runner.running == 1
        protocol, transport = self.connect()
        assert transport.value() == encode_command(b"RPUSH", b"q", b"job.2")
        protocol.dataReceived(b":1\r\n")
        assert self.outcome(kept) == Outcome(True, output=b":1")
        self.reactor.advance(10)  # the dropped job's deadline passes harmlessly
        assert transport.connected

    def test_cancel_a_sent_job_ignores_its_reply(self) -> None:
        """A sent job cannot be taken back: cancelled, its reply is skipped, the rest match."""
        self.job("job.0")
        protocol, transport = self.connect()
        protocol.dataReceived(b":1\r\n")
        cancelled = self.job("job.1")
        after = self.job("job.2")
        cancelled.cancel()
        assert self.outcome(cancelled).cancelled
        protocol.dataReceived(b":2\r\n:3\r\n")
        assert self.outcome(after) == Outcome(True, output=b":3")
        assert transport.connected and self.runner.running == 0

    def test_cancel_after_the_reply_does_nothing(self) -> None:
        """Cancelling a job that has its outcome keeps it."""
        d = self.job("job.1")
        protocol, _ = self.connect()
        protocol.dataReceived(b"+OK\r\n")
        d.cancel()
        assert self.outcome(d) == Outcome(True, output=b"+OK")

    def test_connection_lost_fails_pending_and_reconnects(self) -> None:
        """A lost connection fails its jobs (``connection lost``); the next job reconnects."""
        self.job("job.0")
        protocol, transport = self.connect()
        protocol.dataReceived(b":1\r\n")
        d = self.job("job.1")
        transport.loseConnection()
        assert _brief(self.outcome(d)) == Outcome(False, "redis 127.0.0.1:6379: connection lost")
        self.job("job.2")
        assert len(self.reactor.tcpClients) == 2

    def test_idle_connection_closed_is_reopened(self) -> None:
        """An idle connection the server closes is reopened by the next job, no back-off."""
        self.job("job.0")
        protocol, transport = self.connect()
        protocol.dataReceived(b":1\r\n")
        transport.loseConnection()
        d = self.job("job.1")
        assert len(self.reactor.tcpClients) == 2
        protocol2, _ = self.connect()
        protocol2.dataReceived(b":1\r\n")
        assert self.outcome(d).success

    def test_unsolicited_reply_and_garbage_drop_the_connection(self) -> None:
        """A reply nobody asked for, or non-RESP bytes, drop the connection and back off."""
        self.job("job.0")
        protocol, transport = self.connect()
        protocol.dataReceived(b":1\r\n:2\r\n")
        assert not transport.connected
        d = self.job("job.1")
        assert "unavailable (last connect attempt: protocol error" in self.outcome(d).reason
        self.reactor.advance(BACKOFF_MAX)
        d = self.job("job.2")
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        assert "protocol error: unexpected reply type byte b'H'" in self.outcome(d).reason
        assert not transport.connected

    def test_stop_waits_for_grace_then_interrupts(self) -> None:
        """stop(grace) lets in-flight jobs finish; after grace they fail as interrupted."""
        d1 = self.job("job.1")
        protocol, transport = self.connect()
        d2 = self.job("job.2")
        stopped = self.runner.stop(1.0)
        assert not stopped.called
        assert _brief(self.outcome(self.job("job.3"))) == Outcome(False, "runner stopped")
        protocol.dataReceived(b":1\r\n")
        assert self.outcome(d1).success
        self.reactor.advance(1.0)
        assert _brief(self.outcome(d2)) == Outcome(
            False, "redis 127.0.0.1:6379: stopped at shutdown", interrupted=True
        )
        assert not transport.connected
        self.successResultOf(stopped)
        assert self.reactor.getDelayedCalls() == []
        assert self.runner.running == 0

    def test_stop_when_all_done_closes_at_once(self) -> None:
        """With nothing in flight, stop closes the connections and fires at once."""
        self.job("job.1")
        protocol, transport = self.connect()
        protocol.dataReceived(b":1\r\n")
        stopped = self.runner.stop(10)
        self.successResultOf(stopped)
        assert not transport.connected
        assert self.reactor.getDelayedCalls() == []
        self.successResultOf(self.runner.stop(10))  # stopping twice is fine

    def test_stop_while_connecting(self) -> None:
        """A connect in progress is abandoned at stop; its jobs end as interrupted."""
        d = self.job("job.1")
        stopped = self.runner.stop(0)
        self.reactor.advance(0)
        assert self.outcome(d).interrupted
        assert self.reactor.connectors[0].stoppedConnecting
        self.successResultOf(stopped)
        assert self.reactor.getDelayedCalls() == []
        self.refuse()  # a late failure report is ignored

    def test_invalid_specs_fail_without_connecting(self) -> None:
        """Wrong spec kind, unsupported command and bad URLs fail at once; no secret leaks."""
        run = self.runner.run
        assert _brief(self.outcome(run(_execution(ShellSpec("true"))))) == Outcome(
            False, "the redis runner cannot run a shell rule"
        )
        bad_command = self.outcome(run(_execution(RedisSpec(FAKE_URL, "DEL", "k"))))
        assert _brief(bad_command) == Outcome(
            False, "redis 127.0.0.1:6379: command 'DEL' is not supported"
        )
        bad_url = self.outcome(run(_execution(RedisSpec("redis://u:secret@h:nope", "SET", "k"))))
        assert not bad_url.success
        assert "secret" not in bad_url.reason
        assert bad_url.reason.startswith("redis redis://")
        bad_db = self.outcome(run(_execution(RedisSpec("redis://h/x", "SET", "k"))))
        assert _brief(bad_db) == Outcome(False, "redis redis://h/x: database must be a number")
        unencodable = self.outcome(run(_execution(RedisSpec(FAKE_URL, "SET", "k"), "bad\udc80")))
        assert unencodable.reason.startswith("redis 127.0.0.1:6379: cannot encode the command")
        assert self.reactor.tcpClients == []


# ------------------------------------------------------------------------- real redis


@implementer(ILogObserver)
class _Events:
    """Collects the redis runner's log events."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if str(event.get("log_namespace", "")).startswith("ztick_tw.runners.redis"):
            self.events.append(event)

    def text(self) -> str:
        return "\n".join(formatEvent(e) + " " + repr(e) for e in self.events)


class _Silent(Protocol):
    """Accepts a connection and never answers; records what it got and when it ended."""

    def __init__(self, owner: _SilentServer) -> None:
        self.owner = owner
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.owner.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.owner.received += data
        if self.owner.hang_up:
            assert self.transport is not None
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


class _SilentServer(ServerFactory):
    """A TCP server that never replies (``hang_up``: closes on the first data instead)."""

    def __init__(self, hang_up: bool = False) -> None:
        self.hang_up = hang_up
        self.connections: list[_Silent] = []
        self.received = b""
        self.port: IListeningPort | None = None

    def buildProtocol(self, addr: object) -> _Silent:
        return _Silent(self)

    @property
    def number(self) -> int:
        """The port number it listens on."""
        assert self.port is not None
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        return address.port

    def url(self) -> str:
        return f"redis://127.0.0.1:{self.number}"

    async def close(self) -> None:
        assert self.port is not None
        stopped = self.port.stopListening()
        if stopped is not None:
            await stopped
        for conn in self.connections:
            if not conn.lost.called:
                assert conn.transport is not None
                conn.transport.loseConnection()
                await conn.lost


async def _settle(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Spin the reactor until ``condition()`` holds (or ``timeout`` seconds pass)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await deferLater(reactor, 0.01, lambda: None)
    return True


class RealRedisTests(unittest.TestCase):
    """The runner against a real redis-server on the real reactor."""

    redis: RedisServer
    fresh: Callable[..., RedisServer]

    @pytest.fixture(autouse=True)
    def _servers(
        self, redis_server: RedisServer, fresh_redis_server: Callable[..., RedisServer]
    ) -> None:
        self.redis = redis_server
        self.fresh = fresh_redis_server

    def setUp(self) -> None:
        self.log = _Events()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)

    def runner(self, timeout: float = 5.0, message_format: str = "ztick") -> RedisRunner:
        options = NetworkOptions(timeout=timeout, message_format=message_format)  # type: ignore[arg-type]
        runner = RedisRunner(reactor, options)
        self.addCleanup(runner.stop, 0)
        return runner

    async def silent(self, hang_up: bool = False) -> _SilentServer:
        server = _SilentServer(hang_up)
        server.port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(server.close)
        return server

    async def test_rpush_lpush_set_deliver_the_job_id(self) -> None:
        """RPUSH, LPUSH and SET store exactly the job id (any bytes, spaces and quotes too)."""
        runner = self.runner()
        url = self.redis.url()
        rkey, lkey, skey = _unique("r"), _unique("l"), _unique("s")
        job_ids = ["job.1", 'job "ütf-8" with spaces', "job.3"]
        for job_id in job_ids:
            outcome = await runner.run(_execution(RedisSpec(url, "RPUSH", rkey), job_id))
            assert _brief(outcome) == Outcome(True)
            assert (await runner.run(_execution(RedisSpec(url, "LPUSH", lkey), job_id))).success
        assert (await runner.run(_execution(RedisSpec(url, "SET", skey), "job.set"))).success
        encoded = [j.encode() for j in job_ids]
        assert self.redis.command("LRANGE", rkey, 0, -1) == encoded
        assert self.redis.command("LRANGE", lkey, 0, -1) == encoded[::-1]
        assert self.redis.command("GET", skey) == b"job.set"
        assert runner.running == 0
        assert runner.connections == 1

    async def test_publish(self) -> None:
        """PUBLISH sends the job id to subscribers; with no subscriber it still succeeds."""
        runner = self.runner()
        channel = _unique("ch")
        subscriber = self.redis.subscribe(channel)
        self.addCleanup(subscriber.close)
        spec = RedisSpec(self.redis.url(), "PUBLISH", channel)
        assert _brief(await runner.run(_execution(spec, "job.pub"))) == Outcome(True)
        assert subscriber.next_message() == (channel.encode(), b"job.pub")
        nobody = RedisSpec(self.redis.url(), "PUBLISH", _unique("nobody"))
        assert _brief(await runner.run(_execution(nobody, "job.x"))) == Outcome(True)

    async def test_replies_are_the_output(self) -> None:
        """A real server's replies become the outcome's output: ``:N`` for RPUSH, ``+OK``."""
        runner = self.runner()
        key = _unique()
        pushed = await runner.run(_execution(RedisSpec(self.redis.url(), "RPUSH", key)))
        assert pushed == Outcome(True, output=b":1")
        stored = await runner.run(_execution(RedisSpec(self.redis.url(), "SET", _unique())))
        assert stored == Outcome(True, output=b"+OK")
        wrong = await runner.run(_execution(RedisSpec(self.redis.url(), "SET", key)))
        assert wrong == Outcome(True, output=b"+OK")  # SET replaces a list
        listed = await runner.run(_execution(RedisSpec(self.redis.url(), "RPUSH", key)))
        assert listed.output.startswith(b"-WRONGTYPE") and not listed.success

    async def test_json_format(self) -> None:
        """With message_format json the value is the rich JSON document."""
        runner = self.runner(message_format="json")
        key = _unique()
        execution = _execution(RedisSpec(self.redis.url(), "RPUSH", key), "job.json", attempt=2)
        assert (await runner.run(execution)).success
        stored = self.redis.command("LPOP", key)
        assert stored == rich_body(execution)
        assert isinstance(stored, bytes)
        assert json.loads(stored) == {
            "job_id": "job.json",
            "execution": DUE_NS,
            "fired": DUE_NS + 5,
            "attempt": 2,
            "rule_id": "rule.1",
        }

    async def test_db_selection(self) -> None:
        """``/3`` in the URL selects db 3: the value lands there and not in db 0."""
        runner = self.runner()
        key = _unique()
        assert (await runner.run(_execution(RedisSpec(self.redis.url(db=3), "SET", key)))).success
        with self.redis.client() as client:
            assert client.command("GET", key) is None
            client.command("SELECT", 3)
            assert client.command("GET", key) == b"job.1"
            client.command("DEL", key)

    async def test_refused_select_writes_nothing(self) -> None:
        """A db the server lacks fails with ``select refused``; nothing lands in db 0."""
        runner = self.runner()
        key = _unique()
        outcome = await runner.run(_execution(RedisSpec(self.redis.url(db=99), "SET", key)))
        assert _brief(outcome) == Outcome(
            False,
            f"redis 127.0.0.1:{self.redis.port}/99: select refused: ERR DB index is out of range",
        )
        assert self.redis.command("EXISTS", key) == 0

    async def test_password_auth(self) -> None:
        """The right password works; a wrong one fails with auth refused and never shows it."""
        server = self.fresh(password="right-pw")
        runner = self.runner()
        key = _unique()
        good = RedisSpec(server.url(password="right-pw"), "RPUSH", key)
        assert _brief(await runner.run(_execution(good))) == Outcome(True)
        assert server.command("LRANGE", key, 0, -1) == [b"job.1"]
        bad = RedisSpec(server.url(password="Wrong-Secret-42"), "RPUSH", key)
        outcome = await runner.run(_execution(bad))
        assert not outcome.success
        assert outcome.reason.startswith(f"redis 127.0.0.1:{server.port}: auth refused: WRONGPASS")
        again = await runner.run(_execution(bad))
        assert "unavailable (last connect attempt: auth refused: WRONGPASS" in again.reason
        for text in (outcome.reason, again.reason, self.log.text()):
            assert "Wrong-Secret-42" not in text
        assert "Wrong-Secret-42" not in self.log.text()
        assert self.log.events, "the auth failure is logged"
        missing = RedisSpec(server.url(), "RPUSH", key)
        noauth = await runner.run(_execution(missing))
        assert _brief(noauth) == Outcome(
            False, f"redis 127.0.0.1:{server.port}: RPUSH {key}: NOAUTH Authentication required."
        )

    async def test_acl_user(self) -> None:
        """``user:pass@`` authenticates as an ACL user; a wrong password for it fails."""
        user = _unique("user")
        self.redis.add_user(user, "acl pass!", "~*", "&*", "+@all")
        self.addCleanup(self.redis.command, "ACL", "DELUSER", user)
        runner = self.runner()
        key = _unique()
        spec = RedisSpec(self.redis.url(user=user, password="acl pass!"), "RPUSH", key)
        assert _brief(await runner.run(_execution(spec))) == Outcome(True)
        clients = self.redis.command("CLIENT", "LIST")
        assert isinstance(clients, bytes)
        assert f"user={user}".encode() in clients
        wrong = RedisSpec(self.redis.url(user=user, password="nope"), "RPUSH", key)
        outcome = await runner.run(_execution(wrong))
        assert "auth refused: WRONGPASS" in outcome.reason
        assert "nope" not in outcome.reason
        assert self.redis.command("LRANGE", key, 0, -1) == [b"job.1"]

    async def test_error_reply_fails_the_job_only(self) -> None:
        """RPUSH onto a string key fails with WRONGTYPE; the connection keeps serving."""
        runner = self.runner()
        key = _unique()
        self.redis.command("SET", key, "a string")
        spec = RedisSpec(self.redis.url(), "RPUSH", key)
        outcome = await runner.run(_execution(spec))
        assert not outcome.success
        assert outcome.reason.startswith(f"redis 127.0.0.1:{self.redis.port}: RPUSH {key}:")
        assert "WRONGTYPE" in outcome.reason
        assert (await runner.run(_execution(RedisSpec(self.redis.url(), "SET", key)))).success
        assert runner.connect_attempts == 1

    async def test_server_down_fails_fast(self) -> None:
        """A refused connect fails the job; during the back-off no new connect is tried."""
        server = self.fresh()
        url = server.url()
        server.stop()
        runner = self.runner()
        spec = RedisSpec(url, "RPUSH", "k")
        first = await runner.run(_execution(spec))
        assert _brief(first) == Outcome(
            False, f"redis 127.0.0.1:{server.port}: connection refused"
        )
        second = await runner.run(_execution(spec, "job.2"))
        assert _brief(second) == Outcome(
            False,
            f"redis 127.0.0.1:{server.port}: unavailable"
            " (last connect attempt: connection refused)",
        )
        assert runner.connect_attempts == 1  # the second job did not wait out the back-off

    async def test_server_restart_is_recovered(self) -> None:
        """After a restart (idle, or after a down phase) the next jobs succeed again."""
        server = self.fresh()
        runner = self.runner()
        key = "restart.key"
        spec = RedisSpec(server.url(), "RPUSH", key)
        assert (await runner.run(_execution(spec, "job.1"))).success
        server.restart()  # idle connection: the reactor sees it close
        assert await _settle(lambda: runner.connections == 0)
        assert (await runner.run(_execution(spec, "job.2"))).success
        assert server.command("LRANGE", key, 0, -1) == [b"job.2"]
        server.stop()
        assert await _settle(lambda: runner.connections == 0)
        assert not (await runner.run(_execution(spec, "job.3"))).success
        assert "unavailable" in (await runner.run(_execution(spec, "job.4"))).reason
        server.start()
        await deferLater(reactor, BACKOFF_START, lambda: None)
        assert _brief(await runner.run(_execution(spec, "job.5"))) == Outcome(True)
        assert server.command("LRANGE", key, 0, -1) == [b"job.5"]
        assert runner.connect_attempts == 4

    async def test_paused_server_times_out_then_recovers(self) -> None:
        """A server that stops answering fails jobs at the timeout; once back, jobs succeed."""
        server = self.fresh()
        runner = self.runner(timeout=0.3)
        key = _unique()
        spec = RedisSpec(server.url(), "RPUSH", key)
        assert (await runner.run(_execution(spec, "job.1"))).success
        server.pause()
        started = time.monotonic()
        outcomes = await gatherResults([runner.run(_execution(spec, f"job.{i}")) for i in (2, 3)])
        elapsed = time.monotonic() - started
        reason = f"redis 127.0.0.1:{server.port}: timed out after 0.3s waiting for a reply"
        assert [_brief(o) for o in outcomes] == [Outcome(False, reason)] * 2
        assert elapsed >= 0.25  # not before the timeout (no upper bound: a loaded CI is slow)
        server.resume()
        assert _brief(await runner.run(_execution(spec, "job.4"))) == Outcome(True)
        stored = server.command("LRANGE", key, 0, -1)
        assert isinstance(stored, list)
        assert stored[0] == b"job.1" and stored[-1] == b"job.4"
        assert runner.connect_attempts == 2

    async def test_silent_server_timeout_drops_the_connection(self) -> None:
        """Against a server that never replies, all pipelined jobs time out and it is closed."""
        silent = await self.silent()
        runner = self.runner(timeout=0.2)
        spec = RedisSpec(silent.url(), "SET", "k")
        outcomes = await gatherResults([runner.run(_execution(spec, f"j{i}")) for i in range(3)])
        assert all(o.reason.endswith("timed out after 0.2s waiting for a reply") for o in outcomes)
        assert len(silent.connections) == 1
        await silent.connections[0].lost  # the poisoned connection was dropped
        assert silent.received.count(b"*3\r\n$3\r\nSET\r\n") == 3
        await runner.run(_execution(spec, "j4"))
        assert len(silent.connections) == 2  # the next job reconnected

    async def test_connection_lost_mid_flight(self) -> None:
        """A server that hangs up fails the jobs sent (connection lost); the next reconnects."""
        server = await self.silent(hang_up=True)
        runner = self.runner()
        spec = RedisSpec(server.url(), "RPUSH", "k")
        outcome = await runner.run(_execution(spec))
        assert _brief(outcome) == Outcome(
            False, f"redis 127.0.0.1:{server.number}: connection lost"
        )
        outcome = await runner.run(_execution(spec, "job.2"))
        assert outcome.reason.endswith("connection lost")
        assert len(server.connections) == 2

    async def test_pooling_one_connection_for_many_jobs(self) -> None:
        """200 concurrent jobs to one URL share one connection and keep their order."""
        runner = self.runner()
        key = _unique()
        spec = RedisSpec(self.redis.url(), "RPUSH", key)
        before = self.redis.connections_received()
        ds = [runner.run(_execution(spec, f"job.{i}")) for i in range(200)]
        assert runner.running == 200
        outcomes = await gatherResults(ds)
        assert [_brief(o) for o in outcomes] == [Outcome(True)] * 200
        assert self.redis.connections_received() - before == 1
        assert runner.connect_attempts == 1
        expected = [f"job.{i}".encode() for i in range(200)]
        assert self.redis.command("LRANGE", key, 0, -1) == expected
        other = RedisSpec(self.redis.url(db=1), "RPUSH", key)
        assert (await runner.run(_execution(other))).success
        assert runner.connections == 2  # another URL, another connection
        self.redis.command("DEL", key)

    async def test_burst_is_pipelined_on_one_connection(self) -> None:
        """5,000 jobs at once all arrive over the one connection (rates are bench/'s job)."""
        runner = self.runner()
        key = _unique()
        spec = RedisSpec(self.redis.url(), "RPUSH", key)
        assert (await runner.run(_execution(spec, "warm-up"))).success
        outcomes = await gatherResults(
            [runner.run(_execution(spec, f"j{i}")) for i in range(5000)]
        )
        assert all(o.success for o in outcomes)
        assert self.redis.command("LLEN", key) == 5001
        assert runner.connect_attempts == 1
        self.redis.command("DEL", key)

    async def test_stop_lets_inflight_finish_and_closes(self) -> None:
        """stop(grace) waits for the jobs in flight, then closes; later runs are refused."""
        runner = self.runner()
        key = _unique()
        spec = RedisSpec(self.redis.url(), "RPUSH", key)
        ds = [runner.run(_execution(spec, f"job.{i}")) for i in range(50)]
        await runner.stop(5)
        results = await DeferredList(ds)
        assert all(ok and _brief(outcome) == Outcome(True) for ok, outcome in results)
        assert runner.connections == 0
        assert _brief(await runner.run(_execution(spec))) == Outcome(False, "runner stopped")
        assert self.redis.command("LLEN", key) == 50
        self.redis.command("DEL", key)

    async def test_stop_interrupts_pending(self) -> None:
        """Jobs still unanswered when the grace ends fail as interrupted; the socket closes."""
        silent = await self.silent()
        runner = self.runner()
        spec = RedisSpec(silent.url(), "SET", "k")
        ds = [runner.run(_execution(spec, f"j{i}")) for i in range(3)]
        await _settle(lambda: len(silent.connections) == 1)
        started = time.monotonic()
        await runner.stop(0.1)
        assert time.monotonic() - started < 10  # the grace, not waiting for replies forever
        outcomes = await gatherResults(ds)
        assert (
            outcomes
            == [
                Outcome(
                    False,
                    f"redis 127.0.0.1:{silent.number}: stopped at shutdown",
                    interrupted=True,
                )
            ]
            * 3
        )
        await silent.connections[0].lost
        assert runner.connections == 0

    async def test_client_protocol(self) -> None:
        """RedisClientProtocol pipelines commands, errbacks error replies, parses arrays."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.redis.port)
        client = await connectProtocol(endpoint, RedisClientProtocol())  # type: ignore[no-untyped-call]
        key = _unique()
        replies = await gatherResults(
            [
                client.execute("RPUSH", key, "a", b"b\r\n"),
                client.execute("LRANGE", key, 0, -1),
                client.execute("GET", _unique()),
            ]
        )
        assert replies == [2, [b"a", b"b\r\n"], None]
        with pytest.raises(RedisError, match="WRONGTYPE"):
            await client.execute("GET", key)
        await client.execute("DEL", key)
        assert client.transport is not None
        client.transport.loseConnection()
        await client.lost_deferred
