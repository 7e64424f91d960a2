"""The ``redis`` runner: ``redis <url> <PUBLISH|RPUSH|LPUSH|SET> <key>``.

A job sends ``<command> <key> <value>`` where the value is
:func:`~ztick_tw.runners.message.queue_message` (ztick: the bare job id).  An error reply
(``-ERR``, ``-WRONGTYPE``, ``-NOAUTH`` ...) fails the job with the server's text; any
other reply is success (so a ``PUBLISH`` that reached 0 subscribers succeeds, as in
ztick).

Unlike ztick, which opens a connection per job, the runner keeps **one persistent,
pipelined connection per rule URL** (the whole URL is the key), opened on the first job
that needs it.  Jobs that arrive while it is being opened queue on it.  Once it is up,
``AUTH`` and ``SELECT`` go out (when the URL asks for them); once they are accepted, the
queued commands go out in one write, and so does each later job as it comes.  Replies
are matched to jobs in order (RESP replies are FIFO).

Failures:

* ``Execution.timeout`` (else ``NetworkOptions.timeout``) covers connecting and the
  reply.  A job whose reply is late poisons the pipeline (every later reply would be
  matched to the wrong job), so the connection is dropped: the jobs whose time is up
  fail ``timed_out``, the others on it fail as the connection was dropped, and the next
  job reconnects.  A job still waiting for the connection fails alone.
* Cancelling the Deferred of :meth:`RedisRunner.run` fires ``cancelled_outcome`` at
  once.  A job not sent yet (waiting for the connection) is dropped; one sent already
  cannot be taken back: its place in the pipeline is kept and its reply ignored.
* The outcome's ``output`` is the reply as RESP shows it: ``b":1"``, ``b"+OK"``,
  ``b"-ERR ..."``.
* A connection that cannot be set up (refused, connect timeout, ``AUTH``/``SELECT``
  refused, not speaking RESP) fails the jobs waiting for it and starts a back-off window
  (0.5 s, doubling up to 30 s, reset by the next connection that comes up): during it,
  jobs for that URL fail at once with ``unavailable (last connect attempt: ...)`` instead
  of each trying to connect.  The first job after the window tries again.
* A connection lost with jobs on it fails them (``connection lost``); the next job
  reconnects, so a restarted server is picked up without restarting the daemon.

Reasons and logs name the endpoint as ``host:port[/db]`` (or :func:`redact_url`), never
with the password.

The per-URL connections (``_Target``: connecting, the handshake, pipelining, deadlines,
back-off) are ``ztick_tw/runners/redis_connection.py``; this module keeps the runner.
The RESP2 client (:class:`RespParser`, :func:`encode_command`,
:class:`RedisClientProtocol`, URLs) is ``ztick_tw/runners/resp.py``: no third-party
redis library.
"""

from __future__ import annotations

from typing import ClassVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from ztick_tw.model import RedisSpec
from ztick_tw.runners.backoff import BACKOFF_INITIAL
from ztick_tw.runners.base import (
    Execution,
    IRunner,
    Outcome,
    effective_timeout,
)
from ztick_tw.runners.message import NetworkOptions, queue_message, redact_url
from ztick_tw.runners.redis_connection import _Job, _Target, _TargetProtocol
from ztick_tw.runners.resp import (
    encode_command,
    parse_redis_url,
)

__all__ = [
    "BACKOFF_START",
    "REDIS_COMMANDS",
    "RedisRunner",
]

#: The commands a redis rule may send.
REDIS_COMMANDS = frozenset({"PUBLISH", "RPUSH", "LPUSH", "SET"})
#: The first back-off window after a failed connect (``runners/backoff.py``).
BACKOFF_START = BACKOFF_INITIAL

#: Why a job was ended when the runner was stopped (the daemon is shutting down).
SHUTDOWN_CAUSE = "stopped at shutdown"


@implementer(IRunner)
class RedisRunner:
    """Runs ``redis`` rules over one pooled, pipelined connection per URL.

    ``reactor`` must provide ``IReactorTCP`` and ``IReactorTime``.
    """

    log: ClassVar[Logger] = Logger()

    def __init__(self, reactor: IReactorTCP, options: NetworkOptions) -> None:
        self._reactor = reactor
        self._clock = IReactorTime(reactor)
        self.options = options
        self._connect_timeout = options.timeout if options.timeout > 0 else 30.0
        self._format = options.message_format
        self._targets: dict[str, _Target] = {}
        self._inflight = 0
        self._live: set[_TargetProtocol] = set()  # connections not yet closed
        self._stopping = False
        self._closing = False
        self._grace_call: IDelayedCall | None = None
        self._stop_waiters: list[Deferred[None]] = []
        #: How many TCP connections this runner has tried to open (for tests and STAT).
        self.connect_attempts = 0

    @property
    def running(self) -> int:
        """How many executions are in flight (queued for a connection or sent)."""
        return self._inflight

    @property
    def connections(self) -> int:
        """How many connections are open (one per URL in use at most)."""
        return len(self._live)

    def connection_states(self) -> dict[str, int]:
        """Targets by connection state, for ``ztick_runner_connections``.

        ``open`` (set up), ``connecting`` (dialling or in the handshake), ``backoff``
        (down, waiting to retry).
        """
        states = {"open": 0, "connecting": 0, "backoff": 0}
        now = self._clock.seconds()
        for target in self._targets.values():
            if target.writer is not None:
                states["open"] += 1
            elif target.protocol is not None or target.factory is not None:
                states["connecting"] += 1
            elif target.backoff.remaining(now) > 0:
                states["backoff"] += 1
        return states

    def run(self, execution: Execution) -> Deferred[Outcome]:
        """Send the job's command; fires with its outcome, never errbacks."""
        if self._stopping:
            return succeed(Outcome(False, "runner stopped"))
        spec = execution.spec
        if not isinstance(spec, RedisSpec):
            return succeed(Outcome(False, f"the redis runner cannot run a {spec.kind.wire} rule"))
        target = self._targets.get(spec.url)
        if target is None:
            try:
                endpoint = parse_redis_url(spec.url)
            except ValueError as e:
                return succeed(Outcome(False, f"redis {redact_url(spec.url)}: {e}"))
            target = self._targets[spec.url] = _Target(self, spec.url, endpoint)
        command = spec.command
        if command not in REDIS_COMMANDS:
            return succeed(
                Outcome(False, f"redis {target.label}: command {command!r} is not supported")
            )
        try:
            payload = encode_command(
                command.encode(), spec.key.encode("utf-8"), queue_message(execution, self._format)
            )
        except UnicodeError as e:  # e.g. a lone surrogate in an id read from an old log
            return succeed(Outcome(False, f"redis {target.label}: cannot encode the command: {e}"))
        timeout = effective_timeout(execution, self.options.timeout)
        job = _Job(target, execution, command, spec.key, payload, timeout, self._clock.seconds())
        refused = target.submit(job)
        if refused is not None:
            return succeed(Outcome(False, refused))
        return job.deferred

    def stop(self, grace: float) -> Deferred[None]:
        """Refuse new jobs; give in-flight ones ``grace`` s, then fail them (interrupted).

        Fires once every connection is closed.
        """
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        if self._stopping:
            self._maybe_closed()
            return d
        self._stopping = True
        if self._inflight == 0:
            self._close()
        else:
            self._grace_call = self._clock.callLater(max(0.0, grace), self._grace_over)
        return d

    # -- internals ------------------------------------------------------------------------

    def _finish(self, job: _Job, outcome: Outcome) -> None:
        if job.done:
            return
        job.done = True
        self._inflight -= 1
        job.deferred.callback(outcome)
        if self._stopping and self._inflight == 0 and not self._closing:
            self._close()

    def _grace_over(self) -> None:
        self._grace_call = None
        if self._inflight:
            self.log.warn(
                "redis runner: {count} job(s) still in flight at shutdown; failing them",
                count=self._inflight,
            )
        for target in list(self._targets.values()):
            target.fail_all(
                Outcome(False, f"redis {target.label}: {SHUTDOWN_CAUSE}", interrupted=True)
            )
        self._close()

    def _close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self._grace_call is not None:
            if self._grace_call.active():
                self._grace_call.cancel()
            self._grace_call = None
        targets = list(self._targets.values())
        self._targets.clear()
        for target in targets:
            target.close()
        for protocol in list(self._live):  # connections a target had already let go of
            protocol.abort()
        self._maybe_closed()

    def _maybe_closed(self) -> None:
        if self._closing and not self._live:
            waiters, self._stop_waiters = self._stop_waiters, []
            for d in waiters:
                d.callback(None)
