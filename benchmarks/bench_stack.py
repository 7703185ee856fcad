"""The full stack beside the do-it-yourself stack users wire by hand.

**Ours**, in the recommended order, around a function that returns a ``ChatResult`` at
once::

    @routed(router, request=lambda prompt, **_: RouteRequest("classification", 2))
    @traced_ai(operation="chat")
    @circuit_breaker("openai:{model}")
    @rate_limited(max_retries=5)
    def ask(prompt, *, model): ...

with the sinks a user gets by default: the default :class:`MetricsCollector` and the call
log (INFO off, as by default). The router's decision (the policy, the breaker of each
candidate, the reason) is made on every call.

**Do it yourself** (what people write with the usual libraries, same job minus routing):
an OpenTelemetry span (``tracer.start_as_current_span`` with the same attributes set by
hand) around pybreaker around tenacity's ``@retry`` (6 attempts, random exponential
backoff on a rate-limit error) around a ``limits`` moving window
(``MovingWindowRateLimiter(MemoryStorage())``, ``10^9/second``: never blocks) and the
function, then a labelled prometheus_client ``Counter`` + ``Histogram`` on a private
registry.

Two groups:

- ``stack_sdk``: an SDK ``TracerProvider`` whose exporter drops every span, passed to
  ``traced_ai(tracer_provider=...)``; the DIY stack uses the same provider's tracer.
  Target: our overhead <= 0.5x the DIY stack's.
- ``stack_nosdk``: no SDK anywhere. Ours has no provider; the DIY stack uses the OTel API's
  no-op tracer (``NoOpTracer``, the cheapest span an instrumented library can open).
  Target: our overhead <= 0.1x. Skipped when a global ``TracerProvider`` is installed in
  the process.

Each from 1 thread and from 8 threads; after each case, exact-count checks: the default
collector's ``total_requests`` grew by exactly the number of calls made, the DIY stack's
Prometheus counter equals it.

Informative rows (1 thread): ``diy_stack fixed window`` is the same DIY stack with
``limits``' O(1) fixed window: its in-memory moving window keeps one entry per hit inside
the window and inserts at the front of a list, so its cost grows with the call rate (the
target is against the moving window, as specified). ``diy_stack proxy tracer`` uses what
``trace.get_tracer(__name__)`` returns while no SDK is installed (a proxy in front of the
no-op tracer): what most instrumented code actually runs. ``span alone (floor)`` is the
DIY stack's span by itself (same name, kind, attributes, status): no stack that records
this span can cost less, so ``floor / diy_stack`` bounds the ``stack_sdk`` ratio from
below.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pybreaker
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NoOpTracer, Span, SpanKind, Status, StatusCode, Tracer
from prometheus_client import CollectorRegistry, Counter, Histogram
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from ai_guard.breaker import circuit_breaker
from ai_guard.metrics import default_collector
from ai_guard.ratelimit import rate_limited
from ai_guard.routing import Router, RouteRequest, routed
from ai_guard.tracing import _global_tracer_provider, traced_ai
from ai_guard.types import ChatResult, Usage
from benchmarks._harness import Case
from benchmarks._spans import CHAT_SPAN_ATTRIBUTES, CHAT_SPAN_NAME, MODEL

RESULT = ChatResult(
    content="positive",
    model="gpt-4o-mini-2024-07-18",
    usage=Usage(1200, 8, 1208, 1024),
    finish_reason="stop",
    id="chatcmpl-bench",
)
# gpt-4o-mini list prices, USD per 1M tokens (what the DIY stack hard-codes).
PRICE_INPUT, PRICE_CACHED, PRICE_OUTPUT = 0.15, 0.075, 0.60

_names = itertools.count()


def ask(prompt: str, *, model: str = "") -> ChatResult:
    return RESULT


def _bare() -> object:
    return ask("hello", model=MODEL)


class _DropExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


# -- ours ----------------------------------------------------------------------------------


def ours(
    tracer_provider: TracerProvider | None = None, inner: Callable[..., ChatResult] = ask
) -> tuple[Callable[[], object], Callable[[], None], Callable[[int], None]]:
    """Our full stack around ``inner``, with the setup and the check of exact counts on
    the default collector (the sink a user gets)."""
    template = f"bench-stack-{next(_names)}:{{model}}"
    router = Router(breakers=template)
    guarded = routed(router, request=lambda prompt, **_: RouteRequest("classification", 2))(
        traced_ai(operation="chat", tracer_provider=tracer_provider)(
            circuit_breaker(template)(rate_limited(max_retries=5)(inner))
        )
    )

    def call() -> object:
        return guarded("hello")

    assert call() is RESULT
    baseline = [0]

    def setup() -> None:
        baseline[0] = default_collector().report()["total_requests"]

    def check(calls: int) -> None:
        recorded = default_collector().report()["total_requests"] - baseline[0]
        assert recorded == calls, f"the collector counted {recorded} calls of {calls}"

    return call, setup, check


# -- do it yourself ------------------------------------------------------------------------


class _RateLimited(Exception):
    pass


class Diy(NamedTuple):
    """The do-it-yourself stack: the call, the check of exact counts on its Prometheus
    counter (the calls made, warm-up call aside), and a teardown that empties the rate
    limiter (its moving window keeps one object per hit of the last second)."""

    call: Callable[[], object]
    check: Callable[[int], None]
    teardown: Callable[[], None]


def diy(
    tracer: Tracer,
    inner: Callable[..., ChatResult] = ask,
    limiter_type: type[RateLimiter] = MovingWindowRateLimiter,
) -> Diy:
    """The do-it-yourself stack around ``inner``."""
    storage = MemoryStorage()
    limiter = limiter_type(storage)
    limit = parse("1000000000/second")
    registry = CollectorRegistry()
    requests_total = Counter(
        "llm_requests", "AI calls", ["model", "tier", "outcome"], registry=registry
    )
    latency = Histogram(
        "llm_request_latency_seconds", "AI call latency", ["model", "tier"], registry=registry
    )
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)

    @retry(
        stop=stop_after_attempt(6),
        wait=wait_random_exponential(multiplier=0.5, max=60),
        retry=retry_if_exception_type(_RateLimited),
        reraise=True,
    )
    def retrying(prompt: str, model: str) -> ChatResult:
        if not limiter.hit(limit, "openai", model):
            raise _RateLimited(model)
        return inner(prompt, model=model)

    # pybreaker outside the retries: one outcome per logical call, as in our stack.
    attempt: Callable[[str, str], ChatResult] = breaker(retrying)

    def call() -> object:
        model, tier = MODEL, "mini"
        started = time.perf_counter()
        with tracer.start_as_current_span(
            CHAT_SPAN_NAME, kind=SpanKind.CLIENT, attributes=CHAT_SPAN_ATTRIBUTES
        ) as span:
            try:
                result = attempt("hello", model)
            except Exception as exc:
                requests_total.labels(model, tier, "error").inc()
                span.set_attribute("error.type", type(exc).__name__)
                raise
            elapsed = time.perf_counter() - started
            _set_result_attributes(span, result, elapsed)
            span.set_attribute("ai_guard.circuit.state", breaker.current_state)
            statistics: dict[str, Any] = retrying.statistics
            span.set_attribute("ai_guard.retries", statistics.get("attempt_number", 1) - 1)
            span.set_status(Status(StatusCode.OK))
            requests_total.labels(model, tier, "ok").inc()
            latency.labels(model, tier).observe(elapsed)
            return result

    def check(calls: int) -> None:
        counted = registry.get_sample_value(
            "llm_requests_total", {"model": MODEL, "tier": "mini", "outcome": "ok"}
        )
        assert counted == calls + 1, f"the Prometheus counter says {counted} calls of {calls}"

    assert call() is RESULT
    check(0)

    def teardown() -> None:
        storage.reset()

    return Diy(call, check, teardown)


def _set_result_attributes(span: Span, result: ChatResult, elapsed: float) -> None:
    """What the span learns from the result, set by hand (the attributes ours sets)."""
    usage = result.usage
    cached = usage.cached_tokens
    cost = (
        (usage.prompt_tokens - cached) * PRICE_INPUT
        + cached * PRICE_CACHED
        + usage.completion_tokens * PRICE_OUTPUT
    ) / 1e6
    span.set_attributes(
        {
            "gen_ai.request.stream": False,
            "gen_ai.response.model": result.model,
            "gen_ai.response.id": result.id or "",
            "gen_ai.response.finish_reasons": (result.finish_reason or "",),
            "gen_ai.usage.input_tokens": usage.prompt_tokens,
            "gen_ai.usage.output_tokens": usage.completion_tokens,
            "gen_ai.usage.cache_read.input_tokens": cached,
            "ai_guard.circuit.name": "openai",
            "ai_guard.cache_hit": cached > 0,
            "ai_guard.route.tier": "mini",
            "ai_guard.latency_ms": elapsed * 1000.0,
            "ai_guard.cost_usd": cost,
        }
    )


def _span_alone(tracer: Tracer) -> Callable[[], object]:
    """Only the DIY stack's span (same name, kind, attributes, status) around the call:
    the floor under any stack that records this span."""

    def call() -> object:
        started = time.perf_counter()
        with tracer.start_as_current_span(
            CHAT_SPAN_NAME, kind=SpanKind.CLIENT, attributes=CHAT_SPAN_ATTRIBUTES
        ) as span:
            result = ask("hello", model=MODEL)
            _set_result_attributes(span, result, time.perf_counter() - started)
            span.set_attribute("ai_guard.circuit.state", "closed")
            span.set_attribute("ai_guard.retries", 0)
            span.set_status(Status(StatusCode.OK))
            return result

    return call


# -- the groups ----------------------------------------------------------------------------


def _group(group: str, tracer: Tracer, tracer_provider: TracerProvider | None) -> list[Case]:
    out: list[Case] = []
    for threads in (1, 8):
        our_call, setup, check = ours(tracer_provider)
        stack = diy(tracer)
        out += [
            Case(group, "bare", _bare, threads=threads),
            Case(
                group,
                "ai_guard full stack",
                our_call,
                anchor="diy_stack",
                target=0.5 if tracer_provider is not None else 0.1,
                threads=threads,
                setup=setup,
                check=check,
            ),
            Case(
                group,
                "diy_stack",
                stack.call,
                threads=threads,
                check=stack.check,
                teardown=stack.teardown,
            ),
        ]
        if threads == 1:
            # For the reader: how much of the DIY figure is limits' moving window, and
            # (with the SDK) the span alone, which no stack recording it can go below.
            fixed = diy(tracer, limiter_type=FixedWindowRateLimiter)
            out.append(
                Case(
                    group,
                    "diy_stack fixed window",
                    fixed.call,
                    anchor="diy_stack",
                    check=fixed.check,
                    teardown=fixed.teardown,
                )
            )
            if tracer_provider is not None:
                out.append(
                    Case(group, "span alone (floor)", _span_alone(tracer), anchor="diy_stack")
                )
            else:
                proxy = diy(trace.get_tracer("bench"))
                out.append(
                    Case(
                        group,
                        "diy_stack proxy tracer",
                        proxy.call,
                        anchor="diy_stack",
                        check=proxy.check,
                        teardown=proxy.teardown,
                    )
                )
    return out


def _sdk_cases() -> list[Case]:
    provider = sdk_provider()
    return _group("stack_sdk", provider.get_tracer("bench"), provider)


def _nosdk_cases() -> list[Case]:
    if _global_tracer_provider() is not None:
        print(
            "bench_stack: a global TracerProvider is installed in this process; "
            "the no-SDK group is skipped (run `python -m benchmarks -k stack`)",
            file=sys.stderr,
        )
        return []
    return _group("stack_nosdk", NoOpTracer(), None)


def cases() -> list[Case]:
    logging.getLogger("ai_guard").setLevel(logging.WARNING)  # INFO off, as by default
    return _nosdk_cases() + _sdk_cases()


def sdk_provider() -> TracerProvider:
    """An SDK provider that drops every span (what the ``stack_sdk`` group uses)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_DropExporter()))
    return provider
