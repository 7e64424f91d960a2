"""Durations, schedule options and rule policies: parse and render (SPEC §8, §9).

Every render pastes back: ``parse_options(options.render())`` gives the same options and
``parse_policy(render_policy(p, d), Policy())`` the same effective policy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction

from ztick_tw.model import Policy
from ztick_tw.schedules.errors import ScheduleError, at_option
from ztick_tw.schedules.zones import naive_ns, zone

DAY_NS = 86_400 * 10**9
_UNITS = {
    "w": 7 * DAY_NS,
    "d": DAY_NS,
    "h": 3600 * 10**9,
    "m": 60 * 10**9,
    "s": 10**9,
    "ms": 10**6,
    "us": 10**3,
    "µs": 10**3,
    "ns": 1,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|w|d|h|m|s)")
#: How ``format_duration`` writes a duration: largest unit first, weeks as days.
_FORMAT = (("d", DAY_NS), ("h", 3600 * 10**9), ("m", 60 * 10**9), ("s", 10**9))
_FORMAT_SMALL = (("ms", 10**6), ("us", 10**3), ("ns", 1))
MAX_NS = 2**63 - 1

OVERLAPS = ("skip", "allow", "queue", "replace")
MISFIRES = ("once", "all", "skip")


def parse_duration(text: str) -> int:
    """``500ms``, ``30s``, ``5m``, ``1h30m``, ``2d``, ``1w``, ``1.5s``, ``0`` -> ns."""
    if text == "0":
        return 0
    if text.startswith("-"):
        raise ScheduleError(f"negative duration {text!r}")
    total = Fraction(0)
    pos = 0
    for m in _PART.finditer(text):
        if m.start() != pos:
            break
        total += Fraction(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ScheduleError(f"bad duration {text!r} (write e.g. 500ms, 30s, 5m, 1h30m, 2d)")
    if total > MAX_NS:
        raise ScheduleError(f"duration {text!r} is too long")
    return int(total)


def format_duration(ns: int) -> str:
    """A duration as ``parse_duration`` reads it: ``1h30m``, ``500ms``, ``0s``."""
    if ns == 0:
        return "0s"
    if ns < 0:
        return "-" + format_duration(-ns)
    out = []
    rest = ns
    for name, size in _FORMAT:
        count, rest = divmod(rest, size)
        if count:
            out.append(f"{count}{name}")
    for name, size in _FORMAT_SMALL:
        count, rest = divmod(rest, size)
        if count:
            out.append(f"{count}{name}")
    return "".join(out)


def parse_time(text: str, tz: str = "UTC") -> int:
    """ISO 8601 / RFC 3339 (``2024-05-02T00:00:00Z``); without an offset it is read in ``tz``."""
    m = re.fullmatch(r"(.*?[T ]\d\d:\d\d(?::\d\d)?)(\.\d{1,9})?(Z|z|[+-]\d\d:?\d\d)?", text)
    base, fraction, offset = (m.group(1), m.group(2), m.group(3)) if m else (text, None, None)
    try:
        parsed = datetime.fromisoformat(base + (offset or "").replace("z", "Z"))
    except ValueError:
        raise ScheduleError(f"bad time {text!r} (write e.g. 2024-05-02T00:00:00Z)") from None
    extra = int((fraction or ".")[1:].ljust(9, "0")) if fraction else 0
    if parsed.tzinfo is None:
        return zone(tz).instant(parsed) + extra
    return naive_ns(parsed.astimezone(UTC).replace(tzinfo=None)) + extra


def format_time(ns: int) -> str:
    """RFC 3339 UTC: ``2024-05-02T00:00:00Z`` (a fraction only when there is one)."""
    seconds, rest = divmod(ns, 10**9)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if rest:
        text += "." + f"{rest:09d}".rstrip("0")
    return text + "Z"


def _format_float(x: float) -> str:
    return str(int(x)) if x.is_integer() else repr(x)


@dataclass(frozen=True, slots=True)
class Options:
    """Every option of SPEC §8 with its effective value."""

    tz: str = "UTC"
    limit: int = 0
    until_ns: int | None = None
    decay: float = 0.0
    decay_step_ns: int = DAY_NS
    jitter_ns: int = 0
    overlap: str = "skip"
    misfire: str = "once"
    grace_ns: int | None = None

    def render(self) -> list[str]:
        """Every key in canonical order, effective values; pastes back through parse_options."""
        return [
            f"tz={self.tz}",
            f"limit={self.limit}",
            "until=-" if self.until_ns is None else f"until={format_time(self.until_ns)}",
            f"decay={_format_float(self.decay)}",
            f"decay_step={format_duration(self.decay_step_ns)}",
            f"jitter={format_duration(self.jitter_ns)}",
            f"overlap={self.overlap}",
            f"misfire={self.misfire}",
            "grace=-" if self.grace_ns is None else f"grace={format_duration(self.grace_ns)}",
        ]


OPTION_KEYS: tuple[str, ...] = ("tz", "limit", "until", "decay", "decay_step", "jitter")
OPTION_KEYS += ("overlap", "misfire", "grace")


def _split(words: Sequence[str], keys: Sequence[str], what: str) -> dict[str, tuple[int, str]]:
    """``key=value`` words -> {key: (word number, value)}; unknown or repeated keys raise."""
    found: dict[str, tuple[int, str]] = {}
    for number, word in enumerate(words, 1):
        key, eq, value = word.partition("=")
        key = key.lower()
        if not eq:
            raise at_option(number, word, f"expected key=value ({what}: {', '.join(keys)})")
        if key not in keys:
            raise at_option(number, word, f"unknown {what} {key!r} (known: {', '.join(keys)})")
        if key in found:
            raise at_option(number, word, f"{key} given twice")
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = value[1:-1]
        found[key] = (number, value)
    return found


def _count(number: int, word: str, value: str, key: str) -> int:
    if value.startswith("-"):
        raise at_option(number, word, f"{key} cannot be negative")
    if not value.isdigit():
        raise at_option(number, word, f"{key} must be a whole number")
    result = int(value)
    if result > 2**31:
        raise at_option(number, word, f"{key} is too large")
    return result


def _duration(number: int, word: str, value: str) -> int:
    try:
        return parse_duration(value)
    except ScheduleError as e:
        raise at_option(number, word, str(e)) from None


def parse_options(words: Sequence[str]) -> Options:
    """``key=value`` words -> :class:`Options` (unknown key, zone or value: ScheduleError)."""
    found = _split(words, OPTION_KEYS, "option")
    values: dict[str, object] = {}
    tz = "UTC"
    if "tz" in found:
        number, tz = found["tz"]
        try:
            zone(tz)
        except ScheduleError as e:
            raise at_option(number, f"tz={tz}", str(e)) from None
        values["tz"] = tz
    for key, (number, value) in found.items():
        word = f"{key}={value}"
        if key == "limit":
            values["limit"] = _count(number, word, value, key)
        elif key == "until":
            try:
                values["until_ns"] = None if value == "-" else parse_time(value, tz)
            except ScheduleError as e:
                raise at_option(number, word, str(e)) from None
        elif key == "decay":
            try:
                decay = float(value)
            except ValueError:
                raise at_option(number, word, "decay must be a number, e.g. 1 or 0.5") from None
            if not math.isfinite(decay) or abs(decay) > 100:
                raise at_option(number, word, "decay must be between -100 and 100")
            values["decay"] = decay
        elif key == "decay_step":
            step = _duration(number, word, value)
            if step <= 0:
                raise at_option(number, word, "decay_step must be more than 0")
            values["decay_step_ns"] = step
        elif key == "jitter":
            values["jitter_ns"] = _duration(number, word, value)
        elif key == "grace":
            values["grace_ns"] = None if value == "-" else _duration(number, word, value)
        elif key in ("overlap", "misfire"):
            allowed = OVERLAPS if key == "overlap" else MISFIRES
            if value.lower() not in allowed:
                raise at_option(number, word, f"{key} must be one of {'|'.join(allowed)}")
            values[key] = value.lower()
    return Options(**values)  # type: ignore[arg-type]


POLICY_KEYS = ("timeout", "retries", "backoff")
MAX_RETRIES = 1000


def parse_policy(words: Sequence[str], base: Policy) -> Policy:
    """``timeout=`` ``retries=`` ``backoff=<min>..<max>`` over ``base`` (keys not given kept).

    ``-`` as a value goes back to the ``[runners]`` default.
    """
    found = _split(words, POLICY_KEYS, "policy key")
    timeout, retries = base.timeout_ns, base.retries
    low, high = base.backoff_min_ns, base.backoff_max_ns
    for key, (number, value) in found.items():
        word = f"{key}={value}"
        if key == "timeout":
            timeout = None if value == "-" else _duration(number, word, value)
        elif key == "retries":
            retries = None if value == "-" else _count(number, word, value, key)
            if retries is not None and retries > MAX_RETRIES:
                raise at_option(number, word, f"retries must be at most {MAX_RETRIES}")
        elif value == "-":
            low = high = None
        else:
            first, dots, last = value.partition("..")
            if not dots:
                raise at_option(number, word, "write backoff=<min>..<max>, e.g. 1s..5m")
            low = _duration(number, word, first)
            high = _duration(number, word, last)
            if low > high:
                raise at_option(number, word, "backoff minimum is more than its maximum")
    return Policy(timeout, retries, low, high)


def render_policy(policy: Policy, defaults: Policy) -> list[str]:
    """The effective policy: ``["timeout=30s", "retries=0", "backoff=1s..5m"]``.

    Keys the policy leaves unset take ``defaults``; ``-`` when neither sets them (no
    timeout, no backoff), retries 0.
    """

    def pick(own: int | None, default: int | None) -> int | None:
        return own if own is not None else default

    timeout = pick(policy.timeout_ns, defaults.timeout_ns)
    retries = pick(policy.retries, defaults.retries)
    low = pick(policy.backoff_min_ns, defaults.backoff_min_ns)
    high = pick(policy.backoff_max_ns, defaults.backoff_max_ns)
    backoff = "-"
    if low is not None and high is not None:
        backoff = f"{format_duration(low)}..{format_duration(high)}"
    return [
        "timeout=-" if timeout is None else f"timeout={format_duration(timeout)}",
        f"retries={retries or 0}",
        f"backoff={backoff}",
    ]
