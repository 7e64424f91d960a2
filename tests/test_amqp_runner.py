"""The amqp runner: its DSN parsing and back-off on a fake clock, and a real RabbitMQ broker.

Broker tests use the session's ``rabbitmq`` fixture (``tests/rabbitmq_server.py``) and
keep to themselves with queue and exchange names of their own.  Failures are injected
with real sockets: a closed port, a server that never answers, and a TCP relay between
runner and broker that can hold back the broker's replies or cut the connection.
Time is faked (``MemoryReactorClock``) only where the test is about timing: back-off
windows, timeouts and shutdown grace while connecting.
"""

from __future__ import annotations

import json
import logging
import tempfile
from typing import Any, cast

import pytest
from twisted.internet import error as neterror
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol, ServerFactory, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from tests.ports import free_port
from tests.rabbitmq_server import RabbitMQServer, unique_name
from ztick_tw.model import AmqpSpec, ShellSpec
from ztick_tw.runners import amqp_connection
from ztick_tw.runners.amqp import (
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    AmqpRunner,
    AmqpTarget,
    Backoff,
    parse_dsn,
)
from ztick_tw.runners.base import Execution, IRunner, Outcome
from ztick_tw.runners.message import MessageFormat, NetworkOptions, rich_body

DUE_NS = 1_700_000_000_123_456_789


def _brief(outcome: Outcome) -> Outcome:
    """``outcome`` without the details (output...): success, reason, interrupted."""
    return Outcome(outcome.success, outcome.reason, outcome.interrupted)


def _execution(
    spec: AmqpSpec | ShellSpec,
    job_id: str = "job.1",
    attempt: int = 1,
    timeout: float | None = None,
) -> Execution:
    return Execution(job_id, DUE_NS, "rule.1", attempt, spec, fired_ns=DUE_NS + 7, timeout=timeout)


@implementer(ILogObserver)
class _Events:
    """Collects the events the amqp runner logs."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if str(event.get("log_namespace", "")).startswith("ztick_tw.runners.amqp"):
            self.events.append(event)

    def messages(self) -> list[str]:
        return [formatEvent(e) for e in self.events]


class _PikaRecords(logging.Handler):
    """Everything pika logs through the standard library, at every level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


# ------------------------------------------------------------------------ pure units


def test_parse_dsn_defaults() -> None:
    """No credentials means guest/guest, no port 5672 (5671 for amqps), no path vhost /."""
    assert parse_dsn("amqp://broker") == AmqpTarget(False, "broker", 5672, "/", "guest", "guest")
    assert parse_dsn("amqps://broker/") == AmqpTarget(True, "broker", 5671, "/", "guest", "guest")
    target = parse_dsn("amqp://alice:s%40cret@10.0.0.1:5673/prod")
    assert (target.user, target.password, target.vhost, target.port) == (
        "alice",
        "s@cret",
        "prod",
        5673,
    )
    assert parse_dsn("amqp://bob@h").password == ""


def test_parse_dsn_vhost_decoding() -> None:
    """The vhost is the URL-decoded path without its leading slash; ``%2f`` is ``/``."""
    assert parse_dsn("amqp://h/%2f").vhost == "/"
    assert parse_dsn("amqp://h/%2F").vhost == "/"
    assert parse_dsn("amqp://h//").vhost == "/"
    assert parse_dsn("amqp://h/a%2Fb%20c").vhost == "a/b c"
    assert parse_dsn("amqp://h:1/v?heartbeat=5").vhost == "v"


def test_target_label_hides_the_password() -> None:
    """The label is host:port/vhost: no user, no password; IPv6 hosts get brackets."""
    target = parse_dsn("amqp://alice:hunter2@[::1]:5672/ops")
    assert target.label == "[::1]:5672/ops"
    assert "hunter2" not in repr(target)
    assert parse_dsn("amqp://u:p@h").label == "h:5672/"


def test_parse_dsn_errors_do_not_leak_the_password() -> None:
    """Bad DSNs raise ValueError with a message that never holds the password."""
    for dsn in ("amqp://u:hunter2@h:99999/", "http://u:hunter2@h/", "amqp://u:hunter2@/v"):
        with pytest.raises(ValueError) as caught:
            parse_dsn(dsn)
        assert "hunter2" not in str(caught.value)


def test_backoff_doubles_to_the_cap_and_resets() -> None:
    """Windows are 0.5, 1, 2 ... s, capped at 30 s; a success starts over at 0.5 s."""
    clock = Clock()
    backoff = Backoff()
    windows = []
    for _ in range(10):
        windows.append(backoff.failed(clock.seconds()))
        assert backoff.remaining(clock.seconds()) == windows[-1]
        clock.advance(windows[-1])
        assert backoff.remaining(clock.seconds()) == 0
    assert windows == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert (BACKOFF_INITIAL, BACKOFF_MAX) == (0.5, 30.0)
    clock.advance(0)
    backoff.succeeded()
    assert backoff.remaining(clock.seconds()) == 0
    assert backoff.failed(clock.seconds()) == 0.5
    clock.advance(0.2)
    assert backoff.remaining(clock.seconds()) == pytest.approx(0.3)


# -------------------------------------------------------------- fake-clock runner tests


class FakeClockTests(unittest.TestCase):
    """The runner on ``MemoryReactorClock``: connection attempts are failed by hand."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()  # type: ignore[no-untyped-call]
        self.runner = AmqpRunner(self.reactor, NetworkOptions(timeout=5.0))
        self.spec = AmqpSpec("amqp://user:pa55@127.0.0.1:5672/v", "ex", "key")

    def job(self, job_id: str = "job.1", timeout: float | None = None) -> Deferred[Outcome]:
        return self.runner.run(_execution(self.spec, job_id, timeout=timeout))

    def refuse(self, index: int = -1) -> None:
        factory = self.reactor.tcpClients[index][2]
        refused = Failure(neterror.ConnectionRefusedError())  # type: ignore[no-untyped-call]
        factory.clientConnectionFailed(self.reactor.connectors[index], refused)

    def pending(self, d: Deferred[Any]) -> None:
        self.assertNoResult(d)  # type: ignore[no-untyped-call]

    def outcome(self, d: Deferred[Outcome]) -> Outcome:
        result = self.successResultOf(d)
        assert isinstance(result, Outcome)
        return result

    def test_bad_ca_file_is_a_construction_error(self) -> None:
        """A missing or certificate-less CA file fails at construction, naming the file."""
        with pytest.raises(ValueError, match=r"cannot read amqp CA file /nonexistent\.pem"):
            AmqpRunner(self.reactor, NetworkOptions(), ca_file="/nonexistent.pem")
        with tempfile.NamedTemporaryFile("w", suffix=".pem") as empty:
            empty.write("not a certificate\n")
            empty.flush()
            with pytest.raises(ValueError, match="holds no PEM certificate"):
                AmqpRunner(self.reactor, NetworkOptions(), ca_file=empty.name)

    def test_needs_a_tcp_reactor(self) -> None:
        """A reactor without IReactorTCP is refused at construction."""
        with pytest.raises(TypeError):
            AmqpRunner(Clock(), NetworkOptions())

    def test_jobs_wait_for_the_connection_then_fail_together(self) -> None:
        """Jobs arriving while connecting share the one attempt and its failure."""
        first, second = self.job("a"), self.job("b")
        assert len(self.reactor.tcpClients) == 1
        assert self.runner.running == 2
        self.pending(first)
        self.refuse()
        expected = Outcome(False, "amqp 127.0.0.1:5672/v: connection refused")
        assert self.outcome(first) == expected
        assert self.outcome(second) == expected
        assert self.runner.running == 0

    def test_backoff_windows_fail_new_jobs_at_once(self) -> None:
        """After a failed attempt new jobs fail at once until the window passes.

        Each further failure doubles the window up to 30 s.
        """
        expected_windows = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
        for attempt, window in enumerate(expected_windows, start=1):
            d = self.job(f"try.{attempt}")
            assert len(self.reactor.tcpClients) == attempt
            self.refuse()
            assert "connection refused" in self.outcome(d).reason
            during = self.outcome(self.job(f"during.{attempt}"))
            assert during.reason == (
                "amqp 127.0.0.1:5672/v: connection refused"
                f" (next connection attempt in {window:.1f}s)"
            )
            assert len(self.reactor.tcpClients) == attempt, "no attempt inside the window"
            self.reactor.advance(window - 0.01)
            assert not self.outcome(self.job(f"late.{attempt}")).success
            assert len(self.reactor.tcpClients) == attempt
            self.reactor.advance(0.01)

    def test_connect_timeout(self) -> None:
        """A connection that never completes fails its jobs after ``timeout`` seconds.

        The failed attempt starts a back-off window like a refused one.
        """
        d = self.job()
        self.reactor.advance(4.9)
        self.pending(d)
        self.reactor.advance(0.1)
        reason = self.outcome(d).reason
        assert reason.startswith("amqp 127.0.0.1:5672/v: ")
        assert "timed out after 5s" in reason
        self.reactor.advance(0)
        later = self.outcome(self.job("later"))
        assert "next connection attempt" in later.reason
        assert "timed out after 5s" in later.reason
        assert not self.reactor.getDelayedCalls()

    def test_own_timeout_while_connecting(self) -> None:
        """A job's own shorter timeout ends it alone while the connection is being made."""
        quick, slow = self.job("quick", timeout=1), self.job("slow")
        self.reactor.advance(1)
        assert self.outcome(quick) == Outcome(
            False, "amqp 127.0.0.1:5672/v: timed out after 1s connecting", timed_out=True
        )
        self.pending(slow)
        assert self.runner.running == 1
        self.reactor.advance(4)  # the default 5 s: the connect attempt and "slow" time out
        assert "timed out after 5s" in self.outcome(slow).reason

    def test_cancel_while_connecting_drops_the_job(self) -> None:
        """A job cancelled before it was published fires cancelled at once, no CancelledError."""
        dropped, kept = self.job("dropped"), self.job("kept")
        dropped.cancel()
        assert self.outcome(dropped) == Outcome(False, "cancelled", cancelled=True)
        assert self.runner.running == 1
        self.refuse()  # (the dropped job is done: the refusal does not reach it again)
        assert self.outcome(kept).reason == "amqp 127.0.0.1:5672/v: connection refused"
        dropped.cancel()  # after the end: nothing
        assert self.runner.running == 0

    def test_stop_interrupts_jobs_still_connecting(self) -> None:
        """stop(grace) waits grace, then fails what is left as interrupted.

        The connection attempt is aborted, no timer is left, and run() afterwards fails
        with "runner stopped".
        """
        d = self.job()
        stopped = self.runner.stop(2.0)
        self.pending(stopped)
        self.reactor.advance(1.9)
        self.pending(d)
        self.reactor.advance(0.1)
        assert _brief(self.outcome(d)) == Outcome(False, "stopped at shutdown", interrupted=True)
        self.successResultOf(stopped)
        assert self.runner.running == 0
        assert _brief(self.outcome(self.job("after"))) == Outcome(False, "runner stopped")
        self.successResultOf(self.runner.stop(0))
        assert not self.reactor.getDelayedCalls()

    def test_stop_without_work_is_immediate(self) -> None:
        """With nothing in flight stop() fires at once."""
        self.successResultOf(self.runner.stop(10))
        assert not self.reactor.getDelayedCalls()

    def test_bad_spec_and_dsn_fail_without_errback(self) -> None:
        """A spec of another kind or an unparsable DSN fails the run; nothing is raised."""
        shell = self.outcome(self.runner.run(_execution(ShellSpec("true"))))
        assert _brief(shell) == Outcome(False, "the amqp runner cannot run a shell spec")
        bad = AmqpSpec("amqp://u:hunter2@h:99999/", "ex", "k")
        outcome = self.outcome(self.runner.run(_execution(bad)))
        assert not outcome.success
        assert "hunter2" not in outcome.reason
        assert self.reactor.tcpClients == []


# ------------------------------------------------------------------ failure injection


class _SilentServer(ServerFactory):
    """Accepts connections and never says anything."""

    def __init__(self) -> None:
        self.connections: list[Protocol] = []
        self.port: IListeningPort | None = None

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = Protocol()
        self.connections.append(protocol)
        return protocol

    async def close(self) -> None:
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.abortConnection()  # type: ignore[attr-defined]
        if self.port is not None:
            await cast(Deferred[None], self.port.stopListening())
        await deferLater(reactor, 0, lambda: None)


class _ToBroker(Protocol):
    def __init__(self, relay: _Relay) -> None:
        self.relay = relay

    def dataReceived(self, data: bytes) -> None:
        self.relay.from_broker(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.relay.broker_gone()


class _Relay(Protocol):
    """One client connection through the proxy, relayed to the broker."""

    def __init__(self, proxy: _Proxy) -> None:
        self.proxy = proxy
        self.upstream: _ToBroker | None = None
        self.early: list[bytes] = []
        self.lost: Deferred[None] = Deferred()
        self.upstream_lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.proxy.relays.append(self)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy.broker_port)
        d = endpoint.connect(Factory.forProtocol(lambda: _ToBroker(self)))
        d.addCallbacks(self._up, lambda _: self.transport.loseConnection())  # type: ignore[union-attr]

    def _up(self, upstream: Protocol) -> None:
        assert isinstance(upstream, _ToBroker)
        self.upstream = upstream
        for data in self.early:
            upstream.transport.write(data)  # type: ignore[union-attr]
        self.early = []

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is None:
            self.early.append(data)
        else:
            self.upstream.transport.write(data)  # type: ignore[union-attr]

    def from_broker(self, data: bytes) -> None:
        if self.proxy.hold:
            self.proxy.held.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def broker_gone(self) -> None:
        self.upstream_lost.callback(None)
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.loseConnection()
        elif not self.upstream_lost.called:
            self.upstream_lost.callback(None)


class _Proxy(ServerFactory):
    """A TCP relay on 127.0.0.1 to the broker, for failure injection.

    It can hold back the broker's bytes (``hold``) and cut every relayed connection
    (``cut``).
    """

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.hold = False
        self.held: list[bytes] = []
        self.relays: list[_Relay] = []
        self.port: IListeningPort | None = None

    def buildProtocol(self, addr: Any) -> Protocol:
        return _Relay(self)

    @property
    def listen_port(self) -> int:
        assert self.port is not None
        port: int = self.port.getHost().port  # type: ignore[attr-defined]
        return port

    async def cut(self) -> None:
        """Abort every relayed connection and wait until both sides are closed."""
        for relay in list(self.relays):
            if relay.transport is not None:
                relay.transport.abortConnection()  # type: ignore[attr-defined]
        for relay in list(self.relays):
            await relay.lost
            await relay.upstream_lost
        self.relays = []

    async def close(self) -> None:
        await self.cut()
        if self.port is not None:
            await cast(Deferred[None], self.port.stopListening())


# ----------------------------------------------------------------- real broker tests


class _BrokerBase(unittest.TestCase):
    broker: RabbitMQServer

    @pytest.fixture(autouse=True)
    def _use_broker(self, rabbitmq: RabbitMQServer) -> None:
        self.broker = rabbitmq

    def setUp(self) -> None:
        self.log = _Events()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)

    def runner(
        self,
        timeout: float = 10.0,
        message_format: MessageFormat = "ztick",
        persistent: bool = True,
        ca_file: str | None = None,
    ) -> AmqpRunner:
        options = NetworkOptions(
            timeout=timeout, message_format=message_format, amqp_persistent=persistent
        )
        runner = AmqpRunner(reactor, options, ca_file=ca_file)
        self.addCleanup(runner.stop, 0)
        return runner

    def queue(self, exchange: str = "amq.direct", vhost: str = "/", durable: bool = False) -> str:
        name = unique_name("q")
        self.broker.declare_queue(name, exchange, vhost=vhost, durable=durable)
        self.addCleanup(self.broker.delete_queue, name, vhost)
        return name

    async def proxy(self) -> _Proxy:
        proxy = _Proxy(self.broker.port)
        proxy.port = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(proxy.close)
        return proxy

    async def silent(self) -> _SilentServer:
        server = _SilentServer()
        server.port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(server.close)
        return server

    async def wait_for(self, condition: Any, what: str, seconds: float = 10.0) -> None:
        for _ in range(int(seconds / 0.02)):
            if condition():
                return
            await deferLater(reactor, 0.02, lambda: None)
        raise AssertionError(f"timed out waiting for {what}")


class DeliveryTests(_BrokerBase):
    def test_provides_irunner(self) -> None:
        """The amqp runner provides IRunner and starts idle."""
        runner = self.runner()
        assert verifyObject(IRunner, runner)
        assert runner.running == 0
        assert runner.connections == 0

    async def test_message_body_and_properties(self) -> None:
        """The message is the job id; the job succeeds on the broker's confirm.

        It is persistent, text/plain, has the job id as message id and the rule and
        attempt in its headers.
        """
        runner = self.runner()
        queue = self.queue()
        spec = AmqpSpec(self.broker.dsn(), "amq.direct", queue)
        outcome = await runner.run(_execution(spec, 'job ütf-8 "quoted"', attempt=3))
        assert _brief(outcome) == Outcome(True)
        [(body, props)] = self.broker.get_messages(queue)
        assert body == 'job ütf-8 "quoted"'.encode()
        assert props.content_type == "text/plain"
        assert props.delivery_mode == 2
        assert props.message_id == 'job ütf-8 "quoted"'
        assert props.headers == {"ztick-rule-id": "rule.1", "ztick-attempt": 3}
        assert runner.running == 0
        assert runner.connections == 1
        assert any("connected" in m for m in self.log.messages())

    async def test_json_format_transient_on_declared_exchange(self) -> None:
        """message_format json sends the rich document as application/json.

        With amqp_persistent off the message is transient; a declared topic exchange
        routes it.
        """
        runner = self.runner(message_format="json", persistent=False)
        exchange = unique_name("ex")
        self.broker.declare_exchange(exchange, "topic")
        queue = unique_name("q")
        self.broker.declare_queue(queue, exchange, routing_key="jobs.#")
        self.addCleanup(self.broker.delete_queue, queue)
        execution = _execution(AmqpSpec(self.broker.dsn(), exchange, "jobs.eu.1"), "job.j", 2)
        assert _brief(await runner.run(execution)) == Outcome(True)
        [(body, props)] = self.broker.get_messages(queue)
        assert body == rich_body(execution)
        assert json.loads(body) == {
            "job_id": "job.j",
            "execution": DUE_NS,
            "fired": DUE_NS + 7,
            "attempt": 2,
            "rule_id": "rule.1",
        }
        assert props.content_type == "application/json"
        assert props.delivery_mode == 1

    async def test_default_exchange_and_unroutable(self) -> None:
        """The default exchange "" routes by queue name.

        A message nothing is bound for is confirmed and dropped by the broker, and the
        job succeeds (as in ztick).
        """
        runner = self.runner()
        queue = self.queue()
        dsn = self.broker.dsn()
        assert (await runner.run(_execution(AmqpSpec(dsn, "", queue), "direct.1"))).success
        nowhere = AmqpSpec(dsn, "amq.direct", unique_name("nobody-listens"))
        assert _brief(await runner.run(_execution(nowhere, "dropped.1"))) == Outcome(True)
        assert [body for body, _ in self.broker.get_messages(queue)] == [b"direct.1"]

    async def test_vhost_and_user(self) -> None:
        """A DSN with its own user (URL-encoded password) and vhost publishes there."""
        vhost, user, password = unique_name("vh"), unique_name("u"), "p@ss/w:rd %"
        self.broker.add_user(user, password, vhost)
        queue = self.queue(vhost=vhost)
        runner = self.runner()
        dsn = self.broker.dsn(user, password, vhost)
        assert "%40" in dsn  # the @ of the password is encoded in the DSN
        assert (await runner.run(_execution(AmqpSpec(dsn, "amq.direct", queue)))).success
        assert [b for b, _ in self.broker.get_messages(queue, vhost=vhost)] == [b"job.1"]
        # The same user has no rights on another vhost: a clear, password-free reason.
        other = self.broker.dsn(user, password, "/")
        outcome = await runner.run(_execution(AmqpSpec(other, "amq.direct", queue)))
        assert _brief(outcome) == Outcome(
            False,
            f"amqp 127.0.0.1:{self.broker.port}/: access to vhost '/' refused for user {user!r}",
        )

    async def test_wrong_password_fails_fast_and_is_never_shown(self) -> None:
        """A wrong password fails with "authentication refused" naming host:port/vhost.

        The next job fails at once (back-off); the password is in no reason and no log
        line (ztick-tw's or pika's).
        """
        records = _PikaRecords()
        pika_logger = logging.getLogger("pika")
        old_level = pika_logger.level
        pika_logger.setLevel(logging.DEBUG)
        pika_logger.addHandler(records)
        self.addCleanup(pika_logger.setLevel, old_level)
        self.addCleanup(pika_logger.removeHandler, records)
        secret = "Wr0ng-pa55word-xyz"
        runner = self.runner()
        spec = AmqpSpec(self.broker.dsn("guest", secret), "amq.direct", "k")
        started = reactor.seconds()
        outcome = await runner.run(_execution(spec))
        assert reactor.seconds() - started < 8  # the refusal, not the 10 s timeout
        label = f"127.0.0.1:{self.broker.port}/"
        assert _brief(outcome) == Outcome(
            False, f"amqp {label}: authentication refused for user 'guest'"
        )
        again = runner.run(_execution(spec, "job.2"))
        assert again.called, "a job inside the back-off window fails at once"
        second = self.successResultOf(again)
        assert second.reason.startswith(f"amqp {label}: authentication refused for user 'guest'")
        assert "next connection attempt in" in second.reason
        texts = [outcome.reason, second.reason, *self.log.messages(), *records.lines]
        assert any("authentication refused" in t for t in self.log.messages())
        assert all(secret not in t for t in texts), [t for t in texts if secret in t]

    async def test_missing_exchange_fails_only_its_jobs(self) -> None:
        """Publishing to a missing exchange fails with the broker's 404.

        Jobs for a good exchange on the same DSN, sent at the same moment and later,
        succeed; the next job for the missing exchange fails the same way (its channel
        was reopened).
        """
        runner = self.runner()
        queue = self.queue()
        dsn = self.broker.dsn()
        missing = unique_name("no-such-exchange")
        good = [
            runner.run(_execution(AmqpSpec(dsn, "amq.direct", queue), f"ok.{i}"))
            for i in range(20)
        ]
        bad = runner.run(_execution(AmqpSpec(dsn, missing, queue), "bad.1"))
        outcomes = await gatherResults([*good, bad])
        assert [_brief(o) for o in outcomes[:20]] == [Outcome(True)] * 20
        assert _brief(outcomes[20]) == Outcome(
            False,
            f"amqp 127.0.0.1:{self.broker.port}/: channel closed by broker: 404 NOT_FOUND"
            f" - no exchange '{missing}' in vhost '/'",
        )
        answer = f"404 NOT_FOUND - no exchange '{missing}' in vhost '/'".encode()
        assert outcomes[20].output == answer
        assert {o.output for o in outcomes[:20]} == {b"confirmed"}
        later = await runner.run(_execution(AmqpSpec(dsn, "amq.direct", queue), "ok.later"))
        assert _brief(later) == Outcome(True)
        again = await runner.run(_execution(AmqpSpec(dsn, missing, queue), "bad.2"))
        assert "404 NOT_FOUND" in again.reason
        assert len(self.broker.get_messages(queue)) == 21
        assert runner.connections == 1

    async def test_broker_down_fails_fast_then_retries(self) -> None:
        """A closed port fails with "connection refused".

        Jobs inside the back-off window fail at once; after the window a new attempt is
        made (and the window doubles).
        """
        runner = self.runner()
        spec = AmqpSpec(f"amqp://127.0.0.1:{free_port()}/", "amq.direct", "k")
        first = await runner.run(_execution(spec))
        assert first.reason.endswith(": connection refused")
        during = runner.run(_execution(spec, "job.2"))
        assert during.called
        assert "(next connection attempt in 0.5s)" in self.successResultOf(during).reason
        await deferLater(reactor, 0.55, lambda: None)
        retried = await runner.run(_execution(spec, "job.3"))
        assert retried.reason.endswith(": connection refused")
        after = self.successResultOf(runner.run(_execution(spec, "job.4")))
        assert "(next connection attempt in 1.0s)" in after.reason

    async def test_tls(self) -> None:
        """amqps:// verifies the broker's certificate: with the test CA it delivers.

        With the system trust store it fails with a TLS reason.
        """
        queue = self.queue()
        dsn = self.broker.dsn(tls=True)
        assert dsn.startswith("amqps://") and "localhost" in dsn
        good = self.runner(ca_file=self.broker.ca_file)
        assert _brief(await good.run(_execution(AmqpSpec(dsn, "amq.direct", queue)))) == Outcome(
            True
        )
        assert [b for b, _ in self.broker.get_messages(queue)] == [b"job.1"]
        untrusting = self.runner()
        outcome = await untrusting.run(_execution(AmqpSpec(dsn, "amq.direct", queue)))
        assert outcome.reason.startswith(f"amqps localhost:{self.broker.tls_port}/: TLS")
        assert "certificate" in outcome.reason

    async def test_many_concurrent_jobs(self) -> None:
        """500 jobs at once are all confirmed and all 500 messages are in the queue.

        They queue while the connection opens and share that one connection.
        """
        runner = self.runner()
        queue = self.queue(durable=True)
        spec = AmqpSpec(self.broker.dsn(), "amq.direct", queue)
        pending = [runner.run(_execution(spec, f"many.{i}")) for i in range(500)]
        assert runner.running == 500
        outcomes = await gatherResults(pending)
        assert [_brief(o) for o in outcomes] == [Outcome(True)] * 500
        assert runner.running == 0
        assert runner.connections == 1
        assert sum("connected" in m for m in self.log.messages()) == 1
        bodies = sorted(body for body, _ in self.broker.get_messages(queue))
        assert bodies == sorted(f"many.{i}".encode() for i in range(500))

    async def test_publish_window(self) -> None:
        """With more jobs than the publish window, the rest wait and go out as confirms come back.

        None is lost or sent twice.
        """
        self.patch(amqp_connection, "PUBLISH_WINDOW", 7)  # type: ignore[no-untyped-call]
        runner = self.runner()
        queue = self.queue()
        spec = AmqpSpec(self.broker.dsn(), "amq.direct", queue)
        outcomes = await gatherResults([runner.run(_execution(spec, f"w.{i}")) for i in range(60)])
        assert [_brief(o) for o in outcomes] == [Outcome(True)] * 60
        bodies = [body for body, _ in self.broker.get_messages(queue)]
        assert bodies == [f"w.{i}".encode() for i in range(60)]  # and in order

    async def test_overlong_routing_key_fails_its_job(self) -> None:
        """A routing key AMQP cannot carry (over 255 bytes) fails that job only."""
        runner = self.runner()
        queue = self.queue()
        dsn = self.broker.dsn()
        bad = await runner.run(_execution(AmqpSpec(dsn, "amq.direct", "k" * 300), "long"))
        assert _brief(bad) == Outcome(
            False,
            f"amqp 127.0.0.1:{self.broker.port}/: cannot publish: exchange or routing key"
            " longer than 255 bytes",
        )
        good = await runner.run(_execution(AmqpSpec(dsn, "amq.direct", queue), "fine"))
        assert _brief(good) == Outcome(True)

    async def test_confirm_timeout(self) -> None:
        """A publish whose confirm does not come within timeout fails "timed out"."""
        proxy = await self.proxy()
        runner = self.runner(timeout=0.5)
        queue = self.queue()
        spec = AmqpSpec(f"amqp://127.0.0.1:{proxy.listen_port}/", "amq.direct", queue)
        assert (await runner.run(_execution(spec, "first"))).success
        proxy.hold = True
        outcome = await runner.run(_execution(spec, "held"))
        assert outcome == Outcome(
            False,
            f"amqp 127.0.0.1:{proxy.listen_port}/: timed out after 0.5s waiting for the"
            " broker's confirm",
            timed_out=True,
        )
        assert runner.running == 0
        await proxy.cut()  # the held replies would delay the clean close at cleanup

    async def test_own_timeout_and_cancel_give_a_publish_up(self) -> None:
        """A run's own timeout (over the default) and a cancel both give up a publish."""
        proxy = await self.proxy()
        runner = self.runner(timeout=30)
        queue = self.queue()
        spec = AmqpSpec(f"amqp://127.0.0.1:{proxy.listen_port}/", "amq.direct", queue)
        assert (await runner.run(_execution(spec, "first"))).output == b"confirmed"
        proxy.hold = True
        timed = await runner.run(_execution(spec, "held", timeout=0.3))
        assert timed.timed_out
        assert timed.reason.endswith("timed out after 0.3s waiting for the broker's confirm")
        run = runner.run(_execution(spec, "cancelled"))
        pending = list(runner._pending)
        await self.wait_for(lambda: all(job.published for job in pending), "the publish")
        run.cancel()
        assert run.called
        assert await run == Outcome(False, "cancelled", cancelled=True)
        assert runner.running == 0
        await proxy.cut()

    async def test_connect_timeout_against_silent_server(self) -> None:
        """A server that accepts TCP but never speaks AMQP times the job out."""
        server = await self.silent()
        assert server.port is not None
        port = server.port.getHost().port  # type: ignore[attr-defined]
        runner = self.runner(timeout=0.3)
        spec = AmqpSpec(f"amqp://127.0.0.1:{port}/", "amq.direct", "k")
        outcome = await runner.run(_execution(spec))
        assert outcome.reason == f"amqp 127.0.0.1:{port}/: timed out after 0.3s connecting"

    async def test_connection_lost_fails_unconfirmed_then_reconnects(self) -> None:
        """A dropped connection fails the unconfirmed publishes; the next job reconnects.

        Their reason is "connection lost; delivery not confirmed".
        """
        proxy = await self.proxy()
        runner = self.runner()
        queue = self.queue()
        spec = AmqpSpec(f"amqp://127.0.0.1:{proxy.listen_port}/", "amq.direct", queue)
        assert (await runner.run(_execution(spec, "before"))).success
        proxy.hold = True
        unconfirmed = [runner.run(_execution(spec, f"lost.{i}")) for i in range(5)]
        await self.wait_for(lambda: proxy.held, "the broker's confirms")
        await proxy.cut()
        outcomes = await gatherResults(unconfirmed)
        expected = f"amqp 127.0.0.1:{proxy.listen_port}/: connection lost; delivery not confirmed"
        assert [_brief(o) for o in outcomes] == [Outcome(False, expected)] * 5
        assert any("connection lost" in m for m in self.log.messages())
        proxy.hold = False
        assert _brief(await runner.run(_execution(spec, "after"))) == Outcome(True)
        assert runner.connections == 1

    async def test_stop_waits_for_confirms_within_grace(self) -> None:
        """stop(grace) lets unconfirmed deliveries finish.

        run() afterwards fails with "runner stopped"; the connection is closed cleanly.
        """
        runner = self.runner()
        queue = self.queue()
        spec = AmqpSpec(self.broker.dsn(), "amq.direct", queue)
        closing = "closing AMQP connection"
        closed_before = self.broker.log_text().count(closing)
        pending = [runner.run(_execution(spec, f"s.{i}")) for i in range(100)]
        await runner.stop(10)
        assert all(d.called for d in pending)
        assert [_brief(o) for o in [self.successResultOf(d) for d in pending]] == [
            Outcome(True)
        ] * 100
        assert runner.connections == 0
        after = self.successResultOf(runner.run(_execution(spec, "late")))
        assert _brief(after) == Outcome(False, "runner stopped")
        assert len(self.broker.get_messages(queue)) == 100
        # The broker logs a clean AMQP close (not "client unexpectedly closed TCP").
        await self.wait_for(
            lambda: self.broker.log_text().count(closing) > closed_before + 1,
            "the broker to log the runner's clean close (and the helper's)",
        )

    async def test_stop_interrupts_unconfirmed(self) -> None:
        """Deliveries still unconfirmed when grace ends fail as interrupted.

        Their reason is "stopped at shutdown", and stop() fires.
        """
        proxy = await self.proxy()
        runner = self.runner()
        spec = AmqpSpec(f"amqp://127.0.0.1:{proxy.listen_port}/", "amq.direct", "k")
        assert (await runner.run(_execution(spec, "first"))).success
        proxy.hold = True
        pending = [runner.run(_execution(spec, f"p.{i}")) for i in range(3)]
        await self.wait_for(lambda: proxy.held, "the broker's confirms")
        started = reactor.seconds()
        stopping = runner.stop(0.2)
        outcomes = await gatherResults(pending)
        assert [_brief(o) for o in outcomes] == [
            Outcome(False, "stopped at shutdown", interrupted=True)
        ] * 3
        await proxy.cut()  # the held close-ok never comes: the runner aborts, or we cut
        await stopping
        assert reactor.seconds() - started < 6
        assert runner.running == 0


class RestartTests(_BrokerBase):
    async def test_broker_restart(self) -> None:
        """After the broker restarts, the same runner reconnects for the next job.

        A persistent message in a durable queue survives the restart.
        """
        runner = self.runner()
        queue = self.queue(durable=True)
        spec = AmqpSpec(self.broker.dsn(), "amq.direct", queue)
        assert _brief(await runner.run(_execution(spec, "before"))) == Outcome(True)
        await threads.deferToThread(self.broker.restart)
        await self.wait_for(lambda: runner.connections == 0, "the runner to see the close")
        lost = [m for m in self.log.messages() if "connection lost" in m]
        assert lost and "320 CONNECTION_FORCED" in lost[0], lost  # the broker's own reason
        assert _brief(await runner.run(_execution(spec, "after"))) == Outcome(True)
        assert runner.connections == 1
        bodies = [body for body, _ in self.broker.get_messages(queue)]
        assert bodies == [b"before", b"after"]
