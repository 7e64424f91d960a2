"""One child process of the shell, direct and awf runners: ``_Run``, its ``ProcessProtocol``.

It collects the last ``output_limit`` bytes of stdout and stderr together (``_Tail``),
ends the run at its timeout (TERM to the process group, KILL after the grace), and turns
the exit into an ``Outcome`` (``_describe_exit``; an exec that failed in the child is
told by ``_exec_failure``).  ``ProcessRunner`` (``process.py``) plans, queues and starts
these.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ztick_tw.model import RunnerKind
from ztick_tw.runners.base import (
    Execution,
    Outcome,
    effective_timeout,
    timeout_reason,
)

#: Why a run was ended when the runner was stopped (the daemon is shutting down).
SHUTDOWN_CAUSE = "stopped at shutdown"


@dataclass(frozen=True, slots=True)
class ProcessOptions:
    """How process runners treat their children.

    ``output_limit_bytes``: the last this many bytes of stdout and stderr (together, as
    they came) are kept (and logged) per run; the rest is read and counted but dropped.
    ``run_timeout``: seconds a run may take before it is terminated; 0 means no limit
    (the default of runs whose ``Execution.timeout`` is ``None``).
    ``kill_grace``: seconds between SIGTERM and SIGKILL (timeouts and :meth:`stop`).
    ``base_environment``: the child's environment before the ``ZTICK_*`` variables are
    added; ``None`` means the daemon's own ``os.environ`` (read when the runner is made).
    ``exit_drain``: once the child has exited, how long to wait for its stdout/stderr to
    close (something it started in the background may hold them) before closing them.
    ``new_session``: start children in a session and process group of their own, so
    that termination reaches everything the job started.  (With ``reactor.spawnProcess``
    this needs a ``setsid`` program; without one each child is signalled alone.)
    """

    output_limit_bytes: int = 65536
    run_timeout: float = 0
    kill_grace: float = 5.0
    base_environment: Mapping[str, str] | None = None
    exit_drain: float = 1.0
    new_session: bool = True

    def __post_init__(self) -> None:
        for name in ("output_limit_bytes", "run_timeout", "kill_grace", "exit_drain"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"ProcessOptions.{name} must be >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to spawn for one run: the program file and the argv it gets."""

    executable: str  # the resolved file, for messages
    argv: tuple[str, ...]  # argv[0] included


class RunOwner(Protocol):
    """What a ``_Run`` needs of its runner (``ProcessRunner``)."""

    @property
    def log(self) -> Logger:
        """Where the run logs."""

    @property
    def kind(self) -> RunnerKind:
        """The runner's kind (shell, direct, awf)."""

    options: ProcessOptions
    _clock: IReactorTime
    _own_group: bool

    def _finished(self, run: _Run, outcome: Outcome) -> None:
        """The run is over: its slot is free."""

    def _cancelled(self, run: _Run) -> None:
        """The run's Deferred was cancelled."""


def _describe_exit(exit_code: int | None, sig: int | None) -> str:
    """``exit status 3`` or ``killed by signal 9 (SIGKILL)``."""
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            return f"killed by signal {sig}"
        return f"killed by signal {sig} ({name})"
    return f"exit status {exit_code}"


_ERRNO_TEXT = re.compile(r"\[Errno \d+\] ([^:\n]+)")


def _exec_failure(executable: str, stderr: bytes) -> str | None:
    """The reason a child could not ``exec``, read from what it wrote to stderr.

    Two writers are understood: Twisted's fork fallback (``Upon execvpe ...`` and a Python
    traceback, exit status 1) and util-linux ``setsid`` (``setsid: failed to execute X: why``,
    exit status 126 or 127).  ``None`` when stderr is neither.
    """
    if stderr.startswith(b"Upon execvpe"):
        text = stderr.decode("utf-8", "replace")
        match = _ERRNO_TEXT.search(text)
        lines = [line for line in text.splitlines() if line.strip()]
        why = match.group(1) if match else (lines[-1] if lines else "exec failed")
        return f"cannot execute {executable}: {why}"
    prefix = b"setsid: failed to execute "
    if stderr.startswith(prefix):
        line = stderr[len(prefix) :].split(b"\n", 1)[0].decode("utf-8", "replace")
        return f"cannot execute {line}"
    return None


#: Bytes of a child's stderr kept from its start, to read why it could not ``exec``.
_ERR_HEAD_BYTES = 8192


class _Tail:
    """The last ``limit`` bytes of a run's stdout and stderr, as they came; the total.

    The buffer grows to twice ``limit`` before its head is cut, so a chatty child costs
    one ``del`` per ``limit`` bytes, not one per read.
    """

    __slots__ = ("data", "limit", "total")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        data = self.data
        data += chunk
        if len(data) > 2 * self.limit:
            del data[: len(data) - self.limit]

    def value(self) -> bytes:
        """The kept bytes: the last ``limit`` of the output."""
        data = self.data
        return bytes(data[len(data) - self.limit :]) if len(data) > self.limit else bytes(data)

    @property
    def dropped(self) -> int:
        """How many bytes of the output are not kept."""
        return self.total - min(len(self.data), self.limit)


class _Run(ProcessProtocol):
    """One child process: collects its output, owns its timers, reports its outcome."""

    def __init__(
        self,
        runner: RunOwner,
        execution: Execution,
        plan: _Plan,
        variables: tuple[tuple[str, str], ...],
    ) -> None:
        self.runner = runner
        self.execution = execution
        self.plan = plan
        self.variables = variables  # the ZTICK_* pairs of this run
        self.deferred: Deferred[Outcome] = Deferred(self._cancel)
        self.started = runner._clock.seconds()  # set again when the child is started
        self.pid: int | None = None
        self.output = _Tail(runner.options.output_limit_bytes)
        self.err_head = b""  # the start of stderr, for _exec_failure
        self.exited = False
        self.ended = False
        self.terminating = False
        self.cause: str | None = None  # why we terminated it, if we did
        self.timed_out = False
        self.cancelled = False
        self._timeout_call: IDelayedCall | None = None
        self._grace_call: IDelayedCall | None = None
        self._kill_call: IDelayedCall | None = None
        self._drain_call: IDelayedCall | None = None

    def _fields(self, with_pid: bool = True) -> dict[str, object]:
        """The log fields every event about this run carries."""
        fields: dict[str, object] = {
            "job_id": self.execution.job_id,
            "rule_id": self.execution.rule_id,
            "attempt": self.execution.attempt,
        }
        if with_pid:
            fields["pid"] = self.pid
        return fields

    # -- ProcessProtocol ------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.closeStdin()
        self.runner.log.debug(
            "job {job_id}: {runner} run started (rule {rule_id}, attempt {attempt}, pid {pid})",
            **self._fields(),
            runner=self.runner.kind.wire,
        )
        if self.terminating:  # terminated while its start was under way: carry it out now
            self._signal(signal.SIGTERM)
            self._arm_kill()
            return
        timeout = effective_timeout(self.execution, self.runner.options.run_timeout)
        if timeout > 0:
            self._timeout_call = self.runner._clock.callLater(timeout, self._time_out, timeout)

    def outReceived(self, data: bytes) -> None:
        self.output.add(data)

    def errReceived(self, data: bytes) -> None:
        if len(self.err_head) < _ERR_HEAD_BYTES:
            self.err_head += data[: _ERR_HEAD_BYTES - len(self.err_head)]
        self.output.add(data)

    def processExited(self, reason: Failure) -> None:
        self.exited = True
        self._timeout_call = _cancelled(self._timeout_call)
        self._grace_call = _cancelled(self._grace_call)
        if self._kill_call is not None and not self._group_alive():
            self._kill_call = _cancelled(self._kill_call)
        if self._kill_call is None and getattr(self.transport, "pipes", True):
            # Normally the pipes are closed already (no pipes left) and processEnded
            # follows at once; this only fires if something the child started still
            # holds them.
            self._drain_call = self.runner._clock.callLater(
                self.runner.options.exit_drain, self._close_pipes
            )
        # else: we sent SIGTERM and others in the child's process group outlived it: the
        # pending SIGKILL to the group ends them, then the pipes drain.

    def processEnded(self, reason: Failure) -> None:
        self._cancel_all()
        if self.ended:
            return
        self.ended = True
        try:
            outcome = self._outcome(reason)
        except Exception as e:  # never leave the run's Deferred unfired
            self.runner.log.failure(
                "job {job_id}: reading the outcome failed", job_id=self.execution.job_id
            )
            outcome = Outcome(False, f"internal error reading the outcome: {e!r}")
        self.runner._finished(self, outcome)

    # -- termination ----------------------------------------------------------------------

    def _time_out(self, seconds: float) -> None:
        self._timeout_call = None
        if self.exited or self.terminating:
            return
        self.timed_out = True
        self.terminate(timeout_reason(seconds))

    def _cancel(self, deferred: Deferred[Outcome]) -> None:
        """The run's Deferred was cancelled: drop the run if it waits, else end it.

        Fires the Deferred at once (so it never errbacks with ``CancelledError``); a
        child already started is terminated as a timeout would terminate it, and stays
        in ``running`` until it has ended.
        """
        if self.ended:
            return
        self.cancelled = True
        self.runner._cancelled(self)

    def shutdown(self, grace: float) -> None:
        """Give the child ``grace`` seconds, then terminate it (runner is stopping)."""
        if self.exited or self.terminating or self._grace_call is not None:
            return
        self._grace_call = self.runner._clock.callLater(grace, self.terminate, SHUTDOWN_CAUSE)

    def terminate(self, cause: str) -> None:
        """Send SIGTERM now and SIGKILL after ``kill_grace`` seconds."""
        self._timeout_call = _cancelled(self._timeout_call)
        self._grace_call = _cancelled(self._grace_call)
        if self.exited or self.terminating:
            return
        self.terminating = True
        self.cause = cause
        if self.pid is None:
            # Its start is under way on the spawner thread: connectionMade sends SIGTERM
            # and arms the SIGKILL, so the kill grace counts from a real SIGTERM.
            self.runner.log.info(
                "job {job_id}: {cause} while starting; it is terminated once started",
                **self._fields(with_pid=False),
                cause=cause,
            )
            return
        self.runner.log.info(
            "job {job_id}: {cause}; sending SIGTERM to pid {pid}",
            **self._fields(),
            cause=cause,
        )
        self._signal(signal.SIGTERM)
        self._arm_kill()

    def _arm_kill(self) -> None:
        self._kill_call = self.runner._clock.callLater(self.runner.options.kill_grace, self._kill)

    def _kill(self) -> None:
        self._kill_call = None
        self.runner.log.warn(
            "job {job_id}: pid {pid} still running {grace:g}s after SIGTERM; sending SIGKILL",
            **self._fields(),
            grace=self.runner.options.kill_grace,
        )
        self._signal(signal.SIGKILL)
        if self.exited and self._drain_call is None:
            self._drain_call = self.runner._clock.callLater(
                self.runner.options.exit_drain, self._close_pipes
            )

    def _signal(self, sig: int) -> None:
        if self.pid is None:
            return
        if self.runner._own_group:
            try:
                os.killpg(self.pid, sig)
                return
            except ProcessLookupError:
                # No such group: the child has not called setsid() yet (or everything
                # in it is gone); signal the child itself below.
                pass
            except OSError as e:
                self.runner.log.warn(
                    "job {job_id}: cannot signal process group {pid}: {error}",
                    job_id=self.execution.job_id,
                    pid=self.pid,
                    error=e.strerror,
                )
        if self.exited or self.transport is None:
            return
        try:
            self.transport.signalProcess(sig)
        except ProcessExitedAlready:
            pass
        except OSError as e:
            self.runner.log.warn(
                "job {job_id}: cannot signal pid {pid}: {error}",
                job_id=self.execution.job_id,
                pid=self.pid,
                error=e.strerror,
            )

    def _group_alive(self) -> bool:
        """Whether any process is left in the child's own process group (``setsid``)."""
        if not self.runner._own_group or self.pid is None:
            return False
        try:
            os.killpg(self.pid, 0)
        except OSError:
            return False
        return True

    def _close_pipes(self) -> None:
        self._drain_call = None
        if self.transport is not None:
            self.transport.loseConnection()

    def _cancel_all(self) -> None:
        self._timeout_call = _cancelled(self._timeout_call)
        self._grace_call = _cancelled(self._grace_call)
        self._kill_call = _cancelled(self._kill_call)
        self._drain_call = _cancelled(self._drain_call)

    # -- result ---------------------------------------------------------------------------

    def _outcome(self, reason: Failure) -> Outcome:
        exit_code: int | None = getattr(reason.value, "exitCode", None)
        sig: int | None = getattr(reason.value, "signal", None)
        if sig is not None:
            exit_code = None
        output = self.output.value()
        if self.timed_out:
            assert self.cause is not None
            return Outcome(False, self.cause, output=output, exit_code=exit_code, timed_out=True)
        if self.cause is not None:
            return Outcome(
                False,
                f"{self.cause} ({_describe_exit(exit_code, sig)})",
                interrupted=self.cause == SHUTDOWN_CAUSE,
                output=output,
                exit_code=exit_code,
            )
        if sig is None and exit_code == 0:
            return Outcome(True, output=output, exit_code=0)
        if sig is None and exit_code in (1, 126, 127):
            why = _exec_failure(self.plan.executable, self.err_head)
            if why is not None:
                return Outcome(False, why, output=output, exit_code=exit_code)
        return Outcome(False, _describe_exit(exit_code, sig), output=output, exit_code=exit_code)


def _cancelled(call: IDelayedCall | None) -> IDelayedCall | None:
    """Cancel ``call`` if it is still pending; returns ``None`` to clear the reference."""
    if call is not None and call.active():
        call.cancel()
    return None
