"""One HTTP request and its answer, as the REST resources see it.

:class:`HttpRequest` offers the part of ``twisted.web.server.Request`` the resources use
(``method``, ``postpath``, ``args``, ``getHeader``, ``setResponseCode``, ``setHeader``,
``write``, ``finish``, ``notifyFinish``, ``registerProducer``) plus ``answer`` (the
whole answer with its length, the common case).  It writes through its channel
(``http11.HttpChannel``; what it uses of it is :class:`Channel`).
"""

from __future__ import annotations

import typing
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools
from twisted.internet.defer import Deferred

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_NO_BODY = frozenset({204, 304})


def parse_query(query: bytes) -> dict[bytes, list[bytes]]:
    """``a=1&b=&a=2`` to ``{a: [1, 2], b: [""]}``, as bytes (any byte may be %-escaped)."""
    args: dict[bytes, list[bytes]] = {}
    for pair in query.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.replace(b"+", b" ").partition(b"=")
        args.setdefault(unquote_to_bytes(name), []).append(unquote_to_bytes(value))
    return args


class Dates:
    """The ``Date`` header's value, formatted once a second."""

    def __init__(self, seconds: Any) -> None:
        self._seconds = seconds
        self._at = -1
        self._value = b""

    def now(self) -> bytes:
        """``Date``'s value for this second."""
        second = int(self._seconds())
        if second != self._at:
            self._at = second
            self._value = formatdate(second, usegmt=True).encode()
        return self._value


class Channel(typing.Protocol):
    """What a request uses of its connection (``http11.HttpChannel``)."""

    @property
    def dates(self) -> Dates:
        """The ``Date`` header's source."""

    def send(self, data: bytes) -> None:
        """Write ``data`` to the client, in order."""

    def request_done(self, request: HttpRequest) -> None:
        """``request``'s answer is complete."""

    def register_producer(self, producer: Any, streaming: bool) -> None:
        """A pull producer writes the rest of the body."""

    def unregister_producer(self) -> None:
        """The producer is done."""


class HttpRequest:
    """One request and its answer (what the resources see of ``twisted.web``'s)."""

    __slots__ = (
        "_args",
        "_chunked",
        "_disconnected",
        "_notify",
        "_postpath",
        "_response_headers",
        "_started",
        "body",
        "channel",
        "code",
        "finished",
        "headers",
        "keep_alive",
        "method",
        "path",
        "uri",
        "version",
    )

    def __init__(
        self,
        channel: Channel,
        method: bytes,
        uri: bytes,
        version: str,
        keep_alive: bool,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        self.channel = channel
        self.method = method
        self.uri = uri
        if uri[:1] == b"/":
            path, _, _ = uri.partition(b"?")
        else:  # absolute-form (a proxy's), or *: the path of the parsed URL
            try:
                path = httptools.parse_url(uri).path or b"/"
            except httptools.HttpParserInvalidURLError:
                path = b"/"
        self.path = path
        self.version = version
        self.keep_alive = keep_alive
        self.headers = headers
        self.body = body
        self.code = 200
        self.finished = False
        self._disconnected = False
        self._response_headers: list[tuple[bytes, bytes]] = []
        self._args: dict[bytes, list[bytes]] | None = None
        self._postpath: list[bytes] | None = None
        self._started = False
        self._chunked = False
        self._notify: list[Deferred[None]] | None = None

    # -- what was asked --------------------------------------------------------------

    @property
    def postpath(self) -> list[bytes]:
        """The path's segments, each unquoted after the split (``%2F`` stays in one)."""
        if self._postpath is None:
            self._postpath = [unquote_to_bytes(p) for p in self.path[1:].split(b"/")]
        return self._postpath

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        """The query string's arguments, each name with its values in order."""
        if self._args is None:
            _, _, query = self.uri.partition(b"?")
            self._args = parse_query(query)
        return self._args

    def getHeader(self, name: bytes) -> bytes | None:
        """The last value of header ``name`` (lower case), or None."""
        found = None
        for key, value in self.headers:
            if key == name:
                found = value
        return found

    # -- the answer ------------------------------------------------------------------

    def setResponseCode(self, code: int) -> None:
        """The answer's status."""
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        """Set response header ``name`` (lower case), replacing an earlier value."""
        headers = self._response_headers
        for i, (key, _) in enumerate(headers):
            if key == name:
                headers[i] = (name, value)
                return
        headers.append((name, value))

    def write(self, data: bytes) -> None:
        """Send part of the body (the head first, chunked unless a length was set)."""
        if self.finished or self._disconnected:
            return
        if not self._started:
            self._chunked = self.getResponseHeader(b"content-length") is None
            self._send_head(None)
        if self.method == b"HEAD" or self.code in _NO_BODY or not data:
            return
        if self._chunked and self.keep_alive:
            self.channel.send(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.channel.send(data)

    def getResponseHeader(self, name: bytes) -> bytes | None:
        """A response header set so far, or None."""
        for key, value in self._response_headers:
            if key == name:
                return value
        return None

    def finish(self) -> None:
        """The answer is complete: end it and let the connection go on."""
        if self.finished or self._disconnected:
            return
        if not self._started:
            self._send_head(0)
        elif (
            self._chunked
            and self.keep_alive
            and self.method != b"HEAD"
            and self.code not in _NO_BODY
        ):
            self.channel.send(b"0\r\n\r\n")
        self.finished = True
        notify, self._notify = self._notify, None
        for d in notify or ():
            d.callback(None)
        self.channel.request_done(self)

    def answer(self, body: bytes) -> None:
        """Send the whole answer at once, with its length (the common case)."""
        if self.finished or self._disconnected:
            return
        self._send_head(len(body), body)
        self.finished = True
        notify, self._notify = self._notify, None
        for d in notify or ():
            d.callback(None)
        self.channel.request_done(self)

    def _send_head(self, length: int | None, body: bytes = b"") -> None:
        """Status line and headers (``length`` None: chunked, or to the close)."""
        self._started = True
        code = self.code
        parts = [
            b"HTTP/1.1 %d %s\r\ndate: %s\r\n"
            % (code, _REASONS.get(code, b"Unknown"), self.channel.dates.now())
        ]
        for name, value in self._response_headers:
            if name != b"content-length":
                parts.append(b"%s: %s\r\n" % (name, value))
        declared = self.getResponseHeader(b"content-length")
        if code in _NO_BODY:
            pass
        elif declared is not None:
            parts.append(b"content-length: %s\r\n" % declared)
        elif length is not None:
            parts.append(b"content-length: %d\r\n" % length)
        elif self.keep_alive:
            parts.append(b"transfer-encoding: chunked\r\n")
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        parts.append(b"\r\n")
        if body and self.method != b"HEAD" and code not in _NO_BODY:
            parts.append(body)
        self.channel.send(b"".join(parts))

    def notifyFinish(self) -> Deferred[None]:
        """Fires when the answer is complete; fails if the connection goes first."""
        d: Deferred[None] = Deferred()
        if self.finished:
            d.callback(None)
        elif self._disconnected:
            d.errback(ConnectionError("the connection was lost"))
        else:
            if self._notify is None:
                self._notify = []
            self._notify.append(d)
        return d

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Let ``producer`` write the body as the socket drains (a pull producer)."""
        self.channel.register_producer(producer, streaming)

    def unregisterProducer(self) -> None:
        """The producer has written all it will."""
        self.channel.unregister_producer()

    def lost(self) -> None:
        """The connection went before the answer was complete."""
        self._disconnected = True
        notify, self._notify = self._notify, None
        for d in notify or ():
            d.errback(ConnectionError("the connection was lost"))
