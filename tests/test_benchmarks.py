"""The benchmark harness: a quick run writes valid JSON, compares with an earlier run, and
counts calls exactly (what the count checks of the cross-cutting cases rely on)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pybreaker  # noqa: F401 - the bench extra (anchors) is part of "dev": fail, not skip
import pytest
import tenacity  # noqa: F401

from benchmarks._harness import CallCounter, Case, Result, run_cases

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_quick_run_prints_a_table_and_writes_json_then_compares(tmp_path: Path) -> None:
    first = tmp_path / "first.json"
    done = _run("--quick", "-k", "ratelimit", "-k", "concurrency", "--json", str(first))
    assert done.returncode == 0, done.stderr
    assert "vs anchor" in done.stdout
    assert "targets:" in done.stdout
    report = json.loads(first.read_text())
    assert report["modules"] == ["bench_concurrency", "bench_ratelimit"]
    assert report["quick"] is True
    assert report["errors"] == []
    names = {(r["group"], r["name"]) for r in report["cases"]}
    assert ("rate_limited", "ai_guard") in names
    ours = next(r for r in report["cases"] if r["name"] == "ai_guard")
    assert ours["anchor"] == "tenacity"
    assert ours["ratio"] is not None
    assert ours["ns_min"] <= ours["ns_per_call"] <= ours["ns_max"]
    figures = {r["name"]: r for r in report["results"]}
    assert figures["ai_guard full stack / unwrapped"]["target"] == 0.9

    second = tmp_path / "second.json"
    again = _run(
        "--quick", "-k", "ratelimit", "--repeats", "2", "--json", str(second),
        "--compare", str(first),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "was ns" in again.stdout
    assert json.loads(second.read_text())["repeats"] == 2


def test_no_matching_module_is_an_error(tmp_path: Path) -> None:
    from benchmarks.__main__ import main

    assert main(["-k", "no-such-benchmark", "--json", str(tmp_path / "x.json")]) == 2


def test_every_call_is_counted_so_checks_can_be_exact() -> None:
    made: list[int] = []
    counted: list[int] = []

    def fn() -> None:
        made.append(1)

    def check(calls: int) -> None:
        counted.append(calls)
        assert calls == len(made)

    rows = run_cases(
        [Case("g", "bare", lambda: None), Case("g", "one", fn, check=check)],
        quick=True,
        repeats=2,
    )
    assert counted == [len(made)]
    assert rows[1]["check"] == "ok"
    assert rows[1]["calls"] == len(made)


def test_a_failing_check_marks_the_row_and_the_run_goes_on() -> None:
    def check(calls: int) -> None:
        raise AssertionError("counted 1 of 2")

    rows = run_cases(
        [
            Case("g", "bare", lambda: None, threads=2),
            Case("g", "ours", lambda: None, anchor="bare", target=1e9, threads=2, check=check),
        ],
        quick=True,
        repeats=1,
    )
    assert rows[1]["ok"] is False
    assert "counted 1 of 2" in rows[1]["check"]


def test_a_call_counter_is_exact_from_eight_threads_and_catches_a_double_call() -> None:
    once, twice = CallCounter(), CallCounter()

    def run_twice() -> None:  # a guard that ran the function twice for one call
        twice.tick()
        twice.tick()

    rows = run_cases(
        [
            Case("g", "bare", lambda: None, threads=8),
            Case("g", "once", once.tick, threads=8, setup=once.setup, check=once.check),
            Case("g", "twice", run_twice, threads=8, setup=twice.setup, check=twice.check),
        ],
        quick=True,
        repeats=2,
    )
    assert rows[1]["check"] == "ok"
    assert rows[1]["calls"] >= 8
    assert "calls reached the function" in rows[2]["check"]
    assert rows[2]["ok"] is False


def test_a_call_counter_counts_from_its_setup_on() -> None:
    counter = CallCounter(expected=lambda calls: 0)  # e.g. replays: the function never runs
    counter.tick()  # a warm-up call before the case
    counter.setup()
    counter.check(5)
    counter.tick()
    with pytest.raises(AssertionError, match="1 calls reached the function, expected 0"):
        counter.check(5)


def test_setup_runs_before_and_teardown_after_the_case() -> None:
    events: list[str] = []
    rows = run_cases(
        [
            Case(
                "g",
                "c",
                lambda: events.append("call") if not events or events[-1] != "call" else None,
                setup=lambda: events.append("setup"),
                teardown=lambda: events.append("teardown"),
            )
        ],
        quick=True,
        repeats=1,
    )
    assert events[0] == "setup"
    assert events[-1] == "teardown"
    assert "call" in events
    assert rows[0]["ratio"] is None


def test_result_targets_read_in_their_direction() -> None:
    assert Result("g", "goodput", 96.0, "%", target=95.0).ok is True
    assert Result("g", "429s", 2.0, "%", target=1.0, higher_is_better=False).ok is False
    assert Result("g", "info", 1.0, "x").ok is None
