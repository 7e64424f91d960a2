"""Tests for ``ztick_tw.stats.LagWindow``: the trigger-lag ring buffer and percentiles."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztick_tw.stats import LagWindow


def nearest_rank(samples: list[int], fraction: float) -> int:
    """Textbook nearest-rank percentile: the ceil(p*n)-th smallest value (at least 1st)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(round(fraction * len(ordered), 9)))
    return ordered[rank - 1]


def test_empty_window_reports_zero() -> None:
    """With no samples, every percentile and the maximum are 0."""
    window = LagWindow()
    assert len(window) == 0
    assert window.percentile(0.5) == 0
    assert window.percentile(0.99) == 0
    assert window.maximum() == 0


def test_size_must_be_positive() -> None:
    """A window of fewer than one sample is refused."""
    with pytest.raises(ValueError, match="at least 1"):
        LagWindow(0)


def test_percentiles_nearest_rank() -> None:
    """p50/p99/max of 1..100 are 50, 99 and 100 (nearest rank)."""
    window = LagWindow()
    for v in range(100, 0, -1):
        window.record(v)
    assert window.percentile(0.5) == 50
    assert window.percentile(0.99) == 99
    assert window.percentile(1.0) == 100
    assert window.percentile(0.0) == 1
    assert window.maximum() == 100


def test_single_sample() -> None:
    """One sample is every percentile."""
    window = LagWindow()
    window.record(7)
    assert window.percentile(0.5) == 7
    assert window.percentile(0.99) == 7
    assert window.maximum() == 7


def test_negative_lag_counts_as_zero() -> None:
    """A negative lag (clock rounding) is recorded as 0."""
    window = LagWindow()
    window.record(-5)
    window.record(3)
    assert window.maximum() == 3
    assert window.percentile(0.5) == 0


def test_window_keeps_only_the_most_recent_samples() -> None:
    """Past ``size`` samples the oldest are overwritten and memory stays bounded."""
    window = LagWindow(size=3)
    for v in [1000, 1, 2, 3]:
        window.record(v)
    assert len(window) == 3
    assert window.maximum() == 3  # 1000 was overwritten
    for v in [10, 20]:
        window.record(v)
    assert len(window) == 3
    assert window.maximum() == 20
    assert window.percentile(0.5) == 10  # window is {3, 10, 20}


@given(
    st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=300),
    st.integers(min_value=1, max_value=50),
    st.sampled_from([0.5, 0.9, 0.99, 0.999, 1.0]),
)
def test_matches_reference(samples: list[int], size: int, fraction: float) -> None:
    """Percentile and maximum equal nearest rank over the last ``size`` samples."""
    window = LagWindow(size)
    for v in samples:
        window.record(v)
    recent = samples[-size:]
    assert len(window) == len(recent)
    assert window.percentile(fraction) == nearest_rank(recent, fraction)
    assert window.maximum() == max(recent)


def test_percentiles_from_one_sort_match_single_percentiles() -> None:
    """``percentiles`` gives what ``percentile`` gives for each fraction (0s when empty)."""
    window = LagWindow(size=100)
    assert window.percentiles(0.5, 0.99) == [0, 0]
    for lag in [7, 3, 90, 15, 1, 42, 8]:
        window.record(lag)
    assert window.percentiles(0.5, 0.99, 1.0) == [
        window.percentile(0.5),
        window.percentile(0.99),
        window.percentile(1.0),
    ]
    assert window.percentiles(0.5, 1.0) == [8, 90]
