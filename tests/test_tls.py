"""TLS for the listener: real handshakes on 127.0.0.1 with certificates made by the tests.

The clients are Python's ``ssl`` module with blocking sockets, run in threads so the
reactor serves them; the server is ``tls_factory`` around a line echo protocol (and once
around a real ``ZtickFactory``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import tempfile
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IListeningPort,
    IProtocolFactory,
    IPushProducer,
    IReactorFromThreads,
    IReactorTCP,
)
from twisted.internet.protocol import Factory, ServerFactory
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from tests.certs import PKI, Issued, cert_pem, issue_server, key_pem, make_pki
from tests.helpers import make_harness
from ztick_tw.tls.context import TLSSetupError
from ztick_tw.tls.server import (
    ReloadableServerTLS,
    TLSReloadService,
    install_reload_on_sighup,
    tls_factory,
)
from ztick_tw.tls.transport import peer_certificate_subject

#: Safety net so a broken server cannot hang a client thread forever (not an assertion).
SOCKET_TIMEOUT = 15.0


# -- server side ---------------------------------------------------------------------------


@implementer(IPushProducer)
class Echo(LineReceiver):
    """A line protocol: ``echo <line>``; ``whoami``: client subject; ``bye``: closes.

    Like ``ZtickProtocol``, it registers itself with its transport as a streaming
    producer (for back-pressure), which changes how Twisted's TLS transport closes.
    """

    delimiter = b"\n"

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()
        self.open = False

    def connectionMade(self) -> None:
        """Count as open; register as the transport's producer."""
        self.open = True
        cast(Any, self.transport).registerProducer(self, True)

    def lineReceived(self, line: bytes) -> None:
        """Answer one line."""
        assert self.transport is not None
        if line == b"whoami":
            answer = (peer_certificate_subject(self.transport) or "anonymous").encode()
        elif line == b"bye":
            self.transport.write(b"bye\n")
            self.transport.loseConnection()
            return
        else:
            answer = b"echo " + line
        self.transport.write(answer + b"\n")

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Signal the end of this connection."""
        self.open = False
        self.lost.callback(None)

    def pauseProducing(self) -> None:
        """Nothing to pause in the tests."""

    def resumeProducing(self) -> None:
        """Nothing to resume in the tests."""

    def stopProducing(self) -> None:
        """Nothing to stop in the tests."""


@implementer(IHalfCloseableProtocol)
class HalfCloseEcho(Echo):
    """An ``Echo`` that answers ``eof`` when the client ends its side, then closes."""

    def readConnectionLost(self) -> None:
        """The client is done sending: say so and close."""
        assert self.transport is not None
        self.transport.write(b"eof\n")
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        """Not used."""


class EchoFactory(Factory):
    """Builds ``Echo`` protocols (or ``kind``) and keeps every one it built, in order."""

    noisy = False

    def __init__(self, kind: type[Echo] = Echo) -> None:
        self.kind = kind
        self.built: list[Echo] = []

    def buildProtocol(self, addr: IAddress | None) -> Echo:
        """A new ``Echo``, remembered."""
        proto = self.kind()
        proto.factory = self
        self.built.append(proto)
        return proto


# -- client side (blocking, run in threads) --------------------------------------------------


def client_context(
    pki: PKI,
    *,
    version: ssl.TLSVersion | None = None,
    cert: Issued | None = None,
) -> ssl.SSLContext:
    """A client context trusting the test root CA, checking the name ``localhost``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca.cert_path)
    if version is not None:
        with warnings.catch_warnings():  # TLSv1_1 is deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            if version < ssl.TLSVersion.TLSv1_2:
                ctx.set_ciphers("ALL:@SECLEVEL=0")  # let the client itself offer old versions
            ctx.minimum_version = version
            ctx.maximum_version = version
    if cert is not None:
        ctx.load_cert_chain(cert.cert_path, cert.key_path)
    return ctx


class Client:
    """A blocking TLS (or plain) client socket with line reads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def ask(self, line: bytes) -> bytes:
        """Send ``line`` and return the answer line (without its newline)."""
        self.sock.sendall(line + b"\n")
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buffer += chunk
        answer, self.buffer = self.buffer.split(b"\n", 1)
        return answer

    def read_to_end(self) -> bytes:
        """Everything until the server closes (or resets) the connection."""
        data = b""
        try:
            while chunk := self.sock.recv(4096):
                data += chunk
        except OSError:
            pass
        return data

    @property
    def server_cert(self) -> bytes | None:
        """The server certificate (DER) of a TLS connection."""
        assert isinstance(self.sock, ssl.SSLSocket)
        return self.sock.getpeercert(binary_form=True)

    @property
    def version(self) -> str | None:
        """The negotiated TLS version."""
        assert isinstance(self.sock, ssl.SSLSocket)
        return self.sock.version()

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def connect_tls(port: int, ctx: ssl.SSLContext) -> Client:
    """Connect and complete the handshake (blocking)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    try:
        return Client(ctx.wrap_socket(raw, server_hostname="localhost"))
    except BaseException:
        raw.close()
        raise


def connect_plain(port: int) -> Client:
    """Connect without TLS (blocking)."""
    return Client(socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT))


@dataclass
class Attempt:
    """How one connect-and-ask went: the answer, or why there was none."""

    answer: bytes | None
    error: str | None
    server_cert: bytes | None = None


def attempt(port: int, ctx: ssl.SSLContext, line: bytes = b"ping") -> Attempt:
    """Connect, ask one line, close; never raises (blocking)."""
    try:
        client = connect_tls(port, ctx)
    except (OSError, ssl.SSLError) as e:
        return Attempt(None, f"handshake: {e!r}")
    try:
        cert = client.server_cert
        return Attempt(client.ask(line), None, cert)
    except (OSError, ssl.SSLError) as e:
        return Attempt(None, f"after handshake: {e!r}")
    finally:
        client.close()


def raw_exchange(
    port: int, payload: bytes, *, close_notify: bool, version: int = SSL.TLS1_3_VERSION
) -> tuple[bytes, int]:
    """Send ``payload`` over TLS and read until the server closes TCP (blocking).

    With ``close_notify`` the client then ends its side (TLS ``close_notify``, then a TCP
    half-close), as ``echo ... | socat - OPENSSL:...`` does; without, it just reads and
    never answers the server's ``close_notify``.  Returns the decrypted answer and
    OpenSSL's shutdown flags (``SSL.RECEIVED_SHUTDOWN`` set: the server sent one).
    """
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(version)
    ctx.set_max_proto_version(version)
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)

    def flush() -> None:
        while True:
            try:
                sock.sendall(conn.bio_read(65536))
            except SSL.WantReadError:
                return

    try:
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                flush()
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during the handshake") from None
                conn.bio_write(chunk)
        conn.sendall(payload)
        flush()
        if close_notify:
            conn.shutdown()
            flush()
            sock.shutdown(socket.SHUT_WR)
        raw = b""
        while chunk := sock.recv(65536):  # a timeout here means the server never closed
            raw += chunk
    finally:
        sock.close()
    conn.bio_write(raw)
    answer = b""
    try:
        while True:
            answer += conn.recv(65536)
    except (SSL.ZeroReturnError, SSL.WantReadError):
        pass
    return answer, conn.get_shutdown()


# -- fixtures ----------------------------------------------------------------------------------


@implementer(ILogObserver)
class LogCapture:
    """Every log event published while the test runs."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        """Keep the event."""
        self.events.append(event)

    def lines(self, level: str | None = None, namespace: str = "ztick_tw.tls") -> list[str]:
        """Formatted messages from ``namespace``, optionally only at ``level``."""
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_namespace") == namespace
            and (level is None or e["log_level"].name == level)
        ]

    def failures(self) -> list[LogEvent]:
        """Events that carry a traceback."""
        return [e for e in self.events if "log_failure" in e]


def temp_dir(case: unittest.TestCase) -> str:
    """A fresh directory, removed after the test."""
    path = tempfile.mkdtemp(prefix="ztick-tw-tls-")
    case.addCleanup(shutil.rmtree, path, True)
    return path


class TLSTestCase(unittest.TestCase):
    """A PKI in a temporary directory, a log capture, and listeners cleaned up after."""

    def setUp(self) -> None:
        self.pki = make_pki(temp_dir(self))
        self.log = LogCapture()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)
        self.clients: list[Client] = []

    def creator(self, client_ca: str | None = None) -> ReloadableServerTLS:
        """TLS settings from the test server certificate (and ``client_ca``)."""
        return ReloadableServerTLS(self.pki.server.cert_path, self.pki.server.key_path, client_ca)

    async def listen(self, creator: ReloadableServerTLS, inner: IProtocolFactory) -> int:
        """Listen on 127.0.0.1 (a free port) with TLS around ``inner``; return the port.

        The listener, the clients and (for an ``EchoFactory``) every server-side
        connection are closed after the test.
        """
        wrapped = cast(ServerFactory, tls_factory(inner, creator))  # listenTCP's annotation
        listening = cast(IReactorTCP, reactor).listenTCP(0, wrapped, interface="127.0.0.1")
        self.addCleanup(self._close, listening, inner)
        address = listening.getHost()
        assert isinstance(address, IPv4Address)
        return address.port

    async def listen_echo(
        self, creator: ReloadableServerTLS, kind: type[Echo] = Echo
    ) -> tuple[int, EchoFactory]:
        """``listen`` around a new ``EchoFactory`` of ``kind``."""
        factory = EchoFactory(kind)
        return await self.listen(creator, factory), factory

    def _close(self, listening: IListeningPort, factory: IProtocolFactory) -> Deferred[Any]:
        for client in self.clients:
            client.close()
        waits: list[Deferred[Any]] = [maybeDeferred(listening.stopListening)]
        if isinstance(factory, EchoFactory):
            for proto in factory.built:
                if proto.open and proto.transport is not None:
                    cast(Any, proto.transport).abortConnection()
                waits.append(proto.lost)
        return DeferredList(waits)

    def connect(self, port: int, ctx: ssl.SSLContext) -> Deferred[Client]:
        """Open a TLS client in a thread; it is closed after the test."""

        def keep(client: Client) -> Client:
            self.clients.append(client)
            return client

        return deferToThread(connect_tls, port, ctx).addCallback(keep)

    def connect_plain(self, port: int) -> Deferred[Client]:
        """Open a plaintext client in a thread; it is closed after the test."""

        def keep(client: Client) -> Client:
            self.clients.append(client)
            return client

        return deferToThread(connect_plain, port).addCallback(keep)

    def ask(self, client: Client, line: bytes) -> Deferred[bytes]:
        """``client.ask(line)`` in a thread."""
        return deferToThread(client.ask, line)

    def attempt(self, port: int, ctx: ssl.SSLContext, line: bytes = b"ping") -> Deferred[Attempt]:
        """``attempt(...)`` in a thread."""
        return deferToThread(attempt, port, ctx, line)


# -- handshakes and versions -------------------------------------------------------------------


class VersionTests(TLSTestCase):
    """Which TLS versions the listener accepts."""

    async def test_tls12_client_is_served(self) -> None:
        """A TLS 1.2-only client completes the handshake (with the chain) and gets answers."""
        port, _ = await self.listen_echo(self.creator())
        client = await self.connect(port, client_context(self.pki, version=ssl.TLSVersion.TLSv1_2))
        answer = await self.ask(client, b"hello")
        assert answer == b"echo hello"
        assert client.version == "TLSv1.2"
        cipher = cast(ssl.SSLSocket, client.sock).cipher()
        assert cipher is not None
        assert cipher[0].startswith("ECDHE-") and ("GCM" in cipher[0] or "CHACHA" in cipher[0])
        assert client.server_cert == self.pki.server.der

    async def test_tls13_client_is_served(self) -> None:
        """A TLS 1.3-only client completes the handshake and gets answers."""
        port, _ = await self.listen_echo(self.creator())
        client = await self.connect(port, client_context(self.pki, version=ssl.TLSVersion.TLSv1_3))
        first = await self.ask(client, b"one")
        second = await self.ask(client, b"two")
        assert (first, second) == (b"echo one", b"echo two")
        assert client.version == "TLSv1.3"

    async def test_tls11_client_is_refused(self) -> None:
        """A client that only speaks TLS 1.1 gets no connection; the server logs why, once."""
        port, factory = await self.listen_echo(self.creator())
        result = await self.attempt(port, client_context(self.pki, version=ssl.TLSVersion.TLSv1_1))
        assert result.answer is None, result
        await factory.built[0].lost
        failed = [line for line in self.log.lines("info") if "handshake" in line]
        assert len(failed) == 1, failed
        assert "127.0.0.1:" in failed[0] and "unsupported protocol" in failed[0], failed
        assert self.log.failures() == []

    async def test_tls12_client_without_an_aead_cipher_is_refused(self) -> None:
        """A TLS 1.2 client offering only CBC (non-AEAD) suites is refused: no shared cipher."""
        port, factory = await self.listen_echo(self.creator())
        ctx = client_context(self.pki, version=ssl.TLSVersion.TLSv1_2)
        ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
        result = await self.attempt(port, ctx)
        assert result.answer is None, result
        await factory.built[0].lost
        failed = [line for line in self.log.lines("info") if "handshake" in line]
        assert len(failed) == 1 and "no shared cipher" in failed[0], failed


class PlaintextTests(TLSTestCase):
    """A client speaking plaintext to the TLS port."""

    async def test_plaintext_client_is_dropped_and_others_carry_on(self) -> None:
        """Plaintext ``x STAT`` closes only that connection; TLS clients before/after work."""
        port, factory = await self.listen_echo(self.creator())
        ctx = client_context(self.pki)
        before = await self.connect(port, ctx)
        answer = await self.ask(before, b"first")
        assert answer == b"echo first"

        plain = await self.connect_plain(port)
        await deferToThread(plain.sock.sendall, b"x STAT\n")
        data = await deferToThread(plain.read_to_end)
        assert b"echo" not in data and b"STAT" not in data
        assert data == b"" or data[:1] == b"\x15"  # nothing, or a TLS alert record
        await factory.built[1].lost

        answer = await self.ask(before, b"still there")
        assert answer == b"echo still there"
        after = await self.connect(port, ctx)
        answer = await self.ask(after, b"new")
        assert answer == b"echo new"
        assert [p.open for p in factory.built] == [True, False, True]

        failed = [line for line in self.log.lines("info") if "handshake" in line]
        assert len(failed) == 1, failed
        assert "127.0.0.1:" in failed[0], failed
        assert self.log.failures() == []

    async def test_client_leaving_before_the_handshake_is_logged_at_debug(self) -> None:
        """A TCP connect-and-close (a port check) logs one debug line and nothing louder."""
        port, factory = await self.listen_echo(self.creator())
        plain = await self.connect_plain(port)
        plain.close()
        await factory.built[0].lost
        assert not [line for line in self.log.lines("info") if "handshake" in line]
        quiet = [line for line in self.log.lines("debug") if "before the handshake" in line]
        assert len(quiet) == 1 and "127.0.0.1:" in quiet[0], quiet
        assert peer_certificate_subject(None) is None
        assert peer_certificate_subject(plain.sock) is None

    async def test_plaintext_client_on_a_real_ztick_listener(self) -> None:
        """Behind TLS, the ztick protocol answers STAT; a plaintext client is just dropped."""
        harness = make_harness(start=False)
        port = await self.listen(self.creator(), harness.factory)
        client = await self.connect(port, client_context(self.pki))
        answer = await self.ask(client, b"1 STAT")
        assert answer.startswith(b"1 uptime_ns ")
        plain = await self.connect_plain(port)
        await deferToThread(plain.sock.sendall, b"x STAT\n")
        data = await deferToThread(plain.read_to_end)
        assert b"x " not in data
        # The STAT answer is many lines; read past it, then ask for the count again.
        rest = await deferToThread(_read_until, client, b"1 OK\n")
        assert rest.endswith(b"1 OK\n")
        answer = await self.ask(client, b"2 STAT")
        more = await deferToThread(_read_until, client, b"2 OK\n")
        assert b"2 connections 1\n" in answer + b"\n" + more
        # Leave with close_notify (a TLS half-close): the server answers it and closes.
        await deferToThread(_leave, client)
        assert harness.factory.connections == 0


def _leave(client: Client) -> None:
    """Send ``close_notify``, wait for the server's, then read to its TCP close."""
    sock = client.sock
    assert isinstance(sock, ssl.SSLSocket)
    raw = sock.unwrap()
    while raw.recv(4096):
        pass


def _read_until(client: Client, end: bytes) -> bytes:
    while end not in client.buffer:
        chunk = client.sock.recv(4096)
        if not chunk:
            break
        client.buffer += chunk
    data, _, client.buffer = client.buffer.partition(end)
    return data + end


# -- client certificates -----------------------------------------------------------------------


class ClientCertificateTests(TLSTestCase):
    """With ``tls_client_ca`` set, only clients with a certificate from those CAs get in."""

    async def test_client_certificates(self) -> None:
        """No certificate, another CA's or an expired one: refused; the right CA's: served."""
        creator = self.creator(self.pki.ca.cert_path)
        assert creator.client_auth
        assert creator.client_cas == (self.pki.ca.subject,)
        port, factory = await self.listen_echo(creator)
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            good = await self.attempt(
                port, client_context(self.pki, version=version, cert=self.pki.client), b"whoami"
            )
            assert good.answer == self.pki.client.subject.encode(), (version, good)
            for cert in (None, self.pki.other_client, self.pki.expired_client):
                bad = await self.attempt(
                    port, client_context(self.pki, version=version, cert=cert)
                )
                assert bad.answer is None, (version, cert, bad)
        await DeferredList([p.lost for p in factory.built])
        failed = [line for line in self.log.lines("info") if "handshake" in line]
        assert len(failed) == 6, failed
        joined = "\n".join(failed)
        assert "client-of-other-ca" in joined and "not signed by a trusted client CA" in joined
        assert "client-expired" in joined and "expired" in joined
        assert "certificate" in failed[0]  # no certificate at all
        assert self.log.failures() == []

    async def test_without_client_ca_a_client_certificate_is_not_asked(self) -> None:
        """Without a client CA, anonymous clients get in and ``whoami`` says so."""
        port, _ = await self.listen_echo(self.creator())
        result = await self.attempt(port, client_context(self.pki), b"whoami")
        assert result.answer == b"anonymous"


# -- reload ------------------------------------------------------------------------------------


class ReloadTests(TLSTestCase):
    """``reload()`` swaps the certificate for new connections only."""

    def replace_server_files(self, subject: str) -> Issued:
        """Write a new certificate and key over the files the server was started with."""
        fresh = issue_server(self.pki.directory, "fresh", self.pki.intermediate, subject)
        with open(self.pki.server.cert_path, "wb") as f:
            f.write(cert_pem(fresh.cert, self.pki.intermediate.cert))
        with open(self.pki.server.key_path, "wb") as f:
            f.write(key_pem(fresh.key))
        return fresh

    async def test_reload_serves_the_new_certificate_to_new_connections(self) -> None:
        """After reload, new clients see the new certificate; an open connection still works."""
        creator = self.creator()
        port, _ = await self.listen_echo(creator)
        ctx = client_context(self.pki)
        old = await self.connect(port, ctx)
        assert old.server_cert == self.pki.server.der
        fresh = self.replace_server_files("localhost")
        assert creator.reload() is True
        assert creator.certificate.subject == fresh.subject
        assert creator.reloads == 1
        new = await self.connect(port, ctx)
        assert new.server_cert == fresh.der
        answers = await gatherResults([self.ask(old, b"old"), self.ask(new, b"new")])
        assert answers == [b"echo old", b"echo new"]
        assert any("reloaded" in line for line in self.log.lines("info"))

    async def test_reload_with_a_broken_file_keeps_the_old_certificate(self) -> None:
        """A reload that fails logs an error naming the file and keeps serving the old cert."""
        creator = self.creator()
        port, _ = await self.listen_echo(creator)
        with open(self.pki.server.cert_path, "wb") as f:
            f.write(b"not a certificate\n")
        assert creator.reload() is False
        errors = self.log.lines("error")
        assert len(errors) == 1 and self.pki.server.cert_path in errors[0], errors
        result = await self.attempt(port, client_context(self.pki))
        assert result.answer == b"echo ping"
        assert result.server_cert == self.pki.server.der
        assert creator.reloads == 0

    def test_reload_with_a_half_written_pair_is_refused(self) -> None:
        """A new certificate with the old key (key not written yet) is refused by reload."""
        creator = self.creator()
        before = creator.certificate
        fresh = issue_server(self.pki.directory, "fresh", self.pki.intermediate)
        with open(self.pki.server.cert_path, "wb") as f:
            f.write(cert_pem(fresh.cert))
        assert creator.reload() is False
        assert creator.certificate is before
        errors = self.log.lines("error")
        assert len(errors) == 1 and "does not match" in errors[0], errors
        assert self.pki.server.key_path in errors[0]

    def test_sighup_reloads_in_the_reactor_and_chains(self) -> Deferred[None]:
        """SIGHUP runs ``reload()`` via the reactor and still calls the previous handler."""
        creator = self.creator()
        called: list[int] = []
        reloaded: Deferred[None] = Deferred()

        def previous(signum: int, frame: FrameType | None) -> None:
            called.append(signum)

        original = signal.signal(signal.SIGHUP, previous)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        real_reload = creator.reload

        def reload() -> bool:
            ok = real_reload()
            reloaded.callback(None)
            return ok

        creator.reload = reload  # type: ignore[method-assign]
        fresh = self.replace_server_files("localhost")
        uninstall = install_reload_on_sighup(cast(IReactorFromThreads, reactor), creator)
        os.kill(os.getpid(), signal.SIGHUP)

        def check(_: None) -> None:
            assert called == [signal.SIGHUP]
            assert creator.certificate.subject == fresh.subject
            assert creator.reloads == 1
            uninstall()
            assert signal.getsignal(signal.SIGHUP) is previous

        return reloaded.addCallback(check)

    def test_reload_service_installs_and_removes_the_handler(self) -> None:
        """``TLSReloadService`` handles SIGHUP while running and restores the old handler."""

        def previous(signum: int, frame: FrameType | None) -> None:
            """A stand-in for a handler installed before."""

        original = signal.signal(signal.SIGHUP, previous)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        service = TLSReloadService(cast(IReactorFromThreads, reactor), self.creator())
        service.startService()
        assert signal.getsignal(signal.SIGHUP) not in (previous, original)
        service.stopService()
        assert signal.getsignal(signal.SIGHUP) is previous


class CloseTests(TLSTestCase):
    """Closing over TLS, from either side, with a protocol registered as a producer."""

    async def test_server_close_does_not_wait_for_the_client(self) -> None:
        """After ``bye`` the server answers, sends ``close_notify`` and closes TCP at once.

        This client never answers with its own ``close_notify``; the server must not wait.
        """
        port, factory = await self.listen_echo(self.creator())
        answer, flags = await deferToThread(raw_exchange, port, b"a\nbye\n", close_notify=False)
        assert answer == b"echo a\nbye\n"
        assert flags & SSL.RECEIVED_SHUTDOWN
        await factory.built[0].lost

    async def test_close_notify_is_a_half_close(self) -> None:
        """A client ending its side with ``close_notify`` still gets every answer (1.2, 1.3)."""
        port, factory = await self.listen_echo(self.creator(), HalfCloseEcho)
        for version in (SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION):
            answer, flags = await deferToThread(
                raw_exchange, port, b"a\nb\n", close_notify=True, version=version
            )
            assert answer == b"echo a\necho b\neof\n", (version, answer)
            assert flags & SSL.RECEIVED_SHUTDOWN
        await DeferredList([p.lost for p in factory.built])

    async def test_ztick_client_piping_through_socat_gets_its_answers(self) -> None:
        """Two ztick requests then ``close_notify`` (what socat sends at EOF): both answered."""
        harness = make_harness(start=False)
        port = await self.listen(self.creator(), harness.factory)
        answer, _ = await deferToThread(
            raw_exchange, port, b"1 GET nope\n2 QUERY\n", close_notify=True
        )
        assert answer == b"1 ERROR\n2 OK\n"


# -- setup errors ------------------------------------------------------------------------------


class SetupErrorTests(unittest.TestCase):
    """``TLSSetupError`` names the file and what is wrong with it."""

    def setUp(self) -> None:
        self.pki = make_pki(temp_dir(self))
        self.dir = self.pki.directory

    def error(self, cert: str, key: str, ca: str | None = None) -> str:
        """The message of the ``TLSSetupError`` these files raise."""
        try:
            ReloadableServerTLS(cert, key, ca)
        except TLSSetupError as e:
            message = str(e)
        else:
            raise AssertionError("no TLSSetupError")
        assert "\n" not in message
        return message

    def write(self, name: str, data: bytes) -> str:
        """A file in the test directory."""
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_missing_file(self) -> None:
        """A certificate or key path that does not exist is named, with the OS reason."""
        missing = os.path.join(self.dir, "nope.pem")
        message = self.error(missing, self.pki.server.key_path)
        assert message.startswith(f"{missing}: cannot read the TLS certificate")
        assert "No such file" in message
        message = self.error(self.pki.server.cert_path, missing)
        assert message.startswith(f"{missing}: cannot read the TLS private key")

    def test_not_pem(self) -> None:
        """A certificate file or key file that is not PEM is named."""
        junk = self.write("junk.pem", b"\x30\x82\x01\x0a binary DER perhaps")
        message = self.error(junk, self.pki.server.key_path)
        assert message.startswith(f"{junk}: ") and "no PEM certificate" in message
        message = self.error(self.pki.server.cert_path, junk)
        assert message.startswith(f"{junk}: ") and "no PEM private key" in message
        broken = self.write(
            "broken.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        )
        message = self.error(broken, self.pki.server.key_path)
        assert message.startswith(f"{broken}: ") and "cannot be decoded" in message

    def test_key_does_not_match(self) -> None:
        """A key from another certificate is refused, naming both files."""
        message = self.error(self.pki.server.cert_path, self.pki.client.key_path)
        assert message == (
            f"{self.pki.client.key_path}: the TLS private key does not match the certificate"
            f" in {self.pki.server.cert_path}"
        )

    def test_chain_in_the_wrong_order(self) -> None:
        """Intermediate first, then the leaf: the message says to put the leaf first."""
        swapped = self.write(
            "swapped.pem", cert_pem(self.pki.intermediate.cert, self.pki.server.cert)
        )
        message = self.error(swapped, self.pki.server.key_path)
        assert "certificate #2" in message and "first" in message

    def test_client_ca_file_without_certificates(self) -> None:
        """A client CA file with no certificate in it is named."""
        empty = self.write("empty-ca.pem", key_pem(self.pki.ca.key))
        message = self.error(self.pki.server.cert_path, self.pki.server.key_path, empty)
        assert message.startswith(f"{empty}: the TLS client CA file holds no PEM certificate")

    def test_encrypted_key(self) -> None:
        """A passphrase-protected key is refused with a message saying so."""
        from cryptography.hazmat.primitives import serialization

        encrypted = self.write(
            "encrypted.key",
            self.pki.server.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"secret"),
            ),
        )
        message = self.error(self.pki.server.cert_path, encrypted)
        assert message.startswith(f"{encrypted}: ") and "passphrase" in message

    def test_combined_file_and_warnings(self) -> None:
        """Key and chain in one file load; an expired, world-readable pair loads with warnings."""
        combined = self.write(
            "combined.pem",
            key_pem(self.pki.server.key)
            + cert_pem(self.pki.server.cert, self.pki.intermediate.cert),
        )
        creator = ReloadableServerTLS(combined, combined)
        assert creator.certificate.chain_length == 2
        assert creator.certificate.subject == self.pki.server.subject
        assert "no client certificates" in creator.describe()

        log = LogCapture()
        globalLogPublisher.addObserver(log)
        self.addCleanup(globalLogPublisher.removeObserver, log)
        os.chmod(self.pki.expired_client.key_path, 0o644)
        ReloadableServerTLS(self.pki.expired_client.cert_path, self.pki.expired_client.key_path)
        warnings = log.lines("warn")
        assert any("expired" in w and self.pki.expired_client.cert_path in w for w in warnings)
        assert any("readable by other users" in w for w in warnings)

        later = datetime.now(UTC) + timedelta(days=365)
        log.events.clear()
        ReloadableServerTLS(self.pki.server.cert_path, self.pki.server.key_path, now=lambda: later)
        assert any("expired" in w for w in log.lines("warn"))
