"""Wall-clock time in an IANA zone, with SPEC §8's DST rules.

A :class:`Zone` turns an instant (ns since the epoch, UTC) into its naive local wall time,
and a wall time back into an instant: a wall time in a spring-forward gap becomes the first
instant after the gap; one that happens twice (fall back) becomes its first occurrence.
Zones are cached, so compiling a million schedules in one zone builds one ``ZoneInfo``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ztick_tw.schedules.errors import ScheduleError

EPOCH = datetime(1970, 1, 1)
ONE_US = timedelta(microseconds=1)
_UTC_NAMES = frozenset({"UTC", "Etc/UTC", "Etc/UCT", "UCT", "Etc/Universal", "Universal", "Zulu"})


def naive_ns(wall: datetime) -> int:
    """The ns of a naive datetime read as UTC."""
    return (wall - EPOCH) // ONE_US * 1000


def naive_of(ns: int) -> datetime:
    """The naive UTC datetime of ``ns`` (microseconds kept, nanoseconds dropped)."""
    return EPOCH + timedelta(microseconds=ns // 1000)


class Zone:
    """An IANA zone: wall time of an instant and instant of a wall time."""

    __slots__ = ("is_utc", "name", "tz")

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_utc = name in _UTC_NAMES
        self.tz: ZoneInfo = ZoneInfo(name)

    def wall(self, ns: int) -> datetime:
        """The naive local wall time of ``ns`` (microsecond precision)."""
        if self.is_utc:
            return naive_of(ns)
        seconds, rest = divmod(ns, 10**9)
        local = datetime.fromtimestamp(seconds, self.tz)
        return local.replace(tzinfo=None, microsecond=rest // 1000)

    def instant(self, wall: datetime) -> int:
        """The ns of naive ``wall`` in this zone (gap: the first instant after it; fold: first)."""
        if self.is_utc:
            return naive_ns(wall)
        aware = wall.replace(tzinfo=self.tz, fold=0)
        before = aware.utcoffset()
        after = aware.replace(fold=1).utcoffset()
        assert before is not None and after is not None
        if before >= after:  # an ordinary time, or the first pass of a fold
            return naive_ns(wall - before)
        # In a gap: the transition lies between wall - after and wall - before.
        lo = naive_ns(wall - after) // 10**9  # still on the old offset
        hi = naive_ns(wall - before) // 10**9  # already on the new offset
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if datetime.fromtimestamp(mid, self.tz).utcoffset() == after:
                hi = mid
            else:
                lo = mid
        return hi * 10**9

    def aware(self, ns: int) -> datetime:
        """``ns`` as an aware datetime in this zone (for ISO 8601 output)."""
        seconds, rest = divmod(ns, 10**9)
        return datetime.fromtimestamp(seconds, self.tz).replace(microsecond=rest // 1000)


@lru_cache(maxsize=512)
def _zone(name: str) -> Zone:
    return Zone(name)


def zone(name: str) -> Zone:
    """The cached :class:`Zone` named ``name``; an unknown name raises ``ScheduleError``."""
    try:
        return _zone(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError(f"unknown time zone {name!r}") from None
