"""Telling a damaged frame length from a torn last write.

A header whose declared length runs past the end of the data is a torn tail (a crash
mid-write) unless whole, decodable frames resume somewhere after it and run exactly to
the end: then the length was damaged in the middle of the log, and cutting it off as a
torn tail would silently drop the frames after it.  ``Scan`` asks ``_resync_point``.
"""

from __future__ import annotations

import re
from typing import Final

from ztick_tw.store.decoding import decode_payload
from ztick_tw.store.frame import (
    _FRAME_HEAD,
    _PAUSE_TAIL,
    _POLICY_TAIL,
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    RUN_STATE_TAIL,
    TYPE_JOB,
    TYPE_JOB_REMOVAL,
    TYPE_PAUSE,
    TYPE_RULE,
    TYPE_RULE_POLICY,
    TYPE_RULE_REMOVAL,
    TYPE_RUN_STATE,
    TYPE_SCHEDULE_REMOVAL,
    TYPE_SCHEDULE_SET,
    CodecError,
)

__all__: list[str] = []


#: The smallest frame a writer produces: header, type byte, an empty id (removals).
_MIN_FRAME_BYTES: Final = FRAME_HEADER_BYTES + 3

#: Where a frame could start: a big-endian length from 3 to 0x10FFFF (so its first
#: byte is 0), then a known type byte (0 to 3, 16 to 20).  A lookahead, so matches may
#: overlap.  Frames of unknown types are not looked for: a chain of whole frames that
#: proves a damaged length is made of frames this version can check by decoding.
_HEADER_LIKE: Final = re.compile(
    rb"(?=\x00(?:[\x01-\x10][\x00-\xff]{2}|\x00[\x01-\xff][\x00-\xff]|\x00\x00[\x03-\xff])"
    rb"[\x00-\x03\x10-\x14])"
)

#: For the fixed-shape entries: payload length minus the first string's length.
_FIXED_EXTRA: Final = {
    TYPE_JOB: 12,
    TYPE_JOB_REMOVAL: 3,
    TYPE_RULE_REMOVAL: 3,
    TYPE_SCHEDULE_REMOVAL: 3,
    TYPE_RUN_STATE: 3 + RUN_STATE_TAIL.size,
    TYPE_PAUSE: 3 + _PAUSE_TAIL.size,
    TYPE_RULE_POLICY: 3 + _POLICY_TAIL.size,
}
#: For the others: the least payload length beyond the first string's length.
_LEAST_EXTRA: Final = {
    TYPE_RULE: 8,  # type, id length, pattern, runner kind, one string
    TYPE_SCHEDULE_SET: 15,  # type, id length, text, options, start time
}


def _frame_end(data: bytes, pos: int) -> int:
    """The end of a whole, decodable frame at ``pos``, or -1 if there is none there.

    The cheap checks (length, type byte, and for the fixed-shape entries the length
    implied by the id's length) reject almost every offset before anything is decoded.
    """
    n = len(data)
    if n - pos < _MIN_FRAME_BYTES:
        return -1
    length: int
    entry_type: int
    first_len: int
    length, entry_type, first_len = _FRAME_HEAD.unpack_from(data, pos)
    end = pos + FRAME_HEADER_BYTES + length
    if length < 3 or length > MAX_FRAME_BYTES or end > n:
        return -1
    fixed = _FIXED_EXTRA.get(entry_type)
    if fixed is not None:
        if length != first_len + fixed:
            return -1
    else:
        least = _LEAST_EXTRA.get(entry_type)
        if least is None or length < first_len + least:
            return -1
    try:
        decode_payload(data[pos + FRAME_HEADER_BYTES : end])
    except CodecError:
        return -1
    return end


def _resync_point(data: bytes, bad: int) -> tuple[int, int] | None:
    """Where whole frames resume after a bad header at ``bad``, if they do.

    Returns ``(offset, frames)`` for the first offset after ``bad`` from which a chain
    of ``frames`` (one or more) complete, decodable frames runs exactly to the end of
    ``data``, or ``None`` when there is no such offset, as after a real torn write
    (the bytes after the header are then the start of one frame).

    Only called when a header at ``bad`` declares a length (at most
    ``MAX_FRAME_BYTES``) running past the end, so at most about 1 MiB is searched.
    Candidates are found by ``_HEADER_LIKE`` (in C, skipping runs of zeros and
    random bytes quickly) and the cheap checks of ``_frame_end`` reject nearly all of
    them before decoding; every offset known to lead nowhere is remembered, so each is
    examined at most once (a real torn tail costs microseconds, a megabyte of
    adversarial bytes about a second).
    """
    n = len(data)
    dead = bytearray(n - bad)  # dead[p - bad]: no chain from p reaches the end
    search = _HEADER_LIKE.search
    last = n - _MIN_FRAME_BYTES
    candidate = bad + 1
    while candidate <= last:
        found = search(data, candidate)
        if found is None or found.start() > last:
            return None
        candidate = found.start()
        path: list[int] = []
        pos = candidate
        while pos != n and not dead[pos - bad]:
            end = _frame_end(data, pos)
            if end < 0:
                break
            path.append(pos)
            pos = end
        if pos == n:
            return candidate, len(path)
        dead[pos - bad] = 1
        for visited in path:
            dead[visited - bad] = 1
        candidate += 1
    return None
