"""``compile_schedule``: text + options + now -> a :class:`Schedule` that answers instants.

Compiling parses the text once, resolves the start, builds the parts and picks the fast
path (a single part answers directly); ``after()`` then does arithmetic on ints, plus
wall-clock conversions for calendar parts in a zone other than UTC.
"""

from __future__ import annotations

from datetime import datetime

from ztick_tw.schedules import grammar
from ztick_tw.schedules.errors import ScheduleError, at_word
from ztick_tw.schedules.occurrences import (
    AllOf,
    AnyOf,
    Calendar,
    Cron,
    DayFilter,
    Interval,
    Part,
)
from ztick_tw.schedules.options import Options
from ztick_tw.schedules.starting import resolve
from ztick_tw.schedules.zones import Zone, naive_ns, zone

#: Exact units (ns); days and weeks are exact only in UTC or under decay.
EXACT = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
DAY_UNITS = {"d": 1, "w": 7}
MONTH_UNITS = {"mo": 1, "y": 12}
MAX_PREVIEW = 1000


class Schedule:
    """A compiled schedule: its text, options, resolved start, and its instants."""

    __slots__ = ("_root", "_until", "options", "start_ns", "text", "zone")

    def __init__(self, text: str, options: Options, start_ns: int, zone: Zone, root: Part):
        self.text = text
        self.options = options
        self.start_ns = start_ns
        self.zone = zone
        self._root = root
        self._until = options.until_ns

    def first(self) -> int | None:
        """The first occurrence at or after the start (``None``: none before ``until``)."""
        t = self._root.next_from(self.start_ns)
        until = self._until
        return None if t is None or (until is not None and t >= until) else t

    def after(self, ns: int) -> int | None:
        """The first occurrence strictly after ``ns`` (honours ``until``, not ``limit``)."""
        t = self._root.next_from(ns + 1)
        until = self._until
        return None if t is None or (until is not None and t >= until) else t

    def preview(self, count: int) -> list[int]:
        """SPEC §8 PREVIEW: the first ``count`` instants from the start (limit/until shorten).

        ``count`` outside 1..1000 raises ``ScheduleError``.
        """
        if not 1 <= count <= MAX_PREVIEW:
            raise ScheduleError(f"the count must be 1 to {MAX_PREVIEW}, not {count}")
        limit = self.options.limit
        if limit:
            count = min(count, limit)
        out: list[int] = []
        t = self.first()
        while t is not None and len(out) < count:
            out.append(t)
            t = self.after(t)
        return out

    def iso(self, ns: int) -> str:
        """ISO 8601 with the offset of the schedule's zone: ``2024-05-02T00:00:00+00:00``."""
        return self.zone.aware(ns).isoformat()

    def __repr__(self) -> str:
        return f"Schedule({self.text!r}, start_ns={self.start_ns})"


def compile_schedule(
    text: str, options: Options, now_ns: int, start_ns: int | None = None
) -> Schedule:
    """Parse ``text`` under ``options``; the start is resolved against ``now_ns``.

    ``start_ns`` (a restart): the start recorded when the schedule was set, used instead
    of resolving ``starting ...`` (or now) again.
    """
    parsed = grammar.parse(text)
    tz = zone(options.tz)
    wall, extra, start_ns = _anchor(parsed, tz, now_ns, start_ns)
    root = _build(parsed, options, tz, start_ns, (wall, extra))
    return Schedule(text, options, start_ns, tz, root)


def _anchor(
    parsed: grammar.Parsed, tz: Zone, now_ns: int, start_ns: int | None
) -> tuple[datetime, int, int]:
    """The start's wall time in ``tz``, its nanoseconds below the microsecond, its instant."""
    if parsed.start:
        try:
            start = resolve(parsed.start, tz.wall(now_ns).date())
        except ScheduleError:
            if start_ns is None:
                raise
            return tz.wall(start_ns), start_ns % 1000, start_ns
        if start.iso is not None:
            instant = _aware_ns(start.iso)
            if start_ns is None or start_ns == instant:
                return tz.wall(instant), 0, instant
        else:
            instant = tz.instant(start.wall)
            if start_ns is None or start_ns == instant:
                # a wall time in a DST gap stays the anchor (later days keep 02:30, not 03:00)
                return start.wall, 0, instant
        assert start_ns is not None
        return tz.wall(start_ns), start_ns % 1000, start_ns
    reference = now_ns if start_ns is None else start_ns
    return tz.wall(reference), reference % 1000, reference


def _aware_ns(aware: datetime) -> int:
    offset = aware.utcoffset()
    assert offset is not None
    return naive_ns(aware.replace(tzinfo=None) - offset)


def _build(
    parsed: grammar.Parsed,
    options: Options,
    tz: Zone,
    start_ns: int,
    anchor: tuple[datetime, int],
) -> Part:
    decayed = False
    parts: list[Part] = []
    single = len(parsed.parts) == 1
    for item in parsed.parts:
        if isinstance(item, grammar.Every):
            part, used = _every(item, options, tz, start_ns, anchor)
            decayed = decayed or used
            parts.append(part)
        elif isinstance(item, grammar.Cron):
            parts.append(Cron(tz, item.expr))
        else:
            standalone = single or parsed.op == "or"
            parts.append(DayFilter(tz, item.weekdays, item.months, item.years, standalone))
    if options.decay and not decayed:
        raise ScheduleError(
            "decay applies to 'every N <unit>' schedules from milliseconds to weeks; "
            f"{parsed.parts[0].word[1]!r} has none"
        )
    if single:
        return parts[0]
    if parsed.op == "or":
        return AnyOf(parts)
    generators = [p for p in parts if not isinstance(p, DayFilter)]
    filters = [p for p in parts if isinstance(p, DayFilter)]
    if not generators:  # only fragments: 00:00 of the days they all admit
        for f in filters:
            f.standalone = True
    return AllOf([*generators, *filters])


def _every(
    item: grammar.Every,
    options: Options,
    tz: Zone,
    start_ns: int,
    anchor: tuple[datetime, int],
) -> tuple[Part, bool]:
    """The part of ``every N <unit>`` and whether decay applies to it."""
    unit, count = item.unit, item.count
    if unit in EXACT or (unit in DAY_UNITS and (tz.is_utc or options.decay)):
        size = EXACT[unit] if unit in EXACT else DAY_UNITS[unit] * 86_400 * 10**9
        step = count * size
        if step > 2**62:
            raise at_word(*item.word, "the interval is too long")
        return Interval(start_ns, step, options.decay, options.decay_step_ns), True
    wall, extra = anchor
    if unit in DAY_UNITS:
        return Calendar(tz, wall, extra, DAY_UNITS[unit] * count, 0), False
    return Calendar(tz, wall, extra, 0, MONTH_UNITS[unit] * count), False
