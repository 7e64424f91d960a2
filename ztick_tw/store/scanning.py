"""Scanning a whole logfile buffer: every frame in order, and where and why it stops.

A ``Scan`` decodes the common frames of a big log through ``fastpath`` and everything
else through ``decoding``; it never raises on bad data but reports a torn tail or a
corrupt frame (``ScanProblem``), telling the two apart with ``resync``.  Frames of a
type from 21 up (a newer ztick-tw's) are stepped over and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from ztick_tw.model import Entry, Job
from ztick_tw.store.decoding import decode_payload
from ztick_tw.store.fastpath import (  # the replay fast paths of Scan
    SET_JOB_ID,
    SET_JOB_NS,
    SET_JOB_STATUS,
    ScheduledSink,
    Strings,
    fast_run_state,
    fast_schedule_set,
    job_unpacker,
    pair_unpacker,
    schedule_layout,
)
from ztick_tw.store.frame import (
    _FRAME_HEAD,
    _STATUS_BY_BYTE,
    _U32,
    FIRST_UNKNOWN_TYPE,
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    TYPE_JOB,
    TYPE_RUN_STATE,
    TYPE_SCHEDULE_SET,
    CodecError,
)
from ztick_tw.store.resync import _resync_point

__all__ = ["Scan", "ScanProblem", "scan"]


@dataclass(frozen=True, slots=True)
class ScanProblem:
    """What stopped a scan before the end of the data.

    ``kind`` is ``"torn"`` when the remainder is an incomplete last frame (a crash
    mid-write: fewer than 4 header bytes, a declared length running past the end, or
    a zero-filled tail) and ``"corrupt"`` when a complete frame is bad (it fails to
    decode, or declares a length of 0 or over ``MAX_FRAME_BYTES``).

    A declared length running past the end is only ``"torn"`` when nothing whole
    follows it: if, from some offset after that header, complete decodable frames run
    exactly to the end of the data (see ``_resync_point``), the length field was
    damaged in the middle of the log and the frames after it are real, so it is
    ``"corrupt"``: cutting it off as a torn tail would silently drop them.

    ``offset`` is the byte offset of the frame's first byte, ``end`` the length of
    the data.
    """

    kind: Literal["torn", "corrupt"]
    offset: int
    end: int
    reason: str

    @property
    def dropped(self) -> int:
        """How many bytes, from ``offset`` to the end of the data, were not used."""
        return self.end - self.offset


class Scan:
    """Decode every frame of a buffer, in order.

    Iterate it (once) to get the entries.  When iteration ends, ``good_end`` is the
    offset just after the last complete good frame and ``problem`` says why the scan
    stopped early (``None`` when the data ended exactly on a frame boundary).
    Iteration never raises on bad data: damage is reported through ``problem``.

    ``count`` is the number of entries yielded.  Whole frames of a type from
    ``FIRST_UNKNOWN_TYPE`` (21) up, written by a newer version, are not decoded and
    not yielded: the scan steps over them (they end where their length says) and
    counts them in ``skipped_types`` (type byte -> frames), as ztick does with the
    types it does not know.

    With a ``scheduled`` sink (``ztick_tw.store.fastpath.ScheduledSink``), a schedule
    set followed by the ``planned`` job frame of the same job, as ``SCHEDULE SET``
    writes them, is not yielded as two entries: the sink is called with their fields,
    at that point of the iteration (so in log order with the entries around it), and
    ``diverted`` counts these pairs.  That is the replay of a million scheduled jobs
    without two million entry objects.  Any other schedule frame is yielded as usual.
    """

    __slots__ = (
        "_data",
        "_run_end",
        "_run_start",
        "_run_types",
        "_scheduled",
        "_start",
        "count",
        "diverted",
        "good_end",
        "problem",
        "skipped_types",
    )

    def __init__(
        self, data: bytes, start: int = 0, scheduled: ScheduledSink | None = None
    ) -> None:
        if not 0 <= start <= len(data):
            raise ValueError(f"scan start {start} outside data of {len(data)} bytes")
        self._data = data
        self._start = start
        self._scheduled = scheduled
        self.good_end = start
        self.count = 0
        self.diverted = 0
        self.problem: ScanProblem | None = None
        self.skipped_types: dict[int, int] = {}
        # The latest run of consecutive skipped frames: [start, end) and their types.
        self._run_start = self._run_end = -1
        self._run_types: list[int] = []

    @property
    def skipped(self) -> int:
        """How many frames of unknown types (21 and up) were stepped over."""
        return sum(self.skipped_types.values())

    def __iter__(self) -> Iterator[Entry]:
        data = self._data
        n = len(data)
        pos = self._start
        count = diverted = 0
        head = _FRAME_HEAD.unpack_from
        statuses = _STATUS_BY_BYTE
        new = object.__new__
        set_id, set_ns, set_status = SET_JOB_ID, SET_JOB_NS, SET_JOB_STATUS
        strings = Strings()
        known = strings.get
        # Fast path: job frames whose id has the same byte length as the previous
        # one (the usual case) are unpacked with one precompiled struct.  Anything
        # else (another id length, other entry types, bad bytes, the end of the data)
        # falls through to the header check and then to the careful path, which
        # re-examines the frame and says exactly what is wrong.
        unpack_job: Callable[[bytes, int], tuple[Any, ...]] | None = None
        job_id_len = -1
        job_frame_size = 0
        # With a sink, the same for a schedule frame and the job frame after it: once
        # one such pair is seen, the next frames are read as a pair of the same layout
        # (id, text and options lengths) until that fails.
        sink = self._scheduled
        pairing = False
        unpack_pair: Callable[[bytes, int], tuple[Any, ...]] = _no_pair
        # the schedule frame's payload length, and its id, text and options lengths
        pair_length = pair_id_len = pair_text_len = pair_options_len = -1
        pair_size = 0
        unpaired_at = -1  # where the pair did not fit: read the frame alone
        try:
            while True:
                if pairing:
                    if pos + pair_size <= n:
                        (
                            length,
                            entry_type,
                            id_len,
                            raw,
                            text_len,
                            raw_text,
                            options_len,
                            raw_options,
                            start_ns,
                            job_length,
                            job_type,
                            job_id_len2,
                            job_raw,
                            ns,
                            status_byte,
                        ) = unpack_pair(data, pos)
                        if (
                            entry_type == TYPE_SCHEDULE_SET
                            and job_type == TYPE_JOB
                            and status_byte == 0
                            and length == pair_length
                            and id_len == pair_id_len == job_id_len2
                            and text_len == pair_text_len
                            and options_len == pair_options_len
                            and job_length == id_len + 12
                            and job_raw == raw
                        ):
                            try:
                                job_id = raw.decode()
                                text = known(raw_text) or strings.add(raw_text)
                                options = known(raw_options) or strings.add(raw_options)
                            except UnicodeDecodeError:
                                pass
                            else:
                                sink(job_id, text, options, start_ns, ns)  # type: ignore[misc]
                                pos += pair_size
                                diverted += 1
                                continue
                        if (length, id_len, text_len, options_len) != (
                            pair_length,
                            pair_id_len,
                            pair_text_len,
                            pair_options_len,
                        ):
                            unpaired_at = -1  # another layout: look again below
                        else:
                            unpaired_at = pos  # not a pair: the frame alone, below
                    else:
                        unpaired_at = pos
                    pairing = False
                if unpack_job is not None and pos + job_frame_size <= n:
                    length, entry_type, id_len, raw, ns, status_byte = unpack_job(data, pos)
                    if (
                        entry_type == 0
                        and id_len == job_id_len
                        and length == id_len + 12
                        and status_byte < 4
                    ):
                        try:
                            job_id = raw.decode()
                        except UnicodeDecodeError:
                            pass
                        else:
                            job = new(Job)
                            set_id(job, job_id)
                            set_ns(job, ns)
                            set_status(job, statuses[status_byte])
                            pos += job_frame_size
                            count += 1
                            yield job
                            continue
                if n - pos >= 7:
                    length, entry_type, id_len = head(data, pos)
                    if (
                        entry_type == 0
                        and id_len != job_id_len
                        and length == id_len + 12
                        and pos + 4 + length <= n
                    ):
                        unpack_job = job_unpacker(id_len)
                        job_id_len = id_len
                        job_frame_size = id_len + 16
                        continue
                    end = pos + 4 + length
                    extension: Entry | None = None
                    if entry_type == TYPE_RUN_STATE and end <= n:
                        extension = fast_run_state(data, pos + 7, end, id_len)
                    elif entry_type == TYPE_SCHEDULE_SET and end <= n:
                        if (
                            sink is not None
                            and pos != unpaired_at
                            and end + 4 < n
                            and data[end + 4] == TYPE_JOB
                        ):
                            layout = schedule_layout(data, pos + 7, end, id_len)
                            if layout is not None:
                                pairing = True
                                unpack_pair = pair_unpacker(id_len, *layout)
                                pair_length, pair_id_len = length, id_len
                                pair_text_len, pair_options_len = layout
                                pair_size = length + id_len + 20
                                continue
                        extension = fast_schedule_set(data, pos + 7, end, id_len, strings)
                    if extension is not None:
                        pos = end
                        count += 1
                        yield extension
                        continue
                elif pos == n:
                    return
                step = self._careful(pos)
                if step is None:
                    if self.problem is not None:  # always set; may blame skipped frames
                        pos = self.problem.offset
                    return
                entry, pos = step
                if entry is None:
                    continue  # a newer version's frame, counted in skipped_types
                count += 1
                yield entry
        finally:
            self.good_end = pos
            self.count = count
            self.diverted = diverted

    def _careful(self, pos: int) -> tuple[Entry | None, int] | None:
        """Decode the frame at ``pos``; on failure set ``problem`` and return None.

        A whole frame of an unknown type (21 and up) is counted and stepped over:
        ``(None, end)``.
        """
        step = self._frame_at(pos)
        if isinstance(step, ScanProblem):
            self.problem = self._blame_skipped(step) if pos == self._run_end else step
            return None
        end = step[1]
        if step[0] is None:
            entry_type = self._data[pos + FRAME_HEADER_BYTES]
            skipped = self.skipped_types
            skipped[entry_type] = skipped.get(entry_type, 0) + 1
            if pos != self._run_end:
                self._run_start = pos
                self._run_types = []
            self._run_types.append(entry_type)
            self._run_end = end
        return step

    def _blame_skipped(self, problem: ScanProblem) -> ScanProblem:
        """The problem to report when ``problem`` comes right after skipped frames.

        Damage that turns a type byte into 21 or more makes a frame look like a newer
        version's; its length then lands the scan inside the next frame, which looks
        torn or corrupt.  So a corrupt frame right after skipped ones is reported at
        the first of them, and so is a "torn" tail when whole frames run from some
        offset after that first one exactly to the end (as ``_resync_point`` looks
        for after a damaged length).  A newer log's real torn tail stays torn.
        """
        start = self._run_start
        skipped = len(self._run_types)
        where = (
            f"right after {skipped} skipped frame{'s' if skipped > 1 else ''} of unknown "
            f"type{'s' if skipped > 1 else ''} from byte offset {start}"
        )
        if problem.kind == "corrupt":
            reason = f"{problem.reason}; {where}, taken as part of the damage"
        else:
            resync = _resync_point(self._data, start)
            if resync is None:
                return problem
            at, frames = resync
            reason = (
                f"{problem.reason} at byte offset {problem.offset}, {where}, yet {frames} "
                f"whole frame{'s' if frames > 1 else ''} from byte offset {at} run to the "
                "end of the data: damage that made a frame look like an unknown type"
            )
        for entry_type in self._run_types:
            self.skipped_types[entry_type] -= 1
            if not self.skipped_types[entry_type]:
                del self.skipped_types[entry_type]
        return ScanProblem("corrupt", start, problem.end, reason)

    def _frame_at(self, pos: int) -> tuple[Entry | None, int] | ScanProblem:
        """The frame at ``pos`` and its end (entry None: an unknown type), or the problem."""
        data = self._data
        n = len(data)
        left = n - pos
        if left < FRAME_HEADER_BYTES:
            return ScanProblem("torn", pos, n, f"incomplete length header ({left} of 4 bytes)")
        length: int = _U32.unpack_from(data, pos)[0]
        if length == 0 or length > MAX_FRAME_BYTES:
            if data.count(0, pos) == left:
                return ScanProblem(
                    "torn", pos, n, f"zero-filled tail of {left} bytes (crash while growing)"
                )
            return ScanProblem(
                "corrupt",
                pos,
                n,
                f"impossible frame length {length} (must be 1..{MAX_FRAME_BYTES})",
            )
        end = pos + FRAME_HEADER_BYTES + length
        if end > n:
            shortfall = f"frame declares {length} payload bytes but only {left - 4} follow"
            resync = _resync_point(data, pos)
            if resync is None:
                return ScanProblem("torn", pos, n, shortfall)
            at, frames = resync
            return ScanProblem(
                "corrupt",
                pos,
                n,
                f"{shortfall}, yet {frames} whole frame{'s' if frames > 1 else ''} "
                f"from byte offset {at} run to the end of the data: a damaged length, "
                "not a torn last write",
            )
        if data[pos + FRAME_HEADER_BYTES] >= FIRST_UNKNOWN_TYPE:
            return None, end
        try:
            entry = decode_payload(data[pos + FRAME_HEADER_BYTES : end])
        except CodecError as exc:
            return ScanProblem("corrupt", pos, n, f"{length}-byte frame: {exc.reason}")
        return entry, end


def scan(data: bytes, start: int = 0, scheduled: ScheduledSink | None = None) -> Scan:
    """A ``Scan`` of ``data`` from byte ``start`` (see ``Scan``)."""
    return Scan(data, start, scheduled)


def _no_pair(data: bytes, pos: int) -> tuple[Any, ...]:  # pragma: no cover - never called
    raise AssertionError("no pair layout yet")
