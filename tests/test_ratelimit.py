"""``@rate_limited``: seeing a 429 three ways, sleeping as the server says, giving up on
time, and telling the per-call context what it did."""

from __future__ import annotations

import inspect
import logging
import random
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests
import responses

from ai_guard.backoff import FullJitter, NoJitter
from ai_guard.context import close_call, current_call, open_call
from ai_guard.errors import ConfigError, RateLimitExceeded, UpstreamError
from ai_guard.ratelimit import RateLimitInfo, rate_limited
from ai_guard.testing import FakeClock

LIMITED = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}


def make_response(status: int, headers: dict[str, str] | None = None) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers or {})
    response._content = b'{"ok": true}' if status == 200 else b'{"error": {}}'
    response.url = "http://127.0.0.1/v1/chat/completions"
    return response


def http_error(status: int, headers: dict[str, str] | None = None) -> requests.HTTPError:
    response = make_response(status, headers)
    return requests.HTTPError(f"{status} error", response=response)


class Script:
    """A function whose outcomes are scripted: exceptions are raised, anything else is
    returned; the last outcome repeats. Counts its calls (thread-safe)."""

    def __init__(self, *outcomes: object) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            index = min(self.calls, len(self.outcomes) - 1)
            self.calls += 1
        outcome = self.outcomes[index]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def guarded(script: Script, clock: FakeClock, **options: Any) -> Callable[..., Any]:
    options.setdefault("jitter", False)
    return rate_limited(clock=clock, **options)(script)


@pytest.fixture
def ai_call(fake_clock: FakeClock) -> Iterator[Any]:
    """A per-call context as ``@traced_ai`` would open it."""
    ctx, token = open_call(fake_clock)
    ctx.operation = "chat"
    try:
        yield ctx
    finally:
        close_call(ctx, token, fake_clock, result=None)


# -- the success path --------------------------------------------------------------------


def test_success_returns_the_result_untouched_without_sleeping(fake_clock: FakeClock) -> None:
    marker = object()
    script = Script(marker)
    assert guarded(script, fake_clock)() is marker
    assert script.calls == 1
    assert fake_clock.sleeps == []


def test_the_decorated_function_keeps_its_name_signature_and_arguments(
    fake_clock: FakeClock,
) -> None:
    @rate_limited(clock=fake_clock)
    def ask(prompt: str, *, model: str = "gpt-4o-mini") -> str:
        """Ask the model."""
        return f"{model}:{prompt}"

    assert ask.__name__ == "ask"
    assert ask.__doc__ == "Ask the model."
    assert str(inspect.signature(ask)) == str(inspect.signature(ask.__wrapped__))  # type: ignore[attr-defined]
    assert ask("hi", model="m") == "m:hi"


def test_a_non_retryable_exception_propagates_at_once(fake_clock: FakeClock) -> None:
    script = Script(ValueError("bad prompt"))
    with pytest.raises(ValueError, match="bad prompt"):
        guarded(script, fake_clock)()
    assert script.calls == 1
    assert fake_clock.sleeps == []


@pytest.mark.parametrize("status", [400, 401, 404, 500, 503])
def test_other_statuses_are_not_retried_by_default(fake_clock: FakeClock, status: int) -> None:
    returned = Script(make_response(status))
    assert guarded(returned, fake_clock)().status_code == status
    raised = Script(http_error(status))
    with pytest.raises(requests.HTTPError):
        guarded(raised, fake_clock)()
    assert (returned.calls, raised.calls) == (1, 1)
    assert fake_clock.sleeps == []


# -- three ways of seeing a 429 (and the client's UpstreamError) -------------------------


SEEN_429: dict[str, Callable[[], object]] = {
    "raises RateLimitExceeded": lambda: RateLimitExceeded(headers={"retry-after": "3"}),
    "raises requests.HTTPError": lambda: http_error(429, {"retry-after": "3"}),
    "returns requests.Response": lambda: make_response(429, {"retry-after": "3"}),
    "raises UpstreamError": lambda: UpstreamError("429", status=429, headers={"retry-after": "3"}),
}


@pytest.mark.parametrize("way", sorted(SEEN_429))
def test_a_429_is_retried_after_the_server_given_wait(fake_clock: FakeClock, way: str) -> None:
    ok = make_response(200)
    script = Script(SEEN_429[way](), SEEN_429[way](), ok)
    assert guarded(script, fake_clock)() is ok
    assert script.calls == 3
    assert fake_clock.sleeps == [3.0, 3.0]


@pytest.mark.parametrize("way", sorted(SEEN_429))
def test_after_max_retries_it_gives_up_with_rate_limit_exceeded(
    fake_clock: FakeClock, way: str
) -> None:
    script = Script(SEEN_429[way]())
    with pytest.raises(RateLimitExceeded) as raised:
        guarded(script, fake_clock, max_retries=3)()
    error = raised.value
    assert script.calls == 4
    assert error.attempts == 4
    assert error.status == 429
    assert error.retry_after == 3.0
    assert error.info == RateLimitInfo(retry_after=3.0)
    assert {k.lower(): v for k, v in error.headers.items()} == {"retry-after": "3"}
    assert fake_clock.sleeps == [3.0, 3.0, 3.0]
    if way.startswith("raises"):
        assert isinstance(error.__cause__, Exception)
    else:
        assert error.__cause__ is None


def test_max_retries_zero_means_one_attempt(fake_clock: FakeClock) -> None:
    script = Script(make_response(429))
    with pytest.raises(RateLimitExceeded) as raised:
        guarded(script, fake_clock, max_retries=0)()
    assert raised.value.attempts == 1
    assert script.calls == 1
    assert fake_clock.sleeps == []


def test_an_exception_with_an_openai_style_status_code_is_seen_as_429(
    fake_clock: FakeClock,
) -> None:
    class APIStatusError(Exception):
        def __init__(self, status_code: int) -> None:
            super().__init__(f"Error code: {status_code}")
            self.status_code = status_code

    script = Script(APIStatusError(429), "done")
    assert guarded(script, fake_clock)() == "done"
    assert fake_clock.sleeps == [0.5]


# -- the sleep schedule ------------------------------------------------------------------


def test_without_headers_it_backs_off_exponentially_up_to_max_delay(fake_clock: FakeClock) -> None:
    script = Script(make_response(429))
    with pytest.raises(RateLimitExceeded):
        guarded(script, fake_clock, max_retries=6, base_delay=0.5, max_delay=4.0)()
    assert fake_clock.sleeps == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_the_reset_of_the_exhausted_window_is_used_when_there_is_no_retry_after(
    fake_clock: FakeClock,
) -> None:
    script = Script(make_response(429, LIMITED), make_response(200))
    assert guarded(script, fake_clock)().status_code == 200
    assert fake_clock.sleeps == [2.0]


def test_jitter_is_added_on_top_of_the_server_wait(fake_clock: FakeClock) -> None:
    script = Script(make_response(429, {"retry-after": "3"}), make_response(200))
    guarded(script, fake_clock, jitter=FullJitter(rng=random.Random(1)))()
    (slept,) = fake_clock.sleeps
    assert 3.0 <= slept <= 3.3


def test_jitter_spreads_exponential_backoff(fake_clock: FakeClock) -> None:
    script = Script(make_response(429))
    with pytest.raises(RateLimitExceeded):
        guarded(script, fake_clock, max_retries=4, jitter=FullJitter(rng=random.Random(2)))()
    for attempt, slept in enumerate(fake_clock.sleeps):
        assert 0.0 <= slept <= 0.5 * 2**attempt
    assert len(set(fake_clock.sleeps)) == 4


# -- caps: give up at once rather than sleep past the caller's budget ---------------------


def test_server_asking_longer_than_max_delay_gives_up_at_once(fake_clock: FakeClock) -> None:
    script = Script(make_response(429, {"retry-after": "120"}))
    with pytest.raises(RateLimitExceeded) as raised:
        guarded(script, fake_clock, max_delay=60.0)()
    assert script.calls == 1
    assert fake_clock.sleeps == []
    assert raised.value.attempts == 1
    assert raised.value.retry_after == 120.0
    assert "120.000s" in str(raised.value)


def test_server_asking_longer_than_max_total_wait_gives_up_without_sleeping(
    fake_clock: FakeClock,
) -> None:
    script = Script(make_response(429, {"retry-after-ms": "10000"}))
    with pytest.raises(RateLimitExceeded) as raised:
        guarded(script, fake_clock, max_total_wait=5.0)()
    assert fake_clock.sleeps == []
    assert raised.value.attempts == 1


def test_max_total_wait_counts_every_sleep_of_the_call(fake_clock: FakeClock) -> None:
    script = Script(make_response(429, {"retry-after": "3"}))
    with pytest.raises(RateLimitExceeded) as raised:
        guarded(script, fake_clock, max_total_wait=7.0)()
    # 3 + 3 = 6 slept; a third 3 s wait would reach 9 > 7: give up before sleeping it.
    assert fake_clock.sleeps == [3.0, 3.0]
    assert raised.value.attempts == 3


def test_backoff_that_would_overrun_max_total_wait_gives_up(fake_clock: FakeClock) -> None:
    script = Script(make_response(429))
    with pytest.raises(RateLimitExceeded):
        guarded(script, fake_clock, max_total_wait=2.0, max_retries=10)()
    assert fake_clock.sleeps == [0.5, 1.0]


def test_jitter_never_pushes_a_wait_past_max_total_wait(fake_clock: FakeClock) -> None:
    script = Script(make_response(429, {"retry-after": "1.95"}), make_response(200))
    jitter = FullJitter(rng=random.Random(4))
    guarded(script, fake_clock, max_total_wait=2.0, jitter=jitter)()
    (slept,) = fake_clock.sleeps
    assert 1.95 <= slept <= 2.0


# -- configurable statuses and exceptions ------------------------------------------------


def test_503_is_retried_when_configured(fake_clock: FakeClock) -> None:
    script = Script(http_error(503), make_response(503), make_response(200))
    result = guarded(script, fake_clock, retry_on_status=(429, 503))()
    assert result.status_code == 200
    assert script.calls == 3


def test_a_503_that_persists_is_handed_back_unchanged(fake_clock: FakeClock) -> None:
    error = UpstreamError("overloaded", status=503)
    script = Script(error)
    with pytest.raises(UpstreamError) as raised:
        guarded(script, fake_clock, retry_on_status=[503], max_retries=2)()
    assert raised.value is error
    assert script.calls == 3
    returned = Script(make_response(503))
    assert guarded(returned, fake_clock, retry_on_status=503, max_retries=1)().status_code == 503
    assert returned.calls == 2


def test_connection_errors_are_retried_when_configured(fake_clock: FakeClock) -> None:
    script = Script(requests.ConnectionError("refused"), requests.ConnectionError("refused"), "ok")
    result = guarded(script, fake_clock, retry_on_exceptions=(requests.ConnectionError,))()
    assert result == "ok"
    assert fake_clock.sleeps == [0.5, 1.0]


def test_connection_errors_are_not_retried_by_default(fake_clock: FakeClock) -> None:
    script = Script(requests.ConnectionError("refused"), "ok")
    with pytest.raises(requests.ConnectionError):
        guarded(script, fake_clock)()
    assert script.calls == 1


def test_a_connection_error_that_persists_is_reraised(fake_clock: FakeClock) -> None:
    script = Script(requests.ConnectionError("refused"))
    with pytest.raises(requests.ConnectionError):
        guarded(script, fake_clock, retry_on_exceptions=requests.ConnectionError, max_retries=2)()
    assert script.calls == 3


# -- the per-call context ----------------------------------------------------------------


def test_retries_and_waits_are_written_into_the_call_context(
    fake_clock: FakeClock, ai_call: Any
) -> None:
    script = Script(make_response(429, {"retry-after": "1"}), http_error(429, LIMITED), "ok")
    assert guarded(script, fake_clock)() == "ok"
    assert ai_call.retries == 2
    assert ai_call.rate_limit_wait_s == pytest.approx(3.0)
    assert current_call() is ai_call


def test_the_context_counts_retries_even_when_it_gives_up(
    fake_clock: FakeClock, ai_call: Any
) -> None:
    script = Script(make_response(429, {"retry-after": "1"}))
    with pytest.raises(RateLimitExceeded):
        guarded(script, fake_clock, max_retries=2)()
    assert ai_call.retries == 2
    assert ai_call.rate_limit_wait_s == pytest.approx(2.0)


def test_a_successful_call_leaves_the_context_at_zero(fake_clock: FakeClock, ai_call: Any) -> None:
    assert guarded(Script("ok"), fake_clock)() == "ok"
    assert ai_call.retries == 0
    assert ai_call.rate_limit_wait_s == 0.0


def test_used_alone_it_opens_no_context(fake_clock: FakeClock) -> None:
    seen: list[object] = []

    def probe() -> requests.Response:
        seen.append(current_call())
        return make_response(429 if len(seen) == 1 else 200)

    rate_limited(clock=fake_clock, jitter=False)(probe)()
    assert seen == [None, None]


# -- logging -----------------------------------------------------------------------------


def test_a_wait_over_one_second_is_logged_at_warning_with_fields(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ai_guard.ratelimit")
    script = Script(make_response(429, {"retry-after": "1.5"}), "ok")
    guarded(script, fake_clock)()
    (record,) = caplog.records
    assert record.name == "ai_guard.ratelimit"
    assert record.levelno == logging.WARNING
    assert record.wait_s == 1.5  # type: ignore[attr-defined]
    assert record.status == 429  # type: ignore[attr-defined]
    assert record.attempt == 1  # type: ignore[attr-defined]
    assert record.retry_after == 1.5  # type: ignore[attr-defined]
    assert "Script" in record.function  # type: ignore[attr-defined]


def test_short_waits_are_not_logged(
    fake_clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="ai_guard.ratelimit")
    guarded(Script(make_response(429, {"retry-after": "1"}), "ok"), fake_clock)()
    assert caplog.records == []


# -- real HTTP through requests (the responses library plays the server) ------------------


URL = "http://127.0.0.1:9/v1/chat/completions"


@responses.activate
def test_a_real_session_returning_429_responses_is_retried(fake_clock: FakeClock) -> None:
    responses.add(responses.POST, URL, status=429, headers={"Retry-After-Ms": "250"}, json={})
    responses.add(responses.POST, URL, status=429, headers={"retry-after": "1"}, json={})
    responses.add(responses.POST, URL, status=200, json={"choices": []})
    session = requests.Session()

    @rate_limited(clock=fake_clock, jitter=False)
    def post() -> requests.Response:
        return session.post(URL, json={"model": "m", "messages": []})

    assert post().status_code == 200
    assert len(responses.calls) == 3
    assert fake_clock.sleeps == [0.25, 1.0]


@responses.activate
def test_a_real_session_raising_for_status_is_retried(fake_clock: FakeClock) -> None:
    responses.add(responses.POST, URL, status=429, headers={"x-ms-retry-after-ms": "750"}, json={})
    responses.add(responses.POST, URL, status=200, json={"choices": []})
    session = requests.Session()

    @rate_limited(clock=fake_clock, jitter=False)
    def post() -> requests.Response:
        response = session.post(URL, json={"model": "m", "messages": []})
        response.raise_for_status()
        return response

    assert post().status_code == 200
    assert len(responses.calls) == 2
    assert fake_clock.sleeps == [0.75]


# -- many threads at once ----------------------------------------------------------------


def test_many_threads_retry_independently_with_exact_counts() -> None:
    clock = FakeClock()
    threads = 32
    calls_per_thread: dict[int, int] = {}
    lock = threading.Lock()
    local = threading.local()

    @rate_limited(max_retries=5, clock=clock, jitter=NoJitter())
    def call(thread_index: int) -> requests.Response:
        local.calls = getattr(local, "calls", 0) + 1
        with lock:
            calls_per_thread[thread_index] = local.calls
        # two 429s, then a success, per thread
        return make_response(429 if local.calls <= 2 else 200, {"retry-after": "1"})

    results: list[int] = []
    barrier = threading.Barrier(threads)

    def worker(index: int) -> None:
        barrier.wait()
        response = call(index)
        with lock:
            results.append(response.status_code)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert results == [200] * threads
    assert calls_per_thread == dict.fromkeys(range(threads), 3)
    assert len(clock.sleeps) == 2 * threads


# -- bad settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "setting"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": "many"}, "max_retries"),
        ({"base_delay": -0.5}, "base_delay"),
        ({"max_delay": 0}, "max_delay"),
        ({"max_delay": float("nan")}, "max_delay"),
        ({"max_total_wait": -1}, "max_total_wait"),
        ({"retry_on_status": (700,)}, "retry_on_status"),
        ({"retry_on_status": ("429",)}, "retry_on_status"),
        ({"retry_on_exceptions": (42,)}, "retry_on_exceptions"),
        ({"jitter": "yes"}, "jitter"),
        ({"budget": object()}, "budget"),
        ({"clock": object()}, "clock"),
        ({"estimate_tokens": 12}, "estimate_tokens"),
    ],
)
def test_bad_settings_are_rejected_at_decoration_time(
    options: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        rate_limited(**options)
    assert raised.value.setting.startswith(setting)
