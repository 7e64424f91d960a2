"""The REST API of SPEC §7 over real sockets: a daemon process, ``http.client`` clients."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.certs import make_pki
from tests.e2e.daemon import Daemon, daemon, wait_until
from tests.ports import free_port
from ztick_tw.rest.resource import PAGE

Answer = tuple[int, Any, http.client.HTTPResponse]


class Rest:
    """One keep-alive HTTP connection to the daemon's REST listener."""

    def __init__(self, conn: http.client.HTTPConnection, token: str | None = None) -> None:
        self.conn = conn
        self.token = token

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Answer:
        headers = {"content-type": "application/json"}
        if self.token is not None:
            headers["authorization"] = f"Bearer {self.token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        self.conn.request(method, path, body=data, headers=headers)
        response = self.conn.getresponse()
        payload = response.read()
        value = json.loads(payload) if payload and path != "/metrics" else payload
        return response.status, value, response


@pytest.fixture
def rest_daemon(tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    """A daemon with its REST API on a second port, auth off, plain TCP."""
    port = free_port()
    with daemon(tmp_path, {"http": {"listen": f"tcp:{port}:interface=127.0.0.1"}}) as d:
        d.start()
        yield d, port


def _client(port: int, token: str | None = None) -> Rest:
    return Rest(http.client.HTTPConnection("127.0.0.1", port, timeout=10), token)


def test_jobs_round_trip_and_errors(rest_daemon: tuple[Daemon, int]) -> None:
    """PUT/GET/DELETE /jobs/{id} answer ztick's bodies and codes; bad times are 400."""
    _, port = rest_daemon
    c = _client(port)
    assert c.call("GET", "/health")[:2] == (200, {"status": "ok"})
    status, job, _ = c.call("PUT", "/jobs/a.1", {"execution": "2030-01-02T03:04:05.123456789Z"})
    assert status == 200
    assert job == {"id": "a.1", "status": "planned", "execution": 1893553445123456789}
    assert c.call("GET", "/jobs/a.1")[:2] == (200, job)
    status, _, _ = c.call("PUT", "/jobs/a.2", {"execution": "2030-01-02T05:04:05+02:00"})
    assert c.call("GET", "/jobs/a.2")[1]["execution"] == 1893553445000000000
    assert c.call("GET", "/jobs?prefix=a.")[1] == [job, c.call("GET", "/jobs/a.2")[1]]
    for bad in (
        {"execution": "2030-01-02T03:04:05"},
        {"execution": "9999-01-01T00:00:00Z"},
        {"execution": 5},
        {},
        [1],
    ):
        status, error, _ = c.call("PUT", "/jobs/a.3", bad)
        assert status == 400 and "error" in error, bad
    assert c.call("PUT", "/jobs/a.3", raw=b"{not json")[0] == 400
    assert c.call("DELETE", "/jobs/a.1")[0] == 204
    assert c.call("GET", "/jobs/a.1")[0] == 404
    assert c.call("DELETE", "/jobs/a.1")[0] == 404
    assert c.call("GET", "/nowhere")[0] == 404
    assert c.call("POST", "/jobs/a.2")[0] == 405


def test_both_transports_see_the_same_state(rest_daemon: tuple[Daemon, int]) -> None:
    """A SET on the line protocol is a REST GET, a REST PUT a line GET; rules likewise."""
    d, port = rest_daemon
    c = _client(port)
    with d.client() as line:
        assert line.call("SET x.1 2000000000000000000") == ["OK"]
        assert c.call("GET", "/jobs/x.1")[1] == {
            "id": "x.1",
            "status": "planned",
            "execution": 2000000000000000000,
        }
        c.call("PUT", "/jobs/x.2", {"execution": "2033-05-18T03:33:20.5Z"})
        assert line.call("GET x.2") == ["OK planned 2000000000500000000"]
        nested = {
            "pattern": "x.",
            "runner": {"type": "direct", "executable": "/bin/true", "args": ["a b", "c"]},
        }
        status, rule, _ = c.call("PUT", "/rules/r1", nested)
        assert status == 200 and rule == {"id": "r1", **nested}
        flat = {"pattern": "y.", "runner": "awf", "args": ["wf", "--input", "k=v"]}
        status, rule2, _ = c.call("PUT", "/rules/r2", flat)
        assert rule2["runner"] == {"type": "awf", "workflow": "wf", "inputs": ["k=v"]}
        assert line.call("LISTRULES")[-1] == "OK"
        assert "r2 y. awf wf --input k=v" in line.call("LISTRULES")
        assert line.call("RULE SET r3 z. http POST http://127.0.0.1:1/x") == ["OK"]
        rules = c.call("GET", "/rules")[1]
        assert {
            "id": "r3",
            "pattern": "z.",
            "runner": {"type": "http", "method": "POST", "url": "http://127.0.0.1:1/x"},
        } in rules
        bad = {"pattern": "x.", "runner": {"type": "http", "method": "GET", "url": "ftp://x"}}
        assert c.call("PUT", "/rules/r4", bad)[0] == 400
        assert line.call("RULE SET r4 x. http GET ftp://x")[0].startswith("ERROR")
        assert c.call("DELETE", "/rules/r3")[0] == 204
        assert c.call("DELETE", "/rules/r3")[0] == 404
        stat = c.call("GET", "/stat")[1]
        assert stat["jobs_total"] == 2 and stat["rules_total"] == 2
        assert stat["connections"] >= 2


def test_extensions(rest_daemon: tuple[Daemon, int]) -> None:
    """Schedules, preview, pause/resume, history and rule policy through REST."""
    d, port = rest_daemon
    c = _client(port)
    status, sched, _ = c.call(
        "PUT", "/jobs/s.1/schedule", {"schedule": "every 1 hour", "tz": "UTC", "limit": 3}
    )
    assert status == 200 and sched["schedule"] == "every 1 hour" and sched["limit"] == "3"
    assert c.call("GET", "/jobs/s.1/schedule")[1]["runs"] == sched["runs"]
    assert [v["id"] for v in c.call("GET", "/schedules?prefix=s.")[1]] == ["s.1"]
    with d.client() as line:
        assert line.call("SCHEDULE GET s.1")[0].startswith('OK "every 1 hour"')
    status, found, _ = c.call("GET", "/preview?schedule=daily&count=2&tz=UTC")
    assert status == 200 and len(found) == 2
    assert c.call("GET", "/preview?schedule=every%200%20seconds")[0] == 400
    assert c.call("POST", "/jobs/s.1/pause")[1]["status"] == "paused"
    assert c.call("POST", "/jobs/s.1/resume")[1]["status"] != "paused"
    assert c.call("GET", "/jobs/s.1/history?limit=5")[:2] == (200, [])
    assert c.call("POST", "/jobs/s.1/run")[0] == 400  # no rule matches
    assert c.call("DELETE", "/jobs/s.1/schedule")[0] == 204
    assert c.call("GET", "/jobs/s.1/schedule")[0] == 404
    c.call("PUT", "/rules/p", {"pattern": "s.", "runner": {"type": "shell", "command": "true"}})
    status, policy, _ = c.call("PUT", "/rules/p/policy", {"timeout": "30s", "retries": 2})
    assert status == 200 and policy["timeout"] == "30s" and policy["retries"] == "2"
    assert c.call("GET", "/rules/p/policy")[1] == policy
    status, exposition, _ = c.call("GET", "/metrics")
    assert status == 200 and b"ztick_jobs" in exposition


def _raw_status(port: int, head: bytes, body_parts: list[bytes]) -> bytes:
    """Send ``head`` and the parts on a raw socket; the first line answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        with contextlib.suppress(OSError):
            for part in body_parts:
                sock.sendall(part)
        return sock.makefile("rb").readline()


def test_body_over_one_megabyte_is_413(rest_daemon: tuple[Daemon, int]) -> None:
    """A declared or chunked body over 1 MB is refused with 413; the daemon carries on."""
    _, port = rest_daemon
    declared = b"PUT /jobs/big HTTP/1.1\r\nhost: x\r\ncontent-length: 1100000\r\n\r\n"
    assert _raw_status(port, declared, []).startswith(b"HTTP/1.1 413")
    chunked = b"PUT /jobs/big HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (100_000, b"x" * 100_000)
    assert _raw_status(port, chunked, [chunk] * 11).startswith(b"HTTP/1.1 413")
    assert _client(port).call("GET", "/health")[0] == 200


def test_auth_and_namespaces_over_tls(tmp_path: Path) -> None:
    """With auth and TLS on: 401 without or with a bad token, 403 outside the namespace."""
    pki = make_pki(str(tmp_path / "pki"))
    auth = tmp_path / "auth.toml"
    auth.write_text(
        '[token.a]\nsecret = "sa"\nnamespace = "a."\n[token.all]\nsecret = "sx"\nnamespace = "*"\n'
    )
    auth.chmod(0o600)
    port = free_port()
    config = {
        "controller": {
            "auth_file": str(auth),
            "tls_cert": pki.server.cert_path,
            "tls_key": pki.server.key_path,
        },
        "http": {"listen": f"tcp:{port}:interface=127.0.0.1"},
    }
    with daemon(tmp_path / "d", config) as d:
        d.start()
        context = ssl.create_default_context(cafile=pki.ca.cert_path)
        conn = http.client.HTTPSConnection("localhost", port, timeout=10, context=context)
        anon, bad, tenant = Rest(conn), Rest(conn, "nope"), Rest(conn, "sa")
        assert anon.call("GET", "/health")[0] == 200
        assert anon.call("GET", "/openapi.json")[1]["openapi"].startswith("3.1")
        status, error, response = anon.call("GET", "/jobs/a.1")
        assert status == 401 and "error" in error
        assert response.getheader("www-authenticate") == "Bearer"
        assert bad.call("GET", "/jobs")[0] == 401
        assert tenant.call("PUT", "/jobs/a.1", {"execution": "2030-01-01T00:00:00Z"})[0] == 200
        assert tenant.call("PUT", "/jobs/b.1", {"execution": "2030-01-01T00:00:00Z"})[0] == 403
        assert (
            Rest(conn, "sx").call("PUT", "/jobs/b.1", {"execution": "2030-01-01T00:00:00Z"})[0]
            == 200
        )
        assert [j["id"] for j in tenant.call("GET", "/jobs")[1]] == ["a.1"]
        assert tenant.call("GET", "/stat")[1]["auth_enabled"] == 1


def test_rest_port_in_use_stops_startup(tmp_path: Path) -> None:
    """A REST listener that cannot bind stops startup with a message naming the port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = {"http": {"listen": f"tcp:{port}:interface=127.0.0.1"}}
        with daemon(tmp_path / "b", busy) as other:
            run = other.run_to_exit()
            assert run.process.returncode != 0
            assert f"{port}" in run.output()


def test_job_listing_streams_across_pages(rest_daemon: tuple[Daemon, int]) -> None:
    """GET /jobs lists every match in id order across the pages it is written in."""
    d, port = rest_daemon
    n = 2 * PAGE + 7
    with d.client() as line:
        line.send_lines([f"s{i} SET p.{i:05d} 2000000000000000000" for i in range(n)])
        for i in range(n):
            assert line.read_line() == f"s{i} OK"
    c = _client(port)
    status, jobs, _ = c.call("GET", "/jobs?prefix=p.")
    assert status == 200
    assert [j["id"] for j in jobs] == [f"p.{i:05d}" for i in range(n)]
    assert c.call("GET", "/jobs?prefix=nothing.")[:2] == (200, [])
    assert c.call("HEAD", "/jobs/p.00001")[0] == 200


def test_prometheus_listen_serves_metrics_without_a_rest_api(tmp_path: Path) -> None:
    """``[telemetry] prometheus_listen`` alone serves ``/metrics`` on its own port.

    Scraped with a real HTTP client and parsed with prometheus_client's parser: the job
    counts move after a SET.
    """
    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    with daemon(tmp_path / "d", {"telemetry": {"prometheus_listen": f"127.0.0.1:{port}"}}) as d:
        d.start()
        d.client().ok("SET m.one 1900000000000000000")

        def scrape() -> dict[str, float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            return {
                f"{s.name}{sorted(s.labels.items())}": s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }

        values = wait_until(lambda: scrape() or None, "/metrics to answer")
        assert values["ztick_jobs[('status', 'planned')]"] == 1.0
        assert d.stop() == 0


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_client_that_never_reads_costs_bounded_memory(
    rest_daemon: tuple[Daemon, int],
) -> None:
    """Pipelined listings to a client that never reads: memory stays bounded, others served.

    300 pipelined ``GET /jobs`` of 20,000 jobs would be ~450 MB of answers; the daemon
    stops reading that connection once its send buffer is full, so its RSS moves by a few
    MB and another client's requests are answered meanwhile.
    """
    d, port = rest_daemon
    n = 20_000
    with d.client() as line:
        line.send_lines([f"s{i} SET p.{i:05d} 2000000000000000000" for i in range(n)])
        for i in range(n):
            assert line.read_line() == f"s{i} OK"
    run = d.current
    assert run is not None
    before = _rss_kb(run.pid)
    hog = socket.create_connection(("127.0.0.1", port))
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.setblocking(False)
    request = b"GET /jobs?prefix=p. HTTP/1.1\r\nhost: x\r\n\r\n"
    for _ in range(300):
        with contextlib.suppress(BlockingIOError):
            hog.send(request)
    c = _client(port)
    for _ in range(20):  # the hog neither blocks the reactor nor starves others
        assert c.call("GET", "/health")[:2] == (200, {"status": "ok"})
    grown_mb = (_rss_kb(run.pid) - before) / 1024
    assert grown_mb < 40, f"RSS grew {grown_mb:.1f} MB for a client that never reads"
    hog.close()
    assert c.call("GET", "/jobs/p.00001")[0] == 200


def test_sockets_past_max_connections_are_closed_and_the_api_stays_up(tmp_path: Path) -> None:
    """``[http] max_connections = 5``: a sixth socket is closed at once; freed room is reused.

    A peer opening thousands of sockets cannot take the daemon's descriptors: past the
    limit each is closed as it is accepted, and the warning says how many.
    """
    port = free_port()
    with daemon(
        tmp_path, {"http": {"listen": f"tcp:{port}:interface=127.0.0.1", "max_connections": 5}}
    ) as d:
        d.start()
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
        for s in extra:
            s.settimeout(10)
            assert s.recv(1) == b""  # closed by the daemon as soon as it was accepted
            s.close()
        held[0].close()
        wait_until(lambda: _health(port) or None, "a connection once one of the five was closed")
        run = d.current
        assert run is not None
        wait_until(
            lambda: "REST: connection limit reached (5 connections)" in run.output() or None,
            "the connection-limit warning in the daemon's log",
        )
        for s in held[1:]:
            s.close()


def _health(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False
