"""ztick's instructions on the line protocol: words in, one operation, the answer lines out.

``SET``, ``GET``, ``QUERY``, ``REMOVE``, ``RULE SET``, ``REMOVERULE``, ``LISTRULES`` and
``STAT``: each checks its arity, makes one ``Operations`` call and queues its answer on
the connection (``protocol/server.py``'s ``ZtickProtocol``, seen through
:class:`Connection`), which keeps the answers in request order.  The SPEC §8-9
instructions are in ``extension.py``.  Also here: the ``AUTH`` line (the first one when
auth is on), and what a refused or malformed request is answered, with the log line
saying why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from twisted.logger import Logger

from ztick_tw.auth import Token, TokenStore
from ztick_tw.operations import Durable, Invalid, NotFound, OperationError, Unavailable
from ztick_tw.protocol import extension
from ztick_tw.protocol.query import QueryStream
from ztick_tw.protocol.tokenizer import TokenizeError, decode_line, tokenize


class Connection(extension.Connection, Protocol):
    """What the instructions here use of a connection, besides the extension's view."""

    _peer: str
    _stream: QueryStream | None

    @property
    def log(self) -> Logger:
        """The connection's logger."""

    @property
    def handlers(self) -> Mapping[str, object]:
        """The instructions the connection knows, by word."""

    def _ok(self, request_id: str, commit: Durable | None) -> None:
        """``ID OK`` once ``commit`` is durable, else ``ID ERROR``; in order."""

    def _error(self, request_id: str) -> None:
        """``ID ERROR``, in order."""

    def _stream_step(self) -> None:
        """Send the next slice of the long answer in ``_stream``."""

    def _authenticated_as(self, token: Token) -> None:
        """``AUTH`` succeeded: the connection acts as ``token`` from now on."""

    def _close(self) -> None:
        """Send what is ready, then close."""


Instruction = Callable[[Connection, str, list[str]], None]


def do_SET(conn: Connection, request_id: str, tokens: list[str]) -> None:
    """``ID SET <job> <ns>`` or ``ID SET <job> <YYYY-MM-DD> <HH:MM:SS>``."""
    if len(tokens) < 4:
        raise Invalid("SET needs a job identifier and a time")
    conn._ok(request_id, conn._ops.set_job(conn._caller, tokens[2], tokens[3:]))


def do_GET(conn: Connection, request_id: str, tokens: list[str]) -> None:
    """``ID GET <job>`` answers ``ID OK <status> <ns>``."""
    if len(tokens) < 3:
        raise Invalid("GET needs a job identifier")
    status, execution_ns = conn._ops.get_job(conn._caller, tokens[2])
    conn._reply(f"{request_id} OK {status.wire} {execution_ns}\n".encode())


def do_QUERY(conn: Connection, request_id: str, tokens: list[str]) -> None:
    """``ID QUERY [<prefix>]``: one line per matching job, then ``ID OK``."""
    query = conn._ops.query(conn._caller, tokens[2] if len(tokens) > 2 else "")
    conn._stream = QueryStream(query.scan, request_id, query.prefix)
    conn._stream_step()


def do_REMOVE(conn: Connection, request_id: str, tokens: list[str]) -> None:
    """``ID REMOVE <job>``."""
    if len(tokens) < 3:
        raise Invalid("REMOVE needs a job identifier")
    conn._ok(request_id, conn._ops.remove_job(conn._caller, tokens[2]))


def do_RULE(conn: Connection, request_id: str, tokens: list[str]) -> None:
    """``ID RULE SET <rule> <pattern> <runner> <args...>`` (and ``RULE POLICY``)."""
    if len(tokens) >= 3 and tokens[2] == "POLICY":
        extension.rule_policy(conn, request_id, tokens)
        return
    if len(tokens) < 3 or tokens[2] != "SET":
        return  # "RULE" without "SET" is not an instruction: no answer, as ztick
    if len(tokens) < 6:
        raise Invalid("RULE SET needs a rule id, a pattern and a runner")
    commit = conn._ops.set_rule(conn._caller, tokens[3], tokens[4], tokens[5], tokens[6:])
    conn._ok(request_id, commit)


def do_REMOVERULE(conn: Connection, request_id: str, tokens: list[str]) -> None:
    """``ID REMOVERULE <rule>``."""
    if len(tokens) < 3:
        raise Invalid("REMOVERULE needs a rule id")
    conn._ok(request_id, conn._ops.remove_rule(conn._caller, tokens[2]))


def do_LISTRULES(conn: Connection, request_id: str, tokens: list[str]) -> None:
    """``ID LISTRULES``: one line per rule, rendered as ztick does, then ``ID OK``."""
    lines = []
    for rule in conn._ops.list_rules(conn._caller):
        words = " ".join((rule.id, rule.pattern, rule.runner.kind.wire, *rule.runner.args()))
        lines.append(f"{request_id} {words}\n")
    lines.append(f"{request_id} OK\n")
    conn._reply("".join(lines).encode())


def do_STAT(conn: Connection, request_id: str, tokens: list[str]) -> None:
    """``ID STAT``: one ``ID <key> <value>`` line per metric, then ``ID OK``."""
    lines = [f"{request_id} {key} {value}\n" for key, value in conn._ops.stat(conn._caller)]
    lines.append(f"{request_id} OK\n")
    conn._reply("".join(lines).encode())


#: ztick's instructions, by word (``RULE POLICY``, SPEC §9, is dispatched by ``RULE``).
HANDLERS: dict[str, Instruction] = {
    "SET": do_SET,
    "GET": do_GET,
    "QUERY": do_QUERY,
    "REMOVE": do_REMOVE,
    "RULE": do_RULE,
    "REMOVERULE": do_REMOVERULE,
    "LISTRULES": do_LISTRULES,
    "STAT": do_STAT,
}


def authenticate(conn: Connection, tokens: TokenStore, line: bytes) -> None:
    """The first line with auth on: ``AUTH <secret>`` gets ``OK``; anything else closes."""
    try:
        words = tokenize(decode_line(line))
    except TokenizeError as e:
        words = e.tokens
    if not words:
        return  # blank lines before AUTH are ignored
    if len(words) >= 2 and words[0] == "AUTH":
        token = tokens.authenticate(words[1])
        if token is not None:
            conn._authenticated_as(token)
            conn.log.info(
                "client {peer} authenticated as token {token} (namespace {namespace})",
                peer=conn._peer,
                token=token.name,
                namespace=token.namespace,
            )
            conn._reply(b"OK\n")
            return
        conn.log.warn("client {peer} failed to authenticate; closing", peer=conn._peer)
    else:
        conn.log.info("client {peer} sent a request before AUTH; closing", peer=conn._peer)
    conn._reply(b"ERROR\n")
    conn._close()


def malformed(conn: Connection, e: TokenizeError) -> None:
    """A line that cannot be split: ``ID ERROR`` if it names an instruction, else silence."""
    tokens = e.tokens
    if len(tokens) >= 2 and tokens[1] in conn.handlers:
        conn.log.info(
            "request {request_id} from {peer}: {reason}",
            request_id=_for_log(tokens[0]),
            peer=conn._peer,
            reason=e.reason,
        )
        conn._error(tokens[0])
    else:
        conn.log.debug(
            "ignored malformed line from {peer}: {reason}",
            peer=conn._peer,
            reason=e.reason,
        )


def refused(conn: Connection, tokens: list[str], e: OperationError) -> None:
    """An instruction raised ``e``: log why, answer ``ID ERROR`` (with the reason, §8-9)."""
    _log_refused(conn, tokens, e)
    reasoned = tokens[1] in extension.HANDLERS or tokens[1:3] == ["RULE", "POLICY"]
    if reasoned:  # SPEC §8-9 instructions say why; ztick's answer a bare ERROR
        conn._reply(f"{tokens[0]} ERROR {extension.reason_text(str(e))}\n".encode())
    else:
        conn._error(tokens[0])


def _log_refused(conn: Connection, tokens: list[str], e: OperationError) -> None:
    """Log why a request was refused: an error when the disk refused a change."""
    if isinstance(e, Unavailable):
        conn.log.error(
            "request {request_id} {instruction} from {peer}: cannot persist: {error}",
            request_id=_for_log(tokens[0]),
            instruction=_for_log(tokens[1]),
            peer=conn._peer,
            error=str(e),
        )
        return
    emit = conn.log.debug if isinstance(e, NotFound) else conn.log.info
    emit(
        "request {request_id} {instruction} from {peer} refused: {reason}",
        request_id=_for_log(tokens[0]),
        instruction=_for_log(tokens[1]),
        peer=conn._peer,
        reason=str(e),
    )


def _for_log(text: str, limit: int = 80) -> str:
    """Client-chosen text made safe for a log line: control characters escaped, bounded."""
    shown = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + "..."
