"""Tests for ``ztick_tw.scheduler.core.Scheduler`` on a ``Clock`` with fake store and runners."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import Logger
from zope.interface import implementer

from tests.helpers import (
    EPOCH_NS,
    SECOND_NS,
    EventLog,
    FakeRunner,
    FakeStore,
    ImmediateRunner,
    RaisingRunner,
    all_kinds,
    make_clock,
)
from ztick_tw.model import (
    DirectSpec,
    Entry,
    HttpSpec,
    Job,
    JobRemoval,
    JobStatus,
    RedisSpec,
    Rule,
    RuleRemoval,
    RunnerKind,
    ShellSpec,
    ShownStatus,
)
from ztick_tw.runners.base import Execution, IRunner, Outcome
from ztick_tw.scheduler.core import (
    FIRE_BATCH,
    ReplaySummary,
    Scheduler,
    UnknownJob,
    UnknownRule,
)
from ztick_tw.stats import LagWindow

P, T, E, F = JobStatus.PLANNED, JobStatus.TRIGGERED, JobStatus.EXECUTED, JobStatus.FAILED
PAST = EPOCH_NS - 60 * SECOND_NS


class World:
    """A started scheduler with a ``FakeRunner`` for every kind, on a ``Clock``."""

    def __init__(
        self,
        *,
        max_concurrent: int = 64,
        max_network: int = 4096,
        initial: Iterable[Entry] = (),
        runners: Mapping[RunnerKind, IRunner] | None = None,
        interrupted: str = "rerun",
        start: bool = True,
    ) -> None:
        self.clock: Clock = make_clock()
        self.store = FakeStore(initial)
        self.runner = FakeRunner()
        self.log = EventLog()
        self.scheduler = Scheduler(
            self.clock,
            self.store,
            runners if runners is not None else all_kinds(self.runner),
            max_concurrent=max_concurrent,
            max_concurrent_network=max_network,
            interrupted=interrupted,
        )
        self.scheduler.log = Logger(observer=self.log)
        self.summary = self.scheduler.replay(self.store.load())
        if start:
            self.scheduler.start()

    def status(self, job_id: str) -> ShownStatus | None:
        found = self.scheduler.get_job(job_id)
        return None if found is None else found[0]

    def rule(self, rule_id: str, pattern: str, command: str = "true") -> None:
        self.scheduler.set_rule(Rule(rule_id, pattern, ShellSpec(command)))

    def messages(self) -> list[str]:
        return self.log.formats()


# -- requests --------------------------------------------------------------------------------


def test_set_job_persists_planned_frame() -> None:
    """SET stores the job as planned and appends a planned Job frame."""
    w = World()
    assert w.scheduler.set_job("a", EPOCH_NS + SECOND_NS) is None
    assert w.scheduler.get_job("a") == (P, EPOCH_NS + SECOND_NS)
    assert w.store.entries == [Job("a", EPOCH_NS + SECOND_NS, P)]


def test_set_job_returns_the_store_commit() -> None:
    """``set_job`` hands back whatever Commit the store returned."""
    w = World()
    w.store.hold = True
    commit = w.scheduler.set_job("a", EPOCH_NS + SECOND_NS)
    assert commit is w.store.commits[-1]


def test_query_by_prefix() -> None:
    """``query`` lists jobs whose id starts with the prefix."""
    w = World()
    w.scheduler.set_job("app.1", EPOCH_NS + 5)
    w.scheduler.set_job("db.1", EPOCH_NS + 6)
    w.scheduler.set_job("app.2", EPOCH_NS + 7)
    assert list(w.scheduler.query("app.")) == [
        ("app.1", P, EPOCH_NS + 5),
        ("app.2", P, EPOCH_NS + 7),
    ]
    assert len(list(w.scheduler.query())) == 3


def test_remove_job_and_unknown() -> None:
    """REMOVE deletes and persists a removal; an unknown job raises ``UnknownJob``."""
    w = World()
    w.scheduler.set_job("a", EPOCH_NS + SECOND_NS)
    w.scheduler.remove_job("a")
    assert w.scheduler.get_job("a") is None
    assert w.store.entries[-1] == JobRemoval("a")
    with pytest.raises(UnknownJob):
        w.scheduler.remove_job("a")
    assert len(w.store.entries) == 2
    w.clock.advance(5)
    assert w.runner.runs == []


def test_rules_set_remove_list() -> None:
    """Rules are stored, listed in first-set order, removed, and every change persisted."""
    w = World()
    r1 = Rule("r1", "a", ShellSpec("x"))
    r2 = Rule("r2", "b", DirectSpec("/bin/true", ("1",)))
    w.scheduler.set_rule(r1)
    w.scheduler.set_rule(r2)
    assert list(w.scheduler.list_rules()) == [r1, r2]
    w.scheduler.remove_rule("r1")
    assert list(w.scheduler.list_rules()) == [r2]
    with pytest.raises(UnknownRule):
        w.scheduler.remove_rule("r1")
    assert w.store.entries == [r1, r2, RuleRemoval("r1")]


def test_removing_a_rule_keeps_its_jobs() -> None:
    """Removing a rule does not remove jobs; they fail later for lack of a rule."""
    w = World()
    w.rule("r", "a")
    w.scheduler.set_job("a1", EPOCH_NS + SECOND_NS)
    w.scheduler.remove_rule("r")
    assert w.status("a1") is P
    w.clock.advance(1)
    assert w.status("a1") is F


def test_constructor_validates_options() -> None:
    """``max_concurrent`` below 1 and an unknown ``interrupted`` mode are refused."""
    clock = make_clock()
    with pytest.raises(ValueError, match="max_concurrent"):
        Scheduler(clock, FakeStore(), {}, max_concurrent=0)
    with pytest.raises(ValueError, match="max_concurrent_network"):
        Scheduler(clock, FakeStore(), {}, max_concurrent_network=0)
    with pytest.raises(ValueError, match="interrupted"):
        Scheduler(clock, FakeStore(), {}, interrupted="retry")


# -- firing ----------------------------------------------------------------------------------


def test_no_rule_fails_the_job() -> None:
    """A job whose time comes with no matching rule goes straight to failed, persisted."""
    w = World()
    w.rule("r", "other.")
    w.scheduler.set_job("job", EPOCH_NS + SECOND_NS)
    w.clock.advance(1)
    assert w.status("job") is F
    assert w.store.statuses("job") == [P, F]
    assert w.runner.runs == []
    assert any("no rule matches" in m for m in w.messages())


def test_job_in_the_past_fires_at_once() -> None:
    """A job set in the past fires on the next ``clock.advance(0)``."""
    w = World()
    w.rule("r", "")
    w.scheduler.set_job("a", PAST)
    assert w.runner.runs == []
    w.clock.advance(0)
    assert w.runner.started == ["a"]
    assert w.status("a") is T


def test_rule_chosen_at_fire_time() -> None:
    """A rule added after SET (before the job is due) is the one used."""
    w = World()
    w.scheduler.set_job("backup.db", EPOCH_NS + 10 * SECOND_NS)
    w.rule("r", "backup.", "echo late")
    w.clock.advance(10)
    (execution,) = w.runner.executions
    assert execution.rule_id == "r"
    assert execution.spec == ShellSpec("echo late")
    assert execution.job_id == "backup.db"
    assert execution.execution_ns == EPOCH_NS + 10 * SECOND_NS
    assert execution.attempt == 1


def test_rule_replaced_before_fire_uses_new_runner() -> None:
    """Replacing a rule's runner after SET changes what runs at fire time."""
    w = World()
    w.rule("r", "j", "old")
    w.scheduler.set_job("j1", EPOCH_NS + SECOND_NS)
    w.rule("r", "j", "new")
    w.clock.advance(1)
    assert w.runner.executions[0].spec == ShellSpec("new")


def test_longest_prefix_wins() -> None:
    """When several rules match, the one with the longest pattern runs the job."""
    w = World()
    w.rule("all", "")
    w.rule("app", "app.")
    w.rule("appdb", "app.db.")
    for name in ["app.db.x", "app.web", "zzz"]:
        w.scheduler.set_job(name, PAST)
    w.clock.advance(0)
    assert {e.job_id: e.rule_id for e in w.runner.executions} == {
        "app.db.x": "appdb",
        "app.web": "app",
        "zzz": "all",
    }


def test_outcomes_persisted_as_job_frames() -> None:
    """Triggered, then executed or failed, are persisted as Job frames with the status."""
    w = World()
    w.rule("r", "")
    w.scheduler.set_job("ok", PAST)
    w.scheduler.set_job("bad", PAST)
    w.clock.advance(0)
    assert w.store.statuses("ok") == [P, T]
    w.runner.complete("ok", True)
    w.runner.complete("bad", False, "exit 3")
    assert w.status("ok") is E
    assert w.status("bad") is F
    assert w.store.statuses("ok") == [P, T, E]
    assert w.store.statuses("bad") == [P, T, F]
    assert all(j.execution_ns == PAST for j in w.store.job_frames())
    assert any("failed (rule {rule_id})" in m for m in w.messages())


def test_triggered_frame_is_written_before_the_runner_starts() -> None:
    """A runner starts only after its job's triggered frame was handed to the file.

    So a daemon killed while the job runs restarts knowing the job had started.
    """
    seen: list[tuple[str, bool]] = []

    @implementer(IRunner)
    class CheckingRunner:
        def run(self, execution: Execution) -> Deferred[Outcome]:
            written = w.store.entries[: w.store.written]
            seen.append(
                (execution.job_id, Job(execution.job_id, PAST, JobStatus.TRIGGERED) in written)
            )
            return succeed(Outcome(True))

        def stop(self, grace: float) -> Deferred[None]:
            return succeed(None)

    w = World(runners=all_kinds(CheckingRunner()))
    w.rule("r", "")
    w.scheduler.set_job("a", PAST)
    w.scheduler.set_job("b", PAST)
    w.clock.advance(0)
    assert seen == [("a", True), ("b", True)]


def test_job_waiting_for_a_slot_is_logged_triggered_only_when_it_starts() -> None:
    """A queued job's triggered frame is written when it starts, not while it waits.

    So a crash while it only waited reruns it as attempt 1, which is what it is.
    """
    w = World(max_concurrent=1)
    w.rule("r", "")
    w.scheduler.set_job("a", PAST)
    w.scheduler.set_job("b", PAST + 1)
    w.clock.advance(0)
    assert w.runner.started == ["a"]
    assert w.status("b") is T
    assert w.store.statuses("b") == [P]
    w.runner.complete("a")
    assert w.runner.started == ["a", "b"]
    assert w.store.statuses("b") == [P, T]
    assert w.store.written == len(w.store.entries)


def test_run_interrupted_by_shutdown_stays_triggered() -> None:
    """A run the daemon ended at shutdown is not recorded failed: it stays triggered."""
    w = World()
    w.rule("r", "")
    w.scheduler.set_job("cut", PAST)
    w.clock.advance(0)
    w.runner.complete("cut", False, "stopped at shutdown (killed by signal 15)", True)
    assert w.status("cut") is T
    assert w.store.statuses("cut") == [P, T]
    assert any("stays triggered" in m for m in w.messages())


def test_same_instant_fires_in_set_order() -> None:
    """Jobs due at the same instant are started in the order they were set."""
    w = World(max_concurrent=1000)
    w.rule("r", "")
    names = [f"j{(i * 37) % 100}" for i in range(100)]
    for name in names:
        w.scheduler.set_job(name, EPOCH_NS + SECOND_NS)
    w.clock.advance(1)
    assert w.runner.started == names


def test_more_than_one_batch_all_fire() -> None:
    """More due jobs than one wake-up batch still all fire, in order."""
    w = World(runners=all_kinds(ImmediateRunner()))
    w.rule("r", "")
    count = FIRE_BATCH * 2 + 5
    for i in range(count):
        w.scheduler.set_job(f"j{i:05}", PAST)
    w.clock.advance(0)
    assert w.scheduler.jobs.count(E) == count
    assert w.clock.getDelayedCalls() == []


def test_runner_kind_not_configured_fails_job() -> None:
    """A rule whose runner kind has no runner fails the job with a reason."""
    runner = FakeRunner()
    w = World(runners={RunnerKind.SHELL: runner})
    w.scheduler.set_rule(Rule("h", "", HttpSpec("GET", "http://h/")))
    w.scheduler.set_job("a", PAST)
    w.clock.advance(0)
    assert w.status("a") is F
    assert w.store.statuses("a") == [P, T, F]
    assert w.scheduler.executions_inflight == 0


# -- concurrency -----------------------------------------------------------------------------


def test_concurrency_cap_queues_fifo() -> None:
    """At most ``max_concurrent`` runs at once; the rest wait and start FIFO as slots free."""
    w = World(max_concurrent=2)
    w.rule("r", "")
    for name in ["a", "b", "c", "d", "e"]:
        w.scheduler.set_job(name, PAST)
    w.clock.advance(0)
    assert w.runner.started == ["a", "b"]
    assert w.scheduler.executions_inflight == 2
    assert w.scheduler.executions_pending == 3
    assert all(w.status(n) is T for n in "abcde")
    w.runner.complete("b")
    assert w.runner.started == ["a", "b", "c"]
    w.runner.complete("a", False)
    assert w.runner.started == ["a", "b", "c", "d"]
    w.runner.complete("c")
    w.runner.complete("d")
    assert w.runner.started == ["a", "b", "c", "d", "e"]
    w.runner.complete("e")
    assert w.scheduler.executions_inflight == 0
    assert w.scheduler.executions_pending == 0
    assert [w.status(n) for n in "abcde"] == [F, E, E, E, E]


def test_network_runs_have_their_own_cap() -> None:
    """Network runs (http, redis, amqp) do not wait for process slots, nor the reverse.

    With one process slot taken by a long script, redis runs still start at once, up to
    their own cap; past it they wait, FIFO, and start as network runs finish.
    """
    w = World(max_concurrent=1, max_network=3)
    w.rule("p", "p.")
    w.scheduler.set_rule(Rule("q", "q.", RedisSpec("redis://127.0.0.1", "RPUSH", "k")))
    for name in ["p.1", "p.2", "q.1", "q.2", "q.3", "q.4"]:
        w.scheduler.set_job(name, PAST)
    w.clock.advance(0)
    assert w.runner.started == ["p.1", "q.1", "q.2", "q.3"]
    assert w.scheduler.executions_inflight == 4
    assert w.scheduler.executions_pending == 2  # p.2 for a process slot, q.4 for a network one
    w.runner.complete("q.2")
    assert w.runner.started[-1] == "q.4"
    assert w.scheduler.executions_pending == 1
    w.runner.complete("p.1")
    assert w.runner.started[-1] == "p.2"
    for name in ["q.1", "q.3", "q.4", "p.2"]:
        w.runner.complete(name)
    assert w.scheduler.executions_inflight == 0
    assert w.scheduler.executions_pending == 0
    assert w.scheduler.jobs.count(E) == 6


def test_stop_drops_runs_waiting_in_either_queue() -> None:
    """At shutdown, runs still waiting for a process or a network slot are let go."""
    w = World(max_concurrent=1, max_network=1)
    w.rule("p", "p.")
    w.scheduler.set_rule(Rule("q", "q.", RedisSpec("redis://127.0.0.1", "RPUSH", "k")))
    for name in ["p.1", "p.2", "q.1", "q.2"]:
        w.scheduler.set_job(name, PAST)
    w.clock.advance(0)
    assert w.scheduler.executions_pending == 2
    w.scheduler.stop(0)
    assert w.scheduler.executions_pending == 0
    assert w.runner.started == ["p.1", "q.1"]


def test_synchronous_runner_does_not_recurse() -> None:
    """A runner that completes at once with a cap of 1 still runs every job, in order."""
    runner = ImmediateRunner()
    w = World(max_concurrent=1, runners=all_kinds(runner))
    w.rule("r", "")
    for i in range(50):
        w.scheduler.set_job(f"j{i:02}", PAST)
    w.clock.advance(0)
    assert [e.job_id for e in runner.executions] == [f"j{i:02}" for i in range(50)]
    assert w.scheduler.jobs.count(E) == 50


def test_reset_while_queued_drops_queued_run() -> None:
    """Re-SET of a job waiting for a slot drops that run; it runs once, at its new time."""
    w = World(max_concurrent=1)
    w.rule("r", "")
    w.scheduler.set_job("a", PAST)
    w.scheduler.set_job("b", PAST)
    w.clock.advance(0)
    assert w.runner.started == ["a"]
    w.scheduler.set_job("b", EPOCH_NS + 10 * SECOND_NS)
    assert w.status("b") is P
    w.runner.complete("a")
    assert w.runner.started == ["a"]
    w.clock.advance(10)
    assert w.runner.started == ["a", "b"]


def test_reset_while_queued_to_same_time_runs_once() -> None:
    """Re-SET of a queued job to the same (past) time gives exactly one run of it."""
    w = World(max_concurrent=1)
    w.rule("r", "")
    w.scheduler.set_job("a", PAST)
    w.scheduler.set_job("b", PAST)
    w.clock.advance(0)
    w.scheduler.set_job("b", PAST)
    w.clock.advance(0)  # b fires again and is queued behind its old, void run
    w.runner.complete("a")
    assert w.runner.started == ["a", "b"]
    w.runner.complete("b")
    assert w.runner.started == ["a", "b"]
    assert w.status("b") is E
    assert w.scheduler.executions_pending == 0


def test_reset_while_queued_to_same_time_with_free_slots_runs_once() -> None:
    """Re-SET of a queued job to the same time: when slots free up it still runs only once."""
    w = World(max_concurrent=2)
    w.rule("r", "")
    for name in ["a", "c", "b"]:
        w.scheduler.set_job(name, PAST)
    w.clock.advance(0)
    assert w.runner.started == ["a", "c"]
    w.scheduler.set_job("b", PAST)
    w.clock.advance(0)
    w.runner.complete("a")
    w.runner.complete("c")
    assert w.runner.started == ["a", "c", "b"]
    assert w.scheduler.executions_inflight == 1


def test_remove_while_queued_drops_run() -> None:
    """REMOVE of a queued job drops its run."""
    w = World(max_concurrent=1)
    w.rule("r", "")
    w.scheduler.set_job("a", PAST)
    w.scheduler.set_job("b", PAST)
    w.clock.advance(0)
    w.scheduler.remove_job("b")
    w.runner.complete("a")
    assert w.runner.started == ["a"]


def test_reset_while_running_ignores_old_outcome() -> None:
    """Re-SET while a run is in flight: the old run's outcome is not recorded."""
    w = World()
    w.rule("r", "")
    w.scheduler.set_job("a", PAST)
    w.clock.advance(0)
    w.scheduler.set_job("a", EPOCH_NS + 100 * SECOND_NS)
    w.runner.complete("a", True)
    assert w.scheduler.get_job("a") == (P, EPOCH_NS + 100 * SECOND_NS)
    assert w.store.statuses("a") == [P, T, P]
    assert w.scheduler.executions_inflight == 0


def test_reset_while_running_to_same_time_ignores_old_outcome() -> None:
    """Re-SET to the same time while running: only the new run's outcome counts."""
    w = World()
    w.rule("r", "")
    w.scheduler.set_job("a", PAST)
    w.clock.advance(0)
    w.scheduler.set_job("a", PAST)
    w.clock.advance(0)
    assert w.runner.started == ["a", "a"]
    w.runner.complete("a", False)  # the old run
    assert w.status("a") is T
    assert w.store.statuses("a") == [P, T, P, T]
    w.runner.complete("a", True)  # the new run
    assert w.status("a") is E
    assert w.store.statuses("a") == [P, T, P, T, E]


def test_remove_while_running_ignores_outcome() -> None:
    """REMOVE while running: the run's outcome is ignored and nothing is persisted."""
    w = World()
    w.rule("r", "")
    w.scheduler.set_job("a", PAST)
    w.clock.advance(0)
    w.scheduler.remove_job("a")
    before = list(w.store.entries)
    w.runner.complete("a")
    assert w.scheduler.get_job("a") is None
    assert w.store.entries == before


def test_remove_and_reset_while_running_ignores_old_outcome() -> None:
    """REMOVE then SET at the same time while running: the old outcome is ignored."""
    w = World()
    w.rule("r", "")
    w.scheduler.set_job("a", PAST)
    w.clock.advance(0)
    w.scheduler.remove_job("a")
    w.scheduler.set_job("a", PAST)
    w.clock.advance(0)
    w.runner.complete("a", True)
    assert w.status("a") is T
    w.runner.complete("a", False)
    assert w.status("a") is F


def test_raising_runner_does_not_stop_other_jobs() -> None:
    """A runner that raises fails its job; other jobs in the same wake still run."""
    good = FakeRunner()
    w = World(runners={RunnerKind.SHELL: RaisingRunner(), RunnerKind.DIRECT: good})
    w.scheduler.set_rule(Rule("s", "s", ShellSpec("x")))
    w.scheduler.set_rule(Rule("d", "d", DirectSpec("/bin/true")))
    w.scheduler.set_job("s1", PAST)
    w.scheduler.set_job("d1", PAST)
    w.scheduler.set_job("s2", PAST)
    w.scheduler.set_job("d2", PAST)
    w.clock.advance(0)
    assert w.status("s1") is F
    assert w.status("s2") is F
    assert good.started == ["d1", "d2"]
    assert w.scheduler.executions_inflight == 2


def test_errbacking_runner_fails_job() -> None:
    """A runner whose Deferred errbacks fails the job (and the error is logged)."""
    w = World(runners=all_kinds(RaisingRunner(errback=True)))
    w.rule("r", "")
    w.scheduler.set_job("a", PAST)
    w.scheduler.set_job("b", PAST)
    w.clock.advance(0)
    assert w.status("a") is F
    assert w.status("b") is F
    assert w.store.statuses("a") == [P, T, F]
    assert w.scheduler.executions_inflight == 0
    assert [f.type for f in w.log.failures()] == [RuntimeError, RuntimeError]


# -- lag ------------------------------------------------------------------------------------


def test_lag_recorded_from_due_time() -> None:
    """A run delayed by a full slot records its lag in microseconds."""
    lag = LagWindow()
    w = World(max_concurrent=1)
    w.scheduler.lag = lag
    w.rule("r", "")
    w.scheduler.set_job("a", EPOCH_NS + SECOND_NS)
    w.scheduler.set_job("b", EPOCH_NS + SECOND_NS)
    w.clock.advance(1)
    w.clock.advance(3)
    w.runner.complete("a")
    assert len(lag) == 2
    assert lag.maximum() == pytest.approx(3_000_000, abs=2)
    assert lag.percentile(0.5) <= 1


def test_lag_of_past_job_measured_from_set_time() -> None:
    """A job set in the past counts lag from when it was set, not from its due time."""
    w = World()
    w.rule("r", "")
    w.scheduler.set_job("a", EPOCH_NS - 3600 * SECOND_NS)
    w.clock.advance(0)
    assert w.scheduler.lag.maximum() <= 1


# -- replay and start -------------------------------------------------------------------------


def test_replay_last_write_wins() -> None:
    """Replay applies frames in order: upserts, removals delete, summary counts."""
    rule = Rule("r", "", ShellSpec("x"))
    entries: list[Entry] = [
        Job("a", 10, P),
        Job("b", 20, P),
        rule,
        Job("a", 30, E),
        JobRemoval("b"),
        Rule("q", "q", ShellSpec("y")),
        RuleRemoval("q"),
        JobRemoval("never-there"),
    ]
    w = World(initial=entries)
    assert w.summary == ReplaySummary(frames=8, jobs=1, rules=1)
    assert w.scheduler.get_job("a") == (E, 30)
    assert w.scheduler.get_job("b") is None
    assert list(w.scheduler.list_rules()) == [rule]
    assert w.store.entries == []  # replay writes nothing


def test_replayed_finished_jobs_do_not_run_again() -> None:
    """Executed and failed jobs from the log do not run again after a restart."""
    entries: list[Entry] = [
        Rule("r", "", ShellSpec("x")),
        Job("done", PAST, P),
        Job("done", PAST, T),
        Job("done", PAST, E),
        Job("bad", PAST, F),
        Job("due", PAST, P),
    ]
    w = World(initial=entries)
    w.clock.advance(0)
    assert w.runner.started == ["due"]


def test_start_reruns_triggered_job_with_attempt_2() -> None:
    """A job triggered when the process died is run again with attempt 2."""
    entries: list[Entry] = [
        Rule("r", "", ShellSpec("x")),
        Job("a", PAST, P),
        Job("a", PAST, T),
    ]
    w = World(initial=entries)
    assert w.status("a") is P
    w.clock.advance(0)
    (execution,) = w.runner.executions
    assert execution.attempt == 2
    assert w.store.statuses("a") == [T]
    w.runner.complete("a")
    assert w.status("a") is E
    assert any("running it again" in m for m in w.messages())


def test_start_reruns_with_attempt_3_after_two_triggered_frames() -> None:
    """Two triggered frames since the last planned one mean the rerun is attempt 3."""
    entries: list[Entry] = [
        Rule("r", "", ShellSpec("x")),
        Job("a", PAST, P),
        Job("a", PAST, T),
        Job("a", PAST, T),
        Job("b", PAST, P),
        Job("b", PAST, T),
        Job("b", PAST, E),
        Job("b", PAST, P),
        Job("b", PAST, T),
    ]
    w = World(initial=entries)
    w.clock.advance(0)
    assert {e.job_id: e.attempt for e in w.runner.executions} == {"a": 3, "b": 2}


def test_attempt_counting_survives_a_second_crash() -> None:
    """Replaying the log written by a rerun (a third triggered frame) gives attempt 4."""
    log: list[Entry] = [Rule("r", "", ShellSpec("x")), Job("a", PAST, P), Job("a", PAST, T)]
    first = World(initial=log)
    first.clock.advance(0)
    log += first.store.entries  # the rerun's triggered frame, then "crash"
    second = World(initial=log)
    second.clock.advance(0)
    assert second.runner.executions[0].attempt == 3
    log += second.store.entries
    third = World(initial=log)
    third.clock.advance(0)
    assert third.runner.executions[0].attempt == 4


def test_reset_after_interrupted_resets_attempts() -> None:
    """A SET of an interrupted job before it reruns starts again at attempt 1."""
    entries: list[Entry] = [Rule("r", "", ShellSpec("x")), Job("a", PAST, P), Job("a", PAST, T)]
    w = World(initial=entries)
    w.scheduler.set_job("a", PAST)
    w.clock.advance(0)
    assert [e.attempt for e in w.runner.executions] == [1]


def test_start_with_interrupted_fail_marks_failed() -> None:
    """With ``interrupted='fail'`` a job triggered at shutdown becomes failed, persisted."""
    entries: list[Entry] = [
        Rule("r", "", ShellSpec("x")),
        Job("a", PAST, P),
        Job("a", PAST, T),
        Job("b", EPOCH_NS + SECOND_NS, P),
    ]
    w = World(initial=entries, interrupted="fail")
    assert w.status("a") is F
    assert w.store.entries == [Job("a", PAST, F)]
    w.clock.advance(1)
    assert w.runner.started == ["b"]
    assert w.status("a") is F


def test_nothing_fires_before_start() -> None:
    """Replayed due jobs do not fire until ``start``."""
    entries: list[Entry] = [Rule("r", "", ShellSpec("x")), Job("a", PAST, P)]
    w = World(initial=entries, start=False)
    w.clock.advance(10)
    assert w.runner.runs == []
    w.scheduler.start()
    w.clock.advance(0)
    assert w.runner.started == ["a"]


def test_stop_cancels_timer_and_stops_runners() -> None:
    """``stop`` leaves no pending DelayedCall, drops queued runs and stops each runner once."""
    w = World(max_concurrent=1)
    w.rule("r", "")
    w.scheduler.set_job("a", PAST)
    w.scheduler.set_job("b", PAST)
    w.scheduler.set_job("later", EPOCH_NS + 60 * SECOND_NS)
    w.clock.advance(0)
    assert len(w.clock.getDelayedCalls()) == 1
    d = w.scheduler.stop(5.0)
    assert w.clock.getDelayedCalls() == []
    assert w.runner.stops == [5.0]
    results: list[object] = []
    d.addCallback(results.append)
    assert results == [None]
    w.runner.complete("a")  # the running job still records its outcome
    assert w.status("a") is E
    assert w.runner.started == ["a"]  # b was dropped from the queue
    w.clock.advance(120)
    assert w.runner.started == ["a"]
    w.scheduler.set_job("c", PAST)
    assert w.clock.getDelayedCalls() == []


def test_stop_with_no_runners() -> None:
    """``stop`` with no runners fires at once."""
    w = World(runners={})
    results: list[object] = []
    w.scheduler.stop(1.0).addCallback(results.append)
    assert results == [None]


def test_counts_follow_lifecycle() -> None:
    """Per-status counts follow planned, triggered, executed and failed."""
    w = World()
    w.rule("r", "x")
    w.scheduler.set_job("x1", PAST)
    w.scheduler.set_job("x2", PAST)
    w.scheduler.set_job("y", PAST)
    w.scheduler.set_job("future", EPOCH_NS + SECOND_NS)
    jobs = w.scheduler.jobs
    assert [jobs.count(s) for s in JobStatus] == [4, 0, 0, 0]
    w.clock.advance(0)
    assert [jobs.count(s) for s in JobStatus] == [1, 2, 0, 1]
    w.runner.complete("x1")
    w.runner.complete("x2", False)
    assert [jobs.count(s) for s in JobStatus] == [1, 0, 1, 2]


# -- randomized model check ------------------------------------------------------------------


def test_random_operations_keep_invariants() -> None:
    """Seeded random SET/REMOVE/advance/complete: one timer, one run per SET, right statuses.

    Checked after every step: at most one pending DelayedCall; after an advance every
    planned job is in the future; a run starts only for the job's current SET, at most
    once per SET; a run that ends records its outcome only if no SET or REMOVE came
    after it started.
    """
    rnd = random.Random(99)
    w = World(max_concurrent=3)
    w.rule("r", "")
    gen: dict[str, int] = {}  # job -> number of the SET that made its current state
    started: set[tuple[str, int]] = set()
    run_gen: list[int] = []  # per FakeRunner run: the SET number it ran for
    expected: dict[str, JobStatus] = {}
    counter = 0
    for _ in range(4000):
        op = rnd.random()
        job_id = f"j{rnd.randrange(15)}"
        if op < 0.35:
            counter += 1
            offset = rnd.choice([-5, 0, 1, 2, 5]) * SECOND_NS
            w.scheduler.set_job(job_id, int(w.clock.seconds() * 1e9) + offset)
            gen[job_id] = counter
            expected[job_id] = P
        elif op < 0.45:
            if job_id in gen:
                w.scheduler.remove_job(job_id)
                del gen[job_id]
                del expected[job_id]
        elif op < 0.7:
            w.clock.advance(rnd.choice([0, 0.5, 1, 3]))
        else:
            pending = [(i, e) for i, (e, d) in enumerate(w.runner.runs) if not d.called]
            if pending:
                i, execution = rnd.choice(pending)
                success = rnd.random() < 0.5
                current = gen.get(execution.job_id) == run_gen[i]
                w.runner.runs[i][1].callback(Outcome(success))
                if current:
                    expected[execution.job_id] = E if success else F
        # new runs: each for the current SET of its job, once
        while len(run_gen) < len(w.runner.runs):
            execution = w.runner.runs[len(run_gen)][0]
            key = (execution.job_id, gen[execution.job_id])
            assert key not in started, key
            started.add(key)
            run_gen.append(key[1])
            expected[execution.job_id] = T
        assert len(w.clock.getDelayedCalls()) <= 1
        if 0.45 <= op < 0.7:  # just advanced: nothing due is left planned
            now = int(w.clock.seconds() * 1e9)
            for jid in gen:
                status, ns = w.scheduler.get_job(jid) or (None, 0)
                assert status is not P or ns > now, jid
        for jid, status in expected.items():
            actual = w.status(jid)
            if status is P and actual is not P:
                # fired since: failed for no rule is impossible (rule ""), so triggered
                assert actual is T
                expected[jid] = T
            else:
                assert actual is status, (jid, actual, status)
        assert w.scheduler.executions_inflight <= 3
