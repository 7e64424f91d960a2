"""MemoryStore: the backend that keeps nothing."""

from __future__ import annotations

from zope.interface.verify import verifyObject

from ztick_tw.model import Job, JobRemoval, Rule, ShellSpec
from ztick_tw.store.base import IStore
from ztick_tw.store.memory import MemoryStore


def test_provides_istore_named_memory() -> None:
    """MemoryStore implements IStore and reports itself as 'memory' for STAT."""
    store = MemoryStore()
    assert verifyObject(IStore, store)
    assert store.name == "memory"


def test_appends_need_no_wait_and_are_not_replayed() -> None:
    """The store's append returns None (nothing to wait for) and a later load yields nothing."""
    store = MemoryStore()
    assert list(store.load()) == []
    assert store.append(Job("a", 1)) is None
    assert store.append(Rule("r", "a", ShellSpec("true"))) is None
    assert store.append(JobRemoval("a")) is None
    assert list(store.load()) == []


def test_flush_and_close_are_harmless_and_repeatable() -> None:
    """Its flush and close do nothing and may be called any number of times."""
    store = MemoryStore()
    store.flush()
    store.close()
    store.close()
    assert list(store.load()) == []
