"""The scheduler: applies requests, fires due jobs through rules and runners, records outcomes.

It does no I/O of its own: the store, the runners and the clock are handed in, so it is
tested with a ``Clock``, a memory store and fake runners.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ztick_tw.model import (
    I64_MIN,
    Entry,
    Job,
    JobRemoval,
    JobStatus,
    Pause,
    Policy,
    Rule,
    RulePolicy,
    RuleRemoval,
    RunnerKind,
    RunState,
    ScheduleRemoval,
    ScheduleSet,
    Shown,
    ShownStatus,
)
from ztick_tw.runners.base import Execution, IRunner, Outcome
from ztick_tw.scheduler.jobs import TRIGGERED, JobTable, unpack_ns, unpack_status
from ztick_tw.scheduler.recurring import (
    Recurrence,
    Recurrences,
    backoff_ns,
    merged_policy,
    misfire,
    planned_ns,
)
from ztick_tw.scheduler.rules import RuleBook
from ztick_tw.scheduler.snapshot import Snapshot
from ztick_tw.scheduler.timers import TimerSet, now_ns
from ztick_tw.schedules import Schedule
from ztick_tw.stats import LagWindow
from ztick_tw.store.base import Commit, IStore, StoreError

#: How many due jobs one timer wake-up takes before yielding to the reactor.
FIRE_BATCH = 1000

INTERRUPTED_RERUN = "rerun"
INTERRUPTED_FAIL = "fail"


class UnknownJob(KeyError):
    """No job has that id."""


class UnknownRule(KeyError):
    """No rule has that id."""


class NotScheduled(KeyError):
    """The job has no schedule."""


class NoRule(LookupError):
    """No rule matches the job (``RUN``)."""


class RunLog(Protocol):
    """Where runs are recorded (``ztick_tw.history.History``); never blocks."""

    def begin(self, job_id: str, due_ns: int, started_ns: int, attempt: int) -> Any:
        """A run has started; returns a handle for ``finish`` (opaque to the scheduler)."""

    def finish(
        self,
        handle: Any,
        ended_ns: int,
        outcome: str,
        exit_code: int | None,
        detail: str,
        output: bytes,
    ) -> None:
        """The run ended."""

    def skipped(self, job_id: str, due_ns: int, detail: str) -> None:
        """An occurrence was skipped."""

    def forget(self, job_id: str) -> None:
        """The job was removed: drop its history."""


@dataclass(eq=False, slots=True)
class _Queued:
    job_id: str
    execution_ns: int  # the due time the run belongs to (ZTICK_EXECUTION_NS)
    packed: int  # the job's table value when it was triggered
    rule: Rule
    lag_base_ns: int  # lag is measured from here (the due time, or later if set late)
    attempt: int = 1
    manual: bool = False  # an extra run asked for by RUN: its outcome goes to history only
    started: Deferred[None] | None = None  # RUN: fired once the run has started
    handle: Any = None  # the run history's handle of this run
    running: Deferred[Outcome] | None = None
    cancelled: bool = False


@dataclass(slots=True)
class Counters:
    """The STAT counters of SPEC §9 (since the daemon started)."""

    occurrences_missed: int = 0
    runs_retried: int = 0
    runs_timed_out: int = 0


@dataclass(slots=True)
class _Undo:
    """The state before a batch of changes, and after it, by job and rule id."""

    jobs_before: dict[str, int | None] = field(default_factory=dict)
    jobs_after: dict[str, int | None] = field(default_factory=dict)
    rules_before: dict[str, Rule | None] = field(default_factory=dict)
    rules_after: dict[str, Rule | None] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """What a replay found, for the startup log line."""

    frames: int
    jobs: int
    rules: int


class Scheduler:
    """Jobs, rules, the timer and the execution queue of one ztick-tw daemon."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        store: IStore,
        runners: Mapping[RunnerKind, IRunner],
        *,
        max_concurrent: int = 64,
        interrupted: str = INTERRUPTED_RERUN,
        lag: LagWindow | None = None,
        history: RunLog | None = None,
        policy_defaults: Policy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        if interrupted not in (INTERRUPTED_RERUN, INTERRUPTED_FAIL):
            raise ValueError(f"interrupted must be 'rerun' or 'fail', not {interrupted!r}")
        self._reactor = reactor
        self._store = store
        self._runners = dict(runners)
        self._max_concurrent = max_concurrent
        self._interrupted = interrupted
        self.jobs = JobTable()
        self.rules = RuleBook()
        self.lag = lag if lag is not None else LagWindow()
        self.timers = TimerSet(reactor, self.jobs, self._fire_due)
        self._queue: deque[_Queued] = deque()
        # job -> its live runs (queued or running).  A re-SET or REMOVE forgets them, so
        # an older run of the job is void even when the job is re-set to the same time
        # (its triggered table value would then be equal).
        self._current: dict[str, list[_Queued]] = {}
        # -- SPEC §8-9 state (see ``ztick_tw.scheduler.recurring``) --
        self.recurrences = Recurrences(lambda: now_ns(self._reactor))
        self.policies: dict[str, Policy] = {}
        self.policy_defaults = policy_defaults if policy_defaults is not None else Policy()
        self.paused: dict[str, int] = {}  # job -> when it was paused
        self._held: set[str] = set()  # paused jobs that fell due: out of the due order
        self._due: dict[str, int] = {}  # job -> due time of the retry it is planned for
        self._waiting: dict[str, int] = {}  # overlap=queue: job -> its waiting occurrence
        # The next occurrence of scheduled jobs that are running, so an occurrence that
        # falls due during a run meets the overlap policy (a second table, second timer).
        self.upcoming = JobTable()
        self._upcoming_timers = TimerSet(reactor, self.upcoming, self._fire_upcoming)
        self.history = history
        self.counters = Counters()
        self._rng = rng if rng is not None else random.Random()
        self._running = 0
        self._pumping = False
        self._stopped = False
        self._attempts: dict[str, int] = {}  # only jobs past their first attempt
        self._late_set: dict[str, int] = {}  # job -> when it was set, for jobs set late
        self._started_ns = 0
        # Commit -> the state before the changes it carries, should it fail to reach disk.
        self._undo: dict[Commit, _Undo] = {}

    # -- startup and shutdown ----------------------------------------------------------

    def replay(self, entries: Iterable[Entry]) -> ReplaySummary:
        """Apply stored entries in order (last write wins, removals delete).

        Also counts, per job, the ``triggered`` frames since it was last planned: that
        is how many attempts were started, so an interrupted run is retried with the
        right attempt number.
        """
        jobs = self.jobs
        rules = self.rules
        attempts = self._attempts
        frames = 0
        load = jobs.load  # the loop below runs once per frame: keep it lean
        job_type = Job
        for entry in entries:
            frames += 1
            if type(entry) is job_type:
                job = entry
                status = job.status
                if status == TRIGGERED:
                    old = jobs.raw(job.id)
                    if old is not None and unpack_status(old) == JobStatus.TRIGGERED:
                        attempts[job.id] = attempts.get(job.id, 1) + 1
                elif attempts and job.id in attempts:
                    del attempts[job.id]
                load(job.id, job.execution_ns, status)
                continue
            kind = type(entry)
            if kind is Rule:
                rules.set(cast(Rule, entry))
            elif kind is JobRemoval:
                job_id = cast(JobRemoval, entry).id
                jobs.unload(job_id)
                attempts.pop(job_id, None)
                self._forget_extension(job_id)
            elif kind is RuleRemoval:
                rule_id = cast(RuleRemoval, entry).id
                rules.remove(rule_id)
                self.policies.pop(rule_id, None)
            else:
                self._replay_extension(entry)
        jobs.finish_load()
        for job_id in [j for j in attempts if jobs.get(j) is None]:
            del attempts[job_id]
        for job_id in [j for j in self._due if jobs.get(j) is None or j not in attempts]:
            del self._due[job_id]
        for job_id, _rec in self.recurrences:
            if jobs.get(job_id) is None:
                self.recurrences.pop(job_id)
        for job_id in [j for j in self.paused if jobs.get(j) is None]:
            del self.paused[job_id]
        return ReplaySummary(frames, len(jobs), len(rules))

    def _replay_extension(self, entry: Entry) -> None:
        kind = type(entry)
        if kind is ScheduleSet:
            schedule_set = cast(ScheduleSet, entry)
            self.recurrences.put(schedule_set.job_id, schedule_set)
        elif kind is RunState:
            state = cast(RunState, entry)
            rec = self.recurrences.get(state.job_id)
            if rec is not None:
                rec.runs = state.runs
                rec.occurrence_ns = None if state.occurrence_ns == I64_MIN else state.occurrence_ns
            if state.attempt > 1:
                self._attempts[state.job_id] = state.attempt
                self._due[state.job_id] = state.due_ns
            else:
                self._attempts.pop(state.job_id, None)
                self._due.pop(state.job_id, None)
        elif kind is ScheduleRemoval:
            self.recurrences.pop(cast(ScheduleRemoval, entry).job_id)
        elif kind is Pause:
            pause = cast(Pause, entry)
            if pause.paused:
                self.paused[pause.job_id] = pause.since_ns
            else:
                self.paused.pop(pause.job_id, None)
        elif kind is RulePolicy:
            rule_policy = cast(RulePolicy, entry)
            self.policies[rule_policy.rule_id] = rule_policy.policy

    def _forget_extension(self, job_id: str) -> None:
        """A removed job loses its schedule, pause, retry state and history."""
        self.recurrences.pop(job_id)
        self.paused.pop(job_id, None)
        self._held.discard(job_id)
        self._due.pop(job_id, None)
        self._waiting.pop(job_id, None)
        self.upcoming.remove(job_id)

    def start(self) -> None:
        """Deal with runs interrupted by the last shutdown, then start the timer."""
        self._stopped = False
        self._started_ns = now_ns(self._reactor)
        if self.jobs.count(JobStatus.TRIGGERED):
            interrupted = [
                (job_id, ns)
                for job_id, status, ns in self.jobs.items()
                if status == JobStatus.TRIGGERED
            ]
            for job_id, ns in interrupted:
                self._recover_interrupted(job_id, ns)
        now = self._started_ns
        for job_id, rec in self.recurrences:
            found = self.jobs.get(job_id)
            if (
                found is not None
                and found[0] == JobStatus.PLANNED
                and found[1] <= now
                and job_id not in self.paused
                and job_id not in self._due
            ):
                self._misfire(job_id, rec, now)
        self.timers.start()
        self._upcoming_timers.start()

    def _recover_interrupted(self, job_id: str, execution_ns: int) -> None:
        if self._interrupted == INTERRUPTED_RERUN:
            attempt = self._attempts.get(job_id, 1) + 1
            self._attempts[job_id] = attempt
            self.jobs.set(job_id, execution_ns)
            self.log.warn(
                "job {job_id} was running when ztick-tw last stopped; running it again"
                " (attempt {attempt})",
                job_id=job_id,
                attempt=attempt,
            )
        else:
            self._attempts.pop(job_id, None)
            self.jobs.set_status(job_id, JobStatus.FAILED)
            self._persist(Job(job_id, execution_ns, JobStatus.FAILED))
            self.log.warn(
                "job {job_id} was running when ztick-tw last stopped; marked failed"
                " (interrupted_jobs = fail)",
                job_id=job_id,
            )

    def stop(self, grace: float) -> Deferred[None]:
        """Stop firing; let running executions finish for ``grace`` s, then end them."""
        self._stopped = True
        self.timers.stop()
        self._upcoming_timers.stop()
        for item in self._queue:
            self._drop_live(item)
            if item.started is not None:
                item.started.errback(NoRule("the daemon is shutting down"))
        self._queue.clear()
        stops = [runner.stop(grace) for runner in set(self._runners.values())]
        if not stops:
            return succeed(None)
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    # -- requests ------------------------------------------------------------------

    def set_job(self, job_id: str, execution_ns: int) -> Commit | None:
        """Create or replace a job (status back to ``planned``); persisted.

        Should the write fail, the change is undone (see ``_remember_job``).
        """
        previous = self.jobs.raw(job_id)
        if self.recurrences.pop(job_id) is not None:
            # A SET makes it a one-shot job again (SPEC §8); the pause and history stay.
            self._store.append(ScheduleRemoval(job_id))
        if self._due or self._waiting or self._held:
            self._due.pop(job_id, None)
            self._waiting.pop(job_id, None)
            self._held.discard(job_id)
            self.upcoming.remove(job_id)
        self.jobs.set(job_id, execution_ns)
        self._attempts.pop(job_id, None)
        self._current.pop(job_id, None)
        now = now_ns(self._reactor)
        if execution_ns <= now:
            self._late_set[job_id] = now
        self.timers.note_due(execution_ns)
        commit = self._store.append(Job(job_id, execution_ns, JobStatus.PLANNED))
        if commit is not None:
            self._remember_job(commit, job_id, previous)
        return commit

    def get_job(self, job_id: str) -> tuple[ShownStatus, int] | None:
        """``(status, execution_ns)`` or ``None``; ``paused``, and ``triggered`` during a run."""
        found = self.jobs.get(job_id)
        if found is not None and (self.paused or self._current):
            return self._shown(job_id, found)
        return found

    def _shown(self, job_id: str, found: tuple[JobStatus, int]) -> tuple[ShownStatus, int]:
        if job_id in self.paused:
            return (Shown.PAUSED, found[1])
        live = self._current.get(job_id)
        if live and found[0] != JobStatus.TRIGGERED:
            return (JobStatus.TRIGGERED, live[-1].execution_ns)
        return found

    def query(self, prefix: str = "") -> Iterator[tuple[str, ShownStatus, int]]:
        """Jobs whose id starts with ``prefix``, in id order (read in slices)."""
        after: str | None = None
        while True:
            found = self.jobs.scan(prefix, after, 1024)
            yield from found
            if len(found) < 1024:
                return
            after = found[-1][0]

    def scan(
        self, prefix: str, after: str | None, limit: int
    ) -> list[tuple[str, ShownStatus, int]]:
        """Up to ``limit`` jobs whose id starts with ``prefix``, after ``after``, in id order.

        O(log n + limit), so a long answer can be produced in slices.
        """
        found: list[tuple[str, ShownStatus, int]] = list(self.jobs.scan(prefix, after, limit))
        if self.paused or self._current:
            shown = self._shown
            found = [(j, *shown(j, (st, ns))) for j, st, ns in found]  # type: ignore[arg-type]
        return found

    def remove_job(self, job_id: str) -> Commit | None:
        """Delete a job (a queued run of it is dropped); raises ``UnknownJob``."""
        previous = self.jobs.raw(job_id)
        if not self.jobs.remove(job_id):
            raise UnknownJob(job_id)
        self._attempts.pop(job_id, None)
        self._late_set.pop(job_id, None)
        self._current.pop(job_id, None)
        self._forget_extension(job_id)
        if self.history is not None:
            self.history.forget(job_id)
        commit = self._store.append(JobRemoval(job_id))
        if commit is not None:
            self._remember_job(commit, job_id, previous)
        return commit

    def set_rule(self, rule: Rule) -> Commit | None:
        """Create or replace a rule; persisted."""
        previous = self.rules.get(rule.id)
        self.rules.set(rule)
        commit = self._store.append(rule)
        if commit is not None:
            self._remember_rule(commit, rule.id, previous)
        return commit

    def remove_rule(self, rule_id: str) -> Commit | None:
        """Delete a rule (its jobs stay); raises ``UnknownRule``."""
        previous = self.rules.get(rule_id)
        if not self.rules.remove(rule_id):
            raise UnknownRule(rule_id)
        self.policies.pop(rule_id, None)
        commit = self._store.append(RuleRemoval(rule_id))
        if commit is not None:
            self._remember_rule(commit, rule_id, previous)
        return commit

    # -- schedules, pause, run now, rule policies (SPEC §8-9) --------------------------

    def set_schedule(self, job_id: str, schedule: Schedule) -> tuple[int, Commit | None]:
        """Make ``job_id`` recur on ``schedule`` (creating the job); persisted.

        Returns when it will really fire first (now when the start is past, plus any
        jitter) and the commit.  Raises ``ValueError`` when the schedule has no
        occurrence at all (``until`` before its start).
        """
        first = schedule.first()
        if first is None:
            raise ValueError("the schedule has no occurrence (until is at or before its start)")
        now = now_ns(self._reactor)
        # A start in the past fires at once, then follows the schedule (SPEC §8).
        occurrence = max(first, now)
        entry = ScheduleSet(
            job_id, schedule.text, " ".join(schedule.options.render()), schedule.start_ns
        )
        previous = self.jobs.raw(job_id)
        self._due.pop(job_id, None)
        self._waiting.pop(job_id, None)
        self._held.discard(job_id)
        self.upcoming.remove(job_id)
        self._attempts.pop(job_id, None)
        self._current.pop(job_id, None)
        rec = self.recurrences.put(job_id, entry, schedule)
        rec.occurrence_ns = occurrence
        planned = planned_ns(occurrence, schedule.options, self._rng)
        self.jobs.set(job_id, planned)
        if planned <= now:
            self._late_set[job_id] = now
        self.timers.note_due(planned)
        self._store.append(entry)
        self._store.append(Job(job_id, planned, JobStatus.PLANNED))
        commit = self._store.append(rec.state(job_id))
        if commit is not None:
            self._remember_job(commit, job_id, previous)

            def undone(c: Commit) -> None:
                if c.error is not None and self.recurrences.get(job_id) is rec:
                    self.recurrences.pop(job_id)

            commit.subscribe(undone)
        return planned, commit

    def get_schedule(self, job_id: str) -> tuple[Recurrence, Schedule]:
        """The job's recurrence and compiled schedule; raises ``NotScheduled``."""
        rec = self.recurrences.get(job_id)
        if rec is None:
            raise NotScheduled(job_id)
        return rec, self.recurrences.compiled(rec)

    def next_ns(self, job_id: str, rec: Recurrence) -> int | None:
        """When the scheduled job fires next (``None``: its schedule has ended)."""
        if rec.occurrence_ns is None:
            return None
        found = self.jobs.get(job_id)
        if found is not None and found[0] == JobStatus.PLANNED:
            return found[1]
        upcoming = self.upcoming.get(job_id)
        return upcoming[1] if upcoming is not None else rec.occurrence_ns

    def remove_schedule(self, job_id: str) -> Commit | None:
        """Stop the job recurring; it stays, a one-shot at its current time.

        A run in progress finishes; no other occurrence starts.  Raises ``NotScheduled``.
        """
        if self.recurrences.pop(job_id) is None:
            raise NotScheduled(job_id)
        self._waiting.pop(job_id, None)
        self.upcoming.remove(job_id)
        return self._store.append(ScheduleRemoval(job_id))

    def pause(self, job_id: str) -> Commit | None:
        """The job never fires until resumed (a run in progress goes on); raises ``UnknownJob``."""
        if job_id not in self.jobs:
            raise UnknownJob(job_id)
        if job_id in self.paused:
            return None
        now = now_ns(self._reactor)
        self.paused[job_id] = now
        return self._store.append(Pause(job_id, True, now))

    def resume(self, job_id: str) -> Commit | None:
        """Let the job fire again; time missed meanwhile follows its misfire policy."""
        found = self.jobs.get(job_id)
        if found is None:
            raise UnknownJob(job_id)
        if self.paused.pop(job_id, None) is None:
            return None
        now = now_ns(self._reactor)
        commit = self._store.append(Pause(job_id, False, now))
        if job_id in self._held:
            self._held.discard(job_id)
            rec = self.recurrences.get(job_id)
            if rec is not None and job_id not in self._due:
                self._misfire(job_id, rec, now)
            else:
                self.jobs.set(job_id, found[1])  # a one-shot whose time passed fires at once
                self.timers.note_due(found[1])
        return commit

    def _misfire(self, job_id: str, rec: Recurrence, now: int) -> None:
        """The job's planned occurrence passed while it could not fire: apply ``misfire``."""
        if rec.occurrence_ns is None:
            return
        result = misfire(self.recurrences.compiled(rec), rec.occurrence_ns, now, rec.runs)
        self.counters.occurrences_missed += result.missed
        if result.run:
            rec.occurrence_ns = result.run[0]
        else:
            rec.occurrence_ns = result.next_ns
        self.log.info(
            "job {job_id}: {missed} occurrence(s) missed; running {run} now (misfire policy)",
            job_id=job_id,
            missed=result.missed,
            run=len(result.run),
        )
        self._replan(job_id, rec, JobStatus.EXECUTED)

    def run_now(self, job_id: str) -> Deferred[None]:
        """One extra run now through the rule that matches; fires once it has started.

        The job's planned time and schedule are unchanged, a paused job stays paused.
        Raises ``UnknownJob``, or ``NoRule`` when no rule matches the job.
        """
        packed = self.jobs.raw(job_id)
        if packed is None:
            raise UnknownJob(job_id)
        rule = self.rules.match(job_id)
        if rule is None:
            raise NoRule(f"no rule matches job {job_id!r}")
        now = now_ns(self._reactor)
        started: Deferred[None] = Deferred()
        self._enqueue(_Queued(job_id, now, packed, rule, now, manual=True, started=started))
        self._pump()
        return started

    def set_policy(self, rule_id: str, policy: Policy) -> Commit | None:
        """Give an existing rule ``policy`` (all keys: merge before calling); persisted."""
        if self.rules.get(rule_id) is None:
            raise UnknownRule(rule_id)
        self.policies[rule_id] = policy
        return self._store.append(RulePolicy(rule_id, policy))

    @property
    def jobs_paused(self) -> int:
        """How many jobs are paused."""
        return len(self.paused)

    def extension_entries(self) -> list[Entry]:
        """What compaction must keep of SPEC §8-9 state, as log entries (after the jobs)."""
        out: list[Entry] = []
        for job_id in self._held:
            found = self.jobs.get(job_id)
            if found is not None:
                out.append(Job(job_id, found[1], JobStatus.PLANNED))
        for job_id, rec in self.recurrences:
            out.append(rec.entry)
            attempt = self._attempts.get(job_id, 1)
            out.append(rec.state(job_id, attempt, self._due.get(job_id)))
        for job_id, attempt in self._attempts.items():
            due = self._due.get(job_id)
            if due is not None and job_id not in self.recurrences:
                out.append(RunState(job_id, 0, I64_MIN, attempt, due))
        for job_id, since in self.paused.items():
            out.append(Pause(job_id, True, since))
        for rule_id, policy in self.policies.items():
            out.append(RulePolicy(rule_id, policy))
        return out

    # -- undoing changes whose write failed ------------------------------------------

    def _undo_for(self, commit: Commit) -> _Undo:
        undo = self._undo.get(commit)
        if undo is None:
            undo = self._undo[commit] = _Undo()
            commit.subscribe(self._commit_resolved)
        return undo

    def _remember_job(self, commit: Commit, job_id: str, previous: int | None) -> None:
        """Note a job's value before ``commit``'s batch and after this change.

        Plain dicts of ints (which the garbage collector does not track): this runs for
        every SET and REMOVE.
        """
        undo = self._undo_for(commit)
        undo.jobs_before.setdefault(job_id, previous)
        undo.jobs_after[job_id] = self.jobs.raw(job_id)

    def _remember_rule(self, commit: Commit, rule_id: str, previous: Rule | None) -> None:
        undo = self._undo_for(commit)
        undo.rules_before.setdefault(rule_id, previous)
        undo.rules_after[rule_id] = self.rules.get(rule_id)

    def _commit_resolved(self, commit: Commit) -> None:
        """A request answered ERROR must leave no trace: put back the state before its batch.

        A job or rule changed again since (by a later batch) is left alone.
        """
        undo = self._undo.pop(commit, None)
        if undo is None or commit.error is None:
            return
        try:
            for job_id, before in undo.jobs_before.items():
                if self.jobs.raw(job_id) != undo.jobs_after[job_id]:
                    continue
                self.jobs.restore(job_id, before)
                restored = self.jobs.get(job_id)
                if restored is not None and restored[0] == JobStatus.PLANNED:
                    self.timers.note_due(restored[1])
                self.log.warn(
                    "job {job_id}: change undone, its logfile write failed (answered ERROR)",
                    job_id=job_id,
                )
            for rule_id, rule_before in undo.rules_before.items():
                if self.rules.get(rule_id) is not undo.rules_after[rule_id]:
                    continue
                if rule_before is None:
                    self.rules.remove(rule_id)
                else:
                    self.rules.set(rule_before)
                self.log.warn(
                    "rule {rule_id}: change undone, its logfile write failed (answered ERROR)",
                    rule_id=rule_id,
                )
        except Exception:
            self.log.failure("undoing changes whose write failed raised")

    # -- compaction ------------------------------------------------------------------

    def snapshot(self, retention_ns: int = 0) -> Snapshot:
        """A copy of every job and rule to write out (see ``ztick_tw.scheduler.snapshot``).

        With ``retention_ns`` > 0, executed and failed jobs due more than that long ago
        are left out; pass the snapshot to ``drop_expired`` once the compacted log is
        in place.
        """
        jobs, seq_ids = self.jobs.snapshot()
        cutoff = now_ns(self._reactor) - retention_ns if retention_ns > 0 else None
        return Snapshot(jobs, seq_ids, list(self.rules), cutoff)

    def drop_expired(self, snapshot: Snapshot) -> int:
        """Forget the jobs a compaction left out for retention (unless changed since)."""
        dropped = 0
        for job_id, packed in snapshot.expired:
            if self.jobs.raw(job_id) == packed:
                self.jobs.remove(job_id)
                self._attempts.pop(job_id, None)
                self._late_set.pop(job_id, None)
                self._forget_extension(job_id)
                if self.history is not None:
                    self.history.forget(job_id)
                dropped += 1
        return dropped

    def list_rules(self) -> Iterable[Rule]:
        """Every rule, in the order first set."""
        return iter(self.rules)

    @property
    def executions_pending(self) -> int:
        """Triggered jobs waiting for a free execution slot."""
        return len(self._queue)

    @property
    def executions_inflight(self) -> int:
        """Runner executions started and not yet finished."""
        return self._running

    # -- firing --------------------------------------------------------------------

    def _fire_due(self, now: int) -> None:
        due = self.jobs.pop_due(now, FIRE_BATCH)
        for job_id, execution_ns, packed in due:
            try:
                self._fire_one(job_id, execution_ns, packed, now)
            except Exception:
                self.log.failure("firing job {job_id} failed", job_id=job_id)
        self._pump()

    def _fire_one(self, job_id: str, execution_ns: int, packed: int, now: int) -> None:
        if self.paused and job_id in self.paused:
            self._held.add(job_id)  # stays out of the due order until RESUME
            return
        lag_base = max(execution_ns, self._late_set.pop(job_id, execution_ns), self._started_ns)
        due_ns = execution_ns
        attempt = self._attempts.get(job_id, 1)
        rec = self.recurrences.get(job_id) if self.recurrences else None
        if self._due and job_id in self._due:
            due_ns = self._due[job_id]  # a retry: the attempt belongs to that due time
        elif rec is not None and rec.occurrence_ns is not None:
            occurrence = rec.occurrence_ns
            grace = self.recurrences.compiled(rec).options.grace_ns
            if grace is not None and now - occurrence > grace:
                self._skip_late(job_id, rec, occurrence, now)
                return
            due_ns = occurrence
            self.recurrences.advance(rec)
        rule = self.rules.match(job_id)
        if rule is None:
            self.jobs.set_status(job_id, JobStatus.FAILED)
            self._attempts.pop(job_id, None)
            self._due.pop(job_id, None)
            if rec is not None:
                self._replan(job_id, rec, JobStatus.FAILED)
            else:
                self._persist(Job(job_id, execution_ns, JobStatus.FAILED))
            self.log.warn("job {job_id} failed: no rule matches it", job_id=job_id)
            return
        self._enqueue(_Queued(job_id, due_ns, packed, rule, lag_base, attempt))

    def _enqueue(self, queued: _Queued) -> None:
        self._current.setdefault(queued.job_id, []).append(queued)
        self._queue.append(queued)

    def _is_live(self, item: _Queued) -> bool:
        live = self._current.get(item.job_id)
        return live is not None and item in live

    def _drop_live(self, item: _Queued) -> None:
        live = self._current.get(item.job_id)
        if live is not None and item in live:
            live.remove(item)
            if not live:
                del self._current[item.job_id]

    def _skip_late(self, job_id: str, rec: Recurrence, occurrence: int, now: int) -> None:
        """An occurrence more than ``grace`` late is skipped whatever the policy."""
        self.counters.occurrences_missed += 1
        if self.history is not None:
            self.history.skipped(
                job_id, occurrence, f"more than {self._grace_text(rec)} late (grace)"
            )
        self.recurrences.skip(rec)
        while rec.occurrence_ns is not None and rec.occurrence_ns <= now:
            self.counters.occurrences_missed += 1
            self.recurrences.skip(rec)
        self._replan(job_id, rec, JobStatus.EXECUTED)

    def _grace_text(self, rec: Recurrence) -> str:
        grace = self.recurrences.compiled(rec).options.grace_ns or 0
        return f"{grace / 1e9:g}s"

    def _replan(self, job_id: str, rec: Recurrence, ended: JobStatus) -> None:
        """Plan a scheduled job at its next occurrence, or end it with status ``ended``."""
        self.upcoming.remove(job_id)
        occurrence = rec.occurrence_ns
        if occurrence is None:
            found = self.jobs.get(job_id)
            if found is None:
                return
            if found[0] != ended:
                if found[0] == JobStatus.PLANNED:
                    self.jobs.set(job_id, found[1])
                self.jobs.set_status(job_id, ended)
            self._persist(Job(job_id, found[1], ended))
            self._persist(rec.state(job_id))
            return
        planned = planned_ns(occurrence, self.recurrences.compiled(rec).options, self._rng)
        self.jobs.set(job_id, planned)
        self.timers.note_due(planned)
        self._persist(Job(job_id, planned, JobStatus.PLANNED))
        self._persist(rec.state(job_id))

    def _fire_upcoming(self, now: int) -> None:
        """A running scheduled job's next occurrence fell due: apply its overlap policy."""
        for job_id, _ns, _packed in self.upcoming.pop_due(now, FIRE_BATCH):
            try:
                self._overlap(job_id, now)
            except Exception:
                self.log.failure("overlap of job {job_id} failed", job_id=job_id)
        self._pump()

    def _overlap(self, job_id: str, now: int) -> None:
        self.upcoming.remove(job_id)
        rec = self.recurrences.get(job_id)
        live = [i for i in self._current.get(job_id, ()) if not i.manual]
        if rec is None or rec.occurrence_ns is None or not live or job_id in self._due:
            return
        occurrence = rec.occurrence_ns
        options = self.recurrences.compiled(rec).options
        policy = options.overlap
        if policy == "skip":
            if self.history is not None:
                self.history.skipped(job_id, occurrence, "the previous run was still running")
            self.recurrences.skip(rec)
        elif policy == "queue":
            older = self._waiting.get(job_id)
            if older is not None and self.history is not None:
                self.history.skipped(job_id, older, "a later occurrence took its place in queue")
            self._waiting[job_id] = occurrence
            self.recurrences.advance(rec)
        else:  # allow, replace
            if policy == "replace":
                for item in live:
                    item.cancelled = True
                    if item.running is not None:
                        item.running.cancel()
                    else:
                        self._drop_live(item)
            rule = self.rules.match(job_id)
            self.recurrences.advance(rec)
            if rule is not None:
                packed = self.jobs.raw(job_id) or 0
                self._enqueue(_Queued(job_id, occurrence, packed, rule, occurrence))
        self._watch_next(job_id, rec)

    def _watch_next(self, job_id: str, rec: Recurrence) -> None:
        """While a scheduled job runs, keep its next occurrence in ``upcoming``.

        An occurrence already due (a ``misfire=all`` catch-up) is not watched: it runs
        when this run ends, one after another, and never meets the overlap policy.
        """
        occurrence = rec.occurrence_ns
        if occurrence is None or occurrence <= now_ns(self._reactor):
            return
        planned = planned_ns(occurrence, self.recurrences.compiled(rec).options, self._rng)
        self.upcoming.set(job_id, planned)
        self._upcoming_timers.note_due(planned)

    def _pump(self) -> None:
        """Start queued executions while there are free slots (never re-entered).

        Each started job's ``triggered`` frame is written (handed to the file, not yet
        fsynced) before its runner starts, so a daemon that dies while the job runs
        restarts knowing it had started; a job that only waited for a slot is still
        ``planned`` in the log and simply runs at the next start.  A ``RUN`` (manual)
        run is not logged: it is an extra run, and a crash forgets it.
        """
        if self._pumping:
            return
        self._pumping = True
        try:
            while True:
                batch: list[_Queued] = []
                while (
                    self._queue
                    and self._running + len(batch) < self._max_concurrent
                    and not self._stopped
                ):
                    item = self._queue.popleft()
                    if not self._is_live(item):
                        continue  # re-set or removed while it waited: this run is void
                    batch.append(item)
                if not batch:
                    return
                for item in batch:
                    if not item.manual:
                        ns = unpack_ns(item.packed)
                        self._persist(Job(item.job_id, ns, JobStatus.TRIGGERED))
                self._store.write_through()
                for item in batch:
                    try:
                        self._start(item)
                    except Exception:
                        self.log.failure("starting job {job_id} failed", job_id=item.job_id)
        finally:
            self._pumping = False

    def _persist(self, entry: Entry) -> None:
        """Record a change the scheduler made; a refusing store is logged, the run goes on."""
        try:
            self._store.append(entry)
        except StoreError as e:
            self.log.error(
                "job {job_id}: cannot record {entry}: {error}",
                job_id=getattr(entry, "id", getattr(entry, "job_id", "?")),
                entry=type(entry).__name__,
                error=str(e),
            )

    def policy_for(self, rule_id: str) -> Policy:
        """The rule's effective policy (its keys, then the ``[runners]`` defaults)."""
        return merged_policy(self.policies.get(rule_id), self.policy_defaults)

    def _start(self, item: _Queued) -> None:
        runner = self._runners.get(item.rule.runner.kind)
        start = now_ns(self._reactor)
        if not item.manual:
            self.lag.record((start - item.lag_base_ns) // 1000)
        policy = self.policy_for(item.rule.id) if self.policies else self.policy_defaults
        timeout = policy.timeout_ns / 1e9 if policy.timeout_ns else None
        execution = Execution(
            item.job_id,
            item.execution_ns,
            item.rule.id,
            item.attempt,
            item.rule.runner,
            start,
            timeout=timeout,
        )
        if self.history is not None:
            item.handle = self.history.begin(item.job_id, item.execution_ns, start, item.attempt)
        self._running += 1
        if not item.manual and self.recurrences:
            rec = self.recurrences.get(item.job_id)
            if rec is not None and item.job_id not in self.upcoming:
                self._watch_next(item.job_id, rec)
        if runner is None:
            outcome = Outcome(False, f"no {item.rule.runner.kind.wire} runner is configured")
            d: Deferred[Outcome] = succeed(outcome)
        else:
            try:
                d = runner.run(execution)
            except Exception as e:  # a runner must not raise, but one bad job cannot stop us
                d = succeed(Outcome(False, f"runner raised {e!r}"))
        item.running = d
        if item.started is not None:
            started, item.started = item.started, None
            started.callback(None)
        d.addErrback(self._runner_errback, item)
        d.addCallback(self._finished, item)
        d.addErrback(self._log_failure, item)

    def _runner_errback(self, failure: Failure, item: _Queued) -> Outcome:
        self.log.failure("runner for job {job_id} errbacked", failure, job_id=item.job_id)
        return Outcome(False, f"runner error: {failure.getErrorMessage()}")

    def _log_failure(self, failure: Failure, item: _Queued) -> None:
        self.log.failure(
            "recording the outcome of job {job_id} failed", failure, job_id=item.job_id
        )

    def _record(self, item: _Queued, outcome: Outcome, word: str) -> None:
        if self.history is not None and item.handle is not None:
            self.history.finish(
                item.handle,
                now_ns(self._reactor),
                word,
                outcome.exit_code,
                outcome.reason,
                outcome.output,
            )

    def _finished(self, outcome: Outcome, item: _Queued) -> None:
        self._running -= 1
        item.running = None
        job_id = item.job_id
        if outcome.cancelled or item.cancelled:
            word = "cancelled"
        elif outcome.timed_out:
            word = "timeout"
            self.counters.runs_timed_out += 1
        else:
            word = "executed" if outcome.success else "failed"
        try:
            if outcome.interrupted:
                self._drop_live(item)
                self._record(item, outcome, "cancelled")
                self.log.info(
                    "job {job_id} was stopped by the shutdown; it stays triggered and runs"
                    " again at the next start",
                    job_id=job_id,
                )
                return
            self._record(item, outcome, word)
            live = self._is_live(item)
            self._drop_live(item)
            if item.manual:
                return  # RUN: recorded in the history only
            if not live:
                self.log.info(
                    "job {job_id} finished ({result}) but was re-set or removed meanwhile;"
                    " result not recorded",
                    job_id=job_id,
                    result="success" if outcome.success else "failure",
                )
                return
            if item.cancelled:
                return  # replaced by a newer occurrence (overlap=replace)
            self._settle(item, outcome)
        finally:
            self._pump()

    def _settle(self, item: _Queued, outcome: Outcome) -> None:
        """A run of the job ended: retry it, run the waiting occurrence, re-plan or end it."""
        job_id = item.job_id
        rec = self.recurrences.get(job_id) if self.recurrences else None
        if not outcome.success:
            policy = self.policy_for(item.rule.id) if self.policies else self.policy_defaults
            retries = policy.retries or 0
            if item.attempt <= retries:
                self._retry(item, policy)
                return
            self.log.warn(
                "job {job_id} failed (rule {rule_id}): {reason}",
                job_id=job_id,
                rule_id=item.rule.id,
                reason=outcome.reason,
            )
        if any(not i.manual for i in self._current.get(job_id, ())):
            return  # another run of it is still going (overlap=allow): the last one re-plans
        self._attempts.pop(job_id, None)
        self._due.pop(job_id, None)
        status = JobStatus.EXECUTED if outcome.success else JobStatus.FAILED
        waiting = self._waiting.pop(job_id, None)
        if rec is not None and waiting is not None:
            rule = self.rules.match(job_id)
            if rule is not None:
                packed = self.jobs.raw(job_id) or 0
                self._enqueue(_Queued(job_id, waiting, packed, rule, waiting))
                return
        if rec is not None:
            self._replan(job_id, rec, status)
            return
        self.jobs.set_status(job_id, status)
        self._persist(Job(job_id, unpack_ns(item.packed), status))

    def _retry(self, item: _Queued, policy: Policy) -> None:
        """Plan the next attempt after the backoff; the job shows ``planned <retry_ns>``."""
        job_id = item.job_id
        wait = backoff_ns(policy, item.attempt, self._rng)
        retry_ns = now_ns(self._reactor) + wait
        attempt = item.attempt + 1
        self.counters.runs_retried += 1
        self.upcoming.remove(job_id)
        self.jobs.set(job_id, retry_ns)
        self._attempts[job_id] = attempt
        self._due[job_id] = item.execution_ns
        self.timers.note_due(retry_ns)
        rec = self.recurrences.get(job_id)
        self._persist(Job(job_id, retry_ns, JobStatus.PLANNED))
        if rec is not None:
            self._persist(rec.state(job_id, attempt, item.execution_ns))
        else:
            self._persist(RunState(job_id, 0, I64_MIN, attempt, item.execution_ns))
        self.log.info(
            "job {job_id}: attempt {attempt} in {wait_s:.3f}s",
            job_id=job_id,
            attempt=attempt,
            wait_s=wait / 1e9,
        )
