"""Structured logs: one INFO record per AI call, a JSON formatter, redaction of secrets.

Importing this module (the package does) registers :func:`log_call` as a default sink of
the per-call context: when an AI call ends, the logger ``ai_guard`` gets one INFO record
whose ``extra`` fields are the same facts the span and the metrics carry::

    operation provider model request_model tier stream response_id finish_reasons
    input_tokens output_tokens cached_tokens cache_hit cost_usd latency_ms
    retries rate_limit_wait_s breaker circuit_state route_reason fallback_from
    error_type idempotency_key_hash idempotent_replay trace_id span_id event="ai_call"

Any formatter can use them (``%(model)s %(latency_ms).0f``); :class:`JSONFormatter`
writes one JSON object per record with the standard fields and every extra::

    import logging
    from ai_guard.logs import JSONFormatter

    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter())
    logging.getLogger("ai_guard").addHandler(handler)
    logging.getLogger("ai_guard").setLevel(logging.INFO)

The record never holds an API key or prompt text: the fields are figures and names, the
idempotency key is hashed (:func:`ai_guard.tracing.hash_idempotency_key`), and the
formatter (or :class:`RedactingFilter`, for other formatters) masks anything that looks
like a key (``sk-...``, ``Bearer ...``, ``Authorization: ...``, ``api_key=...``) in any
record, ai_guard's or not. When INFO is disabled for ``ai_guard`` the sink returns after
one cached level check.

State changes (a breaker opening or closing, a rate-limit wait over 1 s) are logged at
WARNING by their own modules, on ``ai_guard.breaker`` and ``ai_guard.ratelimit``.

The JSON formatter is ~60 lines of standard library rather than ``python-json-logger``:
redaction has to happen inside the formatter anyway, and a logging dependency that every
user must install and pin would buy us nothing else.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from ai_guard.context import CallContext, register_default_sink
from ai_guard.tracing import hash_idempotency_key

__all__ = [
    "CALL_FIELDS",
    "JSONFormatter",
    "RedactingFilter",
    "call_log_fields",
    "log_call",
    "logger",
    "redact",
]

#: The logger of the per-call records (and the parent of ai_guard's other loggers).
logger = logging.getLogger("ai_guard")

_INFO = logging.INFO
# Logger.isEnabledFor's own per-level cache, when the logger is the standard class (a
# class installed with logging.setLoggerClass may decide differently: then it is asked).
_level_cache: dict[int, bool] | None = (
    getattr(logger, "_cache", None)
    if type(logger).isEnabledFor is logging.Logger.isEnabledFor
    and isinstance(getattr(logger, "_cache", None), dict)
    else None
)

#: The ``extra`` fields of a per-call record, in order.
CALL_FIELDS: tuple[str, ...] = (
    "event",
    "operation",
    "provider",
    "model",
    "request_model",
    "tier",
    "stream",
    "response_id",
    "finish_reasons",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "cache_hit",
    "cost_usd",
    "latency_ms",
    "retries",
    "rate_limit_wait_s",
    "breaker",
    "circuit_state",
    "route_reason",
    "fallback_from",
    "error_type",
    "idempotency_key_hash",
    "idempotent_replay",
    "trace_id",
    "span_id",
)


def call_log_fields(ctx: CallContext) -> dict[str, Any]:
    """The ``extra`` fields of the record of one call (see :data:`CALL_FIELDS`).

    Token counts are ``None`` when the call did not report usage (a failed call), so that
    "unknown" does not read as "zero".
    """
    usage = ctx.usage_known
    return {
        "event": "ai_call",
        "operation": ctx.operation,
        "provider": ctx.provider,
        "model": ctx.model,
        "request_model": ctx.request_model,
        "tier": ctx.tier,
        "stream": ctx.stream,
        "response_id": ctx.response_id,
        "finish_reasons": list(ctx.finish_reasons),
        "input_tokens": ctx.input_tokens if usage else None,
        "output_tokens": ctx.output_tokens if usage else None,
        "cached_tokens": ctx.cached_tokens if usage else None,
        "cache_hit": ctx.cached_tokens > 0,
        "cost_usd": ctx.cost_usd,
        "latency_ms": ctx.latency_ms,
        "retries": ctx.retries,
        "rate_limit_wait_s": ctx.rate_limit_wait_s,
        "breaker": ctx.breaker,
        "circuit_state": str(ctx.circuit_state) if ctx.circuit_state is not None else None,
        "route_reason": ctx.route_reason,
        "fallback_from": ctx.fallback_from,
        "error_type": ctx.error_type,
        "idempotency_key_hash": (
            hash_idempotency_key(ctx.idempotency_key) if ctx.idempotency_key else None
        ),
        "idempotent_replay": ctx.idempotent_replay,
        "trace_id": ctx.trace_id,
        "span_id": ctx.span_id,
    }


def log_call(ctx: CallContext) -> None:
    """The call-log sink: one INFO record on ``ai_guard`` for a finished AI call.

    Registered as a default sink when this module is imported; a scope that binds its own
    sinks (:func:`ai_guard.context.bind_sinks`) includes it when it wants the log line.
    """
    # logger.isEnabledFor(INFO) without its call (this runs once per AI call): the answer
    # the logging module caches per level (cleared in place whenever a level changes).
    enabled = _level_cache.get(_INFO) if _level_cache is not None else None
    if enabled is None:
        enabled = logger.isEnabledFor(_INFO)
    if not enabled or logger.disabled:
        return
    outcome = f"error {ctx.error_type}" if ctx.error_type is not None else "ok"
    logger.info(
        "%s %s %s in %.1f ms",
        ctx.operation,
        ctx.model or "-",
        outcome,
        ctx.latency_ms or 0.0,
        extra=call_log_fields(ctx),
    )


register_default_sink(log_call)


# -- redaction ---------------------------------------------------------------------------

_MASK = "***"
# OpenAI-style secret keys (sk-..., sk-proj-..., sk-svcacct-...).
_OPENAI_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-]{6,}")
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=\-]{6,}")
# key=value / "key": "value" / Header: value for the names that carry credentials.
_NAMED_SECRET = re.compile(
    r"(?i)\b((?:proxy-)?authorization|x-api-key|api[-_]?key|access[-_]?token|client[-_]?secret"
    r"|password)(\"?'?\s*[:=]\s*\"?'?)(?!\*\*\*)((?:bearer\s+|basic\s+)?[^\s\"',;&}]+)"
)
_QUICK_CHECK = re.compile(
    r"(?i)sk-|bearer|authorization|api[-_]?key|access[-_]?token|client[-_]?secret|password"
)
_SECRET_KEYS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "api_key",
        "api-key",
        "apikey",
        "x-api-key",
        "openai_api_key",
        "access_token",
        "client_secret",
        "password",
        "secret",
        "cookie",
        "set-cookie",
    }
)


def _redact_text(text: str) -> str:
    if not _QUICK_CHECK.search(text):
        return text
    text = _OPENAI_KEY.sub("sk-" + _MASK, text)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {_MASK}", text)
    return _NAMED_SECRET.sub(lambda m: f"{m.group(1)}{m.group(2)}{_MASK}", text)


def redact(value: Any) -> Any:
    """``value`` with API keys and credentials masked: strings are scanned, mappings have
    the values of credential keys (``Authorization``, ``api_key``, ...) replaced, lists
    and tuples are walked. Other values come back as they are."""
    if isinstance(value, str):
        return _redact_text(value)
    if isinstance(value, Mapping):
        return {
            k: (_MASK if isinstance(k, str) and k.lower() in _SECRET_KEYS else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class RedactingFilter(logging.Filter):
    """A handler filter that masks credentials in a record before any formatter sees it
    (message, arguments and extras). Use it with formatters other than
    :class:`JSONFormatter`, which redacts on its own::

        handler.addFilter(RedactingFilter())
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = _redact_text(message)
        record.args = None
        for key, value in list(vars(record).items()):
            if key in _STANDARD_ATTRS:
                continue
            setattr(record, key, _MASK if key.lower() in _SECRET_KEYS else redact(value))
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per record: ``timestamp`` (UTC, ISO 8601, ms), ``level``,
    ``logger``, ``message``, ``process``, every ``extra`` field, and ``exception`` /
    ``stack`` when present. Credentials are masked (see :func:`redact`).

    ``static_fields`` are added to every object (service name, environment);
    ``redact_secrets=False`` turns masking off (for a test of your own logging, never in
    production).
    """

    def __init__(
        self,
        *,
        static_fields: Mapping[str, Any] | None = None,
        redact_secrets: bool = True,
    ) -> None:
        super().__init__()
        self._static = dict(static_fields or {})
        self._redact = redact_secrets

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "timestamp": _iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        payload.update(self._static)
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS:
                payload[key] = value
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            payload["exception"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        if self._redact:
            payload = {
                k: (_MASK if k.lower() in _SECRET_KEYS else redact(v)) for k, v in payload.items()
            }
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), default=str)


def _iso_utc(created: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
    return f"{seconds}.{int(created % 1 * 1000):03d}Z"
