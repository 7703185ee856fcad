"""A breaker shared through a real redis-server by real processes, and what happens when
the store goes away.

The processes run on FakeClocks whose wall times are set explicitly: the shared state only
holds wall-clock deadlines, so each process can be placed at any moment relative to them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from ai_guard.breaker import (
    BreakerEvent,
    BreakerRegistry,
    BreakerTemplate,
    CircuitBreaker,
    circuit_breaker,
)
from ai_guard.errors import CircuitOpenError, ConfigError
from ai_guard.stores import RedisStore
from ai_guard.testing import FakeClock
from tests.conftest import RedisServer, free_port

pytestmark = pytest.mark.redis

ROOT = Path(__file__).resolve().parent.parent
WALL = 1_700_000_000.0

# A worker process: builds the same breaker on the same Redis, then does what it is told.
CHILD = r"""
import json, sys, threading, time
from ai_guard.breaker import CircuitBreaker
from ai_guard.errors import CircuitOpenError
from ai_guard.stores import RedisStore
from ai_guard.testing import FakeClock

task = json.loads(sys.argv[1])
store = RedisStore(task["url"], key_prefix=task["prefix"])
clock = FakeClock(wall_start=task["wall"])
breaker = CircuitBreaker(
    task["name"], store=store, clock=clock, registry=None, **task.get("options", {})
)
report = {}

def upstream():
    store.incr("upstream_calls")
    if task.get("fail"):
        raise RuntimeError("upstream down")
    return "answer"

if task["do"] == "call":
    try:
        report["result"] = breaker.call(upstream)
    except CircuitOpenError as exc:
        report["result"] = "rejected"
        report["retry_after"] = exc.retry_after
    report["state"] = breaker.state.value
elif task["do"] == "trip":
    for _ in range(5):
        try:
            breaker.call(upstream)
        except RuntimeError:
            pass
    report["state"] = breaker.state.value
elif task["do"] == "hammer":
    start = threading.Barrier(task["threads"])

    def trial():
        store.incr("entered")
        deadline = time.monotonic() + 20
        while store.get("release") is None:  # held until the parent has counted
            if time.monotonic() > deadline:
                raise TimeoutError("never released")
            time.sleep(0.005)
        return "ok"

    def worker():
        start.wait(20)
        try:
            breaker.call(trial)
        except CircuitOpenError:
            store.incr("rejected")

    threads = [threading.Thread(target=worker) for _ in range(task["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
print(json.dumps(report))
"""


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def redis(redis_url: str, prefix: str) -> Any:
    store = RedisStore(redis_url, key_prefix=prefix)
    yield store
    store.clear()
    store.close()


def child(task: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(task)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=10)  # reap it and close its pipes


def finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            stop(process)
    assert process.returncode == 0, stderr
    report: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return report


def counter(store: RedisStore, key: str) -> int:
    raw = store.get(key)
    return int(raw) if raw is not None else 0


@pytest.mark.slow
def test_an_open_circuit_in_redis_stops_a_second_process_from_calling(
    redis_url: str, prefix: str, redis: RedisStore
) -> None:
    clock = FakeClock(wall_start=WALL)
    breaker = CircuitBreaker("openai", store=redis, clock=clock, registry=None)
    for _ in range(5):
        with pytest.raises(RuntimeError):
            breaker.call(_fail)
    assert breaker.state == "open"

    task = {"url": redis_url, "prefix": prefix, "name": "openai", "wall": WALL + 10, "do": "call"}
    report = finish(child(task))
    assert report["result"] == "rejected"
    assert report["retry_after"] == pytest.approx(20.0, abs=0.01)
    assert report["state"] == "open"
    assert counter(redis, "upstream_calls") == 0  # the second process never called upstream

    later = finish(child({**task, "wall": WALL + 30.5}))  # after the timeout: a trial call
    assert later["result"] == "answer"
    assert later["state"] == "half_open"
    assert counter(redis, "upstream_calls") == 1


@pytest.mark.slow
def test_a_circuit_opened_by_another_process_is_seen_here(
    redis_url: str, prefix: str, redis: RedisStore
) -> None:
    clock = FakeClock(wall_start=WALL)
    breaker = CircuitBreaker("openai", store=redis, clock=clock, registry=None)
    events: list[BreakerEvent] = []
    breaker.add_listener(events.append)
    assert breaker.call(lambda: "fine") == "fine"
    task = {"url": redis_url, "prefix": prefix, "name": "openai", "wall": WALL, "do": "trip"}
    task["fail"] = True
    assert finish(child(task))["state"] == "open"
    clock.advance(1.0)  # this process's next read of the shared state
    with pytest.raises(CircuitOpenError):
        breaker.call(lambda: "not called")
    assert [(e.to_state, e.source) for e in events] == [("open", "store")]


@pytest.mark.slow
def test_half_open_admits_exactly_max_trial_calls_across_processes(
    redis_url: str, prefix: str, redis: RedisStore
) -> None:
    options: dict[str, Any] = {"half_open_max_calls": 3, "success_threshold": 3}
    clock = FakeClock(wall_start=WALL)
    breaker = CircuitBreaker("openai", store=redis, clock=clock, registry=None, **options)
    for _ in range(5):
        with pytest.raises(RuntimeError):
            breaker.call(_fail)
    task = {
        "url": redis_url,
        "prefix": prefix,
        "name": "openai",
        "wall": WALL + 31,
        "do": "hammer",
        "threads": 4,
        "options": options,
    }
    processes = [child(task) for _ in range(4)]
    try:
        deadline = time.monotonic() + 60
        # Waiting for other processes: every one of the 16 calls is admitted or rejected.
        while counter(redis, "entered") + counter(redis, "rejected") < 16:
            assert time.monotonic() < deadline, "the workers never finished admitting"
            assert all(p.poll() in (None, 0) for p in processes), "a worker failed"
            time.sleep(0.01)
        assert counter(redis, "entered") == 3
        assert counter(redis, "rejected") == 13
        redis.set("release", b"1")
        for process in processes:
            finish(process)
    finally:
        for process in processes:
            if process.returncode is None:
                stop(process)
    clock.advance(32)
    assert breaker.state == "closed"  # three successful trials, from any process


# -- the store goes away -----------------------------------------------------------------


def _fail() -> None:
    raise RuntimeError("upstream down")


@pytest.fixture
def dead_store() -> Any:
    """A Redis store whose server is not there (a free port nobody listens on)."""
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2)
    yield store
    store.close()


def test_an_unreachable_store_fails_open_on_local_state_with_one_warning(
    dead_store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(wall_start=WALL)
    breaker = CircuitBreaker("openai", store=dead_store, clock=clock, registry=None)
    with caplog.at_level(logging.WARNING, logger="ai_guard.breaker"):
        for _ in range(20):
            assert breaker.call(lambda: "answer") == "answer"
        for _ in range(4):
            with pytest.raises(RuntimeError):
                breaker.call(_fail)
        clock.advance(6)  # past store_retry_interval: one more attempt, still down
        with pytest.raises(RuntimeError):
            breaker.call(_fail)  # the fifth failure, counted locally
        with pytest.raises(CircuitOpenError):
            breaker.call(lambda: "not called")
    unavailable = [r for r in caplog.records if "store unavailable" in r.getMessage()]
    assert len(unavailable) == 1
    assert unavailable[0].levelname == "WARNING"
    assert breaker.metrics().store_available is False
    assert breaker.state == "open"


def test_an_unreachable_store_can_reject_every_call(dead_store: RedisStore) -> None:
    clock = FakeClock(wall_start=WALL)
    breaker = CircuitBreaker(
        "openai",
        store=dead_store,
        clock=clock,
        registry=None,
        on_store_error="reject",
        store_retry_interval=5.0,
    )
    called: list[int] = []
    with pytest.raises(CircuitOpenError) as caught:
        breaker.call(called.append, 1)
    assert "store is unavailable" in str(caught.value)
    assert caught.value.retry_after == pytest.approx(5.0)
    with pytest.raises(CircuitOpenError):
        breaker.call(called.append, 2)
    assert called == []


def test_the_breaker_shares_again_when_the_store_comes_back(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = RedisServer(redis_server._binary)  # not started yet: Redis is "down"
    store = RedisStore(server.url, socket_timeout=0.5, key_prefix=f"test:{uuid.uuid4().hex}:")
    clock = FakeClock(wall_start=WALL)
    breaker = CircuitBreaker("openai", store=store, clock=clock, registry=None)
    try:
        with caplog.at_level(logging.INFO, logger="ai_guard.breaker"):
            for _ in range(5):
                with pytest.raises(RuntimeError):
                    breaker.call(_fail)
            assert breaker.state == "open"  # decided locally during the outage
            server.start()
            clock.advance(5.0)  # store_retry_interval
            with pytest.raises(CircuitOpenError):
                breaker.call(lambda: "not called")
        assert "store available again" in caplog.text
        assert breaker.metrics().store_available is True
        # The open state decided during the outage was handed to the other processes.
        other = CircuitBreaker("openai", store=store, clock=clock, registry=None)
        with pytest.raises(CircuitOpenError) as caught:
            other.call(lambda: "not called")
        assert caught.value.retry_after == pytest.approx(25.0, abs=0.01)
    finally:
        store.close()
        server.stop()


def test_a_template_shares_one_store_between_its_models(redis_url: str, prefix: str) -> None:
    registry = BreakerRegistry()
    template = circuit_breaker(
        "openai:{model}", registry=registry, store=redis_url, clock=FakeClock(wall_start=WALL)
    )

    @template
    def ask(*, model: str) -> str:
        return model

    assert ask(model="gpt-4o") == "gpt-4o"
    assert ask(model="gpt-4o-mini") == "gpt-4o-mini"
    full, mini = registry.get("openai:gpt-4o"), registry.get("openai:gpt-4o-mini")
    assert full is not None
    assert mini is not None
    assert full.store is mini.store  # one connection pool for the family
    assert isinstance(full.store, RedisStore)
    full.store.close()


def test_two_redis_stores_on_one_url_configure_the_same_breaker(
    redis_url: str, prefix: str
) -> None:
    """Two apps (two clients) resolve the same URL each into a RedisStore of their own:
    the registry sees one shared state, not a conflicting ``store`` option."""
    registry = BreakerRegistry()
    mine = RedisStore(redis_url, key_prefix=prefix)
    theirs = RedisStore(redis_url, key_prefix=prefix)
    spelled_out = redis_url.replace("/0", "").rstrip("/") + "/0"  # host:port/0
    other_prefix = RedisStore(redis_url, key_prefix=prefix + "other:")
    other_db = RedisStore(redis_url.rsplit("/", 1)[0] + "/1", key_prefix=prefix)
    stores = (mine, theirs, other_prefix, other_db)
    try:
        template = circuit_breaker("openai:{model}", registry=registry, store=mine)
        assert isinstance(template, BreakerTemplate)
        assert circuit_breaker("openai:{model}", registry=registry, store=theirs) is template
        breaker = template.breaker(model="gpt-4o")
        assert registry.get_or_create("openai:gpt-4o", store=theirs) is breaker
        url_with_prefix = f"{spelled_out}?key_prefix={prefix}"
        assert registry.get_or_create("openai:gpt-4o", store=url_with_prefix) is breaker
        plain = registry.get_or_create("plain", store=redis_url)  # a URL, then a store
        assert registry.get_or_create("plain", store=RedisStore(redis_url)) is plain
        # Another key prefix or another database is another state.
        for other in (other_prefix, other_db):
            with pytest.raises(ConfigError) as caught:
                circuit_breaker("openai:{model}", registry=registry, store=other)
            assert caught.value.setting == "store"
    finally:
        for store in stores:
            store.close()
