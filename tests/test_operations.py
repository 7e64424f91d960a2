"""The operations layer without any transport.

Namespaces, validation, not found, durability handles, STAT and queries in pages.  A
real ``Scheduler`` on a ``Clock`` with the ``FakeStore`` (which can hold its group
commits unresolved) stands under ``Operations``; no protocol, no bytes.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

import ztick_tw.protocol.server as server
from tests.helpers import EPOCH_NS, SECOND_NS, STAT_KEYS, Harness, make_harness
from ztick_tw.auth import Token
from ztick_tw.model import I64_MAX, HttpSpec, Job, JobStatus, ShellSpec, ShownStatus
from ztick_tw.operations import (
    ANONYMOUS,
    Caller,
    Denied,
    Durable,
    Invalid,
    NotFound,
    Operations,
    Unavailable,
    when_durable,
)
from ztick_tw.protocol.query import QueryStream
from ztick_tw.store.base import Commit

TENANT = Caller(Token("billing", "billing."))
ADMIN = Caller(Token("admin", "*"))


def make_ops(*, hold: bool = False, group: bool = False) -> tuple[Harness, Operations]:
    """Operations over a fresh scheduler and a fake store (that may hold its commits)."""
    h = make_harness(hold=hold, group=group)
    return h, Operations(h.scheduler, h.clock, persistence="memory")


def outcome(d: Deferred[None]) -> object:
    """What ``d`` fired with: its result, or the ``Failure``; a sentinel if not yet."""
    box: list[object] = []
    d.addBoth(box.append)
    return box[0] if box else "pending"


# -- jobs -------------------------------------------------------------------------------


def test_set_job_with_nanoseconds_or_words() -> None:
    """A job can be set from an int or from ztick's time words; both read back the same."""
    h, ops = make_ops()
    assert ops.set_job(ANONYMOUS, "a", EPOCH_NS + SECOND_NS) is None
    ops.set_job(ANONYMOUS, "b", ["2030-01-02", "03:04:05"])
    ops.set_job(ANONYMOUS, "c", ["2030-01-02 03:04:05"])
    ops.set_job(ANONYMOUS, "d", [str(EPOCH_NS + SECOND_NS)])
    assert ops.get_job(ANONYMOUS, "a") == (JobStatus.PLANNED, EPOCH_NS + SECOND_NS)
    assert ops.get_job(ANONYMOUS, "b") == ops.get_job(ANONYMOUS, "c")
    assert ops.get_job(ANONYMOUS, "d") == ops.get_job(ANONYMOUS, "a")
    assert [e.id for e in h.store.entries if isinstance(e, Job)] == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("job_id", "execution", "reason"),
    [
        ("j", ["soon"], "timestamp 'soon' is neither an integer nor a date"),
        ("j", ["2030-02-30", "00:00:00"], "day 30 does not exist"),
        ("j", ["2030-01-01"], "has no HH:MM:SS time"),
        ("j", I64_MAX + 1, "outside the signed 64-bit range"),
        ("j", [], "needs a job identifier and a time"),
        ("a\x00b", 1, "NUL byte at offset 1"),
        ("x" * 70_000, 1, "longer than 65535 bytes"),
    ],
)
def test_set_job_invalid_arguments(job_id: str, execution: int | list[str], reason: str) -> None:
    """A bad time or id raises ``Invalid`` with a reason saying what; nothing is stored."""
    h, ops = make_ops()
    with pytest.raises(Invalid, match=reason):
        ops.set_job(ANONYMOUS, job_id, execution)
    assert h.store.entries == []
    assert len(h.scheduler.jobs) == 0


def test_get_and_remove_unknown_job_are_not_found() -> None:
    """GET and REMOVE of a job that does not exist raise ``NotFound`` naming it."""
    h, ops = make_ops()
    with pytest.raises(NotFound, match="no job 'nope'"):
        ops.get_job(ANONYMOUS, "nope")
    with pytest.raises(NotFound, match="no job 'nope'"):
        ops.remove_job(ANONYMOUS, "nope")
    assert h.store.entries == []


def test_remove_job() -> None:
    """A removed job is gone, and its removal is stored."""
    h, ops = make_ops()
    ops.set_job(ANONYMOUS, "a", EPOCH_NS + SECOND_NS)
    assert ops.remove_job(ANONYMOUS, "a") is None
    with pytest.raises(NotFound):
        ops.get_job(ANONYMOUS, "a")
    assert len(h.store.entries) == 2


# -- namespaces -------------------------------------------------------------------------


def test_tenant_works_inside_its_namespace() -> None:
    """A token's caller sets, reads and removes jobs and rules under its prefix."""
    _, ops = make_ops()
    ops.set_job(TENANT, "billing.x", EPOCH_NS + SECOND_NS)
    assert ops.get_job(TENANT, "billing.x")[0] is JobStatus.PLANNED
    ops.set_rule(TENANT, "billing.r", "billing.", "shell", ["true"])
    ops.remove_rule(TENANT, "billing.r")
    ops.remove_job(TENANT, "billing.x")


def test_tenant_is_denied_outside_its_namespace() -> None:
    """Every operation naming an id or pattern outside the namespace raises ``Denied``.

    The reason names the id, the namespace and the token (never a secret), and
    nothing is changed or stored.
    """
    h, ops = make_ops()
    ops.set_job(ANONYMOUS, "other.x", EPOCH_NS + SECOND_NS)
    ops.set_rule(ANONYMOUS, "other.r", "other.", "shell", ["true"])
    stored = len(h.store.entries)
    attempts: list[Callable[[], object]] = [
        lambda: ops.set_job(TENANT, "other.y", EPOCH_NS),
        lambda: ops.get_job(TENANT, "other.x"),
        lambda: ops.remove_job(TENANT, "other.x"),
        lambda: ops.set_rule(TENANT, "other.r2", "billing.", "shell", ["true"]),
        lambda: ops.set_rule(TENANT, "billing.r", "", "shell", ["true"]),
        lambda: ops.remove_rule(TENANT, "other.r"),
    ]
    for attempt in attempts:
        with pytest.raises(Denied, match=r"outside namespace 'billing\.' of token billing"):
            attempt()
    assert len(h.store.entries) == stored
    assert ops.get_job(ANONYMOUS, "other.x")[0] is JobStatus.PLANNED


def test_tenant_cannot_take_over_a_wider_rule_with_an_id_in_its_namespace() -> None:
    """A rule inside the tenant's id space but with a foreign pattern is not the tenant's.

    It can be neither replaced nor removed by the tenant, and is not listed to it.
    """
    _, ops = make_ops()
    ops.set_rule(ADMIN, "billing.wide", "", "shell", ["true"])
    with pytest.raises(Denied, match="'' is outside namespace"):
        ops.set_rule(TENANT, "billing.wide", "billing.", "shell", ["false"])
    with pytest.raises(Denied):
        ops.remove_rule(TENANT, "billing.wide")
    assert ops.list_rules(TENANT) == []
    assert [r.id for r in ops.list_rules(ANONYMOUS)] == ["billing.wide"]


def test_list_rules_shows_only_rules_inside_the_namespace() -> None:
    """``list_rules`` keeps rules whose id and pattern both lie in the caller's namespace."""
    _, ops = make_ops()
    ops.set_rule(ANONYMOUS, "billing.a", "billing.a", "shell", ["true"])
    ops.set_rule(ANONYMOUS, "other.b", "billing.b", "shell", ["true"])
    ops.set_rule(ANONYMOUS, "billing.c", "other.c", "shell", ["true"])
    assert [r.id for r in ops.list_rules(TENANT)] == ["billing.a"]
    assert len(ops.list_rules(ADMIN)) == 3


# -- rules ------------------------------------------------------------------------------


def test_set_rule_from_fields_as_rest_would_pass_them() -> None:
    """A rule is given as runner word plus arguments; the parsed spec is stored."""
    _, ops = make_ops()
    ops.set_rule(ANONYMOUS, "r1", "job.", "http", ("POST", "https://example.test/hook"))
    ops.set_rule(ANONYMOUS, "r2", "job.x", "shell", ["echo", "hi"])
    rules = {r.id: r for r in ops.list_rules(ANONYMOUS)}
    assert rules["r1"].runner == HttpSpec("POST", "https://example.test/hook")
    assert rules["r2"].runner == ShellSpec("echo hi")


@pytest.mark.parametrize(
    ("runner", "args", "reason"),
    [
        ("teleport", ["x"], "unknown runner 'teleport'"),
        ("http", ["FETCH", "http://h/"], "http method 'FETCH' is not one of"),
        ("shell", [], "shell runner needs a command"),
        ("redis", ["rediss://h", "SET", "k"], "rediss:// .TLS. is not supported"),
    ],
)
def test_set_rule_invalid(runner: str, args: list[str], reason: str) -> None:
    """A bad runner or argument raises ``Invalid`` with the reason; nothing is stored."""
    h, ops = make_ops()
    with pytest.raises(Invalid, match=reason):
        ops.set_rule(ANONYMOUS, "r", "job.", runner, args)
    assert h.store.entries == []


def test_remove_unknown_rule_is_not_found() -> None:
    """Removing a rule that does not exist raises ``NotFound`` naming it."""
    _, ops = make_ops()
    with pytest.raises(NotFound, match="no rule 'r'"):
        ops.remove_rule(ANONYMOUS, "r")


# -- durability -------------------------------------------------------------------------


def test_the_store_commit_is_a_durable_handle() -> None:
    """The store's ``Commit`` satisfies ``Durable`` as it is (checked by mypy here)."""
    handle: Durable = Commit()
    assert not handle.done
    assert handle.error is None


def test_change_returns_a_handle_that_resolves_when_on_disk() -> None:
    """With the store holding its group commit, every change returns the pending handle.

    Subscribers and ``when_durable`` fire once the group is on disk, not before.
    """
    h, ops = make_ops(hold=True, group=True)
    first = ops.set_job(ANONYMOUS, "a", EPOCH_NS + SECOND_NS)
    second = ops.set_rule(ANONYMOUS, "r", "a", "shell", ["true"])
    assert first is not None and second is first  # one group, one handle
    seen: list[Durable] = []
    first.subscribe(seen.append)
    d = when_durable(first)
    assert not first.done and seen == [] and outcome(d) == "pending"
    h.store.resolve()
    assert first.done and first.error is None
    assert seen == [first]
    assert outcome(d) is None


def test_failed_write_gives_unavailable_and_undoes_the_change() -> None:
    """A commit that fails: ``when_durable`` fails with ``Unavailable`` saying why.

    The scheduler undoes the change, so the job is not found afterwards.
    """
    h, ops = make_ops(hold=True)
    handle = ops.set_job(ANONYMOUS, "a", EPOCH_NS + SECOND_NS)
    d = when_durable(handle)
    h.store.resolve(error=OSError(28, "No space left on device"))
    result = outcome(d)
    assert isinstance(result, Failure)
    assert result.check(Unavailable) is not None  # type: ignore[no-untyped-call]
    assert "No space left on device" in str(result.value)
    with pytest.raises(NotFound):
        ops.get_job(ANONYMOUS, "a")


def test_when_durable_without_a_handle_or_when_already_resolved() -> None:
    """No handle (nothing to wait for), or one already resolved, gives a fired Deferred."""
    assert outcome(when_durable(None)) is None
    done = Commit()
    done.resolve()
    assert outcome(when_durable(done)) is None


def test_store_refusing_a_change_is_unavailable() -> None:
    """A store that refuses an append (closed) makes the operation raise ``Unavailable``."""
    h, ops = make_ops()
    ops.set_job(ANONYMOUS, "a", EPOCH_NS + SECOND_NS)
    ops.set_rule(ANONYMOUS, "r", "a", "shell", ["true"])
    h.store.close()
    with pytest.raises(Unavailable, match="closed"):
        ops.set_job(ANONYMOUS, "b", EPOCH_NS)
    with pytest.raises(Unavailable):
        ops.remove_job(ANONYMOUS, "a")
    with pytest.raises(Unavailable):
        ops.set_rule(ANONYMOUS, "r2", "b", "shell", ["true"])
    with pytest.raises(Unavailable):
        ops.remove_rule(ANONYMOUS, "r")


# -- query ------------------------------------------------------------------------------


Page = Sequence[tuple[str, ShownStatus, int]]


def _ids(pages: list[Page]) -> list[str]:
    """The job ids of ``pages``, in order."""
    return [job_id for page in pages for job_id, _, _ in page]


def _all_pages(ops: Operations, caller: Caller, prefix: str, size: int) -> list[Page]:
    """Every page of a query, read ``size`` jobs at a time."""
    query = ops.query(caller, prefix)
    pages: list[Page] = []
    after: str | None = None
    while True:
        page = query.page(after, size)
        if not page:
            return pages
        assert len(page) <= size
        pages.append(page)
        after = page[-1][0]


def test_query_reads_in_bounded_pages_in_id_order() -> None:
    """A query is read a page at a time after the last id; all matches, in id order."""
    _, ops = make_ops()
    for i in range(250):
        ops.set_job(ANONYMOUS, f"job.{i:04d}", EPOCH_NS + SECOND_NS)
    ops.set_job(ANONYMOUS, "other", EPOCH_NS + SECOND_NS)
    pages = _all_pages(ops, ANONYMOUS, "job.", 100)
    assert [len(p) for p in pages] == [100, 100, 50]
    assert _ids(pages) == [f"job.{i:04d}" for i in range(250)]


def test_query_is_narrowed_to_the_namespace() -> None:
    """A tenant's wider prefix is narrowed to its namespace; one outside matches nothing."""
    _, ops = make_ops()
    for job_id in ("billing.a", "billing.b", "bills", "other.c"):
        ops.set_job(ANONYMOUS, job_id, EPOCH_NS + SECOND_NS)
    assert _ids(_all_pages(ops, TENANT, "", 10)) == ["billing.a", "billing.b"]
    assert _ids(_all_pages(ops, TENANT, "bil", 10)) == ["billing.a", "billing.b"]
    assert _ids(_all_pages(ops, TENANT, "billing.b", 10)) == ["billing.b"]
    assert ops.query(TENANT, "other.").scan is None
    assert _all_pages(ops, TENANT, "other.", 10) == []
    assert len(_ids(_all_pages(ops, ANONYMOUS, "", 10))) == 4


def test_query_feeds_the_line_protocols_slices() -> None:
    """The line protocol's ``QueryStream`` over a ``JobQuery`` answers in bounded slices."""
    _, ops = make_ops()
    for i in range(2000):
        ops.set_job(ANONYMOUS, f"job.{i:05d}", EPOCH_NS + SECOND_NS)
    query = ops.query(ANONYMOUS, "job.")
    stream = QueryStream(query.scan, "q", query.prefix)
    slices = []
    while not stream.done:
        slices.append(stream.next_slice(4096))
    assert len(slices) > 10
    assert all(len(s) < 4096 + 100 for s in slices)
    lines = b"".join(slices).splitlines()
    assert len(lines) == 2001 and lines[-1] == b"q OK"


# -- STAT -------------------------------------------------------------------------------


def test_stat_keys_and_values() -> None:
    """STAT has every key in order, counts jobs and rules, and sums transports' connections."""
    h = make_harness()
    ops = Operations(
        h.scheduler,
        h.clock,
        persistence="logfile",
        framerate=60,
        compression=lambda: "running",
        auth_enabled=lambda: True,
        tls_enabled=True,
    )
    ops.count_connections(lambda: 3)
    ops.count_connections(lambda: 4)
    ops.set_job(ANONYMOUS, "a", EPOCH_NS + SECOND_NS)
    ops.set_job(ANONYMOUS, "b", EPOCH_NS + 2 * SECOND_NS)
    ops.set_rule(ANONYMOUS, "r", "x", "shell", ["true"])
    h.clock.advance(1.5)
    stat = dict(ops.stat(TENANT))
    assert [key for key, _ in ops.stat(ANONYMOUS)] == STAT_KEYS
    assert stat["uptime_ns"] == 1_500_000_000
    assert stat["connections"] == 7
    assert stat["jobs_total"] == 2
    assert stat["rules_total"] == 1
    assert stat["persistence"] == "logfile"
    assert stat["compression"] == "running"
    assert (stat["auth_enabled"], stat["tls_enabled"], stat["framerate"]) == (1, 1, 60)


# -- layering ---------------------------------------------------------------------------


def test_the_line_protocol_does_not_import_the_store_or_the_scheduler_tables() -> None:
    """The transport reaches the scheduler only through ``Operations``.

    No module of ``ztick_tw/protocol/`` (server, instructions, factory, extension, ...)
    imports anything from ``ztick_tw.store`` (durability comes as a ``Durable`` handle)
    nor ``arguments`` (validation is the operations' job); the instructions call
    ``ztick_tw.operations``.
    """
    imported: dict[str, set[str]] = {}
    for path in sorted(Path(server.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        imported[path.name] = {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module is not None
        }
    assert {"server.py", "instructions.py", "factory.py"} <= set(imported)
    for name, modules in imported.items():
        assert not any(m.startswith("ztick_tw.store") for m in modules), (name, modules)
        assert "ztick_tw.arguments" not in modules, name
    assert "ztick_tw.operations" in imported["instructions.py"]
