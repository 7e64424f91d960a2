"""The REST listener's ``Site``: bounded bodies, idle timeout, live connection count.

A body over :data:`MAX_BODY` is refused while it is read: a ``Content-Length`` above it
is answered 413 before a byte of the body is read, and a chunked body is cut off (and
answered 413) as soon as it passes the bound, so no client can make the daemon buffer
more than 1 MB.  Either way the connection is closed after the 413 (the rest of the body
would otherwise have to be read and thrown away).  Idle and slow clients are dropped
after ``timeout`` seconds without a byte, as the line protocol's ``idle_timeout`` does.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.server import Request, Site

from ztick_tw.auth import TokenStore
from ztick_tw.operations import Operations

#: The largest request body accepted (SPEC §7: over 1 MB is 413).
MAX_BODY = 1_000_000

_TOO_LARGE = json.dumps({"error": f"the body is over {MAX_BODY} bytes"}).encode()


class BoundedRequest(Request):
    """A request whose body is kept in memory up to :data:`MAX_BODY`, refused beyond."""

    too_large = False

    def gotLength(self, length: int | None) -> None:
        """Refuse a declared length over the bound at once; else buffer in memory."""
        self.content = io.BytesIO()
        self._received = 0
        if length is not None and length > MAX_BODY:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        """Keep the chunk unless the body has grown past the bound."""
        if self.too_large:
            return
        self._received += len(data)
        if self._received > MAX_BODY:
            self._refuse()
            return
        content: Any = self.content
        content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """Process the request, unless it was refused for its size."""
        if self.too_large:
            return
        super().requestReceived(command, path, version)  # type: ignore[no-untyped-call]

    def _refuse(self) -> None:
        self.too_large = True
        channel = self.channel
        transport: Any = None if channel is None else channel.transport
        if transport is None:
            return
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"content-type: application/json\r\n"
            b"connection: close\r\n"
            b"content-length: " + str(len(_TOO_LARGE)).encode() + b"\r\n\r\n" + _TOO_LARGE
        )
        transport.loseConnection()  # what else arrives is read and dropped until closed


class RestChannel(HTTPChannel):
    """An HTTP connection, counted in STAT's ``connections``.

    Its addresses are read once, not by each request (two system calls a request).
    """

    _host: Any = None
    _peer: Any = None

    def connectionMade(self) -> None:
        """Count the connection."""
        super().connectionMade()  # type: ignore[no-untyped-call]
        site: RestSite = self.factory
        site.connections += 1

    def getHost(self) -> Any:
        """The listening side's address, asked of the transport once."""
        if self._host is None:
            self._host = super().getHost()  # type: ignore[no-untyped-call]
        return self._host

    def getPeer(self) -> Any:
        """The client's address, asked of the transport once."""
        if self._peer is None:
            self._peer = super().getPeer()  # type: ignore[no-untyped-call]
        return self._peer

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Uncount the connection."""
        site: RestSite = self.factory
        site.connections -= 1
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class RestSite(Site):
    """The REST ``Site``: :class:`BoundedRequest`, :class:`RestChannel`, quiet logs."""

    protocol = RestChannel  # type: ignore[assignment]
    requestFactory = BoundedRequest
    noisy = False

    def __init__(self, resource: Any, timeout: float | None, reactor: IReactorTime) -> None:
        super().__init__(resource, timeout=timeout, reactor=reactor)  # type: ignore[no-untyped-call]
        self.connections = 0

    def log(self, request: http.Request) -> None:
        """No access log: one line per request would cost more than the request."""


def rest_site(
    operations: Operations,
    reactor: IReactorTime,
    *,
    tokens: TokenStore | None = None,
    timeout: float | None = 900.0,
    metrics: Any = None,
) -> RestSite:
    """The REST API's ``Site`` over ``operations``.

    ``tokens`` turns Bearer authentication on; ``timeout`` drops a connection idle that
    long (``None`` or 0: never); ``metrics`` is the ``/metrics`` resource, if any.
    """
    from ztick_tw.rest.resource import RestResource

    site = RestSite(
        RestResource(operations, reactor, tokens=tokens, metrics=metrics),
        timeout or None,
        reactor,
    )
    operations.count_connections(lambda: site.connections)
    return site
