"""The replay fast path for scheduled jobs decodes and replays exactly what the slow one does.

``SCHEDULE SET`` appends a schedule frame and the job's ``planned`` frame; a ``Scan`` given
a sink hands such pairs to it instead of yielding two entries, and the scheduler's replay
asks ``LogfileStore.load`` for that.  Everything here compares the two ways on the same
bytes: generated logs (hypothesis), damaged ones, and a real file replayed by a scheduler.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from ztick_tw.model import (
    I64_MAX,
    I64_MIN,
    Entry,
    Job,
    JobRemoval,
    JobStatus,
    Pause,
    RunState,
    ScheduleRemoval,
    ScheduleSet,
)
from ztick_tw.scheduler.core import Scheduler
from ztick_tw.scheduler.definitions import Definitions
from ztick_tw.scheduler.recurring import Recurrences, entries
from ztick_tw.store.codec import encode
from ztick_tw.store.logfile import LogfileStore
from ztick_tw.store.scanning import Scan, scan

# Few ids, texts and options, of several byte lengths (non-ASCII included), so the same
# layouts repeat (the fast path's case) and change (its way out).
_ids = st.sampled_from(["a", "j1", "j22", "j333", "é", "job-1", "jöb-2", "long.id.0001"])
_texts = st.sampled_from(
    ["daily", "every 1 hour starting tomorrow 00:01", "every 1 hour starting tomorrow 00:02", ""]
)
_options = st.sampled_from(["tz=UTC limit=0", "tz=Europe/Paris limit=3", "", "été=1"])
_ns = st.integers(-(2**63) + 1, 2**63 - 1)
_status = st.sampled_from(list(JobStatus))


@st.composite
def _pair(draw: st.DrawFn) -> list[Entry]:
    """What SCHEDULE SET writes (mostly), or something close to it that is not a pair."""
    job_id = draw(_ids)
    other = draw(st.sampled_from([job_id, job_id, job_id, draw(_ids)]))
    status = draw(st.sampled_from([JobStatus.PLANNED] * 4 + list(JobStatus)))
    return [
        ScheduleSet(job_id, draw(_texts), draw(_options), draw(_ns)),
        Job(other, draw(_ns), status),
    ]


_single = st.one_of(
    st.builds(Job, _ids, _ns, _status),
    st.builds(ScheduleSet, _ids, _texts, _options, _ns),
    st.builds(RunState, _ids, st.integers(0, 9), _ns, st.integers(1, 4), _ns),
    st.builds(JobRemoval, _ids),
    st.builds(ScheduleRemoval, _ids),
    st.builds(Pause, _ids, st.booleans(), _ns),
).map(lambda entry: [entry])

_logs = st.lists(st.one_of(_pair(), _pair(), _single), max_size=40).map(
    lambda parts: [entry for part in parts for entry in part]
)


def _log(entries: Sequence[Entry]) -> bytes:
    return b"".join(encode(entry) for entry in entries)


def _diverting(data: bytes) -> tuple[list[Entry], Scan, list[str]]:
    """Entries of a scan with a sink, the sink's pairs put back in place as entries.

    Also the id strings the sink was given, to check what it shares.
    """
    out: list[Entry] = []
    ids: list[str] = []

    def sink(job_id: str, text: str, options: str, start_ns: int, execution_ns: int) -> None:
        ids.append(job_id)
        out.append(ScheduleSet(job_id, text, options, start_ns))
        out.append(Job(job_id, execution_ns, JobStatus.PLANNED))

    result = scan(data, scheduled=sink)
    for entry in result:
        out.append(entry)
    return out, result, ids


def _same_scan(data: bytes) -> Scan:
    """Assert both scans of ``data`` give the same entries and end; the diverting one."""
    plain = scan(data)
    expected = list(plain)
    got, diverting, _ids_seen = _diverting(data)
    assert got == expected
    assert [type(e) for e in got] == [type(e) for e in expected]
    assert diverting.good_end == plain.good_end
    assert diverting.problem == plain.problem
    assert diverting.skipped_types == plain.skipped_types
    assert diverting.count + 2 * diverting.diverted == plain.count
    return diverting


@settings(max_examples=300, deadline=None)
@given(_logs)
def test_diverted_pairs_are_exactly_the_entries_of_a_plain_scan(entries: list[Entry]) -> None:
    """A scan with a sink: its entries and pairs, in order, are the plain scan's entries."""
    data = _log(entries)
    _same_scan(data)


@settings(max_examples=300, deadline=None)
@given(_logs, st.data())
def test_damaged_logs_end_the_same_way_with_a_sink(entries: list[Entry], data: Any) -> None:
    """Cut or flipped bytes: the diverting scan stops where, and as, the plain one does."""
    raw = bytearray(_log(entries))
    if raw:
        at = data.draw(st.integers(0, len(raw) - 1))
        if data.draw(st.booleans()):
            raw[at] ^= data.draw(st.integers(1, 255))
        else:
            del raw[at:]
    _same_scan(bytes(raw))


def test_schedule_set_writes_are_diverted_and_share_one_id_string() -> None:
    """SCHEDULE SET's frames, as it writes them, go to the sink: one call and id per job."""
    entries: list[Entry] = []
    for i in range(1000):
        job_id = f"j{i}"
        entries.append(ScheduleSet(job_id, f"every 1 hour starting tomorrow 00:0{i % 10}", "", i))
        entries.append(Job(job_id, i, JobStatus.PLANNED))
    got, result, ids = _diverting(_log(entries))
    assert got == entries
    assert result.diverted == 1000
    assert result.count == 0
    assert ids == [f"j{i}" for i in range(1000)]
    # ten texts: ten string objects, however many jobs use them
    assert len({id(e.text) for e in got if isinstance(e, ScheduleSet)}) == 10


def _state(scheduler: Scheduler) -> dict[str, Any]:
    """Everything a replay builds, in comparable form."""
    return {
        "jobs": list(scheduler.jobs.items()),
        "table": scheduler.jobs.snapshot(),  # packed values: due order and sequence numbers
        "recurrences": scheduler.recurrences.frozen(),
        "attempts": dict(scheduler._attempts),
        "due": dict(scheduler._due),
        "paused": dict(scheduler.paused),
    }


def _replay_both(data: bytes) -> tuple[Any, Any, int]:
    """Replay ``data`` from a list of entries, and from a real logfile (diverting)."""
    slow = Scheduler(Clock(), LogfileStore(Clock(), os.devnull, fsync=False), {})
    slow_summary = slow.replay(list(scan(data)))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "logfile")
        with open(path, "wb") as f:
            f.write(data)
        store = LogfileStore(Clock(), path, fsync=False)
        fast = Scheduler(Clock(), store, {})
        loading = store.load()
        fast_summary = fast.replay(loading)
        store.close()
    return (slow_summary, _state(slow)), (fast_summary, _state(fast)), loading.diverted


@settings(max_examples=150, deadline=None)
@given(_logs)
def test_replay_through_the_logfile_builds_the_same_scheduler(entries: list[Entry]) -> None:
    """A scheduler replaying a logfile (pairs diverted) ends as one replaying the entries."""
    slow, fast, _diverted = _replay_both(_log(entries))
    assert fast == slow


def test_replay_of_scheduled_jobs_diverts_every_pair() -> None:
    """A log of SCHEDULE SETs, with a triggered run and a removal: same state, pairs taken."""
    entries: list[Entry] = []
    for i in range(200):
        job_id = f"job.{i}"
        entries += [
            ScheduleSet(job_id, "every 1 hour", "tz=UTC", 10**18 + i),
            Job(job_id, 10**18 + i, JobStatus.PLANNED),
        ]
    entries += [
        Job("job.5", 10**18 + 5, JobStatus.TRIGGERED),
        Job("job.5", 10**18 + 5, JobStatus.TRIGGERED),  # attempt 2
        ScheduleSet("job.5", "every 1 hour", "tz=UTC", 10**18 + 5),
        Job("job.5", 10**18 + 5, JobStatus.PLANNED),  # a pair: forgets the attempts
        JobRemoval("job.7"),
    ]
    slow, fast, diverted = _replay_both(_log(entries))
    assert fast == slow
    assert diverted == 201
    summary, state = fast
    assert summary.frames == len(entries)
    assert summary.jobs == 199
    assert len(state["recurrences"][0]) == 199


# ------------------------------------------------------------ definitions that share a text


def _iso(ns: int, digits: int) -> str:
    """``ns`` as ``YYYY-MM-DDTHH:MM:SS[.fff...]Z`` with ``digits`` fraction digits (0: none)."""
    seconds, fraction = divmod(ns, 10**9)
    whole = (_EPOCH + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    if not digits:
        return whole + "Z"
    return f"{whole}.{fraction // 10 ** (9 - digits):0{digits}d}Z"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# years 1000-9999, where strftime's %Y has four digits
_starts = st.integers(-30_610_224_000 * 10**9, 253_402_300_799 * 10**9 - 10**9)


@settings(max_examples=500, deadline=None)
@given(
    st.text(max_size=30),
    _starts,
    st.sampled_from([0, 3, 6, 9]),
    st.sampled_from([0, 1, 1000, 10**6, 10**9]),
    st.text(max_size=8),
)
def test_a_definition_gives_back_exactly_the_text_it_was_given(
    prefix: str, start_ns: int, digits: int, off: int, options: str
) -> None:
    """Texts ending with their start, with another instant, or anything: the same text back."""
    text = prefix + _iso(start_ns + off, digits)
    definitions = Definitions(100)
    for candidate in (text, prefix, text + "x", text[:-1]):
        index = definitions.index(candidate, options, start_ns)
        assert definitions.text(index, start_ns) == candidate
        assert definitions.options(index) == options


def test_texts_spelling_out_their_own_start_share_one_definition() -> None:
    """A thousand jobs whose texts differ only by their start: one definition, exact texts."""
    recurrences = Recurrences(lambda: 0)
    load = recurrences.loader()
    base = 1_796_342_400 * 10**9
    texts = {}
    for i in range(1000):
        start = base + i * 1000 + (i % 7) * 10**9
        digits = (0, 3, 6, 9)[i % 4]
        start -= start % 10 ** (9 - digits) if digits else start % 10**9
        texts[f"j{i}"] = (f"every 1 hour starting {_iso(start, digits)}", start)
        load(f"j{i}", texts[f"j{i}"][0], "tz=UTC", start)
    assert len(recurrences._definitions) == 4  # one per form
    for job_id, (text, start) in texts.items():
        rec = recurrences.get(job_id)
        assert rec is not None
        assert rec.definition.text == text
        assert rec.entry == ScheduleSet(job_id, text, "tz=UTC", start)
    compacted = [e for e in entries(recurrences.frozen(), {}) if isinstance(e, ScheduleSet)]
    assert {e.job_id: (e.text, e.start_ns) for e in compacted} == texts


def test_starts_out_of_the_calendar_are_kept_as_plain_texts() -> None:
    """A start outside years 1-9999 cannot be spelled out: the text is kept whole."""
    definitions = Definitions(10)
    for start in (I64_MIN, I64_MAX, -(10**18) * 9):
        text = "every 1 hour starting 2026-12-04T00:00:00.000000000Z"
        index = definitions.index(text, "", start)
        assert definitions.text(index, start) == text
        assert definitions.list[index][2] == 0


def test_equal_options_of_new_schedules_are_stored_once() -> None:
    """Every SET brings its own options string: equal ones end up as one object."""
    definitions = Definitions(100)
    texts = ["daily", "every 1 hour starting 2026-12-04T00:00:00Z", "weekly"]
    indexes = [
        definitions.index(text, "".join(["tz=", "UTC"]), 1_796_342_400 * 10**9) for text in texts
    ]
    assert [definitions.text(i, 1_796_342_400 * 10**9) for i in indexes] == texts
    assert len({id(definitions.options(i)) for i in indexes}) == 1
    assert [definitions.list[i][2] for i in indexes] == [0, 1, 0]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),  # the job's second
            st.integers(0, 2),  # the second its text says
            st.sampled_from([0, 1, 2000, 999_999_999]),  # the job's fraction
            st.sampled_from([0, 1, 2000, 999_999_999]),  # the fraction its text says
            st.sampled_from(["", "x"]),  # the text after the instant
        ),
        max_size=30,
    )
)
def test_jobs_set_in_the_same_second_get_their_own_texts_back(
    jobs: list[tuple[int, int, int, int, str]],
) -> None:
    """The shortcut for a start in the second of the last one still checks every character."""
    definitions = Definitions(1000)
    base = 1_796_342_400
    for second, said_second, fraction, said_fraction, after in jobs:
        start = (base + second) * 10**9 + fraction
        text = "every 1 hour starting " + _iso((base + said_second) * 10**9 + said_fraction, 9)
        text += after
        index = definitions.index(text, "tz=UTC", start)
        assert definitions.text(index, start) == text
        exact = (second, fraction, after) == (said_second, said_fraction, "")
        assert (definitions.list[index][2] == 2) == exact
