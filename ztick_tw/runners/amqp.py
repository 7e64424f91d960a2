"""The ``amqp`` runner: publish one message per job to an AMQP 0-9-1 broker (RabbitMQ).

``amqp <dsn> <exchange> <routing_key>`` publishes the job's message (the job id, or the
``json`` document of :func:`~ztick_tw.runners.message.rich_body`) to ``exchange`` with
``routing_key``.  A job succeeds only when the broker *confirms* the message (RabbitMQ
publisher confirms): a nack, a channel error such as a missing exchange, a lost
connection or no confirm within ``timeout`` fails it.  As in ztick, ``mandatory`` is off:
a message no queue is bound for is confirmed and dropped by the broker, and the job
succeeds.

DSN: ``amqp://[user[:password]@]host[:port][/vhost]`` (``amqps://`` for TLS, port 5671,
certificate and host name verified).  The vhost is the URL-decoded path without its
leading ``/``; no path, or ``/`` alone, is the default vhost ``/`` (``%2f`` also names it).
Without user information the broker's default ``guest``/``guest`` is used; a user with no
password sends an empty one.  A query string is ignored.

Connections are made with pika's Twisted adapter.  Each DSN gets one connection, opened
by the first job and kept for the following ones; each exchange gets its own channel on
it (so a channel error on one exchange does not fail deliveries to another), in confirm
mode, with many publishes outstanding at once.  A failed connection attempt fails the
jobs waiting for it and, during a back-off window (0.5 s doubling to 30 s, reset by a
successful connection), every new job for that DSN at once; the next job after the window
tries again.  A connection lost while open fails the unconfirmed deliveries ("delivery
not confirmed": the broker may or may not have the message) and the next job reconnects.

``Execution.timeout`` (else ``NetworkOptions.timeout``) bounds a delivery, connecting
included; past it the publish is given up (``timed_out``; a confirm that comes later is
ignored).  Cancelling the Deferred of :meth:`AmqpRunner.run` gives it up the same way
(one not published yet is dropped) and fires ``cancelled_outcome``.  The outcome's
``output`` is ``b"confirmed"``, or the broker's answer (``b"nack"``, ``b"404 NOT_FOUND -
no exchange ..."``).

Failure reasons and log lines name the endpoint as ``host:port/vhost``; the password is
never shown.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pika  # type: ignore[import-untyped]
import pika.exceptions  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.ssl import (
    platformTrust,
)
from twisted.logger import Logger
from zope.interface import implementer

from ztick_tw.model import AmqpSpec
from ztick_tw.runners.amqp_connection import _Endpoint, _Job
from ztick_tw.runners.amqp_target import (
    AmqpTarget,
    ReactorLike,
    load_ca_file,
    parse_dsn,
)
from ztick_tw.runners.backoff import BACKOFF_INITIAL, BACKOFF_MAX, Backoff
from ztick_tw.runners.base import (
    Execution,
    IRunner,
    Outcome,
    effective_timeout,
    timeout_reason,
)
from ztick_tw.runners.deadlines import Deadlines
from ztick_tw.runners.message import NetworkOptions

__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "AmqpRunner",
    "AmqpTarget",
    "Backoff",
    "load_ca_file",
    "parse_dsn",
]


# ------------------------------------------------------------------------------- runner


@implementer(IRunner)
class AmqpRunner:
    """Publishes each job's message to RabbitMQ and succeeds when the broker confirms it.

    ``reactor`` must provide ``IReactorTime`` and ``IReactorTCP``.  ``ca_file``: PEM CA
    certificates that ``amqps://`` brokers must chain to, read at construction
    (``ValueError`` if unusable); default: the system's trust store.
    """

    log: ClassVar[Logger] = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        options: NetworkOptions,
        *,
        ca_file: str | None = None,
    ) -> None:
        if not IReactorTCP.providedBy(reactor):
            raise TypeError("the amqp runner needs a reactor that provides IReactorTCP")
        self.reactor: ReactorLike = reactor
        self.options = options
        self.ca_file = ca_file
        self._trust: Any = None  # an IOpenSSLTrustRoot provider
        if ca_file is not None:  # read now: a bad file is a startup error, not a job's
            self._trust = load_ca_file(ca_file)
        self._endpoints: dict[str, _Endpoint] = {}
        self._pending: dict[_Job, None] = {}  # the jobs not done, in the order they came
        self._deadlines: Deadlines[_Job] = Deadlines()  # their deadlines
        self._timeout_call: IDelayedCall | None = None
        self._timeout_at = float("inf")
        self._grace_call: IDelayedCall | None = None
        self._live = 0
        self._stopping = False
        self._closed_all = False
        self._stop_waiters: list[Deferred[None]] = []
        self._content_type = (
            "application/json" if options.message_format == "json" else "text/plain"
        )
        self._delivery_mode = 2 if options.amqp_persistent else 1

    @property
    def running(self) -> int:
        """Executions started and not finished yet (connecting, queued or unconfirmed)."""
        return self._live

    @property
    def connections(self) -> int:
        """Broker connections open now (one per DSN in use)."""
        return sum(1 for endpoint in self._endpoints.values() if endpoint.state == "open")

    def connection_states(self) -> dict[str, int]:
        """Broker connections by state, for ``ztick_runner_connections``.

        ``open``, ``connecting``, ``closing``, ``idle`` (none now: down, or not needed yet).
        """
        states = {"open": 0, "connecting": 0, "closing": 0, "idle": 0}
        for endpoint in self._endpoints.values():
            states[endpoint.state] += 1
        return states

    # -- IRunner ---------------------------------------------------------------------

    def run(self, execution: Execution) -> Deferred[Outcome]:
        """Publish the execution's message; fire with its ``Outcome`` (never errbacks)."""
        if self._stopping:
            return succeed(Outcome(False, "runner stopped"))
        spec = execution.spec
        if not isinstance(spec, AmqpSpec):
            return succeed(Outcome(False, f"the amqp runner cannot run a {spec.kind.wire} spec"))
        endpoint = self._endpoints.get(spec.dsn)
        if endpoint is None:
            try:
                target = parse_dsn(spec.dsn)
            except ValueError as e:
                return succeed(Outcome(False, f"amqp: {e}"))
            endpoint = self._endpoints[spec.dsn] = _Endpoint(self, target)
        now = self.reactor.seconds()
        job_id = execution.job_id
        job = _Job(self, execution, spec, now, effective_timeout(execution, self.options.timeout))
        self._live += 1
        try:
            endpoint.submit(job)
        except Exception as e:  # a bug, not a delivery problem: keep run()'s promise
            self.log.failure("amqp runner: unexpected error starting job {job_id}", job_id=job_id)
            self.finish(job, Outcome(False, endpoint.reason(f"internal error: {e!r}")))
        if not job.done:  # (a job failed at once by a back-off window needs no timer)
            self._pending[job] = None
            if job.timeout > 0:
                self._deadlines.push(job.deadline, job)
                if job.deadline < self._timeout_at:
                    self._arm()
        return job.deferred

    def stop(self, grace: float) -> Deferred[None]:
        """Refuse new runs; give pending deliveries ``grace`` s, then end them.

        What is still unconfirmed then fails as interrupted ("stopped at shutdown");
        every connection is closed cleanly before the returned Deferred fires.
        """
        stopped: Deferred[None] = Deferred()
        if self._stopping:
            if self._closed_all:
                stopped.callback(None)
            else:
                self._stop_waiters.append(stopped)
            return stopped
        self._stopping = True
        self._stop_waiters.append(stopped)
        if self._live:
            self._grace_call = self.reactor.callLater(max(grace, 0.0), self._interrupt)
        else:
            self._close_all()
        return stopped

    # -- helpers for the channels ----------------------------------------------------

    def properties(self, execution: Execution) -> pika.BasicProperties:
        """The message properties of one execution."""
        return pika.BasicProperties(
            content_type=self._content_type,
            delivery_mode=self._delivery_mode,
            message_id=execution.job_id,
            app_id="ztick-tw",
            headers={"ztick-rule-id": execution.rule_id, "ztick-attempt": execution.attempt},
        )

    def trust_root(self) -> Any:
        """The certificates ``amqps://`` brokers must chain to."""
        if self._trust is None:
            self._trust = platformTrust()  # type: ignore[no-untyped-call]
        return self._trust

    def finish(self, job: _Job, outcome: Outcome) -> None:
        """End ``job`` with ``outcome`` (the first outcome wins; later ones are ignored)."""
        if job.done:
            return
        job.done = True
        self._live -= 1
        self._pending.pop(job, None)
        duration = self.reactor.seconds() - job.started
        if outcome.success:
            self.log.debug(
                "job {job_id}: amqp delivery confirmed in {duration:.3f}s",
                job_id=job.execution.job_id,
                duration=duration,
            )
        else:
            self.log.debug(
                "job {job_id}: amqp delivery failed after {duration:.3f}s: {reason}",
                job_id=job.execution.job_id,
                duration=duration,
                reason=outcome.reason,
            )
        try:
            job.deferred.callback(outcome)
        finally:
            if self._stopping and self._live == 0 and self._grace_call is not None:
                self._interrupt()

    # -- timers ----------------------------------------------------------------------

    def _arm(self) -> None:
        """Arm the timer for the earliest deadline of a job not done (or none)."""
        timer, self._timeout_call = self._timeout_call, None
        if timer is not None and timer.active():
            timer.cancel()
        self._timeout_at = float("inf")
        earliest = self._deadlines.earliest()
        if earliest is not None:
            self._timeout_at = earliest
            delay = max(self._timeout_at - self.reactor.seconds(), 0.0)
            self._timeout_call = self.reactor.callLater(delay, self._expire)

    def _expire(self) -> None:
        """Fail the jobs whose deadline has come; re-arm for the next one."""
        self._timeout_call = None
        self._timeout_at = float("inf")
        now = self.reactor.seconds()
        for job in self._deadlines.pop_expired(now + 1e-6):
            if not job.done:  # (an earlier time-out's callbacks may have ended it)
                self._time_out(job)
        if self._timeout_call is None:  # (a callback may have armed it meanwhile)
            self._arm()

    def _time_out(self, job: _Job) -> None:
        endpoint = self._endpoints.get(job.spec.dsn)
        text = timeout_reason(job.timeout)
        if endpoint is not None:
            protocol = endpoint.protocol
            if protocol is not None and protocol.blocked:
                text += " (the broker is blocking publishers: resource alarm)"
            elif not job.published:
                text += " before publishing" if endpoint.state == "open" else " connecting"
            else:
                text += " waiting for the broker's confirm"
            self.finish(job, Outcome(False, endpoint.reason(text), timed_out=True))
        else:
            self.finish(job, Outcome(False, f"amqp: {text}", timed_out=True))

    def _interrupt(self) -> None:
        """The grace period is over (or nothing is left): fail what remains, close all."""
        call, self._grace_call = self._grace_call, None
        if call is not None and call.active():
            call.cancel()
        for job in list(self._pending):
            self.finish(job, Outcome(False, "stopped at shutdown", interrupted=True))
        self._close_all()

    def _close_all(self) -> None:
        self._pending.clear()
        self._deadlines.clear()
        self._timeout_at = float("inf")
        timer, self._timeout_call = self._timeout_call, None
        if timer is not None and timer.active():
            timer.cancel()
        closing = [endpoint.close() for endpoint in self._endpoints.values()]
        self._endpoints.clear()
        remaining = len(closing)

        def one_closed(_: object) -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0:
                self._all_closed()

        if not closing:
            self._all_closed()
        for d in closing:
            d.addBoth(one_closed)

    def _all_closed(self) -> None:
        self._closed_all = True
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)
