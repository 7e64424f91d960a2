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

ztick-tw's own frames (types 16-20, SPEC §8-9, ``docs/logfile.md``) read like the
instructions that wrote them; ``-`` (text) or ``null`` (JSON) is "none" (an ended
schedule's occurrence, a policy key left to the ``[runners]`` default)::

    SCHEDULE SET <job> "<schedule>" <options> start=<ns>
    SCHEDULE REMOVE <job>
    RUNSTATE <job> runs=<n> occurrence=<ns> attempt=<n> due=<ns>
    PAUSE <job> <ns>                      RESUME <job> <ns>
    RULE POLICY <rule> [timeout=<duration>] [retries=<n>] [backoff=<min>..<max>]

    {"type":"schedule_set","identifier":"j","schedule":"daily","options":"tz=UTC ...","start":1}
    {"type":"schedule_remove","identifier":"j"}
    {"type":"run_state","identifier":"j","runs":2,"occurrence":5,"attempt":1,"due":5}
    {"type":"pause","identifier":"j","since":7}   {"type":"resume","identifier":"j","since":9}
    {"type":"rule_policy","identifier":"r","timeout":30000000000,"retries":null,
     "backoff_min":null,"backoff_max":null}

(JSON durations are nanoseconds.)  Frames of types this version does not know (21 and
up, from a newer ztick-tw) are skipped, as ztick skips them; a warning on stderr counts
them and the exit status stays 0.

``--iso`` shows job times as ISO 8601 UTC with nanoseconds
(``2030-01-06T03:00:00.000000000Z``) instead of nanoseconds since the epoch, ztick's
form and the default: in text the time replaces the number, in JSON an
``"execution_iso"`` field follows ``"execution"``, which stays, so JSON readers of
ztick's output keep working.

``--compact`` prints only the final live state (last write wins, removals delete), in
the order of each survivor's last write, as ztick does; unlike ztick a job and a rule
with the same identifier do not hide each other.  The extension entries of live jobs
and rules follow them all, again in order of last write: a job removal drops the job's
schedule, run state and pause; a schedule removal its schedule and run state; a
``planned`` job frame its run state (replay resets the attempt there); a resume its
pause; a rule removal the rule's policy.  ``--follow`` keeps printing frames as
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
    I64_MIN,
    AmqpSpec,
    AwfSpec,
    DirectSpec,
    Entry,
    HttpSpec,
    Job,
    JobRemoval,
    JobStatus,
    Pause,
    Policy,
    RedisSpec,
    Rule,
    RulePolicy,
    RuleRemoval,
    RunnerSpec,
    RunState,
    ScheduleRemoval,
    ScheduleSet,
    ShellSpec,
)
from ztick_tw.schedules import format_duration
from ztick_tw.store.scanning import Scan, scan

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


def _json_time(key: str, ns: int, iso: bool) -> str:
    """``"key":ns`` (``null`` for I64_MIN), then ``"key_iso":...`` with ``iso``."""
    if ns == I64_MIN:
        return f'"{key}":null,"{key}_iso":null' if iso else f'"{key}":null'
    return f'"{key}":{ns},"{key}_iso":"{iso_time(ns)}"' if iso else f'"{key}":{ns}'


def _json_optional(value: int | None) -> str:
    return "null" if value is None else str(value)


def _extension_json(entry: Entry, iso: bool) -> str:
    j = _json_string
    match entry:
        case ScheduleSet(job_id=job_id, text=text, options=options, start_ns=start):
            return (
                f'{{"type":"schedule_set","identifier":{j(job_id)},"schedule":{j(text)},'
                f'"options":{j(options)},{_json_time("start", start, iso)}}}'
            )
        case ScheduleRemoval(job_id=job_id):
            return f'{{"type":"schedule_remove","identifier":{j(job_id)}}}'
        case RunState(job_id=job_id, runs=runs, occurrence_ns=occ, attempt=attempt, due_ns=due):
            return (
                f'{{"type":"run_state","identifier":{j(job_id)},"runs":{runs},'
                f'{_json_time("occurrence", occ, iso)},"attempt":{attempt},'
                f"{_json_time('due', due, iso)}}}"
            )
        case Pause(job_id=job_id, paused=paused, since_ns=since):
            kind = "pause" if paused else "resume"
            return (
                f'{{"type":"{kind}","identifier":{j(job_id)},{_json_time("since", since, iso)}}}'
            )
        case RulePolicy(rule_id=rule_id, policy=policy):
            o = _json_optional
            return (
                f'{{"type":"rule_policy","identifier":{j(rule_id)},'
                f'"timeout":{o(policy.timeout_ns)},"retries":{o(policy.retries)},'
                f'"backoff_min":{o(policy.backoff_min_ns)},'
                f'"backoff_max":{o(policy.backoff_max_ns)}}}'
            )
    raise TypeError(f"not a logfile entry: {entry!r}")


def _text_time(ns: int, iso: bool) -> str:
    if ns == I64_MIN:
        return "-"
    return iso_time(ns) if iso else str(ns)


def _policy_words(policy: Policy) -> list[str]:
    """The keys a policy sets, as ``RULE POLICY`` takes them; unset keys are left out."""
    words = []
    if policy.timeout_ns is not None:
        words.append(f"timeout={format_duration(policy.timeout_ns)}")
    if policy.retries is not None:
        words.append(f"retries={policy.retries}")
    low, high = policy.backoff_min_ns, policy.backoff_max_ns
    if low is not None or high is not None:
        low_text = "-" if low is None else format_duration(low)
        high_text = "-" if high is None else format_duration(high)
        words.append(f"backoff={low_text}..{high_text}")
    return words


def _extension_text(entry: Entry, iso: bool) -> str:
    match entry:
        case ScheduleSet(job_id=job_id, text=text, options=options, start_ns=start):
            return (
                f"SCHEDULE SET {job_id} {_json_string(text)} {options} "
                f"start={_text_time(start, iso)}"
            )
        case ScheduleRemoval(job_id=job_id):
            return f"SCHEDULE REMOVE {job_id}"
        case RunState(job_id=job_id, runs=runs, occurrence_ns=occ, attempt=attempt, due_ns=due):
            return (
                f"RUNSTATE {job_id} runs={runs} occurrence={_text_time(occ, iso)} "
                f"attempt={attempt} due={_text_time(due, iso)}"
            )
        case Pause(job_id=job_id, paused=paused, since_ns=since):
            return f"{'PAUSE' if paused else 'RESUME'} {job_id} {_text_time(since, iso)}"
        case RulePolicy(rule_id=rule_id, policy=policy):
            return " ".join(("RULE POLICY", rule_id, *_policy_words(policy)))
    raise TypeError(f"not a logfile entry: {entry!r}")


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
    return _extension_json(entry, iso)


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
    return _extension_text(entry, iso)


#: What each removal (or other entry) drops from the live state, by key kind.
_JOB_PARTS = ("job", "schedule", "run_state", "pause")
_SCHEDULE_PARTS = ("schedule", "run_state")
_RULE_PARTS = ("rule", "policy")


def _live_key(entry: Entry) -> tuple[str, str] | None:
    """The (kind, id) an entry sets in the live state; None for removals and resumes."""
    match entry:
        case Job(id=job_id):
            return ("job", job_id)
        case Rule(id=rule_id):
            return ("rule", rule_id)
        case ScheduleSet(job_id=job_id):
            return ("schedule", job_id)
        case RunState(job_id=job_id):
            return ("run_state", job_id)
        case Pause(job_id=job_id, paused=True):
            return ("pause", job_id)
        case RulePolicy(rule_id=rule_id):
            return ("policy", rule_id)
    return None


def _dropped(entry: Entry) -> tuple[tuple[str, ...], str] | None:
    """The kinds of live entries an entry removes, and for which id."""
    match entry:
        case JobRemoval(id=job_id):
            return _JOB_PARTS, job_id
        case RuleRemoval(id=rule_id):
            return _RULE_PARTS, rule_id
        case ScheduleRemoval(job_id=job_id):
            return _SCHEDULE_PARTS, job_id
        case Pause(job_id=job_id, paused=False):
            return ("pause",), job_id
        case Job(id=job_id, status=JobStatus.PLANNED):
            return ("run_state",), job_id  # replay resets the attempt on a planned frame
    return None


def compact(entries: Iterable[Entry]) -> list[Entry]:
    """The live state after ``entries``: last write wins, removals delete.

    Jobs and rules come first, in the order of their last write; then the extension
    entries of live jobs and rules (schedules, run states, pauses, policies), in the
    order of their last write, so each comes after the job or rule it belongs to.
    Jobs and rules are separate namespaces (a rule named like a job does not replace
    it).  See the module docstring for what each removal drops.
    """
    live: dict[tuple[str, str], Entry] = {}
    for entry in entries:
        dropped = _dropped(entry)
        if dropped is not None:
            kinds, ident = dropped
            for kind in kinds:
                live.pop((kind, ident), None)
        key = _live_key(entry)
        if key is not None:
            live.pop(key, None)
            live[key] = entry
    base = [e for (kind, _), e in live.items() if kind in ("job", "rule")]
    extensions = [
        e
        for (kind, ident), e in live.items()
        if kind not in ("job", "rule") and (("rule" if kind == "policy" else "job"), ident) in live
    ]
    return base + extensions


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


def _warn_skipped(stderr: TextIO, path: str, result: Scan) -> None:
    """Say how many frames of unknown types (a newer version's) were not shown."""
    if result.skipped_types:
        types = ", ".join(f"type {t}: {c}" for t, c in sorted(result.skipped_types.items()))
        frames = f"{result.skipped} frame{'' if result.skipped == 1 else 's'}"
        stderr.write(
            f"dump: {path}: warning: skipped {frames} of entry types this "
            f"version does not know ({types}), written by a newer ztick-tw\n"
        )


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
        _warn_skipped(stderr, path, result)
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
            _warn_skipped(stderr, path, result)
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
