"""Rate limiting: read the upstream's rate-limit headers, back off with jitter on 429, and
(optionally) pace calls so the 429 does not happen at all.

Data flow of one call through ``@rate_limited``::

    wrapper(*args, **kwargs)
      [budget]  budget.reserve(estimated tokens)   -> wait for the window reset if exhausted
      result = fn(*args, **kwargs)
      [budget]  budget.observe(headers, reservation) -> every outcome, success or not
      429?      parse_rate_limit_headers(headers)  -> RateLimitInfo
                plan the sleep: server-given wait > reset of the exhausted window > backoff
                clock.sleep(...), ctx.retries += 1, try again
      gave up   RateLimitExceeded(attempts=, info=, headers=, status=, retry_after=)

The header parsing and the sleep arithmetic are pure functions
(:func:`parse_rate_limit_headers`, :func:`parse_duration`,
:func:`compute_rate_limit_sleep`); the pacing budget lives in :mod:`ai_guard.pacing`; the
jitter strategies in :mod:`ai_guard.backoff`.

Placement: put ``@rate_limited`` *inside* ``@circuit_breaker`` and ``@traced_ai`` so the
breaker sees one outcome per logical call and the span reports the retries
(``ctx.retries``, ``ctx.rate_limit_wait_s``). Placed outside ``@traced_ai``, its retries
happen outside the span and do not appear on it (each attempt gets its own span).
"""

from __future__ import annotations

import email.utils
import functools
import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec, Protocol, TypeVar, cast, runtime_checkable

import requests
from pydantic import Field, field_validator

from ai_guard.backoff import Jitter, exponential_delay, resolve_jitter
from ai_guard.clock import SYSTEM_CLOCK, Clock
from ai_guard.config import GuardConfig, build_config
from ai_guard.context import current_call
from ai_guard.errors import RateLimitExceeded

if TYPE_CHECKING:
    from ai_guard.pacing import RateLimitBudget

__all__ = [
    "MAX_COUNT",
    "MAX_DURATION",
    "PacingBudget",
    "RateLimitConfig",
    "RateLimitInfo",
    "compute_rate_limit_sleep",
    "estimate_call_tokens",
    "estimate_message_tokens",
    "parse_duration",
    "parse_rate_limit_headers",
    "rate_limited",
    "server_wait",
]

P = ParamSpec("P")
R = TypeVar("R")

logger = logging.getLogger("ai_guard.ratelimit")

#: Longest duration the parser believes (one day): a longer ``retry-after`` or reset is
#: treated as garbage ("unknown"), not as an instruction to hang a worker for a week.
MAX_DURATION = 86_400.0
#: Largest request or token count the parser believes.
MAX_COUNT = 10**12

#: A wait longer than this (seconds) is logged at WARNING.
LOG_WAIT_THRESHOLD = 1.0

# Header values longer than this are garbage; checking first keeps the regexes cheap.
_MAX_VALUE_LENGTH = 64


# -- header parsing ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """What the upstream's headers say about its rate limits; ``None`` means unknown.

    Counts are ``int``; ``reset_*`` and ``retry_after`` are seconds from when the response
    was parsed (``float``). Build one with :func:`parse_rate_limit_headers`.
    """

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None
    #: The server-given wait: ``retry-after-ms`` > ``x-ms-retry-after-ms`` > ``retry-after``.
    retry_after: float | None = None

    @property
    def requests_exhausted(self) -> bool:
        """No request left in the current window."""
        return self.remaining_requests == 0

    @property
    def tokens_exhausted(self) -> bool:
        """No token left in the current window."""
        return self.remaining_tokens == 0

    @property
    def exhausted_reset(self) -> float | None:
        """Seconds until the exhausted dimension(s) reset; ``None`` when nothing is
        exhausted or its reset is unknown."""
        waits = []
        if self.remaining_requests == 0 and self.reset_requests is not None:
            waits.append(self.reset_requests)
        if self.remaining_tokens == 0 and self.reset_tokens is not None:
            waits.append(self.reset_tokens)
        return max(waits) if waits else None


EMPTY_INFO = RateLimitInfo()

_COUNT_HEADERS = {
    "x-ratelimit-limit-requests": "limit_requests",
    "x-ratelimit-limit-tokens": "limit_tokens",
    "x-ratelimit-remaining-requests": "remaining_requests",
    "x-ratelimit-remaining-tokens": "remaining_tokens",
}
_RESET_HEADERS = {
    "x-ratelimit-reset-requests": "reset_requests",
    "x-ratelimit-reset-tokens": "reset_tokens",
}
_RETRY_AFTER_MS = "retry-after-ms"
_AZURE_RETRY_AFTER_MS = "x-ms-retry-after-ms"
_RETRY_AFTER = "retry-after"
_KNOWN_HEADERS = frozenset(
    {*_COUNT_HEADERS, *_RESET_HEADERS, _RETRY_AFTER_MS, _AZURE_RETRY_AFTER_MS, _RETRY_AFTER}
)

# ASCII digits only: int() and float() would also take "1_000", " ١٢ " or "nan".
_COUNT = re.compile(r"[0-9]{1,15}", re.ASCII)
_SECONDS = re.compile(r"(?:[0-9]{1,15}(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)
# One "<number><unit>" of a Go duration ("1h2m3.5s"); "ms" before "m" so "20ms" is 20 ms.
_DURATION_PART = re.compile(r"([0-9]{1,15}(?:\.[0-9]*)?|\.[0-9]+)(h|ms|m|s|us|µs|μs|ns)", re.ASCII)
_UNIT_SECONDS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ns": 1e-9,
}


def _sane_seconds(value: float) -> float | None:
    # NaN fails both comparisons; inf fails the second.
    if 0.0 <= value <= MAX_DURATION:
        return value
    return None


def parse_duration(value: object) -> float | None:
    """Seconds in a duration as OpenAI sends it in ``x-ratelimit-reset-*``, else ``None``.

    Go-style durations (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``, ``"0.5s"``,
    units ``h m s ms us µs ns``) and plain numbers of seconds (``"2"``, ``"1.5"``).
    Negative, malformed, or longer than :data:`MAX_DURATION` gives ``None``; it never
    raises::

        >>> parse_duration("1h2m3.5s")
        3723.5
        >>> parse_duration("soon") is None
        True
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text or len(text) > _MAX_VALUE_LENGTH:
        return None
    if _SECONDS.fullmatch(text):
        return _sane_seconds(float(text))
    total = 0.0
    position = 0
    while position < len(text):
        part = _DURATION_PART.match(text, position)
        if part is None:
            return None
        total += float(part.group(1)) * _UNIT_SECONDS[part.group(2)]
        position = part.end()
    return _sane_seconds(total)


def _parse_count(value: str) -> int | None:
    text = value.strip()
    if not _COUNT.fullmatch(text):
        return None
    count = int(text)
    return count if count <= MAX_COUNT else None


def _parse_milliseconds(value: str) -> float | None:
    text = value.strip()
    if not _SECONDS.fullmatch(text):
        return None
    return _sane_seconds(float(text) / 1000.0)


def _parse_retry_after(value: str, now: float) -> float | None:
    """``Retry-After``: delta-seconds (a float is tolerated) or an HTTP-date."""
    text = value.strip()
    if not text or len(text) > _MAX_VALUE_LENGTH:
        return None
    if _SECONDS.fullmatch(text):
        return _sane_seconds(float(text))
    try:
        parts = email.utils.parsedate_tz(text)
        if parts is None:
            return None
        # mktime_tz takes a missing zone as UTC, as RFC 9110 dates are.
        when = float(email.utils.mktime_tz(parts))
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return _sane_seconds(max(0.0, when - now))


def _header_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return None


def _known_headers(headers: object) -> dict[str, str]:
    """The rate-limit headers of ``headers`` with lower-case names (first value wins)."""
    found: dict[str, str] = {}
    items = getattr(headers, "items", None)
    if items is None:
        return found
    try:
        for name, value in items():
            if isinstance(name, bytes):
                name = name.decode("latin-1")
            if not isinstance(name, str):
                continue
            name = name.lower()
            if name in _KNOWN_HEADERS and name not in found:
                text = _header_text(value)
                if text is not None and len(text) <= _MAX_VALUE_LENGTH:
                    found[name] = text
    except Exception:  # a broken mapping reads as "no headers", never as a crash
        return found
    return found


def parse_rate_limit_headers(headers: object, *, clock: Clock = SYSTEM_CLOCK) -> RateLimitInfo:
    """Parse the rate-limit headers of a response into a :class:`RateLimitInfo`.

    ``headers`` is any mapping of header names to values (a ``dict``, ``requests``'
    ``CaseInsensitiveDict``, werkzeug's ``Headers``, ``http.client.HTTPMessage``, anything
    with ``.items()``); names are matched case-insensitively. Read:

    - ``x-ratelimit-limit-requests`` / ``-tokens``, ``x-ratelimit-remaining-requests`` /
      ``-tokens``: counts;
    - ``x-ratelimit-reset-requests`` / ``-tokens``: durations (:func:`parse_duration`);
    - the server-given wait, first valid one of ``retry-after-ms``, ``x-ms-retry-after-ms``
      (Azure, milliseconds) and ``retry-after`` (seconds, or an HTTP-date read against
      ``clock.time()``; a date in the past means 0).

    A missing, malformed, negative, NaN or absurd value (beyond :data:`MAX_COUNT` /
    :data:`MAX_DURATION`) leaves its field ``None``. Never raises::

        info = parse_rate_limit_headers(response.headers)
        if info.requests_exhausted:
            time.sleep(info.reset_requests or 1.0)
    """
    if isinstance(headers, RateLimitInfo):
        return headers
    if not headers:
        return EMPTY_INFO
    found = _known_headers(headers)
    if not found:
        return EMPTY_INFO
    fields: dict[str, Any] = {}
    for name, field_name in _COUNT_HEADERS.items():
        if name in found:
            fields[field_name] = _parse_count(found[name])
    for name, field_name in _RESET_HEADERS.items():
        if name in found:
            fields[field_name] = parse_duration(found[name])
    retry_after: float | None = None
    if _RETRY_AFTER_MS in found:
        retry_after = _parse_milliseconds(found[_RETRY_AFTER_MS])
    if retry_after is None and _AZURE_RETRY_AFTER_MS in found:
        retry_after = _parse_milliseconds(found[_AZURE_RETRY_AFTER_MS])
    if retry_after is None and _RETRY_AFTER in found:
        retry_after = _parse_retry_after(found[_RETRY_AFTER], clock.time())
    fields["retry_after"] = retry_after
    return RateLimitInfo(**fields)


# -- the sleep ---------------------------------------------------------------------------


def server_wait(info: RateLimitInfo) -> float | None:
    """The wait the server asked for, in order of authority: its ``retry-after`` (any of
    the three headers), else the reset of the exhausted window (remaining requests or
    tokens at 0); ``None`` when it said neither."""
    if info.retry_after is not None:
        return info.retry_after
    return info.exhausted_reset


def compute_rate_limit_sleep(
    headers_or_info: object,
    attempt: int = 0,
    *,
    base_delay: float = 0.5,
    max_delay: float = 60.0,
    jitter: bool | Jitter = True,
    clock: Clock = SYSTEM_CLOCK,
) -> float:
    """Seconds to sleep before retrying after a 429 (or another retryable answer).

    ``headers_or_info`` is the response's headers (any mapping) or a parsed
    :class:`RateLimitInfo`; ``attempt`` counts the retries already made (0 before the first
    retry). In order:

    1. the server-given wait (``retry-after-ms`` > ``x-ms-retry-after-ms`` > ``retry-after``);
    2. else the reset of the exhausted window (``x-ratelimit-remaining-*`` at 0);
    3. else exponential backoff, ``base_delay * 2 ** attempt`` capped at ``max_delay``.

    Jitter (``True``: :class:`~ai_guard.backoff.FullJitter`; ``False``: none; or a strategy
    object) spreads an exponential wait over ``[0, delay]``, and adds a bounded amount *on
    top of* a server-given wait, never less than the server asked and never past
    ``max_delay`` because of the jitter. A server wait longer than ``max_delay`` is returned
    as asked: the caller decides whether to wait that long (``@rate_limited`` gives up)::

        >>> compute_rate_limit_sleep({"retry-after-ms": "1500"}, jitter=False)
        1.5
        >>> compute_rate_limit_sleep({}, attempt=3, base_delay=0.5, jitter=False)
        4.0
    """
    info = parse_rate_limit_headers(headers_or_info, clock=clock)
    strategy = resolve_jitter(jitter)
    asked = server_wait(info)
    if asked is not None:
        return strategy.extend(asked, max_delay)
    return strategy.spread(exponential_delay(attempt, base_delay, max_delay))


# -- token estimates (what a call will cost the token budget) -----------------------------


def _content_characters(content: object) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):  # multi-part content: count the text parts
        return sum(
            len(part["text"])
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return 0


def estimate_message_tokens(messages: object, *, max_tokens: object = None) -> int:
    """A rough token count for a chat request: the characters of every message's text
    divided by 4 (rounded up), plus ``max_tokens`` when given (the upstream counts the
    completion it may produce against the token budget too). Non-message input counts 0."""
    characters = 0
    if isinstance(messages, Sequence) and not isinstance(messages, str | bytes):
        for message in messages:
            if isinstance(message, Mapping):
                characters += _content_characters(message.get("content"))
    tokens = -(-characters // 4)
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
        tokens += max_tokens
    return tokens


def _looks_like_messages(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and isinstance(value[0], Mapping)
        and "role" in value[0]
    )


def estimate_call_tokens(*args: Any, **kwargs: Any) -> int:
    """The default ``estimate_tokens`` of ``@rate_limited``: the ``messages=`` keyword (or
    else the first positional argument that is a list of ``{"role": ...}`` dicts), counted
    by :func:`estimate_message_tokens`, plus ``max_tokens=`` or
    ``max_completion_tokens=``. A call with no messages estimates 0 tokens."""
    messages = kwargs.get("messages")
    if messages is None:
        messages = next((a for a in args if _looks_like_messages(a)), None)
    max_tokens = kwargs.get("max_completion_tokens", kwargs.get("max_tokens"))
    return estimate_message_tokens(messages, max_tokens=max_tokens)


# -- the decorator -----------------------------------------------------------------------


class PacingReservation(Protocol):
    """What a budget's ``reserve`` returns: ``wait > 0`` means "not reserved, wait"."""

    @property
    def wait(self) -> float:
        """Seconds to wait before asking again (0: reserved, send now)."""
        ...


@runtime_checkable
class PacingBudget(Protocol):
    """What ``@rate_limited(budget=...)`` needs from a budget; implemented by
    :class:`ai_guard.pacing.RateLimitBudget`."""

    def reserve(self, estimated_tokens: int = 0) -> PacingReservation:
        """Reserve a call, or say how long to wait."""
        ...

    def observe(self, headers: object, *, reservation: Any = None) -> None:
        """Update the budget from an answer's headers and end the reserved call's flight."""
        ...


class RateLimitConfig(GuardConfig):
    """The settings of one ``@rate_limited`` guard (see :func:`rate_limited`)."""

    max_retries: int = Field(default=5, ge=0, le=1000)
    base_delay: float = Field(default=0.5, ge=0, allow_inf_nan=False)
    max_delay: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    max_total_wait: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    retry_on_status: tuple[int, ...] = (429,)
    retry_on_exceptions: tuple[type[BaseException], ...] = ()
    budget: PacingBudget | None = None
    jitter: Any = Field(default=True, validate_default=True)
    clock: Clock = SYSTEM_CLOCK
    estimate_tokens: Callable[..., int] | None = None

    @field_validator("retry_on_status", mode="before")
    @classmethod
    def _statuses(cls, value: object) -> object:
        if isinstance(value, int):
            value = (value,)
        if isinstance(value, Iterable) and not isinstance(value, str | bytes):
            value = tuple(value)
            for status in value:
                if isinstance(status, bool) or not isinstance(status, int):
                    raise ValueError(f"{status!r} is not an HTTP status code")
                if not 100 <= status <= 599:
                    raise ValueError(f"{status} is not an HTTP status code (100-599)")
        return value

    @field_validator("retry_on_exceptions", mode="before")
    @classmethod
    def _exceptions(cls, value: object) -> object:
        if isinstance(value, type):
            return (value,)
        return tuple(value) if isinstance(value, list | set | frozenset) else value

    @field_validator("jitter")
    @classmethod
    def _jitter(cls, value: object) -> Jitter:
        if value is True or value is False or isinstance(value, Jitter):
            return resolve_jitter(value)
        raise ValueError("must be True, False, or a jitter strategy (FullJitter(), ...)")

    @field_validator("estimate_tokens")
    @classmethod
    def _estimator(cls, value: object) -> object:
        if value is not None and not callable(value):
            raise ValueError("must be a callable of the call's arguments returning an int")
        return value


def _status_of(outcome: object) -> int | None:
    """The HTTP status an outcome (a response or an exception) carries, if any."""
    if isinstance(outcome, requests.Response):
        return outcome.status_code
    if isinstance(outcome, RateLimitExceeded):
        return outcome.status if outcome.status is not None else 429
    for attribute in ("status", "status_code"):  # ai_guard's errors; openai's APIStatusError
        status = getattr(outcome, attribute, None)
        if isinstance(status, int) and not isinstance(status, bool):
            return status
    status = getattr(getattr(outcome, "response", None), "status_code", None)
    if isinstance(status, int) and not isinstance(status, bool):
        return status
    return None


def _headers_of(outcome: object) -> Any:
    """The response headers an outcome carries (``None`` when it has none)."""
    headers = getattr(outcome, "headers", None)
    if headers:
        return headers
    headers = getattr(getattr(outcome, "response", None), "headers", None)
    return headers or None


class _Retrier:
    """The state shared by every call of one decorated function: its settings, resolved
    once at decoration time. Holds no per-call state, so it is thread-safe."""

    def __init__(self, fn: Callable[..., Any], config: RateLimitConfig) -> None:
        self.fn = fn
        self.name = getattr(fn, "__qualname__", repr(fn))
        self.max_retries = config.max_retries
        self.base_delay = config.base_delay
        self.max_delay = config.max_delay
        self.max_total_wait = math.inf if config.max_total_wait is None else config.max_total_wait
        self.statuses = frozenset(config.retry_on_status)
        self.exceptions = config.retry_on_exceptions
        self.jitter: Jitter = config.jitter
        self.clock = config.clock
        self.budget = config.budget
        # A key template ("openai:{model}") picks its budget per call; resolved once here.
        self.bind_budget: Callable[[Mapping[str, Any]], PacingBudget] | None = (
            getattr(self.budget, "bind_call", None)
            if getattr(self.budget, "is_template", False)
            else None
        )
        self.estimate = config.estimate_tokens or estimate_call_tokens

    def is_retryable(self, exc: BaseException) -> bool:
        if self.exceptions and isinstance(exc, self.exceptions):
            return True
        return _status_of(exc) in self.statuses

    # -- pacing --------------------------------------------------------------------------

    def pace(self, budget: PacingBudget, tokens: int, allowance: float) -> tuple[float, Any]:
        """Wait until ``budget`` reserves the call, at most ``allowance`` seconds in all
        (past that the call goes unreserved and the server decides). Returns the seconds
        waited and the reservation (``None`` when the call goes unreserved)."""
        clock = self.clock
        waited = 0.0
        reservation: PacingReservation | None = None
        while True:
            attempt = budget.reserve(tokens)
            wait = attempt.wait
            if wait <= 0.0:
                reservation = attempt
                break
            wait = min(wait, allowance - waited)
            if wait <= 0.0:
                break
            if wait > LOG_WAIT_THRESHOLD:
                logger.info(
                    "pacing %s: rate-limit window exhausted, waiting %.2fs for its reset",
                    self.name,
                    wait,
                    extra={"function": self.name, "wait_s": wait, "pacing": True},
                )
            clock.sleep(wait)
            waited += wait
        if waited:
            ctx = current_call()
            if ctx is not None:
                ctx.rate_limit_wait_s += waited
        return waited, reservation

    @staticmethod
    def observe(budget: PacingBudget, outcome: object, reservation: Any) -> None:
        headers = _headers_of(outcome)
        if headers or reservation is not None:
            budget.observe(headers, reservation=reservation)

    def call_paced(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The wrapper's body when a budget is configured."""
        budget = self.budget if self.bind_budget is None else self.bind_budget(kwargs)
        assert budget is not None
        tokens = self.estimate(*args, **kwargs)
        waited, reservation = self.pace(budget, tokens, min(self.max_delay, self.max_total_wait))
        try:
            result = self.fn(*args, **kwargs)
        except BaseException as exc:
            self.observe(budget, exc, reservation)
            if not self.is_retryable(exc):
                raise
            failure: object = exc
        else:
            self.observe(budget, result, reservation)
            if not (isinstance(result, requests.Response) and result.status_code in self.statuses):
                return result
            failure = result
        return self.retry(args, kwargs, failure, budget=budget, tokens=tokens, waited=waited)

    # -- retries -------------------------------------------------------------------------

    def retry(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        failure: object,
        *,
        budget: PacingBudget | None = None,
        tokens: int = 0,
        waited: float = 0.0,
    ) -> Any:
        """The slow path: ``failure`` (a retryable exception or response) happened on the
        first attempt. Retry until success, a non-retryable outcome, or a reason to give
        up. ``waited`` is the pacing wait already spent on this call."""
        clock = self.clock
        retries = 0
        ctx = current_call()
        while True:
            status = _status_of(failure)
            headers = _headers_of(failure)
            info = parse_rate_limit_headers(headers, clock=clock) if headers else EMPTY_INFO
            if retries >= self.max_retries:
                return self.give_up(failure, status, info, headers, retries, "retries exhausted")
            ceiling = min(self.max_delay, self.max_total_wait - waited)
            asked = server_wait(info)
            if asked is not None:
                if asked > ceiling:
                    return self.give_up(
                        failure,
                        status,
                        info,
                        headers,
                        retries,
                        f"server asked to wait {asked:.3f}s, more than the "
                        f"{ceiling:.3f}s allowed (max_delay / max_total_wait)",
                    )
                wait = self.jitter.extend(asked, ceiling)
            else:
                wait = self.jitter.spread(
                    exponential_delay(retries, self.base_delay, self.max_delay)
                )
                if wait > ceiling:
                    return self.give_up(
                        failure,
                        status,
                        info,
                        headers,
                        retries,
                        f"backoff of {wait:.3f}s would exceed max_total_wait",
                    )
            if wait > LOG_WAIT_THRESHOLD:
                logger.warning(
                    "%s: HTTP %s, retry %d/%d in %.2fs",
                    self.name,
                    status,
                    retries + 1,
                    self.max_retries,
                    wait,
                    extra={
                        "function": self.name,
                        "status": status,
                        "attempt": retries + 1,
                        "max_retries": self.max_retries,
                        "wait_s": wait,
                        "retry_after": info.retry_after,
                    },
                )
            clock.sleep(wait)
            waited += wait
            retries += 1
            if ctx is not None:
                ctx.retries += 1
                ctx.rate_limit_wait_s += wait
            reservation: Any = None
            if budget is not None:
                paced, reservation = self.pace(
                    budget, tokens, min(self.max_delay, self.max_total_wait - waited)
                )
                waited += paced
            try:
                result = self.fn(*args, **kwargs)
            except BaseException as exc:
                if budget is not None:
                    self.observe(budget, exc, reservation)
                if not self.is_retryable(exc):
                    raise
                failure = exc
                continue
            if budget is not None:
                self.observe(budget, result, reservation)
            if isinstance(result, requests.Response) and result.status_code in self.statuses:
                failure = result
                continue
            return result

    def give_up(
        self,
        failure: object,
        status: int | None,
        info: RateLimitInfo,
        headers: Any,
        retries: int,
        reason: str,
    ) -> Any:
        """A 429 becomes :class:`RateLimitExceeded`; any other retryable outcome (a 503, a
        connection error) is handed back as it was, so callers see the upstream's error."""
        if status == 429 or isinstance(failure, RateLimitExceeded):
            error = RateLimitExceeded(
                f"{self.name}: rate limited after {retries + 1} attempt(s): {reason}",
                attempts=retries + 1,
                info=info,
                headers=_plain_headers(headers),
                status=status,
                retry_after=info.retry_after,
            )
            if isinstance(failure, BaseException):
                raise error from failure
            raise error
        if isinstance(failure, BaseException):
            raise failure
        return failure


def _plain_headers(headers: Any) -> dict[str, str]:
    if not headers:
        return {}
    try:
        return {str(k): str(v) for k, v in headers.items()}
    except Exception:  # exotic header objects: the parsed info is what matters
        return {}


def rate_limited(
    max_retries: int = 5,
    *,
    base_delay: float = 0.5,
    max_delay: float = 60.0,
    max_total_wait: float | None = None,
    retry_on_status: Iterable[int] | int = (429,),
    retry_on_exceptions: Iterable[type[BaseException]] | type[BaseException] = (),
    budget: RateLimitBudget | PacingBudget | None = None,
    jitter: bool | Jitter = True,
    clock: Clock = SYSTEM_CLOCK,
    estimate_tokens: Callable[..., int] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Retry a call on HTTP 429 (and other statuses you list), sleeping as the server says.

    A 429 is seen when the function raises :class:`~ai_guard.errors.RateLimitExceeded`,
    raises an exception carrying the status (``requests.HTTPError`` via its response,
    :class:`~ai_guard.errors.UpstreamError` via ``.status``, openai's ``APIStatusError`` via
    ``.status_code``), or returns a ``requests.Response`` with that status.
    ``retry_on_status`` lists the retryable statuses (add 503, 502 ... as you like);
    ``retry_on_exceptions`` lists exception types retried whatever their status (e.g.
    ``requests.ConnectionError``).

    Each retry sleeps (through ``clock.sleep``) :func:`compute_rate_limit_sleep`: the
    server-given wait, else the reset of the exhausted window, else exponential backoff
    from ``base_delay`` capped at ``max_delay``, with ``jitter``. It gives up:

    - after ``max_retries`` retries (``attempts == max_retries + 1``);
    - at once, without sleeping, when the server asks for longer than ``max_delay`` or than
      what is left of ``max_total_wait`` (seconds of waiting for the whole call), or when
      the backoff would overrun ``max_total_wait``.

    Giving up on a 429 raises :class:`RateLimitExceeded` with ``attempts``, ``info`` (the
    last :class:`RateLimitInfo`), ``headers``, ``status`` and ``retry_after``, chained to
    the last exception; any other retryable outcome is re-raised (or returned) unchanged.

    ``budget`` (a :class:`~ai_guard.pacing.RateLimitBudget`) turns on proactive pacing:
    every response's headers update it, and a call waits for the window's reset when the
    remaining requests or tokens would not cover it (at most ``max_delay`` per attempt;
    then it goes anyway). Tokens are estimated by ``estimate_tokens(*args, **kwargs)``,
    by default :func:`estimate_call_tokens` (``messages=`` characters / 4 + ``max_tokens``).

    Within an AI call (``@traced_ai``, ``@routed``, the client) it adds its retries and
    seconds waited to ``ctx.retries`` / ``ctx.rate_limit_wait_s``; waits over 1 s are
    logged at WARNING on the ``ai_guard.ratelimit`` logger. Without a budget the success
    path costs one ``try`` and one type check::

        @rate_limited(max_retries=5, max_total_wait=30)
        def ask(prompt: str) -> requests.Response:
            return session.post(URL, json={...})

    Bad settings raise :class:`~ai_guard.errors.ConfigError` here, at decoration time.
    """
    config = build_config(
        RateLimitConfig,
        max_retries=max_retries,
        base_delay=base_delay,
        max_delay=max_delay,
        max_total_wait=max_total_wait,
        retry_on_status=retry_on_status,
        retry_on_exceptions=retry_on_exceptions,
        budget=budget,
        jitter=jitter,
        clock=clock,
        estimate_tokens=estimate_tokens,
    )

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        retrier = _Retrier(fn, config)
        if retrier.budget is not None:
            call_paced = retrier.call_paced

            @functools.wraps(fn)
            def paced(*args: P.args, **kwargs: P.kwargs) -> R:
                return cast(R, call_paced(args, kwargs))

            return paced

        # The hot path: locals only, no context lookup, no allocation beyond the call.
        is_retryable = retrier.is_retryable
        retry = retrier.retry
        statuses = retrier.statuses
        response_type = requests.Response

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if not is_retryable(exc):
                    raise
                failure: object = exc
            else:
                if not (isinstance(result, response_type) and result.status_code in statuses):
                    return result
                failure = result
            return cast(R, retry(args, kwargs, failure))

        return wrapper

    return decorate
