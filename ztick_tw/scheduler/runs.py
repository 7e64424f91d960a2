"""Firing: due jobs to the execution queue, runs to runners, outcomes to the table.

Also what happens between runs of one job: retries after the backoff, and the overlap
policy when a scheduled job's next occurrence falls due while it still runs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from types import MappingProxyType

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from ztick_tw.metrics import NO_METRICS, Metrics
from ztick_tw.model import (
    I64_MIN,
    Job,
    JobStatus,
    Policy,
    RunnerKind,
    RunState,
)
from ztick_tw.runners.base import Execution, IRunner, Outcome
from ztick_tw.scheduler.jobs import unpack_ns
from ztick_tw.scheduler.recurring import (
    Recurrence,
    backoff_ns,
)
from ztick_tw.scheduler.state import (
    FIRE_BATCH,
    NETWORK_KINDS,
    Queued,
    SchedulerState,
)
from ztick_tw.scheduler.timers import now_ns


class Runs(SchedulerState):
    """The firing half of ``Scheduler``."""

    #: Where runs and trigger lag are reported (``ztick_tw.metrics.install``); off by default.
    metrics: Metrics = NO_METRICS

    @property
    def runners(self) -> Mapping[RunnerKind, IRunner]:
        """The runners by kind (a read-only view)."""
        return MappingProxyType(self._runners)

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
            grace = self.recurrences.options(rec).grace_ns
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
        self._enqueue(Queued(job_id, due_ns, packed, rule, lag_base, attempt))

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
        options = self.recurrences.options(rec)
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
                self._enqueue(Queued(job_id, occurrence, packed, rule, occurrence))
        self._watch_next(job_id, rec)

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
                if self._stopped:
                    return
                batch = self._take(self._queue, self._max_concurrent - self._running)
                batch += self._take(self._network_queue, self._max_network - self._running_network)
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

    def _take(self, queue: deque[Queued], room: int) -> list[Queued]:
        """Up to ``room`` live runs from the front of ``queue``."""
        batch: list[Queued] = []
        while queue and len(batch) < room:
            item = queue.popleft()
            if self._is_live(item):  # else re-set or removed while it waited: void
                batch.append(item)
        return batch

    def _start(self, item: Queued) -> None:
        kind = item.rule.runner.kind
        runner = self._runners.get(kind)
        start = now_ns(self._reactor)
        if not item.manual:
            self.lag.record((start - item.lag_base_ns) // 1000)
            if self.metrics.on:
                self.metrics.trigger_lag(start - item.lag_base_ns)
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
        if kind in NETWORK_KINDS:
            self._running_network += 1
        else:
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
        d.addCallback(self._finished, item, start)
        d.addErrback(self._log_failure, item)

    def _runner_errback(self, failure: Failure, item: Queued) -> Outcome:
        self.log.failure("runner for job {job_id} errbacked", failure, job_id=item.job_id)
        return Outcome(False, f"runner error: {failure.getErrorMessage()}")

    def _log_failure(self, failure: Failure, item: Queued) -> None:
        self.log.failure(
            "recording the outcome of job {job_id} failed", failure, job_id=item.job_id
        )

    def _record(self, item: Queued, outcome: Outcome, word: str) -> None:
        if self.history is not None and item.handle is not None:
            self.history.finish(
                item.handle,
                now_ns(self._reactor),
                word,
                outcome.exit_code,
                outcome.reason,
                outcome.output,
            )

    def _finished(self, outcome: Outcome, item: Queued, start_ns: int = 0) -> None:
        if item.rule.runner.kind in NETWORK_KINDS:
            self._running_network -= 1
        else:
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
        if self.metrics.on:
            self.metrics.run_ended(
                item.rule.runner.kind.wire,
                "interrupted" if outcome.interrupted else word,
                now_ns(self._reactor) - start_ns,
            )
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

    def _settle(self, item: Queued, outcome: Outcome) -> None:
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
                self._enqueue(Queued(job_id, waiting, packed, rule, waiting))
                return
        if rec is not None:
            self._replan(job_id, rec, status)
            return
        execution_ns = unpack_ns(item.packed)
        if item.attempt > 1 and execution_ns != item.execution_ns:
            # After retries the job shows the time it was set for, not its last attempt's.
            execution_ns = item.execution_ns
            self.jobs.set(job_id, execution_ns)
        self.jobs.set_status(job_id, status)
        self._persist(Job(job_id, execution_ns, status))

    def _retry(self, item: Queued, policy: Policy) -> None:
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
