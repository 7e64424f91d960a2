"""The distinct schedules of the scheduled jobs: text and options, each stored once.

``Recurrences`` gives every scheduled job the index of its definition here.  A million
jobs on a few schedules share a few definitions.  A million jobs whose texts differ
only by spelling out their own start (``every 1 hour starting 2026-12-04T00:00:00.000002Z``,
what a program setting schedules tends to write) share one too: when a text ends with
its start instant in one of the ISO forms below, the definition keeps the text without
it (a *template*) and the text is rebuilt from the job's start when asked for.  That is
only done when the rebuilt text is the same string, so it changes nothing a client sees.

A definition is a plain ``(template, options, form)`` tuple (tuples of strings and ints
are not tracked by the garbage collector, so a million of them do not lengthen a full
collection); ``form`` 0 means the template is the whole text.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = ["Definitions", "definition_text"]

_SECOND: Final = 1_000_000_000
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

#: The forms of a start at the end of a text (``form`` in a definition):
#: 1 ``2026-12-04T00:00:00Z``, 2 ``...00:00:00.000002000Z`` (nanoseconds),
#: 3 ``...00:00:00.000002Z`` (microseconds), 4 ``...00:00:00.001Z`` (milliseconds).

#: Seconds rendered as ``YYYY-MM-DDTHH:MM:SS``, kept for the latest ones (a replay of
#: jobs set one after the other meets the same few seconds again and again).
_SECONDS_KEPT: Final = 256
_seconds: dict[int, str] = {}


def _second(seconds: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) of a whole number of seconds since the epoch."""
    text = _seconds.get(seconds)
    if text is None:
        d = _EPOCH + timedelta(seconds=seconds)  # OverflowError outside years 1-9999
        text = f"{d.year:04d}-{d.month:02d}-{d.day:02d}T{d.hour:02d}:{d.minute:02d}:{d.second:02d}"
        if len(_seconds) >= _SECONDS_KEPT:
            del _seconds[next(iter(_seconds))]
        _seconds[seconds] = text
    return text


def _suffix(form: int, start_ns: int) -> str:
    """The start as ``form`` writes it (see ``_template``)."""
    seconds, fraction = divmod(start_ns, _SECOND)
    return _second(seconds) + _fraction(form, fraction)


def _fraction(form: int, fraction: int) -> str:
    """What follows the seconds in ``form``: ``Z``, or the fraction of a second and ``Z``."""
    if form == 2:
        return f".{fraction:09d}Z"
    if form == 3:
        return f".{fraction // 1000:06d}Z"
    if form == 4:
        return f".{fraction // 1_000_000:03d}Z"
    return "Z"


def _template(text: str, start_ns: int) -> tuple[str, int]:
    """``(template, form)``: ``text`` without its start at the end, or ``(text, 0)``.

    Cheap when the text cannot end with a start (the usual case), and about a
    microsecond when it does: the seconds are rendered once for many jobs.
    """
    if len(text) < 20 or text[-1] != "Z":
        return text, 0
    seconds, fraction = divmod(start_ns, _SECOND)
    if text[-11] == ".":
        form, cut = 2, 30
    elif text[-8] == "." and fraction % 1000 == 0:
        form, cut = 3, 27
    elif text[-5] == "." and fraction % 1_000_000 == 0:
        form, cut = 4, 24
    elif text[-4] != "." and fraction == 0:
        form, cut = 1, 20
    else:
        return text, 0
    tail = _fraction(form, fraction)
    if not text.endswith(tail):
        return text, 0
    whole = _seconds.get(seconds)
    if whole is None:
        try:
            whole = _second(seconds)
        except (OverflowError, ValueError):
            return text, 0
    if text[-cut : -len(tail)] != whole:
        return text, 0
    return text[:-cut], form


def definition_text(definition: tuple[str, str, int], start_ns: int) -> str:
    """The schedule text of a job with this definition and start."""
    template, _options, form = definition
    return template + _suffix(form, start_ns) if form else template


class Definitions:
    """Every distinct ``(template, options, form)``, by index (see the module doc)."""

    __slots__ = ("_head", "_index", "_options", "limit", "list")

    def __init__(self, limit: int) -> None:
        #: the definitions; a job's index points here
        self.list: list[tuple[str, str, int]] = []
        self.limit = limit
        # definition -> index; the key is the very tuple in ``list``
        self._index: dict[tuple[str, str, int], int] = {}
        self._options: dict[str, str] = {}  # few distinct ones: one string each
        # The last text seen ending with its start in nanoseconds, as (its text up to
        # the fraction of a second, that second, its template): the next job set in
        # the same second only needs its fraction checked.
        self._head: tuple[str, int, str] = ("", 0, "")

    def __len__(self) -> int:
        return len(self.list)

    def index(self, text: str, options: str, start_ns: int) -> int:
        """The index of the definition of ``text`` with ``options`` (made if new)."""
        if len(text) < 20 or text[-1] != "Z":  # cannot end with a start: _template's test
            key = (text, options, 0)
        else:
            head, second, template = self._head
            seconds, fraction = divmod(start_ns, _SECOND)
            if (
                seconds == second
                and text[-11] == "."
                and text[:-10] == head
                and text[-10:-1] == str(fraction).zfill(9)
            ):
                key = (template, options, 2)
            else:
                template, form = _template(text, start_ns)
                key = (template, options, form)
                if form == 2:
                    self._head = (text[:-10], seconds, template)
        index = self._index.get(key)
        if index is None:
            index = len(self.list)
            if index >= self.limit:
                raise ValueError(f"more than {self.limit} distinct schedules")
            shared = self._options.setdefault(options, options)
            if shared is not options:
                key = (key[0], shared, key[2])
            self.list.append(key)
            self._index[key] = index
        return index

    def text(self, index: int, start_ns: int) -> str:
        """The schedule text of definition ``index`` for a job starting at ``start_ns``."""
        return definition_text(self.list[index], start_ns)

    def options(self, index: int) -> str:
        """The canonical options of definition ``index``."""
        return self.list[index][1]
