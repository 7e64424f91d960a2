"""Property-based tests (hypothesis): hostile input never breaks a layer's contract.

What is covered here, and not already in the per-module tests:

- the command layer: any token list makes ``parse_execution``, ``parse_runner`` and
  ``parse_rule`` either succeed or raise ``CommandError``, nothing else;
- valid rules set over the protocol come back unchanged through ``LISTRULES``;
- the whole line handler (``ZtickProtocol`` on a ``StringTransport``): any line of up
  to 4096 bytes never raises, never closes the connection, answers at most what a
  well-formed request could, and changes nothing unless it was answered ``OK``; with
  AUTH on, an authenticated tenant's arbitrary lines never touch another namespace;
- the tokenizer on arbitrary bytes;
- the codec: mutated payloads decode or raise ``CodecError`` (and whatever decodes
  re-encodes to the same bytes); ``scan`` of arbitrary data never raises and what it
  returns is exactly the frames it consumed.

Round trips of encode/decode for every runner kind are in ``test_codec.py``.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs

from tests.helpers import EPOCH_NS, SECOND_NS, Conn, Harness, make_harness
from ztick_tw.arguments import CommandError, parse_execution, parse_rule, parse_runner
from ztick_tw.auth import Token, TokenStore
from ztick_tw.model import (
    AmqpSpec,
    AwfSpec,
    DirectSpec,
    Entry,
    HttpSpec,
    Job,
    JobRemoval,
    RedisSpec,
    Rule,
    RunnerKind,
    RunnerSpec,
    ShellSpec,
)
from ztick_tw.protocol.server import MAX_LINE_BYTES, ZtickFactory, ZtickProtocol
from ztick_tw.protocol.tokenizer import TokenizeError, decode_line, quote_token, tokenize
from ztick_tw.store.codec import encode, encode_payload
from ztick_tw.store.decoding import decode_payload
from ztick_tw.store.frame import CodecError
from ztick_tw.store.scanning import scan

FUTURE = EPOCH_NS + 3600 * SECOND_NS

# --------------------------------------------------------------------------- tokens

#: Words that steer the parsers down their interesting branches.
_WORDS = [
    "shell",
    "direct",
    "http",
    "awf",
    "amqp",
    "redis",
    "SET",
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "PATCH",
    "PUBLISH",
    "RPUSH",
    "LPUSH",
    "--input",
    "k=v",
    "=v",
    "k=",
    "-wf",
    "",
    " ",
    "0",
    "-1",
    "+1_000",
    "1__0",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "2020-02-29",
    "2023-02-29",
    "1677-09-21",
    "2262-04-12",
    "9999-12-31",
    "0000-01-01",
    "23:59:59",
    "24:00:00",
    "2020-01-01 00:00:00",
    "2020-01-01  00:00:00",
    "2020-01-01 ",
    "http://",
    "http://h",
    "https://[::1]:80/",
    "http://[::1",
    "http://[nothost]/",
    "http://h:99999/",
    "amqp://u:p@h:5672/v",
    "amqp://h:notaport",
    "amqps://",
    "redis://h/0",
    "redis://h/x",
    "redis://[x",
    "rediss://h",
    "redis://:pw@h:6379/15",
    "\u00b2",
    "\uff11",
    "\u0661",
    "\x00",
    "\t",
]
_SCHEMES = ["http://", "https://", "amqp://", "amqps://", "redis://", "rediss://", ""]

_token = st.one_of(
    st.sampled_from(_WORDS),
    st.text(max_size=24),
    st.from_regex(r"[+-]?[0-9_]{0,24}", fullmatch=True),
    st.from_regex(r"[0-9]{1,5}-[0-9]{1,3}-[0-9]{1,3}", fullmatch=True),
    st.from_regex(r"[0-9]{1,3}:[0-9]{1,3}:[0-9]{1,3}", fullmatch=True),
    st.builds(str.__add__, st.sampled_from(_SCHEMES), st.text(max_size=30)),
    st.builds(
        lambda scheme, user, host, port, path: f"{scheme}{user}{host}{port}{path}",
        st.sampled_from(_SCHEMES),
        st.sampled_from(["", "u:p@", ":pw@", "@", "u@"]),
        st.sampled_from(["h", "127.0.0.1", "[::1]", "[v1.x]", "[", "]", "", "h\u2100"]),
        st.sampled_from(["", ":", ":0", ":65535", ":65536", ":-1", ":x", ":\u0661"]),
        st.sampled_from(["", "/", "/0", "/15", "/x", "/\u00b2", "?q#f"]),
    ),
)
_tokens = st.lists(_token, max_size=8)


@given(_tokens)
@example(["9" * 4000])
@example(["2020-01-01 " + "9" * 30])
def test_parse_execution_raises_only_command_error(args: list[str]) -> None:
    """Any SET time arguments give an i64 or a CommandError, never another exception."""
    try:
        value = parse_execution(args)
    except CommandError:
        return
    assert -(2**63) <= value < 2**63


def test_parse_execution_more_digits_than_python_converts() -> None:
    """A timestamp of 4301 digits is out of the i64 range: CommandError, not ValueError."""
    with pytest.raises(CommandError):
        parse_execution(["1" * 4301])


@given(_token, _tokens)
def test_parse_runner_raises_only_command_error(runner: str, args: list[str]) -> None:
    """Any runner word and arguments give a spec of that kind or a CommandError."""
    try:
        spec = parse_runner(runner, args)
    except CommandError:
        return
    assert spec.kind.wire == runner


@given(_token, _token, _token, _tokens)
def test_parse_rule_raises_only_command_error(
    rule_id: str, pattern: str, runner: str, args: list[str]
) -> None:
    """Any RULE SET arguments give a rule with those id and pattern, or a CommandError."""
    try:
        rule = parse_rule(rule_id, pattern, runner, args)
    except CommandError:
        return
    assert (rule.id, rule.pattern, rule.runner.kind.wire) == (rule_id, pattern, runner)


@given(st.binary(max_size=MAX_LINE_BYTES))
@example(b'a "b')
@example(b"\xff")
@example(b"r1 SET \xc3")
def test_decode_and_tokenize_arbitrary_bytes(line: bytes) -> None:
    """Any bytes decode and tokenize or raise TokenizeError carrying whole str tokens."""
    try:
        tokens = tokenize(decode_line(line))
    except TokenizeError as e:
        assert all(isinstance(t, str) for t in e.tokens)
        assert all("\n" not in t for t in e.tokens if b"\n" not in line)
    else:
        assert all(isinstance(t, str) for t in tokens)


# --------------------------------------------------------------------------- valid rules

#: Text that renders as exactly one plain token: no space, quote, newline or CR.
# No NUL: ids, patterns and process arguments with one are refused (they cannot reach a
# child process); test_commands.py checks that refusal.
_plain = st.text(
    st.characters(exclude_characters=' "\n\r\x00', exclude_categories=["Cs"]),
    min_size=1,
    max_size=12,
)
_host = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z0-9]{1,5}){0,2}", fullmatch=True)
_port = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
_path = st.from_regex(r"(/[A-Za-z0-9._~=&?-]{0,10}){0,2}", fullmatch=True)

_valid_runner: st.SearchStrategy[RunnerSpec] = st.one_of(
    st.lists(_plain, min_size=1, max_size=3).map(lambda words: ShellSpec(" ".join(words))),
    st.builds(DirectSpec, _plain, st.lists(_plain, max_size=4).map(tuple)),
    st.builds(
        HttpSpec,
        st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
        st.builds(
            lambda s, h, p, path: f"{s}{h}{p}{path}",
            st.sampled_from(["http://", "https://"]),
            _host,
            _port,
            _path,
        ),
    ),
    st.builds(
        AwfSpec,
        _plain.filter(lambda w: not w.startswith("-")),
        st.lists(
            st.builds(lambda k, v: f"{k}={v}", _plain.filter(lambda k: "=" not in k), _plain),
            max_size=3,
        ).map(tuple),
    ),
    st.builds(
        AmqpSpec,
        st.builds(
            lambda s, h, p, path: f"{s}{h}{p}{path}",
            st.sampled_from(["amqp://", "amqps://"]),
            _host,
            _port,
            _path,
        ),
        _plain,
        _plain,
    ),
    st.builds(
        RedisSpec,
        st.builds(
            lambda h, p, db: f"redis://{h}{p}{db}",
            _host,
            _port,
            st.one_of(st.just(""), st.integers(0, 15).map(lambda d: f"/{d}")),
        ),
        st.sampled_from(["PUBLISH", "RPUSH", "LPUSH", "SET"]),
        _plain,
    ),
)
_valid_rule = st.builds(Rule, _plain, _plain, _valid_runner)


def _request(words: Sequence[str]) -> bytes:
    """One request line from words, each quoted as needed."""
    return (" ".join(quote_token(w) for w in words) + "\n").encode()


@given(st.lists(_valid_rule, min_size=1, max_size=4, unique_by=lambda r: r.id))
@settings(deadline=None)
def test_valid_rules_round_trip_through_listrules(rules: list[Rule]) -> None:
    """Rules set over the wire come back from LISTRULES as lines that parse to them.

    LISTRULES renders a rule raw and space-joined (as ztick does), which is unambiguous
    when no field is empty or holds a space or a quote: the generated rules are such.
    Parsing each line's words again with ``parse_rule`` gives back the same rule, in
    the order the rules were set.
    """
    h = make_harness()
    conn = h.connect()
    for i, rule in enumerate(rules):
        words = [f"s{i}", "RULE", "SET", rule.id, rule.pattern, rule.runner.kind.wire]
        conn.send(_request([*words, *rule.runner.args()]))
        assert conn.take() == f"s{i} OK\n".encode()
    conn.send(b"l LISTRULES\n")
    lines = conn.take().decode().split("\n")
    assert lines[-2:] == ["l OK", ""]
    parsed = []
    for line in lines[:-2]:
        request_id, rule_id, pattern, runner, *args = tokenize(line)
        assert request_id == "l"
        parsed.append(parse_rule(rule_id, pattern, runner, args))
    assert parsed == rules
    assert list(h.scheduler.list_rules()) == rules


# --------------------------------------------------------------------------- protocol

_INSTRUCTIONS = ["SET", "GET", "QUERY", "REMOVE", "RULE", "REMOVERULE", "LISTRULES", "STAT"]
_SEPARATORS = st.sampled_from([" ", "  ", "\t", " \t ", '"', "\\", "\r", "\x00"])


def _structured_line() -> st.SearchStrategy[bytes]:
    """A line that looks like a request: id, a known word, then arbitrary tokens."""
    return st.builds(
        lambda rid, word, rest, seps, crlf: (
            "".join(
                t + s for t, s in zip([rid, word, *rest], seps + [" "] * 10, strict=False)
            ).rstrip(" ")
            + ("\r" if crlf else "")
        ).encode("utf-8", "surrogatepass"),
        st.one_of(st.sampled_from(["r1", "", '"', "a b", "\u00e9", "x" * 300]), _token),
        st.one_of(st.sampled_from(_INSTRUCTIONS), st.sampled_from(["set", "AUTH", "RULE"])),
        st.lists(_token, max_size=7),
        st.lists(_SEPARATORS, max_size=9),
        st.booleans(),
    )


def _mutate(line: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    """``line`` with each ``(position, bytes)`` inserted or overwritten."""
    out = bytearray(line)
    for position, chunk in edits:
        at = position % (len(out) + 1)
        if len(chunk) % 2:
            out[at:at] = chunk
        else:
            out[at : at + len(chunk)] = chunk
    return bytes(out)


_edits = st.lists(
    st.tuples(
        st.integers(0, 10_000),
        st.one_of(
            st.sampled_from(
                [b"\x00", b"\xff", b'"', b"\\", b" ", b"\r", b"\xc3", b"\xed\xa0\x80"]
            ),
            st.binary(min_size=1, max_size=4),
        ),
    ),
    max_size=4,
)

#: Any line the protocol can receive: no newline, at most MAX_LINE_BYTES.
_line = st.one_of(
    st.binary(max_size=MAX_LINE_BYTES),
    st.binary(min_size=MAX_LINE_BYTES - 8, max_size=MAX_LINE_BYTES),
    _structured_line(),
    st.builds(_mutate, _structured_line(), _edits),
).map(lambda b: b.replace(b"\n", b" ")[:MAX_LINE_BYTES])


def _seeded_harness() -> tuple[Harness, Conn]:
    """A harness with a few jobs and rules already set, and a fresh connection."""
    h = make_harness()
    for i in range(3):
        h.scheduler.set_job(f"job.{i}", FUTURE + i)
    h.scheduler.set_rule(Rule("r1", "job.", ShellSpec("true")))
    h.scheduler.set_rule(Rule("r2", "", DirectSpec("/bin/true")))
    return h, h.connect()


def _first_token(line: bytes) -> str | None:
    """The request id the protocol reads from ``line`` (None if it reads none)."""
    try:
        tokens = tokenize(decode_line(line))
    except TokenizeError as e:
        tokens = e.tokens
    return tokens[0] if tokens else None


@given(_line)
@settings(max_examples=400, deadline=None)
@example(b"")
@example(b"r1 SET")
@example(b"r1 SET job.0 garbage")
@example(b'r1 SET "job.0')
@example(b"r1 GET \xff")
@example(b"r1 RULE SET r p shell")
@example(b"r1 RULE GET")
@example(b"AUTH secret")
@example(b"r1 SET j " + b"9" * 4080)
@example(b"r1 QUERY \x00")
def test_any_line_never_raises_never_closes(line: bytes) -> None:
    """Any line of up to 4096 bytes: no exception, no close, a bounded well-formed answer.

    The answer is nothing, or lines that all start with the request id the line
    carries and end with ``OK`` or ``ERROR``: one line for SET, GET, REMOVE, RULE SET
    and REMOVERULE; at most one per job (QUERY) or rule (LISTRULES) plus ``OK``; the
    STAT lines plus ``OK``.  Nothing is stored unless the answer is ``OK``, and no
    unexpected failure is logged.
    """
    h, conn = _seeded_harness()
    stored = len(h.store.entries)
    with capturedLogs() as events:
        conn.send(line + b"\n")
    answer = conn.take()
    assert not conn.closed
    assert not [
        e
        for e in events
        if "log_failure" in e or getattr(e.get("log_level"), "name", "") == "critical"
    ]
    if not answer:
        assert len(h.store.entries) == stored
        return
    assert answer.endswith(b"\n")
    lines = answer[:-1].split(b"\n")
    request_id = _first_token(line)
    assert request_id is not None
    prefix = request_id.encode() + b" "
    assert all(a.startswith(prefix) for a in lines), (line, answer)
    last = lines[-1][len(prefix) :]
    assert last == b"ERROR" or last == b"OK" or last.startswith(b"OK "), answer
    instruction = tokenize(decode_line(line))[1] if last != b"ERROR" else None
    if last == b"ERROR":
        assert len(lines) == 1
    elif instruction == "QUERY":
        assert len(lines) <= len(h.scheduler.jobs) + 1
    elif instruction == "LISTRULES":
        assert len(lines) == len(list(h.scheduler.list_rules())) + 1
    elif instruction == "STAT":
        assert len(lines) == len(h.factory.stats()) + 1
    else:
        assert len(lines) == 1
    if not (last == b"OK" and instruction in ("SET", "REMOVE", "RULE", "REMOVERULE")):
        assert len(h.store.entries) == stored


@given(st.lists(_line, min_size=1, max_size=6))
@settings(max_examples=100, deadline=None)
def test_pipelined_garbage_keeps_the_connection_usable(lines: list[bytes]) -> None:
    """After any burst of hostile lines, a well-formed request on the same connection works."""
    _, conn = _seeded_harness()
    conn.send(b"".join(line + b"\n" for line in lines))
    conn.take()
    assert not conn.closed
    conn.send(b"zz-final STAT\n")
    answer = conn.take().decode("utf-8", "replace")
    assert answer.endswith("zz-final OK\n"), answer


def _tenant(h: Harness) -> Conn:
    """A connection authenticated as a tenant of namespace ``t.`` (AUTH on)."""
    factory = ZtickFactory(
        h.scheduler,
        h.clock,
        persistence="memory",
        tokens=TokenStore([(Token("tenant", "t."), "tenant-secret")]),
    )
    proto = factory.buildProtocol(None)
    assert isinstance(proto, ZtickProtocol)
    conn = Conn(proto, StringTransport())
    proto.makeConnection(conn.transport)
    conn.send(b"AUTH tenant-secret\n")
    assert conn.take() == b"OK\n"
    return conn


@given(st.lists(_line, min_size=1, max_size=4), st.sampled_from(["", "t.", "job.", "r"]))
@settings(max_examples=200, deadline=None)
def test_tenant_lines_never_touch_other_namespaces(lines: list[bytes], prefix: str) -> None:
    """With AUTH on, nothing a tenant sends changes or reveals what lies outside its namespace.

    Jobs and rules of other namespaces are unchanged after any lines (a ``prefix``
    is put in front of the tokens to aim at them), the connection stays open, and no
    QUERY or LISTRULES line of the answer names another namespace's job or rule.
    """
    h = make_harness()
    for i in range(3):
        h.scheduler.set_job(f"job.{i}", FUTURE + i)
    h.scheduler.set_rule(Rule("r1", "job.", ShellSpec("true")))
    before_jobs = list(h.scheduler.query("job."))
    before_rules = list(h.scheduler.list_rules())
    conn = _tenant(h)
    aimed = [line.replace(b" ", b" " + prefix.encode(), 2)[:MAX_LINE_BYTES] for line in lines]
    for line in aimed:
        conn.send(line + b"\n")
    answer = conn.take()
    assert not conn.closed
    assert list(h.scheduler.query("job.")) == before_jobs
    assert [r for r in h.scheduler.list_rules() if not r.id.startswith("t.")] == before_rules
    for secret in (b" job.0 planned ", b" job.1 planned ", b" r1 job. shell "):
        assert secret not in answer


# --------------------------------------------------------------------------- codec

_SAMPLES: list[Entry] = [
    Job("job.1", FUTURE),
    Rule("r", "p.", ShellSpec("echo hi")),
    Rule("a", "n.", AmqpSpec("amqp://h", "ex", "k")),
    Rule("d", "", DirectSpec("/bin/echo", ("a", "bc"))),
    Rule("w", "x", AwfSpec("wf", ("k=v", "l=w"))),
    Rule("h", "y", HttpSpec("GET", "http://z/")),
    Rule("q", "z", RedisSpec("redis://r", "RPUSH", "k")),
    JobRemoval("job.1"),
]


@given(
    st.sampled_from(_SAMPLES),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(-3, 3),
)
@settings(max_examples=500)
def test_mutated_payload_decodes_canonically_or_raises_codec_error(
    entry: Entry, flips: list[tuple[int, int]], resize: int
) -> None:
    """A real payload with bytes changed, cut or extended decodes or raises CodecError.

    Whatever still decodes re-encodes to exactly the same bytes: the decoder accepts
    only canonical payloads, so nothing read from a log is silently altered on rewrite.
    """
    payload = bytearray(encode_payload(entry))
    for index, value in flips:
        payload[index % len(payload)] = value
    if resize < 0:
        del payload[resize:]
    else:
        payload += bytes(resize)
    try:
        decoded = decode_payload(bytes(payload))
    except CodecError as e:
        assert e.reason
        return
    assert encode_payload(decoded) == bytes(payload)


_chunk = st.one_of(
    st.sampled_from(_SAMPLES).map(encode),
    st.binary(max_size=40),
    st.sampled_from(
        [
            b"\x00\x00\x00\x00",
            b"\xff\xff\xff\xff",
            struct.pack(">I", 1 << 20),
            struct.pack(">I", (1 << 20) + 1),
            b"\x00\x00\x00\x03\x03\x00\x00",
            b"\x00" * 64,
        ]
    ),
)


@given(st.one_of(st.binary(max_size=2048), st.lists(_chunk, max_size=12).map(b"".join)))
@settings(max_examples=500)
def test_scan_of_arbitrary_data_never_raises_and_is_exact(data: bytes) -> None:
    """Scanning any bytes never raises; it stops cleanly at a frame boundary it reports.

    The entries returned re-encode to exactly the bytes before ``good_end``, so a
    recovery that keeps them keeps those bytes and nothing invented; the problem, if
    any, starts at ``good_end``; no problem means every byte was used.
    """
    result = scan(data)
    entries = list(result)
    assert result.count == len(entries)
    assert b"".join(encode(e) for e in entries) == data[: result.good_end]
    if result.problem is None:
        assert result.good_end == len(data)
    else:
        assert result.problem.offset == result.good_end
        assert result.problem.end == len(data)
        assert result.problem.kind in ("torn", "corrupt")
        assert result.problem.reason


def test_every_runner_kind_is_sampled() -> None:
    """The codec samples above cover every runner kind (so the mutations reach them all)."""
    kinds = {e.runner.kind for e in _SAMPLES if isinstance(e, Rule)}
    assert kinds == set(RunnerKind)
