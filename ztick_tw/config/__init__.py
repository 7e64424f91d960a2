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

from ztick_tw.config.listen import (
    listen_endpoint,
)
from ztick_tw.config.load import (
    load_config,
    parse_config,
)
from ztick_tw.config.sections import (
    CONFIG_MAX_BYTES,
    DEFAULT_LISTEN,
    DEFAULT_SOURCE,
    HISTORY_SUFFIX,
    Config,
    ConfigError,
    ControllerConfig,
    DatabaseConfig,
    HistoryConfig,
    HttpConfig,
    InterruptedJobs,
    LogConfig,
    LogFormat,
    LogLevelName,
    MessageFormatName,
    Persistence,
    RunnersConfig,
    SchedulerConfig,
    ShellConfig,
    TelemetryConfig,
)
from ztick_tw.config.validators import (
    KNOWN_KEYS,
)

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
