"""End-to-end tests of the daemon on a full disk and on a read-only logfile directory.

The logfile lives on a small file system the test mounts itself (a 1 MiB tmpfs, or a
read-only bind mount); the daemon's config and output stay in the test's ordinary
directory, so the daemon can always log what went wrong.  Everything is unmounted in a
finalizer, also when a test fails.

Mounting needs root.  Without it these tests are skipped, unless ``CI=true``: CI runs
as root, so there a refused mount fails the test instead of silently testing nothing.

A full tmpfs has no free page left, but a file that ends inside a page can still grow
into the rest of that page.  So after filling the disk the tests first let the daemon
use up the logfile's last page with short SETs (they answer ``OK`` until one answers
``ERROR``); from then on every write at least as long as that one must fail.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import (
    Daemon,
    LineClient,
    TomlValue,
    daemon,
    quote,
    wait_until,
)
from tests.e2e.filesystems import MountRefused, Mounts, fill, free_bytes, mount_refused
from tests.helpers import STAT_KEYS

SECOND = 1_000_000_000
#: 2030-01-06 03:00:00 UTC in nanoseconds: far enough ahead that no job fires.
JAN_2030_NS = 1_893_898_800_000_000_000

ENOSPC_TEXT = "No space left on device (ENOSPC)"
EROFS_TEXT = "Read-only file system"

#: Short ids used to fill the logfile's last page (frames of 16 + len(id) bytes).  Every
#: id a test expects a write to fail for is much longer, so its frame cannot fit in
#: what is left of the page after a padding SET failed.
PAD_PREFIX = "p."
#: A tmpfs page is at most this big; more padding SETs than fit in one means the
#: daemon is not failing writes at all.
PAGE_BYTES = 65536

# Long ids: their frames (SET 16 + len, REMOVE/REMOVERULE 7 + len) are bigger than any
# padding frame (16 + len("p.NNNN") <= 22 bytes).
JOB_CHANGED = "disk.full.job.changed.by.a.failed.set"
JOB_REMOVED = "disk.full.job.kept.by.a.failed.remove"
JOB_NEW = "disk.full.job.created.by.a.failed.set"
JOB_AFTER = "disk.full.job.created.after.space.came.back"
RULE_KEPT = "disk.full.rule.kept.by.failed.writes"
RULE_NEW = "disk.full.rule.created.by.a.failed.rule.set"


def small_tmpfs(mounts: Mounts, target: Path) -> Path:
    """A fresh 1 MiB tmpfs at ``target`` (skips or fails the test if mounting is refused)."""
    try:
        return mounts.tmpfs(target, size="1m", mode="0700")
    except MountRefused as e:
        mount_refused(e)


@pytest.fixture
def disk(tmp_path: Path, mounts: Mounts) -> Path:
    """A 1 MiB tmpfs for the logfile (unmounted after the daemon is gone)."""
    return small_tmpfs(mounts, tmp_path / "fs")


def logfile_config(logfile: Path, **database: TomlValue) -> dict[str, dict[str, TomlValue]]:
    """Config sections putting the logfile at ``logfile`` (fsync on, no timed compaction)."""
    keys: dict[str, TomlValue] = {
        "logfile_path": str(logfile),
        "fsync_on_persist": True,
        "compression_interval": 0,
    }
    keys.update(database)
    return {"database": keys}


@pytest.fixture
def ztick(tmp_path: Path, disk: Path) -> Iterator[Daemon]:
    """A daemon (config and output in ``tmp_path``) whose logfile is on ``disk``.

    Depends on ``disk``, so its processes are killed before the tmpfs is unmounted.
    """
    logfile = disk / "ztick.log"
    with daemon(tmp_path / "d", logfile_config(logfile)) as d:
        d.logfile = logfile
        yield d


def lines_with(text: str, *needles: str) -> list[str]:
    """The lines of ``text`` that contain every one of ``needles``."""
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def use_up_slack(c: LineClient, jobs: dict[str, tuple[str, int]]) -> int:
    """SET short padding jobs until one answers ERROR; the OK'd ones go into ``jobs``.

    Returns how many were answered OK (they are stored: they fitted into the logfile's
    last, partly used page).  Fails if the daemon never answers ERROR.
    """
    for n in range(PAGE_BYTES // 17 + 2):
        job_id = f"{PAD_PREFIX}{n}"
        answer = c.call(f"SET {job_id} {JAN_2030_NS + n}")
        if answer == ["ERROR"]:
            assert c.get(job_id) is None, f"{job_id} answered ERROR but GET finds it"
            return n
        assert answer == ["OK"], f"SET {job_id} answered {answer!r}"
        jobs[job_id] = ("planned", JAN_2030_NS + n)
    raise AssertionError(f"{PAGE_BYTES // 17 + 2} SETs on a full disk all answered OK")


def assert_no_log_damage(run_output: str) -> None:
    """The daemon found a clean logfile at startup: nothing torn, corrupt or cut off."""
    for word in ("torn", "corrupt", "cut off", "Traceback"):
        assert word not in run_output, f"{word!r} in the daemon's startup output:\n{run_output}"


# ------------------------------------------------------------------------------ disk full


def test_full_disk_writes_answer_error_reads_keep_working_and_space_brings_writes_back(
    ztick: Daemon, disk: Path
) -> None:
    """A full disk makes writes answer ERROR, leaves reads and state alone, then recovers.

    On a full tmpfs: SET (of a new and of an existing job), REMOVE, RULE SET (new and
    changed) and REMOVERULE each answer ``ID ERROR`` promptly, also pipelined, and the
    same connection keeps working.  A job changed by a failed SET still shows its old
    time, a failed REMOVE leaves its job, failed rule changes leave LISTRULES as it was;
    GET, QUERY, LISTRULES and STAT keep answering.  The daemon says what failed: the
    logfile path and ENOSPC.  Once the filler is deleted the same writes answer OK, and
    after a restart exactly the OK'd writes are in the log (no ERROR'd one) and the
    logfile loads without a torn or corrupt frame.
    """
    run = ztick.start()
    c = ztick.client()
    rule_kept = f"RULE SET {RULE_KEPT} kept. shell {quote('echo kept')}"
    c.ok(rule_kept)
    jobs: dict[str, tuple[str, int]] = {
        JOB_CHANGED: ("planned", JAN_2030_NS),
        JOB_REMOVED: ("planned", JAN_2030_NS + SECOND),
    }
    for job_id, (_, ns) in jobs.items():
        c.ok(f"SET {job_id} {ns}")
    rules_before = c.rules()
    assert rules_before == [f"{RULE_KEPT} kept. shell echo kept"]

    filler = fill(disk)
    assert free_bytes(disk) == 0
    padded = use_up_slack(c, jobs)
    size_when_full = ztick.logfile.stat().st_size

    # One write at a time: each answers ERROR and is undone before the next request.
    assert c.call(f"SET {JOB_CHANGED} {JAN_2030_NS + 7 * SECOND}") == ["ERROR"]
    assert c.get(JOB_CHANGED) == jobs[JOB_CHANGED], "a SET answered ERROR changed the job"
    assert c.call(f"SET {JOB_NEW} {JAN_2030_NS}") == ["ERROR"]
    assert c.get(JOB_NEW) is None
    assert c.call(f"REMOVE {JOB_REMOVED}") == ["ERROR"]
    assert c.get(JOB_REMOVED) == jobs[JOB_REMOVED]
    assert c.call(f"RULE SET {RULE_KEPT} kept. shell {quote('echo changed')}") == ["ERROR"]
    assert c.call(f"RULE SET {RULE_NEW} new. shell {quote('echo new')}") == ["ERROR"]
    assert c.call(f"REMOVERULE {RULE_KEPT}") == ["ERROR"]
    assert c.rules() == rules_before

    # Pipelined: every write of the batch answers ERROR, in request order.
    batch = [
        f"b1 SET {JOB_CHANGED} {JAN_2030_NS + 9 * SECOND}",
        f"b2 SET {JOB_NEW} {JAN_2030_NS}",
        f"b3 REMOVE {JOB_REMOVED}",
        f"b4 RULE SET {RULE_NEW} new. shell {quote('echo new')}",
        f"b5 REMOVERULE {RULE_KEPT}",
    ]
    c.send_lines(batch)
    for n in range(1, len(batch) + 1):
        assert c.read_response(f"b{n}") == [f"b{n} ERROR"]

    assert c.query() == jobs
    assert c.rules() == rules_before
    stats = c.stat()
    assert list(stats) == STAT_KEYS
    assert stats["jobs_total"] == str(len(jobs))
    assert stats["rules_total"] == "1"
    assert stats["persistence"] == "logfile"
    with LineClient(ztick.port) as other:  # new connections are served too
        assert other.get(JOB_CHANGED) == jobs[JOB_CHANGED]
    assert run.alive()
    # Every failed write was cut back: the file still ends at its last whole frame.
    assert ztick.logfile.stat().st_size == size_when_full
    failures = lines_with(run.output(), str(ztick.logfile), ENOSPC_TEXT)
    assert failures, f"no log line names the logfile and ENOSPC:\n{run.output()}"

    # Space comes back: the same writes now succeed.
    filler.unlink()
    assert free_bytes(disk) > 0
    c.ok(f"SET {JOB_CHANGED} {JAN_2030_NS + 3 * SECOND}")
    jobs[JOB_CHANGED] = ("planned", JAN_2030_NS + 3 * SECOND)
    c.ok(f"REMOVE {JOB_REMOVED}")
    del jobs[JOB_REMOVED]
    c.ok(f"SET {JOB_AFTER} {JAN_2030_NS + 4 * SECOND}")
    jobs[JOB_AFTER] = ("planned", JAN_2030_NS + 4 * SECOND)
    c.ok(f"RULE SET {RULE_NEW} new. shell {quote('echo new')}")
    assert c.get(JOB_CHANGED) == jobs[JOB_CHANGED]
    assert c.get(JOB_REMOVED) is None
    assert c.query() == jobs
    rules_after = sorted([*rules_before, f"{RULE_NEW} new. shell echo new"])
    assert sorted(c.rules()) == rules_after
    assert ztick.stop() == 0

    restarted = ztick.start()
    c = ztick.client()
    assert c.query() == jobs, "the log after the restart is not exactly the OK'd writes"
    assert JOB_NEW not in c.query()
    assert len([j for j in jobs if j.startswith(PAD_PREFIX)]) == padded
    assert sorted(c.rules()) == rules_after
    assert_no_log_damage(restarted.output())
    assert ztick.stop() == 0


def test_compaction_on_a_full_disk_fails_cleanly_and_succeeds_later(
    ztick: Daemon, disk: Path
) -> None:
    """SIGUSR1 on a full disk: STAT says ``compression failure``, the log is untouched.

    The failed compaction leaves the logfile byte for byte as it was and no
    ``.compact.tmp`` beside it, logs the failure with ENOSPC, and the daemon keeps
    answering reads.  Once space is back, a second SIGUSR1 compacts (``success``, a
    smaller logfile, no temporary file) and a restart finds the same jobs and rules.
    """
    run = ztick.start()
    c = ztick.client()
    c.ok(f"RULE SET {RULE_KEPT} kept. shell {quote('echo kept')}")
    jobs: dict[str, tuple[str, int]] = {}
    for round_ in range(20):  # many superseded frames: compaction has work to do
        for n in range(5):
            job_id = f"compact.job.{n}"
            ns = JAN_2030_NS + round_ * SECOND + n
            c.ok(f"SET {job_id} {ns}")
            jobs[job_id] = ("planned", ns)
    assert c.stat()["compression"] == "idle"
    rules = c.rules()
    log_before = ztick.logfile.read_bytes()
    temp = disk / (ztick.logfile.name + ".compact.tmp")

    filler = fill(disk)
    assert free_bytes(disk) == 0
    os.kill(run.pid, signal.SIGUSR1)
    outcome = wait_until(
        lambda: (s := c.stat()["compression"]) not in ("idle", "running") and s,
        "the compaction on the full disk to finish",
        on_timeout=run.output,
    )
    assert outcome == "failure", run.output()
    assert ztick.logfile.read_bytes() == log_before
    assert not temp.exists()
    # (the run history's SQLite files live beside the logfile too; they are not the
    # compaction's business)
    files = [f for f in os.listdir(disk) if ".history.sqlite" not in f]
    assert sorted(files) == sorted([ztick.logfile.name, filler.name])
    failed = lines_with(run.output(), "compaction failed", ENOSPC_TEXT)
    assert failed, f"no 'compaction failed ... ENOSPC' log line:\n{run.output()}"
    assert c.query() == jobs
    assert c.rules() == rules
    assert run.alive()

    filler.unlink()
    os.kill(run.pid, signal.SIGUSR1)
    wait_until(
        lambda: c.stat()["compression"] == "success",
        "the compaction after space came back to succeed",
        on_timeout=run.output,
    )
    assert not temp.exists()
    assert len(ztick.logfile.read_bytes()) < len(log_before)
    assert lines_with(run.output(), "compaction done")
    assert c.query() == jobs
    assert ztick.stop() == 0

    restarted = ztick.start()
    c = ztick.client()
    assert c.query() == jobs
    assert c.rules() == rules
    assert_no_log_damage(restarted.output())
    assert ztick.stop() == 0


# ------------------------------------------------------------------------------ read-only


def assert_one_line_startup_error(d: Daemon, how: str, logfile: Path) -> str:
    """Start the daemon expecting it to refuse: non-zero status, one clear stderr line.

    The line names the logfile and says the file system is read-only; there is no
    traceback anywhere in the output.  Returns the line.
    """
    run = d.run_to_exit(how)
    output = run.output()
    assert run.process.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in run.stderr().splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{run.stderr()}"
    assert str(logfile) in lines[0], lines[0]
    assert EROFS_TEXT in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("how", ["module", "twistd"])
def test_read_only_logfile_directory_is_a_one_line_startup_error(
    tmp_path: Path, disk: Path, mounts: Mounts, how: str
) -> None:
    """A logfile to be created on a read-only file system stops startup with one line.

    Exit status non-zero, one stderr line naming the logfile and "Read-only file
    system", no traceback, nothing created.  (``python -m ztick_tw`` and ``twistd``.)
    """
    logfile = disk / "ztick.log"
    try:
        mounts.remount(disk, "ro")
    except MountRefused as e:
        mount_refused(e)
    with daemon(tmp_path / "d", logfile_config(logfile)) as d:
        d.logfile = logfile
        assert_one_line_startup_error(d, how, logfile)
        assert not logfile.exists()
        assert os.listdir(disk) == []


def test_read_only_existing_logfile_is_a_one_line_startup_error(
    tmp_path: Path, mounts: Mounts
) -> None:
    """An existing read-only logfile in a read-only directory stops startup with one line.

    A logfile written by an earlier run is made mode 0400 and shown through a read-only
    bind mount: the daemon exits non-zero with one stderr line naming it and "Read-only
    file system", no traceback, and the file is unchanged.
    """
    source = tmp_path / "logs"
    source.mkdir()
    with daemon(tmp_path / "first", logfile_config(source / "ztick.log")) as first:
        first.logfile = source / "ztick.log"
        first.start()
        first.client().ok(f"SET {JOB_CHANGED} {JAN_2030_NS}")
        assert first.stop() == 0
    contents = (source / "ztick.log").read_bytes()
    assert contents
    (source / "ztick.log").chmod(0o400)
    try:
        read_only = mounts.bind_read_only(source, tmp_path / "ro")
    except MountRefused as e:
        mount_refused(e)
    logfile = read_only / "ztick.log"
    with daemon(tmp_path / "second", logfile_config(logfile)) as d:
        d.logfile = logfile
        assert_one_line_startup_error(d, "module", logfile)
    assert logfile.read_bytes() == contents
    assert sorted(os.listdir(source)) == ["ztick.log", "ztick.log.history.sqlite"]


def test_unwritable_logfile_directory_for_a_non_root_user(tmp_path: Path) -> None:
    """A directory the (non-root) daemon may not write to stops startup with one line.

    Root writes into a mode 0500 directory anyway, so this only runs as non-root.
    """
    if os.geteuid() == 0:
        pytest.skip("root may write into any directory: cannot be tested as root")
    directory = tmp_path / "locked"
    directory.mkdir(mode=0o500)
    logfile = directory / "ztick.log"
    try:
        with daemon(tmp_path / "d", logfile_config(logfile)) as d:
            run = d.run_to_exit()
            assert run.process.returncode != 0, run.output()
            assert "Traceback" not in run.output(), run.output()
            lines = [line for line in run.stderr().splitlines() if line.strip()]
            assert len(lines) == 1, run.stderr()
            assert str(logfile) in lines[0]
            assert re.search("[Pp]ermission denied", lines[0]), lines[0]
    finally:
        directory.chmod(0o700)


def test_failed_compaction_log_line_reads_cleanly(ztick: Daemon, disk: Path) -> None:
    """The error line of a compaction that failed on a full disk is plain English.

    It names the temporary file and ENOSPC, says once that the logfile is unchanged, and
    says when the next try comes without gluing a unit onto "(SIGUSR1 only)".
    """
    run = ztick.start()
    c = ztick.client()
    c.ok(f"SET {JOB_CHANGED} {JAN_2030_NS}")
    fill(disk)
    os.kill(run.pid, signal.SIGUSR1)
    wait_until(
        lambda: c.stat()["compression"] == "failure",
        "the compaction on the full disk to fail",
        on_timeout=run.output,
    )
    failed = lines_with(run.output(), "compaction failed")
    assert len(failed) == 1, run.output()
    line = failed[0]
    assert f"{ztick.logfile}.compact.tmp" in line
    assert ENOSPC_TEXT in line
    assert line.count("the logfile is unchanged") == 1, line
    assert "(SIGUSR1 only)s" not in line, line
    assert ztick.stop() == 0
