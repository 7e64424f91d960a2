"""JSON in, operation arguments out, and answers back to JSON (SPEC §7).

Every function here raises :class:`~ztick_tw.operations.Invalid` on a body that is not
what the document says (missing field, wrong type, bad time), so a transport answers 400
and never 500.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any

from ztick_tw.model import I64_MAX, I64_MIN, Rule, ShownStatus
from ztick_tw.operations import Invalid, ScheduleView

#: The six runner kinds and the fields of their nested form, in ``RULE SET`` order.
RUNNER_FIELDS: dict[str, tuple[str, ...]] = {
    "shell": ("command",),
    "direct": ("executable", "args"),
    "http": ("method", "url"),
    "awf": ("workflow", "inputs"),
    "amqp": ("dsn", "exchange", "routing_key"),
    "redis": ("url", "command", "key"),
}

#: The keys of a schedule body besides ``schedule`` (SPEC §8 options).
SCHEDULE_OPTIONS = (
    "tz",
    "limit",
    "until",
    "jitter",
    "overlap",
    "misfire",
    "grace",
    "decay",
    "decay_step",
)

#: The keys of a rule policy body (SPEC §9).
POLICY_KEYS = ("timeout", "retries", "backoff")

_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)


#: ``date(1970, 1, 1).toordinal()``: days before the epoch in the proleptic calendar.
_EPOCH_ORDINAL = 719_163


def parse_time(text: object, name: str = "execution") -> int:
    """Nanoseconds since the epoch of an RFC 3339 time with a zone (fractions to ns)."""
    if not isinstance(text, str):
        raise Invalid(f"{name} must be an RFC 3339 string with a zone")
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise Invalid(
            f"{name} {text[:64]!r} is not RFC 3339 with a zone"
            " (e.g. 2030-01-02T03:04:05.123456789Z or +02:00)"
        )
    g = m.groups()
    year, month, day = int(g[0]), int(g[1]), int(g[2])
    hour, minute, second = int(g[3]), int(g[4]), int(g[5])
    if hour > 23 or minute > 59 or second > 59:
        raise Invalid(f"{name} {text!r}: no such time of day")
    try:
        days = date(year, month, day).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise Invalid(f"{name} {text!r}: no such date") from None
    offset = 0
    if g[8] is not None:
        oh, om = int(g[9]), int(g[10])
        if oh > 23 or om > 59:
            raise Invalid(f"{name} {text!r}: bad zone offset")
        offset = (oh * 60 + om) * 60 * (1 if g[8] == "+" else -1)
    seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset
    fraction = int(g[6].ljust(9, "0")) if g[6] else 0
    ns = seconds * 1_000_000_000 + fraction
    if not I64_MIN <= ns <= I64_MAX:
        raise Invalid(f"{name} {text!r} is outside the signed 64-bit nanosecond range")
    return ns


def load(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body."""
    try:
        value = json.loads(body.decode("utf-8"))  # JSON is UTF-8 (RFC 8259): no sniffing
    except (ValueError, RecursionError):
        raise Invalid("the body is not JSON") from None
    if not isinstance(value, dict):
        raise Invalid("the body must be a JSON object")
    return value


def text_field(body: Mapping[str, Any], key: str, where: str = "body") -> str:
    """A required string field."""
    if key not in body:
        raise Invalid(f"{where}: {key} is missing")
    value = body[key]
    if not isinstance(value, str):
        raise Invalid(f"{where}: {key} must be a string")
    return value


def _text_list(body: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid(f"{where}: {key} must be a list of strings")
    return value


def rule_args(body: Mapping[str, Any]) -> tuple[str, str, list[str]]:
    """``(pattern, runner word, args)`` of a rule body, nested or ztick's flat form."""
    pattern = text_field(body, "pattern")
    runner = body.get("runner")
    if isinstance(runner, str):  # ztick's flat form: {"pattern", "runner", "args"}
        return pattern, runner, _text_list(body, "args", "body")
    if not isinstance(runner, dict):
        raise Invalid("body: runner must be an object with a type (or a runner word)")
    kind = text_field(runner, "type", "runner")
    fields = RUNNER_FIELDS.get(kind)
    if fields is None:
        raise Invalid(f"runner: unknown type {kind[:32]!r} ({', '.join(RUNNER_FIELDS)})")
    for key in runner:
        if key != "type" and key not in fields:
            raise Invalid(f"runner: unknown field {key[:32]!r} for type {kind}")
    if kind == "direct":
        return (
            pattern,
            kind,
            [text_field(runner, "executable", "runner"), *_text_list(runner, "args", "runner")],
        )
    if kind == "awf":
        args = [text_field(runner, "workflow", "runner")]
        for pair in _text_list(runner, "inputs", "runner"):
            args += ["--input", pair]
        return pattern, kind, args
    return pattern, kind, [text_field(runner, key, "runner") for key in fields]


def _words(body: Mapping[str, Any], keys: Sequence[str], where: str) -> list[str]:
    """``key=value`` words of the optional keys present (strings or numbers)."""
    words = []
    for key in body:
        if key not in keys:
            raise Invalid(f"{where}: unknown field {key[:32]!r}")
    for key in keys:
        if key not in body or body[key] is None:
            continue
        value = body[key]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise Invalid(f"{where}: {key} must be a string or a number")
        words.append(f"{key}={value}")
    return words


def schedule_args(body: Mapping[str, Any]) -> tuple[str, list[str]]:
    """``(schedule text, option words)`` of a schedule body."""
    text = text_field(body, "schedule")
    rest = {k: v for k, v in body.items() if k != "schedule"}
    return text, _words(rest, SCHEDULE_OPTIONS, "body")


def policy_words(body: Mapping[str, Any]) -> list[str]:
    """The ``key=value`` words of a rule policy body."""
    return _words(body, POLICY_KEYS, "body")


# -- answers ---------------------------------------------------------------------------


def job(job_id: str, status: ShownStatus | str, execution: int) -> dict[str, Any]:
    """A job as every answer shows it: ``{"id", "status", "execution"}`` (ns)."""
    word = status if isinstance(status, str) else status.wire
    return {"id": job_id, "status": word, "execution": execution}


def rule(r: Rule) -> dict[str, Any]:
    """A rule in the nested form: ``{"id", "pattern", "runner": {"type", ...}}``."""
    spec = r.runner
    kind = spec.kind.wire
    runner: dict[str, Any] = {"type": kind}
    args = list(spec.args())
    if kind == "direct":
        runner.update(executable=args[0], args=args[1:])
    elif kind == "awf":
        runner.update(workflow=args[0], inputs=args[2::2])
    else:
        runner.update(zip(RUNNER_FIELDS[kind], args, strict=True))
    return {"id": r.id, "pattern": r.pattern, "runner": runner}


def key_values(words: Sequence[str]) -> dict[str, str]:
    """``key=value`` words as an object (values kept as the wire writes them)."""
    out = {}
    for w in words:
        key, _, value = w.partition("=")
        out[key] = value
    return out


def schedule(view: ScheduleView) -> dict[str, Any]:
    """A scheduled job: its text, every option, ``next`` (ns or null), ``runs``, ``paused``."""
    out: dict[str, Any] = {"id": view.job_id, "schedule": view.text}
    out.update(key_values(view.options))
    out.update(next=view.next_ns, runs=view.runs, paused=view.paused)
    return out


def history(record: Any) -> dict[str, Any]:
    """One run of ``HISTORY``, keys as on the wire."""
    return {
        "run": record.run,
        "due": record.due_ns,
        "started": record.started_ns,
        "ended": record.ended_ns,
        "outcome": record.outcome,
        "attempt": record.attempt,
        "exit": record.exit_code,
        "detail": record.detail,
        "output": bytes(record.output).decode("utf-8", "replace"),
    }
