"""``[telemetry]``: the service that exports spans and metrics over OTLP/HTTP.

Wiring (``ztick_tw/service.py``, ``make_service``)::

    telemetry = TelemetryService(config.telemetry, reactor)  # before the store is made
    ...
    runners = telemetry.wrap_runners(make_runners(config, reactor))  # to the Scheduler
    ...
    operations = telemetry.wrap_operations(Operations(...))  # what every transport gets
    ...
    top = ZtickService(...)
    if telemetry.enabled:
        telemetry.setServiceParent(top)  # first child: started before the listener

When ``[telemetry] enabled`` is false the wrappers return what they are given and the
service is never started: nothing of OpenTelemetry is imported.  When it is true the
SDK is imported by the constructor (~0.5-1 s, at startup), and its threads are started
by ``startService`` (never before twistd forks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ztick_tw.config import TelemetryConfig
from ztick_tw.model import RunnerKind
from ztick_tw.operations import Operations
from ztick_tw.runners.base import IRunner
from ztick_tw.telemetry.events import DEFAULT_CAPACITY, EventQueue, RequestEvent, RunEvent
from ztick_tw.telemetry.logbridge import SdkLogBridge
from ztick_tw.telemetry.wrap import TracedOperations, TracingRunner

if TYPE_CHECKING:
    from ztick_tw.telemetry.exporter import Exporter, Snapshot

log = Logger()

#: How often the reactor checks whether paused request tracing can resume.
WATCH_SECONDS = 0.1
#: Seconds ``stopService`` waits for the last export before giving up on it.
STOP_TIMEOUT = 5.0


class TelemetryService(Service):
    """Owns the event queue, the worker thread and the STAT sampling for the gauges.

    The reactor thread appends events (the wrappers) and, every ``flush_interval_ms``,
    samples ``Operations.stat()`` into a snapshot the gauges read; it does nothing else.
    """

    name = "telemetry"
    #: ``ZtickService`` stops it after the others: the runs that end while the scheduler
    #: stops (its grace period) are still turned into spans and exported.
    stop_last = True

    def __init__(
        self,
        config: TelemetryConfig,
        reactor: Any,
        capacity: int = DEFAULT_CAPACITY,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.config = config
        self.enabled = config.enabled
        self.reactor = reactor
        self.requests: EventQueue[RequestEvent] = EventQueue(capacity)  # TracedOperations
        self.runs: EventQueue[RunEvent] = EventQueue(capacity)  # from TracingRunner
        self.stop_timeout = stop_timeout
        self.operations: Operations | None = None
        self.traced: TracedOperations | None = None
        self._watch: LoopingCall | None = None
        self._snapshot: Snapshot = {}
        self._sampler: LoopingCall | None = None
        self.exporter: Exporter | None = None
        self.sdk_log = SdkLogBridge(reactor)
        if self.enabled:
            # The SDK's import takes ~0.5 s: here, at startup, not once the port accepts.
            import ztick_tw.telemetry.exporter  # noqa: F401

    # -- wiring --------------------------------------------------------------------------

    def wrap_operations(self, operations: Operations) -> Operations:
        """``operations`` recording a span per call (itself when telemetry is off)."""
        if not self.enabled:
            return operations
        self.operations = operations
        self.traced = TracedOperations(operations, self.requests, self.reactor)
        return self.traced

    def wrap_runner(self, runner: IRunner) -> IRunner:
        """``runner`` recording a span per run (itself when telemetry is off)."""
        if not self.enabled:
            return runner
        return TracingRunner(runner, self.runs, self.reactor)

    def wrap_runners(self, runners: dict[RunnerKind, IRunner]) -> dict[RunnerKind, IRunner]:
        """Every runner of ``make_runners`` wrapped by ``wrap_runner``."""
        return {kind: self.wrap_runner(runner) for kind, runner in runners.items()}

    # -- the service ---------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The last STAT sample (read by the gauges on the SDK's thread)."""
        return self._snapshot

    def sample(self) -> None:
        """Take a STAT sample for the gauges (on the reactor thread)."""
        if self.operations is not None:
            self._snapshot = dict(self.operations.stat())

    def check_room(self) -> None:
        """Resume request tracing once the worker has made room (every 0.1 s)."""
        if self.traced is not None:
            self.traced.resume_tracing()

    def startService(self) -> None:
        """Start the worker thread, the SDK's exporters and the STAT sampling."""
        from ztick_tw.telemetry.exporter import Exporter, signal_url

        super().startService()  # type: ignore[no-untyped-call]
        c = self.config
        self.exporter = Exporter(
            self.requests,
            self.runs,
            self.snapshot,
            endpoint=c.endpoint,
            service_name=c.service_name,
            flush_interval_ms=c.flush_interval_ms,
        )
        self.sample()
        self.sdk_log.install()
        self.exporter.start()
        self._sampler = LoopingCall(self.sample)
        self._sampler.clock = self.reactor
        self._sampler.start(max(0.1, c.flush_interval_ms / 1000), now=False)
        self._watch = LoopingCall(self.check_room)
        self._watch.clock = self.reactor
        self._watch.start(WATCH_SECONDS, now=False)
        log.info(
            "telemetry: exporting over OTLP/HTTP to {url} every {ms} ms as {service}",
            url=signal_url(c.endpoint, "traces"),
            ms=c.flush_interval_ms,
            service=c.service_name,
        )

    def stopService(self) -> Deferred[None]:
        """Flush what is queued, within ``stop_timeout`` seconds, then shut the SDK down."""
        super().stopService()  # type: ignore[no-untyped-call]
        for call in (self._sampler, self._watch):
            if call is not None and call.running:
                call.stop()
        self.sample()
        exporter = self.exporter
        d: Deferred[None] = Deferred()
        if exporter is None:
            d.callback(None)
            return d

        def finish(late: bool) -> None:
            if d.called:
                return
            if late:
                log.warn(
                    "telemetry: the collector did not take the last export within {s}s;"
                    " leaving it",
                    s=self.stop_timeout,
                )
            if self.requests.pauses or self.runs.dropped:
                log.warn(
                    "telemetry: request tracing paused {pauses} times ({seconds:.1f}s in all)"
                    " and {runs} run events dropped: queues of {capacity} full",
                    pauses=self.requests.pauses,
                    seconds=self.requests.paused_seconds,
                    runs=self.runs.dropped,
                    capacity=self.requests.capacity,
                )
            if not timer.called:
                timer.cancel()
            self.sdk_log.uninstall()
            d.callback(None)

        timer = self.reactor.callLater(self.stop_timeout, finish, True)
        exporter.stop(lambda: self.reactor.callFromThread(finish, False))
        return d
