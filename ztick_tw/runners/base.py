"""The runner interface: how the scheduler hands a due job to whatever executes it."""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred
from zope.interface import Interface

from ztick_tw.model import RunnerSpec


@dataclass(frozen=True, slots=True)
class Execution:
    """One attempt to run one job with the runner a rule chose."""

    job_id: str
    execution_ns: int  # the due time the job was set for
    rule_id: str
    attempt: int  # 1 for the first run, raised when a run is retried
    spec: RunnerSpec
    fired_ns: int = 0  # when the scheduler handed it to the runner (reactor clock, ns)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an execution ended: ``success`` and, when it failed, a reason for the log.

    ``interrupted`` means the daemon itself ended the run because it is shutting down:
    the job did not get its chance, so it is left ``triggered`` and runs again at the
    next start (``[scheduler] interrupted_jobs``).
    """

    success: bool
    reason: str = ""
    interrupted: bool = False


class IRunner(Interface):
    """Executes one kind of runner spec, asynchronously, inside the reactor."""

    def run(execution: Execution) -> Deferred[Outcome]:
        """Start the execution now and fire with its ``Outcome``.

        The Deferred never errbacks: spawn errors, missing executables, timeouts and
        remote failures all become ``Outcome(False, reason)``.
        """

    def stop(grace: float) -> Deferred[None]:
        """Let running work finish for ``grace`` seconds, then end it (TERM, then KILL)."""
