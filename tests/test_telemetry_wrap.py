"""The telemetry wrappers and the bounded queue, without an exporter."""

from __future__ import annotations

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from tests.helpers import FakeRunner, all_kinds, make_clock
from ztick_tw.auth import Token
from ztick_tw.config import TelemetryConfig
from ztick_tw.model import ShellSpec
from ztick_tw.operations import Caller, NotFound, Operations
from ztick_tw.runners.base import Execution, IRunner, Outcome
from ztick_tw.runners.process import ProcessOptions, ShellRunner
from ztick_tw.scheduler.core import Scheduler
from ztick_tw.store.memory import MemoryStore
from ztick_tw.telemetry import EventQueue, RequestEvent, RunEvent, TelemetryService
from ztick_tw.telemetry.wrap import TracedOperations, TracingRunner

ON = TelemetryConfig(enabled=True, endpoint="http://127.0.0.1:9", flush_interval_ms=1000)


def _operations() -> Operations:
    clock = make_clock()
    scheduler = Scheduler(clock, MemoryStore(), all_kinds(FakeRunner()))
    scheduler.start()
    return Operations(scheduler, clock, persistence="memory")


class QueueTests(unittest.TestCase):
    def test_full_queue_drops_and_counts(self) -> None:
        """Past its capacity the queue refuses events and counts them; it never grows."""
        q: EventQueue[RequestEvent] = EventQueue(capacity=3)
        results = [q.put(("get_job", Caller(), str(i), "", 0.0, 1.0)) for i in range(5)]
        assert results == [True, True, True, False, False]
        assert (len(q), q.accepted, q.dropped) == (3, 3, 2)
        assert [e[2] for e in q.drain(10)] == ["0", "1", "2"]
        assert len(q) == 0


class TracedOperationsTests(unittest.TestCase):
    def test_span_event_per_call_with_token_id_and_error(self) -> None:
        """Each call appends one event: operation, token name, id, and the error's class."""
        svc = TelemetryService(ON, make_clock())
        ops = svc.wrap_operations(_operations())
        assert isinstance(ops, TracedOperations)
        alice = Caller(Token("alice", "app."))
        ops.set_rule(alice, "app.r", "app.", "shell", ["true"])
        ops.set_job(alice, "app.j", 1_800_000_000_000_000_000)
        assert ops.get_job(alice, "app.j")[1] == 1_800_000_000_000_000_000
        with pytest.raises(NotFound):
            ops.get_job(alice, "app.missing")
        events = svc.requests.drain(100)
        assert [(op, who, ident, error) for op, who, ident, error, _, _ in events] == [
            ("set_rule", alice, "app.r", ""),
            ("set_job", alice, "app.j", ""),
            ("get_job", alice, "app.j", ""),
            ("get_job", alice, "app.missing", "NotFound"),
        ]
        assert all(start <= end for *_, start, end in events)

    def test_full_queue_pauses_tracing_until_room(self) -> None:
        """A full queue pauses tracing; the reactor's check resumes it at half full.

        While paused the operations are the wrapped instance's own methods (no cost).
        """
        clock = make_clock()
        svc = TelemetryService(ON, clock, capacity=4)
        inner = _operations()
        ops = svc.wrap_operations(inner)
        for i in range(6):
            ops.set_job(Caller(), f"j.{i}", 1_800_000_000_000_000_000)
        assert svc.traced is not None and not svc.traced.tracing
        assert ops.set_job.__self__ is inner  # type: ignore[attr-defined]
        assert (len(svc.requests), svc.requests.dropped, svc.requests.pauses) == (4, 1, 1)
        svc.requests.drain(1)
        svc.check_room()
        assert not svc.traced.tracing  # 3 of 4 still queued: more than half
        svc.requests.drain(1)
        clock.advance(2.5)
        svc.check_room()
        assert svc.traced.tracing
        assert svc.requests.paused_seconds == 2.5
        ops.get_job(Caller(), "j.5")
        assert [e[0] for e in svc.requests.drain(10)] == ["set_job", "set_job", "get_job"]
        assert dict(inner.stat())["jobs_total"] == 6

    def test_shares_the_wrapped_state(self) -> None:
        """The proxy reads and counts connections through the wrapped operations."""
        inner = _operations()
        ops = TelemetryService(ON, make_clock()).wrap_operations(inner)
        assert ops.scheduler is inner.scheduler
        ops.count_connections(lambda: 7)
        assert dict(inner.stat())["connections"] == 7
        assert dict(ops.stat())["connections"] == 7

    def test_disabled_wraps_nothing(self) -> None:
        """With ``enabled = false`` the wrappers hand back what they were given."""
        svc = TelemetryService(TelemetryConfig(), make_clock())
        inner = _operations()
        runner = FakeRunner()
        assert svc.wrap_operations(inner) is inner
        assert svc.wrap_runner(runner) is runner


class TracingRunnerTests(unittest.TestCase):
    def test_provides_irunner(self) -> None:
        """The wrapper is an ``IRunner`` (run, stop) and passes ``stop`` to the inner one."""
        inner = FakeRunner()
        runner = TracingRunner(inner, EventQueue(), make_clock())
        assert verifyObject(IRunner, runner)
        runner.stop(2.5)
        assert inner.stops == [2.5]

    def test_result_passes_through_and_event_recorded(self) -> None:
        """The inner Deferred is returned; its outcome is untouched; one run event is kept."""
        events: EventQueue[RunEvent] = EventQueue()
        inner = FakeRunner()
        runner = TracingRunner(inner, events, make_clock())
        execution = Execution("j", 100, "r", 2, ShellSpec("true"), fired_ns=130)
        d = runner.run(execution)
        assert d is inner.runs[0][1]
        outcome = Outcome(False, "exit status 3", exit_code=3)
        got: list[Outcome] = []
        d.addCallback(got.append)
        inner.runs[0][1].callback(outcome)
        assert got[0] is outcome
        [event] = events.drain(10)
        assert isinstance(event, RunEvent)
        assert (event.job_id, event.rule_id, event.runner) == ("j", "r", "shell")
        assert (event.attempt, event.outcome) == (2, "failure")
        assert event.lag_ns == 30

    async def test_cancel_reaches_a_real_child(self) -> None:
        """Cancelling the wrapped run's Deferred ends a real ``sleep`` child: ``cancelled``."""
        events: EventQueue[RunEvent] = EventQueue()
        shell = ShellRunner(reactor, "/bin/sh", ["-c"], ProcessOptions(kill_grace=1.0))
        self.addCleanup(shell.stop, 0)
        runner: IRunner = TracingRunner(shell, events, reactor)
        d: Deferred[Outcome] = runner.run(Execution("j", 0, "r", 1, ShellSpec("sleep 30")))
        await deferLater(reactor, 0.2, lambda: None)
        d.cancel()
        outcome = await d
        assert outcome.cancelled
        [event] = events.drain(10)
        assert isinstance(event, RunEvent)
        assert event.outcome == "cancelled"
        for _ in range(200):  # the child is gone (the runner no longer counts it)
            if shell.running == 0:
                break
            await deferLater(reactor, 0.025, lambda: None)
        assert shell.running == 0
