"""The Python client's throughput: ``ZtickClient.pipeline()`` SETs against the daemon.

``client_pipeline(ctx)`` starts a daemon (memory backend) per run, pipelines ``n`` SETs
through :class:`ztick_tw.client.ZtickClient` (the client formats every request and parses
every answer, as an application would) and reports the best of ``ctx.repeats`` runs.
Run alone: ``.venv/bin/python -m bench.client_bench [--quick]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench.client import check_all_ok, pipeline, set_lines
from bench.common import MEMORY, Context, future_times, job_ids, rates
from bench.daemon import BenchError, Daemon
from bench.report import Metric, at_least
from ztick_tw.client import ZtickClient


def client_pipeline(ctx: Context) -> list[Metric]:
    """SET/s through the Python client's pipeline, one connection, memory backend."""
    n = 50_000 if ctx.quick else 200_000
    ids = job_ids(1, n)
    times = future_times(n, seed=7)
    found: list[float] = []
    floor: list[float] = []
    blob = set_lines(ids, times)
    for run in range(ctx.repeats):
        with Daemon(ctx.workdir("client-floor"), MEMORY) as d:
            answers = pipeline(d.port, blob, n)
            check_all_ok(answers, n, "client-floor")
            floor.append(n / answers.seconds)
        with Daemon(ctx.workdir("client-pipeline"), MEMORY) as d, ZtickClient(port=d.port) as c:
            started = time.perf_counter()
            with c.pipeline() as p:
                for job_id, ns in zip(ids, times, strict=True):
                    p.set(job_id, ns)
            seconds = time.perf_counter() - started
            if len(p.results) != n or any(r is not None for r in p.results):
                raise BenchError("the pipeline did not get an OK for every SET")
            if c.get(ids[-1]).execution_ns != times[-1]:
                raise BenchError("the last job is not stored as sent")
            found.append(n / seconds)
            ctx.say(
                f"client-pipeline run {run + 1}: {found[-1]:,.0f} SET/s"
                f" (pre-built blob on the same machine just before: {floor[-1]:,.0f} SET/s)"
            )
    return [
        Metric(
            "client_pipeline",
            "client_pipeline_set_per_s",
            "SET/s through ztick_tw.client pipeline, 1 connection, memory backend",
            max(found),
            "SET/s",
            at_least(100_000),
            "",
            f"{n:,} SETs queued on ZtickClient.pipeline() (formatting and answer parsing in"
            f" the client, batches of 4,096 with one in flight); fresh daemon per run; best of"
            f" {len(found)} runs ({rates(found)}).",
        ),
        Metric(
            "client_pipeline",
            "client_pipeline_floor_set_per_s",
            "SET/s, the same SETs as one pre-built blob (no client work), for comparison",
            max(floor),
            "SET/s",
            None,
            "",
            f"bench.client.pipeline with the same {n:,} SETs on a fresh daemon before each"
            f" client run; best of {len(floor)} ({rates(floor)}).",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        ctx = Context(args.quick, Path(root), args.repeats)
        for metric in client_pipeline(ctx):
            print(f"{metric.label}: {metric.value:,.0f} {metric.unit}", file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
