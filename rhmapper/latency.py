"""Durations in a fixed number of log-spaced buckets: percentiles of millions of calls in a few
kilobytes, O(1) to record, without Ray."""

from __future__ import annotations

import math

_STEPS_PER_DOUBLING = 8
"""Buckets per doubling of the duration: a percentile (a bucket's geometric middle) is off by
at most 2**(1/16) - 1 = 4.4 %."""
_SMALLEST = 1e-6
"""Durations below a microsecond count as one (the first bucket)."""
_BUCKETS = 8 * 40
"""Up to 2**40 microseconds (12 days); longer ones count in the last bucket."""


class LatencySketch:
    """Counts of durations by log-spaced bucket, for percentiles.

    Examples:
        >>> sketch = LatencySketch()
        >>> for seconds in (0.010, 0.011, 0.012, 2.0):
        ...     sketch.add(seconds)
        >>> sketch.count, round(sketch.quantile(0.5), 3), round(sketch.quantile(0.99), 1)
        (4, 0.011, 2.0)
        >>> LatencySketch().quantile(0.5) is None
        True
    """

    __slots__ = ("counts", "count", "total_seconds")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.count = 0
        self.total_seconds = 0.0

    def add(self, seconds: float, times: int = 1) -> None:
        """Count ``times`` durations of ``seconds`` each."""
        self.counts[_bucket(seconds)] += times
        self.count += times
        self.total_seconds += seconds * times

    def quantile(self, share: float) -> float | None:
        """The duration below which ``share`` (0 to 1) of those counted fall, to within 5 %;
        ``None`` when none was counted."""
        if not self.count:
            return None
        rank = share * self.count
        seen = 0
        for bucket, count in enumerate(self.counts):
            seen += count
            if count and seen >= rank:
                return _middle(bucket)
        return _middle(_BUCKETS - 1)


def _bucket(seconds: float) -> int:
    if seconds <= _SMALLEST:
        return 0
    return min(_BUCKETS - 1, int(math.log2(seconds / _SMALLEST) * _STEPS_PER_DOUBLING))


def _middle(bucket: int) -> float:
    """The geometric middle of ``bucket``'s durations."""
    return _SMALLEST * 2 ** ((bucket + 0.5) / _STEPS_PER_DOUBLING)
