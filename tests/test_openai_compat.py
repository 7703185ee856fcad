"""The official ``openai`` package works against FakeUpstream: it is OpenAI-compatible."""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum

import openai
import pytest
from pydantic import BaseModel

from ai_guard.streaming import collect_stream, iter_sse
from ai_guard.structured import parse_structured, structured_output_format
from ai_guard.testing import FakeClock, FakeUpstream

MODEL = "gpt-4o-mini"
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Describe a circuit breaker."}
]


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(require_api_key="test") as server:
        yield server


@pytest.fixture
def client(upstream: FakeUpstream) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=upstream.url, api_key="test", max_retries=0) as sdk:
        yield sdk


class Colour(str, Enum):
    RED = "red"
    GREEN = "green"


class Part(BaseModel):
    name: str
    colour: Colour
    weight_kg: float


class Order(BaseModel):
    order_id: int
    parts: list[Part]
    note: str | None
    urgent: bool


def test_create_returns_a_chat_completion(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.cached_tokens == 0
    sent = upstream.requests[-1]
    assert sent.headers["authorization"] == "Bearer test"
    assert sent.json["messages"] == MESSAGES


def test_cached_tokens_reach_the_sdk(client: openai.OpenAI) -> None:
    long_messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "system", "content": "Rules. " * 1200},
        {"role": "user", "content": "hi"},
    ]
    client.chat.completions.create(model=MODEL, messages=long_messages)
    again = client.chat.completions.create(model=MODEL, messages=long_messages)
    assert again.usage is not None
    assert again.usage.prompt_tokens_details is not None
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    assert cached >= 1024


def test_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert text == plain.choices[0].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert plain.usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_raw_stream_is_parsed_the_same_by_our_parser_and_the_sdk(upstream: FakeUpstream) -> None:
    import requests

    response = requests.post(
        f"{upstream.url}/chat/completions",
        json={
            "model": MODEL,
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"Authorization": "Bearer test"},
        stream=True,
        timeout=10,
    )
    raw = b"".join(response.iter_content(chunk_size=None))
    ours = [(e.event, e.data) for e in iter_sse([raw])]
    from openai._streaming import SSEDecoder

    theirs = [(e.event or "message", e.data) for e in SSEDecoder().iter_bytes(iter([raw]))]
    assert ours == theirs


def test_parse_with_a_pydantic_model(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    completion = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Order
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Order)
    sent_format = upstream.requests[-1].json["response_format"]
    assert sent_format["json_schema"]["strict"] is True
    # our format for the same model is what the SDK sends
    ours = structured_output_format(sent_format["json_schema"]["name"], Order)
    assert ours == sent_format


def test_our_response_format_through_the_sdk_parses_with_parse_structured(
    client: openai.OpenAI,
) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        response_format=structured_output_format("order", Order),  # type: ignore[call-overload]
    )
    order = parse_structured(
        completion.choices[0].message.content,
        Order,
        finish_reason=completion.choices[0].finish_reason,
    )
    assert isinstance(order, Order)


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["gpt-4o-mini", "gpt-4o"]


def test_unknown_model_is_not_found_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    assert info.value.request_id is not None
    assert info.value.request_id.startswith("req_")


def test_wrong_key_is_authentication_error(upstream: FakeUpstream) -> None:
    with (
        openai.OpenAI(base_url=upstream.url, api_key="wrong", max_retries=0) as sdk,
        pytest.raises(openai.AuthenticationError),
    ):
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES)


def test_bad_request_is_bad_request_error(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=0)
    assert info.value.param == "max_tokens"


def test_quota_gives_rate_limit_error_with_headers() -> None:
    with (
        FakeUpstream(clock=FakeClock(), quota_requests=1, quota_window=20) as upstream,
        openai.OpenAI(base_url=upstream.url, api_key="test", max_retries=0) as sdk,
    ):
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as info:
            sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
    headers = info.value.response.headers
    assert headers["retry-after-ms"] == "20000"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert info.value.code == "rate_limit_exceeded"


def test_sdk_retries_honour_retry_after_ms() -> None:
    # The SDK's own retry loop reads retry-after-ms; a short window refills in time.
    with (
        FakeUpstream(quota_requests=1, quota_window=0.2, retry_after_style="ms") as upstream,
        openai.OpenAI(base_url=upstream.url, api_key="test", max_retries=3) as sdk,
    ):
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
        completion = sdk.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert completion.choices[0].message.content
        assert upstream.stats()["200"] == 2
        assert upstream.stats().get("429", 0) >= 1


def test_server_error_is_internal_server_error(upstream: FakeUpstream) -> None:
    upstream.configure(error_rate=1.0, error_statuses=(500,))
    with (
        openai.OpenAI(base_url=upstream.url, api_key="test", max_retries=0) as sdk,
        pytest.raises(openai.InternalServerError),
    ):
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES)


def test_error_event_mid_stream_is_api_error(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    upstream.configure(stream_error_after=2)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="error while processing"):
        list(stream)


def test_dropped_stream_is_a_connection_error(
    client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    upstream.configure(stream_drop_after=2)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    received: list[object] = []
    with pytest.raises(openai.APIConnectionError):
        received.extend(stream)  # extend keeps what arrived before the error
    assert len(received) == 2


def test_our_collected_stream_matches_the_sdk_completion(
    client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    import requests

    from ai_guard.streaming import iter_chat_stream

    response = requests.post(
        f"{upstream.url}/chat/completions",
        json={
            "model": MODEL,
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers={"Authorization": "Bearer test"},
        stream=True,
        timeout=10,
    )
    result = collect_stream(iter_chat_stream(response))
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert result.content == plain.choices[0].message.content
    assert plain.usage is not None
    assert result.usage.prompt_tokens == plain.usage.prompt_tokens
    assert result.usage.completion_tokens == plain.usage.completion_tokens
    assert result.finish_reason == "stop"
    assert result.model == MODEL
