"""Prometheus exposition: the text parsed back must say what the collector says."""

from __future__ import annotations

import random
import sys
import types
from typing import Any, cast

import pytest
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from ai_guard import prometheus as ai_prometheus
from ai_guard._histogram import bucket_index
from ai_guard.context import CallContext
from ai_guard.metrics import MetricsCollector, MetricValueError
from ai_guard.pricing import cost_usd
from ai_guard.prometheus import (
    LATENCY_BUCKETS_SECONDS,
    AIGuardCollector,
    PrometheusSink,
    cumulative_latency_buckets,
    multiprocess_mode,
    render_prometheus,
)
from ai_guard.testing import FakeClock
from ai_guard.types import Usage

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _samples(text: bytes | str) -> Samples:
    if isinstance(text, bytes):
        text = text.decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, tuple(sorted(labels.items()))]


def _total(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= set(lbls))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def collector(clock: FakeClock) -> MetricsCollector:
    collector = MetricsCollector(clock=clock)
    for i in range(40):
        collector.record_request(
            "gpt-4o-mini",
            input_tokens=1000,
            output_tokens=100,
            cached_tokens=800,
            latency_ms=100.0 + 10 * i,
            error=i < 2,
            retries=1 if i % 10 == 0 else 0,
        )
    for _ in range(10):
        collector.record_request(
            "gpt-4o", input_tokens=500, output_tokens=300, latency_ms=3100.0, fallback=True
        )
    clock.advance(120)
    return collector


def test_exposition_parses_back_to_the_collectors_figures(collector: MetricsCollector) -> None:
    body, content_type = render_prometheus(collector)
    assert content_type == CONTENT_TYPE_LATEST
    samples = _samples(body)
    mini = {"model": "gpt-4o-mini", "tier": "mini"}
    full = {"model": "gpt-4o", "tier": "full"}
    assert _value(samples, "ai_guard_requests_total", **mini, outcome="success") == 38
    assert _value(samples, "ai_guard_requests_total", **mini, outcome="error") == 2
    assert _value(samples, "ai_guard_requests_total", **full, outcome="success") == 10
    assert _total(samples, "ai_guard_requests_total") == 50
    assert _value(samples, "ai_guard_tokens_total", **mini, type="input") == 40_000
    assert _value(samples, "ai_guard_tokens_total", **mini, type="output") == 4_000
    assert _value(samples, "ai_guard_tokens_total", **mini, type="cached") == 32_000
    assert _value(samples, "ai_guard_tokens_total", **full, type="output") == 3_000
    mini_cost = cost_usd("gpt-4o-mini", 1000, 100, 800)
    assert mini_cost is not None
    assert _value(samples, "ai_guard_cost_usd_total", **mini) == pytest.approx(40 * mini_cost)
    assert _value(samples, "ai_guard_retries_total", **mini) == 4
    assert _value(samples, "ai_guard_fallbacks_total", **full) == 10
    report = collector.report()
    assert _total(samples, "ai_guard_cost_usd_total") == pytest.approx(report["total_cost_usd"])


def test_latency_histogram_is_cumulative_and_matches_counts(collector: MetricsCollector) -> None:
    samples = _samples(render_prometheus(collector)[0])
    mini = {"model": "gpt-4o-mini", "tier": "mini"}
    name = "ai_guard_request_latency_seconds"
    assert _value(samples, f"{name}_count", **mini) == 40
    latencies = [100.0 + 10 * i for i in range(40)]
    assert _value(samples, f"{name}_sum", **mini) == pytest.approx(sum(latencies) / 1000)
    previous = 0.0
    for le in LATENCY_BUCKETS_SECONDS:
        cumulative = _value(samples, f"{name}_bucket", **mini, le=repr(le))
        assert cumulative >= previous
        previous = cumulative
        exact = sum(1 for v in latencies if v <= le * 1000)
        # Exact except for values within one bucket (1/64) at or below the boundary.
        near = sum(1 for v in latencies if le * 1000 * (1 - 1 / 64) < v <= le * 1000)
        assert exact - near <= cumulative <= exact
    assert _value(samples, f"{name}_bucket", **mini, le="+Inf") == 40
    full = {"model": "gpt-4o", "tier": "full"}
    assert _value(samples, f"{name}_bucket", **full, le="3.0") == 0
    assert _value(samples, f"{name}_bucket", **full, le="4.0") == 10


def test_bucket_conversion_never_overcounts_random_latencies() -> None:
    rng = random.Random(8)
    latencies = [rng.lognormvariate(6.5, 1.2) for _ in range(5000)]
    counts = [0] * (max(bucket_index(v) for v in latencies) + 2000)
    for value in latencies:
        counts[bucket_index(value)] += 1
    for le, cumulative in cumulative_latency_buckets(counts):
        exact = sum(1 for v in latencies if v <= le * 1000)
        near = sum(1 for v in latencies if le * 1000 * (1 - 1 / 64) < v <= le * 1000)
        assert exact - near <= cumulative <= exact, le
    assert cumulative_latency_buckets(counts)[-1] == (float("inf"), 5000)


def test_slo_gauges_follow_check_slos(collector: MetricsCollector) -> None:
    samples = _samples(render_prometheus(collector)[0])
    results = {r.name: r for r in collector.check_slos()}
    for name, result in results.items():
        if result.met is None:
            assert ("ai_guard_slo_met", (("slo", name),)) not in samples
        else:
            assert _value(samples, "ai_guard_slo_met", slo=name) == float(result.met)
    availability = results["availability"]
    assert availability.met is False  # 2 failures of 50
    assert availability.burn_rates is not None
    assert _value(samples, "ai_guard_slo_burn_rate", slo="availability", window="1h") == (
        pytest.approx(availability.burn_rates["1h"])
    )
    assert _value(samples, "ai_guard_slo_burn_rate", slo="availability", window="1h") == (
        pytest.approx(2 / 50 / 0.001)
    )
    assert _value(samples, "ai_guard_slo_alert", slo="availability") == 2  # page
    assert ("ai_guard_slo_alert", (("slo", "cache_hit_rate"),)) not in samples


class _FakeBreaker:
    def __init__(self, name: str, state: Any) -> None:
        self.name = name
        self._state = state

    @property
    def state(self) -> Any:
        if isinstance(self._state, Exception):
            raise self._state
        return self._state


def test_circuit_state_gauge_reads_every_breaker(
    monkeypatch: pytest.MonkeyPatch, collector: MetricsCollector
) -> None:
    from ai_guard.errors import StoreUnavailableError

    fake = types.ModuleType("ai_guard.breaker")
    fake.all_breakers = lambda: [  # type: ignore[attr-defined]
        _FakeBreaker("openai:gpt-4o", "open"),
        _FakeBreaker("openai:gpt-4o-mini", "closed"),
        _FakeBreaker("search", "half_open"),
        _FakeBreaker("shared", StoreUnavailableError("redis down")),
    ]
    monkeypatch.setitem(sys.modules, "ai_guard.breaker", fake)
    samples = _samples(render_prometheus(collector)[0])
    assert _value(samples, "ai_guard_circuit_state", breaker="openai:gpt-4o") == 2
    assert _value(samples, "ai_guard_circuit_state", breaker="openai:gpt-4o-mini") == 0
    assert _value(samples, "ai_guard_circuit_state", breaker="search") == 1
    assert ("ai_guard_circuit_state", (("breaker", "shared"),)) not in samples


def test_circuit_state_gauge_is_empty_without_the_breaker_module(
    monkeypatch: pytest.MonkeyPatch, collector: MetricsCollector
) -> None:
    monkeypatch.setitem(sys.modules, "ai_guard.breaker", None)  # import fails
    body = render_prometheus(collector)[0].decode()
    assert "# TYPE ai_guard_circuit_state gauge" in body
    assert "ai_guard_circuit_state{" not in body
    assert "ai_guard_requests_total{" in body


def test_real_breakers_appear_in_the_gauge(collector: MetricsCollector) -> None:
    from ai_guard.breaker import CircuitBreaker, circuit_breaker

    breaker = cast(CircuitBreaker, circuit_breaker("prometheus-test-breaker"))  # a plain name
    samples = _samples(render_prometheus(collector)[0])
    assert (
        _value(samples, "ai_guard_circuit_state", breaker="prometheus-test-breaker")
        == ({"closed": 0, "half_open": 1, "open": 2}[str(breaker.state)])
    )


def test_custom_collector_registers_on_any_registry(collector: MetricsCollector) -> None:
    registry = CollectorRegistry()
    ours: Collector = AIGuardCollector(collector, slos=False, breakers=False)
    registry.register(ours)
    samples = _samples(generate_latest(registry))
    assert _total(samples, "ai_guard_requests_total") == 50
    assert not any(name.startswith("ai_guard_slo") for name, _ in samples)
    assert not any(name == "ai_guard_circuit_state" for name, _ in samples)


def test_default_collector_is_rendered_when_none_is_given() -> None:
    from ai_guard.metrics import default_collector, set_default_collector

    mine = MetricsCollector()
    previous = set_default_collector(mine)
    try:
        mine.record_request("gpt-4o-mini", latency_ms=5.0)
        assert default_collector() is mine
        samples = _samples(render_prometheus()[0])
    finally:
        set_default_collector(previous)
    assert _total(samples, "ai_guard_requests_total") == 1


# -- the sink (the multiprocess path, here in one process) ----------------------------------


def test_prometheus_sink_records_calls_with_the_same_names() -> None:
    registry = CollectorRegistry()
    sink = PrometheusSink(registry=registry)
    ctx = CallContext(0.0)
    ctx.request_model = "gpt-4o-mini"
    ctx.observe_usage(Usage(prompt_tokens=1200, completion_tokens=80, cached_tokens=1024))
    ctx.latency_ms = 640.0
    ctx.retries = 2
    sink(ctx)
    failed = CallContext(0.0)
    failed.request_model = "gpt-4o"
    failed.error_type = "503"
    failed.latency_ms = 30.0
    failed.fallback_from = "gpt-4o-mini"
    sink(failed)
    sink.record_request("llama-local", tier="mini", cost_usd=0.5, latency_ms=1.0)
    samples = _samples(generate_latest(registry))
    mini = {"model": "gpt-4o-mini", "tier": "mini"}
    assert _value(samples, "ai_guard_requests_total", **mini, outcome="success") == 1
    assert (
        _value(samples, "ai_guard_requests_total", model="gpt-4o", tier="full", outcome="error")
        == 1
    )
    assert _value(samples, "ai_guard_tokens_total", **mini, type="cached") == 1024
    assert _value(samples, "ai_guard_cost_usd_total", **mini) == pytest.approx(
        cost_usd("gpt-4o-mini", 1200, 80, 1024)
    )
    assert _value(samples, "ai_guard_cost_usd_total", model="llama-local", tier="mini") == 0.5
    assert _value(samples, "ai_guard_retries_total", **mini) == 2
    assert _value(samples, "ai_guard_fallbacks_total", model="gpt-4o", tier="full") == 1
    assert _value(samples, "ai_guard_request_latency_seconds_bucket", **mini, le="0.75") == 1
    assert _value(samples, "ai_guard_request_latency_seconds_bucket", **mini, le="0.5") == 0
    assert _value(samples, "ai_guard_request_latency_seconds_sum", **mini) == pytest.approx(0.64)


def test_prometheus_sink_rejects_bad_figures_and_records_nothing() -> None:
    registry = CollectorRegistry()
    sink = PrometheusSink(registry=registry)
    sink.record_request("gpt-4o-mini", latency_ms=1.0)
    before = _samples(generate_latest(registry))
    for figures in (
        {"latency_ms": -1.0},
        {"latency_ms": float("nan")},
        {"latency_ms": 1.0, "input_tokens": -3},
        {"latency_ms": "fast"},
    ):
        with pytest.raises(MetricValueError):
            sink.record_request("gpt-4o-mini", **figures)
    with pytest.raises(MetricValueError):
        sink.record_request("", latency_ms=1.0)
    assert _samples(generate_latest(registry)) == before


def test_default_prometheus_sink_is_one_object_per_process() -> None:
    from ai_guard.prometheus import default_prometheus_sink

    sink = default_prometheus_sink()
    assert default_prometheus_sink() is sink
    assert isinstance(sink, PrometheusSink)


def test_prometheus_sink_caps_its_label_sets() -> None:
    registry = CollectorRegistry()
    sink = PrometheusSink(registry=registry, max_series=2)
    for i in range(5):
        sink.record_request(f"model-{i}", latency_ms=1.0)
    samples = _samples(generate_latest(registry))
    models = {dict(lbls)["model"] for name, lbls in samples if name == "ai_guard_requests_total"}
    assert models == {"model-0", "model-1", "other"}
    assert _total(samples, "ai_guard_requests_total") == 5


# -- modes and the optional dependency ------------------------------------------------------


def test_multiprocess_mode_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    assert multiprocess_mode() is False
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/somewhere")
    assert multiprocess_mode() is True


def test_missing_prometheus_client_gives_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, collector: MetricsCollector
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match=r"ai_guard\[prometheus\]"):
        render_prometheus(collector)
    with pytest.raises(ImportError, match=r"ai_guard\[prometheus\]"):
        PrometheusSink()
    assert ai_prometheus.multiprocess_mode() in (True, False)  # importable without it
