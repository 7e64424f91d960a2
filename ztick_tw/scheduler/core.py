"""The scheduler: applies requests, fires due jobs through rules and runners, records outcomes.

It does no I/O of its own: the store, the runners and the clock are handed in, so it is
tested with a ``Clock``, a memory store and fake runners.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ztick_tw.model import (
    Entry,
    Job,
    JobRemoval,
    JobStatus,
    Rule,
    RuleRemoval,
    RunnerKind,
)
from ztick_tw.runners.base import Execution, IRunner, Outcome
from ztick_tw.scheduler.jobs import TRIGGERED, JobTable, unpack_ns, unpack_status
from ztick_tw.scheduler.rules import RuleBook
from ztick_tw.scheduler.snapshot import Snapshot
from ztick_tw.scheduler.timers import TimerSet, now_ns
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


@dataclass(slots=True)
class _Queued:
    job_id: str
    execution_ns: int
    packed: int  # the job's table value when it was triggered
    rule: Rule
    lag_base_ns: int  # lag is measured from here (the due time, or later if set late)


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
        # job -> its live run (queued or running).  A re-SET or REMOVE forgets it, so an
        # older run of the job is void even when the job is re-set to the same time
        # (its triggered table value would then be equal).
        self._current: dict[str, _Queued] = {}
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
                jobs.unload(entry.id)
                attempts.pop(entry.id, None)
            elif kind is RuleRemoval:
                rules.remove(entry.id)
        jobs.finish_load()
        for job_id in [j for j in attempts if jobs.get(j) is None]:
            del attempts[job_id]
        return ReplaySummary(frames, len(jobs), len(rules))

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
        self.timers.start()

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
        for item in self._queue:
            if self._current.get(item.job_id) is item:
                del self._current[item.job_id]
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

    def get_job(self, job_id: str) -> tuple[JobStatus, int] | None:
        """``(status, execution_ns)`` or ``None``."""
        return self.jobs.get(job_id)

    def query(self, prefix: str = "") -> Iterator[tuple[str, JobStatus, int]]:
        """Jobs whose id starts with ``prefix``, in id order (read in slices)."""
        after: str | None = None
        while True:
            found = self.jobs.scan(prefix, after, 1024)
            yield from found
            if len(found) < 1024:
                return
            after = found[-1][0]

    def scan(self, prefix: str, after: str | None, limit: int) -> list[tuple[str, JobStatus, int]]:
        """Up to ``limit`` jobs whose id starts with ``prefix``, after ``after``, in id order.

        O(log n + limit), so a long answer can be produced in slices.
        """
        return self.jobs.scan(prefix, after, limit)

    def remove_job(self, job_id: str) -> Commit | None:
        """Delete a job (a queued run of it is dropped); raises ``UnknownJob``."""
        previous = self.jobs.raw(job_id)
        if not self.jobs.remove(job_id):
            raise UnknownJob(job_id)
        self._attempts.pop(job_id, None)
        self._late_set.pop(job_id, None)
        self._current.pop(job_id, None)
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
        commit = self._store.append(RuleRemoval(rule_id))
        if commit is not None:
            self._remember_rule(commit, rule_id, previous)
        return commit

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
                self._fire_one(job_id, execution_ns, packed)
            except Exception:
                self.log.failure("firing job {job_id} failed", job_id=job_id)
        self._pump()

    def _fire_one(self, job_id: str, execution_ns: int, packed: int) -> None:
        lag_base = max(execution_ns, self._late_set.pop(job_id, execution_ns), self._started_ns)
        rule = self.rules.match(job_id)
        if rule is None:
            self.jobs.set_status(job_id, JobStatus.FAILED)
            self._attempts.pop(job_id, None)
            self._persist(Job(job_id, execution_ns, JobStatus.FAILED))
            self.log.warn("job {job_id} failed: no rule matches it", job_id=job_id)
            return
        queued = _Queued(job_id, execution_ns, packed, rule, lag_base)
        self._current[job_id] = queued
        self._queue.append(queued)

    def _pump(self) -> None:
        """Start queued executions while there are free slots (never re-entered).

        Each started job's ``triggered`` frame is written (handed to the file, not yet
        fsynced) before its runner starts, so a daemon that dies while the job runs
        restarts knowing it had started; a job that only waited for a slot is still
        ``planned`` in the log and simply runs at the next start.
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
                    if (
                        self._current.get(item.job_id) is not item
                        or self.jobs.raw(item.job_id) != item.packed
                    ):
                        continue  # re-set or removed while it waited: this run is void
                    batch.append(item)
                if not batch:
                    return
                for item in batch:
                    self._persist(Job(item.job_id, item.execution_ns, JobStatus.TRIGGERED))
                self._store.write_through()
                for item in batch:
                    try:
                        self._start(item)
                    except Exception:
                        self.log.failure("starting job {job_id} failed", job_id=item.job_id)
        finally:
            self._pumping = False

    def _persist(self, job: Job) -> None:
        """Record a status change; a store that refuses it is logged, the run goes on."""
        try:
            self._store.append(job)
        except StoreError as e:
            self.log.error(
                "job {job_id}: cannot record status {status}: {error}",
                job_id=job.id,
                status=job.status.wire,
                error=str(e),
            )

    def _start(self, item: _Queued) -> None:
        runner = self._runners.get(item.rule.runner.kind)
        start = now_ns(self._reactor)
        self.lag.record((start - item.lag_base_ns) // 1000)
        attempt = self._attempts.get(item.job_id, 1)
        execution = Execution(
            item.job_id, item.execution_ns, item.rule.id, attempt, item.rule.runner, start
        )
        self._running += 1
        if runner is None:
            outcome = Outcome(False, f"no {item.rule.runner.kind.wire} runner is configured")
            d: Deferred[Outcome] = succeed(outcome)
        else:
            try:
                d = runner.run(execution)
            except Exception as e:  # a runner must not raise, but one bad job cannot stop us
                d = succeed(Outcome(False, f"runner raised {e!r}"))
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

    def _finished(self, outcome: Outcome, item: _Queued) -> None:
        self._running -= 1
        job_id = item.job_id
        try:
            current = self._current.get(job_id)
            if current is item:
                del self._current[job_id]
            if current is not item or self.jobs.raw(job_id) != item.packed:
                self.log.info(
                    "job {job_id} finished ({result}) but was re-set or removed meanwhile;"
                    " result not recorded",
                    job_id=job_id,
                    result="success" if outcome.success else "failure",
                )
                return
            if outcome.interrupted:
                self.log.info(
                    "job {job_id} was stopped by the shutdown; it stays triggered and runs"
                    " again at the next start",
                    job_id=job_id,
                )
                return
            status = JobStatus.EXECUTED if outcome.success else JobStatus.FAILED
            self.jobs.set_status(job_id, status)
            self._attempts.pop(job_id, None)
            self._persist(Job(job_id, unpack_ns(item.packed), status))
            if not outcome.success:
                self.log.warn(
                    "job {job_id} failed (rule {rule_id}): {reason}",
                    job_id=job_id,
                    rule_id=item.rule.id,
                    reason=outcome.reason,
                )
        finally:
            self._pump()
