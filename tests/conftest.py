"""Fixtures shared across test modules: the real Redis and RabbitMQ servers the tests start.

The quick path (``./scripts/test.sh --quick``, which sets ``ZTICK_TEST_QUICK=1``) skips every
test that needs a RabbitMQ broker, i.e. every test that uses the ``rabbitmq`` fixture,
directly or through another fixture, so that a first run needs no ``rabbitmq-server``
install.  With ``CI=true`` the quick path is ignored and every test runs.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ("tests.redis_server", "tests.rabbitmq_server")

#: Set to 1 to skip the tests that need a RabbitMQ broker.
QUICK_ENV = "ZTICK_TEST_QUICK"
#: The fixture that starts the broker (tests/rabbitmq_server.py).
BROKER_FIXTURE = "rabbitmq"


def quick_path() -> bool:
    """True when ``ZTICK_TEST_QUICK`` asks for the quick path and this is not CI."""
    if os.environ.get("CI", "").lower() == "true":
        return False
    return os.environ.get(QUICK_ENV, "") not in ("", "0")


def pytest_report_header(config: pytest.Config) -> str | None:
    """Say at the top of the run that broker tests are skipped, and why."""
    if quick_path():
        return f"{QUICK_ENV}=1: quick path, tests needing a RabbitMQ broker are skipped"
    if os.environ.get(QUICK_ENV, "") not in ("", "0"):
        return f"{QUICK_ENV} is ignored because CI=true: every test runs"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On the quick path, mark every test that uses the broker fixture as skipped."""
    if not quick_path():
        return
    skip = pytest.mark.skip(
        reason=f"quick path ({QUICK_ENV}=1): needs a RabbitMQ broker; "
        "./scripts/test.sh without --quick runs it"
    )
    for item in items:
        if BROKER_FIXTURE in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
