"""Trivial servers that show the machine's floor for a request/response round trip.

``python -m bench.floor raw PORT`` answers every line with a fixed GET-like answer from a
blocking Python loop; ``python -m bench.floor twisted PORT`` does the same from a bare
Twisted protocol on the default reactor.  Measuring them with the same client as the
daemon separates the cost of loopback, the kernel's CPU placement and the Python
client from the daemon's own work.  Each exits by itself after ``--lifetime`` seconds.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from bench.daemon import HOST, BenchError, die_with_parent
from tests.ports import free_port

ANSWER = b"g OK planned 1\n"


def serve_raw(port: int) -> None:
    """One connection at a time; answer each received line."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(16)
    while True:
        conn, _ = listener.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    break
                conn.sendall(ANSWER * data.count(b"\n"))


def serve_twisted(port: int) -> None:
    """A bare ``Protocol`` on the default reactor, answering each received line."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Protocol, ServerFactory

    class Answer(Protocol):
        def dataReceived(self, data: bytes) -> None:
            assert self.transport is not None
            self.transport.write(ANSWER * data.count(b"\n"))

    factory: Any = ServerFactory.forProtocol(Answer)  # Factory typing is invariant
    reactor.listenTCP(port, factory, interface=HOST)
    reactor.run()


def main(argv: list[str]) -> int:
    kind, port = argv[0], int(argv[1])
    lifetime = float(argv[2]) if len(argv) > 2 else 300.0
    timer = threading.Timer(lifetime, lambda: __import__("os")._exit(0))
    timer.daemon = True
    timer.start()
    if kind == "raw":
        serve_raw(port)
    elif kind == "twisted":
        serve_twisted(port)
    else:
        print(f"unknown floor server {kind!r} (raw, twisted)", file=sys.stderr)
        return 2
    return 0


class FloorServer:
    """A floor server child process (context manager), ready when entered."""

    def __init__(self, kind: str, lifetime: float = 300.0) -> None:
        self.kind = kind
        self.port = free_port()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.floor", kind, str(self.port), str(lifetime)],
            cwd=Path(__file__).resolve().parent.parent,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self._proc.pid

    def __enter__(self) -> FloorServer:
        deadline = time.perf_counter() + 30
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=1.0):
                    return self
            except OSError:
                if self._proc.poll() is not None or time.perf_counter() > deadline:
                    self._proc.kill()
                    raise BenchError(f"floor server {self.kind} did not start") from None
                time.sleep(0.01)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._proc.kill()
        self._proc.wait(10)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
