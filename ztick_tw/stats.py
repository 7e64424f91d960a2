"""Trigger lag: how late runners start compared with their jobs' due times."""

from __future__ import annotations

from array import array


class LagWindow:
    """The most recent ``size`` trigger lags, in microseconds, with percentiles.

    A fixed ring buffer: recording is O(1) and memory does not grow; percentiles sort
    a copy of the window, which is only done when STAT asks.
    """

    def __init__(self, size: int = 4096) -> None:
        if size < 1:
            raise ValueError("window size must be at least 1")
        self._size = size
        self._samples = array("q")
        self._next = 0

    def __len__(self) -> int:
        return len(self._samples)

    def record(self, lag_us: int) -> None:
        """Add one lag sample (negative values, from clock rounding, count as 0)."""
        if lag_us < 0:
            lag_us = 0
        if len(self._samples) < self._size:
            self._samples.append(lag_us)
        else:
            self._samples[self._next] = lag_us
            self._next = (self._next + 1) % self._size

    def percentile(self, fraction: float) -> int:
        """The ``fraction`` (0-1) percentile of the window, nearest-rank; 0 when empty."""
        return self.percentiles(fraction)[0]

    def percentiles(self, *fractions: float) -> list[int]:
        """Several percentiles (see ``percentile``) from one sort of the window."""
        if not self._samples:
            return [0] * len(fractions)
        ordered = sorted(self._samples)
        size = len(ordered)
        out = []
        for fraction in fractions:
            rank = max(1, -(-int(fraction * 1_000_000) * size // 1_000_000))
            out.append(ordered[min(rank, size) - 1])
        return out

    def maximum(self) -> int:
        """The largest lag in the window; 0 when empty."""
        return max(self._samples) if self._samples else 0
