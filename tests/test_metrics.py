"""The metrics collector: exact counts under threads, windows on a fake clock, bounded
memory, the report's contract, bad input."""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import signal
import sys
import threading
import time
import tracemalloc
import warnings
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from ai_guard._histogram import RELATIVE_ERROR
from ai_guard.context import CallContext, bind_sinks, close_call, open_call
from ai_guard.errors import ConfigError
from ai_guard.metrics import (
    OTHER_MODEL,
    UNKNOWN_MODEL,
    MetricsCollector,
    MetricValueError,
    default_collector,
    set_default_collector,
)
from ai_guard.pricing import ModelSpec, cost_usd
from ai_guard.testing import FakeClock
from ai_guard.types import ChatResult, Usage
from benchmarks.bench_metrics import record_load, retained_size

CONTRACT_KEYS = {
    "total_requests",
    "mini_requests",
    "full_requests",
    "mini_percentage",
    "total_tokens",
    "cached_tokens",
    "cache_hit_rate",
    "total_cost_usd",
    "avg_cost_per_request",
    "error_rate",
    "availability",
    "latency_ms",
}


def _cost(model: str, *tokens: int) -> float:
    """``cost_usd`` of a model the price table has."""
    cost = cost_usd(model, *tokens)
    assert cost is not None
    return cost


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def collector(clock: FakeClock) -> MetricsCollector:
    return MetricsCollector(clock=clock)


def _mini(collector: MetricsCollector, n: int = 1, **figures: Any) -> None:
    values: dict[str, Any] = {
        "input_tokens": 1000,
        "output_tokens": 100,
        "cached_tokens": 900,
        "latency_ms": 300.0,
        **figures,
    }
    for _ in range(n):
        collector.record_request("gpt-4o-mini", **values)


# -- the report ----------------------------------------------------------------------------


def test_report_has_every_key_of_the_api_contract(collector: MetricsCollector) -> None:
    _mini(collector)
    report = collector.report()
    assert report.keys() >= CONTRACT_KEYS
    assert set(report["latency_ms"]) >= {"mini", "full"}
    assert set(report["latency_ms"]["mini"]) >= {"p50", "p95", "p99"}
    assert {"input_tokens", "output_tokens", "by_model", "window_seconds", "since"} <= set(report)
    json.dumps(report, allow_nan=False)  # JSON-ready, no NaN


def test_report_figures_match_hand_computed_values(
    collector: MetricsCollector, clock: FakeClock
) -> None:
    for i in range(90):
        collector.record_request(
            "gpt-4o-mini",
            input_tokens=1000,
            output_tokens=100,
            cached_tokens=900,
            latency_ms=200.0 + i,
            error=i < 3,
        )
    for _ in range(10):
        collector.record_request(
            "gpt-4o", input_tokens=2000, output_tokens=500, cached_tokens=0, latency_ms=1500.0
        )
    clock.advance(100)
    report = collector.report()
    assert report["total_requests"] == 100
    assert report["mini_requests"] == 90
    assert report["full_requests"] == 10
    assert report["mini_percentage"] == pytest.approx(90.0)
    assert report["error_count"] == 3
    assert report["error_rate"] == pytest.approx(0.03)
    assert report["availability"] == pytest.approx(0.97)
    assert report["input_tokens"] == 90 * 1000 + 10 * 2000
    assert report["output_tokens"] == 90 * 100 + 10 * 500
    assert report["cached_tokens"] == 90 * 900
    assert report["total_tokens"] == report["input_tokens"] + report["output_tokens"]
    assert report["cache_hit_rate"] == pytest.approx(81_000 / 110_000)
    expected_cost = 90 * _cost("gpt-4o-mini", 1000, 100, 900) + 10 * _cost("gpt-4o", 2000, 500, 0)
    assert report["total_cost_usd"] == pytest.approx(expected_cost)
    assert report["avg_cost_per_request"] == pytest.approx(expected_cost / 100)
    assert report["projected_monthly_cost_usd"] == pytest.approx(expected_cost / 100.0 * 30 * 86400)
    assert report["latency_ms"]["full"]["p95"] == pytest.approx(1500.0, rel=RELATIVE_ERROR)
    assert report["latency_ms"]["mini"]["p50"] == pytest.approx(244.0, rel=RELATIVE_ERROR)
    assert report["latency_ms"]["mini"]["mean"] == pytest.approx(244.5)
    assert report["by_model"]["gpt-4o"]["requests"] == 10
    assert report["by_model"]["gpt-4o-mini"]["errors"] == 3
    assert report["by_model"]["gpt-4o-mini"]["tier"] == "mini"
    assert report["by_tier"]["full"]["cost_usd"] == pytest.approx(
        10 * _cost("gpt-4o", 2000, 500, 0)
    )
    assert report["observed_seconds"] == pytest.approx(100.0)
    assert report["until"] - report["since"] == pytest.approx(100.0)


def test_ratios_without_a_denominator_are_none(collector: MetricsCollector) -> None:
    report = collector.report()
    assert report["total_requests"] == 0
    for key in (
        "mini_percentage",
        "error_rate",
        "availability",
        "cache_hit_rate",
        "avg_cost_per_request",
        "projected_monthly_cost_usd",
    ):
        assert report[key] is None, key
    assert report["latency_ms"]["mini"] == {
        "p50": None,
        "p95": None,
        "p99": None,
        "mean": None,
        "count": 0,
    }
    collector.record_request("gpt-4o-mini", latency_ms=10.0)  # no prompt tokens
    assert collector.report()["cache_hit_rate"] is None


def test_tier_and_cost_come_from_the_catalogue(collector: MetricsCollector) -> None:
    collector.record_request(
        "gpt-4o-2024-08-06", input_tokens=1000, output_tokens=200, latency_ms=900.0
    )
    report = collector.report()
    assert report["full_requests"] == 1
    assert report["total_cost_usd"] == pytest.approx(cost_usd("gpt-4o", 1000, 200))
    assert report["unpriced_requests"] == 0


def test_given_tier_and_cost_override_the_catalogue(collector: MetricsCollector) -> None:
    collector.record_request(
        "gpt-4o-mini", tier="full", input_tokens=10, cost_usd=0.5, latency_ms=100.0
    )
    collector.record_request("gpt-4o-mini", tier="mini", cost_usd=0.25, latency_ms=100.0)
    collector.record_request("gpt-4o-mini", cost_usd=0.25, latency_ms=100.0)
    report = collector.report()
    assert report["full_requests"] == 1
    assert report["mini_requests"] == 2
    assert report["total_cost_usd"] == pytest.approx(1.0)


def test_unknown_model_costs_zero_and_is_counted_as_unpriced(
    collector: MetricsCollector,
) -> None:
    collector.record_request("llama-local", input_tokens=500, output_tokens=50, latency_ms=80.0)
    collector.record_request("llama-local", cost_usd=0.01, latency_ms=80.0)
    report = collector.report()
    assert report["total_cost_usd"] == pytest.approx(0.01)
    assert report["unpriced_requests"] == 1
    assert report["by_model"]["llama-local"]["tier"] == "unknown"
    assert "unknown" in report["latency_ms"]
    assert report["mini_requests"] == report["full_requests"] == 0


def test_own_catalogue_prices_and_tiers(clock: FakeClock) -> None:
    catalog = [
        ModelSpec(name="house-small", tier="mini", input_price=1.0, output_price=2.0),
        ModelSpec(name="house-large", tier="full", input_price=10.0, output_price=20.0),
    ]
    collector = MetricsCollector(clock=clock, catalog=catalog)
    collector.record_request("house-small", input_tokens=1_000_000, latency_ms=10.0)
    collector.record_request("house-large", output_tokens=1_000_000, latency_ms=10.0)
    report = collector.report()
    assert report["mini_requests"] == report["full_requests"] == 1
    assert report["total_cost_usd"] == pytest.approx(21.0)


def test_retries_and_fallbacks_are_counted(collector: MetricsCollector) -> None:
    collector.record_request("gpt-4o-mini", latency_ms=1.0, retries=2, fallback=True)
    collector.record_request("gpt-4o-mini", latency_ms=1.0, retries=1)
    report = collector.report()
    assert report["retries"] == 3
    assert report["fallbacks"] == 1


def test_latency_beyond_the_histogram_range_is_clamped_and_reported(
    collector: MetricsCollector,
) -> None:
    collector.record_request("gpt-4o-mini", latency_ms=10 * 3600 * 1000.0)  # ten hours
    collector.record_request("gpt-4o-mini", latency_ms=0.0)
    report = collector.report()
    assert report["latency_overflow"] == 1
    assert report["latency_ms"]["mini"]["p99"] == pytest.approx(2.0**22)
    assert report["latency_ms"]["mini"]["p50"] == 0.0


# -- bad input -----------------------------------------------------------------------------

BAD_RECORDS: list[tuple[str, dict[str, Any]]] = [
    ("negative input tokens", {"input_tokens": -1}),
    ("negative output tokens", {"output_tokens": -5}),
    ("negative cached tokens", {"cached_tokens": -1}),
    ("fractional tokens", {"input_tokens": 1.5}),
    ("bool tokens", {"output_tokens": True}),
    ("string tokens", {"input_tokens": "100"}),
    ("absurd tokens", {"input_tokens": 10**13}),
    ("more cached than input", {"input_tokens": 10, "cached_tokens": 11}),
    ("negative latency", {"latency_ms": -0.1}),
    ("NaN latency", {"latency_ms": math.nan}),
    ("infinite latency", {"latency_ms": math.inf}),
    ("string latency", {"latency_ms": "12"}),
    ("None latency", {"latency_ms": None}),
    ("bool latency", {"latency_ms": True}),
    ("huge int latency", {"latency_ms": 10**400}),
    ("negative cost", {"cost_usd": -0.01}),
    ("NaN cost", {"cost_usd": math.nan}),
    ("string cost", {"cost_usd": "free"}),
    ("negative retries", {"retries": -1}),
]


@pytest.mark.parametrize(("case", "figures"), BAD_RECORDS, ids=[c for c, _ in BAD_RECORDS])
def test_bad_figures_raise_and_record_nothing(
    collector: MetricsCollector, case: str, figures: dict[str, Any]
) -> None:
    _mini(collector, 3)
    before = collector.report()
    values: dict[str, Any] = {"input_tokens": 100, "latency_ms": 50.0, **figures}
    with pytest.raises(MetricValueError) as excinfo:
        collector.record_request("gpt-4o-mini", **values)
    assert isinstance(excinfo.value, ValueError)
    assert collector.report() == before


@pytest.mark.parametrize(
    ("model", "tier"),
    [("", None), (None, None), (42, None), (["gpt"], None), ("gpt-4o", ""), ("x" * 300, None)],
)
def test_bad_model_or_tier_raises_and_records_nothing(
    collector: MetricsCollector, model: Any, tier: Any
) -> None:
    _mini(collector)
    before = collector.report()
    with pytest.raises(MetricValueError, match=r"model|tier"):
        collector.record_request(model, tier=tier, latency_ms=1.0)
    assert collector.report() == before


def test_numbers_of_other_types_are_accepted(collector: MetricsCollector) -> None:
    class TokenCount:
        def __index__(self) -> int:
            return 7

    collector.record_request("gpt-4o-mini", input_tokens=TokenCount(), latency_ms=100)  # type: ignore[arg-type]
    collector.record_request("gpt-4o-mini", latency_ms=Decimal("100.5"), cost_usd=0)  # type: ignore[arg-type]
    collector.record_request("gpt-4o-mini", latency_ms=Fraction(201, 2), cost_usd=Decimal("0.5"))  # type: ignore[arg-type]
    report = collector.report()
    assert report["total_requests"] == 3
    assert report["input_tokens"] == 7
    assert report["latency_ms"]["mini"]["mean"] == pytest.approx((100 + 100.5 + 100.5) / 3)


def test_bad_configuration_names_the_setting(clock: FakeClock) -> None:
    with pytest.raises(ConfigError) as excinfo:
        MetricsCollector(clock=clock, resolution=7)
    assert excinfo.value.setting == "resolution"
    with pytest.raises(ConfigError, match="windows"):
        MetricsCollector(clock=clock, windows=(0,))
    with pytest.raises(ConfigError, match="max_series"):
        MetricsCollector(clock=clock, max_series=0)
    with pytest.raises(ConfigError, match=r"slos\.availability"):
        MetricsCollector(clock=clock, slos={"availability": 2})


# -- threads -------------------------------------------------------------------------------


def test_eight_threads_times_100k_records_give_exact_totals(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    threads, per_thread = 8, 100_000
    barrier = threading.Barrier(threads + 2)  # the workers, the ticker and this thread
    done = threading.Event()
    errors: list[BaseException] = []

    def record(worker: int) -> None:
        model = "gpt-4o-mini" if worker % 4 else "gpt-4o"
        rec = collector.record_request
        barrier.wait()
        try:
            for i in range(per_thread):
                rec(
                    model,
                    input_tokens=10,
                    output_tokens=3,
                    cached_tokens=i % 2,
                    latency_ms=100.0 + worker,
                    error=i % 1000 == 0,
                )
        except BaseException as exc:  # reported below
            errors.append(exc)

    def tick() -> None:
        # Time moves while the threads record, so intervals are folded concurrently.
        barrier.wait()
        for _ in range(2000):
            if done.wait(0.001):
                return
            clock.advance(1.0)

    workers = [threading.Thread(target=record, args=(w,)) for w in range(threads)]
    ticker = threading.Thread(target=tick)
    for thread in [*workers, ticker]:
        thread.start()
    barrier.wait()
    for thread in workers:
        thread.join(timeout=120)
    done.set()
    ticker.join(timeout=10)
    assert not errors
    total = threads * per_thread
    report = collector.report()
    assert report["total_requests"] == total
    assert report["full_requests"] == 2 * per_thread
    assert report["mini_requests"] == 6 * per_thread
    assert report["error_count"] == threads * (per_thread // 1000)
    assert report["input_tokens"] == total * 10
    assert report["output_tokens"] == total * 3
    assert report["cached_tokens"] == total // 2
    assert report["latency_all_ms"]["count"] == total
    half = per_thread // 2  # every other call has one cached token
    expected_cost = sum(
        count * half * (_cost(model, 10, 3, 0) + _cost(model, 10, 3, 1))
        for model, count in (("gpt-4o-mini", 6), ("gpt-4o", 2))
    )
    assert report["total_cost_usd"] == pytest.approx(expected_cost, rel=1e-9)
    # The ticker moved the clock by at most 2000 s: the last hour holds everything.
    assert collector.report(window=3600)["total_requests"] == total


def test_readers_during_writes_see_consistent_growing_totals(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    stop = threading.Event()
    seen: list[int] = []
    failures: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                seen.append(collector.report()["total_requests"])
                collector.report(window=300)
                collector.timeseries(window=600)
                collector.check_slos()
                clock.advance(3.0)
        except BaseException as exc:  # reported below
            failures.append(exc)

    def write() -> None:
        for _ in range(20_000):
            collector.record_request("gpt-4o-mini", input_tokens=5, latency_ms=12.5)

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write) for _ in range(4)]
    reader.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(timeout=60)
    stop.set()
    reader.join(timeout=30)
    assert not failures
    assert seen == sorted(seen)
    assert collector.report()["total_requests"] == 80_000
    assert collector.report()["input_tokens"] == 400_000


def test_many_short_lived_threads_leave_nothing_behind(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)

    def one_call() -> None:
        collector.record_request("gpt-4o-mini", input_tokens=1, latency_ms=5.0)

    def run_threads(n: int) -> None:
        for _ in range(n):
            thread = threading.Thread(target=one_call)
            thread.start()
            thread.join()

    run_threads(20)
    gc.collect()
    tracemalloc.start()
    try:
        run_threads(50)
        gc.collect()
        after_fifty = tracemalloc.get_traced_memory()[0]
        run_threads(250)
        gc.collect()
        after_three_hundred = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # A thread's live interval costs ~15 KB per series; 250 of them kept would be ~4 MB.
    assert after_three_hundred - after_fifty < 64 * 1024
    assert collector.report()["total_requests"] == 320
    assert collector.report()["input_tokens"] == 320


# -- memory ----------------------------------------------------------------------------------


def test_traced_memory_is_flat_from_ten_thousand_records_on() -> None:
    # tracemalloc slows every allocation tenfold: 10^5 records here, 10^6 below without
    # it, 10^7 in benchmarks/bench_metrics.py.
    clock = FakeClock()
    gc.collect()
    tracemalloc.start()
    try:
        collector = MetricsCollector(clock=clock)
        record_load(collector, clock, 0, 10_000)
        collector.report()
        gc.collect()
        after_ten_thousand = tracemalloc.get_traced_memory()[0]
        record_load(collector, clock, 10_000, 90_000)
        collector.report()
        gc.collect()
        after_a_hundred_thousand = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert collector.report()["total_requests"] == 100_000
    growth = after_a_hundred_thousand - after_ten_thousand
    assert after_ten_thousand > 1_000_000  # the rings of two series are there
    assert abs(growth) < 0.01 * after_ten_thousand, (after_ten_thousand, growth)


def test_retained_memory_is_the_same_after_ten_thousand_and_a_million_records() -> None:
    clock = FakeClock()
    collector = MetricsCollector(clock=clock)
    record_load(collector, clock, 0, 10_000)
    collector.report()
    gc.collect()
    size_ten_thousand = retained_size(collector)
    blocks_ten_thousand = sys.getallocatedblocks()
    record_load(collector, clock, 10_000, 990_000)
    collector.report()
    gc.collect()
    size_a_million = retained_size(collector)
    blocks_a_million = sys.getallocatedblocks()
    assert collector.report()["total_requests"] == 1_000_000
    assert abs(size_a_million - size_ten_thousand) < 0.001 * size_ten_thousand
    # Nothing per record anywhere in the process either.
    assert blocks_a_million - blocks_ten_thousand < 200


def test_series_beyond_the_cap_are_counted_as_other(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock, max_series=3)
    for i in range(10):
        collector.record_request(f"model-{i}", latency_ms=10.0)
    collector.record_request("model-0", latency_ms=10.0)
    report = collector.report()
    assert report["total_requests"] == 11
    assert set(report["by_model"]) == {"model-0", "model-1", "model-2", OTHER_MODEL}
    assert report["by_model"][OTHER_MODEL]["requests"] == 7
    assert report["by_model"]["model-0"]["requests"] == 2


# -- windows ---------------------------------------------------------------------------------


def test_old_traffic_leaves_the_five_minute_window(
    collector: MetricsCollector, clock: FakeClock
) -> None:
    _mini(collector, 10, latency_ms=100.0)
    clock.advance(200)
    _mini(collector, 5, latency_ms=900.0)
    assert collector.report(window=300)["total_requests"] == 15
    clock.advance(150)  # the first ten are now 350 s old
    recent = collector.report(window=300)
    assert recent["total_requests"] == 5
    assert recent["window_seconds"] == 300
    assert recent["latency_ms"]["mini"]["p50"] == pytest.approx(900.0, rel=RELATIVE_ERROR)
    assert collector.report()["total_requests"] == 15
    clock.advance(300)
    assert collector.report(window=300)["total_requests"] == 0
    assert collector.report(window=300)["latency_ms"]["mini"]["p95"] is None


def test_one_hour_window_forgets_what_is_older(
    collector: MetricsCollector, clock: FakeClock
) -> None:
    _mini(collector, 4)
    clock.advance(3000)
    _mini(collector, 6, error=True)
    hour = collector.report(window=3600)
    assert hour["total_requests"] == 10
    assert hour["error_rate"] == pytest.approx(0.6)
    clock.advance(700)
    hour = collector.report(window=3600)
    assert hour["total_requests"] == 6
    assert hour["error_rate"] == pytest.approx(1.0)
    assert collector.report()["total_requests"] == 10


def test_window_covers_between_one_slot_less_and_the_full_window(
    collector: MetricsCollector, clock: FakeClock
) -> None:
    _mini(collector)
    clock.advance(289.999)
    assert collector.report(window=300)["total_requests"] == 1
    clock.advance(10.002)
    assert collector.report(window=300)["total_requests"] == 0


def test_idle_thread_traffic_is_still_in_the_right_window(clock: FakeClock) -> None:
    # A thread records once and stays alive but idle: its interval is read where it
    # belongs without the thread ever recording again.
    collector = MetricsCollector(clock=clock)
    recorded, release = threading.Event(), threading.Event()

    def idle_worker() -> None:
        collector.record_request("gpt-4o", latency_ms=700.0)
        recorded.set()
        release.wait(30)

    worker = threading.Thread(target=idle_worker)
    worker.start()
    try:
        recorded.wait(30)
        clock.advance(120)
        _mini(collector)
        assert collector.report(window=300)["total_requests"] == 2
        assert collector.report(window=60)["total_requests"] == 1
        clock.advance(400)
        assert collector.report(window=300)["total_requests"] == 0
        assert collector.report(window=3600)["total_requests"] == 2
        assert collector.report()["full_requests"] == 1
    finally:
        release.set()
        worker.join(30)
    assert collector.report()["total_requests"] == 2


def test_window_longer_than_kept_is_rejected(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    with pytest.raises(ValueError, match="windows="):
        collector.report(window=7200)
    with pytest.raises(ValueError, match="> 0"):
        collector.report(window=0)
    longer = MetricsCollector(clock=clock, windows=(300, 7200))
    longer.record_request("gpt-4o-mini", latency_ms=1.0)
    clock.advance(5000)
    assert longer.report(window=7200)["total_requests"] == 1
    assert longer.windows == (300.0, 7200.0)


def test_timeseries_has_a_point_per_minute_summing_to_the_window(
    collector: MetricsCollector, clock: FakeClock
) -> None:
    for minute in range(30):
        for _ in range(minute % 5 + 1):
            collector.record_request("gpt-4o-mini", input_tokens=10, latency_ms=100.0 + minute)
        if minute % 10 == 0:
            collector.record_request("gpt-4o", input_tokens=10, latency_ms=2000.0)
        clock.advance(60)
    points = collector.timeseries(window=3600)
    assert len(points) == 60
    assert [b["t"] - a["t"] for a, b in itertools.pairwise(points)] == [60.0] * 59
    assert sum(p["requests"] for p in points) == collector.report(window=3600)["total_requests"]
    assert sum(p["requests_by_tier"]["full"] for p in points) == 3
    busy = [p for p in points if p["requests"]]
    assert len(busy) == 30
    first = busy[0]
    assert first["requests_by_tier"] == {"mini": 1, "full": 1}
    assert first["latency_ms"]["full"]["p95"] == pytest.approx(2000.0, rel=RELATIVE_ERROR)
    assert first["latency_ms"]["mini"]["p50"] == pytest.approx(100.0, rel=RELATIVE_ERROR)
    assert points[-1]["requests"] == 0  # the current minute
    assert points[-1]["latency_ms"]["mini"]["p95"] is None
    assert first["cost_usd"] == pytest.approx(_cost("gpt-4o-mini", 10, 0) + _cost("gpt-4o", 10, 0))
    json.dumps(points, allow_nan=False)


def test_timeseries_over_five_minutes_has_ten_second_points(
    collector: MetricsCollector, clock: FakeClock
) -> None:
    _mini(collector, 3)
    clock.advance(25)
    _mini(collector, 2)
    points = collector.timeseries(window=300)
    assert len(points) == 30
    assert [p["requests"] for p in points[-3:]] == [3, 0, 2]
    coarse = collector.timeseries(window=300, step=60)
    assert len(coarse) == 5
    assert sum(p["requests"] for p in coarse) == 5


@pytest.mark.parametrize(("window", "step"), [(3600, 10), (3600, 90), (300, 7), (0, None)])
def test_timeseries_rejects_a_step_off_the_grid(
    collector: MetricsCollector, window: float, step: float | None
) -> None:
    with pytest.raises(ValueError, match=r"step|window"):
        collector.timeseries(window=window, step=step)


def test_reset_forgets_everything_and_restarts_since(
    collector: MetricsCollector, clock: FakeClock
) -> None:
    _mini(collector, 5)
    clock.advance(30)
    _mini(collector, 5)
    clock.advance(10)
    collector.reset()
    report = collector.report()
    assert report["total_requests"] == 0
    assert collector.report(window=300)["total_requests"] == 0
    assert report["observed_seconds"] == 0
    _mini(collector, 2)
    assert collector.report()["total_requests"] == 2


# -- the sink and the process-wide collector -------------------------------------------------


def test_record_call_reads_the_call_context(collector: MetricsCollector) -> None:
    ctx = CallContext(0.0)
    ctx.operation = "chat"
    ctx.request_model = "gpt-4o"
    ctx.response_model = "gpt-4o-2024-08-06"
    ctx.tier = "full"
    ctx.observe_usage(Usage(prompt_tokens=2000, completion_tokens=100, cached_tokens=1024))
    ctx.cost_usd = 0.0123
    ctx.latency_ms = 850.0
    ctx.retries = 2
    ctx.fallback_from = "gpt-4o-mini"
    collector.record_call(ctx)
    failed = CallContext(0.0)
    failed.request_model = "gpt-4o-mini"
    failed.error_type = "503"
    failed.latency_ms = 40.0
    collector.record_call(failed)
    anonymous = CallContext(0.0)
    anonymous.latency_ms = 1.0
    collector.record_call(anonymous)
    report = collector.report()
    assert report["total_requests"] == 3
    assert report["by_model"]["gpt-4o-2024-08-06"]["cost_usd"] == pytest.approx(0.0123)
    assert report["by_model"]["gpt-4o-2024-08-06"]["cached_tokens"] == 1024
    assert report["by_model"]["gpt-4o-mini"]["errors"] == 1
    assert report["by_model"][UNKNOWN_MODEL]["requests"] == 1
    assert report["retries"] == 2
    assert report["fallbacks"] == 1
    assert report["latency_ms"]["full"]["p50"] == pytest.approx(850.0, rel=RELATIVE_ERROR)


@pytest.fixture
def fresh_default() -> Iterator[MetricsCollector]:
    mine = MetricsCollector()
    previous = set_default_collector(mine)
    try:
        yield mine
    finally:
        set_default_collector(previous)


def _ai_call(model: str = "gpt-4o-mini") -> ChatResult:
    ctx, token = open_call()
    ctx.operation = "chat"
    ctx.request_model = model
    result = ChatResult(content="ok", model=model, usage=Usage(1200, 80, 1280, 1024))
    return close_call(ctx, token, result=result)


def test_default_collector_counts_ai_calls_without_setup(
    fresh_default: MetricsCollector,
) -> None:
    assert default_collector() is fresh_default
    for _ in range(3):
        _ai_call()
    report = fresh_default.report()
    assert report["total_requests"] == 3
    assert report["cached_tokens"] == 3 * 1024
    assert report["total_cost_usd"] == pytest.approx(3 * _cost("gpt-4o-mini", 1200, 80, 1024))


def test_replaced_default_collector_stops_receiving_calls(
    fresh_default: MetricsCollector,
) -> None:
    _ai_call()
    replacement = MetricsCollector()
    previous = set_default_collector(replacement)
    try:
        assert previous is fresh_default
        _ai_call()
        _ai_call()
    finally:
        set_default_collector(fresh_default)
    assert fresh_default.report()["total_requests"] == 1
    assert replacement.report()["total_requests"] == 2
    with pytest.raises(TypeError):
        set_default_collector("not a collector")  # type: ignore[arg-type]


def test_bound_sinks_send_calls_to_another_collector(fresh_default: MetricsCollector) -> None:
    mine = MetricsCollector()
    with bind_sinks(mine.record_call):
        _ai_call("gpt-4o")
    assert mine.report()["full_requests"] == 1
    assert fresh_default.report()["total_requests"] == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_forked_child_records_even_if_the_lock_was_held_at_the_fork() -> None:
    # gunicorn --preload forks workers from a process that may have metrics threads.
    collector = MetricsCollector()
    collector.record_request("gpt-4o-mini", latency_ms=1.0)
    holding, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with collector._lock:
            holding.set()
            release.wait(30)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    holding.wait(30)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # the child: report() needs the lock that was held at the fork
            signal.alarm(10)
            code = 1
            try:
                collector.record_request("gpt-4o-mini", latency_ms=1.0)
                code = 0 if collector.report()["total_requests"] == 2 else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 20
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            assert time.monotonic() < deadline, "the forked child deadlocked"
            time.sleep(0.01)  # waiting for another process
    finally:
        release.set()
        holder.join(30)
    assert os.waitstatus_to_exitcode(status) == 0
