"""A guarded, synchronous client for OpenAI-compatible chat APIs.

:class:`AIClient` is a ``requests.Session`` with pooled connections wrapped in every guard
of ai_guard, composed once, at construction, with the public decorators in the recommended
order. Data flow of one call::

    client.chat(messages, model=..., route=...)
      validate messages and parameters, serialise the body once,    (ConfigError: no HTTP)
      pick the Idempotency-Key of this logical call
      [bind_sinks(collector.record_call, log_call)]                 with collector= only
      @routed(router)              picks model= from route=          with router= only
      @traced_ai("chat")           opens the per-call context and the span
        (a 4xx answer is raised here again, past the breaker)
      @circuit_breaker("openai:{model}")   one outcome per logical call, after the retries
        (a 4xx answer travels as a value, so it does not count as a failure)
      @rate_limited(max_retries=5, budget=...)   429 / 5xx / timeouts / resets, paced
      one HTTP POST to {base_url}/chat/completions, the same Idempotency-Key every attempt

Defaults, each changed by a keyword of :class:`AIClient`:

- **breaker**: one breaker per model, named ``"openai:{model}"``, in the process-wide
  breaker registry (so the router's ``Router(breakers="openai:{model}")`` and the health
  endpoint see it), with the breaker's defaults (5 failures in 60 s, open 30 s). A
  failure is a 5xx after the retries, a timeout, a connection error, a broken stream or a
  429 the retries could not absorb (the model is unusable for us right now, and the
  router may fall back to another one). Any other 4xx (a bad request, an unknown model, a
  wrong API key) is the caller's problem: the upstream answered, it does not count.
- **retries**: 5 retries of 408, 409, 429, 500, 502, 503, 504, timeouts and connection
  errors (:class:`~ai_guard.errors.UpstreamConnectionError`), waiting what the server
  says (``retry-after-ms``, ``retry-after``, the reset of an exhausted window), else
  exponential backoff from 0.5 s with full jitter, at most 60 s per wait. Retrying a POST
  is safe because every attempt of one logical call carries the same
  ``Idempotency-Key``. A 429 that outlasts the retries raises
  :class:`~ai_guard.errors.RateLimitExceeded`; any other status the last
  :class:`~ai_guard.errors.UpstreamError`.
- **budget**: proactive pacing (:class:`~ai_guard.pacing.RateLimitBudget`) per base URL
  and model, fed by every answer's ``x-ratelimit-*`` headers; in the client's ``store=``
  (share a Redis URL between workers to pace them together), else in memory.
- **tracing**: one GenAI span per logical call when an OpenTelemetry SDK is configured
  (near-free otherwise), with ``server.address``/``server.port`` from the base URL.
- **idempotency**: an ``Idempotency-Key`` (:func:`generate_idempotency_key`) on every POST.
- **timeout**: 5 s to connect, 60 s to read (between two chunks of a stream).
- **metrics and logs**: the process-wide sinks (the default collector and the call log
  line), or ``collector=`` plus the log line.

The API key is sent in the ``Authorization`` header and nowhere else: not in ``repr``,
not in error messages or bodies (they are scrubbed), not in spans or log records.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload
from urllib.parse import urlsplit

import requests
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.trace import NoOpTracerProvider
from pydantic import BaseModel, Field, field_validator
from requests.adapters import BaseAdapter, HTTPAdapter

from ai_guard.breaker import BreakerDecorator, BreakerTemplate, CircuitBreaker, circuit_breaker
from ai_guard.clock import SYSTEM_CLOCK, Clock
from ai_guard.config import GuardConfig, build_config
from ai_guard.context import Sink, bind_sinks, current_call
from ai_guard.errors import (
    ConfigError,
    StreamError,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamTimeoutError,
)
from ai_guard.idempotency import IDEMPOTENCY_HEADER, MAX_KEY_LENGTH, generate_idempotency_key
from ai_guard.logs import log_call, redact
from ai_guard.pacing import RateLimitBudget
from ai_guard.ratelimit import estimate_message_tokens, rate_limited
from ai_guard.routing import Router, RouteRequest, routed
from ai_guard.stores import MemoryStore, Store, resolve_store
from ai_guard.streaming import iter_chat_stream
from ai_guard.structured import parse_structured, schema_name, structured_output_format
from ai_guard.tracing import traced_ai
from ai_guard.types import ChatResult, StreamEvent

if TYPE_CHECKING:
    from ai_guard.metrics import MetricsCollector

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_BREAKER",
    "DEFAULT_POOL_MAXSIZE",
    "DEFAULT_RETRY_STATUSES",
    "DEFAULT_TIMEOUT",
    "AIClient",
    "ClientConfig",
]

M = TypeVar("M", bound=BaseModel)

#: Where the client goes when neither ``base_url=`` nor ``OPENAI_BASE_URL`` says otherwise.
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: Seconds to connect, seconds to wait for the answer (and between two stream chunks).
DEFAULT_TIMEOUT: tuple[float, float] = (5.0, 60.0)
#: Connections kept per host: enough for the threads of a gthread worker or a script's
#: thread pool; more threads than this still work, their extra connections are not kept.
DEFAULT_POOL_MAXSIZE = 32
#: The breaker name template of the default breaker: one breaker per model.
DEFAULT_BREAKER = "openai:{model}"
#: Statuses retried by default: request timeout, idempotency conflict (the first attempt
#: is still running: the retry then gets its replay), rate limit, server errors.
DEFAULT_RETRY_STATUSES: tuple[int, ...] = (408, 409, 429, 500, 502, 503, 504)
#: Exceptions retried by default: no answer in time, no answer at all.
DEFAULT_RETRY_EXCEPTIONS: tuple[type[BaseException], ...] = (
    UpstreamTimeoutError,
    UpstreamConnectionError,
)
DEFAULT_MAX_RETRIES = 5

# 4xx statuses that describe the upstream's state rather than the request: a request
# timeout and a rate limit count for the breaker (after the retries); other 4xx do not.
_UPSTREAM_4XX = frozenset({408, 429})
# How much of an error answer's body is read into the error.
_MAX_ERROR_BODY = 64 * 1024
# Options of rate_limited() that the client sets from its own keywords.
_RESERVED_RETRY_OPTIONS = frozenset({"budget", "clock"})
_MASK = "***"


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("ai_guard")
    except Exception:  # a source checkout without metadata: the version is informative only
        return "0"


_VERSION = _package_version()


# -- configuration -----------------------------------------------------------------------


class ClientConfig(GuardConfig):
    """The scalar settings of an :class:`AIClient`, validated at construction (a bad value
    raises :class:`~ai_guard.errors.ConfigError` naming the setting)."""

    base_url: str = DEFAULT_BASE_URL
    #: Default model of calls that pass neither ``model=`` nor ``route=``.
    model: str | None = Field(default=None, min_length=1)
    #: ``(connect, read)`` seconds.
    timeout: tuple[float, float] = DEFAULT_TIMEOUT
    pool_maxsize: int = Field(default=DEFAULT_POOL_MAXSIZE, ge=1, le=4096)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http(s) URL such as 'https://api.openai.com/v1'")
        if parts.query or parts.fragment:
            raise ValueError("must not carry a query string or a fragment")
        return url.rstrip("/")

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout_pair(cls, value: object) -> object:
        return _timeout_pair(value)


def _timeout_pair(value: object) -> tuple[float, float]:
    """``timeout=`` as ``(connect, read)``: one number is both, as in ``requests``."""
    if isinstance(value, bool):
        raise ValueError("must be seconds (a number) or a (connect, read) pair")
    if isinstance(value, int | float):
        pair: tuple[Any, ...] = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
        pair = tuple(value)
    else:
        raise ValueError("must be seconds (a number) or a (connect, read) pair")
    for part in pair:
        if (
            isinstance(part, bool)
            or not isinstance(part, int | float)
            or not math.isfinite(part)
            or part <= 0
        ):
            raise ValueError("timeouts must be positive, finite numbers of seconds")
    return float(pair[0]), float(pair[1])


def _breaker_decorator(
    option: object, *, store: Store | str | None, clock: Clock
) -> BreakerDecorator | None:
    if option is None or option is False:
        return None
    if isinstance(option, BreakerDecorator):
        return option
    # Only settings that differ from the breaker's defaults, so that two default clients
    # ask the registry for the same breakers without options (and get them).
    options: dict[str, Any] = {}
    if store is not None:
        options["store"] = store
    if clock is not SYSTEM_CLOCK:
        options["clock"] = clock
    if option is True:
        name = DEFAULT_BREAKER
    elif isinstance(option, str):
        name = option
    elif isinstance(option, Mapping):
        extra = dict(option)
        name = extra.pop("name", DEFAULT_BREAKER)
        options.update(extra)
    else:
        raise ConfigError(
            "breaker",
            option,
            "must be True, False, a CircuitBreaker, a name or template such as "
            "'openai:{model}', or a dict of circuit_breaker() options",
        )
    return circuit_breaker(name, **options)


def _retry_options(retries: object, rate_limit: object) -> dict[str, Any]:
    options: dict[str, Any] = {
        "max_retries": DEFAULT_MAX_RETRIES,
        "retry_on_status": DEFAULT_RETRY_STATUSES,
        "retry_on_exceptions": DEFAULT_RETRY_EXCEPTIONS,
    }
    if rate_limit is not None:
        if not isinstance(rate_limit, Mapping):
            raise ConfigError("rate_limit", rate_limit, "must be a dict of rate_limited() options")
        reserved = _RESERVED_RETRY_OPTIONS.intersection(rate_limit)
        if reserved:
            name = sorted(reserved)[0]
            raise ConfigError(
                f"rate_limit.{name}", rate_limit[name], f"give it as AIClient({name}=...)"
            )
        if retries is not None and "max_retries" in rate_limit:
            raise ConfigError(
                "retries", retries, "given twice: as retries= and as rate_limit['max_retries']"
            )
        options.update(rate_limit)
    if retries is None or retries is True:
        return options
    if retries is False:
        options["max_retries"] = 0
    elif isinstance(retries, int) and retries >= 0:
        options["max_retries"] = retries
    else:
        raise ConfigError("retries", retries, "must be a number of retries (>= 0), True or False")
    return options


def _tracing_options(option: object, *, host: str, port: int, clock: Clock) -> dict[str, Any]:
    options: dict[str, Any] = {
        "operation": "chat",
        "provider": "openai",
        "server_address": host,
        "server_port": port,
        "clock": clock,
    }
    if option is None or option is True:
        return options
    if option is False:
        # The decorator still opens the per-call context (metrics and the log line need
        # it); providers that record nothing make it skip every span and metric.
        options["tracer_provider"] = NoOpTracerProvider()
        options["meter_provider"] = NoOpMeterProvider()
        return options
    if isinstance(option, Mapping):
        options.update(option)
        return options
    raise ConfigError("tracing", option, "must be True, False or a dict of traced_ai() options")


def _idempotency_prefix(option: object) -> str | None:
    if option is None or option is False:
        return None
    if option is True:
        return "ai"
    if isinstance(option, str):
        generate_idempotency_key(option)  # ConfigError for a bad prefix, now
        return option
    raise ConfigError("idempotency", option, "must be True, False or a key prefix")


def _check_idempotency_key(key: object) -> str:
    if (
        not isinstance(key, str)
        or not 1 <= len(key) <= MAX_KEY_LENGTH
        or not all("!" <= c <= "~" for c in key)
    ):
        raise ConfigError(
            "idempotency_key",
            key if isinstance(key, str) and len(key) <= 300 else type(key).__name__,
            f"must be 1 to {MAX_KEY_LENGTH} visible ASCII characters (no spaces)",
        )
    return key


# -- request checks ----------------------------------------------------------------------


def _check_messages(messages: object) -> list[Any]:
    """The messages as a list, or :class:`ConfigError` saying which one is wrong."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise ConfigError(
            "messages",
            type(messages).__name__,
            "must be a list of {'role': ..., 'content': ...} dicts",
        )
    if not messages:
        raise ConfigError("messages", [], "must not be empty")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ConfigError(
                f"messages[{index}]",
                type(message).__name__,
                "must be a dict with 'role' and 'content'",
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ConfigError(
                f"messages[{index}].role", role, "must be a non-empty string such as 'user'"
            )
        if "content" not in message and "tool_calls" not in message:
            raise ConfigError(f"messages[{index}].content", None, "is missing")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ConfigError(
                f"messages[{index}].content",
                type(content).__name__,
                "must be a string, a list of content parts, or None",
            )
    return list(messages)


def _response_format(value: object) -> dict[str, Any]:
    """``response_format=`` as the API wants it: a ready dict is sent as it is; a pydantic
    model class or a JSON Schema dict becomes strict structured output."""
    if isinstance(value, type) and issubclass(value, BaseModel):
        return structured_output_format(schema_name(value), value)
    if isinstance(value, Mapping):
        if value.get("type") in ("text", "json_object", "json_schema"):
            return dict(value)
        return structured_output_format(schema_name(value), value)
    raise ConfigError(
        "response_format",
        type(value).__name__,
        "must be a pydantic model class, a JSON Schema dict or a response_format dict",
    )


def _estimate_tokens(*args: Any, **kwargs: Any) -> int:
    """What a call costs the token budget: its messages plus its ``max_tokens``."""
    return estimate_message_tokens(kwargs.get("messages"), max_tokens=kwargs.get("max_tokens"))


# -- 4xx answers and the breaker ---------------------------------------------------------


class _Answered:
    """A 4xx answer (other than 408/429) carried past the circuit breaker as a value.

    The breaker classifies exceptions by type only, and a bad request raises the same
    :class:`UpstreamError` as a server error. The upstream *answered* a bad request: it is
    healthy, so the breaker must count the call as a success (as it counts any exception
    it does not record). Returning the error as a value inside the breaker and raising it
    again just outside does that for every breaker a user may hand in, whatever its
    ``record``/``ignore`` settings, without changing the decorators.
    """

    __slots__ = ("error",)

    def __init__(self, error: UpstreamError) -> None:
        self.error = error


def _is_request_error(exc: UpstreamError) -> bool:
    status = exc.status
    return (
        type(exc) is UpstreamError
        and status is not None
        and 400 <= status < 500
        and status not in _UPSTREAM_4XX
    )


def _answer_request_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Inside the breaker: a request error becomes an :class:`_Answered` value."""

    @functools.wraps(fn)
    def answering(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UpstreamError as exc:
            if _is_request_error(exc):
                return _Answered(exc)
            raise

    return answering


def _raise_request_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Outside the breaker: an :class:`_Answered` value is raised again."""

    @functools.wraps(fn)
    def raising(*args: Any, **kwargs: Any) -> Any:
        result = fn(*args, **kwargs)
        if type(result) is _Answered:
            raise result.error
        return result

    return raising


def _error_message(body: object) -> str | None:
    if isinstance(body, Mapping):
        error = body.get("error", body)
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    if isinstance(body, str) and body.strip():
        return body.strip()[:200]
    return None


# -- the client --------------------------------------------------------------------------


class AIClient:
    """An OpenAI-compatible chat client with every guard of ai_guard, for synchronous code.

    ::

        from ai_guard.client import AIClient

        with AIClient(model="gpt-4o-mini") as client:          # OPENAI_API_KEY from env
            result = client.chat([{"role": "user", "content": "Hello"}])
            print(result.content, result.usage.total_tokens)

    Connection: ``base_url`` (else ``OPENAI_BASE_URL``, else :data:`DEFAULT_BASE_URL`)
    and ``api_key`` (else ``OPENAI_API_KEY``; none at all is allowed for a local server,
    and then no ``Authorization`` header is sent); ``timeout`` (seconds, or a
    ``(connect, read)`` pair; :data:`DEFAULT_TIMEOUT`); ``pool_maxsize`` connections kept
    for threads (:data:`DEFAULT_POOL_MAXSIZE`); ``headers`` sent with every request
    (``OpenAI-Organization``, Azure's ``api-key``).

    Guards, each optional (see the module documentation for the defaults):

    - ``model``: the default model of calls without ``model=`` or ``route=``.
    - ``router``: a :class:`~ai_guard.routing.Router`; a call's ``route=``
      (a :class:`~ai_guard.routing.RouteRequest` or a dict of its fields) picks the model,
      and a model whose circuit is open is replaced by the next one.
    - ``breaker``: ``True`` (one breaker per model, ``"openai:{model}"``), ``False``, a
      name or template, a dict of :func:`~ai_guard.breaker.circuit_breaker` options (with
      ``"name"``), or a ready :class:`~ai_guard.breaker.CircuitBreaker`.
    - ``retries``: how many retries (``False``: none); ``rate_limit``: a dict of other
      :func:`~ai_guard.ratelimit.rate_limited` options (``base_delay``, ``max_delay``,
      ``max_total_wait``, ``retry_on_status``, ``retry_on_exceptions``, ``jitter``).
    - ``budget``: ``True`` (pacing per base URL and model, in ``store`` or in memory),
      ``False``, a :class:`~ai_guard.pacing.RateLimitBudget`, or a store / store URL.
    - ``tracing``: ``True``, ``False`` or a dict of :func:`~ai_guard.tracing.traced_ai`
      options (``capture_content``, ``tracer_provider``, ``provider`` ...).
    - ``collector``: a :class:`~ai_guard.metrics.MetricsCollector`; the client's calls
      are then counted there (and logged) instead of in the process-wide sinks.
    - ``idempotency``: ``True`` (an ``Idempotency-Key`` on every POST, prefix ``ai``),
      ``False``, or a key prefix.
    - ``store``: a :class:`~ai_guard.stores.Store` or URL (``redis://host:6379/0``) for
      the breaker's and the budget's state, to share them between processes.
    - ``clock``: a :class:`~ai_guard.clock.Clock` for every guard (tests).

    Bad settings raise :class:`~ai_guard.errors.ConfigError` here. Thread-safe: one client
    serves every thread of a process (each call is independent; the session's pool is
    shared). Close it (or use ``with``) to release the connections.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        model: str | None = None,
        router: Router | None = None,
        breaker: bool | str | Mapping[str, Any] | BreakerDecorator | None = True,
        retries: int | bool | None = None,
        rate_limit: Mapping[str, Any] | None = None,
        budget: bool | RateLimitBudget | Store | str | None = True,
        tracing: bool | Mapping[str, Any] | None = True,
        collector: MetricsCollector | None = None,
        idempotency: bool | str = True,
        store: Store | str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        pool_maxsize: int = DEFAULT_POOL_MAXSIZE,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(clock, Clock):
            raise ConfigError("clock", clock, "must be a Clock (monotonic, time, sleep)")
        config = build_config(
            ClientConfig,
            base_url=base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
            model=model,
            timeout=timeout,
            pool_maxsize=pool_maxsize,
        )
        if api_key is None:
            api_key = os.environ.get("OPENAI_API_KEY")
        if api_key is not None and not isinstance(api_key, str):
            raise ConfigError("api_key", type(api_key).__name__, "must be a string")
        if router is not None and not isinstance(router, Router):
            raise ConfigError("router", router, "must be an ai_guard.routing.Router")
        if collector is not None and not callable(getattr(collector, "record_call", None)):
            raise ConfigError("collector", collector, "must be a MetricsCollector")
        if store is not None and not isinstance(store, str | Store):
            raise ConfigError("store", store, "must be a Store or a store URL")
        if headers is not None and (
            not isinstance(headers, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        ):
            # Names only: the values may hold a credential (Azure's api-key header).
            shown: object = type(headers).__name__
            if isinstance(headers, Mapping):
                shown = sorted(map(str, headers))
            raise ConfigError("headers", shown, "must be a dict of header names to str values")

        self.config = config
        #: The base URL calls go to (no trailing slash).
        self.base_url = config.base_url
        #: The default model (``None``: every call names its model or route).
        self.model = config.model
        #: The router that picks models for calls with ``route=``.
        self.router = router
        self.timeout = config.timeout
        self._api_key = api_key or None
        self._clock = clock
        self._chat_url = f"{self.base_url}/chat/completions"
        parts = urlsplit(self.base_url)
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._idempotency_prefix = _idempotency_prefix(idempotency)
        self._owned_stores: list[Store] = []
        self._closed = False

        self._session = self._new_session(config.pool_maxsize, headers)
        try:
            self._call = self._compose(
                breaker=breaker,
                retries=retries,
                rate_limit=rate_limit,
                budget=budget,
                tracing=tracing,
                store=store,
            )
        except BaseException:
            self.close()
            raise
        self._sinks: tuple[Sink, ...] | None = (
            (collector.record_call, log_call) if collector is not None else None
        )
        #: The collector the client's calls are counted in (``None``: the default sinks).
        self.collector = collector

    # -- construction --------------------------------------------------------------------

    def _new_session(
        self, pool_maxsize: int, headers: Mapping[str, str] | None
    ) -> requests.Session:
        session = requests.Session()
        # No transport-level retries: @rate_limited retries, with the idempotency key.
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_maxsize, max_retries=0)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        session.headers.update(
            {
                "Content-Type": "application/json",
                "Accept": "application/json",
                "User-Agent": f"ai_guard/{_VERSION} {requests.utils.default_user_agent()}",
            }
        )
        if headers is not None:
            session.headers.update(headers)
        if self._api_key is not None:
            session.headers["Authorization"] = f"Bearer {self._api_key}"
        return session

    def _compose(
        self,
        *,
        breaker: object,
        retries: object,
        rate_limit: object,
        budget: object,
        tracing: object,
        store: Store | str | None,
    ) -> Callable[..., Any]:
        """Build the guarded call once: routed -> traced_ai -> breaker -> rate_limited."""
        clock = self._clock
        self.budget = self._make_budget(budget, store)
        retry_options = _retry_options(retries, rate_limit)
        retry_options.setdefault("estimate_tokens", _estimate_tokens)
        attempt = self._attempt

        # The guards name the function in their log lines ("... HTTP 503, retry 2/5 in
        # 1.2s"): the endpoint says more there than "AIClient._attempt".
        @functools.wraps(attempt)
        def post(**kwargs: Any) -> Any:
            return attempt(**kwargs)

        post.__name__ = post.__qualname__ = f"POST {self._host}/chat/completions"
        call: Callable[..., Any] = rate_limited(**retry_options, budget=self.budget, clock=clock)(
            post
        )
        #: The breaker (or per-model breaker template) every call goes through.
        self.breaker = _breaker_decorator(breaker, store=store, clock=clock)
        if self.breaker is not None:
            call = _raise_request_errors(self.breaker(_answer_request_errors(call)))
        call = traced_ai(
            **_tracing_options(tracing, host=self._host, port=self._port, clock=clock)
        )(call)
        if self.router is not None:
            call = routed(self.router, request=_route_of, clock=clock)(call)
        return call

    def _make_budget(self, option: object, store: Store | str | None) -> RateLimitBudget | None:
        if option is None or option is False:
            return None
        if isinstance(option, RateLimitBudget):
            return option
        key = f"{self.base_url}|{{model}}"
        if option is True:
            source: Store | str | None = store
        elif isinstance(option, str | Store):
            source = option
        else:
            raise ConfigError(
                "budget", option, "must be True, False, a RateLimitBudget, a Store or a URL"
            )
        if source is None:
            resolved: Store = MemoryStore(clock=self._clock)
        elif isinstance(source, str):
            resolved = resolve_store(source, clock=self._clock)
            self._owned_stores.append(resolved)
        else:
            resolved = source
        return RateLimitBudget(resolved, key=key, clock=self._clock)

    # -- public surface ------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str | None = None,
        route: RouteRequest | Mapping[str, Any] | None = None,
        response_format: type[BaseModel] | Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float | tuple[float, float] | None = None,
        **params: Any,
    ) -> ChatResult:
        """One chat completion, through every guard.

        - ``messages``: a non-empty list of ``{"role": ..., "content": ...}`` dicts.
        - ``model`` (else the client's default) or ``route`` (with a ``router``).
        - ``response_format``: a ready dict, or a pydantic model / JSON Schema for strict
          structured output (then see :meth:`parse`).
        - ``idempotency_key``: the key of this logical call (default: a new one).
        - ``timeout``: this call's timeout instead of the client's.
        - ``params``: any other body parameter (``temperature``, ``max_tokens``, ...).

        Returns a :class:`~ai_guard.types.ChatResult`. Raises
        :class:`~ai_guard.errors.ConfigError` before any HTTP for bad arguments;
        :class:`~ai_guard.errors.UpstreamError` for an error answer (``status``, the
        parsed error ``body``, ``request_id``, ``headers``) or a body that is not JSON;
        :class:`~ai_guard.errors.UpstreamTimeoutError` /
        :class:`~ai_guard.errors.UpstreamConnectionError` when no answer came (after the
        retries); :class:`~ai_guard.errors.RateLimitExceeded` when 429s outlast the
        retries; :class:`~ai_guard.errors.CircuitOpenError` when the model's circuit is
        open (no request is made).
        """
        call = self._prepare(
            messages, model, route, response_format, idempotency_key, timeout, params, False
        )
        sinks = self._sinks
        if sinks is None:
            return cast(ChatResult, self._call(**call))
        with bind_sinks(*sinks):
            return cast(ChatResult, self._call(**call))

    def stream_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        model: str | None = None,
        route: RouteRequest | Mapping[str, Any] | None = None,
        response_format: type[BaseModel] | Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float | tuple[float, float] | None = None,
        **params: Any,
    ) -> Generator[StreamEvent, None, None]:
        """A streamed chat completion: a generator of :class:`~ai_guard.types.StreamEvent`.

        Events: ``content`` deltas as they arrive, then one ``usage`` event (the request
        asks for ``stream_options.include_usage``), or, when the stream breaks mid-way (an
        error event, a dropped connection, malformed data), a last ``error`` event whose
        ``error`` is a :class:`~ai_guard.errors.StreamError` keeping ``partial_content``.
        Arguments are those of :meth:`chat`, checked now (a bad one raises here).

        The request is made when iteration starts. Errors before the first byte (an
        error status after the retries, an open circuit, no connection) raise from the
        loop, like :meth:`chat`'s. The guards see one logical call: a 429 before the
        stream starts is retried; the breaker, the span, the metrics and the log line
        record the call when the stream ends, however it ends. Stopping early (``break``,
        ``close()``) closes the HTTP response::

            for event in client.stream_chat(messages):
                if event.type == "content":
                    print(event.content, end="", flush=True)
                elif event.type == "error":
                    print("\\n[cut]", event.error)       # .partial_content has the text
        """
        call = self._prepare(
            messages, model, route, response_format, idempotency_key, timeout, params, True
        )
        return self._events(call)

    @overload
    def parse(
        self,
        messages: Sequence[Mapping[str, Any]],
        schema: type[M],
        *,
        model: str | None = None,
        route: RouteRequest | Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float | tuple[float, float] | None = None,
        **params: Any,
    ) -> M: ...

    @overload
    def parse(
        self,
        messages: Sequence[Mapping[str, Any]],
        schema: Mapping[str, Any],
        *,
        model: str | None = None,
        route: RouteRequest | Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float | tuple[float, float] | None = None,
        **params: Any,
    ) -> Any: ...

    def parse(
        self,
        messages: Sequence[Mapping[str, Any]],
        schema: type[BaseModel] | Mapping[str, Any],
        *,
        model: str | None = None,
        route: RouteRequest | Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float | tuple[float, float] | None = None,
        **params: Any,
    ) -> Any:
        """Ask for strict structured output and return the validated reply.

        ``schema`` is a pydantic model class (an instance is returned) or a JSON Schema
        dict (the checked JSON value is returned). The request carries
        :func:`~ai_guard.structured.structured_output_format` of the schema; the reply
        goes through :func:`~ai_guard.structured.parse_structured`, which raises
        :class:`~ai_guard.errors.StructuredOutputRefusalError` (the model refused),
        :class:`~ai_guard.errors.StructuredOutputTruncatedError` (cut at ``max_tokens``)
        or :class:`~ai_guard.errors.StructuredOutputError` (not JSON, or not matching;
        ``content`` holds the raw reply). Those are about the reply, not the upstream:
        the call itself is counted as a success. Other errors are :meth:`chat`'s::

            class City(BaseModel):
                name: str
                population: int | None

            city = client.parse([{"role": "user", "content": "Largest city in Peru?"}], City)
        """
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)) and not isinstance(
            schema, Mapping
        ):
            raise ConfigError(
                "schema", type(schema).__name__, "must be a pydantic model class or a JSON Schema"
            )
        result = self.chat(
            messages,
            model=model,
            route=route,
            response_format=structured_output_format(schema_name(schema), schema),
            idempotency_key=idempotency_key,
            timeout=timeout,
            **params,
        )
        return parse_structured(result, schema)

    def breaker_for(self, model: str) -> CircuitBreaker | None:
        """The circuit breaker calls to ``model`` go through (``None`` without breaker)."""
        breaker = self.breaker
        if breaker is None:
            return None
        if isinstance(breaker, BreakerTemplate):
            return breaker.breaker(model=model)
        return breaker if isinstance(breaker, CircuitBreaker) else None

    def close(self) -> None:
        """Close the pooled connections (and any store the client opened itself).

        Every idle keep-alive connection is closed now, even while an error this client
        raised is still kept somewhere (a traceback may keep transport objects alive); a
        stream still being read closes its connection when it ends.
        """
        if self._closed:
            return
        self._closed = True
        for adapter in self._session.adapters.values():
            _close_pools(adapter)
        self._session.close()
        for store in self._owned_stores:
            store.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __enter__(self) -> AIClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        # Never the key itself: only whether there is one.
        key = _MASK if self._api_key else None
        return f"AIClient(base_url={self.base_url!r}, model={self.model!r}, api_key={key!r})"

    # -- one logical call ----------------------------------------------------------------

    def _prepare(
        self,
        messages: object,
        model: str | None,
        route: RouteRequest | Mapping[str, Any] | None,
        response_format: object,
        idempotency_key: str | None,
        timeout: object,
        params: dict[str, Any],
        stream: bool,
    ) -> dict[str, Any]:
        """Check a call's arguments and build the keyword arguments of the guarded call."""
        if self._closed:
            raise RuntimeError("this AIClient is closed")
        checked = _check_messages(messages)
        if "stream" in params:
            raise ConfigError("stream", params["stream"], "use stream_chat() for a stream")
        body: dict[str, Any] = {"messages": checked, **params}
        if response_format is not None:
            body["response_format"] = _response_format(response_format)
        if stream:
            stream_options = body.get("stream_options")
            if stream_options is not None and not isinstance(stream_options, Mapping):
                raise ConfigError("stream_options", stream_options, "must be a dict")
            body["stream"] = True
            body["stream_options"] = {**(stream_options or {}), "include_usage": True}
        try:
            # Serialised once per logical call (the model is spliced in per attempt, as
            # the router may change it); also catches values JSON cannot carry, now.
            payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError("params", sorted(params), f"not JSON-serialisable: {exc}") from None

        if model is not None:
            if not isinstance(model, str) or not model:
                raise ConfigError("model", model, "must be a non-empty model name")
            if route is not None:
                raise ConfigError("route", route, "give model= or route=, not both")
        elif route is not None:
            if self.router is None:
                raise ConfigError("route", route, "needs a router: AIClient(router=Router())")
            if isinstance(route, Mapping):
                fields = dict(route)
                try:
                    route = RouteRequest(**fields)
                except TypeError as exc:  # a missing or unknown field
                    raise ConfigError("route", fields, str(exc)) from None
            elif not isinstance(route, RouteRequest):
                raise ConfigError("route", route, "must be a RouteRequest or a dict of its fields")
        elif self.model is not None:
            model = self.model
        elif self.router is not None:
            raise ConfigError(
                "route", None, "pass route=RouteRequest(...) or model=, or give AIClient model="
            )
        else:
            raise ConfigError("model", None, "pass model=..., or give AIClient(model=...)")

        if idempotency_key is not None:
            key: str | None = _check_idempotency_key(idempotency_key)
        elif self._idempotency_prefix is not None:
            key = generate_idempotency_key(self._idempotency_prefix)
        else:
            key = None
        if timeout is None:
            timeout = self.timeout
        else:
            try:
                timeout = _timeout_pair(timeout)
            except ValueError as exc:
                raise ConfigError("timeout", timeout, str(exc)) from None
        max_tokens = params.get("max_completion_tokens", params.get("max_tokens"))
        return {
            "messages": checked,
            "model": model,
            "route": route,
            "payload": payload[1:],
            "max_tokens": max_tokens,
            "idempotency_key": key,
            "stream": stream,
            "timeout": timeout,
        }

    def _events(self, call: dict[str, Any]) -> Generator[StreamEvent, None, None]:
        """The stream of :meth:`stream_chat`. Each step runs with the client's sinks
        bound (the call is emitted when the stream ends, inside some step); nothing is
        yielded while they are bound, so the caller's context never sees them."""
        sinks = self._sinks
        binding: Callable[[], AbstractContextManager[Any]] = (
            nullcontext if sinks is None else functools.partial(bind_sinks, *sinks)
        )
        with binding():
            stream = self._call(**call)
        last: StreamEvent | None = None
        try:
            while True:
                failure: StreamError | None = None
                with binding():
                    try:
                        event = next(stream)
                    except StopIteration:
                        return
                    except StreamError as exc:
                        # Raised inside so the breaker, the span and the metrics saw it.
                        failure = exc
                if failure is not None:
                    yield StreamEvent(
                        "error",
                        error=failure,
                        model=last.model if last is not None else None,
                        id=last.id if last is not None else None,
                    )
                    return
                last = event
                yield event
        finally:
            with binding():
                stream.close()

    def _attempt(
        self,
        *,
        messages: list[Any],
        model: str,
        payload: str,
        max_tokens: object,
        idempotency_key: str | None,
        stream: bool,
        timeout: tuple[float, float],
        route: RouteRequest | None = None,
    ) -> ChatResult | _Answered | Iterator[StreamEvent]:
        """One HTTP attempt (the innermost function of the guarded call)."""
        ctx = current_call()
        if ctx is not None:
            if ctx.server_address is None:
                ctx.server_address = self._host
                ctx.server_port = self._port
            if idempotency_key is not None:
                ctx.idempotency_key = idempotency_key
        data = f'{{"model":{json.dumps(model, ensure_ascii=False)},{payload}'.encode()
        headers = {IDEMPOTENCY_HEADER: idempotency_key} if idempotency_key is not None else None
        failure: UpstreamError | None = None
        try:
            response = self._session.post(
                self._chat_url,
                data=data,
                headers=headers,
                timeout=timeout,
                stream=stream,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            failure = self._transport_error(exc, timeout)
        # Raised outside the except block: the requests exception (which holds the
        # prepared request, Authorization header included) is not kept as its context.
        if failure is not None:
            raise failure
        status = response.status_code
        if not 200 <= status < 300:
            failure = self._status_error(response)
        elif stream:
            return self._scrubbed(iter_chat_stream(response, raise_on_error=True))
        else:
            try:
                body = response.json()
            except (ValueError, RecursionError):
                body = None
            finally:
                response.close()
            if isinstance(body, dict):
                return ChatResult.from_openai(body, response.headers)
            failure = UpstreamError(
                f"HTTP {status} from {self._host} with a body that is not a JSON object",
                status=status,
                body=self._scrub(response.text[:_MAX_ERROR_BODY]),
                request_id=response.headers.get("x-request-id"),
                headers=response.headers,
            )
        # The error's traceback keeps this frame, and a caller may keep the error: not
        # the response with it (it holds its connection pool, and so its sockets).
        del response
        raise failure

    def _scrubbed(self, events: Iterator[StreamEvent]) -> Generator[StreamEvent, None, None]:
        """The stream's events; a :class:`StreamError` (an error event's message and body
        come from the upstream, which may echo the key) is raised again scrubbed."""
        failure: StreamError | None = None
        try:
            yield from events
        except StreamError as exc:
            failure = StreamError(
                self._scrub(str(exc)),
                partial_content=exc.partial_content,
                status=exc.status,
                body=self._scrub(exc.body),
                request_id=exc.request_id,
            )
            failure.__cause__ = exc.__cause__  # the transport error of a dropped stream
        # Raised outside the except block: the unscrubbed error is not kept as context.
        if failure is not None:
            raise failure

    # -- errors --------------------------------------------------------------------------

    def _transport_error(
        self, exc: requests.RequestException, timeout: tuple[float, float]
    ) -> UpstreamError:
        detail = self._scrub(f"{type(exc).__name__}: {exc}")
        if isinstance(exc, requests.Timeout):
            which = "connect" if isinstance(exc, requests.ConnectTimeout) else "read"
            seconds = timeout[0] if which == "connect" else timeout[1]
            return UpstreamTimeoutError(
                f"no answer from {self._host}:{self._port} within the {which} timeout of "
                f"{seconds:g}s ({detail})"
            )
        if isinstance(exc, requests.ConnectionError | requests.exceptions.ChunkedEncodingError):
            return UpstreamConnectionError(
                f"the connection to {self._host}:{self._port} failed before an answer ({detail})"
            )
        return UpstreamError(f"the request to {self._host}:{self._port} failed ({detail})")

    def _status_error(self, response: requests.Response) -> UpstreamError:
        status = response.status_code
        raw = b""
        try:
            for piece in response.iter_content(chunk_size=8192):
                raw += piece
                if len(raw) >= _MAX_ERROR_BODY:
                    break
        except requests.RequestException:
            pass  # what arrived is what we report
        finally:
            response.close()
        text = raw[:_MAX_ERROR_BODY].decode("utf-8", "replace")
        body: Any
        try:
            body = json.loads(text)
        except (ValueError, RecursionError):
            body = text
        request_id = response.headers.get("x-request-id")
        message = f"HTTP {status} from {self._host}"
        detail = _error_message(body)
        if detail:
            message += f": {detail}"
        if request_id:
            message += f" (request id {request_id})"
        return UpstreamError(
            self._scrub(message),
            status=status,
            body=self._scrub(body),
            request_id=request_id,
            headers=response.headers,
        )

    @overload
    def _scrub(self, value: str) -> str: ...

    @overload
    def _scrub(self, value: Any) -> Any: ...

    def _scrub(self, value: Any) -> Any:
        """``value`` without the API key (an upstream may echo it back) or anything that
        looks like a credential (:func:`ai_guard.logs.redact`)."""
        return redact(self._without_key(value))

    def _without_key(self, value: Any) -> Any:
        key = self._api_key
        if not key:
            return value
        if isinstance(value, str):
            return value.replace(key, _MASK) if key in value else value
        if isinstance(value, Mapping):
            return {k: self._without_key(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._without_key(v) for v in value]
        return value


def _close_pools(adapter: BaseAdapter) -> None:
    """Close ``adapter``'s connection pools, and so their idle connections, now.

    ``HTTPAdapter.close()`` clears its pool managers, but with urllib3 2 clearing only
    forgets the pools: each closes its connections when garbage-collected, which a pool
    still referenced (from a response in a kept traceback) never is.
    """
    if isinstance(adapter, HTTPAdapter):
        for manager in (adapter.poolmanager, *adapter.proxy_manager.values()):
            pools = manager.pools
            for key in list(pools.keys()):
                pool = pools.get(key)
                if pool is not None:
                    pool.close()
    adapter.close()


def _route_of(*args: Any, **kwargs: Any) -> RouteRequest:
    """``@routed``'s ``request=``: the call's ``route=`` (checked by ``_prepare``)."""
    return cast(RouteRequest, kwargs["route"])
