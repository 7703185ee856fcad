"""FakeUpstream: an OpenAI-compatible server on loopback, with a quota, faults and streams."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from pydantic import BaseModel

from ai_guard.errors import ConfigError
from ai_guard.streaming import collect_stream, iter_chat_stream, iter_sse
from ai_guard.structured import structured_output_format, validate_json_value
from ai_guard.testing import FakeClock, FakeUpstream
from ai_guard.testing._upstream_behaviour import (
    FixedWindowQuota,
    PromptCache,
    UpstreamBehaviour,
    estimate_tokens,
    format_go_duration,
    prompt_tokens,
    reply_text,
)

MODEL = "gpt-4o-mini"


def chat_body(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def post(upstream: FakeUpstream, body: Any, session: Any = requests, **kwargs: Any) -> Any:
    if isinstance(body, bytes | str):
        return session.post(f"{upstream.url}/chat/completions", data=body, timeout=10, **kwargs)
    return session.post(f"{upstream.url}/chat/completions", json=body, timeout=10, **kwargs)


def connection_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("FakeUpstream")]


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


# -- serving -----------------------------------------------------------------------------


def test_url_is_loopback_base_url_ending_in_v1(upstream: FakeUpstream) -> None:
    assert upstream.url == f"http://127.0.0.1:{upstream.port}/v1"
    assert upstream.port > 0


def test_models_lists_the_served_models() -> None:
    with FakeUpstream(models=("gpt-4o-mini", "gpt-4o", "local-llama")) as upstream:
        response = requests.get(f"{upstream.url}/models", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["gpt-4o-mini", "gpt-4o", "local-llama"]
    assert all(m["object"] == "model" for m in body["data"])


def test_chat_completion_is_openai_shaped(upstream: FakeUpstream) -> None:
    response = post(upstream, chat_body("What is a circuit breaker?"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["prompt_tokens"] == estimate_tokens("What is a circuit breaker?")
    assert usage["completion_tokens"] == estimate_tokens(choice["message"]["content"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


def test_every_answer_has_its_own_request_id(upstream: FakeUpstream) -> None:
    ids = {post(upstream, chat_body()).headers["x-request-id"] for _ in range(5)}
    ids.add(requests.get(f"{upstream.url}/models", timeout=10).headers["x-request-id"])
    ids.add(post(upstream, b"{not json").headers["x-request-id"])
    assert len(ids) == 7
    # the recorded ids are the ones the answers carried
    assert {r.request_id for r in upstream.requests} == ids


def test_reply_is_deterministic_per_prompt(upstream: FakeUpstream) -> None:
    first = post(upstream, chat_body("same prompt")).json()["choices"][0]["message"]["content"]
    again = post(upstream, chat_body("same prompt")).json()["choices"][0]["message"]["content"]
    other = post(upstream, chat_body("other prompt")).json()["choices"][0]["message"]["content"]
    assert first == again
    assert first != other


def test_max_tokens_cuts_reply_with_finish_reason_length(upstream: FakeUpstream) -> None:
    body = post(upstream, chat_body("tell me everything", max_tokens=3)).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    assert len(body["choices"][0]["message"]["content"]) <= 12


def test_max_completion_tokens_is_honoured_too(upstream: FakeUpstream) -> None:
    body = post(upstream, chat_body("tell me everything", max_completion_tokens=2)).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_completion_tokens_setting_fixes_reply_length() -> None:
    with FakeUpstream(completion_tokens=25) as upstream:
        for prompt in ("a", "bb", "a much longer prompt than the others"):
            body = post(upstream, chat_body(prompt)).json()
            assert body["usage"]["completion_tokens"] == 25
            assert len(body["choices"][0]["message"]["content"]) == 100


def test_token_count_is_chars_over_four_at_least_one_per_message() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    messages = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "x" * 9},
        {"role": "user", "content": [{"type": "text", "text": "abcd"}, {"type": "image_url"}]},
    ]
    assert prompt_tokens(messages) == 1 + 3 + 1


def test_several_choices_with_n(upstream: FakeUpstream) -> None:
    body = post(upstream, chat_body("pick", n=3)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    contents = {c["message"]["content"] for c in body["choices"]}
    assert len(contents) == 3
    assert body["usage"]["completion_tokens"] == sum(
        estimate_tokens(c["message"]["content"]) for c in body["choices"]
    )


def test_fixed_reply_and_reply_callable() -> None:
    with FakeUpstream(reply="fixed answer") as upstream:
        assert post(upstream, chat_body()).json()["choices"][0]["message"]["content"] == (
            "fixed answer"
        )
        upstream.configure(reply=lambda body: body["messages"][-1]["content"].upper())
        assert post(upstream, chat_body("echo me")).json()["choices"][0]["message"]["content"] == (
            "ECHO ME"
        )


def test_reply_callable_that_fails_gets_500() -> None:
    def broken(body: Any) -> str:
        raise RuntimeError("boom")

    with FakeUpstream(reply=broken) as upstream:
        response = post(upstream, chat_body())
    assert response.status_code == 500
    assert "boom" in response.json()["error"]["message"]


def test_refusal_setting_answers_with_message_refusal() -> None:
    with FakeUpstream(refusal="I can't help with that.") as upstream:
        body = post(upstream, chat_body()).json()
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert message["refusal"] == "I can't help with that."


# -- bad input ---------------------------------------------------------------------------


def assert_openai_error(response: Any, status: int, **expected: Any) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    for key, value in expected.items():
        assert error[key] == value, (key, error)
    return dict(error)


def test_malformed_json_gets_400(upstream: FakeUpstream) -> None:
    response = post(upstream, b'{"model": "gpt-4o-mini", "messages": [', headers={})
    assert_openai_error(response, 400, type="invalid_request_error")
    assert "could not parse the JSON body" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": MODEL}, "messages", "missing_required_parameter"),
        ({"model": MODEL, "messages": []}, "messages", "invalid_type"),
        ({"model": MODEL, "messages": ["hi"]}, "messages[0]", "invalid_type"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "missing_required_parameter"),
        ({**chat_body(), "max_tokens": 0}, "max_tokens", "integer_below_min_value"),
        ({**chat_body(), "max_tokens": "10"}, "max_tokens", "integer_below_min_value"),
        ({**chat_body(), "n": 99}, "n", None),
        ({**chat_body(), "stream_options": {"include_usage": True}}, "stream_options", None),
        ({**chat_body(), "response_format": {"type": "yaml"}}, "response_format.type", None),
    ],
)
def test_invalid_request_gets_400_naming_the_param(
    upstream: FakeUpstream, body: dict[str, Any], param: str, code: str | None
) -> None:
    error = assert_openai_error(post(upstream, body), 400, param=param)
    if code is not None:
        assert error["code"] == code


def test_body_that_is_not_an_object_gets_400(upstream: FakeUpstream) -> None:
    assert_openai_error(post(upstream, [1, 2, 3]), 400)


def test_unknown_model_gets_404_model_not_found(upstream: FakeUpstream) -> None:
    error = assert_openai_error(
        post(upstream, {**chat_body(), "model": "gpt-9"}), 404, code="model_not_found"
    )
    assert "gpt-9" in error["message"]


def test_dated_snapshot_of_a_known_model_is_served(upstream: FakeUpstream) -> None:
    response = post(upstream, {**chat_body(), "model": "gpt-4o-mini-2024-07-18"})
    assert response.status_code == 200
    assert response.json()["model"] == "gpt-4o-mini-2024-07-18"


def test_models_none_serves_any_model() -> None:
    with FakeUpstream(models=None) as upstream:
        assert post(upstream, {**chat_body(), "model": "my-local-model"}).status_code == 200


@pytest.mark.parametrize(
    ("headers", "code"),
    [({}, None), ({"Authorization": "Bearer wrong"}, "invalid_api_key")],
)
def test_missing_or_wrong_api_key_gets_401(headers: dict[str, str], code: str | None) -> None:
    with FakeUpstream(require_api_key="sk-test") as upstream:
        assert_openai_error(post(upstream, chat_body(), headers=headers), 401, code=code)
        ok = post(upstream, chat_body(), headers={"Authorization": "Bearer sk-test"})
        assert ok.status_code == 200
        models = requests.get(f"{upstream.url}/models", headers=headers, timeout=10)
        assert models.status_code == 401


def test_unknown_path_gets_404_and_wrong_method_405(upstream: FakeUpstream) -> None:
    assert_openai_error(
        requests.post(f"{upstream.url}/embeddings", json={}, timeout=10), 404, code="unknown_url"
    )
    assert_openai_error(requests.get(f"{upstream.url}/chat/completions", timeout=10), 405)
    assert_openai_error(requests.post(f"{upstream.url}/models", timeout=10), 405)


def test_negative_content_length_gets_400(upstream: FakeUpstream) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", upstream.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400")


def test_chunked_request_body_is_read(upstream: FakeUpstream) -> None:
    payload = json.dumps(chat_body("chunked")).encode()

    def pieces() -> Iterator[bytes]:
        yield payload[:10]
        yield payload[10:]

    response = requests.post(f"{upstream.url}/chat/completions", data=pieces(), timeout=10)
    assert response.status_code == 200
    assert upstream.requests[-1].json == chat_body("chunked")


# -- settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("error_rate", 1.5),
        ("error_rate", -0.1),
        ("timeout_rate", 2),
        ("reset_rate", "often"),
        ("latency", -1),
        ("error_statuses", ()),
        ("error_statuses", (200,)),
        ("quota_requests", 0),
        ("quota_tokens", -5),
        ("quota_window", 0),
        ("retry_after_style", "minutes"),
        ("stream_drop_after", -1),
        ("hang_seconds", 0),
        ("models", ("",)),
        ("prompt_cache_size", 0),
        ("no_such_setting", 1),
    ],
)
def test_bad_settings_raise_config_error_naming_them(setting: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        FakeUpstream(**{setting: value})
    assert info.value.setting == setting
    assert setting in str(info.value)


def test_configure_changes_behaviour_at_run_time(upstream: FakeUpstream) -> None:
    assert post(upstream, chat_body()).status_code == 200
    upstream.configure(error_rate=1.0, error_statuses=(503,))
    assert post(upstream, chat_body()).status_code == 503
    upstream.configure(error_rate=0.0)
    assert post(upstream, chat_body()).status_code == 200
    assert upstream.behaviour.error_statuses == (503,)


def test_configure_with_bad_value_changes_nothing(upstream: FakeUpstream) -> None:
    upstream.configure(error_rate=0.25)
    with pytest.raises(ConfigError):
        upstream.configure(error_rate=0.5, quota_window=-1)
    assert upstream.behaviour.error_rate == 0.25
    assert upstream.behaviour.quota_window == 60.0


def test_latency_delays_the_answer() -> None:
    with FakeUpstream(latency=0.2) as upstream:
        started = time.monotonic()
        assert post(upstream, chat_body()).status_code == 200
        assert time.monotonic() - started >= 0.2


def test_latency_callable_is_a_distribution() -> None:
    draws: list[float] = []

    def distribution() -> float:
        value = 0.05 * (len(draws) + 1)
        draws.append(value)
        return value

    with FakeUpstream(latency=distribution) as upstream:
        started = time.monotonic()
        for _ in range(3):
            assert post(upstream, chat_body()).status_code == 200
        assert time.monotonic() - started >= 0.3
    assert draws == pytest.approx([0.05, 0.1, 0.15])


def test_latency_draws_are_clamped() -> None:
    behaviour = UpstreamBehaviour(latency=lambda: -3.0)
    assert behaviour.latency_seconds() == 0.0
    assert UpstreamBehaviour(latency=lambda: float("nan")).latency_seconds() == 0.0
    assert UpstreamBehaviour(latency=lambda: 1e9).latency_seconds() == 600.0


# -- faults ------------------------------------------------------------------------------


def test_error_rate_one_answers_only_error_statuses() -> None:
    with FakeUpstream(error_rate=1.0, seed=7) as upstream:
        statuses = [post(upstream, chat_body()).status_code for _ in range(30)]
        last = post(upstream, chat_body())
    assert set(statuses) <= {500, 502, 503}
    assert len(set(statuses)) > 1
    assert_openai_error(last, last.status_code, type="server_error")
    assert upstream.stats()["total"] == 31


def test_seeded_faults_are_reproducible() -> None:
    def run() -> list[int]:
        with FakeUpstream(error_rate=0.5, seed=42) as upstream:
            return [post(upstream, chat_body()).status_code for _ in range(40)]

    first = run()
    assert first == run()
    assert 5 < first.count(200) < 35


def test_error_rate_is_roughly_honoured() -> None:
    with FakeUpstream(error_rate=0.3, seed=1) as upstream:
        session = requests.Session()
        statuses = [post(upstream, chat_body(), session).status_code for _ in range(200)]
    errors = sum(1 for s in statuses if s != 200)
    assert 35 <= errors <= 85  # 60 expected; a seeded draw, not a flaky bound


def test_injected_429_is_rate_limit_shaped() -> None:
    with FakeUpstream(error_rate=1.0, error_statuses=(429,)) as upstream:
        response = post(upstream, chat_body())
    assert_openai_error(response, 429, code="rate_limit_exceeded")


def test_reset_rate_closes_the_connection_abruptly() -> None:
    with FakeUpstream(reset_rate=1.0) as upstream:
        with pytest.raises(requests.exceptions.ConnectionError):
            post(upstream, chat_body())
        assert upstream.stats() == {"reset": 1, "total": 1}
        assert upstream.requests[0].status is None
        assert upstream.requests[0].fault == "reset"
        upstream.configure(reset_rate=0.0)
        assert post(upstream, chat_body()).status_code == 200


def test_timeout_rate_hangs_longer_than_the_read_timeout() -> None:
    with FakeUpstream(timeout_rate=1.0, hang_seconds=30) as upstream:
        started = time.monotonic()
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(f"{upstream.url}/chat/completions", json=chat_body(), timeout=0.3)
        assert upstream.stats() == {"timeout": 1, "total": 1}
    # close() ended the hang: no 30 s wait
    assert time.monotonic() - started < 10


# -- recording ---------------------------------------------------------------------------


def test_every_request_is_recorded_with_headers_body_and_status(upstream: FakeUpstream) -> None:
    session = requests.Session()
    for attempt in range(3):
        post(upstream, chat_body(f"try {attempt}"), session, headers={"Idempotency-Key": "k-1"})
    post(upstream, {**chat_body(), "model": "nope"}, session)
    records = upstream.requests
    assert [r.status for r in records] == [200, 200, 200, 404]
    assert [r.idempotency_key for r in records] == ["k-1", "k-1", "k-1", None]
    assert records[0].method == "POST"
    assert records[0].path == "/v1/chat/completions"
    assert records[0].json == chat_body("try 0")
    assert records[0].headers["IDEMPOTENCY-KEY"] == "k-1"
    assert "idempotency-key" in records[0].headers
    assert records[0].headers["content-type"] == "application/json"
    assert upstream.last_request is records[-1]
    with pytest.raises(AttributeError):
        records[0].status = 500  # type: ignore[misc]


def test_record_limit_bounds_records_but_stats_stay_exact() -> None:
    with FakeUpstream(record_limit=5) as upstream:
        session = requests.Session()
        for i in range(12):
            post(upstream, chat_body(str(i)), session)
        assert len(upstream.requests) == 5
        assert upstream.requests[-1].json == chat_body("11")
        assert upstream.stats() == {"200": 12, "total": 12}


def test_reset_forgets_records_counts_quota_and_cache() -> None:
    clock = FakeClock()
    long_prompt = "z" * 4096 * 4
    with FakeUpstream(clock=clock, quota_requests=2) as upstream:
        post(upstream, chat_body(long_prompt))
        post(upstream, chat_body(long_prompt))
        assert post(upstream, chat_body()).status_code == 429
        upstream.reset()
        assert upstream.requests == []
        assert upstream.stats() == {}
        body = post(upstream, chat_body(long_prompt)).json()
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


# -- quota -------------------------------------------------------------------------------


def test_rate_limit_headers_on_every_chat_answer() -> None:
    clock = FakeClock()
    with FakeUpstream(
        clock=clock, quota_requests=10, quota_tokens=1000, quota_window=60
    ) as upstream:
        response = post(upstream, chat_body("abcd" * 10, max_tokens=50))
        clock.advance(5.5)
        second = post(upstream, chat_body("abcd" * 10, max_tokens=50))
        bad = post(upstream, {**chat_body(), "model": "nope"})
    headers = response.headers
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "9"
    assert headers["x-ratelimit-limit-tokens"] == "1000"
    assert headers["x-ratelimit-remaining-tokens"] == str(1000 - (10 + 50))
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    assert headers["x-ratelimit-reset-tokens"] == "1m0s"
    assert "retry-after" not in headers
    assert second.headers["x-ratelimit-remaining-requests"] == "8"
    assert second.headers["x-ratelimit-reset-requests"] == "54.5s"
    # a refused request (404) still reports the window, without consuming it
    assert bad.headers["x-ratelimit-remaining-requests"] == "8"


def test_no_rate_limit_headers_without_a_quota(upstream: FakeUpstream) -> None:
    response = post(upstream, chat_body())
    assert not [h for h in response.headers if h.lower().startswith("x-ratelimit")]


@pytest.mark.parametrize(
    ("style", "present", "absent"),
    [
        ("ms", {"retry-after-ms": "2500"}, "retry-after"),
        ("seconds", {"retry-after": "3"}, "retry-after-ms"),
        ("both", {"retry-after-ms": "2500", "retry-after": "3"}, None),
    ],
)
def test_429_carries_retry_after_in_the_chosen_style(
    style: str, present: dict[str, str], absent: str | None
) -> None:
    clock = FakeClock()
    with FakeUpstream(
        clock=clock, quota_requests=1, quota_window=10, retry_after_style=style
    ) as upstream:
        assert post(upstream, chat_body()).status_code == 200
        clock.advance(7.5)
        refused = post(upstream, chat_body())
    error = assert_openai_error(refused, 429, code="rate_limit_exceeded", type="requests")
    assert "Limit 1" in error["message"]
    for name, value in present.items():
        assert refused.headers[name] == value
    if absent is not None:
        assert absent not in refused.headers
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "2.5s"


def test_request_quota_refills_when_the_fixed_window_ends() -> None:
    clock = FakeClock()
    with FakeUpstream(clock=clock, quota_requests=3, quota_window=1.0) as upstream:
        session = requests.Session()
        first = [post(upstream, chat_body(), session).status_code for _ in range(5)]
        clock.advance(0.5)
        same_window = post(upstream, chat_body(), session).status_code
        clock.advance(0.5)  # exactly the start of the next window
        second = [post(upstream, chat_body(), session).status_code for _ in range(4)]
    assert first == [200, 200, 200, 429, 429]
    assert same_window == 429
    assert second == [200, 200, 200, 429]
    assert upstream.stats() == {"200": 6, "429": 4, "total": 10}


def test_token_quota_charges_prompt_plus_max_tokens() -> None:
    clock = FakeClock()
    with FakeUpstream(clock=clock, quota_tokens=100) as upstream:
        # 40 chars = 10 prompt tokens, + max_tokens 30 = 40 per request
        body = chat_body("x" * 40, max_tokens=30)
        assert post(upstream, body).status_code == 200
        assert post(upstream, body).status_code == 200
        refused = post(upstream, body)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "tokens"
        assert refused.headers["x-ratelimit-remaining-tokens"] == "20"
        # 10 prompt + 8 max = 18 still fits in the 20 left
        assert post(upstream, chat_body("x" * 40, max_tokens=8)).status_code == 200


def test_token_quota_without_max_tokens_charges_the_completion() -> None:
    clock = FakeClock()
    with FakeUpstream(clock=clock, quota_tokens=1000, completion_tokens=20) as upstream:
        response = post(upstream, chat_body("x" * 40))
    assert response.headers["x-ratelimit-remaining-tokens"] == str(1000 - 10 - 20)


def test_request_larger_than_the_token_quota_is_refused_as_too_large() -> None:
    with FakeUpstream(clock=FakeClock(), quota_tokens=50) as upstream:
        response = post(upstream, chat_body("x" * 400))
    error = assert_openai_error(response, 429, code="rate_limit_exceeded")
    assert "Request too large" in error["message"]


def test_refused_requests_do_not_count_unless_configured() -> None:
    clock = FakeClock()
    with FakeUpstream(clock=clock, quota_requests=2) as upstream:
        statuses = [post(upstream, chat_body()).status_code for _ in range(4)]
        assert statuses == [200, 200, 429, 429]
        upstream.configure(quota_requests=3)
        # 2 used; raising the limit lets exactly one more through
        assert post(upstream, chat_body()).status_code == 200
        assert post(upstream, chat_body()).status_code == 429
    with FakeUpstream(clock=clock, quota_requests=5, quota_counts_rejected=True) as upstream:
        statuses = [post(upstream, chat_body("x" * 4, max_tokens=1)).status_code for _ in range(3)]
        upstream.configure(quota_tokens=1)
        # a 429 on tokens still uses a request of the window
        assert post(upstream, chat_body("x" * 40)).status_code == 429
        upstream.configure(quota_tokens=None)
        assert post(upstream, chat_body()).status_code == 200
        assert post(upstream, chat_body()).status_code == 429
    assert statuses == [200, 200, 200]


def test_request_quota_is_exact_under_concurrency() -> None:
    clock = FakeClock()  # the window never ends during the test
    threads, per_thread, quota = 24, 10, 100
    with FakeUpstream(clock=clock, quota_requests=quota, quota_tokens=10**9) as upstream:
        statuses: list[int] = []
        lock = threading.Lock()
        barrier = threading.Barrier(threads)

        def hammer() -> None:
            session = requests.Session()
            barrier.wait()
            mine = [post(upstream, chat_body(), session).status_code for _ in range(per_thread)]
            with lock:
                statuses.extend(mine)

        workers = [threading.Thread(target=hammer) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        stats = upstream.stats()
        assert upstream.server_errors == []
    assert len(statuses) == threads * per_thread
    assert statuses.count(200) == quota
    assert statuses.count(429) == threads * per_thread - quota
    assert stats == {"200": quota, "429": threads * per_thread - quota, "total": 240}


def test_token_quota_is_exact_under_concurrency() -> None:
    quota = FixedWindowQuota(FakeClock())
    behaviour = UpstreamBehaviour(quota_tokens=10_000)
    admitted: list[int] = []
    lock = threading.Lock()

    def hammer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(200):
            cost = rng.randint(1, 60)
            if quota.admit(behaviour, cost).allowed:
                with lock:
                    admitted.append(cost)

    workers = [threading.Thread(target=hammer, args=(i,)) for i in range(16)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sum(admitted) == quota.used_tokens
    assert 10_000 - 60 < quota.used_tokens <= 10_000


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.02, "20ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (2.5, "2.5s"),
        (8.64, "8.64s"),
        (60, "1m0s"),
        (90.25, "1m30.25s"),
        (360, "6m0s"),
        (3723.5, "1h2m3.5s"),
        (7200, "2h0m0s"),
        (-3, "0s"),
    ],
)
def test_reset_durations_are_written_like_openai(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text


# -- prompt caching ----------------------------------------------------------------------


def cached_tokens(upstream: FakeUpstream, messages: list[dict[str, str]]) -> int:
    body = post(upstream, {"model": MODEL, "messages": messages}).json()
    return int(body["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_repeated_long_prompt_is_cached_in_128_token_steps(upstream: FakeUpstream) -> None:
    system = {"role": "system", "content": "policy " * 1000}  # 7000 chars = 1750 tokens
    question = {"role": "user", "content": "first question"}
    assert cached_tokens(upstream, [system, question]) == 0
    again = cached_tokens(upstream, [system, question])
    assert again >= 1024
    assert (again - 1024) % 128 == 0
    total = prompt_tokens([system, question])
    assert total - 128 < again <= total
    # a new question after the same long system prompt reuses the shared prefix
    other = cached_tokens(upstream, [system, {"role": "user", "content": "second question"}])
    assert 1024 <= other <= again
    assert (other - 1024) % 128 == 0


def test_short_prompts_are_never_cached(upstream: FakeUpstream) -> None:
    short = [{"role": "user", "content": "y" * 4000}]  # 1000 tokens < 1024
    assert cached_tokens(upstream, short) == 0
    assert cached_tokens(upstream, short) == 0


def test_prompt_cache_is_per_model() -> None:
    with FakeUpstream() as upstream:
        messages = [{"role": "user", "content": "w" * 6000}]
        post(upstream, {"model": "gpt-4o-mini", "messages": messages})
        other = post(upstream, {"model": "gpt-4o", "messages": messages}).json()
    assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_prompt_cache_memory_is_bounded() -> None:
    cache = PromptCache(maxsize=50)
    for i in range(200):
        cache.lookup_and_store("m", f"{i:05d}" + "q" * 8000, 2000)
    assert len(cache) == 50
    with FakeUpstream(prompt_cache_size=10) as upstream:
        session = requests.Session()
        for i in range(30):
            post(upstream, chat_body(f"{i:04d}" + "v" * 5000), session)
        assert upstream.prompt_cache_entries == 10


def test_prompt_cache_lookup_is_the_longest_seen_prefix() -> None:
    cache = PromptCache()
    base = "".join(chr(65 + i % 26) for i in range(1500 * 4))
    assert cache.lookup_and_store("m", base, 1500) == 0
    assert cache.lookup_and_store("m", base, 1500) == 1024 + 3 * 128
    longer = base + "tail" * 400
    assert cache.lookup_and_store("m", longer, 1900) == 1024 + 3 * 128
    assert cache.lookup_and_store("m", longer, 1900) == 1024 + 6 * 128


# -- structured outputs ------------------------------------------------------------------


class Address(BaseModel):
    street: str
    city: str


class Person(BaseModel):
    name: str
    age: int
    email: str | None
    tags: list[str]
    home: Address
    kind: str = "person"


def test_json_schema_reply_conforms_to_the_schema(upstream: FakeUpstream) -> None:
    response_format = structured_output_format("person", Person)
    schema = response_format["json_schema"]["schema"]
    for i in range(20):
        body = post(upstream, chat_body(f"person {i}", response_format=response_format)).json()
        content = body["choices"][0]["message"]["content"]
        value = json.loads(content)
        assert validate_json_value(value, schema) == []
        Person.model_validate_json(content)


def test_non_strict_schema_is_served_too(upstream: FakeUpstream) -> None:
    response_format = structured_output_format("person", Person, strict=False)
    assert response_format["json_schema"]["strict"] is False
    body = post(upstream, chat_body("someone", response_format=response_format)).json()
    content = body["choices"][0]["message"]["content"]
    assert validate_json_value(json.loads(content), response_format["json_schema"]["schema"]) == []
    assert isinstance(Person.model_validate_json(content).name, str)


def test_invalid_strict_schema_gets_400_like_openai(upstream: FakeUpstream) -> None:
    response_format = {
        "type": "json_schema",
        "json_schema": {
            "name": "loose",
            "strict": True,
            "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
        },
    }
    error = assert_openai_error(
        post(upstream, chat_body(response_format=response_format)), 400, param="response_format"
    )
    assert error["message"].startswith("Invalid schema for response_format 'loose'")
    assert "additionalProperties" in error["message"]


def test_bad_schema_name_gets_400(upstream: FakeUpstream) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "has space", "schema": {}}}
    assert_openai_error(
        post(upstream, chat_body(response_format=response_format)),
        400,
        param="response_format.json_schema.name",
    )


def test_json_object_requires_the_word_json(upstream: FakeUpstream) -> None:
    response_format = {"type": "json_object"}
    assert_openai_error(post(upstream, chat_body("hi", response_format=response_format)), 400)
    ok = post(upstream, chat_body("answer in JSON", response_format=response_format)).json()
    assert isinstance(json.loads(ok["choices"][0]["message"]["content"]), dict)


def test_structured_reply_cut_by_max_tokens_is_truncated_json(upstream: FakeUpstream) -> None:
    response_format = structured_output_format("person", Person)
    body = post(upstream, chat_body("x", response_format=response_format, max_tokens=3)).json()
    assert body["choices"][0]["finish_reason"] == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(body["choices"][0]["message"]["content"])


# -- streaming ---------------------------------------------------------------------------


def stream(upstream: FakeUpstream, body: dict[str, Any], session: Any = requests) -> Any:
    return session.post(f"{upstream.url}/chat/completions", json=body, stream=True, timeout=10)


def stream_body(content: str = "stream me", include_usage: bool = True) -> dict[str, Any]:
    extra: dict[str, Any] = {"stream": True}
    if include_usage:
        extra["stream_options"] = {"include_usage": True}
    return chat_body(content, **extra)


def sse_payloads(response: Any) -> list[str]:
    return [event.data for event in iter_sse(response.iter_content(chunk_size=None))]


def test_stream_is_sse_with_a_final_usage_chunk_then_done(upstream: FakeUpstream) -> None:
    response = stream(upstream, stream_body())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    final = chunks[-1]
    assert final["choices"] == []
    assert final["usage"]["prompt_tokens"] == estimate_tokens("stream me")
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    non_stream = post(upstream, chat_body("stream me")).json()
    assert text == non_stream["choices"][0]["message"]["content"]
    assert final["usage"]["completion_tokens"] == non_stream["usage"]["completion_tokens"]


def test_stream_without_include_usage_has_no_usage(upstream: FakeUpstream) -> None:
    payloads = sse_payloads(stream(upstream, stream_body(include_usage=False)))
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("usage" not in c for c in chunks)
    assert all(c["choices"] for c in chunks)


def test_usage_on_finish_chunk_variant(upstream: FakeUpstream) -> None:
    upstream.configure(usage_on_finish_chunk=True)
    chunks = [json.loads(p) for p in sse_payloads(stream(upstream, stream_body()))[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["total_tokens"] > 0
    assert all(c["choices"] for c in chunks)


def test_stream_with_repeated_long_prompt_reports_cached_tokens(upstream: FakeUpstream) -> None:
    body = stream_body("k" * 6000)
    collect_stream(iter_chat_stream(stream(upstream, body)))
    result = collect_stream(iter_chat_stream(stream(upstream, body)))
    assert result.usage.cached_tokens >= 1024


def test_stream_chunks_arrive_as_they_are_sent() -> None:
    delay = 0.05
    with FakeUpstream(stream_chunk_delay=delay, completion_tokens=12) as upstream:
        response = stream(upstream, stream_body())
        started = time.monotonic()
        events = iter_chat_stream(response)
        first = next(events)
        first_at = time.monotonic() - started
        rest = list(events)
        total = time.monotonic() - started
    assert first.type == "content"
    assert rest[-1].type == "usage"
    deltas = 1 + sum(1 for e in rest if e.type == "content")
    assert deltas >= 5
    # the first delta came long before the whole stream had been sent
    assert total >= delay * deltas
    assert first_at < total / 2


def test_stream_drop_after_n_chunks_cuts_the_connection() -> None:
    with FakeUpstream(stream_drop_after=3) as upstream:
        response = stream(upstream, stream_body())
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in response.iter_content(chunk_size=None):
                pass
        assert upstream.requests[0].fault == "stream_drop"
        assert upstream.stats() == {"200": 1, "total": 1}


def test_stream_error_after_n_chunks_sends_an_error_event() -> None:
    with FakeUpstream(stream_error_after=2) as upstream:
        events = list(iter_sse(stream(upstream, stream_body()).iter_content(chunk_size=None)))
    assert len(events) == 3
    assert events[-1].event == "error"
    assert json.loads(events[-1].data)["error"]["type"] == "server_error"
    assert all(e.data != "[DONE]" for e in events)


def test_malformed_sse_inserts_a_data_line_that_is_not_json() -> None:
    with FakeUpstream(malformed_sse=True) as upstream:
        payloads = sse_payloads(stream(upstream, stream_body()))
    bad = [p for p in payloads if p != "[DONE]" and not _is_json(p)]
    assert len(bad) == 1


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_sse_noise_is_valid_sse_that_parsers_skip(upstream: FakeUpstream) -> None:
    clean = sse_payloads(stream(upstream, stream_body("noise")))
    upstream.configure(sse_noise=True)
    response = stream(upstream, stream_body("noise"))
    raw = b"".join(response.iter_content(chunk_size=None))
    assert b"\r\n" in raw
    assert b": keep-alive" in raw
    assert b"x-unknown-field" in raw
    noisy = [e.data for e in iter_sse([raw])]
    strip_ids = [{**json.loads(p), "id": "", "created": 0} for p in noisy[:-1]]
    assert strip_ids == [{**json.loads(p), "id": "", "created": 0} for p in clean[:-1]]


def test_stream_errors_before_streaming_are_json(upstream: FakeUpstream) -> None:
    response = stream(upstream, {**stream_body(), "model": "nope"})
    assert_openai_error(response, 404, code="model_not_found")


def test_client_that_stops_reading_early_does_not_break_the_server() -> None:
    with FakeUpstream(completion_tokens=2000) as upstream:
        for _ in range(5):
            response = stream(upstream, stream_body())
            next(response.iter_content(chunk_size=None))
            response.close()
        assert post(upstream, chat_body()).status_code == 200
        assert upstream.server_errors == []


# -- concurrency and shutdown ------------------------------------------------------------


def test_many_concurrent_keep_alive_clients() -> None:
    threads, per_thread = 32, 8
    with FakeUpstream(latency=0.01) as upstream:
        failures: list[BaseException] = []
        barrier = threading.Barrier(threads)

        def client() -> None:
            session = requests.Session()
            try:
                barrier.wait()
                for i in range(per_thread):
                    assert post(upstream, chat_body(str(i)), session).status_code == 200
            except BaseException as exc:
                failures.append(exc)
            finally:
                session.close()

        workers = [threading.Thread(target=client) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        assert failures == []
        assert upstream.stats() == {"200": threads * per_thread, "total": threads * per_thread}
        assert upstream.server_errors == []


def test_keep_alive_session_reuses_one_connection(upstream: FakeUpstream) -> None:
    session = requests.Session()
    for _ in range(5):
        post(upstream, chat_body(), session)
    post(upstream, chat_body())  # no session: a connection of its own
    ports = [record.client_port for record in upstream.requests]
    assert len(set(ports[:5])) == 1
    assert ports[5] != ports[0]
    assert all(port > 0 for port in ports)


def test_close_ends_open_connections_and_leaves_no_thread() -> None:
    before = set(connection_threads())
    upstream = FakeUpstream()
    sessions = [requests.Session() for _ in range(5)]
    for session in sessions:
        assert post(upstream, chat_body(), session).status_code == 200  # keep-alive, left open
    hanging = FakeUpstream(timeout_rate=1.0, hang_seconds=60)
    outcome: list[BaseException] = []

    def wait_for_answer() -> None:
        try:
            post(hanging, chat_body())
        except requests.exceptions.RequestException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=wait_for_answer)
    caller.start()
    while hanging.stats().get("timeout") != 1:
        time.sleep(0.01)  # waiting for another thread's request to reach the server
    started = time.monotonic()
    upstream.close()
    hanging.close()
    caller.join(timeout=10)
    assert time.monotonic() - started < 5
    assert len(outcome) == 1  # the hanging call ended with a connection error, not an answer
    assert set(connection_threads()) - before == set()
    assert upstream.closed
    upstream.close()  # idempotent
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.post(f"{upstream.url}/chat/completions", json=chat_body(), timeout=2)


def test_reply_text_is_exact_length_when_asked() -> None:
    for tokens in (1, 2, 7, 50):
        assert len(reply_text(b"seed", tokens)) == tokens * 4
    assert reply_text(b"seed") == reply_text(b"seed")


def test_received_at_is_the_arrival_time_before_latency() -> None:
    with FakeUpstream(latency=0.2) as upstream:
        sent_at = time.time()
        post(upstream, chat_body())
        answered_at = time.time()
    assert sent_at <= upstream.requests[0].received_at <= answered_at - 0.2


def test_configure_while_many_threads_call_is_safe() -> None:
    threads, per_thread = 8, 25
    with FakeUpstream(seed=3) as upstream:
        statuses: list[int] = []
        lock = threading.Lock()
        done = threading.Event()

        def caller() -> None:
            session = requests.Session()
            mine = [post(upstream, chat_body(), session).status_code for _ in range(per_thread)]
            with lock:
                statuses.extend(mine)

        def toggler() -> None:
            rate = 0.0
            while not done.is_set():
                rate = 1.0 - rate
                upstream.configure(error_rate=rate, error_statuses=(503,))

        switch = threading.Thread(target=toggler)
        switch.start()
        workers = [threading.Thread(target=caller) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=60)
        done.set()
        switch.join(timeout=10)
        stats = upstream.stats()
        assert upstream.server_errors == []
    assert set(statuses) <= {200, 503}
    assert stats["total"] == threads * per_thread
    assert stats.get("200", 0) + stats.get("503", 0) == threads * per_thread
    assert stats.get("200", 0) == statuses.count(200)


KITCHEN_SINK: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "format": "uuid"},
        "at": {"type": "string", "format": "date-time"},
        "code": {"type": "string", "pattern": "^[a-z]+$"},
        "version": {"const": 3},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
        "step": {"type": "integer", "multipleOf": 7, "minimum": 10, "maximum": 100},
        "name": {"type": "string", "minLength": 30, "maxLength": 40},
        "kind": {"type": ["string", "null"], "enum": ["a", "b", None]},
        "both": {
            "allOf": [
                {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]},
                {"properties": {"y": {"type": "boolean"}}, "required": ["y"]},
            ]
        },
        "node": {"$ref": "#/$defs/Node"},
        "pair": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
    },
    "required": ["id", "at", "code", "version", "ratio", "step", "name", "kind", "both"],
    "$defs": {
        "Node": {
            "type": "object",
            "properties": {"next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}},
            "required": ["next"],
        }
    },
}


def test_generated_values_honour_the_schema_keywords() -> None:
    from ai_guard.testing._upstream_behaviour import value_from_schema

    for seed in range(200):
        value = value_from_schema(KITCHEN_SINK, random.Random(seed))
        assert validate_json_value(value, KITCHEN_SINK) == [], (seed, value)
        assert set(value["both"]) == {"x", "y"}
