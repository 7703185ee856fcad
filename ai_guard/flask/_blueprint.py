"""The blueprint: metrics (JSON and Prometheus), SLOs, health and the dashboard.

Routes, under ``AI_GUARD_URL_PREFIX`` (default ``/ai-guard``):

==========================  =====================================================  ==========
route                       answer                                                 type
==========================  =====================================================  ==========
``GET /metrics``            :meth:`MetricsCollector.report` (``?window=300``:      JSON
                            the last 5 minutes; default since start)
``GET /metrics/prometheus`` the text exposition (multiprocess-aware)               text
``GET /slo``                :meth:`MetricsCollector.slo_status` (``?window=``)     JSON
``GET /health``             breakers with state and figures; **503** when a        JSON
                            breaker of ``AI_GUARD_CRITICAL_BREAKERS`` is open
``GET /``                   the dashboard (``?window=``)                           HTML
==========================  =====================================================  ==========

Errors are RFC 9457 ``application/problem+json``: 400 for a bad ``window``, 401 / 403 for
the protection below, 501 when ``prometheus_client`` is missing.

**Protection** (checked before every route of the blueprint):

- ``AI_GUARD_METRICS_AUTH`` (a callable ``request -> bool``): true lets the request in;
  false answers **401** (with ``WWW-Authenticate: Bearer``) when the request carries no
  ``Authorization`` header, else **403**. The callable may also ``abort()`` itself.
- ``AI_GUARD_METRICS_TOKEN``: ``Authorization: Bearer <token>`` is required (compared in
  constant time): missing -> **401**, wrong -> **403**.
- Neither set: in debug mode anyone is answered; otherwise only **loopback** clients
  (``127.0.0.0/8``, ``::1``) are, others get **403**, and a WARNING is logged once per
  app. The client address is ``request.remote_addr``: ``X-Forwarded-For`` is *not*
  trusted. Behind a reverse proxy on the same host every client looks like loopback: then
  apply ``werkzeug.middleware.proxy_fix.ProxyFix`` (with the right number of proxies) so
  ``remote_addr`` is the real client's, or better, set a token.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import secrets
from typing import Any

from flask import Blueprint, Response, current_app, request
from werkzeug.exceptions import HTTPException

from ai_guard._idempotency_flask import problem_response
from ai_guard.flask._extension import AIGuardState, current_state

__all__ = ["BLUEPRINT_NAME", "is_loopback", "make_blueprint", "parse_window"]

_log = logging.getLogger("ai_guard.flask")

BLUEPRINT_NAME = "ai_guard"


class WindowError(ValueError):
    """A ``?window=`` query value the collector cannot answer for."""


def parse_window(raw: str | None) -> float | None:
    """``?window=`` as seconds (``None`` when absent); :class:`WindowError` otherwise."""
    if raw is None or raw == "":
        return None
    try:
        window = float(raw)
    except ValueError:
        raise WindowError(f"window must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(window) or window <= 0:
        raise WindowError(f"window must be a positive number of seconds, got {raw!r}")
    return window


def is_loopback(address: str | None) -> bool:
    """Whether ``address`` (``request.remote_addr``) is a loopback address; an
    IPv4-mapped IPv6 address counts by its IPv4 part, a missing one (a Unix socket) does
    not count."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


# -- protection -------------------------------------------------------------------------------


def _unauthorized(detail: str) -> Response:
    response = problem_response(401, "unauthorized", "Authentication required", detail)
    response.headers["WWW-Authenticate"] = 'Bearer realm="ai_guard"'
    return response


def _forbidden(detail: str) -> Response:
    return problem_response(403, "forbidden", "Forbidden", detail)


def _bearer_token() -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def _protect() -> Response | None:
    state = current_state()
    settings = state.config
    if settings.metrics_auth is not None:
        if settings.metrics_auth(request):
            return None
        if "Authorization" not in request.headers:
            return _unauthorized("These endpoints need credentials.")
        return _forbidden("The credentials given do not grant access to these endpoints.")
    if settings.metrics_token is not None:
        given = _bearer_token()
        if given is None:
            return _unauthorized("Send Authorization: Bearer <AI_GUARD_METRICS_TOKEN>.")
        expected = settings.metrics_token.get_secret_value()
        if not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), expected.encode("utf-8")
        ):
            return _forbidden("The bearer token is not valid for these endpoints.")
        return None
    if current_app.debug:
        return None
    _warn_open_access_once(state)
    if is_loopback(request.remote_addr):
        return None
    return _forbidden(
        "Without AI_GUARD_METRICS_TOKEN or AI_GUARD_METRICS_AUTH these endpoints answer "
        "loopback clients only."
    )


def _warn_open_access_once(state: AIGuardState) -> None:
    if state.open_access_warned:
        return
    state.open_access_warned = True  # a benign race: at worst two threads both warn
    _log.warning(
        "ai_guard endpoints under %s of app %r have no protection configured: only "
        "loopback clients are answered; set AI_GUARD_METRICS_TOKEN or "
        "AI_GUARD_METRICS_AUTH to serve remote clients",
        state.url_prefix,
        current_app.name,
    )


def _no_store(response: Response) -> Response:
    # Live figures (and, behind auth, private ones): never cached by a browser or proxy.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _problem_from_http_exception(exc: HTTPException) -> Response:
    status = exc.code or 500
    response = problem_response(
        status,
        (exc.name or "error").lower().replace(" ", "-"),
        exc.name or "Error",
        exc.description or "",
    )
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="ai_guard"'
    return response


def _bad_window(exc: ValueError) -> Response:
    return problem_response(400, "window-invalid", "Invalid window", str(exc))


def _json(data: Any, status: int = 200) -> Response:
    return current_app.response_class(
        current_app.json.dumps(data), status=status, mimetype="application/json"
    )


# -- views ------------------------------------------------------------------------------------


def metrics_json() -> Response:
    """The collector's report (``?window=`` seconds; default since start)."""
    try:
        window = parse_window(request.args.get("window"))
        report = current_state().collector.report(window)
    except ValueError as exc:
        return _bad_window(exc)
    return _json(report)


def metrics_prometheus() -> Response:
    """The Prometheus text exposition of the app's collector."""
    try:
        from ai_guard.prometheus import render_prometheus

        body, content_type = render_prometheus(current_state().collector)
    except ImportError as exc:
        return problem_response(501, "prometheus-unavailable", "Prometheus unavailable", str(exc))
    return Response(body, content_type=content_type)


def slo() -> Response:
    """The SLO status (``?window=`` seconds; default since start)."""
    try:
        window = parse_window(request.args.get("window"))
        status = current_state().collector.slo_status(window)
    except ValueError as exc:
        return _bad_window(exc)
    return _json(status)


def health() -> Response:
    """Breakers, their state and figures; 503 when a critical breaker is open."""
    body, status = current_state().health()
    return _json(body, status)


def dashboard() -> Response:
    """The HTML dashboard (``?window=`` seconds of history; default
    ``AI_GUARD_DASHBOARD_WINDOW``)."""
    from ai_guard.flask._dashboard import render_dashboard

    state = current_state()
    try:
        window = parse_window(request.args.get("window")) or state.config.dashboard_window
        nonce = secrets.token_urlsafe(16)
        html = render_dashboard(state, window=window, nonce=nonce, app_name=current_app.name)
    except ValueError as exc:
        return _bad_window(exc)
    response = Response(html, mimetype="text/html")
    # Inline CSS and JS only, by nonce: the page loads nothing from anywhere.
    response.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def make_blueprint() -> Blueprint:
    """A new blueprint (one per app: its prefix comes from that app's settings)."""
    blueprint = Blueprint(BLUEPRINT_NAME, __name__)
    blueprint.before_request(_protect)
    blueprint.after_request(_no_store)
    blueprint.register_error_handler(HTTPException, _problem_from_http_exception)
    blueprint.add_url_rule("/", "dashboard", dashboard, methods=["GET"])
    blueprint.add_url_rule("/metrics", "metrics", metrics_json, methods=["GET"])
    blueprint.add_url_rule("/metrics/prometheus", "prometheus", metrics_prometheus, methods=["GET"])
    blueprint.add_url_rule("/slo", "slo", slo, methods=["GET"])
    blueprint.add_url_rule("/health", "health", health, methods=["GET"])
    return blueprint
