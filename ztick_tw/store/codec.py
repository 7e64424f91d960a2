"""Encoding entries into logfile frames (SPEC §5; the format is described in ``frame``).

Everything here is pure (no I/O).  Every SET appends a job frame, and a compaction
writes a million of them, so the job frame has a dedicated fast path (``encode_job``,
``encode_job_fields``); the other entries go through ``encode_payload``.  A string
over 65535 UTF-8 bytes, a time outside ``i64`` or a frame over ``MAX_FRAME_BYTES`` is a
``CodecError``, and nothing is produced.

The format's constants and errors are in ``frame``, decoding in ``decoding``, scanning a
whole buffer in ``scanning``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

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
    Pause,
    Policy,
    RedisSpec,
    Rule,
    RulePolicy,
    RuleRemoval,
    RunnerSpec,
    RunState,
    ScheduleRemoval,
    ScheduleSet,
    ShellSpec,
)
from ztick_tw.store.frame import (
    _I64,
    _U16,
    _U32,
    _VALID_STATUS,
    FRAME_HEADER_BYTES,
    MAX_FRAME_BYTES,
    NONE_U32,
    TYPE_JOB,
    CodecError,
    _preview,
)

__all__ = [
    "encode",
    "encode_job",
    "encode_job_fields",
    "encode_payload",
    "entry_id",
]


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
