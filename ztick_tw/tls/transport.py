"""The TLS transport of the line-protocol listener: handshake logs and TCP-like closing.

``TLSFactory`` wraps a protocol factory in TLS (``tls.tls_factory`` builds it).  A
connection whose handshake fails (a plaintext client, an old TLS version, a missing or
untrusted client certificate) is closed and logged in one line; other connections are
not affected.  Two changes to Twisted's TLS transport make it close like plain TCP does:
a client's ``close_notify`` is a half-close (``echo ... | socat - OPENSSL:...`` gets its
answers), and when the server closes, it does not wait for the client's
``close_notify`` nor for the inner protocol to unregister itself as a producer.
``peer_certificate_subject`` names the client certificate of a connection.
"""

from __future__ import annotations

from typing import Any, cast

from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IAddress, IHalfCloseableProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import (
    BufferingTLSTransport,
    TLSMemoryBIOFactory,
    TLSMemoryBIOProtocol,
)
from twisted.python.failure import Failure
from zope.interface import implementer

log = Logger(namespace="ztick_tw.tls")

#: Why OpenSSL rejected a client certificate, for the common verification errors.
_VERIFY_ERRORS = {
    2: "unable to get the issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in the chain",
    20: "not signed by a trusted client CA",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}

#: What some OpenSSL handshake errors usually mean here, appended to them in the log.
_HANDSHAKE_HINTS = {
    "wrong version number": "not TLS: a plaintext client?",
    "http request": "a plaintext HTTP client",
    "unsupported protocol": "the client offers only TLS versions older than 1.2",
    "no shared cipher": "no cipher in common; TLS 1.2 needs ECDHE with AES-GCM or ChaCha20",
    "peer did not return a certificate": "client certificates are required",
}


def record_verify_error(
    connection: SSL.Connection, cert: crypto.X509, errnum: int, depth: int, ok: int
) -> bool:
    """OpenSSL's verdict stands; a rejection is remembered for the handshake failure log."""
    if not ok:
        proto = connection.get_app_data()
        if isinstance(proto, _LoggingTLSProtocol) and proto.verify_error is None:
            subject = cert.to_cryptography().subject.rfc4514_string()
            reason = _VERIFY_ERRORS.get(errnum, f"verification error {errnum}")
            where = "client certificate" if depth == 0 else f"certificate at depth {depth}"
            proto.verify_error = f"{where} {subject} rejected: {reason}"
    return bool(ok)


def ssl_reason(error: BaseException) -> str:
    """The reasons in an ``OpenSSL.SSL.Error``, without the library/function noise."""
    parts: list[str] = []
    if error.args and isinstance(error.args[0], list):
        for item in error.args[0]:
            if isinstance(item, tuple) and item:
                parts.append(str(item[-1]))
            else:
                parts.append(str(item))
    return "; ".join(p for p in parts if p) or str(error) or type(error).__name__


@implementer(IHalfCloseableProtocol)
class _LoggingTLSProtocol(BufferingTLSTransport):
    """Twisted's TLS transport, plus one log line per handshake, plus half-close.

    Half-close: when the client ends its side with a TLS ``close_notify`` (as
    ``echo ... | socat - OPENSSL:...`` and ``openssl s_client`` do at the end of their
    input), an inner protocol that provides ``IHalfCloseableProtocol`` gets
    ``readConnectionLost`` and can still send its answers; the TLS session is closed when
    it calls ``loseConnection``.  Twisted alone would close at once and drop them.
    """

    verify_error: str | None = None
    _peer = "?"
    _reported = False
    _read_closed = False

    def makeConnection(self, transport: Any) -> None:
        """Remember the peer (for the logs), then start the handshake."""
        peer = transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        if host is None:
            self._peer = str(peer)
        else:
            self._peer = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        super().makeConnection(transport)  # type: ignore[no-untyped-call]

    def dataReceived(self, data: bytes) -> None:
        """Feed TLS bytes in; log once when the handshake completes."""
        super().dataReceived(data)  # type: ignore[no-untyped-call]
        if self._handshakeDone and not self._reported:
            self._reported = True
            handle = self.getHandle()  # type: ignore[no-untyped-call]
            if handle is not None:
                log.debug(
                    "TLS handshake with {peer} done: {version} {cipher}, client certificate"
                    " {client}",
                    peer=self._peer,
                    version=handle.get_protocol_version_name(),
                    cipher=handle.get_cipher_name(),
                    client=peer_certificate_subject(self) or "none",
                )

    def _flushReceiveBIO(self) -> None:
        """Decrypt and deliver what came in; a ``close_notify`` half-closes, see above."""
        inner = self.wrappedProtocol
        if not IHalfCloseableProtocol.providedBy(inner):
            super()._flushReceiveBIO()  # type: ignore[no-untyped-call]
            return
        connection = self.getHandle()  # type: ignore[no-untyped-call]
        while not self._lostTLSConnection and not self._read_closed:
            try:
                data = connection.recv(2**15)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._read_closed = True
                inner.readConnectionLost()
            except SSL.Error:
                self._tlsShutdownFinished(Failure())  # type: ignore[no-untyped-call]
            else:
                if not self._aborted:
                    inner.dataReceived(data)
        self._flushSendBIO()  # type: ignore[no-untyped-call]

    def readConnectionLost(self) -> None:
        """TCP end of input: after a ``close_notify``, keep writing; else, as Twisted does."""
        if self._read_closed:
            return
        connection = self.getHandle()  # type: ignore[no-untyped-call]
        if connection is None or self._lostTLSConnection:
            return
        connection.bio_shutdown()
        self._flushReceiveBIO()
        if not self._read_closed and not self._lostTLSConnection:
            self._tlsShutdownFinished(None)  # type: ignore[no-untyped-call]

    def loseConnection(self) -> None:
        """Send what is buffered and a ``close_notify``, then close the TCP connection.

        Twisted's TLS transport keeps the connection open while a producer is registered
        (the inner protocol registers itself for back-pressure) and, after its
        ``close_notify``, until the client answers with its own; a client that never
        does would hold the connection forever.  So the producer is unregistered first,
        and the TCP connection is closed once the ``close_notify`` is written.
        """
        if self._producer is not None:
            self.unregisterProducer()  # type: ignore[no-untyped-call]
        super().loseConnection()
        if self._handshakeDone and self.disconnecting and not self._appSendBuffer:
            transport = self.transport
            if transport is not None:
                transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Not used: this transport never half-closes its own side."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Log a failed handshake once (peer and reason, no traceback), then clean up."""
        if not self._handshakeDone and not self._reported:
            self._reported = True
            stored = getattr(self, "_reason", None)
            cause = stored if isinstance(stored, Failure) else reason
            error = cause.value
            if self.verify_error is None and not isinstance(error, SSL.Error):
                log.debug(
                    "TLS connection from {peer} closed before the handshake completed: {reason}",
                    peer=self._peer,
                    reason=str(error),
                )
            else:
                why = self.verify_error or ssl_reason(cast(BaseException, error))
                hint = _HANDSHAKE_HINTS.get(why)
                if hint is not None:
                    why = f"{why} ({hint})"
                log.info("TLS handshake with {peer} failed: {reason}", peer=self._peer, reason=why)
        super().connectionLost(reason)


class TLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` with handshake logging; refuses when the inner factory does."""

    protocol = _LoggingTLSProtocol

    def buildProtocol(self, addr: IAddress | None) -> TLSMemoryBIOProtocol | None:  # type: ignore[override]
        """Wrap the inner protocol; ``None`` from the inner factory closes the connection."""
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return self.protocol(self, inner)


def peer_certificate_subject(transport: object) -> str | None:
    """The subject (RFC 4514) of the client's certificate on a TLS transport, if any.

    ``transport`` is what a protocol behind ``tls_factory`` has as ``self.transport``.
    ``None`` before the handshake, without a client certificate, or without TLS.
    """
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    try:
        handle = get_handle()
    except Exception:
        return None
    if not isinstance(handle, SSL.Connection):
        return None
    cert = handle.get_peer_certificate(as_cryptography=True)
    return cert.subject.rfc4514_string() if cert is not None else None
