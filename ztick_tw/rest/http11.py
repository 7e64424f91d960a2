"""HTTP/1.1 framing for the REST listener: bytes to requests, answers to bytes.

``twisted.web``'s ``HTTPChannel`` and ``Request`` cost ~130 µs of Python a request on
this project's machine (a bare ``Site`` answering a fixed body tops out at ~7,600
PUT/s; docs/benchmarks.md), more than the whole budget of issue 11's 10,000 PUT/s.  So
the REST listener parses with ``httptools`` (llhttp, the parser of Node.js and uvicorn,
in C) and keeps here only what a server must do around it:

- one request at a time per connection, answers in order (pipelined requests wait,
  parsed, and reading pauses while more than a few wait);
- bounds: request head ``MAX_HEAD`` bytes and ``MAX_HEADERS`` lines (431), body
  ``MAX_BODY`` (413, before a byte of it when declared, as soon as it passes when
  chunked); a malformed request is answered 400 with llhttp's reason; after any of
  these the connection is closed;
- back-pressure: while the socket's send buffer is full (a client that does not read)
  nothing more is read or parsed;
- an idle timeout (no byte for ``timeout`` seconds), one ``DelayedCall`` a connection,
  re-armed lazily instead of reset on every read;
- answers with a length; a streamed answer (``GET /jobs``) with chunked encoding, from
  a pull producer driven as the socket drains; ``HEAD`` without the body;
  ``Expect: 100-continue``; ``Connection: close`` and HTTP/1.0 honoured.

Each request is an ``HttpRequest`` (``rest/request.py``: the part of ``twisted.web``'s
``Request`` the resources use), so ``RestResource`` and the ``MetricsResource`` render
on it.  ``HttpSite`` is the listener's factory (connections counted and capped).
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import httptools
from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from ztick_tw.logs import Tally
from ztick_tw.rest.request import _REASONS, Dates, HttpRequest

log = Logger(namespace="ztick_tw.rest")

#: The largest request body accepted (SPEC §7: over 1 MB is 413).
MAX_BODY = 1_000_000
#: The request line and headers together, at most (else 431).
MAX_HEAD = 16_384
#: Header lines at most (else 431).
MAX_HEADERS = 100
#: Seconds between two warnings about connections refused at ``max_connections``.
REFUSED_REPORT_S = 10.0
#: Parsed requests waiting behind the one being answered before reading pauses.
MAX_WAITING = 8


def _error_body(why: str) -> bytes:
    return json.dumps({"error": why}).encode()


@implementer(IPushProducer)
class HttpChannel(Protocol):
    """One HTTP/1.1 connection: llhttp's callbacks build requests, answered in order."""

    factory: HttpSite
    transport: Any  # a TCP or TLS transport: also a producer and a consumer

    def __init__(self) -> None:
        self._parser: Any = None
        self._waiting: deque[HttpRequest] = deque()
        self._active: HttpRequest | None = None
        self._closing = False
        self._serving = False  # in request_done's loop over waiting requests
        # the request being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._body: list[bytes] = []
        self._body_size = 0
        # flow
        self._send_full = False  # the transport paused us: its buffer is full
        self._reading = True
        self._producer: Any = None
        self._producing = False
        self._last = 0.0
        self._idle: IDelayedCall | None = None
        self._socket: Any = None

    @property
    def dates(self) -> Dates:
        """The ``Date`` header's source (the site's, formatted once a second)."""
        return self.factory.dates

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        """Count the connection, start parsing, arm the idle timeout."""
        site = self.factory
        site.connections += 1
        self._parser = httptools.HttpRequestParser(self)
        transport = self.transport
        transport.registerProducer(self, True)
        if isinstance(transport, tcp.Connection):  # plain TCP: answers may go out at once
            self._socket = transport.socket
        if site.timeout:
            self._last = site.reactor.seconds()
            self._idle = site.reactor.callLater(site.timeout, self._check_idle)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Uncount it; a request still being answered learns it is lost."""
        self.factory.connections -= 1
        self._closing = True
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
        if self._active is not None:
            self._active.lost()
            self._active = None
        self._waiting.clear()

    def _check_idle(self) -> None:
        site = self.factory
        assert site.timeout
        idle = site.reactor.seconds() - self._last
        if idle >= site.timeout:
            self._idle = None
            self._close()
        else:
            self._idle = site.reactor.callLater(site.timeout - idle, self._check_idle)

    def send(self, data: bytes) -> None:
        """Write ``data``: straight to the socket when nothing is waiting to be sent.

        Twisted's TCP ``write`` only buffers and asks the reactor to watch for room; the
        answer leaves one reactor turn later, after two ``epoll_ctl`` calls (about 20 µs
        of a 60 µs request here).  When the transport's buffer is empty the bytes are
        sent now and only what the kernel did not take is handed to ``write``, so the
        order of bytes is the same either way.  TLS goes through its transport.
        """
        transport = self.transport
        sock = self._socket
        if (
            sock is not None
            and not transport._tempDataLen
            and not transport.dataBuffer
            and transport.connected
            and not transport.disconnecting
        ):
            try:
                sent = sock.send(data)
            except OSError:  # EAGAIN, or an error Twisted's own write will find and report
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        """Feed llhttp; a malformed request is answered 400 and the connection closed."""
        if self._closing:
            return
        if self._idle is not None:
            self._last = self.factory.reactor.seconds()
        while data and not self._closing:
            try:
                self._parser.feed_data(data)
                return
            except httptools.HttpParserUpgrade as e:
                # Upgrade (h2c, websocket) is not offered: the request was a plain one,
                # and what follows it is parsed as the next request.
                self._parser = httptools.HttpRequestParser(self)
                offset = e.args[0] if e.args and isinstance(e.args[0], int) else len(data)
                data = data[offset:]
            except httptools.HttpParserError as e:
                if not self._closing:
                    why = str(e).strip() or "malformed request"
                    self.refuse(400, f"bad request: {why}")
                return
            except _Refused:
                return

    # -- llhttp's callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        """A new request starts."""
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        """Part of the request target (bounded with the headers)."""
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD:
            self.refuse(431, f"the request line and headers are over {MAX_HEAD} bytes")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header line (bounded in number and size)."""
        headers = self._headers
        headers.append((name.lower(), value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD or len(headers) > MAX_HEADERS:
            self.refuse(
                431, f"over {MAX_HEADERS} header lines or {MAX_HEAD} bytes of request head"
            )
            raise _Refused

    def on_headers_complete(self) -> None:
        """Refuse a declared body over the bound; answer ``Expect: 100-continue``."""
        length = None
        expect = None
        for name, value in self._headers:
            if name == b"content-length":
                length = value
            elif name == b"expect":
                expect = value
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = 0  # llhttp refuses it itself
            if declared > MAX_BODY:
                self.refuse(413, f"the body is over {MAX_BODY} bytes")
                raise _Refused
        if (
            expect is not None
            and expect.lower() == b"100-continue"
            and self._active is None
            and not self._waiting
        ):
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        """Part of the body (chunked or not), refused once past the bound."""
        self._body_size += len(body)
        if self._body_size > MAX_BODY:
            self.refuse(413, f"the body is over {MAX_BODY} bytes")
            raise _Refused
        self._body.append(body)

    def on_message_complete(self) -> None:
        """The request is whole: answer it now, or after those before it."""
        parser = self._parser
        parts = self._body
        request = HttpRequest(
            self,
            parser.get_method(),
            self._url,
            parser.get_http_version(),
            parser.should_keep_alive(),
            self._headers,
            parts[0] if len(parts) == 1 else b"".join(parts),
        )
        self._body = []
        if self._active is None:
            self._serve(request)
        else:
            self._waiting.append(request)
            if len(self._waiting) >= MAX_WAITING:
                self._flow()

    # -- answering -------------------------------------------------------------------

    def _serve(self, request: HttpRequest) -> None:
        """Render ``request`` now (its answer may come later: ``NOT_DONE_YET``)."""
        self._active = request
        try:
            body = self.factory.resource.render(request)
        except Exception:
            log.failure("REST: rendering {path} failed", path=request.path)
            if not request.finished and not request._started:
                request.setResponseCode(500)
                request._response_headers = [(b"content-type", b"application/json")]
                request.answer(_error_body("internal error"))
            return
        if body is NOT_DONE_YET:
            return
        if not request.finished:
            request.answer(body)

    def request_done(self, request: HttpRequest) -> None:
        """``request``'s answer is complete: close, or answer the next one waiting."""
        if request is not self._active:
            return
        self._active = None
        if not request.keep_alive or self._closing:
            self._close()
            return
        if self._serving:
            return  # answered inside the loop below: it takes the next one itself
        self._serving = True
        try:
            waiting = self._waiting
            while waiting and self._active is None and not self._closing:
                self._serve(waiting.popleft())
        finally:
            self._serving = False
        self._flow()

    def refuse(self, code: int, why: str) -> None:
        """Answer ``code`` with ``why`` out of turn and close (the stream is unusable)."""
        if self._closing:
            return
        self._closing = True
        body = _error_body(why)
        self.send(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (code, _REASONS.get(code, b""), len(body), body)
        )
        self._close()

    def _close(self) -> None:
        """Close once what was written is sent (no producer may hold the close back)."""
        self._closing = True
        self._producer = None
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # -- flow ------------------------------------------------------------------------

    def _flow(self) -> None:
        """Read while the send buffer has room and few requests wait; drive a producer."""
        if self._closing:
            return
        want = not self._send_full and len(self._waiting) < MAX_WAITING
        if want != self._reading:
            self._reading = want
            if want:
                self.transport.resumeProducing()
            else:
                self.transport.pauseProducing()
        if self._producer is not None and not self._send_full and not self._producing:
            self._producing = True
            try:
                while self._producer is not None and not self._send_full:
                    self._producer.resumeProducing()
            finally:
                self._producing = False

    def register_producer(self, producer: Any, streaming: bool) -> None:
        """A request's body producer (pull): asked for more while the socket drains."""
        if streaming:
            raise NotImplementedError("only pull producers write REST answers")
        self._producer = producer
        self._flow()

    def unregister_producer(self) -> None:
        """The request's producer is done."""
        self._producer = None

    def pauseProducing(self) -> None:
        """The transport's send buffer is full: stop reading and producing."""
        self._send_full = True
        self._flow()

    def resumeProducing(self) -> None:
        """The send buffer drained: read and produce again."""
        self._send_full = False
        self._flow()

    def stopProducing(self) -> None:
        """The transport is going away (``connectionLost`` follows)."""
        self._closing = True


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that was refused."""


class HttpSite(Factory):
    """Builds the connections of an HTTP listener; ``connections`` counts the live ones.

    ``resource.render(request)`` answers every request (bytes, or ``NOT_DONE_YET`` and
    the answer later); ``timeout`` closes a connection idle that long (``None``: never).
    """

    protocol = HttpChannel  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        resource: Any,
        timeout: float | None,
        reactor: IReactorTime,
        max_connections: int = 1024,
    ) -> None:
        self.resource = resource
        self.timeout = timeout
        self.reactor = reactor
        self.dates = Dates(reactor.seconds)
        self.connections = 0
        self.max_connections = max_connections
        self.refused = 0  # connections closed at the limit, in all
        self._refused_tally = Tally(reactor, REFUSED_REPORT_S)

    def buildProtocol(self, addr: Any) -> Any:
        """A channel, or ``None`` (the connection is closed) at ``max_connections``."""
        if self.connections >= self.max_connections:
            self._refuse(addr)
            return None
        return super().buildProtocol(addr)

    def _refuse(self, addr: Any) -> None:
        """Count a connection refused at the limit; log at most every 10 s, with a count."""
        self.refused += 1
        count = self._refused_tally.note()
        if count:
            log.warn(
                "REST: connection limit reached ({limit} connections): refused {count}"
                " connection(s) since the last report, the latest from {peer}",
                limit=self.max_connections,
                count=count,
                peer=str(getattr(addr, "host", addr)),
            )
