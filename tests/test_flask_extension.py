"""AIGuard follows the Flask extension guide: settings, per-app state, sinks, tracing,
breaker transitions and idempotent views."""

from __future__ import annotations

import io
import logging
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask, Response, jsonify, request, stream_with_context
from opentelemetry.instrumentation.flask import FlaskInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from ai_guard.breaker import CircuitBreaker, default_registry
from ai_guard.context import bind_sinks, bound_sinks, default_sinks
from ai_guard.errors import CircuitOpenError, ConfigError, UpstreamError
from ai_guard.flask import AIGuard, AIGuardState, current_state, load_settings
from ai_guard.flask._extension import SinkBindingMiddleware, _BoundBody, own_urls_pattern
from ai_guard.idempotency import idempotent
from ai_guard.logs import log_call
from ai_guard.metrics import MetricsCollector
from ai_guard.prometheus import default_prometheus_sink
from ai_guard.stores import MemoryStore
from ai_guard.testing import FakeClock
from ai_guard.tracing import breaker_span_event, traced_ai
from ai_guard.types import ChatResult, Usage

# -- helpers ------------------------------------------------------------------------------------


@traced_ai(operation="chat")
def ask(prompt: str, *, model: str = "gpt-4o-mini") -> ChatResult:
    """An AI call as the guards see it (no network)."""
    if prompt == "fail":
        raise UpstreamError("upstream down", status=503)
    return ChatResult(content="ok", model=model, usage=Usage(1200, 80, 1280, 1024))


def make_app(name: str = "app", **config: Any) -> Flask:
    app = Flask(name)
    app.config.update(config)
    return app


def add_ai_view(app: Flask) -> None:
    @app.get("/ask")
    def ask_view() -> Response:
        ask(request.args.get("prompt", "hi"), model=request.args.get("model", "gpt-4o-mini"))
        return jsonify(ok=True)


@pytest.fixture
def breaker_name() -> Iterator[str]:
    name = f"test-ext-{uuid.uuid4().hex[:8]}"
    yield name
    default_registry().remove(name)


# -- settings -----------------------------------------------------------------------------------


def test_settings_have_documented_defaults() -> None:
    app = make_app()
    AIGuard(app)
    settings = current_state(app).config
    assert settings.store_url == "memory://"
    assert settings.idempotency_ttl == 86400.0
    assert settings.url_prefix == "/ai-guard"
    assert settings.tracing is True
    assert settings.dashboard_refresh == 10.0
    assert settings.critical_breakers == ()
    assert settings.metrics_token is None
    assert settings.slos.availability == 0.999


def test_app_config_overrides_constructor_options() -> None:
    ext = AIGuard(url_prefix="/ops/ai", idempotency_ttl=60, tracing=False)
    plain = make_app("plain")
    overridden = make_app("overridden", AI_GUARD_URL_PREFIX="/mine", AI_GUARD_TRACING="on")
    ext.init_app(plain)
    ext.init_app(overridden)
    assert current_state(plain).config.url_prefix == "/ops/ai"
    assert current_state(plain).config.tracing is False
    assert current_state(overridden).config.url_prefix == "/mine"
    assert current_state(overridden).config.tracing is True
    assert current_state(overridden).config.idempotency_ttl == 60
    assert plain.test_client().get("/ops/ai/health").status_code == 200
    assert overridden.test_client().get("/mine/health").status_code == 200
    assert overridden.test_client().get("/ops/ai/health").status_code == 404


@pytest.mark.parametrize(
    ("key", "value", "setting"),
    [
        ("AI_GUARD_STORE_URL", "memcached://127.0.0.1", "AI_GUARD_STORE_URL"),
        ("AI_GUARD_IDEMPOTENCY_TTL", -1, "AI_GUARD_IDEMPOTENCY_TTL"),
        ("AI_GUARD_IDEMPOTENCY_TTL", "a day", "AI_GUARD_IDEMPOTENCY_TTL"),
        ("AI_GUARD_URL_PREFIX", "ai-guard/", "AI_GUARD_URL_PREFIX"),
        ("AI_GUARD_URL_PREFIX", "/", "AI_GUARD_URL_PREFIX"),
        ("AI_GUARD_TRACING", "maybe", "AI_GUARD_TRACING"),
        ("AI_GUARD_DASHBOARD_REFRESH", -5, "AI_GUARD_DASHBOARD_REFRESH"),
        ("AI_GUARD_DASHBOARD_WINDOW", 30 * 86400, "AI_GUARD_DASHBOARD_WINDOW"),
        ("AI_GUARD_METRICS_TOKEN", "short", "AI_GUARD_METRICS_TOKEN"),
        ("AI_GUARD_METRICS_TOKEN", "sixteen chars with spaces", "AI_GUARD_METRICS_TOKEN"),
        ("AI_GUARD_METRICS_AUTH", "not a callable", "AI_GUARD_METRICS_AUTH"),
        ("AI_GUARD_CRITICAL_BREAKERS", ["openai", " "], "AI_GUARD_CRITICAL_BREAKERS"),
        ("AI_GUARD_EXCLUDED_URLS", "healthz,(unclosed", "AI_GUARD_EXCLUDED_URLS"),
        ("AI_GUARD_SLOS", {"availability": 2}, "AI_GUARD_SLOS.availability"),
        ("AI_GUARD_SLOS", "{not json", "AI_GUARD_SLOS"),
        (
            "AI_GUARD_MODELS",
            [{"name": "m", "tier": "huge", "input_price": 1, "output_price": 1}],
            "AI_GUARD_MODELS[0].tier",
        ),
        ("AI_GUARD_SINKS", ["not callable"], "AI_GUARD_SINKS.0"),
        ("AI_GUARD_METRICS_RESOLUTION", 7, "AI_GUARD_METRICS_RESOLUTION"),
        ("AI_GUARD_METRICS_RESOLUTION", 0, "AI_GUARD_METRICS_RESOLUTION"),
    ],
)
def test_a_bad_setting_fails_at_init_app_naming_the_config_key(
    key: str, value: Any, setting: str
) -> None:
    app = make_app(**{key: value})
    with pytest.raises(ConfigError) as caught:
        AIGuard(app)
    assert caught.value.setting == setting
    assert setting in str(caught.value)
    assert "ai_guard" not in app.extensions


def test_a_misspelt_key_is_rejected_with_a_suggestion() -> None:
    app = make_app(AI_GUARD_STORE_ULR="redis://127.0.0.1:6379/0")
    with pytest.raises(ConfigError, match="did you mean AI_GUARD_STORE_URL") as caught:
        AIGuard(app)
    assert caught.value.setting == "AI_GUARD_STORE_ULR"


def test_an_unknown_option_is_rejected_when_the_extension_is_built() -> None:
    with pytest.raises(ConfigError, match="unknown AIGuard option") as caught:
        AIGuard(url_prefx="/x")
    assert caught.value.setting == "url_prefx"


def test_metrics_token_and_metrics_auth_together_are_rejected() -> None:
    app = make_app(AI_GUARD_METRICS_AUTH=lambda request: True, AI_GUARD_METRICS_TOKEN="x" * 32)
    with pytest.raises(ConfigError, match="not both") as caught:
        AIGuard(app)
    assert caught.value.setting == "AI_GUARD_METRICS_TOKEN"


def test_settings_from_environment_text_are_parsed() -> None:
    settings = load_settings(
        {
            "AI_GUARD_SLOS": '{"availability": 0.995, "monthly_cost_usd": 2000}',
            "AI_GUARD_CRITICAL_BREAKERS": "openai:gpt-4o, openai:gpt-4o-mini",
            "AI_GUARD_EXCLUDED_URLS": "healthz,static/.*",
            "AI_GUARD_TRACING": "false",
            "AI_GUARD_DASHBOARD_REFRESH": "2.5",
            "AI_GUARD_MODELS": '{"m1": {"tier": "mini", "input_price": 0.1, "output_price": 0.4}}',
            "SECRET_KEY": "not ours",
        }
    )
    assert settings.slos.availability == 0.995
    assert settings.slos.monthly_cost_usd == 2000
    assert settings.critical_breakers == ("openai:gpt-4o", "openai:gpt-4o-mini")
    assert settings.excluded_urls == ("healthz", "static/.*")
    assert settings.tracing is False
    assert settings.dashboard_refresh == 2.5
    assert settings.models is not None
    assert settings.models[0].name == "m1"


def test_the_token_is_kept_secret_in_reprs() -> None:
    settings = load_settings({"AI_GUARD_METRICS_TOKEN": "s3cr3t-token-0123456789"})
    assert "s3cr3t" not in repr(settings)
    assert settings.metrics_token is not None
    assert settings.metrics_token.get_secret_value() == "s3cr3t-token-0123456789"


# -- the extension guide -------------------------------------------------------------------------


def test_state_lives_in_app_extensions_and_the_extension_keeps_no_app() -> None:
    ext = AIGuard()
    app = make_app()
    ext.init_app(app)
    state = app.extensions["ai_guard"]
    assert isinstance(state, AIGuardState)
    assert ext.state(app) is state
    assert not any(isinstance(value, Flask) for value in vars(ext).values())
    with app.app_context():
        assert current_state() is state


def test_init_app_twice_on_one_app_is_an_error() -> None:
    ext = AIGuard()
    app = make_app()
    ext.init_app(app)
    with pytest.raises(RuntimeError, match="already initialised"):
        ext.init_app(app)


def test_current_state_without_the_extension_says_what_to_do() -> None:
    app = make_app()
    with pytest.raises(RuntimeError, match=r"AIGuard\(app\)"):
        current_state(app)


def test_two_apps_in_one_process_have_their_own_store_and_collector() -> None:
    ext = AIGuard(tracing=False)
    first, second = make_app("first"), make_app("second")
    for app in (first, second):
        ext.init_app(app)
        add_ai_view(app)
    a, b = current_state(first), current_state(second)
    assert a.store is not b.store
    assert a.collector is not b.collector

    for _ in range(3):
        assert first.test_client().get("/ask").status_code == 200
    assert second.test_client().get("/ask").status_code == 200

    assert a.collector.report()["total_requests"] == 3
    assert b.collector.report()["total_requests"] == 1


def test_a_shared_store_and_collector_can_be_given_as_objects() -> None:
    store = MemoryStore()
    collector = MetricsCollector()
    ext = AIGuard(store=store, collector=collector, tracing=False)
    app = make_app()
    ext.init_app(app)
    assert current_state(app).store is store
    assert current_state(app).collector is collector
    # ... unless the app's config names another store.
    other = make_app("other", AI_GUARD_STORE_URL="memory://?maxsize=10")
    ext.init_app(other)
    assert current_state(other).store is not store


def test_slos_on_both_a_given_collector_and_the_config_is_an_error() -> None:
    app = make_app(AI_GUARD_SLOS={"availability": 0.99})
    with pytest.raises(ConfigError, match="collector") as caught:
        AIGuard(app, collector=MetricsCollector())
    assert caught.value.setting == "AI_GUARD_SLOS"


def test_slos_and_models_from_the_config_reach_the_collector() -> None:
    app = make_app(
        AI_GUARD_SLOS={"availability": 0.99},
        AI_GUARD_MODELS=[
            {"name": "house-small", "tier": "mini", "input_price": 1.0, "output_price": 2.0}
        ],
        AI_GUARD_TRACING=False,
    )
    AIGuard(app)
    add_ai_view(app)
    app.test_client().get("/ask", query_string={"model": "house-small"})
    collector = current_state(app).collector
    assert collector.slos.availability == 0.99
    report = collector.report()
    assert report["mini_requests"] == 1
    assert report["total_cost_usd"] == pytest.approx((176 * 1.0 + 80 * 2.0 + 1024 * 1.0) / 1e6)


# -- sinks per request ---------------------------------------------------------------------------


def test_an_ai_call_during_a_request_is_counted_by_the_app_not_the_default_sinks() -> None:
    app = make_app(AI_GUARD_TRACING=False)
    AIGuard(app)
    add_ai_view(app)
    seen: list[Any] = []
    with bind_sinks(seen.append):  # stands in for the process-wide defaults
        assert app.test_client().get("/ask").status_code == 200
    assert seen == []
    assert current_state(app).collector.report()["total_requests"] == 1


def test_the_sinks_are_unbound_once_the_request_is_over() -> None:
    app = make_app(AI_GUARD_TRACING=False)
    AIGuard(app)
    during: list[tuple[Any, ...]] = []

    @app.get("/sinks")
    def sinks() -> str:
        during.append(bound_sinks())
        return "ok"

    app.test_client().get("/sinks")
    state = current_state(app)
    assert during == [state.sinks]
    assert state.sinks[:2] == (state.collector.record_call, log_call)
    assert bound_sinks() == default_sinks()


def test_a_failing_view_still_unbinds_the_sinks() -> None:
    app = make_app(AI_GUARD_TRACING=False)
    AIGuard(app)

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("boom")

    app.testing = False
    assert app.test_client().get("/boom").status_code == 500
    assert bound_sinks() == default_sinks()


@pytest.mark.parametrize("keep_context", [False, True])
def test_an_ai_call_made_while_a_response_streams_is_counted_by_the_app(
    keep_context: bool,
) -> None:
    app = make_app(AI_GUARD_TRACING=False)
    AIGuard(app)

    @app.get("/stream")
    def stream() -> Response:
        def body() -> Iterator[str]:
            yield "start\n"
            yield ask("hi").content + "\n"  # runs after the view has returned
            yield "end\n"

        return Response(stream_with_context(body()) if keep_context else body())

    response = app.test_client().get("/stream")
    assert response.get_data(as_text=True) == "start\nok\nend\n"
    assert current_state(app).collector.report()["total_requests"] == 1
    assert bound_sinks() == default_sinks()


def test_an_ai_call_from_a_background_thread_goes_to_the_default_sinks() -> None:
    app = make_app(AI_GUARD_TRACING=False)
    AIGuard(app)
    seen: list[Any] = []
    threads: list[threading.Thread] = []

    @app.get("/later")
    def later() -> str:
        thread = threading.Thread(target=ask, args=("hi",))
        threads.append(thread)
        return "accepted"

    from ai_guard.context import register_default_sink, unregister_default_sink

    register_default_sink(seen.append)
    try:
        app.test_client().get("/later")
        threads[0].start()  # after the request, as a real background job would be
        threads[0].join(timeout=10)
    finally:
        unregister_default_sink(seen.append)
    assert len(seen) == 1
    assert current_state(app).collector.report()["total_requests"] == 0


def test_each_call_in_a_request_gets_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(AI_GUARD_TRACING=False)
    AIGuard(app)
    add_ai_view(app)
    with caplog.at_level(logging.INFO, logger="ai_guard"):
        app.test_client().get("/ask")
    calls = [r for r in caplog.records if getattr(r, "event", None) == "ai_call"]
    assert len(calls) == 1
    assert calls[0].model == "gpt-4o-mini"  # type: ignore[attr-defined]


def test_extra_sinks_are_bound_too() -> None:
    seen: list[Any] = []
    app = make_app(AI_GUARD_TRACING=False, AI_GUARD_SINKS=[seen.append])
    AIGuard(app)
    add_ai_view(app)
    app.test_client().get("/ask")
    assert len(seen) == 1
    assert current_state(app).collector.report()["total_requests"] == 1


def test_prometheus_multiprocess_mode_binds_the_process_prometheus_sink(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    app = make_app(AI_GUARD_TRACING=False)
    AIGuard(app)
    assert default_prometheus_sink() not in current_state(app).sinks
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    other = make_app("other", AI_GUARD_TRACING=False)
    AIGuard(other)
    assert current_state(other).sinks.count(default_prometheus_sink()) == 1


def _body_of(app: Flask, path: str) -> Any:
    """What the app's WSGI callable hands the server for ``GET path`` (not iterated)."""
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
    }
    return app.wsgi_app(environ, _start_response)


def _start_response(
    status: str, headers: list[tuple[str, str]], exc_info: Any = None, /
) -> Callable[[bytes], object]:
    return lambda data: None


def test_a_response_built_at_once_goes_to_the_server_unwrapped() -> None:
    """Its body runs no code of the app, so no per-step sink binding is paid for it."""
    app = make_app(AI_GUARD_TRACING=False)
    AIGuard(app)
    add_ai_view(app)
    body = _body_of(app, "/ask")
    assert not isinstance(body, _BoundBody)
    assert b"".join(body) == b'{"ok":true}\n'
    body.close()
    assert current_state(app).collector.report()["total_requests"] == 1


def test_an_ai_call_in_a_call_on_close_callback_is_counted_by_the_app() -> None:
    app = make_app(AI_GUARD_TRACING=False)
    AIGuard(app)

    @app.get("/close")
    def close_view() -> Response:
        response = jsonify(ok=True)
        response.call_on_close(lambda: ask("after"))  # runs when the server closes the body
        return response

    body = _body_of(app, "/close")
    assert isinstance(body, _BoundBody)
    assert b"".join(body) == b'{"ok":true}\n'
    assert current_state(app).collector.report()["total_requests"] == 0
    body.close()
    assert current_state(app).collector.report()["total_requests"] == 1
    assert bound_sinks() == default_sinks()


def test_a_generator_body_is_wrapped() -> None:
    app = make_app(AI_GUARD_TRACING=False)
    AIGuard(app)

    @app.get("/gen")
    def gen() -> Response:
        return Response(iter([b"a", b"b"]))

    body = _body_of(app, "/gen")
    assert isinstance(body, _BoundBody)
    assert b"".join(body) == b"ab"
    body.close()


def test_a_file_response_is_passed_to_the_server_untouched() -> None:
    class FileWrapper:
        def __init__(self, file: Any, block_size: int = 8192) -> None:
            self.file = file

        def __iter__(self) -> Iterator[bytes]:
            return iter([b"file"])

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        start_response("200 OK", [])
        return environ.get("wsgi.file_wrapper", FileWrapper)(None)

    middleware = SinkBindingMiddleware(wsgi, ())
    body = middleware({"wsgi.file_wrapper": FileWrapper}, lambda *a: None)
    assert isinstance(body, FileWrapper)
    # A server without a file wrapper: the body is iterated like any other.
    plain = middleware({}, lambda *a: None)
    assert not isinstance(plain, FileWrapper)
    assert list(plain) == [b"file"]


# -- tracing -------------------------------------------------------------------------------------


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def test_ai_spans_nest_under_request_spans_and_the_blueprint_makes_none(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(AI_GUARD_TRACER_PROVIDER=provider)
    AIGuard(app)

    @traced_ai(operation="chat", tracer_provider=provider)
    def traced_ask(prompt: str, *, model: str) -> ChatResult:
        return ChatResult(content="ok", model=model, usage=Usage(10, 2, 12, 0))

    @app.get("/ask")
    def ask_view() -> str:
        return traced_ask("hi", model="gpt-4o-mini").content

    client = app.test_client()
    assert client.get("/ask").status_code == 200
    for path in ("/ai-guard/metrics", "/ai-guard/health", "/ai-guard/", "/ai-guard/slo?window=60"):
        assert client.get(path).status_code == 200
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    (client_span,) = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert server.name == "GET /ask"
    assert client_span.parent is not None
    assert client_span.parent.span_id == server.context.span_id
    FlaskInstrumentor().uninstrument_app(app)  # type: ignore[no-untyped-call]


def test_excluded_urls_add_to_the_blueprint_urls(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(AI_GUARD_TRACER_PROVIDER=provider, AI_GUARD_EXCLUDED_URLS="healthz")

    @app.get("/healthz")
    def healthz() -> str:
        return "ok"

    @app.get("/users/ai-guard")
    def lookalike() -> str:
        return "not the blueprint"

    AIGuard(app)
    client = app.test_client()
    client.get("/healthz")
    client.get("/users/ai-guard")
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == ["GET /users/ai-guard"]
    FlaskInstrumentor().uninstrument_app(app)  # type: ignore[no-untyped-call]


def test_own_urls_pattern_matches_the_prefix_only() -> None:
    import re

    pattern = re.compile(own_urls_pattern("/ai-guard"))
    assert pattern.search("http://localhost/ai-guard/metrics")
    assert pattern.search("https://h:8000/ai-guard?window=3")
    assert pattern.search("http://h/ai-guard")
    assert not pattern.search("http://h/ai-guardian")
    assert not pattern.search("http://h/x/ai-guard/metrics")
    assert not pattern.search("http://h/ask?next=/ai-guard/")


def test_tracing_off_leaves_the_app_uninstrumented(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(AI_GUARD_TRACING=False, AI_GUARD_TRACER_PROVIDER=provider)
    AIGuard(app)
    app.test_client().get("/ai-guard/health")
    assert not getattr(app, "_is_instrumented_by_opentelemetry", False)
    assert exporter.get_finished_spans() == ()


def test_an_app_already_instrumented_is_not_instrumented_twice(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app()

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    FlaskInstrumentor().instrument_app(app, tracer_provider=provider)  # type: ignore[no-untyped-call]
    AIGuard(app, tracer_provider=provider)
    app.test_client().get("/ping")
    assert [s.name for s in exporter.get_finished_spans()] == ["GET /ping"]
    FlaskInstrumentor().uninstrument_app(app)  # type: ignore[no-untyped-call]


# -- breakers ------------------------------------------------------------------------------------


def test_a_breaker_state_change_is_a_span_event_a_log_line_and_kept_for_the_dashboard(
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    breaker_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app(AI_GUARD_TRACING=False)
    AIGuard(app)
    clock = FakeClock()
    breaker = CircuitBreaker(breaker_name, failure_threshold=2, timeout=5, clock=clock)

    @traced_ai(operation="chat", tracer_provider=provider)
    @breaker
    def flaky(*, model: str) -> ChatResult:
        raise UpstreamError("down", status=503)

    with caplog.at_level(logging.INFO, logger="ai_guard"):
        for _ in range(2):
            with pytest.raises(UpstreamError):
                flaky(model="gpt-4o-mini")
    with pytest.raises(CircuitOpenError):
        flaky(model="gpt-4o-mini")

    events = [e for s in exporter.get_finished_spans() for e in s.events]
    changes = [e for e in events if e.name == "ai_guard.circuit.state_change"]
    assert len(changes) == 1
    assert changes[0].attributes is not None
    assert changes[0].attributes["ai_guard.circuit.state"] == "open"
    assert any(
        r.levelno == logging.WARNING and breaker_name in r.getMessage() for r in caplog.records
    )
    state = current_state(app)
    (transition,) = [t for t in state.recent_transitions() if t["breaker"] == breaker_name]
    assert (transition["from_state"], transition["to_state"]) == ("closed", "open")
    assert state.transition_count(breaker_name, "open") == 1


def test_the_breaker_listeners_are_registered_once_per_process() -> None:
    for name in ("one", "two", "three"):
        AIGuard(make_app(name, AI_GUARD_TRACING=False))
    listeners = default_registry().listeners
    assert listeners.count(breaker_span_event) == 1
    feeds = [x for x in listeners if getattr(x, "__name__", "") == "publish"]
    assert len(feeds) == 1


def test_the_transition_ring_is_bounded(breaker_name: str) -> None:
    app = make_app(AI_GUARD_TRACING=False)
    AIGuard(app)
    clock = FakeClock()
    breaker = CircuitBreaker(breaker_name, failure_threshold=1, timeout=1, clock=clock)

    def fail() -> None:
        raise UpstreamError("down", status=503)

    for _ in range(40):  # each round: closed -> open -> (reset) closed
        with pytest.raises(UpstreamError):
            breaker.call(fail)
        breaker.reset()
    state = current_state(app)
    assert len(state.transitions) == 50
    assert state.transition_count(breaker_name, "open") == 40


# -- idempotent views ----------------------------------------------------------------------------


def make_order_app(ext: AIGuard, **config: Any) -> tuple[Flask, list[int]]:
    app = make_app(AI_GUARD_TRACING=False, **config)
    ext.init_app(app)
    orders: list[int] = []

    @app.post("/orders")
    @ext.idempotent()
    def create_order() -> tuple[Response, int]:
        orders.append(len(orders) + 1)
        return jsonify(order=len(orders)), 201

    @app.post("/plain")
    @idempotent()
    def plain_order() -> tuple[Response, int]:
        orders.append(len(orders) + 1)
        return jsonify(order=len(orders)), 201

    return app, orders


def test_ext_idempotent_replays_from_the_app_store_for_the_app_ttl() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    ext = AIGuard(store=store)
    app, orders = make_order_app(ext, AI_GUARD_IDEMPOTENCY_TTL=60)
    client = app.test_client()
    headers = {"Idempotency-Key": "order-1"}
    first = client.post("/orders", json={"item": "book"}, headers=headers)
    replay = client.post("/orders", json={"item": "book"}, headers=headers)
    assert (first.status_code, replay.status_code) == (201, 201)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert orders == [1]
    assert len(store) >= 1
    clock.advance(61)  # past AI_GUARD_IDEMPOTENCY_TTL: the key is free again
    again = client.post("/orders", json={"item": "book"}, headers=headers)
    assert "Idempotent-Replayed" not in again.headers
    assert orders == [1, 2]


def test_plain_idempotent_on_a_view_uses_the_app_store() -> None:
    store = MemoryStore()
    app, orders = make_order_app(AIGuard(store=store))
    client = app.test_client()
    for _ in range(2):
        client.post("/plain", json={"item": "pen"}, headers={"Idempotency-Key": "k-1"})
    assert orders == [1]
    assert len(store) >= 1


def test_one_idempotent_view_keeps_each_app_s_keys_in_that_app_s_store() -> None:
    ext = AIGuard()
    first, first_orders = make_order_app(ext)
    second, second_orders = make_order_app(ext)
    headers = {"Idempotency-Key": "same-key"}
    first.test_client().post("/orders", json={}, headers=headers)
    second.test_client().post("/orders", json={}, headers=headers)
    assert first_orders == [1]
    assert second_orders == [1]  # another app, another store: not a replay


@pytest.mark.parametrize("option", ["store", "key"])
def test_ext_idempotent_refuses_another_store_or_a_function_key(option: str) -> None:
    with pytest.raises(ConfigError) as caught:
        AIGuard().idempotent(**{option: "memory://"})
    assert caught.value.setting == option


def test_ext_idempotent_validates_its_options_at_decoration_time() -> None:
    with pytest.raises(ConfigError) as caught:
        AIGuard().idempotent(ttl=-1)
    assert caught.value.setting == "ttl"
