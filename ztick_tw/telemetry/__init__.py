"""OpenTelemetry export (SPEC §10, ``[telemetry]``): spans per request and run, metrics.

``TelemetryService`` is the one entry point; see its module for the wiring.
"""

from ztick_tw.telemetry.events import EventQueue, RequestEvent, RunEvent
from ztick_tw.telemetry.service import TelemetryService
from ztick_tw.telemetry.wrap import TracedOperations, TracingRunner

__all__ = [
    "EventQueue",
    "RequestEvent",
    "RunEvent",
    "TelemetryService",
    "TracedOperations",
    "TracingRunner",
]
