"""The values that flow through ztick-tw: jobs, rules, runner specs and log entries.

Everything here is immutable and does no I/O.  The same types are produced by the
line-protocol parser, stored by the scheduler, written by the logfile codec and shown
by ``dump``, so a value means the same thing at every layer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class JobStatus(enum.IntEnum):
    """A job's place in its life cycle; the value is the logfile status byte."""

    PLANNED = 0
    TRIGGERED = 1
    EXECUTED = 2
    FAILED = 3

    @property
    def wire(self) -> str:
        """The lower-case name used on the wire and in dumps (``planned`` ...)."""
        return self.name.lower()


class Shown(enum.Enum):
    """A status shown to clients that is never a status byte (SPEC §9: ``paused``)."""

    PAUSED = "paused"

    @property
    def wire(self) -> str:
        """The word used on the wire."""
        return self.value


#: What GET and QUERY show: a status byte's meaning, or ``paused``.
ShownStatus = JobStatus | Shown


class RunnerKind(enum.IntEnum):
    """The runner kind byte of a rule frame, and the word used in ``RULE SET``."""

    SHELL = 0
    AMQP = 1
    DIRECT = 2
    AWF = 3
    HTTP = 4
    REDIS = 5

    @property
    def wire(self) -> str:
        """The lower-case runner word (``shell``, ``direct`` ...)."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class ShellSpec:
    """``shell <command>``: run ``<shell.path> <shell.args...> <command>``."""

    command: str

    kind = RunnerKind.SHELL

    def args(self) -> tuple[str, ...]:
        """The runner arguments as they appear after the runner word."""
        return (self.command,)


@dataclass(frozen=True, slots=True)
class DirectSpec:
    """``direct <executable> [args...]``: execve with literal arguments, no shell."""

    executable: str
    arguments: tuple[str, ...] = ()

    kind = RunnerKind.DIRECT

    def args(self) -> tuple[str, ...]:
        """The runner arguments as they appear after the runner word."""
        return (self.executable, *self.arguments)


@dataclass(frozen=True, slots=True)
class AwfSpec:
    """``awf <workflow> [--input key=value ...]``: runs ``awf run <workflow> ...``."""

    workflow: str
    inputs: tuple[str, ...] = ()  # each "key=value"

    kind = RunnerKind.AWF

    def args(self) -> tuple[str, ...]:
        """The runner arguments as they appear after the runner word."""
        out: list[str] = [self.workflow]
        for item in self.inputs:
            out += ["--input", item]
        return tuple(out)


@dataclass(frozen=True, slots=True)
class HttpSpec:
    """``http <GET|POST|PUT|DELETE> <url>``."""

    method: str
    url: str

    kind = RunnerKind.HTTP

    def args(self) -> tuple[str, ...]:
        """The runner arguments as they appear after the runner word."""
        return (self.method, self.url)


@dataclass(frozen=True, slots=True)
class AmqpSpec:
    """``amqp <dsn> <exchange> <routing_key>``."""

    dsn: str
    exchange: str
    routing_key: str

    kind = RunnerKind.AMQP

    def args(self) -> tuple[str, ...]:
        """The runner arguments as they appear after the runner word."""
        return (self.dsn, self.exchange, self.routing_key)


@dataclass(frozen=True, slots=True)
class RedisSpec:
    """``redis <url> <PUBLISH|RPUSH|LPUSH|SET> <key>``."""

    url: str
    command: str
    key: str

    kind = RunnerKind.REDIS

    def args(self) -> tuple[str, ...]:
        """The runner arguments as they appear after the runner word."""
        return (self.url, self.command, self.key)


RunnerSpec = ShellSpec | DirectSpec | AwfSpec | HttpSpec | AmqpSpec | RedisSpec


@dataclass(frozen=True, slots=True)
class Job:
    """A job as seen from outside the scheduler (GET, QUERY, the log)."""

    id: str
    execution_ns: int
    status: JobStatus = JobStatus.PLANNED


@dataclass(frozen=True, slots=True)
class Rule:
    """A prefix rule: jobs whose id starts with ``pattern`` run with ``runner``."""

    id: str
    pattern: str
    runner: RunnerSpec


@dataclass(frozen=True, slots=True)
class JobRemoval:
    """Log entry: the job ``id`` was removed."""

    id: str


@dataclass(frozen=True, slots=True)
class RuleRemoval:
    """Log entry: the rule ``id`` was removed."""

    id: str


# -- ztick-tw extensions (SPEC §8-9): frame types from 16 up, skipped by ztick ----------


@dataclass(frozen=True, slots=True)
class ScheduleSet:
    """Log entry (type 16): job ``job_id`` recurs on ``text`` with ``options``.

    ``options`` is the canonical ``key=value ...`` rendering of every option (as
    ``SCHEDULE GET`` lists it); ``start_ns`` is the resolved start (``starting ...``
    read at SET time, or the SET time itself), so a restart recomputes the same instants.
    """

    job_id: str
    text: str
    options: str
    start_ns: int


@dataclass(frozen=True, slots=True)
class ScheduleRemoval:
    """Log entry (type 17): job ``job_id`` no longer recurs (the job itself stays)."""

    job_id: str


@dataclass(frozen=True, slots=True)
class RunState:
    """Log entry (type 18): where a scheduled or retried job stands.

    ``runs``: occurrences fired so far (for ``limit``); ``occurrence_ns``: the schedule's
    own instant (before jitter) the job is planned for, ``I64_MIN`` when the schedule has
    ended or the job has none; ``attempt``: the attempt the next start will be (1 = a
    first attempt); ``due_ns``: the due time that attempt belongs to (what
    ``ZTICK_EXECUTION_NS`` shows across retries).  Written right after the type-0 frame
    that plans the job's next time (a replayed ``planned`` frame resets a job's attempt
    count, as it always has; this frame then sets it).
    """

    job_id: str
    runs: int
    occurrence_ns: int
    attempt: int
    due_ns: int


@dataclass(frozen=True, slots=True)
class Pause:
    """Log entry (type 19): job ``job_id`` was paused (``paused``) or resumed at ``since_ns``."""

    job_id: str
    paused: bool
    since_ns: int


@dataclass(frozen=True, slots=True)
class Policy:
    """A rule's execution policy (``RULE POLICY``); ``None`` means the ``[runners]`` default.

    ``timeout_ns``: a run is ended after this long (outcome ``timeout``); ``retries``:
    further attempts after a failed one; ``backoff_min_ns``/``backoff_max_ns``: the
    exponential backoff with full jitter between attempts.
    """

    timeout_ns: int | None = None
    retries: int | None = None
    backoff_min_ns: int | None = None
    backoff_max_ns: int | None = None


@dataclass(frozen=True, slots=True)
class RulePolicy:
    """Log entry (type 20): rule ``rule_id``'s policy is now ``policy``."""

    rule_id: str
    policy: Policy


#: The extension entries (types 16-20); ztick skips them when it loads a ztick-tw log.
Extension = ScheduleSet | ScheduleRemoval | RunState | Pause | RulePolicy

#: One logfile frame, decoded.
Entry = Job | Rule | JobRemoval | RuleRemoval | Extension

#: The largest string the logfile format can hold (u16 length prefix).
MAX_STRING_BYTES = 65535

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
