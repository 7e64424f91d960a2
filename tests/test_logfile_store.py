"""LogfileStore: replay, torn tails, corruption, group commit and failure handling.

Time is a ``Clock`` and the fsync runner is synchronous or hand-driven, so every
step is explicit; files are real files in a temporary directory.  The last tests use
the real reactor, its thread pool and a real ``fsync``.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import resource
import shutil
import signal
import stat
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial import unittest as trial
from zope.interface.verify import verifyObject

from ztick_tw.model import (
    DirectSpec,
    Entry,
    Job,
    JobRemoval,
    JobStatus,
    Rule,
    RuleRemoval,
    ShellSpec,
)
from ztick_tw.store import logfile as logfile_module
from ztick_tw.store.base import Commit, CorruptLogError, IStore, StoreError
from ztick_tw.store.codec import encode, entry_id
from ztick_tw.store.frame import MAX_FRAME_BYTES, CodecError
from ztick_tw.store.leftovers import TO_COMPRESS
from ztick_tw.store.logfile import LogfileStore
from ztick_tw.store.scanning import scan

SPEC_EXAMPLE = bytes.fromhex("00 00 00 10 00 00 04 74 6f 74 6f 16 47 bb 5c ee e1 50 00 00")


class SyncRunner:
    """Runs the fsync at once, on the calling thread, and counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, blocking: Callable[[], None]) -> Deferred[None]:
        self.calls += 1
        blocking()
        return succeed(None)


class ManualRunner:
    """Holds each fsync 'in flight' until the test finishes it."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], None], Deferred[None]]] = []
        self.calls = 0

    def __call__(self, blocking: Callable[[], None]) -> Deferred[None]:
        self.calls += 1
        d: Deferred[None] = Deferred()
        self.pending.append((blocking, d))
        return d

    def finish(self, error: BaseException | None = None) -> None:
        blocking, d = self.pending.pop(0)
        if error is None:
            blocking()
            d.callback(None)
        else:
            d.errback(error)


def failing_runner(blocking: Callable[[], None]) -> Deferred[None]:
    """An fsync that fails with EIO."""
    return fail(OSError(errno.EIO, os.strerror(errno.EIO)))


def make(
    path: Path,
    fsync: bool = True,
    runner: Callable[[Callable[[], None]], Deferred[None]] | None = None,
    recover: bool = False,
) -> tuple[LogfileStore, Clock]:
    """A LogfileStore on a Clock with a synchronous fsync runner unless given one."""
    clock = Clock()
    store = LogfileStore(clock, str(path), fsync, runner or SyncRunner(), recover=recover)
    return store, clock


def loaded(path: Path, **kwargs: object) -> tuple[LogfileStore, Clock, list[Entry]]:
    """A store on ``path`` (see ``make``) that has already replayed; with the entries."""
    store, clock = make(path, **kwargs)  # type: ignore[arg-type]
    entries = list(store.load())
    return store, clock, entries


def texts(events: Sequence[Mapping[str, Any]]) -> str:
    """All captured log events, formatted, one per line."""
    return "\n".join(formatEvent(dict(e)) or "" for e in events)


@pytest.fixture
def logpath(tmp_path: Path) -> Path:
    """A logfile path in a fresh temporary directory (no file yet)."""
    return tmp_path / "logfile"


# --------------------------------------------------------------------- basics


def test_provides_istore(logpath: Path) -> None:
    """LogfileStore declares and implements IStore; its name is 'logfile'."""
    store, _ = make(logpath)
    assert verifyObject(IStore, store)
    assert store.name == "logfile"


def test_missing_file_is_empty_and_created_private(logpath: Path) -> None:
    """A missing logfile loads as empty and is created, unreadable by others."""
    store, _, entries = loaded(logpath)
    assert entries == []
    assert logpath.exists()
    assert logpath.stat().st_size == 0
    assert stat.S_IMODE(logpath.stat().st_mode) & 0o077 == 0
    store.close()


def test_append_before_load_refused(logpath: Path) -> None:
    """Appending before load() could glue onto a torn tail, so it is refused."""
    store, _ = make(logpath)
    with pytest.raises(StoreError, match="append before load"):
        store.append(Job("a", 1))


def test_load_twice_refused(logpath: Path) -> None:
    """load() opens the file; a second call is an error, not a second replay."""
    store, _, _ = loaded(logpath)
    with pytest.raises(StoreError, match="called twice"):
        list(store.load())
    store.close()


def test_appends_written_byte_exact_at_next_turn(logpath: Path) -> None:
    """Appends are written at the next reactor turn, exactly as SPEC §5 frames."""
    store, clock, _ = loaded(logpath, fsync=False)
    assert store.append(Job("toto", 1605457800000000000, JobStatus.PLANNED)) is None
    assert store.append(JobRemoval("toto")) is None
    assert logpath.read_bytes() == b""
    clock.advance(0)
    assert logpath.read_bytes() == SPEC_EXAMPLE + bytes.fromhex("00 00 00 07 02 00 04 74 6f 74 6f")
    assert store.frames_written == 2
    store.close()


def test_write_through_writes_now_and_still_syncs(logpath: Path) -> None:
    """``write_through`` puts the buffer in the file at once; the commit still waits for fsync."""
    runner = ManualRunner()
    store, clock, _ = loaded(logpath, runner=runner)
    commit = store.append(Job("toto", 1605457800000000000, JobStatus.PLANNED))
    assert commit is not None
    store.write_through()
    assert logpath.read_bytes() == SPEC_EXAMPLE
    assert not commit.done
    assert clock.getDelayedCalls() == []
    runner.finish()
    assert commit.done and commit.error is None
    store.close()


def test_second_store_on_a_locked_logfile_is_refused_before_reading(logpath: Path) -> None:
    """A second store on a logfile in use fails with a clear error and changes nothing."""
    first, _, _ = loaded(logpath)
    logpath.write_bytes(SPEC_EXAMPLE + b"\x00\x00")  # a torn tail the second must not cut
    second, _ = make(logpath)
    with pytest.raises(StoreError, match="in use by another process"):
        list(second.load())
    assert logpath.read_bytes() == SPEC_EXAMPLE + b"\x00\x00"
    first.close()
    third, _, entries = loaded(logpath)
    assert entries == [Job("toto", 1605457800000000000, JobStatus.PLANNED)]
    third.close()


def test_replay_returns_entries_in_order(logpath: Path) -> None:
    """Everything appended comes back from load() in the same order after a restart."""
    entries: list[Entry] = [
        Rule("r", "job.", ShellSpec("echo hi")),
        Job("job.1", 5),
        Job("job.2", 6, JobStatus.EXECUTED),
        JobRemoval("job.1"),
    ]
    store, clock, _ = loaded(logpath)
    for entry in entries:
        store.append(entry)
    clock.advance(0)
    store.close()
    again, _, replayed = loaded(logpath)
    assert replayed == entries
    again.close()


def test_load_pauses_gc_only_while_replaying(logpath: Path) -> None:
    """The collector is off during replay and back on afterwards."""
    logpath.write_bytes(encode(Job("a", 1)) + encode(Job("b", 2)))
    store, _ = make(logpath)
    seen = [gc.isenabled() for _ in store.load()]
    assert seen == [False, False]
    assert gc.isenabled()
    store.close()


def test_codec_error_buffers_nothing(logpath: Path) -> None:
    """An entry that cannot be encoded raises CodecError and schedules no write."""
    store, clock, _ = loaded(logpath)
    with pytest.raises(CodecError):
        store.append(Job("x" * 70000, 1))
    assert clock.getDelayedCalls() == []
    store.close()
    assert logpath.read_bytes() == b""


# --------------------------------------------------------------------- torn tail and damage


def test_torn_tail_cut_then_append_is_readable(logpath: Path) -> None:
    """A torn last frame is dropped with a warning and the next append is not glued on."""
    good = encode(Job("a", 1)) + encode(Job("b", 2))
    partial = encode(Job("c", 3))[:9]
    logpath.write_bytes(good + partial)
    with capturedLogs() as events:
        store, clock, entries = loaded(logpath)
    assert entries == [Job("a", 1), Job("b", 2)]
    message = texts(events)
    assert str(logpath) in message
    assert f"byte offset {len(good)}" in message
    assert "9 bytes" in message
    assert logpath.stat().st_size == len(good)
    store.append(Job("d", 4))
    clock.advance(0)
    result = scan(logpath.read_bytes())
    assert list(result) == [Job("a", 1), Job("b", 2), Job("d", 4)]
    assert result.problem is None
    store.close()


def test_zero_filled_tail_is_cut(logpath: Path) -> None:
    """Zeros after the last frame (file grew, data never landed) are cut like a torn tail."""
    good = encode(Job("a", 1))
    logpath.write_bytes(good + bytes(512))
    store, _, entries = loaded(logpath)
    assert entries == [Job("a", 1)]
    assert logpath.read_bytes() == good
    store.close()


def test_corruption_in_the_middle_raises_with_offset(logpath: Path) -> None:
    """A bad frame before the end raises CorruptLogError at its offset; the file is kept."""
    good = encode(Job("a", 1))
    bad = bytearray(encode(Job("b", 2)))
    bad[-1] = 7  # status byte 7
    content = good + bytes(bad) + encode(Job("c", 3))
    logpath.write_bytes(content)
    store, _ = make(logpath)
    with pytest.raises(CorruptLogError) as info:
        list(store.load())
    assert info.value.offset == len(good)
    assert info.value.path == str(logpath)
    assert "bad job status byte 7" in info.value.reason
    assert str(logpath) in str(info.value)
    assert logpath.read_bytes() == content
    with pytest.raises(StoreError, match="append before load"):
        store.append(Job("d", 4))


def test_a_symlinked_logfile_keeps_its_side_files_beside_the_target(tmp_path: Path) -> None:
    """Through a symbolic link, everything the store writes lands beside the target.

    ztick's compaction leftovers are looked for and merged there, the ``.corrupt-<offset>``
    file of a recovery is saved there, appends reach the target, and the link is kept.
    The log says which file the link leads to.
    """
    volume, conf = tmp_path / "volume", tmp_path / "etc"
    volume.mkdir()
    conf.mkdir()
    target, link = volume / "logfile", conf / "logfile"
    link.symlink_to(target)
    good = encode(Job("a", 1))
    damaged = b"\x00\x00\x00\x00garbage"
    target.write_bytes(good + damaged)
    (volume / TO_COMPRESS).write_bytes(encode(Job("old", 5)))
    with capturedLogs() as events:
        store, clock, entries = loaded(link, recover=True)
    assert entries == [Job("old", 5), Job("a", 1)]
    assert store.path == str(target) and store.configured_path == str(link)
    assert (volume / f"logfile.corrupt-{len(encode(Job('old', 5))) + len(good)}").exists()
    store.append(Job("b", 2))
    clock.advance(0)
    store.close()
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert sorted(os.listdir(conf)) == ["logfile"]
    assert list(scan(target.read_bytes())) == [Job("old", 5), Job("a", 1), Job("b", 2)]
    assert f"logfile {link} leads through a symbolic link to {target}" in texts(events)


def test_a_path_without_links_is_kept_as_given(logpath: Path) -> None:
    """No symbolic link involved: the store names the file as configured (messages too)."""
    store, _ = make(logpath)
    assert store.path == store.configured_path == str(logpath)


def test_recover_keeps_frames_before_damage(logpath: Path) -> None:
    """recover=True keeps what precedes the damage, cuts the rest and saves it aside."""
    good = encode(Job("a", 1)) + encode(Rule("r", "a", ShellSpec("true")))
    damaged = b"\x00\x00\x00\x00garbage" + encode(Job("c", 3))
    logpath.write_bytes(good + damaged)
    with capturedLogs() as events:
        store, clock, entries = loaded(logpath, recover=True)
    assert entries == [Job("a", 1), Rule("r", "a", ShellSpec("true"))]
    assert logpath.read_bytes() == good
    side = logpath.parent / f"logfile.corrupt-{len(good)}"
    assert side.read_bytes() == damaged
    assert side.stat().st_mode & 0o777 == 0o600  # may hold credentials, like the log
    message = texts(events)
    assert f"byte offset {len(good)}" in message
    assert "impossible frame length 0" in message
    store.append(Job("d", 4))
    clock.advance(0)
    assert list(scan(logpath.read_bytes())) == [*entries, Job("d", 4)]
    store.close()


# --------------------------------------------------------------------- kinds of damage
#
# Each kind of damage, in the middle of a log (good frames after it) and as the last
# frame: load refuses with CorruptLogError at the exact offset of the first bad frame
# after yielding every frame before it, leaves the file alone, and recover=True keeps
# exactly the frames before it.

BEFORE_DAMAGE: list[Entry] = [
    Job("backup.daily", 1_700_000_000_000_000_000),
    Rule("r1", "backup.", ShellSpec("tar czf /tmp/b.tgz /etc")),
    Job("report.weekly", 1_700_000_600_000_000_000, JobStatus.EXECUTED),
    JobRemoval("backup.daily"),
    Job("x", -1, JobStatus.FAILED),
]
AFTER_DAMAGE: list[Entry] = [
    Job("after.1", 1_800_000_000_000_000_000),
    Rule("r2", "after.", DirectSpec("/bin/true")),
    RuleRemoval("r1"),
]


def _payload_frame(payload: bytes) -> bytes:
    """A frame with a correct length header around an arbitrary payload."""
    return struct.pack(">I", len(payload)) + payload


def _with_byte(entry: Entry, index: int, value: int) -> bytes:
    """``entry``'s frame with the byte at ``index`` (negative: from the end) replaced."""
    frame = bytearray(encode(entry))
    frame[index] = value
    return bytes(frame)


#: name -> (bad frame bytes, words of the reason)
DAMAGE: dict[str, tuple[bytes, str]] = {
    "length 0": (b"\x00\x00\x00\x00" + encode(Job("gone", 1))[4:], "impossible frame length 0"),
    "length over 1 MiB": (
        struct.pack(">I", MAX_FRAME_BYTES + 1) + encode(Job("gone", 1))[4:],
        f"impossible frame length {MAX_FRAME_BYTES + 1}",
    ),
    "length 0xffffffff": (
        b"\xff\xff\xff\xff" + encode(Job("gone", 1))[4:],
        "impossible frame length 4294967295",
    ),
    "unknown type byte 4": (_with_byte(Job("gone", 1), 4, 4), "unknown entry type byte 4"),
    "unknown type byte 15": (  # 21 and up are a newer version's frames: skipped
        _with_byte(JobRemoval("gone"), 4, 15),
        "unknown entry type byte 15",
    ),
    "unknown runner kind": (
        _with_byte(Rule("bad", "p", ShellSpec("true")), 4 + 1 + 5 + 3, 6),
        "unknown runner kind 6",
    ),
    "bad status byte": (_with_byte(Job("gone", 1), -1, 4), "bad job status byte 4"),
    "truncated string": (
        # A rule whose shell command declares 100 bytes; the frame ends after 4 of them.
        _payload_frame(b"\x01\x00\x03bad\x00\x01p\x00\x00\x64true"),
        "shell command needs 100 bytes",
    ),
    "invalid UTF-8 id": (_with_byte(Job("gone", 1), 7, 0xFF), "job id is not valid UTF-8"),
    "trailing bytes": (_payload_frame(encode(JobRemoval("gone"))[4:] + b"!"), "1 trailing bytes"),
}


def _damaged_log(bad: bytes, last: bool) -> tuple[bytes, int]:
    """A log of BEFORE_DAMAGE, ``bad``, then AFTER_DAMAGE (unless ``last``); bad's offset."""
    before = b"".join(encode(e) for e in BEFORE_DAMAGE)
    after = b"" if last else b"".join(encode(e) for e in AFTER_DAMAGE)
    return before + bad + after, len(before)


def _load_until_error(path: Path) -> tuple[list[Entry], CorruptLogError]:
    """The entries a plain load yields before it raises CorruptLogError, and the error."""
    store, _ = make(path)
    got: list[Entry] = []
    with pytest.raises(CorruptLogError) as info:
        for entry in store.load():
            got.append(entry)
    return got, info.value


def _check_refused_then_recovered(path: Path, content: bytes, offset: int) -> CorruptLogError:
    """The refusal and the recovery every kind of damage must get; returns the error."""
    path.write_bytes(content)
    got, error = _load_until_error(path)
    assert error.offset == offset
    assert error.path == str(path)
    assert f"corrupt frame at byte offset {offset}:" in str(error)
    assert got == BEFORE_DAMAGE  # nothing before the damage is dropped
    assert path.read_bytes() == content  # refusing changes nothing on disk
    with capturedLogs() as events:
        store, clock, entries = loaded(path, recover=True)
    assert entries == BEFORE_DAMAGE
    assert path.read_bytes() == content[:offset]
    assert (path.parent / f"{path.name}.corrupt-{offset}").read_bytes() == content[offset:]
    assert f"corrupt frame at byte offset {offset}" in texts(events)
    store.append(Job("new", 9))
    clock.advance(0)
    assert list(scan(path.read_bytes())) == [*BEFORE_DAMAGE, Job("new", 9)]
    store.close()
    return error


@pytest.mark.parametrize("last", [False, True], ids=["middle", "last frame"])
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_each_kind_of_damage_is_refused_at_its_offset(
    logpath: Path, kind: str, last: bool
) -> None:
    """Impossible lengths, unknown type/runner/status bytes, short strings: refused exactly.

    In the middle of the log or as its last frame, load raises CorruptLogError naming
    the bad frame's first byte and why, after yielding every frame before it; with
    recover=True exactly those frames are kept and the rest is saved aside.
    """
    bad, reason = DAMAGE[kind]
    content, offset = _damaged_log(bad, last)
    error = _check_refused_then_recovered(logpath, content, offset)
    assert reason in error.reason


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_over_the_middle_are_refused_at_the_first_bad_frame(
    logpath: Path, seed: int
) -> None:
    """Random bytes written over a stretch of the log from a frame boundary are refused.

    The damage covers the header of the frame after BEFORE_DAMAGE and some bytes after
    it (seeded, so the test is repeatable); good frames follow.  Whatever length the
    random header declares, the error is at that frame's offset, never further on.
    """
    rng = random.Random(seed)
    good_after = b"".join(encode(e) for e in AFTER_DAMAGE)
    content, offset = _damaged_log(encode(Job("victim.job", 5)) + good_after, last=False)
    damaged = bytearray(content)
    size = rng.randrange(4, 40)
    damaged[offset : offset + size] = rng.randbytes(size)
    _check_refused_then_recovered(logpath, bytes(damaged), offset)


@pytest.mark.parametrize("extra", [1, 2, 4, 1000, MAX_FRAME_BYTES])
def test_length_damaged_to_run_past_the_end_is_refused_not_cut(logpath: Path, extra: int) -> None:
    """A length field damaged in the middle so that it runs past the end is corruption.

    It looks like a torn last frame, but whole frames follow it: load refuses instead
    of cutting them off with a warning (which would lose them silently).
    """
    victim = encode(Job("victim.job", 5))
    content, offset = _damaged_log(victim + b"".join(encode(e) for e in AFTER_DAMAGE), False)
    damaged = bytearray(content)
    length = min(len(content) - offset - 4 + extra, MAX_FRAME_BYTES)
    damaged[offset : offset + 4] = struct.pack(">I", length)
    error = _check_refused_then_recovered(logpath, bytes(damaged), offset)
    assert "run to the end of the data" in error.reason


def test_torn_last_frame_is_still_cut_with_a_warning(logpath: Path) -> None:
    """For contrast: the same log cut inside its last frame loads, minus that frame."""
    content, offset = _damaged_log(encode(Rule("r9", "x", ShellSpec("echo cut"))), last=True)
    for cut in (offset + 2, offset + 4, offset + 9, len(content) - 1):
        logpath.write_bytes(content[:cut])
        with capturedLogs() as events:
            store, _, entries = loaded(logpath)
        assert entries == BEFORE_DAMAGE
        assert logpath.read_bytes() == content[:offset]
        assert f"torn last frame at byte offset {offset}" in texts(events)
        store.close()


# --------------------------------------------------------------------- group commit


def test_fsync_false_returns_no_commit(logpath: Path) -> None:
    """Without fsync_on_persist nothing waits: append returns None."""
    store, clock, _ = loaded(logpath, fsync=False)
    assert store.append(Job("a", 1)) is None
    clock.advance(0)
    store.close()


def test_commit_resolves_only_after_fsync(logpath: Path) -> None:
    """The commit stays pending while the data is written but not yet fsynced."""
    runner = ManualRunner()
    store, clock, _ = loaded(logpath, runner=runner)
    commit = store.append(Job("a", 1))
    assert commit is not None
    clock.advance(0)
    assert logpath.read_bytes() == encode(Job("a", 1))
    assert runner.calls == 1
    assert not commit.done
    runner.finish()
    assert commit.done
    assert commit.error is None
    store.close()


def test_one_turn_shares_one_commit_and_one_fsync(logpath: Path) -> None:
    """Appends in one reactor turn get the same Commit, written once, fsynced once."""
    runner = SyncRunner()
    store, clock, _ = loaded(logpath, runner=runner)
    commits = [store.append(Job(f"j{i}", i)) for i in range(5)]
    assert all(c is commits[0] for c in commits)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert runner.calls == 1
    first = commits[0]
    assert first is not None and first.done
    later = store.append(Job("next", 9))
    assert later is not None and later is not first
    clock.advance(0)
    assert runner.calls == 2 and later.done
    store.close()


def test_batches_written_during_fsync_wait_for_the_next_one(logpath: Path) -> None:
    """At most one fsync in flight; the next covers every batch written meanwhile."""
    runner = ManualRunner()
    store, clock, _ = loaded(logpath, runner=runner)
    first = store.append(Job("a", 1))
    clock.advance(0)
    second = store.append(Job("b", 2))
    clock.advance(0)
    third = store.append(Job("c", 3))
    clock.advance(0)
    assert first is not None and second is not None and third is not None
    assert len({id(first), id(second), id(third)}) == 3
    assert runner.calls == 1  # second and third are written, waiting
    assert logpath.read_bytes() == b"".join(
        encode(Job(i, n)) for i, n in (("a", 1), ("b", 2), ("c", 3))
    )
    runner.finish()
    assert first.done and not second.done and not third.done
    assert runner.calls == 2  # one fsync for both waiting batches
    runner.finish()
    assert second.done and third.done
    assert runner.calls == 2
    store.close()


def test_subscribers_called_once_in_order(logpath: Path) -> None:
    """Every request sharing a commit hears about it exactly once, in order."""
    store, clock, _ = loaded(logpath)
    heard: list[int] = []
    for i in range(3):
        commit = store.append(Job(f"j{i}", i))
        assert commit is not None

        def hear(_: Commit, i: int = i) -> None:
            heard.append(i)

        commit.subscribe(hear)
    clock.advance(0)
    assert heard == [0, 1, 2]
    store.close()


# --------------------------------------------------------------------- failures


def test_write_failure_fails_commit_and_leaves_no_partial_frame(
    logpath: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short write then ENOSPC fails the batch and cuts the file back to the frame edge."""
    store, clock, _ = loaded(logpath)
    ok = store.append(Job("kept", 1))
    clock.advance(0)
    assert ok is not None and ok.done and ok.error is None
    before = logpath.read_bytes()

    real_write = os.write
    calls: list[int] = []

    def short_then_enospc(fd: int, data: bytes | memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:5])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(logfile_module, "_os_write", short_then_enospc)
    with capturedLogs() as events:
        failed = store.append(Job("lost", 2))
        store.append(Job("lost2", 3))
        clock.advance(0)
    assert failed is not None and failed.done
    assert isinstance(failed.error, StoreError)
    assert "ENOSPC" in str(failed.error)
    assert str(logpath) in str(failed.error)
    assert isinstance(failed.error.__cause__, OSError)
    assert len(calls) == 2
    assert logpath.read_bytes() == before
    assert "ENOSPC" in texts(events)

    monkeypatch.setattr(logfile_module, "_os_write", real_write)
    again = store.append(Job("after", 4))
    clock.advance(0)
    assert again is not None and again.error is None
    result = scan(logpath.read_bytes())
    assert list(result) == [Job("kept", 1), Job("after", 4)]
    assert result.problem is None
    store.close()


def test_real_short_write_over_file_size_limit(logpath: Path) -> None:
    """A real kernel short write (RLIMIT_FSIZE, EFBIG) leaves no partial frame behind."""
    store, clock, _ = loaded(logpath)
    store.append(Job("kept", 1))
    clock.advance(0)
    size = logpath.stat().st_size
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 30, hard))
        commit = store.append(Job("big" * 10, 2))  # 46 bytes: only 30 fit
        clock.advance(0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert commit is not None and commit.done
    assert commit.error is not None and "EFBIG" in str(commit.error)
    assert logpath.stat().st_size == size
    store.append(Job("after", 3))
    clock.advance(0)
    assert list(scan(logpath.read_bytes())) == [Job("kept", 1), Job("after", 3)]
    store.close()


def test_fsync_failure_fails_commits_and_cuts_unsynced_bytes(logpath: Path) -> None:
    """A failed fsync fails its commits and cuts the file back to the last synced size."""
    runner = ManualRunner()
    store, clock, _ = loaded(logpath, runner=runner)
    kept = store.append(Job("kept", 1))
    clock.advance(0)
    runner.finish()
    synced = logpath.read_bytes()
    first = store.append(Job("x", 2))
    clock.advance(0)
    second = store.append(Job("y", 3))  # written while the failing fsync is in flight
    clock.advance(0)
    with capturedLogs() as events:
        runner.finish(OSError(errno.EIO, os.strerror(errno.EIO)))
    assert kept is not None and kept.error is None
    for commit in (first, second):
        assert commit is not None and commit.done
        assert isinstance(commit.error, StoreError) and "EIO" in str(commit.error)
    assert logpath.read_bytes() == synced
    assert "fsync failed" in texts(events)
    assert runner.pending == []
    later = store.append(Job("z", 4))
    clock.advance(0)
    runner.finish()
    assert later is not None and later.error is None
    assert list(scan(logpath.read_bytes())) == [Job("kept", 1), Job("z", 4)]
    store.close()


def test_sync_runner_that_raises_fails_commit(logpath: Path) -> None:
    """A runner raising synchronously is handled like a failed fsync."""

    def raising(blocking: Callable[[], None]) -> Deferred[None]:
        raise OSError(errno.EIO, "boom")

    store, clock, _ = loaded(logpath, runner=raising)
    commit = store.append(Job("a", 1))
    clock.advance(0)
    assert commit is not None and commit.done and commit.error is not None
    assert logpath.read_bytes() == b""


def test_failing_fsync_runner(logpath: Path) -> None:
    """An fsync that fails through its Deferred resolves the commit with the error."""
    store, clock, _ = loaded(logpath, runner=failing_runner)
    commit = store.append(Job("a", 1))
    clock.advance(0)
    assert commit is not None and isinstance(commit.error, StoreError)
    assert "Input/output error" in str(commit.error)


# --------------------------------------------------------------------- flush and close


def test_flush_writes_and_resolves_everything_now(logpath: Path) -> None:
    """flush() writes the buffer, fsyncs and resolves pending and in-flight commits."""
    runner = ManualRunner()
    store, clock, _ = loaded(logpath, runner=runner)
    in_flight = store.append(Job("a", 1))
    clock.advance(0)
    buffered = store.append(Job("b", 2))
    assert in_flight is not None and buffered is not None
    assert not in_flight.done and not buffered.done
    store.flush()
    assert in_flight.done and buffered.done
    assert in_flight.error is None and buffered.error is None
    assert clock.getDelayedCalls() == []
    assert list(scan(logpath.read_bytes())) == [Job("a", 1), Job("b", 2)]
    runner.finish()  # the late thread fsync changes nothing
    assert in_flight.error is None
    store.close()


def test_close_flushes_cancels_and_is_idempotent(logpath: Path) -> None:
    """close() writes what is buffered, cancels the pending call, and can be repeated."""
    store, clock, _ = loaded(logpath, fsync=False)
    store.append(Job("a", 1))
    assert len(clock.getDelayedCalls()) == 1
    store.close()
    assert clock.getDelayedCalls() == []
    assert logpath.read_bytes() == encode(Job("a", 1))
    store.close()
    with pytest.raises(StoreError, match="append after close"):
        store.append(Job("b", 2))
    store.flush()  # harmless after close


def test_a_failed_final_fsync_without_fsync_on_persist_keeps_acknowledged_frames(
    logpath: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fsync off, a flush whose fsync fails raises but leaves every written frame.

    Those writes were answered OK when applied; cutting the file back to its size at
    load (the last fsync) would throw them all away.  A later good flush still works.
    """
    store, clock, _ = loaded(logpath, fsync=False)
    for i in range(3):
        store.append(Job(f"j.{i}", i))
    clock.advance(0)
    written = logpath.read_bytes()
    assert len(list(scan(written))) == 3

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)  # the store calls os.fsync
    with capturedLogs() as events, pytest.raises(StoreError, match="left in the file"):
        store.flush()
    assert logpath.read_bytes() == written
    assert "fsync failed: Input/output error (EIO)" in texts(events)
    monkeypatch.undo()
    store.append(Job("after", 9))
    store.close()
    assert [entry_id(e) for e in scan(logpath.read_bytes())] == ["j.0", "j.1", "j.2", "after"]


def test_close_without_load(logpath: Path) -> None:
    """Closing a store that never loaded does nothing and creates no file."""
    store, _ = make(logpath)
    store.close()
    assert not logpath.exists()


# --------------------------------------------------------------------- real reactor


class RealReactorTests(trial.TestCase):
    """With the real reactor, its thread pool and a real fsync."""

    def logpath(self) -> Path:
        """A logfile path in a temporary directory removed after the test."""
        directory = tempfile.mkdtemp(prefix="ztick-logfile-")
        self.addCleanup(shutil.rmtree, directory, True)
        return Path(directory) / "logfile"

    def test_commit_resolves_through_thread_pool(self) -> None:
        """A commit resolves after a real fsync in the reactor's thread pool."""
        path = self.logpath()
        store = LogfileStore(global_reactor, str(path), fsync=True)
        assert list(store.load()) == []
        self.addCleanup(store.close)
        done: Deferred[Commit] = Deferred()
        commit = store.append(Job("toto", 1605457800000000000))
        assert commit is not None
        commit.subscribe(done.callback)

        def check(result: Commit) -> None:
            assert result.error is None
            assert path.read_bytes() == SPEC_EXAMPLE
            assert store.syncs == 1

        return done.addCallback(check)  # type: ignore[return-value]

    def test_many_turns_few_fsyncs(self) -> None:
        """Appends over many turns all resolve, in order, never with more fsyncs than batches."""
        path = self.logpath()
        store = LogfileStore(global_reactor, str(path), fsync=True)
        list(store.load())
        self.addCleanup(store.close)
        commits: list[Commit] = []
        finished: Deferred[None] = Deferred()

        def burst(left: int) -> None:
            for i in range(20):
                commit = store.append(Job(f"job.{left:03d}.{i:02d}", left))
                assert commit is not None
                if not commits or commits[-1] is not commit:
                    commits.append(commit)
            if left:
                global_reactor.callLater(0, burst, left - 1)
            else:
                commits[-1].subscribe(lambda _: finished.callback(None))

        burst(50)

        def check(_: None) -> None:
            assert all(c.done and c.error is None for c in commits)
            assert len(commits) == 51
            assert store.syncs <= len(commits)
            assert len(list(scan(path.read_bytes()))) == 51 * 20

        return finished.addCallback(check)  # type: ignore[return-value]
