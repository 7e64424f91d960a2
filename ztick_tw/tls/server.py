"""TLS for the line-protocol listener: certificates, client certificates, reload on SIGHUP.

``ReloadableServerTLS`` loads a PEM certificate chain (the server certificate first, then
any intermediates, in one file), its private key and, optionally, a file of client CAs,
into an OpenSSL context (``context.py``: TLS 1.2 and 1.3 only, forward-secret AEAD
ciphers, no compression, no renegotiation, no session resumption; with client CAs, every
client must present a certificate signed by one of them).

``reload()`` reads the files again and, if they are good, makes new connections use them;
connections already open keep the context they were made with.  If they are not, it logs
why and keeps serving the old certificate.  ``install_reload_on_sighup`` wires it to SIGHUP.

``tls_factory`` wraps a protocol factory in TLS (``transport.py``): a failed handshake
is closed and logged in one line, and the connection closes like plain TCP (a client's
``close_notify`` is a half-close; the server does not wait for the client's).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorFromThreads,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from ztick_tw.tls.context import CertificateInfo, TLSSetupError, load
from ztick_tw.tls.transport import TLSFactory

__all__ = [
    "ReloadableServerTLS",
    "TLSReloadService",
    "install_reload_on_sighup",
    "request_reload",
    "tls_factory",
]

log = Logger(namespace="ztick_tw.tls")


def _utcnow() -> datetime:
    return datetime.now(UTC)


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
        self._loaded = load(cert_path, key_path, client_ca_path, now())
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
            loaded = load(self.cert_path, self.key_path, self.client_ca_path, self._now())
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


def tls_factory(wrapped: IProtocolFactory, creator: ReloadableServerTLS) -> IProtocolFactory:
    """``wrapped`` behind TLS (server side), with connections made by ``creator``.

    The inner protocol is connected when the TCP connection is accepted (before the
    handshake), and lost when the handshake fails.
    """
    return TLSFactory(creator, False, wrapped)


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
