"""The schedule engine of SPEC §8: grammar, options, policies and instants.

Pure: no I/O, no reactor, no clock (``now_ns`` is passed in).  See ``docs/recurring.md``.
"""

from ztick_tw.schedules.errors import ScheduleError
from ztick_tw.schedules.options import (
    Options,
    format_duration,
    format_time,
    parse_duration,
    parse_options,
    parse_policy,
    parse_time,
    render_policy,
)
from ztick_tw.schedules.schedule import MAX_PREVIEW, Schedule, compile_schedule

__all__ = [
    "MAX_PREVIEW",
    "Options",
    "Schedule",
    "ScheduleError",
    "compile_schedule",
    "format_duration",
    "format_time",
    "parse_duration",
    "parse_options",
    "parse_policy",
    "parse_time",
    "render_policy",
]
