"""End-to-end: the daemon with ``[telemetry] enabled`` exports OTLP/HTTP to a collector.

The daemon runs as a subprocess; the collector is the webhook receiver of
``tests.e2e.webhook`` (a plain HTTP server in a thread of the test), and the protobuf
bodies it kept are decoded with opentelemetry-proto.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.e2e.daemon import daemon, wait_until
from tests.e2e.webhook import HookServer, serving_hook


@pytest.fixture
def collector() -> Iterator[HookServer]:
    """A receiver serving in a thread until the test ends."""
    with serving_hook() as server:
        yield server


def span_names(collector: HookServer) -> list[str]:
    """The names of every span received so far."""
    return [
        span.name
        for body in collector.bodies("/v1/traces")
        for rs in ExportTraceServiceRequest.FromString(body).resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]


def metric_names(collector: HookServer) -> set[str]:
    """The names of every metric received so far."""
    return {
        m.name
        for body in collector.bodies("/v1/metrics")
        for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def test_daemon_exports_request_and_run_spans_and_metrics(
    tmp_path: Path, collector: HookServer
) -> None:
    """A SET, a rule and a real shell run reach the collector as spans; metrics too."""
    config: dict[str, dict[str, str | bool | int | float | list[str]]] = {
        "telemetry": {"enabled": True, "endpoint": collector.base, "flush_interval_ms": 200}
    }
    with daemon(tmp_path / "d", config) as d:
        d.start()
        c = d.client()
        c.ok('RULE SET r t. shell "true"')
        c.ok("SET t.job 1")  # in the past: runs at once
        wait_until(
            lambda: (len(span_names(collector)) >= 3 and bool(metric_names(collector))) or None,
            "spans and metrics at the collector",
            timeout=20,
        )
        assert d.stop() == 0
    names = span_names(collector)
    assert "set_job" in " ".join(names) or "SET" in " ".join(names), names
    assert any("run" in n for n in names), names
