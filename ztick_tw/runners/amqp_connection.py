r"""The amqp runner's connections: one ``_Endpoint`` per DSN, its publishing channels.

An ``_Endpoint`` connects (with the back-off), opens confirm-mode ``_Channel``\ s on
demand, publishes each ``_Job`` with at most ``PUBLISH_WINDOW`` waiting for a confirm
per channel, and ends jobs through its runner (``RunnerHooks``: ``finish``, ``log``,
the message ``properties`` and the ``trust_root``).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import typing
from typing import Any, Literal, cast

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
from twisted.internet import error as twisted_error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    optionsForClientTLS,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from ztick_tw.model import AmqpSpec
from ztick_tw.runners.amqp_target import (
    _LOST,
    CLOSE_TIMEOUT,
    CONFIRMED,
    HEARTBEAT,
    PUBLISH_WINDOW,
    AmqpTarget,
    ReactorLike,
    _broker_answer,
    _connect_reason,
    _delivery_reason,
    _PikaProtocol,
)
from ztick_tw.runners.backoff import Backoff
from ztick_tw.runners.base import (
    Execution,
    Outcome,
    cancelled_outcome,
)
from ztick_tw.runners.message import NetworkOptions, queue_message

# --------------------------------------------------------------------------------- jobs


class RunnerHooks(typing.Protocol):
    """What an endpoint and its channels use of their runner (``AmqpRunner``)."""

    options: NetworkOptions
    reactor: ReactorLike

    @property
    def log(self) -> Logger:
        """Where the runner logs."""

    def properties(self, execution: Execution) -> pika.BasicProperties:
        """The message properties of one execution."""

    def trust_root(self) -> Any:
        """The certificates ``amqps://`` brokers must chain to."""

    def finish(self, job: _Job, outcome: Outcome) -> None:
        """End ``job`` with ``outcome`` (the first outcome wins)."""


class _Job:
    """One execution on its way to the broker (``timeout`` 0: no limit)."""

    __slots__ = (
        "deadline",
        "deferred",
        "done",
        "execution",
        "published",
        "runner",
        "spec",
        "started",
        "timeout",
    )

    def __init__(
        self,
        runner: RunnerHooks,
        execution: Execution,
        spec: AmqpSpec,
        started: float,
        timeout: float,
    ) -> None:
        self.runner = runner
        self.execution = execution
        self.spec = spec
        self.started = started
        self.timeout = timeout
        self.deadline = started + timeout if timeout > 0 else float("inf")
        self.deferred: Deferred[Outcome] = Deferred(self._cancel)
        self.done = False
        self.published = False

    def _cancel(self, deferred: Deferred[Outcome]) -> None:
        """Give the delivery up: dropped if not published yet, its confirm ignored if it is."""
        self.runner.finish(self, cancelled_outcome())


#: Tie-breaker of equal deadlines in the heap (jobs do not compare).
_order = itertools.count()


class _Channel:
    """One confirm-mode channel of an endpoint's connection, for one exchange."""

    def __init__(self, endpoint: _Endpoint, exchange: str) -> None:
        self.endpoint = endpoint
        self.exchange = exchange
        self.state: Literal["opening", "open", "closed"] = "opening"
        self.channel: Any = None  # TwistedChannel once open
        self.queue: collections.deque[_Job] = collections.deque()
        self.outstanding = 0

    def open(self, protocol: _PikaProtocol) -> None:
        try:
            d: Deferred[Any] = protocol.channel()
        except Exception as e:  # e.g. NoFreeChannels, raised before any Deferred exists
            self._open_error(e)
            return
        d.addCallback(self._got_channel)
        d.addErrback(self._open_failed)

    def _got_channel(self, channel: Any) -> Deferred[Any] | None:
        if self.state == "closed":  # the endpoint gave up on us meanwhile
            if channel.is_open:
                with contextlib.suppress(pika.exceptions.AMQPError):  # closing anyway
                    channel.close()
            return None
        self.channel = channel
        channel.on_closed.addCallback(self._closed)
        d: Deferred[Any] = channel.confirm_delivery()
        d.addCallback(self._confirming)
        return d

    def _confirming(self, _frame: object) -> None:
        if self.state != "opening":
            return
        self.state = "open"
        self.pump()

    def _open_failed(self, failure: Failure) -> None:
        error = failure.value
        self._open_error(error if error is not None else RuntimeError("channel open failed"))

    def _open_error(self, error: BaseException) -> None:
        if self.state == "closed":
            return
        if self.endpoint.connection_down():
            self.endpoint.channel_gone(self, None)  # the queue goes to the next connection
            return
        self.endpoint.channel_gone(self, f"cannot open a channel: {_delivery_reason(error)}")

    def _closed(self, reason: object) -> None:
        if self.state == "closed":
            return
        if self.endpoint.connection_down():
            self.endpoint.channel_gone(self, None)  # the queue goes to the next connection
            return
        text = _delivery_reason(reason) if isinstance(reason, BaseException) else "channel closed"
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            self.endpoint.runner.log.warn(
                "{scheme} {endpoint}: the broker closed the channel for exchange"
                " {exchange!r}: {code} {text}",
                scheme=self.endpoint.target.scheme,
                endpoint=self.endpoint.target.label,
                exchange=self.exchange,
                code=reason.reply_code,
                text=reason.reply_text,
            )
        self.endpoint.channel_gone(self, text)

    def submit(self, job: _Job) -> None:
        self.queue.append(job)
        if self.state == "open":
            self.pump()

    def pump(self) -> None:
        """Publish queued jobs while the channel is open and the window has room."""
        channel = self.channel
        while (
            self.queue
            and self.state == "open"
            and channel is not None
            and channel.is_open
            and self.outstanding < PUBLISH_WINDOW
        ):
            job = self.queue.popleft()
            if not job.done:
                self._publish(channel, job)

    def _publish(self, channel: Any, job: _Job) -> None:
        runner = self.endpoint.runner
        spec = job.spec
        execution = job.execution
        try:
            d: Deferred[Any] = channel.basic_publish(
                spec.exchange,
                spec.routing_key,
                queue_message(execution, runner.options.message_format),
                runner.properties(execution),
            )
        except pika.exceptions.ShortStringTooLong:
            reason = "cannot publish: exchange or routing key longer than 255 bytes"
            runner.finish(job, Outcome(False, self.endpoint.reason(reason)))
            return
        except pika.exceptions.AMQPError as e:  # e.g. a channel closing meanwhile
            runner.finish(job, Outcome(False, self.endpoint.reason(_delivery_reason(e))))
            return
        except Exception as e:  # a bug or an unforeseen value: that job fails, no errback
            reason = f"cannot publish: {e.__class__.__name__}: {e}"
            runner.finish(job, Outcome(False, self.endpoint.reason(reason)))
            return
        job.published = True
        self.outstanding += 1
        d.addCallbacks(self._confirmed, self._refused, callbackArgs=(job,), errbackArgs=(job,))

    def _confirmed(self, _frame: object, job: _Job) -> None:
        self.outstanding -= 1
        self.endpoint.runner.finish(job, Outcome(True, output=CONFIRMED))
        self.pump()

    def _refused(self, failure: Failure, job: _Job) -> None:
        self.outstanding -= 1
        error = failure.value if failure.value is not None else RuntimeError("unknown")
        if isinstance(error, pika.exceptions.UnroutableError):
            # Confirmed, and dropped by the broker as in ztick.
            outcome = Outcome(True, output=CONFIRMED)
        elif self.endpoint.connection_down():
            outcome = Outcome(False, self.endpoint.reason(_LOST))
        else:
            reason = self.endpoint.reason(_delivery_reason(error))
            outcome = Outcome(False, reason, output=_broker_answer(error))
        self.endpoint.runner.finish(job, outcome)
        self.pump()


class _Endpoint:
    """The connection (and its channels) to one DSN."""

    def __init__(self, runner: RunnerHooks, target: AmqpTarget) -> None:
        self.runner = runner
        self.target = target
        self.state: Literal["idle", "connecting", "open", "closing"] = "idle"
        self.protocol: _PikaProtocol | None = None
        self.waiting: collections.deque[_Job] = collections.deque()
        self.channels: dict[str, _Channel] = {}
        self.backoff = Backoff()
        self.last_error = ""
        self._connecting: Deferred[Any] | None = None
        self._connect_timer: IDelayedCall | None = None
        self._timed_out = False
        self.closed: Deferred[None] | None = None  # fires when a stop-time close is over

    def reason(self, text: str) -> str:
        return f"{self.target.scheme} {self.target.label}: {text}"

    def connection_down(self) -> bool:
        """True when the connection is gone or going (its channels close with it)."""
        protocol = self.protocol
        return self.state != "open" or protocol is None or bool(protocol.is_closed)

    # -- jobs ------------------------------------------------------------------------

    def submit(self, job: _Job) -> None:
        if self.state == "open":
            self._channel_for(job.spec.exchange).submit(job)
            return
        if self.state == "connecting":
            self.waiting.append(job)
            return
        if self.state == "closing":
            self.runner.finish(job, Outcome(False, "runner stopped"))
            return
        remaining = self.backoff.remaining(self.runner.reactor.seconds())
        if remaining > 0:
            self.runner.finish(
                job,
                Outcome(
                    False,
                    self.reason(
                        f"{self.last_error} (next connection attempt in {remaining:.1f}s)"
                    ),
                ),
            )
            return
        self.waiting.append(job)
        self._connect()

    def _channel_for(self, exchange: str) -> _Channel:
        channel = self.channels.get(exchange)
        if channel is None:
            channel = self.channels[exchange] = _Channel(self, exchange)
            assert self.protocol is not None
            channel.open(self.protocol)
        return channel

    def channel_gone(self, channel: _Channel, reason: str | None) -> None:
        """``channel`` closed: fail its queued jobs with ``reason``.

        With ``reason=None`` (the whole connection went) they are handed back to be
        sent on the next connection instead.
        """
        if channel.state == "closed":
            return
        channel.state = "closed"
        if self.channels.get(channel.exchange) is channel:
            del self.channels[channel.exchange]
        queued, channel.queue = channel.queue, collections.deque()
        if reason is None:
            self.waiting.extend(j for j in queued if not j.done)
            return
        for job in queued:
            self.runner.finish(job, Outcome(False, self.reason(reason)))

    # -- connecting ------------------------------------------------------------------

    def _parameters(self) -> pika.ConnectionParameters:
        options = self.runner.options
        return pika.ConnectionParameters(
            host=self.target.host,
            port=self.target.port,
            virtual_host=self.target.vhost,
            credentials=pika.PlainCredentials(self.target.user, self.target.password),
            connection_attempts=1,
            heartbeat=HEARTBEAT,
            blocked_connection_timeout=max(options.timeout, 1.0),
            client_properties={"connection_name": "ztick-tw", "product": "ztick-tw"},
        )

    def _endpoint(self) -> IStreamClientEndpoint:
        reactor = self.runner.reactor
        timeout = self.runner.options.timeout
        host, port = self.target.host, self.target.port
        tcp: IStreamClientEndpoint
        if isIPAddress(host):
            tcp = TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
        elif isIPv6Address(host):
            tcp = TCP6ClientEndpoint(reactor, host, port, timeout=timeout)  # type: ignore[no-untyped-call]
        else:
            tcp = HostnameEndpoint(reactor, host, port, timeout=timeout)
        if not self.target.tls:
            return tcp
        tls = optionsForClientTLS(self.target.host, trustRoot=self.runner.trust_root())
        return wrapClientTLS(tls, tcp)

    def _connect(self) -> None:
        self.state = "connecting"
        self._timed_out = False
        self.protocol = None
        runner = self.runner
        parameters = self._parameters()
        reactor = runner.reactor

        def build() -> Protocol:
            protocol = _PikaProtocol(parameters, reactor)
            self.protocol = protocol
            return protocol

        self._connect_timer = reactor.callLater(runner.options.timeout, self._connect_timeout)
        try:
            factory = Factory.forProtocol(build)
            factory.noisy = False
            d = self._endpoint().connect(factory)
        except Exception as e:  # e.g. an unreadable CA file
            self._connect_error(e)
            return
        self._connecting = d

        def ready(protocol: IProtocol) -> Deferred[Any]:
            ready: Deferred[Any] = cast(_PikaProtocol, protocol).ready
            return ready

        d.addCallback(ready).addCallbacks(self._connected, self._connect_failed)

    def _connect_timeout(self) -> None:
        self._connect_timer = None
        if self.state != "connecting":
            return
        self._timed_out = True
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()
        elif self._connecting is not None:
            self._connecting.cancel()

    def _cancel_connect_timer(self) -> None:
        timer, self._connect_timer = self._connect_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _connected(self, _: object) -> None:
        self._connecting = None
        self._cancel_connect_timer()
        protocol = self.protocol
        assert protocol is not None
        if self.state == "closing":  # stop() came while we were connecting
            self._close_protocol(protocol)
            return
        self.state = "open"
        self.backoff.succeeded()
        self.last_error = ""
        protocol.closed.addCallback(self._lost, protocol)
        self.runner.log.info(
            "{scheme} {endpoint}: connected", scheme=self.target.scheme, endpoint=self.target.label
        )
        self._flush_waiting()

    def _flush_waiting(self) -> None:
        waiting, self.waiting = self.waiting, collections.deque()
        for job in waiting:
            if not job.done:
                self._channel_for(job.spec.exchange).submit(job)

    def _connect_failed(self, failure: Failure) -> None:
        self._connect_error(failure.value)

    def _connect_error(self, error: BaseException | None) -> None:
        self._connecting = None
        self._cancel_connect_timer()
        protocol, self.protocol = self.protocol, None
        if self.state == "closing":
            self._closed_for_stop()
            return
        if protocol is not None:
            error = protocol.close_reason or protocol.open_error or error
        if self._timed_out:
            reason = f"connection timed out after {self.runner.options.timeout:g}s"
        elif isinstance(error, twisted_error.ConnectingCancelledError):
            reason = "connection attempt cancelled"
        else:
            reason = _connect_reason(error, self.target)
        self.state = "idle"
        self.last_error = reason
        delay = self.backoff.failed(self.runner.reactor.seconds())
        self.runner.log.warn(
            "{scheme} {endpoint}: cannot connect: {reason}; no new attempt for {delay:g}s",
            scheme=self.target.scheme,
            endpoint=self.target.label,
            reason=reason,
            delay=delay,
        )
        waiting, self.waiting = self.waiting, collections.deque()
        for job in waiting:
            self.runner.finish(job, Outcome(False, self.reason(reason)))
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()

    def _lost(self, error: object, protocol: _PikaProtocol) -> None:
        """The open connection closed (broker restart, network, heartbeat, our stop)."""
        if protocol is not self.protocol:
            return
        self.protocol = None
        for channel in list(self.channels.values()):
            self.channel_gone(channel, None)
        self.channels.clear()
        if self.state == "closing":
            return  # stop() closed it; _close_protocol's callback reports the end
        self.state = "idle"
        error = protocol.close_reason or error
        if isinstance(error, pika.exceptions.ConnectionClosedByBroker):
            why = f"{error.reply_code} {error.reply_text}"
        elif isinstance(error, pika.exceptions.ConnectionBlockedTimeout):
            why = "the broker blocked publishing for too long"
        elif isinstance(error, BaseException):
            why = error.__class__.__name__
        else:
            why = "closed"
        self.runner.log.warn(
            "{scheme} {endpoint}: connection lost: {why}",
            scheme=self.target.scheme,
            endpoint=self.target.label,
            why=why,
        )
        if any(not job.done for job in self.waiting):
            self._connect()  # queued jobs were never published: send them on a new one
        else:
            self.waiting.clear()

    # -- stopping --------------------------------------------------------------------

    def close(self) -> Deferred[None]:
        """Close the connection cleanly (aborting one still connecting); fire when done."""
        state, self.state = self.state, "closing"
        self.closed = Deferred()
        closed = self.closed
        if state == "open" and self.protocol is not None:
            self._close_protocol(self.protocol)
        elif state == "connecting":
            self._cancel_connect_timer()
            protocol = self.protocol
            if protocol is not None and protocol.transport is not None:
                protocol.transport.abortConnection()
            elif self._connecting is not None:
                self._connecting.cancel()
        else:
            self._closed_for_stop()
        return closed

    def _close_protocol(self, protocol: _PikaProtocol) -> None:
        for channel in self.channels.values():
            channel.state = "closed"
        reactor = self.runner.reactor

        def abort() -> None:
            if protocol.transport is not None:
                protocol.transport.abortConnection()

        timer = reactor.callLater(CLOSE_TIMEOUT, abort)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()
            self.protocol = None
            self._closed_for_stop()

        closed = protocol.closed
        if closed is None or protocol.is_closed:
            done(None)
            return
        closed.addBoth(done)
        try:
            protocol.close()
        except pika.exceptions.ConnectionWrongStateError:
            abort()

    def _closed_for_stop(self) -> None:
        d, self.closed = self.closed, None
        if d is not None:
            d.callback(None)
