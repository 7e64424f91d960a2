"""The REST listener: ``rest_site()`` puts ``RestResource`` behind an ``HttpSite``.

The HTTP framing, its bounds (body ``MAX_BODY``, head, pipelining), back-pressure and the
idle timeout are ``ztick_tw/rest/http11.py``'s; the routes are ``RestResource``'s.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from ztick_tw.auth import TokenStore
from ztick_tw.operations import Operations
from ztick_tw.rest.http11 import MAX_BODY, HttpSite

__all__ = ["MAX_BODY", "RestSite", "rest_site"]


#: The REST listener's factory (``http11.HttpSite``): connections counted for STAT.
RestSite = HttpSite


def rest_site(
    operations: Operations,
    reactor: IReactorTime,
    *,
    tokens: TokenStore | None = None,
    timeout: float | None = 900.0,
    max_connections: int = 1024,
    metrics: Any = None,
) -> RestSite:
    """The REST API's listener factory over ``operations``.

    ``tokens`` turns Bearer authentication on; ``timeout`` drops a connection idle that
    long (``None`` or 0: never); past ``max_connections`` open at once a new connection
    is closed as it is accepted; ``metrics`` is the ``/metrics`` resource, if any.
    """
    from ztick_tw.rest.resource import RestResource

    site = RestSite(
        RestResource(operations, reactor, tokens=tokens, metrics=metrics),
        timeout or None,
        reactor,
        max_connections=max_connections,
    )
    operations.count_connections(lambda: site.connections)
    return site
