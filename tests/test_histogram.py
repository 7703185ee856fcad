"""The latency histogram: bucket layout, the documented error bound, percentiles."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from ai_guard._histogram import (
    BUCKET_COUNT,
    HIGHEST_MS,
    LOWEST_MS,
    OVERFLOW,
    RELATIVE_ERROR,
    UNDERFLOW,
    LatencyHistogram,
    bucket_bounds,
    bucket_index,
    bucket_value,
    buckets_below,
    first_bucket_at_or_above,
    quantiles,
)


def _log_uniform(rng: random.Random, n: int) -> list[float]:
    low, high = math.log(LOWEST_MS), math.log(HIGHEST_MS)
    return [math.exp(rng.uniform(low, high)) for _ in range(n)]


def test_every_value_falls_inside_its_bucket() -> None:
    rng = random.Random(1)
    for value in [*_log_uniform(rng, 20_000), LOWEST_MS, 1.0, 1200.0, 2500.0]:
        lower, upper = bucket_bounds(bucket_index(value))
        assert lower <= value < upper


def test_reported_value_is_within_the_documented_relative_error() -> None:
    assert pytest.approx(1 / 128) == RELATIVE_ERROR
    rng = random.Random(2)
    worst = 0.0
    for value in _log_uniform(rng, 50_000):
        worst = max(worst, abs(bucket_value(bucket_index(value)) - value) / value)
    assert worst <= RELATIVE_ERROR
    # The bound is tight: the worst case sits at the bottom of an octave.
    assert worst > RELATIVE_ERROR * 0.9


def test_buckets_tile_the_range_without_gaps() -> None:
    assert bucket_bounds(UNDERFLOW) == (0.0, LOWEST_MS)
    assert bucket_bounds(OVERFLOW) == (HIGHEST_MS, math.inf)
    for index in range(BUCKET_COUNT - 1):
        assert bucket_bounds(index)[1] == bucket_bounds(index + 1)[0]
    with pytest.raises(IndexError):
        bucket_bounds(BUCKET_COUNT)


def test_values_below_the_range_report_zero_and_beyond_it_clamp_to_the_top() -> None:
    hist = LatencyHistogram()
    for value in (0.0, LOWEST_MS / 2, HIGHEST_MS, HIGHEST_MS * 10, 1e300):
        hist.record(value)
    assert hist.underflow == 2
    assert hist.overflow == 3
    assert hist.quantile(0.0) == 0.0
    assert hist.quantile(1.0) == HIGHEST_MS


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, -math.inf])
def test_histogram_rejects_values_that_are_not_latencies(bad: float) -> None:
    hist = LatencyHistogram()
    with pytest.raises(ValueError, match="finite number"):
        hist.record(bad)
    assert hist.count == 0


def _samples(kind: str, n: int = 20_000) -> list[float]:
    rng = random.Random(f"latency-{kind}")
    if kind == "uniform":
        return [rng.uniform(50.0, 3000.0) for _ in range(n)]
    if kind == "lognormal":
        return [rng.lognormvariate(math.log(400.0), 0.6) for _ in range(n)]
    if kind == "bimodal":
        # 85 % fast cached answers, 15 % slow long generations: the p95 lies in the slow
        # mode and the p50 in the fast one.
        return [
            abs(rng.gauss(300.0, 40.0)) if rng.random() < 0.85 else abs(rng.gauss(2000.0, 200.0))
            for _ in range(n)
        ]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["uniform", "lognormal", "bimodal"])
def test_percentiles_are_within_one_percent_of_the_exact_values(kind: str) -> None:
    samples = _samples(kind)
    hist = LatencyHistogram()
    for value in samples:
        hist.record(value)
    exact = statistics.quantiles(samples, n=100, method="inclusive")
    p50, p95, p99 = hist.quantiles((0.50, 0.95, 0.99))
    for estimate, truth in ((p50, exact[49]), (p95, exact[94]), (p99, exact[98])):
        assert estimate is not None
        assert abs(estimate - truth) / truth <= 0.01, (kind, estimate, truth)


def test_nearest_rank_on_a_small_exact_sample() -> None:
    hist = LatencyHistogram()
    for value in range(1, 101):  # 1 .. 100 ms
        hist.record(float(value))
    p50, p95, p99, p100 = hist.quantiles((0.5, 0.95, 0.99, 1.0))
    assert p50 == pytest.approx(50, rel=RELATIVE_ERROR)
    assert p95 == pytest.approx(95, rel=RELATIVE_ERROR)
    assert p99 == pytest.approx(99, rel=RELATIVE_ERROR)
    assert p100 == pytest.approx(100, rel=RELATIVE_ERROR)


def test_quantiles_of_an_empty_histogram_are_none() -> None:
    assert quantiles([0] * BUCKET_COUNT, (0.5, 0.99)) == [None, None]
    assert LatencyHistogram().quantile(0.95) is None


@pytest.mark.parametrize("q", [-0.01, 1.01, math.nan])
def test_quantile_outside_zero_one_is_rejected(q: float) -> None:
    with pytest.raises(ValueError, match="outside"):
        LatencyHistogram().quantile(q)


def test_merge_adds_counts() -> None:
    first, second = LatencyHistogram(), LatencyHistogram()
    for value in range(100):
        (first if value % 2 else second).record(float(value))
    first.merge(second)
    assert first.count == 100
    assert first.quantile(0.5) == pytest.approx(49, rel=RELATIVE_ERROR)


def test_histogram_from_counts_checks_their_number() -> None:
    with pytest.raises(ValueError, match="bucket counts"):
        LatencyHistogram([1, 2, 3])
    counts = [0] * BUCKET_COUNT
    counts[bucket_index(250.0)] = 7
    assert LatencyHistogram(counts).count == 7


def test_cumulative_cut_never_counts_a_value_above_the_edge() -> None:
    for edge in (25.0, 100.0, 1000.0, 1200.0, 2500.0, 60_000.0):
        cut = buckets_below(edge)
        assert bucket_bounds(cut - 1)[1] <= edge
        # The bucket just past the cut starts at or before the edge (it straddles it or
        # starts on it), and is at most 1/64 of the edge wide.
        lower, upper = bucket_bounds(cut)
        assert lower <= edge < upper or lower == edge
        assert upper - lower <= edge / 64


def test_first_bucket_at_or_above_a_threshold() -> None:
    for threshold in (1200.0, 2500.0, 333.3):
        index = first_bucket_at_or_above(threshold)
        assert bucket_bounds(index)[0] >= threshold
        assert bucket_bounds(index - 1)[0] < threshold
