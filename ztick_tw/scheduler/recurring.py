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
from itertools import filterfalse
from typing import NamedTuple

from ztick_tw.model import I64_MIN, Policy, RunState, ScheduleSet
from ztick_tw.scheduler.definitions import Definitions, definition_text
from ztick_tw.schedules import Options, Schedule, compile_schedule, parse_options

#: ``misfire=all`` runs at most this many missed occurrences (the latest ones).
MISFIRE_ALL_MAX = 1000
#: Counting missed occurrences stops here (a week of ``every 1 second`` is 604,800).
MISSED_COUNT_MAX = 100_000


#: How the state of one scheduled job is packed into one int (see ``Recurrences``).
_DEF_BITS = 24
_RUNS_BITS = 32
_START_BITS = 64
_RUNS_SHIFT = _DEF_BITS
_START_SHIFT = _RUNS_SHIFT + _RUNS_BITS
_OCC_SHIFT = _START_SHIFT + _START_BITS
_DEF_MASK = (1 << _DEF_BITS) - 1
_RUNS_MASK = (1 << _RUNS_BITS) - 1
_START_MASK = (1 << _START_BITS) - 1
_OFFSET = 1 << 63
_START_AND_DEF = (_START_MASK << _START_SHIFT) | _DEF_MASK

#: Compiled schedules kept (the most recently used jobs); others are compiled again.
COMPILED_CACHE = 8_192
#: Distinct (schedule, start) whose packed state a replay shares between jobs.
PACKED_KEPT = 4_096


def _pack(definition: int, runs: int, start_ns: int, occurrence_ns: int | None) -> int:
    occurrence = 0 if occurrence_ns is None else occurrence_ns + _OFFSET + 1
    return (
        (occurrence << _OCC_SHIFT)
        | ((start_ns + _OFFSET) << _START_SHIFT)
        | (min(runs, _RUNS_MASK) << _RUNS_SHIFT)
        | definition
    )


class Definition(NamedTuple):
    """A schedule text with its canonical options, shared by every job that uses it.

    ``Recurrences`` keeps plain ``(text, options)`` tuples, which the garbage collector
    stops tracking (a million distinct schedules must not lengthen every full
    collection, a reactor pause); this named view is made when asked for.
    """

    text: str
    options: str


class Recurrence:
    """A view of one scheduled job's schedule and progress; setting a field stores it.

    ``runs``: occurrences fired so far (for ``limit``); ``occurrence_ns``: the schedule's
    own instant (before jitter) the job is planned for, and once that occurrence has
    fired, the next one (``None``: the schedule has ended).
    """

    __slots__ = ("_book", "job_id")

    def __init__(self, book: Recurrences, job_id: str) -> None:
        self._book = book
        self.job_id = job_id

    @property
    def _packed(self) -> int:
        return self._book._by_job[self.job_id]

    @property
    def definition(self) -> Definition:
        """The schedule text and options."""
        packed = self._packed
        index = packed & _DEF_MASK
        start = ((packed >> _START_SHIFT) & _START_MASK) - _OFFSET
        definitions = self._book._definitions
        return Definition(definitions.text(index, start), definitions.options(index))

    @property
    def start_ns(self) -> int:
        """The resolved start (the first occurrence's anchor)."""
        return ((self._packed >> _START_SHIFT) & _START_MASK) - _OFFSET

    @property
    def runs(self) -> int:
        """Occurrences fired so far."""
        return (self._packed >> _RUNS_SHIFT) & _RUNS_MASK

    @runs.setter
    def runs(self, value: int) -> None:
        packed = self._packed
        self._book._by_job[self.job_id] = (packed & ~(_RUNS_MASK << _RUNS_SHIFT)) | (
            min(value, _RUNS_MASK) << _RUNS_SHIFT
        )

    @property
    def occurrence_ns(self) -> int | None:
        """The occurrence the job is planned for (``None``: ended)."""
        occurrence = self._packed >> _OCC_SHIFT
        return None if occurrence == 0 else occurrence - _OFFSET - 1

    @occurrence_ns.setter
    def occurrence_ns(self, value: int | None) -> None:
        packed = self._packed
        low = packed & ((1 << _OCC_SHIFT) - 1)
        occurrence = 0 if value is None else value + _OFFSET + 1
        self._book._by_job[self.job_id] = (occurrence << _OCC_SHIFT) | low

    @property
    def entry(self) -> ScheduleSet:
        """The ``ScheduleSet`` entry this schedule came from."""
        d = self.definition
        return ScheduleSet(self.job_id, d.text, d.options, self.start_ns)

    def state(self, job_id: str, attempt: int = 1, due_ns: int | None = None) -> RunState:
        """The ``RunState`` entry that records this progress."""
        occurrence = self.occurrence_ns
        occurrence = I64_MIN if occurrence is None else occurrence
        return RunState(
            job_id, self.runs, occurrence, attempt, occurrence if due_ns is None else due_ns
        )


class Recurrences:
    """Every scheduled job's schedule and progress, by job id, one packed int each.

    A job costs one dict entry whose value packs the index of its :class:`Definition`
    (text and options, shared), its runs, its resolved start and its current occurrence
    (about 100 bytes a job, against ~400 for a few objects each: SPEC's target is 1M
    scheduled jobs in 400 MB).  Compiled schedules are kept for the most recently used
    ``COMPILED_CACHE`` jobs and compiled again (a few µs) for the others.
    """

    def __init__(self, now_ns: Callable[[], int]) -> None:
        self._now_ns = now_ns
        self._by_job: dict[str, int] = {}
        self._definitions = Definitions(_DEF_MASK + 1)
        self._options: dict[int, Options] = {}
        self._compiled: dict[str, Schedule] = {}

    def __len__(self) -> int:
        return len(self._by_job)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._by_job

    def __iter__(self) -> Iterator[tuple[str, Recurrence]]:
        return iter([(job_id, Recurrence(self, job_id)) for job_id in self._by_job])

    def job_ids(self) -> list[str]:
        """Every scheduled job id (a copy: safe to change the schedules meanwhile)."""
        return list(self._by_job)

    def get(self, job_id: str) -> Recurrence | None:
        """The job's recurrence, or ``None`` for a one-shot job."""
        return Recurrence(self, job_id) if job_id in self._by_job else None

    def pop(self, job_id: str) -> bool:
        """Forget the job's schedule; whether it had one."""
        self._compiled.pop(job_id, None)
        return self._by_job.pop(job_id, None) is not None

    def put(self, job_id: str, entry: ScheduleSet, schedule: Schedule | None = None) -> Recurrence:
        """Attach ``entry`` to the job (replacing any schedule it had); progress starts at 0.

        The occurrence starts at the start; set ``occurrence_ns`` to change it.
        """
        self.load(job_id, entry.text, entry.options, entry.start_ns)
        if schedule is not None:
            self._remember(job_id, schedule)
        return Recurrence(self, job_id)

    def load(self, job_id: str, text: str, options: str, start_ns: int) -> None:
        """``put`` without the view or a compiled schedule: the replay of one entry."""
        index = self._definitions.index(text, options, start_ns)
        start = start_ns + _OFFSET
        self._by_job[job_id] = ((start + 1) << _OCC_SHIFT) | (start << _START_SHIFT) | index
        if self._compiled:
            self._compiled.pop(job_id, None)

    def loader(self) -> Callable[[str, str, str, int], None]:
        """``load`` for a replay: the same, with everything it needs bound once.

        A just-set job's packed state depends only on its schedule and start, so jobs
        set with the same ones (a million jobs on ten schedules) share one int: less
        arithmetic, and 50 bytes less a job.  ``PACKED_KEPT`` of them are remembered;
        if by then they were hardly shared (every start distinct), the replay stops
        looking them up.
        """
        by_job = self._by_job
        index_of = self._definitions.index
        compiled = self._compiled
        shared: dict[tuple[str, str, int], int] = {}
        known = shared.get
        occ_shift, start_shift, offset = _OCC_SHIFT, _START_SHIFT, _OFFSET
        sharing = True

        def load(job_id: str, text: str, options: str, start_ns: int) -> None:
            nonlocal sharing
            if sharing:
                key = (text, options, start_ns)
                packed = known(key)
            else:
                packed = None
            if packed is None:
                start = start_ns + offset
                packed = (
                    ((start + 1) << occ_shift)
                    | (start << start_shift)
                    | index_of(text, options, start_ns)
                )
                if sharing:
                    if len(shared) < PACKED_KEPT:
                        shared[key] = packed
                    elif len(by_job) < 2 * PACKED_KEPT:
                        sharing = False
            by_job[job_id] = packed
            if compiled:
                compiled.pop(job_id, None)

        return load

    def progress(self, job_id: str, runs: int, occurrence_ns: int | None) -> None:
        """Set a job's progress (replay of a ``RunState``); unknown jobs are ignored."""
        by_job = self._by_job
        packed = by_job.get(job_id)
        if packed is None:
            return
        occurrence = 0 if occurrence_ns is None else occurrence_ns + _OFFSET + 1
        by_job[job_id] = (
            (occurrence << _OCC_SHIFT)
            | (packed & _START_AND_DEF)
            | ((runs if runs <= _RUNS_MASK else _RUNS_MASK) << _RUNS_SHIFT)
        )

    def retain(self, keep: Callable[[str], bool]) -> None:
        """Forget the schedules of the jobs ``keep`` says no to (after a replay).

        ``keep`` is called once per scheduled job: a C-level ``__contains__`` (of a
        dict of the job ids) keeps this cheap for a million of them.
        """
        by_job = self._by_job
        for job_id in list(filterfalse(keep, by_job)):
            del by_job[job_id]
            self._compiled.pop(job_id, None)

    def frozen(self) -> tuple[dict[str, int], list[tuple[str, str, int]]]:
        """A copy of the packed state, for ``entries`` to read in another thread."""
        return dict(self._by_job), list(self._definitions.list)

    def ids(self, prefix: str = "") -> list[str]:
        """The scheduled job ids starting with ``prefix``, sorted."""
        return sorted(j for j in self._by_job if j.startswith(prefix))

    def options(self, rec: Recurrence) -> Options:
        """The job's options (parsed once per distinct schedule)."""
        index = rec._packed & _DEF_MASK
        cache = self._options
        options = cache.get(index)
        if options is None:
            if len(cache) >= COMPILED_CACHE:  # bounded: objects the collector walks
                del cache[next(iter(cache))]
            options = cache[index] = parse_options(self._definitions.options(index).split())
        return options

    def compiled(self, rec: Recurrence) -> Schedule:
        """The job's compiled schedule (kept for recently used jobs)."""
        job_id = rec.job_id
        schedule = self._compiled.get(job_id)
        if schedule is None:
            d = rec.definition
            schedule = compile_schedule(d.text, self.options(rec), self._now_ns(), rec.start_ns)
            self._remember(job_id, schedule)
        return schedule

    def _remember(self, job_id: str, schedule: Schedule) -> None:
        compiled = self._compiled
        if len(compiled) >= COMPILED_CACHE:
            del compiled[next(iter(compiled))]
        compiled[job_id] = schedule

    def advance(self, rec: Recurrence) -> int | None:
        """Count the occurrence that just fired and move to the next one (``None``: ended)."""
        runs = rec.runs + 1
        rec.runs = runs
        limit = self.options(rec).limit
        current = rec.occurrence_ns
        if current is None or (limit and runs >= limit):
            rec.occurrence_ns = None
        else:
            rec.occurrence_ns = self.compiled(rec).after(current)
        return rec.occurrence_ns

    def skip(self, rec: Recurrence) -> int | None:
        """Move past the current occurrence without counting it as a run."""
        current = rec.occurrence_ns
        rec.occurrence_ns = None if current is None else self.compiled(rec).after(current)
        return rec.occurrence_ns


def entries(
    state: tuple[dict[str, int], list[tuple[str, str, int]]], overrides: dict[str, RunState]
) -> Iterator[ScheduleSet | RunState]:
    """The ``ScheduleSet`` and ``RunState`` entries of a ``frozen`` copy (compaction).

    A job's ``RunState`` is left out when it would say what replaying its schedule says
    anyway (no run yet, at its start, first attempt); ``overrides`` replaces it.
    """
    by_job, definitions = state
    for job_id, packed in by_job.items():
        definition = definitions[packed & _DEF_MASK]
        start = ((packed >> _START_SHIFT) & _START_MASK) - _OFFSET
        yield ScheduleSet(job_id, definition_text(definition, start), definition[1], start)
        override = overrides.get(job_id)
        if override is not None:
            yield override
            continue
        runs = (packed >> _RUNS_SHIFT) & _RUNS_MASK
        occurrence = packed >> _OCC_SHIFT
        occurrence_ns = I64_MIN if occurrence == 0 else occurrence - _OFFSET - 1
        if runs or occurrence_ns != start:
            yield RunState(job_id, runs, occurrence_ns, 1, occurrence_ns)


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
