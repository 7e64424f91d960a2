"""The ``net_*`` scenarios' receivers as targets: the rule that points at each, counting arrivals.

:class:`NetTarget` is what a run needs of a receiver; :class:`HttpTarget` runs the webhook
receiver (bench/network_receiver.py) per run, :class:`RedisTarget` pushes to a
``RedisServer`` (tests/redis_server.py) and :class:`AmqpTarget` publishes to a
``RabbitMQServer`` (tests/rabbitmq_server.py); the scenarios start and stop those.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from bench.common import Context
from bench.daemon import HOST, BenchError
from bench.network_receiver import HttpReceiver

if TYPE_CHECKING:
    from tests.rabbitmq_server import RabbitMQServer
    from tests.redis_server import BlockingRedisClient, RedisServer


class NetTarget:
    """One receiver kind: the rule that points at it, counting what arrived, checks."""

    kind = ""
    #: Seconds between two counts while the jobs are being delivered.
    interval = 0.002
    #: How the receiver counts (for the figure's description).
    how = ""

    def prepare(self, ctx: Context, run: int) -> None:
        """Before a run: an empty receiver."""

    def rule(self) -> str:
        """The runner part of ``RULE SET rule.net net. <...>``."""
        raise NotImplementedError

    def count(self) -> int:
        """Messages received so far in this run (cheap: called every ``interval`` s)."""
        raise NotImplementedError

    def arrivals(self) -> tuple[int, int] | None:
        """The receiver's own first/last arrival times (ns), if it records them."""
        return None

    def check(self, expected: int) -> tuple[int, int, str]:
        """After a run: messages received, distinct jobs among them, a sentence about it."""
        raise NotImplementedError

    def finish(self) -> None:
        """After a run (also a failed one): drop this run's receiver state."""


class HttpTarget(NetTarget):
    kind = "http"
    interval = 0.05
    how = (
        "receiver: a separate asyncio HTTP/1.1 keep-alive process (bench/network.py) that"
        " answers `200` with an empty body and stamps each request's arrival"
        " (time.time_ns()); the figures use its stamps"
    )

    def __init__(self) -> None:
        self.receiver: HttpReceiver | None = None
        self.summary: dict[str, float] = {}

    def prepare(self, ctx: Context, run: int) -> None:
        self.receiver = HttpReceiver(ctx.workdir("net-http-receiver")).start()
        self.summary = {}

    def _receiver(self) -> HttpReceiver:
        if self.receiver is None:
            raise BenchError("no http receiver")
        return self.receiver

    def rule(self) -> str:
        return f"http POST http://{HOST}:{self._receiver().port}/hook"

    def count(self) -> int:
        return int(self._receiver().get("/count")["count"])

    def arrivals(self) -> tuple[int, int] | None:
        self.summary = self._receiver().get("/summary")
        if not self.summary["count"]:
            return None
        return int(self.summary["first_ns"]), int(self.summary["last_ns"])

    def check(self, expected: int) -> tuple[int, int, str]:
        s = self.summary or self._receiver().get("/summary")
        distinct = int(s["distinct"])
        return (
            int(s["count"]),
            distinct,
            (
                f"The receiver got {int(s['count']):,} requests ({distinct:,} distinct job ids,"
                f" {int(s['bad'])} malformed) over {int(s['connections'])} connection(s);"
                f" delivery lag it saw (arrival - due, all jobs): p50"
                f" {s['lag_p50_us'] / 1000:.1f} ms, p99 {s['lag_p99_us'] / 1000:.1f} ms, max"
                f" {s['lag_max_us'] / 1000:.1f} ms."
            ),
        )

    def finish(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None


class RedisTarget(NetTarget):
    kind = "redis"
    key = "ztick:bench"
    how = (
        "receiver: redis-server 7 (tests/redis_server.py: loopback, no persistence); the"
        " benchmark polls `LLEN` every 2 ms on its own connection, so first/last arrival"
        " are the first poll that saw them (up to ~2 ms late)"
    )

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.client: BlockingRedisClient = server.client()

    def prepare(self, ctx: Context, run: int) -> None:
        self.server.command("DEL", self.key)

    def rule(self) -> str:
        return f"redis {self.server.url()} RPUSH {self.key}"

    def count(self) -> int:
        found = self.client.command("LLEN", self.key)
        assert isinstance(found, int), found
        return found

    def check(self, expected: int) -> tuple[int, int, str]:
        items = self.server.command("LRANGE", self.key, 0, -1)
        assert isinstance(items, list), items
        distinct = len(set(map(repr, items)))
        return (
            len(items),
            distinct,
            f"`LRANGE` after the run: {len(items):,} items, {distinct:,} distinct.",
        )

    def finish(self) -> None:
        self.server.command("DEL", self.key)

    def close(self) -> None:
        """Close the counting connection."""
        self.client.close()


class AmqpTarget(NetTarget):
    kind = "amqp"
    how = (
        "receiver: RabbitMQ 3.10 (tests/rabbitmq_server.py: a private node on loopback), a"
        " durable queue bound to `amq.direct`, persistent messages (the runner's default),"
        " publisher confirms; the benchmark polls the queue's message_count (passive"
        " queue_declare) every 2 ms on its own connection, so first/last arrival are the"
        " first poll that saw them (up to ~2-3 ms late)"
    )

    def __init__(self, broker: RabbitMQServer) -> None:
        self.broker = broker
        self._stack = contextlib.ExitStack()
        self.channel: Any = self._stack.enter_context(broker.channel())
        self.queue = ""

    def prepare(self, ctx: Context, run: int) -> None:
        self.queue = f"ztick-bench-{run}"
        self.broker.declare_queue(self.queue, "amq.direct", durable=True)
        self.channel.queue_purge(self.queue)

    def rule(self) -> str:
        return f"amqp {self.broker.dsn()} amq.direct {self.queue}"

    def count(self) -> int:
        found: int = self.channel.queue_declare(self.queue, passive=True).method.message_count
        return found

    def check(self, expected: int) -> tuple[int, int, str]:
        found = self.count()
        # The bodies are not read: one message per job is assumed, so a count above
        # `expected` shows up as duplicates and one below as missing jobs.
        return found, min(found, expected), f"Queue message_count after the run: {found:,}."

    def finish(self) -> None:
        if self.queue:
            self.channel.queue_delete(self.queue)
            self.queue = ""

    def close(self) -> None:
        """Close the counting connection."""
        self._stack.close()
