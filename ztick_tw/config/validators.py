"""One validator per key: the schema of every section, and the checks it is built from."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TypeVar, get_args

from ztick_tw.config.listen import _listen_endpoint
from ztick_tw.config.sections import (
    _MIB,
    _U16_MAX,
    _U32_MAX,
    InterruptedJobs,
    LogFormat,
    LogLevelName,
    MessageFormatName,
    Persistence,
    _describe,
    _Invalid,
    _quote,
)
from ztick_tw.schedules import parse_duration

# --------------------------------------------------------------------------- validators


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
        "max_connections": _integer(1, 1_000_000),
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
