"""Prometheus multiprocess mode: a real Flask app under gunicorn with 2 workers; a scrape
answered by either worker counts the calls of both, exactly."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests._servers import ROOT, gunicorn

WORKERS = 2
MAX_CALLS = 600  # bounded load: stop once both workers have answered, or here
BATCH = 60  # every fifth call of a batch fails


@dataclass
class Served:
    url: str
    multiproc_dir: Path


@pytest.fixture
def served_app(tmp_path: Path) -> Iterator[Served]:
    multiproc_dir = tmp_path / "prometheus"
    multiproc_dir.mkdir()
    with gunicorn(
        "tests.apps.metrics_app:app",
        # Sync workers (the default) take one connection at a time: concurrent clients
        # reach both.
        workers=WORKERS,
        env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)},
        ready_path="/metrics",
        extra_args=("--config", str(ROOT / "tests" / "apps" / "metrics_gunicorn_conf.py")),
    ) as server:
        yield Served(server.url, multiproc_dir)


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = requests.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return samples


def _total(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= set(lbls))


@pytest.mark.slow
def test_counts_from_two_gunicorn_workers_add_up_exactly(served_app: Served) -> None:
    pids: set[int] = set()
    calls = failures = 0

    def send(index: int) -> tuple[int, bool]:
        fail = index % 5 == 0
        response = requests.post(
            f"{served_app.url}/call", params={"fail": "1"} if fail else None, timeout=10
        )
        assert response.status_code == 200
        return int(response.json()["pid"]), fail

    with ThreadPoolExecutor(max_workers=8) as pool:
        while calls < MAX_CALLS and (len(pids) < WORKERS or calls < 2 * BATCH):
            for pid, failed in pool.map(send, range(BATCH)):
                pids.add(pid)
                calls += 1
                failures += failed
    assert len(pids) == WORKERS, f"one worker answered everything: {pids}"

    for _ in range(4):  # whichever worker answers the scrape, the totals are the same
        samples = _scrape(served_app.url)
        mini = {"model": "gpt-4o-mini", "tier": "mini"}
        assert _total(samples, "ai_guard_requests_total") == calls
        assert _total(samples, "ai_guard_requests_total", **mini, outcome="error") == failures
        assert _total(samples, "ai_guard_requests_total", **mini, outcome="success") == (
            calls - failures
        )
        assert _total(samples, "ai_guard_tokens_total", **mini, type="input") == (
            100 * (calls - failures)
        )
        assert _total(samples, "ai_guard_tokens_total", **mini, type="cached") == (
            64 * (calls - failures)
        )
        assert _total(samples, "ai_guard_request_latency_seconds_count", **mini) == calls
        assert (
            _total(samples, "ai_guard_request_latency_seconds_bucket", **mini, le="+Inf") == calls
        )
        assert _total(samples, "ai_guard_cost_usd_total", **mini) == pytest.approx(
            (calls - failures) * (36 * 0.15 + 64 * 0.075 + 20 * 0.60) / 1e6
        )
    # One file per worker and metric type: the figures really came from both processes.
    files = {p.name for p in served_app.multiproc_dir.iterdir()}
    assert {f"counter_{pid}.db" for pid in pids} <= files
    assert {f"histogram_{pid}.db" for pid in pids} <= files
