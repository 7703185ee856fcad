"""Circuit breaker: stop calling an upstream that keeps failing, try it again later.

``CircuitBreaker`` counts failures in a **sliding time window** (default: 5 failures in
60 s), optionally a failure **rate** over the window once ``minimum_calls`` calls were
seen, and calls slower than ``slow_call_duration`` as failures. When it trips it is
**open** for ``timeout`` seconds (30 s): calls are not made, they raise
:class:`~ai_guard.errors.CircuitOpenError` (or return ``fallback(exc, *args, **kwargs)``).
Then it is **half-open**: at most ``half_open_max_calls`` trial calls run at once (the
rest are rejected at once, not queued); ``success_threshold`` successes (2) close it, any
failure re-opens it for a fresh ``timeout``.

Data flow of one call through ``@breaker``::

    closed?  ── yes ──> run fn (no lock held) ──> success: one atomic count
      │                                       └─> failure: lock, count in window, maybe open
      no ──> open and before the deadline? ──> CircuitOpenError / fallback (no lock)
             otherwise: lock, take one of the half-open trial permits or reject

No lock is ever held while the user's function runs. In the closed state the hot path is
an attribute read, the function call, a clock read and one ``next()`` on an
:func:`itertools.count`; locks are taken only to count a failure and, once per window
bucket, to roll the window forward.

The window is a ring of ``window_buckets`` (60) time buckets: with the default 60 s window
the granularity is 1 s, and an outcome counts for at least ``window`` seconds and at most
``window + window / window_buckets`` (see :mod:`ai_guard._breaker_window`). Every state
change starts a fresh window.

Outcomes:

- an exception that is an instance of ``ignore`` counts as nothing (and gives a half-open
  permit back); else one that is an instance of ``record`` (default ``Exception``) is a
  failure; any other ``Exception`` is a success (the upstream answered, the error is the
  caller's, as in Resilience4j); a ``BaseException`` such as ``KeyboardInterrupt`` counts
  as nothing;
- a returned result for which ``failure_predicate(result)`` is true is a failure, and is
  still returned to the caller;
- a call that takes longer than ``slow_call_duration`` (on the breaker's clock) is a
  failure even when it returned;
- a generator result (a stream) is settled when the stream ends: an exception while
  iterating is classified as above, a stream closed early counts as nothing; slow-call
  and predicate rules do not apply to streams.

Outcomes of calls admitted before the breaker last changed state (a long call that
started while closed and ends after the circuit opened) do not move the state.

Thresholds: with ``failure_rate_threshold`` set (a fraction in (0, 1]: ``0.5`` is 50 %),
the breaker trips when the failure rate over the window reaches it, once the window holds
at least ``minimum_calls`` calls; ``failure_threshold`` is then unused (giving it a value
other than its default is a :class:`~ai_guard.errors.ConfigError`).

Per-call context: inside an AI call (``@traced_ai``, ``@routed``, the client), the
breaker writes ``ctx.breaker`` and ``ctx.circuit_state`` (the state in which the call was
admitted or rejected). A breaker placed *outside* ``@traced_ai`` runs before the span
exists and does not appear on it; used alone (around a database call) it writes nothing
and emits nothing.

Shared state (``store=``, a :class:`~ai_guard.stores.Store` or a URL such as
``redis://127.0.0.1:6379/0``): the open state and its deadline (wall clock), the
half-open trial permits and, when a count threshold is set, the failures in the window
live in the store, changed by atomic scripts; a process that sees the circuit open does
not call the upstream. Each process reads the shared state at most once per
``sync_interval`` seconds (default 1 s) while closed: a circuit opened by another process
is seen within that time (sooner if this process sees a failure, since every failure is
reported to the store and its answer read). ``sync_interval=0`` reads it on every call,
one store round trip per call. Failure *rates* are evaluated per process (sharing them
would put the store on every successful call); a process that trips on its rate opens
the shared circuit. The state lives under the key ``breaker:<name>`` (after the store's
prefix), so breakers with the same name and store are one circuit. A memory store
(``memory://``) lives in one process: it makes one circuit of the breakers of that
process on the same store (two registries, two apps), and the event reasons say so
(``"5 failures in 60s"`` where Redis gives ``"5 failures in 60s across processes"``).
Deadlines are wall-clock times: hosts sharing a breaker should keep their clocks in sync
(NTP); a skew moves the next trial call by that much. If the store cannot be reached, the
breaker logs one WARNING and decides on this process's own state
(``on_store_error="local"``, the default) or rejects every call (``"reject"``) until the
store answers again (tried every ``store_retry_interval`` seconds); a circuit it opened
alone meanwhile is then handed to the store.
"""

from __future__ import annotations

import functools
import inspect
import logging
import string
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from enum import Enum
from types import GeneratorType
from typing import Any, Literal, ParamSpec, TypeVar, cast
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator

from ai_guard._breaker_shared import (
    OUTCOME_FAILURE,
    OUTCOME_IGNORED,
    OUTCOME_SUCCESS,
    SharedCircuit,
    SharedView,
)
from ai_guard._breaker_window import SlidingWindow, Tally
from ai_guard.clock import SYSTEM_CLOCK, Clock, SystemClock
from ai_guard.config import GuardConfig, build_config
from ai_guard.context import current_call
from ai_guard.errors import CircuitOpenError, ConfigError, StoreError
from ai_guard.stores import RedisStore, Store, resolve_store, store_from_url

__all__ = [
    "MAX_TEMPLATE_BREAKERS",
    "OVERFLOW_VALUE",
    "BreakerConfig",
    "BreakerDecorator",
    "BreakerEvent",
    "BreakerListener",
    "BreakerMetrics",
    "BreakerRegistry",
    "BreakerTemplate",
    "CircuitBreaker",
    "CircuitState",
    "all_breakers",
    "circuit_breaker",
    "default_registry",
    "get_breaker",
]

P = ParamSpec("P")
R = TypeVar("R")

_log = logging.getLogger("ai_guard.breaker")


class CircuitState(str, Enum):
    """The state of a circuit; a ``str``, so ``breaker.state == "open"`` holds."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __str__(self) -> str:
        return self.value


CLOSED = CircuitState.CLOSED
OPEN = CircuitState.OPEN
HALF_OPEN = CircuitState.HALF_OPEN
_FROM_SHARED = {"c": CLOSED, "o": OPEN, "h": HALF_OPEN}

# Outcomes of one call.
_SUCCESS, _FAILURE, _IGNORED = 0, 1, 2
_TO_SHARED_OUTCOME = {
    _SUCCESS: OUTCOME_SUCCESS,
    _FAILURE: OUTCOME_FAILURE,
    _IGNORED: OUTCOME_IGNORED,
}
# How a call was admitted.
_REJECT, _ADMIT_CLOSED, _ADMIT_TRIAL, _ADMIT_SHARED_TRIAL = 0, 1, 2, 3
_REJECTED = (_REJECT, 0)

_MISSING: Any = object()


# -- configuration -----------------------------------------------------------------------


class BreakerConfig(GuardConfig):
    """The settings of one breaker, validated once at construction.

    Every setting is a keyword of :class:`CircuitBreaker`; a bad value raises
    :class:`~ai_guard.errors.ConfigError` naming it.
    """

    name: str = Field(min_length=1)
    #: Failure rate in (0, 1] (0.5 = 50 %) over the window that opens the circuit.
    failure_rate_threshold: float | None = None
    #: Failures inside ``window`` that open the circuit (unused with a rate threshold).
    failure_threshold: int = Field(default=5, ge=1)
    #: Successful trial calls in half-open that close the circuit.
    success_threshold: int = Field(default=2, ge=1)
    #: Seconds the circuit stays open before trial calls are admitted.
    timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    #: Seconds of the sliding window failures (and calls) are counted in: at least a
    #: millisecond (a subnormal window made its bucket arithmetic overflow).
    window: float = Field(default=60.0, ge=0.001, allow_inf_nan=False)
    #: Calls needed in the window before the failure rate is evaluated.
    minimum_calls: int = Field(default=10, ge=1)
    #: Seconds after which a call counts as a failure even when it returned.
    slow_call_duration: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    #: Trial calls allowed at once in half-open (default: ``success_threshold``).
    half_open_max_calls: int | None = Field(default=None, ge=1)
    #: Exceptions that count as failures.
    record: tuple[type[BaseException], ...] = (Exception,)
    #: Exceptions that count as nothing (checked before ``record``).
    ignore: tuple[type[BaseException], ...] = ()
    #: ``failure_predicate(result) -> bool``: a returned result that counts as a failure.
    failure_predicate: Callable[[Any], Any] | None = None
    #: ``fallback(exc, *args, **kwargs)``: called instead of raising when open.
    fallback: Callable[..., Any] | None = None
    #: A :class:`~ai_guard.stores.Store` or store URL to share the state across processes.
    store: Any = None
    clock: Any = SYSTEM_CLOCK
    #: Buckets of the sliding window; granularity is ``window / window_buckets`` seconds.
    window_buckets: int = Field(default=60, ge=1, le=3600)
    #: Seconds between two reads of the shared state while closed (0: every call).
    sync_interval: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    #: What to do when the store cannot be reached: decide locally, or reject calls.
    on_store_error: Literal["local", "reject"] = "local"
    #: Seconds between two attempts to reach an unavailable store.
    store_retry_interval: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    #: Seconds after which a half-open trial permit whose call never reported is given
    #: back (its process died, its stream was never read); default ``max(timeout, 60)``.
    trial_lease: float | None = Field(default=None, gt=0, allow_inf_nan=False)

    @field_validator(
        "failure_threshold",
        "success_threshold",
        "minimum_calls",
        "half_open_max_calls",
        "window_buckets",
        mode="before",
    )
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be an integer, not a bool")
        return value

    @field_validator("failure_rate_threshold")
    @classmethod
    def _fraction(cls, value: float | None) -> float | None:
        if value is None:
            return None
        if not 0.0 < value <= 1.0:
            raise ValueError("must be a fraction in (0, 1]: 0.5 means 50 %")
        return value

    @field_validator("record", "ignore", mode="before")
    @classmethod
    def _exception_tuple(cls, value: Any) -> Any:
        if isinstance(value, type):
            return (value,)
        return value

    @field_validator("store")
    @classmethod
    def _store(cls, value: Any) -> Any:
        if value is None or isinstance(value, (str, Store)):
            return value
        raise ValueError("must be a Store, a store URL such as 'redis://host:6379/0', or None")

    @field_validator("clock")
    @classmethod
    def _clock(cls, value: Any) -> Any:
        if not isinstance(value, Clock):
            raise ValueError("must provide monotonic(), time() and sleep()")
        return value

    @field_validator("failure_threshold")
    @classmethod
    def _one_kind_of_threshold(cls, value: int, info: ValidationInfo) -> int:
        if info.data.get("failure_rate_threshold") is not None and value != 5:
            raise ValueError(
                "has no effect when failure_rate_threshold is set (the rate, over at least "
                "minimum_calls calls, decides)"
            )
        return value

    @property
    def count_threshold(self) -> int | None:
        """The failure count that opens the circuit, ``None`` when the rate decides."""
        return self.failure_threshold if self.failure_rate_threshold is None else None

    @property
    def max_trial_calls(self) -> int:
        """Trial calls admitted at once in half-open."""
        return self.half_open_max_calls or self.success_threshold


def _first_difference(existing: BreakerConfig, new: BreakerConfig) -> str | None:
    for field in BreakerConfig.model_fields:
        if field != "name" and not _same_setting(
            field, getattr(existing, field), getattr(new, field)
        ):
            return field
    return None


def _same_setting(field: str, existing: Any, new: Any) -> bool:
    """Whether two values of one breaker setting configure the same breaker.

    Callables (``fallback``, ``failure_predicate``) and clocks are compared by identity: a
    :class:`~ai_guard.testing.FakeClock` is state of its own. Every
    :class:`~ai_guard.clock.SystemClock` is the same real clock. Stores are compared by
    what they address (:func:`_store_address`).
    """
    if existing is new or existing == new:
        return True
    if field == "store":
        return bool(_store_address(existing) == _store_address(new))
    if field == "clock":
        return isinstance(existing, SystemClock) and isinstance(new, SystemClock)
    return False


def _store_address(store: Store | str | None) -> object:
    """What a ``store=`` value addresses, to compare two settings of one breaker.

    A Redis store is its server, database and key prefix: two ``RedisStore`` objects built
    from one URL (two apps, two clients) hold the same shared state. Any other store is
    itself: two memory stores are two separate states. A URL is what the store built from
    it would address (a ``memory://`` URL, its text).
    """
    if isinstance(store, str):
        if urlsplit(store).scheme == "memory":
            return store
        resolved = store_from_url(store)  # redis-py connects lazily: no round trip here
        try:
            return _store_address(resolved)
        finally:
            resolved.close()
    if isinstance(store, RedisStore):
        pool = getattr(store.client, "connection_pool", None)
        kwargs = getattr(pool, "connection_kwargs", None)
        # The connection's own settings when there are any (a store given ``client=``
        # has only the default URL), else the URL.
        where: object = store.url
        if isinstance(kwargs, dict):
            db = int(kwargs.get("db") or 0)
            if kwargs.get("path"):
                where = ("unix", kwargs["path"], db)
            else:  # redis-py's defaults: "redis://h/0" is "redis://h:6379/0"
                where = (kwargs.get("host") or "localhost", int(kwargs.get("port") or 6379), db)
        return (type(store), where, store.key_prefix)
    return store


# -- events and figures ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """One state change of a breaker, as given to listeners.

    ``at`` is wall-clock time; ``reason`` says why in words (``"5 failures in 60s"``);
    ``failures`` and ``failure_rate`` describe the window at the moment of the change;
    ``retry_after`` is the open time left (0 unless ``to_state`` is open); ``source`` is
    ``"local"`` when this breaker made the change, ``"store"`` when it observed a change
    made through the shared store by another process (with a memory store: by another
    breaker of this process on the same store).
    """

    breaker: str
    from_state: CircuitState
    to_state: CircuitState
    at: float
    reason: str
    failures: int = 0
    failure_rate: float | None = None
    retry_after: float = 0.0
    source: str = "local"


BreakerListener = Callable[[BreakerEvent], None]


@dataclass(frozen=True, slots=True)
class BreakerMetrics:
    """A snapshot of one breaker for health endpoints and dashboards.

    Window figures cover the current sliding window (``window`` seconds, emptied on every
    state change); ``successes``, ``failures``, ``rejected`` and ``ignored`` count since
    the breaker was created or last reset. ``opened_at`` and ``next_trial_at`` are wall
    times, ``None`` unless the circuit is open or half-open.
    """

    name: str
    state: CircuitState
    failures_in_window: int
    successes_in_window: int
    slow_calls_in_window: int
    calls_in_window: int
    failure_rate: float
    successes: int
    failures: int
    rejected: int
    ignored: int
    trial_calls_in_flight: int
    trial_successes: int
    opened_at: float | None
    next_trial_at: float | None
    retry_after: float
    window: float
    shared: bool
    store_available: bool | None = None
    shared_failures_in_window: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the state as its string value."""
        data = asdict(self)
        data["state"] = self.state.value
        return data


# -- what circuit_breaker() returns --------------------------------------------------------


class BreakerDecorator(ABC):
    """What :func:`circuit_breaker` returns: a :class:`CircuitBreaker` or a
    :class:`BreakerTemplate`. One type (not a union) so that type checkers see
    ``@circuit_breaker(...)`` as a typed decorator that keeps the function's signature."""

    __slots__ = ()

    @abstractmethod
    def __call__(self, fn: Callable[P, R], /) -> Callable[P, R]:
        """Decorate ``fn`` so that every call goes through the breaker."""

    @abstractmethod
    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` through the breaker."""


# -- the registry ------------------------------------------------------------------------


class BreakerRegistry:
    """Named breakers, so a health endpoint can list them and modules can share them.

    ``get_or_create(name, **options)`` returns the breaker of that name, creating it with
    ``options`` the first time. Asking again with *no* options returns it whatever its
    options; asking with options that differ from the existing breaker's raises
    :class:`~ai_guard.errors.ConfigError` naming the first differing setting (so configure
    a breaker where it is first created). Registry listeners hear every state change of
    every breaker in the registry (metrics and tracing subscribe here). Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._breakers: dict[str, CircuitBreaker] = {}
        self._templates: dict[str, BreakerTemplate] = {}
        self.listeners: tuple[BreakerListener, ...] = ()

    def get(self, name: str) -> CircuitBreaker | None:
        """The breaker named ``name``, or ``None``."""
        return self._breakers.get(name)

    def get_or_create(self, name: str, **options: Any) -> CircuitBreaker:
        """The breaker named ``name``; created with ``options`` if there is none."""
        with self._lock:
            existing = self._breakers.get(name)
            if existing is None:
                build_config(BreakerConfig, name=name, **options)  # ConfigError, not TypeError
                breaker = CircuitBreaker(name, registry=None, **options)
                breaker._registry = self
                self._breakers[name] = breaker
                return breaker
        if options:
            _same_options(name, existing.config, build_config(BreakerConfig, name=name, **options))
        return existing

    def template(self, template: str, **options: Any) -> BreakerTemplate:
        """The breaker template ``template`` (``"openai:{model}"``), created with
        ``options`` if there is none; same rule for differing options as
        :meth:`get_or_create`."""
        with self._lock:
            existing = self._templates.get(template)
            if existing is None:
                created = BreakerTemplate(template, self, options)
                self._templates[template] = created
                return created
        if options:
            new = build_config(BreakerConfig, name=template, **options)
            _same_options(template, existing.config, new)
        return existing

    def register(self, breaker: CircuitBreaker) -> None:
        """Put ``breaker`` under its name, replacing any breaker of that name."""
        with self._lock:
            self._breakers[breaker.name] = breaker
            breaker._registry = self

    def remove(self, name: str) -> bool:
        """Forget the breaker named ``name``; ``True`` if there was one.

        A template of this registry that made it forgets it too: its next call naming that
        value gets a new breaker (closed, counts empty), registered under the same name.
        """
        with self._lock:
            removed = self._breakers.pop(name, None)
            templates = list(self._templates.values())
        # Outside the registry's lock: a template takes its own lock, then the registry's.
        for family in templates:
            family._forget(name)
        return removed is not None

    def templates(self) -> list[BreakerTemplate]:
        """Every breaker template of this registry, ordered by template."""
        with self._lock:
            return [self._templates[t] for t in sorted(self._templates)]

    def remove_template(self, template: BreakerTemplate | str) -> bool:
        """Forget a breaker template (the object, or the one registered under that text)
        and the breakers it made; ``True`` if the registry held it.

        Asking for the template again then creates a new one, with new options if given.
        Functions already decorated with the old template keep calling through it and its
        breakers, which the registry (and so the health endpoint) no longer lists.
        """
        text = template if isinstance(template, str) else template.template
        with self._lock:
            held = self._templates.get(text)
            if held is None or (isinstance(template, BreakerTemplate) and held is not template):
                return False
            del self._templates[text]
        made = held._made()  # the template's lock, not within the registry's
        with self._lock:
            for breaker in made:
                if self._breakers.get(breaker.name) is breaker:
                    del self._breakers[breaker.name]
        return True

    def all(self) -> list[CircuitBreaker]:
        """Every registered breaker, ordered by name."""
        with self._lock:
            return [self._breakers[n] for n in sorted(self._breakers)]

    def metrics(self) -> dict[str, BreakerMetrics]:
        """``name -> breaker.metrics()`` for every registered breaker."""
        return {b.name: b.metrics() for b in self.all()}

    def clear(self) -> None:
        """Forget every breaker and template (tests)."""
        with self._lock:
            self._breakers.clear()
            self._templates.clear()

    def add_listener(self, listener: BreakerListener) -> None:
        """Hear every state change of every breaker in this registry."""
        with self._lock:
            if listener not in self.listeners:
                self.listeners = (*self.listeners, listener)

    def remove_listener(self, listener: BreakerListener) -> None:
        """Stop hearing state changes (no error when absent)."""
        with self._lock:
            self.listeners = tuple(x for x in self.listeners if x != listener)

    def __contains__(self, name: object) -> bool:
        return name in self._breakers

    def __len__(self) -> int:
        return len(self._breakers)

    def __repr__(self) -> str:
        return f"BreakerRegistry({sorted(self._breakers)!r})"


_DEFAULT_REGISTRY = BreakerRegistry()


# -- the breaker -------------------------------------------------------------------------


class CircuitBreaker(BreakerDecorator):
    """A named circuit breaker; use it as ``@breaker``, ``breaker.call(fn, ...)``.

    Settings are the fields of :class:`BreakerConfig` (see the module documentation for
    what counts as a failure)::

        breaker = CircuitBreaker("openai", failure_threshold=5, timeout=30)

        @breaker
        def ask(prompt: str) -> str: ...

        try:
            ask("hi")
        except CircuitOpenError as exc:
            print(f"{exc.name} is down, retry in {exc.retry_after:.0f}s")

    The breaker enters ``registry`` (the default registry unless ``registry=None``) under
    its name, replacing a breaker of the same name there: use :func:`circuit_breaker` or
    :func:`get_breaker` to share one breaker between modules.

    Beyond the contract's options: ``clock`` (a :class:`~ai_guard.clock.Clock`, for
    tests), ``window_buckets`` (window granularity), ``sync_interval``,
    ``on_store_error``, ``store_retry_interval`` and ``trial_lease`` (shared state, see
    the module documentation) and ``registry``.
    """

    __slots__ = (
        "__weakref__",
        "_bucket_end",
        "_clock",
        "_closed_epoch",
        "_count_threshold",
        "_epoch",
        "_failures_total",
        "_fallback",
        "_first_sync_lock",
        "_ignore",
        "_ignored",
        "_inspect_results",
        "_listeners",
        "_lock",
        "_max_trials",
        "_monotonic",
        "_open_until",
        "_opened_at",
        "_predicate",
        "_rate",
        "_rate_armed",
        "_record",
        "_registry",
        "_rejected",
        "_shared",
        "_slow_limit",
        "_state",
        "_store_down",
        "_store_retry_due",
        "_success_counter",
        "_successes",
        "_sync_due",
        "_synced",
        "_trial_lease",
        "_trial_lease_until",
        "_trial_successes",
        "_trial_successes_total",
        "_trials_in_flight",
        "_window",
        "config",
        "name",
    )

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        success_threshold: int = 2,
        timeout: float = 30.0,
        window: float = 60.0,
        failure_rate_threshold: float | None = None,
        minimum_calls: int = 10,
        slow_call_duration: float | None = None,
        half_open_max_calls: int | None = None,
        record: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        ignore: type[BaseException] | tuple[type[BaseException], ...] = (),
        failure_predicate: Callable[[Any], Any] | None = None,
        fallback: Callable[..., Any] | None = None,
        store: Store | str | None = None,
        clock: Clock = SYSTEM_CLOCK,
        window_buckets: int = 60,
        sync_interval: float = 1.0,
        on_store_error: Literal["local", "reject"] = "local",
        store_retry_interval: float = 5.0,
        trial_lease: float | None = None,
        registry: BreakerRegistry | None = _DEFAULT_REGISTRY,
    ) -> None:
        config = build_config(
            BreakerConfig,
            name=name,
            failure_threshold=failure_threshold,
            success_threshold=success_threshold,
            timeout=timeout,
            window=window,
            failure_rate_threshold=failure_rate_threshold,
            minimum_calls=minimum_calls,
            slow_call_duration=slow_call_duration,
            half_open_max_calls=half_open_max_calls,
            record=record,
            ignore=ignore,
            failure_predicate=failure_predicate,
            fallback=fallback,
            store=store,
            clock=clock,
            window_buckets=window_buckets,
            sync_interval=sync_interval,
            on_store_error=on_store_error,
            store_retry_interval=store_retry_interval,
            trial_lease=trial_lease,
        )
        self.config = config
        self.name = config.name
        self._clock: Clock = config.clock
        self._monotonic: Callable[[], float] = self._clock.monotonic
        self._lock = threading.Lock()
        self._count_threshold = config.count_threshold
        self._rate = config.failure_rate_threshold
        self._max_trials = config.max_trial_calls
        self._slow_limit = config.slow_call_duration
        self._predicate = config.failure_predicate
        self._inspect_results = self._predicate is not None or self._slow_limit is not None
        self._fallback = config.fallback
        self._record = config.record
        self._ignore = config.ignore
        self._listeners: tuple[BreakerListener, ...] = ()

        now = self._monotonic()
        self._state = CLOSED
        self._epoch = 1
        self._closed_epoch = 1
        self._opened_at: float | None = None
        self._open_until: float = 0.0
        self._trials_in_flight = 0
        self._trial_lease = config.trial_lease or max(config.timeout, 60.0)
        self._trial_lease_until = 0.0
        self._trial_successes = 0
        self._trial_successes_total = 0
        self._failures_total = 0
        self._successes = Tally()
        self._success_counter = self._successes.counter
        self._rejected = Tally()
        self._ignored = Tally()
        self._window = SlidingWindow(config.window, config.window_buckets)
        self._window.reset(now, 0)
        self._bucket_end = self._window.bucket_end()
        self._rate_armed = False

        self._shared: SharedCircuit | None = None
        self._store_down = False
        self._store_retry_due = 0.0
        self._sync_due = float("inf")
        if config.store is not None:
            self._shared = SharedCircuit(
                resolve_store(config.store, clock=self._clock),
                config.name,
                window=config.window,
                failure_threshold=self._count_threshold,
                timeout=config.timeout,
                success_threshold=config.success_threshold,
                max_trials=self._max_trials,
                lease=self._trial_lease,
            )
            self._sync_due = float("-inf")  # read the shared state on the first call
            self._closed_epoch = 0  # and until that read, no call takes the fast path
        self._synced = self._shared is None
        self._first_sync_lock = threading.Lock()

        self._registry = registry
        if registry is not None:
            registry.register(self)

    # -- public surface ------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """The current state; an open circuit whose timeout has passed reads ``half_open``
        (the transition itself happens on the next call)."""
        if self._shared is not None:
            self._refresh_shared()
        state = self._state
        if state is OPEN and self._monotonic() >= self._open_until:
            return HALF_OPEN
        return state

    @property
    def retry_after(self) -> float:
        """Seconds until a trial call is admitted; 0.0 unless the circuit is open."""
        if self._state is OPEN:
            return max(0.0, self._open_until - self._monotonic())
        return 0.0

    @property
    def store(self) -> Store | None:
        """The store the state is shared through, if any."""
        return self._shared.store if self._shared is not None else None

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn`` so that every call goes through the breaker."""
        _check_sync(fn)
        call = self._call

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            return call(fn, args, kwargs)

        return guarded

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn(*args, **kwargs)`` through the breaker."""
        return self._call(fn, args, kwargs)

    def add_listener(self, listener: BreakerListener) -> None:
        """Call ``listener(event)`` on every state change (after the change, outside any
        lock, in the thread that caused it). A listener that raises is logged and
        otherwise ignored."""
        with self._lock:
            if listener not in self._listeners:
                self._listeners = (*self._listeners, listener)

    def remove_listener(self, listener: BreakerListener) -> None:
        """Stop calling ``listener`` (no error when it was not added)."""
        with self._lock:
            self._listeners = tuple(x for x in self._listeners if x != listener)

    def reset(self) -> None:
        """Close the circuit and forget every count (also in the shared store)."""
        if self._shared is not None:
            try:
                self._shared.reset()
            except StoreError as exc:
                self._enter_outage(self._monotonic(), exc)
        now = self._monotonic()
        with self._lock:
            event = None
            if self._state is not CLOSED:
                event = self._transition(CLOSED, now, "reset")
            self._successes = Tally()
            self._success_counter = self._successes.counter
            self._rejected = Tally()
            self._ignored = Tally()
            self._failures_total = 0
            self._trial_successes_total = 0
            self._window.reset(now, 0)
            self._bucket_end = self._window.bucket_end()
            self._rate_armed = False
        if event is not None:
            self._emit(event)

    def metrics(self) -> BreakerMetrics:
        """A consistent snapshot of the breaker's state and counts (with a store, this
        reads the shared state once)."""
        view: SharedView | None = None
        if self._shared is not None:
            self._refresh_shared()
            if not self._store_down:
                try:
                    view = self._shared.read()
                except StoreError as exc:
                    self._enter_outage(self._monotonic(), exc)
        now = self._monotonic()
        wall = self._clock.time()
        with self._lock:
            self._advance(now)
            window = self._window
            closed_successes = self._successes.value()
            in_window = window.successes(closed_successes) if self._state is CLOSED else 0
            failures = window.failures if self._state is CLOSED else 0
            calls = in_window + failures
            state = self._state
            if state is OPEN and now >= self._open_until:
                state = HALF_OPEN
            open_left = max(0.0, self._open_until - now)
            not_closed = self._state is not CLOSED
            trials = self._trials_in_flight
            trial_successes = self._trial_successes
            if view is not None and view.state == "h":
                trials, trial_successes = view.trials_in_flight, view.trial_successes
            shared_failures = None
            if view is not None and self._shared is not None and self._shared.counts_failures:
                shared_failures = sum(1 for t in view.failures if t > wall - self.config.window)
            return BreakerMetrics(
                name=self.name,
                state=state,
                failures_in_window=failures,
                successes_in_window=in_window,
                slow_calls_in_window=window.slow if self._state is CLOSED else 0,
                calls_in_window=calls,
                failure_rate=failures / calls if calls else 0.0,
                successes=closed_successes + self._trial_successes_total,
                failures=self._failures_total,
                rejected=self._rejected.value(),
                ignored=self._ignored.value(),
                trial_calls_in_flight=trials if state is HALF_OPEN else 0,
                trial_successes=trial_successes if state is HALF_OPEN else 0,
                opened_at=self._opened_at if not_closed else None,
                next_trial_at=wall + open_left if not_closed else None,
                retry_after=open_left if state is OPEN else 0.0,
                window=self.config.window,
                shared=self._shared is not None,
                store_available=None if self._shared is None else not self._store_down,
                shared_failures_in_window=shared_failures,
            )

    def __repr__(self) -> str:
        # The local view: a repr must not reach for the store.
        return f"CircuitBreaker({self.name!r}, state={self._state.value!r})"

    # -- the call path -------------------------------------------------------------------

    def _call(self, fn: Callable[..., R], args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        epoch = self._closed_epoch
        if not epoch or (self._shared is not None and self._monotonic() >= self._sync_due):
            kind, epoch = self._admit()
            if kind != _ADMIT_CLOSED:
                if kind == _REJECT:
                    return cast(R, self._reject(args, kwargs))
                return self._run_trial(fn, args, kwargs, kind, epoch)
        ctx = current_call()
        if ctx is not None:
            ctx.breaker = self.name
            ctx.circuit_state = "closed"
        monotonic = self._monotonic
        started = monotonic() if self._slow_limit is not None else 0.0
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._settle_exception(exc, _ADMIT_CLOSED, epoch, started)
            raise
        if type(result) is GeneratorType:
            return cast(
                R, self._guard_stream(cast(Generator[Any, Any, Any], result), _ADMIT_CLOSED, epoch)
            )
        now = monotonic()
        if self._inspect_results:
            outcome, slow = self._judge(result, now - started)
            if outcome != _SUCCESS:
                self._settle(_ADMIT_CLOSED, epoch, outcome, now, slow)
                return result
        # The common case, inlined: one comparison, one atomic count.
        if now >= self._bucket_end:
            self._roll(now)
        next(self._success_counter)
        if self._rate_armed:
            self._check_rate(now)
        return result

    def _run_trial(
        self,
        fn: Callable[..., R],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        kind: int,
        epoch: int,
    ) -> R:
        ctx = current_call()
        if ctx is not None:
            ctx.breaker = self.name
            ctx.circuit_state = "half_open"
        started = self._monotonic()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self._settle_exception(exc, kind, epoch, started)
            raise
        if type(result) is GeneratorType:
            return cast(R, self._guard_stream(cast(Generator[Any, Any, Any], result), kind, epoch))
        now = self._monotonic()
        outcome, slow = self._judge(result, now - started)
        self._settle(kind, epoch, outcome, now, slow)
        return result

    def _reject(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        next(self._rejected.counter)
        now = self._monotonic()
        message = None
        state = "open"
        if self._state is OPEN and now < self._open_until:
            retry_after = self._open_until - now
        elif self._store_down and self.config.on_store_error == "reject":
            retry_after = max(0.0, self._store_retry_due - now)
            message = (
                f"circuit {self.name!r} rejects calls while its store is unavailable; "
                f"next attempt in {retry_after:.3f}s"
            )
        else:
            retry_after = 0.0
            state = "half_open"
            message = (
                f"circuit {self.name!r} is half-open and all {self._max_trials} "
                "trial calls are in flight"
            )
        ctx = current_call()
        if ctx is not None:
            ctx.breaker = self.name
            ctx.circuit_state = state
        exc = CircuitOpenError(self.name, retry_after, message=message)
        if self._fallback is not None:
            return self._fallback(exc, *args, **kwargs)
        raise exc

    def _guard_stream(
        self, stream: Generator[Any, Any, Any], kind: int, epoch: int
    ) -> Iterator[Any]:
        outcome = _IGNORED  # a stream closed before its end says nothing about the upstream
        try:
            yield from stream
            outcome = _SUCCESS
        except GeneratorExit:
            raise
        except BaseException as exc:
            outcome = self._classify(exc)
            raise
        finally:
            self._settle_safely(kind, epoch, outcome, self._monotonic(), False)

    # -- classifying outcomes ------------------------------------------------------------

    def _classify(self, exc: BaseException) -> int:
        if self._ignore and isinstance(exc, self._ignore):
            return _IGNORED
        if isinstance(exc, self._record):
            return _FAILURE
        return _SUCCESS if isinstance(exc, Exception) else _IGNORED

    def _judge(self, result: Any, duration: float) -> tuple[int, bool]:
        slow = self._slow_limit is not None and duration > self._slow_limit
        if self._predicate is not None:
            try:
                failed = bool(self._predicate(result))
            except Exception:
                _log.exception("failure_predicate of breaker %s raised", self.name)
                return _IGNORED, slow
            if failed:
                return _FAILURE, slow
        return (_FAILURE if slow else _SUCCESS), slow

    def _settle_exception(self, exc: BaseException, kind: int, epoch: int, started: float) -> None:
        now = self._monotonic()
        outcome = self._classify(exc)
        slow = self._slow_limit is not None and now - started > self._slow_limit
        if slow and outcome == _SUCCESS:
            outcome = _FAILURE
        self._settle_safely(kind, epoch, outcome, now, slow)

    def _settle_safely(self, kind: int, epoch: int, outcome: int, now: float, slow: bool) -> None:
        # While the user's exception propagates, bookkeeping must never replace it.
        try:
            self._settle(kind, epoch, outcome, now, slow)
        except Exception:
            _log.exception("breaker %s could not record an outcome", self.name)

    def _settle(self, kind: int, epoch: int, outcome: int, now: float, slow: bool) -> None:
        if kind == _ADMIT_CLOSED:
            if outcome == _SUCCESS:
                if now >= self._bucket_end:
                    self._roll(now)
                next(self._success_counter)
                if self._rate_armed:
                    self._check_rate(now)
            elif outcome == _FAILURE:
                self._closed_failure(epoch, now, slow)
            else:
                next(self._ignored.counter)
        elif kind == _ADMIT_TRIAL:
            self._local_trial_done(epoch, outcome, now, slow)
        else:
            self._shared_trial_done(epoch, outcome, now, slow)

    # -- closed-state bookkeeping (lock held only around the counts) ---------------------

    def _advance(self, now: float) -> None:
        """Roll the window to ``now``. Lock held."""
        if now >= self._bucket_end:
            window = self._window
            window.advance(now, self._successes.value())
            self._bucket_end = window.bucket_end()
            self._rate_armed = self._rate is not None and window.failures > 0

    def _roll(self, now: float) -> None:
        with self._lock:
            self._advance(now)

    def _trip_reason(self, count: bool) -> str | None:
        """Why the window's figures open the circuit, or ``None``. Lock held."""
        window = self._window
        failures = window.failures
        threshold = self._count_threshold
        if count and threshold is not None and failures >= threshold:
            return f"{failures} failures in {self.config.window:g}s"
        if self._rate is not None and failures:
            calls = failures + window.successes(self._successes.value())
            if calls >= self.config.minimum_calls and failures / calls >= self._rate:
                return f"failure rate {failures / calls:.0%} >= {self._rate:.0%} over {calls} calls"
        return None

    def _closed_failure(self, epoch: int, now: float, slow: bool) -> None:
        shared = self._shared if not self._store_down else None
        event = None
        reason = None
        with self._lock:
            self._failures_total += 1
            if not epoch or epoch != self._closed_epoch:
                return  # admitted before the last state change
            self._advance(now)
            self._window.add_failure(slow)
            self._rate_armed = self._rate is not None
            # With a healthy store, the store counts failures across processes.
            reason = self._trip_reason(count=shared is None or not shared.counts_failures)
            if reason is not None and shared is None:
                event = self._transition(OPEN, now, reason)
        if event is not None:
            self._emit(event)
            return
        if shared is not None:
            self._report_failure(shared, now, reason)

    def _check_rate(self, now: float) -> None:
        shared = self._shared if not self._store_down else None
        event = None
        with self._lock:
            if not self._closed_epoch:
                return
            self._advance(now)
            reason = self._trip_reason(count=False)
            if reason is None:
                return
            if shared is None:
                event = self._transition(OPEN, now, reason)
        if event is not None:
            self._emit(event)
        elif shared is not None:
            self._report_failure(shared, now, reason, counted=True)

    # -- half-open trials, local -----------------------------------------------------------

    def _local_trial_done(self, epoch: int, outcome: int, now: float, slow: bool) -> None:
        event = None
        with self._lock:
            if outcome == _SUCCESS:
                self._trial_successes_total += 1
            elif outcome == _FAILURE:
                self._failures_total += 1
            else:
                next(self._ignored.counter)
            if self._state is not HALF_OPEN or epoch != self._epoch:
                return
            self._trials_in_flight = max(0, self._trials_in_flight - 1)
            if outcome == _SUCCESS:
                self._trial_successes += 1
                if self._trial_successes >= self.config.success_threshold:
                    event = self._transition(
                        CLOSED, now, f"{self._trial_successes} successful trial calls"
                    )
            elif outcome == _FAILURE:
                what = "slow trial call" if slow else "failed trial call"
                event = self._transition(OPEN, now, what)
        if event is not None:
            self._emit(event)

    def _admit(self) -> tuple[int, int]:
        now = self._monotonic()
        if self._shared is not None:
            return self._admit_shared(now)
        return self._admit_local(now)

    def _admit_local(self, now: float) -> tuple[int, int]:
        if self._state is OPEN and now < self._open_until:
            return _REJECTED  # the common open case needs no lock
        event = None
        with self._lock:
            state = self._state
            if state is CLOSED:
                admitted = (_ADMIT_CLOSED, self._closed_epoch)
            elif state is OPEN and now < self._open_until:
                admitted = _REJECTED
            else:
                if state is OPEN:
                    event = self._transition(HALF_OPEN, now, "open timeout elapsed")
                if self._trials_in_flight and now >= self._trial_lease_until:
                    # Permits whose calls never reported back (a stream that was never
                    # iterated) are given back, so half-open cannot stay full forever.
                    self._trials_in_flight = 0
                if self._trials_in_flight < self._max_trials:
                    self._trials_in_flight += 1
                    self._trial_lease_until = now + self._trial_lease
                    admitted = (_ADMIT_TRIAL, self._epoch)
                else:
                    admitted = _REJECTED
        if event is not None:
            self._emit(event)
        return admitted

    # -- transitions -----------------------------------------------------------------------

    def _transition(
        self,
        to: CircuitState,
        now: float,
        reason: str,
        *,
        open_until: float | None = None,
        opened_at: float | None = None,
        source: str = "local",
    ) -> BreakerEvent:
        """Move to ``to``, empty the window, and describe the change. Lock held."""
        from_state = self._state
        window = self._window
        failures = window.failures
        calls = failures + window.successes(self._successes.value())
        self._state = to
        self._epoch += 1
        self._closed_epoch = self._epoch if to is CLOSED else 0
        self._trials_in_flight = 0
        self._trial_successes = 0
        retry_after = 0.0
        if to is OPEN:
            self._open_until = now + self.config.timeout if open_until is None else open_until
            self._opened_at = self._clock.time() if opened_at is None else opened_at
            retry_after = max(0.0, self._open_until - now)
        elif to is CLOSED:
            self._opened_at = None
        window.reset(now, self._successes.value())
        self._bucket_end = window.bucket_end()
        self._rate_armed = False
        return BreakerEvent(
            breaker=self.name,
            from_state=from_state,
            to_state=to,
            at=self._clock.time(),
            reason=reason,
            failures=failures,
            failure_rate=failures / calls if calls else None,
            retry_after=retry_after,
            source=source,
        )

    def _emit(self, event: BreakerEvent) -> None:
        extra = {
            "breaker": event.breaker,
            "from_state": event.from_state.value,
            "to_state": event.to_state.value,
            "failures": event.failures,
            "retry_after": round(event.retry_after, 3),
            "reason": event.reason,
            "source": event.source,
        }
        if event.to_state is OPEN:
            _log.warning(
                "circuit %s opened (%s); next trial call in %.1fs",
                event.breaker,
                event.reason,
                event.retry_after,
                extra=extra,
            )
        else:
            _log.info(
                "circuit %s is %s (%s)",
                event.breaker,
                event.to_state.value,
                event.reason,
                extra=extra,
            )
        listeners = self._listeners
        if self._registry is not None:
            listeners = listeners + self._registry.listeners
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                _log.exception("listener %r of breaker %s failed", listener, self.name)

    # -- shared state (store=) ---------------------------------------------------------------

    def _adopt(self, view: SharedView, now: float, reason: str | None = None) -> None:
        """Mirror the shared state locally; ``reason`` is given when this process's own
        script made the change."""
        target = _FROM_SHARED[view.state]
        open_until = now + (view.deadline - self._clock.time())
        event = None
        with self._lock:
            if target is OPEN and self._state is OPEN:
                self._open_until = open_until
                self._opened_at = view.opened_at
            elif target is not self._state:
                source = "local" if reason is not None else "store"
                why = reason or f"shared state is {target.value} (changed by {_changed_by(self)})"
                event = self._transition(
                    target,
                    now,
                    why,
                    open_until=open_until,
                    opened_at=view.opened_at,
                    source=source,
                )
        if event is not None:
            self._emit(event)

    def _refresh_shared(self) -> None:
        """Read the shared state if it is due (for ``.state`` and ``.metrics()``)."""
        now = self._monotonic()
        if now >= self._sync_due and self._shared is not None:
            self._sync(self._shared, now)

    def _sync(self, shared: SharedCircuit, now: float) -> bool:
        """Read and mirror the shared state; ``False`` when the store is unavailable."""
        if not self._synced:
            return self._first_sync(shared, now)
        return self._read_shared(shared, now)

    def _first_sync(self, shared: SharedCircuit, now: float) -> bool:
        # Before its first read this process knows nothing: concurrent first callers wait
        # for that read rather than act on the initial closed state.
        with self._first_sync_lock:
            if self._synced:
                return not self._store_down
            available = self._read_shared(shared, now)
            with self._lock:
                if self._state is CLOSED and not self._closed_epoch:
                    self._closed_epoch = self._epoch
            self._synced = True
            return available

    def _read_shared(self, shared: SharedCircuit, now: float) -> bool:
        was_down = self._store_down
        if was_down:
            if now < self._store_retry_due:
                return False
            self._store_retry_due = now + self.config.store_retry_interval
        self._sync_due = now + self.config.sync_interval  # one thread reads, others go on
        try:
            view = shared.read()
            if was_down:
                self._leave_outage(now)
                if view.state == "c" and self._state is OPEN and now < self._open_until:
                    # Opened here while the store was away: tell the other processes.
                    deadline = self._clock.time() + (self._open_until - now)
                    result = shared.trip(self._clock.time(), deadline)
                    view = result.view
            self._adopt(view, now)
        except StoreError as exc:
            self._enter_outage(now, exc)
            return False
        return True

    def _admit_shared(self, now: float) -> tuple[int, int]:
        shared = self._shared
        assert shared is not None
        if (now >= self._sync_due or self._store_down) and not self._sync(shared, now):
            return self._admit_without_store(now)
        state = self._state
        if state is CLOSED and self._closed_epoch:
            return (_ADMIT_CLOSED, self._closed_epoch)
        if state is OPEN and now < self._open_until:
            return _REJECTED
        try:
            result = shared.acquire_trial(self._clock.time())
        except StoreError as exc:
            self._enter_outage(now, exc)
            return self._admit_without_store(now)
        self._adopt(result.view, now, "open timeout elapsed" if result.transitioned else None)
        if result.view.state == "c":
            epoch = self._closed_epoch
            return (_ADMIT_CLOSED, epoch) if epoch else _REJECTED
        if result.granted:
            return (_ADMIT_SHARED_TRIAL, result.view.epoch)
        return _REJECTED

    def _admit_without_store(self, now: float) -> tuple[int, int]:
        if self.config.on_store_error == "reject":
            return _REJECTED
        return self._admit_local(now)

    def _report_failure(
        self, shared: SharedCircuit, now: float, reason: str | None, *, counted: bool = False
    ) -> None:
        """Tell the store about a failure (or a local trip on the failure rate)."""
        wall = self._clock.time()
        try:
            if shared.counts_failures and not counted:
                result = shared.record_failure(wall)
                if result.transitioned:
                    threshold = self._count_threshold
                    why = f"{threshold} failures in {self.config.window:g}s"
                    if not shared.in_process:
                        why += " across processes"
                    self._adopt(result.view, now, why)
                    return
                if result.view.state != "c":
                    self._adopt(result.view, now)
                    return
            if reason is not None:
                result = shared.trip(wall, wall + self.config.timeout)
                self._adopt(result.view, now, reason if result.transitioned else None)
        except StoreError as exc:
            self._enter_outage(now, exc)
            self._open_locally_if_tripped(now)

    def _open_locally_if_tripped(self, now: float) -> None:
        event = None
        with self._lock:
            if self._closed_epoch:
                reason = self._trip_reason(count=True)
                if reason is not None:
                    event = self._transition(OPEN, now, reason)
        if event is not None:
            self._emit(event)

    def _shared_trial_done(self, epoch: int, outcome: int, now: float, slow: bool) -> None:
        with self._lock:
            if outcome == _SUCCESS:
                self._trial_successes_total += 1
            elif outcome == _FAILURE:
                self._failures_total += 1
            else:
                next(self._ignored.counter)
        shared = self._shared
        if shared is None or self._store_down:
            return  # the permit's lease gives it back in the store
        try:
            result = shared.trial_result(epoch, _TO_SHARED_OUTCOME[outcome], self._clock.time())
        except StoreError as exc:
            self._enter_outage(now, exc)
            return
        reason = None
        if result.transitioned:
            if result.view.state == "c":
                reason = f"{self.config.success_threshold} successful trial calls"
            else:
                reason = "slow trial call" if slow else "failed trial call"
        self._adopt(result.view, now, reason)

    def _enter_outage(self, now: float, exc: BaseException) -> None:
        with self._lock:
            first = not self._store_down
            self._store_down = True
            self._store_retry_due = now + self.config.store_retry_interval
            # "reject" sends every call to the slow path, which rejects until the retry.
            reject = self.config.on_store_error == "reject"
            self._sync_due = float("-inf") if reject else self._store_retry_due
        if first:
            _log.warning(
                "breaker %s: store unavailable (%s); %s until it answers again",
                self.name,
                exc,
                "rejecting calls" if reject else "deciding on this process's own state",
                extra={"breaker": self.name, "error": str(exc)},
            )

    def _leave_outage(self, now: float) -> None:
        with self._lock:
            self._store_down = False
            self._sync_due = now + self.config.sync_interval
        _log.info(
            "breaker %s: store available again; sharing state",
            self.name,
            extra={"breaker": self.name},
        )


def _changed_by(breaker: CircuitBreaker) -> str:
    """Who changed a shared state that ``breaker`` observed, in words for its event."""
    shared = breaker._shared
    if shared is not None and shared.in_process:
        return "another breaker on the same memory store"
    return "another process"


def _check_sync(fn: Callable[..., Any]) -> None:
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"{getattr(fn, '__qualname__', fn)!r} is async; ai_guard guards synchronous functions"
        )


# -- templates: one breaker per model ----------------------------------------------------


def template_fields(name: str) -> tuple[str, ...]:
    """The keyword names a breaker name template reads (``"openai:{model}"`` →
    ``("model",)``); empty for a plain name."""
    try:
        parsed = list(string.Formatter().parse(name))
    except ValueError as exc:
        raise ConfigError("name", name, f"not a valid name template: {exc}") from None
    fields: list[str] = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ConfigError(
                "name", name, "template fields must be plain keyword names such as {model}"
            )
        if field not in fields:
            fields.append(field)
    return tuple(fields)


#: Most breakers one template creates. Calls naming further values (a flood of distinct
#: ``model=`` values taken from user input) share one overflow breaker, named with
#: :data:`OVERFLOW_VALUE` in every field, so memory (and the registry, the health endpoint)
#: stays bounded.
MAX_TEMPLATE_BREAKERS = 1024
OVERFLOW_VALUE = "other"


class BreakerTemplate(BreakerDecorator):
    """A family of breakers named by a template, one per value of the call's keywords.

    ``circuit_breaker("openai:{model}")`` returns one: each call's ``model=`` picks (and on
    first use creates, with the template's options) the breaker ``openai:<model>``, so a
    failing ``gpt-4o`` does not stop ``gpt-4o-mini``. The argument may also be passed
    positionally or come from the parameter's default; a call without it raises
    ``TypeError``. Past :data:`MAX_TEMPLATE_BREAKERS` values, new values share the
    breaker ``openai:other`` (a WARNING says so once), as the metrics collector counts
    calls beyond its series limit under the model ``"other"``.
    """

    def __init__(self, template: str, registry: BreakerRegistry, options: dict[str, Any]) -> None:
        self.template = template
        self.fields = template_fields(template)
        if not self.fields:
            raise ConfigError("name", template, "a template needs a field such as {model}")
        # Validate the options now (at decoration), not on the first call.
        self.config = build_config(BreakerConfig, name=template, **options)
        if isinstance(self.config.store, str):
            # One store (one Redis connection pool) for the whole family, not one per model.
            options = {
                **options,
                "store": resolve_store(self.config.store, clock=self.config.clock),
            }
        self._options = options
        self._registry = registry
        self._lock = threading.Lock()
        self._by_key: dict[Any, CircuitBreaker] = {}
        self._overflow: CircuitBreaker | None = None

    def name_for(self, **values: Any) -> str:
        """The breaker name for these keyword values."""
        return self.template.format(**values)

    def breaker(self, **values: Any) -> CircuitBreaker:
        """The breaker for these keyword values, created on first use."""
        missing = [f for f in self.fields if values.get(f) is None]
        if missing:
            raise TypeError(f"breaker template {self.template!r} needs {', '.join(missing)}=")
        key = (
            values[self.fields[0]]
            if len(self.fields) == 1
            else tuple(values[f] for f in self.fields)
        )
        return self._for_key(key)

    def breakers(self) -> list[CircuitBreaker]:
        """The breakers created so far, by name."""
        with self._lock:
            return sorted(self._by_key.values(), key=lambda b: b.name)

    def _made(self) -> list[CircuitBreaker]:
        """Every breaker this template made, the overflow breaker included."""
        with self._lock:
            made = list(self._by_key.values())
            if self._overflow is not None:
                made.append(self._overflow)
            return made

    def _forget(self, name: str) -> None:
        """Drop the breaker named ``name`` from the cache (the registry removed it)."""
        with self._lock:
            # In place: the decorated functions read this very dict.
            for key in [k for k, b in self._by_key.items() if b.name == name]:
                del self._by_key[key]
            if self._overflow is not None and self._overflow.name == name:
                self._overflow = None

    def _for_key(self, key: Any) -> CircuitBreaker:
        breaker = self._by_key.get(key)
        if breaker is not None:
            return breaker
        with self._lock:
            breaker = self._by_key.get(key)
            if breaker is None:
                if len(self._by_key) >= MAX_TEMPLATE_BREAKERS:
                    return self._overflow_breaker()
                values = dict(
                    zip(self.fields, key if len(self.fields) > 1 else (key,), strict=True)
                )
                breaker = self._registry.get_or_create(
                    self.template.format(**values), **self._options
                )
                self._by_key[key] = breaker
            return breaker

    def _overflow_breaker(self) -> CircuitBreaker:
        """The breaker shared by values beyond the limit (lock held). Not cached under
        the caller's value: that would let a flood of values grow the table."""
        breaker = self._overflow
        if breaker is None:
            name = self.template.format(**dict.fromkeys(self.fields, OVERFLOW_VALUE))
            breaker = self._overflow = self._registry.get_or_create(name, **self._options)
            _log.warning(
                "breaker template %s has %d breakers; calls naming further values share "
                "the breaker %s",
                self.template,
                MAX_TEMPLATE_BREAKERS,
                name,
                extra={"breaker": name},
            )
        return breaker

    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]:
        """Decorate ``fn``: each call goes through the breaker its keywords name."""
        _check_sync(fn)
        locate = _argument_locator(fn, self.fields, self.template)
        cache = self._by_key
        resolve = self._for_key
        # The common case, a single field passed as a keyword (model=...), is one dict
        # lookup; positional values, defaults and errors go through the locator.
        keyword = self.fields[0] if len(self.fields) == 1 else None

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            key = kwargs.get(keyword) if keyword is not None else None
            if key is None:
                key = locate(args, kwargs)
            breaker = cache.get(key)
            if breaker is None:
                breaker = resolve(key)
            return breaker._call(fn, args, kwargs)

        return guarded

    def call(self, fn: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call ``fn`` through the breaker named by the call's keywords."""
        key = _argument_locator(fn, self.fields, self.template)(args, kwargs)
        return self._for_key(key)._call(fn, args, kwargs)

    def __repr__(self) -> str:
        return f"BreakerTemplate({self.template!r}, breakers={len(self._by_key)})"


def _argument_locator(
    fn: Callable[..., Any], fields: tuple[str, ...], template: str
) -> Callable[[tuple[Any, ...], dict[str, Any]], Any]:
    """Build, once per decorated function, how a call's template values are found."""
    positions: dict[str, int] = {}
    defaults: dict[str, Any] = {}
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature: keywords only
        parameters = None
    if parameters is not None:
        takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        positional = [
            p.name
            for p in parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        for field in fields:
            param = parameters.get(field)
            if param is None and not takes_kwargs:
                raise ConfigError(
                    "name",
                    template,
                    f"{getattr(fn, '__qualname__', fn)}() has no {field!r} parameter "
                    "for the template to read",
                )
            if param is not None and param.kind is not param.KEYWORD_ONLY and field in positional:
                positions[field] = positional.index(field)
            if param is not None and param.default is not param.empty:
                defaults[field] = param.default
    name = getattr(fn, "__qualname__", repr(fn))

    def value_of(field: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value = kwargs.get(field, _MISSING)
        if value is _MISSING:
            position = positions.get(field)
            if position is not None and position < len(args):
                value = args[position]
            else:
                value = defaults.get(field, _MISSING)
        if value is _MISSING or value is None:
            raise TypeError(
                f"{name}() was called without {field}=; the breaker template "
                f"{template!r} needs it to pick the breaker"
            )
        return value

    if len(fields) == 1:
        only = fields[0]
        return lambda args, kwargs: value_of(only, args, kwargs)
    return lambda args, kwargs: tuple(value_of(f, args, kwargs) for f in fields)


def _same_options(name: str, existing: BreakerConfig, new: BreakerConfig) -> None:
    field = _first_difference(existing, new)
    if field is not None:
        raise ConfigError(
            field,
            getattr(new, field),
            f"breaker {name!r} already exists with {field}={getattr(existing, field)!r}; "
            "configure it where it is first created, or ask for it without options",
        )


def default_registry() -> BreakerRegistry:
    """The process-wide registry that :func:`circuit_breaker` and :class:`CircuitBreaker`
    use by default."""
    return _DEFAULT_REGISTRY


def get_breaker(name: str) -> CircuitBreaker | None:
    """The breaker named ``name`` in the default registry, or ``None``."""
    return _DEFAULT_REGISTRY.get(name)


def all_breakers() -> list[CircuitBreaker]:
    """Every breaker of the default registry, ordered by name (for health endpoints)."""
    return _DEFAULT_REGISTRY.all()


def circuit_breaker(
    name_or_breaker: str | CircuitBreaker,
    *,
    registry: BreakerRegistry | None = None,
    **options: Any,
) -> BreakerDecorator:
    """The decorator form: ``@circuit_breaker("openai")``.

    - a name: the registry's breaker of that name (created with ``options`` on first use;
      twice the same name gives the same breaker, see :class:`BreakerRegistry` for
      differing options);
    - a template such as ``"openai:{model}"``: one breaker per value of the call's
      ``model=`` (:class:`BreakerTemplate`);
    - a :class:`CircuitBreaker`: that breaker (its options were given to it).

    Example::

        @circuit_breaker("openai:{model}", failure_threshold=5, timeout=30)
        def ask(prompt: str, *, model: str) -> str: ...

        ask("hi", model="gpt-4o")          # breaker "openai:gpt-4o"
        get_breaker("openai:gpt-4o").state
    """
    if isinstance(name_or_breaker, CircuitBreaker):
        if options:
            raise ConfigError(
                "options", sorted(options), "give options to CircuitBreaker(...) itself"
            )
        return name_or_breaker
    if not isinstance(name_or_breaker, str):
        raise ConfigError("name", name_or_breaker, "must be a breaker name or a CircuitBreaker")
    target = registry if registry is not None else _DEFAULT_REGISTRY
    if template_fields(name_or_breaker):
        return target.template(name_or_breaker, **options)
    return target.get_or_create(name_or_breaker, **options)
