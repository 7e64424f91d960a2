"""Compaction: the snapshot, the atomic swap under concurrent appends, retention, failures.

The store's worker threads are replaced by a hand-driven runner, so a test can append
while a snapshot is "being written" and then let it finish; the files are real.  Time
is a ``Clock``.  ``test_real_reactor_*`` use the real thread pool and fsync.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial import unittest as trial

from tests.helpers import EPOCH_NS, SECOND_NS, FakeRunner, make_clock
from ztick_tw.compaction import CompactionService
from ztick_tw.model import (
    I64_MIN,
    Entry,
    Job,
    JobStatus,
    Pause,
    Policy,
    Rule,
    RulePolicy,
    RunnerKind,
    RunState,
    ScheduleSet,
    ShellSpec,
    ShownStatus,
)
from ztick_tw.scheduler.core import Scheduler
from ztick_tw.scheduler.snapshot import Snapshot, Throttle
from ztick_tw.store import logfile as logfile_module
from ztick_tw.store.base import CompactionAborted, StoreError
from ztick_tw.store.loading import COMPACT_SUFFIX
from ztick_tw.store.logfile import CompactionResult, LogfileStore
from ztick_tw.store.memory import MemoryStore
from ztick_tw.store.scanning import scan


class HeldRunner:
    """Runs each blocking call only when the test says so; fires with its result."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, blocking: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((blocking, d))
        return d

    def run_all(self) -> None:
        """Run every held call (and those they queue) to completion."""
        while self.pending:
            blocking, d = self.pending.pop(0)
            try:
                result = blocking()
            except BaseException as e:
                d.errback(Failure(e))  # type: ignore[no-untyped-call]
            else:
                d.callback(result)


def no_pause() -> None:
    """A throttle that never sleeps (unit tests)."""


def replay(path: Path) -> Scheduler:
    """A fresh scheduler replayed from the file at ``path`` (as the next start would)."""
    data = path.read_bytes()
    result = scan(data)
    assert result.problem is None, result.problem
    scheduler = Scheduler(make_clock(), MemoryStore(), {})
    scheduler.replay(list(result))
    return scheduler


def state(scheduler: Scheduler) -> tuple[dict[str, tuple[ShownStatus, int]], dict[str, Rule]]:
    """Every job and rule of a scheduler, for comparisons."""
    jobs = {job_id: (status, ns) for job_id, status, ns in scheduler.query()}
    return jobs, {rule.id: rule for rule in scheduler.list_rules()}


def setup(tmp_path: Path) -> tuple[Scheduler, LogfileStore, HeldRunner, Clock]:
    """A scheduler on a loaded LogfileStore whose fsyncs and compactions are held."""
    clock = make_clock()
    runner = HeldRunner()
    store = LogfileStore(clock, str(tmp_path / "ztick.log"), True, runner)
    list(store.load())
    scheduler = Scheduler(clock, store, {RunnerKind.SHELL: FakeRunner()})
    return scheduler, store, runner, clock


def settle(clock: Clock, runner: HeldRunner) -> None:
    """Let buffered appends be written and every held fsync/compaction step run."""
    for _ in range(5):
        clock.advance(0)
        runner.run_all()


def compact(scheduler: Scheduler, store: LogfileStore, retention_ns: int = 0) -> Deferred[Any]:
    """Start a compaction the way CompactionService does, without a throttle."""
    snapshot = scheduler.snapshot(retention_ns)
    snapshot.throttle = no_pause
    d = store.compact(snapshot.write)
    d.addCallback(lambda result: (result, scheduler.drop_expired(snapshot)))
    return d


def test_compaction_keeps_one_frame_per_live_job_and_rule(tmp_path: Path) -> None:
    """Ten mutations of each job become one frame each; the state replays unchanged."""
    scheduler, store, runner, clock = setup(tmp_path)
    scheduler.set_rule(Rule("r", "j.", ShellSpec("true")))
    future = EPOCH_NS + 3600 * SECOND_NS
    for round_ in range(10):
        for i in range(50):
            scheduler.set_job(f"j.{i}", future + round_ * SECOND_NS + i)
    for i in range(40, 50):
        scheduler.remove_job(f"j.{i}")
    settle(clock, runner)
    before = state(scheduler)
    outcome: list[Any] = []
    compact(scheduler, store).addBoth(outcome.append)
    settle(clock, runner)
    result, dropped = outcome[0]
    assert isinstance(result, CompactionResult)
    assert result.frames_before == 1 + 500 + 10
    assert result.frames_after == 41
    assert result.bytes_after < result.bytes_before
    assert dropped == 0
    assert state(replay(tmp_path / "ztick.log")) == before
    assert not (tmp_path / f"ztick.log{COMPACT_SUFFIX}").exists()


def test_appends_during_compaction_are_kept_and_answered(tmp_path: Path) -> None:
    """Writes made while the snapshot is written land in the new log and resolve OK."""
    scheduler, store, runner, clock = setup(tmp_path)
    future = EPOCH_NS + 3600 * SECOND_NS
    for i in range(20):
        scheduler.set_job(f"a.{i}", future)
    settle(clock, runner)
    outcome: list[Any] = []
    compact(scheduler, store).addBoth(outcome.append)
    # The snapshot is taken; now, before its writer runs, the state moves on.
    commits = [scheduler.set_job("a.1", future + 5), scheduler.remove_job("a.2")]
    commits.append(scheduler.set_job("b.new", future + 7))
    clock.advance(0)  # written to the old file (and copied for the new one)
    commits.append(scheduler.set_job("b.late", future + 9))  # buffered at the swap
    settle(clock, runner)
    assert outcome and isinstance(outcome[0], tuple), outcome
    assert all(c is not None and c.done and c.error is None for c in commits)
    after = replay(tmp_path / "ztick.log")
    assert after.get_job("a.1") == (JobStatus.PLANNED, future + 5)
    assert after.get_job("a.2") is None
    assert after.get_job("b.new") == (JobStatus.PLANNED, future + 7)
    assert after.get_job("b.late") == (JobStatus.PLANNED, future + 9)
    assert state(after) == state(scheduler)


def test_same_instant_jobs_keep_their_firing_order(tmp_path: Path) -> None:
    """Planned jobs are written in set order, so ties fire in the same order after it."""
    scheduler, store, runner, clock = setup(tmp_path)
    due = EPOCH_NS + 60 * SECOND_NS
    for name in ("c", "a", "d", "b"):
        scheduler.set_job(name, due)
    scheduler.set_job("a", due)  # re-set: now last
    settle(clock, runner)
    compact(scheduler, store)
    settle(clock, runner)
    data = (tmp_path / "ztick.log").read_bytes()
    assert [e.id for e in scan(data) if isinstance(e, Job)] == ["c", "d", "b", "a"]


def test_retention_drops_old_finished_jobs_only(tmp_path: Path) -> None:
    """Executed/failed jobs older than the retention go; planned, recent or re-set stay."""
    scheduler, store, runner, clock = setup(tmp_path)
    old = EPOCH_NS - 7200 * SECOND_NS
    recent = EPOCH_NS - 60 * SECOND_NS
    for job_id, ns in (("old.done", old), ("old.failed", old), ("recent.done", recent)):
        scheduler.set_job(job_id, ns)
    scheduler.set_job("old.planned", old + 1)
    clock.advance(0)
    for job_id in ("old.done", "recent.done"):
        scheduler.jobs.set_status(job_id, JobStatus.EXECUTED)
    scheduler.jobs.set_status("old.failed", JobStatus.FAILED)
    scheduler.jobs.set_status("old.planned", JobStatus.TRIGGERED)
    settle(clock, runner)
    outcome: list[Any] = []
    compact(scheduler, store, retention_ns=3600 * SECOND_NS).addBoth(outcome.append)
    scheduler.set_job("old.failed", old)  # re-set while compacting: must survive
    settle(clock, runner)
    _result, dropped = outcome[0]
    assert dropped == 1
    assert scheduler.get_job("old.done") is None
    assert scheduler.get_job("old.failed") == (JobStatus.PLANNED, old)
    assert scheduler.get_job("recent.done") == (JobStatus.EXECUTED, recent)
    assert scheduler.get_job("old.planned") == (JobStatus.TRIGGERED, old + 1)
    assert state(replay(tmp_path / "ztick.log")) == state(scheduler)


def test_a_failed_snapshot_write_leaves_the_old_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing the temporary file: StoreError, old log intact, temp removed."""
    scheduler, store, runner, clock = setup(tmp_path)
    for i in range(10):
        scheduler.set_job(f"j.{i}", EPOCH_NS + SECOND_NS)
    settle(clock, runner)
    log_path = tmp_path / "ztick.log"
    before = log_path.read_bytes()
    temp = str(log_path) + COMPACT_SUFFIX
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        if os.readlink(f"/proc/self/fd/{fd}") == temp:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(logfile_module, "_os_write", full)
    outcome: list[Any] = []
    compact(scheduler, store).addBoth(outcome.append)
    settle(clock, runner)
    assert isinstance(outcome[0], Failure)
    assert isinstance(outcome[0].value, StoreError)
    assert "No space left on device (ENOSPC)" in outcome[0].getErrorMessage()
    assert log_path.read_bytes() == before
    assert not os.path.exists(temp)
    monkeypatch.setattr(logfile_module, "_os_write", real_write)
    commit = scheduler.set_job("j.after", EPOCH_NS + SECOND_NS)
    settle(clock, runner)
    assert commit is not None and commit.error is None
    assert replay(log_path).get_job("j.after") is not None


def test_close_abandons_a_running_compaction(tmp_path: Path) -> None:
    """Closing the store while a snapshot is pending abandons it; the log is unchanged."""
    scheduler, store, runner, clock = setup(tmp_path)
    scheduler.set_job("j", EPOCH_NS + SECOND_NS)
    settle(clock, runner)
    outcome: list[Any] = []
    compact(scheduler, store).addBoth(outcome.append)
    store.close()
    runner.run_all()
    assert isinstance(outcome[0], Failure) and isinstance(outcome[0].value, CompactionAborted)
    assert not (tmp_path / f"ztick.log{COMPACT_SUFFIX}").exists()
    assert replay(tmp_path / "ztick.log").get_job("j") == (JobStatus.PLANNED, EPOCH_NS + SECOND_NS)


def test_a_failed_append_during_compaction_abandons_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails mid-compaction (undone in memory) must not reach the new log."""
    scheduler, store, runner, clock = setup(tmp_path)
    scheduler.set_job("keep", EPOCH_NS + SECOND_NS)
    settle(clock, runner)
    outcome: list[Any] = []
    snapshot_commit = scheduler.set_job("lost", EPOCH_NS + 2 * SECOND_NS)
    compact(scheduler, store).addBoth(outcome.append)  # its snapshot holds "lost"
    monkeypatch.setattr(
        logfile_module,
        "_os_write",
        lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")),
    )
    clock.advance(0)  # the write of "lost" fails
    monkeypatch.undo()
    settle(clock, runner)
    assert snapshot_commit is not None and snapshot_commit.error is not None
    assert scheduler.get_job("lost") is None  # undone
    assert isinstance(outcome[0], Failure) and isinstance(outcome[0].value, CompactionAborted)
    assert replay(tmp_path / "ztick.log").get_job("lost") is None


def test_a_stale_temporary_file_is_removed_at_load(tmp_path: Path) -> None:
    """A crash mid-compaction leaves ``.compact.tmp``; the next load deletes it."""
    log_path = tmp_path / "ztick.log"
    stale = tmp_path / f"ztick.log{COMPACT_SUFFIX}"
    stale.write_bytes(b"\x00\x00\x00\x10 partial snapshot")
    store = LogfileStore(Clock(), str(log_path), True, HeldRunner())
    list(store.load())
    assert not stale.exists()
    store.close()


def test_a_symlinked_logfile_is_compacted_beside_its_target(tmp_path: Path) -> None:
    """``logfile_path`` a symbolic link into another directory (a data volume).

    Compaction writes its temporary file beside the target and renames over the target:
    the link stays a link to it, the target holds every write made before, during and
    after the compaction, and replays to the live state; nothing is created beside the
    link.  A stale temporary file beside the target is removed at load.
    """
    volume, conf = tmp_path / "volume", tmp_path / "etc"
    volume.mkdir()
    conf.mkdir()
    target, link = volume / "ztick.log", conf / "ztick.log"
    link.symlink_to(target)
    (volume / f"ztick.log{COMPACT_SUFFIX}").write_bytes(b"stale")
    clock, runner = make_clock(), HeldRunner()
    store = LogfileStore(clock, str(link), True, runner)
    list(store.load())
    assert not (volume / f"ztick.log{COMPACT_SUFFIX}").exists()
    scheduler = Scheduler(clock, store, {RunnerKind.SHELL: FakeRunner()})
    future = EPOCH_NS + 3600 * SECOND_NS
    for round_ in range(5):
        for i in range(20):
            scheduler.set_job(f"j.{i}", future + round_ * SECOND_NS + i)
    settle(clock, runner)
    outcome: list[Any] = []
    compact(scheduler, store).addBoth(outcome.append)
    assert (volume / f"ztick.log{COMPACT_SUFFIX}").exists()  # the snapshot is "being written"
    scheduler.set_job("during", future)
    settle(clock, runner)
    assert isinstance(outcome[0][0], CompactionResult)
    scheduler.set_job("after", future + 1)
    settle(clock, runner)
    store.close()
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert sorted(os.listdir(conf)) == ["ztick.log"]
    assert sorted(os.listdir(volume)) == ["ztick.log"]
    replayed = state(replay(target))
    assert replayed == state(scheduler)
    assert replayed[0]["during"] == (JobStatus.PLANNED, future)
    assert replayed[0]["after"] == (JobStatus.PLANNED, future + 1)
    assert len(list(scan(target.read_bytes()))) == 22  # one frame per job, nothing lost


def test_undo_restores_the_state_before_a_failed_batch(tmp_path: Path) -> None:
    """A batch whose fsync fails is undone newest first: jobs and rules as before it."""
    scheduler, _store, runner, clock = setup(tmp_path)
    scheduler.set_job("x", EPOCH_NS + 10 * SECOND_NS)
    scheduler.set_rule(Rule("r", "x", ShellSpec("old")))
    settle(clock, runner)
    scheduler.set_job("x", EPOCH_NS + 20 * SECOND_NS)
    scheduler.set_job("x", EPOCH_NS + 30 * SECOND_NS)
    scheduler.set_job("y", EPOCH_NS + 40 * SECOND_NS)
    scheduler.set_rule(Rule("r", "x", ShellSpec("new")))
    scheduler.remove_rule("r")
    clock.advance(0)
    _blocking, d = runner.pending.pop(0)
    d.errback(OSError(errno.EIO, "fsync failed"))
    assert scheduler.get_job("x") == (JobStatus.PLANNED, EPOCH_NS + 10 * SECOND_NS)
    assert scheduler.get_job("y") is None
    assert scheduler.rules.get("r") == Rule("r", "x", ShellSpec("old"))
    assert scheduler.jobs.next_due() == EPOCH_NS + 10 * SECOND_NS


def test_throttle_rests_after_each_work_slice() -> None:
    """The throttle sleeps ``rest`` once ``work`` seconds have passed since the last rest."""
    now = [0.0]
    slept: list[float] = []
    throttle = Throttle(work=0.001, rest=0.006, clock=lambda: now[0], sleep=slept.append)
    throttle()
    now[0] = 0.0005
    throttle()
    assert slept == []
    now[0] = 0.0011
    throttle()
    assert slept == [0.006]


def test_snapshot_stops_when_asked() -> None:
    """The snapshot writer raises CompactionAborted as soon as ``stopping()`` says so."""
    executed = (1 << 40) | (int(JobStatus.EXECUTED) << 32)
    snapshot = Snapshot({f"j{i}": executed for i in range(1000)}, [], [], throttle=no_pause)
    with pytest.raises(CompactionAborted):
        snapshot.write(lambda data: None, lambda: True)


#: What the scheduler puts in ``Snapshot.extensions`` for a scheduled, paused job.
EXTENSIONS: list[Entry] = [
    ScheduleSet("j.0", "every 1 hour", "tz=UTC limit=3", EPOCH_NS),
    RunState("j.0", 1, EPOCH_NS + 3600 * SECOND_NS, 1, EPOCH_NS + 3600 * SECOND_NS),
    Pause("j.0", True, EPOCH_NS + 5 * SECOND_NS),
    ScheduleSet("j.1", "0 8 * * mon-fri", "tz=Europe/Paris limit=0", EPOCH_NS),
    RunState("j.1", 0, I64_MIN, 2, EPOCH_NS),
    RulePolicy("r", Policy(timeout_ns=30 * SECOND_NS, retries=2)),
]


def test_extension_entries_survive_a_compaction_after_the_rules(tmp_path: Path) -> None:
    """A snapshot's extension entries are written after every job and rule, in order.

    The compacted log holds the jobs, then the rule, then exactly the extension
    entries the snapshot carried; extension frames appended while it was written
    are copied after them, so nothing acknowledged is lost.
    """
    scheduler, store, runner, clock = setup(tmp_path)
    scheduler.set_rule(Rule("r", "j.", ShellSpec("true")))
    future = EPOCH_NS + 3600 * SECOND_NS
    for i in range(3):
        scheduler.set_job(f"j.{i}", future + i)
    for entry in EXTENSIONS:  # as the scheduler logs them when they happen
        store.append(entry)
    settle(clock, runner)
    snapshot = scheduler.snapshot(0)
    snapshot.throttle = no_pause
    snapshot.extensions = list(EXTENSIONS)  # the lead's Scheduler.snapshot fills this
    outcome: list[Any] = []
    store.compact(snapshot.write).addBoth(outcome.append)
    late = Pause("j.0", False, future)
    store.append(late)  # appended while the snapshot is written
    settle(clock, runner)
    assert isinstance(outcome[0], CompactionResult), outcome
    assert outcome[0].frames_after == 3 + 1 + len(EXTENSIONS) + 1
    entries = list(scan((tmp_path / "ztick.log").read_bytes()))
    assert entries == [
        Job("j.0", future),
        Job("j.1", future + 1),
        Job("j.2", future + 2),
        Rule("r", "j.", ShellSpec("true")),
        *EXTENSIONS,
        late,
    ]


def test_snapshot_throttles_extension_entries_too() -> None:
    """Extension frames are written in batches with a throttle check after each."""
    paces: list[int] = []
    chunks: list[bytes] = []
    snapshot = Snapshot(
        {},
        [],
        [],
        throttle=lambda: paces.append(len(chunks)),
        extensions=[Pause(f"j.{i}", True, i) for i in range(10)],
        batch=4,
    )
    assert snapshot.write(chunks.append, lambda: False) == 10
    assert paces == [1, 2, 3]  # after 4, 8 and the last 2 frames
    assert list(scan(b"".join(chunks))) == snapshot.extensions


def test_snapshot_stops_during_extension_entries_when_asked() -> None:
    """A shutdown during the extension frames aborts the snapshot like one during jobs."""
    snapshot = Snapshot(
        {}, [], [], throttle=no_pause, extensions=[Pause("j", True, 1)] * 600, batch=256
    )
    calls = [0]

    def stopping() -> bool:
        calls[0] += 1
        return calls[0] >= 2

    with pytest.raises(CompactionAborted):
        snapshot.write(lambda data: None, stopping)
    assert calls[0] == 2


class _SignalReactor(Clock):
    """A Clock that also takes ``callFromThread`` (as the signal handler uses it)."""

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        self.callLater(0, f, *args)


def test_service_runs_on_schedule_and_on_sigusr1(tmp_path: Path) -> None:
    """Every interval, and on SIGUSR1; STAT's value goes idle, running, success."""
    reactor = _SignalReactor()
    reactor.advance(EPOCH_NS / 1e9)
    runner = HeldRunner()
    store = LogfileStore(reactor, str(tmp_path / "ztick.log"), True, runner)
    list(store.load())
    scheduler = Scheduler(reactor, store, {})
    scheduler.set_job("j", EPOCH_NS + 10**15)
    service = CompactionService(reactor, scheduler, store, interval=60)
    service.startService()
    try:
        assert service.status == "idle"
        reactor.advance(59)
        assert service.runs == 0
        reactor.advance(1)
        assert service.status == "running"
        runner.run_all()
        reactor.advance(0)
        runner.run_all()
        assert service.status == "success"
        assert service.runs == 1
        os.kill(os.getpid(), signal.SIGUSR1)
        reactor.advance(0)
        assert service.runs == 2
        runner.run_all()
        assert service.status == "success"
    finally:
        service.stopService()
        store.close()
    assert signal.getsignal(signal.SIGUSR1) is not service._on_signal


class RealReactorTests(trial.TestCase):
    def test_real_reactor_compaction_under_appends(self) -> Deferred[None]:
        """Thread pool + real fsync: 20,000 jobs compacted while 2,000 more are set."""
        path = Path(tempfile.mkdtemp(prefix="ztick-compaction-"))
        self.addCleanup(shutil.rmtree, path, True)
        store = LogfileStore(global_reactor, str(path / "ztick.log"), True)
        list(store.load())
        scheduler = Scheduler(global_reactor, store, {})
        for i in range(20_000):
            scheduler.set_job(f"base.{i}", 2**62 + i)
        snapshot = scheduler.snapshot()
        d = store.compact(snapshot.write)
        for i in range(2_000):
            scheduler.set_job(f"during.{i}", 2**62 + i)

        def check(result: CompactionResult) -> None:
            store.close()
            assert result.frames_after == 22_000
            assert state(replay(path / "ztick.log")) == state(scheduler)

        return d.addCallback(check)


def test_a_large_tail_is_copied_off_the_reactor_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends beyond the on-reactor limit are copied in the pool, in order, before the swap."""
    monkeypatch.setattr(logfile_module, "_TAIL_ON_REACTOR", 200)
    temp = str(tmp_path / f"ztick.log{COMPACT_SUFFIX}")
    temp_writes: list[int] = []
    real_write_all = logfile_module._write_all

    def spy(fd: int, data: bytes) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == temp:
            temp_writes.append(len(data))
        real_write_all(fd, data)

    monkeypatch.setattr(logfile_module, "_write_all", spy)
    scheduler, store, runner, clock = setup(tmp_path)
    future = EPOCH_NS + 3600 * SECOND_NS
    scheduler.set_job("base", future)
    settle(clock, runner)
    outcome: list[Any] = []
    compact(scheduler, store).addBoth(outcome.append)
    for i in range(100):  # about 2.5 KB of frames, well over the limit
        scheduler.set_job(f"t.{i % 30}", future + i)
    clock.advance(0)
    blocking, d = runner.pending.pop(0)  # the snapshot writer
    d.callback(blocking())
    copies = 0
    while runner.pending and not outcome:
        blocking, d = runner.pending.pop(0)
        copies += 1
        d.callback(blocking())
        scheduler.set_job("t.late", future + 1000)  # more appends between copies
        clock.advance(0)
    settle(clock, runner)
    assert copies >= 2
    # The snapshot, at least one tail copy over the limit in the pool, the final rest.
    assert len(temp_writes) >= 3, temp_writes
    assert any(size > 200 for size in temp_writes[1:-1]), temp_writes
    assert isinstance(outcome[0], tuple), outcome
    assert state(replay(tmp_path / "ztick.log")) == state(scheduler)
