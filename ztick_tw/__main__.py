"""``ztick-tw`` and ``python -m ztick_tw``: the daemon in the foreground, ``dump``, the clients.

``ztick-tw cli`` is the interactive client; ``ztick-tw get|set|query|... WORDS`` run one
instruction (see :mod:`ztick_tw.client.cli`).
"""

from __future__ import annotations

import sys
from typing import TextIO

from twisted.python import usage

from ztick_tw import __version__

USAGE = """\
usage: ztick-tw [serve] [-c FILE] [--recover-corrupt-log]
       ztick-tw dump [--format text|json] [--compact] [--follow] [--iso] LOGFILE
       ztick-tw cli [--host H] [--port P] [--tls] [--token T]
       ztick-tw INSTRUCTION [WORDS...] [--json] [--host H] [--port P] [--tls] [--token T]
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
  cli                  an interactive client, like redis-cli: line editing, history,
                       Tab completion, human times (SET backup.daily in 5m)
  get, set, query, remove, rule, removerule, listrules, stat, schedule,
  listschedules, preview, pause, resume, run, history
                       run one instruction and print its answer (--json for JSON):
                       ztick-tw set backup.daily tomorrow 02:00
                       ztick-tw get backup.daily --json
                       ztick-tw schedule set report.daily "0 6 * * *"
                       exit status 1 on ERROR or no connection, 2 on a usage problem
    --host HOST, --port PORT   the daemon (default 127.0.0.1:5678); --unix PATH
    --tls [--cafile FILE] [--insecure]   speak TLS
    --token SECRET, --token-file FILE    send AUTH first ($ZTICK_TW_TOKEN)

options:
  --version            print ztick-tw's version and exit
  -h, --help           print this help and exit

'ztick-tw serve --help' and 'ztick-tw dump --help' describe each command; under
twistd: 'twistd -n ztick -c FILE' ('twistd ztick --help').  Documentation, in the
source tree: docs/operations.md (running, logs, signals) and docs/configuration.md
(every key of the config file), docs/clients.md (the clients and the CLI).
"""

COMMANDS = ("serve", "dump", "cli")
#: One-shot client subcommands (``ztick_tw.client.cli.ONE_SHOT``, kept here so the
#: daemon's start does not import the client).
ONE_SHOT = (
    *("set", "get", "query", "remove", "rule", "removerule", "listrules", "stat"),
    *("schedule", "listschedules", "preview", "pause", "resume", "run", "history"),
)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "dump":
        from ztick_tw import dump

        return dump.main(args[1:], sys.stdout, sys.stderr)
    if args and args[0] == "cli":
        from ztick_tw.client import cli

        return cli.interactive(args[1:], sys.stdout, sys.stderr)
    if args and args[0].lower() in ONE_SHOT:
        from ztick_tw.client import cli

        return cli.one_shot(args, sys.stdout, sys.stderr)
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

    from ztick_tw.descriptors import StartupError
    from ztick_tw.logs import make_observer
    from ztick_tw.service import make_service
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
