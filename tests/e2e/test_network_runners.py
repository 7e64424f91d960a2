"""End-to-end: the real daemon delivers jobs over http, redis and amqp to real servers.

Each test starts ``python -m ztick_tw`` and talks to it over TCP like a user; the
receivers are real: an ``http.server`` in a thread of the test process, the session's
``redis-server`` and RabbitMQ broker (``tests/redis_server.py``,
``tests/rabbitmq_server.py``).  Failures (server down, auth refused, status 500, a
server that never answers) must fail their job and not hold up the others.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.daemon import (
    Daemon,
    LineClient,
    daemon,
    now_ns,
    quote,
    wait_all_executed,
    wait_status,
    wait_until,
)
from tests.e2e.webhook import HookServer, serving_hook
from tests.ports import free_port
from tests.rabbitmq_server import RabbitMQServer, unique_name
from tests.redis_server import RedisServer

SECOND = 1_000_000_000


# --------------------------------------------------------------------------- receivers


@pytest.fixture
def hook() -> Iterator[HookServer]:
    """A webhook receiver on a free loopback port, served from a thread."""
    with serving_hook() as server:
        yield server


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never answers (a hung remote end)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    return free_port()


@pytest.fixture
def ztick(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon setup with a short network timeout (3 s) so timeouts end the test quickly."""
    with daemon(tmp_path / "d", {"runners": {"timeout": 3}}) as d:
        yield d


def _now_jobs(client: LineClient, ids: list[str]) -> None:
    """SET every job due now, pipelined."""
    ns = now_ns()
    answers = [client.ok(f"SET {quote(job)} {ns}") for job in ids]
    assert answers == [""] * len(ids)


# -------------------------------------------------------------------------------- http


def test_http_post_delivers_ztick_body(ztick: Daemon, hook: HookServer) -> None:
    """A POST rule sends ztick's JSON body for each job and marks it executed."""
    ztick.start()
    with ztick.client() as c:
        c.ok(f"RULE SET r.hook hook. http POST {hook.base}/in")
        c.ok("SET hook.a 1000")
        c.ok("SET hook.b 2000")
        wait_all_executed(c, "hook.", 2)
    bodies = sorted(hook.bodies("/in"))
    assert bodies == [
        b'{"job_id":"hook.a","execution":1000}',
        b'{"job_id":"hook.b","execution":2000}',
    ]
    headers = [h for _, _, h, _ in hook.requests]
    assert all(h["Content-Type"] == "application/json" for h in headers)
    assert sorted(h["X-Ztick-Job-Id"] for h in headers) == ["hook.a", "hook.b"]


def test_http_failures_fail_their_jobs_without_delaying_others(
    ztick: Daemon, hook: HookServer
) -> None:
    """500, refused and a hung server each fail their job; the others are not held up.

    Good jobs due at the same moment are executed while the hung delivery is still
    waiting for its answer.
    """
    ztick.start()
    with silent_server() as hung_port, ztick.client() as c:
        c.ok(f"RULE SET r.ok ok. http PUT {hook.base}/fine")
        c.ok(f"RULE SET r.500 bad500. http POST {hook.base}/status/500")
        c.ok(f"RULE SET r.refused refused. http GET http://127.0.0.1:{closed_port()}/x")
        c.ok(f"RULE SET r.hung hung. http POST http://127.0.0.1:{hung_port}/x")
        ns = now_ns()
        c.ok(f"SET hung.1 {ns}")
        for i in range(20):
            c.ok(f"SET ok.{i} {ns}")
        c.ok(f"SET bad500.1 {ns}")
        c.ok(f"SET refused.1 {ns}")
        wait_all_executed(c, "ok.", 20)
        assert c.get("hung.1") == ("triggered", ns), "the hung delivery ended too early"
        assert wait_status(c, "bad500.1", ["failed", "executed"]) == "failed"
        assert wait_status(c, "refused.1", ["failed", "executed"]) == "failed"
        assert wait_status(c, "hung.1", ["failed", "executed"]) == "failed"
    log = ztick.current.output() if ztick.current else ""
    assert "status 500" in log
    assert "timed out after 3" in log
    assert "refused" in log


def test_http_credentials_never_reach_the_log(ztick: Daemon, hook: HookServer) -> None:
    """A URL's password and query token are used for the request but never logged."""
    ztick.start()
    url = hook.base.replace("http://", "http://alice:pa55word@") + "/status/503?token=t0ken"
    with ztick.client() as c:
        c.ok(f"RULE SET r.secret sec. http POST {url}")
        c.ok("SET sec.1 0")
        assert wait_status(c, "sec.1", ["failed", "executed"]) == "failed"
    (_, path, headers, _), *_ = hook.requests
    assert path == "/status/503?token=t0ken"
    assert headers["Authorization"].startswith("Basic ")
    log = ztick.current.output() if ztick.current else ""
    assert "status 503" in log
    assert "pa55word" not in log
    assert "t0ken" not in log


def test_http_json_format_and_signature(tmp_path: Path, hook: HookServer) -> None:
    """With message_format json and a signing secret, receivers get the rich document.

    The signature header verifies with the receiver's copy of the secret.
    """
    import hashlib
    import hmac

    secret = tmp_path / "hook.secret"
    secret.write_text("shared-secret\n")
    secret.chmod(0o600)
    config = {"runners": {"message_format": "json", "http_signing_secret_file": str(secret)}}
    with daemon(tmp_path / "d", config) as d:
        d.start()
        with d.client() as c:
            c.ok(f"RULE SET r.j j. http POST {hook.base}/signed")
            c.ok("SET j.1 5000")
            wait_all_executed(c, "j.", 1)
    (_, _, headers, body), *_ = hook.requests
    document = json.loads(body)
    assert document["job_id"] == "j.1"
    assert document["execution"] == 5000
    assert document["rule_id"] == "r.j"
    assert document["attempt"] == 1
    assert document["fired"] >= 5000
    signed = headers["X-Ztick-Timestamp"].encode() + b".j.1." + body
    expected = "sha256=" + hmac.new(b"shared-secret", signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["X-Ztick-Signature"], expected)


# ------------------------------------------------------------------------------- redis


def test_redis_delivers_job_ids_with_auth_and_db(
    ztick: Daemon, fresh_redis_server: Callable[..., RedisServer]
) -> None:
    """RPUSH, LPUSH, SET and PUBLISH put the job id where a worker looks.

    Delivery is on the URL's database, authenticated with the URL's password.
    """
    server = fresh_redis_server(password="pw-r3dis")
    url = server.url(password="pw-r3dis", db=2)
    ztick.start()
    subscriber = server.subscribe("ztick:events")
    try:
        with ztick.client() as c:
            c.ok(f"RULE SET r.rpush rp. redis {url} RPUSH ztick:jobs")
            c.ok(f"RULE SET r.lpush lp. redis {url} LPUSH ztick:stack")
            c.ok(f"RULE SET r.set st. redis {url} SET ztick:last")
            c.ok(f"RULE SET r.pub pub. redis {url} PUBLISH ztick:events")
            for job in ("rp.1", "rp.2", "lp.1", "lp.2", "st.1", "pub.1"):
                c.ok(f"SET {job} 0")
                wait_status(c, job, ["executed"])
        admin = server.client(password="pw-r3dis")
        admin.command("SELECT", "2")
        assert admin.command("LRANGE", "ztick:jobs", "0", "-1") == [b"rp.1", b"rp.2"]
        assert admin.command("LRANGE", "ztick:stack", "0", "-1") == [b"lp.2", b"lp.1"]
        assert admin.command("GET", "ztick:last") == b"st.1"
        assert subscriber.next_message(10) == (b"ztick:events", b"pub.1")
        admin.command("SELECT", "0")
        assert admin.command("EXISTS", "ztick:jobs") == 0
    finally:
        subscriber.close()


def test_redis_failures_fail_their_jobs_and_recovery_needs_no_restart(
    ztick: Daemon, fresh_redis_server: Callable[..., RedisServer]
) -> None:
    """A wrong password, an error reply and a dead server fail their jobs; others go on.

    Once the server is back, later jobs are delivered by the same daemon.
    """
    server = fresh_redis_server(password="right")
    ztick.start()
    with ztick.client() as c:
        c.ok(f"RULE SET r.good good. redis {server.url(password='right')} RPUSH q")
        c.ok(f"RULE SET r.auth auth. redis {server.url(password='wrong-pw')} RPUSH q")
        c.ok(f"RULE SET r.type type. redis {server.url(password='right')} RPUSH s")
        server.client(password="right").command("SET", "s", "a string")
        ns = now_ns()
        for job in ("auth.1", "type.1", *(f"good.{i}" for i in range(10))):
            c.ok(f"SET {job} {ns}")
        wait_all_executed(c, "good.", 10)
        assert wait_status(c, "auth.1", ["failed", "executed"]) == "failed"
        assert wait_status(c, "type.1", ["failed", "executed"]) == "failed"

        server.stop()
        c.ok("SET good.down 0")
        assert wait_status(c, "good.down", ["failed", "executed"]) == "failed"
        server.start()

        def delivered() -> bool | None:
            c.ok("SET good.again 0")
            return wait_status(c, "good.again", ["failed", "executed"]) == "executed" or None

        wait_until(delivered, "a job to reach the restarted redis", timeout=60, interval=0.5)
    log = ztick.current.output() if ztick.current else ""
    assert "WRONGTYPE" in log
    assert "auth refused" in log
    assert "wrong-pw" not in log
    delivered_ids = server.client(password="right").command("LRANGE", "q", "0", "-1")
    assert isinstance(delivered_ids, list)
    assert delivered_ids[-1] == b"good.again"


# -------------------------------------------------------------------------------- amqp


def test_amqp_publishes_job_ids_on_the_dsn_vhost(ztick: Daemon, rabbitmq: RabbitMQServer) -> None:
    """One confirmed message per job, body = job id, on the DSN's vhost with its user."""
    queue = unique_name("e2e")
    vhost = unique_name("vh")
    rabbitmq.add_user("e2e-user", "e2e-pw", vhost)
    rabbitmq.declare_queue(queue, "amq.direct", queue, vhost=vhost, durable=True)
    dsn = rabbitmq.dsn("e2e-user", "e2e-pw", vhost)
    ztick.start()
    with ztick.client() as c:
        c.ok(f"RULE SET r.mq mq. amqp {dsn} amq.direct {queue}")
        ns = now_ns()
        for i in range(50):
            c.ok(f"SET mq.{i} {ns}")
        wait_all_executed(c, "mq.", 50)
    messages = rabbitmq.get_messages(queue, vhost=vhost)
    assert sorted(body for body, _ in messages) == sorted(f"mq.{i}".encode() for i in range(50))
    assert all(props.message_id == body.decode() for body, props in messages)
    assert all(props.delivery_mode == 2 for _, props in messages)


def test_amqp_failures_fail_their_jobs_without_delaying_others(
    ztick: Daemon, rabbitmq: RabbitMQServer
) -> None:
    """Refused credentials, a missing exchange and a dead broker fail their jobs only."""
    queue = unique_name("e2e")
    rabbitmq.declare_queue(queue, "amq.direct", queue)
    ztick.start()
    with ztick.client() as c:
        c.ok(f"RULE SET r.good good. amqp {rabbitmq.dsn()} amq.direct {queue}")
        c.ok(f"RULE SET r.auth auth. amqp {rabbitmq.dsn('guest', 'not-the-pw')} amq.direct q")
        c.ok(f"RULE SET r.noex noex. amqp {rabbitmq.dsn()} no-such-exchange q")
        c.ok(f"RULE SET r.down down. amqp amqp://guest:guest@127.0.0.1:{closed_port()}/ x q")
        ns = now_ns()
        for job in ("auth.1", "noex.1", "down.1", *(f"good.{i}" for i in range(20))):
            c.ok(f"SET {job} {ns}")
        wait_all_executed(c, "good.", 20)
        for job in ("auth.1", "noex.1", "down.1"):
            assert wait_status(c, job, ["failed", "executed"]) == "failed", job
    log = ztick.current.output() if ztick.current else ""
    assert "NOT_FOUND" in log
    assert "connection refused" in log
    assert "not-the-pw" not in log
    assert len(rabbitmq.get_messages(queue)) == 20
