"""Start the real ztick-tw daemon as a user would, and talk to it over TCP on 127.0.0.1.

``Daemon`` owns one working directory with a config file (its own free port, a logfile
beside it) and runs the daemon there as a subprocess, as many times as a test wants
(restarts reuse the port and the logfile).  Every process it starts carries a unique
``ZTICK_E2E_TAG`` in its environment; the daemon passes its environment on to the jobs it
runs, so ``cleanup()`` can find and kill (by pid) every process that came from this
test, even jobs orphaned by a ``kill -9`` of the daemon or started in their own session.

``LineClient`` is a tiny blocking line client; every socket operation has a timeout, so a
daemon bug fails a test instead of hanging it.

Nothing here sleeps for a fixed time to let something happen: ``wait_until`` polls a
condition with a generous deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests.ports import free_port

#: Seconds a daemon gets to start listening before a test fails.
START_TIMEOUT = 15.0
#: Seconds a daemon gets to exit after SIGTERM before a test fails.
STOP_TIMEOUT = 15.0
#: Timeout of every socket operation of ``LineClient``.
SOCKET_TIMEOUT = 10.0
#: Seconds ``wait_until`` polls by default.
WAIT_TIMEOUT = 15.0

#: The environment variable that marks every process started for one ``Daemon``.
TAG_VARIABLE = "ZTICK_E2E_TAG"

BIN_DIR = Path(sys.executable).parent

T = TypeVar("T")

TomlValue = str | bool | int | float | list[str]


def now_ns() -> int:
    """Wall-clock nanoseconds since the epoch (the daemon's clock for job times)."""
    return time.time_ns()


def toml_value(value: TomlValue) -> str:
    """``value`` written as TOML (strings as basic strings, JSON escapes are valid TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return json.dumps(value)


def render_toml(sections: Mapping[str, Mapping[str, TomlValue]]) -> str:
    """A TOML document of ``[section]`` tables of ``key = value`` lines."""
    out: list[str] = []
    for section, keys in sections.items():
        out.append(f"[{section}]")
        out.extend(f"{key} = {toml_value(value)}" for key, value in keys.items())
        out.append("")
    return "\n".join(out)


def quote(text: str) -> str:
    """``text`` as one protocol token: a quoted string, with quotes and backslashes escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wait_until(
    condition: Callable[[], T | None],
    what: str,
    timeout: float = WAIT_TIMEOUT,
    interval: float = 0.02,
    on_timeout: Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it returns something other than ``None``/``False``.

    Fails the test (``AssertionError``) after ``timeout`` seconds, saying what was awaited
    and, with ``on_timeout``, more detail (for example the daemon's log).
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}\n{detail}")
        time.sleep(interval)


# ------------------------------------------------------------------------------- processes


def _environ_of(pid: int) -> bytes | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read()
    except OSError:
        return None


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    # "pid (comm) S ...": the state follows the last ')'.
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] == b"Z"


def tagged_pids(tag: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``ZTICK_E2E_TAG=tag``."""
    needle = f"{TAG_VARIABLE}={tag}".encode() + b"\0"
    found: list[int] = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        env = _environ_of(int(name))
        if (
            env is not None
            and (b"\0" + env).find(b"\0" + needle) >= 0
            and not _is_zombie(int(name))
        ):
            found.append(int(name))
    return found


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (IPv4 and IPv6), from ``/proc/net``."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # sl local_address rem_address st ... inode
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def listens_on(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds a socket listening on TCP ``port``."""
    inodes = listening_inodes(port)
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


class DaemonExited(AssertionError):
    """The daemon exited while a test expected it to be serving."""


@dataclass
class Run:
    """One start of the daemon: its process and where its output goes."""

    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stderr(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        """Standard output and error so far (twistd logs to stdout, ztick-tw to stderr)."""
        return self.stdout_path.read_text(errors="replace") + self.stderr()

    def alive(self) -> bool:
        return self.process.poll() is None


class Daemon:
    """A working directory, a config and the daemon processes started from them.

    ``config`` sections are merged over the defaults: listen on this daemon's port on
    127.0.0.1, logfile ``ztick.log`` in the working directory, fsync on, a short
    ``shutdown_grace``.
    """

    def __init__(
        self,
        workdir: Path,
        config: Mapping[str, Mapping[str, TomlValue]] | None = None,
        *,
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.tag = uuid.uuid4().hex
        self.config_path = workdir / "ztick.toml"
        self.logfile = workdir / "ztick.log"
        self.runs: list[Run] = []
        self._clients: list[LineClient] = []
        sections: dict[str, dict[str, TomlValue]] = {
            "controller": {"listen": f"tcp:{self.port}:interface=127.0.0.1"},
            "database": {"logfile_path": "ztick.log", "fsync_on_persist": True},
            "scheduler": {"shutdown_grace": 0.5},
        }
        for section, keys in (config or {}).items():
            sections.setdefault(section, {}).update(keys)
        self.write_config(sections)

    def write_config(self, sections: Mapping[str, Mapping[str, TomlValue]]) -> None:
        """(Re)write the config file."""
        self.config_path.write_text(render_toml(sections))

    # -- starting ---------------------------------------------------------------------------

    def command(self, how: str, extra: Sequence[str] = ()) -> list[str]:
        """The command line for ``how``: ``module``, ``script`` or ``twistd``."""
        config = ["-c", str(self.config_path)]
        if how == "module":
            return [sys.executable, "-m", "ztick_tw", *config, *extra]
        if how == "script":
            return [str(BIN_DIR / "ztick-tw"), *config, *extra]
        if how == "twistd":
            return [str(BIN_DIR / "twistd"), "-n", "ztick", *config, *extra]
        raise ValueError(f"unknown way to start the daemon: {how!r}")

    def spawn(self, argv: Sequence[str]) -> Run:
        """Start ``argv`` in the working directory, output to files; no waiting."""
        previous = self.current
        if previous is not None and previous.alive():
            raise AssertionError(f"daemon pid {previous.pid} is still running")
        n = len(self.runs)
        stdout_path = self.workdir / f"daemon-{n}.out"
        stderr_path = self.workdir / f"daemon-{n}.err"
        env = dict(os.environ)
        env[TAG_VARIABLE] = self.tag
        env["PYTHONUNBUFFERED"] = "1"
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            process = subprocess.Popen(
                list(argv),
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        run = Run(process, stdout_path, stderr_path)
        self.runs.append(run)
        return run

    def start(self, how: str = "module", extra: Sequence[str] = ()) -> Run:
        """Start the daemon and wait until it listens on its port (bounded)."""
        run = self.spawn(self.command(how, extra))
        self.wait_listening(run)
        return run

    def wait_listening(self, run: Run, port: int | None = None) -> None:
        """Wait until ``run``'s own process listens on the port and it accepts a connection.

        (Checking the owner of the listening socket means a test never talks to some
        other program that happens to hold the port.)
        """
        port = port if port is not None else self.port
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not run.alive():
                raise DaemonExited(
                    f"daemon {run.process.args!r} exited with status"
                    f" {run.process.returncode} before listening on port {port};"
                    f" its output:\n{run.output()}"
                )
            if listens_on(run.pid, port):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                        return
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"daemon pid {run.pid} not listening on 127.0.0.1:{port} after"
                    f" {START_TIMEOUT:g}s; its output:\n{run.output()}"
                )
            time.sleep(0.05)

    def run_to_exit(self, how: str = "module", extra: Sequence[str] = ()) -> Run:
        """Start the daemon expecting it to exit by itself (a startup error); wait for it."""
        run = self.spawn(self.command(how, extra))
        try:
            run.process.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"daemon pid {run.pid} still running after {START_TIMEOUT:g}s although it"
                f" was expected to exit; its output:\n{run.output()}"
            ) from None
        return run

    @property
    def current(self) -> Run | None:
        return self.runs[-1] if self.runs else None

    def _running(self) -> Run:
        run = self.current
        if run is None or not run.alive():
            raise DaemonExited(
                "the daemon is not running"
                + (f"; its output:\n{run.output()}" if run is not None else "")
            )
        return run

    # -- stopping ---------------------------------------------------------------------------

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM the daemon and wait for it (bounded); returns its exit status."""
        run = self._running()
        self.close_clients()
        run.process.send_signal(signal.SIGTERM)
        try:
            return run.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.process.kill()
            run.process.wait(timeout=timeout)
            raise AssertionError(
                f"daemon pid {run.pid} did not exit within {timeout:g}s of SIGTERM (killed);"
                f" its output:\n{run.output()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the daemon (a crash) and reap it.  Its jobs keep running."""
        run = self._running()
        run.process.kill()
        run.process.wait(timeout=STOP_TIMEOUT)
        self.close_clients()

    def wait_no_children(self, timeout: float = WAIT_TIMEOUT) -> None:
        """Wait until no process started for this daemon (jobs included) is left."""
        wait_until(
            lambda: not tagged_pids(self.tag),
            "the jobs of the stopped daemon to finish",
            timeout=timeout,
            on_timeout=lambda: f"still running: {tagged_pids(self.tag)}",
        )

    def close_clients(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()

    def cleanup(self) -> None:
        """Kill (by pid) whatever this daemon left running: the daemon, then its jobs."""
        self.close_clients()
        for run in self.runs:
            if run.alive():
                run.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.process.wait(timeout=STOP_TIMEOUT)
        for _ in range(50):
            pids = tagged_pids(self.tag)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    # -- talking ----------------------------------------------------------------------------

    def client(self, timeout: float = SOCKET_TIMEOUT) -> LineClient:
        """A new connection to the running daemon (closed by ``stop``/``cleanup``)."""
        self._running()
        client = LineClient(self.port, timeout=timeout)
        self._clients.append(client)
        return client

    def dump(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ztick-tw dump <logfile> args...`` (the console script), run to completion."""
        return subprocess.run(
            [str(BIN_DIR / "ztick-tw"), "dump", str(self.logfile), *args],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@contextlib.contextmanager
def daemon(
    workdir: Path,
    config: Mapping[str, Mapping[str, TomlValue]] | None = None,
    *,
    port: int | None = None,
) -> Iterator[Daemon]:
    """A ``Daemon`` that is always cleaned up (processes killed) when the block ends."""
    d = Daemon(workdir, config, port=port)
    try:
        yield d
    finally:
        d.cleanup()


# ------------------------------------------------------------------------------- client


class LineClient:
    """A blocking line-protocol client; every operation times out after ``timeout`` s."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = SOCKET_TIMEOUT):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self._buffer = b""
        self._next_id = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> LineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def new_id(self) -> str:
        self._next_id += 1
        return f"q{self._next_id}"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_lines(self, lines: Sequence[str]) -> None:
        """Send ``lines`` (each gets a newline) in one ``sendall``: pipelined."""
        self.sock.sendall("".join(f"{line}\n" for line in lines).encode())

    def read_line(self) -> str:
        """The next line without its newline; fails on EOF or timeout."""
        while b"\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"EOF from the daemon; unterminated data {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def read_to_eof(self) -> bytes:
        """Everything until the server closes the connection (bounded by the timeout)."""
        data, self._buffer = self._buffer, b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def read_response(self, request_id: str) -> list[str]:
        """The lines answering ``request_id``, up to its ``OK``/``ERROR`` line (included)."""
        lines: list[str] = []
        while True:
            line = self.read_line()
            tokens = line.split(" ")
            if tokens[0] != request_id:
                raise AssertionError(f"expected an answer to {request_id}, got {line!r}")
            lines.append(line)
            if len(tokens) >= 2 and tokens[1] in ("OK", "ERROR"):
                return lines

    def call(self, request: str) -> list[str]:
        """Send ``<fresh id> <request>`` and return the answer lines, ids stripped."""
        request_id = self.new_id()
        self.send_lines([f"{request_id} {request}"])
        return [line[len(request_id) + 1 :] for line in self.read_response(request_id)]

    def ok(self, request: str) -> str:
        """``call`` expecting one ``OK`` line; returns what follows ``OK`` (maybe empty)."""
        answer = self.call(request)
        if len(answer) != 1 or not (answer[0] == "OK" or answer[0].startswith("OK ")):
            raise AssertionError(f"{request!r} answered {answer!r}, expected OK")
        return answer[0][3:]

    def get(self, job_id: str) -> tuple[str, int] | None:
        """``(status, execution_ns)`` of a job, or ``None`` when GET says ERROR."""
        answer = self.call(f"GET {quote(job_id)}")
        if answer == ["ERROR"]:
            return None
        status, ns = self._single_ok(answer).split(" ")
        return status, int(ns)

    def query(self, prefix: str = "") -> dict[str, tuple[str, int]]:
        """``{job: (status, ns)}`` for the jobs QUERY returns for ``prefix``."""
        answer = self.call(f"QUERY {quote(prefix)}")
        if answer[-1] != "OK":
            raise AssertionError(f"QUERY {prefix!r} answered {answer!r}")
        jobs: dict[str, tuple[str, int]] = {}
        for line in answer[:-1]:
            job_id, status, ns = line.split(" ")
            jobs[job_id] = (status, int(ns))
        return jobs

    def rules(self) -> list[str]:
        """LISTRULES lines, request ids stripped, without the final ``OK``."""
        answer = self.call("LISTRULES")
        if answer[-1] != "OK":
            raise AssertionError(f"LISTRULES answered {answer!r}")
        return answer[:-1]

    def stat(self) -> dict[str, str]:
        """STAT as a dict."""
        answer = self.call("STAT")
        if answer[-1] != "OK":
            raise AssertionError(f"STAT answered {answer!r}")
        stats: dict[str, str] = {}
        for line in answer[:-1]:
            key, _, value = line.partition(" ")
            stats[key] = value
        return stats

    @staticmethod
    def _single_ok(answer: list[str]) -> str:
        if len(answer) != 1 or not answer[0].startswith("OK "):
            raise AssertionError(f"expected one 'OK ...' line, got {answer!r}")
        return answer[0][3:]


def wait_status(
    client: LineClient, job_id: str, statuses: Sequence[str], timeout: float = WAIT_TIMEOUT
) -> str:
    """Poll GET until the job's status is one of ``statuses``; returns it."""
    seen: list[tuple[str, int] | None] = []

    def check() -> str | None:
        got = client.get(job_id)
        seen[:] = [got]
        return got[0] if got is not None and got[0] in statuses else None

    return wait_until(
        check,
        f"job {job_id} to be {'/'.join(statuses)}",
        timeout=timeout,
        interval=0.05,
        on_timeout=lambda: f"last GET: {seen}",
    )


def wait_all_executed(
    client: LineClient, prefix: str, count: int, timeout: float = WAIT_TIMEOUT
) -> dict[str, tuple[str, int]]:
    """Poll QUERY until exactly ``count`` jobs match ``prefix``, all ``executed``."""
    seen: list[dict[str, tuple[str, int]]] = [{}]

    def check() -> dict[str, tuple[str, int]] | None:
        jobs = client.query(prefix)
        seen[0] = jobs
        if len(jobs) == count and all(status == "executed" for status, _ in jobs.values()):
            return jobs
        return None

    return wait_until(
        check,
        f"{count} jobs {prefix}* to be executed",
        timeout=timeout,
        interval=0.05,
        on_timeout=lambda: f"last QUERY {prefix}: {seen[0]}",
    )


def read_lines(path: Path) -> list[str]:
    """The lines of a text file, or ``[]`` when it does not exist yet."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []
