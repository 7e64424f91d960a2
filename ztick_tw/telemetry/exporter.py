"""The telemetry worker thread: events become OpenTelemetry spans and instruments.

Everything here runs off the reactor thread.  The worker drains the ``EventQueue``
every ``DRAIN_SECONDS``, creates each span with the event's own start and end times and
records the run instruments; the SDK's ``BatchSpanProcessor`` and
``PeriodicExportingMetricReader`` threads send them over OTLP/HTTP.  Their queues are
bounded too (spans past ``MAX_SPANS_QUEUED`` are dropped by the SDK), so a collector
that is down or hangs costs dropped telemetry, never memory or the reactor's time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from ztick_tw.telemetry.events import EventQueue, RequestEvent, RunEvent

#: How often the worker turns queued events into spans.
DRAIN_SECONDS = 0.1
#: Request spans made per second at most.  A span costs the worker and the SDK's export
#: thread ~40 µs of CPU under the GIL the reactor shares (measured: 33 µs to make, the
#: rest to encode and send): unbounded, 100,000 SET/s would take most of the reactor's
#: time; 500/s takes ~2%.  Past this rate request events wait in their queue and, once it
#: is full, request tracing pauses (``TracedOperations.pause_tracing``).  Runs are not
#: limited (the scheduler's own rate bounds them).
REQUEST_SPANS_PER_SECOND = 500
#: The SDK's span queue (spans beyond it are dropped) and its export batch.
MAX_SPANS_QUEUED = 8192
MAX_EXPORT_BATCH = 512
#: ``endpoint`` when the config names none (the OTLP/HTTP default).
DEFAULT_ENDPOINT = "http://localhost:4318"
#: The job statuses reported as ``ztick_jobs{status}``, with their STAT keys.
JOB_STATUSES = ("planned", "triggered", "executed", "failed")

#: What the gauges report: STAT's keys and values, as sampled on the reactor thread.
Snapshot = Mapping[str, "str | int"]


def signal_url(endpoint: str | None, signal: str) -> str:
    """``http://host:4318`` + ``/v1/traces`` (an endpoint already ending so is kept)."""
    base = (endpoint or DEFAULT_ENDPOINT).rstrip("/")
    for known in ("/v1/traces", "/v1/metrics"):
        if base.endswith(known):
            base = base[: -len(known)]
    return f"{base}/v1/{signal}"


class Exporter:
    """The SDK pipelines and the worker thread that feeds them from an ``EventQueue``."""

    def __init__(
        self,
        requests: EventQueue[RequestEvent],
        runs: EventQueue[RunEvent],
        snapshot: Callable[[], Snapshot],
        *,
        endpoint: str | None,
        service_name: str,
        flush_interval_ms: int,
        request_spans_per_second: int | None = None,
    ) -> None:
        self.requests = requests
        self.runs_queue = runs
        rate = (
            REQUEST_SPANS_PER_SECOND
            if request_spans_per_second is None
            else request_spans_per_second
        )
        self.request_budget = max(0, int(rate * DRAIN_SECONDS))
        self._snapshot = snapshot
        interval = max(100, flush_interval_ms)
        # One export may take at most this long (the collector that hangs).
        timeout = min(10.0, max(1.0, interval / 1000))
        resource = Resource.create({"service.name": service_name})
        self.spans = BatchSpanProcessor(
            OTLPSpanExporter(endpoint=signal_url(endpoint, "traces"), timeout=timeout),
            max_queue_size=MAX_SPANS_QUEUED,
            max_export_batch_size=MAX_EXPORT_BATCH,
            schedule_delay_millis=interval,
            export_timeout_millis=timeout * 1000,
        )
        self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(self.spans)
        self.reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=signal_url(endpoint, "metrics"), timeout=timeout),
            export_interval_millis=interval,
            export_timeout_millis=timeout * 1000,
        )
        self.meter_provider = MeterProvider(
            resource=resource, metric_readers=[self.reader], shutdown_on_exit=False
        )
        self.timeout = timeout
        self.tracer = self.tracer_provider.get_tracer("ztick_tw")
        meter = self.meter_provider.get_meter("ztick_tw")
        self.runs = meter.create_counter(
            "ztick_runs", unit="1", description="Runner executions by runner and outcome"
        )
        self.run_duration = meter.create_histogram(
            "ztick_run_duration_seconds", unit="s", description="How long runs took"
        )
        self.trigger_lag = meter.create_histogram(
            "ztick_trigger_lag_seconds", unit="s", description="Due time to run start"
        )
        meter.create_observable_gauge("ztick_jobs", [self._jobs], description="Jobs by status")
        meter.create_observable_gauge("ztick_rules", [self._stat("rules_total")])
        meter.create_observable_gauge("ztick_schedules", [self._stat("schedules_total")])
        meter.create_observable_gauge("ztick_connections", [self._stat("connections")])
        meter.create_observable_counter(
            "ztick_telemetry_dropped", [self._dropped], description="Events dropped (full)"
        )
        meter.create_observable_counter(
            "ztick_telemetry_paused_seconds",
            [self._paused],
            unit="s",
            description="Time request tracing was paused (its queue full)",
        )
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="ztick-telemetry", daemon=True)

    # -- gauges (called on the metric reader's thread) -----------------------------------

    def _jobs(self, options: CallbackOptions) -> Iterable[Observation]:
        snap = self._snapshot()
        return [
            Observation(int(snap.get(f"jobs_{status}", 0)), {"status": status})
            for status in JOB_STATUSES
        ]

    def _stat(self, key: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(int(self._snapshot().get(key, 0)))]

        return observe

    def _paused(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.requests.paused_seconds)]

    def _dropped(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(self.requests.dropped, {"kind": "request"}),
            Observation(self.runs_queue.dropped, {"kind": "run"}),
        ]

    # -- the worker ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self, done: Callable[[], None]) -> None:
        """Ask the worker to drain, flush within ``timeout`` and shut down, then ``done()``.

        ``done`` is called on the worker thread; returns at once.
        """
        self._done = done
        self._stopping.set()

    def _work(self) -> None:
        while not self._stopping.wait(DRAIN_SECONDS):
            self.drain(self.request_budget)
        self.drain(MAX_SPANS_QUEUED)  # what is left, as much as the SDK's queue takes
        millis = int(self.timeout * 1000)
        try:
            self.tracer_provider.force_flush(millis)
            self.tracer_provider.shutdown()
            self.meter_provider.shutdown(timeout_millis=millis)
        finally:
            self._done()

    def drain(self, request_budget: int) -> int:
        """Every queued run and up to ``request_budget`` requests become spans; how many."""
        count = 0
        for run in self.runs_queue.drain(self.runs_queue.capacity):
            self._run(run)
            count += 1
        for request in self.requests.drain(request_budget):
            self._request(request)
            count += 1
        return count

    def _request(self, e: RequestEvent) -> None:
        operation, caller, identifier, error, start, end = e
        attributes = {"ztick.operation": operation}
        if caller.token is not None:
            attributes["ztick.token"] = caller.token.name
        if identifier:
            attributes["ztick.id"] = identifier
        if error:
            attributes["error.type"] = error
        span = self.tracer.start_span(
            operation, kind=SpanKind.SERVER, start_time=int(start * 1e9), attributes=attributes
        )
        if error:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=int(end * 1e9))

    def _run(self, e: RunEvent) -> None:
        span = self.tracer.start_span(
            f"run {e.runner}",
            kind=SpanKind.INTERNAL,
            start_time=e.start_ns,
            attributes={
                "ztick.job_id": e.job_id,
                "ztick.rule_id": e.rule_id,
                "ztick.runner": e.runner,
                "ztick.attempt": e.attempt,
                "ztick.outcome": e.outcome,
            },
        )
        if e.outcome != "success":
            span.set_status(Status(StatusCode.ERROR, e.outcome))
        span.end(end_time=e.end_ns)
        self.runs.add(1, {"runner": e.runner, "outcome": e.outcome})
        self.run_duration.record((e.end_ns - e.start_ns) / 1e9, {"runner": e.runner})
        if e.lag_ns >= 0:
            self.trigger_lag.record(e.lag_ns / 1e9)
