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
import re
from collections import deque
from functools import lru_cache
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HEADER, STATUS, HTTP11ClientProtocol
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from ztick_tw import __version__
from ztick_tw.model import HttpSpec
from ztick_tw.runners import trust
from ztick_tw.runners.base import (
    Execution,
    IRunner,
    Outcome,
    cancelled_outcome,
    effective_timeout,
    timeout_reason,
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

#: How much of a failed response's body is quoted in the reason.
REASON_BODY_BYTES = 200

#: Bytes of a response head read at most: status lines and header lines, those of
#: informational (1xx) responses included.  Past it the connection is aborted.
MAX_HEAD_BYTES: Final = 65536
#: Header lines (continuation lines included) one response may have.
MAX_HEADER_LINES: Final = 100
#: Bytes of one status or header line, its line end not counted.  The same as Twisted's
#: own limit (``LineReceiver.MAX_LENGTH``), which closes with a misleading reason.
MAX_HEAD_LINE_BYTES: Final = 16384
#: Informational (1xx) responses accepted before the final one (Go's client allows 5).
MAX_INFORMATIONAL: Final = 5

_USER_AGENT = f"ztick-tw/{__version__}".encode("ascii")
_JOB_ID_HEADER = JOB_ID_HEADER.encode("ascii")
_TIMESTAMP_HEADER = TIMESTAMP_HEADER.encode("ascii")
_SIGNATURE_HEADER = SIGNATURE_HEADER.encode("ascii")
_NOT_PRINTABLE = re.compile(r"[^\x20-\x7e\u00a0-\U0010ffff]+")
_SAFE_URL_CHARS = "/%:@!$&'()*+,;=-._~?#[]"


def load_trust_root(ca_file: str) -> Any:
    """The trust root for https made of every certificate in the PEM file ``ca_file``.

    Raises ``ValueError`` (with the file name) when the file cannot be read or holds no
    PEM certificate, so a bad ``http_ca_file`` stops the daemon at start.
    """
    return trust.load_trust_root(ca_file, "http CA")


class ResponseHeadRefused(Exception):
    """A response head over one of the limits; ``received`` head bytes had been read."""

    def __init__(self, why: str, received: int) -> None:
        super().__init__(why)
        self.why = why
        self.received = received

    def __str__(self) -> str:
        return self.why


#: The states of Twisted's response parser while the response head is incomplete.
_HEAD_STATES: Final = frozenset({STATUS, HEADER})


class _BoundedClientProtocol(HTTP11ClientProtocol):
    """An HTTP/1.1 client connection that refuses an oversized response head.

    Twisted's response parser keeps every header line it is sent (it bounds one line, and
    then closes as if the server had), so a server that answers ``200 OK`` and then sends
    header lines forever grows the daemon without limit.  Here, while the head of the
    response is incomplete, received data is handed to the parser one line at a time and
    counted: the bytes of the head (:data:`MAX_HEAD_BYTES`), of one line
    (:data:`MAX_HEAD_LINE_BYTES`), the header lines (:data:`MAX_HEADER_LINES`) and the
    informational responses (:data:`MAX_INFORMATIONAL`).  Once the head is complete, the
    rest of the data goes to the parser in one piece, as before.  Over a limit, the
    connection is aborted (it never reaches the pool again) and the request fails with
    :class:`ResponseHeadRefused`.

    Private Twisted API, kept to this class: ``HTTP11ClientProtocol`` itself, its
    ``_parser`` and ``_disconnectParser``, and the parser's ``state``.
    """

    _head_bytes = 0
    _line_bytes = 0
    _header_lines = 0
    _informational = 0

    def request(self, request: Any) -> Deferred[IResponse]:
        self._head_bytes = self._line_bytes = 0
        self._header_lines = self._informational = 0
        return super().request(request)

    def dataReceived(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or parser.state not in _HEAD_STATES or self._whole_head(data):
            super().dataReceived(data)  # type: ignore[no-untyped-call]
            return
        start, size = 0, len(data)
        while start < size:
            end = data.find(b"\n", start) + 1
            ended = end > 0  # a whole line (the rest of one), or else the start of one
            if not ended:
                end = size
            state = parser.state
            self._head_bytes += end - start
            self._line_bytes += end - start
            why = self._over(state, self._line_bytes - ended)  # a line without its "\n"
            if why:
                self._refuse(why)
                return
            if ended:
                self._line_bytes = 0
            super().dataReceived(data if end - start == size else data[start:end])  # type: ignore[no-untyped-call]
            start = end
            if self._parser is not parser:
                # The response ended with its head, or the request failed: what follows
                # is dropped, as the parser drops it.
                return
            if parser.state not in _HEAD_STATES:  # the head is complete: the rest is body
                if start < size:
                    super().dataReceived(data[start:])  # type: ignore[no-untyped-call]
                return
            if not ended or state != HEADER:
                continue
            if parser.state == HEADER:
                self._header_lines += 1
                if self._header_lines > MAX_HEADER_LINES:
                    self._refuse(f"response has more than {MAX_HEADER_LINES} header lines")
                    return
            else:  # an empty line ended an informational response: a new head follows
                self._header_lines = 0
                self._informational += 1
                if self._informational > MAX_INFORMATIONAL:
                    self._refuse(f"more than {MAX_INFORMATIONAL} informational (1xx) responses")
                    return

    def _whole_head(self, data: bytes) -> bool:
        """True when ``data`` starts with a whole final response head within the limits.

        The common case, one read holding the whole head: it then goes to the parser in
        one piece, as without the limits, and costs one scan of the head.
        """
        if self._head_bytes or self._line_bytes:
            return False
        ends = [i for i in (data.find(b"\n\r\n"), data.find(b"\n\n")) if i >= 0]
        if not ends:
            return False
        end = min(ends)
        head_bytes = end + (3 if data[end + 1 : end + 2] == b"\r" else 2)
        if head_bytes > MAX_HEAD_BYTES:
            return False
        lines = data[:end].split(b"\n")
        if len(lines) - 1 > MAX_HEADER_LINES or max(map(len, lines)) > MAX_HEAD_LINE_BYTES:
            return False
        status = lines[0].split(b" ", 2)
        if len(status) < 2 or status[1].startswith(b"1"):  # informational: counted
            return False
        self._head_bytes = head_bytes
        return True

    def _over(self, state: str, line: int) -> str:
        """Why the head read so far is refused, or "" when it is within the limits."""
        if line > MAX_HEAD_LINE_BYTES:
            what = "status" if state == STATUS else "header"
            return f"response {what} line exceeded {MAX_HEAD_LINE_BYTES} bytes"
        if self._head_bytes > MAX_HEAD_BYTES:
            return f"response headers exceeded {MAX_HEAD_BYTES} bytes"
        return ""

    def _refuse(self, why: str) -> None:
        """Abort the connection and fail the request with ``why``."""
        log.debug(
            "response head refused: {why}; {received} bytes read, connection aborted",
            why=why,
            received=self._head_bytes,
        )
        # Let the parser know data came, so the request fails with ResponseFailed and
        # not ResponseNeverReceived, which the pool would retry on a new connection.
        parser: Any = self._parser
        parser.dataReceived(b"")
        transport: Any = self.transport
        transport.abortConnection()
        failure = Failure(ResponseHeadRefused(why, self._head_bytes))  # type: ignore[no-untyped-call]
        self._disconnectParser(failure)  # type: ignore[no-untyped-call]


class _QuietClientFactory(_HTTP11ClientFactory):
    """The pool's connection factory without "Starting factory" log lines per connection.

    Its connections bound the response head (:class:`_BoundedClientProtocol`).
    """

    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _BoundedClientProtocol(self._quiescentCallback)  # type: ignore[no-untyped-call]


#: Seconds an idle pooled connection is kept.  Below the 5 s keep-alive timeout of
#: Apache's default, so a connection the server is about to close is rarely reused.
IDLE_CONNECTION_SECONDS: Final = 4


class _Pool(HTTPConnectionPool):
    """A connection pool that keeps only connections the server will keep open too.

    Twisted's pool keeps a connection after an HTTP/1.0 response unless the server said
    ``Connection: close``; but an HTTP/1.0 server (Python's ``http.server`` among them)
    closes it anyway, and the next request on it fails with "connection closed before the
    response".  Such connections are closed here instead of being pooled.
    """

    _factory = _QuietClientFactory

    def _putConnection(self, key: Any, connection: Any) -> None:
        parser: Any = getattr(connection, "_parser", None)
        response = getattr(parser, "response", None)
        if parser is not None and response is not None and tuple(response.version[1:]) < (1, 1):
            tokens = b",".join(parser.connHeaders.getRawHeaders(b"connection", ())).lower()
            if b"keep-alive" not in tokens:
                connection.transport.loseConnection()
                return
        super()._putConnection(key, connection)  # type: ignore[no-untyped-call]


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


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body already in memory, written in one go."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _BodyReader(Protocol):
    """Reads a response body to its end, keeping a prefix and aborting past ``limit``.

    Without a ``delivery`` (nobody wants the response any more) it aborts at once.
    """

    def __init__(self, delivery: _Delivery | None, limit: int, tail_limit: int = 0) -> None:
        self.delivery = delivery
        self.limit = limit
        self.tail_limit = tail_limit
        self.received = 0
        self.prefix = b""
        self.tail = bytearray()
        self.cut_off = delivery is None
        self.finished = False

    def connectionMade(self) -> None:
        if self.delivery is None:
            self.abort()

    def dataReceived(self, data: bytes) -> None:
        if self.cut_off:
            return
        if len(self.prefix) < REASON_BODY_BYTES:
            self.prefix += data[: REASON_BODY_BYTES - len(self.prefix)]
        if self.tail_limit:
            tail = self.tail
            tail += data
            if len(tail) > 2 * self.tail_limit:
                del tail[: len(tail) - self.tail_limit]
        self.received += len(data)
        if self.received > self.limit:
            self.cut_off = True
            self.abort()

    def body_tail(self) -> bytes:
        """The last ``tail_limit`` bytes of the body read so far."""
        tail = self.tail
        return bytes(tail[len(tail) - self.tail_limit :] if len(tail) > self.tail_limit else tail)

    def abort(self) -> None:
        """Drop the connection under this response: it will not go back to the pool."""
        transport: Any = self.transport
        if transport is None:
            return
        # The body's transport is a proxy; abort the real connection when it can.
        real = getattr(transport, "_producer", None)
        abort = getattr(real, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished:
            return
        self.finished = True
        if self.delivery is not None:
            self.delivery.body_done(self, reason)


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


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _printable(data: bytes) -> str:
    """A response body prefix fit for a log line: one line of printable text."""
    text = data.decode("utf-8", errors="replace")
    return " ".join(_NOT_PRINTABLE.sub(" ", text).split())


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, SSL.Error):
        details = [
            str(part[-1])
            for part in (exc.args[0] if exc.args and isinstance(exc.args[0], list) else [])
            if isinstance(part, tuple) and part
        ]
        return "tls error: " + (", ".join(d for d in details if d) or _short(exc))
    return "tls error: certificate does not match the host name"


def _is_tls(exc: BaseException) -> bool:
    return isinstance(exc, SSL.Error | VerificationError)


def _failure_reason(failure: Failure) -> str:
    """A short reason for a failed request, looking inside Agent's wrapper errors."""
    exc: BaseException = failure.value if failure.value is not None else Exception("failed")
    inner: list[BaseException] = []
    reasons = getattr(exc, "reasons", None)
    if isinstance(reasons, list):
        inner = [r.value for r in reasons if isinstance(r, Failure) and r.value is not None]
    for candidate in inner:
        if isinstance(candidate, ResponseHeadRefused):
            return candidate.why
    for candidate in inner or [exc]:
        if _is_tls(candidate):
            return _tls_reason(candidate)
    for candidate in [*inner, exc]:
        if isinstance(candidate, net_error.ConnectionRefusedError):
            return "connection refused"
        if isinstance(candidate, net_error.DNSLookupError):
            return "dns lookup failed"
        if isinstance(candidate, net_error.NoRouteError):
            return "no route to host"
        if isinstance(candidate, net_error.TCPTimedOutError | net_error.TimeoutError):
            return "connect timed out"
        if isinstance(candidate, CancelledError):
            return "cancelled"
    for candidate in inner:
        if isinstance(candidate, net_error.ConnectionDone | net_error.ConnectionLost):
            return "connection closed before the response"
    if isinstance(exc, net_error.ConnectError):
        return f"connect failed: {_short(exc)}"
    if inner:
        return _short(inner[0])
    return _short(exc)
