"""AIClient: construction, the request it sends, results, errors, structured output.

Every test talks to a real :class:`FakeUpstream` over loopback HTTP. The guards (retries,
breaker, routing, pacing, metrics, threads) are in ``test_client_guards.py``; streams in
``test_client_stream.py``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import BaseModel

from ai_guard.breaker import BreakerRegistry, BreakerTemplate, default_registry, get_breaker
from ai_guard.client import DEFAULT_BASE_URL, DEFAULT_TIMEOUT, AIClient
from ai_guard.errors import (
    ConfigError,
    StructuredOutputError,
    StructuredOutputRefusalError,
    StructuredOutputTruncatedError,
    UpstreamConnectionError,
    UpstreamError,
)
from ai_guard.routing import Router, RouteRequest
from ai_guard.stores import RedisStore
from ai_guard.testing import FakeClock, FakeUpstream
from ai_guard.types import ChatResult, StreamEvent
from tests.conftest import free_port

MODEL = "gpt-4o-mini"
HELLO = [{"role": "user", "content": "hello"}]
SECRET = "sk-test-SECRET0123456789abcdef"
WAIT = 10.0  # seconds a test waits for another thread before it fails (never reached)


def make_client(upstream: FakeUpstream | str, **options: Any) -> AIClient:
    """A client of ``upstream`` whose breakers live in a registry of their own, so that
    no test shares circuit state with another."""
    options.setdefault("model", MODEL)
    options.setdefault("breaker", {"registry": BreakerRegistry()})
    url = upstream if isinstance(upstream, str) else upstream.url
    return AIClient(url, **options)


@pytest.fixture(autouse=True)
def forget_default_breakers() -> Iterator[None]:
    """Remove the breakers and templates a test created in the process-wide registry (a
    default AIClient registers ``openai:{model}`` there), so that later tests which ask
    for that template with their own options do not meet ours."""
    registry = default_registry()
    breakers, templates = set(registry.all()), set(registry.templates())
    yield
    for template in set(registry.templates()) - templates:
        registry.remove_template(template)
    for breaker in set(registry.all()) - breakers:
        registry.remove(breaker.name)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture
def client(upstream: FakeUpstream) -> Iterator[AIClient]:
    with make_client(upstream) as guarded:
        yield guarded


class _CannedHandler(BaseHTTPRequestHandler):
    """Answers every POST with the server's canned status and body (``{key}`` in the body
    is replaced by the bearer token of the request: an upstream that echoes the key)."""

    protocol_version = "HTTP/1.1"
    server: CannedServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        body = self.server.body.replace("{key}", key)
        data = body.encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", self.server.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-request-id", "req_canned")
        self.end_headers()
        self.wfile.write(data)


class CannedServer(ThreadingHTTPServer):
    """A loopback server with one canned answer, for what FakeUpstream never does (a 200
    that is not JSON, an error that echoes the API key)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, status: int, body: str, content_type: str = "application/json") -> None:
        super().__init__(("127.0.0.1", 0), _CannedHandler)
        self.status = status
        self.body = body
        self.content_type = content_type
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05})
        self._thread.start()

    def __enter__(self) -> CannedServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)


# -- construction ------------------------------------------------------------------------


def test_base_url_and_api_key_come_from_the_environment(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", upstream.url + "/")
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with AIClient(model=MODEL, breaker=False) as client:
        assert client.base_url == upstream.url
        client.chat(HELLO)
    assert upstream.requests[0].headers["Authorization"] == f"Bearer {SECRET}"


def test_arguments_win_over_the_environment(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-000000")
    with AIClient(upstream.url, "sk-argument-111111", model=MODEL, breaker=False) as client:
        client.chat(HELLO)
    assert upstream.requests[0].headers["Authorization"] == "Bearer sk-argument-111111"


def test_missing_base_url_defaults_to_openai(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with AIClient(breaker=False) as client:  # never called: the real API is not contacted
        assert client.base_url == DEFAULT_BASE_URL == "https://api.openai.com/v1"
        assert client.timeout == DEFAULT_TIMEOUT


def test_missing_api_key_sends_no_authorization_header(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with make_client(upstream) as client:
        client.chat(HELLO)
    assert "Authorization" not in upstream.requests[0].headers


def test_extra_headers_go_with_every_request(upstream: FakeUpstream) -> None:
    with make_client(upstream, headers={"OpenAI-Organization": "org-42"}) as client:
        client.chat(HELLO)
        client.chat(HELLO)
    assert [r.headers["OpenAI-Organization"] for r in upstream.requests] == ["org-42"] * 2


def test_repr_never_shows_the_api_key(upstream: FakeUpstream) -> None:
    with make_client(upstream, api_key=SECRET) as client:
        assert SECRET not in repr(client)
        assert "api_key='***'" in repr(client)
    with make_client(upstream, api_key="") as keyless:
        assert "api_key=None" in repr(keyless)


def test_one_number_timeout_is_both_connect_and_read(upstream: FakeUpstream) -> None:
    with make_client(upstream, timeout=7) as client:
        assert client.timeout == (7.0, 7.0)
    with make_client(upstream, timeout=(1, 2.5)) as client:
        assert client.timeout == (1.0, 2.5)


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"timeout": -1}, "timeout"),
        ({"timeout": (1, 2, 3)}, "timeout"),
        ({"pool_maxsize": 0}, "pool_maxsize"),
        ({"model": ""}, "model"),
        ({"breaker": 42}, "breaker"),
        ({"breaker": {"failure_threshold": 0, "registry": BreakerRegistry()}}, "failure_threshold"),
        ({"retries": -1}, "retries"),
        ({"retries": 3, "rate_limit": {"max_retries": 2}}, "retries"),
        ({"rate_limit": {"budget": None}}, "rate_limit.budget"),
        ({"rate_limit": {"base_delay": -1}}, "base_delay"),
        ({"budget": 3.5}, "budget"),
        ({"tracing": "yes"}, "tracing"),
        ({"idempotency": "bad prefix!"}, "prefix"),
        ({"collector": object()}, "collector"),
        ({"router": "gpt-4o"}, "router"),
        ({"store": 42}, "store"),
        ({"clock": object()}, "clock"),
    ],
)
def test_bad_settings_are_rejected_at_construction(
    upstream: FakeUpstream, options: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ConfigError) as info:
        make_client(upstream, **options)
    assert info.value.setting == setting


def test_base_url_must_be_http(upstream: FakeUpstream) -> None:
    for url in ("ftp://example.com/v1", "not a url", "https://api.openai.com/v1?x=1"):
        with pytest.raises(ConfigError) as info:
            AIClient(url, breaker=False)
        assert info.value.setting == "base_url"


def test_close_releases_the_client_and_later_calls_fail_clearly(upstream: FakeUpstream) -> None:
    with make_client(upstream) as client:
        client.chat(HELLO)
    assert client.closed
    client.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        client.chat(HELLO)


def _sockets_connected_to(port: int) -> int:
    """Open sockets of this process whose peer is ``port`` (Linux: the process's file
    descriptors, matched to the kernel's TCP tables by inode). No ``gc.collect()``: a
    socket that only a collection would close counts as open."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own descriptor)
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[9] in inodes:
                    count += 1
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_close_closes_every_connection_even_while_errors_are_kept(
    upstream: FakeUpstream,
) -> None:
    client = make_client(upstream, retries=0)
    upstream.configure(stream_error_after=1)
    kept: list[object] = [e for e in client.stream_chat(HELLO) if e.type == "error"]
    client.chat(HELLO)
    with pytest.raises(UpstreamError) as unknown_model:
        client.chat(HELLO, model="gpt-nonexistent")
    kept.append(unknown_model.value)
    upstream.configure(error_rate=1.0, error_statuses=(503,))
    with pytest.raises(UpstreamError) as unavailable:
        client.chat(HELLO)
    kept.append(unavailable.value)
    assert len(kept) == 3
    assert _sockets_connected_to(upstream.port) >= 1  # a keep-alive connection is pooled
    client.close()
    assert _sockets_connected_to(upstream.port) == 0
    assert all(isinstance(k, UpstreamError | StreamEvent) for k in kept)  # still kept


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux /proc")
def test_close_closes_idle_connections_while_a_dropped_stream_error_is_kept(
    upstream: FakeUpstream,
) -> None:
    """The transport error behind a dropped stream keeps the connection pool alive through
    its traceback: closing the session alone would leave the pool's idle sockets open."""
    both_in_flight = threading.Barrier(2)

    def answer_once_both_arrived() -> float:  # so the two calls hold two connections
        both_in_flight.wait(WAIT)
        return 0.0

    upstream.configure(latency=answer_once_both_arrived)
    client = make_client(upstream, retries=0)
    callers = [threading.Thread(target=client.chat, args=(HELLO,)) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(WAIT)
    assert _sockets_connected_to(upstream.port) == 2  # two keep-alive connections
    upstream.configure(latency=0.0, stream_drop_after=1)
    (dropped,) = [e for e in client.stream_chat(HELLO) if e.type == "error"]
    assert dropped.error is not None
    assert dropped.error.__cause__ is not None
    assert _sockets_connected_to(upstream.port) == 1  # the stream's own is gone
    client.close()
    assert _sockets_connected_to(upstream.port) == 0


def test_default_breaker_is_one_per_model_named_openai_model(upstream: FakeUpstream) -> None:
    with AIClient(upstream.url, model=MODEL) as client:
        assert isinstance(client.breaker, BreakerTemplate)
        assert client.breaker.template == "openai:{model}"
        client.chat(HELLO)
        client.chat(HELLO, model="gpt-4o")
        mini = get_breaker("openai:gpt-4o-mini")
        assert mini is not None
        assert mini is client.breaker_for("gpt-4o-mini")
        assert get_breaker("openai:gpt-4o") is client.breaker_for("gpt-4o")
        assert mini.metrics().successes == 1


@pytest.mark.redis
def test_two_clients_given_stores_of_one_redis_url_share_their_breakers(
    upstream: FakeUpstream, redis_url: str
) -> None:
    """Two apps each resolve the configured URL into a store of their own and build a
    client with it: the clients meet the same breaker template, not a ConfigError."""
    registry = BreakerRegistry()
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    stores = [RedisStore(redis_url, key_prefix=prefix) for _ in range(2)]
    try:
        first, second = (
            make_client(upstream, store=store, breaker={"registry": registry}) for store in stores
        )
        with first, second:
            assert first.breaker is second.breaker
            first.chat(HELLO)
            assert second.breaker_for(MODEL) is first.breaker_for(MODEL)
    finally:
        for store in stores:
            store.clear()
            store.close()


# -- the request -------------------------------------------------------------------------


def test_chat_sends_an_openai_request_and_returns_the_result(
    client: AIClient, upstream: FakeUpstream
) -> None:
    result = client.chat(HELLO, temperature=0.2, max_tokens=50, user="u-1")
    assert isinstance(result, ChatResult)
    assert result.content
    assert result.model == MODEL
    assert result.finish_reason == "stop"
    assert result.usage.prompt_tokens > 0
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.headers["x-request-id"].startswith("req_")
    request = upstream.requests[0]
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.json == {
        "model": MODEL,
        "messages": HELLO,
        "temperature": 0.2,
        "max_tokens": 50,
        "user": "u-1",
    }
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("ai_guard/")


def test_per_call_model_overrides_the_default(client: AIClient, upstream: FakeUpstream) -> None:
    assert client.chat(HELLO, model="gpt-4o").model == "gpt-4o"
    assert upstream.requests[0].json["model"] == "gpt-4o"


def test_non_ascii_messages_round_trip(client: AIClient, upstream: FakeUpstream) -> None:
    messages = [{"role": "user", "content": "Grüße aus Köln — 東京 🚀"}]
    client.chat(messages)
    assert upstream.requests[0].json["messages"] == messages


def test_usage_reports_cached_tokens_for_a_repeated_long_prefix(
    client: AIClient, upstream: FakeUpstream
) -> None:
    system = {"role": "system", "content": "You are a careful assistant. " * 180}  # ~1300 tok
    first = client.chat([system, {"role": "user", "content": "First question?"}])
    second = client.chat([system, {"role": "user", "content": "Second question?"}])
    assert first.usage.prompt_tokens >= 1024
    assert first.usage.cached_tokens == 0
    assert 1024 <= second.usage.cached_tokens <= second.usage.prompt_tokens
    assert second.usage.cached_tokens % 128 == 0


def test_model_and_messages_and_params_are_serialised_once_per_call(
    client: AIClient, upstream: FakeUpstream
) -> None:
    client.chat(HELLO, metadata={"nested": [1, 2.5, None, True]}, seed=7)
    assert upstream.requests[0].json["metadata"] == {"nested": [1, 2.5, None, True]}
    assert next(iter(upstream.requests[0].json)) == "model"


# -- bad input never reaches the upstream ------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "setting"),
    [
        ([], "messages"),
        ("hello", "messages"),
        (None, "messages"),
        ([("user", "hi")], "messages[0]"),
        ([{"content": "hi"}], "messages[0].role"),
        ([{"role": "", "content": "hi"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        (
            [{"role": "user", "content": "ok"}, {"role": "user", "content": 5}],
            "messages[1].content",
        ),
    ],
)
def test_malformed_messages_raise_before_any_http(
    client: AIClient, upstream: FakeUpstream, messages: Any, setting: str
) -> None:
    with pytest.raises(ConfigError) as info:
        client.chat(messages)
    assert isinstance(info.value, ValueError)
    assert info.value.setting == setting
    with pytest.raises(ConfigError):
        client.stream_chat(messages)
    assert upstream.stats() == {}


def test_content_parts_and_tool_calls_are_valid_messages(
    client: AIClient, upstream: FakeUpstream
) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "What is the weather?"}]},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    client.chat(messages)
    assert upstream.requests[0].json["messages"] == messages


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"stream": True}, "stream"),
        ({"temperature": object()}, "params"),
        ({"temperature": float("nan")}, "params"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "has space"}, "idempotency_key"),
        ({"idempotency_key": "clé"}, "idempotency_key"),
        ({"idempotency_key": "k" * 256}, "idempotency_key"),
        ({"route": RouteRequest("chat", 1)}, "route"),
        ({"model": ""}, "model"),
        ({"timeout": 0}, "timeout"),
        ({"response_format": 42}, "response_format"),
    ],
)
def test_bad_call_arguments_raise_before_any_http(
    client: AIClient, upstream: FakeUpstream, kwargs: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ConfigError) as info:
        client.chat(HELLO, **kwargs)
    assert info.value.setting == setting
    assert upstream.stats() == {}


def test_a_call_needs_a_model_or_a_route(upstream: FakeUpstream) -> None:
    with make_client(upstream, model=None) as client, pytest.raises(ConfigError) as info:
        client.chat(HELLO)
    assert info.value.setting == "model"
    with make_client(upstream, model=None, router=Router()) as routed:
        with pytest.raises(ConfigError) as info:
            routed.chat(HELLO)
        assert info.value.setting == "route"
        with pytest.raises(ConfigError):
            routed.chat(HELLO, model="gpt-4o", route=RouteRequest("chat", 1))
        for bad_route in ({"task_type": "chat"}, {"task_type": "chat", "complexity": 1}):
            with pytest.raises(ConfigError) as info:
                routed.chat(HELLO, route=bad_route)
            assert info.value.setting == "route"
        with pytest.raises(ConfigError) as info:
            routed.chat(HELLO, route={"task_type": "chat", "complexity_score": 11})
        assert info.value.setting == "complexity_score"
    assert upstream.stats() == {}


# -- error answers -----------------------------------------------------------------------


def test_unknown_model_is_the_upstreams_404(client: AIClient, upstream: FakeUpstream) -> None:
    with pytest.raises(UpstreamError) as info:
        client.chat(HELLO, model="gpt-nonexistent")
    error = info.value
    assert error.status == 404
    assert error.body["error"]["code"] == "model_not_found"
    assert error.request_id == upstream.requests[0].request_id
    assert error.headers["x-request-id"] == error.request_id
    assert "gpt-nonexistent" in str(error)
    assert error.request_id in str(error)
    assert upstream.stats() == {"404": 1, "total": 1}  # a 404 is not retried


def test_a_request_error_is_not_retried_and_does_not_trip_the_breaker(
    upstream: FakeUpstream,
) -> None:
    with make_client(
        upstream, breaker={"registry": BreakerRegistry(), "failure_threshold": 1}
    ) as c:
        for _ in range(3):
            with pytest.raises(UpstreamError) as info:
                c.chat(HELLO, model="gpt-nonexistent")
            assert info.value.status == 404
        breaker = c.breaker_for("gpt-nonexistent")
        assert breaker is not None
        assert breaker.state == "closed"
        assert breaker.metrics().failures == 0
    assert upstream.stats()["404"] == 3


def test_a_2xx_body_that_is_not_json_is_an_upstream_error_with_the_raw_text() -> None:
    with (
        CannedServer(200, "<html>gateway says hi</html>", "text/html") as server,
        make_client(server.url) as client,
        pytest.raises(UpstreamError) as info,
    ):
        client.chat(HELLO)
    assert info.value.status == 200
    assert info.value.body == "<html>gateway says hi</html>"
    assert info.value.request_id == "req_canned"
    assert "not a JSON object" in str(info.value)


def test_an_error_body_that_is_not_json_is_kept_as_text() -> None:
    with (
        CannedServer(418, "I'm a teapot", "text/plain") as server,
        make_client(server.url) as client,
        pytest.raises(UpstreamError) as info,
    ):
        client.chat(HELLO)
    assert info.value.status == 418
    assert info.value.body == "I'm a teapot"
    assert "HTTP 418" in str(info.value)
    assert "I'm a teapot" in str(info.value)


def test_no_server_at_all_is_a_connection_error(fake_clock: FakeClock) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    with (
        make_client(url, clock=fake_clock, retries=2) as client,
        pytest.raises(UpstreamConnectionError) as info,
    ):
        client.chat(HELLO)
    assert info.value.status is None
    assert isinstance(info.value, UpstreamError)
    assert len(fake_clock.sleeps) == 2  # retried twice, without waiting for real


# -- secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [SECRET, "azure0f3c9a1b2d4e6f8091a2b3c4d5e6f7a8"])
def test_the_api_key_never_appears_in_errors_reprs_or_logs(
    caplog: pytest.LogCaptureFixture, fake_clock: FakeClock, secret: str
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = '{"error": {"message": "Incorrect API key provided: {key}", "code": "invalid_api_key"}}'
    seen: list[str] = []
    with CannedServer(401, echo) as server, make_client(server.url, api_key=secret) as client:
        seen.append(repr(client))
        with pytest.raises(UpstreamError) as info:
            client.chat(HELLO)
        assert info.value.status == 401
        seen += [str(info.value), repr(info.value), json.dumps(info.value.body)]
        seen.append(json.dumps(info.value.headers))
    url = f"http://127.0.0.1:{free_port()}/v1"
    with make_client(url, api_key=secret, clock=fake_clock, retries=1) as client:
        with pytest.raises(UpstreamConnectionError) as refused:
            client.chat(HELLO)
        seen += [str(refused.value), repr(refused.value), repr(refused.value.__context__)]
    for record in caplog.records:
        seen.append(record.getMessage())
        seen.append(repr(vars(record)))
    assert "Incorrect API key provided" in seen[1]
    assert caplog.records  # the calls were logged
    for text in seen:
        assert secret not in text
        assert secret[3:] not in text


# -- idempotency keys --------------------------------------------------------------------


def test_every_call_carries_its_own_idempotency_key(
    client: AIClient, upstream: FakeUpstream
) -> None:
    for _ in range(3):
        client.chat(HELLO)
    keys = [r.idempotency_key for r in upstream.requests]
    assert all(k is not None and k.startswith("ai_") for k in keys)
    assert len(set(keys)) == 3


def test_a_given_idempotency_key_is_sent_as_is(client: AIClient, upstream: FakeUpstream) -> None:
    client.chat(HELLO, idempotency_key="order-42:attempt")
    assert upstream.requests[0].idempotency_key == "order-42:attempt"


def test_idempotency_can_be_turned_off_or_prefixed(upstream: FakeUpstream) -> None:
    with make_client(upstream, idempotency=False) as client:
        client.chat(HELLO)
        client.chat(HELLO, idempotency_key="explicit-key")  # an explicit key still goes
    with make_client(upstream, idempotency="billing") as client:
        client.chat(HELLO)
    keys = [r.idempotency_key for r in upstream.requests]
    assert keys[0] is None
    assert keys[1] == "explicit-key"
    assert keys[2] is not None
    assert keys[2].startswith("billing_")


# -- structured output -------------------------------------------------------------------


class City(BaseModel):
    name: str
    population: int | None
    districts: list[str]


def test_response_format_from_a_pydantic_model_is_strict_json_schema(
    client: AIClient, upstream: FakeUpstream
) -> None:
    result = client.chat(HELLO, response_format=City)
    sent = upstream.requests[0].json["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["name"] == "City"
    assert sent["json_schema"]["strict"] is True
    schema = sent["json_schema"]["schema"]
    assert schema["additionalProperties"] is False
    assert sorted(schema["required"]) == ["districts", "name", "population"]
    City.model_validate_json(result.content)


def test_response_format_dicts_are_sent_as_they_are(
    client: AIClient, upstream: FakeUpstream
) -> None:
    client.chat(
        [{"role": "user", "content": "answer in json"}], response_format={"type": "json_object"}
    )
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    client.chat(HELLO, response_format=schema)
    assert upstream.requests[0].json["response_format"] == {"type": "json_object"}
    converted = upstream.requests[1].json["response_format"]
    assert converted["json_schema"]["schema"]["required"] == ["ok"]


def test_parse_returns_a_validated_instance(client: AIClient, upstream: FakeUpstream) -> None:
    city = client.parse([{"role": "user", "content": "Largest city in Peru?"}], City)
    assert isinstance(city, City)
    assert upstream.requests[0].json["response_format"]["json_schema"]["strict"] is True


def test_parse_with_a_json_schema_returns_the_checked_value(client: AIClient) -> None:
    schema = {
        "title": "Verdict",
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "score": {"type": "integer"}},
    }
    value = client.parse(HELLO, schema)
    assert set(value) == {"ok", "score"}
    assert isinstance(value["ok"], bool)


def test_parse_raises_the_refusal(client: AIClient, upstream: FakeUpstream) -> None:
    upstream.configure(refusal="I can't help with that.")
    with pytest.raises(StructuredOutputRefusalError) as info:
        client.parse(HELLO, City)
    assert info.value.refusal == "I can't help with that."


def test_parse_raises_truncation_at_the_token_limit(client: AIClient) -> None:
    with pytest.raises(StructuredOutputTruncatedError):
        client.parse(HELLO, City, max_tokens=3)


def test_parse_raises_invalid_json_with_the_raw_reply(
    client: AIClient, upstream: FakeUpstream
) -> None:
    upstream.configure(reply="Sure! Here is the city: Lima")
    with pytest.raises(StructuredOutputError) as info:
        client.parse(HELLO, City)
    assert type(info.value) is StructuredOutputError
    assert info.value.content == "Sure! Here is the city: Lima"
    assert info.value.errors == []


def test_parse_raises_a_schema_mismatch_with_the_errors(
    client: AIClient, upstream: FakeUpstream
) -> None:
    upstream.configure(reply='{"name": "Lima", "population": "many", "districts": []}')
    with pytest.raises(StructuredOutputError) as info:
        client.parse(HELLO, City)
    assert info.value.content.startswith('{"name": "Lima"')
    assert [e["loc"] for e in info.value.errors] == [("population",)]


def test_parse_rejects_a_schema_that_is_neither_model_nor_dict(client: AIClient) -> None:
    with pytest.raises(ConfigError):
        client.parse(HELLO, "City")  # type: ignore[call-overload]
