"""Fixtures shared by the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.filesystems import Mounts


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    """Mounts made by the test; all unmounted afterwards, even when the test failed."""
    m = Mounts()
    try:
        yield m
    finally:
        m.unmount_all()
