"""AIClient's guards against a real FakeUpstream: retries with one idempotency key, 429
handling and pacing, the breaker per logical call, router fallback, timeouts and resets,
metrics, the log line, the span, and 16 threads through one client."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ai_guard.breaker import BreakerRegistry, circuit_breaker, default_registry
from ai_guard.errors import (
    CircuitOpenError,
    RateLimitExceeded,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamTimeoutError,
)
from ai_guard.metrics import MetricsCollector
from ai_guard.pricing import cost_usd
from ai_guard.routing import Router, RouteRequest
from ai_guard.testing import FakeClock, FakeUpstream
from ai_guard.tracing import hash_idempotency_key
from tests.test_client import HELLO, MODEL, forget_default_breakers, make_client

__all__ = ["forget_default_breakers"]  # the autouse fixture, shared with test_client.py

SIMPLE = RouteRequest("classification", 2)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


def call_records(caplog: pytest.LogCaptureFixture) -> list[Any]:
    """The per-call log records (their ``extra`` fields are attributes)."""
    return [r for r in caplog.records if getattr(r, "event", None) == "ai_call"]


# -- retries and the idempotency key -----------------------------------------------------


def test_every_retry_of_one_call_carries_the_same_idempotency_key(
    upstream: FakeUpstream, clock: FakeClock
) -> None:
    upstream.configure(error_rate=1.0, error_statuses=(503,))
    with make_client(upstream, clock=clock, retries=3) as client:
        with pytest.raises(UpstreamError) as first:
            client.chat(HELLO)
        with pytest.raises(UpstreamError):
            client.chat(HELLO, idempotency_key="mine-1")
    assert first.value.status == 503
    attempts = upstream.requests
    assert [r.status for r in attempts] == [503] * 8
    keys = [r.idempotency_key for r in attempts]
    assert keys[0] is not None
    assert keys[:4] == [keys[0]] * 4  # every attempt of the first call
    assert keys[4:] == ["mine-1"] * 4  # every attempt of the second
    assert [r.body for r in attempts[:4]] == [attempts[0].body] * 4  # and the same body
    assert len(clock.sleeps) == 6  # backoff between the attempts, on the fake clock


def test_a_5xx_then_success_is_one_call_with_one_retry(
    upstream: FakeUpstream, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ai_guard")
    upstream.configure(error_rate=0.5, error_statuses=(502,), seed=3)
    with make_client(upstream, clock=clock, retries=10) as client:
        client.chat(HELLO)
    statuses = [r.status for r in upstream.requests]
    assert statuses[-1] == 200
    assert set(statuses[:-1]) <= {502}
    assert len({r.idempotency_key for r in upstream.requests}) == 1
    (record,) = call_records(caplog)
    assert record.retries == len(statuses) - 1
    assert record.error_type is None


def test_429_with_retry_after_ms_is_retried_after_the_asked_wait(clock: FakeClock) -> None:
    # One request per 2 s window, on the same fake clock as the client: the client's
    # sleep is what moves the upstream into its next window.
    with FakeUpstream(clock=clock, quota_requests=1, quota_window=2.0) as upstream:
        with make_client(upstream, clock=clock, budget=False) as client:
            client.chat(HELLO)
            clock.advance(0.5)
            result = client.chat(HELLO)
        assert result.content
        assert [r.status for r in upstream.requests] == [200, 429, 200]
        assert upstream.requests[1].idempotency_key == upstream.requests[2].idempotency_key
        assert upstream.requests[0].idempotency_key != upstream.requests[1].idempotency_key
    (wait,) = clock.sleeps
    assert 1.5 <= wait <= 1.5 + 1.0  # retry-after-ms 1500, plus bounded jitter on top


def test_429s_beyond_the_retries_raise_rate_limit_exceeded(
    upstream: FakeUpstream, clock: FakeClock
) -> None:
    # Injected 429s carry no retry-after: the client backs off exponentially.
    upstream.configure(error_rate=1.0, error_statuses=(429,))
    with (
        make_client(upstream, clock=clock, budget=False, retries=2) as client,
        pytest.raises(RateLimitExceeded) as info,
    ):
        client.chat(HELLO)
    assert upstream.stats() == {"429": 3, "total": 3}
    assert info.value.attempts == 3
    assert info.value.status == 429
    assert info.value.headers["x-request-id"] == upstream.requests[-1].request_id
    assert isinstance(info.value.__cause__, UpstreamError)
    assert len(clock.sleeps) == 2
    assert all(0.0 <= wait <= 0.5 * 2**n for n, wait in enumerate(clock.sleeps))


def test_a_wait_longer_than_max_delay_gives_up_at_once(clock: FakeClock) -> None:
    with (
        FakeUpstream(clock=clock, quota_requests=1, quota_window=600.0) as upstream,
        make_client(upstream, clock=clock, budget=False) as client,
    ):
        client.chat(HELLO)
        with pytest.raises(RateLimitExceeded) as info:
            client.chat(HELLO)
    assert info.value.attempts == 1
    assert clock.sleeps == []


def test_pacing_waits_for_the_window_instead_of_earning_a_429(clock: FakeClock) -> None:
    with FakeUpstream(clock=clock, quota_requests=3, quota_window=10.0) as upstream:
        with make_client(upstream, clock=clock) as client:  # budget on by default
            for _ in range(7):
                client.chat(HELLO)
        assert upstream.stats() == {"200": 7, "total": 7}  # no 429 at all
    assert len(clock.sleeps) == 2  # one wait per exhausted window
    assert all(9.0 < wait <= 10.1 for wait in clock.sleeps)


def test_pacing_shares_a_store_between_clients(clock: FakeClock) -> None:
    store = "memory://"
    with FakeUpstream(clock=clock, quota_requests=2, quota_window=10.0) as upstream:
        shared = make_client(upstream, clock=clock, store=store)
        assert shared.budget is not None
        budget_store = shared.budget.store
        other = make_client(upstream, clock=clock, budget=budget_store)
        with shared, other:
            shared.chat(HELLO)
            other.chat(HELLO)
            other.chat(HELLO)  # the budget both share knows the window is spent
        assert upstream.stats() == {"200": 3, "total": 3}
    assert len(clock.sleeps) == 1


# -- the breaker -------------------------------------------------------------------------


def test_5xx_burst_opens_the_breaker_after_the_threshold_of_logical_calls(
    upstream: FakeUpstream, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ai_guard")
    upstream.configure(error_rate=1.0, error_statuses=(500, 503))
    options = {"registry": BreakerRegistry(), "failure_threshold": 3}
    with make_client(upstream, clock=clock, retries=2, breaker=options) as client:
        for _ in range(3):
            with pytest.raises(UpstreamError) as info:
                client.chat(HELLO)
            assert info.value.status in (500, 503)
        assert upstream.stats()["total"] == 9  # 3 logical calls x 3 attempts
        breaker = client.breaker_for(MODEL)
        assert breaker is not None
        assert breaker.state == "open"
        with pytest.raises(CircuitOpenError) as rejected:
            client.chat(HELLO)
        assert upstream.stats()["total"] == 9  # rejected without any request
        assert rejected.value.name == f"openai:{MODEL}"
        assert rejected.value.retry_after == pytest.approx(30.0, abs=5.0)
        # the upstream recovers; after the open timeout the trial calls close the circuit
        upstream.configure(error_rate=0.0)
        clock.advance(31)
        client.chat(HELLO)
        client.chat(HELLO)
        assert breaker.state == "closed"
    states = [r.circuit_state for r in call_records(caplog)]
    assert states == ["closed", "closed", "closed", "open", "half_open", "half_open"]


def test_429s_absorbed_by_the_retries_do_not_trip_the_breaker(clock: FakeClock) -> None:
    options = {"registry": BreakerRegistry(), "failure_threshold": 1}
    with FakeUpstream(clock=clock, quota_requests=1, quota_window=1.0) as upstream:
        with make_client(upstream, clock=clock, budget=False, breaker=options) as client:
            for _ in range(4):
                client.chat(HELLO)  # every call after the first meets one 429 first
            breaker = client.breaker_for(MODEL)
            assert breaker is not None
            assert breaker.state == "closed"
            assert breaker.metrics().failures == 0
        assert upstream.stats()["429"] == 3


def test_each_model_has_its_own_breaker(upstream: FakeUpstream, clock: FakeClock) -> None:
    options = {"registry": BreakerRegistry(), "failure_threshold": 1}
    with make_client(upstream, clock=clock, retries=0, breaker=options) as client:
        upstream.configure(error_rate=1.0)
        with pytest.raises(UpstreamError):
            client.chat(HELLO, model="gpt-4o")
        upstream.configure(error_rate=0.0)
        with pytest.raises(CircuitOpenError):
            client.chat(HELLO, model="gpt-4o")
        assert client.chat(HELLO, model="gpt-4o-mini").model == "gpt-4o-mini"


def test_a_ready_circuit_breaker_object_is_used_as_is(
    upstream: FakeUpstream, clock: FakeClock
) -> None:
    registry = BreakerRegistry()
    breaker = circuit_breaker(
        "shared-upstream", registry=registry, failure_threshold=1, clock=clock
    )
    with make_client(upstream, clock=clock, retries=0, breaker=breaker) as client:
        upstream.configure(error_rate=1.0)
        with pytest.raises(UpstreamError):
            client.chat(HELLO, model="gpt-4o")
        with pytest.raises(CircuitOpenError):  # one breaker for every model
            client.chat(HELLO, model="gpt-4o-mini")
        assert client.breaker_for("anything") is breaker


def test_breaker_can_be_turned_off(upstream: FakeUpstream, clock: FakeClock) -> None:
    upstream.configure(error_rate=1.0)
    with make_client(upstream, clock=clock, retries=0, breaker=False) as client:
        for _ in range(8):
            with pytest.raises(UpstreamError):
                client.chat(HELLO)
        assert client.breaker is None
        assert client.breaker_for(MODEL) is None
    assert upstream.stats()["total"] == 8


# -- routing -----------------------------------------------------------------------------


@pytest.fixture
def breaker_name() -> Iterator[str]:
    name = f"client-test-{uuid.uuid4().hex[:8]}:{{model}}"
    yield name
    for model in ("gpt-4o-mini", "gpt-4o"):
        default_registry().remove(name.format(model=model))


def test_router_falls_back_to_the_other_model_when_a_breaker_is_open(
    upstream: FakeUpstream, clock: FakeClock, breaker_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ai_guard")
    router = Router(breakers=breaker_name)
    breaker = {"name": breaker_name, "failure_threshold": 2}
    with make_client(
        upstream, model=None, router=router, breaker=breaker, retries=0, clock=clock
    ) as client:
        assert client.chat(HELLO, route=SIMPLE).model == "gpt-4o-mini"
        upstream.configure(error_rate=1.0)
        for _ in range(2):
            with pytest.raises(UpstreamError):
                client.chat(HELLO, route=SIMPLE)
        upstream.configure(error_rate=0.0)
        result = client.chat(HELLO, route={"task_type": "classification", "complexity_score": 2})
    assert result.model == "gpt-4o"
    assert [r.json["model"] for r in upstream.requests] == ["gpt-4o-mini"] * 3 + ["gpt-4o"]
    last = call_records(caplog)[-1]
    assert last.fallback_from == "gpt-4o-mini"
    assert last.tier == "full"
    assert "circuit is open" in last.route_reason


def test_routed_call_retries_once_on_the_next_model_when_the_breaker_rejects(
    upstream: FakeUpstream, clock: FakeClock
) -> None:
    # The router knows nothing of the client's breakers: @routed still moves on to the
    # next model when the chosen model's call is rejected, without an HTTP request.
    breaker = {"registry": BreakerRegistry(), "failure_threshold": 1}
    with make_client(
        upstream, model=None, router=Router(), breaker=breaker, retries=0, clock=clock
    ) as client:
        upstream.configure(error_rate=1.0)
        with pytest.raises(UpstreamError):
            client.chat(HELLO, route=SIMPLE)
        upstream.configure(error_rate=0.0)
        assert client.chat(HELLO, route=SIMPLE).model == "gpt-4o"
    assert [r.json["model"] for r in upstream.requests] == ["gpt-4o-mini", "gpt-4o"]


def test_a_pinned_model_is_not_routed(upstream: FakeUpstream) -> None:
    with make_client(upstream, router=Router()) as client:
        assert client.chat(HELLO, model="gpt-4o").model == "gpt-4o"
        assert client.chat(HELLO).model == MODEL  # the client's default model
        critical = RouteRequest("chat", 3, is_critical=True)
        assert client.chat(HELLO, route=critical).model == "gpt-4o"


# -- no answer ---------------------------------------------------------------------------


def test_timeouts_become_upstream_timeout_errors_after_the_retries(clock: FakeClock) -> None:
    with FakeUpstream(timeout_rate=1.0, hang_seconds=10) as upstream:
        with (
            make_client(upstream, clock=clock, retries=1, timeout=(2.0, 0.2)) as client,
            pytest.raises(UpstreamTimeoutError) as info,
        ):
            client.chat(HELLO)
        assert [r.fault for r in upstream.requests] == ["timeout", "timeout"]
        assert len({r.idempotency_key for r in upstream.requests}) == 1
    assert info.value.status is None
    assert "read timeout of 0.2s" in str(info.value)


def test_per_call_timeout_overrides_the_clients(clock: FakeClock) -> None:
    with (
        FakeUpstream(timeout_rate=1.0, hang_seconds=10) as upstream,
        make_client(upstream, clock=clock, retries=0, timeout=30) as client,
        pytest.raises(UpstreamTimeoutError),
    ):
        client.chat(HELLO, timeout=(2.0, 0.1))


def test_connection_resets_are_retried_then_raised(clock: FakeClock) -> None:
    with (
        FakeUpstream(reset_rate=1.0) as upstream,
        make_client(upstream, clock=clock, retries=2) as client,
    ):
        with pytest.raises(UpstreamConnectionError) as info:
            client.chat(HELLO)
        assert upstream.stats() == {"reset": 3, "total": 3}
        assert len({r.idempotency_key for r in upstream.requests}) == 1
        # the pool recovers: the next call gets a fresh connection
        upstream.configure(reset_rate=0.0)
        assert client.chat(HELLO).content
    assert info.value.status is None


# -- metrics, logs, spans ----------------------------------------------------------------


def test_collector_counts_every_call_with_tokens_and_cost(upstream: FakeUpstream) -> None:
    collector = MetricsCollector()
    with make_client(upstream, collector=collector) as client:
        results = [client.chat([{"role": "user", "content": f"q{i}"}]) for i in range(5)]
        results.append(client.chat(HELLO, model="gpt-4o"))
        with pytest.raises(UpstreamError):
            client.chat(HELLO, model="unknown-model")
    report = collector.report()
    assert report["total_requests"] == 7
    assert report["mini_requests"] == 5
    assert report["full_requests"] == 1
    assert report["total_tokens"] == sum(r.usage.total_tokens for r in results)
    expected = sum(cost_usd(r.model, r.usage) or 0.0 for r in results)
    assert report["total_cost_usd"] == pytest.approx(expected, rel=1e-9)
    assert report["error_rate"] == pytest.approx(1 / 7)


def test_without_a_collector_calls_go_to_the_default_sinks(upstream: FakeUpstream) -> None:
    from ai_guard.metrics import default_collector

    before = default_collector().report()["total_requests"]
    with make_client(upstream) as client:
        client.chat(HELLO)
    assert default_collector().report()["total_requests"] == before + 1


def test_a_collector_of_the_client_keeps_its_calls_out_of_the_default_one(
    upstream: FakeUpstream,
) -> None:
    from ai_guard.metrics import default_collector

    before = default_collector().report()["total_requests"]
    with make_client(upstream, collector=MetricsCollector()) as client:
        client.chat(HELLO)
    assert default_collector().report()["total_requests"] == before


def test_one_log_record_per_call_with_the_results_figures(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ai_guard")
    with make_client(upstream, collector=MetricsCollector()) as client:
        results = [client.chat(HELLO), client.chat(HELLO, model="gpt-4o")]
    records = call_records(caplog)
    assert len(records) == 2
    for record, result in zip(records, results, strict=True):
        assert record.model == result.model
        assert record.input_tokens == result.usage.prompt_tokens
        assert record.output_tokens == result.usage.completion_tokens
        assert record.cost_usd == pytest.approx(cost_usd(result.model, result.usage))
        assert record.breaker == f"openai:{result.model}"
        assert record.idempotency_key_hash is not None
    keys = [r.idempotency_key or "" for r in upstream.requests]
    assert [r.idempotency_key_hash for r in records] == [hash_idempotency_key(k) for k in keys]


def test_one_span_per_logical_call_with_server_retries_and_usage(clock: FakeClock) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        with FakeUpstream(clock=clock, quota_requests=1, quota_window=1.0) as upstream:
            with make_client(
                upstream, clock=clock, budget=False, tracing={"tracer_provider": provider}
            ) as client:
                client.chat(HELLO)
                result = client.chat(HELLO)  # one 429, one retry
            spans = exporter.get_finished_spans()
            assert len(spans) == 2
            span = spans[1]
            attributes: dict[str, Any] = dict(span.attributes or {})
            assert span.name == f"chat {MODEL}"
            assert attributes["server.address"] == "127.0.0.1"
            assert attributes["server.port"] == upstream.port
            assert attributes["ai_guard.retries"] == 1
            assert attributes["gen_ai.usage.input_tokens"] == result.usage.prompt_tokens
            assert attributes["ai_guard.circuit.state"] == "closed"
            key = upstream.requests[-1].idempotency_key
            assert key is not None
            assert attributes["ai_guard.idempotency_key.sha256"] == hash_idempotency_key(key)
            assert key not in repr(attributes)
    finally:
        provider.shutdown()


def test_tracing_off_still_counts_and_logs_the_call(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ai_guard")
    collector = MetricsCollector()
    with make_client(upstream, tracing=False, collector=collector) as client:
        client.chat(HELLO)
    assert collector.report()["total_requests"] == 1
    assert len(call_records(caplog)) == 1


# -- threads -----------------------------------------------------------------------------


def test_sixteen_threads_through_one_client_count_exactly(upstream: FakeUpstream) -> None:
    collector = MetricsCollector()
    threads, calls = 16, 20
    with make_client(upstream, collector=collector) as client:

        def work(worker: int) -> int:
            tokens = 0
            for i in range(calls):
                result = client.chat([{"role": "user", "content": f"worker {worker} call {i}"}])
                tokens += result.usage.total_tokens
            return tokens

        with ThreadPoolExecutor(max_workers=threads) as pool:
            futures = [pool.submit(work, n) for n in range(threads)]
            # the watchdog: a hang fails the test instead of blocking the suite
            tokens = sum(f.result(timeout=60) for f in futures)
    total = threads * calls
    assert upstream.stats() == {"200": total, "total": total}
    report = collector.report()
    assert report["total_requests"] == total
    assert report["total_tokens"] == tokens
    assert report["error_rate"] == 0.0
    assert len({r.idempotency_key for r in upstream.requests}) == total
