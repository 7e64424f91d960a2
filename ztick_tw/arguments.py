"""Turn the arguments of a request into checked values: timestamps, rules, runners.

Every function here is pure; a bad argument raises ``CommandError`` whose message says
which argument was wrong and why.  The protocol answers ``ID ERROR`` and logs it.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Sequence
from urllib.parse import SplitResult, urlsplit

from ztick_tw.model import (
    I64_MAX,
    I64_MIN,
    MAX_STRING_BYTES,
    AmqpSpec,
    AwfSpec,
    DirectSpec,
    HttpSpec,
    RedisSpec,
    Rule,
    RunnerSpec,
    ShellSpec,
)


class CommandError(ValueError):
    """A request's arguments are invalid; the message is for the log."""


# re.ASCII: ``\d`` must not match other scripts' digits (int() would accept them).
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})\Z", re.ASCII)
_TIME = re.compile(r"(\d{2}):(\d{2}):(\d{2})\Z", re.ASCII)
_INTEGER = re.compile(r"[+-]?\d+(?:_\d+)*\Z", re.ASCII)

HTTP_METHODS = ("GET", "POST", "PUT", "DELETE")
_PROCESS_RUNNERS = ("shell", "direct", "awf")
REDIS_COMMANDS = ("PUBLISH", "RPUSH", "LPUSH", "SET")


def parse_integer_ns(text: str) -> int:
    """Parse a signed 64-bit nanosecond timestamp written in decimal."""
    if not _INTEGER.match(text):
        raise CommandError(f"timestamp {text!r} is neither an integer nor a date")
    if len(text) > 40:  # far beyond i64 even with "_" separators; int() would refuse anyway
        raise CommandError(f"timestamp {text[:20]}... is outside the signed 64-bit range")
    value = int(text)
    if not I64_MIN <= value <= I64_MAX:
        raise CommandError(f"timestamp {text} is outside the signed 64-bit range")
    return value


def parse_datetime_ns(date: str, time: str) -> int:
    """Parse ``YYYY-MM-DD`` and ``HH:MM:SS`` (UTC) into nanoseconds since the epoch."""
    d = _DATE.match(date)
    if d is None:
        raise CommandError(f"date {date!r} is not YYYY-MM-DD")
    t = _TIME.match(time)
    if t is None:
        raise CommandError(f"time {time!r} is not HH:MM:SS")
    year, month, day = (int(x) for x in d.groups())
    hour, minute, second = (int(x) for x in t.groups())
    if not 1 <= month <= 12:
        raise CommandError(f"date {date}: month {month} is not 1-12")
    if year < 1 or not 1 <= day <= calendar.monthrange(year, month)[1]:
        raise CommandError(f"date {date}: day {day} does not exist in that month")
    if hour > 23 or minute > 59 or second > 59:
        raise CommandError(f"time {time} is not a valid time of day")
    seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    value = seconds * 1_000_000_000
    if not I64_MIN <= value <= I64_MAX:
        raise CommandError(f"{date} {time} is outside the signed 64-bit nanosecond range")
    return value


def parse_execution(args: Sequence[str]) -> int:
    """The time arguments of SET, as ztick reads them.

    With two or more arguments a ``YYYY-MM-DD HH:MM:SS`` pair is tried first; otherwise
    (or if that is not a date) the first argument is a decimal nanosecond count.  A
    single quoted ``"YYYY-MM-DD HH:MM:SS"`` token is accepted too.  Anything else is
    an error (ztick stored such a job at time 0).
    """
    if not args:
        raise CommandError("SET needs a job identifier and a time")
    first = args[0]
    if len(args) >= 2 and _DATE.match(first):
        return parse_datetime_ns(first, args[1])
    if " " in first:
        date, _, time = first.partition(" ")
        return parse_datetime_ns(date, time.strip(" "))
    if _DATE.match(first):
        raise CommandError(f"date {first} has no HH:MM:SS time after it")
    return parse_integer_ns(first)


def check_string(what: str, value: str) -> str:
    """Refuse a string the logfile cannot hold (more than 65535 UTF-8 bytes)."""
    if len(value) * 4 > MAX_STRING_BYTES and len(value.encode("utf-8")) > MAX_STRING_BYTES:
        raise CommandError(f"{what} is longer than {MAX_STRING_BYTES} bytes")
    return value


def check_identifier(what: str, value: str) -> str:
    """Refuse an id the logfile cannot hold, or that cannot reach a job's environment.

    A NUL byte cannot be passed to a child process (``ZTICK_JOB_ID``, ``ZTICK_RULE_ID``),
    so it is refused when the id is set rather than failing every run later.
    """
    check_string(what, value)
    if "\x00" in value:
        raise CommandError(
            f"{what} contains a NUL byte at offset {value.index(chr(0))}: not allowed,"
            " it cannot be passed to a child process"
        )
    return value


def parse_rule(rule_id: str, pattern: str, runner: str, args: Sequence[str]) -> Rule:
    """Build a rule from ``RULE SET <rule> <pattern> <runner> <args...>``."""
    check_identifier("rule id", rule_id)
    check_identifier("pattern", pattern)
    return Rule(rule_id, pattern, parse_runner(runner, args))


def parse_runner(runner: str, args: Sequence[str]) -> RunnerSpec:
    """Validate a runner word and its arguments into a runner spec."""
    for i, arg in enumerate(args):
        if runner in _PROCESS_RUNNERS:
            # A process's argv cannot hold a NUL byte: refuse it now, not at every run.
            check_identifier(f"runner argument {i + 1}", arg)
        else:
            check_string(f"runner argument {i + 1}", arg)
    if runner == "shell":
        if not args:
            raise CommandError("shell runner needs a command")
        # A command written as several plain tokens is one command line.
        return ShellSpec(" ".join(args))
    if runner == "direct":
        if not args:
            raise CommandError("direct runner needs an executable")
        if len(args) - 1 > 65535:
            raise CommandError("direct runner has more than 65535 arguments")
        return DirectSpec(args[0], tuple(args[1:]))
    if runner == "http":
        return _parse_http(args)
    if runner == "awf":
        return _parse_awf(args)
    if runner == "amqp":
        return _parse_amqp(args)
    if runner == "redis":
        return _parse_redis(args)
    raise CommandError(f"unknown runner {runner!r} (shell, direct, http, awf, amqp, redis)")


def _parse_http(args: Sequence[str]) -> HttpSpec:
    if len(args) != 2:
        raise CommandError("http runner takes a method and a URL")
    method, url = args
    if method not in HTTP_METHODS:
        raise CommandError(f"http method {method!r} is not one of {', '.join(HTTP_METHODS)}")
    if not (url.startswith("http://") or url.startswith("https://")):
        raise CommandError("http URL must start with http:// or https://")
    if not _split_url("http URL", url).hostname:
        raise CommandError("http URL has no host")
    return HttpSpec(method, url)


def _parse_awf(args: Sequence[str]) -> AwfSpec:
    if not args:
        raise CommandError("awf runner needs a workflow name")
    workflow, rest = args[0], args[1:]
    if workflow.startswith("-"):
        raise CommandError(f"awf workflow name {workflow!r} must not start with '-'")
    inputs: list[str] = []
    i = 0
    while i < len(rest):
        if rest[i] != "--input":
            raise CommandError(f"awf runner: expected --input, got {rest[i]!r}")
        if i + 1 >= len(rest):
            raise CommandError("awf runner: --input needs key=value")
        pair = rest[i + 1]
        key, eq, _ = pair.partition("=")
        if not eq or not key:
            raise CommandError(f"awf runner: input {pair!r} is not key=value")
        inputs.append(pair)
        i += 2
    return AwfSpec(workflow, tuple(inputs))


def _parse_amqp(args: Sequence[str]) -> AmqpSpec:
    if len(args) != 3:
        raise CommandError("amqp runner takes a DSN, an exchange and a routing key")
    dsn, exchange, routing_key = args
    if not (dsn.startswith("amqp://") or dsn.startswith("amqps://")):
        raise CommandError("amqp DSN must start with amqp://")
    _check_host_port("amqp DSN", dsn)
    return AmqpSpec(dsn, exchange, routing_key)


def _parse_redis(args: Sequence[str]) -> RedisSpec:
    if len(args) != 3:
        raise CommandError("redis runner takes a URL, a command and a key")
    url, command, key = args
    if url.startswith("rediss://"):
        raise CommandError("redis URL: rediss:// (TLS) is not supported")
    if not url.startswith("redis://"):
        raise CommandError("redis URL must start with redis://")
    parts = _check_host_port("redis URL", url)
    db = parts.path.lstrip("/")
    if db and not (db.isascii() and db.isdigit()):
        raise CommandError("redis URL: database must be a number")
    if command not in REDIS_COMMANDS:
        raise CommandError(f"redis command {command!r} is not one of {', '.join(REDIS_COMMANDS)}")
    if not key:
        raise CommandError("redis runner needs a key")
    return RedisSpec(url, command, key)


def _split_url(what: str, url: str) -> SplitResult:
    try:
        return urlsplit(url)
    except ValueError as e:  # e.g. an unbalanced "[" or a bad IPv6 literal
        raise CommandError(f"{what} is malformed: {e}") from None


def _check_host_port(what: str, url: str) -> SplitResult:
    parts = _split_url(what, url)
    if not parts.hostname:
        raise CommandError(f"{what} has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise CommandError(f"{what} has an invalid port") from None
    return parts
