"""Assemble a running daemon from a ``Config``: store, scheduler, runners, listener."""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ztick_tw import __version__
from ztick_tw.auth import AuthFileError, TokenStore, load_tokens
from ztick_tw.compaction import CompactionService
from ztick_tw.config import HISTORY_SUFFIX, Config
from ztick_tw.descriptors import (
    StartupError,
    fit_descriptor_limit,
    max_connections_set,
    raise_descriptor_limit,
)
from ztick_tw.history import History, HistoryError
from ztick_tw.model import Policy, RunnerKind
from ztick_tw.operations import Operations
from ztick_tw.prometheus import MetricsResource, PrometheusMetrics, install, metrics_service
from ztick_tw.protocol.server import ZtickFactory
from ztick_tw.rest import rest_site
from ztick_tw.runners.amqp import AmqpRunner
from ztick_tw.runners.base import IRunner
from ztick_tw.runners.http import HttpRunner, load_trust_root
from ztick_tw.runners.message import NetworkOptions
from ztick_tw.runners.process import (
    AwfRunner,
    DirectRunner,
    ProcessOptions,
    ShellRunner,
)
from ztick_tw.runners.redis import RedisRunner
from ztick_tw.scheduler.core import Scheduler
from ztick_tw.store.base import IStore, StoreError
from ztick_tw.store.logfile import LogfileStore
from ztick_tw.store.memory import MemoryStore
from ztick_tw.telemetry import TelemetryService
from ztick_tw.tls.context import TLSSetupError
from ztick_tw.tls.server import ReloadableServerTLS, TLSReloadService, tls_factory

log = Logger(namespace="ztick_tw")


class ShutdownSteps:
    """The steps of one shutdown that failed: each is logged, and later steps still run.

    A step that raises (or whose Deferred fails) is logged with its name and the
    traceback, and remembered; the daemon's exit status is then 1 (see ``ZtickService``).
    """

    def __init__(self) -> None:
        self.failed: list[str] = []

    def run(self, step: str, action: Callable[[], object]) -> None:
        """Run ``action`` now; a failure is logged and recorded, never raised."""
        try:
            action()
        except Exception:
            self.record(step, Failure())

    def record(self, step: str, failure: Failure) -> None:
        """Log ``failure`` as the failure of ``step`` and remember it.

        A ``StoreError`` (a logfile that cannot be written or synced) is logged as its
        message; anything else, unexpected, with its traceback.
        """
        self.failed.append(step)
        if failure.check(StoreError) is not None:
            log.error(
                "shutdown step failed: {step}: {error}; the next steps run anyway",
                step=step,
                error=failure.getErrorMessage(),
            )
            return
        log.failure("shutdown step failed: {step}; the next steps run anyway", failure, step=step)

    def guard(self, step: str, action: Callable[[], Deferred[Any]]) -> Deferred[None]:
        """Run ``action``; its Deferred (or exception) ends as ``None``, failures recorded."""
        d: Deferred[Any] = maybeDeferred(action)

        def failed(failure: Failure) -> None:
            self.record(step, failure)

        return d.addCallbacks(lambda _: None, failed)


class SchedulerService(Service):
    """Runs the scheduler between start and stop, and closes the store last.

    Stopping stops the timer, lets running executions finish for the grace period
    (then TERM, then KILL), records their outcomes, and flushes and closes the log.
    Each of these steps runs even when an earlier one failed (a logfile whose fsync
    fails must not leave the jobs' processes behind); failures go to ``steps``.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        store: IStore,
        grace: float,
        steps: ShutdownSteps | None = None,
        history: History | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.store = store
        self.grace = grace
        self.steps = steps if steps is not None else ShutdownSteps()
        self.history = history

    def startService(self) -> None:
        """Start the timer (after the replay done when the service was built)."""
        super().startService()
        self.scheduler.start()

    def stopService(self) -> Deferred[None]:
        """Stop firing, wait for running jobs (bounded by the grace period), close the log.

        Never fails: a failed step is logged and recorded in ``steps``.
        """
        super().stopService()
        log.info("stopping: waiting up to {grace}s for running jobs", grace=self.grace)
        steps = self.steps
        steps.run("flush the logfile", self.store.flush)
        d = steps.guard(
            "stop the scheduler and end running jobs", lambda: self.scheduler.stop(self.grace)
        )

        def close(_: object) -> Deferred[None]:
            steps.run("close the logfile", self.store.close)
            history = self.history
            if history is None:
                return succeed(None).addCallback(finished)
            return steps.guard("close the run history", history.close).addCallback(finished)

        def finished(_: object) -> None:
            if not steps.failed:
                log.info("stopped; log flushed and closed")

        return d.addCallback(close)


def make_store(config: Config, reactor: Any) -> IStore:
    """The persistence backend named by ``[database] persistence``."""
    db = config.database
    if db.persistence == "memory":
        return MemoryStore()
    return LogfileStore(
        reactor, db.logfile_path, db.fsync_on_persist, recover=db.recover_corrupt_log
    )


def _read_signing_secret(path: str) -> bytes:
    """The webhook signing key in ``path`` (surrounding whitespace stripped)."""
    where = f"[runners] http_signing_secret_file {path}"
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
            mode = os.fstat(f.fileno()).st_mode
    except OSError as e:
        raise StartupError(f"{where}: cannot read it: {e.strerror}") from None
    if not secret:
        raise StartupError(f"{where}: the file is empty (it must hold the signing secret)")
    if mode & 0o077:
        log.warn(
            "{where} can be read by other users (mode {mode:o}); chmod 600 it",
            where=where,
            mode=mode & 0o777,
        )
    return secret


def _check_ca_file(key: str, path: str) -> None:
    """Refuse a CA bundle that cannot be read or holds no usable PEM certificate."""
    try:
        load_trust_root(path)
    except ValueError as e:
        raise StartupError(f"[runners] {key}: {e}") from None


def network_options(config: Config) -> NetworkOptions:
    """``[runners]`` turned into the http/redis/amqp runners' options (files read here)."""
    r = config.runners
    for key, path in (("http_ca_file", r.http_ca_file), ("amqp_ca_file", r.amqp_ca_file)):
        if path is not None:
            _check_ca_file(key, path)
    secret = None
    if r.http_signing_secret_file is not None:
        secret = _read_signing_secret(r.http_signing_secret_file)
    return NetworkOptions(
        timeout=r.timeout,
        message_format=r.message_format,
        http_ca_file=r.http_ca_file,
        http_signing_secret=secret,
        http_max_response_bytes=r.http_max_response_bytes,
        amqp_persistent=r.amqp_persistent,
        amqp_ca_file=r.amqp_ca_file,
    )


def make_runners(config: Config, reactor: Any) -> dict[RunnerKind, IRunner]:
    """One runner per runner kind, all inside this reactor."""
    options = ProcessOptions(
        output_limit_bytes=config.scheduler.output_limit_bytes,
        run_timeout=config.scheduler.run_timeout,
    )
    network = network_options(config)
    return {
        RunnerKind.SHELL: ShellRunner(reactor, config.shell.path, config.shell.args, options),
        RunnerKind.DIRECT: DirectRunner(reactor, options),
        RunnerKind.AWF: AwfRunner(reactor, options),
        RunnerKind.HTTP: HttpRunner(reactor, network),
        RunnerKind.AMQP: AmqpRunner(reactor, network, ca_file=network.amqp_ca_file),
        RunnerKind.REDIS: RedisRunner(reactor, network),
    }


def make_tls(config: Config) -> ReloadableServerTLS | None:
    """The TLS context of ``[controller] tls_cert``/``tls_key``, or ``None`` (plain TCP)."""
    c = config.controller
    if c.tls_cert is None or c.tls_key is None:
        return None
    try:
        creator = ReloadableServerTLS(c.tls_cert, c.tls_key, c.tls_client_ca)
    except TLSSetupError as e:
        raise StartupError(str(e)) from None
    log.info("TLS on: {description}", description=creator.describe())
    return creator


def load_auth(config: Config) -> TokenStore | None:
    """The tokens of ``[controller] auth_file``, or ``None`` when auth is off."""
    path = config.controller.auth_file
    if path is None:
        return None
    try:
        tokens, warnings = load_tokens(path)
    except AuthFileError as e:
        raise StartupError(str(e)) from None
    for warning in warnings:
        log.warn("{problem}", problem=warning)
    log.info("authentication on: {count} token(s) from {path}", count=len(tokens), path=path)
    return tokens


def make_service(config: Config, reactor: Any) -> ZtickService:
    """Build the daemon: replay the log, then a scheduler service and a listener.

    Raises ``StartupError`` for problems an operator must fix (unreadable or damaged
    logfile, settings this version cannot honour).
    """
    tokens = load_auth(config)
    tls = make_tls(config)
    max_connections = fit_descriptor_limit(
        raise_descriptor_limit(),
        config.controller.max_connections,
        config.scheduler.max_concurrent_runs,
        connections_set=max_connections_set(config),
        rest_connections=config.http.max_connections if config.http.enabled else 0,
    )
    for warning in config.warnings:
        log.warn("{problem}", problem=warning)
    telemetry = TelemetryService(config.telemetry, reactor)
    started = reactor.seconds()
    try:
        store = make_store(config, reactor)
        entries = store.load()
        history_path = config.history_path
        if config.history.path is None and history_path is not None:
            # beside the logfile's real file, as the compaction's files are
            history_path = os.path.realpath(config.database.logfile_path) + HISTORY_SUFFIX
        history = History(
            history_path,
            runs=config.history.runs,
            output_bytes=config.history.output_bytes,
            reactor=reactor,
        )
        r = config.runners
        scheduler = Scheduler(
            reactor,
            store,
            telemetry.wrap_runners(make_runners(config, reactor)),
            max_concurrent=config.scheduler.max_concurrent_runs,
            max_concurrent_network=config.scheduler.max_concurrent_network_runs,
            interrupted=config.scheduler.interrupted_jobs,
            history=history,
            policy_defaults=Policy(None, r.retries, r.backoff_min_ns, r.backoff_max_ns),
        )
        summary = scheduler.replay(entries)
        history.open()  # after the replay: a damaged logfile leaves no writer thread behind
    except HistoryError as e:
        raise StartupError(f"[history] {e}") from None
    except StoreError as e:
        raise StartupError(str(e)) from None
    except OSError as e:
        where = e.filename or config.database.logfile_path
        raise StartupError(f"{where}: cannot open logfile: {e.strerror}") from None
    # Everything allocated so far (imports, the replayed state) lives for good: keep the
    # collector from walking it again, which otherwise shows up as 20-30 ms trigger lag.
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, GC_FULL_EVERY)
    log.info(
        "ztick-tw {version}: loaded {jobs} jobs and {rules} rules from {frames} {persistence}"
        " frames in {seconds:.3f}s",
        version=__version__,
        jobs=summary.jobs,
        rules=summary.rules,
        frames=summary.frames,
        persistence=store.name,
        seconds=reactor.seconds() - started,
    )
    compaction = None
    if isinstance(store, LogfileStore):
        compaction = CompactionService(
            reactor,
            scheduler,
            store,
            config.database.compression_interval,
            config.database.retention,
        )
    # One set of operations for every transport: the namespace rules, validation, STAT.
    operations = Operations(
        scheduler,
        reactor,
        compression=(lambda: compaction.status) if compaction is not None else (lambda: "idle"),
        persistence=store.name,
        framerate=config.database.framerate,
        auth_enabled=lambda: tokens is not None,
        tls_enabled=tls is not None,
        history=history,
        history_runs=config.history.runs,
    )
    operations = telemetry.wrap_operations(operations)  # a span per request when enabled
    factory = ZtickFactory(
        scheduler,
        reactor,
        operations=operations,
        tokens=tokens,
        max_connections=max_connections,
        idle_timeout=config.controller.idle_timeout,
        max_unauthenticated=config.controller.max_unauthenticated,
        max_unauthenticated_per_source=config.controller.max_unauthenticated_per_source,
    )
    served: IProtocolFactory = factory if tls is None else tls_factory(factory, tls)
    top = ZtickService(config.controller.listen_endpoint, reactor)
    if telemetry.enabled:
        telemetry.setServiceParent(top)  # first: exporting before the listener accepts
    SchedulerService(
        scheduler, store, config.scheduler.shutdown_grace, top.steps, history
    ).setServiceParent(top)
    if compaction is not None:
        compaction.setServiceParent(top)  # stopped before the store is closed
    HangupService().setServiceParent(top)
    if tls is not None:
        TLSReloadService(reactor, tls).setServiceParent(top)  # SIGHUP reloads the certificate
    listener = strports.service(
        with_backlog(config.controller.listen_endpoint), served, reactor=reactor
    )
    listener._raiseSynchronously = True  # a failed bind stops startup
    listener.setName("controller")
    listener.setServiceParent(top)
    scrape = config.telemetry.prometheus_listen_endpoint
    if config.http.listen_endpoint is not None or scrape is not None:
        metrics = PrometheusMetrics(operations)  # fed only when something serves it
        install(metrics, scheduler, store, compaction)
        if config.http.listen_endpoint is not None:
            rest = rest_service(config, operations, tokens, tls, metrics, reactor)
            rest.setServiceParent(top)
        if scrape is not None:
            metrics_service(scrape, metrics, reactor).setServiceParent(top)
            log.info("Prometheus /metrics on {endpoint}", endpoint=scrape)
    return top


def rest_service(
    config: Config,
    operations: Operations,
    tokens: TokenStore | None,
    tls: ReloadableServerTLS | None,
    metrics: PrometheusMetrics,
    reactor: Any,
) -> Service:
    """``[http] listen``: the REST API (SPEC §7) and ``/metrics``, TLS like the controller.

    A failed bind stops startup, as the controller's does.
    """
    endpoint = config.http.listen_endpoint
    assert endpoint is not None
    site = rest_site(
        operations,
        reactor,
        tokens=tokens,
        timeout=config.controller.idle_timeout,
        max_connections=config.http.max_connections,
        metrics=MetricsResource(metrics),
    )
    served: IProtocolFactory = site if tls is None else tls_factory(site, tls)
    service = strports.service(with_backlog(endpoint), served, reactor=reactor)
    service._raiseSynchronously = True
    service.setName("rest")
    log.info("REST API on {endpoint}", endpoint=endpoint)
    return service


#: Generation-1 collections between two full (generation 2) ones; CPython's default is
#: 10.  A full collection walks every object made since startup (the scheduled jobs'
#: compiled schedules, connections ...): 12-30 ms on this project's machine.  At 5,000
#: runs/s the default ran one every 3 s (trigger lag p99 5.7 ms in recurring_redis on a
#: loaded machine); at 100 one in 30 s (p99 4.1 ms).  Cycles still die young in the
#: younger generations; what reaches generation 2 waits longer (18 objects a pass there).
GC_FULL_EVERY = 100


#: Pending connections the kernel queues for us; Twisted's default of 50 overflows when
#: a thousand clients reconnect at once (each dropped SYN is retried a second later).
LISTEN_BACKLOG = 1024


def with_backlog(endpoint: str) -> str:
    """A ``tcp:``/``tcp6:``/``unix:`` endpoint with a large backlog unless one is given."""
    if endpoint.split(":", 1)[0] in ("tcp", "tcp6", "unix") and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={LISTEN_BACKLOG}"
    return endpoint


class HangupService(Service):
    """SIGHUP is logged and survived (a closed terminal must not kill the daemon).

    Installed first, so that TLS certificate reload chains onto it. Under twistd too.
    """

    def __init__(self) -> None:
        self._previous: Any = None

    def startService(self) -> None:
        """Install the SIGHUP handler."""
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        """Put the previous handler back."""
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _hangup(self, signum: int, frame: object) -> None:
        log.info("SIGHUP received (TLS certificates, if any, are reloaded); carrying on")


class ZtickService(MultiService):
    """The whole daemon: the scheduler service, then the listener (stopped first).

    Stopping stops every child even when one fails; ``shutdown_failed`` then says so,
    and the process must exit with status 1.  ``ztick-tw serve`` returns that status
    itself.  Under twistd (the service has a parent: twistd's application), which exits
    0 (or re-raises the stopping signal) whatever happened, an ``atexit`` hook makes the
    process exit 1 once twistd has removed its pidfile; see ``_exit_1_at_exit``.
    """

    def __init__(self, endpoint: str, reactor: Any = None) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.steps = ShutdownSteps()
        self._reactor = reactor

    @property
    def shutdown_failed(self) -> bool:
        """True once a shutdown step failed (the process must exit with status 1)."""
        return bool(self.steps.failed)

    def startService(self) -> None:
        """Start everything; a listener that cannot bind raises ``StartupError``."""
        try:
            super().startService()
        except Exception as e:  # CannotListenError and friends from the endpoint
            raise StartupError(f"cannot listen on {self.endpoint}: {e}") from e
        log.info("listening on {endpoint} (pid {pid})", endpoint=self.endpoint, pid=os.getpid())

    def stopService(self) -> Deferred[None]:
        """Stop the children, newest first, each even if stopping another failed.

        A child with ``stop_last`` true (telemetry) is stopped once the others have
        stopped, so what they record while stopping (runs ending in the grace period)
        is still exported.
        """
        Service.stopService(self)
        children = list(reversed(list(self)))
        last = [child for child in children if getattr(child, "stop_last", False)]

        def stop(group: list[IService]) -> Deferred[Any]:
            return DeferredList(
                [
                    self.steps.guard(
                        f"stop {child.name or type(child).__name__}", child.stopService
                    )
                    for child in group
                ]
            )

        first = stop([child for child in children if child not in last])
        return first.addCallback(lambda _: stop(last)).addCallback(self._stopped)

    def _stopped(self, _: object) -> None:
        if not self.steps.failed:
            return
        log.error(
            "shutdown finished, but {count} step(s) failed ({steps}): exit status 1",
            count=len(self.steps.failed),
            steps="; ".join(self.steps.failed),
        )
        if self.parent is not None:
            exit_1_after_twistd(self._reactor)


def exit_1_after_twistd(reactor: Any) -> None:
    """Make a twistd process exit with status 1 once twistd is done.

    After the reactor stops, twistd removes its pidfile and then, when a signal
    stopped the reactor, kills itself with that signal, else returns (status 0).  So
    the reactor's record of the signal is cleared (twistd then returns normally) and
    an ``atexit`` hook ends the process with status 1 (it runs after the pidfile is gone).
    """
    if reactor is not None and getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None
    atexit.register(_exit_1_at_exit)


def _exit_1_at_exit() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(1)
