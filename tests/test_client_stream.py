"""AIClient.stream_chat against a real FakeUpstream: events, usage, streams that break
mid-way, early stops, and the guards around establishing the stream."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from ai_guard.breaker import BreakerRegistry
from ai_guard.client import AIClient
from ai_guard.errors import CircuitOpenError, StreamError, UpstreamError
from ai_guard.metrics import MetricsCollector
from ai_guard.streaming import collect_stream
from ai_guard.testing import FakeClock, FakeUpstream
from ai_guard.types import StreamEvent
from tests.test_client import HELLO, MODEL, forget_default_breakers, make_client

__all__ = ["forget_default_breakers"]  # the autouse fixture, shared with test_client.py


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def collector() -> MetricsCollector:
    return MetricsCollector()


@pytest.fixture
def client(upstream: FakeUpstream, collector: MetricsCollector) -> Iterator[AIClient]:
    with make_client(upstream, collector=collector) as guarded:
        yield guarded


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e.content for e in events if e.type == "content")


def test_stream_yields_content_deltas_then_usage(
    client: AIClient, upstream: FakeUpstream, collector: MetricsCollector
) -> None:
    events = list(client.stream_chat(HELLO, temperature=0))
    kinds = [e.type for e in events]
    assert kinds[-1] == "usage"
    assert set(kinds[:-1]) == {"content"}
    assert len(kinds) > 2
    usage = events[-1].usage
    assert usage is not None
    assert usage.completion_tokens > 0
    assert events[-1].model == MODEL
    assert events[-1].finish_reason == "stop"
    sent = upstream.requests[0].json
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["temperature"] == 0
    # the whole text equals what the same prompt gives without streaming
    assert text_of(events) == client.chat(HELLO).content
    report = collector.report()
    assert report["total_requests"] == 2
    assert report["total_tokens"] == 2 * usage.total_tokens


def test_caller_stream_options_are_kept_with_usage_forced_on(
    client: AIClient, upstream: FakeUpstream
) -> None:
    list(client.stream_chat(HELLO, stream_options={"include_usage": False, "x": 1}))
    assert upstream.requests[0].json["stream_options"] == {"include_usage": True, "x": 1}


def test_usage_on_the_finish_chunk_is_read_too(client: AIClient, upstream: FakeUpstream) -> None:
    upstream.configure(usage_on_finish_chunk=True, sse_noise=True)
    events = list(client.stream_chat(HELLO))
    assert events[-1].type == "usage"
    assert events[-1].usage is not None
    assert events[-1].usage.prompt_tokens > 0


def test_stream_folds_into_a_chat_result(client: AIClient) -> None:
    result = collect_stream(client.stream_chat(HELLO))
    assert result.content
    assert result.model == MODEL
    assert result.usage.total_tokens > 0


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"stream_drop_after": 3}, "connection dropped"),
        ({"stream_error_after": 3}, "error event"),
        ({"malformed_sse": True}, "malformed"),
    ],
)
def test_a_stream_that_breaks_ends_with_an_error_event_keeping_the_partial_content(
    client: AIClient,
    upstream: FakeUpstream,
    collector: MetricsCollector,
    caplog: pytest.LogCaptureFixture,
    fault: dict[str, object],
    message: str,
) -> None:
    caplog.set_level(logging.INFO, logger="ai_guard")
    upstream.configure(**fault)
    events = list(client.stream_chat(HELLO))
    error = events[-1]
    assert error.type == "error"
    assert isinstance(error.error, StreamError)
    assert message in str(error.error)
    assert error.error.partial_content == text_of(events)
    assert all(e.type == "content" for e in events[:-1])
    if "malformed_sse" not in fault:
        assert error.error.partial_content  # some text arrived before the break
    assert collector.report()["error_rate"] == 1.0
    (record,) = [r for r in caplog.records if getattr(r, "event", None) == "ai_call"]
    record_fields: dict[str, Any] = vars(record)
    assert record_fields["error_type"] == "StreamError"
    assert record_fields["stream"] is True


def test_a_broken_stream_is_not_retried(client: AIClient, upstream: FakeUpstream) -> None:
    upstream.configure(stream_drop_after=2)
    events = list(client.stream_chat(HELLO))
    assert events[-1].type == "error"
    assert upstream.stats()["total"] == 1  # mid-stream: the retry would duplicate text


def server_connections() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "FakeUpstream-connection"]


def test_stopping_early_closes_the_response_and_records_the_call(
    upstream: FakeUpstream, collector: MetricsCollector
) -> None:
    # 300 chunks, 20 ms apart: reading the stream to its end would take 6 s.
    upstream.configure(completion_tokens=300, stream_chunk_delay=0.02)
    with make_client(upstream, collector=collector) as client:
        started = time.monotonic()
        stream = client.stream_chat(HELLO)
        first = next(stream)
        (connection,) = server_connections()
        stream.close()
        # The server's side of the connection ends: the client closed it (a drained or
        # abandoned response would keep it streaming for seconds).
        connection.join(timeout=3.0)
        assert not connection.is_alive()
        assert time.monotonic() - started < 2.0
        assert first.type == "content"
        assert collector.report()["total_requests"] == 1  # recorded when it stopped
        for _ in client.stream_chat(HELLO):  # `break` out of a for loop
            break
        gc.collect()  # an unclosed socket would surface here as an error
        assert collector.report()["total_requests"] == 2
        upstream.configure(completion_tokens=5, stream_chunk_delay=0.0)
        assert client.chat(HELLO).content  # the client still works
        assert collector.report()["total_requests"] == 3
        assert collector.report()["error_rate"] == 0.0  # stopping early is not an error
        breaker = client.breaker_for(MODEL)
        assert breaker is not None
        assert breaker.metrics().failures == 0


def test_a_stream_that_is_never_iterated_makes_no_request(
    client: AIClient, upstream: FakeUpstream
) -> None:
    stream = client.stream_chat(HELLO)
    del stream
    gc.collect()
    assert upstream.stats() == {}


def test_errors_before_the_first_byte_raise_from_the_loop(
    client: AIClient, upstream: FakeUpstream
) -> None:
    with pytest.raises(UpstreamError) as info:
        for _ in client.stream_chat(HELLO, model="no-such-model"):
            pass
    assert info.value.status == 404
    assert info.value.body["error"]["code"] == "model_not_found"


def test_a_429_before_the_stream_starts_is_retried(fake_clock: FakeClock) -> None:
    with FakeUpstream(clock=fake_clock, quota_requests=1, quota_window=1.0) as upstream:
        with make_client(upstream, clock=fake_clock, budget=False) as client:
            list(client.stream_chat(HELLO))
            events = list(client.stream_chat(HELLO))
        assert events[-1].type == "usage"
        assert [r.status for r in upstream.requests] == [200, 429, 200]
        assert upstream.requests[1].idempotency_key == upstream.requests[2].idempotency_key
    assert len(fake_clock.sleeps) == 1


def test_broken_streams_count_for_the_breaker(
    upstream: FakeUpstream, fake_clock: FakeClock
) -> None:
    options = {"registry": BreakerRegistry(), "failure_threshold": 2}
    with make_client(upstream, clock=fake_clock, breaker=options) as client:
        upstream.configure(stream_drop_after=1)
        for _ in range(2):
            assert list(client.stream_chat(HELLO))[-1].type == "error"
        with pytest.raises(CircuitOpenError):
            list(client.stream_chat(HELLO))
    assert upstream.stats()["total"] == 2


def test_streams_from_many_threads_are_all_counted(
    upstream: FakeUpstream, collector: MetricsCollector
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with make_client(upstream, collector=collector) as client:

        def work(n: int) -> int:
            return sum(
                1
                for e in client.stream_chat([{"role": "user", "content": f"t{n}"}])
                if e.type == "usage"
            )

        with ThreadPoolExecutor(max_workers=8) as pool:
            done = sum(f.result(timeout=60) for f in [pool.submit(work, n) for n in range(40)])
    assert done == 40
    assert collector.report()["total_requests"] == 40
    assert upstream.stats() == {"200": 40, "total": 40}


def test_the_span_of_a_stream_ends_when_the_stream_ends(upstream: FakeUpstream) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        with make_client(upstream, tracing={"tracer_provider": provider}) as client:
            stream = client.stream_chat(HELLO)
            events = [next(stream), next(stream)]
            assert exporter.get_finished_spans() == ()  # still streaming
            events += list(stream)
            (complete,) = exporter.get_finished_spans()
            upstream.configure(stream_drop_after=2)
            list(client.stream_chat(HELLO))
            upstream.configure(stream_drop_after=None)
            early = client.stream_chat(HELLO)
            next(early)
            early.close()
        spans = exporter.get_finished_spans()
    finally:
        provider.shutdown()
    assert len(spans) == 3
    usage = events[-1].usage
    assert usage is not None
    attributes = dict(complete.attributes or {})
    assert attributes["gen_ai.request.stream"] is True
    assert attributes["gen_ai.usage.output_tokens"] == usage.completion_tokens
    assert complete.status.is_ok
    assert spans[1].status.status_code.name == "ERROR"
    assert dict(spans[1].attributes or {})["error.type"] == "StreamError"
    assert spans[2].status.status_code.name != "ERROR"  # stopped early: not an error
