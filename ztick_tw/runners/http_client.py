"""The http runner's client side: a bounded HTTP/1.1 response reader and its pool.

Twisted's ``HTTP11ClientProtocol`` reads a response head without bounds; here a
subclass counts bytes, lines and informational responses (``MAX_HEAD_BYTES``,
``MAX_HEADER_LINES``, ``MAX_HEAD_LINE_BYTES``, ``MAX_INFORMATIONAL``) and aborts past
them (``ResponseHeadRefused``), in a pool of its own that logs nothing per connection.
Also the request body producer, the bounded body reader and the reasons a delivery's
failure is told with.
"""

from __future__ import annotations

import re
import typing
from typing import Any, Final

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import (
    IConsumer,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HEADER, STATUS, HTTP11ClientProtocol
from twisted.web.client import (
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from ztick_tw.runners import trust

log = Logger()

#: How much of a failed response's body is quoted in the reason.
REASON_BODY_BYTES = 200
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\U0010ffff]+")

#: Bytes of a response head read at most: status lines and header lines, those of
#: informational (1xx) responses included.  Past it the connection is aborted.
MAX_HEAD_BYTES: Final = 65536
#: Header lines (continuation lines included) one response may have.
MAX_HEADER_LINES: Final = 100
#: Bytes of one status or header line, its line end not counted.  The same as Twisted's
#: own limit (``LineReceiver.MAX_LENGTH``), which closes with a misleading reason.
MAX_HEAD_LINE_BYTES: Final = 16384
#: Informational (1xx) responses accepted before the final one (Go's client allows 5).
MAX_INFORMATIONAL: Final = 5


def load_trust_root(ca_file: str) -> Any:
    """The trust root for https made of every certificate in the PEM file ``ca_file``.

    Raises ``ValueError`` (with the file name) when the file cannot be read or holds no
    PEM certificate, so a bad ``http_ca_file`` stops the daemon at start.
    """
    return trust.load_trust_root(ca_file, "http CA")


class ResponseHeadRefused(Exception):
    """A response head over one of the limits; ``received`` head bytes had been read."""

    def __init__(self, why: str, received: int) -> None:
        super().__init__(why)
        self.why = why
        self.received = received

    def __str__(self) -> str:
        return self.why


#: The states of Twisted's response parser while the response head is incomplete.
_HEAD_STATES: Final = frozenset({STATUS, HEADER})


class _BoundedClientProtocol(HTTP11ClientProtocol):
    """An HTTP/1.1 client connection that refuses an oversized response head.

    Twisted's response parser keeps every header line it is sent (it bounds one line, and
    then closes as if the server had), so a server that answers ``200 OK`` and then sends
    header lines forever grows the daemon without limit.  Here, while the head of the
    response is incomplete, received data is handed to the parser one line at a time and
    counted: the bytes of the head (:data:`MAX_HEAD_BYTES`), of one line
    (:data:`MAX_HEAD_LINE_BYTES`), the header lines (:data:`MAX_HEADER_LINES`) and the
    informational responses (:data:`MAX_INFORMATIONAL`).  Once the head is complete, the
    rest of the data goes to the parser in one piece, as before.  Over a limit, the
    connection is aborted (it never reaches the pool again) and the request fails with
    :class:`ResponseHeadRefused`.

    Private Twisted API, kept to this class: ``HTTP11ClientProtocol`` itself, its
    ``_parser`` and ``_disconnectParser``, and the parser's ``state``.
    """

    _head_bytes = 0
    _line_bytes = 0
    _header_lines = 0
    _informational = 0

    def request(self, request: Any) -> Deferred[IResponse]:
        self._head_bytes = self._line_bytes = 0
        self._header_lines = self._informational = 0
        return super().request(request)

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or parser.state not in _HEAD_STATES or self._whole_head(data):
            super().dataReceived(data)  # type: ignore[no-untyped-call]
            return
        start, size = 0, len(data)
        while start < size:
            end = data.find(b"\n", start) + 1
            ended = end > 0  # a whole line (the rest of one), or else the start of one
            if not ended:
                end = size
            state = parser.state
            self._head_bytes += end - start
            self._line_bytes += end - start
            why = self._over(state, self._line_bytes - ended)  # a line without its "\n"
            if why:
                self._refuse(why)
                return
            if ended:
                self._line_bytes = 0
            super().dataReceived(data if end - start == size else data[start:end])  # type: ignore[no-untyped-call]
            start = end
            if self._parser is not parser:
                # The response ended with its head, or the request failed: what follows
                # is dropped, as the parser drops it.
                return
            if parser.state not in _HEAD_STATES:  # the head is complete: the rest is body
                if start < size:
                    super().dataReceived(data[start:])  # type: ignore[no-untyped-call]
                return
            if not ended or state != HEADER:
                continue
            if parser.state == HEADER:
                self._header_lines += 1
                if self._header_lines > MAX_HEADER_LINES:
                    self._refuse(f"response has more than {MAX_HEADER_LINES} header lines")
                    return
            else:  # an empty line ended an informational response: a new head follows
                self._header_lines = 0
                self._informational += 1
                if self._informational > MAX_INFORMATIONAL:
                    self._refuse(f"more than {MAX_INFORMATIONAL} informational (1xx) responses")
                    return

    def _whole_head(self, data: bytes) -> bool:
        """True when ``data`` starts with a whole final response head within the limits.

        The common case, one read holding the whole head: it then goes to the parser in
        one piece, as without the limits, and costs one scan of the head.
        """
        if self._head_bytes or self._line_bytes:
            return False
        ends = [i for i in (data.find(b"\n\r\n"), data.find(b"\n\n")) if i >= 0]
        if not ends:
            return False
        end = min(ends)
        head_bytes = end + (3 if data[end + 1 : end + 2] == b"\r" else 2)
        if head_bytes > MAX_HEAD_BYTES:
            return False
        lines = data[:end].split(b"\n")
        if len(lines) - 1 > MAX_HEADER_LINES or max(map(len, lines)) > MAX_HEAD_LINE_BYTES:
            return False
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or status[1].startswith(b"1"):  # informational: counted
            return False
        self._head_bytes = head_bytes
        return True

    def _over(self, state: str, line: int) -> str:
        """Why the head read so far is refused, or "" when it is within the limits."""
        if line > MAX_HEAD_LINE_BYTES:
            what = "status" if state == STATUS else "header"
            return f"response {what} line exceeded {MAX_HEAD_LINE_BYTES} bytes"
        if self._head_bytes > MAX_HEAD_BYTES:
            return f"response headers exceeded {MAX_HEAD_BYTES} bytes"
        return ""

    def _refuse(self, why: str) -> None:
        """Abort the connection and fail the request with ``why``."""
        log.debug(
            "response head refused: {why}; {received} bytes read, connection aborted",
            why=why,
            received=self._head_bytes,
        )
        # Let the parser know data came, so the request fails with ResponseFailed and
        # not ResponseNeverReceived, which the pool would retry on a new connection.
        parser: Any = self._parser
        parser.dataReceived(b"")
        transport: Any = self.transport
        transport.abortConnection()
        failure = Failure(ResponseHeadRefused(why, self._head_bytes))  # type: ignore[no-untyped-call]
        self._disconnectParser(failure)  # type: ignore[no-untyped-call]


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory without "Starting factory" log lines per connection.

    Its connections bound the response head (:class:`_BoundedClientProtocol`).
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _BoundedClientProtocol(self._quiescentCallback)  # type: ignore[no-untyped-call]


#: Seconds an idle pooled connection is kept.  Below the 5 s keep-alive timeout of
#: Apache's default, so a connection the server is about to close is rarely reused.
IDLE_CONNECTION_SECONDS: Final = 4


class _Pool(HTTPConnectionPool):
    """A connection pool that keeps only connections the server will keep open too.

    Twisted's pool keeps a connection after an HTTP/1.0 response unless the server said
    ``Connection: close``; but an HTTP/1.0 server (Python's ``http.server`` among them)
    closes it anyway, and the next request on it fails with "connection closed before the
    response".  Such connections are closed here instead of being pooled.
    """

    _factory = _QuietClientFactory

    def _putConnection(self, key: Any, connection: Any) -> None:
        parser: Any = getattr(connection, "_parser", None)
        response = getattr(parser, "response", None)
        if parser is not None and response is not None and tuple(response.version[1:]) < (1, 1):
            tokens = b",".join(parser.connHeaders.getRawHeaders(b"connection", ())).lower()
            if b"keep-alive" not in tokens:
                connection.transport.loseConnection()
                return
        super()._putConnection(key, connection)  # type: ignore[no-untyped-call]


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory, written in one go."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class BodyConsumer(typing.Protocol):
    """Who is told when a ``_BodyReader`` is done (the http runner's delivery)."""

    def body_done(self, reader: _BodyReader, reason: Failure) -> None:
        """The body was read to its end, or cut off (``reason`` says which)."""


class _BodyReader(Protocol):
    """Reads a response body to its end, keeping a prefix and aborting past ``limit``.

    Without a ``delivery`` (nobody wants the response any more) it aborts at once.
    """

    def __init__(self, delivery: BodyConsumer | None, limit: int, tail_limit: int = 0) -> None:
        self.delivery = delivery
        self.limit = limit
        self.tail_limit = tail_limit
        self.received = 0
        self.prefix = b""
        self.tail = bytearray()
        self.cut_off = delivery is None
        self.finished = False

    def connectionMade(self) -> None:
        if self.delivery is None:
            self.abort()

    def dataReceived(self, data: bytes) -> None:
        if self.cut_off:
            return
        if len(self.prefix) < REASON_BODY_BYTES:
            self.prefix += data[: REASON_BODY_BYTES - len(self.prefix)]
        if self.tail_limit:
            tail = self.tail
            tail += data
            if len(tail) > 2 * self.tail_limit:
                del tail[: len(tail) - self.tail_limit]
        self.received += len(data)
        if self.received > self.limit:
            self.cut_off = True
            self.abort()

    def body_tail(self) -> bytes:
        """The last ``tail_limit`` bytes of the body read so far."""
        tail = self.tail
        return bytes(tail[len(tail) - self.tail_limit :] if len(tail) > self.tail_limit else tail)

    def abort(self) -> None:
        """Drop the connection under this response: it will not go back to the pool."""
        transport: Any = self.transport
        if transport is None:
            return
        # The body's transport is a proxy; abort the real connection when it can.
        real = getattr(transport, "_producer", None)
        abort = getattr(real, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished:
            return
        self.finished = True
        if self.delivery is not None:
            self.delivery.body_done(self, reason)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _printable(data: bytes) -> str:
    """A response body prefix fit for a log line: one line of printable text."""
    text = data.decode("utf-8", errors="replace")
    return " ".join(_NOT_PRINTABLE.sub(" ", text).split())


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, SSL.Error):
        details = [
            str(part[-1])
            for part in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else [])
            if isinstance(part, tuple) and part
        ]
        return "tls error: " + (", ".join(d for d in details if d) or _short(exc))
    return "tls error: certificate does not match the host name"


def _is_tls(exc: BaseException) -> bool:
    return isinstance(exc, SSL.Error | VerificationError)


def _failure_reason(failure: Failure) -> str:
    """A short reason for a failed request, looking inside Agent's wrapper errors."""
    exc: BaseException = failure.value if failure.value is not None else Exception("failed")
    inner: list[BaseException] = []
    reasons = getattr(exc, "reasons", None)
    if isinstance(reasons, list):
        inner = [r.value for r in reasons if isinstance(r, Failure) and r.value is not None]
    for candidate in inner:
        if isinstance(candidate, ResponseHeadRefused):
            return candidate.why
    for candidate in inner or [exc]:
        if _is_tls(candidate):
            return _tls_reason(candidate)
    for candidate in [*inner, exc]:
        if isinstance(candidate, net_error.ConnectionRefusedError):
            return "connection refused"
        if isinstance(candidate, net_error.DNSLookupError):
            return "dns lookup failed"
        if isinstance(candidate, net_error.NoRouteError):
            return "no route to host"
        if isinstance(candidate, net_error.TCPTimedOutError | net_error.TimeoutError):
            return "connect timed out"
        if isinstance(candidate, CancelledError):
            return "cancelled"
    for candidate in inner:
        if isinstance(candidate, net_error.ConnectionDone | net_error.ConnectionLost):
            return "connection closed before the response"
    if isinstance(exc, net_error.ConnectError):
        return f"connect failed: {_short(exc)}"
    if inner:
        return _short(inner[0])
    return _short(exc)
