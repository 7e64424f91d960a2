"""Tests for the daemon's services in ``ztick_tw.service``."""

from __future__ import annotations

import os
import signal

from twisted.logger import capturedLogs

from ztick_tw.service import HangupService, with_backlog


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


def test_listen_backlog_is_raised_unless_given() -> None:
    """tcp/tcp6/unix endpoints get backlog=1024; a given backlog and other kinds are kept."""
    assert with_backlog("tcp:5678:interface=127.0.0.1") == (
        "tcp:5678:interface=127.0.0.1:backlog=1024"
    )
    assert with_backlog("unix:/run/z.sock:mode=660") == "unix:/run/z.sock:mode=660:backlog=1024"
    assert with_backlog("tcp:5678:backlog=10") == "tcp:5678:backlog=10"
    assert with_backlog("systemd:domain=INET:index=0") == "systemd:domain=INET:index=0"
