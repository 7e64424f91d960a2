"""The one error the schedule engine raises."""

from __future__ import annotations


class ScheduleError(ValueError):
    """A schedule, option or policy that cannot be used.

    ``str(e)`` says what was wrong and where, e.g. ``at word 3 'fooday': unknown word``.
    """


def at_word(number: int, word: str, reason: str) -> ScheduleError:
    """The error for word ``number`` (1-based) of a schedule."""
    return ScheduleError(f"at word {number} {word!r}: {reason}")


def at_option(number: int, word: str, reason: str) -> ScheduleError:
    """The error for option word ``number`` (1-based)."""
    return ScheduleError(f"at option {number} {word!r}: {reason}")
