"""Tests for ``ztick_tw.arguments``: timestamps, rules and runner arguments."""

from __future__ import annotations

import calendar
from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztick_tw.arguments import (
    CommandError,
    check_identifier,
    check_string,
    parse_datetime_ns,
    parse_execution,
    parse_integer_ns,
    parse_rule,
    parse_runner,
)
from ztick_tw.model import (
    I64_MAX,
    I64_MIN,
    AmqpSpec,
    AwfSpec,
    DirectSpec,
    HttpSpec,
    RedisSpec,
    Rule,
    ShellSpec,
)

NS = 1_000_000_000

# -- integer timestamps ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("1605457800000000000", 1605457800000000000),
        ("-5", -5),
        ("+42", 42),
        ("1_000", 1000),
        ("007", 7),
        (str(I64_MAX), I64_MAX),
        (str(I64_MIN), I64_MIN),
    ],
)
def test_parse_integer_ns_accepts_signed_decimal(text: str, value: int) -> None:
    """Signed decimal i64 values (sign, underscores between digits) parse exactly."""
    assert parse_integer_ns(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "12a",
        "1.5",
        "1e9",
        "0x10",
        " 1",
        "1 ",
        "_1",
        "1_",
        "1__0",
        "--1",
        "+",
        "-",
        "\u0661\u0662\u0663",  # Arabic-Indic digits: not ASCII decimal
        "\uff11\uff12\uff13",  # full-width digits
        "\u00b2",
    ],
)
def test_parse_integer_ns_rejects_garbage(text: str) -> None:
    """Anything that is not an ASCII signed decimal integer is a ``CommandError``."""
    with pytest.raises(CommandError):
        parse_integer_ns(text)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_parse_integer_ns_rejects_out_of_i64(value: int) -> None:
    """Values outside the signed 64-bit range are refused with a message saying so."""
    with pytest.raises(CommandError, match="signed 64-bit"):
        parse_integer_ns(str(value))


@given(st.integers(min_value=I64_MIN, max_value=I64_MAX))
def test_parse_integer_ns_round_trips_every_i64(value: int) -> None:
    """Every i64 written in decimal parses back to itself."""
    assert parse_integer_ns(str(value)) == value


# -- datetime timestamps -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("date", "time", "value"),
    [
        ("2020-11-15", "16:30:00", 1605457800 * NS),
        ("1970-01-01", "00:00:00", 0),
        ("2024-02-29", "23:59:59", calendar.timegm((2024, 2, 29, 23, 59, 59)) * NS),
        ("2000-02-29", "12:00:00", calendar.timegm((2000, 2, 29, 12, 0, 0)) * NS),
        ("1969-12-31", "23:59:59", -NS),
        ("2262-04-11", "23:47:16", 9223372036000000000),
    ],
)
def test_parse_datetime_ns_is_utc(date: str, time: str, value: int) -> None:
    """``YYYY-MM-DD HH:MM:SS`` is read as UTC and returned in nanoseconds."""
    assert parse_datetime_ns(date, time) == value


@pytest.mark.parametrize(
    ("date", "time"),
    [
        ("2023-02-29", "00:00:00"),  # not a leap year
        ("1900-02-29", "00:00:00"),  # century, not a leap year
        ("2023-13-01", "00:00:00"),  # 13th month
        ("2023-00-10", "00:00:00"),
        ("2023-04-31", "00:00:00"),
        ("2023-01-00", "00:00:00"),
        ("2023-01-32", "00:00:00"),
        ("0000-01-01", "00:00:00"),
        ("2023-01-01", "24:00:00"),
        ("2023-01-01", "23:60:00"),
        ("2023-01-01", "23:59:60"),
        ("2023-1-01", "00:00:00"),
        ("2023-01-01", "0:00:00"),
        ("2023/01/01", "00:00:00"),
        ("2023-01-01", "00-00-00"),
        ("2023-01-01", "00:00:00Z"),
        ("2023-01-01T", "00:00:00"),
        ("\uff12\uff10\uff12\uff13-01-01", "00:00:00"),  # full-width digits
        ("2023-01-01", "\uff11\uff12:00:00"),
        ("2262-04-12", "00:00:00"),  # past the i64 nanosecond range
        ("1677-09-21", "00:00:00"),  # before it
    ],
)
def test_parse_datetime_ns_rejects_invalid(date: str, time: str) -> None:
    """Malformed or impossible dates and times are a ``CommandError``."""
    with pytest.raises(CommandError):
        parse_datetime_ns(date, time)


def test_parse_datetime_error_names_the_bad_part() -> None:
    """The error message says which part (date, month, day, time) was wrong."""
    with pytest.raises(CommandError, match="month 13"):
        parse_datetime_ns("2023-13-01", "00:00:00")
    with pytest.raises(CommandError, match="day 29"):
        parse_datetime_ns("2023-02-29", "00:00:00")
    with pytest.raises(CommandError, match="24:00:00"):
        parse_datetime_ns("2023-01-01", "24:00:00")
    with pytest.raises(CommandError, match="not HH:MM:SS"):
        parse_datetime_ns("2023-01-01", "noon")


# -- SET time arguments ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "value"),
    [
        (["1605457800000000000"], 1605457800000000000),
        (["-1"], -1),
        (["123", "456"], 123),
        (["123", "extra", "args"], 123),
        (["2020-11-15", "16:30:00"], 1605457800 * NS),
        (["2020-11-15", "16:30:00", "ignored"], 1605457800 * NS),
        (["2020-11-15 16:30:00"], 1605457800 * NS),
        (["2020-11-15 16:30:00", "ignored"], 1605457800 * NS),
        ([str(I64_MAX)], I64_MAX),
    ],
)
def test_parse_execution_forms(args: list[str], value: int) -> None:
    """SET's time is ns, a two-token datetime, or one quoted datetime; extras ignored."""
    assert parse_execution(args) == value


@pytest.mark.parametrize(
    "args",
    [
        [],
        [""],
        ["garbage"],
        [str(2**63)],
        ["2020-01-01"],
        ["2020-01-01", "garbage"],
        ["2023-02-29", "00:00:00"],
        ["2023-13-01", "00:00:00"],
        ["2023-01-01", "24:00:00"],
        ["2023-02-29 00:00:00"],
        ["2020-01-01 "],
        ["12:00:00", "2020-01-01"],
        ["1 2"],
    ],
)
def test_parse_execution_rejects(args: list[str]) -> None:
    """Bad SET times raise ``CommandError`` (ztick stored 0: fixed)."""
    with pytest.raises(CommandError):
        parse_execution(args)


# -- strings --------------------------------------------------------------------------------


def test_check_string_limits_utf8_bytes() -> None:
    """A string of up to 65535 UTF-8 bytes passes, one byte more fails."""
    assert check_string("x", "a" * 65535) == "a" * 65535
    with pytest.raises(CommandError, match="x is longer than 65535"):
        check_string("x", "a" * 65536)
    # 3 bytes per character: 21845 chars = 65535 bytes, one more char is too long
    assert check_string("x", "€" * 21845)
    with pytest.raises(CommandError):
        check_string("x", "€" * 21846)


def test_check_identifier_refuses_nul_naming_the_offset() -> None:
    """An id with a NUL byte is refused with where it is (it cannot reach a child's env)."""
    assert check_identifier("job identifier", "a.b") == "a.b"
    with pytest.raises(CommandError, match="job identifier contains a NUL byte at offset 3"):
        check_identifier("job identifier", "abc\x00d")


def test_parse_rule_refuses_nul_in_ids_and_process_arguments() -> None:
    """NUL in a rule id, a pattern, or a process runner's argument is refused at RULE SET."""
    with pytest.raises(CommandError, match="rule id contains a NUL"):
        parse_rule("r\x00", "p", "shell", ["c"])
    with pytest.raises(CommandError, match="pattern contains a NUL"):
        parse_rule("r", "p\x00", "shell", ["c"])
    with pytest.raises(CommandError, match="runner argument 2 contains a NUL"):
        parse_rule("r", "p", "direct", ["/bin/echo", "a\x00b"])
    with pytest.raises(CommandError, match="runner argument 1 contains a NUL"):
        parse_rule("r", "p", "shell", ["echo \x00"])


# -- rules and runners ----------------------------------------------------------------------


def test_parse_rule_builds_a_rule() -> None:
    """``parse_rule`` returns a ``Rule`` with the parsed runner spec."""
    assert parse_rule("r1", "backup.", "shell", ["echo hi"]) == Rule(
        "r1", "backup.", ShellSpec("echo hi")
    )
    assert parse_rule("r2", "", "direct", ["/bin/true"]) == Rule("r2", "", DirectSpec("/bin/true"))


def test_parse_rule_checks_string_lengths() -> None:
    """Rule id, pattern and every runner argument must fit the logfile's u16 strings."""
    big = "x" * 65536
    with pytest.raises(CommandError, match="rule id"):
        parse_rule(big, "p", "shell", ["c"])
    with pytest.raises(CommandError, match="pattern"):
        parse_rule("r", big, "shell", ["c"])
    with pytest.raises(CommandError, match="runner argument 2"):
        parse_rule("r", "p", "direct", ["exe", big])


@pytest.mark.parametrize(
    ("runner", "args", "spec"),
    [
        ("shell", ["echo hi"], ShellSpec("echo hi")),
        ("shell", ["echo", "hi"], ShellSpec("echo hi")),
        ("direct", ["/bin/echo"], DirectSpec("/bin/echo", ())),
        ("direct", ["/bin/echo", "a;b", "$(x)", ""], DirectSpec("/bin/echo", ("a;b", "$(x)", ""))),
        ("http", ["GET", "http://example.com/x"], HttpSpec("GET", "http://example.com/x")),
        ("http", ["POST", "https://h:8443/p?q=1"], HttpSpec("POST", "https://h:8443/p?q=1")),
        ("http", ["PUT", "http://127.0.0.1/"], HttpSpec("PUT", "http://127.0.0.1/")),
        ("http", ["DELETE", "http://[::1]:80/"], HttpSpec("DELETE", "http://[::1]:80/")),
        ("awf", ["wf"], AwfSpec("wf", ())),
        (
            "awf",
            ["wf", "--input", "a=1", "--input", "b=x=y"],
            AwfSpec("wf", ("a=1", "b=x=y")),
        ),
        ("awf", ["wf", "--input", "k="], AwfSpec("wf", ("k=",))),
        (
            "amqp",
            ["amqp://u:p@h:5672/v", "ex", "rk"],
            AmqpSpec("amqp://u:p@h:5672/v", "ex", "rk"),
        ),
        ("amqp", ["amqp://h", "", "rk"], AmqpSpec("amqp://h", "", "rk")),
        (
            "redis",
            ["redis://h:6379/2", "PUBLISH", "chan"],
            RedisSpec("redis://h:6379/2", "PUBLISH", "chan"),
        ),
        ("redis", ["redis://:pw@h", "RPUSH", "k"], RedisSpec("redis://:pw@h", "RPUSH", "k")),
        ("redis", ["redis://h", "LPUSH", "k"], RedisSpec("redis://h", "LPUSH", "k")),
        ("redis", ["redis://h", "SET", "k"], RedisSpec("redis://h", "SET", "k")),
    ],
)
def test_parse_runner_accepts(runner: str, args: Sequence[str], spec: object) -> None:
    """Valid runner arguments give the matching spec."""
    assert parse_runner(runner, args) == spec


@pytest.mark.parametrize(
    ("runner", "args", "reason"),
    [
        ("bash", ["x"], "unknown runner"),
        ("SHELL", ["x"], "unknown runner"),
        ("shell", [], "needs a command"),
        ("direct", [], "needs an executable"),
        # http
        ("http", [], "method and a URL"),
        ("http", ["GET"], "method and a URL"),
        ("http", ["get", "http://h/"], "method"),
        ("http", ["PATCH", "http://h/"], "method"),
        ("http", ["GET", "ftp://h/"], "http:// or https://"),
        ("http", ["GET", "HTTP://h/"], "http:// or https://"),
        ("http", ["GET", "h/path"], "http:// or https://"),
        ("http", ["GET", "http://"], "no host"),
        ("http", ["GET", "http://[::1"], "http URL"),
        ("http", ["GET", "http://[nothost]/"], "http URL"),
        # awf
        ("awf", [], "workflow"),
        ("awf", ["--input", "a=1"], "must not start with '-'"),
        ("awf", ["wf", "--input"], "--input needs key=value"),
        ("awf", ["wf", "--input", "novalue"], "not key=value"),
        ("awf", ["wf", "--input", "=v"], "not key=value"),
        ("awf", ["wf", "--flag", "a=1"], "expected --input"),
        ("awf", ["wf", "a=1"], "expected --input"),
        ("awf", ["wf", "--input", "a=1", "--input"], "--input needs"),
        # amqp
        ("amqp", ["amqp://h", "ex"], "DSN, an exchange and a routing key"),
        ("amqp", ["http://h", "ex", "rk"], "amqp://"),
        ("amqp", ["amqp://", "ex", "rk"], "no host"),
        ("amqp", ["amqp://h:notaport", "ex", "rk"], "invalid port"),
        ("amqp", ["amqp://h:99999", "ex", "rk"], "invalid port"),
        ("amqp", ["amqp://[::1", "ex", "rk"], "amqp DSN"),
        # redis
        ("redis", ["redis://h", "PUBLISH"], "URL, a command and a key"),
        ("redis", ["rediss://h", "PUBLISH", "k"], "rediss://"),
        ("redis", ["http://h", "PUBLISH", "k"], "redis://"),
        ("redis", ["redis://", "PUBLISH", "k"], "no host"),
        ("redis", ["redis://h:x", "PUBLISH", "k"], "invalid port"),
        ("redis", ["redis://h/db", "PUBLISH", "k"], "database"),
        ("redis", ["redis://h/\u00b2", "PUBLISH", "k"], "database"),
        ("redis", ["redis://h", "GET", "k"], "command"),
        ("redis", ["redis://h", "publish", "k"], "command"),
        ("redis", ["redis://h", "PUBLISH", ""], "key"),
        ("redis", ["redis://[x", "PUBLISH", "k"], "redis URL"),
    ],
)
def test_parse_runner_rejects(runner: str, args: Sequence[str], reason: str) -> None:
    """Invalid runner arguments raise ``CommandError`` with a message saying what is wrong."""
    with pytest.raises(CommandError) as info:
        parse_runner(runner, args)
    assert reason in str(info.value)
