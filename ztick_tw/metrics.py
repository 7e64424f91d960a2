"""The metrics hooks the scheduler, the store and compaction call (SPEC §10).

The hooks call a ``Metrics`` object; this base does nothing and ``NO_METRICS`` is the
default of every hook's owner (``on`` is False, so the hot paths skip even reading the
clock): nothing changes when metrics are off.  ``SET`` never touches metrics.  The
Prometheus implementation, its scrape-time counts and ``/metrics`` are
``ztick_tw/prometheus.py``.
"""

from __future__ import annotations

__all__ = ["NO_METRICS", "Metrics"]


class Metrics:
    """What the hooks call.  This base does nothing: metrics off.

    ``on`` tells a hook whether to bother measuring (reading a clock) at all.  Times are
    nanoseconds (ints, as the scheduler keeps them) except ``fsync`` and ``compaction``,
    whose callers have seconds at hand.
    """

    on = False

    def run_ended(self, runner: str, word: str, duration_ns: int) -> None:
        """A run ended: ``runner`` kind, the scheduler's ``word``, how long it ran."""

    def trigger_lag(self, lag_ns: int) -> None:
        """A run started ``lag_ns`` after its due time."""

    def fsync(self, seconds: float) -> None:
        """One fsync of the logfile took ``seconds``."""

    def compaction(self, result: str, seconds: float) -> None:
        """A compaction ended (``success`` or ``failure``) after ``seconds``."""


#: The default of every hook's owner: metrics off.
NO_METRICS = Metrics()
