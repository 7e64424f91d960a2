"""TLS for the line-protocol listener: certificates, client certificates, reload on SIGHUP.

``ReloadableServerTLS`` loads a PEM certificate chain (the server certificate first, then
any intermediates, in one file), its private key and, optionally, a file of client CAs.
It builds an OpenSSL context for TLS 1.2 and 1.3 only, with forward-secret AEAD ciphers
(ECDHE with AES-GCM or ChaCha20-Poly1305 for TLS 1.2; OpenSSL's TLS 1.3 suites), no
compression, no renegotiation and no session resumption.  With client CAs, every client
must present a certificate signed by one of them.

``reload()`` reads the files again and, if they are good, makes new connections use them;
connections already open keep the context they were made with.  If they are not, it logs
why and keeps serving the old certificate.  ``install_reload_on_sighup`` wires it to SIGHUP.

``tls_factory`` wraps a protocol factory in TLS.  A connection whose handshake fails
(a plaintext client, an old TLS version, a missing or untrusted client certificate) is
closed and logged in one line; other connections are not affected.  Two changes to
Twisted's TLS transport make it close like plain TCP does: a client's ``close_notify``
is a half-close (``echo ... | socat - OPENSSL:...`` gets its answers), and when the
server closes, it does not wait for the client's ``close_notify`` nor for the inner
protocol to unregister itself as a producer.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL, crypto
from twisted.application.service import Service
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorFromThreads,
)
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

#: TLS 1.2 cipher suites: ECDHE key exchange (forward secrecy) with an AEAD cipher only.
#: TLS 1.3 suites are OpenSSL's defaults (all AEAD).
TLS12_CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"

#: Context options: no TLS compression (CRIME), no renegotiation, the server's cipher
#: order, a fresh ECDH key per handshake, no session tickets.
_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_SINGLE_ECDH_USE
    | SSL.OP_NO_TICKET
)

#: Private key types OpenSSL can sign a handshake with.
_SigningKey = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
    | dsa.DSAPrivateKey
)

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

_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"


class TLSSetupError(Exception):
    """A TLS file cannot be used; the message is one line naming the file and the problem."""


@dataclass(frozen=True)
class CertificateInfo:
    """What the logs and STAT say about the server certificate in use."""

    subject: str
    issuer: str
    not_before: datetime
    not_after: datetime
    serial: int
    sha256: str
    chain_length: int

    def describe(self) -> str:
        """One line: subject, issuer, expiry and fingerprint."""
        return (
            f"{self.subject} (issuer {self.issuer}, valid until"
            f" {self.not_after:%Y-%m-%dT%H:%M:%SZ}, sha256 {self.sha256})"
        )


@dataclass(frozen=True)
class _Loaded:
    context: SSL.Context
    certificate: CertificateInfo
    client_cas: tuple[str, ...]
    warnings: tuple[str, ...]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSSetupError(f"{path}: cannot read the {what}: {e.strerror}") from None


def _load_certificates(path: str, what: str) -> list[x509.Certificate]:
    data = _read(path, what)
    if _CERT_MARKER not in data:
        raise TLSSetupError(
            f"{path}: the {what} holds no PEM certificate (no {_CERT_MARKER.decode()} line)"
        )
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSSetupError(
            f"{path}: the {what} holds a PEM certificate block that cannot be decoded"
        ) from None


def _load_key(path: str) -> _SigningKey:
    what = "TLS private key"
    data = _read(path, what)
    if b"PRIVATE KEY-----" not in data:
        raise TLSSetupError(
            f"{path}: the {what} file holds no PEM private key (no -----BEGIN ... PRIVATE"
            " KEY----- line)"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSSetupError(
            f"{path}: the {what} is encrypted with a passphrase; give ztick-tw an"
            " unencrypted key (readable by the daemon's user only)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSSetupError(f"{path}: the {what} cannot be decoded") from None
    if not isinstance(key, _SigningKey):
        raise TLSSetupError(
            f"{path}: the {what} is a {type(key).__name__}, which cannot sign a handshake"
        )
    return key


def _public_der(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":")


def _load(cert_path: str, key_path: str, client_ca_path: str | None, now: datetime) -> _Loaded:
    """Read and check the files and build the context; raise ``TLSSetupError`` if unusable."""
    chain = _load_certificates(cert_path, "TLS certificate")
    key = _load_key(key_path)
    key_der = _public_der(key.public_key())
    leaf = chain[0]
    if _public_der(leaf.public_key()) != key_der:
        others = [i for i, c in enumerate(chain[1:], 2) if _public_der(c.public_key()) == key_der]
        hint = (
            f" (it matches certificate #{others[0]} in that file: put the server"
            " certificate first, then its intermediates)"
            if others
            else ""
        )
        raise TLSSetupError(
            f"{key_path}: the TLS private key does not match the certificate in {cert_path}" + hint
        )
    cas: list[x509.Certificate] = []
    if client_ca_path is not None:
        cas = _load_certificates(client_ca_path, "TLS client CA file")
    warnings: list[str] = []
    if leaf.not_valid_after_utc <= now:
        warnings.append(
            f"{cert_path}: the TLS certificate expired on"
            f" {leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}; clients will refuse it"
        )
    elif leaf.not_valid_before_utc > now:
        warnings.append(
            f"{cert_path}: the TLS certificate is not valid before"
            f" {leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}; clients will refuse it"
        )
    try:
        if os.stat(key_path).st_mode & stat.S_IROTH:
            warnings.append(
                f"{key_path}: the TLS private key is readable by other users; chmod o-r it"
            )
    except OSError:
        pass
    try:
        context = _build_context(chain, key, cas)
    except SSL.Error as e:
        raise TLSSetupError(
            f"{cert_path}: OpenSSL refused the certificate or key: {_ssl_reason(e)}"
        ) from None
    info = CertificateInfo(
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        serial=leaf.serial_number,
        sha256=_fingerprint(leaf),
        chain_length=len(chain),
    )
    return _Loaded(
        context, info, tuple(ca.subject.rfc4514_string() for ca in cas), tuple(warnings)
    )


def _build_context(
    chain: list[x509.Certificate], key: _SigningKey, client_cas: list[x509.Certificate]
) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(_OPTIONS)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_cipher_list(TLS12_CIPHERS)
    ctx.use_certificate(chain[0])
    ctx.use_privatekey(key)
    for intermediate in chain[1:]:
        ctx.add_extra_chain_cert(intermediate)
    ctx.check_privatekey()
    # Required for client certificates to work with a session cache; no resumption anyway.
    ctx.set_session_id(b"ztick-tw")
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    if client_cas:
        store = ctx.get_cert_store()
        assert store is not None
        for ca in client_cas:
            store.add_cert(crypto.X509.from_cryptography(ca))
            ctx.add_client_ca(ca)  # named in the CertificateRequest, to help clients pick
        ctx.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT | SSL.VERIFY_CLIENT_ONCE,
            _record_verify_error,
        )
        ctx.set_verify_depth(9)
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    return ctx


def _record_verify_error(
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


def _ssl_reason(error: BaseException) -> str:
    """The reasons in an ``OpenSSL.SSL.Error``, without the library/function noise."""
    parts: list[str] = []
    if error.args and isinstance(error.args[0], list):
        for item in error.args[0]:
            if isinstance(item, tuple) and item:
                parts.append(str(item[-1]))
            else:
                parts.append(str(item))
    return "; ".join(p for p in parts if p) or str(error) or type(error).__name__


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableServerTLS:
    """Server TLS settings read from files, which ``reload()`` can swap while serving.

    Raises ``TLSSetupError`` if the files cannot be used.  ``now`` gives the current time,
    used only to warn about an expired or not yet valid certificate.
    """

    def __init__(
        self,
        cert_path: str,
        key_path: str,
        client_ca_path: str | None = None,
        *,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self.cert_path = cert_path
        self.key_path = key_path
        self.client_ca_path = client_ca_path
        self._now = now
        self._loaded = _load(cert_path, key_path, client_ca_path, now())
        self.reloads = 0
        self._log_loaded("TLS certificate loaded")

    @property
    def certificate(self) -> CertificateInfo:
        """The server certificate new connections get."""
        return self._loaded.certificate

    @property
    def client_cas(self) -> tuple[str, ...]:
        """Subjects of the CAs whose client certificates are accepted (empty: none asked)."""
        return self._loaded.client_cas

    @property
    def client_auth(self) -> bool:
        """Whether clients must present a certificate."""
        return self.client_ca_path is not None

    def describe(self) -> str:
        """One line for the logs: certificate, expiry and the client certificate policy."""
        if self.client_auth:
            clients = (
                f"client certificates required, from {len(self.client_cas)} CA(s)"
                f" in {self.client_ca_path}"
            )
        else:
            clients = "no client certificates"
        return f"{self.certificate.describe()}; {clients}"

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """A server-side OpenSSL connection on the current context."""
        return SSL.Connection(self._loaded.context, None)

    def reload(self) -> bool:
        """Read the files again; on success new connections use them.

        Open connections keep the certificate they were made with.  On failure the
        current certificate stays in use and the error is logged; this never raises.
        """
        try:
            loaded = _load(self.cert_path, self.key_path, self.client_ca_path, self._now())
        except TLSSetupError as e:
            log.error(
                "TLS reload failed, still serving the previous certificate: {error}",
                error=str(e),
            )
            return False
        except Exception as e:  # never let a reload take the daemon down
            log.failure(
                "TLS reload failed, still serving the previous certificate: {error}",
                error=f"{self.cert_path}: {e}",
            )
            return False
        self._loaded = loaded
        self.reloads += 1
        self._log_loaded("TLS certificate reloaded; new connections get it")
        return True

    def _log_loaded(self, what: str) -> None:
        log.info(
            "{what} from {cert_path}: {description}",
            what=what,
            cert_path=self.cert_path,
            description=self.describe(),
        )
        for warning in self._loaded.warnings:
            log.warn("{problem}", problem=warning)


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
                why = self.verify_error or _ssl_reason(cast(BaseException, error))
                hint = _HANDSHAKE_HINTS.get(why)
                if hint is not None:
                    why = f"{why} ({hint})"
                log.info("TLS handshake with {peer} failed: {reason}", peer=self._peer, reason=why)
        super().connectionLost(reason)


class _TLSFactory(TLSMemoryBIOFactory):
    """``TLSMemoryBIOFactory`` with handshake logging; refuses when the inner factory does."""

    protocol = _LoggingTLSProtocol

    def buildProtocol(self, addr: IAddress | None) -> TLSMemoryBIOProtocol | None:  # type: ignore[override]
        """Wrap the inner protocol; ``None`` from the inner factory closes the connection."""
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return self.protocol(self, inner)


def tls_factory(wrapped: IProtocolFactory, creator: ReloadableServerTLS) -> IProtocolFactory:
    """``wrapped`` behind TLS (server side), with connections made by ``creator``.

    The inner protocol is connected when the TCP connection is accepted (before the
    handshake), and lost when the handshake fails.
    """
    return _TLSFactory(creator, False, wrapped)


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


def request_reload(reactor: IReactorFromThreads, creator: ReloadableServerTLS) -> None:
    """Have ``creator.reload()`` run in the reactor thread (safe from a signal handler)."""
    reactor.callFromThread(creator.reload)


def install_reload_on_sighup(
    reactor: IReactorFromThreads, creator: ReloadableServerTLS
) -> Callable[[], None]:
    """Reload the certificate on SIGHUP; returns a function that puts the old handler back.

    A handler installed before is still called after ours.  Call from the main thread.
    Where there is no SIGHUP (Windows) this does nothing.
    """
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None:
        return lambda: None
    previous = signal.getsignal(sighup)

    def on_sighup(signum: int, frame: FrameType | None) -> None:
        request_reload(reactor, creator)
        if callable(previous):
            previous(signum, frame)

    try:
        signal.signal(sighup, on_sighup)
    except ValueError:  # not the main thread
        log.warn(
            "cannot handle SIGHUP outside the main thread; the TLS certificate in"
            " {cert_path} will not be reloaded on SIGHUP",
            cert_path=creator.cert_path,
        )
        return lambda: None
    log.debug("SIGHUP reloads the TLS certificate from {cert_path}", cert_path=creator.cert_path)

    def uninstall() -> None:
        if signal.getsignal(sighup) is on_sighup:
            signal.signal(sighup, previous if previous is not None else signal.SIG_DFL)

    return uninstall


class TLSReloadService(Service):
    """Reload on SIGHUP while running: installs the handler on start, removes it on stop."""

    def __init__(self, reactor: IReactorFromThreads, creator: ReloadableServerTLS) -> None:
        self.reactor = reactor
        self.creator = creator
        self._uninstall: Callable[[], None] | None = None

    def startService(self) -> None:
        """Install the SIGHUP handler."""
        super().startService()  # type: ignore[no-untyped-call]
        self._uninstall = install_reload_on_sighup(self.reactor, self.creator)

    def stopService(self) -> None:
        """Put the previous SIGHUP handler back."""
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None
        super().stopService()  # type: ignore[no-untyped-call]
