"""End-to-end: the daemon with ``[telemetry] enabled`` exports OTLP/HTTP to a collector.

The daemon runs as a subprocess; the collector is a plain HTTP server on 127.0.0.1 in a
thread of the test, decoding the protobuf bodies with opentelemetry-proto.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.e2e.daemon import daemon, wait_until


class Collector(ThreadingHTTPServer):
    """Keeps the span names and metric names it receives."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.span_names: list[str] = []
        self.metric_names: set[str] = set()
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        with self.server.lock:
            if self.path == "/v1/traces":
                request: Any = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        self.server.span_names += [span.name for span in ss.spans]
            elif self.path == "/v1/metrics":
                request = ExportMetricsServiceRequest.FromString(body)
                for rm in request.resource_metrics:
                    for sm in rm.scope_metrics:
                        self.server.metric_names |= {m.name for m in sm.metrics}
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def collector() -> Iterator[Collector]:
    """A collector serving in a thread until the test ends."""
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_daemon_exports_request_and_run_spans_and_metrics(
    tmp_path: Path, collector: Collector
) -> None:
    """A SET, a rule and a real shell run reach the collector as spans; metrics too."""
    endpoint = f"http://127.0.0.1:{collector.server_address[1]}"
    config: dict[str, dict[str, str | bool | int | float | list[str]]] = {
        "telemetry": {"enabled": True, "endpoint": endpoint, "flush_interval_ms": 200}
    }
    with daemon(tmp_path / "d", config) as d:
        d.start()
        c = d.client()
        c.ok('RULE SET r t. shell "true"')
        c.ok("SET t.job 1")  # in the past: runs at once

        def seen() -> bool | None:
            with collector.lock:
                spans = list(collector.span_names)
                metrics = set(collector.metric_names)
            return (len(spans) >= 3 and bool(metrics)) or None

        wait_until(seen, "spans and metrics at the collector", timeout=20)
        assert d.stop() == 0
    with collector.lock:
        names = " ".join(collector.span_names)
    assert "set_job" in names or "SET" in names, collector.span_names
    assert any("run" in n for n in collector.span_names), collector.span_names
