"""Tests for the daemon's services in ``ztick_tw.service``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent

from tests.certs import make_pki
from tests.helpers import FakeRunner, FakeStore, all_kinds, make_clock
from ztick_tw.config import Config, parse_config
from ztick_tw.descriptors import StartupError, fit_descriptor_limit, max_connections_set
from ztick_tw.runners.message import NetworkOptions
from ztick_tw.scheduler.core import Scheduler
from ztick_tw.service import (
    HangupService,
    SchedulerService,
    ZtickService,
    network_options,
    with_backlog,
)
from ztick_tw.store.base import StoreError


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


def _config(tmp_path: Path, runners: str) -> Config:
    return parse_config(f"[runners]\n{runners}\n", str(tmp_path / "ztick.toml"))


def test_network_options_default_to_ztick_behaviour(tmp_path: Path) -> None:
    """Without [runners]: 30 s timeout, ztick messages, system trust, unsigned webhooks."""
    options = network_options(Config())
    assert options == NetworkOptions()
    assert options.timeout == 30.0
    assert options.message_format == "ztick"
    assert options.http_signing_secret is None


def test_network_options_carry_every_runners_key(tmp_path: Path) -> None:
    """Each [runners] key reaches the runners' options; the secret is read and stripped."""
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(b"  s3cret-key\n")
    secret.chmod(0o600)
    ca = make_pki(str(tmp_path / "pki")).ca.cert_path
    config = _config(
        tmp_path,
        f'timeout = 2.5\nmessage_format = "json"\nhttp_ca_file = "{ca}"\n'
        f'http_signing_secret_file = "{secret}"\nhttp_max_response_bytes = 10\n'
        f'amqp_persistent = false\namqp_ca_file = "{ca}"',
    )
    with capturedLogs() as events:
        options = network_options(config)
    assert options == NetworkOptions(2.5, "json", str(ca), b"s3cret-key", 10, False, str(ca))
    assert not [e for e in events if "other users" in str(e.get("log_format"))]


def test_a_readable_secret_file_is_warned_about_without_its_content(tmp_path: Path) -> None:
    """A signing secret others can read is logged as a warning that never shows the secret."""
    secret = tmp_path / "webhook.secret"
    secret.write_text("top-secret-value")
    secret.chmod(0o644)
    with capturedLogs() as events:
        network_options(_config(tmp_path, f'http_signing_secret_file = "{secret}"'))
    warnings = [formatEvent(e) for e in events if "other users" in str(e.get("log_format"))]
    assert len(warnings) == 1
    assert "chmod 600" in warnings[0]
    assert all("top-secret-value" not in formatEvent(e) for e in events)


@pytest.mark.parametrize(
    ("content", "problem"),
    [(None, "cannot read it"), (b" \n", "the file is empty")],
)
def test_a_missing_or_empty_secret_file_stops_startup(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    """A signing secret file that is missing or empty is a startup error naming the key."""
    secret = tmp_path / "webhook.secret"
    if content is not None:
        secret.write_bytes(content)
    config = _config(tmp_path, f'http_signing_secret_file = "{secret}"')
    with pytest.raises(StartupError) as error:
        network_options(config)
    assert str(error.value).startswith(f"[runners] http_signing_secret_file {secret}: {problem}")


def test_a_ca_file_without_certificates_stops_startup(tmp_path: Path) -> None:
    """http_ca_file must be readable and hold at least one PEM certificate."""
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    with pytest.raises(StartupError, match="holds no PEM certificate"):
        network_options(_config(tmp_path, f'http_ca_file = "{ca}"'))
    with pytest.raises(StartupError, match=r"^\[runners\] http_ca_file: cannot read"):
        network_options(_config(tmp_path, f'http_ca_file = "{tmp_path / "missing.pem"}"'))


class _FailingFlushStore(FakeStore):
    """A store whose flush raises, as a logfile whose fsync fails does (failure injection)."""

    def flush(self) -> None:
        super().flush()
        raise StoreError("logfile x: fsync failed: Input/output error (EIO)")


class _FailingStopService(Service):
    """A child service whose stop raises (failure injection)."""

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        raise RuntimeError("cannot stop")


def _scheduler_service(store: FakeStore, runner: FakeRunner) -> tuple[ZtickService, Scheduler]:
    scheduler = Scheduler(make_clock(), store, all_kinds(runner))
    top = ZtickService("tcp:0", None)
    service = SchedulerService(scheduler, store, 2.5, top.steps)
    service.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top, scheduler


def test_a_failing_flush_still_stops_the_runners_and_closes_the_store() -> None:
    """A flush raising at shutdown does not stop the later steps.

    The runners are still stopped (with the grace period) and the store closed; the
    failure is logged with its step name and ``shutdown_failed`` is set.
    """
    store, runner = _FailingFlushStore(), FakeRunner()
    top, _ = _scheduler_service(store, runner)
    top.startService()
    with capturedLogs() as events:
        d = top.stopService()
    assert d.called
    assert runner.stops == [2.5]
    assert store.closed
    assert top.shutdown_failed
    failures = [e for e in events if "shutdown step failed" in str(e.get("log_format"))]
    assert [e["step"] for e in failures] == ["flush the logfile"]
    assert formatEvent(failures[0]) == (
        "shutdown step failed: flush the logfile: logfile x: fsync failed: Input/output"
        " error (EIO); the next steps run anyway"
    )
    summary = [formatEvent(e) for e in events if "exit status 1" in str(e.get("log_format"))]
    assert summary == [
        "shutdown finished, but 1 step(s) failed (flush the logfile): exit status 1"
    ]


def test_a_clean_shutdown_reports_no_failure() -> None:
    """Nothing failing: every step runs once, shutdown_failed stays False."""
    store, runner = FakeStore(), FakeRunner()
    top, _ = _scheduler_service(store, runner)
    top.startService()
    with capturedLogs() as events:
        top.stopService()
    assert (store.flushes, runner.stops, store.closed) == (1, [2.5], True)
    assert not top.shutdown_failed
    assert not [e for e in events if e.get("log_failure") is not None]


def test_a_child_that_fails_to_stop_does_not_keep_the_others_running() -> None:
    """A child raising in stopService does not keep the scheduler service running.

    The failure is recorded under the child's name.
    """
    store, runner = FakeStore(), FakeRunner()
    top, _ = _scheduler_service(store, runner)
    bad = _FailingStopService()
    bad.setName("listener")  # type: ignore[no-untyped-call]
    bad.setServiceParent(top)  # type: ignore[no-untyped-call]  # stopped first
    top.startService()
    with capturedLogs() as events:
        top.stopService()
    assert store.closed and runner.stops == [2.5]
    assert top.steps.failed == ["stop listener"]
    (failure,) = [e for e in events if e.get("log_failure") is not None]  # with traceback
    assert failure["step"] == "stop listener"
    assert str(failure["log_failure"].value) == "cannot stop"


def test_connections_and_runs_that_fit_the_descriptor_limit_are_kept() -> None:
    """1024 fds: 700 connections + 64 runs x 3 + 64 = 956 fit; no limit keeps anything."""
    with capturedLogs() as events:
        assert fit_descriptor_limit(1024, 700, 64, connections_set=True) == 700
        assert fit_descriptor_limit(None, 10**6, 10**4, connections_set=True) == 10**6
    assert list(events) == []


def test_the_rest_listeners_connections_are_kept_out_of_the_line_protocols() -> None:
    """With ``[http]`` on, its ``max_connections`` come off what the line listener may hold."""
    assert fit_descriptor_limit(2048, 4096, 64, connections_set=False) == 2048 - 64 - 192
    assert (
        fit_descriptor_limit(2048, 4096, 64, connections_set=False, rest_connections=1024)
        == 2048 - 64 - 192 - 1024
    )
    with pytest.raises(StartupError, match=r"\[http\] max_connections"):
        fit_descriptor_limit(1024, 900, 64, connections_set=True, rest_connections=100)


def test_the_default_max_connections_is_lowered_to_fit_with_a_warning() -> None:
    """Not set in the config (the 4096 default) on a 1024-fd machine: 1024 - 192 - 64."""
    with capturedLogs() as events:
        fits = fit_descriptor_limit(1024, 4096, 64, connections_set=False)
    assert fits == 768
    (warning,) = [formatEvent(e) for e in events]
    assert "max_connections lowered from its default 4096 to 768" in warning
    assert "descriptor limit is 1024" in warning


def test_an_explicit_max_connections_that_cannot_fit_is_refused_in_one_line() -> None:
    """Set in the config and too big: a StartupError naming the numbers and the keys."""
    with pytest.raises(StartupError) as error:
        fit_descriptor_limit(1024, 1000, 64, connections_set=True)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "the descriptor limit (1024, ulimit -n) cannot hold [controller] max_connections"
        " (1000) + [scheduler] max_concurrent_runs (64) x 3 + 64 for the daemon itself = 1256"
    )
    assert "(at most 768 here)" in message


def test_runs_that_leave_no_room_for_a_connection_are_refused_even_by_default() -> None:
    """max_concurrent_runs alone fills the limit: refused whether connections were set."""
    with pytest.raises(StartupError, match=r"max_concurrent_runs \(400\) x 3"):
        fit_descriptor_limit(1024, 4096, 400, connections_set=False)


def test_only_a_max_connections_other_than_the_default_counts_as_set(tmp_path: Path) -> None:
    """The config records values, not which keys were written: the default counts as unset."""
    assert not max_connections_set(Config())
    source = str(tmp_path / "z.toml")
    assert max_connections_set(parse_config("[controller]\nmax_connections = 100\n", source))


class _RecordingStop(Service):
    """A child whose stop is recorded in ``order`` and ends when ``done`` fires."""

    def __init__(self, name: str, order: list[str], stop_last: bool = False) -> None:
        self.setName(name)  # type: ignore[no-untyped-call]
        self.order = order
        self.stop_last = stop_last
        self.done: Deferred[None] = Deferred()

    def stopService(self) -> Deferred[None]:
        """Record the stop; finish when the test fires ``done``."""
        super().stopService()  # type: ignore[no-untyped-call]
        self.order.append(str(self.name))
        return self.done


def test_a_stop_last_child_stops_after_the_others_have_stopped() -> None:
    """Telemetry (``stop_last``) is stopped only once every other child has stopped.

    So runs that end while the scheduler waits out its grace period are still exported.
    """
    order: list[str] = []
    top = ZtickService("tcp:0", None)
    telemetry = _RecordingStop("telemetry", order, stop_last=True)
    scheduler = _RecordingStop("scheduler", order)
    listener = _RecordingStop("listener", order)
    for child in (telemetry, scheduler, listener):
        child.setServiceParent(top)  # type: ignore[no-untyped-call]
    top.startService()
    stopped: list[object] = []
    top.stopService().addCallback(stopped.append)
    assert order == ["listener", "scheduler"]
    scheduler.done.callback(None)
    assert order == ["listener", "scheduler"]  # the listener has not finished yet
    listener.done.callback(None)
    assert order == ["listener", "scheduler", "telemetry"]
    assert stopped == []
    telemetry.done.callback(None)
    assert stopped == [None]
    assert not top.shutdown_failed
