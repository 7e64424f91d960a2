"""The timer set: one ``DelayedCall`` armed for the earliest planned job."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.base import DelayedCall
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ztick_tw.scheduler.jobs import JobTable

#: Reactor time is a float; allow this much rounding when deciding a job is due.
DUE_TOLERANCE_NS = 1_000


def now_ns(reactor: IReactorTime) -> int:
    """The reactor's current time in integer nanoseconds since the epoch."""
    return int(reactor.seconds() * 1_000_000_000)


class TimerSet:
    """Keeps exactly one ``reactor.callLater`` pending: for the earliest due job.

    Adding a job earlier than the armed time moves the call sooner; removing or
    re-setting the earliest job leaves the call armed, and the wake-up simply finds
    nothing due and re-arms for the new earliest.  ``on_due`` is called with the
    reactor's time in ns; it must take what is due from the table.
    """

    log = Logger()

    def __init__(
        self, reactor: IReactorTime, table: JobTable, on_due: Callable[[int], None]
    ) -> None:
        self._reactor = reactor
        self._table = table
        self._on_due = on_due
        self._call: DelayedCall | None = None
        self._armed_ns: int | None = None
        self._running = False

    @property
    def armed_ns(self) -> int | None:
        """The due time the pending call is armed for, or ``None`` when idle."""
        return self._armed_ns

    def start(self) -> None:
        """Begin arming calls (nothing fires before ``start``)."""
        self._running = True
        self.rearm()

    def stop(self) -> None:
        """Cancel the pending call; nothing fires after ``stop``."""
        self._running = False
        self._cancel()

    def note_due(self, due_ns: int) -> None:
        """A job became due at ``due_ns``: arm sooner if that is before the armed time."""
        if self._running and (self._armed_ns is None or due_ns < self._armed_ns):
            self._arm(due_ns)

    def rearm(self) -> None:
        """Arm for the earliest planned job in the table (or disarm if there is none)."""
        if not self._running:
            return
        due = self._table.next_due()
        if due is None:
            self._cancel()
        elif due != self._armed_ns or self._call is None:
            self._arm(due)

    def _arm(self, due_ns: int) -> None:
        delay = max(0.0, (due_ns - now_ns(self._reactor)) / 1e9)
        self._armed_ns = due_ns
        call = self._call
        if call is not None and call.active():
            call.reset(delay)
        else:
            self._call = self._reactor.callLater(delay, self._wake)  # type: ignore[assignment]

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._armed_ns = None

    def _wake(self) -> None:
        self._call = None
        self._armed_ns = None
        try:
            self._on_due(now_ns(self._reactor) + DUE_TOLERANCE_NS)
        except Exception:
            self.log.failure("firing due jobs failed; the timer carries on")
        self.rearm()
