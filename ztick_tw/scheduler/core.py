"""The scheduler: applies requests, fires due jobs through rules and runners, records outcomes.

It does no I/O of its own: the store, the runners and the clock are handed in, so it is
tested with a ``Clock``, a memory store and fake runners.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import cast

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

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
from ztick_tw.runners.base import IRunner
from ztick_tw.scheduler.jobs import TRIGGERED, JobTable, unpack_status
from ztick_tw.scheduler.operating import Operating
from ztick_tw.scheduler.recurring import Recurrences, misfire
from ztick_tw.scheduler.rules import RuleBook
from ztick_tw.scheduler.snapshot import Snapshot
from ztick_tw.scheduler.state import (
    FIRE_BATCH,
    INTERRUPTED_FAIL,
    INTERRUPTED_RERUN,
    Counters,
    NoRule,
    NotScheduled,
    Queued,
    RunLog,
    UnknownJob,
    UnknownRule,
)
from ztick_tw.scheduler.timers import TimerSet, now_ns
from ztick_tw.stats import LagWindow
from ztick_tw.store.base import Commit, IStore
from ztick_tw.store.fastpath import ScheduledSink

__all__ = [
    "FIRE_BATCH",
    "INTERRUPTED_FAIL",
    "INTERRUPTED_RERUN",
    "NoRule",
    "NotScheduled",
    "ReplaySummary",
    "RunLog",
    "Scheduler",
    "UnknownJob",
    "UnknownRule",
]


@dataclass(frozen=True, slots=True)
class ReplaySummary:
    """What a replay found, for the startup log line."""

    frames: int
    jobs: int
    rules: int


class Scheduler(Operating):
    """Jobs, rules, the timer and the execution queue of one ztick-tw daemon."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        store: IStore,
        runners: Mapping[RunnerKind, IRunner],
        *,
        max_concurrent: int = 64,
        max_concurrent_network: int = 4096,
        interrupted: str = INTERRUPTED_RERUN,
        lag: LagWindow | None = None,
        history: RunLog | None = None,
        policy_defaults: Policy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if max_concurrent < 1 or max_concurrent_network < 1:
            raise ValueError("max_concurrent and max_concurrent_network must be at least 1")
        if interrupted not in (INTERRUPTED_RERUN, INTERRUPTED_FAIL):
            raise ValueError(f"interrupted must be 'rerun' or 'fail', not {interrupted!r}")
        self._reactor = reactor
        self._store = store
        self._runners = dict(runners)
        self._max_concurrent = max_concurrent
        self._max_network = max_concurrent_network
        self._interrupted = interrupted
        self.jobs = JobTable()
        self.rules = RuleBook()
        self.lag = lag if lag is not None else LagWindow()
        self.timers = TimerSet(reactor, self.jobs, self._fire_due)
        # Runs waiting for a slot: process runs (shell, direct, awf) and network runs
        # (http, redis, amqp) apart, each with its own cap, so neither waits behind the other.
        self._queue: deque[Queued] = deque()
        self._network_queue: deque[Queued] = deque()
        # job -> its live runs (queued or running).  A re-SET or REMOVE forgets them, so
        # an older run of the job is void even when the job is re-set to the same time
        # (its triggered table value would then be equal).
        self._current: dict[str, list[Queued]] = {}
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
        self._running_network = 0
        self._pumping = False
        self._stopped = False
        self._attempts: dict[str, int] = {}  # only jobs past their first attempt
        self._late_set: dict[str, int] = {}  # job -> when it was set, for jobs set late
        self._started_ns = 0
        # Commit -> the state before the changes it carries, should it fail to reach disk.
        self._undo = {}

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
        loose = bool(self.recurrences)  # schedules that may lack their job
        divert = getattr(entries, "divert_scheduled", None)
        if divert is not None:  # a LogfileStore's load: scheduled jobs come in pairs
            divert(self._scheduled_loader())
        job_type = Job
        run_state_type = RunState
        schedule_type = ScheduleSet
        progress = self.recurrences.progress
        load_schedule = self.recurrences.loader()
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
            if kind is run_state_type:  # one per scheduled job and run: kept lean too
                state = cast(RunState, entry)
                occurrence = state.occurrence_ns
                progress(state.job_id, state.runs, None if occurrence == I64_MIN else occurrence)
                if state.attempt > 1:
                    attempts[state.job_id] = state.attempt
                    self._due[state.job_id] = state.due_ns
                elif attempts and state.job_id in attempts:
                    del attempts[state.job_id]
                    self._due.pop(state.job_id, None)
            elif kind is schedule_type:
                schedule_set = cast(ScheduleSet, entry)
                loose = True
                load_schedule(
                    schedule_set.job_id,
                    schedule_set.text,
                    schedule_set.options,
                    schedule_set.start_ns,
                )
            elif kind is Rule:
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
        frames += 2 * getattr(entries, "diverted", 0)
        jobs.finish_load()
        for job_id in [j for j in attempts if jobs.get(j) is None]:
            del attempts[job_id]
        for job_id in [j for j in self._due if jobs.get(j) is None or j not in attempts]:
            del self._due[job_id]
        if loose:
            # A schedule whose job never came (compaction writes them apart; a torn
            # write) is dropped.  Not needed when every schedule came in a pair with its
            # job: jobs only go with a removal, which takes their schedule too.  The
            # test is a plain dict's C-level membership, not a Python call a job.
            self.recurrences.retain(jobs.snapshot()[0].__contains__)
        for job_id in [j for j in self.paused if jobs.get(j) is None]:
            del self.paused[job_id]
        return ReplaySummary(frames, len(jobs), len(rules))

    def _scheduled_loader(self) -> ScheduledSink:
        """What replaying a schedule set, then its job's ``planned`` frame, does.

        The replay of ``SCHEDULE SET``'s two frames, handed over by the store without
        making entries of them (``LogfileStore.load``): the same as the loop of
        ``replay`` does with a ``ScheduleSet`` and then a planned ``Job``.
        """
        load_schedule = self.recurrences.loader()
        load_job = self.jobs.load
        attempts = self._attempts
        planned = int(JobStatus.PLANNED)

        def scheduled(
            job_id: str, text: str, options: str, start_ns: int, execution_ns: int
        ) -> None:
            load_schedule(job_id, text, options, start_ns)
            if attempts and job_id in attempts:
                del attempts[job_id]
            load_job(job_id, execution_ns, planned)

        return scheduled

    def _replay_extension(self, entry: Entry) -> None:
        kind = type(entry)
        if kind is ScheduleRemoval:
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
        interrupted: list[tuple[str, int]] = []
        if self.jobs.count(JobStatus.TRIGGERED):
            interrupted = [
                (job_id, ns)
                for job_id, status, ns in self.jobs.items()
                if status == JobStatus.TRIGGERED
            ]
            for job_id, ns in interrupted:
                self._recover_interrupted(job_id, ns)
        # Occurrences that fell due while the daemon was down follow the misfire policy
        # (a run the shutdown interrupted is re-run as it was, above).
        now = self._started_ns
        rerun = {job_id for job_id, _ns in interrupted}
        for job_id in rerun:
            self._count_missed_after(job_id, now)
        get = self.jobs.get
        for job_id in self.recurrences.job_ids():
            found = get(job_id)
            if (
                found is not None
                and found[0] == JobStatus.PLANNED
                and found[1] <= now
                and job_id not in self.paused
                and job_id not in self._due
                and job_id not in rerun
            ):
                rec = self.recurrences.get(job_id)
                assert rec is not None
                self._misfire(job_id, rec, now)
        self.timers.start()
        self._upcoming_timers.start()

    def _count_missed_after(self, job_id: str, now: int) -> None:
        """Count the occurrences after an interrupted one that fell due while down."""
        rec = self.recurrences.get(job_id) if self.recurrences else None
        if rec is None or rec.occurrence_ns is None:
            return
        schedule = self.recurrences.compiled(rec)
        following = schedule.after(rec.occurrence_ns)
        if following is not None and following <= now:
            missed = misfire(schedule, following, now, 0).missed
            self.counters.occurrences_missed += missed
            self.log.info(
                "job {job_id}: {missed} occurrence(s) missed after its interrupted run;"
                " the misfire policy applies once that run is done",
                job_id=job_id,
                missed=missed,
            )

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
            self._due.pop(job_id, None)
            self.jobs.set_status(job_id, JobStatus.FAILED)
            self._persist(Job(job_id, execution_ns, JobStatus.FAILED))
            self.log.warn(
                "job {job_id} was running when ztick-tw last stopped; marked failed"
                " (interrupted_jobs = fail)",
                job_id=job_id,
            )
            rec = self.recurrences.get(job_id) if self.recurrences else None
            if rec is not None:
                # That occurrence failed; the schedule goes on from the next one.
                if self.history is not None and rec.occurrence_ns is not None:
                    self.history.skipped(
                        job_id,
                        rec.occurrence_ns,
                        "interrupted by a restart (interrupted_jobs = fail)",
                    )
                self.recurrences.advance(rec)
                self._replan(job_id, rec, JobStatus.FAILED)

    def stop(self, grace: float) -> Deferred[None]:
        """Stop firing; let running executions finish for ``grace`` s, then end them."""
        self._stopped = True
        self.timers.stop()
        self._upcoming_timers.stop()
        for queue in (self._queue, self._network_queue):
            for item in queue:
                self._drop_live(item)
                if item.started is not None:
                    item.started.errback(NoRule("the daemon is shutting down"))
            queue.clear()
        stops = [runner.stop(grace) for runner in set(self._runners.values())]
        if not stops:
            return succeed(None)
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    def set_job(self, job_id: str, execution_ns: int) -> Commit | None:
        """Create or replace a job (status back to ``planned``); persisted.

        Should the write fail, the change is undone (see ``_remember_job``).
        """
        previous = self.jobs.raw(job_id)
        if self.recurrences.pop(job_id):
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

    def snapshot(self, retention_ns: int = 0) -> Snapshot:
        """A copy of every job and rule to write out (see ``ztick_tw.scheduler.snapshot``).

        With ``retention_ns`` > 0, executed and failed jobs due more than that long ago
        are left out; pass the snapshot to ``drop_expired`` once the compacted log is
        in place.
        """
        jobs, seq_ids = self.jobs.snapshot()
        cutoff = now_ns(self._reactor) - retention_ns if retention_ns > 0 else None
        return Snapshot(
            jobs, seq_ids, list(self.rules), cutoff, extensions=self.extension_entries()
        )

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
        """Triggered jobs waiting for a free execution slot (process or network)."""
        return len(self._queue) + len(self._network_queue)

    @property
    def executions_inflight(self) -> int:
        """Runner executions started and not yet finished."""
        return self._running + self._running_network
