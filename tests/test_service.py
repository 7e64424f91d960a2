"""Tests for the daemon's services in ``ztick_tw.service``."""

from __future__ import annotations

import os
import signal

from twisted.logger import capturedLogs

from ztick_tw.service import HangupService


def test_hangup_is_logged_and_survived_then_handler_restored() -> None:
    """SIGHUP while the service runs is logged (no death); stopping restores the old handler."""
    seen: list[int] = []

    def previous(signum: int, frame: object) -> None:
        seen.append(signum)

    old = signal.signal(signal.SIGHUP, previous)
    try:
        service = HangupService()
        service.startService()
        with capturedLogs() as events:
            os.kill(os.getpid(), signal.SIGHUP)
        assert any("SIGHUP received" in str(e.get("log_format")) for e in events)
        assert seen == []
        service.stopService()
        os.kill(os.getpid(), signal.SIGHUP)
        assert seen == [signal.SIGHUP]
    finally:
        signal.signal(signal.SIGHUP, old)
