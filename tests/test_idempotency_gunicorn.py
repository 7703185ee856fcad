"""Exactly-once across processes: a real Flask app under gunicorn (4 workers) on Redis."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import requests

from tests._servers import gunicorn
from tests.conftest import RedisServer

WORKERS = 4
CONCURRENT_POSTS = 64


@dataclass
class Served:
    url: str
    prefix: str


@pytest.fixture
def served_app(redis_server: RedisServer) -> Iterator[Served]:
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    env = {"AI_GUARD_TEST_REDIS_URL": redis_server.url, "AI_GUARD_TEST_PREFIX": prefix}
    try:
        with gunicorn(
            "tests.apps.idempotent_app:app",
            # Sync workers (the default) accept one connection at a time, so the 64
            # requests are spread over the 4 processes.
            workers=WORKERS,
            env=env,
            ready_path="/health",
            # The app is imported once, before the fork: a booted worker is a ready
            # worker, and the workers inherit the parent's modules (claim tokens must
            # differ per worker).
            extra_args=("--preload",),
        ) as server:
            yield Served(server.url, prefix)
    finally:
        client = redis.Redis.from_url(redis_server.url)
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.mark.slow
def test_64_concurrent_posts_to_4_gunicorn_workers_run_the_view_exactly_once(
    served_app: Served, redis_server: RedisServer
) -> None:
    key = f"order-{uuid.uuid4()}"
    barrier = threading.Barrier(CONCURRENT_POSTS)

    def send(_: int) -> requests.Response:
        barrier.wait(timeout=30)
        return requests.post(
            f"{served_app.url}/orders",
            json={"item": "book"},
            headers={"Idempotency-Key": key},
            timeout=30,
        )

    with ThreadPoolExecutor(max_workers=CONCURRENT_POSTS) as pool:
        responses = list(pool.map(send, range(CONCURRENT_POSTS)))

    counter = redis.Redis.from_url(redis_server.url)
    try:
        side_effects = int(counter.get(served_app.prefix + "side_effects") or 0)
    finally:
        counter.close()
    assert side_effects == 1

    originals = [
        r for r in responses if r.status_code == 201 and "Idempotent-Replayed" not in r.headers
    ]
    replays = [r for r in responses if r.headers.get("Idempotent-Replayed") == "true"]
    conflicts = [r for r in responses if r.status_code == 409]
    assert len(originals) == 1
    assert len(originals) + len(replays) + len(conflicts) == CONCURRENT_POSTS
    original: dict[str, Any] = originals[0].json()
    assert original["order"] == 1
    for replay in replays:
        assert replay.status_code == 201
        assert replay.json() == original
    for conflict in conflicts:
        assert conflict.headers["Content-Type"] == "application/problem+json"
        assert conflict.json()["status"] == 409
        assert int(conflict.headers["Retry-After"]) >= 1
    assert conflicts, "the other requests arrived while the first was running"
    served_by = {r.headers["X-Served-By"] for r in responses}
    assert len(served_by) >= 2, "the requests were served by several processes"

    # Afterwards, any worker replays the stored response; another payload is refused.
    later = requests.post(
        f"{served_app.url}/orders",
        json={"item": "book"},
        headers={"Idempotency-Key": key},
        timeout=30,
    )
    assert later.headers["Idempotent-Replayed"] == "true"
    assert later.json() == original
    other = requests.post(
        f"{served_app.url}/orders",
        json={"item": "lamp"},
        headers={"Idempotency-Key": key},
        timeout=30,
    )
    assert other.status_code == 422
