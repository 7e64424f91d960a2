"""Prometheus metrics (SPEC §10): ``GET /metrics`` in the text exposition format.

Two kinds of figures:

- Counts read at scrape time by ``_Counts`` (a custom collector): jobs by status, rules,
  schedules, connections, runner connections by state.  Each is an O(1) read of a
  counter the scheduler keeps anyway (``JobTable.count``, ``len``), so a scrape costs
  the same with ten jobs or ten million; jobs are never iterated.
- Events fed by hooks (``ztick_tw/metrics.py``'s ``Metrics``, implemented here):
  runs (counter + duration), trigger lag, fsync latency, compactions.

Wiring (``ztick_tw/service.py``)::

    metrics = PrometheusMetrics(operations)
    install(metrics, scheduler, store, compaction)
    root.putChild(b"metrics", MetricsResource(metrics))        # on the REST site
    metrics_service(endpoint, metrics, reactor).setServiceParent(top)  # no REST API
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.application import strports
from twisted.application.service import IService
from twisted.web.pages import notFound
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from ztick_tw.metrics import Metrics
from ztick_tw.model import JobStatus
from ztick_tw.operations import Operations

__all__ = [
    "CONTENT_TYPE",
    "MetricsResource",
    "PrometheusMetrics",
    "install",
    "metrics_service",
    "render",
]

#: The ``Content-Type`` of a scrape's answer: the text format every Prometheus reads (our
#: names need none of the 1.0.0 format's escaping, so the bytes are the same).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

#: ``ztick_jobs{status}``: the statuses a job can have, and ``paused`` (SPEC §9).
JOB_STATUSES = (
    ("planned", JobStatus.PLANNED),
    ("triggered", JobStatus.TRIGGERED),
    ("executed", JobStatus.EXECUTED),
    ("failed", JobStatus.FAILED),
)

#: Seconds.  Runs go from a webhook's milliseconds to a backup's hour.
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
#: Seconds.  Lag is normally well under a millisecond; seconds mean trouble.
LAG_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    5,
    60,
)
#: Seconds.  An fsync on an SSD takes 0.1-2 ms; tens of ms on a busy disk.
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
#: Seconds.
COMPACTION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

#: The scheduler's end-of-run words (its history's) as ``outcome`` labels, the same
#: words the OTLP export uses (``ztick_tw.telemetry.wrap.outcome_word``).
OUTCOMES = {
    "executed": "success",
    "failed": "failure",
    "timeout": "timeout",
    "cancelled": "cancelled",
    "interrupted": "interrupted",
}


class _Counts(Collector):
    """Gauges read at scrape time, each O(1) in the jobs held."""

    def __init__(self, owner: PrometheusMetrics) -> None:
        self.owner = owner

    def collect(self) -> Iterable[Metric]:
        """The current counts (nothing about the scheduler when none is attached)."""
        ops = self.owner.operations
        if ops is None:
            return []
        s = ops.scheduler
        jobs = s.jobs
        by_status = GaugeMetricFamily("ztick_jobs", "Jobs held, by status", labels=["status"])
        for name, status in JOB_STATUSES:
            by_status.add_metric([name], jobs.count(status))
        by_status.add_metric(["paused"], s.jobs_paused)
        connections = ops.connections()
        families: list[Metric] = [
            by_status,
            GaugeMetricFamily("ztick_rules", "Rules held", value=len(s.rules)),
            GaugeMetricFamily("ztick_schedules", "Recurring schedules", value=len(s.recurrences)),
            GaugeMetricFamily(
                "ztick_connections", "Client connections open (all transports)", connections
            ),
        ]
        runner_states = GaugeMetricFamily(
            "ztick_runner_connections",
            "Runners' outgoing connections, by runner and state",
            labels=["runner", "state"],
        )
        for kind, runner in self.owner.runners().items():
            states: Callable[[], Mapping[str, int]] | None = getattr(
                runner, "connection_states", None
            )
            if states is None:
                continue
            for state, count in sorted(states().items()):
                runner_states.add_metric([kind, state], count)
        families.append(runner_states)
        return families


class PrometheusMetrics(Metrics):
    """Metrics on: a registry of its own (never the global one), fed by the hooks.

    ``operations`` (optional, set later with ``attach``) is where the counts come from;
    the runners whose ``connection_states()`` are reported are its scheduler's.
    """

    on = True

    def __init__(self, operations: Operations | None = None) -> None:
        # No ``*_created`` series: they double the exposition and say only when the
        # daemon started.  (A process-wide switch of prometheus_client; nothing else in
        # the daemon uses that library.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.operations = operations
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self._runs = Counter(
            "ztick_runs", "Runs ended, by runner and outcome", ["runner", "outcome"], registry=r
        )
        self._run_seconds = Histogram(
            "ztick_run_duration_seconds",
            "How long runs took, by runner",
            ["runner"],
            buckets=RUN_BUCKETS,
            registry=r,
        )
        self._lag = Histogram(
            "ztick_trigger_lag_seconds",
            "From a job's due time to its run's start",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self._fsync = Histogram(
            "ztick_fsync_duration_seconds",
            "How long each logfile fsync took",
            buckets=FSYNC_BUCKETS,
            registry=r,
        )
        self._compactions = Counter(
            "ztick_compactions", "Compactions ended, by result", ["result"], registry=r
        )
        self._compaction_seconds = Histogram(
            "ztick_compaction_duration_seconds",
            "How long compactions took",
            buckets=COMPACTION_BUCKETS,
            registry=r,
        )
        for result in ("success", "failure"):
            self._compactions.labels(result)
        # Label children looked up once each: ``labels()`` takes a lock and builds a key.
        self._run_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        r.register(_Counts(self))

    def attach(self, operations: Operations) -> None:
        """Read the counts from ``operations`` (and its scheduler's runners)."""
        self.operations = operations

    def runners(self) -> dict[str, Any]:
        """The scheduler's runners by kind (``wire`` name), one entry per kind."""
        ops = self.operations
        if ops is None:
            return {}
        return {kind.wire: runner for kind, runner in ops.scheduler.runners.items()}

    def run_ended(self, runner: str, word: str, duration_ns: int) -> None:
        """Count the run and observe its duration."""
        key = (runner, word)
        children = self._run_children.get(key)
        if children is None:
            outcome = OUTCOMES.get(word, word)
            children = (self._runs.labels(runner, outcome), self._run_seconds.labels(runner))
            self._run_children[key] = children
        children[0].inc()
        children[1].observe(max(0, duration_ns) / 1e9)

    def trigger_lag(self, lag_ns: int) -> None:
        """Observe a run's trigger lag."""
        self._lag.observe(max(0, lag_ns) / 1e9)

    def fsync(self, seconds: float) -> None:
        """Observe an fsync's latency (called on the thread that ran it: the client locks)."""
        self._fsync.observe(seconds)

    def compaction(self, result: str, seconds: float) -> None:
        """Count a compaction by result and observe its duration."""
        self._compactions.labels(result).inc()
        self._compaction_seconds.observe(max(0.0, seconds))


def install(metrics: Metrics, scheduler: Any, store: Any, compaction: Any = None) -> None:
    """Point the hooks of ``scheduler``, ``store``, ``compaction`` at ``metrics``.

    Any of the three may be None (no logfile store: no fsync, no compaction).
    """
    for owner in (scheduler, store, compaction):
        if owner is not None:
            owner.metrics = metrics


def render(metrics: Metrics) -> bytes:
    """The Prometheus text exposition of ``metrics`` (empty when metrics are off)."""
    if not isinstance(metrics, PrometheusMetrics):
        return b""
    return generate_latest(metrics.registry)


class MetricsResource(Resource):
    """``GET /metrics``: the exposition of ``metrics``."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        """The exposition, as ``text/plain; version=0.0.4; charset=utf-8``."""
        request.setHeader(b"content-type", CONTENT_TYPE.encode("ascii"))  # type: ignore[no-untyped-call]
        return render(self.metrics)

    def render_HEAD(self, request: Request) -> bytes:
        """The headers of ``GET``."""
        return self.render_GET(request)


class _Root(Resource):
    """``/metrics`` and nothing else (404 elsewhere)."""

    def getChild(self, path: bytes, request: Request) -> IResource:
        """Any path but ``/metrics``: 404."""
        return notFound()


def metrics_site(metrics: Metrics) -> Site:
    """A ``Site`` serving ``/metrics``; idle scrapers are dropped after 60 s."""
    root = _Root()  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", MetricsResource(metrics))
    site = Site(root, timeout=60)  # type: ignore[no-untyped-call]
    site.noisy = False
    return site


def metrics_service(endpoint: str, metrics: Metrics, reactor: Any) -> IService:
    """``[telemetry] prometheus_listen``: a listener on ``endpoint`` serving ``/metrics``.

    ``endpoint`` is a server endpoint string (``tcp:9464:interface=127.0.0.1``).  A
    failed bind fails startup, as the controller's does.
    """
    service = strports.service(endpoint, metrics_site(metrics), reactor=reactor)
    service._raiseSynchronously = True
    service.setName("metrics")  # type: ignore[no-untyped-call]
    return service
