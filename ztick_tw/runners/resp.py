"""RESP2, the Redis wire protocol: commands out, replies in, and ``redis://`` URLs.

Self-contained (no third-party redis library): :func:`encode_command`,
:class:`RespParser` (incremental, bounded by what the caller feeds it),
:class:`RedisClientProtocol` (a small pipelined client: :meth:`execute`),
:func:`parse_redis_url` and :func:`render_reply` (a reply as a run's output).  The
``redis`` runner (``ztick_tw/runners/redis.py``) is built on these.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

__all__ = [
    "DEFAULT_PORT",
    "RedisClientProtocol",
    "RedisEndpoint",
    "RedisError",
    "Reply",
    "RespParser",
    "RespProtocolError",
    "abort_transport",
    "encode_command",
    "parse_redis_url",
    "render_reply",
]

#: The port of a ``redis://`` URL that names none.
DEFAULT_PORT = 6379


class RedisError(Exception):
    """An error reply (``-ERR ...``, ``-WRONGTYPE ...``): a value in the reply stream."""

    @property
    def message(self) -> str:
        """The server's text, e.g. ``WRONGTYPE Operation against a key ...``."""
        return str(self.args[0]) if self.args else ""


class RespProtocolError(Exception):
    """The peer sent bytes that are not RESP2: the connection cannot be trusted."""


#: A decoded reply: simple string ``str``, bulk ``bytes``, integer ``int``, null bulk or
#: null array ``None``, array ``list``, error reply :class:`RedisError` (not raised).
Reply = str | bytes | int | None | list["Reply"] | RedisError


def encode_command(*args: bytes) -> bytes:
    """``args`` as a RESP array of bulk strings (the request format of every command)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class RespParser:
    """An incremental RESP2 reply parser: feed it bytes as they come, get whole replies.

    Data may be split anywhere (inside a line, a bulk string, a nested array); what is
    incomplete is kept for the next :meth:`feed`.  Malformed input raises
    :class:`RespProtocolError` and leaves the parser unusable.
    """

    def __init__(self, max_bulk: int = 512 * 1024 * 1024, max_line: int = 64 * 1024) -> None:
        self.max_bulk = max_bulk
        self.max_line = max_line
        self._buf = bytearray()
        # Arrays being filled, innermost last: [items so far, expected count].
        self._stack: list[tuple[list[Reply], int]] = []

    @property
    def pending(self) -> int:
        """Bytes received but not yet part of a whole reply (excluding array headers)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Reply]:
        """Add ``data``; return the replies it completes, in order."""
        buf = self._buf
        buf += data
        size = len(buf)
        stack = self._stack
        out: list[Reply] = []
        pos = 0
        value: Reply
        while pos < size:
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if size - pos > self.max_line:
                    raise RespProtocolError(f"reply line longer than {self.max_line} bytes")
                break
            if end - pos > self.max_line:
                raise RespProtocolError(f"reply line longer than {self.max_line} bytes")
            kind = buf[pos]
            if kind == 0x2B:  # "+" simple string
                value = buf[pos + 1 : end].decode("utf-8", "replace")
                pos = end + 2
            elif kind == 0x3A:  # ":" integer
                value = _integer(buf, pos + 1, end)
                pos = end + 2
            elif kind == 0x24:  # "$" bulk string
                length = _integer(buf, pos + 1, end)
                if length == -1:
                    value = None
                    pos = end + 2
                else:
                    if length < 0 or length > self.max_bulk:
                        raise RespProtocolError(f"bad bulk string length {length}")
                    start = end + 2
                    stop = start + length
                    if stop + 2 > size:
                        break  # incomplete: parse this element again with more data
                    if buf[stop : stop + 2] != b"\r\n":
                        raise RespProtocolError("bulk string not followed by CRLF")
                    value = bytes(buf[start:stop])
                    pos = stop + 2
            elif kind == 0x2A:  # "*" array
                count = _integer(buf, pos + 1, end)
                pos = end + 2
                if count == -1:
                    value = None
                elif count == 0:
                    value = []
                elif count < 0:
                    raise RespProtocolError(f"bad array length {count}")
                else:
                    stack.append(([], count))
                    continue
            elif kind == 0x2D:  # "-" error
                value = RedisError(buf[pos + 1 : end].decode("utf-8", "replace"))
                pos = end + 2
            else:
                raise RespProtocolError(f"unexpected reply type byte {bytes([kind])!r}")
            # Put the value into the array it belongs to; close arrays that are full.
            while stack:
                items, count = stack[-1]
                items.append(value)
                if len(items) < count:
                    break
                stack.pop()
                value = items
            else:
                out.append(value)
        if pos:
            del buf[:pos]
        return out


def _integer(buf: bytearray, start: int, end: int) -> int:
    text = bytes(buf[start:end])
    digits = text[1:] if text[:1] == b"-" else text
    if not digits.isdigit():
        raise RespProtocolError(f"bad integer {text[:40]!r}")
    return int(text)


class RedisClientProtocol(Protocol):
    """A small general-purpose RESP2 client: :meth:`execute` commands, pipelined.

    Replies are matched to requests in order.  An error reply errbacks with
    :class:`RedisError`; a lost connection errbacks everything pending with the
    reason.  Replies that answer no request (pub/sub messages after ``SUBSCRIBE``) go
    to ``push_handler`` when one is set.  The runner uses its own leaner protocol; this
    one is for tools and tests.
    """

    def __init__(self, push_handler: Callable[[Reply], None] | None = None) -> None:
        self.push_handler = push_handler
        self._parser = RespParser()
        self._pending: deque[Deferred[Reply]] = deque()
        self.connected_deferred: Deferred[RedisClientProtocol] = Deferred()
        self.lost_deferred: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        """Fire ``connected_deferred``."""
        self.connected_deferred.callback(self)

    def execute(self, *args: bytes | str | int) -> Deferred[Reply]:
        """Send one command; fires with its reply."""
        assert self.transport is not None, "not connected"
        d: Deferred[Reply] = Deferred()
        self._pending.append(d)
        self.transport.write(encode_command(*(_arg(a) for a in args)))
        return d

    def dataReceived(self, data: bytes) -> None:
        """Parse replies; fire the pending requests in order (or pass pushes on)."""
        try:
            replies = self._parser.feed(data)
        except RespProtocolError as e:
            self._fail_all(e)
            abort_transport(self.transport)
            return
        for reply in replies:
            if self._pending:
                d = self._pending.popleft()
                if isinstance(reply, RedisError):
                    d.errback(reply)
                else:
                    d.callback(reply)
            elif self.push_handler is not None:
                self.push_handler(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Errback every pending request with ``reason``; fire ``lost_deferred``."""
        self._fail_all(reason)
        self.lost_deferred.callback(None)

    def _fail_all(self, reason: Failure | BaseException) -> None:
        pending, self._pending = self._pending, deque()
        for d in pending:
            d.errback(reason)


def abort_transport(transport: ITransport | None) -> None:
    """Close ``transport`` at once, dropping unsent data (``loseConnection`` if it can't)."""
    if transport is None:
        return
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:
        transport.loseConnection()


def _arg(value: bytes | str | int) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


# ------------------------------------------------------------------------------ URLs


@dataclass(frozen=True, slots=True)
class RedisEndpoint:
    """A parsed ``redis://[user[:pass]@]host[:port][/db]`` URL."""

    host: str
    port: int = DEFAULT_PORT
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int | None = None

    @property
    def label(self) -> str:
        """``host:port`` or ``host:port/db``: how reasons and logs name the endpoint."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        text = f"{host}:{self.port}"
        return text if self.db is None else f"{text}/{self.db}"

    def handshake(self) -> list[tuple[str, bytes]]:
        """The commands sent first on a new connection, each with its step name.

        ``AUTH [user] pass`` when the URL has a password (a user without one sends
        ``AUTH user ""``, which a ``nopass`` ACL user accepts), then ``SELECT db``.
        """
        steps: list[tuple[str, bytes]] = []
        if self.password is not None:
            secret = self.password.encode("utf-8")
            if self.username:
                steps.append(("auth", encode_command(b"AUTH", self.username.encode(), secret)))
            else:
                steps.append(("auth", encode_command(b"AUTH", secret)))
        elif self.username:
            steps.append(("auth", encode_command(b"AUTH", self.username.encode(), b"")))
        if self.db is not None:
            steps.append(("select", encode_command(b"SELECT", b"%d" % self.db)))
        return steps


def parse_redis_url(url: str) -> RedisEndpoint:
    """Parse a rule's URL; ``ValueError`` (with a message free of secrets) if it is bad.

    User and password are percent-decoded.  An empty password counts as none.
    """
    if not url.startswith("redis://"):
        raise ValueError("URL must start with redis://")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("malformed URL (bad host or port)") from None
    host = parts.hostname
    if not host:
        raise ValueError("URL has no host")
    db_text = parts.path.lstrip("/")
    db: int | None = None
    if db_text:
        if not (db_text.isascii() and db_text.isdigit()):
            raise ValueError("database must be a number")
        db = int(db_text)
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return RedisEndpoint(host, DEFAULT_PORT if port is None else port, username, password, db)


def render_reply(value: Reply) -> bytes:
    """A reply as an outcome's output, in RESP's notation: ``:1``, ``+OK``, ``-ERR x``.

    A bulk string is its bytes; a null ``(nil)``; an array ``*N`` and its items, one a line.
    """
    if isinstance(value, int):
        return b":%d" % value
    if isinstance(value, str):
        return b"+" + value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    if isinstance(value, RedisError):
        return b"-" + value.message.encode("utf-8")
    if value is None:
        return b"(nil)"
    return b"\n".join([b"*%d" % len(value), *(render_reply(item) for item in value)])
