"""Every error ai_guard raises derives from :class:`AIGuardError`.

Each error carries the data a caller needs to act on it (``retry_after`` for an open
circuit, ``attempts`` and the last headers for a rate limit, ``status`` and ``body`` for an
upstream error), never an API key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ai_guard.ratelimit import RateLimitInfo

__all__ = [
    "AIGuardError",
    "CircuitOpenError",
    "ConfigError",
    "IdempotencyConflictError",
    "IdempotencyError",
    "IdempotencyKeyError",
    "IdempotencyMismatchError",
    "IdempotencyTimeoutError",
    "NotStorableError",
    "RateLimitExceeded",
    "StoreError",
    "StoreUnavailableError",
    "StreamError",
    "StructuredOutputError",
    "StructuredOutputRefusalError",
    "StructuredOutputTruncatedError",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamTimeoutError",
]


class AIGuardError(Exception):
    """Base class of every ai_guard error."""


# -- configuration -----------------------------------------------------------------------


class ConfigError(AIGuardError, ValueError):
    """A setting has a value ai_guard cannot work with.

    ``setting`` names the setting (``"timeout"``, ``"AI_GUARD_STORE_URL"``), ``value`` is
    what was given, ``reason`` says what is wrong with it. Raised at construction time,
    never on a call.
    """

    def __init__(self, setting: str, value: Any, reason: str) -> None:
        self.setting = setting
        self.value = value
        self.reason = reason
        super().__init__(f"invalid setting {setting}={value!r}: {reason}")


# -- circuit breaker ---------------------------------------------------------------------


class CircuitOpenError(AIGuardError):
    """The circuit ``name`` is open: the call was not made.

    ``retry_after`` is the number of seconds until the breaker admits a trial call.
    """

    def __init__(self, name: str, retry_after: float, *, message: str | None = None) -> None:
        self.name = name
        self.retry_after = max(0.0, float(retry_after))
        super().__init__(
            message or f"circuit {name!r} is open; next trial call in {self.retry_after:.3f}s"
        )


# -- rate limiting -----------------------------------------------------------------------


class RateLimitExceeded(AIGuardError):
    """The upstream kept answering 429 (or another retryable status) and we gave up.

    ``attempts`` counts the calls made (the first one included); ``info`` is the
    :class:`~ai_guard.ratelimit.RateLimitInfo` parsed from the last response's headers (or
    ``None`` when there were none); ``headers`` are those raw headers; ``status`` the last
    HTTP status seen; ``retry_after`` what the server asked us to wait, if it said.
    """

    def __init__(
        self,
        message: str = "rate limit exceeded",
        *,
        attempts: int = 1,
        info: RateLimitInfo | None = None,
        headers: Mapping[str, str] | None = None,
        status: int | None = 429,
        retry_after: float | None = None,
    ) -> None:
        self.attempts = attempts
        self.info = info
        self.headers: dict[str, str] = dict(headers) if headers is not None else {}
        self.status = status
        if retry_after is None and info is not None:
            retry_after = info.retry_after
        self.retry_after = retry_after
        super().__init__(message)


# -- idempotency -------------------------------------------------------------------------


class IdempotencyError(AIGuardError):
    """Base class of the idempotency errors; ``http_status`` is the status a view answers."""

    http_status = 400

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.key = key
        super().__init__(message)


class IdempotencyKeyError(IdempotencyError):
    """The idempotency key is malformed (empty, too long, not visible ASCII) or missing
    where one is required. Views answer 400."""

    http_status = 400


class IdempotencyConflictError(IdempotencyError):
    """A call with the same key is still running. Views answer 409 with ``Retry-After``."""

    http_status = 409

    def __init__(self, message: str, *, key: str | None = None, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(message, key=key)


class IdempotencyMismatchError(IdempotencyError):
    """The key was used before with a different payload. Views answer 422."""

    http_status = 422


class IdempotencyTimeoutError(IdempotencyConflictError):
    """A caller waited for the first call with the same key longer than allowed."""


class NotStorableError(IdempotencyError):
    """The result of an idempotent call cannot be serialised for the store."""

    http_status = 500


# -- stores ------------------------------------------------------------------------------


class StoreError(AIGuardError):
    """A store operation failed."""


class StoreUnavailableError(StoreError):
    """The store (Redis) cannot be reached. Guards document whether they fail open or
    closed when they see it."""


# -- upstream ----------------------------------------------------------------------------


class UpstreamError(AIGuardError):
    """The upstream answered with an error status (4xx/5xx) or not at all.

    ``status`` is the HTTP status (``None`` when no response arrived), ``body`` the parsed
    JSON error body (or the raw text), ``request_id`` the upstream's ``x-request-id``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: Any = None,
        request_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.request_id = request_id
        self.headers: dict[str, str] = dict(headers) if headers is not None else {}
        super().__init__(message)


class UpstreamTimeoutError(UpstreamError):
    """The upstream did not answer within the configured timeout."""


class UpstreamConnectionError(UpstreamError):
    """No answer arrived: the connection was refused, reset or closed before a response
    (``status`` is ``None``). Safe to retry when the request carries an idempotency key."""


class StreamError(UpstreamError):
    """A stream ended with an error event or a dropped connection.

    ``partial_content`` is the text received before the failure.
    """

    def __init__(
        self,
        message: str,
        *,
        partial_content: str = "",
        status: int | None = None,
        body: Any = None,
        request_id: str | None = None,
    ) -> None:
        self.partial_content = partial_content
        super().__init__(message, status=status, body=body, request_id=request_id)


# -- structured outputs ------------------------------------------------------------------


class StructuredOutputError(AIGuardError):
    """A reply is not valid JSON or does not validate against the schema.

    ``content`` is the raw reply; ``errors`` pydantic's error list (empty for invalid
    JSON).
    """

    def __init__(
        self,
        message: str,
        *,
        content: str,
        errors: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        self.content = content
        self.errors: list[Mapping[str, Any]] = list(errors)
        super().__init__(message)


class StructuredOutputTruncatedError(StructuredOutputError):
    """The reply stopped at the token limit (``finish_reason == "length"``)."""


class StructuredOutputRefusalError(StructuredOutputError):
    """The model refused to answer (``message.refusal``); ``refusal`` is its explanation.

    Retrying the same request usually gets the same refusal: change the request instead.
    """

    def __init__(self, message: str, *, content: str = "", refusal: str) -> None:
        self.refusal = refusal
        super().__init__(message, content=content)
