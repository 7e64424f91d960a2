"""End-to-end: the daemon against a real descriptor limit (``prlimit --nofile``).

At start the daemon raises its soft descriptor limit to the hard one, then checks that
``[controller] max_connections + [scheduler] max_concurrent_runs x 3 + 64`` fits: a
default ``max_connections`` is lowered to fit (with a warning), one written in the
config is refused with one clear line.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import Daemon, Run, daemon

#: 2030-01-06 03:00:00 UTC in nanoseconds: far enough ahead that no job fires.
JAN_2030_NS = 1_893_898_800_000_000_000

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")


@pytest.fixture
def ztick(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with the default connection and run caps."""
    with daemon(tmp_path / "d") as d:
        yield d


def limited(ztick: Daemon, soft: int, hard: int) -> list[str]:
    """The daemon's command line run under a descriptor limit of ``soft:hard``."""
    return ["prlimit", f"--nofile={soft}:{hard}", *ztick.command("module")]


def open_files_limit(run: Run) -> tuple[int, int]:
    """The (soft, hard) descriptor limit of the running daemon, from /proc."""
    with open(f"/proc/{run.pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no 'Max open files' line in /proc/PID/limits")


def test_the_default_config_starts_under_a_1024_descriptor_limit(ztick: Daemon) -> None:
    """The default config starts and serves under a hard limit of 1024 descriptors.

    The soft limit (256) is raised to 1024, and the default max_connections (4096) is
    lowered to 1024 - 64 x 3 - 64 = 768 with a warning.
    """
    run = ztick.spawn(limited(ztick, 256, 1024))
    ztick.wait_listening(run)
    assert open_files_limit(run) == (1024, 1024)
    with ztick.client() as c:
        c.ok(f"SET limits.job {JAN_2030_NS}")
        assert c.get("limits.job") == ("planned", JAN_2030_NS)
    assert "max_connections lowered from its default 4096 to 768" in run.output()
    assert ztick.stop() == 0


def test_an_explicit_max_connections_that_cannot_fit_is_refused(ztick: Daemon) -> None:
    """A max_connections written in the config that cannot fit stops the start.

    max_connections = 1000 with a limit of 1024: exit 1 and one stderr line naming the
    limit, both keys and the numbers.
    """
    ztick.write_config(
        {
            "controller": {
                "listen": f"tcp:{ztick.port}:interface=127.0.0.1",
                "max_connections": 1000,
            },
            "database": {"logfile_path": "ztick.log"},
        }
    )
    run = ztick.spawn(limited(ztick, 1024, 1024))
    assert run.process.wait(timeout=15) == 1
    lines = run.stderr().strip().splitlines()
    assert lines[-1].startswith(
        "ztick-tw: the descriptor limit (1024, ulimit -n) cannot hold [controller]"
        " max_connections (1000) + [scheduler] max_concurrent_runs (64) x 3"
    ), run.output()
    assert "(at most 768 here)" in lines[-1]
