"""``ztick_tw.runners.deadlines.Deadlines``: earliest deadline, expiry, bulk pruning."""

from __future__ import annotations

from dataclasses import dataclass

from ztick_tw.runners.deadlines import PRUNE_MIN, Deadlines


@dataclass
class Job:
    name: str
    done: bool = False


def test_earliest_skips_finished_jobs() -> None:
    """The earliest deadline is that of a job not done yet."""
    d: Deadlines[Job] = Deadlines()
    a, b = Job("a"), Job("b")
    d.push(2.0, b)
    d.push(1.0, a)
    assert d.earliest() == 1.0
    a.done = True
    assert d.earliest() == 2.0
    b.done = True
    assert d.earliest() is None


def test_pop_expired_takes_only_live_jobs_due_by_now() -> None:
    """Jobs due at or before ``now`` come out in deadline order; finished ones never."""
    d: Deadlines[Job] = Deadlines()
    jobs = [Job(str(i)) for i in range(5)]
    for i, job in enumerate(jobs):
        d.push(float(i), job)
    jobs[1].done = True
    assert [j.name for j in d.pop_expired(2.0)] == ["0", "2"]
    assert d.earliest() == 3.0


def test_finished_jobs_do_not_pile_up() -> None:
    """At a steady rate of short jobs with a long timeout the heap stays near the live count.

    Without pruning, 100,000 finished jobs would wait in it until their deadline.
    """
    d: Deadlines[Job] = Deadlines()
    live: list[Job] = []
    for i in range(100_000):
        job = Job(str(i))
        d.push(30.0 + i * 0.0002, job)
        live.append(job)
        if len(live) > 10:
            live.pop(0).done = True
    assert len(d) <= max(PRUNE_MIN, 4 * 10)
    assert d.earliest() == 30.0 + (100_000 - 10) * 0.0002
