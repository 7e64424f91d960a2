"""``ztick-tw dump LOGFILE``: print a logfile's frames, offline (SPEC §6).

The output matches ztick's ``dump``: one line per frame, as text

    SET <id> <ns> <status>
    RULE SET <id> <pattern> <runner> <args...>
    REMOVE <id>
    REMOVERULE <id>

or as one JSON object per line (``--format json``)::

    {"type":"set","identifier":"a","execution":1,"status":"planned"}
    {"type":"rule_set","identifier":"r","pattern":"a","runner":{"type":"shell","command":"x"}}
    {"type":"remove","identifier":"a"}
    {"type":"remove_rule","identifier":"r"}

Runner objects carry the runner's fields: shell ``command``; amqp ``dsn``, ``exchange``,
``routing_key``; direct ``executable``, ``args``; awf ``workflow``, ``inputs``; http
``method``, ``url``; redis ``url``, ``command``, ``key``.

``--iso`` shows job times as ISO 8601 UTC with nanoseconds
(``2030-01-06T03:00:00.000000000Z``) instead of nanoseconds since the epoch, ztick's
form and the default: in text the time replaces the number, in JSON an
``"execution_iso"`` field follows ``"execution"``, which stays, so JSON readers of
ztick's output keep working.

``--compact`` prints only the final live state (last write wins, removals delete), in
the order of each survivor's last write, as ztick does; unlike ztick a job and a rule
with the same identifier do not hide each other.  ``--follow`` keeps printing frames as
they are appended, until interrupted by SIGINT (Ctrl-C) or SIGTERM, which both end it
with status 0, as with ztick.  Exit status: 0 on success, 1 when the file is missing or
unreadable or a frame is corrupt (what came before it is printed), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, BinaryIO, NoReturn, TextIO

from ztick_tw.model import (
    AmqpSpec,
    AwfSpec,
    DirectSpec,
    Entry,
    HttpSpec,
    Job,
    JobRemoval,
    RedisSpec,
    Rule,
    RuleRemoval,
    RunnerSpec,
    ShellSpec,
)
from ztick_tw.store.codec import Scan, scan

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

__all__ = ["compact", "format_json", "format_text", "iso_time", "main"]

#: Seconds between two looks at the file with ``--follow``.
FOLLOW_INTERVAL = 0.2

_WRITE_CHUNK = 4096  # lines per write() call

# ztick escapes ", \, \n, \r, \t and the other control bytes as \u00XX; everything else
# (including non-ASCII text) is written as it is.
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in range(0x20)}
_JSON_ESCAPES.update({ord('"'): '\\"', ord("\\"): "\\\\", 10: "\\n", 13: "\\r", 9: "\\t"})
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')


def _json_string(text: str) -> str:
    if _NEEDS_ESCAPE.search(text) is None:
        return f'"{text}"'
    return '"' + text.translate(_JSON_ESCAPES) + '"'


def _json_strings(items: Sequence[str]) -> str:
    return "[" + ",".join(_json_string(item) for item in items) + "]"


def _runner_json(spec: RunnerSpec) -> str:
    j = _json_string
    match spec:
        case ShellSpec(command=command):
            fields = f'"command":{j(command)}'
        case AmqpSpec(dsn=dsn, exchange=exchange, routing_key=routing_key):
            fields = f'"dsn":{j(dsn)},"exchange":{j(exchange)},"routing_key":{j(routing_key)}'
        case DirectSpec(executable=executable, arguments=arguments):
            fields = f'"executable":{j(executable)},"args":{_json_strings(arguments)}'
        case AwfSpec(workflow=workflow, inputs=inputs):
            fields = f'"workflow":{j(workflow)},"inputs":{_json_strings(inputs)}'
        case HttpSpec(method=method, url=url):
            fields = f'"method":{j(method)},"url":{j(url)}'
        case RedisSpec(url=url, command=command, key=key):
            fields = f'"url":{j(url)},"command":{j(command)},"key":{j(key)}'
    return f'{{"type":"{spec.kind.wire}",{fields}}}'


def iso_time(ns: int) -> str:
    """``ns`` since the epoch as ISO 8601 UTC with nanoseconds (``...T03:00:00.000000000Z``).

    A time outside what the platform can render is given as its number, unchanged.
    """
    seconds, fraction = divmod(ns, 1_000_000_000)
    try:
        parts = time.gmtime(seconds)
    except (OverflowError, OSError, ValueError):
        return str(ns)
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S', parts)}.{fraction:09d}Z"


def format_json(entry: Entry, *, iso: bool = False) -> str:
    """One entry as ztick's dump JSON object (no newline).

    With ``iso``, a job also gets ``"execution_iso"`` (see ``iso_time``) after
    ``"execution"``.
    """
    j = _json_string
    match entry:
        case Job(id=job_id, execution_ns=ns, status=status):
            extra = f',"execution_iso":"{iso_time(ns)}"' if iso else ""
            return (
                f'{{"type":"set","identifier":{j(job_id)},"execution":{ns}{extra},'
                f'"status":"{status.wire}"}}'
            )
        case Rule(id=rule_id, pattern=pattern, runner=runner):
            return (
                f'{{"type":"rule_set","identifier":{j(rule_id)},"pattern":{j(pattern)},'
                f'"runner":{_runner_json(runner)}}}'
            )
        case JobRemoval(id=job_id):
            return f'{{"type":"remove","identifier":{j(job_id)}}}'
        case RuleRemoval(id=rule_id):
            return f'{{"type":"remove_rule","identifier":{j(rule_id)}}}'
    raise TypeError(f"not a logfile entry: {entry!r}")


def format_text(entry: Entry, *, iso: bool = False) -> str:
    """One entry as ztick's dump text line (no newline); ``iso`` shows times as ISO 8601."""
    match entry:
        case Job(id=job_id, execution_ns=ns, status=status):
            return f"SET {job_id} {iso_time(ns) if iso else ns} {status.wire}"
        case Rule(id=rule_id, pattern=pattern, runner=runner):
            return " ".join(("RULE SET", rule_id, pattern, runner.kind.wire, *runner.args()))
        case JobRemoval(id=job_id):
            return f"REMOVE {job_id}"
        case RuleRemoval(id=rule_id):
            return f"REMOVERULE {rule_id}"
    raise TypeError(f"not a logfile entry: {entry!r}")


def compact(entries: Iterable[Entry]) -> list[Entry]:
    """The live state after ``entries``: last write wins, removals delete.

    Survivors come in the order of their last write.  Jobs and rules are separate
    namespaces (a rule named like a job does not replace it).
    """
    live: dict[tuple[bool, str], Entry] = {}
    for entry in entries:
        key = (isinstance(entry, Rule | RuleRemoval), entry.id)
        live.pop(key, None)
        if isinstance(entry, Job | Rule):
            live[key] = entry
    return list(live.values())


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Parser(argparse.ArgumentParser):
    """argparse writing to the given streams and returning instead of exiting."""

    def __init__(self, stdout: TextIO, stderr: TextIO) -> None:
        super().__init__(
            prog="ztick-tw dump",
            description="Print the frames of a ztick logfile, one per line.",
        )
        self._out = stdout
        self._err = stderr

    def print_help(self, file: SupportsWrite[str] | None = None) -> None:
        self._out.write(self.format_help())

    def print_usage(self, file: SupportsWrite[str] | None = None) -> None:
        self._err.write(self.format_usage())

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            self._err.write(message)
        raise _Exit(status)

    def error(self, message: str) -> NoReturn:
        self.print_usage()
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Printer:
    def __init__(self, stdout: TextIO, as_json: bool, iso: bool = False) -> None:
        self._out = stdout
        fmt = format_json if as_json else format_text
        self._format: Callable[[Entry], str] = (lambda e: fmt(e, iso=True)) if iso else fmt

    def print(self, entries: Iterable[Entry]) -> None:
        fmt = self._format
        lines: list[str] = []
        for entry in entries:
            lines.append(fmt(entry))
            if len(lines) >= _WRITE_CHUNK:
                self._out.write("\n".join(lines) + "\n")
                lines = []
        if lines:
            self._out.write("\n".join(lines) + "\n")
        self._out.flush()


def _open_error(path: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        why = "no such file"
    elif isinstance(exc, IsADirectoryError):
        why = "is a directory"
    elif isinstance(exc, PermissionError):
        why = "permission denied"
    else:
        why = exc.strerror or str(exc)
    return f"dump: {path}: {why}\n"


def _corrupt(stderr: TextIO, path: str, result: Scan, base: int) -> int:
    problem = result.problem
    assert problem is not None
    stderr.write(
        f"dump: {path}: corrupt frame at byte offset {base + problem.offset}: {problem.reason}\n"
    )
    return 1


def main(
    argv: list[str],
    stdout: TextIO,
    stderr: TextIO,
    *,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Run ``dump`` with ``argv`` (the arguments after ``dump``); return the exit status.

    ``sleep`` is how ``--follow`` waits between looks at the file; it returns when
    interrupted by raising ``KeyboardInterrupt`` (Ctrl-C), which ends with status 0.
    """
    parser = _Parser(stdout, stderr)
    parser.add_argument("logfile", help="the logfile to read")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("--compact", action="store_true", help="show only the final live state")
    parser.add_argument(
        "--follow",
        action="store_true",
        help="keep printing frames as they are appended, until SIGINT or SIGTERM (exit 0)",
    )
    parser.add_argument(
        "--iso",
        action="store_true",
        help="show job times as ISO 8601 UTC with nanoseconds (JSON: adds execution_iso)",
    )
    try:
        args = parser.parse_args(argv)
    except _Exit as done:
        return done.status
    if not args.follow:
        return _dump(args, stdout, stderr, sleep)
    # Interruptible from the first line printed on (a caller that saw output may stop it).
    try:
        with _sigterm_interrupts():
            return _dump(args, stdout, stderr, sleep)
    except (KeyboardInterrupt, _Terminated):
        return 0


def _dump(
    args: argparse.Namespace, stdout: TextIO, stderr: TextIO, sleep: Callable[[float], None]
) -> int:
    path: str = args.logfile
    printer = _Printer(stdout, args.format == "json", args.iso)
    try:
        handle = open(path, "rb")  # noqa: SIM115 - kept open for --follow
    except OSError as exc:
        stderr.write(_open_error(path, exc))
        return 1
    try:
        try:
            data = handle.read()
        except OSError as exc:
            stderr.write(_open_error(path, exc))
            return 1
        result = scan(data)
        printer.print(compact(result) if args.compact else result)
        problem = result.problem
        if problem is not None:
            if problem.kind == "corrupt":
                return _corrupt(stderr, path, result, 0)
            if not args.follow:
                stderr.write(
                    f"dump: {path}: warning: partial trailing frame at byte offset "
                    f"{problem.offset} ({problem.dropped} bytes) ignored\n"
                )
        if not args.follow:
            return 0
        return _follow(path, handle, result.good_end, printer, stderr, sleep)
    finally:
        handle.close()


class _Terminated(Exception):
    """SIGTERM arrived: ``--follow`` ends as on Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Make SIGTERM interrupt the block like Ctrl-C (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _follow(
    path: str,
    handle: BinaryIO,
    offset: int,
    printer: _Printer,
    stderr: TextIO,
    sleep: Callable[[float], None],
) -> int:
    """Print frames appended after ``offset`` until interrupted (Ctrl-C or SIGTERM).

    The interruption propagates (``KeyboardInterrupt`` or ``_Terminated``); ``main``
    turns it into status 0.
    """
    try:
        while True:
            sleep(FOLLOW_INTERVAL)
            handle, offset = _reopen_if_replaced(path, handle, offset, stderr)
            size = os.fstat(handle.fileno()).st_size
            if size <= offset:
                continue
            handle.seek(offset)
            chunk = handle.read(size - offset)
            result = scan(chunk)
            printer.print(result)
            if result.problem is not None and result.problem.kind == "corrupt":
                return _corrupt(stderr, path, result, offset)
            offset += result.good_end  # a torn tail is left for the next look
    finally:
        handle.close()


def _reopen_if_replaced(
    path: str, handle: BinaryIO, offset: int, stderr: TextIO
) -> tuple[BinaryIO, int]:
    """Follow the file at ``path`` if it was replaced (compaction) or cut short."""
    try:
        current = os.stat(path)
    except OSError:
        return handle, offset  # being replaced right now: keep the old one for a moment
    mine = os.fstat(handle.fileno())
    if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
        try:
            fresh = open(path, "rb")  # noqa: SIM115 - handed back to the caller
        except OSError:
            return handle, offset
        handle.close()
        stderr.write(f"dump: {path}: logfile was replaced; following the new file\n")
        return fresh, 0
    if mine.st_size < offset:
        stderr.write(f"dump: {path}: logfile shrank to {mine.st_size} bytes; reading it again\n")
        return handle, 0
    return handle, offset
