"""End-to-end: compaction on SIGUSR1 and retention, seen as a user sees them.

The real daemon, TCP, STAT's ``compression`` value, the logfile on disk, a restart.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import Daemon, daemon, now_ns, wait_all_executed, wait_until

SECOND = 1_000_000_000


@pytest.fixture
def ztick(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon whose finished jobs are kept 2 s, with no compaction schedule."""
    config = {"database": {"compression_interval": 0, "retention": 2}}
    with daemon(tmp_path / "d", config) as d:
        yield d


def test_sigusr1_compacts_and_retention_forgets_old_finished_jobs(ztick: Daemon) -> None:
    """SIGUSR1 shrinks the log to the live state; finished jobs past retention are gone.

    Planned jobs and recently finished ones stay, in memory and after a restart.
    """
    run = ztick.start()
    with ztick.client() as c:
        assert c.stat()["compression"] == "idle"
        c.ok("RULE SET r done. shell true")
        old = now_ns() - 10 * SECOND
        for i in range(20):
            c.ok(f"SET done.{i} {old}")
        wait_all_executed(c, "done.", 20)
        future = now_ns() + 3600 * SECOND
        for round_ in range(10):
            for i in range(50):
                c.ok(f"SET later.{i} {future + round_}")
        size_before = ztick.logfile.stat().st_size
        os.kill(run.pid, signal.SIGUSR1)
        wait_until(lambda: c.stat()["compression"] == "success", "the compaction to succeed")
        assert c.get("done.0") is None
        assert c.get("later.7") == ("planned", future + 9)
        c.ok(f"SET done.recent {now_ns()}")
        wait_all_executed(c, "done.", 1)
    size_after = ztick.logfile.stat().st_size
    assert size_after < size_before / 5
    assert not Path(f"{ztick.logfile}.compact.tmp").exists()
    assert ztick.stop() == 0
    ztick.start()
    with ztick.client() as c:
        assert c.get("done.0") is None
        assert c.get("done.recent") is not None
        assert len(c.query("later.")) == 50
        assert c.rules() == ["r done. shell true"]
    assert "compaction done" in ztick.runs[0].output()
