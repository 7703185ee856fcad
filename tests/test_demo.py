"""``python -m ai_guard demo --quick``, the README's first command, as a user runs it."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ai_guard.demo import Progress

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    figures = tmp_path_factory.mktemp("demo") / "figures.json"
    result = subprocess.run(
        [sys.executable, "-m", "ai_guard", "demo", "--quick", "--json", str(figures)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result, json.loads(figures.read_text())


@pytest.mark.slow
def test_the_demo_exits_0_and_prints_the_report_table(
    demo_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    result, _ = demo_run
    report = result.stdout
    for label in (
        "requests by tier",
        "latency p95",
        "cache hit rate",
        "cost",
        "429s avoided",
        "replays",
        "breaker transitions",
        "SLOs (since start)",
        "latency_p95_mini",
        "availability",
    ):
        assert label in report, label
    assert "openai:gpt-4o-mini  closed -> open" in report
    assert "half_open -> closed" in report


@pytest.mark.slow
def test_the_demo_progress_is_plain_lines_when_stderr_is_not_a_terminal(
    demo_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    result, _ = demo_run
    assert "\r" not in result.stderr
    assert "\x1b[" not in result.stderr
    phases = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line[:5] for line in phases] == [f"[{n}/6]" for n in range(1, 7)]
    assert "/ai-guard/" in result.stderr  # where the dashboard is


@pytest.mark.slow
def test_the_demo_figures_are_plausible(
    demo_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    _, figures = demo_run
    assert figures["problems"] == []
    # Traffic: routed mostly to mini, measured, priced, mostly cached.
    assert figures["requests"] >= 80
    assert figures["mini_requests"] + figures["full_requests"] <= figures["requests"]
    assert 60 <= figures["mini_percentage"] <= 100
    assert figures["p95_ms"]["mini"] > 0
    assert figures["p95_ms"]["full"] > 0
    assert figures["cache_hit_rate"] > 0.5
    assert figures["cost_usd"] > 0
    # The burst met the quota and was paced: (almost) no 429, where unpaced it met many.
    burst = figures["burst"]
    assert burst["answered"] == burst["requests"]
    assert burst["paced_429"] <= 1
    assert burst["unpaced_429"] >= burst["requests"] // 4
    assert burst["avoided_429"] == burst["unpaced_429"] - burst["paced_429"]
    # The outage opened both breakers, which then healed through half-open.
    transitions = {(t["breaker"], t["from_state"], t["to_state"]) for t in figures["transitions"]}
    for breaker in ("openai:gpt-4o-mini", "openai:gpt-4o"):
        assert (breaker, "closed", "open") in transitions
        assert (breaker, "open", "half_open") in transitions
        assert (breaker, "half_open", "closed") in transitions
    outage = figures["outage"]
    assert outage["rejected_fast"] == outage["rejected_requests"] > 0
    assert outage["reached_upstream_while_open"] == 0
    assert set(outage["final_states"].values()) == {"closed"}
    assert figures["slos"]["availability"] is False  # the outage spent the budget
    # Replays: the same key twice, one upstream call.
    replays = figures["replays"]
    assert replays["replayed"] == replays["keys"] == replays["upstream_calls"] > 0
    # A stream with usage, and a validated structured output.
    assert figures["stream"]["status"] == 200
    assert figures["stream"]["deltas"] > 3
    assert figures["stream"]["usage"]["completion_tokens"] > 0
    ticket = figures["structured"]["ticket"]
    assert figures["structured"]["status"] == 200
    assert ticket["category"] in {"billing", "bug", "feature_request", "other"}
    assert 1 <= ticket["urgency"] <= 5


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_redraws_in_place_on_a_terminal() -> None:
    stream = _Terminal()
    ticks = iter([0.0, 0.0, 1.0, 1.01, 2.0, 3.0])
    progress = Progress(stream, phases=2, clock=lambda: next(ticks))
    progress.start("normal traffic", 4)
    progress.advance(2, note="halfway")
    progress.advance(1, note="too soon to redraw")
    progress.finish("4/4 answered")
    text = stream.getvalue()
    assert text.startswith("\r\x1b[K[1/2] normal traffic")
    assert "[##############--------------]  50%  halfway" in text
    assert "too soon" not in text
    assert text.endswith("\r\x1b[K[1/2] normal traffic     4/4 answered (2.0 s)\n")


def test_the_progress_bar_writes_one_line_per_phase_elsewhere() -> None:
    stream = io.StringIO()
    progress = Progress(stream, phases=2, clock=lambda: 5.0)
    for name in ("one", "two"):
        progress.start(name, 10)
        progress.advance(10)
        progress.finish("done")
    assert stream.getvalue().splitlines() == [
        "[1/2] one                done (0.0 s)",
        "[2/2] two                done (0.0 s)",
    ]
