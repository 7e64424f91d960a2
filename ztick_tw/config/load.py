"""Reading a file: ``parse_config`` and ``load_config``.

TOML errors with their positions, unknown keys with suggestions, building ``Config``
from the validated values, and the checks that span keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from typing import Any, cast

from ztick_tw.config.sections import (
    CONFIG_MAX_BYTES,
    DEFAULT_SOURCE,
    Config,
    ConfigError,
    ControllerConfig,
    DatabaseConfig,
    HistoryConfig,
    HttpConfig,
    LogConfig,
    RunnersConfig,
    SchedulerConfig,
    ShellConfig,
    TelemetryConfig,
    _describe,
    _Invalid,
)
from ztick_tw.config.validators import _SCHEMA


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


def _listen_split(section: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``section``'s values with ``key``'s pair split in two, as the dataclass has them.

    The ``_listen`` validator gives ``(as written, endpoint string)``: these become ``key``
    and ``<key>_endpoint``.
    """
    values = dict(section)
    if key in values:
        values[key], values[f"{key}_endpoint"] = cast(tuple[str, str], values[key])
    return values


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

    controller = ControllerConfig(**_listen_split(values.get("controller", {}), "listen"))

    shell = ShellConfig(**cast(dict[str, Any], values.get("shell", {})))
    database = DatabaseConfig(**cast(dict[str, Any], values.get("database", {})))

    http = HttpConfig(**_listen_split(values.get("http", {}), "listen"))

    telemetry = TelemetryConfig(**_listen_split(values.get("telemetry", {}), "prometheus_listen"))
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
