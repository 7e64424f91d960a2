"""The scheduler's state and the small steps every part of it shares.

``Scheduler`` (``core``) is built in three layers, one module each: this state and its
shared steps; ``runs`` (firing due jobs, the execution queue, outcomes, retries and the
overlap policy); ``operating`` (schedules, pause/resume, RUN and rule policies, SPEC §8-9);
``core`` itself (replay, start/stop, job and rule requests, compaction).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ztick_tw.model import (
    Entry,
    Job,
    JobStatus,
    Policy,
    Rule,
    RunnerKind,
)
from ztick_tw.runners.base import IRunner, Outcome
from ztick_tw.scheduler.jobs import JobTable
from ztick_tw.scheduler.recurring import (
    Recurrence,
    Recurrences,
    merged_policy,
    misfire,
    planned_ns,
)
from ztick_tw.scheduler.rules import RuleBook
from ztick_tw.scheduler.timers import TimerSet, now_ns
from ztick_tw.stats import LagWindow
from ztick_tw.store.base import Commit, IStore, StoreError

#: How many due jobs one timer wake-up takes before yielding to the reactor.
FIRE_BATCH = 1000

#: Runners whose runs are a message on a pooled connection, not a child process: they
#: have their own cap (``max_concurrent_network_runs``), so 64 process slots do not
#: throttle 5,000 redis messages a second (measured: with one shared cap of 64, lag
#: p99 2 s and 2,900 runs/s; apart, 28 ms and 4,600/s on a loaded machine).
NETWORK_KINDS = frozenset({RunnerKind.HTTP, RunnerKind.REDIS, RunnerKind.AMQP})

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
class Queued:
    """One run of a job: queued, then running; void once its job is re-set or removed."""

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


#: An occurrence more than this late when planned is coalesced (see ``_coalesce``).
LATE_NS = 1_000_000


class SchedulerState:
    """The attributes every layer of ``Scheduler`` uses (set in ``Scheduler.__init__``)."""

    log: Logger
    _reactor: IReactorTime
    _store: IStore
    _runners: dict[RunnerKind, IRunner]
    _max_concurrent: int
    _max_network: int
    jobs: JobTable
    rules: RuleBook
    lag: LagWindow
    timers: TimerSet
    _queue: deque[Queued]
    _network_queue: deque[Queued]
    _current: dict[str, list[Queued]]
    _running: int
    _running_network: int
    _pumping: bool
    _stopped: bool
    _attempts: dict[str, int]
    _late_set: dict[str, int]
    _started_ns: int
    recurrences: Recurrences
    policies: dict[str, Policy]
    policy_defaults: Policy
    paused: dict[str, int]
    _held: set[str]
    _due: dict[str, int]
    _waiting: dict[str, int]
    upcoming: JobTable
    _upcoming_timers: TimerSet
    history: RunLog | None
    counters: Counters
    _rng: random.Random
    _undo: dict[Commit, _Undo]

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

    def _enqueue(self, queued: Queued) -> None:
        self._current.setdefault(queued.job_id, []).append(queued)
        if queued.rule.runner.kind in NETWORK_KINDS:
            self._network_queue.append(queued)
        else:
            self._queue.append(queued)

    def _is_live(self, item: Queued) -> bool:
        live = self._current.get(item.job_id)
        return live is not None and item in live

    def _drop_live(self, item: Queued) -> None:
        live = self._current.get(item.job_id)
        if live is not None and item in live:
            live.remove(item)
            if not live:
                del self._current[item.job_id]

    def policy_for(self, rule_id: str) -> Policy:
        """The rule's effective policy (its keys, then the ``[runners]`` defaults)."""
        return merged_policy(self.policies.get(rule_id), self.policy_defaults)

    def _replan(self, job_id: str, rec: Recurrence, ended: JobStatus) -> None:
        """Plan a scheduled job at its next occurrence, or end it with status ``ended``."""
        self.upcoming.remove(job_id)
        occurrence = rec.occurrence_ns
        if occurrence is not None and occurrence < now_ns(self._reactor) - LATE_NS:
            occurrence = rec.occurrence_ns = self._coalesce(rec, occurrence)
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
        planned = planned_ns(occurrence, self.recurrences.options(rec), self._rng)
        self.jobs.set(job_id, planned)
        self.timers.note_due(planned)
        self._persist(Job(job_id, planned, JobStatus.PLANNED))
        self._persist(rec.state(job_id))

    def _coalesce(self, rec: Recurrence, occurrence: int) -> int | None:
        """The occurrence to plan when the next one is already past.

        That happens after a run that ended after it (an interrupted run re-run at
        startup): ``misfire`` decides, as for downtime (``all``: each in turn; ``once``:
        the latest; ``skip``: the next one).  Not counted as missed: the daemon was up.
        """
        schedule = self.recurrences.compiled(rec)
        if schedule.options.misfire == "all":
            return occurrence
        result = misfire(schedule, occurrence, now_ns(self._reactor), rec.runs)
        return result.run[-1] if result.run else result.next_ns

    def _watch_next(self, job_id: str, rec: Recurrence) -> None:
        """While a scheduled job runs, keep its next occurrence in ``upcoming``.

        An occurrence already due (a ``misfire=all`` catch-up) is not watched: it runs
        when this run ends, one after another, and never meets the overlap policy.
        """
        occurrence = rec.occurrence_ns
        if occurrence is None or occurrence <= now_ns(self._reactor):
            return
        planned = planned_ns(occurrence, self.recurrences.options(rec), self._rng)
        self.upcoming.set(job_id, planned)
        self._upcoming_timers.note_due(planned)

    def _grace_text(self, rec: Recurrence) -> str:
        grace = self.recurrences.options(rec).grace_ns or 0
        return f"{grace / 1e9:g}s"

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
