"""Reliability: Redis goes away in the middle of a run, then comes back on the same port.

Each test runs a redis-server of its own (never the session's), lets the guards use it,
terminates it (or freezes it with SIGSTOP), checks each guard's documented behaviour and
its log line, restarts it on the same port and checks that the guards use Redis again:

======================  ==============================================================
guard                   Redis unavailable
======================  ==============================================================
store calls             ``StoreUnavailableError`` within ``socket_timeout`` (no hang)
breaker, ``"local"``    decides on this process's own state; one WARNING; on recovery
(the default)           an INFO line and a circuit opened meanwhile is handed to Redis
breaker, ``"reject"``   rejects every call (``CircuitOpenError``); one WARNING
pacing budget           off: calls go through unpaced; one WARNING (at most one a minute)
idempotent function     ``StoreUnavailableError``, the body does not run; with
                        ``fail_open=True`` it runs unguarded, with a WARNING
idempotent view         503 ``application/problem+json`` with ``Retry-After``; with
                        ``fail_open=True`` the view runs unguarded, with a WARNING
======================  ==============================================================

A restarted Redis is empty (the tests run it without persistence): what was stored
before the outage is gone, which is Redis's behaviour, not the guards'. The guards must
only start using it again (scripts are loaded again after ``NOSCRIPT``).
"""

from __future__ import annotations

import logging
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from flask import Flask, Response, jsonify, request

from ai_guard.breaker import BreakerRegistry, CircuitBreaker
from ai_guard.errors import CircuitOpenError, StoreUnavailableError
from ai_guard.idempotency import idempotent
from ai_guard.metrics import MetricsCollector
from ai_guard.pacing import RateLimitBudget
from ai_guard.ratelimit import rate_limited
from ai_guard.stores import RedisStore, Script
from ai_guard.testing import FakeClock, FakeUpstream
from ai_guard.types import ChatResult
from tests.conftest import RedisServer
from tests.test_client import HELLO, make_client
from tests.test_reliability_faults import forget_default_breakers, no_thread_left_behind

__all__ = ["forget_default_breakers", "no_thread_left_behind"]  # autouse fixtures

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

SOCKET_TIMEOUT = 0.3
# A store call may take the socket timeout for its connect or its read, plus scheduling.
WITHIN = SOCKET_TIMEOUT * 2 + 0.5
WALL = 1_700_000_000.0

ECHO: Script[bytes] = Script(
    name="reliability_echo",
    lua="return ARGV[1]",
    python=lambda ops, keys, args: args[0].encode(),
)


@pytest.fixture
def own_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """A redis-server for this test alone (the session's one is never stopped)."""
    server = RedisServer(redis_server._binary)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)  # in case the test left it frozen
    server.stop()


@pytest.fixture
def prefix() -> str:
    return f"reliability:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def open_stores() -> Iterator[Callable[..., RedisStore]]:
    """``new(url, prefix)``: a Redis store closed after the test."""
    stores: list[RedisStore] = []

    def new(url: str, key_prefix: str) -> RedisStore:
        store = RedisStore(url, key_prefix=key_prefix, socket_timeout=SOCKET_TIMEOUT)
        stores.append(store)
        return store

    yield new
    for store in stores:
        store.close()


def store_operations(store: RedisStore, tag: str) -> dict[str, Callable[[], object]]:
    """One call of every store operation, on keys of their own."""
    return {
        "get": lambda: store.get(f"{tag}:k"),
        "set": lambda: store.set(f"{tag}:k", b"v", 30),
        "add": lambda: store.add(f"{tag}:add", b"v", 30),
        "delete": lambda: store.delete(f"{tag}:gone"),
        "compare_and_set": lambda: store.compare_and_set(f"{tag}:cas", None, b"1", 30),
        "compare_and_delete": lambda: store.compare_and_delete(f"{tag}:cas", b"1"),
        "incr": lambda: store.incr(f"{tag}:n", 1, 30),
        "ttl": lambda: store.ttl(f"{tag}:k"),
        "run": lambda: store.run(ECHO, [f"{tag}:s"], ["echo"]),
    }


def assert_all_unavailable_quickly(store: RedisStore, tag: str) -> None:
    for name, operation in store_operations(store, tag).items():
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="unavailable"):
            operation()
        elapsed = time.monotonic() - started
        assert elapsed < WITHIN, f"{name} took {elapsed:.2f}s"


def assert_all_work(store: RedisStore, tag: str) -> None:
    operations = store_operations(store, tag)
    operations["set"]()
    assert operations["get"]() == b"v"
    assert operations["add"]() is True
    assert operations["compare_and_set"]() is True
    assert operations["compare_and_delete"]() is True
    assert operations["incr"]() == 1
    assert 0 < (cast("float | None", operations["ttl"]()) or 0) <= 30
    assert operations["run"]() == b"echo"  # the script is loaded again after a restart


# -- the store itself --------------------------------------------------------------------


def test_store_calls_fail_fast_while_redis_is_stopped_and_work_again_on_the_same_port(
    own_redis: RedisServer, prefix: str, open_stores: Callable[..., RedisStore]
) -> None:
    store = open_stores(own_redis.url, prefix)
    assert_all_work(store, "before")
    own_redis.stop()
    assert_all_unavailable_quickly(store, "during")
    assert store.ping() is False
    own_redis.start()  # the same port: the store's URL did not change
    assert store.ping() is True
    assert_all_work(store, "after")


def test_store_calls_on_a_frozen_redis_time_out_within_the_socket_timeout(
    own_redis: RedisServer, prefix: str, open_stores: Callable[..., RedisStore]
) -> None:
    # SIGSTOP: the server accepts connections (the kernel does) but never answers, the
    # case where only the socket timeout stands between a worker and a hang.
    store = open_stores(own_redis.url, prefix)
    assert_all_work(store, "before")
    process = own_redis.process
    assert process is not None
    process.send_signal(signal.SIGSTOP)
    try:
        assert_all_unavailable_quickly(store, "frozen")
    finally:
        process.send_signal(signal.SIGCONT)
    assert_all_work(store, "thawed")


# -- the circuit breaker -----------------------------------------------------------------


def _fail() -> None:
    raise RuntimeError("upstream down")


def _answer() -> str:
    return "answer"


def test_breaker_decides_locally_while_redis_is_down_and_hands_its_state_back(
    own_redis: RedisServer,
    prefix: str,
    open_stores: Callable[..., RedisStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ai_guard.breaker")
    clock = FakeClock(wall_start=WALL)
    options: dict[str, Any] = {"clock": clock, "registry": None, "failure_threshold": 3}
    here = CircuitBreaker("outage", store=open_stores(own_redis.url, prefix), **options)
    # another process with the same breaker, reading the shared state on every call
    there = CircuitBreaker(
        "outage", store=open_stores(own_redis.url, prefix), sync_interval=0, **options
    )
    assert here.call(_answer) == "answer"
    with pytest.raises(RuntimeError):
        here.call(_fail)
    assert there.metrics().shared_failures_in_window == 1  # shared through Redis

    own_redis.stop()
    clock.advance(1.0)  # the next call reads the shared state (sync_interval)
    started = time.monotonic()
    for _ in range(20):
        assert here.call(_answer) == "answer"  # the local state is closed: calls go on
    assert time.monotonic() - started < WITHIN  # one failed read, then no store calls
    # This process's own window still holds the failure it saw before the outage: two
    # more make the three of the threshold.
    for _ in range(2):
        with pytest.raises(RuntimeError):
            here.call(_fail)
    assert here.state == "open"  # decided on local state alone
    with pytest.raises(CircuitOpenError):
        here.call(_answer)
    outage = [r for r in caplog.records if "store unavailable" in r.getMessage()]
    assert len(outage) == 1  # one line for the outage, not one per call
    assert outage[0].levelno == logging.WARNING
    assert "deciding on this process's own state" in outage[0].getMessage()
    assert here.metrics().store_available is False

    own_redis.start()
    clock.advance(5.0)  # store_retry_interval
    with pytest.raises(CircuitOpenError):
        here.call(_answer)  # still open, and now in Redis too
    assert "store available again" in caplog.text
    assert here.metrics().store_available is True
    with pytest.raises(CircuitOpenError) as seen_there:
        there.call(_answer)  # the other process learns it from Redis
    assert seen_there.value.retry_after == pytest.approx(30.0 - 5.0, abs=0.01)


def test_breaker_with_reject_refuses_every_call_while_redis_is_down(
    own_redis: RedisServer,
    prefix: str,
    open_stores: Callable[..., RedisStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ai_guard.breaker")
    clock = FakeClock(wall_start=WALL)
    breaker = CircuitBreaker(
        "outage-reject",
        store=open_stores(own_redis.url, prefix),
        clock=clock,
        registry=None,
        on_store_error="reject",
    )
    calls: list[int] = []
    breaker.call(calls.append, 1)
    own_redis.stop()
    clock.advance(1.0)
    for n in range(5):
        with pytest.raises(CircuitOpenError, match="store is unavailable") as refused:
            breaker.call(calls.append, n)
        assert 0.0 < refused.value.retry_after <= 5.0
    assert calls == [1]  # the function never ran meanwhile
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "rejecting calls" in warning.getMessage()

    own_redis.start()
    clock.advance(5.0)
    breaker.call(calls.append, 2)
    assert calls == [1, 2]
    assert "store available again" in caplog.text
    assert breaker.metrics().rejected == 5


# -- pacing ------------------------------------------------------------------------------


def exhausted_window(**_: object) -> ChatResult:
    """An answer saying the request quota is spent until the window resets in 30 s."""
    headers = {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "30s",
    }
    return ChatResult(content="ok", model="m", headers=headers)


def test_pacing_turns_off_while_redis_is_down_and_paces_again_when_it_is_back(
    own_redis: RedisServer,
    prefix: str,
    open_stores: Callable[..., RedisStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ai_guard.ratelimit")
    clock = FakeClock(wall_start=WALL)
    budget = RateLimitBudget(open_stores(own_redis.url, prefix), key="outage|{model}", clock=clock)
    calls: list[str] = []

    @rate_limited(max_retries=0, budget=budget, clock=clock)
    def ask(*, model: str) -> ChatResult:
        calls.append(model)
        return exhausted_window()

    ask(model="m")
    assert 29.0 < budget.bind(model="m").reserve().wait <= 30.01  # Redis holds the window
    own_redis.stop()
    started = time.monotonic()
    for _ in range(3):
        ask(model="m")  # unpaced: the window is spent, yet nothing waits
    assert time.monotonic() - started < 3 * 2 * WITHIN  # reserve + observe, each bounded
    assert clock.sleeps == []
    assert calls == ["m"] * 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # at most one a minute
    assert "pacing is off" in warnings[0].getMessage()

    own_redis.start()  # empty: the budget learns the window again from the next answer
    ask(model="m")
    assert 29.0 < budget.bind(model="m").reserve().wait <= 30.01
    # and that state is in Redis, where another process reads it
    other = RateLimitBudget(open_stores(own_redis.url, prefix), key="outage|m", clock=clock)
    assert other.snapshot().requests.remaining == 0
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


# -- idempotency -------------------------------------------------------------------------


def test_idempotent_function_refuses_or_fails_open_while_redis_is_down(
    own_redis: RedisServer,
    prefix: str,
    open_stores: Callable[..., RedisStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ai_guard.idempotency")
    store = open_stores(own_redis.url, prefix)
    runs: dict[str, int] = {}

    def charge(*, request_id: str) -> dict[str, Any]:
        runs[request_id] = runs.get(request_id, 0) + 1
        return {"charged": request_id}

    closed = idempotent(store, key="request_id", namespace="closed")(charge)
    opened = idempotent(store, key="request_id", namespace="open", fail_open=True)(charge)

    assert closed(request_id="a") == closed(request_id="a") == {"charged": "a"}
    assert runs == {"a": 1}
    own_redis.stop()
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        closed(request_id="b")
    assert time.monotonic() - started < WITHIN
    assert "b" not in runs  # refused: the body did not run
    assert caplog.records == []
    assert opened(request_id="c") == {"charged": "c"}  # ran unguarded
    assert runs["c"] == 1
    (warning,) = caplog.records
    assert "without idempotency" in warning.getMessage()

    own_redis.start()
    assert closed(request_id="b") == closed(request_id="b") == {"charged": "b"}
    assert runs["b"] == 1  # exactly once again
    assert opened(request_id="d") == opened(request_id="d")
    assert runs["d"] == 1


def make_app(store: RedisStore) -> tuple[Flask, dict[str, int]]:
    app = Flask(__name__)
    app.testing = True
    runs = {"orders": 0, "open": 0}

    def view(name: str) -> Response:
        runs[name] += 1
        response = jsonify(run=runs[name], item=(request.get_json(silent=True) or {}).get("item"))
        response.status_code = 201
        return response

    app.add_url_rule(
        "/orders", "orders", idempotent(store)(lambda: view("orders")), methods=["POST"]
    )
    app.add_url_rule(
        "/open",
        "open",
        idempotent(store, fail_open=True, namespace="open")(lambda: view("open")),
        methods=["POST"],
    )
    return app, runs


def test_idempotent_view_answers_503_or_fails_open_while_redis_is_down(
    own_redis: RedisServer,
    prefix: str,
    open_stores: Callable[..., RedisStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ai_guard.idempotency")
    app, runs = make_app(open_stores(own_redis.url, prefix))
    client = app.test_client()

    def post(path: str, key: str, item: str = "book") -> Any:
        return client.post(path, json={"item": item}, headers={"Idempotency-Key": key})

    assert post("/orders", "k1").status_code == 201
    assert post("/orders", "k1").headers["Idempotent-Replayed"] == "true"
    own_redis.stop()
    refused = post("/orders", "k2")
    assert refused.status_code == 503
    assert refused.mimetype == "application/problem+json"
    assert refused.headers["Retry-After"] == "1"
    assert refused.get_json()["type"] == "urn:ai-guard:problem:idempotency-store-unavailable"
    assert runs["orders"] == 1  # the view did not run
    assert caplog.records == []
    unguarded = post("/open", "k3")
    assert unguarded.status_code == 201
    assert "Idempotent-Replayed" not in unguarded.headers
    assert runs["open"] == 1
    (warning,) = caplog.records
    assert "without idempotency" in warning.getMessage()

    own_redis.start()
    first = post("/orders", "k2")
    assert first.status_code == 201
    replay = post("/orders", "k2")
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json() == first.get_json()
    assert post("/orders", "k2", item="pen").status_code == 422
    assert runs["orders"] == 2


# -- all of it, through the client -------------------------------------------------------


def test_a_client_sharing_state_through_redis_keeps_answering_through_an_outage(
    own_redis: RedisServer,
    prefix: str,
    open_stores: Callable[..., RedisStore],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ai_guard")
    clock = FakeClock(wall_start=WALL)
    collector = MetricsCollector(clock=clock)
    store = open_stores(own_redis.url, prefix)
    with (
        FakeUpstream(clock=clock, quota_requests=1000, quota_window=600.0) as upstream,
        make_client(
            upstream,
            clock=clock,
            store=store,
            collector=collector,
            breaker={"registry": BreakerRegistry()},
        ) as client,
    ):
        assert client.budget is not None
        budget = client.budget.bind(model="gpt-4o-mini")
        for _ in range(3):
            assert client.chat(HELLO).content
        assert budget.snapshot().requests.remaining == 997

        own_redis.stop()
        clock.advance(1.0)  # the breaker's next read of the shared state is due
        for _ in range(3):
            assert client.chat(HELLO).content  # the breaker and pacing fail open
        outage = {(r.name, r.levelname) for r in caplog.records if r.levelno >= logging.WARNING}
        assert outage == {("ai_guard.breaker", "WARNING"), ("ai_guard.ratelimit", "WARNING")}

        own_redis.start()
        clock.advance(5.0)  # the breaker tries the store again
        for _ in range(2):
            assert client.chat(HELLO).content
        assert "store available again" in caplog.text
        breaker = client.breaker_for("gpt-4o-mini")
        assert breaker is not None
        assert breaker.metrics().store_available is True
        # the budget writes to Redis again: another process sees the upstream's count
        other = RateLimitBudget(open_stores(own_redis.url, prefix), key=budget.key, clock=clock)
        assert other.snapshot().requests.remaining == 992
    report = collector.report()
    assert report["total_requests"] == 8
    assert report["error_count"] == 0
    assert upstream.stats() == {"200": 8, "total": 8}
