"""The Twisted client: every instruction returns a Deferred; requests are pipelined.

``connect(reactor, endpoint, token=...)`` gives a Deferred firing with a connected
:class:`ZtickProtocolClient` (after ``AUTH`` when a token is given).  Requests are written
at once and their answers matched in order, so any number can be outstanding; each
Deferred fires with the typed result of :mod:`.wire` or fails with ``ZtickError``.  For
TLS, pass an endpoint wrapped by ``twisted.internet.endpoints.wrapClientTLS`` (or use
:func:`endpoint`).
"""

from __future__ import annotations

from collections import deque
from datetime import datetime
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import Certificate, optionsForClientTLS, platformTrust
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from ztick_tw.client import wire
from ztick_tw.client.wire import Call, Instant, Job, Policy, ProtocolError, Rule, Run, Schedule

T = TypeVar("T")


class ZtickProtocolClient(LineOnlyReceiver):
    """One connection; answers are matched to requests in order."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 22
    log = Logger()

    def __init__(self) -> None:
        self._pending: deque[tuple[str, wire.Answer[Any], Deferred[Any]]] = deque()
        self._next_id = 1
        self._auth: Deferred[None] | None = None
        self.connected_d: Deferred[ZtickProtocolClient] = Deferred()
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        """Fire ``connected_d``."""
        self.connected_d.callback(self)

    def authenticate(self, token: str) -> Deferred[None]:
        """Send ``AUTH`` (the connection's first line); fires when the server says ``OK``."""
        self._auth = Deferred()
        self.transport.write(wire.auth_line(token))  # type: ignore[union-attr]
        return self._auth

    def lineReceived(self, line: bytes) -> None:
        """Match one answer line to the oldest request still waiting."""
        text = line.decode("utf-8", "replace").removesuffix("\r")
        if self._auth is not None:
            auth, self._auth = self._auth, None
            if text == "OK":
                auth.callback(None)
            else:
                auth.errback(wire.ZtickError(("AUTH",), text))
            return
        if not self._pending:
            self.log.warn("unexpected answer line {line!r}", line=text)
            return
        rid, answer, d = self._pending[0]
        got, _, rest = text.partition(" ")
        if got != rid:
            self._fail_all(ProtocolError(f"answer for {got!r} while waiting for {rid!r}"))
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if answer.feed(rest):
            self._pending.popleft()
            try:
                result = answer.result()
            except Exception as e:  # ZtickError, or a malformed answer
                d.errback(e)
            else:
                d.callback(result)

    def lineLengthExceeded(self, line: bytes) -> None:
        """An answer line over ``MAX_LENGTH``: fail everything, disconnect."""
        self._fail_all(ProtocolError("an answer line is too long"))
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Fail every request still waiting."""
        self._fail_all(
            ProtocolError(f"connection lost: {reason.getErrorMessage() if reason else 'closed'}")
        )
        if self._auth is not None:
            auth, self._auth = self._auth, None
            auth.errback(wire.ZtickError(("AUTH",), "connection closed"))
        self.closed.callback(None)

    def _fail_all(self, error: Exception) -> None:
        pending, self._pending = self._pending, deque()
        for _, _, d in pending:
            d.errback(error)

    def call(self, call: Call[T]) -> Deferred[T]:
        """Send one request now; the Deferred fires with its typed result."""
        rid = f"c{self._next_id}"
        self._next_id += 1
        d: Deferred[T] = Deferred()
        try:
            data = wire.format_request(rid, call)
        except ValueError as e:
            d.errback(e)
            return d
        self._pending.append((rid, wire.Answer(call), d))
        self.transport.write(data)  # type: ignore[union-attr]
        return d

    def request(self, *words: str) -> Deferred[list[str]]:
        """Any request; the answer's body lines as sent."""
        return self.call(wire.raw(*words))

    def close(self) -> Deferred[None]:
        """Close the connection; fires once it is closed."""
        self.transport.loseConnection()  # type: ignore[union-attr]
        return self.closed

    # -- instructions ---------------------------------------------------------------------

    def set(self, job: str, when: int | datetime) -> Deferred[None]:
        """SET: create or replace a one-shot job at ``when`` (ns, or an aware datetime)."""
        return self.call(wire.set_job(job, when))

    def get(self, job: str) -> Deferred[Job]:
        """GET: the job (``ZtickError`` if unknown)."""
        return self.call(wire.get_job(job))

    def query(self, prefix: str = "") -> Deferred[list[Job]]:
        """QUERY: the jobs whose id starts with ``prefix``, in id order."""
        return self.call(wire.query(prefix))

    def remove(self, job: str) -> Deferred[None]:
        """REMOVE: delete the job."""
        return self.call(wire.remove(job))

    def rule_set(self, rule: str, pattern: str, runner: str, *args: str) -> Deferred[None]:
        """RULE SET: map job ids starting with ``pattern`` to a runner."""
        return self.call(wire.rule_set(rule, pattern, runner, *args))

    def remove_rule(self, rule: str) -> Deferred[None]:
        """REMOVERULE: delete the rule."""
        return self.call(wire.remove_rule(rule))

    def list_rules(self) -> Deferred[list[Rule]]:
        """LISTRULES: every rule, in the order first set."""
        return self.call(wire.list_rules())

    def stat(self) -> Deferred[dict[str, int | str]]:
        """STAT: the daemon's figures (numbers as ints)."""
        return self.call(wire.stat())

    def schedule_set(
        self, job: str, schedule: str, options: dict[str, str] | None = None
    ) -> Deferred[int]:
        """SCHEDULE SET: make the job recurring; the first firing in ns."""
        return self.call(wire.schedule_set(job, schedule, options))

    def schedule_get(self, job: str) -> Deferred[Schedule]:
        """SCHEDULE GET: the job's schedule, options, next run and run count."""
        return self.call(wire.schedule_get(job))

    def schedule_remove(self, job: str) -> Deferred[None]:
        """SCHEDULE REMOVE: the job stays, a one-shot at its current time."""
        return self.call(wire.schedule_remove(job))

    def list_schedules(self, prefix: str = "") -> Deferred[list[Schedule]]:
        """LISTSCHEDULES: the scheduled jobs whose id starts with ``prefix``."""
        return self.call(wire.list_schedules(prefix))

    def preview(
        self, schedule: str, count: int | None = None, options: dict[str, str] | None = None
    ) -> Deferred[list[Instant]]:
        """PREVIEW: the schedule's next instants (5 unless ``count``)."""
        return self.call(wire.preview(schedule, count, options))

    def pause(self, job: str) -> Deferred[None]:
        """PAUSE: hold the job until RESUME."""
        return self.call(wire.pause(job))

    def resume(self, job: str) -> Deferred[None]:
        """RESUME: let a paused job fire again."""
        return self.call(wire.resume(job))

    def run(self, job: str) -> Deferred[None]:
        """RUN: one extra run now; answered once it has started."""
        return self.call(wire.run_now(job))

    def history(self, job: str, count: int | None = None) -> Deferred[list[Run]]:
        """HISTORY: the job's last runs, newest first."""
        return self.call(wire.history(job, count))

    def rule_policy(self, rule: str, options: dict[str, str] | None = None) -> Deferred[Policy]:
        """RULE POLICY: change (or, without options, show) the rule's policy."""
        return self.call(wire.rule_policy(rule, options))


def connect(
    reactor: Any, endpoint: IStreamClientEndpoint, token: str | None = None
) -> Deferred[ZtickProtocolClient]:
    """Connect through ``endpoint``; fires with the client once connected (and AUTHed)."""
    proto = ZtickProtocolClient()
    d: Deferred[Any] = connectProtocol(endpoint, proto)  # type: ignore[no-untyped-call]
    if token is not None:
        d.addCallback(lambda p: p.authenticate(token).addCallback(lambda _: p))
    return d


def endpoint(
    reactor: Any,
    host: str = "127.0.0.1",
    port: int = 5678,
    *,
    tls: bool = False,
    cafile: str | None = None,
) -> IStreamClientEndpoint:
    """A TCP endpoint, inside TLS (verified against ``cafile`` or the system CAs) if asked."""
    base = HostnameEndpoint(reactor, host, port)
    if not tls:
        return base
    if cafile:
        with open(cafile, "rb") as f:
            trust: Any = Certificate.loadPEM(f.read())
    else:
        trust = platformTrust()  # type: ignore[no-untyped-call]
    return wrapClientTLS(optionsForClientTLS(host, trustRoot=trust), base)
