"""The REST API in process: bodies, durability, body bound and idle timeout (SPEC §7)."""

from __future__ import annotations

import json

import pytest
from twisted.internet.testing import StringTransport

from tests.helpers import make_harness
from ztick_tw.model import AwfSpec, DirectSpec, Rule
from ztick_tw.operations import Invalid, Operations
from ztick_tw.rest import bodies
from ztick_tw.rest.site import MAX_BODY, rest_site


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T00:00:01.5Z", 1_500_000_000),
        ("1970-01-01T01:00:00.000000001+01:00", 1),
        ("1969-12-31T23:59:59.999999999z", -1),
        ("2262-04-11T23:47:16.854775807Z", 2**63 - 1),
        ("1677-09-21T00:12:43.145224192Z", -(2**63)),
        ("2030-01-02 03:04:05-00:30", 1893555245 * 10**9),
    ],
)
def test_rfc3339_times_to_ns(text: str, ns: int) -> None:
    """RFC 3339 with a zone is read to the nanosecond, offsets applied."""
    assert bodies.parse_time(text) == ns


@pytest.mark.parametrize(
    "text",
    [
        "2030-01-02T03:04:05",  # no zone
        "2262-04-11T23:47:16.854775808Z",  # one ns past i64
        "1677-09-21T00:12:43.145224191Z",  # one ns before i64
        "2030-02-30T00:00:00Z",
        "2030-01-01T24:00:00Z",
        "2030-01-01T00:00:00.1234567891Z",  # finer than ns
        "2030-01-01T00:00:00+25:00",
        1893553445,
        None,
    ],
)
def test_bad_times_are_invalid(text: object) -> None:
    """A time without a zone, out of the i64 ns range or impossible is ``Invalid`` (400)."""
    with pytest.raises(Invalid):
        bodies.parse_time(text)


def test_rule_bodies_nested_and_flat() -> None:
    """Nested bodies of all six kinds and ztick's flat form give the wire's runner args."""
    assert bodies.rule_args(
        {"pattern": "p.", "runner": {"type": "shell", "command": "echo hi"}}
    ) == ("p.", "shell", ["echo hi"])
    assert bodies.rule_args(
        {"pattern": "p.", "runner": {"type": "awf", "workflow": "w", "inputs": ["a=1", "b=2"]}}
    ) == ("p.", "awf", ["w", "--input", "a=1", "--input", "b=2"])
    runner = {"type": "redis", "url": "redis://h", "command": "SET", "key": "k"}
    assert bodies.rule_args({"pattern": "p.", "runner": runner})[2] == ["redis://h", "SET", "k"]
    flat = {"pattern": "p.", "runner": "direct", "args": ["/bin/echo", "x"]}
    assert bodies.rule_args(flat) == ("p.", "direct", ["/bin/echo", "x"])
    for bad in (
        {"pattern": "p.", "runner": {"type": "shell"}},
        {"pattern": "p.", "runner": {"type": "ftp", "url": "x"}},
        {"pattern": "p.", "runner": {"type": "shell", "command": 1}},
        {"pattern": "p.", "runner": {"type": "shell", "command": "x", "extra": 1}},
        {"pattern": "p.", "runner": "direct", "args": "x"},
        {"runner": "shell", "args": ["x"]},
    ):
        with pytest.raises(Invalid):
            bodies.rule_args(bad)
    shown = bodies.rule(Rule("r", "p.", AwfSpec("w", ("a=1",))))
    assert shown["runner"] == {"type": "awf", "workflow": "w", "inputs": ["a=1"]}
    shown = bodies.rule(Rule("r", "p.", DirectSpec("/x", ("a",))))
    assert shown["runner"] == {"type": "direct", "executable": "/x", "args": ["a"]}


def _site(hold: bool = False, timeout: float | None = None):  # type: ignore[no-untyped-def]
    h = make_harness(hold=hold)
    ops = Operations(h.scheduler, h.clock, persistence="memory")
    site = rest_site(ops, h.clock, timeout=timeout)
    transport = StringTransport()  # type: ignore[no-untyped-call]
    proto = site.buildProtocol(None)
    assert proto is not None
    proto.makeConnection(transport)
    return h, ops, proto, transport


def _put(path: str, body: bytes) -> bytes:
    return b"PUT %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (
        path.encode(),
        len(body),
        body,
    )


def test_a_change_is_answered_once_durable() -> None:
    """PUT /jobs/{id} answers nothing until the store's commit is on disk, then 200."""
    h, _, proto, transport = _site(hold=True)
    proto.dataReceived(_put("/jobs/a", b'{"execution": "2030-01-01T00:00:00Z"}'))
    assert transport.value() == b""
    h.store.resolve_all()
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 200")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["status"] == "planned"


def test_a_failed_commit_is_503() -> None:
    """A commit that fails answers 503 with the reason; nothing was acknowledged."""
    h, _, proto, transport = _site(hold=True)
    proto.dataReceived(_put("/jobs/a", b'{"execution": "2030-01-01T00:00:00Z"}'))
    h.store.resolve_all(OSError("disk full"))
    assert transport.value().startswith(b"HTTP/1.1 503")
    assert b"disk full" in transport.value()


def test_declared_oversize_body_is_refused_before_it_is_read() -> None:
    """A Content-Length over 1 MB is answered 413 and the connection closed at once."""
    _, _, proto, transport = _site()
    head = b"PUT /jobs/a HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY + 1)
    proto.dataReceived(head)
    assert transport.value().startswith(b"HTTP/1.1 413")
    assert transport.disconnecting


def test_chunked_body_is_cut_off_past_the_bound() -> None:
    """A chunked body is refused (413) as soon as it passes 1 MB; nothing more is kept."""
    _, _, proto, transport = _site()
    proto.dataReceived(b"PUT /jobs/a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (100_000, b"x" * 100_000)
    for _ in range(10):
        proto.dataReceived(chunk)
    assert transport.value() == b""
    proto.dataReceived(chunk)
    assert transport.value().startswith(b"HTTP/1.1 413")
    assert transport.disconnecting


def test_keep_alive_then_idle_timeout() -> None:
    """Two requests share a connection; an idle one is closed after the timeout."""
    h, _, proto, transport = _site(timeout=30)
    proto.dataReceived(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    proto.dataReceived(b"GET /jobs/none HTTP/1.1\r\nhost: x\r\n\r\n")
    assert transport.value().count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 404" in transport.value()
    h.clock.advance(29)
    assert not transport.disconnecting
    h.clock.advance(2)
    assert transport.disconnecting


def test_connections_counted_in_stat() -> None:
    """STAT's connections counts the REST connections."""
    _, ops, _, _ = _site()
    assert dict(ops.stat())["connections"] == 1
