from __future__ import annotations

import threading
from collections.abc import Callable, Generator
from typing import ParamSpec, TypeVar, cast

import pytest

from ai_guard.context import (
    CallContext,
    bind_sinks,
    bound_sinks,
    close_call,
    current_call,
    open_call,
    register_default_sink,
    unregister_default_sink,
)
from ai_guard.testing import FakeClock
from ai_guard.types import ChatResult, StreamEvent, Usage

P = ParamSpec("P")
R = TypeVar("R")


def _guard(
    fn: Callable[P, R], clock: FakeClock, *, operation: str | None = "chat"
) -> Callable[P, R]:
    """A minimal guard, as every real guard uses the context."""

    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        ctx, token = open_call(clock)
        if operation is not None:
            ctx.operation = operation
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            close_call(ctx, token, clock, error=exc)
            raise
        return close_call(ctx, token, clock, result=result)

    return wrapper


def test_outermost_guard_owns_the_context_inner_guards_join_it() -> None:
    clock = FakeClock()
    seen: list[CallContext | None] = []

    def fn() -> str:
        seen.append(current_call())
        return "ok"

    inner = _guard(fn, clock)
    outer_seen: list[CallContext | None] = []

    def middle() -> str:
        outer_seen.append(current_call())
        return inner()

    assert _guard(middle, clock)() == "ok"
    assert seen[0] is outer_seen[0] is not None
    assert current_call() is None


def test_owner_emits_once_with_latency_usage_and_cost() -> None:
    clock = FakeClock()
    calls: list[CallContext] = []

    def fn() -> ChatResult:
        clock.advance(0.25)
        return ChatResult(
            content="hi",
            model="gpt-4o-mini",
            usage=Usage(1000, 100, 1100, 400),
            finish_reason="stop",
        )

    with bind_sinks(calls.append):
        _guard(_guard(fn, clock), clock)()
    assert len(calls) == 1
    ctx = calls[0]
    assert ctx.latency_ms == pytest.approx(250.0)
    assert (ctx.input_tokens, ctx.output_tokens, ctx.cached_tokens) == (1000, 100, 400)
    assert ctx.finish_reasons == ("stop",)
    expected = (600 * 0.15 + 400 * 0.075 + 100 * 0.60) / 1e6
    assert ctx.cost_usd == pytest.approx(expected)


def test_non_ai_calls_are_not_emitted() -> None:
    calls: list[CallContext] = []
    with bind_sinks(calls.append):
        _guard(lambda: 1, FakeClock(), operation=None)()
    assert calls == []


def test_error_is_recorded_with_http_status_as_error_type() -> None:
    class Boom(Exception):
        status = 503

    calls: list[CallContext] = []

    def fn() -> None:
        raise Boom

    with bind_sinks(calls.append), pytest.raises(Boom):
        _guard(fn, FakeClock())()
    assert calls[0].error_type == "503"
    assert calls[0].error


def test_raw_openai_dict_is_observed() -> None:
    calls: list[CallContext] = []
    body = {
        "id": "chatcmpl-1",
        "model": "gpt-4o-2024-08-06",
        "choices": [{"message": {"content": "x"}, "finish_reason": "length"}],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    with bind_sinks(calls.append):
        _guard(lambda: body, FakeClock())()
    ctx = calls[0]
    assert ctx.response_model == "gpt-4o-2024-08-06"
    assert ctx.response_id == "chatcmpl-1"
    assert ctx.finish_reasons == ("length",)
    assert ctx.cost_usd == pytest.approx((10 * 2.5 + 5 * 10.0) / 1e6)


def test_stream_finishes_when_consumed_even_if_stopped_early() -> None:
    clock = FakeClock()
    calls: list[CallContext] = []

    def stream() -> Generator[StreamEvent, None, None]:
        yield StreamEvent("content", content="a")
        clock.advance(1)
        yield StreamEvent("content", content="b")
        yield StreamEvent("usage", usage=Usage(3, 2, 5, 0))

    with bind_sinks(calls.append):
        events = _guard(stream, clock)()
        assert calls == []  # not finished before the stream is consumed
        first = next(iter(events))
        assert first.content == "a"
        events.close()  # the caller stops early
    assert len(calls) == 1
    assert calls[0].stream is True

    calls.clear()
    with bind_sinks(calls.append):
        assert [e.type for e in _guard(stream, clock)()] == ["content", "content", "usage"]
    assert calls[0].input_tokens == 3
    assert calls[0].latency_ms == pytest.approx(1000.0)


def test_broken_sink_does_not_break_the_call(caplog: pytest.LogCaptureFixture) -> None:
    def broken(ctx: CallContext) -> None:
        raise RuntimeError("sink down")

    got: list[CallContext] = []
    with bind_sinks(broken, got.append):
        assert _guard(lambda: 42, FakeClock())() == 42
    assert len(got) == 1
    assert "sink" in caplog.text


def test_default_sinks_registry() -> None:
    got: list[CallContext] = []
    register_default_sink(got.append)
    register_default_sink(got.append)
    try:
        assert bound_sinks().count(got.append) == 1
        _guard(lambda: 1, FakeClock())()
        assert len(got) == 1
    finally:
        unregister_default_sink(got.append)
    assert got.append not in bound_sinks()


def test_contexts_do_not_leak_between_threads() -> None:
    clock = FakeClock()
    seen: dict[int, CallContext | None] = {}
    barrier = threading.Barrier(8)

    def fn(i: int) -> None:
        barrier.wait()
        seen[i] = current_call()

    threads = [threading.Thread(target=_guard(fn, clock), args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(c) for c in seen.values()}) == 8


def test_an_idempotent_replay_spends_no_tokens() -> None:
    calls: list[CallContext] = []

    def replay() -> ChatResult:
        ctx = current_call()
        assert ctx is not None
        ctx.idempotent_replay = True
        ctx.cost_usd = 0.0
        return ChatResult(content="hi", model="gpt-4o-mini", usage=Usage(1000, 100, 1100, 0))

    with bind_sinks(calls.append):
        _guard(replay, FakeClock())()
    assert (calls[0].input_tokens, calls[0].output_tokens) == (0, 0)
    assert calls[0].cost_usd == 0.0
    assert calls[0].response_model == "gpt-4o-mini"


def test_cost_is_the_catalogue_price_and_a_custom_spec_prices_itself() -> None:
    from ai_guard.pricing import DEFAULT_MODELS, ModelSpec, model_catalog

    ctx = CallContext(0.0)
    ctx.request_model = "gpt-4o-mini"
    assert ctx.current_cost() is None  # no usage seen yet
    ctx.observe_usage(Usage(prompt_tokens=1200, completion_tokens=80, cached_tokens=1024))
    expected = DEFAULT_MODELS[0].cost_usd(1200, 80, 1024)
    assert ctx.current_cost() == expected
    assert ctx.cost_usd is None  # current_cost sets nothing
    assert ctx.price() == expected
    assert cast("float | None", ctx.cost_usd) == expected  # set by price(); mypy still sees None

    class Flat(ModelSpec):
        def cost_usd(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
            return 1.0

    flat = Flat(name="flat", tier="mini", input_price=1.0, output_price=1.0)
    custom = CallContext(0.0)
    custom.request_model = "flat"
    custom.catalog = model_catalog([flat])
    custom.observe_usage(Usage(prompt_tokens=10, completion_tokens=10))
    assert custom.price() == 1.0

    odd = CallContext(0.0)
    odd.request_model = "gpt-4o-mini"
    odd.observe_usage(Usage(prompt_tokens=10, completion_tokens=0, cached_tokens=50))
    assert odd.price() == DEFAULT_MODELS[0].cost_usd(10, 0, 50)  # clamped by the spec
