from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as semconv_gen_ai
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as semconv_metrics
from opentelemetry.semconv.attributes import error_attributes, server_attributes
from opentelemetry.trace import SpanKind, StatusCode

from ai_guard import tracing
from ai_guard.context import CallContext, bind_sinks, current_call
from ai_guard.errors import CircuitOpenError, ConfigError, StreamError, UpstreamError
from ai_guard.pricing import ModelSpec
from ai_guard.routing import Router, RouteRequest, routed
from ai_guard.testing import FakeClock
from ai_guard.tracing import (
    CAPTURE_CONTENT_ENV,
    DURATION_BUCKETS,
    TOKEN_USAGE_BUCKETS,
    ai_span_attributes,
    breaker_span_event,
    hash_idempotency_key,
    traced_ai,
)
from ai_guard.types import ChatResult, StreamEvent, Usage

MINI_RESULT = ChatResult(
    content="positive",
    model="gpt-4o-mini-2024-07-18",
    usage=Usage(prompt_tokens=1200, completion_tokens=8, total_tokens=1208, cached_tokens=1024),
    finish_reason="stop",
    id="chatcmpl-abc",
)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
def metric_reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter_provider(metric_reader: InMemoryMetricReader) -> Iterator[MeterProvider]:
    provider = MeterProvider(metric_readers=[metric_reader])
    yield provider
    provider.shutdown()


@pytest.fixture
def calls() -> Iterator[list[CallContext]]:
    """The contexts emitted to the sinks during the test."""
    emitted: list[CallContext] = []
    with bind_sinks(emitted.append):
        yield emitted


def only_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = exporter.get_finished_spans()
    assert len(spans) == 1, [s.name for s in spans]
    return spans[0]


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    points: dict[str, list[Any]] = {}
    if data is None:
        return points
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
                assert (
                    metric.unit
                    == {
                        "gen_ai.client.operation.duration": "s",
                        "gen_ai.client.token.usage": "{token}",
                    }[metric.name]
                )
    return points


# -- names ------------------------------------------------------------------------------


def test_attribute_and_metric_names_match_the_semantic_conventions_package() -> None:
    pairs = [
        (tracing.GEN_AI_OPERATION_NAME, semconv_gen_ai.GEN_AI_OPERATION_NAME),
        (tracing.GEN_AI_PROVIDER_NAME, semconv_gen_ai.GEN_AI_PROVIDER_NAME),
        (tracing.GEN_AI_SYSTEM, semconv_gen_ai.GEN_AI_SYSTEM),
        (tracing.GEN_AI_REQUEST_MODEL, semconv_gen_ai.GEN_AI_REQUEST_MODEL),
        (tracing.GEN_AI_REQUEST_STREAM, semconv_gen_ai.GEN_AI_REQUEST_STREAM),
        (tracing.GEN_AI_RESPONSE_MODEL, semconv_gen_ai.GEN_AI_RESPONSE_MODEL),
        (tracing.GEN_AI_RESPONSE_ID, semconv_gen_ai.GEN_AI_RESPONSE_ID),
        (tracing.GEN_AI_RESPONSE_FINISH_REASONS, semconv_gen_ai.GEN_AI_RESPONSE_FINISH_REASONS),
        (tracing.GEN_AI_USAGE_INPUT_TOKENS, semconv_gen_ai.GEN_AI_USAGE_INPUT_TOKENS),
        (tracing.GEN_AI_USAGE_OUTPUT_TOKENS, semconv_gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS),
        (
            tracing.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
            semconv_gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
        ),
        (tracing.GEN_AI_INPUT_MESSAGES, semconv_gen_ai.GEN_AI_INPUT_MESSAGES),
        (tracing.GEN_AI_OUTPUT_MESSAGES, semconv_gen_ai.GEN_AI_OUTPUT_MESSAGES),
        (tracing.GEN_AI_TOKEN_TYPE, semconv_gen_ai.GEN_AI_TOKEN_TYPE),
        (tracing.SERVER_ADDRESS, server_attributes.SERVER_ADDRESS),
        (tracing.SERVER_PORT, server_attributes.SERVER_PORT),
        (tracing.ERROR_TYPE, error_attributes.ERROR_TYPE),
        (
            tracing.GEN_AI_CLIENT_OPERATION_DURATION,
            semconv_metrics.GEN_AI_CLIENT_OPERATION_DURATION,
        ),
        (tracing.GEN_AI_CLIENT_TOKEN_USAGE, semconv_metrics.GEN_AI_CLIENT_TOKEN_USAGE),
    ]
    for ours, convention in pairs:
        assert ours == convention


def test_bucket_boundaries_are_the_conventions() -> None:
    # docs/gen-ai/gen-ai-metrics.md: powers of 4 for tokens, doubling from 10 ms for time.
    assert tuple(4**i for i in range(14)) == TOKEN_USAGE_BUCKETS
    assert tuple(round(0.01 * 2**i, 2) for i in range(14)) == DURATION_BUCKETS


# -- one call, one span -----------------------------------------------------------------


def test_span_is_a_client_span_named_operation_and_model_with_genai_attributes(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    calls: list[CallContext],
) -> None:
    @traced_ai(operation="chat", tracer_provider=tracer_provider)
    def ask(prompt: str, *, model: str) -> ChatResult:
        return MINI_RESULT

    assert ask("is this good?", model="gpt-4o-mini") is MINI_RESULT
    span = only_span(exporter)
    assert span.name == "chat gpt-4o-mini"
    assert span.kind is SpanKind.CLIENT
    assert span.status.status_code is StatusCode.OK
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert attrs["gen_ai.response.id"] == "chatcmpl-abc"
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.usage.input_tokens"] == 1200
    assert attrs["gen_ai.usage.output_tokens"] == 8
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 1024
    assert attrs["gen_ai.request.stream"] is False
    assert attrs["ai_guard.cache_hit"] is True
    assert attrs["ai_guard.retries"] == 0
    expected_cost = (176 * 0.15 + 1024 * 0.075 + 8 * 0.60) / 1e6
    assert attrs["ai_guard.cost_usd"] == pytest.approx(expected_cost)
    # The span and the sinks read the same context: same figures, and the ids correlate.
    (ctx,) = calls
    assert attrs["ai_guard.latency_ms"] == ctx.latency_ms
    assert ctx.cost_usd == pytest.approx(expected_cost)
    assert ctx.trace_id == format(span.context.trace_id, "032x")
    assert ctx.span_id == format(span.context.span_id, "016x")
    assert "gen_ai.system" not in attrs
    assert not any(key.startswith("gen_ai.input") or "output.messages" in key for key in attrs)


def test_raw_openai_dict_result_is_attributed(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    body = {
        "id": "chatcmpl-9",
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {"message": {"content": "a"}, "finish_reason": "stop"},
            {"message": {"content": "b"}, "finish_reason": "length"},
        ],
        "usage": {"prompt_tokens": 30, "completion_tokens": 12},
    }

    @traced_ai(tracer_provider=tracer_provider)
    def ask(*, model: str) -> dict[str, Any]:
        return body

    ask(model="gpt-4o")
    attrs = dict(only_span(exporter).attributes or {})
    assert attrs["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert attrs["gen_ai.response.finish_reasons"] == ("stop", "length")
    assert attrs["gen_ai.usage.input_tokens"] == 30
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 0
    assert attrs["ai_guard.cache_hit"] is False
    assert attrs["ai_guard.cost_usd"] == pytest.approx((30 * 2.5 + 12 * 10.0) / 1e6)


def test_span_without_model_is_named_by_the_operation_alone(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    @traced_ai(operation="embeddings", provider="azure.ai.openai", tracer_provider=tracer_provider)
    def embed(text: str) -> list[float]:
        return [0.1]

    embed("x")
    span = only_span(exporter)
    assert span.name == "embeddings"
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.provider.name"] == "azure.ai.openai"
    assert "gen_ai.request.model" not in attrs
    assert "gen_ai.usage.input_tokens" not in attrs  # unknown is not zero


def test_model_chosen_during_the_call_names_the_span_when_it_ends(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    @traced_ai(tracer_provider=tracer_provider)
    def ask(prompt: str) -> ChatResult:
        ctx = current_call()
        assert ctx is not None
        ctx.request_model = "gpt-4o"  # what a client routing inside the span would write
        return MINI_RESULT

    ask("hi")
    span = only_span(exporter)
    assert span.name == "chat gpt-4o"
    assert dict(span.attributes or {})["gen_ai.request.model"] == "gpt-4o"


def test_legacy_gen_ai_system_only_when_asked(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    @traced_ai(tracer_provider=tracer_provider, emit_gen_ai_system=True)
    def ask(*, model: str) -> ChatResult:
        return MINI_RESULT

    ask(model="gpt-4o-mini")
    assert dict(only_span(exporter).attributes or {})["gen_ai.system"] == "openai"


def test_server_address_and_port_when_configured(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    @traced_ai(tracer_provider=tracer_provider, server_address="api.openai.com", server_port=443)
    def ask(*, model: str) -> ChatResult:
        return MINI_RESULT

    ask(model="gpt-4o-mini")
    attrs = dict(only_span(exporter).attributes or {})
    assert attrs["server.address"] == "api.openai.com"
    assert attrs["server.port"] == 443


# -- errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "error_type"),
    [
        (UpstreamError("upstream said 503", status=503), "503"),
        (TimeoutError("read timed out"), "TimeoutError"),
        (CircuitOpenError("openai:gpt-4o-mini", 12.5), "CircuitOpenError"),
    ],
)
def test_error_sets_status_error_records_exception_and_error_type(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    calls: list[CallContext],
    error: Exception,
    error_type: str,
) -> None:
    @traced_ai(tracer_provider=tracer_provider)
    def ask(*, model: str) -> ChatResult:
        raise error

    with pytest.raises(type(error)):
        ask(model="gpt-4o-mini")
    span = only_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert type(error).__name__ in (span.status.description or "")
    assert dict(span.attributes or {})["error.type"] == error_type
    (event,) = [e for e in span.events if e.name == "exception"]
    assert str((event.attributes or {})["exception.type"]).endswith(type(error).__name__)
    assert calls[0].error_type == error_type


def test_stream_error_event_marks_the_span_as_failed(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    @traced_ai(tracer_provider=tracer_provider)
    def stream(*, model: str) -> Iterator[StreamEvent]:
        yield StreamEvent("content", content="par")
        yield StreamEvent("error", error=StreamError("dropped", partial_content="par"))

    assert [e.type for e in stream(model="gpt-4o-mini")] == ["content", "error"]
    span = only_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "StreamError"


# -- facts from the inner guards --------------------------------------------------------


def test_facts_inner_guards_write_during_the_call_appear_on_the_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    raw_key = "order-4242-payment-retry"

    @traced_ai(tracer_provider=tracer_provider)
    def ask(*, model: str) -> ChatResult:
        ctx = current_call()
        assert ctx is not None
        # what @circuit_breaker, @rate_limited and @idempotent write while the call runs
        ctx.breaker = "openai:gpt-4o-mini"
        ctx.circuit_state = "half_open"
        ctx.retries = 2
        ctx.rate_limit_wait_s = 1.5
        ctx.idempotency_key = raw_key
        return MINI_RESULT

    ask(model="gpt-4o-mini")
    attrs = dict(only_span(exporter).attributes or {})
    assert attrs["ai_guard.retries"] == 2
    assert attrs["ai_guard.rate_limit.wait_s"] == 1.5
    assert attrs["ai_guard.circuit.name"] == "openai:gpt-4o-mini"
    assert attrs["ai_guard.circuit.state"] == "half_open"
    assert attrs["ai_guard.idempotency_key.sha256"] == hash_idempotency_key(raw_key)
    assert attrs["ai_guard.idempotent_replay"] is False
    assert not any(raw_key in str(value) for value in attrs.values())


def test_hashed_idempotency_key_is_stable_short_and_not_the_key() -> None:
    hashed = hash_idempotency_key("key-1")
    assert hashed == hash_idempotency_key("key-1")
    assert hashed != hash_idempotency_key("key-2")
    assert len(hashed) == 16
    assert int(hashed, 16) >= 0
    assert "key" not in hashed


class _Breaker:
    def __init__(self, name: str, state: str = "closed", retry_after: float = 0.0) -> None:
        self.name = name
        self.state = state
        self.retry_after = retry_after


def test_route_decision_and_router_prices_appear_on_the_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, calls: list[CallContext]
) -> None:
    mini = ModelSpec(name="small-1", tier="mini", input_price=1.0, output_price=2.0)
    full = ModelSpec(name="large-1", tier="full", input_price=10.0, output_price=20.0)
    breakers = {"small-1": _Breaker("up:small-1", "open", 9.0), "large-1": _Breaker("up:large-1")}
    router = Router([mini, full], breakers=breakers)

    @routed(router, request=lambda text, **_: RouteRequest("classification", 2))
    @traced_ai(tracer_provider=tracer_provider)
    def classify(text: str, *, model: str = "") -> ChatResult:
        return ChatResult(content="x", model=model, usage=Usage(1000, 100, 1100, 0))

    classify("hello")
    span = only_span(exporter)
    assert span.name == "chat large-1"
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.request.model"] == "large-1"
    assert attrs["ai_guard.route.tier"] == "full"
    assert attrs["ai_guard.route.fallback_from"] == "small-1"
    assert "circuit is open" in str(attrs["ai_guard.route.reason"])
    assert attrs["ai_guard.cost_usd"] == pytest.approx((1000 * 10.0 + 100 * 20.0) / 1e6)
    (ctx,) = calls  # @routed owns the context: one emission, with the same figures
    assert ctx.cost_usd == attrs["ai_guard.cost_usd"]
    assert ctx.trace_id == format(span.context.trace_id, "032x")


def test_routed_retry_after_circuit_open_gives_two_spans_one_failed(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, calls: list[CallContext]
) -> None:
    router = Router()
    models_called: list[str] = []

    @routed(router, request=lambda **_: RouteRequest("chat", 1))
    @traced_ai(tracer_provider=tracer_provider)
    def ask(*, model: str = "") -> ChatResult:
        models_called.append(model)
        if model == "gpt-4o-mini":
            raise CircuitOpenError("openai:gpt-4o-mini", 20.0)
        return ChatResult(content="x", model=model, usage=Usage(10, 1, 11, 0))

    ask()
    assert models_called == ["gpt-4o-mini", "gpt-4o"]
    first, second = exporter.get_finished_spans()
    assert first.name == "chat gpt-4o-mini"
    assert first.status.status_code is StatusCode.ERROR
    assert dict(first.attributes or {})["error.type"] == "CircuitOpenError"
    assert second.name == "chat gpt-4o"
    assert second.status.status_code is StatusCode.OK
    assert dict(second.attributes or {})["ai_guard.route.fallback_from"] == "gpt-4o-mini"
    (ctx,) = calls
    assert ctx.error_type is None
    assert ctx.span_id == format(second.context.span_id, "016x")


def test_breaker_state_change_becomes_an_event_on_the_current_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    class Event:
        breaker = "openai:gpt-4o"
        from_state = "closed"
        to_state = "open"
        reason = "5 failures in 60s"
        retry_after = 30.0

    @traced_ai(tracer_provider=tracer_provider)
    def ask(*, model: str) -> ChatResult:
        breaker_span_event(Event())
        return MINI_RESULT

    ask(model="gpt-4o")
    breaker_span_event(Event())  # outside any span: nothing, no error
    (event,) = only_span(exporter).events
    assert event.name == "ai_guard.circuit.state_change"
    assert dict(event.attributes or {}) == {
        "ai_guard.circuit.name": "openai:gpt-4o",
        "ai_guard.circuit.from_state": "closed",
        "ai_guard.circuit.state": "open",
        "ai_guard.circuit.reason": "5 failures in 60s",
        "ai_guard.circuit.retry_after_s": 30.0,
    }


# -- streams ----------------------------------------------------------------------------


def _stream_fn(tracer_provider: TracerProvider, clock: FakeClock) -> Any:
    @traced_ai(tracer_provider=tracer_provider, clock=clock)
    def stream(prompt: str, *, model: str) -> Iterator[StreamEvent]:
        yield StreamEvent("content", content="Hel", model="gpt-4o-mini-2024-07-18")
        clock.advance(0.5)
        yield StreamEvent("content", content="lo", finish_reason="stop")
        yield StreamEvent("usage", usage=Usage(20, 2, 22, 16))

    return stream


def test_stream_span_ends_when_the_stream_is_consumed(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, calls: list[CallContext]
) -> None:
    clock = FakeClock()
    events = _stream_fn(tracer_provider, clock)("hi", model="gpt-4o-mini")
    assert exporter.get_finished_spans() == ()
    assert [e.type for e in events] == ["content", "content", "usage"]
    span = only_span(exporter)
    attrs = dict(span.attributes or {})
    assert attrs["gen_ai.request.stream"] is True
    assert attrs["gen_ai.usage.input_tokens"] == 20
    assert attrs["gen_ai.usage.cache_read.input_tokens"] == 16
    assert attrs["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert attrs["ai_guard.latency_ms"] == pytest.approx(500.0)
    assert span.status.status_code is StatusCode.OK
    assert calls[0].latency_ms == pytest.approx(500.0)


def test_stream_closed_early_ends_the_span_without_error(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, calls: list[CallContext]
) -> None:
    events = _stream_fn(tracer_provider, FakeClock())("hi", model="gpt-4o-mini")
    assert next(iter(events)).content == "Hel"
    assert exporter.get_finished_spans() == ()
    events.close()
    span = only_span(exporter)
    assert span.status.status_code is StatusCode.OK
    assert "gen_ai.usage.input_tokens" not in dict(span.attributes or {})
    assert len(calls) == 1


def test_stream_that_raises_ends_the_span_with_the_error(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, calls: list[CallContext]
) -> None:
    @traced_ai(tracer_provider=tracer_provider)
    def stream(*, model: str) -> Iterator[StreamEvent]:
        yield StreamEvent("content", content="par")
        raise StreamError("connection dropped", partial_content="par")

    with pytest.raises(StreamError):
        list(stream(model="gpt-4o"))
    span = only_span(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert dict(span.attributes or {})["error.type"] == "StreamError"
    assert [e.name for e in span.events] == ["exception"]
    assert calls[0].error_type == "StreamError"


def test_spans_made_while_the_stream_runs_are_children_of_the_ai_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    inner_tracer = tracer_provider.get_tracer("http-client")

    @traced_ai(tracer_provider=tracer_provider)
    def stream(*, model: str) -> Iterator[StreamEvent]:
        with inner_tracer.start_as_current_span("POST /v1/chat/completions"):
            pass
        yield StreamEvent("content", content="a")
        with inner_tracer.start_as_current_span("read chunk"):
            pass
        yield StreamEvent("content", content="b")

    list(stream(model="gpt-4o-mini"))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    ai_span = spans["chat gpt-4o-mini"]
    for name in ("POST /v1/chat/completions", "read chunk"):
        parent = spans[name].parent
        assert parent is not None
        assert ai_span.context is not None
        assert parent.span_id == ai_span.context.span_id
    assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN


def test_spans_made_during_the_call_are_children_of_the_ai_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    http_tracer = tracer_provider.get_tracer("http-client")

    @traced_ai(tracer_provider=tracer_provider)
    def ask(*, model: str) -> ChatResult:
        with http_tracer.start_as_current_span("POST /v1/chat/completions"):
            return MINI_RESULT

    ask(model="gpt-4o-mini")
    http, ai = exporter.get_finished_spans()
    assert http.parent is not None
    assert ai.context is not None
    assert http.parent.span_id == ai.context.span_id
    assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN


# -- content capture (opt-in) -----------------------------------------------------------


def _chat(tracer_provider: TracerProvider, **options: Any) -> Any:
    @traced_ai(tracer_provider=tracer_provider, **options)
    def chat(messages: list[dict[str, Any]], *, model: str) -> ChatResult:
        return ChatResult(content="Paris.", model=model, finish_reason="stop")

    return chat


MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Capital of France?"},
]


def test_prompt_and_completion_are_not_recorded_by_default(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(CAPTURE_CONTENT_ENV, raising=False)
    _chat(tracer_provider)(MESSAGES, model="gpt-4o-mini")
    span = only_span(exporter)
    text = json.dumps(dict(span.attributes or {})) + json.dumps([e.name for e in span.events])
    assert "France" not in text
    assert "Paris" not in text
    assert "gen_ai.input.messages" not in (span.attributes or {})


def test_capture_content_records_messages_in_the_conventions_format(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    _chat(tracer_provider, capture_content=True)(MESSAGES, model="gpt-4o-mini")
    attrs = dict(only_span(exporter).attributes or {})
    assert json.loads(str(attrs["gen_ai.input.messages"])) == [
        {"role": "system", "parts": [{"type": "text", "content": "Answer briefly."}]},
        {"role": "user", "parts": [{"type": "text", "content": "Capital of France?"}]},
    ]
    assert json.loads(str(attrs["gen_ai.output.messages"])) == [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "Paris."}],
            "finish_reason": "stop",
        }
    ]


@pytest.mark.parametrize(("value", "captured"), [("true", True), ("TRUE", True), ("false", False)])
def test_environment_variable_opts_in_to_content_capture(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    value: str,
    captured: bool,
) -> None:
    monkeypatch.setenv(CAPTURE_CONTENT_ENV, value)
    _chat(tracer_provider)(MESSAGES, model="gpt-4o-mini")
    attrs = dict(only_span(exporter).attributes or {})
    assert ("gen_ai.input.messages" in attrs) is captured
    assert ("gen_ai.output.messages" in attrs) is captured


def test_captured_stream_output_is_the_concatenated_text(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    @traced_ai(tracer_provider=tracer_provider, capture_content=True)
    def stream(prompt: str, *, model: str) -> Iterator[StreamEvent]:
        yield StreamEvent("content", content="Hel")
        yield StreamEvent("content", content="lo")

    list(stream("Say hello", model="gpt-4o-mini"))
    attrs = dict(only_span(exporter).attributes or {})
    assert json.loads(str(attrs["gen_ai.input.messages"])) == [
        {"role": "user", "parts": [{"type": "text", "content": "Say hello"}]}
    ]
    assert json.loads(str(attrs["gen_ai.output.messages"])) == [
        {"role": "assistant", "parts": [{"type": "text", "content": "Hello"}]}
    ]


# -- metrics ----------------------------------------------------------------------------


def test_genai_metrics_use_the_conventions_buckets_and_attributes(
    meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
) -> None:
    clock = FakeClock()

    @traced_ai(meter_provider=meter_provider, clock=clock)
    def ask(*, model: str) -> ChatResult:
        clock.advance(0.3)
        return MINI_RESULT

    ask(model="gpt-4o-mini")
    ask(model="gpt-4o-mini")
    points = metric_points(metric_reader)
    (duration,) = points["gen_ai.client.operation.duration"]
    assert tuple(duration.explicit_bounds) == DURATION_BUCKETS
    assert duration.count == 2
    assert duration.sum == pytest.approx(0.6)
    assert dict(duration.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o-mini",
        "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
    }
    by_type = {p.attributes["gen_ai.token.type"]: p for p in points["gen_ai.client.token.usage"]}
    assert set(by_type) == {"input", "output"}
    assert tuple(by_type["input"].explicit_bounds) == TOKEN_USAGE_BUCKETS
    assert (by_type["input"].count, by_type["input"].sum) == (2, 2400)
    assert (by_type["output"].count, by_type["output"].sum) == (2, 16)


def test_failed_call_records_duration_with_error_type_and_no_token_usage(
    meter_provider: MeterProvider, metric_reader: InMemoryMetricReader
) -> None:
    @traced_ai(meter_provider=meter_provider)
    def ask(*, model: str) -> ChatResult:
        raise UpstreamError("bad gateway", status=502)

    with pytest.raises(UpstreamError):
        ask(model="gpt-4o")
    points = metric_points(metric_reader)
    (duration,) = points["gen_ai.client.operation.duration"]
    assert duration.attributes["error.type"] == "502"
    assert "gen_ai.client.token.usage" not in points


def test_metrics_and_spans_together(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    meter_provider: MeterProvider,
    metric_reader: InMemoryMetricReader,
) -> None:
    @traced_ai(tracer_provider=tracer_provider, meter_provider=meter_provider)
    def ask(*, model: str) -> ChatResult:
        return MINI_RESULT

    ask(model="gpt-4o-mini")
    assert only_span(exporter).name == "chat gpt-4o-mini"
    assert metric_points(metric_reader)["gen_ai.client.operation.duration"][0].count == 1


# -- no SDK -----------------------------------------------------------------------------


def test_without_an_sdk_no_span_work_is_done_but_the_call_is_still_emitted(
    calls: list[CallContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tracing._global_tracer_provider() is None  # no test installs a global provider
    resolved: list[Any] = []
    original = tracing._tracer_for

    def spy(provider: Any) -> Any:
        resolved.append(provider)
        return original(provider)

    monkeypatch.setattr(tracing, "_tracer_for", spy)

    @traced_ai(operation="chat")
    def ask(*, model: str) -> ChatResult:
        assert otel_trace.get_current_span() is otel_trace.INVALID_SPAN
        return MINI_RESULT

    for _ in range(3):
        assert ask(model="gpt-4o-mini") is MINI_RESULT
    assert resolved == []  # the providers were never even looked at beyond identity
    assert len(calls) == 3
    assert calls[0].operation == "chat"
    assert calls[0].request_model == "gpt-4o-mini"
    assert calls[0].trace_id is None


def test_a_global_provider_installed_after_decoration_is_picked_up(
    exporter: InMemorySpanExporter,
    tracer_provider: TracerProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    @traced_ai(operation="chat")
    def ask(*, model: str) -> ChatResult:
        return MINI_RESULT

    ask(model="gpt-4o-mini")
    assert exporter.get_finished_spans() == ()
    # What trace.set_tracer_provider() does, undone after the test (the API allows it once
    # per process, which the test suite cannot spend).
    monkeypatch.setattr(otel_trace, "_TRACER_PROVIDER", tracer_provider)
    ask(model="gpt-4o-mini")
    assert only_span(exporter).name == "chat gpt-4o-mini"
    monkeypatch.undo()
    ask(model="gpt-4o-mini")
    assert len(exporter.get_finished_spans()) == 1


def test_unsampled_span_costs_no_attributes_and_still_returns(
    exporter: InMemorySpanExporter, calls: list[CallContext]
) -> None:
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    @traced_ai(tracer_provider=provider)
    def ask(*, model: str) -> ChatResult:
        return MINI_RESULT

    assert ask(model="gpt-4o-mini") is MINI_RESULT
    assert exporter.get_finished_spans() == ()
    assert len(calls) == 1


# -- the decorator itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"operation": ""}, "operation"),
        ({"provider": ""}, "provider"),
        ({"server_port": 0}, "server_port"),
        ({"server_port": 70000}, "server_port"),
        ({"model_kwarg": ""}, "model_kwarg"),
    ],
)
def test_bad_settings_are_rejected_at_decoration(options: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        traced_ai(**options)
    assert info.value.setting == setting


def test_signature_and_name_survive_decoration() -> None:
    def ask(prompt: str, *, model: str, temperature: float = 0.0) -> ChatResult:
        """Ask."""
        return MINI_RESULT

    traced = traced_ai()(ask)
    assert traced.__name__ == "ask"
    assert traced.__doc__ == "Ask."
    assert inspect.signature(traced) == inspect.signature(ask)


def test_concurrent_calls_each_get_their_own_span_and_context(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, calls: list[CallContext]
) -> None:
    threads, per_thread = 16, 25
    models = ["gpt-4o-mini", "gpt-4o"]
    emitted: list[CallContext] = []
    lock = threading.Lock()

    def sink(ctx: CallContext) -> None:
        with lock:
            emitted.append(ctx)

    @traced_ai(tracer_provider=tracer_provider)
    def ask(i: int, *, model: str) -> ChatResult:
        ctx = current_call()
        assert ctx is not None
        assert ctx.request_model == model
        return ChatResult(content=str(i), model=model, usage=Usage(i, 1, i + 1, 0))

    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        barrier.wait()
        try:
            with bind_sinks(sink):
                for i in range(per_thread):
                    n = t * per_thread + i
                    ask(n, model=models[n % 2])
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == []
    spans = exporter.get_finished_spans()
    assert len(spans) == threads * per_thread
    assert len({s.context.span_id for s in spans}) == len(spans)
    for span in spans:
        attrs = dict(span.attributes or {})
        n = int(str(attrs["gen_ai.usage.input_tokens"]))
        assert span.name == f"chat {models[n % 2]}"
    assert len(emitted) == threads * per_thread
    assert sorted(c.input_tokens for c in emitted) == list(range(threads * per_thread))
    assert {(c.span_id, c.input_tokens) for c in emitted} == {
        (format(s.context.span_id, "016x"), (s.attributes or {})["gen_ai.usage.input_tokens"])
        for s in spans
    }


# -- ai_span_attributes ---------------------------------------------------------------


def test_ai_span_attributes_from_a_chat_result() -> None:
    attrs = ai_span_attributes(MINI_RESULT, request_model="gpt-4o-mini")
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.request.model"] == "gpt-4o-mini"
    assert attrs["gen_ai.usage.input_tokens"] == 1200
    assert attrs["ai_guard.cost_usd"] == pytest.approx((176 * 0.15 + 1024 * 0.075 + 8 * 0.6) / 1e6)
    assert "positive" not in json.dumps(attrs)  # never the completion text


def test_ai_span_attributes_from_a_raw_dict_and_from_a_context() -> None:
    attrs = ai_span_attributes(
        {"model": "gpt-4o", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}},
        operation="text_completion",
        provider="azure.ai.openai",
    )
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["gen_ai.provider.name"] == "azure.ai.openai"
    assert attrs["gen_ai.response.model"] == "gpt-4o"

    ctx = CallContext(0.0)
    ctx.operation, ctx.provider, ctx.request_model = "chat", "openai", "gpt-4o"
    ctx.error_type = "429"
    ctx.tier, ctx.route_reason = "full", "Critical request: full tier."
    ctx.idempotency_key = "k-1"
    ctx.latency_ms = 12.5
    attrs = ai_span_attributes(ctx)
    assert attrs["error.type"] == "429"
    assert attrs["ai_guard.route.tier"] == "full"
    assert attrs["ai_guard.latency_ms"] == 12.5
    assert attrs["ai_guard.idempotency_key.sha256"] == hash_idempotency_key("k-1")
    assert "gen_ai.usage.input_tokens" not in attrs
    assert "ai_guard.cost_usd" not in attrs  # no usage, no cost
