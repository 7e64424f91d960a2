"""Start a ztick-tw daemon as a child process for one benchmark scenario, and stop it.

Each daemon gets its own working directory (its logfile and its stderr log live there),
a free port on 127.0.0.1 found by binding port 0, and a config file written here.  Every
wait is bounded: a daemon that does not accept connections in time, or does not exit
after SIGTERM, is killed and reported.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.ports import free_port

HOST = "127.0.0.1"


class BenchError(Exception):
    """A benchmark could not be measured (the daemon failed, a wait timed out...)."""


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the benchmark process dies (Linux).

    So a daemon never outlives a benchmark that was killed; without ``prctl`` this
    does nothing (the benchmark still stops its daemons when it ends normally).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    """The parts of the daemon's config a scenario chooses."""

    persistence: str = "memory"  # "memory" or "logfile"
    fsync: bool = True
    logfile: str = "logfile"  # relative to the daemon's working directory
    log_level: str = "info"
    shell_path: str | None = None  # None: the default /bin/sh
    max_concurrent_runs: int | None = None  # None: the default (64)

    def describe(self) -> str:
        """A short human description for the results table."""
        if self.persistence == "memory":
            text = "memory backend"
        else:
            text = f"logfile backend, fsync_on_persist = {str(self.fsync).lower()}"
        if self.shell_path is not None:
            text += f", shell {self.shell_path}"
        runs = self.max_concurrent_runs
        text += f", max_concurrent_runs = {runs if runs is not None else '64 (default)'}"
        return text

    def toml(self, port: int) -> str:
        """The config file for a daemon listening on ``port``."""
        lines = [
            "[log]",
            f'level = "{self.log_level}"',
            "[controller]",
            f'listen = "{HOST}:{port}"',
            "[database]",
            f'persistence = "{self.persistence}"',
            f'logfile_path = "{self.logfile}"',
            f"fsync_on_persist = {str(self.fsync).lower()}",
        ]
        if self.shell_path is not None:
            lines += ["[shell]", f'path = "{self.shell_path}"']
        if self.max_concurrent_runs is not None:
            lines += ["[scheduler]", f"max_concurrent_runs = {self.max_concurrent_runs}"]
        return "\n".join(lines) + "\n"


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_LOADED = re.compile(
    r"loaded (?P<jobs>\d+) jobs and (?P<rules>\d+) rules from (?P<frames>\d+) \S+"
    r" frames in (?P<seconds>[0-9.]+)s"
)


@dataclass(frozen=True, slots=True)
class LoadedLine:
    """The daemon's own ``loaded ... in X s`` startup log line."""

    jobs: int
    rules: int
    frames: int
    seconds: float


_live: set[Daemon] = set()


def kill_all() -> None:
    """Kill every daemon still running (after an interrupted run)."""
    for daemon in list(_live):
        daemon.kill()


class Daemon:
    """One ``python -m ztick_tw -c FILE`` child process, used as a context manager."""

    def __init__(self, workdir: Path, settings: DaemonSettings) -> None:
        self.workdir = workdir
        self.settings = settings
        self.port = 0
        self.startup_seconds = 0.0  # from spawning to the port accepting connections
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_path = workdir / "daemon.log"

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        if self._proc is None:
            raise BenchError("the daemon is not running")
        return self._proc.pid

    def start(self, timeout: float = 60.0) -> Daemon:
        """Write the config, spawn the daemon, and wait until its port accepts."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.workdir / "ztick.toml"
        config.write_text(self.settings.toml(self.port))
        log = open(self._log_path, "ab")  # noqa: SIM115 - handed to the child
        env = dict(os.environ)
        env.setdefault("LC_ALL", "C.UTF-8")
        started = time.perf_counter()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ztick_tw", "-c", str(config)],
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        finally:
            log.close()
        _live.add(self)
        deadline = started + timeout
        while True:
            if self._proc.poll() is not None:
                raise BenchError(
                    f"daemon exited with status {self._proc.returncode} before accepting"
                    f" connections; its log {self._log_path}:\n{self.log_text()[-2000:]}"
                )
            try:
                with socket.create_connection((HOST, self.port), timeout=1.0):
                    pass
                break
            except OSError:
                if time.perf_counter() > deadline:
                    self.kill()
                    raise BenchError(
                        f"daemon did not accept connections on {HOST}:{self.port}"
                        f" within {timeout:.0f}s (log {self._log_path})"
                    ) from None
                time.sleep(0.002)
        self.startup_seconds = time.perf_counter() - started
        return self

    def log_text(self) -> str:
        """Everything the daemon has logged so far."""
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def loaded_line(self) -> LoadedLine:
        """The ``loaded N jobs ... in X s`` line of this daemon's startup."""
        match = _LOADED.search(self.log_text())
        if match is None:
            raise BenchError(f"no 'loaded ... in X s' line in {self._log_path}")
        return LoadedLine(
            int(match["jobs"]), int(match["rules"]), int(match["frames"]), float(match["seconds"])
        )

    def status_kb(self, key: str) -> int:
        """A ``kB`` value (``VmRSS``, ``VmHWM``...) from ``/proc/<pid>/status``."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(rf"^{key}:\s+(\d+) kB$", text, re.MULTILINE)
        if match is None:
            raise BenchError(f"no {key} in /proc/{self.pid}/status")
        return int(match[1])

    def rss_bytes(self) -> int:
        """The daemon's resident set size now (``VmRSS``)."""
        return self.status_kb("VmRSS") * 1024

    def cpu_seconds(self) -> float:
        """User + system CPU time the daemon has used so far (from ``/proc/<pid>/stat``)."""
        return process_cpu_seconds(self.pid)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL the daemon's process group."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            _live.discard(self)
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        _live.discard(self)

    def kill(self) -> None:
        """SIGKILL the daemon (its process group) and reap it."""
        proc = self._proc
        _live.discard(self)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def __enter__(self) -> Daemon:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
