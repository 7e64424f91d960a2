"""OTLP/HTTP export end to end: a real receiver on 127.0.0.1 decodes what the daemon sends.

The receiver is a ``twisted.web`` server in the test's own reactor; it decodes the
protobuf bodies with ``opentelemetry-proto``.  Runs are real shell children.
"""

from __future__ import annotations

import socket
from typing import Any, cast

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.helpers import EventLog, ImmediateRunner
from ztick_tw.auth import Token
from ztick_tw.config import TelemetryConfig
from ztick_tw.model import Policy, RunnerKind
from ztick_tw.operations import Caller, NotFound, Operations
from ztick_tw.runners.base import IRunner
from ztick_tw.runners.process import ProcessOptions, ShellRunner
from ztick_tw.scheduler.core import Scheduler
from ztick_tw.scheduler.timers import now_ns
from ztick_tw.store.memory import MemoryStore
from ztick_tw.telemetry import TelemetryService

TCP = cast(IReactorTCP, reactor)

# -- the receiver ------------------------------------------------------------------------


class Receiver(Resource):
    """``POST /v1/traces`` and ``/v1/metrics``: keeps the decoded requests."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []

    def render_POST(self, request: Request) -> bytes:
        body = request.content.read() if request.content is not None else b""
        request.setHeader(b"content-type", b"application/x-protobuf")  # type: ignore[no-untyped-call]
        if request.path == b"/v1/traces":
            self.traces.append(ExportTraceServiceRequest.FromString(body))
            return bytes(ExportTraceServiceResponse().SerializeToString())
        if request.path == b"/v1/metrics":
            self.metrics.append(ExportMetricsServiceRequest.FromString(body))
            return bytes(ExportMetricsServiceResponse().SerializeToString())
        request.setResponseCode(404)
        return b""

    def spans(self) -> list[Any]:
        return [
            span
            for req in self.traces
            for rs in req.resource_spans
            for ss in rs.scope_spans
            for span in ss.spans
        ]

    def service_names(self) -> set[str]:
        return {
            kv.value.string_value
            for req in self.traces
            for rs in req.resource_spans
            for kv in rs.resource.attributes
            if kv.key == "service.name"
        }

    def last_points(self, name: str) -> list[Any]:
        """The data points of the last export that has metric ``name``."""
        found: list[Any] = []
        for req in self.metrics:
            for rm in req.resource_metrics:
                for sm in rm.scope_metrics:
                    for m in sm.metrics:
                        if m.name == name:
                            kind = m.WhichOneof("data")
                            found = list(getattr(m, kind).data_points)
        return found


def attrs(thing: Any) -> dict[str, Any]:
    """A span's or data point's attributes as a dict."""
    out: dict[str, Any] = {}
    for kv in thing.attributes:
        kind = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, kind)
    return out


class Silent(Protocol):
    """A collector that accepts connections and never answers."""

    def __init__(self, open_: list[Silent]) -> None:
        self.open = open_

    def connectionMade(self) -> None:
        self.open.append(self)

    def dataReceived(self, data: bytes) -> None:
        pass


def closed_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- the daemon's pieces -----------------------------------------------------------------


class _Base(unittest.TestCase):
    def setUp(self) -> None:
        self.receiver = Receiver()
        site: Any = Site(self.receiver)  # type: ignore[no-untyped-call]
        port = TCP.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.endpoint = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]

    def daemon(
        self, endpoint: str, capacity: int = 16_384, stop_timeout: float = 5.0
    ) -> tuple[TelemetryService, Operations, Scheduler]:
        """A scheduler with a real shell runner, its operations, telemetry wrapped round both."""
        config = TelemetryConfig(
            enabled=True, endpoint=endpoint, service_name="ztick-test", flush_interval_ms=200
        )
        svc = TelemetryService(config, reactor, capacity=capacity, stop_timeout=stop_timeout)
        shell = ShellRunner(reactor, "/bin/sh", ["-c"], ProcessOptions())
        self.addCleanup(shell.stop, 0)
        runners: dict[RunnerKind, IRunner] = dict.fromkeys(RunnerKind, ImmediateRunner())
        runners[RunnerKind.SHELL] = shell
        scheduler = Scheduler(
            reactor,
            MemoryStore(),
            svc.wrap_runners(runners),
            policy_defaults=Policy(None, 0, 0, 0),
        )
        scheduler.start()
        self.addCleanup(scheduler.stop, 0)
        operations = svc.wrap_operations(Operations(scheduler, reactor, persistence="memory"))
        operations.count_connections(lambda: 3)
        svc.startService()
        return svc, operations, scheduler

    async def settled(self, scheduler: Scheduler, *job_ids: str) -> None:
        """Wait (deadline 20 s) until every job has run."""
        for _ in range(800):
            found = [scheduler.get_job(j) for j in job_ids]
            if all(f is not None and f[0].name.lower() in ("executed", "failed") for f in found):
                return
            await deferLater(reactor, 0.025, lambda: None)
        raise AssertionError(f"jobs never ran: {[scheduler.get_job(j) for j in job_ids]}")


class ExportTests(_Base):
    async def test_span_per_operation(self) -> None:
        """Each operation a transport calls is a span with its token, id and error class."""
        svc, ops, _ = self.daemon(self.endpoint)
        alice = Caller(Token("alice", "app."))
        ops.set_rule(alice, "app.r", "app.", "shell", ["true"])
        ops.set_job(alice, "app.later", now_ns(reactor) + 3600 * 10**9)
        with pytest.raises(NotFound):
            ops.get_job(alice, "app.missing")
        await svc.stopService()
        spans = {s.name: s for s in self.receiver.spans()}
        assert set(spans) == {"set_rule", "set_job", "get_job"}
        assert attrs(spans["set_job"]) == {
            "ztick.operation": "set_job",
            "ztick.token": "alice",
            "ztick.id": "app.later",
        }
        assert attrs(spans["get_job"])["error.type"] == "NotFound"
        assert spans["get_job"].status.code == 2  # STATUS_CODE_ERROR
        assert spans["set_job"].start_time_unix_nano <= spans["set_job"].end_time_unix_nano
        assert self.receiver.service_names() == {"ztick-test"}

    async def test_runs_spans_and_metrics(self) -> None:
        """Real shell runs: a span each, runs by outcome, durations, lag and the STAT gauges."""
        svc, ops, scheduler = self.daemon(self.endpoint)
        anyone = Caller()
        ops.set_rule(anyone, "ok", "ok.", "shell", ["exit 0"])
        ops.set_rule(anyone, "bad", "bad.", "shell", ["exit 3"])
        now = now_ns(reactor)
        ops.set_job(anyone, "ok.1", now)
        ops.set_job(anyone, "bad.1", now)
        ops.set_job(anyone, "ok.later", now + 3600 * 10**9)
        await self.settled(scheduler, "ok.1", "bad.1")
        await svc.stopService()
        runs = {
            attrs(s)["ztick.job_id"]: s for s in self.receiver.spans() if s.name == "run shell"
        }
        assert set(runs) == {"ok.1", "bad.1"}
        assert attrs(runs["bad.1"]) == {
            "ztick.job_id": "bad.1",
            "ztick.rule_id": "bad",
            "ztick.runner": "shell",
            "ztick.attempt": 1,
            "ztick.outcome": "failure",
        }
        assert attrs(runs["ok.1"])["ztick.outcome"] == "success"
        counted = {
            (attrs(p)["runner"], attrs(p)["outcome"]): p.as_int
            for p in self.receiver.last_points("ztick_runs")
        }
        assert counted == {("shell", "success"): 1, ("shell", "failure"): 1}
        [duration] = self.receiver.last_points("ztick_run_duration_seconds")
        assert (attrs(duration), duration.count) == ({"runner": "shell"}, 2)
        assert duration.sum > 0
        [lag] = self.receiver.last_points("ztick_trigger_lag_seconds")
        assert lag.count == 2
        jobs = {attrs(p)["status"]: p.as_int for p in self.receiver.last_points("ztick_jobs")}
        assert jobs == {"planned": 1, "triggered": 0, "executed": 1, "failed": 1}
        [rules] = self.receiver.last_points("ztick_rules")
        [connections] = self.receiver.last_points("ztick_connections")
        assert (rules.as_int, connections.as_int) == (2, 3)
        dropped = {
            attrs(p)["kind"]: p.as_int
            for p in self.receiver.last_points("ztick_telemetry_dropped")
        }
        assert dropped == {"request": 0, "run": 0}


class CollectorTroubleTests(_Base):
    async def burst(self, endpoint: str) -> None:
        """2,000 SETs and a real run while the collector misbehaves: all done, queue bounded."""
        svc, ops, scheduler = self.daemon(endpoint, capacity=500, stop_timeout=1.0)
        anyone = Caller()
        ops.set_rule(anyone, "ok", "ok.", "shell", ["exit 0"])
        later = now_ns(reactor) + 3600 * 10**9
        peak = 0
        for i in range(2000):
            ops.set_job(anyone, f"job.{i}", later)
            peak = max(peak, len(svc.requests))
        ops.set_job(anyone, "ok.1", now_ns(reactor))
        await self.settled(scheduler, "ok.1")
        assert dict(ops.stat())["jobs_planned"] == 2000
        assert peak <= 500
        stopped: Deferred[None] = svc.stopService()
        await stopped  # fires within stop_timeout even though the collector never answers
        assert svc.requests.pauses >= 1  # the queue filled: tracing paused instead of growing
        assert (svc.runs.accepted, svc.runs.dropped) == (1, 0)

    async def test_collector_that_hangs(self) -> None:
        """A collector that accepts and never answers neither blocks SETs nor runs."""
        open_: list[Silent] = []
        self.addCleanup(lambda: [p.transport.abortConnection() for p in open_])  # type: ignore[union-attr]
        factory: Any = Factory.forProtocol(lambda: Silent(open_))
        port = TCP.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        await self.burst(f"http://127.0.0.1:{port.getHost().port}")  # type: ignore[attr-defined]
        assert open_, "the exporter never connected"

    async def test_collector_that_is_down(self) -> None:
        """A collector nobody listens for neither blocks SETs nor runs.

        The SDK's complaint reaches our logger (not stderr), rate-limited to one.
        """
        events = EventLog()
        globalLogPublisher.addObserver(events)
        self.addCleanup(globalLogPublisher.removeObserver, events)
        await self.burst(f"http://127.0.0.1:{closed_port()}")
        namespace = "ztick_tw.telemetry.logbridge"
        seen = [e for e in events.events if e.get("log_namespace") == namespace]
        assert len(seen) == 1, [formatEvent(e) for e in seen]
        assert formatEvent(seen[0]).startswith("telemetry: ")

    def test_stalled_worker_drops_instead_of_growing(self) -> None:
        """With nothing draining the queue, tracing pauses once it is full; nothing grows."""
        config = TelemetryConfig(enabled=True, endpoint=self.endpoint)
        svc = TelemetryService(config, reactor, capacity=100)  # never started: no worker
        clock_ops = svc.wrap_operations(
            Operations(
                Scheduler(reactor, MemoryStore(), dict.fromkeys(RunnerKind, ImmediateRunner())),
                reactor,
                persistence="memory",
            )
        )
        for i in range(1000):
            clock_ops.set_job(Caller(), f"j.{i}", 1_800_000_000_000_000_000)
        assert (len(svc.requests), svc.requests.dropped, svc.requests.pauses) == (100, 1, 1)
        assert svc.traced is not None and not svc.traced.tracing
        assert dict(clock_ops.stat())["jobs_total"] == 1000


class BudgetTests(unittest.TestCase):
    def test_requests_wait_for_budget_runs_do_not(self) -> None:
        """A drain makes every queued run a span but at most ``budget`` request spans."""
        from ztick_tw.telemetry.events import EventQueue, RequestEvent, RunEvent
        from ztick_tw.telemetry.exporter import Exporter

        requests: EventQueue[RequestEvent] = EventQueue()
        runs: EventQueue[RunEvent] = EventQueue()
        exporter = Exporter(
            requests,
            runs,
            dict,
            endpoint=f"http://127.0.0.1:{closed_port()}",
            service_name="t",
            flush_interval_ms=1000,
        )
        try:
            for i in range(10):
                requests.put(("get_job", Caller(), f"j.{i}", "", 1.0, 2.0))
            for i in range(3):
                runs.put(RunEvent(f"j.{i}", "r", "shell", 1, "success", 1, 2, 0))
            assert exporter.drain(4) == 3 + 4
            assert (len(requests), len(runs)) == (6, 0)
        finally:
            exporter.tracer_provider.shutdown()
            exporter.meter_provider.shutdown(timeout_millis=1000)
