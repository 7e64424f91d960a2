"""``starting <time>`` -> the start's wall time (SPEC §8: every wall-clock form is read in tz).

Forms: ``2024-01-01``, ``2024-01-01 12:00``, ``2024-01-01T12:00:00+02:00``, ``00:30``,
``today``/``tomorrow [at] 10:00``, ``Monday at 12:15 PM`` (the next Monday, today
included), ``2nd`` (this month), ``May 2, 2024``, ``2 May 2024``, ``May 2nd`` (this year).
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta

from ztick_tw.schedules.errors import at_word
from ztick_tw.schedules.grammar import DAY_NAMES, MONTH_NAMES, Word, normalize_names

_ISO_DATE = re.compile(r"(\d{4})-(\d{1,2})-(\d{1,2})")
_ISO_FULL = re.compile(r"\d{4}-\d{1,2}-\d{1,2}T.*", re.IGNORECASE)
_CLOCK = re.compile(r"(\d{1,2})(?::(\d{2}))?(?::(\d{2}))?(am|pm|a\.m\.|p\.m\.)?")
_ORDINAL = re.compile(r"(\d{1,2})(st|nd|rd|th)")
_MERIDIEM = {"am": "am", "pm": "pm", "a.m.": "am", "p.m.": "pm"}


class Start:
    """A resolved start: a naive wall time in the schedule's zone, or an absolute instant."""

    __slots__ = ("iso", "wall")

    def __init__(self, wall: datetime, iso: datetime | None = None) -> None:
        self.wall = wall
        self.iso = iso  # an aware datetime when the text gave an offset


def resolve(words: Sequence[Word], today: date) -> Start:
    """The start named by ``words`` (the words after ``starting``), ``today`` in the zone."""
    items = [(n, w, normalize_names(w).rstrip(",")) for n, w in words]
    items = [item for item in items if item[2]]
    if len(items) == 1 and _ISO_FULL.fullmatch(items[0][1]):
        number, word, _ = items[0]
        try:
            parsed = datetime.fromisoformat(word.replace("z", "Z"))
        except ValueError:
            raise at_word(number, word, "bad date and time") from None
        if parsed.tzinfo is None:
            return Start(parsed)
        return Start(parsed.replace(tzinfo=None), parsed)
    day: date | None = None
    i = 0
    if i < len(items):
        day, i = _date(items, i, today)
    if i < len(items) and items[i][2] == "at":
        i += 1
    clock = time()
    has_clock = False
    if i < len(items):
        clock, i = _clock(items, i)
        has_clock = True
    if i < len(items):
        number, word, _ = items[i]
        raise at_word(number, word, "unexpected word in the start time")
    if day is None and not has_clock:
        number, word = words[0]
        raise at_word(number, word, "expected a date or a time (e.g. 2024-01-01, 00:30)")
    return Start(datetime.combine(day or today, clock))


def _date(items: list[tuple[int, str, str]], i: int, today: date) -> tuple[date | None, int]:
    number, word, text = items[i]
    if text in ("today", "tomorrow"):
        return today + timedelta(days=1 if text == "tomorrow" else 0), i + 1
    if text in DAY_NAMES:
        ahead = (DAY_NAMES.index(text) - today.weekday()) % 7
        return today + timedelta(days=ahead), i + 1
    m = _ISO_DATE.fullmatch(text)
    if m:
        return _day(number, word, int(m.group(1)), int(m.group(2)), int(m.group(3))), i + 1
    m = _ORDINAL.fullmatch(text)
    if m:
        return _day(number, word, today.year, today.month, int(m.group(1))), i + 1
    if text in MONTH_NAMES:  # May 2, 2024 / May 2nd / May 2
        month = MONTH_NAMES.index(text) + 1
        if i + 1 >= len(items):
            raise at_word(number, word, "a day must follow the month (e.g. May 2, 2024)")
        day_no, day_word, day_text = items[i + 1]
        m = re.fullmatch(r"(\d{1,2})(st|nd|rd|th)?", day_text)
        if not m:
            raise at_word(day_no, day_word, "expected a day of the month")
        year, j = _year(items, i + 2, today)
        return _day(day_no, day_word, year, month, int(m.group(1))), j
    m = re.fullmatch(r"(\d{1,2})(st|nd|rd|th)?", text)
    if m and i + 1 < len(items) and items[i + 1][2] in MONTH_NAMES:  # 2 May 2024
        month = MONTH_NAMES.index(items[i + 1][2]) + 1
        year, j = _year(items, i + 2, today)
        return _day(number, word, year, month, int(m.group(1))), j
    return None, i


def _year(items: list[tuple[int, str, str]], i: int, today: date) -> tuple[int, int]:
    if i < len(items) and re.fullmatch(r"\d{4}", items[i][2]):
        return int(items[i][2]), i + 1
    return today.year, i


def _day(number: int, word: str, year: int, month: int, day: int) -> date:
    if not 1 <= month <= 12:
        raise at_word(number, word, f"month {month} does not exist")
    if not 1 <= year <= 9999:
        raise at_word(number, word, f"year {year} is out of range")
    last = calendar.monthrange(year, month)[1]
    if not 1 <= day <= last:
        name = calendar.month_name[month]
        raise at_word(number, word, f"day {day} does not exist in {name} {year}")
    return date(year, month, day)


def _clock(items: list[tuple[int, str, str]], i: int) -> tuple[time, int]:
    number, word, text = items[i]
    if text in ("noon", "midnight"):
        return time(12 if text == "noon" else 0), i + 1
    m = _CLOCK.fullmatch(text)
    if not m or (m.group(2) is None and m.group(4) is None and not _next_meridiem(items, i)):
        raise at_word(number, word, "expected a time like 00:30, 12:15 PM or 2024-01-01")
    hour, minute, second = int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)
    meridiem = _MERIDIEM.get(m.group(4) or "")
    j = i + 1
    if meridiem is None and _next_meridiem(items, i):
        meridiem = _MERIDIEM[items[i + 1][2]]
        j = i + 2
    if meridiem is not None:
        if not 1 <= hour <= 12:
            raise at_word(number, word, "with AM/PM the hour must be 1 to 12")
        hour = hour % 12 + (12 if meridiem == "pm" else 0)
    if hour > 23 or minute > 59 or second > 59:
        raise at_word(number, word, "no such time of day")
    return time(hour, minute, second), j


def _next_meridiem(items: list[tuple[int, str, str]], i: int) -> bool:
    return i + 1 < len(items) and items[i + 1][2] in _MERIDIEM
