"""The ztick line protocol over a byte stream: ``ZtickProtocol`` and ``ZtickFactory``.

The protocol turns request lines into calls on ``Operations`` (``ztick_tw.operations``,
which holds the namespace rules, the validation and STAT) and their results into answer
lines; it holds no job state.  What stays here is the wire: framing, the ``AUTH``
handshake, answers in order, long answers in slices and back-pressure.  Responses leave
in request order: an answer that waits for its write to reach the disk
(``fsync_on_persist``) holds back the answers after it on the same connection, never
those of other connections.

The instructions themselves (a word to one operation, its result to answer lines) are
``instructions.py`` (ztick's, and the ``AUTH`` line) and ``extension.py`` (SPEC §8-9);
what the connections share and the caps on them are ``factory.py``'s
``ZtickFactoryBase``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import ClassVar

from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from ztick_tw.auth import Token
from ztick_tw.operations import ANONYMOUS, Caller, Durable, OperationError, Operations
from ztick_tw.protocol import extension, instructions
from ztick_tw.protocol.factory import ZtickFactoryBase
from ztick_tw.protocol.query import QueryStream
from ztick_tw.protocol.tokenizer import TokenizeError, decode_line, tokenize

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_WAITING_ANSWERS",
    "MAX_WAITING_BYTES",
    "OUTPUT_BUDGET",
    "STREAM_SLICE",
    "Handler",
    "ZtickFactory",
    "ZtickProtocol",
]

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

Handler = Callable[["ZtickProtocol", str, list[str]], None]


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
            instructions.authenticate(self, self.factory.tokens, line)
            return
        try:
            tokens = tokenize(decode_line(line))
        except TokenizeError as e:
            instructions.malformed(self, e)
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
            instructions.refused(self, tokens, e)

    def _authenticated_as(self, token: Token) -> None:
        """``AUTH`` succeeded: act as ``token``; leave the unauthenticated caps and timer."""
        self._authenticated = True
        self._caller = Caller(token)
        self.factory.admission.discard(self)
        if self._auth_call is not None and self._auth_call.active():
            self._auth_call.cancel()
        self._auth_call = None

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


ZtickProtocol.handlers = {**instructions.HANDLERS, **extension.HANDLERS}


class ZtickFactory(ZtickFactoryBase[ZtickProtocol]):
    """Builds ``ZtickProtocol``s that share one ``Operations``; counts their connections.

    Everything but the protocol class is ``ZtickFactoryBase``'s (``protocol/factory.py``):
    ``operations`` is the set every transport shares (``make_service`` builds it);
    without one, the factory builds its own from ``scheduler`` and the STAT arguments
    (``persistence``, ``framerate``, ``compression``, ``tls_enabled``; auth is on when
    there are ``tokens``), which are otherwise unused.
    """

    protocol = ZtickProtocol  # type: ignore[assignment]
