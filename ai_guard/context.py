"""The per-call context: what the guards of one logical AI call learn and share.

The outermost guard of a call opens a :class:`CallContext` (a :mod:`contextvars` value);
the guards inside it find it with :func:`current_call` and write what they know: the route
decision (``@routed``), the retry count and waits (``@rate_limited``), the circuit state
(``@circuit_breaker``), the idempotency key, usage and cost (``@traced_ai``, the client).
When the outermost guard ends, :func:`close_call` stamps the latency, prices the call and
hands the context to the *sinks* (the metrics collector, the call logger). Tracing reads
the same object when its span ends, so span, metrics and log line always agree.

Data flow of one guarded call::

    ctx, token = open_call(clock)      # outermost guard: new context; inner guards: reuse
    try:
        result = fn(...)               # inner guards write ctx.retries, ctx.circuit_state...
    except BaseException as exc:
        close_call(ctx, token, clock, error=exc); raise
    return close_call(ctx, token, clock, result=result)   # owner only: emit to sinks

A context is emitted only when it describes an AI call (``operation`` set by
``@traced_ai``, ``@routed`` or the client): a breaker used alone around a database call
records nothing.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Generator, Iterator, Mapping
from contextvars import ContextVar, Token
from typing import Any, TypeVar

from ai_guard.clock import SYSTEM_CLOCK, Clock
from ai_guard.pricing import ModelSpec, find_model
from ai_guard.types import ChatResult, StreamEvent, Usage

__all__ = [
    "CallContext",
    "Sink",
    "bind_sinks",
    "close_call",
    "current_call",
    "default_sinks",
    "open_call",
    "register_default_sink",
    "unregister_default_sink",
]

R = TypeVar("R")
Sink = Callable[["CallContext"], None]

_log = logging.getLogger("ai_guard")


class CallContext:
    """Everything known about one logical AI call, filled in by the guards.

    A plain object with class-level defaults (not a slotted dataclass): creating one costs
    a single small allocation on the hot path, and only the fields a guard writes take
    memory.
    """

    # what was called
    operation: str | None = None
    provider: str | None = None
    request_model: str | None = None
    response_model: str | None = None
    response_id: str | None = None
    stream: bool = False
    server_address: str | None = None
    server_port: int | None = None
    # routing
    tier: str | None = None
    route_reason: str | None = None
    fallback_from: str | None = None
    # resilience
    retries: int = 0
    rate_limit_wait_s: float = 0.0
    breaker: str | None = None
    circuit_state: str | None = None
    idempotency_key: str | None = None
    idempotent_replay: bool = False
    # figures
    usage_known: bool = False
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    finish_reasons: tuple[str, ...] = ()
    cost_usd: float | None = None
    latency_ms: float | None = None
    error_type: str | None = None
    #: The model catalogue that prices this call (the router's, or the default one).
    catalog: Mapping[str, ModelSpec] | None = None
    #: The OpenTelemetry span ``@traced_ai`` opened for this call (the innermost one when
    #: several are nested), for the trace and span ids of the log line.
    span: Any = None
    #: Set once the owner has emitted the context to the sinks.
    closed: bool = False

    def __init__(self, started_at: float) -> None:
        self.started_at = started_at

    # -- derived -------------------------------------------------------------------------

    # The ids are formatted when read, not when the span starts: only a sink that wants
    # them (the log line, with INFO on) pays for the formatting.
    @property
    def trace_id(self) -> str | None:
        """The trace id of the call's span (32 hex digits); ``None`` without a valid span."""
        span_context = _valid_span_context(self.span)
        return None if span_context is None else format(span_context.trace_id, "032x")

    @property
    def span_id(self) -> str | None:
        """The span id of the call's span (16 hex digits); ``None`` without a valid span."""
        span_context = _valid_span_context(self.span)
        return None if span_context is None else format(span_context.span_id, "016x")

    @property
    def model(self) -> str | None:
        """The model that answered, else the one asked for."""
        return self.response_model or self.request_model

    @property
    def error(self) -> bool:
        return self.error_type is not None

    @property
    def cache_hit(self) -> bool:
        return self.cached_tokens > 0

    def model_spec(self) -> ModelSpec | None:
        """The catalogue entry of this call's model (the one that answered, else the one
        asked for), if known."""
        request_model = self.request_model
        model = self.response_model or request_model
        spec = find_model(model, self.catalog)
        if spec is None and model != request_model:
            spec = find_model(request_model, self.catalog)
        return spec

    # -- what guards report --------------------------------------------------------------

    def observe_usage(self, usage: Usage) -> None:
        if self.idempotent_replay:
            # A replayed result was paid for by the call that produced it: span, metrics
            # and log line all count this call as spending no tokens.
            return
        self.usage_known = True
        self.input_tokens = usage.prompt_tokens
        self.output_tokens = usage.completion_tokens
        self.cached_tokens = usage.cached_tokens

    def observe_result(self, result: Any) -> None:
        """Read model, usage, finish reason and id from a :class:`ChatResult` or a raw
        OpenAI-style dict; anything else is ignored."""
        if isinstance(result, ChatResult):
            if result.model:
                self.response_model = result.model
            if result.id:
                self.response_id = result.id
            if result.finish_reason:
                self.finish_reasons = (result.finish_reason,)
            if not self.idempotent_replay:  # observe_usage, inlined: once per AI call
                counts = result.usage
                self.usage_known = True
                self.input_tokens = counts.prompt_tokens
                self.output_tokens = counts.completion_tokens
                self.cached_tokens = counts.cached_tokens
        elif isinstance(result, Mapping) and ("choices" in result or "usage" in result):
            model = result.get("model")
            if isinstance(model, str) and model:
                self.response_model = model
            response_id = result.get("id")
            if isinstance(response_id, str):
                self.response_id = response_id
            choices = result.get("choices")
            if isinstance(choices, list):
                self.finish_reasons = tuple(
                    c["finish_reason"]
                    for c in choices
                    if isinstance(c, Mapping) and isinstance(c.get("finish_reason"), str)
                )
            usage = Usage.from_openai(result.get("usage"))
            if usage is not None:
                self.observe_usage(usage)

    def observe_event(self, event: Any) -> None:
        """Read a :class:`StreamEvent` as it passes by."""
        if not isinstance(event, StreamEvent):
            return
        if event.usage is not None:
            self.observe_usage(event.usage)
        if event.model:
            self.response_model = event.model
        if event.finish_reason:
            self.finish_reasons = (event.finish_reason,)
        if event.id:
            self.response_id = event.id
        if event.type == "error" and event.error is not None:
            self.error_type = type(event.error).__name__

    def observe_error(self, exc: BaseException) -> None:
        self.error_type = error_type_of(exc)

    def price(self) -> float | None:
        """Set and return ``cost_usd`` from the catalogue, unless a guard already set it."""
        if self.cost_usd is None:
            self.cost_usd = self.current_cost()
        return self.cost_usd

    def current_cost(self) -> float | None:
        """``cost_usd`` when a guard set it, else the catalogue's price of the usage seen
        so far (``None`` while no usage is known or for an unknown model). Sets nothing:
        an inner guard may read it before the owner of the context has the final usage."""
        if self.cost_usd is not None or not self.usage_known:
            return self.cost_usd
        # self.model_spec(), inlined: this runs once per AI call.
        request_model = self.request_model
        model = self.response_model or request_model
        spec = find_model(model, self.catalog)
        if spec is None and model != request_model:
            spec = find_model(request_model, self.catalog)
        if spec is None:
            return None
        inputs, cached = self.input_tokens, self.cached_tokens
        cached_price = spec.cached_input_price
        if type(spec) is ModelSpec and cached_price is not None and 0 <= cached <= inputs:
            # ModelSpec.cost_usd's arithmetic in the same order (the same float), inlined
            # because this runs once per AI call: with the tokens in range its clamping
            # changes nothing.
            return (
                (inputs - cached) * spec.input_price
                + cached * cached_price
                + self.output_tokens * spec.output_price
            ) / 1_000_000
        return spec.cost_usd(inputs, self.output_tokens, cached)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"CallContext({fields})"


def _valid_span_context(span: Any) -> Any:
    if span is None:
        return None
    span_context = span.get_span_context()
    return span_context if span_context.is_valid else None


def error_type_of(exc: BaseException) -> str:
    """The ``error.type`` of an exception: an HTTP status when it has one, else its class."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status >= 400:
        return str(status)
    return type(exc).__name__


_CURRENT: ContextVar[CallContext | None] = ContextVar("ai_guard_call", default=None)
# Sinks bound for the current scope (a Flask request, an AIClient call); None = defaults.
_BOUND_SINKS: ContextVar[tuple[Sink, ...] | None] = ContextVar("ai_guard_sinks", default=None)
# Registry of process-wide sinks (e.g. the default collector, the call logger).
_DEFAULT_SINKS: list[Sink] = []

_GENERATOR = types.GeneratorType

current_call = _CURRENT.get
"""The :class:`CallContext` of the AI call running in this context, or ``None``."""


def open_call(clock: Clock = SYSTEM_CLOCK) -> tuple[CallContext, Token[CallContext | None] | None]:
    """Join the current call, or open a new one when there is none.

    Returns the context and a token: the token is not ``None`` only for the guard that
    opened the context (the owner), which must pass it to :func:`close_call`.
    """
    ctx = _CURRENT.get()
    if ctx is not None:
        return ctx, None
    ctx = CallContext(clock.monotonic())
    return ctx, _CURRENT.set(ctx)


def close_call(
    ctx: CallContext,
    token: Token[CallContext | None] | None,
    clock: Clock = SYSTEM_CLOCK,
    *,
    result: R = None,  # type: ignore[assignment]
    error: BaseException | None = None,
) -> R:
    """End the guard's part of the call and return ``result``.

    For the owner (``token`` not ``None``) this resets the context variable and finishes
    the call: latency, error type, cost, then the sinks. A generator result (a stream) is
    wrapped so that the call finishes when the stream ends, however it ends.
    """
    if token is None:
        return result
    _CURRENT.reset(token)
    if error is not None:
        ctx.observe_error(error)
        finish_call(ctx, clock)
        return result
    if type(result) is _GENERATOR:
        return _finish_after_stream(result, ctx, clock)  # type: ignore[arg-type, return-value]
    ctx.observe_result(result)
    finish_call(ctx, clock)
    return result


def _finish_after_stream(
    stream: Generator[Any, Any, Any], ctx: CallContext, clock: Clock
) -> Iterator[Any]:
    ctx.stream = True
    try:
        for event in stream:
            ctx.observe_event(event)
            yield event
    except GeneratorExit:
        raise
    except BaseException as exc:
        ctx.observe_error(exc)
        raise
    finally:
        stream.close()
        finish_call(ctx, clock)


def finish_call(ctx: CallContext, clock: Clock = SYSTEM_CLOCK) -> None:
    """Stamp latency and cost, then emit ``ctx`` to the sinks (once)."""
    if ctx.closed:
        return
    ctx.closed = True
    if ctx.latency_ms is None:
        ctx.latency_ms = (clock.monotonic() - ctx.started_at) * 1000.0
    if ctx.operation is None:
        return
    if ctx.cost_usd is None:  # ctx.price(), one call fewer
        ctx.cost_usd = ctx.current_cost()
    sinks = _BOUND_SINKS.get()
    for sink in _DEFAULT_SINKS if sinks is None else sinks:
        try:
            sink(ctx)
        except Exception:  # a broken sink must never break the user's call
            _log.exception("ai_guard sink %r failed", sink)


class bind_sinks:  # lower case: used like a function, ``with bind_sinks(...)``
    """Within the block, calls are emitted to ``sinks`` instead of the default sinks.

    The Flask extension binds its app's collector for each request; a script can bind its
    own collector::

        with bind_sinks(collector.record_call):
            client.chat(...)

    A small class rather than a ``@contextmanager`` generator: it is entered on every
    request, and a generator-based context manager costs several times more.
    """

    __slots__ = ("_sinks", "_token")

    def __init__(self, *sinks: Sink) -> None:
        self._sinks = sinks
        self._token: Token[tuple[Sink, ...] | None] | None = None

    def __enter__(self) -> None:
        self._token = _BOUND_SINKS.set(self._sinks)

    def __exit__(self, *exc_info: object) -> None:
        token = self._token
        if token is not None:
            self._token = None
            _BOUND_SINKS.reset(token)


def bound_sinks() -> tuple[Sink, ...]:
    """The sinks a call finishing now would be emitted to."""
    sinks = _BOUND_SINKS.get()
    return tuple(_DEFAULT_SINKS) if sinks is None else sinks


def register_default_sink(sink: Sink) -> None:
    """Add a process-wide sink (idempotent)."""
    if sink not in _DEFAULT_SINKS:
        _DEFAULT_SINKS.append(sink)


def unregister_default_sink(sink: Sink) -> None:
    """Remove a process-wide sink (no error when absent)."""
    if sink in _DEFAULT_SINKS:
        _DEFAULT_SINKS.remove(sink)


def default_sinks() -> tuple[Sink, ...]:
    """The process-wide sinks."""
    return tuple(_DEFAULT_SINKS)
