"""End-to-end: a ``logfile_path`` that is a symbolic link into another directory.

Operators put the logfile on a data volume and link to it from the daemon's directory.
The real daemon compacts on SIGUSR1; the link must survive as a link, and the target
must keep receiving every write, across a restart.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import Daemon, daemon, wait_until

#: 2030-01-06 03:00:00 UTC in nanoseconds: far enough ahead that no job fires.
JAN_2030_NS = 1_893_898_800_000_000_000


@pytest.fixture
def volume(tmp_path: Path) -> Path:
    """The "data volume" directory holding the real logfile."""
    path = tmp_path / "volume"
    path.mkdir()
    return path


@pytest.fixture
def ztick(tmp_path: Path, volume: Path) -> Iterator[Daemon]:
    """A daemon whose ``logfile_path`` (``ztick.log``) links to ``volume/ztick.log``."""
    with daemon(tmp_path / "d", {"database": {"compression_interval": 0}}) as d:
        d.logfile.symlink_to(volume / "ztick.log")
        yield d


def test_sigusr1_compaction_keeps_the_link_and_writes_reach_the_target(
    ztick: Daemon, volume: Path
) -> None:
    """After a compaction, the link is still a link and the target gets every write.

    Jobs set before, and one set after, the SIGUSR1 compaction are all in the target;
    nothing but the link is left beside it (the run history sits beside the target);
    a restart through the link replays them.
    """
    target = volume / "ztick.log"
    run = ztick.start()
    with ztick.client() as c:
        for round_ in range(5):
            for i in range(20):
                c.ok(f"SET v.{i} {JAN_2030_NS + round_ * 100 + i}")
        size_before = target.stat().st_size
        os.kill(run.pid, signal.SIGUSR1)
        wait_until(lambda: c.stat()["compression"] == "success", "the compaction to succeed")
        assert ztick.logfile.is_symlink()
        assert os.readlink(ztick.logfile) == str(target)
        assert target.stat().st_size < size_before
        size_after_compaction = target.stat().st_size
        c.ok(f"SET after.compaction {JAN_2030_NS}")
        wait_until(
            lambda: target.stat().st_size > size_after_compaction,
            "the write after the compaction to reach the target",
        )
    assert ztick.stop() == 0
    assert ztick.logfile.is_symlink()
    assert sorted(p.name for p in ztick.workdir.iterdir() if p.name.startswith("ztick.log")) == [
        "ztick.log"
    ]
    # The run history lives beside the target too (never beside the link).
    assert sorted(os.listdir(volume)) == ["ztick.log", "ztick.log.history.sqlite"]
    dump = ztick.dump().stdout.splitlines()
    assert len(dump) == 21
    assert dump[-1] == f"SET after.compaction {JAN_2030_NS} planned"

    ztick.start()
    with ztick.client() as c:
        assert c.get("after.compaction") == ("planned", JAN_2030_NS)
        assert c.get("v.19") == ("planned", JAN_2030_NS + 400 + 19)
        assert len(c.query("v.")) == 20
    assert "leads through a symbolic link" in ztick.runs[-1].output()
