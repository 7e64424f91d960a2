"""The ``memory`` persistence backend: nothing survives a restart."""

from __future__ import annotations

from collections.abc import Iterator

from zope.interface import implementer

from ztick_tw.model import Entry
from ztick_tw.store.base import Commit, IStore

__all__ = ["MemoryStore"]


@implementer(IStore)
class MemoryStore:
    """A store that keeps nothing: ``load`` yields no entries, ``append`` is free.

    The scheduler's own tables are the only copy of the state, so every change is
    "durable" at once and ``append`` never asks anyone to wait.
    """

    name = "memory"

    def load(self) -> Iterator[Entry]:
        """Yield nothing: a memory store starts empty every time."""
        return iter(())

    def append(self, entry: Entry) -> Commit | None:
        """Accept and forget ``entry``; nothing to wait for."""
        return None

    def write_through(self) -> None:
        """Nothing is buffered."""

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        """Nothing to release."""
