"""QUERY in O(log n + matches), answered in slices with back-pressure (issue 9, 2 and 3).

The prefix index (``JobTable.scan``), the slice producer (``QueryStream``), and the
protocol sending a long answer one slice per reactor turn, only while the client reads,
holding later requests of the same connection until the answer is complete.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import EPOCH_NS, make_harness
from ztick_tw.model import JobStatus
from ztick_tw.protocol.query import QueryStream
from ztick_tw.protocol.server import STREAM_SLICE
from ztick_tw.scheduler.jobs import JobTable

P = JobStatus.PLANNED
FUTURE = EPOCH_NS + 3600 * 1_000_000_000  # never due: the clock does not get there


def drain(stream: QueryStream, max_bytes: int = 4096) -> list[bytes]:
    """Every slice of ``stream`` until it is done."""
    slices = []
    while not stream.done:
        slices.append(stream.next_slice(max_bytes))
    return slices


# -- the index -------------------------------------------------------------------------------


def test_scan_returns_prefix_matches_in_id_order_and_resumes() -> None:
    """``scan`` lists matches in id order, at most ``limit``, and resumes after an id."""
    table = JobTable()
    for job_id in ("b.2", "a.1", "b.1", "c", "b.10", "bb"):
        table.set(job_id, 5)
    assert [j for j, _, _ in table.scan("b.", None, 10)] == ["b.1", "b.10", "b.2"]
    assert [j for j, _, _ in table.scan("b.", None, 2)] == ["b.1", "b.10"]
    assert [j for j, _, _ in table.scan("b.", "b.10", 10)] == ["b.2"]
    # resuming after an id that no longer exists still lands in the right place
    table.remove("b.10")
    assert [j for j, _, _ in table.scan("b.", "b.10", 10)] == ["b.2"]
    assert table.scan("zz", None, 10) == []
    assert [j for j, _, _ in table.scan("", None, 100)] == ["a.1", "b.1", "b.2", "bb", "c"]


def test_scan_shows_status_and_time() -> None:
    """A scanned job carries its current status and time."""
    table = JobTable()
    table.set("j", 42)
    table.set_status("j", JobStatus.EXECUTED)
    assert table.scan("j", None, 1) == [("j", JobStatus.EXECUTED, 42)]


_ids = st.text(st.sampled_from("ab.1"), min_size=1, max_size=5)
_ops = st.lists(
    st.tuples(st.sampled_from(["set", "remove", "restore", "status"]), _ids), max_size=60
)


@given(_ops, st.text(st.sampled_from("ab.1"), max_size=2))
@settings(deadline=None)
def test_index_always_matches_the_table(ops: list[tuple[str, str]], prefix: str) -> None:
    """Whatever sets, removals, status changes and undos happen, the index has every id once.

    ``scan`` must then equal a filter of the table's own contents, sorted.
    """
    table = JobTable()
    saved: dict[str, int | None] = {}
    for op, job_id in ops:
        if op == "set":
            saved[job_id] = table.raw(job_id)
            table.set(job_id, len(saved))
        elif op == "remove":
            saved[job_id] = table.raw(job_id)
            table.remove(job_id)
        elif op == "status" and job_id in table:
            table.set_status(job_id, JobStatus.FAILED)
        elif op == "restore" and job_id in saved:
            table.restore(job_id, saved.pop(job_id))
    expected = sorted((j, s, n) for j, s, n in table.items() if j.startswith(prefix))
    assert table.scan(prefix, None, 10_000) == expected


def test_replayed_table_is_indexed() -> None:
    """Jobs bulk-loaded from the log (``load``/``unload``/``finish_load``) are all indexed."""
    table = JobTable()
    table.load("x.2", 1, 0)
    table.load("x.1", 2, 2)
    table.load("gone", 3, 0)
    table.unload("gone")
    table.finish_load()
    assert [j for j, _, _ in table.scan("", None, 10)] == ["x.1", "x.2"]
    table.set("x.0", 5)
    assert [j for j, _, _ in table.scan("x.", None, 10)] == ["x.0", "x.1", "x.2"]


# -- the slice producer ----------------------------------------------------------------------


def test_query_stream_slices_are_bounded_and_complete() -> None:
    """Slices stay near ``max_bytes`` (one line over at most) and together list every job."""
    table = JobTable()
    for i in range(5000):
        table.set(f"job.{i:05d}", i)
    rid = "r" * 300
    stream = QueryStream(table.scan, rid, "job.")
    slices = drain(stream, 8192)
    line = len(f"{rid} job.00000 planned 0\n")
    assert all(len(s) <= 8192 + line + len(f"{rid} OK\n") for s in slices)
    assert len(slices) > 100
    lines = b"".join(slices).decode().splitlines()
    assert lines[-1] == f"{rid} OK"
    assert lines[:-1] == [f"{rid} job.{i:05d} planned {i}" for i in range(5000)]
    assert stream.lines == 5000


def test_query_stream_nothing_to_scan_is_just_ok() -> None:
    """A prefix outside the caller's namespace (no scan) answers only ``ID OK``."""
    stream = QueryStream(None, "q", "x")
    assert stream.next_slice(100) == b"q OK\n"
    assert stream.done
    assert stream.next_slice(100) == b""


def test_query_stream_tolerates_changes_between_slices() -> None:
    """Jobs present for the whole answer come exactly once, even if others come and go."""
    table = JobTable()
    for i in range(0, 2000, 2):
        table.set(f"j.{i:04d}", 1)
    stream = QueryStream(table.scan, "q", "j.")
    seen: list[str] = []
    i = 1
    while not stream.done:
        for text in stream.next_slice(512).decode().splitlines():
            words = text.split()
            if words[1] != "OK":
                seen.append(words[1])
        # between slices: add odd ids and remove a few not yet listed
        for _ in range(20):
            if i < 2000:
                table.set(f"j.{i:04d}", 1)
                i += 2
    stable = [f"j.{k:04d}" for k in range(0, 2000, 2)]
    assert [s for s in seen if s in set(stable)] == stable
    assert len(seen) == len(set(seen))


# -- the protocol ----------------------------------------------------------------------------


def test_long_query_is_sent_in_bounded_slices() -> None:
    """A QUERY of many jobs is written in slices of about ``STREAM_SLICE`` bytes.

    The first slice is written at once; the next ones each from a zero-delay call (on
    the real reactor, one per turn, so other clients and timers run in between).
    """
    h = make_harness()
    for i in range(20_000):
        h.scheduler.set_job(f"bulk.{i:05d}", FUTURE)
    conn = h.connect()
    sizes: list[int] = []
    write = conn.transport.write

    def recording_write(data: bytes) -> None:
        sizes.append(len(data))
        write(data)  # type: ignore[no-untyped-call]

    conn.transport.write = recording_write  # type: ignore[method-assign]
    conn.send(b"q QUERY bulk.\n")
    assert len(sizes) == 1 and sizes[0] <= STREAM_SLICE + 200
    assert h.clock.getDelayedCalls()  # the next slice waits for a reactor turn
    h.clock.advance(0)
    out = conn.take()
    assert out.endswith(b"q OK\n")
    expected = sum(len(f"q bulk.{i:05d} planned {FUTURE}\n") for i in range(20_000)) + 5
    assert len(out) == sum(sizes) == expected
    assert max(sizes) <= STREAM_SLICE + 200
    assert len(sizes) >= expected // (STREAM_SLICE + 200)


def test_long_query_waits_while_the_client_does_not_read() -> None:
    """While the transport's buffer is full, no slice is produced: memory stays bounded."""
    h = make_harness()
    for i in range(20_000):
        h.scheduler.set_job(f"bulk.{i:05d}", FUTURE)
    conn = h.connect()
    conn.send(b"q QUERY bulk.\n")
    conn.proto.pauseProducing()  # the kernel buffer is full: the client is not reading
    conn.take()
    for _ in range(50):
        h.clock.advance(0)
    assert conn.take() == b""
    conn.proto.resumeProducing()
    for _ in range(5):
        h.clock.advance(0)
    assert len(conn.take()) > 0


def test_requests_after_a_long_query_wait_for_it_and_keep_their_order() -> None:
    """Lines after a long QUERY run only once its last line is out, in order."""
    h = make_harness()
    for i in range(10_000):
        h.scheduler.set_job(f"bulk.{i:05d}", FUTURE)
    conn = h.connect()
    conn.send(f"q QUERY bulk.\na SET bulk.zzz {FUTURE}\nb GET bulk.zzz\n".encode())
    assert h.scheduler.get_job("bulk.zzz") is None  # not run yet: the answer is not out
    assert conn.transport.producerState == "paused"
    out = conn.take()
    for _ in range(200):
        h.clock.advance(0)
        out += conn.take()
    assert out.endswith(f"q OK\na OK\nb OK planned {FUTURE}\n".encode())
    assert b"bulk.zzz" not in out.split(b"q OK\n")[0]  # set after the QUERY: not listed
    assert conn.transport.producerState == "producing"


def test_many_small_queries_answer_in_one_turn() -> None:
    """400 pipelined QUERYs with no match are answered at once, without a turn each."""
    h = make_harness()
    for i in range(1000):
        h.scheduler.set_job(f"job.{i:04d}", FUTURE)
    conn = h.connect()
    conn.send(b"".join(f"q{i} QUERY nomatch.\n".encode() for i in range(400)))
    assert conn.take() == b"".join(f"q{i} OK\n".encode() for i in range(400))


def test_closing_drops_a_long_answer_and_its_timer() -> None:
    """A client that goes away mid-answer leaves no pending call behind."""
    h = make_harness()
    for i in range(20_000):
        h.scheduler.set_job(f"bulk.{i:05d}", FUTURE)
    conn = h.connect()
    before = set(h.clock.getDelayedCalls())
    conn.send(b"q QUERY bulk.\n")
    h.disconnect(conn)
    assert set(h.clock.getDelayedCalls()) == before
    h.clock.advance(0)
    assert conn.proto._stream is None


@pytest.mark.parametrize("namespace_prefix", ["other.", ""])
def test_query_prefix_outside_namespace_streams_nothing(namespace_prefix: str) -> None:
    """With a token, a QUERY is narrowed to its namespace; outside it, only ``ID OK``."""
    from tests.test_server_security import authed, secured

    h = secured()
    h.scheduler.set_job("b.1", FUTURE)
    h.scheduler.set_job("a.1", FUTURE)
    conn = authed(h)  # namespace "a."
    conn.send(f"q QUERY {namespace_prefix}\n".encode())
    answer = conn.take()
    if namespace_prefix == "":
        assert answer == f"q a.1 planned {FUTURE}\nq OK\n".encode()
    else:
        assert answer == b"q OK\n"
