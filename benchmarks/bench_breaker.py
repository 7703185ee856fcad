"""Circuit breaker: closed-path overhead beside pybreaker and circuitbreaker, and whether
calls through one breaker run concurrently.

- ``cases()``: ns per call of a trivial function, bare and through each breaker, from 1
  thread and from 8 threads. Targets: our overhead <= 0.3x pybreaker's, <= 1.0x
  circuitbreaker's (which has no lock at all, so is not thread-safe).
- ``results()``: 8 threads each make bounded calls to a function that blocks 1 ms;
  effective concurrency = threads x calls x 1 ms / wall time. pybreaker holds a lock
  around the call, so it serialises them (about 1); ours should stay near the bare figure.

pybreaker's API: ``pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)``, used as
``@breaker`` or ``breaker.call(fn)``; circuitbreaker's: ``CircuitBreaker(failure_threshold=5,
recovery_timeout=30)`` used as ``@breaker``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import circuitbreaker  # type: ignore[import-untyped]
import pybreaker

from ai_guard.breaker import BreakerRegistry, CircuitBreaker, circuit_breaker
from ai_guard.stores import MemoryStore
from benchmarks._harness import Case, Result

GROUP = "breaker"


def _target() -> int:
    return 1


def _model_target(*, model: str) -> int:
    return 1


def _ours(fn: Callable[[], int]) -> Callable[[], int]:
    return CircuitBreaker("bench", failure_threshold=5, timeout=30.0, registry=None)(fn)


def _pybreaker(fn: Callable[[], int]) -> Callable[[], int]:
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)
    wrapped: Callable[[], int] = breaker(fn)
    return wrapped


def _circuitbreaker(fn: Callable[[], int]) -> Callable[[], int]:
    breaker = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=30)
    wrapped: Callable[[], int] = breaker(fn)
    return wrapped


def cases() -> list[Case]:
    out: list[Case] = []
    for threads in (1, 8):
        ours = _ours(_target)
        shared = CircuitBreaker("bench-shared", store=MemoryStore(), registry=None)(_target)
        template = circuit_breaker("bench:{model}", registry=BreakerRegistry())(_model_target)

        def per_model(template: Callable[..., int] = template) -> int:
            return template(model="gpt-4o-mini")

        def bare_per_model() -> int:
            return _model_target(model="gpt-4o-mini")

        out += [
            Case(GROUP, "bare", _target, threads=threads),
            Case(GROUP, "ai_guard", ours, anchor="pybreaker", target=0.3, threads=threads),
            Case(
                GROUP,
                "ai_guard vs circuitbreaker",
                ours,
                anchor="circuitbreaker",
                target=1.0,
                threads=threads,
            ),
            Case(GROUP, "pybreaker", _pybreaker(_target), threads=threads),
            Case(GROUP, "circuitbreaker", _circuitbreaker(_target), threads=threads),
            # Informative: a store-backed breaker (shared state read once per second) and
            # a per-model template (one dict lookup more), against the same bare function.
            Case(GROUP, "ai_guard shared (memory)", shared, threads=threads),
            Case(GROUP + " per-model", "bare", bare_per_model, threads=threads),
            Case(GROUP + " per-model", "ai_guard openai:{model}", per_model, threads=threads),
        ]
    return out


def _effective_concurrency(fn: Callable[[], object], threads: int, calls: int) -> float:
    start = threading.Barrier(threads + 1)

    def worker() -> None:
        start.wait()
        for _ in range(calls):
            fn()

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    began = time.perf_counter()
    for w in workers:
        w.join()
    wall = time.perf_counter() - began
    return threads * calls * 0.001 / wall


def _blocking() -> int:
    time.sleep(0.001)  # an upstream that takes 1 ms
    return 1


def results(quick: bool) -> list[Result]:
    threads, calls = 8, (20 if quick else 50)
    subjects: list[tuple[str, Callable[[], object], float | None]] = [
        ("bare", _blocking, None),
        ("ai_guard", _ours(_blocking), 6.0),
        ("pybreaker", _pybreaker(_blocking), None),
        ("circuitbreaker", _circuitbreaker(_blocking), None),
    ]
    out = []
    for name, fn, target in subjects:
        value = _effective_concurrency(fn, threads, calls)
        out.append(
            Result(
                GROUP,
                f"concurrency 8 threads x 1 ms: {name}",
                round(value, 2),
                "calls at once",
                target=target,
                detail={"threads": threads, "calls_per_thread": calls},
            )
        )
    return out
