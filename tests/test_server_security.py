"""Security and limits of the line protocol (SPEC §3, issue 3 §1 and §3).

AUTH with namespaces, the AUTH and idle timeouts, the connection cap and back-pressure,
on a ``StringTransport`` with a ``Clock`` (plus real TCP on 127.0.0.1 where the kernel's
buffers are the point).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import ClassVar, cast

import pytest
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.tcp import Port, Server
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.helpers import EPOCH_NS, SECOND_NS, Conn, FakeStore, Harness, make_harness
from ztick_tw.auth import Token, TokenStore
from ztick_tw.model import Job, JobStatus, Rule, ShellSpec
from ztick_tw.protocol import server
from ztick_tw.protocol.server import MAX_WAITING_ANSWERS, ZtickFactory, ZtickProtocol
from ztick_tw.protocol.tokenizer import quote_token
from ztick_tw.scheduler.core import Scheduler
from ztick_tw.store.base import StoreError

FUTURE = EPOCH_NS + 3600 * SECOND_NS
REACTOR_TCP = cast(IReactorTCP, reactor)
REACTOR_TIME = cast(IReactorTime, reactor)

ALPHA_SECRET = "alpha-5ecret-9d1e"
BETA_SECRET = "beta-5ecret-0a77"
ROOT_SECRET = "root-5ecret-4b7c"
SPACED_SECRET = "two words 5ecret"
SECRETS = (ALPHA_SECRET, BETA_SECRET, ROOT_SECRET, SPACED_SECRET)


def tokens() -> TokenStore:
    """Tokens alpha (``a.``), beta (``b.``), root (``*``) and one secret with spaces (``s.``)."""
    return TokenStore(
        [
            (Token("alpha", "a."), ALPHA_SECRET),
            (Token("beta", "b."), BETA_SECRET),
            (Token("root", "*"), ROOT_SECRET),
            (Token("spaced", "s."), SPACED_SECRET),
        ]
    )


def secured(*, hold: bool = False) -> Harness:
    """A harness whose factory requires AUTH with ``tokens()``."""
    h = make_harness(hold=hold)
    h.factory.tokens = tokens()
    return h


def authed(h: Harness, secret: str = ALPHA_SECRET) -> Conn:
    """A new connection that has sent ``AUTH <secret>`` and got ``OK``."""
    conn = h.connect()
    conn.send(f"AUTH {quote_token(secret)}\n".encode())
    assert conn.take() == b"OK\n"
    return conn


def calls(h: Harness) -> set[IDelayedCall]:
    """The delayed calls pending on the harness clock."""
    return set(h.clock.getDelayedCalls())


def leaks_secret(events: list[LogEvent]) -> list[str]:
    """Every captured event (formatted and raw) that contains one of ``SECRETS``."""
    found = []
    for event in events:
        for text in (formatEvent(event), repr(event)):
            if any(secret in text for secret in (*SECRETS, "wrong-guess-31")):
                found.append(text)
    return found


# -- AUTH -------------------------------------------------------------------------------


def test_auth_ok_then_requests_work() -> None:
    """``AUTH <secret>`` answers a bare ``OK``; requests inside the namespace then work."""
    h = secured()
    conn = h.connect()
    conn.send(f"AUTH {ALPHA_SECRET}\n".encode())
    assert conn.take() == b"OK\n"
    conn.send(f"r1 SET a.1 {FUTURE}\nr2 GET a.1\n".encode())
    assert conn.take() == f"r1 OK\nr2 OK planned {FUTURE}\n".encode()
    assert not conn.closed
    assert h.store.entries == [Job("a.1", FUTURE, JobStatus.PLANNED)]


def test_auth_quoted_secret_with_spaces() -> None:
    """A secret with spaces is sent as one quoted token."""
    h = secured()
    conn = h.connect()
    conn.send(f'AUTH "{SPACED_SECRET}"\nr SET s.1 {FUTURE}\n'.encode())
    assert conn.take() == b"OK\nr OK\n"


def test_auth_split_over_chunks() -> None:
    """An AUTH line that arrives in pieces is read as one line."""
    h = secured()
    conn = h.connect()
    line = f"AUTH {ALPHA_SECRET}\n".encode()
    for i in range(len(line)):
        conn.send(line[i : i + 1])
    assert conn.take() == b"OK\n"


@pytest.mark.parametrize(
    "secret", ["wrong-guess-31", ALPHA_SECRET[:-1], ALPHA_SECRET + "x", ALPHA_SECRET.upper()]
)
def test_wrong_secret_gets_error_and_close(secret: str) -> None:
    """A wrong secret (also a prefix or extension of a real one) gets ``ERROR``, then close."""
    h = secured()
    conn = h.connect()
    conn.send(f"AUTH {secret}\n".encode())
    assert conn.take() == b"ERROR\n"
    assert conn.closed
    conn.send(f"r SET a.1 {FUTURE}\n".encode())
    assert conn.take() == b""
    assert h.store.entries == []


@pytest.mark.parametrize(
    "line",
    [
        f"r1 SET a.1 {FUTURE}".encode(),
        b"r1 STAT",
        b"r1 QUERY",
        b"junk",
        b"AUTH",
        b'AUTH ""',
        f"auth {ALPHA_SECRET}".encode(),
        f"r1 AUTH {ALPHA_SECRET}".encode(),
        f"PASS {ALPHA_SECRET}".encode(),
        b"AUTH \xff",
        f"AUTH\t{ALPHA_SECRET}".encode(),
    ],
)
def test_anything_but_auth_first_gets_error_and_close(line: bytes) -> None:
    """A first line that is not ``AUTH <secret>`` gets a bare ``ERROR`` and is closed."""
    h = secured()
    conn = h.connect()
    conn.send(line + b"\n")
    assert conn.take() == b"ERROR\n"
    assert conn.closed
    assert h.store.entries == []


def test_lines_pipelined_after_a_refused_first_line_are_not_served() -> None:
    """After the refused first line, the rest of the chunk (even a good AUTH) is ignored."""
    h = secured()
    conn = h.connect()
    conn.send(f"r1 SET a.1 {FUTURE}\nAUTH {ALPHA_SECRET}\nr2 SET a.2 {FUTURE}\n".encode())
    assert conn.take() == b"ERROR\n"
    assert conn.closed
    assert len(h.scheduler.jobs) == 0


def test_blank_lines_before_auth_are_ignored() -> None:
    r"""Empty, space-only and ``\r`` lines before AUTH are skipped, not refused."""
    h = secured()
    conn = h.connect()
    conn.send(b"\n   \n\r\n")
    assert conn.take() == b""
    assert not conn.closed
    conn.send(f"AUTH {ALPHA_SECRET}\r\n".encode())
    assert conn.take() == b"OK\n"


def test_pipelined_auth_and_requests_in_one_chunk() -> None:
    r"""``AUTH s\nr1 SET ...\n...`` in one chunk: OK, then every answer in order."""
    h = secured()
    conn = h.connect()
    conn.send(
        f"AUTH {ALPHA_SECRET}\nr1 SET a.1 {FUTURE}\nr2 GET a.1\nr3 SET b.1 {FUTURE}\n"
        "r4 QUERY\n".encode()
    )
    assert (
        conn.take()
        == (
            f"OK\nr1 OK\nr2 OK planned {FUTURE}\nr3 ERROR\nr4 a.1 planned {FUTURE}\nr4 OK\n"
        ).encode()
    )


def test_second_auth_does_not_change_identity() -> None:
    """After AUTH, ``AUTH <other secret>`` is an unknown line: no answer, same namespace."""
    h = secured()
    conn = authed(h, ALPHA_SECRET)
    conn.send(f"AUTH {ROOT_SECRET}\nr SET b.1 {FUTURE}\n".encode())
    assert conn.take() == b"r ERROR\n"
    assert not conn.closed
    assert h.scheduler.get_job("b.1") is None


def test_auth_timeout_closes_at_exactly_five_seconds() -> None:
    """Without AUTH, the connection is closed 5 s after it opened, not a moment before."""
    h = secured()
    assert h.factory.auth_timeout == 5.0
    conn = h.connect()
    h.clock.advance(4.999)
    assert not conn.closed
    h.clock.advance(0.001)
    assert conn.closed
    assert conn.take() == b""


def test_blank_lines_do_not_extend_the_auth_timeout() -> None:
    """Blank lines keep nobody connected: the 5 s run from connect."""
    h = secured()
    conn = h.connect()
    for _ in range(4):
        h.clock.advance(1)
        conn.send(b"\n")
    assert not conn.closed
    h.clock.advance(1)
    assert conn.closed


def test_auth_timeout_logged_without_secrets() -> None:
    """The AUTH timeout is logged (at info) naming the timeout."""
    h = secured()
    h.connect()
    with capturedLogs() as events:
        h.clock.advance(5)
    assert any("no AUTH" in formatEvent(e) and "5s" in formatEvent(e) for e in events)


def test_no_delayed_call_remains_after_auth() -> None:
    """A successful AUTH cancels the AUTH timer; nothing closes the connection later."""
    h = secured()
    before = calls(h)
    conn = h.connect()
    assert len(calls(h) - before) == 1
    conn.send(f"AUTH {ALPHA_SECRET}\n".encode())
    assert conn.take() == b"OK\n"
    assert calls(h) == before
    h.clock.advance(3600)
    assert not conn.closed


def test_no_delayed_call_remains_after_disconnect() -> None:
    """A client that leaves before AUTH leaves no timer behind."""
    h = secured()
    before = calls(h)
    conn = h.connect()
    h.clock.advance(2)
    h.disconnect(conn)
    assert calls(h) == before
    assert h.factory.connections == 0
    h.clock.advance(10)
    assert not conn.closed


def test_no_delayed_call_after_failed_auth_and_disconnect() -> None:
    """A refused AUTH, then the transport's close: no timer remains."""
    h = secured()
    before = calls(h)
    conn = h.connect()
    conn.send(b"AUTH wrong-guess-31\n")
    assert conn.closed
    h.disconnect(conn)
    assert calls(h) == before
    assert h.factory.connections == 0


def test_auth_off_needs_no_auth_and_auth_line_is_ignored() -> None:
    """Without tokens, requests work at once; an ``AUTH`` line gets no answer, no close."""
    h = make_harness()
    before = calls(h)
    conn = h.connect()
    assert calls(h) == before
    conn.send(f"AUTH {ALPHA_SECRET}\nr SET b.1 {FUTURE}\n".encode())
    assert conn.take() == b"r OK\n"
    assert not conn.closed


# -- namespaces -------------------------------------------------------------------------


def seeded(hold: bool = False) -> Harness:
    """A secured harness with jobs and rules in several namespaces, set by root."""
    h = secured(hold=hold)
    root = authed(h, ROOT_SECRET)
    root.send(
        "".join(
            f"s SET {job} {FUTURE}\n" for job in ("a", "a.1", "a.2", "ab.1", "b.1", "b.2", "x")
        ).encode()
        + b"r RULE SET a.r1 a.x shell true\n"
        + b"r RULE SET a.r2 b. shell true\n"
        + b"r RULE SET b.r3 a. shell true\n"
        + b'r RULE SET all "" shell true\n'
        + b"r RULE SET b.r4 b. shell true\n"
    )
    assert root.take() == b"s OK\n" * 7 + b"r OK\n" * 5
    return h


def answers(h: Harness, secret: str, request: str) -> bytes:
    """What an authenticated connection gets for one request."""
    conn = authed(h, secret)
    conn.send(f"{request}\n".encode())
    out = conn.take()
    assert not conn.closed
    return out


@pytest.mark.parametrize(
    ("request_line", "answer"),
    [
        (f"r SET a.3 {FUTURE}", b"r OK\n"),
        (f"r SET a. {FUTURE}", b"r OK\n"),
        (f"r SET a.1 {FUTURE + 1}", b"r OK\n"),
        (f"r SET b.3 {FUTURE}", b"r ERROR\n"),
        (f"r SET a {FUTURE}", b"r ERROR\n"),
        (f"r SET ab.2 {FUTURE}", b"r ERROR\n"),
        (f'r SET "" {FUTURE}', b"r ERROR\n"),
        (f"r SET b.1 {FUTURE + 1}", b"r ERROR\n"),
    ],
)
def test_set_namespace(request_line: str, answer: bytes) -> None:
    """SET inside the namespace works; outside it answers ``ERROR`` and stores nothing."""
    h = seeded()
    entries = list(h.store.entries)
    jobs = dict((j, (s, n)) for j, s, n in h.scheduler.query(""))
    assert answers(h, ALPHA_SECRET, request_line) == answer
    if answer == b"r ERROR\n":
        assert h.store.entries == entries
        assert dict((j, (s, n)) for j, s, n in h.scheduler.query("")) == jobs
    else:
        assert len(h.store.entries) == len(entries) + 1


@pytest.mark.parametrize(
    ("request_line", "answer"),
    [
        ("r GET a.1", f"r OK planned {FUTURE}\n".encode()),
        ("r GET b.1", b"r ERROR\n"),
        ("r GET a", b"r ERROR\n"),
        ("r GET ab.1", b"r ERROR\n"),
        ("r GET x", b"r ERROR\n"),
    ],
)
def test_get_namespace(request_line: str, answer: bytes) -> None:
    """GET of a job outside the namespace answers ``ERROR`` although the job exists."""
    assert answers(seeded(), ALPHA_SECRET, request_line) == answer


@pytest.mark.parametrize(
    ("job", "allowed"), [("a.1", True), ("b.1", False), ("a", False), ("ab.1", False)]
)
def test_remove_namespace(job: str, allowed: bool) -> None:
    """REMOVE outside the namespace answers ``ERROR`` and the job stays."""
    h = seeded()
    entries = list(h.store.entries)
    out = answers(h, ALPHA_SECRET, f"r REMOVE {job}")
    if allowed:
        assert out == b"r OK\n"
        assert h.scheduler.get_job(job) is None
    else:
        assert out == b"r ERROR\n"
        assert h.scheduler.get_job(job) == (JobStatus.PLANNED, FUTURE)
        assert h.store.entries == entries


@pytest.mark.parametrize(
    ("rule", "pattern", "allowed"),
    [
        ("a.new", "a.", True),
        ("a.new", "a.sub.", True),
        ("a.r1", "a.y", True),  # replaces its own rule
        ("b.new", "a.", False),  # id outside
        ("a.new", "b.", False),  # id inside, pattern outside: would fire b.* jobs
        ("a.new", "a", False),  # pattern wider than the namespace (matches ab.1)
        ("a.new", '""', False),  # the empty pattern matches every job
        ("a.new", "ab.", False),
        ("b.r3", "a.", False),  # replacing another tenant's rule
    ],
)
def test_rule_set_namespace(rule: str, pattern: str, allowed: bool) -> None:
    """RULE SET checks both the rule id and its pattern against the namespace."""
    h = seeded()
    before = [(r.id, r.pattern) for r in h.scheduler.list_rules()]
    entries = list(h.store.entries)
    out = answers(h, ALPHA_SECRET, f"r RULE SET {rule} {pattern} shell true")
    if allowed:
        assert out == b"r OK\n"
        assert h.store.entries[-1] == Rule(rule, pattern, ShellSpec("true"))
    else:
        assert out == b"r ERROR\n"
        assert [(r.id, r.pattern) for r in h.scheduler.list_rules()] == before
        assert h.store.entries == entries


def test_tenant_cannot_replace_a_rule_whose_pattern_is_outside() -> None:
    """RULE SET over an existing rule id whose pattern is outside the namespace: ERROR."""
    h = seeded()
    assert answers(h, ALPHA_SECRET, "r RULE SET a.r2 a. shell true") == b"r ERROR\n"
    assert h.scheduler.rules.get("a.r2") is not None
    assert h.scheduler.rules.get("a.r2").pattern == "b."  # type: ignore[union-attr]


def test_rule_set_empty_pattern_allowed_for_star_token() -> None:
    """The ``*`` token may set a rule with the empty pattern (it matches everything)."""
    h = secured()
    assert answers(h, ROOT_SECRET, 'r RULE SET any "" shell true') == b"r OK\n"


@pytest.mark.parametrize(
    ("rule", "allowed"), [("a.r1", True), ("a.r2", False), ("b.r3", False), ("all", False)]
)
def test_removerule_namespace(rule: str, allowed: bool) -> None:
    """REMOVERULE checks the rule id, and the pattern of the rule it would remove.

    ``a.r2`` has an id inside ``a.`` but a pattern outside (set by the ``*`` token): the
    tenant cannot see it in LISTRULES, so it may not remove or replace it either.
    """
    h = seeded()
    out = answers(h, ALPHA_SECRET, f"r REMOVERULE {rule}")
    ids = [r.id for r in h.scheduler.list_rules()]
    if allowed:
        assert out == b"r OK\n"
        assert rule not in ids
    else:
        assert out == b"r ERROR\n"
        assert rule in ids


def test_denied_requests_are_logged_with_the_token_name() -> None:
    """A refused request is logged naming the id, the namespace and the token (not secret)."""
    h = seeded()
    with capturedLogs() as events:
        answers(h, ALPHA_SECRET, f"r SET b.9 {FUTURE}")
    texts = [formatEvent(e) for e in events]
    assert any("b.9" in t and "'a.'" in t and "alpha" in t for t in texts), texts
    assert not leaks_secret(list(events))


def query_ids(out: bytes, request_id: str = "q") -> list[str]:
    """The job ids of a QUERY answer, checking that it ends with ``OK``."""
    lines = out.decode().splitlines()
    assert lines[-1] == f"{request_id} OK"
    return [line.split(" ")[1] for line in lines[:-1]]


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (None, ["a.1", "a.2"]),
        ('""', ["a.1", "a.2"]),
        ("a.", ["a.1", "a.2"]),
        ("a.1", ["a.1"]),
        ("a.9", []),
        ("a", ["a.1", "a.2"]),  # wider than the namespace: narrowed to it (not a, ab.1)
        ("b", []),
        ("b.", []),
        ("ab", []),
        ("x", []),
    ],
)
def test_query_only_returns_jobs_inside_the_namespace(
    prefix: str | None, expected: list[str]
) -> None:
    """QUERY with no prefix, inside, wider or outside: only in-namespace jobs come back."""
    h = seeded()
    request = "q QUERY" if prefix is None else f"q QUERY {prefix}"
    assert query_ids(answers(h, ALPHA_SECRET, request)) == expected


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [(None, ["a", "a.1", "a.2", "ab.1", "b.1", "b.2", "x"]), ("a", ["a", "a.1", "a.2", "ab.1"])],
)
def test_star_token_queries_everything(prefix: str | None, expected: list[str]) -> None:
    """The ``*`` token's QUERY is not filtered."""
    h = seeded()
    request = "q QUERY" if prefix is None else f"q QUERY {prefix}"
    assert sorted(query_ids(answers(h, ROOT_SECRET, request))) == expected


def test_broker_credentials_are_shown_only_inside_the_rules_namespace() -> None:
    """A redis/amqp/http rule's URL, with its password, is listed only to its namespace."""
    h = seeded()
    root = authed(h, ROOT_SECRET)
    root.send(
        b"r RULE SET b.mq b.mq. amqp amqp://u:amqp-pw@10.0.0.5/ ex key\n"
        b"r RULE SET b.rd b.rd. redis redis://:redis-pw@10.0.0.5/1 RPUSH q\n"
        b"r RULE SET b.wh b.wh. http POST https://u:hook-pw@hooks.example/x?t=tok\n"
    )
    assert root.take() == b"r OK\n" * 3
    outside = answers(h, ALPHA_SECRET, "l LISTRULES")
    inside = answers(h, BETA_SECRET, "l LISTRULES")
    for secret in (b"amqp-pw", b"redis-pw", b"hook-pw", b"tok"):
        assert secret not in outside
        assert secret in inside


def test_listrules_only_shows_rules_inside_the_namespace() -> None:
    """LISTRULES shows a rule only when both its id and its pattern are inside."""
    h = seeded()
    assert answers(h, ALPHA_SECRET, "l LISTRULES") == b"l a.r1 a.x shell true\nl OK\n"
    assert answers(h, BETA_SECRET, "l LISTRULES") == b"l b.r4 b. shell true\nl OK\n"
    assert answers(h, SPACED_SECRET, "l LISTRULES") == b"l OK\n"


def test_star_token_lists_every_rule() -> None:
    """The ``*`` token sees every rule, the empty pattern included."""
    h = seeded()
    assert answers(h, ROOT_SECRET, "l LISTRULES") == (
        b"l a.r1 a.x shell true\nl a.r2 b. shell true\nl b.r3 a. shell true\n"
        b"l all  shell true\nl b.r4 b. shell true\nl OK\n"  # rendered raw, as ztick does
    )


def test_star_token_reaches_every_job() -> None:
    """The ``*`` token can GET, SET and REMOVE jobs of any namespace."""
    h = seeded()
    conn = authed(h, ROOT_SECRET)
    conn.send(f"g GET b.1\ns SET zz {FUTURE}\nd REMOVE a.1\n".encode())
    assert conn.take() == f"g OK planned {FUTURE}\ns OK\nd OK\n".encode()


def test_stat_is_allowed_and_counts_all() -> None:
    """STAT works for a namespaced token and shows auth on and the daemon-wide counts."""
    h = seeded()
    out = answers(h, ALPHA_SECRET, "s STAT").decode().splitlines()
    values = dict(line.split(" ")[1:3] for line in out[:-1])
    assert out[-1] == "s OK"
    assert values["auth_enabled"] == "1"
    assert values["jobs_total"] == "7"
    assert values["rules_total"] == "5"


def test_requests_of_two_tenants_do_not_mix() -> None:
    """Two connections with different tokens each see and touch only their own jobs."""
    h = secured()
    alpha = authed(h, ALPHA_SECRET)
    beta = authed(h, BETA_SECRET)
    alpha.send(f"1 SET a.j {FUTURE}\n2 SET b.j {FUTURE}\n".encode())
    beta.send(f"1 SET b.j {FUTURE}\n2 SET a.j {FUTURE + 1}\n".encode())
    assert alpha.take() == b"1 OK\n2 ERROR\n"
    assert beta.take() == b"1 OK\n2 ERROR\n"
    alpha.send(b"q QUERY\n")
    beta.send(b"q QUERY\n")
    assert query_ids(alpha.take()) == ["a.j"]
    assert query_ids(beta.take()) == ["b.j"]
    assert h.scheduler.get_job("a.j") == (JobStatus.PLANNED, FUTURE)


# -- secrets never logged ---------------------------------------------------------------


def test_secret_not_logged_on_success() -> None:
    """A successful AUTH logs the token's name and namespace, never the secret."""
    h = secured()
    with capturedLogs() as events:
        conn = authed(h, ALPHA_SECRET)
        conn.send(f"r SET a.1 {FUTURE}\nr SET b.1 {FUTURE}\nr FOO bar\n".encode())
        h.disconnect(conn)
    texts = [formatEvent(e) for e in events]
    assert any("alpha" in t and "authenticated" in t for t in texts), texts
    assert not leaks_secret(list(events))


@pytest.mark.parametrize(
    "payload",
    [
        b"AUTH wrong-guess-31\n",
        f"AUTH {ALPHA_SECRET}x\n".encode(),
        f"PASS {ALPHA_SECRET}\n".encode(),
        f"r1 SET {ALPHA_SECRET} 5\n".encode(),
        f'AUTH "{ALPHA_SECRET}\n'.encode(),
        f"AUTH {ALPHA_SECRET}\xff\n".encode("latin-1"),
        f"AUTH {ROOT_SECRET}".encode() * 500 + b"\n",
    ],
)
def test_secret_not_logged_on_failure(payload: bytes) -> None:
    """Failed, malformed or over-long AUTH lines are logged without the secret."""
    h = secured()
    with capturedLogs() as events:
        conn = h.connect()
        conn.send(payload)
        assert conn.closed
        h.disconnect(conn)
    assert events
    assert not leaks_secret(list(events))


@pytest.mark.parametrize(
    "payload",
    [
        f"AUTH {ALPHA_SECRET}\n".encode(),
        f'AUTH "{SPACED_SECRET}"\n'.encode(),
        f'AUTH "{ALPHA_SECRET}\n'.encode(),
        f"AUTH {ALPHA_SECRET}\xff\n".encode("latin-1"),
    ],
)
def test_secret_not_logged_when_auth_is_off(payload: bytes) -> None:
    """With auth off, an ``AUTH <secret>`` line is ignored and its secret not logged."""
    h = make_harness()
    with capturedLogs() as events:
        conn = h.connect()
        conn.send(payload)
        assert conn.take() == b""
        assert not conn.closed
    assert events
    assert not leaks_secret(list(events))


# -- connection cap ---------------------------------------------------------------------


def test_connection_beyond_the_cap_is_closed_at_once_and_not_counted() -> None:
    """With ``max_connections=2``, a third client is closed at once; leaving frees a slot."""
    h = make_harness()
    h.factory.max_connections = 2
    first, second = h.connect(), h.connect()
    third = h.connect()
    assert third.closed
    assert not first.closed and not second.closed
    assert h.factory.connections == 2
    assert third.transport.producer is None  # never registered as a producer
    third.send(f"r SET j {FUTURE}\n".encode())
    assert third.take() == b""
    assert len(h.scheduler.jobs) == 0
    h.disconnect(third)
    assert h.factory.connections == 2
    h.disconnect(first)
    assert h.factory.connections == 1
    fourth = h.connect()
    assert not fourth.closed
    assert h.factory.connections == 2
    fourth.send(b"s STAT\n")
    assert b"s connections 2\n" in fourth.take()
    assert h.factory.connections == 2
    assert h.connect().closed


def test_refused_connection_leaves_no_timer() -> None:
    """A connection closed at the cap starts neither the AUTH nor the idle timer."""
    h = secured()
    h.factory.max_connections = 1
    h.factory.idle_timeout = 30
    authed(h)  # an authenticated connection is never dropped to make room
    before = calls(h)
    refused = h.connect()
    assert refused.closed
    assert calls(h) == before
    h.disconnect(refused)
    assert calls(h) == before


def limit_events(events: list[LogEvent]) -> list[LogEvent]:
    """The "connection limit reached" events among ``events``."""
    return [e for e in events if "connection limit" in str(e.get("log_format", ""))]


def test_refused_connections_logged_at_most_every_ten_seconds() -> None:
    """The first refusal is logged at once; later ones are counted and reported 10 s on."""
    h = make_harness()
    h.factory.max_connections = 1
    h.connect()
    with capturedLogs() as events:
        h.connect()
        first = limit_events(list(events))
        assert len(first) == 1
        assert first[0]["count"] == 1
        assert first[0]["limit"] == 1
        assert first[0]["log_level"] == LogLevel.warn
        assert "connection limit reached (1 connections)" in formatEvent(first[0])
        for _ in range(3):
            h.clock.advance(3.0)
            h.connect()
        assert len(limit_events(list(events))) == 1  # 9 s since the report
        h.clock.advance(1.0)
        h.connect()  # 10 s since the report: four refusals to report
        second = limit_events(list(events))
        assert len(second) == 2
        assert second[1]["count"] == 4
        h.clock.advance(9.9)
        h.connect()
        assert len(limit_events(list(events))) == 2
        h.clock.advance(0.1)
        h.connect()
        third = limit_events(list(events))
        assert len(third) == 3
        assert third[2]["count"] == 2
    assert h.factory.connections == 1


# -- idle timeout -----------------------------------------------------------------------


def test_idle_connection_closed_after_the_timeout() -> None:
    """A connection that sends nothing for ``idle_timeout`` seconds is closed."""
    h = make_harness()
    h.factory.idle_timeout = 30
    conn = h.connect()
    h.clock.advance(29.999)
    assert not conn.closed
    with capturedLogs() as events:
        h.clock.advance(0.001)
    assert conn.closed
    assert any("30s" in formatEvent(e) and "idle" in formatEvent(e) for e in events)


def test_data_resets_the_idle_timer() -> None:
    """Every chunk received (even part of a line) restarts the idle timeout."""
    h = make_harness()
    h.factory.idle_timeout = 30
    conn = h.connect()
    h.clock.advance(20)
    conn.send(b"s ST")
    h.clock.advance(20)
    assert not conn.closed
    conn.send(b"AT\n")
    assert conn.take().endswith(b"s OK\n")
    h.clock.advance(29.9)
    assert not conn.closed
    h.clock.advance(0.1)
    assert conn.closed


def test_idle_timeout_zero_disables_it() -> None:
    """``idle_timeout = 0`` starts no timer; a silent connection stays open."""
    h = make_harness()
    h.factory.idle_timeout = 0
    before = calls(h)
    conn = h.connect()
    assert calls(h) == before
    h.clock.advance(10 * 86400)
    assert not conn.closed


def test_idle_timer_cancelled_on_disconnect() -> None:
    """A client that leaves leaves no idle timer behind."""
    h = make_harness()
    h.factory.idle_timeout = 30
    before = calls(h)
    conn = h.connect()
    assert len(calls(h) - before) == 1
    h.disconnect(conn)
    assert calls(h) == before


def test_idle_timeout_applies_before_auth_too() -> None:
    """With an idle timeout shorter than 5 s, the idle timer closes a silent new client."""
    h = secured()
    h.factory.idle_timeout = 2
    conn = h.connect()
    h.clock.advance(2)
    assert conn.closed


def test_idle_timeout_after_auth() -> None:
    """After AUTH the idle timer keeps running; the AUTH line itself reset it."""
    h = secured()
    h.factory.idle_timeout = 30
    h.clock.advance(0)
    conn = h.connect()
    h.clock.advance(4)
    conn.send(f"AUTH {ALPHA_SECRET}\n".encode())
    h.clock.advance(29.9)
    assert not conn.closed
    h.clock.advance(0.1)
    assert conn.closed


def test_idle_close_still_delivers_answers_waiting_for_the_disk() -> None:
    """An idle close waits for answers held behind a commit, sends them, then closes."""
    h = make_harness(hold=True)
    h.factory.idle_timeout = 30
    conn = h.connect()
    conn.send(f"r SET j {FUTURE}\n".encode())
    assert conn.take() == b""
    h.clock.advance(30)
    assert not conn.closed
    h.store.resolve()
    assert conn.take() == b"r OK\n"
    assert conn.closed


# -- back-pressure ----------------------------------------------------------------------


def test_protocol_registers_as_streaming_producer() -> None:
    """On connect the protocol registers itself as a streaming producer of its transport."""
    h = make_harness()
    conn = h.connect()
    assert conn.transport.producer is conn.proto
    assert conn.transport.streaming


def test_pause_and_resume_producing_pause_reading() -> None:
    """The transport's ``pauseProducing`` stops reading; ``resumeProducing`` starts again."""
    h = make_harness()
    conn = h.connect()
    assert conn.transport.producerState == "producing"
    conn.proto.pauseProducing()
    assert conn.transport.producerState == "paused"
    conn.proto.pauseProducing()  # twice is still one pause
    conn.proto.resumeProducing()
    assert conn.transport.producerState == "producing"
    conn.proto.resumeProducing()  # a resume without a pause changes nothing
    assert conn.transport.producerState == "producing"


def test_resume_after_close_does_not_read_again() -> None:
    """A connection being closed is not resumed by the transport's ``resumeProducing``."""
    h = secured()
    conn = h.connect()
    conn.proto.pauseProducing()
    h.clock.advance(5)  # AUTH timeout: closing
    assert conn.closed
    conn.proto.resumeProducing()
    assert conn.transport.producerState == "paused"


def flood(conn: Conn, count: int, first: int = 0) -> None:
    """Send ``count`` pipelined SETs (ids ``s<i>``, jobs ``j<i>``) in one chunk."""
    conn.send("".join(f"s{i} SET j{i} {FUTURE}\n" for i in range(first, first + count)).encode())


def test_too_many_answers_waiting_for_the_disk_pause_reading() -> None:
    """More than MAX_WAITING_ANSWERS answers behind commits pause reading until half drain.

    Every answer then comes out, in request order.
    """
    h = make_harness(hold=True)
    conn = h.connect()
    extra = 100
    total = MAX_WAITING_ANSWERS + extra
    flood(conn, MAX_WAITING_ANSWERS - 1)
    assert conn.transport.producerState == "producing"
    flood(conn, extra + 1, first=MAX_WAITING_ANSWERS - 1)
    assert conn.transport.producerState == "paused"
    assert conn.take() == b""
    assert len(h.store.commits) == total
    # Reading resumes once fewer than half are waiting: after total - MAX/2 + 1 commits.
    resume_after = total - MAX_WAITING_ANSWERS // 2 + 1
    for i in range(resume_after - 1):
        h.store.resolve(i)
    assert conn.transport.producerState == "paused"
    h.store.resolve(resume_after - 1)
    assert conn.transport.producerState == "producing"
    h.store.resolve_all()
    expected = "".join(f"s{i} OK\n" for i in range(total)).encode()
    assert conn.take() == expected
    assert conn.transport.producerState == "producing"
    conn.send(b"q STAT\n")
    assert conn.take().endswith(b"q OK\n")


def test_waiting_answers_keep_order_with_errors_and_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reads and failed commits queue behind earlier commits; the order never changes."""
    monkeypatch.setattr(server, "MAX_WAITING_ANSWERS", 6)
    h = make_harness(hold=True)
    conn = h.connect()
    conn.send(
        f"a SET j1 {FUTURE}\nb GET j1\nc SET j2 {FUTURE}\nd STAT\ne SET j3 {FUTURE}\n".encode()
    )
    assert conn.transport.producerState == "producing"
    conn.send(b"f GET nope\n")
    assert conn.transport.producerState == "paused"
    h.store.resolve(1, StoreError("disk full"))
    assert conn.take() == b""  # j1 not durable yet: everything waits
    h.store.resolve(0)
    out = conn.take().decode().splitlines()
    assert out[0] == "a OK"
    assert out[1] == f"b OK planned {FUTURE}"
    assert out[2] == "c ERROR"
    assert out[3].startswith("d uptime_ns ")
    assert out[-1] == "d OK"
    assert conn.transport.producerState == "producing"  # 2 left < 6 // 2
    h.store.resolve(2)
    assert conn.take() == b"e OK\nf ERROR\n"


def test_both_pause_reasons_must_clear_before_reading_resumes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Paused by a full write buffer and by waiting answers: resume only when both end."""
    monkeypatch.setattr(server, "MAX_WAITING_ANSWERS", 4)
    h = make_harness(hold=True)
    conn = h.connect()
    conn.proto.pauseProducing()
    flood(conn, 4)
    assert conn.transport.producerState == "paused"
    h.store.resolve_all()
    assert conn.transport.producerState == "paused"  # the write buffer is still full
    conn.proto.resumeProducing()
    assert conn.transport.producerState == "producing"
    conn.proto.pauseProducing()
    flood(conn, 4, first=4)
    conn.proto.resumeProducing()
    assert conn.transport.producerState == "paused"  # four answers still wait
    h.store.resolve_all()
    assert conn.transport.producerState == "producing"
    assert conn.take() == "".join(f"s{i} OK\n" for i in range(8)).encode()


def test_disconnect_while_paused_drops_waiting_answers_quietly() -> None:
    """A client leaving with answers queued: later commits write nothing and raise nothing."""
    h = make_harness(hold=True)
    conn = h.connect()
    flood(conn, MAX_WAITING_ANSWERS)
    assert conn.transport.producerState == "paused"
    h.disconnect(conn)
    assert h.factory.connections == 0
    h.store.resolve_all()
    assert conn.take() == b""
    assert conn.writes() == 0


# -- real TCP ---------------------------------------------------------------------------


async def poll(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait (on the real reactor) until ``condition()`` holds; fail after ``timeout`` s."""
    deadline = REACTOR_TIME.seconds() + timeout
    while not condition():
        if REACTOR_TIME.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        d: Deferred[None] = Deferred()
        REACTOR_TIME.callLater(0.01, d.callback, None)
        await d


class _Flooder(Protocol):
    """Writes ``payload`` at once and reads nothing until ``read()`` is called."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received = bytearray()
        self.lost: Deferred[None] = Deferred()
        self.is_lost = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        self.transport.write(self.payload)

    def read(self) -> None:
        """Start reading the answers."""
        assert self.transport is not None
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.is_lost = True
        self.lost.callback(None)


class _FlooderFactory(ClientFactory):
    def __init__(self, flooder: _Flooder) -> None:
        self.flooder = flooder

    def buildProtocol(self, addr: object) -> Protocol:
        return self.flooder


class _Recorded(ZtickProtocol):
    """A ``ZtickProtocol`` that lets the test find the server side of its connections."""

    built: ClassVar[list[ZtickProtocol]] = []

    def connectionMade(self) -> None:
        _Recorded.built.append(self)
        super().connectionMade()


class RealSocketBackPressureTests(unittest.TestCase):
    """A client that does not read its answers, over TCP on 127.0.0.1."""

    REQUESTS = 8_000

    def setUp(self) -> None:
        self.store = FakeStore()
        self.scheduler = Scheduler(REACTOR_TIME, self.store, {})
        self.scheduler.start()
        self.factory = ZtickFactory(self.scheduler, REACTOR_TIME, persistence="memory")
        self.factory.protocol = _Recorded
        _Recorded.built = []
        self.port = REACTOR_TCP.listenTCP(0, self.factory, interface="127.0.0.1")  # type: ignore[arg-type]
        # Accepted sockets inherit the listener's small send buffer: the kernel holds
        # little, so the daemon's own buffer fills after a few thousand answers.
        assert isinstance(self.port, Port)
        self.port.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        self.addCleanup(self.port.stopListening)
        self.addCleanup(self.scheduler.stop, 0)
        self.addCleanup(self._abort_all)
        self.flooder: _Flooder | None = None

    def _abort_all(self) -> None:
        for proto in _Recorded.built:
            if proto.transport is not None:
                proto.transport.abortConnection()  # type: ignore[attr-defined]
        if self.flooder is not None and self.flooder.transport is not None:
            self.flooder.transport.abortConnection()  # type: ignore[attr-defined]

    def _payload(self) -> bytes:
        ns = 4102444800 * SECOND_NS  # 2100-01-01, never due during the test
        return "".join(f"s{i} SET j{i} {ns}\nq{i} STAT\n" for i in range(self.REQUESTS)).encode()

    async def _flood_until_paused(self) -> tuple[_Flooder, ZtickProtocol]:
        flooder = self.flooder = _Flooder(self._payload())
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        REACTOR_TCP.connectTCP("127.0.0.1", address.port, _FlooderFactory(flooder))
        await poll(lambda: bool(_Recorded.built), "the server to accept the client")
        proto = _Recorded.built[0]
        transport = proto.transport
        assert isinstance(transport, Server)
        await poll(lambda: bool(transport.producerPaused), "the server to pause reading")
        return flooder, proto

    def test_server_stops_reading_then_answers_everything(self) -> Deferred[None]:
        """The server stops reading a client that does not read; then every answer comes."""

        async def run() -> None:
            flooder, _ = await self._flood_until_paused()
            handled = len(self.scheduler.jobs)
            assert 0 < handled < self.REQUESTS
            # Nothing more is read while the client does not read (a few reactor turns).
            for _ in range(20):
                d: Deferred[None] = Deferred()
                REACTOR_TIME.callLater(0.005, d.callback, None)
                await d
            assert len(self.scheduler.jobs) == handled
            flooder.read()
            await poll(
                lambda: flooder.received.endswith(f"q{self.REQUESTS - 1} OK\n".encode()),
                "every answer",
                timeout=60,
            )
            lines = bytes(flooder.received).split(b"\n")
            oks = [line for line in lines if line.endswith(b" OK")]
            assert oks[:4] == [b"s0 OK", b"q0 OK", b"s1 OK", b"q1 OK"]
            assert len(oks) == 2 * self.REQUESTS
            assert [line.split(b" ")[0] for line in oks] == [
                f"{kind}{i}".encode() for i in range(self.REQUESTS) for kind in "sq"
            ]
            assert len(self.scheduler.jobs) == self.REQUESTS
            assert not flooder.is_lost

        return Deferred.fromCoroutine(run())

    def test_idle_close_while_paused_closes_once_the_client_reads(self) -> Deferred[None]:
        """Closed while back-pressured (idle timeout): once the client reads up, EOF comes."""
        self.factory.idle_timeout = 0.5

        async def run() -> None:
            flooder, proto = await self._flood_until_paused()
            await poll(lambda: proto._closing, "the idle timeout to close the client")
            flooder.read()
            await poll(lambda: flooder.is_lost, "the server to close the connection", 10.0)
            assert self.factory.connections == 0

        return Deferred.fromCoroutine(run())
