"""The benchmark scenarios' registry: ``SCENARIOS``, name -> scenario, in the order they run.

Each scenario starts its own daemon(s) and returns ``Metric``s.  Conventions: SET
throughput figures are the **best of N runs**, each on a fresh daemon (N = 3, or 1 with
``--quick``); latencies, durations and job-firing figures (which other load on the machine
moves most) are the **median** of the runs or of pooled samples, as each metric's detail
says.  Job due times are in the future (random over the next 30 days) unless the scenario
is about firing jobs.

This module imports the scenario modules; none of them imports it.  What they share
(``Context``, the constants, the helpers) is in ``bench.common``.
"""

from __future__ import annotations

from collections.abc import Callable

from bench.client_bench import client_pipeline
from bench.common import Context
from bench.compaction import scenario_compaction, scenario_compaction_set
from bench.firing import scenario_shell_rate, scenario_sleep_jobs, scenario_trigger_lag
from bench.history import history_memory
from bench.load import load1000
from bench.metrics import metrics_scrape
from bench.million import scenario_million, scenario_replay
from bench.network import scenario_net_amqp, scenario_net_http, scenario_net_redis
from bench.query import scenario_query_memory, scenario_query_stall
from bench.recurring import scenario_recurring_redis, scenario_schedules_memory
from bench.report import Metric
from bench.rest import rest_throughput
from bench.schedules import next_occurrence
from bench.set_get import scenario_get_latency, scenario_set_logfile, scenario_set_memory
from bench.spawn import scenario_shell_drain
from bench.telemetry import telemetry_overhead

Scenario = Callable[[Context], list[Metric]]


def _listed(scenario: Scenario, summary: str) -> Scenario:
    """``scenario`` under the one-line ``summary`` that ``--list`` shows for it."""

    def run(ctx: Context) -> list[Metric]:
        return scenario(ctx)

    run.__doc__ = summary
    return run


SCENARIOS: dict[str, Scenario] = {
    "set_memory": scenario_set_memory,
    "set_logfile": scenario_set_logfile,
    "get_latency": scenario_get_latency,
    "million": scenario_million,
    "replay": scenario_replay,
    "trigger_lag": scenario_trigger_lag,
    "sleep_jobs": scenario_sleep_jobs,
    "shell_rate": scenario_shell_rate,
    "load1000": _listed(
        load1000,
        "Issue 3: 1,000 connections x SET/GET/QUERY for 30 s: answers, fairness, RSS, fds.",
    ),
    "net_http": _listed(
        scenario_net_http,
        "Issue 4: http POSTs/s, 10,000 due in 1 s (≥ 1,000/s).",
    ),
    "net_redis": _listed(
        scenario_net_redis,
        "Issue 4: redis RPUSH/s, 10,000 due in 1 s (≥ 2,000/s).",
    ),
    "net_amqp": _listed(
        scenario_net_amqp,
        "Issue 4: amqp publishes/s, 10,000 due in 1 s (≥ 2,000/s).",
    ),
    "compaction": _listed(
        scenario_compaction,
        "Issue 5: 1M jobs x 10 mutations: log size, compaction time, replay.",
    ),
    "compaction_set": _listed(
        scenario_compaction_set,
        "Issue 5: SET/s (1 conn, fsync) on 1M jobs while compacting (≥ 80%).",
    ),
    "query_memory": _listed(
        scenario_query_memory,
        "Issue 9: daemon peak RSS growth, QUERY of 1M jobs, 4 KB id, slow reader (< 50 MB).",
    ),
    "query_stall": _listed(
        scenario_query_stall,
        "Issue 9: 1M jobs: 400 x QUERY nomatch. (< 50 ms), GET p99 and a due job during a QUERY.",
    ),
    "shell_drain": _listed(
        scenario_shell_drain,
        "Issue 9: 3,000 `shell true` due at once: jobs/s (>= 1,000), another GET p99 (<= 10 ms).",
    ),
    "next_occurrence": _listed(
        next_occurrence,
        "Issue 10: median µs of Schedule.after(prev), every/cron/combined (≤ 20 µs).",
    ),
    "history_memory": _listed(
        history_memory,
        "Issue 10: 100,000 jobs x 20 runs x 1 KB of history: RSS <= 400 MB.",
    ),
    "recurring_redis": _listed(
        scenario_recurring_redis,
        "Issue 10: 5,000 jobs `every 1 second` via redis RPUSH for 60 s"
        " (≥ 4,900 runs/s, lag p99 ≤ 5 ms, 0 missed).",
    ),
    "schedules_memory": _listed(
        scenario_schedules_memory,
        "Issue 10: 1M scheduled jobs: RSS (≤ 400 MB) and log replay (≤ 5 s),"
        " 10 texts and all-distinct.",
    ),
    "client_pipeline": _listed(
        client_pipeline,
        "Issue 11: SET/s through ztick_tw.client's pipeline (≥ 100,000/s).",
    ),
    "rest_throughput": _listed(
        rest_throughput,
        "Issue 11: PUT /jobs/{id} req/s over 50 keep-alive connections (≥ 10,000/s),"
        " GET /jobs/{id} p50 (≤ 300 µs).",
    ),
    "telemetry_overhead": _listed(
        telemetry_overhead,
        "Issue 11: SET/s with OTLP telemetry on vs off (≥ 0.90).",
    ),
    "metrics_scrape": _listed(
        metrics_scrape,
        "Issue 11: /metrics scrape with 1M jobs held (≤ 10 ms).",
    ),
}

#: ``Context`` is re-exported for the modules that still import it from here (bench.rest).
__all__ = ["SCENARIOS", "Scenario"]
