"""ai_guard: production guards for synchronous calls to OpenAI-compatible LLM APIs.

Composable decorators (circuit breaker, header-driven rate limiting, idempotency,
tracing, routing) plus a Flask extension and a guarded client. Shared state lives in a
store picked by URL (``memory://`` or ``redis://host:6379/0``).
"""

from __future__ import annotations

from ai_guard.clock import SYSTEM_CLOCK, Clock, SystemClock
from ai_guard.errors import (
    AIGuardError,
    CircuitOpenError,
    ConfigError,
    IdempotencyConflictError,
    IdempotencyError,
    IdempotencyKeyError,
    IdempotencyMismatchError,
    RateLimitExceeded,
    StoreError,
    StoreUnavailableError,
    StreamError,
    StructuredOutputError,
    UpstreamError,
)
from ai_guard.pricing import ModelSpec
from ai_guard.stores import MemoryStore, RedisStore, Store, store_from_url
from ai_guard.types import ChatResult, StreamEvent, Usage

__version__ = "0.1.0"

__all__ = [
    "SYSTEM_CLOCK",
    "AIGuardError",
    "ChatResult",
    "CircuitOpenError",
    "Clock",
    "ConfigError",
    "IdempotencyConflictError",
    "IdempotencyError",
    "IdempotencyKeyError",
    "IdempotencyMismatchError",
    "MemoryStore",
    "ModelSpec",
    "RateLimitExceeded",
    "RedisStore",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "StreamError",
    "StreamEvent",
    "StructuredOutputError",
    "SystemClock",
    "UpstreamError",
    "Usage",
    "__version__",
    "store_from_url",
]
