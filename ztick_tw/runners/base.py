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
    #: Seconds this run may take (the rule's policy); ``None``: the runner's configured
    #: default (``run_timeout`` for process runners, ``[runners] timeout`` for network
    #: ones); ``0`` or less: no limit.
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    r"""How an execution ended: ``success`` and, when it failed, a reason for the log.

    ``interrupted`` means the daemon itself ended the run because it is shutting down:
    the job did not get its chance, so it is left ``triggered`` and runs again at the
    next start (``[scheduler] interrupted_jobs``).

    ``output``: what the run produced, for the history: the tail of a child's stdout and
    stderr as they came (interleaved, at most ``output_limit_bytes``); ``b"status N\n"``
    and the tail of an HTTP response body; the reply of redis (``b":1"``); ``b"confirmed"``
    or the broker's answer for amqp.  ``exit_code``: a child's exit status (``None`` when
    a signal ended it, or for network runners).  ``timed_out``: the run's timeout ended it.
    ``cancelled``: the run's Deferred was cancelled (``Outcome(False, "cancelled",
    cancelled=True)``).
    """

    success: bool
    reason: str = ""
    interrupted: bool = False
    output: bytes = b""
    exit_code: int | None = None
    timed_out: bool = False
    cancelled: bool = False


#: The reason of a cancelled run's outcome.
CANCELLED_REASON = "cancelled"


def cancelled_outcome(output: bytes = b"") -> Outcome:
    """What a cancelled run's Deferred fires with."""
    return Outcome(False, CANCELLED_REASON, output=output, cancelled=True)


def effective_timeout(execution: Execution, default: float) -> float:
    """The run's timeout in seconds: its own, else ``default``; ``0`` means no limit."""
    timeout = default if execution.timeout is None else execution.timeout
    return timeout if timeout > 0 else 0.0


def timeout_reason(seconds: float) -> str:
    """``timed out after 2s`` (``:g``: ``0.5s``, ``30s``)."""
    return f"timed out after {seconds:g}s"


class IRunner(Interface):
    """Executes one kind of runner spec, asynchronously, inside the reactor."""

    def run(execution: Execution) -> Deferred[Outcome]:
        """Start the execution now and fire with its ``Outcome``.

        The Deferred never errbacks: spawn errors, missing executables, timeouts and
        remote failures all become ``Outcome(False, reason)``.  ``execution.timeout``
        (else the runner's default) bounds the run: past it the run is ended (a process
        group gets SIGTERM, then SIGKILL after the kill grace; a request is aborted; a
        publish given up) and the outcome has ``timed_out=True``.

        The Deferred can be cancelled (``d.cancel()``): the run is ended as a timeout
        would end it, or dropped if it has not started yet (waiting for a spawn slot or
        a connection), and the Deferred fires at once with ``cancelled_outcome()`` (the output so
        far included); never ``CancelledError``.  Cancelling a Deferred that fired
        already does nothing.
        """

    def stop(grace: float) -> Deferred[None]:
        """Let running work finish for ``grace`` seconds, then end it (TERM, then KILL)."""
