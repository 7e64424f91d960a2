"""End-to-end security: AUTH, namespaces and the connection cap on the real daemon.

The daemon runs as a user starts it (``python -m ztick_tw -c FILE``) with an auth file of
two tokens; clients talk to it over TCP on 127.0.0.1.  Waits poll with deadlines; no
assertion depends on how long something took.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import (
    Daemon,
    LineClient,
    TomlValue,
    daemon,
    now_ns,
    wait_until,
)

SECOND = 1_000_000_000
ALPHA_SECRET = "alpha-e2e-5ecret-c41f"
ROOT_SECRET = "root-e2e-5ecret-77ad"
SECRETS = (ALPHA_SECRET, ROOT_SECRET)

AUTH_FILE = f"""\
[token.alpha]
secret = "{ALPHA_SECRET}"
namespace = "a."

[token.root]
secret = "{ROOT_SECRET}"
namespace = "*"
"""

#: How long a client waits for the daemon to close a connection it never AUTHed (5 s).
CLOSE_DEADLINE = 20.0


def write_auth_file(directory: Path, text: str = AUTH_FILE, mode: int = 0o600) -> Path:
    """Write ``auth.toml`` in ``directory`` with permission bits ``mode``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "auth.toml"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def auth_config(path: Path, **controller: TomlValue) -> dict[str, dict[str, TomlValue]]:
    """A config that turns auth on with the file at ``path`` (and debug logging)."""
    return {"controller": {"auth_file": str(path), **controller}, "log": {"level": "debug"}}


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon with two tokens (alpha: ``a.``, root: ``*``), auth file mode 600."""
    path = write_auth_file(tmp_path)
    with daemon(tmp_path / "d", auth_config(path)) as d:
        yield d


def login(d: Daemon, secret: str) -> LineClient:
    """A new connection that has sent ``AUTH <secret>`` and got ``OK``."""
    client = d.client()
    client.send(f"AUTH {secret}\n".encode())
    assert client.read_line() == "OK"
    return client


def refused(d: Daemon, payload: bytes) -> bytes:
    """Send ``payload`` on a new connection; everything received until the daemon closes."""
    client = d.client(timeout=CLOSE_DEADLINE)
    client.send(payload)
    return client.read_to_eof()


def test_auth_required_and_namespaces_enforced(secured: Daemon) -> None:
    """Over TCP: AUTH first or ERROR and close; each token acts inside its namespace only."""
    secured.start()
    later = now_ns() + 3600 * SECOND
    assert refused(secured, b"q1 STAT\n") == b"ERROR\n"
    assert refused(secured, b"AUTH not-a-secret\n") == b"ERROR\n"
    assert refused(secured, f"AUTH {ALPHA_SECRET}x\nq SET a.1 5\n".encode()) == b"ERROR\n"

    root = login(secured, ROOT_SECRET)
    root.ok(f"SET b.1 {later}")
    root.ok(f"SET ab.1 {later}")
    root.ok("RULE SET b.r b. shell true")

    alpha = login(secured, ALPHA_SECRET)
    alpha.ok(f"SET a.1 {later}")
    alpha.ok(f"SET a.2 {later}")
    assert alpha.call(f"SET b.2 {later}") == ["ERROR"]
    assert alpha.get("a.1") == ("planned", later)
    assert alpha.get("b.1") is None
    assert alpha.call("REMOVE b.1") == ["ERROR"]
    assert alpha.query() == {"a.1": ("planned", later), "a.2": ("planned", later)}
    assert alpha.query("a") == {"a.1": ("planned", later), "a.2": ("planned", later)}
    assert alpha.query("b.") == {}
    alpha.ok("RULE SET a.r a. shell true")
    assert alpha.call("RULE SET a.x b. shell true") == ["ERROR"]
    assert alpha.call('RULE SET a.y "" shell true') == ["ERROR"]
    assert alpha.call("REMOVERULE b.r") == ["ERROR"]
    assert alpha.rules() == ["a.r a. shell true"]
    assert alpha.stat()["auth_enabled"] == "1"

    assert root.get("b.1") == ("planned", later)
    assert set(root.query()) == {"a.1", "a.2", "ab.1", "b.1"}
    assert root.rules() == ["b.r b. shell true", "a.r a. shell true"]
    assert secured.stop() == 0


def test_client_that_never_auths_is_closed(secured: Daemon) -> None:
    """A client that sends nothing (or only blank lines) is closed by the daemon (5 s).

    An authenticated client connected meanwhile keeps being served.
    """
    secured.start()
    alpha = login(secured, ALPHA_SECRET)
    silent = secured.client(timeout=CLOSE_DEADLINE)
    blank = secured.client(timeout=CLOSE_DEADLINE)
    blank.send(b"\n  \n")
    assert silent.read_to_eof() == b""
    assert blank.read_to_eof() == b""
    assert alpha.stat()["connections"] == "1"
    alpha.ok(f"SET a.after {now_ns() + 3600 * SECOND}")
    run = secured.current
    assert run is not None
    wait_until(
        lambda: run.stderr().count("sent no AUTH within 5s") >= 2 or None,
        "the AUTH timeouts to be logged",
        on_timeout=run.output,
    )
    assert secured.stop() == 0


def test_secrets_never_reach_the_daemon_output(secured: Daemon) -> None:
    """With debug logging, no success, failure or misuse puts a secret in the output."""
    secured.start()
    later = now_ns() + 3600 * SECOND
    alpha = login(secured, ALPHA_SECRET)
    alpha.ok(f"SET a.1 {later}")
    assert alpha.call(f"SET b.1 {later}") == ["ERROR"]
    alpha.send(f"AUTH {ROOT_SECRET}\n".encode())  # after AUTH: an unknown line
    assert alpha.call("GET a.1") == [f"OK planned {later}"]
    assert refused(secured, f"AUTH {ALPHA_SECRET}-wrong\n".encode()) == b"ERROR\n"
    assert refused(secured, f"PASS {ROOT_SECRET}\n".encode()) == b"ERROR\n"
    assert refused(secured, f'AUTH "{ROOT_SECRET}\n'.encode()) == b"ERROR\n"
    assert refused(secured, f"x SET {ALPHA_SECRET} 5\n".encode()) == b"ERROR\n"
    run = secured.current
    assert run is not None
    assert secured.stop() == 0
    output = run.output()
    assert "authenticated as token alpha" in output
    assert "failed to authenticate" in output
    for secret in SECRETS:
        assert secret not in output
    assert not any(secret in secured.config_path.read_text() for secret in SECRETS)


def test_secrets_not_logged_when_auth_is_off(tmp_path: Path) -> None:
    """Without an auth file, ``AUTH <secret>`` is ignored and not logged, even at debug."""
    with daemon(tmp_path / "d", {"log": {"level": "debug"}}) as d:
        run = d.start()
        client = d.client()
        client.send(f"AUTH {ALPHA_SECRET}\n".encode())
        assert client.stat()["auth_enabled"] == "0"
        assert d.stop() == 0
        assert ALPHA_SECRET not in run.output()


def test_world_readable_auth_file_is_warned_about(tmp_path: Path) -> None:
    """An auth file others can read: the daemon starts and logs a warning naming it."""
    path = write_auth_file(tmp_path, mode=0o644)
    with daemon(tmp_path / "d", auth_config(path)) as d:
        run = d.start()
        assert login(d, ALPHA_SECRET).stat()["auth_enabled"] == "1"
        assert d.stop() == 0
        lines = [line for line in run.stderr().splitlines() if "readable by other" in line]
        assert len(lines) == 1, run.output()
        assert str(path) in lines[0]
        assert "644" in lines[0]
        for secret in SECRETS:
            assert secret not in run.output()


def test_private_auth_file_gives_no_warning(secured: Daemon) -> None:
    """A mode-600 auth file starts without the permission warning (and says auth is on)."""
    run = secured.start()
    assert login(secured, ROOT_SECRET).stat()["auth_enabled"] == "1"
    assert secured.stop() == 0
    assert "readable by other" not in run.output()
    assert "authentication on: 2 token(s)" in run.stderr()


DUPLICATE = (
    f'[token.first]\nsecret = "{ALPHA_SECRET}"\nnamespace = "a."\n'
    f'[token.second]\nsecret = "{ALPHA_SECRET}"\nnamespace = "b."\n'
)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        (DUPLICATE, ["[token.first]", "[token.second]"]),
        ('[token.nosecret]\nnamespace = "a."\n', ["[token.nosecret]", "secret"]),
        (
            f'[token.emptyns]\nsecret = "{ALPHA_SECRET}"\nnamespace = ""\n',
            ["[token.emptyns]", "namespace"],
        ),
    ],
)
def test_broken_auth_file_stops_startup(tmp_path: Path, text: str, names: list[str]) -> None:
    """A duplicate secret, a missing secret or an empty namespace stops startup.

    Exit status non-zero, one stderr line naming the file and the token (never the
    secret), and nothing listening.
    """
    path = write_auth_file(tmp_path, text)
    with daemon(tmp_path / "d", auth_config(path)) as d:
        run = d.run_to_exit()
        assert run.process.returncode == 1, run.output()
        lines = [line for line in run.stderr().splitlines() if line.strip()]
        assert len(lines) == 1, run.output()
        assert str(path) in lines[0]
        for name in names:
            assert name in lines[0]
        assert ALPHA_SECRET not in run.output()
        assert not d.logfile.exists()


def test_missing_auth_file_stops_startup(tmp_path: Path) -> None:
    """An auth file that does not exist stops startup with one line naming it."""
    path = tmp_path / "absent.toml"
    with daemon(tmp_path / "d", auth_config(path)) as d:
        run = d.run_to_exit()
        assert run.process.returncode == 1, run.output()
        lines = [line for line in run.stderr().splitlines() if line.strip()]
        assert len(lines) == 1, run.output()
        assert str(path) in lines[0]


def alone(d: Daemon, secret: str | None = None) -> LineClient:
    """A first client, once the daemon counts no other connection.

    (``Daemon.start`` probes the port with a connection of its own; the daemon may
    notice that it closed a moment later.)
    """
    client = login(d, secret) if secret is not None else d.client()
    wait_until(
        lambda: client.stat()["connections"] == "1" or None,
        "the daemon to count only this connection",
    )
    return client


def read_until_eof(client: LineClient) -> tuple[bytes, bool]:
    """Everything received, and whether the daemon closed (False: the socket timed out)."""
    data = b""
    try:
        while chunk := client.sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, False
    return data, True


def served(client: LineClient) -> bool:
    """Whether ``client`` gets an answer to STAT (False when the daemon closed it)."""
    try:
        client.stat()
    except (ConnectionError, OSError):
        return False
    return True


def test_connection_cap_closes_the_extra_client(tmp_path: Path) -> None:
    """With ``max_connections = 3`` the 4th client is closed; the first three still work.

    When one of the three leaves, a new client is served again; the refusal is logged.
    """
    with daemon(tmp_path / "d", {"controller": {"max_connections": 3}}) as d:
        run = d.start()
        later = now_ns() + 3600 * SECOND
        clients = [alone(d)] + [d.client() for _ in range(2)]
        for i, client in enumerate(clients):
            client.ok(f"SET c.{i} {later}")  # a round trip: the daemon has counted it
        fourth = d.client()
        assert fourth.read_to_eof() == b""
        for client in clients:
            assert client.stat()["connections"] == "3"
        assert clients[0].query("c.") == {f"c.{i}": ("planned", later) for i in range(3)}
        wait_until(
            lambda: "connection limit reached" in run.stderr() or None,
            "the refusal to be logged",
            on_timeout=run.output,
        )
        clients[0].close()

        def new_client_served() -> bool:
            try:
                client = d.client()
            except OSError:
                return False
            return served(client)

        wait_until(new_client_served, "a new client to be served after one left")
        assert served(clients[1])
        assert d.stop() == 0


def test_connection_cap_with_auth(tmp_path: Path) -> None:
    """The cap also holds with auth on: the extra client is closed before any AUTH."""
    path = write_auth_file(tmp_path)
    with daemon(tmp_path / "d", auth_config(path, max_connections=3)) as d:
        d.start()
        clients = [alone(d, ALPHA_SECRET)] + [login(d, ALPHA_SECRET) for _ in range(2)]
        extra = d.client()
        assert extra.read_to_eof() == b""
        for client in clients:
            assert client.stat()["connections"] == "3"
        assert d.stop() == 0


def test_idle_timeout_from_config_closes_a_silent_client(tmp_path: Path) -> None:
    """``[controller] idle_timeout`` closes a client that sends nothing; others carry on."""
    with daemon(tmp_path / "d", {"controller": {"idle_timeout": 1}}) as d:
        run = d.start()
        silent = d.client(timeout=CLOSE_DEADLINE)
        assert silent.read_to_eof() == b""
        wait_until(
            lambda: "closing the idle connection" in run.stderr() or None,
            "the idle close to be logged",
            on_timeout=run.output,
        )
        assert "auth_enabled" in d.client().stat()
        assert d.stop() == 0


def test_half_closed_client_with_large_answer_gets_eof(tmp_path: Path) -> None:
    """A pipelined batch whose answers exceed 64 KiB, then half-close: answers, then EOF.

    SPEC §1: answers come back after the client half-closed (``echo ... | socat``), and
    then the daemon closes the connection.  The STATs wait behind the SET's fsync.
    """
    with daemon(tmp_path / "d") as d:
        d.start()
        client = d.client(timeout=CLOSE_DEADLINE)
        stats = 200
        client.send(f"s SET j {now_ns() + 3600 * SECOND}\n".encode() + b"q STAT\n" * stats)
        client.sock.shutdown(socket.SHUT_WR)
        data, eof = read_until_eof(client)
        lines = data.decode().splitlines()
        assert lines[0] == "s OK"
        assert lines.count("q OK") == stats
        assert lines[-1] == "q OK"
        assert eof, f"every answer arrived but no EOF within {CLOSE_DEADLINE:g}s"
        assert d.stop() == 0
