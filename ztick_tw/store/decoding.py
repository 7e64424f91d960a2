"""Decoding one frame's payload into an entry (the layouts are in ``frame``).

Every failure is a ``CodecError`` saying which field is wrong and at which payload
offset.  This is the careful path: a scan decodes the common frames of a big log in
``fastpath`` and brings everything else here.
"""

from __future__ import annotations

from ztick_tw.model import (
    I64_MIN,
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
    RunnerKind,
    RunnerSpec,
    RunState,
    ScheduleRemoval,
    ScheduleSet,
    ShellSpec,
)
from ztick_tw.store.frame import (
    _I64,
    _KIND_BY_BYTE,
    _PAUSE_TAIL,
    _POLICY_TAIL,
    _STATUS_BY_BYTE,
    _U16,
    _U32,
    FIRST_UNKNOWN_TYPE,
    NONE_U32,
    RUN_STATE_TAIL,
    TYPE_JOB,
    TYPE_JOB_REMOVAL,
    TYPE_PAUSE,
    TYPE_RULE,
    TYPE_RULE_REMOVAL,
    TYPE_RUN_STATE,
    TYPE_SCHEDULE_REMOVAL,
    TYPE_SCHEDULE_SET,
    CodecError,
    UnknownEntryType,
)

__all__ = ["decode_payload"]


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
        runs, occurrence, attempt, due = RUN_STATE_TAIL.unpack_from(
            r.data, r.fixed(RUN_STATE_TAIL.size, "run state (runs, occurrence, attempt, due)")
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
