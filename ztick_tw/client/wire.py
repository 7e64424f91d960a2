r"""Requests and answers of the line protocol, shared by the blocking and the Twisted client.

A request is a :class:`Call`: its words (quoted on the wire by :func:`quote`), whether its
answer runs over several lines, and how the answer's body becomes a typed result.  The
functions at the bottom build one ``Call`` per instruction; a client only sends
``format_request(rid, call)`` and feeds the answer lines to an :class:`Answer`.

Answers end with ``ID OK`` (``ID OK <body>`` for one-line answers) or ``ID ERROR``
(``ID ERROR <reason>`` for the extension instructions); :class:`ZtickError` carries the
reason.  Extension answers quote tokens with ``\``-escapes and JSON escapes for control
characters; :func:`fields` reads them back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, NamedTuple, TypeVar

T = TypeVar("T")

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Instructions whose answer is several lines ending with ``ID OK``.
MULTI_LINE = frozenset({"QUERY", "LISTRULES", "STAT", "LISTSCHEDULES", "PREVIEW", "HISTORY"})
#: Every instruction the clients know (``RULE`` and ``SCHEDULE`` take a second word).
INSTRUCTIONS = (
    *("SET", "GET", "QUERY", "REMOVE", "RULE", "REMOVERULE", "LISTRULES", "STAT"),
    *("SCHEDULE", "LISTSCHEDULES", "PREVIEW", "PAUSE", "RESUME", "RUN", "HISTORY"),
)
MAX_LINE = 4096


class ZtickError(Exception):
    """The server answered ``ERROR``; ``reason`` is its text (empty for ztick's instructions)."""

    def __init__(self, words: Sequence[str], reason: str) -> None:
        shown = " ".join(words[:3])
        super().__init__(f"{shown}: ERROR {reason}".rstrip() if reason else f"{shown}: ERROR")
        self.words = tuple(words)
        self.reason = reason


class ProtocolError(Exception):
    """The server's answer does not fit the protocol (or the connection closed early)."""


# -- times ------------------------------------------------------------------------------


def ns_to_datetime(ns: int) -> datetime:
    """An aware UTC datetime for nanoseconds since the epoch (microsecond precision)."""
    return EPOCH + timedelta(microseconds=ns // 1000)


def datetime_to_ns(when: datetime) -> int:
    """Nanoseconds since the epoch of an aware datetime (naive ones are refused)."""
    if when.tzinfo is None:
        raise ValueError("a naive datetime is ambiguous: give it a tzinfo (UTC or local)")
    return (when - EPOCH) // timedelta(microseconds=1) * 1000


# -- typed results ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Job:
    """One job as GET and QUERY show it."""

    id: str
    status: str
    execution: datetime
    execution_ns: int


@dataclass(frozen=True, slots=True)
class Rule:
    """One LISTRULES line; ``args`` split on spaces (the server prints them raw)."""

    id: str
    pattern: str
    runner: str
    args: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Schedule:
    """SCHEDULE GET / LISTSCHEDULES: the schedule, its options, next run, run count."""

    job_id: str
    text: str
    options: dict[str, str]
    next_ns: int | None
    next: datetime | None
    runs: int
    paused: bool


@dataclass(frozen=True, slots=True)
class Run:
    """One HISTORY entry (``None`` for ``-``)."""

    run: int
    due_ns: int
    started_ns: int | None
    ended_ns: int | None
    outcome: str
    attempt: int
    exit: int | None
    detail: str
    output: str

    @property
    def due(self) -> datetime:
        """The due time, an aware UTC datetime."""
        return ns_to_datetime(self.due_ns)

    @property
    def started(self) -> datetime | None:
        """When the run started (``None``: not started)."""
        return None if self.started_ns is None else ns_to_datetime(self.started_ns)

    @property
    def ended(self) -> datetime | None:
        """When the run ended (``None``: not ended)."""
        return None if self.ended_ns is None else ns_to_datetime(self.ended_ns)


@dataclass(frozen=True, slots=True)
class Instant:
    """One PREVIEW line: nanoseconds, the aware UTC datetime, the server's ISO text."""

    ns: int
    at: datetime
    iso: str


@dataclass(frozen=True, slots=True)
class Policy:
    """RULE POLICY's answer: effective timeout (``None``: the runner's own), retries, backoff."""

    timeout: str | None
    retries: int
    backoff: str


# -- quoting ----------------------------------------------------------------------------


def quote(token: str) -> str:
    r"""Quote a request token when it is empty or holds a space, ``"`` or ``\\``."""
    if token and " " not in token and '"' not in token and "\\" not in token:
        return token
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fields(text: str) -> list[str]:
    r"""Split an extension answer into tokens: ``"..."`` and ``key="..."`` are unquoted."""
    out: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        if text[pos] == " ":
            pos += 1
            continue
        start = pos
        while pos < end and text[pos] not in ' "':
            pos += 1
        head = text[start:pos]
        if pos < end and text[pos] == '"':
            pos += 1
            raw_start = pos
            while pos < end and text[pos] != '"':
                pos += 2 if text[pos] == "\\" else 1
            if pos >= end:
                raise ProtocolError(f"unterminated quoted field in {text!r}")
            head += json.loads('"' + text[raw_start:pos] + '"')
            pos += 1
        out.append(head)
    return out


def _keyed(words: Sequence[str]) -> dict[str, str]:
    return dict(w.partition("=")[::2] for w in words)


def _ns_or_none(text: str) -> int | None:
    return None if text == "-" else int(text)


# -- calls ------------------------------------------------------------------------------


class Call(NamedTuple, Generic[T]):
    """One request: its words, and how its answer's body lines become a ``T``."""

    words: tuple[str, ...]
    convert: Callable[[list[str]], T]
    multi: bool = False


def format_request(rid: str, call: Call[Any]) -> bytes:
    """``rid`` and the call's words, quoted, as one line; ``ValueError`` if it cannot be."""
    line = rid + " " + " ".join(map(quote, call.words)) + "\n"
    if "\r" in line or line.count("\n") > 1:
        raise ValueError("a request cannot hold a line break")
    data = line.encode()
    if len(data) > MAX_LINE + 1:
        raise ValueError(f"a request must fit in {MAX_LINE} bytes")
    return data


def format_batch(first: int, calls: Sequence[Call[Any]]) -> bytes:
    """Requests ``c<first>``, ``c<first+1>``... for ``calls``, as one block of lines."""
    q = quote
    lines = [f"c{i} {' '.join(map(q, c.words))}\n" for i, c in enumerate(calls, first)]
    text = "".join(lines)
    if (
        text.count("\n") == len(lines)
        and "\r" not in text
        and max(map(len, lines)) * 4 <= MAX_LINE
    ):
        return text.encode()
    return b"".join([format_request(f"c{i}", c) for i, c in enumerate(calls, first)])


class Answer(Generic[T]):
    """Collects the lines (request id removed) of one call's answer."""

    __slots__ = ("call", "lines")

    def __init__(self, call: Call[T]) -> None:
        self.call = call
        self.lines: list[str] = []

    def feed(self, rest: str) -> bool:
        """Add one line; whether the answer is complete."""
        self.lines.append(rest)
        if not self.call.multi or rest == "OK" or rest == "ERROR":
            return True
        if rest.startswith("ERROR ") and self.call.words[0] in ("PREVIEW", "HISTORY"):
            return True
        return (
            self.call.words[0] == "LISTSCHEDULES"
            and rest.startswith("ERROR ")
            and (not rest.startswith('ERROR "'))
        )

    def result(self) -> T:
        """The typed result, or ``ZtickError`` for an ``ERROR`` answer."""
        last = self.lines[-1]
        if last == "ERROR" or last.startswith("ERROR "):
            raise ZtickError(self.call.words, last[6:])
        if self.call.multi:
            return self.call.convert(self.lines[:-1])
        if last == "OK":
            return self.call.convert([""])
        if last.startswith("OK "):
            return self.call.convert([last[3:]])
        raise ProtocolError(f"unexpected answer {last!r} to {self.call.words[0]}")


# -- converters -------------------------------------------------------------------------


def none(body: list[str]) -> None:
    """The result of an instruction that answers a bare ``OK``."""
    return None


_none = none


def _lines(body: list[str]) -> list[str]:
    return body


def _job(job_id: str) -> Callable[[list[str]], Job]:
    def convert(body: list[str]) -> Job:
        status, ns = body[0].split(" ")[:2]
        return Job(job_id, status, ns_to_datetime(int(ns)), int(ns))

    return convert


def _jobs(body: list[str]) -> list[Job]:
    out = []
    for line in body:
        job_id, status, ns = line.rsplit(" ", 2)  # an id may hold spaces
        out.append(Job(job_id, status, ns_to_datetime(int(ns)), int(ns)))
    return out


def _rules(body: list[str]) -> list[Rule]:
    out = []
    for line in body:
        rule_id, _, rest = line.partition(" ")
        pattern, _, rest = rest.partition(" ")
        runner, _, args = rest.partition(" ")
        out.append(Rule(rule_id, pattern, runner, tuple(args.split(" ")) if args else ()))
    return out


def _stat(body: list[str]) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    for line in body:
        key, _, value = line.partition(" ")
        out[key] = int(value) if value.lstrip("-").isdigit() else value
    return out


def _schedule(job_id: str, words: list[str]) -> Schedule:
    keyed = _keyed(words[1:])
    next_ns = _ns_or_none(keyed.pop("next", "-"))
    runs = int(keyed.pop("runs", "0"))
    paused = keyed.pop("paused", "0") == "1"
    when = None if next_ns is None else ns_to_datetime(next_ns)
    return Schedule(job_id, words[0], keyed, next_ns, when, runs, paused)


def _schedule_get(job_id: str) -> Callable[[list[str]], Schedule]:
    return lambda body: _schedule(job_id, fields(body[0]))


def _schedules(body: list[str]) -> list[Schedule]:
    out = []
    for line in body:
        words = fields(line)
        out.append(_schedule(words[0], words[1:]))
    return out


def _first_ns(body: list[str]) -> int:
    return int(body[0])


def _preview(body: list[str]) -> list[Instant]:
    out = []
    for line in body:
        ns, _, iso = line.partition(" ")
        out.append(Instant(int(ns), ns_to_datetime(int(ns)), iso))
    return out


def _history(body: list[str]) -> list[Run]:
    out = []
    for line in body:
        k = _keyed(fields(line))
        out.append(
            Run(
                int(k["run"]),
                int(k["due"]),
                _ns_or_none(k["started"]),
                _ns_or_none(k["ended"]),
                k["outcome"],
                int(k["attempt"]),
                _ns_or_none(k["exit"]),
                k.get("detail", ""),
                k.get("output", ""),
            )
        )
    return out


def _policy(body: list[str]) -> Policy:
    k = _keyed(fields(body[0]))
    timeout = k.get("timeout", "-")
    return Policy(None if timeout == "-" else timeout, int(k["retries"]), k["backoff"])


# -- one Call per instruction -----------------------------------------------------------


def time_word(when: int | datetime) -> str:
    """A SET time: nanoseconds, or an aware datetime."""
    return str(when if isinstance(when, int) else datetime_to_ns(when))


def options_words(options: dict[str, str] | None) -> list[str]:
    """``key=value`` words for options."""
    return [f"{k}={v}" for k, v in (options or {}).items()]


def set_job(job: str, when: int | datetime) -> Call[None]:
    """SET: create or replace a one-shot job at ``when`` (ns, or an aware datetime)."""
    return Call(("SET", job, time_word(when)), _none)


def get_job(job: str) -> Call[Job]:
    """GET: the job (``ZtickError`` if unknown)."""
    return Call(("GET", job), _job(job))


def query(prefix: str = "") -> Call[list[Job]]:
    """QUERY: the jobs whose id starts with ``prefix``, in id order."""
    return Call(("QUERY", prefix), _jobs, True)


def remove(job: str) -> Call[None]:
    """REMOVE: delete the job."""
    return Call(("REMOVE", job), _none)


def rule_set(rule: str, pattern: str, runner: str, *args: str) -> Call[None]:
    """RULE SET: map job ids starting with ``pattern`` to a runner."""
    return Call(("RULE", "SET", rule, pattern, runner, *args), _none)


def remove_rule(rule: str) -> Call[None]:
    """REMOVERULE: delete the rule."""
    return Call(("REMOVERULE", rule), _none)


def list_rules() -> Call[list[Rule]]:
    """LISTRULES: every rule, in the order first set."""
    return Call(("LISTRULES",), _rules, True)


def stat() -> Call[dict[str, int | str]]:
    """STAT: the daemon's figures (numbers as ints)."""
    return Call(("STAT",), _stat, True)


def schedule_set(job: str, schedule: str, options: dict[str, str] | None = None) -> Call[int]:
    """SCHEDULE SET: make the job recurring; the first firing in ns."""
    return Call(("SCHEDULE", "SET", job, schedule, *options_words(options)), _first_ns)


def schedule_get(job: str) -> Call[Schedule]:
    """SCHEDULE GET: the job's schedule, options, next run and run count."""
    return Call(("SCHEDULE", "GET", job), _schedule_get(job))


def schedule_remove(job: str) -> Call[None]:
    """SCHEDULE REMOVE: the job stays, a one-shot at its current time."""
    return Call(("SCHEDULE", "REMOVE", job), _none)


def list_schedules(prefix: str = "") -> Call[list[Schedule]]:
    """LISTSCHEDULES: the scheduled jobs whose id starts with ``prefix``."""
    return Call(("LISTSCHEDULES", prefix), _schedules, True)


def preview(
    schedule: str, count: int | None = None, options: dict[str, str] | None = None
) -> Call[list[Instant]]:
    """PREVIEW: the schedule's next instants (5 unless ``count``)."""
    counted = [] if count is None else [str(count)]
    return Call(("PREVIEW", schedule, *counted, *options_words(options)), _preview, True)


def pause(job: str) -> Call[None]:
    """PAUSE: hold the job until RESUME."""
    return Call(("PAUSE", job), _none)


def resume(job: str) -> Call[None]:
    """RESUME: let a paused job fire again."""
    return Call(("RESUME", job), _none)


def run_now(job: str) -> Call[None]:
    """RUN: one extra run now; answered once it has started."""
    return Call(("RUN", job), _none)


def history(job: str, count: int | None = None) -> Call[list[Run]]:
    """HISTORY: the job's last runs, newest first."""
    return Call(("HISTORY", job, *([] if count is None else [str(count)])), _history, True)


def rule_policy(rule: str, options: dict[str, str] | None = None) -> Call[Policy]:
    """RULE POLICY: change (or, without options, show) the rule's policy."""
    return Call(("RULE", "POLICY", rule, *options_words(options)), _policy)


def raw(*words: str) -> Call[list[str]]:
    """Any request; the answer's body lines as the server sent them."""
    multi = bool(words) and words[0] in MULTI_LINE
    return Call(tuple(words), _lines, multi)


def auth_line(token: str) -> bytes:
    """The first line of a connection to a daemon with authentication on."""
    return f"AUTH {quote(token)}\n".encode()
