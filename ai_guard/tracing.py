"""One OpenTelemetry span per AI call, named and attributed per the GenAI conventions.

``@traced_ai`` describes an AI call: it opens the per-call context
(:func:`ai_guard.context.open_call`), records the operation, provider and requested model,
runs the function, and when the call ends it reads the context (which the inner guards
filled in: retries, circuit state, route decision, usage, cost) to attribute its span::

    @traced_ai(operation="chat")
    @circuit_breaker("openai:{model}")
    @rate_limited(max_retries=5)
    def ask(prompt: str, *, model: str) -> ChatResult: ...

The span is a CLIENT span named ``"{gen_ai.operation.name} {gen_ai.request.model}"``
(``"chat gpt-4o-mini"``) with the GenAI attributes (``gen_ai.operation.name``,
``gen_ai.provider.name``, ``gen_ai.request.model``, ``gen_ai.response.model``,
``gen_ai.response.id``, ``gen_ai.response.finish_reasons``, ``gen_ai.usage.input_tokens``,
``gen_ai.usage.output_tokens``, ``gen_ai.usage.cache_read.input_tokens``,
``gen_ai.request.stream``, ``server.address``/``server.port``, ``error.type``) and
ai_guard's own under ``ai_guard.*`` (retries, rate-limit wait, breaker and circuit state,
route tier/reason/fallback, cache hit, latency, cost, the idempotency key *hashed*). The
status is OK, or ERROR with the exception recorded. The trace and span ids go into the
context, so the call's log line carries them.

Where a guard sits matters: only the guards *inside* ``@traced_ai`` (under it in the
decorator stack) run while its span is current and have written their facts when it ends.
A ``@circuit_breaker`` placed outside ``@traced_ai`` does not appear on its span; neither
do its rejections, which never reach the span at all.

Functions may return a :class:`~ai_guard.types.ChatResult`, a raw OpenAI-style dict, or a
generator of :class:`~ai_guard.types.StreamEvent` (a stream): the span of a stream ends
when the stream ends, however it ends (consumed, closed early, failed), and the span is
made current again for each step of the stream, so spans the stream's own code creates
(an HTTP client's) nest under it.

Prompt and completion text are recorded (``gen_ai.input.messages`` /
``gen_ai.output.messages``, JSON in the convention's parts format) only when
``capture_content=True`` or the environment variable
``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`` is set when the function is
decorated (the convention makes content opt-in).

With a ``MeterProvider`` configured, the GenAI client metrics are recorded too:
``gen_ai.client.operation.duration`` (s) and ``gen_ai.client.token.usage``
(``gen_ai.token.type`` = ``input`` / ``output``), with the convention's bucket boundaries.

**Cost with no SDK.** With no SDK installed as the global provider (the API's proxy or
no-op provider) and no explicit ``tracer_provider=``/``meter_provider=``, the wrapper does
no span or metric work at all: per call it reads the global provider slots and compares
them by identity with what it saw last (a provider installed after decoration is picked up
on the next call). ``python -m benchmarks -k tracing`` measures it beside the OTel API's
own no-op span.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
import types
import weakref
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextvars import Token
from typing import Any, ParamSpec, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.metrics import Histogram, MeterProvider, NoOpMeterProvider
from opentelemetry.metrics import _internal as _otel_metrics_internal
from opentelemetry.trace import (
    NoOpTracer,
    NoOpTracerProvider,
    ProxyTracerProvider,
    Span,
    SpanKind,
    Status,
    StatusCode,
    Tracer,
    TracerProvider,
)
from opentelemetry.util.types import AttributeValue
from pydantic import Field

from ai_guard.clock import SYSTEM_CLOCK, Clock
from ai_guard.config import GuardConfig, build_config
from ai_guard.context import CallContext, close_call, current_call, error_type_of, open_call
from ai_guard.errors import ConfigError
from ai_guard.types import ChatResult, StreamEvent

__all__ = [
    "CAPTURE_CONTENT_ENV",
    "DURATION_BUCKETS",
    "TOKEN_USAGE_BUCKETS",
    "TracingConfig",
    "ai_span_attributes",
    "breaker_span_event",
    "capture_content_from_env",
    "hash_idempotency_key",
    "traced_ai",
]

P = ParamSpec("P")
R = TypeVar("R")

# -- attribute names ---------------------------------------------------------------------
# The GenAI names are checked against opentelemetry-semantic-conventions in the tests; the
# package is not a runtime dependency (its GenAI module is marked as moving elsewhere).
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_SYSTEM = "gen_ai.system"  # deprecated by gen_ai.provider.name; opt-in only
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_STREAM = "gen_ai.request.stream"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
ERROR_TYPE = "error.type"

GEN_AI_CLIENT_OPERATION_DURATION = "gen_ai.client.operation.duration"
GEN_AI_CLIENT_TOKEN_USAGE = "gen_ai.client.token.usage"

AI_GUARD_RETRIES = "ai_guard.retries"
AI_GUARD_RATE_LIMIT_WAIT_S = "ai_guard.rate_limit.wait_s"
AI_GUARD_BREAKER = "ai_guard.circuit.name"
AI_GUARD_CIRCUIT_STATE = "ai_guard.circuit.state"
AI_GUARD_ROUTE_TIER = "ai_guard.route.tier"
AI_GUARD_ROUTE_REASON = "ai_guard.route.reason"
AI_GUARD_ROUTE_FALLBACK_FROM = "ai_guard.route.fallback_from"
AI_GUARD_CACHE_HIT = "ai_guard.cache_hit"
AI_GUARD_LATENCY_MS = "ai_guard.latency_ms"
AI_GUARD_COST_USD = "ai_guard.cost_usd"
AI_GUARD_IDEMPOTENCY_KEY_HASH = "ai_guard.idempotency_key.sha256"
AI_GUARD_IDEMPOTENT_REPLAY = "ai_guard.idempotent_replay"

#: ``gen_ai.client.operation.duration`` bucket boundaries (seconds), per the convention.
DURATION_BUCKETS: tuple[float, ...] = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
#: ``gen_ai.client.token.usage`` bucket boundaries (tokens), per the convention.
TOKEN_USAGE_BUCKETS: tuple[float, ...] = (
    1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864,
)  # fmt: skip

#: The convention's opt-in switch for recording prompt and completion text.
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"

_INSTRUMENTATION_NAME = "ai_guard"
_STATUS_OK = Status(StatusCode.OK)


def capture_content_from_env() -> bool:
    """Whether ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT`` asks for content."""
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() == "true"


def hash_idempotency_key(key: str) -> str:
    """The form an idempotency key takes in spans and logs: the first 16 hex digits of its
    SHA-256. Enough to correlate the retries of one call; the key itself, which lets
    whoever holds it read a stored response, is never exported."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def breaker_span_event(event: Any) -> None:
    """A breaker listener that adds the state change as an event on the current span.

    Register it once (``default_registry().add_listener(breaker_span_event)`` from
    :mod:`ai_guard.breaker`): a breaker inside ``@traced_ai`` that opens because of the
    call then shows ``ai_guard.circuit.state_change`` on that call's span. ``event`` is a
    :class:`~ai_guard.breaker.BreakerEvent` (read by attribute name).
    """
    span = otel_trace.get_current_span()
    if not span.is_recording():
        return
    span.add_event(
        "ai_guard.circuit.state_change",
        {
            AI_GUARD_BREAKER: str(getattr(event, "breaker", "")),
            "ai_guard.circuit.from_state": str(getattr(event, "from_state", "")),
            AI_GUARD_CIRCUIT_STATE: str(getattr(event, "to_state", "")),
            "ai_guard.circuit.reason": str(getattr(event, "reason", "")),
            "ai_guard.circuit.retry_after_s": float(getattr(event, "retry_after", 0.0)),
        },
    )


# -- configuration -----------------------------------------------------------------------


class TracingConfig(GuardConfig):
    """Settings of one ``@traced_ai`` decorator, validated when it is built."""

    #: ``gen_ai.operation.name``: ``chat``, ``text_completion``, ``embeddings``, ...
    operation: str = Field(default="chat", min_length=1)
    #: ``gen_ai.provider.name``: ``openai``, ``azure.ai.openai``, ... (any string).
    provider: str = Field(default="openai", min_length=1)
    #: Record prompt and completion text (also turned on by the environment variable).
    capture_content: bool = False
    #: Also set the deprecated ``gen_ai.system`` (for backends that still read it).
    emit_gen_ai_system: bool = False
    #: ``server.address`` / ``server.port`` when the guarded call does not report them.
    server_address: str | None = Field(default=None, min_length=1)
    server_port: int | None = Field(default=None, ge=1, le=65535)
    #: The keyword argument that carries the model name (what ``@routed`` injects).
    model_kwarg: str = Field(default="model", min_length=1)


# -- attributes --------------------------------------------------------------------------


def ai_span_attributes(
    source: CallContext | ChatResult | Mapping[str, Any],
    *,
    operation: str | None = None,
    provider: str | None = None,
    request_model: str | None = None,
    emit_gen_ai_system: bool = False,
) -> dict[str, AttributeValue]:
    """The span attributes of an AI call, for ``@traced_ai`` and for your own spans.

    ``source`` is either a :class:`~ai_guard.context.CallContext` (what the guards of a
    call learned; inside a guarded call, :func:`ai_guard.context.current_call` returns it)
    or a call's result: a :class:`~ai_guard.types.ChatResult` or a raw OpenAI-style
    ``/chat/completions`` body. ``operation``, ``provider`` and ``request_model`` fill in
    what the source does not say (``"chat"`` / ``"openai"`` for a bare result).

    Returns the GenAI attributes that are known (usage only when the call reported it) and
    ai_guard's own ``ai_guard.*`` attributes; never prompt or completion text, never the
    raw idempotency key::

        with tracer.start_as_current_span("chat gpt-4o-mini") as span:
            result = ChatResult.from_openai(body)
            span.set_attributes(ai_span_attributes(result, request_model="gpt-4o-mini"))
    """
    if isinstance(source, CallContext):
        ctx = source
    else:
        ctx = CallContext(0.0)
        ctx.observe_result(source)
    provider = ctx.provider or provider or "openai"
    attrs: dict[str, AttributeValue] = {
        GEN_AI_OPERATION_NAME: ctx.operation or operation or "chat",
        GEN_AI_PROVIDER_NAME: provider,
    }
    if emit_gen_ai_system:
        attrs[GEN_AI_SYSTEM] = provider
    request_model = ctx.request_model or request_model
    if request_model:
        attrs[GEN_AI_REQUEST_MODEL] = request_model
    attrs.update(_result_attributes(ctx, ctx.latency_ms, ctx.error_type))
    return attrs


def _result_attributes(
    ctx: CallContext, latency_ms: float | None, error_type: str | None
) -> dict[str, AttributeValue]:
    """What a span learns during the call (a span got the request's attributes when it
    started: setting them again would cost a validation each)."""
    attrs: dict[str, AttributeValue] = {
        GEN_AI_REQUEST_STREAM: ctx.stream,
        AI_GUARD_RETRIES: ctx.retries,
        AI_GUARD_CACHE_HIT: ctx.cached_tokens > 0,
    }
    if ctx.response_model:
        attrs[GEN_AI_RESPONSE_MODEL] = ctx.response_model
    if ctx.response_id:
        attrs[GEN_AI_RESPONSE_ID] = ctx.response_id
    if ctx.finish_reasons:
        attrs[GEN_AI_RESPONSE_FINISH_REASONS] = ctx.finish_reasons
    if ctx.usage_known:
        attrs[GEN_AI_USAGE_INPUT_TOKENS] = ctx.input_tokens
        attrs[GEN_AI_USAGE_OUTPUT_TOKENS] = ctx.output_tokens
        attrs[GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] = ctx.cached_tokens
    if ctx.server_address:
        attrs[SERVER_ADDRESS] = ctx.server_address
        if ctx.server_port is not None:
            attrs[SERVER_PORT] = ctx.server_port
    if error_type:
        attrs[ERROR_TYPE] = error_type
    if ctx.rate_limit_wait_s:
        attrs[AI_GUARD_RATE_LIMIT_WAIT_S] = ctx.rate_limit_wait_s
    if ctx.breaker:
        attrs[AI_GUARD_BREAKER] = ctx.breaker
    state = ctx.circuit_state
    if state:
        attrs[AI_GUARD_CIRCUIT_STATE] = state if type(state) is str else str(state)
    if ctx.tier:
        attrs[AI_GUARD_ROUTE_TIER] = ctx.tier
    if ctx.route_reason:
        attrs[AI_GUARD_ROUTE_REASON] = ctx.route_reason
    if ctx.fallback_from:
        attrs[AI_GUARD_ROUTE_FALLBACK_FROM] = ctx.fallback_from
    if latency_ms is not None:
        attrs[AI_GUARD_LATENCY_MS] = latency_ms
    # Not ctx.price(): an inner @traced_ai must not fix the cost before the owner of the
    # context has seen the final usage.
    cost = ctx.current_cost()
    if cost is not None:
        attrs[AI_GUARD_COST_USD] = cost
    if ctx.idempotency_key:
        attrs[AI_GUARD_IDEMPOTENCY_KEY_HASH] = hash_idempotency_key(ctx.idempotency_key)
        attrs[AI_GUARD_IDEMPOTENT_REPLAY] = ctx.idempotent_replay
    return attrs


# -- content capture (opt-in) ------------------------------------------------------------


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    parts: list[dict[str, Any]] = []
    if isinstance(content, Sequence):
        for part in content:
            if isinstance(part, Mapping):
                if part.get("type") == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "content": part["text"]})
                else:
                    parts.append({"type": str(part.get("type", "unknown"))})
    return parts


def _input_messages(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The call's prompt in the convention's format: a ``messages=`` list (OpenAI chat
    format), else the first positional list of ``{"role": ...}`` dicts, else a
    ``prompt=`` string or the first positional string (a user message)."""
    candidates: list[Any] = [kwargs.get("messages"), *args]
    for value in candidates:
        if isinstance(value, list) and value and all(isinstance(m, Mapping) for m in value):
            return [
                {"role": str(m.get("role", "user")), "parts": _parts(m.get("content"))}
                for m in value
            ]
    prompt = kwargs.get("prompt")
    if not isinstance(prompt, str):
        prompt = next((a for a in args if isinstance(a, str)), None)
    if isinstance(prompt, str):
        return [{"role": "user", "parts": _parts(prompt)}]
    return []


def _output_messages(result: Any, streamed_text: str | None) -> list[dict[str, Any]]:
    if streamed_text is not None:
        return [{"role": "assistant", "parts": _parts(streamed_text)}]
    if isinstance(result, ChatResult):
        message: dict[str, Any] = {"role": "assistant", "parts": _parts(result.content)}
        if result.finish_reason:
            message["finish_reason"] = result.finish_reason
        return [message]
    messages: list[dict[str, Any]] = []
    if isinstance(result, Mapping) and isinstance(result.get("choices"), list):
        for choice in result["choices"]:
            if not isinstance(choice, Mapping):
                continue
            body = choice.get("message")
            content = body.get("content") if isinstance(body, Mapping) else None
            out: dict[str, Any] = {"role": "assistant", "parts": _parts(content)}
            if isinstance(choice.get("finish_reason"), str):
                out["finish_reason"] = choice["finish_reason"]
            messages.append(out)
    return messages


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


# -- providers ---------------------------------------------------------------------------

# The global provider slots, read directly: trace.get_tracer_provider() costs ~0.6 us per
# call (it looks up an environment variable each time), more than the whole wrapper is
# allowed. Should a future API version rename the slots, fall back to the public getters.
_otel_trace_module: Any = otel_trace
_otel_metrics_module: Any = _otel_metrics_internal
_FAST_PROVIDER_SLOTS = hasattr(_otel_trace_module, "_TRACER_PROVIDER") and hasattr(
    _otel_metrics_module, "_METER_PROVIDER"
)


# What the public getter returns before an SDK is installed (a class private to the API).
_PROXY_METER_PROVIDER_TYPE: Any = getattr(_otel_metrics_module, "_ProxyMeterProvider", ())


def _global_tracer_provider() -> Any:
    if _FAST_PROVIDER_SLOTS:
        return _otel_trace_module._TRACER_PROVIDER
    return otel_trace.get_tracer_provider()


def _global_meter_provider() -> Any:
    if _FAST_PROVIDER_SLOTS:
        return _otel_metrics_module._METER_PROVIDER
    return otel_metrics.get_meter_provider()


def _load_providers_from_env() -> None:
    # A provider named by OTEL_PYTHON_TRACER_PROVIDER is loaded by the first call to the
    # getter; make that happen now so the slots read above hold it.
    if "OTEL_PYTHON_TRACER_PROVIDER" in os.environ:
        otel_trace.get_tracer_provider()
    if "OTEL_PYTHON_METER_PROVIDER" in os.environ:
        otel_metrics.get_meter_provider()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ai_guard")
    except Exception:  # not installed (a source checkout): the version is informative only
        return "0"


def _tracer_for(provider: Any) -> Tracer | None:
    if provider is None or isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider)):
        return None
    tracer = provider.get_tracer(_INSTRUMENTATION_NAME, _version())
    if isinstance(tracer, NoOpTracer):  # e.g. the SDK with OTEL_SDK_DISABLED=true
        return None
    return tracer  # type: ignore[no-any-return]


class _Instruments:
    __slots__ = ("duration", "token_usage")

    def __init__(self, duration: Histogram, token_usage: Histogram) -> None:
        self.duration = duration
        self.token_usage = token_usage


# One pair of instruments per meter provider, shared by every decorated function: the SDK
# warns when an instrument is registered twice.
_INSTRUMENTS: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_INSTRUMENTS_LOCK = threading.Lock()


def _instruments_for(provider: Any) -> _Instruments | None:
    if provider is None or isinstance(provider, NoOpMeterProvider):
        return None
    if not isinstance(provider, MeterProvider) or isinstance(provider, _PROXY_METER_PROVIDER_TYPE):
        return None
    with _INSTRUMENTS_LOCK:
        instruments = _INSTRUMENTS.get(provider)
        if instruments is None:
            meter = provider.get_meter(_INSTRUMENTATION_NAME, _version())
            if isinstance(meter, otel_metrics.NoOpMeter):
                return None
            instruments = _Instruments(
                meter.create_histogram(
                    GEN_AI_CLIENT_OPERATION_DURATION,
                    unit="s",
                    description="GenAI operation duration.",
                    explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
                ),
                meter.create_histogram(
                    GEN_AI_CLIENT_TOKEN_USAGE,
                    unit="{token}",
                    description="Number of input and output tokens used.",
                    explicit_bucket_boundaries_advisory=TOKEN_USAGE_BUCKETS,
                ),
            )
            _INSTRUMENTS[provider] = instruments
        return instruments


class _Telemetry:
    """What a call records with: a tracer, instruments, or both (never neither)."""

    __slots__ = ("instruments", "tracer")

    def __init__(self, tracer: Tracer | None, instruments: _Instruments | None) -> None:
        self.tracer = tracer
        self.instruments = instruments


# -- the decorator -----------------------------------------------------------------------


def traced_ai(
    operation: str = "chat",
    *,
    provider: str = "openai",
    capture_content: bool = False,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    emit_gen_ai_system: bool = False,
    server_address: str | None = None,
    server_port: int | None = None,
    model_kwarg: str = "model",
    clock: Clock = SYSTEM_CLOCK,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Trace each call of the decorated function as one GenAI CLIENT span.

    - ``operation`` / ``provider``: ``gen_ai.operation.name`` / ``gen_ai.provider.name``.
    - The requested model is the call's ``model=`` keyword (``model_kwarg``), which
      ``@routed`` injects; else whatever an outer guard wrote into the context.
    - ``capture_content``: record prompt and completion text; off by default, also turned
      on by ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`` (read once, here).
    - ``tracer_provider`` / ``meter_provider``: use these instead of the global providers
      (tests, or an application with several). Without an SDK the wrapper skips all span
      and metric work.
    - ``emit_gen_ai_system``: also set the deprecated ``gen_ai.system`` attribute.
    - ``server_address`` / ``server_port``: the upstream, when the call does not report it.

    Raises :class:`~ai_guard.errors.ConfigError` for a bad setting, at decoration time::

        @traced_ai(operation="chat")
        def ask(prompt: str, *, model: str) -> ChatResult: ...
    """
    config = build_config(
        TracingConfig,
        operation=operation,
        provider=provider,
        capture_content=capture_content or capture_content_from_env(),
        emit_gen_ai_system=emit_gen_ai_system,
        server_address=server_address,
        server_port=server_port,
        model_kwarg=model_kwarg,
    )
    if not isinstance(clock, Clock):
        raise ConfigError("clock", clock, "must be a Clock (monotonic, time, sleep)")
    _load_providers_from_env()

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        traced = _TracedCall(fn, config, clock, tracer_provider, meter_provider)
        op = config.operation
        prov = config.provider
        model_key = config.model_kwarg
        address = config.server_address
        port = config.server_port
        telemetry = traced.telemetry
        # With no provider given and the API's global slots both empty (no SDK installed:
        # the usual state of a script or a test suite), there is nothing to record, and
        # the wrapper learns it from two module reads, without a call.
        slots_say_no_sdk = (
            _FAST_PROVIDER_SLOTS and tracer_provider is None and meter_provider is None
        )
        trace_slots = _otel_trace_module
        metric_slots = _otel_metrics_module

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            ctx = current_call()
            token = None
            if ctx is None:  # the outermost guard: the call's context starts here
                ctx, token = open_call(clock)
            ctx.operation = op
            ctx.provider = prov
            model = kwargs.get(model_key)
            if type(model) is str:
                ctx.request_model = model
            if address is not None and ctx.server_address is None:
                ctx.server_address = address
                ctx.server_port = port
            if (
                slots_say_no_sdk
                and trace_slots._TRACER_PROVIDER is None
                and metric_slots._METER_PROVIDER is None
            ):
                recording = None
            else:
                recording = telemetry()
            if recording is None:
                if token is None:  # joined an outer guard's context, which ends the call
                    return fn(*args, **kwargs)
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:
                    close_call(ctx, token, clock, error=exc)
                    raise
                return close_call(ctx, token, clock, result=result)
            traced_result: R = traced.call(recording, ctx, token, args, kwargs)
            return traced_result

        return wrapper

    return decorate


class _TracedCall:
    """The recording half of ``@traced_ai``: span, metrics, content; used only when a
    provider is configured."""

    def __init__(
        self,
        fn: Callable[..., Any],
        config: TracingConfig,
        clock: Clock,
        tracer_provider: TracerProvider | None,
        meter_provider: MeterProvider | None,
    ) -> None:
        self._fn = fn
        self._config = config
        self._clock = clock
        # What every span of this function starts with (the model is added per call).
        self._start_attributes: dict[str, AttributeValue] = {
            GEN_AI_OPERATION_NAME: config.operation,
            GEN_AI_PROVIDER_NAME: config.provider,
        }
        if config.emit_gen_ai_system:
            self._start_attributes[GEN_AI_SYSTEM] = config.provider
        self._explicit_tracer_provider = tracer_provider
        self._explicit_meter_provider = meter_provider
        # (tracer provider seen, meter provider seen, what to record with): replaced as a
        # whole, so a thread never sees half of an update.
        self._seen: tuple[Any, Any, _Telemetry | None] = (None, None, None)
        if tracer_provider is not None or meter_provider is not None:
            self._seen = self._resolve(tracer_provider, meter_provider)

        #: What to record this call with; ``None`` (the hot path) when nothing is set up.
        self.telemetry: Callable[[], _Telemetry | None] = self._make_telemetry()

    def _make_telemetry(self) -> Callable[[], _Telemetry | None]:
        # Specialised once, at decoration: the no-SDK path pays two attribute reads and two
        # identity checks, no call into the OpenTelemetry API.
        explicit_tracer_provider = self._explicit_tracer_provider
        explicit_meter_provider = self._explicit_meter_provider
        if explicit_tracer_provider is not None and explicit_meter_provider is not None:
            fixed = self._seen[2]
            return lambda: fixed

        if _FAST_PROVIDER_SLOTS:
            trace_slots = _otel_trace_module
            metric_slots = _otel_metrics_module

            def telemetry() -> _Telemetry | None:
                tracer_provider = (
                    explicit_tracer_provider
                    if explicit_tracer_provider is not None
                    else trace_slots._TRACER_PROVIDER
                )
                meter_provider = (
                    explicit_meter_provider
                    if explicit_meter_provider is not None
                    else metric_slots._METER_PROVIDER
                )
                seen = self._seen
                if seen[0] is tracer_provider and seen[1] is meter_provider:
                    return seen[2]
                return self._update(tracer_provider, meter_provider)

            return telemetry

        def portable_telemetry() -> _Telemetry | None:
            tracer_provider = explicit_tracer_provider or _global_tracer_provider()
            meter_provider = explicit_meter_provider or _global_meter_provider()
            seen = self._seen
            if seen[0] is tracer_provider and seen[1] is meter_provider:
                return seen[2]
            return self._update(tracer_provider, meter_provider)

        return portable_telemetry

    def _update(self, tracer_provider: Any, meter_provider: Any) -> _Telemetry | None:
        seen = self._resolve(tracer_provider, meter_provider)
        self._seen = seen
        return seen[2]

    @staticmethod
    def _resolve(tracer_provider: Any, meter_provider: Any) -> tuple[Any, Any, _Telemetry | None]:
        tracer = _tracer_for(tracer_provider)
        instruments = _instruments_for(meter_provider)
        telemetry = (
            None if tracer is None and instruments is None else _Telemetry(tracer, instruments)
        )
        return (tracer_provider, meter_provider, telemetry)

    # -- one recorded call ---------------------------------------------------------------

    def call(
        self,
        telemetry: _Telemetry,
        ctx: CallContext,
        token: Any,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> Any:
        clock = self._clock
        # Only the metric needs this attempt's own start; the span keeps its own times.
        started = clock.monotonic() if telemetry.instruments is not None else 0.0
        span: Span | None = None
        otel_token: Token[Context] | None = None
        if telemetry.tracer is not None:
            span = self._start_span(telemetry.tracer, ctx, args, kwargs)
            otel_token = otel_context.attach(otel_trace.set_span_in_context(span))
        span_model = ctx.request_model
        try:
            result = self._fn(*args, **kwargs)
        except BaseException as exc:
            if otel_token is not None:
                otel_context.detach(otel_token)
            close_call(ctx, token, clock, error=exc)
            self._finish(telemetry, span, span_model, ctx, started, error=exc)
            raise
        if otel_token is not None:
            otel_context.detach(otel_token)
        if type(result) is types.GeneratorType:
            stream = close_call(ctx, token, clock, result=result)
            return self._stream(
                telemetry, span, span_model, ctx, stream, token is not None, started
            )
        if token is None:
            # Joined an outer guard's context: the span needs the usage now; the owner
            # observes the result again when it ends the call.
            ctx.observe_result(result)
        else:
            result = close_call(ctx, token, clock, result=result)
        self._finish(telemetry, span, span_model, ctx, started, result)
        return result

    def _start_span(
        self,
        tracer: Tracer,
        ctx: CallContext,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> Span:
        config = self._config
        model = ctx.request_model
        attributes = dict(self._start_attributes)
        if model:
            attributes[GEN_AI_REQUEST_MODEL] = model
        if ctx.server_address:
            attributes[SERVER_ADDRESS] = ctx.server_address
            if ctx.server_port is not None:
                attributes[SERVER_PORT] = ctx.server_port
        span = tracer.start_span(
            f"{config.operation} {model}" if model else config.operation,
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        ctx.span = span  # for the log line's ids, formatted only if it is written
        if config.capture_content and span.is_recording():
            span.set_attribute(GEN_AI_INPUT_MESSAGES, _json(_input_messages(args, kwargs)))
        return span

    def _stream(
        self,
        telemetry: _Telemetry,
        span: Span | None,
        span_model: str | None,
        ctx: CallContext,
        stream: Generator[Any, Any, Any],
        owner: bool,
        started: float,
    ) -> Iterator[Any]:
        ctx.stream = True
        parent = otel_trace.set_span_in_context(span) if span is not None else None
        text: list[str] | None = [] if self._config.capture_content else None
        error: BaseException | None = None
        try:
            while True:
                step_token = otel_context.attach(parent) if parent is not None else None
                try:
                    event = next(stream)
                except StopIteration:
                    return
                finally:
                    if step_token is not None:
                        otel_context.detach(step_token)
                if not owner:  # the owner's stream wrapper observes events itself
                    ctx.observe_event(event)
                if text is not None and isinstance(event, StreamEvent) and event.content:
                    text.append(event.content)
                yield event
        except GeneratorExit:
            raise  # closed early by the consumer: not an error
        except BaseException as exc:
            error = exc
            raise
        finally:
            # For the owner this runs the context's own stream finisher: sinks first, so
            # the span can read the final cost and latency.
            stream.close()
            self._finish(
                telemetry,
                span,
                span_model,
                ctx,
                started,
                error=error,
                streamed_text="".join(text) if text is not None else None,
            )

    def _finish(
        self,
        telemetry: _Telemetry,
        span: Span | None,
        span_model: str | None,
        ctx: CallContext,
        started: float,
        result: Any = None,
        error: BaseException | None = None,
        streamed_text: str | None = None,
    ) -> None:
        config = self._config
        error_type = error_type_of(error) if error is not None else ctx.error_type
        if span is not None:
            if span.is_recording():
                latency_ms = ctx.latency_ms
                if latency_ms is None:  # an outer guard owns the context and ends later
                    latency_ms = (self._clock.monotonic() - ctx.started_at) * 1000.0
                attributes = _result_attributes(ctx, latency_ms, error_type)
                model = ctx.request_model
                if model and model != span_model:
                    # Learned during the call (an inner guard or the client chose it).
                    span.update_name(f"{config.operation} {model}")
                    attributes[GEN_AI_REQUEST_MODEL] = model
                if config.capture_content and error is None:
                    output = _output_messages(result, streamed_text)
                    if output:
                        attributes[GEN_AI_OUTPUT_MESSAGES] = _json(output)
                span.set_attributes(attributes)
                if error is not None:
                    span.record_exception(error, escaped=True)
                    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
                elif error_type is not None:
                    span.set_status(Status(StatusCode.ERROR, error_type))
                else:
                    span.set_status(_STATUS_OK)
            span.end()
        instruments = telemetry.instruments
        if instruments is not None:
            duration_s = self._clock.monotonic() - started
            self._record_metrics(instruments, ctx, duration_s, error_type)

    def _record_metrics(
        self,
        instruments: _Instruments,
        ctx: CallContext,
        duration_s: float,
        error_type: str | None,
    ) -> None:
        config = self._config
        attributes: dict[str, AttributeValue] = {
            GEN_AI_OPERATION_NAME: config.operation,
            GEN_AI_PROVIDER_NAME: config.provider,
        }
        if ctx.request_model:
            attributes[GEN_AI_REQUEST_MODEL] = ctx.request_model
        if ctx.response_model:
            attributes[GEN_AI_RESPONSE_MODEL] = ctx.response_model
        if ctx.server_address:
            attributes[SERVER_ADDRESS] = ctx.server_address
            if ctx.server_port is not None:
                attributes[SERVER_PORT] = ctx.server_port
        if ctx.usage_known:
            instruments.token_usage.record(
                ctx.input_tokens, {**attributes, GEN_AI_TOKEN_TYPE: "input"}
            )
            instruments.token_usage.record(
                ctx.output_tokens, {**attributes, GEN_AI_TOKEN_TYPE: "output"}
            )
        if error_type is not None:
            attributes[ERROR_TYPE] = error_type
        instruments.duration.record(duration_s, attributes)
