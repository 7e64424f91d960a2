"""Recurring jobs and rule policies: the plain state behind SPEC §8-9, without I/O.

A scheduled job is an ordinary job in the ``JobTable`` plus a :class:`Recurrence`: the
``SCHEDULE SET`` entry it came from (text, canonical options, resolved start), how many
occurrences have fired (for ``limit``) and the occurrence the job is planned for.  The
compiled :class:`~ztick_tw.schedules.Schedule` is made on first use only, so a replay of
a million scheduled jobs costs one small object each and no parsing; the schedule text
and options strings are interned, so a million jobs on ``every 1 hour`` share them.

What the scheduler decides with this state (misfire after downtime, the backoff between
attempts) is computed here by plain functions, tested without a reactor.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ztick_tw.model import I64_MIN, Policy, RunState, ScheduleSet
from ztick_tw.schedules import Options, Schedule, compile_schedule, parse_options

#: ``misfire=all`` runs at most this many missed occurrences (the latest ones).
MISFIRE_ALL_MAX = 1000
#: Counting missed occurrences stops here (a week of ``every 1 second`` is 604,800).
MISSED_COUNT_MAX = 100_000


@dataclass(slots=True)
class Recurrence:
    """One scheduled job's schedule and progress."""

    entry: ScheduleSet
    runs: int = 0
    #: The schedule's own instant (before jitter) the job is planned for; once that
    #: occurrence has fired, the next one.  ``None``: the schedule has ended.
    occurrence_ns: int | None = None
    schedule: Schedule | None = None

    def state(self, job_id: str, attempt: int = 1, due_ns: int | None = None) -> RunState:
        """The ``RunState`` entry that records this progress."""
        occurrence = I64_MIN if self.occurrence_ns is None else self.occurrence_ns
        return RunState(
            job_id, self.runs, occurrence, attempt, occurrence if due_ns is None else due_ns
        )


class Recurrences:
    """Every scheduled job's :class:`Recurrence`, by job id."""

    def __init__(self, now_ns: Callable[[], int]) -> None:
        self._now_ns = now_ns
        self._by_job: dict[str, Recurrence] = {}
        self._strings: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._by_job)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._by_job

    def __iter__(self) -> Iterator[tuple[str, Recurrence]]:
        return iter(list(self._by_job.items()))

    def get(self, job_id: str) -> Recurrence | None:
        """The job's recurrence, or ``None`` for a one-shot job."""
        return self._by_job.get(job_id)

    def pop(self, job_id: str) -> Recurrence | None:
        """Forget the job's schedule; return what it was."""
        return self._by_job.pop(job_id, None)

    def put(self, job_id: str, entry: ScheduleSet, schedule: Schedule | None = None) -> Recurrence:
        """Attach ``entry`` to the job (replacing any schedule it had); progress starts at 0."""
        intern = self._strings.setdefault
        entry = ScheduleSet(
            entry.job_id,
            intern(entry.text, entry.text),
            intern(entry.options, entry.options),
            entry.start_ns,
        )
        rec = self._by_job[job_id] = Recurrence(entry, schedule=schedule)
        return rec

    def ids(self, prefix: str = "") -> list[str]:
        """The scheduled job ids starting with ``prefix``, sorted."""
        return sorted(j for j in self._by_job if j.startswith(prefix))

    def compiled(self, rec: Recurrence) -> Schedule:
        """The job's compiled schedule (compiled on first use, then kept)."""
        schedule = rec.schedule
        if schedule is None:
            e = rec.entry
            schedule = rec.schedule = compile_schedule(
                e.text, parse_options(e.options.split()), self._now_ns(), e.start_ns
            )
        return schedule

    def advance(self, rec: Recurrence) -> int | None:
        """Count the occurrence that just fired and move to the next one (``None``: ended)."""
        rec.runs += 1
        limit = self.compiled(rec).options.limit
        current = rec.occurrence_ns
        if current is None or (limit and rec.runs >= limit):
            rec.occurrence_ns = None
        else:
            rec.occurrence_ns = self.compiled(rec).after(current)
        return rec.occurrence_ns

    def skip(self, rec: Recurrence) -> int | None:
        """Move past the current occurrence without counting it as a run."""
        current = rec.occurrence_ns
        rec.occurrence_ns = None if current is None else self.compiled(rec).after(current)
        return rec.occurrence_ns


def planned_ns(occurrence_ns: int, options: Options, rng: random.Random) -> int:
    """When an occurrence is planned to fire: its instant, moved later by the jitter."""
    jitter = options.jitter_ns
    return occurrence_ns + rng.randrange(jitter) if jitter > 0 else occurrence_ns


@dataclass(frozen=True, slots=True)
class Misfire:
    """What to do with the occurrences a job missed (daemon down, or job paused).

    ``missed``: how many fell due (for STAT ``occurrences_missed``; counting stops at
    ``MISSED_COUNT_MAX``).  ``run``: the occurrences to run now, oldest first (empty:
    none).  ``next_ns``: the occurrence to plan after them (``None``: the schedule ended).
    """

    missed: int
    run: tuple[int, ...]
    next_ns: int | None


def misfire(schedule: Schedule, first_missed_ns: int, now_ns: int, runs: int) -> Misfire:
    """Apply the schedule's ``misfire`` and ``grace`` options to occurrences due by now.

    ``first_missed_ns`` is the occurrence the job was planned for (due at or before
    ``now_ns``); ``runs`` how many occurrences it had run before (for ``limit``).
    """
    options = schedule.options
    limit = options.limit
    missed: list[int] = []
    count = 0
    occurrence: int | None = first_missed_ns
    keep = MISFIRE_ALL_MAX if options.misfire == "all" else 1
    while occurrence is not None and occurrence <= now_ns and count < MISSED_COUNT_MAX:
        count += 1
        missed.append(occurrence)
        if len(missed) > keep:
            del missed[0]
        if limit and runs + count >= limit and options.misfire != "skip":
            break
        occurrence = schedule.after(occurrence)
    if count >= MISSED_COUNT_MAX and occurrence is not None and occurrence <= now_ns:
        occurrence = schedule.after(now_ns)
    grace = options.grace_ns
    if grace is not None:
        missed = [o for o in missed if now_ns - o <= grace]
    if options.misfire == "skip":
        missed = []
    if limit:
        missed = missed[: max(0, limit - runs)]
    if options.misfire == "once":
        missed = missed[-1:]
    if occurrence is not None and occurrence <= now_ns:
        occurrence = None  # the limit ended it while counting
    return Misfire(count, tuple(missed), occurrence)


def backoff_ns(policy: Policy, attempt: int, rng: random.Random) -> int:
    """The wait before attempt ``attempt + 1``: exponential, with full jitter.

    The ceiling doubles with each attempt from ``backoff_min`` up to ``backoff_max``
    (``min * 2^(attempt-1)``); the wait is drawn uniformly between ``backoff_min`` and
    that ceiling, so retries of many jobs that failed together spread out.
    """
    low = policy.backoff_min_ns or 0
    high = policy.backoff_max_ns if policy.backoff_max_ns is not None else low
    exponent = min(max(attempt - 1, 0), 62)
    ceiling = min(high, low * (1 << exponent)) if low > 0 else high
    ceiling = max(ceiling, low)
    if ceiling <= low:
        return low
    return low + math.floor(rng.random() * (ceiling - low))


def merged_policy(policy: Policy | None, defaults: Policy) -> Policy:
    """A rule's effective policy: its own keys, the ``[runners]`` defaults for the rest."""
    if policy is None:
        return defaults
    return Policy(
        policy.timeout_ns if policy.timeout_ns is not None else defaults.timeout_ns,
        policy.retries if policy.retries is not None else defaults.retries,
        policy.backoff_min_ns if policy.backoff_min_ns is not None else defaults.backoff_min_ns,
        policy.backoff_max_ns if policy.backoff_max_ns is not None else defaults.backoff_max_ns,
    )
