"""End-to-end: a shutdown whose logfile cannot be synced still ends the running jobs.

The logfile lives on a real ext4 file system whose fsync fails: ext4 on a loop device
whose backing file is a sparse image on a small tmpfs.  Once that tmpfs is full, data the
daemon wrote to the logfile cannot reach the image, and ``fsync`` answers ``ENOSPC`` (or
``EIO`` once ext4 aborted its journal).  With ``fsync_on_persist = false`` the daemon
never syncs before shutdown, so the first failing fsync is the final flush of SIGTERM.

Mounting needs root; without it the test is skipped (failed under ``CI=true``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import Daemon, TomlValue, daemon, now_ns, quote, wait_until
from tests.e2e.filesystems import MountRefused, Mounts, fill, mount_refused

#: 2030-01-06 03:00:00 UTC in nanoseconds: far enough ahead that no job fires.
JAN_2030_NS = 1_893_898_800_000_000_000


def ext4_on_small_tmpfs(mounts: Mounts, tmp_path: Path) -> tuple[Path, Path]:
    """A 32 MiB ext4 (loop device) whose image lives on an 8 MiB tmpfs.

    Returns ``(ext4 mount point, tmpfs mount point)``; filling the tmpfs makes writeback
    to the ext4, and so its fsync, fail.
    """
    if shutil.which("mkfs.ext4") is None or not os.path.exists("/dev/loop-control"):
        mount_refused("mkfs.ext4 or loop devices are missing")
    try:
        backing = mounts.tmpfs(tmp_path / "backing", size="8m")
    except MountRefused as e:
        mount_refused(e)
    image = backing / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=60)
    target = tmp_path / "ext4"
    target.mkdir()
    result = subprocess.run(
        ["mount", "-o", "loop", str(image), str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        mount_refused(f"mount -o loop: {result.stderr.strip()}")
    mounts.mounted.append(target)  # unmounted (and its loop device freed) before the tmpfs
    return target, backing


@pytest.fixture
def disks(tmp_path: Path, mounts: Mounts) -> tuple[Path, Path]:
    """The failing ext4 and its tmpfs (unmounted after the daemon is gone)."""
    return ext4_on_small_tmpfs(mounts, tmp_path)


@pytest.fixture
def ztick(tmp_path: Path, disks: tuple[Path, Path]) -> Iterator[Daemon]:
    """A daemon whose logfile is on the ext4 (fsync off: nothing is synced until SIGTERM)."""
    logfile = disks[0] / "ztick.log"
    config: dict[str, dict[str, TomlValue]] = {
        "database": {
            "logfile_path": str(logfile),
            "fsync_on_persist": False,
            "compression_interval": 0,
        },
        "scheduler": {"shutdown_grace": 0.5},
    }
    with daemon(tmp_path / "d", config) as d:
        d.logfile = logfile
        yield d


def group_alive(pgid: int) -> bool:
    """Whether any process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("how", ["twistd", "module"])
def test_sigterm_with_a_failing_fsync_ends_the_job_group_and_exits_1(
    ztick: Daemon, disks: tuple[Path, Path], how: str
) -> None:
    """The final flush failing does not skip the rest of the shutdown.

    The daemon (``twistd -n ztick``, or ``python -m ztick_tw``) runs a ``sleep`` job in
    its own process group; the disk under the logfile then fails.  After SIGTERM the
    failed flush is logged with its step, the job's process group is ended after the
    grace period (TERM, then KILL), the logfile is closed, twistd removes its pidfile,
    and the process exits with status 1 (under twistd not by the signal, which would read
    as a clean stop).
    """
    marker = ztick.workdir / "job.pgid"
    ztick.start(how)
    c = ztick.client()
    command = f"echo $$ > {quote(str(marker))}; sleep 300"
    c.ok(f"RULE SET rs slow. shell {quote(command)}")
    c.ok(f"SET slow.job {now_ns()}")
    pgid = wait_until(
        lambda: int(marker.read_text()) if marker.exists() and marker.read_text() else None,
        "the sleep job to start",
    )
    assert os.getpgid(pgid) == pgid, "the job does not lead its own process group"
    assert group_alive(pgid)

    fill(disks[1])
    c.ok(f"SET later.job {JAN_2030_NS}")  # written to the page cache, not yet synced
    pidfile = ztick.workdir / "twistd.pid"
    assert pidfile.exists() == (how == "twistd")

    status = ztick.stop()
    output = ztick.runs[-1].output()
    assert status == 1, output
    assert "shutdown step failed: flush the logfile" in output
    assert "fsync failed" in output
    assert "step(s) failed" in output and "exit status 1" in output
    wait_until(lambda: not group_alive(pgid), "the job's process group to be gone", timeout=5)
    ztick.wait_no_children(timeout=5)
    assert "stopped at shutdown" in output
    assert not pidfile.exists(), "twistd's pidfile was left behind"
