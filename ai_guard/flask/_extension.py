"""``AIGuard``: the Flask extension that wires ai_guard into an app (or several).

Follows the Flask extension guide: ``AIGuard(app)`` or ``ext = AIGuard(); ext.init_app(app)``
(app factories); the extension object keeps no app (``current_app`` at request time); the
per-app state lives in ``app.extensions["ai_guard"]`` (an :class:`AIGuardState`); settings
are the ``AI_GUARD_*`` keys of ``app.config``, validated at ``init_app`` by one frozen
pydantic model (:class:`AIGuardSettings`).

What ``init_app`` does for an app:

1. reads and validates the settings (a bad value raises :class:`~ai_guard.errors.ConfigError`
   whose ``setting`` is the ``AI_GUARD_*`` key);
2. builds the app's store (``AI_GUARD_STORE_URL``) and metrics collector (catalogue from
   ``AI_GUARD_MODELS``, SLOs from ``AI_GUARD_SLOS``);
3. binds the app's *sinks* (its collector, the call logger and, in Prometheus multiprocess
   mode, the process's Prometheus sink) around every request, at the WSGI level (see
   :class:`SinkBindingMiddleware` for why there);
4. registers the blueprint (JSON metrics, Prometheus, SLOs, health, dashboard) under
   ``AI_GUARD_URL_PREFIX``;
5. instruments the app with ``opentelemetry-instrumentation-flask`` (unless
   ``AI_GUARD_TRACING=False``), the blueprint's own URLs excluded, so AI spans nest under
   the request span;
6. subscribes, once per process, to the breaker registry's state changes: each change
   becomes an event on the current span, and enters the ring of recent transitions the
   dashboard shows (the breaker module itself writes the log line).

AI calls made outside a request (a background thread, a CLI command, a job scheduler)
are emitted to the process-wide default sinks, not to an app's: wrap them in
``bind_sinks(*current_state(app).sinks)`` to count them for that app.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
import logging
import re
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ParamSpec, TypeVar, cast

from flask import Flask, Request, current_app
from pydantic import ConfigDict, Field, SecretStr, ValidationInfo, field_validator
from werkzeug.wrappers import Response as WerkzeugResponse
from werkzeug.wrappers import response as _werkzeug_response
from werkzeug.wsgi import ClosingIterator

from ai_guard.breaker import BreakerEvent, CircuitBreaker, all_breakers, default_registry
from ai_guard.config import STORE_SCHEMES, GuardConfig, build_config
from ai_guard.context import _BOUND_SINKS, CallContext, Sink
from ai_guard.errors import AIGuardError, ConfigError
from ai_guard.idempotency import idempotent as _idempotent
from ai_guard.logs import log_call
from ai_guard.metrics import MetricsCollector
from ai_guard.pricing import ModelSpec, parse_models
from ai_guard.slo import SLOConfig, slo_config
from ai_guard.stores import Store, store_from_url
from ai_guard.tracing import breaker_span_event

__all__ = [
    "CONFIG_PREFIX",
    "EXTENSION_KEY",
    "AIGuard",
    "AIGuardSettings",
    "AIGuardState",
    "SinkBindingMiddleware",
    "current_state",
    "load_settings",
]

P = ParamSpec("P")
R = TypeVar("R")

_log = logging.getLogger("ai_guard.flask")

#: Prefix of every ``app.config`` key the extension reads.
CONFIG_PREFIX = "AI_GUARD_"
#: Key of the per-app state in ``app.extensions``.
EXTENSION_KEY = "ai_guard"
#: How many breaker state changes each app keeps for its dashboard.
TRANSITIONS_KEPT = 50

_PREFIX_PATTERN = re.compile(r"^(/[A-Za-z0-9._~-]+)+$")
_TOKEN_MIN_LENGTH = 16
_TOKEN_PATTERN = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: what a header can carry


# -- settings ------------------------------------------------------------------------------


def _split_list(value: Any) -> Any:
    """``"a, b"`` -> ``("a", "b")``: list settings may come from an environment variable."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class AIGuardSettings(GuardConfig):
    """The extension's settings, one field per ``AI_GUARD_<NAME>`` key (the field's alias).

    ==========================  ============================================  ==============
    key                         meaning                                       default
    ==========================  ============================================  ==============
    ``AI_GUARD_STORE_URL``      store of idempotency keys (and of the app's   ``memory://``
                                breakers / budgets when it passes it on)
    ``AI_GUARD_IDEMPOTENCY_TTL`` seconds ``ext.idempotent()`` keeps a response ``86400``
    ``AI_GUARD_URL_PREFIX``     where the blueprint lives                     ``/ai-guard``
    ``AI_GUARD_SLOS``           SLO overrides (dict or JSON, see               the defaults
                                :class:`~ai_guard.slo.SLOConfig`)
    ``AI_GUARD_MODELS``         model catalogue pricing the calls (see         built-in
                                :func:`~ai_guard.pricing.parse_models`)
    ``AI_GUARD_METRICS_AUTH``   callable ``request -> bool`` guarding the      ``None``
                                blueprint
    ``AI_GUARD_METRICS_TOKEN``  bearer token guarding the blueprint (>= 16     ``None``
                                visible ASCII characters)
    ``AI_GUARD_TRACING``        instrument the app with OpenTelemetry          ``True``
    ``AI_GUARD_TRACER_PROVIDER`` tracer provider for the request spans         global
    ``AI_GUARD_EXCLUDED_URLS``  more URL regexes the request spans skip        none
                                (list, or comma-separated)
    ``AI_GUARD_CRITICAL_BREAKERS`` breaker names (or ``fnmatch`` patterns such  none
                                as ``openai:*``) whose open state makes
                                ``/health`` answer 503
    ``AI_GUARD_DASHBOARD_REFRESH`` seconds between dashboard refreshes (0: off) ``10``
    ``AI_GUARD_DASHBOARD_WINDOW`` seconds of history the dashboard charts      ``3600``
    ``AI_GUARD_METRICS_RESOLUTION`` seconds per metrics interval (divides 60)  ``10``
    ``AI_GUARD_SINKS``          more sinks bound during requests               none
    ==========================  ============================================  ==============
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", arbitrary_types_allowed=True, populate_by_name=True
    )

    store_url: str = Field(default="memory://", alias="STORE_URL")
    idempotency_ttl: float = Field(default=86400.0, gt=0, alias="IDEMPOTENCY_TTL")
    url_prefix: str = Field(default="/ai-guard", alias="URL_PREFIX")
    slos: SLOConfig = Field(default_factory=SLOConfig, alias="SLOS")
    models: tuple[ModelSpec, ...] | None = Field(default=None, alias="MODELS")
    metrics_auth: Callable[[Request], Any] | None = Field(default=None, alias="METRICS_AUTH")
    metrics_token: SecretStr | None = Field(default=None, alias="METRICS_TOKEN")
    tracing: bool = Field(default=True, alias="TRACING")
    tracer_provider: Any = Field(default=None, alias="TRACER_PROVIDER")
    excluded_urls: tuple[str, ...] = Field(default=(), alias="EXCLUDED_URLS")
    critical_breakers: tuple[str, ...] = Field(default=(), alias="CRITICAL_BREAKERS")
    dashboard_refresh: float = Field(default=10.0, ge=0, le=3600, alias="DASHBOARD_REFRESH")
    dashboard_window: float = Field(default=3600.0, gt=0, alias="DASHBOARD_WINDOW")
    metrics_resolution: float = Field(default=10.0, gt=0, le=60, alias="METRICS_RESOLUTION")
    sinks: tuple[Callable[[CallContext], Any], ...] = Field(default=(), alias="SINKS")

    @field_validator("store_url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme not in STORE_SCHEMES:
            raise ValueError(
                "unknown store URL; use one of " + ", ".join(f"{s}://" for s in STORE_SCHEMES)
            )
        return url

    @field_validator("url_prefix")
    @classmethod
    def _prefix_shape(cls, prefix: str) -> str:
        if not _PREFIX_PATTERN.match(prefix):
            raise ValueError(
                "must start with '/', not end with '/', and use only letters, digits and "
                "'._~-' (e.g. '/ai-guard' or '/ops/ai')"
            )
        return prefix

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _strong_token(cls, token: Any, info: ValidationInfo) -> Any:
        if token is None:
            return None
        if info.data.get("metrics_auth") is not None:
            raise ValueError(
                "set AI_GUARD_METRICS_AUTH or AI_GUARD_METRICS_TOKEN, not both (a callable "
                "can check a token itself)"
            )
        text = token.get_secret_value() if isinstance(token, SecretStr) else token
        if not isinstance(text, str):
            raise ValueError("must be a string")
        if len(text) < _TOKEN_MIN_LENGTH or not _TOKEN_PATTERN.match(text):
            raise ValueError(
                f"must be at least {_TOKEN_MIN_LENGTH} visible ASCII characters without "
                "spaces (e.g. secrets.token_urlsafe(32))"
            )
        return text

    @field_validator("excluded_urls", mode="before")
    @classmethod
    def _regexes(cls, value: Any) -> Any:
        value = _split_list(value)
        if isinstance(value, (list, tuple)):
            for pattern in value:
                if not isinstance(pattern, str) or not pattern or "," in pattern:
                    raise ValueError("each entry must be a non-empty regex without a comma")
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return value

    @field_validator("critical_breakers", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        value = _split_list(value)
        if isinstance(value, (list, tuple)) and not all(
            isinstance(name, str) and name.strip() for name in value
        ):
            raise ValueError("each entry must be a breaker name or a pattern such as 'openai:*'")
        return value

    @field_validator("sinks", mode="before")
    @classmethod
    def _callables(cls, value: Any) -> Any:
        if callable(value):
            return (value,)
        return value


#: The keys the extension knows (without the prefix), e.g. ``"STORE_URL"``.
SETTING_NAMES: tuple[str, ...] = tuple(
    str(field.alias) for field in AIGuardSettings.model_fields.values()
)


def _json_setting(key: str, value: Any) -> Any:
    """A dict-valued setting may come as JSON text (an environment variable)."""
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise ConfigError(key, value, f"expected a mapping or JSON text: {exc}") from None
    return value


def load_settings(
    config: Mapping[str, Any], options: Mapping[str, Any] | None = None
) -> AIGuardSettings:
    """Validate the extension's settings: keyword ``options`` (lower-case names, e.g.
    ``url_prefix=``) are the defaults, ``AI_GUARD_*`` keys of ``config`` override them.

    An unknown ``AI_GUARD_*`` key (a typo) or a bad value raises
    :class:`~ai_guard.errors.ConfigError` whose ``setting`` is the ``AI_GUARD_*`` key.
    """
    values: dict[str, Any] = {}
    for name, value in (options or {}).items():
        alias = name.upper()
        if alias not in SETTING_NAMES:
            known = ", ".join(sorted(n.lower() for n in SETTING_NAMES))
            raise ConfigError(name, value, f"unknown AIGuard option; known: {known}")
        values[alias] = value
    for key, value in config.items():
        if not key.startswith(CONFIG_PREFIX):
            continue
        alias = key[len(CONFIG_PREFIX) :]
        if alias not in SETTING_NAMES:
            close = difflib.get_close_matches(
                key, [CONFIG_PREFIX + n for n in SETTING_NAMES], n=1, cutoff=0.75
            )
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(key, value, "unknown ai_guard setting" + hint)
        values[alias] = value
    # Nested settings are validated by their own modules, which name the inner field
    # (AI_GUARD_SLOS.availability, AI_GUARD_MODELS[0].tier).
    if "SLOS" in values:
        key = CONFIG_PREFIX + "SLOS"
        values["SLOS"] = slo_config(_json_setting(key, values["SLOS"]), setting=key)
    if values.get("MODELS") is not None:
        key = CONFIG_PREFIX + "MODELS"
        values["MODELS"] = parse_models(_json_setting(key, values["MODELS"]), setting=key)
    return build_config(AIGuardSettings, _prefix=CONFIG_PREFIX, **values)


# -- the per-request sinks -------------------------------------------------------------------


class SinkBindingMiddleware:
    """WSGI middleware binding an app's sinks for each request, response body included.

    Why at the WSGI level rather than in ``before_request``/``teardown_request``:
    :func:`~ai_guard.context.bind_sinks` sets a :class:`~contextvars.ContextVar`, and its
    token must be reset in the context that set it. Here every set and reset happen in
    the same Python frame (``try``/``finally``), so they always pair up, even when a hook
    fails or a server iterates the body elsewhere. A streamed body (a generator view,
    ``stream_with_context`` or not) runs after ``wsgi_app`` has returned; the iterable
    returned here binds the sinks again around each step and around ``close()``, so an AI
    call made while streaming is counted by the app too. A body that runs none of the
    app's code (a response built at once, nothing to call on close: most responses) is
    returned as it is. A ``wsgi.file_wrapper`` body (a
    file sent by ``send_file``) is passed through untouched so the server can still use
    ``sendfile``.
    """

    __slots__ = ("sinks", "wsgi_app")

    def __init__(self, wsgi_app: Callable[..., Any], sinks: tuple[Sink, ...]) -> None:
        self.wsgi_app = wsgi_app
        self.sinks = sinks

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        sinks = self.sinks
        token = _BOUND_SINKS.set(sinks)  # bind_sinks(*sinks), without its two calls
        try:
            body = self.wsgi_app(environ, start_response)
        finally:
            _BOUND_SINKS.reset(token)
        if _runs_no_app_code(body):
            return body
        file_wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(file_wrapper, type) and isinstance(body, file_wrapper):
            return body
        return _BoundBody(body, sinks)


def _runs_no_app_code(body: object) -> bool:
    """Whether iterating and closing ``body`` runs none of the app's code, so that it
    needs no sinks bound: Werkzeug's body of a response built at once (its ``response``
    a list of bytes, as ``jsonify``, a string or a dict give) with nothing registered by
    ``call_on_close``. Anything else (a generator, ``stream_with_context``, a custom
    iterable or response class, another Werkzeug version's internals) is wrapped. The
    check reads the final response, after every ``after_request`` function has run."""
    if type(body) is not ClosingIterator:
        return False
    callbacks = getattr(body, "_callbacks", None)
    if type(callbacks) is not list or not callbacks:
        return False
    *encoders, close = callbacks
    response = getattr(close, "__self__", None)
    if not (
        isinstance(response, WerkzeugResponse)
        and getattr(close, "__func__", None) is WerkzeugResponse.close
        and type(response.response) is list
        and getattr(response, "_on_close", None) == []
    ):
        return False
    # The generator Werkzeug encodes the list with: closing it runs Werkzeug's code only.
    for encoder_close in encoders:
        generator = getattr(encoder_close, "__self__", None)
        if getattr(generator, "gi_code", None) is not _ITER_ENCODED_CODE or generator is None:
            return False
    return True


#: The code of the generator Werkzeug encodes a response's list with (``None`` if this
#: Werkzeug has none by that name: then every body with such a generator is wrapped).
_ITER_ENCODED_CODE = getattr(getattr(_werkzeug_response, "_iter_encoded", None), "__code__", None)


class _BoundBody:
    """A response body whose iteration and ``close()`` run with the sinks bound (set and
    reset around each step, within one frame each time)."""

    __slots__ = ("_body", "_iterator", "_sinks")

    def __init__(self, body: Iterable[bytes], sinks: tuple[Sink, ...]) -> None:
        self._body = body
        self._iterator: Iterator[bytes] | None = None
        self._sinks = sinks

    def __iter__(self) -> _BoundBody:
        return self

    def __next__(self) -> bytes:
        token = _BOUND_SINKS.set(self._sinks)
        try:
            iterator = self._iterator
            if iterator is None:
                iterator = self._iterator = iter(self._body)
            for chunk in iterator:  # one step (a for loop ends without raising)
                return chunk
        finally:
            _BOUND_SINKS.reset(token)
        raise StopIteration

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if close is not None:
            token = _BOUND_SINKS.set(self._sinks)
            try:
                close()
            finally:
                _BOUND_SINKS.reset(token)


# -- breaker transitions ----------------------------------------------------------------------


class _TransitionFeed:
    """Registry of the live app states, fed by one breaker-registry listener per process.

    Breakers are process-wide (the default registry), so every app in the process sees
    every transition; each app keeps its own bounded ring for its dashboard.
    """

    __slots__ = ("lock", "states")

    def __init__(self) -> None:
        self.states: weakref.WeakSet[AIGuardState] = weakref.WeakSet()
        self.lock = threading.Lock()

    def subscribe(self, state: AIGuardState) -> None:
        with self.lock:
            self.states.add(state)
        # Idempotent: the registry keeps a listener once, however often an app starts.
        registry = default_registry()
        registry.add_listener(breaker_span_event)
        registry.add_listener(self.publish)

    def publish(self, event: BreakerEvent) -> None:
        with self.lock:
            states = list(self.states)
        for state in states:
            state.record_transition(event)


_FEED = _TransitionFeed()


# -- the per-app state ----------------------------------------------------------------------


class AIGuardState:
    """What the extension keeps for one app, in ``app.extensions["ai_guard"]``.

    - ``config``: the validated :class:`AIGuardSettings`;
    - ``store``: the app's :class:`~ai_guard.stores.Store` (``@idempotent()`` views use it);
    - ``collector``: the app's :class:`~ai_guard.metrics.MetricsCollector`;
    - ``sinks``: what an AI call made during one of the app's requests is emitted to;
    - ``transitions``: the last :data:`TRANSITIONS_KEPT` breaker state changes.
    """

    def __init__(
        self,
        *,
        config: AIGuardSettings,
        store: Store,
        collector: MetricsCollector,
        sinks: tuple[Sink, ...],
    ) -> None:
        self.config = config
        self.store = store
        self.collector = collector
        self.sinks = sinks
        self.transitions: deque[BreakerEvent] = deque(maxlen=TRANSITIONS_KEPT)
        self._transition_counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._guarded_views: dict[object, Callable[..., Any]] = {}
        self.open_access_warned = False

    @property
    def url_prefix(self) -> str:
        return self.config.url_prefix

    # -- breakers ---------------------------------------------------------------------------

    def breakers(self) -> list[CircuitBreaker]:
        """Every breaker of the process's registry, ordered by name."""
        return all_breakers()

    def is_critical(self, name: str) -> bool:
        """Whether ``name`` matches an entry of ``AI_GUARD_CRITICAL_BREAKERS``."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.config.critical_breakers)

    def record_transition(self, event: BreakerEvent) -> None:
        """Keep ``event`` for the dashboard (the breaker-registry listener calls it)."""
        with self._lock:
            self.transitions.append(event)
            key = (event.breaker, event.to_state.value)
            self._transition_counts[key] = self._transition_counts.get(key, 0) + 1

    def transition_count(self, breaker: str, to_state: str) -> int:
        """How often ``breaker`` entered ``to_state`` since the app started."""
        return self._transition_counts.get((breaker, to_state), 0)

    def recent_transitions(self) -> list[dict[str, Any]]:
        """The kept transitions, newest first, JSON-ready."""
        with self._lock:
            events = list(self.transitions)
        return [
            {
                "breaker": event.breaker,
                "from_state": event.from_state.value,
                "to_state": event.to_state.value,
                "at": event.at,
                "reason": event.reason,
                "failures": event.failures,
                "retry_after": event.retry_after,
                "source": event.source,
            }
            for event in reversed(events)
        ]

    def health(self) -> tuple[dict[str, Any], int]:
        """The health document and its HTTP status: 503 when a critical breaker is open.

        ``status`` is ``"unavailable"`` (a critical breaker is open), ``"degraded"``
        (another breaker is open or half-open, or its state cannot be read) or ``"ok"``.
        """
        entries: list[dict[str, Any]] = []
        critical_open: list[str] = []
        degraded = False
        seen: set[str] = set()
        for breaker in self.breakers():
            critical = self.is_critical(breaker.name)
            seen.add(breaker.name)
            metrics: dict[str, Any] | None = None
            error: str | None = None
            try:
                metrics = breaker.metrics().as_dict()
            except AIGuardError as exc:  # a shared store that cannot be read
                state, error = "unknown", str(exc)
            else:
                state = str(metrics["state"])
            if state == "open" and critical:
                critical_open.append(breaker.name)
            if state != "closed":
                degraded = True
            entry: dict[str, Any] = {
                "name": breaker.name,
                "state": state,
                "critical": critical,
                "metrics": metrics,
            }
            if error is not None:
                entry["error"] = error
            entries.append(entry)
        missing = [
            pattern
            for pattern in self.config.critical_breakers
            if not any(fnmatch.fnmatchcase(name, pattern) for name in seen)
        ]
        status = "unavailable" if critical_open else "degraded" if degraded else "ok"
        body = {
            "status": status,
            "critical_open": critical_open,
            # A critical breaker nobody created yet has seen no call: not a failure.
            "critical_not_created": missing,
            "breakers": entries,
        }
        return body, 503 if critical_open else 200

    # -- idempotent views ---------------------------------------------------------------------

    def guarded_view(
        self, marker: object, view: Callable[..., Any], options: Mapping[str, Any]
    ) -> Callable[..., Any]:
        """``view`` under ``@idempotent`` with this app's store and TTL, built once per
        (decorated view, app)."""
        guarded = self._guarded_views.get(marker)
        if guarded is None:
            settings = {"ttl": self.config.idempotency_ttl, **options}
            built = _idempotent(self.store, **settings)(view)
            with self._lock:
                guarded = self._guarded_views.setdefault(marker, built)
        return guarded

    def __repr__(self) -> str:
        return (
            f"AIGuardState(prefix={self.url_prefix!r}, store={self.store!r}, "
            f"collector={self.collector!r})"
        )


def current_state(app: Flask | None = None) -> AIGuardState:
    """The :class:`AIGuardState` of ``app`` (default: ``current_app``)."""
    target = app if app is not None else current_app
    state = target.extensions.get(EXTENSION_KEY)
    if not isinstance(state, AIGuardState):
        raise RuntimeError(
            f"the ai_guard extension is not initialised on app {target.name!r}: call "
            "AIGuard(app) or AIGuard().init_app(app) first"
        )
    return state


# -- the extension ----------------------------------------------------------------------------

_OBJECT_OPTIONS = frozenset({"store", "collector"})


class AIGuard:
    """The Flask extension: ``AIGuard(app)`` or ``ext = AIGuard(); ext.init_app(app)``.

    ``options`` are the settings of :class:`AIGuardSettings` in lower case
    (``url_prefix="/ops/ai"``, ``metrics_token=...``), plus two objects:

    - ``store``: a :class:`~ai_guard.stores.Store` (or a store URL) to use instead of
      building one from ``AI_GUARD_STORE_URL``;
    - ``collector``: a :class:`~ai_guard.metrics.MetricsCollector` to use instead of a new
      one per app (then ``AI_GUARD_SLOS`` / ``AI_GUARD_MODELS`` belong on the collector).

    **Precedence**: keyword options are defaults for every app this extension
    initialises; an ``AI_GUARD_*`` key in an app's ``config`` overrides the matching
    option for that app (so deployments change settings without code changes). A
    ``store`` object is used unless the app's config sets ``AI_GUARD_STORE_URL``.

    ::

        ext = AIGuard(url_prefix="/ops/ai")

        def create_app() -> Flask:
            app = Flask(__name__)
            app.config["AI_GUARD_STORE_URL"] = "redis://127.0.0.1:6379/0"
            ext.init_app(app)
            return app

        @app.post("/answers")
        @ext.idempotent()
        def answer(): ...
    """

    def __init__(self, app: Flask | None = None, **options: Any) -> None:
        store = options.get("store")
        if store is not None and not isinstance(store, (Store, str)):
            raise ConfigError("store", store, "must be a Store or a store URL")
        collector = options.get("collector")
        if collector is not None and not isinstance(collector, MetricsCollector):
            raise ConfigError("collector", collector, "must be an ai_guard MetricsCollector")
        self._options = dict(options)
        # Unknown option names fail here, at construction, not at the first init_app.
        load_settings({}, self._setting_options())
        if app is not None:
            self.init_app(app)

    def _setting_options(self) -> dict[str, Any]:
        options = {k: v for k, v in self._options.items() if k not in _OBJECT_OPTIONS}
        store = self._options.get("store")
        if isinstance(store, str):
            options.setdefault("store_url", store)
        elif isinstance(store, Store) and "store_url" not in options:
            options["store_url"] = store.url
        return options

    def init_app(self, app: Flask) -> None:
        """Wire ai_guard into ``app`` (see the module documentation)."""
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"AIGuard is already initialised on app {app.name!r}; call init_app once"
            )
        settings = load_settings(app.config, self._setting_options())
        store = self._store_for(app, settings)
        collector = self._collector_for(app, settings)
        sinks: tuple[Sink, ...] = (collector.record_call, log_call)
        from ai_guard.prometheus import default_prometheus_sink, multiprocess_mode

        if multiprocess_mode():
            # The process's one Prometheus sink writes the shared files every worker's
            # scrape reads (binding it in several apps never counts a call twice).
            sinks += (default_prometheus_sink(),)
        sinks += settings.sinks
        state = AIGuardState(config=settings, store=store, collector=collector, sinks=sinks)
        app.extensions[EXTENSION_KEY] = state
        app.wsgi_app = SinkBindingMiddleware(app.wsgi_app, sinks)  # type: ignore[method-assign]

        from ai_guard.flask._blueprint import make_blueprint

        app.register_blueprint(make_blueprint(), url_prefix=settings.url_prefix)
        if settings.tracing:
            _instrument(app, settings)
        _FEED.subscribe(state)

    def _store_for(self, app: Flask, settings: AIGuardSettings) -> Store:
        given = self._options.get("store")
        if isinstance(given, Store) and CONFIG_PREFIX + "STORE_URL" not in app.config:
            return given
        try:
            return store_from_url(settings.store_url)
        except ConfigError as exc:
            raise ConfigError(CONFIG_PREFIX + "STORE_URL", settings.store_url, exc.reason) from None

    def _collector_for(self, app: Flask, settings: AIGuardSettings) -> MetricsCollector:
        given = self._options.get("collector")
        if isinstance(given, MetricsCollector):
            for name in ("SLOS", "MODELS", "METRICS_RESOLUTION"):
                key = CONFIG_PREFIX + name
                if key in app.config or name.lower() in self._options:
                    raise ConfigError(
                        key,
                        app.config.get(key, self._options.get(name.lower())),
                        "a collector= was given: configure its SLOs, models and resolution on it",
                    )
            collector = given
        else:
            try:
                collector = MetricsCollector(
                    catalog=settings.models,
                    slos=settings.slos,
                    resolution=settings.metrics_resolution,
                )
            except ConfigError as exc:
                raise ConfigError(
                    CONFIG_PREFIX + "METRICS_RESOLUTION", settings.metrics_resolution, exc.reason
                ) from None
        try:
            collector.report(settings.dashboard_window)
        except ValueError as exc:
            raise ConfigError(
                CONFIG_PREFIX + "DASHBOARD_WINDOW", settings.dashboard_window, str(exc)
            ) from None
        return collector

    @staticmethod
    def state(app: Flask | None = None) -> AIGuardState:
        """The state of ``app`` (default: ``current_app``); see :func:`current_state`."""
        return current_state(app)

    def idempotent(self, **options: Any) -> Callable[[Callable[P, R]], Callable[P, R]]:
        """``@idempotent()`` for a view, with the current app's store and
        ``AI_GUARD_IDEMPOTENCY_TTL`` as the default ``ttl``; ``options`` are those of
        :func:`ai_guard.idempotency.idempotent` (``required``, ``scope``, ``ttl``...),
        validated now. A plain ``@idempotent()`` on a view also uses the app's store,
        with its own TTL (24 h)."""
        for name in ("store", "key"):
            if name in options:
                raise ConfigError(
                    name,
                    options[name],
                    "ext.idempotent() guards views with the app's store; use "
                    "ai_guard.idempotency.idempotent(...) for another store or a function",
                )
        _idempotent(None, **options)  # a bad option fails at decoration time

        def decorate(view: Callable[P, R]) -> Callable[P, R]:
            marker = object()

            @functools.wraps(view)
            def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
                state = current_app.extensions.get(EXTENSION_KEY)
                if not isinstance(state, AIGuardState):
                    state = current_state()  # raises, naming the app
                built = state._guarded_views.get(marker)  # built once per app, then reused
                if built is None:
                    built = state.guarded_view(marker, view, options)
                return cast(R, built(*args, **kwargs))

            return guarded

        return decorate


def own_urls_pattern(prefix: str) -> str:
    """The regex (``excluded_urls`` syntax: matched against the full URL) of the
    blueprint's URLs, so scrapes and dashboard refreshes make no request spans."""
    return r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*" + re.escape(prefix) + r"(/|\?|$)"


def _instrument(app: Flask, settings: AIGuardSettings) -> None:
    if getattr(app, "_is_instrumented_by_opentelemetry", False):
        # FlaskInstrumentor().instrument() (or the user) got there first: instrumenting
        # twice would make two request spans per request.
        _log.info(
            "app %r is already instrumented by OpenTelemetry; ai_guard leaves it as it is",
            app.name,
        )
        return
    try:
        from opentelemetry.instrumentation.flask import FlaskInstrumentor
    except ImportError as exc:  # pragma: no cover - the flask extra installs it
        raise ConfigError(
            CONFIG_PREFIX + "TRACING",
            True,
            f"needs opentelemetry-instrumentation-flask (pip install 'ai_guard[flask]'), "
            f"or set AI_GUARD_TRACING=False ({exc})",
        ) from None
    excluded = ",".join((own_urls_pattern(settings.url_prefix), *settings.excluded_urls))
    FlaskInstrumentor().instrument_app(  # type: ignore[no-untyped-call]
        app, excluded_urls=excluded, tracer_provider=settings.tracer_provider
    )
