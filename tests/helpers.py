"""Shared fakes for the unit tests: a store, runners and a protocol harness on a ``Clock``.

Only time and failure injection are faked here; everything else under test is real.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from ztick_tw.model import Entry, Job, JobStatus, RunnerKind
from ztick_tw.protocol.server import ZtickFactory, ZtickProtocol
from ztick_tw.runners.base import Execution, IRunner, Outcome
from ztick_tw.scheduler.core import Scheduler
from ztick_tw.store.base import Commit, IStore, StoreError

#: A realistic "now" for the test clocks: 2023-11-14T22:13:20Z, in seconds.
EPOCH_S = 1_700_000_000
#: The same instant in nanoseconds.
EPOCH_NS = EPOCH_S * 1_000_000_000
#: One second in nanoseconds.
SECOND_NS = 1_000_000_000


def make_clock() -> Clock:
    """A ``Clock`` already advanced to ``EPOCH_S`` (jobs are ns since the epoch)."""
    clock = Clock()
    clock.advance(EPOCH_S)
    return clock


@implementer(IStore)
class FakeStore:
    """An ``IStore`` that records appended entries in memory.

    ``initial`` is what ``load`` yields.  With ``hold=True`` every append returns an
    unresolved ``Commit`` (with ``group=True`` the same one until ``cut`` is called,
    like a group commit), to be resolved by the test with ``resolve``.
    """

    def __init__(
        self,
        initial: Iterable[Entry] = (),
        *,
        hold: bool = False,
        group: bool = False,
        name: str = "memory",
    ) -> None:
        self.name = name
        self.initial: list[Entry] = list(initial)
        self.entries: list[Entry] = []
        self.hold = hold
        self.group = group
        self.commits: list[Commit] = []
        self._open: Commit | None = None
        self.flushes = 0
        self.written = 0
        self.closed = False

    def load(self) -> Iterator[Entry]:
        """Yield the initial entries."""
        yield from self.initial

    def append(self, entry: Entry) -> Commit | None:
        """Record ``entry``; hand out a pending ``Commit`` when holding."""
        if self.closed:
            raise StoreError("append to a closed FakeStore")
        self.entries.append(entry)
        if not self.hold:
            return None
        if self.group and self._open is not None and not self._open.done:
            return self._open
        commit = Commit()
        self.commits.append(commit)
        self._open = commit
        return commit

    def cut(self) -> None:
        """Start a new commit group for the next append."""
        self._open = None

    def resolve(self, index: int = -1, error: BaseException | None = None) -> None:
        """Resolve one handed-out commit (the last one by default)."""
        self.commits[index].resolve(error)

    def resolve_all(self, error: BaseException | None = None) -> None:
        """Resolve every handed-out commit, oldest first."""
        for commit in self.commits:
            commit.resolve(error)

    def write_through(self) -> None:
        """Remember how many entries had been handed to the "file" (``written``)."""
        self.written = len(self.entries)

    def flush(self) -> None:
        """Count the flushes."""
        self.flushes += 1

    def close(self) -> None:
        """Refuse further appends."""
        self.closed = True

    def job_frames(self, job_id: str | None = None) -> list[Job]:
        """The appended ``Job`` entries (of one job if ``job_id`` is given)."""
        return [
            e for e in self.entries if isinstance(e, Job) and (job_id is None or e.id == job_id)
        ]

    def statuses(self, job_id: str) -> list[JobStatus]:
        """The statuses of the ``Job`` frames appended for ``job_id``, in order."""
        return [e.status for e in self.job_frames(job_id)]


@implementer(IRunner)
class FakeRunner:
    """An ``IRunner`` whose runs stay pending until the test completes them."""

    def __init__(self) -> None:
        self.runs: list[tuple[Execution, Deferred[Outcome]]] = []
        self.stops: list[float] = []

    def run(self, execution: Execution) -> Deferred[Outcome]:
        """Record the execution and return a Deferred the test fires."""
        d: Deferred[Outcome] = Deferred()
        self.runs.append((execution, d))
        return d

    def stop(self, grace: float) -> Deferred[None]:
        """Record the grace period; stopping is immediate."""
        self.stops.append(grace)
        return succeed(None)

    @property
    def executions(self) -> list[Execution]:
        """Every execution started, in start order."""
        return [e for e, _ in self.runs]

    @property
    def started(self) -> list[str]:
        """The job ids of every execution started, in start order."""
        return [e.job_id for e, _ in self.runs]

    @property
    def pending(self) -> list[Execution]:
        """Executions whose Deferred has not fired yet."""
        return [e for e, d in self.runs if not d.called]

    def complete(
        self, job_id: str, success: bool = True, reason: str = "", interrupted: bool = False
    ) -> None:
        """Fire the oldest pending run of ``job_id`` with an ``Outcome``."""
        for execution, d in self.runs:
            if execution.job_id == job_id and not d.called:
                d.callback(Outcome(success, reason, interrupted))
                return
        raise AssertionError(f"no pending run of {job_id!r}")


@implementer(IRunner)
class ImmediateRunner:
    """An ``IRunner`` that finishes every run at once with a fixed result."""

    def __init__(self, success: bool = True) -> None:
        self.success = success
        self.executions: list[Execution] = []

    def run(self, execution: Execution) -> Deferred[Outcome]:
        """Return an already-fired Deferred."""
        self.executions.append(execution)
        return succeed(Outcome(self.success, "" if self.success else "fixed failure"))

    def stop(self, grace: float) -> Deferred[None]:
        """Nothing to stop."""
        return succeed(None)


@implementer(IRunner)
class RaisingRunner:
    """An ``IRunner`` that breaks its contract: ``run`` raises (or errbacks)."""

    def __init__(self, errback: bool = False) -> None:
        self.errback = errback
        self.calls: list[Execution] = []

    def run(self, execution: Execution) -> Deferred[Outcome]:
        """Raise, or return a failed Deferred when ``errback`` is set."""
        self.calls.append(execution)
        if self.errback:
            return fail(RuntimeError(f"runner broke on {execution.job_id}"))
        raise RuntimeError(f"runner broke on {execution.job_id}")

    def stop(self, grace: float) -> Deferred[None]:
        """Nothing to stop."""
        return succeed(None)


@implementer(ILogObserver)
class EventLog:
    """A log observer that keeps every event (give it to ``Logger(observer=...)``)."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        """Keep the event."""
        self.events.append(event)

    def formats(self) -> list[str]:
        """The ``log_format`` of every event, in order."""
        return [str(e.get("log_format", "")) for e in self.events]

    def failures(self) -> list[Failure]:
        """The failures logged with ``Logger.failure``."""
        return [e["log_failure"] for e in self.events if "log_failure" in e]


def all_kinds(runner: IRunner) -> dict[RunnerKind, IRunner]:
    """The same runner for every runner kind."""
    return dict.fromkeys(RunnerKind, runner)


@dataclass
class Conn:
    """One protocol instance on a ``StringTransport``."""

    proto: ZtickProtocol
    transport: StringTransport
    write_calls: list[int] = field(default_factory=lambda: [0])

    def send(self, data: bytes) -> None:
        """Deliver ``data`` to the protocol as one chunk."""
        self.proto.dataReceived(data)

    def take(self) -> bytes:
        """Everything written since the last ``take``."""
        value: bytes = self.transport.value()  # type: ignore[no-untyped-call]
        self.transport.clear()  # type: ignore[no-untyped-call]
        return value

    def writes(self) -> int:
        """How many ``write`` calls the protocol made so far (not reset by ``take``)."""
        return self.write_calls[0]

    @property
    def closed(self) -> bool:
        """Whether the protocol asked the transport to close."""
        return bool(self.transport.disconnecting)


@dataclass
class Harness:
    """A scheduler, a fake store, fake runners and a factory, all on one ``Clock``."""

    clock: Clock
    store: FakeStore
    runner: FakeRunner
    scheduler: Scheduler
    factory: ZtickFactory

    def connect(self) -> Conn:
        """Build a connected protocol on a fresh ``StringTransport``."""
        proto = self.factory.buildProtocol(None)
        assert isinstance(proto, ZtickProtocol)
        transport = StringTransport()
        conn = Conn(proto, transport)
        original_write = transport.write

        def counting_write(data: bytes) -> None:
            conn.write_calls[0] += 1
            original_write(data)

        transport.write = counting_write
        proto.makeConnection(transport)
        return conn

    def disconnect(self, conn: Conn) -> None:
        """Tell the protocol its connection is gone."""
        conn.proto.connectionLost(None)


def make_harness(
    *,
    hold: bool = False,
    group: bool = False,
    runners: Mapping[RunnerKind, IRunner] | None = None,
    max_concurrent: int = 64,
    start: bool = True,
) -> Harness:
    """Wire a scheduler and a factory on a ``Clock`` at ``EPOCH_S``."""
    clock = make_clock()
    store = FakeStore(hold=hold, group=group)
    runner = FakeRunner()
    scheduler = Scheduler(
        clock,
        store,
        runners if runners is not None else all_kinds(runner),
        max_concurrent=max_concurrent,
    )
    scheduler.replay(store.load())
    if start:
        scheduler.start()
    factory = ZtickFactory(scheduler, clock, persistence="memory")
    return Harness(clock, store, runner, scheduler, factory)


#: STAT's keys in order: SPEC §1's, then ztick-tw's lag keys, then SPEC §9's.  Written out
#: here (not read from the code) because this order is the contract the tests hold the daemon to.
STAT_KEYS = [
    "uptime_ns",
    "connections",
    "jobs_total",
    "jobs_planned",
    "jobs_triggered",
    "jobs_executed",
    "jobs_failed",
    "rules_total",
    "executions_pending",
    "executions_inflight",
    "persistence",
    "compression",
    "auth_enabled",
    "tls_enabled",
    "framerate",
    "trigger_lag_p50_us",
    "trigger_lag_p99_us",
    "trigger_lag_max_us",
    "jobs_paused",
    "schedules_total",
    "occurrences_missed",
    "runs_retried",
    "runs_timed_out",
]
