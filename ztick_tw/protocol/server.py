"""The ztick line protocol over a byte stream: ``ZtickProtocol`` and ``ZtickFactory``.

The protocol turns request lines into calls on ``Operations`` (``ztick_tw.operations``,
which holds the namespace rules, the validation and STAT) and their results into answer
lines; it holds no job state.  What stays here is the wire: framing, the ``AUTH``
handshake, answers in order, long answers in slices and back-pressure.  Responses leave
in request order: an answer that waits for its write to reach the disk
(``fsync_on_persist``) holds back the answers after it on the same connection, never
those of other connections.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import ClassVar

from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from ztick_tw.auth import TokenStore
from ztick_tw.logs import Tally
from ztick_tw.operations import (
    ANONYMOUS,
    Caller,
    Durable,
    Invalid,
    NotFound,
    OperationError,
    Operations,
    Unavailable,
)
from ztick_tw.protocol import extension
from ztick_tw.protocol.admission import Admission
from ztick_tw.protocol.query import QueryStream
from ztick_tw.protocol.tokenizer import TokenizeError, decode_line, tokenize
from ztick_tw.scheduler.core import Scheduler

#: The longest line accepted, not counting its ``\n``; a longer one closes the connection.
MAX_LINE_BYTES = 4096

#: Answers one connection may have queued behind writes not yet on disk before we stop
#: reading its requests (a client pipelining into a stalled disk cannot grow memory).
MAX_WAITING_ANSWERS = 10_000
MAX_WAITING_BYTES = 4 * 1024 * 1024

#: Bytes of answers one connection may queue from one chunk of requests before the rest
#: of the chunk waits for the client to read them.
OUTPUT_BUDGET = 256 * 1024

#: Bytes of a long answer (``QUERY``) produced per slice; the next slice waits for the
#: client to take this one, and for the next reactor turn.
STREAM_SLICE = 64 * 1024

# Why reading from a client is paused (any one of them is enough).
_WRITE_FULL = "write buffer full"
_BACKLOG = "answers not yet read by the client"
_DISK_WAIT = "answers waiting for the disk"
_STREAM = "a long answer is being sent"

#: How often, at most, "connection limit reached" is logged (with a count meanwhile).
REFUSED_LOG_INTERVAL = 10.0

Handler = Callable[["ZtickProtocol", str, list[str]], None]

log = Logger(namespace="ztick_tw.protocol")


@implementer(IHalfCloseableProtocol, IPushProducer)
class ZtickProtocol(LineReceiver):
    """One client connection speaking the ztick line protocol."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE_BYTES
    log = Logger()
    factory: ZtickFactory
    handlers: ClassVar[dict[str, Handler]]
    _ops: Operations  # the factory's, taken in connectionMade

    def __init__(self) -> None:
        self._out: list[bytes] = []
        self._waiting: deque[tuple[Durable | None, bytes, bytes]] = deque()
        self._subscribed: Durable | None = None
        self._in_data = False
        self._closing = False
        self._connected = False
        self._peer = "?"
        self._authenticated = False  # AUTH succeeded (auth on)
        self._caller: Caller = ANONYMOUS  # who is asking: AUTH's token, or anonymous
        self._auth_call: IDelayedCall | None = None
        self._idle_call: IDelayedCall | None = None
        self._pauses: set[str] = set()  # why reading is paused (back-pressure)
        self._backlog = False  # lines left in the buffer by the output budget
        self._backlog_call: IDelayedCall | None = None
        self._out_bytes = 0  # bytes in _out
        self._waiting_bytes = 0  # bytes of answers in _waiting
        self._stream: QueryStream | None = None  # a long answer being sent in slices
        self._stream_call: IDelayedCall | None = None
        self._eof = False  # the client half-closed: finish what it sent, then close

    # -- connection life cycle -------------------------------------------------------

    def connectionMade(self) -> None:
        """Count the connection, or close it at once when the limit is reached."""
        factory = self.factory
        self._ops = factory.operations
        peer = self.transport.getPeer() if self.transport is not None else None
        self._peer = str(getattr(peer, "host", peer))
        if factory.connections >= factory.max_connections and not factory.make_room():
            factory.refused(self._peer)
            self._closing = True
            if self.transport is not None:
                self.transport.loseConnection()
            return
        self._connected = True
        factory.connections += 1
        clock = factory.reactor
        if factory.tokens is not None:
            self._auth_call = clock.callLater(factory.auth_timeout, self._authTimedOut)
            factory.admit(self)
        if factory.idle_timeout > 0:
            self._idle_call = clock.callLater(factory.idle_timeout, self._idleTimedOut)
        if self.transport is not None:
            # The transport tells us when its write buffer is full (a client that does
            # not read its answers): we then stop reading from it until it drains.
            self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.log.debug("client connected from {peer}", peer=self._peer)

    def connectionLost(self, reason: Failure | None = None) -> None:
        """Forget the connection; answers still waiting for the disk are dropped."""
        self._forget()
        self._waiting.clear()
        self._waiting_bytes = 0
        self._out.clear()
        self._out_bytes = 0

    def _forget(self) -> None:
        """Release what the connection holds: timers, its slot, a long answer."""
        for call in (self._auth_call, self._idle_call, self._backlog_call, self._stream_call):
            if call is not None and call.active():
                call.cancel()
        self._auth_call = self._idle_call = self._backlog_call = self._stream_call = None
        self._stream = None
        self.factory.admission.discard(self)
        if self._connected:
            self._connected = False
            self.factory.connections -= 1
            self.log.debug("client {peer} disconnected", peer=self._peer)

    def evict(self) -> None:
        """Drop this unauthenticated connection now, to make room for newer ones."""
        self._closing = True
        self._forget()
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def _authTimedOut(self) -> None:
        self._auth_call = None
        self.log.info(
            "client {peer} sent no AUTH within {seconds:g}s; closing",
            peer=self._peer,
            seconds=self.factory.auth_timeout,
        )
        self._close()

    def _idleTimedOut(self) -> None:
        self._idle_call = None
        self.log.info(
            "client {peer} sent nothing for {seconds:g}s; closing the idle connection",
            peer=self._peer,
            seconds=self.factory.idle_timeout,
        )
        self._close()

    def _close(self) -> None:
        """Stop reading, send what is ready, then close (after waiting answers)."""
        self._closing = True
        self._stream = None
        self._flush()

    # -- back-pressure (IPushProducer, called by our transport) ------------------------

    def pauseProducing(self) -> None:
        """The client is not reading its answers: stop reading its requests."""
        self._pause(_WRITE_FULL)

    def resumeProducing(self) -> None:
        """The client caught up: go on with a long answer, or read again."""
        self._resume(_WRITE_FULL)
        if self._stream is not None:
            self._schedule_stream()
        else:
            self._drain_backlog()

    def stopProducing(self) -> None:
        """The connection is going away; nothing to do."""

    def _pause(self, why: str) -> None:
        if not self._pauses and IPushProducer.providedBy(self.transport):
            self.transport.pauseProducing()
        self._pauses.add(why)

    def _resume(self, why: str) -> None:
        if why not in self._pauses:
            return
        self._pauses.discard(why)
        if not self._pauses and not self._closing and IPushProducer.providedBy(self.transport):
            self.transport.resumeProducing()

    def readConnectionLost(self) -> None:
        """The client half-closed: answer every whole line it sent, then close.

        An unterminated last line is never run, whether the client half-closed or
        vanished (a crash also sends FIN): it may be a request cut short, such as a
        SET whose timestamp lost its last digits.  It is dropped and logged.
        """
        self._eof = True
        head, newline, tail = self._buffer.rpartition(b"\n")
        self._buffer = head + newline
        if tail and not self._closing:
            self.log.info(
                "client {peer} closed the connection in the middle of a line;"
                " dropped the unterminated last line ({size} bytes) without running it",
                peer=self._peer,
                size=len(tail),
            )
        if self._buffer and not self._closing and self._stream is None:
            self._backlog = True
            self._drain_backlog()
        self._flush()

    def writeConnectionLost(self) -> None:
        """The client stopped reading; nothing more can be answered."""
        self._closing = True
        if self.transport is not None:
            self.transport.loseConnection()

    # -- bytes in ----------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        """Split ``data`` into lines (in one pass, whatever the chunk size) and handle them.

        Handling stops once about ``OUTPUT_BUDGET`` bytes of answers are queued: the rest
        of the lines wait in the buffer, reading pauses until the client has taken the
        answers (``resumeProducing``), then handling goes on.  So a client that pipelines
        big answers (``QUERY`` over many jobs) and never reads them costs bounded memory.
        """
        if self._closing:
            return
        if self._idle_call is not None and data:
            self._idle_call.reset(self.factory.idle_timeout)
        if self._stream is not None:
            # Reading is paused while a long answer is sent; keep what was in flight.
            self._buffer += data
            self._backlog = True
            return
        buffered = self._buffer
        lines = (buffered + data if buffered else data).split(b"\n")
        self._buffer = lines.pop()
        self._in_data = True
        try:
            limit = self.MAX_LENGTH
            for index, line in enumerate(lines):
                if len(line) > limit:
                    self.lineLengthExceeded(line)
                    break
                self.lineReceived(line)
                if self._closing:
                    break
                streaming = self._stream is not None
                if streaming or self._out_bytes + self._waiting_bytes > OUTPUT_BUDGET:
                    rest = lines[index + 1 :]
                    if rest:
                        rest.append(self._buffer)
                        self._buffer = b"\n".join(rest)
                    if streaming:
                        # The next lines wait for the long answer to be sent whole.
                        self._backlog = bool(rest) or self._backlog
                        self._pause(_STREAM)
                    elif rest:
                        self._hold_backlog()
                    break
            else:
                self._backlog = False
                if len(self._buffer) > limit:
                    self.lineLengthExceeded(self._buffer)
        finally:
            self._in_data = False
            self._flush()

    def _hold_backlog(self) -> None:
        """Keep the buffered lines for later: when the client has read (or next turn)."""
        self._backlog = True
        self._pause(_BACKLOG)
        if self._backlog_call is None:
            # If the transport does not ask us to wait (its buffer is not full), go on at
            # the next reactor turn, after the other clients had theirs.
            self._backlog_call = self.factory.reactor.callLater(0, self._backlog_turn)

    def _backlog_turn(self) -> None:
        self._backlog_call = None
        if _WRITE_FULL not in self._pauses:
            self._drain_backlog()

    def _drain_backlog(self) -> None:
        """Handle lines held back by the output budget, now that the client caught up."""
        if self._backlog and not self._closing and self._connected and self._stream is None:
            self._backlog = False
            self._resume(_BACKLOG)
            self.dataReceived(b"")

    # -- long answers, in slices ---------------------------------------------------------

    def _schedule_stream(self) -> None:
        if self._stream_call is None and self._stream is not None:
            self._stream_call = self.factory.reactor.callLater(0, self._stream_step)

    def _stream_step(self) -> None:
        """Send the next slice of the long answer, if the client has taken the last one.

        One slice per reactor turn, so timers and other clients run in between; none
        while the client's write buffer is full (``resumeProducing`` goes on) or while
        earlier answers wait for the disk (``_commitResolved`` goes on).
        """
        self._stream_call = None
        stream = self._stream
        if stream is None or not self._connected or self._closing:
            return
        if self._waiting or _WRITE_FULL in self._pauses:
            return
        data = stream.next_slice(STREAM_SLICE)
        self._out.append(data)
        self._out_bytes += len(data)
        if self._idle_call is not None:
            self._idle_call.reset(self.factory.idle_timeout)  # reading answers is not idle
        if stream.done:
            self._stream = None
            self._resume(_STREAM)
            if not self._in_data:
                self._flush()
                self._drain_backlog()
            return
        if not self._in_data:
            self._flush()
        if _WRITE_FULL not in self._pauses:
            self._schedule_stream()

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line over 4096 bytes: answer what came before it, then close this connection."""
        self.log.warn(
            "client {peer} sent a line longer than {limit} bytes; closing its connection",
            peer=self._peer,
            limit=self.MAX_LENGTH,
        )
        self._buffer = b""
        self._closing = True
        if IPushProducer.providedBy(self.transport):
            self.transport.pauseProducing()

    def lineReceived(self, line: bytes) -> None:
        """Handle one request line."""
        if not self._authenticated and self.factory.tokens is not None:
            self._authenticate(line)
            return
        try:
            tokens = tokenize(decode_line(line))
        except TokenizeError as e:
            tokens = e.tokens
            if len(tokens) >= 2 and tokens[1] in self.handlers:
                self.log.info(
                    "request {request_id} from {peer}: {reason}",
                    request_id=_for_log(tokens[0]),
                    peer=self._peer,
                    reason=e.reason,
                )
                self._error(tokens[0])
            else:
                self.log.debug(
                    "ignored malformed line from {peer}: {reason}",
                    peer=self._peer,
                    reason=e.reason,
                )
            return
        if len(tokens) < 2:
            return
        handler = self.handlers.get(tokens[1])
        if handler is None:
            # The unknown word is not logged: in "AUTH <secret>" (auth off) it is a secret.
            self.log.debug(
                "ignored a line with an unknown instruction ({size} bytes) from {peer}",
                size=len(tokens[1]),
                peer=self._peer,
            )
            return
        try:
            handler(self, tokens[0], tokens)
        except OperationError as e:
            self._refused(tokens, e)
            reasoned = tokens[1] in extension.HANDLERS or tokens[1:3] == ["RULE", "POLICY"]
            if reasoned:  # SPEC §8-9 instructions say why; ztick's answer a bare ERROR
                self._reply(f"{tokens[0]} ERROR {extension.reason_text(str(e))}\n".encode())
            else:
                self._error(tokens[0])

    def _refused(self, tokens: list[str], e: OperationError) -> None:
        """Log why a request was refused: an error when the disk refused a change."""
        if isinstance(e, Unavailable):
            self.log.error(
                "request {request_id} {instruction} from {peer}: cannot persist: {error}",
                request_id=_for_log(tokens[0]),
                instruction=_for_log(tokens[1]),
                peer=self._peer,
                error=str(e),
            )
            return
        emit = self.log.debug if isinstance(e, NotFound) else self.log.info
        emit(
            "request {request_id} {instruction} from {peer} refused: {reason}",
            request_id=_for_log(tokens[0]),
            instruction=_for_log(tokens[1]),
            peer=self._peer,
            reason=str(e),
        )

    def _authenticate(self, line: bytes) -> None:
        """The first line with auth on: ``AUTH <secret>`` gets ``OK``; anything else closes."""
        tokens = self.factory.tokens
        assert tokens is not None
        try:
            words = tokenize(decode_line(line))
        except TokenizeError as e:
            words = e.tokens
        if not words:
            return  # blank lines before AUTH are ignored
        if len(words) >= 2 and words[0] == "AUTH":
            token = tokens.authenticate(words[1])
            if token is not None:
                self._authenticated = True
                self._caller = Caller(token)
                self.factory.admission.discard(self)
                if self._auth_call is not None and self._auth_call.active():
                    self._auth_call.cancel()
                self._auth_call = None
                self.log.info(
                    "client {peer} authenticated as token {token} (namespace {namespace})",
                    peer=self._peer,
                    token=token.name,
                    namespace=token.namespace,
                )
                self._reply(b"OK\n")
                return
            self.log.warn("client {peer} failed to authenticate; closing", peer=self._peer)
        else:
            self.log.info("client {peer} sent a request before AUTH; closing", peer=self._peer)
        self._reply(b"ERROR\n")
        self._close()

    # -- bytes out ---------------------------------------------------------------------

    def _reply(self, data: bytes, commit: Durable | None = None, error: bytes = b"") -> None:
        """Queue ``data`` after every earlier answer; if ``commit`` fails, send ``error``.

        ``commit`` is the durability handle an operation returned for a change.
        """
        if self._waiting or (commit is not None and not commit.done):
            self._waiting.append((commit, data, error))
            self._waiting_bytes += len(data)
            if (
                len(self._waiting) >= MAX_WAITING_ANSWERS
                or self._waiting_bytes >= MAX_WAITING_BYTES
            ):
                self._pause(_DISK_WAIT)
            if commit is not None and not commit.done and commit is not self._subscribed:
                self._subscribed = commit
                commit.subscribe(self._commitResolved)
        elif commit is not None and commit.error is not None:
            self._out.append(error)
            self._out_bytes += len(error)
        elif isinstance(commit, extension.Later):
            self._out.append(commit.answer)
            self._out_bytes += len(commit.answer)
        else:
            self._out.append(data)
            self._out_bytes += len(data)
        if not self._in_data:
            self._flush()

    def _error(self, request_id: str) -> None:
        self._reply(f"{request_id} ERROR\n".encode())

    def _ok(self, request_id: str, commit: Durable | None) -> None:
        """``ID OK`` once ``commit`` is on disk (``ID ERROR`` if it fails to get there)."""
        self._reply(f"{request_id} OK\n".encode(), commit, f"{request_id} ERROR\n".encode())

    def answer_ok(self, request_id: str, commit: Durable | None, extra: str = "") -> None:
        """``ID OK<extra>`` once ``commit`` is on disk, else ``ID ERROR <why>`` (SPEC §8-9)."""
        self._reply(
            f"{request_id} OK{extra}\n".encode(),
            commit,
            f"{request_id} ERROR cannot persist the change\n".encode(),
        )

    def answer_later(self, later: extension.Later) -> None:
        """Queue an answer whose bytes come when ``later`` resolves, in request order."""
        self._reply(later.answer, later)

    def _commitResolved(self, commit: Durable) -> None:
        waiting = self._waiting
        out = self._out
        while waiting:
            pending, data, error = waiting[0]
            if pending is not None and not pending.done:
                break
            waiting.popleft()
            self._waiting_bytes -= len(data)
            if isinstance(pending, extension.Later):
                answer = pending.answer
            else:
                answer = error if pending is not None and pending.error is not None else data
            out.append(answer)
            self._out_bytes += len(answer)
        if self._subscribed is commit:
            self._subscribed = None
        if self._stream is not None and not waiting:
            self._schedule_stream()
        if (
            len(waiting) < MAX_WAITING_ANSWERS // 2
            and self._waiting_bytes < MAX_WAITING_BYTES // 2
        ):
            self._resume(_DISK_WAIT)
        if waiting:
            # The loop stopped at an answer whose commit is still pending: wait for it.
            head = waiting[0][0]
            assert head is not None
            if head is not self._subscribed:
                self._subscribed = head
                head.subscribe(self._commitResolved)
        if not self._in_data:
            self._flush()

    def _flush(self) -> None:
        if not self._connected or self.transport is None:
            self._out.clear()
            self._out_bytes = 0
            return
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self._out_bytes = 0
            self.transport.write(data)
        finished = self._eof and not self._backlog and self._stream is None
        if (self._closing or finished) and not self._waiting:
            # A producer still registered would be resumed (not closed) when the write
            # buffer drains, leaving the connection open for good.
            if getattr(self.transport, "producer", None) is self:
                self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.loseConnection()

    # -- instructions: words to operations, results to answer lines -------------------

    def do_SET(self, request_id: str, tokens: list[str]) -> None:
        """``ID SET <job> <ns>`` or ``ID SET <job> <YYYY-MM-DD> <HH:MM:SS>``."""
        if len(tokens) < 4:
            raise Invalid("SET needs a job identifier and a time")
        self._ok(request_id, self._ops.set_job(self._caller, tokens[2], tokens[3:]))

    def do_GET(self, request_id: str, tokens: list[str]) -> None:
        """``ID GET <job>`` answers ``ID OK <status> <ns>``."""
        if len(tokens) < 3:
            raise Invalid("GET needs a job identifier")
        status, execution_ns = self._ops.get_job(self._caller, tokens[2])
        self._reply(f"{request_id} OK {status.wire} {execution_ns}\n".encode())

    def do_QUERY(self, request_id: str, tokens: list[str]) -> None:
        """``ID QUERY [<prefix>]``: one line per matching job, then ``ID OK``."""
        query = self._ops.query(self._caller, tokens[2] if len(tokens) > 2 else "")
        self._stream = QueryStream(query.scan, request_id, query.prefix)
        self._stream_step()

    def do_REMOVE(self, request_id: str, tokens: list[str]) -> None:
        """``ID REMOVE <job>``."""
        if len(tokens) < 3:
            raise Invalid("REMOVE needs a job identifier")
        self._ok(request_id, self._ops.remove_job(self._caller, tokens[2]))

    def do_RULE(self, request_id: str, tokens: list[str]) -> None:
        """``ID RULE SET <rule> <pattern> <runner> <args...>`` (and ``RULE POLICY``)."""
        if len(tokens) >= 3 and tokens[2] == "POLICY":
            extension.rule_policy(self, request_id, tokens)
            return
        if len(tokens) < 3 or tokens[2] != "SET":
            return  # "RULE" without "SET" is not an instruction: no answer, as ztick
        if len(tokens) < 6:
            raise Invalid("RULE SET needs a rule id, a pattern and a runner")
        commit = self._ops.set_rule(self._caller, tokens[3], tokens[4], tokens[5], tokens[6:])
        self._ok(request_id, commit)

    def do_REMOVERULE(self, request_id: str, tokens: list[str]) -> None:
        """``ID REMOVERULE <rule>``."""
        if len(tokens) < 3:
            raise Invalid("REMOVERULE needs a rule id")
        self._ok(request_id, self._ops.remove_rule(self._caller, tokens[2]))

    def do_LISTRULES(self, request_id: str, tokens: list[str]) -> None:
        """``ID LISTRULES``: one line per rule, rendered as ztick does, then ``ID OK``."""
        lines = []
        for rule in self._ops.list_rules(self._caller):
            words = " ".join((rule.id, rule.pattern, rule.runner.kind.wire, *rule.runner.args()))
            lines.append(f"{request_id} {words}\n")
        lines.append(f"{request_id} OK\n")
        self._reply("".join(lines).encode())

    def do_STAT(self, request_id: str, tokens: list[str]) -> None:
        """``ID STAT``: one ``ID <key> <value>`` line per metric, then ``ID OK``."""
        lines = [f"{request_id} {key} {value}\n" for key, value in self._ops.stat(self._caller)]
        lines.append(f"{request_id} OK\n")
        self._reply("".join(lines).encode())


ZtickProtocol.handlers = {
    "SET": ZtickProtocol.do_SET,
    "GET": ZtickProtocol.do_GET,
    "QUERY": ZtickProtocol.do_QUERY,
    "REMOVE": ZtickProtocol.do_REMOVE,
    "RULE": ZtickProtocol.do_RULE,
    "REMOVERULE": ZtickProtocol.do_REMOVERULE,
    "LISTRULES": ZtickProtocol.do_LISTRULES,
    "STAT": ZtickProtocol.do_STAT,
    **extension.HANDLERS,
}


def _for_log(text: str, limit: int = 80) -> str:
    """Client-chosen text made safe for a log line: control characters escaped, bounded."""
    shown = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + "..."


class ZtickFactory(Factory):
    """Builds ``ZtickProtocol``s that share one ``Operations``; counts their connections.

    ``operations`` is the set every transport shares (``make_service`` builds it);
    without one, the factory builds its own from ``scheduler`` and the STAT arguments
    (``persistence``, ``framerate``, ``compression``, ``tls_enabled``; auth is on when
    there are ``tokens``), which are otherwise unused.
    """

    protocol = ZtickProtocol  # type: ignore[assignment]
    noisy = False  # no "Starting factory" lines; the service logs where it listens

    def __init__(
        self,
        scheduler: Scheduler,
        reactor: IReactorTime,
        *,
        persistence: str = "memory",
        framerate: int = 512,
        compression: Callable[[], str] = lambda: "idle",
        tokens: TokenStore | None = None,
        tls_enabled: bool = False,
        max_connections: int = 4096,
        idle_timeout: float = 0.0,
        auth_timeout: float = 5.0,
        max_unauthenticated: int = 256,
        max_unauthenticated_per_source: int = 32,
        operations: Operations | None = None,
    ) -> None:
        if operations is None:
            operations = Operations(
                scheduler,
                reactor,
                persistence=persistence,
                framerate=framerate,
                compression=compression,
                auth_enabled=lambda: self.tokens is not None,
                tls_enabled=tls_enabled,
            )
        self.operations = operations
        self.scheduler = scheduler
        self.reactor = reactor
        self.tokens = tokens
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.auth_timeout = auth_timeout
        self.connections = 0
        operations.count_connections(lambda: self.connections)
        self.admission: Admission[ZtickProtocol] = Admission(
            max_unauthenticated, max_unauthenticated_per_source
        )
        self._refused = Tally(reactor, REFUSED_LOG_INTERVAL)
        self._evicted = Tally(reactor, REFUSED_LOG_INTERVAL)

    @property
    def auth_enabled(self) -> bool:
        """Whether clients must AUTH first (an auth file is configured)."""
        return self.tokens is not None

    def refused(self, peer: str) -> None:
        """Note a connection closed at the limit; log it at most every 10 s, with a count."""
        count = self._refused.note()
        if count:
            log.warn(
                "connection limit reached ({limit} connections): refused {count} connection(s)"
                " since the last report, the latest from {peer}",
                limit=self.max_connections,
                count=count,
                peer=peer,
            )

    def admit(self, conn: ZtickProtocol) -> None:
        """A new connection must AUTH first: hold it within the unauthenticated caps."""
        for victim in self.admission.add(conn, conn._peer):
            self._evict(victim)

    def make_room(self) -> bool:
        """At ``max_connections``: drop an unauthenticated connection, if any.

        (The oldest of the address holding the most.)  So sockets that never
        authenticate cannot keep a valid client out.
        """
        victim = self.admission.victim()
        if victim is None:
            return False
        self.admission.discard(victim)
        self._evict(victim)
        return True

    def _evict(self, victim: ZtickProtocol) -> None:
        victim.evict()
        count = self._evicted.note()
        if count:
            log.warn(
                "too many connections waiting to authenticate (at most {limit}, {per_source}"
                " per address): dropped the oldest {count} since the last report, the latest"
                " from {peer}",
                limit=self.admission.max_total,
                per_source=self.admission.max_per_source,
                count=count,
                peer=victim._peer,
            )

    def stats(self) -> list[tuple[str, str | int]]:
        """The STAT lines (``Operations.stat``), ztick's keys first, then ztick-tw's."""
        return self.operations.stat(ANONYMOUS)
