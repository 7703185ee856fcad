"""A Flask app whose views call an LLM safely: every ai_guard decorator, the extension,
its blueprint and dashboard.

Run it against any OpenAI-compatible API (``OPENAI_BASE_URL``, ``OPENAI_API_KEY``)::

    flask --app 'examples.flask_app:create_app()' run
    gunicorn -w 4 'examples.flask_app:create_app()'

    # 4 workers sharing breakers, pacing and idempotency keys through Redis:
    export FLASK_AI_GUARD_STORE_URL=redis://127.0.0.1:6379/0
    gunicorn -w 4 'examples.flask_app:create_app()'

or offline, against the embedded fake upstream: ``python -m ai_guard demo --serve``.

Routes:

- ``POST /answers`` ``{"question", "task", "complexity", "critical"}``: the guarded client
  (:class:`~ai_guard.client.AIClient`) routes the question to the mini or full model, with
  a breaker per model, retries, pacing and a span; the view is ``@guard.idempotent()``, so
  a client retrying with the same ``Idempotency-Key`` gets the stored answer.
- ``POST /classify`` ``{"text"}``: the same guards stacked by hand, in the recommended
  order, on a plain HTTP call (``@routed`` -> ``@traced_ai`` -> ``@circuit_breaker`` ->
  ``@rate_limited``).
- ``GET /stream?question=...``: the answer as Server-Sent Events, relayed as it arrives.
- ``POST /extract`` ``{"text"}``: a support ticket as strict structured output.
- ``/ai-guard/`` the dashboard; ``/ai-guard/metrics``, ``/metrics/prometheus``, ``/slo``,
  ``/health``.

Settings (``app.config``, from ``create_app(config)`` or ``FLASK_*`` environment variables):
``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` (default: the environment variables of those
names), ``AI_TIMEOUT`` (seconds, or ``[connect, read]``), ``AI_BREAKER`` (options of
:func:`~ai_guard.breaker.circuit_breaker`), ``AI_RETRIES``, ``AI_RATE_LIMIT`` (options of
:func:`~ai_guard.ratelimit.rate_limited`), ``AI_SYSTEM_PROMPT``, and every
``AI_GUARD_*`` key of the extension.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from flask import Blueprint, Flask, Response, current_app, jsonify, request, stream_with_context
from pydantic import BaseModel, Field, ValidationError

from ai_guard.breaker import circuit_breaker
from ai_guard.client import AIClient
from ai_guard.errors import (
    CircuitOpenError,
    ConfigError,
    RateLimitExceeded,
    StructuredOutputError,
    UpstreamError,
)
from ai_guard.flask import AIGuard
from ai_guard.pacing import RateLimitBudget
from ai_guard.ratelimit import rate_limited
from ai_guard.routing import Router, RouteRequest, routed
from ai_guard.stores import Store
from ai_guard.tracing import traced_ai
from ai_guard.types import ChatResult, StreamEvent

#: One extension object for every app the factory makes (the Flask extension pattern).
guard = AIGuard()
assistant = Blueprint("assistant", __name__)

#: The breaker of each model: the router skips a model whose breaker is open.
BREAKER_NAME = "openai:{model}"

DEFAULTS: dict[str, Any] = {
    "OPENAI_BASE_URL": None,  # None: the OPENAI_BASE_URL environment variable, else OpenAI
    "OPENAI_API_KEY": None,  # None: the OPENAI_API_KEY environment variable
    "AI_TIMEOUT": (5.0, 30.0),
    "AI_BREAKER": {"failure_threshold": 5, "timeout": 30.0},
    "AI_RETRIES": 3,
    "AI_RATE_LIMIT": {"base_delay": 0.5, "max_delay": 10.0, "max_total_wait": 20.0},
    "AI_SYSTEM_PROMPT": (
        "You are the support assistant of a bicycle shop. Answer briefly and precisely."
    ),
}


class Question(BaseModel):
    """The body of ``POST /answers``: what to ask and what the router needs to know."""

    question: str = Field(min_length=1, max_length=8000)
    task: str = "chat"
    complexity: float = Field(default=3, ge=0, le=10)
    critical: bool = False
    output: Literal["short", "medium", "long"] = "medium"

    def route(self) -> RouteRequest:
        return RouteRequest(self.task, self.complexity, self.critical, self.output)


class Text(BaseModel):
    text: str = Field(min_length=1, max_length=8000)


class Ticket(BaseModel):
    """What ``POST /extract`` pulls out of a customer's message."""

    category: Literal["billing", "bug", "feature_request", "other"]
    urgency: int = Field(ge=1, le=5, description="1 (whenever) to 5 (now)")
    summary: str
    customer_name: str | None


@dataclass(frozen=True)
class Assistant:
    """What the views of one app use (``app.extensions["assistant"]``)."""

    client: AIClient
    classify: Callable[..., ChatResult]
    system_prompt: str

    def messages(self, text: str) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": text},
        ]


def build_assistant(config: Mapping[str, Any], store: Store, store_url: str) -> Assistant:
    """The guarded client, and the same guards stacked by hand around a bare client.

    Both use the app's store (``AI_GUARD_STORE_URL``): with Redis, every worker shares the
    breakers' state and the pacing budget. Breakers are process-wide (the health endpoint
    lists them), so they get the store's URL rather than the object: a second app built
    in the same process with the same settings (a test suite) finds them as they are.
    """
    router = Router(breakers=BREAKER_NAME)
    breaker_options = {"name": BREAKER_NAME, "store": store_url, **config["AI_BREAKER"]}
    client = AIClient(
        config["OPENAI_BASE_URL"],
        config["OPENAI_API_KEY"],
        router=router,
        breaker=breaker_options,
        retries=config["AI_RETRIES"],
        rate_limit=config["AI_RATE_LIMIT"],
        store=store,
        timeout=config["AI_TIMEOUT"],
    )
    # A plain HTTP client: no breaker, no retries, no pacing, no span of its own.
    bare = AIClient(
        config["OPENAI_BASE_URL"],
        config["OPENAI_API_KEY"],
        breaker=False,
        retries=False,
        budget=False,
        tracing=False,
        timeout=config["AI_TIMEOUT"],
    )
    # The same budget key as the guarded client's: both pace the same upstream quota.
    budget = RateLimitBudget(store, key=f"{client.base_url}|{{model}}")

    # The recommended order, outermost first: the breaker sees one outcome per logical
    # call (after the retries), and the span covers the retries.
    @routed(router, request=lambda text, **_: RouteRequest("classification", 2, False, "short"))
    @traced_ai(operation="chat")
    @circuit_breaker(BREAKER_NAME, store=store_url, **config["AI_BREAKER"])
    @rate_limited(
        max_retries=config["AI_RETRIES"],
        retry_on_status=(429, 500, 502, 503, 504),
        budget=budget,
        **config["AI_RATE_LIMIT"],
    )
    def classify(text: str, *, key: str, model: str = "") -> ChatResult:
        # ``key`` is made once per logical call, so every retry carries the same one.
        return bare.chat(
            [
                {"role": "system", "content": "Answer with one word: the topic."},
                {"role": "user", "content": text},
            ],
            model=model,
            idempotency_key=key,
            max_tokens=5,
        )

    return Assistant(client=client, classify=classify, system_prompt=config["AI_SYSTEM_PROMPT"])


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """The app factory: defaults, then ``FLASK_*`` environment variables, then ``config``."""
    app = Flask(__name__)
    app.config.update(DEFAULTS)
    app.config.from_prefixed_env()  # e.g. FLASK_AI_GUARD_STORE_URL=redis://...
    app.config.update(config or {})
    guard.init_app(app)
    state = guard.state(app)
    app.extensions["assistant"] = build_assistant(app.config, state.store, state.config.store_url)
    app.register_blueprint(assistant)
    _register_error_handlers(app)
    return app


def _assistant() -> Assistant:
    found: Assistant = current_app.extensions["assistant"]
    return found


# -- views ----------------------------------------------------------------------------------


@assistant.post("/answers")
@guard.idempotent()
def answer() -> Response:
    """Route the question to a model and answer it (idempotent per ``Idempotency-Key``)."""
    question = Question.model_validate(request.get_json(silent=True) or {})
    ai = _assistant()
    result = ai.client.chat(ai.messages(question.question), route=question.route(), max_tokens=300)
    return jsonify(answer=result.content, model=result.model, usage=asdict(result.usage))


@assistant.post("/classify")
def classify() -> Response:
    """A one-word topic, through the hand-stacked guards."""
    from ai_guard.idempotency import generate_idempotency_key

    text = Text.model_validate(request.get_json(silent=True) or {})
    result = _assistant().classify(text.text, key=generate_idempotency_key("classify"))
    return jsonify(topic=result.content.strip(), model=result.model)


@assistant.get("/stream")
def stream() -> Response:
    """The answer as Server-Sent Events, relayed delta by delta."""
    question = Question(question=request.args.get("question", ""), task="chat", complexity=3)
    ai = _assistant()
    events = ai.client.stream_chat(ai.messages(question.question), route=question.route())
    # The request goes out at the first step: an open circuit or an error status raises
    # here, while a proper error response can still be sent.
    first = next(events, None)

    def relay() -> Iterator[str]:
        pending: list[StreamEvent] = [first] if first is not None else []
        for event in _chain(pending, events):
            if event.type == "content":
                yield f"data: {json.dumps({'delta': event.content})}\n\n"
            elif event.type == "usage" and event.usage is not None:
                yield f"event: usage\ndata: {json.dumps(asdict(event.usage))}\n\n"
            elif event.type == "error":
                yield f"event: error\ndata: {json.dumps({'error': str(event.error)})}\n\n"
        yield "data: [DONE]\n\n"

    return Response(
        stream_with_context(relay()),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _chain(first: list[StreamEvent], rest: Iterator[StreamEvent]) -> Iterator[StreamEvent]:
    yield from first
    yield from rest


@assistant.post("/extract")
@guard.idempotent()
def extract() -> Response:
    """A support ticket from a customer's message, as validated structured output."""
    text = Text.model_validate(request.get_json(silent=True) or {})
    ai = _assistant()
    ticket = ai.client.parse(
        ai.messages(f"Turn this message into a ticket:\n{text.text}"),
        Ticket,
        route=RouteRequest("extraction", 3),
    )
    return jsonify(ticket.model_dump())


# -- errors: graceful degradation, as problem+json ------------------------------------------


def _problem(status: int, title: str, detail: str, retry_after: float | None = None) -> Response:
    response = jsonify(type="about:blank", title=title, status=status, detail=detail)
    response.status_code = status
    response.mimetype = "application/problem+json"
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(retry_after)))
    return response


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ValidationError)
    def invalid_body(exc: ValidationError) -> Response:
        return _problem(400, "Invalid request body", str(exc.errors(include_url=False)))

    @app.errorhandler(ConfigError)
    def invalid_route(exc: ConfigError) -> Response:
        return _problem(400, "Invalid request", str(exc))

    @app.errorhandler(CircuitOpenError)
    def circuit_open(exc: CircuitOpenError) -> Response:
        # Every model that could answer is down: say when to come back.
        return _problem(503, "AI temporarily unavailable", str(exc), exc.retry_after)

    @app.errorhandler(RateLimitExceeded)
    def rate_limited_out(exc: RateLimitExceeded) -> Response:
        return _problem(429, "AI rate limit reached", str(exc), exc.retry_after or 1.0)

    @app.errorhandler(StructuredOutputError)
    def bad_structure(exc: StructuredOutputError) -> Response:
        return _problem(502, "Unusable AI answer", str(exc))

    @app.errorhandler(UpstreamError)
    def upstream_failed(exc: UpstreamError) -> Response:
        return _problem(502, "AI upstream error", str(exc))
