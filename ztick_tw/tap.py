"""twistd plugin glue: command-line ``Options`` (also ``ztick-tw serve``'s) and ``makeService``."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from ztick_tw import __version__
from ztick_tw.config import DEFAULT_LISTEN, Config, ConfigError, DatabaseConfig, load_config
from ztick_tw.descriptors import StartupError
from ztick_tw.logs import apply_under_twistd
from ztick_tw.service import make_service

_DEFAULTS = (
    f"the built-in defaults, listening on {DEFAULT_LISTEN} with the logfile "
    f"'{DatabaseConfig().logfile_path}' in the current directory."
)


_WHAT = (
    "Run the ztick-tw scheduler daemon (wire-compatible with ztick) until SIGTERM or "
    f"SIGINT. Without --config it runs on {_DEFAULTS}"
)
_DOCS = "Reference: docs/operations.md and docs/configuration.md in the source tree."


class ConfigUsageError(usage.UsageError):
    """The config file has problems; ``config_error.errors`` has one per problem.

    Its text is the problem's line, or for several a count and then one line each (twistd
    prints it after its usage text).
    """

    def __init__(self, config_error: ConfigError) -> None:
        count = len(config_error.errors)
        text = str(config_error)
        super().__init__(text if count == 1 else f"{count} problems in the config file:\n{text}")
        self.config_error = config_error


class Options(usage.Options):
    """``twistd ztick [-c FILE] [--recover-corrupt-log]``; ``ztick-tw serve`` subclasses it."""

    synopsis = "[-c FILE] [--recover-corrupt-log]"
    longdesc = (
        f"{_WHAT} Under twistd the log goes where twistd sends it (stdout with -n, else "
        f"--logfile), filtered by [log] level and written as [log] format. {_DOCS}"
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            "TOML configuration file, in ztick's format (docs/configuration.md). "
            f"Without it: {_DEFAULTS}",
        ],
    ]
    optFlags = [
        [
            "recover-corrupt-log",
            None,
            "Start from the last good frame of a logfile damaged in the middle (the "
            "damage is logged) instead of refusing to start; sets [database] "
            "recover_corrupt_log.",
        ],
    ]

    config: Config

    def opt_version(self) -> None:
        """Display ztick-tw's version and exit."""
        print(f"ztick-tw {__version__}")
        sys.exit(0)

    opt_h = usage.Options.opt_help  # -h, as in ztick-tw --help and dump -h

    def parseArgs(self, *args: str) -> None:
        """Refuse any argument that is not an option (a config file needs ``-c``)."""
        if args:
            hint = (
                f"; to use it as the config file: -c {args[0]}"
                if _looks_like_config(args[0])
                else ""
            )
            raise usage.UsageError(f"unexpected argument {args[0]!r}{hint}")

    def postOptions(self) -> None:
        """Load and check the configuration; problems are a ``ConfigUsageError``."""
        try:
            config = load_config(self["config"])
        except ConfigError as e:
            raise ConfigUsageError(e) from None
        if self["recover-corrupt-log"]:
            config = replace(config, database=replace(config.database, recover_corrupt_log=True))
        self.config = config


class ServeOptions(Options):
    """``ztick-tw [serve] [-c FILE] [--recover-corrupt-log]``: the same, in the foreground."""

    synopsis = "Usage: ztick-tw [serve] [-c FILE] [--recover-corrupt-log]"
    longdesc = (
        f"{_WHAT} Logs go to stderr, filtered by [log] level and written as [log] format. "
        "Exit status: 0 after SIGTERM or SIGINT, 2 for a bad option or config file, 1 when "
        f"it cannot start or a shutdown step failed. {_DOCS}"
    )


def _looks_like_config(arg: str) -> bool:
    return arg.endswith(".toml") or "/" in arg


def makeService(options: Options, reactor: Any = None) -> IService:
    """Build the daemon's service from parsed ``options`` (replays the log now).

    Run by twistd (``options.parent`` is twistd's options), it also makes twistd's log
    observer honour ``[log] level`` and ``[log] format`` (see ``ztick_tw.logs``); an
    explicit ``twistd --logger`` keeps its own format and is only filtered by level.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    parent = getattr(options, "parent", None)
    undo = None
    if parent is not None:
        log = options.config.log
        undo = apply_under_twistd(
            log.min_level, log.format, keep_format=bool(parent.get("logger"))
        )
    try:
        return make_service(options.config, reactor)
    except StartupError as e:
        if undo is not None:
            undo()
        raise SystemExit(f"ztick-tw: {e}") from None
