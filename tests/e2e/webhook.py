"""A webhook receiver for end-to-end tests: records every request, served from a thread."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Hook(BaseHTTPRequestHandler):
    """Records every request; the status it answers comes from the path (``/status/500``)."""

    server: HookServer

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with self.server.lock:
            self.server.requests.append((self.command, self.path, dict(self.headers), body))
        status = 200
        if self.path.startswith("/status/"):
            status = int(self.path.split("?")[0].rsplit("/", 1)[1])
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, format: str, *args: object) -> None:
        """Keep the test output quiet."""


class HookServer(ThreadingHTTPServer):
    """Keeps ``(method, path, headers, body)`` of every request it answers."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Hook)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def bodies(self, path: str) -> list[bytes]:
        with self.lock:
            return [body for _, p, _, body in self.requests if p == path]


@contextlib.contextmanager
def serving_hook() -> Iterator[HookServer]:
    """A ``HookServer`` on a free loopback port, served from a thread until the block ends."""
    server = HookServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
