"""Tests for the command line: ``ztick-tw`` (``ztick_tw.__main__``) and ``twistd ztick``.

Help, version and error paths run ``main()`` in this process (they end before any
reactor runs) or the real console scripts in a subprocess; nothing listens.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.e2e.daemon import BIN_DIR
from ztick_tw import __version__
from ztick_tw.__main__ import USAGE, main


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A real console script (``ztick-tw``, ``twistd``) run to completion."""
    return subprocess.run(
        [str(BIN_DIR / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def _options(text: str) -> set[str]:
    """The long options (``--name``) a help text mentions."""
    return set(re.findall(r"--[a-z][a-z-]*", text))


def _exit_code(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``main(argv)``'s status (also through SystemExit, as --help exits), stdout, stderr."""
    try:
        status = main(argv)
    except SystemExit as e:
        status = int(e.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


# ----------------------------------------------------------------------------- version


@pytest.mark.parametrize("argv", [["--version"], ["serve", "--version"], ["-c", "x", "--version"]])
def test_version_is_ztick_tws_everywhere(argv: list[str]) -> None:
    """``--version``, before or after ``serve``, prints ztick-tw's version, not Twisted's."""
    result = _run("ztick-tw", *argv)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        f"ztick-tw {__version__}\n",
        "",
    )


def test_twistd_plugin_version_is_ztick_tws() -> None:
    """``twistd ztick --version`` prints ztick-tw's version too."""
    result = _run("twistd", "ztick", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ztick-tw {__version__}\n"


# ----------------------------------------------------------------------------- help


def test_serve_help_describes_every_option_and_the_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``ztick-tw serve --help``: the usage line, every option, default address and logfile."""
    status, out, _ = _exit_code(["serve", "--help"], capsys)
    assert status == 0
    assert out.startswith("Usage: ztick-tw [serve] [-c FILE] [--recover-corrupt-log]\n")
    for option in ("-c, --config=", "--recover-corrupt-log", "--version", "-h, --help"):
        assert option in out
    assert _exit_code(["serve", "-h"], capsys) == (0, out, "")
    flat = " ".join(out.split())
    assert "listening on 127.0.0.1:5678 with the logfile 'logfile'" in flat
    assert "Logs go to stderr" in flat
    assert "docs/configuration.md" in flat


def test_top_level_help_lists_the_commands_and_all_their_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``ztick-tw --help`` names serve and dump with every option each one takes.

    The options are taken from ``serve --help`` and ``dump --help`` themselves, so the
    summary cannot fall behind either command.
    """
    status, out, _ = _exit_code(["--help"], capsys)
    assert (status, out) == (0, USAGE)
    _, serve_help, _ = _exit_code(["serve", "--help"], capsys)
    _, dump_help, _ = _exit_code(["dump", "--help"], capsys)
    assert _options(serve_help) | (_options(dump_help) - {"--help"}) <= _options(out)
    assert re.search(r"^  serve ", out, re.MULTILINE)
    assert re.search(r"^  dump LOGFILE", out, re.MULTILINE)
    assert "127.0.0.1:5678" in out
    assert "docs/operations.md" in out


def test_twistd_help_reads_well() -> None:
    """``twistd ztick --help`` describes the plugin's options, defaults and logging."""
    result = _run("twistd", "ztick", "--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("Usage: twistd [options] ztick [-c FILE] [--recover-corrupt-log]\n")
    flat = " ".join(out.split())
    assert "Display ztick-tw's version and exit." in flat
    assert "Twisted version" not in flat
    assert "listening on 127.0.0.1:5678 with the logfile 'logfile'" in flat
    assert "filtered by [log] level and written as [log] format" in flat


# ----------------------------------------------------------------------------- mistakes


def test_unknown_command_is_named_with_the_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """``ztick-tw bogus``: "unknown command 'bogus'", then the usage, on stderr; status 2."""
    status, out, err = _exit_code(["bogus"], capsys)
    assert (status, out) == (2, "")
    assert err == "ztick-tw: unknown command 'bogus'\n" + USAGE


def test_a_config_file_given_as_a_command_gets_a_hint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``ztick-tw ztick.toml`` (``-c`` forgotten) says how to give a config file."""
    status, _, err = _exit_code(["ztick.toml"], capsys)
    assert status == 2
    assert err.splitlines()[0] == (
        "ztick-tw: unknown command 'ztick.toml' (a config file is given with -c:"
        " ztick-tw -c ztick.toml)"
    )


def test_a_stray_argument_after_serve_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    """``ztick-tw serve bogus``: the argument is named, not "Wrong number of arguments"."""
    status, _, err = _exit_code(["serve", "bogus"], capsys)
    assert status == 2
    assert err.splitlines() == [
        "ztick-tw: unexpected argument 'bogus'",
        "Run 'ztick-tw serve --help' for its options.",
    ]


def test_an_unknown_option_points_to_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    """``ztick-tw --nope``: the option is named, with where to find the right ones."""
    status, _, err = _exit_code(["--nope"], capsys)
    assert status == 2
    assert err.splitlines() == [
        "ztick-tw: option --nope not recognized",
        "Run 'ztick-tw serve --help' for its options.",
    ]


def test_every_config_problem_is_one_stderr_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config with three mistakes: three ``ztick-tw: FILE: ...`` lines, status 2."""
    path = tmp_path / "bad.toml"
    path.write_text(
        '[log]\nlevel = "verbose"\n[controller]\nmax_conections = 10\n[database]\nframerate = 0\n'
    )
    status, out, err = _exit_code(["-c", str(path)], capsys)
    assert (status, out) == (2, "")
    assert err.splitlines() == [
        f'ztick-tw: {path}: [log] level: must be one of "off", "error", "warn", "info",'
        ' "debug", "trace", got "verbose"',
        f"ztick-tw: {path}: unknown key [controller] max_conections (did you mean"
        " max_connections?)",
        f"ztick-tw: {path}: [database] framerate: must be an integer from 1 to 65535, got 0",
    ]


def test_twistd_lists_every_config_problem(tmp_path: Path) -> None:
    """Under twistd, a config with two mistakes reports both, each on its own line."""
    path = tmp_path / "bad.toml"
    path.write_text("[database]\nframerate = 0\nfsync = true\n")
    result = _run("twistd", "-n", "--pidfile=", "ztick", "-c", str(path), cwd=tmp_path)
    assert result.returncode == 1
    tail = result.stdout.splitlines()[-3:]
    assert tail[0].endswith(": 2 problems in the config file:")
    assert tail[1:] == [
        f"{path}: [database] framerate: must be an integer from 1 to 65535, got 0",
        f"{path}: unknown key [database] fsync (did you mean fsync_on_persist?)",
    ]


def test_a_huge_config_is_refused_by_the_console_script() -> None:
    """``ztick-tw -c /dev/zero`` ends at once with one line naming the file and the limit."""
    result = _run("ztick-tw", "-c", "/dev/zero")
    assert result.returncode == 2
    assert result.stderr == (
        "ztick-tw: /dev/zero: config file larger than 1048576 bytes (1 MiB), the limit;"
        " is it the right file?\n"
    )
