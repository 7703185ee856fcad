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

Every case runs inside a ``contextvars.Context`` of its own, so the sinks bound for one
case do not leak into the benchmarks of other modules (they run in the same thread).
"""

from __future__ import annotations

import contextvars
import functools
import logging
import sys
from collections.abc import Callable, Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NoOpTracer, SpanKind, Status, StatusCode

from ai_guard.context import _BOUND_SINKS
from ai_guard.logs import log_call
from ai_guard.tracing import _global_tracer_provider, traced_ai
from ai_guard.types import ChatResult, Usage
from benchmarks._harness import Case

RESULT = ChatResult(
    content="positive",
    model="gpt-4o-mini-2024-07-18",
    usage=Usage(1200, 8, 1208, 1024),
    finish_reason="stop",
    id="chatcmpl-bench",
)


def ask(prompt: str, *, model: str) -> ChatResult:
    return RESULT


def _in_context(fn: Callable[[], object], *sinks: Callable[..., None]) -> Callable[[], object]:
    """``fn`` run in a context of its own, with ``sinks`` bound there."""
    context = contextvars.copy_context()
    # Set for good in that context (no scope to exit: the context is the case's own).
    context.run(_BOUND_SINKS.set, tuple(sinks))
    return functools.partial(context.run, fn)


class _DropExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _nosdk_cases() -> list[Case]:
    if _global_tracer_provider() is not None:
        print(
            "bench_tracing: a global TracerProvider is installed in this process; "
            "the no-SDK group is skipped (run `python -m benchmarks -k tracing`)",
            file=sys.stderr,
        )
        return []
    logging.getLogger("ai_guard").setLevel(logging.WARNING)  # INFO off, as by default
    traced = traced_ai(operation="chat")(ask)
    noop_tracer = NoOpTracer()
    proxy_tracer = trace.get_tracer("bench")

    def bare() -> object:
        return ask("hello", model="gpt-4o-mini")

    def ours() -> object:
        return traced("hello", model="gpt-4o-mini")

    def noop_span() -> object:
        with noop_tracer.start_as_current_span("chat gpt-4o-mini"):
            return ask("hello", model="gpt-4o-mini")

    def proxy_span() -> object:
        with proxy_tracer.start_as_current_span("chat gpt-4o-mini"):
            return ask("hello", model="gpt-4o-mini")

    group = "traced_ai_nosdk"
    return [
        Case(group, "bare", _in_context(bare)),
        Case(group, "otel_api_noop_span", _in_context(noop_span)),
        Case(group, "otel_api_proxy_span", _in_context(proxy_span)),
        Case(group, "ai_guard", _in_context(ours), anchor="otel_api_noop_span", target=1.0),
        Case(
            group,
            "ai_guard_log_sink",
            _in_context(ours, log_call),
            anchor="otel_api_noop_span",
            target=1.0,
        ),
    ]


def _sdk_cases() -> list[Case]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_DropExporter()))
    sdk_tracer = provider.get_tracer("bench")
    traced = traced_ai(operation="chat", tracer_provider=provider)(ask)

    def bare() -> object:
        return ask("hello", model="gpt-4o-mini")

    def ours() -> object:
        return traced("hello", model="gpt-4o-mini")

    def by_hand() -> object:
        with sdk_tracer.start_as_current_span(
            "chat gpt-4o-mini",
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": "openai",
                "gen_ai.request.model": "gpt-4o-mini",
            },
        ) as span:
            result = ask("hello", model="gpt-4o-mini")
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

    group = "traced_ai_sdk"
    return [
        Case(group, "bare", _in_context(bare)),
        Case(group, "otel_sdk_span_by_hand", _in_context(by_hand)),
        # Reported, no target: ours sets the same attributes as the span by hand, and on
        # top of it measures latency, prices the call and keeps the per-call context that
        # the breaker, metrics and log line share (about 1.1x the span by hand here).
        Case(group, "ai_guard", _in_context(ours), anchor="otel_sdk_span_by_hand"),
    ]


def cases() -> list[Case]:
    return _nosdk_cases() + _sdk_cases()
