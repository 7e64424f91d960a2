"""Tests for ``ztick_tw.scheduler.timers.TimerSet``: one DelayedCall for the earliest job."""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.logger import Logger

from tests.helpers import EPOCH_NS, SECOND_NS, EventLog, make_clock
from ztick_tw.scheduler.jobs import JobTable
from ztick_tw.scheduler.timers import DUE_TOLERANCE_NS, TimerSet, now_ns


class Recorder:
    """An ``on_due`` that takes every due job from the table and records it."""

    def __init__(self, table: JobTable, clock: Clock) -> None:
        self.table = table
        self.clock = clock
        self.fired: list[tuple[str, float]] = []  # (job id, clock seconds when fired)
        self.wakes: list[int] = []

    def __call__(self, now: int) -> None:
        self.wakes.append(now)
        for job_id, _, _ in self.table.pop_due(now, 10**9):
            self.fired.append((job_id, self.clock.seconds()))

    @property
    def ids(self) -> list[str]:
        return [j for j, _ in self.fired]


def setup() -> tuple[Clock, JobTable, Recorder, TimerSet]:
    """A started ``TimerSet`` over an empty table on a clock at the test epoch."""
    clock = make_clock()
    table = JobTable()
    recorder = Recorder(table, clock)
    timers = TimerSet(clock, table, recorder)
    timers.start()
    return clock, table, recorder, timers


def add(table: JobTable, timers: TimerSet, job_id: str, ns: int) -> None:
    """What the scheduler does on SET: store the job and tell the timers."""
    table.set(job_id, ns)
    timers.note_due(ns)


def test_now_ns_is_reactor_time_in_ns() -> None:
    """``now_ns`` converts the reactor's float seconds to integer nanoseconds."""
    clock = make_clock()
    assert now_ns(clock) == EPOCH_NS
    clock.advance(1.5)
    assert now_ns(clock) == EPOCH_NS + 1_500_000_000


def test_idle_timer_has_no_call() -> None:
    """With nothing planned, no DelayedCall is pending."""
    clock, _, _, timers = setup()
    assert clock.getDelayedCalls() == []
    assert timers.armed_ns is None


def test_nothing_fires_before_start() -> None:
    """Before ``start`` no call is armed even if jobs are due."""
    clock = make_clock()
    table = JobTable()
    recorder = Recorder(table, clock)
    timers = TimerSet(clock, table, recorder)
    add(table, timers, "a", EPOCH_NS - 1)
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert recorder.fired == []
    timers.start()
    clock.advance(0)
    assert recorder.ids == ["a"]


def test_job_fires_at_its_time() -> None:
    """A job fires when the clock reaches its time, not before."""
    clock, table, recorder, timers = setup()
    add(table, timers, "a", EPOCH_NS + 10 * SECOND_NS)
    assert timers.armed_ns == EPOCH_NS + 10 * SECOND_NS
    clock.advance(9.999)
    assert recorder.fired == []
    clock.advance(0.001)
    assert recorder.ids == ["a"]
    assert clock.getDelayedCalls() == []
    assert timers.armed_ns is None


def test_job_in_the_past_fires_on_next_advance_zero() -> None:
    """A job set in the past fires on the next ``clock.advance(0)``."""
    clock, table, recorder, timers = setup()
    add(table, timers, "old", EPOCH_NS - 3600 * SECOND_NS)
    assert recorder.fired == []
    clock.advance(0)
    assert recorder.ids == ["old"]


def test_only_one_delayed_call_ever() -> None:
    """However many jobs are set, only one DelayedCall is pending, for the earliest."""
    clock, table, _, timers = setup()
    for i in range(50):
        add(table, timers, f"j{i}", EPOCH_NS + (100 - i) * SECOND_NS)
        assert len(clock.getDelayedCalls()) == 1
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == EPOCH_NS / 1e9 + 51


def test_reset_earlier_rearms_sooner() -> None:
    """Re-setting a job earlier moves the single call sooner."""
    clock, table, recorder, timers = setup()
    add(table, timers, "a", EPOCH_NS + 60 * SECOND_NS)
    add(table, timers, "a", EPOCH_NS + 5 * SECOND_NS)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(5)
    assert recorder.ids == ["a"]
    assert clock.getDelayedCalls() == []


def test_later_job_does_not_move_call() -> None:
    """A job later than the armed time leaves the pending call alone."""
    clock, table, _, timers = setup()
    add(table, timers, "a", EPOCH_NS + 5 * SECOND_NS)
    (call,) = clock.getDelayedCalls()
    add(table, timers, "b", EPOCH_NS + 50 * SECOND_NS)
    assert clock.getDelayedCalls() == [call]
    assert timers.armed_ns == EPOCH_NS + 5 * SECOND_NS


def test_remove_earliest_then_wake_rearms_for_next() -> None:
    """After the earliest job is removed, the wake finds nothing and re-arms for the next."""
    clock, table, recorder, timers = setup()
    add(table, timers, "a", EPOCH_NS + 5 * SECOND_NS)
    add(table, timers, "b", EPOCH_NS + 20 * SECOND_NS)
    table.remove("a")
    clock.advance(5)
    assert recorder.fired == []
    assert len(recorder.wakes) == 1
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == EPOCH_NS / 1e9 + 20
    clock.advance(15)
    assert recorder.ids == ["b"]


def test_reset_earliest_later_then_wake_rearms() -> None:
    """Re-setting the earliest job later: the old wake fires nothing, the job fires later."""
    clock, table, recorder, timers = setup()
    add(table, timers, "a", EPOCH_NS + 5 * SECOND_NS)
    add(table, timers, "a", EPOCH_NS + 30 * SECOND_NS)
    clock.advance(5)
    assert recorder.fired == []
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(25)
    assert recorder.ids == ["a"]


def test_same_instant_fires_in_set_order() -> None:
    """Many jobs due at the same instant fire in the order they were set, in one wake."""
    clock, table, recorder, timers = setup()
    names = [f"n{(i * 7919) % 1000}" for i in range(1000)]
    for name in names:
        add(table, timers, name, EPOCH_NS + 2 * SECOND_NS)
    clock.advance(2)
    assert recorder.ids == names
    assert len(recorder.wakes) == 1
    assert clock.getDelayedCalls() == []


def test_jobs_fire_in_time_order_each_at_its_time() -> None:
    """Jobs at different times fire in time order, each when its time comes."""
    clock, table, recorder, timers = setup()
    for name, offset in [("c", 3), ("a", 1), ("b", 2)]:
        add(table, timers, name, EPOCH_NS + offset * SECOND_NS)
    clock.pump([1, 1, 1])
    assert recorder.fired == [
        ("a", EPOCH_NS / 1e9 + 1),
        ("b", EPOCH_NS / 1e9 + 2),
        ("c", EPOCH_NS / 1e9 + 3),
    ]


def test_sub_microsecond_due_time_fires() -> None:
    """Float rounding of the clock does not stop a job with an odd ns time from firing."""
    clock, table, recorder, timers = setup()
    add(table, timers, "odd", EPOCH_NS + 1_234_567_891)
    clock.advance(1.234567891)
    assert recorder.ids == ["odd"]
    assert recorder.wakes[0] >= EPOCH_NS + 1_234_567_891 - DUE_TOLERANCE_NS


def test_stop_cancels_and_note_due_is_ignored() -> None:
    """``stop`` cancels the pending call; nothing is armed or fired afterwards."""
    clock, table, recorder, timers = setup()
    add(table, timers, "a", EPOCH_NS + SECOND_NS)
    timers.stop()
    assert clock.getDelayedCalls() == []
    assert timers.armed_ns is None
    add(table, timers, "b", EPOCH_NS)
    timers.rearm()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert recorder.fired == []


def test_rearm_with_empty_table_cancels() -> None:
    """``rearm`` when nothing is planned cancels the pending call."""
    clock, table, _, timers = setup()
    add(table, timers, "a", EPOCH_NS + SECOND_NS)
    table.remove("a")
    timers.rearm()
    assert clock.getDelayedCalls() == []
    assert timers.armed_ns is None


def test_on_due_exception_does_not_stop_the_timer() -> None:
    """If ``on_due`` raises, the error is logged and the timer re-arms for later jobs."""
    clock = make_clock()
    table = JobTable()
    calls: list[int] = []

    def on_due(now: int) -> None:
        calls.append(now)
        table.pop_due(now, 10**9)
        if len(calls) == 1:
            raise RuntimeError("boom")

    log = EventLog()
    timers = TimerSet(clock, table, on_due)
    timers.log = Logger(observer=log)
    timers.start()
    add(table, timers, "a", EPOCH_NS + SECOND_NS)
    add(table, timers, "b", EPOCH_NS + 2 * SECOND_NS)
    clock.advance(1)
    assert len(calls) == 1
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(1)
    assert len(calls) == 2
    assert table.next_due() is None
    (failure,) = log.failures()
    assert failure.type is RuntimeError


class SpyClock(Clock):
    """A ``Clock`` that records the delay of every ``callLater``."""

    def __init__(self) -> None:
        super().__init__()
        self.delays: list[float] = []

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall:
        """Record ``delay`` and schedule as ``Clock`` does."""
        self.delays.append(delay)
        return super().callLater(delay, callable, *args, **kw)


def test_partial_batch_rearms_immediately() -> None:
    """If ``on_due`` leaves due jobs (a batch limit), the timer re-arms with no delay."""
    clock = SpyClock()
    clock.advance(EPOCH_NS / 1e9)
    table = JobTable()
    batches: list[list[str]] = []

    def on_due(now: int) -> None:
        batches.append([j for j, _, _ in table.pop_due(now, 2)])

    timers = TimerSet(clock, table, on_due)
    timers.start()
    for i in range(5):
        add(table, timers, f"j{i}", EPOCH_NS)
    assert clock.delays == [0.0]
    clock.advance(0)
    assert batches == [["j0", "j1"], ["j2", "j3"], ["j4"]]
    assert clock.delays == [0.0, 0.0, 0.0]
    assert clock.getDelayedCalls() == []
