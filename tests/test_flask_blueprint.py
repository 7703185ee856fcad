"""The blueprint: JSON metrics, Prometheus, SLOs, health, the dashboard, and who may see
them (token, callable, loopback only)."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, Request, abort
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.middleware.proxy_fix import ProxyFix

from ai_guard.breaker import CircuitBreaker, default_registry
from ai_guard.context import bind_sinks
from ai_guard.errors import UpstreamError
from ai_guard.flask import AIGuard, current_state
from ai_guard.flask._blueprint import is_loopback, parse_window
from ai_guard.flask._dashboard import format_ago, format_ms, format_usd, nice_ceiling
from ai_guard.metrics import MetricsCollector
from ai_guard.testing import FakeClock
from ai_guard.tracing import traced_ai
from ai_guard.types import ChatResult, Usage
from tests.test_metrics import CONTRACT_KEYS

PROBLEM = "application/problem+json"
TOKEN = "t0ken-for-the-metrics-0123456789"
REMOTE = {"REMOTE_ADDR": "10.1.2.3"}
ENDPOINTS = (
    "/ai-guard/",
    "/ai-guard/metrics",
    "/ai-guard/metrics/prometheus",
    "/ai-guard/slo",
    "/ai-guard/health",
)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_app(collector: MetricsCollector | None = None, **config: Any) -> Flask:
    app = Flask("blueprint-test")
    app.config.update({"AI_GUARD_TRACING": False, **config})
    AIGuard(app, collector=collector) if collector is not None else AIGuard(app)
    return app


def record(
    collector: MetricsCollector, clock: FakeClock, calls: list[tuple[str, float, bool]]
) -> None:
    """Record (model, latency_ms, failed) calls through a real guard into ``collector``."""

    @traced_ai(operation="chat", clock=clock)
    def call(latency: float, failed: bool, *, model: str) -> ChatResult:
        clock.advance(latency / 1000)
        if failed:
            raise UpstreamError("down", status=503)
        return ChatResult(content="ok", model=model, usage=Usage(1500, 60, 1560, 1408))

    with bind_sinks(collector.record_call):
        for model, latency, failed in calls:
            try:
                call(latency, failed, model=model)
            except UpstreamError:
                pass


@pytest.fixture
def breakers() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        default_registry().remove(name)


def open_breaker(names: list[str], name: str) -> CircuitBreaker:
    names.append(name)
    breaker = CircuitBreaker(name, failure_threshold=1, timeout=30, clock=FakeClock())

    def fail() -> None:
        raise UpstreamError("down", status=503)

    with pytest.raises(UpstreamError):
        breaker.call(fail)
    assert breaker.state == "open"
    return breaker


# -- JSON and Prometheus ------------------------------------------------------------------------


def test_metrics_is_the_collector_report_as_json(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    app = make_app(collector)
    record(collector, clock, [("gpt-4o-mini", 300.0, False)] * 9 + [("gpt-4o", 900.0, True)])
    response = app.test_client().get("/ai-guard/metrics")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    report = response.get_json()
    for key in CONTRACT_KEYS:
        assert key in report
    assert report["total_requests"] == 10
    assert report["mini_percentage"] == 90.0
    assert report["error_rate"] == pytest.approx(0.1)
    assert report["latency_ms"]["mini"]["p95"] == pytest.approx(300.0, rel=0.01)


def test_metrics_window_counts_only_the_recent_calls(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    app = make_app(collector)
    record(collector, clock, [("gpt-4o-mini", 100.0, False)] * 5)
    clock.advance(1200)
    record(collector, clock, [("gpt-4o-mini", 100.0, False)] * 2)
    client = app.test_client()
    assert client.get("/ai-guard/metrics").get_json()["total_requests"] == 7
    recent = client.get("/ai-guard/metrics?window=300").get_json()
    assert recent["total_requests"] == 2
    assert recent["window_seconds"] == 300


@pytest.mark.parametrize("window", ["abc", "0", "-5", "nan", "inf", "1e9"])
@pytest.mark.parametrize("path", ["/ai-guard/metrics", "/ai-guard/slo", "/ai-guard/"])
def test_a_bad_window_is_a_400_problem(path: str, window: str) -> None:
    response = make_app().test_client().get(path, query_string={"window": window})
    assert response.status_code == 400
    assert response.mimetype == PROBLEM
    problem = response.get_json()
    assert problem["status"] == 400
    assert problem["type"].endswith("window-invalid")
    assert "window" in problem["detail"]


def test_prometheus_exposition_has_the_right_content_type_and_the_app_figures(
    clock: FakeClock,
) -> None:
    collector = MetricsCollector(clock=clock)
    app = make_app(collector)
    record(collector, clock, [("gpt-4o-mini", 200.0, False)] * 3 + [("gpt-4o", 200.0, True)])
    response = app.test_client().get("/ai-guard/metrics/prometheus")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for s in family.samples
    }
    mini = (("model", "gpt-4o-mini"), ("outcome", "success"), ("tier", "mini"))
    full_errors = (("model", "gpt-4o"), ("outcome", "error"), ("tier", "full"))
    assert samples[("ai_guard_requests_total", mini)] == 3
    assert samples[("ai_guard_requests_total", full_errors)] == 1


def test_slo_status_lists_every_slo_with_target_actual_and_met(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    app = make_app(collector)
    record(collector, clock, [("gpt-4o-mini", 300.0, False)] * 20)
    status = app.test_client().get("/ai-guard/slo").get_json()
    by_name = {s["name"]: s for s in status["slos"]}
    assert set(by_name) == {
        "latency_p95_mini",
        "latency_p95_full",
        "availability",
        "cache_hit_rate",
        "mini_usage",
        "monthly_cost",
    }
    assert by_name["latency_p95_mini"]["met"] is True
    assert by_name["latency_p95_full"]["met"] is None  # no full-tier call: no data
    assert by_name["availability"]["actual"] == 1.0
    assert status["alert"] == "none"


# -- health ------------------------------------------------------------------------------------


def test_health_lists_breakers_and_answers_200_while_no_critical_one_is_open(
    breakers: list[str],
) -> None:
    name = f"openai:test-{uuid.uuid4().hex[:6]}"
    open_breaker(breakers, name)
    app = make_app(AI_GUARD_CRITICAL_BREAKERS=["payments"])
    response = app.test_client().get("/ai-guard/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "degraded"
    (entry,) = [b for b in body["breakers"] if b["name"] == name]
    assert entry["state"] == "open"
    assert entry["critical"] is False
    assert entry["metrics"]["failures"] == 1
    assert body["critical_not_created"] == ["payments"]


def test_health_is_503_when_a_critical_breaker_is_open(breakers: list[str]) -> None:
    tag = uuid.uuid4().hex[:6]
    breaker = open_breaker(breakers, f"critical-{tag}:gpt-4o")
    app = make_app(AI_GUARD_CRITICAL_BREAKERS=f"critical-{tag}:*")
    response = app.test_client().get("/ai-guard/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["critical_open"] == [f"critical-{tag}:gpt-4o"]
    breaker.reset()
    assert app.test_client().get("/ai-guard/health").status_code == 200


def test_health_without_breakers_is_ok() -> None:
    app = make_app(AI_GUARD_CRITICAL_BREAKERS=["never-created-breaker"])
    response = app.test_client().get("/ai-guard/health")
    assert response.status_code == 200
    assert response.get_json()["critical_open"] == []


# -- protection --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ENDPOINTS)
def test_without_protection_a_remote_client_gets_403(path: str) -> None:
    response = make_app().test_client().get(path, environ_base=REMOTE)
    assert response.status_code == 403
    assert response.mimetype == PROBLEM
    assert "loopback" in response.get_json()["detail"]


@pytest.mark.parametrize("address", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
def test_without_protection_a_loopback_client_is_answered(address: str) -> None:
    response = (
        make_app().test_client().get("/ai-guard/health", environ_base={"REMOTE_ADDR": address})
    )
    assert response.status_code == 200


def test_without_protection_a_warning_is_logged_once_per_app(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = make_app(), make_app()
    with caplog.at_level(logging.WARNING, logger="ai_guard.flask"):
        for _ in range(3):
            first.test_client().get("/ai-guard/health")
            first.test_client().get("/ai-guard/health", environ_base=REMOTE)
        second.test_client().get("/ai-guard/health")
    warnings = [r for r in caplog.records if "no protection" in r.getMessage()]
    assert len(warnings) == 2


def test_in_debug_mode_a_remote_client_is_answered() -> None:
    app = make_app()
    app.debug = True
    assert app.test_client().get("/ai-guard/health", environ_base=REMOTE).status_code == 200


def test_x_forwarded_for_is_not_trusted() -> None:
    response = (
        make_app()
        .test_client()
        .get(
            "/ai-guard/health",
            environ_base=REMOTE,
            headers={"X-Forwarded-For": "127.0.0.1"},
        )
    )
    assert response.status_code == 403


def test_behind_proxy_fix_the_forwarded_client_address_decides() -> None:
    app = make_app()
    app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1)  # type: ignore[method-assign]
    client = app.test_client()
    proxied = {"REMOTE_ADDR": "127.0.0.1"}  # the proxy on this host
    remote = client.get(
        "/ai-guard/health", environ_base=proxied, headers={"X-Forwarded-For": "203.0.113.9"}
    )
    local = client.get(
        "/ai-guard/health", environ_base=proxied, headers={"X-Forwarded-For": "127.0.0.1"}
    )
    assert (remote.status_code, local.status_code) == (403, 200)


@pytest.mark.parametrize("path", ENDPOINTS)
def test_with_a_token_no_credentials_get_401_with_www_authenticate(path: str) -> None:
    response = make_app(AI_GUARD_METRICS_TOKEN=TOKEN).test_client().get(path)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.mimetype == PROBLEM


@pytest.mark.parametrize(
    "header", [f"Bearer {TOKEN}x", "Bearer wrong", f"Bearer {TOKEN[:-1]}", "Bearer ünïcode-tøken"]
)
def test_with_a_token_a_wrong_token_gets_403(header: str) -> None:
    response = (
        make_app(AI_GUARD_METRICS_TOKEN=TOKEN)
        .test_client()
        .get("/ai-guard/metrics", headers={"Authorization": header})
    )
    assert response.status_code == 403
    assert response.mimetype == PROBLEM


@pytest.mark.parametrize("header", [f"Basic {TOKEN}", "Bearer", "Bearer   ", TOKEN])
def test_with_a_token_a_header_that_is_no_bearer_token_gets_401(header: str) -> None:
    response = (
        make_app(AI_GUARD_METRICS_TOKEN=TOKEN)
        .test_client()
        .get("/ai-guard/metrics", headers={"Authorization": header})
    )
    assert response.status_code == 401


@pytest.mark.parametrize("path", ENDPOINTS)
def test_with_the_right_token_a_remote_client_is_answered(path: str) -> None:
    response = (
        make_app(AI_GUARD_METRICS_TOKEN=TOKEN)
        .test_client()
        .get(path, headers={"Authorization": f"bearer {TOKEN}"}, environ_base=REMOTE)
    )
    assert response.status_code == 200


def _staff_only(request: Request) -> bool:
    return request.headers.get("Authorization") == "Staff yes"


def test_with_a_callable_its_answer_decides() -> None:
    client = make_app(AI_GUARD_METRICS_AUTH=_staff_only).test_client()
    none = client.get("/ai-guard/metrics", environ_base=REMOTE)
    wrong = client.get("/ai-guard/metrics", headers={"Authorization": "Staff no"})
    right = client.get(
        "/ai-guard/metrics", headers={"Authorization": "Staff yes"}, environ_base=REMOTE
    )
    assert none.status_code == 401
    assert none.headers["WWW-Authenticate"].startswith("Bearer")
    assert wrong.status_code == 403
    assert right.status_code == 200


def test_a_callable_may_abort_itself_and_still_gets_a_problem_body() -> None:
    def teapot(request: Request) -> bool:
        abort(418)

    response = make_app(AI_GUARD_METRICS_AUTH=teapot).test_client().get("/ai-guard/health")
    assert response.status_code == 418
    assert response.mimetype == PROBLEM


def test_protection_applies_to_the_blueprint_only() -> None:
    app = make_app(AI_GUARD_METRICS_TOKEN=TOKEN)

    @app.get("/public")
    def public() -> str:
        return "hello"

    assert app.test_client().get("/public", environ_base=REMOTE).status_code == 200


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.255.254", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.1.2.3", False),
        ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False),
        ("", False),
        (None, False),
        ("localhost", False),
        ("fe80::1%eth0", False),
    ],
)
def test_is_loopback(address: str | None, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.parametrize(
    ("raw", "seconds"), [(None, None), ("", None), ("300", 300.0), ("2.5", 2.5)]
)
def test_parse_window(raw: str | None, seconds: float | None) -> None:
    assert parse_window(raw) == seconds


# -- the dashboard -----------------------------------------------------------------------------


def test_the_dashboard_without_data_says_so() -> None:
    response = make_app().test_client().get("/ai-guard/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    assert "No AI calls recorded yet" in html
    assert "data-t=" not in html  # no chart drew a point from nothing


def test_the_dashboard_draws_every_chart_from_the_figures(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    app = make_app(collector)
    for _ in range(6):
        record(collector, clock, [("gpt-4o-mini", 250.0, False)] * 8 + [("gpt-4o", 800.0, False)])
        clock.advance(10)
    record(collector, clock, [("gpt-4o", 800.0, True)])
    html = app.test_client().get("/ai-guard/?window=300").get_data(as_text=True)
    for series in (
        "latency-mini-p50",
        "latency-mini-p95",
        "latency-mini-p99",
        "latency-full-p95",
        "traffic-mini",
        "traffic-full",
        "traffic-errors",
        "cost-cumulative",
    ):
        assert f'data-series="{series}"' in html, series
    assert re.search(r'<path d="M[^"]+"[^>]*data-series="latency-mini-p95"', html)
    values = [
        float(v)
        for v in re.findall(
            r'<rect[^>]*data-series="traffic-mini"[^>]*'
            r'data-value="([0-9.e+-]+)"',
            html,
        )
    ]
    assert sum(values) == 48
    assert '<tr data-slo="availability" data-met="False">' in html
    assert '<tr data-slo="latency_p95_mini" data-met="True">' in html


def test_the_dashboard_escapes_model_and_breaker_names(
    clock: FakeClock, breakers: list[str]
) -> None:
    collector = MetricsCollector(clock=clock)
    app = make_app(collector)
    evil = '<img src=x onerror="alert(1)">'
    record(collector, clock, [(evil, 100.0, False)])
    open_breaker(breakers, f"<script>alert('{uuid.uuid4().hex[:4]}')</script>")
    html = app.test_client().get("/ai-guard/").get_data(as_text=True)
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in html
    assert "<script>alert(" not in html
    assert "&lt;script&gt;alert(" in html


def test_the_dashboard_loads_nothing_from_elsewhere_and_says_so_in_its_csp(
    clock: FakeClock,
) -> None:
    collector = MetricsCollector(clock=clock)
    app = make_app(collector)
    record(collector, clock, [("gpt-4o-mini", 100.0, False)])
    response = app.test_client().get("/ai-guard/")
    html = response.get_data(as_text=True)
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "<link" not in html
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce is not None
    assert f'<script nonce="{nonce.group(1)}">' in html
    assert f'<style nonce="{nonce.group(1)}">' in html
    assert ' style="' not in html  # inline style attributes would be blocked by the CSP


def test_the_dashboard_refresh_follows_the_setting() -> None:
    every = make_app(AI_GUARD_DASHBOARD_REFRESH=3).test_client().get("/ai-guard/")
    never = make_app(AI_GUARD_DASHBOARD_REFRESH=0).test_client().get("/ai-guard/")
    assert "var every = 3000;" in every.get_data(as_text=True)
    assert 'http-equiv="refresh" content="3"' in every.get_data(as_text=True)
    assert "<script" not in never.get_data(as_text=True)
    assert 'http-equiv="refresh"' not in never.get_data(as_text=True)


def test_the_dashboard_shows_breakers_and_their_transitions(breakers: list[str]) -> None:
    app = make_app()
    name = f"dash-{uuid.uuid4().hex[:6]}"
    open_breaker(breakers, name)
    html = app.test_client().get("/ai-guard/").get_data(as_text=True)
    assert f'<tr data-breaker="{name}" data-state="open">' in html
    assert '<tr data-transition="open">' in html


def test_the_prefix_moves_every_route() -> None:
    app = make_app(AI_GUARD_URL_PREFIX="/ops/ai")
    client = app.test_client()
    for path in ENDPOINTS:
        assert client.get(path.replace("/ai-guard", "/ops/ai")).status_code == 200
        assert client.get(path).status_code == 404


def test_state_figures_match_the_dashboard_tiles(clock: FakeClock) -> None:
    collector = MetricsCollector(clock=clock)
    app = make_app(collector)
    record(collector, clock, [("gpt-4o-mini", 100.0, False)] * 3)
    html = app.test_client().get("/ai-guard/").get_data(as_text=True)
    assert current_state(app).collector.report()["total_requests"] == 3
    assert re.search(r'<div class="label">Requests</div>\s*<div class="value">3</div>', html)


@pytest.mark.parametrize(
    ("value", "text"), [(None, "—"), (0.5, "0.50 ms"), (412.3, "412 ms"), (1834.0, "1.83 s")]
)
def test_format_ms(value: float | None, text: str) -> None:
    assert format_ms(value) == text


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "—"), (0.0, "$0"), (0.01234, "$0.0123"), (12.345, "$12.35"), (1234.5, "$1,234")],
)
def test_format_usd(value: float | None, text: str) -> None:
    assert format_usd(value) == text


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "now"), (20, "-20s"), (90, "-90s"), (150, "-2.5m"), (3540, "-59m")]
)
def test_format_ago(seconds: float, text: str) -> None:
    assert format_ago(seconds) == text


@pytest.mark.parametrize(
    ("value", "upper", "step"),
    [(0, 1.0, 0.25), (7, 8, 2), (1300, 1500, 500), (0.0042, 0.006, 0.002), (9.1, 10, 2.5)],
)
def test_nice_ceiling(value: float, upper: float, step: float) -> None:
    assert nice_ceiling(value) == pytest.approx((upper, step))
