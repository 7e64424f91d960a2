"""The shell, direct and awf runners, with real child processes on the real reactor."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import stat
import tempfile
import threading
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ztick_tw.model import AwfSpec, DirectSpec, RunnerSpec, ShellSpec
from ztick_tw.runners import process as process_module
from ztick_tw.runners import spawn as spawn_module
from ztick_tw.runners.base import Execution, IRunner, Outcome
from ztick_tw.runners.process import AwfRunner, DirectRunner, ProcessOptions, ShellRunner
from ztick_tw.runners.spawn import spawn_child
from ztick_tw.runners.spawn_queue import SLICE_RUNS

DUE_NS = 1_700_000_000_123_456_789
PATH = os.environ.get("PATH", os.defpath)


def _execution(
    spec: RunnerSpec, job_id: str = "job.1", attempt: int = 1, timeout: float | None = None
) -> Execution:
    return Execution(job_id, DUE_NS, "rule.1", attempt, spec, timeout=timeout)


def _brief(outcome: Outcome) -> Outcome:
    """``outcome`` without the details (output, exit code): success, reason, interrupted."""
    return Outcome(outcome.success, outcome.reason, outcome.interrupted)


@implementer(ILogObserver)
class _Events:
    """Collects the events the process runners log."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if str(event.get("log_namespace", "")).startswith("ztick_tw.runners.process"):
            self.events.append(event)

    def output(self, job_id: str, stream: str) -> list[LogEvent]:
        return [e for e in self.events if e.get("job_id") == job_id and e.get("stream") == stream]

    def text(self, job_id: str, stream: str = "output") -> str:
        found = self.output(job_id, stream)
        assert len(found) == 1, f"expected one {stream} event for {job_id}, got {found}"
        return str(found[0]["text"])

    def messages(self, job_id: str) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("job_id") == job_id]


def _write_script(path: str, body: str) -> str:
    with open(path, "w") as f:
        f.write(body)
    os.chmod(path, stat.S_IRWXU)
    return path


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer exists or is a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


class _Base(unittest.TestCase):
    def setUp(self) -> None:
        self.log = _Events()
        globalLogPublisher.addObserver(self.log)
        self.addCleanup(globalLogPublisher.removeObserver, self.log)
        self.tmp = tempfile.mkdtemp(prefix="ztick-tw-test-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def shell(self, **options: Any) -> ShellRunner:
        runner = ShellRunner(reactor, "/bin/sh", ["-c"], ProcessOptions(**options))
        self.addCleanup(runner.stop, 0)
        return runner

    def direct(self, **options: Any) -> DirectRunner:
        runner = DirectRunner(reactor, ProcessOptions(**options))
        self.addCleanup(runner.stop, 0)
        return runner

    async def wait_gone(self, pid: int) -> bool:
        for _ in range(100):
            if _gone(pid):
                return True
            await deferLater(reactor, 0.05, lambda: None)
        return False


class ShellRunnerTests(_Base):
    def test_provides_irunner(self) -> None:
        """The process runners provide IRunner (run, stop)."""
        assert verifyObject(IRunner, self.shell())
        assert verifyObject(IRunner, self.direct())
        assert verifyObject(IRunner, AwfRunner(reactor, ProcessOptions()))

    async def test_success(self) -> None:
        """Exit status 0 is success, and the end is logged with the job and duration."""
        outcome = await self.shell().run(_execution(ShellSpec("exit 0")))
        assert _brief(outcome) == Outcome(True)
        ends = [m for m in self.log.messages("job.1") if "succeeded" in m]
        assert len(ends) == 1, self.log.messages("job.1")
        assert "rule rule.1" in ends[0]

    async def test_nonzero_exit(self) -> None:
        """A non-zero exit status fails the job with ``exit status N`` and a warning."""
        outcome = await self.shell().run(_execution(ShellSpec("exit 3")))
        assert _brief(outcome) == Outcome(False, "exit status 3")
        assert outcome.exit_code == 3
        assert any("exit status 3" in m for m in self.log.messages("job.1"))

    async def test_killed_by_signal(self) -> None:
        """A child killed by a signal fails with the signal's number and name."""
        outcome = await self.shell().run(_execution(ShellSpec("kill -9 $$")))
        assert _brief(outcome) == Outcome(False, "killed by signal 9 (SIGKILL)")
        assert outcome.exit_code is None

    async def test_environment(self) -> None:
        """The child sees the base environment plus the ZTICK_* variables of the run."""
        runner = self.shell(base_environment={"PATH": PATH, "BASE_VAR": "base"})
        command = (
            'printf \'%s|\' "$ZTICK_JOB_ID" "$ZTICK_EXECUTION_NS" "$ZTICK_RULE_ID"'
            ' "$ZTICK_ATTEMPT" "$BASE_VAR" "${HOME-unset}"'
        )
        outcome = await runner.run(_execution(ShellSpec(command), job_id="env.job", attempt=3))
        assert _brief(outcome) == Outcome(True)
        assert self.log.text("env.job") == f"env.job|{DUE_NS}|rule.1|3|base|unset|"

    async def test_daemon_environment_by_default(self) -> None:
        """Without base_environment the child inherits the daemon's environment."""
        os.environ["ZTICK_TW_TEST_MARKER"] = "marker-value"
        self.addCleanup(os.environ.pop, "ZTICK_TW_TEST_MARKER")
        runner = self.shell()
        await runner.run(_execution(ShellSpec('printf %s "$ZTICK_TW_TEST_MARKER"')))
        assert self.log.text("job.1") == "marker-value"

    async def test_shell_interprets_metacharacters(self) -> None:
        """The shell runner hands the command to the shell: ``;`` and ``|`` work."""
        outcome = await self.shell().run(_execution(ShellSpec("echo a; echo b | tr b c")))
        assert outcome.success
        assert self.log.text("job.1") == "a\nc"

    async def test_configured_shell_is_used(self) -> None:
        """The runner runs ``shell_path shell_args... command`` (here /bin/false fails)."""
        runner = ShellRunner(reactor, "/bin/false", ["-c"], ProcessOptions())
        outcome = await runner.run(_execution(ShellSpec("true")))
        assert _brief(outcome) == Outcome(False, "exit status 1")

    async def test_missing_shell(self) -> None:
        """A shell path that does not exist fails the job with the path and the reason."""
        runner = ShellRunner(reactor, "/no/such/sh", ["-c"], ProcessOptions())
        outcome = await runner.run(_execution(ShellSpec("true")))
        assert _brief(outcome) == Outcome(
            False, "cannot execute /no/such/sh: No such file or directory"
        )
        assert runner.running == 0

    async def test_stdin_is_closed(self) -> None:
        """The child reads EOF on stdin at once (``cat`` ends instead of waiting)."""
        outcome = await self.shell(run_timeout=10).run(_execution(ShellSpec("cat; echo done")))
        assert _brief(outcome) == Outcome(True)
        assert self.log.text("job.1") == "done"

    async def test_output_interleaved_as_it_came(self) -> None:
        """Stdout and stderr form one output, in the order they were written.

        It is the outcome's output and one log event; a silent run has neither.
        """
        command = "echo out1; sleep 0.2; echo err >&2; sleep 0.2; echo out2"
        outcome = await self.shell().run(_execution(ShellSpec(command)))
        assert outcome == Outcome(True, output=b"out1\nerr\nout2\n", exit_code=0)
        assert self.log.text("job.1") == "out1\nerr\nout2"
        quiet = await self.shell().run(_execution(ShellSpec("true"), job_id="quiet"))
        assert quiet == Outcome(True, output=b"", exit_code=0)
        assert self.log.output("quiet", "output") == []

    async def test_output_keeps_the_tail(self) -> None:
        """Past output_limit_bytes the start is dropped: the last bytes are kept, counted."""
        runner = self.shell(output_limit_bytes=1000)
        command = "head -c 1000000 /dev/zero | tr '\\0' x; head -c 5000 /dev/zero | tr '\\0' y >&2"
        outcome = await runner.run(_execution(ShellSpec(command)))
        assert _brief(outcome) == Outcome(True)
        assert outcome.output == b"y" * 1000
        [out] = self.log.output("job.1", "output")
        assert out["text"] == "y" * 1000
        assert out["dropped"] == 1_004_000
        assert "1004000 bytes dropped before" in formatEvent(out)
        command = "head -c 300000 /dev/zero | tr '\\0' x; echo end"
        outcome = await runner.run(_execution(ShellSpec(command), job_id="tail"))
        assert outcome.output == b"x" * 996 + b"end\n"

    async def test_no_output_kept_with_a_zero_limit(self) -> None:
        """output_limit_bytes=0 keeps nothing (the bytes are still read and counted)."""
        outcome = await self.shell(output_limit_bytes=0).run(_execution(ShellSpec("echo hi")))
        assert outcome == Outcome(True, output=b"", exit_code=0)
        [out] = self.log.output("job.1", "output")
        assert out["dropped"] == 3

    async def test_timeout_terminates_the_job(self) -> None:
        """A run past run_timeout is sent SIGTERM and fails; its whole group goes too."""
        runner = self.shell(run_timeout=0.5)
        pidfile = os.path.join(self.tmp, "sleep.pid")
        started = reactor.seconds()
        outcome = await runner.run(_execution(ShellSpec(f"sleep 30 & echo $! > {pidfile}; wait")))
        assert _brief(outcome) == Outcome(False, "timed out after 0.5s")
        assert reactor.seconds() - started < 20
        with open(pidfile) as f:
            sleep_pid = int(f.read())
        assert await self.wait_gone(sleep_pid), "the shell's sleep survived"
        assert runner.running == 0

    async def test_child_ignoring_term_is_killed(self) -> None:
        """A child that ignores SIGTERM gets SIGKILL kill_grace seconds later."""
        runner = self.shell(run_timeout=0.5, kill_grace=0.3)
        started = reactor.seconds()
        outcome = await runner.run(_execution(ShellSpec("trap '' TERM; echo ready; sleep 30")))
        elapsed = reactor.seconds() - started
        assert _brief(outcome) == Outcome(False, "timed out after 0.5s")
        assert self.log.text("job.1") == "ready"
        # It outlived the SIGTERM (sent at 0.5 s), so only the SIGKILL (0.3 s later) ended it.
        assert elapsed >= 0.75
        assert elapsed < 20
        assert any("sending SIGKILL" in m for m in self.log.messages("job.1"))

    async def test_straggler_ignoring_term_is_killed(self) -> None:
        """A process the job started that outlives SIGTERM is killed with its group."""
        runner = self.shell(run_timeout=0.5, kill_grace=0.3)
        pidfile = os.path.join(self.tmp, "straggler.pid")
        command = f"(trap '' TERM; exec sleep 30) & echo $! > {pidfile}; wait"
        started = reactor.seconds()
        outcome = await runner.run(_execution(ShellSpec(command)))
        elapsed = reactor.seconds() - started
        assert _brief(outcome) == Outcome(False, "timed out after 0.5s")
        with open(pidfile) as f:
            straggler = int(f.read())
        assert await self.wait_gone(straggler), "the sleep that ignores SIGTERM survived"
        # The shell died of SIGTERM at 0.5 s; the run ended only when SIGKILL took the rest.
        assert elapsed >= 0.75

    async def test_background_child_holding_output_does_not_block(self) -> None:
        """If the child exits but something it started keeps stdout open, the run ends anyway."""
        runner = self.shell(exit_drain=0.2)
        outcome = await runner.run(_execution(ShellSpec("sleep 30 & echo $!")))
        pid = int(self.log.text("job.1"))
        self.addCleanup(os.kill, pid, signal.SIGKILL)
        assert _brief(outcome) == Outcome(True)
        assert runner.running == 0

    async def test_wrong_spec_kind(self) -> None:
        """A spec of another runner kind fails instead of raising."""
        outcome = await self.shell().run(_execution(DirectSpec("/bin/true")))
        assert _brief(outcome) == Outcome(False, "the shell runner cannot run a direct rule")


class DirectRunnerTests(_Base):
    async def test_arguments_are_literal(self) -> None:
        """No shell: ``;``, ``|`` and ``$()`` reach the program as plain text."""
        spec = DirectSpec("/bin/echo", ("a;b|c", "$(id)", "two words"))
        outcome = await self.direct().run(_execution(spec))
        assert _brief(outcome) == Outcome(True)
        assert self.log.text("job.1") == "a;b|c $(id) two words"

    async def test_path_lookup_uses_child_path(self) -> None:
        """A name without a slash is searched in the child's PATH, like execvp."""
        _write_script(os.path.join(self.tmp, "mytool"), '#!/bin/sh\necho "tool $1"\n')
        runner = self.direct(base_environment={"PATH": f"/no/such/dir:{self.tmp}:/bin"})
        outcome = await runner.run(_execution(DirectSpec("mytool", ("x",))))
        assert _brief(outcome) == Outcome(True)
        assert self.log.text("job.1") == "tool x"

    async def test_missing_executable(self) -> None:
        """A missing program fails the job naming the path; nothing is spawned."""
        runner = self.direct()
        outcome = await runner.run(_execution(DirectSpec("/no/such")))
        assert _brief(outcome) == Outcome(
            False, "cannot execute /no/such: No such file or directory"
        )

    async def test_name_not_on_path(self) -> None:
        """A bare name found nowhere on PATH fails, naming it and the PATH searched."""
        runner = self.direct(base_environment={"PATH": self.tmp})
        outcome = await runner.run(_execution(DirectSpec("no-such-tool")))
        assert _brief(outcome) == Outcome(
            False, f"cannot execute no-such-tool: not found on PATH ({self.tmp})"
        )

    async def test_not_executable(self) -> None:
        """A directory is not executable: the job fails with the reason."""
        outcome = await self.direct().run(_execution(DirectSpec(self.tmp)))
        assert _brief(outcome) == Outcome(False, f"cannot execute {self.tmp}: Is a directory")

    async def _exec_failure(self, new_session: bool, fork: bool, native: bool = False) -> Outcome:
        # The file passes the pre-spawn check but exec() fails (its interpreter is missing).
        script = _write_script(os.path.join(self.tmp, "badinterp"), "#!/no/such/interp\n")
        if fork:
            reactor._neverUseSpawn = True  # type: ignore[attr-defined]
            self.addCleanup(delattr, reactor, "_neverUseSpawn")
        runner = DirectRunner(
            reactor, ProcessOptions(new_session=new_session), native_spawn=native
        )
        self.addCleanup(runner.stop, 0)
        outcome = await runner.run(_execution(DirectSpec(script)))
        assert runner.running == 0
        return outcome

    async def test_exec_failure_posix_spawn(self) -> None:
        """posix_spawn's OSError becomes a failed outcome naming the program."""
        outcome = await self._exec_failure(new_session=True, fork=False, native=True)
        script = os.path.join(self.tmp, "badinterp")
        assert _brief(outcome) == Outcome(
            False, f"cannot execute {script}: No such file or directory"
        )

    async def test_exec_failure_twisted_posix_spawnp(self) -> None:
        """With reactor.spawnProcess, posix_spawnp's OSError gives the same reason."""
        outcome = await self._exec_failure(new_session=False, fork=False)
        script = os.path.join(self.tmp, "badinterp")
        assert _brief(outcome) == Outcome(
            False, f"cannot execute {script}: No such file or directory"
        )

    async def test_exec_failure_fork_fallback(self) -> None:
        """When Twisted forks instead, the child's exec error still gives a clear reason."""
        outcome = await self._exec_failure(new_session=False, fork=True)
        script = os.path.join(self.tmp, "badinterp")
        assert _brief(outcome) == Outcome(
            False, f"cannot execute {script}: No such file or directory"
        )

    async def test_exec_failure_through_setsid(self) -> None:
        """With reactor.spawnProcess and a new session, setsid's exec error gives the reason."""
        outcome = await self._exec_failure(new_session=True, fork=False)
        script = os.path.join(self.tmp, "badinterp")
        assert _brief(outcome) == Outcome(
            False, f"cannot execute {script}: No such file or directory"
        )

    async def test_children_run_concurrently(self) -> None:
        """Twenty 1 s children started together are all alive at once and all succeed."""
        runner = self.direct()
        started = reactor.seconds()
        runs = [
            runner.run(_execution(DirectSpec("/bin/sleep", ("1",)), job_id=f"c{i}"))
            for i in range(20)
        ]
        assert runner.running == 20
        ends: list[float] = []

        def ended(outcome: Outcome) -> Outcome:
            ends.append(reactor.seconds())
            return outcome

        for d in runs:
            d.addCallback(ended)
        outcomes = await gatherResults(runs)
        assert [_brief(o) for o in outcomes] == [Outcome(True)] * 20
        # Run one after another they would take 20 s; together they end far sooner.
        assert max(ends) - started < 10
        assert runner.running == 0


class StopTests(_Base):
    async def test_stop_without_children(self) -> None:
        """stop() with nothing running fires at once, and later runs are refused."""
        runner = self.direct()
        d = runner.stop(1)
        assert d.called
        outcome = await runner.run(_execution(DirectSpec("/bin/true")))
        assert _brief(outcome) == Outcome(False, "shutting down", interrupted=True)

    async def test_stop_lets_a_short_child_finish(self) -> None:
        """A child that ends within the grace period finishes normally."""
        runner = self.shell()
        run = runner.run(_execution(ShellSpec("sleep 0.2")))
        stopped = runner.stop(10)
        order: list[str] = []

        def run_ended(outcome: Outcome) -> Outcome:
            order.append("run")
            return outcome

        def stop_ended(_: None) -> None:
            order.append("stop")

        run.addCallback(run_ended)
        stopped.addCallback(stop_ended)
        assert _brief(await run) == Outcome(True)
        await stopped
        assert order == ["run", "stop"]

    async def test_stop_terminates_after_grace(self) -> None:
        """A child still running after the grace period gets SIGTERM; stop() then fires."""
        runner = self.direct()
        started = reactor.seconds()
        run = runner.run(_execution(DirectSpec("/bin/sleep", ("30",))))
        stopped = runner.stop(0.3)
        assert not stopped.called
        late = await runner.run(_execution(DirectSpec("/bin/true"), job_id="late"))
        assert _brief(late) == Outcome(False, "shutting down", interrupted=True)
        await stopped
        elapsed = reactor.seconds() - started
        assert run.called
        outcome = await run
        assert _brief(outcome) == Outcome(
            False, "stopped at shutdown (killed by signal 15 (SIGTERM))", interrupted=True
        )
        assert elapsed >= 0.25
        assert elapsed < 20
        assert runner.running == 0

    async def test_stop_kills_child_ignoring_term(self) -> None:
        """stop() escalates to SIGKILL when SIGTERM is ignored."""
        runner = self.shell(kill_grace=0.2)
        run = runner.run(_execution(ShellSpec("trap '' TERM; sleep 30")))
        await deferLater(reactor, 0.2, lambda: None)  # let the shell set its trap
        await runner.stop(0)
        outcome = await run
        assert _brief(outcome) == Outcome(
            False, "stopped at shutdown (killed by signal 9 (SIGKILL))", interrupted=True
        )


class _BlockedSpawner:
    """Failure injection: the spawner thread is held busy until ``release()``.

    Starts submitted meanwhile wait on the thread, as they would behind slow execs.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        spawner = spawn_module._get_spawner()
        spawner.submit(self, reactor, lambda error, pid: None)  # type: ignore[arg-type]

    def run(self) -> tuple[int, int]:  # on the spawner thread
        self._event.wait(30)
        return 0, 0

    def release(self) -> None:
        self._event.set()


class StopWhileStartingTests(_Base):
    def block(self) -> _BlockedSpawner:
        blocked = _BlockedSpawner()
        self.addCleanup(blocked.release)
        return blocked

    async def test_stop_kills_child_started_after_its_kill_grace(self) -> None:
        """A run stopped while its start is under way is terminated once it has started.

        The SIGKILL comes kill_grace after the SIGTERM it really got, not after the stop:
        here the child ignores SIGTERM from its first instruction and starts long after
        kill_grace has passed, and it is still killed, and stop() waits for it.
        """
        self.patch(spawn_module, "_default_signals", lambda: [])  # type: ignore[no-untyped-call]
        runner = self.direct(kill_grace=0.2)
        blocked = self.block()
        run = runner.run(_execution(DirectSpec("/bin/sleep", ("30",))))
        await deferLater(reactor, 0.05, lambda: None)  # its start is on the thread now
        assert runner.running == 1 and not run.called
        stopped = runner.stop(0)

        def release() -> None:
            # SIG_IGN is inherited: the child ignores SIGTERM before its first instruction.
            # (Set here: the test reactor puts its own handler back when it runs.)
            previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
            stopped.addBoth(lambda result: (signal.signal(signal.SIGTERM, previous), result)[1])
            blocked.release()

        reactor.callLater(0.6, release)  # 3x kill_grace after the stop
        stopped.addTimeout(20, reactor)
        await stopped
        assert run.called
        outcome = await run
        assert _brief(outcome) == Outcome(
            False, "stopped at shutdown (killed by signal 9 (SIGKILL))", interrupted=True
        )
        assert runner.running == 0
        assert any("while starting" in m for m in self.log.messages("job.1"))

    async def test_stop_with_starts_queued_on_the_thread(self) -> None:
        """stop() fires only once every start queued on the thread started and ended.

        No child starts after stop() has fired: each one was terminated and awaited.
        """
        runner = self.direct(kill_grace=0.2)
        blocked = self.block()
        runs = [
            runner.run(_execution(DirectSpec("/bin/sleep", ("30",)), job_id=f"q.{i}"))
            for i in range(5)
        ]
        await deferLater(reactor, 0.05, lambda: None)  # started in a slice: on the thread
        assert runner.running == 5
        stopped = runner.stop(0)
        reactor.callLater(0.3, blocked.release)
        stopped.addTimeout(20, reactor)
        await stopped
        assert all(run.called for run in runs)
        outcomes = await gatherResults(runs)
        assert [_brief(o) for o in outcomes] == [
            Outcome(False, "stopped at shutdown (killed by signal 15 (SIGTERM))", interrupted=True)
        ] * 5
        assert spawn_module._get_spawner()._requests.empty()  # nothing left to start
        pids = [e["pid"] for e in self.log.events if "run failed" in e.get("log_format", "")]
        assert len(pids) == 5 and None not in pids
        for pid in pids:
            assert _gone(pid)

    async def test_stop_while_a_start_fails_on_the_thread(self) -> None:
        """A start that fails on the thread during stop() ends the run and the stop.

        Its grace timer, armed by stop() while the start was under way, is cancelled.
        """
        script = _write_script(os.path.join(self.tmp, "badinterp"), "#!/no/such/interp\n")
        runner = self.direct()
        blocked = self.block()
        run = runner.run(_execution(DirectSpec(script)))
        await deferLater(reactor, 0.05, lambda: None)  # its start is on the thread now
        [proto] = list(runner._live)
        stopped = runner.stop(30)
        blocked.release()
        stopped.addTimeout(20, reactor)
        await stopped
        outcome = await run
        assert _brief(outcome) == Outcome(
            False, f"cannot execute {script}: No such file or directory"
        )
        owners = [
            getattr(getattr(c, "func", None), "__self__", None) for c in reactor.getDelayedCalls()
        ]
        assert proto not in owners

    async def test_exec_error_reported_by_the_thread_gives_the_reason(self) -> None:
        """ENOENT from the spawner thread fails the run with the usual reason."""
        script = _write_script(os.path.join(self.tmp, "badinterp"), "#!/no/such/interp\n")
        runner = self.direct()
        outcome = await runner.run(_execution(DirectSpec(script)))
        assert _brief(outcome) == Outcome(
            False, f"cannot execute {script}: No such file or directory"
        )
        assert runner.running == 0

    async def test_fallback_without_ctypes_posix_spawn(self) -> None:
        """Without libc's posix_spawn through ctypes, runs use reactor.spawnProcess."""
        self.patch(spawn_module, "_libc_checked", True)  # type: ignore[no-untyped-call]
        self.patch(spawn_module, "_libc", None)  # type: ignore[no-untyped-call]
        runner = self.shell()
        assert not runner._native
        outcome = await runner.run(_execution(ShellSpec("echo fallback")))
        assert _brief(outcome) == Outcome(True)
        assert self.log.text("job.1") == "fallback"


class AwfRunnerTests(_Base):
    def awf(self, path: str) -> AwfRunner:
        runner = AwfRunner(reactor, ProcessOptions(base_environment={"PATH": path}))
        self.addCleanup(runner.stop, 0)
        return runner

    async def test_argv(self) -> None:
        """The awf runner runs ``awf run <workflow> --input k=v ...`` found on PATH."""
        _write_script(
            os.path.join(self.tmp, "awf"),
            '#!/bin/sh\nprintf "%s\\n" "$(basename "$0")" "$@"\n',
        )
        runner = self.awf(f"{self.tmp}:{PATH}")
        spec = AwfSpec("wf", ("a=1", "b=2"))
        outcome = await runner.run(_execution(spec))
        assert _brief(outcome) == Outcome(True)
        assert self.log.text("job.1").split("\n") == [
            "awf",
            "run",
            "wf",
            "--input",
            "a=1",
            "--input",
            "b=2",
        ]

    async def test_awf_failure_status(self) -> None:
        """A failing awf fails the job with its exit status."""
        _write_script(os.path.join(self.tmp, "awf"), "#!/bin/sh\nexit 4\n")
        outcome = await self.awf(f"{self.tmp}:{PATH}").run(_execution(AwfSpec("wf")))
        assert _brief(outcome) == Outcome(False, "exit status 4")

    async def test_awf_missing(self) -> None:
        """Without awf on PATH the job fails with a clear reason."""
        outcome = await self.awf(self.tmp).run(_execution(AwfSpec("wf")))
        assert not outcome.success
        assert outcome.reason == f"awf executable not found on PATH ({self.tmp})"


class OptionsTests(unittest.TestCase):
    def test_negative_values_rejected(self) -> None:
        """Negative limits are refused with the option's name."""
        with pytest.raises(ValueError, match="run_timeout"):
            ProcessOptions(run_timeout=-1)
        with pytest.raises(ValueError, match="output_limit_bytes"):
            ProcessOptions(output_limit_bytes=-5)


class _FailingSpawns:
    """Failure injection: the first ``count`` spawns raise ``OSError(code)``, the rest spawn."""

    def __init__(self, count: int, code: int = errno.EMFILE) -> None:
        self.count = count
        self.code = code
        self.attempts = 0
        self.job_ids: list[str] = []  # of each attempt, in order

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.attempts += 1
        self.job_ids.append(args[1].execution.job_id)
        if self.attempts <= self.count:
            raise OSError(self.code, os.strerror(self.code))
        return spawn_child(*args, **kw)


@implementer(ILogObserver)
class _SpawnEvents:
    """Collects what the spawn queue logs."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        if event.get("log_namespace") == "ztick_tw.runners.spawn":
            self.events.append(event)


class ShortageTests(_Base):
    def setUp(self) -> None:
        super().setUp()
        observer = _SpawnEvents()
        self.spawn_log = observer.events
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def inject(self, failing: _FailingSpawns) -> None:
        names = vars(process_module)
        self.addCleanup(names.__setitem__, "spawn_child", names["spawn_child"])
        names["spawn_child"] = failing

    async def test_out_of_descriptors_waits_then_runs_in_order(self) -> None:
        """EMFILE at spawn does not fail the job: it waits, is retried, and runs, in order.

        The warning names the daemon's own descriptors, not the program.
        """
        failing = _FailingSpawns(3)
        self.inject(failing)
        runner = self.shell()
        runs = [runner.run(_execution(ShellSpec(f"echo {i}"), job_id=f"fd.{i}")) for i in range(5)]
        assert runner.running == 5
        outcomes = await gatherResults(runs)
        assert [_brief(o) for o in outcomes] == [Outcome(True)] * 5
        assert failing.job_ids == ["fd.0"] * 4 + [f"fd.{i}" for i in range(1, 5)]
        warnings = [formatEvent(e) for e in self.spawn_log if "cannot start" in formatEvent(e)]
        assert len(warnings) == 1, warnings  # rate limited
        assert "the daemon is out of file descriptors (" in warnings[0]
        assert "limit" in warnings[0]
        assert not any("cannot execute" in formatEvent(e) for e in self.log.events)
        assert runner.running == 0

    async def test_waiting_run_retried_when_another_child_ends(self) -> None:
        """With a child running, a start that lacked descriptors retries when it ends."""
        runner = self.shell()
        first = runner.run(_execution(ShellSpec("sleep 0.3"), job_id="first"))
        await deferLater(reactor, 0.05, lambda: None)  # first is running
        self.inject(_FailingSpawns(1, errno.ENFILE))
        second = runner.run(_execution(ShellSpec("true"), job_id="second"))
        assert _brief(await first) == Outcome(True)
        assert _brief(await second) == Outcome(True)

    async def test_spawner_thread_shortage_is_retried(self) -> None:
        """EAGAIN reported later by the spawner thread also requeues the run, which runs."""
        calls: list[str] = []

        def late_failure(*args: Any, **kw: Any) -> Any:
            calls.append(args[1].execution.job_id)
            if len(calls) == 1:
                error = OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
                reactor.callLater(0, kw["on_failure"], error)
                return None
            return spawn_child(*args, **kw)

        names = vars(process_module)
        self.addCleanup(names.__setitem__, "spawn_child", names["spawn_child"])
        names["spawn_child"] = late_failure
        runner = self.shell()
        outcomes = await gatherResults(
            [runner.run(_execution(ShellSpec("true"), job_id=f"late.{i}")) for i in range(2)]
        )
        assert [_brief(o) for o in outcomes] == [Outcome(True)] * 2
        assert calls[0] == "late.0"
        assert calls.count("late.0") == 2
        warnings = [formatEvent(e) for e in self.spawn_log if "cannot start" in formatEvent(e)]
        assert warnings and "cannot start another process now" in warnings[0], warnings

    async def test_stop_interrupts_runs_still_waiting(self) -> None:
        """At shutdown a run that could not start yet ends as interrupted, not failed."""
        self.inject(_FailingSpawns(1000, errno.EAGAIN))
        runner = self.shell()
        run = runner.run(_execution(ShellSpec("true")))
        await deferLater(reactor, 0.01, lambda: None)
        assert not run.called
        await runner.stop(0)
        assert _brief(await run) == Outcome(False, "shutting down", interrupted=True)
        assert runner.running == 0

    async def test_real_descriptor_limit(self) -> None:
        """At a real descriptor limit the job waits, and runs once the limit is raised.

        The soft RLIMIT_NOFILE is set to the descriptors already open (+1); no child is
        running, so the back-off timer retries.
        """
        runner = self.shell()
        await runner.run(_execution(ShellSpec("true"), job_id="warm"))  # one-time fds
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 1, hard))
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        run = runner.run(_execution(ShellSpec("echo ran"), job_id="limited"))
        await deferLater(reactor, 0.2, lambda: None)
        assert not run.called
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert _brief(await run) == Outcome(True)
        assert self.log.text("limited") == "ran"
        warnings = [formatEvent(e) for e in self.spawn_log if "cannot start" in formatEvent(e)]
        assert warnings and "out of file descriptors" in warnings[0], warnings

    async def test_nul_byte_in_argument(self) -> None:
        """A NUL byte in the command fails the job with a clear reason, no traceback."""
        outcome = await self.shell().run(_execution(ShellSpec("echo a\0b")))
        assert _brief(outcome) == Outcome(
            False, "cannot execute /bin/sh: argument contains a NUL byte"
        )
        outcome = await self.direct().run(_execution(DirectSpec("/bin/echo", ("x\0",))))
        assert _brief(outcome) == Outcome(
            False, "cannot execute /bin/echo: argument contains a NUL byte"
        )
        assert self.flushLoggedErrors() == []  # type: ignore[no-untyped-call]

    async def test_nul_byte_in_environment(self) -> None:
        """A NUL byte in a ZTICK_* value (the job id) fails the job naming the variable."""
        outcome = await self.shell().run(_execution(ShellSpec("true"), job_id="a\0b"))
        assert _brief(outcome) == Outcome(
            False, "cannot execute /bin/sh: environment variable ZTICK_JOB_ID contains a NUL byte"
        )

    async def test_burst_starts_in_slices(self) -> None:
        """Many runs asked at once start a slice per reactor turn, not all in one call."""
        runner = self.direct()
        seen: list[int] = []
        runs = [runner.run(_execution(DirectSpec("/bin/true"), job_id=f"b{i}")) for i in range(40)]
        assert len(runner._live) == 0  # nothing started inside run()

        def look() -> None:
            seen.append(len(runner._live) + sum(d.called for d in runs))

        reactor.callLater(0, look)  # runs after the first slice
        outcomes = await gatherResults(runs)
        assert [_brief(o) for o in outcomes] == [Outcome(True)] * 40
        assert 0 < seen[0] <= SLICE_RUNS


class RunTimeoutTests(_Base):
    """Execution.timeout: the rule's policy, over the runner's run_timeout."""

    async def test_execution_timeout_ends_the_whole_group(self) -> None:
        """A run past its own timeout (no runner default) is ended, its group with it."""
        runner = self.shell(kill_grace=0.3)
        pidfile = os.path.join(self.tmp, "sleep.pid")
        command = f"echo begun; sleep 30 & echo $! > {pidfile}; wait"
        outcome = await runner.run(_execution(ShellSpec(command), timeout=0.5))
        assert outcome == Outcome(
            False, "timed out after 0.5s", output=b"begun\n", exit_code=None, timed_out=True
        )
        with open(pidfile) as f:
            assert await self.wait_gone(int(f.read())), "the shell's sleep survived"
        assert runner.running == 0

    async def test_execution_timeout_overrides_run_timeout(self) -> None:
        """A shorter timeout of the run wins over a longer run_timeout of the runner."""
        runner = self.shell(run_timeout=60)
        outcome = await runner.run(_execution(ShellSpec("sleep 30"), timeout=0.3))
        assert outcome.timed_out
        assert outcome.reason == "timed out after 0.3s"

    async def test_zero_execution_timeout_means_no_limit(self) -> None:
        """timeout=0 lifts the runner's run_timeout for this run; None keeps it."""
        runner = self.shell(run_timeout=0.2)
        free = await runner.run(_execution(ShellSpec("sleep 0.6; echo done"), timeout=0))
        assert free == Outcome(True, output=b"done\n", exit_code=0)
        bound = await runner.run(_execution(ShellSpec("sleep 30"), job_id="b", timeout=None))
        assert bound.timed_out and bound.reason == "timed out after 0.2s"

    async def test_term_ignored_reports_the_timeout_not_the_kill(self) -> None:
        """A child ignoring SIGTERM is killed after the grace; the outcome says timed out."""
        runner = self.shell(kill_grace=0.2)
        command = "trap '' TERM; echo ready; sleep 30"
        outcome = await runner.run(_execution(ShellSpec(command), timeout=0.3))
        assert outcome.timed_out and outcome.reason == "timed out after 0.3s"
        assert outcome.output == b"ready\n"
        assert any("sending SIGKILL" in m for m in self.log.messages("job.1"))


class CancelTests(_Base):
    """The Deferred of run() can be cancelled; it fires cancelled, never errbacks."""

    async def wait_for(self, path: str) -> None:
        for _ in range(400):
            if os.path.exists(path):
                return
            await deferLater(reactor, 0.025, lambda: None)
        raise AssertionError(f"{path} never appeared")

    async def test_cancel_a_running_child_ends_its_group(self) -> None:
        """Cancel fires the Deferred at once with the output so far, and ends the group.

        The runner counts the run until the child and what it started are gone.
        """
        runner = self.shell(kill_grace=0.3)
        pidfile = os.path.join(self.tmp, "sleep.pid")
        command = f"echo begun; sleep 30 & echo $! > {pidfile}; wait"
        run = runner.run(_execution(ShellSpec(command)))
        await self.wait_for(pidfile)
        await deferLater(reactor, 0.05, lambda: None)  # let the reactor read "begun"
        run.cancel()
        assert run.called
        outcome = await run
        assert outcome == Outcome(False, "cancelled", output=b"begun\n", cancelled=True)
        with open(pidfile) as f:
            assert await self.wait_gone(int(f.read())), "the shell's sleep survived"
        for _ in range(200):
            if runner.running == 0:
                break
            await deferLater(reactor, 0.025, lambda: None)
        assert runner.running == 0
        ends = [m for m in self.log.messages("job.1") if "run failed" in m]
        assert len(ends) == 1 and "cancelled (killed by signal 15 (SIGTERM))" in ends[0]

    async def test_cancel_before_start_drops_the_run(self) -> None:
        """A run cancelled while it waits in the spawn queue never starts."""
        runner = self.shell()
        marker = os.path.join(self.tmp, "ran")
        run = runner.run(_execution(ShellSpec(f"touch {marker}")))
        after = runner.run(_execution(ShellSpec("true"), job_id="after"))
        assert runner.running == 2
        run.cancel()
        assert run.called
        assert await run == Outcome(False, "cancelled", cancelled=True)
        assert runner.running == 1
        assert _brief(await after) == Outcome(True)  # started after the dropped one's turn
        assert not os.path.exists(marker)
        assert any("cancelled before it started" in m for m in self.log.messages("job.1"))

    async def test_cancel_after_the_end_does_nothing(self) -> None:
        """Cancelling a run that has ended leaves its outcome as it was."""
        run = self.shell().run(_execution(ShellSpec("exit 4")))
        first = await run
        run.cancel()
        assert await run == first
        assert first.exit_code == 4 and not first.cancelled

    async def test_cancel_a_timed_out_run_still_ending(self) -> None:
        """A timed-out run still ending (SIGTERM ignored) can be cancelled; it is killed."""
        runner = self.shell(kill_grace=1)
        pidfile = os.path.join(self.tmp, "shell.pid")
        command = f"trap '' TERM; echo $$ > {pidfile}; sleep 30"
        run = runner.run(_execution(ShellSpec(command), timeout=0.2))
        await self.wait_for(pidfile)
        await deferLater(reactor, 0.5, lambda: None)  # past the timeout: SIGTERM ignored
        assert not run.called
        run.cancel()
        assert (await run).cancelled
        assert runner.running == 1  # the SIGKILL comes kill_grace after the SIGTERM
        with open(pidfile) as f:
            assert await self.wait_gone(int(f.read())), "the shell ignoring TERM survived"

    async def test_cancel_while_starting_on_the_thread(self) -> None:
        """A run cancelled while its start is under way is terminated once it started."""
        runner = self.direct(kill_grace=0.2)
        blocked = _BlockedSpawner()
        self.addCleanup(blocked.release)
        run = runner.run(_execution(DirectSpec("/bin/sleep", ("30",))))
        await deferLater(reactor, 0.05, lambda: None)  # its start is on the thread now
        assert runner.running == 1 and not run.called
        run.cancel()
        assert (await run) == Outcome(False, "cancelled", cancelled=True)
        blocked.release()
        stopped = runner.stop(30)  # waits for the cancelled child, not the grace
        stopped.addTimeout(20, reactor)
        await stopped
        pids = [e["pid"] for e in self.log.events if "run failed" in e.get("log_format", "")]
        assert len(pids) == 1 and pids[0] is not None
        assert await self.wait_gone(pids[0])
