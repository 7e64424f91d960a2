"""Operating jobs (SPEC §8-9): schedules, pause/resume, RUN and rule policies."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from twisted.internet.defer import Deferred

from ztick_tw.model import (
    I64_MIN,
    Entry,
    Job,
    JobStatus,
    Pause,
    Policy,
    RulePolicy,
    RunState,
    ScheduleRemoval,
    ScheduleSet,
)
from ztick_tw.scheduler.recurring import (
    Recurrence,
    entries,
    misfire,
    planned_ns,
)
from ztick_tw.scheduler.runs import Runs
from ztick_tw.scheduler.state import (
    NoRule,
    NotScheduled,
    Queued,
    UnknownJob,
    UnknownRule,
)
from ztick_tw.scheduler.timers import now_ns
from ztick_tw.schedules import Schedule
from ztick_tw.store.base import Commit

#: A start at most this long ago counts as "now" (see ``set_schedule``).
JUST_NOW_NS = 1_000_000_000


class Operating(Runs):
    """The SPEC §8-9 requests of ``Scheduler``."""

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
        # A start in the past fires at once, then follows the schedule (SPEC §8).  A
        # start within the last second (no ``starting``: "now", read a moment ago by the
        # caller) is the first occurrence itself, so the grid is exactly start + k x N.
        occurrence = first if first > now - JUST_NOW_NS else now
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
        commit = self._store.append(Job(job_id, planned, JobStatus.PLANNED))
        if occurrence != schedule.start_ns:
            # A replayed schedule starts at its start; say so only when it does not
            # (a start in the past fires now): one frame less per job to replay.
            commit = self._store.append(rec.state(job_id))
        if commit is not None:
            self._remember_job(commit, job_id, previous)

            def undone(c: Commit) -> None:
                current = self.recurrences.get(job_id)
                if c.error is not None and current is not None and current.entry == entry:
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
        if not self.recurrences.pop(job_id):
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
        self._enqueue(Queued(job_id, now, packed, rule, now, manual=True, started=started))
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

    def extension_entries(self) -> Iterable[Entry]:
        """What compaction must keep of SPEC §8-9 state, as log entries (after the jobs).

        Built from copies taken now; the million-schedule part is produced lazily (in
        the compaction's worker thread).  A scheduled job with a run in progress is
        recorded as it stands in the log: at the occurrence that runs (its next one is
        only advanced in memory), so a restart re-runs that occurrence.
        """
        head: list[Entry] = []
        for job_id in self._held:
            found = self.jobs.get(job_id)
            if found is not None:
                head.append(Job(job_id, found[1], JobStatus.PLANNED))
        overrides: dict[str, RunState] = {}
        for job_id, attempt in self._attempts.items():
            due = self._due.get(job_id)
            rec = self.recurrences.get(job_id)
            if due is not None and rec is not None:
                overrides[job_id] = rec.state(job_id, attempt, due)
            elif due is not None:
                head.append(RunState(job_id, 0, I64_MIN, attempt, due))
        for job_id, live in self._current.items():
            runs = [item for item in live if not item.manual]
            rec = self.recurrences.get(job_id) if runs else None
            if rec is None or job_id in self._due:
                continue
            oldest = runs[0].execution_ns
            attempt = self._attempts.get(job_id, 1)
            overrides[job_id] = RunState(
                job_id, max(rec.runs - len(runs), 0), oldest, attempt, oldest
            )
        tail: list[Entry] = [Pause(j, True, since) for j, since in self.paused.items()]
        tail += [RulePolicy(r, policy) for r, policy in self.policies.items()]
        return itertools.chain(head, entries(self.recurrences.frozen(), overrides), tail)
