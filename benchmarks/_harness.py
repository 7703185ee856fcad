"""The benchmark harness: ns per call, median of repeats, ratio to an anchor measured in
the same run.

A benchmark module ``benchmarks/bench_<topic>.py`` defines either or both of:

- ``cases() -> list[Case]``: micro-benchmarks of one call each. In a group, the case named
  ``"bare"`` (the undecorated function) is subtracted from the others to give the
  *overhead*; a case with ``anchor="pybreaker"`` is compared with the case of that name,
  ratio = our overhead / the anchor's overhead, and checked against ``target``.
- ``results(quick: bool) -> list[Result]``: figures that are not ns per call (goodput,
  effective concurrency, memory, requests/s), each with its own target.

Every call a case's ``fn`` receives is counted, calibration included, so that ``check``
can assert *exact* counts (the metrics collector saw every call, the Prometheus counter
too). A failing check does not stop the run: the row says ``check failed`` and counts as a
missed target.
"""

from __future__ import annotations

import gc
import itertools
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

#: Repeats and seconds per repeat: a full run, and ``--quick``.
FULL = (7, 0.2)
QUICK = (3, 0.05)


@dataclass
class Case:
    group: str
    name: str
    fn: Callable[[], object]
    anchor: str | None = None  # name of the case in the same group we compare with
    target: float | None = None  # our overhead / anchor overhead must be <= target
    threads: int = 1  # > 1: the same fn from N threads at once; ns is wall time per call
    check: Callable[[int], None] | None = None  # called with the exact number of calls made
    setup: Callable[[], None] | None = None  # called once, just before the case is measured
    teardown: Callable[[], None] | None = None  # called once its group has been measured


class CallCounter:
    """Counts the calls that reach a function, exactly, from any number of threads:
    ``tick`` is an ``itertools.count``'s ``__next__`` (atomic under the GIL, no lock).

    Use ``setup`` and ``check`` as a case's own: ``check(calls)`` raises unless exactly
    ``calls`` calls (or ``expected(calls)`` of them) reached the function since ``setup``.
    """

    def __init__(self, expected: Callable[[int], int] | None = None) -> None:
        self._count = itertools.count()
        self.tick: Callable[[], int] = self._count.__next__
        self._reads = 0
        self._baseline = 0
        self._expected = expected

    def _value(self) -> int:
        # Reading the count is one more next(): take the reads back out.
        value = next(self._count) - self._reads
        self._reads += 1
        return value

    def setup(self) -> None:
        self._baseline = self._value()

    def check(self, calls: int) -> None:
        reached = self._value() - self._baseline
        expected = calls if self._expected is None else self._expected(calls)
        if reached != expected:
            raise AssertionError(f"{reached} calls reached the function, expected {expected}")


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


@dataclass
class Measurement:
    """What :func:`measure` found: the median and the spread over the repeats, and how
    many times ``fn`` was called in all (calibration included)."""

    ns: float
    ns_min: float
    ns_max: float
    calls: int


def _loop(fn: Callable[[], object], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - started


def _threaded(fn: Callable[[], object], per_thread: int, threads: int) -> float:
    """Wall time of ``threads`` threads making ``per_thread`` calls each, started
    together."""
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
    return elapsed


def _calibrate(fn: Callable[[], object], min_time: float, threads: int) -> tuple[int, int]:
    """How many calls make one repeat of about ``min_time`` seconds; and the calls made
    to find out (single-threaded)."""
    calls = 0
    n = 1
    while True:
        elapsed = _loop(fn, n)
        calls += n
        if elapsed >= min_time / 10 or n >= 10_000_000:
            break
        n *= 10
    return max(threads, int(n * (min_time / max(elapsed, 1e-9)))), calls


def _repeat(fn: Callable[[], object], n: int, threads: int) -> tuple[float, int]:
    """One repeat: ns per call, and the calls made."""
    if threads > 1:
        per_thread = max(1, n // threads)
        made = per_thread * threads
        elapsed = _threaded(fn, per_thread, threads)
    else:
        made = n
        elapsed = _loop(fn, n)
    return elapsed / made * 1e9, made


def measure(
    fn: Callable[[], object],
    *,
    repeats: int = FULL[0],
    min_time: float = FULL[1],
    threads: int = 1,
) -> Measurement:
    """Median ns per call over ``repeats`` runs of at least ``min_time`` seconds each,
    garbage collector on (as in production). From ``threads`` threads, ns per call is the
    wall time divided by every thread's calls."""
    gc.collect()
    n, calls = _calibrate(fn, min_time, threads)
    samples = []
    for _ in range(repeats):
        ns, made = _repeat(fn, n, threads)
        calls += made
        samples.append(ns)
    return Measurement(statistics.median(samples), min(samples), max(samples), calls)


def measure_ns(
    fn: Callable[[], object],
    *,
    repeats: int = FULL[0],
    min_time: float = FULL[1],
    threads: int = 1,
    calls: list[int] | None = None,
) -> float:
    """:func:`measure`'s median alone; appends the number of calls made to ``calls``."""
    found = measure(fn, repeats=repeats, min_time=min_time, threads=threads)
    if calls is not None:
        calls.append(found.calls)
    return found.ns


def _batches(cases: list[Case], interleave: bool) -> list[list[Case]]:
    """The cases grouped by (group, threads), in their order: the unit of interleaving
    (one case per batch when not interleaving)."""
    if not interleave:
        return [[case] for case in cases]
    batches: dict[tuple[str, int], list[Case]] = {}
    for case in cases:
        batches.setdefault((case.group, case.threads), []).append(case)
    return list(batches.values())


def _paired_ratio(ours: list[float], anchor: list[float], bare: list[float] | None) -> float | None:
    """Median over the rounds of (ours - bare) / (anchor - bare), each round's figures
    taken moments apart, so that a burst of load on a shared machine moves both."""
    ratios = []
    for i, (mine, theirs) in enumerate(zip(ours, anchor, strict=True)):
        base = bare[i] if bare is not None else 0.0
        if theirs - base > 0:
            ratios.append((mine - base) / (theirs - base))
    return statistics.median(ratios) if ratios else None


def run_cases(
    cases: list[Case],
    *,
    quick: bool = False,
    repeats: int | None = None,
    interleave: bool = True,
) -> list[dict[str, Any]]:
    """Measure every case; return rows with ns, overhead and ratio to the anchor.

    With ``interleave`` the cases of one group and thread count are measured in rounds:
    every case once per round (one repeat each), ``repeats`` rounds, so that a burst of
    load on a shared machine hits ours and the anchor alike. Otherwise each case's
    repeats run back to back, and its teardown before the next case starts (nothing it
    keeps alive weighs on the others). ns per call is the median over the repeats; the
    ratio to the anchor is the median of the repeats' paired ratios.
    """
    default_repeats, min_time = QUICK if quick else FULL
    repeats = repeats or default_repeats
    samples: dict[tuple[str, str, int], list[float]] = {}
    calls: dict[tuple[str, str, int], int] = {}
    failures: dict[tuple[str, str, int], str] = {}
    for batch in _batches(cases, interleave):
        sizes = []
        gc.collect()
        for case in batch:
            key = (case.group, case.name, case.threads)
            if case.setup is not None:
                case.setup()
            n, made = _calibrate(case.fn, min_time, case.threads)
            sizes.append(n)
            samples[key] = []
            calls[key] = made
        for _ in range(repeats):
            for case, n in zip(batch, sizes, strict=True):
                key = (case.group, case.name, case.threads)
                ns, made = _repeat(case.fn, n, case.threads)
                samples[key].append(ns)
                calls[key] += made
        for case in batch:
            key = (case.group, case.name, case.threads)
            if case.check is not None:
                try:
                    case.check(calls[key])
                except Exception as exc:  # reported in the row, the run goes on
                    failures[key] = f"{type(exc).__name__}: {exc}"
        for case in batch:
            # Drop what a case keeps alive (a rate limiter's entries...) before the next
            # batch: the garbage collector would otherwise walk it during their rounds.
            if case.teardown is not None:
                case.teardown()
    rows: list[dict[str, Any]] = []
    for case in cases:
        key = (case.group, case.name, case.threads)
        mine = samples[key]
        ns = statistics.median(mine)
        bare = samples.get((case.group, "bare", case.threads))
        bare_ns = statistics.median(bare) if bare is not None else None
        overhead = ns - bare_ns if bare_ns is not None and case.name != "bare" else ns
        row: dict[str, Any] = {
            "group": case.group,
            "name": case.name,
            "threads": case.threads,
            "ns_per_call": round(ns, 1),
            "ns_min": round(min(mine), 1),
            "ns_max": round(max(mine), 1),
            "overhead_ns": round(overhead, 1),
            "calls": calls[key],
            "anchor": case.anchor,
            "ratio": None,
            "target": case.target,
            "ok": None,
            "check": None if case.check is None else failures.get(key, "ok"),
        }
        if case.anchor is not None:
            anchor = samples[(case.group, case.anchor, case.threads)]
            ratio = _paired_ratio(mine, anchor, bare if case.name != "bare" else None)
            row["ratio"] = round(ratio, 3) if ratio is not None else None
            if case.target is not None:
                row["ok"] = ratio is not None and ratio <= case.target
        if key in failures:
            row["ok"] = False
        rows.append(row)
    return rows


def result_row(result: Result) -> dict[str, Any]:
    row = asdict(result)
    row["ok"] = result.ok
    return row
