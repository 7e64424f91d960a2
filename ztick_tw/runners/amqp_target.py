"""The amqp runner's broker side: DSNs, trust roots, the pika glue and failure reasons.

``parse_dsn`` reads ``amqp://`` and ``amqps://`` DSNs into an ``AmqpTarget``;
``load_ca_file`` reads the CA file ``amqps://`` brokers must chain to; ``_PikaProtocol``
is pika's Twisted connection with its handshake failures kept; the ``_*_reason``
helpers turn pika's and Twisted's errors into a job's failure reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
from pika.adapters.twisted_connection import (  # type: ignore[import-untyped]
    TwistedProtocolConnection,
)
from twisted.internet import error as twisted_error
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from ztick_tw.runners.trust import load_trust_root

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
