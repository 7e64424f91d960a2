"""Unauthenticated connections are capped overall and per address (issue 9, defect 9).

Sockets that never send AUTH must not lock valid clients out: the oldest unauthenticated
connection is dropped first, an authenticated one never, and one address only ever
displaces its own sockets.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from tests.helpers import Conn, Harness
from tests.test_server_security import ALPHA_SECRET, secured
from ztick_tw.protocol.admission import Admission
from ztick_tw.protocol.server import ZtickProtocol

# -- the plain state -------------------------------------------------------------------------


def test_admission_drops_oldest_of_the_same_source_first() -> None:
    """Over the per-source cap, the oldest connection of that source goes, not others'."""
    a: Admission[str] = Admission(max_total=10, max_per_source=2)
    assert a.add("x1", "10.0.0.1") == []
    assert a.add("y1", "10.0.0.2") == []
    assert a.add("x2", "10.0.0.1") == []
    assert a.add("x3", "10.0.0.1") == ["x1"]
    assert "x1" not in a and "y1" in a and a.count("10.0.0.1") == 2
    assert len(a) == 3


def test_admission_drops_oldest_overall_over_the_total_cap() -> None:
    """Over the total cap, the oldest connection of all goes; never the new one."""
    a: Admission[str] = Admission(max_total=3, max_per_source=3)
    for conn, source in (("a", "s1"), ("b", "s2"), ("c", "s3")):
        assert a.add(conn, source) == []
    assert a.add("d", "s4") == ["a"]
    assert a.oldest() == "b"
    a.discard("b")  # it authenticated
    assert a.oldest() == "c"
    a.discard("nope")  # unknown: no error
    assert a.count("s2") == 0 and len(a) == 2


def test_total_cap_takes_from_the_most_crowded_address_first() -> None:
    """Over the total cap, the oldest socket of the busiest address goes, not a quiet one's.

    A flood that reconnects as fast as it is dropped makes every flood socket younger
    than a valid client waiting for its AUTH to be read; age alone would drop the client.
    """
    a: Admission[str] = Admission(max_total=4, max_per_source=10)
    assert a.add("valid", "192.0.2.1") == []
    assert a.add("f1", "198.51.100.1") == []
    assert a.add("f2", "198.51.100.1") == []
    assert a.add("g1", "198.51.100.2") == []
    assert a.add("f3", "198.51.100.1") == ["f1"]
    assert a.add("f4", "198.51.100.1") == ["f2"]
    assert a.victim() == "f3"
    assert "valid" in a


def test_admission_refuses_zero_caps() -> None:
    """Caps below 1 are a programming error."""
    with pytest.raises(ValueError):
        Admission(0, 1)


# -- the protocol ----------------------------------------------------------------------------


def connect_from(h: Harness, host: str) -> Conn:
    """A new connection from ``host`` on a ``StringTransport``."""
    proto = h.factory.buildProtocol(None)
    assert isinstance(proto, ZtickProtocol)
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
    proto.makeConnection(transport)
    return Conn(proto, transport)


def auth(conn: Conn) -> bytes:
    """Send ``AUTH`` with a valid secret; the answer."""
    conn.send(f"AUTH {ALPHA_SECRET}\n".encode())
    return conn.take()


def test_flood_of_silent_sockets_cannot_keep_a_valid_client_out() -> None:
    """At ``max_connections``, the oldest silent socket makes room; a valid client gets in."""
    h = secured()
    h.factory.max_connections = 50
    flood = [connect_from(h, f"10.1.{i // 200}.{i % 200}") for i in range(50)]
    assert h.factory.connections == 50
    with capturedLogs() as events:
        valid = connect_from(h, "192.0.2.7")
    assert auth(valid) == b"OK\n"
    assert flood[0].transport.disconnecting and not flood[1].transport.disconnecting
    assert h.factory.connections == 50
    assert any("waiting to authenticate" in e["log_format"] for e in events)
    # an authenticated connection is never dropped: with all slots authenticated, refuse
    h.factory.max_connections = h.factory.connections
    for conn in flood[1:]:
        auth(conn)
    late = connect_from(h, "192.0.2.8")
    assert late.transport.disconnecting
    assert not valid.transport.disconnecting
    assert all(not c.transport.disconnecting for c in flood[1:])


def test_per_source_cap_only_drops_that_sources_sockets() -> None:
    """One address over its cap displaces its own oldest socket, not another address's."""
    h = secured()
    h.factory.admission.max_per_source = 3
    other = connect_from(h, "192.0.2.1")
    noisy = [connect_from(h, "198.51.100.9") for _ in range(10)]
    assert [c.transport.disconnecting for c in noisy] == [True] * 7 + [False] * 3
    assert not other.transport.disconnecting
    assert auth(other) == b"OK\n"
    assert h.factory.admission.count("198.51.100.9") == 3
    assert len(h.factory.admission) == 3


def test_total_cap_drops_oldest_unauthenticated() -> None:
    """Over ``max_unauthenticated``, the oldest unauthenticated socket of any address goes."""
    h = secured()
    h.factory.admission.max_total = 4
    conns = [connect_from(h, f"10.9.0.{i}") for i in range(6)]
    assert [c.transport.disconnecting for c in conns] == [True, True] + [False] * 4
    assert h.factory.connections == 4


def test_dropped_connection_frees_its_slot_and_timers_once() -> None:
    """An evicted connection is counted out at once; its later connectionLost changes nothing."""
    h = secured()
    h.factory.admission.max_total = 1
    first = connect_from(h, "10.0.0.1")
    second = connect_from(h, "10.0.0.2")
    assert first.transport.disconnecting
    assert h.factory.connections == 1
    first.proto.connectionLost(None)
    assert h.factory.connections == 1
    assert first.proto._auth_call is None
    assert len(h.clock.getDelayedCalls()) == 1  # only the survivor's AUTH timer
    h.clock.advance(h.factory.auth_timeout + 1)
    assert second.transport.disconnecting


def test_without_auth_nothing_is_held_as_unauthenticated() -> None:
    """With auth off, connections are never tracked nor dropped for being unauthenticated."""
    from tests.helpers import make_harness

    h = make_harness()
    h.factory.admission.max_total = 1
    conns = [connect_from(h, "10.0.0.1") for _ in range(5)]
    assert not any(c.transport.disconnecting for c in conns)
    assert len(h.factory.admission) == 0
