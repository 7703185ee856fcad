"""Reliability under load: many threads through the guards, faults mixed in, exact counts.

Two tests, because one cannot do both jobs on this 2-core machine within the suite's
budget:

- **32 threads x 2,000 calls through the guard stack** (``@routed`` -> ``@traced_ai`` ->
  ``@circuit_breaker("load:{model}")`` -> ``@rate_limited`` with a pacing budget), around
  an in-process stand-in for the HTTP call that fails the way an upstream does. 64,000
  real HTTP calls through ``AIClient`` and ``FakeUpstream`` would take about 80 s here
  (measured: ~790 calls/s with 32 threads, before retries), so the full count runs
  against the guards themselves, where the shared state (breaker windows and
  transitions, budget reservations, the collector's per-thread shards, the call
  contexts) lives; it takes a few seconds.
- **32 threads of HTTP calls through AIClient against FakeUpstream** with the same kind
  of faults (503s, resets, 0-2 ms latency), 50 calls per thread by default, so the
  client's own paths (connection pool, error mapping, retries with one idempotency key)
  are loaded too and ``upstream.stats()`` is held to the retries. Set
  ``AI_GUARD_HTTP_LOAD_CALLS=2000`` to run the full 32 x 2,000 over HTTP (it passes, in
  about 130 s here).

Each checks that the collector's totals equal the calls made (successes plus typed
failures), that the attempts the upstream saw equal the calls plus the retries the
metrics report (minus calls an open circuit refused), and a watchdog turns a deadlock
into a failure instead of a hung suite.
"""

from __future__ import annotations

import collections
import itertools
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from ai_guard.breaker import BreakerEvent, BreakerRegistry, circuit_breaker
from ai_guard.context import bind_sinks
from ai_guard.errors import AIGuardError, UpstreamConnectionError, UpstreamError
from ai_guard.metrics import MetricsCollector
from ai_guard.pacing import RateLimitBudget
from ai_guard.ratelimit import rate_limited
from ai_guard.routing import Router, RouteRequest, routed
from ai_guard.stores import MemoryStore
from ai_guard.testing import FakeClock, FakeUpstream
from ai_guard.tracing import traced_ai
from ai_guard.types import ChatResult, Usage
from tests.test_client import MODEL, make_client
from tests.test_reliability_faults import (
    Ledger,
    assert_typed,
    forget_default_breakers,
    no_thread_left_behind,
)

__all__ = ["forget_default_breakers", "no_thread_left_behind"]  # autouse fixtures

THREADS = 32
CALLS_PER_THREAD = 2_000
HTTP_CALLS_PER_THREAD = int(os.environ.get("AI_GUARD_HTTP_LOAD_CALLS", "50"))
MINI, FULL = "gpt-4o-mini", "gpt-4o"
SIMPLE = RouteRequest("classification", 2)
CRITICAL = RouteRequest("chat", 8, is_critical=True)
# What a healthy answer says about the quota: plenty left, so pacing never waits.
QUOTA_HEADERS = {
    "x-ratelimit-limit-requests": "100000",
    "x-ratelimit-remaining-requests": "99999",
    "x-ratelimit-reset-requests": "1s",
}


def run_threads(work: Callable[[int], Any], *, threads: int, watchdog: float) -> list[Any]:
    """Run ``work(n)`` in ``threads`` threads; a thread still running after ``watchdog``
    seconds (a deadlock) fails the test."""
    deadline = time.monotonic() + watchdog
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures: list[Future[Any]] = [pool.submit(work, n) for n in range(threads)]
        return [f.result(timeout=max(0.1, deadline - time.monotonic())) for f in futures]


class FlakyUpstream:
    """The in-process stand-in for one HTTP attempt: 5 % 503s, 1 % connection resets,
    0-2 ms of latency on a quarter of the calls, and an outage of the mini model for the
    attempts numbered in ``outage`` (long enough for retries to run out, so its breaker
    opens and the router falls back to the full model)."""

    def __init__(self, outage: range) -> None:
        self.attempts = itertools.count(1)  # next() is atomic: an exact count of attempts
        self.outage = outage
        self._local = threading.local()

    def _rng(self) -> random.Random:
        rng: random.Random | None = getattr(self._local, "rng", None)
        if rng is None:
            rng = self._local.rng = random.Random(threading.get_ident())
        return rng

    def __call__(self, *, messages: list[Any], model: str, route: RouteRequest) -> ChatResult:
        attempt = next(self.attempts)
        if model == MINI and attempt in self.outage:
            raise UpstreamError("HTTP 503 from the stand-in: mini is down", status=503)
        rng = self._rng()
        draw = rng.random()
        if draw < 0.05:
            raise UpstreamError("HTTP 503 from the stand-in", status=503)
        if draw < 0.06:
            raise UpstreamConnectionError("the connection was reset")
        if draw < 0.31:
            time.sleep(rng.random() * 0.002)  # the upstream's latency, not a wait for state
        return ChatResult(
            content="ok",
            model=model,
            usage=Usage(12, 3, 15, 0),
            finish_reason="stop",
            headers=QUOTA_HEADERS,
        )

    def attempts_made(self) -> int:
        return next(self.attempts) - 1


@pytest.mark.timeout(150)
def test_32_threads_x_2000_calls_through_the_guard_stack_are_counted_exactly() -> None:
    clock = FakeClock()
    collector = MetricsCollector(clock=clock)
    registry = BreakerRegistry()
    transitions: list[BreakerEvent] = []
    registry.add_listener(transitions.append)
    budget = RateLimitBudget(MemoryStore(clock=clock), key="load|{model}", clock=clock)
    upstream = FlakyUpstream(outage=range(20_000, 20_400))
    router = Router(breakers=lambda model: registry.get(f"load:{model}"))

    # Short waits on the fake clock: the backoff sleeps are what move its time, and the
    # breaker's 1 s open timeout must pass within the run for it to heal.
    @routed(router, clock=clock)
    @traced_ai("chat", clock=clock)
    @circuit_breaker("load:{model}", registry=registry, clock=clock, timeout=1.0)
    @rate_limited(
        5,
        base_delay=0.01,
        max_delay=0.2,
        retry_on_status=(429, 500, 502, 503, 504),
        retry_on_exceptions=(UpstreamConnectionError,),
        budget=budget,
        clock=clock,
    )
    def ask(*, messages: list[Any], model: str = "", route: RouteRequest) -> ChatResult:
        return upstream(messages=messages, model=model, route=route)

    def work(worker: int) -> collections.Counter[str]:
        seen: collections.Counter[str] = collections.Counter()
        messages = [{"role": "user", "content": f"worker {worker}"}]
        with bind_sinks(collector.record_call):
            for call in range(CALLS_PER_THREAD):
                route = CRITICAL if call % 10 == 0 else SIMPLE
                try:
                    result = ask(messages=messages, route=route)
                except AIGuardError as exc:
                    assert_typed(exc)
                    seen[type(exc).__name__] += 1
                else:
                    assert result.content == "ok"
                    seen["ok"] += 1
        return seen

    outcomes: collections.Counter[str] = sum(
        run_threads(work, threads=THREADS, watchdog=120), collections.Counter()
    )
    calls = THREADS * CALLS_PER_THREAD
    assert sum(outcomes.values()) == calls
    failures = calls - outcomes["ok"]
    assert set(outcomes) - {"ok"} <= {
        "UpstreamError",
        "UpstreamConnectionError",
        "CircuitOpenError",
    }

    report = collector.report()
    assert report["total_requests"] == calls
    assert report["error_count"] == failures
    assert report["full_requests"] + report["mini_requests"] == calls
    # Every attempt is one call or one retry; a call refused by every open circuit made none.
    assert upstream.attempts_made() == calls - outcomes["CircuitOpenError"] + report["retries"]
    assert report["retries"] > calls * 0.05  # the faults were there

    # The outage opened mini's breaker, the router sent traffic to the full model
    # meanwhile, and the breaker closed again once mini answered.
    mini = registry.get(f"load:{MINI}")
    assert mini is not None
    assert [e.to_state for e in transitions if e.breaker == mini.name][:1] == ["open"]
    assert report["fallbacks"] > 0
    assert mini.state == "closed"
    # Every budget reservation was given back: nothing is left "in flight".
    for model in (MINI, FULL):
        snapshot = budget.bind(model=model).snapshot()
        assert snapshot.requests.in_flight == 0.0


@pytest.mark.timeout(300 if HTTP_CALLS_PER_THREAD > 200 else 90)
def test_32_threads_of_http_calls_with_faults_are_counted_exactly() -> None:
    clock = FakeClock()
    collector = MetricsCollector(clock=clock)
    ledger = Ledger()
    latency = random.Random(7)
    with FakeUpstream(
        seed=11,
        error_rate=0.05,
        error_statuses=(503,),
        reset_rate=0.01,
        latency=lambda: latency.uniform(0.0, 0.002),
        record_limit=1,  # stats() stays exact; the records themselves are not needed
    ) as upstream:
        with make_client(
            upstream,
            clock=clock,
            collector=collector,
            pool_maxsize=THREADS,
            breaker={"registry": BreakerRegistry()},
        ) as client:

            def work(worker: int) -> None:
                for call in range(HTTP_CALLS_PER_THREAD):
                    outcome = ledger.chat(
                        client, messages=[{"role": "user", "content": f"{worker}:{call}"}]
                    )
                    if isinstance(outcome, ChatResult):
                        assert outcome.model == MODEL

            run_threads(work, threads=THREADS, watchdog=250 if HTTP_CALLS_PER_THREAD > 200 else 60)
        stats = upstream.stats()
        assert upstream.server_errors == []
    calls = THREADS * HTTP_CALLS_PER_THREAD
    assert ledger.calls == calls
    ledger.assert_counted(collector, upstream)
    report = collector.report()
    assert stats["200"] == ledger.successes
    # every attempt that was not a 200 was an injected fault, and was retried unless it
    # was the last attempt of a call that failed
    faults = stats.get("503", 0) + stats.get("reset", 0)
    assert faults == stats["total"] - stats["200"]
    assert faults == report["retries"] + ledger.failed - ledger.rejected
    assert faults > 0
