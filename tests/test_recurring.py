"""Recurring jobs, pause/resume, RUN, retries and overlap/misfire in the scheduler (SPEC §8-9).

On a ``Clock`` with the fake store and runners of ``tests.helpers``; the schedules are
compiled by the real engine (``ztick_tw.schedules``).
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from tests.helpers import (
    EPOCH_NS,
    SECOND_NS,
    EventLog,
    FakeRunner,
    FakeStore,
    all_kinds,
    make_clock,
)
from ztick_tw.model import (
    Entry,
    Job,
    JobStatus,
    Pause,
    Policy,
    Rule,
    RulePolicy,
    RunState,
    ScheduleRemoval,
    ScheduleSet,
    ShellSpec,
    Shown,
)
from ztick_tw.runners.base import Outcome
from ztick_tw.scheduler.core import NoRule, NotScheduled, Scheduler, UnknownJob
from ztick_tw.schedules import compile_schedule, parse_options

P, T, E, F = JobStatus.PLANNED, JobStatus.TRIGGERED, JobStatus.EXECUTED, JobStatus.FAILED


@dataclass
class Run:
    job_id: str
    due_ns: int
    started_ns: int
    attempt: int
    outcome: str = "running"
    detail: str = ""


@dataclass
class RecordingRunLog:
    """A run history that keeps what it is told, in memory (the real one is threaded)."""

    runs: list[Run] = field(default_factory=list)
    skips: list[tuple[str, int, str]] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)

    def begin(self, job_id: str, due_ns: int, started_ns: int, attempt: int) -> Run:
        run = Run(job_id, due_ns, started_ns, attempt)
        self.runs.append(run)
        return run

    def finish(
        self,
        handle: object,
        ended_ns: int,
        outcome: str,
        exit_code: int | None,
        detail: str,
        output: bytes,
    ) -> None:
        assert isinstance(handle, Run)
        handle.outcome = outcome
        handle.detail = detail

    def skipped(self, job_id: str, due_ns: int, detail: str) -> None:
        self.skips.append((job_id, due_ns, detail))

    def forget(self, job_id: str) -> None:
        self.forgotten.append(job_id)

    def outcomes(self, job_id: str) -> list[str]:
        return [r.outcome for r in self.runs if r.job_id == job_id]


class World:
    """A started scheduler with a fake runner, a recording history and a seeded RNG."""

    def __init__(
        self,
        initial: Iterable[Entry] = (),
        *,
        start: bool = True,
        advance_s: float = 0,
        policy: Policy | None = None,
    ) -> None:
        self.clock = make_clock()
        self.clock.advance(advance_s)
        self.store = FakeStore(initial)
        self.runner = FakeRunner()
        self.history = RecordingRunLog()
        self.log = EventLog()
        self.scheduler = Scheduler(
            self.clock,
            self.store,
            all_kinds(self.runner),
            history=self.history,
            policy_defaults=policy,
            rng=random.Random(7),
        )
        self.scheduler.log = Logger(observer=self.log)
        self.scheduler.replay(self.store.load())
        self.scheduler.set_rule(Rule("r", "", ShellSpec("true")))
        if start:
            self.scheduler.start()

    @property
    def now_ns(self) -> int:
        return int(self.clock.seconds() * SECOND_NS)

    def schedule(self, job_id: str, text: str, *options: str) -> int:
        schedule = compile_schedule(text, parse_options(options), self.now_ns)
        first, _commit = self.scheduler.set_schedule(job_id, schedule)
        return first

    def get(self, job_id: str) -> tuple[object, int] | None:
        return self.scheduler.get_job(job_id)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    def finish(self, job_id: str, success: bool = True) -> None:
        self.runner.complete(job_id, success)

    def entries_of(self, kind: type) -> list[Entry]:
        return [e for e in self.store.entries if isinstance(e, kind)]


# -- schedules ---------------------------------------------------------------------------


def test_every_fires_at_once_then_each_interval() -> None:
    """Without ``starting``, ``every 10 seconds`` fires now, then is re-planned 10 s on."""
    w = World()
    first = w.schedule("beat", "every 10 seconds")
    assert first == w.now_ns
    w.advance(0)
    assert w.runner.started == ["beat"]
    assert w.get("beat") == (T, first)
    w.finish("beat")
    assert w.get("beat") == (P, first + 10 * SECOND_NS)
    w.advance(10)
    assert w.runner.started == ["beat", "beat"]
    assert w.runner.executions[1].execution_ns == first + 10 * SECOND_NS


def test_schedule_set_logs_schedule_then_job() -> None:
    """SCHEDULE SET writes the schedule, then a planned type-0 frame, and no more.

    No run-state frame: a replayed schedule starts at its start.
    """
    w = World()
    first = w.schedule("beat", "every 1 minute")
    tail = w.store.entries[-2:]
    assert isinstance(tail[0], ScheduleSet) and tail[0].text == "every 1 minute"
    assert tail[0].start_ns == w.now_ns
    assert tail[1] == Job("beat", first, P)
    again = World(w.store.entries, start=False)
    rec, _ = again.scheduler.get_schedule("beat")
    assert (rec.runs, rec.occurrence_ns) == (0, first)


def test_schedule_started_in_the_past_logs_its_progress() -> None:
    """A start in the past fires now: the run-state frame says so, and replays it."""
    w = World()
    first = w.schedule("old", "every 1 hour starting 2020-01-01")
    assert first == w.now_ns
    assert w.store.entries[-1] == RunState("old", 0, first, 1, first)
    again = World(w.store.entries, start=False)
    rec, _ = again.scheduler.get_schedule("old")
    assert rec.occurrence_ns == first


def test_limit_ends_the_schedule_with_the_last_outcome() -> None:
    """``limit=2``: after two runs the job keeps the last outcome and ``next`` is none."""
    w = World()
    w.schedule("twice", "every 5 seconds", "limit=2")
    w.advance(0)
    w.finish("twice")
    w.advance(5)
    w.finish("twice", success=False)
    status, _ns = w.get("twice") or (None, 0)
    assert status == F
    rec, _schedule = w.scheduler.get_schedule("twice")
    assert rec.runs == 2
    assert w.scheduler.next_ns("twice", rec) is None
    w.advance(60)
    assert w.runner.started == ["twice", "twice"]


def test_start_in_the_future_waits_for_it() -> None:
    """``starting`` a later time: the first occurrence is that time."""
    w = World()
    first = w.schedule("later", "every 1 hour starting tomorrow 00:00")
    assert first > w.now_ns
    w.advance((first - w.now_ns) / SECOND_NS - 1)
    assert w.runner.started == []
    w.advance(1)
    assert w.runner.started == ["later"]


def test_set_makes_a_scheduled_job_one_shot() -> None:
    """A plain SET drops the schedule (and says so in the log)."""
    w = World()
    w.schedule("j", "every 1 minute")
    w.scheduler.set_job("j", w.now_ns + 3600 * SECOND_NS)
    with pytest.raises(NotScheduled):
        w.scheduler.get_schedule("j")
    assert w.entries_of(ScheduleRemoval) == [ScheduleRemoval("j")]


def test_schedule_remove_during_a_run_lets_it_finish_and_no_other_start() -> None:
    """SCHEDULE REMOVE mid-run: the run finishes, the job stays, no occurrence follows."""
    w = World()
    w.schedule("j", "every 2 seconds")
    w.advance(0)
    w.scheduler.remove_schedule("j")
    w.advance(10)
    w.finish("j")
    assert w.runner.started == ["j"]
    assert w.get("j") is not None
    w.advance(60)
    assert w.runner.started == ["j"]


# -- overlap -----------------------------------------------------------------------------


def test_overlap_skip_records_the_skipped_occurrence() -> None:
    """``overlap=skip``: an occurrence due while the run goes on is skipped and recorded."""
    w = World()
    first = w.schedule("slow", "every 10 seconds")
    w.advance(0)
    w.advance(10)
    assert w.runner.started == ["slow"]
    skipped = ("slow", first + 10 * SECOND_NS, "the previous run was still running")
    assert w.history.skips == [skipped]
    w.advance(5)
    w.finish("slow")
    assert w.get("slow") == (P, first + 20 * SECOND_NS)


def test_overlap_queue_runs_the_latest_waiting_occurrence_after() -> None:
    """``overlap=queue``: one occurrence waits (the latest; older ones are skipped)."""
    w = World()
    first = w.schedule("q", "every 10 seconds", "overlap=queue")
    w.advance(0)
    w.advance(10)
    w.advance(10)
    assert [s[1] for s in w.history.skips] == [first + 10 * SECOND_NS]
    w.finish("q")
    assert w.runner.started == ["q", "q"]
    assert w.runner.executions[1].execution_ns == first + 20 * SECOND_NS


def test_overlap_allow_runs_alongside() -> None:
    """``overlap=allow``: the next occurrence starts while the previous run goes on."""
    w = World()
    w.schedule("a", "every 10 seconds", "overlap=allow")
    w.advance(0)
    w.advance(10)
    assert len(w.runner.pending) == 2


def test_overlap_replace_cancels_the_running_one() -> None:
    """``overlap=replace``: the running run is cancelled (outcome ``cancelled``)."""
    w = World()
    w.schedule("r", "every 10 seconds", "overlap=replace")
    w.advance(0)
    w.advance(10)
    assert w.runner.started == ["r", "r"]
    assert w.history.outcomes("r") == ["cancelled", "running"]


# -- pause and resume --------------------------------------------------------------------


def test_paused_job_never_fires_and_shows_paused() -> None:
    """A paused job is shown ``paused`` and does not fire; RESUME of a past one fires it."""
    w = World()
    due = w.now_ns + 5 * SECOND_NS
    w.scheduler.set_job("p", due)
    w.scheduler.pause("p")
    assert w.get("p") == (Shown.PAUSED, due)
    w.advance(10)
    assert w.runner.started == []
    assert w.get("p") == (Shown.PAUSED, due)
    w.scheduler.resume("p")
    w.advance(0)
    assert w.runner.started == ["p"]
    assert w.entries_of(Pause)[0] == Pause("p", True, EPOCH_NS)


def test_resume_applies_misfire_once_and_counts_missed() -> None:
    """Occurrences missed while paused run once (coalesced) and are all counted."""
    w = World()
    w.schedule("s", "every 10 seconds starting tomorrow 00:00")
    rec, _ = w.scheduler.get_schedule("s")
    assert rec.occurrence_ns is not None
    w.scheduler.pause("s")
    w.advance((rec.occurrence_ns - w.now_ns) / SECOND_NS + 35)
    assert w.runner.started == []
    w.scheduler.resume("s")
    w.advance(0)
    assert w.runner.started == ["s"]
    assert w.scheduler.counters.occurrences_missed == 4
    assert w.runner.executions[0].execution_ns == rec.entry.start_ns + 30 * SECOND_NS


def test_unknown_job_cannot_be_paused() -> None:
    """PAUSE and RESUME of a job that does not exist raise ``UnknownJob``."""
    w = World()
    with pytest.raises(UnknownJob):
        w.scheduler.pause("nope")
    with pytest.raises(UnknownJob):
        w.scheduler.resume("nope")


# -- misfire after a restart -------------------------------------------------------------


def _downtime(misfire: str, *extra: str) -> World:
    """A job on ``every 10 seconds`` last planned 35 s before the daemon starts again."""
    clock = make_clock()
    start = int(clock.seconds() * SECOND_NS)
    options = parse_options([f"misfire={misfire}", *extra])
    schedule = compile_schedule("every 10 seconds", options, start)
    entry = ScheduleSet("m", "every 10 seconds", " ".join(options.render()), start)
    initial: list[Entry] = [
        entry,
        Job("m", start, P),
        RunState("m", 0, start, 1, start),
    ]
    assert schedule.first() == start
    return World(initial, advance_s=35)


def test_misfire_once_runs_the_latest_missed_occurrence() -> None:
    """``misfire=once``: one run, for the latest missed occurrence; 4 counted."""
    w = _downtime("once")
    w.advance(0)
    assert w.runner.started == ["m"]
    assert w.runner.executions[0].execution_ns == EPOCH_NS + 30 * SECOND_NS
    assert w.scheduler.counters.occurrences_missed == 4
    w.finish("m")
    assert w.get("m") == (P, EPOCH_NS + 40 * SECOND_NS)


def test_misfire_all_runs_each_missed_occurrence_oldest_first() -> None:
    """``misfire=all``: every missed occurrence runs, one after another, own due time."""
    w = _downtime("all")
    dues = []
    for _ in range(4):
        w.advance(0)
        dues.append(w.runner.executions[-1].execution_ns)
        w.finish("m")
    assert dues == [EPOCH_NS + k * 10 * SECOND_NS for k in range(4)]
    assert w.get("m") == (P, EPOCH_NS + 40 * SECOND_NS)


def test_misfire_skip_runs_none() -> None:
    """``misfire=skip``: nothing runs now; the next occurrence is planned."""
    w = _downtime("skip")
    w.advance(0)
    assert w.runner.started == []
    assert w.get("m") == (P, EPOCH_NS + 40 * SECOND_NS)
    assert w.scheduler.counters.occurrences_missed == 4


def test_grace_skips_occurrences_too_late() -> None:
    """``grace=4s``: missed occurrences more than 4 s late are skipped whatever the policy."""
    w = _downtime("all", "grace=4s")
    w.advance(0)
    assert w.runner.started == []
    assert w.get("m") == (P, EPOCH_NS + 40 * SECOND_NS)


# -- retries, timeouts ---------------------------------------------------------------------


def test_retries_replan_then_fail_after_the_last_attempt() -> None:
    """retries=2: failed attempts are re-planned after the backoff; failed after the third."""
    w = World(policy=Policy(retries=2, backoff_min_ns=SECOND_NS, backoff_max_ns=SECOND_NS))
    due = w.now_ns + SECOND_NS
    w.scheduler.set_job("x", due)
    w.advance(1)
    w.finish("x", success=False)
    assert w.get("x") == (P, due + SECOND_NS)
    w.advance(1)
    w.finish("x", success=False)
    w.advance(1)
    assert [e.attempt for e in w.runner.executions] == [1, 2, 3]
    assert {e.execution_ns for e in w.runner.executions} == {due}
    w.finish("x", success=False)
    assert w.get("x") == (F, due)  # the time it was set for, as before the retries
    assert w.scheduler.counters.runs_retried == 2


def test_rule_policy_overrides_defaults_and_survives_replay() -> None:
    """A rule's policy is persisted; replaying the log gives it back."""
    w = World()
    w.scheduler.set_policy("r", Policy(retries=1))
    assert w.scheduler.policy_for("r").retries == 1
    assert w.entries_of(RulePolicy) == [RulePolicy("r", Policy(retries=1))]
    again = World(w.store.entries)
    assert again.scheduler.policy_for("r").retries == 1


def test_timed_out_run_is_counted() -> None:
    """A run whose outcome says ``timed_out`` counts in ``runs_timed_out``, outcome timeout."""
    w = World()
    w.scheduler.set_job("t", w.now_ns)
    w.advance(0)
    _execution, d = w.runner.runs[0]
    d.callback(Outcome(False, "timed out after 1s", timed_out=True))
    assert w.scheduler.counters.runs_timed_out == 1
    assert w.history.outcomes("t") == ["timeout"]


# -- RUN -------------------------------------------------------------------------------


def test_run_now_is_an_extra_run_that_changes_nothing_else() -> None:
    """RUN starts one run now; the planned time stays; a paused job stays paused."""
    w = World()
    due = w.now_ns + 3600 * SECOND_NS
    w.scheduler.set_job("n", due)
    w.scheduler.pause("n")
    started: Deferred[None] = w.scheduler.run_now("n")
    assert started.called
    assert w.runner.executions[0].execution_ns == w.now_ns
    w.finish("n")
    assert w.get("n") == (Shown.PAUSED, due)
    assert w.history.outcomes("n") == ["executed"]


def test_run_now_without_a_rule_is_refused() -> None:
    """RUN of a job no rule matches raises ``NoRule``."""
    w = World()
    w.scheduler.remove_rule("r")
    w.scheduler.set_job("n", w.now_ns + SECOND_NS)
    with pytest.raises(NoRule):
        w.scheduler.run_now("n")


# -- removal and compaction -------------------------------------------------------------------


def test_remove_forgets_schedule_pause_and_history() -> None:
    """REMOVE of a scheduled, paused job drops its schedule, pause and history."""
    w = World()
    w.schedule("gone", "every 1 minute")
    w.scheduler.pause("gone")
    w.scheduler.remove_job("gone")
    assert len(w.scheduler.recurrences) == 0
    assert w.scheduler.jobs_paused == 0
    assert w.history.forgotten == ["gone"]


def test_extension_entries_replay_to_the_same_state() -> None:
    """What compaction keeps of schedules, pauses, retries and policies replays the same."""
    w = World(policy=Policy(retries=3, backoff_min_ns=SECOND_NS, backoff_max_ns=SECOND_NS))
    w.schedule("s", "every 10 seconds", "limit=5")
    w.advance(0)
    w.finish("s")
    w.scheduler.set_job("p", w.now_ns + SECOND_NS)
    w.scheduler.pause("p")
    w.advance(2)
    w.scheduler.set_job("x", w.now_ns)
    w.advance(0)
    w.finish("x", success=False)
    w.scheduler.set_policy("r", Policy(timeout_ns=5 * SECOND_NS))
    jobs = [Job(j, ns, st) for j, st, ns in w.scheduler.jobs.items()]
    rules = list(w.scheduler.list_rules())
    again = World([*jobs, *rules, *w.scheduler.extension_entries()], start=False)
    s = again.scheduler
    rec, _ = s.get_schedule("s")
    assert (rec.runs, rec.occurrence_ns) == (1, w.scheduler.get_schedule("s")[0].occurrence_ns)
    assert s.get_job("p") == (Shown.PAUSED, w.get("p")[1])  # type: ignore[index]
    assert s._attempts.get("x") == 2
    assert s.policy_for("r").timeout_ns == 5 * SECOND_NS


# -- PREVIEW agrees with firing -------------------------------------------------------------

_SCHEDULES = [
    "every 90 seconds",
    "every 1 day",
    "daily and mon-fri",
    "30 2 * * *",
    "0 */6 * * mon-fri",
    "every 1 month",
    "@weekly",
    "hourly or 15 * * * *",
]


@settings(max_examples=40, deadline=None)
@given(
    text=st.sampled_from(_SCHEDULES),
    tz=st.sampled_from(["UTC", "Europe/Paris", "America/New_York"]),
    days=st.integers(min_value=0, max_value=400),
)
def test_preview_agrees_with_firing(text: str, tz: str, days: int) -> None:
    """The instants PREVIEW lists are the due times the scheduler really fires, in order.

    Starting at a random day (DST changes included), on a ``Clock``: each run is
    finished at once, and the clock is moved to the next planned time.
    """
    w = World()
    w.advance(days * 86_400)
    first = w.schedule("p", f"{text} starting tomorrow 00:00", f"tz={tz}", "limit=6")
    rec, schedule = w.scheduler.get_schedule("p")
    expected = schedule.preview(6)
    assert expected[0] == first
    fired = []
    for _ in range(6):
        found = w.get("p")
        assert found is not None and found[0] == P
        w.advance(max(0.0, (found[1] - w.now_ns) / SECOND_NS))
        w.advance(0)
        fired.append(w.runner.executions[-1].execution_ns)
        w.finish("p")
    assert fired == expected
    assert w.get("p") is not None and w.get("p")[0] == E  # type: ignore[index]
    assert rec.runs == 6


def test_interrupted_occurrence_reruns_then_missed_ones_coalesce() -> None:
    """A run the kill interrupted is re-run as it was (attempt 2), not replaced by misfire.

    The occurrences missed meanwhile then follow ``misfire=once``: one run, the latest.
    """
    clock = make_clock()
    start = int(clock.seconds() * SECOND_NS)
    options = parse_options(["misfire=once"])
    initial: list[Entry] = [
        ScheduleSet("i", "every 10 seconds", " ".join(options.render()), start),
        Job("i", start, P),
        Job("i", start, T),
    ]
    w = World(initial, advance_s=35)
    w.advance(0)
    assert [(e.execution_ns, e.attempt) for e in w.runner.executions] == [(EPOCH_NS, 2)]
    w.finish("i")
    w.advance(0)
    assert [(e.execution_ns, e.attempt) for e in w.runner.executions][1:] == [
        (EPOCH_NS + 30 * SECOND_NS, 1)
    ]
    w.finish("i")
    assert w.get("i") == (P, EPOCH_NS + 40 * SECOND_NS)


def test_interrupted_fail_marks_the_occurrence_failed_and_the_schedule_goes_on() -> None:
    """``interrupted_jobs = fail``: an interrupted scheduled run is marked failed, not re-run.

    The job keeps recurring from its next occurrence.
    """
    clock = make_clock()
    start = int(clock.seconds() * SECOND_NS)
    options = parse_options(["misfire=skip"])
    initial: list[Entry] = [
        ScheduleSet("f", "every 10 seconds", " ".join(options.render()), start),
        Job("f", start, P),
        Job("f", start, T),
    ]
    clock.advance(5)
    store = FakeStore(initial)
    runner = FakeRunner()
    scheduler = Scheduler(clock, store, all_kinds(runner), interrupted="fail")
    scheduler.replay(store.load())
    scheduler.set_rule(Rule("r", "", ShellSpec("true")))
    scheduler.start()
    assert Job("f", start, F) in store.entries
    assert scheduler.get_job("f") == (P, start + 10 * SECOND_NS)
    clock.advance(5)
    assert [e.execution_ns for e in runner.executions] == [start + 10 * SECOND_NS]
