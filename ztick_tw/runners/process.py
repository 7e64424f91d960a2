"""Runners that execute a job as a child process: ``shell``, ``direct`` and ``awf``.

Every run is one child started by :func:`ztick_tw.runners.spawn.spawn_child`
(``posix_spawn`` made on a spawner thread, because CPython's ``os.posix_spawn`` holds the
GIL until the child has exec'd; a pidfd watched by the reactor) with a
:class:`ProcessProtocol`, or by ``reactor.spawnProcess`` where that is not available (a
reactor that is not a real POSIX one, no ctypes, a kernel without pidfds).  Nothing here
blocks the reactor.  A run whose start is under way on the spawner thread is live: a
timeout cannot fire yet, and a stop's termination is carried out once it has started.
Starts are queued and made a slice per reactor turn (:class:`SpawnQueue`), so a burst
of due jobs does not stall other clients; a start that finds the daemon out of
descriptors (EMFILE, ENFILE, EAGAIN, ENOMEM) waits for a child to end and is retried,
in order, instead of failing the job.  Per run:

* The program is looked up before spawning (``PATH`` search as ``execvp`` does when the
  name has no slash, using the child's ``PATH``; otherwise a ``stat``/``access`` check),
  so a missing or non-executable program fails the job with ``cannot execute X: <why>``.
  A spawn that still fails (``OSError`` from ``posix_spawn``, or a forked child that
  could not ``exec``) also becomes a failed :class:`Outcome`, never an exception; so
  does a NUL byte in an argument or in the environment.
* The child gets the daemon's environment (or ``ProcessOptions.base_environment``) plus
  ``ZTICK_JOB_ID``, ``ZTICK_EXECUTION_NS``, ``ZTICK_RULE_ID`` and ``ZTICK_ATTEMPT``.
* stdin is ``/dev/null`` (the fallback: a pipe closed at once; the child reads EOF);
  stdout and stderr are read into one buffer as they come (interleaved), of which the
  last ``output_limit_bytes`` are kept: they are the outcome's ``output`` (the run's
  history) and are logged when the run ends.
* With ``new_session`` (the default) the child leads its own session and process group
  (``POSIX_SPAWN_SETSID``; the fallback execs it through the ``setsid`` program):
  a timeout or a shutdown signals the whole group, so the commands a shell started die
  with it instead of running on unnoticed.
* A timeout (``Execution.timeout``, else ``run_timeout``), a cancel or :meth:`stop` sends
  SIGTERM, then SIGKILL ``kill_grace`` seconds later.  A cancelled run's Deferred fires at
  once (``cancelled_outcome``); the child is still ended and counted in ``running`` until
  it has.  A run cancelled while waiting to start is dropped.

The outcome is decided when the child has exited and its pipes are closed.  If
something the child left behind keeps the pipes open, the run ends ``exit_drain``
seconds after the child exited and the pipes are closed from this side.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Mapping, Sequence
from typing import ClassVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ztick_tw.model import AwfSpec, DirectSpec, RunnerKind, RunnerSpec, ShellSpec
from ztick_tw.runners.base import (
    CANCELLED_REASON,
    Execution,
    IRunner,
    Outcome,
    cancelled_outcome,
)
from ztick_tw.runners.child import ProcessOptions, _Plan, _Run
from ztick_tw.runners.spawn import FDS_PER_CHILD, native_spawn_supported, spawn_child
from ztick_tw.runners.spawn_queue import TRANSIENT_ERRNOS, SpawnQueue

_SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"

__all__ = [
    "FDS_PER_RUN",
    "AwfRunner",
    "DirectRunner",
    "ProcessOptions",
    "ProcessRunner",
    "ShellRunner",
]


#: Descriptors one live shell/direct/awf run holds in the daemon: the read ends of its
#: stdout and stderr pipes and its pidfd (for the startup check of the descriptor limit).
FDS_PER_RUN = FDS_PER_CHILD


class _CannotExecute(Exception):
    """The program of a run cannot be started; ``reason`` is the job's failure reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _resolve(name: str, search_path: str) -> str:
    """Find the file ``execvp(name)`` would run, as an absolute path.

    A name with a slash is checked as it is; a bare name is searched in ``search_path``
    (a ``PATH`` value).  Raises :class:`_CannotExecute` with the reason when there is no
    such executable file.
    """
    if not name:
        raise _CannotExecute("cannot execute an empty program name")
    if "/" not in name:
        found = shutil.which(name, path=search_path)
        if found is None:
            raise _CannotExecute(f"cannot execute {name}: not found on PATH ({search_path})")
        return os.path.abspath(found)
    try:
        st = os.stat(name)
    except OSError as e:
        raise _CannotExecute(f"cannot execute {name}: {e.strerror}") from None
    except ValueError as e:  # embedded NUL byte
        raise _CannotExecute(f"cannot execute {name!r}: {e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise _CannotExecute(f"cannot execute {name}: Is a directory")
    if not stat.S_ISREG(st.st_mode) or not os.access(name, os.X_OK):
        raise _CannotExecute(f"cannot execute {name}: Permission denied")
    return os.path.abspath(name)


def _nul_byte(argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    """Why ``argv``/``env`` cannot reach ``exec`` (a NUL byte ends a C string), or None."""
    if any("\0" in arg for arg in argv):
        return "argument contains a NUL byte"
    for name, value in env.items():
        if "\0" in name or "\0" in value:
            shown = name.encode("unicode_escape").decode("ascii")
            return f"environment variable {shown} contains a NUL byte"
    return None


#: The variables each run sets in its child's environment, over the base environment.
_RUN_VARIABLES = ("ZTICK_JOB_ID", "ZTICK_EXECUTION_NS", "ZTICK_RULE_ID", "ZTICK_ATTEMPT")

#: Seconds a program path found by :func:`_resolve` is trusted without a new ``stat``.
#: (Should it vanish meanwhile, ``posix_spawn`` fails with the same reason.)
RESOLVE_TTL = 1.0


@implementer(IRunner)
class ProcessRunner:
    """Common machinery of the process runners; subclasses say what to execute.

    ``reactor`` must provide ``IReactorProcess`` and ``IReactorTime``.  ``native_spawn``
    chooses how children start: ``posix_spawn`` and a pidfd (:mod:`.spawn`) or
    ``reactor.spawnProcess``; ``None`` means the first whenever the reactor and the system
    allow it.
    """

    log: ClassVar[Logger] = Logger()
    #: The kind of spec this runner executes (its ``wire`` word appears in logs).
    kind: ClassVar[RunnerKind]

    def __init__(
        self,
        reactor: IReactorProcess,
        options: ProcessOptions,
        *,
        native_spawn: bool | None = None,
    ) -> None:
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self.options = options
        base = os.environ if options.base_environment is None else options.base_environment
        self._base_env: dict[str, str] = dict(base)
        self._search_path = self._base_env.get("PATH", os.defpath)
        # The base environment, encoded once: a run adds only its ZTICK_* entries.
        inherited = {k: v for k, v in self._base_env.items() if k not in _RUN_VARIABLES}
        self._env_error = _nul_byte((), inherited)
        self._base_envp: list[bytes] = (
            []
            if self._env_error
            else [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in inherited.items()]
        )
        self._resolved: dict[str, tuple[float, str]] = {}  # name -> (until, path)
        if native_spawn is None:
            native_spawn = native_spawn_supported(reactor)
        self._native = native_spawn
        self._setsid: str | None = None
        if options.new_session and not native_spawn:
            self._setsid = shutil.which("setsid", path=_SYSTEM_PATH) or shutil.which(
                "setsid", path=self._search_path
            )
            if self._setsid is None:
                self.log.warn(
                    "no setsid program found: {runner} jobs share the daemon's process group,"
                    " and a timeout or shutdown signals only the job's own process",
                    runner=self.kind.wire,
                )
        #: Whether each child leads a process group of its own (signalled with killpg).
        self._own_group = options.new_session and (native_spawn or self._setsid is not None)
        self._live: set[_Run] = set()
        self._queue: SpawnQueue[_Run] = SpawnQueue(
            self._clock, self._start, f"{self.kind.wire} runs"
        )
        self._stopping = False
        self._stop_waiters: list[Deferred[None]] = []

    @property
    def running(self) -> int:
        """How many runs of this runner are in flight: alive, or waiting to start."""
        return len(self._live) + len(self._queue)

    def _plan(self, spec: RunnerSpec) -> _Plan:
        """The program and argv for ``spec``; raises ``_CannotExecute``."""
        raise NotImplementedError

    def _resolve(self, name: str) -> str:
        """:func:`_resolve` in the child's ``PATH``, trusted for :data:`RESOLVE_TTL` s."""
        now = self._clock.seconds()
        known = self._resolved.get(name)
        if known is not None and known[0] > now:
            return known[1]
        path = _resolve(name, self._search_path)
        if len(self._resolved) >= 1024:
            self._resolved.clear()
        self._resolved[name] = (now + RESOLVE_TTL, path)
        return path

    def run(self, execution: Execution) -> Deferred[Outcome]:
        """Queue the child for ``execution``; fires with its outcome, never errbacks.

        The child starts on a later reactor turn (a slice of starts per turn), or later
        still when the daemon is out of descriptors.
        """
        if self._stopping:
            return self._fail_early(execution, "shutting down", interrupted=True)
        if execution.spec.kind is not self.kind:
            return self._fail_early(
                execution,
                f"the {self.kind.wire} runner cannot run a {execution.spec.kind.wire} rule",
            )
        try:
            plan = self._plan(execution.spec)
        except _CannotExecute as e:
            return self._fail_early(execution, e.reason)
        variables = (
            ("ZTICK_JOB_ID", execution.job_id),
            ("ZTICK_EXECUTION_NS", str(execution.execution_ns)),
            ("ZTICK_RULE_ID", execution.rule_id),
            ("ZTICK_ATTEMPT", str(execution.attempt)),
        )
        nul = self._env_error or _nul_byte(plan.argv, dict(variables))
        if nul is not None:
            return self._fail_early(execution, f"cannot execute {plan.executable}: {nul}")
        proto = _Run(self, execution, plan, variables)
        self._queue.add(proto)
        return proto.deferred

    def _start(self, proto: _Run) -> None:
        """Start one queued run (called by the queue); re-raises a transient ``OSError``."""
        plan = proto.plan
        if self._native:
            executable, argv = plan.executable, plan.argv
        elif self._setsid is not None:
            executable, argv = self._setsid, (self._setsid, plan.executable, *plan.argv[1:])
        else:
            executable, argv = plan.executable, plan.argv
        self._live.add(proto)
        proto.started = self._clock.seconds()
        try:
            if self._native:
                envp = self._base_envp + [
                    os.fsencode(name) + b"=" + os.fsencode(value)
                    for name, value in proto.variables
                ]
                spawn_child(
                    self._reactor,
                    proto,
                    executable,
                    argv,
                    envp,
                    new_session=self.options.new_session,
                    on_failure=lambda error: self._spawn_failed(proto, executable, error),
                )
            else:
                env = dict(self._base_env)
                env.update(proto.variables)
                self._reactor.spawnProcess(proto, executable, argv, env=env, path=None)
        except Exception as e:
            self._live.discard(proto)
            if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
                raise
            self._not_started(proto, executable, e)
            return

    def _spawn_failed(self, proto: _Run, executable: str, error: OSError) -> None:
        """The spawner thread could not start ``proto``'s child (on the reactor thread)."""
        self._live.discard(proto)
        self._queue.wake()  # its pipes are closed: a start that lacked descriptors can retry
        if proto.cancelled:
            self._end_unstarted(proto, cancelled_outcome())  # (fired already: only logged)
        elif error.errno in TRANSIENT_ERRNOS and not self._stopping:
            self._queue.retry(proto, error)
        elif error.errno in TRANSIENT_ERRNOS:
            self._end_unstarted(proto, Outcome(False, "shutting down", interrupted=True))
        else:
            self._not_started(proto, executable, error)

    def _not_started(self, proto: _Run, executable: str, error: Exception) -> None:
        why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        if isinstance(error, ValueError) and "null" in why:
            why = "argument contains a NUL byte"
        self._end_unstarted(proto, Outcome(False, f"cannot execute {executable}: {why}"))

    def _end_unstarted(self, proto: _Run, outcome: Outcome) -> None:
        proto._cancel_all()  # a stop's grace timer, armed while its start was under way
        proto.ended = True
        self._log_end(proto.execution, None, outcome, 0.0)
        try:
            if not proto.deferred.called:  # a cancelled run's fired at its cancel
                proto.deferred.callback(outcome)
        finally:
            if self._stopping and not self._live:
                waiters, self._stop_waiters = self._stop_waiters, []
                for d in waiters:
                    d.callback(None)

    def stop(self, grace: float) -> Deferred[None]:
        """Refuse new runs; give live children ``grace`` s, then SIGTERM, then SIGKILL.

        Runs still waiting to start are started now, as they would have been without
        the slices; those the daemon lacks descriptors for end at once as interrupted.
        """
        self._stopping = True
        for queued in self._queue.start_all():
            outcome = Outcome(False, "shutting down", interrupted=True)
            self._log_end(queued.execution, None, outcome, 0.0)
            queued.deferred.callback(outcome)
        # (A child still on its way from the spawner thread is in _live: it gets the
        # grace too, and connectionMade signals it if its termination came first.)
        if not self._live:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        for run in list(self._live):
            run.shutdown(grace)
        return d

    # -- internals ------------------------------------------------------------------------

    def _fail_early(
        self, execution: Execution, reason: str, interrupted: bool = False
    ) -> Deferred[Outcome]:
        outcome = Outcome(False, reason, interrupted=interrupted)
        self._log_end(execution, None, outcome, 0.0)
        return succeed(outcome)

    def _cancelled(self, run: _Run) -> None:
        """``run``'s Deferred was cancelled: drop it if it waits to start, else end it."""
        if self._queue.remove(run):
            run.ended = True
            self.log.info(
                "job {job_id}: {runner} run cancelled before it started"
                " (rule {rule_id}, attempt {attempt})",
                **run._fields(with_pid=False),
                runner=self.kind.wire,
            )
        else:
            run.terminate(CANCELLED_REASON)
        run.deferred.callback(cancelled_outcome(run.output.value()))

    def _finished(self, run: _Run, outcome: Outcome) -> None:
        self._live.discard(run)
        self._queue.wake()  # its descriptors are free: a start that lacked them can retry
        try:
            self._log_output(run)
            self._log_end(run.execution, run.pid, outcome, self._clock.seconds() - run.started)
        finally:
            if not run.deferred.called:  # a cancelled run's fired at its cancel
                run.deferred.callback(outcome)
            if self._stopping and not self._live:
                waiters, self._stop_waiters = self._stop_waiters, []
                for d in waiters:
                    d.callback(None)

    def _log_output(self, run: _Run) -> None:
        """One event with the run's output (stdout and stderr as they came), if any."""
        tail = run.output
        if not tail.total:
            return
        execution = run.execution
        text = tail.value().decode("utf-8", "replace")
        if text.endswith("\n"):
            text = text[:-1]
        fields = {
            "job_id": execution.job_id,
            "rule_id": execution.rule_id,
            "attempt": execution.attempt,
            "pid": run.pid,
            "stream": "output",
            "text": text,
            "dropped": tail.dropped,
        }
        if tail.dropped:
            self.log.info(
                "job {job_id} {stream}: [{dropped} bytes dropped before]\n{text}", **fields
            )
        else:
            self.log.info("job {job_id} {stream}: {text}", **fields)

    def _log_end(
        self, execution: Execution, pid: int | None, outcome: Outcome, duration: float
    ) -> None:
        if outcome.success:
            self.log.info(
                "job {job_id}: {runner} run succeeded in {duration:.3f}s"
                " (rule {rule_id}, attempt {attempt}, pid {pid})",
                job_id=execution.job_id,
                rule_id=execution.rule_id,
                attempt=execution.attempt,
                pid=pid,
                duration=duration,
                runner=self.kind.wire,
            )
        else:
            self.log.warn(
                "job {job_id}: {runner} run failed after {duration:.3f}s: {reason}"
                " (rule {rule_id}, attempt {attempt}, pid {pid})",
                job_id=execution.job_id,
                rule_id=execution.rule_id,
                attempt=execution.attempt,
                pid=pid,
                duration=duration,
                reason=outcome.reason,
                runner=self.kind.wire,
            )


class ShellRunner(ProcessRunner):
    """``shell <command>``: runs ``[shell_path, *shell_args, command]``."""

    kind = RunnerKind.SHELL

    def __init__(
        self,
        reactor: IReactorProcess,
        shell_path: str,
        shell_args: Sequence[str],
        options: ProcessOptions,
        *,
        native_spawn: bool | None = None,
    ) -> None:
        super().__init__(reactor, options, native_spawn=native_spawn)
        self.shell_path = shell_path
        self.shell_args = tuple(shell_args)

    def _plan(self, spec: RunnerSpec) -> _Plan:
        assert isinstance(spec, ShellSpec)
        executable = self._resolve(self.shell_path)
        return _Plan(executable, (self.shell_path, *self.shell_args, spec.command))


class DirectRunner(ProcessRunner):
    """``direct <executable> [args...]``: execve with literal arguments, no shell.

    A name without a slash is looked up in the child's ``PATH`` as ``execvp`` does.
    """

    kind = RunnerKind.DIRECT

    def __init__(
        self,
        reactor: IReactorProcess,
        options: ProcessOptions,
        *,
        native_spawn: bool | None = None,
    ) -> None:
        super().__init__(reactor, options, native_spawn=native_spawn)

    def _plan(self, spec: RunnerSpec) -> _Plan:
        assert isinstance(spec, DirectSpec)
        executable = self._resolve(spec.executable)
        return _Plan(executable, (spec.executable, *spec.arguments))


class AwfRunner(ProcessRunner):
    """``awf <workflow> [--input k=v ...]``: runs ``awf run <workflow> [--input k=v ...]``."""

    kind = RunnerKind.AWF

    def __init__(
        self,
        reactor: IReactorProcess,
        options: ProcessOptions,
        awf_executable: str = "awf",
        *,
        native_spawn: bool | None = None,
    ) -> None:
        super().__init__(reactor, options, native_spawn=native_spawn)
        self.awf_executable = awf_executable

    def _plan(self, spec: RunnerSpec) -> _Plan:
        assert isinstance(spec, AwfSpec)
        name = self.awf_executable
        try:
            executable = self._resolve(name)
        except _CannotExecute as e:
            if "/" in name:
                raise
            raise _CannotExecute(
                f"{name} executable not found on PATH ({self._search_path})"
            ) from e
        argv = [name, "run", spec.workflow]
        for item in spec.inputs:
            argv += ["--input", item]
        return _Plan(executable, tuple(argv))
