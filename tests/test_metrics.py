"""Prometheus metrics (SPEC §10): real runs, a real logfile, real scrapes over TCP.

The scheduler runs real shell children on the real reactor, its store is a real logfile
with fsync on, and ``/metrics`` is scraped with an HTTP client over 127.0.0.1; what
comes back is parsed with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.ports import free_port
from ztick_tw.compaction import CompactionService
from ztick_tw.metrics import NO_METRICS, Metrics
from ztick_tw.model import HttpSpec, JobStatus, RedisSpec, Rule, RunnerKind, ShellSpec
from ztick_tw.operations import ANONYMOUS, Operations
from ztick_tw.prometheus import (
    LAG_BUCKETS,
    RUN_BUCKETS,
    PrometheusMetrics,
    install,
    metrics_service,
    metrics_site,
    render,
)
from ztick_tw.runners.base import Execution
from ztick_tw.runners.http import HttpRunner
from ztick_tw.runners.message import NetworkOptions
from ztick_tw.runners.process import ProcessOptions, ShellRunner
from ztick_tw.runners.redis import RedisRunner
from ztick_tw.scheduler.core import Scheduler
from ztick_tw.scheduler.jobs import JobTable
from ztick_tw.scheduler.timers import now_ns
from ztick_tw.store.logfile import LogfileStore
from ztick_tw.store.memory import MemoryStore

#: The real reactor (typed loosely: it provides every interface used here).
reactor: Any = _reactor

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: bytes) -> Samples:
    """Every sample of an exposition, by name and sorted labels."""
    found: Samples = {}
    for family in text_string_to_metric_families(text.decode("utf-8")):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    """One sample's value (KeyError when absent)."""
    return found[(name, tuple(sorted(labels.items())))]


class _Recorder(Metrics):
    """Metrics on, recording every hook call (to show which paths call hooks)."""

    on = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def run_ended(self, runner: str, word: str, duration_ns: int) -> None:
        self.calls.append(("run_ended", (runner, word, duration_ns)))

    def trigger_lag(self, lag_ns: int) -> None:
        self.calls.append(("trigger_lag", (lag_ns,)))

    def fsync(self, seconds: float) -> None:
        self.calls.append(("fsync", (seconds,)))

    def compaction(self, result: str, seconds: float) -> None:
        self.calls.append(("compaction", (result, seconds)))


class MetricsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="ztick-metrics-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def daemon(
        self, metrics: Metrics
    ) -> tuple[Scheduler, LogfileStore, Operations, CompactionService]:
        """A scheduler with a shell runner over a logfile (fsync on), hooks on ``metrics``."""
        store = LogfileStore(reactor, str(self.tmp / "ztick.log"), True)
        list(store.load())
        shell = ShellRunner(reactor, "/bin/sh", ["-c"], ProcessOptions())
        scheduler = Scheduler(reactor, store, {RunnerKind.SHELL: shell})
        compaction = CompactionService(reactor, scheduler, store, 0, signal_number=None)
        operations = Operations(scheduler, reactor, persistence=store.name)
        if isinstance(metrics, PrometheusMetrics):
            metrics.attach(operations)
        install(metrics, scheduler, store, compaction)
        scheduler.start()
        compaction.startService()

        def stop() -> Deferred[None]:
            compaction.stopService()
            d = scheduler.stop(1.0)
            d.addBoth(lambda _: store.close())
            return d

        self.addCleanup(stop)
        return scheduler, store, operations, compaction

    async def until(self, done: Callable[[], bool], what: str) -> None:
        """Wait (on the real reactor) until ``done()``; fail after 10 s."""
        for _ in range(1000):
            if done():
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"timed out waiting for {what}")

    async def scrape(self, port: int) -> tuple[int, bytes, str]:
        """GET /metrics over TCP: status, body, content type."""
        agent = Agent(reactor)  # type: ignore[no-untyped-call]
        response = await agent.request(b"GET", f"http://127.0.0.1:{port}/metrics".encode())
        body = await readBody(response)
        kind = response.headers.getRawHeaders(b"content-type", [b""])[0].decode()
        return response.code, body, kind

    def serve(self, metrics: Metrics) -> int:
        """``metrics_service`` on a free port of 127.0.0.1, stopped at cleanup."""
        port = free_port()
        service = metrics_service(f"tcp:{port}:interface=127.0.0.1", metrics, reactor)
        service.startService()  # type: ignore[no-untyped-call]
        self.addCleanup(service.stopService)
        return port

    async def test_runs_move_the_metrics(self) -> None:
        """Real runs move the scraped figures.

        After a real successful and a real failing shell run, a scrape over TCP shows the
        jobs by status, one run per outcome with its duration, trigger lag and fsyncs.
        """
        metrics = PrometheusMetrics()
        scheduler, _store, operations, _c = self.daemon(metrics)
        port = self.serve(metrics)
        code, body, kind = await self.scrape(port)
        before = samples(body)
        assert code == 200
        assert kind.startswith("text/plain; version=0.0.4")
        assert value(before, "ztick_jobs", status="planned") == 0
        assert ("ztick_runs_total", (("outcome", "success"), ("runner", "shell"))) not in before

        operations.set_rule(ANONYMOUS, "ok", "ok.", "shell", ["sleep 0.05"])
        operations.set_rule(ANONYMOUS, "bad", "bad.", "shell", ["exit 3"])
        now = now_ns(reactor)
        operations.set_job(ANONYMOUS, "ok.1", now)
        operations.set_job(ANONYMOUS, "bad.1", now)
        operations.set_job(ANONYMOUS, "later.1", now + 3600 * 10**9)
        jobs = scheduler.jobs
        await self.until(
            lambda: jobs.count(JobStatus.EXECUTED) == 1 and jobs.count(JobStatus.FAILED) == 1,
            "both runs",
        )
        await self.until(lambda: scheduler.executions_inflight == 0, "the runs to settle")
        code, body, _ = await self.scrape(port)
        after = samples(body)
        assert value(after, "ztick_jobs", status="executed") == 1
        assert value(after, "ztick_jobs", status="failed") == 1
        assert value(after, "ztick_jobs", status="planned") == 1
        assert value(after, "ztick_jobs", status="paused") == 0
        assert value(after, "ztick_rules") == 2
        assert value(after, "ztick_schedules") == 0
        assert value(after, "ztick_runs_total", runner="shell", outcome="success") == 1
        assert value(after, "ztick_runs_total", runner="shell", outcome="failure") == 1
        assert value(after, "ztick_run_duration_seconds_count", runner="shell") == 2
        # the successful run slept 50 ms: the sum covers at least that
        assert value(after, "ztick_run_duration_seconds_sum", runner="shell") >= 0.05
        assert value(after, "ztick_trigger_lag_seconds_count") == 2
        assert value(after, "ztick_fsync_duration_seconds_count") >= 1
        assert value(after, "ztick_compactions_total", result="success") == 0

    async def test_histogram_buckets(self) -> None:
        """Histograms expose their configured buckets, cumulative, ending in +Inf = count."""
        metrics = PrometheusMetrics()
        for ms in (1, 20, 700, 4000):
            metrics.run_ended("shell", "executed", ms * 1_000_000)
            metrics.trigger_lag(ms * 1_000_000)
        found = samples(render(metrics))
        les = sorted(
            (float(dict(k[1])["le"]), v)
            for k, v in found.items()
            if k[0] == "ztick_run_duration_seconds_bucket"
        )
        assert [le for le, _ in les] == [*map(float, RUN_BUCKETS), float("inf")]
        counts = [v for _, v in les]
        assert counts == sorted(counts)
        assert counts[-1] == value(found, "ztick_run_duration_seconds_count", runner="shell") == 4
        assert value(found, "ztick_run_duration_seconds_bucket", runner="shell", le="0.025") == 2
        assert value(found, "ztick_run_duration_seconds_bucket", runner="shell", le="1.0") == 3
        lag = [k for k in found if k[0] == "ztick_trigger_lag_seconds_bucket"]
        assert len(lag) == len(LAG_BUCKETS) + 1
        assert value(found, "ztick_trigger_lag_seconds_bucket", le="0.001") == 1

    async def test_compaction_is_counted(self) -> None:
        """A real compaction of the logfile counts one success and observes its duration."""
        metrics = PrometheusMetrics()
        scheduler, _store, _ops, compaction = self.daemon(metrics)
        for i in range(100):
            scheduler.set_job(f"job.{i}", 2**62 + i)
        await compaction.compact("test")
        found = samples(render(metrics))
        assert value(found, "ztick_compactions_total", result="success") == 1
        assert value(found, "ztick_compactions_total", result="failure") == 0
        assert value(found, "ztick_compaction_duration_seconds_count") == 1

    async def test_set_never_touches_metrics(self) -> None:
        """SET, GET and rule changes call no hook; only runs (and fsyncs) do."""
        recorder = _Recorder()
        scheduler, store, _ops, _c = self.daemon(recorder)
        for i in range(1000):
            scheduler.set_job(f"job.{i}", 2**62 + i)
            scheduler.get_job(f"job.{i}")
        scheduler.set_rule(Rule("r", "job.", ShellSpec("true")))
        assert [c for c in recorder.calls if c[0] != "fsync"] == []
        store.flush()
        await self.until(lambda: store.syncs > 0, "an fsync")
        scheduler.set_job("run.1", now_ns(reactor))
        scheduler.set_rule(Rule("run", "run.", ShellSpec("true")))
        await self.until(lambda: any(c[0] == "run_ended" for c in recorder.calls), "a run")
        kinds = {c[0] for c in recorder.calls}
        assert {"trigger_lag", "run_ended"} <= kinds
        ended = [c[1] for c in recorder.calls if c[0] == "run_ended"]
        assert ended[0][:2] == ("shell", "executed")

    def test_metrics_off_by_default(self) -> None:
        """Without ``install`` every hook owner holds the no-op ``NO_METRICS``; render is empty."""
        scheduler = Scheduler(reactor, MemoryStore(), {})
        assert scheduler.metrics is NO_METRICS
        assert LogfileStore.metrics is NO_METRICS
        assert CompactionService.metrics is NO_METRICS
        assert NO_METRICS.on is False
        assert render(NO_METRICS) == b""

    def test_scrape_does_not_iterate_jobs(self) -> None:
        """A scrape costs O(1) in jobs: JobTable.count four times, no iteration or lookup.

        The calls are the same with 10 jobs as with 200,000.
        """
        calls: dict[str, int] = {}
        for name in ("items", "scan", "get", "raw", "snapshot", "pop_due", "__iter__"):
            original = getattr(JobTable, name, None)
            if original is None:
                continue

            def counting(*a: Any, _name: str = name, _f: Any = original, **k: Any) -> Any:
                calls[_name] = calls.get(_name, 0) + 1
                return _f(*a, **k)

            self.patch(JobTable, name, counting)  # type: ignore[no-untyped-call]
        original_count = JobTable.count

        def count(table: JobTable, status: JobStatus) -> int:
            calls["count"] = calls.get("count", 0) + 1
            return original_count(table, status)

        self.patch(JobTable, "count", count)  # type: ignore[no-untyped-call]
        per_size = {}
        for size in (10, 200_000):
            scheduler = Scheduler(reactor, MemoryStore(), {})
            for i in range(size):
                scheduler.jobs.set(f"job.{i}", 2**62 + i)
            metrics = PrometheusMetrics(Operations(scheduler, reactor, persistence="memory"))
            calls.clear()
            found = samples(render(metrics))
            assert value(found, "ztick_jobs", status="planned") == size
            per_size[size] = dict(calls)
        assert per_size[10] == per_size[200_000] == {"count": 4}

    async def test_metrics_resource_on_a_site(self) -> None:
        """``metrics_site`` serves /metrics (for the REST listener too) and 404 elsewhere."""
        metrics = PrometheusMetrics()
        metrics.compaction("failure", 0.5)
        port = reactor.listenTCP(0, metrics_site(metrics), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        code, body, _ = await self.scrape(number)
        assert code == 200
        assert value(samples(body), "ztick_compactions_total", result="failure") == 1
        agent = Agent(reactor)  # type: ignore[no-untyped-call]
        response = await agent.request(b"GET", f"http://127.0.0.1:{number}/other".encode())
        await readBody(response)
        assert response.code == 404

    def test_runner_connection_states(self) -> None:
        """``ztick_runner_connections`` reports each runner's ``connection_states()``.

        Runners without one are left out.
        """

        class Pooled:
            def connection_states(self) -> dict[str, int]:
                return {"open": 2, "backoff": 1}

        scheduler = Scheduler(
            reactor,
            MemoryStore(),
            {RunnerKind.REDIS: Pooled(), RunnerKind.SHELL: object()},  # type: ignore[dict-item]
        )
        metrics = PrometheusMetrics(Operations(scheduler, reactor, persistence="memory"))
        found = samples(render(metrics))
        assert value(found, "ztick_runner_connections", runner="redis", state="open") == 2
        assert value(found, "ztick_runner_connections", runner="redis", state="backoff") == 1
        assert not [k for k in found if dict(k[1]).get("runner") == "shell"]


class _Hook(Resource):
    """A webhook target that answers 200 at once."""

    isLeaf = True

    def render_POST(self, request: Any) -> bytes:
        return b"ok"


class RunnerConnectionTests(unittest.TestCase):
    async def test_http_pool_busy_then_idle(self) -> None:
        """After a real webhook the HTTP runner reports its pooled connection ``idle``."""
        site = Site(_Hook())  # type: ignore[no-untyped-call]
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        runner = HttpRunner(reactor, NetworkOptions(timeout=5))
        self.addCleanup(runner.stop, 0)
        assert runner.connection_states() == {"busy": 0, "idle": 0}
        url = f"http://127.0.0.1:{port.getHost().port}/hook"
        d = runner.run(Execution("job.1", 1, "rule.1", 1, HttpSpec("POST", url)))
        assert runner.connection_states()["busy"] == 1
        outcome = await d
        assert outcome.success, outcome.reason
        assert runner.connection_states() == {"busy": 0, "idle": 1}

    async def test_redis_target_down_is_in_backoff(self) -> None:
        """A redis URL nobody listens on shows ``connecting``, then ``backoff``."""
        url = f"redis://127.0.0.1:{free_port()}/0"
        runner = RedisRunner(reactor, NetworkOptions(timeout=5))
        self.addCleanup(runner.stop, 0)
        d = runner.run(Execution("job.1", 1, "rule.1", 1, RedisSpec(url, "RPUSH", "q")))
        assert runner.connection_states() == {"open": 0, "connecting": 1, "backoff": 0}
        outcome = await d
        assert not outcome.success
        assert runner.connection_states() == {"open": 0, "connecting": 0, "backoff": 1}
