"""Security: what must never leak, never be replayed to someone else, never grow.

- **Replays stay with their principal**: principal A's stored response is never replayed
  to principal B, even with the same ``Idempotency-Key`` and the same body; B's request
  runs itself (memory and Redis stores; and a hypothesis interleaving of three clients).
- **The API key stays in the Authorization header**: after calls that failed in every
  way (401, 500 echoing the key, timeout, reset, broken stream, an error event echoing
  the key), the key is in no log record (raw fields or ``JSONFormatter`` output), no
  span (attributes, events, status), no error (message, ``repr``, body, chain) and no
  ``repr``.
- **Stores and per-model tables stay bounded under a flood**: distinct keys into the
  memory store and the idempotency guards; distinct ``model=`` values into the breaker
  template, the pacing budget, the metrics collector, the router, the client.
- **Metrics endpoints refuse unauthenticated remote clients by default**.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask, Response, g, jsonify, request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ai_guard.breaker import (
    MAX_TEMPLATE_BREAKERS,
    BreakerRegistry,
    circuit_breaker,
)
from ai_guard.errors import AIGuardError
from ai_guard.idempotency import idempotent
from ai_guard.logs import JSONFormatter
from ai_guard.metrics import OTHER_MODEL, MetricsCollector
from ai_guard.pacing import RateLimitBudget
from ai_guard.routing import Router, RouteRequest
from ai_guard.stores import MemoryStore, Script, ScriptOps, Store
from ai_guard.testing import FakeClock, FakeUpstream
from ai_guard.types import StreamEvent
from tests.conftest import free_port
from tests.test_client import HELLO, CannedServer, make_client
from tests.test_reliability_faults import forget_default_breakers, no_thread_left_behind

__all__ = ["forget_default_breakers", "no_thread_left_behind"]  # autouse fixtures

pytestmark = pytest.mark.timeout(120)

# -- replays stay with their principal ---------------------------------------------------


def make_orders_app(store: Store) -> tuple[Flask, list[str]]:
    """POST /orders: the response names who it was made for (a hash of the caller's
    Authorization header, or ``g.user``)."""
    app = Flask(__name__)
    app.testing = True
    ran_for: list[str] = []

    @app.before_request
    def authenticate() -> None:
        user = request.headers.get("X-User")
        if user:
            g.user = user

    @app.post("/orders")
    @idempotent(store)
    def orders() -> Response:
        who = (
            g.get("user")
            or hashlib.sha256(request.headers.get("Authorization", "").encode()).hexdigest()[:12]
        )
        ran_for.append(who)
        response = jsonify(made_for=who, order=len(ran_for), body=request.get_data(as_text=True))
        response.status_code = 201
        return response

    return app, ran_for


def bearer(token: str) -> str:
    return hashlib.sha256(f"Bearer {token}".encode()).hexdigest()[:12]


def test_principal_a_never_gets_principal_bs_stored_response(store: Store) -> None:
    app, ran_for = make_orders_app(store)
    client = app.test_client()
    key, body = "order-2024-0001", {"item": "book"}

    def post(token: str) -> Any:
        return client.post(
            "/orders",
            json=body,
            headers={"Idempotency-Key": key, "Authorization": f"Bearer {token}"},
        )

    alice = post("alice-token")
    bob = post("bob-token")  # same key, same body, another principal: runs itself
    assert alice.status_code == bob.status_code == 201
    assert "Idempotent-Replayed" not in bob.headers
    assert alice.get_json()["made_for"] == bearer("alice-token")
    assert bob.get_json()["made_for"] == bearer("bob-token")
    assert ran_for == [bearer("alice-token"), bearer("bob-token")]
    # and each gets their own replay afterwards
    for token in ("alice-token", "bob-token"):
        replay = post(token)
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.get_json()["made_for"] == bearer(token)
    assert len(ran_for) == 2


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    ("Authorization", "Bearer a"),
                    ("Authorization", "Bearer b"),
                    ("X-User", "carol"),
                    ("X-User", "dave"),
                    None,
                ]
            ),
            st.sampled_from(["k1", "k2", "k3"]),
            st.sampled_from(['{"item": 1}', '{"item": 2}']),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_no_interleaving_of_clients_and_keys_replays_a_response_to_another_client(
    requests_made: list[tuple[tuple[str, str] | None, str, str]],
) -> None:
    app, _ = make_orders_app(MemoryStore())
    client = app.test_client()
    for credential, key, body in requests_made:
        headers = {"Idempotency-Key": key, "Content-Type": "application/json"}
        if credential is not None:
            headers[credential[0]] = credential[1]
        response = client.post("/orders", data=body, headers=headers)
        if credential is None:
            expected = hashlib.sha256(b"").hexdigest()[:12]  # anonymous: no header
        elif credential[0] == "X-User":
            expected = credential[1]
        else:
            expected = bearer(credential[1].removeprefix("Bearer "))
        assert response.status_code in (201, 422)
        if response.status_code == 201:  # run or replayed: always the requester's own
            assert response.get_json()["made_for"] == expected
            assert response.get_json()["body"] == body
        response.close()


# -- the API key stays in the Authorization header ---------------------------------------

KEYS = {
    "openai-style": "sk-proj-SECRETabcdef0123456789ABCDEF",
    # does not look like a key to ai_guard.logs.redact: only the client can scrub it
    "opaque": "azure0f3c9a1b2d4e6f8091a2b3c4d5e6f7a8",
}
ECHO_500 = '{"error": {"message": "Internal error for key {key}", "type": "server_error"}}'
ECHO_EVENT = (
    'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    'event: error\ndata: {"error": {"message": "key {key} revoked mid-stream"}}\n\n'
)


@pytest.fixture
def captured_logs() -> Iterator[tuple[list[logging.LogRecord], list[str]]]:
    """Every record of the ``ai_guard`` loggers at DEBUG: the raw records, and the lines
    a :class:`JSONFormatter` handler wrote."""
    records: list[logging.LogRecord] = []
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)
            lines.append(self.format(record))

    handler = Capture(logging.DEBUG)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("ai_guard")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield records, lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def texts_of_error(exc: BaseException) -> list[str]:
    seen: list[str] = []
    current: BaseException | None = exc
    while current is not None:
        seen += [str(current), repr(current), repr(vars(current))]
        current = current.__cause__ or current.__context__
    return seen


@pytest.mark.parametrize("secret", list(KEYS.values()), ids=list(KEYS))
def test_the_api_key_is_in_no_log_span_error_or_repr_after_calls_that_failed_every_way(
    secret: str,
    captured_logs: tuple[list[logging.LogRecord], list[str]],
    fake_clock: FakeClock,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    seen: list[str] = []
    errors: list[AIGuardError] = []

    def client_of(url: str, **options: Any) -> Any:
        client = make_client(
            url,
            api_key=secret,
            clock=fake_clock,
            retries=1,
            tracing={"tracer_provider": provider},
            collector=MetricsCollector(clock=fake_clock),
            **options,
        )
        seen.append(repr(client))
        return client

    def fail(client: Any, *, stream: bool = False) -> None:
        try:
            if stream:
                events: list[StreamEvent] = list(client.stream_chat(HELLO))
                seen.extend(repr(e) for e in events)
                error = events[-1].error
                assert isinstance(error, AIGuardError)
                errors.append(error)
            else:
                client.chat(HELLO)
                pytest.fail("the call was meant to fail")
        except AIGuardError as exc:
            errors.append(exc)

    try:
        with FakeUpstream(require_api_key="the-right-key") as upstream:
            with client_of(upstream.url) as client:
                fail(client)  # 401
            upstream.configure(require_api_key=None, timeout_rate=1.0, hang_seconds=30)
            with client_of(upstream.url, timeout=(2.0, 0.1)) as client:
                fail(client)  # read timeout
            upstream.configure(timeout_rate=0.0, reset_rate=1.0)
            with client_of(upstream.url) as client:
                fail(client)  # connection reset
            upstream.configure(reset_rate=0.0, stream_error_after=2)
            with client_of(upstream.url) as client:
                fail(client, stream=True)  # error event mid-stream
            upstream.configure(stream_error_after=None, stream_drop_after=2)
            with client_of(upstream.url) as client:
                fail(client, stream=True)  # dropped mid-stream
        with CannedServer(500, ECHO_500) as server, client_of(server.url) as client:
            fail(client)  # a 500 whose message echoes the key
        with (
            CannedServer(200, ECHO_EVENT, "text/event-stream") as server,
            client_of(server.url) as client,
        ):
            fail(client, stream=True)  # an error event echoing the key
        with client_of(f"http://127.0.0.1:{free_port()}/v1") as client:
            fail(client)  # nobody listening
    finally:
        provider.shutdown()

    assert [type(e).__name__ for e in errors] == [
        "UpstreamError",
        "UpstreamTimeoutError",
        "UpstreamConnectionError",
        "StreamError",
        "StreamError",
        "UpstreamError",
        "StreamError",
        "UpstreamConnectionError",
    ]
    assert "Internal error for key ***" in str(errors[5])  # scrubbed, not dropped
    assert "key *** revoked" in str(errors[6])
    for error in errors:
        seen += texts_of_error(error)
        seen.append(json.dumps(getattr(error, "body", None), default=repr))
    records, lines = captured_logs
    assert len(lines) >= len(errors)  # at least one line per call
    seen += lines
    seen += [repr(vars(record)) for record in records]
    spans = exporter.get_finished_spans()
    assert len(spans) == len(errors)
    for span in spans:
        seen.append(span.to_json())
    for text in seen:
        assert secret not in text
        assert secret[-16:] not in text  # not even a tail of it


# -- stores and per-model tables stay bounded under a flood ------------------------------


def _counter_python(ops: ScriptOps, keys: list[str], args: list[str]) -> bytes:
    ops.set(keys[0], args[0].encode())
    return args[0].encode()


COUNTER: Script[bytes] = Script(
    name="security_flood",
    lua="redis.call('SET', KEYS[1], ARGV[1]) return ARGV[1]",
    python=_counter_python,
)


def test_the_memory_store_keeps_at_most_maxsize_keys_whatever_writes_them() -> None:
    store = MemoryStore(maxsize=100)
    for i in range(10_000):
        writer = i % 5
        if writer == 0:
            store.set(f"set:{i}", b"x")
        elif writer == 1:
            store.add(f"add:{i}", b"x")
        elif writer == 2:
            store.incr(f"incr:{i}")
        elif writer == 3:
            store.compare_and_set(f"cas:{i}", None, b"x")
        else:
            store.run(COUNTER, [f"run:{i}"], ["x"])
        assert len(store) <= 100
    assert len(store) == 100
    assert store.get("set:9995") == b"x"  # the newest are kept, the oldest went


def test_idempotency_stores_stay_bounded_under_a_flood_of_keys() -> None:
    from ai_guard import idempotency

    store = MemoryStore(maxsize=200)

    @idempotent(store, key="request_id")
    def work(*, request_id: str) -> str:
        return request_id

    for i in range(3_000):
        assert work(request_id=f"flood-{i}") == f"flood-{i}"
    assert len(store) == 200
    assert not idempotency._FLIGHTS.by_key  # no flight left registered

    view_store = MemoryStore(maxsize=200)
    app, ran_for = make_orders_app(view_store)
    client = app.test_client()
    for i in range(1_000):
        response = client.post("/orders", json={}, headers={"Idempotency-Key": f"view-{i}"})
        assert response.status_code == 201
        assert len(view_store) <= 200
    assert len(ran_for) == 1_000


def growth_of(flood: Callable[[int, int], None], *, first: int, second: int) -> int:
    """Bytes that ai_guard still holds after a second flood, beyond what the first
    (which fills every bounded table) left. A table without a bound grows with it."""
    flood(0, first)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        flood(first, first + second)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    only_ours = [tracemalloc.Filter(True, "*/ai_guard/*"), tracemalloc.Filter(False, "*/testing/*")]
    diff = after.filter_traces(only_ours).compare_to(before.filter_traces(only_ours), "filename")
    return sum(stat.size_diff for stat in diff)


def test_a_flood_of_model_names_does_not_grow_the_breaker_template_without_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = BreakerRegistry()
    template = circuit_breaker("openai:{model}", registry=registry)

    @template
    def ask(*, model: str) -> str:
        return model

    def flood(start: int, stop: int) -> None:
        for i in range(start, stop):
            assert ask(model=f"model-{i}") == f"model-{i}"

    grown = growth_of(flood, first=MAX_TEMPLATE_BREAKERS + 100, second=2_000)
    assert grown < 200_000  # a breaker each would be ~10 MB
    assert len(registry) == MAX_TEMPLATE_BREAKERS + 1  # and the shared overflow breaker
    assert registry.get("openai:other") is not None
    assert registry.get("openai:model-0") is not None  # the first ones keep their own
    assert sum("share the breaker openai:other" in r.getMessage() for r in caplog.records) == 1


def test_a_flood_of_model_names_does_not_grow_pacing_budgets_without_bound() -> None:
    clock = FakeClock()
    store = MemoryStore(maxsize=300, clock=clock)
    budget = RateLimitBudget(store, key="https://api|{model}", clock=clock)
    headers = {"x-ratelimit-remaining-requests": "10", "x-ratelimit-reset-requests": "1s"}

    def flood(start: int, stop: int) -> None:
        for i in range(start, stop):
            bound = budget.bind(model=f"model-{i}")
            bound.observe(headers, reservation=bound.reserve(10))

    assert growth_of(flood, first=1_500, second=2_000) < 200_000
    assert len(store) == 300


def test_a_flood_of_model_names_does_not_grow_the_metrics_collector_without_bound() -> None:
    collector = MetricsCollector(max_series=32)

    def flood(start: int, stop: int) -> None:
        for i in range(start, stop):
            collector.record_request(f"model-{i}", latency_ms=5.0)

    assert growth_of(flood, first=100, second=3_000) < 200_000
    series = collector.series_totals()
    assert len(series) <= 33
    assert OTHER_MODEL in {s.model for s in series}
    assert collector.report()["total_requests"] == 3_100  # counted, under "other"


def test_a_flood_of_route_requests_does_not_grow_the_router_without_bound() -> None:
    router = Router()

    def flood(start: int, stop: int) -> None:
        for i in range(start, stop):
            router.route(RouteRequest("classification", 2, input_tokens=i))

    assert growth_of(flood, first=5_000, second=10_000) < 1_000_000


def test_a_flood_of_model_names_through_the_client_keeps_memory_bounded(
    fake_clock: FakeClock,
) -> None:
    collector = MetricsCollector(clock=fake_clock)
    with (
        FakeUpstream(
            models=None, record_limit=1, prompt_cache_size=1, quota_requests=10**9
        ) as upstream,
        make_client(
            upstream,
            clock=fake_clock,
            collector=collector,
            budget=MemoryStore(maxsize=500, clock=fake_clock),
            breaker={"registry": BreakerRegistry()},
        ) as client,
    ):

        def flood(start: int, stop: int) -> None:
            for i in range(start, stop):
                assert client.chat(HELLO, model=f"tenant-model-{i}").content

        grown = growth_of(flood, first=MAX_TEMPLATE_BREAKERS + 50, second=600)
        assert client.breaker is not None
        assert len(client.breaker.breakers()) == MAX_TEMPLATE_BREAKERS  # type: ignore[attr-defined]
    assert grown < 300_000  # an unbounded table would grow by several MB
    assert len(collector.series_totals()) <= 33
    assert collector.report()["total_requests"] == MAX_TEMPLATE_BREAKERS + 650


# -- metrics endpoints -------------------------------------------------------------------


def test_metrics_endpoints_refuse_unauthenticated_remote_clients_by_default(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from ai_guard.flask import AIGuard

    app = Flask(__name__)
    AIGuard(app)
    prefix = "/ai-guard"
    endpoints = sorted(
        rule.rule for rule in app.url_map.iter_rules() if rule.rule.startswith(prefix)
    )
    assert {
        f"{prefix}/",
        f"{prefix}/metrics",
        f"{prefix}/metrics/prometheus",
        f"{prefix}/slo",
        f"{prefix}/health",
    } <= set(endpoints)
    remote = app.test_client()
    remote.environ_base = {**remote.environ_base, "REMOTE_ADDR": "10.1.2.3"}
    local = app.test_client()
    local.environ_base = {**local.environ_base, "REMOTE_ADDR": "127.0.0.1"}
    for url in endpoints:
        for spoof in ({}, {"X-Forwarded-For": "127.0.0.1"}, {"X-Real-IP": "127.0.0.1"}):
            refused = remote.get(url, headers=spoof)
            assert refused.status_code == 403, url
            assert refused.mimetype == "application/problem+json"
            refused.close()
        answered = local.get(url)
        assert answered.status_code in (200, 503), url  # health is 503 with an open breaker
        answered.close()
    assert "only loopback clients are answered" in caplog.text
