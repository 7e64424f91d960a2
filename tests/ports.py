"""Ports for the servers the tests start on 127.0.0.1.

A port from ``bind(("127.0.0.1", 0))`` comes from the kernel's ephemeral range, the range
every outgoing connection takes its local port from.  Between choosing such a port and a
server binding it, any client connection the test run opens may take it: CI saw RabbitMQ's
Erlang distribution port taken that way (``dist_port_already_used ... not_erlang``), which
failed every AMQP test of that run.

``free_port`` therefore picks from below the ephemeral range, where only listeners bind, and
never hands the same port out twice in one test process.
"""

from __future__ import annotations

import random
import socket

#: Where the kernel's ephemeral range is configured (Linux).
_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
#: The lowest port handed out: above the well-known and commonly configured service ports.
_LOWEST = 10000
#: How many candidates ``free_port`` tries before falling back to ``bind(0)``.
_TRIES = 200

_random = random.SystemRandom()  # independent of any seeding the tests do
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (Linux's default when it cannot be read)."""
    try:
        with open(_RANGE_FILE) as f:
            low, high = (int(part) for part in f.read().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def can_bind(port: int, *, reuse_address: bool = False) -> bool:
    """Whether 127.0.0.1:``port`` can be bound right now.

    Without ``reuse_address`` a port some connection still holds (``TIME_WAIT``) counts as
    taken; with it, the question is the daemon's (which sets ``SO_REUSEADDR``): can it
    listen there.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse_address:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, outside the ephemeral range.

    Falls back to the kernel's choice (``bind(0)``) only if the range below the ephemeral
    one is too small or all of the tried candidates are taken.
    """
    low, _high = ephemeral_range()
    if low - _LOWEST >= 1000:
        for _ in range(_TRIES):
            port = _random.randrange(_LOWEST, low)
            if port not in _handed_out and can_bind(port):
                _handed_out.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        chosen: int = s.getsockname()[1]
    _handed_out.add(chosen)
    return chosen
