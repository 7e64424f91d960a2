"""End-to-end: jobs that find the daemon out of descriptors wait for a slot, none fail.

The daemon runs under ``prlimit --nofile=256:256`` and is started holding 150 extra
inherited descriptors (a wrapper opens them and execs the daemon), so its own descriptors
run out before ``max_concurrent_runs`` children are alive: the startup check, which does
not know about those 150, lets the config through, and the shortage is real.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.e2e.daemon import daemon, now_ns, quote, read_lines, wait_all_executed

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs util-linux prlimit")

#: Opens ``argv[1]`` inheritable descriptors on /dev/null, then execs ``argv[2:]``.
HOLD_FDS = (
    "import os, sys\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    os.set_inheritable(os.open(os.devnull, os.O_RDONLY), True)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)

JOBS = 60
SECOND = 1_000_000_000


def test_jobs_beyond_the_descriptor_limit_wait_and_all_execute(tmp_path: Path) -> None:
    """More concurrent ``sleep`` jobs than the descriptors allow: every one ends executed.

    The daemon logs the real cause once ("the daemon is out of file descriptors (N open,
    limit 256)"), never "Too many open files" as a job's reason; and no descriptor of the
    daemon (the 150 inherited ones included) is open in a job.
    """
    config = {"scheduler": {"max_concurrent_runs": 40}, "controller": {"max_connections": 20}}
    with daemon(tmp_path / "d", config) as ztick:
        argv = [
            sys.executable,
            "-c",
            HOLD_FDS,
            "150",
            "prlimit",
            "--nofile=256:256",
            *ztick.command("module"),
        ]
        run = ztick.spawn(argv)
        ztick.wait_listening(run)
        c = ztick.client()
        fds_dir = ztick.workdir / "fds"
        fds_dir.mkdir()
        command = f"ls /proc/self/fd > {fds_dir}/$ZTICK_JOB_ID; sleep 1"
        c.ok(f"RULE SET rl l. shell {quote(command)}")
        due = now_ns() + SECOND // 2
        jobs = [f"l.{i:02d}" for i in range(JOBS)]
        c.send_lines([f"s{i} SET {job} {due}" for i, job in enumerate(jobs)])
        for i in range(JOBS):
            assert c.read_response(f"s{i}") == [f"s{i} OK"]
        wait_all_executed(c, "l.", JOBS, timeout=60)
        assert c.stat()["jobs_failed"] == "0"
        for job in jobs:
            # ls itself opens the directory it lists: 3.
            assert sorted(read_lines(fds_dir / job)) == ["0", "1", "2", "3"], job
        assert ztick.stop() == 0
        output = run.output()
    assert "the daemon is out of file descriptors (" in output
    assert "limit 256)" in output
    assert "Too many open files" not in output
