"""The ``compaction`` scenario's logfile: jobs x mutations, written with the daemon's codec.

:func:`write_mutated_logfile` writes one rule, then ``mutations`` rounds of one frame per
job (a SET to a new future time; one job in ``FINISHED_EVERY`` ends SET to a past time,
``triggered`` and ``executed`` or ``failed``); :class:`LogContent` says what it wrote.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import DAY_NS, MB, job_ids

#: Frames per job in the ``compaction`` logfile.
MUTATIONS = 10
#: One job in ``FINISHED_EVERY`` ends executed or failed (one in ``FAILED_EVERY`` failed).
FINISHED_EVERY = 10
FAILED_EVERY = 100

_RULE_ID = "rule.all"
_SPAN_NS = 29 * DAY_NS
_PAST_NS = 9 * DAY_NS
_HASH = 2_654_435_761  # Knuth's multiplicative hash: spreads due times without a PRNG


@dataclass(frozen=True, slots=True)
class LogContent:
    """What :func:`write_mutated_logfile` wrote."""

    jobs: int
    mutations: int
    frames: int  # all frames, the rule's included
    planned_frames: int
    triggered_frames: int
    executed_frames: int
    failed_frames: int
    size: int
    planned: int  # jobs planned at the end
    executed: int
    failed: int

    def describe(self) -> str:
        """What is in the file, for the results."""
        return (
            f"1 rule (`{_RULE_ID}` `job.` shell `true`) then {self.mutations} rounds over all"
            f" {self.jobs:,} jobs (`job.0000001`...; round k writes one frame for every job, so"
            f" a job's frames are {self.jobs:,} frames apart): {self.planned_frames:,} planned"
            f" (SET) frames, {self.triggered_frames:,} triggered, {self.executed_frames:,}"
            f" executed and {self.failed_frames:,} failed, {self.frames:,} frames in all"
            f" ({self.size / MB:.0f} MB). Every job is SET to a new due time (spread over"
            f" days 1-30 ahead) in each round, except that one job in {FINISHED_EVERY} is,"
            f" in its last three rounds, SET to a time in the past 1-10 days, triggered and"
            f" then executed (one in {FAILED_EVERY} failed). End state: {self.planned:,}"
            f" planned, {self.executed:,} executed, {self.failed:,} failed; none due during"
            f" the run. Written with ztick_tw.store.codec (encode, encode_job_fields)."
        )


def write_mutated_logfile(path: Path, jobs: int, mutations: int = MUTATIONS) -> LogContent:
    """A logfile of one rule and ``jobs`` x ``mutations`` job frames (see ``LogContent``).

    Round ``k`` (0 to ``mutations - 1``) writes one frame per job, in id order: a SET to
    a new future due time; for every ``FINISHED_EVERY``-th job, the last three rounds are
    instead a SET to a past time, ``triggered`` and ``executed`` (``failed`` for every
    ``FAILED_EVERY``-th job) at that time.
    """
    from ztick_tw.model import Rule, ShellSpec
    from ztick_tw.store.codec import encode, encode_job_fields

    if mutations < 3:
        raise ValueError("at least 3 mutations (the finished jobs need 3 frames)")
    ids = job_ids(1, jobs)
    now = time.time_ns()
    future = now + DAY_NS
    past = [now - DAY_NS - (i * _HASH) % _PAST_NS for i in range(0, jobs, FINISHED_EVERY)]
    counts = [0, 0, 0, 0]  # frames by status
    chunk = 100_000
    with open(path, "wb") as f:
        f.write(encode(Rule(_RULE_ID, "job.", ShellSpec("true"))))
        for k in range(mutations):
            shift = k * 1_000_003 * 7_919
            last = mutations - k  # 3, 2, 1 in the last three rounds
            for lo in range(0, jobs, chunk):
                hi = min(jobs, lo + chunk)
                frames: list[bytes] = []
                for i in range(lo, hi):
                    if last <= 3 and i % FINISHED_EVERY == 0:
                        status = (0, 1, 3 if i % FAILED_EVERY == 0 else 2)[3 - last]
                        frames.append(encode_job_fields(ids[i], past[i // FINISHED_EVERY], status))
                        counts[status] += 1
                    else:
                        due = future + (i * _HASH * 1_000_003 + shift) % _SPAN_NS
                        frames.append(encode_job_fields(ids[i], due, 0))
                        counts[0] += 1
                f.write(b"".join(frames))
    finished = len(past)
    failed = len(range(0, jobs, FAILED_EVERY))
    return LogContent(
        jobs=jobs,
        mutations=mutations,
        frames=1 + jobs * mutations,
        planned_frames=counts[0],
        triggered_frames=counts[1],
        executed_frames=counts[2],
        failed_frames=counts[3],
        size=path.stat().st_size,
        planned=jobs - finished,
        executed=finished - failed,
        failed=failed,
    )
