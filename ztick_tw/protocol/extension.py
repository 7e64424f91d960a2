"""The line-protocol instructions of SPEC §8-9: words in, one operation, answer lines out.

``SCHEDULE SET/GET/REMOVE``, ``LISTSCHEDULES``, ``PREVIEW``, ``PAUSE``, ``RESUME``,
``RUN``, ``HISTORY`` and ``RULE POLICY``.  Unlike ztick's instructions they answer
``ID ERROR <reason>``; tokens that may hold spaces are quoted on output (:func:`quote`),
so every listing can be pasted back.  ``RUN`` and ``HISTORY`` answer later (when the run
has started, when the history is read) and still in request order: their answer is a
:class:`Later`, a durability-like handle the connection's answer queue waits on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ztick_tw.operations import (
    Caller,
    Durable,
    Invalid,
    OperationError,
    Operations,
    ScheduleView,
)


class Connection(Protocol):
    """What the handlers here use of a connection (``protocol/server.py``'s protocol)."""

    _ops: Operations
    _caller: Caller

    def answer_ok(self, request_id: str, commit: Durable | None, extra: str = "") -> None:
        """``ID OK`` (with ``extra``) once ``commit`` is durable, in order."""

    def answer_later(self, later: Later) -> None:
        """An answer known later, kept in order with the others."""

    def _reply(self, data: bytes, commit: Durable | None = None, error: bytes = b"") -> None:
        """Queue ``data`` after every earlier answer."""


_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:/+@*,")


def quote(text: str) -> str:
    r"""``"text"`` with ``"`` and ``\`` escaped by ``\``, control characters as JSON escapes."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(json.dumps(ch)[1:-1])
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def field(word: str) -> str:
    """A ``key=value`` word, with the value quoted when it needs to be (one field)."""
    key, sep, value = word.partition("=")
    if not sep or (value and all(c in _SAFE for c in value)):
        return word
    return f"{key}={quote(value)}"


def reason_text(reason: str) -> str:
    """A reason made one safe line: control characters escaped, bounded."""
    shown = reason if reason.isprintable() else reason.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= 400 else shown[:400] + "..."


def schedule_fields(view: ScheduleView) -> str:
    """``"<schedule>" <key=value ...> next=<ns> runs=<n> paused=<0/1>``."""
    next_text = "-" if view.next_ns is None else str(view.next_ns)
    words = [quote(view.text), *(field(w) for w in view.options)]
    words += [f"next={next_text}", f"runs={view.runs}", f"paused={int(view.paused)}"]
    return " ".join(words)


def history_fields(record: Any) -> str:
    """One ``HISTORY`` line's fields (after the request id)."""

    def ns(value: int | None) -> str:
        return "-" if value is None else str(value)

    output = bytes(record.output).decode("utf-8", "replace")
    exit_code = "-" if record.exit_code is None else str(record.exit_code)
    return (
        f"run={record.run} due={record.due_ns} started={ns(record.started_ns)}"
        f" ended={ns(record.ended_ns)} outcome={record.outcome} attempt={record.attempt}"
        f" exit={exit_code} detail={quote(record.detail)} output={quote(output)}"
    )


class Later:
    """An answer that is known later, kept in order with the others (a ``Durable``).

    ``error`` stays ``None``: a failed operation still answers (``ID ERROR <reason>``),
    so the answer queue always sends ``answer``.
    """

    def __init__(self, d: Deferred[bytes], on_error: Callable[[Failure], bytes]) -> None:
        self.done = False
        self.error: BaseException | None = None
        self.answer = b""
        self._subscribers: list[Callable[[Later], None]] = []
        self._on_error = on_error
        d.addCallbacks(self._ready, self._failed)

    def _ready(self, answer: bytes) -> None:
        self.answer = answer
        self._resolve()

    def _failed(self, failure: Failure) -> None:
        self.answer = self._on_error(failure)
        self._resolve()

    def _resolve(self) -> None:
        self.done = True
        subscribers, self._subscribers = self._subscribers, []
        for callback in subscribers:
            callback(self)

    def subscribe(self, callback: Callable[[Later], None]) -> None:
        """Call ``callback(self)`` once the answer is known (now, if it is)."""
        if self.done:
            callback(self)
        else:
            self._subscribers.append(callback)


def _options_split(words: Sequence[str]) -> tuple[int | None, list[str]]:
    """PREVIEW's optional count, then its options."""
    if words and words[0].isdigit():
        return int(words[0]), list(words[1:])
    if words and words[0].startswith("-") and words[0][1:].isdigit():
        raise Invalid(f"count {words[0]} is outside 1-1000")
    return None, list(words)


# -- the instructions -----------------------------------------------------------------


def do_SCHEDULE(proto: Connection, rid: str, tokens: list[str]) -> None:
    """``ID SCHEDULE SET|GET|REMOVE <job> ...``."""
    ops, caller = proto._ops, proto._caller
    word = tokens[2] if len(tokens) > 2 else ""
    if word == "SET":
        if len(tokens) < 5:
            raise Invalid("SCHEDULE SET needs a job identifier and a schedule")
        first_ns, commit = ops.set_schedule(caller, tokens[3], tokens[4], tokens[5:])
        proto.answer_ok(rid, commit, f" {first_ns}")
    elif word == "GET":
        if len(tokens) < 4:
            raise Invalid("SCHEDULE GET needs a job identifier")
        view = ops.get_schedule(caller, tokens[3])
        proto._reply(f"{rid} OK {schedule_fields(view)}\n".encode())
    elif word == "REMOVE":
        if len(tokens) < 4:
            raise Invalid("SCHEDULE REMOVE needs a job identifier")
        proto.answer_ok(rid, ops.remove_schedule(caller, tokens[3]))
    else:
        raise Invalid(f"unknown SCHEDULE word {word!r} (expected SET, GET or REMOVE)")


def do_LISTSCHEDULES(proto: Connection, rid: str, tokens: list[str]) -> None:
    """``ID LISTSCHEDULES [<prefix>]``."""
    views = proto._ops.list_schedules(proto._caller, tokens[2] if len(tokens) > 2 else "")
    lines = [f"{rid} {v.job_id} {schedule_fields(v)}\n" for v in views]
    lines.append(f"{rid} OK\n")
    proto._reply("".join(lines).encode())


def do_PREVIEW(proto: Connection, rid: str, tokens: list[str]) -> None:
    """``ID PREVIEW <schedule> [<count>] [key=value ...]``."""
    if len(tokens) < 3:
        raise Invalid("PREVIEW needs a schedule")
    count, options = _options_split(tokens[3:])
    found = proto._ops.preview(proto._caller, tokens[2], 5 if count is None else count, options)
    lines = [f"{rid} {ns} {iso}\n" for ns, iso in found]
    lines.append(f"{rid} OK\n")
    proto._reply("".join(lines).encode())


def do_PAUSE(proto: Connection, rid: str, tokens: list[str]) -> None:
    """``ID PAUSE <job>``."""
    if len(tokens) < 3:
        raise Invalid("PAUSE needs a job identifier")
    proto.answer_ok(rid, proto._ops.pause(proto._caller, tokens[2]))


def do_RESUME(proto: Connection, rid: str, tokens: list[str]) -> None:
    """``ID RESUME <job>``."""
    if len(tokens) < 3:
        raise Invalid("RESUME needs a job identifier")
    proto.answer_ok(rid, proto._ops.resume(proto._caller, tokens[2]))


def _error_line(rid: str) -> Callable[[Failure], bytes]:
    def error(failure: Failure) -> bytes:
        if isinstance(failure.value, OperationError):
            why = str(failure.value)
        else:
            why = f"internal error: {failure.getErrorMessage()}"
        return f"{rid} ERROR {reason_text(why)}\n".encode()

    return error


def do_RUN(proto: Connection, rid: str, tokens: list[str]) -> None:
    """``ID RUN <job>``: ``ID OK`` once the run has started."""
    if len(tokens) < 3:
        raise Invalid("RUN needs a job identifier")
    started = proto._ops.run_now(proto._caller, tokens[2])
    answer = started.addCallback(lambda _: f"{rid} OK\n".encode())
    proto.answer_later(Later(answer, _error_line(rid)))


def do_HISTORY(proto: Connection, rid: str, tokens: list[str]) -> None:
    """``ID HISTORY <job> [<n>]``: newest run first, then ``ID OK``."""
    if len(tokens) < 3:
        raise Invalid("HISTORY needs a job identifier")
    count = 10
    if len(tokens) > 3:
        if not tokens[3].lstrip("-").isdigit():
            raise Invalid(f"count {tokens[3]!r} is not a number")
        count = int(tokens[3])
    records = proto._ops.history_of(proto._caller, tokens[2], count)

    def lines(found: list[Any]) -> bytes:
        out = [f"{rid} {history_fields(r)}\n" for r in found]
        out.append(f"{rid} OK\n")
        return "".join(out).encode()

    proto.answer_later(Later(records.addCallback(lines), _error_line(rid)))


def rule_policy(proto: Connection, rid: str, tokens: list[str]) -> None:
    """``ID RULE POLICY <rule> [key=value ...]``: ``ID OK <policy>``."""
    if len(tokens) < 4:
        raise Invalid("RULE POLICY needs a rule id")
    words, commit = proto._ops.rule_policy(proto._caller, tokens[3], tokens[4:])
    proto.answer_ok(rid, commit, " " + " ".join(field(w) for w in words))


#: The instructions above, by word (``RULE POLICY`` is dispatched by ``RULE``).
HANDLERS = {
    "SCHEDULE": do_SCHEDULE,
    "LISTSCHEDULES": do_LISTSCHEDULES,
    "PREVIEW": do_PREVIEW,
    "PAUSE": do_PAUSE,
    "RESUME": do_RESUME,
    "RUN": do_RUN,
    "HISTORY": do_HISTORY,
}
