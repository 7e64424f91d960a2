"""The blocking client against the real daemon: every instruction, pipelining, AUTH, TLS."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.certs import make_pki
from tests.e2e.daemon import Daemon, daemon, now_ns, wait_until
from tests.e2e.test_security import ALPHA_SECRET, auth_config, write_auth_file
from ztick_tw.client import ZtickClient, ZtickError, tls_context, wire

SECOND = 1_000_000_000
FAR = 1_893_898_800_000_000_000  # 2030-01-06 03:00:00 UTC


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon (logfile, fsync on) shared by the tests of this module."""
    with daemon(tmp_path_factory.mktemp("client")) as d:
        d.start()
        yield d


@pytest.fixture
def client(running: Daemon) -> Iterator[ZtickClient]:
    """A connected blocking client."""
    with ZtickClient(port=running.port, timeout=10) as c:
        yield c


def test_set_get_query_remove(client: ZtickClient) -> None:
    """SET (ns or aware datetime), GET, QUERY in id order, REMOVE; typed jobs."""
    client.set("cq.b", FAR)
    client.set("cq.a", datetime(2030, 1, 6, 3, 0, tzinfo=UTC))
    job = client.get("cq.a")
    assert job == wire.Job("cq.a", "planned", datetime(2030, 1, 6, 3, tzinfo=UTC), FAR)
    assert [j.id for j in client.query("cq.")] == ["cq.a", "cq.b"]
    client.remove("cq.a")
    with pytest.raises(ZtickError) as e:
        client.get("cq.a")
    assert e.value.reason == ""
    assert [j.id for j in client.query("cq.")] == ["cq.b"]


def test_rules_stat_and_quoting(client: ZtickClient) -> None:
    """RULE SET with spaces and quotes in arguments, LISTRULES, REMOVERULE, STAT ints."""
    client.rule_set("cr.rule", "cr.", "direct", "/bin/echo", 'say "hi"')
    rule = next(r for r in client.list_rules() if r.id == "cr.rule")
    assert (rule.pattern, rule.runner, rule.args) == (
        "cr.",
        "direct",
        ("/bin/echo", "say", '"hi"'),
    )
    client.remove_rule("cr.rule")
    assert all(r.id != "cr.rule" for r in client.list_rules())
    with pytest.raises(ZtickError):
        client.remove_rule("cr.rule")
    stats = client.stat()
    assert isinstance(stats["jobs_total"], int) and stats["persistence"] == "logfile"


def test_schedules_preview_pause_resume(client: ZtickClient) -> None:
    """SCHEDULE SET/GET/REMOVE, LISTSCHEDULES, PREVIEW, PAUSE and RESUME with reasons."""
    first = client.schedule_set("cs.daily", "0 6 * * *", {"tz": "Europe/Paris"})
    view = client.schedule_get("cs.daily")
    assert (view.text, view.options["tz"], view.next_ns, view.paused) == (
        "0 6 * * *",
        "Europe/Paris",
        first,
        False,
    )
    assert [s.job_id for s in client.list_schedules("cs.")] == ["cs.daily"]
    client.pause("cs.daily")
    assert client.get("cs.daily").status == "paused"
    assert client.schedule_get("cs.daily").paused
    client.resume("cs.daily")
    assert client.get("cs.daily").status == "planned"
    instants = client.preview("0 2 * * mon-fri", 3, {"tz": "Europe/Paris"})
    assert len(instants) == 3 and instants[0].iso.endswith(("+01:00", "+02:00"))
    assert instants[0].at.tzinfo is UTC and instants[0].ns < instants[1].ns
    client.schedule_remove("cs.daily")
    with pytest.raises(ZtickError) as e:
        client.schedule_get("cs.daily")
    assert e.value.reason == "job 'cs.daily' has no schedule"
    with pytest.raises(ZtickError) as e:
        client.schedule_set("cs.bad", "every 0 minutes")
    assert "never fires" in e.value.reason


def test_run_history_and_policy(client: ZtickClient) -> None:
    """RULE POLICY shows/sets; RUN starts a run; HISTORY gives typed runs newest first."""
    client.rule_set("ch.rule", "ch.", "shell", "echo ran $ZTICK_JOB_ID")
    assert client.rule_policy("ch.rule") == wire.Policy(None, 0, "1s..5m")
    assert client.rule_policy("ch.rule", {"timeout": "30s"}).timeout == "30s"
    client.set("ch.job", now_ns())
    wait_until(lambda: client.get("ch.job").status == "executed", "ch.job to run")
    client.run("ch.job")
    wait_until(lambda: len(client.history("ch.job")) == 2, "the RUN to be in the history")
    wait_until(lambda: client.history("ch.job")[0].outcome == "executed", "the RUN to end")
    newest, oldest = client.history("ch.job")
    assert (newest.run, oldest.run) == (2, 1)
    assert oldest.output == "ran ch.job\n" and oldest.exit == 0
    assert oldest.started is not None and oldest.started.tzinfo is UTC
    assert len(client.history("ch.job", 1)) == 1
    with pytest.raises(ZtickError) as e:
        client.history("ch.none")
    assert e.value.reason == "no job 'ch.none'"


def test_pipeline_keeps_order_and_reports_errors_after_reading_all(client: ZtickClient) -> None:
    """A pipeline of 10,001 requests with an ERROR in the middle keeps order.

    Every answer is read, the error is returned (or raised), the connection stays usable.
    """
    with client.pipeline(raise_on_error=False) as p:
        for i in range(5000):
            p.set(f"cp.{i:05d}", FAR + i)
        p.get("cp.none")
        for i in range(5000):
            p.get(f"cp.{i:05d}")
    results = p.results
    assert len(results) == 10001
    assert isinstance(results[5000], ZtickError)
    assert [r.execution_ns for r in results[5001:]] == [FAR + i for i in range(5000)]
    p2 = client.pipeline()
    p2.get("cp.none")
    p2.set("cp.after", FAR)
    with pytest.raises(ZtickError):
        p2.execute()
    assert client.get("cp.after").execution_ns == FAR


def test_send_many_with_multi_line_answers(client: ZtickClient) -> None:
    """Multi-line answers (QUERY, STAT) in a pipeline are matched to their requests."""
    client.set("cm.x", FAR)
    out = client.send_many([wire.query("cm."), wire.stat(), wire.get_job("cm.x")])
    assert [j.id for j in out[0]] == ["cm.x"]
    assert "jobs_total" in out[1]
    assert out[2].execution_ns == FAR


def test_request_gives_raw_lines(client: ZtickClient) -> None:
    """``request`` sends any words and returns the answer's body as sent."""
    client.set("cw.x", FAR)
    assert client.request("GET", "cw.x") == [f"planned {FAR}"]
    assert client.request("QUERY", "cw.") == [f"cw.x planned {FAR}"]


def test_auth_good_and_bad_token(tmp_path: Path) -> None:
    """A token sends AUTH first; a wrong one raises ZtickError; namespaces apply."""
    path = write_auth_file(tmp_path)
    with daemon(tmp_path / "d", auth_config(path)) as d:
        d.start()
        with ZtickClient(port=d.port, token=ALPHA_SECRET) as c:
            c.set("a.job", FAR)
            assert c.get("a.job").execution_ns == FAR
            with pytest.raises(ZtickError):
                c.set("b.job", FAR)
        with pytest.raises(ZtickError) as e:
            ZtickClient(port=d.port, token="wrong")
        assert e.value.words == ("AUTH",)


def test_tls_verified_against_the_ca(tmp_path: Path) -> None:
    """TLS with a CA file works; without trusting the CA the handshake fails."""
    pki = make_pki(str(tmp_path / "pki"))
    config = {"controller": {"tls_cert": pki.server.cert_path, "tls_key": pki.server.key_path}}
    with daemon(tmp_path / "d", config) as d:
        d.start()
        with ZtickClient(port=d.port, tls=True, cafile=pki.ca.cert_path) as c:
            assert c.stat()["tls_enabled"] == 1
        with pytest.raises(ssl.SSLError):
            ZtickClient(port=d.port, tls=tls_context(pki.other_ca.cert_path))
        with ZtickClient(port=d.port, tls=True, verify=False) as c:
            c.set("t.job", FAR)


def test_pipeline_of_sets_with_one_error_inside(client: ZtickClient) -> None:
    """A batch of bare-OK requests with one ERROR among them still maps every answer."""
    with client.pipeline(raise_on_error=False) as p:
        for i in range(100):
            p.set(f"ce.{i:03d}", FAR)
        p.call(wire.Call(("SET", "ce.bad", "tomorrow"), wire.none))
        p.set("ce.last", FAR)
    assert p.results[:100] == [None] * 100
    assert isinstance(p.results[100], ZtickError)
    assert p.results[101] is None and client.get("ce.last").execution_ns == FAR
