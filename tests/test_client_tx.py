"""The Twisted client against the real daemon, on the real reactor: Deferreds, pipelining."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial import unittest

from tests.certs import make_pki
from tests.e2e.daemon import Daemon
from tests.e2e.test_security import ALPHA_SECRET, auth_config, write_auth_file
from ztick_tw.client import ZtickError, wire
from ztick_tw.client.tx import ZtickProtocolClient, connect, endpoint

FAR = 1_893_898_800_000_000_000


class TwistedClientTests(unittest.TestCase):
    """One daemon per test, started and stopped around it."""

    def start(self, config: dict[str, dict[str, Any]] | None = None) -> Daemon:
        """A running daemon in a fresh directory, cleaned up after the test."""
        directory = Path(tempfile.mkdtemp(prefix="ztick-tx-"))
        d = Daemon(directory / "d", config)
        self.addCleanup(d.cleanup)
        d.start()
        return d

    async def connected(self, d: Daemon, **kw: Any) -> ZtickProtocolClient:
        """A client connected to ``d``, closed after the test."""
        client = await connect(reactor, endpoint(reactor, port=d.port, **kw.pop("ep", {})), **kw)
        self.addCleanup(client.close)
        return client

    def test_every_instruction_returns_a_deferred_result(self) -> Deferred[None]:
        """Each instruction's Deferred fires with the same typed result as the blocking one."""
        d = self.start()

        async def body() -> None:
            c = await self.connected(d)
            await c.set("tx.a", FAR)
            job = await c.get("tx.a")
            assert (job.status, job.execution_ns) == ("planned", FAR)
            assert [j.id for j in await c.query("tx.")] == ["tx.a"]
            await c.rule_set("tx.rule", "tx.", "shell", "echo hi")
            assert [r.id for r in await c.list_rules()] == ["tx.rule"]
            policy = await c.rule_policy("tx.rule", {"retries": "1"})
            assert policy.retries == 1
            assert isinstance((await c.stat())["uptime_ns"], int)
            first = await c.schedule_set("tx.s", "hourly starting 2030-01-01 00:00")
            assert (await c.schedule_get("tx.s")).next_ns == first
            assert len(await c.list_schedules("tx.")) == 1
            assert len(await c.preview("hourly", 2)) == 2
            await c.pause("tx.s")
            assert (await c.get("tx.s")).status == "paused"
            await c.resume("tx.s")
            await c.run("tx.a")
            for _ in range(200):  # the run's record reaches the history soon after it starts
                if await c.history("tx.a"):
                    break
                await task.deferLater(reactor, 0.05, lambda: None)
            assert (await c.history("tx.a"))[0].run == 1
            await c.schedule_remove("tx.s")
            await c.remove("tx.a")
            await c.remove("tx.s")
            await c.remove_rule("tx.rule")
            assert await c.request("QUERY", "tx.") == []

        return Deferred.fromCoroutine(body())

    def test_pipelined_requests_are_matched_in_order(self) -> Deferred[None]:
        """2,000 requests written at once, an ERROR among them: each Deferred gets its own."""
        d = self.start()

        async def body() -> None:
            c = await self.connected(d)
            sets = [c.set(f"tp.{i:04d}", FAR + i) for i in range(1000)]
            failing = c.get("tp.none")
            gets = [c.get(f"tp.{i:04d}") for i in range(1000)]
            await gatherResults(sets)
            with pytest.raises(ZtickError):
                await failing
            jobs = await gatherResults(gets)
            assert [j.execution_ns for j in jobs] == [FAR + i for i in range(1000)]
            assert len(await c.query("tp.")) == 1000

        return Deferred.fromCoroutine(body())

    def test_errors_carry_reasons(self) -> Deferred[None]:
        """Extension instructions fail with the server's reason; a bad request at once."""
        d = self.start()

        async def body() -> None:
            c = await self.connected(d)
            with pytest.raises(ZtickError) as e:
                await c.history("none")
            assert e.value.reason == "no job 'none'"
            with pytest.raises(ValueError):
                await c.get("a\nb")
            assert await c.call(wire.query("none")) == []

        return Deferred.fromCoroutine(body())

    def test_auth_and_tls(self) -> Deferred[None]:
        """connect() sends AUTH when given a token; TLS through the endpoint helper."""
        directory = Path(tempfile.mkdtemp(prefix="ztick-tx-auth-"))
        pki = make_pki(str(directory / "pki"))
        config = auth_config(write_auth_file(directory))
        config["controller"].update(
            {"tls_cert": pki.server.cert_path, "tls_key": pki.server.key_path}
        )
        d = self.start(config)

        async def body() -> None:
            ep = {"tls": True, "cafile": pki.ca.cert_path}
            c = await self.connected(d, token=ALPHA_SECRET, ep=ep)
            await c.set("a.job", FAR)
            assert (await c.stat())["auth_enabled"] == 1
            with pytest.raises(ZtickError):
                await c.set("b.job", FAR)
            with pytest.raises(ZtickError):
                await self.connected(d, token="wrong", ep=ep)

        return Deferred.fromCoroutine(body())
