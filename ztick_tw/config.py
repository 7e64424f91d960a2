"""Configuration: a ztick TOML file turned into a validated, immutable ``Config``.

Every key of ztick's configuration is accepted with ztick's meaning and default, so a
ztick config file loads unchanged; ztick-tw adds a few keys of its own (``[log] format``,
the ``[scheduler]``, ``[runners]`` and ``[history]`` sections, ``[database]
recover_corrupt_log``).
Validation is strict: an unknown section or key, a value of the wrong TOML type or
outside its range, or a bad combination raises :class:`ConfigError`, whose text is one
line per problem naming the file, the key and the problem; every problem in the file is
reported at once (a TOML syntax error stops the reading, so it comes alone).  A config
file is at most ``CONFIG_MAX_BYTES`` (1 MiB).  ``docs/configuration.md`` is the
reference for every key.

``[controller] listen`` and ``[http] listen`` take ztick's ``host:port`` form or a Twisted
server endpoint string; :func:`listen_endpoint` turns the former into the latter, and the
``Config`` keeps both.

Relative paths (``logfile_path``, ``auth_file``, ``tls_cert``, ``tls_key``,
``[shell] path``, ``[history] path``) are kept as written and resolved against the
process's current directory when used, as ztick does; they are not made relative to the
config file.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import socket
import stat
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast, get_args

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel

from ztick_tw.schedules import parse_duration

__all__ = [
    "CONFIG_MAX_BYTES",
    "DEFAULT_LISTEN",
    "DEFAULT_SOURCE",
    "HISTORY_SUFFIX",
    "KNOWN_KEYS",
    "Config",
    "ConfigError",
    "ControllerConfig",
    "DatabaseConfig",
    "HistoryConfig",
    "HttpConfig",
    "InterruptedJobs",
    "LogConfig",
    "LogFormat",
    "LogLevelName",
    "MessageFormatName",
    "Persistence",
    "RunnersConfig",
    "SchedulerConfig",
    "ShellConfig",
    "TelemetryConfig",
    "listen_endpoint",
    "load_config",
    "parse_config",
]

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


# --------------------------------------------------------------------------- listen


class _Invalid(ValueError):
    """A value problem, without the file/key context (added by the caller)."""


def _escape_endpoint_value(text: str) -> str:
    r"""Escape ``\``, ``:`` and ``=`` for a Twisted endpoint string argument."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _split_endpoint_args(text: str) -> list[str]:
    """Split an endpoint description on unescaped colons, keeping escapes (for checks only)."""
    parts: list[str] = []
    current: list[str] = []
    escaped = False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _is_hostname(text: str) -> bool:
    if not text or len(text) > 253:
        return False
    return all(_HOSTNAME_LABEL.match(label) for label in text.rstrip(".").split("."))


def _parse_port(text: str, value: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise _Invalid(f"port must be a number from 1 to 65535, got {_quote(value)}")
    port = int(text)
    if not 1 <= port <= _U16_MAX:
        raise _Invalid(f"port must be from 1 to 65535, got {port} in {_quote(value)}")
    return port


def _ipv6_host(text: str) -> str | None:
    """Return ``text`` if it is an IPv6 address (optionally with a ``%zone``), else None."""
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return text


def _check_systemd(value: str) -> None:
    args = _split_endpoint_args(value)[1:]
    options: dict[str, str] = {}
    for arg in args:
        name, sep, val = arg.partition("=")
        if not sep or name not in ("domain", "index", "name"):
            raise _Invalid(
                f"systemd endpoint takes domain=, index= or name= arguments, got {_quote(arg)} "
                f"in {_quote(value)}"
            )
        options[name] = val
    domain = options.get("domain")
    if domain is None or not hasattr(socket, "AF_" + domain):
        raise _Invalid(f"systemd endpoint needs domain=INET, INET6 or UNIX in {_quote(value)}")
    if ("index" in options) == ("name" in options):
        raise _Invalid(f"systemd endpoint needs exactly one of index= or name= in {_quote(value)}")
    index = options.get("index")
    if index is not None and not (index.isascii() and index.isdigit()):
        raise _Invalid(
            f"systemd endpoint index must be a number, got {_quote(index)} in {_quote(value)}"
        )


def _passthrough(value: str) -> str:
    if value.startswith("systemd:"):
        # The systemd parser looks up inherited descriptors as it parses, which only
        # works under systemd; check the syntax here and leave the rest to startup.
        _check_systemd(value)
        return value
    try:
        # Parsing only: the endpoint is built against a fake reactor and never listens.
        reactor = MemoryReactor()  # type: ignore[no-untyped-call]
        serverFromString(reactor, value)  # type: ignore[no-untyped-call]
    except Exception as exc:  # the parsers raise ValueError, TypeError, KeyError...
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise _Invalid(f"invalid Twisted endpoint string {_quote(value)}: {detail}") from exc
    if value.startswith("unix:"):
        args = _split_endpoint_args(value)[1:]
        address = next((a for a in args if "=" not in a), None)
        if address is None:
            address = next((a[8:] for a in args if a.startswith("address=")), "")
        if not address:
            raise _Invalid(f"unix endpoint needs a socket path, got {_quote(value)}")
    return value


def _listen_endpoint(value: str) -> str:
    if not value:
        raise _Invalid("must not be empty; use host:port (e.g. 127.0.0.1:5678)")
    if value.startswith(_ENDPOINT_PREFIXES):
        return _passthrough(value)
    if any(char.isspace() for char in value):
        raise _Invalid(f"must not contain spaces, got {_quote(value)}")
    if value.startswith("["):
        match = re.fullmatch(r"\[([^\]]*)\]:([^:]*)", value)
        if match is None:
            raise _Invalid(f"expected [IPv6-address]:port, got {_quote(value)}")
        host = _ipv6_host(match.group(1))
        if host is None:
            raise _Invalid(f"{_quote(match.group(1))} is not an IPv6 address in {_quote(value)}")
        port = _parse_port(match.group(2), value)
        return f"tcp6:{port}:interface={_escape_endpoint_value(host)}"
    host, sep, port_text = value.rpartition(":")
    if not sep:
        raise _Invalid(
            f"expected host:port (e.g. 127.0.0.1:5678) or a Twisted endpoint string "
            f"(tcp:, tcp6:, unix:, ssl:, systemd:), got {_quote(value)}"
        )
    port = _parse_port(port_text, value)
    if not host:
        raise _Invalid(f"host is empty in {_quote(value)}; use 0.0.0.0:{port} for all interfaces")
    if ":" in host:
        # ztick splits at the last colon, so an unbracketed IPv6 address works there too.
        ipv6 = _ipv6_host(host)
        if ipv6 is None:
            raise _Invalid(f"{_quote(host)} is not an IPv6 address in {_quote(value)}")
        return f"tcp6:{port}:interface={_escape_endpoint_value(ipv6)}"
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _is_hostname(host) or host.replace(".", "").isdigit():
            raise _Invalid(
                f"{_quote(host)} is not an IPv4 address or host name in {_quote(value)}"
            ) from None
    return f"tcp:{port}:interface={host}"


def listen_endpoint(value: str, *, section: str = "controller") -> str:
    """Turn a ``listen`` value into a Twisted server endpoint string.

    ztick's ``host:port`` becomes ``tcp:PORT:interface=HOST`` (``tcp6:`` for an IPv6
    host, written ``[::1]:5678``, or unbracketed ``::1:5678`` as ztick accepts, with
    colons escaped as Twisted requires; ``localhost`` becomes 127.0.0.1).  A value that
    already is a ``tcp:``, ``tcp6:``, ``unix:``, ``ssl:`` or ``systemd:`` endpoint string
    is checked with Twisted's parser and returned unchanged (port 0 is allowed there).

    Raises :class:`ConfigError` naming ``[section] listen`` (without a file) on garbage.
    """
    try:
        return _listen_endpoint(value)
    except _Invalid as exc:
        raise ConfigError(str(exc), section=section, key="listen") from None


# --------------------------------------------------------------------------- validators


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


_Validator = Callable[[object], object]
_T = TypeVar("_T", bound=str)


def _string(*, allow_empty: bool = False, what: str = "a string") -> _Validator:
    def check(value: object) -> object:
        if not isinstance(value, str):
            raise _Invalid(f"must be {what}, got {_describe(value)}")
        if not value and not allow_empty:
            raise _Invalid(f"must be {what}, not empty")
        if "\x00" in value:
            raise _Invalid(f"must be {what} without NUL characters")
        return value

    return check


def _choice(choices: tuple[_T, ...]) -> _Validator:
    def check(value: object) -> object:
        if not isinstance(value, str) or value not in choices:
            listed = ", ".join(f'"{c}"' for c in choices)
            raise _Invalid(f"must be one of {listed}, got {_describe(value)}")
        return value

    return check


def _boolean(value: object) -> object:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {_describe(value)}")
    return value


def _integer(low: int, high: int | None = None) -> _Validator:
    wanted = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def check(value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"must be {wanted}, got {_describe(value)}")
        if value < low or (high is not None and value > high):
            raise _Invalid(f"must be {wanted}, got {value}")
        return value

    return check


def _seconds(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(f"must be a number of seconds >= 0, got {_describe(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Invalid(f"must be a finite number of seconds >= 0, got {value}")
    if value < 0:
        raise _Invalid(f"must be a number of seconds >= 0, got {value}")
    return float(value)


def _positive_seconds(value: object) -> object:
    seconds = _seconds(value)
    if seconds == 0:
        raise _Invalid("must be a number of seconds > 0, got 0")
    return seconds


def _backoff(value: object) -> object:
    wanted = 'two durations "<min>..<max>" (e.g. "1s..5m")'
    if not isinstance(value, str):
        raise _Invalid(f"must be {wanted}, got {_describe(value)}")
    low_text, dots, high_text = value.partition("..")
    if not dots:
        raise _Invalid(f"must be {wanted}, got {_quote(value)}")
    try:
        low, high = parse_duration(low_text.strip()), parse_duration(high_text.strip())
    except ValueError as exc:
        raise _Invalid(f"must be {wanted}: {exc}") from None
    if low > high:
        raise _Invalid(f"the minimum {low_text.strip()} is above the maximum {high_text.strip()}")
    return (low, high)


def _string_list(value: object) -> object:
    if not isinstance(value, list):
        raise _Invalid(f"must be an array of strings, got {_describe(value)}")
    for index, item in enumerate(value, start=1):
        if not isinstance(item, str):
            raise _Invalid(f"must be an array of strings; item {index} is {_describe(item)}")
        if "\x00" in item:
            raise _Invalid(f"must be an array of strings; item {index} contains a NUL character")
    return tuple(value)


def _listen(value: object) -> object:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string (host:port or endpoint), got {_describe(value)}")
    return (value, _listen_endpoint(value))


_PATH = _string(what="a non-empty path")

# section -> key -> validator.  The order here is the order of docs/configuration.md.
_SCHEMA: dict[str, dict[str, _Validator]] = {
    "log": {
        "level": _choice(get_args(LogLevelName)),
        "format": _choice(get_args(LogFormat)),
    },
    "controller": {
        "listen": _listen,
        "auth_file": _PATH,
        "tls_cert": _PATH,
        "tls_key": _PATH,
        "tls_client_ca": _PATH,
        "max_connections": _integer(1, 1_000_000),
        "idle_timeout": _seconds,
        "max_unauthenticated": _integer(1, 1_000_000),
        "max_unauthenticated_per_source": _integer(1, 1_000_000),
    },
    "shell": {
        "path": _PATH,
        "args": _string_list,
    },
    "database": {
        "persistence": _choice(get_args(Persistence)),
        "logfile_path": _PATH,
        "fsync_on_persist": _boolean,
        "framerate": _integer(1, _U16_MAX),
        "compression_interval": _integer(0, _U32_MAX),
        "recover_corrupt_log": _boolean,
        "retention": _seconds,
    },
    "http": {
        "listen": _listen,
    },
    "telemetry": {
        "enabled": _boolean,
        "endpoint": _string(what="a non-empty URL"),
        "service_name": _string(what="a non-empty string"),
        "flush_interval_ms": _integer(1, _U32_MAX),
        "prometheus_listen": _listen,
    },
    "scheduler": {
        "max_concurrent_runs": _integer(1),
        "max_concurrent_network_runs": _integer(1),
        "interrupted_jobs": _choice(get_args(InterruptedJobs)),
        "run_timeout": _seconds,
        "output_limit_bytes": _integer(0),
        "shutdown_grace": _seconds,
    },
    "runners": {
        "timeout": _positive_seconds,
        "message_format": _choice(get_args(MessageFormatName)),
        "http_ca_file": _PATH,
        "http_signing_secret_file": _PATH,
        "http_max_response_bytes": _integer(0, _U32_MAX),
        "amqp_persistent": _boolean,
        "amqp_ca_file": _PATH,
        "retries": _integer(0, 1000),
        "backoff": _backoff,
    },
    "history": {
        "runs": _integer(1, 10_000),
        "output_bytes": _integer(0, _MIB),
        "path": _PATH,
    },
}


KNOWN_KEYS: Mapping[str, tuple[str, ...]] = {
    section: tuple(keys) for section, keys in _SCHEMA.items()
}
"""Every section and its keys, in documentation order."""


def _suggest(name: str, known: list[str]) -> str | None:
    """Return the known name closest to ``name``: a unique prefix/substring, else difflib's."""
    lowered = name.lower()
    if lowered in known:
        return lowered
    contained = [k for k in known if lowered and (k.startswith(lowered) or lowered in k)]
    if len(contained) == 1:
        return contained[0]
    close = difflib.get_close_matches(lowered, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key(section: str, key: str) -> ConfigError:
    known = list(_SCHEMA[section])
    suggestion = _suggest(key, known)
    if suggestion is not None:
        return ConfigError(f"unknown key [{section}] {key} (did you mean {suggestion}?)")
    elsewhere = [s for s, keys in _SCHEMA.items() if key in keys]
    if elsewhere:
        return ConfigError(
            f"unknown key [{section}] {key} (it belongs in [{elsewhere[0]}], not [{section}])"
        )
    listed = ", ".join(known)
    return ConfigError(f"unknown key [{section}] {key} (known keys: {listed})")


def _unknown_section(name: str) -> ConfigError:
    suggestion = _suggest(name, list(_SCHEMA))
    if suggestion is not None:
        return ConfigError(f"unknown section [{name}] (did you mean [{suggestion}]?)")
    listed = ", ".join(f"[{s}]" for s in _SCHEMA)
    return ConfigError(f"unknown section [{name}] (known sections: {listed})")


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_END = re.compile(r"\s*\(at end of document\)$")
_BARE_ASSIGNMENT = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*=\s*([A-Za-z0-9_][^\s#\"']*)\s*(?:#.*)?$")


def _bare_word_hint(line_text: str) -> str:
    """Suggest quotes when a line assigns an unquoted word (ztick's parser accepts that)."""
    match = _BARE_ASSIGNMENT.match(line_text)
    if match is None:
        return ""
    key, word = match.groups()
    try:
        tomllib.loads(f"v = {word}")
    except tomllib.TOMLDecodeError:
        return f'; strings need quotes in TOML: {key} = "{word}"'
    return ""


def _toml_error(exc: tomllib.TOMLDecodeError, text: str) -> ConfigError:
    message = str(exc)
    lines = text.splitlines()
    position = _TOML_POSITION.search(message)
    end = _TOML_END.search(message)
    if position is not None:
        line = int(position.group(1))
        detail = f"{message[: position.start()]} (column {position.group(2)})"
    elif end is not None:
        line = len(lines)
        while line > 1 and not lines[line - 1].strip():
            line -= 1
        line = max(line, 1)
        detail = f"{message[: end.start()]} (at end of file)"
    else:
        return ConfigError(f"invalid TOML: {message}")
    hint = _bare_word_hint(lines[line - 1]) if 0 < line <= len(lines) else ""
    return ConfigError(f"invalid TOML: {detail}{hint}", line=line)


def _check_shell_path(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise _Invalid(f"{path} does not exist") from None
    except OSError as exc:
        raise _Invalid(f"cannot use {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise _Invalid(f"{path} is a directory, not an executable")
    if not os.access(path, os.X_OK):
        raise _Invalid(f"{path} is not executable")


def _build(document: Mapping[str, Any]) -> Config:
    """Validate ``document``; raise one :class:`ConfigError` listing every problem in it."""
    errors: list[ConfigError] = []
    bad: set[tuple[str, str]] = set()
    values: dict[str, dict[str, object]] = {}
    for section, table in document.items():
        if section not in _SCHEMA:
            if isinstance(table, dict):
                errors.append(_unknown_section(section))
                continue
            owners = [s for s, keys in _SCHEMA.items() if section in keys]
            hint = f" (did you mean [{owners[0]}] {section}?)" if owners else ""
            errors.append(ConfigError(f"key {section} is outside any section{hint}"))
            continue
        if not isinstance(table, dict):
            errors.append(
                ConfigError(
                    f"must be a table (a [{section}] section), got {_describe(table)}",
                    section=section,
                )
            )
            bad.update((section, key) for key in _SCHEMA[section])
            continue
        parsed: dict[str, object] = {}
        for key, value in table.items():
            validator = _SCHEMA[section].get(key)
            if validator is None:
                errors.append(_unknown_key(section, key))
                continue
            try:
                parsed[key] = validator(value)
            except _Invalid as exc:
                errors.append(ConfigError(str(exc), section=section, key=key))
                bad.add((section, key))
        values[section] = parsed

    # Each section is built from its valid keys only, so that the checks below can
    # still run on the rest and report their problems in the same pass.
    log = LogConfig(**cast(dict[str, Any], values.get("log", {})))

    controller_values = dict(values.get("controller", {}))
    if "listen" in controller_values:
        listen, endpoint = cast(tuple[str, str], controller_values.pop("listen"))
        controller_values["listen"] = listen
        controller_values["listen_endpoint"] = endpoint
    controller = ControllerConfig(**cast(dict[str, Any], controller_values))

    shell = ShellConfig(**cast(dict[str, Any], values.get("shell", {})))
    database = DatabaseConfig(**cast(dict[str, Any], values.get("database", {})))

    http_values = dict(values.get("http", {}))
    if "listen" in http_values:
        listen, endpoint = cast(tuple[str, str], http_values.pop("listen"))
        http_values["listen"] = listen
        http_values["listen_endpoint"] = endpoint
    http = HttpConfig(**cast(dict[str, Any], http_values))

    telemetry_values = dict(values.get("telemetry", {}))
    if "prometheus_listen" in telemetry_values:
        listen, endpoint = cast(tuple[str, str], telemetry_values.pop("prometheus_listen"))
        telemetry_values["prometheus_listen"] = listen
        telemetry_values["prometheus_listen_endpoint"] = endpoint
    telemetry = TelemetryConfig(**cast(dict[str, Any], telemetry_values))
    scheduler = SchedulerConfig(**cast(dict[str, Any], values.get("scheduler", {})))
    runners_values = dict(values.get("runners", {}))
    if "backoff" in runners_values:
        low, high = cast(tuple[int, int], runners_values.pop("backoff"))
        runners_values["backoff_min_ns"] = low
        runners_values["backoff_max_ns"] = high
    runners = RunnersConfig(**cast(dict[str, Any], runners_values))
    history = HistoryConfig(**cast(dict[str, Any], values.get("history", {})))

    errors.extend(_combination_errors(controller, http, telemetry, bad))
    if ("shell", "path") not in bad:
        try:
            _check_shell_path(shell.path)
        except _Invalid as exc:
            errors.append(ConfigError(str(exc), section="shell", key="path"))
    if errors:
        raise ConfigError.several(errors)

    return Config(
        log=log,
        controller=controller,
        shell=shell,
        database=database,
        http=http,
        telemetry=telemetry,
        scheduler=scheduler,
        runners=runners,
        history=history,
    )


def _combination_errors(
    controller: ControllerConfig,
    http: HttpConfig,
    telemetry: TelemetryConfig,
    bad: set[tuple[str, str]],
) -> list[ConfigError]:
    """The problems of keys that are fine alone but not together.

    A check is skipped when one of its keys already has a problem of its own (``bad``),
    which would make it report nonsense.
    """

    def usable(*keys: str) -> bool:
        return not any(tuple(key.split(".")) in bad for key in keys)

    errors: list[ConfigError] = []
    tls_keys = ("controller.tls_cert", "controller.tls_key")
    if usable(*tls_keys) and controller.tls_cert is not None and controller.tls_key is None:
        errors.append(
            ConfigError(
                "set without [controller] tls_key; set both (TLS) or neither",
                section="controller",
                key="tls_cert",
            )
        )
    if usable(*tls_keys) and controller.tls_key is not None and controller.tls_cert is None:
        errors.append(
            ConfigError(
                "set without [controller] tls_cert; set both (TLS) or neither",
                section="controller",
                key="tls_key",
            )
        )
    if (
        usable(*tls_keys, "controller.tls_client_ca")
        and controller.tls_client_ca is not None
        and controller.tls_cert is None
        and controller.tls_key is None
    ):
        errors.append(
            ConfigError(
                "client certificates need TLS: set [controller] tls_cert and tls_key too",
                section="controller",
                key="tls_client_ca",
            )
        )
    if (
        usable(*tls_keys, "controller.listen")
        and controller.tls_enabled
        and controller.listen_endpoint.startswith("ssl:")
    ):
        errors.append(
            ConfigError(
                "an ssl: endpoint carries its own certificate; drop "
                "[controller] tls_cert and tls_key, or listen on host:port or tcp:",
                section="controller",
                key="listen",
            )
        )
    if (
        usable("controller.listen", "http.listen")
        and http.listen_endpoint is not None
        and http.listen_endpoint == controller.listen_endpoint
    ):
        errors.append(
            ConfigError(
                f"same address as [controller] listen ({controller.listen}); "
                "the REST API needs its own port",
                section="http",
                key="listen",
            )
        )
    for other, address in (
        ("controller.listen", controller.listen_endpoint),
        ("http.listen", http.listen_endpoint),
    ):
        if (
            usable(other, "telemetry.prometheus_listen")
            and telemetry.prometheus_listen_endpoint is not None
            and telemetry.prometheus_listen_endpoint == address
        ):
            errors.append(
                ConfigError(
                    f"same address as [{other.replace('.', '] ')}; /metrics needs its own port",
                    section="telemetry",
                    key="prometheus_listen",
                )
            )
    if (
        usable("telemetry.enabled", "telemetry.endpoint")
        and telemetry.enabled
        and telemetry.endpoint is None
    ):
        errors.append(
            ConfigError(
                "required when [telemetry] enabled = true (e.g. http://127.0.0.1:4318)",
                section="telemetry",
                key="endpoint",
            )
        )
    return errors


# --------------------------------------------------------------------------- entry points


def _quote_bare_words(text: str) -> tuple[str, list[str]]:
    """Quote unquoted string values (``persistence = memory``) as ztick's parser reads them.

    ztick's hand-written parser takes a bare word as a string; TOML does not.  Returns
    the rewritten text and one note per line changed.
    """
    out: list[str] = []
    notes: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        match = _BARE_ASSIGNMENT.match(line)
        if match is not None and _bare_word_hint(line):
            key, word = match.groups()
            line = f'{key} = "{word}"'
            notes.append(
                f'line {number}: unquoted value {word} read as the string "{word}", as ztick'
                f' does; write {key} = "{word}" to make the file valid TOML'
            )
        out.append(line)
    return "\n".join(out), notes


def parse_config(text: str, source: str) -> Config:
    """Parse and validate TOML ``text``; ``source`` names the file in error messages.

    A file that is not valid TOML only because of unquoted words (which ztick accepts)
    is read as ztick reads it, with a warning per line in ``Config.warnings``.
    """
    notes: list[str] = []
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        relaxed, notes = _quote_bare_words(text)
        if not notes:
            raise _toml_error(exc, text).with_source(source) from None
        try:
            document = tomllib.loads(relaxed)
        except tomllib.TOMLDecodeError as relaxed_exc:
            # Same line numbers: the rewrite changes lines, never adds or removes them.
            raise _toml_error(relaxed_exc, relaxed).with_source(source) from None
    try:
        config = _build(document)
    except ConfigError as exc:
        raise exc.with_source(source) from None
    warnings = tuple(f"{source}: {note}" for note in notes)
    return dataclasses.replace(config, source=source, warnings=warnings)


def load_config(path: str | None) -> Config:
    """Read and validate the config file at ``path``; ``None`` gives the built-in defaults.

    Any file that can be opened and is not a directory is read, a pipe too (``-c
    /dev/stdin``, ``-c <(...)``), but at most ``CONFIG_MAX_BYTES``: a longer one (or
    ``/dev/zero``) is refused without reading further.

    Unlike ztick, which silently falls back to defaults when the named file is missing,
    a file that cannot be read is an error: a typo in ``--config`` must not start a
    daemon on the wrong port with the wrong logfile.
    """
    if path is None:
        return parse_config("", DEFAULT_SOURCE)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(CONFIG_MAX_BYTES + 1)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"cannot read config file: {reason}", source=path) from None
    if len(raw) > CONFIG_MAX_BYTES:
        raise ConfigError(
            f"config file larger than {CONFIG_MAX_BYTES} bytes (1 MiB), the limit; "
            "is it the right file?",
            source=path,
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"invalid TOML: not valid UTF-8 (byte offset {exc.start})", source=path, line=line
        ) from None
    return parse_config(text, path)
