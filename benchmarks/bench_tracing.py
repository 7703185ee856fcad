"""What ``@traced_ai`` costs per call.

- ``traced_ai_nosdk``: no OpenTelemetry SDK installed (the usual state of a script or a
  test suite). ``ai_guard`` is the decorator with no sinks bound (the wrapper plus the
  per-call context), ``ai_guard_log_sink`` adds the default call-log sink with INFO off
  (what an application gets by default). The anchor is the OTel API's own no-op span
  (``NoOpTracer().start_as_current_span``, the cheapest span an instrumented library can
  open); ``otel_api_proxy_span`` is what ``trace.get_tracer()`` hands out before an SDK is
  installed, for reference.
- ``traced_ai_sdk``: an SDK ``TracerProvider`` whose exporter drops everything (so the
  figure is span creation and attributes, not export). The anchor is a plain SDK span
  with the same name, kind, attributes and status set by hand from the result (latency
  and cost left at 0). Reported as a ratio, without a target: the SDK's span is most of
  both figures; the full stack's target (``bench_stack``) is the one that counts.

Each from 1 thread and from 8. Every case runs inside a ``contextvars.Context`` of its
own (one per thread), so the sinks bound for one case do not leak into the benchmarks of
other modules (they run in the same thread), and counts the calls that reach the
decorated function: exactly one per call made.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
from collections.abc import Callable, Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NoOpTracer, SpanKind, Status, StatusCode

from ai_guard.context import _BOUND_SINKS
from ai_guard.logs import log_call
from ai_guard.tracing import _global_tracer_provider, traced_ai
from ai_guard.types import ChatResult, Usage
from benchmarks._harness import CallCounter, Case
from benchmarks._spans import CHAT_SPAN_ATTRIBUTES, CHAT_SPAN_NAME, MODEL

RESULT = ChatResult(
    content="positive",
    model="gpt-4o-mini-2024-07-18",
    usage=Usage(1200, 8, 1208, 1024),
    finish_reason="stop",
    id="chatcmpl-bench",
)


Ask = Callable[..., ChatResult]


def _counted_ask() -> tuple[Ask, CallCounter]:
    """The AI call (returns at once), and the exact count of the calls reaching it."""
    counter = CallCounter()
    tick = counter.tick

    def ask(prompt: str, *, model: str) -> ChatResult:
        tick()
        return RESULT

    return ask, counter


def _in_context(fn: Callable[[], object], *sinks: Callable[..., None]) -> Callable[[], object]:
    """``fn`` run in a context of its own per thread, with ``sinks`` bound there."""
    local = threading.local()

    def run() -> object:
        try:
            context: contextvars.Context = local.context
        except AttributeError:
            context = local.context = contextvars.copy_context()
            # Set for good in that context (no scope to exit: the context is the case's).
            context.run(_BOUND_SINKS.set, tuple(sinks))
        return context.run(fn)

    return run


def _case(
    group: str,
    name: str,
    make: Callable[[Ask], Callable[[], object]],
    threads: int,
    *sinks: Callable[..., None],
    anchor: str | None = None,
    target: float | None = None,
) -> Case:
    """A case whose body ``make`` builds around its own counted AI call."""
    ask, counter = _counted_ask()
    return Case(
        group,
        name,
        _in_context(make(ask), *sinks),
        anchor=anchor,
        target=target,
        threads=threads,
        setup=counter.setup,
        check=counter.check,
    )


class _DropExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _bare(ask: Ask) -> Callable[[], object]:
    return lambda: ask("hello", model=MODEL)


def _traced(**options: object) -> Callable[[Ask], Callable[[], object]]:
    def make(ask: Ask) -> Callable[[], object]:
        traced = traced_ai(operation="chat", **options)(ask)  # type: ignore[arg-type]
        return lambda: traced("hello", model=MODEL)

    return make


def _span_around(tracer: trace.Tracer) -> Callable[[Ask], Callable[[], object]]:
    def make(ask: Ask) -> Callable[[], object]:
        def call() -> object:
            with tracer.start_as_current_span(f"chat {MODEL}"):
                return ask("hello", model=MODEL)

        return call

    return make


def _nosdk_cases(threads: int) -> list[Case]:
    if _global_tracer_provider() is not None:
        print(
            "bench_tracing: a global TracerProvider is installed in this process; "
            "the no-SDK group is skipped (run `python -m benchmarks -k tracing`)",
            file=sys.stderr,
        )
        return []
    logging.getLogger("ai_guard").setLevel(logging.WARNING)  # INFO off, as by default
    group = "traced_ai_nosdk"
    return [
        _case(group, "bare", _bare, threads),
        _case(group, "otel_api_noop_span", _span_around(NoOpTracer()), threads),
        _case(group, "otel_api_proxy_span", _span_around(trace.get_tracer("bench")), threads),
        _case(group, "ai_guard", _traced(), threads, anchor="otel_api_noop_span", target=1.0),
        _case(
            group,
            "ai_guard_log_sink",
            _traced(),
            threads,
            log_call,
            anchor="otel_api_noop_span",
            target=1.0,
        ),
    ]


def _by_hand(tracer: trace.Tracer) -> Callable[[Ask], Callable[[], object]]:
    """The span set by hand from the result: the attributes ours sets."""

    def make(ask: Ask) -> Callable[[], object]:
        def call() -> object:
            with tracer.start_as_current_span(
                CHAT_SPAN_NAME, kind=SpanKind.CLIENT, attributes=CHAT_SPAN_ATTRIBUTES
            ) as span:
                result = ask("hello", model=MODEL)
                usage = result.usage
                span.set_attributes(
                    {
                        "gen_ai.request.stream": False,
                        "gen_ai.response.model": result.model,
                        "gen_ai.response.id": result.id or "",
                        "gen_ai.response.finish_reasons": (result.finish_reason or "",),
                        "gen_ai.usage.input_tokens": usage.prompt_tokens,
                        "gen_ai.usage.output_tokens": usage.completion_tokens,
                        "gen_ai.usage.cache_read.input_tokens": usage.cached_tokens,
                        "ai_guard.retries": 0,
                        "ai_guard.cache_hit": usage.cached_tokens > 0,
                        "ai_guard.latency_ms": 0.0,
                        "ai_guard.cost_usd": 0.0,
                    }
                )
                span.set_status(Status(StatusCode.OK))
                return result

        return call

    return make


def _sdk_cases(threads: int) -> list[Case]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_DropExporter()))
    group = "traced_ai_sdk"
    return [
        _case(group, "bare", _bare, threads),
        _case(group, "otel_sdk_span_by_hand", _by_hand(provider.get_tracer("bench")), threads),
        # Reported, no target: ours sets the same attributes as the span by hand, and on
        # top of it measures latency, prices the call and keeps the per-call context that
        # the breaker, metrics and log line share (about 1.1x the span by hand here).
        _case(
            group,
            "ai_guard",
            _traced(tracer_provider=provider),
            threads,
            anchor="otel_sdk_span_by_hand",
        ),
    ]


def cases() -> list[Case]:
    return [case for threads in (1, 8) for case in _nosdk_cases(threads) + _sdk_cases(threads)]
