"""Connections that have not authenticated yet, oldest first, overall and per source.

With an auth file, a connection holds a slot from the moment it is accepted until it
sends ``AUTH`` (or the auth timeout closes it).  Without a separate cap, a few thousand
sockets that never authenticate fill ``max_connections`` and lock every valid client out.
:class:`Admission` caps them twice, overall and per client address, and names the one
to drop when a new one arrives over a cap: over the per-address cap, the oldest of that
address; over the total cap, the oldest of the address holding the most.  So one noisy
address only ever displaces its own sockets, and a flood from many addresses that
reconnect as fast as they are dropped (every flood socket then being younger than a
valid client's round trip) still displaces its own before a client from a quiet
address.  A valid client that shares its address with a flood is not protected.

Plain state, no I/O: the protocol factory does the closing.
"""

from __future__ import annotations

from typing import Generic, TypeVar

C = TypeVar("C")


class Admission(Generic[C]):
    """Unauthenticated connections in arrival order, with per-source counts."""

    def __init__(self, max_total: int, max_per_source: int) -> None:
        if max_total < 1 or max_per_source < 1:
            raise ValueError("the unauthenticated caps must be at least 1")
        self.max_total = max_total
        self.max_per_source = max_per_source
        self._all: dict[C, str] = {}  # connection -> source, oldest first
        self._by_source: dict[str, dict[C, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def __contains__(self, conn: object) -> bool:
        return conn in self._all

    def count(self, source: str) -> int:
        """Unauthenticated connections from ``source``."""
        return len(self._by_source.get(source, ()))

    def oldest(self) -> C | None:
        """The unauthenticated connection waiting longest, or ``None``."""
        return next(iter(self._all), None)

    def victim(self) -> C | None:
        """The one to drop: the oldest of the address holding the most, or ``None``.

        O(addresses), and there are at most ``max_total`` of them.  Among addresses
        holding as many, the one seen first.
        """
        if not self._by_source:
            return None
        crowded = max(self._by_source.values(), key=len)
        return next(iter(crowded))

    def add(self, conn: C, source: str) -> list[C]:
        """Register a new connection; returns those to drop to stay within the caps.

        The ones returned are already forgotten here.  ``conn`` itself is never among
        them: over the per-source cap the oldest of its source goes, over the total cap
        the ``victim``.
        """
        per_source = self._by_source.setdefault(source, {})
        per_source[conn] = None
        self._all[conn] = source
        drop: list[C] = []
        if len(per_source) > self.max_per_source:
            drop.append(next(iter(per_source)))
        elif len(self._all) > self.max_total:
            victim = self.victim()
            if victim is conn:  # it is alone at the most crowded source: take the oldest
                victim = next(iter(self._all))
            assert victim is not None
            drop.append(victim)
        for victim in drop:
            self.discard(victim)
        return drop

    def discard(self, conn: C) -> None:
        """Forget ``conn`` (it authenticated, or went away); no error if unknown."""
        source = self._all.pop(conn, None)
        if source is None:
            return
        per_source = self._by_source[source]
        del per_source[conn]
        if not per_source:
            del self._by_source[source]
