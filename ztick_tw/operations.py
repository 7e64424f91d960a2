"""The operations every transport offers: one place that knows what a request means.

A transport (the line protocol today, a REST API next) frames bytes, keeps answers in
order and applies back-pressure.  What a request *means* lives here: who may touch which
ids (``Caller`` and its namespace), which arguments are valid, what is not found, what the
answer is, and when a change is durable.  Each method of :class:`Operations` takes the
caller and typed arguments and returns a value, or raises an :class:`OperationError`
whose message is a human reason:

=================  ==========================  ===========================
exception          line protocol               REST (next issue)
=================  ==========================  ===========================
``Invalid``        ``ID ERROR`` + info log     400
``Denied``         ``ID ERROR`` + info log     403
``NotFound``       ``ID ERROR`` + debug log    404
``Unavailable``    ``ID ERROR`` + error log    503
=================  ==========================  ===========================

Changes return a :class:`Durable` handle (or ``None`` when there is nothing to wait
for); the store's ``Commit`` is one, so transports never import ``ztick_tw.store``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from ztick_tw.arguments import (
    CommandError,
    check_identifier,
    parse_execution,
    parse_rule,
)
from ztick_tw.auth import Token
from ztick_tw.model import I64_MAX, I64_MIN, JobStatus, Policy, Rule, ShownStatus
from ztick_tw.scheduler.core import (
    NoRule,
    NotScheduled,
    Scheduler,
    UnknownJob,
    UnknownRule,
)
from ztick_tw.scheduler.timers import now_ns
from ztick_tw.schedules import (
    Schedule,
    ScheduleError,
    compile_schedule,
    parse_options,
    parse_policy,
    render_policy,
)
from ztick_tw.store.base import StoreError

# -- errors ------------------------------------------------------------------------------


class OperationError(Exception):
    """A request that cannot be carried out; ``str(error)`` is the reason, for the log."""


class Invalid(OperationError):
    """An argument is wrong: the reason says which and why."""


class Denied(OperationError):
    """The request touches ids outside the caller's namespace."""


class NotFound(OperationError):
    """The job or rule named in the request does not exist."""


class Unavailable(OperationError):
    """The change cannot be persisted (the store refused it); nothing was acknowledged."""


# -- who asks ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking: an authenticated token, or anonymous (``token is None``, auth off).

    An anonymous caller may touch every id; a token only those inside its namespace.
    """

    token: Token | None = None

    def allows(self, identifier: str) -> bool:
        """Whether ``identifier`` (a job id, rule id or pattern) is inside the namespace."""
        token = self.token
        return token is None or token.allows(identifier)

    def check(self, *identifiers: str) -> None:
        """Raise ``Denied`` unless every identifier is inside the namespace."""
        token = self.token
        if token is None:
            return
        for identifier in identifiers:
            if not token.allows(identifier):
                raise Denied(
                    f"{identifier!r} is outside namespace {token.namespace!r}"
                    f" of token {token.name}"
                )


#: The caller when auth is off.
ANONYMOUS = Caller()


# -- durability --------------------------------------------------------------------------


class Durable(Protocol):
    """A change on its way to the disk: resolved once, on disk or failed.

    Why a light interface and not a ``Deferred`` per change: the line protocol's SET
    costs about 5 µs of daemon CPU in all (``bench``: ~190,000 SET/s on one core), and
    wrapping each change in a ``Deferred`` that fires from the commit costs about
    2.3 µs more (measured with ``timeit``: a commit with one subscriber 0.39 µs, the same
    feeding a ``Deferred`` with one callback 2.68 µs), a loss of some 30% of SET
    throughput.  The store's group ``Commit`` already is such a handle (shared by every
    change of one reactor turn), and it satisfies this protocol as it is, so a change
    costs nothing here.  A transport that prefers Deferreds calls :func:`when_durable`.
    """

    @property
    def done(self) -> bool:
        """Whether the change has been resolved (on disk, or failed to get there)."""

    @property
    def error(self) -> BaseException | None:
        """Why the change failed to reach the disk, once ``done``; ``None`` if it did."""

    def subscribe(self, callback: Callable[[Durable], None]) -> None:
        """Call ``callback(handle)`` once, when resolved (at once if it is)."""


def when_durable(handle: Durable | None) -> Deferred[None]:
    """A ``Deferred`` that fires when ``handle`` is on disk, or fails with ``Unavailable``.

    ``None`` (nothing to wait for) gives a fired ``Deferred``.
    """
    if handle is None:
        return succeed(None)
    if handle.done:
        return _settled(handle)
    d: Deferred[None] = Deferred()

    def resolved(h: Durable) -> None:
        _settled(h).chainDeferred(d)

    handle.subscribe(resolved)
    return d


def _settled(handle: Durable) -> Deferred[None]:
    error = handle.error
    if error is None:
        return succeed(None)
    return fail(Unavailable(f"cannot persist: {error}"))


# -- results -----------------------------------------------------------------------------

#: ``(status, execution_ns)`` of one job (``paused`` is shown, never stored).
JobState = tuple[ShownStatus, int]

#: ``scan(prefix, after, limit)``: up to ``limit`` jobs after ``after``, in id order.
Scan = Callable[[str, str | None, int], Sequence[tuple[str, ShownStatus, int]]]

#: PREVIEW lists at most this many instants.
PREVIEW_MAX = 1000


@dataclass(frozen=True, slots=True)
class ScheduleView:
    """One scheduled job as ``SCHEDULE GET`` and ``LISTSCHEDULES`` show it."""

    job_id: str
    text: str
    options: list[str]  # every option, ``key=value``, effective values
    next_ns: int | None  # ``None``: the schedule has ended
    runs: int
    paused: bool


class HistoryReader(Protocol):
    """Where ``HISTORY`` reads from (``ztick_tw.history.History``)."""

    def read(self, job_id: str, n: int) -> Deferred[list[Any]]:
        """The job's last ``n`` runs, newest first."""


@dataclass(frozen=True, slots=True)
class JobQuery:
    """The jobs a caller's query matches, read a bounded page at a time.

    Nothing is read until asked: :meth:`page` resumes after the last id a transport
    has sent, so an answer over a million jobs never sits in memory at once (the line
    protocol feeds ``scan`` to its ``QueryStream``; REST can page with ``after``).
    ``scan`` is ``None`` when nothing can match (a prefix outside the namespace).
    """

    prefix: str
    scan: Scan | None

    def page(self, after: str | None, limit: int) -> Sequence[tuple[str, ShownStatus, int]]:
        """Up to ``limit`` matching jobs whose id sorts after ``after``, in id order."""
        if self.scan is None:
            return []
        return self.scan(self.prefix, after, limit)


# -- the operations ----------------------------------------------------------------------


class Operations:
    """Every operation on the scheduler, with its namespace rules and validation.

    One instance serves every transport.  ``persistence``, ``framerate``,
    ``compression``, ``auth_enabled`` and ``tls_enabled`` are what STAT reports (the two
    callables are asked at each STAT); each transport adds its live connection count
    with :meth:`count_connections`.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        reactor: IReactorTime,
        *,
        persistence: str,
        framerate: int = 512,
        compression: Callable[[], str] = lambda: "idle",
        auth_enabled: Callable[[], bool] = lambda: False,
        tls_enabled: bool = False,
        history: HistoryReader | None = None,
        history_runs: int = 20,
    ) -> None:
        self.scheduler = scheduler
        self.reactor = reactor
        self.persistence = persistence
        self.framerate = framerate
        self.compression = compression
        self.auth_enabled = auth_enabled
        self.tls_enabled = tls_enabled
        self.history = history
        self.history_runs = history_runs
        self.started_ns = now_ns(reactor)
        self._connection_counts: list[Callable[[], int]] = []

    def count_connections(self, count: Callable[[], int]) -> None:
        """Add a transport's live connection count to STAT's ``connections``."""
        self._connection_counts.append(count)

    def connections(self) -> int:
        """Client connections open now, every transport's together."""
        return sum(count() for count in self._connection_counts)

    # -- jobs ------------------------------------------------------------------------

    def set_job(
        self, caller: Caller, job_id: str, execution: int | Sequence[str]
    ) -> Durable | None:
        """Create or replace a job, due at ``execution``.

        ``execution`` is nanoseconds since the epoch, or the words of a time as ztick
        reads them (``["<ns>"]``, ``["YYYY-MM-DD", "HH:MM:SS"]`` or
        ``["YYYY-MM-DD HH:MM:SS"]``, UTC).  Raises ``Invalid``, ``Denied``,
        ``Unavailable``.
        """
        try:
            if isinstance(execution, int):
                if not I64_MIN <= execution <= I64_MAX:
                    raise CommandError(f"timestamp {execution} is outside the signed 64-bit range")
                execution_ns = execution
            else:
                execution_ns = parse_execution(execution)
            check_identifier("job identifier", job_id)
        except CommandError as e:
            raise Invalid(str(e)) from None
        if caller.token is not None:
            caller.check(job_id)
        try:
            return self.scheduler.set_job(job_id, execution_ns)
        except StoreError as e:
            raise Unavailable(str(e)) from None

    def get_job(self, caller: Caller, job_id: str) -> JobState:
        """``(status, execution_ns)`` of a job.  Raises ``Denied``, ``NotFound``."""
        if caller.token is not None:
            caller.check(job_id)
        found = self.scheduler.get_job(job_id)
        if found is None:
            raise NotFound(f"no job {job_id!r}")
        return found

    def query(self, caller: Caller, prefix: str = "") -> JobQuery:
        """The jobs whose id starts with ``prefix``, as far as the caller may see.

        A prefix wider than the caller's namespace is narrowed to it; one outside it
        matches nothing.  Never raises.
        """
        narrowed = self._narrow(caller, prefix)
        if narrowed is None:
            return JobQuery(prefix, None)
        return JobQuery(narrowed, self.scheduler.scan)

    def remove_job(self, caller: Caller, job_id: str) -> Durable | None:
        """Delete a job.  Raises ``Denied``, ``NotFound``, ``Unavailable``."""
        return self._change_job(caller, job_id, self.scheduler.remove_job)

    def _change_job(
        self, caller: Caller, job_id: str, change: Callable[[str], Durable | None]
    ) -> Durable | None:
        """Apply ``change`` to an existing job the caller may touch; errors mapped.

        ``Denied`` outside the namespace; ``NotFound`` for no such job (or no schedule);
        ``Unavailable`` when the store refuses the change.
        """
        if caller.token is not None:
            caller.check(job_id)
        try:
            return change(job_id)
        except UnknownJob:
            raise NotFound(f"no job {job_id!r}") from None
        except NotScheduled:
            raise NotFound(f"job {job_id!r} has no schedule") from None
        except StoreError as e:
            raise Unavailable(str(e)) from None

    @staticmethod
    def _narrow(caller: Caller, prefix: str) -> str | None:
        """A listing's prefix narrowed to the caller's namespace (``None``: matches nothing)."""
        token = caller.token
        if token is not None and not token.allows(prefix):
            if not token.namespace.startswith(prefix):
                return None
            return token.namespace
        return prefix

    # -- rules -----------------------------------------------------------------------

    def set_rule(
        self,
        caller: Caller,
        rule_id: str,
        pattern: str,
        runner: str,
        args: Sequence[str] = (),
    ) -> Durable | None:
        """Create or replace a rule: jobs whose id starts with ``pattern`` run ``runner``.

        ``runner`` is the runner's word (``shell``, ``direct``, ``http``, ``awf``,
        ``amqp``, ``redis``) and ``args`` its arguments in ``RULE SET`` order, so the
        line protocol passes its words and REST the fields of a JSON body, through the
        same validation.  A caller may neither use a pattern outside its namespace nor
        replace a rule whose pattern is outside it.  Raises ``Invalid``, ``Denied``,
        ``Unavailable``.
        """
        if caller.token is not None:
            caller.check(rule_id, pattern)
            self._check_owned_rule(caller, rule_id)
        try:
            rule = parse_rule(rule_id, pattern, runner, args)
        except CommandError as e:
            raise Invalid(str(e)) from None
        try:
            return self.scheduler.set_rule(rule)
        except StoreError as e:
            raise Unavailable(str(e)) from None

    def remove_rule(self, caller: Caller, rule_id: str) -> Durable | None:
        """Delete a rule (its jobs stay).  Raises ``Denied``, ``NotFound``, ``Unavailable``."""
        if caller.token is not None:
            caller.check(rule_id)
            self._check_owned_rule(caller, rule_id)
        try:
            return self.scheduler.remove_rule(rule_id)
        except UnknownRule:
            raise NotFound(f"no rule {rule_id!r}") from None
        except StoreError as e:
            raise Unavailable(str(e)) from None

    def list_rules(self, caller: Caller) -> list[Rule]:
        """The rules whose id and pattern both lie inside the caller's namespace."""
        rules: Iterable[Rule] = self.scheduler.list_rules()
        if caller.token is None:
            return list(rules)
        return [r for r in rules if caller.allows(r.id) and caller.allows(r.pattern)]

    def _check_owned_rule(self, caller: Caller, rule_id: str) -> None:
        """A tenant may not replace or remove a rule whose pattern is outside its namespace.

        (Such a rule, made by a wider token with an id inside this namespace, is not
        even listed to this tenant.)
        """
        existing = self.scheduler.rules.get(rule_id)
        if existing is not None:
            caller.check(existing.pattern)

    # -- schedules (SPEC §8) -----------------------------------------------------------

    def set_schedule(
        self, caller: Caller, job_id: str, text: str, options: Sequence[str] = ()
    ) -> tuple[int, Durable | None]:
        """Make the job recur on ``text`` with ``options`` (``key=value`` words).

        Returns when it will first fire and the change's durability handle.  Raises
        ``Invalid`` (the reason says what and where), ``Denied``, ``Unavailable``.
        """
        try:
            check_identifier("job identifier", job_id)
        except CommandError as e:
            raise Invalid(str(e)) from None
        if caller.token is not None:
            caller.check(job_id)
        schedule = self._compile(text, options)
        try:
            return self.scheduler.set_schedule(job_id, schedule)
        except ValueError as e:
            raise Invalid(str(e)) from None
        except StoreError as e:
            raise Unavailable(str(e)) from None

    def _compile(self, text: str, options: Sequence[str]) -> Schedule:
        try:
            return compile_schedule(text, parse_options(options), now_ns(self.reactor))
        except ScheduleError as e:
            raise Invalid(str(e)) from None

    def get_schedule(self, caller: Caller, job_id: str) -> ScheduleView:
        """The job's schedule.  Raises ``Denied``, ``NotFound`` (no job, or no schedule)."""
        if caller.token is not None:
            caller.check(job_id)
        if self.scheduler.get_job(job_id) is None:
            raise NotFound(f"no job {job_id!r}")
        try:
            return self._view(job_id)
        except NotScheduled:
            raise NotFound(f"job {job_id!r} has no schedule") from None

    def _view(self, job_id: str) -> ScheduleView:
        s = self.scheduler
        rec, schedule = s.get_schedule(job_id)
        return ScheduleView(
            job_id,
            rec.definition.text,
            schedule.options.render(),
            s.next_ns(job_id, rec),
            rec.runs,
            job_id in s.paused,
        )

    def list_schedules(self, caller: Caller, prefix: str = "") -> list[ScheduleView]:
        """The scheduled jobs whose id starts with ``prefix``, filtered like ``QUERY``."""
        narrowed = self._narrow(caller, prefix)
        if narrowed is None:
            return []
        return [self._view(job_id) for job_id in self.scheduler.recurrences.ids(narrowed)]

    def remove_schedule(self, caller: Caller, job_id: str) -> Durable | None:
        """Stop the job recurring (it stays, a one-shot).  Raises ``Denied``, ``NotFound``."""
        return self._change_job(caller, job_id, self.scheduler.remove_schedule)

    def preview(
        self, caller: Caller, text: str, count: int = 5, options: Sequence[str] = ()
    ) -> list[tuple[int, str]]:
        """The schedule's first ``count`` instants: ``(ns, ISO 8601 with offset)``.

        Allowed to every caller (it touches no job).  Raises ``Invalid``.
        """
        if not 1 <= count <= PREVIEW_MAX:
            raise Invalid(f"count {count} is outside 1-{PREVIEW_MAX}")
        schedule = self._compile(text, options)
        return [(ns, schedule.iso(ns)) for ns in schedule.preview(count)]

    # -- operating jobs (SPEC §9) --------------------------------------------------------

    def pause(self, caller: Caller, job_id: str) -> Durable | None:
        """The job never fires until resumed.  Raises ``Denied``, ``NotFound``."""
        return self._change_job(caller, job_id, self.scheduler.pause)

    def resume(self, caller: Caller, job_id: str) -> Durable | None:
        """The job fires again; missed time follows its misfire policy."""
        return self._change_job(caller, job_id, self.scheduler.resume)

    def run_now(self, caller: Caller, job_id: str) -> Deferred[None]:
        """One extra run now; the Deferred fires once it has started.

        Raises ``Denied``, ``NotFound``, ``Invalid`` (no rule matches the job).
        """
        if caller.token is not None:
            caller.check(job_id)
        try:
            return self.scheduler.run_now(job_id)
        except UnknownJob:
            raise NotFound(f"no job {job_id!r}") from None
        except NoRule as e:
            raise Invalid(str(e)) from None

    def history_of(self, caller: Caller, job_id: str, count: int = 10) -> Deferred[list[Any]]:
        """The job's last ``count`` runs, newest first (``RunRecord``s).

        Raises ``Denied``, ``NotFound``, ``Invalid`` (count outside 1-``[history] runs``),
        ``Unavailable`` (no history kept).
        """
        if caller.token is not None:
            caller.check(job_id)
        if not 1 <= count <= max(self.history_runs, 1):
            raise Invalid(f"count {count} is outside 1-{self.history_runs} ([history] runs)")
        if self.scheduler.get_job(job_id) is None:
            raise NotFound(f"no job {job_id!r}")
        if self.history is None:
            raise Unavailable("no run history is kept")
        return self.history.read(job_id, count)

    def rule_policy(
        self, caller: Caller, rule_id: str, words: Sequence[str] = ()
    ) -> tuple[list[str], Durable | None]:
        """Set the keys given of the rule's policy (none: just show it).

        Returns the effective policy as ``key=value`` words.  Raises ``Invalid``,
        ``Denied``, ``NotFound``, ``Unavailable``.
        """
        if caller.token is not None:
            caller.check(rule_id)
            self._check_owned_rule(caller, rule_id)
        s = self.scheduler
        if s.rules.get(rule_id) is None:
            raise NotFound(f"no rule {rule_id!r}")
        commit = None
        if words:
            try:
                policy = parse_policy(words, s.policies.get(rule_id) or Policy())
            except ScheduleError as e:
                raise Invalid(str(e)) from None
            try:
                commit = s.set_policy(rule_id, policy)
            except UnknownRule:
                raise NotFound(f"no rule {rule_id!r}") from None
            except StoreError as e:
                raise Unavailable(str(e)) from None
        return render_policy(s.policy_for(rule_id), s.policy_defaults), commit

    # -- STAT ------------------------------------------------------------------------

    def stat(self, caller: Caller = ANONYMOUS) -> list[tuple[str, str | int]]:
        """The STAT keys and values: ztick's keys first, in ztick's order, then ztick-tw's.

        Every caller sees the same figures (they are counts, not ids).
        """
        s = self.scheduler
        jobs = s.jobs
        p50, p99 = s.lag.percentiles(0.50, 0.99)
        return [
            ("uptime_ns", now_ns(self.reactor) - self.started_ns),
            ("connections", self.connections()),
            ("jobs_total", len(jobs)),
            ("jobs_planned", jobs.count(JobStatus.PLANNED)),
            ("jobs_triggered", jobs.count(JobStatus.TRIGGERED)),
            ("jobs_executed", jobs.count(JobStatus.EXECUTED)),
            ("jobs_failed", jobs.count(JobStatus.FAILED)),
            ("rules_total", len(s.rules)),
            ("executions_pending", s.executions_pending),
            ("executions_inflight", s.executions_inflight),
            ("persistence", self.persistence),
            ("compression", self.compression()),
            ("auth_enabled", int(self.auth_enabled())),
            ("tls_enabled", int(self.tls_enabled)),
            ("framerate", self.framerate),
            ("trigger_lag_p50_us", p50),
            ("trigger_lag_p99_us", p99),
            ("trigger_lag_max_us", s.lag.maximum()),
            ("jobs_paused", s.jobs_paused),
            ("schedules_total", len(s.recurrences)),
            ("occurrences_missed", s.counters.occurrences_missed),
            ("runs_retried", s.counters.runs_retried),
            ("runs_timed_out", s.counters.runs_timed_out),
        ]
