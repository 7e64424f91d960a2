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
16   schedule set string job id, string schedule text, string options, ``i64`` start ns
17   schedule rm  string job id
18   run state    string job id, ``u32`` runs, ``i64`` occurrence ns, ``u16`` attempt,
                  ``i64`` due ns
19   pause        string job id, ``u8`` 1 paused / 0 resumed, ``i64`` since ns
20   rule policy  string rule id, ``i64`` timeout ns, ``u32`` retries, ``i64`` backoff min
                  ns, ``i64`` backoff max ns
==== ============ ==================================================================

Types 16-20 are ztick-tw's extension (SPEC §8-9, ``docs/logfile.md``).  In them "none"
is ``I64_MIN`` for a time or duration and ``0xFFFFFFFF`` for the retry count (a policy
key left to the ``[runners]`` default, an ended schedule's occurrence).  A type from 21
up is a frame of a newer ztick-tw: ``Scan`` skips it and counts it (``skipped``), as
ztick skips the types it does not know, so a newer log still loads.  Types 4-15 stay
damage (``corrupt``), as does any malformed frame of a known type.

Strings are a ``u16`` big-endian byte count followed by that many UTF-8 bytes.  Runner
fields: 0 shell (command); 1 amqp (dsn, exchange, routing_key); 2 direct (executable,
``u16`` count, strings); 3 awf (workflow, ``u16`` count, ``key=value`` strings); 4 http
(method, url); 5 redis (url, command, key).

Everything here is pure (no I/O).  Replay speed matters (a million job frames must
load in well under a second), so the job frame has a dedicated fast path both ways, and
the run state and schedule frames (one of each per scheduled job) one for decoding.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, Literal

from ztick_tw.model import (
    I64_MIN,
    MAX_STRING_BYTES,
    AmqpSpec,
    AwfSpec,
    DirectSpec,
    Entry,
    HttpSpec,
    Job,
    JobRemoval,
    JobStatus,
    Pause,
    Policy,
    RedisSpec,
    Rule,
    RulePolicy,
    RuleRemoval,
    RunnerKind,
    RunnerSpec,
    RunState,
    ScheduleRemoval,
    ScheduleSet,
    ShellSpec,
)
from ztick_tw.store.fastpath import (
    RUN_STATE_TAIL as _RUN_STATE_TAIL,
)
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

__all__ = [
    "FRAME_HEADER_BYTES",
    "MAX_FRAME_BYTES",
    "CodecError",
    "Scan",
    "ScanProblem",
    "UnknownEntryType",
    "decode_payload",
    "encode",
    "encode_job",
    "encode_job_fields",
    "encode_payload",
    "entry_id",
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
TYPE_SCHEDULE_SET: Final = 16
TYPE_SCHEDULE_REMOVAL: Final = 17
TYPE_RUN_STATE: Final = 18
TYPE_PAUSE: Final = 19
TYPE_RULE_POLICY: Final = 20
#: The first entry type this version does not know: frames of this type and above are
#: skipped by a scan (a newer ztick-tw wrote them).  Types 4-15 are damage.
FIRST_UNKNOWN_TYPE: Final = 21
#: "No value" for a ``u32`` count (a policy's retries left to the default).
NONE_U32: Final = 0xFFFFFFFF

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_POLICY_TAIL = struct.Struct(">qIqq")  # timeout ns, retries, backoff min ns, backoff max ns
_PAUSE_TAIL = struct.Struct(">Bq")  # paused flag, since ns
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


class UnknownEntryType(CodecError):
    """The payload's entry type is 21 or more: a newer version's frame (``Scan`` skips it)."""

    def __init__(self, entry_type: int) -> None:
        super().__init__(
            f"unknown entry type byte {entry_type} (a frame type of a newer ztick-tw; "
            f"this version knows 0-3 and 16-{FIRST_UNKNOWN_TYPE - 1})"
        )
        self.entry_type = entry_type


def _preview(text: str) -> str:
    """A short printable form of a possibly huge string, for error messages."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


# --------------------------------------------------------------------------- encoding

_job_structs: dict[int, Callable[..., bytes]] = {}


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
        case ScheduleSet() | ScheduleRemoval() | RunState() | Pause() | RulePolicy():
            payload = _extension_payload(entry)
        case _:
            raise CodecError(f"not a logfile entry: {type(entry).__name__}")
    if len(payload) > MAX_FRAME_BYTES:
        raise CodecError(
            f"{type(entry).__name__} {_preview(entry_id(entry))} encodes to {len(payload)} "
            f"bytes, over the logfile frame limit of {MAX_FRAME_BYTES}"
        )
    return payload


def entry_id(entry: Entry) -> str:
    """The job or rule id an entry is about (``id``, ``job_id`` or ``rule_id``)."""
    match entry:
        case Job(id=ident) | Rule(id=ident) | JobRemoval(id=ident) | RuleRemoval(id=ident):
            return ident
        case ScheduleSet(job_id=ident) | ScheduleRemoval(job_id=ident):
            return ident
        case RunState(job_id=ident) | Pause(job_id=ident):
            return ident
        case RulePolicy(rule_id=ident):
            return ident
    raise TypeError(f"not a logfile entry: {entry!r}")


def _int(packer: struct.Struct, value: object, what: str, expected: str) -> bytes:
    """``value`` packed alone, or CodecError saying it is not ``expected``."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return packer.pack(value)
        except struct.error:
            pass
    raise CodecError(f"{what} {value!r} is not {expected}")


def _time(value: int, what: str) -> bytes:
    return _int(_I64, value, what, "an integer in the signed 64-bit range")


def _optional_time(value: int | None, what: str) -> bytes:
    """A duration that may be unset: ``None`` is written as ``I64_MIN``."""
    if value is None:
        return _I64.pack(I64_MIN)
    if value == I64_MIN:
        raise CodecError(f"{what} {I64_MIN} is the logfile's 'unset' marker, not a value")
    return _time(value, what)


def _extension_payload(entry: Entry) -> bytes:
    """The payload of a type 16-20 entry (SPEC §8-9; layouts in the module docstring)."""
    match entry:
        case ScheduleSet(job_id=job_id, text=text, options=options, start_ns=start_ns):
            where = f"schedule of job {_preview(job_id)}"
            parts = [
                b"\x10",
                _string(job_id, f"scheduled job id {_preview(job_id)}"),
                _string(text, f"{where}: text"),
                _string(options, f"{where}: options"),
                _time(start_ns, f"{where}: start time"),
            ]
        case ScheduleRemoval(job_id=job_id):
            parts = [b"\x11", _string(job_id, f"unscheduled job id {_preview(job_id)}")]
        case RunState(job_id=job_id, runs=runs, occurrence_ns=occ, attempt=attempt, due_ns=due):
            where = f"run state of job {_preview(job_id)}"
            parts = [
                b"\x12",
                _string(job_id, f"{where}: job id"),
                _int(_U32, runs, f"{where}: run count", "a count from 0 to 4294967295"),
                _time(occ, f"{where}: occurrence time"),
                _int(_U16, attempt, f"{where}: attempt", "a number from 0 to 65535"),
                _time(due, f"{where}: due time"),
            ]
        case Pause(job_id=job_id, paused=paused, since_ns=since_ns):
            where = f"pause of job {_preview(job_id)}"
            if not isinstance(paused, bool):
                raise CodecError(f"{where}: paused {paused!r} is not a bool")
            parts = [
                b"\x13",
                _string(job_id, f"{where}: job id"),
                b"\x01" if paused else b"\x00",
                _time(since_ns, f"{where}: time"),
            ]
        case RulePolicy(rule_id=rule_id, policy=policy):
            where = f"policy of rule {_preview(rule_id)}"
            if not isinstance(policy, Policy):
                raise CodecError(f"{where}: {policy!r} is not a Policy")
            retries = policy.retries
            if retries == NONE_U32:
                raise CodecError(f"{where}: retries {NONE_U32} is the logfile's 'unset' marker")
            parts = [
                b"\x14",
                _string(rule_id, f"{where}: rule id"),
                _optional_time(policy.timeout_ns, f"{where}: timeout"),
                _U32.pack(NONE_U32)
                if retries is None
                else _int(_U32, retries, f"{where}: retries", "a count from 0 to 4294967294"),
                _optional_time(policy.backoff_min_ns, f"{where}: backoff minimum"),
                _optional_time(policy.backoff_max_ns, f"{where}: backoff maximum"),
            ]
        case _:  # pragma: no cover - encode_payload only passes extension entries
            raise CodecError(f"not an extension entry: {type(entry).__name__}")
    return b"".join(parts)


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

    def fixed(self, count: int, what: str) -> int:
        """Take ``count`` bytes of fixed-size fields; their offset."""
        return self._need(count, what)

    def u8(self, what: str) -> int:
        return self.data[self._need(1, what)]

    def u16(self, what: str) -> int:
        value: int = _U16.unpack_from(self.data, self._need(2, what))[0]
        return value

    def u32(self, what: str) -> int:
        value: int = _U32.unpack_from(self.data, self._need(4, what))[0]
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
    elif TYPE_SCHEDULE_SET <= entry_type < FIRST_UNKNOWN_TYPE:
        entry = _read_extension(entry_type, r)
    elif entry_type >= FIRST_UNKNOWN_TYPE:
        raise UnknownEntryType(entry_type)
    else:
        raise CodecError(
            f"unknown entry type byte {entry_type} (expected 0 job, 1 rule, "
            "2 job removal, 3 rule removal or 16-20 ztick-tw extensions)"
        )
    return entry


def _unset(value: int, marker: int) -> int | None:
    return None if value == marker else value


def _read_extension(entry_type: int, r: _Reader) -> Entry:
    """Decode the rest of a type 16-20 payload (``r`` is just past the type byte)."""
    entry: Entry
    if entry_type == TYPE_SCHEDULE_SET:
        entry = ScheduleSet(
            r.string("scheduled job id"),
            r.string("schedule text"),
            r.string("schedule options"),
            r.i64("schedule start time"),
        )
        r.finish("schedule entry")
    elif entry_type == TYPE_SCHEDULE_REMOVAL:
        entry = ScheduleRemoval(r.string("unscheduled job id"))
        r.finish("schedule removal entry")
    elif entry_type == TYPE_RUN_STATE:
        job_id = r.string("run state job id")
        runs, occurrence, attempt, due = _RUN_STATE_TAIL.unpack_from(
            r.data, r.fixed(_RUN_STATE_TAIL.size, "run state (runs, occurrence, attempt, due)")
        )
        entry = RunState(job_id, runs, occurrence, attempt, due)
        r.finish("run state entry")
    elif entry_type == TYPE_PAUSE:
        job_id = r.string("paused job id")
        flag, since = _PAUSE_TAIL.unpack_from(
            r.data, r.fixed(_PAUSE_TAIL.size, "pause flag and time")
        )
        if flag > 1:
            raise CodecError(
                f"bad pause flag {flag} at payload offset {r.pos - 9} "
                "(expected 0 resumed or 1 paused)"
            )
        entry = Pause(job_id, flag == 1, since)
        r.finish("pause entry")
    else:
        rule_id = r.string("policy rule id")
        timeout, retries, low, high = _POLICY_TAIL.unpack_from(
            r.data, r.fixed(_POLICY_TAIL.size, "policy (timeout, retries, backoff)")
        )
        policy = Policy(
            _unset(timeout, I64_MIN),
            _unset(retries, NONE_U32),
            _unset(low, I64_MIN),
            _unset(high, I64_MIN),
        )
        entry = RulePolicy(rule_id, policy)
        r.finish("rule policy entry")
    return entry


# --------------------------------------------------------------------------- scanning


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
    TYPE_RUN_STATE: 3 + _RUN_STATE_TAIL.size,
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


def scan(data: bytes, start: int = 0, scheduled: ScheduledSink | None = None) -> Scan:
    """A ``Scan`` of ``data`` from byte ``start`` (see ``Scan``)."""
    return Scan(data, start, scheduled)


def _no_pair(data: bytes, pos: int) -> tuple[Any, ...]:  # pragma: no cover - never called
    raise AssertionError("no pair layout yet")
