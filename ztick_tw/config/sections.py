"""The configuration's values: constants, ``ConfigError``, a frozen dataclass a section.

``Config`` holds one of each; the error-text helpers the other modules share are here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from twisted.logger import LogLevel

LogLevelName = Literal["off", "error", "warn", "info", "debug", "trace"]
LogFormat = Literal["text", "json"]
Persistence = Literal["logfile", "memory"]
InterruptedJobs = Literal["rerun", "fail"]
MessageFormatName = Literal["ztick", "json"]

DEFAULT_LISTEN = "127.0.0.1:5678"
DEFAULT_SOURCE = "(built-in defaults)"
"""The name used for the file in errors when no config file was given."""

CONFIG_MAX_BYTES = 1 << 20
"""The largest config file read (1 MiB); ``-c /dev/zero`` must not read for ever."""

HISTORY_SUFFIX = ".history.sqlite"
"""Appended to ``logfile_path`` to name the run history's default file."""

_MIB = 1 << 20

_U16_MAX = 65535
_U32_MAX = 2**32 - 1

_ENDPOINT_PREFIXES = ("tcp:", "tcp6:", "unix:", "systemd:", "ssl:")

_TWISTED_LEVELS: Mapping[str, LogLevel | None] = {
    "off": None,
    "error": LogLevel.error,
    "warn": LogLevel.warn,
    "info": LogLevel.info,
    "debug": LogLevel.debug,
    "trace": LogLevel.debug,
}


class ConfigError(Exception):
    """Configuration problems; ``str()`` is one line per problem: file, key, problem.

    ``errors`` holds one ``ConfigError`` per problem, in the order of the file (the
    error itself when there is only one).  The parts of the first problem are kept as
    attributes (``source``, ``section``, ``key``, ``problem``, ``line``) for callers
    that want them; any of them but ``problem`` may be ``None``.
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        section: str | None = None,
        key: str | None = None,
        line: int | None = None,
        errors: Sequence[ConfigError] = (),
    ) -> None:
        self.problem = problem
        self.source = source
        self.section = section
        self.key = key
        self.line = line
        self.errors: tuple[ConfigError, ...] = tuple(errors) if len(errors) > 1 else (self,)
        super().__init__(self._render())

    @classmethod
    def several(cls, errors: Sequence[ConfigError]) -> ConfigError:
        """One error reporting every problem in ``errors`` (non-empty), in that order."""
        if len(errors) == 1:
            return errors[0]
        first = errors[0]
        return cls(
            first.problem,
            source=first.source,
            section=first.section,
            key=first.key,
            line=first.line,
            errors=errors,
        )

    def _render(self) -> str:
        if len(self.errors) > 1:
            return "\n".join(error._render() for error in self.errors)
        parts: list[str] = []
        if self.source is not None:
            parts.append(self.source)
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.section is not None and self.key is not None:
            parts.append(f"[{self.section}] {self.key}")
        elif self.section is not None:
            parts.append(f"[{self.section}]")
        elif self.key is not None:
            parts.append(self.key)
        parts.append(self.problem)
        return ": ".join(parts)

    def __str__(self) -> str:
        return self._render()

    def with_source(self, source: str) -> ConfigError:
        """Return a copy of this error (of each of its problems) naming ``source`` as the file."""
        if len(self.errors) > 1:
            return ConfigError.several([error.with_source(source) for error in self.errors])
        return ConfigError(
            self.problem, source=source, section=self.section, key=self.key, line=self.line
        )


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class LogConfig:
    """``[log]``: how much the daemon logs and in which format."""

    level: LogLevelName = "info"
    format: LogFormat = "text"  # ztick-tw extension

    @property
    def min_level(self) -> LogLevel | None:
        """The lowest Twisted ``LogLevel`` to emit, or ``None`` for ``off`` (``trace`` = debug)."""
        return _TWISTED_LEVELS[self.level]


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    """``[controller]``: the line-protocol listener, its authentication and TLS."""

    listen: str = DEFAULT_LISTEN
    """The value as written (``host:port`` or a Twisted endpoint string)."""
    listen_endpoint: str = "tcp:5678:interface=127.0.0.1"
    """``listen`` as a Twisted server endpoint string, for ``serverFromString``."""
    auth_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None  # ztick-tw extension
    """PEM CA certificates; when set, clients must present a certificate they signed."""
    max_connections: int = 4096  # ztick-tw extension
    """Connections served at once; more are closed at once (and logged)."""
    idle_timeout: float = 900.0  # ztick-tw extension
    """Seconds a connection may send nothing before it is closed; 0 turns it off."""
    max_unauthenticated: int = 256  # ztick-tw extension
    """With auth on: connections that have not yet sent a valid AUTH, held at once."""
    max_unauthenticated_per_source: int = 32  # ztick-tw extension
    """With auth on: the same, per client address."""

    @property
    def tls_enabled(self) -> bool:
        """True when the listener is to be wrapped in TLS (both cert and key are set)."""
        return self.tls_cert is not None and self.tls_key is not None

    @property
    def auth_enabled(self) -> bool:
        """True when an auth file is configured."""
        return self.auth_file is not None


@dataclass(frozen=True, slots=True)
class ShellConfig:
    """``[shell]``: how the ``shell`` runner starts a command."""

    path: str = "/bin/sh"
    args: tuple[str, ...] = ("-c",)


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """``[database]``: persistence backend, logfile and compaction."""

    persistence: Persistence = "logfile"
    logfile_path: str = "logfile"
    fsync_on_persist: bool = True
    framerate: int = 512
    compression_interval: int = 3600
    """Seconds between compactions; 0 turns compaction off."""
    recover_corrupt_log: bool = False  # ztick-tw extension
    retention: float = 0.0  # ztick-tw extension
    """Seconds executed/failed jobs are kept after their execution time; 0 = forever."""


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """``[http]``: the REST API listener; off when ``listen`` is ``None``."""

    listen: str | None = None
    listen_endpoint: str | None = None
    max_connections: int = 1024

    @property
    def enabled(self) -> bool:
        """True when the REST API is to be served."""
        return self.listen_endpoint is not None


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """``[telemetry]``: OpenTelemetry export settings (accepted for ztick compatibility)."""

    enabled: bool = False
    endpoint: str | None = None
    service_name: str = "ztick"
    flush_interval_ms: int = 5000
    prometheus_listen: str | None = None  # ztick-tw extension: /metrics without a REST API
    prometheus_listen_endpoint: str | None = None


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """``[scheduler]`` (ztick-tw extension): how runner executions are run."""

    max_concurrent_runs: int = 64
    max_concurrent_network_runs: int = 4096
    interrupted_jobs: InterruptedJobs = "rerun"
    run_timeout: float = 0.0
    """Seconds a shell/direct/awf run may take before it is terminated; 0 = no limit."""
    output_limit_bytes: int = 65536
    shutdown_grace: float = 10.0


@dataclass(frozen=True, slots=True)
class RunnersConfig:
    """``[runners]`` (ztick-tw extension): how the http, redis and amqp runners deliver."""

    timeout: float = 30.0
    """Seconds one delivery may take, connecting included (ztick's fixed 30 s)."""
    message_format: MessageFormatName = "ztick"
    http_ca_file: str | None = None
    http_signing_secret_file: str | None = None
    http_max_response_bytes: int = 65536
    amqp_persistent: bool = True
    amqp_ca_file: str | None = None
    retries: int = 0
    """Default rule policy (SPEC §9): attempts after a failed one; 0 = no retry."""
    backoff_min_ns: int = 1_000_000_000
    """Default rule policy: ``backoff = "<min>..<max>"``, the shortest wait before a retry."""
    backoff_max_ns: int = 300_000_000_000
    """Default rule policy: the longest wait before a retry (the exponential's cap)."""


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    """``[history]`` (ztick-tw extension): the per-job run history of SPEC §9."""

    runs: int = 20
    """Runs kept per job (the newest)."""
    output_bytes: int = 4096
    """Bytes of output kept per run (the tail)."""
    path: str | None = None
    """The SQLite file as written; ``None``: the default, see ``Config.history_path``."""


@dataclass(frozen=True, slots=True)
class Config:
    """The whole validated configuration; ``Config()`` is the built-in default."""

    log: LogConfig = field(default_factory=LogConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    shell: ShellConfig = field(default_factory=ShellConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runners: RunnersConfig = field(default_factory=RunnersConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    source: str = DEFAULT_SOURCE
    """The file this configuration was read from (or ``DEFAULT_SOURCE``)."""
    #: Things accepted for ztick's sake that an operator should fix (logged at startup).
    warnings: tuple[str, ...] = ()

    @property
    def history_path(self) -> str | None:
        """The run history's SQLite file; ``None``: kept in memory.

        ``[history] path`` when set; otherwise ``<logfile_path>.history.sqlite`` beside the
        logfile, or in memory with ``persistence = "memory"``.
        """
        if self.history.path is not None:
            return self.history.path
        if self.database.persistence == "memory":
            return None
        return self.database.logfile_path + HISTORY_SUFFIX


# --------------------------------------------------------------------------- error text


class _Invalid(ValueError):
    """A value problem, without the file/key context (added by the caller)."""


def _quote(text: str) -> str:
    """Quote a string TOML-style on one line (control characters escaped)."""
    return json.dumps(text, ensure_ascii=False)


def _describe(value: object) -> str:
    """Render a TOML value for an error message, TOML-style."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__} value"
