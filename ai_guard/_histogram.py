"""A latency histogram with a known error bound: log-linear buckets, HDR-style.

Percentiles come from bucket counts, never from sorting samples, so memory is fixed
(one counter per bucket) however many latencies are recorded.

Layout, in milliseconds:

- bucket ``0`` (:data:`UNDERFLOW`) holds ``[0, LOWEST_MS)``, where ``LOWEST_MS`` is
  2^-6 ms (15.6 µs); it reports as ``0.0``;
- buckets ``1 .. REGULAR_BUCKETS`` split every power of two ``[2^e, 2^(e+1))`` for
  ``e`` in ``[-6, 22)`` into 64 sub-buckets of equal width (2^e / 64);
- the last bucket (:data:`OVERFLOW`) holds ``[HIGHEST_MS, inf)``, where ``HIGHEST_MS`` is
  2^22 ms (about 69.9 minutes); it reports as ``HIGHEST_MS`` and its count is reported
  separately so that clamped values are never silent.

A value inside ``[LOWEST_MS, HIGHEST_MS)`` is reported as the midpoint of its bucket, so
the relative error of any percentile is at most half a bucket's width over the bucket's
lower edge: ``1 / (2 * 64)`` = :data:`RELATIVE_ERROR` (0.78 %). 1,794 buckets cover
eight orders of magnitude.

Percentiles use the nearest-rank definition: ``p`` is the smallest recorded value (up to
the bucket error) such that at least ``p`` of the samples are at or below it.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from itertools import accumulate
from operator import add

__all__ = [
    "BUCKET_COUNT",
    "HIGHEST_MS",
    "LOWEST_MS",
    "OVERFLOW",
    "RELATIVE_ERROR",
    "SUB_BUCKETS",
    "UNDERFLOW",
    "LatencyHistogram",
    "bucket_bounds",
    "bucket_index",
    "bucket_value",
    "buckets_below",
    "first_bucket_at_or_above",
    "quantiles",
]

#: Sub-buckets per power of two (a power of two, so the index is a shift and a multiply).
SUB_BUCKETS = 64
MIN_EXPONENT = -6
MAX_EXPONENT = 22
#: Smallest value that gets a regular bucket (2^-6 ms = 15.6 µs).
LOWEST_MS = 2.0**MIN_EXPONENT
#: Values at or above this (2^22 ms, about 69.9 minutes) clamp into the overflow bucket.
HIGHEST_MS = 2.0**MAX_EXPONENT
REGULAR_BUCKETS = (MAX_EXPONENT - MIN_EXPONENT) * SUB_BUCKETS
UNDERFLOW = 0
OVERFLOW = REGULAR_BUCKETS + 1
BUCKET_COUNT = REGULAR_BUCKETS + 2
#: Largest relative error of a reported value inside ``[LOWEST_MS, HIGHEST_MS)``.
RELATIVE_ERROR = 1.0 / (2 * SUB_BUCKETS)

# frexp(v) = (m, e) with m in [0.5, 1): v lies in octave e - 1, sub-bucket int(128 m) - 64.
# Folding the constants gives index = e * 64 + int(128 m) - INDEX_OFFSET (the hot path of
# the collector inlines exactly this).
INDEX_OFFSET = (MIN_EXPONENT + 2) * SUB_BUCKETS - 1
MANTISSA_SCALE = 2.0 * SUB_BUCKETS
SUB_BUCKET_BITS = 6
assert 1 << SUB_BUCKET_BITS == SUB_BUCKETS


def bucket_index(value_ms: float) -> int:
    """The bucket of a finite, non-negative latency in milliseconds."""
    if value_ms < LOWEST_MS:
        return UNDERFLOW
    mantissa, exponent = math.frexp(value_ms)
    index = (exponent << SUB_BUCKET_BITS) + int(mantissa * MANTISSA_SCALE) - INDEX_OFFSET
    return index if index <= REGULAR_BUCKETS else OVERFLOW


def bucket_bounds(index: int) -> tuple[float, float]:
    """``(lower, upper)`` edges in ms of bucket ``index``: it holds ``lower <= v < upper``."""
    if index == UNDERFLOW:
        return 0.0, LOWEST_MS
    if index == OVERFLOW:
        return HIGHEST_MS, math.inf
    if not 0 < index < OVERFLOW:
        raise IndexError(f"bucket {index} outside 0..{OVERFLOW}")
    octave, sub = divmod(index - 1, SUB_BUCKETS)
    base = 2.0 ** (MIN_EXPONENT + octave)
    return base * (1 + sub / SUB_BUCKETS), base * (1 + (sub + 1) / SUB_BUCKETS)


def bucket_value(index: int) -> float:
    """The value reported for bucket ``index``: its midpoint (0 for underflow, the range's
    upper end for overflow)."""
    if index == UNDERFLOW:
        return 0.0
    if index == OVERFLOW:
        return HIGHEST_MS
    lower, upper = bucket_bounds(index)
    return (lower + upper) / 2


_VALUES: tuple[float, ...] = tuple(bucket_value(i) for i in range(BUCKET_COUNT))
_LOWER_EDGES: tuple[float, ...] = tuple(bucket_bounds(i)[0] for i in range(BUCKET_COUNT))
_UPPER_EDGES: tuple[float, ...] = tuple(bucket_bounds(i)[1] for i in range(BUCKET_COUNT))


def first_bucket_at_or_above(threshold_ms: float) -> int:
    """Index of the first bucket whose lower edge is ``>= threshold_ms``.

    ``sum(counts[k:])`` then counts the values certainly above the threshold (give or take
    the one bucket that straddles it, which is counted below): how the SLO burn rates
    count slow calls.
    """
    return bisect_left(_LOWER_EDGES, threshold_ms)


def buckets_below(edge_ms: float) -> int:
    """How many leading buckets lie entirely at or below ``edge_ms`` (upper edge
    ``<= edge_ms``): ``sum(counts[:k])`` is a cumulative count for a Prometheus ``le``.

    The bucket straddling ``edge_ms`` counts toward the next edge, so a cumulative count
    is short by at most one bucket (width ``<= edge_ms / 64``), never over.
    """
    return bisect_left(_UPPER_EDGES, edge_ms + edge_ms * 1e-12)


def _rank(q: float, total: int) -> int:
    # round() first: 0.95 * 100 is 95.00000000000001 in binary floating point.
    return max(1, math.ceil(round(q * total, 6)))


def quantiles(counts: Sequence[int], qs: Iterable[float]) -> list[float | None]:
    """Nearest-rank quantiles (``q`` in ``[0, 1]``) of the values counted in ``counts``;
    ``None`` for each when the histogram is empty."""
    qs = list(qs)
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q!r} is outside [0, 1]")
    cumulative = list(accumulate(counts))
    total = cumulative[-1] if cumulative else 0
    if total <= 0:
        return [None] * len(qs)
    return [_VALUES[bisect_left(cumulative, _rank(q, total))] for q in qs]


def add_counts(target: list[int], source: Sequence[int]) -> list[int]:
    """``target + source`` element-wise, as a new list (C-speed ``map``)."""
    return list(map(add, target, source))


class LatencyHistogram:
    """A standalone latency histogram (milliseconds) with the bounds documented above.

    Not thread-safe by itself: the metrics collector keeps its own buckets under its lock.
    Handy in tests and scripts::

        hist = LatencyHistogram()
        for latency in samples:
            hist.record(latency)
        hist.quantile(0.95)          # within 0.78 % of the exact p95
    """

    __slots__ = ("counts",)

    def __init__(self, counts: Iterable[int] | None = None) -> None:
        self.counts = array("Q", bytes(8 * BUCKET_COUNT))
        if counts is not None:
            values = list(counts)
            if len(values) != BUCKET_COUNT:
                raise ValueError(f"expected {BUCKET_COUNT} bucket counts, got {len(values)}")
            self.counts = array("Q", values)

    def record(self, value_ms: float, count: int = 1) -> None:
        """Count ``value_ms`` (finite, ``>= 0``) ``count`` times."""
        if not 0.0 <= value_ms < math.inf:
            raise ValueError(f"latency must be a finite number >= 0, got {value_ms!r}")
        self.counts[bucket_index(value_ms)] += count

    @property
    def count(self) -> int:
        """How many values were recorded."""
        return sum(self.counts)

    @property
    def overflow(self) -> int:
        """How many values were at or above :data:`HIGHEST_MS` (reported as it)."""
        return self.counts[OVERFLOW]

    @property
    def underflow(self) -> int:
        """How many values were below :data:`LOWEST_MS` (reported as 0)."""
        return self.counts[UNDERFLOW]

    def quantile(self, q: float) -> float | None:
        """The nearest-rank ``q`` quantile, ``None`` when empty."""
        return quantiles(self.counts, (q,))[0]

    def quantiles(self, qs: Iterable[float]) -> list[float | None]:
        """Several quantiles in one pass."""
        return quantiles(self.counts, qs)

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s counts to this histogram."""
        for index, value in enumerate(other.counts):
            if value:
                self.counts[index] += value

    def __repr__(self) -> str:
        return f"LatencyHistogram(count={self.count})"
