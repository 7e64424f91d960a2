"""The stand-in runner for the runner kinds this version does not implement."""

from __future__ import annotations

from typing import TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from ztick_tw.model import AmqpSpec, HttpSpec, RedisSpec, RunnerKind, RunnerSpec
from ztick_tw.runners.base import Execution, IRunner, Outcome
from ztick_tw.runners.unavailable import UnavailableRunner

T = TypeVar("T")


def _fired(d: Deferred[T]) -> T:
    """The result of an already-fired Deferred (fails the test if it has not fired)."""
    results: list[T] = []
    failures: list[Failure] = []
    d.addCallbacks(results.append, failures.append)
    assert not failures, failures
    assert results, "the Deferred has not fired"
    return results[0]


def test_provides_irunner() -> None:
    """UnavailableRunner provides the IRunner interface."""
    assert verifyObject(IRunner, UnavailableRunner(RunnerKind.HTTP))


def test_run_fails_at_once_naming_the_kind() -> None:
    """run() returns a fired Deferred with a failed Outcome that names the runner word."""
    cases: list[tuple[RunnerKind, RunnerSpec]] = [
        (RunnerKind.HTTP, HttpSpec("GET", "http://example.invalid/")),
        (RunnerKind.AMQP, AmqpSpec("amqp://localhost", "ex", "key")),
        (RunnerKind.REDIS, RedisSpec("redis://localhost", "PUBLISH", "chan")),
    ]
    for kind, spec in cases:
        runner = UnavailableRunner(kind)
        outcome = _fired(runner.run(Execution("job.1", 1, "rule.1", 1, spec)))
        assert outcome == Outcome(
            False, f"the {kind.wire} runner is not implemented in this version of ztick-tw"
        )
        assert runner.running == 0


def test_http_reason_text() -> None:
    """The reason for http reads exactly as documented."""
    runner = UnavailableRunner(RunnerKind.HTTP)
    spec = HttpSpec("POST", "https://example.invalid/hook")
    outcome = _fired(runner.run(Execution("j", 0, "r", 1, spec)))
    assert outcome == Outcome(
        False, "the http runner is not implemented in this version of ztick-tw"
    )


def test_stop_fires_at_once() -> None:
    """stop() has nothing to wait for and fires immediately with None."""
    assert _fired(UnavailableRunner(RunnerKind.AMQP).stop(5.0)) is None
