"""Blocking calls through the full stack: do they still overlap?

8 threads each make a bounded number of calls to a function that blocks 1 ms
(``time.sleep(0.001)``, a stand-in for the HTTP call to the upstream). Effective
concurrency = threads x calls x 1 ms / wall time: about 8 when the calls overlap, about 1
when something serialises them. Three subjects, measured in alternation (round by round,
so that a burst of load on a shared machine hits all three):

- ``unwrapped``: the function alone;
- ``ai_guard full stack``: ``@routed`` + ``@traced_ai`` + ``@circuit_breaker("...:{model}")``
  + ``@rate_limited`` with the default sinks (metrics collector, call log), no SDK;
- ``diy stack (pybreaker)``: the do-it-yourself stack of ``bench_stack`` (OTel API span,
  ``limits`` moving window, prometheus_client, tenacity, pybreaker). pybreaker holds its
  lock around the call, so the calls queue behind it.

Target: ours >= 0.9x the unwrapped figure (median of the rounds' paired ratios). After
the runs, exact counts: the default collector and the DIY stack's Prometheus counter saw
every call.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

from opentelemetry.trace import NoOpTracer

from ai_guard.types import ChatResult
from benchmarks._harness import Result
from benchmarks._spans import MODEL
from benchmarks.bench_stack import RESULT, diy, ours

GROUP = "concurrency"
THREADS = 8
BLOCK_S = 0.001


def _blocking(prompt: str, *, model: str = "") -> ChatResult:
    time.sleep(BLOCK_S)  # the upstream takes 1 ms
    return RESULT


def _unwrapped() -> object:
    return _blocking("hello", model=MODEL)


def effective_concurrency(fn: Callable[[], object], threads: int, calls: int) -> float:
    """threads x calls x 1 ms / wall time, the threads started together."""
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker() -> None:
        start.wait()
        try:
            for _ in range(calls):
                fn()
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    began = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - began
    if errors:
        raise errors[0]
    return threads * calls * BLOCK_S / wall


def results(quick: bool) -> list[Result]:
    calls, rounds = (30, 3) if quick else (100, 5)
    our_call, setup, check = ours(None, _blocking)
    stack = diy(NoOpTracer(), _blocking)
    subjects: dict[str, Callable[[], object]] = {
        "unwrapped": _unwrapped,
        "ai_guard full stack": our_call,
        "diy stack (pybreaker)": stack.call,
    }
    figures: dict[str, list[float]] = {name: [] for name in subjects}
    setup()
    for _ in range(rounds):
        for name, fn in subjects.items():
            figures[name].append(effective_concurrency(fn, THREADS, calls))
    made = rounds * THREADS * calls
    check(made)  # the collector counted every call, exactly
    stack.check(made)  # so did the DIY stack's Prometheus counter
    stack.teardown()

    detail = {"threads": THREADS, "calls_per_thread": calls, "rounds": rounds, "block_ms": 1}
    out = [
        Result(
            GROUP,
            f"8 threads x 1 ms: {name}",
            round(statistics.median(values), 2),
            "calls at once",
            detail={**detail, "rounds_values": [round(v, 2) for v in values]},
        )
        for name, values in figures.items()
    ]
    bare = figures["unwrapped"]
    for name, target in (("ai_guard full stack", 0.9), ("diy stack (pybreaker)", None)):
        ratios = [mine / base for mine, base in zip(figures[name], bare, strict=True)]
        out.append(
            Result(
                GROUP,
                f"{name} / unwrapped",
                round(statistics.median(ratios), 3),
                "ratio",
                target=target,
                detail={**detail, "rounds_ratios": [round(r, 3) for r in ratios]},
            )
        )
    return out


if __name__ == "__main__":
    for row in results(quick=False):
        print(f"{row.name:<44}{row.value:>8.2f} {row.unit}")
