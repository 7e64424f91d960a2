"""What the run history hands out: ``RunRecord`` and ``RunHandle``.

``RunRecord`` is one run read back; ``RunHandle`` a run in progress, between
``History.begin`` and ``History.finish``.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FINISHED", "OUTCOMES", "RunHandle", "RunRecord"]

FINISHED = frozenset({"executed", "failed", "timeout", "cancelled"})
"""The outcomes ``History.finish`` takes."""

OUTCOMES = FINISHED | {"skipped", "running"}
"""Every outcome a ``RunRecord`` may carry (SPEC §9 HISTORY)."""


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One entry of a job's history, as ``History.read`` returns it (SPEC §9 HISTORY).

    ``started_ns``/``ended_ns`` are ``None`` for a ``skipped`` entry, ``ended_ns`` and
    ``exit_code`` are ``None`` while ``running`` (and after a crash: see ``History.open``).
    ``attempt`` is 0 for a ``skipped`` entry.  ``output`` is the tail kept (``output_bytes``).
    """

    run: int
    due_ns: int
    started_ns: int | None
    ended_ns: int | None
    outcome: str
    attempt: int
    exit_code: int | None
    detail: str
    output: bytes


class RunHandle:
    """A run begun with ``History.begin``; give it back to ``History.finish``.

    ``run`` is the run number, set by the writer thread once the begin is written
    (``None`` before that, and for ever when the begin was dropped: ``dropped``).
    The other attributes belong to the history; callers only read ``job_id`` and ``run``.
    """

    __slots__ = ("attempt", "dropped", "due_ns", "job_id", "merged", "result", "run", "started_ns")

    def __init__(self, job_id: str, due_ns: int, started_ns: int, attempt: int) -> None:
        self.job_id = job_id
        self.due_ns = due_ns
        self.started_ns = started_ns
        self.attempt = attempt
        self.run: int | None = None
        #: (ended_ns, outcome, exit_code, detail, output), set at once by ``finish``.
        self.result: tuple[int, str, int | None, str, bytes] | None = None
        #: The begin was written with the result already in it: the finish has nothing to do.
        self.merged = False
        #: Neither the begin nor the finish is written (queue full, or history closed).
        self.dropped = False

    def __repr__(self) -> str:
        return f"<RunHandle {self.job_id!r} run={self.run} attempt={self.attempt}>"
