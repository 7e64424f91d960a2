"""``ztick-tw`` and ``python -m ztick_tw``: run the daemon in the foreground, or ``dump``."""

from __future__ import annotations

import sys

from twisted.python import usage

from ztick_tw import __version__

USAGE = """\
usage: ztick-tw [-c FILE] [--recover-corrupt-log]      run the daemon (foreground)
       ztick-tw serve [-c FILE] [--recover-corrupt-log]
       ztick-tw dump LOGFILE [--format text|json] [--compact] [--follow]
       ztick-tw --version
"""


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
    return serve(args)


def serve(args: list[str]) -> int:
    """Run the daemon in the foreground until SIGINT or SIGTERM."""
    from twisted.internet import reactor

    from ztick_tw.logs import make_observer
    from ztick_tw.service import StartupError, make_service
    from ztick_tw.tap import Options

    options = Options()
    try:
        options.parseOptions(args)
    except usage.UsageError as e:
        print(f"ztick-tw: {e}", file=sys.stderr)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
