r"""Log output for operators: readable text or one JSON object per line, filtered by level.

``[log] level`` and ``[log] format`` mean the same under ``ztick-tw`` and under twistd:
``ztick-tw`` installs :func:`make_observer` itself; under twistd, which builds its own
observer (stdout, ``--logfile``, ``--syslog`` or ``--logger``) after the plugin's
``makeService`` ran, :func:`apply_under_twistd` wraps whatever twistd hands to the
global log beginner in the same level filter, escaping and format.

One event is one line of text.  Values clients or jobs control (job ids, a job's
output, request ids...) can hold any character; in the text format every control
character is escaped (``\n``, ``\r``, ``\t``, ``\xNN``, ``\uNNNN``), so nobody can
forge a log line or drive the terminal, and a job's multi-line output shows as one line.
A value that needed escaping also has its backslashes doubled, so the escaped form
reads back unambiguously; a value without control characters is shown as is.  JSON
output is escaped by JSON itself and carries the values unchanged.
"""

from __future__ import annotations

import functools
import re
import string
import sys
from collections.abc import Callable, Iterable
from typing import IO, Any, TextIO

from constantly import NamedConstant  # type: ignore[import-untyped]
from twisted.internet.interfaces import IReactorTime
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogBeginner,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer

__all__ = [
    "EscapingObserver",
    "apply_under_twistd",
    "escape",
    "filtered",
    "json_observer",
    "make_observer",
    "one_line",
]

#: C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the
#: bidirectional overrides (which can make a line read as something else).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ROOT = re.compile(r"[^.\[(]*")
_FORMATTER = string.Formatter()
_TEXT_KEY = "ztick_log_text"


def _replace(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    r"""``text`` with every control character escaped; ``text`` itself when it has none.

    When something is escaped, backslashes are doubled too, so that a newline (shown
    ``\n``) and a backslash followed by ``n`` (shown ``\\n``) stay distinguishable.
    """
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(_replace, text.replace("\\", "\\\\"))


@functools.lru_cache(maxsize=1024)
def _format_fields(log_format: str) -> tuple[frozenset[str], bool]:
    """Return the plain (not ``!r``) field names of ``log_format``, and if it has controls.

    Cached: formats are constants.
    """
    plain: set[str] = set()
    converted: set[str] = set()
    unsafe = _UNSAFE.search(log_format) is not None
    try:
        parsed = list(_FORMATTER.parse(log_format))
    except ValueError:
        return frozenset(), unsafe
    for _literal, field, _spec, conversion in parsed:
        if not field:
            continue
        root = _ROOT.match(field)
        name = root.group() if root is not None else field
        (converted if conversion == "r" else plain).add(name)
    return frozenset(plain - converted), unsafe


def one_line(event: LogEvent) -> LogEvent:
    """``event``, or a copy of it whose message is one line with unsafe characters escaped.

    String fields the format uses are escaped (see :func:`escape`); then any control
    character still in the message (from the format string itself, or from the
    ``str()`` of an exception) is escaped, and the copy's ``log_format`` shows that
    message.  An event with nothing to escape is returned as is.  A traceback
    (``log_failure``) is left as the text observer renders it: indented continuation
    lines.
    """
    log_format = event.get("log_format")
    if not isinstance(log_format, str):
        return event
    fields, risky = _format_fields(log_format)
    escaped: dict[str, str] = {}
    for name in fields:
        value = event.get(name)
        if isinstance(value, str):
            if _UNSAFE.search(value) is not None:
                escaped[name] = escape(value)
        elif not isinstance(value, int | float | type(None)):
            risky = True  # an object's str() may hold anything
    if not escaped and not risky:
        return event
    safe = {key: value for key, value in event.items() if key != "log_flattened"}
    safe.update(escaped)
    if risky:
        message = formatEvent(safe)
        if _UNSAFE.search(message) is not None:
            safe["log_format"] = "{" + _TEXT_KEY + "}"
            safe[_TEXT_KEY] = _UNSAFE.sub(_replace, message)
            return safe
    return safe if escaped else event


@implementer(ILogObserver)
class EscapingObserver:
    """Hands ``observer`` (a text observer) :func:`one_line` copies of every event."""

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: LogEvent) -> None:
        """Pass on ``event``, made one safe line."""
        self.observer(one_line(event))


@implementer(ILogFilterPredicate)
class _Nothing:
    """``[log] level = "off"``: let no event through."""

    def __call__(self, event: LogEvent) -> NamedConstant:
        return PredicateResult.no


def filtered(observer: ILogObserver, threshold: LogLevel | None) -> ILogObserver:
    """``observer`` behind a filter passing events at ``threshold`` or above (``None``: none)."""
    if threshold is None:
        return FilteringLogObserver(observer, [_Nothing()])
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=threshold)])


def make_observer(
    threshold: LogLevel | None = LogLevel.info, fmt: str = "text", stream: TextIO | None = None
) -> ILogObserver:
    """An observer writing events at ``threshold`` or above to ``stream`` (stderr by default).

    ``threshold`` is ``Config.log.min_level``: ``None`` (``[log] level = "off"``) shows
    nothing.

    ``fmt`` is ``text`` (Twisted's classic ``timestamp [namespace#level] message`` lines,
    one per event, values escaped) or ``json`` (one JSON object per line with every
    named field, for log shippers).
    """
    out = stream if stream is not None else sys.stderr
    base: ILogObserver = (
        jsonFileLogObserver(out, recordSeparator="")
        if fmt == "json"
        else EscapingObserver(textFileLogObserver(out))
    )
    return filtered(base, threshold)


def json_observer() -> ILogObserver:
    """``twistd --logger=ztick_tw.logs.json_observer``: JSON lines on stdout under twistd."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


def _destination(observer: object) -> IO[Any] | None:
    """The file a twistd text observer (a ``FileLogObserver``) writes to, if it is one."""
    if isinstance(observer, FileLogObserver):
        out: IO[Any] | None = getattr(observer, "_outFile", None)
        return out
    return None


def wrap_observers(
    observers: Iterable[ILogObserver],
    threshold: LogLevel | None,
    fmt: str,
    *,
    keep_format: bool = False,
) -> list[ILogObserver]:
    """Return twistd's ``observers`` as the config wants them: filtered, escaped or JSON.

    With ``fmt == "json"`` an observer that writes text to a file (stdout, ``--logfile``)
    is replaced by a JSON observer on the same file (so twistd's log rotation still
    applies); any other observer (``--syslog``) keeps its text, escaped.
    ``keep_format`` (an explicit ``twistd --logger``) leaves the format to that logger
    and only filters by level.
    """
    wrapped: list[ILogObserver] = []
    for observer in observers:
        out = _destination(observer) if fmt == "json" and not keep_format else None
        base: ILogObserver
        if out is not None:
            base = jsonFileLogObserver(out, recordSeparator="")
        elif keep_format:
            base = observer
        else:
            base = EscapingObserver(observer)
        wrapped.append(filtered(base, threshold))
    return wrapped


def apply_under_twistd(
    threshold: LogLevel | None,
    fmt: str,
    *,
    keep_format: bool = False,
    beginner: LogBeginner = globalLogBeginner,
) -> Callable[[], None]:
    """Make twistd's log observers honour ``[log] level`` and ``[log] format``.

    twistd calls ``globalLogBeginner.beginLoggingTo`` with its observer after the
    plugin's ``makeService``; the next such call gets :func:`wrap_observers` of its
    observers (events buffered before it are filtered too).  Returns a function that
    undoes this if that call has not happened yet.  (``beginner`` is for tests.)
    """
    original = beginner.beginLoggingTo

    def begin(observers: Iterable[ILogObserver], *args: Any, **kwargs: Any) -> None:
        undo()
        wrapped = wrap_observers(observers, threshold, fmt, keep_format=keep_format)
        original(wrapped, *args, **kwargs)

    def undo() -> None:
        if vars(beginner).get("beginLoggingTo") is begin:
            delattr(beginner, "beginLoggingTo")

    setattr(beginner, "beginLoggingTo", begin)  # noqa: B010 (an instance attribute)
    return undo


class Tally:
    """Counts a noisy event and says when to report it: at once, then at most every ``interval``.

    A flood (refused connections, dropped sockets, spawn shortages) is one log line
    every ``interval`` seconds carrying how many happened since the last one.
    """

    def __init__(self, clock: IReactorTime, interval: float = 10.0) -> None:
        self._clock = clock
        self._interval = interval
        self._count = 0
        self._last: float | None = None

    def note(self) -> int:
        """Count one event; how many to report now (0: stay quiet, they are counted)."""
        self._count += 1
        now = self._clock.seconds()
        if self._last is None or now - self._last >= self._interval:
            count, self._count, self._last = self._count, 0, now
            return count
        return 0
