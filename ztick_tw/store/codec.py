"""The binary logfile format (SPEC §5): encoding, decoding and scanning frames.

A logfile is a sequence of frames with no header.  A frame is a ``u32`` big-endian
payload length followed by the payload; the first payload byte is the entry type:

==== ============ ==================================================================
type entry        payload after the type byte
==== ============ ==================================================================
0    job          string id, ``i64`` execution ns (BE), ``u8`` status
1    rule         string id, string pattern, ``u8`` runner kind, runner fields
2    job removal  string id
3    rule removal string id
==== ============ ==================================================================

Strings are a ``u16`` big-endian byte count followed by that many UTF-8 bytes.  Runner
fields: 0 shell (command); 1 amqp (dsn, exchange, routing_key); 2 direct (executable,
``u16`` count, strings); 3 awf (workflow, ``u16`` count, ``key=value`` strings); 4 http
(method, url); 5 redis (url, command, key).

Everything here is pure (no I/O).  Replay speed matters (a million job frames must
load in well under a second), so the job frame has a dedicated fast path both ways.
"""

from __future__ import annotations

import re
import struct
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any, Final, Literal

from ztick_tw.model import (
    MAX_STRING_BYTES,
    AmqpSpec,
    AwfSpec,
    DirectSpec,
    Entry,
    HttpSpec,
    Job,
    JobRemoval,
    JobStatus,
    RedisSpec,
    Rule,
    RuleRemoval,
    RunnerKind,
    RunnerSpec,
    ShellSpec,
)

__all__ = [
    "FRAME_HEADER_BYTES",
    "MAX_FRAME_BYTES",
    "CodecError",
    "Scan",
    "ScanProblem",
    "decode_payload",
    "encode",
    "encode_job",
    "encode_job_fields",
    "encode_payload",
    "scan",
]

#: The largest payload a frame may declare.  No writer produces more (the encoder
#: refuses), so a larger declared length can only be damage: "impossible length".
MAX_FRAME_BYTES: Final = 1 << 20

#: Size of the length prefix in front of every payload.
FRAME_HEADER_BYTES: Final = 4

TYPE_JOB: Final = 0
TYPE_RULE: Final = 1
TYPE_JOB_REMOVAL: Final = 2
TYPE_RULE_REMOVAL: Final = 3

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")
_FRAME_HEAD = struct.Struct(">IBH")  # frame length, type byte, length of the first string

_STATUS_BY_BYTE: Final = tuple(JobStatus)  # index = status byte
_VALID_STATUS: Final = frozenset(JobStatus)
_KIND_BY_BYTE: Final = tuple(RunnerKind)


class CodecError(ValueError):
    """An entry cannot be encoded, or bytes are not a valid payload; says what and where."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _preview(text: str) -> str:
    """A short printable form of a possibly huge string, for error messages."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


# --------------------------------------------------------------------------- encoding

_job_structs: dict[int, Callable[..., bytes]] = {}
_job_unpackers: dict[int, Callable[[bytes, int], tuple[Any, ...]]] = {}


def _job_unpacker(id_len: int) -> Callable[[bytes, int], tuple[Any, ...]]:
    """An unpacker reading a whole job frame with an ``id_len``-byte id at once."""
    unpack = _job_unpackers.get(id_len)
    if unpack is None:
        unpack = struct.Struct(f">IBH{id_len}sqB").unpack_from
        if len(_job_unpackers) < 1024:
            _job_unpackers[id_len] = unpack
    return unpack


def _job_packer(id_len: int) -> Callable[..., bytes]:
    """A packer writing a whole job frame (header, id, ns, status) in one allocation."""
    packer = _job_structs.get(id_len)
    if packer is None:
        packer = struct.Struct(f">IBH{id_len}sqB").pack
        if len(_job_structs) < 1024:
            _job_structs[id_len] = packer
    return packer


def encode_job(job: Job) -> bytes:
    """The full frame (length prefix included) for a job: the hot path of every SET."""
    try:
        raw = job.id.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CodecError(
            f"job id {_preview(job.id)} cannot be encoded as UTF-8: {exc.reason}"
        ) from None
    n = len(raw)
    status = job.status
    if n <= MAX_STRING_BYTES and status in _VALID_STATUS:
        try:
            return _job_packer(n)(n + 12, TYPE_JOB, n, raw, job.execution_ns, status)
        except struct.error:
            pass
    raise _job_error(job, n)


def encode_job_fields(job_id: str, execution_ns: int, status: int) -> bytes:
    """The frame for a job given as plain values (compaction writes a million of these).

    The values come from the job table, so they are known to be valid.
    """
    raw = job_id.encode("utf-8")
    n = len(raw)
    return _job_packer(n)(n + 12, TYPE_JOB, n, raw, execution_ns, status)


def _job_error(job: Job, id_bytes: int) -> CodecError:
    if id_bytes > MAX_STRING_BYTES:
        return CodecError(
            f"job id {_preview(job.id)} is {id_bytes} bytes in UTF-8, "
            f"over the logfile limit of {MAX_STRING_BYTES}"
        )
    if job.status not in _VALID_STATUS:
        return CodecError(f"job {_preview(job.id)}: status {job.status!r} is not a JobStatus")
    return CodecError(
        f"job {_preview(job.id)}: execution time {job.execution_ns!r} "
        "is not an integer in the signed 64-bit range"
    )


def _string(value: str, what: str) -> bytes:
    """``u16`` length + UTF-8 bytes, or CodecError naming ``what``.

    The value itself is left out of the message: it may be a DSN or URL holding
    credentials, and encoding errors end up in logs.
    """
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CodecError(
            f"{what} cannot be encoded as UTF-8: {exc.reason} at character {exc.start}"
        ) from None
    if len(raw) > MAX_STRING_BYTES:
        raise CodecError(
            f"{what} is {len(raw)} bytes in UTF-8, over the logfile limit of {MAX_STRING_BYTES}"
        )
    return _U16.pack(len(raw)) + raw


def _string_list(values: tuple[str, ...], what: str) -> list[bytes]:
    if len(values) > 0xFFFF:
        raise CodecError(f"{what}: {len(values)} items, over the logfile limit of 65535")
    out = [_U16.pack(len(values))]
    out += [_string(v, f"{what} #{i}") for i, v in enumerate(values)]
    return out


def _runner_fields(spec: RunnerSpec, where: str) -> list[bytes]:
    match spec:
        case ShellSpec(command=command):
            return [b"\x00", _string(command, f"{where} shell command")]
        case AmqpSpec(dsn=dsn, exchange=exchange, routing_key=routing_key):
            return [
                b"\x01",
                _string(dsn, f"{where} amqp dsn"),
                _string(exchange, f"{where} amqp exchange"),
                _string(routing_key, f"{where} amqp routing key"),
            ]
        case DirectSpec(executable=executable, arguments=arguments):
            return [
                b"\x02",
                _string(executable, f"{where} direct executable"),
                *_string_list(arguments, f"{where} direct argument"),
            ]
        case AwfSpec(workflow=workflow, inputs=inputs):
            return [
                b"\x03",
                _string(workflow, f"{where} awf workflow"),
                *_string_list(inputs, f"{where} awf input"),
            ]
        case HttpSpec(method=method, url=url):
            return [
                b"\x04",
                _string(method, f"{where} http method"),
                _string(url, f"{where} http url"),
            ]
        case RedisSpec(url=url, command=command, key=key):
            return [
                b"\x05",
                _string(url, f"{where} redis url"),
                _string(command, f"{where} redis command"),
                _string(key, f"{where} redis key"),
            ]
    raise CodecError(f"{where}: unknown runner spec type {type(spec).__name__}")


def encode_payload(entry: Entry) -> bytes:
    """The payload of ``entry`` (type byte first), without the length prefix."""
    match entry:
        case Job():
            return encode_job(entry)[FRAME_HEADER_BYTES:]
        case Rule(id=rule_id, pattern=pattern, runner=runner):
            where = f"rule {_preview(rule_id)}"
            parts = [
                b"\x01",
                _string(rule_id, f"rule id {_preview(rule_id)}"),
                _string(pattern, f"{where} pattern"),
                *_runner_fields(runner, where),
            ]
            payload = b"".join(parts)
        case JobRemoval(id=job_id):
            payload = b"\x02" + _string(job_id, f"removed job id {_preview(job_id)}")
        case RuleRemoval(id=rule_id):
            payload = b"\x03" + _string(rule_id, f"removed rule id {_preview(rule_id)}")
        case _:
            raise CodecError(f"not a logfile entry: {type(entry).__name__}")
    if len(payload) > MAX_FRAME_BYTES:
        raise CodecError(
            f"{type(entry).__name__} {_preview(entry.id)} encodes to {len(payload)} bytes, "
            f"over the logfile frame limit of {MAX_FRAME_BYTES}"
        )
    return payload


def encode(entry: Entry) -> bytes:
    """The full frame for ``entry``: ``u32`` BE payload length, then the payload.

    Raises ``CodecError`` (nothing is produced) when a string is over 65535 UTF-8
    bytes or not encodable, a time is outside the ``i64`` range, a list has more than
    65535 items, or the frame would exceed ``MAX_FRAME_BYTES``.
    """
    if entry.__class__ is Job:
        return encode_job(entry)
    payload = encode_payload(entry)
    return _U32.pack(len(payload)) + payload


# --------------------------------------------------------------------------- decoding


class _Reader:
    """A cursor over one payload; every failure names the field and payload offset."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _need(self, count: int, what: str) -> int:
        start = self.pos
        left = len(self.data) - start
        if count > left:
            raise CodecError(
                f"{what} needs {count} bytes at payload offset {start} but only {left} remain"
            )
        self.pos = start + count
        return start

    def u8(self, what: str) -> int:
        return self.data[self._need(1, what)]

    def u16(self, what: str) -> int:
        value: int = _U16.unpack_from(self.data, self._need(2, what))[0]
        return value

    def i64(self, what: str) -> int:
        value: int = _I64.unpack_from(self.data, self._need(8, what))[0]
        return value

    def string(self, what: str) -> str:
        length = self.u16(f"length of {what}")
        start = self._need(length, what)
        try:
            return self.data[start : start + length].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CodecError(
                f"{what} is not valid UTF-8 ({exc.reason} at payload offset {start + exc.start})"
            ) from None

    def strings(self, what: str) -> tuple[str, ...]:
        count = self.u16(f"count of {what}s")
        return tuple(self.string(f"{what} #{i}") for i in range(count))

    def finish(self, what: str) -> None:
        extra = len(self.data) - self.pos
        if extra:
            raise CodecError(
                f"{extra} trailing bytes after the {what} (payload offset {self.pos})"
            )


def _read_runner(r: _Reader) -> RunnerSpec:
    kind = r.u8("runner kind")
    if kind >= len(_KIND_BY_BYTE):
        raise CodecError(f"unknown runner kind {kind} at payload offset {r.pos - 1}")
    match _KIND_BY_BYTE[kind]:
        case RunnerKind.SHELL:
            return ShellSpec(r.string("shell command"))
        case RunnerKind.AMQP:
            return AmqpSpec(
                r.string("amqp dsn"), r.string("amqp exchange"), r.string("amqp routing key")
            )
        case RunnerKind.DIRECT:
            return DirectSpec(r.string("direct executable"), r.strings("direct argument"))
        case RunnerKind.AWF:
            return AwfSpec(r.string("awf workflow"), r.strings("awf input"))
        case RunnerKind.HTTP:
            return HttpSpec(r.string("http method"), r.string("http url"))
        case RunnerKind.REDIS:
            return RedisSpec(
                r.string("redis url"), r.string("redis command"), r.string("redis key")
            )
    raise AssertionError(kind)  # pragma: no cover - every RunnerKind is handled above


def decode_payload(payload: bytes) -> Entry:
    """Decode one payload (type byte first, no length prefix).

    Raises only ``CodecError`` whose reason says what is wrong and at which payload
    offset: empty payload, unknown type byte or runner kind, bad status byte, a string
    or count running past the end, invalid UTF-8, or bytes left over.
    """
    if not payload:
        raise CodecError("empty payload (no entry type byte)")
    r = _Reader(bytes(payload))
    entry_type = r.u8("entry type")
    entry: Entry
    if entry_type == TYPE_JOB:
        job_id = r.string("job id")
        ns = r.i64("job execution time")
        status_byte = r.u8("job status")
        if status_byte >= len(_STATUS_BY_BYTE):
            raise CodecError(
                f"bad job status byte {status_byte} at payload offset {r.pos - 1} "
                "(expected 0 planned, 1 triggered, 2 executed or 3 failed)"
            )
        entry = Job(job_id, ns, _STATUS_BY_BYTE[status_byte])
        r.finish("job entry")
    elif entry_type == TYPE_RULE:
        rule_id = r.string("rule id")
        pattern = r.string("rule pattern")
        entry = Rule(rule_id, pattern, _read_runner(r))
        r.finish("rule entry")
    elif entry_type == TYPE_JOB_REMOVAL:
        entry = JobRemoval(r.string("removed job id"))
        r.finish("job removal entry")
    elif entry_type == TYPE_RULE_REMOVAL:
        entry = RuleRemoval(r.string("removed rule id"))
        r.finish("rule removal entry")
    else:
        raise CodecError(
            f"unknown entry type byte {entry_type} (expected 0 job, 1 rule, "
            "2 job removal or 3 rule removal)"
        )
    return entry


# --------------------------------------------------------------------------- scanning


def _job_slot_setters() -> tuple[Callable[[Job, object], None], ...]:
    """Setters for ``Job``'s three slots, the cheapest way to fill one during replay.

    ``Job`` is a frozen slotted dataclass whose ``__init__`` goes through
    ``object.__setattr__`` three times (about 0.8 µs here).  Filling the slots through
    their member descriptors gives an identical object (equal, same hash, still
    frozen) in about a third of that.  If ``Job``'s layout changes this fails at
    import with a message, rather than building half-filled jobs.
    """
    names = tuple(f.name for f in fields(Job))
    slots: Any = getattr(Job, "__slots__", ())
    descriptors = [vars(Job).get(name) for name in names]
    if (
        names != ("id", "execution_ns", "status")
        or tuple(slots) != names
        or not all(isinstance(d, types.MemberDescriptorType) for d in descriptors)
    ):  # pragma: no cover - layout guard
        raise ImportError(
            "ztick_tw.store.codec: the replay fast path expects Job to be a slotted "
            "dataclass with exactly (id, execution_ns, status); update Scan.__iter__"
        )
    return tuple(d.__set__ for d in descriptors)  # type: ignore[union-attr]


_SET_JOB_ID, _SET_JOB_NS, _SET_JOB_STATUS = _job_slot_setters()


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
    """

    __slots__ = ("_data", "_start", "count", "good_end", "problem")

    def __init__(self, data: bytes, start: int = 0) -> None:
        if not 0 <= start <= len(data):
            raise ValueError(f"scan start {start} outside data of {len(data)} bytes")
        self._data = data
        self._start = start
        self.good_end = start
        self.count = 0
        self.problem: ScanProblem | None = None

    def __iter__(self) -> Iterator[Entry]:
        data = self._data
        n = len(data)
        pos = self._start
        count = 0
        head = _FRAME_HEAD.unpack_from
        statuses = _STATUS_BY_BYTE
        new = object.__new__
        set_id, set_ns, set_status = _SET_JOB_ID, _SET_JOB_NS, _SET_JOB_STATUS
        # Fast path: job frames whose id has the same byte length as the previous
        # one (the usual case) are unpacked with one precompiled struct.  Anything
        # else (another id length, other entry types, bad bytes, the end of the data)
        # falls through to the header check and then to the careful path, which
        # re-examines the frame and says exactly what is wrong.
        unpack_job: Callable[[bytes, int], tuple[Any, ...]] | None = None
        job_id_len = -1
        job_frame_size = 0
        try:
            while True:
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
                        unpack_job = _job_unpacker(id_len)
                        job_id_len = id_len
                        job_frame_size = id_len + 16
                        continue
                elif pos == n:
                    return
                step = self._careful(pos)
                if step is None:
                    return
                entry, pos = step
                count += 1
                yield entry
        finally:
            self.good_end = pos
            self.count = count

    def _careful(self, pos: int) -> tuple[Entry, int] | None:
        """Decode the frame at ``pos``; on failure set ``problem`` and return None."""
        data = self._data
        n = len(data)
        left = n - pos
        if left < FRAME_HEADER_BYTES:
            self.problem = ScanProblem(
                "torn", pos, n, f"incomplete length header ({left} of 4 bytes)"
            )
            return None
        length: int = _U32.unpack_from(data, pos)[0]
        if length == 0 or length > MAX_FRAME_BYTES:
            if data.count(0, pos) == left:
                self.problem = ScanProblem(
                    "torn", pos, n, f"zero-filled tail of {left} bytes (crash while growing)"
                )
            else:
                self.problem = ScanProblem(
                    "corrupt",
                    pos,
                    n,
                    f"impossible frame length {length} (must be 1..{MAX_FRAME_BYTES})",
                )
            return None
        end = pos + FRAME_HEADER_BYTES + length
        if end > n:
            shortfall = f"frame declares {length} payload bytes but only {left - 4} follow"
            resync = _resync_point(data, pos)
            if resync is None:
                self.problem = ScanProblem("torn", pos, n, shortfall)
            else:
                at, frames = resync
                self.problem = ScanProblem(
                    "corrupt",
                    pos,
                    n,
                    f"{shortfall}, yet {frames} whole frame{'s' if frames > 1 else ''} "
                    f"from byte offset {at} run to the end of the data: a damaged length, "
                    "not a torn last write",
                )
            return None
        try:
            entry = decode_payload(data[pos + FRAME_HEADER_BYTES : end])
        except CodecError as exc:
            self.problem = ScanProblem("corrupt", pos, n, f"{length}-byte frame: {exc.reason}")
            return None
        return entry, end


#: The smallest frame a writer produces: header, type byte, an empty id (removals).
_MIN_FRAME_BYTES: Final = FRAME_HEADER_BYTES + 3

#: Where a frame could start: a big-endian length from 3 to 0x10FFFF (so its first
#: byte is 0), then a type byte of 0 to 3.  A lookahead, so matches may overlap.
_HEADER_LIKE: Final = re.compile(
    rb"(?=\x00(?:[\x01-\x10][\x00-\xff]{2}|\x00[\x01-\xff][\x00-\xff]|\x00\x00[\x03-\xff])"
    rb"[\x00-\x03])"
)


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
    if length < 3 or length > MAX_FRAME_BYTES or end > n or entry_type > TYPE_RULE_REMOVAL:
        return -1
    if entry_type == TYPE_JOB:
        if length != first_len + 12:
            return -1
    elif entry_type == TYPE_RULE:
        if length < first_len + 8:  # type, id, pattern, runner kind, one string
            return -1
    elif length != first_len + 3:
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


def scan(data: bytes, start: int = 0) -> Scan:
    """A ``Scan`` of ``data`` from byte ``start`` (see ``Scan``)."""
    return Scan(data, start)
