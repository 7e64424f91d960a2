"""A real RabbitMQ broker for the tests: a private node on loopback, started once per session.

``RabbitMQServer`` runs Debian's ``rabbitmq-server`` (3.10) as the current user in a
temporary directory: its own Erlang port mapper (epmd), node name, ports, database, logs,
config and Erlang cookie, so it neither uses nor disturbs the system service.  It listens
on 127.0.0.1 only: AMQP on ``port``, AMQP over TLS on ``tls_port`` (certificates from
``tests/certs.py``; clients verify against ``ca_file``) and the Erlang distribution port.

The session fixture ``rabbitmq`` starts it once (that takes a few seconds); tests keep to
themselves by using queue names of their own.  The blocking helpers (``declare_queue``,
``get_messages``, ``ctl``) are for test code only, never for code under test.

The broker and its epmd are stopped at the end of the session, also when a test fails or
the run is interrupted (an ``atexit`` hook backs up the fixture's finalizer, and a small
watchdog process kills them if the test process dies without cleaning up).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
import pytest

from tests.certs import PKI, cert_pem, make_pki
from tests.ports import free_port

#: What Debian installs; the packaged wrapper insists on ``su rabbitmq``, so the real
#: scripts (which run as the calling user) are used instead.
RABBITMQ_SERVER = "/usr/sbin/rabbitmq-server"
SCRIPTS_DIR = "/usr/lib/rabbitmq/bin"
INSTALL_HINT = "apt-get install rabbitmq-server"

#: How long a start may take before the fixture gives up.
START_TIMEOUT = 90.0
#: How long a graceful stop may take before the node is killed.
STOP_TIMEOUT = 30.0

#: Erlang arguments keeping the node's (and the CLI's) distribution listener on loopback.
_LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"


#: Run beside the broker: if the test process dies without stopping it (SIGKILL, a
#: crashed interpreter), kill the broker's process group and epmd.
_WATCHDOG = """
import os, signal, sys, time
owner, group, epmd = (int(a) for a in sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        break
    time.sleep(0.5)
for kill in (lambda: os.killpg(group, signal.SIGKILL), lambda: os.kill(epmd, signal.SIGTERM)):
    try:
        kill()
    except OSError:
        pass
"""


def _epmd_binary() -> str | None:
    found = shutil.which("epmd")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd"))
    return candidates[-1] if candidates else None


def rabbitmq_available() -> bool:
    """True when the broker scripts and Erlang's epmd are installed."""
    return (
        os.path.exists(RABBITMQ_SERVER)
        and os.access(os.path.join(SCRIPTS_DIR, "rabbitmq-server"), os.X_OK)
        and os.access(os.path.join(SCRIPTS_DIR, "rabbitmqctl"), os.X_OK)
        and _epmd_binary() is not None
    )


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RabbitMQError(RuntimeError):
    """The broker did not start, or a helper command failed."""


class RabbitMQServer:
    """One private RabbitMQ node on 127.0.0.1 (see the module docstring).

    The ports and the data directory are chosen once, so ``restart`` brings the same
    node back with its users, vhosts, durable queues and persistent messages.
    """

    def __init__(self, *, tls: bool = True) -> None:
        self.directory = tempfile.mkdtemp(prefix="ztick-tw-rabbitmq-")
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.tls_port: int | None = free_port() if tls else None
        self.node = f"ztick-test-{self.port}@localhost"
        self.pki: PKI | None = None
        self.ca_file: str | None = None
        #: Seconds the last ``start`` took (from spawning epmd to AMQP answering).
        self.startup_seconds = 0.0
        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        self._env = self._environment()
        self._write_files()

    # -- set-up ----------------------------------------------------------------------

    def _path(self, *names: str) -> str:
        return os.path.join(self.directory, *names)

    def _environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_", "NOTIFY_SOCKET"))
        }
        env.update(
            HOME=self.directory,  # the Erlang cookie lives here
            LC_ALL="C.UTF-8",
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_EPMD_PORT=str(self.epmd_port),
            RABBITMQ_MNESIA_BASE=self._path("mnesia"),
            RABBITMQ_LOG_BASE=self._path("log"),
            RABBITMQ_ENABLED_PLUGINS_FILE=self._path("enabled_plugins"),
            RABBITMQ_CONFIG_FILE=self._path("rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=self._path("advanced.config"),  # never created
            RABBITMQ_CONF_ENV_FILE=self._path("rabbitmq-env.conf"),  # not /etc's
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=_LOOPBACK_DIST,
            RABBITMQ_CTL_ERL_ARGS=_LOOPBACK_DIST,
        )
        return env

    def _write_files(self) -> None:
        os.makedirs(self._path("mnesia"), exist_ok=True)
        os.makedirs(self._path("log"), exist_ok=True)
        with open(self._path("enabled_plugins"), "w") as f:
            f.write("[].\n")  # no plugins at all (no management UI)
        with open(self._path("rabbitmq-env.conf"), "w"):
            pass
        lines = [
            "log.console = false",
            "log.file.level = info",
            "disk_free_limit.absolute = 1MB",
        ]
        if self.tls_port is not None:
            self.pki = make_pki(self._path("pki"))
            # The server sends its chain from cacertfile: root and intermediate.
            bundle = self._path("pki", "server-cas.pem")
            with open(bundle, "wb") as f:
                f.write(cert_pem(self.pki.intermediate.cert, self.pki.ca.cert))
            self.ca_file = self.pki.ca.cert_path
            lines += [
                f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {bundle}",
                f"ssl_options.certfile = {self.pki.server.cert_path}",
                f"ssl_options.keyfile = {self.pki.server.key_path}",
                "ssl_options.verify = verify_none",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        with open(self._path("rabbitmq.conf"), "w") as f:
            f.write("\n".join(lines) + "\n")

    # -- life cycle ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the broker process is alive."""
        return self._server is not None and self._server.poll() is None

    def start(self) -> None:
        """Start epmd and the node, and return once the broker accepts AMQP logins."""
        if self.running:
            return
        began = time.monotonic()
        epmd = _epmd_binary()
        if epmd is None:
            raise RabbitMQError(f"epmd not found; {INSTALL_HINT}")
        # Our own epmd in the foreground (not -daemon), so that we own and can end it.
        self._epmd = subprocess.Popen(
            [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = began + START_TIMEOUT
        while not _listening(self.epmd_port):
            if self._epmd.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RabbitMQError(f"epmd did not start on port {self.epmd_port}")
            time.sleep(0.02)
        with open(self._path("server.out"), "ab") as out:
            self._server = subprocess.Popen(
                [os.path.join(SCRIPTS_DIR, "rabbitmq-server")],
                cwd=self.directory,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: killpg reaches the VM
            )
        self._watchdog = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WATCHDOG,
                str(os.getpid()),
                str(self._server.pid),
                str(self._epmd.pid),
            ],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def _wait_ready(self, deadline: float) -> None:
        params = self.parameters()
        while True:
            if self._server is None or self._server.poll() is not None:
                raise RabbitMQError(f"rabbitmq-server exited during start:\n{self.log_tail()}")
            if _listening(self.port) and (self.tls_port is None or _listening(self.tls_port)):
                try:
                    pika.BlockingConnection(params).close()
                    return
                except pika.exceptions.AMQPError:
                    pass
            if time.monotonic() > deadline:
                raise RabbitMQError(
                    f"rabbitmq-server did not accept AMQP within {START_TIMEOUT:g}s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the node (gracefully, else killed) and epmd; nothing of ours stays running."""
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.terminate()
            watchdog.wait()
        server, self._server = self._server, None
        if server is not None:
            if server.poll() is None:
                # The wrapper script turns TERM into an orderly broker shutdown.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(server.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.wait(STOP_TIMEOUT)
            # Whatever is left of the node's process group (the VM itself) is killed.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        epmd, self._epmd = self._epmd, None
        if epmd is not None and epmd.poll() is None:
            epmd.terminate()
            try:
                epmd.wait(5)
            except subprocess.TimeoutExpired:
                epmd.kill()
                epmd.wait()

    def restart(self) -> None:
        """Stop the node and start it again on the same ports with the same data."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """``stop`` and remove the temporary directory."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def log_text(self) -> str:
        """The node's log file as it is now."""
        with open(self._path("log", f"{self.node}.log"), errors="replace") as f:
            return f.read()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the node's log and console output (for error messages)."""
        chunks: list[str] = []
        for path in (self._path("server.out"), self._path("log", f"{self.node}.log")):
            with contextlib.suppress(OSError), open(path, errors="replace") as f:
                chunks.append(f"--- {path}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(chunks)

    # -- addresses -------------------------------------------------------------------

    def dsn(
        self, user: str = "guest", password: str = "guest", vhost: str = "/", tls: bool = False
    ) -> str:
        """An ``amqp://`` (or ``amqps://`` with ``tls``) DSN for this node."""
        if tls:
            if self.tls_port is None:
                raise RabbitMQError("this broker was started without TLS")
            scheme, port = "amqps", self.tls_port
        else:
            scheme, port = "amqp", self.port
        # "localhost" for TLS: the test certificate names localhost (and 127.0.0.1).
        host = "localhost" if tls else "127.0.0.1"
        auth = f"{quote(user, safe='')}:{quote(password, safe='')}@"
        return f"{scheme}://{auth}{host}:{port}/{quote(vhost, safe='')}"

    def parameters(
        self, user: str = "guest", password: str = "guest", vhost: str = "/"
    ) -> pika.ConnectionParameters:
        """Blocking-client connection parameters (plain AMQP)."""
        return pika.ConnectionParameters(
            host="127.0.0.1",
            port=self.port,
            virtual_host=vhost,
            credentials=pika.PlainCredentials(user, password),
            connection_attempts=1,
            socket_timeout=5,
            blocked_connection_timeout=10,
        )

    # -- blocking helpers for tests --------------------------------------------------

    def ctl(self, *args: str) -> str:
        """Run ``rabbitmqctl -n <node> <args>``; return its output, raise on failure."""
        return self.ctl_parallel(list(args))[0]

    def ctl_parallel(self, *commands: list[str]) -> list[str]:
        """Run several ``rabbitmqctl`` commands at once (each takes ~0.6 s to start).

        Returns their outputs in order; raises if any of them fails.
        """
        started = [
            (
                args,
                subprocess.Popen(
                    [os.path.join(SCRIPTS_DIR, "rabbitmqctl"), "-n", self.node, *args],
                    env=self._env,
                    cwd=self.directory,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                ),
            )
            for args in commands
        ]
        outputs: list[str] = []
        errors: list[str] = []
        for args, process in started:
            try:
                out, err = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
            text = out.decode(errors="replace")
            outputs.append(text)
            if process.returncode != 0:
                errors.append(
                    f"rabbitmqctl {' '.join(args)} exited {process.returncode}:\n"
                    + text
                    + err.decode(errors="replace")
                )
        if errors:
            raise RabbitMQError("\n".join(errors))
        return outputs

    def add_user(self, user: str, password: str, vhost: str) -> None:
        """Create ``vhost`` and ``user`` with full permissions there.

        ``guest`` gets full permissions on ``vhost`` too, so that the blocking helpers
        (which log in as guest) work there.
        """
        self.ctl_parallel(["add_vhost", vhost], ["add_user", user, password])
        self.ctl_parallel(
            ["set_permissions", "-p", vhost, user, ".*", ".*", ".*"],
            ["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        )

    @contextlib.contextmanager
    def channel(
        self, vhost: str = "/"
    ) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
        """A blocking channel as guest on ``vhost``, closed afterwards."""
        connection = pika.BlockingConnection(self.parameters(vhost=vhost))
        try:
            yield connection.channel()
        finally:
            if connection.is_open:
                connection.close()

    def declare_queue(
        self,
        name: str,
        exchange: str = "amq.direct",
        routing_key: str | None = None,
        vhost: str = "/",
        durable: bool = False,
    ) -> str:
        """Declare queue ``name`` bound to ``exchange``; return the routing key.

        ``routing_key`` defaults to the queue name.  ``exchange=""`` binds nothing (the
        default exchange routes by queue name).
        """
        key = name if routing_key is None else routing_key
        with self.channel(vhost) as ch:
            ch.queue_declare(name, durable=durable, auto_delete=False)
            if exchange:
                ch.queue_bind(name, exchange, routing_key=key)
        return key

    def declare_exchange(self, name: str, kind: str = "direct", vhost: str = "/") -> None:
        """Declare a (non-durable) exchange."""
        with self.channel(vhost) as ch:
            ch.exchange_declare(name, exchange_type=kind)

    def get_messages(
        self, queue: str, vhost: str = "/"
    ) -> list[tuple[bytes, pika.BasicProperties]]:
        """Take every message now in ``queue`` (acknowledged, so they are gone)."""
        out: list[tuple[bytes, pika.BasicProperties]] = []
        with self.channel(vhost) as ch:
            while True:
                method, properties, body = ch.basic_get(queue, auto_ack=True)
                if method is None:
                    return out
                out.append((body, properties))

    def message_count(self, queue: str, vhost: str = "/") -> int:
        """How many messages are ready in ``queue``."""
        with self.channel(vhost) as ch:
            count: int = ch.queue_declare(queue, passive=True).method.message_count
            return count

    def delete_queue(self, name: str, vhost: str = "/") -> None:
        """Delete queue ``name`` (if it exists)."""
        with self.channel(vhost) as ch:
            ch.queue_delete(name)


def unique_name(prefix: str = "ztick-test") -> str:
    """A queue/exchange name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


_STARTED: list[RabbitMQServer] = []


@atexit.register
def _stop_leftovers() -> None:
    """Stop any broker the session left running (an interrupted run, a crashed fixture)."""
    while _STARTED:
        _STARTED.pop().cleanup()


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMQServer]:
    """The session's RabbitMQ broker on loopback (see ``RabbitMQServer``).

    Without ``rabbitmq-server`` installed the test is skipped, or failed when ``CI=true``.
    """
    if not rabbitmq_available():
        message = f"rabbitmq-server is not installed ({INSTALL_HINT})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    server = start_fresh()
    try:
        yield server
    finally:
        server.cleanup()
        with contextlib.suppress(ValueError):
            _STARTED.remove(server)


#: What the broker's output says when one of its ports was taken before it bound it.
_PORT_TAKEN = ("could not bind", "already_used", "eaddrinuse")


def start_fresh(attempts: int = 3) -> RabbitMQServer:
    """A started broker on new ports; started again on other ports if one was taken.

    The ports are chosen free, but another process may bind one before the node does;
    a first start (nothing knows the ports yet) can simply choose again.
    """
    for attempt in range(1, attempts + 1):
        server = RabbitMQServer()
        _STARTED.append(server)
        try:
            server.start()
            return server
        except RabbitMQError as error:
            server.cleanup()
            _STARTED.remove(server)
            taken = any(sign in str(error).lower() for sign in _PORT_TAKEN)
            if not taken or attempt == attempts:
                raise
    raise AssertionError("unreachable")
