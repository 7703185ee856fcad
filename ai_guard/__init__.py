"""ai_guard: production guards for synchronous calls to OpenAI-compatible LLM APIs.

Composable decorators (circuit breaker, header-driven rate limiting, idempotency,
tracing, routing) plus a Flask extension and a guarded client. Shared state lives in a
store picked by URL (``memory://`` or ``redis://host:6379/0``).

Recommended order, outermost first::

    @routed(router)                      # picks the model, falls back when its breaker is open
    @traced_ai(operation="chat")         # one OpenTelemetry span per logical call
    @circuit_breaker("openai:{model}")   # one outcome per logical call, after the retries
    @rate_limited(max_retries=5)         # header-driven backoff with jitter on 429
    def ask(prompt: str, *, model: str = "") -> ChatResult: ...
"""

from __future__ import annotations

# Importing these modules registers the process-wide sinks (the default metrics
# collector and the per-call log line).
from ai_guard import logs as _logs  # noqa: F401
from ai_guard import metrics as _metrics  # noqa: F401
from ai_guard.backoff import EqualJitter, FullJitter, NoJitter
from ai_guard.breaker import (
    BreakerEvent,
    BreakerMetrics,
    BreakerRegistry,
    CircuitBreaker,
    CircuitState,
    all_breakers,
    circuit_breaker,
    get_breaker,
)
from ai_guard.client import AIClient
from ai_guard.clock import SYSTEM_CLOCK, Clock, SystemClock
from ai_guard.errors import (
    AIGuardError,
    CircuitOpenError,
    ConfigError,
    IdempotencyConflictError,
    IdempotencyError,
    IdempotencyKeyError,
    IdempotencyMismatchError,
    IdempotencyTimeoutError,
    NotStorableError,
    RateLimitExceeded,
    StoreError,
    StoreUnavailableError,
    StreamError,
    StructuredOutputError,
    StructuredOutputRefusalError,
    StructuredOutputTruncatedError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamTimeoutError,
)
from ai_guard.idempotency import generate_idempotency_key, idempotent
from ai_guard.logs import JSONFormatter
from ai_guard.metrics import MetricsCollector, default_collector
from ai_guard.pacing import RateLimitBudget
from ai_guard.pricing import ModelSpec, cost_usd
from ai_guard.ratelimit import (
    RateLimitInfo,
    compute_rate_limit_sleep,
    parse_duration,
    parse_rate_limit_headers,
    rate_limited,
)
from ai_guard.routing import NoRouteError, RouteDecision, Router, RouteRequest, routed
from ai_guard.slo import SLOConfig
from ai_guard.stores import MemoryStore, RedisStore, Store, store_from_url
from ai_guard.streaming import collect_stream, iter_chat_stream
from ai_guard.structured import parse_structured, structured_output_format
from ai_guard.tracing import ai_span_attributes, traced_ai
from ai_guard.types import ChatResult, StreamEvent, Usage

__version__ = "0.1.0"

__all__ = [
    "SYSTEM_CLOCK",
    "AIClient",
    "AIGuardError",
    "BreakerEvent",
    "BreakerMetrics",
    "BreakerRegistry",
    "ChatResult",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitState",
    "Clock",
    "ConfigError",
    "EqualJitter",
    "FullJitter",
    "IdempotencyConflictError",
    "IdempotencyError",
    "IdempotencyKeyError",
    "IdempotencyMismatchError",
    "IdempotencyTimeoutError",
    "JSONFormatter",
    "MemoryStore",
    "MetricsCollector",
    "ModelSpec",
    "NoJitter",
    "NoRouteError",
    "NotStorableError",
    "RateLimitBudget",
    "RateLimitExceeded",
    "RateLimitInfo",
    "RedisStore",
    "RouteDecision",
    "RouteRequest",
    "Router",
    "SLOConfig",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "StreamError",
    "StreamEvent",
    "StructuredOutputError",
    "StructuredOutputRefusalError",
    "StructuredOutputTruncatedError",
    "SystemClock",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamTimeoutError",
    "Usage",
    "__version__",
    "ai_span_attributes",
    "all_breakers",
    "circuit_breaker",
    "collect_stream",
    "compute_rate_limit_sleep",
    "cost_usd",
    "default_collector",
    "generate_idempotency_key",
    "get_breaker",
    "idempotent",
    "iter_chat_stream",
    "parse_duration",
    "parse_rate_limit_headers",
    "parse_structured",
    "rate_limited",
    "routed",
    "store_from_url",
    "structured_output_format",
    "traced_ai",
]
