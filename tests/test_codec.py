"""The logfile codec against SPEC §5, byte for byte."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Sequence
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ztick_tw.model import (
    I64_MAX,
    I64_MIN,
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
    RunnerSpec,
    RunState,
    ScheduleRemoval,
    ScheduleSet,
    ShellSpec,
)
from ztick_tw.store.codec import encode, encode_job, encode_payload, entry_id
from ztick_tw.store.decoding import decode_payload
from ztick_tw.store.frame import MAX_FRAME_BYTES, NONE_U32, CodecError, UnknownEntryType
from ztick_tw.store.scanning import scan


def hx(text: str) -> bytes:
    """Bytes from spaced hex, so vectors below read like the SPEC."""
    return bytes.fromhex(text)


SPEC_EXAMPLE = hx("00 00 00 10 00 00 04 74 6f 74 6f 16 47 bb 5c ee e1 50 00 00")

# Frames written by hand from the SPEC §5 rules (length, type, u16-prefixed strings...).
HAND_FRAMES: list[tuple[Entry, bytes]] = [
    (Job("toto", 1605457800000000000, JobStatus.PLANNED), SPEC_EXAMPLE),
    # ztick's own encoder test vector: "tatat", executed.
    (
        Job("tatat", 1605457800000000000, JobStatus.EXECUTED),
        hx("00 00 00 11 00 00 05 74 61 74 61 74 16 47 bb 5c ee e1 50 00 02"),
    ),
    # UTF-8 id, negative time, failed.
    (
        Job("é", -1, JobStatus.FAILED),
        hx("00 00 00 0e 00 00 02 c3 a9 ff ff ff ff ff ff ff ff 03"),
    ),
    (
        Job("t", 7, JobStatus.TRIGGERED),
        hx("00 00 00 0d 00 00 01 74 00 00 00 00 00 00 00 07 01"),
    ),
    # shell: rule "r", pattern "p.", command "echo hi"
    (
        Rule("r", "p.", ShellSpec("echo hi")),
        hx("00 00 00 12 01 00 01 72 00 02 70 2e 00 00 07 65 63 68 6f 20 68 69"),
    ),
    # amqp: rule "a", pattern "n.", dsn "amqp://h", exchange "", routing key "k"
    (
        Rule("a", "n.", AmqpSpec("amqp://h", "", "k")),
        hx("00 00 00 18 01 00 01 61 00 02 6e 2e 01 00 08 61 6d 71 70 3a 2f 2f 68 00 00 00 01 6b"),
    ),
    # ztick's own amqp vector: rule "ta", pattern "tot", dsn "titit", "", "a"
    (
        Rule("ta", "tot", AmqpSpec("titit", "", "a")),
        hx("00 00 00 17 01 00 02 74 61 00 03 74 6f 74 01 00 05 74 69 74 69 74 00 00 00 01 61"),
    ),
    # direct: rule "d", empty pattern, /bin/echo with args "a", "bc"
    (
        Rule("d", "", DirectSpec("/bin/echo", ("a", "bc"))),
        hx(
            "00 00 00 1b 01 00 01 64 00 00 02 00 09 2f 62 69 6e 2f 65 63 68 6f"
            " 00 02 00 01 61 00 02 62 63"
        ),
    ),
    # direct with no arguments: count 0
    (
        Rule("d", "x", DirectSpec("e")),
        hx("00 00 00 0d 01 00 01 64 00 01 78 02 00 01 65 00 00"),
    ),
    # awf: rule "w", pattern "x", workflow "wf", inputs ("k=v",)
    (
        Rule("w", "x", AwfSpec("wf", ("k=v",))),
        hx("00 00 00 13 01 00 01 77 00 01 78 03 00 02 77 66 00 01 00 03 6b 3d 76"),
    ),
    # http: rule "h", pattern "y", GET http://z
    (
        Rule("h", "y", HttpSpec("GET", "http://z")),
        hx("00 00 00 17 01 00 01 68 00 01 79 04 00 03 47 45 54 00 08 68 74 74 70 3a 2f 2f 7a"),
    ),
    # redis: rule "q", pattern "z", redis://r RPUSH k
    (
        Rule("q", "z", RedisSpec("redis://r", "RPUSH", "k")),
        hx(
            "00 00 00 1d 01 00 01 71 00 01 7a 05 00 09 72 65 64 69 73 3a 2f 2f 72"
            " 00 05 52 50 55 53 48 00 01 6b"
        ),
    ),
    (JobRemoval("toto"), hx("00 00 00 07 02 00 04 74 6f 74 6f")),
    (RuleRemoval("r"), hx("00 00 00 04 03 00 01 72")),
    # The ztick-tw extension (docs/logfile.md).  16 schedule set: job "j", text
    # "daily", options "tz=UTC", start 1605457800000000000.
    (
        ScheduleSet("j", "daily", "tz=UTC", 1605457800000000000),
        hx(
            "00 00 00 1b 10 00 01 6a 00 05 64 61 69 6c 79 00 06 74 7a 3d 55 54 43"
            " 16 47 bb 5c ee e1 50 00"
        ),
    ),
    # 17 schedule removal: job "j".
    (ScheduleRemoval("j"), hx("00 00 00 04 11 00 01 6a")),
    # 18 run state: job "j", 2 runs, occurrence 7, attempt 3, due 5.
    (
        RunState("j", 2, 7, 3, 5),
        hx(
            "00 00 00 1a 12 00 01 6a 00 00 00 02 00 00 00 00 00 00 00 07 00 03"
            " 00 00 00 00 00 00 00 05"
        ),
    ),
    # ... an ended schedule: occurrence I64_MIN ("none"), the first attempt, due -1.
    (
        RunState("j", 4294967295, I64_MIN, 1, -1),
        hx(
            "00 00 00 1a 12 00 01 6a ff ff ff ff 80 00 00 00 00 00 00 00 00 01"
            " ff ff ff ff ff ff ff ff"
        ),
    ),
    # 19 pause: job "j" paused at 9, then resumed at 10.
    (Pause("j", True, 9), hx("00 00 00 0d 13 00 01 6a 01 00 00 00 00 00 00 00 09")),
    (Pause("j", False, 10), hx("00 00 00 0d 13 00 01 6a 00 00 00 00 00 00 00 00 0a")),
    # 20 rule policy: rule "r", timeout 30 s, 3 retries, backoff 1 s .. 300 s.
    (
        RulePolicy("r", Policy(30 * 10**9, 3, 10**9, 300 * 10**9)),
        hx(
            "00 00 00 20 14 00 01 72 00 00 00 06 fc 23 ac 00 00 00 00 03"
            " 00 00 00 00 3b 9a ca 00 00 00 00 45 d9 64 b8 00"
        ),
    ),
    # ... every key left to the [runners] default: I64_MIN and 0xffffffff; 0 retries.
    (
        RulePolicy("r", Policy()),
        hx(
            "00 00 00 20 14 00 01 72 80 00 00 00 00 00 00 00 ff ff ff ff"
            " 80 00 00 00 00 00 00 00 80 00 00 00 00 00 00 00"
        ),
    ),
    (
        RulePolicy("r", Policy(retries=0)),
        hx(
            "00 00 00 20 14 00 01 72 80 00 00 00 00 00 00 00 00 00 00 00"
            " 80 00 00 00 00 00 00 00 80 00 00 00 00 00 00 00"
        ),
    ),
]


@pytest.mark.parametrize(("entry", "frame"), HAND_FRAMES, ids=lambda v: repr(v)[:40])
def test_encode_matches_hand_written_frame(entry: Entry, frame: bytes) -> None:
    """encode() produces exactly the SPEC §5 bytes for every entry type and runner kind."""
    assert encode(entry) == frame
    assert encode_payload(entry) == frame[4:]


@pytest.mark.parametrize(("entry", "frame"), HAND_FRAMES, ids=lambda v: repr(v)[:40])
def test_decode_hand_written_frame(entry: Entry, frame: bytes) -> None:
    """decode_payload() turns every hand-written payload back into the same entry."""
    assert decode_payload(frame[4:]) == entry


def test_spec_worked_example() -> None:
    """The SPEC worked example: job toto at 1605457800000000000, planned."""
    job = Job("toto", 1605457800000000000, JobStatus.PLANNED)
    assert encode_job(job) == SPEC_EXAMPLE
    entries = list(scan(SPEC_EXAMPLE))
    assert entries == [job]


def test_scan_reads_all_hand_frames_in_order() -> None:
    """A buffer of every kind of frame scans back to the same entries, ending cleanly."""
    data = b"".join(frame for _, frame in HAND_FRAMES)
    result = scan(data)
    assert list(result) == [entry for entry, _ in HAND_FRAMES]
    assert result.good_end == len(data)
    assert result.problem is None
    assert result.count == len(HAND_FRAMES)


def test_fast_path_jobs_are_real_jobs() -> None:
    """Jobs built by the replay fast path are equal, hash alike and stay frozen."""
    job = Job("job.0000001", 42, JobStatus.TRIGGERED)
    (decoded,) = list(scan(encode(job)))
    assert type(decoded) is Job
    assert decoded == job
    assert hash(decoded) == hash(job)
    assert decoded.status is JobStatus.TRIGGERED
    with pytest.raises(dataclasses.FrozenInstanceError):
        decoded.id = "other"  # type: ignore[misc]


def test_scan_switches_between_id_lengths_and_entry_types() -> None:
    """Mixed id lengths and entry kinds interleaved all decode, in order."""
    entries: list[Entry] = []
    for i in range(50):
        entries.append(Job("j" * (i % 7), i, JobStatus(i % 4)))
        if i % 5 == 0:
            entries.append(JobRemoval("j" * (i % 3)))
        if i % 11 == 0:
            entries.append(Rule(f"r{i}", "j", ShellSpec("true")))
    data = b"".join(encode(e) for e in entries)
    result = scan(data)
    assert list(result) == entries
    assert result.good_end == len(data)


def test_scan_from_start_offset() -> None:
    """scan(data, start) begins at ``start`` and reports good_end as an absolute offset."""
    first = encode(JobRemoval("a"))
    second = encode(Job("b", 1))
    result = scan(first + second, len(first))
    assert list(result) == [Job("b", 1)]
    assert result.good_end == len(first) + len(second)


def test_scan_start_outside_data() -> None:
    """A start offset past the data is a programming error, not a silent empty scan."""
    with pytest.raises(ValueError, match="outside data"):
        scan(b"abc", 4)


# --------------------------------------------------------------------- encode errors


def test_id_of_65535_bytes_round_trips() -> None:
    """The longest id the format holds (65535 UTF-8 bytes) encodes and decodes."""
    job = Job("x" * 65535, 1)
    frame = encode(job)
    assert frame[4:7] == b"\x00\xff\xff"
    assert list(scan(frame)) == [job]


def test_id_over_65535_bytes_rejected() -> None:
    """An id of 65536 UTF-8 bytes raises CodecError naming the limit."""
    with pytest.raises(CodecError, match="65536 bytes in UTF-8, over the logfile limit of 65535"):
        encode(Job("x" * 65536, 1))


def test_limit_counts_utf8_bytes_not_characters() -> None:
    """32768 two-byte characters are 65536 bytes: rejected, though only 32768 characters."""
    with pytest.raises(CodecError, match="65536 bytes"):
        encode(JobRemoval("é" * 32768))
    with pytest.raises(CodecError, match="rule 'r' pattern"):
        encode(Rule("r", "é" * 32768, ShellSpec("x")))


@pytest.mark.parametrize("ns", [I64_MAX + 1, I64_MIN - 1, 2**80])
def test_time_outside_i64_rejected(ns: int) -> None:
    """An execution time outside the signed 64-bit range raises CodecError."""
    with pytest.raises(CodecError, match="signed 64-bit range"):
        encode(Job("a", ns))


@pytest.mark.parametrize("ns", [I64_MAX, I64_MIN, 0])
def test_time_at_i64_bounds_round_trips(ns: int) -> None:
    """The extreme i64 values are valid times and survive a round trip."""
    assert decode_payload(encode(Job("a", ns))[4:]) == Job("a", ns)


def test_unencodable_string_rejected() -> None:
    """A lone surrogate cannot be UTF-8: CodecError, not UnicodeEncodeError."""
    with pytest.raises(CodecError, match="cannot be encoded as UTF-8"):
        encode(Job("a\ud800", 1))
    with pytest.raises(CodecError, match="shell command"):
        encode(Rule("r", "p", ShellSpec("\udfff")))


def test_error_messages_do_not_leak_runner_values() -> None:
    """A bad DSN is named by rule and field, never quoted: it may hold credentials."""
    dsn = "amqp://user:s3cret@host/" + "x" * 70000
    with pytest.raises(CodecError) as info:
        encode(Rule("notify", "n.", AmqpSpec(dsn, "e", "k")))
    assert "s3cret" not in str(info.value)
    assert "rule 'notify' amqp dsn is 70024 bytes" in str(info.value)
    with pytest.raises(CodecError) as info:
        encode(Rule("r", "p", RedisSpec("redis://:s3cret@h\udc80", "SET", "k")))
    assert "s3cret" not in str(info.value)
    assert "redis url cannot be encoded as UTF-8" in str(info.value)


def test_non_status_rejected() -> None:
    """A status that is not a JobStatus would write an unreadable frame: rejected."""
    with pytest.raises(CodecError, match="not a JobStatus"):
        encode(Job("a", 1, cast(Any, 7)))


def test_too_many_arguments_rejected() -> None:
    """More than 65535 direct arguments cannot be counted in a u16."""
    with pytest.raises(CodecError, match="65536 items"):
        encode(Rule("r", "p", DirectSpec("e", ("",) * 65536)))


def test_frame_over_max_rejected() -> None:
    """A rule whose frame would exceed MAX_FRAME_BYTES is refused (readers reject it)."""
    spec = AwfSpec("wf", tuple("k=" + "v" * 60000 for _ in range(20)))
    with pytest.raises(CodecError, match=f"over the logfile frame limit of {MAX_FRAME_BYTES}"):
        encode(Rule("big", "p", spec))


def test_not_an_entry_rejected() -> None:
    """Encoding something that is not an Entry raises CodecError."""
    with pytest.raises(CodecError, match="not a logfile entry"):
        encode(cast(Any, "SET a 1"))


# --------------------------------------------------------------------- decode errors

MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty", b"", "empty payload"),
    ("unknown type", b"\x04\x00\x01a", "unknown entry type byte 4"),
    ("reserved type 15", b"\x0f\x00\x01a", "unknown entry type byte 15"),
    ("id past end", hx("00 00 05 61 62 63"), "job id needs 5 bytes"),
    ("no id length", hx("00 00"), "length of job id needs 2 bytes"),
    ("short time", hx("00 00 01 61 00 00 00"), "job execution time needs 8 bytes"),
    ("no status", hx("00 00 01 61 00 00 00 00 00 00 00 01"), "job status needs 1 bytes"),
    ("bad status", hx("00 00 01 61 00 00 00 00 00 00 00 01 04"), "bad job status byte 4"),
    ("trailing", hx("00 00 01 61 00 00 00 00 00 00 00 01 00 00"), "1 trailing bytes"),
    ("bad utf8", hx("00 00 01 ff 00 00 00 00 00 00 00 01 00"), "job id is not valid UTF-8"),
    (
        "utf8 surrogate",
        hx("02 00 03 ed a0 80"),
        "removed job id is not valid UTF-8",
    ),
    ("no runner kind", hx("01 00 01 72 00 01 70"), "runner kind needs 1 bytes"),
    ("unknown runner", hx("01 00 01 72 00 01 70 06"), "unknown runner kind 6"),
    (
        "missing args",
        hx("01 00 01 72 00 01 70 02 00 01 65 00 02 00 01 61"),
        "direct argument #1",
    ),
    ("no arg count", hx("01 00 01 72 00 01 70 03 00 01 65"), "count of awf inputs"),
    ("amqp short", hx("01 00 01 72 00 01 70 01 00 01 64 00 01 65"), "amqp routing key"),
    ("removal trailing", hx("03 00 01 72 72"), "1 trailing bytes after the rule removal"),
    ("removal short", hx("02 00"), "length of removed job id"),
    ("schedule no start", hx("10 00 01 6a 00 01 64 00 00 00 00"), "schedule start time"),
    ("schedule trailing", hx("10 00 01 6a 00 00 00 00" + " 00" * 8 + " 00"), "schedule entry"),
    ("schedule bad utf8", hx("10 00 01 6a 00 01 ff 00 00" + " 00" * 8), "schedule text is not"),
    ("unschedule short", hx("11 00 02 6a"), "unscheduled job id needs 2 bytes"),
    ("run state short", hx("12 00 01 6a 00 00 00 01 00"), "run state (runs, occurrence"),
    ("run state trailing", hx("12 00 01 6a" + " 00" * 23), "1 trailing bytes after the run"),
    ("pause flag 2", hx("13 00 01 6a 02" + " 00" * 8), "bad pause flag 2 at payload offset 4"),
    ("pause short", hx("13 00 01 6a 01 00"), "pause flag and time needs 9 bytes"),
    ("policy short", hx("14 00 01 72" + " 00" * 27), "policy (timeout, retries, backoff)"),
    ("policy trailing", hx("14 00 01 72" + " 00" * 29), "after the rule policy entry"),
]


@pytest.mark.parametrize(
    ("payload", "reason"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_payload_raises_codec_error(payload: bytes, reason: str) -> None:
    """Every kind of malformed payload raises CodecError with a reason that says what."""
    with pytest.raises(CodecError) as info:
        decode_payload(payload)
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("payload", "reason"),
    [m[1:] for m in MALFORMED if m[1]],
    ids=[m[0] for m in MALFORMED if m[1]],
)
def test_malformed_frame_in_scan_is_corruption_at_its_offset(payload: bytes, reason: str) -> None:
    """A complete but undecodable frame after good ones is 'corrupt' at its first byte."""
    good = encode(Job("aaaa", 1)) + encode(Job("bbbb", 2))
    after = encode(Job("cccc", 3))
    data = good + struct.pack(">I", len(payload)) + payload + after
    result = scan(data)
    assert list(result) == [Job("aaaa", 1), Job("bbbb", 2)]
    assert result.good_end == len(good)
    assert result.problem is not None
    assert result.problem.kind == "corrupt"
    assert result.problem.offset == len(good)
    assert reason in result.problem.reason


def test_unknown_types_from_21_are_skipped_and_counted() -> None:
    """Whole frames of types 21-255 (a newer version's) are stepped over, as ztick does.

    The scan goes on past them to the frames after, ends without a problem, yields only
    the entries it knows and counts the skipped frames by type.  Before issue 10 such a
    frame stopped the scan as corrupt.
    """
    known: list[Entry] = [Job("a", 1), RunState("a", 1, 2, 1, 2), Job("b", 2)]
    frames = [encode(e) for e in known]
    newer = [
        struct.pack(">I", 1) + b"\x15",  # type 21, nothing after the type byte
        struct.pack(">I", 6) + b"\xff\x00\x00\x00\x00\x00",  # type 255, zeros
        struct.pack(">I", 40) + b"\x15" + bytes(range(39)),  # type 21 again
    ]
    data = frames[0] + newer[0] + newer[1] + frames[1] + newer[2] + frames[2]
    result = scan(data)
    assert list(result) == known
    assert (result.good_end, result.problem) == (len(data), None)
    assert result.count == 3
    assert result.skipped_types == {21: 2, 255: 1}
    assert result.skipped == 3


def test_a_type_byte_damaged_to_21_is_not_a_silent_skip() -> None:
    """Damage that makes a frame look like a newer type, with a wrong length, is corrupt.

    The damaged frame's length (one byte too long) lands the scan inside the next
    frame, which then looks torn; since whole frames run from after the skipped one
    to the end, the skipped frame is the damage, reported where it starts.  (Found by
    test_damage_in_the_middle_never_silently_drops_whole_frames.)
    """
    first, second = encode(Job("", 0)), encode(Job("", 0))
    damaged = bytearray(first + second)
    damaged[3:5] = b"\x0d\x15"  # length 13, type 21
    result = scan(bytes(damaged))
    assert list(result) == []
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("corrupt", 0)
    assert result.good_end == 0
    assert (
        "right after 1 skipped frame of unknown type from byte offset 0" in result.problem.reason
    )
    assert result.skipped_types == {}  # the skipped frame was the damage, not a newer frame


def test_a_corrupt_frame_right_after_skipped_ones_blames_them_too() -> None:
    """A frame that fails to decode right after skipped frames is reported at the first."""
    good = encode(Job("a", 1))
    newer = struct.pack(">I", 3) + b"\x16ab"
    bad = struct.pack(">I", 4) + b"\x05\x00\x01a"
    result = scan(good + newer + newer + bad + good)
    assert list(result) == [Job("a", 1)]
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("corrupt", len(good))
    assert "unknown entry type byte 5" in result.problem.reason
    assert "right after 2 skipped frames of unknown types" in result.problem.reason


def test_a_real_torn_tail_after_newer_frames_stays_torn() -> None:
    """A newer log cut by a crash: the newer frames are skipped and the tail is torn."""
    good = encode(Job("a", 1))
    newer = struct.pack(">I", 5) + b"\x16abcd"
    torn = encode(Job("b", 2))[:-5]
    result = scan(good + newer + torn)
    assert list(result) == [Job("a", 1)]
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("torn", len(good + newer))
    assert result.skipped_types == {22: 1}


@pytest.mark.parametrize("entry_type", [21, 128, 255])
def test_decode_of_an_unknown_type_says_it_is_newer(entry_type: int) -> None:
    """decode_payload of a type from 21 up raises UnknownEntryType, a CodecError."""
    with pytest.raises(UnknownEntryType) as info:
        decode_payload(bytes([entry_type]) + b"\x00\x01a")
    assert info.value.entry_type == entry_type
    assert f"unknown entry type byte {entry_type}" in info.value.reason
    assert "newer ztick-tw" in info.value.reason


def test_unknown_type_frame_cut_short_is_a_torn_tail() -> None:
    """A newer frame torn by a crash is torn like any other: it is not skipped whole."""
    good = encode(Job("a", 1))
    torn = (struct.pack(">I", 20) + b"\x16" + bytes(19))[:-4]
    result = scan(good + torn)
    assert list(result) == [Job("a", 1)]
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("torn", len(good))
    assert result.skipped == 0


@pytest.mark.parametrize("entry_type", [4, 9, 15])
def test_types_4_to_15_are_still_corrupt(entry_type: int) -> None:
    """Only types from 21 up are skipped: 4-15 (between ztick's and ours) are damage."""
    good = encode(Job("a", 1))
    bad = struct.pack(">I", 4) + bytes([entry_type]) + b"\x00\x01a"
    result = scan(good + bad + encode(Job("b", 2)))
    assert list(result) == [Job("a", 1)]
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("corrupt", len(good))
    assert f"unknown entry type byte {entry_type}" in result.problem.reason


def test_fast_path_extension_entries_are_real_entries() -> None:
    """Run states and schedules built by the replay fast path equal, hash and freeze alike."""
    entries: list[RunState | ScheduleSet] = [
        RunState("job.0000001", 7, 42, 2, 41),
        ScheduleSet("job.0000001", "every 5 minutes", "tz=Europe/Paris limit=3", 9),
    ]
    for entry in entries:
        (decoded,) = list(scan(encode(entry)))
        assert type(decoded) is type(entry)
        assert decoded == entry
        assert hash(decoded) == hash(entry)
        with pytest.raises(dataclasses.FrozenInstanceError):
            decoded.job_id = "other"  # type: ignore[misc]


def test_fast_path_schedule_with_bad_lengths_goes_to_the_careful_path() -> None:
    """A schedule frame whose inner lengths do not add up is corrupt, with the field named."""
    frame = bytearray(encode(ScheduleSet("j", "daily", "tz=UTC", 1)))
    frame[9] = 0x40  # text length 0x40: runs past the frame's end
    good = encode(Job("a", 1))
    result = scan(good + bytes(frame) + good)
    assert list(result) == [Job("a", 1)]
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("corrupt", len(good))
    assert "schedule text needs 64 bytes" in result.problem.reason


def test_entry_id_names_the_job_or_rule_of_every_entry() -> None:
    """entry_id gives the id an entry is about, whatever the entry's field is called."""
    assert [entry_id(e) for e, _ in HAND_FRAMES] == [
        "toto", "tatat", "é", "t", "r", "a", "ta", "d", "d", "w", "h", "q", "toto", "r",
        "j", "j", "j", "j", "j", "j", "r", "r", "r",
    ]  # fmt: skip


# --------------------------------------------------------------------- extension encode errors


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        (RunState("j", -1, 0, 1, 0), "run count -1 is not a count from 0 to 4294967295"),
        (RunState("j", 2**32, 0, 1, 0), "run count 4294967296 is not a count"),
        (RunState("j", 1, 0, 65536, 0), "attempt 65536 is not a number from 0 to 65535"),
        (RunState("j", 1, 2**63, 1, 0), "occurrence time 9223372036854775808 is not"),
        (RunState("j", 1, 0, 1, cast(Any, 1.5)), "due time 1.5 is not an integer"),
        (Pause("j", cast(Any, 1), 0), "paused 1 is not a bool"),
        (ScheduleSet("j", "x" * 65536, "", 0), "schedule of job 'j': text is 65536 bytes"),
        (ScheduleSet("j", "daily", "tz=\ud800", 0), "options cannot be encoded as UTF-8"),
        (RulePolicy("r", Policy(timeout_ns=I64_MIN)), "timeout -9223372036854775808 is the"),
        (RulePolicy("r", Policy(retries=NONE_U32)), "retries 4294967295 is the logfile's"),
        (RulePolicy("r", Policy(retries=-1)), "retries -1 is not a count"),
        (RulePolicy("r", Policy(backoff_max_ns=I64_MAX + 1)), "backoff maximum 9223372036"),
        (RulePolicy("r", cast(Any, None)), "policy of rule 'r': None is not a Policy"),
    ],
    ids=lambda v: repr(v)[:50],
)
def test_extension_entry_that_cannot_be_written_is_refused(entry: Entry, reason: str) -> None:
    """Out-of-range counts, "none" markers used as values and bad strings raise CodecError."""
    with pytest.raises(CodecError) as info:
        encode(entry)
    assert reason in info.value.reason


def test_extension_frame_over_max_rejected() -> None:
    """A schedule frame over MAX_FRAME_BYTES cannot exist (three 64 KiB strings cannot)."""
    entry = ScheduleSet("x" * 65535, "y" * 65535, "z" * 65535, 0)
    assert decode_payload(encode(entry)[4:]) == entry  # the largest one fits


def test_fast_path_bad_status_reported_precisely() -> None:
    """A job frame shaped like its predecessors but with status 9 is corrupt, not skipped."""
    good = encode(Job("same", 1)) * 3
    bad = bytearray(encode(Job("same", 2)))
    bad[-1] = 9
    result = scan(good + bytes(bad))
    assert len(list(result)) == 3
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("corrupt", len(good))
    assert "bad job status byte 9" in result.problem.reason


def test_fast_path_bad_utf8_reported_precisely() -> None:
    """A job frame with invalid UTF-8 in its id is corrupt at that frame's offset."""
    good = encode(Job("same", 1))
    bad = bytearray(encode(Job("same", 2)))
    bad[7] = 0xFF
    result = scan(good + bytes(bad))
    assert list(result) == [Job("same", 1)]
    assert result.problem is not None
    assert result.problem.offset == len(good)
    assert "not valid UTF-8" in result.problem.reason


# --------------------------------------------------------------------- torn and impossible


def test_torn_header() -> None:
    """Fewer than 4 bytes after the last frame is a torn tail, not corruption."""
    good = encode(Job("a", 1))
    result = scan(good + b"\x00\x00")
    assert list(result) == [Job("a", 1)]
    assert result.problem is not None
    assert result.problem.kind == "torn"
    assert (result.problem.offset, result.problem.dropped) == (len(good), 2)
    assert result.good_end == len(good)


def test_every_cut_point_is_a_torn_tail() -> None:
    """Cutting a log anywhere yields the whole frames before the cut and a torn tail."""
    entries: list[Entry] = [e for e, _ in HAND_FRAMES]
    frames = [encode(e) for e in entries]
    data = b"".join(frames)
    boundaries = [0]
    for frame in frames:
        boundaries.append(boundaries[-1] + len(frame))
    for cut in range(len(data) + 1):
        result = scan(data[:cut])
        got = list(result)
        whole = max(i for i, b in enumerate(boundaries) if b <= cut)
        assert got == entries[:whole], cut
        assert result.good_end == boundaries[whole]
        if cut == boundaries[whole]:
            assert result.problem is None
        else:
            assert result.problem is not None
            assert result.problem.kind == "torn", (cut, result.problem)


def test_zero_filled_tail_is_torn() -> None:
    """Zero bytes at the end (a crash after the file grew) are a torn tail."""
    good = encode(Job("a", 1))
    result = scan(good + bytes(4096))
    assert list(result) == [Job("a", 1)]
    assert result.problem is not None
    assert result.problem.kind == "torn"
    assert "zero-filled" in result.problem.reason


def test_zero_length_before_data_is_corrupt() -> None:
    """A declared length of 0 followed by more data is an impossible length: corrupt."""
    good = encode(Job("a", 1))
    result = scan(good + b"\x00\x00\x00\x00" + encode(Job("b", 2)))
    assert list(result) == [Job("a", 1)]
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("corrupt", len(good))
    assert "impossible frame length 0" in result.problem.reason


def test_huge_length_is_corrupt_even_at_the_end() -> None:
    """A length over MAX_FRAME_BYTES is damage, never a torn write."""
    good = encode(Job("a", 1))
    result = scan(good + struct.pack(">I", MAX_FRAME_BYTES + 1) + b"\x00junk")
    assert list(result) == [Job("a", 1)]
    assert result.problem is not None
    assert result.problem.kind == "corrupt"
    assert f"impossible frame length {MAX_FRAME_BYTES + 1}" in result.problem.reason


def test_length_running_past_end_is_torn() -> None:
    """A plausible length whose payload is cut short is a torn tail naming the shortfall."""
    frame = encode(Rule("r", "p", ShellSpec("command")))
    result = scan(frame[:-3])
    assert list(result) == []
    assert result.problem is not None
    assert result.problem.kind == "torn"
    assert f"declares {len(frame) - 4} payload bytes" in result.problem.reason


# --------------------------------------------------------------------- properties

_text = st.text(st.characters(codec="utf-8"), max_size=12)
_texts = st.lists(_text, max_size=4).map(tuple)
_runner: st.SearchStrategy[RunnerSpec] = st.one_of(
    st.builds(ShellSpec, _text),
    st.builds(AmqpSpec, _text, _text, _text),
    st.builds(DirectSpec, _text, _texts),
    st.builds(AwfSpec, _text, _texts),
    st.builds(HttpSpec, _text, _text),
    st.builds(RedisSpec, _text, _text, _text),
)
_i64 = st.integers(I64_MIN, I64_MAX)
_duration = st.none() | st.integers(I64_MIN + 1, I64_MAX)
_policy = st.builds(
    Policy, _duration, st.none() | st.integers(0, NONE_U32 - 1), _duration, _duration
)
_entry: st.SearchStrategy[Entry] = st.one_of(
    st.builds(Job, _text, _i64, st.sampled_from(JobStatus)),
    st.builds(Rule, _text, _text, _runner),
    st.builds(JobRemoval, _text),
    st.builds(RuleRemoval, _text),
    st.builds(ScheduleSet, _text, _text, _text, _i64),
    st.builds(ScheduleRemoval, _text),
    st.builds(RunState, _text, st.integers(0, 2**32 - 1), _i64, st.integers(0, 65535), _i64),
    st.builds(Pause, _text, st.booleans(), _i64),
    st.builds(RulePolicy, _text, _policy),
)


@given(_entry)
def test_round_trip_property(entry: Entry) -> None:
    """Any entry decodes back to itself, alone and through scan."""
    frame = encode(entry)
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4
    assert decode_payload(frame[4:]) == entry
    assert list(scan(frame)) == [entry]


@given(st.lists(_entry, max_size=20))
def test_scan_round_trip_property(entries: list[Entry]) -> None:
    """A log of any entries scans back to the same list, ending on the last byte."""
    data = b"".join(encode(e) for e in entries)
    result = scan(data)
    assert list(result) == entries
    assert (result.good_end, result.problem) == (len(data), None)


@given(st.binary(max_size=64))
@settings(max_examples=500)
def test_decode_random_bytes_raises_only_codec_error(payload: bytes) -> None:
    """Arbitrary bytes either decode or raise CodecError, nothing else."""
    try:
        entry = decode_payload(payload)
    except CodecError:
        return
    assert encode_payload(entry) == payload


@given(st.lists(_entry, min_size=1, max_size=8), st.data())
def test_scan_of_damaged_log_never_raises(entries: list[Entry], data: st.DataObject) -> None:
    """Flipping any byte of a log never makes scan raise; it stops at a frame boundary."""
    log = bytearray(b"".join(encode(e) for e in entries))
    index = data.draw(st.integers(0, len(log) - 1))
    log[index] ^= data.draw(st.integers(1, 255))
    result = scan(bytes(log))
    got = list(result)
    assert 0 <= result.good_end <= len(log)
    assert result.count == len(got)
    if result.problem is None:
        assert result.good_end == len(log)
    else:
        assert result.problem.offset == result.good_end


# --------------------------------------------------------------------- torn or damaged length
#
# A declared length running past the end is a torn last write only when nothing whole
# follows the header: if complete frames resume somewhere after it and run to the end,
# the length was damaged in the middle of the log and cutting it off would silently
# drop those frames.


def _frames_and_starts(entries: Sequence[Entry]) -> tuple[bytes, list[int]]:
    """The encoded log and the offset of every frame, plus the end offset last."""
    starts = [0]
    frames = [encode(e) for e in entries]
    for frame in frames:
        starts.append(starts[-1] + len(frame))
    return b"".join(frames), starts


MIXED: list[Entry] = [
    Job("backup.daily", 1_700_000_000_000_000_000),
    Rule("r1", "backup.", ShellSpec("tar czf /tmp/b.tgz /etc")),
    Job("report.weekly", 1_700_000_600_000_000_000, JobStatus.EXECUTED),
    JobRemoval("backup.daily"),
    Rule("r2", "report.", DirectSpec("/usr/bin/env", ("true", ""))),
    RuleRemoval("r1"),
    Job("x", -1, JobStatus.FAILED),
    ScheduleSet("report.weekly", "0 8 * * mon", "tz=Europe/Paris limit=0", 1_700_000_000),
    RunState("report.weekly", 0, 1_700_000_600_000_000_000, 1, 1_700_000_600_000_000_000),
    Pause("report.weekly", True, 1_700_000_000_000_000_000),
    RulePolicy("r2", Policy(timeout_ns=30_000_000_000)),
    ScheduleRemoval("report.weekly"),
]


@pytest.mark.parametrize("last", range(len(MIXED)), ids=lambda i: type(MIXED[i]).__name__)
def test_torn_last_frame_is_torn_at_every_cut_point(last: int) -> None:
    """A log whose last frame (any entry type) is cut anywhere inside is a torn tail.

    The whole frames before it are kept, ``good_end`` is the last frame's offset, and
    the reason still says how many payload bytes were declared.
    """
    entries = MIXED[: last + 1]
    data, starts = _frames_and_starts(entries)
    for cut in range(starts[-2] + 1, len(data)):
        result = scan(data[:cut])
        assert list(result) == entries[:-1], cut
        assert result.problem is not None
        assert (result.problem.kind, result.problem.offset) == ("torn", starts[-2]), cut
        assert result.good_end == starts[-2]


def test_torn_batch_is_torn_wherever_it_is_cut() -> None:
    """One write of several frames, cut anywhere, is torn at the frame the cut is in.

    The whole frames of the batch before the cut are kept; the cut frame's own bytes
    (its id, time, status) never look like whole frames running to the end.
    """
    before = [Job(f"job.{i:04}", i) for i in range(20)]
    batch = [Job(f"batch.{i:03}", 10**18 + i, JobStatus(i % 4)) for i in range(12)]
    data, starts = _frames_and_starts([*before, *batch])
    for cut in range(starts[20] + 1, len(data)):
        if cut in starts:
            continue
        whole = max(i for i, s in enumerate(starts) if s <= cut)
        result = scan(data[:cut])
        assert list(result) == [*before, *batch][:whole], cut
        assert result.problem is not None
        assert (result.problem.kind, result.problem.offset) == ("torn", starts[whole]), cut


def test_torn_large_rule_frame_is_torn() -> None:
    """A big rule frame (many arguments, lots of zero bytes inside) cut near its end is torn."""
    big = encode(Rule("big", "p", DirectSpec("/bin/echo", ("",) * 30000 + ("a" * 500,))))
    head = encode(Job("a", 1))
    for cut in (5, len(big) // 2, len(big) - 501, len(big) - 1):
        result = scan(head + big[:cut])
        assert list(result) == [Job("a", 1)]
        assert result.problem is not None
        assert (result.problem.kind, result.problem.offset) == ("torn", len(head))


@pytest.mark.parametrize("damaged", [0, 1, 2, 4, 5])
def test_damaged_length_in_the_middle_is_corrupt_at_that_frame(damaged: int) -> None:
    """A length field damaged to run past the end, with good frames after it: corrupt.

    The problem is at the damaged frame's offset (not a torn tail), the frames before
    it are decoded, and the reason names where whole frames resume.
    """
    data, starts = _frames_and_starts(MIXED)
    bad = bytearray(data)
    offset = starts[damaged]
    bad[offset : offset + 4] = struct.pack(">I", len(data) - offset)  # 4 bytes too many
    result = scan(bytes(bad))
    assert list(result) == MIXED[:damaged]
    assert result.good_end == offset
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("corrupt", offset)
    assert f"from byte offset {starts[damaged + 1]} run to the end" in result.problem.reason
    assert f"{len(MIXED) - damaged - 1} whole frame" in result.problem.reason


def test_damaged_length_up_to_the_limit_is_corrupt() -> None:
    """A damaged length anywhere up to MAX_FRAME_BYTES, overrunning the end, is corrupt."""
    data, starts = _frames_and_starts(MIXED)
    for length in (len(data), 0x1000, 0xFFFF, MAX_FRAME_BYTES):
        bad = bytearray(data)
        bad[starts[2] : starts[2] + 4] = struct.pack(">I", length)
        result = scan(bytes(bad))
        assert list(result) == MIXED[:2]
        assert result.problem is not None
        assert (result.problem.kind, result.problem.offset) == ("corrupt", starts[2]), length


def test_damaged_length_with_only_the_last_frame_after_it_is_corrupt() -> None:
    """One whole frame after the damaged header is enough to call it damage."""
    data, starts = _frames_and_starts(MIXED)
    bad = bytearray(data)
    offset = starts[-3]
    bad[offset + 2] ^= 0x40  # length += 0x4000: runs past the end
    result = scan(bytes(bad))
    assert list(result) == MIXED[:-2]
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("corrupt", offset)
    assert f"1 whole frame from byte offset {starts[-2]}" in result.problem.reason


def test_damaged_header_with_garbage_then_good_frames_is_corrupt() -> None:
    """Damage spanning a header and some bytes after it still finds the good frames."""
    data, starts = _frames_and_starts(MIXED)
    bad = bytearray(data)
    bad[starts[1] : starts[2] - 3] = b"\x00\x00\xff\xff" + b"\xee" * (
        starts[2] - 3 - starts[1] - 4
    )
    result = scan(bytes(bad))
    assert list(result) == MIXED[:1]
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("corrupt", starts[1])


def test_overrun_followed_by_garbage_only_stays_torn() -> None:
    """Random-looking bytes after an overrunning header, with no whole frame, are torn.

    (Such a tail cannot hide a good frame, so cutting it loses nothing that was whole.)
    """
    head = encode(Job("a", 1))
    tail = struct.pack(">I", 4000) + bytes(range(256)) * 3 + b"\x00" * 100
    result = scan(head + tail)
    assert list(result) == [Job("a", 1)]
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("torn", len(head))


def test_embedded_frame_at_a_torn_cut_is_reported_as_damage() -> None:
    """The known false alarm: a torn frame whose cut bytes end in a whole embedded frame.

    A job id can hold bytes that encode a frame.  If a crash cuts the job's frame just
    after them, the tail looks exactly like a damaged length followed by a good frame,
    and is reported as corrupt: startup stops (safe) and ``--recover-corrupt-log``
    keeps everything before it, which is what cutting a torn tail would have kept.
    """
    inner = encode(JobRemoval("x"))
    job = Job("evil" + inner.decode("utf-8") + "tail", 5)
    frame = encode(job)
    cut = frame.index(inner) + len(inner)
    result = scan(encode(Job("a", 1)) + frame[:cut])
    assert list(result) == [Job("a", 1)]
    assert result.problem is not None
    assert result.problem.kind == "corrupt"
    assert result.problem.offset == len(encode(Job("a", 1)))


@given(st.lists(_entry, min_size=1, max_size=8), st.data())
@settings(max_examples=300)
def test_cutting_the_last_frame_is_always_torn(entries: list[Entry], data: st.DataObject) -> None:
    """For any log cut inside its last frame, scan keeps the rest and reports torn."""
    log, starts = _frames_and_starts(entries)
    cut = data.draw(st.integers(starts[-2] + 1, len(log) - 1), label="cut")
    result = scan(log[:cut])
    assert list(result) == entries[:-1]
    assert result.problem is not None
    assert (result.problem.kind, result.problem.offset) == ("torn", starts[-2])


@given(st.lists(_entry, min_size=2, max_size=8), st.data())
@settings(max_examples=500)
def test_damage_in_the_middle_never_silently_drops_whole_frames(
    entries: list[Entry], data: st.DataObject
) -> None:
    """Overwriting any region before the last frame never makes whole frames vanish.

    For a single damaged region ``[a, b)`` (random bytes, often starting on a frame's
    length field) with at least one intact frame after it, scan either decodes to the
    end, or reports ``corrupt`` no later than the first intact frame after the damage.
    It never calls it a torn tail (which is cut off with only a warning), and the
    frames before the damage always come back unchanged.
    """
    log, starts = _frames_and_starts(entries)
    last_start = starts[-2]
    if data.draw(st.booleans(), label="on a frame start"):
        a = data.draw(st.sampled_from(starts[:-2]), label="a")
    else:
        a = data.draw(st.integers(0, last_start - 1), label="a")
    b = data.draw(st.integers(a + 1, min(last_start, a + 16)), label="b")
    damaged = bytearray(log)
    damaged[a:b] = data.draw(st.binary(min_size=b - a, max_size=b - a), label="bytes")
    result = scan(bytes(damaged))
    got = list(result)
    intact_before = sum(1 for end in starts[1:] if end <= a)
    assert got[:intact_before] == entries[:intact_before]
    if result.problem is None:
        assert result.good_end == len(log)
        return
    first_intact_after = min(s for s in starts[:-1] if s >= b)
    assert result.problem.kind == "corrupt", result.problem
    assert result.problem.offset <= first_intact_after
