"""The REST listener's factory: one :class:`HttpChannel` a connection, counted.

The HTTP framing, its bounds (body ``MAX_BODY``, head, pipelining), back-pressure and the
idle timeout are ``ztick_tw/rest/http11.py``'s; the routes are ``RestResource``'s.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory

from ztick_tw.auth import TokenStore
from ztick_tw.operations import Operations
from ztick_tw.rest.http11 import MAX_BODY, Dates, HttpChannel

__all__ = ["MAX_BODY", "RestSite", "rest_site"]


class RestSite(Factory):
    """Builds the connections of the REST listener; ``connections`` counts the live ones."""

    protocol = HttpChannel  # type: ignore[assignment]
    noisy = False

    def __init__(self, resource: Any, timeout: float | None, reactor: IReactorTime) -> None:
        self.resource = resource
        self.timeout = timeout
        self.reactor = reactor
        self.dates = Dates(reactor.seconds)
        self.connections = 0


def rest_site(
    operations: Operations,
    reactor: IReactorTime,
    *,
    tokens: TokenStore | None = None,
    timeout: float | None = 900.0,
    metrics: Any = None,
) -> RestSite:
    """The REST API's listener factory over ``operations``.

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
