from __future__ import annotations

import pytest

import ai_guard.errors as errors
from ai_guard.errors import (
    AIGuardError,
    CircuitOpenError,
    ConfigError,
    IdempotencyConflictError,
    IdempotencyKeyError,
    IdempotencyMismatchError,
    RateLimitExceeded,
    StreamError,
    StructuredOutputError,
    UpstreamError,
)


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_derives_from_aiguarderror(name: str) -> None:
    assert issubclass(getattr(errors, name), AIGuardError)


def test_circuit_open_error_carries_name_and_retry_after() -> None:
    exc = CircuitOpenError("openai:gpt-4o", 12.5)
    assert exc.name == "openai:gpt-4o"
    assert exc.retry_after == 12.5
    assert "openai:gpt-4o" in str(exc)
    assert CircuitOpenError("x", -3).retry_after == 0.0


def test_rate_limit_exceeded_carries_attempts_and_headers() -> None:
    exc = RateLimitExceeded(attempts=6, headers={"retry-after": "2"}, retry_after=2.0)
    assert exc.attempts == 6
    assert exc.headers == {"retry-after": "2"}
    assert exc.retry_after == 2.0
    assert exc.status == 429


def test_idempotency_errors_map_to_http_statuses() -> None:
    assert IdempotencyKeyError("bad").http_status == 400
    assert IdempotencyConflictError("busy", retry_after=2).http_status == 409
    assert IdempotencyMismatchError("other body").http_status == 422


def test_upstream_error_carries_status_body_request_id() -> None:
    exc = UpstreamError("boom", status=503, body={"error": {}}, request_id="req_1")
    assert (exc.status, exc.body, exc.request_id) == (503, {"error": {}}, "req_1")


def test_stream_error_keeps_partial_content() -> None:
    exc = StreamError("dropped", partial_content="Hello, wor")
    assert exc.partial_content == "Hello, wor"
    assert isinstance(exc, UpstreamError)


def test_structured_output_error_keeps_raw_content() -> None:
    exc = StructuredOutputError("invalid", content="{not json", errors=[{"msg": "x"}])
    assert exc.content == "{not json"
    assert exc.errors == [{"msg": "x"}]


def test_config_error_names_setting_and_value() -> None:
    exc = ConfigError("timeout", -1, "must be positive")
    assert "timeout" in str(exc)
    assert "-1" in str(exc)
    assert isinstance(exc, ValueError)
