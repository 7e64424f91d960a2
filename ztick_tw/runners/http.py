r"""The ``http`` runner: deliver a job as a webhook (``http <METHOD> <url>``).

One :class:`HttpRunner` serves every ``http`` rule.  It sends requests with a single
:class:`twisted.web.client.Agent` over a persistent :class:`HTTPConnectionPool`, so jobs
bound for the same endpoint reuse keep-alive connections.  Per run:

* The request is ``<METHOD> <url>`` with the body of :func:`http_body` (POST and PUT;
  ``Content-Type: application/json``), ``X-Ztick-Job-Id`` and ``User-Agent:
  ztick-tw/<version>``; with a signing secret also ``X-Ztick-Timestamp`` and
  ``X-Ztick-Signature``.  A ``user:password@`` in the URL becomes an
  ``Authorization: Basic`` header and is removed from the request line.
* A 2xx status is success; any other status fails the job with the status in the
  reason (and the start of the response body).  Redirects are not followed.
* ``Execution.timeout`` (else ``NetworkOptions.timeout``) bounds the whole delivery, from
  :meth:`HttpRunner.run` (waiting for a free connection included) to the last byte of the
  response.  A request that runs out of time has its connection aborted; it never goes
  back to the pool; its outcome has ``timed_out``.
* Cancelling the Deferred of :meth:`HttpRunner.run` ends the delivery the same way (one
  still waiting for a connection is dropped) and fires ``cancelled_outcome``.
* The outcome's ``output`` is ``b"status N\n"`` and the tail of the response body (at most
  ``NetworkOptions.output_limit_bytes``); empty when no response came.
* The response body is always read, so the connection can carry the next request, but
  at most ``http_max_response_bytes`` of it: past that the connection is aborted.  The
  outcome still comes from the status code.
* The response head is bounded too (:class:`_BoundedClientProtocol`): at most
  :data:`MAX_HEAD_BYTES` of status and header lines, :data:`MAX_HEADER_LINES` header
  lines, :data:`MAX_HEAD_LINE_BYTES` per line and :data:`MAX_INFORMATIONAL` informational
  (1xx) responses.  Past a limit the connection is aborted and the job fails with the
  limit in the reason: ``response headers exceeded 65536 bytes``.
* At most ``max_connections_per_host`` requests are in flight per endpoint; later ones
  wait for a connection in the order they came.  This keeps a burst of thousands of due
  webhooks on a few reused connections instead of thousands of new sockets.
* https verifies the certificate chain (``http_ca_file`` or the system's trust store)
  and the host name.

A URL reaches reasons and log lines only through :func:`redact_url`.  Failures are
logged at debug level only: the scheduler logs every failed job with its reason.
"""

from __future__ import annotations

import base64
from collections import deque
from functools import lru_cache
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from ztick_tw import __version__
from ztick_tw.model import HttpSpec
from ztick_tw.runners.base import (
    Execution,
    IRunner,
    Outcome,
    cancelled_outcome,
    effective_timeout,
    timeout_reason,
)
from ztick_tw.runners.http_client import (
    IDLE_CONNECTION_SECONDS,
    MAX_HEAD_BYTES,
    MAX_HEAD_LINE_BYTES,
    MAX_HEADER_LINES,
    MAX_INFORMATIONAL,
    ResponseHeadRefused,
    _BodyReader,
    _BytesProducer,
    _failure_reason,
    _Pool,
    _printable,
    load_trust_root,
)
from ztick_tw.runners.message import (
    JOB_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    NetworkOptions,
    http_body,
    redact_url,
    signature,
)

__all__ = [
    "MAX_HEADER_LINES",
    "MAX_HEAD_BYTES",
    "MAX_HEAD_LINE_BYTES",
    "MAX_INFORMATIONAL",
    "METHODS",
    "HttpRunner",
    "ResponseHeadRefused",
    "load_trust_root",
]

log = Logger()

#: The methods an ``http`` rule may use.
METHODS: Final = frozenset({"GET", "POST", "PUT", "DELETE"})

#: Why a run was ended when the runner was stopped (the daemon is shutting down).
SHUTDOWN_CAUSE = "stopped at shutdown"
#: What run() answers once stop() was called.
STOPPED_CAUSE = "runner stopped"


_USER_AGENT = f"ztick-tw/{__version__}".encode("ascii")
_JOB_ID_HEADER = JOB_ID_HEADER.encode("ascii")
_TIMESTAMP_HEADER = TIMESTAMP_HEADER.encode("ascii")
_SIGNATURE_HEADER = SIGNATURE_HEADER.encode("ascii")
_SAFE_URL_CHARS = "/%:@!$&'()*+,;=-._~?#[]"


class _Target:
    """A URL taken apart once: what goes on the wire, and how it is shown."""

    __slots__ = ("authorization", "error", "key", "redacted", "url")

    def __init__(
        self,
        url: bytes,
        key: tuple[str, str, int],
        authorization: bytes | None,
        redacted: str,
        error: str = "",
    ) -> None:
        self.url = url
        self.key = key
        self.authorization = authorization
        self.redacted = redacted
        self.error = error


@lru_cache(maxsize=1024)
def _target(url: str) -> _Target:
    """Parse ``url``: the request URL without user info, the pool key, the Basic auth."""
    redacted = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError as e:
        return _Target(b"", ("", "", 0), None, redacted, f"invalid url: {e}")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return _Target(b"", ("", "", 0), None, redacted, "url must be http:// or https://")
    if not host:
        return _Target(b"", ("", "", 0), None, redacted, "invalid url: no host")
    if port is None:
        port = 443 if scheme == "https" else 80
    try:
        wire_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        return _Target(b"", ("", "", 0), None, redacted, "invalid url: bad host name")
    netloc_host = f"[{wire_host}]" if ":" in wire_host else wire_host
    # An IPv6 literal always gets its port: Agent would misread "[::1]" alone.
    netloc = (
        netloc_host if parts.port is None and ":" not in wire_host else f"{netloc_host}:{port}"
    )
    path = quote(parts.path or "/", safe=_SAFE_URL_CHARS)
    query = "?" + quote(parts.query, safe=_SAFE_URL_CHARS) if parts.query else ""
    request_url = f"{scheme}://{netloc}{path}{query}".encode("ascii")
    authorization = None
    if parts.username is not None or parts.password is not None:
        userinfo = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        authorization = b"Basic " + base64.b64encode(userinfo.encode("utf-8"))
    return _Target(request_url, (scheme, wire_host.lower(), port), authorization, redacted)


@implementer(IAgentEndpointFactory)
class _Endpoints:
    """Endpoints per (scheme, host, port), made once: Agent asks for one per request."""

    def __init__(self, reactor: Any, policy: IPolicyForHTTPS) -> None:
        self.reactor = reactor
        self.policy = policy
        self.cache: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self.cache.get(key)
        if endpoint is None:
            if len(self.cache) >= 1024:
                self.cache.clear()
            host = uri.host.decode("ascii")
            if host.startswith("["):  # an IPv6 literal
                host = host[1:-1]
            tcp = HostnameEndpoint(self.reactor, host, uri.port)
            if uri.scheme == b"https":
                creator = self.policy.creatorForNetloc(host.encode("ascii"), uri.port)
                endpoint = wrapClientTLS(creator, tcp)
            else:
                endpoint = tcp
            self.cache[key] = endpoint
        return endpoint


class _Delivery:
    """One run of one job: waits for a connection, sends, reads the response."""

    __slots__ = (
        "body",
        "execution",
        "holds_slot",
        "method",
        "pending",
        "reader",
        "result",
        "runner",
        "status",
        "target",
        "timeout",
        "timer",
    )

    def __init__(
        self,
        runner: HttpRunner,
        execution: Execution,
        method: str,
        target: _Target,
        body: bytes | None,
    ) -> None:
        self.runner = runner
        self.execution = execution
        self.method = method
        self.target = target
        self.body = body
        self.result: Deferred[Outcome] | None = Deferred(self.cancel)
        self.timeout = 0.0
        self.timer: IDelayedCall | None = None
        self.pending: Deferred[Any] | None = None
        self.reader: _BodyReader | None = None
        self.status = 0
        self.holds_slot = False

    @property
    def done(self) -> bool:
        return self.result is None

    def describe(self, what: str) -> str:
        return f"http {self.method} {self.target.redacted}: {what}"

    # -- sending ---------------------------------------------------------------------

    def start(self) -> None:
        """Send the request (a connection slot is now held for this delivery)."""
        self.holds_slot = True
        runner = self.runner
        execution = self.execution
        headers = Headers()
        raw = headers.setRawHeaders
        raw(b"User-Agent", [_USER_AGENT])
        raw(_JOB_ID_HEADER, [execution.job_id.encode("utf-8")])
        if self.target.authorization is not None:
            raw(b"Authorization", [self.target.authorization])
        producer = None
        if self.body is not None:
            raw(b"Content-Type", [b"application/json"])
            producer = _BytesProducer(self.body)
        secret = runner.options.http_signing_secret
        if secret is not None:
            timestamp = int(runner.clock.seconds())
            raw(_TIMESTAMP_HEADER, [b"%d" % timestamp])
            sig = signature(secret, timestamp, execution.job_id, self.body)
            raw(_SIGNATURE_HEADER, [sig.encode("ascii")])
        try:
            d = runner.agent.request(
                self.method.encode("ascii"), self.target.url, headers, producer
            )
        except Exception as e:  # Agent refuses some URLs synchronously
            # Not str(e): it may quote the URL, query string included.
            self.finish(Outcome(False, self.describe(f"invalid url ({type(e).__name__})")))
            return
        self.pending = d
        d.addCallbacks(self.got_response, self.request_failed)

    def got_response(self, response: IResponse) -> None:
        self.pending = None
        if self.done:
            # Ended (timeout, stop) as the response came: drop the connection.
            response.deliverBody(_BodyReader(None, 0))  # type: ignore[no-untyped-call]
            return
        self.status = response.code
        options = self.runner.options
        reader = _BodyReader(self, options.http_max_response_bytes, options.output_limit_bytes)
        self.reader = reader
        response.deliverBody(reader)  # type: ignore[no-untyped-call]

    def request_failed(self, failure: Failure) -> None:
        self.pending = None
        if self.done:
            return
        self.finish(Outcome(False, self.describe(_failure_reason(failure))))

    def body_done(self, reader: _BodyReader, reason: Failure) -> None:
        self.reader = None
        if self.done:
            return
        if reader.cut_off:
            log.debug(
                "job {job_id}: {method} {url}: response body longer than {limit} bytes;"
                " connection closed",
                job_id=self.execution.job_id,
                method=self.method,
                url=self.target.redacted,
                limit=reader.limit,
            )
        elif not isinstance(reason.value, ResponseDone | PotentialDataLoss):
            log.debug(
                "job {job_id}: {method} {url}: response body cut short: {why}",
                job_id=self.execution.job_id,
                method=self.method,
                url=self.target.redacted,
                why=_failure_reason(reason),
            )
        self.finish(self.status_outcome(reader.prefix, self.output(reader)))

    def output(self, reader: _BodyReader | None) -> bytes:
        r"""``b"status N\n"`` and the body's tail so far; empty before the response."""
        if not self.status:
            return b""
        tail = reader.body_tail() if reader is not None else b""
        return b"status %d\n" % self.status + tail

    def status_outcome(self, prefix: bytes, output: bytes) -> Outcome:
        status = self.status
        if 200 <= status < 300:
            return Outcome(True, output=output)
        if 300 <= status < 400:
            what = f"status {status} (redirects are not followed)"
            return Outcome(False, self.describe(what), output=output)
        text = _printable(prefix)
        return Outcome(
            False,
            self.describe(f"status {status}: {text}" if text else f"status {status}"),
            output=output,
        )

    # -- ending ----------------------------------------------------------------------

    def end(self, outcome: Outcome) -> None:
        """End the delivery now with ``outcome`` (timeout or stop) and drop its work."""
        if self.done:
            return
        reader, pending = self.reader, self.pending
        self.finish(outcome)
        if reader is not None:
            reader.abort()
        if pending is not None:
            pending.cancel()

    def timed_out(self) -> None:
        self.timer = None
        what = timeout_reason(self.timeout)
        if self.status:
            what += f" (reading the body of a status {self.status} response)"
        self.end(
            Outcome(False, self.describe(what), output=self.output(self.reader), timed_out=True)
        )

    def cancel(self, result: Deferred[Outcome]) -> None:
        """The run's Deferred was cancelled: abort the request, or drop it if it waits."""
        self.end(cancelled_outcome(self.output(self.reader)))

    def finish(self, outcome: Outcome) -> None:
        result = self.result
        if result is None:
            return
        self.result = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not outcome.success:
            log.debug(
                "job {job_id}: webhook failed: {reason}",
                job_id=self.execution.job_id,
                reason=outcome.reason,
            )
        self.runner.ended(self)
        result.callback(outcome)


class _HostSlots:
    """The connections one endpoint may use at once, and the deliveries waiting."""

    __slots__ = ("free", "waiting")

    def __init__(self, free: int) -> None:
        self.free = free
        self.waiting: deque[_Delivery] = deque()


@implementer(IRunner)
class HttpRunner:
    """Runs ``http`` specs as webhooks over a shared, persistent connection pool."""

    def __init__(
        self,
        reactor: Any,
        options: NetworkOptions,
        *,
        max_connections_per_host: int = 32,
    ) -> None:
        """``reactor`` must provide IReactorTime, IReactorTCP and (for https) IReactorSSL.

        Raises ``ValueError`` when ``options.http_ca_file`` cannot be used.
        """
        self.reactor = reactor
        self.clock: IReactorTime = reactor
        self.options = options
        self.max_connections_per_host = max(1, max_connections_per_host)
        trust_root = load_trust_root(options.http_ca_file) if options.http_ca_file else None
        policy = BrowserLikePolicyForHTTPS(trust_root)  # type: ignore[no-untyped-call]
        self.pool = _Pool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self.pool.maxPersistentPerHost = self.max_connections_per_host
        self.pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
        endpoints = _Endpoints(reactor, policy)
        self.agent = Agent.usingEndpointFactory(reactor, endpoints, self.pool)  # type: ignore[no-untyped-call]
        self._live: set[_Delivery] = set()
        self._hosts: dict[tuple[str, str, int], _HostSlots] = {}
        self._stopping = False
        self._closed = False
        self._stop_waiters: list[Deferred[None]] = []
        self._grace: IDelayedCall | None = None

    @property
    def running(self) -> int:
        """Deliveries in flight (waiting for a connection included)."""
        return len(self._live)

    def connection_states(self) -> dict[str, int]:
        """Connections by state, for ``ztick_runner_connections``.

        ``busy``: a delivery holds a slot of its host; ``idle``: kept open in the pool.
        """
        busy = sum(self.max_connections_per_host - slots.free for slots in self._hosts.values())
        cached: dict[Any, list[Any]] = getattr(self.pool, "_connections", {})
        return {"busy": busy, "idle": sum(len(c) for c in cached.values())}

    def run(self, execution: Execution) -> Deferred[Outcome]:
        """Deliver the webhook of ``execution``; fires with its Outcome, never errbacks."""
        if self._stopping:
            return succeed(Outcome(False, STOPPED_CAUSE))
        spec = execution.spec
        if not isinstance(spec, HttpSpec):
            return succeed(Outcome(False, f"the http runner cannot run {spec.kind.wire} jobs"))
        method = spec.method.upper()
        target = _target(spec.url)
        if method not in METHODS:
            return succeed(
                Outcome(False, f"http {spec.method} {target.redacted}: unsupported method")
            )
        if target.error:
            return succeed(Outcome(False, f"http {method} {target.redacted}: {target.error}"))
        body = http_body(execution, method, self.options.message_format)
        delivery = _Delivery(self, execution, method, target, body)
        result = delivery.result
        assert result is not None
        self._live.add(delivery)
        timeout = effective_timeout(execution, self.options.timeout)
        if timeout > 0:
            delivery.timeout = timeout
            delivery.timer = self.clock.callLater(timeout, delivery.timed_out)
        slots = self._hosts.get(target.key)
        if slots is None:
            slots = self._hosts[target.key] = _HostSlots(self.max_connections_per_host)
        if slots.free > 0:
            slots.free -= 1
            delivery.start()
        else:
            slots.waiting.append(delivery)
        return result

    def stop(self, grace: float) -> Deferred[None]:
        """Refuse new runs; let deliveries finish for ``grace`` s, then cancel them.

        Cancelled deliveries fire ``Outcome(False, "stopped at shutdown",
        interrupted=True)``.  Then the pooled connections are closed; the Deferred
        fires when they are.
        """
        if self._closed:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        if self._stopping:
            return d
        self._stopping = True
        if not self._live:
            self._close_pool()
        else:
            self._grace = self.clock.callLater(max(0.0, grace), self._interrupt)
        return d

    # -- internals ---------------------------------------------------------------------

    def ended(self, delivery: _Delivery) -> None:
        """``delivery`` has its outcome: free its slot for the next waiting one."""
        self._live.discard(delivery)
        if delivery.holds_slot:
            delivery.holds_slot = False
            key = delivery.target.key
            self._release(key, self._hosts[key])
        # A delivery still waiting for a slot stays in the queue and is skipped there.
        if self._stopping and not self._live and self._grace is not None:
            self._grace.cancel()
            self._grace = None
            self._close_pool()

    def _release(self, key: tuple[str, str, int], slots: _HostSlots) -> None:
        while slots.waiting:
            nxt = slots.waiting.popleft()
            if not nxt.done:
                nxt.start()
                return
        slots.free += 1
        if slots.free >= self.max_connections_per_host:
            del self._hosts[key]

    def _interrupt(self) -> None:
        self._grace = None
        # Those still waiting for a connection first, so that none starts on a freed one.
        live = sorted(self._live, key=lambda delivery: delivery.holds_slot)
        for delivery in live:
            delivery.end(Outcome(False, SHUTDOWN_CAUSE, interrupted=True))
        self._close_pool()

    def _close_pool(self) -> None:
        def closed(_: object) -> None:
            self._closed = True
            waiters, self._stop_waiters = self._stop_waiters, []
            for waiter in waiters:
                waiter.callback(None)

        def failed(failure: Failure) -> None:
            log.failure("closing http connections", failure)
            closed(None)

        self.pool.closeCachedConnections().addCallbacks(closed, failed)  # type: ignore[no-untyped-call]
