"""The ``amqp`` runner: publish one message per job to an AMQP 0-9-1 broker (RabbitMQ).

``amqp <dsn> <exchange> <routing_key>`` publishes the job's message (the job id, or the
``json`` document of :func:`~ztick_tw.runners.message.rich_body`) to ``exchange`` with
``routing_key``.  A job succeeds only when the broker *confirms* the message (RabbitMQ
publisher confirms): a nack, a channel error such as a missing exchange, a lost
connection or no confirm within ``timeout`` fails it.  As in ztick, ``mandatory`` is off:
a message no queue is bound for is confirmed and dropped by the broker, and the job
succeeds.

DSN: ``amqp://[user[:password]@]host[:port][/vhost]`` (``amqps://`` for TLS, port 5671,
certificate and host name verified).  The vhost is the URL-decoded path without its
leading ``/``; no path, or ``/`` alone, is the default vhost ``/`` (``%2f`` also names it).
Without user information the broker's default ``guest``/``guest`` is used; a user with no
password sends an empty one.  A query string is ignored.

Connections are made with pika's Twisted adapter.  Each DSN gets one connection, opened
by the first job and kept for the following ones; each exchange gets its own channel on
it (so a channel error on one exchange does not fail deliveries to another), in confirm
mode, with many publishes outstanding at once.  A failed connection attempt fails the
jobs waiting for it and, during a back-off window (0.5 s doubling to 30 s, reset by a
successful connection), every new job for that DSN at once; the next job after the window
tries again.  A connection lost while open fails the unconfirmed deliveries ("delivery
not confirmed": the broker may or may not have the message) and the next job reconnects.

``Execution.timeout`` (else ``NetworkOptions.timeout``) bounds a delivery, connecting
included; past it the publish is given up (``timed_out``; a confirm that comes later is
ignored).  Cancelling the Deferred of :meth:`AmqpRunner.run` gives it up the same way
(one not published yet is dropped) and fires ``cancelled_outcome``.  The outcome's
``output`` is ``b"confirmed"``, or the broker's answer (``b"nack"``, ``b"404 NOT_FOUND -
no exchange ..."``).

Failure reasons and log lines name the endpoint as ``host:port/vhost``; the password is
never shown.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast
from urllib.parse import SplitResult, unquote, urlsplit

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
from pika.adapters.twisted_connection import (  # type: ignore[import-untyped]
    TwistedProtocolConnection,
)
from twisted.internet import error as twisted_error
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IDelayedCall,
    IProtocol,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    optionsForClientTLS,
    platformTrust,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ztick_tw.model import AmqpSpec
from ztick_tw.runners.backoff import BACKOFF_INITIAL, BACKOFF_MAX, Backoff
from ztick_tw.runners.base import (
    Execution,
    IRunner,
    Outcome,
    cancelled_outcome,
    effective_timeout,
    timeout_reason,
)
from ztick_tw.runners.deadlines import Deadlines
from ztick_tw.runners.message import NetworkOptions, queue_message
from ztick_tw.runners.trust import load_trust_root

__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "AmqpRunner",
    "AmqpTarget",
    "Backoff",
    "load_ca_file",
    "parse_dsn",
]

#: Publishes a channel may have waiting for their confirm; later jobs queue in the runner.
#: Bounded because pika walks the outstanding publishes on every (multiple) ack.
PUBLISH_WINDOW = 1000
#: AMQP heartbeat interval negotiated with the broker, in seconds.
HEARTBEAT = 30
#: How long ``stop`` waits for the broker to answer a clean connection close.
CLOSE_TIMEOUT = 5.0

ReactorLike = Any  # IReactorTime & IReactorTCP (checked at use; zope has no intersection type)


# ------------------------------------------------------------------------------ the DSN


@dataclass(frozen=True, slots=True)
class AmqpTarget:
    """Where an ``amqp``/``amqps`` DSN points, with the credentials to log in.

    ``label`` (``host:port/vhost``) is how the endpoint is named in reasons and logs;
    the password appears nowhere but in ``password``.
    """

    tls: bool
    host: str
    port: int
    vhost: str
    user: str
    password: str = field(repr=False)

    @property
    def label(self) -> str:
        """``host:port/vhost`` (``host:port/`` for the default vhost ``/``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        vhost = "" if self.vhost == "/" else self.vhost
        return f"{host}:{self.port}/{vhost}"

    @property
    def scheme(self) -> str:
        """``amqps`` for TLS, else ``amqp``: the word that starts every reason."""
        return "amqps" if self.tls else "amqp"


def parse_dsn(dsn: str) -> AmqpTarget:
    """Parse ``amqp://[user[:pass]@]host[:port][/vhost]`` (or ``amqps://``).

    Raises ``ValueError`` with a message that does not contain the password.
    """
    try:
        parts: SplitResult = urlsplit(dsn)
        port = parts.port
    except ValueError:
        raise ValueError("malformed DSN") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError("DSN must start with amqp:// or amqps://")
    if not parts.hostname:
        raise ValueError("DSN has no host")
    tls = parts.scheme == "amqps"
    if port is None:
        port = 5671 if tls else 5672
    path = parts.path
    vhost = "/" if path in ("", "/") else unquote(path[1:])
    if parts.username is None and parts.password is None:
        user, password = "guest", "guest"
    else:
        user = unquote(parts.username or "")
        password = unquote(parts.password or "")
    return AmqpTarget(tls, parts.hostname, port, vhost, user, password)


def load_ca_file(ca_file: str) -> Any:
    """A trust root made of every certificate in the PEM file ``ca_file``.

    Raises ``ValueError`` naming the file when it cannot be read or holds no certificate.
    """
    return load_trust_root(ca_file, "amqp CA")


# ---------------------------------------------------------------------------- pika glue


class _PikaProtocol(TwistedProtocolConnection):  # type: ignore[misc]
    """pika's Twisted protocol, keeping what pika 1.4's Twisted adapter throws away.

    * ``ready`` errbacks with a bare ``AMQPConnectionError`` when the handshake fails;
      the cause pika saw (a TLS error...) is kept in ``open_error``.
    * When the broker ends the connection with ``Connection.Close`` (403 ACCESS_REFUSED
      for a wrong password, 530 for a vhost, 320 at broker shutdown), or pika ends it
      (blocked too long), the adapter's ``connection_lost`` replaces that reason with
      Twisted's ``ConnectionDone`` once the TCP connection closes; the real reason is
      kept in ``close_reason``.
    """

    def __init__(self, parameters: pika.ConnectionParameters, reactor: ReactorLike) -> None:
        super().__init__(parameters, custom_reactor=reactor)
        self.open_error: BaseException | None = None
        self.close_reason: BaseException | None = None
        self.blocked = False
        self._impl.add_on_connection_blocked_callback(self._on_blocked)
        self._impl.add_on_connection_unblocked_callback(self._on_unblocked)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pending = getattr(self._impl, "_error", None)
        if isinstance(pending, pika.exceptions.AMQPConnectionError):
            self.close_reason = pending
        super().connectionLost(reason)

    def _on_connection_failed(self, connection: Any, error: BaseException | None = None) -> None:
        self.open_error = error
        super()._on_connection_failed(connection, error)

    def _on_blocked(self, _connection: Any, _frame: Any) -> None:
        self.blocked = True

    def _on_unblocked(self, _connection: Any, _frame: Any) -> None:
        self.blocked = False


def _connect_reason(error: BaseException | None, target: AmqpTarget) -> str:
    """A short, password-free reason for a failed connection attempt."""
    e = error
    if isinstance(e, pika.exceptions.ConnectionClosedByBroker):
        if e.reply_code == 403:
            return f"authentication refused for user {target.user!r}"
        if e.reply_code == 530:
            return f"access to vhost {target.vhost!r} refused for user {target.user!r}"
        return f"broker closed the connection: {e.reply_code} {e.reply_text}"
    if isinstance(
        e, pika.exceptions.ProbableAuthenticationError | pika.exceptions.AuthenticationError
    ):
        return f"authentication refused for user {target.user!r}"
    if isinstance(e, pika.exceptions.ProbableAccessDeniedError):
        return f"access to vhost {target.vhost!r} refused for user {target.user!r}"
    if isinstance(e, pika.exceptions.IncompatibleProtocolError):
        return "the server does not speak AMQP 0-9-1"
    if isinstance(e, twisted_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, twisted_error.DNSLookupError):
        return f"cannot resolve host {target.host!r}"
    if isinstance(e, twisted_error.TimeoutError | TimeoutError):
        return "connection timed out"
    if isinstance(e, pika.exceptions.StreamLostError | twisted_error.ConnectionLost):
        return "connection lost during the handshake"
    if type(e).__module__.startswith("OpenSSL") or "SSL" in type(e).__name__:
        return f"TLS handshake failed: {_tls_detail(e)}"
    if isinstance(e, twisted_error.ConnectionDone):
        return "the broker closed the connection during the handshake"
    if isinstance(e, twisted_error.ConnectError):
        return f"connection failed: {e.osError or e.__class__.__name__}"
    if e is None:
        return "connection failed"
    return f"connection failed: {e.__class__.__name__}: {e}"


def _tls_detail(error: BaseException | None) -> str:
    """The reason OpenSSL gave (``certificate verify failed`` ...), else the class name."""
    args = getattr(error, "args", ())
    if args and isinstance(args[0], list):
        for item in args[0]:
            if isinstance(item, tuple) and item:
                return str(item[-1])
    return error.__class__.__name__ if error is not None else "unknown error"


_LOST = "connection lost; delivery not confirmed"
#: The output of a confirmed delivery.
CONFIRMED = b"confirmed"


def _broker_answer(error: BaseException) -> bytes:
    """What the broker said about a publish it did not confirm, as an outcome's output."""
    if isinstance(error, pika.exceptions.NackError):
        return b"nack"
    if isinstance(error, pika.exceptions.ChannelClosedByBroker):
        return f"{error.reply_code} {error.reply_text}".encode("utf-8", "replace")
    return b""


def _delivery_reason(error: BaseException) -> str:
    """A short reason for a publish that the broker did not confirm."""
    if isinstance(error, pika.exceptions.NackError):
        return "broker refused (nack)"
    if isinstance(error, pika.exceptions.ChannelClosedByBroker):
        return f"channel closed by broker: {error.reply_code} {error.reply_text}"
    if isinstance(
        error,
        pika.exceptions.AMQPConnectionError
        | twisted_error.ConnectionLost
        | twisted_error.ConnectionDone,
    ):
        return _LOST
    return f"delivery not confirmed: {error.__class__.__name__}"


# --------------------------------------------------------------------------------- jobs


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
        runner: AmqpRunner,
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

    def __init__(self, runner: AmqpRunner, target: AmqpTarget) -> None:
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


# ------------------------------------------------------------------------------- runner


@implementer(IRunner)
class AmqpRunner:
    """Publishes each job's message to RabbitMQ and succeeds when the broker confirms it.

    ``reactor`` must provide ``IReactorTime`` and ``IReactorTCP``.  ``ca_file``: PEM CA
    certificates that ``amqps://`` brokers must chain to, read at construction
    (``ValueError`` if unusable); default: the system's trust store.
    """

    log: ClassVar[Logger] = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        options: NetworkOptions,
        *,
        ca_file: str | None = None,
    ) -> None:
        if not IReactorTCP.providedBy(reactor):
            raise TypeError("the amqp runner needs a reactor that provides IReactorTCP")
        self.reactor: ReactorLike = reactor
        self.options = options
        self.ca_file = ca_file
        self._trust: Any = None  # an IOpenSSLTrustRoot provider
        if ca_file is not None:  # read now: a bad file is a startup error, not a job's
            self._trust = load_ca_file(ca_file)
        self._endpoints: dict[str, _Endpoint] = {}
        self._pending: dict[_Job, None] = {}  # the jobs not done, in the order they came
        self._deadlines: Deadlines[_Job] = Deadlines()  # their deadlines
        self._timeout_call: IDelayedCall | None = None
        self._timeout_at = float("inf")
        self._grace_call: IDelayedCall | None = None
        self._live = 0
        self._stopping = False
        self._closed_all = False
        self._stop_waiters: list[Deferred[None]] = []
        self._content_type = (
            "application/json" if options.message_format == "json" else "text/plain"
        )
        self._delivery_mode = 2 if options.amqp_persistent else 1

    @property
    def running(self) -> int:
        """Executions started and not finished yet (connecting, queued or unconfirmed)."""
        return self._live

    @property
    def connections(self) -> int:
        """Broker connections open now (one per DSN in use)."""
        return sum(1 for endpoint in self._endpoints.values() if endpoint.state == "open")

    def connection_states(self) -> dict[str, int]:
        """Broker connections by state, for ``ztick_runner_connections``.

        ``open``, ``connecting``, ``closing``, ``idle`` (none now: down, or not needed yet).
        """
        states = {"open": 0, "connecting": 0, "closing": 0, "idle": 0}
        for endpoint in self._endpoints.values():
            states[endpoint.state] += 1
        return states

    # -- IRunner ---------------------------------------------------------------------

    def run(self, execution: Execution) -> Deferred[Outcome]:
        """Publish the execution's message; fire with its ``Outcome`` (never errbacks)."""
        if self._stopping:
            return succeed(Outcome(False, "runner stopped"))
        spec = execution.spec
        if not isinstance(spec, AmqpSpec):
            return succeed(Outcome(False, f"the amqp runner cannot run a {spec.kind.wire} spec"))
        endpoint = self._endpoints.get(spec.dsn)
        if endpoint is None:
            try:
                target = parse_dsn(spec.dsn)
            except ValueError as e:
                return succeed(Outcome(False, f"amqp: {e}"))
            endpoint = self._endpoints[spec.dsn] = _Endpoint(self, target)
        now = self.reactor.seconds()
        job_id = execution.job_id
        job = _Job(self, execution, spec, now, effective_timeout(execution, self.options.timeout))
        self._live += 1
        try:
            endpoint.submit(job)
        except Exception as e:  # a bug, not a delivery problem: keep run()'s promise
            self.log.failure("amqp runner: unexpected error starting job {job_id}", job_id=job_id)
            self.finish(job, Outcome(False, endpoint.reason(f"internal error: {e!r}")))
        if not job.done:  # (a job failed at once by a back-off window needs no timer)
            self._pending[job] = None
            if job.timeout > 0:
                self._deadlines.push(job.deadline, job)
                if job.deadline < self._timeout_at:
                    self._arm()
        return job.deferred

    def stop(self, grace: float) -> Deferred[None]:
        """Refuse new runs; give pending deliveries ``grace`` s, then end them.

        What is still unconfirmed then fails as interrupted ("stopped at shutdown");
        every connection is closed cleanly before the returned Deferred fires.
        """
        stopped: Deferred[None] = Deferred()
        if self._stopping:
            if self._closed_all:
                stopped.callback(None)
            else:
                self._stop_waiters.append(stopped)
            return stopped
        self._stopping = True
        self._stop_waiters.append(stopped)
        if self._live:
            self._grace_call = self.reactor.callLater(max(grace, 0.0), self._interrupt)
        else:
            self._close_all()
        return stopped

    # -- helpers for the channels ----------------------------------------------------

    def properties(self, execution: Execution) -> pika.BasicProperties:
        """The message properties of one execution."""
        return pika.BasicProperties(
            content_type=self._content_type,
            delivery_mode=self._delivery_mode,
            message_id=execution.job_id,
            app_id="ztick-tw",
            headers={"ztick-rule-id": execution.rule_id, "ztick-attempt": execution.attempt},
        )

    def trust_root(self) -> Any:
        """The certificates ``amqps://`` brokers must chain to."""
        if self._trust is None:
            self._trust = platformTrust()  # type: ignore[no-untyped-call]
        return self._trust

    def finish(self, job: _Job, outcome: Outcome) -> None:
        """End ``job`` with ``outcome`` (the first outcome wins; later ones are ignored)."""
        if job.done:
            return
        job.done = True
        self._live -= 1
        self._pending.pop(job, None)
        duration = self.reactor.seconds() - job.started
        if outcome.success:
            self.log.debug(
                "job {job_id}: amqp delivery confirmed in {duration:.3f}s",
                job_id=job.execution.job_id,
                duration=duration,
            )
        else:
            self.log.debug(
                "job {job_id}: amqp delivery failed after {duration:.3f}s: {reason}",
                job_id=job.execution.job_id,
                duration=duration,
                reason=outcome.reason,
            )
        try:
            job.deferred.callback(outcome)
        finally:
            if self._stopping and self._live == 0 and self._grace_call is not None:
                self._interrupt()

    # -- timers ----------------------------------------------------------------------

    def _arm(self) -> None:
        """Arm the timer for the earliest deadline of a job not done (or none)."""
        timer, self._timeout_call = self._timeout_call, None
        if timer is not None and timer.active():
            timer.cancel()
        self._timeout_at = float("inf")
        earliest = self._deadlines.earliest()
        if earliest is not None:
            self._timeout_at = earliest
            delay = max(self._timeout_at - self.reactor.seconds(), 0.0)
            self._timeout_call = self.reactor.callLater(delay, self._expire)

    def _expire(self) -> None:
        """Fail the jobs whose deadline has come; re-arm for the next one."""
        self._timeout_call = None
        self._timeout_at = float("inf")
        now = self.reactor.seconds()
        for job in self._deadlines.pop_expired(now + 1e-6):
            if not job.done:  # (an earlier time-out's callbacks may have ended it)
                self._time_out(job)
        if self._timeout_call is None:  # (a callback may have armed it meanwhile)
            self._arm()

    def _time_out(self, job: _Job) -> None:
        endpoint = self._endpoints.get(job.spec.dsn)
        text = timeout_reason(job.timeout)
        if endpoint is not None:
            protocol = endpoint.protocol
            if protocol is not None and protocol.blocked:
                text += " (the broker is blocking publishers: resource alarm)"
            elif not job.published:
                text += " before publishing" if endpoint.state == "open" else " connecting"
            else:
                text += " waiting for the broker's confirm"
            self.finish(job, Outcome(False, endpoint.reason(text), timed_out=True))
        else:
            self.finish(job, Outcome(False, f"amqp: {text}", timed_out=True))

    def _interrupt(self) -> None:
        """The grace period is over (or nothing is left): fail what remains, close all."""
        call, self._grace_call = self._grace_call, None
        if call is not None and call.active():
            call.cancel()
        for job in list(self._pending):
            self.finish(job, Outcome(False, "stopped at shutdown", interrupted=True))
        self._close_all()

    def _close_all(self) -> None:
        self._pending.clear()
        self._deadlines.clear()
        self._timeout_at = float("inf")
        timer, self._timeout_call = self._timeout_call, None
        if timer is not None and timer.active():
            timer.cancel()
        closing = [endpoint.close() for endpoint in self._endpoints.values()]
        self._endpoints.clear()
        remaining = len(closing)

        def one_closed(_: object) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                self._all_closed()

        if not closing:
            self._all_closed()
        for d in closing:
            d.addBoth(one_closed)

    def _all_closed(self) -> None:
        self._closed_all = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)
