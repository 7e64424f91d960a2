"""Schedule text -> expression tree (Meerschaum's grammar, SPEC §8), with word positions.

``parse("daily and mon-fri starting May 2, 2024")`` gives two parts joined by ``and`` and the
start words.  Word numbers (1-based) are kept so every error says where it is.  Nothing
here knows about time zones or instants: that is :mod:`~ztick_tw.schedules.occurrences`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from cronsim import CronSim, CronSimError
from cronsim.cronsim import Field

from ztick_tw.schedules.errors import ScheduleError, at_word

Word = tuple[int, str]  # (1-based word number, the word as written)

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MONTH_NAMES = (
    "jan",
    "feb",
    "mar",
    "apr",
    "may",
    "jun",
    "jul",
    "aug",
    "sep",
    "oct",
    "nov",
    "dec",
)
#: Full and alternative names -> the three-letter names cron knows.
ALIASES = {
    **{full: full[:3] for full in ("monday", "wednesday", "friday", "saturday", "sunday")},
    "tuesday": "tue",
    "tues": "tue",
    "thursday": "thu",
    "thurs": "thu",
    "thur": "thu",
    **{
        full: full[:3]
        for full in (
            "january",
            "february",
            "march",
            "april",
            "june",
            "july",
            "august",
            "september",
            "october",
            "november",
            "december",
        )
    },
    "sept": "sep",
}
UNITS = {
    "millisecond": "ms",
    "ms": "ms",
    "second": "s",
    "sec": "s",
    "minute": "m",
    "min": "m",
    "hour": "h",
    "day": "d",
    "week": "w",
    "month": "mo",
    "year": "y",
}
ADVERBS = {
    "secondly": "s",
    "minutely": "m",
    "hourly": "h",
    "daily": "d",
    "weekly": "w",
    "monthly": "mo",
    "yearly": "y",
    "annually": "y",
}
MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
AND_WORDS = frozenset({"and", "&"})
OR_WORDS = frozenset({"or", "|"})
START_WORDS = frozenset({"starting", "beginning"})
RANGE_WORDS = frozenset({"through", "thru", "-"})
_CRON_FIELDS = (Field.MINUTE, Field.HOUR, Field.DAY, Field.MONTH, Field.DOW)
_CRON_NAMES = ("minute", "hour", "day of month", "month", "weekday")
_CRON_CHARS = re.compile(r"[0-9a-z*,/\-]+")
_NAME_RUN = re.compile(r"[a-z]+")


@dataclass(frozen=True, slots=True)
class Every:
    """``every N <unit>`` or an adverb (``daily``); unit: ms s m h d w mo y."""

    count: int
    unit: str
    word: Word


@dataclass(frozen=True, slots=True)
class Cron:
    """A five-field cron expression (names normalized to what cronsim reads)."""

    expr: str
    word: Word


@dataclass(frozen=True, slots=True)
class Fragment:
    """``mon-fri``, ``jun-aug``, ``2024``: the days it admits (weekday 0 = Monday)."""

    weekdays: frozenset[int] | None
    months: frozenset[int] | None
    years: tuple[int, int] | None
    word: Word


Part = Every | Cron | Fragment


@dataclass(frozen=True, slots=True)
class Parsed:
    """The whole expression: its parts, how they are joined, the ``starting`` words."""

    parts: tuple[Part, ...]
    op: str  # "and", "or", or "" for a single part
    start: tuple[Word, ...]


def words_of(text: str) -> list[Word]:
    """The numbered words of ``text``; ``&`` and ``|`` are words even when glued."""
    tokens = re.findall(r"[&|]|[^\s&|]+", text)
    return list(enumerate(tokens, 1))


def normalize_names(word: str) -> str:
    """Lower-case, with full day and month names shortened (``Monday`` -> ``mon``)."""
    return _NAME_RUN.sub(lambda m: ALIASES.get(m.group(0), m.group(0)), word.lower())


def parse(text: str) -> Parsed:
    """Parse schedule text; a ScheduleError says what and where."""
    words = words_of(text)
    if not words:
        raise ScheduleError("empty schedule (write e.g. 'every 30 minutes' or '0 9 * * mon-fri')")
    start: tuple[Word, ...] = ()
    for i, (number, word) in enumerate(words):
        if word.lower() in START_WORDS:
            start = tuple(words[i + 1 :])
            if not start:
                raise at_word(number, word, "a time must follow (e.g. 'starting 2024-01-01')")
            words = words[:i]
            break
    if not words:
        raise ScheduleError("no schedule before 'starting'")
    groups: list[list[Word]] = [[]]
    op = ""
    for number, word in words:
        lower = word.lower()
        kind = "and" if lower in AND_WORDS else "or" if lower in OR_WORDS else ""
        if not kind:
            groups[-1].append((number, word))
            continue
        if op and kind != op:
            raise at_word(number, word, f"'and' and 'or' cannot both be used (this uses {op!r})")
        if not groups[-1]:
            raise at_word(number, word, f"a schedule must come before {word!r}")
        op = kind
        groups.append([])
    if not groups[-1]:
        number, word = words[-1]
        raise at_word(number, word, "a schedule must follow")
    return Parsed(tuple(_part(_join_ranges(g)) for g in groups), op, start)


def _join_ranges(words: list[Word]) -> list[Word]:
    """``mon through fri``, ``mon thru fri``, ``mon - fri`` -> ``mon-fri``."""
    out: list[Word] = []
    i = 0
    while i < len(words):
        number, word = words[i]
        if word.lower() in RANGE_WORDS and out and i + 1 < len(words):
            first_number, first = out.pop()
            out.append((first_number, f"{first}-{words[i + 1][1]}"))
            i += 2
            continue
        out.append((number, word))
        i += 1
    return out


def _part(words: list[Word]) -> Part:
    number, word = words[0]
    lower = word.lower()
    if lower == "every":
        return _every(words)
    if len(words) == 5:
        return _cron(words)
    if len(words) > 1:
        extra = words[1]
        if lower in ADVERBS or lower in MACROS or _fragment_or_none(words[0]) is not None:
            raise at_word(extra[0], extra[1], "unexpected word ('and', 'or' or 'starting'?)")
        raise at_word(number, word, "unknown schedule (a cron expression has 5 fields)")
    if lower in ADVERBS:
        return Every(1, ADVERBS[lower], (number, word))
    if lower in MACROS:
        return Cron(MACROS[lower], (number, word))
    if lower.startswith("@"):
        raise at_word(number, word, f"unknown macro (known: {', '.join(MACROS)})")
    fragment = _fragment_or_none(words[0])
    if fragment is None:
        raise at_word(
            number,
            word,
            "unknown word (expected every N <unit>, secondly..yearly, a cron expression, "
            "@hourly..@yearly, or a fragment like mon-fri, jun-aug, 2024)",
        )
    return fragment


def _every(words: list[Word]) -> Every:
    head = words[0]
    if len(words) < 2:
        raise at_word(*head, "'every' needs a number and a unit (e.g. 'every 30 minutes')")
    count = 1
    rest = words[1:]
    number, word = rest[0]
    if re.fullmatch(r"[+-]?\d+(\.\d*)?", word):
        if word.startswith("-"):
            raise at_word(number, word, "negative numbers are not allowed")
        if not word.lstrip("+").isdigit():
            raise at_word(number, word, "the count must be a whole number")
        count = int(word)
        if count == 0:
            raise at_word(number, word, "'every 0' never fires: the count must be 1 or more")
        if count > 10**12:
            raise at_word(number, word, "the count is too large")
        rest = rest[1:]
    if not rest:
        raise at_word(number, word, "a unit must follow (seconds, minutes, hours, days, ...)")
    number, word = rest[0]
    lower = word.lower()
    unit = UNITS.get(lower) or (UNITS.get(lower[:-1]) if lower.endswith("s") else None)
    if unit is None:
        raise at_word(
            number,
            word,
            "unknown unit (milliseconds, seconds, minutes, hours, days, weeks, months, years)",
        )
    if len(rest) > 1:
        raise at_word(*rest[1], "unexpected word ('and', 'or' or 'starting'?)")
    return Every(count, unit, head)


def _cron(words: list[Word]) -> Cron:
    fields = []
    for (number, word), field, name in zip(words, _CRON_FIELDS, _CRON_NAMES, strict=True):
        text = normalize_names(word)
        if not _CRON_CHARS.fullmatch(text):
            raise at_word(number, word, f"bad cron {name} field")
        if re.search(r"(^|[,/])-", text):
            raise at_word(number, word, "negative numbers are not allowed")
        if re.search(r"/0*(,|$)", text):
            raise at_word(number, word, f"step 0 in the {name} field never advances")
        try:
            field.parse(text.upper())
        except (CronSimError, ValueError, IndexError):
            raise at_word(number, word, f"bad cron {name} field") from None
        fields.append(text)
    expr = " ".join(fields)
    try:
        CronSim(expr, datetime(2000, 1, 1))
    except (CronSimError, ValueError, IndexError) as e:
        raise at_word(*words[0], f"bad cron expression {expr!r}: {e}") from None
    return Cron(expr, words[0])


def _names(text: str, names: tuple[str, ...]) -> frozenset[int] | None:
    """``mon-fri,sun`` over ``names`` -> their indexes (ranges may wrap); None: not names."""
    found: set[int] = set()
    for item in text.split(","):
        first, dash, last = item.partition("-")
        if first not in names or (dash and last not in names):
            return None
        a = names.index(first)
        b = names.index(last) if dash else a
        span = (b - a) % len(names)
        found.update((a + k) % len(names) for k in range(span + 1))
    return frozenset(found)


def _fragment_or_none(word: Word) -> Fragment | None:
    text = normalize_names(word[1])
    days = _names(text, DAY_NAMES)
    if days is not None:
        return Fragment(days, None, None, word)
    months = _names(text, MONTH_NAMES)
    if months is not None:
        return Fragment(None, frozenset(m + 1 for m in months), None, word)
    m = re.fullmatch(r"(\d{4})(?:-(\d{4}))?", text)
    if m:
        first = int(m.group(1))
        last = int(m.group(2) or first)
        if not 1970 <= first <= last <= 9999:
            raise at_word(*word, "a year range must run forward, between 1970 and 9999")
        return Fragment(None, None, (first, last), word)
    return None
