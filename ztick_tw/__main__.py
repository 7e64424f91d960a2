"""``ztick-tw`` and ``python -m ztick_tw``: run the daemon in the foreground, or ``dump``."""

from __future__ import annotations

import sys
from typing import TextIO

from twisted.python import usage

from ztick_tw import __version__

USAGE = """\
usage: ztick-tw [serve] [-c FILE] [--recover-corrupt-log]
       ztick-tw dump [--format text|json] [--compact] [--follow] [--iso] LOGFILE
       ztick-tw --version | --help

commands:
  serve (the default)  run the scheduler daemon in the foreground until SIGTERM or
                       SIGINT (Ctrl-C), logging to stderr
    -c, --config FILE      TOML configuration file, in ztick's format; without it the
                           built-in defaults: listen on 127.0.0.1:5678, logfile
                           'logfile' in the current directory
    --recover-corrupt-log  start from the last good frame of a logfile damaged in the
                           middle instead of refusing to start
    --version, --help      ztick-tw's version; this command's help
  dump LOGFILE         print the frames of a logfile, one per line, as ztick does
    --format text|json     text (default) or one JSON object per line
    --compact              only the final live state
    --follow               keep printing frames as they are appended, until SIGINT
                           or SIGTERM (exit 0)
    --iso                  job times as ISO 8601 UTC (the default is nanoseconds)

options:
  --version            print ztick-tw's version and exit
  -h, --help           print this help and exit

'ztick-tw serve --help' and 'ztick-tw dump --help' describe each command; under
twistd: 'twistd -n ztick -c FILE' ('twistd ztick --help').  Documentation, in the
source tree: docs/operations.md (running, logs, signals) and docs/configuration.md
(every key of the config file).
"""

COMMANDS = ("serve", "dump")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "dump":
        from ztick_tw import dump

        return dump.main(args[1:], sys.stdout, sys.stderr)
    if args and args[0] in ("--version", "-V", "version"):
        print(f"ztick-tw {__version__}")
        return 0
    if args and args[0] in ("--help", "-h", "help"):
        print(USAGE, end="")
        return 0
    if args and args[0] == "serve":
        args = args[1:]
    elif args and not args[0].startswith("-"):
        return unknown_command(args[0], sys.stderr)
    return serve(args)


def unknown_command(word: str, err: TextIO) -> int:
    """Say that ``word`` is no command, show the usage, and return status 2."""
    hint = ""
    if word.endswith(".toml") or "/" in word:
        hint = f" (a config file is given with -c: ztick-tw -c {word})"
    print(f"ztick-tw: unknown command {word!r}{hint}", file=err)
    print(USAGE, end="", file=err)
    return 2


def serve(args: list[str]) -> int:
    """Run the daemon in the foreground until SIGINT or SIGTERM; return the exit status.

    2 for a bad option or config (every config problem on its own line), 1 when the
    daemon cannot start or a shutdown step failed, else 0.
    """
    from twisted.internet import reactor

    from ztick_tw.logs import make_observer
    from ztick_tw.service import StartupError, make_service
    from ztick_tw.tap import ConfigUsageError, ServeOptions

    options = ServeOptions()
    try:
        options.parseOptions(args)
    except ConfigUsageError as e:
        for error in e.config_error.errors:
            print(f"ztick-tw: {error}", file=sys.stderr)
        return 2
    except usage.UsageError as e:
        print(f"ztick-tw: {e}", file=sys.stderr)
        print("Run 'ztick-tw serve --help' for its options.", file=sys.stderr)
        return 2
    config = options.config
    from twisted.logger import globalLogBeginner

    globalLogBeginner.beginLoggingTo(
        [make_observer(config.log.min_level, config.log.format)], redirectStandardIO=False
    )
    try:
        service = make_service(config, reactor)
        service.startService()
    except StartupError as e:
        print(f"ztick-tw: {e}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 1 if service.shutdown_failed else 0


if __name__ == "__main__":
    sys.exit(main())
