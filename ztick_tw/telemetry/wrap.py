"""Wrappers that record telemetry without touching the transports or the scheduler.

``TracedOperations`` stands in for ``Operations`` (every transport takes it as is) and
``TracingRunner`` for an ``IRunner``; both only append an event to an ``EventQueue``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from ztick_tw.model import Rule
from ztick_tw.operations import (
    ANONYMOUS,
    Caller,
    Durable,
    JobQuery,
    JobState,
    Operations,
    ScheduleView,
)
from ztick_tw.runners.base import Execution, IRunner, Outcome
from ztick_tw.scheduler.timers import now_ns
from ztick_tw.telemetry.events import EventQueue, RequestEvent, RunEvent

T = TypeVar("T")


#: The operations ``TracedOperations`` traces (each a method of its own).
TRACED = (
    "set_job",
    "get_job",
    "query",
    "remove_job",
    "set_rule",
    "remove_rule",
    "list_rules",
    "set_schedule",
    "get_schedule",
    "list_schedules",
    "remove_schedule",
    "preview",
    "pause",
    "resume",
    "run_now",
    "history_of",
    "rule_policy",
    "stat",
)


def outcome_word(outcome: Outcome) -> str:
    """The ``outcome`` attribute of a run: success, failure, timeout, cancelled, interrupted."""
    if outcome.success:
        return "success"
    if outcome.cancelled:
        return "cancelled"
    if outcome.interrupted:
        return "interrupted"
    if outcome.timed_out:
        return "timeout"
    return "failure"


class TracedOperations(Operations):
    """``Operations`` that records a span per call (name, token, id, error class).

    It shares the wrapped instance's state: attributes it does not define (``scheduler``,
    ``reactor``, ``persistence`` ...) are the wrapped instance's, and each operation is
    the wrapped instance's own method, timed.  For ``run_now`` and ``history_of`` the span
    covers the call, not the Deferred it returns.
    """

    _inner: Operations
    _events: EventQueue[RequestEvent]
    _seconds: Callable[[], float]
    _paused_at: float | None

    def __init__(
        self, inner: Operations, events: EventQueue[RequestEvent], reactor: IReactorTime
    ) -> None:
        # Deliberately not Operations.__init__: the state is the wrapped instance's.
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_events", events)
        object.__setattr__(self, "_seconds", reactor.seconds)
        object.__setattr__(self, "_paused_at", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def _traced(
        self, operation: str, caller: Caller, ident: str, call: Callable[..., T], *args: Any
    ) -> T:
        # On the reactor for every request: kept to a length check and one append.
        events = self._events
        items = events.items
        if len(items) >= events.capacity:  # the worker is behind: pause tracing
            events.dropped += 1
            self.pause_tracing()
            return call(*args)
        seconds = self._seconds
        start = seconds()
        try:
            result = call(*args)
        except BaseException as e:
            items.append((operation, caller, ident, type(e).__name__, start, seconds()))
            raise
        items.append((operation, caller, ident, "", start, seconds()))
        return result

    # -- pausing: no cost at all while the worker is behind -----------------------------

    @property
    def tracing(self) -> bool:
        """False while tracing is paused (the request queue was full)."""
        return self._paused_at is None

    def pause_tracing(self) -> None:
        """Make every traced operation the wrapped instance's own method, until resumed.

        Even a length check per request costs a SET flood ~7%: while the queue is full
        the requests go straight through (neither traced nor counted one by one).
        """
        if self._paused_at is not None:
            return
        inner = self._inner
        for name in TRACED:
            object.__setattr__(self, name, getattr(inner, name))
        object.__setattr__(self, "_paused_at", self._seconds())
        self._events.pauses += 1

    def resume_tracing(self) -> None:
        """Trace again if paused and the queue is at most half full (on the reactor)."""
        paused_at = self._paused_at
        events = self._events
        if paused_at is None or len(events.items) > events.capacity // 2:
            return
        for name in TRACED:
            object.__delattr__(self, name)
        object.__setattr__(self, "_paused_at", None)
        events.paused_seconds += self._seconds() - paused_at

    @property
    def inner(self) -> Operations:
        """The wrapped operations."""
        inner: Operations = self._inner
        return inner

    def count_connections(self, count: Callable[[], int]) -> None:
        """The wrapped ``Operations.count_connections`` (no span)."""
        self.inner.count_connections(count)

    def set_job(
        self, caller: Caller, job_id: str, execution: int | Sequence[str]
    ) -> Durable | None:
        """``Operations.set_job``, with a span (``_traced`` inlined: SET is the hot path)."""
        events = self._events
        items = events.items
        if len(items) >= events.capacity:
            events.dropped += 1
            self.pause_tracing()
            return self._inner.set_job(caller, job_id, execution)
        seconds = self._seconds
        start = seconds()
        try:
            result = self._inner.set_job(caller, job_id, execution)
        except BaseException as e:
            items.append(("set_job", caller, job_id, type(e).__name__, start, seconds()))
            raise
        items.append(("set_job", caller, job_id, "", start, seconds()))
        return result

    def get_job(self, caller: Caller, job_id: str) -> JobState:
        """``Operations.get_job``, with a span."""
        return self._traced("get_job", caller, job_id, self._inner.get_job, caller, job_id)

    def query(self, caller: Caller, prefix: str = "") -> JobQuery:
        """``Operations.query``, with a span."""
        return self._traced("query", caller, prefix, self._inner.query, caller, prefix)

    def remove_job(self, caller: Caller, job_id: str) -> Durable | None:
        """``Operations.remove_job``, with a span."""
        return self._traced("remove_job", caller, job_id, self._inner.remove_job, caller, job_id)

    def set_rule(
        self,
        caller: Caller,
        rule_id: str,
        pattern: str,
        runner: str,
        args: Sequence[str] = (),
    ) -> Durable | None:
        """``Operations.set_rule``, with a span."""
        return self._traced(
            "set_rule",
            caller,
            rule_id,
            self._inner.set_rule,
            caller,
            rule_id,
            pattern,
            runner,
            args,
        )

    def remove_rule(self, caller: Caller, rule_id: str) -> Durable | None:
        """``Operations.remove_rule``, with a span."""
        return self._traced(
            "remove_rule", caller, rule_id, self._inner.remove_rule, caller, rule_id
        )

    def list_rules(self, caller: Caller) -> list[Rule]:
        """``Operations.list_rules``, with a span."""
        return self._traced("list_rules", caller, "", self._inner.list_rules, caller)

    def set_schedule(
        self, caller: Caller, job_id: str, text: str, options: Sequence[str] = ()
    ) -> tuple[int, Durable | None]:
        """``Operations.set_schedule``, with a span."""
        return self._traced(
            "set_schedule",
            caller,
            job_id,
            self._inner.set_schedule,
            caller,
            job_id,
            text,
            options,
        )

    def get_schedule(self, caller: Caller, job_id: str) -> ScheduleView:
        """``Operations.get_schedule``, with a span."""
        return self._traced(
            "get_schedule", caller, job_id, self._inner.get_schedule, caller, job_id
        )

    def list_schedules(self, caller: Caller, prefix: str = "") -> list[ScheduleView]:
        """``Operations.list_schedules``, with a span."""
        return self._traced(
            "list_schedules", caller, prefix, self._inner.list_schedules, caller, prefix
        )

    def remove_schedule(self, caller: Caller, job_id: str) -> Durable | None:
        """``Operations.remove_schedule``, with a span."""
        return self._traced(
            "remove_schedule", caller, job_id, self._inner.remove_schedule, caller, job_id
        )

    def preview(
        self, caller: Caller, text: str, count: int = 5, options: Sequence[str] = ()
    ) -> list[tuple[int, str]]:
        """``Operations.preview``, with a span."""
        return self._traced(
            "preview", caller, "", self._inner.preview, caller, text, count, options
        )

    def pause(self, caller: Caller, job_id: str) -> Durable | None:
        """``Operations.pause``, with a span."""
        return self._traced("pause", caller, job_id, self._inner.pause, caller, job_id)

    def resume(self, caller: Caller, job_id: str) -> Durable | None:
        """``Operations.resume``, with a span."""
        return self._traced("resume", caller, job_id, self._inner.resume, caller, job_id)

    def run_now(self, caller: Caller, job_id: str) -> Deferred[None]:
        """``Operations.run_now``, with a span."""
        return self._traced("run_now", caller, job_id, self._inner.run_now, caller, job_id)

    def history_of(self, caller: Caller, job_id: str, count: int = 10) -> Deferred[list[Any]]:
        """``Operations.history_of``, with a span."""
        return self._traced(
            "history_of", caller, job_id, self._inner.history_of, caller, job_id, count
        )

    def rule_policy(
        self, caller: Caller, rule_id: str, words: Sequence[str] = ()
    ) -> tuple[list[str], Durable | None]:
        """``Operations.rule_policy``, with a span."""
        return self._traced(
            "rule_policy", caller, rule_id, self._inner.rule_policy, caller, rule_id, words
        )

    def stat(self, caller: Caller = ANONYMOUS) -> list[tuple[str, str | int]]:
        """``Operations.stat``, with a span."""
        return self._traced("stat", caller, "", self._inner.stat, caller)


@implementer(IRunner)
class TracingRunner:
    """An ``IRunner`` that records a span per run around another runner.

    ``run`` returns the inner runner's own Deferred with one callback added that passes
    the outcome through untouched, so ``.cancel()`` reaches the inner Deferred.
    """

    def __init__(
        self, inner: IRunner, events: EventQueue[RunEvent], reactor: IReactorTime
    ) -> None:
        self.inner = inner
        self._events = events
        self._clock = reactor

    def run(self, execution: Execution) -> Deferred[Outcome]:
        """Run ``execution`` on the inner runner; its Deferred, recording the run."""
        start = now_ns(self._clock)
        d: Deferred[Outcome] = self.inner.run(execution)

        def record(outcome: Outcome) -> Outcome:
            fired = execution.fired_ns
            self._events.put(
                RunEvent(
                    execution.job_id,
                    execution.rule_id,
                    execution.spec.kind.wire,
                    execution.attempt,
                    outcome_word(outcome),
                    start,
                    now_ns(self._clock),
                    fired - execution.execution_ns if fired else -1,
                )
            )
            return outcome

        d.addCallback(record)
        return d

    def stop(self, grace: float) -> Deferred[None]:
        """The inner runner's ``stop``."""
        d: Deferred[None] = self.inner.stop(grace)
        return d

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
