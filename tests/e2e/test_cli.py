"""``ztick-tw cli`` through a real pseudo-terminal, and the one-shot subcommands as processes.

The daemon is the real one (tests/e2e/daemon.py); the CLI runs as the ``ztick-tw``
console script with ``TZ`` set, so times print predictably.  The pty is read with
``os.read`` until an expected text appears, within a deadline.
"""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import BIN_DIR, Daemon, daemon, now_ns, wait_until

FAR = 1_893_898_800_000_000_000  # 2030-01-06 03:00:00 UTC
DEADLINE = 15.0


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module's tests."""
    with daemon(tmp_path_factory.mktemp("cli")) as d:
        d.start()
        yield d


def env(tmp: Path, tz: str = "UTC") -> dict[str, str]:
    """The CLI's environment: a fixed TZ, a private HOME and history file."""
    return dict(os.environ, TZ=tz, HOME=str(tmp), ZTICK_TW_HISTFILE=str(tmp / "hist"), TERM="dumb")


def cli(d: Daemon, tmp: Path, *words: str, tz: str = "UTC") -> subprocess.CompletedProcess[str]:
    """Run ``ztick-tw WORDS --port PORT`` to completion."""
    return subprocess.run(
        [str(BIN_DIR / "ztick-tw"), *words, "--port", str(d.port)],
        env=env(tmp, tz),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Terminal:
    """``ztick-tw cli`` on a pseudo-terminal."""

    def __init__(self, d: Daemon, tmp: Path) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.process = subprocess.Popen(
            [str(BIN_DIR / "ztick-tw"), "cli", "--port", str(d.port)],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env(tmp),
            start_new_session=True,
        )
        os.close(slave)
        self.prompt = f"127.0.0.1:{d.port}> ".encode()

    def read_until(self, token: bytes) -> bytes:
        """Everything read until ``token`` appears (fails after the deadline)."""
        seen = b""
        deadline = time.monotonic() + DEADLINE
        while token not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{token!r} not seen; the terminal showed {seen!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # EIO: the CLI has exited
                    chunk = b""
                assert chunk, f"the CLI exited before {token!r}; it showed {seen!r}"
                seen += chunk
        return seen

    def type(self, text: str) -> None:
        """Type ``text`` (a carriage return is Enter, a tab is Tab, 0x04 is Ctrl-D)."""
        os.write(self.master, text.encode())

    def command(self, line: str) -> str:
        """Type a line and Enter; the answer shown before the next prompt."""
        self.type(line + "\r")
        shown = self.read_until(self.prompt).decode()
        return shown.split("\r\n", 1)[1].rsplit(self.prompt.decode(), 1)[0]

    def close(self) -> None:
        """Kill the CLI if it still runs; close the pty."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=DEADLINE)
        os.close(self.master)


@pytest.fixture
def terminal(running: Daemon, tmp_path: Path) -> Iterator[Terminal]:
    """A CLI session at its first prompt."""
    t = Terminal(running, tmp_path)
    try:
        t.read_until(t.prompt)
        yield t
    finally:
        t.close()


def test_interactive_human_times_and_local_iso_answers(
    terminal: Terminal, running: Daemon
) -> None:
    """``SET job in 5m`` stores now+5m; GET shows local ISO with nine fraction digits."""
    before = now_ns()
    assert terminal.command("SET it.soon in 5m").startswith("OK ")
    job = running.client().get("it.soon")
    assert job is not None and before + 300 * 10**9 <= job[1] <= now_ns() + 300 * 10**9
    assert terminal.command("SET it.fixed 2030-01-06 03:00") == (
        "OK 2030-01-06T03:00:00.000000000+00:00\r\n"
    )
    assert terminal.command("GET it.fixed") == "planned 2030-01-06T03:00:00.000000000+00:00\r\n"
    assert terminal.command("get it.none") == "(error) ERROR\r\n"
    assert terminal.command("SET it.bad in 5 parsecs").startswith("(usage) ")
    assert terminal.command('SCHEDULE GET "it.none"') == "(error) ERROR no job 'it.none'\r\n"


def test_tab_completion_and_history_file(terminal: Terminal, tmp_path: Path) -> None:
    """Tab completes instruction words; the lines typed are saved in the history file."""
    terminal.type("SCH\t")
    terminal.read_until(b"SCHEDULE ")
    terminal.type("SE\t")
    terminal.read_until(b"SET ")
    shown = terminal.command('it.sched "every 5 minutes"')
    assert shown.startswith("OK first run ")
    assert terminal.command("LISTSCH\tit.").startswith('it.sched "every 5 minutes" ')
    terminal.type("\x04")
    assert terminal.process.wait(timeout=DEADLINE) == 0
    history = (tmp_path / "hist").read_text().splitlines()
    assert history[-2:] == ['SCHEDULE SET it.sched "every 5 minutes"', "LISTSCHEDULES it."]


def test_one_shot_get_json_and_exit_statuses(running: Daemon, tmp_path: Path) -> None:
    """``ztick-tw get job --json`` prints the job; 1 on ERROR, 2 on usage."""
    assert cli(running, tmp_path, "set", "os.job", str(FAR)).returncode == 0
    got = cli(running, tmp_path, "get", "os.job", "--json")
    assert got.returncode == 0
    assert json.loads(got.stdout) == {
        "id": "os.job",
        "status": "planned",
        "execution_ns": FAR,
        "execution": "2030-01-06T03:00:00.000000000Z",
    }
    missing = cli(running, tmp_path, "get", "os.none")
    assert (missing.returncode, missing.stdout, missing.stderr) == (1, "", "ERROR\n")
    bad = cli(running, tmp_path, "set", "os.job", "whenever")
    assert bad.returncode == 2 and "is not a time" in bad.stderr
    assert cli(running, tmp_path, "get").returncode == 2
    assert cli(running, tmp_path, "schedule").returncode == 2


def test_one_shot_local_time_and_schedule_words(running: Daemon, tmp_path: Path) -> None:
    """Times are read and shown in the TZ of the CLI; schedule words are subcommands."""
    done = cli(running, tmp_path, "set", "os.paris", "2030-07-01", "02:00", tz="Europe/Paris")
    assert done.stdout == "OK 2030-07-01T02:00:00.000000000+02:00\n"
    assert running.client().get("os.paris") == (
        "planned",
        1_909_094_400 * 10**9,
    )  # 2030-07-01 00:00 UTC
    made = cli(running, tmp_path, "schedule", "set", "os.s", "0 6 * * *", "tz=Europe/Paris")
    assert made.returncode == 0 and made.stdout.startswith("OK first run ")
    view = json.loads(cli(running, tmp_path, "schedule", "get", "os.s", "--json").stdout)
    assert (view["schedule"], view["options"]["tz"], view["paused"]) == (
        "0 6 * * *",
        "Europe/Paris",
        False,
    )
    failed = cli(running, tmp_path, "preview", "every 0 minutes")
    assert failed.returncode == 1 and "never fires" in failed.stderr


def test_one_shot_without_a_daemon_is_status_1(tmp_path: Path) -> None:
    """Nothing listening: a clear message on stderr and status 1."""
    with daemon(tmp_path / "none") as d:  # its port, never started
        done = cli(d, tmp_path, "stat")
    assert done.returncode == 1 and "cannot talk to 127.0.0.1" in done.stderr


def accepts(path: Path) -> bool:
    """Whether a UNIX socket at ``path`` accepts a connection now."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def test_one_shot_over_a_unix_socket(tmp_path: Path) -> None:
    """``--unix PATH`` talks to a daemon listening on a UNIX socket."""
    sock = tmp_path / "z.sock"
    with daemon(tmp_path / "u", {"controller": {"listen": f"unix:{sock}:mode=600"}}) as d:
        run = d.spawn(d.command("module"))
        wait_until(lambda: accepts(sock) or not run.alive(), "the UNIX socket to accept")
        words = ["set", "us.job", str(FAR), "--unix", str(sock)]
        done = subprocess.run(
            [str(BIN_DIR / "ztick-tw"), *words], env=env(tmp_path), capture_output=True,
            text=True, timeout=60, check=False,
        )  # fmt: skip
        assert (done.returncode, done.stdout) == (0, "OK 2030-01-06T03:00:00.000000000+00:00\n")
        got = cli(d, tmp_path, "get", "us.job", "--unix", str(sock), "--json")
        assert json.loads(got.stdout)["execution_ns"] == FAR


def test_help_lists_instructions_and_options(running: Daemon, tmp_path: Path) -> None:
    """``--help`` on a subcommand or on ``cli`` prints the instructions and options, 0."""
    for words in (["get", "--help"], ["cli", "-h"]):
        done = cli(running, tmp_path, *words)
        assert done.returncode == 0
        assert "SCHEDULE SET <job>" in done.stdout and "--unix PATH" in done.stdout
