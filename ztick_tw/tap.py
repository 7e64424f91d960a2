"""twistd plugin glue: command-line ``Options`` and ``makeService``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from ztick_tw.config import Config, ConfigError, load_config
from ztick_tw.service import StartupError, make_service


class Options(usage.Options):
    """``twistd ztick [-c FILE]`` / ``ztick-tw [-c FILE]``."""

    synopsis = "[-c FILE]"
    longdesc = (
        "Run the ztick-tw scheduler daemon.  With no config file it listens on "
        "127.0.0.1:5678 and keeps its logfile ('logfile') in the current directory."
    )
    optParameters = [
        ["config", "c", None, "TOML configuration file (ztick's format)."],
    ]
    optFlags = [
        ["recover-corrupt-log", None, "Start from the last good frame of a damaged logfile."],
    ]

    config: Config

    def postOptions(self) -> None:
        """Load and check the configuration; any problem is a ``UsageError``."""
        try:
            config = load_config(self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["recover-corrupt-log"]:
            config = replace(config, database=replace(config.database, recover_corrupt_log=True))
        self.config = config


def makeService(options: Options, reactor: Any = None) -> IService:
    """Build the daemon's service from parsed ``options`` (replays the log now)."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        return make_service(options.config, reactor)
    except StartupError as e:
        raise SystemExit(f"ztick-tw: {e}") from None
