from __future__ import annotations

import inspect
import sys
import threading
import types
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from ai_guard.context import CallContext, bind_sinks, current_call
from ai_guard.errors import CircuitOpenError, ConfigError
from ai_guard.pricing import DEFAULT_MODELS, ModelCatalog, find_model, parse_models
from ai_guard.routing import (
    ModelSpec,
    NoRouteError,
    RouteDecision,
    Router,
    RouteRequest,
    cost_usd,
    default_policy,
    routed,
    sample_traffic,
)
from ai_guard.testing import FakeClock
from ai_guard.types import ChatResult, Usage


class FakeBreaker:
    """What the router reads from a breaker."""

    def __init__(self, name: str, state: str = "closed", retry_after: float = 0.0) -> None:
        self.name = name
        self.state = state
        self.retry_after = retry_after


MINI_A = ModelSpec(name="mini-a", tier="mini", input_price=0.1, output_price=0.4)
MINI_B = ModelSpec(name="mini-b", tier="mini", input_price=0.2, output_price=0.8)
FULL_A = ModelSpec(name="full-a", tier="full", input_price=2.0, output_price=8.0)
FULL_B = ModelSpec(
    name="full-b", tier="full", input_price=3.0, output_price=12.0, context_window=1_000_000
)


@pytest.fixture
def calls() -> Iterator[list[CallContext]]:
    emitted: list[CallContext] = []
    with bind_sinks(emitted.append):
        yield emitted


# -- RouteRequest -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "setting"),
    [
        ({"task_type": "", "complexity_score": 3}, "task_type"),
        ({"task_type": "   ", "complexity_score": 3}, "task_type"),
        ({"task_type": 7, "complexity_score": 3}, "task_type"),
        ({"task_type": "chat", "complexity_score": -0.1}, "complexity_score"),
        ({"task_type": "chat", "complexity_score": 10.5}, "complexity_score"),
        ({"task_type": "chat", "complexity_score": float("nan")}, "complexity_score"),
        ({"task_type": "chat", "complexity_score": "5"}, "complexity_score"),
        ({"task_type": "chat", "complexity_score": True}, "complexity_score"),
        ({"task_type": "chat", "complexity_score": 3, "output_length": "huge"}, "output_length"),
        ({"task_type": "chat", "complexity_score": 3, "is_critical": "yes"}, "is_critical"),
        ({"task_type": "chat", "complexity_score": 3, "input_tokens": -1}, "input_tokens"),
        ({"task_type": "chat", "complexity_score": 3, "input_tokens": 1.5}, "input_tokens"),
        ({"task_type": "chat", "complexity_score": 3, "input_tokens": True}, "input_tokens"),
    ],
)
def test_bad_route_request_gives_a_clear_error_naming_the_field(
    fields: dict[str, Any], setting: str
) -> None:
    with pytest.raises(ConfigError) as info:
        RouteRequest(**fields)
    assert info.value.setting == setting
    assert isinstance(info.value, ValueError)
    assert setting in str(info.value)


def test_route_request_accepts_the_edges_and_is_frozen() -> None:
    for score in (0, 10, 6.5):
        RouteRequest("chat", score)
    request = RouteRequest("chat", 3, input_tokens=0)
    with pytest.raises(AttributeError):
        request.complexity_score = 4  # type: ignore[misc]


# -- the default policy, row by row -----------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "tier", "words"),
    [
        (RouteRequest("classification", 1, is_critical=True), "full", "Critical request"),
        (RouteRequest("chat", 7), "full", "Complexity 7 is 7 or above"),
        (RouteRequest("classification", 9.5), "full", "Complexity 9.5"),
        (RouteRequest("chat", 5, output_length="long"), "full", "Long output at complexity 5"),
        (RouteRequest("classification", 4), "mini", "Classification is a simple task"),
        (RouteRequest("Extraction", 6), "mini", "Extraction is a simple task"),
        (RouteRequest("summarization", 6, output_length="medium"), "mini", "Summarization"),
        (RouteRequest("short-answer", 6), "mini", "Short answer is a simple task"),
        (RouteRequest("chat", 6, output_length="short"), "mini", "Short answer expected"),
        (RouteRequest("chat", 6.9), "mini", "Complexity 6.9 is below 7"),
        (RouteRequest("chat", 4.9, output_length="long"), "mini", "Complexity 4.9 is below 7"),
        (RouteRequest("generation", 0), "mini", "not critical"),
    ],
)
def test_every_row_of_the_default_policy(request_: RouteRequest, tier: str, words: str) -> None:
    decision = Router().route(request_)
    assert decision.tier == tier
    assert decision.model == {"mini": "gpt-4o-mini", "full": "gpt-4o"}[tier]
    assert words in decision.reason
    assert decision.reason.endswith(".")
    assert decision.fallback_from is None
    assert default_policy(request_, DEFAULT_MODELS)[0] == tier


def test_realistic_traffic_sends_at_least_85_percent_to_mini() -> None:
    requests = sample_traffic(20_000, seed=7)
    router = Router()
    tiers = Counter(router.route(r).tier for r in requests)
    mini_share = tiers["mini"] / len(requests)
    assert mini_share >= 0.85
    # ... while critical and complex work really goes to the full model.
    assert tiers["full"] / len(requests) >= 0.05
    for request, decision in zip(requests[:2000], map(router.route, requests[:2000]), strict=True):
        if request.is_critical or request.complexity_score >= 7:
            assert decision.tier == "full"


def test_sample_traffic_follows_its_documented_mix() -> None:
    requests = sample_traffic(20_000, seed=1)
    shares = Counter(r.task_type for r in requests)
    expected = {
        "classification": 0.30,
        "extraction": 0.20,
        "summarization": 0.15,
        "chat": 0.27,
        "generation": 0.08,
    }
    for task, share in expected.items():
        assert shares[task] / len(requests) == pytest.approx(share, abs=0.015)
    assert sum(r.is_critical for r in requests) / len(requests) == pytest.approx(0.02, abs=0.005)
    assert sample_traffic(50, seed=3) == sample_traffic(50, seed=3)


# -- custom policies --------------------------------------------------------------------


@pytest.mark.parametrize("target", ["full-b", FULL_B, "full"])
def test_custom_policy_may_name_a_model_a_spec_or_a_tier(target: Any) -> None:
    def policy(request: RouteRequest, models: Any) -> tuple[Any, str]:
        return (target if target != "full" else "full"), "Custom rule."

    router = Router([MINI_A, FULL_B, FULL_A], policy=policy)
    decision = router.route(RouteRequest("chat", 1))
    assert decision == RouteDecision("full-b", "full", "Custom rule.")


def test_custom_policy_naming_an_unknown_model_is_an_error() -> None:
    router = Router(policy=lambda request, models: ("gpt-9", "why not"))
    with pytest.raises(NoRouteError, match="gpt-9"):
        router.route(RouteRequest("chat", 1))


def test_policy_must_be_callable() -> None:
    with pytest.raises(ConfigError, match="policy"):
        Router(policy="mini")  # type: ignore[arg-type]


def test_tier_missing_from_the_catalogue_uses_another_model_and_says_so() -> None:
    decision = Router([FULL_A]).route(RouteRequest("classification", 1))
    assert decision.model == "full-a"
    assert "No mini model in the catalogue" in decision.reason


# -- context windows --------------------------------------------------------------------


def test_input_larger_than_a_context_window_skips_that_model() -> None:
    router = Router([MINI_A, FULL_A, FULL_B])
    decision = router.route(RouteRequest("classification", 2, input_tokens=300_000))
    assert decision.model == "full-b"
    assert "mini-a skipped: 300,000 input tokens exceed its 128,000-token" in decision.reason
    assert "full-a skipped" in decision.reason
    assert decision.fallback_from is None  # a size skip is selection, not a fallback
    assert router.route(RouteRequest("classification", 2, input_tokens=128_000)).model == "mini-a"


def test_input_larger_than_every_context_window_is_an_error() -> None:
    with pytest.raises(NoRouteError, match="2,000,000 input tokens"):
        Router([MINI_A, FULL_B]).route(RouteRequest("chat", 1, input_tokens=2_000_000))


# -- breaker-aware fallback -------------------------------------------------------------


def test_open_breaker_falls_back_to_the_next_model_and_says_so() -> None:
    breakers = {"gpt-4o-mini": FakeBreaker("openai:gpt-4o-mini", "open", 12.0)}
    decision = Router(breakers=breakers).route(RouteRequest("classification", 2))
    assert decision.model == "gpt-4o"
    assert decision.tier == "full"
    assert decision.fallback_from == "gpt-4o-mini"
    assert "Classification is a simple task" in decision.reason
    assert "gpt-4o-mini's circuit is open (next trial in 12.0 s): fell back to gpt-4o" in (
        decision.reason
    )


def test_fallback_tries_the_same_tier_first_then_the_other() -> None:
    breakers = {
        "mini-a": FakeBreaker("b:mini-a", "open", 5.0),
        "mini-b": FakeBreaker("b:mini-b"),
        "full-a": FakeBreaker("b:full-a"),
    }
    router = Router([MINI_A, FULL_A, MINI_B], breakers=breakers)
    assert router.route(RouteRequest("chat", 1)).model == "mini-b"
    breakers["mini-b"].state = "open"
    decision = router.route(RouteRequest("chat", 1))
    assert (decision.model, decision.fallback_from) == ("full-a", "mini-a")
    # A full request degrades to mini only when every full model is open.
    breakers["mini-b"].state = "closed"
    breakers["full-a"].state = "open"
    decision = router.route(RouteRequest("chat", 1, is_critical=True))
    assert (decision.model, decision.tier, decision.fallback_from) == ("mini-b", "mini", "full-a")


def test_half_open_breaker_is_still_tried() -> None:
    breakers = {"gpt-4o-mini": FakeBreaker("openai:gpt-4o-mini", "half_open")}
    assert Router(breakers=breakers).route(RouteRequest("chat", 1)).model == "gpt-4o-mini"


def test_every_model_open_raises_circuit_open_with_the_soonest_retry_after() -> None:
    breakers = {
        "gpt-4o-mini": FakeBreaker("openai:gpt-4o-mini", "open", 25.0),
        "gpt-4o": FakeBreaker("openai:gpt-4o", "open", 4.5),
    }
    with pytest.raises(CircuitOpenError) as info:
        Router(breakers=breakers).route(RouteRequest("chat", 1))
    assert info.value.name == "openai:gpt-4o"
    assert info.value.retry_after == 4.5
    assert "gpt-4o-mini, gpt-4o" in str(info.value)


def test_without_cross_tier_fallback_an_open_tier_is_an_open_circuit() -> None:
    breakers = {"gpt-4o-mini": FakeBreaker("openai:gpt-4o-mini", "open", 3.0)}
    router = Router(breakers=breakers, cross_tier_fallback=False)
    with pytest.raises(CircuitOpenError) as info:
        router.route(RouteRequest("chat", 1))
    assert info.value.retry_after == 3.0


def test_breakers_from_a_callable() -> None:
    open_one = FakeBreaker("x", "open", 1.0)
    router = Router(breakers=lambda model: open_one if model == "gpt-4o" else None)
    decision = router.route(RouteRequest("chat", 9))
    assert (decision.model, decision.fallback_from) == ("gpt-4o-mini", "gpt-4o")


def test_breakers_from_a_name_template_are_looked_up_at_each_decision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry: dict[str, FakeBreaker] = {}
    fake = types.ModuleType("ai_guard.breaker")
    fake.get_breaker = registry.get  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_guard.breaker", fake)
    router = Router(breakers="upstream:{model}")
    assert router.route(RouteRequest("chat", 1)).model == "gpt-4o-mini"
    # a breaker created later (by @circuit_breaker("upstream:{model}")) is found
    registry["upstream:gpt-4o-mini"] = FakeBreaker("upstream:gpt-4o-mini", "open", 2.0)
    decision = router.route(RouteRequest("chat", 1))
    assert (decision.model, decision.fallback_from) == ("gpt-4o", "gpt-4o-mini")
    assert router.breaker_for("gpt-4o") is None


def test_real_circuit_breakers_from_the_registry_drive_the_fallback() -> None:
    from ai_guard.breaker import circuit_breaker, default_registry

    clock = FakeClock()
    prefix = f"routing-test-{id(clock)}"
    router = Router(breakers=prefix + ":{model}")
    attempts: list[str] = []

    @routed(router, request=lambda **_: RouteRequest("chat", 1))
    @circuit_breaker(prefix + ":{model}", failure_threshold=2, timeout=30, clock=clock)
    def ask(*, model: str = "") -> str:
        attempts.append(model)
        if model == "gpt-4o-mini":
            raise ConnectionError("mini is down")
        return model

    try:
        for _ in range(2):
            with pytest.raises(ConnectionError):
                ask()
        # the mini breaker is open now: routed around it, without calling it
        assert ask() == "gpt-4o"
        assert attempts == ["gpt-4o-mini", "gpt-4o-mini", "gpt-4o"]
        decision = router.route(RouteRequest("chat", 1))
        assert decision.fallback_from == "gpt-4o-mini"
        assert "next trial in 30.0 s" in decision.reason
        clock.advance(30)  # half-open: the mini model gets its trial call again
        assert router.route(RouteRequest("chat", 1)).model == "gpt-4o-mini"
    finally:
        registry = default_registry()
        for name in (f"{prefix}:gpt-4o-mini", f"{prefix}:gpt-4o"):
            registry.remove(name)


@pytest.mark.parametrize(
    ("breakers", "setting"),
    [
        ("openai", "breakers"),
        ("openai:{model}:{region}", "breakers"),
        ({"gpt-5": FakeBreaker("x")}, "breakers['gpt-5']"),
        ({"gpt-4o": object()}, "breakers['gpt-4o']"),
        (42, "breakers"),
    ],
)
def test_bad_breakers_setting_is_rejected(breakers: Any, setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        Router(breakers=breakers)
    assert info.value.setting == setting


# -- @routed ----------------------------------------------------------------------------


def test_routed_injects_the_model_and_writes_the_decision_into_the_context(
    calls: list[CallContext],
) -> None:
    router = Router([MINI_A, FULL_A])
    seen: list[tuple[str, CallContext | None]] = []

    @routed(router, request=lambda text, *, urgent=False, **_: RouteRequest("chat", 2, urgent))
    def ask(text: str, *, model: str = "", urgent: bool = False) -> ChatResult:
        seen.append((model, current_call()))
        return ChatResult(content="x", model=model, usage=Usage(1000, 200, 1200, 400))

    ask("hello")
    ask("now!", urgent=True)
    assert [model for model, _ in seen] == ["mini-a", "full-a"]
    first, second = calls
    assert seen[0][1] is first
    assert (first.operation, first.provider) == ("chat", "openai")
    assert (first.request_model, first.tier, first.fallback_from) == ("mini-a", "mini", None)
    assert first.route_reason is not None
    assert "below 7" in first.route_reason
    assert (second.request_model, second.tier) == ("full-a", "full")
    assert second.route_reason == "Critical request: full tier."
    # priced from the router's own table, cached tokens at the cached (= input) rate
    assert first.cost_usd == pytest.approx((1000 * 0.1 + 200 * 0.4) / 1e6)
    assert second.cost_usd == pytest.approx((1000 * 2.0 + 200 * 8.0) / 1e6)


def test_routed_reads_a_route_request_argument_when_no_request_callable(
    calls: list[CallContext],
) -> None:
    @routed(Router())
    def ask(route: RouteRequest, prompt: str, *, model: str = "") -> str:
        return model

    assert ask(RouteRequest("chat", 8), "x") == "gpt-4o"
    assert ask(prompt="x", route=RouteRequest("chat", 1)) == "gpt-4o-mini"
    with pytest.raises(TypeError, match="RouteRequest"):
        ask("not a request", "x")  # type: ignore[arg-type]
    assert [c.error_type for c in calls] == [None, None, "TypeError"]


def test_a_model_passed_by_the_caller_is_pinned_not_routed(calls: list[CallContext]) -> None:
    @routed(Router(), request=lambda **_: RouteRequest("chat", 1))
    def ask(*, model: str = "") -> str:
        return model

    assert ask(model="gpt-4o") == "gpt-4o"
    assert (calls[0].tier, calls[0].route_reason) == ("full", "Model pinned by the caller.")


def test_routed_retries_once_on_the_next_model_when_the_call_is_rejected(
    calls: list[CallContext],
) -> None:
    breakers = {"gpt-4o-mini": FakeBreaker("openai:gpt-4o-mini"), "gpt-4o": FakeBreaker("o")}
    attempts: list[str] = []

    @routed(Router(breakers=breakers), request=lambda **_: RouteRequest("chat", 1))
    def ask(*, model: str = "") -> str:
        attempts.append(model)
        if model == "gpt-4o-mini":  # its breaker opened after the decision
            raise CircuitOpenError("openai:gpt-4o-mini", 7.0)
        return "answer"

    assert ask() == "answer"
    assert attempts == ["gpt-4o-mini", "gpt-4o"]
    (ctx,) = calls
    assert (ctx.request_model, ctx.tier, ctx.fallback_from) == ("gpt-4o", "full", "gpt-4o-mini")
    assert ctx.route_reason is not None
    assert "next trial in 7.0 s" in ctx.route_reason
    assert ctx.error_type is None


def test_routed_retries_only_once(calls: list[CallContext]) -> None:
    attempts: list[str] = []

    @routed(Router([MINI_A, MINI_B, FULL_A]), request=lambda **_: RouteRequest("chat", 1))
    def ask(*, model: str = "") -> str:
        attempts.append(model)
        raise CircuitOpenError(f"up:{model}", 1.0)

    with pytest.raises(CircuitOpenError) as info:
        ask()
    assert attempts == ["mini-a", "mini-b"]
    assert info.value.name == "up:mini-b"
    assert calls[0].error_type == "CircuitOpenError"


def test_routed_does_not_retry_another_breakers_rejection_or_when_told_not_to() -> None:
    breakers = {"gpt-4o-mini": FakeBreaker("openai:gpt-4o-mini")}
    attempts: list[str] = []

    def ask(*, model: str = "") -> str:
        attempts.append(model)
        raise CircuitOpenError("postgres", 3.0)  # a breaker deeper in the call

    guarded = routed(Router(breakers=breakers), request=lambda **_: RouteRequest("chat", 1))(ask)
    with pytest.raises(CircuitOpenError):
        guarded()
    assert attempts == ["gpt-4o-mini"]

    attempts.clear()
    no_retry = routed(Router(), request=lambda **_: RouteRequest("chat", 1), retry_on_open=False)
    with pytest.raises(CircuitOpenError):
        no_retry(ask)()
    assert attempts == ["gpt-4o-mini"]


def test_every_model_open_fails_the_call_without_calling_it(calls: list[CallContext]) -> None:
    breakers = {
        "gpt-4o-mini": FakeBreaker("openai:gpt-4o-mini", "open", 9.0),
        "gpt-4o": FakeBreaker("openai:gpt-4o", "open", 2.0),
    }
    called: list[str] = []

    @routed(Router(breakers=breakers), request=lambda **_: RouteRequest("chat", 1))
    def ask(*, model: str = "") -> str:
        called.append(model)
        return model

    with pytest.raises(CircuitOpenError) as info:
        ask()
    assert info.value.retry_after == 2.0
    assert called == []
    (ctx,) = calls  # counted as a failed AI call (availability)
    assert ctx.error_type == "CircuitOpenError"


def test_routed_keeps_the_signature_and_rejects_bad_settings() -> None:
    def ask(text: str, *, model: str = "") -> str:
        return model

    wrapped = routed(Router(), request=lambda text, **_: RouteRequest("chat", 1))(ask)
    assert inspect.signature(wrapped) == inspect.signature(ask)
    assert wrapped.__name__ == "ask"
    with pytest.raises(ConfigError, match="router"):
        routed("router")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="request"):
        routed(Router(), request="classification")  # type: ignore[arg-type]


def test_concurrent_routed_calls_keep_their_own_context_and_decisions() -> None:
    router = Router()
    traffic = sample_traffic(4000, seed=11)
    expected = Counter(router.route(r).model for r in traffic)
    emitted: list[CallContext] = []
    lock = threading.Lock()
    mismatches: list[str] = []

    def sink(ctx: CallContext) -> None:
        with lock:
            emitted.append(ctx)

    @routed(router, request=lambda req, **_: req)
    def ask(req: RouteRequest, *, model: str = "") -> ChatResult:
        ctx = current_call()
        if ctx is None or ctx.request_model != model:
            mismatches.append(model)
        return ChatResult(content="x", model=model, usage=Usage(10, 1, 11, 0))

    threads = 16
    chunks = [traffic[i::threads] for i in range(threads)]
    barrier = threading.Barrier(threads)

    def work(chunk: list[RouteRequest]) -> None:
        barrier.wait()
        with bind_sinks(sink):
            for req in chunk:
                ask(req)

    workers = [threading.Thread(target=work, args=(c,)) for c in chunks]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert mismatches == []
    assert len(emitted) == len(traffic)
    assert Counter(c.request_model for c in emitted) == expected
    assert all(c.tier == find_model(c.request_model).tier for c in emitted)  # type: ignore[union-attr]


# -- prices -----------------------------------------------------------------------------


def test_cost_usd_prices_cached_tokens_at_the_cached_rate() -> None:
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=100_000, cached_tokens=400_000)
    assert cost_usd("gpt-4o-mini", usage) == pytest.approx(0.6 * 0.15 + 0.4 * 0.075 + 0.1 * 0.6)
    assert cost_usd("gpt-4o-2024-08-06", usage) == pytest.approx(0.6 * 2.5 + 0.4 * 1.25 + 1.0)
    assert cost_usd(FULL_A, usage) == pytest.approx(1.0 * 2.0 + 0.1 * 8.0)
    assert cost_usd("gpt-4o-mini", 1000, 100, 400) == pytest.approx(
        (600 * 0.15 + 400 * 0.075 + 100 * 0.6) / 1e6
    )
    assert cost_usd("llama-3", usage) is None


def test_router_catalogue_comes_from_configuration() -> None:
    router = Router(
        {
            "small": {"tier": "mini", "input_price": 0.1, "output_price": 0.2},
            "large": {"tier": "full", "input_price": 1.0, "output_price": 2.0},
        }
    )
    assert [m.name for m in router.models] == ["small", "large"]
    assert router.route(RouteRequest("chat", 8)).model == "large"
    assert router.catalog["small"].cached_input_price == 0.1


@pytest.mark.parametrize(
    ("value", "setting"),
    [
        ({"x": {"tier": "mini", "input_price": -1, "output_price": 1}}, "models['x'].input_price"),
        ([{"name": "x", "tier": "huge", "input_price": 1, "output_price": 1}], "models[0].tier"),
        ({"x": 5}, "models['x']"),
        ([], "models"),
        ("gpt-4o", "models"),
        ([MINI_A, MINI_A], "models"),
    ],
)
def test_bad_model_catalogue_names_the_entry(value: Any, setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        Router(value)
    assert info.value.setting == setting


def test_catalogue_remembers_dated_names_within_a_bound() -> None:
    catalog = ModelCatalog([MINI_A, FULL_A])
    assert catalog.find("mini-a-2025-01-01") is MINI_A
    assert find_model("mini-a-2025-01-01", catalog) is MINI_A
    assert catalog.find("other") is None
    for i in range(5000):
        catalog.find(f"unknown-{i}")
    assert len(catalog._known) <= len(catalog) + ModelCatalog._MEMO_LIMIT
    assert catalog.find("full-a-x") is FULL_A
    assert dict(catalog) == {"mini-a": MINI_A, "full-a": FULL_A}
    assert parse_models(catalog.values()) == (MINI_A, FULL_A)


# -- remembered decisions (the hot path of @routed) ------------------------------------


def test_a_remembered_decision_still_reads_the_breaker_on_every_call() -> None:
    mini = FakeBreaker("mini-a")
    router = Router([MINI_A, MINI_B, FULL_A], breakers={"mini-a": mini})
    request = RouteRequest("classification", 2)
    first = router.route(request)
    assert router.route(RouteRequest("classification", 2)) is first  # remembered
    mini.state = "open"
    fallback = router.route(request)
    assert (fallback.model, fallback.fallback_from) == ("mini-b", "mini-a")
    mini.state = "half_open"  # a trial call may go through: no fallback
    assert router.route(request) == first


def test_remembered_decisions_equal_fresh_ones_for_every_request() -> None:
    remembered = Router()
    for request in sample_traffic(300, seed=3) * 2:
        fresh = Router().route(request)
        assert remembered.route(request) == fresh


def test_equal_scores_that_read_differently_keep_their_own_reason() -> None:
    router = Router()
    assert "Complexity 0 " in router.route(RouteRequest("chat", 0)).reason
    assert "Complexity -0 " in router.route(RouteRequest("chat", -0.0)).reason
    assert "Complexity 0 " in router.route(RouteRequest("chat", 0.0)).reason


def test_a_custom_policy_is_asked_on_every_call() -> None:
    asked: list[RouteRequest] = []

    def policy(request: RouteRequest, models: Any) -> tuple[str, str]:
        asked.append(request)
        return "mini", "Custom."

    router = Router(policy=policy)
    for _ in range(3):
        router.route(RouteRequest("chat", 1))
    assert len(asked) == 3


def test_remembered_decisions_are_bounded() -> None:
    router = Router()
    for tokens in range(3000):
        router.route(RouteRequest("chat", 1, input_tokens=tokens))
    assert len(router._plans or {}) <= 1024


def test_route_request_fast_and_slow_construction_agree() -> None:
    class Text(str):
        pass

    plain = RouteRequest("chat", 3, True, "long", 10)
    odd = RouteRequest(Text("chat"), 3.0, True, "long", 10)  # accepted by the full checks
    assert plain == odd
    assert router_decision(plain) == router_decision(odd)
    with pytest.raises(ConfigError):
        RouteRequest("chat", float("inf"))


def router_decision(request: RouteRequest) -> RouteDecision:
    return Router().route(request)
