"""Human times for the CLI: ``in 5m``, ``tomorrow 02:00``, ``2030-01-01 02:00`` in, ISO out.

Times without a zone are local (the ``TZ`` of the CLI's process); add ``UTC``, ``Z`` or
an offset (``+02:00``) to say otherwise.  An integer is nanoseconds since the epoch, as on
the wire.  ``now`` is passed in (an aware datetime), so parsing is deterministic.
Output keeps every nanosecond: ``2030-01-01T02:00:00.000000000+01:00``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, date, datetime, time, timedelta, timezone

from ztick_tw.client.wire import EPOCH, datetime_to_ns

_UNITS = {
    "ms": 1_000_000,
    "s": 10**9,
    "sec": 10**9,
    "m": 60 * 10**9,
    "min": 60 * 10**9,
    "h": 3600 * 10**9,
    "d": 86400 * 10**9,
    "w": 7 * 86400 * 10**9,
}
_PART = re.compile(r"(\d+)(ms|sec|min|s|m|h|d|w)")
_INT = re.compile(r"[+-]?\d+(_\d+)*")
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})")
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2})(?:\.(\d{1,9}))?)?")
_ZONE = re.compile(r"(UTC|Z|[+-]\d{2}:?\d{2})")


class TimeError(ValueError):
    """The words are not a time the CLI understands."""


def duration_ns(text: str) -> int:
    """``90s``, ``5m``, ``1h30m``, ``2d`` in nanoseconds."""
    pos, total = 0, 0
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None:
            raise TimeError(f"{text!r} is not a duration (like 90s, 5m, 1h30m, 2d)")
        total += int(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not text:
        raise TimeError("an empty duration")
    return total


def _zone(word: str) -> timezone:
    if word in ("UTC", "Z"):
        return UTC
    sign = -1 if word[0] == "-" else 1
    digits = word[1:].replace(":", "")
    return timezone(sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:])))


def _clock(word: str) -> tuple[time, int]:
    m = _CLOCK.fullmatch(word)
    if m is None:
        raise TimeError(f"{word!r} is not a time of day (HH:MM or HH:MM:SS)")
    hour, minute, second = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    fraction = int((m.group(4) or "0").ljust(9, "0"))
    try:
        return time(hour, minute, second), fraction
    except ValueError as e:
        raise TimeError(f"{word!r}: {e}") from None


def _at(day: date, clock: time, fraction: int, zone: timezone | None) -> int:
    naive = datetime.combine(day, clock)
    aware = naive.replace(tzinfo=zone) if zone is not None else naive.astimezone()
    return datetime_to_ns(aware) + fraction


def parse_when(words: Sequence[str], now: datetime) -> int:
    """Nanoseconds since the epoch for the words of a time (``now`` is aware)."""
    if not words:
        raise TimeError("a time is needed (like: in 5m, tomorrow 02:00, 2030-01-01 02:00)")
    text = " ".join(words).strip()
    if _INT.fullmatch(text):
        return int(text.replace("_", ""))
    if _DATE.match(text) and text[10:11] == "T":
        text = text[:10] + " " + text[11:]
    parts = text.split()
    head = parts[0].lower()
    if head == "now" and len(parts) == 1:
        return datetime_to_ns(now)
    if head == "in" or head.startswith("+"):
        rest = "".join(parts[1:] if head == "in" else [parts[0][1:], *parts[1:]])
        return datetime_to_ns(now) + duration_ns(rest)
    zone = None
    if len(parts) > 1 and _ZONE.fullmatch(parts[-1]):
        zone = _zone(parts.pop())
    elif len(parts) > 1 and (m := re.fullmatch(r"(.*?)(Z|[+-]\d{2}:\d{2})", parts[-1])):
        parts[-1] = m.group(1)
        zone = _zone(m.group(2))
    local_now = now.astimezone(zone) if zone is not None else now.astimezone()
    if head in ("today", "tomorrow") and len(parts) == 2:
        day = local_now.date() + timedelta(days=1 if head == "tomorrow" else 0)
        clock, fraction = _clock(parts[1])
        return _at(day, clock, fraction, zone)
    m = _DATE.fullmatch(parts[0])
    if m is not None and len(parts) <= 2:
        try:
            day = date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        except ValueError as e:
            raise TimeError(f"{parts[0]!r}: {e}") from None
        clock, fraction = _clock(parts[1]) if len(parts) == 2 else (time(0), 0)
        return _at(day, clock, fraction, zone)
    raise TimeError(
        f"{text!r} is not a time (like: in 5m, +90s, now, today 18:00, tomorrow 02:00,"
        " 2030-01-01 02:00, 2030-01-01 02:00 UTC, or nanoseconds)"
    )


def iso_local(ns: int) -> str:
    """``ns`` as a local ISO 8601 time with all nine fraction digits and the offset."""
    seconds, fraction = divmod(ns, 10**9)
    local = (EPOCH + timedelta(seconds=seconds)).astimezone()
    offset = local.strftime("%z")
    return f"{local:%Y-%m-%dT%H:%M:%S}.{fraction:09d}{offset[:3]}:{offset[3:]}"


def iso_utc(ns: int) -> str:
    """``ns`` as an ISO 8601 UTC time with nine fraction digits (``...Z``)."""
    seconds, fraction = divmod(ns, 10**9)
    return f"{EPOCH + timedelta(seconds=seconds):%Y-%m-%dT%H:%M:%S}.{fraction:09d}Z"
