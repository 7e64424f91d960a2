"""The test suite's port chooser keeps out of the range client connections use."""

from __future__ import annotations

import socket

from tests.ports import can_bind, ephemeral_range, free_port


def test_free_ports_are_bindable_distinct_and_below_the_ephemeral_range() -> None:
    """Fifty ports in a row can each be bound, none repeats, none is ephemeral."""
    low, _high = ephemeral_range()
    chosen = [free_port() for _ in range(50)]
    assert len(set(chosen)) == len(chosen)
    assert all(port < low for port in chosen), chosen
    assert all(can_bind(port) for port in chosen)


def test_a_listening_port_cannot_be_bound() -> None:
    """``can_bind`` says no for a port something listens on, yes once it is closed."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        port = listener.getsockname()[1]
        assert not can_bind(port)
    assert can_bind(port)
