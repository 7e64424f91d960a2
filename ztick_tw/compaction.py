"""The compaction schedule: every ``compression_interval`` seconds, and on SIGUSR1.

A compaction snapshots the scheduler (on the reactor thread), lets the logfile store
write it out beside the log and swap it in (off the reactor thread), and then forgets
the jobs it left out for retention.  Its state is STAT's ``compression`` value:
``idle`` before the first one, ``running``, then ``success`` or ``failure`` of the
last one.  A failure leaves the old log in use; the next cycle tries again.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ztick_tw.metrics import NO_METRICS, Metrics
from ztick_tw.scheduler.core import Scheduler
from ztick_tw.store.base import CompactionAborted
from ztick_tw.store.logfile import CompactionResult, LogfileStore

__all__ = ["CompactionService"]

log = Logger(namespace="ztick_tw.compaction")


class CompactionService(Service):
    """Runs compactions of a ``LogfileStore`` on a schedule and on SIGUSR1."""

    #: Where compactions are reported (``ztick_tw.metrics.install``); off by default.
    metrics: Metrics = NO_METRICS

    def __init__(
        self,
        reactor: Any,
        scheduler: Scheduler,
        store: LogfileStore,
        interval: float,
        retention: float = 0.0,
        *,
        signal_number: int | None = signal.SIGUSR1,
    ) -> None:
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self.scheduler = scheduler
        self.store = store
        self.interval = interval
        self.retention = retention
        self.signal_number = signal_number
        self.status = "idle"
        self.last: CompactionResult | None = None
        self.runs = 0
        self._running: Deferred[None] | None = None
        self._loop: LoopingCall | None = None
        self._previous: Any = None

    def startService(self) -> None:
        """Start the interval timer and take over SIGUSR1."""
        super().startService()  # type: ignore[no-untyped-call]
        if self.interval > 0:
            self._loop = LoopingCall(self.compact, f"every {self.interval}s")
            self._loop.clock = self._clock
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: log.failure("the compaction timer stopped", f)
            )
        if self.signal_number is not None:
            self._previous = signal.signal(self.signal_number, self._on_signal)

    def stopService(self) -> Deferred[None]:
        """Stop the timer, give SIGUSR1 back, abandon a running compaction."""
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self.signal_number is not None and self._previous is not None:
            signal.signal(self.signal_number, self._previous)
            self._previous = None
        if self._running is None:
            return succeed(None)
        self.store.abandon_compaction()
        return self._running

    def _on_signal(self, signum: int, frame: object) -> None:
        # Signal handlers interrupt the reactor anywhere: hand over to it safely.
        self._reactor.callFromThread(self.compact, "SIGUSR1")

    def compact(self, why: str = "requested") -> Deferred[None]:
        """Start a compaction now (or return the running one); never fails."""
        if self._running is not None:
            log.info("compaction ({why}) not started: one is already running", why=why)
            return self._running
        if not self.running:
            return succeed(None)
        started = self._clock.seconds()
        self.status = "running"
        self.runs += 1
        log.info("compaction ({why}) started", why=why)
        snapshot = self.scheduler.snapshot(int(self.retention * 1_000_000_000))

        def done(result: CompactionResult) -> None:
            dropped = self.scheduler.drop_expired(snapshot)
            self.status = "success"
            self.last = result
            self.metrics.compaction("success", self._clock.seconds() - started)
            log.info(
                "compaction done in {seconds:.3f}s: {frames_before} frames ({bytes_before} bytes)"
                " -> {frames_after} frames ({bytes_after} bytes); {dropped} finished jobs past"
                " retention dropped",
                seconds=self._clock.seconds() - started,
                frames_before=result.frames_before,
                bytes_before=result.bytes_before,
                frames_after=result.frames_after,
                bytes_after=result.bytes_after,
                dropped=dropped,
            )

        def failed(failure: Failure) -> None:
            self.status = "failure"
            if isinstance(failure.value, CompactionAborted) and not self.running:
                log.info("compaction stopped by the shutdown; the logfile is unchanged")
                return
            self.metrics.compaction("failure", self._clock.seconds() - started)
            error = failure.getErrorMessage()
            log.error(
                "compaction failed: {error}{unchanged}; next try {next}",
                error=error,
                unchanged="" if "logfile is unchanged" in error else "; the logfile is unchanged",
                next=f"in {self.interval:g}s" if self.interval > 0 else "on SIGUSR1",
            )

        def finished(_: object) -> None:
            self._running = None

        d: Deferred[None] = self.store.compact(snapshot.write).addCallbacks(done, failed)
        d.addErrback(lambda f: log.failure("recording a compaction's outcome failed", f))
        d.addBoth(finished)
        if not d.called:
            self._running = d
        return d
