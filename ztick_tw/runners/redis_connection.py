"""The redis runner's connections: one ``_Target`` per rule URL, its jobs in order.

A ``_Target`` opens and sets up (``AUTH``/``SELECT``) the one pipelined connection of its
URL (``_TargetFactory``, ``_TargetProtocol``), queues and sends each ``_Job``, matches
replies to jobs in order, watches their deadlines with one timer, and backs off after a
failed connect.  It ends jobs, counts and logs through its runner (``RedisRunner``); what
it uses of it is ``RunnerHooks``.
"""

from __future__ import annotations

import contextlib
import typing
from collections import deque

from twisted.internet import error as neterror
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IReactorTCP,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from ztick_tw.runners.backoff import Backoff
from ztick_tw.runners.base import (
    Execution,
    Outcome,
    cancelled_outcome,
    timeout_reason,
)
from ztick_tw.runners.deadlines import Deadlines
from ztick_tw.runners.message import redact_url
from ztick_tw.runners.resp import (
    RedisEndpoint,
    RedisError,
    Reply,
    RespParser,
    RespProtocolError,
    abort_transport,
    render_reply,
)

_EPSILON = 1e-9  # float slack when comparing a deadline with the reactor's clock


class RunnerHooks(typing.Protocol):
    """What a target, its connection and its jobs use of their runner (``RedisRunner``)."""

    @property
    def log(self) -> Logger:
        """Where the runner logs."""

    _reactor: IReactorTCP
    _clock: IReactorTime
    _connect_timeout: float
    _inflight: int  # jobs in flight: a target counts each one it takes
    _closing: bool  # the runner is closing: a connection that comes up is dropped
    _live: set[_TargetProtocol]  # connections not yet closed
    connect_attempts: int

    def _finish(self, job: _Job, outcome: Outcome) -> None:
        """End ``job`` with ``outcome`` (the first outcome wins)."""

    def _maybe_closed(self) -> None:
        """A connection closed: the runner's ``stop`` may be done."""


class _Job:
    """One execution on its way to a redis server.

    ``done`` once its Deferred fired: a job sent and then cancelled stays in its target's
    pipeline (the reply still comes) but is done; ``timeout`` is 0 for no limit.
    """

    __slots__ = (
        "command",
        "deadline",
        "deferred",
        "done",
        "execution",
        "key",
        "payload",
        "target",
        "timeout",
    )

    def __init__(
        self,
        target: _Target,
        execution: Execution,
        command: str,
        key: str,
        payload: bytes,
        timeout: float,
        now: float,
    ) -> None:
        self.target = target
        self.execution = execution
        self.command = command
        self.key = key
        self.payload = payload
        self.timeout = timeout
        self.deadline = now + timeout if timeout > 0 else _NEVER
        self.done = False
        self.deferred: Deferred[Outcome] = Deferred(self._cancel)

    def _cancel(self, deferred: Deferred[Outcome]) -> None:
        self.target.cancel(self)


_NEVER = float("inf")


class _TargetProtocol(Protocol):
    """The runner's connection to one URL: writes jobs, hands replies to its target."""

    def __init__(self, target: _Target, factory: _TargetFactory) -> None:
        self.target = target
        self.factory = factory
        self.attached = True  # False once the target has let go of this connection
        self.parser = RespParser()

    def connectionMade(self) -> None:
        self.target.runner._live.add(self)
        if ITCPTransport.providedBy(self.transport):
            tcp = ITCPTransport(self.transport)
            tcp.setTcpNoDelay(True)
            tcp.setTcpKeepAlive(True)
        self.target.connected(self)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def abort(self) -> None:
        """Let go of this connection and close it without flushing."""
        self.attached = False
        abort_transport(self.transport)

    def dataReceived(self, data: bytes) -> None:
        if not self.attached:
            return
        try:
            replies = self.parser.feed(data)
        except RespProtocolError as e:
            self.target.protocol_error(self, str(e))
            return
        target = self.target
        for reply in replies:
            if not self.attached:
                return
            target.reply(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        runner = self.target.runner
        runner._live.discard(self)
        if self.attached:
            self.attached = False
            self.target.lost(self, reason)
        runner._maybe_closed()


class _TargetFactory(ClientFactory):
    """One connection attempt to one target (a new factory per attempt)."""

    noisy = False

    def __init__(self, target: _Target) -> None:
        self.target = target

    def buildProtocol(self, addr: IAddress | None) -> _TargetProtocol:
        return _TargetProtocol(self.target, self)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        value = reason.value
        self.target.connect_failed(self, value if value is not None else Exception("failed"))


def _describe_connect_error(e: BaseException) -> str:
    if isinstance(e, neterror.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, neterror.TimeoutError | neterror.TCPTimedOutError):
        return "connect timed out"
    if isinstance(e, neterror.DNSLookupError):
        return "cannot resolve host"
    if isinstance(e, neterror.NoRouteError):
        return "no route to host"
    if isinstance(e, neterror.ConnectError) and e.osError:
        text = str(e.osError)
    else:
        text = str(e) or type(e).__name__
    text = text.strip().rstrip(".")
    return text[:1].lower() + text[1:]


class _Target:
    """Everything about one rule URL: its connection, its jobs in order, its back-off.

    ``jobs`` holds the target's jobs in the order they started: until the connection is
    set up (``writer`` is set) none is sent; after that all of them are, and the head is
    the one the next reply answers.  Jobs ended meanwhile (timed out while connecting,
    cancelled) stay in it, done, until it is sent (unsent ones are left out then) or their
    reply comes.  One timer, armed for the earliest deadline (a heap: runs may have their
    own timeouts), watches them all.
    """

    def __init__(self, runner: RunnerHooks, url: str, endpoint: RedisEndpoint) -> None:
        self.runner = runner
        self.url = url
        self.endpoint = endpoint
        self.label = endpoint.label
        self.jobs: deque[_Job] = deque()
        self.protocol: _TargetProtocol | None = None  # connected (maybe still in setup)
        self.writer: _TargetProtocol | None = None  # the protocol once setup is done
        self.factory: _TargetFactory | None = None  # the attempt in progress
        self.connector: IConnector | None = None
        self.setup: deque[str] = deque()  # handshake replies still expected
        self.timer: IDelayedCall | None = None
        self.timer_at = _NEVER  # when the timer fires
        self.deadlines: Deadlines[_Job] = Deadlines()  # the jobs' deadlines
        self.backoff = Backoff()  # after failed connects, new jobs fail at once for a while
        self.last_error = ""

    # -- jobs ------------------------------------------------------------------------------

    def submit(self, job: _Job) -> str | None:
        """Queue ``job`` (sending it if connected); a reason when it must fail at once."""
        runner = self.runner
        writer = self.writer
        if writer is not None:
            writer.write(job.payload)
        elif self.factory is None and self.protocol is None:
            if self.backoff.remaining(runner._clock.seconds()) > 0:
                return f"redis {self.label}: unavailable (last connect attempt: {self.last_error})"
            runner._inflight += 1
            self.jobs.append(job)
            self._watch(job)
            self._connect()
            return None
        runner._inflight += 1
        self.jobs.append(job)
        self._watch(job)
        return None

    def cancel(self, job: _Job) -> None:
        """``job``'s Deferred was cancelled: it ends now, cancelled.

        Not sent yet, it is left out when the queue is sent; sent, its reply is ignored.
        """
        self.runner.log.debug(
            "redis {endpoint}: job {job_id} cancelled ({state})",
            endpoint=self.label,
            job_id=job.execution.job_id,
            state="reply ignored" if self.writer is not None else "not sent",
        )
        self.runner._finish(job, cancelled_outcome())

    def reply(self, value: Reply) -> None:
        """The next reply on the connection: a handshake step's or the head job's."""
        if self.setup:
            step = self.setup.popleft()
            if isinstance(value, RedisError):
                why = f"{step} refused: {value.message}"
                self._drop(f"redis {self.label}: {why}", backoff=why)
            elif not self.setup:
                self._ready()
            return
        if not self.jobs:
            why = "protocol error: a reply nobody asked for"
            self._drop(f"redis {self.label}: {why}", backoff=why)
            return
        job = self.jobs.popleft()
        if job.done:
            return  # cancelled after it was sent: the reply is dropped
        if isinstance(value, RedisError):
            outcome = Outcome(
                False,
                f"redis {self.label}: {job.command} {job.key}: {value.message}",
                output=render_reply(value),
            )
        else:
            outcome = Outcome(True, output=render_reply(value))
        self.runner._finish(job, outcome)

    def _watch(self, job: _Job) -> None:
        """Watch ``job``'s deadline (the timer is moved up if it is the earliest)."""
        deadline = job.deadline
        if deadline == _NEVER:
            return
        self.deadlines.push(deadline, job)
        if deadline < self.timer_at:
            self._arm()

    def _arm(self) -> None:
        """Arm the timer for the earliest deadline of a job not done (or none)."""
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        self.timer_at = _NEVER
        earliest = self.deadlines.earliest()
        if earliest is not None:
            clock = self.runner._clock
            self.timer_at = earliest
            self.timer = clock.callLater(max(0.0, self.timer_at - clock.seconds()), self._expire)

    def _expire(self) -> None:
        self.timer = None
        self.timer_at = _NEVER
        now = self.runner._clock.seconds() + _EPSILON
        expired = self.deadlines.pop_expired(now)
        if not expired:
            self._arm()
            return
        finish = self.runner._finish
        label = self.label
        if self.protocol is not None:
            # Replies are matched in order: a late one would answer the wrong job.
            timeout = max(job.timeout for job in expired)
            self.runner.log.warn(
                "redis {endpoint}: no reply within {timeout:g}s; dropping the connection"
                " and failing its {count} job(s)",
                endpoint=label,
                timeout=timeout,
                count=sum(not job.done for job in self.jobs),
            )
            reason = f"redis {label}: connection dropped: no reply within {timeout:g}s"
            self._drop(reason, expired_at=now)
            return
        for job in expired:  # they stay in self.jobs, done: left out when it is sent
            after = timeout_reason(job.timeout)
            finish(job, Outcome(False, f"redis {label}: {after} connecting", timed_out=True))
        self._arm()

    def fail_all(self, outcome: Outcome, expired_at: float | None = None) -> None:
        """End every job of this target with ``outcome``.

        With ``expired_at``, those whose deadline is at or before it time out instead.
        """
        jobs, self.jobs = self.jobs, deque()
        self.deadlines.clear()
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        self.timer_at = _NEVER
        finish = self.runner._finish
        for job in jobs:
            if expired_at is not None and job.deadline <= expired_at and not job.done:
                after = timeout_reason(job.timeout)
                reason = f"redis {self.label}: {after} waiting for a reply"
                finish(job, Outcome(False, reason, timed_out=True))
            else:
                finish(job, outcome)

    # -- connection ------------------------------------------------------------------------

    def _connect(self) -> None:
        runner = self.runner
        factory = _TargetFactory(self)
        self.factory = factory
        runner.connect_attempts += 1
        try:
            self.connector = runner._reactor.connectTCP(
                self.endpoint.host, self.endpoint.port, factory, timeout=runner._connect_timeout
            )
        except Exception as e:  # e.g. a host name the reactor cannot even try
            self.connect_failed(factory, e)

    def connected(self, protocol: _TargetProtocol) -> None:
        """The TCP connection is up: send the handshake, or the queued jobs if there is none.

        Jobs wait for the handshake's replies: after a refused ``AUTH`` the connection
        would still run them as the default user, after a refused ``SELECT`` in db 0.
        """
        if protocol.factory is not self.factory or self.runner._closing:
            protocol.abort()
            return
        self.protocol = protocol
        self.factory = None
        self.connector = None
        steps = self.endpoint.handshake()
        if steps:
            self.setup = deque(name for name, _ in steps)
            protocol.write(b"".join(payload for _, payload in steps))
        else:
            self._ready()

    def _ready(self) -> None:
        """Setup is done: send every queued job in one write; later jobs go straight out."""
        protocol = self.writer = self.protocol
        assert protocol is not None
        if self.jobs:
            self.jobs = deque(job for job in self.jobs if not job.done)
            protocol.write(b"".join(job.payload for job in self.jobs))
        level = self.runner.log.info if self.backoff.failures else self.runner.log.debug
        level(
            "redis {endpoint}: connected ({url})",
            endpoint=self.label,
            url=redact_url(self.url),
        )
        self.backoff.succeeded()
        self.last_error = ""

    def connect_failed(self, factory: _TargetFactory, reason: BaseException) -> None:
        """The connection attempt ``factory`` failed: back off and fail its jobs."""
        if factory is not self.factory:
            return  # an attempt we gave up on already
        self.factory = None
        self.connector = None
        why = _describe_connect_error(reason)
        self._start_backoff(why)
        self.fail_all(Outcome(False, f"redis {self.label}: {why}"))

    def lost(self, protocol: _TargetProtocol, reason: Failure) -> None:
        """The connection closed under us (server restart, idle close, network)."""
        if protocol is not self.protocol:
            return
        in_setup = bool(self.setup)
        self.protocol = self.writer = None
        self.setup.clear()
        count = sum(not job.done for job in self.jobs)
        if in_setup:
            self._start_backoff("connection lost during setup")
        if count:
            self.runner.log.warn(
                "redis {endpoint}: connection lost with {count} job(s) in flight",
                endpoint=self.label,
                count=count,
            )
        else:
            self.runner.log.info("redis {endpoint}: connection closed", endpoint=self.label)
        self.fail_all(Outcome(False, f"redis {self.label}: connection lost"))

    def protocol_error(self, protocol: _TargetProtocol, why: str) -> None:
        """The server sent something that is not RESP2."""
        if protocol is self.protocol:
            self._drop(f"redis {self.label}: protocol error: {why}", backoff="protocol error")
        else:
            protocol.abort()

    def _drop(
        self, reason: str, backoff: str | None = None, expired_at: float | None = None
    ) -> None:
        """Close the connection and fail every job on it with ``reason`` (see fail_all)."""
        protocol = self.protocol
        self.protocol = self.writer = None
        self.setup.clear()
        if protocol is not None:
            protocol.abort()
        if backoff is not None:
            self._start_backoff(backoff)
        self.fail_all(Outcome(False, reason), expired_at)

    def _start_backoff(self, why: str) -> None:
        window = self.backoff.failed(self.runner._clock.seconds())
        self.last_error = why
        self.runner.log.warn(
            "redis {endpoint}: {why}; jobs for it fail at once for {backoff:g}s ({url})",
            endpoint=self.label,
            why=why,
            backoff=window,
            url=redact_url(self.url),
        )

    def close(self) -> None:
        """Stop connecting, close the connection, cancel the timer (the runner stops)."""
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None
        self.timer_at = _NEVER
        self.factory = None
        connector, self.connector = self.connector, None
        if connector is not None:
            with contextlib.suppress(neterror.NotConnectingError):
                connector.stopConnecting()
        protocol, self.protocol, self.writer = self.protocol, None, None
        if protocol is not None:
            protocol.abort()
