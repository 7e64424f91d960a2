"""The instants of a schedule: each part answers "the first occurrence at or after ns".

- :class:`Interval`: exact durations from the start (``every N seconds``, hours, ...; days and
  weeks in UTC, or with ``decay``), blind to DST; the decaying interval of debrouwere/jobs.
- :class:`Calendar`: ``every N days/weeks/months/years`` as wall-clock steps in the zone from
  the start's wall time (month arithmetic by ``dateutil.relativedelta``: Jan 31 + 1 month is
  Feb 29 or 28, + 2 months Mar 31, always counted from the start, never drifting).
- :class:`Cron`: five-field cron over wall-clock time (fields parsed by cronsim).
- :class:`DayFilter`: ``mon-fri``, ``jun-aug``, ``2024``; joined with ``and`` it admits the
  instants of those days, alone (or with ``or``) it fires at 00:00 of each such day.
- :class:`AllOf` / :class:`AnyOf`: ``and`` / ``or``.

Wall times become instants through :meth:`Zone.instant` (gap: first instant after it; fold:
the first occurrence).  Everything heavy is done once, when the schedule is compiled.
"""

from __future__ import annotations

import bisect
import math
from datetime import date, datetime, timedelta
from typing import Protocol

from cronsim import CronSim
from dateutil.relativedelta import relativedelta

from ztick_tw.schedules.zones import Zone

MAX_NS = 2**63 - 1
#: ``and`` gives up (no common instant) after this many rounds.
MAX_ROUNDS = 10_000
#: Cron and day filters look this many years ahead before concluding "never".
MAX_YEARS = 50
_MINUTE = timedelta(minutes=1)
_DAY = timedelta(days=1)


class Part(Protocol):
    """One schedule part."""

    def next_from(self, ns: int) -> int | None:
        """The first occurrence at or after ``ns`` (``None``: there is none)."""
        ...


class Interval:
    """``anchor + k*step`` (exact), or with decay ``prev + step * max(1, ceil(age/unit))**λ``."""

    __slots__ = ("_known", "anchor", "decay", "decay_step", "step")

    def __init__(self, anchor: int, step: int, decay: float = 0.0, decay_step: int = 1) -> None:
        self.anchor = anchor
        self.step = step
        self.decay = decay
        self.decay_step = decay_step
        self._known = anchor  # with decay: an occurrence already computed (a resume point)

    def next_from(self, ns: int) -> int | None:
        """The first occurrence at or after ``ns`` (``None``: there is none)."""
        anchor = self.anchor
        if ns <= anchor:
            return anchor
        if not self.decay:
            result = anchor - (anchor - ns) // self.step * self.step
            return result if result <= MAX_NS else None
        occurrence = self._known if self._known <= ns else anchor
        unit = self.decay_step
        while occurrence < ns:
            # The factor is the same for every age in ((j-1)*unit, j*unit]: jump through
            # that bucket in one step, to ns or to the bucket's end, whichever comes first.
            bucket = max(1, -(-(occurrence - anchor) // unit))
            increment = self.increment(bucket)
            if increment is None:
                return None
            to_ns = -(-(ns - occurrence) // increment)
            to_end = (anchor + bucket * unit - occurrence) // increment + 1
            occurrence += min(to_ns, to_end) * increment
            if occurrence > MAX_NS:
                return None
        self._known = occurrence
        return occurrence

    def increment(self, factor: int) -> int | None:
        """``step * factor**decay`` rounded, at least 1 ns (``None``: past the int64 range)."""
        try:
            grown: float = self.step * float(factor) ** self.decay
        except OverflowError:
            return None
        if not math.isfinite(grown) or grown > MAX_NS:
            return None
        return max(1, round(grown))


class Calendar:
    """``every N days/weeks/months/years`` as wall-clock steps in ``zone`` from ``anchor``."""

    __slots__ = ("_asked", "_k", "_t", "anchor", "days", "extra", "first", "months", "zone")

    def __init__(self, zone: Zone, anchor: datetime, extra_ns: int, days: int, months: int):
        self.zone = zone
        self.anchor = anchor  # the start's naive wall time
        self.extra = extra_ns  # the start's nanoseconds below the microsecond
        self.days = days  # a step of this many days, or
        self.months = months  # of this many months
        self.first = zone.instant(anchor) + extra_ns
        self._k = 0  # the last occurrence answered, and its number: after(it) needs one step
        self._t = self.first
        self._asked = self.first  # the question it answered: between the two, same answer

    def occurrence(self, k: int) -> int | None:
        """The k-th occurrence (0 is the start)."""
        try:
            if self.days:
                wall = self.anchor + timedelta(days=self.days * k)
            else:
                wall = self.anchor + relativedelta(months=self.months * k)
        except (OverflowError, ValueError):
            return None
        return self.zone.instant(wall) + self.extra

    def next_from(self, ns: int) -> int | None:
        """The first occurrence at or after ``ns`` (``None``: there is none)."""
        if ns <= self.first:
            return self.first
        if self._asked <= ns <= self._t:
            return self._t
        if self._t < ns:  # occurrences rise, so the one after _t is the answer if >= ns
            t = self.occurrence(self._k + 1)
            if t is not None and t >= ns:
                if t > MAX_NS:
                    return None
                self._k, self._t, self._asked = self._k + 1, t, ns
                return t
        wall = self.zone.wall(ns)
        anchor = self.anchor
        if self.days:
            k = (wall - anchor).days // self.days
        else:
            k = ((wall.year - anchor.year) * 12 + wall.month - anchor.month) // self.months
        k = max(0, k - 1)
        while True:
            t = self.occurrence(k)
            if t is None or t > MAX_NS:
                return None
            if t >= ns:
                self._k, self._t, self._asked = k, t, ns
                return t
            k += 1


class Cron:
    """A five-field cron expression over wall-clock time in ``zone``."""

    __slots__ = ("_answer", "_asked", "_days", "_sim", "hours", "minutes", "months", "zone")

    def __init__(self, zone: Zone, expr: str) -> None:
        self.zone = zone
        # The last question and answer: any ns between them has the same answer (an ``or``
        # asks every part each time, and only one of them moved).
        self._asked = 1
        self._answer = 0
        sim = CronSim(expr, datetime(2000, 1, 1))
        self._sim = sim  # for its day matching (Vixie: dom OR dow when both are restricted)
        self.minutes = tuple(sorted(sim.minutes))
        self.hours = tuple(sorted(sim.hours))
        self.months = frozenset(sim.months)
        self._days: dict[tuple[int, int], tuple[int, ...]] = {}

    def days_of(self, year: int, month: int) -> tuple[int, ...]:
        """The matching days of a month (cached)."""
        key = (year, month)
        found = self._days.get(key)
        if found is None:
            if len(self._days) > 256:
                self._days.clear()
            last = (date(year + month // 12, month % 12 + 1, 1) - _DAY).day
            match = self._sim.match_day
            found = tuple(d for d in range(1, last + 1) if match(date(year, month, d)))
            self._days[key] = found
        return found

    def _time_on(self, hour: int, minute: int) -> tuple[int, int] | None:
        """The first matching (hour, minute) at or after the given one, that day."""
        hours, minutes = self.hours, self.minutes
        h = bisect.bisect_left(hours, hour)
        if h < len(hours) and hours[h] == hour:
            m = bisect.bisect_left(minutes, minute)
            if m < len(minutes):
                return hour, minutes[m]
            h += 1
        if h < len(hours):
            return hours[h], minutes[0]
        return None

    def next_wall(self, wall: datetime) -> datetime | None:
        """The first matching wall time at or after ``wall`` (whole minutes)."""
        year, month, day = wall.year, wall.month, wall.day
        hour, minute = wall.hour, wall.minute
        limit = min(year + MAX_YEARS, 9999)
        while year <= limit:
            if month in self.months:
                days = self.days_of(year, month)
                i = bisect.bisect_left(days, day)
                if i < len(days) and days[i] == day:
                    found = self._time_on(hour, minute)
                    if found is not None:
                        return datetime(year, month, day, *found)
                    i += 1
                if i < len(days):
                    return datetime(year, month, days[i], self.hours[0], self.minutes[0])
            month += 1
            if month > 12:
                month, year = 1, year + 1
            day = 1
            hour = minute = 0
        return None

    def next_from(self, ns: int) -> int | None:
        """The first occurrence at or after ``ns`` (``None``: there is none)."""
        if self._asked <= ns <= self._answer:
            return self._answer
        zone = self.zone
        wall = zone.wall(ns - 1)  # just before ns, so a gap's instant equal to ns is found
        wall = wall.replace(second=0, microsecond=0) + _MINUTE
        while True:
            found = self.next_wall(wall)
            if found is None:
                return None
            t = zone.instant(found)
            if t >= ns:
                self._asked, self._answer = ns, t
                return t
            wall = found + _MINUTE  # the second pass of a fold: its wall times came first


class DayFilter:
    """Days admitted by weekday, month and year sets.

    As a filter (``and``): ``ns`` itself when its day is admitted, else 00:00 of the next
    admitted day.  Standalone: 00:00 of each admitted day.
    """

    __slots__ = ("months", "standalone", "weekdays", "years", "zone")

    def __init__(
        self,
        zone: Zone,
        weekdays: frozenset[int] | None,
        months: frozenset[int] | None,
        years: tuple[int, int] | None,
        standalone: bool,
    ) -> None:
        self.zone = zone
        self.weekdays = weekdays
        self.months = months
        self.years = years
        self.standalone = standalone

    def admits(self, day: date) -> bool:
        """Whether ``day`` is one of the filter's days."""
        if self.years is not None and not self.years[0] <= day.year <= self.years[1]:
            return False
        if self.months is not None and day.month not in self.months:
            return False
        return self.weekdays is None or day.weekday() in self.weekdays

    def next_day(self, day: date) -> date | None:
        """The first admitted day at or after ``day``."""
        if self.years is not None:
            if day.year > self.years[1]:
                return None
            if day.year < self.years[0]:
                day = date(self.years[0], 1, 1)
        for _ in range(366 * 2):
            if self.admits(day):
                return day
            if self.months is not None and day.month not in self.months:
                try:
                    day = date(day.year + day.month // 12, day.month % 12 + 1, 1)
                except ValueError:
                    return None
            else:
                day += _DAY
            if self.years is not None and day.year > self.years[1]:
                return None
        return None

    def next_from(self, ns: int) -> int | None:
        """The first occurrence at or after ``ns`` (``None``: there is none)."""
        zone = self.zone
        day: date | None = zone.wall(ns).date()
        assert day is not None
        if self.admits(day):
            if not self.standalone:
                return ns
            t = zone.instant(datetime.combine(day, datetime.min.time()))
            if t >= ns:  # ns is that midnight (or the end of a gap at midnight)
                return t
        while True:
            day = self.next_day(day + _DAY)
            if day is None:
                return None
            t = zone.instant(datetime.combine(day, datetime.min.time()))
            if t >= ns:
                return t


class AllOf:
    """``and``: the instants every part shares."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts

    def next_from(self, ns: int) -> int | None:
        """The first occurrence at or after ``ns`` (``None``: there is none)."""
        candidate = ns
        for _ in range(MAX_ROUNDS):
            agreed = True
            for part in self.parts:
                t = part.next_from(candidate)
                if t is None:
                    return None
                if t != candidate:
                    candidate = t
                    agreed = False
            if agreed:
                return candidate
        return None


class AnyOf:
    """``or``: the earliest next instant of any part."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts

    def next_from(self, ns: int) -> int | None:
        """The first occurrence at or after ``ns`` (``None``: there is none)."""
        best: int | None = None
        for part in self.parts:
            t = part.next_from(ns)
            if t is not None and (best is None or t < best):
                best = t
        return best
