"""The benchmark harness: ns per call, median of repeats, ratio to an anchor measured in
the same run.

A benchmark module ``benchmarks/bench_<topic>.py`` defines either or both of:

- ``cases() -> list[Case]``: micro-benchmarks of one call each. In a group, the case named
  ``"bare"`` (the undecorated function) is subtracted from the others to give the
  *overhead*; a case with ``anchor="pybreaker"`` is compared with the case of that name,
  ratio = our overhead / the anchor's overhead, and checked against ``target``.
- ``results(quick: bool) -> list[Result]``: figures that are not ns per call (goodput,
  effective concurrency, memory, requests/s), each with its own target.
"""

from __future__ import annotations

import gc
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Case:
    group: str
    name: str
    fn: Callable[[], object]
    anchor: str | None = None  # name of the case in the same group we compare with
    target: float | None = None  # our overhead / anchor overhead must be <= target
    threads: int = 1  # > 1: the same fn from N threads at once; ns is wall time per call
    check: Callable[[int], None] | None = None  # called with the number of calls made


@dataclass
class Result:
    group: str
    name: str
    value: float
    unit: str
    target: float | None = None
    higher_is_better: bool = True
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target


def _loop(fn: Callable[[], object], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - started


def _threaded(fn: Callable[[], object], n: int, threads: int) -> float:
    per_thread = max(1, n // threads)
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def work() -> None:
        barrier.wait()
        try:
            for _ in range(per_thread):
                fn()
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    started = time.perf_counter()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed * n / (per_thread * threads)


def measure_ns(
    fn: Callable[[], object],
    *,
    repeats: int = 7,
    min_time: float = 0.2,
    threads: int = 1,
    calls: list[int] | None = None,
) -> float:
    """Median ns per call over ``repeats`` runs of at least ``min_time`` seconds each,
    garbage collector on (as in production)."""
    gc.collect()
    n = 1
    while True:  # calibrate
        elapsed = _loop(fn, n)
        if elapsed >= min_time / 10 or n >= 10_000_000:
            break
        n *= 10
    n = max(1, int(n * (min_time / max(elapsed, 1e-9))))
    samples = []
    for _ in range(repeats):
        elapsed = _threaded(fn, n, threads) if threads > 1 else _loop(fn, n)
        if calls is not None:
            calls.append(n if threads == 1 else (n // threads) * threads)
        samples.append(elapsed / n * 1e9)
    return statistics.median(samples)


def run_cases(cases: list[Case], *, quick: bool = False) -> list[dict[str, Any]]:
    """Measure every case; return rows with ns, overhead and ratio to the anchor."""
    repeats, min_time = (3, 0.05) if quick else (7, 0.2)
    measured: dict[tuple[str, str, int], float] = {}
    rows: list[dict[str, Any]] = []
    for case in cases:
        calls: list[int] = []
        ns = measure_ns(
            case.fn, repeats=repeats, min_time=min_time, threads=case.threads, calls=calls
        )
        if case.check is not None:
            case.check(sum(calls))
        measured[(case.group, case.name, case.threads)] = ns
    for case in cases:
        ns = measured[(case.group, case.name, case.threads)]
        bare = measured.get((case.group, "bare", case.threads))
        overhead = ns - bare if bare is not None and case.name != "bare" else ns
        row: dict[str, Any] = {
            "group": case.group,
            "name": case.name,
            "threads": case.threads,
            "ns_per_call": round(ns, 1),
            "overhead_ns": round(overhead, 1),
            "anchor": case.anchor,
            "ratio": None,
            "target": case.target,
            "ok": None,
        }
        if case.anchor is not None:
            anchor_ns = measured[(case.group, case.anchor, case.threads)]
            anchor_overhead = anchor_ns - bare if bare is not None else anchor_ns
            ratio = overhead / anchor_overhead if anchor_overhead > 0 else float("inf")
            row["ratio"] = round(ratio, 3)
            if case.target is not None:
                row["ok"] = ratio <= case.target
        rows.append(row)
    return rows


def result_row(result: Result) -> dict[str, Any]:
    row = asdict(result)
    row["ok"] = result.ok
    return row
