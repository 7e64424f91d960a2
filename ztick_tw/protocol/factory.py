"""What the line listener's connections share, and the caps on how many there are.

:class:`ZtickFactoryBase` is ``ZtickFactory`` (``protocol/server.py``) but for the
protocol class it builds: the one ``Operations`` every connection uses, the auth tokens
and timeouts, the connection count (STAT) with ``max_connections``, and the caps on
connections that have not authenticated yet (``admission.py``), with the log lines for
connections refused or dropped at those caps.  It sees a connection only as a
:class:`Member`, so this module imports nothing from ``server.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from ztick_tw.auth import TokenStore
from ztick_tw.logs import Tally
from ztick_tw.operations import ANONYMOUS, Operations
from ztick_tw.protocol.admission import Admission
from ztick_tw.scheduler.core import Scheduler

#: How often, at most, "connection limit reached" is logged (with a count meanwhile).
REFUSED_LOG_INTERVAL = 10.0

log = Logger(namespace="ztick_tw.protocol")


class Member(Protocol):
    """What the factory uses of one of its connections."""

    _peer: str

    def evict(self) -> None:
        """Drop this unauthenticated connection now."""


C = TypeVar("C", bound=Member)


class ZtickFactoryBase(Factory, Generic[C]):
    """Builds connections (``C``) that share one ``Operations``; counts them.

    ``operations`` is the set every transport shares (``make_service`` builds it);
    without one, the factory builds its own from ``scheduler`` and the STAT arguments
    (``persistence``, ``framerate``, ``compression``, ``tls_enabled``; auth is on when
    there are ``tokens``), which are otherwise unused.
    """

    noisy = False  # no "Starting factory" lines; the service logs where it listens

    def __init__(
        self,
        scheduler: Scheduler,
        reactor: IReactorTime,
        *,
        persistence: str = "memory",
        framerate: int = 512,
        compression: Callable[[], str] = lambda: "idle",
        tokens: TokenStore | None = None,
        tls_enabled: bool = False,
        max_connections: int = 4096,
        idle_timeout: float = 0.0,
        auth_timeout: float = 5.0,
        max_unauthenticated: int = 256,
        max_unauthenticated_per_source: int = 32,
        operations: Operations | None = None,
    ) -> None:
        if operations is None:
            operations = Operations(
                scheduler,
                reactor,
                persistence=persistence,
                framerate=framerate,
                compression=compression,
                auth_enabled=lambda: self.tokens is not None,
                tls_enabled=tls_enabled,
            )
        self.operations = operations
        self.scheduler = scheduler
        self.reactor = reactor
        self.tokens = tokens
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.auth_timeout = auth_timeout
        self.connections = 0
        operations.count_connections(lambda: self.connections)
        self.admission: Admission[C] = Admission(
            max_unauthenticated, max_unauthenticated_per_source
        )
        self._refused = Tally(reactor, REFUSED_LOG_INTERVAL)
        self._evicted = Tally(reactor, REFUSED_LOG_INTERVAL)

    @property
    def auth_enabled(self) -> bool:
        """Whether clients must AUTH first (an auth file is configured)."""
        return self.tokens is not None

    def refused(self, peer: str) -> None:
        """Note a connection closed at the limit; log it at most every 10 s, with a count."""
        count = self._refused.note()
        if count:
            log.warn(
                "connection limit reached ({limit} connections): refused {count} connection(s)"
                " since the last report, the latest from {peer}",
                limit=self.max_connections,
                count=count,
                peer=peer,
            )

    def admit(self, conn: C) -> None:
        """A new connection must AUTH first: hold it within the unauthenticated caps."""
        for victim in self.admission.add(conn, conn._peer):
            self._evict(victim)

    def make_room(self) -> bool:
        """At ``max_connections``: drop an unauthenticated connection, if any.

        (The oldest of the address holding the most.)  So sockets that never
        authenticate cannot keep a valid client out.
        """
        victim = self.admission.victim()
        if victim is None:
            return False
        self.admission.discard(victim)
        self._evict(victim)
        return True

    def _evict(self, victim: C) -> None:
        victim.evict()
        count = self._evicted.note()
        if count:
            log.warn(
                "too many connections waiting to authenticate (at most {limit}, {per_source}"
                " per address): dropped the oldest {count} since the last report, the latest"
                " from {peer}",
                limit=self.admission.max_total,
                per_source=self.admission.max_per_source,
                count=count,
                peer=victim._peer,
            )

    def stats(self) -> list[tuple[str, str | int]]:
        """The STAT lines (``Operations.stat``), ztick's keys first, then ztick-tw's."""
        return self.operations.stat(ANONYMOUS)
