"""HTTP/1.1 framing of the REST listener (``ztick_tw/rest/http11.py``), without sockets.

Order of answers, pipelining, bounds, back-pressure, HEAD, streaming, 100-continue,
``Connection: close`` and HTTP/1.0, and the RFC 3339 reader the PUT path uses.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent

from tests.helpers import Harness, make_harness
from ztick_tw.operations import Operations
from ztick_tw.rest import bodies
from ztick_tw.rest.http11 import MAX_HEAD, MAX_HEADERS, MAX_WAITING, HttpChannel
from ztick_tw.rest.request import parse_query
from ztick_tw.rest.site import rest_site


def _connect(hold: bool = False) -> tuple[Harness, HttpChannel, Any]:
    h = make_harness(hold=hold)
    site = rest_site(Operations(h.scheduler, h.clock, persistence="memory"), h.clock)
    transport = StringTransport()  # type: ignore[no-untyped-call]
    channel = site.buildProtocol(None)
    assert isinstance(channel, HttpChannel)
    channel.makeConnection(transport)  # type: ignore[no-untyped-call]
    return h, channel, transport


def _put(job: str, when: str = "2030-01-01T00:00:00Z") -> bytes:
    body = json.dumps({"execution": when}).encode()
    return b"PUT /jobs/%s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (
        job.encode(),
        len(body),
        body,
    )


def _answers(raw: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split ``raw`` into (status, headers, body) answers (lengths and chunks honoured)."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            body, raw = rest[:n], rest[n:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body += rest[:size]
                rest = rest[size + 2 :]
                if size == 0:
                    break
            raw = rest
        else:
            body, raw = rest, b""
        out.append((status, headers, body))
    return out


def test_pipelined_requests_are_answered_in_order_even_when_the_first_waits() -> None:
    """A GET behind a PUT waiting for its fsync is answered after the PUT, not before."""
    h, channel, transport = _connect(hold=True)
    channel.dataReceived(_put("a") + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    assert transport.value() == b""  # the PUT is not durable yet; the GET waits its turn
    h.store.resolve_all()
    answers = _answers(transport.value())
    assert [a[0] for a in answers] == [200, 200]
    assert json.loads(answers[0][2])["id"] == "a"
    assert json.loads(answers[1][2]) == {"status": "ok"}


def test_reading_pauses_while_too_many_requests_wait_and_resumes_after() -> None:
    """Past ``MAX_WAITING`` parsed requests behind a late answer, the socket is not read."""
    h, channel, transport = _connect(hold=True)
    channel.dataReceived(b"".join(_put(f"j{i}") for i in range(MAX_WAITING + 1)))
    assert transport.producerState == "paused"
    h.store.resolve_all()
    assert transport.producerState == "producing"
    assert len(_answers(transport.value())) == MAX_WAITING + 1


def test_thousands_of_requests_waiting_are_answered_without_recursion() -> None:
    """2,000 pipelined GETs parsed behind a late PUT are all answered, in order.

    One read can hold far more requests than ``MAX_WAITING``; answering them one after
    another must not nest a call per request (a RecursionError past ~1,000).
    """
    h, channel, transport = _connect(hold=True)
    gets = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n" * 2000
    channel.dataReceived(_put("first") + gets)
    assert transport.value() == b""
    h.store.resolve_all()
    answers = _answers(transport.value())
    assert len(answers) == 2001
    assert json.loads(answers[0][2])["id"] == "first"
    assert all(json.loads(a[2]) == {"status": "ok"} for a in answers[1:])
    assert transport.producerState == "producing"


def test_a_full_send_buffer_stops_reading_until_it_drains() -> None:
    """When the transport says its buffer is full, the channel stops reading; then resumes."""
    _, channel, transport = _connect()
    channel.pauseProducing()  # what a TCP transport does past its buffer size
    assert transport.producerState == "paused"
    channel.resumeProducing()
    assert transport.producerState == "producing"


def test_head_has_the_length_and_no_body() -> None:
    """HEAD answers GET's status and length, without the body."""
    _, channel, transport = _connect()
    channel.dataReceived(b"HEAD /health HTTP/1.1\r\nhost: x\r\n\r\n")
    raw = transport.value()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 16" in head.split(b"\r\n")  # len('{"status": "ok"}')
    assert body == b""


def test_a_listing_is_streamed_in_chunks_and_ends() -> None:
    """GET /jobs is chunked on HTTP/1.1 and the whole array arrives; the connection stays."""
    h, channel, transport = _connect()
    for i in range(2500):  # three pages
        h.scheduler.set_job(f"p.{i:05d}", 10**18)
    channel.dataReceived(b"GET /jobs?prefix=p. HTTP/1.1\r\nhost: x\r\n\r\n")
    [(status, headers, body)] = _answers(transport.value())
    assert status == 200 and headers[b"transfer-encoding"] == b"chunked"
    assert [j["id"] for j in json.loads(body)] == [f"p.{i:05d}" for i in range(2500)]
    assert not transport.disconnecting


def test_http_1_0_gets_the_listing_to_the_close() -> None:
    """An HTTP/1.0 client gets no chunks: the body runs to the close."""
    h, channel, transport = _connect()
    h.scheduler.set_job("p.1", 10**18)
    channel.dataReceived(b"GET /jobs HTTP/1.0\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head and b"connection: close" in head
    assert json.loads(body)[0]["id"] == "p.1"
    assert transport.disconnecting


def test_connection_close_is_honoured() -> None:
    """``Connection: close`` gets its answer, then the connection is closed."""
    _, channel, transport = _connect()
    channel.dataReceived(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert b"connection: close" in transport.value()
    assert transport.disconnecting


def test_malformed_request_is_400_with_the_reason_and_closed() -> None:
    """A request llhttp cannot parse is answered 400 naming why, then closed."""
    _, channel, transport = _connect()
    channel.dataReceived(b"GET /health HTTP/1.1\r\nbad header line\r\n\r\n")
    [(status, _, body)] = _answers(transport.value())
    assert status == 400
    assert json.loads(body)["error"].startswith("bad request: ")
    assert transport.disconnecting
    channel.dataReceived(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")  # ignored now
    assert len(_answers(transport.value())) == 1


def test_oversized_head_is_431_and_closed() -> None:
    """A request line and headers over ``MAX_HEAD`` bytes are refused with 431."""
    _, channel, transport = _connect()
    channel.dataReceived(b"GET /health HTTP/1.1\r\nx-big: " + b"a" * MAX_HEAD + b"\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 431 ")
    assert transport.disconnecting


def test_too_many_header_lines_is_431() -> None:
    """More than ``MAX_HEADERS`` header lines are refused with 431."""
    _, channel, transport = _connect()
    lines = b"".join(b"x-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))
    channel.dataReceived(b"GET /health HTTP/1.1\r\n" + lines + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 431 ")


def test_expect_100_continue_is_answered_before_the_body() -> None:
    """``Expect: 100-continue`` gets ``100 Continue`` once the head is read."""
    _, channel, transport = _connect()
    body = b'{"execution": "2030-01-01T00:00:00Z"}'
    channel.dataReceived(
        b"PUT /jobs/a HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n"
        b"content-length: %d\r\n\r\n" % len(body)
    )
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    channel.dataReceived(body)
    assert b"HTTP/1.1 200 OK" in transport.value()


def test_an_upgrade_request_is_served_as_a_plain_one() -> None:
    """Upgrade (h2c) is not offered: the request is answered, and the next one too."""
    _, channel, transport = _connect()
    channel.dataReceived(
        b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
        b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
    )
    assert [a[0] for a in _answers(transport.value())] == [200, 200]


def test_many_upgrade_requests_in_one_read_are_all_answered() -> None:
    """1,500 requests asking for an upgrade, in one read: each is answered as plain HTTP."""
    _, channel, transport = _connect()
    one = b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
    channel.dataReceived(one * 1500)
    assert [a[0] for a in _answers(transport.value())] == [200] * 1500


def test_a_request_split_byte_by_byte_is_the_same_request() -> None:
    """A client that sends one byte at a time gets the same answer."""
    _, channel, transport = _connect()
    for i, byte in enumerate(_put("slow")):
        channel.dataReceived(bytes([byte]))
        if i < len(_put("slow")) - 1:
            assert transport.value() == b""
    [(status, _, body)] = _answers(transport.value())
    assert status == 200 and json.loads(body)["id"] == "slow"


def test_query_strings_are_read_as_bytes() -> None:
    """Any byte may be %-escaped in a query; names repeat; ``+`` is a space."""
    assert parse_query(b"a=1&b=&a=2&c") == {b"a": [b"1", b"2"], b"b": [b""], b"c": [b""]}
    assert parse_query(b"%C3%B1=%FF&x=a+b") == {b"\xc3\xb1": [b"\xff"], b"x": [b"a b"]}


def test_a_non_utf8_query_value_is_400_not_500() -> None:
    """A prefix that is not UTF-8 is a client error."""
    _, channel, transport = _connect()
    channel.dataReceived(b"GET /jobs?prefix=%FF HTTP/1.1\r\nhost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ")


def test_the_date_header_is_the_reactors_time() -> None:
    """Answers carry ``date`` from the injected clock, not the machine's."""
    h, channel, transport = _connect()
    channel.dataReceived(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    [(_, headers, _)] = _answers(transport.value())
    shown = datetime.strptime(headers[b"date"].decode(), "%a, %d %b %Y %H:%M:%S GMT")
    assert shown.replace(tzinfo=UTC).timestamp() == int(h.clock.seconds())


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@given(
    st.datetimes(
        min_value=datetime(1678, 1, 1), max_value=datetime(2262, 1, 1), timezones=st.none()
    ),
    st.integers(0, 999),
    st.integers(-23 * 60 - 59, 23 * 60 + 59),
)
def test_rfc3339_reader_agrees_with_datetime(moment: datetime, nanos: int, offset: int) -> None:
    """Any time with any offset reads to the ns that ``datetime`` arithmetic gives."""
    zone = timezone(timedelta(minutes=offset))
    aware = moment.replace(tzinfo=zone)
    sign = "+" if offset >= 0 else "-"
    text = (
        aware.strftime("%Y-%m-%dT%H:%M:%S")
        + f".{moment.microsecond:06d}{nanos:03d}"
        + f"{sign}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
    )
    delta = aware - _EPOCH
    expected = (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000 + nanos
    assert bodies.parse_time(text) == expected


def test_connections_past_the_limit_are_closed_and_counted() -> None:
    """At ``max_connections`` open, a new connection gets no channel (it is closed).

    Once one closes there is room again; refusals are counted and logged at most once
    every 10 s with how many there were.
    """
    h = make_harness()
    site = rest_site(
        Operations(h.scheduler, h.clock, persistence="memory"), h.clock, max_connections=2
    )
    open_ = [site.buildProtocol(None) for _ in range(2)]
    for channel in open_:
        channel.makeConnection(StringTransport())  # type: ignore[no-untyped-call]
    with capturedLogs() as events:
        assert site.buildProtocol(None) is None
        assert site.buildProtocol(None) is None
        h.clock.advance(11)
        assert site.buildProtocol(None) is None
    warnings = [formatEvent(e) for e in events if "connection limit" in str(e["log_format"])]
    assert len(warnings) == 2
    assert "refused 1 connection(s)" in warnings[0]
    assert "refused 2 connection(s)" in warnings[1]
    assert site.refused == 3
    open_[0].connectionLost(None)
    assert site.buildProtocol(None) is not None
