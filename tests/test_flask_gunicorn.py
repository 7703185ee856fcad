"""``examples/flask_app.py`` under a real gunicorn: 2 workers, the Redis store, the fake
upstream started here as the AI API."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from ai_guard.breaker import default_registry
from ai_guard.testing import FakeUpstream
from tests._servers import Gunicorn, gunicorn

WORKERS = 2
REDIS_DB = 5  # the other Redis tests use database 0
# The worker's pid in every access-log line: which process answered which request.
ACCESS_FORMAT = "served-by %(p)s %(m)s %(U)s %(s)s"


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(latency=0.02) as fake:
        yield fake


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[str]:
    """A Redis database of this module's own, empty before and after each test (the app's
    breakers, budgets and idempotency keys live there)."""
    url = redis_url.rsplit("/", 1)[0] + f"/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def _example_app(env: dict[str, str]) -> AbstractContextManager[Gunicorn]:
    """``examples/flask_app.py`` under gunicorn, every request in the access log."""
    return gunicorn(
        "examples.flask_app:create_app()",
        workers=WORKERS,
        env=env,
        ready_path="/ai-guard/health",
        extra_args=("--access-logfile", "-", "--access-logformat", ACCESS_FORMAT),
    )


@pytest.fixture
def served(redis_db: str, upstream: FakeUpstream) -> Iterator[Gunicorn]:
    env = {
        "OPENAI_BASE_URL": upstream.url,
        "OPENAI_API_KEY": "sk-test-not-a-real-key",
        # Flask's from_prefixed_env: FLASK_X=... becomes app.config["X"] (JSON-parsed).
        "FLASK_AI_GUARD_STORE_URL": redis_db,
        "FLASK_AI_GUARD_CRITICAL_BREAKERS": json.dumps(["openai:*"]),
    }
    with _example_app(env) as server:
        yield server


def _served_by(
    server: Gunicorn, method: str, path: str, *, at_least: int = 0
) -> list[tuple[int, int]]:
    """(pid, status) of every logged request to ``path``, once at least ``at_least`` are
    logged (a worker writes its access line just after answering: poll, 10 s at most)."""
    pattern = re.compile(rf"served-by <?(\d+)>? {method} {re.escape(path)} (\d{{3}})")
    deadline = time.monotonic() + 10
    while True:
        found = [(int(pid), int(code)) for pid, code in pattern.findall(server.log_text())]
        if len(found) >= at_least or time.monotonic() > deadline:
            return found
        time.sleep(0.02)  # waiting for another process to write its log line


@pytest.mark.slow
@pytest.mark.redis
def test_the_example_app_answers_through_gunicorn_workers(
    served: Gunicorn, upstream: FakeUpstream
) -> None:
    with requests.Session() as session:
        answer = session.post(
            f"{served.url}/answers",
            json={
                "question": "Which tyre pressure for a city bike?",
                "task": "short_answer",
                "complexity": 2,
            },
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "gpt-4o-mini"
        critical = session.post(
            f"{served.url}/answers",
            json={"question": "Is this frame crack dangerous?", "critical": True},
            timeout=30,
        )
        assert critical.json()["model"] == "gpt-4o"
        topic = session.post(f"{served.url}/classify", json={"text": "invoice wrong"}, timeout=30)
        assert topic.status_code == 200, topic.text
        with session.get(
            f"{served.url}/stream", params={"question": "fix a flat"}, stream=True, timeout=30
        ) as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")
            lines = [line for line in stream.iter_lines(decode_unicode=True) if line]
        assert lines[-1] == "data: [DONE]"
        assert "event: usage" in lines
        ticket = session.post(
            f"{served.url}/extract", json={"text": "Ana here, the app crashes."}, timeout=30
        )
        assert ticket.status_code == 200, ticket.text
        assert set(ticket.json()) == {"category", "urgency", "summary", "customer_name"}
        bad = session.post(f"{served.url}/answers", json={"question": ""}, timeout=30)
        assert bad.status_code == 400
        assert bad.headers["Content-Type"] == "application/problem+json"
    assert upstream.stats()["200"] == 5
    assert upstream.server_errors == []


@pytest.mark.slow
@pytest.mark.redis
def test_an_idempotent_post_is_replayed_by_the_other_worker(
    served: Gunicorn, upstream: FakeUpstream
) -> None:
    key = f"answer-{uuid.uuid4()}"
    question = f"Can you true a wheel while I wait? ({key})"
    body = {"question": question, "task": "short_answer", "complexity": 1}
    headers = {"Idempotency-Key": key}
    first = requests.post(f"{served.url}/answers", json=body, headers=headers, timeout=30)
    assert first.status_code == 200, first.text
    assert "Idempotent-Replayed" not in first.headers

    first_pid = _served_by(served, "POST", "/answers", at_least=1)[-1][0]
    # A replay is fast: one worker may well answer them all. Which sync worker takes a new
    # connection is the kernel's choice: often the one that did not answer the last
    # request (it is back in accept() first), sometimes always the same one. So the
    # rounds alternate: a replay alone, then replays while a slow stream (under way: its
    # first chunk came) keeps one worker busy, so that they go to the other.
    upstream.configure(stream_chunk_delay=0.05)
    replays: list[requests.Response] = []

    def send_replay() -> None:
        replays.append(
            requests.post(f"{served.url}/answers", json=body, headers=headers, timeout=30)
        )

    pids: set[int] = set()
    for round_number in range(8):  # bounded: until a worker other than the first's replayed
        if round_number % 2 == 0:
            send_replay()
        else:
            with requests.get(
                f"{served.url}/stream", params={"question": "long"}, stream=True, timeout=30
            ) as busy:
                assert busy.status_code == 200
                chunks = busy.iter_content(chunk_size=None)
                assert next(chunks)
                for _ in range(3):
                    send_replay()
                assert b"[DONE]" in b"".join(chunks)
        logged = _served_by(served, "POST", "/answers", at_least=1 + len(replays))
        pids = {pid for pid, _ in logged}
        if pids - {first_pid}:
            break
    assert pids - {first_pid}, f"no other worker replayed the key:\n{served.log_text()}"
    for replay in replays:
        assert replay.status_code == 200
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert replay.json() == first.json()
    asked = [r for r in upstream.requests if question in json.dumps(r.json)]
    assert len(asked) == 1, "the upstream was called again for a replayed key"


@pytest.mark.slow
@pytest.mark.redis
def test_health_and_prometheus_are_answered_to_loopback_clients(served: Gunicorn) -> None:
    requests.post(f"{served.url}/answers", json={"question": "hello"}, timeout=30)
    health = requests.get(f"{served.url}/ai-guard/health", timeout=10)
    assert health.status_code == 200
    body: dict[str, Any] = health.json()
    assert body["status"] in {"ok", "degraded"}
    # FLASK_AI_GUARD_CRITICAL_BREAKERS reached the app (a worker that has not called the
    # upstream yet has no breaker: it reports the critical pattern as not created).
    if body["breakers"]:
        assert all(b["critical"] for b in body["breakers"])
    else:
        assert body["critical_not_created"] == ["openai:*"]
    scrape = requests.get(f"{served.url}/ai-guard/metrics/prometheus", timeout=10)
    assert scrape.status_code == 200
    assert scrape.headers["Content-Type"].startswith("text/plain; version=")
    names = {f.name for f in text_string_to_metric_families(scrape.text)}
    assert "ai_guard_circuit_state" in names
    dashboard = requests.get(f"{served.url}/ai-guard/", timeout=10)
    assert dashboard.status_code == 200
    assert "<svg" in dashboard.text


@pytest.mark.slow
@pytest.mark.redis
def test_in_prometheus_multiprocess_mode_a_scrape_counts_the_calls_of_both_workers(
    redis_db: str, upstream: FakeUpstream, tmp_path: Path
) -> None:
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    env = {
        "OPENAI_BASE_URL": upstream.url,
        "FLASK_AI_GUARD_STORE_URL": redis_db,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir),
    }
    # A slower upstream keeps a worker busy, so concurrent requests reach both.
    upstream.configure(latency=0.05)
    with _example_app(env) as server:

        def ask(index: int) -> int:
            body = {"question": f"Question {index}?", "task": "classification"}
            return requests.post(f"{server.url}/answers", json=body, timeout=30).status_code

        calls = 0
        for _ in range(5):  # bounded: until both workers have answered
            with ThreadPoolExecutor(max_workers=6) as pool:
                assert set(pool.map(ask, range(12))) == {200}
            calls += 12
            logged = _served_by(server, "POST", "/answers", at_least=calls)
            if len({pid for pid, _ in logged}) == WORKERS:
                break
        assert len({pid for pid, _ in logged}) == WORKERS, server.log_text()
        for _ in range(3):  # whichever worker answers the scrape
            scrape = requests.get(f"{server.url}/ai-guard/metrics/prometheus", timeout=10)
            total = sum(
                sample.value
                for family in text_string_to_metric_families(scrape.text)
                for sample in family.samples
                if sample.name == "ai_guard_requests_total"
            )
            assert total == calls
    assert {p.name.split("_")[0] for p in multiproc_dir.iterdir()} >= {"counter", "histogram"}


@pytest.fixture
def forget_new_breakers() -> Iterator[None]:
    """The example registers ``openai:{model}`` in the process-wide registry: remove what
    this test added, so later tests asking for that template with options of their own do
    not meet ours."""
    registry = default_registry()
    templates = set(registry.templates())
    yield
    for template in set(registry.templates()) - templates:
        registry.remove_template(template)  # and the breakers it made


@pytest.mark.usefixtures("forget_new_breakers")
def test_the_example_app_factory_builds_several_apps_in_one_process(
    upstream: FakeUpstream,
) -> None:
    """A test suite builds an app per test: the process-wide breakers must not object."""
    from examples.flask_app import create_app

    config = {"OPENAI_BASE_URL": upstream.url, "AI_GUARD_TRACING": False}
    first, second = create_app(config), create_app(config)
    for app in (first, second):
        response = app.test_client().post("/answers", json={"question": "Open on Sunday?"})
        assert response.status_code == 200, response.get_data(as_text=True)
    assert first.extensions["ai_guard"] is not second.extensions["ai_guard"]
