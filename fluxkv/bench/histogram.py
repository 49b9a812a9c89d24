"""A log-linear latency histogram for fluxkv-bench, in the spirit of HdrHistogram.

Values are non-negative integers (nanoseconds). Below 256 each value has its
own bucket; above, every power of two is split into 128 equal buckets, so a
bucket is at most 1/128 of its lower bound wide. Percentiles answer the middle
of the bucket that holds the sample of that rank: within 1/256 (0.4%) of the
sample's exact value, and exact below 256. Recording is O(1) and memory is
fixed (7,296 counters), whatever the number of samples; nothing is sorted.
"""

from __future__ import annotations

import math
from typing import Any

SUB_BITS = 7  # 2**7 = 128 buckets per power of two
RELATIVE_ERROR = 1 / 2 ** (SUB_BITS + 1)


def _index(value: int) -> int:
    shift = max(0, value.bit_length() - SUB_BITS - 1)
    return (shift << SUB_BITS) + (value >> shift)


BUCKETS = _index(2**63 - 1) + 1


def _bounds(index: int) -> tuple[int, int]:
    """The lowest and highest value of bucket `index`."""
    shift = max(0, (index >> SUB_BITS) - 1)
    mantissa = index - (shift << SUB_BITS)
    return mantissa << shift, ((mantissa + 1) << shift) - 1


class Histogram:
    """Counts of values by bucket, with the exact count, sum, min and max."""

    def __init__(self) -> None:
        self.counts = [0] * BUCKETS
        self.total = 0
        self.sum = 0
        self.min = 0
        self.max = 0

    def record(self, value: int) -> None:
        shift = value.bit_length() - SUB_BITS - 1
        if shift < 0:
            shift = 0
        self.counts[(shift << SUB_BITS) + (value >> shift)] += 1
        if not self.total or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.total += 1
        self.sum += value

    def merge(self, other: Histogram) -> None:
        if not other.total:
            return
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.min = min(self.min, other.min) if self.total else other.min
        self.max = max(self.max, other.max)
        self.total += other.total
        self.sum += other.sum

    def mean(self) -> float:
        return self.sum / self.total if self.total else math.nan

    def percentile(self, p: float) -> float:
        """The value at or below which `p` percent of the samples lie (NaN when empty)."""
        if not self.total:
            return math.nan
        rank = max(1, math.ceil(p / 100 * self.total))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                low, high = _bounds(index)
                return min(max((low + high) / 2, self.min), self.max)
        return float(self.max)

    def to_dict(self) -> dict[str, Any]:
        """A compact, picklable form (non-empty buckets only), for another process."""
        buckets = {i: c for i, c in enumerate(self.counts) if c}
        return {"buckets": buckets, "total": self.total, "sum": self.sum, "min": self.min, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        hist = cls()
        for index, count in data["buckets"].items():
            hist.counts[index] = count
        hist.total, hist.sum, hist.min, hist.max = data["total"], data["sum"], data["min"], data["max"]
        return hist
