"""Model routing: send each request to the cheapest model that can do it, and around a
model whose circuit is open.

A :class:`RouteRequest` describes the work (task type, complexity 0-10, critical or not,
expected output length, optionally the input size); a :class:`Router` turns it into a
:class:`RouteDecision` (model, tier, a reason in words, and the model it fell back from).
``@routed`` does it for every call and injects ``model=``::

    router = Router(breakers="openai:{model}")

    @routed(router, request=lambda prompt, **_: RouteRequest("classification", 2))
    @traced_ai(operation="chat")
    @circuit_breaker("openai:{model}")
    def ask(prompt: str, *, model: str = "") -> ChatResult: ...

(The ``= ""`` default is for type checkers only, so that ``ask("hi")`` type-checks;
``@routed`` always passes ``model=``.)

The default policy (:func:`default_policy`); the first matching row wins:

| row | condition                                               | tier | reason, e.g.       |
|-----|---------------------------------------------------------|------|--------------------|
| 1   | ``is_critical``                                         | full | "Critical request: |
|     |                                                         |      | full tier."        |
| 2   | ``complexity_score >= 7``                               | full | "Complexity 8 is 7 |
|     |                                                         |      | or above: ..."     |
| 3   | ``output_length == "long"`` and ``complexity_score >= 5`` | full | "Long output at  |
|     |                                                         |      | complexity 6 ..."  |
| 4   | task type classification, extraction, summarization     | mini | "Classification is |
|     | or short_answer                                         |      | a simple task: ..."|
| 5   | ``output_length == "short"``                            | mini | "Short answer      |
|     |                                                         |      | expected: ..."     |
| 6   | otherwise                                               | mini | "Complexity 4 is   |
|     |                                                         |      | below 7 and ..."   |

Within a tier the router takes the first model of that tier in the catalogue order. A
custom policy is any callable ``(request, models) -> (target, reason)`` where ``target``
is a :class:`ModelSpec`, a model name or a tier (``"mini"`` / ``"full"``).

Selection and fallback, in this order:

1. A model whose ``context_window`` is smaller than ``request.input_tokens`` is skipped
   (the reason says so; this is not a fallback).
2. A model whose breaker is open is skipped, and the decision records it in
   ``fallback_from`` and in the reason. The next candidates are the other models of the
   *same tier* (catalogue order), then those of the *other tier* (a mini request degrades
   upwards to a full model, a full request downwards to a mini model: an answer from a
   smaller model beats no answer; pass ``cross_tier_fallback=False`` to forbid it).
3. When every candidate is open, :class:`~ai_guard.errors.CircuitOpenError` is raised
   with the soonest ``retry_after``; when none fits the input, :class:`NoRouteError`.

Breakers (``breakers=``) are a mapping model -> breaker, a name template such as
``"openai:{model}"`` looked up in the breaker registry (:func:`ai_guard.breaker.get_breaker`)
at each decision (so breakers created later by ``@circuit_breaker("openai:{model}")``
are found), or a callable model -> breaker or ``None``. Anything with ``.name``,
``.state`` (``"closed"``/``"open"``/``"half_open"``) and ``.retry_after`` will do
(:class:`BreakerLike`).

``@routed`` writes the decision into the per-call context (``request_model``, ``tier``,
``route_reason``, ``fallback_from``, and the router's catalogue so the call is priced from
its table), where tracing, metrics and the log line read it. When the wrapped call itself
raises ``CircuitOpenError`` for the chosen model (its breaker opened after the decision, or
its half-open trial slots were taken), ``@routed`` retries **once** on the next model. A
stream is routed once: errors raised while it is consumed are not retried.
"""

from __future__ import annotations

import functools
import importlib
import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, Protocol, TypeVar

from ai_guard.clock import SYSTEM_CLOCK, Clock
from ai_guard.context import CallContext, close_call, open_call
from ai_guard.errors import AIGuardError, CircuitOpenError, ConfigError
from ai_guard.pricing import (
    DEFAULT_MODELS,
    TIERS,
    ModelCatalog,
    ModelSpec,
    Tier,
    cost_usd,
    find_model,
    model_catalog,
    parse_models,
)

__all__ = [
    "FULL_COMPLEXITY",
    "LONG_OUTPUT_COMPLEXITY",
    "OUTPUT_LENGTHS",
    "SIMPLE_TASKS",
    "BreakerLike",
    "ModelSpec",
    "NoRouteError",
    "RouteDecision",
    "RoutePolicy",
    "RouteRequest",
    "Router",
    "cost_usd",
    "default_policy",
    "routed",
    "sample_traffic",
]

P = ParamSpec("P")
R = TypeVar("R")

OutputLength = Literal["short", "medium", "long"]
OUTPUT_LENGTHS: tuple[OutputLength, ...] = ("short", "medium", "long")

#: Complexity from which the default policy picks the full tier.
FULL_COMPLEXITY = 7
#: Complexity from which a long output goes to the full tier.
LONG_OUTPUT_COMPLEXITY = 5
#: Task types the default policy always considers simple enough for the mini tier.
SIMPLE_TASKS = frozenset({"classification", "extraction", "summarization", "short_answer"})


class NoRouteError(AIGuardError, ValueError):
    """No model of the catalogue can take the request (its input exceeds every context
    window the policy may use, or a custom policy named an unknown model)."""


class BreakerLike(Protocol):
    """What the router reads from a circuit breaker (``ai_guard.breaker.CircuitBreaker``
    has it)."""

    @property
    def name(self) -> str:
        """The breaker's name (what ``CircuitOpenError.name`` carries)."""
        ...

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` or ``"half_open"``."""
        ...

    @property
    def retry_after(self) -> float:
        """Seconds until the breaker admits a trial call; 0.0 when not open."""
        ...


#: Where a router finds each model's breaker (see the module docstring).
BreakerSource = str | Mapping[str, BreakerLike] | Callable[[str], BreakerLike | None] | None


@dataclass(frozen=True, slots=True, init=False)
class RouteRequest:
    """What a request needs, for the router.

    - ``task_type``: what the work is (``"classification"``, ``"extraction"``,
      ``"summarization"``, ``"short_answer"``, ``"chat"``, ``"generation"``, ... any
      non-empty string).
    - ``complexity_score``: 0 (trivial) to 10 (hardest).
    - ``is_critical``: a wrong answer is expensive (send it to the best model).
    - ``output_length``: ``"short"``, ``"medium"`` or ``"long"``.
    - ``input_tokens``: estimated prompt size, to skip models whose context is too small.

    Bad values raise :class:`~ai_guard.errors.ConfigError` (a ``ValueError``) naming the
    field: ``RouteRequest("chat", 11)`` -> ``invalid setting complexity_score=11: ...``.
    """

    task_type: str
    complexity_score: float
    is_critical: bool = False
    output_length: OutputLength = "medium"
    input_tokens: int | None = None

    # Written by hand rather than generated: ``@routed`` builds one per call (the
    # ``request=`` callable), so the valid case is checked on locals in one expression and
    # set without a ``__post_init__`` round trip; anything else gets the field-by-field
    # checks and their messages.
    def __init__(
        self,
        task_type: str,
        complexity_score: float,
        is_critical: bool = False,
        output_length: OutputLength = "medium",
        input_tokens: int | None = None,
    ) -> None:
        if not (
            type(task_type) is str
            and task_type.strip()
            and (type(complexity_score) is int or type(complexity_score) is float)
            and 0 <= complexity_score <= 10  # also False for NaN
            and type(is_critical) is bool
            and output_length in OUTPUT_LENGTHS
            and (input_tokens is None or (type(input_tokens) is int and input_tokens >= 0))
        ):
            _check_route_request(
                task_type, complexity_score, is_critical, output_length, input_tokens
            )
        _set_task_type(self, task_type)
        _set_complexity_score(self, complexity_score)
        _set_is_critical(self, is_critical)
        _set_output_length(self, output_length)
        _set_input_tokens(self, input_tokens)


# Frozen: the fields cannot be assigned, so __init__ sets them through the slots' own
# setters, bound here once (object.__setattr__, what a dataclass's own __init__ uses, looks
# each name up again on every call, and a RouteRequest is built for every routed call).
_slot_setters: list[Callable[[RouteRequest, Any], None]] = [
    RouteRequest.__dict__[name].__set__
    for name in ("task_type", "complexity_score", "is_critical", "output_length", "input_tokens")
]
(
    _set_task_type,
    _set_complexity_score,
    _set_is_critical,
    _set_output_length,
    _set_input_tokens,
) = _slot_setters


def _check_route_request(
    task_type: object,
    score: object,
    is_critical: object,
    output_length: object,
    tokens: object,
) -> None:
    """Raise the :class:`ConfigError` naming the first bad field of a RouteRequest."""
    if not isinstance(task_type, str) or not task_type.strip():
        raise ConfigError(
            "task_type", task_type, "must be a non-empty string, e.g. 'classification'"
        )
    if (
        isinstance(score, bool)
        or not isinstance(score, (int, float))
        or not math.isfinite(score)
        or not 0 <= score <= 10
    ):
        raise ConfigError("complexity_score", score, "must be a number from 0 to 10")
    if not isinstance(is_critical, bool):
        raise ConfigError("is_critical", is_critical, "must be True or False")
    if output_length not in OUTPUT_LENGTHS:
        raise ConfigError(
            "output_length", output_length, "must be one of 'short', 'medium', 'long'"
        )
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)):
        raise ConfigError("input_tokens", tokens, "must be a whole number of tokens or None")
    if isinstance(tokens, int) and tokens < 0:
        raise ConfigError("input_tokens", tokens, "must not be negative")


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where a request goes: ``model``, its ``tier`` (``"mini"`` / ``"full"``), the
    ``reason`` in words, and ``fallback_from``: the model that would have been used had
    its circuit not been open (``None`` when there was no fallback)."""

    model: str
    tier: str
    reason: str
    fallback_from: str | None = None


#: A routing policy: ``(request, models) -> (target, reason)``; ``target`` is a
#: :class:`ModelSpec`, a model name or a tier name.
RoutePolicy = Callable[[RouteRequest, Sequence[ModelSpec]], tuple[ModelSpec | str, str]]


def _task_name(task_type: str) -> str:
    return task_type.strip().lower().replace("-", "_").replace(" ", "_")


def default_policy(request: RouteRequest, models: Sequence[ModelSpec]) -> tuple[Tier, str]:
    """The default policy (the table in this module's docstring): critical or complex
    work goes to the full tier, everything else to the mini tier."""
    score = request.complexity_score
    if request.is_critical:
        return "full", "Critical request: full tier."
    if score >= FULL_COMPLEXITY:
        return "full", f"Complexity {score:g} is {FULL_COMPLEXITY} or above: full tier."
    if request.output_length == "long" and score >= LONG_OUTPUT_COMPLEXITY:
        return (
            "full",
            f"Long output at complexity {score:g} ({LONG_OUTPUT_COMPLEXITY} or above): full tier.",
        )
    task = _task_name(request.task_type)
    if task in SIMPLE_TASKS:
        label = task.replace("_", " ")
        return "mini", f"{label[0].upper()}{label[1:]} is a simple task: mini tier."
    if request.output_length == "short":
        return "mini", "Short answer expected: mini tier."
    return (
        "mini",
        f"Complexity {score:g} is below {FULL_COMPLEXITY} and the request is not critical: "
        "mini tier is enough.",
    )


class Router:
    """Picks a model for each :class:`RouteRequest`; thread-safe (breakers keep their own
    state; the router only remembers, for at most 1,024 request values, the default
    policy's decisions that needed no fallback, and still reads the chosen model's breaker
    on every call, so a circuit that opens is seen at once).

    - ``models``: the catalogue (:class:`ModelSpec` objects, or configuration accepted
      by :func:`ai_guard.pricing.parse_models`); the defaults are ``gpt-4o-mini`` (mini)
      and ``gpt-4o`` (full) at list prices. The catalogue also prices the routed calls.
    - ``breakers``: where to find each model's breaker (see the module docstring).
    - ``policy``: a :data:`RoutePolicy`; :func:`default_policy` when ``None``.
    - ``cross_tier_fallback``: whether a fallback may leave the chosen tier.

    ::

        router = Router(breakers={"gpt-4o-mini": mini_breaker, "gpt-4o": full_breaker})
        router.route(RouteRequest("classification", 2))
        # RouteDecision(model='gpt-4o-mini', tier='mini',
        #               reason='Classification is a simple task: mini tier. ...')
    """

    def __init__(
        self,
        models: Iterable[ModelSpec] | Mapping[str, Any] | None = None,
        *,
        breakers: BreakerSource = None,
        policy: RoutePolicy | None = None,
        cross_tier_fallback: bool = True,
    ) -> None:
        self.models: tuple[ModelSpec, ...] = (
            DEFAULT_MODELS if models is None else parse_models(models)
        )
        #: Model name -> spec: the price table of routed calls.
        self.catalog: ModelCatalog = model_catalog(self.models)
        if policy is not None and not callable(policy):
            raise ConfigError("policy", policy, "must be a callable (request, models)")
        self._policy: RoutePolicy = policy if policy is not None else default_policy
        self._breaker_for = _breaker_lookup(breakers, self.catalog)
        # Decisions of the default policy (a pure function of the request), remembered per
        # request value: (decision, the model whose breaker must not be open for it to
        # hold). Only decisions without a fallback are kept; a custom policy (which may
        # read the clock, a feature flag, a random draw) is asked every time.
        self._plans: dict[tuple[Any, ...], tuple[RouteDecision, str]] | None = (
            {} if policy is None else None
        )
        self._first_of_tier: dict[str, ModelSpec] = {}
        for spec in self.models:
            self._first_of_tier.setdefault(spec.tier, spec)
        # Candidates in fallback order for each preferred model, computed once.
        self._order: dict[str, tuple[ModelSpec, ...]] = {}
        for spec in self.models:
            same = [m for m in self.models if m.tier == spec.tier and m is not spec]
            other = [m for m in self.models if m.tier != spec.tier] if cross_tier_fallback else []
            self._order[spec.name] = (spec, *same, *other)

    def breaker_for(self, model: str) -> BreakerLike | None:
        """The breaker the router consults for ``model`` (``None`` when it has none)."""
        return self._breaker_for(model)

    def route(
        self, request: RouteRequest, *, unavailable: Mapping[str, float] | None = None
    ) -> RouteDecision:
        """Decide where ``request`` goes.

        ``unavailable`` maps models known to be unusable right now to the seconds until
        they may be tried again (``@routed`` passes the model whose call was just
        rejected); they are treated like a model whose breaker is open.

        Raises :class:`~ai_guard.errors.CircuitOpenError` when every candidate is open
        (``retry_after`` is the soonest), :class:`NoRouteError` when none can take the
        input.
        """
        plans = self._plans
        key = None
        if plans is not None and unavailable is None and type(request) is RouteRequest:
            # The hot path: the decision this request got before, if the model it chose is
            # still not open. The breaker is read on every call, as on the slow path.
            task, score = request.task_type, request.complexity_score
            # The value the default policy's decision depends on, for a request whose
            # fields have the plain types (an unusual type's equality with a plain value
            # does not promise the same decision). 2 and 2.0 give the same decision (the
            # reason formats the score with :g); 0.0 and -0.0 are equal but read
            # differently, so zero scores are told apart by their text.
            if type(task) is str and (type(score) is int or type(score) is float):
                key = (
                    task,
                    score if score else str(score),
                    request.is_critical,
                    request.output_length,
                    request.input_tokens,
                )
            plan = plans.get(key) if key is not None else None
            if plan is not None:
                breaker = self._breaker_for(plan[1])
                if breaker is None or breaker.state != "open":
                    return plan[0]
        if not isinstance(request, RouteRequest):
            raise TypeError(f"route() needs a RouteRequest, not {type(request).__name__}")
        decision = self._decide(request, unavailable)
        if plans is not None and key is not None and decision.fallback_from is None:
            if len(plans) >= _PLAN_LIMIT:
                # A stream of distinct requests (input_tokens differ every call) must not
                # grow memory: start over.
                self._plans = plans = {}
            plans[key] = (decision, decision.model)
        return decision

    def _decide(
        self, request: RouteRequest, unavailable: Mapping[str, float] | None
    ) -> RouteDecision:
        """The decision itself: the policy, then the candidates in fallback order."""
        target, reason = self._policy(request, self.models)
        preferred, note = self._resolve(target)
        notes = [reason] if note is None else [reason, note]
        tokens = request.input_tokens
        skipped: list[tuple[str, str, float]] = []  # (model, breaker name, retry_after)
        for candidate in self._order[preferred.name]:
            if tokens is not None and tokens > candidate.context_window:
                notes.append(
                    f"{candidate.name} skipped: {tokens:,} input tokens exceed its "
                    f"{candidate.context_window:,}-token context window."
                )
                continue
            if unavailable and candidate.name in unavailable:
                breaker = self._breaker_for(candidate.name)
                skipped.append(
                    (
                        candidate.name,
                        breaker.name if breaker is not None else candidate.name,
                        unavailable[candidate.name],
                    )
                )
                continue
            breaker = self._breaker_for(candidate.name)
            if breaker is not None and breaker.state == "open":
                skipped.append((candidate.name, breaker.name, float(breaker.retry_after)))
                continue
            if skipped:
                first, _, retry_after = skipped[0]
                notes.append(
                    f"{first}'s circuit is open (next trial in {retry_after:.1f} s): "
                    f"fell back to {candidate.name}."
                )
                return RouteDecision(candidate.name, candidate.tier, " ".join(notes), first)
            return RouteDecision(candidate.name, candidate.tier, " ".join(notes))
        if skipped:
            model, breaker_name, retry_after = min(skipped, key=lambda s: s[2])
            names = ", ".join(s[0] for s in skipped)
            raise CircuitOpenError(
                breaker_name,
                retry_after,
                message=(
                    f"every model's circuit is open ({names}); the soonest trial call "
                    f"({model}) is in {max(0.0, retry_after):.3f}s"
                ),
            )
        raise NoRouteError(
            f"no model can take {tokens:,} input tokens: " + " ".join(notes[1:])
            if tokens is not None
            else "no model available for this request"
        )

    def _resolve(self, target: ModelSpec | str) -> tuple[ModelSpec, str | None]:
        if isinstance(target, ModelSpec):
            spec = self.catalog.get(target.name)
            if spec is None:
                raise NoRouteError(f"the policy chose {target.name!r}, not in the catalogue")
            return spec, None
        if isinstance(target, str):
            spec = self.catalog.get(target)
            if spec is not None:
                return spec, None
            if target in TIERS:
                first = self._first_of_tier.get(target)
                if first is not None:
                    return first, None
                other = self.models[0]
                return other, f"No {target} model in the catalogue: using {other.name}."
        raise NoRouteError(f"the policy chose {target!r}: neither a model nor a tier")


#: Most request values a router remembers decisions for.
_PLAN_LIMIT = 1024


def _breaker_lookup(
    breakers: BreakerSource, catalog: Mapping[str, ModelSpec]
) -> Callable[[str], BreakerLike | None]:
    if breakers is None:
        return lambda model: None
    if isinstance(breakers, str):
        template = breakers
        try:
            template.format(model="m")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                "breakers", template, f"a name template may use only {{model}} ({exc!r})"
            ) from None
        if "{model}" not in template:
            raise ConfigError(
                "breakers", template, "a name template must contain {model}, e.g. 'openai:{model}'"
            )
        registry: list[Callable[[str], Any]] = []
        # The names of the catalogue's breakers, formatted once (a decision reads them on
        # every call); the breakers themselves are looked up each time.
        names = {model: template.format(model=model) for model in catalog}

        def from_registry(model: str) -> BreakerLike | None:
            if not registry:
                # Imported on first use, not at import time: routing must not pull in the
                # breaker module (and its store machinery) for users who route without it.
                registry.append(importlib.import_module("ai_guard.breaker").get_breaker)
            name = names.get(model)
            try:
                found: BreakerLike | None = registry[0](
                    name if name is not None else template.format(model=model)
                )
            except LookupError:
                return None
            return found

        return from_registry
    if isinstance(breakers, Mapping):
        table = dict(breakers)
        for model, breaker in table.items():
            if model not in catalog:
                raise ConfigError(
                    f"breakers[{model!r}]", model, "not a model of the router's catalogue"
                )
            if not all(hasattr(breaker, a) for a in ("name", "state", "retry_after")):
                raise ConfigError(
                    f"breakers[{model!r}]", breaker, "needs .name, .state and .retry_after"
                )
        return table.get
    if callable(breakers):
        return breakers
    raise ConfigError(
        "breakers",
        breakers,
        "expected a mapping, a name template like 'openai:{model}' or a callable model -> breaker",
    )


# -- the decorator -----------------------------------------------------------------------


def _find_request(args: Sequence[Any], kwargs: Mapping[str, Any]) -> RouteRequest:
    for value in kwargs.values():
        if isinstance(value, RouteRequest):
            return value
    for value in args:
        if isinstance(value, RouteRequest):
            return value
    raise TypeError("@routed without request= needs a RouteRequest among the call's arguments")


def _record_decision(ctx: CallContext, decision: RouteDecision) -> None:
    ctx.request_model = decision.model
    ctx.tier = decision.tier
    ctx.route_reason = decision.reason
    ctx.fallback_from = decision.fallback_from


def routed(
    router: Router,
    request: Callable[..., RouteRequest] | None = None,
    *,
    model_kwarg: str = "model",
    operation: str = "chat",
    provider: str = "openai",
    retry_on_open: bool = True,
    clock: Clock = SYSTEM_CLOCK,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Route every call of the decorated function and inject the model as ``model=``.

    - ``request``: called with the call's arguments, returns its :class:`RouteRequest`.
      Without it, the call must pass a ``RouteRequest`` argument (left in place).
    - A call that passes ``model=`` itself is not routed (the model is *pinned*); the
      context still gets its tier from the catalogue.
    - ``retry_on_open``: when the call raises ``CircuitOpenError`` for the chosen model,
      route again without it and call once more (see the module docstring).
    - ``operation`` / ``provider``: written into the context when ``@routed`` is the
      outermost guard, so that the call is logged and counted as an AI call even without
      ``@traced_ai``.

    Declare the model keyword with a default (``model: str = ""``) so that type checkers
    accept calls that leave it to the router; the default is never used::

        @routed(router, request=lambda text, **_: RouteRequest("classification", 2))
        def classify(text: str, *, model: str = "") -> ChatResult: ...
    """
    if not isinstance(router, Router):
        raise ConfigError("router", router, "must be an ai_guard.routing.Router")
    if request is not None and not callable(request):
        raise ConfigError("request", request, "must be a callable of the call's arguments")
    if not isinstance(model_kwarg, str) or not model_kwarg:
        raise ConfigError("model_kwarg", model_kwarg, "must be a keyword argument name")
    if not isinstance(clock, Clock):
        raise ConfigError("clock", clock, "must be a Clock (monotonic, time, sleep)")
    catalog = router.catalog

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            ctx, token = open_call(clock)
            if ctx.operation is None:
                ctx.operation = operation
                ctx.provider = provider
            ctx.catalog = catalog
            pinned = kwargs.get(model_kwarg)
            if pinned is not None:
                ctx.request_model = str(pinned)
                spec = find_model(ctx.request_model, catalog)
                ctx.tier = spec.tier if spec is not None else None
                ctx.route_reason = "Model pinned by the caller."
                return _call(fn, ctx, token, args, kwargs)
            try:
                route_request = (
                    request(*args, **kwargs) if request is not None else _find_request(args, kwargs)
                )
                decision = router.route(route_request)
            except BaseException as exc:
                close_call(ctx, token, clock, error=exc)
                raise
            # _record_decision, inlined: once per call.
            ctx.request_model = model = decision.model
            ctx.tier = decision.tier
            ctx.route_reason = decision.reason
            ctx.fallback_from = decision.fallback_from
            kwargs[model_kwarg] = model
            try:
                result = fn(*args, **kwargs)
            except CircuitOpenError as exc:
                if not retry_on_open or not _rejected_model(router, decision.model, exc):
                    close_call(ctx, token, clock, error=exc)
                    raise
                try:
                    decision = router.route(
                        route_request, unavailable={decision.model: exc.retry_after}
                    )
                    _record_decision(ctx, decision)
                    kwargs[model_kwarg] = decision.model
                    result = fn(*args, **kwargs)
                except BaseException as retry_exc:
                    close_call(ctx, token, clock, error=retry_exc)
                    raise
            except BaseException as exc:
                close_call(ctx, token, clock, error=exc)
                raise
            return close_call(ctx, token, clock, result=result)

        def _call(fn: Callable[P, R], ctx: CallContext, token: Any, args: Any, kwargs: Any) -> R:
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                close_call(ctx, token, clock, error=exc)
                raise
            return close_call(ctx, token, clock, result=result)

        return wrapper

    return decorate


def _rejected_model(router: Router, model: str, exc: CircuitOpenError) -> bool:
    """Whether ``exc`` is the chosen model's breaker refusing the call (rather than some
    other breaker deeper in the call): when the router knows that breaker, the names must
    match; otherwise any open circuit counts."""
    breaker = router.breaker_for(model)
    return breaker is None or breaker.name == exc.name


# -- a realistic mix ---------------------------------------------------------------------


def sample_traffic(n: int, *, seed: int = 0) -> list[RouteRequest]:
    """``n`` requests drawn from a documented, realistic mix of production traffic (for
    demos, load tests and the check that the default policy sends >= 85 % to mini):

    | share | task type      | complexity                      | output length                 |
    |-------|----------------|---------------------------------|-------------------------------|
    | 30 %  | classification | 1-4 uniform                     | short                         |
    | 20 %  | extraction     | 2-5 uniform                     | medium                        |
    | 15 %  | summarization  | 2-6 uniform                     | medium 80 %, long 20 %        |
    | 27 %  | chat           | 0-3: 50 %, 4-6: 40 %, 7-8: 10 % | short 30 %, medium 60 %, long |
    |       |                |                                 | 10 %                          |
    | 8 %   | generation     | 3-8 uniform                     | long                          |

    and 2 % of all requests critical. The default policy sends about 88 % of it to mini.
    """
    rng = random.Random(seed)
    requests: list[RouteRequest] = []
    for _ in range(n):
        draw = rng.random()
        critical = rng.random() < 0.02
        if draw < 0.30:
            req = RouteRequest("classification", rng.randint(1, 4), critical, "short")
        elif draw < 0.50:
            req = RouteRequest("extraction", rng.randint(2, 5), critical, "medium")
        elif draw < 0.65:
            length: OutputLength = "long" if rng.random() < 0.2 else "medium"
            req = RouteRequest("summarization", rng.randint(2, 6), critical, length)
        elif draw < 0.92:
            band = rng.random()
            score = (
                rng.randint(0, 3)
                if band < 0.5
                else rng.randint(4, 6)
                if band < 0.9
                else rng.randint(7, 8)
            )
            shape = rng.random()
            length = "short" if shape < 0.3 else "medium" if shape < 0.9 else "long"
            req = RouteRequest("chat", score, critical, length)
        else:
            req = RouteRequest("generation", rng.randint(3, 8), critical, "long")
        requests.append(req)
    return requests
