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


#: One logfile frame, decoded.
Entry = Job | Rule | JobRemoval | RuleRemoval

#: The largest string the logfile format can hold (u16 length prefix).
MAX_STRING_BYTES = 65535

I64_MIN = -(2**63)
I64_MAX = 2**63 - 1
