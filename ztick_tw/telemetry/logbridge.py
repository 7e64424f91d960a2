"""The OpenTelemetry SDK logs through ``logging``; this hands its warnings to our logger.

The SDK's threads log each failed export (a collector that is down: one a flush
interval).  Without a handler Python prints them on stderr; this handler forwards them
to ``twisted.logger`` on the reactor thread instead, at most one per ``interval``
seconds, the others counted in the next one.
"""

from __future__ import annotations

import logging
from typing import Any

from twisted.logger import Logger

log = Logger()

#: The SDK's loggers all live under this name.
SDK_LOGGER = "opentelemetry"


class SdkLogBridge(logging.Handler):
    """A ``logging.Handler`` (any thread) forwarding to ``twisted.logger``, rate-limited."""

    def __init__(self, reactor: Any, interval: float = 60.0) -> None:
        super().__init__(logging.WARNING)
        self.reactor = reactor
        self.interval = interval
        self._last: float | None = None
        self.suppressed = 0

    def emit(self, record: logging.LogRecord) -> None:
        """Forward ``record`` unless one was forwarded less than ``interval`` ago."""
        now = self.reactor.seconds()
        if self._last is not None and now - self._last < self.interval:
            self.suppressed += 1
            return
        self._last = now
        suppressed, self.suppressed = self.suppressed, 0
        message = record.getMessage()[:500]
        self.reactor.callFromThread(
            log.warn,
            "telemetry: {message} ({suppressed} SDK messages suppressed before this one)",
            message=message,
            suppressed=suppressed,
        )

    def install(self) -> None:
        """Take over the SDK's warnings (they no longer reach the root logger or stderr)."""
        sdk = logging.getLogger(SDK_LOGGER)
        if not any(isinstance(h, logging.NullHandler) for h in sdk.handlers):
            sdk.addHandler(logging.NullHandler())  # never Python's stderr "last resort"
        sdk.addHandler(self)
        sdk.propagate = False

    def uninstall(self) -> None:
        """Stop forwarding (what the SDK's threads log while they wind down is dropped)."""
        logging.getLogger(SDK_LOGGER).removeHandler(self)
