from __future__ import annotations

import io
import json
import logging
import sys
import threading
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ai_guard import logs
from ai_guard.context import (
    CallContext,
    bind_sinks,
    close_call,
    current_call,
    default_sinks,
    open_call,
)
from ai_guard.errors import UpstreamError
from ai_guard.logs import CALL_FIELDS, JSONFormatter, RedactingFilter, log_call, redact
from ai_guard.routing import Router, RouteRequest, routed
from ai_guard.testing import FakeClock
from ai_guard.tracing import hash_idempotency_key, traced_ai
from ai_guard.types import ChatResult, Usage

API_KEY = "sk-proj-Z9x8W7v6U5t4S3r2Q1p0"
PROMPT = "my bank password is hunter2, summarise my statement"


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Captures the ``ai_guard`` loggers at INFO and above, during the test."""
    caplog.set_level(logging.INFO, logger="ai_guard")
    return caplog


def call_records(
    source: pytest.LogCaptureFixture | list[logging.LogRecord],
) -> list[logging.LogRecord]:
    records = source.records if isinstance(source, pytest.LogCaptureFixture) else source
    return [r for r in records if getattr(r, "event", None) == "ai_call"]


def test_the_call_logger_is_a_default_sink() -> None:
    assert log_call in default_sinks()


def test_one_info_record_per_ai_call_with_the_same_fields_as_the_span(
    records: pytest.LogCaptureFixture,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    clock = FakeClock()

    @routed(Router(), request=lambda text, **_: RouteRequest("classification", 2), clock=clock)
    @traced_ai(tracer_provider=provider, clock=clock)
    def classify(text: str, *, model: str = "") -> ChatResult:
        ctx = current_call()
        assert ctx is not None
        ctx.retries, ctx.breaker, ctx.circuit_state = 1, "openai:gpt-4o-mini", "closed"
        ctx.idempotency_key = "idem-123"
        clock.advance(0.42)
        return ChatResult(
            content="positive",
            model="gpt-4o-mini-2024-07-18",
            usage=Usage(2000, 5, 2005, 1536),
            finish_reason="stop",
            id="chatcmpl-7",
        )

    with bind_sinks(log_call):
        classify("great product")
    (record,) = call_records(records)
    assert record.name == "ai_guard"
    assert record.levelno == logging.INFO
    assert record.getMessage() == "chat gpt-4o-mini-2024-07-18 ok in 420.0 ms"
    fields = {name: getattr(record, name) for name in CALL_FIELDS}
    span = exporter.get_finished_spans()[0]
    attrs = dict(span.attributes or {})
    assert fields == {
        "event": "ai_call",
        "operation": "chat",
        "provider": "openai",
        "model": "gpt-4o-mini-2024-07-18",
        "request_model": "gpt-4o-mini",
        "tier": "mini",
        "stream": False,
        "response_id": "chatcmpl-7",
        "finish_reasons": ["stop"],
        "input_tokens": 2000,
        "output_tokens": 5,
        "cached_tokens": 1536,
        "cache_hit": True,
        "cost_usd": attrs["ai_guard.cost_usd"],
        "latency_ms": pytest.approx(420.0),
        "retries": 1,
        "rate_limit_wait_s": 0.0,
        "breaker": "openai:gpt-4o-mini",
        "circuit_state": "closed",
        "route_reason": attrs["ai_guard.route.reason"],
        "fallback_from": None,
        "error_type": None,
        "idempotency_key_hash": hash_idempotency_key("idem-123"),
        "idempotent_replay": False,
        "trace_id": format(span.context.trace_id, "032x"),
        "span_id": format(span.context.span_id, "016x"),
    }
    assert fields["cost_usd"] == pytest.approx((464 * 0.15 + 1536 * 0.075 + 5 * 0.6) / 1e6)


def test_failed_call_is_logged_with_its_error_type_and_unknown_usage(
    records: pytest.LogCaptureFixture,
) -> None:
    @traced_ai()
    def ask(*, model: str = "") -> ChatResult:
        raise UpstreamError("bad gateway", status=502)

    with bind_sinks(log_call), pytest.raises(UpstreamError):
        ask(model="gpt-4o")
    (record,) = call_records(records)
    assert record.getMessage().startswith("chat gpt-4o error 502 in ")
    assert record.error_type == "502"  # type: ignore[attr-defined]
    assert record.input_tokens is None  # type: ignore[attr-defined]
    assert record.cost_usd is None  # type: ignore[attr-defined]


def test_calls_that_are_not_ai_calls_are_not_logged(records: pytest.LogCaptureFixture) -> None:
    with bind_sinks(log_call):
        ctx, token = open_call()
        close_call(ctx, token, result=None)  # a guard used alone: no operation set
    assert call_records(records) == []


def test_sink_does_nothing_when_info_is_disabled(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="ai_guard")

    def must_not_run(ctx: CallContext) -> dict[str, Any]:
        raise AssertionError("fields were built although INFO is off")

    monkeypatch.setattr(logs, "call_log_fields", must_not_run)
    ctx = CallContext(0.0)
    ctx.operation = "chat"
    log_call(ctx)
    assert caplog.records == []


def test_many_threads_log_exactly_one_record_per_call(
    records: pytest.LogCaptureFixture,
) -> None:
    threads, per_thread = 12, 40

    @traced_ai()
    def ask(n: int, *, model: str = "") -> ChatResult:
        return ChatResult(content="x", model=model, usage=Usage(n, 1, n + 1, 0))

    barrier = threading.Barrier(threads)

    def work(t: int) -> None:
        barrier.wait()
        with bind_sinks(log_call):
            for i in range(per_thread):
                ask(t * per_thread + i, model="gpt-4o-mini")

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    logged = call_records(records)
    assert len(logged) == threads * per_thread
    assert sorted(r.input_tokens for r in logged) == list(range(threads * per_thread))  # type: ignore[attr-defined]


# -- the JSON formatter -----------------------------------------------------------------


def _format(record_args: dict[str, Any], formatter: logging.Formatter | None = None) -> Any:
    logger = logging.getLogger("ai_guard.test_json")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter or JSONFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    args = record_args.pop("args", ())
    try:
        logger.log(record_args.pop("level"), record_args.pop("msg"), *args, **record_args)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    text = stream.getvalue()
    assert text.endswith("\n")
    assert text.count("\n") == 1
    return json.loads(text) if formatter is None or isinstance(formatter, JSONFormatter) else text


def test_json_formatter_writes_standard_fields_and_every_extra() -> None:
    payload = _format(
        {
            "level": logging.INFO,
            "msg": "chat %s ok",
            "args": ("gpt-4o",),
            "extra": {"model": "gpt-4o", "latency_ms": 12.5, "tags": {"a": [1, 2]}, "obj": object},
        }
    )
    assert payload["message"] == "chat gpt-4o ok"
    assert payload["level"] == "INFO"
    assert payload["logger"] == "ai_guard.test_json"
    assert payload["timestamp"].endswith("Z")
    assert "T" in payload["timestamp"]
    assert isinstance(payload["process"], int)
    assert payload["model"] == "gpt-4o"
    assert payload["latency_ms"] == 12.5
    assert payload["tags"] == {"a": [1, 2]}
    assert payload["obj"] == str(object)  # not JSON: written as text, never a crash
    for standard in ("msg", "args", "levelno", "pathname", "thread", "exc_info"):
        assert standard not in payload


def test_json_formatter_includes_the_exception_and_static_fields() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        payload = _format(
            {"level": logging.ERROR, "msg": "failed", "exc_info": True},
            JSONFormatter(static_fields={"service": "billing"}),
        )
    assert payload["service"] == "billing"
    assert "ValueError: boom" in payload["exception"]
    assert payload["exception"].startswith("Traceback")


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"calling with key {API_KEY}", API_KEY),
        ("Authorization: Bearer abcdef0123456789xyz", "abcdef0123456789xyz"),
        ("headers={'Authorization': 'Basic dXNlcjpwYXNz'}", "dXNlcjpwYXNz"),
        ("GET /v1/models?api_key=live_0123456789abcdef HTTP/1.1", "live_0123456789abcdef"),
        ('{"api-key": "azure0123456789abcdef"}', "azure0123456789abcdef"),
        ("x-api-key=AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ],
)
def test_redaction_masks_keys_and_credentials(text: str, secret: str) -> None:
    masked = redact(text)
    assert secret not in masked
    assert "***" in masked


def test_redaction_leaves_ordinary_text_alone() -> None:
    for text in (
        "basic usage: 1200 input_tokens, 8 output tokens",
        "the task is a classification",
        "sk-short",
        "circuit openai:gpt-4o opened (5 failures in 60s)",
    ):
        assert redact(text) == text


def test_redaction_walks_mappings_and_lists() -> None:
    value = {
        "headers": {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        "api_key": "anything-at-all",
        "args": [f"key={API_KEY}", 3],
    }
    masked = redact(value)
    assert masked["headers"] == {"Authorization": "***", "Content-Type": "application/json"}
    assert masked["api_key"] == "***"
    assert masked["args"][1] == 3
    assert API_KEY not in json.dumps(masked)


def test_json_formatter_redacts_message_arguments_extras_and_exceptions() -> None:
    try:
        raise ConnectionError(f"could not reach https://api.example.com?key={API_KEY}")
    except ConnectionError:
        payload = _format(
            {
                "level": logging.ERROR,
                "msg": "request with %s failed",
                "args": (f"Bearer {API_KEY}",),
                "extra": {"headers": {"authorization": API_KEY}, "client_secret": API_KEY},
                "exc_info": True,
            }
        )
    assert API_KEY not in json.dumps(payload)
    assert payload["headers"] == {"authorization": "***"}
    assert payload["client_secret"] == "***"


def test_redacting_filter_protects_other_formatters() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s %(headers)s"))
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("ai_guard.test_filter")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(
            "retrying with %s", API_KEY, extra={"headers": {"Authorization": f"Bearer {API_KEY}"}}
        )
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert API_KEY not in stream.getvalue()
    assert stream.getvalue().startswith("retrying with sk-***")


# -- the scan: keys and prompts never reach a record ------------------------------------


def test_no_api_key_or_prompt_in_any_record_of_calls_that_carried_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)  # everything, from every logger
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app_logger = logging.getLogger("myapp")

    @routed(Router(), request=lambda prompt, **_: RouteRequest("summarization", 3))
    @traced_ai(tracer_provider=provider)
    def ask(prompt: str, *, api_key: str, headers: dict[str, str], model: str = "") -> ChatResult:
        if "fail" in headers.get("X-Mode", ""):
            raise ConnectionError(f"POST https://api.example.com/v1 failed for key {api_key}")
        return ChatResult(content=f"Summary of: {prompt}", model=model, usage=Usage(50, 10, 60, 0))

    headers = {"Authorization": f"Bearer {API_KEY}"}
    with bind_sinks(log_call):
        ask(PROMPT, api_key=API_KEY, headers=headers)
        try:
            ask(PROMPT, api_key=API_KEY, headers={**headers, "X-Mode": "fail"})
        except ConnectionError:
            # what an application typically does with the error: log it with traceback
            app_logger.exception("AI call failed for %s", headers)

    assert len(call_records(caplog.records)) == 2
    # The ai_guard records themselves hold neither (nothing to redact in the first place).
    for record in call_records(caplog.records):
        raw = json.dumps(vars(record), default=str)
        assert API_KEY not in raw
        assert "hunter2" not in raw
    # Every record, formatted by the package's formatter, holds neither.
    formatter = JSONFormatter()
    for record in caplog.records:
        formatted = formatter.format(record)
        assert API_KEY not in formatted, formatted
        assert "hunter2" not in formatted or record.name == "myapp"
    # ...and neither do the spans (content capture is off).
    for span in exporter.get_finished_spans():
        assert API_KEY not in json.dumps(dict(span.attributes or {}), default=str)
        assert "hunter2" not in json.dumps(dict(span.attributes or {}), default=str)


def test_json_lines_end_to_end_through_a_stream_handler() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("ai_guard")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:

        @traced_ai()
        def ask(*, model: str = "") -> ChatResult:
            return ChatResult(content="x", model=model, usage=Usage(7, 3, 10, 0))

        with bind_sinks(log_call):
            ask(model="gpt-4o-mini")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    (line,) = stream.getvalue().splitlines()
    payload = json.loads(line)
    assert payload["event"] == "ai_call"
    assert payload["model"] == "gpt-4o-mini"
    assert (payload["input_tokens"], payload["output_tokens"]) == (7, 3)
    assert payload["cost_usd"] == pytest.approx((7 * 0.15 + 3 * 0.6) / 1e6)
    assert set(CALL_FIELDS) <= set(payload)


def test_module_has_no_logging_dependency_beyond_the_standard_library() -> None:
    assert "pythonjsonlogger" not in sys.modules
