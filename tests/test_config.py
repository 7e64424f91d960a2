"""Tests for ztick_tw.config: defaults, every key, every error message, listen endpoints."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import twisted.test
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel

from ztick_tw.config import (
    CONFIG_MAX_BYTES,
    DEFAULT_LISTEN,
    DEFAULT_SOURCE,
    HISTORY_SUFFIX,
    KNOWN_KEYS,
    Config,
    ConfigError,
    ControllerConfig,
    DatabaseConfig,
    HistoryConfig,
    HttpConfig,
    LogConfig,
    SchedulerConfig,
    ShellConfig,
    TelemetryConfig,
    listen_endpoint,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc"
SRC = "etc/ztick.toml"
SERVER_PEM = Path(twisted.test.__file__).parent / "server.pem"


def _error(text: str, source: str = SRC) -> str:
    """Parse ``text`` expecting a ConfigError and return its message."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, source)
    return str(info.value)


def _listen_tcp(endpoint: str) -> tuple[int, str]:
    """Listen on ``endpoint`` with a MemoryReactor and return the (port, interface) used."""
    reactor = MemoryReactor()  # type: ignore[no-untyped-call]
    serverFromString(reactor, endpoint).listen(Factory())  # type: ignore[no-untyped-call]
    ((port, _factory, _backlog, interface),) = reactor.tcpServers
    return port, interface


# ----------------------------------------------------------------------------- defaults


def test_no_file_gives_spec_defaults() -> None:
    """load_config(None) gives SPEC section 4 defaults for every ztick key."""
    config = load_config(None)
    assert config.source == DEFAULT_SOURCE
    assert config.log.level == "info"
    assert config.controller.listen == "127.0.0.1:5678"
    assert config.controller.listen_endpoint == "tcp:5678:interface=127.0.0.1"
    assert config.controller.auth_file is None
    assert config.controller.tls_cert is None
    assert config.controller.tls_key is None
    assert config.shell.path == "/bin/sh"
    assert config.shell.args == ("-c",)
    assert config.database.persistence == "logfile"
    assert config.database.logfile_path == "logfile"
    assert config.database.fsync_on_persist is True
    assert config.database.framerate == 512
    assert config.database.compression_interval == 3600
    assert config.http.listen is None
    assert config.http.listen_endpoint is None
    assert config.telemetry.enabled is False
    assert config.telemetry.endpoint is None
    assert config.telemetry.service_name == "ztick"
    assert config.telemetry.flush_interval_ms == 5000


def test_no_file_gives_extension_defaults() -> None:
    """The ztick-tw extension keys default to text logs, 64 runs, rerun, no timeout..."""
    config = load_config(None)
    assert config.log.format == "text"
    assert config.database.recover_corrupt_log is False
    assert config.scheduler == SchedulerConfig(
        max_concurrent_runs=64,
        interrupted_jobs="rerun",
        run_timeout=0.0,
        output_limit_bytes=65536,
        shutdown_grace=10.0,
    )


def test_no_file_equals_dataclass_defaults() -> None:
    """The embedded default is Config(): the dataclass defaults and the parser agree."""
    assert load_config(None) == Config()
    assert parse_config("", DEFAULT_SOURCE) == Config()


def test_default_listen_endpoint_matches_conversion() -> None:
    """The stored default endpoint string is what listen_endpoint makes of the default."""
    assert ControllerConfig().listen == DEFAULT_LISTEN
    assert ControllerConfig().listen_endpoint == listen_endpoint(DEFAULT_LISTEN)


def test_empty_sections_keep_defaults() -> None:
    """Sections present but empty change nothing."""
    text = "\n".join(f"[{section}]" for section in KNOWN_KEYS)
    assert parse_config(text, "x.toml") == dataclasses.replace(Config(), source="x.toml")


def test_config_is_frozen() -> None:
    """Config and its sections cannot be changed after loading."""
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.database.framerate = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.log = LogConfig()  # type: ignore[misc]


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("off", None),
        ("error", LogLevel.error),
        ("warn", LogLevel.warn),
        ("info", LogLevel.info),
        ("debug", LogLevel.debug),
        ("trace", LogLevel.debug),
    ],
)
def test_log_level_maps_to_twisted(level: str, expected: LogLevel | None) -> None:
    """Each [log] level maps to the lowest Twisted LogLevel to emit (off = None)."""
    config = parse_config(f'[log]\nlevel = "{level}"\n', SRC)
    assert config.log.level == level
    assert config.log.min_level is expected


# ----------------------------------------------------------------------------- every key

FULL = """
[log]
level = "debug"
format = "json"

[controller]
listen = "0.0.0.0:9000"
auth_file = "auth.toml"
tls_cert = "certs/server.crt"
tls_key = "certs/server.key"

[shell]
path = "/bin/sh"
args = ["-e", "-c"]

[database]
persistence = "memory"
logfile_path = "data/ztick.log"
fsync_on_persist = false
framerate = 100
compression_interval = 0
recover_corrupt_log = true

[http]
listen = "[::1]:5680"

[telemetry]
enabled = true
endpoint = "http://collector:4318"
service_name = "my-service"
flush_interval_ms = 10000

[scheduler]
max_concurrent_runs = 8
max_concurrent_network_runs = 500
interrupted_jobs = "fail"
run_timeout = 2.5
output_limit_bytes = 0
shutdown_grace = 3
"""


def test_every_key_is_parsed() -> None:
    """A file setting every key gives exactly those values, typed."""
    config = parse_config(FULL, "full.toml")
    assert config == Config(
        log=LogConfig(level="debug", format="json"),
        controller=ControllerConfig(
            listen="0.0.0.0:9000",
            listen_endpoint="tcp:9000:interface=0.0.0.0",
            auth_file="auth.toml",
            tls_cert="certs/server.crt",
            tls_key="certs/server.key",
        ),
        shell=ShellConfig(path="/bin/sh", args=("-e", "-c")),
        database=DatabaseConfig(
            persistence="memory",
            logfile_path="data/ztick.log",
            fsync_on_persist=False,
            framerate=100,
            compression_interval=0,
            recover_corrupt_log=True,
        ),
        http=HttpConfig(listen="[::1]:5680", listen_endpoint="tcp6:5680:interface=\\:\\:1"),
        telemetry=TelemetryConfig(
            enabled=True,
            endpoint="http://collector:4318",
            service_name="my-service",
            flush_interval_ms=10000,
        ),
        scheduler=SchedulerConfig(
            max_concurrent_runs=8,
            max_concurrent_network_runs=500,
            interrupted_jobs="fail",
            run_timeout=2.5,
            output_limit_bytes=0,
            shutdown_grace=3.0,
        ),
        source="full.toml",
    )
    assert config.controller.tls_enabled
    assert config.controller.auth_enabled
    assert config.http.enabled
    assert isinstance(config.scheduler.shutdown_grace, float)


def test_relative_paths_are_kept_as_written() -> None:
    """Relative paths are not resolved against the config file's directory."""
    config = parse_config(
        '[database]\nlogfile_path = "sub/ztick.log"\n[controller]\nauth_file = "a.toml"\n',
        "/etc/elsewhere/ztick.toml",
    )
    assert config.database.logfile_path == "sub/ztick.log"
    assert config.controller.auth_file == "a.toml"


def test_shell_args_may_be_empty() -> None:
    """[shell] args = [] is allowed, as in ztick (the command is the only argument)."""
    assert parse_config("[shell]\nargs = []\n", SRC).shell.args == ()


def test_dotted_keys_are_plain_toml() -> None:
    """TOML dotted keys at top level mean the same as the section form."""
    config = parse_config("database.framerate = 7\n", SRC)
    assert config.database.framerate == 7


@pytest.mark.parametrize(
    ("name", "text"),
    [
        (
            "config.toml",
            '[log]\nlevel = "info"\n\n[controller]\nlisten = "127.0.0.1:5678"\n\n'
            '[database]\nfsync_on_persist = false\nframerate = 512\nlogfile_path = "ztick.log"',
        ),
        (
            "config-http.toml",
            '[log]\nlevel = "debug"\n\n[controller]\nlisten = "127.0.0.1:5678"\n\n'
            '[http]\nlisten = "127.0.0.1:5680"\n\n[database]\npersistence = "memory"\n',
        ),
        (
            "config-telemetry.toml",
            '[log]\nlevel = "info"\n[controller]\nlisten = "127.0.0.1:5678"\n'
            '[telemetry]\nenabled = true\nendpoint = "http://localhost:4318"\n'
            'service_name = "ztick"\nflush_interval_ms = 5000\n',
        ),
        (
            "config-tls.toml",
            '[controller]\nlisten = "127.0.0.1:5678"\ntls_cert = "test/fixtures/tls/cert.pem"\n'
            'tls_key = "test/fixtures/tls/key.pem"\n',
        ),
    ],
)
def test_ztick_style_config_files_load(name: str, text: str) -> None:
    """Configs written the way ztick's own examples are load unchanged."""
    config = parse_config(text, name)
    assert config.controller.listen_endpoint == "tcp:5678:interface=127.0.0.1"


# ----------------------------------------------------------------------------- value errors


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[log]\nlevel = "verbose"',
            '[log] level: must be one of "off", "error", "warn", "info", "debug", "trace", '
            'got "verbose"',
        ),
        (
            "[log]\nlevel = 3",
            '[log] level: must be one of "off", "error", "warn", "info", "debug", "trace", got 3',
        ),
        ('[log]\nformat = "xml"', '[log] format: must be one of "text", "json", got "xml"'),
        (
            "[controller]\nlisten = 5678",
            "[controller] listen: must be a string (host:port or endpoint), got 5678",
        ),
        (
            '[controller]\nauth_file = ""',
            "[controller] auth_file: must be a non-empty path, not empty",
        ),
        (
            "[controller]\ntls_cert = true",
            "[controller] tls_cert: must be a non-empty path, got true",
        ),
        ('[shell]\npath = ""', "[shell] path: must be a non-empty path, not empty"),
        ('[shell]\nargs = "-c"', '[shell] args: must be an array of strings, got "-c"'),
        ('[shell]\nargs = ["-c", 1]', "[shell] args: must be an array of strings; item 2 is 1"),
        (
            '[database]\npersistence = "sqlite"',
            '[database] persistence: must be one of "logfile", "memory", got "sqlite"',
        ),
        (
            '[database]\nlogfile_path = ""',
            "[database] logfile_path: must be a non-empty path, not empty",
        ),
        (
            '[database]\nfsync_on_persist = "yes"',
            '[database] fsync_on_persist: must be true or false, got "yes"',
        ),
        (
            "[database]\nfsync_on_persist = 1",
            "[database] fsync_on_persist: must be true or false, got 1",
        ),
        (
            "[database]\nframerate = 0",
            "[database] framerate: must be an integer from 1 to 65535, got 0",
        ),
        (
            "[database]\nframerate = 65536",
            "[database] framerate: must be an integer from 1 to 65535, got 65536",
        ),
        (
            "[database]\nframerate = true",
            "[database] framerate: must be an integer from 1 to 65535, got true",
        ),
        (
            "[database]\nframerate = 512.0",
            "[database] framerate: must be an integer from 1 to 65535, got 512.0",
        ),
        (
            '[database]\nframerate = "512"',
            '[database] framerate: must be an integer from 1 to 65535, got "512"',
        ),
        (
            "[database]\ncompression_interval = -1",
            "[database] compression_interval: must be an integer from 0 to 4294967295, got -1",
        ),
        (
            "[database]\ncompression_interval = 4294967296",
            "[database] compression_interval: "
            "must be an integer from 0 to 4294967295, got 4294967296",
        ),
        (
            "[database]\nrecover_corrupt_log = 0",
            "[database] recover_corrupt_log: must be true or false, got 0",
        ),
        (
            '[http]\nlisten = ""',
            "[http] listen: must not be empty; use host:port (e.g. 127.0.0.1:5678)",
        ),
        (
            '[telemetry]\nenabled = "true"',
            '[telemetry] enabled: must be true or false, got "true"',
        ),
        ('[telemetry]\nendpoint = ""', "[telemetry] endpoint: must be a non-empty URL, not empty"),
        (
            '[telemetry]\nservice_name = ""',
            "[telemetry] service_name: must be a non-empty string, not empty",
        ),
        (
            "[telemetry]\nflush_interval_ms = 0",
            "[telemetry] flush_interval_ms: must be an integer from 1 to 4294967295, got 0",
        ),
        (
            "[scheduler]\nmax_concurrent_runs = 0",
            "[scheduler] max_concurrent_runs: must be an integer >= 1, got 0",
        ),
        (
            "[http]\nmax_connections = 0",
            "[http] max_connections: must be an integer from 1 to 1000000, got 0",
        ),
        (
            "[scheduler]\nmax_concurrent_network_runs = 0",
            "[scheduler] max_concurrent_network_runs: must be an integer >= 1, got 0",
        ),
        (
            "[scheduler]\nmax_concurrent_runs = false",
            "[scheduler] max_concurrent_runs: must be an integer >= 1, got false",
        ),
        (
            '[scheduler]\ninterrupted_jobs = "skip"',
            '[scheduler] interrupted_jobs: must be one of "rerun", "fail", got "skip"',
        ),
        (
            "[scheduler]\nrun_timeout = -1",
            "[scheduler] run_timeout: must be a number of seconds >= 0, got -1",
        ),
        (
            "[scheduler]\nrun_timeout = true",
            "[scheduler] run_timeout: must be a number of seconds >= 0, got true",
        ),
        (
            "[scheduler]\nrun_timeout = inf",
            "[scheduler] run_timeout: must be a finite number of seconds >= 0, got inf",
        ),
        (
            '[scheduler]\nshutdown_grace = "10s"',
            '[scheduler] shutdown_grace: must be a number of seconds >= 0, got "10s"',
        ),
        (
            "[scheduler]\noutput_limit_bytes = -5",
            "[scheduler] output_limit_bytes: must be an integer >= 0, got -5",
        ),
        (
            "[scheduler]\noutput_limit_bytes = 1.5",
            "[scheduler] output_limit_bytes: must be an integer >= 0, got 1.5",
        ),
    ],
)
def test_bad_value_names_file_key_and_problem(text: str, message: str) -> None:
    """Every bad value is one error line: the file, then [section] key, then the problem."""
    assert _error(text) == f"{SRC}: {message}"


def test_error_message_is_one_line() -> None:
    """A multi-line string value is escaped, so the message stays on one line."""
    message = _error('[log]\nlevel = """\ninfo\n"""')
    assert "\n" not in message
    assert message == (
        f'{SRC}: [log] level: must be one of "off", "error", "warn", "info", "debug", '
        '"trace", got "info\\n"'
    )


def test_error_carries_its_parts() -> None:
    """ConfigError keeps source, section, key and problem as attributes."""
    with pytest.raises(ConfigError) as info:
        parse_config("[database]\nframerate = 0\n", "f.toml")
    error = info.value
    assert (error.source, error.section, error.key, error.line) == (
        "f.toml",
        "database",
        "framerate",
        None,
    )
    assert error.problem == "must be an integer from 1 to 65535, got 0"


# ----------------------------------------------------------------------------- combinations


def test_tls_cert_without_key_names_both_keys() -> None:
    """tls_cert alone is an error that names tls_cert and tls_key."""
    assert _error('[controller]\ntls_cert = "server.crt"\n') == (
        f"{SRC}: [controller] tls_cert: set without [controller] tls_key; "
        "set both (TLS) or neither"
    )


def test_tls_key_without_cert_names_both_keys() -> None:
    """tls_key alone is an error that names tls_key and tls_cert."""
    assert _error('[controller]\ntls_key = "server.key"\n') == (
        f"{SRC}: [controller] tls_key: set without [controller] tls_cert; "
        "set both (TLS) or neither"
    )


def test_tls_off_unless_both_set() -> None:
    """tls_enabled and auth_enabled are false by default."""
    assert not Config().controller.tls_enabled
    assert not Config().controller.auth_enabled


def test_ssl_listen_with_tls_keys_is_rejected() -> None:
    """An ssl: listen endpoint plus tls_cert/tls_key would wrap TLS twice: an error."""
    text = (
        f'[controller]\nlisten = "ssl:0:interface=127.0.0.1:privateKey={SERVER_PEM}"\n'
        'tls_cert = "a.crt"\ntls_key = "a.key"\n'
    )
    assert _error(text) == (
        f"{SRC}: [controller] listen: an ssl: endpoint carries its own certificate; drop "
        "[controller] tls_cert and tls_key, or listen on host:port or tcp:"
    )


def test_http_listen_on_the_controller_address_is_rejected() -> None:
    """[http] listen may not be the same endpoint as [controller] listen."""
    assert _error('[http]\nlisten = "localhost:5678"\n') == (
        f"{SRC}: [http] listen: same address as [controller] listen (127.0.0.1:5678); "
        "the REST API needs its own port"
    )


def test_telemetry_enabled_needs_endpoint() -> None:
    """[telemetry] enabled = true without endpoint is an error, as ztick fails at setup."""
    assert _error("[telemetry]\nenabled = true\n") == (
        f"{SRC}: [telemetry] endpoint: required when [telemetry] enabled = true "
        "(e.g. http://127.0.0.1:4318)"
    )


def test_telemetry_endpoint_without_enabled_is_fine() -> None:
    """An endpoint with telemetry disabled is accepted and kept."""
    config = parse_config('[telemetry]\nendpoint = "http://c:4318"\n', SRC)
    assert (config.telemetry.enabled, config.telemetry.endpoint) == (False, "http://c:4318")


# ----------------------------------------------------------------------------- unknown names


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[database]\nfsync = true",
            "unknown key [database] fsync (did you mean fsync_on_persist?)",
        ),
        ("[database]\nframrate = 5", "unknown key [database] framrate (did you mean framerate?)"),
        ('[log]\nverbosity = "high"', "unknown key [log] verbosity (known keys: level, format)"),
        (
            '[controller]\nlevel = "info"',
            "unknown key [controller] level (it belongs in [log], not [controller])",
        ),
        (
            "[http]\nport = 5680",
            "unknown key [http] port (known keys: listen, max_connections)",
        ),
        ("[shell]\nwait = 30", "unknown key [shell] wait (known keys: path, args)"),
        ("[logg]\nlevel = 1", "unknown section [logg] (did you mean [log]?)"),
        ("[Database]\nframerate = 1", "unknown section [Database] (did you mean [database]?)"),
        (
            "[server]\nport = 1",
            "unknown section [server] (known sections: [log], [controller], [shell], "
            "[database], [http], [telemetry], [scheduler], [runners], [history])",
        ),
        ('level = "info"', "key level is outside any section (did you mean [log] level?)"),
        ("bogus = 1", "key bogus is outside any section"),
        ('log = "info"', '[log]: must be a table (a [log] section), got "info"'),
        (
            "[database.extra]\nx = 1",
            "unknown key [database] extra (known keys: persistence, "
            "logfile_path, fsync_on_persist, framerate, compression_interval, "
            "recover_corrupt_log, retention)",
        ),
    ],
)
def test_unknown_names_are_errors_with_suggestions(text: str, message: str) -> None:
    """Unknown sections and keys are errors that suggest the closest known name."""
    assert _error(text) == f"{SRC}: {message}"


def test_first_error_in_document_order_is_reported() -> None:
    """With several problems, the first one in the file is the one reported."""
    text = "[database]\nframerate = 0\n[log]\nlevel = 1\n"
    assert _error(text).startswith(f"{SRC}: [database] framerate:")


# ----------------------------------------------------------------------------- TOML syntax


def test_toml_syntax_error_names_the_line() -> None:
    """A TOML syntax error names the file and the line."""
    text = '[log]\nlevel = "info"\nthis is not toml\n'
    assert _error(text) == (
        f"{SRC}: line 3: invalid TOML: Expected '=' after a key in a key/value pair (column 6)"
    )


def test_duplicate_key_names_the_line() -> None:
    """Assigning the same key twice is a TOML error on the second line."""
    message = _error("[database]\nframerate = 1\nframerate = 2\n")
    assert message.startswith(f"{SRC}: line 3: invalid TOML: Cannot overwrite a value")


def test_error_at_end_of_file_names_last_line() -> None:
    """An error tomllib reports at the end of the document names the last non-blank line."""
    assert _error("[log]\nlevel =\n\n") == f"{SRC}: line 2: invalid TOML: Invalid value (column 8)"
    assert _error("[log]\nlevel =") == (
        f"{SRC}: line 2: invalid TOML: Invalid value (at end of file)"
    )


def test_unquoted_words_are_read_as_ztick_reads_them() -> None:
    """A ztick config with bare words (`persistence = memory`) loads, with a warning per line."""
    text = '[log]\nlevel = "info"\n\n[database]\npersistence = memory\nframerate = 512'
    config = parse_config(text, SRC)
    assert config.database.persistence == "memory"
    assert config.warnings == (
        f'{SRC}: line 5: unquoted value memory read as the string "memory", as ztick does;'
        ' write persistence = "memory" to make the file valid TOML',
    )
    listen = parse_config("[controller]\nlisten = 127.0.0.1:5678\n", SRC)
    assert listen.controller.listen == "127.0.0.1:5678"
    assert len(listen.warnings) == 1


def test_unquoted_word_that_is_still_invalid_gets_a_quoting_hint() -> None:
    """A bare word that is also a wrong value fails on the value, naming the key."""
    text = "[database]\npersistence = disk\n"
    assert _error(text) == (
        f'{SRC}: [database] persistence: must be one of "logfile", "memory", got "disk"'
    )


def test_invalid_toml_beyond_bare_words_keeps_the_toml_error() -> None:
    """Other TOML errors are still reported, on their own line, after bare words are read."""
    text = "[database]\npersistence = memory\nframerate = = 3\n"
    assert _error(text).startswith(f"{SRC}: line 3: invalid TOML:")


# ----------------------------------------------------------------------------- shell path


def test_missing_shell_path_is_an_error(tmp_path: Path) -> None:
    """[shell] path must exist: a real missing path is reported with the key."""
    missing = tmp_path / "no" / "such" / "sh"
    assert _error(f'[shell]\npath = "{missing}"\n') == (
        f"{SRC}: [shell] path: {missing} does not exist"
    )


def test_directory_shell_path_is_an_error(tmp_path: Path) -> None:
    """[shell] path may not be a directory."""
    assert _error(f'[shell]\npath = "{tmp_path}"\n') == (
        f"{SRC}: [shell] path: {tmp_path} is a directory, not an executable"
    )


def test_non_executable_shell_path_is_an_error(tmp_path: Path) -> None:
    """[shell] path must be executable."""
    script = tmp_path / "sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    assert _error(f'[shell]\npath = "{script}"\n') == (
        f"{SRC}: [shell] path: {script} is not executable"
    )


def test_relative_shell_path_is_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative [shell] path is checked against the current directory, as in ztick."""
    script = tmp_path / "mysh"
    script.write_text('#!/bin/sh\nexec /bin/sh "$@"\n')
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    assert parse_config('[shell]\npath = "./mysh"\n', SRC).shell.path == "./mysh"
    monkeypatch.chdir(ROOT)
    assert _error('[shell]\npath = "./mysh"\n') == f"{SRC}: [shell] path: ./mysh does not exist"


# ----------------------------------------------------------------------------- listen


@pytest.mark.parametrize(
    ("value", "endpoint", "port", "interface"),
    [
        ("127.0.0.1:5678", "tcp:5678:interface=127.0.0.1", 5678, "127.0.0.1"),
        ("0.0.0.0:5678", "tcp:5678:interface=0.0.0.0", 5678, "0.0.0.0"),
        ("localhost:5678", "tcp:5678:interface=127.0.0.1", 5678, "127.0.0.1"),
        ("10.1.2.3:1", "tcp:1:interface=10.1.2.3", 1, "10.1.2.3"),
        ("127.0.0.1:65535", "tcp:65535:interface=127.0.0.1", 65535, "127.0.0.1"),
        ("myhost.example:80", "tcp:80:interface=myhost.example", 80, "myhost.example"),
        ("[::1]:5678", r"tcp6:5678:interface=\:\:1", 5678, "::1"),
        ("[::]:5678", r"tcp6:5678:interface=\:\:", 5678, "::"),
        ("::1:5678", r"tcp6:5678:interface=\:\:1", 5678, "::1"),
        ("[fe80::1%eth0]:80", r"tcp6:80:interface=fe80\:\:1%eth0", 80, "fe80::1%eth0"),
        ("[2001:db8::7]:443", r"tcp6:443:interface=2001\:db8\:\:7", 443, "2001:db8::7"),
    ],
)
def test_host_port_becomes_twisted_endpoint(
    value: str, endpoint: str, port: int, interface: str
) -> None:
    """host:port turns into a tcp:/tcp6: endpoint string that Twisted parses back exactly."""
    assert listen_endpoint(value) == endpoint
    assert _listen_tcp(endpoint) == (port, interface)
    config = parse_config(f'[controller]\nlisten = "{value}"\n', SRC)
    assert (config.controller.listen, config.controller.listen_endpoint) == (value, endpoint)


@pytest.mark.parametrize(
    "value",
    [
        "tcp:5678",
        "tcp:0:interface=127.0.0.1",
        "tcp:port=5679:interface=127.0.0.1:backlog=10",
        r"tcp6:5678:interface=\:\:1",
        "unix:/tmp/ztick.sock",
        "unix:/run/ztick-tw/ztick.sock:mode=660",
        "unix:address=/tmp/z.sock:lockfile=0",
        "systemd:domain=INET:index=0",
        "systemd:domain=UNIX:name=ztick",
    ],
)
def test_endpoint_strings_pass_through(value: str) -> None:
    """Values that already are Twisted endpoint strings are kept unchanged."""
    assert listen_endpoint(value) == value
    config = parse_config(f"[controller]\nlisten = '{value}'\n", SRC)
    assert config.controller.listen_endpoint == value


def test_unix_endpoint_listens_with_its_mode() -> None:
    """A unix: endpoint string keeps its options (path and octal mode) for Twisted."""
    endpoint = listen_endpoint("unix:/run/ztick-tw/ztick.sock:mode=660")
    reactor = MemoryReactor()  # type: ignore[no-untyped-call]
    serverFromString(reactor, endpoint).listen(Factory())  # type: ignore[no-untyped-call]
    ((address, _factory, _backlog, mode, _pid),) = reactor.unixServers
    assert (address, mode) == ("/run/ztick-tw/ztick.sock", 0o660)


def test_ssl_endpoint_is_checked_with_its_certificate() -> None:
    """An ssl: endpoint passes when its key file exists and fails naming the file if not."""
    good = f"ssl:0:interface=127.0.0.1:privateKey={SERVER_PEM}"
    assert listen_endpoint(good) == good
    with pytest.raises(ConfigError) as info:
        listen_endpoint("ssl:0:privateKey=/nonexistent/server.pem")
    assert str(info.value).startswith(
        '[controller] listen: invalid Twisted endpoint string "ssl:0:privateKey='
        '/nonexistent/server.pem": '
    )
    assert "/nonexistent/server.pem" in info.value.problem.split(": ", 1)[1]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("", "must not be empty; use host:port (e.g. 127.0.0.1:5678)"),
        (
            "5678",
            "expected host:port (e.g. 127.0.0.1:5678) or a Twisted endpoint string (tcp:, "
            'tcp6:, unix:, ssl:, systemd:), got "5678"',
        ),
        ("127.0.0.1:0", 'port must be from 1 to 65535, got 0 in "127.0.0.1:0"'),
        ("127.0.0.1:65536", 'port must be from 1 to 65535, got 65536 in "127.0.0.1:65536"'),
        ("127.0.0.1:http", 'port must be a number from 1 to 65535, got "127.0.0.1:http"'),
        ("127.0.0.1:-1", 'port must be a number from 1 to 65535, got "127.0.0.1:-1"'),
        ("127.0.0.1:", 'port must be a number from 1 to 65535, got "127.0.0.1:"'),
        (":5678", 'host is empty in ":5678"; use 0.0.0.0:5678 for all interfaces'),
        ("999.1.1.1:80", '"999.1.1.1" is not an IPv4 address or host name in "999.1.1.1:80"'),
        ("1.2.3:80", '"1.2.3" is not an IPv4 address or host name in "1.2.3:80"'),
        ("bad_host!:80", '"bad_host!" is not an IPv4 address or host name in "bad_host!:80"'),
        ("[::1]5678", 'expected [IPv6-address]:port, got "[::1]5678"'),
        ("[127.0.0.1]:80", '"127.0.0.1" is not an IPv6 address in "[127.0.0.1]:80"'),
        ("::g:80", '"::g" is not an IPv6 address in "::g:80"'),
        ("127.0.0.1: 80", 'must not contain spaces, got "127.0.0.1: 80"'),
        ("unix:", 'unix endpoint needs a socket path, got "unix:"'),
        (
            "unix:mode=660",
            'invalid Twisted endpoint string "unix:mode=660": _parseUNIX() missing 1 '
            "required positional argument: 'address'",
        ),
        (
            "tcp:abc",
            'invalid Twisted endpoint string "tcp:abc": invalid literal for int() '
            "with base 10: 'abc'",
        ),
        (
            "systemd:index=0",
            'systemd endpoint needs domain=INET, INET6 or UNIX in "systemd:index=0"',
        ),
        (
            "systemd:domain=INET",
            'systemd endpoint needs exactly one of index= or name= in "systemd:domain=INET"',
        ),
        (
            "systemd:domain=INET:index=x",
            'systemd endpoint index must be a number, got "x" in "systemd:domain=INET:index=x"',
        ),
        (
            "systemd:domain=INET:port=5",
            "systemd endpoint takes domain=, index= or name= "
            'arguments, got "port=5" in "systemd:domain=INET:port=5"',
        ),
    ],
)
def test_bad_listen_values_are_rejected(value: str, problem: str) -> None:
    """Garbage in listen is a ConfigError naming [controller] listen and the problem."""
    with pytest.raises(ConfigError) as info:
        listen_endpoint(value)
    assert str(info.value) == f"[controller] listen: {problem}"
    assert _error(f"[controller]\nlisten = '{value}'\n") == (
        f"{SRC}: [controller] listen: {problem}"
    )


def test_bad_http_listen_names_the_http_key() -> None:
    """An invalid [http] listen names [http] listen, not [controller] listen."""
    assert _error('[http]\nlisten = "nowhere"\n').startswith(f"{SRC}: [http] listen: expected")
    with pytest.raises(ConfigError) as info:
        listen_endpoint("nowhere", section="http")
    assert str(info.value).startswith("[http] listen: expected host:port")


# ----------------------------------------------------------------------------- files


def test_missing_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config file that does not exist is an error, not silently the defaults."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("missing.toml")
    assert str(info.value) == "missing.toml: cannot read config file: No such file or directory"


def test_directory_as_file_is_an_error(tmp_path: Path) -> None:
    """A directory given as the config file is reported with the OS reason."""
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))
    assert str(info.value) == f"{tmp_path}: cannot read config file: Is a directory"


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    """A file that is not UTF-8 is reported with the line and byte offset."""
    path = tmp_path / "bad.toml"
    path.write_bytes(b'[log]\nlevel = "\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}: line 2: invalid TOML: not valid UTF-8 (byte offset 15)"


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    """load_config parses the named file and records it as the source."""
    path = tmp_path / "z.toml"
    path.write_text("[database]\nframerate = 42\n", encoding="utf-8")
    config = load_config(str(path))
    assert (config.database.framerate, config.source) == (42, str(path))
    with pytest.raises(ConfigError) as info:
        path.write_text("[database]\nframerate = 0\n", encoding="utf-8")
        load_config(str(path))
    assert str(info.value).startswith(f"{path}: [database] framerate:")


@pytest.mark.parametrize("name", ["ztick.toml", "ztick-memory.toml", "ztick-production.toml"])
def test_example_files_load(name: str) -> None:
    """Every example in etc/ loads without error."""
    config = load_config(str(ETC / name))
    assert config.source == str(ETC / name)


def test_main_example_sets_every_key_to_its_default() -> None:
    """etc/ztick.toml is the defaults, except the logfile name and the keys with no default."""
    config = load_config(str(ETC / "ztick.toml"))
    expected = dataclasses.replace(
        Config(),
        database=dataclasses.replace(DatabaseConfig(), logfile_path="ztick.log"),
        source=str(ETC / "ztick.toml"),
    )
    assert config == expected
    text = (ETC / "ztick.toml").read_text(encoding="utf-8")
    for section, keys in KNOWN_KEYS.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"{key} =" in text, f"[{section}] {key} missing from etc/ztick.toml"


def test_other_examples_mean_what_they_say() -> None:
    """The memory example uses the memory backend; production logs JSON on a unix socket."""
    memory = load_config(str(ETC / "ztick-memory.toml"))
    assert memory.database.persistence == "memory"
    production = load_config(str(ETC / "ztick-production.toml"))
    assert production.log.format == "json"
    assert production.controller.listen_endpoint.startswith("unix:")
    assert production.database.logfile_path.startswith("/var/lib/ztick-tw/")


def test_docs_describe_every_key() -> None:
    """docs/configuration.md has a row for every section and key."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for section, keys in KNOWN_KEYS.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"`{key}`" in text, f"[{section}] {key} missing from docs"


def test_connection_limits_and_client_ca_keys() -> None:
    """[controller] max_connections, idle_timeout and tls_client_ca parse, with defaults."""
    default = parse_config("", SRC).controller
    assert (default.max_connections, default.idle_timeout, default.tls_client_ca) == (
        4096,
        900.0,
        None,
    )
    text = (
        '[controller]\ntls_cert = "c.pem"\ntls_key = "k.pem"\ntls_client_ca = "ca.pem"\n'
        "max_connections = 10\nidle_timeout = 2.5\n"
    )
    c = parse_config(text, SRC).controller
    assert (c.max_connections, c.idle_timeout, c.tls_client_ca) == (10, 2.5, "ca.pem")
    assert _error("[controller]\nmax_connections = 0\n").startswith(
        f"{SRC}: [controller] max_connections: must be an integer from 1"
    )


def test_client_ca_without_tls_is_an_error() -> None:
    """tls_client_ca without tls_cert and tls_key names the key and what is missing."""
    assert _error('[controller]\ntls_client_ca = "ca.pem"\n') == (
        f"{SRC}: [controller] tls_client_ca: client certificates need TLS:"
        " set [controller] tls_cert and tls_key too"
    )


# ----------------------------------------------------------------------------- every error at once


def test_every_problem_is_reported_at_once() -> None:
    """Three mistakes in three sections give one error with three lines, in file order.

    Each line names the file, the key, what is wrong and what is allowed, exactly as the
    error would read if it were the only one.
    """
    text = (
        '[log]\nlevel = "verbose"\n[controller]\nmax_conections = 10\n[database]\nframerate = 0\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    assert str(info.value).splitlines() == [
        f'{SRC}: [log] level: must be one of "off", "error", "warn", "info", "debug", '
        '"trace", got "verbose"',
        f"{SRC}: unknown key [controller] max_conections (did you mean max_connections?)",
        f"{SRC}: [database] framerate: must be an integer from 1 to 65535, got 0",
    ]
    assert [str(e) for e in info.value.errors] == str(info.value).splitlines()
    assert (info.value.section, info.value.key) == ("log", "level")


def test_types_ranges_sections_and_combinations_are_all_collected() -> None:
    """Wrong types, ranges, unknown sections, stray keys and bad combinations together."""
    text = (
        'stray = 1\n[scheduler]\nmax_concurrent_runs = "8"\nrun_timeout = -1\n'
        '[logg]\nx = 1\n[telemetry]\nenabled = true\n[controller]\ntls_cert = "c.pem"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_config(text, SRC)
    assert [e.problem for e in info.value.errors] == [
        "key stray is outside any section",
        'must be an integer >= 1, got "8"',
        "must be a number of seconds >= 0, got -1",
        "unknown section [logg] (did you mean [log]?)",
        "set without [controller] tls_key; set both (TLS) or neither",
        "required when [telemetry] enabled = true (e.g. http://127.0.0.1:4318)",
    ]
    assert all(e.source == SRC for e in info.value.errors)


def test_a_bad_key_does_not_cause_a_false_combination_error() -> None:
    """A combination check is skipped when one of its keys is already wrong on its own.

    ``tls_cert = 5`` is a type error; reporting "tls_key set without tls_cert" as well
    would send the user after a problem that is not there.
    """
    with pytest.raises(ConfigError) as info:
        parse_config('[controller]\ntls_cert = 5\ntls_key = "k.pem"\n', SRC)
    assert len(info.value.errors) == 1
    assert str(info.value) == (f"{SRC}: [controller] tls_cert: must be a non-empty path, got 5")


def test_a_single_error_is_its_own_list() -> None:
    """One problem: ``errors`` is the error itself, and with_source keeps it single."""
    with pytest.raises(ConfigError) as info:
        parse_config("[database]\nframerate = 0\n", "a.toml")
    assert info.value.errors == (info.value,)
    moved = info.value.with_source("b.toml")
    assert str(moved) == "b.toml: [database] framerate: must be an integer from 1 to 65535, got 0"
    assert moved.errors == (moved,)


def test_with_source_renames_every_problem() -> None:
    """with_source on a several-problem error names the new file on every line."""
    several = ConfigError.several([ConfigError("p1", key="k1"), ConfigError("p2", key="k2")])
    assert str(several.with_source("f.toml")).splitlines() == ["f.toml: k1: p1", "f.toml: k2: p2"]


def test_bare_words_still_warn_alongside_collected_errors() -> None:
    """Bare words (read as ztick reads them, with a warning) leave the real errors to report.

    ``persistence = memory`` is quoted for the reading, so the only errors reported are
    the real ones.
    """
    with pytest.raises(ConfigError) as info:
        parse_config("[database]\npersistence = memory\nframerate = 0\n[log]\nlevel = 7\n", SRC)
    assert [e.key for e in info.value.errors] == ["framerate", "level"]
    config = parse_config("[database]\npersistence = memory\n", SRC)
    assert config.database.persistence == "memory"
    assert len(config.warnings) == 1 and "unquoted value memory" in config.warnings[0]


# ----------------------------------------------------------------------- unauthenticated caps


def test_unauthenticated_caps_parse_with_defaults() -> None:
    """[controller] max_unauthenticated (256) and ..._per_source (32): integers >= 1."""
    default = parse_config("", SRC).controller
    assert (default.max_unauthenticated, default.max_unauthenticated_per_source) == (256, 32)
    text = "[controller]\nmax_unauthenticated = 10\nmax_unauthenticated_per_source = 2\n"
    c = parse_config(text, SRC).controller
    assert (c.max_unauthenticated, c.max_unauthenticated_per_source) == (10, 2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "max_unauthenticated = 0",
            "[controller] max_unauthenticated: must be an integer from 1 to 1000000, got 0",
        ),
        (
            'max_unauthenticated = "9"',
            '[controller] max_unauthenticated: must be an integer from 1 to 1000000, got "9"',
        ),
        (
            "max_unauthenticated_per_source = 1.5",
            "[controller] max_unauthenticated_per_source: must be an integer from 1 to"
            " 1000000, got 1.5",
        ),
        (
            "max_unauthenticated_per_source = true",
            "[controller] max_unauthenticated_per_source: must be an integer from 1 to"
            " 1000000, got true",
        ),
    ],
)
def test_unauthenticated_caps_are_validated(text: str, message: str) -> None:
    """Zero, strings, floats and booleans are refused with the key and the allowed range."""
    assert _error(f"[controller]\n{text}\n") == f"{SRC}: {message}"


# ----------------------------------------------------------------------------- file size


def test_config_larger_than_the_cap_is_refused(tmp_path: Path) -> None:
    """A file one byte over CONFIG_MAX_BYTES is refused naming the file and the limit."""
    path = tmp_path / "big.toml"
    path.write_bytes(b"#" * CONFIG_MAX_BYTES + b"\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == (
        f"{path}: config file larger than 1048576 bytes (1 MiB), the limit; is it the right file?"
    )


def test_config_of_exactly_the_cap_loads(tmp_path: Path) -> None:
    """A file of exactly CONFIG_MAX_BYTES (comments and one key) still loads."""
    path = tmp_path / "full.toml"
    body = b"[database]\nframerate = 7\n"
    path.write_bytes(body + b"#" * (CONFIG_MAX_BYTES - len(body) - 1) + b"\n")
    assert path.stat().st_size == CONFIG_MAX_BYTES
    assert load_config(str(path)).database.framerate == 7


def test_dev_zero_is_refused_without_reading_for_ever() -> None:
    """``-c /dev/zero`` (endless) is refused by the size limit, not read to exhaustion."""
    with pytest.raises(ConfigError) as info:
        load_config("/dev/zero")
    assert str(info.value).startswith("/dev/zero: config file larger than 1048576 bytes")


def test_a_pipe_is_read_like_a_file() -> None:
    """A pipe (as ``-c /dev/stdin`` or ``-c <(...)`` gives) is read, within the limit."""
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"[database]\nframerate = 9\n")
        os.close(write_end)
        config = load_config(f"/dev/fd/{read_end}")
    finally:
        os.close(read_end)
    assert config.database.framerate == 9


# ----------------------------------------------------------------- history and retry policy


def test_history_and_retry_defaults() -> None:
    """[history] runs 20, output_bytes 4096, no path; [runners] retries 0, backoff 1s..5m."""
    config = parse_config("", SRC)
    assert config.history == HistoryConfig(runs=20, output_bytes=4096, path=None)
    assert config.runners.retries == 0
    assert (config.runners.backoff_min_ns, config.runners.backoff_max_ns) == (
        1_000_000_000,
        300_000_000_000,
    )


def test_history_and_retry_keys_parse() -> None:
    """The keys are read: backoff's two durations become nanoseconds."""
    text = (
        '[history]\nruns = 10000\noutput_bytes = 1048576\npath = "h/runs.sqlite"\n'
        '[runners]\nretries = 1000\nbackoff = "500ms..1h30m"\n'
    )
    config = parse_config(text, SRC)
    assert config.history == HistoryConfig(runs=10000, output_bytes=1 << 20, path="h/runs.sqlite")
    assert config.runners.retries == 1000
    assert config.runners.backoff_min_ns == 500_000_000
    assert config.runners.backoff_max_ns == 5_400_000_000_000
    assert parse_config('[runners]\nbackoff = "2s..2s"\n', SRC).runners.backoff_min_ns == 2 * 10**9
    zero = parse_config('[history]\noutput_bytes = 0\n[runners]\nbackoff = "0..0"\n', SRC)
    assert (zero.history.output_bytes, zero.runners.backoff_max_ns) == (0, 0)


def test_history_path_defaults_beside_the_logfile() -> None:
    """No [history] path: <logfile_path>.history.sqlite; with memory persistence: in memory."""
    assert Config().history_path == "logfile" + HISTORY_SUFFIX
    logfile = parse_config('[database]\nlogfile_path = "/var/lib/z/ztick.log"\n', SRC)
    assert logfile.history_path == "/var/lib/z/ztick.log.history.sqlite"
    memory = parse_config('[database]\npersistence = "memory"\n', SRC)
    assert memory.history_path is None
    chosen = '[database]\npersistence = "memory"\n[history]\npath = "runs.sqlite"\n'
    assert parse_config(chosen, SRC).history_path == "runs.sqlite"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[history]\nruns = 0", "[history] runs: must be an integer from 1 to 10000, got 0"),
        (
            "[history]\nruns = 10001",
            "[history] runs: must be an integer from 1 to 10000, got 10001",
        ),
        (
            "[history]\noutput_bytes = 1048577",
            "[history] output_bytes: must be an integer from 0 to 1048576, got 1048577",
        ),
        ('[history]\npath = ""', "[history] path: must be a non-empty path, not empty"),
        (
            "[runners]\nretries = -1",
            "[runners] retries: must be an integer from 0 to 1000, got -1",
        ),
        (
            "[runners]\nretries = 1001",
            "[runners] retries: must be an integer from 0 to 1000, got 1001",
        ),
        (
            '[runners]\nbackoff = "5m..1s"',
            "[runners] backoff: the minimum 5m is above the maximum 1s",
        ),
        (
            '[runners]\nbackoff = "5s"',
            '[runners] backoff: must be two durations "<min>..<max>" (e.g. "1s..5m"), got "5s"',
        ),
        (
            "[runners]\nbackoff = 5",
            '[runners] backoff: must be two durations "<min>..<max>" (e.g. "1s..5m"), got 5',
        ),
        (
            '[runners]\nbackoff = "1x..5m"',
            '[runners] backoff: must be two durations "<min>..<max>" (e.g. "1s..5m"):'
            " bad duration '1x' (write e.g. 500ms, 30s, 5m, 1h30m, 2d)",
        ),
    ],
)
def test_history_and_retry_keys_are_validated(text: str, message: str) -> None:
    """Out-of-range counts, an empty path and malformed or inverted backoffs are refused."""
    assert _error(text + "\n") == f"{SRC}: {message}"


def test_history_section_is_known() -> None:
    """[history] is a section of its own; a misspelt key gets a suggestion."""
    assert KNOWN_KEYS["history"] == ("runs", "output_bytes", "path")
    assert "retries" in KNOWN_KEYS["runners"] and "backoff" in KNOWN_KEYS["runners"]
    assert "did you mean runs?" in _error("[history]\nrun = 3\n")
