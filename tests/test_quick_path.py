"""The quick test path: ZTICK_TEST_QUICK=1 skips the tests needing a RabbitMQ broker, not CI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import QUICK_ENV, quick_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("quick", "ci", "expected"),
    [
        ("1", None, True),
        (None, None, False),
        ("0", None, False),
        ("1", "true", False),
        ("1", "false", True),
    ],
)
def test_quick_path_is_asked_for_and_never_applies_in_ci(
    monkeypatch: pytest.MonkeyPatch, quick: str | None, ci: str | None, expected: bool
) -> None:
    """ZTICK_TEST_QUICK=1 turns the quick path on, unless CI=true (CI runs everything)."""
    for name, value in ((QUICK_ENV, quick), ("CI", ci)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert quick_path() is expected


def test_quick_run_skips_every_broker_test_and_runs_the_rest() -> None:
    """A real quick-path pytest run of the amqp tests skips the broker ones, runs the rest."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env[QUICK_ENV] = "1"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/test_amqp_runner.py",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    summary = re.search(r"(\d+) passed, (\d+) skipped", out)
    assert summary is not None, out
    assert int(summary.group(1)) > 0 and int(summary.group(2)) > 0
    assert "needs a RabbitMQ broker" in out
    assert "rabbitmq-server is not installed" not in out
