"""The replay fast paths of ``Scan``: decoding the frames a big log is made of, cheaply.

A log of a million scheduled jobs is two million frames, and a restart replays all of
them (SPEC's target: a million scheduled jobs replayed in 5 s).  ``Scan``
(``ztick_tw.store.scanning``) decodes the common frames here, with precompiled structs and
entries filled through their slots, and sends everything else (other layouts, other
types, bad bytes) to its careful path, which says exactly what is wrong.  Every
function here returns ``None`` rather than guess: it never decides that bytes are bad.

The layouts are those of ``docs/logfile.md`` (type 0 job, 16 schedule set, 18 run state).
"""

from __future__ import annotations

import struct
import types
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Final

from ztick_tw.model import Entry, Job, RunState, ScheduleSet
from ztick_tw.store.frame import _I64, _U16, RUN_STATE_TAIL

__all__ = [
    "SET_JOB_ID",
    "SET_JOB_NS",
    "SET_JOB_STATUS",
    "ScheduledSink",
    "Strings",
    "fast_run_state",
    "fast_schedule_set",
    "job_unpacker",
    "pair_unpacker",
    "schedule_layout",
]

#: ``sink(job_id, text, options, start_ns, execution_ns)``: a schedule set (type 16)
#: followed by the ``planned`` job frame (type 0) of the same job, which is what
#: ``SCHEDULE SET`` appends.  A ``Scan`` given a sink hands it such pairs instead of
#: yielding the two entries (see ``Scan``); the strings of one job are one object.
ScheduledSink = Callable[[str, str, str, int, int], None]


#: Precompiled unpackers are kept for this many layouts (ids of 1 to 1024 bytes...).
_LAYOUTS_KEPT: Final = 1024
#: ``Strings`` keeps this many distinct decoded strings.
STRINGS_KEPT: Final = 4096

_job_unpackers: dict[int, Callable[[bytes, int], tuple[Any, ...]]] = {}
_pair_unpackers: dict[tuple[int, int, int], Callable[[bytes, int], tuple[Any, ...]]] = {}


def job_unpacker(id_len: int) -> Callable[[bytes, int], tuple[Any, ...]]:
    """An unpacker reading a whole job frame with an ``id_len``-byte id at once."""
    unpack = _job_unpackers.get(id_len)
    if unpack is None:
        unpack = struct.Struct(f">IBH{id_len}sqB").unpack_from
        if len(_job_unpackers) < _LAYOUTS_KEPT:
            _job_unpackers[id_len] = unpack
    return unpack


def pair_unpacker(
    id_len: int, text_len: int, options_len: int
) -> Callable[[bytes, int], tuple[Any, ...]]:
    """An unpacker reading a schedule frame and the job frame after it, at once.

    Fields: length, type, id length, id, text length, text, options length, options,
    start; then length, type, id length, id, execution ns, status byte.  The caller
    checks every length and type against the layout (a struct reads any bytes).
    """
    key = (id_len, text_len, options_len)
    unpack = _pair_unpackers.get(key)
    if unpack is None:
        unpack = struct.Struct(
            f">IBH{id_len}sH{text_len}sH{options_len}sqIBH{id_len}sqB"
        ).unpack_from
        if len(_pair_unpackers) < _LAYOUTS_KEPT:
            _pair_unpackers[key] = unpack
    return unpack


def schedule_layout(data: bytes, at: int, end: int, id_len: int) -> tuple[int, int] | None:
    """``(text_len, options_len)`` of the schedule frame whose id starts at ``at``.

    ``None`` when the lengths inside the frame do not add up to ``end`` exactly.
    """
    pos = at + id_len
    if pos + 12 > end:
        return None
    text_len: int = _U16.unpack_from(data, pos)[0]
    pos += 2 + text_len
    if pos + 10 > end:
        return None
    options_len: int = _U16.unpack_from(data, pos)[0]
    if pos + 2 + options_len + 8 != end:
        return None
    return text_len, options_len


class Strings(dict[bytes, str]):
    """Decoded schedule texts and options by their bytes, so repeats are one object.

    A million jobs on a few schedules then share a few strings, and looking them up
    later hashes nothing new.  At most ``STRINGS_KEPT`` are kept (all-distinct texts
    are decoded each time, as without it).  ``decode`` raises ``UnicodeDecodeError``.
    """

    __slots__ = ()

    def decode(self, raw: bytes) -> str:
        """``raw`` as text, the same object as last time when it was seen before."""
        text = self.get(raw)
        return self.add(raw) if text is None else text

    def add(self, raw: bytes) -> str:
        """``raw`` as text, kept if there is room (for a caller that just missed it)."""
        text = raw.decode()
        if len(self) < STRINGS_KEPT:
            self[raw] = text
        return text


def _slot_setters(
    cls: type[Any], names: tuple[str, ...]
) -> tuple[Callable[[Any, object], None], ...]:
    """The slot setters of the frozen slotted dataclass ``cls``, in field order.

    A frozen dataclass's ``__init__`` goes through ``object.__setattr__`` once a field
    (a ``Job``: about 0.8 µs here).  An object made with ``object.__new__`` and filled
    through its member descriptors is identical (equal, same hash, still frozen) in a
    third to a half of that (a run state: 0.5 µs instead of 1.2 µs), which counts when a
    million jobs are replayed.  Fails at import, with a message, if the class's fields
    are not exactly ``names`` (rather than building half-filled entries).
    """
    descriptors = [vars(cls).get(name) for name in names]
    setters = [d.__set__ for d in descriptors if isinstance(d, types.MemberDescriptorType)]
    if tuple(f.name for f in fields(cls)) != names or len(setters) != len(names):
        raise ImportError(  # pragma: no cover - layout guard
            f"ztick_tw.store.fastpath: the replay fast path expects {cls.__name__} to be a "
            f"slotted dataclass with exactly {names}"
        )
    return tuple(setters)


SET_JOB_ID, SET_JOB_NS, SET_JOB_STATUS = _slot_setters(Job, ("id", "execution_ns", "status"))
_RUN_STATE_SETTERS = _slot_setters(
    RunState, ("job_id", "runs", "occurrence_ns", "attempt", "due_ns")
)
_SCHEDULE_SETTERS = _slot_setters(ScheduleSet, ("job_id", "text", "options", "start_ns"))


_new: Final = object.__new__


def fast_run_state(data: bytes, at: int, end: int, id_len: int) -> Entry | None:
    """The run state frame whose id starts at ``at`` (its length is checked), or None.

    None sends the frame to the careful path, which says what is wrong with it.
    A run state follows every job frame a schedule writes, so it gets a fast path.
    """
    tail = at + id_len
    if end - tail != RUN_STATE_TAIL.size:
        return None
    try:
        job_id = data[at:tail].decode()
    except UnicodeDecodeError:
        return None
    runs, occurrence, attempt, due = RUN_STATE_TAIL.unpack_from(data, tail)
    set_id, set_runs, set_occurrence, set_attempt, set_due = _RUN_STATE_SETTERS
    entry = _new(RunState)
    set_id(entry, job_id)
    set_runs(entry, runs)
    set_occurrence(entry, occurrence)
    set_attempt(entry, attempt)
    set_due(entry, due)
    return entry


def fast_schedule_set(
    data: bytes, at: int, end: int, id_len: int, strings: Strings
) -> Entry | None:
    """The schedule frame whose id starts at ``at``, or None (see ``fast_run_state``).

    Its text and options come from ``strings`` (one object per distinct value).
    """
    layout = schedule_layout(data, at, end, id_len)
    if layout is None:
        return None
    text_len, options_len = layout
    text_at = at + id_len + 2
    options_at = text_at + text_len + 2
    try:
        job_id = data[at : at + id_len].decode()
        text = strings.decode(data[text_at : text_at + text_len])
        options = strings.decode(data[options_at : options_at + options_len])
    except UnicodeDecodeError:
        return None
    set_id, set_text, set_options, set_start = _SCHEDULE_SETTERS
    entry = _new(ScheduleSet)
    set_id(entry, job_id)
    set_text(entry, text)
    set_options(entry, options)
    set_start(entry, _I64.unpack_from(data, end - 8)[0])
    return entry
